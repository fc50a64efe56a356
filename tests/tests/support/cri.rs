//! CRI fixtures shared by the containerd test and the CRI latency benchmark: containerd in a
//! node namespace with the node's chain ([`CriLab`]), and a small CRI client over its socket.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ambient_tests::addrs::Block;
use ambient_tests::cni::Attach;
use ambient_tests::containerd::{Containerd, ContainerdConfig};
use ambient_tests::oci;
use ambient_tests::topo::{Node, NodeSpec};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

pub const RECORDER: &str = env!("CARGO_BIN_EXE_cni-recorder");
pub const PAUSE_IMAGE: &str = "localhost/ambient-test/pause:v1";

/// What the last plugin of the chain is.
pub enum Last {
    Recorder(PathBuf),
    AmbientCni,
}

/// containerd in a node namespace, with the node's chain as its only CNI config.
pub struct CriLab {
    // Drop order: containerd (and its sandboxes) before the node namespace and the files.
    pub containerd: Containerd,
    pub node: Node,
    pub node_name: String,
    pub dir: tempfile::TempDir,
    /// The node's addresses: pods in `10.<octet>.1.0/24`.
    pub block: Block,
}

impl CriLab {
    pub fn new(tag: &str, last: Last) -> Self {
        let block = Block::lease();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{tag}-{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let agent_socket = dir.path().join("run").join("cni.sock");
        std::fs::create_dir_all(agent_socket.parent().unwrap()).unwrap();
        let mut spec =
            NodeSpec::new(tag, &block.net24(1), Attach::Bridge).agent_socket(&agent_socket);
        if let Last::Recorder(calls) = &last {
            spec.ambient_cni = Some(PathBuf::from(RECORDER));
            spec.ambient_extra
                .insert("recordFile".into(), calls.to_string_lossy().into());
        }
        let node = Node::new(&spec).unwrap();
        let image = oci::build_pause_image(dir.path(), PAUSE_IMAGE).unwrap();
        let base = dir.path().join("containerd");
        let mut cfg = ContainerdConfig::in_dir(
            &base,
            PAUSE_IMAGE,
            &format!("/ambient-test-{}", node.ns().name()),
        );
        cfg.cni_bin_dir = node.dir().join("cni-bin");
        node.write_conflist(&cfg.cni_conf_dir).unwrap();
        let containerd = Containerd::start(node.ns().name(), cfg).unwrap();
        containerd.import_image(&image).unwrap();
        Self {
            containerd,
            node_name: node.ns().name().to_owned(),
            node,
            dir,
            block,
        }
    }

    /// The node's pod range.
    pub fn pod_cidr(&self) -> String {
        self.block.net24(1)
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.dir.path().join("run").join("cni.sock")
    }

    pub async fn client(&self) -> RuntimeServiceClient<Channel> {
        let sock = self.containerd.socket().to_path_buf();
        let channel = Endpoint::try_from("http://[::1]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        RuntimeServiceClient::new(channel)
    }

    pub fn sandbox_config(&self, pod: &PodIdentity) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            hostname: pod.name.clone(),
            log_directory: self.dir.path().join("logs").to_string_lossy().into_owned(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.containerd.config().cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodIdentity {
    pub fn new(namespace: &str, name: &str) -> Self {
        let uid = ambient_tests::topo::PodMeta::new(namespace, name).uid;
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
        }
    }
}

/// RunPodSandbox; returns the sandbox id, its IP and the call's latency.
pub async fn run_sandbox(
    lab: &CriLab,
    client: &mut RuntimeServiceClient<Channel>,
    pod: &PodIdentity,
) -> (String, String, Duration) {
    let start = Instant::now();
    let resp = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(lab.sandbox_config(pod)),
            runtime_handler: String::new(),
        })
        .await;
    let latency = start.elapsed();
    let id = match resp {
        Ok(r) => r.into_inner().pod_sandbox_id,
        Err(e) => panic!(
            "RunPodSandbox failed: {e}\ncontainerd log:\n{}",
            lab.containerd.log_tail(30)
        ),
    };
    let status = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    (id, ip, latency)
}

pub async fn stop_and_remove(client: &mut RuntimeServiceClient<Channel>, id: &str) -> Duration {
    let start = Instant::now();
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })
        .await
        .unwrap();
    let stop = start.elapsed();
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        })
        .await
        .unwrap();
    stop
}

pub fn in_cidr_24(ip: &str, cidr: &str) -> bool {
    let net = cidr.rsplit_once('.').map(|(p, _)| p).unwrap_or(cidr);
    ip.starts_with(&format!("{net}."))
}

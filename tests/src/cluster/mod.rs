//! A whole ambient cluster out of namespaces, for the end-to-end tests, the fault tests and
//! the `lab` binary: N [`Node`]s joined by an underlay (a bridge `ul0` in its own namespace,
//! one veth per node), one CA, one shared manifest directory, and on every node the real
//! `node-agent` and `ztunnel`, plus pods created through the node's real CNI chain
//! (`bridge|ptp` + `host-local` + `ambient-cni`) with their Pod manifests, an echo server in
//! each, Services with EndpointSlices and kube-proxy-style DNAT rules.
//!
//! Addresses come from [`Addressing`]: pods of node `i` (1-based) in `<pod>.<i>.0/24`, the
//! underlay in `<underlay>.0/24` (node `i` is `.i`), service VIPs in `<service>.0/24`. A test
//! cluster's plan comes from a block leased from [`crate::addrs`] ([`ClusterSpec::leased`]),
//! so clusters run in parallel.
//!
//! Dropping a [`Cluster`] deletes its pods through the chain (DEL), stops its processes and
//! deletes its namespaces and files. [`Cluster::persist`] instead leaves everything running
//! and returns a [`LabState`] (what the `lab` binary saves), whose [`LabState::down`] removes
//! it from another process.
//!
//! # Layout
//! Everything is reachable here, at `cluster::<name>`; the files hold:
//! - `mod.rs`: the lifecycle: [`ClusterSpec`], [`Cluster`] (building the underlay, nodes and
//!   CA, starting and stopping `node-agent`, `ztunnel` and `ambient-issuer`, pods and their
//!   manifests, connecting through the mesh), [`ClusterNode`], [`ClusterPod`], [`ClusterError`].
//! - `addressing.rs`: [`Addressing`], the address plan.
//! - `services.rs`: [`ServiceDef`], its Service and EndpointSlice objects and kube-proxy-style
//!   DNAT rule, and [`Cluster::add_service`] / [`Cluster::wait_services`].
//! - `state.rs`: persistence: [`LabState`], [`NodeState`], [`PodState`], [`STATE_FILE`],
//!   [`Cluster::persist`] / [`Cluster::state`], [`LabState::down`].
//! - `metrics.rs`: Prometheus text parsing: [`metric_samples`], [`sum_samples`].
//! - `probes.rs`: observing from outside: underlay captures ([`UnderlaySummary`],
//!   [`ambient_plaintext`], [`finish_quiet`]), [`rss_kb`], [`tail`].

mod addressing;
mod metrics;
mod probes;
mod services;
mod state;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

pub use addressing::Addressing;
pub use metrics::{metric_samples, sum_samples};
pub use probes::{ambient_plaintext, finish_quiet, rss_kb, tail, UnderlaySummary};
pub use services::ServiceDef;
pub use state::{LabState, NodeState, PodState, STATE_FILE};

use crate::addrs::Block;
use crate::bins::{self, BinDir};
use crate::capture::Capture;
use crate::cni::Attach;
use crate::inns::{self, in_ns};
use crate::manifests::{self, ManifestDir};
use crate::netns::{eventually, run, NetNs, NetNsError};
use crate::topo::{Node, NodeSpec, Pod, PodMeta, TopoError};

/// The echo port every pod serves.
pub const ECHO_PORT: u16 = 8080;
/// The uid:gid ztunnel runs as in the lab, as in `install/manifests/ztunnel-daemonset.yaml`.
pub use ambient_common::constants::ZTUNNEL_RUN_AS;
/// The bridge joining the nodes, inside the underlay namespace.
pub const UNDERLAY_BRIDGE: &str = "ul0";
/// Each node's underlay interface.
pub const NODE_UNDERLAY_IF: &str = "ul";
const READY_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("namespace operation failed")]
    NetNs(#[from] NetNsError),
    #[error("node setup failed")]
    Topo(#[source] Box<TopoError>),
    #[error("binary missing")]
    Bin(#[from] bins::BinError),
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest write failed")]
    Manifest(#[from] crate::manifests::ManifestWriteError),
    #[error("{what} on {node} did not become ready: {detail}\n--- log tail ---\n{log}")]
    NotReady {
        what: &'static str,
        node: String,
        detail: String,
        log: String,
    },
    #[error("ADD of pod {namespace}/{name} failed\n--- agent log tail ---\n{log}")]
    Add {
        namespace: String,
        name: String,
        log: String,
        #[source]
        source: Box<TopoError>,
    },
    #[error("pod {0} got no IPv4 address from the chain")]
    NoAddress(String),
    #[error("no pod named {0}")]
    UnknownPod(String),
    #[error("capture failed")]
    Capture(#[from] crate::capture::CaptureError),
    #[error("cannot work inside a namespace")]
    InNs(#[from] inns::InNsError),
}

impl From<TopoError> for ClusterError {
    fn from(e: TopoError) -> Self {
        ClusterError::Topo(Box::new(e))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Short tag for namespace names.
    pub tag: String,
    pub nodes: usize,
    pub attach: Attach,
    pub addressing: Addressing,
    /// Where files go; `None`: a temporary directory removed on drop.
    pub root: Option<PathBuf>,
    pub trust_domain: String,
    /// More `node-agent run` flags.
    pub agent_args: Vec<String>,
    /// More `ztunnel run` flags.
    pub ztunnel_args: Vec<String>,
    /// Extra keys for the `ambient-cni` conflist entry.
    pub cni_extra: serde_json::Map<String, Value>,
    /// `ztunnel run --run-as` (as the DaemonSet runs it); `None` leaves ztunnel root.
    pub ztunnel_run_as: Option<String>,
    /// Where ztunnel's certificates come from.
    pub ca: CaMode,
    /// ztunnel binaries other than the workspace's, per node index (a previous release, for
    /// rollout tests).
    pub ztunnel_binaries: BTreeMap<usize, PathBuf>,
    /// The address block [`addressing`](Self::addressing) was made from, held as long as the
    /// spec (and so the cluster) lives; `None` for a fixed plan such as the lab's.
    pub lease: Option<Arc<Block>>,
}

/// Where the cluster's ztunnels get their certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaMode {
    /// From `ambient-issuer`, the only process holding the CA key, in the underlay namespace
    /// (the control plane's place); each node authenticates with its own credential.
    Issuer,
    /// Each ztunnel reads the CA key itself (`--ca-dir`, the development mode); the issuer
    /// still runs, unused by the ztunnels.
    NodeKey,
}

impl ClusterSpec {
    /// A test cluster in a block leased from [`crate::addrs`] (see [`Addressing::test`]),
    /// short polling intervals.
    pub fn leased(tag: &str, nodes: usize, attach: Attach) -> Self {
        let block = Block::lease();
        let mut spec = Self::new(tag, nodes, attach, Addressing::test(block.octet()));
        spec.lease = Some(Arc::new(block));
        spec
    }

    /// A cluster of `nodes` nodes with the `addressing` plan, short polling intervals.
    pub fn new(tag: &str, nodes: usize, attach: Attach, addressing: Addressing) -> Self {
        let mut cni_extra = serde_json::Map::new();
        cni_extra.insert("timeoutMs".into(), json!(8000));
        Self {
            tag: tag.to_owned(),
            nodes,
            attach,
            addressing,
            root: None,
            trust_domain: "cluster.local".into(),
            agent_args: vec![
                "--pod-wait-ms".into(),
                "3000".into(),
                "--reconcile-interval-ms".into(),
                "1000".into(),
            ],
            ztunnel_args: vec!["--poll-interval".into(), "200ms".into()],
            cni_extra,
            ztunnel_run_as: Some(ZTUNNEL_RUN_AS.into()),
            ca: CaMode::Issuer,
            ztunnel_binaries: BTreeMap::new(),
            lease: None,
        }
    }
}

/// For tests: a two-node cluster in a leased address block with the test defaults; panics
/// with the reason.
pub fn test_cluster(tag: &str, attach: Attach) -> Cluster {
    Cluster::new(ClusterSpec::leased(tag, 2, attach))
        .unwrap_or_else(|e| panic!("cluster {tag}: {e}"))
}

/// For tests: [`Cluster::add_pod`] without labels, panicking with the reason; the pod's index.
pub fn test_pod(c: &mut Cluster, node: usize, ns: &str, name: &str) -> usize {
    test_pod_labelled(c, node, ns, name, &[])
}

/// For tests: [`Cluster::add_pod`], panicking with the reason; the pod's index.
pub fn test_pod_labelled(
    c: &mut Cluster,
    node: usize,
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> usize {
    c.add_pod(node, ns, name, labels)
        .unwrap_or_else(|e| panic!("pod {ns}/{name}: {e}"))
}

/// One node of the cluster with its processes.
#[derive(Debug)]
pub struct ClusterNode {
    /// The Kubernetes node name (`node-<i>`).
    pub name: String,
    pub index: usize,
    pub node: Node,
    pub underlay_ip: Ipv4Addr,
    pub dir: PathBuf,
    pub agent_pid: Option<u32>,
    pub ztunnel_pid: Option<u32>,
}

impl ClusterNode {
    pub fn ns(&self) -> &NetNs {
        self.node.ns()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("node-agent.log")
    }

    pub fn ztunnel_log(&self) -> PathBuf {
        self.dir.join("ztunnel.log")
    }

    pub fn cni_log(&self) -> PathBuf {
        self.dir.join("ambient-cni.log")
    }

    pub fn ztunnel_socket(&self) -> PathBuf {
        self.run_dir().join("ztunnel.sock")
    }

    /// GET `path` from one of ztunnel's HTTP ports, from inside the node namespace.
    pub fn ztunnel_http(&self, port: u16, path: &str) -> Result<(u16, String), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        in_ns(&self.ns().path(), || {
            inns::http_get(addr, path, Duration::from_secs(3))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// ztunnel's `/metrics` text.
    pub fn metrics(&self) -> Result<String, String> {
        match self.ztunnel_http(ambient_common::constants::METRICS_PORT, "/metrics")? {
            (200, body) => Ok(body),
            (s, body) => Err(format!("/metrics answered {s}: {body}")),
        }
    }

    /// ztunnel's `/connections` (JSON array).
    pub fn connections(&self) -> Result<Value, String> {
        match self.ztunnel_http(ambient_common::constants::ADMIN_PORT, "/connections")? {
            (200, body) => serde_json::from_str(&body).map_err(|e| e.to_string()),
            (s, body) => Err(format!("/connections answered {s}: {body}")),
        }
    }

    /// ztunnel's `/config_dump` (JSON).
    pub fn config_dump(&self) -> Result<Value, String> {
        match self.ztunnel_http(ambient_common::constants::ADMIN_PORT, "/config_dump")? {
            (200, body) => serde_json::from_str(&body).map_err(|e| e.to_string()),
            (s, body) => Err(format!("/config_dump answered {s}: {body}")),
        }
    }

    pub fn ztunnel_ready(&self) -> bool {
        matches!(
            self.ztunnel_http(ambient_common::constants::READINESS_PORT, "/healthz/ready"),
            Ok((200, _))
        )
    }
}

/// A pod of the cluster.
#[derive(Debug)]
pub struct ClusterPod {
    pub pod: Pod,
    pub node: usize,
    pub meta: PodMeta,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    pub ip: Ipv4Addr,
    pub echo_pid: Option<u32>,
    /// The echo server's connection records (peer, local, original destination).
    pub records: PathBuf,
}

impl ClusterPod {
    /// The connections the pod's echo server accepted so far.
    pub fn accepted(&self) -> Vec<crate::probe::ConnRecord> {
        crate::probe::read_records(&self.records).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn namespace(&self) -> &str {
        &self.meta.namespace
    }

    pub fn ns(&self) -> &NetNs {
        self.pod.ns()
    }

    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, ECHO_PORT))
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe(&self, trust_domain: &str) -> String {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.meta.namespace, self.service_account
        )
    }
}

#[derive(Debug)]
enum Root {
    Temp(tempfile::TempDir),
    Kept(PathBuf),
}

impl Root {
    fn path(&self) -> &Path {
        match self {
            Root::Temp(t) => t.path(),
            Root::Kept(p) => p,
        }
    }
}

/// The cluster. Field order is drop order: pods (DEL while the agents run), nodes (their
/// processes and namespaces), the underlay, then the files.
#[derive(Debug)]
pub struct Cluster {
    pub pods: Vec<ClusterPod>,
    pub nodes: Vec<ClusterNode>,
    pub underlay: NetNs,
    pub spec: ClusterSpec,
    pub manifests: ManifestDir,
    pub services: Vec<ServiceDef>,
    namespaces: BTreeMap<String, Vec<(String, String)>>,
    bins: BinDir,
    root: Root,
    pub issuer_pid: Option<u32>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if self.issuer_pid.is_some() {
                eprintln!(
                    "==== ambient-issuer log (tail) ====\n{}",
                    tail(&self.issuer_log(), 40)
                );
            }
            for n in &self.nodes {
                for (what, path) in [("node-agent", n.agent_log()), ("ztunnel", n.ztunnel_log())] {
                    eprintln!(
                        "==== {what} log of {} (tail) ====\n{}",
                        n.name,
                        tail(&path, 40)
                    );
                }
            }
        }
        self.pods.clear();
    }
}

impl Cluster {
    /// Builds the nodes, the underlay, the CA, and starts every agent and ztunnel. The
    /// namespaces `ambient-demo` (ambient) and `legacy` exist from the start.
    pub fn new(spec: ClusterSpec) -> Result<Self, ClusterError> {
        let bins = BinDir::current()?;
        for b in [
            bins::NODE_AGENT,
            bins::ZTUNNEL,
            bins::AMBIENT_CNI,
            bins::NETPROBE,
            bins::ISSUER,
        ] {
            bins.find(b)?;
        }
        let root = match &spec.root {
            Some(p) => {
                std::fs::create_dir_all(p).map_err(io_err(p))?;
                Root::Kept(p.clone())
            }
            None => Root::Temp(
                tempfile::Builder::new()
                    .prefix(&format!("cluster-{}-", spec.tag))
                    .tempdir()
                    .map_err(|source| ClusterError::Io {
                        path: std::env::temp_dir(),
                        source,
                    })?,
            ),
        };
        // ztunnel reads the manifest directory as its own uid (`--run-as`): the cluster's
        // directory must be traversable by it (a temporary directory is 0700).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755))
                .map_err(io_err(root.path()))?;
        }
        let manifests = ManifestDir::new(&root.path().join("manifests"))?;
        let underlay = NetNs::new(&format!("{}-ul", spec.tag))?;
        underlay.ip(&["link", "add", UNDERLAY_BRIDGE, "type", "bridge"])?;
        underlay.ip(&["link", "set", UNDERLAY_BRIDGE, "up"])?;
        let mut cluster = Cluster {
            pods: Vec::new(),
            nodes: Vec::new(),
            underlay,
            spec: spec.clone(),
            manifests,
            services: Vec::new(),
            namespaces: BTreeMap::new(),
            bins,
            root,
            issuer_pid: None,
        };
        let ca_dir = cluster.ca_dir();
        run(std::process::Command::new(cluster.bin(bins::ISSUER))
            .args(["ca", "init", "--trust-domain", &spec.trust_domain, "--dir"])
            .arg(&ca_dir))?;
        cluster.set_namespace("ambient-demo", true)?;
        cluster.set_namespace("legacy", false)?;
        for i in 1..=spec.nodes {
            cluster.add_node(i)?;
        }
        let addr = format!("{}/24", cluster.issuer_ip());
        cluster
            .underlay
            .ip(&["addr", "add", &addr, "dev", UNDERLAY_BRIDGE])?;
        cluster.start_issuer()?;
        // Routes between nodes: each node's pod range via its underlay address.
        for a in 0..cluster.nodes.len() {
            for b in 0..cluster.nodes.len() {
                if a != b {
                    let via = cluster.nodes[b].underlay_ip.to_string();
                    let cidr = spec.addressing.pod_cidr(b + 1);
                    cluster.nodes[a]
                        .ns()
                        .ip(&["route", "add", &cidr, "via", &via])?;
                }
            }
        }
        // Service VIPs are reachable from the nodes themselves (a real node has a default
        // route): the kube-proxy stand-in's output chain then DNATs them.
        let [a, b, c3] = spec.addressing.service;
        let svc_cidr = format!("{a}.{b}.{c3}.0/24");
        for n in &cluster.nodes {
            n.ns()
                .ip(&["route", "add", &svc_cidr, "dev", NODE_UNDERLAY_IF])?;
        }
        for i in 0..cluster.nodes.len() {
            cluster.start_ztunnel(i)?;
            cluster.start_agent(i)?;
        }
        Ok(cluster)
    }

    fn add_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let name = format!("node-{i}");
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(dir.join("run")).map_err(io_err(&dir))?;
        let mut nspec = NodeSpec::new(
            &format!("{}-n{i}", self.spec.tag),
            &self.spec.addressing.pod_cidr(i),
            self.spec.attach,
        )
        .agent_socket(dir.join("run/cni.sock"));
        nspec.work_dir_in = Some(dir.clone());
        nspec.ambient_extra = self.spec.cni_extra.clone();
        nspec
            .ambient_extra
            .insert("logFile".into(), json!(dir.join("ambient-cni.log")));
        let node = Node::new(&nspec)?;
        let underlay_ip = self.spec.addressing.underlay_ip(i);
        let port = format!("n{i}");
        NetNs::veth_pair(
            &self.underlay,
            &port,
            None,
            node.ns(),
            NODE_UNDERLAY_IF,
            Some(&format!("{underlay_ip}/24")),
        )?;
        self.underlay
            .ip(&["link", "set", &port, "master", UNDERLAY_BRIDGE])?;
        self.add_credential(&["--node", &name], &dir.join(CA_TOKEN_FILE))?;
        self.nodes.push(ClusterNode {
            name,
            index: i,
            node,
            underlay_ip,
            dir,
            agent_pid: None,
            ztunnel_pid: None,
        });
        Ok(())
    }

    /// The cluster's pod ranges and service range, as ztunnel's `--cluster-cidrs` takes them
    /// (the underlay, where the nodes live, is not in them).
    pub fn cluster_cidrs(&self) -> String {
        let a = &self.spec.addressing;
        let [x, y, z] = a.service;
        let mut v: Vec<String> = (1..=self.spec.nodes).map(|i| a.pod_cidr(i)).collect();
        v.push(format!("{x}.{y}.{z}.0/24"));
        v.join(",")
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.root.path().join("ca")
    }

    /// The issuer's directory: its credentials file and log.
    pub fn issuer_dir(&self) -> PathBuf {
        self.root.path().join("issuer")
    }

    pub fn issuer_log(&self) -> PathBuf {
        self.issuer_dir().join("ambient-issuer.log")
    }

    pub fn issuer_credentials(&self) -> PathBuf {
        self.issuer_dir().join("credentials.yaml")
    }

    /// The issuer's address on the underlay (the bridge's own address in the underlay
    /// namespace), reachable from every node.
    pub fn issuer_ip(&self) -> Ipv4Addr {
        self.spec.addressing.underlay_ip(ISSUER_HOST as usize)
    }

    pub fn issuer_url(&self) -> String {
        format!(
            "https://{}:{}",
            self.issuer_ip(),
            ambient_common::constants::ISSUER_GRPC_PORT
        )
    }

    /// Mints a credential for the issuer (`ambient-issuer credential add` with `args`) and
    /// writes its token to `token_out`, readable by ztunnel's uid.
    pub fn add_credential(&self, args: &[&str], token_out: &Path) -> Result<(), ClusterError> {
        let dir = self.issuer_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        run(std::process::Command::new(self.bin(bins::ISSUER))
            .args(["credential", "add", "--file"])
            .arg(self.issuer_credentials())
            .arg("--token-out")
            .arg(token_out)
            .args(args))?;
        if let Some((uid, gid)) = self
            .spec
            .ztunnel_run_as
            .as_deref()
            .and_then(|s| s.split_once(':'))
        {
            let (uid, gid) = (uid.parse().ok(), gid.parse().ok());
            std::os::unix::fs::chown(token_out, uid, gid).map_err(io_err(token_out))?;
        }
        Ok(())
    }

    /// GET `path` from the issuer's metrics port, from the underlay namespace.
    pub fn issuer_http(&self, path: &str) -> Result<(u16, String), String> {
        let addr = SocketAddr::from((
            self.issuer_ip(),
            ambient_common::constants::ISSUER_METRICS_PORT,
        ));
        in_ns(&self.underlay.path(), || {
            inns::http_get(addr, path, Duration::from_secs(3))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// The sum of an issuer metric's samples whose labels include `labels`.
    pub fn issuer_metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        match self.issuer_http("/metrics") {
            Ok((200, body)) => sum_samples(&body, metric, labels),
            _ => 0.0,
        }
    }

    /// Starts the issuer in the underlay namespace and waits for `/ready`.
    pub fn start_issuer(&mut self) -> Result<u32, ClusterError> {
        let dir = self.issuer_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let (out, err) = Self::log_file(&self.issuer_log())?;
        let mut cmd = self.underlay.command(self.bin(bins::ISSUER));
        cmd.args(["run", "--trust-domain", &self.spec.trust_domain])
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .args(["--source", "manifests", "--manifest-dir"])
            .arg(self.manifests.path())
            .arg("--credentials")
            .arg(self.issuer_credentials())
            .args(["--serving-ip", &self.issuer_ip().to_string()])
            .args(["--reload-interval", "200ms", "--pod-wait", "3s"])
            .stdout(out)
            .stderr(err);
        let pid = self.underlay.spawn(&mut cmd)?;
        self.issuer_pid = Some(pid);
        wait_ready(
            pid,
            "ambient-issuer",
            "underlay",
            "not ready",
            || matches!(self.issuer_http("/ready"), Ok((200, _))),
            &self.issuer_log(),
        )?;
        Ok(pid)
    }

    /// Sends one certificate request to the issuer, from the underlay namespace, verifying
    /// it against the cluster's root.
    pub fn ask_issuer(&self, ask: &crate::issuer::Ask<'_>) -> crate::issuer::Answer {
        let addr = SocketAddr::from((
            self.issuer_ip(),
            ambient_common::constants::ISSUER_GRPC_PORT,
        ));
        let root = self.ca_dir().join("root-cert.pem");
        let name = self.issuer_ip().to_string();
        in_ns(&self.underlay.path(), || {
            crate::issuer::ask_once(addr, &root, &name, ask)
        })
        .unwrap_or_else(|e| crate::issuer::Answer::Failed(e.to_string()))
    }

    /// Stops the issuer (an outage).
    pub fn stop_issuer(&mut self) {
        if let Some(pid) = self.issuer_pid.take() {
            self.underlay.stop(pid);
        }
    }

    /// The `ztunnel run` flags that say where certificates come from.
    fn ztunnel_ca_args(&self, node: &ClusterNode) -> Vec<std::ffi::OsString> {
        match self.spec.ca {
            CaMode::Issuer => vec![
                "--ca-address".into(),
                self.issuer_url().into(),
                "--ca-root".into(),
                self.ca_dir().join("root-cert.pem").into(),
                "--ca-token".into(),
                node.dir.join(CA_TOKEN_FILE).into(),
            ],
            CaMode::NodeKey => vec!["--ca-dir".into(), self.ca_dir().into()],
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.path().join(name)
    }

    pub fn trust_domain(&self) -> &str {
        &self.spec.trust_domain
    }

    fn log_file(path: &Path) -> Result<(std::fs::File, std::fs::File), ClusterError> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let g = f.try_clone().map_err(io_err(path))?;
        Ok((f, g))
    }

    /// Starts ztunnel on node `i` (0-based) and waits for its readiness endpoint.
    pub fn start_ztunnel(&mut self, i: usize) -> Result<u32, ClusterError> {
        let binary = match self.spec.ztunnel_binaries.get(&i) {
            Some(b) => b.clone(),
            None => self.bin(bins::ZTUNNEL),
        };
        let log = self.nodes[i].ztunnel_log();
        let pid = self.spawn_ztunnel(i, &binary, &log)?;
        self.nodes[i].ztunnel_pid = Some(pid);
        let n = &self.nodes[i];
        wait_ready(
            pid,
            "ztunnel",
            &n.name,
            "not ready",
            || n.ztunnel_ready(),
            &n.ztunnel_log(),
        )?;
        Ok(pid)
    }

    /// A rolling update's surge pod: starts a second ztunnel on node `i` from `binary`
    /// beside the running one (they share the listeners, SO_REUSEPORT), waits until it says
    /// it is ready, and makes it node `i`'s ztunnel. Returns the previous one's pid, still
    /// running (stop it with SIGTERM, as kubelet does, to let it drain).
    pub fn start_ztunnel_beside(
        &mut self,
        i: usize,
        binary: &Path,
    ) -> Result<Option<u32>, ClusterError> {
        let log = self.nodes[i].ztunnel_log().with_extension("surge.log");
        let pid = self.spawn_ztunnel(i, binary, &log)?;
        let n = &self.nodes[i];
        wait_ready(
            pid,
            "ztunnel (surge)",
            &n.name,
            "not ready",
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("ztunnel ready")
            },
            &log,
        )?;
        Ok(self.nodes[i].ztunnel_pid.replace(pid))
    }

    /// SIGTERM to a ztunnel that is no longer node `i`'s (the old pod of a rollout), then
    /// waits up to `wait` for it to finish draining; whether it exited.
    pub fn terminate_ztunnel(&self, i: usize, pid: u32, wait: Duration) -> bool {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let exited = eventually(wait, || {
            if pid_alive(pid) {
                Err("draining")
            } else {
                Ok(())
            }
        })
        .is_ok();
        self.nodes[i].ns().stop(pid);
        exited
    }

    fn spawn_ztunnel(&self, i: usize, binary: &Path, log: &Path) -> Result<u32, ClusterError> {
        let n = &self.nodes[i];
        let (out, err) = Self::log_file(log)?;
        let mut cmd = n.ns().command(binary);
        cmd.args([
            "run",
            "--node-name",
            &n.name,
            "--trust-domain",
            &self.spec.trust_domain,
        ])
        .arg("--manifest-dir")
        .arg(self.manifests.path())
        .args(self.ztunnel_ca_args(n))
        .arg("--agent-socket")
        .arg(n.ztunnel_socket())
        .args(["--cluster-cidrs", &self.cluster_cidrs()])
        .args(
            self.spec
                .ztunnel_run_as
                .iter()
                .flat_map(|id| ["--run-as", id.as_str()]),
        )
        .args(&self.spec.ztunnel_args)
        .stdout(out)
        .stderr(err);
        Ok(n.ns().spawn(&mut cmd)?)
    }

    /// Starts the node agent on node `i` and waits for its CNI socket.
    pub fn start_agent(&mut self, i: usize) -> Result<u32, ClusterError> {
        let n = &self.nodes[i];
        let (out, err) = Self::log_file(&n.agent_log())?;
        let sock = n.run_dir().join("cni.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = n.ns().command(self.bin(bins::NODE_AGENT));
        cmd.args(["run", "--node-name", &n.name])
            .arg("--manifest-dir")
            .arg(self.manifests.path())
            .arg("--run-dir")
            .arg(n.run_dir())
            .arg("--ztunnel-socket")
            .arg(n.ztunnel_socket())
            .arg("--cni-cache-dir")
            .arg(n.node.cni_cache_dir())
            // As the DaemonSet passes the node's status.hostIP.
            .arg("--capture-address")
            .arg(n.underlay_ip.to_string())
            .args(crate::backend::current().agent_args())
            .args(&self.spec.agent_args)
            .stdout(out)
            .stderr(err);
        let pid = n.ns().spawn(&mut cmd)?;
        self.nodes[i].agent_pid = Some(pid);
        let n = &self.nodes[i];
        wait_ready(
            pid,
            "node-agent",
            &n.name,
            "no CNI socket yet",
            || sock.exists(),
            &n.agent_log(),
        )?;
        Ok(pid)
    }

    /// Kills node `i`'s ztunnel: SIGKILL (a crash) or SIGTERM (a graceful stop).
    pub fn kill_ztunnel(&mut self, i: usize, signal: Signal) {
        if let Some(pid) = self.nodes[i].ztunnel_pid.take() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
            self.nodes[i].ns().stop(pid);
        }
    }

    /// Kills node `i`'s agent.
    pub fn kill_agent(&mut self, i: usize, signal: Signal) {
        if let Some(pid) = self.nodes[i].agent_pid.take() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
            self.nodes[i].ns().stop(pid);
        }
    }

    /// Rewrites `namespaces.yaml` with `name` labelled ambient or not.
    pub fn set_namespace(&mut self, name: &str, ambient: bool) -> Result<(), ClusterError> {
        use ambient_common::constants::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL};
        let labels = if ambient {
            vec![(
                DATAPLANE_MODE_LABEL.to_owned(),
                DATAPLANE_MODE_AMBIENT.to_owned(),
            )]
        } else {
            Vec::new()
        };
        self.namespaces.insert(name.to_owned(), labels);
        let objs: Vec<Value> = self
            .namespaces
            .iter()
            .map(|(n, l)| {
                let l: Vec<(&str, &str)> =
                    l.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                manifests::namespace(n, &l)
            })
            .collect();
        self.manifests.write("namespaces", &objs)?;
        Ok(())
    }

    fn pod_manifest(
        &self,
        meta: &PodMeta,
        node: usize,
        sa: &str,
        labels: &[(String, String)],
        ip: Option<Ipv4Addr>,
    ) -> Value {
        let l: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut p = manifests::pod(meta, &self.nodes[node].name, sa, &l);
        match ip {
            Some(ip) => {
                p["status"] = json!({
                    "phase": "Running",
                    "podIP": ip.to_string(),
                    "podIPs": [{ "ip": ip.to_string() }],
                    "hostIP": self.nodes[node].underlay_ip.to_string(),
                });
            }
            None => p["status"] = json!({ "phase": "Pending" }),
        }
        p
    }

    /// Writes (or removes) on pod `idx` the report its node's agent makes in a cluster, through
    /// the API, once its redirection is installed (`ambient.istio.io/redirection: enabled`):
    /// the lab's manifest directory stands in for the API server here.
    pub fn report_captured(&self, idx: usize, captured: bool) -> Result<(), ClusterError> {
        let p = &self.pods[idx];
        let mut m = self.pod_manifest(&p.meta, p.node, &p.service_account, &p.labels, Some(p.ip));
        if captured {
            m["metadata"]["annotations"] = json!({
                ambient_common::constants::REDIRECTION_ANNOTATION: "enabled"
            });
        }
        self.manifests.write(&Self::pod_stem(&p.meta), &[m])?;
        Ok(())
    }

    /// Whether node `node`'s ztunnel has `ip` in the mesh (`None`: unknown to it).
    pub fn ambient_on(&self, node: usize, ip: Ipv4Addr) -> Result<Option<bool>, String> {
        let dump = self.nodes[node].config_dump()?;
        Ok(workload_with(&dump, ip).and_then(|w| w["ambient"].as_bool()))
    }

    fn pod_stem(meta: &PodMeta) -> String {
        format!("pod-{}-{}", meta.namespace, meta.name)
    }

    /// Creates a pod on node `node` (0-based) as kubelet would: the Pod object appears (no
    /// IP yet), the runtime runs the CNI chain, then the Pod's status gets its IP. Starts an
    /// echo server on [`ECHO_PORT`]. Returns the pod's index.
    pub fn add_pod(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<usize, ClusterError> {
        let meta = PodMeta::new(namespace, name);
        self.add_pod_with(node, meta, labels)
    }

    /// The first step of [`Cluster::add_pod`]: the Pod object appears, scheduled on node
    /// `node` with service account `sa-<name>`, no IP, no sandbox yet. Returns the service
    /// account and the labels as the manifest has them.
    pub fn schedule_pod(
        &self,
        node: usize,
        meta: &PodMeta,
        labels: &[(&str, &str)],
    ) -> Result<(String, Vec<(String, String)>), ClusterError> {
        let sa = format!("sa-{}", meta.name);
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.manifests.write(
            &Self::pod_stem(meta),
            &[self.pod_manifest(meta, node, &sa, &labels, None)],
        )?;
        Ok((sa, labels))
    }

    /// [`Cluster::add_pod`] with a given identity (same uid for a replaced sandbox).
    pub fn add_pod_with(
        &mut self,
        node: usize,
        meta: PodMeta,
        labels: &[(&str, &str)],
    ) -> Result<usize, ClusterError> {
        let (sa, labels) = self.schedule_pod(node, &meta, labels)?;
        let stem = Self::pod_stem(&meta);
        let pod = self.nodes[node]
            .node
            .add_pod(&meta)
            .map_err(|source| ClusterError::Add {
                namespace: meta.namespace.clone(),
                name: meta.name.clone(),
                log: tail(&self.nodes[node].agent_log(), 30),
                source: Box::new(source),
            })?;
        let ip: Ipv4Addr = pod
            .ips()
            .into_iter()
            .find_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| ClusterError::NoAddress(meta.name.clone()))?;
        self.manifests.write(
            &stem,
            &[self.pod_manifest(&meta, node, &sa, &labels, Some(ip))],
        )?;
        let mut cp = ClusterPod {
            pod,
            node,
            meta,
            service_account: sa,
            labels,
            ip,
            echo_pid: None,
            records: PathBuf::new(),
        };
        cp.echo_pid = Some(self.start_echo(&mut cp)?);
        self.pods.push(cp);
        Ok(self.pods.len() - 1)
    }

    fn start_echo(&self, pod: &mut ClusterPod) -> Result<u32, ClusterError> {
        let base = format!("echo-{}-{}", pod.meta.namespace, pod.meta.name);
        let ready = self.root.path().join(format!("{base}.ready"));
        pod.records = self.root.path().join(format!("{base}.jsonl"));
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&pod.records);
        let mut cmd = pod.ns().command(self.bin(bins::NETPROBE));
        cmd.args(["listen-origdst", "--port", &ECHO_PORT.to_string(), "--out"])
            .arg(&pod.records)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let pid = pod.ns().spawn(&mut cmd)?;
        eventually(READY_WAIT, || {
            if ready.exists() {
                Ok(())
            } else {
                Err("echo not listening")
            }
        })
        .map_err(|e| ClusterError::NotReady {
            what: "echo server",
            node: pod.meta.name.clone(),
            detail: e.to_string(),
            log: String::new(),
        })?;
        Ok(pid)
    }

    /// Deletes pod `idx` as a runtime would (DEL through the chain) and removes its manifest.
    pub fn remove_pod(&mut self, idx: usize) -> Result<ClusterPod, ClusterError> {
        let mut p = self.pods.remove(idx);
        let r = p.pod.detach();
        self.manifests.remove(&Self::pod_stem(&p.meta))?;
        if let Err(e) = r {
            eprintln!("DEL of {} failed: {e}", p.meta.name);
        }
        Ok(p)
    }

    pub fn pod(&self, name: &str) -> Result<&ClusterPod, ClusterError> {
        self.pods
            .iter()
            .find(|p| p.meta.name == name)
            .ok_or_else(|| ClusterError::UnknownPod(name.to_owned()))
    }

    pub fn pod_index(&self, name: &str) -> Option<usize> {
        self.pods.iter().position(|p| p.meta.name == name)
    }

    /// Is `ip` known to every node's ztunnel, with the given ambient-ness?
    pub fn known_everywhere(&self, ip: Ipv4Addr, ambient: bool) -> Result<(), String> {
        for n in &self.nodes {
            let dump = n.config_dump()?;
            match workload_with(&dump, ip) {
                Some(w) if w["ambient"].as_bool() == Some(ambient) => {}
                Some(w) => return Err(format!("{}: {ip} has ambient={}", n.name, w["ambient"])),
                None => return Err(format!("{}: {ip} unknown to ztunnel", n.name)),
            }
        }
        Ok(())
    }

    /// Waits until every ztunnel knows every pod with its current ambient-ness.
    pub fn wait_converged(&self, deadline: Duration) -> Result<(), String> {
        eventually(deadline, || {
            for p in &self.pods {
                let ambient = self.is_ambient(p);
                self.known_everywhere(p.ip, ambient)?;
            }
            Ok::<(), String>(())
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }

    /// The sum of `metric`'s samples in node `node`'s ztunnel metrics whose labels include
    /// all of `labels` (0 when there are none).
    pub fn metric_sum(&self, node: usize, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.nodes[node].metrics().unwrap_or_default();
        sum_samples(&text, metric, labels)
    }

    /// Waits until node `node`'s ztunnel has loaded the policy named `name`.
    pub fn wait_policy(&self, node: usize, name: &str, deadline: Duration) -> Result<(), String> {
        eventually(deadline, || {
            let dump = self.nodes[node].config_dump()?;
            if dump["policies"].to_string().contains(name) {
                Ok(())
            } else {
                Err(format!("policy {name} not loaded: {}", dump["policies"]))
            }
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }

    /// Whether the manifests make this pod ambient (namespace label, pod opt-out).
    pub fn is_ambient(&self, p: &ClusterPod) -> bool {
        use ambient_common::constants::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL};
        let pod_label = p
            .labels
            .iter()
            .find(|(k, _)| k == DATAPLANE_MODE_LABEL)
            .map(|(_, v)| v.as_str());
        match pod_label {
            Some(v) => v == DATAPLANE_MODE_AMBIENT,
            None => self.namespaces.get(&p.meta.namespace).is_some_and(|l| {
                l.iter()
                    .any(|(k, v)| k == DATAPLANE_MODE_LABEL && v == DATAPLANE_MODE_AMBIENT)
            }),
        }
    }

    /// Writes any other manifest (an AuthorizationPolicy...) as `<stem>.yaml`.
    pub fn write_manifest(&self, stem: &str, objects: &[Value]) -> Result<(), ClusterError> {
        self.manifests.write(stem, objects)?;
        Ok(())
    }

    /// Connects from pod `from` to `to`, sends `payload`, expects it echoed.
    pub fn connect(&self, from: usize, to: SocketAddr, payload: &str) -> Result<String, String> {
        echo_in(self.pods[from].ns(), to, payload)
    }

    /// Connects from node `node`'s own namespace (a kubelet probe).
    pub fn connect_from_node(
        &self,
        node: usize,
        to: SocketAddr,
        payload: &str,
    ) -> Result<String, String> {
        echo_in(self.nodes[node].ns(), to, payload)
    }

    /// A large echo transfer from pod `from` to `to`.
    pub fn transfer(
        &self,
        from: usize,
        to: SocketAddr,
        data: &[u8],
    ) -> Result<inns::TransferReport, String> {
        in_ns(&self.pods[from].ns().path(), || {
            inns::transfer(to, data, Duration::from_secs(30))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Starts tcpdump on the underlay bridge (TCP only).
    pub fn capture_underlay(&self, name: &str) -> Result<Capture, ClusterError> {
        let file = self.root.path().join(format!("{name}.pcap"));
        Ok(Capture::start(
            &self.underlay,
            UNDERLAY_BRIDGE,
            "tcp",
            &file,
        )?)
    }

    /// The IPs of pods that are ambient now.
    pub fn ambient_ips(&self) -> Vec<Ipv4Addr> {
        self.pods
            .iter()
            .filter(|p| self.is_ambient(p))
            .map(|p| p.ip)
            .collect()
    }

    /// `node-agent <view> --run-dir <node's> [--output json]` output.
    pub fn agent_view(&self, node: usize, view: &str, json: bool) -> Result<String, String> {
        let mut cmd = std::process::Command::new(self.bin(bins::NODE_AGENT));
        cmd.arg(view)
            .arg("--run-dir")
            .arg(self.nodes[node].run_dir());
        if json {
            cmd.args(["--output", "json"]);
        }
        run(&mut cmd)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .map_err(|e| e.to_string())
    }

    /// The agent's state for pod `name` (`captured`, `not_ambient`...), from `node-agent pods`.
    pub fn agent_state(&self, node: usize, name: &str) -> Option<String> {
        let out = self.agent_view(node, "pods", true).ok()?;
        let pods = crate::agent::parse_pods(&out).ok()?;
        pods.into_iter().find(|p| p.name == name).map(|p| p.state)
    }

    /// Every log of the cluster that mentions a panic: `(file, line)`.
    pub fn panics(&self) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            for f in [n.agent_log(), n.ztunnel_log(), n.cni_log()] {
                let body = std::fs::read_to_string(&f).unwrap_or_default();
                for l in body.lines() {
                    if l.contains("panicked") || l.contains("RUST_BACKTRACE") {
                        out.push((f.clone(), l.to_owned()));
                    }
                }
            }
        }
        out
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let (_, rest) = s.rsplit_once(')')?;
            rest.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// The workload of a ztunnel's `/config_dump` that has address `ip`.
fn workload_with(dump: &Value, ip: Ipv4Addr) -> Option<&Value> {
    let ip = ip.to_string();
    dump["workloads"].as_array()?.iter().find(|w| {
        w["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|a| a.as_str() == Some(ip.as_str())))
    })
}

/// From inside `ns`: connects to `to`, sends `payload`, expects it echoed.
fn echo_in(ns: &NetNs, to: SocketAddr, payload: &str) -> Result<String, String> {
    in_ns(&ns.path(), || {
        crate::probe::connect(
            to,
            payload.as_bytes(),
            Some(payload.as_bytes()),
            Duration::from_secs(3),
        )
    })
    .map_err(|e| e.to_string())?
    .map(|r| r.received)
    .map_err(|e| ambient_common::error::chain(&e))
}

/// The host part of the issuer's underlay address (`<underlay>.254`).
pub const ISSUER_HOST: u8 = 254;

/// Each node's issuer token, in the node's directory.
pub const CA_TOKEN_FILE: &str = "ca-token";

/// Waits until `ready()` while the process `pid` lives; on failure the error carries the
/// reason and the tail of its log.
fn wait_ready(
    pid: u32,
    what: &'static str,
    node: &str,
    pending: &'static str,
    ready: impl Fn() -> bool,
    log: &std::path::Path,
) -> Result<(), ClusterError> {
    eventually(READY_WAIT, || {
        if !pid_alive(pid) {
            return Ok(false);
        }
        if ready() {
            Ok(true)
        } else {
            Err(pending)
        }
    })
    .map_err(|e| e.to_string())
    .and_then(|alive| if alive { Ok(()) } else { Err("exited".into()) })
    .map_err(|detail| ClusterError::NotReady {
        what,
        node: node.to_owned(),
        detail,
        log: tail(log, 30),
    })
}

//! The real-runtime path: Debian's containerd, running inside a node network namespace with
//! all its state in a tempdir, creates pod sandboxes over its CRI socket (RunPodSandbox /
//! StopPodSandbox / RemovePodSandbox) from a locally built pause image, and runs the CNI chain
//! `bridge` + `host-local` + `ambient-cni` exactly as on a Kubernetes node.
//!
//! Variants:
//! - the chain's last plugin is the `cni-recorder` stand-in: proves the runtime path and what
//!   containerd hands a chained plugin, whatever the state of the other crates;
//! - the real `ambient-cni` with a fake agent that records requests;
//! - the real `ambient-cni` with the real `node-agent` reading a manifest directory (started
//!   in containerd's mount namespace, where the pods' netns mounts are);
//! - a sandbox left running when the lab is dropped: everything is still cleaned up.
//!
//! Needs root, containerd, runc, gcc with static libc, and `cargo build --workspace` first.

use std::path::Path;
use std::time::Duration;

use ambient_common::agent_api::AgentOp;
use ambient_tests::agent::{self, AgentOptions};
use ambient_tests::fake_agent::FakeAgent;
use ambient_tests::manifests::{self as manifest, ManifestDir};
use ambient_tests::netns::eventually;
use ambient_tests::recorder::read_calls;
use ambient_tests::topo::PodMeta;

#[path = "support/cri.rs"]
mod cri;
use cri::{in_cidr_24, run_sandbox, stop_and_remove, CriLab, Last, PodIdentity};

#[tokio::test(flavor = "current_thread")]
async fn containerd_runs_the_chain_with_a_recording_plugin() {
    let calls_dir = tempfile::tempdir().unwrap();
    let calls = calls_dir.path().join("calls.jsonl");
    let lab = CriLab::new("cri-rec", Last::Recorder(calls.clone()));
    let mut client = lab.client().await;
    let pod = PodIdentity::new("cri-ns", "cri-pod");
    let (id, ip, latency) = run_sandbox(&lab, &mut client, &pod).await;
    eprintln!("measure: RunPodSandbox with bridge+host-local+cni-recorder: {latency:?}");
    assert!(in_cidr_24(&ip, &lab.pod_cidr()), "pod IP {ip:?}");
    let add = read_calls(&calls)
        .into_iter()
        .find(|c| c.command == "ADD")
        .expect("the chained plugin ran for ADD");
    assert_eq!(add.env["CNI_CONTAINERID"], id);
    let args = &add.env["CNI_ARGS"];
    for want in [
        format!("K8S_POD_NAMESPACE={}", pod.namespace),
        format!("K8S_POD_NAME={}", pod.name),
        format!("K8S_POD_UID={}", pod.uid),
        format!("K8S_POD_INFRA_CONTAINER_ID={id}"),
    ] {
        assert!(args.contains(&want), "{args} lacks {want}");
    }
    let netns = &add.env["CNI_NETNS"];
    assert!(
        Path::new(netns).starts_with(&lab.containerd.config().netns_dir),
        "{netns}"
    );
    assert_eq!(
        add.stdin["prevResult"]["ips"][0]["address"],
        format!("{ip}/24")
    );
    assert_eq!(
        add.stdin["agentSocket"],
        lab.agent_socket().to_string_lossy().as_ref()
    );
    // The bridge is in the node namespace.
    lab.node.ns().ip(&["link", "show", "cni0"]).unwrap();

    let stop = stop_and_remove(&mut client, &id).await;
    eprintln!("measure: StopPodSandbox: {stop:?}");
    let cmds: Vec<String> = read_calls(&calls).into_iter().map(|c| c.command).collect();
    assert_eq!(cmds.first().map(String::as_str), Some("ADD"));
    assert!(cmds.iter().filter(|c| *c == "DEL").count() >= 1, "{cmds:?}");
    assert!(
        lab.containerd.tasks().is_empty(),
        "sandbox task left behind"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn dropping_the_lab_kills_a_running_sandbox_and_cleans_up() {
    let calls_dir = tempfile::tempdir().unwrap();
    let lab = CriLab::new(
        "cri-drop",
        Last::Recorder(calls_dir.path().join("calls.jsonl")),
    );
    let mut client = lab.client().await;
    let (id, _ip, _) = run_sandbox(&lab, &mut client, &PodIdentity::new("ns", "left")).await;
    let tasks = lab.containerd.tasks();
    let task = tasks.iter().find(|t| t.id == id).expect("sandbox task");
    let (init, shim) = (task.init_pid.unwrap(), task.shim_pid.expect("shim found"));
    let shim_socket = task.shim_address.clone().unwrap();
    let cgroup_parent = lab.containerd.config().cgroup_parent.clone();
    let containerd_pid = lab.containerd.pid().unwrap();
    drop(client);
    drop(lab);
    let gone = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    eventually(Duration::from_secs(5), || {
        for p in [init, shim, containerd_pid as i32] {
            if !gone(p) {
                return Err(format!("pid {p} still running"));
            }
        }
        Ok(())
    })
    .unwrap();
    assert!(!Path::new(shim_socket.trim_start_matches("unix://")).exists());
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let dir = h.path().join(cgroup_parent.trim_start_matches('/'));
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn containerd_enrols_through_ambient_cni_with_a_fake_agent() {
    let lab = CriLab::new("cri-fake", Last::AmbientCni);
    let agent = FakeAgent::start(&lab.agent_socket()).unwrap();
    let mut client = lab.client().await;
    let pod = PodIdentity::new("cri-ns", "fake-agent-pod");
    let (id, ip, latency) = run_sandbox(&lab, &mut client, &pod).await;
    eprintln!(
        "measure: RunPodSandbox with bridge+host-local+ambient-cni (fake agent): {latency:?}"
    );
    assert!(in_cidr_24(&ip, &lab.pod_cidr()), "pod IP {ip:?}");

    let adds: Vec<_> = agent
        .requests()
        .into_iter()
        .filter_map(|r| match r.op {
            AgentOp::Add(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(adds.len(), 1, "{adds:?}");
    let a = &adds[0];
    assert_eq!(a.pod.namespace, pod.namespace);
    assert_eq!(a.pod.name, pod.name);
    assert_eq!(a.pod.uid.as_deref(), Some(pod.uid.as_str()));
    assert_eq!(a.key.container_id, id);
    assert_eq!(a.key.ifname, "eth0");
    assert!(
        a.ips.iter().any(|p| p.addr.to_string() == ip),
        "{:?}",
        a.ips
    );
    assert!(a.host_interface.starts_with("veth"), "{}", a.host_interface);
    lab.node
        .ns()
        .ip(&["link", "show", &a.host_interface])
        .unwrap();

    stop_and_remove(&mut client, &id).await;
    let dels = agent
        .requests()
        .into_iter()
        .filter(|r| matches!(r.op, AgentOp::Del(_)))
        .count();
    assert!(dels >= 1, "no DEL reached the agent");
}

#[tokio::test(flavor = "current_thread")]
async fn containerd_pod_is_enrolled_by_the_real_node_agent() {
    let agent_bin = ambient_tests::bins::binary(ambient_tests::bins::NODE_AGENT);
    let lab = CriLab::new("cri-agent", Last::AmbientCni);
    let pod = PodIdentity::new("cri-mesh", "agent-pod");
    let manifests = ManifestDir::new(&lab.dir.path().join("manifests")).unwrap();
    let meta = PodMeta {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
    };
    manifests
        .write(
            "objects",
            &[
                manifest::ambient_namespace(&pod.namespace),
                manifest::pod(&meta, &lab.node_name, "default", &[]),
            ],
        )
        .unwrap();
    let opts = AgentOptions {
        binary: agent_bin.clone(),
        node_name: lab.node_name.clone(),
        manifest_dir: manifests.path().to_path_buf(),
        run_dir: lab.agent_socket().parent().unwrap().to_path_buf(),
        log_file: lab.dir.path().join("agent.log"),
        extra_args: vec!["--metrics-addr".into(), "127.0.0.1:0".into()],
    };
    // The agent opens the pods' netns paths, which exist in containerd's mount namespace only.
    agent::start_with(lab.node.ns(), &opts, &mut lab.containerd.enter(&agent_bin)).unwrap();

    let mut client = lab.client().await;
    let (id, ip, latency) = run_sandbox(&lab, &mut client, &pod).await;
    eprintln!(
        "measure: RunPodSandbox with bridge+host-local+ambient-cni (real agent): {latency:?}"
    );
    let pods = agent::pods(&agent_bin, &opts.run_dir).unwrap();
    let p = pods
        .iter()
        .find(|p| p.uid.as_deref() == Some(pod.uid.as_str()))
        .unwrap_or_else(|| panic!("pod not enrolled: {pods:?}\nagent log:\n{}", opts.log()));
    assert_eq!(p.state, "captured", "{p:?}");
    assert_eq!(
        (p.namespace.as_str(), p.name.as_str()),
        (pod.namespace.as_str(), pod.name.as_str())
    );
    assert_eq!(p.ips, std::slice::from_ref(&ip), "{p:?}");
    assert!(
        Path::new(&p.netns).starts_with(&lab.containerd.config().netns_dir),
        "{p:?}"
    );
    assert!(p.host_interface.starts_with("veth"), "{p:?}");
    lab.node
        .ns()
        .ip(&["link", "show", &p.host_interface])
        .unwrap();
    // The agent's table is in the node namespace, not the host's.
    let tables = lab.node.ns().exec("nft", &["list", "tables"]).unwrap();
    assert!(
        tables.contains(ambient_common::constants::NFT_TABLE),
        "{tables}"
    );

    stop_and_remove(&mut client, &id).await;
    eventually(Duration::from_secs(5), || {
        let pods = agent::pods(&agent_bin, &opts.run_dir).map_err(|e| e.to_string())?;
        match pods
            .iter()
            .find(|p| p.uid.as_deref() == Some(pod.uid.as_str()))
        {
            None => Ok(()),
            Some(p) if p.state == "released" => Ok(()),
            Some(p) => Err(format!("still enrolled: {p:?}")),
        }
    })
    .unwrap();
}

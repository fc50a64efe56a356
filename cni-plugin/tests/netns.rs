//! Root-only: the peer-index fallback of host-interface discovery against a real veth pair
//! whose container end sits in a network namespace this test creates. Skipped (with a note)
//! when not run as root.

mod support;

use std::path::PathBuf;
use std::process::Command;

use ambient_cni::discovery::{host_interface, Found, KernelLinks};
use ambient_cni::result::PrevResult;
use ambient_cni::sys::{self, SysError};
use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply};
use serde_json::json;
use support::*;

/// A network namespace and a veth pair named after the process and the test. Built before
/// any side effect; `Drop` removes whatever exists (also on panic).
struct VethInNetns {
    netns: String,
    host: String,
    peer_tmp: String,
}

impl VethInNetns {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let me = Self {
            netns: format!("acni-{pid}-{tag}"),
            host: format!("ach{pid}{tag}"),
            peer_tmp: format!("acc{pid}{tag}"),
        };
        assert!(me.host.len() <= sys::MAX_IFNAME_LEN && me.peer_tmp.len() <= sys::MAX_IFNAME_LEN);
        me
    }

    fn create(&self) {
        ip(&["netns", "add", &self.netns]);
        ip(&[
            "link",
            "add",
            &self.host,
            "type",
            "veth",
            "peer",
            "name",
            &self.peer_tmp,
            "netns",
            &self.netns,
        ]);
        ip(&[
            "-n",
            &self.netns,
            "link",
            "set",
            &self.peer_tmp,
            "name",
            "eth0",
        ]);
        ip(&["-n", &self.netns, "link", "set", "eth0", "up"]);
        ip(&["link", "set", &self.host, "up"]);
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }
}

impl Drop for VethInNetns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the container end, and with it the host end.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("skipped: needs root to create network namespaces");
    }
    root
}

#[test]
fn finds_the_host_veth_from_the_peer_index() {
    if !is_root() {
        return;
    }
    let veth = VethInNetns::new("pi");
    veth.create();
    let netns = veth.path();
    let netns = netns.to_str().unwrap();
    let links = KernelLinks {
        sysfs_root: "/sys".into(),
    };

    // prevResult lists only the container side.
    let prev = PrevResult::parse(&json!({
        "interfaces": [{"name": "eth0", "sandbox": netns}],
        "ips": [{"address": "10.201.0.2/24", "interface": 0}],
    }))
    .unwrap();
    let (name, how) = host_interface(&prev, netns, "eth0", &links).unwrap();
    assert_eq!((name.as_str(), how), (veth.host.as_str(), Found::PeerIndex));

    // Two unknown host-side candidates: the kernel decides.
    let prev = PrevResult::parse(&json!({
        "interfaces": [{"name": "made-up-1"}, {"name": "made-up-2"}, {"name": "eth0", "sandbox": netns}],
    }))
    .unwrap();
    let (name, _) = host_interface(&prev, netns, "eth0", &links).unwrap();
    assert_eq!(name, veth.host);

    // Loopback has no peer; a missing interface is named.
    assert!(matches!(
        sys::veth_peer_name(&veth.path(), "lo"),
        Err(SysError::NoPeer(_))
    ));
    assert!(matches!(
        sys::veth_peer_name(&veth.path(), "eth9"),
        Err(SysError::NoSuchLink(_))
    ));
    // The plugin's own thread never left its namespace.
    assert!(sys::get_link(&sys::LinkSelector::Name(veth.host.clone())).is_ok());
}

#[test]
fn the_binary_enrols_with_the_discovered_veth() {
    if !is_root() {
        return;
    }
    let veth = VethInNetns::new("bin");
    veth.create();
    let netns = veth.path().to_str().unwrap().to_owned();
    let sb = Sandbox::new();
    let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    // A bridge-shaped result whose bridge this (fake) sysfs does not know: two candidates,
    // so the plugin must ask the kernel.
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "br-unknown"}, {"name": "vethdecoy"}, {"name": "eth0", "sandbox": netns}],
        "ips": [{"address": "10.201.0.2/24", "interface": 2}],
    });
    let mut env = attach_env("ADD");
    env.insert("CNI_NETNS".into(), netns.clone());
    let out = run_json(&env, &sb.conf("1.0.0", json!({"prevResult": prev}))).printed();
    assert_eq!(out, prev);
    let AgentOp::Add(a) = &agent.requests()[0].op else {
        panic!()
    };
    assert_eq!(a.host_interface, veth.host);
    assert_eq!(a.netns, netns);
}

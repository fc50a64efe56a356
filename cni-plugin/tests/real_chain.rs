//! Root-only: the plugin after the real Debian `bridge` and `ptp` plugins (with `host-local`),
//! exactly as a runtime chains them. Everything runs in a "node" network namespace this test
//! creates (`ip netns exec` also remounts /sys for it, so bridge detection reads the real
//! sysfs), the pod in a second one; a guard deletes both. Skipped when not root or when the
//! plugins are not installed.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply, Attachment};
use serde_json::{json, Value};
use support::*;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A node namespace and a pod namespace named after the process and the test.
struct Namespaces {
    node: String,
    pod: String,
}

impl Namespaces {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        Self {
            node: format!("acni-{pid}-{tag}-node"),
            pod: format!("acni-{pid}-{tag}-pod"),
        }
    }

    fn create(&self) {
        for ns in [&self.node, &self.pod] {
            let out = Command::new(ip_bin())
                .args(["netns", "add", ns])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn pod_path(&self) -> String {
        format!("/var/run/netns/{}", self.pod)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // The bridge and host veths live in the node namespace and go with it.
        for ns in [&self.node, &self.pod] {
            let _ = Command::new(ip_bin()).args(["netns", "del", ns]).output();
        }
    }
}

fn ip_bin() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("iproute2's ip")
}

fn runnable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create network namespaces");
        return false;
    }
    let have = ["bridge", "ptp", "host-local"]
        .iter()
        .all(|p| Path::new(CNI_BIN_DIR).join(p).exists());
    if !have {
        eprintln!("skipped: the CNI reference plugins are not in {CNI_BIN_DIR}");
    }
    have
}

fn env(ns: &Namespaces, command: &str) -> HashMap<String, String> {
    let mut e = attach_env(command);
    e.insert("CNI_NETNS".into(), ns.pod_path());
    e.insert("CNI_PATH".into(), CNI_BIN_DIR.into());
    e
}

/// Runs the primary plugin (`ADD`) in the node namespace and returns its result.
fn primary_add(ns: &Namespaces, conf: &Value) -> Value {
    let plugin = format!("{CNI_BIN_DIR}/{}", conf["type"].as_str().unwrap());
    let ran = run_program(
        ip_bin(),
        &["netns", "exec", &ns.node, &plugin],
        &env(ns, "ADD"),
        &serde_json::to_vec(conf).unwrap(),
    );
    ran.printed()
}

/// Runs ambient-cni in the node namespace, chained after `prev`.
fn ambient(ns: &Namespaces, sb: &Sandbox, command: &str, prev: &Value) -> Ran {
    let mut conf = sb.conf("1.0.0", json!({"prevResult": prev}));
    conf.as_object_mut().unwrap().remove("sysfsRoot"); // the real /sys of the node namespace
    run_program(
        ip_bin(),
        &["netns", "exec", &ns.node, env!("CARGO_BIN_EXE_ambient-cni")],
        &env(ns, command),
        &serde_json::to_vec(&conf).unwrap(),
    )
}

fn the_add(agent: &FakeAgent) -> Attachment {
    let reqs = agent.requests();
    match reqs.last().map(|r| &r.op) {
        Some(AgentOp::Add(a)) => a.clone(),
        other => panic!("expected an ADD, got {other:?}"),
    }
}

/// A /24 unique to this process and test, inside 10.<second>.0.0/16.
fn subnet(second: u8) -> String {
    format!("10.{second}.{}.0/24", std::process::id() % 250)
}

#[test]
fn after_the_bridge_plugin() {
    if !runnable() {
        return;
    }
    let ns = Namespaces::new("br");
    ns.create();
    let sb = Sandbox::new();
    let bridge = format!("acb{}", std::process::id());
    let prev = primary_add(
        &ns,
        &json!({
            "cniVersion": "1.0.0", "name": "acni-test", "type": "bridge",
            "bridge": bridge, "isGateway": true,
            "ipam": {"type": "host-local", "subnet": subnet(203), "dataDir": sb.dir.path().join("ipam")},
        }),
    );
    let veth = prev["interfaces"][1]["name"].as_str().unwrap().to_owned();
    assert_eq!(prev["interfaces"][0]["name"], bridge.as_str());

    let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    assert_eq!(ambient(&ns, &sb, "ADD", &prev).printed(), prev);
    let a = the_add(&agent);
    assert_eq!(
        a.host_interface, veth,
        "the bridge is recognised from sysfs and skipped"
    );
    assert_eq!(a.netns, ns.pod_path());
    assert_eq!(
        Some(a.ips[0].to_string().as_str()),
        prev["ips"][0]["address"].as_str()
    );

    // The same result without the host-side entries: found through the peer index.
    let mut bare = prev.clone();
    bare["interfaces"] = json!([prev["interfaces"][2]]);
    bare["ips"][0]["interface"] = json!(0);
    ambient(&ns, &sb, "ADD", &bare).printed();
    assert_eq!(the_add(&agent).host_interface, veth);
}

#[test]
fn after_the_ptp_plugin() {
    if !runnable() {
        return;
    }
    let ns = Namespaces::new("ptp");
    ns.create();
    let sb = Sandbox::new();
    let prev = primary_add(
        &ns,
        &json!({
            "cniVersion": "1.0.0", "name": "acni-test", "type": "ptp",
            "ipam": {"type": "host-local", "subnet": subnet(204), "dataDir": sb.dir.path().join("ipam")},
        }),
    );
    let host: Vec<&str> = prev["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(host.len(), 1, "{prev}");
    let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    assert_eq!(ambient(&ns, &sb, "ADD", &prev).printed(), prev);
    assert_eq!(the_add(&agent).host_interface, host[0]);
}

//! Attacks on ztunnel itself (issue 11, ztunnel side), each run against the real `ztunnel run`
//! and `node-agent run` in the cluster lab of `ambient_tests::cluster`: a bad policy object
//! that used to freeze the view, a pod using ztunnel to reach node-local services, out-of-mesh
//! traffic leaving with the node's address, a forged push on the agent socket. Each test
//! builds its own cluster in 10.<octet>.0.0/16 (octets 160-169, tags `ap*`), so they run in
//! parallel. Run as root after `cargo build --workspace --bins`.

use std::time::Duration;

use ambient_tests::cluster::{metric_samples, Addressing, Cluster, ClusterSpec};
use ambient_tests::cni::Attach;
use ambient_tests::eventually;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn cluster(tag: &str, octet: u8, attach: Attach) -> Cluster {
    Cluster::new(ClusterSpec::new(tag, 2, attach, Addressing::test(octet)))
        .unwrap_or_else(|e| panic!("cluster {tag}: {e}"))
}

fn pod(c: &mut Cluster, node: usize, ns: &str, name: &str, labels: &[(&str, &str)]) -> usize {
    c.add_pod(node, ns, name, labels)
        .unwrap_or_else(|e| panic!("pod {ns}/{name}: {e}"))
}

/// The sum of `metric`'s samples of one node matching all `labels`.
fn count(c: &Cluster, node: usize, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let text = c.nodes[node].metrics().unwrap_or_default();
    metric_samples(&text, metric)
        .into_iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

fn policy(name: &str, namespace: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    })
}

fn wait_policy(c: &Cluster, node: usize, name: &str) {
    eventually(WAIT, || {
        let dump = c.nodes[node].config_dump()?;
        if dump["policies"].to_string().contains(name) {
            Ok(())
        } else {
            Err(format!("policy {name} not loaded: {}", dump["policies"]))
        }
    })
    .unwrap();
}

/// Attack 8: an AUDIT and a CUSTOM AuthorizationPolicy (both valid in Istio's CRD) used to
/// make ztunnel reject every later update of the directory: a pod added after them was
/// never known, a DENY written after them never enforced. Now each bad object is set aside
/// alone (counted, logged), the CUSTOM one denies its own selection, and everything after
/// them applies, also in a ztunnel restarted with them present.
#[test]
fn a_bad_policy_does_not_freeze_the_view_and_custom_fails_closed() {
    let mut c = cluster("apcfg", 160, Attach::Bridge);
    let client = pod(&mut c, 0, "ambient-demo", "client", &[]);
    let server = pod(&mut c, 1, "ambient-demo", "server", &[("app", "server")]);
    let admin = pod(&mut c, 1, "ambient-demo", "admin", &[("app", "admin")]);
    c.wait_converged(WAIT).unwrap();
    c.connect(client, c.pods[admin].echo_addr(), "before")
        .unwrap();

    c.write_manifest(
        "policy-audit",
        &[policy(
            "audit-all",
            "ambient-demo",
            json!({ "action": "AUDIT", "rules": [{}] }),
        )],
    )
    .unwrap();
    c.write_manifest(
        "policy-custom",
        &[policy(
            "ext-authz",
            "ambient-demo",
            json!({
                "action": "CUSTOM",
                "provider": { "name": "opa" },
                "selector": { "matchLabels": { "app": "admin" } },
                "rules": [{ "to": [{ "operation": { "paths": ["/admin"] } }] }],
            }),
        )],
    )
    .unwrap();
    // A pod and a DENY added after the bad objects.
    let late = pod(&mut c, 1, "ambient-demo", "late", &[("app", "late")]);
    let principal = c.pods[client]
        .spiffe(c.trust_domain())
        .trim_start_matches("spiffe://")
        .to_owned();
    c.write_manifest(
        "policy-deny",
        &[policy(
            "deny-client",
            "ambient-demo",
            json!({
                "action": "DENY",
                "selector": { "matchLabels": { "app": "server" } },
                "rules": [{ "from": [{ "source": { "principals": [principal] } }] }],
            }),
        )],
    )
    .unwrap();
    c.wait_converged(WAIT)
        .unwrap_or_else(|e| panic!("a pod added after the bad policies is unknown: {e}"));
    wait_policy(&c, 1, "deny-client");

    let check = |c: &Cluster, when: &str| {
        assert!(
            c.connect(client, c.pods[server].echo_addr(), "denied")
                .is_err(),
            "{when}: the DENY written after the bad policies is not enforced"
        );
        let r = c.connect(client, c.pods[admin].echo_addr(), "custom");
        assert!(
            r.is_err(),
            "{when}: the CUSTOM policy did not fail closed for its selection: {r:?}\npolicies: {}\n{}",
            c.nodes[1].config_dump().map(|d| format!("{} {}", d["policies"], d["workloads"])).unwrap_or_default(),
            ambient_tests::cluster::tail(&c.nodes[1].ztunnel_log(), 30)
        );
        c.connect(client, c.pods[late].echo_addr(), "allowed")
            .unwrap_or_else(|e| panic!("{when}: a workload no policy selects was refused: {e}"));
    };
    check(&c, "running");
    eventually(WAIT, || {
        let n = count(
            &c,
            1,
            "ztunnel_config_rejected_objects",
            &[("kind", "AuthorizationPolicy")],
        );
        if n == 2.0 {
            Ok(())
        } else {
            Err(format!("ztunnel_config_rejected_objects = {n}"))
        }
    })
    .unwrap();
    let log = std::fs::read_to_string(c.nodes[1].ztunnel_log()).unwrap_or_default();
    assert!(
        log.contains("ambient-demo/ext-authz") && log.contains("ambient-demo/audit-all"),
        "the log does not name the objects set aside"
    );

    // A ztunnel restarted with the objects present becomes ready and enforces the same.
    c.kill_ztunnel(1, nix::sys::signal::Signal::SIGKILL);
    c.start_ztunnel(1).unwrap();
    wait_policy(&c, 1, "deny-client");
    check(&c, "after a restart");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

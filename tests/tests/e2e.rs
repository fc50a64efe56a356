//! End-to-end proof (issue 4): the lab topology of `ambient_tests::cluster` (nodes as network
//! namespaces on an underlay bridge, pods through the real CNI chain, the real `node-agent`
//! and `ztunnel` on every node, one manifest directory), with traffic, captures of the
//! underlay, ztunnel's metrics and the agent's views. Each test builds its own cluster in its
//! own leased `10.<octet>.0.0/16` (`ambient_tests::addrs`), so tests run in parallel. Run as root after
//! `cargo build --workspace`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ambient_tests::capture::{payload_contains, Packet};
use ambient_tests::cluster::{
    ambient_plaintext, finish_quiet, metric_samples, Cluster, ClusterSpec, UnderlaySummary,
};
use ambient_tests::cluster::{test_cluster as cluster, test_pod as pod};
use ambient_tests::cni::Attach;
use ambient_tests::eventually;

const HBONE: u16 = ambient_common::constants::HBONE_PORT;
const WAIT: Duration = Duration::from_secs(15);

fn marker(tag: &str) -> String {
    format!("PLAINTEXT-MARKER-{tag}-{}", std::process::id())
}

/// `istio_tcp_connections_opened_total` samples of one node matching all `labels`.
fn opened(c: &Cluster, node: usize, labels: &[(&str, &str)]) -> f64 {
    count(c, node, "istio_tcp_connections_opened_total", labels)
}

/// The sum of `metric`'s samples of one node matching all `labels`.
fn count(c: &Cluster, node: usize, metric: &str, labels: &[(&str, &str)]) -> f64 {
    c.metric_sum(node, metric, labels)
}

fn wait_opened(c: &Cluster, node: usize, labels: &[(&str, &str)]) {
    eventually(WAIT, || {
        if opened(c, node, labels) >= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "no connection with {labels:?} in node-{}'s metrics:\n{}",
                node + 1,
                c.nodes[node]
                    .metrics()
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.starts_with("istio_tcp_connections_opened"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ))
        }
    })
    .unwrap();
}

/// Everything the capture wrote once it went quiet.
fn quiet(c: &Cluster, cap: ambient_tests::capture::Capture) -> Vec<Packet> {
    finish_quiet(cap, &c.underlay, Duration::from_millis(700), WAIT).unwrap()
}

/// Waits until the capture holds a packet matching `f`, then everything once quiet.
fn capture_until(
    c: &Cluster,
    cap: ambient_tests::capture::Capture,
    what: &str,
    f: impl Fn(&Packet) -> bool,
) -> Vec<Packet> {
    eventually(WAIT, || match cap.packets() {
        Ok(p) if p.iter().any(&f) => Ok(()),
        Ok(p) => Err(format!("{what}: not in {} packets", p.len())),
        Err(e) => Err(e.to_string()),
    })
    .unwrap();
    quiet(c, cap)
}

fn assert_no_ambient_plaintext(c: &Cluster, packets: &[Packet], markers: &[&str]) {
    let leaks = ambient_plaintext(packets, &c.ambient_ips(), HBONE);
    assert!(
        leaks.is_empty(),
        "plaintext of ambient pods on the underlay: {:?}\nflows: {:?}",
        leaks.iter().take(5).collect::<Vec<_>>(),
        UnderlaySummary::from_packets(packets).flows
    );
    for m in markers {
        assert!(
            !payload_contains(packets, m.as_bytes()),
            "marker {m} crossed the underlay in plaintext"
        );
    }
}

fn ambient_cross_node(tag: &str, attach: Attach) {
    let mut c = cluster(tag, attach);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("cross").unwrap();
    let m = marker(tag);
    let to = c.pods[server].echo_addr();
    assert_eq!(c.connect(client, to, &m).unwrap(), m);
    // A large transfer: 8 MiB with the marker at the start, checked end to end.
    let mut data = ambient_tests::inns::pattern(7, 8 * 1024 * 1024);
    data[..m.len()].copy_from_slice(m.as_bytes());
    let r = c.transfer(client, to, &data).unwrap();
    assert!(r.intact(), "transfer corrupted: {r:?}");
    let packets = quiet(&c, cap);
    let summary = UnderlaySummary::from_packets(&packets);
    eprintln!("underlay flows: {:?}", summary.flows);
    // Pods' traffic crosses as HBONE only; a ztunnel's certificate request to the issuer
    // (mutual TLS, the control plane, timed by certificate refresh) may cross too.
    let issuer = std::net::IpAddr::V4(c.issuer_ip());
    assert!(
        summary
            .flows
            .keys()
            .all(|(_, dst, port)| *port == HBONE || *dst == issuer),
        "only HBONE crosses the underlay: {:?}",
        summary.flows
    );
    assert_no_ambient_plaintext(&c, &packets, &[&m]);
    let src = c.pods[client].spiffe(c.trust_domain());
    let dst = c.pods[server].spiffe(c.trust_domain());
    // Both sides report both identities.
    for (node, reporter) in [(0, "source"), (1, "destination")] {
        wait_opened(
            &c,
            node,
            &[
                ("reporter", reporter),
                ("source_principal", &src),
                ("destination_principal", &dst),
                ("connection_security_policy", "mutual_tls"),
            ],
        );
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// With `--remote-capture annotation` (the installed default) another node's pod gets HBONE
/// only once its node reports it captured: before that nothing on its node would be known to
/// accept HBONE for it, so it is outside the mesh (plaintext, as Istio's ztunnel does for a
/// workload its control plane has not marked HBONE).
#[test]
fn hbone_only_to_pods_their_node_reports_captured() {
    let mut spec = ClusterSpec::leased("e2erc", 2, Attach::Bridge);
    spec.ztunnel_args
        .extend(["--remote-capture".into(), "annotation".into()]);
    let mut c = Cluster::new(spec).unwrap();
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    let ip = c.pods[server].ip;
    let to = c.pods[server].echo_addr();
    let ambient_on = |c: &Cluster, node: usize, want: bool| {
        eventually(WAIT, || match c.ambient_on(node, ip)? {
            Some(a) if a == want => Ok(()),
            other => Err(format!("node-{}: {ip} ambient {other:?}", node + 1)),
        })
        .unwrap();
    };
    // Labelled ambient, not reported: in the mesh for its own node only.
    ambient_on(&c, 1, true);
    ambient_on(&c, 0, false);
    let m = marker("e2erc");
    assert_eq!(c.connect(client, to, &m).unwrap(), m);
    wait_opened(
        &c,
        0,
        &[
            ("reporter", "source"),
            ("connection_security_policy", "unknown"),
        ],
    );
    let tls = [
        ("reporter", "source"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(opened(&c, 0, &tls), 0.0, "no HBONE to an unreported pod");

    // Its node reports it captured: HBONE from now on.
    c.report_captured(server, true).unwrap();
    ambient_on(&c, 0, true);
    assert_eq!(c.connect(client, to, &m).unwrap(), m);
    wait_opened(&c, 0, &tls);
    let dst = c.pods[server].spiffe(c.trust_domain());
    wait_opened(
        &c,
        1,
        &[("reporter", "destination"), ("destination_principal", &dst)],
    );

    // The report withdrawn (its node released it): out of the mesh again.
    c.report_captured(server, false).unwrap();
    ambient_on(&c, 0, false);
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

#[test]
fn ambient_to_ambient_across_nodes_bridge() {
    ambient_cross_node("e2ecb", Attach::Bridge);
}

#[test]
fn ambient_to_ambient_across_nodes_ptp() {
    ambient_cross_node("e2ecp", Attach::Ptp);
}

/// Calico's shape: host veths without an address, captured by DNAT to the node's address.
#[test]
fn ambient_to_ambient_across_nodes_calico() {
    ambient_cross_node("e2ecc", Attach::Routed);
}

/// The peers the pod's echo server saw.
fn peers(c: &Cluster, pod: usize) -> Vec<IpAddr> {
    c.pods[pod].accepted().iter().map(|r| r.peer.ip()).collect()
}

fn captured(c: &Cluster, pod: usize) {
    let node = c.pods[pod].node;
    let name = c.pods[pod].name().to_owned();
    eventually(WAIT, || match c.agent_state(node, &name).as_deref() {
        Some("captured") => Ok(()),
        other => Err(format!("{name}: {other:?}")),
    })
    .unwrap();
}

/// Same node: the connection goes through ztunnel (both reporters on the node), the server
/// sees the client pod's own address, and identity is what policy is evaluated on.
#[test]
fn ambient_to_ambient_same_node() {
    same_node("e2esn", Attach::Bridge);
}

#[test]
fn ambient_to_ambient_same_node_ptp() {
    same_node("e2esp", Attach::Ptp);
}

#[test]
fn ambient_to_ambient_same_node_calico() {
    same_node("e2esc", Attach::Routed);
}

fn same_node(tag: &str, attach: Attach) {
    let mut c = cluster(tag, attach);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 0, "ambient-demo", "server");
    c.set_namespace("other", true).unwrap();
    let intruder = pod(&mut c, 0, "other", "intruder");
    c.wait_converged(WAIT).unwrap();
    let to = c.pods[server].echo_addr();
    c.connect(client, to, "same-node").unwrap();
    let src = c.pods[client].spiffe(c.trust_domain());
    let dst = c.pods[server].spiffe(c.trust_domain());
    for reporter in ["source", "destination"] {
        wait_opened(
            &c,
            0,
            &[
                ("reporter", reporter),
                ("source_principal", &src),
                ("destination_principal", &dst),
            ],
        );
    }
    assert_eq!(
        peers(&c, server),
        vec![IpAddr::V4(c.pods[client].ip)],
        "client IP kept"
    );
    // The direct same-node path is not TLS and must not be reported as such (F3).
    assert_eq!(
        opened(
            &c,
            0,
            &[
                ("source_principal", &src),
                ("connection_security_policy", "mutual_tls")
            ]
        ),
        0.0,
        "same-node connection labelled mutual_tls"
    );
    // Identity enforced: a DENY on the source identity refuses the same-node connection.
    let policy = serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": "deny-other", "namespace": "ambient-demo" },
        "spec": {
            "action": "DENY",
            "rules": [{ "from": [{ "source": { "principals": [c.pods[intruder].spiffe(c.trust_domain()).trim_start_matches("spiffe://")] } }] }],
        },
    });
    c.write_manifest("policy-deny-other", &[policy]).unwrap();
    wait_policy(&c, 0, "deny-other");
    assert!(
        c.connect(intruder, to, "intruder").is_err(),
        "denied identity got through"
    );
    c.connect(client, to, "still-allowed").unwrap();
    assert!(!peers(&c, server).contains(&IpAddr::V4(c.pods[intruder].ip)));
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

fn wait_policy(c: &Cluster, node: usize, name: &str) {
    c.wait_policy(node, name, WAIT).unwrap();
}

/// Ambient -> legacy, legacy -> ambient (inbound plaintext on 15006), legacy -> legacy
/// (untouched), all across nodes.
#[test]
fn mixed_ambient_and_legacy_pods() {
    mixed("e2emx", Attach::Bridge);
}

#[test]
fn mixed_ambient_and_legacy_pods_ptp() {
    mixed("e2emp", Attach::Ptp);
}

#[test]
fn mixed_ambient_and_legacy_pods_calico() {
    mixed("e2emc", Attach::Routed);
}

fn mixed(tag: &str, attach: Attach) {
    let mut c = cluster(tag, attach);
    let amb1 = pod(&mut c, 0, "ambient-demo", "amb1");
    let amb2 = pod(&mut c, 1, "ambient-demo", "amb2");
    let leg1 = pod(&mut c, 0, "legacy", "leg1");
    let leg2 = pod(&mut c, 1, "legacy", "leg2");
    c.wait_converged(WAIT).unwrap();
    // Ambient -> legacy: leaves through ztunnel, from the node's address (the legacy pod is
    // outside the mesh).
    c.connect(amb1, c.pods[leg2].echo_addr(), "to-legacy")
        .unwrap();
    let amb1_id = c.pods[amb1].spiffe(c.trust_domain());
    wait_opened(
        &c,
        0,
        &[
            ("reporter", "source"),
            ("source_principal", &amb1_id),
            ("destination_workload", "leg2"),
        ],
    );
    // Legacy -> ambient: plaintext in, captured on the destination node to 15006.
    c.connect(leg1, c.pods[amb2].echo_addr(), "from-legacy")
        .unwrap();
    let amb2_id = c.pods[amb2].spiffe(c.trust_domain());
    wait_opened(
        &c,
        1,
        &[
            ("reporter", "destination"),
            ("destination_principal", &amb2_id),
            ("source_principal", "unknown"),
        ],
    );
    assert_eq!(
        peers(&c, amb2),
        vec![IpAddr::V4(c.pods[leg1].ip)],
        "legacy client IP kept"
    );
    // Legacy -> legacy: untouched (no ztunnel saw it; the server sees the client directly).
    let cap = c.capture_underlay("legacy").unwrap();
    let m = marker("legacy");
    c.connect(leg1, c.pods[leg2].echo_addr(), &m).unwrap();
    let packets = capture_until(&c, cap, "legacy plaintext", |p| {
        payload_contains(std::slice::from_ref(p), m.as_bytes())
    });
    assert!(packets
        .iter()
        .any(|p| p.src == IpAddr::V4(c.pods[leg1].ip) && p.dport == 8080));
    assert!(peers(&c, leg2).contains(&IpAddr::V4(c.pods[leg1].ip)));
    for node in 0..2 {
        assert_eq!(
            opened(
                &c,
                node,
                &[
                    ("source_workload", "leg1"),
                    ("destination_workload", "leg2")
                ]
            ),
            0.0
        );
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// A ClusterIP service whose endpoints are ambient pods on the other node: ambient clients
/// reach it over HBONE (ztunnel resolves the VIP), legacy clients through kube-proxy's DNAT.
#[test]
fn cluster_ip_service_with_remote_ambient_endpoints() {
    let mut c = cluster("e2esv", Attach::Ptp);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let legacy = pod(&mut c, 0, "legacy", "lclient");
    let ep1 = pod(&mut c, 1, "ambient-demo", "web-1");
    let ep2 = pod(&mut c, 1, "ambient-demo", "web-2");
    let svc = c
        .add_service("ambient-demo", "web", 10, 80, &[ep1, ep2])
        .unwrap();
    c.wait_converged(WAIT).unwrap();
    c.wait_services(WAIT).unwrap();
    let vip = SocketAddr::from((svc.vip, svc.port));
    let cap = c.capture_underlay("svc").unwrap();
    let m = marker("svc");
    for i in 0..6 {
        assert_eq!(
            c.connect(client, vip, &format!("{m}-{i}")).unwrap(),
            format!("{m}-{i}")
        );
    }
    let ep_ips = [c.pods[ep1].ip, c.pods[ep2].ip];
    let packets = quiet(&c, cap);
    assert!(
        packets.iter().all(|p| p.dport == HBONE || p.sport == HBONE),
        "{:?}",
        UnderlaySummary::from_packets(&packets).flows
    );
    assert!(
        packets.iter().all(|p| p.dst != IpAddr::V4(svc.vip)),
        "the VIP never crosses"
    );
    assert_no_ambient_plaintext(&c, &packets, &[&m]);
    let src = c.pods[client].spiffe(c.trust_domain());
    wait_opened(
        &c,
        1,
        &[("reporter", "destination"), ("source_principal", &src)],
    );
    let served = c.pods[ep1].accepted().len() + c.pods[ep2].accepted().len();
    assert_eq!(served, 6, "every connection reached an endpoint");
    let sample = metric_samples(
        &c.nodes[0].metrics().unwrap(),
        "istio_tcp_connections_opened_total",
    );
    assert!(
        sample.iter().any(|(l, _)| l
            .get("destination_service")
            .is_some_and(|s| s.contains("web"))),
        "the source reports the service: {sample:?}"
    );
    // A legacy client goes through kube-proxy's DNAT and arrives in plaintext on 15006.
    c.connect(legacy, vip, "legacy-to-vip").unwrap();
    let all: Vec<IpAddr> = [ep1, ep2].iter().flat_map(|&e| peers(&c, e)).collect();
    assert!(
        all.contains(&IpAddr::V4(c.pods[legacy].ip)),
        "{all:?} / {ep_ips:?}"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// Labelling a running pod's namespace enrols it without a restart (new connections are
/// captured and encrypted); removing the label releases it.
#[test]
fn enrol_and_release_a_running_pod_by_namespace_label() {
    let mut c = cluster("e2een", Attach::Bridge);
    c.set_namespace("late", false).unwrap();
    let late = pod(&mut c, 0, "late", "late");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let to = c.pods[server].echo_addr();
    assert_eq!(c.agent_state(0, "late").as_deref(), Some("not_ambient"));

    // Before: plaintext (the server side captures it on 15006).
    let cap = c.capture_underlay("before").unwrap();
    let m1 = marker("before");
    c.connect(late, to, &m1).unwrap();
    capture_until(&c, cap, "plaintext before enrolment", |p| {
        payload_contains(std::slice::from_ref(p), m1.as_bytes())
    });

    // Enrol by label: same pod, same sandbox.
    c.set_namespace("late", true).unwrap();
    captured(&c, late);
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("during").unwrap();
    let m2 = marker("during");
    eventually(WAIT, || c.connect(late, to, &m2)).unwrap();
    let packets = quiet(&c, cap);
    assert_no_ambient_plaintext(&c, &packets, &[&m2]);
    let id = c.pods[late].spiffe(c.trust_domain());
    wait_opened(
        &c,
        1,
        &[("reporter", "destination"), ("source_principal", &id)],
    );

    // Release.
    c.set_namespace("late", false).unwrap();
    eventually(WAIT, || match c.agent_state(0, "late").as_deref() {
        Some("not_ambient") => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("after").unwrap();
    let m3 = marker("after");
    eventually(WAIT, || c.connect(late, to, &m3)).unwrap();
    capture_until(&c, cap, "plaintext after release", |p| {
        payload_contains(std::slice::from_ref(p), m3.as_bytes())
    });
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// The node's own connection to a local ambient pod (kubelet's probe) is not captured.
#[test]
fn kubelet_probe_from_the_node_reaches_an_ambient_pod() {
    for (tag, attach) in [("e2ekb", Attach::Bridge), ("e2ekp", Attach::Ptp)] {
        let mut c = cluster(tag, attach);
        let server = pod(&mut c, 0, "ambient-demo", "server");
        captured(&c, server);
        let to = c.pods[server].echo_addr();
        assert_eq!(c.connect_from_node(0, to, "probe").unwrap(), "probe");
        let seen = peers(&c, server);
        assert_eq!(seen.len(), 1);
        assert!(
            !c.pods.iter().any(|p| IpAddr::V4(p.ip) == seen[0]),
            "the probe comes from the node's address: {seen:?}"
        );
        assert_eq!(
            opened(&c, 0, &[("destination_workload", "server")]),
            0.0,
            "not through ztunnel"
        );
    }
}

fn policy(
    name: &str,
    namespace: &str,
    action: &str,
    from_namespaces: &[&str],
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "action": action,
            "rules": [{ "from": [{ "source": { "namespaces": from_namespaces } }] }],
        },
    })
}

/// AuthorizationPolicy between two namespaces: DENY refuses the connection (counted as DENY
/// by the destination), the ALLOW case works, and nothing reaches the denied server.
#[test]
fn authorization_policy_deny_and_allow_between_namespaces() {
    let mut c = cluster("e2eaz", Attach::Bridge);
    c.set_namespace("shop", true).unwrap();
    let demo = pod(&mut c, 0, "ambient-demo", "demo");
    let buyer = pod(&mut c, 0, "shop", "buyer");
    let server = pod(&mut c, 1, "shop", "server");
    c.wait_converged(WAIT).unwrap();
    let to = c.pods[server].echo_addr();
    c.connect(demo, to, "before-policy").unwrap();

    c.write_manifest(
        "policy-deny",
        &[policy("deny-demo", "shop", "DENY", &["ambient-demo"])],
    )
    .unwrap();
    wait_policy(&c, 1, "deny-demo");
    let before = c.pods[server].accepted().len();
    assert!(
        c.connect(demo, to, "denied").is_err(),
        "DENY did not refuse"
    );
    c.connect(buyer, to, "same-namespace").unwrap();
    assert_eq!(
        c.pods[server].accepted().len(),
        before + 1,
        "only the allowed one arrived"
    );
    // The response flag is known when the connection closes.
    let demo_id = c.pods[demo].spiffe(c.trust_domain());
    let denied = [
        ("reporter", "destination"),
        ("source_principal", demo_id.as_str()),
        ("response_flags", "DENY"),
    ];
    eventually(WAIT, || {
        if count(&c, 1, "istio_tcp_connections_closed_total", &denied) >= 1.0 {
            Ok(())
        } else {
            Err("no DENY counted")
        }
    })
    .unwrap();

    // ALLOW only from shop: demo is still refused, buyer allowed.
    c.manifests.remove("policy-deny").unwrap();
    c.write_manifest(
        "policy-allow",
        &[policy("allow-shop", "shop", "ALLOW", &["shop"])],
    )
    .unwrap();
    wait_policy(&c, 1, "allow-shop");
    eventually(WAIT, || {
        if c.nodes[1].config_dump()?["policies"]
            .to_string()
            .contains("deny-demo")
        {
            Err("old policy still loaded".to_owned())
        } else {
            Ok(())
        }
    })
    .unwrap();
    c.connect(buyer, to, "allowed").unwrap();
    assert!(
        c.connect(demo, to, "not-allowed").is_err(),
        "ALLOW let a foreign namespace in"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

/// When ADD returns for an ambient pod, its redirection is in place (the kubelet starts the
/// containers right after: their first packet must already be captured).
#[test]
fn ambient_pod_is_captured_when_add_returns() {
    let mut c = cluster("e2ead", Attach::Bridge);
    let mut missing = Vec::new();
    for i in 0..16 {
        let p = pod(&mut c, 0, "ambient-demo", &format!("p{i}"));
        let ip = c.pods[p].ip.to_string();
        let set = ambient_tests::backend::current().captured(c.nodes[0].ns(), false);
        if !set.contains(&ip) {
            missing.push(format!("p{i} ({ip})"));
        }
    }
    // The agent's own account of each ADD: an ambient pod must never be reported NotAmbient.
    let log = std::fs::read_to_string(c.nodes[0].agent_log()).unwrap_or_default();
    let replied = log.lines().filter(|l| l.contains("ADD replied")).count();
    assert!(
        replied >= 16,
        "the agent logged {replied} ADD replies for 16 pods"
    );
    missing.extend(
        log.lines()
            .filter(|l| l.contains("ADD replied") && l.contains("NotAmbient"))
            .map(strip_ansi),
    );
    assert!(
        missing.is_empty(),
        "ADD returned before the pod was captured: {missing:?}"
    );
}

/// A pod created on another node is reached by an ambient client right away (before every
/// ztunnel has read the new Pod): the client's payload must never cross in plaintext.
#[test]
fn a_brand_new_remote_pod_is_never_reached_in_plaintext() {
    let mut c = cluster("e2enw", Attach::Bridge);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("new").unwrap();
    let m = marker("new");
    let mut ambient = c.ambient_ips();
    for i in 0..4 {
        let s = pod(&mut c, 1, "ambient-demo", &format!("new{i}"));
        ambient.push(c.pods[s].ip);
        // Right away, as a client would retry a freshly resolved address.
        let _ = eventually(Duration::from_secs(3), || {
            c.connect(client, c.pods[s].echo_addr(), &m)
        });
    }
    let packets = quiet(&c, cap);
    let leaks = ambient_plaintext(&packets, &ambient, HBONE);
    assert!(
        leaks.is_empty() && !payload_contains(&packets, m.as_bytes()),
        "an ambient pod's payload crossed in plaintext: {} packets, e.g. {:?}; flows {:?}",
        leaks.len(),
        leaks.first().map(|p| (
            p.src,
            p.sport,
            p.dst,
            p.dport,
            String::from_utf8_lossy(&p.payload).into_owned()
        )),
        UnderlaySummary::from_packets(&packets).flows
    );
}

/// A ClusterIP Service used right after it was created (before every ztunnel read it): the
/// client's payload must never cross in plaintext.
#[test]
fn a_brand_new_service_is_never_reached_in_plaintext() {
    let mut c = cluster("e2ens", Attach::Bridge);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let ep = pod(&mut c, 1, "ambient-demo", "web");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("newsvc").unwrap();
    let m = marker("newsvc");
    let svc = c.add_service("ambient-demo", "web", 10, 80, &[ep]).unwrap();
    let r = c.connect(client, SocketAddr::from((svc.vip, svc.port)), &m);
    let packets = quiet(&c, cap);
    assert!(
        !payload_contains(&packets, m.as_bytes()),
        "the payload crossed in plaintext (connect: {r:?}); flows {:?}",
        UnderlaySummary::from_packets(&packets).flows
    );
}

/// A log line without its terminal colour codes.
fn strip_ansi(l: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in l.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// ztunnel listens on both families by default where the node has IPv6: IPv4 and IPv6
/// capture listeners, and readiness and metrics answering on either (kubelet probes a
/// host-network pod on the node's address, which is IPv6 in an IPv6 cluster).
#[test]
fn ztunnel_listens_on_both_families_by_default() {
    let c = cluster("e2eds", Attach::Bridge);
    let node = &c.nodes[0];
    let dump = node.config_dump().unwrap();
    for kind in ["outbound", "inbound", "inbound_plaintext"] {
        let addrs: Vec<SocketAddr> = dump["addresses"][kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            addrs.iter().any(SocketAddr::is_ipv4) && addrs.iter().any(SocketAddr::is_ipv6),
            "{kind}: {addrs:?}"
        );
    }
    for ip in ["127.0.0.1", "::1"] {
        for (port, path) in [(15021u16, "/healthz/ready"), (15020, "/metrics")] {
            let addr = SocketAddr::new(ip.parse().unwrap(), port);
            let got = ambient_tests::inns::in_ns(&node.ns().path(), || {
                ambient_tests::inns::http_get(addr, path, Duration::from_secs(3))
            })
            .unwrap()
            .unwrap_or_else(|e| panic!("{addr}{path}: {e}"));
            assert_eq!(got.0, 200, "{addr}{path}: {}", got.1);
        }
    }
}

/// The previous release's ztunnel, built by `scripts/previous-ztunnel.sh` (which
/// `scripts/test.sh` runs) into `<target>/previous-release/`.
/// `None` (with the reason printed) only where the script found the release's commit missing
/// from the clone.
fn previous_ztunnel() -> Option<std::path::PathBuf> {
    let dir = ambient_tests::bins::BinDir::current()
        .unwrap()
        .path()
        .parent()
        .unwrap()
        .join("previous-release");
    if let Ok(why) = std::fs::read_to_string(dir.join("UNAVAILABLE")) {
        eprintln!("SKIPPED: {}", why.trim());
        return None;
    }
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("ztunnel-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    let (_, path) = found.pop().unwrap_or_else(|| {
        panic!(
            "no previous ztunnel in {}: run scripts/previous-ztunnel.sh (scripts/test.sh does)",
            dir.display()
        )
    });
    Some(path)
}

/// A ztunnel rollout on a node, as the DaemonSet update runs it (maxSurge 1): the previous
/// release's ztunnel serves the node, the current one starts beside it (the surge pod; they
/// share the listeners), then the old one gets SIGTERM and drains. A pod of that node opens a
/// new connection to a pod of the other node every few milliseconds the whole time: not one
/// fails. Afterwards a pod created on the node is served by the new ztunnel.
#[test]
fn a_ztunnel_rollout_from_the_previous_release_fails_no_connection() {
    use ambient_tests::cluster::{CaMode, ClusterSpec};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let Some(previous) = previous_ztunnel() else {
        return;
    };
    let mut spec = ClusterSpec::leased("e2eru", 2, Attach::Bridge);
    // The previous release signs with the node's CA files (it has no issuer client).
    spec.ca = CaMode::NodeKey;
    spec.ztunnel_binaries.insert(0, previous.clone());
    let mut c = Cluster::new(spec).unwrap();
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let to = c.pods[server].echo_addr();
    c.connect(client, to, "before").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ns = c.pods[client].ns().path();
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let msg = format!("rollout-{ok}");
                let r = ambient_tests::inns::in_ns(&ns, || {
                    ambient_tests::probe::connect(
                        to,
                        msg.as_bytes(),
                        Some(msg.as_bytes()),
                        Duration::from_secs(3),
                    )
                });
                match r {
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => failed.push(e.to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, failed)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let current = ambient_tests::bins::binary(ambient_tests::bins::ZTUNNEL);
    let old = c
        .start_ztunnel_beside(0, &current)
        .unwrap()
        .expect("the previous release was running");
    assert_eq!(
        std::fs::read_link(format!("/proc/{old}/exe")).unwrap(),
        previous,
        "the old pod ran the previous release"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        c.terminate_ztunnel(0, old, Duration::from_secs(35)),
        "the old ztunnel did not finish draining"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = traffic.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed during the rollout: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 20, "too few connections exercised the rollout: {ok}");

    // The new ztunnel has the agent's pushes: a pod created now is served.
    let late = pod(&mut c, 0, "ambient-demo", "late");
    eventually(WAIT, || c.connect(late, to, "after-rollout")).unwrap();
    assert!(c.panics().is_empty(), "{:?}", c.panics());
}

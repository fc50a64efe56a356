//! End-to-end proof (issue 4): the lab topology of `ambient_tests::cluster` (nodes as network
//! namespaces on an underlay bridge, pods through the real CNI chain, the real `node-agent`
//! and `ztunnel` on every node, one manifest directory), with traffic, captures of the
//! underlay, ztunnel's metrics and the agent's views. Each test builds its own cluster in its
//! own 10.<octet>.0.0/16 (octets 121-139), so tests run in parallel. Run as root after
//! `cargo build --workspace`.

use std::net::SocketAddr;
use std::time::Duration;

use ambient_tests::capture::{payload_contains, Packet};
use ambient_tests::cluster::{
    ambient_plaintext, metric_samples, Addressing, Cluster, ClusterSpec, UnderlaySummary,
};
use ambient_tests::cni::Attach;
use ambient_tests::eventually;

const HBONE: u16 = ambient_common::constants::HBONE_PORT;
const WAIT: Duration = Duration::from_secs(15);

fn cluster(tag: &str, octet: u8, attach: Attach) -> Cluster {
    Cluster::new(ClusterSpec::new(tag, 2, attach, Addressing::test(octet)))
        .unwrap_or_else(|e| panic!("cluster {tag}: {e}"))
}

fn pod(c: &mut Cluster, node: usize, ns: &str, name: &str) -> usize {
    c.add_pod(node, ns, name, &[])
        .unwrap_or_else(|e| panic!("pod {ns}/{name}: {e}"))
}

fn marker(tag: &str) -> String {
    format!("PLAINTEXT-MARKER-{tag}-{}", std::process::id())
}

/// `istio_tcp_connections_opened_total` samples of one node matching all `labels`.
fn opened(c: &Cluster, node: usize, labels: &[(&str, &str)]) -> f64 {
    let text = c.nodes[node].metrics().unwrap_or_default();
    metric_samples(&text, "istio_tcp_connections_opened_total")
        .into_iter()
        .filter(|(l, _)| labels.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .sum()
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

fn ambient_cross_node(tag: &str, octet: u8, attach: Attach) {
    let mut c = cluster(tag, octet, attach);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("cross").unwrap();
    let m = marker(tag);
    let to = c.pods[server].echo_addr();
    assert_eq!(c.connect(client, to, &m).unwrap(), m);
    // A large transfer: 8 MiB with the marker at the start, checked end to end.
    let mut data = ambient_tests::inns::pattern(u64::from(octet), 8 * 1024 * 1024);
    data[..m.len()].copy_from_slice(m.as_bytes());
    let r = c.transfer(client, to, &data).unwrap();
    assert!(r.intact(), "transfer corrupted: {r:?}");
    let server_ip = c.pods[server].ip;
    let packets = cap
        .finish_when(&c.underlay, WAIT, |p| {
            p.iter()
                .filter(|p| p.dst == std::net::IpAddr::V4(server_ip) && p.dport == HBONE)
                .map(|p| p.payload.len())
                .sum::<usize>()
                > data.len()
        })
        .unwrap();
    let summary = UnderlaySummary::from_packets(&packets);
    eprintln!("underlay flows: {:?}", summary.flows);
    assert!(
        summary.flows.keys().all(|(_, _, port)| *port == HBONE),
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

#[test]
fn ambient_to_ambient_across_nodes_bridge() {
    ambient_cross_node("e2ecb", 121, Attach::Bridge);
}

#[test]
fn ambient_to_ambient_across_nodes_ptp() {
    ambient_cross_node("e2ecp", 122, Attach::Ptp);
}

#[allow(dead_code)]
fn addr(c: &Cluster, pod: usize) -> SocketAddr {
    c.pods[pod].echo_addr()
}

//! ztunnel end to end in network namespaces: two nodes, a ztunnel each, pods behind them,
//! capture rules set by the test. Run as root: `cargo test -p ztunnel --test netns`.

mod support;

use std::time::Duration;

use support::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root for network namespaces");
        return true;
    }
    false
}

/// Pods: a1, a2 (ambient, node 0, ns "shop"), b1 (ambient, node 1, ns "db"),
/// b2 (not ambient, node 1, ns "legacy").
fn lab(tag: &str, octet: u8) -> Lab {
    Lab::new(
        tag,
        octet,
        &[
            (0, "a1", "shop", true),
            (0, "a2", "shop", true),
            (1, "b1", "db", true),
            (1, "b2", "legacy", false),
        ],
    )
}

#[test]
fn cross_node_hbone_carries_bytes_intact_and_only_tls_on_the_wire() {
    if skip() {
        return;
    }
    let lab = lab("hb", 201);
    lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, b1) = (lab.pod("a1").clone(), lab.pod("b1").clone());
    let echo = echo_server(&b1, 8080);

    // Capture the underlay on node 0 while traffic flows.
    let pcap = pcap_path(lab.dir.path(), "underlay");
    let tcpdump = lab.spawn_in(
        &lab.nodes[0].ns,
        &[
            "tcpdump",
            "-i",
            "ul",
            "-nn",
            "-U",
            "-s",
            "256",
            "-w",
            pcap.to_str().unwrap(),
        ],
    );
    eventually("tcpdump started", Duration::from_secs(10), || {
        std::fs::metadata(&pcap)
            .ok()
            .filter(|m| m.len() > 0)
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(300));

    // One large transfer, echoed back intact, with a half-close.
    let marker = b"PLAINTEXT-MARKER-PLAINTEXT-MARKER".repeat(1000);
    let mut big = payload(24 * 1024 * 1024, 7);
    big[..marker.len()].copy_from_slice(&marker);
    let got = echo_from(&a1, echo.addr, &big).expect("echo through HBONE");
    assert_eq!(got.len(), big.len());
    assert_eq!(fnv(&got), fnv(&big), "bytes changed in transit");

    // Many concurrent streams.
    let handles: Vec<_> = (0..40u32)
        .map(|i| {
            let (a1, to) = (a1.clone(), echo.addr);
            std::thread::spawn(move || {
                let data = payload(50_000 + i as usize * 997, i);
                let got = echo_from(&a1, to, &data).expect("concurrent stream");
                assert_eq!(fnv(&got), fnv(&data));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // The destination pod saw the client pod's own address (transparent source).
    let peers = echo.peers.lock().unwrap().clone();
    assert!(!peers.is_empty());
    assert!(peers.iter().all(|p| p.ip() == a1.ip), "peers: {peers:?}");

    // The server side knows the client's SPIFFE identity (metrics and access log).
    let want = "source_principal=\"spiffe://cluster.local/ns/shop/sa/sa-a1\"";
    let m = eventually("destination metrics", Duration::from_secs(5), || {
        let m = lab.metrics(1);
        (m.contains(want) && m.contains("reporter=\"destination\"")).then_some(m)
    });
    assert!(m.contains("istio_tcp_connections_opened_total{"), "{m}");
    assert!(
        m.contains("connection_security_policy=\"mutual_tls\""),
        "{m}"
    );
    assert!(lab
        .log(1)
        .contains("spiffe://cluster.local/ns/shop/sa/sa-a1"));
    let conf = lab.admin(1, "/config_dump");
    assert!(
        conf.contains("spiffe://cluster.local/ns/db/sa/sa-b1"),
        "{conf}"
    );
    assert!(
        !conf.contains(
            "\"identity\": \"spiffe://cluster.local/ns/shop/sa/sa-a1\",\n    \"not_before"
        ),
        "no certificate for remote identities"
    );

    // The link between the nodes carried TLS to 15008 only, never the plaintext.
    lab.terminate(tcpdump);
    std::thread::sleep(Duration::from_millis(300));
    let other = sh(&[
        "tcpdump",
        "-r",
        pcap.to_str().unwrap(),
        "-nn",
        "ip and not tcp port 15008",
    ]);
    assert!(
        other.trim().is_empty(),
        "non-HBONE IP traffic on the underlay:\n{other}"
    );
    let hbone = sh(&[
        "tcpdump",
        "-r",
        pcap.to_str().unwrap(),
        "-nn",
        "tcp port 15008",
    ]);
    assert!(hbone.lines().count() > 100, "expected HBONE packets");
    let ascii = sh(&["tcpdump", "-r", pcap.to_str().unwrap(), "-nn", "-A"]);
    assert!(
        !ascii.contains("PLAINTEXT-MARKER"),
        "plaintext leaked on the underlay"
    );
}

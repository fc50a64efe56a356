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

#[test]
fn service_vip_same_node_outside_mesh_and_plaintext_inbound() {
    if skip() {
        return;
    }
    let lab = lab("sv", 202);
    lab.write_all_manifests(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: db}\nspec:\n  clusterIP: 10.202.100.10\n  selector: {app: b1}\n  ports: [{name: tcp, port: 80, targetPort: 8080}]\n",
    );
    lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, a2, b1, b2) = (
        lab.pod("a1").clone(),
        lab.pod("a2").clone(),
        lab.pod("b1").clone(),
        lab.pod("b2").clone(),
    );
    let echo_b1 = echo_server(&b1, 8080);
    let echo_a2 = echo_server(&a2, 8080);
    let echo_b2 = echo_server(&b2, 8080);
    let echo_a1 = echo_server(&a1, 9090);
    let data = payload(300_000, 3);

    // A Service VIP resolves to the ready endpoint, reached through HBONE.
    let vip = "10.202.100.10:80".parse().unwrap();
    let got = eventually("service VIP reachable", Duration::from_secs(5), || {
        echo_from(&a1, vip, &data)
            .ok()
            .filter(|g| g.len() == data.len())
    });
    assert_eq!(fnv(&got), fnv(&data));
    assert!(echo_b1
        .peers
        .lock()
        .unwrap()
        .iter()
        .all(|p| p.ip() == a1.ip));

    // Same node: delivered locally with the client's source address.
    let got = echo_from(&a1, echo_a2.addr, &data).unwrap();
    assert_eq!(fnv(&got), fnv(&data));
    assert_eq!(echo_a2.peers.lock().unwrap()[0].ip(), a1.ip);

    // Outside the mesh (a non-ambient pod): direct TCP, allowed by default.
    let got = echo_from(&a1, echo_b2.addr, &data).unwrap();
    assert_eq!(fnv(&got), fnv(&data));

    // Plaintext from a non-mesh pod to an ambient pod: captured on 15006, allowed
    // (permissive), delivered keeping the client's address.
    let got = echo_from(&b2, echo_a1.addr, &data).unwrap();
    assert_eq!(fnv(&got), fnv(&data));
    assert_eq!(echo_a1.peers.lock().unwrap()[0].ip(), b2.ip);
    let m = lab.metrics(0);
    assert!(m.contains("connection_security_policy=\"unknown\""), "{m}");
    eventually("plaintext access log", Duration::from_secs(5), || {
        lab.log(0).contains("InboundPlaintext").then_some(())
    });
}

#[test]
fn authorization_deny_and_strict_mtls_refuse_and_are_counted() {
    if skip() {
        return;
    }
    let lab = lab("az", 203);
    lab.write_all_manifests(concat!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
        "metadata: {name: no-a1, namespace: db}\n",
        "spec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-a1]}}]}]\n",
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n",
        "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    ));
    lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, a2, b1, b2) = (
        lab.pod("a1").clone(),
        lab.pod("a2").clone(),
        lab.pod("b1").clone(),
        lab.pod("b2").clone(),
    );
    let echo_b1 = echo_server(&b1, 8080);
    let echo_a1 = echo_server(&a1, 9090);
    let data = payload(10_000, 5);

    // a2 is allowed; a1 is denied by the DENY policy.
    let got = echo_from(&a2, echo_b1.addr, &data).unwrap();
    assert_eq!(fnv(&got), fnv(&data));
    let denied = echo_from(&a1, echo_b1.addr, &data);
    assert!(
        denied.map(|g| g.is_empty()).unwrap_or(true),
        "a1 must be refused"
    );
    assert!(
        echo_b1
            .peers
            .lock()
            .unwrap()
            .iter()
            .all(|p| p.ip() != a1.ip),
        "denied connection reached the pod"
    );
    eventually("DENY counted", Duration::from_secs(5), || {
        let m = lab.metrics(1);
        m.lines()
            .any(|l| {
                l.starts_with("istio_tcp_connections_closed_total{")
                    && l.contains("response_flags=\"DENY\"")
                    && l.contains("sa-a1")
            })
            .then_some(())
    });

    // STRICT in namespace shop: plaintext from the non-mesh pod b2 to a1 is refused.
    let refused = echo_from(&b2, echo_a1.addr, &data);
    assert!(refused.map(|g| g.is_empty()).unwrap_or(true));
    assert!(echo_a1.peers.lock().unwrap().is_empty());
    eventually("strict refusal logged", Duration::from_secs(5), || {
        lab.log(0).contains("requires mTLS").then_some(())
    });
}

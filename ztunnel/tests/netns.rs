//! ztunnel end to end in network namespaces: two nodes, a ztunnel each, pods behind them,
//! and on each node the node agent's own capture rules and policy routing
//! (`ambient_tests::ztunnel_lab`). Run as root: `cargo test -p ztunnel --test netns`.

use std::time::Duration;

use ambient_tests::ztunnel_lab::*;

fn skip() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root for network namespaces");
        return true;
    }
    false
}

/// Pods: a1, a2 (ambient, node 0, ns "shop"), b1 (ambient, node 1, ns "db"),
/// b2 (not ambient, node 1, ns "legacy").
fn lab(tag: &str) -> Lab {
    Lab::new(
        tag,
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
    let lab = lab("hb");
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
    wait_for("tcpdump started", Duration::from_secs(10), || {
        std::fs::metadata(&pcap)
            .ok()
            .filter(|m| m.len() > 0)
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(300));

    // One large transfer, echoed back intact, with a half-close.
    let marker = b"PLAINTEXT-MARKER-PLAINTEXT-MARKER".repeat(1000);
    let mut big = pattern(7, 24 * 1024 * 1024);
    big[..marker.len()].copy_from_slice(&marker);
    let got = echo_from(&a1, echo.addr, &big).expect("echo through HBONE");
    assert_eq!(got.len(), big.len());
    assert_eq!(
        sha256_hex(&got),
        sha256_hex(&big),
        "bytes changed in transit"
    );

    // Many concurrent streams.
    let handles: Vec<_> = (0..40u32)
        .map(|i| {
            let (a1, to) = (a1.clone(), echo.addr);
            std::thread::spawn(move || {
                let data = pattern(u64::from(i), 50_000 + i as usize * 997);
                let got = echo_from(&a1, to, &data).expect("concurrent stream");
                assert_eq!(sha256_hex(&got), sha256_hex(&data));
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
    let m = wait_for("destination metrics", Duration::from_secs(5), || {
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
    let lab = lab("sv");
    let vip: std::net::SocketAddr = format!("10.{}.100.10:80", lab.octet).parse().unwrap();
    lab.write_all_manifests(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: db}}\nspec:\n  clusterIP: {}\n  selector: {{app: b1}}\n  ports: [{{name: tcp, port: 80, targetPort: 8080}}]\n",
        vip.ip()
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
    let echo_a2 = echo_server(&a2, 8080);
    let echo_b2 = echo_server(&b2, 8080);
    let echo_a1 = echo_server(&a1, 9090);
    let data = pattern(3, 300_000);

    // A Service VIP resolves to the ready endpoint, reached through HBONE.
    let got = wait_for("service VIP reachable", Duration::from_secs(5), || {
        echo_from(&a1, vip, &data)
            .ok()
            .filter(|g| g.len() == data.len())
    });
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert!(echo_b1
        .peers
        .lock()
        .unwrap()
        .iter()
        .all(|p| p.ip() == a1.ip));

    // Same node: delivered locally with the client's source address.
    let got = echo_from(&a1, echo_a2.addr, &data).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(echo_a2.peers.lock().unwrap()[0].ip(), a1.ip);

    // Outside the mesh (a non-ambient pod): direct TCP, allowed by default.
    let got = echo_from(&a1, echo_b2.addr, &data).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));

    // Plaintext from a non-mesh pod to an ambient pod: captured on 15006, allowed
    // (permissive), delivered keeping the client's address.
    let got = echo_from(&b2, echo_a1.addr, &data).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(echo_a1.peers.lock().unwrap()[0].ip(), b2.ip);
    let m = lab.metrics(0);
    assert!(m.contains("connection_security_policy=\"unknown\""), "{m}");
    wait_for("plaintext access log", Duration::from_secs(5), || {
        lab.log(0).contains("InboundPlaintext").then_some(())
    });
}

#[test]
fn authorization_deny_and_strict_mtls_refuse_and_are_counted() {
    if skip() {
        return;
    }
    let lab = lab("az");
    lab.write_all_manifests(concat!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
        "metadata: {name: no-a1, namespace: db}\n",
        "spec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-a1]}}]}]\n",
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n",
        "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n",
    ));
    lab.start_ztunnel(0, &["--outside-mesh", "deny"]);
    lab.start_ztunnel(1, &["--transparent", "false"]);
    let (a1, a2, b1, b2) = (
        lab.pod("a1").clone(),
        lab.pod("a2").clone(),
        lab.pod("b1").clone(),
        lab.pod("b2").clone(),
    );
    let echo_b1 = echo_server(&b1, 8080);
    let echo_a1 = echo_server(&a1, 9090);
    let echo_b2 = echo_server(&b2, 8080);
    let data = pattern(5, 10_000);

    // --outside-mesh deny: the non-ambient pod is unreachable from an ambient one.
    let refused = echo_from(&a1, echo_b2.addr, &data);
    assert!(refused.map(|g| g.is_empty()).unwrap_or(true));
    assert!(echo_b2.peers.lock().unwrap().is_empty());

    // a2 is allowed; a1 is denied by the DENY policy.
    let got = echo_from(&a2, echo_b1.addr, &data).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    // --transparent false on node 1: the pod sees the node's address, not the client's.
    let seen = echo_b1.peers.lock().unwrap()[0].ip();
    assert_ne!(seen, a2.ip, "source kept although --transparent false");
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
    wait_for("DENY counted", Duration::from_secs(5), || {
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
    wait_for("strict refusal logged", Duration::from_secs(5), || {
        lab.log(0).contains("requires mTLS").then_some(())
    });
}

/// Opens one HBONE stream by hand from the current namespace; returns the CONNECT status.
async fn try_hbone(
    cfg: std::sync::Arc<rustls::ClientConfig>,
    dst: std::net::SocketAddr,
    target: std::net::SocketAddr,
) -> Result<u16, String> {
    let tcp = tokio::net::TcpStream::connect(dst)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::IpAddress(dst.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| format!("tls: {e:?}"))?;
    let (send, conn) = ztunnel::hbone::client_builder()
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let mut send = send.ready().await.map_err(|e| format!("ready: {e}"))?;
    let (resp, _stream) = send
        .send_request(req, false)
        .map_err(|e| format!("send: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("response: {e}"))?;
    Ok(resp.status().as_u16())
}

#[test]
fn inbound_rejects_plaintext_foreign_expired_and_wrong_identity() {
    if skip() {
        return;
    }
    use ztunnel::identity::{
        ca_init, client_config, CaFiles, CertificateProvider, FileCa, Identity,
    };
    let lab = lab("rj");
    lab.start_ztunnel(1, &[]);
    let b1 = lab.pod("b1").clone();
    let b2 = lab.pod("b2").clone();
    let _echo = echo_server(&b1, 8080);
    let hbone = std::net::SocketAddr::new(b1.ip, 15008);
    let target = std::net::SocketAddr::new(b1.ip, 8080);

    let ca = FileCa::load(&CaFiles::in_dir(&lab.ca_dir), "cluster.local").unwrap();
    let roots = ca.trust_bundle().to_vec();
    let client = Identity::new("cluster.local", "shop", "sa-a1");
    let server = Identity::new("cluster.local", "db", "sa-b1");
    let good = ca.issue_now(&client, Duration::from_secs(600)).unwrap();
    let expired = ca.issue_now(&client, Duration::from_secs(1)).unwrap();
    let evil_dir = lab.dir.path().join("evil-ca");
    let evil = FileCa::load(
        &ca_init(&evil_dir, "evil.local", false).unwrap(),
        "evil.local",
    )
    .unwrap();
    let foreign = evil
        .issue_now(
            &Identity::new("evil.local", "shop", "sa-a1"),
            Duration::from_secs(600),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(2100)); // let `expired` expire

    let node0 = lab.nodes[0].ns.clone();
    let results = in_ns(&node0, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let ok = try_hbone(
                client_config(&good, &roots, &server).unwrap(),
                hbone,
                target,
            )
            .await;
            let other_pod = try_hbone(
                client_config(&good, &roots, &server).unwrap(),
                hbone,
                std::net::SocketAddr::new(b2.ip, 8080),
            )
            .await;
            let no_listener = try_hbone(
                client_config(&good, &roots, &server).unwrap(),
                hbone,
                std::net::SocketAddr::new(b1.ip, 9999),
            )
            .await;
            let wrong_server = try_hbone(
                client_config(
                    &good,
                    &roots,
                    &Identity::new("cluster.local", "db", "someone-else"),
                )
                .unwrap(),
                hbone,
                target,
            )
            .await;
            let expired = try_hbone(
                client_config(&expired, &roots, &server).unwrap(),
                hbone,
                target,
            )
            .await;
            let foreign = try_hbone(
                client_config(&foreign, &roots, &server).unwrap(),
                hbone,
                target,
            )
            .await;
            // Plaintext to 15008.
            let plaintext = {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut s = tokio::net::TcpStream::connect(hbone).await.unwrap();
                s.write_all(b"CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n")
                    .await
                    .unwrap();
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
                String::from_utf8_lossy(&buf).into_owned()
            };
            (
                ok,
                other_pod,
                no_listener,
                wrong_server,
                expired,
                foreign,
                plaintext,
            )
        })
    });
    let (ok, other_pod, no_listener, wrong_server, expired, foreign, plaintext) = results;
    assert_eq!(ok, Ok(200), "control case");
    assert_eq!(
        other_pod,
        Ok(400),
        "authority must be the pod the connection was sent to"
    );
    assert_eq!(no_listener, Ok(503));
    let e = wrong_server.unwrap_err();
    assert!(e.contains("WrongIdentity"), "{e}");
    assert!(expired.is_err(), "expired client certificate accepted");
    assert!(foreign.is_err(), "foreign trust domain accepted");
    assert!(!plaintext.contains("HTTP/1.1 200"), "{plaintext}");

    // A connection made straight to the outbound listener (not captured) is a loop. The
    // agent's ruleset refuses it in the kernel (`input_guard`)...
    let node1 = lab.nodes[1].ns.clone();
    let direct = in_ns(&node1, || std::net::TcpStream::connect("127.0.0.1:15001"));
    assert_eq!(
        direct.map(|_| ()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the capture ports take only captured traffic"
    );
    // ...and without that guard ztunnel itself closes it.
    let table = ambient_common::constants::NFT_TABLE;
    ns_sh(
        &node1,
        &["nft", "flush", "chain", "inet", table, "input_guard"],
    );
    let echoed = in_ns(&node1, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:15001").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = std::io::Write::write_all(&mut s, b"x");
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut buf);
        buf
    });
    assert!(echoed.is_empty());
    wait_for("loop refusal logged", Duration::from_secs(5), || {
        lab.log(1).contains("refusing a loop").then_some(())
    });
}

#[test]
fn restart_beside_the_running_ztunnel_refuses_no_connection() {
    if skip() {
        return;
    }
    let lab = lab("ro");
    let old0 = lab.start_ztunnel(0, &[]);
    let old1 = lab.start_ztunnel(1, &[]);
    let (a1, b1) = (lab.pod("a1").clone(), lab.pod("b1").clone());
    let echo = echo_server(&b1, 8080);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (a1, to, stop) = (a1.clone(), echo.addr, stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                let data = pattern(i as u64, 2000);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match echo_from(&a1, to, &data) {
                        Ok(g) if g == data => ok += 1,
                        Ok(g) => failed.push(format!("short echo {}", g.len())),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Destination side: a new ztunnel beside the old one, then the old one drains.
    lab.start_ztunnel(1, &[]);
    std::thread::sleep(Duration::from_millis(300));
    lab.terminate(old1);
    lab.wait_exit(old1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    // Source side too.
    lab.start_ztunnel(0, &[]);
    std::thread::sleep(Duration::from_millis(300));
    lab.terminate(old0);
    lab.wait_exit(old0, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "connections failed during takeover: {failed:?}"
        );
        total += ok;
    }
    assert!(
        total > 20,
        "too few connections exercised the takeover: {total}"
    );
}

#[test]
fn agent_push_enrols_a_local_pod_before_its_first_connection() {
    if skip() {
        return;
    }
    use ambient_common::frame::{read_frame, write_frame};
    use ambient_common::ztunnel_api::{LocalWorkload, ZtunnelOp, ZtunnelReply, ZtunnelRequest};
    let lab = lab("ag");
    // Node 0's manifests do not know node 0's pods: only the agent tells ztunnel about a1.
    lab.write_manifests_with(0, "", |p| p.node != 0);
    lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, b1) = (lab.pod("a1").clone(), lab.pod("b1").clone());
    let echo = echo_server(&b1, 8080);
    let data = pattern(9, 5000);
    // Not enrolled yet: refused.
    assert!(echo_from(&a1, echo.addr, &data)
        .map(|g| g.is_empty())
        .unwrap_or(true));

    let sock = std::os::unix::net::UnixStream::connect(&lab.nodes[0].agent_socket).unwrap();
    let add = |op| {
        let mut s = sock.try_clone().unwrap();
        write_frame(&mut s, &ZtunnelRequest::new(op)).unwrap();
        read_frame::<ZtunnelReply>(&mut s).unwrap()
    };
    assert_eq!(add(ZtunnelOp::Snapshot(vec![])), ZtunnelReply::Ack);
    let w = LocalWorkload {
        uid: "uid-a1".into(),
        namespace: a1.namespace.clone(),
        name: a1.name.clone(),
        service_account: a1.sa.clone(),
        node: "node-0".into(),
        ips: vec![a1.ip],
    };
    assert_eq!(add(ZtunnelOp::Add(w)), ZtunnelReply::Ack);
    // Right after the Ack: the certificate is held and the first connection works.
    let conf = lab.admin(0, "/config_dump");
    assert!(
        conf.contains("spiffe://cluster.local/ns/shop/sa/sa-a1"),
        "{conf}"
    );
    let got = echo_from(&a1, echo.addr, &data).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(
        add(ZtunnelOp::Remove {
            uid: "uid-a1".into()
        }),
        ZtunnelReply::Ack
    );
    assert!(echo_from(&a1, echo.addr, &data)
        .map(|g| g.is_empty())
        .unwrap_or(true));
    drop(sock.shutdown(std::net::Shutdown::Both));
}

#[test]
fn ipv6_pods_get_hbone_and_keep_their_source_address() {
    if skip() {
        return;
    }
    let lab = Lab::new_dual_stack(
        "v6",
        &[
            (0, "a1", "shop", true),
            (1, "b1", "db", true),
            (1, "b2", "legacy", false),
        ],
    );
    lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, b1, b2) = (
        lab.pod("a1").clone(),
        lab.pod("b1").clone(),
        lab.pod("b2").clone(),
    );
    let (a1_6, b1_6) = (a1.ip6.unwrap(), b1.ip6.unwrap());
    let echo = echo_server_on(&b1, std::net::SocketAddr::new(b1_6, 8080));
    let echo_a1 = echo_server_on(&a1, std::net::SocketAddr::new(a1_6, 9090));
    let data = pattern(11, 2 * 1024 * 1024);
    let got = echo_from(&a1, echo.addr, &data).expect("IPv6 through HBONE");
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(echo.peers.lock().unwrap()[0].ip(), a1_6, "IPv6 source kept");
    // Plaintext inbound over IPv6 from a non-mesh pod.
    let got = echo_from(&b2, echo_a1.addr, &data).expect("IPv6 plaintext inbound");
    assert_eq!(sha256_hex(&got), sha256_hex(&data));
    assert_eq!(echo_a1.peers.lock().unwrap()[0].ip(), b2.ip6.unwrap());
    let m = lab.metrics(1);
    assert!(
        m.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/sa-a1\""),
        "{m}"
    );
}

#[test]
fn crashed_ztunnel_fails_closed_then_recovers() {
    if skip() {
        return;
    }
    let lab = lab("fc");
    let z0 = lab.start_ztunnel(0, &[]);
    lab.start_ztunnel(1, &[]);
    let (a1, b1) = (lab.pod("a1").clone(), lab.pod("b1").clone());
    let echo = echo_server(&b1, 8080);
    let data = pattern(1, 4000);
    assert_eq!(echo_from(&a1, echo.addr, &data).unwrap(), data);
    let seen = echo.peers.lock().unwrap().len();

    lab.kill(z0);
    lab.wait_exit(z0, Duration::from_secs(5));
    // Captured traffic has nowhere to go: refused, never sent around ztunnel.
    let r = echo_from(&a1, echo.addr, &data);
    assert!(r.map(|g| g.is_empty()).unwrap_or(true));
    assert_eq!(echo.peers.lock().unwrap().len(), seen, "bypassed ztunnel");

    lab.start_ztunnel(0, &[]);
    let got = wait_for("recovered", Duration::from_secs(10), || {
        echo_from(&a1, echo.addr, &data).ok().filter(|g| *g == data)
    });
    assert_eq!(got, data);
}

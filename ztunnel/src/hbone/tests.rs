use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::PoolConfig;
use crate::identity::Identity;

#[test]
fn authority_table() {
    let ok = [
        ("10.0.0.5:80", "10.0.0.5:80"),
        ("[fd00::5]:8080", "[fd00::5]:8080"),
        ("127.0.0.1:65535", "127.0.0.1:65535"),
    ];
    for (s, want) in ok {
        assert_eq!(
            parse_authority(s).unwrap(),
            want.parse::<SocketAddr>().unwrap()
        );
    }
    let bad = [
        ("", AuthorityError::Missing),
        (
            "web.shop.svc:80",
            AuthorityError::Shape("web.shop.svc:80".into()),
        ),
        ("10.0.0.5", AuthorityError::Shape("10.0.0.5".into())),
        ("fd00::5:80", AuthorityError::Shape("fd00::5:80".into())),
        ("10.0.0.5:0", AuthorityError::PortZero("10.0.0.5:0".into())),
        (
            "0.0.0.0:80",
            AuthorityError::NotUnicast("0.0.0.0:80".into()),
        ),
        (
            "224.0.0.1:80",
            AuthorityError::NotUnicast("224.0.0.1:80".into()),
        ),
        (
            "10.0.0.5:80/x",
            AuthorityError::Shape("10.0.0.5:80/x".into()),
        ),
        (
            "10.0.0.5:99999",
            AuthorityError::Shape("10.0.0.5:99999".into()),
        ),
    ];
    for (s, want) in bad {
        assert_eq!(parse_authority(s).unwrap_err(), want, "{s}");
    }
    for a in ["10.1.2.3:443", "[fd00::1]:1"] {
        let addr: SocketAddr = a.parse().unwrap();
        assert_eq!(parse_authority(&authority(addr)).unwrap(), addr);
    }
}

#[test]
fn forwarded_for() {
    assert_eq!(
        parse_forwarded_for("for=10.0.0.1"),
        Some("10.0.0.1".parse().unwrap())
    );
    assert_eq!(
        parse_forwarded_for("proto=http;for=\"[fd00::1]\""),
        Some("fd00::1".parse().unwrap())
    );
    assert_eq!(parse_forwarded_for("for=unknown"), None);
    assert_eq!(parse_forwarded_for(""), None);
    // Every RFC 7239 form, Istio's among them.
    let v4 = Some("10.200.0.1".parse().unwrap());
    let v6 = Some("fd00::1".parse().unwrap());
    for (header, want) in [
        ("for=\"10.200.0.1:51812\"", v4),
        ("For=10.200.0.1", v4),
        ("for=10.200.0.1:51812", v4),
        (" for = \"10.200.0.1\" ", v4),
        ("proto=https; for=\"10.200.0.1:1\"", v4),
        ("for=\"[fd00::1]:51812\"", v6),
        ("for=\"[fd00::1]\"", v6),
        ("for=fd00::1", v6),
        ("for=10.200.0.1, for=10.9.9.9", v4),
        ("for=\"_hidden\"", None),
        ("for=\"[fd00::1]:port\"", None),
        ("for=\"[10.0.0.1]\"", None),
        ("for=\"10.200.0.1:99999\"", None),
        ("by=10.200.0.1", None),
    ] {
        assert_eq!(parse_forwarded_for(header), want, "{header}");
    }
    // What we send, Istio's way, reads back.
    for client in ["10.200.0.1:51812", "[fd00::1]:51812"] {
        let c: std::net::SocketAddr = client.parse().unwrap();
        let h = forwarded_header(c);
        assert_eq!(h, format!("for=\"{client}\""));
        assert_eq!(parse_forwarded_for(&h), Some(c.ip()));
    }
}

proptest! {
    #[test]
    fn authority_never_panics(s in ".{0,40}") {
        let _ = parse_authority(&s);
        let _ = parse_forwarded_for(&s);
    }

    #[test]
    fn authority_round_trips(ip in any::<std::net::IpAddr>(), port in 1u16..) {
        let addr = SocketAddr::new(ip, port);
        if let Ok(parsed) = parse_authority(&authority(addr)) {
            prop_assert_eq!(parsed, addr);
        }
    }
}

/// A plain-TCP dialer to a test HBONE server (TLS is covered in identity's tests and the
/// integration tests).
struct PlainDialer(SocketAddr);

impl Dialer for PlainDialer {
    fn dial<'a>(&'a self, _key: &'a PoolKey) -> DialFuture<'a> {
        Box::pin(async move {
            let s = TcpStream::connect(self.0).await.map_err(|e| {
                PoolError::Dial(crate::proxy::SocketError::Connect {
                    addr: self.0,
                    source: e,
                })
            })?;
            Ok(Box::new(s) as Box<dyn Io>)
        })
    }
}

use super::pool::{DialFuture, PoolError};

async fn echo_upstream() -> SocketAddr {
    echo_upstream_on("127.0.0.1:0").await
}

async fn echo_upstream_on(bind: &str) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server without TLS that relays every CONNECT to the authority.
async fn hbone_server() -> SocketAddr {
    hbone_server_on("127.0.0.1:0").await
}

async fn hbone_server_on(bind: &str) -> SocketAddr {
    hbone_server_with(bind, server_builder()).await
}

async fn hbone_server_with(bind: &str, builder: h2::server::Builder) -> SocketAddr {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let builder = builder.clone();
            tokio::spawn(async move {
                let mut conn = builder.handshake::<_, bytes::Bytes>(s).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let Ok(dst) = parse_authority(
                            req.uri().authority().map(|a| a.as_str()).unwrap_or(""),
                        ) else {
                            let resp = http::Response::builder().status(400).body(()).unwrap();
                            let _ = respond.send_response(resp, true);
                            return;
                        };
                        let up = TcpStream::connect(dst).await.unwrap();
                        let resp = http::Response::builder().status(200).body(()).unwrap();
                        let send = respond.send_response(resp, false).unwrap();
                        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
                        let _ = relay_h2(up, send, req.into_body(), &a, &b).await;
                    });
                }
            });
        }
    });
    addr
}

fn key(expected: &str) -> PoolKey {
    PoolKey {
        src: Identity::new("td", "a", "src"),
        dst: "127.0.0.1:15008".parse().unwrap(),
        expected: Identity::new("td", "b", expected),
    }
}

fn pool(server: SocketAddr, max_streams: usize, idle: Duration) -> Arc<Pool> {
    Pool::new(
        PoolConfig {
            max_streams,
            idle_timeout: idle,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
        },
        Box::new(PlainDialer(server)),
    )
}

async fn roundtrip(stream: HboneStream, payload: Vec<u8>) -> Vec<u8> {
    // Relay through a local socket pair so the client side also uses relay_h2.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (inner, _) = l.accept().await.unwrap();
    let relay = tokio::spawn(async move {
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        relay_h2(inner, stream.send, stream.recv, &a, &b)
            .await
            .unwrap();
        (a.into_inner(), b.into_inner())
    });
    let (mut r, mut w) = client.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap(); // half-close
    };
    let mut got = Vec::new();
    let read = r.read_to_end(&mut got);
    let ((), res) = tokio::join!(write, read);
    res.unwrap();
    let (up, down) = relay.await.unwrap();
    assert_eq!(up as usize, payload.len());
    assert_eq!(down as usize, payload.len());
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_transfer_with_half_close_is_intact() {
    let upstream = echo_upstream().await;
    let p = pool(hbone_server().await, 10, Duration::from_secs(60));
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let s = p.connect(&key("b"), upstream, None).await.unwrap();
    let got = roundtrip(s, payload.clone()).await;
    assert!(got == payload, "echoed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_opens_more_connections_and_keys_separate() {
    let upstream = echo_upstream().await;
    let p = pool(hbone_server().await, 2, Duration::from_secs(60));
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(p.connect(&key("b"), upstream, None).await.unwrap());
    }
    let stats = p.stats();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0].connections, 3, "5 streams, 2 per connection");
    assert_eq!(stats[0].streams, 5);
    // A different expected identity never shares a connection.
    held.push(p.connect(&key("c"), upstream, None).await.unwrap());
    assert_eq!(p.stats().len(), 2);
    // Released slots are reused.
    held.truncate(1);
    let _again = p.connect(&key("b"), upstream, None).await.unwrap();
    let b: Vec<_> = p
        .stats()
        .into_iter()
        .filter(|s| s.key == key("b"))
        .collect();
    assert_eq!(b[0].connections, 3);
    assert_eq!(b[0].streams, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_allowing_fewer_streams_gets_more_connections() {
    let upstream = echo_upstream().await;
    let mut b = server_builder();
    b.max_concurrent_streams(2);
    let p = pool(
        hbone_server_with("127.0.0.1:0", b).await,
        10,
        Duration::from_secs(60),
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(p.connect(&key("b"), upstream, None).await.unwrap());
    }
    let stats = p.stats();
    assert_eq!(
        stats[0].connections, 2,
        "the server's limit (2), not the pool's (10)"
    );
    assert_eq!(stats[0].streams, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_evicted_and_many_streams_share_one() {
    let upstream = echo_upstream().await;
    let p = pool(hbone_server().await, 100, Duration::from_millis(200));
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let s = p.connect(&key("b"), upstream, None).await.unwrap();
            let payload = vec![i; 10_000 + i as usize];
            assert_eq!(roundtrip(s, payload.clone()).await, payload);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        p.stats()[0].connections,
        1,
        "one connection multiplexes 50 streams"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    p.evict_idle();
    assert!(p.stats().is_empty(), "idle connection closed");
}

#[tokio::test]
async fn non_200_is_an_error() {
    let p = pool(hbone_server().await, 10, Duration::from_secs(60));
    // Port 1 on loopback: the test server answers 200 only after connecting, so use an
    // authority the server rejects instead.
    let err = p
        .connect(&key("b"), "0.0.0.0:80".parse().unwrap(), None)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("400"), "{err}");
}

/// An HBONE server that answers until told to freeze, then keeps the socket open but never
/// reads again (a peer that died without closing).
async fn freezable_server(upstream: SocketAddr) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let mut rx = rx.clone();
            tokio::spawn(async move {
                let mut conn = server_builder()
                    .handshake::<_, bytes::Bytes>(s)
                    .await
                    .unwrap();
                loop {
                    tokio::select! {
                        r = conn.accept() => {
                            let Some(Ok((req, mut respond))) = r else { return };
                            tokio::spawn(async move {
                                let up = TcpStream::connect(upstream).await.unwrap();
                                let resp = http::Response::builder().status(200).body(()).unwrap();
                                let send = respond.send_response(resp, false).unwrap();
                                let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
                                let _ = relay_h2(up, send, req.into_body(), &a, &b).await;
                            });
                        }
                        _ = rx.changed() => {
                            // Frozen: hold the connection, never poll it again.
                            std::future::pending::<()>().await;
                        }
                    }
                }
            });
        }
    });
    (addr, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_ping_marks_the_connection_dead() {
    let upstream = echo_upstream().await;
    let (server, freeze) = freezable_server(upstream).await;
    let p = Pool::new(
        PoolConfig {
            max_streams: 10,
            idle_timeout: Duration::from_secs(60),
            ping_interval: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(200),
        },
        Box::new(PlainDialer(server)),
    );
    let s = p.connect(&key("b"), upstream, None).await.unwrap();
    assert_eq!(roundtrip(s, b"hello".to_vec()).await, b"hello");
    // Healthy: PINGs are answered, the connection stays.
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.evict_idle();
    assert_eq!(
        p.stats().len(),
        1,
        "a healthy connection survives its PINGs"
    );
    freeze.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    p.evict_idle();
    assert!(
        p.stats().is_empty(),
        "a connection whose PINGs go unanswered is dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_destinations_work_end_to_end() {
    // Skip quietly where the host has no IPv6 loopback.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        return;
    }
    let upstream = echo_upstream_on("[::1]:0").await;
    let p = pool(
        hbone_server_on("[::1]:0").await,
        10,
        Duration::from_secs(60),
    );
    let s = p
        .connect(
            &key("b"),
            upstream,
            Some("[fd00::7]:40000".parse().unwrap()),
        )
        .await
        .unwrap();
    let payload = vec![42u8; 1 << 20];
    assert_eq!(roundtrip(s, payload.clone()).await, payload);
}

#[test]
fn connect_checks_table() {
    let pod: std::net::IpAddr = "10.0.0.5".parse().unwrap();
    assert_eq!(
        check_connect(&http::Method::CONNECT, Some("10.0.0.5:80"), pod),
        Ok("10.0.0.5:80".parse().unwrap())
    );
    assert!(matches!(
        check_connect(&http::Method::GET, Some("10.0.0.5:80"), pod),
        Err(RequestError::Method(_))
    ));
    assert!(matches!(
        check_connect(&http::Method::CONNECT, None, pod),
        Err(RequestError::Authority(AuthorityError::Missing))
    ));
    assert!(matches!(
        check_connect(&http::Method::CONNECT, Some("10.0.0.6:80"), pod),
        Err(RequestError::OtherPod(..))
    ));
}

proptest! {
    /// Fuzz-style: any method and authority are handled without panicking, and whatever is
    /// accepted is exactly `pod:port` with a port > 0.
    #[test]
    fn connect_checks_never_panic_and_accept_only_the_pod(
        method in "[A-Z]{1,8}",
        authority in prop::option::of(".{0,40}"),
        port in 1u16..,
        pick in 0u8..3,
    ) {
        let pod: std::net::IpAddr = "10.0.0.5".parse().unwrap();
        let m = http::Method::from_bytes(method.as_bytes()).unwrap();
        let auth = match pick {
            0 => authority.clone(),
            1 => Some(format!("10.0.0.5:{port}")),
            _ => Some(format!("[fd00::5]:{port}")),
        };
        if let Ok(t) = check_connect(&m, auth.as_deref(), pod) {
            prop_assert_eq!(t.ip(), pod);
            prop_assert!(t.port() > 0);
            prop_assert_eq!(m, http::Method::CONNECT);
        }
    }
}

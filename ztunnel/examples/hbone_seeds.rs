//! Writes fuzz/seeds/hbone_request/* (the fuzz target's seed corpus): what an HBONE client
//! sends after the preface for a few requests (a valid CONNECT with a Forwarded header, IPv6,
//! another pod, port 0, a GET, a name instead of an IP, two streams on one connection),
//! captured from a real h2 client with ztunnel's client settings.
//!
//!     cargo run -p ztunnel --example hbone_seeds

use std::path::Path;

use tokio::io::AsyncReadExt;

async fn capture(reqs: Vec<http::Request<()>>) -> Vec<u8> {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 20);
    let (mut send, conn) = ztunnel::hbone::client_builder()
        .handshake::<_, bytes::Bytes>(client_io)
        .await
        .expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    for req in reqs {
        let mut ready = send.clone().ready().await.expect("ready");
        let _ = ready.send_request(req, false).expect("send");
        send = ready;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    driver.abort();
    let mut out = Vec::new();
    let mut buf = vec![0; 1 << 20];
    while let Ok(Ok(n)) = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        server_io.read(&mut buf),
    )
    .await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    // The fuzz target writes the preface itself.
    out.split_off(24)
}

fn connect(auth: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(auth)
        .header(ztunnel::hbone::FORWARDED, "for=10.244.2.7")
        .body(())
        .expect("request")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/hbone_request");
    std::fs::create_dir_all(&dir).expect("seed dir");
    let get = http::Request::builder()
        .method(http::Method::GET)
        .uri("http://10.244.1.5:8080/")
        .body(())
        .expect("request");
    let v6 = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("[fd00::5]:8080")
        .header(ztunnel::hbone::FORWARDED, "for=\"[fd00::7]\"")
        .body(())
        .expect("request");
    let cases: Vec<(&str, Vec<http::Request<()>>)> = vec![
        ("connect-ok", vec![connect("10.244.1.5:8080")]),
        ("connect-other-pod", vec![connect("10.244.9.9:8080")]),
        ("connect-port-0", vec![connect("10.244.1.5:0")]),
        ("connect-name", vec![connect("web.shop:80")]),
        ("connect-v6", vec![v6]),
        ("get", vec![get]),
        (
            "two-streams",
            vec![connect("10.244.1.5:8080"), connect("10.244.1.5:9090")],
        ),
    ];
    for (name, reqs) in cases {
        let bytes = capture(reqs).await;
        std::fs::write(dir.join(name), &bytes).expect("write seed");
        println!("{name}: {} bytes", bytes.len());
    }
}

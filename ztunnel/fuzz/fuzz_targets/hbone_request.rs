//! ztunnel's inbound HBONE request handling, below TLS: the bytes a peer sends after the
//! HTTP/2 preface go through the same HTTP/2 server settings as the inbound listener
//! (`hbone::server_builder`), and every request that comes out is checked as the inbound
//! proxy checks it (`check_connect`: method, authority shape, authority = the pod the
//! connection was addressed to; the `Forwarded` header's client address). Properties: no
//! panic, no hang, and an accepted CONNECT names exactly the pod on a non-zero port with an
//! authority that formats back to itself.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use ztunnel::hbone::{authority, check_connect, parse_authority, parse_forwarded_for, FORWARDED};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5));

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fn check(method: &http::Method, auth: Option<&str>, forwarded: Option<&str>) {
    match check_connect(method, auth, POD) {
        Ok(t) => {
            assert_eq!(t.ip(), POD);
            assert_ne!(t.port(), 0);
            assert_eq!(*method, http::Method::CONNECT);
            let a = auth.expect("accepted without authority");
            // What we accepted formats back to an authority that parses to the same target.
            assert_eq!(parse_authority(&authority(t)), Ok(t), "{a:?}");
        }
        Err(_) => {}
    }
    if let Some(f) = forwarded {
        let _ = parse_forwarded_for(f);
    }
}

async fn serve(data: &[u8]) {
    let (mut client, server) = tokio::io::duplex(PREFACE.len() + data.len() + 64 * 1024);
    client.write_all(PREFACE).await.expect("buffer sized");
    client.write_all(data).await.expect("buffer sized");
    client.shutdown().await.expect("shutdown");
    let Ok(mut conn) = ztunnel::hbone::server_builder()
        .handshake::<_, bytes::Bytes>(server)
        .await
    else {
        return;
    };
    while let Some(r) = conn.accept().await {
        let Ok((req, mut respond)) = r else { break };
        let forwarded = req
            .headers()
            .get(FORWARDED)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        check(
            req.method(),
            req.uri().authority().map(|a| a.as_str()),
            forwarded.as_deref(),
        );
        let status =
            match check_connect(req.method(), req.uri().authority().map(|a| a.as_str()), POD) {
                Ok(_) => http::StatusCode::OK,
                Err(_) => http::StatusCode::BAD_REQUEST,
            };
        let resp = http::Response::builder()
            .status(status)
            .body(())
            .expect("response");
        let _ = respond.send_response(resp, true);
    }
    drop(client);
}

fuzz_target!(|data: &[u8]| {
    // The same bytes also as a bare authority / Forwarded value (the string-level checks).
    if let Ok(s) = std::str::from_utf8(data) {
        check(&http::Method::CONNECT, Some(s), Some(s));
    }
    RT.with(|rt| {
        rt.block_on(async {
            // A connection the server never finishes would be a hang: bounded here, and
            // libFuzzer's -timeout reports one.
            let _ = tokio::time::timeout(Duration::from_secs(5), serve(data)).await;
        })
    });
});

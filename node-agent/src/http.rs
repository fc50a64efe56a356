//! A minimal HTTP/1.1 responder for `/metrics` and `/healthz`: GET only, one request per
//! connection, bounded request size. Enough for Prometheus and probes without a web stack.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::source::Snapshot;

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let snapshots = snapshots.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    let k = stream.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = match (method, path) {
                ("GET", "/metrics") => {
                    let mut out = String::new();
                    match prometheus_client::encoding::text::encode(&mut out, &registry) {
                        Ok(()) => (
                            "200 OK",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            out,
                        ),
                        Err(_) => (
                            "500 Internal Server Error",
                            "text/plain",
                            "encoding failed\n".into(),
                        ),
                    }
                }
                ("GET", "/healthz") | ("GET", "/healthz/ready") => {
                    if snapshots.borrow().synced {
                        ("200 OK", "text/plain", "ready\n".into())
                    } else {
                        (
                            "503 Service Unavailable",
                            "text/plain",
                            "pod source not synced\n".into(),
                        )
                    }
                }
                ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes()).await;
        });
    }
}

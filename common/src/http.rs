//! The small HTTP/1 endpoints of the long-lived processes (metrics, readiness, admin): one
//! server, hyper's, for the agent, ztunnel and the issuer. Every endpoint is a read: `GET`
//! and `HEAD` reach the route, any other method gets 405. A client has
//! [`HEADER_TIMEOUT`] to send its request head.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::serve::{accept, AcceptBackoff};

pub use http::StatusCode as Status;

/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// A route: the reply for a path.
pub type Route = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// The content type of the Prometheus text exposition that `prometheus-client` writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `route` on every connection of `listener` until the task is dropped. `what`
/// names the listener in logs.
pub async fn serve(listener: TcpListener, what: &'static str, route: Route) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, _) = accept(&listener, &mut backoff, what).await;
        let route = route.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let (status, ctype, body) = match *req.method() {
                    Method::GET | Method::HEAD => route(req.uri().path()),
                    _ => (
                        StatusCode::METHOD_NOT_ALLOWED,
                        "text/plain",
                        "GET only\n".into(),
                    ),
                };
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

pub fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    (status, "text/plain", body.into())
}

pub fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "not found\n")
}

pub fn json(v: &impl serde::Serialize) -> Reply {
    match serde_json::to_string_pretty(v) {
        Ok(s) => (StatusCode::OK, "application/json", s + "\n"),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode: {e}\n"),
        ),
    }
}

/// The metrics endpoint's reply: `registry` in the Prometheus text format.
pub fn metrics(registry: &prometheus_client::registry::Registry) -> Reply {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (StatusCode::OK, OPENMETRICS, body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding failed: {e}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_reads_and_refuses_other_methods() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let route: Route = Arc::new(|path| match path {
            "/a" => text(StatusCode::OK, "a\n"),
            _ => not_found(),
        });
        let server = tokio::spawn(serve(l, "test", route));
        let close = "Host: x\r\nConnection: close\r\n\r\n";
        let ok = exchange(addr, &format!("GET /a HTTP/1.1\r\n{close}")).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\na\n"), "{ok}");
        let missing = exchange(addr, &format!("GET /b HTTP/1.1\r\n{close}")).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(addr, &format!("POST /a HTTP/1.1\r\n{close}")).await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let junk = exchange(addr, "\x16\x03\x01junk\r\n\r\n").await;
        assert!(
            junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
            "{junk}"
        );
        server.abort();
    }
}

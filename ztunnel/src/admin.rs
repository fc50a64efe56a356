//! The small HTTP endpoints: admin (`/config_dump`, `/connections`, localhost only), metrics
//! (`/metrics`) and readiness (`/healthz/ready`). HTTP/1 with hyper, on the control runtime.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Serves `route(path)` on every connection of `listener`.
pub async fn serve_http(listener: TcpListener, route: Arc<dyn Fn(&str) -> Reply + Send + Sync>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let route = route.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let (status, ctype, body) = route(req.uri().path());
                let resp = Response::builder()
                    .status(status)
                    .header("content-type", ctype)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

pub fn not_found() -> Reply {
    (StatusCode::NOT_FOUND, "text/plain", "not found\n".into())
}

pub fn json(v: &impl serde::Serialize) -> Reply {
    match serde_json::to_string_pretty(v) {
        Ok(s) => (StatusCode::OK, "application/json", s + "\n"),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode: {e}\n"),
        ),
    }
}

//! The agent's `/metrics` and `/healthz` (readiness: the pod source has synced), on the
//! shared HTTP server.

use std::sync::Arc;

use ambient_common::http::{self, Reply, Status};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::source::Snapshot;

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    let route = move |path: &str| route(path, &registry, snapshots.borrow().synced);
    http::serve(listener, "metrics", Arc::new(route)).await
}

fn route(path: &str, registry: &Registry, synced: bool) -> Reply {
    match path {
        "/metrics" => http::metrics(registry),
        "/healthz" | "/healthz/ready" if synced => http::text(Status::OK, "ready\n"),
        "/healthz" | "/healthz/ready" => {
            http::text(Status::SERVICE_UNAVAILABLE, "pod source not synced\n")
        }
        _ => http::not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_pod_source() {
        let reg = Registry::default();
        assert_eq!(route("/healthz", &reg, true).0, Status::OK);
        assert_eq!(
            route("/healthz/ready", &reg, false).0,
            Status::SERVICE_UNAVAILABLE
        );
        assert_eq!(route("/metrics", &reg, false).0, Status::OK);
        assert_eq!(route("/", &reg, true).0, Status::NOT_FOUND);
    }
}

//! Istio-named TCP metrics, the live connection table behind `/connections`, and the access
//! log. A [`ConnGuard`] follows each proxied connection: created when source and destination
//! are known (opened counter), dropped when it ends (closed counter, bytes, one access-log
//! line).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::identity::Identity;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue, Serialize)]
#[allow(non_camel_case_types)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    source,
    destination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Outbound,
    Inbound,
    InboundPlaintext,
}

/// Istio's `response_flags`: `-` for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ResponseFlag {
    None,
    /// Denied by authorization policy or mTLS mode.
    Deny,
    /// Could not connect upstream.
    Connect,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "-",
            Self::Deny => "DENY",
            Self::Connect => "CONNECT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_service: String,
    pub request_protocol: String,
    pub connection_security_policy: String,
    pub response_flags: String,
}

/// The four Istio TCP counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
}

impl Metrics {
    /// Registers under the `istio` prefix (`istio_tcp_connections_opened_total`, ...).
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Self::default());
        let sub = registry.sub_registry_with_prefix("istio");
        sub.register(
            "tcp_connections_opened",
            "Connections opened",
            m.opened.clone(),
        );
        sub.register(
            "tcp_connections_closed",
            "Connections closed",
            m.closed.clone(),
        );
        sub.register(
            "tcp_sent_bytes",
            "Bytes sent towards the client (response direction)",
            m.sent.clone(),
        );
        sub.register(
            "tcp_received_bytes",
            "Bytes received from the client (request direction)",
            m.received.clone(),
        );
        m
    }
}

/// One side of a connection, as logged and shown.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub identity: Option<Identity>,
    pub app: Option<String>,
}

/// A live connection.
#[derive(Debug, Serialize)]
pub struct ConnInfo {
    pub id: u64,
    pub direction: Direction,
    pub src: Peer,
    pub dst: Peer,
    /// The destination service host when the client connected to a VIP.
    pub service: Option<String>,
    pub mtls: bool,
    pub start_unix_ms: u64,
    /// Bytes from the client (request direction).
    pub received: AtomicU64,
    /// Bytes towards the client (response direction).
    pub sent: AtomicU64,
    #[serde(skip)]
    started: Instant,
}

/// The table of live connections, the counters and the access-log switch.
#[derive(Debug)]
pub struct Tracker {
    metrics: Arc<Metrics>,
    live: Mutex<BTreeMap<u64, Arc<ConnInfo>>>,
    next: AtomicU64,
    access_log: bool,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, access_log: bool) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            live: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
            access_log,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts tracking a connection.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        src: Peer,
        dst: Peer,
        service: Option<String>,
        mtls: bool,
    ) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let info = Arc::new(ConnInfo {
            id,
            direction,
            src,
            dst,
            service,
            mtls,
            start_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            started: Instant::now(),
        });
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, info.clone());
        let g = ConnGuard {
            tracker: self.clone(),
            info,
            flag: ResponseFlag::None,
            error: None,
        };
        self.metrics.opened.get_or_create(&g.labels()).inc();
        g
    }

    pub fn live(&self) -> Vec<Arc<ConnInfo>> {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Ends tracking on drop.
#[derive(Debug)]
pub struct ConnGuard {
    tracker: Arc<Tracker>,
    pub info: Arc<ConnInfo>,
    flag: ResponseFlag,
    error: Option<String>,
}

fn or_unknown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "unknown".into())
}

impl ConnGuard {
    pub fn set_flag(&mut self, flag: ResponseFlag) {
        self.flag = flag;
    }

    pub fn set_error(&mut self, e: String) {
        self.error = Some(e);
    }

    fn labels(&self) -> ConnLabels {
        let i = &self.info;
        ConnLabels {
            reporter: match i.direction {
                Direction::Outbound => Reporter::source,
                _ => Reporter::destination,
            },
            source_workload: or_unknown(&i.src.workload),
            source_workload_namespace: or_unknown(&i.src.namespace),
            source_principal: i
                .src
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into()),
            source_app: or_unknown(&i.src.app),
            destination_workload: or_unknown(&i.dst.workload),
            destination_workload_namespace: or_unknown(&i.dst.namespace),
            destination_principal: i
                .dst
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into()),
            destination_app: or_unknown(&i.dst.app),
            destination_service: i.service.clone().unwrap_or_else(|| "unknown".into()),
            request_protocol: "tcp".into(),
            connection_security_policy: if i.mtls { "mutual_tls" } else { "unknown" }.into(),
            response_flags: self.flag.as_str().into(),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let labels = self.labels();
        let m = &self.tracker.metrics;
        let sent = self.info.sent.load(Ordering::Relaxed);
        let received = self.info.received.load(Ordering::Relaxed);
        m.closed.get_or_create(&labels).inc();
        m.sent.get_or_create(&labels).inc_by(sent);
        m.received.get_or_create(&labels).inc_by(received);
        self.tracker
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.info.id);
        if self.tracker.access_log {
            let i = &self.info;
            let fmt_addr = |a: &Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
            let fmt_id =
                |id: &Option<Identity>| id.as_ref().map(ToString::to_string).unwrap_or_default();
            tracing::info!(
                target: "access",
                conn = i.id,
                direction = ?i.direction,
                src.addr = %fmt_addr(&i.src.addr),
                src.workload = %i.src.workload.clone().unwrap_or_default(),
                src.namespace = %i.src.namespace.clone().unwrap_or_default(),
                src.identity = %fmt_id(&i.src.identity),
                dst.addr = %fmt_addr(&i.dst.addr),
                dst.workload = %i.dst.workload.clone().unwrap_or_default(),
                dst.namespace = %i.dst.namespace.clone().unwrap_or_default(),
                dst.identity = %fmt_id(&i.dst.identity),
                dst.service = %i.service.clone().unwrap_or_default(),
                mtls = i.mtls,
                response_flags = self.flag.as_str(),
                bytes_received = received,
                bytes_sent = sent,
                duration_ms = i.started.elapsed().as_millis() as u64,
                error = %self.error.clone().unwrap_or_default(),
                "connection complete"
            );
        }
    }
}

/// Renders the registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut s = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut s, registry);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_open_close_and_bytes_with_istio_names() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let t = Tracker::new(m, false);
        let src = Peer {
            workload: Some("client".into()),
            namespace: Some("a".into()),
            identity: Some(Identity::new("cluster.local", "a", "client")),
            ..Default::default()
        };
        let mut g = t.open(Direction::Inbound, src, Peer::default(), None, true);
        assert_eq!(t.live_count(), 1);
        g.info.received.fetch_add(100, Ordering::Relaxed);
        g.info.sent.fetch_add(7, Ordering::Relaxed);
        g.set_flag(ResponseFlag::Deny);
        drop(g);
        assert_eq!(t.live_count(), 0);
        let text = encode(&reg);
        for needle in [
            "istio_tcp_connections_opened_total{",
            "istio_tcp_connections_closed_total{",
            "istio_tcp_received_bytes_total{",
            "istio_tcp_sent_bytes_total{",
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/a/sa/client\"",
            "connection_security_policy=\"mutual_tls\"",
            "response_flags=\"DENY\"",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert!(text.contains("} 100"), "{text}");
    }
}

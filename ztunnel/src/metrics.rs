//! Istio-named TCP metrics, the live connection table behind `/connections`, and the access
//! log. A [`ConnGuard`] follows each proxied connection: created when source and destination
//! are known (opened counter), dropped when it ends (closed counter, bytes, one access-log
//! line).

use std::collections::{BTreeMap, HashSet};
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

/// One side of a connection, as the proxy describes it when it opens one.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub identity: Option<Identity>,
    pub app: Option<String>,
}

/// One side of a live connection, as logged and shown: its address and its workload's names,
/// which all connections of that workload share (see [`Tracker::open`]).
#[derive(Debug, Clone, Serialize)]
pub struct ConnPeer {
    pub addr: Option<SocketAddr>,
    #[serde(flatten)]
    pub names: Arc<PeerNames>,
}

/// A workload's names as shown for a connection.
#[derive(Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PeerNames {
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
    pub src: ConnPeer,
    pub dst: ConnPeer,
    /// The destination service host when the client connected to a VIP.
    pub service: Option<Arc<str>>,
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
    live: Mutex<Live>,
    next: AtomicU64,
    access_log: bool,
}

/// The live connections and the names they share. 10,000 connections of a few workloads
/// hold a few copies of their names, not 10,000 (about 0.5 KiB per connection otherwise).
#[derive(Debug, Default)]
struct Live {
    conns: BTreeMap<u64, Arc<ConnInfo>>,
    names: Interned<PeerNames>,
    services: Interned<str>,
}

/// Shared copies of values in use; unused ones are dropped when the set has doubled since the
/// last sweep (workloads come and go).
#[derive(Debug)]
struct Interned<T: ?Sized> {
    set: HashSet<Arc<T>>,
    sweep_at: usize,
}

/// Interned sets are not swept below this size.
const MIN_SWEEP: usize = 64;

impl<T: ?Sized> Default for Interned<T> {
    fn default() -> Self {
        Self {
            set: HashSet::new(),
            sweep_at: MIN_SWEEP,
        }
    }
}

impl<T: ?Sized + Eq + std::hash::Hash> Interned<T> {
    /// The shared copy of `v`.
    fn get<V: std::borrow::Borrow<T> + Into<Arc<T>>>(&mut self, v: V) -> Arc<T> {
        if let Some(a) = self.set.get(v.borrow()) {
            return a.clone();
        }
        if self.set.len() >= self.sweep_at {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.sweep_at = (self.set.len() * 2).max(MIN_SWEEP);
        }
        let a: Arc<T> = v.into();
        self.set.insert(a.clone());
        a
    }
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, access_log: bool) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            live: Mutex::new(Live::default()),
            next: AtomicU64::new(1),
            access_log,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Starts tracking a connection. The peers' names and the service are shared with the
    /// other live connections that have the same.
    pub fn open(
        self: &Arc<Self>,
        direction: Direction,
        src: Peer,
        dst: Peer,
        service: Option<String>,
        mtls: bool,
    ) -> ConnGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let split = |p: Peer| {
            (
                p.addr,
                PeerNames {
                    workload: p.workload,
                    namespace: p.namespace,
                    identity: p.identity,
                    app: p.app,
                },
            )
        };
        let ((src_addr, src_names), (dst_addr, dst_names)) = (split(src), split(dst));
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let src_names = live.names.get(src_names);
        let dst_names = live.names.get(dst_names);
        let service = service.map(|s| live.services.get(s));
        let info = Arc::new(ConnInfo {
            id,
            direction,
            src: ConnPeer {
                addr: src_addr,
                names: src_names,
            },
            dst: ConnPeer {
                addr: dst_addr,
                names: dst_names,
            },
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
        live.conns.insert(id, info.clone());
        drop(live);
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
            .conns
            .values()
            .cloned()
            .collect()
    }

    pub fn live_count(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }
}

/// Ends tracking on drop.
#[derive(Debug)]
pub struct ConnGuard {
    tracker: Arc<Tracker>,
    pub info: Arc<ConnInfo>,
    flag: ResponseFlag,
    /// Boxed: most connections have none, and the guard lives as long as the connection.
    error: Option<Box<str>>,
}

fn or_unknown(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "unknown".into())
}

impl ConnGuard {
    pub fn set_flag(&mut self, flag: ResponseFlag) {
        self.flag = flag;
    }

    pub fn set_error(&mut self, e: String) {
        self.error = Some(e.into_boxed_str());
    }

    fn labels(&self) -> ConnLabels {
        let i = &self.info;
        ConnLabels {
            reporter: match i.direction {
                Direction::Outbound => Reporter::source,
                _ => Reporter::destination,
            },
            source_workload: or_unknown(&i.src.names.workload),
            source_workload_namespace: or_unknown(&i.src.names.namespace),
            source_principal: i
                .src
                .names
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into()),
            source_app: or_unknown(&i.src.names.app),
            destination_workload: or_unknown(&i.dst.names.workload),
            destination_workload_namespace: or_unknown(&i.dst.names.namespace),
            destination_principal: i
                .dst
                .names
                .identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into()),
            destination_app: or_unknown(&i.dst.names.app),
            destination_service: i.service.as_deref().unwrap_or("unknown").to_owned(),
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
            .conns
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
                src.workload = %i.src.names.workload.clone().unwrap_or_default(),
                src.namespace = %i.src.names.namespace.clone().unwrap_or_default(),
                src.identity = %fmt_id(&i.src.names.identity),
                dst.addr = %fmt_addr(&i.dst.addr),
                dst.workload = %i.dst.names.workload.clone().unwrap_or_default(),
                dst.namespace = %i.dst.names.namespace.clone().unwrap_or_default(),
                dst.identity = %fmt_id(&i.dst.names.identity),
                dst.service = %i.service.as_deref().unwrap_or_default(),
                mtls = i.mtls,
                response_flags = self.flag.as_str(),
                bytes_received = received,
                bytes_sent = sent,
                duration_ms = i.started.elapsed().as_millis() as u64,
                error = %self.error.as_deref().unwrap_or_default(),
                "connection complete"
            );
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectedLabels {
    pub kind: &'static str,
    pub effect: &'static str,
}

/// What ztunnel refused or set aside to keep its promises against a hostile pod, node
/// process or object, under the `ztunnel` prefix. Cheap to clone (the families are shared).
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    /// Outbound connections refused before any upstream connect, by reason
    /// (`node_local`: a loopback, link-local, multicast or node address).
    pub outbound: Family<ReasonLabels, Counter>,
    /// Cluster objects set aside when they first fail (`kind`, what was done instead).
    pub config_rejected: Family<RejectedLabels, Counter>,
    /// Cluster objects set aside in the current view.
    pub config_rejected_now: Family<RejectedLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Inbound HBONE connections closed before their TLS handshake finished, by reason
    /// (`per_source_limit`, `total_limit`, `timeout`).
    pub handshakes: Family<ReasonLabels, Counter>,
    /// Agent-socket peers and pushes refused, by reason (`peer_uid`, `contradicts_source`, ...).
    pub agent: Family<ReasonLabels, Counter>,
}

impl Refusals {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("ztunnel");
        sub.register(
            "outbound_refused",
            "Outbound connections refused before connecting, by reason",
            self.outbound.clone(),
        );
        sub.register(
            "config_rejected",
            "Cluster objects set aside (skipped or replaced by a fail-closed stand-in) when first seen failing",
            self.config_rejected.clone(),
        );
        sub.register(
            "config_rejected_objects",
            "Cluster objects set aside in the current view",
            self.config_rejected_now.clone(),
        );
        sub.register(
            "hbone_handshakes_refused",
            "Inbound HBONE connections closed before the TLS handshake finished, by reason",
            self.handshakes.clone(),
        );
        sub.register(
            "agent_refused",
            "Agent-socket connections and workload pushes refused, by reason",
            self.agent.clone(),
        );
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

    fn workload_peer(name: &str) -> Peer {
        Peer {
            addr: Some("10.0.0.1:5000".parse().unwrap()),
            workload: Some(name.into()),
            namespace: Some("a".into()),
            identity: Some(Identity::new("cluster.local", "a", name)),
            app: Some("web".into()),
        }
    }

    #[test]
    fn connections_of_a_workload_share_its_names_and_show_them_in_full() {
        let t = Tracker::new(Arc::new(Metrics::default()), false);
        let svc = || Some("db.a.svc.cluster.local".to_owned());
        let g1 = t.open(
            Direction::Outbound,
            workload_peer("client"),
            Peer::default(),
            svc(),
            true,
        );
        let g2 = t.open(
            Direction::Outbound,
            workload_peer("client"),
            Peer::default(),
            svc(),
            true,
        );
        assert!(Arc::ptr_eq(&g1.info.src.names, &g2.info.src.names));
        assert!(Arc::ptr_eq(
            g1.info.service.as_ref().unwrap(),
            g2.info.service.as_ref().unwrap()
        ));
        let v = serde_json::to_value(&*g1.info).unwrap();
        assert_eq!(
            v["src"],
            serde_json::json!({
                "addr": "10.0.0.1:5000",
                "workload": "client",
                "namespace": "a",
                "identity": "spiffe://cluster.local/ns/a/sa/client",
                "app": "web",
            })
        );
        assert_eq!(
            v["dst"],
            serde_json::json!({
                "addr": null, "workload": null, "namespace": null, "identity": null, "app": null,
            })
        );
        assert_eq!(v["service"], "db.a.svc.cluster.local");
    }

    #[test]
    fn names_of_closed_connections_are_swept() {
        let t = Tracker::new(Arc::new(Metrics::default()), false);
        for i in 0..10 * MIN_SWEEP {
            let g = t.open(
                Direction::Inbound,
                workload_peer(&format!("pod-{i}")),
                Peer::default(),
                None,
                false,
            );
            drop(g);
        }
        let live = t.live.lock().unwrap();
        assert!(
            live.names.set.len() <= 2 * MIN_SWEEP,
            "{}",
            live.names.set.len()
        );
    }
}

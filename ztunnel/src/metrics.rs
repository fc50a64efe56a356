//! Istio-named TCP metrics, the live connection table behind `/connections`, and the access
//! log. A [`ConnGuard`] follows each proxied connection: created when source and destination
//! are known (opened counter), dropped when it ends (closed counter, bytes, one access-log
//! line).

use ambient_common::sync::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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

/// The labels of Istio's TCP metrics, named and filled as Istio's ztunnel does, so that
/// Istio's dashboards and Kiali work unchanged (`install/manifests/monitoring/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReporterLabels {
    pub reporter: Reporter,
}

/// The four Istio TCP counters and the open-socket gauge.
#[derive(Debug, Default)]
pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent: Family<ConnLabels, Counter>,
    pub received: Family<ConnLabels, Counter>,
    /// Proxied connections open now, by reporter (as Istio's ztunnel reports them).
    pub sockets_open: Family<ReporterLabels, prometheus_client::metrics::gauge::Gauge>,
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
        sub.register(
            "tcp_sockets_open",
            "The current number of open TCP sockets",
            m.sockets_open.clone(),
        );
        m
    }
}

/// One side of a connection, as the proxy describes it when it opens one.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub addr: Option<SocketAddr>,
    /// The workload (a Deployment's name, not its pod's).
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub identity: Option<Identity>,
    /// Canonical service (Istio's `app` in telemetry).
    pub app: Option<String>,
    /// Canonical revision (Istio's `version`).
    pub version: Option<String>,
    /// Locality (`unknown` in metrics when not known).
    pub region: Option<String>,
    pub zone: Option<String>,
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
    pub version: Option<String>,
    /// Locality (`unknown` in metrics when not known).
    pub region: Option<String>,
    pub zone: Option<String>,
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
    /// The cluster's id (`--cluster-id`): `source_cluster`/`destination_cluster` of known
    /// workloads.
    cluster_id: String,
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
    pub fn new(metrics: Arc<Metrics>, access_log: bool, cluster_id: &str) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            live: Mutex::new(Live::default()),
            next: AtomicU64::new(1),
            access_log,
            cluster_id: cluster_id.to_owned(),
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
                    version: p.version,
                    region: p.region,
                    zone: p.zone,
                },
            )
        };
        let ((src_addr, src_names), (dst_addr, dst_names)) = (split(src), split(dst));
        let mut live = self.live.lock();
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
        let labels = g.labels();
        self.metrics.opened.get_or_create(&labels).inc();
        self.metrics
            .sockets_open
            .get_or_create(&ReporterLabels {
                reporter: labels.reporter,
            })
            .inc();
        g
    }

    pub fn live(&self) -> Vec<Arc<ConnInfo>> {
        self.live.lock().conns.values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.live.lock().conns.len()
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
        let principal = |n: &PeerNames| {
            n.identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into())
        };
        let cluster = |n: &PeerNames| {
            if n.workload.is_some() {
                self.tracker.cluster_id.clone()
            } else {
                "unknown".into()
            }
        };
        let (src, dst) = (&*i.src.names, &*i.dst.names);
        // A service host is `<name>.<namespace>.svc.<cluster domain>`.
        let (service, service_name, service_namespace) = match i.service.as_deref() {
            Some(host) => {
                let mut parts = host.split('.');
                let name = parts.next().unwrap_or("unknown").to_owned();
                let ns = parts.next().unwrap_or("unknown").to_owned();
                (host.to_owned(), name, ns)
            }
            None => ("unknown".into(), "unknown".into(), "unknown".into()),
        };
        ConnLabels {
            reporter: match i.direction {
                Direction::Outbound => Reporter::source,
                _ => Reporter::destination,
            },
            source_workload: or_unknown(&src.workload),
            source_canonical_service: or_unknown(&src.app),
            source_canonical_revision: or_unknown(&src.version),
            source_workload_namespace: or_unknown(&src.namespace),
            source_principal: principal(src),
            source_app: or_unknown(&src.app),
            source_version: or_unknown(&src.version),
            source_cluster: cluster(src),
            destination_service: service,
            destination_service_namespace: service_namespace,
            destination_service_name: service_name,
            destination_workload: or_unknown(&dst.workload),
            destination_canonical_service: or_unknown(&dst.app),
            destination_canonical_revision: or_unknown(&dst.version),
            destination_workload_namespace: or_unknown(&dst.namespace),
            destination_principal: principal(dst),
            destination_app: or_unknown(&dst.app),
            destination_version: or_unknown(&dst.version),
            destination_cluster: cluster(dst),
            request_protocol: "tcp".into(),
            response_flags: self.flag.as_str().into(),
            connection_security_policy: if i.mtls { "mutual_tls" } else { "unknown" }.into(),
            source_region: or_unknown(&src.region),
            source_zone: or_unknown(&src.zone),
            destination_region: or_unknown(&dst.region),
            destination_zone: or_unknown(&dst.zone),
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
        m.sockets_open
            .get_or_create(&ReporterLabels {
                reporter: labels.reporter,
            })
            .dec();
        m.sent.get_or_create(&labels).inc_by(sent);
        m.received.get_or_create(&labels).inc_by(received);
        self.tracker.live.lock().conns.remove(&self.info.id);
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    tag: String,
}

/// `istio_build{component="ztunnel",tag=<version>} 1`, as Istio's components export it
/// (dashboards list the versions running with it).
pub fn register_build(registry: &mut Registry) {
    let build = Family::<BuildLabels, prometheus_client::metrics::gauge::Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            component: "ztunnel".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
    registry.sub_registry_with_prefix("istio").register(
        "build",
        "Istio component build info",
        build,
    );
}

/// What `/proc/self/stat` says about the process (the fields the `process_*` metrics use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// User and system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    pub threads: u64,
    /// Start, in clock ticks after boot.
    pub start_ticks: u64,
    pub virtual_bytes: u64,
    pub resident_pages: u64,
}

/// Parses `/proc/<pid>/stat`. The command name is in parentheses and may hold spaces and
/// parentheses itself: the fields start after the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        cpu_ticks: num(14)? + num(15)?,
        threads: num(20)?,
        start_ticks: num(22)?,
        virtual_bytes: num(23)?,
        resident_pages: num(24)?,
    })
}

/// Linux's USER_HZ, the unit of `/proc` CPU times: 100 on every architecture it runs on.
const USER_HZ: f64 = 100.0;
const PAGE_SIZE: u64 = 4096;

/// The standard `process_*` metrics of Prometheus clients (CPU, memory, file descriptors,
/// threads, start time), read from `/proc/self` at each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(st) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .as_deref()
            .and_then(parse_proc_stat)
        else {
            return Ok(());
        };
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).ok();
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse::<u64>().ok())
            });
        let cpu = ConstCounter::new(st.cpu_ticks as f64 / USER_HZ);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            cpu.metric_type(),
        )?)?;
        let mut gauge = |name: &str, help: &str, v: f64| -> Result<(), std::fmt::Error> {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            (st.resident_pages * PAGE_SIZE) as f64,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            st.virtual_bytes as f64,
        )?;
        gauge(
            "process_threads",
            "Number of OS threads.",
            st.threads as f64,
        )?;
        if let Some(b) = boot {
            gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                b as f64 + st.start_ticks as f64 / USER_HZ,
            )?;
        }
        if let Some(n) = fds {
            // Less the one read_dir itself held open.
            gauge(
                "process_open_fds",
                "Number of open file descriptors.",
                n.saturating_sub(1) as f64,
            )?;
        }
        if let Some(n) = max_fds {
            gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                n as f64,
            )?;
        }
        Ok(())
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
        let t = Tracker::new(m, false, "Kubernetes");
        let src = Peer {
            workload: Some("client".into()),
            namespace: Some("a".into()),
            identity: Some(Identity::new("cluster.local", "a", "client")),
            ..Default::default()
        };
        let mut g = t.open(Direction::Inbound, src, Peer::default(), None, true);
        assert_eq!(t.live_count(), 1);
        assert!(
            encode(&reg).contains("istio_tcp_sockets_open{reporter=\"destination\"} 1"),
            "{}",
            encode(&reg)
        );
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
        assert!(
            text.contains("istio_tcp_sockets_open{reporter=\"destination\"} 0"),
            "{text}"
        );
    }

    /// The label set of Istio's ztunnel, each filled as Istio fills it: canonical names as
    /// app/version, the cluster for known workloads, the service split into name and
    /// namespace, `unknown` for what is not known.
    #[test]
    fn labels_are_istios_set_with_istios_values() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let t = Tracker::new(m, false, "cluster-7");
        let src = Peer {
            workload: Some("web".into()),
            namespace: Some("shop".into()),
            identity: Some(Identity::new("cluster.local", "shop", "web")),
            app: Some("storefront".into()),
            version: Some("v2".into()),
            region: Some("us-east1".into()),
            ..Default::default()
        };
        let g = t.open(
            Direction::Outbound,
            src,
            Peer::default(),
            Some("db.data.svc.cluster.local".into()),
            true,
        );
        drop(g);
        let text = encode(&reg);
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap();
        let got: Vec<(&str, &str)> = line[line.find('{').unwrap() + 1..line.rfind('}').unwrap()]
            .split("\",")
            .map(|kv| {
                let (k, v) = kv.split_once("=\"").unwrap();
                (k, v.trim_end_matches('"'))
            })
            .collect();
        let want = [
            ("reporter", "source"),
            ("source_workload", "web"),
            ("source_canonical_service", "storefront"),
            ("source_canonical_revision", "v2"),
            ("source_workload_namespace", "shop"),
            ("source_principal", "spiffe://cluster.local/ns/shop/sa/web"),
            ("source_app", "storefront"),
            ("source_version", "v2"),
            ("source_cluster", "cluster-7"),
            ("destination_service", "db.data.svc.cluster.local"),
            ("destination_service_namespace", "data"),
            ("destination_service_name", "db"),
            ("destination_workload", "unknown"),
            ("destination_canonical_service", "unknown"),
            ("destination_canonical_revision", "unknown"),
            ("destination_workload_namespace", "unknown"),
            ("destination_principal", "unknown"),
            ("destination_app", "unknown"),
            ("destination_version", "unknown"),
            ("destination_cluster", "unknown"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
            ("connection_security_policy", "mutual_tls"),
            ("source_region", "us-east1"),
            ("source_zone", "unknown"),
            ("destination_region", "unknown"),
            ("destination_zone", "unknown"),
        ];
        assert_eq!(got, want, "{line}");
    }

    #[test]
    fn proc_stat_is_read_after_the_command_name() {
        let line = "4242 (zt (a) b) S 1 4242 4242 0 -1 4194560 1770 0 0 0 150 25 0 0 20 0 \
                    7 0 123456 98304000 2048 18446744073709551615";
        assert_eq!(
            parse_proc_stat(line),
            Some(ProcStat {
                cpu_ticks: 175,
                threads: 7,
                start_ticks: 123456,
                virtual_bytes: 98304000,
                resident_pages: 2048,
            })
        );
        assert_eq!(parse_proc_stat("4242 (zt) S 1 2"), None);
        assert_eq!(parse_proc_stat("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_proc_stat(&own).unwrap().threads >= 1);
    }

    #[test]
    fn process_and_build_metrics_are_exported() {
        let mut reg = Registry::default();
        register_build(&mut reg);
        reg.register_collector(Box::new(ProcessCollector));
        let text = encode(&reg);
        for needle in [
            "istio_build{component=\"ztunnel\",tag=\"",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
            "process_threads ",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }

    fn workload_peer(name: &str) -> Peer {
        Peer {
            addr: Some("10.0.0.1:5000".parse().unwrap()),
            workload: Some(name.into()),
            namespace: Some("a".into()),
            identity: Some(Identity::new("cluster.local", "a", name)),
            app: Some("web".into()),
            version: Some("v1".into()),
            region: None,
            zone: None,
        }
    }

    #[test]
    fn connections_of_a_workload_share_its_names_and_show_them_in_full() {
        let t = Tracker::new(Arc::new(Metrics::default()), false, "Kubernetes");
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
                "version": "v1",
                "region": null,
                "zone": null,
            })
        );
        assert_eq!(
            v["dst"],
            serde_json::json!({
                "addr": null, "workload": null, "namespace": null, "identity": null, "app": null,
                "version": null, "region": null, "zone": null,
            })
        );
        assert_eq!(v["service"], "db.a.svc.cluster.local");
    }

    #[test]
    fn names_of_closed_connections_are_swept() {
        let t = Tracker::new(Arc::new(Metrics::default()), false, "Kubernetes");
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
        let live = t.live.lock();
        assert!(
            live.names.set.len() <= 2 * MIN_SWEEP,
            "{}",
            live.names.set.len()
        );
    }
}

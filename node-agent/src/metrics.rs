//! The agent's Prometheus metrics, under the `ambient_agent` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub enrolments: Counter,
    pub releases: Counter,
    pub failures: Family<ReasonLabels, Counter>,
    pub reconcile_runs: Counter,
    pub drift_repairs: Counter,
    pub enrolled_pods: Gauge,
    /// Ambient pods the agent cannot capture on this node (see `bypass`).
    pub uncapturable_pods: Gauge,
    pub requests: Family<OpLabels, Counter>,
    pub add_duration: Histogram,
    pub ztunnel_connected: Gauge,
    /// Attachments adopted from the runtime's cached ADD results.
    pub adopted: Counter,
    /// 1 for the redirection backend in use.
    pub backend: Family<BackendLabels, Gauge>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            enrolments: Counter::default(),
            releases: Counter::default(),
            failures: Family::default(),
            reconcile_runs: Counter::default(),
            drift_repairs: Counter::default(),
            enrolled_pods: Gauge::default(),
            uncapturable_pods: Gauge::default(),
            requests: Family::default(),
            add_duration: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            ztunnel_connected: Gauge::default(),
            adopted: Counter::default(),
            backend: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("ambient_agent");
        r.register(
            "enrolments",
            "Pods enrolled (redirection installed)",
            m.enrolments.clone(),
        );
        r.register(
            "releases",
            "Pods released (redirection removed)",
            m.releases.clone(),
        );
        r.register(
            "failures",
            "Failed operations by reason",
            m.failures.clone(),
        );
        r.register(
            "reconcile_runs",
            "Reconcile passes",
            m.reconcile_runs.clone(),
        );
        r.register(
            "drift_repairs",
            "Kernel drift found and repaired",
            m.drift_repairs.clone(),
        );
        r.register(
            "enrolled_pods",
            "Pods currently enrolled",
            m.enrolled_pods.clone(),
        );
        r.register(
            "uncapturable_pods",
            "Ambient pods whose traffic cannot be captured on this node (no address to redirect to, or an eBPF dataplane that may bypass netfilter); see node-agent pods",
            m.uncapturable_pods.clone(),
        );
        r.register(
            "cni_requests",
            "Plugin requests by operation",
            m.requests.clone(),
        );
        r.register(
            "add_duration_seconds",
            "Time to handle a CNI ADD, from request to reply",
            m.add_duration.clone(),
        );
        r.register(
            "ztunnel_connected",
            "1 while the agent holds a connection to ztunnel",
            m.ztunnel_connected.clone(),
        );
        r.register(
            "adopted",
            "Attachments adopted from the runtime's cached ADD results (pods running before the agent)",
            m.adopted.clone(),
        );
        r.register(
            "backend",
            "1 for the redirection backend in use (nftables, iptables-legacy or iptables-nft)",
            m.backend.clone(),
        );
        m
    }

    pub fn backend_info(&self, name: &str) {
        self.backend
            .get_or_create(&BackendLabels {
                backend: name.to_owned(),
            })
            .set(1);
    }

    pub fn fail(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

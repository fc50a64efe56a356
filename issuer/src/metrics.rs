//! The issuer's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// `impersonated` (a node proxy for a workload) or `own` (a workload for itself).
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub issued: Family<KindLabel, Counter>,
    pub refused: Family<ReasonLabel, Counter>,
    /// From the request's arrival to its answer (signed or refused).
    pub duration: Histogram,
    pub reloads: Family<ResultLabel, Counter>,
    pub pods: Gauge,
    pub roots: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            issued: Family::default(),
            refused: Family::default(),
            duration: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            reloads: Family::default(),
            pods: Gauge::default(),
            roots: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "issuer_certificates_issued",
            "Workload certificates signed",
            self.issued.clone(),
        );
        r.register(
            "issuer_requests_refused",
            "Certificate requests refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "issuer_request_duration_seconds",
            "Time from a certificate request's arrival to its answer",
            self.duration.clone(),
        );
        r.register(
            "issuer_ca_reloads",
            "Reloads of the CA directory after its files changed",
            self.reloads.clone(),
        );
        r.register(
            "issuer_pods",
            "Pods in the issuer's view",
            self.pods.clone(),
        );
        r.register(
            "issuer_trust_roots",
            "Roots in the published trust bundle",
            self.roots.clone(),
        );
    }

    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}

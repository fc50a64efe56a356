//! What ztunnel knows about the cluster: workloads (pod IP -> node, namespace, service
//! account, ambient or not), services (VIP -> endpoints), authorization policies and mTLS
//! modes. Two sources feed it behind one interface: the manifest directory (`manifest`, all
//! pods of the cluster) and the node agent's push of local workloads (`agent`). Readers take
//! an immutable [`State`] snapshot: a new cluster view rebuilds it; an agent push changes only
//! the entries its workload touches (copy-on-write of the shared snapshot).

mod agent;
pub mod kube;
mod manifest;

use ambient_common::sync::RwLock;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ambient_common::ztunnel_api::LocalWorkload;
use serde::Serialize;

pub use agent::{
    bind_agent_socket, bind_agent_socket_std, handle_request, serve_agent, AgentError, AgentPolicy,
};
pub use manifest::{
    load as load_manifests, parse_manifests, poll_manifests, ManifestError, ManifestState,
    RejectEffect, Rejected,
};

use crate::config::MtlsMode;
use crate::identity::Identity;
use crate::metrics::{Refusals, RejectedLabels};
use crate::policy::AuthorizationPolicy;

/// Where a workload was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadSource {
    Agent,
    Manifest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// In the mesh: reached through HBONE.
    pub ambient: bool,
    /// Its node's agent reports its redirection installed (the pod annotation
    /// `ambient.istio.io/redirection: enabled`; a push from this node's agent).
    pub reported: bool,
    pub source: WorkloadSource,
    /// How telemetry names it.
    pub telemetry: TelemetryNames,
}

/// How Istio's telemetry names a workload: its controller (a Deployment, not the pod) and
/// its canonical service and revision (from the pod's labels). Empty fields fall back to the
/// pod's name and `latest`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TelemetryNames {
    pub workload: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    /// Locality (Istio's `istio-locality` pod label; empty when not given).
    pub region: String,
    pub zone: String,
}

impl TelemetryNames {
    pub fn of(pod: &ambient_common::manifest::Pod) -> Self {
        let (region, zone) = pod.locality();
        Self {
            workload: pod.workload_name(),
            canonical_service: pod.canonical_service(),
            canonical_revision: pod.canonical_revision(),
            region: region.unwrap_or_default(),
            zone: zone.unwrap_or_default(),
        }
    }
}

impl Workload {
    /// The workload name for telemetry (the controller's; the pod's when unknown).
    pub fn workload_name(&self) -> &str {
        non_empty(&self.telemetry.workload).unwrap_or(&self.name)
    }

    /// Istio's canonical service (the workload name when no label says).
    pub fn canonical_service(&self) -> &str {
        non_empty(&self.telemetry.canonical_service).unwrap_or_else(|| self.workload_name())
    }

    /// Istio's canonical revision (`latest` when no label says).
    pub fn canonical_revision(&self) -> &str {
        non_empty(&self.telemetry.canonical_revision).unwrap_or("latest")
    }

    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &self.namespace, &self.service_account)
    }

    fn from_agent(w: &LocalWorkload) -> Self {
        Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account.clone()
            },
            node: w.node.clone(),
            ips: w.ips.clone(),
            labels: BTreeMap::new(),
            ambient: true,
            source: WorkloadSource::Agent,
            reported: true,
            telemetry: TelemetryNames::default(),
        }
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A service port and where it leads on an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    /// Port by name, from an EndpointSlice; empty when derived from the service's selector.
    pub ports: BTreeMap<String, u16>,
}

#[derive(Debug, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    #[serde(skip)]
    next: AtomicUsize,
}

impl Clone for Service {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            vips: self.vips.clone(),
            ports: self.ports.clone(),
            endpoints: self.endpoints.clone(),
            next: AtomicUsize::new(0),
        }
    }
}

impl PartialEq for Service {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name
            && self.namespace == o.namespace
            && self.vips == o.vips
            && self.ports == o.ports
            && self.endpoints == o.endpoints
    }
}

impl Service {
    pub fn new(
        name: String,
        namespace: String,
        vips: Vec<IpAddr>,
        ports: Vec<ServicePort>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        Self {
            name,
            namespace,
            vips,
            ports,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// `<name>.<namespace>.svc` (the label Istio uses for destination_service).
    pub fn host(&self) -> String {
        format!("{}.{}.svc", self.name, self.namespace)
    }

    fn target_port(&self, sp: &ServicePort, ep: &Endpoint) -> Option<u16> {
        if !ep.ports.is_empty() {
            if let Some(p) = ep.ports.get(&sp.name) {
                return Some(*p);
            }
            if ep.ports.len() == 1 && self.ports.len() == 1 {
                return ep.ports.values().next().copied();
            }
        }
        match &sp.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(_) => None,
        }
    }

    /// Picks a ready endpoint for `port` (round robin) and returns its address.
    pub fn pick(&self, port: u16) -> Option<SocketAddr> {
        let sp = self.ports.iter().find(|p| p.port == port)?;
        let candidates: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| self.target_port(sp, e).map(|p| SocketAddr::new(e.ip, p)))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % candidates.len();
        Some(candidates[i])
    }
}

/// mTLS mode settings from PeerAuthentication objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub mode: Option<MtlsMode>,
}

/// An immutable view for the data plane: the cluster source's indexes, shared by every
/// view built on the same source, with the agent's workloads laid over them. An agent push
/// changes the current view in place (a copy only while a reader still holds it), at the
/// cost of the pushed workload alone.
#[derive(Debug, Default, Clone)]
pub struct State {
    base: Arc<Base>,
    /// The IPs whose owner is not the base's: the agent's workloads' IPs, and those of base
    /// workloads an agent entry hides (the next claimer still shown, or nobody).
    by_ip: HashMap<IpAddr, Option<Arc<Workload>>>,
    /// Base workloads (indexes) an agent entry replaces, with how many entries do.
    hidden: HashMap<usize, u32>,
    /// The agent's workloads, by uid.
    agent: BTreeMap<String, Arc<Workload>>,
    /// The agent's workloads (uids) claiming each IP; the last uid owns it.
    agent_claims: HashMap<IpAddr, BTreeSet<String>>,
}

impl State {
    pub fn workload(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        match self.by_ip.get(&ip) {
            Some(owner) => owner.as_ref(),
            None => self.base.by_ip.get(&ip),
        }
    }

    /// An ambient workload on `node` with this IP.
    pub fn local_workload(&self, ip: IpAddr, node: &str) -> Option<&Arc<Workload>> {
        self.workload(ip).filter(|w| w.ambient && w.node == node)
    }

    pub fn service(&self, vip: IpAddr) -> Option<&Arc<Service>> {
        self.base.services.get(&vip)
    }

    /// Every workload shown: the cluster source's not replaced by the agent, then the
    /// agent's.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.base
            .workloads
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.hidden.contains_key(i))
            .map(|(_, w)| w)
            .chain(self.agent.values())
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.base.service_list
    }

    pub fn policies(&self) -> &[Arc<AuthorizationPolicy>] {
        &self.base.policies
    }

    /// The effective mTLS mode for a namespace: its PeerAuthentication, else the root
    /// namespace's, else `default`.
    pub fn mtls_mode(&self, ns: &str, root_ns: &str, default: MtlsMode) -> MtlsMode {
        let find = |n: &str| {
            self.base
                .peer_auth
                .iter()
                .filter(|p| p.namespace == n)
                .find_map(|p| p.mode)
        };
        find(ns).or_else(|| find(root_ns)).unwrap_or(default)
    }
}

struct Inner {
    manifest: ManifestState,
    /// The manifest's part of the state, indexed once per manifest change and shared by
    /// every state built on it: an agent push settles its pod's IPs, nothing else.
    base: Arc<Base>,
    agent: BTreeMap<String, Workload>,
    /// The agent's workloads as shown: with the base's labels, and the base entry each one
    /// hides. Kept per uid, so a push merges one workload, not all of them.
    overlay: BTreeMap<String, Overlaid>,
    state: Arc<State>,
    /// The agent's workloads the cluster source does not know yet, since when.
    unconfirmed: HashMap<String, std::time::Instant>,
    /// Whether pushes are checked against a cluster source (there is one).
    cross_check: bool,
    /// Whether another node's pod is in the mesh only once its node reports it captured.
    require_report: bool,
    /// Whether the cluster source has delivered a state yet (the API may take a while):
    /// unconfirmed pushes do not age before it has.
    source_seen: bool,
}

struct Overlaid {
    workload: Arc<Workload>,
    hides: Option<usize>,
}

impl Overlaid {
    /// An agent workload replaces the base's entry of the same pod (same uid, else the
    /// current owner of one of its IPs) and takes its labels.
    fn new(base: &Base, uid: &str, w: &Workload) -> Self {
        let mut w = w.clone();
        let hides = base.by_uid.get(uid).copied().or_else(|| {
            w.ips
                .iter()
                .find_map(|ip| base.claims.get(ip).and_then(|c| c.last().copied()))
        });
        if let Some(i) = hides {
            w.labels = base.workloads[i].labels.clone();
            w.telemetry = base.workloads[i].telemetry.clone();
        }
        Self {
            workload: Arc::new(w),
            hides,
        }
    }
}

impl Inner {
    fn overlay_all(&mut self) {
        self.overlay = self
            .agent
            .iter()
            .map(|(uid, w)| (uid.clone(), Overlaid::new(&self.base, uid, w)))
            .collect();
    }
}

/// What the cluster source alone contributes to [`State`].
#[derive(Debug, Default)]
struct Base {
    /// One per uid (the last listed wins), in uid order.
    workloads: Vec<Arc<Workload>>,
    by_uid: HashMap<String, usize>,
    /// Every workload (index) claiming an IP, in order; the last one owns it.
    claims: HashMap<IpAddr, Vec<usize>>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    services: HashMap<IpAddr, Arc<Service>>,
    service_list: Vec<Arc<Service>>,
    policies: Vec<Arc<AuthorizationPolicy>>,
    peer_auth: Vec<PeerAuthentication>,
}

impl Base {
    fn new(m: &ManifestState) -> Self {
        let by_uid_sorted: BTreeMap<&str, &Workload> =
            m.workloads.iter().map(|w| (w.uid.as_str(), w)).collect();
        let mut base = Base {
            policies: m.policies.iter().cloned().map(Arc::new).collect(),
            peer_auth: m.peer_auth.clone(),
            ..Default::default()
        };
        for (i, w) in by_uid_sorted.into_values().enumerate() {
            let w = Arc::new(w.clone());
            base.by_uid.insert(w.uid.clone(), i);
            for ip in &w.ips {
                base.claims.entry(*ip).or_default().push(i);
                base.by_ip.insert(*ip, w.clone());
            }
            base.workloads.push(w);
        }
        for s in &m.services {
            let s = Arc::new(s.clone());
            for vip in &s.vips {
                base.services.insert(*vip, s.clone());
            }
            base.service_list.push(s);
        }
        base
    }
}

/// How an agent push compares with the cluster source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushCheck {
    /// The source knows the pod, with the same namespace, name, service account and node,
    /// and none of its IPs belongs to another pod.
    Confirmed,
    /// The source does not know the pod yet and nothing contradicts the push.
    Unknown,
    /// The source says otherwise. `may_settle`: the contradiction is one the source may
    /// resolve in a moment (an IP still listed for another pod of this node, which a new
    /// pod may reuse; a recreated sandbox's new IP); otherwise it never will.
    Contradicts { reason: String, may_settle: bool },
}

impl Base {
    /// Checks a pushed workload (already normalised: default service account, this node)
    /// against the cluster source.
    fn check(&self, w: &Workload, node: &str) -> PushCheck {
        let known = self.by_uid.get(&w.uid).map(|&i| &self.workloads[i]);
        if let Some(s) = known {
            let id = format!("{}/{}", s.namespace, s.name);
            let differs = |what: &str, src: &str, pushed: &str| {
                PushCheck::Contradicts {
                reason: format!(
                    "pod {} (uid {}) has {what} {src:?} in the cluster source, the push says {pushed:?}",
                    id, w.uid
                ),
                may_settle: false,
            }
            };
            if s.namespace != w.namespace || s.name != w.name {
                return differs("name", &id, &format!("{}/{}", w.namespace, w.name));
            }
            if s.service_account != w.service_account {
                return differs("service account", &s.service_account, &w.service_account);
            }
            if !s.node.is_empty() && s.node != node {
                return differs("node", &s.node, node);
            }
            if let Some(ip) = w
                .ips
                .iter()
                .find(|ip| !s.ips.is_empty() && !s.ips.contains(ip))
            {
                return PushCheck::Contradicts {
                    reason: format!(
                        "pod {id} has IPs {:?} in the cluster source, not {ip}",
                        s.ips
                    ),
                    may_settle: true,
                };
            }
        }
        for ip in &w.ips {
            let other = self
                .claims
                .get(ip)
                .into_iter()
                .flatten()
                .map(|&j| &self.workloads[j])
                .find(|o| o.uid != w.uid);
            if let Some(o) = other {
                return PushCheck::Contradicts {
                    reason: format!(
                        "{ip} belongs to pod {}/{} (service account {}, node {:?}) in the cluster source",
                        o.namespace, o.name, o.service_account, o.node
                    ),
                    may_settle: o.node == node,
                };
            }
        }
        if known.is_some() {
            PushCheck::Confirmed
        } else {
            PushCheck::Unknown
        }
    }
}

/// The store; cheap to share.
pub struct Store {
    node: String,
    trust_domain: String,
    inner: RwLock<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
    refusals: Refusals,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(node: &str, trust_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            node: node.to_owned(),
            trust_domain: trust_domain.to_owned(),
            inner: RwLock::new(Inner {
                manifest: ManifestState::default(),
                base: Arc::default(),
                agent: BTreeMap::new(),
                overlay: BTreeMap::new(),
                state: Arc::new(State::default()),
                unconfirmed: HashMap::new(),
                cross_check: false,
                require_report: false,
                source_seen: false,
            }),
            changed: tokio::sync::watch::channel(0).0,
            refusals: Refusals::default(),
        })
    }

    /// The refusal counters (registered by the app; the proxy and the agent socket count
    /// into them too).
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn snapshot(&self) -> Arc<State> {
        self.inner.read().state.clone()
    }

    /// Notified (with a generation number) after every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Applies `f`, then rebuilds the state (a new cluster view, or the agent's whole set).
    fn update(&self, f: impl FnOnce(&mut Inner)) {
        self.update_in_place(|inner| {
            f(inner);
            inner.state = Arc::new(build(&inner.base, &inner.overlay));
        });
    }

    /// Applies `f`, which keeps the state current itself.
    fn update_in_place(&self, f: impl FnOnce(&mut Inner)) {
        let mut inner = self.inner.write();
        f(&mut inner);
        drop(inner);
        self.changed.send_modify(|g| *g += 1);
    }

    /// The state the cluster source (directory or API) last set.
    pub fn manifest_state(&self) -> ManifestState {
        self.inner.read().manifest.clone()
    }

    pub fn set_manifest(&self, mut m: ManifestState) {
        self.update(|i| {
            if i.require_report {
                demote_unreported(&mut m, &self.node);
            }
            self.report_rejected(&i.manifest.rejected, &m.rejected);
            i.base = Arc::new(Base::new(&m));
            i.manifest = m;
            if !i.source_seen {
                // Pushes made before the source's first state start ageing now.
                i.source_seen = true;
                let now = std::time::Instant::now();
                i.unconfirmed.values_mut().for_each(|t| *t = now);
            }
            if i.cross_check {
                self.recheck_agent(i);
            }
            i.overlay_all();
        });
    }

    /// From the next source state on, another node's pod is reached through HBONE only once
    /// its node's agent reports it captured (the pod annotation), as Istio's control plane
    /// decides; until then it is outside the mesh (plaintext, or refused with
    /// `--outside-mesh=deny`), since nothing on its node would accept HBONE for it.
    pub fn require_capture_report(&self) {
        self.inner.write().require_report = true;
    }

    /// Checks the agent's pushes against a cluster source from now on: each push is
    /// compared with the source's pod ([`Store::check_push`]), and on every source change
    /// the agent's workloads the source now contradicts are dropped.
    pub fn enable_cross_check(&self) {
        self.inner.write().cross_check = true;
    }

    /// Compares a push with the cluster source (always `Confirmed` without one).
    pub fn check_push(&self, w: &LocalWorkload) -> PushCheck {
        let inner = self.inner.read();
        if !inner.cross_check {
            return PushCheck::Confirmed;
        }
        let mut w = Workload::from_agent(w);
        w.node = self.node.clone();
        inner.base.check(&w, &self.node)
    }

    /// After a source change: drops the agent's workloads the source contradicts (logged,
    /// counted) and notes those it now confirms.
    fn recheck_agent(&self, i: &mut Inner) {
        let mut dropped = Vec::new();
        for (uid, w) in &i.agent {
            match i.base.check(w, &self.node) {
                PushCheck::Confirmed => {
                    i.unconfirmed.remove(uid);
                }
                PushCheck::Unknown => {}
                PushCheck::Contradicts { reason, .. } => {
                    tracing::error!(%uid, pod = %format!("{}/{}", w.namespace, w.name), %reason,
                        "the cluster source contradicts a workload the node agent pushed; dropped");
                    dropped.push(uid.clone());
                }
            }
        }
        for uid in dropped {
            i.agent.remove(&uid);
            i.unconfirmed.remove(&uid);
            self.count_agent_refusal("contradicts_source");
        }
    }

    pub(crate) fn count_agent_refusal(&self, reason: &'static str) {
        self.refusals
            .agent
            .get_or_create(&crate::metrics::ReasonLabels { reason })
            .inc();
    }

    /// Drops the agent's workloads the cluster source has not confirmed within `ttl` of its
    /// first state (a pod it never lists is not trusted for longer than that); returns how
    /// many.
    pub fn expire_unconfirmed(&self, ttl: std::time::Duration) -> usize {
        let now = std::time::Instant::now();
        let expired: Vec<String> = {
            let inner = self.inner.read();
            if !inner.source_seen {
                return 0;
            }
            inner
                .unconfirmed
                .iter()
                .filter(|(_, since)| now.duration_since(**since) >= ttl)
                .map(|(uid, _)| uid.clone())
                .collect()
        };
        for uid in &expired {
            tracing::warn!(%uid, ?ttl, "the cluster source never confirmed a workload the node agent pushed; dropped");
            self.agent_remove(uid);
            self.count_agent_refusal("unconfirmed");
        }
        expired.len()
    }

    /// Logs and counts each object set aside once, when it starts failing (the source
    /// re-reads every object on each change), and keeps the gauge of those set aside now.
    fn report_rejected(&self, before: &[Rejected], now: &[Rejected]) {
        let labels = |r: &Rejected| RejectedLabels {
            kind: r.kind,
            effect: r.effect.as_str(),
        };
        for r in now.iter().filter(|r| !before.contains(r)) {
            self.refusals
                .config_rejected
                .get_or_create(&labels(r))
                .inc();
            match r.effect {
                RejectEffect::Policy(crate::policy::Fallback::Ignored) => tracing::warn!(
                    kind = r.kind, object = %r.name, reason = %r.reason,
                    "object not supported; ignored (it would only have audited)"
                ),
                effect => tracing::error!(
                    kind = r.kind, object = %r.name, effect = effect.as_str(), reason = %r.reason,
                    "object cannot be applied as written; set aside alone (fail closed where it guards access)"
                ),
            }
        }
        for r in before.iter().filter(|r| !now.contains(r)) {
            tracing::info!(kind = r.kind, object = %r.name, "object no longer set aside");
        }
        let mut counts: HashMap<RejectedLabels, i64> =
            before.iter().map(|r| (labels(r), 0)).collect();
        for r in now {
            *counts.entry(labels(r)).or_default() += 1;
        }
        for (l, n) in counts {
            self.refusals.config_rejected_now.get_or_create(&l).set(n);
        }
    }

    /// Replaces everything the agent told us.
    pub fn agent_snapshot(&self, ws: &[LocalWorkload]) {
        self.update(|i| {
            i.agent = ws
                .iter()
                .map(|w| (w.uid.clone(), Workload::from_agent(w)))
                .collect();
            let now = std::time::Instant::now();
            let old = std::mem::take(&mut i.unconfirmed);
            if i.cross_check {
                for uid in i.agent.keys().filter(|u| !i.base.by_uid.contains_key(*u)) {
                    i.unconfirmed
                        .insert(uid.clone(), old.get(uid).copied().unwrap_or(now));
                }
            }
            i.overlay_all();
        });
    }

    /// Adds or replaces one of the agent's workloads: the cost of that workload alone.
    pub fn agent_add(&self, w: &LocalWorkload) {
        self.update_in_place(|i| {
            let w = Workload::from_agent(w);
            let uid = w.uid.clone();
            let overlaid = Overlaid::new(&i.base, &uid, &w);
            let old = i.overlay.insert(uid.clone(), overlaid);
            Arc::make_mut(&mut i.state).set_agent(&uid, old.as_ref(), i.overlay.get(&uid));
            if i.cross_check && !i.base.by_uid.contains_key(&uid) {
                i.unconfirmed
                    .entry(uid.clone())
                    .or_insert_with(std::time::Instant::now);
            }
            i.agent.insert(uid, w);
        });
    }

    pub fn agent_remove(&self, uid: &str) {
        self.update_in_place(|i| {
            i.agent.remove(uid);
            i.unconfirmed.remove(uid);
            if let Some(old) = i.overlay.remove(uid) {
                Arc::make_mut(&mut i.state).set_agent(uid, Some(&old), None);
            }
        });
    }

    /// Identities of ambient workloads on this node (those we may hold certificates for),
    /// including pods scheduled here that have no IP yet: the source sees a pod when it is
    /// scheduled, before the kubelet runs its CNI ADD, so its certificate is usually held
    /// before the agent's push asks for it and the ADD does no certificate work. Terminal
    /// pods are not in the source's view.
    pub fn local_identities(&self) -> HashSet<Identity> {
        let state = self.snapshot();
        state
            .workloads()
            .filter(|w| w.ambient && w.node == self.node)
            .map(|w| w.identity(&self.trust_domain))
            .collect()
    }
}

/// The state: the manifest's workloads, with the agent's entries replacing those of the
/// same pods (same uid, or same IP), the agent's last. The base is shared, not copied.
/// Another node's pods that are ambient by their labels but whose node has not reported them
/// captured are left out of the mesh. This node's own pods are not: the agent's push says
/// whether they are captured, and their certificates are fetched before their ADD.
pub fn demote_unreported(m: &mut ManifestState, node: &str) {
    for w in &mut m.workloads {
        if w.ambient && !w.reported && w.node != node {
            w.ambient = false;
        }
    }
}

fn build(base: &Arc<Base>, overlay: &BTreeMap<String, Overlaid>) -> State {
    let mut st = State {
        base: base.clone(),
        ..Default::default()
    };
    for (uid, o) in overlay {
        st.set_agent(uid, None, Some(o));
    }
    st
}

impl State {
    /// Moves the agent's entry for `uid` from `old` to `new` (either may be absent) and
    /// settles the owner of every IP the change touches: the agent's entries first (the last
    /// uid claiming it), then the last base claimer not hidden, else nobody.
    fn set_agent(&mut self, uid: &str, old: Option<&Overlaid>, new: Option<&Overlaid>) {
        let mut touched: Vec<IpAddr> = Vec::new();
        if let Some(o) = old {
            self.agent.remove(uid);
            for ip in &o.workload.ips {
                if let Some(c) = self.agent_claims.get_mut(ip) {
                    c.remove(uid);
                    if c.is_empty() {
                        self.agent_claims.remove(ip);
                    }
                }
                touched.push(*ip);
            }
            if let Some(i) = o.hides {
                match self.hidden.get_mut(&i) {
                    Some(n) if *n > 1 => *n -= 1,
                    _ => {
                        self.hidden.remove(&i);
                    }
                }
                touched.extend(&self.base.workloads[i].ips);
            }
        }
        if let Some(n) = new {
            self.agent.insert(uid.to_owned(), n.workload.clone());
            for ip in &n.workload.ips {
                self.agent_claims
                    .entry(*ip)
                    .or_default()
                    .insert(uid.to_owned());
                touched.push(*ip);
            }
            if let Some(i) = n.hides {
                *self.hidden.entry(i).or_default() += 1;
                touched.extend(&self.base.workloads[i].ips);
            }
        }
        for ip in touched {
            self.settle(ip);
        }
    }

    fn settle(&mut self, ip: IpAddr) {
        let owner = match self.agent_claims.get(&ip).and_then(|c| c.last()) {
            Some(uid) => self.agent.get(uid).cloned(),
            None => self
                .base
                .claims
                .get(&ip)
                .and_then(|c| c.iter().rev().find(|j| !self.hidden.contains_key(j)))
                .map(|&j| self.base.workloads[j].clone()),
        };
        let base_owner = self.base.by_ip.get(&ip);
        if owner.as_ref().map(Arc::as_ptr) == base_owner.map(Arc::as_ptr) {
            self.by_ip.remove(&ip);
        } else {
            self.by_ip.insert(ip, owner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reported_remote_pods_stay_in_the_mesh() {
        // (node, ambient by labels, reported) -> in the mesh as seen from n1.
        let cases = [
            ("n2", true, true, true),
            ("n2", true, false, false),
            ("n2", false, true, false),
            ("n2", false, false, false),
            ("n1", true, false, true),
            ("n1", false, false, false),
        ];
        let mut m = ManifestState::default();
        for (i, (node, ambient, reported, _)) in cases.iter().enumerate() {
            m.workloads.push(Workload {
                uid: format!("u{i}"),
                name: format!("p{i}"),
                namespace: "ns".into(),
                service_account: "sa".into(),
                node: (*node).into(),
                ips: vec![IpAddr::from([10, 8, 0, i as u8])],
                labels: BTreeMap::new(),
                ambient: *ambient,
                reported: *reported,
                source: WorkloadSource::Manifest,
                telemetry: TelemetryNames::default(),
            });
        }
        demote_unreported(&mut m, "n1");
        for (w, case) in m.workloads.iter().zip(cases) {
            assert_eq!(w.ambient, case.3, "{case:?}");
        }

        // Through the store: a remote pod becomes reachable by HBONE with its report.
        let store = Store::new("n1", "td");
        store.require_capture_report();
        let mut m = ManifestState::default();
        let mut w = Workload {
            uid: "r".into(),
            name: "r".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: "n2".into(),
            ips: vec![IpAddr::from([10, 8, 1, 1])],
            labels: BTreeMap::new(),
            ambient: true,
            reported: false,
            source: WorkloadSource::Manifest,
            telemetry: TelemetryNames::default(),
        };
        m.workloads.push(w.clone());
        store.set_manifest(m.clone());
        assert!(!store.snapshot().workload(w.ips[0]).unwrap().ambient);
        w.reported = true;
        m.workloads = vec![w.clone()];
        store.set_manifest(m);
        assert!(store.snapshot().workload(w.ips[0]).unwrap().ambient);
    }

    mod incremental {
        use super::super::*;
        use proptest::prelude::*;

        fn ip(i: u8) -> IpAddr {
            IpAddr::from([10, 9, 0, i])
        }

        fn manifest_workload(uid: u8, ips: &[u8]) -> Workload {
            Workload {
                uid: format!("u{uid}"),
                name: format!("m{uid}"),
                namespace: "ns".into(),
                service_account: "sa".into(),
                node: "n1".into(),
                ips: ips.iter().map(|&i| ip(i)).collect(),
                labels: BTreeMap::from([("from".to_string(), format!("m{uid}"))]),
                ambient: true,
                source: WorkloadSource::Manifest,
                reported: true,
                telemetry: TelemetryNames::default(),
            }
        }

        /// What a reader sees: every IP's owner and the workload list, by value.
        fn view(st: &State) -> (Vec<Option<Workload>>, Vec<Workload>) {
            let owners = (0..6)
                .map(|i| st.workload(ip(i)).map(|w| (**w).clone()))
                .collect();
            (owners, st.workloads().map(|w| (**w).clone()).collect())
        }

        /// The overlay's meaning, written plainly: an IP belongs to the agent's entry with
        /// the greatest uid claiming it, else to the last manifest workload claiming it that
        /// no agent entry hides; the list is the manifest's not hidden, then the agent's.
        fn reference(
            base: &Base,
            overlay: &BTreeMap<String, Overlaid>,
        ) -> (Vec<Option<Workload>>, Vec<Workload>) {
            let hidden: HashSet<usize> = overlay.values().filter_map(|o| o.hides).collect();
            let owners = (0..6)
                .map(|i| {
                    let agent = overlay
                        .values()
                        .rev()
                        .find(|o| o.workload.ips.contains(&ip(i)));
                    match agent {
                        Some(o) => Some((*o.workload).clone()),
                        None => base
                            .workloads
                            .iter()
                            .enumerate()
                            .rev()
                            .find(|(j, w)| !hidden.contains(j) && w.ips.contains(&ip(i)))
                            .map(|(_, w)| (**w).clone()),
                    }
                })
                .collect();
            let list = base
                .workloads
                .iter()
                .enumerate()
                .filter(|(j, _)| !hidden.contains(j))
                .map(|(_, w)| (**w).clone())
                .chain(overlay.values().map(|o| (*o.workload).clone()))
                .collect();
            (owners, list)
        }

        proptest! {
            /// A state changed in place by pushes and removals reads as the overlay means,
            /// and exactly like one built from scratch: shared IPs, finished pods reusing an IP, uid matches, and two
            /// agent entries hiding the same manifest pod.
            #[test]
            fn pushes_in_place_match_a_rebuild(
                base in prop::collection::vec((0u8..6, prop::collection::vec(0u8..6, 1..3)), 0..6),
                ops in prop::collection::vec(
                    (0u8..8, prop::option::of(prop::collection::vec(0u8..6, 1..3))),
                    1..24,
                ),
            ) {
                let s = Store::new("n1", "cluster.local");
                s.set_manifest(ManifestState {
                    workloads: base.iter().map(|(u, ips)| manifest_workload(*u, ips)).collect(),
                    ..Default::default()
                });
                for (uid, ips) in ops {
                    match ips {
                        Some(ips) => s.agent_add(&LocalWorkload {
                            uid: format!("u{uid}"),
                            namespace: "ns".into(),
                            name: format!("a{uid}"),
                            service_account: "sa".into(),
                            node: "n1".into(),
                            ips: ips.iter().map(|&i| ip(i)).collect(),
                        }),
                        None => s.agent_remove(&format!("u{uid}")),
                    }
                    let inner = s.inner.read();
                    let expected = reference(&inner.base, &inner.overlay);
                    prop_assert_eq!(view(&inner.state), expected.clone());
                    let rebuilt = build(&inner.base, &inner.overlay);
                    prop_assert_eq!(view(&rebuilt), expected);
                    // No override left behind that merely repeats the base.
                    prop_assert_eq!(inner.state.by_ip.len(), rebuilt.by_ip.len());
                }
            }
        }

        /// A reader holding the old view keeps it unchanged while a push lands.
        #[test]
        fn a_held_view_is_not_changed_by_a_push() {
            let s = Store::new("n1", "cluster.local");
            let add = |uid: &str, i: u8| LocalWorkload {
                uid: uid.into(),
                namespace: "ns".into(),
                name: uid.into(),
                service_account: "sa".into(),
                node: "n1".into(),
                ips: vec![ip(i)],
            };
            s.agent_add(&add("a", 1));
            let held = s.snapshot();
            s.agent_add(&add("b", 2));
            s.agent_remove("a");
            assert_eq!(held.workload(ip(1)).unwrap().uid, "a");
            assert!(held.workload(ip(2)).is_none());
            let now = s.snapshot();
            assert!(now.workload(ip(1)).is_none());
            assert_eq!(now.workload(ip(2)).unwrap().uid, "b");
        }
    }

    fn lw(uid: &str, ip: &str) -> LocalWorkload {
        LocalWorkload {
            uid: uid.into(),
            namespace: "shop".into(),
            name: format!("pod-{uid}"),
            service_account: "web".into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
        }
    }

    #[test]
    fn agent_workloads_are_local_and_replaceable() {
        let s = Store::new("n1", "cluster.local");
        s.agent_add(&lw("a", "10.1.0.2"));
        s.agent_add(&lw("b", "10.1.0.3"));
        let st = s.snapshot();
        let w = st
            .local_workload("10.1.0.2".parse().unwrap(), "n1")
            .unwrap();
        assert_eq!(
            w.identity("cluster.local").to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(s.local_identities().len(), 1);
        s.agent_remove("a");
        assert!(s.snapshot().workload("10.1.0.2".parse().unwrap()).is_none());
        s.agent_snapshot(&[lw("c", "10.1.0.9")]);
        let st = s.snapshot();
        assert!(st.workload("10.1.0.3".parse().unwrap()).is_none());
        assert!(st.workload("10.1.0.9".parse().unwrap()).is_some());
    }

    /// The identities pre-issued on a node: ambient pods scheduled on it, with or without
    /// an IP yet; not other nodes' pods, not pods outside the mesh.
    #[test]
    fn local_identities_include_pods_scheduled_here_before_their_add() {
        let w = |uid: &str, sa: &str, node: &str, ips: &[&str], ambient: bool| Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            service_account: sa.into(),
            node: node.into(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            labels: BTreeMap::new(),
            ambient,
            source: WorkloadSource::Manifest,
            reported: true,
            telemetry: TelemetryNames::default(),
        };
        let s = Store::new("n1", "cluster.local");
        s.set_manifest(ManifestState {
            workloads: vec![
                w("running", "web", "n1", &["10.1.0.2"], true),
                w("scheduled", "api", "n1", &[], true),
                w("elsewhere", "db", "n2", &[], true),
                w("plain", "legacy", "n1", &["10.1.0.3"], false),
            ],
            ..Default::default()
        });
        let mut got: Vec<String> = s
            .local_identities()
            .iter()
            .map(ToString::to_string)
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "spiffe://cluster.local/ns/shop/sa/api",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
    }

    /// Agent entries replace the manifest's for the same pod (by uid, else by IP), take its
    /// labels, and give the manifest entry back when they go.
    #[test]
    fn agent_entries_overlay_the_manifest() {
        let mw = |uid: &str, ip: &str, app: &str| Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: "n1".into(),
            ips: vec![ip.parse().unwrap()],
            labels: BTreeMap::from([("app".to_string(), app.to_string())]),
            ambient: true,
            source: WorkloadSource::Manifest,
            reported: true,
            telemetry: TelemetryNames::default(),
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let s = Store::new("n1", "cluster.local");
        s.set_manifest(ManifestState {
            workloads: vec![
                mw("u1", "10.1.0.1", "web"),
                // A finished pod and a running one that reuses its IP.
                mw("u2", "10.1.0.2", "old"),
                mw("u3", "10.1.0.2", "new"),
                mw("u4", "10.1.0.4", "db"),
            ],
            ..Default::default()
        });
        assert_eq!(s.snapshot().workload(ip("10.1.0.2")).unwrap().uid, "u3");
        // Same uid, new IP: the manifest's IP no longer resolves; labels carried over.
        s.agent_add(&lw("u1", "10.1.0.9"));
        // Unknown uid, an IP the manifest knows: replaces the IP's current owner.
        s.agent_add(&lw("x", "10.1.0.2"));
        let st = s.snapshot();
        assert!(st.workload(ip("10.1.0.1")).is_none());
        let w = st.workload(ip("10.1.0.9")).unwrap();
        assert_eq!((w.uid.as_str(), w.source), ("u1", WorkloadSource::Agent));
        assert_eq!(w.labels["app"], "web");
        let w = st.workload(ip("10.1.0.2")).unwrap();
        assert_eq!((w.uid.as_str(), w.labels["app"].as_str()), ("x", "new"));
        let uids: Vec<&str> = st.workloads().map(|w| w.uid.as_str()).collect();
        assert_eq!(uids, ["u2", "u4", "u1", "x"]);
        // The agent lets go: the manifest's entries come back as they were.
        s.agent_remove("x");
        s.agent_remove("u1");
        let st = s.snapshot();
        assert_eq!(st.workload(ip("10.1.0.2")).unwrap().uid, "u3");
        assert_eq!(st.workload(ip("10.1.0.1")).unwrap().uid, "u1");
        assert_eq!(st.workloads().count(), 4);
        // A new manifest keeps the agent's entries on top.
        s.agent_add(&lw("u4", "10.1.0.4"));
        s.set_manifest(ManifestState {
            workloads: vec![mw("u4", "10.1.0.4", "db2")],
            ..Default::default()
        });
        let st = s.snapshot();
        let w = st.workload(ip("10.1.0.4")).unwrap();
        assert_eq!(
            (w.source, w.labels["app"].as_str()),
            (WorkloadSource::Agent, "db2")
        );
        assert_eq!(st.workloads().count(), 1);
    }

    /// Attack 7: a push is checked against the pod the cluster source knows. Contradictions
    /// (another service account, name or node for the uid; an IP the source gives another
    /// pod) are refused; a pod the source does not know yet is not contradicted.
    #[test]
    fn pushes_are_checked_against_the_cluster_source() {
        let mw = |uid: &str, ip: Option<&str>, node: &str| Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            service_account: "web".into(),
            node: node.into(),
            ips: ip.into_iter().map(|i| i.parse().unwrap()).collect(),
            labels: BTreeMap::new(),
            ambient: true,
            source: WorkloadSource::Manifest,
            reported: true,
            telemetry: TelemetryNames::default(),
        };
        let s = Store::new("n1", "cluster.local");
        s.enable_cross_check();
        s.set_manifest(ManifestState {
            workloads: vec![
                mw("a", Some("10.1.0.2"), "n1"),
                // Pending: the source knows the pod, not its IP yet (a CNI ADD in progress).
                mw("b", None, "n1"),
                mw("c", Some("10.2.0.9"), "n2"),
            ],
            ..Default::default()
        });
        let push = |uid: &str, ip: &str, sa: &str| {
            let mut w = lw(uid, ip);
            w.name = format!("pod-{uid}");
            w.service_account = sa.into();
            w
        };
        let settles = |c: PushCheck| match c {
            PushCheck::Contradicts { may_settle, .. } => Some(may_settle),
            _ => None,
        };
        struct Case {
            name: &'static str,
            push: LocalWorkload,
            want: Result<bool, Option<bool>>,
        }
        // want: Ok(confirmed?) or Err(may_settle of the contradiction)
        let cases = vec![
            Case {
                name: "as the source says",
                push: push("a", "10.1.0.2", "web"),
                want: Ok(true),
            },
            Case {
                name: "pending pod gets its IP",
                push: push("b", "10.1.0.3", "web"),
                want: Ok(true),
            },
            Case {
                name: "unknown pod, free IP",
                push: push("x", "10.1.0.7", "web"),
                want: Ok(false),
            },
            Case {
                name: "another service account",
                push: push("a", "10.1.0.2", "admin"),
                want: Err(Some(false)),
            },
            Case {
                name: "pending pod, other service account",
                push: push("b", "10.1.0.3", "admin"),
                want: Err(Some(false)),
            },
            Case {
                name: "another pod's IP, this node",
                push: push("x", "10.1.0.2", "admin"),
                want: Err(Some(true)),
            },
            Case {
                name: "another pod's IP, other node",
                push: push("x", "10.2.0.9", "web"),
                want: Err(Some(false)),
            },
            Case {
                name: "a pod of another node",
                push: push("c", "10.2.0.9", "web"),
                want: Err(Some(false)),
            },
            Case {
                name: "known pod, another IP",
                push: push("a", "10.1.0.8", "web"),
                want: Err(Some(true)),
            },
        ];
        for case in cases {
            let got = s.check_push(&case.push);
            let as_want = match &got {
                PushCheck::Confirmed => Ok(true),
                PushCheck::Unknown => Ok(false),
                c => Err(settles(c.clone())),
            };
            assert_eq!(as_want, case.want, "{}: {got:?}", case.name);
        }
        // Unconfirmed pushes do not age before the source's first state.
        let fresh = Store::new("n1", "cluster.local");
        fresh.enable_cross_check();
        fresh.agent_add(&push("x", "10.1.0.7", "web"));
        assert_eq!(fresh.expire_unconfirmed(std::time::Duration::ZERO), 0);
        fresh.set_manifest(ManifestState::default());
        assert_eq!(fresh.expire_unconfirmed(std::time::Duration::ZERO), 1);
        // Without a cluster source there is nothing to check against.
        let plain = Store::new("n1", "cluster.local");
        assert_eq!(
            plain.check_push(&push("a", "10.1.0.2", "admin")),
            PushCheck::Confirmed
        );

        // A pod pushed before the source knew it is dropped when the source contradicts it,
        // and when the source never confirms it.
        s.agent_add(&push("x", "10.1.0.7", "web"));
        s.agent_add(&push("y", "10.1.0.8", "web"));
        assert_eq!(s.expire_unconfirmed(std::time::Duration::from_secs(60)), 0);
        s.set_manifest(ManifestState {
            workloads: vec![
                mw("a", Some("10.1.0.2"), "n1"),
                mw("z", Some("10.1.0.7"), "n1"),
            ],
            ..Default::default()
        });
        let st = s.snapshot();
        assert_eq!(st.workload("10.1.0.7".parse().unwrap()).unwrap().uid, "z");
        assert_eq!(st.workload("10.1.0.8".parse().unwrap()).unwrap().uid, "y");
        assert_eq!(s.expire_unconfirmed(std::time::Duration::ZERO), 1);
        assert!(s.snapshot().workload("10.1.0.8".parse().unwrap()).is_none());
    }

    #[test]
    fn service_pick_round_robins_ready_endpoints() {
        let ep = |ip: &str, ready| Endpoint {
            ip: ip.parse().unwrap(),
            ready,
            ports: BTreeMap::new(),
        };
        let s = Service::new(
            "web".into(),
            "shop".into(),
            vec!["10.96.0.10".parse().unwrap()],
            vec![ServicePort {
                name: "http".into(),
                port: 80,
                target: TargetPort::Number(8080),
            }],
            vec![
                ep("10.1.0.2", true),
                ep("10.1.0.3", false),
                ep("10.1.0.4", true),
            ],
        );
        let picks: HashSet<SocketAddr> = (0..4).map(|_| s.pick(80).unwrap()).collect();
        assert_eq!(picks.len(), 2);
        assert!(picks.contains(&"10.1.0.4:8080".parse().unwrap()));
        assert!(s.pick(81).is_none());
    }
}

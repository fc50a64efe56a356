//! The agent's core: the one owner of the kernel rules. It runs on its own thread and takes
//! [`Command`]s in order, so every change is computed against what it knows is installed
//! and applied as one transaction. Desired state = the recorded attachments whose pods the
//! source says are ambient; reconcile = apply the difference, nothing more.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ambient_common::agent_api::{
    AddOutcome, AgentError, Attachment as ApiAttachment, AttachmentKey, ErrorKind,
};
use ambient_common::manifest::{Enrolment, Pod};
use ambient_common::ztunnel_api::LocalWorkload;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::host::{netns_id, Sysfs};
use crate::metrics::Metrics;
use crate::nft::{ambient_mac_elements, pin_elements, pod_elements, Dataplane, Element, Observed};
use crate::source::Snapshot;
use crate::state::{LinkRecord, Record, StateDir};
use crate::ztunnel::{WorkloadChange, WorkloadFeed};

pub type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// Work for the core, in arrival order.
pub enum Command {
    /// Enrol (if ambient) an attachment whose pod the source already knows: `snapshot` is
    /// the view in which the caller saw it, adopted first if the core's is older (its own
    /// `Snapshot` command may still be queued behind this one).
    Add {
        att: ApiAttachment,
        snapshot: Arc<Snapshot>,
        reply: Reply<(AddOutcome, Option<LocalWorkload>)>,
    },
    Del {
        key: AttachmentKey,
        reply: Reply<()>,
    },
    Gc {
        valid: Vec<AttachmentKey>,
        reply: Reply<u32>,
    },
    Check {
        att: ApiAttachment,
        reply: Reply<()>,
    },
    /// The source published a new view.
    Snapshot(Arc<Snapshot>),
    /// Periodic drift check, with a reading of the kernel taken off the core's thread (so
    /// that the listing does not hold up ADDs), or `None` to read it here.
    Tick(Option<Reading>),
    /// Read-only report for the CLI.
    Report { reply: oneshot::Sender<Report> },
}

/// The kernel as read by the drift observer, and the core's kernel generation when the
/// reading started: it is compared only if the core changed nothing since (every ADD, DEL
/// and release bumps the generation, so the records are those of the reading).
pub struct Reading {
    pub generation: u64,
    pub observed: Result<Observed, String>,
    /// The node's interfaces (name -> ifindex), to find vanished veths without reading
    /// sysfs once per attachment on the core's thread.
    pub links: Option<std::collections::HashMap<String, u32>>,
}

/// Readings in a row that may be found stale (the node is busy) before the core reads the
/// kernel itself.
const MAX_STALE_READINGS: u32 = 3;

/// What a pod's attachment currently amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodState {
    Captured,
    NotAmbient,
    OptedOut,
    Excluded,
    HostNetwork,
    /// The source does not (or no longer) know the pod.
    Unknown,
    /// Ambient, but its traffic cannot be captured on this node (an interface without an
    /// address to redirect to, an eBPF dataplane that may bypass netfilter): nothing is
    /// installed and the pod is not reported captured, so peers do not treat it as in the
    /// mesh. The record's `blocker` says why.
    Uncapturable,
}

impl PodState {
    /// A recorded pod's state from the source's decision (`None`: undecided), whether
    /// something on the node blocks its capture, whether the source has synced, and its
    /// state before. Until the source has synced, an undecided pod keeps what it had.
    pub fn of(
        decided: Option<Enrolment>,
        blocked: bool,
        synced: bool,
        previous: Option<PodState>,
    ) -> Self {
        match decided {
            Some(Enrolment::Ambient) if blocked => PodState::Uncapturable,
            Some(e) => e.into(),
            None if synced => PodState::Unknown,
            None => previous.unwrap_or(PodState::Unknown),
        }
    }
}

impl From<Enrolment> for PodState {
    fn from(e: Enrolment) -> Self {
        match e {
            Enrolment::Ambient => PodState::Captured,
            Enrolment::NotAmbient => PodState::NotAmbient,
            Enrolment::OptedOut => PodState::OptedOut,
            Enrolment::Excluded => PodState::Excluded,
            Enrolment::HostNetwork => PodState::HostNetwork,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<std::net::IpAddr>,
    pub host_interface: String,
    pub mode: String,
    /// The MAC the pod's bridge port is pinned to (bridged pods whose MAC is known).
    pub pinned_mac: Option<String>,
    pub netns: String,
    pub state: PodState,
    /// `cni` (the runtime's ADD) or `cni_cache` (adopted: running before the agent).
    pub found_by: crate::adopt::Method,
    pub since: u64,
    /// Why an `uncapturable` pod cannot be captured here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub node: String,
    pub backend: String,
    pub pods: Vec<PodReport>,
    pub captured: usize,
    /// Ambient pods whose traffic cannot be captured on this node.
    pub uncapturable: usize,
    pub elements: usize,
    pub source_synced: bool,
    pub source_generation: u64,
    pub drift: Vec<String>,
    pub last_error: Option<String>,
    pub rules: String,
}

pub struct Core {
    cfg: Arc<Config>,
    dp: Box<dyn Dataplane>,
    sysfs: Sysfs,
    store: StateDir,
    records: BTreeMap<AttachmentKey, Record>,
    states: States,
    /// Elements installed on behalf of each attachment.
    owned: BTreeMap<AttachmentKey, BTreeSet<Element>>,
    /// How many attachments own each installed element: the kernel holds exactly the keys.
    refs: BTreeMap<Element, u32>,
    snapshot: Arc<Snapshot>,
    metrics: Metrics,
    /// What the node's interfaces say about whether a pod can be captured (the kernel; tests
    /// give their own).
    facts: Box<dyn crate::bypass::HostFacts + Send>,
    /// The enrolled workloads as last told to the ztunnel client, per attachment.
    published: BTreeMap<AttachmentKey, LocalWorkload>,
    /// How many published attachments carry each workload uid (a pod may have several).
    published_uids: HashMap<String, u32>,
    workloads: WorkloadFeed,
    /// Bumped after every change the core makes to the kernel.
    kernel_generation: Arc<AtomicU64>,
    stale_readings: u32,
    /// The cache directory's mtime and the source generation of the last adoption pass: the
    /// next pass reads the directory only when either changed.
    adopt_pass: Option<(Option<std::time::SystemTime>, u64)>,
    drift: Vec<String>,
    last_error: Option<String>,
}

/// Each attachment's state, with the number captured kept alongside so that counting them
/// costs nothing per change.
#[derive(Debug, Default)]
struct States {
    map: BTreeMap<AttachmentKey, PodState>,
    captured: usize,
    uncapturable: usize,
}

impl States {
    fn get(&self, key: &AttachmentKey) -> Option<&PodState> {
        self.map.get(key)
    }

    fn count(&mut self, st: Option<PodState>, by: isize) {
        match st {
            Some(PodState::Captured) => self.captured = self.captured.wrapping_add_signed(by),
            Some(PodState::Uncapturable) => {
                self.uncapturable = self.uncapturable.wrapping_add_signed(by)
            }
            _ => {}
        }
    }

    fn insert(&mut self, key: AttachmentKey, st: PodState) {
        self.count(Some(st), 1);
        let old = self.map.insert(key, st);
        self.count(old, -1);
    }

    fn remove(&mut self, key: &AttachmentKey) {
        let old = self.map.remove(key);
        self.count(old, -1);
    }

    fn captured(&self) -> usize {
        self.captured
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn internal(e: impl std::fmt::Display) -> AgentError {
    AgentError::new(ErrorKind::Internal, e.to_string())
}

impl Core {
    /// Builds the core from persisted records and reconciles with the kernel: the cold start.
    /// Only the difference between the kernel and the desired state is applied.
    pub fn start(
        cfg: Arc<Config>,
        dp: Box<dyn Dataplane>,
        sysfs: Sysfs,
        snapshot: Arc<Snapshot>,
        metrics: Metrics,
        workloads: WorkloadFeed,
    ) -> Result<Self, AgentError> {
        let store = cfg.state_dir();
        let records = store.load().map_err(internal)?;
        let mut core = Core {
            cfg,
            dp,
            sysfs,
            store,
            records,
            states: States::default(),
            owned: BTreeMap::new(),
            refs: BTreeMap::new(),
            snapshot,
            metrics,
            facts: Box::new(crate::bypass::Kernel),
            published: BTreeMap::new(),
            published_uids: HashMap::new(),
            workloads,
            kernel_generation: Arc::new(AtomicU64::new(0)),
            stale_readings: 0,
            adopt_pass: None,
            drift: Vec::new(),
            last_error: None,
        };
        core.prune_vanished(None);
        if !core.snapshot.synced {
            // A source that has not listed yet (the API source at start) cannot say who is
            // ambient: keep every pod whose redirection is wholly in the kernel as it is,
            // until the first complete view arrives. Never release on ignorance.
            let observed = core.dp.observe().map_err(internal)?;
            for (key, r) in &core.records {
                let want = Self::wanted(r, PodState::Captured);
                if !want.is_empty() && want.is_subset(&observed.elements) {
                    core.states.insert(key.clone(), PodState::Captured);
                }
            }
        }
        core.resync().map_err(internal)?;
        Ok(core)
    }

    /// Replaces where the facts about the node's interfaces come from (tests).
    pub fn set_host_facts(&mut self, facts: Box<dyn crate::bypass::HostFacts + Send>) {
        self.facts = facts;
    }

    /// Runs commands until every sender is gone. Blocking: call on a dedicated thread.
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            self.handle(cmd);
        }
    }

    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add {
                att,
                snapshot,
                reply,
            } => {
                if snapshot.generation > self.snapshot.generation {
                    self.snapshot = snapshot;
                    if let Err(e) = self.reconcile_all() {
                        self.note_error("reconcile", &e);
                    }
                }
                let _ = reply.send(self.add(att));
            }
            Command::Del { key, reply } => {
                let _ = reply.send(self.del(&key));
            }
            Command::Gc { valid, reply } => {
                let _ = reply.send(self.gc(valid));
            }
            Command::Check { att, reply } => {
                let _ = reply.send(self.check(&att));
            }
            Command::Snapshot(s) => {
                self.snapshot = s;
                if let Err(e) = self.reconcile_all() {
                    self.note_error("reconcile", &e);
                }
                self.adopt_cached();
            }
            Command::Tick(reading) => {
                self.tick(reading);
                self.adopt_cached();
            }
            Command::Report { reply } => {
                let _ = reply.send(self.report());
            }
        }
    }

    fn note_error(&mut self, reason: &str, e: &dyn std::fmt::Display) {
        tracing::error!(reason, error = %e, "agent operation failed");
        self.metrics.fail(reason);
        self.last_error = Some(format!("{reason}: {e}"));
    }

    /// The state a record should be in now.
    fn state_of(&self, key: &AttachmentKey, r: &Record) -> PodState {
        PodState::of(
            self.snapshot.decide(&r.pod, &self.cfg.excluded_namespaces),
            r.blocker.is_some(),
            self.snapshot.synced,
            self.states.get(key).copied(),
        )
    }

    /// Every bridged pod's port is pinned to its MAC; an ambient pod's also carries its
    /// capture and anti-spoofing elements.
    fn wanted(r: &Record, st: PodState) -> BTreeSet<Element> {
        let Some(a) = r.link.to_attachment() else {
            return BTreeSet::new();
        };
        let mut out = pin_elements(&a, r.mac);
        if st == PodState::Captured {
            out.extend(pod_elements(&a, &r.ips));
            out.extend(ambient_mac_elements(&a, r.mac));
        }
        out
    }

    /// Moves the listed attachments to their wanted element sets in one transaction; the
    /// cost is that of the attachments changed, whatever the number enrolled. Elements shared
    /// by several attachments are reference-counted. All or nothing.
    fn transition(
        &mut self,
        changes: Vec<(AttachmentKey, BTreeSet<Element>)>,
    ) -> Result<(), crate::nft::DataplaneError> {
        let mut delta: BTreeMap<&Element, i64> = BTreeMap::new();
        for (key, want) in &changes {
            if let Some(old) = self.owned.get(key) {
                for e in old {
                    *delta.entry(e).or_default() -= 1;
                }
            }
            for e in want {
                *delta.entry(e).or_default() += 1;
            }
        }
        let mut add = BTreeSet::new();
        let mut remove = BTreeSet::new();
        for (e, d) in &delta {
            let before = i64::from(self.refs.get(*e).copied().unwrap_or(0));
            let after = before + d;
            if before == 0 && after > 0 {
                add.insert((*e).clone());
            } else if before > 0 && after <= 0 {
                remove.insert((*e).clone());
            }
        }
        let counts: Vec<(Element, i64)> = delta.into_iter().map(|(e, d)| (e.clone(), d)).collect();
        let applied = self.dp.apply(&remove, &add);
        self.bump_kernel_generation();
        applied?;
        for (e, d) in counts {
            let n = i64::from(self.refs.get(&e).copied().unwrap_or(0)) + d;
            if n > 0 {
                self.refs.insert(e, n as u32);
            } else {
                self.refs.remove(&e);
            }
        }
        for (key, want) in changes {
            if want.is_empty() {
                self.owned.remove(&key);
            } else {
                self.owned.insert(key, want);
            }
        }
        Ok(())
    }

    /// Recomputes every record's state and element set from scratch and makes the kernel
    /// match: compares with what the kernel really holds, applies only the difference, and
    /// reinstalls the tables whole when their fixed rules are missing or altered.
    fn resync(&mut self) -> Result<(), crate::nft::DataplaneError> {
        let mut owned = BTreeMap::new();
        let mut refs: BTreeMap<Element, u32> = BTreeMap::new();
        let mut states = States::default();
        for (key, r) in &self.records {
            let st = self.state_of(key, r);
            states.insert(key.clone(), st);
            let want = Self::wanted(r, st);
            for e in &want {
                *refs.entry(e.clone()).or_default() += 1;
            }
            if !want.is_empty() {
                owned.insert(key.clone(), want);
            }
        }
        let desired: BTreeSet<Element> = refs.keys().cloned().collect();
        let observed = self.dp.observe()?;
        let drift = self.dp.drift(&observed);
        if !observed.present || !drift.is_empty() {
            if observed.present {
                tracing::warn!(?drift, "fixed rules are not this version's; reinstalling");
            }
            let installed = self.dp.install(&desired);
            self.bump_kernel_generation();
            installed?;
        } else {
            let remove = observed.elements.difference(&desired).cloned().collect();
            let add = desired.difference(&observed.elements).cloned().collect();
            let applied = self.dp.apply(&remove, &add);
            self.bump_kernel_generation();
            applied?;
        }
        let before = self.captured_count();
        self.owned = owned;
        self.refs = refs;
        self.states = states;
        self.count_transitions(before);
        self.publish_all();
        Ok(())
    }

    /// Brings every record to its current state; used when the source changes.
    fn reconcile_all(&mut self) -> Result<(), crate::nft::DataplaneError> {
        self.metrics.reconcile_runs.inc();
        let before = self.captured_count();
        let mut changes = Vec::new();
        let mut states = States::default();
        for (key, r) in &self.records {
            let st = self.state_of(key, r);
            states.insert(key.clone(), st);
            if self.states.get(key) != Some(&st) {
                changes.push((key.clone(), Self::wanted(r, st)));
            }
        }
        // Attachments forgotten since the last pass.
        for key in self.owned.keys() {
            if !self.records.contains_key(key) {
                changes.push((key.clone(), BTreeSet::new()));
            }
        }
        if let Err(e) = self.transition(changes) {
            tracing::warn!(error = %e, "transaction refused; re-reading the kernel");
            self.metrics.drift_repairs.inc();
            self.resync()?;
            return Ok(());
        }
        self.states = states;
        self.count_transitions(before);
        self.publish_all();
        Ok(())
    }

    fn count_transitions(&mut self, before: usize) {
        let after = self.captured_count();
        if after > before {
            self.metrics.enrolments.inc_by((after - before) as u64);
        } else if before > after {
            self.metrics.releases.inc_by((before - after) as u64);
        }
        self.metrics
            .uncapturable_pods
            .set(self.states.uncapturable as i64);
    }

    fn captured_count(&self) -> usize {
        self.states.captured()
    }

    /// Recomputes every enrolled workload and tells the ztunnel client what changed; used
    /// after a source change or a resync. Per-pod changes use [`Core::publish_one`].
    fn publish_all(&mut self) {
        let mut want: BTreeMap<AttachmentKey, LocalWorkload> = self
            .records
            .iter()
            .filter(|(k, _)| self.states.get(k) == Some(&PodState::Captured))
            .map(|(k, r)| (k.clone(), self.workload(r)))
            .collect();
        let keys: BTreeSet<AttachmentKey> =
            want.keys().chain(self.published.keys()).cloned().collect();
        for key in keys {
            let w = want.remove(&key);
            self.publish_one(&key, w);
        }
    }

    /// Records `workload` (or its absence) for one attachment and sends the ztunnel client
    /// the change, if any: the cost of one pod, whatever the number enrolled.
    fn publish_one(&mut self, key: &AttachmentKey, workload: Option<LocalWorkload>) {
        let old = match &workload {
            Some(w) => self.published.insert(key.clone(), w.clone()),
            None => self.published.remove(key),
        };
        if old == workload {
            return;
        }
        if let Some(w) = &workload {
            *self.published_uids.entry(w.uid.clone()).or_default() += 1;
        }
        if let Some(old) = old {
            // Two attachments of one pod share its uid: ztunnel forgets it with the last.
            let last = match self.published_uids.get_mut(&old.uid) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    self.published_uids.remove(&old.uid);
                    true
                }
            };
            if last {
                self.workloads.send(WorkloadChange::Remove(old.uid));
            }
        }
        if let Some(w) = workload {
            self.workloads.send(WorkloadChange::Upsert(w));
        }
        self.metrics.enrolled_pods.set(self.published.len() as i64);
    }

    /// The workloads told to ztunnel, for tests and reports.
    pub fn published(&self) -> impl Iterator<Item = &LocalWorkload> {
        self.published.values()
    }

    fn workload(&self, r: &Record) -> LocalWorkload {
        let pod = self.snapshot.pod_ref(&r.pod);
        LocalWorkload {
            uid: workload_uid(r, pod),
            namespace: r.pod.namespace.clone(),
            name: r.pod.name.clone(),
            service_account: pod
                .map(|p| p.service_account().to_owned())
                .unwrap_or_else(|| "default".into()),
            node: self.cfg.node_name.clone(),
            ips: r.ips.clone(),
        }
    }

    /// Brings one attachment to `record` (or removes it, with `None`), kernel first, then
    /// the persisted state.
    fn set_record(
        &mut self,
        key: &AttachmentKey,
        record: Option<Record>,
    ) -> Result<PodState, AgentError> {
        let before = self.captured_count();
        let (st, want) = match &record {
            Some(r) => {
                let st = self.state_of(key, r);
                (st, Self::wanted(r, st))
            }
            None => (PodState::Unknown, BTreeSet::new()),
        };
        let t0 = Instant::now();
        if let Err(e) = self.transition(vec![(key.clone(), want)]) {
            self.note_error("apply", &e);
            return Err(internal(e));
        }
        let t1 = Instant::now();
        let persisted = match &record {
            Some(r) => self.store.save(r),
            None => self.store.remove(key),
        };
        tracing::debug!(
            kernel_us = (t1 - t0).as_micros() as u64,
            persist_us = t1.elapsed().as_micros() as u64,
            "attachment updated"
        );
        if let Err(e) = persisted {
            self.note_error("persist", &e);
        }
        let workload = match record {
            Some(r) => {
                let w = (st == PodState::Captured).then(|| self.workload(&r));
                self.records.insert(key.clone(), r);
                self.states.insert(key.clone(), st);
                w
            }
            None => {
                self.records.remove(key);
                self.states.remove(key);
                None
            }
        };
        self.count_transitions(before);
        self.publish_one(key, workload);
        Ok(st)
    }

    fn add(
        &mut self,
        att: ApiAttachment,
    ) -> Result<(AddOutcome, Option<LocalWorkload>), AgentError> {
        self.add_found(att, crate::adopt::Method::Cni)
    }

    /// Enrols attachments the runtime made while the agent did not see them (pods running
    /// before it, or created while it was down with `agentUnreachable: allow`), from the
    /// runtime's cached ADD results: each as its ADD would have been. Only attachments of
    /// pods the synced source places here now (same uid), whose veth and netns still exist.
    fn adopt_cached(&mut self) {
        if !self.snapshot.synced {
            return;
        }
        let dir_mtime = std::fs::metadata(&self.cfg.cni_cache_dir)
            .and_then(|m| m.modified())
            .ok();
        let pass = Some((dir_mtime, self.snapshot.generation));
        if dir_mtime.is_none() || self.adopt_pass == pass {
            return;
        }
        self.adopt_pass = pass;
        for (path, text) in crate::adopt::read_cache_dir(&self.cfg.cni_cache_dir) {
            let att = match crate::adopt::attachment(&text, &self.sysfs.root) {
                Ok(a) => a,
                Err(e) => {
                    tracing::trace!(file = %path.display(), error = %e, "cache entry not adoptable");
                    continue;
                }
            };
            if self.records.contains_key(&att.key) {
                continue;
            }
            let Some(pod) = self.snapshot.pod(&att.pod.namespace, &att.pod.name) else {
                continue;
            };
            let same_pod = match (&att.pod.uid, &pod.metadata.uid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            let alive = self.sysfs.ifindex(&att.host_interface).is_some()
                && netns_id(std::path::Path::new(&att.netns)).is_some();
            if !same_pod || !alive {
                continue;
            }
            let (namespace, name) = (att.pod.namespace.clone(), att.pod.name.clone());
            match self.add_found(att, crate::adopt::Method::CniCache) {
                Ok((outcome, _)) => {
                    tracing::info!(%namespace, pod = %name, ?outcome, "adopted a pod attached before the agent saw it (runtime's cached ADD result)");
                    self.metrics.adopted.inc();
                }
                Err(e) => {
                    tracing::warn!(%namespace, pod = %name, error = %e.message, "cannot adopt a pod attached before the agent")
                }
            }
        }
    }

    fn add_found(
        &mut self,
        att: ApiAttachment,
        found_by: crate::adopt::Method,
    ) -> Result<(AddOutcome, Option<LocalWorkload>), AgentError> {
        let started = Instant::now();
        let snapshot = self.snapshot.clone();
        let Some(decided) = snapshot.decide(&att.pod, &self.cfg.excluded_namespaces) else {
            return Err(unknown_pod(&att));
        };
        let pod = snapshot.pod_ref(&att.pod);
        if att.host_interface.is_empty() {
            // The plugin found no host-side veth (a primary CNI without veths). Only an
            // ambient pod needs one; any other pod is left alone, unrecorded.
            return match decided {
                Enrolment::Ambient => Err(AgentError::new(
                    ErrorKind::InvalidRequest,
                    "the plugin found no host-side interface for this ambient pod; \
                     its traffic cannot be captured (is the primary CNI veth-based?)",
                )),
                Enrolment::Excluded => Ok((AddOutcome::Excluded, None)),
                Enrolment::HostNetwork => Ok((AddOutcome::HostNetwork, None)),
                Enrolment::NotAmbient | Enrolment::OptedOut => Ok((AddOutcome::NotAmbient, None)),
            };
        }
        let (link, ifindex) = self
            .sysfs
            .attachment(&att.host_interface)
            .map_err(|e| AgentError::new(ErrorKind::InvalidRequest, e.to_string()))?;
        if att.ips.is_empty() {
            return Err(AgentError::new(
                ErrorKind::InvalidRequest,
                "the attachment has no IP addresses (prevResult.ips is empty)",
            ));
        }
        let record = Record {
            key: att.key.clone(),
            pod: ambient_common::agent_api::PodRef {
                uid: att
                    .pod
                    .uid
                    .clone()
                    .or_else(|| pod.and_then(|p| p.metadata.uid.clone())),
                ..att.pod.clone()
            },
            netns_id: netns_id(std::path::Path::new(&att.netns)),
            netns: att.netns.clone(),
            link: LinkRecord::from_attachment(&link),
            ifindex,
            ips: att.ips.iter().map(|p| p.addr).collect(),
            mac: att.mac,
            since: now(),
            found_by,
            blocker: crate::bypass::blocker(
                &link,
                ifindex,
                &att.ips.iter().map(|p| p.addr).collect::<Vec<_>>(),
                self.cfg.capture_v4,
                self.cfg.capture_v6,
                self.facts.as_ref(),
            ),
        };
        // Never answer "not ambient" for a pod the source cannot place (another pod with the
        // same name, a namespace not seen): the runtime retries.
        if self.state_of(&att.key, &record) == PodState::Unknown {
            return Err(unknown_pod(&att));
        }
        let blocker = record.blocker.clone();
        let st = self.set_record(&att.key, Some(record))?;
        if st == PodState::Uncapturable {
            // Fail closed: an ambient pod does not start uncaptured.
            self.metrics.fail("uncapturable");
            return Err(AgentError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "ambient pod {}/{} cannot be captured on this node: {}",
                    att.pod.namespace,
                    att.pod.name,
                    blocker.unwrap_or_default()
                ),
            ));
        }
        let outcome = match st {
            PodState::Captured => AddOutcome::Captured,
            PodState::Excluded => AddOutcome::Excluded,
            PodState::HostNetwork => AddOutcome::HostNetwork,
            _ => AddOutcome::NotAmbient,
        };
        let workload = self.published.get(&att.key).cloned();
        tracing::debug!(
            namespace = %att.pod.namespace, pod = %att.pod.name, veth = %att.host_interface,
            outcome = ?outcome, elapsed_us = started.elapsed().as_micros() as u64, "ADD handled"
        );
        Ok((outcome, workload))
    }

    fn del(&mut self, key: &AttachmentKey) -> Result<(), AgentError> {
        if !self.records.contains_key(key) {
            return Ok(());
        }
        self.set_record(key, None).map(drop)
    }

    fn gc(&mut self, valid: Vec<AttachmentKey>) -> Result<u32, AgentError> {
        // "Nothing is valid" releases every pod of the node: believed only when the source
        // agrees that none of them is here any more.
        if valid.is_empty() && !self.records.is_empty() {
            let placed = self
                .records
                .values()
                .filter(|r| self.snapshot.pod_ref(&r.pod).is_some())
                .count();
            if placed > 0 || !self.snapshot.synced {
                return Err(AgentError::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "GC with no valid attachment would release all {} attachments while the \
                         source still places {placed} of their pods on this node; refused",
                        self.records.len()
                    ),
                ));
            }
        }
        let valid: BTreeSet<AttachmentKey> = valid.into_iter().collect();
        let stale: Vec<AttachmentKey> = self
            .records
            .keys()
            .filter(|k| !valid.contains(*k))
            .cloned()
            .collect();
        for key in &stale {
            self.set_record(key, None)?;
        }
        Ok(stale.len() as u32)
    }

    fn check(&mut self, att: &ApiAttachment) -> Result<(), AgentError> {
        let fail = |m: String| Err(AgentError::new(ErrorKind::CheckFailed, m));
        let Some(r) = self.records.get(&att.key) else {
            return fail(format!(
                "attachment {}/{} is unknown to the agent",
                att.key.container_id, att.key.ifname
            ));
        };
        if r.link.veth() != att.host_interface {
            return fail(format!(
                "agent recorded host interface {}, runtime reports {}",
                r.link.veth(),
                att.host_interface
            ));
        }
        match self.states.get(&att.key) {
            Some(PodState::Captured) => {}
            Some(PodState::Uncapturable) => {
                return fail(format!(
                    "ambient pod {}/{} is not captured: {}",
                    r.pod.namespace,
                    r.pod.name,
                    r.blocker.as_deref().unwrap_or_default()
                ))
            }
            _ => return Ok(()),
        }
        let want = Self::wanted(r, PodState::Captured);
        let observed = self.dp.observe().map_err(internal)?;
        let drift = self.dp.drift(&observed);
        if !drift.is_empty() {
            return fail(drift.join("; "));
        }
        let missing: Vec<String> = want
            .difference(&observed.elements)
            .map(|e| format!("{e:?}"))
            .collect();
        if !missing.is_empty() {
            return fail(format!(
                "redirection elements missing: {}",
                missing.join(", ")
            ));
        }
        Ok(())
    }

    /// Forgets records whose veth or netns disappeared without a DEL (pod gone, node agent
    /// down at the time): their elements must not linger for a reused name or address.
    /// Returns the keys dropped; the caller releases their elements.
    fn prune_vanished(
        &mut self,
        links: Option<&std::collections::HashMap<String, u32>>,
    ) -> Vec<AttachmentKey> {
        let sysfs = &self.sysfs;
        let gone: Vec<AttachmentKey> = self
            .records
            .iter()
            .filter(|(_, r)| {
                let ifindex = match links {
                    Some(links) => links.get(r.link.veth()).copied(),
                    None => sysfs.ifindex(r.link.veth()),
                };
                let veth_ok = ifindex == Some(r.ifindex);
                let netns_ok = match r.netns_id {
                    Some(id) => netns_id(std::path::Path::new(&r.netns)) == Some(id),
                    None => true,
                };
                if !(veth_ok && netns_ok) {
                    tracing::info!(namespace = %r.pod.namespace, pod = %r.pod.name,
                        veth_ok, netns_ok, "attachment vanished; releasing");
                }
                !(veth_ok && netns_ok)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &gone {
            self.records.remove(key);
            if let Err(e) = self.store.remove(key) {
                tracing::warn!(error = %e, "cannot forget a vanished attachment");
            }
        }
        gone
    }

    fn bump_kernel_generation(&self) {
        self.kernel_generation.fetch_add(1, Ordering::Release);
    }

    /// The counter a drift observer reads before listing the kernel (see [`Reading`]).
    pub fn kernel_generation(&self) -> Arc<AtomicU64> {
        self.kernel_generation.clone()
    }

    /// The periodic check: vanished pods, and kernel drift (missing tables, altered rules,
    /// missing or unexpected elements), repaired. The kernel listing is the expensive part
    /// (tens of ms with hundreds of pods); it comes from the observer thread when it can.
    fn tick(&mut self, reading: Option<Reading>) {
        let started = Instant::now();
        let current = self.kernel_generation.load(Ordering::Acquire);
        let (observed, links) = match reading {
            Some(r) if r.generation == current => (r.observed, r.links),
            Some(_) if self.stale_readings + 1 < MAX_STALE_READINGS => {
                // The core changed the kernel during the reading: compare next time.
                self.stale_readings += 1;
                tracing::debug!("kernel changed during the drift reading; skipped");
                return;
            }
            _ => (self.dp.observe().map_err(|e| e.to_string()), None),
        };
        self.stale_readings = 0;
        let mut problems = Vec::new();
        match observed {
            Ok(observed) => {
                problems.extend(self.dp.drift(&observed));
                if !observed.present {
                    problems.push("tables are missing".into());
                }
                let missing = self
                    .refs
                    .keys()
                    .filter(|e| !observed.elements.contains(*e))
                    .count();
                let extra = observed
                    .elements
                    .iter()
                    .filter(|e| !self.refs.contains_key(*e))
                    .count();
                if missing > 0 {
                    problems.push(format!("{missing} elements missing"));
                }
                if extra > 0 {
                    problems.push(format!("{extra} unexpected elements"));
                }
            }
            Err(e) => self.note_error("observe", &e),
        }
        let compared = started.elapsed();
        let pruned = self.prune_vanished(links.as_ref());
        if !problems.is_empty() || !pruned.is_empty() {
            if !problems.is_empty() {
                tracing::warn!(?problems, "kernel drift; repairing");
                self.metrics.drift_repairs.inc();
            }
            if let Err(e) = self.resync() {
                self.note_error("repair", &e);
            }
        }
        self.drift = problems;
        tracing::debug!(?compared, elapsed = ?started.elapsed(), "drift check done");
    }

    pub fn report(&mut self) -> Report {
        let pods = self
            .records
            .values()
            .map(|r| PodReport {
                namespace: r.pod.namespace.clone(),
                name: r.pod.name.clone(),
                uid: r.pod.uid.clone(),
                container_id: r.key.container_id.clone(),
                ifname: r.key.ifname.clone(),
                ips: r.ips.clone(),
                host_interface: r.link.veth().to_owned(),
                mode: r.link.mode().to_owned(),
                pinned_mac: pinned_mac(r),
                netns: r.netns.clone(),
                state: self
                    .states
                    .get(&r.key)
                    .copied()
                    .unwrap_or(PodState::Unknown),
                found_by: r.found_by,
                since: r.since,
                reason: r
                    .blocker
                    .clone()
                    .filter(|_| self.states.get(&r.key) == Some(&PodState::Uncapturable)),
            })
            .collect();
        let rules = self
            .dp
            .dump()
            .unwrap_or_else(|e| format!("# cannot list rules: {e}\n"));
        Report {
            node: self.cfg.node_name.clone(),
            backend: self.dp.backend().to_owned(),
            pods,
            captured: self.captured_count(),
            uncapturable: self.states.uncapturable,
            elements: self.refs.len(),
            source_synced: self.snapshot.synced,
            source_generation: self.snapshot.generation,
            drift: self.drift.clone(),
            last_error: self.last_error.clone(),
            rules,
        }
    }
}

/// The MAC a record's bridge port is pinned to, as `node-agent pods` shows it.
pub fn pinned_mac(r: &Record) -> Option<String> {
    match (&r.link, r.mac) {
        (crate::state::LinkRecord::Bridged { .. }, Some(m)) => Some(m.to_string()),
        _ => None,
    }
}

fn unknown_pod(att: &ApiAttachment) -> AgentError {
    AgentError::new(
        ErrorKind::TryAgainLater,
        format!(
            "pod {}/{} (uid {}) is not known to the node agent's source yet; try again later",
            att.pod.namespace,
            att.pod.name,
            att.pod.uid.as_deref().unwrap_or("unknown")
        ),
    )
}

/// The uid ztunnel knows a local workload by.
fn workload_uid(r: &Record, pod: Option<&Pod>) -> String {
    r.pod
        .uid
        .clone()
        .or_else(|| pod.and_then(|p| p.metadata.uid.clone()))
        .unwrap_or_else(|| format!("{}/{}", r.pod.namespace, r.pod.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;
    use crate::nft::MemoryDataplane;
    use ambient_common::agent_api::PodRef;
    use ambient_common::manifest::Namespace;

    #[test]
    fn every_recorded_pod_state() {
        use Enrolment::*;
        use PodState as S;
        // (decided, blocked, synced, previous) -> state
        let cases = [
            (Some(Ambient), false, true, None, S::Captured),
            (
                Some(Ambient),
                true,
                true,
                Some(S::Captured),
                S::Uncapturable,
            ),
            (
                Some(Ambient),
                false,
                false,
                Some(S::NotAmbient),
                S::Captured,
            ),
            (
                Some(NotAmbient),
                true,
                true,
                Some(S::Captured),
                S::NotAmbient,
            ),
            (Some(OptedOut), false, true, None, S::OptedOut),
            (Some(Excluded), false, false, None, S::Excluded),
            (Some(HostNetwork), false, true, None, S::HostNetwork),
            // Undecided: unknown once synced; before, whatever it had.
            (None, false, true, Some(S::Captured), S::Unknown),
            (None, false, false, Some(S::Captured), S::Captured),
            (None, true, false, Some(S::Uncapturable), S::Uncapturable),
            (None, false, false, None, S::Unknown),
        ];
        for (decided, blocked, synced, previous, want) in cases {
            assert_eq!(
                PodState::of(decided, blocked, synced, previous),
                want,
                "{decided:?} blocked={blocked} synced={synced} previous={previous:?}"
            );
        }
    }

    /// Interfaces that all have addresses and carry no eBPF program, unless listed.
    #[derive(Default, Clone)]
    struct Facts {
        bpf: Vec<u32>,
    }

    impl crate::bypass::HostFacts for Facts {
        fn has_address(&self, _ifname: &str, _v6: bool) -> bool {
            true
        }
        fn bpf_on_ingress(&self, ifindex: u32) -> Option<&'static str> {
            self.bpf
                .contains(&ifindex)
                .then_some("tc ingress classifier")
        }
    }

    fn with_facts(mut core: Core) -> Core {
        core.set_host_facts(Box::new(Facts::default()));
        core
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        core: Core,
        sys_root: std::path::PathBuf,
        rx: mpsc::UnboundedReceiver<WorkloadChange>,
    }

    fn snapshot(ambient_ns: &[&str], pods: &[(&str, &str)]) -> Arc<Snapshot> {
        let mut s = Snapshot {
            synced: true,
            generation: 1,
            ..Default::default()
        };
        for ns in ["a", "b", "kube-system"] {
            let mut n = Namespace::default();
            n.metadata.name = ns.into();
            if ambient_ns.contains(&ns) {
                n.metadata
                    .labels
                    .insert("istio.io/dataplane-mode".into(), "ambient".into());
            }
            s.namespaces.insert(ns.into(), n);
        }
        for (ns, name) in pods {
            let mut p = Pod::default();
            p.metadata.name = (*name).into();
            p.metadata.namespace = Some((*ns).into());
            s.pods.insert(((*ns).into(), (*name).into()), p);
        }
        Arc::new(s)
    }

    fn fixture(snap: Arc<Snapshot>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sys_root = dir.path().join("sys");
        std::fs::create_dir_all(&sys_root).unwrap();
        let cfg = Config::build(ConfigFile {
            node_name: Some("n".into()),
            manifest_dir: Some(dir.path().into()),
            run_dir: Some(dir.path().join("run")),
            ..Default::default()
        })
        .unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let (tx, rx) = WorkloadFeed::new();
        let core = Core::start(
            Arc::new(cfg),
            Box::new(MemoryDataplane::default()),
            Sysfs {
                root: sys_root.clone(),
            },
            snap,
            Metrics::new(&mut reg),
            tx,
        )
        .map(with_facts)
        .unwrap();
        Fixture {
            _dir: dir,
            core,
            sys_root,
            rx,
        }
    }

    impl Fixture {
        /// What the core told the ztunnel client since the last call.
        fn changes(&mut self) -> Vec<WorkloadChange> {
            let mut out = Vec::new();
            while let Ok(c) = self.rx.try_recv() {
                out.push(c);
            }
            out
        }

        fn veth(&self, name: &str, idx: u32) {
            std::fs::create_dir_all(self.sys_root.join(name)).unwrap();
            std::fs::write(self.sys_root.join(name).join("ifindex"), idx.to_string()).unwrap();
        }

        fn att(&self, id: &str, ns: &str, name: &str, veth: &str, ip: &str) -> ApiAttachment {
            ApiAttachment {
                key: AttachmentKey {
                    container_id: id.into(),
                    ifname: "eth0".into(),
                },
                pod: PodRef {
                    namespace: ns.into(),
                    name: name.into(),
                    uid: None,
                },
                netns: "/nonexistent".into(),
                host_interface: veth.into(),
                ips: vec![format!("{ip}/24").parse().unwrap()],
                mac: None,
            }
        }

        fn add(&mut self, att: ApiAttachment) -> Result<AddOutcome, AgentError> {
            self.core.add(att).map(|(o, _)| o)
        }

        fn elements(&mut self) -> BTreeSet<Element> {
            self.core.dp.observe().unwrap().elements
        }
    }

    #[test]
    fn add_del_gc_touch_only_the_pods_elements() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1"), ("a", "p2"), ("b", "q")]));
        f.veth("v1", 11);
        f.veth("v2", 12);
        f.veth("v3", 13);
        assert_eq!(
            f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap(),
            AddOutcome::Captured
        );
        assert_eq!(
            f.add(f.att("c2", "a", "p2", "v2", "10.0.0.2")).unwrap(),
            AddOutcome::Captured
        );
        assert_eq!(
            f.add(f.att("c3", "b", "q", "v3", "10.0.0.3")).unwrap(),
            AddOutcome::NotAmbient
        );
        assert_eq!(f.elements().len(), 6);
        assert_eq!(f.core.published().count(), 2);
        // ztunnel is told each enrolled pod once, and nothing of the others.
        let told: Vec<String> = f
            .changes()
            .into_iter()
            .map(|c| match c {
                WorkloadChange::Upsert(w) => w.name,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(told, ["p1", "p2"]);
        // What the agent reports on the pods (annotation): the captured ones.
        let captured = f.core.workloads.captured();
        assert_eq!(captured.borrow().len(), 2);
        f.core
            .del(&AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            })
            .unwrap();
        assert_eq!(f.elements().len(), 3);
        assert!(matches!(&f.changes()[..], [WorkloadChange::Remove(uid)] if uid.contains("p1")));
        assert!(captured.borrow().iter().all(|uid| !uid.contains("p1")));
        assert_eq!(captured.borrow().len(), 1);
        // DEL of something unknown succeeds.
        f.core
            .del(&AttachmentKey {
                container_id: "zz".into(),
                ifname: "eth0".into(),
            })
            .unwrap();
        let released = f
            .core
            .gc(vec![AttachmentKey {
                container_id: "c3".into(),
                ifname: "eth0".into(),
            }])
            .unwrap();
        assert_eq!(released, 1);
        assert!(f.elements().is_empty());
        assert_eq!(f.core.records.len(), 1);
        assert_eq!(f.core.published().count(), 0);
        assert!(matches!(&f.changes()[..], [WorkloadChange::Remove(_)]));
    }

    #[test]
    fn an_empty_gc_is_refused_while_the_source_places_the_pods() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        f.veth("veth1", 11);
        f.add(f.att("c1", "a", "p1", "veth1", "10.0.0.1")).unwrap();
        let before = f.elements();
        let err = f.core.gc(Vec::new()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert!(err.message.contains("refused"), "{}", err.message);
        assert_eq!(f.core.records.len(), 1);
        assert_eq!(f.elements(), before);
        // Once the source no longer has the pod, the same GC releases it.
        f.core.snapshot = snapshot(&["a"], &[]);
        assert_eq!(f.core.gc(Vec::new()).unwrap(), 1);
        assert!(f.core.records.is_empty());
    }

    #[test]
    fn bad_input_leaves_no_state() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        let err = f
            .add(f.att("c1", "a", "p1", "missing0", "10.0.0.1"))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        let err = f
            .add(f.att("c1", "a", "p1", "../etc", "10.0.0.1"))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert!(f.core.records.is_empty());
        assert!(f.core.store.load().unwrap().is_empty());
    }

    #[test]
    fn a_pod_the_source_cannot_place_is_try_again_not_not_ambient() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        f.veth("v1", 11);
        let err = f
            .add(f.att("c1", "a", "ghost", "v1", "10.0.0.1"))
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::TryAgainLater);
        let mut other = f.att("c1", "a", "p1", "v1", "10.0.0.1");
        other.pod.uid = Some("not-the-sources-uid".into());
        let mut snap = (*snapshot(&["a"], &[("a", "p1")])).clone();
        snap.pods
            .get_mut(&("a".to_string(), "p1".to_string()))
            .unwrap()
            .metadata
            .uid = Some("the-sources-uid".into());
        f.core.snapshot = Arc::new(snap);
        assert_eq!(f.add(other).unwrap_err().kind, ErrorKind::TryAgainLater);
        assert!(f.core.records.is_empty());
    }

    #[test]
    fn add_adopts_the_newer_snapshot_it_was_decided_in() {
        let mut f = fixture(snapshot(&[], &[]));
        f.veth("v1", 11);
        let newer = {
            let mut s = (*snapshot(&["a"], &[("a", "p1")])).clone();
            s.generation = 2;
            Arc::new(s)
        };
        let (tx, mut rx) = oneshot::channel();
        f.core.handle(Command::Add {
            att: f.att("c1", "a", "p1", "v1", "10.0.0.1"),
            snapshot: newer,
            reply: tx,
        });
        let (outcome, workload) = rx.try_recv().unwrap().unwrap();
        assert_eq!(outcome, AddOutcome::Captured);
        assert!(workload.is_some());
    }

    /// An excluded namespace decides alone: a pod the source does not know, before the
    /// source has synced, is recorded as excluded (its bridge port pinned, nothing captured).
    #[test]
    fn excluded_pods_need_no_source() {
        let mut f = fixture(Arc::new(Snapshot::default()));
        f.veth("v1", 11);
        let att = f.att("c1", "kube-system", "coredns", "v1", "10.0.0.1");
        assert_eq!(f.add(att.clone()).unwrap(), AddOutcome::Excluded);
        assert_eq!(f.core.states.get(&att.key), Some(&PodState::Excluded));
        assert!(f.core.records.contains_key(&att.key));
        assert!(f.changes().is_empty(), "nothing published to ztunnel");
        // Without a host interface too.
        let bare = f.att("c2", "kube-system", "dns2", "", "10.0.0.2");
        assert_eq!(f.add(bare).unwrap(), AddOutcome::Excluded);
        // Other pods the source does not know still wait for it.
        let err = f.add(f.att("c3", "a", "p1", "v1", "10.0.0.3")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::TryAgainLater);
    }

    #[test]
    fn no_host_interface_refuses_only_ambient_pods() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1"), ("b", "q")]));
        let err = f.add(f.att("c1", "a", "p1", "", "10.0.0.1")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidRequest);
        assert_eq!(
            f.add(f.att("c2", "b", "q", "", "10.0.0.2")).unwrap(),
            AddOutcome::NotAmbient
        );
        assert!(f.core.records.is_empty());
    }

    #[test]
    fn a_refused_transaction_changes_nothing() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        f.veth("v1", 11);
        // Make the next kernel transaction fail.
        f.core.dp = Box::new(MemoryDataplane {
            installed: true,
            fail_next: true,
            ..Default::default()
        });
        let err = f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Internal);
        assert!(f.core.records.is_empty());
        assert!(f.core.refs.is_empty());
        assert!(f.core.store.load().unwrap().is_empty());
        // The same ADD retried (kubelet does) succeeds.
        assert_eq!(
            f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap(),
            AddOutcome::Captured
        );
    }

    #[test]
    fn label_flip_enrols_and_releases_running_pods() {
        let mut f = fixture(snapshot(&[], &[("b", "q")]));
        f.veth("v3", 13);
        assert_eq!(
            f.add(f.att("c3", "b", "q", "v3", "10.0.0.3")).unwrap(),
            AddOutcome::NotAmbient
        );
        f.core
            .handle(Command::Snapshot(snapshot(&["b"], &[("b", "q")])));
        assert_eq!(f.elements().len(), 3);
        assert_eq!(f.core.states.map.values().next(), Some(&PodState::Captured));
        f.core
            .handle(Command::Snapshot(snapshot(&[], &[("b", "q")])));
        assert!(f.elements().is_empty());
        // The pod deleted from the source: released, record kept until DEL.
        f.core.handle(Command::Snapshot(snapshot(&["b"], &[])));
        assert!(f.elements().is_empty());
        assert_eq!(f.core.records.len(), 1);
    }

    #[test]
    fn pods_that_cannot_be_captured_are_refused_and_reported_never_captured() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1"), ("b", "q")]));
        // An eBPF program on both host interfaces (Cilium's shape).
        f.core.set_host_facts(Box::new(Facts { bpf: vec![11, 13] }));
        f.veth("v1", 11);
        f.veth("v3", 13);
        // An ambient pod's ADD fails (fail closed), naming why.
        let e = f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidRequest);
        assert!(e.message.contains("eBPF program"), "{}", e.message);
        assert!(f.elements().is_empty());
        assert_eq!(f.core.published().count(), 0);
        // A pod that is not ambient starts as usual...
        assert_eq!(
            f.add(f.att("c3", "b", "q", "v3", "10.0.0.3")).unwrap(),
            AddOutcome::NotAmbient
        );
        // ...and when its namespace turns ambient it is reported, not captured.
        f.core.handle(Command::Snapshot(snapshot(
            &["a", "b"],
            &[("a", "p1"), ("b", "q")],
        )));
        assert!(f.elements().is_empty());
        assert_eq!(f.core.published().count(), 0);
        let report = f.core.report();
        assert_eq!((report.captured, report.uncapturable), (0, 2));
        let q = report.pods.iter().find(|p| p.name == "q").unwrap();
        assert_eq!(q.state, PodState::Uncapturable);
        assert!(q.reason.as_deref().unwrap().contains("v3"));
        // CHECK does not vouch for it either.
        let e = f
            .core
            .check(&f.att("c3", "b", "q", "v3", "10.0.0.3"))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::CheckFailed);
        // Back out of the mesh: no reason to report.
        f.core.handle(Command::Snapshot(snapshot(
            &["a"],
            &[("a", "p1"), ("b", "q")],
        )));
        let report = f.core.report();
        assert_eq!(report.uncapturable, 1);
        let q = report.pods.iter().find(|p| p.name == "q").unwrap();
        assert_eq!((q.state, q.reason.as_deref()), (PodState::NotAmbient, None));
    }

    #[test]
    fn drift_readings_taken_elsewhere_count_only_when_current() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        f.veth("v1", 11);
        f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap();
        let generation = f.core.kernel_generation();
        let mut seen = f.core.dp.observe().unwrap();
        let lost = seen.elements.iter().next().unwrap().clone();
        seen.elements.remove(&lost);
        let reading = |g: u64| {
            Command::Tick(Some(Reading {
                generation: g,
                observed: Ok(seen.clone()),
                links: None,
            }))
        };
        // Taken before the core's last change: not compared.
        let old = generation.load(Ordering::Acquire) - 1;
        f.core.handle(reading(old));
        assert!(f.core.drift.is_empty());
        // Current: compared, and the missing element reported.
        f.core.handle(reading(generation.load(Ordering::Acquire)));
        assert_eq!(f.core.drift, ["1 elements missing"]);
        // Stale readings in a row: the core lists the kernel itself (complete here).
        for _ in 0..MAX_STALE_READINGS {
            f.core.handle(reading(old));
        }
        assert!(f.core.drift.is_empty());
        // The reading's interface list decides which veths vanished.
        let complete = f.core.dp.observe().unwrap();
        let with_links = |links: &[(&str, u32)], g: u64| {
            Command::Tick(Some(Reading {
                generation: g,
                observed: Ok(complete.clone()),
                links: Some(links.iter().map(|(n, i)| (n.to_string(), *i)).collect()),
            }))
        };
        f.core.handle(with_links(
            &[("v1", 11)],
            generation.load(Ordering::Acquire),
        ));
        assert_eq!(f.core.records.len(), 1);
        // Same name, another interface (a new veth): the attachment is gone.
        f.core.handle(with_links(
            &[("v1", 99)],
            generation.load(Ordering::Acquire),
        ));
        assert!(f.core.records.is_empty());
        assert!(f.elements().is_empty());
    }

    #[test]
    fn restart_before_the_source_has_synced_keeps_enrolled_pods() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1"), ("b", "q")]));
        f.veth("v1", 11);
        f.veth("v3", 13);
        f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap();
        f.add(f.att("c3", "b", "q", "v3", "10.0.0.3")).unwrap();
        let kernel = std::mem::replace(&mut f.core.dp, Box::new(MemoryDataplane::default()));
        let mut reg = prometheus_client::registry::Registry::default();
        let (tx, _rx) = crate::ztunnel::WorkloadFeed::new();
        let core = Core::start(
            f.core.cfg.clone(),
            kernel,
            Sysfs {
                root: f.sys_root.clone(),
            },
            Arc::new(Snapshot::default()),
            Metrics::new(&mut reg),
            tx,
        )
        .map(with_facts)
        .unwrap();
        f.core = core;
        assert_eq!(f.elements().len(), 3, "p1 keeps its redirection");
        assert_eq!(f.core.published().count(), 1);
        // The first complete view then decides as usual.
        let mut synced = (*snapshot(&[], &[("a", "p1"), ("b", "q")])).clone();
        synced.generation = 5;
        f.core.handle(Command::Snapshot(Arc::new(synced)));
        assert!(f.elements().is_empty());
    }

    #[test]
    fn shared_elements_are_reference_counted() {
        // Two attachments of one pod on the same bridge share the bridge-level elements.
        let mut f = fixture(snapshot(&["a"], &[("a", "p1")]));
        f.veth("v1", 11);
        f.veth("v2", 12);
        f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap();
        let mut second = f.att("c1", "a", "p1", "v2", "10.0.0.1");
        second.key.ifname = "net1".into();
        f.add(second).unwrap();
        assert_eq!(f.core.captured_count(), 2);
        // PodV4 is shared; removing one attachment must keep it, and ztunnel keeps the pod.
        f.changes();
        f.core
            .del(&AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            })
            .unwrap();
        assert!(f
            .elements()
            .contains(&Element::PodV4("10.0.0.1".parse().unwrap())));
        assert!(f.changes().is_empty());
        assert_eq!(f.core.captured_count(), 1);
        // The last attachment gone: ztunnel forgets the pod, once.
        f.core
            .del(&AttachmentKey {
                container_id: "c1".into(),
                ifname: "net1".into(),
            })
            .unwrap();
        assert!(matches!(
            f.changes().as_slice(),
            [WorkloadChange::Remove(_)]
        ));
        assert_eq!(f.core.captured_count(), 0);
        assert!(f.core.published_uids.is_empty());
        assert!(f.elements().is_empty());
    }

    #[test]
    fn restart_reconciles_from_state_and_kernel() {
        let mut f = fixture(snapshot(&["a"], &[("a", "p1"), ("a", "p2")]));
        f.veth("v1", 11);
        f.veth("v2", 12);
        f.add(f.att("c1", "a", "p1", "v1", "10.0.0.1")).unwrap();
        f.add(f.att("c2", "a", "p2", "v2", "10.0.0.2")).unwrap();
        let kernel = std::mem::replace(&mut f.core.dp, Box::new(MemoryDataplane::default()));
        // v2 vanished while the agent was down; p1 is still there.
        std::fs::remove_dir_all(f.sys_root.join("v2")).unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let (tx, _rx) = crate::ztunnel::WorkloadFeed::new();
        let core = Core::start(
            f.core.cfg.clone(),
            kernel,
            Sysfs {
                root: f.sys_root.clone(),
            },
            snapshot(&["a"], &[("a", "p1"), ("a", "p2")]),
            Metrics::new(&mut reg),
            tx,
        )
        .map(with_facts)
        .unwrap();
        f.core = core;
        assert_eq!(f.elements().len(), 3);
        assert_eq!(f.core.published().count(), 1);
        assert_eq!(f.core.store.load().unwrap().len(), 1);
    }
}

//! The agent's core: the one owner of the kernel rules. It runs on its own thread and takes
//! [`Command`]s in order, so every change is computed against what it knows is installed
//! and applied as one transaction. Desired state = the recorded attachments whose pods the
//! source says are ambient; reconcile = apply the difference, nothing more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ambient_common::agent_api::{
    AddOutcome, AgentError, Attachment as ApiAttachment, AttachmentKey, ErrorKind,
};
use ambient_common::manifest::{Enrolment, Pod};
use ambient_common::ztunnel_api::LocalWorkload;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Config;
use crate::host::{netns_id, Sysfs};
use crate::metrics::Metrics;
use crate::nft::{chain_drift_of, pod_elements, Dataplane, Element};
use crate::source::Snapshot;
use crate::state::{self, LinkRecord, Record};

pub type Reply<T> = oneshot::Sender<Result<T, AgentError>>;

/// Work for the core, in arrival order.
pub enum Command {
    /// Enrol (if ambient) an attachment whose pod the source already knows.
    Add {
        att: ApiAttachment,
        pod: Box<Pod>,
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
    /// Periodic drift check.
    Tick,
    /// Read-only report for the CLI.
    Report { reply: oneshot::Sender<Report> },
}

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
    pub netns: String,
    pub state: PodState,
    pub since: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub node: String,
    pub backend: String,
    pub pods: Vec<PodReport>,
    pub captured: usize,
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
    records: BTreeMap<AttachmentKey, Record>,
    states: BTreeMap<AttachmentKey, PodState>,
    installed: BTreeSet<Element>,
    snapshot: Arc<Snapshot>,
    metrics: Metrics,
    workloads: watch::Sender<Vec<LocalWorkload>>,
    drift: Vec<String>,
    last_error: Option<String>,
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
    pub fn start(
        cfg: Arc<Config>,
        mut dp: Box<dyn Dataplane>,
        sysfs: Sysfs,
        snapshot: Arc<Snapshot>,
        metrics: Metrics,
        workloads: watch::Sender<Vec<LocalWorkload>>,
    ) -> Result<Self, AgentError> {
        let records = state::load(&cfg.state_file()).map_err(internal)?;
        let observed = dp.observe().map_err(internal)?;
        let mut core = Core {
            cfg,
            dp,
            sysfs,
            records,
            states: BTreeMap::new(),
            installed: BTreeSet::new(),
            snapshot,
            metrics,
            workloads,
            drift: Vec::new(),
            last_error: None,
        };
        core.prune_vanished();
        let drift = chain_drift_of(&observed);
        if !observed.present || !drift.is_empty() {
            // First start, or someone changed our rules: install the whole table at once.
            let desired = core.desired();
            core.dp.install(&desired).map_err(internal)?;
            core.installed = desired;
            if observed.present {
                tracing::warn!(
                    ?drift,
                    "fixed rules differed from this version; reinstalled"
                );
            }
        } else {
            core.installed = observed.elements;
            core.reconcile().map_err(internal)?;
        }
        core.publish();
        core.persist();
        Ok(core)
    }

    /// Runs commands until every sender is gone. Blocking: call on a dedicated thread.
    pub fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.blocking_recv() {
            self.handle(cmd);
        }
    }

    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add { att, pod, reply } => {
                let _ = reply.send(self.add(att, &pod));
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
                if let Err(e) = self.reconcile() {
                    self.note_error("reconcile", &e);
                }
            }
            Command::Tick => self.tick(),
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

    /// Finds the source's pod for a record; a different uid means a different pod.
    fn pod_of<'a>(snapshot: &'a Snapshot, r: &Record) -> Option<&'a Pod> {
        let pod = snapshot.pod(&r.pod.namespace, &r.pod.name)?;
        match (&r.pod.uid, &pod.metadata.uid) {
            (Some(a), Some(b)) if a != b => None,
            _ => Some(pod),
        }
    }

    fn state_of(&self, r: &Record) -> PodState {
        match Self::pod_of(&self.snapshot, r) {
            Some(pod) => self
                .snapshot
                .decide(pod, &self.cfg.excluded_namespaces)
                .map(PodState::from)
                .unwrap_or(PodState::Unknown),
            None => PodState::Unknown,
        }
    }

    fn desired(&mut self) -> BTreeSet<Element> {
        let mut states = BTreeMap::new();
        let mut out = BTreeSet::new();
        for (key, r) in &self.records {
            let mut st = self.state_of(r);
            // Until the source has synced, an unknown pod keeps whatever it had.
            if st == PodState::Unknown && !self.snapshot.synced {
                st = self.states.get(key).copied().unwrap_or(PodState::Unknown);
            }
            if st == PodState::Captured {
                if let Some(a) = r.link.to_attachment() {
                    out.extend(pod_elements(&a, &r.ips));
                }
            }
            states.insert(key.clone(), st);
        }
        self.states = states;
        out
    }

    /// Applies the difference between desired and installed. On a refused transaction the
    /// kernel is re-read and the difference recomputed once.
    fn reconcile(&mut self) -> Result<(), crate::nft::DataplaneError> {
        self.metrics.reconcile_runs.inc();
        let before: usize = self.captured_count();
        let desired = self.desired();
        let remove: BTreeSet<Element> = self.installed.difference(&desired).cloned().collect();
        let add: BTreeSet<Element> = desired.difference(&self.installed).cloned().collect();
        if let Err(e) = self.dp.apply(&remove, &add) {
            tracing::warn!(error = %e, "transaction refused; re-reading the kernel");
            let observed = self.dp.observe()?;
            if !observed.present || !chain_drift_of(&observed).is_empty() {
                self.dp.install(&desired)?;
            } else {
                let remove = observed.elements.difference(&desired).cloned().collect();
                let add = desired.difference(&observed.elements).cloned().collect();
                self.dp.apply(&remove, &add)?;
            }
            self.metrics.drift_repairs.inc();
        }
        self.installed = desired;
        let after = self.captured_count();
        if after > before {
            self.metrics.enrolments.inc_by((after - before) as u64);
        } else if before > after {
            self.metrics.releases.inc_by((before - after) as u64);
        }
        self.publish();
        Ok(())
    }

    fn captured_count(&self) -> usize {
        self.states
            .values()
            .filter(|s| **s == PodState::Captured)
            .count()
    }

    /// Publishes the enrolled workloads for the ztunnel client, and the gauge.
    fn publish(&mut self) {
        let workloads: Vec<LocalWorkload> = self
            .records
            .iter()
            .filter(|(k, _)| self.states.get(*k) == Some(&PodState::Captured))
            .map(|(_, r)| self.workload(r))
            .collect();
        self.metrics.enrolled_pods.set(workloads.len() as i64);
        self.workloads.send_if_modified(|w| {
            if *w == workloads {
                false
            } else {
                *w = workloads;
                true
            }
        });
    }

    fn workload(&self, r: &Record) -> LocalWorkload {
        let pod = Self::pod_of(&self.snapshot, r);
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

    fn persist(&mut self) {
        if let Err(e) = state::save(&self.cfg.state_file(), self.records.values()) {
            self.note_error("persist", &e);
        }
    }

    fn add(
        &mut self,
        att: ApiAttachment,
        pod: &Pod,
    ) -> Result<(AddOutcome, Option<LocalWorkload>), AgentError> {
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
                uid: att.pod.uid.clone().or_else(|| pod.metadata.uid.clone()),
                ..att.pod.clone()
            },
            netns_id: netns_id(std::path::Path::new(&att.netns)),
            netns: att.netns.clone(),
            link: LinkRecord::from_attachment(&link),
            ifindex,
            ips: att.ips.iter().map(|p| p.addr).collect(),
            since: now(),
        };
        let previous = self.records.insert(att.key.clone(), record);
        if let Err(e) = self.reconcile() {
            // Nothing was applied: forget the attachment so state matches the kernel.
            match previous {
                Some(p) => self.records.insert(att.key.clone(), p),
                None => self.records.remove(&att.key),
            };
            self.desired();
            self.note_error("add", &e);
            return Err(internal(e));
        }
        self.persist();
        let st = self
            .states
            .get(&att.key)
            .copied()
            .unwrap_or(PodState::Unknown);
        let outcome = match st {
            PodState::Captured => AddOutcome::Captured,
            PodState::Excluded => AddOutcome::Excluded,
            PodState::HostNetwork => AddOutcome::HostNetwork,
            _ => AddOutcome::NotAmbient,
        };
        let workload = (st == PodState::Captured).then(|| self.workload(&self.records[&att.key]));
        tracing::info!(
            namespace = %att.pod.namespace, pod = %att.pod.name, veth = %att.host_interface,
            outcome = ?outcome, "ADD handled"
        );
        Ok((outcome, workload))
    }

    fn del(&mut self, key: &AttachmentKey) -> Result<(), AgentError> {
        if self.records.remove(key).is_none() {
            return Ok(());
        }
        if let Err(e) = self.reconcile() {
            self.note_error("del", &e);
            return Err(internal(e));
        }
        self.persist();
        Ok(())
    }

    fn gc(&mut self, valid: Vec<AttachmentKey>) -> Result<u32, AgentError> {
        let valid: BTreeSet<AttachmentKey> = valid.into_iter().collect();
        let before = self.records.len();
        self.records.retain(|k, _| valid.contains(k));
        let released = (before - self.records.len()) as u32;
        if released > 0 {
            if let Err(e) = self.reconcile() {
                self.note_error("gc", &e);
                return Err(internal(e));
            }
            self.persist();
        }
        Ok(released)
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
        if self.states.get(&att.key) != Some(&PodState::Captured) {
            return Ok(());
        }
        let observed = self.dp.observe().map_err(internal)?;
        let drift = chain_drift_of(&observed);
        if !drift.is_empty() {
            return fail(drift.join("; "));
        }
        let want = r
            .link
            .to_attachment()
            .map(|a| pod_elements(&a, &r.ips))
            .unwrap_or_default();
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

    /// Drops records whose veth or netns disappeared without a DEL (pod gone, node agent
    /// down at the time): their elements must not linger for a reused name or address.
    fn prune_vanished(&mut self) -> usize {
        let sysfs = &self.sysfs;
        let before = self.records.len();
        self.records.retain(|_, r| {
            let veth_ok = sysfs.ifindex(r.link.veth()) == Some(r.ifindex);
            let netns_ok = match r.netns_id {
                Some(id) => netns_id(std::path::Path::new(&r.netns)) == Some(id),
                None => true,
            };
            if !(veth_ok && netns_ok) {
                tracing::info!(namespace = %r.pod.namespace, pod = %r.pod.name,
                    veth_ok, netns_ok, "attachment vanished; releasing");
            }
            veth_ok && netns_ok
        });
        before - self.records.len()
    }

    fn tick(&mut self) {
        let started = Instant::now();
        let pruned = self.prune_vanished();
        match self.dp.observe() {
            Ok(observed) => {
                let drift = chain_drift_of(&observed);
                let desired = self.desired();
                let mut problems = drift.clone();
                if !observed.present {
                    problems.push("tables are missing".into());
                }
                let missing = desired.difference(&observed.elements).count();
                let extra = observed.elements.difference(&desired).count();
                if missing > 0 {
                    problems.push(format!("{missing} elements missing"));
                }
                if extra > 0 {
                    problems.push(format!("{extra} unexpected elements"));
                }
                if !problems.is_empty() {
                    tracing::warn!(?problems, "kernel drift; repairing");
                    self.metrics.drift_repairs.inc();
                    let res = if !observed.present || !drift.is_empty() {
                        self.dp.install(&desired)
                    } else {
                        self.installed = observed.elements;
                        self.reconcile()
                    };
                    match res {
                        Ok(()) => self.installed = desired,
                        Err(e) => self.note_error("repair", &e),
                    }
                } else if pruned > 0 {
                    if let Err(e) = self.reconcile() {
                        self.note_error("reconcile", &e);
                    }
                }
                self.drift = problems;
            }
            Err(e) => self.note_error("observe", &e),
        }
        if pruned > 0 {
            self.persist();
        }
        self.publish();
        tracing::debug!(elapsed = ?started.elapsed(), "drift check done");
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
                netns: r.netns.clone(),
                state: self
                    .states
                    .get(&r.key)
                    .copied()
                    .unwrap_or(PodState::Unknown),
                since: r.since,
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
            elements: self.installed.len(),
            source_synced: self.snapshot.synced,
            source_generation: self.snapshot.generation,
            drift: self.drift.clone(),
            last_error: self.last_error.clone(),
            rules,
        }
    }
}

/// The uid ztunnel knows a local workload by.
fn workload_uid(r: &Record, pod: Option<&Pod>) -> String {
    r.pod
        .uid
        .clone()
        .or_else(|| pod.and_then(|p| p.metadata.uid.clone()))
        .unwrap_or_else(|| format!("{}/{}", r.pod.namespace, r.pod.name))
}

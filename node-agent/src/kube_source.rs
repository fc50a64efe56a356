//! The Kubernetes API source: a list+watch of the pods of this node (field selector
//! `spec.nodeName=<node>`) and of all namespaces, converted into the manifest types the rest
//! of the agent uses and published as whole [`Snapshot`]s behind the same [`Source`] trait as
//! the manifest directory.
//!
//! Each resource runs one reflector loop (`ambient_kube_watch::Reflector`, shared with
//! ztunnel): list (paged) to get a complete view and a
//! `resourceVersion`, then watch from it (with bookmarks), following every event's version.
//! A watch that ends (server timeout, dropped connection) resumes from the last version seen;
//! `410 Gone` (compacted history, as an HTTP status or an `ERROR` event) relists from scratch,
//! and the relist *replaces* the cached view, so objects deleted while disconnected disappear.
//! Failures back off exponentially (capped), reset by the next success.
//!
//! Snapshots carry `synced = false` until both initial lists have completed, so the agent
//! never releases a pod it has simply not read yet. Pods in a terminal phase (Succeeded,
//! Failed) leave the view at once: their IP may be handed to a new pod. A namespace label
//! flip is just a new namespace in the next snapshot: the agent re-decides every pod of it.
//!
//! Optionally ([`KubeSource::annotate`]) the source reports on each pod whether its
//! redirection is installed on this node (annotation [`REDIRECTION_ANNOTATION`] through the
//! `pods/status` subresource, the only write the agent's RBAC allows), from the set of
//! workloads the core publishes: other nodes' ztunnels send HBONE only to pods carrying it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use ambient_common::manifest::{Namespace, ObjectMeta, Pod, PodIp, PodSpec, PodStatus};
use ambient_kube_watch::{Change, Reflector};
use k8s_openapi::api::core::v1 as k8s;
use kube::api::{Patch, PatchParams};
use tokio::sync::{mpsc, watch};

use crate::source::{Snapshot, Source};
use crate::ztunnel::Captured;

pub use ambient_common::constants::REDIRECTION_ANNOTATION;

pub use ambient_kube_watch::ApiCall;

/// Every API call of this module.
pub const API_CALLS: &[ApiCall] = &[
    ApiCall::new("", "pods", "list"),
    ApiCall::new("", "pods", "watch"),
    ApiCall::new("", "namespaces", "list"),
    ApiCall::new("", "namespaces", "watch"),
    ApiCall::new("", "pods/status", "patch"),
];

/// Errors building the client (the shared crate's).
pub use ambient_kube_watch::ClientError as KubeSourceError;
pub use ambient_kube_watch::{client, Backoff};

/// The API source.
pub struct KubeSource {
    pub client: kube::Client,
    pub node_name: String,
    pub backoff: Backoff,
    /// Server-side watch timeout (seconds); the watch is then resumed.
    pub watch_timeout: u32,
    /// Page size of the lists.
    pub page_size: u32,
    /// Report on each pod whether its redirection is installed on this node (the annotation
    /// `ambient.istio.io/redirection: enabled`, through `pods/status`): other nodes' ztunnels
    /// send HBONE only to pods that carry it. `None`: no annotations.
    pub annotate: Option<Captured>,
}

impl KubeSource {
    pub fn new(client: kube::Client, node_name: String) -> Self {
        Self {
            client,
            node_name,
            backoff: Backoff::default(),
            watch_timeout: 290,
            page_size: 500,
            annotate: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Conversion: keep only the fields the decision and the agent use.

fn meta(m: &kube::api::ObjectMeta) -> ObjectMeta {
    let mut annotations = BTreeMap::new();
    if let Some(v) = m
        .annotations
        .as_ref()
        .and_then(|a| a.get(REDIRECTION_ANNOTATION))
    {
        annotations.insert(REDIRECTION_ANNOTATION.to_owned(), v.clone());
    }
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations,
        ..Default::default()
    }
}

/// A Kubernetes Pod as the agent sees it.
pub fn convert_pod(p: &k8s::Pod) -> Pod {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    Pod {
        metadata: meta(&p.metadata),
        spec: PodSpec {
            node_name: spec.and_then(|s| s.node_name.clone()),
            service_account_name: spec.and_then(|s| {
                s.service_account_name
                    .clone()
                    .or_else(|| s.service_account.clone())
            }),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        },
        status: PodStatus {
            phase: status.and_then(|s| s.phase.clone()),
            pod_ip: status.and_then(|s| s.pod_ip.clone()),
            pod_ips: status
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|i| PodIp { ip: i.ip.clone() }).collect())
                .unwrap_or_default(),
            host_ip: status.and_then(|s| s.host_ip.clone()),
        },
    }
}

/// A Kubernetes Namespace as the agent sees it.
pub fn convert_namespace(n: &k8s::Namespace) -> Namespace {
    let mut m = meta(&n.metadata);
    m.annotations.clear();
    Namespace { metadata: m }
}

// ---------------------------------------------------------------------------------------
// The cache both reflectors feed, and what it publishes.

#[derive(Debug)]
enum Update {
    Pods(Change<Pod>),
    Namespaces(Change<Namespace>),
}

#[derive(Debug, Default)]
struct Cache {
    pods: HashMap<(String, String), Pod>,
    namespaces: HashMap<String, Namespace>,
    pods_listed: bool,
    namespaces_listed: bool,
}

fn pod_key(p: &Pod) -> (String, String) {
    (p.namespace().to_owned(), p.metadata.name.clone())
}

impl Cache {
    fn apply(&mut self, u: Update) {
        match u {
            Update::Pods(Change::Relisted(items)) => {
                self.pods = items
                    .into_iter()
                    .filter(|p| !p.is_terminal())
                    .map(|p| (pod_key(&p), p))
                    .collect();
                self.pods_listed = true;
            }
            Update::Pods(Change::Applied(p)) => {
                let key = pod_key(&p);
                if p.is_terminal() {
                    // Its network is gone and its IP may be reused: release it now.
                    self.pods.remove(&key);
                } else {
                    self.pods.insert(key, p);
                }
            }
            Update::Pods(Change::Deleted(p)) => {
                let key = pod_key(&p);
                // A pod of the same name recreated meanwhile has another uid: keep it.
                let same = self.pods.get(&key).is_some_and(|have| {
                    have.metadata.uid == p.metadata.uid || p.metadata.uid.is_none()
                });
                if same {
                    self.pods.remove(&key);
                }
            }
            Update::Namespaces(Change::Relisted(items)) => {
                self.namespaces = items
                    .into_iter()
                    .map(|n| (n.metadata.name.clone(), n))
                    .collect();
                self.namespaces_listed = true;
            }
            Update::Namespaces(Change::Applied(n)) => {
                self.namespaces.insert(n.metadata.name.clone(), n);
            }
            Update::Namespaces(Change::Deleted(n)) => {
                self.namespaces.remove(&n.metadata.name);
            }
        }
    }

    fn snapshot(&self, generation: u64) -> Snapshot {
        Snapshot {
            pods: self.pods.clone(),
            namespaces: self.namespaces.clone(),
            generation,
            synced: self.pods_listed && self.namespaces_listed,
        }
    }
}

impl Source for KubeSource {
    fn run(self: Box<Self>, tx: watch::Sender<Arc<Snapshot>>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (utx, mut urx) = mpsc::channel::<Update>(256);
            let fields = format!("spec.nodeName={}", self.node_name);
            let mut pods = Reflector::new(
                kube::Api::<k8s::Pod>::all(self.client.clone()),
                "pods",
                convert_pod,
                Update::Pods,
            );
            pods.fields = Some(fields);
            let mut namespaces = Reflector::new(
                kube::Api::<k8s::Namespace>::all(self.client.clone()),
                "namespaces",
                convert_namespace,
                Update::Namespaces,
            );
            (pods.backoff, pods.watch_timeout, pods.page_size) =
                (self.backoff, self.watch_timeout, self.page_size);
            (
                namespaces.backoff,
                namespaces.watch_timeout,
                namespaces.page_size,
            ) = (self.backoff, self.watch_timeout, self.page_size);
            let tasks = [
                tokio::spawn(pods.run(utx.clone())),
                tokio::spawn(namespaces.run(utx)),
            ];
            let annotator = self.annotate.clone().map(|captured| {
                tokio::spawn(annotate(self.client.clone(), tx.subscribe(), captured))
            });
            let mut cache = Cache::default();
            let mut generation = tx.borrow().generation;
            let mut was_synced = false;
            while let Some(first) = urx.recv().await {
                cache.apply(first);
                // Publish once per burst.
                while let Ok(more) = urx.try_recv() {
                    cache.apply(more);
                }
                generation += 1;
                let snap = cache.snapshot(generation);
                if snap.synced && !was_synced {
                    tracing::info!(
                        pods = snap.pods.len(),
                        namespaces = snap.namespaces.len(),
                        "Kubernetes source synced"
                    );
                    was_synced = true;
                }
                if tx.send(Arc::new(snap)).is_err() {
                    break;
                }
            }
            for t in tasks {
                t.abort();
            }
            if let Some(a) = annotator {
                a.abort();
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// Recording the decision on the pod.

/// The annotation value a pod should carry (`None`: no annotation): `enabled` while its
/// redirection is installed on this node, whatever its labels say.
pub fn desired_annotation(pod: &Pod, captured: &HashSet<String>) -> Option<&'static str> {
    pod.metadata
        .uid
        .as_ref()
        .filter(|uid| captured.contains(*uid))
        .map(|_| "enabled")
}

async fn annotate(
    client: kube::Client,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    mut captured: Captured,
) {
    // What we last asked for, by uid, so a patch is sent once until the watch echoes it.
    let mut asked: HashMap<String, Option<&'static str>> = HashMap::new();
    loop {
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = captured.changed() => if r.is_err() { return },
        }
        let snap = rx.borrow_and_update().clone();
        if !snap.synced {
            continue;
        }
        let captured_now = captured.borrow_and_update().clone();
        for pod in snap.pods.values() {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let want = desired_annotation(pod, &captured_now);
            let have = pod
                .metadata
                .annotations
                .get(REDIRECTION_ANNOTATION)
                .map(String::as_str);
            if have == want {
                // Echoed by the watch: forget it, so a later manual change is repaired.
                asked.remove(&uid);
                continue;
            }
            if asked.get(&uid) == Some(&want) {
                continue;
            }
            let api: kube::Api<k8s::Pod> = kube::Api::namespaced(client.clone(), pod.namespace());
            let patch =
                serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: want}}});
            match api
                .patch_status(
                    &pod.metadata.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    asked.insert(uid, want);
                }
                Err(e) => {
                    tracing::warn!(namespace = pod.namespace(), pod = %pod.metadata.name, error = %e, "cannot record the enrolment on the pod")
                }
            }
        }
        asked.retain(|uid, _| {
            snap.pods
                .values()
                .any(|p| p.metadata.uid.as_ref() == Some(uid))
        });
    }
}

#[cfg(test)]
mod tests;

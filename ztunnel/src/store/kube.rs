//! The Kubernetes API source: a cluster-wide list+watch of Pods, Namespaces, Services,
//! EndpointSlices, AuthorizationPolicies and PeerAuthentications, kept in a cache of only the
//! fields ztunnel reads, and turned after every burst of events into the same
//! `Vec<Object>` the manifest directory produces, through the same [`parse_manifests`] and
//! [`Store::set_manifest`]. The state the proxy reads is identical whichever source fed it;
//! an update that fails to parse keeps the previous state (the directory's rule).
//!
//! Every resource is read as a `DynamicObject` (the Istio CRDs need no Rust types). The two
//! Istio kinds may not be installed: a `404` on their list means "none" and the list is
//! retried every [`KubeSource::crd_retry`], so installing the CRDs later works. Nothing is
//! published until every kind has listed once ([`KubeSource::run`]'s `synced`).
//!
//! The list/watch loop (paging, bookmarks, resume, `410` relist, backoff) is
//! `ambient_kube_watch::Reflector`, shared with the node agent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambient_common::manifest::{Namespace, Object, ObjectMeta, OwnerReference, Pod};
use ambient_kube_watch::{Backoff, Change, Reflector};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::{parse_manifests, Store};

pub use ambient_kube_watch::{client, ClientError};

pub use ambient_kube_watch::ApiCall;

/// A watched resource.
#[derive(Debug, Clone, Copy)]
struct Watched {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    resource: &'static str,
    /// May be absent (a CRD): 404 means none.
    optional: bool,
    convert: fn(&DynamicObject) -> Kept,
}

const WATCHED: &[Watched] = &[
    Watched {
        group: "",
        version: "v1",
        kind: "Pod",
        resource: "pods",
        optional: false,
        convert: keep_pod,
    },
    Watched {
        group: "",
        version: "v1",
        kind: "Namespace",
        resource: "namespaces",
        optional: false,
        convert: keep_namespace,
    },
    Watched {
        group: "",
        version: "v1",
        kind: "Service",
        resource: "services",
        optional: false,
        convert: |o| keep_other(o, "Service", &["spec"]),
    },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        resource: "endpointslices",
        optional: false,
        convert: keep_slice,
    },
    Watched {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        resource: "authorizationpolicies",
        optional: true,
        convert: |o| keep_other(o, "AuthorizationPolicy", &["spec"]),
    },
    Watched {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        resource: "peerauthentications",
        optional: true,
        convert: |o| keep_other(o, "PeerAuthentication", &["spec"]),
    },
];

/// Every API call this module makes: list and watch of each watched resource.
pub fn api_calls() -> Vec<ApiCall> {
    WATCHED
        .iter()
        .flat_map(|w| ["list", "watch"].map(|verb| ApiCall::new(w.group, w.resource, verb)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// What is kept of each object.

/// The fields of one object ztunnel reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Kept {
    Pod(Pod),
    Namespace(Namespace),
    /// `kind`, and the object trimmed to what `parse_manifests` reads.
    Other(&'static str, Value),
}

impl Kept {
    fn meta(&self) -> (&str, &str, Option<&str>) {
        match self {
            Kept::Pod(p) => (
                p.metadata.namespace.as_deref().unwrap_or(""),
                &p.metadata.name,
                p.metadata.uid.as_deref(),
            ),
            Kept::Namespace(n) => ("", &n.metadata.name, n.metadata.uid.as_deref()),
            Kept::Other(_, v) => (
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                v.pointer("/metadata/uid").and_then(Value::as_str),
            ),
        }
    }

    fn into_object(self) -> Object {
        match self {
            Kept::Pod(p) => Object::Pod(p),
            Kept::Namespace(n) => Object::Namespace(n),
            Kept::Other(kind, v) => Object::Other(kind.to_owned(), v),
        }
    }
}

fn meta(m: &kube::api::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        namespace: m.namespace.clone(),
        uid: m.uid.clone(),
        labels: m.labels.clone().unwrap_or_default(),
        // Only the node agent's report that the pod is captured (HBONE goes only to those).
        annotations: m
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| *k == ambient_common::constants::REDIRECTION_ANNOTATION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        // The controller only: what telemetry names the workload after.
        owner_references: m
            .owner_references
            .iter()
            .flatten()
            .filter(|o| o.controller == Some(true))
            .map(|o| OwnerReference {
                kind: o.kind.clone(),
                name: o.name.clone(),
                controller: Some(true),
            })
            .take(1)
            .collect(),
    }
}

fn meta_value(m: &kube::api::ObjectMeta) -> Value {
    let mut v = Map::new();
    v.insert("name".into(), json!(m.name.clone().unwrap_or_default()));
    if let Some(ns) = &m.namespace {
        v.insert("namespace".into(), json!(ns));
    }
    if let Some(uid) = &m.uid {
        v.insert("uid".into(), json!(uid));
    }
    if let Some(l) = m.labels.as_ref().filter(|l| !l.is_empty()) {
        v.insert("labels".into(), json!(l));
    }
    Value::Object(v)
}

/// A pod: name, namespace, uid, labels, node, service account, host network, phase, IPs.
pub fn keep_pod(o: &DynamicObject) -> Kept {
    let pick = |section: &str, fields: &[&str]| -> Value {
        let mut out = Map::new();
        if let Some(s) = o.data.get(section).and_then(Value::as_object) {
            for f in fields {
                if let Some(v) = s.get(*f) {
                    out.insert((*f).to_owned(), v.clone());
                }
            }
        }
        Value::Object(out)
    };
    let spec = pick(
        "spec",
        &[
            "nodeName",
            "serviceAccountName",
            "serviceAccount",
            "hostNetwork",
        ],
    );
    let status = pick("status", &["phase", "podIP", "podIPs", "hostIP"]);
    let mut pod: Pod = match serde_json::from_value(json!({"spec": spec, "status": status})) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(namespace = ?o.metadata.namespace, pod = ?o.metadata.name, error = %e, "pod with unreadable fields; keeping its name only");
            Pod::default()
        }
    };
    pod.metadata = meta(&o.metadata);
    Kept::Pod(pod)
}

/// A namespace: name, uid, labels.
pub fn keep_namespace(o: &DynamicObject) -> Kept {
    Kept::Namespace(Namespace {
        metadata: meta(&o.metadata),
    })
}

/// Another kind: its metadata (name, namespace, uid, labels) and the top-level `fields`.
pub fn keep_other(o: &DynamicObject, kind: &'static str, fields: &[&str]) -> Kept {
    let mut v = Map::new();
    v.insert("kind".into(), json!(kind));
    v.insert("metadata".into(), meta_value(&o.metadata));
    for f in fields {
        if let Some(x) = o.data.get(*f) {
            v.insert((*f).to_owned(), x.clone());
        }
    }
    Kept::Other(kind, Value::Object(v))
}

/// An EndpointSlice: metadata, ports, and per endpoint only its addresses and readiness.
pub fn keep_slice(o: &DynamicObject) -> Kept {
    let mut kept = keep_other(o, "EndpointSlice", &["ports"]);
    let endpoints: Vec<Value> = o
        .data
        .get("endpoints")
        .and_then(Value::as_array)
        .map(|eps| {
            eps.iter()
                .map(|e| {
                    let mut m = Map::new();
                    if let Some(a) = e.get("addresses") {
                        m.insert("addresses".into(), a.clone());
                    }
                    if let Some(r) = e.pointer("/conditions/ready") {
                        m.insert("conditions".into(), json!({"ready": r}));
                    }
                    Value::Object(m)
                })
                .collect()
        })
        .unwrap_or_default();
    if let Kept::Other(_, v) = &mut kept {
        v["endpoints"] = Value::Array(endpoints);
    }
    kept
}

// ---------------------------------------------------------------------------------------
// The cache.

/// One reflector's report.
#[derive(Debug)]
pub struct Update {
    kind: &'static str,
    change: Change<Kept>,
}

/// Every watched object, by (kind, namespace, name), in a fixed order.
#[derive(Debug, Default)]
pub struct Cache {
    objects: BTreeMap<(&'static str, String, String), Kept>,
    listed: BTreeSet<&'static str>,
}

impl Cache {
    pub fn apply(&mut self, u: Update) {
        let key = |k: &Kept| {
            let (ns, name, _) = k.meta();
            (u.kind, ns.to_owned(), name.to_owned())
        };
        match u.change {
            Change::Relisted(items) => {
                self.objects.retain(|(kind, _, _), _| *kind != u.kind);
                for k in items {
                    self.objects.insert(key(&k), k);
                }
                self.listed.insert(u.kind);
            }
            Change::Applied(k) => {
                self.objects.insert(key(&k), k);
            }
            Change::Deleted(k) => {
                let key = key(&k);
                let uid = k.meta().2.map(str::to_owned);
                // An object of the same name recreated meanwhile has another uid: keep it.
                let same = self
                    .objects
                    .get(&key)
                    .is_some_and(|have| uid.is_none() || have.meta().2 == uid.as_deref());
                if same {
                    self.objects.remove(&key);
                }
            }
        }
    }

    /// Every kind has listed once.
    pub fn synced(&self) -> bool {
        WATCHED.iter().all(|w| self.listed.contains(w.kind))
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The objects, as the directory source would give them.
    pub fn objects(&self) -> Vec<Object> {
        self.objects
            .values()
            .map(|k| k.clone().into_object())
            .collect()
    }
}

/// The order the cache yields objects in (kind, namespace, name), to compare with other
/// sources.
pub fn canonical_order(objs: &mut [Object]) {
    fn key(o: &Object) -> (String, String, String) {
        let (kind, m): (&str, Option<&ObjectMeta>) = match o {
            Object::Pod(p) => ("Pod", Some(&p.metadata)),
            Object::Namespace(n) => ("Namespace", Some(&n.metadata)),
            Object::Other(k, _) => (k, None),
        };
        let (ns, name) = match (m, o) {
            (Some(m), _) => (m.namespace.clone().unwrap_or_default(), m.name.clone()),
            (None, Object::Other(_, v)) => (
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            ),
            _ => Default::default(),
        };
        let rank = WATCHED
            .iter()
            .position(|w| w.kind == kind)
            .unwrap_or(WATCHED.len());
        (format!("{rank:02}"), ns, name)
    }
    objs.sort_by_key(key);
}

// ---------------------------------------------------------------------------------------
// The source.

/// The API source's settings.
#[derive(Clone)]
pub struct KubeSource {
    pub client: kube::Client,
    pub excluded: Vec<String>,
    pub backoff: Backoff,
    /// Server-side watch timeout (seconds).
    pub watch_timeout: u32,
    pub page_size: u32,
    /// How often the list of an absent CRD is retried.
    pub crd_retry: Duration,
    /// After a change arrives, more are collected for at least this long (and at least as
    /// long as the previous rebuild took) before the state is rebuilt, so a stream of events
    /// in a large cluster costs a bounded share of a core instead of one rebuild per event.
    pub batch_delay: Duration,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("excluded", &self.excluded)
            .field("backoff", &self.backoff)
            .field("watch_timeout", &self.watch_timeout)
            .field("page_size", &self.page_size)
            .field("crd_retry", &self.crd_retry)
            .field("batch_delay", &self.batch_delay)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    pub fn new(client: kube::Client, excluded: Vec<String>) -> Self {
        Self {
            client,
            excluded,
            backoff: Backoff::default(),
            watch_timeout: 290,
            page_size: 500,
            crd_retry: Duration::from_secs(60),
            batch_delay: Duration::from_millis(20),
        }
    }

    /// Runs the reflectors and feeds `store` until the task is dropped; `on_change` runs
    /// after each applied update, `synced` is set once the first complete state is in.
    pub async fn run(
        self,
        store: Arc<Store>,
        on_change: impl Fn() + Send + 'static,
        synced: Arc<AtomicBool>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Update>(1024);
        let mut tasks = Vec::new();
        for (i, w) in WATCHED.iter().enumerate() {
            let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(w.group, w.version, w.kind));
            let mut r = Reflector::new(
                kube::Api::<DynamicObject>::all_with(self.client.clone(), &ar),
                w.resource,
                w.convert,
                WRAP[i],
            );
            r.backoff = self.backoff;
            r.watch_timeout = self.watch_timeout;
            r.page_size = self.page_size;
            r.absent_retry = w.optional.then_some(self.crd_retry);
            tasks.push(tokio::spawn(r.run(tx.clone())));
        }
        drop(tx);
        let _abort = AbortOnDrop(tasks);
        let mut cache = Cache::default();
        let mut last_rebuild = Duration::ZERO;
        while let Some(first) = rx.recv().await {
            cache.apply(first);
            if cache.synced() {
                // Not before the first complete state: nothing is published until then.
                let until = tokio::time::Instant::now()
                    + self
                        .batch_delay
                        .max(last_rebuild)
                        .min(Duration::from_secs(2));
                while let Ok(Some(more)) = tokio::time::timeout_at(until, rx.recv()).await {
                    cache.apply(more);
                }
            }
            while let Ok(more) = rx.try_recv() {
                cache.apply(more);
            }
            if !cache.synced() {
                continue;
            }
            let started = std::time::Instant::now();
            let parsed = parse_manifests(&cache.objects(), &self.excluded);
            match parsed {
                Ok(state) => {
                    if !synced.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            objects = cache.len(),
                            workloads = state.workloads.len(),
                            services = state.services.len(),
                            policies = state.policies.len(),
                            "Kubernetes source synced"
                        );
                    }
                    store.set_manifest(state);
                    on_change();
                    last_rebuild = started.elapsed();
                    tracing::debug!(took = ?last_rebuild, objects = cache.len(), "state rebuilt");
                }
                Err(e) => tracing::error!(
                    error = %ambient_common::error::chain(&e),
                    "update from the API rejected; keeping the previous state"
                ),
            }
        }
    }
}

/// The reflectors' tags, in [`WATCHED`]'s order (non-capturing, so plain fn pointers).
const WRAP: [fn(Change<Kept>) -> Update; 6] = [
    |change| Update {
        kind: "Pod",
        change,
    },
    |change| Update {
        kind: "Namespace",
        change,
    },
    |change| Update {
        kind: "Service",
        change,
    },
    |change| Update {
        kind: "EndpointSlice",
        change,
    },
    |change| Update {
        kind: "AuthorizationPolicy",
        change,
    },
    |change| Update {
        kind: "PeerAuthentication",
        change,
    },
];

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests;

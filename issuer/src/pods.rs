//! The issuer's own view of pods: which pod runs as which service account on which node. Fed
//! by a list/watch of pods (Kubernetes) or by polling the manifest directory (the lab); every
//! change bumps a generation that waiting requests watch.

use ambient_common::sync::RwLock;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_common::manifest::{self, Object, Pod};
use ambient_kube_watch::{Change, Reflector};
use tokio::sync::{mpsc, watch};

use crate::authz::{PodFacts, PodView, ServiceAccount};

type Key = (String, String);

/// The pod index. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct Pods {
    inner: Arc<RwLock<HashMap<Key, PodFacts>>>,
    generation: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl Default for Pods {
    fn default() -> Self {
        Self::new()
    }
}

/// The facts the issuer keeps of a pod object.
pub fn facts(p: &Pod) -> (Key, PodFacts) {
    let key = (p.namespace().to_owned(), p.metadata.name.clone());
    let f = PodFacts {
        uid: p.metadata.uid.clone(),
        node: p.spec.node_name.clone().filter(|n| !n.is_empty()),
        service_account: ServiceAccount::new(p.namespace(), p.service_account()),
        terminal: p.is_terminal(),
    };
    (key, f)
}

impl Pods {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(RwLock::new(HashMap::new())),
            generation: watch::channel(0).0,
            synced: watch::channel(false).0,
        }
    }

    fn changed(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces the whole view (a relist, a directory read).
    pub fn replace(&self, pods: Vec<(Key, PodFacts)>) {
        let mut map = self.inner.write();
        *map = pods.into_iter().collect();
        drop(map);
        self.synced.send_replace(true);
        self.changed();
    }

    pub fn apply(&self, key: Key, f: PodFacts) {
        self.inner.write().insert(key, f);
        self.changed();
    }

    pub fn delete(&self, key: &Key) {
        self.inner.write().remove(key);
        self.changed();
    }

    pub fn len(&self) -> usize {
        self.inner.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first complete view is in.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Feeds the index from the Kubernetes API until dropped.
    pub async fn run_kube(self, client: kube::Client) {
        let (tx, mut rx) = mpsc::channel(256);
        let reflector = Reflector::new(
            kube::Api::<k8s_openapi::api::core::v1::Pod>::all(client),
            "pods",
            kube_facts,
            |c| c,
        );
        let task = tokio::spawn(reflector.run(tx));
        while let Some(change) = rx.recv().await {
            match change {
                Change::Relisted(all) => self.replace(all),
                Change::Applied((k, f)) => self.apply(k, f),
                Change::Deleted((k, _)) => self.delete(&k),
            }
        }
        task.abort();
    }

    /// Feeds the index from a manifest directory, read every `every`, until dropped. A
    /// directory that cannot be read keeps the last good view.
    pub async fn run_manifests(self, dir: PathBuf, every: Duration) {
        let mut last: Option<Vec<(Key, PodFacts)>> = None;
        let mut seen: Option<manifest::DirFingerprint> = None;
        loop {
            // Parsed again only when a file changed (a poll of an unchanged directory of
            // thousands of pods costs one stat per file).
            let fp = manifest::dir_fingerprint(&dir);
            if seen.as_ref() == Some(&fp) {
                tokio::time::sleep(every).await;
                continue;
            }
            let d = dir.clone();
            let read = tokio::task::spawn_blocking(move || manifest::load_dir(&d)).await;
            match read {
                Ok(Ok(objects)) => {
                    let mut pods: Vec<(Key, PodFacts)> = objects
                        .iter()
                        .filter_map(|o| match o {
                            Object::Pod(p) => Some(facts(p)),
                            _ => None,
                        })
                        .collect();
                    pods.sort_by(|a, b| a.0.cmp(&b.0));
                    seen = Some(fp);
                    if last.as_ref() != Some(&pods) {
                        tracing::debug!(pods = pods.len(), "manifest directory read");
                        self.replace(pods.clone());
                        last = Some(pods);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the manifest directory; keeping the last view")
                }
                Err(e) => tracing::warn!(error = %e, "manifest reader failed"),
            }
            tokio::time::sleep(every).await;
        }
    }
}

fn kube_facts(p: &k8s_openapi::api::core::v1::Pod) -> (Key, PodFacts) {
    let ns = p
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = p.spec.as_ref();
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    (
        (ns.clone(), p.metadata.name.clone().unwrap_or_default()),
        PodFacts {
            uid: p.metadata.uid.clone(),
            node: spec
                .and_then(|s| s.node_name.clone())
                .filter(|n| !n.is_empty()),
            service_account: ServiceAccount::new(&ns, &sa),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
        },
    )
}

impl PodView for Pods {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        self.inner
            .read()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
        self.inner
            .read()
            .values()
            .any(|p| !p.terminal && p.node.as_deref() == Some(node) && &p.service_account == sa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manifest_directory_feeds_the_view_and_wakes_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let pods = Pods::new();
        let mut changes = pods.subscribe();
        let task = tokio::spawn(
            pods.clone()
                .run_manifests(dir.path().to_owned(), Duration::from_millis(20)),
        );
        changes.changed().await.unwrap();
        assert!(pods.is_synced() && pods.is_empty());
        std::fs::write(
            dir.path().join("p.yaml"),
            "kind: Pod\nmetadata: {name: web-1, namespace: shop, uid: u1}\nspec: {nodeName: node-a, serviceAccountName: web}\n",
        )
        .unwrap();
        changes.changed().await.unwrap();
        let sa = ServiceAccount::new("shop", "web");
        assert!(pods.runs_on("node-a", &sa));
        assert!(!pods.runs_on("node-b", &sa));
        assert_eq!(
            pods.pod("shop", "web-1").unwrap().uid.as_deref(),
            Some("u1")
        );
        task.abort();
    }
}

//! Where the agent learns pods and namespaces. Every source publishes whole [`Snapshot`]s on
//! a watch channel; the agent never sees a half-updated view. This source is a
//! directory of manifests; the Kubernetes API source plugs in behind the same [`Source`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_common::manifest::{self, Enrolment, Namespace, Object, Pod};
use tokio::sync::watch;

/// The pods of this node and all namespaces, as one consistent view.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Keyed by (namespace, name).
    pub pods: HashMap<(String, String), Pod>,
    pub namespaces: HashMap<String, Namespace>,
    /// Bumped on every publication.
    pub generation: u64,
    /// False until the source has delivered its first complete view.
    pub synced: bool,
}

impl Snapshot {
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The enrolment decision for a pod, or `None` while its namespace is unknown.
    pub fn decide(&self, pod: &Pod, excluded: &[String]) -> Option<Enrolment> {
        let ns = self.namespaces.get(pod.namespace());
        if ns.is_none() && !excluded.iter().any(|e| e == pod.namespace()) && !pod.spec.host_network
        {
            // A pod label alone can still decide; otherwise wait for the namespace.
            let decided = Enrolment::decide(pod, None, excluded);
            return (decided != Enrolment::NotAmbient).then_some(decided);
        }
        Some(Enrolment::decide(pod, ns, excluded))
    }
}

/// A source of snapshots.
pub trait Source: Send + 'static {
    /// Runs until the receiver side is gone, publishing on `tx`.
    fn run(self: Box<Self>, tx: watch::Sender<Arc<Snapshot>>) -> tokio::task::JoinHandle<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
}

/// Manifests in a directory, re-read when any file's name, size or mtime changes.
pub struct ManifestDirSource {
    pub dir: PathBuf,
    pub node_name: String,
    pub poll: Duration,
}

impl ManifestDirSource {
    /// Reads the directory once into a snapshot (only this node's pods).
    pub fn load(&self) -> Result<Snapshot, SourceError> {
        let mut snap = Snapshot {
            synced: true,
            ..Default::default()
        };
        for obj in manifest::load_dir(&self.dir)? {
            match obj {
                Object::Pod(p) => {
                    let on_node = p
                        .spec
                        .node_name
                        .as_deref()
                        .is_none_or(|n| n == self.node_name);
                    if on_node && !p.is_terminal() {
                        snap.pods
                            .insert((p.namespace().to_owned(), p.metadata.name.clone()), p);
                    }
                }
                Object::Namespace(n) => {
                    snap.namespaces.insert(n.metadata.name.clone(), n);
                }
                Object::Other(..) => {}
            }
        }
        Ok(snap)
    }
}

impl Source for ManifestDirSource {
    fn run(self: Box<Self>, tx: watch::Sender<Arc<Snapshot>>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last: Option<manifest::DirFingerprint> = None;
            let mut generation = tx.borrow().generation;
            loop {
                let fp = manifest::dir_fingerprint(&self.dir);
                if last.as_ref() != Some(&fp) {
                    match self.load() {
                        Ok(mut snap) => {
                            generation += 1;
                            snap.generation = generation;
                            if tx.send(Arc::new(snap)).is_err() {
                                return;
                            }
                            last = Some(fp);
                        }
                        // Keep the last good view: a half-written file must never release pods.
                        Err(e) => {
                            tracing::warn!(error = %e, "manifest directory unreadable; keeping the last good view")
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(self.poll).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_only_this_nodes_live_pods() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "kind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
             kind: Pod\nmetadata: {name: p1, namespace: a}\nspec: {nodeName: n1}\n---\n\
             kind: Pod\nmetadata: {name: p2, namespace: a}\nspec: {nodeName: n2}\n---\n\
             kind: Pod\nmetadata: {name: p3, namespace: a}\nspec: {nodeName: n1}\nstatus: {phase: Succeeded}\n",
        )
        .unwrap();
        let src = ManifestDirSource {
            dir: dir.path().into(),
            node_name: "n1".into(),
            poll: Duration::from_millis(10),
        };
        let snap = src.load().unwrap();
        assert_eq!(snap.pods.len(), 1);
        let pod = snap.pod("a", "p1").unwrap();
        assert_eq!(snap.decide(pod, &[]), Some(Enrolment::Ambient));
    }

    #[test]
    fn unknown_namespace_defers_unless_the_pod_decides() {
        let snap = Snapshot::default();
        let mut pod = Pod::default();
        pod.metadata.namespace = Some("x".into());
        assert_eq!(snap.decide(&pod, &[]), None);
        pod.metadata
            .labels
            .insert("istio.io/dataplane-mode".into(), "none".into());
        assert_eq!(snap.decide(&pod, &[]), Some(Enrolment::OptedOut));
    }
}

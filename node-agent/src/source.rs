//! Where the agent learns pods and namespaces. Every source publishes whole [`Snapshot`]s on
//! a watch channel; the agent never sees a half-updated view. This source is a
//! directory of manifests; the Kubernetes API source plugs in behind the same [`Source`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ambient_common::agent_api::PodRef;
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

    /// The source's pod for a reference: same namespace and name and, when both sides
    /// know it, the same uid (a different uid is a different pod under a reused name).
    pub fn pod_ref(&self, r: &PodRef) -> Option<&Pod> {
        let pod = self.pod(&r.namespace, &r.name)?;
        match (&r.uid, &pod.metadata.uid) {
            (Some(a), Some(b)) if a != b => None,
            _ => Some(pod),
        }
    }

    /// The agent's ambient decision for the pod `r` names, the one place it is made (the
    /// CNI ADD's wait, the ADD, and every reconcile ask here): `None` while the source
    /// cannot decide yet.
    /// - A namespace excluded by configuration decides alone, without the pod: a node
    ///   whose API connection is down (or not yet synced) still starts its system pods.
    /// - A pod the source does not know (or knows with another uid) is undecided.
    /// - Otherwise [`Enrolment::decide`], the rule ztunnel applies too; while the pod's
    ///   namespace is unknown only what the pod alone decides (hostNetwork, its own label)
    ///   counts, since the namespace's label could still make it ambient.
    pub fn decide(&self, r: &PodRef, excluded: &[String]) -> Option<Enrolment> {
        if excluded.contains(&r.namespace) {
            return Some(Enrolment::Excluded);
        }
        let pod = self.pod_ref(r)?;
        let ns = self.namespaces.get(pod.namespace());
        let decided = Enrolment::decide(pod, ns, excluded);
        (ns.is_some() || decided != Enrolment::NotAmbient).then_some(decided)
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
        let p1 = PodRef {
            namespace: "a".into(),
            name: "p1".into(),
            uid: None,
        };
        assert_eq!(snap.decide(&p1, &[]), Some(Enrolment::Ambient));
    }

    #[test]
    fn every_ambient_decision() {
        let labelled = |name: &str, v: Option<&str>| {
            let mut m = manifest::ObjectMeta {
                name: name.into(),
                ..Default::default()
            };
            if let Some(v) = v {
                m.labels.insert("istio.io/dataplane-mode".into(), v.into());
            }
            m
        };
        let mut snap = Snapshot::default();
        for (ns, label) in [
            ("mesh", Some("ambient")),
            ("plain", None),
            ("kube-system", None),
        ] {
            let n = Namespace {
                metadata: labelled(ns, label),
            };
            snap.namespaces.insert(ns.into(), n);
        }
        // (namespace, name, uid, pod label, hostNetwork)
        let pods = [
            ("mesh", "a", "u-a", None, false),
            ("mesh", "out", "u-out", Some("none"), false),
            ("mesh", "host", "u-host", None, true),
            ("plain", "b", "u-b", None, false),
            ("plain", "in", "u-in", Some("ambient"), false),
            ("kube-system", "dns", "u-dns", Some("ambient"), false),
            ("new", "c", "u-c", None, false),
            ("new", "d", "u-d", Some("ambient"), false),
            ("new", "e", "u-e", Some("none"), false),
            ("new", "f", "u-f", None, true),
        ];
        for (ns, name, uid, label, host) in pods {
            let mut pod = Pod {
                metadata: labelled(name, label),
                ..Default::default()
            };
            pod.metadata.namespace = Some(ns.into());
            pod.metadata.uid = Some(uid.into());
            pod.spec.host_network = host;
            snap.pods.insert((ns.into(), name.into()), pod);
        }
        let excluded = ["kube-system".to_string()];
        let r = |ns: &str, name: &str, uid: Option<&str>| PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.map(Into::into),
        };
        use Enrolment::*;
        let cases = [
            (r("mesh", "a", Some("u-a")), Some(Ambient)),
            (r("mesh", "a", None), Some(Ambient)),
            (r("mesh", "a", Some("u-old")), None),
            (r("mesh", "out", None), Some(OptedOut)),
            (r("mesh", "host", None), Some(HostNetwork)),
            (r("plain", "b", None), Some(NotAmbient)),
            (r("plain", "in", None), Some(Ambient)),
            (r("kube-system", "dns", None), Some(Excluded)),
            (r("kube-system", "unknown", None), Some(Excluded)),
            (r("mesh", "unknown", None), None),
            (r("new", "c", None), None),
            (r("new", "d", None), Some(Ambient)),
            (r("new", "e", None), Some(OptedOut)),
            (r("new", "f", None), Some(HostNetwork)),
        ];
        for (pod, want) in cases {
            assert_eq!(snap.decide(&pod, &excluded), want, "{pod:?}");
        }
    }
}

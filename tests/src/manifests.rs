//! Kubernetes objects for a manifest directory (the node agent's and ztunnel's standalone
//! source): Namespaces and Pods as JSON values, and [`ManifestDir`], which writes files
//! atomically so a watcher never reads half a file.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::topo::PodMeta;

#[derive(Debug, thiserror::Error)]
pub enum ManifestWriteError {
    #[error("cannot write manifest {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest name {0:?} must be a plain file stem")]
    BadName(String),
}

fn labels(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect()
}

/// A Namespace with `labels`.
pub fn namespace(name: &str, label_pairs: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": labels(label_pairs) },
    })
}

/// A Namespace labelled `istio.io/dataplane-mode=ambient`.
pub fn ambient_namespace(name: &str) -> Value {
    use ambient_common::constants::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL};
    namespace(name, &[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)])
}

/// A Pod scheduled on `node_name`, with the identity the runtime passes in `CNI_ARGS`.
pub fn pod(
    meta: &PodMeta,
    node_name: &str,
    service_account: &str,
    label_pairs: &[(&str, &str)],
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": meta.name,
            "namespace": meta.namespace,
            "uid": meta.uid,
            "labels": labels(label_pairs),
        },
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": service_account,
            "containers": [{ "name": "app", "image": "pause" }],
        },
    })
}

/// A manifest directory.
#[derive(Debug, Clone)]
pub struct ManifestDir {
    path: PathBuf,
}

impl ManifestDir {
    pub fn new(path: &Path) -> Result<Self, ManifestWriteError> {
        std::fs::create_dir_all(path).map_err(|source| ManifestWriteError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `<stem>.yaml` holding `objects` as YAML documents (JSON is YAML), replacing it
    /// atomically (temporary file + rename).
    pub fn write(&self, stem: &str, objects: &[Value]) -> Result<PathBuf, ManifestWriteError> {
        if stem.is_empty() || stem.contains('/') || stem.starts_with('.') {
            return Err(ManifestWriteError::BadName(stem.to_owned()));
        }
        let body: String = objects.iter().map(|o| format!("---\n{o}\n")).collect();
        let path = self.path.join(format!("{stem}.yaml"));
        // The temporary name has no manifest extension, so readers skip it.
        let tmp = self.path.join(format!(".{stem}.tmp"));
        let err = |source| ManifestWriteError::Write {
            path: path.clone(),
            source,
        };
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(err)?;
        Ok(path)
    }

    /// Removes `<stem>.yaml` (absent is fine).
    pub fn remove(&self, stem: &str) -> Result<(), ManifestWriteError> {
        let path = self.path.join(format!("{stem}.yaml"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ManifestWriteError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_common::manifest::{load_dir, Enrolment, Object};

    #[test]
    fn written_objects_parse_with_the_shared_reader_and_enrol() {
        let d = tempfile::tempdir().unwrap();
        let m = ManifestDir::new(d.path()).unwrap();
        let meta = PodMeta::new("mesh", "web");
        m.write("ns", &[ambient_namespace("mesh"), namespace("plain", &[])])
            .unwrap();
        m.write(
            "pod-web",
            &[pod(&meta, "node-1", "sa-web", &[("app", "web")])],
        )
        .unwrap();
        let objs = load_dir(d.path()).unwrap();
        let ns = objs
            .iter()
            .find_map(|o| match o {
                Object::Namespace(n) if n.metadata.name == "mesh" => Some(n.clone()),
                _ => None,
            })
            .unwrap();
        let p = objs
            .iter()
            .find_map(|o| match o {
                Object::Pod(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(p.metadata.uid.as_deref(), Some(meta.uid.as_str()));
        assert_eq!(p.spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(p.service_account(), "sa-web");
        assert!(Enrolment::decide(&p, Some(&ns), &[]).is_ambient());
        m.remove("pod-web").unwrap();
        m.remove("pod-web").unwrap();
        assert_eq!(load_dir(d.path()).unwrap().len(), 2);
    }

    #[test]
    fn bad_stems_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let m = ManifestDir::new(d.path()).unwrap();
        for s in ["", "../x", ".hidden"] {
            assert!(matches!(
                m.write(s, &[]),
                Err(ManifestWriteError::BadName(_))
            ));
        }
    }
}

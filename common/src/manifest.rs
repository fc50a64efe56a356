//! Kubernetes objects as the manifest-directory sources read them: the fields this project
//! uses of Pods and Namespaces, typed; every other kind kept as raw JSON for the reader that
//! knows it (ztunnel reads Services, EndpointSlices and AuthorizationPolicies).
//!
//! A manifest directory holds `*.yaml`, `*.yml` and `*.json` files, each with one or more
//! YAML documents (`---`), each document one object or a `List`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read manifest {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {index} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: document {index} ({kind}) has invalid fields: {source}")]
    Object {
        path: PathBuf,
        index: usize,
        kind: String,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

impl Pod {
    /// The pod's namespace, `default` when the manifest leaves it out (as kubectl does).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// The service account, `default` when unset.
    pub fn service_account(&self) -> &str {
        self.spec
            .service_account_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
    }

    /// All pod IPs (`status.podIPs`, falling back to `status.podIP`).
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        let mut out: Vec<std::net::IpAddr> = self
            .status
            .pod_ips
            .iter()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if out.is_empty() {
            out.extend(
                self.status
                    .pod_ip
                    .as_deref()
                    .and_then(|s| s.parse::<std::net::IpAddr>().ok()),
            );
        }
        out
    }

    /// Terminal pods (Succeeded/Failed) hold no network.
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

/// One object read from a manifest directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Pod),
    Namespace(Namespace),
    /// Any other kind, for readers that know it: `(kind, object as JSON)`.
    Other(String, serde_json::Value),
}

/// Parses every document of one file's text. `path` is used in errors only.
pub fn parse_documents(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_json::Value::deserialize(doc).map_err(|source| ManifestError::Yaml {
            path: path.to_owned(),
            index,
            source,
        })?;
        collect(path, index, value, &mut out)?;
    }
    Ok(out)
}

fn collect(
    path: &Path,
    index: usize,
    value: serde_json::Value,
    out: &mut Vec<Object>,
) -> Result<(), ManifestError> {
    let kind = match value.get("kind").and_then(|k| k.as_str()) {
        Some(k) => k.to_owned(),
        // Empty documents (a trailing `---`) and comment-only documents.
        None if value.is_null() => return Ok(()),
        None => String::new(),
    };
    let typed = |e| ManifestError::Object {
        path: path.to_owned(),
        index,
        kind: kind.clone(),
        source: e,
    };
    match kind.as_str() {
        "Pod" => out.push(Object::Pod(serde_json::from_value(value).map_err(typed)?)),
        "Namespace" => out.push(Object::Namespace(
            serde_json::from_value(value).map_err(typed)?,
        )),
        "List" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_array()) {
                for item in items.clone() {
                    collect(path, index, item, out)?;
                }
            }
        }
        _ => out.push(Object::Other(kind.clone(), value)),
    }
    Ok(())
}

/// Name, size and modification time of every file in a manifest directory, sorted: equal
/// fingerprints mean nothing to re-read (the directory sources poll with it).
pub type DirFingerprint = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

/// The directory's [`DirFingerprint`] now (empty when it cannot be read).
pub fn dir_fingerprint(dir: &Path) -> DirFingerprint {
    let mut out: DirFingerprint = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.len(), m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// Reads every manifest file of `dir` (not recursive), in file-name order.
pub fn load_dir(dir: &Path) -> Result<Vec<Object>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A file removed between listing and reading is simply gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(ManifestError::ReadFile { path, source }),
        };
        out.extend(parse_documents(&path, &text)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: "1111"
spec:
  nodeName: node-a
  serviceAccountName: web
status:
  podIP: 10.244.1.5
  podIPs:
  - ip: 10.244.1.5
  - ip: fd00::5
---
apiVersion: v1
kind: Service
metadata:
  name: web
---
"#;

    #[test]
    fn parses_multi_document_files() {
        let objs = parse_documents(Path::new("x.yaml"), DOCS).unwrap();
        assert_eq!(objs.len(), 3);
        let Object::Pod(pod) = &objs[1] else {
            panic!("expected a pod")
        };
        assert_eq!(pod.namespace(), "shop");
        assert_eq!(pod.service_account(), "web");
        assert_eq!(pod.ips().len(), 2);
        assert_eq!(pod.metadata.uid.as_deref(), Some("1111"));
        assert!(matches!(&objs[2], Object::Other(k, _) if k == "Service"));
    }

    #[test]
    fn bad_documents_are_precise_errors() {
        let err = parse_documents(Path::new("bad.yaml"), "kind: Pod\nspec: [").unwrap_err();
        assert!(err.to_string().contains("bad.yaml"), "{err}");
        let err = parse_documents(
            Path::new("bad.yaml"),
            "kind: Pod\nspec:\n  hostNetwork: 3\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("(Pod)"), "{err}");
    }
}

/// Whether a pod belongs in the mesh, and why: the one rule that the node agent (to capture)
/// and ztunnel (to know which peers speak HBONE) both apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enrolment {
    /// Namespace or pod labelled `istio.io/dataplane-mode=ambient`, not opted out.
    Ambient,
    /// No ambient label (or the namespace's label is something else).
    NotAmbient,
    /// The pod is labelled `istio.io/dataplane-mode=none`.
    OptedOut,
    /// The pod's namespace is excluded by configuration.
    Excluded,
    /// The pod uses the host network namespace.
    HostNetwork,
}

impl Enrolment {
    /// Applies BRIEF §3: a pod label wins over the namespace label; `none` opts out;
    /// excluded namespaces and host-network pods are never enrolled.
    pub fn decide(pod: &Pod, namespace: Option<&Namespace>, excluded: &[String]) -> Self {
        use crate::constants::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};
        if pod.spec.host_network {
            return Self::HostNetwork;
        }
        if excluded.iter().any(|n| n == pod.namespace()) {
            return Self::Excluded;
        }
        match pod.metadata.label(DATAPLANE_MODE_LABEL) {
            Some(DATAPLANE_MODE_NONE) => return Self::OptedOut,
            Some(DATAPLANE_MODE_AMBIENT) => return Self::Ambient,
            _ => {}
        }
        let ns_label = namespace.and_then(|ns| ns.metadata.label(DATAPLANE_MODE_LABEL));
        if ns_label == Some(DATAPLANE_MODE_AMBIENT) {
            Self::Ambient
        } else {
            Self::NotAmbient
        }
    }

    pub fn is_ambient(self) -> bool {
        self == Self::Ambient
    }
}

#[cfg(test)]
mod decision_tests {
    use super::*;

    fn pod(ns: &str, label: Option<&str>, host_network: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.namespace = Some(ns.into());
        if let Some(l) = label {
            p.metadata
                .labels
                .insert("istio.io/dataplane-mode".into(), l.into());
        }
        p.spec.host_network = host_network;
        p
    }

    fn ns(label: Option<&str>) -> Namespace {
        let mut n = Namespace::default();
        if let Some(l) = label {
            n.metadata
                .labels
                .insert("istio.io/dataplane-mode".into(), l.into());
        }
        n
    }

    #[test]
    fn decision_table() {
        let excluded = vec!["kube-system".to_string()];
        let cases = [
            (
                pod("a", None, false),
                Some(ns(Some("ambient"))),
                Enrolment::Ambient,
            ),
            (pod("a", None, false), Some(ns(None)), Enrolment::NotAmbient),
            (pod("a", None, false), None, Enrolment::NotAmbient),
            (
                pod("a", Some("ambient"), false),
                Some(ns(None)),
                Enrolment::Ambient,
            ),
            (
                pod("a", Some("none"), false),
                Some(ns(Some("ambient"))),
                Enrolment::OptedOut,
            ),
            (
                pod("a", Some("other"), false),
                Some(ns(Some("ambient"))),
                Enrolment::Ambient,
            ),
            (
                pod("a", None, true),
                Some(ns(Some("ambient"))),
                Enrolment::HostNetwork,
            ),
            (
                pod("kube-system", Some("ambient"), false),
                Some(ns(Some("ambient"))),
                Enrolment::Excluded,
            ),
            (
                pod("a", None, false),
                Some(ns(Some("none"))),
                Enrolment::NotAmbient,
            ),
        ];
        for (i, (p, n, want)) in cases.iter().enumerate() {
            assert_eq!(
                Enrolment::decide(p, n.as_ref(), &excluded),
                *want,
                "case {i}"
            );
        }
    }
}

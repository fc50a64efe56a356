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
    #[error("{path}: not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        #[source]
        source: Box<crate::yaml::Error>,
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
    /// Kind and name of the objects that own this one (a pod's ReplicaSet, Job...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

/// The labels Istio derives a workload's canonical service and revision from, in order.
pub const CANONICAL_NAME_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
pub const CANONICAL_REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

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

    /// The workload the pod belongs to, as Istio names it in telemetry: its controller's
    /// name, with a Deployment's ReplicaSet hash (`pod-template-hash`) taken off and a
    /// CronJob's Job timestamp taken off; the pod's own name when nothing controls it.
    pub fn workload_name(&self) -> String {
        let m = &self.metadata;
        let owner = m
            .owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .or_else(|| m.owner_references.first());
        let Some(o) = owner else {
            return m.name.clone();
        };
        match o.kind.as_str() {
            "ReplicaSet" => match m.label("pod-template-hash") {
                Some(h) => o
                    .name
                    .strip_suffix(h)
                    .and_then(|n| n.strip_suffix('-'))
                    .filter(|n| !n.is_empty())
                    .unwrap_or(&o.name)
                    .to_owned(),
                None => o.name.clone(),
            },
            // A CronJob names its Jobs `<cronjob>-<scheduled minute>` (8 to 10 digits).
            "Job" => match o.name.rsplit_once('-') {
                Some((base, ts))
                    if !base.is_empty()
                        && (8..=10).contains(&ts.len())
                        && ts.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    base.to_owned()
                }
                _ => o.name.clone(),
            },
            _ => o.name.clone(),
        }
    }

    /// Istio's canonical service: the first of [`CANONICAL_NAME_LABELS`] set, else the
    /// workload name.
    pub fn canonical_service(&self) -> String {
        CANONICAL_NAME_LABELS
            .iter()
            .find_map(|l| self.metadata.label(l).filter(|v| !v.is_empty()))
            .map_or_else(|| self.workload_name(), str::to_owned)
    }

    /// Istio's canonical revision: the first of [`CANONICAL_REVISION_LABELS`] set, else
    /// `latest`.
    pub fn canonical_revision(&self) -> String {
        CANONICAL_REVISION_LABELS
            .iter()
            .find_map(|l| self.metadata.label(l).filter(|v| !v.is_empty()))
            .unwrap_or("latest")
            .to_owned()
    }

    /// Region and zone from Istio's `istio-locality` label (`region.zone[.subzone]`), the
    /// override Istio reads before the node's topology labels.
    pub fn locality(&self) -> (Option<String>, Option<String>) {
        let Some(v) = self.metadata.label("istio-locality") else {
            return (None, None);
        };
        let mut parts = v.split('.').map(str::to_owned).filter(|p| !p.is_empty());
        (parts.next(), parts.next())
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
    let docs: Vec<serde_json::Value> =
        crate::yaml::documents(text).map_err(|source| ManifestError::Yaml {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    for (index, value) in docs.into_iter().enumerate() {
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
    /// The ambient rule (namespace or pod label `istio.io/dataplane-mode=ambient`): a pod label wins over the namespace label; `none` opts out;
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

#[cfg(test)]
mod telemetry_name_tests {
    use super::*;

    fn pod(name: &str, owner: Option<(&str, &str)>, labels: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = name.into();
        p.metadata.labels = labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        if let Some((kind, n)) = owner {
            p.metadata.owner_references.push(OwnerReference {
                kind: kind.into(),
                name: n.into(),
                controller: Some(true),
            });
        }
        p
    }

    #[test]
    fn workload_names_follow_the_controller() {
        let cases = [
            ("bare pod", pod("web-0", None, &[]), "web-0"),
            (
                "deployment",
                pod(
                    "web-7f4669bdd9-dg7vn",
                    Some(("ReplicaSet", "web-7f4669bdd9")),
                    &[("pod-template-hash", "7f4669bdd9")],
                ),
                "web",
            ),
            (
                "replicaset without the hash label",
                pod("rs-abcde", Some(("ReplicaSet", "rs")), &[]),
                "rs",
            ),
            (
                "statefulset",
                pod("db-0", Some(("StatefulSet", "db")), &[]),
                "db",
            ),
            (
                "daemonset",
                pod("agent-x2x", Some(("DaemonSet", "agent")), &[]),
                "agent",
            ),
            (
                "cronjob's job",
                pod(
                    "backup-28391040-abcde",
                    Some(("Job", "backup-28391040")),
                    &[],
                ),
                "backup",
            ),
            (
                "plain job",
                pod("migrate-abcde", Some(("Job", "migrate")), &[]),
                "migrate",
            ),
            (
                "job with a short number",
                pod("j-1-x", Some(("Job", "j-1")), &[]),
                "j-1",
            ),
        ];
        for (what, p, want) in cases {
            assert_eq!(p.workload_name(), want, "{what}");
        }
    }

    #[test]
    fn canonical_names_follow_istios_label_order() {
        let deploy = |labels: &[(&str, &str)]| {
            let mut l = labels.to_vec();
            l.push(("pod-template-hash", "abc12"));
            pod("web-abc12-xyz", Some(("ReplicaSet", "web-abc12")), &l)
        };
        let cases = [
            (deploy(&[]), "web", "latest"),
            (deploy(&[("app", "shop"), ("version", "v2")]), "shop", "v2"),
            (
                deploy(&[
                    ("app", "shop"),
                    ("app.kubernetes.io/name", "shop-k8s"),
                    ("app.kubernetes.io/version", "1.4"),
                    ("version", "v2"),
                ]),
                "shop-k8s",
                "1.4",
            ),
            (
                deploy(&[
                    ("app", "shop"),
                    ("service.istio.io/canonical-name", "store"),
                    ("service.istio.io/canonical-revision", "canary"),
                ]),
                "store",
                "canary",
            ),
            (deploy(&[("app", "")]), "web", "latest"),
        ];
        let located = |v: &str| pod("p", None, &[("istio-locality", v)]).locality();
        assert_eq!(
            located("us-east1.us-east1-b.rack4"),
            (Some("us-east1".into()), Some("us-east1-b".into()))
        );
        assert_eq!(located("eu"), (Some("eu".into()), None));
        assert_eq!(pod("p", None, &[]).locality(), (None, None));
        for (p, service, revision) in cases {
            assert_eq!(
                (p.canonical_service(), p.canonical_revision()),
                (service.to_string(), revision.to_string()),
                "{:?}",
                p.metadata.labels
            );
        }
    }
}

//! The manifest-directory source: Pods and Namespaces (typed by `ambient_common::manifest`),
//! Services, EndpointSlices, AuthorizationPolicies and PeerAuthentications (parsed here).
//! The directory is polled on file mtimes; a directory that cannot be read or split into
//! objects keeps the previous state. One object that does not parse or cannot be enforced as
//! written is set aside alone ([`Rejected`]: skipped, or replaced by its fail-closed stand-in)
//! and everything else applies: one bad AuthorizationPolicy must not freeze the node's view.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambient_common::manifest::{self, Enrolment, Namespace, Object, Pod};
use serde::Deserialize;

use super::{
    Endpoint, PeerAuthentication, Service, ServicePort, Store, TargetPort, TelemetryNames,
    Workload, WorkloadSource,
};
use crate::config::MtlsMode;
use crate::policy::{AuthorizationPolicy, PolicyError};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading the manifest directory failed")]
    Load(#[source] manifest::ManifestError),
    #[error("{kind} {name}: invalid fields: {source}")]
    Object {
        kind: &'static str,
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid AuthorizationPolicy")]
    Policy(#[source] PolicyError),
    #[error(
        "PeerAuthentication {name}: mtls.mode {mode:?} is not STRICT, PERMISSIVE, DISABLE or UNSET"
    )]
    PeerAuthMode { name: String, mode: String },
}

/// Everything read from the directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ManifestState {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<AuthorizationPolicy>,
    pub peer_auth: Vec<PeerAuthentication>,
    /// Objects set aside: not applied as written.
    pub rejected: Vec<Rejected>,
}

/// An object that could not be applied as written, and what was done instead.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejected {
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    pub effect: RejectEffect,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectEffect {
    /// Left out (a Service or EndpointSlice that does not parse: its VIP is unknown, so
    /// connections to it are handled like any unknown in-cluster address).
    Skipped,
    /// An AuthorizationPolicy replaced by its fail-closed stand-in, or ignored (AUDIT).
    Policy(crate::policy::Fallback),
    /// A PeerAuthentication with an unreadable mode: STRICT for its namespace.
    Strict,
}

impl RejectEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skipped => "skipped",
            Self::Policy(f) => f.as_str(),
            Self::Strict => "strict",
        }
    }
}

/// `namespace/name` from an object's metadata, read leniently.
fn object_id(v: &serde_json::Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(|n| n.as_str());
    format!(
        "{}/{}",
        s("/metadata/namespace").unwrap_or("default"),
        s("/metadata/name").unwrap_or("<unnamed>")
    )
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Meta {
    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: String,
    port: u16,
    #[serde(default)]
    target_port: Option<IntOrString>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
}

#[derive(Deserialize)]
struct RawService {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: RawServiceSpec,
}

#[derive(Deserialize, Default)]
struct RawConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct RawEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawConditions,
}

#[derive(Deserialize)]
struct RawSlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
struct RawSlice {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    ports: Vec<RawSlicePort>,
}

#[derive(Deserialize, Default)]
struct RawPeerAuthSpec {
    #[serde(default)]
    selector: Option<serde_json::Value>,
    #[serde(default)]
    mtls: Option<RawMtls>,
}

#[derive(Deserialize, Default)]
struct RawMtls {
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Deserialize)]
struct RawPeerAuth {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    spec: RawPeerAuthSpec,
}

fn typed<T: for<'de> Deserialize<'de>>(
    kind: &'static str,
    v: &serde_json::Value,
) -> Result<T, ManifestError> {
    serde_json::from_value(v.clone()).map_err(|source| ManifestError::Object {
        kind,
        name: v
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_owned(),
        source,
    })
}

fn is_tcp(p: &Option<String>) -> bool {
    p.as_deref().is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

/// Builds the state from parsed objects; `excluded` are the never-enrolled namespaces.
pub fn parse_manifests(
    objs: &[Object],
    excluded: &[String],
) -> Result<ManifestState, ManifestError> {
    let namespaces: BTreeMap<&str, &Namespace> = objs
        .iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => Some((n.metadata.name.as_str(), n)),
            _ => None,
        })
        .collect();
    // Pods without an IP yet are kept too (no IP, so they route nothing): the node agent
    // pushes a pod at its CNI ADD, before its status has an IP, and ztunnel checks the push
    // against the pod the cluster source knows.
    let live: Vec<&Pod> = objs
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .filter(|p| !p.is_terminal() && !p.spec.host_network)
        .collect();
    let pods: Vec<&Pod> = live
        .iter()
        .copied()
        .filter(|p| !p.ips().is_empty())
        .collect();
    let mut out = ManifestState::default();
    for p in &live {
        let ns = namespaces.get(p.namespace()).copied();
        let enrolment = Enrolment::decide(p, ns, excluded);
        out.workloads.push(Workload {
            uid: p
                .metadata
                .uid
                .clone()
                .unwrap_or_else(|| format!("{}/{}", p.namespace(), p.metadata.name)),
            name: p.metadata.name.clone(),
            namespace: p.namespace().to_owned(),
            service_account: p.service_account().to_owned(),
            node: p.spec.node_name.clone().unwrap_or_default(),
            ips: p.ips(),
            labels: p.metadata.labels.clone(),
            ambient: enrolment.is_ambient(),
            source: WorkloadSource::Manifest,
            reported: p
                .metadata
                .annotations
                .get(ambient_common::constants::REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "enabled"),
            telemetry: TelemetryNames::of(p),
        });
    }
    let mut slices: BTreeMap<(String, String), Vec<RawSlice>> = BTreeMap::new();
    let mut raw_services = Vec::new();
    for o in objs {
        let Object::Other(kind, v) = o else { continue };
        match kind.as_str() {
            "Service" => match typed::<RawService>("Service", v) {
                Ok(s) => raw_services.push(s),
                Err(e) => out.rejected.push(Rejected {
                    kind: "Service",
                    name: object_id(v),
                    effect: RejectEffect::Skipped,
                    reason: ambient_common::error::chain(&e),
                }),
            },
            "EndpointSlice" => {
                let s: RawSlice = match typed("EndpointSlice", v) {
                    Ok(s) => s,
                    Err(e) => {
                        out.rejected.push(Rejected {
                            kind: "EndpointSlice",
                            name: object_id(v),
                            effect: RejectEffect::Skipped,
                            reason: ambient_common::error::chain(&e),
                        });
                        continue;
                    }
                };
                if let Some(svc) = s.metadata.labels.get("kubernetes.io/service-name") {
                    slices
                        .entry((s.metadata.ns().to_owned(), svc.clone()))
                        .or_default()
                        .push(s);
                }
            }
            "AuthorizationPolicy" => {
                let id = object_id(v);
                let (ns, name) = id.split_once('/').unwrap_or(("default", &id));
                let spec = v.get("spec").cloned().unwrap_or(serde_json::Value::Null);
                let (policy, why) = AuthorizationPolicy::from_object_or_fallback(name, ns, &spec);
                if let Some((fallback, e)) = why {
                    out.rejected.push(Rejected {
                        kind: "AuthorizationPolicy",
                        name: id.clone(),
                        effect: RejectEffect::Policy(fallback),
                        reason: ambient_common::error::chain(&ManifestError::Policy(e)),
                    });
                }
                out.policies.extend(policy);
            }
            "PeerAuthentication" => {
                let (pa, unreadable) = match typed::<RawPeerAuth>("PeerAuthentication", v) {
                    Ok(pa) => (pa, None),
                    Err(e) => {
                        // Keep what can be read: its namespace and whether it is scoped.
                        let id = object_id(v);
                        let (ns, name) = id.split_once('/').unwrap_or(("default", &id));
                        let pa = RawPeerAuth {
                            metadata: Meta {
                                name: name.to_owned(),
                                namespace: Some(ns.to_owned()),
                                labels: BTreeMap::new(),
                            },
                            spec: RawPeerAuthSpec {
                                selector: v.pointer("/spec/selector").cloned(),
                                mtls: Some(RawMtls {
                                    mode: Some("<unreadable>".into()),
                                }),
                            },
                        };
                        (pa, Some(ambient_common::error::chain(&e)))
                    }
                };
                if pa.spec.selector.as_ref().is_some_and(|s| !s.is_null()) {
                    // Workload-scoped modes are not supported; namespace-wide only.
                    continue;
                }
                let name = format!("{}/{}", pa.metadata.ns(), pa.metadata.name);
                let mode = match pa.spec.mtls.and_then(|m| m.mode).as_deref() {
                    None | Some("UNSET") => None,
                    Some("STRICT") => Some(MtlsMode::Strict),
                    Some("PERMISSIVE") | Some("DISABLE") => Some(MtlsMode::Permissive),
                    Some(other) => {
                        // Fail closed: plaintext to the namespace is refused, not allowed.
                        let reason = unreadable.unwrap_or_else(|| {
                            ManifestError::PeerAuthMode {
                                name: name.clone(),
                                mode: other.to_owned(),
                            }
                            .to_string()
                        });
                        out.rejected.push(Rejected {
                            kind: "PeerAuthentication",
                            name,
                            effect: RejectEffect::Strict,
                            reason,
                        });
                        Some(MtlsMode::Strict)
                    }
                };
                out.peer_auth.push(PeerAuthentication {
                    name: pa.metadata.name.clone(),
                    namespace: pa.metadata.ns().to_owned(),
                    mode,
                });
            }
            _ => {}
        }
    }
    for s in raw_services {
        let ns = s.metadata.ns().to_owned();
        let mut vips: Vec<IpAddr> = s
            .spec
            .cluster_ips
            .iter()
            .chain(s.spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        vips.sort();
        vips.dedup();
        let ports: Vec<ServicePort> = s
            .spec
            .ports
            .iter()
            .filter(|p| is_tcp(&p.protocol))
            .map(|p| ServicePort {
                name: p.name.clone(),
                port: p.port,
                target: match &p.target_port {
                    None => TargetPort::Number(p.port),
                    Some(IntOrString::Int(n)) => TargetPort::Number(*n),
                    Some(IntOrString::Str(s)) => match s.parse() {
                        Ok(n) => TargetPort::Number(n),
                        Err(_) => TargetPort::Name(s.clone()),
                    },
                },
            })
            .collect();
        let endpoints = match slices.get(&(ns.clone(), s.metadata.name.clone())) {
            Some(ss) => ss
                .iter()
                .flat_map(|slice| {
                    let ports: BTreeMap<String, u16> = slice
                        .ports
                        .iter()
                        .filter(|p| is_tcp(&p.protocol))
                        .filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.port?)))
                        .collect();
                    slice.endpoints.iter().flat_map(move |e| {
                        let ports = ports.clone();
                        let ready = e.conditions.ready.unwrap_or(true);
                        e.addresses.iter().filter_map(move |a| {
                            Some(Endpoint {
                                ip: a.parse().ok()?,
                                ready,
                                ports: ports.clone(),
                            })
                        })
                    })
                })
                .collect(),
            None => match &s.spec.selector {
                Some(sel) if !sel.is_empty() => pods
                    .iter()
                    .filter(|p| p.namespace() == ns)
                    .filter(|p| sel.iter().all(|(k, v)| p.metadata.labels.get(k) == Some(v)))
                    .flat_map(|p| p.ips())
                    .map(|ip| Endpoint {
                        ip,
                        ready: true,
                        ports: BTreeMap::new(),
                    })
                    .collect(),
                _ => Vec::new(),
            },
        };
        out.services.push(Service::new(
            s.metadata.name.clone(),
            ns,
            vips,
            ports,
            endpoints,
        ));
    }
    Ok(out)
}

/// Loads and parses the directory once.
pub fn load(dir: &Path, excluded: &[String]) -> Result<ManifestState, ManifestError> {
    let objs = manifest::load_dir(dir).map_err(ManifestError::Load)?;
    parse_manifests(&objs, excluded)
}

/// Polls `dir` every `interval`, feeding each successfully parsed change to `store`;
/// `on_change` runs after each applied update. Never returns.
pub async fn poll_manifests(
    dir: PathBuf,
    interval: Duration,
    excluded: Vec<String>,
    store: Arc<Store>,
    on_change: impl Fn() + Send + 'static,
) {
    let mut last = None;
    loop {
        let fp = manifest::dir_fingerprint(&dir);
        if last.as_ref() != Some(&fp) {
            match load(&dir, &excluded) {
                Ok(state) => {
                    tracing::info!(
                        dir = %dir.display(),
                        workloads = state.workloads.len(),
                        services = state.services.len(),
                        policies = state.policies.len(),
                        "manifests loaded"
                    );
                    store.set_manifest(state);
                    on_change();
                }
                Err(e) => tracing::error!(
                    dir = %dir.display(),
                    error = %ambient_common::error::chain(&e),
                    "manifest update rejected; keeping the previous state"
                ),
            }
            last = Some(fp);
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}, annotations: {ambient.istio.io/redirection: enabled}}
spec: {nodeName: n2, serviceAccountName: web}
status: {podIP: 10.2.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy, uid: u2, labels: {app: old}}
spec: {nodeName: n2}
status: {podIP: 10.2.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: hostnet, namespace: shop, uid: u3}
spec: {nodeName: n2, hostNetwork: true}
status: {podIP: 192.168.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: old-abc, namespace: legacy, labels: {kubernetes.io/service-name: old}}
addressType: IPv4
endpoints: [{addresses: [10.2.0.6], conditions: {ready: true}}, {addresses: [10.2.0.7], conditions: {ready: false}}]
ports: [{name: http, port: 9090, protocol: TCP}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
"#;

    fn parse(text: &str) -> Result<ManifestState, ManifestError> {
        let objs = manifest::parse_documents(Path::new("t.yaml"), text).unwrap();
        parse_manifests(&objs, &["kube-system".to_string()])
    }

    #[test]
    fn reads_every_kind() {
        let m = parse(DOCS).unwrap();
        assert_eq!(m.workloads.len(), 2, "host-network pod skipped");
        let web = m.workloads.iter().find(|w| w.name == "web-1").unwrap();
        assert!(web.ambient && web.reported);
        assert_eq!(web.node, "n2");
        let old = m.workloads.iter().find(|w| w.name == "old-1").unwrap();
        assert!(!old.ambient && !old.reported);
        let svc = m.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(svc.ports.len(), 1, "UDP port dropped");
        assert_eq!(svc.pick(80), Some("10.2.0.5:8080".parse().unwrap()));
        let old_svc = m.services.iter().find(|s| s.name == "old").unwrap();
        assert_eq!(old_svc.pick(80), Some("10.2.0.6:9090".parse().unwrap()));
        assert_eq!(
            old_svc.pick(80),
            Some("10.2.0.6:9090".parse().unwrap()),
            "unready skipped"
        );
        assert_eq!(m.policies.len(), 1);
        assert_eq!(m.peer_auth[0].mode, Some(MtlsMode::Strict));
        let store = Store::new("n1", "cluster.local");
        store.set_manifest(m);
        let st = store.snapshot();
        assert_eq!(
            st.mtls_mode("shop", "istio-system", MtlsMode::Permissive),
            MtlsMode::Strict
        );
        assert_eq!(
            st.mtls_mode("legacy", "istio-system", MtlsMode::Permissive),
            MtlsMode::Permissive
        );
        assert!(
            st.local_workload("10.2.0.5".parse().unwrap(), "n1")
                .is_none(),
            "remote"
        );
        assert!(st.service("10.96.0.10".parse().unwrap()).is_some());
    }

    #[test]
    fn bad_objects_are_set_aside_with_a_precise_reason() {
        let cases = [
            (
                "kind: Service\nmetadata: {name: s}\nspec: {ports: [{port: nope}]}\n",
                "Service",
                "default/s",
                RejectEffect::Skipped,
                "Service s",
            ),
            (
                "kind: AuthorizationPolicy\nmetadata: {name: p, namespace: x}\nspec: {action: AUDIT}\n",
                "AuthorizationPolicy",
                "x/p",
                RejectEffect::Policy(crate::policy::Fallback::Ignored),
                "AUDIT",
            ),
            (
                "kind: PeerAuthentication\nmetadata: {name: p}\nspec: {mtls: {mode: LOOSE}}\n",
                "PeerAuthentication",
                "default/p",
                RejectEffect::Strict,
                "LOOSE",
            ),
            (
                "kind: PeerAuthentication\nmetadata: {name: p, namespace: q}\nspec: {mtls: 3}\n",
                "PeerAuthentication",
                "q/p",
                RejectEffect::Strict,
                "invalid fields",
            ),
        ];
        for (text, kind, name, effect, needle) in cases {
            let m = parse(text).unwrap();
            assert_eq!(m.rejected.len(), 1, "{text}");
            let r = &m.rejected[0];
            assert_eq!((r.kind, r.name.as_str(), r.effect), (kind, name, effect));
            assert!(r.reason.contains(needle), "{}", r.reason);
        }
    }

    /// Attack 8: one AuthorizationPolicy ztunnel cannot enforce (AUDIT, CUSTOM, a DENY with
    /// a bad field) no longer rejects the whole update: pods, services and the other
    /// policies still apply, and the bad DENY/CUSTOM ones deny their own selection.
    #[test]
    fn a_bad_policy_is_skipped_alone_and_fails_closed_for_its_selection() {
        use crate::identity::Identity;
        use crate::policy::{evaluate, Decision, Request, Target};
        let extra = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  selector: {matchLabels: {app: admin}}
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken-deny, namespace: shop}
spec:
  action: DENY
  selector: {matchLabels: {app: cache}}
  rules: [{to: [{operation: {ports: [redis]}}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, uid: u9, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec: {clusterIP: 10.96.0.99, ports: [{port: nope}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: odd, namespace: legacy}
spec: {mtls: {mode: SOMETIMES}}
"#;
        let m = parse(&format!("{DOCS}{extra}")).unwrap();
        assert!(
            m.workloads.iter().any(|w| w.name == "web-2"),
            "later pods apply"
        );
        assert!(
            m.services.iter().any(|s| s.name == "web"),
            "other services apply"
        );
        let verdict = |ns: &str, app: &str, src_ns: &str| {
            let l = BTreeMap::from([("app".to_string(), app.to_string())]);
            let id = Identity::new("cluster.local", src_ns, "x");
            evaluate(
                &m.policies,
                "istio-system",
                &Target {
                    namespace: ns,
                    labels: &l,
                },
                &Request {
                    src_identity: Some(&id),
                    src_ip: "10.0.0.1".parse().unwrap(),
                    dst_port: 80,
                },
            )
        };
        // The valid DENY still applies; the AUDIT one changes nothing.
        assert_eq!(
            verdict("shop", "web", "legacy"),
            Decision::Deny("shop/deny-legacy".into())
        );
        assert_eq!(verdict("shop", "web", "shop"), Decision::Allow);
        // CUSTOM and the broken DENY deny their own selection, nothing else.
        assert_eq!(
            verdict("shop", "admin", "shop"),
            Decision::Deny("shop/ext-authz".into())
        );
        assert_eq!(
            verdict("shop", "cache", "shop"),
            Decision::Deny("shop/broken-deny".into())
        );
        assert_eq!(verdict("legacy", "admin", "shop"), Decision::Allow);
        // An unknown mTLS mode is STRICT for its namespace (plaintext refused, not allowed).
        let store = Store::new("n1", "cluster.local");
        store.set_manifest(m);
        assert_eq!(
            store
                .snapshot()
                .mtls_mode("legacy", "istio-system", MtlsMode::Permissive),
            MtlsMode::Strict
        );
    }

    #[test]
    fn every_prefix_of_the_fixture_is_handled() {
        for end in (0..DOCS.len()).step_by(7) {
            if let Ok(objs) = manifest::parse_documents(Path::new("t.yaml"), &DOCS[..end]) {
                let _ = parse_manifests(&objs, &[]);
            }
        }
    }
}

#[cfg(test)]
mod policy_yaml_tests {
    use super::*;
    use crate::identity::Identity;
    use crate::policy::{evaluate, Decision, Request, Target};

    #[test]
    fn deny_principal_from_yaml_denies() {
        let text = concat!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
            "metadata: {name: no-a1, namespace: db}\n",
            "spec:\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/sa-a1]}}]}]\n",
        );
        let objs = manifest::parse_documents(Path::new("t.yaml"), text).unwrap();
        let m = parse_manifests(&objs, &[]).unwrap();
        let id = Identity::new("cluster.local", "shop", "sa-a1");
        let labels = BTreeMap::new();
        let d = evaluate(
            &m.policies,
            "istio-system",
            &Target {
                namespace: "db",
                labels: &labels,
            },
            &Request {
                src_identity: Some(&id),
                src_ip: "10.0.0.1".parse().unwrap(),
                dst_port: 8080,
            },
        );
        assert_eq!(d, Decision::Deny("db/no-a1".into()), "{:?}", m.policies);
    }
}

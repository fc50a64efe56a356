//! The signing decision, as a pure function of who asks, for what, and which pods run where.
//!
//! Two kinds of callers get certificates:
//! - a node proxy (the ztunnel service account) asking on a workload's behalf
//!   (`ImpersonatedIdentity`): only for an identity with a pod scheduled on the caller's own
//!   node now;
//! - a workload asking for its own identity (Istio's sidecars, waypoints and dedicated-mode
//!   ztunnels): only the identity of the service account its token names, and only with a
//!   token bound to a pod that exists.
//!
//! Everything else is refused, with a reason that becomes the gRPC status and the metric label.

use ambient_common::spiffe::SpiffeId;

/// A Kubernetes service account, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Parses `namespace/name`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self::new(ns, name))
    }

    /// Parses a token review's user name, `system:serviceaccount:<namespace>:<name>`.
    pub fn from_username(user: &str) -> Option<Self> {
        let rest = user.strip_prefix("system:serviceaccount:")?;
        let (ns, name) = rest.split_once(':')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains(':')).then(|| Self::new(ns, name))
    }
}

impl std::fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod a token is bound to, as the token review reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    /// The pod's UID, when the review gives it: a token of a deleted pod whose name was reused
    /// must not pass for the new pod.
    pub uid: Option<String>,
}

/// Who asks, as authentication established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub service_account: ServiceAccount,
    /// The pod the token is bound to (Kubernetes bound service-account tokens).
    pub pod: Option<BoundPod>,
    /// The node the credential names directly (the token review's `node-name`, or a lab node
    /// credential).
    pub node: Option<String>,
}

/// What the issuer knows of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: Option<String>,
    pub node: Option<String>,
    pub service_account: ServiceAccount,
    /// Succeeded or Failed: holds no network, gets no certificate.
    pub terminal: bool,
}

/// The view of pods the decision needs.
pub trait PodView {
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether a live pod running as `sa` is scheduled on `node`.
    fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool;
}

/// The issuer's fixed rules.
#[derive(Debug, Clone)]
pub struct Policy {
    pub trust_domain: String,
    /// The service accounts that may ask on another workload's behalf.
    pub node_proxies: Vec<ServiceAccount>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{requested} is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        requested: String,
        trust_domain: String,
    },
    #[error(
        "{caller} may not ask for another workload's identity ({requested}); only a node proxy may"
    )]
    NotNodeProxy {
        caller: ServiceAccount,
        requested: String,
    },
    #[error("the caller's token is bound to pod {namespace}/{name}, which does not exist (or was replaced)")]
    BoundPodGone { namespace: String, name: String },
    #[error("the caller's token is bound to pod {pod}, which runs as {actual}, not {claimed}")]
    BoundPodMismatch {
        pod: String,
        actual: String,
        claimed: String,
    },
    #[error("the caller's credential names node {credential} but its pod is on {pod_node}")]
    NodeMismatch {
        credential: String,
        pod_node: String,
    },
    #[error("the caller's token is not bound to a pod on a node")]
    NoNode,
    #[error("no pod running as {namespace}/{service_account} is scheduled on node {node}")]
    NotOnNode {
        node: String,
        namespace: String,
        service_account: String,
    },
    #[error("{caller} may only ask for its own identity, not {requested}")]
    NotOwnIdentity {
        caller: ServiceAccount,
        requested: String,
    },
    #[error("a workload asking for its own identity needs a token bound to a pod")]
    NotBound,
}

impl Refusal {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Refusal::NotNodeProxy { .. } => "not_node_proxy",
            Refusal::BoundPodGone { .. } => "bound_pod_gone",
            Refusal::BoundPodMismatch { .. } => "bound_pod_mismatch",
            Refusal::NodeMismatch { .. } => "node_mismatch",
            Refusal::NoNode => "no_node",
            Refusal::NotOnNode { .. } => "not_on_node",
            Refusal::NotOwnIdentity { .. } => "not_own_identity",
            Refusal::NotBound => "not_bound",
        }
    }

    /// Whether waiting for the pod view to catch up could change the answer (a pod just
    /// created, a watch a moment behind).
    pub fn may_resolve(&self) -> bool {
        matches!(
            self,
            Refusal::NotOnNode { .. } | Refusal::BoundPodGone { .. } | Refusal::NoNode
        )
    }
}

/// Where the caller runs: its bound pod's node, checked against what the credential says.
fn caller_node(caller: &Caller, pods: &dyn PodView) -> Result<Option<String>, Refusal> {
    let Some(bound) = &caller.pod else {
        return Ok(caller.node.clone());
    };
    let gone = || Refusal::BoundPodGone {
        namespace: bound.namespace.clone(),
        name: bound.name.clone(),
    };
    let facts = pods.pod(&bound.namespace, &bound.name).ok_or_else(gone)?;
    if facts.terminal {
        return Err(gone());
    }
    if let (Some(want), Some(have)) = (&bound.uid, &facts.uid) {
        if want != have {
            return Err(gone());
        }
    }
    if facts.service_account != caller.service_account {
        return Err(Refusal::BoundPodMismatch {
            pod: format!("{}/{}", bound.namespace, bound.name),
            actual: facts.service_account.to_string(),
            claimed: caller.service_account.to_string(),
        });
    }
    match (&caller.node, &facts.node) {
        (Some(cred), Some(pod_node)) if cred != pod_node => Err(Refusal::NodeMismatch {
            credential: cred.clone(),
            pod_node: pod_node.clone(),
        }),
        (_, Some(n)) => Ok(Some(n.clone())),
        (cred, None) => Ok(cred.clone()),
    }
}

/// Decides whether `caller` may have a certificate for `requested`. `impersonated`: the
/// request names the identity in `ImpersonatedIdentity` (a node proxy asking for a workload).
pub fn decide(
    policy: &Policy,
    caller: &Caller,
    requested: &SpiffeId,
    impersonated: bool,
    pods: &dyn PodView,
) -> Result<(), Refusal> {
    if requested.trust_domain != policy.trust_domain {
        return Err(Refusal::ForeignTrustDomain {
            requested: requested.to_string(),
            trust_domain: policy.trust_domain.clone(),
        });
    }
    let wanted = ServiceAccount::new(&requested.namespace, &requested.service_account);
    let own = wanted == caller.service_account;
    if impersonated && !own {
        if !policy.node_proxies.contains(&caller.service_account) {
            return Err(Refusal::NotNodeProxy {
                caller: caller.service_account.clone(),
                requested: requested.to_string(),
            });
        }
        let node = caller_node(caller, pods)?.ok_or(Refusal::NoNode)?;
        if !pods.runs_on(&node, &wanted) {
            return Err(Refusal::NotOnNode {
                node,
                namespace: wanted.namespace,
                service_account: wanted.name,
            });
        }
        return Ok(());
    }
    if !own {
        return Err(Refusal::NotOwnIdentity {
            caller: caller.service_account.clone(),
            requested: requested.to_string(),
        });
    }
    // Its own identity: the token must belong to a pod that exists now (a node credential
    // without a pod is a node proxy's, which never needs its own workload identity).
    if caller.pod.is_none() {
        return Err(Refusal::NotBound);
    }
    caller_node(caller, pods)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Pods(BTreeMap<(String, String), PodFacts>);

    impl PodView for Pods {
        fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
            self.0.get(&(namespace.into(), name.into())).cloned()
        }
        fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
            self.0
                .values()
                .any(|p| !p.terminal && p.node.as_deref() == Some(node) && &p.service_account == sa)
        }
    }

    fn pods() -> Pods {
        let mut m = BTreeMap::new();
        let mut add = |ns: &str, name: &str, uid: &str, node: &str, sa: (&str, &str), terminal| {
            m.insert(
                (ns.to_owned(), name.to_owned()),
                PodFacts {
                    uid: Some(uid.into()),
                    node: Some(node.into()),
                    service_account: ServiceAccount::new(sa.0, sa.1),
                    terminal,
                },
            );
        };
        add(
            "istio-system",
            "zt-a",
            "u-zt-a",
            "node-a",
            ("istio-system", "ztunnel"),
            false,
        );
        add(
            "istio-system",
            "zt-b",
            "u-zt-b",
            "node-b",
            ("istio-system", "ztunnel"),
            false,
        );
        add("shop", "web-1", "u-web", "node-a", ("shop", "web"), false);
        add("shop", "db-1", "u-db", "node-b", ("shop", "db"), false);
        add(
            "shop",
            "batch-1",
            "u-batch",
            "node-a",
            ("shop", "batch"),
            true,
        );
        Pods(m)
    }

    fn policy() -> Policy {
        Policy {
            trust_domain: "cluster.local".into(),
            node_proxies: vec![ServiceAccount::new("istio-system", "ztunnel")],
        }
    }

    fn ztunnel_on(pod: &str, uid: Option<&str>, node: Option<&str>) -> Caller {
        Caller {
            service_account: ServiceAccount::new("istio-system", "ztunnel"),
            pod: Some(BoundPod {
                namespace: "istio-system".into(),
                name: pod.into(),
                uid: uid.map(Into::into),
            }),
            node: node.map(Into::into),
        }
    }

    fn node_credential(node: &str) -> Caller {
        Caller {
            service_account: ServiceAccount::new("istio-system", "ztunnel"),
            pod: None,
            node: Some(node.into()),
        }
    }

    fn workload(ns: &str, sa: &str, pod: Option<&str>) -> Caller {
        Caller {
            service_account: ServiceAccount::new(ns, sa),
            pod: pod.map(|p| BoundPod {
                namespace: ns.into(),
                name: p.into(),
                uid: None,
            }),
            node: None,
        }
    }

    #[test]
    fn table() {
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let db = "spiffe://cluster.local/ns/shop/sa/db";
        // (what, caller, requested identity, impersonated, expected refusal reason)
        type Case<'a> = (&'a str, Caller, &'a str, bool, Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            (
                "ztunnel, own node's pod",
                ztunnel_on("zt-a", Some("u-zt-a"), None),
                web,
                true,
                Ok(()),
            ),
            (
                "node credential, own node's pod",
                node_credential("node-a"),
                web,
                true,
                Ok(()),
            ),
            (
                "ztunnel, another node's pod",
                ztunnel_on("zt-a", None, None),
                db,
                true,
                Err("not_on_node"),
            ),
            (
                "node credential, another node's pod",
                node_credential("node-a"),
                db,
                true,
                Err("not_on_node"),
            ),
            (
                "terminal pod holds no identity",
                node_credential("node-a"),
                "spiffe://cluster.local/ns/shop/sa/batch",
                true,
                Err("not_on_node"),
            ),
            (
                "foreign trust domain",
                node_credential("node-a"),
                "spiffe://evil.local/ns/shop/sa/web",
                true,
                Err("foreign_trust_domain"),
            ),
            (
                "workload impersonating another",
                workload("shop", "web", Some("web-1")),
                db,
                true,
                Err("not_node_proxy"),
            ),
            (
                "ztunnel token of a deleted pod",
                ztunnel_on("zt-gone", None, None),
                web,
                true,
                Err("bound_pod_gone"),
            ),
            (
                "ztunnel token of a replaced pod",
                ztunnel_on("zt-a", Some("old-uid"), None),
                web,
                true,
                Err("bound_pod_gone"),
            ),
            (
                "credential and pod disagree on the node",
                ztunnel_on("zt-a", None, Some("node-b")),
                web,
                true,
                Err("node_mismatch"),
            ),
            (
                "ztunnel SA claiming a workload pod",
                ztunnel_on("web-1", None, None),
                web,
                true,
                Err("bound_pod_gone"),
            ),
            (
                "ztunnel token without pod or node",
                Caller {
                    pod: None,
                    node: None,
                    ..node_credential("x")
                },
                web,
                true,
                Err("no_node"),
            ),
            (
                "workload, own identity",
                workload("shop", "web", Some("web-1")),
                web,
                false,
                Ok(()),
            ),
            (
                "workload, own identity named as impersonated",
                workload("shop", "web", Some("web-1")),
                web,
                true,
                Ok(()),
            ),
            (
                "workload, another identity",
                workload("shop", "web", Some("web-1")),
                db,
                false,
                Err("not_own_identity"),
            ),
            (
                "workload token without a pod",
                workload("shop", "web", None),
                web,
                false,
                Err("not_bound"),
            ),
            (
                "workload token bound to another SA's pod",
                workload("shop", "web", Some("db-1")),
                web,
                false,
                Err("bound_pod_mismatch"),
            ),
            (
                "ztunnel without impersonation asks for a workload",
                node_credential("node-a"),
                web,
                false,
                Err("not_own_identity"),
            ),
        ];
        let pods = pods();
        for (what, caller, requested, impersonated, want) in cases {
            let id: SpiffeId = requested.parse().unwrap();
            let got = decide(&policy(), &caller, &id, impersonated, &pods).map_err(|r| r.reason());
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_pod_that_moves_is_signable_only_on_its_new_node() {
        let mut p = pods();
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert!(decide(&policy(), &node_credential("node-a"), &id, true, &p).is_ok());
        p.0.get_mut(&("shop".into(), "web-1".into())).unwrap().node = Some("node-b".into());
        assert_eq!(
            decide(&policy(), &node_credential("node-a"), &id, true, &p).map_err(|r| r.reason()),
            Err("not_on_node")
        );
        assert!(decide(&policy(), &node_credential("node-b"), &id, true, &p).is_ok());
    }

    #[test]
    fn service_account_names() {
        assert_eq!(
            ServiceAccount::from_username("system:serviceaccount:istio-system:ztunnel"),
            Some(ServiceAccount::new("istio-system", "ztunnel"))
        );
        for bad in [
            "system:node:a",
            "system:serviceaccount:a",
            "system:serviceaccount::b",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(ServiceAccount::from_username(bad), None, "{bad}");
        }
        assert_eq!(
            ServiceAccount::parse("a/b"),
            Some(ServiceAccount::new("a", "b"))
        );
        assert_eq!(ServiceAccount::parse("a/b/c"), None);
        assert_eq!(ServiceAccount::parse("/b"), None);
    }
}

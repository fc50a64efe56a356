//! L4 authorization: the subset of Istio's `security.istio.io/v1` AuthorizationPolicy that a
//! node proxy can enforce (action ALLOW/DENY, `selector.matchLabels`, `from.source`
//! principals/namespaces/ipBlocks and their `not` forms, `to.operation.ports`/`notPorts`).
//!
//! Semantics (Istio's): any matching DENY denies; otherwise, if any ALLOW policy applies to the
//! workload, at least one of its rules must match; otherwise allow. A policy with no rules
//! matches nothing. Rules using L7 attributes (methods, paths, hosts, requestPrincipals,
//! `when`) cannot be evaluated here: an ALLOW rule with them never matches, a DENY rule is
//! applied on its L4 part alone (both fail safe). A policy that cannot be enforced as written
//! (AUDIT, CUSTOM, an unknown action, a field that does not parse) becomes its fail-closed
//! stand-in ([`Fallback`], [`AuthorizationPolicy::from_object_or_fallback`]) instead of failing
//! the whole update.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ambient_common::IpPrefix;
use serde::{Deserialize, Serialize};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("AuthorizationPolicy {name}: invalid spec: {source}")]
    Spec {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("AuthorizationPolicy {name}: action {action:?} is not supported (ALLOW or DENY)")]
    Action { name: String, action: String },
    #[error("AuthorizationPolicy {name}: unreadable selector: {source}")]
    Selector {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("AuthorizationPolicy {name}: {value:?} is not an IP or CIDR")]
    IpBlock { name: String, value: String },
    #[error("AuthorizationPolicy {name}: {value:?} is not a port number")]
    Port { name: String, value: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
}

/// A string condition with Istio's wildcard forms: `*`, `prefix*`, `*suffix`, exact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct StringMatch(pub String);

impl StringMatch {
    /// Whether `value` (absent when the peer is unauthenticated) matches.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        let p = self.0.as_str();
        if p == "*" {
            return !v.is_empty();
        }
        if let Some(suffix) = p.strip_prefix('*') {
            return v.ends_with(suffix);
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return v.starts_with(prefix);
        }
        v == p
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub ip_blocks: Vec<IpPrefix>,
    pub not_ip_blocks: Vec<IpPrefix>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    /// The rule also had attributes a node proxy cannot evaluate (L7, `when`).
    pub has_l7: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<Rule>,
    /// Set when the object could not be enforced as written and this is its fail-closed
    /// stand-in (see [`AuthorizationPolicy::from_object_or_fallback`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// What replaces an AuthorizationPolicy that cannot be enforced as written (an action this
/// proxy does not implement, a field that does not parse). One bad object never stops the
/// others from applying; its own effect errs on the side of denying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// AUDIT: it never allows or denies anything; dropped with a warning.
    Ignored,
    /// DENY, CUSTOM or an unknown action: denies everything its selector selects.
    DenySelection,
    /// As `DenySelection`, but the selector itself is unreadable: its whole namespace.
    DenyNamespace,
    /// An ALLOW that does not parse: kept with no rules, so it allows nothing itself (the
    /// workloads it selects are still allowed by any other ALLOW that matches).
    AllowNothing,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ignored => "ignored",
            Self::DenySelection => "deny_selection",
            Self::DenyNamespace => "deny_namespace",
            Self::AllowNothing => "allow_nothing",
        }
    }
}

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The client's identity (None for plaintext).
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_port: u16,
}

/// The workload being connected to.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied; names the policy (`namespace/name`) or says no ALLOW matched.
    Deny(String),
}

fn contains(p: &IpPrefix, ip: IpAddr) -> bool {
    match (p.addr, ip) {
        (IpAddr::V4(net), IpAddr::V4(a)) => {
            let bits = p.prefix as u32;
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            (u32::from(net) & mask) == (u32::from(a) & mask)
        }
        (IpAddr::V6(net), IpAddr::V6(a)) => {
            let bits = p.prefix as u32;
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            (u128::from(net) & mask) == (u128::from(a) & mask)
        }
        _ => false,
    }
}

impl Source {
    fn matches(&self, r: &Request<'_>) -> bool {
        let principal = r.src_identity.map(Identity::principal);
        let principal = principal.as_deref();
        let ns = r.src_identity.map(|i| i.namespace.as_str());
        let any = |list: &[StringMatch], v: Option<&str>| list.iter().any(|m| m.matches(v));
        (self.principals.is_empty() || any(&self.principals, principal))
            && !any(&self.not_principals, principal)
            && (self.namespaces.is_empty() || any(&self.namespaces, ns))
            && !any(&self.not_namespaces, ns)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|p| contains(p, r.src_ip)))
            && !self.not_ip_blocks.iter().any(|p| contains(p, r.src_ip))
    }
}

impl Operation {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&r.dst_port))
            && !self.not_ports.contains(&r.dst_port)
    }
}

impl Rule {
    fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(r)))
    }
}

impl AuthorizationPolicy {
    /// Whether the policy applies to `t` (`root_ns` policies apply mesh-wide).
    pub fn applies_to(&self, t: &Target<'_>, root_ns: &str) -> bool {
        if self.namespace != t.namespace && self.namespace != root_ns {
            return false;
        }
        match &self.selector {
            None => true,
            Some(sel) => sel.iter().all(|(k, v)| t.labels.get(k) == Some(v)),
        }
    }

    fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|rule| match self.action {
            Action::Allow => !rule.has_l7 && rule.matches(r),
            Action::Deny => rule.matches(r),
        })
    }

    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Decides a connection.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p AuthorizationPolicy>,
    root_ns: &str,
    target: &Target<'_>,
    req: &Request<'_>,
) -> Decision {
    let applicable: Vec<&AuthorizationPolicy> = policies
        .into_iter()
        .filter(|p| p.applies_to(target, root_ns))
        .collect();
    if let Some(p) = applicable
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(req))
    {
        return Decision::Deny(p.id());
    }
    let mut allows = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    if allows.any(|p| p.matches(req)) {
        Decision::Allow
    } else {
        Decision::Deny("no ALLOW policy matched".into())
    }
}

// ---- parsing -------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    selector: Option<RawSelector>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    from: Vec<RawFrom>,
    #[serde(default)]
    to: Vec<RawTo>,
    #[serde(default)]
    when: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct RawFrom {
    #[serde(default)]
    source: RawSource,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Deserialize, Default)]
struct RawTo {
    #[serde(default)]
    operation: RawOperation,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawOperation {
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

fn prefixes(name: &str, v: &[String]) -> Result<Vec<IpPrefix>, PolicyError> {
    v.iter()
        .map(|s| {
            s.parse::<IpPrefix>()
                .or_else(|_| {
                    s.parse::<IpAddr>().map(|ip| IpPrefix {
                        addr: ip,
                        prefix: if ip.is_ipv4() { 32 } else { 128 },
                    })
                })
                .map_err(|_| PolicyError::IpBlock {
                    name: name.to_owned(),
                    value: s.clone(),
                })
        })
        .collect()
}

fn ports(name: &str, v: &[String]) -> Result<Vec<u16>, PolicyError> {
    v.iter()
        .map(|s| {
            s.parse::<u16>().map_err(|_| PolicyError::Port {
                name: name.to_owned(),
                value: s.clone(),
            })
        })
        .collect()
}

fn matches(v: &[String]) -> Vec<StringMatch> {
    v.iter().cloned().map(StringMatch).collect()
}

impl AuthorizationPolicy {
    /// Parses a manifest object (`metadata` + `spec` as JSON).
    pub fn from_object(
        name: &str,
        namespace: &str,
        spec: &serde_json::Value,
    ) -> Result<Self, PolicyError> {
        let id = format!("{namespace}/{name}");
        let raw: RawSpec = if spec.is_null() {
            RawSpec::default()
        } else {
            serde_json::from_value(spec.clone()).map_err(|source| PolicyError::Spec {
                name: id.clone(),
                source,
            })?
        };
        let action = match raw.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            other => {
                return Err(PolicyError::Action {
                    name: id,
                    action: other.to_owned(),
                })
            }
        };
        let mut rules = Vec::new();
        for r in raw.rules.unwrap_or_default() {
            let mut has_l7 = !r.when.is_empty();
            let mut from = Vec::new();
            for f in r.from {
                let s = f.source;
                has_l7 |= !s.request_principals.is_empty()
                    || !s.not_request_principals.is_empty()
                    || !s.remote_ip_blocks.is_empty()
                    || !s.not_remote_ip_blocks.is_empty();
                from.push(Source {
                    principals: matches(&s.principals),
                    not_principals: matches(&s.not_principals),
                    namespaces: matches(&s.namespaces),
                    not_namespaces: matches(&s.not_namespaces),
                    ip_blocks: prefixes(&id, &s.ip_blocks)?,
                    not_ip_blocks: prefixes(&id, &s.not_ip_blocks)?,
                });
            }
            let mut to = Vec::new();
            for t in r.to {
                let o = t.operation;
                has_l7 |= !(o.hosts.is_empty()
                    && o.not_hosts.is_empty()
                    && o.methods.is_empty()
                    && o.not_methods.is_empty()
                    && o.paths.is_empty()
                    && o.not_paths.is_empty());
                to.push(Operation {
                    ports: ports(&id, &o.ports)?,
                    not_ports: ports(&id, &o.not_ports)?,
                });
            }
            rules.push(Rule { from, to, has_l7 });
        }
        Ok(Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            selector: raw.selector.map(|s| s.match_labels),
            action,
            rules,
            fallback: None,
        })
    }

    /// Parses like [`Self::from_object`], but never lets one object fail a whole update:
    /// a policy that cannot be enforced as written comes back as its fail-closed stand-in
    /// (see [`Fallback`]) with the reason, or as `None` for an ignored AUDIT policy.
    pub fn from_object_or_fallback(
        name: &str,
        namespace: &str,
        spec: &serde_json::Value,
    ) -> (Option<Self>, Option<(Fallback, PolicyError)>) {
        let err = match Self::from_object(name, namespace, spec) {
            Ok(p) => return (Some(p), None),
            Err(e) => e,
        };
        let action = spec.get("action");
        if action.and_then(|a| a.as_str()) == Some("AUDIT") {
            return (None, Some((Fallback::Ignored, err)));
        }
        let selector = match spec.get("selector") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value::<RawSelector>(v.clone())
                .map(|s| Some(s.match_labels))
                .map_err(|source| PolicyError::Selector {
                    name: format!("{namespace}/{name}"),
                    source,
                }),
        };
        let is_allow = match action {
            None | Some(serde_json::Value::Null) => true,
            Some(a) => a.as_str() == Some("ALLOW"),
        };
        let (selector, scoped, err) = match selector {
            Ok(s) => (s, true, err),
            // The selector is unreadable: the namespace is the one scope left to close.
            Err(e) => (None, false, e),
        };
        let (action, rules, fallback) = match (is_allow, scoped) {
            (true, _) => (Action::Allow, Vec::new(), Fallback::AllowNothing),
            (false, true) => (Action::Deny, vec![Rule::default()], Fallback::DenySelection),
            (false, false) => (Action::Deny, vec![Rule::default()], Fallback::DenyNamespace),
        };
        let p = Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            selector,
            action,
            rules,
            fallback: Some(fallback),
        };
        (Some(p), Some((fallback, err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pol(ns: &str, spec: serde_json::Value) -> AuthorizationPolicy {
        AuthorizationPolicy::from_object("p", ns, &spec).unwrap()
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn policy_semantics_table() {
        let web = Identity::new("cluster.local", "shop", "web");
        let other = Identity::new("cluster.local", "other", "client");
        let app_labels = labels(&[("app", "db")]);
        let target = Target {
            namespace: "shop",
            labels: &app_labels,
        };
        struct Case {
            name: &'static str,
            policies: Vec<AuthorizationPolicy>,
            id: Option<Identity>,
            ip: &'static str,
            port: u16,
            allow: bool,
        }
        let c = |name, policies, id: Option<&Identity>, ip, port, allow| Case {
            name,
            policies,
            id: id.cloned(),
            ip,
            port,
            allow,
        };
        let allow_web = || {
            pol(
                "shop",
                json!({"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}),
            )
        };
        let deny_other_ns = || {
            pol(
                "shop",
                json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}),
            )
        };
        let cases = vec![
            c("no policy: allow", vec![], Some(&web), "10.0.0.1", 80, true),
            c(
                "no policy, plaintext: allow",
                vec![],
                None,
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "allow matches",
                vec![allow_web()],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "allow exists, no match",
                vec![allow_web()],
                Some(&other),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "allow exists, plaintext",
                vec![allow_web()],
                None,
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "deny matches",
                vec![deny_other_ns()],
                Some(&other),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "deny does not match",
                vec![deny_other_ns()],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "deny wins over allow",
                vec![
                    allow_web(),
                    pol(
                        "shop",
                        json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}),
                    ),
                ],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "deny on other port",
                vec![pol(
                    "shop",
                    json!({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["81"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "allow with no rules denies all",
                vec![pol("shop", json!({"action": "ALLOW"}))],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "deny with no rules denies none",
                vec![pol("shop", json!({"action": "DENY"}))],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "allow empty rule allows all",
                vec![pol("shop", json!({"rules": [{}]}))],
                None,
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "policy in other namespace ignored",
                vec![pol("elsewhere", json!({"action": "DENY", "rules": [{}]}))],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "root namespace applies mesh-wide",
                vec![pol(
                    "istio-system",
                    json!({"action": "DENY", "rules": [{}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "selector mismatch ignored",
                vec![pol(
                    "shop",
                    json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "rules": [{}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "selector match applies",
                vec![pol(
                    "shop",
                    json!({"selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": [{}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "ipBlocks allow",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/24"]}}]}]}),
                )],
                None,
                "10.0.0.9",
                80,
                true,
            ),
            c(
                "ipBlocks miss",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.1.0/24", "10.9.9.9"]}}]}]}),
                )],
                None,
                "10.0.0.9",
                80,
                false,
            ),
            c(
                "notIpBlocks",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.0/8"]}}]}]}),
                )],
                None,
                "10.0.0.9",
                80,
                false,
            ),
            c(
                "notPrincipals excludes",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"notPrincipals": ["*/ns/other/sa/client"]}}]}]}),
                )],
                Some(&other),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "notPrincipals wildcard lets others",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"notPrincipals": ["cluster.local/ns/other/*"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "principal * needs identity",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}),
                )],
                None,
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "principal * with identity",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"principals": ["*"]}}]}]}),
                )],
                Some(&other),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "notNamespaces",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"notNamespaces": ["other"]}}]}]}),
                )],
                Some(&other),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "from AND to",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"ports": ["443"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "notPorts",
                vec![pol(
                    "shop",
                    json!({"rules": [{"to": [{"operation": {"notPorts": ["80"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "any of from entries",
                vec![pol(
                    "shop",
                    json!({"rules": [{"from": [{"source": {"namespaces": ["x"]}}, {"source": {"namespaces": ["shop"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                true,
            ),
            c(
                "L7 allow never matches",
                vec![pol(
                    "shop",
                    json!({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "L7 deny applies on L4 part",
                vec![pol(
                    "shop",
                    json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
            c(
                "when makes allow unmatchable",
                vec![pol(
                    "shop",
                    json!({"rules": [{"when": [{"key": "request.headers[x]", "values": ["y"]}]}]}),
                )],
                Some(&web),
                "10.0.0.1",
                80,
                false,
            ),
        ];
        for case in cases {
            let req = Request {
                src_identity: case.id.as_ref(),
                src_ip: case.ip.parse().unwrap(),
                dst_port: case.port,
            };
            let d = evaluate(&case.policies, "istio-system", &target, &req);
            assert_eq!(d == Decision::Allow, case.allow, "{}: {d:?}", case.name);
        }
    }

    #[test]
    fn bad_specs_are_precise_errors() {
        let bad = [
            (json!({"action": "AUDIT"}), "AUDIT"),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
                "10.0.0.0/33",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                "http",
            ),
            (json!({"rules": "nope"}), "invalid spec"),
        ];
        for (spec, needle) in bad {
            let err = AuthorizationPolicy::from_object("p", "ns", &spec).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            assert!(err.to_string().contains("ns/p"), "{err}");
        }
    }

    /// A policy that cannot be enforced as written fails closed for its own selection and
    /// touches nothing else: AUDIT is ignored, DENY/CUSTOM/unknown deny what they select (the
    /// namespace when the selector is unreadable), a broken ALLOW allows nothing itself.
    #[test]
    fn unenforceable_policies_fail_closed_for_their_selection() {
        let db = labels(&[("app", "db")]);
        let web_labels = labels(&[("app", "web")]);
        let web = Identity::new("cluster.local", "shop", "web");
        let allow_all = pol("shop", json!({"rules": [{}]}));
        struct Case {
            name: &'static str,
            spec: serde_json::Value,
            fallback: Option<Fallback>,
            /// (target namespace, labels, allowed) with `allow_all` also present.
            checks: Vec<(&'static str, &'static BTreeMap<String, String>, bool)>,
        }
        // Leak the label maps so the table can borrow them for its whole life.
        let db: &'static BTreeMap<String, String> = Box::leak(Box::new(db));
        let web_l: &'static BTreeMap<String, String> = Box::leak(Box::new(web_labels));
        let sel_db = json!({"matchLabels": {"app": "db"}});
        let cases = vec![
            Case {
                name: "AUDIT is ignored",
                spec: json!({"action": "AUDIT", "selector": sel_db, "rules": [{}]}),
                fallback: Some(Fallback::Ignored),
                checks: vec![("shop", db, true), ("shop", web_l, true)],
            },
            Case {
                name: "CUSTOM denies its selection only",
                spec: json!({"action": "CUSTOM", "provider": {"name": "ext"}, "selector": sel_db, "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}),
                fallback: Some(Fallback::DenySelection),
                checks: vec![
                    ("shop", db, false),
                    ("shop", web_l, true),
                    ("other", db, true),
                ],
            },
            Case {
                name: "unknown action denies its selection",
                spec: json!({"action": "LOG", "selector": sel_db}),
                fallback: Some(Fallback::DenySelection),
                checks: vec![("shop", db, false), ("shop", web_l, true)],
            },
            Case {
                name: "DENY with a bad port denies its selection",
                spec: json!({"action": "DENY", "selector": sel_db, "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                fallback: Some(Fallback::DenySelection),
                checks: vec![("shop", db, false), ("shop", web_l, true)],
            },
            Case {
                name: "DENY with an unreadable selector denies its namespace",
                spec: json!({"action": "DENY", "selector": {"matchLabels": "app=db"}, "rules": [{}]}),
                fallback: Some(Fallback::DenyNamespace),
                checks: vec![
                    ("shop", db, false),
                    ("shop", web_l, false),
                    ("other", db, true),
                ],
            },
            Case {
                name: "DENY with unreadable rules denies its selection",
                spec: json!({"action": "DENY", "selector": sel_db, "rules": "nope"}),
                fallback: Some(Fallback::DenySelection),
                checks: vec![("shop", db, false), ("shop", web_l, true)],
            },
            Case {
                name: "ALLOW with a bad CIDR allows nothing itself",
                spec: json!({"selector": sel_db, "rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
                fallback: Some(Fallback::AllowNothing),
                // allow_all still allows: a broken ALLOW never denies what another allows.
                checks: vec![("shop", db, true), ("shop", web_l, true)],
            },
            Case {
                name: "a valid policy has no fallback",
                spec: json!({"action": "DENY", "selector": sel_db, "rules": [{}]}),
                fallback: None,
                checks: vec![("shop", db, false), ("shop", web_l, true)],
            },
        ];
        for case in cases {
            let (p, why) = AuthorizationPolicy::from_object_or_fallback("bad", "shop", &case.spec);
            assert_eq!(why.as_ref().map(|w| w.0), case.fallback, "{}", case.name);
            if let Some((_, e)) = &why {
                assert!(e.to_string().contains("shop/bad"), "{}: {e}", case.name);
            }
            assert_eq!(
                p.as_ref().and_then(|p| p.fallback),
                case.fallback.filter(|f| *f != Fallback::Ignored),
                "{}",
                case.name
            );
            let policies: Vec<AuthorizationPolicy> =
                p.into_iter().chain([allow_all.clone()]).collect();
            for (ns, l, allowed) in case.checks {
                let req = Request {
                    src_identity: Some(&web),
                    src_ip: "10.0.0.1".parse().unwrap(),
                    dst_port: 80,
                };
                let d = evaluate(
                    &policies,
                    "istio-system",
                    &Target {
                        namespace: ns,
                        labels: l,
                    },
                    &req,
                );
                assert_eq!(
                    d == Decision::Allow,
                    allowed,
                    "{}: {ns} {l:?}: {d:?}",
                    case.name
                );
            }
        }
        // Without any other ALLOW, a broken ALLOW leaves its selection allowing nothing.
        let (p, _) = AuthorizationPolicy::from_object_or_fallback(
            "bad",
            "shop",
            &json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{"to": [{"operation": {"ports": ["x"]}}]}]}),
        );
        let req = Request {
            src_identity: Some(&web),
            src_ip: "10.0.0.1".parse().unwrap(),
            dst_port: 80,
        };
        let d = evaluate(
            &p.into_iter().collect::<Vec<_>>(),
            "istio-system",
            &Target {
                namespace: "shop",
                labels: db,
            },
            &req,
        );
        assert!(matches!(d, Decision::Deny(_)), "{d:?}");
    }

    #[test]
    fn cidr_containment() {
        let p: IpPrefix = "fd00::/64".parse().unwrap();
        assert!(contains(&p, "fd00::1".parse().unwrap()));
        assert!(!contains(&p, "fd01::1".parse().unwrap()));
        assert!(!contains(&p, "10.0.0.1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(contains(&all, "1.2.3.4".parse().unwrap()));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_policy() -> impl Strategy<Value = AuthorizationPolicy> {
            (
                prop::bool::ANY,
                prop::option::of("[a-c]"),
                prop::collection::vec(("[a-c]", 0u16..4, prop::bool::ANY), 0..3),
            )
                .prop_map(|(deny, ns, rules)| {
                    let rules: Vec<serde_json::Value> = rules
                        .into_iter()
                        .map(|(n, port, not)| {
                            if not {
                                json!({"from": [{"source": {"notNamespaces": [n]}}], "to": [{"operation": {"notPorts": [port.to_string()]}}]})
                            } else {
                                json!({"from": [{"source": {"namespaces": [n]}}], "to": [{"operation": {"ports": [port.to_string()]}}]})
                            }
                        })
                        .collect();
                    AuthorizationPolicy::from_object(
                        "p",
                        &ns.unwrap_or_else(|| "a".into()),
                        &json!({"action": if deny { "DENY" } else { "ALLOW" }, "rules": rules}),
                    )
                    .unwrap()
                })
        }

        proptest! {
            #[test]
            fn a_matching_deny_always_wins(
                policies in prop::collection::vec(arb_policy(), 0..5),
                src_ns in "[a-c]",
                port in 0u16..4,
            ) {
                let id = Identity::new("td", &src_ns, "sa");
                let labels = BTreeMap::new();
                let target = Target { namespace: "a", labels: &labels };
                let req = Request { src_identity: Some(&id), src_ip: "10.0.0.1".parse().unwrap(), dst_port: port };
                let mut with_deny = policies.clone();
                with_deny.push(AuthorizationPolicy::from_object("deny-all", "a", &json!({"action": "DENY", "rules": [{}]})).unwrap());
                prop_assert!(matches!(evaluate(&with_deny, "root", &target, &req), Decision::Deny(_)));
                // Policies of other namespaces never change the decision.
                let elsewhere: Vec<_> = policies.iter().filter(|p| p.namespace != "a").cloned().collect();
                prop_assert_eq!(evaluate(&elsewhere, "root", &target, &req), Decision::Allow);
            }
        }
    }
}

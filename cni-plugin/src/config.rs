//! The network configuration on stdin: the spec's keys this plugin reads (`cniVersion`,
//! `prevResult`, GC's `cni.dev/valid-attachments`) and the plugin's own camelCase keys.
//! Unknown keys, `runtimeConfig`, `capabilities` and `args` are accepted and ignored.
//!
//! Built by the pure function [`parse_netconf`]; every bad field is reported at once.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use ambient_common::agent_api::AttachmentKey;
use ambient_common::constants::{CNI_SOCKET, DEFAULT_EXCLUDED_NAMESPACES};
use serde_json::{Map, Value};

use crate::version::CniVersion;

/// Default for `timeoutMs`: the agent may wait for its pod source and for ztunnel.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Largest accepted `timeoutMs` (kubelet gives up on a sandbox long before).
pub const MAX_TIMEOUT_MS: u64 = 300_000;
/// Default for `sysfsRoot`.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("stdin is not valid JSON")]
    Decode(#[source] serde_json::Error),
    #[error("stdin is not a JSON object")]
    NotObject,
    #[error("cniVersion is missing (which means 0.1.0); supported: {list}", list = CniVersion::supported().join(", "))]
    MissingVersion,
    #[error("cniVersion {0:?} is not supported; supported: {list}", list = CniVersion::supported().join(", "))]
    UnsupportedVersion(String),
    #[error("invalid network configuration: {}", FieldErrors(.0))]
    Fields(Vec<FieldError>),
}

/// One bad field of the configuration, named by its JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

struct FieldErrors<'a>(&'a [FieldError]);

impl fmt::Display for FieldErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// `agentUnreachable`: what ADD does when the agent cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreachablePolicy {
    /// Fail the ADD with "try again later" (fail closed; the default).
    Fail,
    /// Let the pod start without asking the agent (logged as a warning).
    Allow,
}

/// `logLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// The plugin's own keys in its conflist entry, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// `agentSocket`: the node agent's unix socket.
    pub agent_socket: PathBuf,
    /// `timeoutMs`: read and write timeout of the agent exchange.
    pub timeout: Duration,
    /// `excludedNamespaces`: pods here pass through when the agent is unreachable.
    pub excluded_namespaces: Vec<String>,
    /// `logFile`: also log JSON lines here (appended).
    pub log_file: Option<PathBuf>,
    /// `logLevel`.
    pub log_level: LogLevel,
    /// `agentUnreachable`.
    pub agent_unreachable: UnreachablePolicy,
    /// `sysfsRoot`: where sysfs is mounted (bridge detection reads `<root>/class/net`).
    pub sysfs_root: PathBuf,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            agent_socket: PathBuf::from(CNI_SOCKET),
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            excluded_namespaces: DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            log_file: None,
            log_level: LogLevel::Info,
            agent_unreachable: UnreachablePolicy::Fail,
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
        }
    }
}

impl PluginConfig {
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.iter().any(|n| n == namespace)
    }
}

/// The parsed network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: Option<String>,
    pub plugin: PluginConfig,
    /// `prevResult` as given; [`crate::result::PrevResult`] validates it when a command needs it.
    pub prev_result: Option<Value>,
    /// GC's `cni.dev/valid-attachments` (or the older `cni.dev/attachments`), when present.
    pub valid_attachments: Option<Vec<AttachmentKey>>,
}

/// Best-effort version of a configuration for the error response: its `cniVersion` when it is
/// one this plugin supports, otherwise the newest.
pub fn response_version(stdin: &[u8]) -> CniVersion {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().and_then(CniVersion::parse))
        .unwrap_or(CniVersion::LATEST)
}

/// Parses and validates stdin. JSON errors come first, then the version, then every bad
/// field at once.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, ConfigError> {
    let value: Value = serde_json::from_slice(stdin).map_err(ConfigError::Decode)?;
    let Value::Object(obj) = value else {
        return Err(ConfigError::NotObject);
    };
    let cni_version = match obj.get("cniVersion") {
        None | Some(Value::Null) => return Err(ConfigError::MissingVersion),
        Some(Value::String(s)) if s.is_empty() => return Err(ConfigError::MissingVersion),
        Some(Value::String(s)) => {
            CniVersion::parse(s).ok_or_else(|| ConfigError::UnsupportedVersion(s.clone()))?
        }
        Some(other) => return Err(ConfigError::UnsupportedVersion(other.to_string())),
    };

    let mut errors = Vec::new();
    let mut fields = Fields {
        obj: &obj,
        errors: &mut errors,
    };
    let defaults = PluginConfig::default();
    let name = fields.string("name");
    let agent_socket = fields
        .non_empty_string("agentSocket")
        .map(PathBuf::from)
        .unwrap_or(defaults.agent_socket);
    let timeout = fields
        .timeout_ms("timeoutMs")
        .map(Duration::from_millis)
        .unwrap_or(defaults.timeout);
    let excluded_namespaces = fields
        .string_list("excludedNamespaces")
        .unwrap_or(defaults.excluded_namespaces);
    let log_file = fields.non_empty_string("logFile").map(PathBuf::from);
    let log_level = fields
        .choice(
            "logLevel",
            "off, error, warn, info, debug, trace",
            LogLevel::parse,
        )
        .unwrap_or(defaults.log_level);
    let agent_unreachable = fields
        .choice("agentUnreachable", "fail, allow", |s| match s {
            "fail" => Some(UnreachablePolicy::Fail),
            "allow" => Some(UnreachablePolicy::Allow),
            _ => None,
        })
        .unwrap_or(defaults.agent_unreachable);
    let sysfs_root = fields
        .non_empty_string("sysfsRoot")
        .map(PathBuf::from)
        .unwrap_or(defaults.sysfs_root);
    let prev_result = match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => {
            fields.bad("prevResult", "must be an object (a CNI result)");
            None
        }
    };
    let valid_attachments = fields.attachments();

    if !errors.is_empty() {
        return Err(ConfigError::Fields(errors));
    }
    Ok(NetConf {
        cni_version,
        name,
        plugin: PluginConfig {
            agent_socket,
            timeout,
            excluded_namespaces,
            log_file,
            log_level,
            agent_unreachable,
            sysfs_root,
        },
        prev_result,
        valid_attachments,
    })
}

/// Typed access to optional fields, collecting errors instead of stopping at the first.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    errors: &'a mut Vec<FieldError>,
}

impl Fields<'_> {
    fn bad(&mut self, field: &str, problem: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.bad(key, "must be a string");
                None
            }
        }
    }

    fn non_empty_string(&mut self, key: &str) -> Option<String> {
        let s = self.string(key)?;
        if s.is_empty() {
            self.bad(key, "must not be empty");
            return None;
        }
        Some(s)
    }

    fn timeout_ms(&mut self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.as_u64() {
            Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Some(ms),
            _ => {
                self.bad(
                    key,
                    format!("must be an integer number of milliseconds from 1 to {MAX_TIMEOUT_MS}, got {v}"),
                );
                None
            }
        }
    }

    fn string_list(&mut self, key: &str) -> Option<Vec<String>> {
        let v = self.get(key)?;
        let list = v.as_array().and_then(|items| {
            items
                .iter()
                .map(|i| i.as_str().filter(|s| !s.is_empty()).map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        });
        if list.is_none() {
            self.bad(key, "must be a list of non-empty strings");
        }
        list
    }

    fn choice<T>(
        &mut self,
        key: &str,
        allowed: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Option<T> {
        let s = self.string(key)?;
        let parsed = parse(&s);
        if parsed.is_none() {
            self.bad(key, format!("{s:?} is not one of {allowed}"));
        }
        parsed
    }

    fn attachments(&mut self) -> Option<Vec<AttachmentKey>> {
        // libcni sends both names (the spec renamed the key); prefer the current one.
        let key = ["cni.dev/valid-attachments", "cni.dev/attachments"]
            .into_iter()
            .find(|k| self.get(k).is_some())?;
        let Some(items) = self.get(key)?.as_array().cloned() else {
            self.bad(key, "must be a list of {containerID, ifname} objects");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = |name: &str| -> Result<String, String> {
                match item.get(name) {
                    Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(format!("{key}[{i}].{name}")),
                }
            };
            match (field("containerID"), field("ifname")) {
                (Ok(container_id), Ok(ifname)) => out.push(AttachmentKey {
                    container_id,
                    ifname,
                }),
                (a, b) => {
                    for missing in [a.err(), b.err()].into_iter().flatten() {
                        self.bad(&missing, "must be a non-empty string");
                    }
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, ConfigError> {
        parse_netconf(&serde_json::to_vec(&v).unwrap())
    }

    #[test]
    fn defaults_apply() {
        let c =
            parse(json!({"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni"})).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.plugin, PluginConfig::default());
        assert_eq!(c.plugin.agent_socket, PathBuf::from(CNI_SOCKET));
        assert_eq!(c.plugin.timeout, Duration::from_secs(10));
        assert!(c.plugin.is_excluded("kube-system"));
        assert!(c.prev_result.is_none() && c.valid_attachments.is_none());
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(json!({
            "cniVersion": "0.3.1",
            "agentSocket": "/tmp/a.sock",
            "timeoutMs": 250,
            "excludedNamespaces": ["a", "b"],
            "logFile": "/tmp/x.log",
            "logLevel": "DEBUG",
            "agentUnreachable": "allow",
            "sysfsRoot": "/tmp/sys",
            "unknownKey": {"x": 1},
            "runtimeConfig": {"portMappings": [{"hostPort": 1}], "whatever": null},
        }))
        .unwrap();
        let p = c.plugin;
        assert_eq!(p.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert_eq!(p.excluded_namespaces, vec!["a", "b"]);
        assert!(!p.is_excluded("kube-system"));
        assert_eq!(p.log_file, Some(PathBuf::from("/tmp/x.log")));
        assert_eq!(p.log_level, LogLevel::Debug);
        assert_eq!(p.agent_unreachable, UnreachablePolicy::Allow);
        assert_eq!(p.sysfs_root, PathBuf::from("/tmp/sys"));
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let err = parse(json!({
            "cniVersion": "1.1.0",
            "agentSocket": "",
            "timeoutMs": 0,
            "excludedNamespaces": "kube-system",
            "logLevel": "loud",
            "agentUnreachable": "maybe",
            "prevResult": [],
        }))
        .unwrap_err();
        let ConfigError::Fields(fields) = &err else {
            panic!("{err:?}")
        };
        let names: Vec<&str> = fields.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            names,
            [
                "agentSocket",
                "timeoutMs",
                "excludedNamespaces",
                "logLevel",
                "agentUnreachable",
                "prevResult"
            ]
        );
        let msg = err.to_string();
        assert!(msg.contains("\"maybe\" is not one of fail, allow"), "{msg}");
        assert!(parse(json!({"cniVersion": "1.0.0", "timeoutMs": 1.5})).is_err());
        assert!(parse(json!({"cniVersion": "1.0.0", "timeoutMs": -1})).is_err());
        assert!(parse(json!({"cniVersion": "1.0.0", "timeoutMs": 300001})).is_err());
    }

    #[test]
    fn versions() {
        assert!(matches!(parse(json!({})), Err(ConfigError::MissingVersion)));
        assert!(matches!(
            parse(json!({"cniVersion": ""})),
            Err(ConfigError::MissingVersion)
        ));
        assert!(matches!(
            parse(json!({"cniVersion": "0.2.0"})),
            Err(ConfigError::UnsupportedVersion(v)) if v == "0.2.0"
        ));
        assert!(matches!(
            parse(json!({"cniVersion": 1})),
            Err(ConfigError::UnsupportedVersion(_))
        ));
        for v in CniVersion::ALL {
            assert_eq!(
                parse(json!({"cniVersion": v.as_str()}))
                    .unwrap()
                    .cni_version,
                v
            );
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(parse_netconf(b""), Err(ConfigError::Decode(_))));
        assert!(matches!(parse_netconf(b"{"), Err(ConfigError::Decode(_))));
        assert!(matches!(parse_netconf(b"[1]"), Err(ConfigError::NotObject)));
    }

    #[test]
    fn gc_attachments() {
        let c = parse(json!({
            "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [
                {"containerID": "a", "ifname": "eth0"},
                {"containerID": "b", "ifname": "net1", "extra": 1}
            ],
            "cni.dev/attachments": [],
        }))
        .unwrap();
        let v = c.valid_attachments.unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].container_id, "b");
        assert_eq!(v[1].ifname, "net1");
        let old = parse(json!({"cniVersion": "1.1.0", "cni.dev/attachments": []})).unwrap();
        assert_eq!(old.valid_attachments, Some(vec![]));
        let err = parse(json!({
            "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": "a"}, {"ifname": 3}],
        }))
        .unwrap_err()
        .to_string();
        assert!(err.contains("cni.dev/valid-attachments[0].ifname"), "{err}");
        assert!(
            err.contains("cni.dev/valid-attachments[1].containerID"),
            "{err}"
        );
    }

    #[test]
    fn response_version_is_best_effort() {
        assert_eq!(response_version(b"garbage"), CniVersion::LATEST);
        assert_eq!(
            response_version(br#"{"cniVersion":"0.3.1"}"#),
            CniVersion::V0_3_1
        );
        assert_eq!(
            response_version(br#"{"cniVersion":"9.9.9"}"#),
            CniVersion::LATEST
        );
    }

    #[test]
    fn every_prefix_of_a_real_config_is_handled() {
        let s = include_str!("../tests/fixtures/containerd-add.json");
        let stdin =
            serde_json::to_vec(&serde_json::from_str::<Value>(s).unwrap()["stdin"]).unwrap();
        assert!(parse_netconf(&stdin).is_ok());
        for end in 0..stdin.len() {
            assert!(parse_netconf(&stdin[..end]).is_err());
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9./_ -]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::vec(
                    (
                        prop_oneof![
                            Just("cniVersion".to_string()),
                            Just("prevResult".to_string()),
                            Just("timeoutMs".to_string()),
                            Just("excludedNamespaces".to_string()),
                            Just("cni.dev/valid-attachments".to_string()),
                            Just("containerID".to_string()),
                            "[a-z]{1,6}"
                        ],
                        inner
                    ),
                    0..5
                )
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_netconf(&bytes);
        }

        #[test]
        fn never_panics_on_json(v in arb_json(), version in prop_oneof![Just("1.1.0"), Just("0.3.0"), Just("x")]) {
            let mut v = v;
            if let Value::Object(o) = &mut v {
                o.insert("cniVersion".into(), json!(version));
            }
            let _ = parse(v);
        }
    }
}

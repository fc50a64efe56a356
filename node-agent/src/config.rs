//! The agent's configuration: defaults, then a file, then flags/environment. Built by a pure
//! function so tests pass values instead of touching the process environment.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_common::constants as c;
use serde::{Deserialize, Serialize};

use crate::nft::RulesetParams;

/// Where the agent learns pods and namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A directory of Pod and Namespace manifests (standalone nodes, the lab, tests).
    Manifests,
    /// The Kubernetes API (in-cluster service account, or `kubeconfig`).
    Kube,
}

/// Effective configuration of `node-agent run`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub node_name: String,
    pub source: SourceKind,
    /// Directory of Pod/Namespace manifests (the standalone source).
    pub manifest_dir: PathBuf,
    /// Kubeconfig for the API source outside a cluster (in-cluster configuration otherwise).
    pub kubeconfig: Option<PathBuf>,
    /// API source: report on each pod whether its redirection is installed here (pods/status
    /// annotation), which other nodes' ztunnels read.
    pub annotate_pods: bool,
    pub run_dir: PathBuf,
    pub cni_socket: PathBuf,
    /// The only uid allowed on the CNI socket (SO_PEERCRED): the container runtime's.
    pub cni_peer_uid: u32,
    pub admin_socket: PathBuf,
    pub ztunnel_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub excluded_namespaces: Vec<String>,
    /// The runtime's cache of CNI ADD results (pods running before the agent are adopted
    /// from it).
    pub cni_cache_dir: PathBuf,
    /// Where captured IPv4 traffic is DNATed to (`None`: redirected to the address of the
    /// interface it arrived on, which an interface without an IPv4 address cannot take).
    pub capture_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub capture_v6: Option<Ipv6Addr>,
    /// Which redirection backend (`auto` unless set).
    pub backend: crate::backend::Setting,
    /// Where the iptables backend keeps bridged pods' L2 rules (`None`: auto).
    pub bridge_l2: Option<crate::ipt::BridgeL2>,
    pub table: String,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub hbone_port: u16,
    pub mark: u32,
    pub mask: u32,
    pub route_table: u32,
    pub route_rule_priority: u32,
    /// Install the policy routing that returns replies to ztunnel's transparent sockets.
    pub policy_routing: bool,
    /// How long an ADD waits for its pod to appear in the source.
    pub pod_wait: Duration,
    /// How long an ADD waits for ztunnel to acknowledge the workload.
    pub ztunnel_ack_timeout: Duration,
    /// Period of the drift check.
    pub reconcile_interval: Duration,
    /// Period of the manifest directory poll.
    pub source_poll: Duration,
    pub json_logs: bool,
    pub log_level: String,
}

/// The optional configuration file (YAML or JSON); every field may be left out.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigFile {
    pub node_name: Option<String>,
    /// `manifests` (default) or `kube`.
    pub source: Option<String>,
    pub manifest_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub annotate_pods: Option<bool>,
    pub run_dir: Option<PathBuf>,
    pub cni_socket: Option<PathBuf>,
    pub cni_peer_uid: Option<u32>,
    pub admin_socket: Option<PathBuf>,
    pub ztunnel_socket: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub excluded_namespaces: Option<Vec<String>>,
    pub cni_cache_dir: Option<PathBuf>,
    /// Node addresses captured traffic is DNATed to (one per family at most).
    pub capture_addresses: Option<Vec<String>>,
    pub backend: Option<String>,
    pub bridge_l2: Option<String>,
    pub table: Option<String>,
    pub outbound_port: Option<u16>,
    pub inbound_plaintext_port: Option<u16>,
    pub hbone_port: Option<u16>,
    pub mark: Option<u32>,
    pub mask: Option<u32>,
    pub route_table: Option<u32>,
    pub policy_routing: Option<bool>,
    pub pod_wait_ms: Option<u64>,
    pub ztunnel_ack_timeout_ms: Option<u64>,
    pub reconcile_interval_ms: Option<u64>,
    pub json_logs: Option<bool>,
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn field(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        ambient_common::yaml::from_str(&text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Overlays `over` (flags/env) on `self` (file).
    pub fn merge(self, over: ConfigFile) -> ConfigFile {
        macro_rules! pick {
            ($($f:ident),*) => { ConfigFile { $($f: over.$f.or(self.$f)),* } };
        }
        pick!(
            node_name,
            source,
            manifest_dir,
            kubeconfig,
            annotate_pods,
            run_dir,
            cni_socket,
            cni_peer_uid,
            admin_socket,
            ztunnel_socket,
            metrics_addr,
            excluded_namespaces,
            cni_cache_dir,
            capture_addresses,
            backend,
            bridge_l2,
            table,
            outbound_port,
            inbound_plaintext_port,
            hbone_port,
            mark,
            mask,
            route_table,
            policy_routing,
            pod_wait_ms,
            ztunnel_ack_timeout_ms,
            reconcile_interval_ms,
            json_logs,
            log_level
        )
    }
}

/// At most one IPv4 and one IPv6 unicast address, in any order; empty strings (an unset
/// `$(HOST_IP)`) are ignored.
fn capture_addresses(list: &[String]) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ConfigError> {
    let (mut v4, mut v6) = (None, None);
    for s in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| field("captureAddresses", format!("{s:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
            return Err(field(
                "captureAddresses",
                format!("{ip} must be a unicast address of the node, not loopback"),
            ));
        }
        let dup = match ip {
            IpAddr::V4(a) => v4.replace(a).is_some(),
            IpAddr::V6(a) => v6.replace(a).is_some(),
        };
        if dup {
            return Err(field(
                "captureAddresses",
                "at most one IPv4 and one IPv6 address",
            ));
        }
    }
    Ok((v4, v6))
}

impl Config {
    /// Pods of this namespace are never captured; the agent answers their ADD from the
    /// namespace alone, without waiting for its source.
    pub fn is_excluded(&self, namespace: &str) -> bool {
        self.excluded_namespaces.iter().any(|n| n == namespace)
    }

    /// Applies defaults and validates; reports every bad field at once.
    pub fn build(src: ConfigFile) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let node_name = src.node_name.unwrap_or_default();
        if node_name.is_empty() {
            errors.push(field("nodeName", "required (--node-name or NODE_NAME)"));
        }
        let source = match src.source.as_deref() {
            None | Some("manifests") => SourceKind::Manifests,
            Some("kube") => SourceKind::Kube,
            Some(other) => {
                errors.push(field(
                    "source",
                    format!("{other:?} must be manifests or kube"),
                ));
                SourceKind::Manifests
            }
        };
        let backend = src
            .backend
            .as_deref()
            .map(str::parse)
            .transpose()
            .unwrap_or_else(|e: String| {
                errors.push(field("backend", e));
                None
            })
            .unwrap_or_default();
        let bridge_l2 = match src.bridge_l2.as_deref() {
            None | Some("auto") => None,
            Some(text) => text.parse().map(Some).unwrap_or_else(|e: String| {
                errors.push(field("bridgeL2", e));
                None
            }),
        };
        let (capture_v4, capture_v6) = capture_addresses(
            src.capture_addresses.as_deref().unwrap_or_default(),
        )
        .unwrap_or_else(|e| {
            errors.push(e);
            (None, None)
        });
        let manifest_dir = src.manifest_dir.unwrap_or_default();
        if source == SourceKind::Manifests && manifest_dir.as_os_str().is_empty() {
            errors.push(field(
                "manifestDir",
                "required: the directory of Pod and Namespace manifests (--manifest-dir)",
            ));
        }
        let run_dir = src.run_dir.unwrap_or_else(|| PathBuf::from(c::RUN_DIR));
        let cni_socket = src.cni_socket.unwrap_or_else(|| run_dir.join("cni.sock"));
        let admin_socket = src
            .admin_socket
            .unwrap_or_else(|| run_dir.join("admin.sock"));
        let ztunnel_socket = src
            .ztunnel_socket
            .unwrap_or_else(|| run_dir.join("ztunnel.sock"));
        let metrics_addr = src
            .metrics_addr
            .unwrap_or_else(|| format!("127.0.0.1:{}", c::AGENT_METRICS_PORT));
        let metrics_addr = metrics_addr.parse().unwrap_or_else(|_| {
            errors.push(field(
                "metricsAddr",
                format!("{metrics_addr:?} is not an ip:port"),
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let table = src.table.unwrap_or_else(|| c::NFT_TABLE.to_owned());
        if table.is_empty()
            || !table
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            errors.push(field("table", "must be letters, digits and _"));
        }
        let mask = src.mask.unwrap_or(c::MARK_MASK);
        let mark = src.mark.unwrap_or(c::ZTUNNEL_MARK);
        if mask == 0 || mark & !mask != 0 || mark == 0 {
            errors.push(field(
                "mark",
                format!("{mark:#x} must be non-zero and inside mask {mask:#x}"),
            ));
        }
        let ports = [
            (
                "outboundPort",
                src.outbound_port.unwrap_or(c::OUTBOUND_PORT),
            ),
            (
                "inboundPlaintextPort",
                src.inbound_plaintext_port
                    .unwrap_or(c::INBOUND_PLAINTEXT_PORT),
            ),
            ("hbonePort", src.hbone_port.unwrap_or(c::HBONE_PORT)),
        ];
        for (name, p) in ports {
            if p == 0 {
                errors.push(field(name, "must not be 0"));
            }
        }
        let excluded_namespaces = src.excluded_namespaces.unwrap_or_else(|| {
            c::DEFAULT_EXCLUDED_NAMESPACES
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        let log_level = src.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            errors.push(field(
                "logLevel",
                format!("{log_level:?} is not a valid filter"),
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            node_name,
            source,
            manifest_dir,
            kubeconfig: src.kubeconfig,
            annotate_pods: src.annotate_pods.unwrap_or(false),
            run_dir,
            cni_socket,
            admin_socket,
            ztunnel_socket,
            metrics_addr,
            excluded_namespaces,
            cni_cache_dir: src
                .cni_cache_dir
                .unwrap_or_else(|| PathBuf::from(c::CNI_CACHE_DIR)),
            capture_v4,
            capture_v6,
            backend,
            bridge_l2,
            table,
            outbound_port: ports[0].1,
            inbound_plaintext_port: ports[1].1,
            hbone_port: ports[2].1,
            mark,
            mask,
            route_table: src.route_table.unwrap_or(c::ROUTE_TABLE),
            route_rule_priority: c::ROUTE_RULE_PRIORITY,
            policy_routing: src.policy_routing.unwrap_or(true),
            cni_peer_uid: src.cni_peer_uid.unwrap_or(0),
            pod_wait: Duration::from_millis(src.pod_wait_ms.unwrap_or(5_000)),
            ztunnel_ack_timeout: Duration::from_millis(src.ztunnel_ack_timeout_ms.unwrap_or(2_000)),
            reconcile_interval: Duration::from_millis(
                src.reconcile_interval_ms.unwrap_or(10_000).max(100),
            ),
            source_poll: Duration::from_millis(300),
            json_logs: src.json_logs.unwrap_or(false),
            log_level,
        })
    }

    pub fn ruleset(&self) -> RulesetParams {
        RulesetParams {
            table: self.table.clone(),
            outbound_port: self.outbound_port,
            inbound_plaintext_port: self.inbound_plaintext_port,
            hbone_port: self.hbone_port,
            mark: self.mark,
            mask: self.mask,
            capture_v4: self.capture_v4,
            capture_v6: self.capture_v6,
        }
    }

    pub fn state_dir(&self) -> crate::state::StateDir {
        crate::state::StateDir::new(self.run_dir.join(c::STATE_DIR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> ConfigFile {
        ConfigFile {
            node_name: Some("n1".into()),
            manifest_dir: Some("/m".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_brief() {
        let c = Config::build(minimal()).unwrap();
        assert_eq!(c.outbound_port, 15001);
        assert_eq!(c.inbound_plaintext_port, 15006);
        assert_eq!(c.hbone_port, 15008);
        assert_eq!(c.mark, 0x539);
        assert_eq!(c.cni_socket, PathBuf::from("/var/run/ambient/cni.sock"));
        assert_eq!(c.excluded_namespaces, vec!["kube-system".to_string()]);
    }

    #[test]
    fn capture_addresses_one_per_family() {
        let build = |list: &[&str]| {
            Config::build(ConfigFile {
                capture_addresses: Some(list.iter().map(|s| s.to_string()).collect()),
                ..minimal()
            })
            .map(|c| (c.capture_v4, c.capture_v6))
            .map_err(|e| e[0].to_string())
        };
        let v4: Ipv4Addr = "10.0.0.7".parse().unwrap();
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        type Want = Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), &'static str>;
        let table: &[(&[&str], Want)] = &[
            (&[], Ok((None, None))),
            // An unset $(HOST_IP) expands to nothing.
            (&[""], Ok((None, None))),
            (&["10.0.0.7"], Ok((Some(v4), None))),
            (&["fd00::7", " 10.0.0.7 "], Ok((Some(v4), Some(v6)))),
            (&["10.0.0.7", "10.0.0.8"], Err("at most one")),
            (&["node-1"], Err("not an IP address")),
            (&["127.0.0.1"], Err("not loopback")),
            (&["0.0.0.0"], Err("not loopback")),
        ];
        for (list, want) in table {
            match (build(list), want) {
                (Ok(got), Ok(w)) => assert_eq!(&got, w, "{list:?}"),
                (Err(e), Err(w)) => {
                    assert!(
                        e.starts_with("captureAddresses") && e.contains(w),
                        "{list:?}: {e}"
                    )
                }
                (got, w) => panic!("{list:?}: got {got:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let errs = Config::build(ConfigFile {
            mark: Some(0x1000),
            metrics_addr: Some("nope".into()),
            hbone_port: Some(0),
            backend: Some("ipchains".into()),
            bridge_l2: Some("arptables".into()),
            ..Default::default()
        })
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        for want in [
            "nodeName",
            "manifestDir",
            "mark",
            "metricsAddr",
            "hbonePort",
            "backend",
            "bridgeL2",
        ] {
            assert!(
                text.iter().any(|t| t.starts_with(want)),
                "{want} in {text:?}"
            );
        }
    }

    #[test]
    fn flags_override_file() {
        let file = ConfigFile {
            outbound_port: Some(1),
            hbone_port: Some(2),
            ..minimal()
        };
        let flags = ConfigFile {
            outbound_port: Some(3),
            ..Default::default()
        };
        let c = Config::build(file.merge(flags)).unwrap();
        assert_eq!((c.outbound_port, c.hbone_port), (3, 2));
    }

    #[test]
    fn kube_source_needs_no_manifest_dir() {
        let c = Config::build(ConfigFile {
            node_name: Some("n1".into()),
            source: Some("kube".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.source, SourceKind::Kube);
        let errs = Config::build(ConfigFile {
            node_name: Some("n1".into()),
            source: Some("api".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(errs[0].to_string().starts_with("source"), "{errs:?}");
    }

    #[test]
    fn file_rejects_unknown_keys_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.yaml");
        std::fs::write(&p, "nodeName: a\nbogus: 1\n").unwrap();
        let err = ConfigFile::load(&p).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}

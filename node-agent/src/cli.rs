//! The command line: `run` (the daemon) and the inspection commands a person uses on a node:
//! `pods`, `rules`, `status`, plus `uninstall`. Inspection talks to the running agent over
//! its admin socket; when the agent is down, `pods` falls back to the state file.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::ConfigFile;
use crate::server::{AdminReply, AdminRequest};

#[derive(Debug, Parser)]
#[command(name = "node-agent", version, about = "Ambient data plane node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: CommandKind,
}

#[derive(Debug, Subcommand)]
pub enum CommandKind {
    /// Run the daemon.
    Run(Box<RunArgs>),
    /// Pods on this node known to the agent: namespace, name, IPs, veth, state, since.
    Pods(ViewArgs),
    /// The installed redirection rules and any drift from what the agent expects.
    Rules(ViewArgs),
    /// Agent health: source sync, counts, backend, sockets, ztunnel connection.
    Status(ViewArgs),
    /// Remove the agent's tables and policy routing from this node (uninstall).
    Uninstall(UninstallArgs),
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct ViewArgs {
    /// The agent's run directory.
    #[arg(long, env = "AMBIENT_RUN_DIR", default_value = ambient_common::constants::RUN_DIR)]
    pub run_dir: PathBuf,
    /// The agent's admin socket (default: <run-dir>/admin.sock).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = ambient_common::constants::NFT_TABLE)]
    pub table: String,
    #[arg(long, env = "AMBIENT_RUN_DIR", default_value = ambient_common::constants::RUN_DIR)]
    pub run_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML/JSON, camelCase keys); flags override it.
    #[arg(long, env = "AMBIENT_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where pods and namespaces come from: `manifests` (default) or `kube`.
    #[arg(long, env = "AMBIENT_SOURCE")]
    pub source: Option<String>,
    #[arg(long, env = "AMBIENT_MANIFEST_DIR")]
    pub manifest_dir: Option<PathBuf>,
    /// Kubeconfig for `--source kube` outside a cluster (default: in-cluster service account).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// With `--source kube`: annotate each pod whose redirection is installed on this node
    /// (`ambient.istio.io/redirection: enabled`, through pods/status; removed on release).
    #[arg(long, env = "AMBIENT_ANNOTATE_PODS")]
    pub annotate_pods: bool,
    #[arg(long, env = "AMBIENT_RUN_DIR")]
    pub run_dir: Option<PathBuf>,
    #[arg(long, env = "AMBIENT_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    #[arg(long, env = "AMBIENT_ZTUNNEL_SOCKET")]
    pub ztunnel_socket: Option<PathBuf>,
    #[arg(long, env = "AMBIENT_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Comma-separated namespaces never enrolled (default kube-system).
    #[arg(long, env = "AMBIENT_EXCLUDED_NAMESPACES", value_delimiter = ',')]
    pub excluded_namespaces: Option<Vec<String>>,
    /// The runtime's cache of CNI ADD results, for pods running before the agent.
    #[arg(long, env = "AMBIENT_CNI_CACHE_DIR")]
    pub cni_cache_dir: Option<PathBuf>,
    /// Comma-separated node addresses (at most one IPv4 and one IPv6) that captured traffic
    /// is DNATed to, so that pods whose host interface has no address of that family
    /// (Calico, AWS VPC CNI) are captured too. The DaemonSet passes the node's `status.hostIP`.
    /// A family without one is redirected to the address of the interface it arrived on.
    #[arg(long, env = "AMBIENT_CAPTURE_ADDRESS", value_delimiter = ',')]
    pub capture_address: Option<Vec<String>>,
    /// Redirection backend: `auto` (nftables where the kernel takes its ruleset, iptables
    /// otherwise), `nftables`, `iptables` (the variant kube-proxy uses), `iptables-legacy` or
    /// `iptables-nft`.
    #[arg(long, env = "AMBIENT_BACKEND")]
    pub backend: Option<String>,
    /// Where the iptables backend keeps bridged pods' L2 rules: `auto` (the nftables `bridge`
    /// table where the kernel takes it, ebtables otherwise), `nftables` or `ebtables`.
    #[arg(long, env = "AMBIENT_BRIDGE_L2")]
    pub bridge_l2: Option<String>,
    #[arg(long)]
    pub table: Option<String>,
    #[arg(long)]
    pub outbound_port: Option<u16>,
    #[arg(long)]
    pub inbound_plaintext_port: Option<u16>,
    #[arg(long)]
    pub hbone_port: Option<u16>,
    #[arg(long, value_parser = parse_u32)]
    pub mark: Option<u32>,
    #[arg(long)]
    pub route_table: Option<u32>,
    #[arg(long)]
    pub no_policy_routing: bool,
    /// The uid allowed to call the CNI socket (the container runtime's; default 0).
    #[arg(long)]
    pub cni_peer_uid: Option<u32>,
    #[arg(long)]
    pub pod_wait_ms: Option<u64>,
    #[arg(long)]
    pub ztunnel_ack_timeout_ms: Option<u64>,
    #[arg(long)]
    pub reconcile_interval_ms: Option<u64>,
    /// Log as JSON lines.
    #[arg(long, env = "AMBIENT_JSON_LOGS")]
    pub json_logs: bool,
    #[arg(long, env = "AMBIENT_LOG_LEVEL")]
    pub log_level: Option<String>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

impl RunArgs {
    /// The flag layer of the configuration.
    pub fn to_layer(&self) -> ConfigFile {
        ConfigFile {
            node_name: self.node_name.clone(),
            source: self.source.clone(),
            manifest_dir: self.manifest_dir.clone(),
            kubeconfig: self.kubeconfig.clone(),
            annotate_pods: self.annotate_pods.then_some(true),
            run_dir: self.run_dir.clone(),
            cni_socket: self.cni_socket.clone(),
            ztunnel_socket: self.ztunnel_socket.clone(),
            metrics_addr: self.metrics_addr.clone(),
            excluded_namespaces: self.excluded_namespaces.clone(),
            backend: self.backend.clone(),
            bridge_l2: self.bridge_l2.clone(),
            cni_cache_dir: self.cni_cache_dir.clone(),
            capture_addresses: self.capture_address.clone(),
            table: self.table.clone(),
            outbound_port: self.outbound_port,
            inbound_plaintext_port: self.inbound_plaintext_port,
            hbone_port: self.hbone_port,
            mark: self.mark,
            route_table: self.route_table,
            policy_routing: self.no_policy_routing.then_some(false),
            pod_wait_ms: self.pod_wait_ms,
            cni_peer_uid: self.cni_peer_uid,
            ztunnel_ack_timeout_ms: self.ztunnel_ack_timeout_ms,
            reconcile_interval_ms: self.reconcile_interval_ms,
            json_logs: self.json_logs.then_some(true),
            log_level: self.log_level.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the node agent at {path}: {source} (is `node-agent run` running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad reply from the node agent: {0}")]
    Reply(#[from] ambient_common::frame::FrameError),
}

/// Asks the running agent for its report.
pub fn query(admin_socket: &Path) -> Result<AdminReply, CliError> {
    let unreachable = |source| CliError::Unreachable {
        path: admin_socket.to_owned(),
        source,
    };
    let mut s = UnixStream::connect(admin_socket).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    ambient_common::frame::write_frame(&mut s, &AdminRequest::Report)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(unreachable)?;
    Ok(ambient_common::frame::read_frame(&mut &buf[..])?)
}

fn ago(since: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(since);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Renders rows as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `node-agent pods` as text.
pub fn render_pods(pods: &[serde_json::Value]) -> String {
    let rows: Vec<Vec<String>> = pods
        .iter()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("").to_owned();
            let ips = p["ips"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                s("namespace"),
                s("name"),
                ips,
                s("host_interface"),
                s("mode"),
                p["pinned_mac"].as_str().unwrap_or("-").to_owned(),
                s("state"),
                p["found_by"].as_str().unwrap_or("cni").to_owned(),
                ago(p["since"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "POD",
            "IPS",
            "VETH",
            "MODE",
            "PINNED MAC",
            "STATE",
            "FOUND BY",
            "SINCE",
        ],
        &rows,
    ) + &reasons(pods)
}

/// Why each `uncapturable` pod is, one line each under the table.
fn reasons(pods: &[serde_json::Value]) -> String {
    pods.iter()
        .filter_map(|p| {
            let reason = p["reason"].as_str()?;
            Some(format!(
                "{}/{} is not captured: {reason}\n",
                p["namespace"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or("")
            ))
        })
        .collect()
}

fn write_pods(out: &mut impl Write, pods: &[serde_json::Value], json: bool) -> std::io::Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(pods).unwrap_or_default()
        )
    } else {
        write!(out, "{}", render_pods(pods))
    }
}

/// Runs an inspection command, writing to `out`. Returns the process exit code.
pub fn view(kind: &str, args: &ViewArgs, out: &mut impl Write) -> std::io::Result<i32> {
    let sock = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| args.run_dir.join("admin.sock"));
    let reply = query(&sock);
    let json = matches!(args.output, Output::Json);
    match (kind, reply) {
        ("pods", Ok(r)) => {
            let pods = r.report["pods"].as_array().cloned().unwrap_or_default();
            write_pods(out, &pods, json)?;
            Ok(0)
        }
        ("pods", Err(e)) => {
            // The agent is down: show what it persisted, and say so.
            eprintln!("warning: {e}; showing the persisted state");
            let records = crate::state::StateDir::new(
                args.run_dir.join(ambient_common::constants::STATE_DIR),
            )
            .load()
            .map_err(std::io::Error::other)?;
            let pods: Vec<serde_json::Value> = records
                .values()
                .map(|r| {
                    serde_json::json!({
                        "namespace": r.pod.namespace, "name": r.pod.name, "uid": r.pod.uid,
                        "container_id": r.key.container_id, "ifname": r.key.ifname,
                        "ips": r.ips, "host_interface": r.link.veth(), "mode": r.link.mode(),
                        "pinned_mac": crate::agent::pinned_mac(r), "netns": r.netns, "state": "agent_down", "since": r.since,
                    })
                })
                .collect();
            write_pods(out, &pods, json)?;
            Ok(1)
        }
        ("rules", Ok(r)) => {
            let drift = r.report["drift"].clone();
            if json {
                let v = serde_json::json!({
                    "backend": r.report["backend"], "elements": r.report["elements"],
                    "drift": drift, "ruleset": r.report["rules"],
                });
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                )?;
            } else {
                writeln!(
                    out,
                    "# backend: {}  elements: {}",
                    r.report["backend"].as_str().unwrap_or("?"),
                    r.report["elements"]
                )?;
                match drift.as_array().filter(|d| !d.is_empty()) {
                    Some(d) => writeln!(
                        out,
                        "# DRIFT at last check: {}",
                        serde_json::Value::Array(d.clone())
                    )?,
                    None => writeln!(out, "# no drift at last check")?,
                }
                write!(out, "{}", r.report["rules"].as_str().unwrap_or(""))?;
            }
            Ok(0)
        }
        ("status", Ok(r)) => {
            let rep = &r.report;
            let healthy = rep["source_synced"].as_bool() == Some(true)
                && rep["drift"].as_array().is_none_or(|d| d.is_empty());
            let v = serde_json::json!({
                "healthy": healthy,
                "node": rep["node"],
                "backend": rep["backend"],
                "source_synced": rep["source_synced"],
                "pods_known": rep["pods"].as_array().map(|a| a.len()).unwrap_or(0),
                "pods_captured": rep["captured"],
                "pods_uncapturable": rep["uncapturable"],
                "elements": rep["elements"],
                "drift": rep["drift"],
                "ztunnel_connected": r.ztunnel_connected,
                "cni_socket": r.cni_socket,
                "uptime_seconds": r.uptime_seconds,
                "last_error": rep["last_error"],
            });
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_default()
                )?;
            } else {
                let rows: Vec<Vec<String>> = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| {
                        let val = match v {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        vec![k.clone(), val]
                    })
                    .collect();
                write!(out, "{}", table(&["FIELD", "VALUE"], &rows))?;
            }
            Ok(if healthy { 0 } else { 1 })
        }
        (_, Err(e)) => {
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"healthy": false, "error": e.to_string()})
                )?;
            } else {
                writeln!(out, "node agent: DOWN ({e})")?;
            }
            Ok(1)
        }
        _ => Ok(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_table_is_aligned() {
        let pods = vec![serde_json::json!({
            "namespace": "shop", "name": "web-1", "ips": ["10.1.0.5"], "host_interface": "veth1",
            "mode": "bridged", "state": "captured", "since": 0
        })];
        let t = render_pods(&pods);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAMESPACE  POD"));
        assert!(lines[1].contains("captured"));
        assert_eq!(lines[0].find("POD"), lines[1].find("web-1"));
    }

    #[test]
    fn run_flags_parse_into_the_config_layer() {
        let cli = Cli::try_parse_from([
            "node-agent",
            "run",
            "--node-name",
            "n1",
            "--manifest-dir",
            "/m",
            "--mark",
            "0x539",
            "--excluded-namespaces",
            "a,b",
            "--no-policy-routing",
        ])
        .unwrap();
        let CommandKind::Run(args) = cli.command else {
            panic!("run")
        };
        let layer = args.to_layer();
        assert_eq!(layer.mark, Some(0x539));
        assert_eq!(
            layer.excluded_namespaces,
            Some(vec!["a".into(), "b".into()])
        );
        assert_eq!(layer.policy_routing, Some(false));
        let bad = Cli::try_parse_from(["node-agent", "run", "--mark", "zz"]).unwrap_err();
        assert!(bad.to_string().contains("--mark"), "{bad}");
    }
}

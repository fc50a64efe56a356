//! The installer's configuration: flags and environment (the DaemonSet sets the environment
//! from the `ambient-config` ConfigMap), turned into one typed [`Config`] by a pure function.

use std::path::PathBuf;
use std::time::Duration;

use ambient_common::constants as c;
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};

/// Where the plugin goes into the node's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Append the plugin to the primary configuration file itself.
    Chain,
    /// Leave the primary file alone; write a copy with the plugin under a name that sorts
    /// first (for primary CNIs that rewrite their file).
    OwnFile,
}

/// What `install-cni run` does to the node when it is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// Ask the API server: uninstall when the DaemonSet is gone or being deleted, otherwise
    /// (an upgrade, a restart, an unreachable API) leave everything in place.
    Auto,
    /// Always leave everything in place.
    Keep,
    /// Always uninstall (single-node setups without an API server).
    Uninstall,
}

/// The plugin's own settings, written into its conflist entry (see cni-plugin/README.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PluginSettings {
    pub agent_socket: PathBuf,
    pub timeout_ms: Option<u64>,
    pub excluded_namespaces: Vec<String>,
    pub agent_unreachable: Option<String>,
    pub log_file: Option<PathBuf>,
    pub log_level: Option<String>,
}

impl PluginSettings {
    /// The conflist entry: `{"type": "ambient-cni", ...keys}`.
    pub fn entry(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("type".into(), json!(c::PLUGIN_NAME));
        m.insert("agentSocket".into(), json!(self.agent_socket));
        m.insert("excludedNamespaces".into(), json!(self.excluded_namespaces));
        if let Some(t) = self.timeout_ms {
            m.insert("timeoutMs".into(), json!(t));
        }
        if let Some(a) = &self.agent_unreachable {
            m.insert("agentUnreachable".into(), json!(a));
        }
        if let Some(f) = &self.log_file {
            m.insert("logFile".into(), json!(f));
        }
        if let Some(l) = &self.log_level {
            m.insert("logLevel".into(), json!(l));
        }
        m
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// The host's CNI binary directory, as mounted in this container.
    pub cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory, as mounted in this container.
    pub cni_conf_dir: PathBuf,
    /// The plugin binary shipped in the image.
    pub plugin_source: PathBuf,
    /// Install a plugin that needs a program interpreter (a libc's loader, a shell) the
    /// host may not have; by default only static executables are installed.
    pub allow_dynamic_plugin: bool,
    pub mode: Mode,
    /// Our file's name in own-file mode.
    pub own_file_name: String,
    pub plugin: PluginSettings,
    /// Period of the directory check.
    pub poll: Duration,
    /// This many repairs within `repair_window` is reported as a primary CNI fighting us.
    pub repair_alarm: usize,
    pub repair_window: Duration,
    pub on_exit: OnExit,
    /// The DaemonSet that runs us, for [`OnExit::Auto`].
    pub daemonset: String,
    pub namespace: String,
    /// Kubeconfig for running outside the cluster; in-cluster configuration otherwise.
    pub kubeconfig: Option<PathBuf>,
    pub json_logs: bool,
}

impl Config {
    /// Path of the plugin in the host's binary directory.
    pub fn plugin_dest(&self) -> PathBuf {
        self.cni_bin_dir.join(c::PLUGIN_NAME)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

/// Flags (each also an environment variable) shared by `run`, `ready` and `uninstall`.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    #[arg(
        long,
        env = "AMBIENT_PLUGIN_SOURCE",
        default_value = "/opt/ambient/bin/ambient-cni"
    )]
    pub plugin_source: PathBuf,
    /// Also install a plugin that is not a static executable (a dynamically linked build,
    /// a script), for hosts known to have what it needs.
    #[arg(long, env = "AMBIENT_ALLOW_DYNAMIC_PLUGIN")]
    pub allow_dynamic_plugin: bool,
    #[arg(long, env = "AMBIENT_CNI_MODE", value_enum, default_value_t = Mode::Chain)]
    pub mode: Mode,
    #[arg(
        long,
        env = "AMBIENT_CNI_OWN_FILE",
        default_value = "00-ambient.conflist"
    )]
    pub own_file_name: String,
    /// The node agent's socket, as the host sees it (written into the plugin entry).
    #[arg(long, env = "AMBIENT_CNI_SOCKET", default_value = c::CNI_SOCKET)]
    pub agent_socket: PathBuf,
    #[arg(long, env = "AMBIENT_CNI_TIMEOUT_MS")]
    pub plugin_timeout_ms: Option<u64>,
    /// Comma-separated; must match the node agent's setting.
    #[arg(
        long,
        env = "AMBIENT_EXCLUDED_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub excluded_namespaces: Vec<String>,
    /// `fail` (default: fail closed) or `allow`.
    #[arg(long, env = "AMBIENT_CNI_AGENT_UNREACHABLE")]
    pub agent_unreachable: Option<String>,
    #[arg(long, env = "AMBIENT_CNI_LOG_FILE")]
    pub plugin_log_file: Option<PathBuf>,
    #[arg(long, env = "AMBIENT_CNI_LOG_LEVEL")]
    pub plugin_log_level: Option<String>,
    #[arg(long, env = "AMBIENT_INSTALL_POLL_MS", default_value_t = 500)]
    pub poll_ms: u64,
    #[arg(long, env = "AMBIENT_INSTALL_ON_EXIT", value_enum, default_value_t = OnExit::Auto)]
    pub on_exit: OnExit,
    #[arg(long, env = "AMBIENT_DAEMONSET", default_value = "ambient-node")]
    pub daemonset: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambient-system")]
    pub namespace: String,
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, env = "AMBIENT_JSON_LOGS")]
    pub json_logs: bool,
}

fn err(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl ConfigArgs {
    /// Validates every field and reports all problems at once.
    pub fn build(&self) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        for (field, p) in [
            ("cniBinDir", &self.cni_bin_dir),
            ("cniConfDir", &self.cni_conf_dir),
            ("pluginSource", &self.plugin_source),
            ("agentSocket", &self.agent_socket),
        ] {
            if !p.is_absolute() {
                errors.push(err(
                    field,
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        if !crate::conflist::is_config_name(&self.own_file_name) || self.own_file_name.contains('/')
        {
            errors.push(err(
                "ownFileName",
                format!(
                    "{:?} must be a plain file name ending in .conflist, .conf or .json",
                    self.own_file_name
                ),
            ));
        }
        if let Some(t) = self.plugin_timeout_ms {
            if !(1..=300_000).contains(&t) {
                errors.push(err("pluginTimeoutMs", "must be 1 to 300000"));
            }
        }
        if let Some(a) = &self.agent_unreachable {
            if a != "fail" && a != "allow" {
                errors.push(err(
                    "agentUnreachable",
                    format!("{a:?} must be fail or allow"),
                ));
            }
        }
        if let Some(l) = &self.plugin_log_level {
            if !["off", "error", "warn", "info", "debug", "trace"].contains(&l.as_str()) {
                errors.push(err(
                    "pluginLogLevel",
                    format!("{l:?} must be off, error, warn, info, debug or trace"),
                ));
            }
        }
        if self.poll_ms == 0 || self.poll_ms > 60_000 {
            errors.push(err("pollMs", "must be 1 to 60000"));
        }
        let excluded: Vec<String> = self
            .excluded_namespaces
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if self.on_exit == OnExit::Auto && (self.daemonset.is_empty() || self.namespace.is_empty())
        {
            errors.push(err(
                "daemonset",
                "on-exit=auto needs the DaemonSet name and namespace",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Config {
            cni_bin_dir: self.cni_bin_dir.clone(),
            cni_conf_dir: self.cni_conf_dir.clone(),
            plugin_source: self.plugin_source.clone(),
            allow_dynamic_plugin: self.allow_dynamic_plugin,
            mode: self.mode,
            own_file_name: self.own_file_name.clone(),
            plugin: PluginSettings {
                agent_socket: self.agent_socket.clone(),
                timeout_ms: self.plugin_timeout_ms,
                excluded_namespaces: excluded,
                agent_unreachable: self.agent_unreachable.clone(),
                log_file: self.plugin_log_file.clone(),
                log_level: self.plugin_log_level.clone(),
            },
            poll: Duration::from_millis(self.poll_ms),
            repair_alarm: 5,
            repair_window: Duration::from_secs(60),
            on_exit: self.on_exit,
            daemonset: self.daemonset.clone(),
            namespace: self.namespace.clone(),
            kubeconfig: self.kubeconfig.clone(),
            json_logs: self.json_logs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        a: ConfigArgs,
    }

    fn parse(args: &[&str]) -> ConfigArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v).unwrap().a
    }

    #[test]
    fn defaults_match_the_daemonset_layout() {
        let c = parse(&[]).build().unwrap();
        assert_eq!(c.cni_conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(
            c.plugin_dest(),
            PathBuf::from("/host/opt/cni/bin/ambient-cni")
        );
        assert_eq!(c.plugin.agent_socket, PathBuf::from(c::CNI_SOCKET));
        let e = c.plugin.entry();
        assert_eq!(e["type"], "ambient-cni");
        assert_eq!(e["excludedNamespaces"], json!(["kube-system"]));
        assert!(!e.contains_key("logFile"));
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let errs = parse(&[
            "--cni-bin-dir",
            "rel",
            "--own-file-name",
            "x.txt",
            "--plugin-timeout-ms",
            "0",
            "--agent-unreachable",
            "maybe",
            "--plugin-log-level",
            "loud",
            "--poll-ms",
            "0",
        ])
        .build()
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "cniBinDir",
                "ownFileName",
                "pluginTimeoutMs",
                "agentUnreachable",
                "pluginLogLevel",
                "pollMs"
            ]
        );
    }

    #[test]
    fn plugin_entry_carries_every_setting() {
        let c = parse(&[
            "--excluded-namespaces",
            "kube-system, monitoring",
            "--plugin-timeout-ms",
            "2000",
            "--agent-unreachable",
            "allow",
            "--plugin-log-file",
            "/var/log/ambient-cni.log",
            "--plugin-log-level",
            "debug",
        ])
        .build()
        .unwrap();
        assert_eq!(
            Value::Object(c.plugin.entry()),
            json!({"type": "ambient-cni", "agentSocket": "/var/run/ambient/cni.sock",
                "excludedNamespaces": ["kube-system", "monitoring"], "timeoutMs": 2000,
                "agentUnreachable": "allow", "logFile": "/var/log/ambient-cni.log",
                "logLevel": "debug"})
        );
    }
}

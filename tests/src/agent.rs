//! Driving the real `node-agent` binary: start it in a node namespace with a manifest
//! directory and a run directory, wait for its CNI socket, and read `node-agent pods` as typed
//! rows.
//!
//! The agent's CLI used here: `node-agent run --node-name N --manifest-dir D --run-dir R`
//! (CNI socket `R/cni.sock`) and `node-agent pods --run-dir R --output json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;

use crate::netns::{eventually, run, NetNs, NetNsError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the node agent")]
    Start(#[source] NetNsError),
    #[error("the node agent's socket {socket} did not appear; log:\n{log}")]
    NotReady { socket: PathBuf, log: String },
    #[error("`node-agent pods` failed")]
    Pods(#[source] NetNsError),
    #[error("`node-agent pods` printed something that is not a pod list: {out:?}")]
    PodsOutput {
        out: String,
        #[source]
        source: serde_json::Error,
    },
}

/// How to run one agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub binary: PathBuf,
    pub node_name: String,
    pub manifest_dir: PathBuf,
    pub run_dir: PathBuf,
    /// Written with the agent's stdout and stderr.
    pub log_file: PathBuf,
    /// More flags (`--pod-wait-ms 1500`, `--log-level debug`...).
    pub extra_args: Vec<String>,
}

impl AgentOptions {
    pub fn cni_socket(&self) -> PathBuf {
        self.run_dir.join("cni.sock")
    }

    /// The `run` arguments.
    pub fn run_args(&self) -> Vec<String> {
        let mut a = vec![
            "run".to_owned(),
            "--node-name".to_owned(),
            self.node_name.clone(),
            "--manifest-dir".to_owned(),
            self.manifest_dir.to_string_lossy().into_owned(),
            "--run-dir".to_owned(),
            self.run_dir.to_string_lossy().into_owned(),
        ];
        a.extend(crate::backend::current().agent_args());
        a.extend(self.extra_args.iter().cloned());
        a
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }
}

/// Starts the agent with `ip netns exec <ns>` (registered with `ns`, so dropping the namespace
/// stops it) and waits up to 10 s for its CNI socket. Returns its PID.
pub fn start(ns: &NetNs, opts: &AgentOptions) -> Result<u32, AgentError> {
    let mut cmd = ns.command(&opts.binary);
    start_with(ns, opts, &mut cmd)
}

/// Like [`start`], but with a prepared command prefix (for instance
/// `Containerd::enter(binary)`, to share containerd's mount namespace).
pub fn start_with(ns: &NetNs, opts: &AgentOptions, cmd: &mut Command) -> Result<u32, AgentError> {
    for d in [&opts.run_dir, &opts.manifest_dir] {
        std::fs::create_dir_all(d).map_err(|source| AgentError::Prepare {
            path: d.clone(),
            source,
        })?;
    }
    let log = std::fs::File::create(&opts.log_file).map_err(|source| AgentError::Prepare {
        path: opts.log_file.clone(),
        source,
    })?;
    let log2 = log.try_clone().map_err(|source| AgentError::Prepare {
        path: opts.log_file.clone(),
        source,
    })?;
    let sock = opts.cni_socket();
    let _ = std::fs::remove_file(&sock);
    cmd.args(opts.run_args()).stdout(log).stderr(log2);
    let pid = ns.spawn(cmd).map_err(AgentError::Start)?;
    eventually(Duration::from_secs(10), || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no socket yet")
        }
    })
    .map_err(|_| AgentError::NotReady {
        socket: sock.clone(),
        log: opts.log(),
    })?;
    Ok(pid)
}

/// One row of `node-agent pods --output json` (fields this harness relies on; others ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentPod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub host_interface: String,
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub state: String,
}

/// Parses `node-agent pods --output json`.
pub fn parse_pods(out: &str) -> Result<Vec<AgentPod>, AgentError> {
    serde_json::from_str(out).map_err(|source| AgentError::PodsOutput {
        out: out.to_owned(),
        source,
    })
}

/// Runs `node-agent pods --run-dir R --output json` (from the host: it talks to the agent's
/// unix socket).
pub fn pods(binary: &Path, run_dir: &Path) -> Result<Vec<AgentPod>, AgentError> {
    let out = run(Command::new(binary)
        .arg("pods")
        .arg("--run-dir")
        .arg(run_dir)
        .args(["--output", "json"]))
    .map_err(AgentError::Pods)?;
    parse_pods(&String::from_utf8_lossy(&out.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_args_follow_the_cli() {
        let o = AgentOptions {
            binary: "/b/node-agent".into(),
            node_name: "n1".into(),
            manifest_dir: "/m".into(),
            run_dir: "/r".into(),
            log_file: "/l".into(),
            extra_args: vec!["--log-level".into(), "debug".into()],
        };
        let mut want: Vec<String> = [
            "run",
            "--node-name",
            "n1",
            "--manifest-dir",
            "/m",
            "--run-dir",
            "/r",
        ]
        .map(String::from)
        .to_vec();
        want.extend(crate::backend::current().agent_args());
        want.extend(["--log-level".into(), "debug".into()]);
        assert_eq!(o.run_args(), want);
        assert_eq!(o.cni_socket(), Path::new("/r/cni.sock"));
    }

    #[test]
    fn pods_output_parses_with_extra_fields() {
        let out = r#"[{"container_id":"c","host_interface":"veth1","ifname":"eth0","ips":["10.1.0.2"],
            "mode":"bridged","name":"p","namespace":"ns","netns":"/x","since":1,"state":"captured","uid":"u"}]"#;
        let p = parse_pods(out).unwrap();
        assert_eq!(p[0].state, "captured");
        assert_eq!(p[0].ips, ["10.1.0.2"]);
        assert!(parse_pods("not json").is_err());
        assert!(parse_pods("[]").unwrap().is_empty());
    }
}

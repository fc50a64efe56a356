//! Persistence of a cluster left running: [`LabState`] (with its [`NodeState`]s and
//! [`PodState`]s), what [`Cluster::persist`] returns and the `lab` binary saves as
//! [`STATE_FILE`], and [`LabState::down`], which removes the cluster from another process.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_err, Addressing, Cluster, ClusterError, ServiceDef};
use crate::bins;
use crate::cni::Attach;
use crate::netns::run;

/// What `lab up` records so that `status`, `exec` and `down` work from another invocation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub root: PathBuf,
    pub spec_tag: String,
    pub attach: String,
    pub addressing: Addressing,
    pub trust_domain: String,
    pub underlay_ns: String,
    /// `None`: the cluster's ztunnels hold the CA key themselves.
    #[serde(default)]
    pub issuer_pid: Option<u32>,
    pub nodes: Vec<NodeState>,
    pub pods: Vec<PodState>,
    pub services: Vec<ServiceDef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub dir: PathBuf,
    pub work_dir: PathBuf,
    pub agent_pid: Option<u32>,
    pub ztunnel_pid: Option<u32>,
}

impl NodeState {
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub service_account: String,
    pub ambient: bool,
    pub echo_pid: Option<u32>,
}

/// The state file inside a lab's state directory.
pub const STATE_FILE: &str = "lab.json";

impl LabState {
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ClusterError> {
        let path = dir.join(STATE_FILE);
        let body = serde_json::to_vec_pretty(self).expect("state always serializes");
        let tmp = dir.join(".lab.json.tmp");
        std::fs::write(&tmp, body).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Reads the state file; `Ok(None)` when there is none (no lab is up).
    pub fn load(dir: &Path) -> Result<Option<Self>, String> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Every process the lab started, with the binary name expected in its command line
    /// (a PID reused by an unrelated process since is never signalled).
    pub fn processes(&self) -> Vec<(u32, &'static str)> {
        let mut v = Vec::new();
        v.extend(self.issuer_pid.map(|pid| (pid, bins::ISSUER)));
        for p in &self.pods {
            v.extend(p.echo_pid.map(|pid| (pid, bins::NETPROBE)));
        }
        for n in &self.nodes {
            v.extend(n.agent_pid.map(|pid| (pid, bins::NODE_AGENT)));
            v.extend(n.ztunnel_pid.map(|pid| (pid, bins::ZTUNNEL)));
        }
        v
    }

    /// Removes everything `up` created: processes (by PID, checked), pod, node and underlay
    /// namespaces, the files. Safe to run twice; returns what it could not do.
    pub fn down(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let pids: Vec<i32> = self
            .processes()
            .into_iter()
            .filter(|(pid, name)| cmdline_mentions(*pid, name))
            .map(|(pid, _)| pid as i32)
            .collect();
        crate::netns::terminate_pids(&pids);
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.netns.as_str()).collect();
        namespaces.extend(self.nodes.iter().map(|n| n.netns.as_str()));
        namespaces.push(&self.underlay_ns);
        for ns in namespaces {
            if Path::new(crate::netns::NETNS_RUN_DIR).join(ns).exists() {
                if let Err(e) = run(std::process::Command::new("ip").args(["netns", "del", ns])) {
                    problems.push(e.to_string());
                }
            }
        }
        for n in &self.nodes {
            if n.work_dir.exists() && !n.work_dir.starts_with(&self.root) {
                if let Err(e) = std::fs::remove_dir_all(&n.work_dir) {
                    problems.push(format!("{}: {e}", n.work_dir.display()));
                }
            }
        }
        if self.root.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.root) {
                problems.push(format!("{}: {e}", self.root.display()));
            }
        }
        problems
    }
}

fn cmdline_mentions(pid: u32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(name))
        .unwrap_or(false)
}

impl Cluster {
    /// Leaves everything running and returns what is needed to find and remove it later.
    pub fn persist(self) -> LabState {
        let state = self.state();
        // Nothing of the cluster is undone: no DEL, no kill, no namespace or file removal.
        std::mem::forget(self);
        state
    }

    /// What is needed to find and remove the cluster from another process.
    pub fn state(&self) -> LabState {
        LabState {
            root: self.root.path().to_path_buf(),
            spec_tag: self.spec.tag.clone(),
            attach: match self.spec.attach {
                Attach::Bridge => "bridge".into(),
                Attach::Ptp => "ptp".into(),
                Attach::Routed => "routed".into(),
            },
            addressing: self.spec.addressing.clone(),
            trust_domain: self.spec.trust_domain.clone(),
            underlay_ns: self.underlay.name().to_owned(),
            issuer_pid: self.issuer_pid,
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeState {
                    name: n.name.clone(),
                    netns: n.ns().name().to_owned(),
                    underlay_ip: n.underlay_ip,
                    pod_cidr: n.node.pod_cidr().to_owned(),
                    dir: n.dir.clone(),
                    work_dir: n.node.dir().to_path_buf(),
                    agent_pid: n.agent_pid,
                    ztunnel_pid: n.ztunnel_pid,
                })
                .collect(),
            pods: self
                .pods
                .iter()
                .map(|p| PodState {
                    namespace: p.meta.namespace.clone(),
                    name: p.meta.name.clone(),
                    uid: p.meta.uid.clone(),
                    node: self.nodes[p.node].name.clone(),
                    netns: p.ns().name().to_owned(),
                    ip: p.ip,
                    service_account: p.service_account.clone(),
                    ambient: self.is_ambient(p),
                    echo_pid: p.echo_pid,
                })
                .collect(),
            services: self.services.clone(),
        }
    }
}

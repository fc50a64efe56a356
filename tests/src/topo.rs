//! Nodes and pods built from namespaces: a [`Node`] is a network namespace with its own CNI
//! configuration (pod CIDR, attachment kind, agent socket) and optional underlay links to other
//! nodes; a [`Pod`] is a network namespace attached through the node's real CNI chain and
//! detached (DEL) when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};
use tempfile::TempDir;

use crate::bins;
use crate::cni::{
    self, Attach, ChainSpec, CniArgs, CniError, CniRunner, ConfList, PluginTiming, RuntimeConf,
};
use crate::netns::{NetNs, NetNsError};

static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    #[error("namespace setup failed")]
    NetNs(#[from] NetNsError),
    #[error("CNI chain failed")]
    Cni(#[from] CniError),
    #[error("cannot create the node's working directory")]
    TempDir(#[source] std::io::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod CIDR {0:?} is not an IPv4 prefix like 10.71.1.0/24")]
    BadCidr(String),
}

/// What a node is made of.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Short tag for namespace names (the test's name).
    pub tag: String,
    /// This node's pod range (host-local subnet); disjoint between nodes of one test.
    pub pod_cidr: String,
    /// An IPv6 pod range for dual-stack pods (IPv6 forwarding is then on in the node).
    pub pod_cidr6: Option<String>,
    pub attach: Attach,
    /// The node agent's socket, put into the chain as `agentSocket`; `None` leaves
    /// `ambient-cni` out of the chain.
    pub agent_socket: Option<PathBuf>,
    /// The plugin binary; defaults to the workspace's built `ambient-cni`.
    pub ambient_cni: Option<PathBuf>,
    /// Extra keys for the `ambient-cni` conflist entry.
    pub ambient_extra: Map<String, Value>,
    /// Extra keys for the primary plugin's entry.
    pub primary_extra: Map<String, Value>,
    pub cni_version: String,
    /// Where the node's scratch directory is created (default: the system temp directory).
    pub work_dir_in: Option<PathBuf>,
}

impl NodeSpec {
    pub fn new(tag: &str, pod_cidr: &str, attach: Attach) -> Self {
        Self {
            tag: tag.to_owned(),
            pod_cidr: pod_cidr.to_owned(),
            pod_cidr6: None,
            attach,
            agent_socket: None,
            ambient_cni: None,
            ambient_extra: Map::new(),
            primary_extra: Map::new(),
            cni_version: "1.0.0".to_owned(),
            work_dir_in: None,
        }
    }

    pub fn agent_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.agent_socket = Some(path.into());
        self
    }

    /// Makes the pods dual-stack with this IPv6 range.
    pub fn dual_stack(mut self, pod_cidr6: &str) -> Self {
        self.pod_cidr6 = Some(pod_cidr6.to_owned());
        self
    }
}

#[derive(Debug)]
struct NodeCore {
    // Field order is drop order: processes in the namespace stop before their files go.
    ns: NetNs,
    dir: TempDir,
    runner: CniRunner,
    conflist: ConfList,
    pod_cidr: String,
    /// The node's own address on its uplink, where the node has one of its own (routed
    /// nodes: their veths have none).
    host_address: Option<std::net::Ipv4Addr>,
}

/// A node: a network namespace with IP forwarding on and a CNI chain to attach pods.
#[derive(Debug, Clone)]
pub struct Node {
    core: Arc<NodeCore>,
}

impl Node {
    pub fn new(spec: &NodeSpec) -> Result<Self, TopoError> {
        if gateway_of(&spec.pod_cidr).is_none() {
            return Err(TopoError::BadCidr(spec.pod_cidr.clone()));
        }
        let ns = NetNs::new(&format!("{}-node", spec.tag))?;
        let prefix = format!("{}-", ns.name());
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix);
        let dir = match &spec.work_dir_in {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .map_err(TopoError::TempDir)?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let host_address = match spec.attach {
            Attach::Routed => Some(routed_uplink(&ns, &spec.pod_cidr)?),
            Attach::Bridge | Attach::Ptp => None,
        };
        if spec.pod_cidr6.is_some() {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        let cni_bin = dir.path().join("cni-bin");
        let ambient = match (&spec.agent_socket, &spec.ambient_cni) {
            (None, _) => None,
            (Some(_), Some(p)) => Some(p.clone()),
            (Some(_), None) => Some(
                bins::BinDir::current()
                    .and_then(|d| d.find(bins::AMBIENT_CNI))
                    .map_err(CniError::from)?,
            ),
        };
        cni::assemble_cni_path(&cni_bin, ambient.as_deref())?;
        let chain = ChainSpec {
            network: format!("{}-net", spec.tag),
            cni_version: spec.cni_version.clone(),
            attach: spec.attach,
            bridge: "cni0".to_owned(),
            subnet: spec.pod_cidr.clone(),
            subnet6: spec.pod_cidr6.clone(),
            ipam_data_dir: dir.path().join("ipam"),
            agent_socket: spec.agent_socket.clone(),
            ambient_extra: spec.ambient_extra.clone(),
            primary_extra: spec.primary_extra.clone(),
        };
        let conflist = ConfList::from_json(&chain.conflist())?;
        let mut runner = CniRunner::new(cni_bin, Some(ns.name().to_owned()));
        // As containerd and CRI-O (libcni) do: every ADD result cached, for the agent's
        // adoption of pods attached while it was not there.
        runner.cache_dir = Some(dir.path().join("cni-cache"));
        Ok(Self {
            core: Arc::new(NodeCore {
                ns,
                dir,
                runner,
                conflist,
                pod_cidr: spec.pod_cidr.clone(),
                host_address,
            }),
        })
    }

    pub fn ns(&self) -> &NetNs {
        &self.core.ns
    }

    /// The node's own address (routed nodes), which the agent DNATs captured traffic to
    /// (`--capture-address`, the DaemonSet's `status.hostIP`).
    pub fn host_address(&self) -> Option<std::net::Ipv4Addr> {
        self.core.host_address
    }

    /// Where this node's runtime caches ADD results (libcni's `/var/lib/cni/results`).
    pub fn cni_cache_dir(&self) -> PathBuf {
        self.core.dir.path().join("cni-cache")
    }

    /// The node's scratch directory (CNI_PATH, IPAM state, logs, sockets).
    pub fn dir(&self) -> &Path {
        self.core.dir.path()
    }

    pub fn runner(&self) -> &CniRunner {
        &self.core.runner
    }

    pub fn conflist(&self) -> &ConfList {
        &self.core.conflist
    }

    pub fn pod_cidr(&self) -> &str {
        &self.core.pod_cidr
    }

    /// Writes the conflist to `dir/<NN>-<network>.conflist` (for a runtime that reads a conf dir).
    pub fn write_conflist(&self, conf_dir: &Path) -> Result<PathBuf, TopoError> {
        let path = conf_dir.join(format!("10-{}.conflist", self.core.conflist.name));
        let write = |source| TopoError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(conf_dir).map_err(write)?;
        let body = serde_json::to_vec_pretty(&self.core.conflist.to_json())
            .expect("a JSON value always serializes");
        std::fs::write(&path, body).map_err(write)?;
        Ok(path)
    }

    /// Joins two nodes with a veth "underlay" (`a_addr`/`b_addr` in CIDR notation, same
    /// subnet) and routes each node's pod CIDR via the other.
    pub fn link(
        a: &Node,
        a_if: &str,
        a_addr: &str,
        b: &Node,
        b_if: &str,
        b_addr: &str,
    ) -> Result<(), TopoError> {
        NetNs::veth_pair(a.ns(), a_if, Some(a_addr), b.ns(), b_if, Some(b_addr))?;
        let host = |cidr: &str| cidr.split('/').next().unwrap_or(cidr).to_owned();
        a.ns()
            .ip(&["route", "add", b.pod_cidr(), "via", &host(b_addr)])?;
        b.ns()
            .ip(&["route", "add", a.pod_cidr(), "via", &host(a_addr)])?;
        Ok(())
    }

    /// Creates a pod namespace and attaches it through the chain (ADD), as a runtime would.
    /// When ADD fails the chain is cleaned with DEL (as containerd does) and the error returned.
    pub fn add_pod(&self, meta: &PodMeta) -> Result<Pod, TopoError> {
        self.add_pod_timed(meta).map(|(p, _)| p)
    }

    /// [`Node::add_pod`], also returning each plugin's ADD wall time (including the
    /// `ip netns exec` that runs it in the node namespace).
    pub fn add_pod_timed(&self, meta: &PodMeta) -> Result<(Pod, Vec<PluginTiming>), TopoError> {
        let ns = NetNs::new(&format!("{}-pod", meta.name))?;
        let container_id = format!(
            "{:08x}{:016x}{:08x}",
            std::process::id(),
            CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed),
            rand_u32()
        );
        let rt = RuntimeConf {
            container_id: container_id.clone(),
            netns: ns.path().to_string_lossy().into_owned(),
            ifname: "eth0".to_owned(),
            args: CniArgs {
                pod_namespace: meta.namespace.clone(),
                pod_name: meta.name.clone(),
                pod_uid: meta.uid.clone(),
                infra_container_id: container_id,
            },
            runtime_config: Map::new(),
        };
        let mut pod = Pod {
            node: self.core.clone(),
            rt,
            result: Value::Null,
            attached: true,
            ns,
        };
        match self.core.runner.add_timed(&self.core.conflist, &pod.rt) {
            Ok((result, timings)) => {
                pod.result = result;
                Ok((pod, timings))
            }
            Err(e) => {
                // Drop runs DEL without a cached result, as containerd does after a failed ADD.
                drop(pod);
                Err(e.into())
            }
        }
    }
}

/// A pod's Kubernetes identity, as the runtime passes it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodMeta {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: format!(
                "{:08x}-0000-4000-8000-{:012x}",
                rand_u32(),
                u64::from(rand_u32())
            ),
        }
    }
}

/// A pod: its namespace attached through the node's chain. Dropping it runs DEL through every
/// plugin (errors are printed, and do not stop the others), then deletes the namespace.
#[derive(Debug)]
pub struct Pod {
    node: Arc<NodeCore>,
    rt: RuntimeConf,
    result: Value,
    attached: bool,
    ns: NetNs,
}

impl Pod {
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The chain's final ADD result.
    pub fn result(&self) -> &Value {
        &self.result
    }

    pub fn runtime_conf(&self) -> &RuntimeConf {
        &self.rt
    }

    /// The pod's addresses, without prefix length, in result order.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        cni::result_ips(&self.result)
            .iter()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect()
    }

    /// The pod's first IPv4 address (the first address if it has none), without prefix length.
    pub fn ip(&self) -> Option<String> {
        let ips = self.ips();
        ips.iter()
            .find(|a| a.is_ipv4())
            .or(ips.first())
            .map(ToString::to_string)
    }

    /// The pod's first IPv6 address.
    pub fn ip6(&self) -> Option<std::net::Ipv6Addr> {
        self.ips().into_iter().find_map(|a| match a {
            std::net::IpAddr::V6(v6) => Some(v6),
            std::net::IpAddr::V4(_) => None,
        })
    }

    /// CHECK through the chain.
    pub fn check(&self) -> Result<(), CniError> {
        self.node
            .runner
            .check(&self.node.conflist, &self.rt, &self.result)
    }

    /// Forgets the attachment without DEL, as when a sandbox dies and its runtime never
    /// calls DEL: dropping the pod then only deletes its namespace (and with it the veth).
    pub fn abandon(&mut self) {
        self.attached = false;
    }

    /// DEL through the chain now (Drop then does nothing more than delete the namespace).
    pub fn detach(&mut self) -> Result<(), CniError> {
        let cached = (!self.result.is_null()).then_some(&self.result);
        let r = self.node.runner.del(&self.node.conflist, &self.rt, cached);
        self.attached = false;
        r
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.attached {
            // Every plugin gets its DEL even if one fails, so nothing of the pod lingers.
            let cached = (!self.result.is_null()).then_some(&self.result);
            for e in self
                .node
                .runner
                .del_best_effort(&self.node.conflist, &self.rt, cached)
            {
                eprintln!("cleanup: DEL of pod {} failed: {e}", self.rt.args.pod_name);
            }
        }
    }
}

/// The first host address of an IPv4 CIDR (the bridge's gateway under host-local's defaults).
/// A routed (Calico-shaped) node's uplink: an interface holding the node's own address
/// (`10.<a>.254.1/32` for pod range `10.<a>.x.0/24`) and the route to the pods' gateway
/// 169.254.1.1, which proxy ARP needs (it answers only for addresses routed out of another
/// interface; a real node routes it by its default route). Nothing is sent there.
fn routed_uplink(ns: &NetNs, pod_cidr: &str) -> Result<std::net::Ipv4Addr, TopoError> {
    let gw = gateway_of(pod_cidr).ok_or_else(|| TopoError::BadCidr(pod_cidr.to_owned()))?;
    let [a, b, ..] = gw.octets();
    let addr = std::net::Ipv4Addr::new(a, b, 254, 1);
    // A veth pair inside the node (this kernel may lack the dummy driver).
    ns.ip(&[
        "link", "add", "node0", "type", "veth", "peer", "name", "node0p",
    ])?;
    ns.ip(&["addr", "add", &format!("{addr}/32"), "dev", "node0"])?;
    ns.ip(&["link", "set", "node0p", "up"])?;
    ns.ip(&["link", "set", "node0", "up"])?;
    ns.ip(&["route", "add", "169.254.1.1/32", "dev", "node0"])?;
    Ok(addr)
}

pub fn gateway_of(cidr: &str) -> Option<std::net::Ipv4Addr> {
    let (addr, len) = cidr.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u32 = len.parse().ok()?;
    if len > 30 {
        return None;
    }
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Some(std::net::Ipv4Addr::from((u32::from(addr) & mask) + 1))
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(CONTAINER_SEQ.load(Ordering::Relaxed));
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_first_host() {
        assert_eq!(
            gateway_of("10.71.1.0/24"),
            Some("10.71.1.1".parse().unwrap())
        );
        assert_eq!(
            gateway_of("10.71.1.77/24"),
            Some("10.71.1.1".parse().unwrap())
        );
        assert_eq!(gateway_of("10.0.0.0/31"), None);
        assert_eq!(gateway_of("nope"), None);
        assert_eq!(gateway_of("10.0.0.0/x"), None);
    }

    #[test]
    fn pod_meta_uids_differ() {
        assert_ne!(PodMeta::new("a", "b").uid, PodMeta::new("a", "b").uid);
    }
}

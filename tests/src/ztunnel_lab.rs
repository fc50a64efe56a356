//! A lab for ztunnel alone: two "node" namespaces joined by a veth underlay, pod namespaces
//! behind each node (routed veths, the gateway as a /32 on the host side), ztunnel processes
//! started in the node namespaces, and on each node the capture the node agent installs:
//! the agent's own nftables ruleset and policy routing (`ambient_rules`), with the node's
//! ambient pods enrolled as the agent enrols routed pods. A change to the real capture is
//! what ztunnel's tests run against.
//!
//! Addresses come from one leased [`Block`]: the underlay in `10.<octet>.0.0/24`, pods of
//! node `i` in `10.<octet>.<i+1>.0/24` (and `fd00:<octet hex>:<i+1>::/64` in a dual-stack
//! lab). The guard's `Drop` kills the processes it started (by PID) and deletes the
//! namespaces, also on panic.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambient_rules::nft::{pod_elements, render_changes, Attachment, Element, RulesetParams};
use ambient_rules::routing::{IpFamily, PolicyRouting};

use crate::addrs::Block;
use crate::netns::{eventually, run, wait_until, NetNs};

pub use crate::inns::{pattern, sha256_hex};
pub use crate::netns::wait_for;

/// Runs a command, panicking with its stderr on failure; its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..])).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`sh`] inside network namespace `ns`.
pub fn ns_sh(ns: &str, args: &[&str]) -> String {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs `f` on a thread that entered network namespace `ns`; sockets it creates stay there.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = PathBuf::from(format!("/run/netns/{ns}"));
    crate::inns::in_ns(&path, f).unwrap_or_else(|e| panic!("{e}"))
}

/// A pod: its namespace, IP and the node it is on.
#[derive(Debug, Clone)]
pub struct Pod {
    pub ns: String,
    pub ip: IpAddr,
    /// The pod's IPv6 address in a dual-stack lab.
    pub ip6: Option<IpAddr>,
    pub name: String,
    pub namespace: String,
    pub sa: String,
    pub node: usize,
    pub ambient: bool,
}

pub struct Node {
    pub ns: String,
    pub name: String,
    pub underlay_ip: IpAddr,
    pub manifest_dir: PathBuf,
    pub agent_socket: PathBuf,
}

/// The lab; Drop removes everything.
pub struct Lab {
    pub tag: String,
    /// The second octet of the leased block.
    pub octet: u8,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
    /// Dropped after the children are killed: deleting a namespace deletes its links.
    namespaces: Vec<NetNs>,
    _block: Block,
    pub dir: tempfile::TempDir,
    pub ca_dir: PathBuf,
    pub dual_stack: bool,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.nodes.len() {
                eprintln!("==== ztunnel logs of node {i} ====\n{}", self.log(i));
            }
        }
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for c in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

impl Lab {
    /// Two nodes joined by an underlay in `10.<octet>.0.0/24`; pods of node i in
    /// `10.<octet>.<i+1>.0/24`. `pods` is (node index, name, namespace, ambient).
    pub fn new(tag: &str, pods: &[(usize, &str, &str, bool)]) -> Self {
        Self::build(tag, pods, false)
    }

    /// Like [`Lab::new`], dual stack: also `fd00:<octet hex>::/64` on the underlay and
    /// `fd00:<octet hex>:<node+1>::<n>/128` for pods.
    pub fn new_dual_stack(tag: &str, pods: &[(usize, &str, &str, bool)]) -> Self {
        Self::build(tag, pods, true)
    }

    fn build(tag: &str, pods: &[(usize, &str, &str, bool)], dual_stack: bool) -> Self {
        let block = Block::lease();
        let octet = block.octet();
        let dir = tempfile::tempdir().unwrap();
        let mut lab = Lab {
            tag: tag.to_owned(),
            octet,
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Mutex::new(Vec::new()),
            namespaces: Vec::new(),
            _block: block,
            ca_dir: dir.path().join("ca"),
            dir,
            dual_stack,
        };
        let x = format!("{octet:x}");
        let mk = |lab: &mut Lab, role: &str| -> String {
            let ns = NetNs::new(&format!("zt{tag}-{role}")).unwrap_or_else(|e| panic!("{e}"));
            let name = ns.name().to_owned();
            lab.namespaces.push(ns);
            name
        };
        for i in 0..2usize {
            let ns = mk(&mut lab, &format!("n{i}"));
            ns_sh(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            ns_sh(&ns, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
            if dual_stack {
                ns_sh(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            }
            let manifest_dir = lab.dir.path().join(format!("manifests-{i}"));
            std::fs::create_dir_all(&manifest_dir).unwrap();
            lab.nodes.push(Node {
                ns,
                name: format!("node-{i}"),
                underlay_ip: format!("10.{octet}.0.{}", i + 1).parse().unwrap(),
                manifest_dir,
                agent_socket: lab.dir.path().join(format!("ztunnel-{i}.sock")),
            });
        }
        let (n0, n1) = (lab.nodes[0].ns.clone(), lab.nodes[1].ns.clone());
        sh(&[
            "ip", "link", "add", "ul", "netns", &n0, "type", "veth", "peer", "ul", "netns", &n1,
        ]);
        for (i, ns) in [&n0, &n1].iter().enumerate() {
            let addr = format!("10.{octet}.0.{}/24", i + 1);
            ns_sh(ns, &["ip", "addr", "add", &addr, "dev", "ul"]);
            ns_sh(ns, &["ip", "link", "set", "ul", "up"]);
            let other = 1 - i;
            ns_sh(
                ns,
                &[
                    "ip",
                    "route",
                    "add",
                    &format!("10.{octet}.{}.0/24", other + 1),
                    "via",
                    &format!("10.{octet}.0.{}", other + 1),
                ],
            );
            if dual_stack {
                let a6 = format!("fd00:{x}::{}/64", i + 1);
                ns_sh(ns, &["ip", "-6", "addr", "add", &a6, "dev", "ul", "nodad"]);
                let net = format!("fd00:{x}:{}::/64", other + 1);
                let via = format!("fd00:{x}::{}", other + 1);
                ns_sh(ns, &["ip", "-6", "route", "add", &net, "via", &via]);
            }
        }
        let mut per_node = [0u8; 2];
        for (node, name, namespace, ambient) in pods {
            per_node[*node] += 1;
            let host = per_node[*node] + 1;
            let ns = mk(&mut lab, name);
            let ip: IpAddr = format!("10.{octet}.{}.{host}", node + 1).parse().unwrap();
            let gw = format!("10.{octet}.{}.1", node + 1);
            let node_ns = lab.nodes[*node].ns.clone();
            let veth = format!("v{name}");
            sh(&[
                "ip", "link", "add", &veth, "netns", &node_ns, "type", "veth", "peer", "eth0",
                "netns", &ns,
            ]);
            ns_sh(
                &node_ns,
                &["ip", "addr", "add", &format!("{gw}/32"), "dev", &veth],
            );
            ns_sh(&node_ns, &["ip", "link", "set", &veth, "up"]);
            ns_sh(
                &node_ns,
                &["ip", "route", "add", &format!("{ip}/32"), "dev", &veth],
            );
            ns_sh(
                &ns,
                &["ip", "addr", "add", &format!("{ip}/32"), "dev", "eth0"],
            );
            ns_sh(&ns, &["ip", "link", "set", "eth0", "up"]);
            ns_sh(&ns, &["ip", "route", "add", &gw, "dev", "eth0"]);
            ns_sh(&ns, &["ip", "route", "add", "default", "via", &gw]);
            let ip6: Option<IpAddr> = dual_stack.then(|| {
                let ip6 = format!("fd00:{x}:{}::{host}", node + 1);
                let gw6 = format!("fd00:{x}:{}::1", node + 1);
                ns_sh(
                    &node_ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{gw6}/128"),
                        "dev",
                        &veth,
                        "nodad",
                    ],
                );
                ns_sh(
                    &node_ns,
                    &[
                        "ip",
                        "-6",
                        "route",
                        "add",
                        &format!("{ip6}/128"),
                        "dev",
                        &veth,
                    ],
                );
                ns_sh(
                    &ns,
                    &[
                        "ip",
                        "-6",
                        "addr",
                        "add",
                        &format!("{ip6}/128"),
                        "dev",
                        "eth0",
                        "nodad",
                    ],
                );
                ns_sh(&ns, &["ip", "-6", "route", "add", &gw6, "dev", "eth0"]);
                ns_sh(&ns, &["ip", "-6", "route", "add", "default", "via", &gw6]);
                ip6.parse().unwrap()
            });
            lab.pods.push(Pod {
                ns,
                ip,
                ip6,
                name: name.to_string(),
                namespace: namespace.to_string(),
                sa: format!("sa-{name}"),
                node: *node,
                ambient: *ambient,
            });
        }
        sh(&[
            crate::bins::binary("ztunnel").to_str().unwrap(),
            "ca",
            "init",
            "--dir",
            lab.ca_dir.to_str().unwrap(),
        ]);
        for i in 0..2 {
            lab.install_capture(i);
            lab.write_manifests(i, "");
        }
        lab
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap()
    }

    /// The node agent's capture on node `node`: its ruleset (`RulesetParams::default()`, as
    /// the agent renders it with no configuration), the node's ambient pods enrolled as routed
    /// pods (`pod_elements`), and its policy routing, both families.
    fn install_capture(&self, node: usize) {
        let ns = &self.nodes[node].ns;
        let params = RulesetParams::default();
        let enrolled: BTreeSet<Element> = self
            .pods
            .iter()
            .filter(|p| p.node == node && p.ambient)
            .flat_map(|p| {
                let veth = format!("v{}", p.name);
                let ips: Vec<IpAddr> = std::iter::once(p.ip).chain(p.ip6).collect();
                pod_elements(&Attachment::Routed { veth }, &ips)
            })
            .collect();
        let script = params.render_base() + &render_changes(&params.table, [], &enrolled);
        let path = self.dir.path().join(format!("rules-{node}.nft"));
        std::fs::write(&path, script).unwrap();
        ns_sh(ns, &["nft", "-f", path.to_str().unwrap()]);
        let routing = PolicyRouting::default();
        let ip = |args: Vec<String>| {
            let cmd: Vec<&str> = std::iter::once("ip")
                .chain(args.iter().map(String::as_str))
                .collect();
            ns_sh(ns, &cmd);
        };
        for family in IpFamily::BOTH {
            for rule in routing.rules() {
                ip(rule.args(family, "add"));
            }
            ip(routing.route_args(family));
        }
    }

    /// Writes the manifests every ztunnel reads (all pods, namespaces) plus `extra` YAML into
    /// node `node`'s manifest directory.
    pub fn write_manifests(&self, node: usize, extra: &str) {
        self.write_manifests_with(node, extra, |_| true)
    }

    /// Like [`Lab::write_manifests`], with only the pods `keep` accepts.
    pub fn write_manifests_with(&self, node: usize, extra: &str, keep: impl Fn(&Pod) -> bool) {
        let mut y = String::new();
        let mut nss: Vec<(&str, bool)> = Vec::new();
        for p in &self.pods {
            if !nss.iter().any(|(n, _)| *n == p.namespace) {
                nss.push((&p.namespace, p.ambient));
            }
        }
        for (n, ambient) in nss {
            let label = if ambient {
                "labels: {istio.io/dataplane-mode: ambient}"
            } else {
                "labels: {}"
            };
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, {label}}}\n"
            ));
        }
        for p in self.pods.iter().filter(|p| keep(p)) {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: uid-{}, labels: {{app: {}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: {}}}\nstatus: {{phase: Running, podIP: {}, podIPs: [{}], hostIP: 10.{}.0.{}}}\n",
                p.name, p.namespace, p.name, p.name, p.node, p.sa, p.ip,
                std::iter::once(p.ip).chain(p.ip6).map(|ip| format!("{{ip: \"{ip}\"}}")).collect::<Vec<_>>().join(", "),
                self.octet, p.node + 1
            ));
        }
        y.push_str(extra);
        let path = self.nodes[node].manifest_dir.join("cluster.yaml");
        let tmp = self.nodes[node].manifest_dir.join(".cluster.tmp");
        std::fs::write(&tmp, y).unwrap();
        std::fs::rename(tmp, path).unwrap();
    }

    pub fn write_all_manifests(&self, extra: &str) {
        for i in 0..self.nodes.len() {
            self.write_manifests(i, extra);
        }
    }

    /// Starts a ztunnel in node `node`'s namespace; returns its PID. Waits until ready.
    pub fn start_ztunnel(&self, node: usize, extra: &[&str]) -> u32 {
        let n = &self.nodes[node];
        let instance = self.children.lock().unwrap().len();
        let log_path = self
            .dir
            .path()
            .join(format!("ztunnel-{node}-{instance}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.ns]);
        // ZT_WRAPPER (memory investigations only, e.g. "heaptrack -o /tmp/zt"): a command the
        // ztunnel runs under; the PID returned is then the wrapper's.
        if let Ok(w) = std::env::var("ZT_WRAPPER") {
            cmd.args(w.split_whitespace());
        }
        cmd.arg(crate::bins::binary("ztunnel"))
            .arg("run")
            .args(["--node-name", &n.name])
            .args(["--manifest-dir", n.manifest_dir.to_str().unwrap()])
            .args(["--ca-dir", self.ca_dir.to_str().unwrap()])
            .args(["--agent-socket", n.agent_socket.to_str().unwrap()])
            .args(["--poll-interval", "200ms", "--drain-timeout", "5s"])
            .args(if self.dual_stack {
                &[
                    "--outbound-addr",
                    "0.0.0.0:15001",
                    "--outbound-addr",
                    "[::]:15001",
                    "--inbound-addr",
                    "0.0.0.0:15008",
                    "--inbound-addr",
                    "[::]:15008",
                    "--inbound-plaintext-addr",
                    "0.0.0.0:15006",
                    "--inbound-plaintext-addr",
                    "[::]:15006",
                ][..]
            } else {
                &[][..]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn ztunnel");
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        eventually(Duration::from_secs(20), || {
            log()
                .contains("ztunnel ready")
                .then_some(())
                .ok_or("not ready")
        })
        .unwrap_or_else(|e| {
            panic!(
                "ztunnel on node {node} did not start ({e}); log:\n{}",
                log()
            )
        });
        self.wait_ready(node);
        pid
    }

    pub fn wait_ready(&self, node: usize) {
        let ns = self.nodes[node].ns.clone();
        eventually(Duration::from_secs(20), || {
            let r = in_ns(&ns, || http_get("127.0.0.1:15021", "/healthz/ready"));
            r.is_some_and(|b| b.contains("ready") && !b.contains("not ready"))
                .then_some(())
                .ok_or("not ready")
        })
        .unwrap_or_else(|e| {
            panic!(
                "ztunnel on node {node} not ready ({e}); log:\n{}",
                self.log(node)
            )
        });
    }

    /// SIGTERM to a ztunnel this lab started.
    pub fn terminate(&self, pid: u32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }

    /// SIGKILL to a process this lab started (a crash).
    pub fn kill(&self, pid: u32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    /// Waits for a ztunnel this lab started to exit.
    pub fn wait_exit(&self, pid: u32, timeout: Duration) {
        wait_until(&format!("ztunnel {pid} to exit"), timeout, || {
            let mut children = self.children.lock().unwrap();
            children
                .iter_mut()
                .find(|c| c.id() == pid)
                .is_none_or(|c| c.try_wait().unwrap().is_some())
        });
    }

    pub fn metrics(&self, node: usize) -> String {
        let ns = self.nodes[node].ns.clone();
        in_ns(&ns, || http_get("127.0.0.1:15020", "/metrics")).unwrap_or_default()
    }

    pub fn admin(&self, node: usize, path: &str) -> String {
        let ns = self.nodes[node].ns.clone();
        let path = path.to_owned();
        in_ns(&ns, move || http_get("127.0.0.1:15000", &path)).unwrap_or_default()
    }

    /// All logs of the ztunnels started on `node`.
    pub fn log(&self, node: usize) -> String {
        let mut out = String::new();
        for i in 0..64 {
            let p = self.dir.path().join(format!("ztunnel-{node}-{i}.log"));
            out.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        out
    }

    /// Starts a process in a namespace, owned (and killed) by the lab.
    pub fn spawn_in(&self, ns: &str, args: &[&str]) -> u32 {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }
}

/// GET `path` from `addr`: the body on a 2xx answer, `None` otherwise.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let (status, body) =
        crate::inns::http_get(addr.parse().ok()?, path, Duration::from_secs(3)).ok()?;
    (200..300).contains(&status).then_some(body)
}

/// An echo server in a pod namespace; records the peers it saw.
pub struct Echo {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

pub fn echo_server(pod: &Pod, port: u16) -> Echo {
    echo_server_on(pod, SocketAddr::new(pod.ip, port))
}

/// An echo server on a given address of the pod (its IPv6 one, say).
pub fn echo_server_on(pod: &Pod, addr: SocketAddr) -> Echo {
    let listener = in_ns(&pod.ns, || TcpListener::bind(addr).unwrap());
    let peers = Arc::new(Mutex::new(Vec::new()));
    let p2 = peers.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_nodelay(true);
            if let Ok(a) = c.peer_addr() {
                p2.lock().unwrap().push(a);
            }
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Echo { addr, peers }
}

/// Sends `payload` from inside `pod`, half-closes, reads the echo; returns what came back.
pub fn echo_from(pod: &Pod, to: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let payload = payload.to_vec();
    in_ns(&pod.ns, move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&payload)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        writer.join().unwrap()?;
        r?;
        Ok(got)
    })
}

pub fn pcap_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pcap"))
}

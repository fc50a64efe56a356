//! Redirection proof (issue 2): a node as a network namespace, pods created through the real
//! Debian CNI chain followed by `ambient-cni`, the real `node-agent` programming nftables in
//! the node namespace, and a stand-in for ztunnel on the capture ports that records each
//! connection's original destination. Run as root after `cargo build --workspace`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ambient_tests::addrs::Block;
use ambient_tests::cni::Attach;
use ambient_tests::netns::eventually;
use ambient_tests::probe::{self, ConnRecord};
use ambient_tests::topo::{Node, NodeSpec, Pod, PodMeta};
use ambient_tests::{backend, bins};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(10);
const NODE_NAME: &str = "node-1";

/// A node with its agent, a manifest directory and its pods.
struct Lab {
    // Drop order: pods (DEL through the chain, agent still up), then the node namespace
    // (which kills the agent and the stand-ins), then the directories.
    pods: Vec<Pod>,
    node: Node,
    dir: TempDir,
    agent_pid: Option<u32>,
    standins: Vec<u32>,
    /// The node's addresses: pods in `10.<octet>.1.0/24` (and `fd00:<octet hex>:1::/64`).
    block: Block,
}

impl Lab {
    fn new(tag: &str, attach: Attach) -> Lab {
        let mut lab = Lab::stopped(tag, attach, serde_json::Map::new());
        lab.start_agent();
        lab
    }

    /// The node with its chain (`ambient_extra`: more keys for the plugin's entry), the agent
    /// not started.
    fn stopped(
        tag: &str,
        attach: Attach,
        ambient_extra: serde_json::Map<String, serde_json::Value>,
    ) -> Lab {
        Lab::stopped_with(tag, attach, ambient_extra, serde_json::Map::new())
    }

    /// A dual-stack node (IPv6 pods too), agent started.
    fn dual(tag: &str, attach: Attach) -> Lab {
        let mut lab = Lab::build(
            tag,
            true,
            attach,
            serde_json::Map::new(),
            serde_json::Map::new(),
        );
        lab.start_agent();
        lab
    }

    /// [`Lab::stopped`], with more keys for the primary plugin's entry too.
    fn stopped_with(
        tag: &str,
        attach: Attach,
        ambient_extra: serde_json::Map<String, serde_json::Value>,
        primary_extra: serde_json::Map<String, serde_json::Value>,
    ) -> Lab {
        Lab::build(tag, false, attach, ambient_extra, primary_extra)
    }

    fn build(
        tag: &str,
        dual_stack: bool,
        attach: Attach,
        ambient_extra: serde_json::Map<String, serde_json::Value>,
        primary_extra: serde_json::Map<String, serde_json::Value>,
    ) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix(&format!("redirect-{tag}-"))
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::create_dir_all(dir.path().join("run")).unwrap();
        std::fs::create_dir_all(dir.path().join("records")).unwrap();
        std::fs::write(
            dir.path().join("manifests/namespaces.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels:\n    istio.io/dataplane-mode: ambient\n\
             ---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n",
        )
        .unwrap();
        let block = Block::lease();
        let mut spec = NodeSpec::new(tag, &block.net24(1), attach)
            .agent_socket(dir.path().join("run/cni.sock"));
        if dual_stack {
            spec = spec.dual_stack(&block.net64(1));
        }
        spec.ambient_extra = ambient_extra;
        spec.primary_extra = primary_extra;
        let node = Node::new(&spec).unwrap();
        Lab {
            pods: Vec::new(),
            node,
            dir,
            agent_pid: None,
            standins: Vec::new(),
            block,
        }
    }

    /// The node's IPv4 pod range.
    fn cidr(&self) -> String {
        self.block.net24(1)
    }

    /// A lab whose agent reads the Kubernetes API at an address where nothing answers (an
    /// API server that is down): its source never syncs.
    fn without_api(tag: &str, attach: Attach) -> Lab {
        let mut lab = Lab::new(tag, attach);
        lab.stop_agent();
        let kubeconfig = lab.dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: down\n  cluster:\n    server: https://127.0.0.1:9\n    insecure-skip-tls-verify: true\n\
             contexts:\n- name: down\n  context:\n    cluster: down\n    user: none\ncurrent-context: down\nusers:\n- name: none\n  user:\n    token: x\n",
        )
        .unwrap();
        let args: Vec<std::ffi::OsString> = vec![
            "--source".into(),
            "kube".into(),
            "--kubeconfig".into(),
            kubeconfig.into(),
        ];
        lab.start_agent_with(&args);
        lab
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[std::ffi::OsString]) {
        let _ = std::fs::remove_file(self.run_dir().join("cni.sock"));
        let log = std::fs::File::create(self.dir.path().join("agent.log")).unwrap();
        let mut cmd = self.node.ns().command(bins::binary(bins::NODE_AGENT));
        cmd.args(["run", "--node-name", NODE_NAME, "--manifest-dir"])
            .arg(self.dir.path().join("manifests"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(["--metrics-addr", "127.0.0.1:15014", "--pod-wait-ms", "1500"])
            .args(["--reconcile-interval-ms", "500", "--log-level", "debug"])
            .args(backend::current().agent_args())
            .arg("--cni-cache-dir")
            .arg(self.node.cni_cache_dir())
            // A routed node's address, as the DaemonSet passes status.hostIP (unless the
            // test sets its own).
            .args(
                self.node
                    .host_address()
                    .filter(|_| {
                        !extra
                            .iter()
                            .any(|a| a.to_string_lossy().starts_with("--capture-address"))
                    })
                    .map(|a| format!("--capture-address={a}")),
            )
            .args(extra)
            .stderr(log);
        self.agent_pid = Some(self.node.ns().spawn(&mut cmd).unwrap());
        let sock = self.run_dir().join("cni.sock");
        eventually(WAIT, || {
            if sock.exists() {
                Ok(())
            } else {
                Err(format!("agent socket missing; log:\n{}", self.agent_log()))
            }
        })
        .unwrap();
    }

    fn stop_agent(&mut self) {
        if let Some(pid) = self.agent_pid.take() {
            self.node.ns().stop(pid);
        }
    }

    fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Writes the pod's manifest (so the agent knows it), then creates it through the chain.
    fn pod(&mut self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> usize {
        let meta = PodMeta::new(namespace, name);
        self.write_pod_manifest(&meta, labels);
        let pod = self.node.add_pod(&meta).unwrap_or_else(|e| {
            panic!(
                "ADD {namespace}/{name}: {e:?}\nagent log:\n{}",
                self.agent_log()
            )
        });
        self.pods.push(pod);
        self.pods.len() - 1
    }

    fn write_pod_manifest(&self, meta: &PodMeta, labels: &[(&str, &str)]) {
        let labels: String = labels
            .iter()
            .map(|(k, v)| format!("    {k}: {v}\n"))
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("  labels:\n{labels}")
        };
        std::fs::write(
            self.dir
                .path()
                .join(format!("manifests/pod-{}-{}.yaml", meta.namespace, meta.name)),
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n{labels}spec:\n  nodeName: {NODE_NAME}\n  serviceAccountName: sa-{}\n",
                meta.name, meta.namespace, meta.uid, meta.name
            ),
        )
        .unwrap();
    }

    fn ip(&self, pod: usize) -> String {
        self.pods[pod].ip().expect("pod has an address")
    }

    /// Starts a recording echo server on `port` in the node namespace (the ztunnel stand-in)
    /// or in a pod; returns the records file.
    fn recorder(&mut self, pod: Option<usize>, port: u16) -> PathBuf {
        self.recorder_on(pod, "0.0.0.0", port)
    }

    /// [`Lab::recorder`] on `addr` (`::` takes both families).
    fn recorder_on(&mut self, pod: Option<usize>, addr: &str, port: u16) -> PathBuf {
        let tag = pod.map_or("node".to_string(), |p| format!("pod{p}"));
        let out = self.dir.path().join(format!("records/{tag}-{port}.jsonl"));
        let ready = self.dir.path().join(format!("records/{tag}-{port}.ready"));
        let ns = match pod {
            Some(p) => self.pods[p].ns(),
            None => self.node.ns(),
        };
        let mut cmd = ns.command(bins::binary(bins::NETPROBE));
        cmd.args([
            "listen-origdst",
            "--addr",
            addr,
            "--port",
            &port.to_string(),
        ])
        .arg("--out")
        .arg(&out)
        .arg("--ready-file")
        .arg(&ready);
        let pid = ns.spawn(&mut cmd).unwrap();
        if pod.is_none() {
            self.standins.push(pid);
        }
        eventually(WAIT, || {
            if ready.exists() {
                Ok(())
            } else {
                Err("not listening")
            }
        })
        .unwrap();
        out
    }

    fn standin_ztunnel(&mut self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.recorder(None, 15001),
            self.recorder(None, 15006),
            self.recorder(None, 15008),
        )
    }

    fn stop_standins(&mut self) {
        for pid in std::mem::take(&mut self.standins) {
            self.node.ns().stop(pid);
        }
    }

    /// Connects from a pod (or the node) to `to`; Ok(echo) or Err(reason).
    fn connect(&self, from: Option<usize>, to: &str) -> Result<String, String> {
        let ns = match from {
            Some(p) => self.pods[p].ns(),
            None => self.node.ns(),
        };
        ns.exec(
            bins::binary(bins::NETPROBE),
            &[
                "connect",
                "--to",
                to,
                "--send",
                "hello",
                "--timeout-ms",
                "1500",
            ],
        )
        .map_err(|e| e.to_string())
    }

    /// The kernel's captured addresses of one family, as the backend under test lists them.
    fn captured(&self, v6: bool) -> String {
        backend::current().captured(self.node.ns(), v6)
    }

    fn agent_pods(&self) -> serde_json::Value {
        let out = Command::new(bins::binary(bins::NODE_AGENT))
            .args(["pods", "--output", "json", "--run-dir"])
            .arg(self.run_dir())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// GET on the agent's metrics port inside the node namespace.
    fn http_get(&self, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/15014; printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        );
        self.node
            .ns()
            .exec("bash", &["-c", &script])
            .unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(bins::binary(bins::NODE_AGENT))
            .args(args)
            .arg("--run-dir")
            .arg(self.run_dir())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn state_of(&self, name: &str) -> String {
        self.agent_pods()
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // DEL every pod while the agent is still running, as a runtime would.
        self.pods.clear();
    }
}

fn records(path: &Path) -> Vec<ConnRecord> {
    probe::read_records(path).unwrap()
}

fn only_record(path: &Path) -> ConnRecord {
    let r = eventually(WAIT, || {
        let r = records(path);
        if r.len() == 1 {
            Ok(r)
        } else {
            Err(format!("{} records in {}", r.len(), path.display()))
        }
    })
    .unwrap();
    r[0].clone()
}

/// The whole capture matrix for one attachment kind.
fn capture_matrix(tag: &str, attach: Attach) {
    let mut lab = Lab::new(tag, attach);
    let client = lab.pod("amb", "client", &[]);
    let server = lab.pod("amb", "server", &[]);
    let plain_client = lab.pod("plain", "pclient", &[]);
    let plain_server = lab.pod("plain", "pserver", &[]);
    let opted_out = lab.pod("amb", "optout", &[("istio.io/dataplane-mode", "none")]);
    let (outbound, inbound, hbone) = lab.standin_ztunnel();
    let server_rec = lab.recorder(Some(server), 8080);
    let plain_rec = lab.recorder(Some(plain_server), 8080);

    let server_ip = lab.ip(server);
    let client_ip = lab.ip(client);
    assert!(lab.captured(false).contains(&server_ip));
    assert!(!lab.captured(false).contains(&lab.ip(plain_client)));
    assert!(!lab.captured(false).contains(&lab.ip(opted_out)));
    assert_eq!(lab.state_of("client"), "captured");
    assert_eq!(lab.state_of("pclient"), "not_ambient");
    assert_eq!(lab.state_of("optout"), "opted_out");

    // Ambient -> ambient: outbound capture with the original destination recoverable.
    lab.connect(Some(client), &format!("{server_ip}:8080"))
        .unwrap();
    let r = only_record(&outbound);
    assert_eq!(
        r.peer.ip().to_string(),
        client_ip,
        "client address preserved"
    );
    assert_eq!(r.orig_dst.unwrap().to_string(), format!("{server_ip}:8080"));
    assert!(
        records(&server_rec).is_empty(),
        "nothing went around the proxy"
    );

    // Non-ambient -> non-ambient: untouched.
    lab.connect(
        Some(plain_client),
        &format!("{}:8080", lab.ip(plain_server)),
    )
    .unwrap();
    let r = only_record(&plain_rec);
    assert_eq!(r.peer.ip().to_string(), lab.ip(plain_client));

    // Non-ambient -> ambient: inbound plaintext capture.
    lab.connect(Some(plain_client), &format!("{server_ip}:8080"))
        .unwrap();
    let r = only_record(&inbound);
    assert_eq!(r.orig_dst.unwrap().to_string(), format!("{server_ip}:8080"));
    assert_eq!(r.peer.ip().to_string(), lab.ip(plain_client));

    // HBONE addressed to a local ambient pod reaches the 15008 listener.
    lab.connect(Some(plain_client), &format!("{server_ip}:15008"))
        .unwrap();
    let r = only_record(&hbone);
    assert_eq!(
        r.orig_dst.unwrap().to_string(),
        format!("{server_ip}:15008")
    );

    // Opted-out pod in an ambient namespace is left alone.
    lab.connect(Some(opted_out), &format!("{}:8080", lab.ip(plain_server)))
        .unwrap();
    assert_eq!(records(&plain_rec).len(), 2);

    // The node's own connection (a kubelet probe) reaches the ambient pod directly.
    lab.connect(None, &format!("{server_ip}:8080")).unwrap();
    let r = only_record(&server_rec);
    assert!(r
        .orig_dst
        .is_none_or(|o| o.to_string() == format!("{server_ip}:8080")));

    // Capture ports refuse traffic that was not redirected to them (the node's own address:
    // the bridge's or veth's gateway address, or a routed node's uplink address).
    let node_ip = lab
        .node
        .host_address()
        .map_or_else(|| cidr_gateway(&lab.cidr()), |a| a.to_string());
    assert!(lab
        .connect(Some(plain_client), &format!("{node_ip}:15001"))
        .is_err());

    // CHECK through the chain verifies the redirection.
    lab.pods[client].check().unwrap();
    // Pods enrolled one at a time left nothing for the periodic check (every 500 ms here)
    // to call drift and repair: the rules as applied are the rules as rendered.
    let metrics = lab.http_get("/metrics");
    assert!(
        metrics.contains("ambient_agent_drift_repairs_total 0"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("drift"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Fail closed: with nothing listening on the capture ports, the ambient pod's
    // connection is refused and the destination sees nothing.
    lab.stop_standins();
    assert!(lab
        .connect(Some(client), &format!("{server_ip}:8080"))
        .is_err());
    assert!(lab
        .connect(Some(client), &format!("{}:8080", lab.ip(plain_server)))
        .is_err());
    assert_eq!(
        records(&server_rec).len(),
        1,
        "only the node's probe reached the server"
    );
    assert_eq!(records(&plain_rec).len(), 2);

    // DEL releases: the elements are gone and the pod connects directly again.
    let mut pod = lab.pods.remove(client);
    pod.detach().unwrap();
    assert!(!lab.captured(false).contains(&client_ip));
    drop(pod);
}

/// IPv6 is captured as IPv4 is: outbound, inbound plaintext and HBONE of ambient pods'
/// IPv6 addresses go to the ztunnel stand-in with their original destination; plain pods'
/// IPv6 does not; nothing listening means the connection fails.
fn capture_matrix_v6(tag: &str, attach: Attach) {
    let mut lab = Lab::dual(tag, attach);
    let client = lab.pod("amb", "client", &[]);
    let server = lab.pod("amb", "server", &[]);
    let plain_client = lab.pod("plain", "pclient", &[]);
    let plain_server = lab.pod("plain", "pserver", &[]);
    let ip6 = |lab: &Lab, p: usize| lab.pods[p].ip6().expect("dual-stack pod").to_string();
    let (c6, s6, pc6, ps6) = (
        ip6(&lab, client),
        ip6(&lab, server),
        ip6(&lab, plain_client),
        ip6(&lab, plain_server),
    );
    let outbound = lab.recorder_on(None, "::", 15001);
    let inbound = lab.recorder_on(None, "::", 15006);
    let hbone = lab.recorder_on(None, "::", 15008);
    let server_rec = lab.recorder_on(Some(server), "::", 8080);
    let plain_rec = lab.recorder_on(Some(plain_server), "::", 8080);
    let captured = lab.captured(true);
    assert!(
        captured.contains(&s6) && captured.contains(&c6),
        "{captured}"
    );
    assert!(!captured.contains(&pc6), "{captured}");

    lab.connect(Some(client), &format!("[{s6}]:8080")).unwrap();
    let r = only_record(&outbound);
    assert_eq!(r.peer.ip().to_string(), c6, "client address preserved");
    assert_eq!(r.orig_dst.unwrap().to_string(), format!("[{s6}]:8080"));
    assert!(records(&server_rec).is_empty(), "bypassed capture");

    // A new IPv6 address answers once duplicate address detection is over.
    eventually(WAIT, || {
        lab.connect(Some(plain_client), &format!("[{ps6}]:8080"))
    })
    .unwrap();
    assert_eq!(only_record(&plain_rec).peer.ip().to_string(), pc6);

    lab.connect(Some(plain_client), &format!("[{s6}]:8080"))
        .unwrap();
    let r = only_record(&inbound);
    assert_eq!(r.orig_dst.unwrap().to_string(), format!("[{s6}]:8080"));
    assert_eq!(r.peer.ip().to_string(), pc6);

    lab.connect(Some(plain_client), &format!("[{s6}]:15008"))
        .unwrap();
    assert_eq!(
        only_record(&hbone).orig_dst.unwrap().to_string(),
        format!("[{s6}]:15008")
    );

    lab.stop_standins();
    assert!(lab.connect(Some(client), &format!("[{ps6}]:8080")).is_err());
    assert_eq!(records(&plain_rec).len(), 1);
}

#[test]
fn bridged_ipv6_pods_are_captured() {
    capture_matrix_v6("rd-b6", Attach::Bridge);
}

#[test]
fn routed_ipv6_pods_are_captured() {
    capture_matrix_v6("rd-p6", Attach::Ptp);
}

fn cidr_gateway(cidr: &str) -> String {
    ambient_tests::topo::gateway_of(cidr).unwrap().to_string()
}

#[test]
fn bridged_pods_are_captured_and_others_untouched() {
    capture_matrix("rd-br", Attach::Bridge);
}

#[test]
fn routed_pods_are_captured_and_others_untouched() {
    capture_matrix("rd-pt", Attach::Ptp);
}

/// Calico's shape: the host side of each veth has no address, so `redirect` (which takes the
/// incoming interface's address) cannot work; the agent DNATs to the node's address.
#[test]
fn calico_shaped_pods_are_captured_and_others_untouched() {
    capture_matrix("rd-ca", Attach::Routed);
}

/// SYN-ACKs (or any SYN+ACK segment) that arrive in `ns`, counted by a table of the test's own.
fn watch_syn_acks(ns: &ambient_tests::NetNs) {
    ns.exec(
        "nft",
        &["add table ip spoofwatch; add chain ip spoofwatch in { type filter hook prerouting priority -400; }; add rule ip spoofwatch in tcp flags & (syn | ack) == syn | ack counter"],
    )
    .unwrap();
}

fn syn_acks(ns: &ambient_tests::NetNs) -> u64 {
    let text = ns
        .exec("nft", &["list", "chain", "ip", "spoofwatch", "in"])
        .unwrap();
    text.split("packets ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {text}"))
}

/// A pod that uses another pod's address: dropped before it reaches anything. A spoofer is
/// blind (the replies go to the address's owner), so a failed connect proves little: the
/// test also counts the replies its SYNs draw, in the owners' namespaces. The node's
/// rp_filter is off (as on Cilium's nodes), so the agent's guards alone stand in the way.
/// Three attacks: an ambient pod and a plain one taking an ambient pod's address (identity
/// theft: captured as the victim), and an ambient pod taking a plain pod's address (capture
/// bypass: not captured at all).
fn spoofing(tag: &str, attach: Attach) {
    let mut lab = Lab::new(tag, attach);
    for key in ["all", "default"] {
        lab.node
            .ns()
            .exec(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")],
            )
            .unwrap();
    }
    let victim = lab.pod("amb", "victim", &[]);
    let attacker = lab.pod("amb", "attacker", &[]);
    let plain_attacker = lab.pod("plain", "pattacker", &[]);
    let bystander = lab.pod("plain", "bystander", &[]);
    let target = lab.pod("plain", "target", &[]);
    let (outbound, _inbound, _hbone) = lab.standin_ztunnel();
    let target_rec = lab.recorder(Some(target), 8080);
    let gateway = match attach {
        Attach::Routed => "169.254.1.1".to_owned(),
        Attach::Bridge | Attach::Ptp => cidr_gateway(&lab.cidr()),
    };
    let target_ip = lab.ip(target);
    for owner in [victim, bystander] {
        watch_syn_acks(lab.pods[owner].ns());
    }
    for (p, owner) in [
        (attacker, victim),
        (plain_attacker, victim),
        (attacker, bystander),
    ] {
        let ns = lab.pods[p].ns();
        let spoofed = lab.ip(owner);
        // Use the owner's address as the source toward the target.
        ns.ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"])
            .unwrap();
        ns.ip(&[
            "route",
            "replace",
            &format!("{target_ip}/32"),
            "via",
            &gateway,
            "dev",
            "eth0",
            "src",
            &spoofed,
        ])
        .unwrap();
        let out = ns.exec(
            bins::binary(bins::NETPROBE),
            &[
                "connect",
                "--to",
                &format!("{target_ip}:8080"),
                "--timeout-ms",
                "800",
            ],
        );
        assert!(
            out.is_err(),
            "spoofed connection from pod {p} as pod {owner} went through: {out:?}"
        );
        let replies = syn_acks(lab.pods[owner].ns());
        assert_eq!(
            replies, 0,
            "pod {p}'s SYNs as pod {owner} reached a listener: {replies} replies arrived at the owner"
        );
        ns.ip(&["addr", "del", &format!("{spoofed}/32"), "dev", "eth0"])
            .unwrap();
    }
    assert!(
        records(&outbound).is_empty(),
        "spoofed packets reached the proxy"
    );
    assert!(
        records(&target_rec).is_empty(),
        "spoofed packets reached the target"
    );
    // The genuine owner of the address still gets through (to the proxy).
    lab.connect(Some(victim), &format!("{}:8080", lab.ip(target)))
        .unwrap();
    assert_eq!(records(&outbound).len(), 1);
}

#[test]
fn bridged_spoofed_source_is_dropped() {
    spoofing("sp-br", Attach::Bridge);
}

#[test]
fn routed_spoofed_source_is_dropped() {
    spoofing("sp-pt", Attach::Ptp);
}

#[test]
fn calico_shaped_spoofed_source_is_dropped() {
    spoofing("sp-ca", Attach::Routed);
}

/// Labels change in the source: running pods are enrolled and released without restarting.
#[test]
fn label_flips_enrol_and_release_running_pods() {
    let mut lab = Lab::new("flip", Attach::Bridge);
    let pod = lab.pod("plain", "late", &[]);
    let ip = lab.ip(pod);
    assert!(!lab.captured(false).contains(&ip));
    let original = label_plain_ambient(&lab);
    eventually(WAIT, || {
        if lab.captured(false).contains(&ip) {
            Ok(())
        } else {
            Err("not enrolled yet")
        }
    })
    .unwrap();
    assert_eq!(lab.state_of("late"), "captured");
    std::fs::write(lab.dir.path().join("manifests/namespaces.yaml"), &original).unwrap();
    eventually(WAIT, || {
        if !lab.captured(false).contains(&ip) {
            Ok(())
        } else {
            Err("not released yet")
        }
    })
    .unwrap();
    assert_eq!(lab.state_of("late"), "not_ambient");
}

/// Creates `namespace/name` through the chain and expects its ADD to fail; the error's text.
fn failed_add(lab: &mut Lab, namespace: &str, name: &str) -> String {
    let meta = PodMeta::new(namespace, name);
    lab.write_pod_manifest(&meta, &[]);
    match lab.node.add_pod(&meta) {
        Ok(_) => panic!("ADD {namespace}/{name} succeeded"),
        Err(e) => format!("{e:?}"),
    }
}

/// Moves namespace `plain` into the mesh; the namespaces file as it was.
fn label_plain_ambient(lab: &Lab) -> String {
    let ns_file = lab.dir.path().join("manifests/namespaces.yaml");
    let original = std::fs::read_to_string(&ns_file).unwrap();
    std::fs::write(
        &ns_file,
        original.replace(
            "name: plain\n",
            "name: plain\n  labels:\n    istio.io/dataplane-mode: ambient\n",
        ),
    )
    .unwrap();
    original
}

/// Cilium and Calico's eBPF dataplane attach programs at the pod's host veth that may route
/// its packets past netfilter, so no nftables rule is sure to see them: the agent refuses to
/// claim such a pod captured. Its ADD fails (fail closed) naming why; a running pod moved into
/// the mesh is reported `uncapturable` (pods, status, metric) and gets no redirection.
#[test]
fn pods_behind_an_ebpf_dataplane_are_refused_and_reported() {
    let mut ebpf = serde_json::Map::new();
    ebpf.insert("ebpf".into(), true.into());
    let mut lab = Lab::stopped_with("ebpf", Attach::Routed, serde_json::Map::new(), ebpf);
    lab.start_agent();
    let err = failed_add(&mut lab, "amb", "app");
    assert!(err.contains("eBPF program"), "{err}");
    let web = lab.pod("plain", "web", &[]);
    let ip = lab.ip(web);
    assert_eq!(lab.state_of("web"), "not_ambient");
    label_plain_ambient(&lab);
    eventually(WAIT, || match lab.state_of("web").as_str() {
        "uncapturable" => Ok(()),
        other => Err(format!("state {other}")),
    })
    .unwrap();
    assert!(!lab.captured(false).contains(&ip));
    let (_, table) = lab.cli(&["pods"]);
    assert!(
        table.contains("plain/web is not captured: host interface cali"),
        "{table}"
    );
    let (code, status) = lab.cli(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    // The refused pod's DEL (the runtime's cleanup of a failed ADD) removed it: one left.
    assert_eq!(
        (code, &status["pods_uncapturable"]),
        (0, &1.into()),
        "{status}"
    );
    assert!(lab
        .http_get("/metrics")
        .contains("ambient_agent_uncapturable_pods 1"));
}

/// Calico's shape without a capture address: nothing to redirect to on the pod's veth, so
/// an ambient pod's ADD fails naming the missing setting, instead of a pod whose packets
/// are dropped.
#[test]
fn calico_shaped_pods_without_a_capture_address_are_refused() {
    let mut lab = Lab::stopped("noaddr", Attach::Routed, serde_json::Map::new());
    lab.start_agent_with(&["--capture-address=".into()]);
    let err = failed_add(&mut lab, "amb", "app");
    assert!(
        err.contains("no IPv4 address") && err.contains("--capture-address"),
        "{err}"
    );
    let web = lab.pod("plain", "web", &[]);
    lab.recorder(Some(web), 8080);
    // Not ambient: untouched, reachable from the node.
    lab.connect(None, &format!("{}:8080", lab.ip(web))).unwrap();
}

/// Pods that were running before the agent (installed into a running cluster, or created
/// while it was down with `agentUnreachable: allow`) are adopted from the runtime's cached ADD
/// results: captured without a restart, shown as found in the cache, released by their DEL,
/// and following label flips like any other pod.
#[test]
fn pods_running_before_the_agent_are_adopted() {
    let mut allow = serde_json::Map::new();
    allow.insert("agentUnreachable".into(), "allow".into());
    let mut lab = Lab::stopped("adopt", Attach::Bridge, allow);
    // No agent: every ADD passes through (the plugin logs a warning), nothing is captured.
    let client = lab.pod("amb", "client", &[]);
    let server = lab.pod("amb", "server", &[]);
    let plain = lab.pod("plain", "plain", &[]);
    let gone = lab.pod("amb", "gone", &[]);
    let (client_ip, server_ip, plain_ip) = (lab.ip(client), lab.ip(server), lab.ip(plain));
    let (outbound, _inbound, _hbone) = lab.standin_ztunnel();
    let server_rec = lab.recorder(Some(server), 8080);
    lab.connect(Some(client), &format!("{server_ip}:8080"))
        .unwrap();
    assert_eq!(records(&server_rec).len(), 1, "no agent, no capture");
    // One pod is deleted from the cluster while its sandbox lingers: not adopted.
    std::fs::remove_file(lab.dir.path().join("manifests/pod-amb-gone.yaml")).unwrap();
    let cached = std::fs::read_dir(lab.node.cni_cache_dir()).unwrap().count();
    assert_eq!(cached, 4, "the runtime cached every ADD result");

    lab.start_agent();
    eventually(WAIT, || {
        let set = lab.captured(false);
        if set.contains(&client_ip) && set.contains(&server_ip) {
            Ok(())
        } else {
            Err(format!("not adopted yet: {set}\n{}", lab.agent_log()))
        }
    })
    .unwrap();
    let pods = lab.agent_pods();
    let by_name = |name: &str| {
        pods.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    for name in ["client", "server"] {
        let p = by_name(name);
        assert_eq!(p["state"], "captured", "{p}");
        assert_eq!(p["found_by"], "cni_cache", "{p}");
        assert!(p["pinned_mac"].is_string(), "bridged port pinned: {p}");
    }
    assert_eq!(by_name("plain")["state"], "not_ambient");
    assert_eq!(by_name("plain")["found_by"], "cni_cache");
    assert!(
        by_name("gone").is_null(),
        "a pod the cluster no longer has is not adopted"
    );
    assert!(!lab.captured(false).contains(&plain_ip));
    let (_, table) = lab.cli(&["pods"]);
    assert!(
        table.contains("FOUND BY") && table.contains("cni_cache"),
        "{table}"
    );
    let metrics = lab.http_get("/metrics");
    assert!(
        metrics.contains("ambient_agent_adopted_total 3"),
        "{metrics}"
    );

    // Captured now, without a restart: the original destination reaches the proxy.
    lab.connect(Some(client), &format!("{server_ip}:8080"))
        .unwrap();
    let r = only_record(&outbound);
    assert_eq!(r.peer.ip().to_string(), client_ip);
    assert_eq!(r.orig_dst.unwrap().to_string(), format!("{server_ip}:8080"));
    assert_eq!(
        records(&server_rec).len(),
        1,
        "nothing went around the proxy"
    );

    // The label flip: the plain namespace becomes ambient and its adopted pod is enrolled.
    label_plain_ambient(&lab);
    eventually(WAIT, || {
        if lab.captured(false).contains(&plain_ip) {
            Ok(())
        } else {
            Err("not enrolled yet")
        }
    })
    .unwrap();
    assert_eq!(lab.state_of("plain"), "captured");

    // The runtime's DEL releases an adopted pod as it would any other.
    let mut pod = lab.pods.remove(client);
    pod.detach().unwrap();
    assert!(!lab.captured(false).contains(&client_ip));
    drop(pod);
    assert!(lab.state_of("client").is_empty());
    let _ = gone;
}

/// The agent restarts: rules stay while it is down, and on start it reconciles the
/// difference (a pod deleted meanwhile is released, the others keep their rules).
#[test]
fn agent_restart_keeps_rules_and_reconciles() {
    let mut lab = Lab::new("restart", Attach::Ptp);
    let a = lab.pod("amb", "a", &[]);
    let b = lab.pod("amb", "b", &[]);
    let (a_ip, b_ip) = (lab.ip(a), lab.ip(b));
    lab.stop_agent();
    let set = lab.captured(false);
    assert!(
        set.contains(&a_ip) && set.contains(&b_ip),
        "rules survive the agent"
    );
    // Pod b is deleted from the source while the agent is down.
    std::fs::remove_file(lab.dir.path().join("manifests/pod-amb-b.yaml")).unwrap();
    lab.start_agent();
    eventually(WAIT, || {
        let set = lab.captured(false);
        if set.contains(&a_ip) && !set.contains(&b_ip) {
            Ok(())
        } else {
            Err(set)
        }
    })
    .unwrap();
    assert_eq!(lab.state_of("a"), "captured");
}

/// Someone deletes the table: the periodic drift check puts it back with every element.
#[test]
fn drift_is_repaired() {
    let mut lab = Lab::new("drift", Attach::Bridge);
    let a = lab.pod("amb", "a", &[]);
    let ip = lab.ip(a);
    backend::current().delete_everything(lab.node.ns()).unwrap();
    eventually(WAIT, || {
        if lab.captured(false).contains(&ip) {
            Ok(())
        } else {
            Err("not repaired")
        }
    })
    .unwrap();
    backend::current()
        .delete_captured(lab.node.ns(), &ip)
        .unwrap();
    eventually(WAIT, || {
        if lab.captured(false).contains(&ip) {
            Ok(())
        } else {
            Err("element not repaired")
        }
    })
    .unwrap();
}

/// ADD for a pod the source does not know: bounded wait, then "try again later" (11).
#[test]
fn unknown_pod_is_refused_with_try_again_later() {
    let lab = Lab::new("unknown", Attach::Bridge);
    let meta = PodMeta::new("amb", "ghost");
    let err = lab.node.add_pod(&meta).unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("11") || text.contains("try again"), "{text}");
}

/// A pod of an excluded namespace is answered from its namespace alone, at once, whether
/// or not the source knows it or has synced: with the API server down, kube-system pods
/// start (recorded as excluded, never captured) while ambient pods wait and get code 11.
#[test]
fn excluded_namespaces_never_wait_for_the_source() {
    let mut lab = Lab::without_api("excl", Attach::Bridge);
    let meta = PodMeta::new("kube-system", "coredns");
    let started = std::time::Instant::now();
    let pod = lab.node.add_pod(&meta).unwrap_or_else(|e| {
        panic!(
            "a kube-system pod waited for a source that cannot answer: {e:?}\nagent log:\n{}",
            lab.agent_log()
        )
    });
    let took = started.elapsed();
    // The agent waits 1.5 s for a pod it does not know; this ADD did not wait for that.
    assert!(took < Duration::from_millis(1500), "ADD took {took:?}");
    let ip = pod.ip().unwrap();
    lab.pods.push(pod);
    assert_eq!(lab.state_of("coredns"), "excluded");
    assert!(
        !lab.captured(false).contains(&ip),
        "an excluded pod is never captured"
    );
    let (_, status) = lab.cli(&["status", "-o", "json"]);
    assert!(status.contains("\"source_synced\": false"), "{status}");

    let err = lab
        .node
        .add_pod(&PodMeta::new("amb", "web"))
        .expect_err("an ambient pod enrolled without its source");
    let text = format!("{err:?}");
    assert!(text.contains("11") || text.contains("try again"), "{text}");
}

/// Runtimes create pods in parallel: every concurrent ADD is enrolled, none lost.
#[test]
fn concurrent_adds_are_all_enrolled() {
    let mut lab = Lab::new("conc", Attach::Bridge);
    let metas: Vec<PodMeta> = (0..8)
        .map(|i| PodMeta::new("amb", &format!("c{i}")))
        .collect();
    for m in &metas {
        lab.write_pod_manifest(m, &[]);
    }
    let node = &lab.node;
    let pods: Vec<Pod> = std::thread::scope(|s| {
        let handles: Vec<_> = metas
            .iter()
            .map(|m| s.spawn(move || node.add_pod(m)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let set = lab.captured(false);
    for p in &pods {
        assert!(
            set.contains(&p.ip().unwrap()),
            "{} missing from {set}",
            p.ip().unwrap()
        );
    }
    lab.pods.extend(pods);
    let listed = lab.agent_pods();
    assert_eq!(listed.as_array().map(Vec::len), Some(8));
}

/// What a person sees: `pods`, `rules`, `status` (table and JSON), and the metrics.
#[test]
fn cli_and_metrics_show_the_node() {
    let mut lab = Lab::new("cli", Attach::Ptp);
    lab.pod("amb", "web", &[]);
    lab.pod("plain", "db", &[]);
    let (code, table) = lab.cli(&["pods"]);
    assert_eq!(code, 0);
    let header = table.lines().next().unwrap();
    for col in ["NAMESPACE", "POD", "IPS", "VETH", "MODE", "STATE", "SINCE"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.contains("web") && l.contains("captured") && l.contains("routed")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("db") && l.contains("not_ambient")),
        "{table}"
    );
    let (code, rules) = lab.cli(&["rules"]);
    assert_eq!(code, 0);
    if backend::current().is_iptables() {
        assert!(
            rules.contains("[nat] -A AMBIENT-CAPTURE") && rules.contains("# ipset ambient-pod4"),
            "{rules}"
        );
        assert!(rules.contains("REDIRECT --to-ports 15001"), "{rules}");
    } else {
        assert!(
            rules.contains("table inet ambient") && rules.contains("table bridge ambient"),
            "{rules}"
        );
        assert!(rules.contains("redirect to :15001"), "{rules}");
    }
    let (_, status) = lab.cli(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["source_synced"], true);
    assert_eq!(status["pods_captured"], 1);
    assert_eq!(status["backend"], backend::current().name());
    assert_eq!(status["ztunnel_connected"], false);
    let metrics = lab.http_get("/metrics");
    assert!(
        metrics.contains("ambient_agent_enrolments_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ambient_agent_enrolled_pods 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ambient_agent_add_duration_seconds_count 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ambient_agent_cni_requests_total{op=\"add\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "ambient_agent_backend{{backend=\"{}\"}} 1",
            backend::current().name()
        )),
        "{metrics}"
    );
    assert!(lab.http_get("/healthz/ready").contains("200 OK"));
    // With the agent down, `status` says so and `pods` falls back to the persisted state.
    lab.stop_agent();
    let (code, down) = lab.cli(&["status"]);
    assert_eq!(code, 1);
    assert!(down.contains("DOWN"), "{down}");
    let (code, persisted) = lab.cli(&["pods"]);
    assert_eq!(code, 1);
    assert!(
        persisted.contains("web") && persisted.contains("agent_down"),
        "{persisted}"
    );
    lab.start_agent();
}

/// Uninstall removes the agent's tables and policy routing, and nothing else.
#[test]
fn uninstall_leaves_the_node_as_it_was() {
    let node = ambient_tests::NetNs::new("uninst").unwrap();
    node.exec("nft", &["add table inet other; add chain inet other c { type filter hook input priority 0; }; add rule inet other c tcp dport 22 accept"])
        .unwrap();
    // Someone else's iptables rules, in both variants.
    for tool in ["iptables-legacy", "iptables-nft"] {
        node.exec(
            tool,
            &["-A", "INPUT", "-p", "tcp", "--dport", "23", "-j", "ACCEPT"],
        )
        .unwrap();
    }
    node.ip(&[
        "rule", "add", "fwmark", "0x1", "lookup", "100", "priority", "100",
    ])
    .unwrap();
    let snapshot = |ns: &ambient_tests::NetNs| {
        (
            backend::Backend::snapshot(ns),
            ns.ip(&["rule"]).unwrap(),
            ns.ip(&["-6", "rule"]).unwrap(),
            ns.ip(&["route", "show", "table", "all"]).unwrap(),
        )
    };
    let before = snapshot(&node);
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = node.command(bins::binary(bins::NODE_AGENT));
    cmd.args(["run", "--node-name", "n", "--manifest-dir"])
        .arg(dir.path())
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(backend::current().agent_args())
        .stderr(std::process::Stdio::null());
    let pid = node.spawn(&mut cmd).unwrap();
    let sock = dir.path().join("run/cni.sock");
    eventually(WAIT, || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no socket")
        }
    })
    .unwrap();
    assert_ne!(snapshot(&node), before, "the agent installed nothing");
    node.stop(pid);
    node.exec(
        bins::binary(bins::NODE_AGENT),
        &[
            "uninstall",
            "--run-dir",
            dir.path().join("run").to_str().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(snapshot(&node), before);
    // Twice is fine.
    node.exec(
        bins::binary(bins::NODE_AGENT),
        &[
            "uninstall",
            "--run-dir",
            dir.path().join("run").to_str().unwrap(),
        ],
    )
    .unwrap();
}

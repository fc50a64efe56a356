//! This project's ztunnel and Istio's, side by side on the same work in one run, interleaved,
//! each round with its direct baseline (issue 14). Prints a Markdown table with the ratios.
//!
//! Topology (network namespaces, 10.241.0.0/16), the same for both proxies:
//!
//! ```text
//!   C (client pod) -- A (node a, a ztunnel) -- B (node b, a ztunnel) -- S (server pod)
//!   10.241.1.1        10.241.1.254/10.241.0.1   10.241.0.2/10.241.2.254   10.241.2.1
//! ```
//!
//! A and B route between the pods. A REDIRECTs C's TCP to the mesh ports of S to 15001; B
//! REDIRECTs HBONE to S (port 15008) to its own 15008, as the node agent's capture does. The
//! servers in S listen on two ports each: the mesh port (captured) and the direct port (routed
//! through A and B untouched), so the direct path crosses the same hops without the proxies.
//! Our ztunnel runs with static manifests and a CA directory; Istio's in dedicated mode
//! without istiod (`FAKE_CA`, `LOCAL_XDS_PATH`; see the peer's README), one instance per node
//! serving that node's pod. Both at `info` logging, access logs as each ships.
//!
//! `cargo bench -p ztunnel --bench sidebyside` (root; iperf3, wrk, nginx). Istio's binary:
//! `ISTIO_ZTUNNEL`, else /work/shared/peers/istio-ztunnel/ztunnel; without it only this
//! project's rows are measured, with a note. `BENCH_SECS` (5) per measurement,
//! `BENCH_ROUNDS` (4) interleaved rounds; the table holds the median of the rounds.
//! `BENCH_ZT_ARGS` adds flags to this project's ztunnel, `BENCH_OURS_BIN` runs another build
//! of it (experiments: an A/B of two commits).
//!
//! `BENCH_PROFILE=1` measures what each proxy spends instead of the table: `perf stat` on
//! each instance during a 1-stream transfer, 64 B ping-pong and HTTP keep-alive on one
//! connection (CPU, context switches, syscalls by kind per MiB, exchange or request);
//! `BENCH_PROFILE=record` adds a flat `perf record` profile of each instance during the
//! transfer.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::support::{in_ns, is_root, ns_sh, sh};
use common::{
    conn_rate, cpu_secs, echo_server_args, env_or, iperf, median, nginx_args, rr, rss_kib,
    wait_listening, wrk_rps,
};

const ISTIO_ZTUNNEL_DEFAULT: &str = "/work/shared/peers/istio-ztunnel/ztunnel";

const C_IP: Ipv4Addr = Ipv4Addr::new(10, 241, 1, 1);
const A_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 241, 1, 254);
const A_IP: Ipv4Addr = Ipv4Addr::new(10, 241, 0, 1);
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 241, 0, 2);
const B_POD_SIDE: Ipv4Addr = Ipv4Addr::new(10, 241, 2, 254);
const S_IP: Ipv4Addr = Ipv4Addr::new(10, 241, 2, 1);

/// (mesh port, direct port) of each server in S.
const IPERF: (u16, u16) = (5201, 5202);
const ECHO: (u16, u16) = (7000, 7001);
const HTTP: (u16, u16) = (8080, 8081);
const MESH_PORTS: [u16; 3] = [IPERF.0, ECHO.0, HTTP.0];

const OUTBOUND: u16 = 15001;
const HBONE: u16 = 15008;

/// The four namespaces and everything started in them; dropping it stops the processes (by
/// PID) and deletes the namespaces, also on panic.
struct Topology {
    c: String,
    a: String,
    b: String,
    s: String,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.c, &self.a, &self.b, &self.s] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Topology {
    fn new() -> Topology {
        let id = std::process::id();
        let name = |n: &str| format!("sbs-{n}-{id}");
        let t = Topology {
            c: name("c"),
            a: name("a"),
            b: name("b"),
            s: name("s"),
            children: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("sidebyside-")
                .tempdir()
                .unwrap(),
        };
        for ns in [&t.c, &t.a, &t.b, &t.s] {
            sh(&["ip", "netns", "add", ns]);
            ns_sh(ns, &["ip", "link", "set", "lo", "up"]);
            // The connection-rate row opens tens of thousands of connections to one
            // address and port: without reusing TIME_WAIT ports the client runs out of
            // them within seconds and measures port search, not connections. (Above the
            // proxies' listeners: a TIME_WAIT port 15008 blocks a listener's bind.)
            ns_sh(ns, &["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
            ns_sh(
                ns,
                &["sysctl", "-qw", "net.ipv4.ip_local_port_range=16000 65535"],
            );
        }
        let link = |x: &str, xi: &str, xa: Ipv4Addr, y: &str, yi: &str, ya: Ipv4Addr| {
            sh(&[
                "ip", "link", "add", xi, "netns", x, "type", "veth", "peer", "name", yi, "netns", y,
            ]);
            for (ns, ifname, addr) in [(x, xi, xa), (y, yi, ya)] {
                ns_sh(
                    ns,
                    &["ip", "addr", "add", &format!("{addr}/24"), "dev", ifname],
                );
                ns_sh(ns, &["ip", "link", "set", ifname, "up"]);
            }
        };
        link(&t.c, "eth0", C_IP, &t.a, "pod0", A_POD_SIDE);
        link(&t.a, "underlay", A_IP, &t.b, "underlay", B_IP);
        link(&t.b, "pod0", B_POD_SIDE, &t.s, "eth0", S_IP);
        ns_sh(
            &t.c,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &A_POD_SIDE.to_string(),
            ],
        );
        ns_sh(
            &t.s,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &B_POD_SIDE.to_string(),
            ],
        );
        ns_sh(
            &t.a,
            &[
                "ip",
                "route",
                "add",
                "10.241.2.0/24",
                "via",
                &B_IP.to_string(),
            ],
        );
        ns_sh(
            &t.b,
            &[
                "ip",
                "route",
                "add",
                "10.241.1.0/24",
                "via",
                &A_IP.to_string(),
            ],
        );
        for ns in [&t.a, &t.b] {
            ns_sh(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        t
    }

    /// Installs `proxy`'s capture, each as deployed. Ours, as the node agent's: C's
    /// connections to S's mesh ports go to A's 15001 (the proxies' own marked sockets never
    /// come through PREROUTING), HBONE to S goes to B's 15008. Istio's, as its in-pod mode:
    /// in C, the pod's own connections to the mesh ports go to its 15001 (its marked sockets
    /// excepted); HBONE arrives at S's 15008 as addressed (Istio's inbound refuses a
    /// connection whose local address is not the target's: "ip mismatch").
    fn capture(&self, proxy: Proxy) {
        let ports: Vec<String> = MESH_PORTS.iter().map(u16::to_string).collect();
        let ports = ports.join(", ");
        let mark = ambient_common::constants::ZTUNNEL_MARK;
        let mask = ambient_common::constants::MARK_MASK;
        let table = |hook: &str, rule: String| {
            format!(
                "table ip sbs {{\n  chain c {{\n    type nat hook {hook} priority -100;\n    {rule}\n  }}\n}}\n"
            )
        };
        match proxy {
            Proxy::Ours => {
                let rule = format!(
                    "iifname \"pod0\" ip daddr {S_IP} tcp dport {{ {ports} }} redirect to :{OUTBOUND}"
                );
                self.nft(&self.a, &table("prerouting", rule));
                let rule = format!("ip daddr {S_IP} tcp dport {HBONE} redirect to :{HBONE}");
                self.nft(&self.b, &table("prerouting", rule));
            }
            Proxy::Istio => {
                let rule = format!(
                    "meta mark & {mask:#x} != {mark:#x} ip daddr {S_IP} tcp dport {{ {ports} }} redirect to :{OUTBOUND}"
                );
                self.nft(&self.c, &table("output", rule));
            }
        }
    }

    /// Removes every namespace's capture.
    fn uncapture(&self) {
        for ns in [&self.c, &self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "exec", ns, "nft", "delete", "table", "ip", "sbs"])
                .stderr(Stdio::null())
                .status();
        }
    }

    fn nft(&self, ns: &str, ruleset: &str) {
        let path = self.dir.path().join("rules.nft");
        std::fs::write(&path, ruleset).unwrap();
        ns_sh(ns, &["nft", "-f", path.to_str().unwrap()]);
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `args` in `ns` (output to `log`, if any); returns its PID.
    fn spawn(
        &mut self,
        ns: &str,
        args: &[String],
        env: &[(&str, String)],
        log: Option<&Path>,
    ) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        match log {
            Some(p) => {
                let f = std::fs::File::create(p).unwrap();
                cmd.stdout(f.try_clone().unwrap()).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Stops the process `pid` started here (SIGTERM, then SIGKILL after 5 s).
    fn stop(&mut self, pid: u32) {
        let Some(i) = self.children.iter().position(|c| c.id() == pid) else {
            return;
        };
        let mut child = self.children.remove(i);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The servers in S: iperf3 and the echo server on both ports, nginx on both.
    fn start_servers(&mut self) {
        let s = self.s.clone();
        for port in [IPERF.0, IPERF.1] {
            let args = [
                "iperf3",
                "-s",
                "-B",
                &S_IP.to_string(),
                "-p",
                &port.to_string(),
            ]
            .map(String::from)
            .to_vec();
            self.spawn(&s, &args, &[], None);
        }
        let echo: Vec<SocketAddr> = [ECHO.0, ECHO.1]
            .map(|p| SocketAddr::new(S_IP.into(), p))
            .into();
        self.spawn(&s, &echo_server_args(&echo), &[], None);
        let http: Vec<SocketAddr> = [HTTP.0, HTTP.1]
            .map(|p| SocketAddr::new(S_IP.into(), p))
            .into();
        let args = nginx_args(self.dir.path(), "nginx", &http);
        self.spawn(&s, &args, &[], None);
        for port in [IPERF.0, IPERF.1, ECHO.0, ECHO.1, HTTP.0, HTTP.1] {
            wait_listening(&s, port);
        }
    }
}

/// One proxy implementation: how to start its two instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Ours,
    Istio,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Ours => "this project",
            Proxy::Istio => "Istio ztunnel",
        }
    }
}

/// Configuration both proxies read, written once.
fn write_config(t: &Topology) {
    // Ours: the cluster as manifests, a CA of its own.
    let manifests = t.path("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let pod = |name: &str, ip: Ipv4Addr, node: &str, host: Ipv4Addr| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, uid: uid-{name}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: {name}}}\n\
             status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: \"{ip}\"}}], hostIP: {host}}}\n"
        )
    };
    std::fs::write(
        manifests.join("cluster.yaml"),
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n{}{}",
            pod("client", C_IP, "node-a", A_IP),
            pod("server", S_IP, "node-b", B_IP),
        ),
    )
    .unwrap();
    sh(&[
        env!("CARGO_BIN_EXE_ztunnel"),
        "ca",
        "init",
        "--dir",
        t.path("ca").to_str().unwrap(),
    ]);
    // Istio's: the two workloads as static XDS.
    let workload = |name: &str, ip: Ipv4Addr, node: &str| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n"
        )
    };
    std::fs::write(
        t.path("istio-local.yaml"),
        format!(
            "workloads:\n{}{}policies: []\nservices: []\n",
            workload("client", C_IP, "node-a"),
            workload("server", S_IP, "node-b")
        ),
    )
    .unwrap();
}

/// This project's ztunnel: the bench's own build, or `BENCH_OURS_BIN`.
fn ours_binary() -> String {
    std::env::var("BENCH_OURS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ztunnel").to_owned())
}

/// Starts `proxy` on both nodes; returns the two PIDs once both are ready.
fn start(t: &mut Topology, proxy: Proxy, istio: &Path, round: usize) -> (u32, u32) {
    let mut pids = Vec::new();
    // Ours in the node namespaces, Istio's in the pods' (its in-pod mode).
    let (na, nb) = match proxy {
        Proxy::Ours => (t.a.clone(), t.b.clone()),
        Proxy::Istio => (t.c.clone(), t.s.clone()),
    };
    for (ns, node, pod) in [(na, "node-a", "client"), (nb, "node-b", "server")] {
        let log = t.path(&format!(
            "{}-{node}-{round}.log",
            match proxy {
                Proxy::Ours => "ours",
                Proxy::Istio => "istio",
            }
        ));
        let pid = match proxy {
            Proxy::Ours => {
                let ours = ours_binary();
                let args: Vec<String> = [
                    ours.as_str(),
                    "run",
                    "--node-name",
                    node,
                    "--manifest-dir",
                    t.path("manifests").to_str().unwrap(),
                    "--ca-dir",
                    t.path("ca").to_str().unwrap(),
                    "--agent-socket",
                    t.path(&format!("{node}.sock")).to_str().unwrap(),
                    "--transparent",
                    "false",
                    "--drain-timeout",
                    "1s",
                ]
                .map(String::from)
                .to_vec();
                // BENCH_ZT_ARGS: extra flags for this project's ztunnel (experiments).
                let mut args = args;
                args.extend(
                    std::env::var("BENCH_ZT_ARGS")
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(String::from),
                );
                t.spawn(&ns, &args, &[("RUST_LOG", "info".into())], Some(&log))
            }
            Proxy::Istio => {
                let env = [
                    ("FAKE_CA", "true".to_owned()),
                    ("XDS_ADDRESS", String::new()),
                    (
                        "LOCAL_XDS_PATH",
                        t.path("istio-local.yaml").display().to_string(),
                    ),
                    ("PROXY_MODE", "dedicated".into()),
                    ("PROXY_WORKLOAD_INFO", format!("default/{pod}/{pod}")),
                    (
                        "PACKET_MARK",
                        ambient_common::constants::ZTUNNEL_MARK.to_string(),
                    ),
                    ("ENABLE_ORIG_SRC", "false".into()),
                    ("NODE_NAME", node.into()),
                    ("RUST_LOG", "info".into()),
                ];
                let args = vec![istio.display().to_string(), "proxy".into()];
                t.spawn(&ns, &args, &env, Some(&log))
            }
        };
        pids.push((pid, ns, log));
    }
    for (pid, ns, log) in &pids {
        let ready = |body: &str| body.contains("ready") || body.contains("200");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let port = match proxy {
                Proxy::Ours => ambient_common::constants::READINESS_PORT,
                Proxy::Istio => 15021,
            };
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let ok = in_ns(ns, || {
                common::support::http_get(&addr.to_string(), "/healthz/ready")
            })
            .is_some_and(|b| ready(&b) || b.is_empty());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {pid}) not ready; log:\n{}",
                proxy.name(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    t.capture(proxy);
    // A first connection through, so both sides hold certificates and the pool is warm.
    let to = SocketAddr::new(S_IP.into(), ECHO.0);
    let c = t.c.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_ns(&c, || probe(to)).is_err() {
        if Instant::now() > deadline {
            for (_, _, log) in &pids {
                eprintln!(
                    "==== {}:\n{}",
                    log.display(),
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            panic!("{}: no path through the mesh", proxy.name());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (pids[0].0, pids[1].0)
}

fn probe(to: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(&[9u8; 8])?;
    let mut b = [0u8; 8];
    s.read_exact(&mut b)
}

/// One round's figures for one path.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    up_gbps: f64,
    down_gbps: f64,
    rtt_avg_us: f64,
    rtt_p99_us: f64,
    rps_1: f64,
    rps_32: f64,
    conns_per_s: f64,
    /// Both proxies' cores busy during the 1-stream transfer.
    cores: f64,
    rss_idle_mib: f64,
    rss_after_mib: f64,
}

/// Every measurement of one round, against S's mesh ports (`mesh`) or its direct ports.
fn measure(t: &Topology, mesh: bool, pids: Option<(u32, u32)>, secs: u32) -> Figures {
    let pick =
        |ports: (u16, u16)| SocketAddr::new(IpAddr::V4(S_IP), if mesh { ports.0 } else { ports.1 });
    let cpu = || pids.map_or(0.0, |(x, y)| cpu_secs(x) + cpu_secs(y));
    let rss = || pids.map_or(0.0, |(x, y)| (rss_kib(x) + rss_kib(y)) as f64 / 2048.0);
    let mut f = Figures {
        rss_idle_mib: rss(),
        ..Figures::default()
    };
    let c0 = cpu();
    f.up_gbps = iperf(&t.c, pick(IPERF), 1, secs, false);
    f.cores = (cpu() - c0) / f64::from(secs);
    f.down_gbps = iperf(&t.c, pick(IPERF), 1, secs, true);
    let l = rr(&t.c, pick(ECHO), 20_000);
    (f.rtt_avg_us, f.rtt_p99_us) = (l.avg, l.p99);
    let url = format!("http://{}/", pick(HTTP));
    f.rps_1 = wrk_rps(&t.c, &url, 1, 1, secs);
    f.rps_32 = wrk_rps(&t.c, &url, 2, 32, secs);
    f.conns_per_s = conn_rate(&t.c, pick(ECHO), 16, u64::from(secs));
    f.rss_after_mib = rss();
    f
}

fn main() {
    if common::echo_server_main() {
        return;
    }
    if !is_root() {
        eprintln!("sidebyside benchmark needs root (network namespaces); skipped");
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` only builds it.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let missing = common::missing_tools(&["iperf3", "wrk", "nginx"]);
    if !missing.is_empty() {
        eprintln!(
            "sidebyside benchmark needs {}: apt-get install iperf3 wrk nginx-light",
            missing.join(", ")
        );
        std::process::exit(1);
    }
    let istio = std::env::var_os("ISTIO_ZTUNNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(ISTIO_ZTUNNEL_DEFAULT));
    let mut proxies = vec![Proxy::Ours];
    if istio.is_file() {
        proxies.push(Proxy::Istio);
    } else {
        println!(
            "Istio's ztunnel not found at {} (ISTIO_ZTUNNEL=<path>): its rows are skipped.",
            istio.display()
        );
    }
    let secs: u32 = env_or("BENCH_SECS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 4);
    let _ = ztunnel::sys::raise_nofile_limit();
    let mut t = Topology::new();
    write_config(&t);
    t.start_servers();
    if let Ok(mode) = std::env::var("BENCH_PROFILE") {
        if !common::perf::available() {
            eprintln!("BENCH_PROFILE needs perf with syscall tracepoints (linux-perf)");
            std::process::exit(1);
        }
        profile(&mut t, &proxies, &istio, secs, mode == "record");
        return;
    }

    // results[p][round], direct[round]
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); proxies.len()];
    let mut direct: Vec<Figures> = Vec::new();
    for round in 0..rounds {
        direct.push(measure(&t, false, None, secs));
        // Alternate which proxy goes first, so neither always follows the other.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..proxies.len()).collect()
        } else {
            (0..proxies.len()).rev().collect()
        };
        for i in order {
            let pids = start(&mut t, proxies[i], &istio, round);
            std::thread::sleep(Duration::from_millis(500));
            let f = measure(&t, true, Some(pids), secs);
            eprintln!("round {round} {}: {f:?}", proxies[i].name());
            results[i].push(f);
            t.uncapture();
            t.stop(pids.0);
            t.stop(pids.1);
        }
        eprintln!("round {round} direct: {:?}", direct[round]);
    }
    print_table(&proxies, &results, &direct, rounds, secs);
}

/// One load of the profile mode: what it runs and the unit its costs are divided by.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// iperf3, 1 stream, client -> server: per MiB relayed.
    Stream,
    /// 20,000 64 B exchanges on one connection: per exchange.
    PingPong,
    /// wrk on one keep-alive connection: per request.
    KeepAlive,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Stream => "1 stream, per MiB",
            Load::PingPong => "64 B ping-pong, per exchange",
            Load::KeepAlive => "HTTP keep-alive 1 conn, per request",
        }
    }

    /// Runs the load through the mesh; returns how many units it moved.
    fn run(self, t: &Topology, secs: u32) -> f64 {
        let mesh = |p: u16| SocketAddr::new(IpAddr::V4(S_IP), p);
        match self {
            Load::Stream => {
                let gbps = iperf(&t.c, mesh(IPERF.0), 1, secs, false);
                gbps * 1e9 / 8.0 * f64::from(secs) / 1048576.0
            }
            Load::PingPong => {
                rr(&t.c, mesh(ECHO.0), 20_000);
                20_200.0
            }
            Load::KeepAlive => {
                wrk_rps(&t.c, &format!("http://{}/", mesh(HTTP.0)), 1, 1, secs) * f64::from(secs)
            }
        }
    }
}

/// BENCH_PROFILE: each proxy's costs per unit of work, per instance (client side = node a
/// or the client pod, server side), from `perf stat`; with `record`, flat profiles.
fn profile(t: &mut Topology, proxies: &[Proxy], istio: &Path, secs: u32, record: bool) {
    use common::perf::{parse_stat, report, Attached, Costs};
    let loads = [Load::Stream, Load::PingPong, Load::KeepAlive];
    // costs[proxy][load] = (client side, server side, units)
    let mut costs = vec![Vec::new(); proxies.len()];
    let mut profiles = Vec::new();
    for (i, &proxy) in proxies.iter().enumerate() {
        let pids = start(t, proxy, istio, 0);
        std::thread::sleep(Duration::from_millis(500));
        for load in loads {
            let a = Attached::stat(pids.0, &t.path(&format!("stat-{i}-a")));
            let b = Attached::stat(pids.1, &t.path(&format!("stat-{i}-b")));
            let units = load.run(t, secs);
            let (ca, cb) = (
                Costs::from_stat(&parse_stat(&a.finish())),
                Costs::from_stat(&parse_stat(&b.finish())),
            );
            eprintln!(
                "{} {}: {units:.0} units, {ca:?} {cb:?}",
                proxy.name(),
                load.name()
            );
            costs[i].push((ca.per(units), cb.per(units)));
        }
        if record {
            let a = Attached::record(pids.0, &t.path(&format!("perf-{i}-a.data")));
            let b = Attached::record(pids.1, &t.path(&format!("perf-{i}-b.data")));
            Load::Stream.run(t, secs);
            let (pa, pb) = (a.finish(), b.finish());
            profiles.push((proxy, report(&pa, 1.0), report(&pb, 1.0)));
        }
        t.uncapture();
        t.stop(pids.0);
        t.stop(pids.1);
    }
    println!("\n## What each proxy spends ({secs} s per load; client side / server side)\n");
    let mut header = "| load | cost |".to_owned();
    let mut rule = "|---|---|".to_owned();
    for p in proxies {
        header.push_str(&format!(" {} |", p.name()));
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    type Get = fn(&Costs) -> f64;
    let rows: [(&str, Get); 6] = [
        ("CPU ms", |c| c.cpu_ms),
        ("context switches", |c| c.switches),
        ("reads (read, readv, recvfrom, recvmsg)", |c| c.reads),
        ("writes (write, writev, sendto, sendmsg)", |c| c.writes),
        ("epoll waits", |c| c.polls),
        ("futex calls", |c| c.futex),
    ];
    for (l, load) in loads.iter().enumerate() {
        for (label, get) in rows {
            let mut line = format!("| {} | {label} |", load.name());
            for per_proxy in &costs {
                let (a, b) = per_proxy[l];
                line.push_str(&format!(" {:.3} / {:.3} |", get(&a), get(&b)));
            }
            println!("{line}");
        }
    }
    for (proxy, a, b) in profiles {
        println!(
            "\n### {} during the 1-stream transfer: client side\n\n```\n{a}\n```\n\n### {} server side\n\n```\n{b}\n```",
            proxy.name(),
            proxy.name()
        );
    }
}

fn med(v: &[Figures], f: impl Fn(&Figures) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(f).collect();
    median(&mut x)
}

fn print_table(
    proxies: &[Proxy],
    results: &[Vec<Figures>],
    direct: &[Figures],
    rounds: usize,
    secs: u32,
) {
    println!(
        "\n## Side by side (median of {rounds} interleaved rounds, {secs} s per measurement)\n"
    );
    let mut header = "| metric | direct |".to_owned();
    let mut rule = "|---|---:|".to_owned();
    for p in proxies {
        header.push_str(&format!(" {} |", p.name()));
        rule.push_str("---:|");
    }
    if proxies.len() == 2 {
        header.push_str(" ratio (ours / Istio) |");
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    type Get = fn(&Figures) -> f64;
    // (label, value, has a direct value, "added" rows: mesh minus direct before the ratio)
    let rows: [(&str, Get, bool, bool); 12] = [
        (
            "iperf3 1 stream, client->server (Gbit/s)",
            |f| f.up_gbps,
            true,
            false,
        ),
        (
            "iperf3 1 stream, server->client (Gbit/s)",
            |f| f.down_gbps,
            true,
            false,
        ),
        ("64 B ping-pong RTT avg (µs)", |f| f.rtt_avg_us, true, false),
        ("64 B ping-pong RTT p99 (µs)", |f| f.rtt_p99_us, true, false),
        (
            "added latency avg: mesh - direct (µs)",
            |f| f.rtt_avg_us,
            false,
            true,
        ),
        (
            "added latency p99: mesh - direct (µs)",
            |f| f.rtt_p99_us,
            false,
            true,
        ),
        (
            "HTTP keep-alive, 1 connection (req/s)",
            |f| f.rps_1,
            true,
            false,
        ),
        (
            "HTTP keep-alive, 32 connections (req/s)",
            |f| f.rps_32,
            true,
            false,
        ),
        (
            "new connection per request, 16 concurrent (/s)",
            |f| f.conns_per_s,
            true,
            false,
        ),
        (
            "ztunnel cores (both) during the 1-stream transfer",
            |f| f.cores,
            false,
            false,
        ),
        (
            "ztunnel RSS idle, per instance (MiB)",
            |f| f.rss_idle_mib,
            false,
            false,
        ),
        (
            "ztunnel RSS after the run, per instance (MiB)",
            |f| f.rss_after_mib,
            false,
            false,
        ),
    ];
    let direct_of = |get: Get| med(direct, get);
    for (label, get, has_direct, added) in rows {
        let mut line = format!("| {label} | ");
        line.push_str(&if has_direct {
            format!("{:.2} |", direct_of(get))
        } else {
            "- |".to_owned()
        });
        let mut values = Vec::new();
        for r in results {
            let v = if added {
                med(r, get) - direct_of(get)
            } else {
                med(r, get)
            };
            values.push(v);
            line.push_str(&format!(" {v:.2} |"));
        }
        if values.len() == 2 {
            line.push_str(&format!(" {:.2} |", values[0] / values[1]));
        }
        println!("{line}");
    }
    // Cores per Gbit/s, from each round's own pair.
    let mut line = "| ztunnel cores per Gbit/s (1 stream) | - |".to_owned();
    let mut values = Vec::new();
    for r in results {
        let mut per: Vec<f64> = r.iter().map(|f| f.cores / f.up_gbps.max(1e-9)).collect();
        let v = median(&mut per);
        values.push(v);
        line.push_str(&format!(" {v:.3} |"));
    }
    if values.len() == 2 {
        line.push_str(&format!(" {:.2} |", values[0] / values[1]));
    }
    println!("{line}");
    println!(
        "\nRatios above 1 are better for throughput and rates; below 1 for latency, cores and memory."
    );
}

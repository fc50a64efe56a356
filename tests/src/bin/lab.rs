//! `lab`: the local demo cluster of the ambient data plane (two nodes as network namespaces,
//! the real binaries, traffic and what it proves). `up` builds nodes as
//! network namespaces on an underlay, pods through the real CNI chain, and runs one
//! `node-agent` and one `ztunnel` per node; `status`, `exec` and `down` work from another
//! invocation through the state directory; `demo` runs the whole story and prints the proof.
//! See `docs/lab.md`. The cluster itself is `ambient_tests::cluster`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ambient_tests::capture::{payload_contains, Packet, TCP};
use ambient_tests::cluster::{
    self, ambient_plaintext, finish_quiet, metric_samples, Addressing, Cluster, ClusterSpec,
    LabState, ECHO_PORT,
};
use ambient_tests::cni::Attach;
use ambient_tests::inns;
use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

const DEFAULT_STATE_DIR: &str = "/var/run/ambient-lab";
const HBONE: u16 = ambient_common::constants::HBONE_PORT;
const WAIT: Duration = Duration::from_secs(20);

#[derive(Parser)]
#[command(
    name = "lab",
    about = "Local demo cluster of the ambient data plane (run as root)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Cni {
    Bridge,
    Ptp,
    /// Calico's shape: host veths without addresses, proxy ARP (`routed-cni`).
    Calico,
}

#[derive(clap::Args, Clone)]
struct UpArgs {
    /// Number of nodes (1-20).
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Primary CNI plugin in front of ambient-cni.
    #[arg(long, value_enum, default_value = "bridge")]
    cni: Cni,
    /// Where the lab keeps its files and its state (`lab.json`).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the cluster and leave it running.
    Up(UpArgs),
    /// Per node: agent status and pods, ztunnel readiness, connections and metrics.
    Status {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run a command inside a pod's network namespace: `lab exec app-1 -- ip addr`.
    Exec {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Pod name (`app-1`) or namespace/name (`ambient-demo/app-1`), or a node (`node-1`).
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove everything `up` created (safe to run twice).
    Down {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// up, traffic, capture of the underlay, the proof, then down (unless --keep).
    Demo {
        #[command(flatten)]
        up: UpArgs,
        /// Leave the cluster running afterwards (`lab status`, `lab exec`, `lab down`).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab creates network namespaces and nftables rules: run it as root");
    }
    match Cli::parse().cmd {
        Cmd::Up(a) => {
            let c = up(&a)?;
            let state = c.persist();
            println!(
                "lab is up: {} nodes, state in {}",
                state.nodes.len(),
                a.state_dir.display()
            );
            print_inventory(&state);
            println!("\nnext: lab status | lab exec app-1 -- ip addr | lab down");
            Ok(())
        }
        Cmd::Status { state_dir } => status(&load(&state_dir)?),
        Cmd::Exec {
            state_dir,
            pod,
            command,
        } => exec(&load(&state_dir)?, &pod, &command),
        Cmd::Down { state_dir } => down(&state_dir),
        Cmd::Demo { up: a, keep } => demo(&a, keep),
    }
}

fn load(state_dir: &Path) -> anyhow::Result<LabState> {
    LabState::load(state_dir)
        .map_err(anyhow::Error::msg)?
        .with_context(|| format!("no lab in {} (run `lab up`)", state_dir.display()))
}

/// Builds the cluster in `state_dir`: pods `app-<i>` (ambient-demo) and `legacy-<i>` (legacy)
/// on every node, `app-1b` next to `app-1`, and the ClusterIP service `echo` whose endpoints
/// are the ambient pods of the last node.
fn up(a: &UpArgs) -> anyhow::Result<Cluster> {
    if !(1..=20).contains(&a.nodes) {
        bail!("--nodes must be between 1 and 20");
    }
    if let Some(s) = LabState::load(&a.state_dir).map_err(anyhow::Error::msg)? {
        bail!(
            "a lab is already up in {} ({} nodes): run `lab down` first",
            a.state_dir.display(),
            s.nodes.len()
        );
    }
    prepare_state_dir(&a.state_dir)?;
    let attach = match a.cni {
        Cni::Bridge => Attach::Bridge,
        Cni::Ptp => Attach::Ptp,
        Cni::Calico => Attach::Routed,
    };
    let mut spec = ClusterSpec::new("lab", a.nodes, attach, Addressing::lab());
    spec.root = Some(a.state_dir.clone());
    eprintln!("building {} nodes ({:?} + ambient-cni)...", a.nodes, attach);
    let mut c = Cluster::new(spec).context("building the nodes")?;
    // Saved early: an interrupted `up` or `demo` can still be removed with `lab down`.
    c.state().save(&a.state_dir)?;
    for i in 0..a.nodes {
        let n = i + 1;
        c.add_pod(i, "ambient-demo", &format!("app-{n}"), &[("app", "app")])?;
        c.add_pod(i, "legacy", &format!("legacy-{n}"), &[("app", "legacy")])?;
        if i == 0 {
            c.add_pod(0, "ambient-demo", "app-1b", &[("app", "app")])?;
        }
        c.state().save(&a.state_dir)?;
    }
    let last = a.nodes - 1;
    let endpoints: Vec<usize> = (0..c.pods.len())
        .filter(|&p| c.pods[p].node == last && c.pods[p].namespace() == "ambient-demo")
        .collect();
    c.add_service("ambient-demo", "echo", 10, 80, &endpoints)?;
    c.wait_converged(WAIT).map_err(anyhow::Error::msg)?;
    c.wait_services(WAIT).map_err(anyhow::Error::msg)?;
    c.state().save(&a.state_dir)?;
    Ok(c)
}

fn print_inventory(s: &LabState) {
    if let Some(pid) = s.issuer_pid {
        println!(
            "\ncertificate issuer (the only holder of the CA key): ambient-issuer pid {pid} in netns {} at https://{}:{}",
            s.underlay_ns,
            s.addressing.underlay_ip(cluster::ISSUER_HOST as usize),
            ambient_common::constants::ISSUER_GRPC_PORT
        );
    }
    println!("\nnodes:");
    for n in &s.nodes {
        println!(
            "  {:8} netns {:24} underlay {:15} pods {:16} agent pid {} ztunnel pid {}",
            n.name,
            n.netns,
            n.underlay_ip.to_string(),
            n.pod_cidr,
            n.agent_pid.map_or("-".into(), |p| p.to_string()),
            n.ztunnel_pid.map_or("-".into(), |p| p.to_string())
        );
    }
    println!("pods (echo server on :{ECHO_PORT}):");
    for p in &s.pods {
        println!(
            "  {:28} {:8} {:15} {:8} spiffe://{}/ns/{}/sa/{}",
            format!("{}/{}", p.namespace, p.name),
            p.node,
            p.ip.to_string(),
            if p.ambient { "ambient" } else { "-" },
            s.trust_domain,
            p.namespace,
            p.service_account
        );
    }
    for svc in &s.services {
        let eps: Vec<String> = svc.endpoints.iter().map(ToString::to_string).collect();
        println!(
            "service {}/{}: {}:{} -> {} (port {})",
            svc.namespace,
            svc.name,
            svc.vip,
            svc.port,
            eps.join(", "),
            svc.target_port
        );
    }
}

fn node_agent() -> PathBuf {
    ambient_tests::bins::binary(ambient_tests::bins::NODE_AGENT)
}

fn status(s: &LabState) -> anyhow::Result<()> {
    print_inventory(s);
    for n in &s.nodes {
        println!("\n==================== {} ====================", n.name);
        for view in ["status", "pods"] {
            println!("$ node-agent {view} --run-dir {}", n.run_dir().display());
            let out = Command::new(node_agent())
                .arg(view)
                .arg("--run-dir")
                .arg(n.run_dir())
                .output()
                .context("running node-agent")?;
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        let ns = PathBuf::from(ambient_tests::netns::NETNS_RUN_DIR).join(&n.netns);
        let get = |port: u16, path: &str| {
            inns::in_ns(&ns, || {
                inns::http_get(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    path,
                    Duration::from_secs(3),
                )
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        };
        match get(ambient_common::constants::READINESS_PORT, "/healthz/ready") {
            Ok((code, _)) => println!("ztunnel readiness: HTTP {code}"),
            Err(e) => println!("ztunnel readiness: unreachable ({e})"),
        }
        if let Ok((200, body)) = get(ambient_common::constants::ADMIN_PORT, "/connections") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let live = v.as_array().map_or(0, Vec::len);
            println!("ztunnel live connections: {live}");
            for c in v.as_array().into_iter().flatten().take(10) {
                println!(
                    "  {} {} -> {} mtls={}",
                    c["direction"].as_str().unwrap_or("?"),
                    c["src"]["identity"].as_str().unwrap_or("-"),
                    c["dst"]["identity"].as_str().unwrap_or("-"),
                    c["mtls"]
                );
            }
        }
        if let Ok((200, body)) = get(ambient_common::constants::METRICS_PORT, "/metrics") {
            print_identities(&body);
        }
    }
    Ok(())
}

/// The identities ztunnel saw, from `istio_tcp_connections_opened_total`.
fn print_identities(metrics: &str) {
    let mut rows: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for (l, v) in metric_samples(metrics, "istio_tcp_connections_opened_total") {
        let g = |k: &str| l.get(k).cloned().unwrap_or_default();
        *rows
            .entry((
                g("reporter"),
                g("source_principal"),
                g("destination_principal"),
                g("connection_security_policy"),
            ))
            .or_default() += v;
    }
    if rows.is_empty() {
        println!("ztunnel connections so far: none");
        return;
    }
    println!("ztunnel connections so far (istio_tcp_connections_opened_total):");
    for ((reporter, src, dst, sec), v) in rows {
        println!("  {v:>5} {reporter:11} {src} -> {dst} [{sec}]");
    }
}

fn exec(s: &LabState, target: &str, command: &[String]) -> anyhow::Result<()> {
    let netns = if let Some(n) = s.nodes.iter().find(|n| n.name == target) {
        n.netns.clone()
    } else {
        let (ns, name) = match target.split_once('/') {
            Some((ns, name)) => (Some(ns), name),
            None => (None, target),
        };
        let p = s
            .pods
            .iter()
            .find(|p| p.name == name && ns.is_none_or(|ns| ns == p.namespace))
            .with_context(|| {
                let names: Vec<String> = s.pods.iter().map(|p| p.name.clone()).collect();
                format!("no pod {target}; pods: {}", names.join(", "))
            })?;
        p.netns.clone()
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(command)
        .status()
        .context("running ip netns exec")?;
    std::process::exit(status.code().unwrap_or(1));
}

/// Marks a directory as the lab's own, so that it is only ever emptied when it carries it.
const MARKER: &str = ".ambient-lab";

/// Makes `dir` an empty lab directory: creates it, or clears the leftovers of a failed `up`
/// (only in a directory carrying the lab's marker); refuses any other non-empty directory.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    let marked = dir.join(MARKER).exists();
    let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
    if marked {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("clearing the leftovers in {}", dir.display()))?;
    } else if !empty {
        bail!(
            "{} is not empty and is not a lab directory; choose another --state-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "state directory of `lab`\n")
        .with_context(|| format!("writing {}", dir.join(MARKER).display()))?;
    Ok(())
}

fn down(state_dir: &Path) -> anyhow::Result<()> {
    let Some(s) = LabState::load(state_dir).map_err(anyhow::Error::msg)? else {
        if state_dir.join(MARKER).exists() {
            std::fs::remove_dir_all(state_dir)?;
            println!(
                "no lab was up; removed the leftovers in {}",
                state_dir.display()
            );
        } else {
            println!("no lab in {}: nothing to do", state_dir.display());
        }
        return Ok(());
    };
    let problems = s.down();
    for p in &problems {
        eprintln!("warning: {p}");
    }
    println!(
        "lab removed: {} pods, {} nodes, underlay {}, {}",
        s.pods.len(),
        s.nodes.len(),
        s.underlay_ns,
        s.root.display()
    );
    Ok(())
}

/// One flow of the demo.
struct Flow {
    name: &'static str,
    from: usize,
    to: SocketAddr,
    /// Expected on the underlay: "hbone", "plaintext" or "local".
    expect: &'static str,
    marker: String,
    result: Result<(), String>,
}

fn demo(a: &UpArgs, keep: bool) -> anyhow::Result<()> {
    if a.nodes < 2 {
        bail!("the demo needs at least 2 nodes");
    }
    let c = up(a)?;
    let state = c.state();
    print_inventory(&state);
    let idx = |name: &str| c.pod_index(name).expect("the demo's pods exist");
    let (app1, app1b, app2) = (idx("app-1"), idx("app-1b"), idx("app-2"));
    let (leg1, leg2) = (idx("legacy-1"), idx("legacy-2"));
    let svc = c.services[0].clone();
    let last_app = idx(&format!("app-{}", a.nodes));
    let secret = |f: &str| format!("SECRET-{f}-{}", std::process::id());
    let mut flows = vec![
        Flow {
            name: "ambient -> ambient, across nodes",
            from: app1,
            to: c.pods[app2].echo_addr(),
            expect: "hbone",
            marker: secret("a2a"),
            result: Ok(()),
        },
        Flow {
            name: "ambient -> ambient, same node",
            from: app1,
            to: c.pods[app1b].echo_addr(),
            expect: "local",
            marker: secret("same"),
            result: Ok(()),
        },
        Flow {
            name: "ambient -> ClusterIP (remote ambient endpoints)",
            from: app1,
            to: SocketAddr::from((svc.vip, svc.port)),
            expect: "hbone",
            marker: secret("vip"),
            result: Ok(()),
        },
        Flow {
            name: "legacy -> ambient",
            from: leg1,
            to: c.pods[last_app].echo_addr(),
            expect: "plaintext",
            marker: secret("l2a"),
            result: Ok(()),
        },
        Flow {
            name: "ambient -> legacy",
            from: app1,
            to: c.pods[leg2].echo_addr(),
            expect: "plaintext",
            marker: secret("a2l"),
            result: Ok(()),
        },
        Flow {
            name: "legacy -> legacy",
            from: leg1,
            to: c.pods[leg2].echo_addr(),
            expect: "plaintext",
            marker: secret("l2l"),
            result: Ok(()),
        },
    ];
    println!(
        "\ncapturing the underlay (tcpdump on {} in {})...",
        cluster::UNDERLAY_BRIDGE,
        c.underlay.name()
    );
    let cap = c.capture_underlay("demo")?;
    for f in &mut flows {
        f.result = c.connect(f.from, f.to, &f.marker).map(drop);
    }
    let packets = finish_quiet(cap, &c.underlay, Duration::from_millis(800), WAIT)
        .map_err(anyhow::Error::msg)?;
    let ok = report(&c, &flows, &packets);
    if keep {
        let s = c.persist();
        s.save(&a.state_dir)?;
        println!("\nthe lab is still up (--keep): lab status | lab exec app-1 -- ... | lab down");
    } else {
        drop(c);
        let _ = std::fs::remove_dir_all(&a.state_dir);
        println!("\nlab removed (use --keep to leave it running)");
    }
    if !ok {
        bail!("the demo found a problem (see above)");
    }
    Ok(())
}

fn is_tls(p: &Packet) -> bool {
    // TLS records start with a content type (0x14-0x17) and version 0x03 0x0?.
    p.payload.len() >= 3 && (0x14..=0x17).contains(&p.payload[0]) && p.payload[1] == 3
}

fn report(c: &Cluster, flows: &[Flow], packets: &[Packet]) -> bool {
    let mut ok = true;
    println!("\n=== 1. traffic ===");
    for f in flows {
        let from = &c.pods[f.from];
        match &f.result {
            Ok(()) => println!(
                "  ok    {:48} {}/{} -> {}",
                f.name,
                from.namespace(),
                from.name(),
                f.to
            ),
            Err(e) => {
                ok = false;
                println!(
                    "  FAIL  {:48} {}/{} -> {}: {e}",
                    f.name,
                    from.namespace(),
                    from.name(),
                    f.to
                )
            }
        }
    }

    println!("\n=== 2. identities (ztunnel metrics: istio_tcp_connections_opened_total) ===");
    for n in &c.nodes {
        println!("-- {} --", n.name);
        match n.metrics() {
            Ok(m) => print_identities(&m),
            Err(e) => println!("  metrics unreachable: {e}"),
        }
    }

    println!("\n=== 2b. ztunnel access log (one line per connection) ===");
    for n in &c.nodes {
        let log = std::fs::read_to_string(n.ztunnel_log()).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("connection complete")) {
            let l = strip_ansi(l);
            let f = |k: &str| field(&l, k).unwrap_or_default();
            println!(
                "  {:7} {:8} {} ({}) -> {} ({}) mtls={} bytes={}/{}{}",
                n.name,
                f("direction"),
                f("src.addr"),
                or_dash(f("src.identity")),
                f("dst.addr"),
                or_dash(f("dst.identity")),
                f("mtls"),
                f("bytes_received"),
                f("bytes_sent"),
                match f("response_flags").trim_matches('"') {
                    "-" | "" => String::new(),
                    flag => format!(" flags={flag}"),
                }
            );
        }
    }

    println!(
        "\n=== 3. the underlay ({} TCP packets captured) ===",
        packets.len()
    );
    let mut flows_seen: BTreeMap<(IpAddr, IpAddr, u16), (u64, u64, u64)> = BTreeMap::new();
    for p in packets.iter().filter(|p| p.protocol == TCP) {
        let server_port = p.sport.min(p.dport);
        let e = flows_seen.entry((p.src, p.dst, server_port)).or_default();
        e.0 += 1;
        e.1 += p.payload.len() as u64;
        if is_tls(p) {
            e.2 += 1;
        }
    }
    let name_of = |ip: &IpAddr| -> String {
        c.pods
            .iter()
            .find(|p| IpAddr::V4(p.ip) == *ip)
            .map(|p| p.name().to_owned())
            .or_else(|| {
                c.nodes
                    .iter()
                    .find(|n| IpAddr::V4(n.underlay_ip) == *ip)
                    .map(|n| n.name.clone())
            })
            .or_else(|| (IpAddr::V4(c.issuer_ip()) == *ip).then(|| "ambient-issuer".to_owned()))
            .unwrap_or_else(|| ip.to_string())
    };
    println!(
        "  {:>22} -> {:22} {:>6} {:>8} {:>9} {:>8}  kind",
        "src", "dst", "port", "packets", "bytes", "TLS rec"
    );
    for ((src, dst, port), (n, bytes, tls)) in &flows_seen {
        let kind = if *port == HBONE {
            "HBONE (mTLS)"
        } else if *port == ambient_common::constants::ISSUER_GRPC_PORT {
            "certificate request (TLS)"
        } else if *bytes > 0 {
            "PLAINTEXT"
        } else {
            "handshake only"
        };
        println!(
            "  {:>22} -> {:22} {:>6} {:>8} {:>9} {:>8}  {kind}",
            format!("{} ({})", src, name_of(src)),
            format!("{} ({})", dst, name_of(dst)),
            port,
            n,
            bytes,
            tls
        );
    }
    println!("\n  where each flow's payload was visible:");
    for f in flows {
        let seen = payload_contains(packets, f.marker.as_bytes());
        let verdict = match (f.expect, seen) {
            ("hbone", false) => "encrypted: payload never visible on the underlay",
            ("hbone", true) => {
                ok = false;
                "LEAK: payload visible in plaintext"
            }
            ("local", false) => "stayed on the node (through ztunnel)",
            ("local", true) => {
                ok = false;
                "UNEXPECTED: same-node payload on the underlay"
            }
            ("plaintext", true) => "plaintext, as expected for a non-mesh endpoint",
            ("plaintext", false) => "not seen (capture lost it?)",
            _ => "?",
        };
        println!("  {:48} {}", f.name, verdict);
    }
    // Ambient pods' traffic to other ambient pods is only HBONE; what the legacy flows add
    // (a legacy client's plaintext to an ambient pod, an ambient pod's traffic to a legacy
    // pod leaving from the node address) is what the mesh cannot encrypt.
    let ambient_ips: Vec<_> = c
        .pods
        .iter()
        .filter(|p| c.is_ambient(p) && p.namespace() == "ambient-demo")
        .map(|p| p.ip)
        .collect();
    let legacy_ips: Vec<IpAddr> = c
        .pods
        .iter()
        .filter(|p| !c.is_ambient(p))
        .map(|p| IpAddr::V4(p.ip))
        .collect();
    let leaks: Vec<&Packet> = ambient_plaintext(packets, &ambient_ips, HBONE)
        .into_iter()
        .filter(|p| !legacy_ips.contains(&p.src) && !legacy_ips.contains(&p.dst))
        .collect();
    if leaks.is_empty() {
        println!("\n  PASS: between ambient pods only TLS to :{HBONE} crossed the underlay");
    } else {
        ok = false;
        println!(
            "\n  FAIL: {} plaintext packets of ambient pods crossed the underlay",
            leaks.len()
        );
    }

    ok &= report_key_holders(c);

    println!("\n=== 5. node-agent pods ===");
    for (i, n) in c.nodes.iter().enumerate() {
        println!(
            "-- {} ($ node-agent pods --run-dir {}) --",
            n.name,
            n.run_dir().display()
        );
        match c.agent_view(i, "pods", false) {
            Ok(out) => print!("{out}"),
            Err(e) => println!("  {e}"),
        }
    }
    ok
}

/// A log line without its terminal colour codes.
fn strip_ansi(l: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for ch in l.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// The value of ` key=value` in a text log line (values have no spaces, or are quoted).
fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// The command line of a process, as its arguments.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in a command line.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&format!("{name}="))
            .map(str::to_owned)
            .or_else(|| (a == name).then(|| args.get(i + 1).cloned()).flatten())
    })
}

/// Which process holds the CA key: the issuer only. Fails if a ztunnel was given one.
fn report_key_holders(c: &Cluster) -> bool {
    let mut ok = true;
    println!("\n=== 4. certificates: who holds the CA key ===");
    match c.issuer_pid {
        Some(pid) => {
            let args = cmdline(pid);
            let dir = flag(&args, "--ca-dir").unwrap_or_default();
            let key = PathBuf::from(&dir).join("ca-key.pem");
            println!(
                "  ambient-issuer   pid {pid:<7} netns {:<14} HOLDS THE CA KEY ({}{})",
                c.underlay.name(),
                key.display(),
                if key.exists() { "" } else { ": missing!" }
            );
            match c.issuer_http("/ready") {
                Ok((_, body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    println!(
                        "                   signing certificate sha256 {}..., {} root(s) published, {} pods watched",
                        v["signing_certificate_sha256"].as_str().unwrap_or("?").get(..16).unwrap_or("?"),
                        v["trust_roots"],
                        v["pods"]
                    );
                }
                Err(e) => println!("                   /ready unreachable: {e}"),
            }
            println!(
                "                   issued {} certificates to node proxies, refused {} requests",
                c.issuer_metric("issuer_certificates_issued_total", &[]) as u64,
                c.issuer_metric("issuer_requests_refused_total", &[]) as u64
            );
        }
        None => {
            ok = false;
            println!("  FAIL: no issuer is running");
        }
    }
    for n in &c.nodes {
        let Some(pid) = n.ztunnel_pid else { continue };
        let args = cmdline(pid);
        match (flag(&args, "--ca-address"), flag(&args, "--ca-dir")) {
            (_, Some(dir)) => {
                ok = false;
                println!("  FAIL: ztunnel on {} (pid {pid}) holds the CA key ({dir})", n.name);
            }
            (Some(addr), None) => println!(
                "  ztunnel          pid {pid:<7} netns {:<14} no CA key: asks {addr} with {}'s own credential",
                n.ns().name(),
                n.name
            ),
            (None, None) => println!("  ztunnel on {}: no CA configured?", n.name),
        }
        if let Ok(dump) = n.config_dump() {
            for cert in dump["certificates"].as_array().into_iter().flatten() {
                println!(
                    "      holds {} (signed by {}, expires in {}s)",
                    cert["identity"].as_str().unwrap_or("?"),
                    cert["issuer"].as_str().unwrap_or("?"),
                    cert["expires_in_seconds"]
                );
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_fields_are_read_from_a_coloured_line() {
        let line = "\u{1b}[2m2026\u{1b}[0m INFO \u{1b}[2maccess\u{1b}[0m: connection complete \u{1b}[3mconn\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 \u{1b}[3mdirection\u{1b}[0m\u{1b}[2m=\u{1b}[0mOutbound \u{1b}[3mmtls\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue \u{1b}[3mresponse_flags\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"-\" \u{1b}[3merror\u{1b}[0m\u{1b}[2m=\u{1b}[0m";
        let l = strip_ansi(line);
        assert_eq!(field(&l, "direction").as_deref(), Some("Outbound"));
        assert_eq!(field(&l, "mtls").as_deref(), Some("true"));
        assert_eq!(field(&l, "response_flags").as_deref(), Some("\"-\""));
        assert_eq!(field(&l, "error").as_deref(), Some(""));
        assert_eq!(field(&l, "absent"), None);
    }

    #[test]
    fn tls_records_are_recognised() {
        let p = |payload: &[u8]| Packet {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            protocol: TCP,
            sport: 1,
            dport: 15008,
            payload: payload.to_vec(),
        };
        assert!(is_tls(&p(&[0x16, 3, 1, 0, 5])));
        assert!(is_tls(&p(&[0x17, 3, 3, 0, 5])));
        assert!(!is_tls(&p(b"GET / HTTP/1.1")));
        assert!(!is_tls(&p(&[])));
    }

    #[test]
    fn a_foreign_non_empty_directory_is_never_used() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("precious"), "x").unwrap();
        assert!(prepare_state_dir(d.path()).is_err());
        assert!(d.path().join("precious").exists());
        let lab = d.path().join("lab");
        prepare_state_dir(&lab).unwrap();
        std::fs::write(lab.join("leftover"), "x").unwrap();
        prepare_state_dir(&lab).unwrap();
        assert!(!lab.join("leftover").exists() && lab.join(MARKER).exists());
    }
}

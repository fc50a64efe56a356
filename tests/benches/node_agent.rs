//! Node agent benchmarks (issue 2). Prints tables; `docs/performance.md` keeps the latest.
//!
//! `cargo build --release --workspace && cargo bench -p ambient-tests --bench node_agent`
//! (as root). The process re-executes itself inside a fresh network namespace (the "node"),
//! so plugins and the agent run exactly as on a node, with no `ip netns exec` in the timed
//! path.
//!
//! 1. Plugin ADD end to end: exec of `ambient-cni` until it exits, which is after the agent
//!    committed the pod's redirection, with 1, 100 and 500 pods already enrolled; ztunnel
//!    absent, connected with its own CA key, or connected to `ambient-issuer` on the same
//!    machine (`add-issuer`); each measured pod's namespace deleted right after its sample (the
//!    kernel's asynchronous namespace teardown then runs during the next ADD, on one of the
//!    two cores) or after the level.
//! 2. Enrolling one more pod (one nftables transaction through libnftables) at 10, 100 and
//!    1,000 enrolled pods, with the rule count alongside.
//! 3. Agent cold start (load state, read the kernel, reconcile) with 1,000 enrolled pods.
//!
//! Knobs: `BENCH_BACKEND=nftables|iptables-nft|iptables-legacy` (default nftables) is the
//! agent's redirection backend in every part; `BENCH_ONLY=enrol,cold,add,add-ztunnel,add-issuer` runs a subset; `BENCH_ADD_SAMPLES=N`
//! measured ADDs per level (default 300); `BENCH_ADD_LEVELS=1,100,500` the levels; `BENCH_AGENT_LOG=debug` adds the agent's and
//! ztunnel's per-ADD timings (`attachment updated`, `ADD handled`) to their logs, and
//! `BENCH_AGENT_LOG_DIR=<dir>` keeps the logs; `BENCH_ADD_TRACE=<file>` appends every ADD
//! sample with its time. The ADD table's "in the agent" column is read
//! from the agent's `ADD replied` lines (JSON logs, default level `info`).

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_tests::bins;
use ambient_tests::cni::{self, Attach, ChainSpec, CniArgs, CniRunner, ConfList, RuntimeConf};
use ambient_tests::netns::{eventually, NetNs};
use node_agent::backend::Backend;
use node_agent::nft::{pod_elements, Attachment, Dataplane, Element, NftDataplane, RulesetParams};

/// The backend under benchmark (`BENCH_BACKEND`).
fn bench_backend() -> Backend {
    use node_agent::backend::Setting;
    let setting: Setting = std::env::var("BENCH_BACKEND")
        .unwrap_or_else(|_| "nftables".into())
        .parse()
        .expect("BENCH_BACKEND");
    let bridge_l2 = std::env::var("BENCH_BRIDGE_L2")
        .ok()
        .map(|v| v.parse().expect("BENCH_BRIDGE_L2"));
    node_agent::backend::choose(setting, bridge_l2, &RulesetParams::default()).expect("backend")
}

fn open_backend() -> Box<dyn Dataplane> {
    node_agent::backend::open(bench_backend(), RulesetParams::default()).expect("dataplane")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--inner") {
        inner();
        return;
    }
    // `cargo bench` passes `--bench`; anything else (like `cargo test --benches`) only
    // checks that the benchmark builds.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let node = NetNs::new("bench-agent").expect("create the node namespace");
    let exe = std::env::current_exe().unwrap();
    let status = node
        .command(&exe)
        .arg("--inner")
        .status()
        .expect("run the benchmark inside the node namespace");
    assert!(status.success(), "benchmark failed");
}

/// The agent's run directory lives on a tmpfs on a node (`/var/run`); so does the bench's.
fn run_tmpdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn inner() {
    println!(
        "# node agent benchmarks ({} cores, {:?} backend)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        bench_backend()
    );
    // `BENCH_ONLY=enrol,cold,add,add-ztunnel,add-issuer` runs a subset.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    if run("enrol") {
        enrol_one_more();
    }
    if run("cold") {
        cold_start();
    }
    if run("add") {
        plugin_add(None, Teardown::Each);
        plugin_add(None, Teardown::AfterLevel);
    }
    if run("add-ztunnel") {
        plugin_add(Some(Certs::NodeKey), Teardown::Each);
        plugin_add(Some(Certs::NodeKey), Teardown::AfterLevel);
    }
    if run("add-issuer") {
        plugin_add(Some(Certs::Issuer), Teardown::Each);
        plugin_add(Some(Certs::Issuer), Teardown::AfterLevel);
    }
}

fn fake_pod(i: usize) -> BTreeSet<Element> {
    fake_pod_as(i, i % 2 == 0)
}

fn fake_pod_as(i: usize, routed: bool) -> BTreeSet<Element> {
    let ip = IpAddr::V4(Ipv4Addr::new(
        10,
        200 + (i / 60_000) as u8,
        ((i / 250) % 240) as u8,
        (i % 250 + 2) as u8,
    ));
    let att = if routed {
        Attachment::Routed {
            veth: format!("vb{i}"),
        }
    } else {
        Attachment::Bridged {
            veth: format!("vb{i}"),
            bridge: "cni0".into(),
            bridge_mac: node_agent::nft::Mac([2, 0, 0, 0, 0, 1]),
        }
    };
    pod_elements(&att, &[ip])
}

/// With `target` pods installed, the sorted times to add one more pod's elements (`extra(i)`
/// for i from 100,000), each removed again, back to back or `gap` ms apart.
fn enrol_samples(
    dp: &mut dyn Dataplane,
    target: usize,
    gap: Option<u64>,
    extra: impl Fn(usize) -> BTreeSet<Element>,
) -> Vec<Duration> {
    let mut all = BTreeSet::new();
    for i in 0..target {
        all.extend(fake_pod(i));
    }
    dp.install(&all).unwrap();
    let mut samples = Vec::new();
    let n = if gap.is_some() { 100 } else { 200 };
    for k in 0..n {
        let extra = extra(100_000 + k);
        if let Some(gap) = gap {
            std::thread::sleep(Duration::from_millis(gap));
        }
        let t = Instant::now();
        dp.apply(&BTreeSet::new(), &extra).unwrap();
        samples.push(t.elapsed());
        dp.apply(&extra, &BTreeSet::new()).unwrap();
    }
    samples.sort();
    samples
}

fn rule_count(dp: &mut NftDataplane) -> usize {
    dp.observe().unwrap().chains.iter().map(|(_, n)| n).sum()
}

/// Time to add one pod's elements at N enrolled pods, through the agent's path (one
/// nfnetlink batch) and through libnftables, back to back and spaced out (a node enrols a
/// pod now and then, so caches are cold and the freed memory gone: the realistic case).
fn enrol_one_more() {
    if let Backend::Iptables(..) = bench_backend() {
        return enrol_one_more_iptables();
    }
    println!("\n## enrol one more pod (one transaction)\n");
    println!("| path | spacing | enrolled pods | p50 ms | p99 ms | rules | elements |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (path, netlink) in [("netlink batch (agent)", true), ("libnftables", false)] {
        for (spacing, gap) in [("back to back", None), ("20 ms apart", Some(20u64))] {
            let mut dp = NftDataplane::new(node_agent::nft::RulesetParams::default()).unwrap();
            if !netlink {
                dp = dp.without_element_writer();
            }
            for target in [10usize, 100, 1000] {
                let samples = enrol_samples(&mut dp, target, gap, fake_pod);
                let rules = rule_count(&mut dp);
                println!(
                    "| {path} | {spacing} | {target} | {:.3} | {:.3} | {rules} | {} |",
                    percentile(&samples, 0.5).as_secs_f64() * 1e3,
                    percentile(&samples, 0.99).as_secs_f64() * 1e3,
                    dp.observe().unwrap().elements.len()
                );
            }
            dp.uninstall().unwrap();
        }
    }
}

/// The iptables backend: a routed pod is ipset members and its veth's group (netlink); a
/// bridged pod adds its L2 rules (`bridge` table elements over netlink, or one
/// `ebtables-restore`; `BENCH_BRIDGE_L2` chooses).
fn enrol_one_more_iptables() {
    println!("\n## enrol one more pod ({:?})\n", bench_backend());
    // Routed pods' host veths must exist: the backend marks them by interface group.
    let names: Vec<usize> = (0..1000).step_by(2).chain(100_000..100_200).collect();
    let batch: String = names
        .iter()
        .map(|i| format!("link add vb{i} type veth peer name vq{i}\n"))
        .collect();
    run_batch(&batch);
    println!("| pod | spacing | enrolled pods | p50 ms | p99 ms | elements |");
    println!("|---|---|---:|---:|---:|---:|");
    for (kind, routed) in [("routed (ipsets)", true), ("bridged (ipsets + L2)", false)] {
        for (spacing, gap) in [("back to back", None), ("20 ms apart", Some(20u64))] {
            let mut dp = open_backend();
            for target in [1usize, 100, 1000] {
                let samples = enrol_samples(dp.as_mut(), target, gap, |i| fake_pod_as(i, routed));
                println!(
                    "| {kind} | {spacing} | {target} | {:.3} | {:.3} | {} |",
                    percentile(&samples, 0.5).as_secs_f64() * 1e3,
                    percentile(&samples, 0.99).as_secs_f64() * 1e3,
                    dp.observe().unwrap().elements.len()
                );
            }
            dp.uninstall().unwrap();
        }
    }
    let batch: String = names.iter().map(|i| format!("link del vb{i}\n")).collect();
    run_batch(&batch);
}

/// Agent cold start with 1,000 enrolled pods: state file + kernel + source reconciled.
fn cold_start() {
    use ambient_common::agent_api::{AttachmentKey, PodRef};
    use node_agent::state::{LinkRecord, Record};
    println!("\n## agent cold start with 1,000 enrolled pods\n");
    let dir = run_tmpdir();
    // 1,000 host interfaces (veth pairs whose peers stay on the node: the agent checks names and
    // ifindexes), created in one `ip -batch`.
    let mut batch = String::new();
    for i in 0..1000 {
        batch.push_str(&format!("link add vc{i} type veth peer name vd{i}\n"));
    }
    run_batch(&batch);
    let mut snapshot = node_agent::source::Snapshot {
        synced: true,
        generation: 1,
        ..Default::default()
    };
    let mut ns = ambient_common::manifest::Namespace::default();
    ns.metadata.name = "bench".into();
    ns.metadata
        .labels
        .insert("istio.io/dataplane-mode".into(), "ambient".into());
    snapshot.namespaces.insert("bench".into(), ns);
    let mut records = Vec::new();
    let sys = node_agent::host::Sysfs::default();
    for i in 0..1000 {
        let name = format!("p{i}");
        let mut pod = ambient_common::manifest::Pod::default();
        pod.metadata.name = name.clone();
        pod.metadata.namespace = Some("bench".into());
        snapshot.pods.insert(("bench".into(), name.clone()), pod);
        let veth = format!("vc{i}");
        records.push(Record {
            key: AttachmentKey {
                container_id: format!("c{i}"),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "bench".into(),
                name,
                uid: None,
            },
            netns: String::new(),
            netns_id: None,
            link: LinkRecord::Routed { veth: veth.clone() },
            ifindex: sys.ifindex(&veth).unwrap(),
            ips: vec![IpAddr::V4(Ipv4Addr::new(
                10,
                210,
                (i / 250) as u8,
                (i % 250 + 2) as u8,
            ))],
            mac: None,
            since: 0,
            found_by: node_agent::adopt::Method::Cni,
            blocker: None,
        });
    }
    let cfg = Arc::new(
        node_agent::config::Config::build(node_agent::config::ConfigFile {
            node_name: Some("bench".into()),
            manifest_dir: Some(dir.path().into()),
            run_dir: Some(dir.path().into()),
            ..Default::default()
        })
        .unwrap(),
    );
    let store = cfg.state_dir();
    for r in &records {
        store.save(r).unwrap();
    }
    let snapshot = Arc::new(snapshot);
    println!("| kernel state at start | time ms | enrolled |");
    println!("|---|---:|---:|");
    for case in [
        "empty (first start)",
        "complete (agent restart)",
        "complete (restart, repeated)",
    ] {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = node_agent::metrics::Metrics::new(&mut registry);
        let (tx, _rx) = node_agent::ztunnel::WorkloadFeed::new();
        let dp = open_backend();
        let t = Instant::now();
        let core = node_agent::agent::Core::start(
            cfg.clone(),
            dp,
            sys.clone(),
            snapshot.clone(),
            metrics,
            tx,
        )
        .unwrap();
        let elapsed = t.elapsed();
        println!(
            "| {case} | {} | {} |",
            ms(elapsed),
            core.published().count()
        );
        drop(core);
    }
    open_backend().uninstall().unwrap();
    let mut batch = String::new();
    for i in 0..1000 {
        batch.push_str(&format!("link del vc{i}\n"));
    }
    run_batch(&batch);
}

/// The agents log at their default level, `info` (one line per ADD, as on a node), unless
/// `BENCH_AGENT_LOG` says otherwise: `debug` adds the per-ADD timings inside the agent
/// (`attachment updated`, `ADD handled`) and ztunnel's.
fn agent_log_level() -> String {
    std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "info".into())
}

/// Where a process's log goes: `BENCH_AGENT_LOG_DIR` (kept) or the bench's run directory.
fn agent_log_path(run: &std::path::Path, case: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("BENCH_AGENT_LOG_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| run.to_path_buf());
    dir.join(format!("agent-{case}.log"))
}

/// Seconds since the epoch with microseconds, as in the agents' log timestamps.
fn epoch_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:06}", t.as_secs(), t.subsec_micros())
}

fn log_sink(path: &std::path::Path) -> Stdio {
    Stdio::from(std::fs::File::create(path).expect("create the agent log"))
}

/// The agent's own time for each ADD it answered (its JSON `ADD replied` lines) logged
/// after byte `from` of `log`; moves `from` past them.
fn agent_add_times(log: &std::path::Path, from: &mut usize) -> Vec<Duration> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let new = text.get(*from..).unwrap_or_default();
    // Only whole lines: the agent may be writing the last one.
    let end = new.rfind('\n').map_or(0, |i| i + 1);
    *from += end;
    new[..end]
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "ADD replied")
        .filter_map(|v| v["fields"]["elapsed_us"].as_u64())
        .map(Duration::from_micros)
        .collect()
}

/// The busy and total jiffies of all CPUs so far (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Waits (up to 30 s) until the CPUs are at least 90% idle over 200 ms: the kernel tears
/// namespaces down asynchronously, for seconds after hundreds of them are deleted.
/// How many certificates the node's ztunnel holds (its `/config_dump` on the admin port).
fn held_certificates() -> usize {
    use std::io::Read;
    let get = || -> std::io::Result<String> {
        let addr = (Ipv4Addr::LOCALHOST, ambient_common::constants::ADMIN_PORT);
        let mut s = std::net::TcpStream::connect(addr)?;
        s.write_all(b"GET /config_dump HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let Ok(resp) = get() else { return 0 };
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["certificates"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn settle() {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (b0, t0) = cpu_jiffies();
        std::thread::sleep(Duration::from_millis(200));
        let (b1, t1) = cpu_jiffies();
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        if busy <= 0.10 {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "machine still {:.0}% busy after 30 s; measuring anyway",
                busy * 100.0
            );
            return;
        }
    }
}

fn run_batch(batch: &str) {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// The environment a runtime gives a plugin: its own (a plain PATH) plus the CNI_ variables.
/// Not the bench's: `cargo bench` sets LD_LIBRARY_PATH to a dozen build directories, and
/// the dynamic loader would search them all for libgcc_s and libc on every exec.
const RUNTIME_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The plugin's ADD, end to end, at 1 / 100 / 500 enrolled pods. With `ztunnel`, a real
/// ztunnel is connected and every pod has its own service account, so each ADD waits for a
/// new certificate to be issued (the worst case).
/// When a measured pod's network namespace is deleted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Teardown {
    /// Right after its sample: the kernel's cleanup overlaps the next ADD.
    Each,
    /// After the level's samples.
    AfterLevel,
}

/// Where the connected ztunnel's certificates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Certs {
    /// It signs them itself (`--ca-dir`, the development mode).
    NodeKey,
    /// From `ambient-issuer` on the same machine (`--ca-address`), as in a cluster.
    Issuer,
}

fn plugin_add(certs: Option<Certs>, teardown: Teardown) {
    let ztunnel = certs.is_some();
    let when = match teardown {
        Teardown::Each => "namespace deleted after each sample",
        Teardown::AfterLevel => "namespaces deleted after the level",
    };
    if certs == Some(Certs::Issuer) {
        println!("\n## plugin ADD end to end, ztunnel connected, certificates from ambient-issuer on this machine (each pod a new identity, certified when ztunnel saw it scheduled); {when}\n");
    } else if ztunnel {
        println!("\n## plugin ADD end to end, ztunnel connected, certificates signed by ztunnel (each pod a new identity, certified when ztunnel saw it scheduled); {when}\n");
    } else {
        println!("\n## plugin ADD end to end, ztunnel absent (exec of ambient-cni until redirection is active); {when}\n");
    }
    let dir = run_tmpdir();
    let manifests = dir.path().join("manifests");
    let run = dir.path().join("run");
    std::fs::create_dir_all(&manifests).unwrap();
    let cni_bin = dir.path().join("cni-bin");
    cni::assemble_cni_path(&cni_bin, Some(&bins::binary(bins::AMBIENT_CNI))).unwrap();
    let sock = run.join("cni.sock");
    let chain = ChainSpec {
        network: "bench".into(),
        cni_version: "1.0.0".into(),
        attach: Attach::Bridge,
        bridge: "cni0".into(),
        subnet: "10.220.0.0/16".into(),
        subnet6: None,
        ipam_data_dir: dir.path().join("ipam"),
        agent_socket: Some(sock.clone()),
        ambient_extra: Default::default(),
        primary_extra: Default::default(),
    };
    let list = ConfList::from_json(&chain.conflist()).unwrap();
    let runner = CniRunner::new(&cni_bin, None);
    // 300 per level: p99 is then the 4th slowest sample, not (with 100) the 2nd.
    let per_level = std::env::var("BENCH_ADD_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300usize);
    let measured = 3 * per_level;
    let total = 500 + measured;
    // Every pod's manifest up front, so no ADD waits for the source.
    let mut text = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bench\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    );
    for i in 0..total {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: bench\n  uid: uid-{i}\nspec:\n  nodeName: bench\n  serviceAccountName: sa-{i}\n"
        ));
    }
    std::fs::write(manifests.join("pods.yaml"), text).unwrap();
    let case = match (certs, teardown) {
        (None, Teardown::Each) => "alone-each",
        (None, Teardown::AfterLevel) => "alone-level",
        (Some(Certs::NodeKey), Teardown::Each) => "ztunnel-each",
        (Some(Certs::NodeKey), Teardown::AfterLevel) => "ztunnel-level",
        (Some(Certs::Issuer), Teardown::Each) => "issuer-each",
        (Some(Certs::Issuer), Teardown::AfterLevel) => "issuer-level",
    };
    let agent_log = agent_log_path(dir.path(), case);
    let mut agent = Command::new(bins::binary(bins::NODE_AGENT))
        .args(["run", "--backend", bench_backend().name()])
        .args(["--node-name", "bench", "--manifest-dir"])
        .arg(&manifests)
        .arg("--run-dir")
        .arg(&run)
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--json-logs",
            "--log-level",
        ])
        .arg(agent_log_level())
        .stderr(log_sink(&agent_log))
        .spawn()
        .unwrap();
    let mut zt = None;
    let mut zt_started = None;
    let mut issuer = None;
    if ztunnel {
        let ca = dir.path().join("ca");
        let quiet = |cmd: &mut Command| {
            let st = cmd
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "{cmd:?}");
        };
        quiet(
            Command::new(bins::binary(bins::ISSUER))
                .args(["ca", "init", "--dir"])
                .arg(&ca),
        );
        let mut ca_args: Vec<std::ffi::OsString> = vec!["--ca-dir".into(), ca.clone().into()];
        if certs == Some(Certs::Issuer) {
            let token = dir.path().join("token");
            let creds = dir.path().join("credentials.yaml");
            quiet(
                Command::new(bins::binary(bins::ISSUER))
                    .args(["credential", "add", "--node", "bench", "--file"])
                    .arg(&creds)
                    .arg("--token-out")
                    .arg(&token),
            );
            quiet(Command::new("ip").args(["link", "set", "lo", "up"]));
            issuer = Some(
                Command::new(bins::binary(bins::ISSUER))
                    .args(["run", "--source", "manifests", "--manifest-dir"])
                    .arg(&manifests)
                    .arg("--credentials")
                    .arg(&creds)
                    .arg("--ca-dir")
                    .arg(&ca)
                    .args(["--serving-ip", "127.0.0.1", "--listen", "127.0.0.1:15012"])
                    .args(["--metrics-listen", "127.0.0.1:15016"])
                    .env("RUST_LOG", agent_log_level())
                    .stderr(log_sink(&agent_log_path(
                        dir.path(),
                        &format!("{case}-issuer-process"),
                    )))
                    .spawn()
                    .unwrap(),
            );
            eventually(Duration::from_secs(20), || {
                std::net::TcpStream::connect("127.0.0.1:15012").map(drop)
            })
            .unwrap();
            ca_args = vec![
                "--ca-address".into(),
                "https://127.0.0.1:15012".into(),
                "--ca-root".into(),
                ca.join("root-cert.pem").into(),
                "--ca-token".into(),
                token.into(),
            ];
        }
        zt_started = Some(Instant::now());
        zt = Some(
            Command::new(bins::binary(bins::ZTUNNEL))
                .args(["run", "--node-name", "bench", "--manifest-dir"])
                .arg(&manifests)
                .args(&ca_args)
                .arg("--agent-socket")
                .arg(run.join("ztunnel.sock"))
                .args(["--access-log", "false"])
                .env("RUST_LOG", agent_log_level())
                .stderr(log_sink(&agent_log_path(
                    dir.path(),
                    &format!("{case}-ztunnel-process"),
                )))
                .spawn()
                .unwrap(),
        );
    }
    eventually(Duration::from_secs(10), || {
        if sock.exists() {
            Ok(())
        } else {
            Err("no socket")
        }
    })
    .unwrap();
    if ztunnel {
        eventually(Duration::from_secs(20), || {
            let out = Command::new(bins::binary(bins::NODE_AGENT))
                .args(["status", "-o", "json", "--run-dir"])
                .arg(&run)
                .output()
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            if v["ztunnel_connected"] == true {
                Ok(())
            } else {
                Err("ztunnel not connected".to_string())
            }
        })
        .unwrap();
    }
    if ztunnel {
        // Every pod is scheduled before the bench starts, so ztunnel certifies all of them
        // at start, before their ADDs (as on a node, where the watch sees a pod scheduled
        // before the kubelet runs its CNI chain); measure that, then the ADDs after it.
        let t = zt_started.unwrap_or_else(Instant::now);
        eventually(Duration::from_secs(120), || {
            let held = held_certificates();
            if held >= total {
                Ok(())
            } else {
                Err(format!("{held} of {total} certificates held"))
            }
        })
        .unwrap();
        println!(
            "ztunnel certified the {total} scheduled pods (one identity each) within {:.2} s of its start\n",
            t.elapsed().as_secs_f64()
        );
    }
    let mut pods: Vec<(NetNs, RuntimeConf)> = Vec::new();
    let make_rt = |i: usize| -> (NetNs, RuntimeConf) {
        let ns = NetNs::new(&format!("bp{i}")).unwrap();
        let id = format!("bench{i:08}");
        let rt = RuntimeConf {
            container_id: id.clone(),
            netns: ns.path().to_string_lossy().into_owned(),
            ifname: "eth0".into(),
            args: CniArgs {
                pod_namespace: "bench".into(),
                pod_name: format!("p{i}"),
                pod_uid: format!("uid-{i}"),
                infra_container_id: id,
            },
            runtime_config: Default::default(),
        };
        (ns, rt)
    };
    println!(
        "| enrolled before | p50 ms | p99 ms | max ms | over 5 ms | samples | in the agent p50 / p99 ms | exec baseline p50 ms (VERSION) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    // `BENCH_ADD_TRACE=<file>`: every sample, with its wall-clock time, to set beside the
    // agent's log.
    let mut trace = std::env::var_os("BENCH_ADD_TRACE").map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .expect("open BENCH_ADD_TRACE")
    });
    let mut log_from = std::fs::metadata(&agent_log).map_or(0, |m| m.len() as usize);
    let mut next = 0usize;
    // `BENCH_ADD_LEVELS=500` measures a subset of the levels.
    let levels: Vec<usize> = std::env::var("BENCH_ADD_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100, 500]);
    for level in levels {
        while pods.len() < level {
            let (ns, rt) = make_rt(next);
            next += 1;
            runner.add(&list, &rt).unwrap();
            pods.push((ns, rt));
        }
        // Start each level on a settled machine: not during the kernel's teardown of the
        // previous level's (or variant's) namespaces, nor ztunnel's certificate pass.
        settle();
        agent_add_times(&agent_log, &mut log_from);
        let mut samples = Vec::new();
        let mut retired = Vec::new();
        for _ in 0..per_level {
            let (ns, rt) = make_rt(next);
            next += 1;
            // The primary plugins (untimed), then ambient-cni timed on its own.
            let mut prev = None;
            for idx in 0..list.plugins.len() - 1 {
                let stdin = list.plugin_stdin(idx, prev.as_ref(), &rt.runtime_config);
                let out = runner.exec(&list, idx, "ADD", &rt, &stdin).unwrap();
                prev = Some(serde_json::from_str(&out).unwrap());
            }
            let last = list.plugins.len() - 1;
            let stdin = list.plugin_stdin(last, prev.as_ref(), &rt.runtime_config);
            // Exec'd exactly as a runtime does: spawn, stdin, wait for exit and stdout.
            let body = serde_json::to_vec(&stdin).unwrap();
            let t = Instant::now();
            let mut child = Command::new(bins::binary(bins::AMBIENT_CNI))
                .env_clear()
                .env("PATH", RUNTIME_PATH)
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", &rt.container_id)
                .env("CNI_NETNS", &rt.netns)
                .env("CNI_IFNAME", &rt.ifname)
                .env("CNI_ARGS", rt.args.render())
                .env("CNI_PATH", &cni_bin)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&body).unwrap();
            let out = child.wait_with_output().unwrap();
            let took = t.elapsed();
            samples.push(took);
            if let Some(f) = trace.as_mut() {
                let _ = writeln!(
                    f,
                    "{} {level} {} {} {}",
                    match certs {
                        None => "absent",
                        Some(Certs::NodeKey) => "connected",
                        Some(Certs::Issuer) => "issuer",
                    },
                    epoch_now(),
                    rt.args.pod_name,
                    took.as_micros()
                );
            }
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let cached: serde_json::Value = prev.unwrap();
            // Keep the enrolled count at the level being measured.
            runner.del(&list, &rt, Some(&cached)).unwrap();
            if teardown == Teardown::AfterLevel {
                retired.push(ns);
            } else {
                drop(ns);
            }
        }
        retired.clear();
        samples.sort();
        let mut inside = agent_add_times(&agent_log, &mut log_from);
        inside.sort();
        let inside = if inside.len() == samples.len() {
            format!(
                "{} / {}",
                ms(percentile(&inside, 0.5)),
                ms(percentile(&inside, 0.99))
            )
        } else {
            // Another log level or format: no per-ADD lines to read.
            "-".to_string()
        };
        // The cost of exec'ing the plugin at all, at this moment: VERSION does no work.
        let mut base = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let mut c = Command::new(bins::binary(bins::AMBIENT_CNI))
                .env_clear()
                .env("PATH", RUNTIME_PATH)
                .env("CNI_COMMAND", "VERSION")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            c.stdin
                .take()
                .unwrap()
                .write_all(b"{\"cniVersion\":\"1.0.0\"}")
                .unwrap();
            c.wait().unwrap();
            base.push(t.elapsed());
        }
        base.sort();
        let over = samples
            .iter()
            .filter(|d| **d > Duration::from_millis(5))
            .count();
        println!(
            "| {level} | {} | {} | {} | {over} | {} | {inside} | {} |",
            ms(percentile(&samples, 0.5)),
            ms(percentile(&samples, 0.99)),
            ms(*samples.last().unwrap()),
            samples.len(),
            ms(percentile(&base, 0.5)),
        );
    }
    for (_ns, rt) in pods.drain(..).rev() {
        let _ = runner.del(&list, &rt, None);
    }
    let _ = agent.kill();
    let _ = agent.wait();
    for mut child in zt.into_iter().chain(issuer) {
        let _ = child.kill();
        let _ = child.wait();
    }
    open_backend().uninstall().ok();
}

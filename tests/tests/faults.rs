//! Fault matrix (issue 4): components killed and restarted under traffic, a pod sandbox
//! replaced, garbage on every input, and a soak. Every case captures the underlay and asserts
//! that no TCP payload of an ambient pod crossed it outside HBONE (port 15008), and that no
//! log of the cluster mentions a panic. Each test builds its own cluster in a leased
//! `10.<octet>.0.0/16` (`ambient_tests::addrs`). Run as root after `cargo build --workspace`.
//!
//! The soak's length: `AMBIENT_SOAK_SECS` (default 30); `soak_long` (ignored) runs
//! `AMBIENT_SOAK_SECS` or 300 s: `cargo test -p ambient-tests --test faults -- --ignored`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_tests::capture::{payload_contains, Capture, Packet};
use ambient_tests::cluster::{ambient_plaintext, finish_quiet, rss_kb, Cluster, UnderlaySummary};
use ambient_tests::cluster::{test_cluster as cluster_with, test_pod as pod};
use ambient_tests::cni::Attach;
use ambient_tests::eventually;
use ambient_tests::inns::in_ns;
use ambient_tests::topo::PodMeta;
use nix::sys::signal::Signal;

const HBONE: u16 = ambient_common::constants::HBONE_PORT;
const WAIT: Duration = Duration::from_secs(15);

fn cluster(tag: &str) -> Cluster {
    cluster_with(tag, Attach::Bridge)
}

fn marker(tag: &str) -> String {
    format!("FAULT-MARKER-{tag}-{}", std::process::id())
}

/// Stops the capture once quiet and checks: no plaintext of ambient pods, no marker.
fn assert_sealed(c: &Cluster, cap: Capture, ambient: &[Ipv4Addr], marker: &str) -> Vec<Packet> {
    let packets = finish_quiet(cap, &c.underlay, Duration::from_millis(700), WAIT).unwrap();
    let leaks = ambient_plaintext(&packets, ambient, HBONE);
    assert!(
        leaks.is_empty(),
        "{} plaintext packets of ambient pods on the underlay, e.g. {:?}; flows {:?}",
        leaks.len(),
        leaks.first(),
        UnderlaySummary::from_packets(&packets).flows
    );
    assert!(
        !payload_contains(&packets, marker.as_bytes()),
        "marker crossed the underlay in plaintext"
    );
    packets
}

fn assert_no_panics(c: &Cluster) {
    let p = c.panics();
    assert!(p.is_empty(), "panics in logs: {p:?}");
}

/// Background traffic from one pod: a connection every few ms with the marker as payload,
/// counting successes and failures until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        c: &Cluster,
        from: usize,
        to: SocketAddr,
        payload: &str,
        threads: usize,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let ns: PathBuf = c.pods[from].ns().path();
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok, failed, ns) = (stop.clone(), ok.clone(), failed.clone(), ns.clone());
                let payload = payload.to_owned();
                std::thread::spawn(move || {
                    let _ = in_ns(&ns, || {
                        while !stop.load(Ordering::Relaxed) {
                            let r = ambient_tests::probe::connect(
                                to,
                                payload.as_bytes(),
                                Some(payload.as_bytes()),
                                Duration::from_secs(2),
                            );
                            match r {
                                Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                            std::thread::sleep(pause);
                        }
                    });
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Waits until the load has made `n` more successful connections than `since`.
fn progresses(load: &Load, n: u64) {
    let since = load.counts().0;
    eventually(WAIT, || {
        let (ok, failed) = load.counts();
        if ok >= since + n {
            Ok(())
        } else {
            Err(format!("ok {ok} failed {failed}"))
        }
    })
    .unwrap();
}

fn ztunnel_killed_during_traffic(tag: &str, victim: usize, attach: Attach) {
    let mut c = cluster_with(tag, attach);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let ambient = c.ambient_ips();
    let cap = c.capture_underlay("zkill").unwrap();
    let m = marker(tag);
    let to = c.pods[server].echo_addr();
    let load = Load::start(&c, client, to, &m, 2, Duration::from_millis(10));
    progresses(&load, 20);
    // A large transfer in flight when ztunnel dies: it breaks, it never continues around it.
    let big = {
        let mut d = ambient_tests::inns::pattern(7, 64 << 20);
        for chunk in d.chunks_mut(1 << 20) {
            chunk[..m.len()].copy_from_slice(m.as_bytes());
        }
        d
    };
    let ns = c.pods[client].ns().path();
    let inflight = std::thread::spawn(move || {
        in_ns(&ns, || {
            ambient_tests::inns::transfer(to, &big, Duration::from_secs(10))
                .map(|r| r.intact())
                .map_err(|e| e.to_string())
        })
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(150));
    let agent_pid = c.nodes[victim].agent_pid;
    c.kill_ztunnel(victim, Signal::SIGKILL);
    let inflight = inflight.join().unwrap();
    eprintln!("{tag}: the in-flight 64 MiB transfer at the crash: {inflight:?}");
    assert!(
        inflight != Ok(true),
        "a 64 MiB transfer completed intact across a ztunnel crash: {inflight:?}"
    );
    // Fail closed: while ztunnel is down, no connection from the ambient pod succeeds.
    std::thread::sleep(Duration::from_millis(300));
    let before = c.pods[server].accepted().len();
    for _ in 0..5 {
        assert!(
            c.connect(client, to, &m).is_err(),
            "connection succeeded with ztunnel down"
        );
    }
    assert_eq!(
        c.pods[server].accepted().len(),
        before,
        "something reached the server"
    );
    // The agent reports it.
    let connected = |c: &Cluster| -> Option<bool> {
        let st = c.agent_view(victim, "status", true).ok()?;
        serde_json::from_str::<serde_json::Value>(&st).ok()?["ztunnel_connected"].as_bool()
    };
    eventually(WAIT, || match connected(&c) {
        Some(false) => Ok(()),
        other => Err(format!("ztunnel_connected {other:?}")),
    })
    .unwrap();
    // Restarted without touching the agent: new connections work again.
    c.start_ztunnel(victim).unwrap();
    eventually(WAIT, || match connected(&c) {
        Some(true) => Ok(()),
        other => Err(format!("ztunnel_connected {other:?}")),
    })
    .unwrap();
    eventually(WAIT, || c.connect(client, to, &m)).unwrap();
    progresses(&load, 20);
    let (ok, failed) = load.stop();
    eprintln!("{tag}: {ok} connections ok, {failed} failed across the ztunnel restart");
    assert_eq!(
        c.nodes[victim].agent_pid, agent_pid,
        "the agent was not touched"
    );
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

#[test]
fn ztunnel_killed_on_the_client_node() {
    ztunnel_killed_during_traffic("fzc", 0, Attach::Bridge);
}

#[test]
fn ztunnel_killed_on_the_server_node() {
    ztunnel_killed_during_traffic("fzs", 1, Attach::Bridge);
}

#[test]
fn ztunnel_killed_on_the_client_node_routed() {
    ztunnel_killed_during_traffic("fzr", 0, Attach::Ptp);
}

#[test]
fn ztunnel_killed_on_the_client_node_calico() {
    ztunnel_killed_during_traffic("fzk", 0, Attach::Routed);
}

/// Opens a connection from a pod and keeps it (the socket stays in the pod's namespace).
fn open(c: &Cluster, from: usize, to: SocketAddr) -> TcpStream {
    let s = in_ns(&c.pods[from].ns().path(), || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

fn roundtrip(s: &mut TcpStream, msg: &str) -> Result<(), String> {
    s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| e.to_string())?;
    if got == msg.as_bytes() {
        Ok(())
    } else {
        Err(format!(
            "echo mismatch: {:?}",
            String::from_utf8_lossy(&got)
        ))
    }
}

fn agent_pod_names(c: &Cluster, node: usize) -> Vec<String> {
    let out = c.agent_view(node, "pods", true).unwrap();
    let mut v: Vec<String> = ambient_tests::agent::parse_pods(&out)
        .unwrap()
        .into_iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    v.sort();
    v
}

fn captured_set(c: &Cluster, node: usize) -> Vec<String> {
    ambient_tests::backend::current().captured_list(c.nodes[node].ns(), false)
}

/// Node agent killed: established flows keep working; new ambient pods fail ADD (the
/// kubelet retries) while kube-system pods start; restarted, it reconciles and the retried
/// pods enrol, nothing duplicated.
#[test]
fn node_agent_killed_and_restarted() {
    let mut c = cluster("fag");
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("agent").unwrap();
    let m = marker("agent");
    let to = c.pods[server].echo_addr();
    let mut long = open(&c, client, to);
    roundtrip(&mut long, &m).unwrap();

    c.kill_agent(0, Signal::SIGKILL);
    roundtrip(&mut long, &m).expect("an established flow survives the agent");
    c.connect(client, to, &m)
        .expect("new connections of enrolled pods still work");
    let set_before = captured_set(&c, 0);
    assert!(
        set_before.contains(&c.pods[client].ip.to_string()),
        "rules stay: {set_before:?}"
    );

    // A new ambient pod cannot be enrolled: ADD fails closed, with the spec's code 11.
    let pending = PodMeta::new("ambient-demo", "pending");
    let err = c.add_pod_with(0, pending.clone(), &[]).unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("11") || text.to_lowercase().contains("try again"),
        "{text}"
    );
    // A kube-system pod starts anyway.
    let sys = pod(&mut c, 0, "kube-system", "coredns");
    assert!(c.pods[sys].ip.octets()[0] == 10);

    c.start_agent(0).unwrap();
    roundtrip(&mut long, &m).expect("the established flow survives the restart");
    // The kubelet retries the pending pod (same pod, a new sandbox attempt).
    let p = c
        .add_pod_with(0, pending, &[])
        .expect("ADD works again after the restart");
    let p_ip = c.pods[p].ip;
    eventually(WAIT, || match c.agent_state(0, "pending").as_deref() {
        Some("captured") => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .unwrap();
    c.wait_converged(WAIT).unwrap();
    eventually(WAIT, || c.connect(p, to, &m)).unwrap();
    // Nothing duplicated: each pod once in the agent's view, each address once in the set.
    let names = agent_pod_names(&c, 0);
    let mut dedup = names.clone();
    dedup.dedup();
    assert_eq!(names, dedup, "duplicated pods in the agent's view");
    let set = captured_set(&c, 0);
    let mut dedup = set.clone();
    dedup.dedup();
    assert_eq!(set, dedup);
    assert!(
        set.contains(&p_ip.to_string()) && set.contains(&c.pods[client].ip.to_string()),
        "{set:?}"
    );
    assert!(
        !set.contains(&c.pods[sys].ip.to_string()),
        "kube-system is never enrolled"
    );
    let status = c.agent_view(0, "status", true).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["pods_captured"], 2, "{status}");
    drop(long);
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

fn both_killed(tag: &str, agent_first: bool) {
    let mut c = cluster(tag);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let local = pod(&mut c, 0, "ambient-demo", "local");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let ambient = c.ambient_ips();
    let cap = c.capture_underlay("both").unwrap();
    let m = marker(tag);
    let to = c.pods[server].echo_addr();
    let load = Load::start(&c, client, to, &m, 1, Duration::from_millis(10));
    progresses(&load, 10);
    c.kill_agent(0, Signal::SIGKILL);
    c.kill_ztunnel(0, Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        c.connect(client, to, &m).is_err(),
        "fail closed with both down"
    );
    if agent_first {
        c.start_agent(0).unwrap();
        assert!(
            c.connect(client, to, &m).is_err(),
            "still closed without ztunnel"
        );
        c.start_ztunnel(0).unwrap();
    } else {
        c.start_ztunnel(0).unwrap();
        c.start_agent(0).unwrap();
    }
    eventually(WAIT, || c.connect(client, to, &m)).unwrap();
    eventually(WAIT, || c.connect(client, c.pods[local].echo_addr(), &m)).unwrap();
    progresses(&load, 10);
    // A new pod enrols normally.
    let fresh = pod(&mut c, 0, "ambient-demo", "fresh");
    c.wait_converged(WAIT).unwrap();
    eventually(WAIT, || c.connect(fresh, to, &m)).unwrap();
    let (ok, failed) = load.stop();
    eprintln!("{tag}: {ok} ok, {failed} failed across the restarts");
    let ambient: Vec<Ipv4Addr> = ambient.into_iter().chain([c.pods[fresh].ip]).collect();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

#[test]
fn both_killed_agent_restarted_first() {
    both_killed("fba", true);
}

#[test]
fn both_killed_ztunnel_restarted_first() {
    both_killed("fbz", false);
}

/// The pod's sandbox dies without DEL and a new one is created for the same pod (same
/// name and uid, new netns, new veth, new address): the agent drops the old attachment and
/// enrols the new one.
#[test]
fn pod_netns_replaced_under_the_same_pod() {
    let mut c = cluster("fns");
    let app = pod(&mut c, 0, "ambient-demo", "app");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let old_ip = c.pods[app].ip;
    let meta = c.pods[app].meta.clone();
    // The sandbox vanishes: no DEL, its namespace (and veth) deleted.
    let mut old = c.pods.remove(app);
    old.pod.abandon();
    drop(old);
    let newp = c.add_pod_with(0, meta, &[]).expect("the new sandbox's ADD");
    let new_ip = c.pods[newp].ip;
    eventually(WAIT, || {
        let set = captured_set(&c, 0);
        if set.contains(&new_ip.to_string())
            && (new_ip == old_ip || !set.contains(&old_ip.to_string()))
        {
            Ok(())
        } else {
            Err(format!("set {set:?} (old {old_ip}, new {new_ip})"))
        }
    })
    .unwrap();
    let names = agent_pod_names(&c, 0);
    assert_eq!(
        names.iter().filter(|n| *n == "ambient-demo/app").count(),
        1,
        "{names:?}"
    );
    assert_eq!(c.agent_state(0, "app").as_deref(), Some("captured"));
    c.wait_converged(WAIT).unwrap();
    let ambient = c.ambient_ips();
    let cap = c.capture_underlay("netns").unwrap();
    let m = marker("netns");
    let newp = c.pod_index("app").unwrap();
    eventually(WAIT, || c.connect(newp, c.pods[server].echo_addr(), &m)).unwrap();
    assert_sealed(&c, cap, &ambient, &m);
    assert_eq!(
        c.pods[server].accepted().last().map(|r| r.peer.ip()),
        Some(std::net::IpAddr::V4(new_ip)),
        "the server sees the new sandbox's address through the mesh"
    );
    assert_no_panics(&c);
}

// ---------------------------------------------------------------------------------------
// Garbage on every input.

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    ambient_tests::inns::pattern(seed, n)
}

/// Runs the plugin binary with `env` and `stdin` inside node 0's namespace.
fn run_plugin(c: &Cluster, env: &[(&str, &str)], stdin: &[u8]) -> (Option<i32>, String, String) {
    let mut cmd = c.nodes[0]
        .ns()
        .command(c.bin(ambient_tests::bins::AMBIENT_CNI));
    cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plugin invocation: name, environment, stdin.
type PluginCase<'a> = (String, Vec<(&'a str, &'a str)>, Vec<u8>);

/// What must not change when garbage arrives: the agent's pods and the kernel set.
fn snapshot(c: &Cluster) -> (Vec<String>, Vec<String>) {
    (agent_pod_names(c, 0), captured_set(c, 0))
}

#[test]
fn garbage_on_the_plugin_stdin_and_environment() {
    let mut c = cluster("fgp");
    let a = pod(&mut c, 0, "ambient-demo", "a");
    let b = pod(&mut c, 1, "ambient-demo", "b");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("gplugin").unwrap();
    let before = snapshot(&c);
    let netns = c.pods[0].ns().path().display().to_string();
    let sock = c.nodes[0].run_dir().join("cni.sock").display().to_string();
    let good_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "n", "type": "ambient-cni", "agentSocket": sock,
        "prevResult": { "cniVersion": "1.0.0", "interfaces": [], "ips": [] },
    })
    .to_string();
    let base = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "garbage0"),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=ambient-demo;K8S_POD_NAME=ghost",
        ),
    ];
    let mut cases: Vec<PluginCase> = vec![
        ("random stdin".into(), base.to_vec(), random_bytes(1, 4096)),
        ("empty stdin".into(), base.to_vec(), Vec::new()),
        (
            "truncated JSON".into(),
            base.to_vec(),
            good_conf.as_bytes()[..good_conf.len() / 2].to_vec(),
        ),
        ("JSON array".into(), base.to_vec(), b"[1,2,3]".to_vec()),
        ("NUL bytes".into(), base.to_vec(), vec![0u8; 1000]),
        ("9 MiB of spaces".into(), base.to_vec(), vec![b' '; 9 << 20]),
        (
            "no CNI_COMMAND".into(),
            base[1..].to_vec(),
            good_conf.clone().into_bytes(),
        ),
        (
            "unknown CNI_COMMAND".into(),
            [&[("CNI_COMMAND", "EXPLODE")], &base[1..]].concat(),
            good_conf.clone().into_bytes(),
        ),
        (
            "malformed CNI_ARGS".into(),
            [&base[..4], &[("CNI_ARGS", "=;;==;K8S_POD_NAME")]].concat(),
            good_conf.clone().into_bytes(),
        ),
        (
            "bad cniVersion".into(),
            base.to_vec(),
            good_conf.replace("1.0.0", "99.1").into_bytes(),
        ),
        (
            "bad timeoutMs".into(),
            base.to_vec(),
            good_conf
                .replace("\"name\"", "\"timeoutMs\":-5,\"name\"")
                .into_bytes(),
        ),
        (
            "netns path garbage".into(),
            [
                &base[..2],
                &[
                    ("CNI_NETNS", "/proc/self/../../nonexistent\u{1}"),
                    ("CNI_IFNAME", "eth0"),
                    base[4],
                ],
            ]
            .concat(),
            good_conf.clone().into_bytes(),
        ),
    ];
    // Every prefix of a real configuration, coarsely.
    for cut in (0..good_conf.len()).step_by(37) {
        cases.push((
            format!("prefix {cut}"),
            base.to_vec(),
            good_conf.as_bytes()[..cut].to_vec(),
        ));
    }
    for (name, env, stdin) in &cases {
        let (code, stdout, stderr) = run_plugin(&c, env, stdin);
        assert_ne!(code, Some(0), "{name}: garbage accepted; stdout {stdout}");
        assert!(
            code.is_some(),
            "{name}: killed by a signal; stderr {stderr}"
        );
        let err: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!("{name}: stdout is not the spec's error JSON ({e}): {stdout:?}")
        });
        let code = err["code"].as_u64().unwrap_or(0);
        assert!(code > 0 && code != 999, "{name}: code {code} ({err})");
        assert!(
            err["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {err}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    assert_eq!(snapshot(&c), before, "garbage changed the node's state");
    let m = marker("gplugin");
    c.connect(a, c.pods[b].echo_addr(), &m).unwrap();
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

/// Sends `bytes` on a fresh connection to a unix socket and reads whatever comes back.
fn poke_unix(path: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn garbage_on_the_agent_and_ztunnel_sockets() {
    let mut c = cluster("fgs");
    let a = pod(&mut c, 0, "ambient-demo", "a");
    let b = pod(&mut c, 1, "ambient-demo", "b");
    c.wait_converged(WAIT).unwrap();
    let before = snapshot(&c);
    let workloads = |c: &Cluster| c.nodes[0].config_dump().unwrap()["workloads"].to_string();
    let zt_before = workloads(&c);
    let cap = c.capture_underlay("gsock").unwrap();
    let m = marker("gsock");
    let run = c.nodes[0].run_dir();
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("random", random_bytes(7, 2048)),
        ("huge length", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ("truncated frame", vec![0, 0, 0, 100, b'{']),
        ("not JSON", frame(b"\x00\x01garbage")),
        ("wrong JSON", frame(br#"{"op":"nuke","everything":true}"#)),
        (
            "array",
            frame(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"),
        ),
        ("deep nesting", frame(&[b'['; 100_000])),
        ("empty", Vec::new()),
        ("zero length", vec![0, 0, 0, 0]),
    ];
    for sock in ["cni.sock", "admin.sock", "ztunnel.sock"] {
        for (name, bytes) in &payloads {
            let _ = poke_unix(&run.join(sock), bytes);
            let _ = name;
        }
    }
    // Many connections left open and idle must not wedge the agent either.
    let idle: Vec<_> = (0..50)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(run.join("cni.sock")).ok())
        .collect();
    let status = c
        .agent_view(0, "status", true)
        .expect("the agent still answers");
    assert!(status.contains("\"healthy\""), "{status}");
    drop(idle);
    assert!(c.nodes[0].ztunnel_ready(), "ztunnel still ready");
    assert_eq!(snapshot(&c), before, "garbage changed the node's state");
    assert_eq!(
        workloads(&c),
        zt_before,
        "garbage changed ztunnel's workloads"
    );
    // The data path still works, including a new pod's ADD.
    c.connect(a, c.pods[b].echo_addr(), &m).unwrap();
    let n = pod(&mut c, 0, "ambient-demo", "newcomer");
    assert_eq!(c.agent_state(0, "newcomer").as_deref(), Some("captured"));
    c.wait_converged(WAIT).unwrap();
    c.connect(n, c.pods[b].echo_addr(), &m).unwrap();
    assert!(c.nodes[0]
        .agent_pid
        .is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists()));
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

/// A minimal TLS 1.3 ClientHello record with ALPN h2 (no client certificate follows).
fn client_hello(truncate: Option<usize>) -> Vec<u8> {
    let mut ext = Vec::new();
    // supported_versions: TLS 1.3
    ext.extend_from_slice(&[0x00, 0x2b, 0x00, 0x03, 0x02, 0x03, 0x04]);
    // ALPN h2
    ext.extend_from_slice(&[0x00, 0x10, 0x00, 0x05, 0x00, 0x03, 0x02, b'h', b'2']);
    // supported_groups x25519
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x04, 0x00, 0x02, 0x00, 0x1d]);
    // signature_algorithms ecdsa_secp256r1_sha256
    ext.extend_from_slice(&[0x00, 0x0d, 0x00, 0x04, 0x00, 0x02, 0x04, 0x03]);
    // key_share x25519 with a (bogus) 32-byte key
    ext.extend_from_slice(&[0x00, 0x33, 0x00, 0x26, 0x00, 0x24, 0x00, 0x1d, 0x00, 0x20]);
    ext.extend_from_slice(&[0x42; 32]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // TLS_AES_128_GCM_SHA256
    body.extend_from_slice(&[0x01, 0x00]); // compression null
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    if let Some(n) = truncate {
        rec.truncate(n);
    }
    rec
}

/// Garbage to ztunnel's HBONE port, through the capture (a legacy pod dialling an ambient
/// pod's :15008) and directly on the node: every case is refused, ztunnel stays up, the
/// mesh keeps working.
#[test]
fn garbage_on_ztunnel_hbone_port() {
    let mut c = cluster("fgz");
    let a = pod(&mut c, 0, "ambient-demo", "a");
    let target = pod(&mut c, 1, "ambient-demo", "target");
    let legacy = pod(&mut c, 0, "legacy", "mallory");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("g15008").unwrap();
    let m = marker("g15008");
    let hbone = SocketAddr::from((c.pods[target].ip, HBONE));
    let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // A SETTINGS frame, then a HEADERS frame claiming 16 MiB.
    preface.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    preface.extend_from_slice(&[0xff, 0xff, 0xff, 1, 4, 0, 0, 0, 1]);
    preface.extend_from_slice(&[0x41; 4096]);
    let mut big_get = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big_get.extend_from_slice(&[b'a'; 256 * 1024]);
    big_get.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random_bytes(3, 64 * 1024)),
        ("truncated TLS record", client_hello(Some(40))),
        ("ClientHello, then silence", client_hello(None)),
        ("HTTP/2 preface without TLS", preface),
        ("oversized HTTP/1 header without TLS", big_get),
        (
            "TLS alert record",
            vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        ),
    ];
    let before = c.pods[target].accepted().len();
    for (name, bytes) in &cases {
        let r = in_ns(
            &c.pods[legacy].ns().path(),
            || -> std::io::Result<Vec<u8>> {
                let mut s = TcpStream::connect_timeout(&hbone, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let _ = s.write_all(bytes);
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                Ok(out)
            },
        )
        .unwrap();
        eprintln!(
            "{name}: {:?}",
            r.as_ref().map(Vec::len).map_err(|e| e.to_string())
        );
        assert!(c.nodes[1].ztunnel_ready(), "ztunnel not ready after {name}");
    }
    assert_eq!(
        c.pods[target].accepted().len(),
        before,
        "garbage reached the pod"
    );
    c.connect(a, c.pods[target].echo_addr(), &m).unwrap();
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

// ---------------------------------------------------------------------------------------
// Soak.

fn soak(tag: &str, secs: u64) {
    let mut c = cluster(tag);
    let client = pod(&mut c, 0, "ambient-demo", "client");
    let local = pod(&mut c, 0, "ambient-demo", "local");
    let remote = pod(&mut c, 1, "ambient-demo", "remote");
    c.wait_converged(WAIT).unwrap();
    let ambient = c.ambient_ips();
    let rss = |c: &Cluster| -> Vec<(String, u64)> {
        let mut v = Vec::new();
        for n in &c.nodes {
            for (what, pid) in [("ztunnel", n.ztunnel_pid), ("node-agent", n.agent_pid)] {
                if let Some(kb) = pid.and_then(rss_kb) {
                    v.push((format!("{} {what}", n.name), kb));
                }
            }
        }
        v
    };
    let start_rss = rss(&c);
    let cap = c.capture_underlay("soak").unwrap();
    let m = marker(tag);
    let started = Instant::now();
    let remote_load = Load::start(
        &c,
        client,
        c.pods[remote].echo_addr(),
        &m,
        3,
        Duration::ZERO,
    );
    let local_load = Load::start(&c, client, c.pods[local].echo_addr(), &m, 1, Duration::ZERO);
    std::thread::sleep(Duration::from_secs(secs));
    let (r_ok, r_failed) = remote_load.stop();
    let (l_ok, l_failed) = local_load.stop();
    let elapsed = started.elapsed().as_secs_f64();
    let end_rss = rss(&c);
    eprintln!(
        "soak {tag}: {secs} s, cross-node {r_ok} ok / {r_failed} failed, same-node {l_ok} ok / {l_failed} failed, {:.0} conn/s",
        (r_ok + l_ok) as f64 / elapsed
    );
    for ((what, a), (_, b)) in start_rss.iter().zip(&end_rss) {
        eprintln!("soak {tag}: RSS {what}: {a} kB at start, {b} kB at end");
    }
    assert!(r_ok > 0 && l_ok > 0);
    assert_eq!(r_failed + l_failed, 0, "connections failed during the soak");
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

fn soak_secs(default: u64) -> u64 {
    std::env::var("AMBIENT_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn soak_short() {
    soak("fso", soak_secs(30));
}

#[test]
#[ignore = "long soak: cargo test -p ambient-tests --test faults -- --ignored soak_long"]
fn soak_long() {
    soak("fsl", soak_secs(300));
}

/// An HTTP/2 frame.
fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix, `flags` in the first byte's high bits.
fn hpack_int(n: u8, flags: u8, mut v: usize) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![flags | v as u8];
    }
    let mut out = vec![flags | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// A literal header (name by static-table index, or a new name when `index` is 0), not indexed.
fn hpack_literal(index: u8, name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(4, 0, usize::from(index));
    if index == 0 {
        out.extend(hpack_int(7, 0, name.len()));
        out.extend_from_slice(name.as_bytes());
    }
    out.extend(hpack_int(7, 0, value.len()));
    out.extend_from_slice(value);
    out
}

/// A client certificate of the cluster's CA for `spiffe://cluster.local/ns/legacy/sa/mallory`,
/// made with the openssl CLI (a workload identity an attacker could hold).
fn mallory_cert(c: &Cluster) -> (PathBuf, PathBuf) {
    let dir = c.root().join("mallory");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, csr, cert, ext) = (
        dir.join("k.pem"),
        dir.join("c.csr"),
        dir.join("c.pem"),
        dir.join("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=URI:spiffe://cluster.local/ns/legacy/sa/mallory\nextendedKeyUsage=clientAuth,serverAuth\nkeyUsage=critical,digitalSignature\n",
    )
    .unwrap();
    let ca = c.ca_dir();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    run(&[
        &os("ecparam"),
        &os("-name"),
        &os("prime256v1"),
        &os("-genkey"),
        &os("-noout"),
        &os("-out"),
        key.as_os_str(),
    ]);
    run(&[
        &os("req"),
        &os("-new"),
        &os("-key"),
        key.as_os_str(),
        &os("-subj"),
        &os("/O=mallory"),
        &os("-out"),
        csr.as_os_str(),
    ]);
    run(&[
        &os("x509"),
        &os("-req"),
        &os("-in"),
        csr.as_os_str(),
        &os("-CA"),
        ca.join("ca-cert.pem").as_os_str(),
        &os("-CAkey"),
        ca.join("ca-key.pem").as_os_str(),
        &os("-CAcreateserial"),
        &os("-days"),
        &os("1"),
        &os("-out"),
        cert.as_os_str(),
        &os("-extfile"),
        ext.as_os_str(),
    ]);
    (cert, key)
}

/// Inside an authenticated mTLS session to ztunnel's :15008 (a valid workload certificate):
/// HTTP/2 without CONNECT, a CONNECT with a garbage authority, a header block of 1 MiB in
/// CONTINUATION frames, random bytes instead of HTTP/2. Each is refused; ztunnel stays ready,
/// nothing reaches the pod, the mesh keeps working.
#[test]
fn garbage_inside_an_authenticated_hbone_session() {
    let mut c = cluster("fgt");
    let a = pod(&mut c, 0, "ambient-demo", "a");
    let target = pod(&mut c, 1, "ambient-demo", "target");
    let legacy = pod(&mut c, 0, "legacy", "mallory");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("gsession").unwrap();
    let m = marker("gsession");
    let (cert, key) = mallory_cert(&c);
    let hbone = format!("{}:{HBONE}", c.pods[target].ip);
    let good_authority = format!("{}:8080", c.pods[target].ip);
    let preface = |frames: Vec<Vec<u8>>| {
        let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        v.extend(h2_frame(4, 0, 0, &[]));
        for f in frames {
            v.extend(f);
        }
        v
    };
    let get = [
        vec![0x82, 0x86, 0x84],
        hpack_literal(1, "", good_authority.as_bytes()),
    ]
    .concat();
    let connect = |authority: &[u8]| {
        [
            hpack_literal(2, "", b"CONNECT"),
            hpack_literal(1, "", authority),
        ]
        .concat()
    };
    let mut big = connect(good_authority.as_bytes());
    big.extend(hpack_literal(0, "x-big", &vec![b'a'; 1 << 20]));
    let mut big_frames = vec![h2_frame(1, 0, 1, &big[..16384])];
    let chunks: Vec<&[u8]> = big[16384..].chunks(16384).collect();
    for (i, ch) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() { 0x4 } else { 0 };
        big_frames.push(h2_frame(9, flags, 1, ch));
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "GET instead of CONNECT",
            preface(vec![h2_frame(1, 0x5, 1, &get)]),
        ),
        (
            "CONNECT with a garbage authority",
            preface(vec![h2_frame(
                1,
                0x4,
                1,
                &connect(b"\xff\xfenot an authority"),
            )]),
        ),
        ("1 MiB header block", preface(big_frames)),
        (
            "HEADERS frame larger than the frame limit",
            preface(vec![h2_frame(1, 0x4, 1, &vec![0x40; 70_000])]),
        ),
        ("random bytes after the handshake", random_bytes(11, 8192)),
    ];
    let before = c.pods[target].accepted().len();
    for (name, bytes) in &cases {
        let mut cmd = c.pods[legacy].ns().command("timeout");
        cmd.args([
            "5", "openssl", "s_client", "-quiet", "-tls1_3", "-alpn", "h2", "-connect", &hbone,
            "-cert",
        ])
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = bytes.clone();
        let w = std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
            // Keep stdin open a moment so the answer can arrive before s_client exits.
            std::thread::sleep(Duration::from_millis(500));
        });
        let out = child.wait_with_output().unwrap();
        let _ = w.join();
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!(
            "{name}: {} bytes back; s_client: {}",
            out.stdout.len(),
            err.lines()
                .filter(|l| l.contains("verify") || l.contains("error") || l.contains("alert"))
                .take(2)
                .collect::<Vec<_>>()
                .join(" | ")
        );
        // Something came back through the session: the handshake with the workload
        // certificate succeeded and ztunnel answered at the HTTP/2 layer.
        assert!(
            !out.stdout.is_empty(),
            "{name}: no answer inside TLS; s_client: {err}"
        );
        assert!(c.nodes[1].ztunnel_ready(), "ztunnel not ready after {name}");
    }
    assert_eq!(
        c.pods[target].accepted().len(),
        before,
        "garbage reached the pod"
    );
    c.connect(a, c.pods[target].echo_addr(), &m).unwrap();
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

/// ztunnel down when a pod is created (failure policy: the pod starts captured, its connections
/// wait for ztunnel): ADD succeeds without a stall, the pod is
/// enrolled, its connections are refused (never bypassed) until ztunnel is back, then work.
#[test]
fn ztunnel_down_at_add() {
    let mut c = cluster("fzd");
    let server = pod(&mut c, 1, "ambient-demo", "server");
    c.wait_converged(WAIT).unwrap();
    let cap = c.capture_underlay("zdown").unwrap();
    let m = marker("zdown");
    c.kill_ztunnel(0, Signal::SIGKILL);
    let started = Instant::now();
    let p = pod(&mut c, 0, "ambient-demo", "born-blind");
    let add_time = started.elapsed();
    eprintln!("ADD with ztunnel down took {add_time:?}");
    assert_eq!(c.agent_state(0, "born-blind").as_deref(), Some("captured"));
    let to = c.pods[server].echo_addr();
    for _ in 0..3 {
        assert!(c.connect(p, to, &m).is_err(), "connected with ztunnel down");
    }
    assert!(
        c.pods[server].accepted().is_empty(),
        "something reached the server"
    );
    c.start_ztunnel(0).unwrap();
    c.wait_converged(WAIT).unwrap();
    eventually(WAIT, || c.connect(p, to, &m)).unwrap();
    let ambient = c.ambient_ips();
    assert_sealed(&c, cap, &ambient, &m);
    assert_no_panics(&c);
}

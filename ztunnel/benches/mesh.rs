//! Network benchmarks through the mesh, with the direct path measured in the same run:
//! throughput (1 and 4 streams, iperf3) with ztunnel CPU per Gbit/s, 64-byte request/response
//! latency, connection rate, ztunnel RSS idle and with many (default 10,000) open connections,
//! and the first connection of a freshly enrolled pod. Needs root (network namespaces),
//! iperf3, wrk, nginx and prlimit (util-linux).
//! `cargo bench -p ztunnel --bench mesh` (prints a Markdown table; see BENCHMARKS.md).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ambient_common::frame::{read_frame, write_frame};
use ambient_common::ztunnel_api::{LocalWorkload, ZtunnelOp, ZtunnelReply, ZtunnelRequest};
use common::support::*;
use common::{
    conn_rate, cpu_secs, echo_server_args, env_or, iperf, median, nginx_args, rr, rss_kib,
    wait_listening, wrk_rps,
};

/// Pods enrolled through the agent during the run (not in node 0's manifests).
const FRESH: [&str; 5] = ["f1", "f2", "f3", "f4", "f5"];

/// Where a process's resident memory is, in KiB: pages of its own executable (code, read-only
/// data, relocated data), pages of shared libraries, and anonymous memory (heap, stacks).
#[derive(Clone, Copy, Default)]
struct RssParts {
    binary: u64,
    libs: u64,
    anon: u64,
}

fn rss_parts(pid: u32) -> RssParts {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut parts = RssParts::default();
    let mut path = String::new();
    let mut rss = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("Rss:") => rss = f.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Anonymous:") => {
                // Every mapping's Rss line precedes its Anonymous line.
                let anon: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                parts.anon += anon;
                let file = rss - anon;
                if !path.is_empty() && std::path::Path::new(&path) == exe {
                    parts.binary += file;
                } else if path.starts_with('/') {
                    parts.libs += file;
                }
            }
            // A mapping's header: address range, perms, offset, device, inode, [path].
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                path = f.nth(4).unwrap_or("").to_owned();
            }
            _ => {}
        }
    }
    parts
}

/// Size of the code the linker placed by `ztunnel/link-order.txt` (the `.text.ordered`
/// section, see ztunnel/build.rs), in KiB; 0 when the binary has none (a debug build, another
/// linker, or a list that no longer matches the source).
fn ordered_code_kib(exe: &str) -> u64 {
    let out = sh(&["readelf", "-SW", exe]);
    out.lines()
        .find(|l| l.contains(" .text.ordered "))
        .and_then(|l| {
            // "[17] .text.ordered PROGBITS <addr> <offset> <size> ..."
            let f: Vec<&str> = l.split(']').nth(1)?.split_whitespace().collect();
            u64::from_str_radix(f.get(4)?, 16).ok()
        })
        .map_or(0, |b| b / 1024)
}

/// nginx in `pod`'s namespace answering every GET on `port`.
fn nginx(lab: &Lab, dir: &std::path::Path, pod: &Pod, port: u16) -> SocketAddr {
    let addr = SocketAddr::new(pod.ip, port);
    let args = nginx_args(dir, &pod.name, &[addr]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn_in(&pod.ns, &args);
    wait_listening(&pod.ns, port);
    addr
}

/// The single-threaded echo server (a child process) in `pod`'s namespace on `port`.
fn many_echo_server(lab: &Lab, pod: &Pod, port: u16) -> SocketAddr {
    let addr = SocketAddr::new(pod.ip, port);
    let args = echo_server_args(&[addr]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn_in(&pod.ns, &args);
    wait_listening(&pod.ns, port);
    addr
}

/// Connect + one 64-byte echo from `pod`; the time to the echo (ms).
fn first_echo_ms(pod: &Pod, to: SocketAddr) -> f64 {
    in_ns(&pod.ns, move || {
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[3u8; 64]).unwrap();
        let mut b = [0u8; 64];
        s.read_exact(&mut b).unwrap();
        t.elapsed().as_secs_f64() * 1e3
    })
}

fn main() {
    if common::echo_server_main() {
        return;
    }
    if !is_root() {
        eprintln!("mesh benchmark needs root (network namespaces); skipped");
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: only compile-check.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let missing = common::missing_tools(&["iperf3", "wrk", "nginx", "prlimit"]);
    if !missing.is_empty() {
        eprintln!(
            "mesh benchmark needs {}: apt-get install iperf3 wrk nginx-light util-linux",
            missing.join(", ")
        );
        std::process::exit(1);
    }
    let secs: u32 = env_or("BENCH_SECS", 5);
    let many: usize = env_or("BENCH_CONNS", 10_000);
    // BENCH_SKIP_TRAFFIC=1: only the memory and enrolment rows (quicker iterations).
    let traffic = env_or("BENCH_SKIP_TRAFFIC", 0u8) == 0;
    // This process holds the client side of the held connections (the echo server is a child
    // process): BENCH_CONNS can go up to the hard RLIMIT_NOFILE (minus a few).
    let _ = ztunnel::sys::raise_nofile_limit();
    let mut pods = vec![
        (0, "a1", "shop", true),
        (0, "a3", "plain", false),
        (1, "b1", "db", true),
        (1, "b2", "plain", false),
    ];
    pods.extend(FRESH.iter().map(|f| (0, *f, "shop", true)));
    let lab = Lab::new("bm", &pods);
    // Node 0 learns of the fresh pods only from the agent push, as a new pod's would.
    lab.write_manifests_with(0, "", |p| !FRESH.contains(&p.name.as_str()));
    // BENCH_ZT_ARGS: extra ztunnel flags for experiments (e.g. "--workers 1").
    let extra = std::env::var("BENCH_ZT_ARGS").unwrap_or_default();
    let mut args = vec!["--access-log", "false", "--log-format", "json"];
    args.extend(extra.split_whitespace());
    let z0 = lab.start_ztunnel(0, &args);
    let z1 = lab.start_ztunnel(1, &args);
    std::thread::sleep(Duration::from_millis(500));
    let idle = (rss_kib(z0), rss_kib(z1));
    let idle_parts = rss_parts(z0);
    let (a1, a3, b1, b2) = (
        lab.pod("a1").clone(),
        lab.pod("a3").clone(),
        lab.pod("b1").clone(),
        lab.pod("b2").clone(),
    );
    for p in [&b1, &b2] {
        lab.spawn_in(
            &p.ns,
            &["iperf3", "-s", "-B", &p.ip.to_string(), "-p", "5201"],
        );
        wait_listening(&p.ns, 5201);
    }
    let mesh_srv = SocketAddr::new(b1.ip, 5201);
    let direct_srv = SocketAddr::new(b2.ip, 5201);
    let echo_mesh = echo_server(&b1, 7000);
    let echo_direct = echo_server(&b2, 7000);
    let web = tempfile::tempdir().unwrap();
    let web_mesh = nginx(&lab, web.path(), &b1, 8080);
    let web_direct = nginx(&lab, web.path(), &b2, 8080);

    let (mut t1, mut t4, mut cpu1, mut cpu4) = ((0.0, 0.0), (0.0, 0.0), 0.0, 0.0);
    let (mut lat_direct, mut lat_mesh, mut rate) = ((0.0, 0.0), (0.0, 0.0), (0.0, 0.0));
    let mut rps = (0.0, 0.0);
    if traffic {
        let zcpu = || cpu_secs(z0) + cpu_secs(z1);
        // ztunnel CPU-seconds per Gbit carried = cores busy per Gbit/s.
        t1.0 = iperf(&a3.ns, direct_srv, 1, secs, false);
        let c = zcpu();
        t1.1 = iperf(&a1.ns, mesh_srv, 1, secs, false);
        cpu1 = (zcpu() - c) / (t1.1 * secs as f64);
        t4.0 = iperf(&a3.ns, direct_srv, 4, secs, false);
        let c = zcpu();
        t4.1 = iperf(&a1.ns, mesh_srv, 4, secs, false);
        cpu4 = (zcpu() - c) / (t4.1 * secs as f64);
        let (d, m) = (
            rr(&a3.ns, echo_direct.addr, 20_000),
            rr(&a1.ns, echo_mesh.addr, 20_000),
        );
        lat_direct = (d.p50, d.p99);
        lat_mesh = (m.p50, m.p99);
        rps = (
            wrk_rps(&a3.ns, &format!("http://{web_direct}/"), 1, 1, secs),
            wrk_rps(&a1.ns, &format!("http://{web_mesh}/"), 1, 1, secs),
        );
        rate = (
            conn_rate(&a3.ns, echo_direct.addr, 4, secs as u64),
            conn_rate(&a1.ns, echo_mesh.addr, 4, secs as u64),
        );
    }

    // Many concurrent connections held open, each established end to end with one echo.
    let to = many_echo_server(&lab, &b1, 7001);
    let ns = a1.ns.clone();
    let before = (rss_kib(z0), rss_kib(z1));
    let t = Instant::now();
    let held: Vec<TcpStream> = in_ns(&ns, move || {
        (0..many)
            .map(|i| {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(&[1u8; 64]).unwrap();
                let mut b = [0u8; 64];
                s.read_exact(&mut b)
                    .unwrap_or_else(|e| panic!("echo on connection {i}: {e}"));
                s
            })
            .collect()
    });
    eprintln!("{many} connections opened in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(1000));
    let busy = (rss_kib(z0), rss_kib(z1));
    // BENCH_HOLD_SECS: keep the connections open longer (to inspect /proc/<pid>/smaps).
    std::thread::sleep(Duration::from_secs(env_or("BENCH_HOLD_SECS", 0)));
    drop(held);
    std::thread::sleep(Duration::from_millis(2000));
    let after = (rss_kib(z0), rss_kib(z1));

    // First connection of freshly enrolled pods: the agent's Add is acked (certificate held),
    // then the pod's first connection (connect + 64-byte echo; a new HBONE connection for its
    // identity). The direct column is a new connection between two non-ambient pods. Both to
    // the single-threaded echo servers (no thread spawned per connection).
    let to_direct = many_echo_server(&lab, &b2, 7001);
    let sock = std::os::unix::net::UnixStream::connect(&lab.nodes[0].agent_socket).unwrap();
    let (mut acks, mut firsts, mut seconds, mut directs) = (vec![], vec![], vec![], vec![]);
    for f in FRESH {
        let pod = lab.pod(f).clone();
        let w = LocalWorkload {
            uid: format!("uid-{f}"),
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            service_account: pod.sa.clone(),
            node: lab.nodes[0].name.clone(),
            ips: vec![pod.ip],
        };
        let t = Instant::now();
        let mut s = &sock;
        write_frame(&mut s, &ZtunnelRequest::new(ZtunnelOp::Add(w))).unwrap();
        let reply: ZtunnelReply = read_frame(&mut s).unwrap();
        assert_eq!(reply, ZtunnelReply::Ack, "agent Add for {f}");
        acks.push(t.elapsed().as_secs_f64() * 1e3);
        firsts.push(first_echo_ms(&pod, to));
        seconds.push(first_echo_ms(&pod, to));
        directs.push(first_echo_ms(&a3, to_direct));
    }

    println!("| metric | direct | mesh (HBONE) | overhead |");
    println!("|---|---|---|---|");
    println!(
        "| throughput, 1 stream (Gbit/s) | {:.2} | {:.2} | {:.0}% of direct |",
        t1.0,
        t1.1,
        100.0 * t1.1 / t1.0
    );
    println!(
        "| throughput, 4 streams (Gbit/s) | {:.2} | {:.2} | {:.0}% of direct |",
        t4.0,
        t4.1,
        100.0 * t4.1 / t4.0
    );
    println!(
        "| ztunnel CPU per Gbit/s, both nodes, 1 / 4 streams (cores) | - | {:.2} / {:.2} | {:.2} / {:.2} CPU-s per GB |",
        cpu1,
        cpu4,
        cpu1 * 8.0,
        cpu4 * 8.0
    );
    println!(
        "| 64 B request/response p50 (µs) | {:.1} | {:.1} | +{:.1} µs |",
        lat_direct.0,
        lat_mesh.0,
        lat_mesh.0 - lat_direct.0
    );
    println!(
        "| 64 B request/response p99 (µs) | {:.1} | {:.1} | +{:.1} µs |",
        lat_direct.1,
        lat_mesh.1,
        lat_mesh.1 - lat_direct.1
    );
    println!(
        "| HTTP keep-alive requests/s, one connection (wrk -t1 -c1, nginx) | {:.0} | {:.0} | {:.0}% of direct |",
        rps.0,
        rps.1,
        100.0 * rps.1 / rps.0
    );
    println!(
        "| new connections/s (4 clients, connect + 64 B echo) | {:.0} | {:.0} | {:.0}% of direct |",
        rate.0,
        rate.1,
        100.0 * rate.1 / rate.0
    );
    println!(
        "| ztunnel RSS idle, source / destination node (MiB) | - | {:.1} / {:.1} | |",
        idle.0 as f64 / 1024.0,
        idle.1 as f64 / 1024.0
    );
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "| ztunnel RSS idle, source node: own binary / shared libraries / anonymous (MiB) | - | {:.2} / {:.2} / {:.2} | startup and idle code placed together: {} KiB |",
        mib(idle_parts.binary),
        mib(idle_parts.libs),
        mib(idle_parts.anon),
        ordered_code_kib(env!("CARGO_BIN_EXE_ztunnel"))
    );
    println!(
        "| ztunnel RSS with {many} open connections, source / destination (MiB) | - | {:.1} / {:.1} | {:.1} / {:.1} KiB per connection |",
        busy.0 as f64 / 1024.0,
        busy.1 as f64 / 1024.0,
        (busy.0.saturating_sub(idle.0)) as f64 / many as f64,
        (busy.1.saturating_sub(idle.1)) as f64 / many as f64,
    );
    println!(
        "| ztunnel RSS before / after the {many} connections, source; destination (MiB) | - | {:.1} / {:.1}; {:.1} / {:.1} | |",
        before.0 as f64 / 1024.0,
        after.0 as f64 / 1024.0,
        before.1 as f64 / 1024.0,
        after.1 as f64 / 1024.0,
    );
    let n = FRESH.len();
    println!(
        "| agent Add -> Ack, fresh pod (certificate issued; ms, median / max of {n}) | - | {:.2} / {:.2} | off the connection path |",
        median(&mut acks.clone()),
        acks.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "| first connection of a freshly enrolled pod, connect + 64 B echo (ms, median / max of {n}) | {:.2} / {:.2} | {:.2} / {:.2} | {:+.2} ms (second connection: {:.2}) |",
        median(&mut directs.clone()),
        directs.iter().cloned().fold(0.0, f64::max),
        median(&mut firsts.clone()),
        firsts.iter().cloned().fold(0.0, f64::max),
        median(&mut firsts.clone()) - median(&mut directs.clone()),
        median(&mut seconds.clone()),
    );
}

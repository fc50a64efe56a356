//! Network benchmarks through the mesh, with the direct path measured in the same run:
//! throughput (1 and 4 streams, iperf3), 64-byte request/response latency, connection rate,
//! ztunnel RSS idle and with many connections. Needs root (network namespaces) and iperf3.
//! `cargo bench -p ztunnel --bench mesh` (prints a Markdown table; see BENCHMARKS.md).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn iperf(client: &Pod, server: SocketAddr, streams: u32, secs: u32) -> f64 {
    let out = ns_sh(
        &client.ns,
        &[
            "iperf3",
            "-c",
            &server.ip().to_string(),
            "-p",
            &server.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

fn rr(pod: &Pod, to: SocketAddr, n: usize) -> (f64, f64) {
    let mut samples = in_ns(&pod.ns, move || {
        let mut s = TcpStream::connect(to).unwrap();
        s.set_nodelay(true).unwrap();
        let msg = [7u8; 64];
        let mut buf = [0u8; 64];
        for _ in 0..200 {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut buf).unwrap();
            out.push(t.elapsed().as_secs_f64() * 1e6);
        }
        out
    });
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (p(0.50), p(0.99))
}

fn conn_rate(pod: &Pod, to: SocketAddr, threads: usize, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let ns = pod.ns.clone();
            std::thread::spawn(move || {
                in_ns(&ns, || {
                    let mut n = 0u64;
                    let msg = [1u8; 64];
                    let mut buf = [0u8; 64];
                    while Instant::now() < deadline {
                        let mut s = TcpStream::connect(to).unwrap();
                        s.write_all(&msg).unwrap();
                        s.read_exact(&mut buf).unwrap();
                        n += 1;
                    }
                    n
                })
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    total as f64 / secs as f64
}

fn wait_listening(ns: &str, port: u16) {
    eventually("iperf3 listening", Duration::from_secs(10), || {
        let out = ns_sh(ns, &["ss", "-ltnH", &format!("sport = :{port}")]);
        (!out.trim().is_empty()).then_some(())
    });
}

fn main() {
    if !is_root() {
        eprintln!("mesh benchmark needs root (network namespaces); skipped");
        return;
    }
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: only compile-check.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let _ = ztunnel::sys::raise_nofile_limit();
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let many: usize = std::env::var("BENCH_CONNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let lab = Lab::new(
        "bm",
        250,
        &[
            (0, "a1", "shop", true),
            (0, "a3", "plain", false),
            (1, "b1", "db", true),
            (1, "b2", "plain", false),
        ],
    );
    // BENCH_ZT_ARGS: extra ztunnel flags for experiments (e.g. "--workers 1").
    let extra = std::env::var("BENCH_ZT_ARGS").unwrap_or_default();
    let mut args = vec!["--access-log", "false", "--log-format", "json"];
    args.extend(extra.split_whitespace());
    let z0 = lab.start_ztunnel(0, &args);
    let z1 = lab.start_ztunnel(1, &args);
    std::thread::sleep(Duration::from_millis(500));
    let idle = (rss_kib(z0), rss_kib(z1));
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

    let t1_direct = iperf(&a3, direct_srv, 1, secs);
    let cpu0 = cpu_secs(z0) + cpu_secs(z1);
    let t1_mesh = iperf(&a1, mesh_srv, 1, secs);
    let cpu = cpu_secs(z0) + cpu_secs(z1) - cpu0;
    let gbytes = t1_mesh * secs as f64 / 8.0;
    let t1 = (t1_direct, t1_mesh);
    let t4 = (
        iperf(&a3, direct_srv, 4, secs),
        iperf(&a1, mesh_srv, 4, secs),
    );
    let lat_direct = rr(&a3, echo_direct.addr, 20_000);
    let lat_mesh = rr(&a1, echo_mesh.addr, 20_000);
    let rate = (
        conn_rate(&a3, echo_direct.addr, 4, secs as u64),
        conn_rate(&a1, echo_mesh.addr, 4, secs as u64),
    );

    // Many concurrent connections held open.
    let to = echo_mesh.addr;
    let ns = a1.ns.clone();
    let held: Vec<TcpStream> = in_ns(&ns, move || {
        (0..many)
            .map(|_| {
                let mut s = TcpStream::connect(to).unwrap();
                s.write_all(&[1u8; 64]).unwrap();
                let mut b = [0u8; 64];
                s.read_exact(&mut b).unwrap();
                s
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let busy = (rss_kib(z0), rss_kib(z1));
    drop(held);

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
        "| ztunnel CPU per GB carried, both nodes, 1 stream (CPU-seconds/GB) | - | {:.2} | |",
        cpu / gbytes
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
    println!(
        "| ztunnel RSS with {many} open connections, source / destination (MiB) | - | {:.1} / {:.1} | {:.1} / {:.1} KiB per connection |",
        busy.0 as f64 / 1024.0,
        busy.1 as f64 / 1024.0,
        (busy.0.saturating_sub(idle.0)) as f64 / many as f64,
        (busy.1.saturating_sub(idle.1)) as f64 / many as f64,
    );
}

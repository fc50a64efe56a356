//! Measurements shared by the network benchmarks (`mesh`, `sidebyside`): each runs a real
//! tool or real sockets from inside a network namespace (by name, under /var/run/netns) and
//! returns what it measured.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lab ztunnel's system tests use: nodes, pods and the agent's real capture.
pub use ambient_tests::ztunnel_lab as support;

use support::{in_ns, ns_sh, wait_for};

pub mod perf;

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// iperf3 from `ns` to `server` (`reverse`: the server sends), Gbit/s received.
pub fn iperf(ns: &str, server: SocketAddr, streams: u32, secs: u32, reverse: bool) -> f64 {
    let (ip, port, t, p) = (
        server.ip().to_string(),
        server.port().to_string(),
        secs.to_string(),
        streams.to_string(),
    );
    let mut args = vec!["iperf3", "-c", &ip, "-p", &port, "-t", &t, "-P", &p, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = ns_sh(ns, &args);
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Round-trip times of 64-byte request/response exchanges on one connection, µs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
}

/// `n` 64-byte exchanges from `ns` with the echo server at `to` (after 200 to warm up).
pub fn rr(ns: &str, to: SocketAddr, n: usize) -> Latency {
    let mut samples = in_ns(ns, move || {
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
    Latency {
        avg: samples.iter().sum::<f64>() / samples.len() as f64,
        p50: p(0.50),
        p99: p(0.99),
    }
}

/// New connections per second from `ns` to the echo server at `to`: `threads` clients, each
/// connecting, echoing 64 bytes and closing, for `secs`.
pub fn conn_rate(ns: &str, to: SocketAddr, threads: usize, secs: u64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let ns = ns.to_owned();
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

/// An nginx configuration under `dir/name` answering every GET on each of `addrs` with a
/// 2-byte body; one process (`master_process off`), so killing it ends it. Returns the
/// arguments that run it.
pub fn nginx_args(dir: &Path, name: &str, addrs: &[SocketAddr]) -> Vec<String> {
    let prefix: PathBuf = dir.join(name);
    std::fs::create_dir_all(&prefix).unwrap();
    let conf = prefix.join("nginx.conf");
    let p = prefix.display();
    let listen: String = addrs
        .iter()
        .map(|a| format!("    server {{ listen {a}; location / {{ return 200 \"ok\"; }} }}\n"))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {p}/nginx.pid;\nerror_log {p}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
               fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
               keepalive_requests 100000000;\n{listen}}}\n"
        ),
    )
    .unwrap();
    vec![
        "nginx".into(),
        "-p".into(),
        p.to_string(),
        "-c".into(),
        conf.display().to_string(),
    ]
}

/// HTTP/1.1 GETs per second on `conns` keep-alive connections (wrk, `threads` threads).
pub fn wrk_rps(ns: &str, url: &str, threads: u32, conns: u32, secs: u32) -> f64 {
    let out = ns_sh(
        ns,
        &[
            "wrk",
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            url,
        ],
    );
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk's output:\n{out}"))
}

/// Waits until something in `ns` listens on TCP `port`.
pub fn wait_listening(ns: &str, port: u16) {
    wait_for(
        &format!("a listener on {port}"),
        Duration::from_secs(10),
        || {
            let out = ns_sh(ns, &["ss", "-ltnH", &format!("sport = :{port}")]);
            (!out.trim().is_empty()).then_some(())
        },
    );
}

/// An echo server for many concurrent connections: one thread, tokio tasks with a small
/// buffer. Runs in a child process (`<bench> --echo-server <addr>,...`, started in the
/// server's namespace) so that its descriptors do not count against the bench's limit.
pub fn run_echo_server(addrs: &[SocketAddr]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = ztunnel::sys::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut listeners = Vec::new();
        for a in addrs {
            listeners.push(tokio::net::TcpListener::bind(a).await.unwrap());
        }
        let tasks: Vec<_> = listeners
            .into_iter()
            .map(|l| {
                tokio::spawn(async move {
                    loop {
                        let Ok((mut c, _)) = l.accept().await else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        let _ = c.set_nodelay(true);
                        tokio::spawn(async move {
                            let mut buf = [0u8; 1024];
                            loop {
                                match c.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            let _ = c.shutdown().await;
                        });
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// The arguments `run_echo_server` is started with in a child process.
pub fn echo_server_args(addrs: &[SocketAddr]) -> Vec<String> {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    vec![
        std::env::current_exe().unwrap().display().to_string(),
        "--echo-server".into(),
        list.join(","),
    ]
}

/// If this process was started as the echo server, runs it and returns true.
pub fn echo_server_main() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == "--echo-server") else {
        return false;
    };
    let addrs: Vec<SocketAddr> = args[i + 1]
        .split(',')
        .map(|a| a.parse().expect("--echo-server <addr>,..."))
        .collect();
    run_echo_server(&addrs);
    true
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The tools missing from PATH, of `tools`.
pub fn missing_tools<'a>(tools: &[&'a str]) -> Vec<&'a str> {
    let path = std::env::var("PATH").unwrap_or_default();
    tools
        .iter()
        .copied()
        .filter(|tool| !path.split(':').any(|d| Path::new(d).join(tool).is_file()))
        .collect()
}

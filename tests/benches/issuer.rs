//! Certificate issue time at `ambient-issuer`: the real binary in a network namespace of its
//! own, 2,000 pods in its view, a node proxy's requests (bearer token, ImpersonatedIdentity,
//! a P-256 CSR made beforehand) over one TLS connection, as ztunnel sends them. Prints p50 /
//! p99 / max of the request round trip, one at a time and with several node proxies at once,
//! and the issuer's own histogram (`issuer_request_duration_seconds`) beside it.
//!
//! Then, in a two-node lab cluster whose ztunnels get their certificates from the issuer: the
//! first connection of a new pod (a new identity) to a pod on the other node, right after its
//! ADD returned, against a second connection of the same pod. The certificate was issued
//! during the ADD (the agent's push waits for ztunnel's Ack), so the first connection pays the
//! TLS handshake of a new HBONE connection, never the issuer.
//!
//! `cargo bench -p ambient-tests --bench issuer` as root, after `cargo build --release
//! --workspace` (or the profile the bench runs in). `BENCH_ISSUER_REQUESTS=N` per phase,
//! `BENCH_FIRST_CONNECTIONS=N` new pods.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ambient_tests::bins::BinDir;
use ambient_tests::cluster::{Cluster, ClusterSpec};
use ambient_tests::cni::Attach;
use ambient_tests::inns::{http_get, in_ns};
use ambient_tests::issuer::{csr, Answer, Ask, Client};
use ambient_tests::netns::{eventually, NetNs};

const PODS: usize = 2000;
const NODE: &str = "bench";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let requests: usize = std::env::var("BENCH_ISSUER_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let bins = BinDir::current().expect("profile directory");
    let issuer = bins
        .find("ambient-issuer")
        .expect("build ambient-issuer first");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    run(Command::new(&issuer).args(["ca", "init", "--dir"]).arg(&ca));
    let mut text = String::new();
    for i in 0..PODS {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i}\n  namespace: bench\n  uid: uid-{i}\nspec:\n  nodeName: {NODE}\n  serviceAccountName: sa-{i}\n"
        ));
    }
    std::fs::write(manifests.join("pods.yaml"), text).unwrap();
    let creds = dir.path().join("credentials.yaml");
    let token_path = dir.path().join("token");
    run(Command::new(&issuer)
        .args(["credential", "add", "--node", NODE, "--file"])
        .arg(&creds)
        .arg("--token-out")
        .arg(&token_path));
    let token = std::fs::read_to_string(&token_path).unwrap();

    let ns = NetNs::new("bench-issuer").expect("network namespace (run as root)");
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let log = std::fs::File::create(dir.path().join("issuer.log")).unwrap();
    ns.spawn(
        ns.command(&issuer)
            .args(["run", "--source", "manifests", "--manifest-dir"])
            .arg(&manifests)
            .arg("--credentials")
            .arg(&creds)
            .arg("--ca-dir")
            .arg(&ca)
            .args([
                "--serving-ip",
                "127.0.0.1",
                "--listen",
                "127.0.0.1:15012",
                "--metrics-listen",
                "127.0.0.1:15016",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], 15016));
    let get = |path: &str| {
        in_ns(&ns.path(), || {
            http_get(metrics, path, Duration::from_secs(2))
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    };
    eventually(Duration::from_secs(20), || match get("/ready") {
        Ok((200, _)) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .expect("issuer ready");

    let addr = SocketAddr::from(([127, 0, 0, 1], 15012));
    let root = ca.join("root-cert.pem");
    // Every CSR made up front: the bench times the issuer, not the client's key generation.
    let ids: Vec<String> = (0..PODS)
        .map(|i| format!("spiffe://cluster.local/ns/bench/sa/sa-{i}"))
        .collect();
    let csrs: Vec<String> = ids.iter().map(|id| csr(id)).collect();

    println!(
        "# ambient-issuer: certificate requests of a node proxy ({PODS} pods in view, {} cores)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| clients | requests | p50 ms | p99 ms | max ms | requests/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for clients in [1usize, 4] {
        let per_client = requests / clients;
        let (mut all, wall) = in_ns(&ns.path(), || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let started = Instant::now();
                let mut tasks = Vec::new();
                for c in 0..clients {
                    let (root, token, ids, csrs) =
                        (root.clone(), token.clone(), ids.clone(), csrs.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut client = Client::connect(addr, &root, "127.0.0.1").await.unwrap();
                        let mut times = Vec::with_capacity(per_client);
                        for k in 0..per_client + 10 {
                            let i = (c * per_client + k) % PODS;
                            let ask = Ask {
                                token: &token,
                                identity: &ids[i],
                                impersonate: true,
                                ttl_secs: 86400,
                                csr: Some(&csrs[i]),
                            };
                            let t = Instant::now();
                            let a = client.ask(&ask).await;
                            let took = t.elapsed();
                            assert!(matches!(a, Answer::Signed(_)), "{a:?}");
                            // The first ten of each client warm the connection up.
                            if k >= 10 {
                                times.push(took);
                            }
                        }
                        times
                    }));
                }
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                (all, started.elapsed())
            })
        })
        .unwrap();
        all.sort();
        println!(
            "| {clients} | {} | {} | {} | {} | {:.0} |",
            all.len(),
            ms(percentile(&all, 0.5)),
            ms(percentile(&all, 0.99)),
            ms(*all.last().unwrap()),
            all.len() as f64 / wall.as_secs_f64()
        );
    }
    if let Ok((200, body)) = get("/metrics") {
        println!("\nthe issuer's own view (from arrival to answer), cumulative buckets:");
        for l in body
            .lines()
            .filter(|l| l.starts_with("issuer_request_duration_seconds"))
        {
            println!("    {l}");
        }
    }
    drop(ns);
    first_connections();
}

/// A new pod's first connection after its ADD returned, in a lab cluster using the issuer.
fn first_connections() {
    let n: usize = std::env::var("BENCH_FIRST_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let spec = ClusterSpec::leased("bfc", 2, Attach::Bridge);
    let mut c = Cluster::new(spec).expect("lab cluster");
    let server = c.add_pod(1, "ambient-demo", "server", &[]).unwrap();
    let to = c.pods[server].echo_addr();
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for i in 0..n {
        // add_pod returns once the CNI ADD did (and the IP is published).
        let p = c
            .add_pod(0, "ambient-demo", &format!("new-{i}"), &[])
            .unwrap();
        let t = Instant::now();
        c.connect(p, to, "first").expect("first connection");
        first.push(t.elapsed());
        let t = Instant::now();
        c.connect(p, to, "second").expect("second connection");
        second.push(t.elapsed());
    }
    first.sort();
    second.sort();
    let issued = c.issuer_metric("issuer_certificates_issued_total", &[]);
    println!(
        "\n# a new pod's connection to a pod on the other node, right after its ADD ({n} pods, each a new identity; {issued} certificates issued)\n"
    );
    println!("| connection | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|");
    for (what, v) in [
        ("first (new HBONE connection, new identity)", &first),
        ("second (pooled)", &second),
    ] {
        println!(
            "| {what} | {} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
}

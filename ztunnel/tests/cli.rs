//! The binary's command line: `ca init`, flag validation, and an in-process App on loopback
//! ports (no privileges needed: mark 0, transparency off).

use std::process::Command;
use std::time::Duration;

use ambient_tests::inns::http_get;
use clap::Parser;
use ztunnel::app::App;
use ztunnel::config::{Config, RunArgs};

/// How long an endpoint request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

const BIN: &str = env!("CARGO_BIN_EXE_ztunnel");

#[test]
fn ca_init_creates_files_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = Command::new(BIN)
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["ca-cert.pem", "ca-key.pem", "root-cert.pem"] {
        assert!(ca.join(f).exists(), "{f}");
    }
    let again = Command::new(BIN)
        .args(["ca", "init", "--dir", ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn bad_flags_are_all_reported_with_exit_code_2() {
    let out = Command::new(BIN)
        .args([
            "run",
            "--node-name",
            "n",
            "--ca-dir",
            "/nonexistent",
            "--outbound-addr",
            "nope",
            "--drain-timeout",
            "soon",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--outbound-addr") && err.contains("--drain-timeout"),
        "{err}"
    );
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// A `ztunnel run` configuration for an unprivileged in-process test: node `n1`, every
/// listener on a free loopback port, no mark, no transparent sockets; `source` adds the
/// cluster source's flags.
fn loopback_config(ca: &std::path::Path, sock: &std::path::Path, source: &[&str]) -> Config {
    let mut argv = vec![
        "ztunnel",
        "--node-name",
        "n1",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--agent-socket",
        sock.to_str().unwrap(),
        "--mark",
        "0",
        "--transparent",
        "false",
        "--tcp-migrate-req",
        "false",
        "--drain-timeout",
        "1s",
    ];
    for flag in [
        "--outbound-addr",
        "--inbound-addr",
        "--inbound-plaintext-addr",
        "--admin-addr",
        "--metrics-addr",
        "--readiness-addr",
    ] {
        argv.extend([flag, "127.0.0.1:0"]);
    }
    argv.extend_from_slice(source);
    Config::from_args(&Cli::try_parse_from(argv).unwrap().run).unwrap()
}

#[test]
fn app_binds_port_zero_serves_endpoints_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    ztunnel::identity::ca_init(&dir.path().join("ca"), "cluster.local", false).unwrap();
    std::fs::create_dir_all(dir.path().join("m")).unwrap();
    std::fs::write(
        dir.path().join("m/pods.yaml"),
        "kind: Namespace\nmetadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}\n---\nkind: Pod\nmetadata: {name: p, namespace: a, uid: u}\nspec: {nodeName: n1, serviceAccountName: s}\nstatus: {podIP: 127.0.0.9}\n",
    )
    .unwrap();
    let (ca, m, sock) = (
        dir.path().join("ca"),
        dir.path().join("m"),
        dir.path().join("z.sock"),
    );
    let cfg = loopback_config(&ca, &sock, &["--manifest-dir", m.to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = App::build(cfg, rt.handle(), rt.handle()).unwrap();
    let addrs = app.addresses().clone();
    assert_ne!(addrs.outbound[0].port(), 0, "real port after binding");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = rt.handle().clone();
    let runner = rt.spawn(async move {
        app.run(h.clone(), h, async {
            let _ = stop_rx.await;
        })
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, dump) = http_get(addrs.admin, "/config_dump", HTTP_TIMEOUT)
        .ok()
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        dump.contains("\"workloads\"") && dump.contains("127.0.0.9"),
        "{dump}"
    );
    // The local workload's certificate is issued ahead of any connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !http_get(addrs.admin, "/config_dump", HTTP_TIMEOUT)
        .ok()
        .unwrap()
        .1
        .contains("spiffe://cluster.local/ns/a/sa/s")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "certificate never issued"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, metrics) = http_get(addrs.metrics, "/metrics", HTTP_TIMEOUT)
        .ok()
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("istio_tcp_connections_opened"),
        "{metrics}"
    );
    assert_eq!(
        http_get(addrs.admin, "/connections", HTTP_TIMEOUT)
            .ok()
            .unwrap()
            .1
            .trim(),
        "[]"
    );
    assert_eq!(
        http_get(addrs.admin, "/nope", HTTP_TIMEOUT)
            .ok()
            .map(|r| r.0),
        Some(404)
    );
    // A connection from an address that is no local workload is refused on outbound.
    {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(addrs.outbound[0]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty());
    }
    stop_tx.send(()).unwrap();
    rt.block_on(runner).unwrap();
    // After the drain: not ready any more (the proxy listeners are closed).
    assert_eq!(
        http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
            .ok()
            .map(|r| r.0),
        Some(503)
    );
}

/// `--source=kube --kubeconfig`: the App reads the cluster from the API (the in-process fake
/// server), is not ready until every kind has been listed once, then serves the pods it read
/// and pre-issues the local workload's certificate.
#[test]
fn app_with_the_kube_source_is_ready_only_after_the_first_sync() {
    use ambient_kube_watch::testing::FakeApi;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = rt.block_on(FakeApi::start());
    api.put(serde_json::json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "a", "labels": {"istio.io/dataplane-mode": "ambient"}}}));
    api.put(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "a", "uid": "u"},
        "spec": {"nodeName": "n1", "serviceAccountName": "s"},
        "status": {"phase": "Running", "podIP": "127.0.0.9"}}));
    // Pods cannot be listed yet (an error, retried with backoff): not ready meanwhile.
    api.set_served("pods", false);
    let dir = tempfile::tempdir().unwrap();
    ztunnel::identity::ca_init(&dir.path().join("ca"), "cluster.local", false).unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc);
    let (ca, sock) = (dir.path().join("ca"), dir.path().join("z.sock"));
    let cfg = loopback_config(
        &ca,
        &sock,
        &["--source=kube", "--kubeconfig", kc.to_str().unwrap()],
    );
    let app = App::build(cfg, rt.handle(), rt.handle()).unwrap();
    let addrs = app.addresses().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let h = rt.handle().clone();
    let runner = rt.spawn(async move {
        app.run(h.clone(), h, async {
            let _ = stop_rx.await;
        })
        .await
    });
    // Listening, but not ready while a kind has never been listed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
        .ok()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
            .ok()
            .map(|r| r.0),
        Some(503)
    );
    api.set_served("pods", true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http_get(addrs.readiness, "/healthz/ready", HTTP_TIMEOUT)
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dump = http_get(addrs.admin, "/config_dump", HTTP_TIMEOUT)
            .ok()
            .unwrap()
            .1;
        if dump.contains("127.0.0.9") && dump.contains("spiffe://cluster.local/ns/a/sa/s") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pod or certificate missing: {dump}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kubeconfig's credentials were used.
    assert!(api
        .requests()
        .iter()
        .all(|q| q.authorization.as_deref() == Some("Bearer abc")));
    stop_tx.send(()).unwrap();
    rt.block_on(runner).unwrap();
}

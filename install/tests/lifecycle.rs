//! The exit decision through the real client against a loopback HTTP server answering the
//! DaemonSet GET as the API server would.

use std::time::Duration;

use install::lifecycle::{daemonset_decision, ExitDecision};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves one canned answer to every request; returns the address and the request lines seen.
async fn server(
    code: u16,
    body: serde_json::Value,
    hang: bool,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let tx = tx.clone();
            let body = serde_json::to_vec(&body).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let _ = tx.send(head);
                if hang {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let resp = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes()).await;
                let _ = c.write_all(&body).await;
                let _ = c.shutdown().await;
            });
        }
    });
    (addr, rx)
}

fn client(addr: std::net::SocketAddr) -> kube::Client {
    kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap()
}

fn ds(deleting: bool) -> serde_json::Value {
    let mut v = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "ambient-node", "namespace": "ambient-system", "resourceVersion": "7"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {"labels": {"a": "b"}}}}});
    if deleting {
        v["metadata"]["deletionTimestamp"] = json!("2026-11-28T10:00:00Z");
    }
    v
}

fn status(code: u16) -> serde_json::Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
           "reason": "x", "message": "daemonsets.apps \"ambient-node\" not found"})
}

async fn decide(code: u16, body: serde_json::Value, hang: bool) -> (ExitDecision, Option<String>) {
    let (addr, mut rx) = server(code, body, hang).await;
    let d = daemonset_decision(
        client(addr),
        "ambient-system",
        "ambient-node",
        Duration::from_millis(500),
    )
    .await;
    (d, rx.try_recv().ok())
}

#[tokio::test]
async fn upgrade_keeps_and_deletion_uninstalls() {
    let (d, req) = decide(200, ds(false), false).await;
    assert!(matches!(d, ExitDecision::Keep(_)), "{d:?}");
    assert_eq!(
        req.as_deref(),
        Some("GET /apis/apps/v1/namespaces/ambient-system/daemonsets/ambient-node HTTP/1.1")
    );
    let (d, _) = decide(200, ds(true), false).await;
    assert!(matches!(d, ExitDecision::Uninstall(_)), "{d:?}");
    for code in [404, 401, 403] {
        let (d, _) = decide(code, status(code), false).await;
        assert!(matches!(d, ExitDecision::Uninstall(_)), "{code}: {d:?}");
    }
}

#[tokio::test]
async fn an_api_that_cannot_answer_keeps_the_plugin() {
    let (d, _) = decide(500, status(500), false).await;
    assert!(matches!(d, ExitDecision::Keep(_)), "{d:?}");
    let (d, _) = decide(200, ds(false), true).await;
    assert!(
        matches!(&d, ExitDecision::Keep(why) if why.contains("did not answer")),
        "{d:?}"
    );
    // Nothing listening.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let d = daemonset_decision(
        client(addr),
        "ambient-system",
        "ambient-node",
        Duration::from_secs(5),
    )
    .await;
    assert!(matches!(d, ExitDecision::Keep(_)), "{d:?}");
}

/// The binary end to end: `install-cni run` against a temporary host directory and a
/// loopback API server, stopped with SIGTERM.
async fn run_and_stop(code: u16, body: serde_json::Value) -> (bool, bool, String) {
    let (addr, _rx) = server(code, body, false).await;
    let host = tempfile::tempdir().unwrap();
    let conf = host.path().join("net.d");
    let bin = host.path().join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let src = host.path().join("ambient-cni");
    std::fs::write(
        &src,
        b"#!/bin/sh\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"1.0.0\"]}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cni/10-ptp.conflist"
    );
    std::fs::copy(fixture, conf.join("10-ptp.conflist")).unwrap();
    let kc = host.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\nusers:\n- name: u\n  user: {{}}\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_install-cni"))
        .args(["run", "--poll-ms", "20", "--kubeconfig"])
        .arg(&kc)
        .arg("--cni-conf-dir")
        .arg(&conf)
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--plugin-source")
        .arg(&src)
        .arg("--allow-dynamic-plugin")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let conflist = conf.join("10-ptp.conflist");
    let chained = || {
        std::fs::read_to_string(&conflist)
            .map(|t| t.contains("ambient-cni"))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !chained() {
        assert!(std::time::Instant::now() < deadline, "never chained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        chained(),
        bin.join("ambient-cni").exists(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_binary_keeps_the_plugin_on_upgrade_and_removes_it_on_delete() {
    let (chained, binary, log) = run_and_stop(200, ds(false)).await;
    assert!(chained && binary, "upgrade must keep the plugin: {log}");
    assert!(log.contains("the plugin stays"), "{log}");
    let (chained, binary, log) = run_and_stop(404, status(404)).await;
    assert!(!chained && !binary, "delete must uninstall: {log}");
    assert!(log.contains("stopping and uninstalling"), "{log}");
}

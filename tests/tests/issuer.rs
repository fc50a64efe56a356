//! The certificate issuer with the real binaries: `ambient-issuer` in the lab's underlay
//! namespace (the control plane's place), each node with its own credential, certificate
//! requests sent over TLS exactly as a node proxy sends them. A node gets certificates only
//! for its own pods; tokens of other service accounts, expired tokens and tokens for another
//! audience get nothing; a pod that moves is signable only on its new node.
//!
//! Each test owns a cluster in a leased `10.<octet>.0.0/16` (`ambient_tests::addrs`). Run as root after
//! `cargo build --workspace`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ambient_tests::cluster::{test_cluster, test_pod, Cluster, ClusterSpec, CA_TOKEN_FILE};
use ambient_tests::cni::Attach;
use ambient_tests::issuer::{uri_sans, Answer, Ask};
use ambient_tests::manifests;
use ambient_tests::netns::eventually;
use ambient_tests::topo::PodMeta;

fn node_token(c: &Cluster, node: usize) -> String {
    std::fs::read_to_string(c.nodes[node].dir.join(CA_TOKEN_FILE)).unwrap()
}

fn identity(c: &Cluster, pod: usize) -> String {
    c.pods[pod].spiffe(c.trust_domain())
}

/// A token minted for the issuer with `ambient-issuer credential add <args>`.
fn credential(c: &Cluster, name: &str, args: &[&str]) -> String {
    let path = c.issuer_dir().join(name);
    c.add_credential(args, &path).unwrap();
    std::fs::read_to_string(path).unwrap()
}

fn ask<'a>(token: &'a str, identity: &'a str) -> Ask<'a> {
    Ask {
        token,
        identity,
        impersonate: true,
        ttl_secs: 3600,
        csr: None,
    }
}

fn refused_with(a: &Answer, code: tonic::Code, what: &str) {
    assert_eq!(a.code(), Some(code), "{what}: {a:?}");
}

#[test]
fn a_node_gets_certificates_only_for_its_own_pods() {
    let mut c = test_cluster("is-own", Attach::Bridge);
    let web = test_pod(&mut c, 0, "ambient-demo", "web");
    let db = test_pod(&mut c, 1, "ambient-demo", "db");
    let (t1, t2) = (node_token(&c, 0), node_token(&c, 1));
    let (web_id, db_id) = (identity(&c, web), identity(&c, db));

    let a = c.ask_issuer(&ask(&t1, &web_id));
    let Answer::Signed(chain) = &a else {
        panic!("node-1 asking for its own pod web: {a:?}")
    };
    assert_eq!(
        uri_sans(&chain[0]),
        vec![web_id.clone()],
        "the leaf names web only"
    );
    let root = std::fs::read_to_string(c.ca_dir().join("root-cert.pem")).unwrap();
    assert_eq!(
        chain.last().unwrap().trim(),
        root.trim(),
        "the last element is the published root bundle"
    );
    assert!(
        c.ask_issuer(&ask(&t2, &db_id)).is_signed(),
        "node-2, its own pod db"
    );

    // The same node asking for a pod of the other node.
    let a = c.ask_issuer(&ask(&t1, &db_id));
    refused_with(
        &a,
        tonic::Code::PermissionDenied,
        "node-1 asking for node-2's pod",
    );
    let a = c.ask_issuer(&ask(&t2, &web_id));
    refused_with(
        &a,
        tonic::Code::PermissionDenied,
        "node-2 asking for node-1's pod",
    );
    // An identity no pod has at all, and one of another trust domain.
    let ghost = format!("spiffe://{}/ns/ambient-demo/sa/ghost", c.trust_domain());
    refused_with(
        &c.ask_issuer(&ask(&t1, &ghost)),
        tonic::Code::PermissionDenied,
        "no such pod",
    );
    let foreign = "spiffe://evil.example/ns/ambient-demo/sa/sa-web";
    refused_with(
        &c.ask_issuer(&ask(&t1, foreign)),
        tonic::Code::PermissionDenied,
        "foreign trust domain",
    );
    // A node proxy asking without impersonation gets only its own identity, which its node
    // credential (bound to no pod) does not allow.
    let own = Ask {
        impersonate: false,
        ..ask(&t1, &web_id)
    };
    assert!(
        !c.ask_issuer(&own).is_signed(),
        "a CSR for web without impersonation"
    );
    // No token, a made-up token.
    refused_with(
        &c.ask_issuer(&ask("", &web_id)),
        tonic::Code::Unauthenticated,
        "no token",
    );
    refused_with(
        &c.ask_issuer(&ask("0123abcd", &web_id)),
        tonic::Code::Unauthenticated,
        "unknown token",
    );

    // Two by the ztunnels when the agent announced web and db, two by this test.
    assert_eq!(
        c.issuer_metric(
            "issuer_certificates_issued_total",
            &[("kind", "impersonated")]
        ),
        4.0
    );
    assert!(
        c.issuer_metric(
            "issuer_requests_refused_total",
            &[("reason", "not_on_node")]
        ) >= 3.0
    );
    assert_eq!(
        c.issuer_metric(
            "issuer_requests_refused_total",
            &[("reason", "foreign_trust_domain")]
        ),
        1.0
    );
}

#[test]
fn tokens_of_other_accounts_expired_or_for_another_audience_get_nothing() {
    let mut c = test_cluster("is-tok", Attach::Ptp);
    let web = test_pod(&mut c, 0, "ambient-demo", "web");
    let web_id = identity(&c, web);

    // A credential of another service account on the same node: not the node proxy.
    let other = credential(
        &c,
        "other-sa",
        &[
            "--service-account",
            "ambient-demo/sa-other",
            "--node",
            "node-1",
        ],
    );
    let a = c.ask_issuer(&ask(&other, &web_id));
    refused_with(
        &a,
        tonic::Code::PermissionDenied,
        "another service account impersonating",
    );
    assert_eq!(
        c.issuer_metric(
            "issuer_requests_refused_total",
            &[("reason", "not_node_proxy")]
        ),
        1.0
    );

    // A node credential for another audience (a token meant for the API server).
    let wrong_aud = credential(
        &c,
        "aud",
        &["--node", "node-1", "--audience", "kube-apiserver"],
    );
    refused_with(
        &c.ask_issuer(&ask(&wrong_aud, &web_id)),
        tonic::Code::Unauthenticated,
        "wrong audience",
    );
    assert_eq!(
        c.issuer_metric(
            "issuer_requests_refused_total",
            &[("reason", "token_audience")]
        ),
        1.0
    );

    // A node credential that expires: good now, refused after.
    let short = credential(&c, "short", &["--node", "node-1", "--expires-in", "2s"]);
    assert!(
        c.ask_issuer(&ask(&short, &web_id)).is_signed(),
        "before expiry"
    );
    std::thread::sleep(Duration::from_millis(2500));
    refused_with(
        &c.ask_issuer(&ask(&short, &web_id)),
        tonic::Code::Unauthenticated,
        "expired",
    );
    assert_eq!(
        c.issuer_metric(
            "issuer_requests_refused_total",
            &[("reason", "token_expired")]
        ),
        1.0
    );

    // A workload token bound to its pod gets its own identity, and nothing else.
    let own = credential(
        &c,
        "web-own",
        &[
            "--service-account",
            "ambient-demo/sa-web",
            "--pod",
            "ambient-demo/web",
        ],
    );
    let mine = Ask {
        impersonate: false,
        ..ask(&own, &web_id)
    };
    assert!(c.ask_issuer(&mine).is_signed(), "a workload's own identity");
    let other_id = format!("spiffe://{}/ns/ambient-demo/sa/sa-db", c.trust_domain());
    let theirs = Ask {
        impersonate: false,
        ..ask(&own, &other_id)
    };
    refused_with(
        &c.ask_issuer(&theirs),
        tonic::Code::InvalidArgument,
        "a CSR naming another identity",
    );
}

#[test]
fn a_pod_that_moves_is_signable_only_on_its_new_node() {
    let c = test_cluster("is-mv", Attach::Bridge);
    let (t1, t2) = (node_token(&c, 0), node_token(&c, 1));
    // The Pod object alone, as the API server has it: scheduled on node-1, then deleted and
    // recreated with the same name on node-2 (a StatefulSet pod moving).
    let meta = PodMeta::new("ambient-demo", "mover");
    let place = |node: &str| {
        let p = manifests::pod(&meta, node, "sa-mover", &[]);
        c.write_manifest("pod-ambient-demo-mover", &[p]).unwrap();
    };
    place("node-1");
    let id = format!("spiffe://{}/ns/ambient-demo/sa/sa-mover", c.trust_domain());
    assert!(
        c.ask_issuer(&ask(&t1, &id)).is_signed(),
        "on node-1: node-1 may"
    );
    refused_with(
        &c.ask_issuer(&ask(&t2, &id)),
        tonic::Code::PermissionDenied,
        "on node-1: node-2 may not",
    );
    place("node-2");
    // The issuer's view catches up within its poll interval; node-2's request waits for it.
    assert!(
        c.ask_issuer(&ask(&t2, &id)).is_signed(),
        "moved: node-2 may"
    );
    refused_with(
        &c.ask_issuer(&ask(&t1, &id)),
        tonic::Code::PermissionDenied,
        "moved: node-1 may not any more",
    );
}

/// Every certificate every ztunnel holds, as `/config_dump` shows it.
fn held(c: &Cluster) -> Vec<serde_json::Value> {
    c.nodes
        .iter()
        .flat_map(|n| {
            n.config_dump()
                .map(|d| d["certificates"].as_array().cloned().unwrap_or_default())
                .unwrap_or_default()
        })
        .collect()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until every held certificate was issued after `since` and satisfies `ok`.
fn wait_all_reissued(c: &Cluster, since: u64, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    eventually(Duration::from_secs(40), || {
        let certs = held(c);
        match certs
            .iter()
            .find(|h| h["issued_unix"].as_u64().unwrap_or(0) <= since || !ok(h))
        {
            None if !certs.is_empty() => Ok(()),
            None => Err("no certificates held".to_string()),
            Some(h) => Err(format!("{what}: not yet: {h}")),
        }
    })
    .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Replaces a file in one step, as a Secret update does.
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The root rotation procedure of docs/operations.md, walked with traffic flowing both ways
/// between two nodes the whole time, each probe a new connection (and, with the short pool
/// idle timeout, mostly a new TLS handshake): not one may fail.
#[test]
fn roots_rotate_without_a_failed_connection() {
    let mut spec = ClusterSpec::leased("is-rot", 2, Attach::Bridge);
    spec.ztunnel_args
        .extend(["--cert-ttl", "10s", "--pool-idle-timeout", "200ms"].map(String::from));
    let mut c = Cluster::new(spec).unwrap();
    let a = test_pod(&mut c, 0, "ambient-demo", "a");
    let b = test_pod(&mut c, 1, "ambient-demo", "b");
    let ca = c.ca_dir();
    let old_root = std::fs::read_to_string(ca.join("root-cert.pem")).unwrap();
    // The new root, made out of band (here by the same tool).
    let new_dir = c.root().join("ca-new");
    let out = std::process::Command::new(c.bin("ambient-issuer"))
        .args(["ca", "init", "--name", "ambient mesh root CA 2", "--dir"])
        .arg(&new_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_cert = std::fs::read_to_string(new_dir.join("ca-cert.pem")).unwrap();
    let new_key = std::fs::read_to_string(new_dir.join("ca-key.pem")).unwrap();

    let stop = AtomicBool::new(false);
    let (probes, failures) = std::thread::scope(|s| {
        let prober = s.spawn(|| {
            let (mut n, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                for (from, to) in [(a, b), (b, a)] {
                    n += 1;
                    if let Err(e) = c.connect(from, c.pods[to].echo_addr(), &format!("rot-{n}")) {
                        failed.push(format!("probe {n} {from}->{to}: {e}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (n, failed)
        });
        // Step 1: publish old + new roots; the old CA still signs. Every ztunnel takes the
        // bundle with its next certificate (at half-life).
        let t1 = now_unix();
        replace(
            &ca.join("root-cert.pem"),
            &format!("{}\n{new_cert}", old_root.trim_end()),
        );
        wait_all_reissued(&c, t1, "step 1: both roots trusted", |h| {
            h["trust_roots"] == 2
        });
        // Step 2: sign with the new root (key first: the issuer keeps the old CA until the
        // pair matches).
        let t2 = now_unix();
        replace(&ca.join("ca-key.pem"), &new_key);
        replace(&ca.join("ca-cert.pem"), &new_cert);
        wait_all_reissued(&c, t2, "step 2: leaves signed by the new root", |h| {
            h["issuer"]
                .as_str()
                .unwrap_or("")
                .contains("ambient mesh root CA 2")
        });
        // Every leaf of the old root has expired one lifetime later.
        std::thread::sleep(Duration::from_secs(11));
        // Step 3: retire the old root.
        let t3 = now_unix();
        replace(&ca.join("root-cert.pem"), &new_cert);
        wait_all_reissued(&c, t3, "step 3: only the new root trusted", |h| {
            h["trust_roots"] == 1
        });
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap()
    });
    assert!(probes > 40, "only {probes} probes ran");
    assert!(
        failures.is_empty(),
        "{} of {probes} connections failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(c.issuer_metric("issuer_trust_roots", &[]), 1.0);
    assert!(c.issuer_metric("issuer_ca_reloads_total", &[("result", "ok")]) >= 3.0);
}

/// An issuer outage: identities already held keep working. A pod of a new identity still
/// starts (no pod-creation stall, as when ztunnel is down at ADD), but its traffic is refused
/// until its certificate can be issued; ztunnel reports the outage on readiness and metrics,
/// and recovers by itself when the issuer is back.
#[test]
fn an_issuer_outage_keeps_held_identities_working_and_is_reported() {
    let mut c = test_cluster("is-out", Attach::Ptp);
    let a = test_pod(&mut c, 0, "ambient-demo", "a");
    let b = test_pod(&mut c, 1, "ambient-demo", "b");
    c.connect(a, c.pods[b].echo_addr(), "before").unwrap();
    assert!(c.nodes[0].ztunnel_ready());

    c.stop_issuer();
    for i in 0..5 {
        c.connect(a, c.pods[b].echo_addr(), &format!("during-{i}"))
            .unwrap_or_else(|e| panic!("a held identity stopped working in the outage: {e}"));
    }
    let fresh = test_pod(&mut c, 0, "ambient-demo", "fresh");
    let err = c
        .connect(fresh, c.pods[b].echo_addr(), "no-cert")
        .expect_err("a pod without a certificate got through");
    assert!(!err.contains("no-cert"), "{err}");
    let body = eventually(Duration::from_secs(10), || {
        match c.nodes[0].ztunnel_http(15021, "/healthz/ready") {
            Ok((503, body)) if body.contains("issuer") => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap();
    assert!(body.contains("15012"), "readiness names the issuer: {body}");
    assert_eq!(c.metric_sum(0, "ztunnel_ca_healthy", &[]), 0.0);
    assert!(c.metric_sum(0, "ztunnel_ca_requests_total", &[("result", "error")]) >= 1.0);
    c.connect(a, c.pods[b].echo_addr(), "still").unwrap();

    // The issuer is back: the new pod's certificate is issued without anyone asking again.
    c.start_issuer().unwrap();
    eventually(Duration::from_secs(40), || {
        c.connect(fresh, c.pods[b].echo_addr(), "after")
    })
    .unwrap();
    eventually(Duration::from_secs(10), || {
        if c.nodes[0].ztunnel_ready() {
            Ok(())
        } else {
            Err("not ready")
        }
    })
    .unwrap();
    assert_eq!(c.metric_sum(0, "ztunnel_ca_healthy", &[]), 1.0);
}

/// A pod's certificate is requested when ztunnel's source first sees the pod scheduled on
/// its node, before the kubelet runs the CNI chain: the ADD then does no certificate work
/// (the issuer signs nothing more for it) and the pod's first connection works.
#[test]
fn a_scheduled_pod_is_certified_before_its_add() {
    let mut c = test_cluster("is-pre", Attach::Bridge);
    let b = test_pod(&mut c, 1, "ambient-demo", "b");
    let meta = PodMeta::new("ambient-demo", "early");
    let id = format!("spiffe://{}/ns/ambient-demo/sa/sa-early", c.trust_domain());
    let issued = |c: &Cluster| {
        c.issuer_metric(
            "issuer_certificates_issued_total",
            &[("kind", "impersonated")],
        )
    };
    let before = issued(&c);
    c.schedule_pod(0, &meta, &[]).unwrap();
    eventually(Duration::from_secs(10), || {
        let dump = c.nodes[0].config_dump()?;
        let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
        if certs.iter().any(|h| h["identity"] == id.as_str()) {
            Ok(())
        } else {
            Err(format!("{id} not held yet: {certs:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("no certificate for a scheduled pod before its ADD: {e}"));
    assert_eq!(
        issued(&c),
        before + 1.0,
        "one certificate, for the scheduled pod"
    );

    let early = c.add_pod_with(0, meta, &[]).unwrap();
    c.connect(early, c.pods[b].echo_addr(), "first").unwrap();
    assert_eq!(
        issued(&c),
        before + 1.0,
        "the ADD asked the issuer for nothing more"
    );
}

/// A free loopback port (bound, then released for the issuer to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Kubernetes source: callers by TokenReview (audience `istio-ca`), pods from the issuer's
/// own watch, against the in-process fake API server speaking the real protocol.
#[test]
fn in_a_cluster_tokens_are_reviewed_and_pods_watched() {
    use ambient_kube_watch::testing::FakeApi;
    use ambient_tests::issuer::ask_once;
    use serde_json::json;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let api = rt.block_on(FakeApi::start());
    let pod = |ns: &str, name: &str, sa: &str, node: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": ns, "uid": format!("uid-{name}") },
            "spec": { "nodeName": node, "serviceAccountName": sa },
            "status": { "phase": "Running" },
        })
    };
    api.put(pod("ambient-system", "zt-a", "ztunnel", "node-a"));
    api.put(pod("ambient-system", "zt-b", "ztunnel", "node-b"));
    api.put(pod("shop", "web-1", "web", "node-a"));
    let bound = |pod: &str| {
        json!({
            "username": "system:serviceaccount:ambient-system:ztunnel",
            "extra": {
                "authentication.kubernetes.io/pod-name": [pod],
                "authentication.kubernetes.io/pod-uid": [format!("uid-{pod}")],
            },
        })
    };
    api.add_token("tok-a", bound("zt-a"), &["istio-ca"]);
    api.add_token("tok-b", bound("zt-b"), &["istio-ca"]);
    api.add_token(
        "tok-api",
        bound("zt-a"),
        &["https://kubernetes.default.svc"],
    );
    // A token of a pod that was deleted: its uid no longer matches.
    api.add_token(
        "tok-stale",
        json!({
            "username": "system:serviceaccount:ambient-system:ztunnel",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["zt-a"],
                "authentication.kubernetes.io/pod-uid": ["uid-of-an-older-zt-a"],
            },
        }),
        &["istio-ca"],
    );

    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc);
    let bin = ambient_tests::bins::binary("ambient-issuer");
    let ca = dir.path().join("ca");
    let st = std::process::Command::new(&bin)
        .args(["ca", "init", "--dir"])
        .arg(&ca)
        .status()
        .unwrap();
    assert!(st.success());
    let (grpc, http) = (free_port(), free_port());
    let log = dir.path().join("issuer.log");
    let mut child = std::process::Command::new(&bin)
        .args(["run", "--source", "kube", "--kubeconfig"])
        .arg(&kc)
        .arg("--ca-dir")
        .arg(&ca)
        .args(["--serving-ip", "127.0.0.1", "--pod-wait", "2s"])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{http}")])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    eventually(
        Duration::from_secs(20),
        || match ambient_tests::inns::http_get(metrics, "/ready", Duration::from_secs(2)) {
            Ok((200, body)) => Ok(body),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "issuer not ready: {e}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });

    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], grpc));
    let root = ca.join("root-cert.pem");
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let go = |token: &str| ask_once(addr, &root, "127.0.0.1", &ask(token, web));
    assert!(
        go("tok-a").is_signed(),
        "node-a's ztunnel, web on node-a: {:?}",
        go("tok-a")
    );
    refused_with(
        &go("tok-b"),
        tonic::Code::PermissionDenied,
        "node-b's ztunnel, web on node-a",
    );
    refused_with(
        &go("tok-api"),
        tonic::Code::Unauthenticated,
        "a token for the API server's audience",
    );
    refused_with(
        &go("tok-unknown"),
        tonic::Code::Unauthenticated,
        "a token the API server does not know",
    );
    refused_with(
        &go("tok-stale"),
        tonic::Code::PermissionDenied,
        "a token of a deleted ztunnel pod",
    );

    // web-1 is deleted and recreated on node-b; the issuer's watch sees it.
    api.delete("pods", "shop", "web-1");
    api.put(pod("shop", "web-1", "web", "node-b"));
    eventually(Duration::from_secs(10), || {
        if go("tok-b").is_signed() {
            Ok(())
        } else {
            Err("node-b not allowed yet")
        }
    })
    .unwrap();
    refused_with(
        &go("tok-a"),
        tonic::Code::PermissionDenied,
        "node-a after web moved away",
    );

    // Every review asked for the issuer's audience.
    let reviews: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/tokenreviews"))
        .collect();
    assert!(reviews.len() >= 7, "{} token reviews", reviews.len());
}

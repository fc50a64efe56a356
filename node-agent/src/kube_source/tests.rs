//! The API source's real client against the in-process API server ([`super::fake_api`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_common::manifest::Enrolment;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::*;
use ambient_kube_watch::testing::{eventually, FakeApi};

fn ns(name: &str, ambient: bool) -> Value {
    let mut v = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "creationTimestamp": "2026-11-28T10:00:00Z",
                     "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
    if ambient {
        v["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("ambient");
    }
    v
}

/// A pod as the API server returns it (kubectl get -o json shape, trimmed of nothing the
/// conversion must ignore).
fn pod(ns: &str, name: &str, node: &str, phase: &str, ip: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "creationTimestamp": "2026-11-28T10:00:00Z",
            "labels": {"app": name, "pod-template-hash": "7d4b9c"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-28T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                                 "uid": "0d7c", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": "2026-11-28T10:00:00Z",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "web", "serviceAccount": "web",
            "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80, "protocol": "TCP"}],
                            "resources": {}, "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority", "priority": 0
        },
        "status": {
            "phase": phase, "hostIP": "192.0.2.10", "hostIPs": [{"ip": "192.0.2.10"}],
            "qosClass": "BestEffort", "startTime": "2026-11-28T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-11-28T10:00:05Z"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx:1.27",
                                   "imageID": "sha256:abc", "containerID": "containerd://abc", "started": true,
                                   "state": {"running": {"startedAt": "2026-11-28T10:00:04Z"}},
                                   "lastState": {}}]
        }
    });
    if let Some(ip) = ip {
        v["status"]["podIP"] = json!(ip);
        v["status"]["podIPs"] = json!([{"ip": ip}, {"ip": "fd00::5"}]);
    }
    v
}

fn source(api: &FakeApi, node: &str) -> KubeSource {
    let mut s = KubeSource::new(api.client(), node.to_owned());
    s.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(100),
    };
    s.page_size = 2;
    s.watch_timeout = 30;
    s
}

struct Running {
    rx: watch::Receiver<Arc<Snapshot>>,
    task: tokio::task::JoinHandle<()>,
    /// Every snapshot published, in order.
    seen: Arc<std::sync::Mutex<Vec<Arc<Snapshot>>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(src: KubeSource) -> Running {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut r2 = rx.clone();
    let s2 = seen.clone();
    tokio::spawn(async move {
        while r2.changed().await.is_ok() {
            let s = r2.borrow_and_update().clone();
            s2.lock().unwrap().push(s);
        }
    });
    let task = Box::new(src).run(tx);
    Running { rx, task, seen }
}

impl Running {
    /// Waits (deadline 10 s) for a snapshot satisfying `f`.
    async fn until(&mut self, what: &str, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let s = self.rx.borrow_and_update().clone();
                if f(&s) {
                    return s;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, self.rx.changed()).await.is_err() {
                panic!(
                    "timed out waiting for {what}; last snapshot {:?}",
                    self.rx.borrow()
                );
            }
        }
    }
}

fn ip_of(s: &Snapshot, name: &str) -> Option<String> {
    s.pod("shop", name)
        .and_then(|p| p.ips().first().map(|i| i.to_string()))
}

#[tokio::test]
async fn initial_lists_sync_only_this_nodes_pods_across_pages() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    api.put(ns("kube-system", false));
    api.put(ns("plain", false));
    for i in 0..5 {
        api.put(pod(
            "shop",
            &format!("web-{i}"),
            "n1",
            "Running",
            Some(&format!("10.244.1.{}", 10 + i)),
        ));
    }
    api.put(pod(
        "shop",
        "elsewhere",
        "n2",
        "Running",
        Some("10.244.2.9"),
    ));
    api.put(pod("shop", "done", "n1", "Succeeded", Some("10.244.1.99")));
    let mut r = start(source(&api, "n1"));
    let snap = r.until("synced", |s| s.synced).await;
    assert_eq!(snap.pods.len(), 5, "{:?}", snap.pods.keys());
    assert_eq!(snap.namespaces.len(), 3);
    assert!(snap.pod("shop", "elsewhere").is_none());
    assert!(
        snap.pod("shop", "done").is_none(),
        "terminal pods hold no network"
    );
    let web = snap.pod("shop", "web-0").unwrap();
    assert_eq!(web.service_account(), "web");
    assert_eq!(web.ips().len(), 2);
    assert_eq!(
        snap.decide(
            &ambient_common::agent_api::PodRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: web.metadata.uid.clone(),
            },
            &["kube-system".into()]
        ),
        Some(Enrolment::Ambient)
    );
    // Only the redirection annotation is kept.
    assert!(web.metadata.annotations.is_empty());
    // Every snapshot before the last list completed said synced = false.
    let seen = r.seen.lock().unwrap().clone();
    let first_synced = seen.iter().position(|s| s.synced).unwrap();
    assert!(seen[..first_synced].iter().all(|s| !s.synced));
    assert!(seen.windows(2).all(|w| w[0].generation < w[1].generation));
    // The pod list was paged with the node's field selector.
    let reqs = api.requests();
    let pod_lists: Vec<_> = reqs
        .iter()
        .filter(|q| q.path == "/api/v1/pods" && !q.query.contains_key("watch"))
        .collect();
    assert_eq!(pod_lists.len(), 3, "5 pods in pages of 2");
    assert!(pod_lists
        .iter()
        .all(|q| q.query.get("fieldSelector").map(String::as_str) == Some("spec.nodeName=n1")));
}

#[tokio::test]
async fn pod_lifecycle_terminal_phase_and_ip_reuse() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    let mut r = start(source(&api, "n1"));
    r.until("synced", |s| s.synced).await;

    api.put(pod("shop", "a", "n1", "Pending", None));
    let s = r
        .until("pending pod", |s| s.pod("shop", "a").is_some())
        .await;
    assert!(s.pod("shop", "a").unwrap().ips().is_empty());
    api.put(pod("shop", "a", "n1", "Running", Some("10.244.1.7")));
    r.until("pod IP", |s| ip_of(s, "a").as_deref() == Some("10.244.1.7"))
        .await;

    // The pod completes: it leaves the view, and a new pod gets its IP.
    api.put(pod("shop", "a", "n1", "Succeeded", Some("10.244.1.7")));
    r.until("terminal pod gone", |s| s.pod("shop", "a").is_none())
        .await;
    api.put(pod("shop", "b", "n1", "Running", Some("10.244.1.7")));
    let s = r.until("IP reused", |s| ip_of(s, "b").is_some()).await;
    let holders: Vec<_> = s
        .pods
        .values()
        .filter(|p| p.ips().iter().any(|i| i.to_string() == "10.244.1.7"))
        .collect();
    assert_eq!(holders.len(), 1);
    // The completed pod is deleted later: nothing changes for the new one.
    api.delete("pods", "shop", "a");
    api.delete("pods", "shop", "b");
    r.until("deleted", |s| s.pods.is_empty()).await;
}

#[tokio::test]
async fn namespace_label_flips_re_decide_running_pods() {
    let api = FakeApi::start().await;
    api.put(ns("shop", false));
    api.put(pod("shop", "web", "n1", "Running", Some("10.244.1.5")));
    let mut r = start(source(&api, "n1"));
    let s = r.until("synced", |s| s.synced).await;
    let uid = s.pod("shop", "web").unwrap().metadata.uid.clone();
    let web = ambient_common::agent_api::PodRef {
        namespace: "shop".into(),
        name: "web".into(),
        uid: None,
    };
    let decide = |s: &Snapshot| s.decide(&web, &[]);
    assert_eq!(decide(&s), Some(Enrolment::NotAmbient));
    api.put(ns("shop", true));
    let s = r
        .until("enrolled", |s| decide(s) == Some(Enrolment::Ambient))
        .await;
    assert_eq!(
        s.pod("shop", "web").unwrap().metadata.uid,
        uid,
        "same pod, not restarted"
    );
    api.put(ns("shop", false));
    r.until("released", |s| decide(s) == Some(Enrolment::NotAmbient))
        .await;
    // A deleted namespace leaves its pods undecided (the agent waits) rather than guessing.
    api.delete("namespaces", "", "shop");
    r.until("namespace gone", |s| decide(s).is_none()).await;
}

#[tokio::test]
async fn bookmarks_advance_the_resume_point_and_cuts_reconnect() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    let mut r = start(source(&api, "n1"));
    r.until("synced", |s| s.synced).await;
    let watches = |api: &FakeApi| {
        api.requests()
            .into_iter()
            .filter(|q| {
                q.path == "/api/v1/pods" && q.query.get("watch").map(String::as_str) == Some("true")
            })
            .collect::<Vec<_>>()
    };
    eventually("pod watch open", || !watches(&api).is_empty()).await;
    assert_eq!(
        watches(&api)[0]
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true")
    );
    // Changes to other resources move the version; the bookmark tells the pod watcher.
    api.put(ns("other", false));
    let bm = api.bookmark("pods");
    tokio::time::sleep(Duration::from_millis(50)).await;
    api.cut_watches();
    eventually("pod watch resumed", || watches(&api).len() >= 2).await;
    let resumed = watches(&api)[1].clone();
    assert_eq!(resumed.query.get("resourceVersion"), Some(&bm.to_string()));
    // No relist happened: the cut was resumed, not restarted.
    let lists = api
        .requests()
        .iter()
        .filter(|q| q.path == "/api/v1/pods" && !q.query.contains_key("watch"))
        .count();
    assert_eq!(lists, 1);
    // Events still flow after the reconnect.
    api.put(pod("shop", "late", "n1", "Running", Some("10.244.1.30")));
    r.until("event after reconnect", |s| s.pod("shop", "late").is_some())
        .await;
}

#[tokio::test]
async fn gone_410_relists_and_drops_what_was_deleted_meanwhile() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    api.put(pod("shop", "keep", "n1", "Running", Some("10.244.1.1")));
    api.put(pod("shop", "vanish", "n1", "Running", Some("10.244.1.2")));
    let mut r = start(source(&api, "n1"));
    r.until("synced", |s| s.synced && s.pods.len() == 2).await;

    // While the client is cut off, a pod is deleted and another created, and the history
    // it would resume from is compacted away.
    api.fail_next(503, 4);
    api.cut_watches();
    api.delete("pods", "shop", "vanish");
    api.put(pod("shop", "new", "n1", "Running", Some("10.244.1.3")));
    api.compact();
    let s = r
        .until("relisted", |s| {
            s.pod("shop", "new").is_some() && s.pod("shop", "vanish").is_none()
        })
        .await;
    assert!(s.synced);
    assert!(s.pod("shop", "keep").is_some());
    let relists = api
        .requests()
        .iter()
        .filter(|q| q.path == "/api/v1/pods" && !q.query.contains_key("watch"))
        .count();
    assert!(relists >= 2, "{relists}");
}

#[tokio::test]
async fn server_errors_back_off_and_recover() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    api.put(pod("shop", "web", "n1", "Running", Some("10.244.1.5")));
    api.fail_next(500, 6);
    let mut r = start(source(&api, "n1"));
    let s = r.until("synced despite errors", |s| s.synced).await;
    assert_eq!(s.pods.len(), 1);
    assert!(api.requests().len() >= 8);
}

fn annotation(s: &Snapshot, ns: &str, name: &str) -> Option<String> {
    s.pod(ns, name)
        .and_then(|p| p.metadata.annotations.get(REDIRECTION_ANNOTATION).cloned())
}

/// The annotation reports what this node installed, not what the labels say: a pod of an
/// ambient namespace whose redirection is not installed (yet) carries none, so other nodes
/// do not send it HBONE.
#[tokio::test]
async fn annotates_captured_pods_through_the_status_subresource() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    api.put(pod("shop", "web", "n1", "Running", Some("10.244.1.5")));
    api.put(pod("shop", "api", "n1", "Running", Some("10.244.1.6")));
    let (captured_tx, captured_rx) = watch::channel(HashSet::new());
    let mut src = source(&api, "n1");
    src.annotate = Some(captured_rx);
    let mut r = start(src);
    let s = r.until("synced", |s| s.synced && s.pods.len() == 2).await;
    let uid = s.pod("shop", "web").unwrap().metadata.uid.clone().unwrap();
    captured_tx.send_modify(|c| {
        c.insert(uid.clone());
    });
    let s = r
        .until("annotation echoed", |s| {
            annotation(s, "shop", "web").as_deref() == Some("enabled")
        })
        .await;
    assert_eq!(
        annotation(&s, "shop", "api"),
        None,
        "ambient by labels, not captured"
    );
    // Released on this node (a DEL, an opt-out): the annotation is removed.
    captured_tx.send_modify(|c| {
        c.remove(&uid);
    });
    r.until("annotation removed", |s| {
        s.pod("shop", "web")
            .is_some_and(|p| !p.metadata.annotations.contains_key(REDIRECTION_ANNOTATION))
    })
    .await;
    let patches: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|q| q.method == "PATCH")
        .collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    assert!(patches
        .iter()
        .all(|q| q.path == "/api/v1/namespaces/shop/pods/web/status"));
}

#[tokio::test]
async fn rbac_grants_every_call_the_client_really_made() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    api.put(pod("shop", "web", "n1", "Running", Some("10.244.1.5")));
    let (captured_tx, captured_rx) = watch::channel(HashSet::new());
    let mut src = source(&api, "n1");
    src.annotate = Some(captured_rx);
    let mut r = start(src);
    let s = r.until("synced", |s| s.synced && s.pods.len() == 1).await;
    let uid = s.pod("shop", "web").unwrap().metadata.uid.clone().unwrap();
    captured_tx.send_modify(|c| {
        c.insert(uid);
    });
    r.until("annotated", |s| {
        s.pod("shop", "web")
            .is_some_and(|p| !p.metadata.annotations.is_empty())
    })
    .await;
    api.cut_watches();
    eventually("rewatch", || {
        api.requests()
            .iter()
            .filter(|q| q.query.contains_key("watch"))
            .count()
            >= 4
    })
    .await;

    let rbac = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../install/manifests/rbac.yaml"
    ))
    .unwrap();
    let role: Value = ambient_common::yaml::documents::<Value>(&rbac)
        .unwrap()
        .into_iter()
        .find(|v: &Value| v["kind"] == "ClusterRole" && v["metadata"]["name"] == "ambient-node")
        .expect("ClusterRole ambient-node");
    ambient_kube_watch::testing::check_rbac(&role, API_CALLS, &api.requests());
}

#[tokio::test]
async fn kubeconfig_flag_reaches_the_server() {
    let api = FakeApi::start().await;
    api.put(ns("shop", true));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    api.write_kubeconfig(&path);
    let c = client(Some(&path)).await.unwrap();
    let mut r = start(KubeSource::new(c, "n1".into()));
    r.until("synced through kubeconfig", |s| {
        s.synced && s.namespaces.contains_key("shop")
    })
    .await;
    let err = client(Some(&dir.path().join("missing")))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn conversion_keeps_exactly_the_needed_fields() {
    let v = pod("shop", "web", "n1", "Running", Some("10.244.1.5"));
    let k: k8s::Pod = serde_json::from_value(v).unwrap();
    let p = convert_pod(&k);
    assert_eq!(p.metadata.name, "web");
    assert_eq!(p.namespace(), "shop");
    assert_eq!(
        p.metadata.labels.get("app").map(String::as_str),
        Some("web")
    );
    assert!(p.metadata.annotations.is_empty());
    assert_eq!(p.spec.node_name.as_deref(), Some("n1"));
    assert_eq!(p.service_account(), "web");
    assert!(!p.spec.host_network);
    assert_eq!(p.status.phase.as_deref(), Some("Running"));
    assert_eq!(p.status.host_ip.as_deref(), Some("192.0.2.10"));
    assert_eq!(p.ips().len(), 2);
    let n: k8s::Namespace = serde_json::from_value(ns("shop", true)).unwrap();
    let n = convert_namespace(&n);
    assert_eq!(n.metadata.label("istio.io/dataplane-mode"), Some("ambient"));
}

/// The in-cluster shape: HTTPS verified against a CA file, a bearer token from a file (what
/// the service account mount provides), through a kubeconfig that points at both.
#[tokio::test]
async fn https_with_a_ca_and_a_token_file() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio_rustls::rustls;

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    let api = FakeApi::start_with(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;
    api.put(ns("shop", true));
    api.put(pod("shop", "web", "n1", "Running", Some("10.244.1.5")));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("token"), "sa-token-123").unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{}\n    certificate-authority: {}\n\
             contexts:\n- name: x\n  context:\n    cluster: c\n    user: u\ncurrent-context: x\n\
             users:\n- name: u\n  user:\n    tokenFile: {}\n",
            api.addr,
            dir.path().join("ca.crt").display(),
            dir.path().join("token").display()
        ),
    )
    .unwrap();
    let mut r = start(KubeSource::new(
        client(Some(&kc)).await.unwrap(),
        "n1".into(),
    ));
    r.until("synced over TLS", |s| {
        s.synced && s.pod("shop", "web").is_some()
    })
    .await;
    let reqs = api.requests();
    assert!(!reqs.is_empty());
    assert!(reqs
        .iter()
        .all(|q| q.authorization.as_deref() == Some("Bearer sa-token-123")));
}

//! The API source's real client against the in-process API server
//! (`ambient_kube_watch::testing::FakeApi`).

use ambient_kube_watch::testing::{eventually, FakeApi, Request};
use serde_json::json;

use super::*;
use crate::store::ManifestState;

fn ns(name: &str, ambient: bool) -> Value {
    let mut v = json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name},
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
    if ambient {
        v["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("ambient");
    }
    v
}

/// A pod as the API server returns it (kubectl get -o json shape).
fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"),
            "creationTimestamp": "2026-11-28T10:00:00Z",
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
            "phase": "Running", "hostIP": "192.0.2.10", "hostIPs": [{"ip": "192.0.2.10"}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "qosClass": "BestEffort", "startTime": "2026-11-28T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-11-28T10:00:05Z"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0, "image": "nginx:1.27",
                                   "imageID": "sha256:abc", "containerID": "containerd://abc", "started": true,
                                   "state": {"running": {"startedAt": "2026-11-28T10:00:04Z"}},
                                   "lastState": {}}]
        }
    })
}

fn service(ns: &str, name: &str, vip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "annotations": {"a": "b"}},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                 "type": "ClusterIP", "sessionAffinity": "None"},
        "status": {"loadBalancer": {}}})
}

fn slice(ns: &str, svc: &str, name: &str, ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true},
                                                  "nodeName": "n2", "targetRef": {"kind": "Pod", "name": "x"}})).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn deny_policy(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}})
}

fn strict(ns: &str) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": ns}, "spec": {"mtls": {"mode": "STRICT"}}})
}

fn fixture() -> Vec<Value> {
    vec![
        ns("shop", true),
        ns("legacy", false),
        ns("kube-system", false),
        pod("shop", "web-1", "n2", "10.2.0.5"),
        pod("shop", "web-2", "n1", "10.1.0.5"),
        pod("legacy", "old-1", "n2", "10.2.0.6"),
        service("shop", "web", "10.96.0.10"),
        slice("shop", "web", "web-abc", &["10.2.0.5", "10.1.0.5"]),
        deny_policy("shop", "deny-legacy"),
        strict("shop"),
    ]
}

struct Running {
    store: Arc<Store>,
    synced: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn source(api: &FakeApi) -> KubeSource {
    let mut s = KubeSource::new(api.client(), vec!["kube-system".into()]);
    s.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(100),
    };
    s.page_size = 2;
    s.watch_timeout = 30;
    s.crd_retry = Duration::from_millis(50);
    s
}

fn start(src: KubeSource) -> Running {
    let store = Store::new("n1", "cluster.local");
    let synced = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(src.run(store.clone(), || {}, synced.clone()));
    Running {
        store,
        synced,
        task,
    }
}

impl Running {
    async fn until(&self, what: &str, f: impl Fn(&ManifestState) -> bool) -> ManifestState {
        eventually(what, || {
            self.synced.load(Ordering::Acquire) && f(&self.store.manifest_state())
        })
        .await;
        self.store.manifest_state()
    }
}

fn ambient(m: &ManifestState, name: &str) -> Option<bool> {
    m.workloads
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.ambient)
}

fn list_requests(api: &FakeApi, path: &str) -> usize {
    api.requests()
        .iter()
        .filter(|q| q.path == path && !q.query.contains_key("watch"))
        .count()
}

#[tokio::test]
async fn initial_sync_builds_the_same_state_as_the_directory() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let r = start(source(&api));
    let from_api = r.until("synced", |_| true).await;

    let dir = tempfile::tempdir().unwrap();
    let text: Vec<String> = fixture().iter().map(|o| o.to_string()).collect();
    std::fs::write(dir.path().join("all.yaml"), text.join("\n---\n")).unwrap();
    let mut objs = ambient_common::manifest::load_dir(dir.path()).unwrap();
    canonical_order(&mut objs);
    let from_dir = parse_manifests(&objs, &["kube-system".into()]).unwrap();
    assert_eq!(from_api, from_dir);
    assert_eq!(from_api.workloads.len(), 3);
    assert_eq!(ambient(&from_api, "web-1"), Some(true));
    assert_eq!(ambient(&from_api, "old-1"), Some(false));
    assert_eq!(from_api.policies.len(), 1);
    assert_eq!(from_api.peer_auth.len(), 1);
    // Paged lists (3 pods in pages of 2).
    assert_eq!(list_requests(&api, "/api/v1/pods"), 2);
}

#[tokio::test]
async fn not_synced_until_every_kind_listed() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    // Every request fails for a while: nothing is published meanwhile.
    api.fail_next(503, 12);
    let r = start(source(&api));
    tokio::time::sleep(Duration::from_millis(20)).await;
    if !r.synced.load(Ordering::Acquire) {
        assert_eq!(r.store.manifest_state(), ManifestState::default());
    }
    r.until("synced after errors", |m| m.workloads.len() == 3)
        .await;
}

#[tokio::test]
async fn added_modified_deleted_flow_into_the_store() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let r = start(source(&api));
    r.until("synced", |_| true).await;

    // ADDED.
    api.put(pod("legacy", "old-2", "n3", "10.3.0.6"));
    r.until("added", |m| ambient(m, "old-2") == Some(false))
        .await;
    // MODIFIED: the namespace label flip makes remote pods ambient (outbound then uses HBONE).
    api.put(ns("legacy", true));
    let m = r
        .until("enrolled", |m| ambient(m, "old-1") == Some(true))
        .await;
    assert_eq!(ambient(&m, "old-2"), Some(true));
    let st = r.store.snapshot();
    assert!(st.workload("10.2.0.6".parse().unwrap()).unwrap().ambient);
    // MODIFIED: an EndpointSlice update changes what the service picks.
    api.put(slice("shop", "web", "web-abc", &["10.2.0.9"]));
    r.until("endpoints", |m| {
        m.services[0].pick(80) == Some("10.2.0.9:8080".parse().unwrap())
    })
    .await;
    // DELETED.
    api.delete("pods", "legacy", "old-2");
    api.delete("authorizationpolicies", "shop", "deny-legacy");
    r.until("deleted", |m| {
        ambient(m, "old-2").is_none() && m.policies.is_empty()
    })
    .await;
    // A pod completing leaves (its IP may be reused).
    let mut done = pod("shop", "web-1", "n2", "10.2.0.5");
    done["status"]["phase"] = json!("Succeeded");
    api.put(done);
    r.until("terminal", |m| ambient(m, "web-1").is_none()).await;
}

#[tokio::test]
async fn bookmark_advances_the_resume_point() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let r = start(source(&api));
    r.until("synced", |_| true).await;
    let watches = |api: &FakeApi| -> Vec<Request> {
        api.requests()
            .into_iter()
            .filter(|q| {
                q.path == "/api/v1/services"
                    && q.query.get("watch").map(String::as_str) == Some("true")
            })
            .collect()
    };
    eventually("service watch open", || !watches(&api).is_empty()).await;
    api.put(ns("other", false));
    let bm = api.bookmark("services");
    tokio::time::sleep(Duration::from_millis(50)).await;
    api.cut_watches();
    eventually("service watch resumed", || watches(&api).len() >= 2).await;
    assert_eq!(
        watches(&api)[1].query.get("resourceVersion"),
        Some(&bm.to_string())
    );
    assert_eq!(
        list_requests(&api, "/api/v1/services"),
        1,
        "resumed, not relisted"
    );
    api.put(service("shop", "late", "10.96.0.20"));
    r.until("event after reconnect", |m| m.services.len() == 2)
        .await;
}

#[tokio::test]
async fn gone_410_relists_and_drops_what_was_deleted_meanwhile() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let r = start(source(&api));
    r.until("synced", |_| true).await;
    // The history the watches would resume from is compacted; every watch is cut and the
    // reconnections fail; only then (the old streams are surely gone) a pod is deleted
    // and another created.
    api.compact();
    let before = api.requests().len();
    api.fail_next(503, WATCHED.len());
    api.cut_watches();
    eventually("reconnections failed", || {
        api.requests().len() >= before + WATCHED.len()
    })
    .await;
    api.delete("pods", "shop", "web-2");
    api.put(pod("shop", "web-3", "n1", "10.1.0.7"));
    r.until("relisted", |m| {
        ambient(m, "web-2").is_none() && ambient(m, "web-3") == Some(true)
    })
    .await;
    assert!(list_requests(&api, "/api/v1/pods") >= 3);
}

#[tokio::test]
async fn absent_crds_mean_no_policies_and_a_policy_appearing_later_applies() {
    let api = FakeApi::start().await;
    api.set_served("authorizationpolicies", false);
    api.set_served("peerauthentications", false);
    for o in fixture().into_iter().take(8) {
        api.put(o);
    }
    let r = start(source(&api));
    let m = r.until("synced without CRDs", |_| true).await;
    assert!(m.policies.is_empty() && m.peer_auth.is_empty());
    assert_eq!(m.workloads.len(), 3);
    // Istio's CRDs are installed later, then a policy is created.
    api.set_served("authorizationpolicies", true);
    api.set_served("peerauthentications", true);
    eventually("CRD watched", || {
        api.requests().iter().any(|q| {
            q.path == "/apis/security.istio.io/v1/authorizationpolicies"
                && q.query.contains_key("watch")
        })
    })
    .await;
    api.put(deny_policy("shop", "deny-legacy"));
    api.put(strict("shop"));
    r.until("policy applied", |m| {
        m.policies.len() == 1 && m.peer_auth.len() == 1
    })
    .await;
}

/// Attack 8: an object ztunnel cannot apply as written (an AUDIT or CUSTOM
/// AuthorizationPolicy, a PeerAuthentication with an unknown mode) is set aside alone: a
/// ztunnel starting with it present syncs (becomes ready), later pods and policies flow.
#[tokio::test]
async fn a_bad_object_is_set_aside_alone_and_later_changes_flow() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let mut audit = deny_policy("shop", "audit-all");
    audit["spec"] = json!({"action": "AUDIT", "rules": [{}]});
    api.put(audit);
    let mut custom = deny_policy("shop", "ext-authz");
    custom["spec"] = json!({"action": "CUSTOM", "provider": {"name": "opa"},
        "selector": {"matchLabels": {"app": "admin"}}, "rules": [{}]});
    api.put(custom);
    let r = start(source(&api));
    let m = r
        .until("synced with the bad policies present", |_| true)
        .await;
    assert_eq!(m.rejected.len(), 2, "{:?}", m.rejected);
    let mut bad = strict("legacy");
    bad["spec"]["mtls"]["mode"] = json!("SOMETIMES");
    api.put(bad);
    api.put(pod("shop", "web-9", "n1", "10.1.0.9"));
    api.put(deny_policy("shop", "deny-later"));
    let m = r
        .until("later changes applied", |m| {
            ambient(m, "web-9") == Some(true) && m.policies.iter().any(|p| p.name == "deny-later")
        })
        .await;
    assert_eq!(m.rejected.len(), 3, "{:?}", m.rejected);
    let custom = m.policies.iter().find(|p| p.name == "ext-authz").unwrap();
    assert_eq!(
        custom.fallback,
        Some(crate::policy::Fallback::DenySelection)
    );
    assert!(m.policies.iter().all(|p| p.name != "audit-all"));
    assert_eq!(
        r.store.snapshot().mtls_mode(
            "legacy",
            "istio-system",
            crate::config::MtlsMode::Permissive
        ),
        crate::config::MtlsMode::Strict
    );
}

#[tokio::test]
async fn rbac_grants_every_call_the_client_really_made_and_nothing_more() {
    let api = FakeApi::start().await;
    for o in fixture() {
        api.put(o);
    }
    let r = start(source(&api));
    r.until("synced", |_| true).await;
    eventually("every watch open", || {
        api.requests()
            .iter()
            .filter(|q| q.query.contains_key("watch"))
            .count()
            >= WATCHED.len()
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
        .find(|v: &Value| v["kind"] == "ClusterRole" && v["metadata"]["name"] == "ztunnel")
        .expect("ClusterRole ztunnel");
    ambient_kube_watch::testing::check_rbac(&role, &api_calls(), &api.requests());
}

#[test]
fn wrap_tags_follow_watched_order() {
    for (w, wrap) in WATCHED.iter().zip(WRAP) {
        assert_eq!(wrap(Change::Relisted(vec![])).kind, w.kind);
    }
}

#[test]
fn kept_fields_are_only_the_needed_ones() {
    let o: DynamicObject = serde_json::from_value(pod("shop", "web", "n1", "10.1.0.5")).unwrap();
    let Kept::Pod(p) = keep_pod(&o) else {
        panic!("not a pod")
    };
    assert_eq!(p.metadata.name, "web");
    assert_eq!(p.spec.node_name.as_deref(), Some("n1"));
    assert_eq!(p.service_account(), "web");
    assert!(p.metadata.annotations.is_empty());
    assert_eq!(p.ips().len(), 1);
    // Of the annotations, only the node agent's capture report is kept.
    let mut v = pod("shop", "web", "n1", "10.1.0.5");
    v["metadata"]["annotations"] = json!({
        "ambient.istio.io/redirection": "enabled",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
    });
    let o: DynamicObject = serde_json::from_value(v).unwrap();
    let Kept::Pod(p) = keep_pod(&o) else {
        panic!("not a pod")
    };
    assert_eq!(
        p.metadata.annotations.into_iter().collect::<Vec<_>>(),
        [(
            "ambient.istio.io/redirection".to_string(),
            "enabled".to_string()
        )]
    );
    let o: DynamicObject =
        serde_json::from_value(slice("shop", "web", "w", &["10.1.0.5"])).unwrap();
    let Kept::Other(kind, v) = keep_slice(&o) else {
        panic!("not other")
    };
    assert_eq!(kind, "EndpointSlice");
    assert_eq!(
        v["endpoints"],
        json!([{"addresses": ["10.1.0.5"], "conditions": {"ready": true}}])
    );
    assert!(v.get("addressType").is_none());
    let o: DynamicObject = serde_json::from_value(service("shop", "web", "10.96.0.1")).unwrap();
    let Kept::Other(_, v) = keep_other(&o, "Service", &["spec"]) else {
        panic!("not other")
    };
    assert!(v.get("status").is_none());
    assert!(v["metadata"].get("annotations").is_none());
}

//! Memory of the Kubernetes API source for a large cluster: 10,000 pods (the shape
//! `kubectl get pod -o json` returns, ~1.7 KiB of JSON each) in 50 namespaces, 1,000 Services
//! and EndpointSlices, synced through the real client from the in-process API server. A
//! counting allocator gives the live heap: after the sync, the fake server's copy is dropped,
//! so what stays is ztunnel's (the trimmed cache, the parsed state, the store's indexes,
//! the client). Also prints the sync time and the cost of one update (a burst = a rebuild).
//!
//!     cargo bench -p ztunnel --bench kube_store
//!     ZT_BENCH_PODS=50000 cargo bench -p ztunnel --bench kube_store
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambient_kube_watch::testing::FakeApi;
use serde_json::{json, Value};
use ztunnel::store::kube::KubeSource;
use ztunnel::store::Store;

/// The system allocator, counting live and peak bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so
// `System`'s guarantees hold; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is (the caller upholds alloc's contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is (ptr came from this allocator with this layout).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is (the caller upholds realloc's contract).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(b: usize) -> f64 {
    b as f64 / 1048576.0
}

fn pod(i: usize) -> Value {
    let ns = format!("ns-{}", i % 50);
    let name = format!("web-{i}-7d4b9c-x{:04}", i % 9973);
    let ip = format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": format!("6f1c2a9e-0000-4000-8000-{i:012}"),
            "creationTimestamp": "2026-11-28T10:00:00Z", "resourceVersion": "1",
            "generateName": "web-7d4b9c-",
            "labels": {"app": format!("web-{}", i % 1000), "pod-template-hash": "7d4b9c",
                       "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-28T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                                 "uid": "0d7c", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                               "apiVersion": "v1", "time": "2026-11-28T10:00:00Z",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
        },
        "spec": {
            "nodeName": format!("node-{}", i % 200), "serviceAccountName": "web", "serviceAccount": "web",
            "containers": [{"name": "web", "image": "registry.example/web:1.27.3",
                            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                            "terminationMessagePath": "/dev/termination-log",
                            "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "enableServiceLinks": true, "preemptionPolicy": "PreemptLowerPriority", "priority": 0
        },
        "status": {
            "phase": "Running", "hostIP": "192.0.2.10", "hostIPs": [{"ip": "192.0.2.10"}],
            "podIP": ip, "podIPs": [{"ip": ip}],
            "qosClass": "Burstable", "startTime": "2026-11-28T10:00:00Z",
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null,
                            "lastTransitionTime": "2026-11-28T10:00:05Z"}],
            "containerStatuses": [{"name": "web", "ready": true, "restartCount": 0,
                                   "image": "registry.example/web:1.27.3",
                                   "imageID": "sha256:4e5b6c", "containerID": "containerd://9a8b7c",
                                   "started": true,
                                   "state": {"running": {"startedAt": "2026-11-28T10:00:04Z"}},
                                   "lastState": {}}]
        }
    })
}

fn service(i: usize) -> Value {
    let ns = format!("ns-{}", i % 50);
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("web-{i}"), "namespace": ns},
        "spec": {"clusterIP": format!("10.96.{}.{}", i / 256, i % 256),
                 "selector": {"app": format!("web-{i}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(i: usize, pods: usize) -> Value {
    let ns = format!("ns-{}", i % 50);
    // The pods labelled app=web-<i>: every 1000th starting at i, in the same namespace
    // only when 1000 is a multiple of 50 (it is).
    let eps: Vec<Value> = (i..pods)
        .step_by(1000)
        .map(|p| {
            let ip = format!("10.{}.{}.{}", 64 + p / 65536, (p / 256) % 256, p % 256);
            json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": format!("node-{}", p % 200),
                   "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("web-{p}")}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("web-{i}-abcde"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": format!("web-{i}")}},
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

async fn wait(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn main() {
    let pods: usize = std::env::var("ZT_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let base = LIVE.load(Ordering::Relaxed);
        let api = FakeApi::start().await;
        let mut json_bytes = 0usize;
        for n in 0..50 {
            api.put(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": format!("ns-{n}"),
                             "labels": {"istio.io/dataplane-mode": "ambient"}}}));
        }
        for i in 0..pods {
            let p = pod(i);
            json_bytes += serde_json::to_vec(&p).map(|v| v.len()).unwrap_or(0);
            api.put(p);
        }
        let services = (pods / 10).max(1);
        for i in 0..services {
            api.put(service(i));
            api.put(slice(i, pods));
        }
        let with_fake = LIVE.load(Ordering::Relaxed);

        let store = Store::new("node-0", "cluster.local");
        let synced = Arc::new(AtomicBool::new(false));
        let mut src = KubeSource::new(api.client(), vec!["kube-system".into()]);
        src.crd_retry = Duration::from_secs(3600);
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let t = Instant::now();
        let task = tokio::spawn(src.run(store.clone(), || {}, synced.clone()));
        wait("sync", || {
            synced.load(Ordering::Acquire) && store.snapshot().workloads().count() >= pods
        })
        .await;
        let sync = t.elapsed();
        let peak = PEAK.load(Ordering::Relaxed);

        // One more pod: one burst, one rebuild of the whole state.
        let t = Instant::now();
        api.put(pod(pods));
        wait("update", || store.snapshot().workloads().count() == pods + 1).await;
        let update = t.elapsed();

        // A stream of 500 new pods, 1 ms apart: batched rebuilds, not one per event.
        let t = Instant::now();
        for i in 0..500 {
            api.put(pod(pods + 1 + i));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent = t.elapsed();
        wait("stream", || store.snapshot().workloads().count() == pods + 501).await;
        let stream = t.elapsed();

        // The node agent's push of one local pod (what a plugin ADD waits for, besides the
        // certificate), with 500 local pods already pushed: one store rebuild each.
        let local = |i: usize| ambient_common::ztunnel_api::LocalWorkload {
            uid: format!("local-{i}"),
            namespace: "ns-0".into(),
            name: format!("local-{i}"),
            service_account: "default".into(),
            node: "node-0".into(),
            ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                10,
                250,
                (i / 250) as u8,
                (i % 250) as u8 + 1,
            ))],
        };
        for i in 0..500 {
            store.agent_add(&local(i));
        }
        let mut pushes = Vec::new();
        for i in 500..600 {
            let t = Instant::now();
            store.agent_add(&local(i));
            pushes.push(t.elapsed());
        }
        pushes.sort();

        // Drop the fake server's copy and history; what stays is ztunnel's.
        api.clear();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kept = LIVE.load(Ordering::Relaxed).saturating_sub(base);
        let state = store.snapshot();
        println!("kube source, {pods} pods, {services} services + slices, 50 namespaces:");
        println!("  pod JSON as served         {:>8.1} MiB ({} B/pod)", mib(json_bytes), json_bytes / pods);
        println!("  fake server heap           {:>8.1} MiB (not ztunnel's)", mib(with_fake - base));
        println!("  initial sync               {:>8.2?}", sync);
        println!("  one update (burst rebuild) {:>8.2?}", update);
        println!(
            "  500 pod events over {:.2?}  all visible after {:.2?}",
            sent, stream
        );
        println!(
            "  agent push of one local pod (500 local)  p50 {:.2?}  p99 {:.2?}",
            pushes[pushes.len() / 2],
            pushes[pushes.len() * 99 / 100]
        );
        println!("  peak heap during sync      {:>8.1} MiB (includes the fake server's copy and its list pages)", mib(peak - base));
        println!(
            "  ztunnel's heap after sync  {:>8.1} MiB ({} B/pod; cache + parsed state + store indexes + client)",
            mib(kept),
            kept / pods
        );
        // Stop the source: its cache and client go; the store's state stays.
        task.abort();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let store_only = LIVE.load(Ordering::Relaxed).saturating_sub(base);
        println!(
            "    of which the source's cache + client {:>6.1} MiB, the store (parsed state + indexes) {:>6.1} MiB",
            mib(kept.saturating_sub(store_only)),
            mib(store_only)
        );
        println!("  workloads {} services {}", state.workloads().count(), state.services().len());
    });
}

//! The reflector against the in-process API server: an optional resource (a CRD) absent,
//! then installed, then removed.

use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::testing::FakeApi;
use super::*;

fn name(o: &DynamicObject) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

fn policy(name: &str) -> serde_json::Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"}, "spec": {}})
}

async fn next(rx: &mut mpsc::Receiver<Change<String>>) -> Change<String> {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a change within 10 s")
        .expect("reflector running")
}

#[tokio::test]
async fn absent_resource_is_empty_and_picked_up_when_installed() {
    let api = FakeApi::start().await;
    api.set_served("authorizationpolicies", false);
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
    ));
    let mut r = Reflector::new(
        kube::Api::<DynamicObject>::all_with(api.client(), &ar),
        "authorizationpolicies",
        name,
        |c| c,
    );
    r.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(50),
    };
    r.absent_retry = Some(Duration::from_millis(20));
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(r.run(tx));
    assert_eq!(next(&mut rx).await, Change::Relisted(vec![]));
    // Installed later, with a policy: a relist carries it, then watch events flow.
    api.put(policy("a"));
    api.set_served("authorizationpolicies", true);
    assert_eq!(next(&mut rx).await, Change::Relisted(vec!["a".into()]));
    api.put(policy("b"));
    assert_eq!(next(&mut rx).await, Change::Applied("b".into()));
    // Removed again: an empty view (once), not an error loop.
    api.set_served("authorizationpolicies", false);
    assert_eq!(next(&mut rx).await, Change::Relisted(vec![]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "nothing more while absent");
    task.abort();
}

#[tokio::test]
async fn a_404_without_absent_retry_is_an_error_with_backoff() {
    let api = FakeApi::start().await;
    api.set_served("peerauthentications", false);
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "security.istio.io",
        "v1",
        "PeerAuthentication",
    ));
    let mut r = Reflector::new(
        kube::Api::<DynamicObject>::all_with(api.client(), &ar),
        "peerauthentications",
        name,
        |c| c,
    );
    r.backoff = Backoff {
        initial: Duration::from_millis(5),
        max: Duration::from_millis(10),
    };
    let (tx, mut rx) = mpsc::channel(16);
    let task = tokio::spawn(r.run(tx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "no view from failed lists");
    assert!(api.requests().len() >= 3, "retried");
    task.abort();
}

#[test]
fn backoff_doubles_up_to_the_cap_and_resets() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut b = BackoffState::new(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(3),
        });
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(b.next_delay());
            b.wait().await;
        }
        assert_eq!(seen, [1, 2, 3, 3].map(Duration::from_millis).to_vec());
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(1));
    });
}

#[test]
fn backoff_waits_are_spread_over_the_upper_half() {
    let d = Duration::from_millis(200);
    assert_eq!(jittered(d, 0.0), Duration::from_millis(100));
    assert_eq!(jittered(d, 0.5), Duration::from_millis(150));
    assert_eq!(jittered(d, 0.999_999), Duration::from_nanos(199_999_900));
    // Two nodes (two draws) almost never wait the same time: out of 1000 draws, the
    // waits fall in at least 900 distinct microseconds of the 100 ms window.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        let f = random_fraction();
        assert!((0.0..1.0).contains(&f), "{f}");
        seen.insert(jittered(d, f).as_micros());
    }
    assert!(seen.len() > 900, "{}", seen.len());
}

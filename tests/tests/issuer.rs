//! The certificate issuer with the real binaries: `ambient-issuer` in the lab's underlay
//! namespace (the control plane's place), each node with its own credential, certificate
//! requests sent over TLS exactly as a node proxy sends them. A node gets certificates only
//! for its own pods; tokens of other service accounts, expired tokens and tokens for another
//! audience get nothing; a pod that moves is signable only on its new node.
//!
//! Each test owns a cluster in 10.<octet>.0.0/16, octets 191-199. Run as root after
//! `cargo build --workspace`.

use std::time::Duration;

use ambient_tests::cluster::{test_cluster, test_pod, Cluster, CA_TOKEN_FILE};
use ambient_tests::cni::Attach;
use ambient_tests::issuer::{uri_sans, Answer, Ask};
use ambient_tests::manifests;
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
    }
}

fn refused_with(a: &Answer, code: tonic::Code, what: &str) {
    assert_eq!(a.code(), Some(code), "{what}: {a:?}");
}

#[test]
fn a_node_gets_certificates_only_for_its_own_pods() {
    let mut c = test_cluster("is-own", 191, Attach::Bridge);
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
    let mut c = test_cluster("is-tok", 192, Attach::Ptp);
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
    let c = test_cluster("is-mv", 193, Attach::Bridge);
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

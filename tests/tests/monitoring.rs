//! The shipped Grafana dashboard (`install/manifests/monitoring/ztunnel-dashboard.json`)
//! against a real scrape: after traffic between ambient pods (through a Service and pod to
//! pod, across nodes), every metric the dashboard queries is exported by ztunnel and every
//! label it selects or groups by is on that metric (or is one Prometheus adds to each
//! target). A dashboard whose queries name a label ztunnel does not emit shows empty panels.
//!
//! One cluster in a leased `10.<octet>.0.0/16` (`ambient_tests::addrs`). Run as root after `cargo build --workspace`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use ambient_tests::cluster::{metric_samples, test_cluster, test_pod_labelled};
use ambient_tests::cni::Attach;
use ambient_tests::eventually;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../install/manifests/monitoring/ztunnel-dashboard.json"
);

/// Labels Prometheus adds to every sample of a target (kubernetes_sd and the operator's
/// PodMonitor relabelling), not ztunnel.
const TARGET_LABELS: [&str; 6] = ["instance", "job", "namespace", "pod", "container", "node"];

/// Every PromQL expression of the dashboard: panel targets and template queries.
fn queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    out
}

/// Metric names in an expression (`istio_*`, `process_*`).
fn metrics_of(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("istio_") || rest.starts_with("process_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

/// Label names an expression selects on (`{name=...}`), groups by (`by (...)`), or asks the
/// values of (`label_values(..., name)`).
fn labels_of(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let close = open + rest[open..].find('}').expect("unclosed selector");
        let mut quoted = false;
        let mut item = String::new();
        let mut items = Vec::new();
        for c in rest[open + 1..close].chars() {
            match c {
                '"' => quoted = !quoted,
                ',' if !quoted => items.push(std::mem::take(&mut item)),
                _ if !quoted => item.push(c),
                _ => {}
            }
        }
        items.push(item);
        for it in items {
            let name = it.split(['=', '!', '~']).next().unwrap_or("").trim();
            if !name.is_empty() {
                out.insert(name.to_owned());
            }
        }
        rest = &rest[close + 1..];
    }
    for key in ["by (", "by(", "without (", "without("] {
        let mut rest = expr;
        while let Some(at) = rest.find(key) {
            let after = &rest[at + key.len()..];
            let end = after.find(')').expect("unclosed by");
            out.extend(
                after[..end]
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .filter(|l| !l.is_empty()),
            );
            rest = &after[end..];
        }
    }
    if let Some(args) = expr.strip_prefix("label_values(") {
        let label = args
            .trim_end_matches(')')
            .rsplit(',')
            .next()
            .unwrap()
            .trim();
        out.insert(label.to_owned());
    }
    out
}

#[test]
fn the_expression_parser_finds_metrics_and_labels() {
    let e = r#"sum by (a, b) (rate(istio_x_total{reporter="source", c=~"$ns", d!="x,y"}[5m])) / process_y"#;
    assert_eq!(
        metrics_of(e),
        BTreeSet::from(["istio_x_total".to_owned(), "process_y".to_owned()])
    );
    assert_eq!(
        labels_of(e),
        ["a", "b", "c", "d", "reporter"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    assert_eq!(
        labels_of(r#"label_values(istio_m{r="d"}, destination_workload)"#),
        ["destination_workload", "r"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}

#[test]
fn every_metric_and_label_the_dashboard_queries_is_in_a_scrape_after_traffic() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let exprs = queries(&dashboard);
    assert!(exprs.len() >= 10, "{exprs:?}");

    let mut c = test_cluster("mon", Attach::Bridge);
    let labels = [("app", "shop"), ("version", "v1")];
    let client = test_pod_labelled(&mut c, 0, "ambient-demo", "client", &labels);
    let web = test_pod_labelled(&mut c, 1, "ambient-demo", "web", &[("app", "web")]);
    let svc = c
        .add_service("ambient-demo", "web", 20, 80, &[web])
        .unwrap();
    c.wait_converged(Duration::from_secs(15)).unwrap();
    c.wait_services(Duration::from_secs(15)).unwrap();
    let vip = SocketAddr::from((svc.vip, svc.port));
    for i in 0..3 {
        c.connect(client, vip, &format!("via-service-{i}")).unwrap();
        c.connect(client, c.pods[web].echo_addr(), &format!("direct-{i}"))
            .unwrap();
    }
    // Both nodes' scrapes, once each has reported the traffic.
    let scrapes: Vec<String> = eventually(Duration::from_secs(10), || {
        let s: Vec<String> = c.nodes.iter().map(|n| n.metrics().unwrap()).collect();
        let closed = |t: &String| {
            metric_samples(t, "istio_tcp_connections_closed_total")
                .iter()
                .map(|(_, v)| v)
                .sum::<f64>()
        };
        if s.iter().all(|t| closed(t) >= 6.0) {
            Ok(s)
        } else {
            Err("connections not all reported yet")
        }
    })
    .unwrap();

    let mut failures = Vec::new();
    for expr in &exprs {
        let wanted = labels_of(expr);
        for m in metrics_of(expr) {
            let samples: Vec<BTreeMap<String, String>> = scrapes
                .iter()
                .flat_map(|t| metric_samples(t, &m))
                .map(|(l, _)| l)
                .collect();
            if samples.is_empty() {
                failures.push(format!("{m}: not exported (in `{expr}`)"));
                continue;
            }
            for l in &wanted {
                if TARGET_LABELS.contains(&l.as_str()) {
                    continue;
                }
                if !samples.iter().any(|s| s.contains_key(l)) {
                    failures.push(format!("{m}: no label {l} (in `{expr}`)"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The values dashboards group by: the service called, both workloads' canonical names
    // and the cluster, as Istio fills them.
    let opened: Vec<BTreeMap<String, String>> =
        metric_samples(&scrapes[0], "istio_tcp_connections_opened_total")
            .into_iter()
            .map(|(l, _)| l)
            .filter(|l| l["reporter"] == "source" && l["destination_service_name"] == "web")
            .collect();
    let l = opened
        .first()
        .unwrap_or_else(|| panic!("no source-side sample for the service: {}", scrapes[0]));
    for (k, v) in [
        ("destination_service_namespace", "ambient-demo"),
        ("source_canonical_service", "shop"),
        ("source_app", "shop"),
        ("source_canonical_revision", "v1"),
        ("source_version", "v1"),
        ("source_workload", "client"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "latest"),
        ("source_cluster", "Kubernetes"),
        ("destination_cluster", "Kubernetes"),
        ("connection_security_policy", "mutual_tls"),
    ] {
        assert_eq!(l[k], v, "{k} in {l:?}");
    }
}

//! The Helm chart (`install/chart`) against the kustomization (`install/manifests`), rendered
//! by a real Helm (`helm template`) and a real kustomize (`kubectl kustomize`): with default
//! values both give the same objects, and every value reaches the objects it names.
//! `scripts/setup.sh` installs both tools.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/chart");
const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");
const NAMESPACE: &str = "ambient-system";

/// Kinds without a namespace. kubectl's kustomize stamps one on cluster-scoped kinds its
/// schema does not know (ValidatingAdmissionPolicy and its binding); the API server ignores
/// it on those, so the comparison does too.
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}); scripts/setup.sh installs it"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `helm template` with `args` (`--set ...`), in `namespace`.
fn helm(namespace: &str, args: &[&str]) -> Result<String, String> {
    run(
        Command::new("helm")
            .args(["template", "ambient", CHART, "--namespace", namespace])
            .args(args),
        "helm",
    )
}

/// The objects of a multi-document YAML stream, by (kind, namespace, name).
fn objects(yaml: &str) -> BTreeMap<(String, String, String), Value> {
    let mut out = BTreeMap::new();
    for mut v in ambient_common::yaml::documents::<Value>(yaml).unwrap() {
        let kind = v["kind"].as_str().unwrap().to_owned();
        if CLUSTER_SCOPED.contains(&kind.as_str()) {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("namespace");
            }
        }
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let name = v["metadata"]["name"].as_str().unwrap().to_owned();
        assert!(
            out.insert((kind.clone(), ns, name.clone()), v).is_none(),
            "{kind} {name} twice"
        );
    }
    out
}

fn chart(args: &[&str]) -> BTreeMap<(String, String, String), Value> {
    objects(&helm(NAMESPACE, args).unwrap_or_else(|e| panic!("helm template: {e}")))
}

fn get<'a>(
    objs: &'a BTreeMap<(String, String, String), Value>,
    kind: &str,
    name: &str,
) -> &'a Value {
    objs.iter()
        .find(|((k, _, n), _)| k == kind && n == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Every container of a workload.
fn containers(workload: &Value) -> Vec<&Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .collect()
}

fn host_path<'a>(ds: &'a Value, volume: &str) -> &'a str {
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
}

#[test]
fn chart_with_default_values_renders_the_kustomization() {
    let kustomized = objects(
        &run(
            Command::new("kubectl").args(["kustomize", MANIFESTS]),
            "kubectl",
        )
        .unwrap_or_else(|e| panic!("kubectl kustomize: {e}")),
    );
    let charted = chart(&[]);
    let only = |a: &BTreeMap<_, Value>, b: &BTreeMap<_, Value>| -> Vec<(String, String, String)> {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
    };
    assert_eq!(
        only(&kustomized, &charted),
        vec![],
        "objects only kustomize renders"
    );
    assert_eq!(
        only(&charted, &kustomized),
        vec![],
        "objects only the chart renders"
    );
    for (key, want) in &kustomized {
        assert_eq!(
            &charted[key], want,
            "{key:?} differs between the chart and the kustomization"
        );
    }
}

#[test]
fn every_value_reaches_the_objects_it_names() {
    let objs = chart(&[
        "--set",
        "image.repository=registry.example/ambient",
        "--set",
        "image.tag=9.9.9",
        "--set",
        "image.pullPolicy=Always",
        "--set",
        "platform=k3s",
        "--set",
        "config.AMBIENT_LOG_LEVEL=debug",
        "--set",
        "config.AMBIENT_EXCLUDED_NAMESPACES=kube-system\\,infra",
        "--set",
        "issuer.replicas=3",
        "--set",
        "resources.ztunnel.requests.memory=200Mi",
        "--set-json",
        r#"tolerations=[{"key":"dedicated","operator":"Equal","value":"mesh","effect":"NoSchedule"}]"#,
        "--set",
        "createNamespace=false",
    ]);
    let workloads = [
        get(&objs, "DaemonSet", "ambient-node"),
        get(&objs, "DaemonSet", "ztunnel"),
        get(&objs, "Deployment", "ambient-issuer"),
    ];
    for w in workloads {
        for c in containers(w) {
            assert_eq!(c["image"], "registry.example/ambient:9.9.9", "{c:?}");
            assert_eq!(c["imagePullPolicy"], "Always");
        }
    }
    let node = get(&objs, "DaemonSet", "ambient-node");
    assert_eq!(
        host_path(node, "cni-bin"),
        "/var/lib/rancher/k3s/data/current/bin"
    );
    assert_eq!(
        host_path(node, "cni-conf"),
        "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    );
    for ds in [node, get(&objs, "DaemonSet", "ztunnel")] {
        let t = &ds["spec"]["template"]["spec"]["tolerations"];
        assert_eq!(t[0]["key"], "dedicated", "{t:?}");
        assert_eq!(t.as_array().unwrap().len(), 1);
    }
    let cm = &get(&objs, "ConfigMap", "ambient-config")["data"];
    assert_eq!(cm["AMBIENT_LOG_LEVEL"], "debug");
    assert_eq!(cm["AMBIENT_EXCLUDED_NAMESPACES"], "kube-system,infra");
    // Untouched keys keep their defaults, as strings.
    assert_eq!(cm["AMBIENT_JSON_LOGS"], "true");
    assert_eq!(
        get(&objs, "Deployment", "ambient-issuer")["spec"]["replicas"],
        3
    );
    let zt = containers(get(&objs, "DaemonSet", "ztunnel"))[0];
    assert_eq!(zt["resources"]["requests"]["memory"], "200Mi");
    assert_eq!(zt["resources"]["limits"]["memory"], "512Mi");
    assert!(
        !objs.keys().any(|(k, _, _)| k == "Namespace"),
        "createNamespace=false renders no Namespace"
    );

    // GKE keeps its CNI plugins elsewhere; explicit directories win over the preset.
    let gke = chart(&["--set", "platform=gke"]);
    let node = get(&gke, "DaemonSet", "ambient-node");
    assert_eq!(host_path(node, "cni-bin"), "/home/kubernetes/bin");
    assert_eq!(host_path(node, "cni-conf"), "/etc/cni/net.d");
    let own = chart(&[
        "--set",
        "platform=gke",
        "--set",
        "cniBinDir=/usr/libexec/cni",
        "--set",
        "cniConfDir=/etc/kubernetes/cni/net.d",
    ]);
    let node = get(&own, "DaemonSet", "ambient-node");
    assert_eq!(host_path(node, "cni-bin"), "/usr/libexec/cni");
    assert_eq!(host_path(node, "cni-conf"), "/etc/kubernetes/cni/net.d");
}

#[test]
fn bad_values_are_refused_with_the_reason() {
    let e = helm(NAMESPACE, &["--set", "platform=eks"]).unwrap_err();
    assert!(
        e.contains("platform \"eks\": must be empty, k3s or gke"),
        "{e}"
    );
    let e = helm("default", &[]).unwrap_err();
    assert!(e.contains("install into namespace ambient-system"), "{e}");
    assert!(Path::new(CHART).join("values.yaml").exists());
}

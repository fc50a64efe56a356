//! The Kubernetes manifests in install/manifests: every document parses into its k8s-openapi
//! type without losing a field, `kubectl kustomize` renders them, RBAC covers the calls the
//! installer makes, the DaemonSets and the issuer's Deployment mount the paths and expose the
//! ports the binaries use (read from `ambient_common::constants`), only the issuer holds the CA
//! key, and every flag a container passes is accepted by the real binary's parser (the debug
//! binaries in the target directory: `cargo build` the workspace first, or the test skips).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ambient_common::constants as c;
use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");

fn manifest_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().unwrap() != "kustomization.yaml")
        .collect();
    v.sort();
    v
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    ambient_common::yaml::documents(&text).unwrap()
}

fn all_objects() -> Vec<Value> {
    manifest_files().iter().flat_map(|p| documents(p)).collect()
}

/// Parses into `T`, serialises back, and demands the same JSON: no field was dropped or
/// misspelt (k8s-openapi ignores unknown fields, so a typo would vanish here).
fn roundtrip<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    let typed: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", v["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        &back, v,
        "{} lost or changed a field",
        v["metadata"]["name"]
    );
    typed
}

fn check_kind(v: &Value) {
    match v["kind"].as_str().unwrap() {
        "Namespace" => drop(roundtrip::<Namespace>(v)),
        "ServiceAccount" => drop(roundtrip::<ServiceAccount>(v)),
        "ClusterRole" => drop(roundtrip::<ClusterRole>(v)),
        "ClusterRoleBinding" => drop(roundtrip::<ClusterRoleBinding>(v)),
        "Role" => drop(roundtrip::<Role>(v)),
        "RoleBinding" => drop(roundtrip::<RoleBinding>(v)),
        "ConfigMap" => drop(roundtrip::<ConfigMap>(v)),
        "DaemonSet" => drop(roundtrip::<DaemonSet>(v)),
        "Deployment" => drop(roundtrip::<Deployment>(v)),
        "Service" => drop(roundtrip::<Service>(v)),
        "PodDisruptionBudget" => drop(roundtrip::<PodDisruptionBudget>(v)),
        "ValidatingAdmissionPolicy" => drop(roundtrip::<ValidatingAdmissionPolicy>(v)),
        "ValidatingAdmissionPolicyBinding" => {
            drop(roundtrip::<ValidatingAdmissionPolicyBinding>(v))
        }
        other => panic!("no typed check for kind {other}"),
    }
}

fn find<T: DeserializeOwned>(kind: &str, name: &str) -> T {
    let v = all_objects()
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    serde_json::from_value(v).unwrap()
}

#[test]
fn every_manifest_parses_into_its_type_without_losing_a_field() {
    let objs = all_objects();
    assert!(objs.len() >= 12, "{}", objs.len());
    for o in &objs {
        check_kind(o);
        let ns = o["metadata"]["namespace"].as_str();
        let cluster_scoped = matches!(
            o["kind"].as_str(),
            Some(
                "Namespace"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            )
        );
        assert_eq!(
            ns,
            (!cluster_scoped).then_some("ambient-system"),
            "{}",
            o["metadata"]["name"]
        );
    }
}

#[test]
fn cleanup_daemonset_parses_and_mounts_what_it_cleans() {
    let docs = documents(&Path::new(DIR).join("cleanup/cleanup-daemonset.yaml"));
    assert_eq!(docs.len(), 1);
    let ds: DaemonSet = roundtrip(&docs[0]);
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let init = pod.init_containers.clone().unwrap();
    let names: Vec<&str> = init.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["install-cni-uninstall", "node-agent-uninstall"]);
    let defaults = Defaults::try_parse_from(["t"]).unwrap().a.build().unwrap();
    let m = mounts(&ds, &init[0]);
    assert!(m
        .iter()
        .any(|(p, h, _)| Path::new(p) == defaults.cni_conf_dir && h == "/etc/cni/net.d"));
    assert!(m
        .iter()
        .any(|(p, h, _)| Path::new(p) == defaults.cni_bin_dir && h == "/opt/cni/bin"));
    let m = mounts(&ds, &init[1]);
    assert!(m.iter().any(|(p, h, _)| p == c::RUN_DIR && h == c::RUN_DIR));
    assert_eq!(
        caps(&init[1]),
        (vec!["NET_ADMIN".to_string()], vec!["ALL".to_string()])
    );
}

#[test]
fn kustomization_lists_every_manifest_and_kubectl_renders_it() {
    let k = &documents(&Path::new(DIR).join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files);

    let out = match std::process::Command::new("kubectl")
        .args(["kustomize", DIR])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: kubectl not found ({e}); install Debian's kubernetes-client");
            return;
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Vec<Value> =
        ambient_common::yaml::documents(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(rendered.len(), all_objects().len());
    for o in &rendered {
        check_kind(o);
    }
}

fn covers(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|g| g == group)
            && r.resources
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn rbac_covers_the_installers_calls_and_nothing_is_a_wildcard() {
    let ds: DaemonSet = find("DaemonSet", "ambient-node");
    let spec = ds.spec.unwrap().template.spec.unwrap();
    let sa = spec.service_account_name.unwrap();
    let role: Role = find("Role", "ambient-node");
    let binding: RoleBinding = find("RoleBinding", "ambient-node");
    assert_eq!(binding.role_ref.name, "ambient-node");
    assert!(binding
        .subjects
        .unwrap()
        .iter()
        .any(|s| s.kind == "ServiceAccount" && s.name == sa));
    let rules = role.rules.unwrap();
    for call in install::lifecycle::API_CALLS {
        assert!(
            covers(&rules, call.group, call.resource, call.verb),
            "{call:?}"
        );
    }
    // The DaemonSet the installer asks about is the one the Role names.
    let installer = container(&find("DaemonSet", "ambient-node"), "install-cni");
    assert_eq!(
        env(&installer, "AMBIENT_DAEMONSET").as_deref(),
        Some("ambient-node")
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["ambient-node".to_string()][..])
    );
    for o in all_objects() {
        for rule in o["rules"].as_array().into_iter().flatten() {
            for field in ["apiGroups", "resources", "verbs"] {
                assert!(
                    !rule[field].as_array().unwrap().iter().any(|x| x == "*"),
                    "wildcard in {}",
                    o["metadata"]["name"]
                );
            }
            // The one create allowed: a TokenReview (the issuer asking who a caller is),
            // which the API server answers without storing anything.
            let token_review = rule["apiGroups"] == serde_json::json!(["authentication.k8s.io"])
                && rule["resources"] == serde_json::json!(["tokenreviews"])
                && rule["verbs"] == serde_json::json!(["create"]);
            assert!(
                token_review
                    || !rule["verbs"].as_array().unwrap().iter().any(|v| [
                        "create",
                        "update",
                        "delete",
                        "deletecollection"
                    ]
                    .contains(&v.as_str().unwrap())),
                "{} may write more than it needs",
                o["metadata"]["name"]
            );
        }
    }
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn container(ds: &DaemonSet, name: &str) -> Container {
    pod_container(&pod_spec(ds), name)
}

fn pod_container(pod: &PodSpec, name: &str) -> Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
        .clone()
}

fn env(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// (mount path -> host path, propagation) for a container.
fn mounts(ds: &DaemonSet, c: &Container) -> Vec<(String, String, Option<String>)> {
    pod_mounts(&pod_spec(ds), c)
}

/// (mount path -> source, propagation) for a container of `pod`: the host path, or
/// `secret:NAME`, `configMap:NAME`, `projected`.
fn pod_mounts(pod: &PodSpec, c: &Container) -> Vec<(String, String, Option<String>)> {
    let vols = pod.volumes.clone().unwrap_or_default();
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let v = vols
                .iter()
                .find(|v| v.name == m.name)
                .unwrap_or_else(|| panic!("{}: no volume {}", c.name, m.name));
            let source = if let Some(h) = &v.host_path {
                h.path.clone()
            } else if let Some(s) = &v.secret {
                format!("secret:{}", s.secret_name.clone().unwrap())
            } else if let Some(cm) = &v.config_map {
                format!("configMap:{}", cm.name)
            } else if v.projected.is_some() {
                "projected".to_string()
            } else {
                panic!("{}: volume {} of an unexpected type", c.name, v.name)
            };
            (m.mount_path.clone(), source, m.mount_propagation.clone())
        })
        .collect()
}

fn caps(c: &Container) -> (Vec<String>, Vec<String>) {
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true), "{} is privileged", c.name);
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
    let caps = sc.capabilities.as_ref().unwrap();
    (
        caps.add.clone().unwrap_or_default(),
        caps.drop.clone().unwrap_or_default(),
    )
}

#[derive(Debug, Parser)]
struct Defaults {
    #[command(flatten)]
    a: install::ConfigArgs,
}

#[test]
fn node_daemonset_mounts_the_paths_the_binaries_use() {
    let ds: DaemonSet = find("DaemonSet", "ambient-node");
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tol = pod.tolerations.unwrap();
    assert!(tol
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));

    // The installer: its defaults are the mounted host directories.
    let inst = container(&ds, "install-cni");
    let defaults = Defaults::try_parse_from(["t"]).unwrap().a.build().unwrap();
    let m = mounts(&ds, &inst);
    let has = |m: &[(String, String, Option<String>)], path: &Path, host: &str| {
        m.iter().any(|(p, h, _)| Path::new(p) == path && h == host)
    };
    assert!(has(&m, &defaults.cni_bin_dir, "/opt/cni/bin"), "{m:?}");
    assert!(has(&m, &defaults.cni_conf_dir, "/etc/cni/net.d"), "{m:?}");
    assert!(has(&m, Path::new(c::RUN_DIR), c::RUN_DIR), "{m:?}");
    assert_eq!(
        env(&inst, "CNI_BIN_DIR").map(PathBuf::from),
        Some(defaults.cni_bin_dir.clone())
    );
    assert_eq!(
        env(&inst, "CNI_CONF_DIR").map(PathBuf::from),
        Some(defaults.cni_conf_dir.clone())
    );
    assert_eq!(
        env(&inst, "AMBIENT_CNI_SOCKET").as_deref(),
        Some(c::CNI_SOCKET)
    );
    assert_eq!(
        inst.command.as_ref().unwrap()[0],
        defaults
            .plugin_source
            .with_file_name("install-cni")
            .display()
            .to_string()
    );
    assert_eq!(caps(&inst), (vec![], vec!["ALL".to_string()]));

    // The agent: run directory (its sockets), the netns directory with propagation.
    let agent = container(&ds, "node-agent");
    let m = mounts(&ds, &agent);
    assert!(has(&m, Path::new(c::RUN_DIR), c::RUN_DIR), "{m:?}");
    assert!(Path::new(c::CNI_SOCKET).starts_with(c::RUN_DIR));
    assert!(Path::new(c::ZTUNNEL_SOCKET).starts_with(c::RUN_DIR));
    assert_eq!(env(&agent, "AMBIENT_RUN_DIR").as_deref(), Some(c::RUN_DIR));
    assert_eq!(
        env(&agent, "AMBIENT_CNI_SOCKET").as_deref(),
        Some(c::CNI_SOCKET)
    );
    assert_eq!(
        env(&agent, "AMBIENT_ZTUNNEL_SOCKET").as_deref(),
        Some(c::ZTUNNEL_SOCKET)
    );
    let netns = m
        .iter()
        .find(|(p, _, _)| p == "/var/run/netns")
        .expect("netns mount");
    assert_eq!(netns.1, "/var/run/netns");
    assert_eq!(netns.2.as_deref(), Some("HostToContainer"));
    // The runtime's CNI result cache, where the agent adopts pods running before it, at the
    // path the agent reads by default, read-only.
    assert!(
        has(&m, Path::new(c::CNI_CACHE_DIR), c::CNI_CACHE_DIR),
        "{m:?}"
    );
    assert!(agent
        .volume_mounts
        .iter()
        .flatten()
        .any(|v| v.mount_path == c::CNI_CACHE_DIR && v.read_only == Some(true)));
    assert_eq!(
        caps(&agent),
        (vec!["NET_ADMIN".to_string()], vec!["ALL".to_string()])
    );
    // Metrics on the node's address (docs/operations.md), from the downward API.
    assert_eq!(
        env(&agent, "AMBIENT_METRICS_ADDR"),
        Some(format!("$(HOST_IP):{}", c::AGENT_METRICS_PORT))
    );
    let env_vars = agent.env.clone().unwrap();
    let host_ip = env_vars.iter().position(|e| e.name == "HOST_IP");
    let metrics = env_vars
        .iter()
        .position(|e| e.name == "AMBIENT_METRICS_ADDR");
    // Captured traffic is DNATed to the node's address (routed CNIs without host addresses).
    assert_eq!(
        env(&agent, "AMBIENT_CAPTURE_ADDRESS").as_deref(),
        Some("$(HOST_IP)")
    );
    let capture = env_vars
        .iter()
        .position(|e| e.name == "AMBIENT_CAPTURE_ADDRESS");
    assert!(
        host_ip < metrics && host_ip < capture,
        "HOST_IP must come before the variables that expand it"
    );
    assert_eq!(
        env_vars[host_ip.unwrap()]
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("status.hostIP")
    );
    let cmd = agent.command.clone().unwrap();
    assert_eq!(cmd[1..], ["run", "--source", "kube"]);
    assert!(
        env(&agent, "NODE_NAME").is_none(),
        "NODE_NAME comes from the downward API"
    );
    assert!(agent.env.unwrap().iter().any(|e| e.name == "NODE_NAME"
        && e.value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str())
            == Some("spec.nodeName")));
}

#[test]
fn ztunnel_daemonset_matches_the_conventions() {
    let ds: DaemonSet = find("DaemonSet", "ztunnel");
    let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let z = container(&ds, "ztunnel");
    let m = mounts(&ds, &z);
    assert!(
        m.iter().any(|(p, h, _)| p == c::RUN_DIR && h == c::RUN_DIR),
        "{m:?}"
    );
    // No CA key on the node: certificates come from the issuer (see
    // ztunnel_gets_certificates_from_the_issuer_with_a_projected_token).
    assert!(
        !m.iter().any(|(_, h, _)| h == "secret:ambient-ca"),
        "ztunnel must not mount the CA Secret: {m:?}"
    );
    let args = z.args.clone().unwrap();
    assert!(args.contains(&format!("--agent-socket={}", c::ZTUNNEL_SOCKET)));
    assert!(
        !args.iter().any(|a| a.starts_with("--ca-dir")),
        "--ca-dir is development mode: {args:?}"
    );
    // A rolling update surges a second ztunnel onto the node (maxSurge 1, maxUnavailable 0):
    // a declared port of a host-network pod is a host port, which the old pod holds, and the
    // new one could never be scheduled. Readiness is a probe on the port number.
    let strategy = ds.spec.as_ref().unwrap().update_strategy.clone().unwrap();
    let rolling = strategy.rolling_update.unwrap();
    assert_eq!(
        (rolling.max_surge, rolling.max_unavailable),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    assert!(
        z.ports.as_ref().is_none_or(Vec::is_empty),
        "ztunnel declares host ports: {:?}",
        z.ports
    );
    let probe = z.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(
        probe.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
            c::READINESS_PORT
        ))
    );
    // Root only to start: --run-as leaves it for 1337 with NET_ADMIN alone, which needs
    // SETUID/SETGID once; the token stays readable through the pod's fsGroup.
    assert!(args.contains(&format!("--run-as={}", c::ZTUNNEL_RUN_AS)));
    assert_eq!(
        caps(&z),
        (
            vec!["NET_ADMIN".to_string(), "SETGID".into(), "SETUID".into()],
            vec!["ALL".to_string()]
        )
    );
    let sc = z.security_context.clone().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let gid: i64 = c::ZTUNNEL_RUN_AS
        .split(':')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pod.security_context.unwrap().fs_group, Some(gid));
    // The configuration both DaemonSets read has the same excluded namespaces default.
    let cm: ConfigMap = find("ConfigMap", "ambient-config");
    let data = cm.data.unwrap();
    assert_eq!(
        data["AMBIENT_EXCLUDED_NAMESPACES"],
        c::DEFAULT_EXCLUDED_NAMESPACES.join(",")
    );
    assert_eq!(data["TRUST_DOMAIN"], c::DEFAULT_TRUST_DOMAIN);
}

/// The node agent's only write (pods/status) is scoped by an admission policy to the
/// redirection annotation on pods of its own node; the policy names the agent's service
/// account and the annotation key the agent writes. (No API server here: the CEL itself is
/// not evaluated by this test.)
#[test]
fn pod_status_writes_are_scoped_to_the_agents_node_and_annotation() {
    let policy: ValidatingAdmissionPolicy =
        find("ValidatingAdmissionPolicy", "ambient-node-pod-status");
    let spec = policy.spec.unwrap();
    let rules = spec.match_constraints.unwrap().resource_rules.unwrap();
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods/status".to_string()][..])
    );
    assert_eq!(spec.failure_policy.as_deref(), Some("Fail"));
    let conditions = spec.match_conditions.unwrap();
    assert!(conditions[0]
        .expression
        .contains("system:serviceaccount:ambient-system:ambient-node"));
    let text: String = spec
        .variables
        .unwrap()
        .iter()
        .map(|v| v.expression.clone())
        .chain(
            spec.validations
                .unwrap()
                .iter()
                .map(|v| v.expression.clone()),
        )
        .collect();
    assert!(text.contains(&format!("'{}'", c::REDIRECTION_ANNOTATION)));
    for needle in [
        "authentication.kubernetes.io/node-name",
        "object.spec.nodeName",
        "metadata.labels",
        "object.status == oldObject.status",
    ] {
        assert!(text.contains(needle), "the policy does not check {needle}");
    }
    let binding: ValidatingAdmissionPolicyBinding = find(
        "ValidatingAdmissionPolicyBinding",
        "ambient-node-pod-status",
    );
    let b = binding.spec.unwrap();
    assert_eq!(b.policy_name.as_deref(), Some("ambient-node-pod-status"));
    assert_eq!(b.validation_actions, Some(vec!["Deny".to_string()]));
    // The agent's service account is the one the policy names.
    let sa: ServiceAccount = find("ServiceAccount", "ambient-node");
    assert_eq!(sa.metadata.name.as_deref(), Some("ambient-node"));
}

/// Every pod template of the install and of the cleanup DaemonSet, named `Kind/name`.
fn pod_templates() -> Vec<(String, PodSpec)> {
    let cleanup = documents(&Path::new(DIR).join("cleanup/cleanup-daemonset.yaml"));
    all_objects()
        .into_iter()
        .chain(cleanup)
        .filter(|o| o["spec"]["template"]["spec"].is_object())
        .map(|o| {
            let owner = format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            );
            let pod = serde_json::from_value(o["spec"]["template"]["spec"].clone()).unwrap();
            (owner, pod)
        })
        .collect()
}

fn all_containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
}

/// The value of `--name=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(prefix.as_str()))
}

fn issuer() -> (Deployment, PodSpec, Container) {
    let d: Deployment = find("Deployment", "ambient-issuer");
    let pod = d.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let c = pod_container(&pod, "issuer");
    (d, pod, c)
}

#[test]
fn only_the_issuer_mounts_the_ca_secret() {
    let mut holders = Vec::new();
    for (owner, pod) in pod_templates() {
        for v in pod.volumes.iter().flatten() {
            let projected = v
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .any(|s| s.secret.as_ref().is_some_and(|s| s.name == "ambient-ca"));
            assert!(!projected, "{owner} projects the CA Secret");
        }
        for c in all_containers(&pod) {
            for (path, source, _) in pod_mounts(&pod, c) {
                if source == "secret:ambient-ca" {
                    holders.push(format!("{owner}/{}:{path}", c.name));
                }
            }
            // Nor through the environment.
            assert!(
                !c.env_from.iter().flatten().any(|e| e
                    .secret_ref
                    .as_ref()
                    .is_some_and(|s| s.name == "ambient-ca")),
                "{owner}/{}",
                c.name
            );
            assert!(
                !c.env.iter().flatten().any(|e| e
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref())
                    .is_some_and(|s| s.name == "ambient-ca")),
                "{owner}/{}",
                c.name
            );
        }
    }
    assert_eq!(
        holders,
        ["Deployment/ambient-issuer/issuer:/etc/ambient/ca"]
    );

    // The issuer reads it where --ca-dir says, owner-readable only, as a fixed non-root uid
    // whose fsGroup gives it the files, with no way to gain more.
    let (_, pod, c) = issuer();
    let args = c.args.clone().unwrap();
    assert_eq!(flag(&args, "ca-dir"), Some("/etc/ambient/ca"));
    assert_eq!(flag(&args, "source"), Some("kube"));
    assert_eq!(flag(&args, "trust-domain"), Some("$(TRUST_DOMAIN)"));
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.secret.is_some())
        .unwrap();
    assert_eq!(vol.secret.as_ref().unwrap().default_mode, Some(0o400));
    let mount = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == vol.name)
        .unwrap();
    assert_eq!(mount.read_only, Some(true));
    assert!(
        mount.sub_path.is_none(),
        "a subPath mount never sees updates"
    );
    let psc = pod.security_context.clone().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let uid = psc.run_as_user.expect("a fixed uid");
    assert!(uid > 0);
    assert!(psc.fs_group.is_some());
    assert_eq!(psc.fs_group, psc.run_as_group);
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_ne!(sc.run_as_user, Some(0));
    assert_eq!(caps(&c), (vec![], vec!["ALL".to_string()]));
}

#[test]
fn issuer_runs_two_replicas_behind_a_service_and_a_disruption_budget() {
    let (d, pod, c) = issuer();
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let selects = |sel: &std::collections::BTreeMap<String, String>| {
        !sel.is_empty() && sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects(spec.selector.match_labels.as_ref().unwrap()));
    assert_eq!(pod.service_account_name.as_deref(), Some("ambient-issuer"));

    // Spread across nodes, as a preference (a one-node cluster still runs both).
    let anti = pod.affinity.clone().unwrap().pod_anti_affinity.unwrap();
    assert!(anti
        .required_during_scheduling_ignored_during_execution
        .is_none());
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap()[0]
        .pod_affinity_term;
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    assert!(selects(
        term.label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
    ));

    let pdb: PodDisruptionBudget = find("PodDisruptionBudget", "ambient-issuer");
    let pdb = pdb.spec.unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    assert!(selects(
        pdb.selector.unwrap().match_labels.as_ref().unwrap()
    ));

    // Ports, probes, scrape annotations.
    let ports: Vec<(String, i32)> = c
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    assert!(ports.contains(&("grpc-issuer".into(), i32::from(c::ISSUER_GRPC_PORT))));
    assert!(ports.contains(&("metrics".into(), i32::from(c::ISSUER_METRICS_PORT))));
    let ready = c.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(ready.path.as_deref(), Some("/ready"));
    assert_eq!(
        ready.port,
        IntOrString::Int(i32::from(c::ISSUER_METRICS_PORT))
    );
    let live = c.liveness_probe.clone().expect("a liveness probe");
    assert!(
        live.http_get
            .is_none_or(|h| h.path.as_deref() != Some("/ready")),
        "an unsynced pod view (API server trouble) must not restart the issuer"
    );
    let res = c.resources.clone().unwrap();
    assert!(res.requests.is_some_and(|r| r.contains_key("memory")));
    assert!(res.limits.is_some_and(|r| r.contains_key("memory")));
    let ann = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(
        ann["prometheus.io/port"],
        c::ISSUER_METRICS_PORT.to_string()
    );
    assert_eq!(ann["prometheus.io/path"], "/metrics");

    let svc: Service = find("Service", "ambient-issuer");
    let s = svc.spec.unwrap();
    assert!(selects(s.selector.as_ref().unwrap()));
    let svc_ports: Vec<(String, i32, IntOrString)> = s
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.port, p.target_port.unwrap()))
        .collect();
    for (name, port) in [
        ("grpc-issuer", c::ISSUER_GRPC_PORT),
        ("metrics", c::ISSUER_METRICS_PORT),
    ] {
        let (_, _, target) = svc_ports
            .iter()
            .find(|(n, p, _)| n == name && *p == i32::from(port))
            .unwrap_or_else(|| panic!("Service port {name} {port}: {svc_ports:?}"));
        // The target is the container port of the same name.
        assert!(ports.iter().any(|(n, p)| match target {
            IntOrString::String(t) => n == t && *p == i32::from(port),
            IntOrString::Int(t) => p == t,
        }));
    }
    // The Service's name is the one in the serving certificate ztunnel checks.
    assert_eq!(
        format!(
            "{}.{}.svc",
            svc.metadata.name.unwrap(),
            svc.metadata.namespace.unwrap()
        ),
        c::ISSUER_SERVICE_DNS
    );
}

#[test]
fn issuer_rbac_is_exactly_tokenreviews_create_and_pods_list_watch() {
    let role: ClusterRole = find("ClusterRole", "ambient-issuer");
    let mut granted = BTreeSet::new();
    for r in role.rules.unwrap() {
        assert!(r.resource_names.is_none() && r.non_resource_urls.is_none());
        for g in r.api_groups.unwrap() {
            for res in r.resources.clone().unwrap() {
                for v in &r.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let want: BTreeSet<(String, String, String)> = [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "list"),
        ("", "pods", "watch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, want);
    let binding: ClusterRoleBinding = find("ClusterRoleBinding", "ambient-issuer");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "ambient-issuer");
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "ambient-issuer");
    assert_eq!(subjects[0].namespace.as_deref(), Some("ambient-system"));
    let _: ServiceAccount = find("ServiceAccount", "ambient-issuer");
    // No Role or other binding gives the issuer's account more.
    for o in all_objects() {
        if matches!(
            o["kind"].as_str(),
            Some("RoleBinding" | "ClusterRoleBinding")
        ) && o["metadata"]["name"] != "ambient-issuer"
        {
            assert!(
                !o["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["name"] == "ambient-issuer"),
                "{}",
                o["metadata"]["name"]
            );
        }
    }
}

#[test]
fn ztunnel_gets_certificates_from_the_issuer_with_a_projected_token() {
    let ds: DaemonSet = find("DaemonSet", "ztunnel");
    let pod = pod_spec(&ds);
    let z = container(&ds, "ztunnel");
    let args = z.args.clone().unwrap();
    // The issuer's Service on its gRPC port, resolvable from the host network.
    assert_eq!(
        flag(&args, "ca-address"),
        Some(format!("https://{}:{}", c::ISSUER_SERVICE_DNS, c::ISSUER_GRPC_PORT).as_str())
    );
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));

    let m = pod_mounts(&pod, &z);
    let file_from = |file: &str| {
        m.iter()
            .filter(|(dir, _, _)| Path::new(file).parent() == Some(Path::new(dir)))
            .map(|(_, source, _)| source.clone())
            .next()
    };
    let vol = |source_mount: &str| {
        let mount = z
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == source_mount)
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        assert!(
            mount.sub_path.is_none(),
            "a subPath mount never sees updates"
        );
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap()
            .clone()
    };

    // The root bundle, from the ConfigMap: no key.
    let root = flag(&args, "ca-root").expect("--ca-root");
    assert_eq!(
        file_from(root).as_deref(),
        Some("configMap:ambient-ca-root"),
        "{m:?}"
    );
    let cm = vol(Path::new(root).parent().unwrap().to_str().unwrap())
        .config_map
        .unwrap();
    let items = cm.items.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, "root-cert.pem");
    assert_eq!(
        Path::new(root).file_name().unwrap().to_str(),
        Some(items[0].path.as_str())
    );

    // The token: where ztunnel reads it by default (and where the manifest says), audience
    // istio-ca, short-lived (kubelet rotates it at 80% of its life).
    let token = flag(&args, "ca-token").unwrap_or(c::ZTUNNEL_TOKEN_PATH);
    assert_eq!(token, c::ZTUNNEL_TOKEN_PATH);
    assert_eq!(file_from(token).as_deref(), Some("projected"), "{m:?}");
    let projected = vol(Path::new(token).parent().unwrap().to_str().unwrap())
        .projected
        .unwrap();
    let sources = projected.sources.unwrap();
    assert_eq!(sources.len(), 1);
    let sat = sources[0].service_account_token.clone().unwrap();
    assert_eq!(sat.audience.as_deref(), Some("istio-ca"));
    assert_eq!(sat.expiration_seconds, Some(3600));
    assert_eq!(
        Path::new(token).file_name().unwrap().to_str(),
        Some(sat.path.as_str())
    );
    // ztunnel reads it after --run-as: group 1337 through the pod's fsGroup.
    assert!(args.contains(&format!("--run-as={}", c::ZTUNNEL_RUN_AS)));
    assert_eq!(
        pod.security_context
            .unwrap()
            .fs_group
            .map(|g| g.to_string()),
        c::ZTUNNEL_RUN_AS.split(':').nth(1).map(str::to_string)
    );
    // The issuer lets this service account ask for the node's workloads (its default
    // --node-proxy-service-account, unless the manifest names others).
    let (_, _, issuer) = issuer();
    let issuer_args = issuer.args.unwrap();
    assert!(flag(&issuer_args, "node-proxy-service-account").is_none());
    assert_eq!(
        format!(
            "{}/{}",
            ds.metadata.namespace.as_deref().unwrap(),
            pod.service_account_name.as_deref().unwrap()
        ),
        c::ZTUNNEL_SERVICE_ACCOUNT
    );
}

/// Where the workspace's debug binaries are: the target directory this test was built in.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("debug")
}

/// A container's environment as kubelet builds it (envFrom ConfigMaps from the manifests, then
/// env), with sample values for the downward API.
fn container_env(c: &Container) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    let config_map = |name: &str| {
        find::<ConfigMap>("ConfigMap", name)
            .data
            .unwrap_or_default()
    };
    for from in c.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            env.extend(config_map(&r.name));
        }
    }
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            v.clone()
        } else {
            let from = e.value_from.as_ref().unwrap();
            if let Some(k) = &from.config_map_key_ref {
                config_map(&k.name)
                    .get(&k.key)
                    .unwrap_or_else(|| panic!("{}: no key {} in {}", c.name, k.key, k.name))
                    .clone()
            } else if let Some(f) = &from.field_ref {
                match f.field_path.as_str() {
                    "spec.nodeName" => "node-1".into(),
                    "status.hostIP" => "10.0.0.1".into(),
                    "metadata.namespace" => "ambient-system".into(),
                    other => panic!("{}: no sample for {other}", c.name),
                }
            } else {
                panic!("{}: {} comes from an unexpected source", c.name, e.name)
            }
        };
        env.insert(e.name.clone(), expand(&value, &env, &c.name));
    }
    env
}

/// `$(NAME)` replaced as kubelet does; a reference to an unset variable is a manifest bug
/// (kubelet would pass it on literally).
fn expand(s: &str, env: &std::collections::BTreeMap<String, String>, who: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(')').unwrap() + i;
        let name = &rest[i + 2..end];
        out.push_str(
            env.get(name)
                .unwrap_or_else(|| panic!("{who}: $({name}) is not set")),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether the binary's parser accepts `argv` (subcommand and flags): clap acts on `--help`
/// as it reaches it, after every flag before it has been matched and its value parsed, and
/// before checking required flags; so the exit status says whether each flag is known and
/// each value valid, without starting anything.
fn parser_accepts(bin: &Path, argv: &[String]) -> Result<(), String> {
    let out = std::process::Command::new(bin)
        .args(argv)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_flag_the_manifests_pass_is_accepted_by_the_binaries() {
    const PREFIX: &str = "/opt/ambient/bin/";
    // (where, binary, argv): each container's command + args, and each exec probe.
    let mut calls: Vec<(String, String, Vec<String>)> = Vec::new();
    for (owner, pod) in pod_templates() {
        for c in all_containers(&pod) {
            let env = container_env(c);
            let who = format!("{owner}/{}", c.name);
            let mut push = |what: &str, argv: &[String]| {
                let Some(bin) = argv.first().and_then(|a| a.strip_prefix(PREFIX)) else {
                    return;
                };
                let rest = argv[1..].iter().map(|a| expand(a, &env, &who)).collect();
                calls.push((format!("{who} {what}"), bin.to_string(), rest));
            };
            let mut argv = c.command.clone().unwrap_or_default();
            argv.extend(c.args.clone().unwrap_or_default());
            push("command", &argv);
            for (what, probe) in [
                ("readiness", &c.readiness_probe),
                ("liveness", &c.liveness_probe),
            ] {
                if let Some(cmd) = probe.as_ref().and_then(|p| p.exec.as_ref()) {
                    push(what, cmd.command.as_deref().unwrap_or_default());
                }
            }
        }
    }
    let run_of = |bin: &str| {
        calls
            .iter()
            .any(|(_, b, argv)| b == bin && argv.first().map(String::as_str) == Some("run"))
    };
    assert!(run_of("ztunnel") && run_of("ambient-issuer"), "{calls:?}");

    let dir = bin_dir();
    let mut failures = Vec::new();
    let mut checked = BTreeSet::new();
    for (who, bin, argv) in &calls {
        let path = dir.join(bin);
        if !path.exists() {
            eprintln!(
                "SKIPPED {who}: no {} (cargo build the workspace first)",
                path.display()
            );
            continue;
        }
        // The check itself: an unknown flag must be refused.
        if checked.insert((bin.clone(), argv[0].clone())) {
            let bogus = [argv[0].clone(), "--no-such-flag-anywhere".into()];
            assert!(
                parser_accepts(&path, &bogus).is_err(),
                "{bin} {} accepts an unknown flag: this check proves nothing",
                argv[0]
            );
        }
        if let Err(e) = parser_accepts(&path, argv) {
            failures.push(format!("{who}: {bin} {}\n{e}", argv.join(" ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The `[default: ...]` of `--flag` in `bin sub --help`.
fn help_default(bin: &Path, sub: &str, flag: &str) -> Option<String> {
    let out = std::process::Command::new(bin)
        .args([sub, "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let is_flag_line = |l: &str| {
        let t = l.trim_start();
        l.len() - t.len() <= 6 && t.starts_with('-')
    };
    let name = format!("--{flag}");
    let mut lines = text.lines().skip_while(|l| {
        !(is_flag_line(l)
            && l.split([' ', ','])
                .any(|w| w == name || w.starts_with(&format!("{name}=")))) // "--x <X>"
    });
    lines.next()?;
    let block: Vec<&str> = lines.take_while(|l| !is_flag_line(l)).collect();
    let block = block.join("\n");
    let start = block.find("[default: ")? + "[default: ".len();
    Some(block[start..start + block[start..].find(']')?].to_string())
}

/// What the manifests leave to the binaries' defaults agrees with the manifests: the issuer's
/// token audience is the projected token's, its node proxy is ztunnel's service account, its
/// serving name is the host ztunnel dials, and ztunnel's default token path is the mount.
#[test]
fn defaults_the_manifests_rely_on_are_the_binaries() {
    let dir = bin_dir();
    let (issuer_bin, ztunnel_bin) = (dir.join("ambient-issuer"), dir.join("ztunnel"));
    if !issuer_bin.exists() || !ztunnel_bin.exists() {
        eprintln!(
            "SKIPPED: no {} or {} (cargo build the workspace first)",
            issuer_bin.display(),
            ztunnel_bin.display()
        );
        return;
    }
    let (_, _, issuer) = issuer();
    let issuer_args = issuer.args.unwrap();
    let default = |bin: &Path, flag: &str| {
        help_default(bin, "run", flag)
            .unwrap_or_else(|| panic!("no default for --{flag} in {} run --help", bin.display()))
    };
    let given = |args: &[String], name: &str, bin: &Path| {
        flag(args, name)
            .map(str::to_string)
            .unwrap_or_else(|| default(bin, name))
    };

    let ds: DaemonSet = find("DaemonSet", "ztunnel");
    let pod = pod_spec(&ds);
    let z_args = container(&ds, "ztunnel").args.unwrap();
    let audience = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .find_map(|s| s.service_account_token.as_ref())
        .and_then(|t| t.audience.clone())
        .unwrap();
    assert_eq!(given(&issuer_args, "token-audience", &issuer_bin), audience);
    assert_eq!(
        given(&issuer_args, "node-proxy-service-account", &issuer_bin),
        format!(
            "ambient-system/{}",
            pod.service_account_name.as_deref().unwrap()
        )
    );
    let address = flag(&z_args, "ca-address").unwrap();
    let host = address
        .strip_prefix("https://")
        .and_then(|a| a.rsplit_once(':'))
        .map(|(h, _)| h)
        .unwrap();
    let server_name = flag(&z_args, "ca-server-name").unwrap_or(host);
    assert_eq!(given(&issuer_args, "serving-dns", &issuer_bin), server_name);
    assert_eq!(
        default(&ztunnel_bin, "ca-token"),
        c::ZTUNNEL_TOKEN_PATH,
        "the path Istio's ztunnel reads too"
    );
}

/// Every key of the ConfigMap `ambient-config` is read by some binary that receives it: a
/// container that gets the ConfigMap (`envFrom`) either reads the key as the environment
/// variable of one of its flags (`[env: KEY=...]` in its `--help`) or passes it on as
/// `$(KEY)` in its arguments (checked by the test above). A key nothing reads is a setting
/// that silently does nothing.
#[test]
fn every_configmap_key_is_read_by_some_binary() {
    const PREFIX: &str = "/opt/ambient/bin/";
    let keys: BTreeSet<String> = find::<ConfigMap>("ConfigMap", "ambient-config")
        .data
        .unwrap_or_default()
        .into_keys()
        .collect();
    let dir = bin_dir();
    let mut read = BTreeSet::new();
    let mut helps = 0;
    for (owner, pod) in pod_templates() {
        for c in all_containers(&pod) {
            let gets_it = c.env_from.iter().flatten().any(|f| {
                f.config_map_ref
                    .as_ref()
                    .is_some_and(|r| r.name == "ambient-config")
            });
            if !gets_it {
                continue;
            }
            let mut argv = c.command.clone().unwrap_or_default();
            argv.extend(c.args.clone().unwrap_or_default());
            let Some(bin) = argv.first().and_then(|a| a.strip_prefix(PREFIX)) else {
                panic!(
                    "{owner}/{}: not one of the image's binaries: {argv:?}",
                    c.name
                )
            };
            let path = dir.join(bin);
            assert!(
                path.exists(),
                "{}: build the workspace first (cargo build --workspace)",
                path.display()
            );
            let mut help_argv: Vec<&str> = argv[1..]
                .iter()
                .take_while(|a| !a.starts_with('-'))
                .map(String::as_str)
                .collect();
            help_argv.push("--help");
            let out = std::process::Command::new(&path)
                .args(&help_argv)
                .env_clear()
                .output()
                .unwrap();
            assert!(out.status.success(), "{bin} {help_argv:?}");
            helps += 1;
            let help = String::from_utf8_lossy(&out.stdout);
            for k in &keys {
                let passed_on = argv.iter().any(|a| a.contains(&format!("$({k})")));
                if passed_on || help.contains(&format!("[env: {k}=")) {
                    read.insert(k.clone());
                }
            }
        }
    }
    assert!(
        helps >= 3,
        "the node DaemonSet's and ztunnel's containers were checked"
    );
    let unread: Vec<&String> = keys.difference(&read).collect();
    assert!(
        unread.is_empty(),
        "ConfigMap keys no binary reads: {unread:?}"
    );
}

/// The monitoring kustomization renders (the dashboard as a ConfigMap Grafana's sidecar
/// picks up), and each PodMonitor/ServiceMonitor scrapes a port its pods or Service declare
/// under that name, with a selector that matches them.
#[test]
fn monitors_scrape_ports_the_pods_declare() {
    let dir = Path::new(DIR).join("monitoring");
    let monitors = documents(&dir.join("monitors.yaml"));
    assert_eq!(monitors.len(), 3);
    for m in &monitors {
        let name = m["metadata"]["name"].as_str().unwrap();
        assert_eq!(m["metadata"]["namespace"], "ambient-system", "{name}");
        let want = &m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"];
        match m["kind"].as_str().unwrap() {
            "PodMonitor" => {
                let (_, pod) = pod_templates()
                    .into_iter()
                    .find(|(owner, _)| owner.ends_with(&format!("/{}", want.as_str().unwrap())))
                    .unwrap_or_else(|| panic!("{name}: no workload {want}"));
                for ep in m["spec"]["podMetricsEndpoints"].as_array().unwrap() {
                    if let Some(port) = ep["port"].as_str() {
                        let declared = all_containers(&pod).any(|c| {
                            c.ports
                                .iter()
                                .flatten()
                                .any(|p| p.name.as_deref() == Some(port))
                        });
                        assert!(declared, "{name}: no container port named {port}");
                    } else {
                        // No declared port (ztunnel): the address is rewritten to the
                        // metrics port.
                        let r = &ep["relabelings"][0];
                        assert_eq!(r["targetLabel"], "__address__", "{name}");
                        assert_eq!(
                            r["replacement"],
                            format!("$1:{}", c::METRICS_PORT),
                            "{name}"
                        );
                    }
                }
            }
            "ServiceMonitor" => {
                let svc: Service = find("Service", want.as_str().unwrap());
                for ep in m["spec"]["endpoints"].as_array().unwrap() {
                    let port = ep["port"].as_str().unwrap();
                    let declared = svc
                        .spec
                        .as_ref()
                        .and_then(|s| s.ports.as_ref())
                        .into_iter()
                        .flatten()
                        .any(|p| p.name.as_deref() == Some(port));
                    assert!(declared, "{name}: the Service has no port named {port}");
                }
            }
            other => panic!("{name}: unexpected kind {other}"),
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ztunnel-dashboard.json")).unwrap())
            .unwrap();
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| p.len() >= 10));
    let out = match std::process::Command::new("kubectl")
        .args(["kustomize"])
        .arg(&dir)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED the render: kubectl not found ({e})");
            return;
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Vec<Value> =
        ambient_common::yaml::documents(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let cm = rendered
        .iter()
        .find(|o| o["kind"] == "ConfigMap")
        .expect("the dashboard ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let embedded: serde_json::Value =
        serde_json::from_str(cm["data"]["ztunnel-dashboard.json"].as_str().unwrap()).unwrap();
    assert_eq!(embedded, dashboard);
}

/// Every workload runs only on Linux nodes (a Windows node in the cluster would otherwise get
/// pods that can never start).
#[test]
fn every_workload_selects_linux_nodes() {
    for (owner, pod) in pod_templates() {
        let sel = pod.node_selector.unwrap_or_default();
        assert_eq!(
            sel.get("kubernetes.io/os").map(String::as_str),
            Some("linux"),
            "{owner}: {sel:?}"
        );
    }
}

/// The cleanup DaemonSet (applied at uninstall) runs the same image as the data plane: both
/// kustomizations take it from the one component `image/`, so an image override reaches the
/// uninstall too.
#[test]
fn the_cleanup_daemonset_gets_the_same_image_override() {
    let images = |dir: &Path| -> BTreeSet<String> {
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("kubectl (Debian's kubernetes-client)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ambient_common::yaml::documents::<Value>(&String::from_utf8(out.stdout).unwrap())
            .unwrap()
            .into_iter()
            .filter_map(|o| {
                serde_json::from_value::<PodSpec>(o["spec"]["template"]["spec"].clone()).ok()
            })
            .flat_map(|p| {
                all_containers(&p)
                    .filter_map(|c| c.image.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let main = images(Path::new(DIR));
    let cleanup = images(&Path::new(DIR).join("cleanup"));
    assert_eq!(main.len(), 1, "{main:?}");
    assert_eq!(cleanup, main);
    for k in ["kustomization.yaml", "cleanup/kustomization.yaml"] {
        let doc = &documents(&Path::new(DIR).join(k))[0];
        assert!(
            doc["components"]
                .as_array()
                .is_some_and(|c| c.iter().any(|x| x.as_str().unwrap().ends_with("image"))),
            "{k} does not use the image component"
        );
        assert!(doc["images"].is_null(), "{k} sets images of its own");
    }
}

/// ztunnel's memory request covers what it was measured to need in a 10,000-pod cluster
/// (heap of the cluster view 65 MiB with 10,000 pods and 1,000 Services, plus 6-7 MiB idle
/// and connections; docs/performance.md): a request below that gets the pod evicted first
/// under memory pressure on exactly the nodes that need it.
#[test]
fn ztunnel_requests_the_memory_it_was_measured_to_use() {
    let ds: DaemonSet = find("DaemonSet", "ztunnel");
    let z = container(&ds, "ztunnel");
    let r = z.resources.unwrap();
    let mib = |q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| -> u64 {
        let s = q.0.as_str();
        if let Some(n) = s.strip_suffix("Mi") {
            n.parse().unwrap()
        } else if let Some(n) = s.strip_suffix("Gi") {
            n.parse::<u64>().unwrap() * 1024
        } else {
            panic!("unexpected quantity {s}")
        }
    };
    let request = mib(&r.requests.unwrap()["memory"]);
    let limit = mib(&r.limits.unwrap()["memory"]);
    assert!(request >= 65 + 7 + 17, "request {request} MiB");
    assert!(
        limit >= 4 * request,
        "limit {limit} MiB, request {request} MiB"
    );
}

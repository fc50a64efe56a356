//! The Kubernetes manifests in install/manifests: every document parses into its k8s-openapi
//! type without losing a field, `kubectl kustomize` renders them, RBAC covers the calls the
//! installer makes, and the DaemonSets mount the paths and expose the ports the binaries use
//! (read from `ambient_common::constants`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ambient_common::constants as c;
use clap::Parser;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
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
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
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
    let rendered: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
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
        assert!(call.namespaced);
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
            assert!(
                !rule["verbs"].as_array().unwrap().iter().any(|v| [
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

fn container(ds: &DaemonSet, name: &str) -> Container {
    ds.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers
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
    let vols = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .clone()
        .unwrap();
    c.volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            let v = vols.iter().find(|v| v.name == m.name).unwrap();
            let host = v
                .host_path
                .as_ref()
                .map(|h| h.path.clone())
                .unwrap_or_else(|| {
                    format!(
                        "secret:{}",
                        v.secret.as_ref().unwrap().secret_name.clone().unwrap()
                    )
                });
            (m.mount_path.clone(), host, m.mount_propagation.clone())
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
    assert!(
        host_ip < metrics,
        "HOST_IP must come before the variable that expands it"
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
    assert!(
        m.iter()
            .any(|(p, h, _)| p == "/etc/ambient/ca" && h == "secret:ambient-ca"),
        "{m:?}"
    );
    let args = z.args.clone().unwrap();
    assert!(args.contains(&format!("--agent-socket={}", c::ZTUNNEL_SOCKET)));
    assert!(args.contains(&"--ca-dir=/etc/ambient/ca".to_string()));
    let ports: Vec<(String, i32)> = z
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    assert!(ports.contains(&("hbone".into(), i32::from(c::HBONE_PORT))));
    assert!(ports.contains(&("metrics".into(), i32::from(c::METRICS_PORT))));
    assert!(ports.contains(&("readiness".into(), i32::from(c::READINESS_PORT))));
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

//! The CNI contract, end to end through the built binary: every command at every supported
//! version against a fake agent, and the error paths.

mod support;

use std::os::unix::net::UnixListener;

use ambient_common::agent_api::{
    AddOutcome, AgentError, AgentOp, AgentReply, AttachmentKey, ErrorKind, AGENT_API_VERSION,
};
use ambient_common::constants::SUPPORTED_CNI_VERSIONS;
use serde_json::{json, Value};
use support::*;

#[test]
fn version_lists_the_supported_versions() {
    for stdin in [&b""[..], br#"{"cniVersion":"0.3.0"}"#, b"not json"] {
        let v = run(&command_env("VERSION"), stdin).printed();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_CNI_VERSIONS));
    }
}

#[test]
fn add_at_every_version_prints_prev_result_converted_and_enrols() {
    for conf_version in SUPPORTED_CNI_VERSIONS {
        for prev_version in ["0.4.0", "1.0.0"] {
            let sb = Sandbox::new();
            let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
                .expect("fake agent");
            let conf = sb.conf(
                conf_version,
                json!({"prevResult": bridge_result(prev_version)}),
            );
            let out = run_json(&attach_env("ADD"), &conf).printed();
            let mut want = bridge_result(conf_version);
            want["cniVersion"] = json!(conf_version);
            assert_eq!(
                out, want,
                "config {conf_version}, prevResult {prev_version}"
            );

            let reqs = agent.requests();
            assert_eq!(reqs.len(), 1);
            assert_eq!(reqs[0].version, AGENT_API_VERSION);
            let AgentOp::Add(a) = &reqs[0].op else {
                panic!("{reqs:?}")
            };
            assert_eq!(a.host_interface, "vetha15f5011");
            assert_eq!(a.netns, "/var/run/netns/cni-test");
            assert_eq!(a.key.container_id, "c0ffee");
            assert_eq!(a.key.ifname, "eth0");
            assert_eq!(
                (a.pod.namespace.as_str(), a.pod.name.as_str()),
                ("e2e-ns", "e2e-pod")
            );
            assert_eq!(a.pod.uid.as_deref(), Some("uid-1"));
            assert_eq!(a.ips, vec!["10.244.77.2/24".parse().unwrap()]);
        }
    }
}

#[test]
fn add_with_a_ptp_result_finds_the_only_host_interface() {
    let sb = Sandbox::new();
    let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::NotAmbient))
        .expect("fake agent");
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "veth77aa"}, {"name": "eth0", "sandbox": "/var/run/netns/cni-test"}],
        "ips": [{"address": "10.1.2.3/32", "interface": 1}, {"address": "fd00::3/128", "interface": 1}],
    });
    let out = run_json(
        &attach_env("ADD"),
        &sb.conf("1.0.0", json!({"prevResult": prev})),
    )
    .printed();
    assert_eq!(out, prev);
    let AgentOp::Add(a) = &agent.requests()[0].op else {
        panic!()
    };
    assert_eq!(a.host_interface, "veth77aa");
    assert_eq!(a.ips.len(), 2);
}

#[test]
fn del_at_every_version() {
    for v in SUPPORTED_CNI_VERSIONS {
        let sb = Sandbox::new();
        let agent = FakeAgent::replying(&sb.socket(), AgentReply::Released).expect("fake agent");
        let conf = sb.conf(v, json!({"prevResult": bridge_result(v)}));
        run_json(&attach_env("DEL"), &conf).silent_success();
        let reqs = agent.requests();
        let AgentOp::Del(r) = &reqs[0].op else {
            panic!("{reqs:?}")
        };
        assert_eq!(
            r.key,
            AttachmentKey {
                container_id: "c0ffee".into(),
                ifname: "eth0".into()
            }
        );
        assert_eq!(r.pod.as_ref().unwrap().name, "e2e-pod");
    }
}

#[test]
fn del_with_empty_netns_and_no_prev_result_succeeds_agent_up_or_down() {
    let (mut env, mut stdin) = fixture("containerd-remove-del");
    assert_eq!(env["CNI_NETNS"], "");
    let sb = Sandbox::new();
    merge(&mut stdin, sb.conf("1.0.0", json!({})));
    {
        let agent = FakeAgent::replying(&sb.socket(), AgentReply::Released).expect("fake agent");
        run_json(&env, &stdin).silent_success();
        assert!(matches!(agent.requests()[0].op, AgentOp::Del(_)));
    }
    // The agent is gone now: DEL still succeeds, and says why in the log.
    let ran = run_json(&env, &stdin);
    ran.silent_success();
    assert!(
        ran.stderr.contains("no answer from the node agent for DEL"),
        "{}",
        ran.stderr
    );
    env.remove("CNI_NETNS");
    run_json(&env, &stdin).silent_success();
}

#[test]
fn del_fails_when_the_agent_refuses() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::replying(
        &sb.socket(),
        AgentReply::Error(AgentError::new(ErrorKind::Internal, "nft batch failed")),
    )
    .expect("fake agent");
    let ran = run_json(&attach_env("DEL"), &sb.conf("1.0.0", json!({})));
    let e = ran.error(100);
    assert!(
        e["msg"].as_str().unwrap().contains("nft batch failed"),
        "{e}"
    );
}

#[test]
fn check_at_every_version() {
    for v in SUPPORTED_CNI_VERSIONS {
        let sb = Sandbox::new();
        let agent = FakeAgent::replying(&sb.socket(), AgentReply::Checked).expect("fake agent");
        let conf = sb.conf(v, json!({"prevResult": bridge_result(v)}));
        let ran = run_json(&attach_env("CHECK"), &conf);
        if v.starts_with("0.3") {
            let e = ran.error(1);
            assert!(
                e["msg"].as_str().unwrap().contains("does not allow CHECK"),
                "{e}"
            );
            assert!(agent.requests().is_empty());
        } else {
            ran.silent_success();
            let AgentOp::Check(a) = &agent.requests()[0].op else {
                panic!()
            };
            assert_eq!(a.host_interface, "vetha15f5011");
        }
    }
}

#[test]
fn check_failures() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::replying(
        &sb.socket(),
        AgentReply::Error(AgentError::new(
            ErrorKind::CheckFailed,
            "capture rule missing",
        )),
    )
    .expect("fake agent");
    let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    let e = run_json(&attach_env("CHECK"), &conf).error(101);
    assert!(e["msg"].as_str().unwrap().contains("capture rule missing"));
    let e = run_json(&attach_env("CHECK"), &sb.conf("1.0.0", json!({}))).error(7);
    assert!(e["msg"].as_str().unwrap().contains("prevResult"));
}

#[test]
fn status_at_every_version() {
    for v in SUPPORTED_CNI_VERSIONS {
        let sb = Sandbox::new();
        let agent = FakeAgent::replying(&sb.socket(), AgentReply::Ready).expect("fake agent");
        let ran = run_json(&command_env("STATUS"), &sb.conf(v, json!({})));
        if *v == "1.1.0" {
            ran.silent_success();
            assert_eq!(agent.requests()[0].op, AgentOp::Status);
        } else {
            ran.error(1);
        }
    }
    let sb = Sandbox::new();
    let conf = sb.conf("1.1.0", json!({}));
    let e = run_json(&command_env("STATUS"), &conf).error(50);
    assert!(e["msg"].as_str().unwrap().contains("cni.sock"), "{e}");
    let _agent = FakeAgent::replying(
        &sb.socket(),
        AgentReply::Error(AgentError::new(
            ErrorKind::NotReady,
            "pod source not synced",
        )),
    )
    .expect("fake agent");
    let e = run_json(&command_env("STATUS"), &conf).error(50);
    assert!(e["msg"].as_str().unwrap().contains("not synced"), "{e}");
}

#[test]
fn gc_at_every_version_passes_the_valid_attachments() {
    let valid = json!([
        {"containerID": "aaa", "ifname": "eth0"},
        {"containerID": "bbb", "ifname": "net1"}
    ]);
    for v in SUPPORTED_CNI_VERSIONS {
        let sb = Sandbox::new();
        let agent = FakeAgent::replying(&sb.socket(), AgentReply::Collected { released: 3 })
            .expect("fake agent");
        let conf = sb.conf(v, json!({"cni.dev/valid-attachments": valid}));
        let ran = run_json(&command_env("GC"), &conf);
        if *v != "1.1.0" {
            ran.error(1);
            continue;
        }
        ran.silent_success();
        let AgentOp::Gc { valid } = &agent.requests()[0].op else {
            panic!()
        };
        let keys: Vec<(&str, &str)> = valid
            .iter()
            .map(|r| (r.key.container_id.as_str(), r.key.ifname.as_str()))
            .collect();
        assert_eq!(keys, [("aaa", "eth0"), ("bbb", "net1")]);
    }
}

#[test]
fn gc_edge_cases() {
    let sb = Sandbox::new();
    // Agent down: nothing to collect until it is back.
    let conf = sb.conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    run_json(&command_env("GC"), &conf).silent_success();
    // No list at all: refuse rather than collect everything.
    let e = run_json(&command_env("GC"), &sb.conf("1.1.0", json!({}))).error(7);
    assert!(e["msg"].as_str().unwrap().contains("valid-attachments"));
    let bad = sb.conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": 1}]}),
    );
    run_json(&command_env("GC"), &bad).error(7);
}

#[test]
fn garbage_stdin_is_a_decoding_failure() {
    for stdin in [
        &b""[..],
        b"{",
        b"\xff\xfe",
        b"[]",
        b"\"str\"",
        b"{\"cniVersion\": 1.0.0}",
    ] {
        let e = run(&attach_env("ADD"), stdin).error(6);
        assert_eq!(e["cniVersion"], "1.1.0");
    }
}

#[test]
fn missing_environment_is_code_4_naming_the_variable() {
    let sb = Sandbox::new();
    let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    for (command, var) in [
        ("ADD", "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME"),
        ("ADD", "CNI_NETNS"),
        ("CHECK", "CNI_NETNS"),
        ("DEL", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME"),
    ] {
        let mut env = attach_env(command);
        env.remove(var);
        let e = run_json(&env, &conf).error(4);
        assert!(
            e["msg"].as_str().unwrap().contains(var),
            "{command} {var}: {e}"
        );
        assert_eq!(e["cniVersion"], "1.0.0");
    }
    let mut env = attach_env("ADD");
    env.insert("CNI_COMMAND".into(), "FROB".into());
    let e = run_json(&env, &conf).error(4);
    assert!(e["msg"].as_str().unwrap().contains("FROB"));
}

#[test]
fn malformed_cni_args_is_code_4_naming_the_pair() {
    let sb = Sandbox::new();
    let mut env = attach_env("ADD");
    env.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=ns;bogus-pair;K8S_POD_NAME=p".into(),
    );
    let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    let e = run_json(&env, &conf).error(4);
    assert!(e["msg"].as_str().unwrap().contains("\"bogus-pair\""), "{e}");
}

#[test]
fn unsupported_versions_are_code_1() {
    let sb = Sandbox::new();
    for v in [json!("0.2.0"), json!("1.2.0"), json!(""), Value::Null] {
        let mut conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
        conf["cniVersion"] = v.clone();
        let e = run_json(&attach_env("ADD"), &conf).error(1);
        assert_eq!(e["cniVersion"], "1.1.0", "{v}");
    }
    let mut prev = bridge_result("1.0.0");
    prev["cniVersion"] = json!("0.2.0");
    run_json(
        &attach_env("ADD"),
        &sb.conf("1.0.0", json!({"prevResult": prev})),
    )
    .error(1);
}

#[test]
fn add_without_prev_result_says_to_chain_the_plugin() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    let e = run_json(&attach_env("ADD"), &sb.conf("1.1.0", json!({}))).error(7);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains("chained after a primary plugin"), "{msg}");
    assert_eq!(e["cniVersion"], "1.1.0");
}

#[test]
fn bad_config_values_are_code_7_naming_every_field() {
    let sb = Sandbox::new();
    let conf = sb.conf(
        "1.0.0",
        json!({"prevResult": bridge_result("1.0.0"), "timeoutMs": "soon", "agentUnreachable": "ignore"}),
    );
    let e = run_json(&attach_env("ADD"), &conf).error(7);
    let msg = e["msg"].as_str().unwrap();
    assert!(
        msg.contains("timeoutMs") && msg.contains("agentUnreachable"),
        "{msg}"
    );
}

#[test]
fn agent_down_at_add_fails_closed_with_a_clear_message() {
    let sb = Sandbox::new();
    let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    let e = run_json(&attach_env("ADD"), &conf).error(11);
    let msg = e["msg"].as_str().unwrap();
    assert!(msg.contains(sb.socket().to_str().unwrap()), "{msg}");
    assert!(msg.contains("not running"), "{msg}");
    // A socket file nobody listens on (agent crashed or restarting).
    drop(UnixListener::bind(sb.socket()).unwrap());
    let e = run_json(&attach_env("ADD"), &conf).error(11);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("not accepting connections"),
        "{e}"
    );
}

#[test]
fn agent_down_at_add_passes_excluded_namespaces_through() {
    let sb = Sandbox::new();
    let mut env = attach_env("ADD");
    env.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1".into(),
    );
    let prev = bridge_result("1.0.0");
    let ran = run_json(&env, &sb.conf("1.0.0", json!({"prevResult": prev})));
    assert_eq!(ran.printed(), prev);
    assert!(ran.stderr.contains("excluded"), "{}", ran.stderr);
    // A configured list replaces the default.
    let conf = sb.conf(
        "1.0.0",
        json!({"prevResult": prev, "excludedNamespaces": ["infra"]}),
    );
    run_json(&env, &conf).error(11);
    env.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=infra;K8S_POD_NAME=x".into(),
    );
    assert_eq!(run_json(&env, &conf).printed(), prev);
}

#[test]
fn agent_down_at_add_with_allow_policy_passes_through() {
    let sb = Sandbox::new();
    let prev = bridge_result("0.4.0");
    let conf = sb.conf(
        "0.4.0",
        json!({"prevResult": prev, "agentUnreachable": "allow"}),
    );
    let ran = run_json(&attach_env("ADD"), &conf);
    assert_eq!(ran.printed(), prev);
    assert!(ran.stderr.contains("UNENROLLED"), "{}", ran.stderr);
}

#[test]
fn agent_errors_map_to_codes() {
    for (kind, code) in [
        (ErrorKind::IncompatibleVersion, 103),
        (ErrorKind::InvalidRequest, 7),
        (ErrorKind::TryAgainLater, 11),
        (ErrorKind::NotReady, 11),
        (ErrorKind::CheckFailed, 101),
        (ErrorKind::Internal, 100),
    ] {
        let sb = Sandbox::new();
        let _agent = FakeAgent::replying(
            &sb.socket(),
            AgentReply::Error(AgentError::new(kind, "agent says no")),
        )
        .expect("fake agent");
        let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
        let e = run_json(&attach_env("ADD"), &conf).error(code);
        assert!(
            e["msg"].as_str().unwrap().contains("agent says no"),
            "{kind:?}: {e}"
        );
    }
}

#[test]
fn a_garbled_or_silent_agent() {
    let sb = Sandbox::new();
    let conf = sb.conf(
        "1.0.0",
        json!({"prevResult": bridge_result("1.0.0"), "timeoutMs": 200}),
    );
    {
        let _agent = FakeAgent::answering(&sb.socket(), |_| {
            Answer::Garbage(b"\0\0\0\x05hello".to_vec())
        })
        .expect("fake agent");
        run_json(&attach_env("ADD"), &conf).error(102);
    }
    let _ = std::fs::remove_file(sb.socket());
    {
        let _agent = FakeAgent::replying(&sb.socket(), AgentReply::Released).expect("fake agent");
        run_json(&attach_env("ADD"), &conf).error(102);
    }
    let _ = std::fs::remove_file(sb.socket());
    let _agent = FakeAgent::answering(&sb.socket(), |_| Answer::Silent).expect("fake agent");
    let e = run_json(&attach_env("ADD"), &conf).error(11);
    assert!(e["msg"].as_str().unwrap().contains("200 ms"), "{e}");
}

#[test]
fn non_kubernetes_pods_pass_through_without_the_agent() {
    let (env, mut stdin) = fixture("podman-add-pod");
    let sb = Sandbox::new();
    let prev = stdin["prevResult"].clone();
    merge(&mut stdin, sb.conf("1.0.0", json!({})));
    let agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    let ran = run_json(&env, &stdin);
    assert_eq!(ran.printed(), prev);
    assert!(ran.stderr.contains("podman"), "{}", ran.stderr);
    assert!(agent.requests().is_empty());
}

#[test]
fn every_captured_runtime_call_is_accepted() {
    for name in [
        "containerd-add",
        "containerd-del",
        "containerd-remove-del",
        "containerd-add-no-portmap",
        "containerd-del-after-failed-add",
        "podman-add-pod",
        "podman-add-ctr",
        "podman-del-ctr",
        "podman-del-pod",
        "cnitool-add",
        "cnitool-del",
        "cnitool-add-2",
        "cnitool-check",
        "cnitool-del-2",
    ] {
        let (env, mut stdin) = fixture(name);
        let sb = Sandbox::new();
        let agent = FakeAgent::answering(&sb.socket(), |req| {
            Answer::Reply(match req.op {
                AgentOp::Add(_) => AgentReply::Added(AddOutcome::Captured),
                AgentOp::Del(_) => AgentReply::Released,
                AgentOp::Check(_) => AgentReply::Checked,
                AgentOp::Status => AgentReply::Ready,
                AgentOp::Gc { .. } => AgentReply::Collected { released: 0 },
            })
        })
        .expect("fake agent");
        let prev = stdin.get("prevResult").cloned();
        // Keep the runtime's keys (runtimeConfig, capabilities, unknown ones); point ours here.
        merge(
            &mut stdin,
            json!({"agentSocket": sb.socket(), "sysfsRoot": sb.dir.path().join("sys"), "logFile": sb.log_file()}),
        );
        let ran = run_json(&env, &stdin);
        match env["CNI_COMMAND"].as_str() {
            "ADD" => {
                assert_eq!(ran.printed(), prev.unwrap(), "{name}");
            }
            _ => ran.silent_success(),
        }
        let is_pod = env["CNI_ARGS"].contains("K8S_POD_NAMESPACE");
        let ops = agent.requests();
        match env["CNI_COMMAND"].as_str() {
            "ADD" | "CHECK" if !is_pod => assert!(ops.is_empty(), "{name}"),
            _ => assert_eq!(ops.len(), 1, "{name}"),
        }
        if let Some(AgentOp::Add(a) | AgentOp::Check(a)) = ops.first().map(|r| &r.op) {
            assert!(a.host_interface.starts_with("veth"), "{name}: {a:?}");
        }
    }
}

#[test]
fn runtime_config_shapes_are_accepted() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    for rc in [
        json!({"portMappings": [{"HostPort": 18090, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""}],
               "io.kubernetes.cri.pod-annotations": {"a": "b"}}),
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}),
        json!({"io.kubernetes.cri.pod-annotations": null}),
        json!({"anything": [1, "two", {"three": null}]}),
    ] {
        let conf = sb.conf(
            "1.0.0",
            json!({"prevResult": bridge_result("1.0.0"), "runtimeConfig": rc, "capabilities": {"portMappings": true}, "somethingElse": 1}),
        );
        run_json(&attach_env("ADD"), &conf).printed();
    }
}

#[test]
fn logs_go_to_the_file_as_json_lines_and_never_to_stdout() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::replying(&sb.socket(), AgentReply::Added(AddOutcome::Captured))
        .expect("fake agent");
    let conf = sb.conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    run_json(&attach_env("ADD"), &conf).printed();
    let log = std::fs::read_to_string(sb.log_file()).unwrap();
    assert!(!log.is_empty());
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some(), "{line}");
    }
    assert!(
        log.contains("c0ffee"),
        "the span carries the container id: {log}"
    );
    // An unwritable log file never fails the pod.
    let conf = sb.conf(
        "1.0.0",
        json!({"prevResult": bridge_result("1.0.0"), "logFile": "/nonexistent-dir/x.log"}),
    );
    let ran = run_json(&attach_env("ADD"), &conf);
    ran.printed();
    assert!(ran.stderr.contains("cannot open logFile"), "{}", ran.stderr);
}

#[cfg(debug_assertions)]
#[test]
fn a_panic_still_prints_a_cni_error() {
    let mut env = command_env("VERSION");
    env.insert("AMBIENT_CNI_PANIC_FOR_TEST".into(), "1".into());
    let ran = run(&env, br#"{"cniVersion":"0.4.0"}"#);
    let e = ran.error(999);
    assert_eq!(e["cniVersion"], "0.4.0");
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("AMBIENT_CNI_PANIC_FOR_TEST"),
        "{e}"
    );
    assert_eq!(ran.stdout.lines().count(), 1, "{ran:?}");
}

#[test]
fn a_silent_agent_does_not_block_excluded_namespaces() {
    let sb = Sandbox::new();
    let _agent = FakeAgent::answering(&sb.socket(), |_| Answer::Silent).expect("fake agent");
    let mut env = attach_env("ADD");
    env.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1".into(),
    );
    let prev = bridge_result("1.0.0");
    let conf = sb.conf("1.0.0", json!({"prevResult": prev, "timeoutMs": 200}));
    assert_eq!(run_json(&env, &conf).printed(), prev);
    // DEL against the same silent agent succeeds too (the agent reconciles on its own).
    run_json(&attach_env("DEL"), &conf).silent_success();
}

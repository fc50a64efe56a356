//! The plugin as shipped runs on any Linux host: the static build (`scripts/static-plugin.sh`)
//! answers VERSION, ADD and DEL against a fake agent inside an empty chroot that holds no
//! libc, no loader, nothing but the plugin, its sysfs view and the agent's socket; the
//! ordinary (dynamically linked) build cannot even start there. Needs root (chroot).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ambient_common::agent_api::{AddOutcome, AgentOp, AgentReply};
use ambient_common::constants::SUPPORTED_CNI_VERSIONS;
use serde_json::{json, Value};
use support::*;

/// The static build beside the ordinary one: `<target>/x86_64-unknown-linux-gnu/<profile>/`.
fn static_plugin() -> PathBuf {
    let dynamic = Path::new(env!("CARGO_BIN_EXE_ambient-cni"));
    let profile_dir = dynamic.parent().unwrap();
    let target = profile_dir.parent().unwrap();
    let path = target
        .join("x86_64-unknown-linux-gnu")
        .join(profile_dir.file_name().unwrap())
        .join("ambient-cni");
    assert!(
        path.exists(),
        "{} is missing: build it with scripts/static-plugin.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs `/ambient-cni` inside `root` with exactly `env` and `stdin`.
fn in_chroot(root: &Path, env: &HashMap<String, String>, stdin: &Value) -> Ran {
    run_program(
        "/usr/sbin/chroot",
        &[root.to_str().unwrap(), "/ambient-cni"],
        env,
        &serde_json::to_vec(stdin).unwrap(),
    )
}

/// The plugin's configuration with paths as the chrooted plugin sees them.
fn conf(version: &str, extra: Value) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ambient-cni",
        "agentSocket": "/cni.sock",
        "sysfsRoot": "/sys",
        "logFile": "/plugin.log",
        "logLevel": "debug",
        "timeoutMs": 5000,
    });
    merge(&mut c, extra);
    c
}

#[test]
fn the_static_plugin_runs_in_an_empty_chroot_and_the_dynamic_one_does_not() {
    let sb = Sandbox::new();
    let root = sb.dir.path();
    let plugin = root.join("ambient-cni");

    // Seen failing first: the ordinary build needs a loader and a libc that are not there.
    std::fs::copy(env!("CARGO_BIN_EXE_ambient-cni"), &plugin).unwrap();
    let ran = in_chroot(root, &command_env("VERSION"), &json!({}));
    assert_ne!(
        ran.status, 0,
        "the dynamic build ran without a libc: {ran:?}"
    );
    assert!(ran.stdout.is_empty(), "{ran:?}");

    std::fs::copy(static_plugin(), &plugin).unwrap();
    let entries: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !entries
            .iter()
            .any(|e| e == "lib" || e == "lib64" || e == "usr"),
        "the chroot must hold no libc: {entries:?}"
    );

    let v = in_chroot(
        root,
        &command_env("VERSION"),
        &json!({"cniVersion": "1.0.0"}),
    )
    .printed();
    assert_eq!(v["supportedVersions"], json!(SUPPORTED_CNI_VERSIONS));

    let agent = FakeAgent::answering(&sb.socket(), |req| match req.op {
        AgentOp::Add(_) => Answer::Reply(AgentReply::Added(AddOutcome::Captured)),
        _ => Answer::Reply(AgentReply::Released),
    })
    .expect("fake agent");
    let add = conf("1.0.0", json!({"prevResult": bridge_result("1.0.0")}));
    let out = in_chroot(root, &attach_env("ADD"), &add).printed();
    assert_eq!(out, bridge_result("1.0.0"), "prevResult passed through");
    in_chroot(root, &attach_env("DEL"), &add).silent_success();

    let reqs = agent.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let AgentOp::Add(a) = &reqs[0].op else {
        panic!("{reqs:?}")
    };
    assert_eq!(a.host_interface, "vetha15f5011");
    assert_eq!(a.pod.name, "e2e-pod");
    assert!(matches!(reqs[1].op, AgentOp::Del(_)), "{reqs:?}");
    // Its log went where the configuration said, inside the chroot.
    let log = std::fs::read_to_string(root.join("plugin.log")).unwrap();
    assert!(log.contains("ADD"), "{log}");
}

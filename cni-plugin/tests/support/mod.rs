//! Shared by the integration tests: a sandbox (agent socket path, fake sysfs, log file) for
//! the lab's fake node agent, and a runner for the built plugin binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

/// The lab's stand-in node agent (one copy, in the lab crate).
#[allow(unused_imports)] // not every test file answers with garbage or silence
pub use ambient_tests::fake_agent::{Answer, FakeAgent};

/// A temp dir holding the agent socket path, a fake sysfs (with `cni0` as a bridge, as on a
/// node running the `bridge` plugin) and the plugin's log file.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys/class/net/cni0/bridge")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/class/net/cni-hpod0/bridge")).unwrap();
        Self { dir }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("plugin.log")
    }

    /// The plugin's configuration at `version`, pointing at this sandbox, plus `extra` keys.
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "k8s-pod-network",
            "type": "ambient-cni",
            "agentSocket": self.socket(),
            "sysfsRoot": self.dir.path().join("sys"),
            "logFile": self.log_file(),
            "logLevel": "debug",
            "timeoutMs": 5000,
        });
        merge(&mut c, extra);
        c
    }
}

pub fn merge(into: &mut Value, extra: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, extra) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

/// A `bridge`-plugin result as containerd passes it, in the shape of `version`.
pub fn bridge_result(version: &str) -> Value {
    let mut ip = json!({"address": "10.244.77.2/24", "gateway": "10.244.77.1", "interface": 2});
    if version.starts_with('0') {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "dns": {},
        "interfaces": [
            {"mac": "3e:22:78:98:4d:88", "name": "cni0"},
            {"mac": "c6:c5:35:f3:40:05", "name": "vetha15f5011"},
            {"mac": "b6:d3:6a:68:f2:4d", "name": "eth0", "sandbox": "/var/run/netns/cni-test"}
        ],
        "ips": [ip],
    })
}

pub const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e-ns;K8S_POD_NAME=e2e-pod;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=uid-1";

/// The environment of an attachment command.
pub fn attach_env(command: &str) -> HashMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/cni-test"),
        ("CNI_ARGS", POD_ARGS),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub fn command_env(command: &str) -> HashMap<String, String> {
    [("CNI_COMMAND", command), ("CNI_PATH", "/opt/cni/bin")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Ran {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// Stdout as exactly one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }

    /// Asserts success with a printed result, and returns it.
    pub fn printed(&self) -> Value {
        assert_eq!(self.status, 0, "{self:?}");
        self.json()
    }

    /// Asserts success with nothing on stdout.
    pub fn silent_success(&self) {
        assert_eq!(self.status, 0, "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
    }

    /// Asserts a CNI error with `code` and returns its JSON.
    pub fn error(&self, code: u64) -> Value {
        assert_ne!(self.status, 0, "{self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "{self:?}");
        for key in ["cniVersion", "msg", "details"] {
            assert!(v.get(key).is_some(), "error JSON lacks {key}: {v}");
        }
        v
    }
}

/// Runs the plugin binary with exactly `env` and `stdin`.
pub fn run(env: &HashMap<String, String>, stdin: &[u8]) -> Ran {
    run_program(env!("CARGO_BIN_EXE_ambient-cni"), &[], env, stdin)
}

/// Runs `program args...` with exactly `env` and `stdin`.
pub fn run_program(
    program: &str,
    args: &[&str],
    env: &HashMap<String, String>,
    stdin: &[u8],
) -> Ran {
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin);
    drop(input);
    let out = child.wait_with_output().unwrap();
    Ran {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn run_json(env: &HashMap<String, String>, stdin: &Value) -> Ran {
    run(env, &serde_json::to_vec(stdin).unwrap())
}

/// A fixture from `tests/fixtures`: its env and stdin.
pub fn fixture(name: &str) -> (HashMap<String, String>, Value) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    (
        serde_json::from_value(v["env"].clone()).unwrap(),
        v["stdin"].clone(),
    )
}

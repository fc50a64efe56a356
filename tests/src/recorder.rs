//! A stand-in chained CNI plugin (`cni-recorder` binary) that records every call and passes
//! `prevResult` through, so the chain runner and the runtime tests can check what a chained
//! plugin receives without depending on `ambient-cni`'s progress.
//!
//! Conf keys: `recordFile` (required: JSON lines of [`Call`]), `failAdd` and `failDel`
//! (optional: ADD / DEL then fail with this spec error code).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One recorded invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    pub command: String,
    /// The `CNI_*` variables.
    pub env: BTreeMap<String, String>,
    pub stdin: Value,
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

fn error(code: u32, msg: &str) -> Outcome {
    Outcome {
        stdout: json!({"cniVersion": "1.0.0", "code": code, "msg": msg}).to_string(),
        success: false,
    }
}

/// The whole plugin, given its environment and stdin; appends to the record file itself.
pub fn handle(env: BTreeMap<String, String>, stdin: &[u8]) -> Outcome {
    let command = env.get("CNI_COMMAND").cloned().unwrap_or_default();
    if command == "VERSION" {
        return Outcome {
            stdout: json!({"cniVersion": "1.0.0", "supportedVersions": ambient_common::constants::SUPPORTED_CNI_VERSIONS}).to_string(),
            success: true,
        };
    }
    let conf: Value = match serde_json::from_slice(stdin) {
        Ok(v) => v,
        Err(e) => return error(6, &format!("stdin is not JSON: {e}")),
    };
    let Some(file) = conf
        .get("recordFile")
        .and_then(Value::as_str)
        .map(PathBuf::from)
    else {
        return error(7, "recordFile is required");
    };
    let call = Call {
        command: command.clone(),
        env: env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CNI_"))
            .collect(),
        stdin: conf.clone(),
    };
    if let Err(e) = append(&file, &call) {
        return error(5, &format!("cannot record to {}: {e}", file.display()));
    }
    match command.as_str() {
        "ADD" => {
            if let Some(code) = conf.get("failAdd").and_then(Value::as_u64) {
                return error(code as u32, "failing ADD as configured");
            }
            match conf.get("prevResult") {
                Some(prev) => Outcome {
                    stdout: prev.to_string(),
                    success: true,
                },
                None => error(7, "a chained plugin needs prevResult"),
            }
        }
        "DEL" if conf.get("failDel").is_some_and(Value::is_u64) => {
            let code = conf.get("failDel").and_then(Value::as_u64).unwrap_or(999);
            error(code as u32, "failing DEL as configured")
        }
        "DEL" | "CHECK" | "STATUS" | "GC" => Outcome {
            stdout: String::new(),
            success: true,
        },
        other => error(4, &format!("unknown CNI_COMMAND {other:?}")),
    }
}

fn append(path: &Path, call: &Call) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(call).map_err(std::io::Error::other)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&line)
}

/// Reads the calls recorded in `path` (none when it does not exist yet).
pub fn read_calls(path: &Path) -> Vec<Call> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> BTreeMap<String, String> {
        [("CNI_COMMAND", cmd), ("CNI_NETNS", "/x"), ("HOME", "/root")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn passes_prev_result_and_records() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("calls");
        let stdin = json!({"recordFile": f, "prevResult": {"ips": []}});
        let o = handle(env("ADD"), stdin.to_string().as_bytes());
        assert!(o.success);
        assert_eq!(o.stdout, r#"{"ips":[]}"#);
        let calls = read_calls(&f);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].env.get("CNI_NETNS").unwrap(), "/x");
        assert!(!calls[0].env.contains_key("HOME"));
    }

    #[test]
    fn errors_are_spec_objects() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("calls");
        let o = handle(
            env("ADD"),
            json!({"recordFile": f, "failAdd": 11})
                .to_string()
                .as_bytes(),
        );
        assert!(!o.success);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["code"], 11);
        assert!(!handle(env("ADD"), b"{").success);
        assert!(!handle(env("ADD"), b"{}").success);
        assert!(handle(env("VERSION"), b"").success);
    }

    proptest::proptest! {
        #[test]
        fn any_stdin_is_answered_without_panic(stdin in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let o = handle(env("ADD"), &stdin);
            if !o.success {
                let v: Value = serde_json::from_str(&o.stdout).unwrap();
                proptest::prop_assert!(v["code"].is_u64());
            }
        }
    }
}

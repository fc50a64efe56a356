//! The `CNI_*` environment, parsed by a pure function from a lookup so tests pass a map.

use std::fmt;

use crate::args::{parse_cni_args, ArgsError, CniArgs};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{0} is not set (the container runtime must set it for this command)")]
    Missing(&'static str),
    #[error("CNI_COMMAND={0:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION")]
    UnknownCommand(String),
    #[error("CNI_ARGS is invalid")]
    Args(#[source] ArgsError),
}

/// A CNI operation, from `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The per-attachment variables of ADD, DEL and CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentEnv {
    pub container_id: String,
    pub ifname: String,
    /// `CNI_NETNS`; `None` only for DEL (containerd's RemovePodSandbox sends it empty).
    pub netns: Option<String>,
    pub args: CniArgs,
}

/// The validated environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Present for ADD, DEL and CHECK.
    pub attachment: Option<AttachmentEnv>,
}

/// Reads the `CNI_*` variables through `get` and checks that the command's required ones are
/// there. An empty value counts as unset. `CNI_PATH` is not required: this plugin delegates to
/// no other plugin.
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
    let non_empty = |name: &str| get(name).filter(|v| !v.is_empty());
    let required = |name: &'static str| non_empty(name).ok_or(EnvError::Missing(name));

    let raw = required("CNI_COMMAND")?;
    let command = Command::parse(&raw).ok_or(EnvError::UnknownCommand(raw))?;
    let attachment = match command {
        Command::Add | Command::Check | Command::Del => {
            let container_id = required("CNI_CONTAINERID")?;
            let ifname = required("CNI_IFNAME")?;
            let netns = if command == Command::Del {
                non_empty("CNI_NETNS")
            } else {
                Some(required("CNI_NETNS")?)
            };
            let args =
                parse_cni_args(&get("CNI_ARGS").unwrap_or_default()).map_err(EnvError::Args)?;
            Some(AttachmentEnv {
                container_id,
                ifname,
                netns,
                args,
            })
        }
        Command::Status | Command::Gc | Command::Version => None,
    };
    Ok(CniEnv {
        command,
        attachment,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"),
    ];

    #[test]
    fn add_needs_every_variable() {
        let e = parse_env(env(ADD)).unwrap();
        assert_eq!(e.command, Command::Add);
        let a = e.attachment.unwrap();
        assert_eq!(a.netns.as_deref(), Some("/var/run/netns/x"));
        assert_eq!(a.args.pod().unwrap().name, "p");
        for skip in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"] {
            let without: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != skip).collect();
            let err = parse_env(env(&without)).unwrap_err();
            assert!(err.to_string().contains(skip), "{err}");
            let emptied: Vec<_> = ADD
                .iter()
                .map(|&(k, v)| if k == skip { (k, "") } else { (k, v) })
                .collect();
            assert!(parse_env(env(&emptied)).is_err());
        }
    }

    #[test]
    fn del_accepts_an_empty_netns() {
        let e = parse_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ]))
        .unwrap();
        assert_eq!(e.attachment.unwrap().netns, None);
    }

    #[test]
    fn status_gc_version_need_only_the_command() {
        for c in ["STATUS", "GC", "VERSION"] {
            let e = parse_env(env(&[("CNI_COMMAND", c)])).unwrap();
            assert!(e.attachment.is_none());
        }
    }

    proptest::proptest! {
        #[test]
        fn any_environment_parses_or_fails_cleanly(
            command in proptest::prop_oneof![
                proptest::strategy::Just("ADD".to_string()),
                proptest::strategy::Just("DEL".to_string()),
                proptest::strategy::Just("CHECK".to_string()),
                "\\PC{0,8}"
            ],
            vars in proptest::collection::hash_map(
                proptest::prop_oneof![
                    proptest::strategy::Just("CNI_CONTAINERID".to_string()),
                    proptest::strategy::Just("CNI_IFNAME".to_string()),
                    proptest::strategy::Just("CNI_NETNS".to_string()),
                    proptest::strategy::Just("CNI_ARGS".to_string()),
                ],
                "\\PC{0,40}",
                0..4,
            ),
        ) {
            let mut vars = vars;
            vars.insert("CNI_COMMAND".into(), command);
            if let Ok(e) = parse_env(|k| vars.get(k).cloned()) {
                if let Some(a) = e.attachment {
                    proptest::prop_assert!(!a.container_id.is_empty() && !a.ifname.is_empty());
                    proptest::prop_assert!(e.command == Command::Del || a.netns.is_some());
                }
            }
        }
    }

    #[test]
    fn unknown_command_and_bad_args_are_errors() {
        let err = parse_env(env(&[("CNI_COMMAND", "add")])).unwrap_err();
        assert!(matches!(err, EnvError::UnknownCommand(_)));
        let mut bad: Vec<_> = ADD.to_vec();
        bad.push(("CNI_ARGS", "oops"));
        bad.swap_remove(4);
        let err = parse_env(env(&bad)).unwrap_err();
        assert!(matches!(err, EnvError::Args(_)));
    }
}

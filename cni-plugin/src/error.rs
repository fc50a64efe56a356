//! The plugin's errors and their CNI error codes. [`to_cni_error`] is the one place that maps
//! an error to a code; `main` prints what it returns.
//!
//! | code | meaning |
//! |---|---|
//! | 1 | unsupported `cniVersion` (config or prevResult), or a command the config's version does not have (CHECK before 0.4.0, STATUS and GC before 1.1.0) |
//! | 4 | missing or invalid `CNI_*` variable, malformed `CNI_ARGS` pair |
//! | 5 | reading stdin failed |
//! | 6 | stdin is not a JSON object (or is larger than [`MAX_STDIN`]) |
//! | 7 | invalid configuration field, no `prevResult` on ADD/CHECK, malformed `prevResult`, GC without valid attachments; the agent's `invalid_request` |
//! | 11 | try again later: the agent is unreachable at ADD/CHECK (fail policy), did not answer in time, or answered `try_again_later` / `not_ready` |
//! | 50 | STATUS: the agent is unreachable or not ready |
//! | 100 | the agent failed internally (`internal`, e.g. programming the kernel) |
//! | 101 | CHECK: the agent found the pod's redirection missing or wrong (`check_failed`) |
//! | 102 | the agent's answer was not understood (garbled, or the wrong reply for the request) |
//! | 103 | the agent speaks another contract version (`incompatible_version`): plugin and agent binaries are out of step, as mid-upgrade |
//! | 999 | a bug: the plugin panicked |
//!
//! Why 103 and not 1 for the agent's `incompatible_version`: code 1 tells the runtime that the
//! *CNI* version of the configuration is wrong, which would send an operator to the conflist;
//! the fix here is to finish the upgrade of the plugin binary or the agent.

use ambient_common::agent_api::{AgentError, ErrorKind};
use serde_json::{json, Value};

use crate::agent::AgentCallError;
use crate::config::ConfigError;
use crate::env::{Command, EnvError};
use crate::result::ResultError;
use crate::version::CniVersion;

/// Largest stdin the plugin reads (a GC request for tens of thousands of attachments fits).
pub const MAX_STDIN: u64 = 8 << 20;

/// CNI error codes used by this plugin (1-99 are the spec's, 100+ are this plugin's).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const AGENT_INTERNAL: u32 = 100;
    pub const CHECK_FAILED: u32 = 101;
    pub const AGENT_PROTOCOL: u32 = 102;
    pub const AGENT_VERSION_MISMATCH: u32 = 103;
    pub const PANIC: u32 = 999;
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("reading stdin failed")]
    StdinRead(#[source] std::io::Error),
    #[error("stdin is larger than {MAX_STDIN} bytes")]
    StdinTooLarge,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    PrevResult(#[from] ResultError),
    #[error("{command} got no prevResult: ambient-cni must be chained after a primary plugin (such as bridge or ptp), never used alone")]
    NotChained { command: Command },
    #[error("config version {version} does not allow {command} (it exists from {since})")]
    NotInVersion {
        command: Command,
        version: CniVersion,
        since: CniVersion,
    },
    #[error(
        "GC got no cni.dev/valid-attachments list; refusing to guess which attachments are valid"
    )]
    NoValidAttachments,
    #[error("{command}: cannot reach the node agent, try again later")]
    AgentUnreachable {
        command: Command,
        #[source]
        source: AgentCallError,
    },
    #[error("{command}: the exchange with the node agent failed")]
    AgentExchange {
        command: Command,
        #[source]
        source: AgentCallError,
    },
    #[error("{command}: the node agent refused")]
    AgentRefused {
        command: Command,
        #[source]
        source: AgentError,
    },
    #[error("{command}: the node agent answered {reply}, which is not an answer to {command}")]
    UnexpectedReply { command: Command, reply: String },
}

/// A CNI error as the spec prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    /// The error for a panic (a bug in the plugin).
    pub fn panic(details: impl Into<String>) -> Self {
        Self {
            code: code::PANIC,
            msg: "ambient-cni crashed (this is a bug; please report it with the details)".into(),
            details: details.into(),
        }
    }

    /// The spec's error JSON: `{"cniVersion", "code", "msg", "details"}`.
    pub fn to_json(&self, version: CniVersion) -> Value {
        json!({
            "cniVersion": version.as_str(),
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

pub use ambient_common::error::chain;

/// Maps an error to its CNI code, message and details. The only such mapping in the plugin.
pub fn to_cni_error(err: &PluginError) -> CniError {
    use PluginError as E;
    let status = |c: &Command| *c == Command::Status;
    let (code, details) = match err {
        E::Env(_) => (code::INVALID_ENVIRONMENT, ""),
        E::StdinRead(_) => (code::IO_FAILURE, ""),
        E::StdinTooLarge => (code::DECODING_FAILURE, ""),
        E::Config(ConfigError::Decode(_) | ConfigError::NotObject) => (code::DECODING_FAILURE, ""),
        E::Config(ConfigError::MissingVersion | ConfigError::UnsupportedVersion(_)) => {
            (code::INCOMPATIBLE_VERSION, "")
        }
        E::Config(ConfigError::Fields(_)) => (code::INVALID_NETWORK_CONFIG, ""),
        E::PrevResult(ResultError::UnsupportedVersion(_)) => (code::INCOMPATIBLE_VERSION, ""),
        E::PrevResult(ResultError::NotObject | ResultError::Field { .. }) => {
            (code::INVALID_NETWORK_CONFIG, "")
        }
        E::NotChained { .. } | E::NoValidAttachments => (code::INVALID_NETWORK_CONFIG, ""),
        E::NotInVersion { .. } => (code::INCOMPATIBLE_VERSION, ""),
        E::AgentUnreachable { command, .. } if status(command) => {
            (code::PLUGIN_NOT_AVAILABLE, "the node agent is not running")
        }
        E::AgentUnreachable { .. } => (
            code::TRY_AGAIN_LATER,
            "fail closed: the pod may be ambient and cannot be enrolled without the node agent; the runtime retries",
        ),
        E::AgentExchange { command, .. } if status(command) => (code::PLUGIN_NOT_AVAILABLE, ""),
        E::AgentExchange {
            source: AgentCallError::Timeout { .. } | AgentCallError::ConnectTimeout { .. },
            ..
        } => (
            code::TRY_AGAIN_LATER,
            "the agent may be waiting for its pod source or for ztunnel; the runtime retries",
        ),
        E::AgentExchange { .. } => (code::AGENT_PROTOCOL, ""),
        E::UnexpectedReply { command, .. } if status(command) => (code::PLUGIN_NOT_AVAILABLE, ""),
        E::UnexpectedReply { .. } => (code::AGENT_PROTOCOL, ""),
        E::AgentRefused { command, .. } if status(command) => (code::PLUGIN_NOT_AVAILABLE, ""),
        E::AgentRefused { source, .. } => match source.kind {
            ErrorKind::IncompatibleVersion => (
                code::AGENT_VERSION_MISMATCH,
                "the plugin binary and the node agent are from different releases; finish the upgrade",
            ),
            ErrorKind::InvalidRequest => (code::INVALID_NETWORK_CONFIG, ""),
            ErrorKind::TryAgainLater | ErrorKind::NotReady => (code::TRY_AGAIN_LATER, ""),
            ErrorKind::CheckFailed => (code::CHECK_FAILED, ""),
            ErrorKind::Internal => (code::AGENT_INTERNAL, ""),
        },
    };
    CniError {
        code,
        msg: chain(err),
        details: details.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::ArgsError;
    use std::path::PathBuf;

    fn refused(command: Command, kind: ErrorKind) -> PluginError {
        PluginError::AgentRefused {
            command,
            source: AgentError::new(kind, "because"),
        }
    }

    fn unreachable(command: Command) -> PluginError {
        PluginError::AgentUnreachable {
            command,
            source: AgentCallError::NoSocket {
                socket: PathBuf::from("/run/x.sock"),
                source: std::io::ErrorKind::NotFound.into(),
            },
        }
    }

    #[test]
    fn agent_error_kinds_map_to_codes() {
        for (kind, add, status) in [
            (ErrorKind::IncompatibleVersion, 103, 50),
            (ErrorKind::InvalidRequest, 7, 50),
            (ErrorKind::TryAgainLater, 11, 50),
            (ErrorKind::NotReady, 11, 50),
            (ErrorKind::CheckFailed, 101, 50),
            (ErrorKind::Internal, 100, 50),
        ] {
            assert_eq!(
                to_cni_error(&refused(Command::Add, kind)).code,
                add,
                "{kind:?}"
            );
            assert_eq!(to_cni_error(&refused(Command::Status, kind)).code, status);
        }
        let e = to_cni_error(&refused(Command::Add, ErrorKind::Internal));
        assert!(e.msg.contains("because"), "{}", e.msg);
    }

    #[test]
    fn unreachable_depends_on_the_command() {
        let add = to_cni_error(&unreachable(Command::Add));
        assert_eq!(add.code, 11);
        assert!(
            add.msg.contains("/run/x.sock") && add.msg.contains("not running"),
            "{}",
            add.msg
        );
        assert_eq!(to_cni_error(&unreachable(Command::Status)).code, 50);
    }

    #[test]
    fn input_errors() {
        let args = PluginError::Env(EnvError::Args(ArgsError::Malformed { pair: "zz".into() }));
        let e = to_cni_error(&args);
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("\"zz\""), "{}", e.msg);
        assert_eq!(
            to_cni_error(&PluginError::Env(EnvError::Missing("CNI_NETNS"))).code,
            4
        );
        assert_eq!(
            to_cni_error(&PluginError::Config(ConfigError::UnsupportedVersion(
                "2".into()
            )))
            .code,
            1
        );
        assert_eq!(
            to_cni_error(&PluginError::Config(ConfigError::NotObject)).code,
            6
        );
        assert_eq!(
            to_cni_error(&PluginError::NotChained {
                command: Command::Add
            })
            .code,
            7
        );
    }

    #[test]
    fn json_shape() {
        let v = CniError::panic("boom").to_json(CniVersion::V0_4_0);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 999);
        assert_eq!(v["details"], "boom");
        assert!(v["msg"].as_str().unwrap().contains("bug"));
    }
}

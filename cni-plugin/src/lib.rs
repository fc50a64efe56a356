//! `ambient-cni`: the chained CNI plugin of the ambient data plane.
//!
//! The container runtime execs it last in the node's CNI chain, once per command, with the
//! `CNI_*` environment and the network configuration (including the previous plugins'
//! `prevResult`) on stdin. For ADD it finds the pod's host-side veth, IPs and netns and asks
//! the node agent (over its unix socket, [`ambient_common::agent_api`]) to enrol the pod, then
//! prints `prevResult` through, converted to the configuration's `cniVersion`. DEL, CHECK,
//! STATUS and GC are relayed to the agent the same way; VERSION lists the supported versions.
//! It is short-lived and synchronous: no async runtime, a small dependency tree.
//!
//! Layout, one module per concern, each with its own error type:
//! - [`env`] and [`args`]: the `CNI_*` variables and the `CNI_ARGS` pairs.
//! - [`config`]: stdin (the network configuration and the plugin's own keys, with defaults).
//! - [`result`]: `prevResult`, what is read from it and its conversion between versions.
//! - [`discovery`] and [`sys`]: finding the host-side veth, from `prevResult` or from the
//!   container interface's peer index over a hand-rolled netlink request in the pod's netns.
//! - [`agent`]: the blocking client of the agent's socket.
//! - [`plugin`]: the commands themselves ([`parse_invocation`], then [`execute`]).
//! - [`error`]: [`PluginError`] and [`to_cni_error`], the one mapping to CNI error codes.
//! - [`logging`]: stderr and optional JSON-lines file; never stdout.
//!
//! `main.rs` reads the process environment and stdin, calls the above, and is the only code
//! that writes stdout (including from its panic hook, which prints a code-999 error).
#![forbid(unsafe_code)]

pub mod agent;
pub mod args;
pub mod config;
pub mod discovery;
pub mod env;
pub mod error;
pub mod logging;
pub mod plugin;
pub mod result;
pub mod sys;
pub mod version;

pub use agent::{AgentCallError, AgentClient, UnixAgent};
pub use config::{response_version, NetConf, PluginConfig};
pub use discovery::{host_interface, HostLinks, KernelLinks};
pub use error::{to_cni_error, CniError, PluginError};
pub use plugin::{execute, parse_invocation, read_stdin, Invocation, Output};
pub use version::CniVersion;

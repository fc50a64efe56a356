//! The installer of the ambient data plane (binary `install-cni`), run by the node DaemonSet
//! next to the node agent. It copies `ambient-cni` into the host's CNI binary directory,
//! appends it to the primary CNI configuration's chain, keeps both there while the primary
//! CNI rewrites its files, and on uninstall takes everything out again.
//!
//! Layout: [`config`] (flags/environment -> [`Config`]), [`conflist`] (finding the primary
//! configuration; the pure add/remove transformations), [`installer`] (the file operations:
//! ensure, check, uninstall), [`plugin_check`] (will the plugin run on the host), [`run`] (the watch loop), [`lifecycle`] (uninstall or upgrade,
//! from the API server), [`ready`] (the agent's `Status`). The Kubernetes manifests live in
//! `install/manifests/`, the image definition in `install/image/`.
#![forbid(unsafe_code)]

pub mod config;
pub mod conflist;
pub mod installer;
pub mod lifecycle;
pub mod plugin_check;
pub mod ready;
pub mod run;

pub use config::{Config, ConfigArgs, Mode, OnExit};
pub use installer::{ChainState, InstallError, Installer, Pass, Removal};

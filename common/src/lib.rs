//! Wire types and constants shared by the ambient data plane's processes.
//!
//! Every port, mark, path and name that more than one process must agree on lives in
//! [`constants`]; every message that crosses a process boundary lives in one module per
//! contract: [`agent_api`] (CNI plugin -> node agent) and [`ztunnel_api`] (node agent ->
//! ztunnel). Both contracts use the same framing, [`frame`]. Plumbing that more than one
//! process needs is here once too: [`error::chain`], the non-poisoning locks of [`sync`], and
//! with the `rt` feature the async framing and the accept loop ([`serve`]). Without features
//! the crate depends on `serde`, `serde_json` and `thiserror` only, because the CNI plugin
//! links it and is exec'd for every pod; the long-lived processes turn on `manifests`
//! (Kubernetes YAML), `ca-api` (Istio's certificate API) and `rt` (tokio).
#![forbid(unsafe_code)]

pub mod agent_api;
#[cfg(feature = "ca-api")]
pub mod ca_api;
pub mod constants;
pub mod duration;
pub mod error;
pub mod frame;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "manifests")]
pub mod manifest;
pub mod net;
pub mod netlink;
#[cfg(feature = "rt")]
pub mod serve;
pub mod spiffe;
pub mod sync;
#[cfg(feature = "manifests")]
pub mod yaml;
pub mod ztunnel_api;

pub use net::{IpPrefix, ParseIpPrefixError};

//! Wire types and constants shared by the ambient data plane's processes.
//!
//! Every port, mark, path and name that more than one process must agree on lives in
//! [`constants`]; every message that crosses a process boundary lives in one module per
//! contract: [`agent_api`] (CNI plugin -> node agent) and [`ztunnel_api`] (node agent ->
//! ztunnel). Both contracts use the same framing, [`frame`]. The crate depends on `serde`
//! only, because the CNI plugin links it and is exec'd for every pod.
#![forbid(unsafe_code)]

pub mod agent_api;
#[cfg(feature = "ca-api")]
pub mod ca_api;
pub mod constants;
pub mod duration;
pub mod frame;
#[cfg(feature = "manifests")]
pub mod manifest;
pub mod net;
pub mod spiffe;
pub mod ztunnel_api;

pub use net::{IpPrefix, ParseIpPrefixError};

//! The node agent -> ztunnel contract, over ztunnel's unix socket
//! ([`crate::constants::ZTUNNEL_SOCKET`]).
//!
//! The agent keeps one connection open. On every (re)connect it first sends a
//! [`ZtunnelRequest::Snapshot`] of all local enrolled workloads, which replaces what ztunnel
//! knew from the agent; then [`ZtunnelRequest::Add`] and [`ZtunnelRequest::Remove`] as pods
//! are enrolled and released. ztunnel answers every frame, in order, with a [`ZtunnelReply`].
//! `Ack` is sent only once ztunnel holds a certificate for each added workload's identity,
//! so the agent can return the pod's ADD knowing its first connection will not wait.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const ZTUNNEL_API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZtunnelRequest {
    pub version: u32,
    #[serde(flatten)]
    pub op: ZtunnelOp,
}

impl ZtunnelRequest {
    pub fn new(op: ZtunnelOp) -> Self {
        Self {
            version: ZTUNNEL_API_VERSION,
            op,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum ZtunnelOp {
    /// All local enrolled workloads; replaces the previous set.
    Snapshot(Vec<LocalWorkload>),
    /// One more local enrolled workload.
    Add(LocalWorkload),
    /// A local workload released; by pod uid.
    Remove { uid: String },
}

/// A pod on this node that the agent enrolled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalWorkload {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum ZtunnelReply {
    /// Applied; for `Add` and `Snapshot`, certificates for the identities are held.
    Ack,
    Error {
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_is_stable() {
        let w = LocalWorkload {
            uid: "u".into(),
            namespace: "ns".into(),
            name: "p".into(),
            service_account: "default".into(),
            node: "node-a".into(),
            ips: vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        };
        let v = serde_json::to_value(ZtunnelRequest::new(ZtunnelOp::Add(w))).unwrap();
        assert_eq!(v["op"], "add");
        assert_eq!(v["args"]["ips"][1], "fd00::2");
        let ack = serde_json::to_value(ZtunnelReply::Ack).unwrap();
        assert_eq!(ack, serde_json::json!({"result": "ack"}));
    }
}

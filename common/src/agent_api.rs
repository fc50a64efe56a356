//! The CNI plugin -> node agent contract, over the agent's unix socket
//! ([`crate::constants::CNI_SOCKET`]). One [`AgentRequest`] frame, one [`AgentReply`] frame,
//! per connection (see [`crate::frame`]). The plugin does no policy: it reports what the
//! runtime told it and what it found on the host, and the agent decides.

use serde::{Deserialize, Serialize};

use crate::net::{IpPrefix, Mac};

/// Version of this contract. The agent refuses requests of another version with
/// [`ErrorKind::IncompatibleVersion`], so a plugin binary left behind by an upgrade fails loudly.
pub const AGENT_API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRequest {
    pub version: u32,
    #[serde(flatten)]
    pub op: AgentOp,
}

impl AgentRequest {
    pub fn new(op: AgentOp) -> Self {
        Self {
            version: AGENT_API_VERSION,
            op,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum AgentOp {
    /// A pod sandbox was attached by the primary plugin: enrol it if it is ambient.
    Add(Attachment),
    /// Release the attachment. Succeeds when nothing is known about it.
    Del(AttachmentRef),
    /// Verify that the attachment's redirection is in place (when it is ambient).
    Check(Attachment),
    /// Can the agent serve ADDs now?
    Status,
    /// Release every attachment not in `valid`.
    Gc { valid: Vec<AttachmentRef> },
}

/// Identifies a pod as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// An attachment as CNI's GC names it: container id and interface name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRef {
    pub key: AttachmentKey,
    /// Present when the runtime passed Kubernetes args.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// Everything the plugin learned about a new attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub key: AttachmentKey,
    pub pod: PodRef,
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub netns: String,
    /// Host-side interface of the pod's veth pair; empty when the plugin could not find one
    /// (the agent then refuses the ADD only if the pod is ambient).
    pub host_interface: String,
    /// The pod's addresses from `prevResult.ips` (container side only).
    pub ips: Vec<IpPrefix>,
    /// The MAC address of the container's interface (`prevResult.interfaces[].mac`, or read
    /// from the pod's namespace): a bridged pod's port accepts only this source MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum AgentReply {
    /// ADD handled: the pod is enrolled (`captured`) or left alone, with the reason.
    Added(AddOutcome),
    /// DEL handled (also when there was nothing to release).
    Released,
    /// CHECK passed.
    Checked,
    /// STATUS: the agent can serve ADDs.
    Ready,
    /// GC handled; how many attachments were released.
    Collected {
        released: u32,
    },
    Error(AgentError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddOutcome {
    /// Redirection is installed for the pod.
    Captured,
    /// The pod is not ambient; nothing was installed.
    NotAmbient,
    /// The pod's namespace is excluded from the mesh.
    Excluded,
    /// The pod uses the host network.
    HostNetwork,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Why the agent refused; the plugin maps each to a CNI error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request's contract version is not the agent's.
    IncompatibleVersion,
    /// The request is malformed or names something that does not exist (netns, interface).
    InvalidRequest,
    /// The agent cannot decide yet (pod or namespace not seen by its source): retry.
    TryAgainLater,
    /// The agent is not ready to serve ADDs (not synced, or cannot program rules).
    NotReady,
    /// CHECK found the pod's redirection missing or wrong.
    CheckFailed,
    /// Programming the kernel failed.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            key: AttachmentKey {
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: Some("u-1".into()),
            },
            netns: "/var/run/netns/x".into(),
            host_interface: "veth1234".into(),
            ips: vec!["10.244.0.5/24".parse().unwrap()],
            mac: None,
        }
    }

    #[test]
    fn request_wire_shape_is_stable() {
        let req = AgentRequest::new(AgentOp::Add(attachment()));
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["version"], AGENT_API_VERSION);
        assert_eq!(v["op"], "add");
        assert_eq!(v["args"]["ips"][0], "10.244.0.5/24");
        assert_eq!(v["args"]["key"]["container_id"], "abc");
        let back: AgentRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
        let status = serde_json::to_value(AgentRequest::new(AgentOp::Status)).unwrap();
        assert_eq!(status, serde_json::json!({"version": 1, "op": "status"}));
    }

    #[test]
    fn reply_wire_shape_is_stable() {
        let v = serde_json::to_value(AgentReply::Added(AddOutcome::Captured)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"result": "added", "detail": "captured"})
        );
        let e = AgentReply::Error(AgentError::new(ErrorKind::TryAgainLater, "pod not seen"));
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["detail"]["kind"], "try_again_later");
        assert_eq!(serde_json::from_value::<AgentReply>(v).unwrap(), e);
    }
}

//! What the agent persists in its run directory so a restart reconciles instead of starting
//! blind: every attachment the plugin reported (ambient or not, since labels can change).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ambient_common::agent_api::{AttachmentKey, PodRef};
use serde::{Deserialize, Serialize};

use crate::host::NetnsId;

pub const STATE_VERSION: u32 = 1;

/// The host-side attachment as recorded (serialisable mirror of [`crate::nft::Attachment`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum LinkRecord {
    Routed {
        veth: String,
    },
    Bridged {
        veth: String,
        bridge: String,
        bridge_mac: String,
    },
}

impl LinkRecord {
    pub fn from_attachment(a: &crate::nft::Attachment) -> Self {
        match a {
            crate::nft::Attachment::Routed { veth } => Self::Routed { veth: veth.clone() },
            crate::nft::Attachment::Bridged {
                veth,
                bridge,
                bridge_mac,
            } => Self::Bridged {
                veth: veth.clone(),
                bridge: bridge.clone(),
                bridge_mac: bridge_mac.to_string(),
            },
        }
    }

    pub fn to_attachment(&self) -> Option<crate::nft::Attachment> {
        Some(match self {
            Self::Routed { veth } => crate::nft::Attachment::Routed { veth: veth.clone() },
            Self::Bridged {
                veth,
                bridge,
                bridge_mac,
            } => crate::nft::Attachment::Bridged {
                veth: veth.clone(),
                bridge: bridge.clone(),
                bridge_mac: bridge_mac.parse().ok()?,
            },
        })
    }

    pub fn veth(&self) -> &str {
        match self {
            Self::Routed { veth } | Self::Bridged { veth, .. } => veth,
        }
    }

    pub fn mode(&self) -> &'static str {
        match self {
            Self::Routed { .. } => "routed",
            Self::Bridged { .. } => "bridged",
        }
    }
}

/// One attachment reported by the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub key: AttachmentKey,
    pub pod: PodRef,
    pub netns: String,
    pub netns_id: Option<NetnsId>,
    pub link: LinkRecord,
    pub ifindex: u32,
    pub ips: Vec<IpAddr>,
    /// Unix seconds of the ADD.
    pub since: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub attachments: Vec<Record>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has version {found}, this agent writes {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
}

/// Loads the records; a missing file is an empty state.
pub fn load(path: &Path) -> Result<BTreeMap<AttachmentKey, Record>, StateError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(StateError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file: StateFile = serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    if file.version != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: file.version,
        });
    }
    Ok(file
        .attachments
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect())
}

/// Writes the records atomically (temporary file, fsync, rename).
pub fn save<'a>(path: &Path, records: impl Iterator<Item = &'a Record>) -> Result<(), StateError> {
    use std::io::Write;
    let file = StateFile {
        version: STATE_VERSION,
        attachments: records.cloned().collect(),
    };
    let tmp = path.with_extension("json.tmp");
    let werr = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(werr)?;
    let body = serde_json::to_vec_pretty(&file).expect("state serialises");
    f.write_all(&body).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path).map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        assert!(load(&p).unwrap().is_empty());
        let r = Record {
            key: AttachmentKey {
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: None,
            },
            netns: "/run/netns/x".into(),
            netns_id: None,
            link: LinkRecord::Routed {
                veth: "veth1".into(),
            },
            ifindex: 4,
            ips: vec!["10.0.0.2".parse().unwrap()],
            since: 1,
        };
        save(&p, [r.clone()].iter()).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(back.values().next(), Some(&r));
        std::fs::write(&p, b"{garbage").unwrap();
        assert!(matches!(load(&p), Err(StateError::Corrupt { .. })));
    }
}

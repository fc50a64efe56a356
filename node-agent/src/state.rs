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
    /// The container interface's MAC, when the plugin reported one (pins a bridge port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<ambient_common::net::Mac>,
    /// Unix seconds of the ADD.
    pub since: u64,
    /// How the attachment was found: the runtime's ADD, or adopted from the node's tables
    /// (a pod running before the agent; see `adopt`).
    #[serde(default = "found_by_cni", skip_serializing_if = "is_cni")]
    pub found_by: crate::adopt::Method,
    /// Why the pod cannot be captured on this node, found at its ADD (see `bypass`): an
    /// ambient pod with one is reported `uncapturable`, never captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocker: Option<String>,
}

fn found_by_cni() -> crate::adopt::Method {
    crate::adopt::Method::Cni
}

fn is_cni(m: &crate::adopt::Method) -> bool {
    *m == crate::adopt::Method::Cni
}

impl Record {
    /// Adopted attachments have no runtime container id: CNI GC does not list them.
    pub fn adopted(&self) -> bool {
        self.found_by != crate::adopt::Method::Cni
    }
}

/// One attachment's file: `<run-dir>/attachments/<container-id>_<ifname>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot write state {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read state {path}")]
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

/// The agent's persisted attachments: one small file each, so recording or forgetting a pod
/// costs the same whatever the number of pods. Written by rename, so a reader never sees a
/// half-written file. The directory lives on the run directory's tmpfs: it survives an
/// agent restart, not a node reboot (when every pod is recreated anyway).
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn file_name(key: &AttachmentKey) -> String {
    // Container ids are hex and interface names are short, but neither is trusted: keep a
    // safe alphabet and escape everything else.
    let mut out = String::new();
    for (i, part) in [&key.container_id, &key.ifname].into_iter().enumerate() {
        if i > 0 {
            out.push('_');
        }
        for b in part.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02x}"));
            }
        }
    }
    out.push_str(".json");
    out
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Loads every record; a missing directory is an empty state. Leftover temporary files
    /// (a crash between write and rename) are removed.
    pub fn load(&self) -> Result<BTreeMap<AttachmentKey, Record>, StateError> {
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("json") => {}
                Some("tmp") => {
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
                _ => continue,
            }
            let text = std::fs::read(&path).map_err(|source| StateError::Read {
                path: path.clone(),
                source,
            })?;
            let file: StateFile =
                serde_json::from_slice(&text).map_err(|source| StateError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
            if file.version != STATE_VERSION {
                return Err(StateError::Version {
                    path,
                    found: file.version,
                });
            }
            out.insert(file.record.key.clone(), file.record);
        }
        Ok(out)
    }

    /// Records (or replaces) one attachment.
    pub fn save(&self, record: &Record) -> Result<(), StateError> {
        let path = self.dir.join(file_name(&record.key));
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(werr)?;
        let body = serde_json::to_vec(&StateFile {
            version: STATE_VERSION,
            record: record.clone(),
        })
        .expect("a record always serialises");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)
    }

    /// Forgets one attachment; forgetting an unknown one is fine.
    pub fn remove(&self, key: &AttachmentKey) -> Result<(), StateError> {
        let path = self.dir.join(file_name(key));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        }
    }

    /// Removes the whole directory (uninstall).
    pub fn clear(&self) -> Result<(), StateError> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            key: AttachmentKey {
                container_id: id.into(),
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
            mac: None,
            since: 1,
            found_by: crate::adopt::Method::Cni,
            blocker: None,
        }
    }

    #[test]
    fn round_trip_remove_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let st = StateDir::new(dir.path().join("attachments"));
        assert!(st.load().unwrap().is_empty());
        st.save(&record("abc")).unwrap();
        st.save(&record("../../etc/passwd")).unwrap();
        let back = st.load().unwrap();
        assert_eq!(back.len(), 2);
        assert!(std::fs::read_dir(st.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains('/')));
        st.remove(&record("abc").key).unwrap();
        st.remove(&record("abc").key).unwrap();
        assert_eq!(st.load().unwrap().len(), 1);
        std::fs::write(st.path().join("x.json"), b"{garbage").unwrap();
        assert!(matches!(st.load(), Err(StateError::Corrupt { .. })));
        st.clear().unwrap();
        assert!(st.load().unwrap().is_empty());
    }

    #[test]
    fn file_names_are_distinct_for_distinct_keys() {
        let a = AttachmentKey {
            container_id: "a_b".into(),
            ifname: "c".into(),
        };
        let b = AttachmentKey {
            container_id: "a".into(),
            ifname: "b_c".into(),
        };
        assert_ne!(file_name(&a), file_name(&b));
    }
}

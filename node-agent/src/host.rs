//! What the agent reads about the node's interfaces and the pods' network namespaces, from
//! `/sys/class/net` and the netns files. Read-only; no netlink needed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nft::{valid_ifname, Attachment, Mac};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{0:?} is not a valid interface name")]
    BadName(String),
    #[error("host interface {0} does not exist in the node's network namespace")]
    NoInterface(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bridge {bridge} has an unreadable MAC address {value:?}")]
    BadMac { bridge: String, value: String },
}

/// Identity of a network namespace file: (device, inode) of the nsfs inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// The namespace behind `path`, or `None` when it is gone.
pub fn netns_id(path: &Path) -> Option<NetnsId> {
    let m = std::fs::metadata(path).ok()?;
    Some(NetnsId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// Where interface data is read from; tests point it elsewhere.
#[derive(Debug, Clone)]
pub struct Sysfs {
    pub root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/sys/class/net"),
        }
    }
}

impl Sysfs {
    fn read(&self, path: PathBuf) -> Result<String, HostError> {
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|source| HostError::Read { path, source })
    }

    /// Every interface of the namespace with its ifindex, in one pass over the directory.
    pub fn links(&self) -> std::io::Result<std::collections::HashMap<String, u32>> {
        let mut out = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&self.root)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(index) = self.ifindex(&name) {
                out.insert(name, index);
            }
        }
        Ok(out)
    }

    pub fn ifindex(&self, name: &str) -> Option<u32> {
        self.read(self.root.join(name).join("ifindex"))
            .ok()?
            .parse()
            .ok()
    }

    /// Classifies the pod's host-side interface as routed or a bridge port.
    pub fn attachment(&self, veth: &str) -> Result<(Attachment, u32), HostError> {
        if !valid_ifname(veth) {
            return Err(HostError::BadName(veth.to_owned()));
        }
        let dir = self.root.join(veth);
        let ifindex = self
            .ifindex(veth)
            .ok_or_else(|| HostError::NoInterface(veth.to_owned()))?;
        let master = std::fs::read_link(dir.join("master"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        let attachment = match master {
            Some(bridge) if self.root.join(&bridge).join("bridge").exists() => {
                let value = self.read(self.root.join(&bridge).join("address"))?;
                let bridge_mac: Mac = value.parse().map_err(|_| HostError::BadMac {
                    bridge: bridge.clone(),
                    value,
                })?;
                if !valid_ifname(&bridge) {
                    return Err(HostError::BadName(bridge));
                }
                Attachment::Bridged {
                    veth: veth.to_owned(),
                    bridge,
                    bridge_mac,
                }
            }
            _ => Attachment::Routed {
                veth: veth.to_owned(),
            },
        };
        Ok((attachment, ifindex))
    }
}

/// Reads a sysctl under /proc/sys (e.g. `net/bridge/bridge-nf-call-iptables`).
pub fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, idx) in [("cni0", "3"), ("veth1", "7"), ("veth2", "8")] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("ifindex"), idx).unwrap();
        }
        std::fs::create_dir_all(root.join("cni0/bridge")).unwrap();
        std::fs::write(root.join("cni0/address"), "02:aa:bb:cc:dd:ee\n").unwrap();
        std::os::unix::fs::symlink(root.join("cni0"), root.join("veth1/master")).unwrap();
        let sys = Sysfs {
            root: root.to_owned(),
        };
        let (a, idx) = sys.attachment("veth1").unwrap();
        assert_eq!(idx, 7);
        assert_eq!(
            a,
            Attachment::Bridged {
                veth: "veth1".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])
            }
        );
        assert_eq!(
            sys.attachment("veth2").unwrap().0,
            Attachment::Routed {
                veth: "veth2".into()
            }
        );
        assert!(matches!(
            sys.attachment("nope"),
            Err(HostError::NoInterface(_))
        ));
        assert!(matches!(sys.attachment("../x"), Err(HostError::BadName(_))));
    }
}

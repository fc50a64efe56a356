//! Finding the pod's host-side veth.
//!
//! First from `prevResult.interfaces`: the interfaces without `sandbox`, minus bridges (the
//! `bridge` plugin reports `[cni0, vethX, eth0(sandbox)]`, `ptp` reports
//! `[vethX, eth0(sandbox)]`). When that leaves anything but exactly one, from the kernel: the
//! container interface's peer index, read inside the pod's namespace (see [`crate::sys`]).

use std::path::{Path, PathBuf};

use ambient_common::net::Mac;

use crate::result::PrevResult;
use crate::sys::{self, SysError};

#[derive(Debug, thiserror::Error)]
#[error("cannot tell the pod's host-side interface: prevResult lists {} host-side non-bridge interface(s) {candidates:?}, and the peer of {ifname} in {netns} was not found", candidates.len())]
pub struct DiscoveryError {
    pub candidates: Vec<String>,
    pub ifname: String,
    pub netns: String,
    #[source]
    pub source: Box<SysError>,
}

/// How the host interface was found (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    PrevResult,
    PeerIndex,
}

/// What discovery needs from the host; [`KernelLinks`] is the real one, tests fake it.
pub trait HostLinks {
    fn is_bridge(&self, name: &str) -> bool;
    /// The host-side peer of `ifname` inside the namespace at `netns`.
    fn veth_peer(&self, netns: &Path, ifname: &str) -> Result<String, SysError>;
    /// The MAC address of `ifname` inside the namespace at `netns`.
    fn container_mac(&self, netns: &Path, ifname: &str) -> Result<Mac, SysError>;
}

/// Sysfs for bridge detection, netlink for the peer lookup.
#[derive(Debug, Clone)]
pub struct KernelLinks {
    pub sysfs_root: PathBuf,
}

impl HostLinks for KernelLinks {
    fn is_bridge(&self, name: &str) -> bool {
        sys::is_bridge(&self.sysfs_root, name)
    }

    fn veth_peer(&self, netns: &Path, ifname: &str) -> Result<String, SysError> {
        sys::veth_peer_name(netns, ifname)
    }

    fn container_mac(&self, netns: &Path, ifname: &str) -> Result<Mac, SysError> {
        sys::container_mac(netns, ifname)
    }
}

/// Finds the host-side interface of the attachment (`netns`, `ifname`).
pub fn host_interface(
    prev: &PrevResult,
    netns: &str,
    ifname: &str,
    links: &dyn HostLinks,
) -> Result<(String, Found), DiscoveryError> {
    let candidates: Vec<String> = prev
        .host_side()
        .filter(|i| !links.is_bridge(&i.name))
        .map(|i| i.name.clone())
        .collect();
    if let [only] = candidates.as_slice() {
        return Ok((only.clone(), Found::PrevResult));
    }
    match links.veth_peer(Path::new(netns), ifname) {
        Ok(name) => Ok((name, Found::PeerIndex)),
        Err(source) => Err(DiscoveryError {
            candidates,
            ifname: ifname.into(),
            netns: netns.into(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::cell::Cell;

    struct Fake {
        bridges: &'static [&'static str],
        peer: Option<&'static str>,
        asked: Cell<u32>,
    }

    impl HostLinks for Fake {
        fn is_bridge(&self, name: &str) -> bool {
            self.bridges.contains(&name)
        }
        fn veth_peer(&self, _: &Path, ifname: &str) -> Result<String, SysError> {
            self.asked.set(self.asked.get() + 1);
            self.peer
                .map(str::to_owned)
                .ok_or_else(|| SysError::NoPeer(ifname.into()))
        }
        fn container_mac(&self, _: &Path, ifname: &str) -> Result<Mac, SysError> {
            Err(SysError::NoSuchLink(ifname.into()))
        }
    }

    fn fake(bridges: &'static [&'static str], peer: Option<&'static str>) -> Fake {
        Fake {
            bridges,
            peer,
            asked: Cell::new(0),
        }
    }

    fn prev(names: &[(&str, bool)]) -> PrevResult {
        let ifaces: Vec<_> = names
            .iter()
            .map(|(n, sandbox)| {
                if *sandbox {
                    json!({"name": n, "sandbox": "/var/run/netns/p"})
                } else {
                    json!({"name": n})
                }
            })
            .collect();
        PrevResult::parse(&json!({"interfaces": ifaces})).unwrap()
    }

    #[test]
    fn bridge_plugin_shape() {
        let p = prev(&[("cni0", false), ("veth1", false), ("eth0", true)]);
        let links = fake(&["cni0"], None);
        let got = host_interface(&p, "/n", "eth0", &links).unwrap();
        assert_eq!(got, ("veth1".into(), Found::PrevResult));
        assert_eq!(links.asked.get(), 0);
    }

    #[test]
    fn ptp_plugin_shape() {
        let p = prev(&[("veth9", false), ("eth0", true)]);
        let got = host_interface(&p, "/n", "eth0", &fake(&[], None)).unwrap();
        assert_eq!(got.0, "veth9");
    }

    #[test]
    fn falls_back_to_the_peer_index() {
        for p in [
            prev(&[("eth0", true)]),
            prev(&[("cni0", false), ("veth1", false), ("eth0", true)]), // cni0 not known as a bridge
            prev(&[]),
        ] {
            let links = fake(&[], Some("vethpeer"));
            let got = host_interface(&p, "/n", "eth0", &links).unwrap();
            assert_eq!(got, ("vethpeer".into(), Found::PeerIndex));
            assert_eq!(links.asked.get(), 1);
        }
    }

    #[test]
    fn reports_both_attempts_when_nothing_works() {
        let p = prev(&[("a", false), ("b", false), ("eth0", true)]);
        let err = host_interface(&p, "/n", "eth0", &fake(&[], None)).unwrap_err();
        assert_eq!(err.candidates, ["a", "b"]);
        let msg = err.to_string();
        assert!(msg.contains("eth0") && msg.contains("/n"), "{msg}");
    }
}

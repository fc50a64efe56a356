//! The kernel calls of the plugin: one `RTM_GETLINK` request over `NETLINK_ROUTE`, made
//! inside the pod's network namespace from a dedicated thread, and the same request by index
//! in the plugin's own namespace.
//!
//! Everything here goes through `nix`'s safe wrappers (`socket`, `sendto`, `recv`, `setns`),
//! so this module needs no `unsafe`; the messages are built and read with the project's one
//! netlink codec (`ambient_common::netlink`: byte slices with bounds checks, never pointer
//! casts). The builder and the parser are pure functions, unit- and property-tested below
//! against the layout written out by hand.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_common::net::Mac;
use nix::errno::Errno;
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

pub use ambient_common::netlink::MAX_IFNAME_LEN;
use ambient_common::netlink::{
    self as nl, Malformed, IFINFOMSG_LEN, IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, NLMSG_DONE,
    NLMSG_ERROR, NLM_F_REQUEST, RTM_GETLINK, RTM_NEWLINK,
};
/// How long a netlink answer may take before the lookup gives up.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("cannot open network namespace {path}")]
    OpenNetns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path} (is the plugin running as root?)")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("cannot start the thread that enters the pod's network namespace")]
    Spawn(#[source] std::io::Error),
    #[error("the thread that entered the pod's network namespace panicked")]
    ThreadPanicked,
    #[error("{0:?} is not a valid interface name")]
    BadName(String),
    #[error("cannot open a NETLINK_ROUTE socket")]
    Socket(#[source] Errno),
    #[error("sending the netlink request failed")]
    Send(#[source] Errno),
    #[error("receiving the netlink answer failed")]
    Recv(#[source] Errno),
    #[error("no interface {0} there")]
    NoSuchLink(String),
    #[error("the kernel refused the link request")]
    Kernel(#[source] Errno),
    #[error("malformed netlink answer: {0}")]
    Malformed(&'static str),
    #[error("{0} has no peer (it is not one end of a veth pair)")]
    NoPeer(String),
    #[error("host interface {host} (index {host_index}) is not the peer of the container's {ifname}: the peer is in another namespace than the plugin's")]
    PeerMismatch {
        host: String,
        host_index: u32,
        ifname: String,
    },
}

/// Which link an `RTM_GETLINK` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkSelector {
    Name(String),
    Index(u32),
}

impl std::fmt::Display for LinkSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkSelector::Name(n) => write!(f, "{n:?}"),
            LinkSelector::Index(i) => write!(f, "with index {i}"),
        }
    }
}

/// What the plugin reads from an `RTM_NEWLINK` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_ADDRESS` when it is an Ethernet (6-byte) address.
    pub address: Option<Mac>,
}

/// Builds an `RTM_GETLINK` request for one link.
pub fn build_getlink(seq: u32, selector: &LinkSelector) -> Result<Vec<u8>, SysError> {
    let (index, name) = match selector {
        LinkSelector::Index(i) => {
            let i = i32::try_from(*i).map_err(|_| SysError::BadName(i.to_string()))?;
            (i, None)
        }
        LinkSelector::Name(n) => {
            if n.is_empty() || n.len() > MAX_IFNAME_LEN || n.contains(['\0', '/']) {
                return Err(SysError::BadName(n.clone()));
            }
            (0, Some(n.as_bytes()))
        }
    };
    let mut attrs = Vec::new();
    if let Some(name) = name {
        nl::put(&mut attrs, IFLA_IFNAME, &[name, b"\0"].concat());
    }
    let msg = nl::request(
        RTM_GETLINK,
        NLM_F_REQUEST,
        seq,
        &nl::ifinfomsg(index),
        &attrs,
    );
    Ok(msg)
}

/// Parses the kernel's answer to [`build_getlink`] with sequence number `seq`. Never panics,
/// whatever the bytes.
pub fn parse_getlink_reply(
    buf: &[u8],
    seq: u32,
    selector: &LinkSelector,
) -> Result<LinkInfo, SysError> {
    for m in nl::messages(buf)? {
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_ERROR => {
                let (_, code) = nl::error_of(m.body)?;
                if code == 0 {
                    continue; // an acknowledgement
                }
                let errno = Errno::from_raw(code.saturating_neg());
                return Err(if errno == Errno::ENODEV {
                    SysError::NoSuchLink(selector.to_string())
                } else {
                    SysError::Kernel(errno)
                });
            }
            NLMSG_DONE => break,
            RTM_NEWLINK => return parse_link(m.body),
            _ => continue,
        }
    }
    Err(SysError::Malformed("no link message in the answer"))
}

fn parse_link(payload: &[u8]) -> Result<LinkInfo, SysError> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(SysError::Malformed("short ifinfomsg"));
    }
    let index = i32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]);
    let index = u32::try_from(index).map_err(|_| SysError::Malformed("negative ifindex"))?;
    let mut info = LinkInfo {
        index,
        name: None,
        link: None,
        address: None,
    };
    for (kind, data) in nl::attrs(&payload[IFINFOMSG_LEN..])? {
        match kind {
            IFLA_IFNAME => {
                let raw = data.split(|b| *b == 0).next().unwrap_or(&[]);
                let name = std::str::from_utf8(raw)
                    .map_err(|_| SysError::Malformed("interface name is not UTF-8"))?;
                info.name = Some(name.to_owned());
            }
            IFLA_LINK => info.link = nl::attr_u32(data),
            IFLA_ADDRESS => info.address = <[u8; 6]>::try_from(data).ok().map(Mac),
            _ => {}
        }
    }
    Ok(info)
}

impl From<Malformed> for SysError {
    fn from(m: Malformed) -> Self {
        SysError::Malformed(m.0)
    }
}

/// Asks the kernel about one link in the calling thread's network namespace.
pub fn get_link(selector: &LinkSelector) -> Result<LinkInfo, SysError> {
    let seq = 1;
    let request = build_getlink(seq, selector)?;
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(SysError::Socket)?;
    let timeout = TimeVal::new(NETLINK_TIMEOUT.as_secs() as _, 0);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(SysError::Socket)?;
    sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .map_err(SysError::Send)?;
    // One answer to a non-dump request: a single RTM_NEWLINK (a few KiB with statistics) or
    // an error message.
    let mut buf = vec![0u8; 64 * 1024];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(SysError::Recv)?;
    parse_getlink_reply(&buf[..n], seq, selector)
}

/// Looks `ifname` up inside the network namespace at `netns`, from a dedicated thread that
/// enters it (so the plugin's own thread never changes namespace), and returns the link.
pub fn get_link_in_netns(netns: &Path, ifname: &str) -> Result<LinkInfo, SysError> {
    let path = netns.to_path_buf();
    let selector = LinkSelector::Name(ifname.to_owned());
    let worker = std::thread::Builder::new()
        .name("netns-lookup".into())
        .spawn(move || {
            let file = File::open(&path).map_err(|source| SysError::OpenNetns {
                path: path.clone(),
                source,
            })?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|source| SysError::EnterNetns { path, source })?;
            // This thread now lives in the pod's namespace until it ends, right below.
            get_link(&selector)
        })
        .map_err(SysError::Spawn)?;
    worker.join().map_err(|_| SysError::ThreadPanicked)?
}

/// The MAC address of the container's `ifname`, read inside `netns`.
pub fn container_mac(netns: &Path, ifname: &str) -> Result<Mac, SysError> {
    get_link_in_netns(netns, ifname)?
        .address
        .ok_or(SysError::Malformed(
            "the container interface has no Ethernet address",
        ))
}

/// The host-side peer of the container's `ifname`: read `IFLA_LINK` inside `netns`, then name
/// that index in the plugin's own namespace, and check that the link found there points back
/// at the container interface.
pub fn veth_peer_name(netns: &Path, ifname: &str) -> Result<String, SysError> {
    let inside = get_link_in_netns(netns, ifname)?;
    let peer_index = inside
        .link
        .filter(|l| *l != 0 && *l != inside.index)
        .ok_or_else(|| SysError::NoPeer(ifname.to_owned()))?;
    let host = get_link(&LinkSelector::Index(peer_index))?;
    let name = host
        .name
        .ok_or(SysError::Malformed("link answer without IFLA_IFNAME"))?;
    if host.link != Some(inside.index) {
        return Err(SysError::PeerMismatch {
            host: name,
            host_index: peer_index,
            ifname: ifname.to_owned(),
        });
    }
    Ok(name)
}

/// Whether `name` is a bridge in the sysfs mounted at `sysfs_root`.
pub fn is_bridge(sysfs_root: &Path, name: &str) -> bool {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return false;
    }
    sysfs_root
        .join("class/net")
        .join(name)
        .join("bridge")
        .is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The layout written out by hand, independently of the codec under test.
    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    fn bytes<const N: usize>(buf: &[u8], at: usize) -> Option<[u8; N]> {
        buf.get(at..at + N)?.try_into().ok()
    }

    fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
        bytes(buf, at).map(u16::from_ne_bytes)
    }

    fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
        bytes(buf, at).map(u32::from_ne_bytes)
    }

    fn i32_at(buf: &[u8], at: usize) -> Option<i32> {
        bytes(buf, at).map(i32::from_ne_bytes)
    }

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(align4(a.len()), 0);
        a
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn newlink(seq: u32, index: i32, name: &str, link: Option<u32>) -> Vec<u8> {
        let mut p = vec![0u8; 16];
        p[4..8].copy_from_slice(&index.to_ne_bytes());
        p.extend(attr(IFLA_IFNAME, format!("{name}\0").as_bytes()));
        p.extend(attr(IFLA_ADDRESS, &[1, 2, 3, 4, 5, 6]));
        if let Some(l) = link {
            p.extend(attr(IFLA_LINK, &l.to_ne_bytes()));
        }
        message(RTM_NEWLINK, seq, &p)
    }

    #[test]
    fn request_by_name_is_well_formed() {
        let req = build_getlink(7, &LinkSelector::Name("eth0".into())).unwrap();
        assert_eq!(req.len(), 16 + 16 + 12);
        assert_eq!(u32_at(&req, 0), Some(req.len() as u32));
        assert_eq!(u16_at(&req, 4), Some(RTM_GETLINK));
        assert_eq!(u32_at(&req, 8), Some(7));
        assert_eq!(u16_at(&req, 32), Some(9)); // 4 + "eth0\0"
        assert_eq!(u16_at(&req, 34), Some(IFLA_IFNAME));
        assert_eq!(&req[36..41], b"eth0\0");
        let req = build_getlink(1, &LinkSelector::Index(42)).unwrap();
        assert_eq!(req.len(), 32);
        assert_eq!(i32_at(&req, 20), Some(42));
        for bad in ["", "a/b", "sixteen-chars-xx", "a\0b"] {
            assert!(
                build_getlink(1, &LinkSelector::Name(bad.into())).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parses_a_link_answer() {
        let sel = LinkSelector::Name("eth0".into());
        let info = parse_getlink_reply(&newlink(3, 2, "eth0", Some(17)), 3, &sel).unwrap();
        assert_eq!(
            info,
            LinkInfo {
                index: 2,
                name: Some("eth0".into()),
                link: Some(17),
                address: Some(Mac([1, 2, 3, 4, 5, 6])),
            }
        );
        // A message of another sequence number is skipped.
        let mut two = newlink(9, 5, "x", None);
        two.extend(newlink(3, 2, "eth0", None));
        assert_eq!(parse_getlink_reply(&two, 3, &sel).unwrap().index, 2);
    }

    #[test]
    fn maps_kernel_errors() {
        let sel = LinkSelector::Name("nope0".into());
        let mut payload = (-(Errno::ENODEV as i32)).to_ne_bytes().to_vec();
        payload.extend(vec![0u8; 16]);
        let err = parse_getlink_reply(&message(NLMSG_ERROR, 1, &payload), 1, &sel).unwrap_err();
        assert!(matches!(err, SysError::NoSuchLink(_)), "{err:?}");
        let mut payload = (-(Errno::EPERM as i32)).to_ne_bytes().to_vec();
        payload.extend(vec![0u8; 16]);
        let err = parse_getlink_reply(&message(NLMSG_ERROR, 1, &payload), 1, &sel).unwrap_err();
        assert!(matches!(err, SysError::Kernel(Errno::EPERM)), "{err:?}");
        assert!(parse_getlink_reply(&[], 1, &sel).is_err());
    }

    #[test]
    fn every_truncation_is_an_error_or_a_partial_link() {
        let sel = LinkSelector::Index(2);
        let full = newlink(1, 2, "veth1234", Some(4));
        for end in 0..full.len() {
            let _ = parse_getlink_reply(&full[..end], 1, &sel);
        }
    }

    #[test]
    fn looks_up_loopback_in_its_own_namespace() {
        // Needs no privilege: every namespace has `lo` at index 1.
        let lo = get_link(&LinkSelector::Name("lo".into())).unwrap();
        assert_eq!(lo.index, 1);
        assert_eq!(lo.name.as_deref(), Some("lo"));
        let again = get_link(&LinkSelector::Index(1)).unwrap();
        assert_eq!(again.name.as_deref(), Some("lo"));
        let err = get_link(&LinkSelector::Name("nx-acni-test0".into())).unwrap_err();
        assert!(matches!(err, SysError::NoSuchLink(_)), "{err:?}");
    }

    #[test]
    fn missing_netns_is_an_open_error() {
        let err = get_link_in_netns(Path::new("/nonexistent/netns/x"), "eth0").unwrap_err();
        assert!(matches!(err, SysError::OpenNetns { .. }), "{err:?}");
    }

    #[test]
    fn bridge_detection_reads_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("class/net/cni0/bridge")).unwrap();
        std::fs::create_dir_all(dir.path().join("class/net/veth1")).unwrap();
        assert!(is_bridge(dir.path(), "cni0"));
        assert!(!is_bridge(dir.path(), "veth1"));
        assert!(!is_bridge(dir.path(), "missing"));
        assert!(!is_bridge(dir.path(), "../net/cni0"));
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), seq in 0u32..3) {
            let _ = parse_getlink_reply(&bytes, seq, &LinkSelector::Index(1));
        }
    }
}

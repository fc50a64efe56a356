//! Node-local destinations: addresses a captured pod connection must never make ztunnel
//! connect to, because ztunnel would reach them from the node's network namespace with the
//! node's address (its admin port, kubelet, containerd, cloud metadata). The decision is a
//! pure function of the address and the node's address list ([`classify`]); the list is
//! read with `getifaddrs` off the data path ([`NodeAddrs::refresh`], periodically) and read
//! on the data path under a shared lock. Refusals are counted and logged at most once per
//! source per [`LOG_EVERY`].

use ambient_common::sync::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How often one source's refusals are logged (the metric counts every one).
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Sources remembered for the log limit; beyond this the memory is cleared.
const LOG_SOURCES: usize = 4096;

/// Why an address is node-local.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeLocal {
    Loopback,
    Unspecified,
    LinkLocal,
    Multicast,
    Broadcast,
    /// One of the node's own interface addresses.
    NodeAddress,
}

impl NodeLocal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Unspecified => "unspecified",
            Self::LinkLocal => "link-local",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::NodeAddress => "node address",
        }
    }
}

/// IPv4-mapped and IPv4-compatible forms are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<NodeLocal> {
    if ip.is_loopback() {
        Some(NodeLocal::Loopback)
    } else if ip.octets()[0] == 0 {
        // 0.0.0.0/8: "this network"; connect() to it reaches the host itself.
        Some(NodeLocal::Unspecified)
    } else if ip.is_link_local() {
        Some(NodeLocal::LinkLocal)
    } else if ip.is_multicast() {
        Some(NodeLocal::Multicast)
    } else if ip.is_broadcast() {
        Some(NodeLocal::Broadcast)
    } else {
        None
    }
}

fn classify_v6(ip: Ipv6Addr) -> Option<NodeLocal> {
    let seg0 = ip.segments()[0];
    if ip.is_loopback() {
        Some(NodeLocal::Loopback)
    } else if ip.is_unspecified() {
        Some(NodeLocal::Unspecified)
    } else if seg0 & 0xffc0 == 0xfe80 {
        Some(NodeLocal::LinkLocal)
    } else if ip.is_multicast() {
        Some(NodeLocal::Multicast)
    } else {
        None
    }
}

/// Whether `ip` is node-local: by its kind alone, else because it is in `node_addrs` (the
/// node's own interface addresses). Pure: the table test below is the specification.
pub fn classify(ip: IpAddr, node_addrs: &HashSet<IpAddr>) -> Option<NodeLocal> {
    let ip = canonical(ip);
    let by_kind = match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    };
    by_kind.or_else(|| node_addrs.contains(&ip).then_some(NodeLocal::NodeAddress))
}

/// [`classify`] for a destination the cluster resolved (a Service's endpoint): the node's
/// own addresses are allowed there (the API server's endpoint is the node's address on a
/// control-plane node), everything that is never a valid endpoint is not.
pub fn classify_endpoint(ip: IpAddr) -> Option<NodeLocal> {
    classify(ip, &HashSet::new())
}

/// The node's addresses, kept current off the data path, and the refusal log limiter.
#[derive(Debug, Default)]
pub struct NodeAddrs {
    addrs: RwLock<HashSet<IpAddr>>,
    logged: LogLimiter,
}

/// Says whether a refusal for a source should be logged now: once per [`LOG_EVERY`] per
/// source, remembering at most [`LOG_SOURCES`] sources (a flood must not flood the log).
#[derive(Debug, Default)]
pub struct LogLimiter(Mutex<HashMap<IpAddr, Instant>>);

impl LogLimiter {
    pub fn should_log(&self, src: IpAddr) -> bool {
        let now = Instant::now();
        let mut logged = self.0.lock();
        if logged.len() >= LOG_SOURCES {
            logged.retain(|_, t| now.duration_since(*t) < LOG_EVERY);
            if logged.len() >= LOG_SOURCES {
                logged.clear();
            }
        }
        match logged.get(&src) {
            Some(t) if now.duration_since(*t) < LOG_EVERY => false,
            _ => {
                logged.insert(src, now);
                true
            }
        }
    }
}

impl NodeAddrs {
    /// Reads the interface addresses now (and keeps them); returns how many.
    pub fn refresh(&self) -> std::io::Result<usize> {
        let ip = |a: &nix::sys::socket::SockaddrStorage| -> Option<IpAddr> {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        };
        let mut addrs = HashSet::new();
        for i in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
            if let Some(a) = i.address.as_ref().and_then(ip) {
                addrs.insert(a);
            }
        }
        let n = addrs.len();
        *self.addrs.write() = addrs;
        Ok(n)
    }

    /// Replaces the list (tests).
    pub fn set(&self, addrs: HashSet<IpAddr>) {
        *self.addrs.write() = addrs;
    }

    pub fn classify(&self, ip: IpAddr) -> Option<NodeLocal> {
        classify(ip, &self.addrs.read())
    }

    /// Whether a refusal for `src` should be logged now (once per [`LOG_EVERY`]).
    pub fn should_log(&self, src: IpAddr) -> bool {
        self.logged.should_log(src)
    }

    /// Re-reads the addresses as soon as the kernel announces an address change (netlink
    /// `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`), on a small thread of its own; the
    /// periodic [`NodeAddrs::keep_fresh`] stays as the fallback.
    pub fn follow_changes(self: std::sync::Arc<Self>) -> std::io::Result<()> {
        use nix::sys::socket::{
            bind, recv, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
            SockType,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        std::thread::Builder::new()
            .name("ztunnel-addrs".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        // A burst of changes (a pod's veth) is read as one: drain, then read.
                        Ok(_) => {
                            while recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
                            if let Err(e) = self.refresh() {
                                tracing::warn!(error = %e, "cannot read the node's addresses");
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        // ENOBUFS: changes were lost; re-read anyway.
                        Err(nix::errno::Errno::ENOBUFS) => {
                            let _ = self.refresh();
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "address change notifications ended; polling only");
                            return;
                        }
                    }
                }
            })?;
        Ok(())
    }

    /// Keeps the list current every `every` (on the control runtime). Never returns.
    pub async fn keep_fresh(self: std::sync::Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "cannot read the node's addresses; keeping the last list");
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_local_table() {
        let node: HashSet<IpAddr> = ["10.160.0.1", "192.0.2.7", "fd00::7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        use NodeLocal::*;
        let cases: &[(&str, Option<NodeLocal>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.1.2.3", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("10.160.0.1", Some(NodeAddress)),
            ("192.0.2.7", Some(NodeAddress)),
            ("::ffff:192.0.2.7", Some(NodeAddress)),
            ("fd00::7", Some(NodeAddress)),
            // Ordinary destinations: pods, services, the outside.
            ("10.160.1.5", None),
            ("192.0.2.8", None),
            ("169.253.255.255", None),
            ("170.254.0.1", None),
            ("fec0::1", None),
            ("fd00::8", None),
            ("8.8.8.8", None),
            ("2001:db8::1", None),
        ];
        for (ip, want) in cases {
            assert_eq!(classify(ip.parse().unwrap(), &node), *want, "{ip}");
        }
        // A Service endpoint on the node's own address is allowed; loopback is not.
        assert_eq!(classify_endpoint("10.160.0.1".parse().unwrap()), None);
        assert_eq!(
            classify_endpoint("127.0.0.1".parse().unwrap()),
            Some(Loopback)
        );
    }

    #[test]
    fn reads_this_hosts_addresses() {
        let a = NodeAddrs::default();
        assert!(a.refresh().unwrap() >= 1, "at least loopback");
        assert_eq!(
            a.classify("127.0.0.1".parse().unwrap()),
            Some(NodeLocal::Loopback)
        );
    }

    #[test]
    fn logs_once_per_source_per_period() {
        let a = NodeAddrs::default();
        let s1: IpAddr = "10.0.0.1".parse().unwrap();
        let s2: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(a.should_log(s1));
        assert!(!a.should_log(s1));
        assert!(a.should_log(s2));
        for i in 0..(LOG_SOURCES as u32 + 10) {
            a.should_log(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)));
        }
        assert!(a.logged.0.lock().len() <= LOG_SOURCES);
    }
}

//! Whether the capture rules can see and steer a pod's traffic at all. Two things defeat
//! them without any error, so the agent looks for both before it claims a pod captured:
//! - an L3 interface without an address of the family (Calico's and the AWS VPC CNI's veths
//!   have none) when no capture address is configured for it: `redirect` takes the incoming
//!   interface's address and drops the packet where there is none;
//! - an eBPF program on the pod's host interface (Cilium, Calico's eBPF dataplane): it may
//!   route the pod's packets past netfilter (`bpf_redirect*`, eBPF host routing), so nothing
//!   in nftables is guaranteed to see them.
//!
//! The decision ([`blocker`]) is pure; [`Kernel`] reads the facts (addresses and tc filters
//! by rtnetlink dumps, tcx programs by `BPF_PROG_QUERY`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::nft::Attachment;
use ambient_common::netlink::{
    attr_str, attrs, messages, request, IFADDRMSG_LEN, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP,
    NLM_F_REQUEST, RTM_GETADDR, RTM_GETTFILTER, RTM_NEWADDR, RTM_NEWTFILTER, TCMSG_LEN,
};

/// The facts [`blocker`] needs about the node's interfaces.
pub trait HostFacts {
    /// Whether `ifname` holds an address of the family (IPv6: other than link-local).
    fn has_address(&self, ifname: &str, v6: bool) -> bool;
    /// The kind of eBPF program attached where it sees the packets a pod sends through its
    /// host interface `ifindex` (tc ingress or tcx ingress), if any.
    fn bpf_on_ingress(&self, ifindex: u32) -> Option<&'static str>;
}

/// Why a pod cannot be captured on this node, or `None` when it can. `ifindex` is the host
/// veth's.
pub fn blocker(
    link: &Attachment,
    ifindex: u32,
    ips: &[IpAddr],
    capture_v4: Option<Ipv4Addr>,
    capture_v6: Option<Ipv6Addr>,
    facts: &dyn HostFacts,
) -> Option<String> {
    let (veth, l3) = match link {
        Attachment::Routed { veth } => (veth, veth),
        Attachment::Bridged { veth, bridge, .. } => (veth, bridge),
    };
    if let Some(how) = facts.bpf_on_ingress(ifindex) {
        return Some(format!(
            "host interface {veth} carries an eBPF program ({how}): the primary CNI may route \
             the pod's packets past netfilter (Cilium, Calico eBPF), so its capture cannot be \
             guaranteed"
        ));
    }
    for (v6, family, configured) in [
        (false, "IPv4", capture_v4.is_some()),
        (true, "IPv6", capture_v6.is_some()),
    ] {
        let used = ips.iter().any(|ip| ip.is_ipv6() == v6);
        if used && !configured && !facts.has_address(l3, v6) {
            return Some(format!(
                "interface {l3} has no {family} address to redirect to and no {family} \
                 capture address is set (--capture-address, the DaemonSet's status.hostIP)"
            ));
        }
    }
    None
}

/// The running kernel.
pub struct Kernel;

impl HostFacts for Kernel {
    fn has_address(&self, ifname: &str, v6: bool) -> bool {
        match interface_has_address(ifname, v6) {
            Ok(has) => has,
            Err(e) => {
                // Unknown: do not refuse a pod on a failed read.
                tracing::debug!(ifname, error = %e, "cannot read the interface's addresses");
                true
            }
        }
    }

    fn bpf_on_ingress(&self, ifindex: u32) -> Option<&'static str> {
        if tc_ingress_has_bpf(ifindex).unwrap_or(false) {
            return Some("tc ingress classifier");
        }
        if tcx_ingress_has_programs(ifindex) {
            return Some("tcx ingress");
        }
        None
    }
}

const IFA_ADDRESS: u16 = 1;

/// Whether `ifname` holds an address of the family (IPv6: other than link-local), from an
/// rtnetlink dump of that family's addresses. (`getifaddrs` dumps every link with its
/// statistics as well: on a node with a hundred veths that was two thirds of the agent's
/// time per ADD.)
fn interface_has_address(ifname: &str, v6: bool) -> Result<bool, crate::nfnl::NetlinkError> {
    use crate::nfnl::{self, NetlinkError};
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(NetlinkError::Socket)?;
    let mut socket = nfnl::Socket::open_protocol(nix::sys::socket::SockProtocol::NetlinkRoute)?;
    let seq = socket.next_seq();
    socket.used_through(seq);
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    // struct ifaddrmsg: family, prefix length, flags, scope, index (a filter only under
    // strict checking).
    let mut ifaddrmsg = [family, 0, 0, 0, 0, 0, 0, 0];
    ifaddrmsg[4..].copy_from_slice(&ifindex.to_ne_bytes());
    let req = request(
        RTM_GETADDR,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &ifaddrmsg,
        &[],
    );
    socket.send(&req)?;
    loop {
        if let Some(has) = scan_addresses(socket.recv()?, seq, ifindex, v6)? {
            return Ok(has);
        }
    }
}

/// Reads one datagram of an RTM_GETADDR dump: `Some(true)` as soon as `ifindex` shows a
/// qualifying address, `Some(false)` at the end of the dump, `None` when more follows.
fn scan_addresses(
    data: &[u8],
    seq: u32,
    ifindex: u32,
    v6: bool,
) -> Result<Option<bool>, crate::nfnl::NetlinkError> {
    use crate::nfnl::NetlinkError;
    for m in messages(data)? {
        if m.seq != seq {
            continue;
        }
        match m.kind {
            NLMSG_DONE => return Ok(Some(false)),
            NLMSG_ERROR => {
                let (_, code) = ambient_common::netlink::error_of(m.body)?;
                return Err(NetlinkError::Refused(
                    nix::errno::Errno::from_raw(-code).desc().to_owned(),
                ));
            }
            RTM_NEWADDR if m.body.len() >= IFADDRMSG_LEN => {
                let index = u32::from_ne_bytes(m.body[4..8].try_into().unwrap());
                if index != ifindex {
                    continue;
                }
                for (kind, value) in attrs(&m.body[IFADDRMSG_LEN..])? {
                    let qualifies = match (v6, kind, value.len()) {
                        (false, IFA_ADDRESS, 4) => true,
                        (true, IFA_ADDRESS, 16) => (value[0], value[1] & 0xc0) != (0xfe, 0x80),
                        _ => false,
                    };
                    if qualifies {
                        return Ok(Some(true));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the ingress side of a `clsact` or `ingress`
/// qdisc, where Cilium and Calico attach their programs (what `tc filter show dev X ingress`
/// lists).
const TC_INGRESS_PARENT: u32 = 0xffff_fff2;
const TCA_KIND: u16 = 1;

/// Dumps the tc filters on `ifindex`'s ingress and tells whether any is a `bpf` classifier.
fn tc_ingress_has_bpf(ifindex: u32) -> std::io::Result<bool> {
    use nix::sys::socket::{
        bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, 0),
    )?;
    // struct tcmsg: family AF_UNSPEC and padding, ifindex, handle, parent, info.
    let mut tcmsg = [0u8; TCMSG_LEN];
    tcmsg[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&TC_INGRESS_PARENT.to_ne_bytes());
    let req = request(RTM_GETTFILTER, NLM_F_REQUEST | NLM_F_DUMP, 1, &tcmsg, &[]);
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    send(raw, &req, MsgFlags::empty())?;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(raw, &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(false);
        }
        match scan_filters(&buf[..n]) {
            Scan::Bpf => return Ok(true),
            Scan::End => return Ok(false),
            Scan::More => {}
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// A `bpf` filter was listed.
    Bpf,
    /// The dump ended (or failed: no qdisc there means no filter).
    End,
    More,
}

/// Reads one datagram of an RTM_GETTFILTER dump.
fn scan_filters(b: &[u8]) -> Scan {
    let Ok(messages) = messages(b) else {
        return Scan::End;
    };
    for m in messages {
        match m.kind {
            NLMSG_DONE | NLMSG_ERROR => return Scan::End,
            RTM_NEWTFILTER if m.body.len() >= TCMSG_LEN => {
                let found = attrs(&m.body[TCMSG_LEN..]).is_ok_and(|a| {
                    a.iter()
                        .any(|(kind, v)| *kind == TCA_KIND && attr_str(v) == "bpf")
                });
                if found {
                    return Scan::Bpf;
                }
            }
            _ => {}
        }
    }
    Scan::More
}

/// Whether programs are attached to `ifindex` through tcx ingress (kernel 6.6 and later;
/// Cilium uses it there). Older kernels reject the query: nothing attached that way.
#[allow(unsafe_code)]
fn tcx_ingress_has_programs(ifindex: u32) -> bool {
    /// `BPF_PROG_QUERY`'s part of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgQuery {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_INGRESS: u32 = 46;
    let mut attr = ProgQuery {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        ..Default::default()
    };
    // SAFETY: bpf(2) with BPF_PROG_QUERY reads and writes only the `attr` struct passed, whose
    // size is given; with `prog_ids` null the kernel only fills in `prog_cnt`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut ProgQuery,
            std::mem::size_of::<ProgQuery>() as libc::c_uint,
        )
    };
    rc == 0 && attr.prog_cnt > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[derive(Default)]
    struct Facts {
        addressed: HashSet<(&'static str, bool)>,
        bpf: HashSet<u32>,
    }

    impl HostFacts for Facts {
        fn has_address(&self, ifname: &str, v6: bool) -> bool {
            self.addressed.iter().any(|(i, f)| *i == ifname && *f == v6)
        }
        fn bpf_on_ingress(&self, ifindex: u32) -> Option<&'static str> {
            self.bpf
                .contains(&ifindex)
                .then_some("tc ingress classifier")
        }
    }

    #[test]
    fn which_pods_cannot_be_captured() {
        let routed = Attachment::Routed {
            veth: "cali1".into(),
        };
        let bridged = Attachment::Bridged {
            veth: "veth1".into(),
            bridge: "cni0".into(),
            bridge_mac: "02:00:00:00:00:01".parse().unwrap(),
        };
        let v4: IpAddr = "10.1.1.2".parse().unwrap();
        let v6: IpAddr = "fd00::2".parse().unwrap();
        let node4 = Some(Ipv4Addr::new(192, 168, 0, 1));
        let node6 = Some("fd00::1".parse().unwrap());
        let ptp = Facts {
            addressed: HashSet::from([("cali1", false), ("cali1", true)]),
            ..Default::default()
        };
        let calico = Facts::default();
        let flannel = Facts {
            addressed: HashSet::from([("cni0", false)]),
            ..Default::default()
        };
        let cilium = Facts {
            addressed: HashSet::from([("cali1", false)]),
            bpf: HashSet::from([7]),
        };
        type Case<'a> = (
            &'a str,
            &'a Attachment,
            &'a [IpAddr],
            Option<Ipv4Addr>,
            Option<Ipv6Addr>,
            &'a Facts,
            Option<&'a str>,
        );
        let table: &[Case] = &[
            ("ptp, redirect", &routed, &[v4, v6], None, None, &ptp, None),
            (
                "calico, no capture address",
                &routed,
                &[v4],
                None,
                None,
                &calico,
                Some("no IPv4 address"),
            ),
            (
                "calico, node address",
                &routed,
                &[v4],
                node4,
                None,
                &calico,
                None,
            ),
            (
                "calico dual-stack, IPv4 node address only",
                &routed,
                &[v4, v6],
                node4,
                None,
                &calico,
                Some("no IPv6 address"),
            ),
            (
                "calico dual-stack, both",
                &routed,
                &[v4, v6],
                node4,
                node6,
                &calico,
                None,
            ),
            (
                "flannel, bridge address",
                &bridged,
                &[v4],
                None,
                None,
                &flannel,
                None,
            ),
            (
                "flannel dual-stack, bridge without IPv6",
                &bridged,
                &[v4, v6],
                None,
                None,
                &flannel,
                Some("cni0 has no IPv6"),
            ),
            (
                "eBPF on the veth, whatever the addresses",
                &routed,
                &[v4],
                node4,
                node6,
                &cilium,
                Some("eBPF program"),
            ),
        ];
        for (name, link, ips, c4, c6, facts, want) in table {
            let got = blocker(link, 7, ips, *c4, *c6, *facts);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(w)) => assert!(g.contains(w), "{name}: {g}"),
                (g, w) => panic!("{name}: got {g:?}, want {w:?}"),
            }
        }
    }

    #[test]
    fn reads_a_filter_dump() {
        // One RTM_NEWTFILTER with TCA_KIND "u32", then one with "bpf", then DONE.
        fn msg(kind: u16, tca_kind: Option<&str>) -> Vec<u8> {
            let mut attrs = Vec::new();
            if let Some(k) = tca_kind {
                ambient_common::netlink::put_str(&mut attrs, TCA_KIND, k);
            }
            request(kind, 0, 0, &[0u8; TCMSG_LEN], &attrs)
        }
        let u32f = msg(RTM_NEWTFILTER, Some("u32"));
        assert_eq!(scan_filters(&u32f), Scan::More);
        let mut both = u32f.clone();
        both.extend(msg(RTM_NEWTFILTER, Some("bpf")));
        assert_eq!(scan_filters(&both), Scan::Bpf);
        let mut done = u32f;
        done.extend(msg(NLMSG_DONE, None));
        assert_eq!(scan_filters(&done), Scan::End);
        // Truncated or garbage input never panics.
        assert_eq!(scan_filters(&both[..both.len() - 3]), Scan::End);
        assert_eq!(scan_filters(&[0xff; 40]), Scan::End);
    }

    #[test]
    fn reads_an_address_dump() {
        // One RTM_NEWADDR for ifindex 7 carrying `addr`, then (optionally) the end.
        let msg = |kind: u16, index: u32, addr: &[u8]| {
            let mut ifaddrmsg = vec![if addr.len() == 16 { 10 } else { 2 }, 64, 0, 0];
            ifaddrmsg.extend_from_slice(&index.to_ne_bytes());
            let mut attrs = Vec::new();
            if !addr.is_empty() {
                ambient_common::netlink::put(&mut attrs, IFA_ADDRESS, addr);
            }
            request(kind, 0, 5, &ifaddrmsg, &attrs)
        };
        let link_local = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        let global = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        let v4 = [10, 0, 0, 1];
        let scan = |d: &[u8], v6| scan_addresses(d, 5, 7, v6).unwrap();
        assert_eq!(scan(&msg(RTM_NEWADDR, 7, &v4), false), Some(true));
        assert_eq!(scan(&msg(RTM_NEWADDR, 8, &v4), false), None, "another link");
        assert_eq!(scan(&msg(RTM_NEWADDR, 7, &link_local), true), None);
        assert_eq!(scan(&msg(RTM_NEWADDR, 7, &global), true), Some(true));
        let mut end = msg(RTM_NEWADDR, 7, &link_local);
        end.extend(msg(NLMSG_DONE, 0, &[]));
        assert_eq!(scan(&end, true), Some(false));
        // Truncated or garbage input is an error, never a panic.
        let whole = msg(RTM_NEWADDR, 7, &global);
        assert!(scan_addresses(&whole[..whole.len() - 3], 5, 7, true).is_err());
        assert!(scan_addresses(&[0xff; 40], 5, 7, true).is_err());
    }

    /// The address reading against the kernel: a link with no address, a link-local
    /// IPv6 address only, then an IPv4 and a global IPv6 address; other links' addresses
    /// never count for it.
    #[test]
    fn addresses_are_read_per_interface_and_family() {
        crate::testutil::in_fresh_netns(|| {
            let ip = |args: &str| {
                let ok = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .unwrap();
                assert!(ok.success(), "ip {args}");
            };
            ip("link add a0 type veth peer name a1");
            ip("link add b0 type veth peer name b1");
            ip("link set a0 up");
            ip("link set b0 up");
            ip("addr add 10.70.0.1/24 dev b0");
            ip("addr add fd70::1/64 dev b0 nodad");
            let k = Kernel;
            assert!(!k.has_address("a0", false));
            assert!(!k.has_address("a0", true));
            ip("addr add fe80::70/64 dev a0 nodad");
            assert!(!k.has_address("a0", true), "link-local only");
            ip("addr add 10.71.0.1/24 dev a0");
            ip("addr add fd71::1/64 dev a0 nodad");
            assert!(k.has_address("a0", false));
            assert!(k.has_address("a0", true));
            assert!(interface_has_address("nonexistent0", false).is_err());
        });
    }
}

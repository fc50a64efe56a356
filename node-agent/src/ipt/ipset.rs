//! An ipset client speaking the kernel's ipset netlink protocol (`linux/netfilter/ipset/
//! ip_set.h`, subsystem `NFNL_SUBSYS_IPSET`): create, destroy, add, delete and list, with no
//! `ipset` binary and no process per change.
//!
//! Protocol version 6 is spoken (every kernel since 3.x accepts it). Sets are created at the
//! highest revision of their type the kernel has, as the `ipset` tool does.

use std::net::IpAddr;

pub use ambient_rules::ipt::{Entry, SetSpec, SetType};

use nix::errno::Errno;

use crate::nfnl::{
    self, attr_str, attrs, nest_begin, nest_end, put, put_str, Malformed, Msg, NetlinkError,
    NLA_F_NET_BYTEORDER, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};

const NFNL_SUBSYS_IPSET: u16 = 6;
const PROTOCOL: u8 = 6;
// Commands.
const CMD_CREATE: u16 = 2;
const CMD_DESTROY: u16 = 3;
const CMD_LIST: u16 = 7;
const CMD_ADD: u16 = 9;
const CMD_DEL: u16 = 10;
const CMD_TYPE: u16 = 13;
// Command-level attributes.
const ATTR_PROTOCOL: u16 = 1;
const ATTR_SETNAME: u16 = 2;
const ATTR_TYPENAME: u16 = 3;
const ATTR_REVISION: u16 = 4;
const ATTR_FAMILY: u16 = 5;
const ATTR_DATA: u16 = 7;
const ATTR_ADT: u16 = 8;
// Data attributes.
const ATTR_IP: u16 = 1;
const ATTR_CIDR: u16 = 3;
const ATTR_CADT_FLAGS: u16 = 8;
const ATTR_MAXELEM: u16 = 19;
const ATTR_IFACE: u16 = 23;
const ATTR_IPADDR_IPV4: u16 = 1;
const ATTR_IPADDR_IPV6: u16 = 2;
const FLAG_PHYSDEV: u32 = 1 << 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// ipset's own error codes start here (`enum ipset_errno`).
const IPSET_ERR_PRIVATE: i32 = 4096;
const IPSET_ERR_PROTOCOL: i32 = 4097;
const IPSET_ERR_FIND_TYPE: i32 = 4098;
const IPSET_ERR_BUSY: i32 = 4100;
const IPSET_ERR_EXIST_SETNAME2: i32 = 4101;
const IPSET_ERR_TYPE_MISMATCH: i32 = 4102;
const IPSET_ERR_EXIST: i32 = 4103;
const IPSET_ERR_REFERENCED: i32 = 4108;
/// Changes sent per round trip: their acks must fit the socket's receive buffer.
const ROUND: usize = 64;
/// Most elements a set of ours may hold (ipset's default is 65536).
pub const MAX_ELEMENTS: u32 = 65536;

/// The family byte of a set's netlink messages.
fn family(spec: &SetSpec) -> u8 {
    if spec.v6 {
        NFPROTO_IPV6
    } else {
        NFPROTO_IPV4
    }
}

fn describe(code: i32) -> String {
    match code {
        IPSET_ERR_PROTOCOL => "the kernel does not speak this ipset protocol".into(),
        IPSET_ERR_FIND_TYPE => "the kernel has no such set type".into(),
        IPSET_ERR_BUSY | IPSET_ERR_REFERENCED => "the set is in use by a rule".into(),
        IPSET_ERR_EXIST_SETNAME2 | IPSET_ERR_EXIST => "the set or element exists".into(),
        IPSET_ERR_TYPE_MISMATCH => "a set of that name exists with another type".into(),
        c if c >= IPSET_ERR_PRIVATE => format!("ipset error {c}"),
        c => Errno::from_raw(c).desc().to_owned(),
    }
}

/// A change of one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change<'a> {
    pub add: bool,
    pub set: &'a str,
    pub entry: &'a Entry,
}

/// An ipset netlink socket of the network namespace it was opened in.
pub struct Ipset {
    socket: nfnl::Socket,
}

impl Ipset {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            socket: nfnl::Socket::open()?,
        })
    }

    fn header(out: &mut Vec<u8>, cmd: u16, flags: u16, seq: u32, family: u8) -> Msg {
        let msg = Msg::begin(out, (NFNL_SUBSYS_IPSET << 8) | cmd, flags, seq, family);
        put(out, ATTR_PROTOCOL, &[PROTOCOL]);
        msg
    }

    /// Sends one request and returns the bodies of the messages that answer it, up to its
    /// ack or the end of its dump; `Err` is the kernel's error code.
    fn request(&mut self, bytes: Vec<u8>, seq: u32) -> Result<Vec<Vec<u8>>, i32> {
        self.socket.used_through(seq);
        let transport = |e: NetlinkError| -> i32 {
            tracing::warn!(error = %e, "ipset netlink");
            -(Errno::EIO as i32)
        };
        self.socket.send(&bytes).map_err(transport)?;
        let mut bodies = Vec::new();
        loop {
            let data = self.socket.recv().map_err(transport)?;
            let mut done = false;
            for m in nfnl::messages(data).map_err(|e| transport(e.into()))? {
                if m.seq != seq {
                    continue; // a late reply to an earlier request
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let (_, code) = nfnl::error_of(m.body).map_err(|e| transport(e.into()))?;
                        if code != 0 {
                            return Err(-code);
                        }
                        done = true;
                    }
                    NLMSG_DONE => done = true,
                    _ => {
                        // nfgenmsg (4 bytes), then attributes.
                        bodies.push(m.body.get(4..).unwrap_or_default().to_vec());
                    }
                }
            }
            if done {
                return Ok(bodies);
            }
        }
    }

    /// The highest revision of `kind` the kernel has for `v6`'s family.
    pub fn revision(&mut self, kind: SetType, v6: bool) -> Result<u8, NetlinkError> {
        let seq = self.socket.next_seq();
        let family = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
        let mut out = Vec::with_capacity(64);
        let msg = Self::header(&mut out, CMD_TYPE, NLM_F_REQUEST | NLM_F_ACK, seq, family);
        put_str(&mut out, ATTR_TYPENAME, kind.name());
        put(&mut out, ATTR_FAMILY, &[family]);
        msg.end(&mut out);
        let replies = self.request(out, seq).map_err(|c| {
            NetlinkError::Refused(format!("ipset type {}: {}", kind.name(), describe(c)))
        })?;
        for body in &replies {
            for (kind, payload) in attrs(body)? {
                if kind == ATTR_REVISION && !payload.is_empty() {
                    return Ok(payload[0]);
                }
            }
        }
        Err(Malformed("no revision in the ipset protocol reply").into())
    }

    /// Creates `spec` (empty) unless a set of that name and type exists.
    pub fn create(&mut self, spec: &SetSpec, revision: u8) -> Result<(), NetlinkError> {
        let seq = self.socket.next_seq();
        let mut out = Vec::with_capacity(128);
        // Without NLM_F_EXCL an identical existing set is not an error.
        let msg = Self::header(
            &mut out,
            CMD_CREATE,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family(spec),
        );
        put_str(&mut out, ATTR_SETNAME, &spec.name);
        put_str(&mut out, ATTR_TYPENAME, spec.kind.name());
        put(&mut out, ATTR_REVISION, &[revision]);
        put(&mut out, ATTR_FAMILY, &[family(spec)]);
        let data = nest_begin(&mut out, ATTR_DATA);
        put(
            &mut out,
            ATTR_MAXELEM | NLA_F_NET_BYTEORDER,
            &MAX_ELEMENTS.to_be_bytes(),
        );
        nest_end(&mut out, data);
        msg.end(&mut out);
        self.request(out, seq).map(drop).map_err(|c| {
            NetlinkError::Refused(format!("create set {}: {}", spec.name, describe(c)))
        })
    }

    /// Destroys the set `name`; a set that does not exist is not an error.
    pub fn destroy(&mut self, name: &str) -> Result<(), NetlinkError> {
        let seq = self.socket.next_seq();
        let mut out = Vec::with_capacity(64);
        let msg = Self::header(&mut out, CMD_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, 0);
        put_str(&mut out, ATTR_SETNAME, name);
        msg.end(&mut out);
        match self.request(out, seq) {
            Ok(_) => Ok(()),
            Err(c) if c == Errno::ENOENT as i32 => Ok(()),
            Err(c) => Err(NetlinkError::Refused(format!(
                "destroy set {name}: {}",
                describe(c)
            ))),
        }
    }

    /// The members of `name`, or `None` when there is no such set.
    pub fn list(&mut self, name: &str) -> Result<Option<Vec<Entry>>, NetlinkError> {
        let seq = self.socket.next_seq();
        let mut out = Vec::with_capacity(64);
        let msg = Self::header(&mut out, CMD_LIST, NLM_F_REQUEST | NLM_F_DUMP, seq, 0);
        put_str(&mut out, ATTR_SETNAME, name);
        msg.end(&mut out);
        let bodies = match self.request(out, seq) {
            Ok(b) => b,
            Err(c) if c == Errno::ENOENT as i32 => return Ok(None),
            Err(c) => {
                return Err(NetlinkError::Refused(format!(
                    "list set {name}: {}",
                    describe(c)
                )))
            }
        };
        let mut entries = Vec::new();
        for body in &bodies {
            for (kind, payload) in attrs(body)? {
                if kind != ATTR_ADT {
                    continue;
                }
                for (k, data) in attrs(payload)? {
                    if k == ATTR_DATA {
                        entries.push(parse_entry(data)?);
                    }
                }
            }
        }
        Ok(Some(entries))
    }

    /// Applies `changes` in order, each element at most once: an add of a present element
    /// and a delete of a missing one are no-ops. All or nothing: when the kernel refuses one,
    /// the changes already made are undone and the refusal is returned.
    pub fn apply(&mut self, changes: &[Change<'_>]) -> Result<(), NetlinkError> {
        if changes.is_empty() {
            return Ok(());
        }
        // In rounds small enough that the kernel's acks fit the socket's receive buffer.
        let mut results: Vec<Option<i32>> = vec![None; changes.len()];
        for (round, chunk) in changes.chunks(ROUND).enumerate() {
            let first = self.socket.next_seq();
            let mut out = Vec::with_capacity(96 * chunk.len());
            for (i, c) in chunk.iter().enumerate() {
                encode_change(&mut out, first.wrapping_add(i as u32), c);
            }
            self.socket
                .used_through(first.wrapping_add(chunk.len() as u32 - 1));
            self.socket.send(&out)?;
            let base = round * ROUND;
            let mut pending = chunk.len();
            while pending > 0 {
                let data = self.socket.recv()?;
                for (seq, code) in nfnl::parse_acks(data)? {
                    let i = seq.wrapping_sub(first) as usize;
                    if i < chunk.len() {
                        if let Some(slot) = results.get_mut(base + i) {
                            if slot.is_none() {
                                *slot = Some(code);
                                pending -= 1;
                            }
                        }
                    }
                }
            }
            if results[base..base + chunk.len()]
                .iter()
                .any(|r| *r != Some(0))
            {
                break;
            }
        }
        let failed = results
            .iter()
            .position(|r| r.is_some_and(|c| c != 0))
            .map(|i| (i, results[i].unwrap_or(0)));
        let Some((i, code)) = failed else {
            return Ok(());
        };
        // Undo what went through, last first.
        let undo: Vec<Change<'_>> = changes
            .iter()
            .zip(&results)
            .filter(|(_, r)| **r == Some(0))
            .rev()
            .map(|(c, _)| Change {
                add: !c.add,
                ..c.clone()
            })
            .collect();
        if !undo.is_empty() {
            if let Err(e) = self.apply(&undo) {
                tracing::error!(error = %e, "undoing a refused ipset change failed");
            }
        }
        let c = &changes[i];
        Err(NetlinkError::Refused(format!(
            "{} {:?} {} set {}: {}",
            if c.add { "add" } else { "delete" },
            c.entry,
            if c.add { "to" } else { "from" },
            c.set,
            describe(-code)
        )))
    }
}

fn encode_change(out: &mut Vec<u8>, seq: u32, c: &Change<'_>) {
    let family = match c.entry {
        Entry::Ip(IpAddr::V4(_))
        | Entry::NetIface {
            net: IpAddr::V4(_), ..
        } => NFPROTO_IPV4,
        _ => NFPROTO_IPV6,
    };
    let cmd = if c.add { CMD_ADD } else { CMD_DEL };
    // No NLM_F_EXCL: the kernel then treats an existing (missing) element as done.
    let msg = Ipset::header(out, cmd, NLM_F_REQUEST | NLM_F_ACK, seq, family);
    put_str(out, ATTR_SETNAME, c.set);
    let data = nest_begin(out, ATTR_DATA);
    let ip = |out: &mut Vec<u8>, a: &IpAddr| {
        let n = nest_begin(out, ATTR_IP);
        match a {
            IpAddr::V4(a) => put(out, ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets()),
            IpAddr::V6(a) => put(out, ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &a.octets()),
        }
        nest_end(out, n);
    };
    match c.entry {
        Entry::Ip(a) => ip(out, a),
        Entry::NetIface {
            net,
            prefix,
            iface,
            physdev,
        } => {
            ip(out, net);
            put(out, ATTR_CIDR, &[*prefix]);
            put_str(out, ATTR_IFACE, iface);
            if *physdev {
                put(
                    out,
                    ATTR_CADT_FLAGS | NLA_F_NET_BYTEORDER,
                    &FLAG_PHYSDEV.to_be_bytes(),
                );
            }
        }
    }
    nest_end(out, data);
    msg.end(out);
}

fn parse_entry(data: &[u8]) -> Result<Entry, NetlinkError> {
    let mut ip = None;
    let mut prefix = None;
    let mut iface = None;
    let mut flags = 0u32;
    for (kind, payload) in attrs(data)? {
        match kind {
            ATTR_IP => {
                for (k, a) in attrs(payload)? {
                    ip = match (k, a.len()) {
                        (ATTR_IPADDR_IPV4, 4) => {
                            Some(IpAddr::from(<[u8; 4]>::try_from(a).unwrap()))
                        }
                        (ATTR_IPADDR_IPV6, 16) => {
                            Some(IpAddr::from(<[u8; 16]>::try_from(a).unwrap()))
                        }
                        _ => return Err(Malformed("ipset address of an odd length").into()),
                    };
                }
            }
            ATTR_CIDR => prefix = payload.first().copied(),
            ATTR_IFACE => iface = Some(attr_str(payload)),
            ATTR_CADT_FLAGS if payload.len() == 4 => {
                flags = u32::from_be_bytes(payload.try_into().unwrap())
            }
            _ => {}
        }
    }
    let ip = ip.ok_or(Malformed("ipset entry without an address"))?;
    Ok(match iface {
        None => Entry::Ip(ip),
        Some(iface) => Entry::NetIface {
            net: ip,
            prefix: prefix.unwrap_or(if ip.is_ipv4() { 32 } else { 128 }),
            iface,
            physdev: flags & FLAG_PHYSDEV != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_change_encodes_the_entry_as_the_kernel_lists_it() {
        let entry = Entry::NetIface {
            net: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7)),
            prefix: 128,
            iface: "veth-a".into(),
            physdev: true,
        };
        let mut out = Vec::new();
        encode_change(
            &mut out,
            9,
            &Change {
                add: true,
                set: "s",
                entry: &entry,
            },
        );
        let msgs = nfnl::messages(&out).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, (NFNL_SUBSYS_IPSET << 8) | CMD_ADD);
        assert_eq!(msgs[0].body[0], NFPROTO_IPV6);
        let top = attrs(&msgs[0].body[4..]).unwrap();
        let data = top.iter().find(|(k, _)| *k == ATTR_DATA).unwrap().1;
        assert_eq!(parse_entry(data).unwrap(), entry);
        let plain = Entry::Ip(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        let mut out = Vec::new();
        encode_change(
            &mut out,
            1,
            &Change {
                add: false,
                set: "s",
                entry: &plain,
            },
        );
        let msgs = nfnl::messages(&out).unwrap();
        assert_eq!(msgs[0].kind, (NFNL_SUBSYS_IPSET << 8) | CMD_DEL);
        let top = attrs(&msgs[0].body[4..]).unwrap();
        let data = top.iter().find(|(k, _)| *k == ATTR_DATA).unwrap().1;
        assert_eq!(parse_entry(data).unwrap(), plain);
    }

    #[test]
    fn errors_are_named() {
        assert_eq!(describe(4108), "the set is in use by a rule");
        assert_eq!(describe(Errno::ENOENT as i32), Errno::ENOENT.desc());
    }
}

//! The per-pod fast path: set element changes sent to the kernel as one nfnetlink batch on
//! a socket the writer keeps open.
//!
//! libnftables parses text, refreshes its cache of the whole ruleset (eight dump round
//! trips) and allocates and initialises about a megabyte of hash buckets for every command
//! buffer. Back to back that costs 0.1 ms; after the writer has slept (the normal case: one
//! pod now and then) the same work costs 1-4 ms of page faults and cold caches. Element
//! changes need none of it: their messages name the table and set and carry the raw key
//! bytes, so the agent builds them itself. The tables, chains and sets are still created,
//! read and removed through libnftables.

use std::collections::BTreeMap;

use nix::errno::Errno;

use super::ruleset::Element;
pub use crate::nfnl::NetlinkError;
use crate::nfnl::{
    self, nest_begin, nest_end, pad4, put, put_str, Msg, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};

// nfnetlink and nf_tables constants (linux/netfilter/nfnetlink.h,
// linux/netfilter/nf_tables.h).
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFPROTO_INET: u8 = 1;
const NFPROTO_BRIDGE: u8 = 7;
const IFNAMSIZ: usize = 16;

/// Changes of more elements than this go through libnftables instead (a resync of
/// thousands): the kernel echoes a refused message in its error reply, and the reply must
/// fit the receive buffer (an element encodes to at most 72 bytes).
pub const MAX_ELEMENTS: usize = 256;

/// A netfilter netlink socket in the network namespace the writer was created in.
pub struct ElementWriter {
    socket: nfnl::Socket,
}

impl ElementWriter {
    pub fn new() -> Result<Self, NetlinkError> {
        Ok(Self {
            socket: nfnl::Socket::open()?,
        })
    }

    /// Deletes `remove` and adds `add` in one kernel transaction: all or nothing.
    pub fn apply<'a>(
        &mut self,
        table: &str,
        remove: impl IntoIterator<Item = &'a Element>,
        add: impl IntoIterator<Item = &'a Element>,
    ) -> Result<(), NetlinkError> {
        let first = self.socket.next_seq();
        let batch = encode_batch(table, first, remove, add);
        let Some(batch) = batch else {
            return Ok(());
        };
        // BEGIN, the messages, END.
        self.socket
            .used_through(first.wrapping_add(batch.messages + 1));
        self.socket.send(&batch.bytes)?;
        self.await_acks(first, batch.messages)
    }

    /// Reads replies until every element message of the batch (sequence numbers
    /// `first + 1 ..= first + messages`) is acknowledged or one is refused.
    fn await_acks(&mut self, first: u32, messages: u32) -> Result<(), NetlinkError> {
        let mut pending = messages;
        let mut refused: Option<String> = None;
        while pending > 0 {
            let data = self.socket.recv()?;
            for (seq, code) in nfnl::parse_acks(data)? {
                let offset = seq.wrapping_sub(first);
                if offset > messages {
                    continue; // a late reply to an earlier, timed-out batch
                }
                if code != 0 {
                    let msg = Errno::from_raw(-code).desc();
                    refused.get_or_insert_with(|| msg.to_string());
                    if offset == 0 {
                        // The batch itself was refused (no permission, no nf_tables).
                        pending = 0;
                        break;
                    }
                }
                if offset > 0 {
                    pending = pending.saturating_sub(1);
                }
            }
        }
        match refused {
            Some(msg) => Err(NetlinkError::Refused(msg)),
            None => Ok(()),
        }
    }
}

/// An encoded batch and the number of element messages in it.
#[derive(Debug)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub messages: u32,
}

/// Encodes a batch: BEGIN (sequence `first`), one message per (verb, set), END. `None`
/// when there is nothing to change.
pub fn encode_batch<'a>(
    table: &str,
    first: u32,
    remove: impl IntoIterator<Item = &'a Element>,
    add: impl IntoIterator<Item = &'a Element>,
) -> Option<Batch> {
    // Deletions first, so a map key given a new value is replaced, not refused.
    let mut groups: Vec<(u16, u8, &'static str, Vec<&Element>)> = Vec::new();
    for (verb, elements) in [
        (NFT_MSG_DELSETELEM, remove.into_iter().collect::<Vec<_>>()),
        (NFT_MSG_NEWSETELEM, add.into_iter().collect::<Vec<_>>()),
    ] {
        let mut by_set: BTreeMap<(u8, &'static str), Vec<&Element>> = BTreeMap::new();
        for e in elements {
            let (family, set) = e.family_set();
            let family = if family == "bridge" {
                NFPROTO_BRIDGE
            } else {
                NFPROTO_INET
            };
            by_set.entry((family, set)).or_default().push(e);
        }
        groups.extend(by_set.into_iter().map(|((f, s), es)| (verb, f, s, es)));
    }
    if groups.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(256);
    let mut seq = first;
    control(&mut out, NFNL_MSG_BATCH_BEGIN, seq);
    for (verb, family, set, elements) in &groups {
        seq = seq.wrapping_add(1);
        let flags = NLM_F_REQUEST
            | NLM_F_ACK
            | if *verb == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
        let msg = Msg::begin(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | verb,
            flags,
            seq,
            *family,
        );
        put_str(&mut out, NFTA_SET_ELEM_LIST_TABLE, table);
        put_str(&mut out, NFTA_SET_ELEM_LIST_SET, set);
        let list = nest_begin(&mut out, NFTA_SET_ELEM_LIST_ELEMENTS);
        for e in elements {
            let elem = nest_begin(&mut out, NFTA_LIST_ELEM);
            let key = nest_begin(&mut out, NFTA_SET_ELEM_KEY);
            put(&mut out, NFTA_DATA_VALUE, &key_bytes(e));
            nest_end(&mut out, key);
            if let Element::BrPortMac(_, mac) | Element::BrPodMacBridge(_, mac) = e {
                if *verb == NFT_MSG_NEWSETELEM {
                    let data = nest_begin(&mut out, NFTA_SET_ELEM_DATA);
                    put(&mut out, NFTA_DATA_VALUE, &mac.0);
                    nest_end(&mut out, data);
                }
            }
            nest_end(&mut out, elem);
        }
        nest_end(&mut out, list);
        msg.end(&mut out);
    }
    control(&mut out, NFNL_MSG_BATCH_END, seq.wrapping_add(1));
    Some(Batch {
        bytes: out,
        messages: groups.len() as u32,
    })
}

/// The key as the kernel stores it: fields in network byte order, each padded to a
/// multiple of 4 bytes; interface names NUL-padded to IFNAMSIZ.
fn key_bytes(e: &Element) -> Vec<u8> {
    fn ifname(out: &mut Vec<u8>, name: &str) {
        let mut b = [0u8; IFNAMSIZ];
        let n = name.len().min(IFNAMSIZ - 1);
        b[..n].copy_from_slice(&name.as_bytes()[..n]);
        out.extend_from_slice(&b);
    }
    let mut out = Vec::with_capacity(32);
    match e {
        Element::PodV4(a) | Element::BrPodV4(a) => out.extend_from_slice(&a.octets()),
        Element::PodV6(a) | Element::BrPodV6(a) => out.extend_from_slice(&a.octets()),
        Element::PodIfV4(i, a) | Element::BrPortV4(i, a) => {
            ifname(&mut out, i);
            out.extend_from_slice(&a.octets());
        }
        Element::PodIfV6(i, a) | Element::BrPortV6(i, a) => {
            ifname(&mut out, i);
            out.extend_from_slice(&a.octets());
        }
        Element::RoutedPort(i)
        | Element::BrPort(i)
        | Element::BrPortMac(i, _)
        | Element::BrPinned(i) => ifname(&mut out, i),
        Element::BrPinnedMac(i, mac) => {
            ifname(&mut out, i);
            out.extend_from_slice(&mac.0);
            pad4(&mut out);
        }
        Element::BrPodMacBridge(mac, _) => out.extend_from_slice(&mac.0),
        Element::BrNdTarget(a) => out.extend_from_slice(&a.octets()),
        Element::BrNdPortTarget(i, a) => {
            ifname(&mut out, i);
            out.extend_from_slice(&a.octets());
        }
    }
    out
}

fn control(out: &mut Vec<u8>, kind: u16, seq: u32) {
    let msg = Msg::begin(out, kind, NLM_F_REQUEST, seq, 0);
    msg.res_id(out, NFNL_SUBSYS_NFTABLES);
    msg.end(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::ruleset::Mac;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn keys_are_padded_fields_in_network_order() {
        let k = key_bytes(&Element::PodIfV4(
            "veth1".into(),
            Ipv4Addr::new(10, 0, 0, 7),
        ));
        assert_eq!(k.len(), 20);
        assert_eq!(&k[..5], b"veth1");
        assert!(k[5..16].iter().all(|b| *b == 0));
        assert_eq!(&k[16..], &[10, 0, 0, 7]);
        let k = key_bytes(&Element::BrPortV6("p".into(), Ipv6Addr::LOCALHOST));
        assert_eq!(k.len(), 32);
        assert_eq!(k[31], 1);
        assert_eq!(
            key_bytes(&Element::BrPortMac("p".into(), Mac([1; 6]))).len(),
            16
        );
    }

    #[test]
    fn batch_frames_one_message_per_verb_and_set() {
        let add = [
            Element::PodV4(Ipv4Addr::new(10, 0, 0, 1)),
            Element::PodV4(Ipv4Addr::new(10, 0, 0, 2)),
            Element::BrPortMac("p".into(), Mac([2, 0, 0, 0, 0, 1])),
        ];
        let remove = [Element::PodV4(Ipv4Addr::new(10, 0, 0, 3))];
        let b = encode_batch("ambient", 100, &remove, &add).unwrap();
        assert_eq!(b.messages, 3);
        // Walk the messages: BEGIN, DEL pod_v4, NEW pod_v4 (inet), NEW port_bridge_mac (bridge), END.
        let mut data = &b.bytes[..];
        let mut seen = Vec::new();
        while !data.is_empty() {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            let seq = u32::from_ne_bytes(data[8..12].try_into().unwrap());
            seen.push((kind, seq, data[16]));
            data = &data[len..];
        }
        assert_eq!(
            seen,
            vec![
                (NFNL_MSG_BATCH_BEGIN, 100, 0),
                (0x0a00 | NFT_MSG_DELSETELEM, 101, NFPROTO_INET),
                (0x0a00 | NFT_MSG_NEWSETELEM, 102, NFPROTO_INET),
                (0x0a00 | NFT_MSG_NEWSETELEM, 103, NFPROTO_BRIDGE),
                (NFNL_MSG_BATCH_END, 104, 0),
            ]
        );
        assert!(encode_batch("ambient", 1, &[], &[]).is_none());
    }
}

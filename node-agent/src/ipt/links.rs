//! Routed ambient pods' host veths, marked for the iptables backend by their interface group
//! ([`ROUTED_PORT_GROUP`]): set and cleared with one rtnetlink message per link, read back
//! with an rtnetlink dump (not sysfs, which shows the namespace it was mounted in). (ipsets cannot hold bare interface names: a `hash:net,iface` set keys its
//! buckets by the network alone, so `0.0.0.0/0,<veth>` for every routed pod overflows one
//! bucket at about 64 pods.)

use std::collections::{BTreeMap, BTreeSet};

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

pub use ambient_common::constants::ROUTED_PORT_GROUP;

use ambient_common::netlink::{
    attr_str, attr_u32, attrs, ifinfomsg, messages, put, put_str, request, IFINFOMSG_LEN,
    IFLA_GROUP, IFLA_IFNAME, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    RTM_GETLINK, RTM_NEWLINK,
};

use crate::nfnl::{self, NetlinkError};

/// Sets (or, with `group` 0, clears) the group of each named link; a link that does not
/// exist is reported unless `missing_ok`. All or nothing: on a refusal the links already
/// changed get their previous group back.
pub struct Links {
    socket: nfnl::Socket,
}

fn encode(out: &mut Vec<u8>, seq: u32, ifname: &str, group: u32) {
    let mut a = Vec::with_capacity(32);
    put_str(&mut a, IFLA_IFNAME, ifname);
    put(&mut a, IFLA_GROUP, &group.to_ne_bytes());
    // ifindex 0: the link is named by IFLA_IFNAME.
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    out.extend_from_slice(&request(RTM_NEWLINK, flags, seq, &ifinfomsg(0), &a));
}

impl Links {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(Self {
            socket: nfnl::Socket::open_protocol(SockProtocol::NetlinkRoute)?,
        })
    }

    /// Every link of the namespace and its group.
    pub fn groups(&mut self) -> Result<BTreeMap<String, u32>, NetlinkError> {
        let seq = self.socket.next_seq();
        self.socket.used_through(seq);
        let out = request(
            RTM_GETLINK,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            &ifinfomsg(0),
            &[],
        );
        self.socket.send(&out)?;
        let mut links = BTreeMap::new();
        loop {
            let data = self.socket.recv()?;
            for m in messages(data)? {
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_DONE => return Ok(links),
                    NLMSG_ERROR => {
                        let (_, code) = ambient_common::netlink::error_of(m.body)?;
                        return Err(NetlinkError::Refused(
                            Errno::from_raw(-code).desc().to_owned(),
                        ));
                    }
                    RTM_NEWLINK if m.body.len() >= IFINFOMSG_LEN => {
                        let (mut name, mut group) = (None, 0u32);
                        for (k, v) in attrs(&m.body[IFINFOMSG_LEN..])? {
                            match k {
                                IFLA_IFNAME => name = Some(attr_str(v)),
                                IFLA_GROUP => group = attr_u32(v).unwrap_or(group),
                                _ => {}
                            }
                        }
                        if let Some(name) = name {
                            links.insert(name, group);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Links whose group is `group` (none when the links cannot be read).
    pub fn in_group(&mut self, group: u32) -> BTreeSet<String> {
        match self.groups() {
            Ok(all) => all
                .into_iter()
                .filter(|(_, g)| *g == group)
                .map(|(n, _)| n)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list links");
                BTreeSet::new()
            }
        }
    }

    fn send(&mut self, changes: &[(&str, u32)]) -> Vec<i32> {
        let first = self.socket.next_seq();
        let mut out = Vec::with_capacity(64 * changes.len());
        for (i, (name, group)) in changes.iter().enumerate() {
            encode(&mut out, first.wrapping_add(i as u32), name, *group);
        }
        self.socket
            .used_through(first.wrapping_add(changes.len() as u32 - 1));
        let mut codes = vec![None; changes.len()];
        let transport = -(Errno::EIO as i32);
        if self.socket.send(&out).is_err() {
            return vec![transport; changes.len()];
        }
        let mut pending = changes.len();
        while pending > 0 {
            let Ok(data) = self.socket.recv() else { break };
            let Ok(acks) = nfnl::parse_acks(data) else {
                break;
            };
            for (seq, code) in acks {
                let i = seq.wrapping_sub(first) as usize;
                if let Some(slot) = codes.get_mut(i) {
                    if slot.is_none() {
                        *slot = Some(code);
                        pending -= 1;
                    }
                }
            }
        }
        codes.into_iter().map(|c| c.unwrap_or(transport)).collect()
    }

    /// Gives each of `add` the group and takes it from each of `remove` (a removed link that
    /// no longer exists is fine; an added one must exist). Nothing is read first: a pod's
    /// veth has the default group 0 until the agent marks it.
    pub fn apply(&mut self, remove: &[&str], add: &[&str]) -> Result<(), NetlinkError> {
        let changes: Vec<(&str, u32)> = remove
            .iter()
            .map(|r| (*r, 0))
            .chain(add.iter().map(|a| (*a, ROUTED_PORT_GROUP)))
            .collect();
        let mut done: Vec<(&str, u32)> = Vec::new();
        for chunk in changes.chunks(64) {
            let codes = self.send(chunk);
            let failed = chunk.iter().zip(&codes).find(|((_, g), c)| {
                // A link gone before its release is released.
                **c != 0 && !(*g == 0 && **c == -(Errno::ENODEV as i32))
            });
            if let Some(((name, _), code)) = failed {
                done.extend(
                    chunk
                        .iter()
                        .zip(&codes)
                        .filter(|(_, c)| **c == 0)
                        .map(|(x, _)| *x),
                );
                let undo: Vec<(&str, u32)> = done
                    .iter()
                    .map(|(n, g)| (*n, if *g == 0 { ROUTED_PORT_GROUP } else { 0 }))
                    .collect();
                if !undo.is_empty() {
                    let _ = self.send(&undo);
                }
                let reason = if *code == -(Errno::ENODEV as i32) {
                    "no such interface to mark as a routed ambient port".to_owned()
                } else {
                    Errno::from_raw(-code).desc().to_owned()
                };
                return Err(NetlinkError::Refused(format!("interface {name}: {reason}")));
            }
            done.extend(chunk.iter().copied());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_the_link_and_its_group() {
        let mut out = Vec::new();
        encode(&mut out, 5, "veth1", ROUTED_PORT_GROUP);
        let msgs = nfnl::messages(&out).unwrap();
        assert_eq!((msgs[0].kind, msgs[0].seq), (RTM_NEWLINK, 5));
        let attrs = nfnl::attrs(&msgs[0].body[16..]).unwrap();
        assert_eq!(nfnl::attr_str(attrs[0].1), "veth1");
        assert_eq!(attrs[1], (IFLA_GROUP, &ROUTED_PORT_GROUP.to_ne_bytes()[..]));
    }
}

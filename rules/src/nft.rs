//! The nftables ruleset: the fixed rules (rendered once from configuration) and the per-pod
//! set and map elements (the only thing a pod's enrolment changes).
//!
//! Two tables named [`ambient_common::constants::NFT_TABLE`]:
//! - `inet`: anti-spoofing at L3, capture (`nat` prerouting at -110, before kube-proxy's
//!   DNAT at -100), fail-closed guards, ztunnel's own-traffic marking.
//! - `bridge`: anti-spoofing at L2 for bridged pods (the inet hooks only see the bridge), and
//!   L3 steering of bridged ambient pods' TCP so replies to ztunnel's transparent connections
//!   reach the host stack instead of being switched straight to a neighbour.
//!
//! See `docs/architecture.md` for why each rule exists.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Values the fixed rules are rendered from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesetParams {
    pub table: String,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub hbone_port: u16,
    pub mark: u32,
    pub mask: u32,
    /// A node address captured IPv4 traffic is DNATed to; `None` redirects it to the address
    /// of the interface it arrived on (`redirect`), which drops it where that interface has
    /// no IPv4 address (the host side of a Calico or AWS VPC CNI veth).
    pub capture_v4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub capture_v6: Option<Ipv6Addr>,
}

/// The project's defaults (`ambient_common::constants`), as the node agent's configuration has
/// them when nothing overrides them.
impl Default for RulesetParams {
    fn default() -> Self {
        use ambient_common::constants as c;
        Self {
            table: c::NFT_TABLE.to_owned(),
            outbound_port: c::OUTBOUND_PORT,
            inbound_plaintext_port: c::INBOUND_PLAINTEXT_PORT,
            hbone_port: c::HBONE_PORT,
            mark: c::ZTUNNEL_MARK,
            mask: c::MARK_MASK,
            capture_v4: None,
            capture_v6: None,
        }
    }
}

/// Chain names and the number of rules each holds: what drift detection compares.
pub const INET_CHAINS: &[(&str, usize)] = &[
    ("guard", 5),
    ("mark_replies", 1),
    ("capture", 8),
    ("closed", 6),
    ("local_hbone", 2),
    ("mark_own", 1),
    ("input_guard", 1),
];
pub const BRIDGE_CHAINS: &[(&str, usize)] = &[("guard", 16)];

impl RulesetParams {
    /// The fixed part of both tables, as one nft script. Applying it replaces any previous
    /// version of the tables (and their elements) atomically.
    pub fn render_base(&self) -> String {
        format!("{}{}", self.render_inet(), self.render_bridge())
    }

    /// The fixed part of the `inet` table, replacing any previous version of it.
    pub fn render_inet(&self) -> String {
        let RulesetParams {
            table,
            outbound_port: out,
            inbound_plaintext_port: inb,
            hbone_port: hbone,
            mark,
            mask,
            capture_v4,
            capture_v6,
        } = self;
        let keep = !mask;
        // How prerouting capture sends a flow to ztunnel's port `p`, per family.
        let to4 = |p: &u16| match capture_v4 {
            Some(a) => format!("dnat ip to {a}:{p}"),
            None => format!("redirect to :{p}"),
        };
        let to6 = |p: &u16| match capture_v6 {
            Some(a) => format!("dnat ip6 to [{a}]:{p}"),
            None => format!("redirect to :{p}"),
        };
        let (out4, out6, hbone4, hbone6, inb4, inb6) = (
            to4(out),
            to6(out),
            to4(hbone),
            to6(hbone),
            to4(inb),
            to6(inb),
        );
        format!(
            r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  comment "ambient data plane: owned by node-agent, do not edit"
  set pod_v4 {{ type ipv4_addr; comment "ambient pod addresses"; }}
  set pod_v6 {{ type ipv6_addr; comment "ambient pod addresses"; }}
  set pod_if_v4 {{ type ifname . ipv4_addr; comment "L3 interface . address of ambient pods"; }}
  set pod_if_v6 {{ type ifname . ipv6_addr; comment "L3 interface . address of ambient pods"; }}
  set routed_ports {{ type ifname; comment "host veths of routed ambient pods"; }}
  chain guard {{
    type filter hook prerouting priority -300; policy accept;
    ip saddr @pod_v4 iifname . ip saddr != @pod_if_v4 counter drop comment "ambient address from a foreign interface"
    ip6 saddr @pod_v6 iifname . ip6 saddr != @pod_if_v6 counter drop comment "ambient address from a foreign interface"
    iifname @routed_ports iifname . ip saddr != @pod_if_v4 counter drop comment "routed ambient pod with a foreign address"
    iifname @routed_ports ip6 saddr != fe80::/10 iifname . ip6 saddr != @pod_if_v6 counter drop comment "routed ambient pod with a foreign address"
    iifname @routed_ports ip6 saddr fe80::/10 meta l4proto tcp counter drop comment "TCP from an ambient pod's link-local address (never captured)"
  }}
  chain mark_replies {{
    type filter hook prerouting priority mangle; policy accept;
    ct direction reply ct mark & {mask:#x} == {mark:#x} meta mark set meta mark & {keep:#x} | {mark:#x} comment "replies to ztunnel's transparent connections go to ztunnel"
  }}
  chain capture {{
    type nat hook prerouting priority -110; policy accept;
    meta mark & {mask:#x} == {mark:#x} return
    fib daddr type local counter return comment "node-local destinations: delivered as without the mesh, never through ztunnel"
    meta l4proto tcp ip saddr @pod_v4 counter {out4} comment "outbound"
    meta l4proto tcp ip6 saddr @pod_v6 counter {out6} comment "outbound"
    ip daddr @pod_v4 tcp dport {hbone} counter {hbone4} comment "inbound HBONE"
    ip6 daddr @pod_v6 tcp dport {hbone} counter {hbone6} comment "inbound HBONE"
    meta l4proto tcp ip daddr @pod_v4 counter {inb4} comment "inbound plaintext"
    meta l4proto tcp ip6 daddr @pod_v6 counter {inb6} comment "inbound plaintext"
  }}
  chain closed {{
    type filter hook prerouting priority -90; policy accept;
    ct state new ct status dnat meta l4proto tcp ip daddr @pod_v4 counter reject with tcp reset comment "DNAT to an ambient pod that bypassed capture"
    ct state new ct status dnat meta l4proto tcp ip6 daddr @pod_v6 counter reject with tcp reset comment "DNAT to an ambient pod that bypassed capture"
    meta l4proto tcp ip saddr @pod_v4 ct status & dnat == 0 ct mark & {mask:#x} != {mark:#x} ct state established fib daddr type != local counter reject with tcp reset comment "an ambient pod's flow that never passed capture (opened before its enrolment)"
    meta l4proto tcp ip6 saddr @pod_v6 ct status & dnat == 0 ct mark & {mask:#x} != {mark:#x} ct state established fib daddr type != local counter reject with tcp reset comment "an ambient pod's flow that never passed capture (opened before its enrolment)"
    meta l4proto tcp ip daddr @pod_v4 ct status & dnat == 0 ct mark & {mask:#x} != {mark:#x} ct state established counter reject with tcp reset comment "a flow to an ambient pod that never passed capture (opened before its enrolment)"
    meta l4proto tcp ip6 daddr @pod_v6 ct status & dnat == 0 ct mark & {mask:#x} != {mark:#x} ct state established counter reject with tcp reset comment "a flow to an ambient pod that never passed capture (opened before its enrolment)"
  }}
  chain local_hbone {{
    type nat hook output priority -110; policy accept;
    ip daddr @pod_v4 tcp dport {hbone} redirect to :{hbone} comment "HBONE to a pod of this node"
    ip6 daddr @pod_v6 tcp dport {hbone} redirect to :{hbone} comment "HBONE to a pod of this node"
  }}
  chain mark_own {{
    type filter hook output priority mangle; policy accept;
    meta mark & {mask:#x} == {mark:#x} ct mark set ct mark & {keep:#x} | {mark:#x} comment "remember ztunnel's connections"
  }}
  chain input_guard {{
    type filter hook input priority filter; policy accept;
    tcp dport {{ {out}, {inb} }} ct status & dnat == 0 counter reject with tcp reset comment "capture ports only take captured traffic"
  }}
}}
"#
        )
    }

    /// The fixed part of the `bridge` table alone (L2 rules for bridged pods), replacing any
    /// previous version of it; the iptables backend uses it where the kernel has nftables.
    pub fn render_bridge(&self) -> String {
        let table = &self.table;
        format!(
            r#"table bridge {table} {{}}
delete table bridge {table}
table bridge {table} {{
  comment "ambient data plane: owned by node-agent, do not edit"
  set ports {{ type ifname; comment "bridge ports of ambient pods"; }}
  set port_v4 {{ type ifname . ipv4_addr; }}
  set port_v6 {{ type ifname . ipv6_addr; }}
  set pod_v4 {{ type ipv4_addr; comment "bridged ambient pod addresses"; }}
  set pod_v6 {{ type ipv6_addr; comment "bridged ambient pod addresses"; }}
  map port_bridge_mac {{ type ifname : ether_addr; }}
  set pinned {{ type ifname; comment "bridge ports of every pod the agent knows"; }}
  set port_mac {{ type ifname . ether_addr; comment "bridge port . the pod's own MAC"; }}
  map pod_mac_bridge {{ type ether_addr : ether_addr; comment "bridged ambient pod's MAC : its bridge's MAC"; }}
  set nd_target {{ typeof @th,64,128; comment "bridged ambient IPv6 addresses, as ND targets"; }}
  set nd_port_target {{ typeof iifname . @th,64,128; comment "bridge port . ambient IPv6 address"; }}
  chain guard {{
    type filter hook prerouting priority -300; policy accept;
    ether type {{ 8021q, 8021ad }} @ll,112,16 & 0xfff == 0 counter drop comment "priority-tagged frame (VLAN 0 is read as untagged)"
    iifname @pinned ether type != {{ ip, ip6, arp }} counter drop comment "pod ports carry IPv4, IPv6 and ARP only (no VLAN tags)"
    iifname @pinned iifname . ether saddr != @port_mac counter drop comment "foreign source MAC from a pod port"
    iifname @pinned ether type arp iifname . arp saddr ether != @port_mac counter drop comment "ARP with a foreign sender MAC"
    ether type ip ip saddr @pod_v4 iifname . ip saddr != @port_v4 counter drop comment "ambient address from a foreign port"
    ether type ip6 ip6 saddr @pod_v6 iifname . ip6 saddr != @port_v6 counter drop comment "ambient address from a foreign port"
    iifname @ports ether type ip iifname . ip saddr != @port_v4 counter drop comment "ambient pod with a foreign address"
    iifname @ports ether type ip6 ip6 saddr != fe80::/10 iifname . ip6 saddr != @port_v6 counter drop comment "ambient pod with a foreign address"
    iifname @ports ether type arp arp saddr ip != 0.0.0.0 iifname . arp saddr ip != @port_v4 counter drop comment "ARP for a foreign address"
    ether type arp arp saddr ip @pod_v4 iifname . arp saddr ip != @port_v4 counter drop comment "ARP claiming an ambient address"
    ether type ip6 icmpv6 type nd-neighbor-advert @th,64,128 @nd_target iifname . @th,64,128 != @nd_port_target counter drop comment "neighbour advertisement claiming an ambient address"
    iifname @ports ether type ip6 ip6 saddr fe80::/10 meta l4proto tcp counter drop comment "TCP from an ambient pod's link-local address (never captured)"
    iifname @ports ether type ip meta l4proto tcp ether daddr set iifname map @port_bridge_mac meta pkttype set host comment "route ambient TCP through the host"
    iifname @ports ether type ip6 meta l4proto tcp ether daddr set iifname map @port_bridge_mac meta pkttype set host comment "route ambient TCP through the host"
    ether type ip meta l4proto tcp ether daddr set ether daddr map @pod_mac_bridge meta pkttype set host comment "route TCP to an ambient pod through the host (replies to ztunnel's transparent connections; link-local is not forwarded)"
    ether type ip6 meta l4proto tcp ether daddr set ether daddr map @pod_mac_bridge meta pkttype set host comment "route TCP to an ambient pod through the host (replies to ztunnel's transparent connections; link-local is not forwarded)"
  }}
}}
"#
        )
    }

    /// Removes both tables (uninstall). Idempotent.
    pub fn render_remove(&self) -> String {
        self.render_remove_families(&["inet", "bridge"])
    }

    /// Removes the tables of `families`. Idempotent.
    pub fn render_remove_families(&self, families: &[&str]) -> String {
        let table = &self.table;
        families
            .iter()
            .map(|f| format!("table {f} {table} {{}}\ndelete table {f} {table}\n"))
            .collect()
    }
}

pub use ambient_common::net::Mac;

/// One set or map element. The ordering makes rendering deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Element {
    PodV4(Ipv4Addr),
    PodV6(Ipv6Addr),
    PodIfV4(String, Ipv4Addr),
    PodIfV6(String, Ipv6Addr),
    RoutedPort(String),
    BrPort(String),
    BrPortV4(String, Ipv4Addr),
    BrPortV6(String, Ipv6Addr),
    BrPodV4(Ipv4Addr),
    BrPodV6(Ipv6Addr),
    BrPortMac(String, Mac),
    /// The bridge port of any pod the agent knows (ambient or not): MAC-pinned, and limited
    /// to IPv4, IPv6 and ARP frames.
    BrPinned(String),
    /// Port . the pod's own MAC: the only source MAC the port accepts.
    BrPinnedMac(String, Mac),
    /// A bridged ambient pod's MAC : its bridge's MAC (TCP to the pod is routed by the host).
    BrPodMacBridge(Mac, Mac),
    /// A bridged ambient IPv6 address, as the target of a neighbour advertisement.
    BrNdTarget(Ipv6Addr),
    /// Port . bridged ambient IPv6 address: the only port that may advertise it.
    BrNdPortTarget(String, Ipv6Addr),
}

impl Element {
    pub fn family_set(&self) -> (&'static str, &'static str) {
        match self {
            Element::PodV4(_) => ("inet", "pod_v4"),
            Element::PodV6(_) => ("inet", "pod_v6"),
            Element::PodIfV4(..) => ("inet", "pod_if_v4"),
            Element::PodIfV6(..) => ("inet", "pod_if_v6"),
            Element::RoutedPort(_) => ("inet", "routed_ports"),
            Element::BrPort(_) => ("bridge", "ports"),
            Element::BrPortV4(..) => ("bridge", "port_v4"),
            Element::BrPortV6(..) => ("bridge", "port_v6"),
            Element::BrPodV4(_) => ("bridge", "pod_v4"),
            Element::BrPodV6(_) => ("bridge", "pod_v6"),
            Element::BrPortMac(..) => ("bridge", "port_bridge_mac"),
            Element::BrPinned(_) => ("bridge", "pinned"),
            Element::BrPinnedMac(..) => ("bridge", "port_mac"),
            Element::BrPodMacBridge(..) => ("bridge", "pod_mac_bridge"),
            Element::BrNdTarget(_) => ("bridge", "nd_target"),
            Element::BrNdPortTarget(..) => ("bridge", "nd_port_target"),
        }
    }

    fn value(&self) -> String {
        match self {
            Element::PodV4(a) | Element::BrPodV4(a) => a.to_string(),
            Element::PodV6(a) | Element::BrPodV6(a) => a.to_string(),
            Element::PodIfV4(i, a) | Element::BrPortV4(i, a) => format!("{} . {a}", quote(i)),
            Element::PodIfV6(i, a) | Element::BrPortV6(i, a) => format!("{} . {a}", quote(i)),
            Element::RoutedPort(i) | Element::BrPort(i) | Element::BrPinned(i) => quote(i),
            Element::BrPortMac(i, m) => format!("{} : {m}", quote(i)),
            Element::BrPinnedMac(i, m) => format!("{} . {m}", quote(i)),
            Element::BrPodMacBridge(p, b) => format!("{p} : {b}"),
            Element::BrNdTarget(a) => raw128(a),
            Element::BrNdPortTarget(i, a) => format!("{} . {}", quote(i), raw128(a)),
        }
    }
}

/// An IPv6 address as the 128-bit integer a raw payload match (`@th,64,128`) compares.
fn raw128(a: &Ipv6Addr) -> String {
    format!("0x{:032x}", u128::from(*a))
}

/// Interface names come from the kernel (at most 15 bytes, no quotes or whitespace); quote
/// them so nft never reads one as a keyword.
fn quote(ifname: &str) -> String {
    format!("\"{ifname}\"")
}

/// Is `name` a Linux interface name nft can carry safely?
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'/' && b != b'\\' && b != b':')
}

/// How a pod's host-side veth is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// The veth is an L3 interface of the node (`ptp`, Calico).
    Routed { veth: String },
    /// The veth is a port of `bridge` (`bridge`, flannel).
    Bridged {
        veth: String,
        bridge: String,
        bridge_mac: Mac,
    },
}

/// The elements that enrol one pod.
pub fn pod_elements(attachment: &Attachment, ips: &[IpAddr]) -> BTreeSet<Element> {
    let mut out = BTreeSet::new();
    match attachment {
        Attachment::Routed { veth } => {
            out.insert(Element::RoutedPort(veth.clone()));
            for ip in ips {
                match *ip {
                    IpAddr::V4(a) => {
                        out.insert(Element::PodV4(a));
                        out.insert(Element::PodIfV4(veth.clone(), a));
                    }
                    IpAddr::V6(a) => {
                        out.insert(Element::PodV6(a));
                        out.insert(Element::PodIfV6(veth.clone(), a));
                    }
                }
            }
        }
        Attachment::Bridged {
            veth,
            bridge,
            bridge_mac,
        } => {
            out.insert(Element::BrPort(veth.clone()));
            out.insert(Element::BrPortMac(veth.clone(), *bridge_mac));
            for ip in ips {
                match *ip {
                    IpAddr::V4(a) => {
                        out.insert(Element::PodV4(a));
                        out.insert(Element::PodIfV4(bridge.clone(), a));
                        out.insert(Element::BrPodV4(a));
                        out.insert(Element::BrPortV4(veth.clone(), a));
                    }
                    IpAddr::V6(a) => {
                        out.insert(Element::PodV6(a));
                        out.insert(Element::PodIfV6(bridge.clone(), a));
                        out.insert(Element::BrPodV6(a));
                        out.insert(Element::BrPortV6(veth.clone(), a));
                        out.insert(Element::BrNdTarget(a));
                        out.insert(Element::BrNdPortTarget(veth.clone(), a));
                    }
                }
            }
        }
    }
    out
}

/// The elements that pin a bridged pod's port to its own MAC, whether it is ambient or not
/// (a pod that takes a neighbour's MAC takes the bridge's forwarding entry, and with it the
/// node's traffic to that neighbour). Routed pods, and pods whose MAC is unknown, have none.
pub fn pin_elements(attachment: &Attachment, mac: Option<Mac>) -> BTreeSet<Element> {
    match (attachment, mac) {
        (Attachment::Bridged { veth, .. }, Some(mac)) => BTreeSet::from([
            Element::BrPinned(veth.clone()),
            Element::BrPinnedMac(veth.clone(), mac),
        ]),
        _ => BTreeSet::new(),
    }
}

/// The element that routes TCP addressed to a bridged ambient pod's MAC through the host,
/// from any port: a neighbour's reply to ztunnel's transparent connection (made with the pod's
/// address) must reach ztunnel, not be switched straight to the pod.
pub fn ambient_mac_elements(attachment: &Attachment, mac: Option<Mac>) -> BTreeSet<Element> {
    match (attachment, mac) {
        (Attachment::Bridged { bridge_mac, .. }, Some(mac)) => {
            BTreeSet::from([Element::BrPodMacBridge(mac, *bridge_mac)])
        }
        _ => BTreeSet::new(),
    }
}

/// Renders one transaction that deletes `remove` and adds `add`. Deletions come first so
/// that a re-keyed element (same key, new value in a map) is replaced, not refused.
pub fn render_changes<'a>(
    table: &str,
    remove: impl IntoIterator<Item = &'a Element>,
    add: impl IntoIterator<Item = &'a Element>,
) -> String {
    let mut out = String::new();
    for (verb, elems) in [
        ("delete", remove.into_iter().collect::<Vec<_>>()),
        ("add", add.into_iter().collect::<Vec<_>>()),
    ] {
        for e in elems {
            let (family, set) = e.family_set();
            let _ = writeln!(
                out,
                "{verb} element {family} {table} {set} {{ {} }}",
                e.value()
            );
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ListingError {
    #[error("nft listing is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unexpected element {value} in set {set}")]
    Element { set: String, value: String },
}

/// What a JSON listing of one of the tables shows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Observed {
    pub elements: BTreeSet<Element>,
    /// (chain, number of rules) as found.
    pub chains: Vec<(String, usize)>,
    pub present: bool,
    /// Differences from the fixed rules a backend found itself (the iptables backend:
    /// jump placement, L2 chains); see `Dataplane::drift`.
    pub drift: Vec<String>,
}

/// Parses `nft -j list table <family> <table>` output, accumulating into `into`.
pub fn parse_listing(json: &str, into: &mut Observed) -> Result<(), ListingError> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let items = v
        .get("nftables")
        .and_then(|n| n.as_array())
        .cloned()
        .unwrap_or_default();
    let mut rule_counts: Vec<(String, usize)> = Vec::new();
    for item in items {
        if item.get("table").is_some() {
            into.present = true;
        }
        if let Some(chain) = item.get("chain") {
            let family = chain["family"].as_str().unwrap_or("");
            let name = format!("{family}/{}", chain["name"].as_str().unwrap_or(""));
            rule_counts.push((name, 0));
        }
        if let Some(rule) = item.get("rule") {
            let family = rule["family"].as_str().unwrap_or("");
            let name = format!("{family}/{}", rule["chain"].as_str().unwrap_or(""));
            if let Some(c) = rule_counts.iter_mut().find(|(n, _)| *n == name) {
                c.1 += 1;
            }
        }
        let set = item.get("set").or_else(|| item.get("map"));
        if let Some(set) = set {
            let family = set["family"].as_str().unwrap_or("");
            let name = set["name"].as_str().unwrap_or("");
            for elem in set
                .get("elem")
                .and_then(|e| e.as_array())
                .into_iter()
                .flatten()
            {
                into.elements.insert(parse_element(family, name, elem)?);
            }
        }
    }
    into.chains.extend(rule_counts);
    Ok(())
}

fn parse_element(
    family: &str,
    set: &str,
    elem: &serde_json::Value,
) -> Result<Element, ListingError> {
    let bad = || ListingError::Element {
        set: format!("{family}/{set}"),
        value: elem.to_string(),
    };
    let s = |v: &serde_json::Value| v.as_str().map(str::to_owned).ok_or_else(bad);
    let pair = |v: &serde_json::Value| -> Result<(String, String), ListingError> {
        let parts = v
            .get("concat")
            .and_then(|c| c.as_array())
            .or_else(|| v.as_array())
            .ok_or_else(bad)?;
        match parts.as_slice() {
            [a, b] => Ok((s(a)?, s(b)?)),
            _ => Err(bad()),
        }
    };
    let v4 = |t: &str| t.parse::<Ipv4Addr>().map_err(|_| bad());
    let v6 = |t: &str| t.parse::<Ipv6Addr>().map_err(|_| bad());
    let raw = |t: &str| {
        t.strip_prefix("0x")
            .and_then(|h| u128::from_str_radix(h, 16).ok())
            .map(Ipv6Addr::from)
            .ok_or_else(bad)
    };
    Ok(match (family, set) {
        ("inet", "pod_v4") => Element::PodV4(v4(&s(elem)?)?),
        ("inet", "pod_v6") => Element::PodV6(v6(&s(elem)?)?),
        ("inet", "pod_if_v4") => {
            let (i, a) = pair(elem)?;
            Element::PodIfV4(i, v4(&a)?)
        }
        ("inet", "pod_if_v6") => {
            let (i, a) = pair(elem)?;
            Element::PodIfV6(i, v6(&a)?)
        }
        ("inet", "routed_ports") => Element::RoutedPort(s(elem)?),
        ("bridge", "ports") => Element::BrPort(s(elem)?),
        ("bridge", "port_v4") => {
            let (i, a) = pair(elem)?;
            Element::BrPortV4(i, v4(&a)?)
        }
        ("bridge", "port_v6") => {
            let (i, a) = pair(elem)?;
            Element::BrPortV6(i, v6(&a)?)
        }
        ("bridge", "pod_v4") => Element::BrPodV4(v4(&s(elem)?)?),
        ("bridge", "pod_v6") => Element::BrPodV6(v6(&s(elem)?)?),
        ("bridge", "port_bridge_mac") => {
            let (i, m) = pair(elem)?;
            Element::BrPortMac(i, m.parse().map_err(|_| bad())?)
        }
        ("bridge", "pinned") => Element::BrPinned(s(elem)?),
        ("bridge", "port_mac") => {
            let (i, m) = pair(elem)?;
            Element::BrPinnedMac(i, m.parse().map_err(|_| bad())?)
        }
        ("bridge", "pod_mac_bridge") => {
            let (p, b) = pair(elem)?;
            Element::BrPodMacBridge(p.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?)
        }
        ("bridge", "nd_target") => Element::BrNdTarget(raw(&s(elem)?)?),
        ("bridge", "nd_port_target") => {
            let (i, a) = pair(elem)?;
            Element::BrNdPortTarget(i, raw(&a)?)
        }
        _ => return Err(bad()),
    })
}

/// Chains whose rule count differs from what [`RulesetParams::render_base`] installs.
pub fn chain_drift(observed: &Observed) -> Vec<String> {
    chain_drift_in(observed, &["inet", "bridge"])
}

/// [`chain_drift`] for the tables of `families` only.
pub fn chain_drift_in(observed: &Observed, families: &[&str]) -> Vec<String> {
    let mut drift = Vec::new();
    for (family, chains) in [("inet", INET_CHAINS), ("bridge", BRIDGE_CHAINS)] {
        if !families.contains(&family) {
            continue;
        }
        for (name, want) in chains.iter() {
            let key = format!("{family}/{name}");
            match observed.chains.iter().find(|(n, _)| *n == key) {
                None => drift.push(format!("chain {key} is missing")),
                Some((_, got)) if got != want => {
                    drift.push(format!("chain {key} has {got} rules, expected {want}"))
                }
                Some(_) => {}
            }
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn base_counts_match_the_drift_table() {
        let text = RulesetParams::default().render_base();
        // Count rule lines per chain in the rendered text and compare with the table.
        let mut family = "";
        let mut chain = String::new();
        let mut counts: Vec<(String, usize)> = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with("table inet") && line.ends_with('{') {
                family = "inet";
            } else if line.starts_with("table bridge") && line.ends_with('{') {
                family = "bridge";
            } else if let Some(name) = line.strip_prefix("chain ") {
                chain = format!("{family}/{}", name.trim_end_matches(" {"));
                counts.push((chain.clone(), 0));
            } else if !chain.is_empty()
                && !line.starts_with("type ")
                && line != "}"
                && !line.is_empty()
            {
                counts.last_mut().unwrap().1 += 1;
            }
            if line == "}" {
                chain.clear();
            }
        }
        let observed = Observed {
            chains: counts,
            present: true,
            ..Default::default()
        };
        assert_eq!(chain_drift(&observed), Vec::<String>::new());
    }

    #[test]
    fn capture_dnats_to_the_capture_address_of_its_family_else_redirects() {
        let dual = RulesetParams {
            capture_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            capture_v6: Some("fd00::1".parse().unwrap()),
            ..Default::default()
        }
        .render_base();
        for want in [
            "ip saddr @pod_v4 counter dnat ip to 192.0.2.1:15001",
            "ip6 saddr @pod_v6 counter dnat ip6 to [fd00::1]:15001",
            "tcp dport 15008 counter dnat ip to 192.0.2.1:15008",
            "ip daddr @pod_v4 counter dnat ip to 192.0.2.1:15006",
            "ip6 daddr @pod_v6 counter dnat ip6 to [fd00::1]:15006",
        ] {
            assert!(dual.contains(want), "{want}");
        }
        // Locally generated HBONE to a local pod stays a redirect to loopback.
        assert!(dual.contains("ip daddr @pod_v4 tcp dport 15008 redirect to :15008"));
        let v4_only = RulesetParams {
            capture_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            ..Default::default()
        }
        .render_base();
        assert!(v4_only.contains("ip6 saddr @pod_v6 counter redirect to :15001"));
        assert!(!v4_only.contains("dnat ip6"));
        // The same number of rules either way: drift detection compares counts.
        let rules = |t: &str| t.lines().filter(|l| l.contains(" counter ")).count();
        assert_eq!(rules(&dual), rules(&RulesetParams::default().render_base()));
    }

    #[test]
    fn routed_and_bridged_elements() {
        let ips: Vec<IpAddr> = vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        let routed = pod_elements(
            &Attachment::Routed {
                veth: "veth1".into(),
            },
            &ips,
        );
        assert!(routed.contains(&Element::RoutedPort("veth1".into())));
        assert!(routed.contains(&Element::PodIfV4(
            "veth1".into(),
            "10.1.0.5".parse().unwrap()
        )));
        assert_eq!(routed.len(), 5);
        let bridged = pod_elements(
            &Attachment::Bridged {
                veth: "veth2".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
            },
            &ips,
        );
        assert!(bridged.contains(&Element::PodIfV4(
            "cni0".into(),
            "10.1.0.5".parse().unwrap()
        )));
        assert!(bridged.contains(&Element::BrPortV6(
            "veth2".into(),
            "fd00::5".parse().unwrap()
        )));
        assert!(bridged.contains(&Element::BrNdPortTarget(
            "veth2".into(),
            "fd00::5".parse().unwrap()
        )));
        assert_eq!(bridged.len(), 12);
        let pins = pin_elements(
            &Attachment::Bridged {
                veth: "veth2".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
            },
            Some(Mac([2, 0, 0, 0, 0, 9])),
        );
        assert_eq!(
            pins,
            BTreeSet::from([
                Element::BrPinned("veth2".into()),
                Element::BrPinnedMac("veth2".into(), Mac([2, 0, 0, 0, 0, 9])),
            ])
        );
        let routed_att = Attachment::Routed {
            veth: "veth1".into(),
        };
        assert!(pin_elements(&routed_att, Some(Mac([2; 6]))).is_empty());
    }

    #[test]
    fn renders_one_line_per_change_deletes_first() {
        let add = [Element::PodV4("10.0.0.1".parse().unwrap())];
        let del = [Element::BrPortMac("v".into(), Mac([0xaa, 0, 0, 0, 0, 1]))];
        let text = render_changes("ambient", &del, &add);
        assert_eq!(
            text,
            "delete element bridge ambient port_bridge_mac { \"v\" : aa:00:00:00:00:01 }\n\
             add element inet ambient pod_v4 { 10.0.0.1 }\n"
        );
    }

    #[test]
    fn parses_a_real_listing() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "ambient", "handle": 1}},
          {"set": {"family": "inet", "name": "pod_v4", "table": "ambient", "type": "ipv4_addr", "handle": 8, "elem": ["10.1.1.2"]}},
          {"set": {"family": "inet", "name": "pod_if_v4", "table": "ambient", "type": ["ifname", "ipv4_addr"], "handle": 10, "elem": [{"concat": ["veth1", "10.1.1.2"]}]}},
          {"map": {"family": "bridge", "name": "port_bridge_mac", "table": "ambient", "type": "ifname", "handle": 7, "map": "ether_addr", "elem": [["veth1", "02:00:00:00:00:01"]]}},
          {"chain": {"family": "inet", "table": "ambient", "name": "capture", "handle": 3}},
          {"rule": {"family": "inet", "table": "ambient", "chain": "capture", "handle": 4, "expr": []}}]}"#;
        let mut o = Observed::default();
        parse_listing(json, &mut o).unwrap();
        assert!(o.present);
        assert_eq!(o.elements.len(), 3);
        assert!(o
            .elements
            .contains(&Element::BrPortMac("veth1".into(), Mac([2, 0, 0, 0, 0, 1]))));
        assert_eq!(o.chains, vec![("inet/capture".to_string(), 1)]);
        let mut bad = Observed::default();
        let err = parse_listing(
            r#"{"nftables":[{"set":{"family":"inet","name":"pod_v4","elem":["nope"]}}]}"#,
            &mut bad,
        );
        assert!(err.is_err());
    }

    proptest! {
        #[test]
        fn element_rendering_is_parseable_and_unique(
            a in any::<[u8; 4]>(), b in any::<[u8; 16]>(), name in "[a-z][a-z0-9]{0,14}", mac in any::<[u8; 6]>()
        ) {
            let ips = vec![IpAddr::from(a), IpAddr::from(b)];
            let att = Attachment::Bridged { veth: name.clone(), bridge: "cni0".into(), bridge_mac: Mac(mac) };
            let elems = pod_elements(&att, &ips);
            let text = render_changes("ambient", [], &elems);
            prop_assert_eq!(text.lines().count(), elems.len());
            for line in text.lines() {
                prop_assert!(line.starts_with("add element "));
                prop_assert!(line.ends_with(" }"), "unterminated: {}", line);
            }
            prop_assert!(valid_ifname(&name));
            prop_assert_eq!(Mac(mac).to_string().parse::<Mac>(), Ok(Mac(mac)));
        }

        #[test]
        fn ifname_validation_never_panics(s in ".{0,20}") {
            let _ = valid_ifname(&s);
        }
    }
}

//! Bridged pods' L2 rules for the iptables backend: ebtables chains in the `nat` table's
//! PREROUTING (the bridge's first hook, where the nftables backend's `bridge` table runs),
//! plus the neighbour-advertisement check, which ebtables cannot express, as an ip6tables
//! `raw` chain that bridged IPv6 reaches through `br_netfilter`.
//!
//! ebtables has no sets, so per-pod facts are rules, grouped so one pod's change touches
//! only its own rules:
//! - `<P>`: the entry chain (first rule of PREROUTING): priority-tagged frames, then one
//!   jump per protocol and one jump per known pod's port (`-i <port>`).
//! - `<P>-P-<port>`: one chain per port: the pinned MAC, the ambient pod's own addresses,
//!   and the MAC rewrite that routes its TCP through the host. Rewritten whole (one
//!   `ebtables-restore` transaction) when that pod changes.
//! - `<P>-ARP`, `<P>-IP4`, `<P>-IP6`: per address, "only its own port may use this ambient
//!   address", and per ambient MAC, "TCP to this pod goes through the host". Changed by
//!   adding and deleting single rules.
//!
//! The kernel's rules are read back into [`Element`]s (the agent's vocabulary), and drift is
//! what differs from rendering those elements again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::rules::Names;
use super::{run, Variant};
use crate::nft::{DataplaneError, Element, Mac};

/// A bridge port's facts, gathered from its elements.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Port {
    pinned: Option<Mac>,
    ambient: Option<Mac>,
    v4: BTreeSet<Ipv4Addr>,
    v6: BTreeSet<Ipv6Addr>,
}

/// Is `e` one of the L2 elements this module owns?
pub fn is_l2(e: &Element) -> bool {
    matches!(
        e,
        Element::BrPort(_)
            | Element::BrPortV4(..)
            | Element::BrPortV6(..)
            | Element::BrPodV4(_)
            | Element::BrPodV6(_)
            | Element::BrPortMac(..)
            | Element::BrPinned(_)
            | Element::BrPinnedMac(..)
            | Element::BrPodMacBridge(..)
            | Element::BrNdTarget(_)
            | Element::BrNdPortTarget(..)
    )
}

fn port_of(e: &Element) -> Option<&str> {
    match e {
        Element::BrPort(p)
        | Element::BrPortV4(p, _)
        | Element::BrPortV6(p, _)
        | Element::BrPortMac(p, _)
        | Element::BrPinned(p)
        | Element::BrPinnedMac(p, _) => Some(p),
        _ => None,
    }
}

fn ports(elements: &BTreeSet<Element>) -> BTreeMap<String, Port> {
    let mut out: BTreeMap<String, Port> = BTreeMap::new();
    for e in elements {
        let Some(p) = port_of(e) else { continue };
        let port = out.entry(p.to_owned()).or_default();
        match e {
            Element::BrPinnedMac(_, m) => port.pinned = Some(*m),
            Element::BrPortMac(_, b) => port.ambient = Some(*b),
            Element::BrPortV4(_, a) => {
                port.v4.insert(*a);
            }
            Element::BrPortV6(_, a) => {
                port.v6.insert(*a);
            }
            _ => {}
        }
    }
    out
}

/// The rules of one port's chain, in order.
fn port_rules(port: &Port) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(m) = port.pinned {
        out.push(format!("-s ! {m} -j DROP"));
        out.push(format!("-p ARP --arp-mac-src ! {m} -j DROP"));
    }
    if let Some(b) = port.ambient {
        out.push(format!(
            "-p IPv4 --ip-proto tcp -j dnat --to-dst {b} --dnat-target CONTINUE"
        ));
        out.push(format!(
            "-p IPv6 --ip6-proto tcp -j dnat --to-dst {b} --dnat-target CONTINUE"
        ));
        out.push("-p IPv6 --ip6-src fe80::/10 --ip6-proto tcp -j DROP".into());
        for a in &port.v4 {
            out.push(format!("-p IPv4 --ip-src {a} -j RETURN"));
            out.push(format!("-p ARP --arp-ip-src {a} -j RETURN"));
        }
        for a in &port.v6 {
            out.push(format!("-p IPv6 --ip6-src {a} -j RETURN"));
        }
        out.extend(
            [
                "-p IPv6 --ip6-src fe80::/10 -j RETURN",
                "-p ARP --arp-ip-src 0.0.0.0 -j RETURN",
                "-p IPv4 -j DROP",
                "-p IPv6 -j DROP",
                "-p ARP -j DROP",
            ]
            .map(String::from),
        );
    }
    if port.pinned.is_some() {
        out.extend(
            [
                "-p IPv4 -j RETURN",
                "-p IPv6 -j RETURN",
                "-p ARP -j RETURN",
                "-j DROP",
            ]
            .map(String::from),
        );
    }
    out
}

/// The per-address and per-MAC rules of the protocol chains: (chain suffix, rule).
fn global_rules(elements: &BTreeSet<Element>) -> BTreeSet<(&'static str, String)> {
    // The ports whose own address `a` is.
    let owners = |a: IpAddr| -> Vec<&str> {
        elements
            .iter()
            .filter_map(|e| match e {
                Element::BrPortV4(p, x) if IpAddr::V4(*x) == a => Some(p.as_str()),
                Element::BrPortV6(p, x) if IpAddr::V6(*x) == a => Some(p.as_str()),
                _ => None,
            })
            .collect()
    };
    let not_from = |owners: Vec<&str>| -> Vec<String> {
        if owners.is_empty() {
            vec![String::new()]
        } else {
            owners.iter().map(|p| format!(" -i ! {p}")).collect()
        }
    };
    let mut out = BTreeSet::new();
    for e in elements {
        match e {
            Element::BrPodV4(a) => {
                for i in not_from(owners(IpAddr::V4(*a))) {
                    out.insert(("ARP", format!("-p ARP{i} --arp-ip-src {a} -j DROP")));
                    out.insert(("IP4", format!("-p IPv4{i} --ip-src {a} -j DROP")));
                }
            }
            Element::BrPodV6(a) => {
                for i in not_from(owners(IpAddr::V6(*a))) {
                    out.insert(("IP6", format!("-p IPv6{i} --ip6-src {a} -j DROP")));
                }
            }
            Element::BrPodMacBridge(m, b) => {
                out.insert((
                    "IP4",
                    format!(
                        "-p IPv4 -d {m} --ip-proto tcp -j dnat --to-dst {b} --dnat-target CONTINUE"
                    ),
                ));
                out.insert((
                    "IP6",
                    format!("-p IPv6 -d {m} --ip6-proto tcp -j dnat --to-dst {b} --dnat-target CONTINUE"),
                ));
            }
            _ => {}
        }
    }
    out
}

/// The neighbour-advertisement rules (ip6tables `raw`), as `ip6tables-save` prints them.
fn nd_rules(elements: &BTreeSet<Element>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in elements {
        let Element::BrNdTarget(a) = e else { continue };
        let w = |i: usize| u32::from_be_bytes(a.octets()[i * 4..i * 4 + 4].try_into().unwrap());
        // The target address follows the 40-byte IPv6 header and 8 bytes of ICMPv6.
        let u32m = format!(
            "0x30={:#x}&&0x34={:#x}&&0x38={:#x}&&0x3c={:#x}",
            w(0),
            w(1),
            w(2),
            w(3)
        );
        let base = format!("-p ipv6-icmp -m icmp6 --icmpv6-type 136 -m u32 --u32 \"{u32m}\" -m physdev --physdev-is-in");
        let owners: Vec<&str> = elements
            .iter()
            .filter_map(|x| match x {
                Element::BrNdPortTarget(p, t) if t == a => Some(p.as_str()),
                _ => None,
            })
            .collect();
        if owners.is_empty() {
            out.insert(format!("{base} -j DROP"));
        }
        for p in owners {
            out.insert(format!("{base} ! --physdev-in {p} -j DROP"));
        }
    }
    out
}

/// One parsed ebtables rule: option -> (negated, value), order-free.
type Opts = BTreeMap<String, (bool, String)>;

fn opts(rule: &str) -> Opts {
    let toks: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Opts::new();
    let mut i = 0;
    while i < toks.len() {
        let t = toks[i];
        let mut neg = false;
        let mut j = i + 1;
        if toks.get(j) == Some(&"!") {
            neg = true;
            j += 1;
        }
        let value = toks.get(j).copied().unwrap_or("");
        out.insert(t.to_owned(), (neg, value.to_ascii_lowercase()));
        i = j + 1;
    }
    out
}

/// What `ebtables-save -t nat` shows of our chains.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Saved {
    chains: BTreeSet<String>,
    rules: BTreeMap<String, Vec<String>>,
    prerouting_first: Option<String>,
}

fn parse_save(text: &str) -> Saved {
    let mut s = Saved::default();
    let mut in_nat = false;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_nat = t.trim() == "nat";
        } else if !in_nat {
            continue;
        } else if let Some(decl) = line.strip_prefix(':') {
            if let Some(n) = decl.split_whitespace().next() {
                s.chains.insert(n.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, args) = rule.split_once(' ').unwrap_or((rule, ""));
            if chain == "PREROUTING" && s.prerouting_first.is_none() {
                s.prerouting_first = Some(args.to_owned());
            }
            s.rules
                .entry(chain.to_owned())
                .or_default()
                .push(args.to_owned());
        }
    }
    s
}

/// Everything `P`'s chains say, as elements.
fn elements_of(names: &Names, s: &Saved, nd: &[String]) -> BTreeSet<Element> {
    let base = names.base();
    let port_prefix = names.chain("P-");
    let mut out = BTreeSet::new();
    for (chain, rules) in &s.rules {
        if let Some(port) = chain.strip_prefix(&port_prefix) {
            for r in rules {
                let o = opts(r);
                let get = |k: &str| o.get(k).cloned();
                if let Some((true, m)) = get("-s") {
                    if let Ok(m) = m.parse::<Mac>() {
                        out.insert(Element::BrPinned(port.to_owned()));
                        out.insert(Element::BrPinnedMac(port.to_owned(), m));
                    }
                }
                if let (Some((_, p)), Some((_, b))) = (get("-p"), get("--to-dst")) {
                    if let (true, Ok(b)) = (p == "ipv4", b.parse::<Mac>()) {
                        out.insert(Element::BrPort(port.to_owned()));
                        out.insert(Element::BrPortMac(port.to_owned(), b));
                    }
                }
                if get("-j").is_some_and(|(_, j)| j == "return") {
                    if let Some((false, a)) = get("--ip-src") {
                        if let Ok(a) = a.parse() {
                            out.insert(Element::BrPortV4(port.to_owned(), a));
                        }
                    }
                    if let Some((false, a)) = get("--ip6-src") {
                        if let Ok(a) = a.parse() {
                            out.insert(Element::BrPortV6(port.to_owned(), a));
                        }
                    }
                }
            }
        } else if chain.starts_with(base) {
            for r in s.rules.get(chain).into_iter().flatten() {
                let o = opts(r);
                let drop = o.get("-j").is_some_and(|(_, j)| j == "drop");
                if let (true, Some((false, a))) = (drop, o.get("--arp-ip-src")) {
                    if let Ok(a) = a.parse() {
                        out.insert(Element::BrPodV4(a));
                    }
                }
                if let (true, Some((false, a))) = (drop, o.get("--ip-src")) {
                    if let Ok(a) = a.parse() {
                        out.insert(Element::BrPodV4(a));
                    }
                }
                if let (true, Some((false, a))) = (drop, o.get("--ip6-src")) {
                    if let Ok(a) = a.parse() {
                        out.insert(Element::BrPodV6(a));
                    }
                }
                if let (Some((false, m)), Some((_, b))) = (o.get("-d"), o.get("--to-dst")) {
                    if let (Ok(m), Ok(b)) = (m.parse(), b.parse()) {
                        out.insert(Element::BrPodMacBridge(m, b));
                    }
                }
            }
        }
    }
    for r in nd {
        let Some(u) = r.split('"').nth(1) else {
            continue;
        };
        let words: Vec<u32> = u
            .split("&&")
            .filter_map(|c| c.split_once('='))
            .filter_map(|(_, v)| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .collect();
        let [a, b, c, d] = words[..] else { continue };
        let addr = Ipv6Addr::from(
            ((a as u128) << 96) | ((b as u128) << 64) | ((c as u128) << 32) | d as u128,
        );
        out.insert(Element::BrNdTarget(addr));
        if let Some(port) = r
            .split("! --physdev-in ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
        {
            out.insert(Element::BrNdPortTarget(port.to_owned(), addr));
        }
    }
    out
}

/// The chains and rules `elements` render to, in the form [`parse_save`] gives them:
/// (chain -> rules) with the protocol chains' rules sorted (their order means nothing).
fn render_tables(names: &Names, elements: &BTreeSet<Element>) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    let ports = ports(elements);
    let mut entry = vec![
        "-p 802_1Q --vlan-id 0 -j DROP".to_owned(),
        format!("-p ARP -j {}", names.chain("ARP")),
        format!("-p IPv4 -j {}", names.chain("IP4")),
        format!("-p IPv6 -j {}", names.chain("IP6")),
    ];
    for (p, port) in &ports {
        let chain = names.chain(&format!("P-{p}"));
        entry.push(format!("-i {p} -j {chain}"));
        out.insert(chain, port_rules(port));
    }
    out.insert(names.base().to_owned(), entry);
    for proto in ["ARP", "IP4", "IP6"] {
        out.insert(names.chain(proto), Vec::new());
    }
    for (proto, rule) in global_rules(elements) {
        out.get_mut(&names.chain(proto)).unwrap().push(rule);
    }
    out
}

/// A rule in canonical form, for comparing rendered rules with saved ones.
fn canonical(rule: &str) -> Opts {
    let mut o = opts(rule);
    for (_, v) in o.values_mut() {
        if let Ok(m) = v.parse::<Mac>() {
            *v = m.to_string();
        }
    }
    o
}

/// The entry chain as it is compared: its fixed rules in order, then its per-port jumps
/// sorted. Ports enrolled one at a time append their jumps in arrival order, and each
/// jump matches only its own `-i`, so their order means nothing; a duplicate still shows,
/// and so does a jump placed before a fixed rule (the flag).
fn entry_shape(rules: &[String]) -> (Vec<Opts>, Vec<Opts>, bool) {
    let all: Vec<Opts> = rules.iter().map(|r| canonical(r)).collect();
    let is_jump = |o: &Opts| o.contains_key("-i");
    let first_jump = all.iter().position(is_jump).unwrap_or(all.len());
    let ordered = all[first_jump..].iter().all(is_jump);
    let (mut jumps, fixed): (Vec<Opts>, Vec<Opts>) = all.into_iter().partition(is_jump);
    jumps.sort();
    (fixed, jumps, ordered)
}

fn drift(names: &Names, s: &Saved, nd_saved: &[String], nd_jump: bool) -> Vec<String> {
    let elements = elements_of(names, s, nd_saved);
    let want = render_tables(names, &elements);
    let mut out = Vec::new();
    let base = names.base();
    if s.prerouting_first.as_deref() != Some(&format!("-j {base}")) {
        out.push(format!(
            "bridge/nat/PREROUTING does not start with the jump to {base}"
        ));
    }
    let ours: BTreeSet<&String> = s
        .chains
        .iter()
        .filter(|c| *c == base || c.starts_with(&format!("{base}-")))
        .collect();
    for (chain, rules) in &want {
        let got = s.rules.get(chain).cloned().unwrap_or_default();
        if !s.chains.contains(chain) {
            out.push(format!("chain bridge/nat/{chain} is missing"));
            continue;
        }
        let same = if chain.starts_with(&names.chain("P-")) {
            got.iter().map(|r| canonical(r)).collect::<Vec<_>>()
                == rules.iter().map(|r| canonical(r)).collect::<Vec<_>>()
        } else if *chain == base {
            entry_shape(&got) == entry_shape(rules)
        } else {
            got.iter().map(|r| canonical(r)).collect::<BTreeSet<_>>()
                == rules.iter().map(|r| canonical(r)).collect::<BTreeSet<_>>()
                && got.len() == rules.len()
        };
        if !same {
            out.push(format!(
                "chain bridge/nat/{chain} differs from the agent's rules"
            ));
        }
    }
    for c in ours {
        if !want.contains_key(c) {
            out.push(format!("chain bridge/nat/{c} is not the agent's"));
        }
    }
    if !nd_jump {
        out.push(format!("chain ipv6/raw/{} is missing", names.chain("ND")));
    }
    let nd_want = nd_rules(&elements);
    if nd_saved.iter().cloned().collect::<BTreeSet<_>>() != nd_want
        || nd_saved.len() != nd_want.len()
    {
        out.push(format!(
            "chain ipv6/raw/{} differs from the agent's rules",
            names.chain("ND")
        ));
    }
    out
}

/// The ebtables-restore input that replaces our chains with exactly `elements`' rules.
fn render_install(names: &Names, elements: &BTreeSet<Element>, s: &Saved) -> String {
    let base = names.base();
    let want = render_tables(names, elements);
    let mut out = String::from("*nat\n");
    for chain in want.keys() {
        let _ = writeln!(out, ":{chain} RETURN");
    }
    for c in &s.chains {
        if (c.starts_with(&format!("{base}-"))) && !want.contains_key(c) {
            let _ = writeln!(out, "-F {c}\n-X {c}");
        }
    }
    for (chain, rules) in &want {
        for r in rules {
            let _ = writeln!(out, "-A {chain} {r}");
        }
    }
    let jump = format!("-j {base}");
    for r in s.rules.get("PREROUTING").into_iter().flatten() {
        if *r == jump {
            let _ = writeln!(out, "-D PREROUTING {jump}");
        }
    }
    let _ = writeln!(out, "-I PREROUTING 1 {jump}\nCOMMIT");
    out
}

/// The ebtables-restore input that takes the kernel from `old` to `new`, touching only the
/// changed ports' chains and the changed protocol-chain rules; `None` when nothing changes.
fn render_delta(names: &Names, old: &BTreeSet<Element>, new: &BTreeSet<Element>) -> Option<String> {
    let (po, pn) = (ports(old), ports(new));
    let mut out = String::new();
    let touched: BTreeSet<&String> = po.keys().chain(pn.keys()).collect();
    let base = names.base();
    for p in touched {
        let chain = names.chain(&format!("P-{p}"));
        match (po.get(p), pn.get(p)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(_), None) => {
                let _ = writeln!(out, "-D {base} -i {p} -j {chain}\n-F {chain}\n-X {chain}");
            }
            (old_port, Some(b)) => {
                let _ = writeln!(out, ":{chain} RETURN");
                for r in port_rules(b) {
                    let _ = writeln!(out, "-A {chain} {r}");
                }
                if old_port.is_none() {
                    let _ = writeln!(out, "-A {base} -i {p} -j {chain}");
                }
            }
            (None, None) => {}
        }
    }
    let (go, gn) = (global_rules(old), global_rules(new));
    for (proto, r) in go.difference(&gn) {
        let _ = writeln!(out, "-D {} {r}", names.chain(proto));
    }
    for (proto, r) in gn.difference(&go) {
        let _ = writeln!(out, "-A {} {r}", names.chain(proto));
    }
    (!out.is_empty()).then(|| format!("*nat\n{out}COMMIT\n"))
}

/// The ip6tables-restore input that takes the ND chain from `old` to `new`.
fn render_nd_delta(
    names: &Names,
    old: &BTreeSet<Element>,
    new: &BTreeSet<Element>,
) -> Option<String> {
    let (o, n) = (nd_rules(old), nd_rules(new));
    let chain = names.chain("ND");
    let mut out = String::new();
    for r in o.difference(&n) {
        let _ = writeln!(out, "-D {chain} {r}");
    }
    for r in n.difference(&o) {
        let _ = writeln!(out, "-A {chain} {r}");
    }
    (!out.is_empty()).then(|| format!("*raw\n{out}COMMIT\n"))
}

/// The ebtables tool: ebtables-nft where installed, whichever iptables variant the node runs.
/// (Following the variant was tried: Debian's `ebtables-legacy-save` is a script that lists
/// through the `ebtables` alternative, so it reads the nft rules where that points at
/// ebtables-nft, and the legacy `nat` table needs `ebtable_nat`, which kernels built without
/// it, like this project's test VMs, refuse. The L2 hook is the bridge's either way.)
fn ebtables(what: &str) -> String {
    for name in [
        format!("ebtables-nft-{what}"),
        format!("ebtables-legacy-{what}"),
    ] {
        if super::on_path(&name) {
            return name;
        }
    }
    format!("ebtables-{what}")
}

/// The L2 part of one iptables dataplane.
pub struct Bridge {
    names: Names,
    variant: Variant,
    /// The L2 elements installed, as this process last wrote or read them.
    current: Option<BTreeSet<Element>>,
}

impl Bridge {
    pub fn new(names: Names, variant: Variant) -> Self {
        Self {
            names,
            variant,
            current: None,
        }
    }

    fn read(&self) -> Result<(Saved, Vec<String>, bool), DataplaneError> {
        let s = parse_save(&run(&ebtables("save"), &["-t", "nat"], None)?);
        let v6 = super::rules::parse_save(&run(
            &self.variant.tool(super::rules::Family::V6, "save"),
            &["-t", "raw"],
            None,
        )?);
        let nd_chain = self.names.chain("ND");
        let raw = v6.tables.get("raw");
        let nd_exists = raw.is_some_and(|t| t.chains.contains(&nd_chain));
        let nd: Vec<String> = raw
            .map(|t| {
                t.rules
                    .iter()
                    .filter(|(c, _)| *c == nd_chain)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default();
        Ok((s, nd, nd_exists))
    }

    fn nd_restore(&self, script: &str) -> Result<(), DataplaneError> {
        super::restore(self.variant, super::rules::Family::V6, script)
    }

    /// Installs exactly the L2 elements of `elements` (the ND chain exists: the fixed
    /// ip6tables rules created it).
    pub fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError> {
        let l2: BTreeSet<Element> = elements.iter().filter(|e| is_l2(e)).cloned().collect();
        let (s, _, _) = self.read()?;
        run(
            &ebtables("restore"),
            &["--noflush"],
            Some(&render_install(&self.names, &l2, &s)),
        )?;
        let chain = self.names.chain("ND");
        let mut nd = format!("*raw\n:{chain} - [0:0]\n");
        for r in nd_rules(&l2) {
            let _ = writeln!(nd, "-A {chain} {r}");
        }
        nd.push_str("COMMIT\n");
        self.nd_restore(&nd)?;
        self.current = Some(l2);
        Ok(())
    }

    pub fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError> {
        if !remove.iter().chain(add).any(is_l2) {
            return Ok(());
        }
        let old = match &self.current {
            Some(c) => c.clone(),
            None => {
                let (s, nd, _) = self.read()?;
                elements_of(&self.names, &s, &nd)
            }
        };
        let mut new = old.clone();
        for e in remove.iter().filter(|e| is_l2(e)) {
            new.remove(e);
        }
        new.extend(add.iter().filter(|e| is_l2(e)).cloned());
        if let Some(script) = render_delta(&self.names, &old, &new) {
            if let Err(e) = run(&ebtables("restore"), &["--noflush"], Some(&script)) {
                self.current = None;
                return Err(e);
            }
        }
        if let Some(script) = render_nd_delta(&self.names, &old, &new) {
            if let Err(e) = self.nd_restore(&script) {
                // Take the ebtables part back, so the change is all or nothing.
                if let Some(back) = render_delta(&self.names, &new, &old) {
                    let _ = run(&ebtables("restore"), &["--noflush"], Some(&back));
                }
                self.current = None;
                return Err(e);
            }
        }
        self.current = Some(new);
        Ok(())
    }

    pub fn observe(&mut self) -> Result<L2Observed, DataplaneError> {
        let (s, nd, nd_exists) = self.read()?;
        Ok(L2Observed {
            elements: elements_of(&self.names, &s, &nd),
            drift: drift(&self.names, &s, &nd, nd_exists),
        })
    }

    /// Removes our ebtables chains (the ND chain goes with the fixed ip6tables rules).
    pub fn uninstall(&mut self) -> Result<(), DataplaneError> {
        self.current = None;
        remove(&self.names)
    }

    pub fn dump(&mut self) -> Result<String, DataplaneError> {
        let (s, nd, _) = self.read()?;
        let mut out = String::from("# ebtables nat\n");
        for (chain, rules) in &s.rules {
            if *chain == "PREROUTING" || chain.starts_with(self.names.base()) {
                for r in rules {
                    if chain != "PREROUTING" || r.contains(self.names.base()) {
                        let _ = writeln!(out, "-A {chain} {r}");
                    }
                }
            }
        }
        let _ = writeln!(out, "# ip6tables raw {}", self.names.chain("ND"));
        for r in nd {
            let _ = writeln!(out, "{r}");
        }
        Ok(out)
    }
}

pub struct L2Observed {
    pub elements: BTreeSet<Element>,
    pub drift: Vec<String>,
}

fn saved_now() -> Result<Saved, DataplaneError> {
    Ok(parse_save(&run(&ebtables("save"), &["-t", "nat"], None)?))
}

/// Removes our ebtables chains and the jump to them.
pub fn remove(names: &Names) -> Result<(), DataplaneError> {
    if !super::on_path(&ebtables("save")) {
        return Ok(());
    }
    let s = saved_now()?;
    let base = names.base();
    let ours: Vec<&String> = s
        .chains
        .iter()
        .filter(|c| **c == base || c.starts_with(&format!("{base}-")))
        .collect();
    let jump = format!("-j {base}");
    let jumps = s
        .rules
        .get("PREROUTING")
        .map_or(0, |r| r.iter().filter(|r| **r == jump).count());
    if ours.is_empty() && jumps == 0 {
        return Ok(());
    }
    let mut script = String::from("*nat\n");
    for _ in 0..jumps {
        let _ = writeln!(script, "-D PREROUTING {jump}");
    }
    for c in &ours {
        let _ = writeln!(script, "-F {c}");
    }
    for c in &ours {
        let _ = writeln!(script, "-X {c}");
    }
    script.push_str("COMMIT\n");
    run(&ebtables("restore"), &["--noflush"], Some(&script))?;
    if ebtables("restore").contains("-nft-") {
        crate::nft::prune_empty(
            &[("bridge", "nat")],
            &["PREROUTING", "OUTPUT", "POSTROUTING"],
        )?;
    }
    Ok(())
}

/// Are any of our ebtables chains installed?
pub fn installed(names: &Names) -> bool {
    super::on_path(&ebtables("save"))
        && saved_now().is_ok_and(|s| s.chains.iter().any(|c| c.starts_with(names.base())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{ambient_mac_elements, pin_elements, pod_elements, Attachment, RulesetParams};
    use std::net::IpAddr;

    fn names() -> Names {
        Names::new(&RulesetParams::default())
    }

    fn bridged(veth: &str, last: u8) -> BTreeSet<Element> {
        let a = Attachment::Bridged {
            veth: veth.into(),
            bridge: "cni0".into(),
            bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
        };
        let mac = Some(Mac([0x0a, 0x58, 0, 0, 0, last]));
        let mut e = pod_elements(
            &a,
            &[
                IpAddr::V4(Ipv4Addr::new(10, 9, 0, last)),
                IpAddr::V6(Ipv6Addr::new(0xfd09, 0, 0, 0, 0, 0, 0, last as u16)),
            ],
        );
        e.extend(pin_elements(&a, mac));
        e.extend(ambient_mac_elements(&a, mac));
        e.retain(is_l2);
        e
    }

    /// What the kernel would hold after `script` on top of `s`, as `ebtables-save` shows it.
    fn saved_from(tables: &BTreeMap<String, Vec<String>>) -> Saved {
        let mut text = String::from("*nat\n:PREROUTING ACCEPT\n");
        for c in tables.keys() {
            text.push_str(&format!(":{c} RETURN\n"));
        }
        text.push_str(&format!("-A PREROUTING -j {}\n", names().base()));
        for (c, rules) in tables {
            for r in rules {
                text.push_str(&format!("-A {c} {r}\n"));
            }
        }
        parse_save(&text)
    }

    #[test]
    fn rendered_rules_read_back_as_the_same_elements() {
        let mut all = bridged("veth-a", 2);
        all.extend(bridged("veth-b", 3));
        // A pinned pod that is not ambient.
        all.extend(pin_elements(
            &Attachment::Bridged {
                veth: "veth-c".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
            },
            Some(Mac([0x0a, 0x58, 0, 0, 0, 4])),
        ));
        let tables = render_tables(&names(), &all);
        let saved = saved_from(&tables);
        let nd: Vec<String> = nd_rules(&all).into_iter().collect();
        assert_eq!(elements_of(&names(), &saved, &nd), all);
        assert_eq!(drift(&names(), &saved, &nd, true), Vec::<String>::new());
        // The non-ambient port is pinned only: MAC, and IPv4/IPv6/ARP frames.
        let c = &tables["AMBIENT-P-veth-c"];
        assert_eq!(c.len(), 6, "{c:?}");
        assert!(c[0].starts_with("-s ! 0a:58:00:00:00:04"));
        // Each ambient address may come only from its own port.
        assert!(tables["AMBIENT-IP4"]
            .contains(&"-p IPv4 -i ! veth-a --ip-src 10.9.0.2 -j DROP".to_owned()));
        assert!(
            nd[0].contains("0x30=0xfd090000&&0x34=0x0&&0x38=0x0&&0x3c=0x2"),
            "{nd:?}"
        );
        assert!(nd[0].ends_with("! --physdev-in veth-a -j DROP"));
    }

    #[test]
    fn tampering_is_drift() {
        let all = bridged("veth-a", 2);
        let mut tables = render_tables(&names(), &all);
        let nd: Vec<String> = nd_rules(&all).into_iter().collect();
        // A deleted fixed rule in a port chain.
        tables
            .get_mut("AMBIENT-P-veth-a")
            .unwrap()
            .retain(|r| r != "-p IPv4 -j DROP");
        let d = drift(&names(), &saved_from(&tables), &nd, true);
        assert_eq!(
            d,
            vec!["chain bridge/nat/AMBIENT-P-veth-a differs from the agent's rules".to_owned()]
        );
        // A missing ND chain is drift; its missing rules are missing elements.
        let saved = saved_from(&render_tables(&names(), &all));
        let d = drift(&names(), &saved, &[], false);
        assert_eq!(d, vec!["chain ipv6/raw/AMBIENT-ND is missing".to_owned()]);
        assert!(!elements_of(&names(), &saved, &[])
            .iter()
            .any(|e| matches!(e, Element::BrNdTarget(_))));
    }

    /// Ports enrolled one by one append their jumps to the entry chain in arrival order,
    /// not in the rendering's sorted order; that order means nothing (each jump matches
    /// its own `-i`), so it is not drift. The fixed rules before them keep their order.
    #[test]
    fn port_jumps_in_arrival_order_are_not_drift() {
        let mut all = bridged("veth-b", 3);
        all.extend(bridged("veth-a", 2));
        let nd: Vec<String> = nd_rules(&all).into_iter().collect();
        let mut tables = render_tables(&names(), &all);
        let entry = tables.get_mut("AMBIENT").unwrap();
        let n = entry.len();
        entry.swap(n - 1, n - 2);
        assert!(entry[n - 2].contains("veth-b"), "{entry:?}");
        assert_eq!(
            drift(&names(), &saved_from(&tables), &nd, true),
            Vec::<String>::new()
        );
        // A fixed rule moved behind the port jumps is drift.
        let entry = tables.get_mut("AMBIENT").unwrap();
        let vlan = entry.remove(0);
        entry.push(vlan);
        assert_eq!(
            drift(&names(), &saved_from(&tables), &nd, true),
            vec!["chain bridge/nat/AMBIENT differs from the agent's rules".to_owned()]
        );
        // So is a port jump moved in front of the fixed rules.
        let mut tables = render_tables(&names(), &all);
        let entry = tables.get_mut("AMBIENT").unwrap();
        let jump = entry.pop().unwrap();
        entry.insert(0, jump);
        assert_eq!(
            drift(&names(), &saved_from(&tables), &nd, true),
            vec!["chain bridge/nat/AMBIENT differs from the agent's rules".to_owned()]
        );
        // A port jump listed twice is drift.
        let mut tables = render_tables(&names(), &all);
        let entry = tables.get_mut("AMBIENT").unwrap();
        let dup = entry.last().unwrap().clone();
        entry.push(dup);
        assert_eq!(
            drift(&names(), &saved_from(&tables), &nd, true),
            vec!["chain bridge/nat/AMBIENT differs from the agent's rules".to_owned()]
        );
    }

    #[test]
    fn a_pods_change_touches_only_its_rules() {
        let a = bridged("veth-a", 2);
        let mut both = a.clone();
        both.extend(bridged("veth-b", 3));
        let delta = render_delta(&names(), &a, &both).unwrap();
        assert!(delta.contains(":AMBIENT-P-veth-b RETURN\n"));
        assert!(delta.contains("-A AMBIENT -i veth-b -j AMBIENT-P-veth-b\n"));
        assert!(!delta.contains("veth-a"), "{delta}");
        let back = render_delta(&names(), &both, &a).unwrap();
        assert!(back.contains(
            "-D AMBIENT -i veth-b -j AMBIENT-P-veth-b\n-F AMBIENT-P-veth-b\n-X AMBIENT-P-veth-b\n"
        ));
        assert!(back.contains("-D AMBIENT-IP4 -p IPv4 -i ! veth-b --ip-src 10.9.0.3 -j DROP\n"));
        assert!(!back.contains("veth-a"));
        assert_eq!(render_delta(&names(), &a, &a), None);
        let nd = render_nd_delta(&names(), &a, &both).unwrap();
        assert_eq!(
            nd.lines()
                .filter(|l| l.starts_with("-A AMBIENT-ND"))
                .count(),
            1
        );
        // Applying the delta to the saved state gives the full rendering (protocol chains
        // compare as sets).
        let full = render_install(&names(), &both, &Saved::default());
        assert!(full.starts_with("*nat\n:AMBIENT RETURN\n"));
        assert!(full.ends_with("-I PREROUTING 1 -j AMBIENT\nCOMMIT\n"));
    }
}

//! The iptables ruleset: the fixed chains (rendered once, as `iptables-restore --noflush`
//! input), the ipsets that hold every per-pod fact, and the reading of `iptables-save`.
//! Pure: no process is run here.
//!
//! The chains mean what the nftables tables mean (`nft::ruleset`), hook by hook:
//!
//! | nftables (inet)             | iptables                    |
//! |-----------------------------|-----------------------------|
//! | `guard` prerouting -300     | `raw` PREROUTING            |
//! | `mark_replies` mangle       | `mangle` PREROUTING         |
//! | `capture` nat -110          | `nat` PREROUTING, first     |
//! | `closed` prerouting -90     | `filter` FORWARD, first     |
//! | `input_guard` input         | `filter` INPUT, first       |
//! | `local_hbone` nat output    | `nat` OUTPUT, first         |
//! | `mark_own` mangle output    | `mangle` OUTPUT             |
//!
//! Each chain of ours is entered by one jump that must be the first rule of its built-in
//! chain: in `nat` PREROUTING that puts capture before kube-proxy's `KUBE-SERVICES`, whose
//! DNAT would otherwise end the traversal first. The `closed` rules run in FORWARD rather
//! than before routing: every flow they reject (to a pod address, or from one to a non-local
//! destination) is forwarded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use crate::nft::{Element, RulesetParams};

/// The set types the iptables backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetType {
    /// `hash:ip`: addresses.
    HashIp,
    /// `hash:net,iface`: (network, interface) pairs; an interface marked `physdev` is a
    /// bridge port, matched against the bridge port a bridged packet came in on.
    HashNetIface,
}

impl SetType {
    pub fn name(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashNetIface => "hash:net,iface",
        }
    }
}

/// One set: its name, type and address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    pub name: String,
    pub kind: SetType,
    pub v6: bool,
}

/// One member of a set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    Ip(IpAddr),
    NetIface {
        net: IpAddr,
        prefix: u8,
        iface: String,
        physdev: bool,
    },
}

/// IPv4 or IPv6: each has its own `iptables`/`ip6tables` ruleset and sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }
}

/// The sets of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SetRole {
    /// Ambient pod addresses (`pod_v4`/`pod_v6`).
    Pod,
    /// (address, L3 interface) of ambient pods (`pod_if_v4`/`pod_if_v6`).
    PodIf,
}

impl SetRole {
    pub const ALL: [SetRole; 2] = [SetRole::Pod, SetRole::PodIf];

    fn suffix(self) -> &'static str {
        match self {
            SetRole::Pod => "pod",
            SetRole::PodIf => "podif",
        }
    }

    fn kind(self) -> SetType {
        match self {
            SetRole::Pod => SetType::HashIp,
            SetRole::PodIf => SetType::HashNetIface,
        }
    }
}

/// Longest table name the iptables backend accepts: chain names are `<TABLE>-MARK-REPLIES`
/// (iptables: at most 28 bytes) and `<TABLE>-P-<port>` (ebtables: at most 31).
pub const MAX_TABLE_NAME: usize = 13;

/// Our chains: (iptables table, built-in chain that jumps to it, our chain's suffix).
pub const HOOKS: &[(&str, &str, &str)] = &[
    ("raw", "PREROUTING", "GUARD"),
    ("mangle", "PREROUTING", "MARK-REPLIES"),
    ("mangle", "OUTPUT", "MARK-OWN"),
    ("nat", "PREROUTING", "CAPTURE"),
    ("nat", "OUTPUT", "LOCAL-HBONE"),
    ("filter", "FORWARD", "CLOSED"),
    ("filter", "INPUT", "INPUT"),
];

const TABLES: [&str; 4] = ["raw", "mangle", "nat", "filter"];

/// The IPv6 `raw` chain of per-pod neighbour-advertisement rules (see `ebt`).
pub const ND_CHAIN: &str = "ND";

/// Names of the chains and sets a [`RulesetParams`] gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    chain_prefix: String,
    set_prefix: String,
}

impl Names {
    pub fn new(params: &RulesetParams) -> Self {
        Self {
            chain_prefix: params.table.to_ascii_uppercase(),
            set_prefix: params.table.clone(),
        }
    }

    /// The entry chain's name, and the prefix of every other chain's.
    pub fn base(&self) -> &str {
        &self.chain_prefix
    }

    pub fn chain(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.chain_prefix)
    }

    pub fn set(&self, family: Family, role: SetRole) -> String {
        format!("{}-{}{}", self.set_prefix, role.suffix(), family.digit())
    }

    /// Every set the backend owns.
    pub fn sets(&self) -> Vec<SetSpec> {
        Family::BOTH
            .into_iter()
            .flat_map(|f| {
                SetRole::ALL.into_iter().map(move |r| SetSpec {
                    name: self.set(f, r),
                    kind: r.kind(),
                    v6: f == Family::V6,
                })
            })
            .collect()
    }
}

/// Is `table` usable as the prefix of the backend's chain and set names?
pub fn valid_table_name(table: &str) -> bool {
    !table.is_empty()
        && table.len() <= MAX_TABLE_NAME
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The rules of each of our chains for `family`, in order: (chain suffix, rule arguments).
pub fn chain_rules(params: &RulesetParams, family: Family) -> Vec<(&'static str, Vec<String>)> {
    let n = Names::new(params);
    let RulesetParams {
        outbound_port: out,
        inbound_plaintext_port: inb,
        hbone_port: hbone,
        mark,
        mask,
        ..
    } = params;
    let pod = n.set(family, SetRole::Pod);
    let podif = n.set(family, SetRole::PodIf);
    // Routed ambient pods' host veths (`routed_ports`), by their interface group.
    let routed = format!(
        "-m devgroup --src-group {:#x}",
        ambient_common::constants::ROUTED_PORT_GROUP
    );
    let m = format!("{mark:#x}/{mask:#x}");
    let capture_to = |port: &u16| match (family, params.capture_v4, params.capture_v6) {
        (Family::V4, Some(a), _) => format!("-j DNAT --to-destination {a}:{port}"),
        (Family::V6, _, Some(a)) => format!("-j DNAT --to-destination [{a}]:{port}"),
        _ => format!("-j REDIRECT --to-ports {port}"),
    };
    let c = |text: &str| format!("-m comment --comment \"{text}\"");
    let reset = "-j REJECT --reject-with tcp-reset";
    let uncaptured = format!(
        "-m conntrack --ctstate ESTABLISHED -m conntrack ! --ctstate DNAT -m connmark ! --mark {m}"
    );
    let mut guard = vec![format!(
        "-m set --match-set {pod} src -m set ! --match-set {podif} src,src {} -j DROP",
        c("ambient address from a foreign interface")
    )];
    match family {
        Family::V4 => guard.push(format!(
            "{routed} -m set ! --match-set {podif} src,src {} -j DROP",
            c("routed ambient pod with a foreign address")
        )),
        Family::V6 => {
            guard.push(format!(
                "{routed} ! -s fe80::/10 -m set ! --match-set {podif} src,src {} -j DROP",
                c("routed ambient pod with a foreign address")
            ));
            guard.push(format!(
                "{routed} -s fe80::/10 -p tcp {} -j DROP",
                c("TCP from an ambient pod's link-local address (never captured)")
            ));
            // Bridged pods' neighbour advertisements (via br_netfilter): per-pod rules kept
            // by `ebt`, in a chain the fixed rules only create.
            guard.push(format!(
                "-p ipv6-icmp -m icmp6 --icmpv6-type 136 -j {}",
                n.chain(ND_CHAIN)
            ));
        }
    }
    vec![
        ("GUARD", guard),
        (
            "MARK-REPLIES",
            vec![format!(
                "-m conntrack --ctdir REPLY -m connmark --mark {m} {} -j MARK --set-xmark {m}",
                c("replies to ztunnel's transparent connections go to ztunnel")
            )],
        ),
        (
            "MARK-OWN",
            vec![format!(
                "-m mark --mark {m} {} -j CONNMARK --set-xmark {m}",
                c("remember ztunnel's connections")
            )],
        ),
        (
            "CAPTURE",
            vec![
                format!("-m mark --mark {m} -j RETURN"),
                format!(
                    "-m addrtype --dst-type LOCAL {} -j RETURN",
                    c("node-local destinations: delivered as without the mesh")
                ),
                format!(
                    "-p tcp -m set --match-set {pod} src {} {}",
                    c("outbound"),
                    capture_to(out)
                ),
                format!(
                    "-p tcp -m set --match-set {pod} dst -m tcp --dport {hbone} {} {}",
                    c("inbound HBONE"),
                    capture_to(hbone)
                ),
                format!(
                    "-p tcp -m set --match-set {pod} dst {} {}",
                    c("inbound plaintext"),
                    capture_to(inb)
                ),
            ],
        ),
        (
            "LOCAL-HBONE",
            vec![format!(
                "-p tcp -m set --match-set {pod} dst -m tcp --dport {hbone} {} -j REDIRECT --to-ports {hbone}",
                c("HBONE to a pod of this node")
            )],
        ),
        (
            "CLOSED",
            vec![
                format!(
                    "-p tcp -m conntrack --ctstate NEW -m conntrack --ctstate DNAT -m set --match-set {pod} dst {} {reset}",
                    c("DNAT to an ambient pod that bypassed capture")
                ),
                format!(
                    "-p tcp -m set --match-set {pod} src {uncaptured} -m addrtype ! --dst-type LOCAL {} {reset}",
                    c("an ambient pod's flow that never passed capture (opened before its enrolment)")
                ),
                format!(
                    "-p tcp -m set --match-set {pod} dst {uncaptured} {} {reset}",
                    c("a flow to an ambient pod that never passed capture (opened before its enrolment)")
                ),
            ],
        ),
        (
            "INPUT",
            vec![format!(
                "-p tcp -m multiport --dports {out},{inb} -m conntrack ! --ctstate DNAT {} {reset}",
                c("capture ports only take captured traffic")
            )],
        ),
    ]
}

/// What `iptables-save` shows of one family: per table, the chains and the rules in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Saved {
    pub tables: BTreeMap<String, SavedTable>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeSet<String>,
    /// (chain, the rule's arguments after `-A <chain> `).
    pub rules: Vec<(String, String)>,
}

/// Parses `iptables-save` output.
pub fn parse_save(text: &str) -> Saved {
    let mut saved = Saved::default();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(t) = line.strip_prefix('*') {
            current = Some(t.to_owned());
            saved.tables.entry(t.to_owned()).or_default();
            continue;
        }
        let Some(table) = current.as_ref().and_then(|t| saved.tables.get_mut(t)) else {
            continue;
        };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                table.chains.insert(name.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, args) = rule.split_once(' ').unwrap_or((rule, ""));
            table.rules.push((chain.to_owned(), args.to_owned()));
        } else if line == "COMMIT" {
            current = None;
        }
    }
    saved
}

impl Saved {
    fn table(&self, name: &str) -> Option<&SavedTable> {
        self.tables.get(name)
    }

    fn jumps(&self, table: &str, builtin: &str, target: &str) -> usize {
        let want = format!("-j {target}");
        self.table(table).map_or(0, |t| {
            t.rules
                .iter()
                .filter(|(c, a)| c == builtin && *a == want)
                .count()
        })
    }

    fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.table(table).is_some_and(|t| t.chains.contains(chain))
    }

    fn rule_count(&self, table: &str, chain: &str) -> usize {
        self.table(table)
            .map_or(0, |t| t.rules.iter().filter(|(c, _)| c == chain).count())
    }

    /// Is the first rule of `builtin` the jump to `target`?
    fn jump_first(&self, table: &str, builtin: &str, target: &str) -> bool {
        let want = format!("-j {target}");
        self.table(table)
            .and_then(|t| t.rules.iter().find(|(c, _)| c == builtin))
            .is_some_and(|(_, a)| *a == want)
    }
}

/// The `iptables-restore --noflush` input that (re)installs our chains for `family`: each
/// chain declared (created, or emptied when it exists) and filled, and its jump moved to the
/// top of its built-in chain. One transaction per table.
pub fn render_install(params: &RulesetParams, family: Family, saved: &Saved) -> String {
    let n = Names::new(params);
    let rules = chain_rules(params, family);
    let mut out = String::new();
    for table in TABLES {
        let _ = writeln!(out, "*{table}");
        let hooks: Vec<_> = HOOKS.iter().filter(|(t, _, _)| *t == table).collect();
        if table == "raw" && family == Family::V6 {
            // Emptied here; `ebt` fills it right after.
            let _ = writeln!(out, ":{} - [0:0]", n.chain(ND_CHAIN));
        }
        for (_, _, suffix) in &hooks {
            let _ = writeln!(out, ":{} - [0:0]", n.chain(suffix));
        }
        for (_, builtin, suffix) in &hooks {
            let chain = n.chain(suffix);
            for (s, args) in &rules {
                if s == suffix {
                    for a in args {
                        let _ = writeln!(out, "-A {chain} {a}");
                    }
                }
            }
            for _ in 0..saved.jumps(table, builtin, &chain) {
                let _ = writeln!(out, "-D {builtin} -j {chain}");
            }
            let _ = writeln!(out, "-I {builtin} 1 -j {chain}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The input that removes what [`render_install`] added, as far as `saved` shows it;
/// `None` when there is nothing of ours.
pub fn render_remove(params: &RulesetParams, saved: &Saved) -> Option<String> {
    let n = Names::new(params);
    let mut out = String::new();
    let mut any = false;
    for table in TABLES {
        let mut body = String::new();
        for (_, builtin, suffix) in HOOKS.iter().filter(|(t, _, _)| *t == table) {
            let chain = n.chain(suffix);
            for _ in 0..saved.jumps(table, builtin, &chain) {
                let _ = writeln!(body, "-D {builtin} -j {chain}");
            }
        }
        for (_, _, suffix) in HOOKS.iter().filter(|(t, _, _)| *t == table) {
            let chain = n.chain(suffix);
            if saved.has_chain(table, &chain) {
                let _ = writeln!(body, "-F {chain}\n-X {chain}");
            }
        }
        let nd = n.chain(ND_CHAIN);
        if table == "raw" && saved.has_chain(table, &nd) {
            let _ = writeln!(body, "-F {nd}\n-X {nd}");
        }
        if !body.is_empty() {
            any = true;
            let _ = write!(out, "*{table}\n{body}COMMIT\n");
        }
    }
    any.then_some(out)
}

/// What differs in `saved` from what [`render_install`] installs for `family`: missing or
/// altered chains, and jumps that are missing, repeated or not first.
pub fn drift(params: &RulesetParams, family: Family, saved: &Saved) -> Vec<String> {
    let n = Names::new(params);
    let rules = chain_rules(params, family);
    let fam = family.label();
    let mut out = Vec::new();
    for (table, builtin, suffix) in HOOKS {
        let chain = n.chain(suffix);
        if !saved.has_chain(table, &chain) {
            out.push(format!("chain {fam}/{table}/{chain} is missing"));
            continue;
        }
        let want = rules
            .iter()
            .find(|(s, _)| s == suffix)
            .map_or(0, |(_, r)| r.len());
        let got = saved.rule_count(table, &chain);
        if got != want {
            out.push(format!(
                "chain {fam}/{table}/{chain} has {got} rules, expected {want}"
            ));
        }
        match saved.jumps(table, builtin, &chain) {
            0 => out.push(format!("{fam}/{table}/{builtin} does not jump to {chain}")),
            1 if saved.jump_first(table, builtin, &chain) => {}
            1 => out.push(format!(
                "{fam}/{table}/{builtin}: the jump to {chain} is not the first rule"
            )),
            k => out.push(format!(
                "{fam}/{table}/{builtin} jumps to {chain} {k} times"
            )),
        }
    }
    out
}

/// Are all our chains of `family` present in `saved`?
pub fn present(params: &RulesetParams, saved: &Saved) -> bool {
    let n = Names::new(params);
    HOOKS
        .iter()
        .all(|(table, _, suffix)| saved.has_chain(table, &n.chain(suffix)))
}

/// The set members an element stands for. Routed ports (interface groups, see `links`) and
/// bridge (L2) elements (see `ebt`) have none.
pub fn entries(names: &Names, e: &Element) -> Vec<(String, Entry)> {
    let net_iface = |net: IpAddr, prefix: u8, iface: &str| Entry::NetIface {
        net,
        prefix,
        iface: iface.to_owned(),
        physdev: false,
    };
    match e {
        Element::PodV4(a) => vec![(names.set(Family::V4, SetRole::Pod), Entry::Ip((*a).into()))],
        Element::PodV6(a) => vec![(names.set(Family::V6, SetRole::Pod), Entry::Ip((*a).into()))],
        Element::PodIfV4(i, a) => vec![(
            names.set(Family::V4, SetRole::PodIf),
            net_iface((*a).into(), 32, i),
        )],
        Element::PodIfV6(i, a) => vec![(
            names.set(Family::V6, SetRole::PodIf),
            net_iface((*a).into(), 128, i),
        )],
        _ => Vec::new(),
    }
}

/// The elements that set members stand for (the inverse of [`entries`]); a member no element
/// maps to is reported.
pub fn elements_of(
    names: &Names,
    members: &BTreeMap<String, Vec<Entry>>,
) -> Result<BTreeSet<Element>, String> {
    let mut out = BTreeSet::new();
    for (set, entries) in members {
        for entry in entries {
            let bad = || format!("unexpected member {entry:?} of set {set}");
            let role = SetRole::ALL
                .into_iter()
                .flat_map(|r| Family::BOTH.map(|f| (f, r)))
                .find(|(f, r)| names.set(*f, *r) == *set)
                .ok_or_else(bad)?;
            match (role, entry) {
                ((Family::V4, SetRole::Pod), Entry::Ip(IpAddr::V4(a))) => {
                    out.insert(Element::PodV4(*a));
                }
                ((Family::V6, SetRole::Pod), Entry::Ip(IpAddr::V6(a))) => {
                    out.insert(Element::PodV6(*a));
                }
                (
                    (Family::V4, SetRole::PodIf),
                    Entry::NetIface {
                        net: IpAddr::V4(a),
                        prefix: 32,
                        iface,
                        physdev: false,
                    },
                ) => {
                    out.insert(Element::PodIfV4(iface.clone(), *a));
                }
                (
                    (Family::V6, SetRole::PodIf),
                    Entry::NetIface {
                        net: IpAddr::V6(a),
                        prefix: 128,
                        iface,
                        physdev: false,
                    },
                ) => {
                    out.insert(Element::PodIfV6(iface.clone(), *a));
                }
                _ => return Err(bad()),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn params() -> RulesetParams {
        RulesetParams::default()
    }

    #[test]
    fn every_hook_has_its_rules_and_counts_match_the_rendering() {
        for family in Family::BOTH {
            let rules = chain_rules(&params(), family);
            for (_, _, suffix) in HOOKS {
                assert!(
                    rules.iter().any(|(s, r)| s == suffix && !r.is_empty()),
                    "{suffix} has no rules"
                );
            }
            let text = render_install(&params(), family, &Saved::default());
            let saved = parse_save(
                &text
                    .replace("-I PREROUTING 1", "-A PREROUTING")
                    .replace("-I OUTPUT 1", "-A OUTPUT")
                    .replace("-I FORWARD 1", "-A FORWARD")
                    .replace("-I INPUT 1", "-A INPUT"),
            );
            assert!(present(&params(), &saved));
            assert_eq!(drift(&params(), family, &saved), Vec::<String>::new());
        }
    }

    #[test]
    fn capture_redirects_or_dnats_to_the_capture_address() {
        let rules = |p: &RulesetParams, f| {
            chain_rules(p, f)
                .into_iter()
                .find(|(s, _)| *s == "CAPTURE")
                .unwrap()
                .1
                .join("\n")
        };
        let plain = rules(&params(), Family::V4);
        assert!(plain.contains("-j REDIRECT --to-ports 15001"), "{plain}");
        assert!(!plain.contains("DNAT"));
        let p = RulesetParams {
            capture_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            capture_v6: Some("2001:db8::1".parse().unwrap()),
            ..params()
        };
        assert!(rules(&p, Family::V4).contains("-j DNAT --to-destination 192.0.2.1:15006"));
        assert!(rules(&p, Family::V6).contains("-j DNAT --to-destination [2001:db8::1]:15008"));
        // IPv6 has the link-local rules IPv4 has no use for.
        let guard6 = &chain_rules(&params(), Family::V6)[0];
        assert_eq!((guard6.0, guard6.1.len()), ("GUARD", 4));
        assert!(guard6.1[2].contains("-s fe80::/10 -p tcp"));
    }

    #[test]
    fn install_moves_existing_jumps_to_the_top_and_remove_takes_only_ours() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:AMBIENT-CAPTURE - [0:0]\n\
            -A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j AMBIENT-CAPTURE\n-A PREROUTING -j AMBIENT-CAPTURE\n\
            -A AMBIENT-CAPTURE -j RETURN\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n";
        let saved = parse_save(save);
        let d = drift(&params(), Family::V4, &saved);
        assert!(
            d.contains(&"ipv4/nat/PREROUTING jumps to AMBIENT-CAPTURE 2 times".to_owned()),
            "{d:?}"
        );
        assert!(d.contains(&"chain ipv4/raw/AMBIENT-GUARD is missing".to_owned()));
        assert!(d.contains(&"chain ipv4/nat/AMBIENT-CAPTURE has 1 rules, expected 5".to_owned()));
        let install = render_install(&params(), Family::V4, &saved);
        let nat = install.split("*nat\n").nth(1).unwrap();
        assert_eq!(nat.matches("-D PREROUTING -j AMBIENT-CAPTURE\n").count(), 2);
        assert!(nat.contains("-I PREROUTING 1 -j AMBIENT-CAPTURE\n"));
        let remove = render_remove(&params(), &saved).unwrap();
        assert_eq!(
            remove,
            "*nat\n-D PREROUTING -j AMBIENT-CAPTURE\n-D PREROUTING -j AMBIENT-CAPTURE\n-F AMBIENT-CAPTURE\n-X AMBIENT-CAPTURE\nCOMMIT\n"
        );
        assert!(!remove.contains("KUBE"));
        assert_eq!(
            render_remove(
                &params(),
                &parse_save(
                    "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"
                )
            ),
            None
        );
        // A jump below kube-proxy's is drift.
        let late = parse_save(&install.replace(
            "-I PREROUTING 1 -j AMBIENT-CAPTURE",
            "-A PREROUTING -j KUBE-SERVICES\n-A PREROUTING -j AMBIENT-CAPTURE",
        ));
        assert!(drift(&params(), Family::V4, &late).contains(
            &"ipv4/nat/PREROUTING: the jump to AMBIENT-CAPTURE is not the first rule".to_owned()
        ));
    }

    #[test]
    fn elements_map_to_set_members_and_back() {
        let n = Names::new(&params());
        let els = [
            Element::PodV4(Ipv4Addr::new(10, 0, 0, 2)),
            Element::PodV6("fd00::2".parse().unwrap()),
            Element::PodIfV4("veth1".into(), Ipv4Addr::new(10, 0, 0, 2)),
            Element::PodIfV6("cni0".into(), "fd00::2".parse().unwrap()),
        ];
        let mut members: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
        for e in &els {
            for (set, entry) in entries(&n, e) {
                members.entry(set).or_default().push(entry);
            }
        }
        assert_eq!(members.len(), 4);
        let back = elements_of(&n, &members).unwrap();
        assert_eq!(back, els.iter().cloned().collect());
        assert!(entries(&n, &Element::RoutedPort("veth1".into())).is_empty());
        members.insert(
            "ambient-pod4".into(),
            vec![Entry::Ip("fd00::9".parse().unwrap())],
        );
        assert!(elements_of(&n, &members).is_err());
    }

    #[test]
    fn table_names_fit_chain_and_set_name_limits() {
        assert!(valid_table_name("ambient"));
        assert!(valid_table_name("a234567890123"));
        assert!(!valid_table_name("a2345678901234"));
        assert!(!valid_table_name("bad name"));
        let n = Names::new(&RulesetParams {
            table: "a234567890123".into(),
            ..params()
        });
        assert!(n.chain("MARK-REPLIES").len() <= 28);
        assert!(n.set(Family::V6, SetRole::PodIf).len() <= 31);
        assert!(n.chain("P-123456789012345").len() <= 31);
    }
}

//! The iptables backend: the same redirection as the nftables one, for nodes that run
//! iptables (legacy or nft-based).
//!
//! The fixed chains are written with `iptables-restore --noflush` (one transaction per table)
//! and read back with `iptables-save`; every per-pod fact lives in ipsets changed over netlink
//! ([`ipset`]) or in the interface group of a routed pod's veth ([`links`]), so enrolling a
//! routed pod runs no process and rewrites no rule. Bridged pods' L2 rules ([`BridgeL2`]) are
//! the nftables backend's `bridge` table, whose sets take a pod in one netlink message, where
//! the kernel has nf_tables; or ebtables chains per bridge port ([`ebt`]), one
//! `ebtables-restore` per bridged pod, where it has not (or where the operator asks).

pub mod ebt;
pub mod ipset;
pub mod links;
pub use ambient_rules::ipt as rules;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};

use self::ipset::{Change, Entry, Ipset, SetType};
use self::rules::{Family, Names, Saved};
use crate::nft::{Dataplane, DataplaneError, Element, Observed, RulesetParams};

/// Which iptables: the legacy kernel tables or the nf_tables-based one. Both read the same
/// ipsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Legacy,
    Nft,
}

impl Variant {
    pub const BOTH: [Variant; 2] = [Variant::Legacy, Variant::Nft];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Legacy => "iptables-legacy",
            Variant::Nft => "iptables-nft",
        }
    }

    fn tool(self, family: Family, what: &str) -> String {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let kind = match self {
            Variant::Legacy => "legacy",
            Variant::Nft => "nft",
        };
        format!("{base}-{kind}-{what}")
    }

    /// Are this variant's tools installed?
    pub fn available(self) -> bool {
        Family::BOTH
            .into_iter()
            .flat_map(|f| ["save", "restore"].map(|w| self.tool(f, w)))
            .all(|t| on_path(&t))
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(program))
                .is_ok_and(|m| m.is_file() || m.file_type().is_symlink())
        })
    })
}

/// The variant to use: the one holding more of kube-proxy's rules (as kube-proxy's own
/// image and Istio decide), or `default` when neither holds any.
pub fn choose_variant(
    legacy_kube_rules: usize,
    nft_kube_rules: usize,
    default: Variant,
) -> Variant {
    match legacy_kube_rules.cmp(&nft_kube_rules) {
        std::cmp::Ordering::Greater => Variant::Legacy,
        std::cmp::Ordering::Less => Variant::Nft,
        std::cmp::Ordering::Equal => default,
    }
}

/// Lines of an `iptables-save` that belong to kube-proxy.
pub fn kube_rules(save: &str) -> usize {
    save.lines()
        .filter(|l| l.starts_with("-A ") && l.contains("KUBE-"))
        .count()
}

/// The variant the node uses (see [`choose_variant`]); the default is what plain `iptables`
/// is on this host, else nft.
pub fn detect_variant() -> Result<Variant, DataplaneError> {
    let available: Vec<Variant> = Variant::BOTH
        .into_iter()
        .filter(|v| v.available())
        .collect();
    match available.as_slice() {
        [] => Err(DataplaneError::Rejected(
            "no iptables tools found (iptables-legacy-* or iptables-nft-*): install iptables"
                .into(),
        )),
        [only] => Ok(*only),
        _ => {
            let count = |v: Variant| {
                run(&v.tool(Family::V4, "save"), &[], None)
                    .map(|s| kube_rules(&s))
                    .unwrap_or(0)
            };
            let default = match run("iptables", &["--version"], None) {
                Ok(v) if v.contains("legacy") => Variant::Legacy,
                _ => Variant::Nft,
            };
            Ok(choose_variant(
                count(Variant::Legacy),
                count(Variant::Nft),
                default,
            ))
        }
    }
}

/// Runs `program args`, feeding `stdin`; its stdout, or its stderr as the refusal.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, DataplaneError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DataplaneError::Spawn(program.to_owned(), e))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| DataplaneError::Spawn(program.to_owned(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| DataplaneError::Spawn(program.to_owned(), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(DataplaneError::Rejected(format!(
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The rules of one variant and family as `iptables-save` shows them.
fn save(variant: Variant, family: Family) -> Result<Saved, DataplaneError> {
    Ok(rules::parse_save(&run(
        &variant.tool(family, "save"),
        &[],
        None,
    )?))
}

fn restore(variant: Variant, family: Family, script: &str) -> Result<(), DataplaneError> {
    run(
        &variant.tool(family, "restore"),
        &["--noflush", "--wait", "5"],
        Some(script),
    )
    .map(drop)
}

/// Removes one variant's chains of `params` (both families); the ipsets stay. With
/// iptables-nft, the base chains and tables it created for them go too when nothing else
/// uses them (the legacy tables are the kernel's and stay, empty). Says whether there was
/// anything to remove.
pub fn remove_rules(params: &RulesetParams, variant: Variant) -> Result<bool, DataplaneError> {
    let mut removed = false;
    for family in Family::BOTH {
        let saved = save(variant, family)?;
        if let Some(script) = rules::render_remove(params, &saved) {
            restore(variant, family, &script)?;
            removed = true;
        }
    }
    if removed && variant == Variant::Nft {
        prune_nft_tables()?;
    }
    Ok(removed)
}

/// The iptables-nft tables our chains live in, as nftables names them.
fn prune_nft_tables() -> Result<(), DataplaneError> {
    let tables: Vec<(&str, &str)> = ["ip", "ip6"]
        .into_iter()
        .flat_map(|f| ["raw", "mangle", "nat", "filter"].map(|t| (f, t)))
        .collect();
    let builtins: Vec<&str> = rules::HOOKS.iter().map(|(_, b, _)| *b).collect();
    crate::nft::prune_empty(&tables, &builtins)
}

/// Removes everything the iptables backend may have installed: both variants' chains (where
/// their tools exist), then the sets, the routed-port marks and the ebtables chains.
pub fn remove_all(params: &RulesetParams) -> Result<(), DataplaneError> {
    for v in Variant::BOTH.into_iter().filter(|v| v.available()) {
        remove_rules(params, v)?;
    }
    let names = Names::new(params);
    unmark_ports()?;
    ebt::remove(&names)?;
    let mut ipset = Ipset::open()?;
    for spec in names.sets() {
        ipset.destroy(&spec.name)?;
    }
    Ok(())
}

/// Takes the routed-port group from every link that has it.
fn unmark_ports() -> Result<(), DataplaneError> {
    let mut l = links::Links::open()?;
    let marked = l.in_group(links::ROUTED_PORT_GROUP);
    let names: Vec<&str> = marked.iter().map(String::as_str).collect();
    Ok(l.apply(&names, &[])?)
}

/// Is there anything of the iptables backend (either variant's chains, or its sets)?
pub fn installed(params: &RulesetParams) -> bool {
    let names = Names::new(params);
    let rules = Variant::BOTH
        .into_iter()
        .filter(|v| v.available())
        .any(|v| {
            Family::BOTH
                .into_iter()
                .any(|f| save(v, f).is_ok_and(|s| rules::render_remove(params, &s).is_some()))
        });
    let sets = Ipset::open().is_ok_and(|mut i| {
        names
            .sets()
            .iter()
            .any(|s| matches!(i.list(&s.name), Ok(Some(_))))
    });
    let ports =
        links::Links::open().is_ok_and(|mut l| !l.in_group(links::ROUTED_PORT_GROUP).is_empty());
    rules || sets || ports || ebt::installed(&names)
}

/// Where the iptables backend keeps bridged pods' L2 rules (MAC pin, ARP and NDP claims,
/// foreign-port addresses, the MAC rewrite, tagged frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeL2 {
    /// The nftables backend's `bridge` table alone (set elements over netlink).
    Nftables,
    /// ebtables chains per bridge port, with the ebtables tool of the iptables variant.
    Ebtables,
}

impl BridgeL2 {
    pub fn name(self) -> &'static str {
        match self {
            BridgeL2::Nftables => "nftables",
            BridgeL2::Ebtables => "ebtables",
        }
    }
}

impl std::str::FromStr for BridgeL2 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "nftables" => Ok(BridgeL2::Nftables),
            "ebtables" => Ok(BridgeL2::Ebtables),
            other => Err(format!("{other:?} must be auto, nftables or ebtables")),
        }
    }
}

pub struct IptablesDataplane {
    params: RulesetParams,
    names: Names,
    variant: Variant,
    ipset: Ipset,
    revisions: BTreeMap<(SetType, bool), u8>,
    l2: L2,
    links: links::Links,
}

/// The L2 part of an iptables dataplane, where [`BridgeL2`] puts it.
enum L2 {
    Nft(Box<crate::nft::NftDataplane>),
    Ebtables(ebt::Bridge),
}

fn l2_only(elements: &BTreeSet<Element>) -> BTreeSet<Element> {
    elements.iter().filter(|e| ebt::is_l2(e)).cloned().collect()
}

impl L2 {
    fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError> {
        match self {
            L2::Nft(dp) => dp.install(&l2_only(elements)),
            L2::Ebtables(b) => b.install(elements),
        }
    }

    fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError> {
        match self {
            L2::Nft(dp) => {
                let (remove, add) = (l2_only(remove), l2_only(add));
                if remove.is_empty() && add.is_empty() {
                    return Ok(());
                }
                dp.apply(&remove, &add)
            }
            L2::Ebtables(b) => b.apply(remove, add),
        }
    }

    fn observe(&mut self) -> Result<ebt::L2Observed, DataplaneError> {
        match self {
            L2::Nft(dp) => {
                let o = dp.observe()?;
                let mut drift = dp.drift(&o);
                if !o.present {
                    drift.push("the bridge table is missing".into());
                }
                Ok(ebt::L2Observed {
                    elements: o.elements,
                    drift,
                })
            }
            L2::Ebtables(b) => b.observe(),
        }
    }

    fn uninstall(&mut self) -> Result<(), DataplaneError> {
        match self {
            L2::Nft(dp) => dp.uninstall(),
            L2::Ebtables(b) => b.uninstall(),
        }
    }

    fn dump(&mut self) -> Result<String, DataplaneError> {
        match self {
            L2::Nft(dp) => dp.dump(),
            L2::Ebtables(b) => b.dump(),
        }
    }
}

impl IptablesDataplane {
    /// The dataplane of the network namespace the calling thread is in.
    pub fn new(
        params: RulesetParams,
        variant: Variant,
        bridge_l2: BridgeL2,
    ) -> Result<Self, DataplaneError> {
        if !rules::valid_table_name(&params.table) {
            return Err(DataplaneError::Rejected(format!(
                "table name {:?} cannot name iptables chains and ipsets (at most {} letters, digits, '-' or '_')",
                params.table,
                rules::MAX_TABLE_NAME
            )));
        }
        if !variant.available() {
            return Err(DataplaneError::Rejected(format!(
                "{} is not installed",
                variant.name()
            )));
        }
        let names = Names::new(&params);
        let l2 = match bridge_l2 {
            BridgeL2::Nftables => L2::Nft(Box::new(crate::nft::NftDataplane::bridge_only(
                params.clone(),
            )?)),
            BridgeL2::Ebtables => L2::Ebtables(ebt::Bridge::new(names.clone(), variant)),
        };
        Ok(Self {
            l2,
            names,
            params,
            variant,
            ipset: Ipset::open()?,
            revisions: BTreeMap::new(),
            links: links::Links::open()?,
        })
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    fn ensure_sets(&mut self) -> Result<(), DataplaneError> {
        for spec in self.names.sets() {
            let key = (spec.kind, spec.v6);
            let revision = match self.revisions.get(&key) {
                Some(r) => *r,
                None => {
                    let r = self.ipset.revision(spec.kind, spec.v6)?;
                    self.revisions.insert(key, r);
                    r
                }
            };
            self.ipset.create(&spec, revision)?;
        }
        Ok(())
    }

    fn members(&mut self) -> Result<Option<BTreeMap<String, Vec<Entry>>>, DataplaneError> {
        let mut out = BTreeMap::new();
        for spec in self.names.sets() {
            match self.ipset.list(&spec.name)? {
                Some(entries) => {
                    out.insert(spec.name, entries);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    fn set_changes<'a>(
        &self,
        remove: impl IntoIterator<Item = &'a Element>,
        add: impl IntoIterator<Item = &'a Element>,
    ) -> Vec<(bool, String, Entry)> {
        let mut out = Vec::new();
        for (is_add, elements) in [
            (false, remove.into_iter().collect::<Vec<_>>()),
            (true, add.into_iter().collect::<Vec<_>>()),
        ] {
            for e in elements {
                for (set, entry) in rules::entries(&self.names, e) {
                    out.push((is_add, set, entry));
                }
            }
        }
        out
    }

    fn apply_sets(&mut self, changes: &[(bool, String, Entry)]) -> Result<(), DataplaneError> {
        let changes: Vec<Change<'_>> = changes
            .iter()
            .map(|(add, set, entry)| Change {
                add: *add,
                set,
                entry,
            })
            .collect();
        Ok(self.ipset.apply(&changes)?)
    }
}

fn routed<'a>(elements: impl IntoIterator<Item = &'a Element>) -> Vec<&'a str> {
    elements
        .into_iter()
        .filter_map(|e| match e {
            Element::RoutedPort(v) => Some(v.as_str()),
            _ => None,
        })
        .collect()
}

impl Dataplane for IptablesDataplane {
    fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError> {
        self.ensure_sets()?;
        // The sets first, so the rules match exactly `elements` from their first packet.
        let members = self.members()?.unwrap_or_default();
        let current = rules::elements_of(&self.names, &members).unwrap_or_default();
        let stale: BTreeSet<&Element> = current.difference(elements).collect();
        let changes = self.set_changes(stale, elements.iter());
        // Members no element maps to (a foreign write) are removed too.
        let mut wanted: BTreeMap<String, BTreeSet<Entry>> = BTreeMap::new();
        for e in elements {
            for (set, entry) in rules::entries(&self.names, e) {
                wanted.entry(set).or_default().insert(entry);
            }
        }
        let mut strays = Vec::new();
        for (set, entries) in &members {
            for entry in entries {
                if !wanted.get(set).is_some_and(|w| w.contains(entry)) {
                    strays.push((false, set.clone(), entry.clone()));
                }
            }
        }
        strays.extend(changes);
        self.apply_sets(&strays)?;
        let marked = self.links.in_group(links::ROUTED_PORT_GROUP);
        let wanted_ports = routed(elements);
        let unmarked: Vec<&str> = marked
            .iter()
            .map(String::as_str)
            .filter(|p| !wanted_ports.contains(p))
            .collect();
        self.links.apply(&unmarked, &wanted_ports)?;
        for family in Family::BOTH {
            let saved = save(self.variant, family)?;
            let script = rules::render_install(&self.params, family, &saved);
            restore(self.variant, family, &script)?;
        }
        // After the fixed rules, which (re)create the ND chain it fills.
        self.l2.install(elements)
    }

    fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError> {
        let changes = self.set_changes(remove, add);
        self.apply_sets(&changes)?;
        let undo_sets = |dp: &mut Self| {
            let undo: Vec<_> = changes
                .iter()
                .rev()
                .map(|(a, s, e)| (!a, s.clone(), e.clone()))
                .collect();
            if let Err(u) = dp.apply_sets(&undo) {
                tracing::error!(error = %u, "undoing set changes after a refusal failed");
            }
        };
        let (gone, new) = (routed(remove), routed(add));
        if let Err(e) = self.links.apply(&gone, &new) {
            undo_sets(self);
            return Err(e.into());
        }
        if let Err(e) = self.l2.apply(remove, add) {
            let _ = self.links.apply(&new, &gone);
            undo_sets(self);
            return Err(e);
        }
        Ok(())
    }

    fn observe(&mut self) -> Result<Observed, DataplaneError> {
        let mut observed = Observed::default();
        let mut present = true;
        for family in Family::BOTH {
            let saved = save(self.variant, family)?;
            present &= rules::present(&self.params, &saved);
            observed
                .drift
                .extend(rules::drift(&self.params, family, &saved));
        }
        match self.members()? {
            Some(members) => {
                observed.elements =
                    rules::elements_of(&self.names, &members).map_err(DataplaneError::Rejected)?;
            }
            None => {
                present = false;
                observed.drift.push("an ipset is missing".into());
            }
        }
        observed.elements.extend(
            self.links
                .in_group(links::ROUTED_PORT_GROUP)
                .into_iter()
                .map(Element::RoutedPort),
        );
        let l2 = self.l2.observe()?;
        observed.elements.extend(l2.elements);
        observed.drift.extend(l2.drift);
        observed.present = present;
        Ok(observed)
    }

    fn drift(&self, observed: &Observed) -> Vec<String> {
        observed.drift.clone()
    }

    fn uninstall(&mut self) -> Result<(), DataplaneError> {
        remove_rules(&self.params, self.variant)?;
        unmark_ports()?;
        self.l2.uninstall()?;
        for spec in self.names.sets() {
            self.ipset.destroy(&spec.name)?;
        }
        Ok(())
    }

    fn dump(&mut self) -> Result<String, DataplaneError> {
        let mut out = String::new();
        let ours = |line: &str| line.contains(&self.names.chain(""));
        for family in Family::BOTH {
            let text = run(&self.variant.tool(family, "save"), &[], None)?;
            out.push_str(&format!("# {} {}\n", self.variant.name(), family.label()));
            let mut table = String::new();
            for line in text.lines() {
                if let Some(t) = line.strip_prefix('*') {
                    table = t.to_owned();
                } else if ours(line) {
                    out.push_str(&format!("[{table}] {line}\n"));
                }
            }
        }
        for spec in self.names.sets() {
            let entries = self.ipset.list(&spec.name)?;
            out.push_str(&format!("# ipset {} ({})\n", spec.name, spec.kind.name()));
            match entries {
                None => out.push_str("#   not installed\n"),
                Some(entries) => {
                    for e in entries {
                        out.push_str(&format!("{}\n", entry_text(&e)));
                    }
                }
            }
        }
        out.push_str(&self.l2.dump()?);
        Ok(out)
    }

    fn backend(&self) -> &'static str {
        self.variant.name()
    }
}

/// A set member as `ipset list` prints it.
fn entry_text(e: &Entry) -> String {
    match e {
        Entry::Ip(a) => a.to_string(),
        Entry::NetIface {
            net,
            prefix,
            iface,
            physdev,
        } => format!(
            "{net}/{prefix},{}{iface}",
            if *physdev { "physdev:" } else { "" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{ambient_mac_elements, pin_elements, pod_elements, Attachment, Mac};
    use crate::testutil::in_fresh_netns;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn pods() -> (BTreeSet<Element>, BTreeSet<Element>) {
        let v4 = |d| IpAddr::V4(Ipv4Addr::new(10, 62, 0, d));
        let v6 = |d| IpAddr::V6(Ipv6Addr::new(0xfd62, 0, 0, 0, 0, 0, 0, d));
        let routed = pod_elements(
            &Attachment::Routed {
                veth: "vethr1".into(),
            },
            &[v4(2), v6(2)],
        );
        let bridge = Attachment::Bridged {
            veth: "vethb-long-nam".into(),
            bridge: "cni0".into(),
            bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
        };
        let mac = Some(Mac([0x0a, 0x58, 1, 2, 3, 4]));
        let mut bridged = pod_elements(&bridge, &[v4(3), v6(3)]);
        bridged.extend(pin_elements(&bridge, mac));
        bridged.extend(ambient_mac_elements(&bridge, mac));
        (routed, bridged)
    }

    /// Both variants: what is installed reads back as the elements written, a pod's change
    /// is all or nothing, a jump pushed below another rule is drift, and uninstall leaves
    /// nothing of ours.
    #[test]
    fn installed_rules_and_sets_read_back_and_uninstall_cleanly() {
        for variant in Variant::BOTH {
            if !variant.available() {
                eprintln!("{} not installed; skipped", variant.name());
                continue;
            }
            for l2 in [BridgeL2::Nftables, BridgeL2::Ebtables] {
                round_trip(variant, l2);
            }
        }
    }

    fn round_trip(variant: Variant, l2: BridgeL2) {
        {
            in_fresh_netns(move || {
                // The routed pod's host veth (marked by its interface group).
                let ok = Command::new("ip")
                    .args(["link", "add", "vethr1", "type", "veth", "peer", "vethr1p"])
                    .status()
                    .unwrap();
                assert!(ok.success());
                let params = RulesetParams::default();
                let mut dp = IptablesDataplane::new(params.clone(), variant, l2).unwrap();
                let (routed, bridged) = pods();
                dp.install(&routed).unwrap();
                let seen = dp.observe().unwrap();
                assert!(seen.present);
                assert_eq!(dp.drift(&seen), Vec::<String>::new(), "{}", variant.name());
                assert_eq!(seen.elements, routed);

                dp.apply(&BTreeSet::new(), &bridged).unwrap();
                let all: BTreeSet<Element> = routed.union(&bridged).cloned().collect();
                let seen = dp.observe().unwrap();
                assert_eq!(dp.drift(&seen), Vec::<String>::new());
                assert_eq!(seen.elements, all);
                // A second dataplane (the drift observer's) reads the same.
                let mut other = IptablesDataplane::new(params.clone(), variant, l2).unwrap();
                assert_eq!(other.observe().unwrap().elements, all);

                // Released: the bridged pod's rules go, the routed pod's stay.
                dp.apply(&bridged, &BTreeSet::new()).unwrap();
                let seen = dp.observe().unwrap();
                assert_eq!(seen.elements, routed);
                assert_eq!(dp.drift(&seen), Vec::<String>::new());

                // kube-proxy prepending its jump after us is drift; install repairs it.
                restore(
                    variant,
                    Family::V4,
                    "*nat\n:KUBE-SERVICES - [0:0]\n-I PREROUTING 1 -j KUBE-SERVICES\nCOMMIT\n",
                )
                .unwrap();
                let seen = dp.observe().unwrap();
                let d = dp.drift(&seen);
                assert_eq!(
                    d,
                    vec![
                        "ipv4/nat/PREROUTING: the jump to AMBIENT-CAPTURE is not the first rule"
                            .to_owned()
                    ]
                );
                dp.install(&routed).unwrap();
                let seen = dp.observe().unwrap();
                assert_eq!(dp.drift(&seen), Vec::<String>::new());

                dp.uninstall().unwrap();
                assert!(!installed(&params), "{}: something is left", variant.name());
                let nat = save(variant, Family::V4).unwrap();
                assert!(nat.tables["nat"].chains.contains("KUBE-SERVICES"));
                let dump = run(&variant.tool(Family::V6, "save"), &[], None).unwrap();
                assert!(!dump.contains("AMBIENT"), "{dump}");
                let mut bridge = crate::nft::NftDataplane::bridge_only(params).unwrap();
                assert!(
                    !bridge.observe().unwrap().present,
                    "the bridge table is left"
                );
            });
        }
    }

    #[test]
    fn the_variant_follows_kube_proxy() {
        // (legacy KUBE rules, nft KUBE rules, default) -> choice
        let cases = [
            (0, 0, Variant::Nft, Variant::Nft),
            (0, 0, Variant::Legacy, Variant::Legacy),
            (12, 0, Variant::Nft, Variant::Legacy),
            (0, 3, Variant::Legacy, Variant::Nft),
            (2, 40, Variant::Legacy, Variant::Nft),
            (5, 5, Variant::Legacy, Variant::Legacy),
        ];
        for (legacy, nft, default, want) in cases {
            assert_eq!(
                choose_variant(legacy, nft, default),
                want,
                "{legacy} {nft} {default:?}"
            );
        }
        let save = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X\n-A OUTPUT -j AMBIENT-LOCAL-HBONE\nCOMMIT\n";
        assert_eq!(kube_rules(save), 2);
    }

    #[test]
    fn members_print_as_ipset_does() {
        assert_eq!(
            entry_text(&Entry::Ip("10.0.0.1".parse().unwrap())),
            "10.0.0.1"
        );
        assert_eq!(
            entry_text(&Entry::NetIface {
                net: "::".parse().unwrap(),
                prefix: 0,
                iface: "veth1".into(),
                physdev: true
            }),
            "::/0,physdev:veth1"
        );
    }
}

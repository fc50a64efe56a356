//! The kernel side: nftables through libnftables in-process.
//!
//! [`Dataplane`] is what the agent's single writer task drives; [`NftDataplane`] is the real
//! implementation and [`MemoryDataplane`] the one unit tests use.

mod ffi;
pub mod netlink;
pub use ambient_rules::nft as ruleset;

use std::collections::BTreeSet;

pub use ruleset::chain_drift as chain_drift_of;
use ruleset::chain_drift_in;
pub use ruleset::{
    ambient_mac_elements, pin_elements, pod_elements, valid_ifname, Attachment, Element, Mac,
    Observed, RulesetParams,
};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("libnftables could not create a context (is libnftables1 installed?)")]
    Context,
    #[error("nft command contained a NUL byte")]
    Nul(#[from] std::ffi::NulError),
    #[error("nftables refused the transaction (nothing was applied): {0}")]
    Rejected(String),
    #[error("cannot read the installed ruleset: {0}")]
    Listing(#[from] ruleset::ListingError),
    #[error("netlink: {0}")]
    Netlink(#[source] netlink::NetlinkError),
    #[error("cannot run {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
}

impl From<netlink::NetlinkError> for DataplaneError {
    fn from(e: netlink::NetlinkError) -> Self {
        match e {
            netlink::NetlinkError::Refused(msg) => DataplaneError::Rejected(msg),
            other => DataplaneError::Netlink(other),
        }
    }
}

/// Owner of the project's tables in the current network namespace.
pub trait Dataplane: Send {
    // (object-safe: the core holds a `Box<dyn Dataplane>`)
    /// Installs (or reinstalls) the fixed rules with exactly `elements`, atomically.
    fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError>;
    /// Removes `remove` and adds `add` in one transaction.
    fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError>;
    /// Reads what is installed.
    fn observe(&mut self) -> Result<Observed, DataplaneError>;
    /// What differs in `observed` from the fixed rules this backend installs (elements
    /// aside): the reasons to reinstall.
    fn drift(&self, observed: &Observed) -> Vec<String> {
        chain_drift_of(observed)
    }
    /// Removes the tables; idempotent.
    fn uninstall(&mut self) -> Result<(), DataplaneError>;
    /// The installed ruleset as text, for people.
    fn dump(&mut self) -> Result<String, DataplaneError>;
    fn backend(&self) -> &'static str;
}

pub struct NftDataplane {
    ctx: ffi::NftContext,
    params: RulesetParams,
    /// The tables this dataplane owns: both, or (for the iptables backend's bridged pods)
    /// the `bridge` table alone.
    families: &'static [&'static str],
    /// Element changes go straight to the kernel; `None` when the socket could not be
    /// opened (libnftables then carries them too).
    elements: Option<netlink::ElementWriter>,
}

impl NftDataplane {
    /// Creates the dataplane of the network namespace the calling thread is in.
    pub fn new(params: RulesetParams) -> Result<Self, DataplaneError> {
        let elements = netlink::ElementWriter::new()
            .inspect_err(
                |e| tracing::warn!(error = %e, "element changes will go through libnftables"),
            )
            .ok();
        Ok(Self {
            ctx: ffi::NftContext::new().ok_or(DataplaneError::Context)?,
            params,
            families: &["inet", "bridge"],
            elements,
        })
    }

    /// The `bridge` table alone: L2 rules for bridged pods (see `ipt`).
    pub fn bridge_only(params: RulesetParams) -> Result<Self, DataplaneError> {
        let mut dp = Self::new(params)?;
        dp.families = &["bridge"];
        Ok(dp)
    }

    /// The `inet` table alone: what a node moving to the iptables backend removes (its
    /// bridged pods keep the `bridge` table, which that backend writes too).
    pub fn inet_only(params: RulesetParams) -> Result<Self, DataplaneError> {
        let mut dp = Self::new(params)?;
        dp.families = &["inet"];
        Ok(dp)
    }

    /// Applies element changes through libnftables only (the benchmark's comparison).
    pub fn without_element_writer(mut self) -> Self {
        self.elements = None;
        self
    }

    fn run(&mut self, script: &str, json: bool) -> Result<String, DataplaneError> {
        let out = self.ctx.run(script, json)?;
        if out.ok {
            Ok(out.output)
        } else {
            Err(DataplaneError::Rejected(out.error.trim().to_owned()))
        }
    }
}

impl Dataplane for NftDataplane {
    fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError> {
        let mut script = String::new();
        for family in self.families {
            script.push_str(&match *family {
                "inet" => self.params.render_inet(),
                _ => self.params.render_bridge(),
            });
        }
        script.push_str(&ruleset::render_changes(
            &self.params.table,
            [],
            elements.iter(),
        ));
        self.run(&script, false).map(drop)
    }

    fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError> {
        if remove.is_empty() && add.is_empty() {
            return Ok(());
        }
        if let Some(writer) = &mut self.elements {
            if remove.len() + add.len() <= netlink::MAX_ELEMENTS {
                return Ok(writer.apply(&self.params.table, remove, add)?);
            }
        }
        let script = ruleset::render_changes(&self.params.table, remove, add);
        self.run(&script, false).map(drop)
    }

    fn observe(&mut self) -> Result<Observed, DataplaneError> {
        let mut observed = Observed::default();
        for family in self.families {
            let cmd = format!("list table {family} {}", self.params.table);
            match self.run(&cmd, true) {
                Ok(json) => ruleset::parse_listing(&json, &mut observed)?,
                // A missing table is an observation, not an error.
                Err(DataplaneError::Rejected(e)) if e.contains("No such file") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(observed)
    }

    fn drift(&self, observed: &Observed) -> Vec<String> {
        chain_drift_in(observed, self.families)
    }

    fn uninstall(&mut self) -> Result<(), DataplaneError> {
        let script = self.params.render_remove_families(self.families);
        self.run(&script, false).map(drop)
    }

    fn dump(&mut self) -> Result<String, DataplaneError> {
        let mut out = String::new();
        for family in self.families {
            let cmd = format!("list table {family} {}", self.params.table);
            match self.run(&cmd, false) {
                Ok(text) => out.push_str(&text),
                Err(DataplaneError::Rejected(e)) if e.contains("No such file") => out.push_str(
                    &format!("# table {family} {} is not installed\n", self.params.table),
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn backend(&self) -> &'static str {
        "nftables"
    }
}

/// Deletes the base chains `chains` of each nftables table `(family, name)` that hold no
/// rule, then each such table left without chains: what `iptables-nft` and `ebtables-nft`
/// create on first use and leave behind when their last rule goes. A chain or table holding
/// anything else stays.
pub fn prune_empty(tables: &[(&str, &str)], chains: &[&str]) -> Result<(), DataplaneError> {
    let mut ctx = ffi::NftContext::new().ok_or(DataplaneError::Context)?;
    for (family, table) in tables {
        let out = ctx.run(&format!("list table {family} {table}"), true)?;
        if !out.ok {
            continue; // no such table
        }
        let mut observed = Observed::default();
        let listing: serde_json::Value =
            serde_json::from_str(&out.output).map_err(ruleset::ListingError::from)?;
        let mut present: Vec<(String, usize)> = Vec::new();
        for item in listing["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = item.get("chain") {
                present.push((c["name"].as_str().unwrap_or("").to_owned(), 0));
            }
            if let Some(r) = item.get("rule") {
                let chain = r["chain"].as_str().unwrap_or("");
                if let Some(c) = present.iter_mut().find(|(n, _)| n == chain) {
                    c.1 += 1;
                }
            }
            if item.get("set").is_some() || item.get("map").is_some() {
                observed.present = true; // a set: the table is someone's
            }
        }
        let mut script = String::new();
        let mut left = present.len();
        for (name, rules) in &present {
            if *rules == 0 && chains.contains(&name.as_str()) {
                script.push_str(&format!("delete chain {family} {table} {name}\n"));
                left -= 1;
            }
        }
        if left == 0 && !observed.present {
            script.push_str(&format!("delete table {family} {table}\n"));
        }
        if !script.is_empty() {
            let out = ctx.run(&script, false)?;
            if !out.ok {
                return Err(DataplaneError::Rejected(out.error.trim().to_owned()));
            }
        }
    }
    Ok(())
}

/// An in-memory dataplane with nftables' transaction semantics (a delete of a missing
/// element or an add of a present one fails the whole batch), for unit tests.
#[derive(Debug, Default, Clone)]
pub struct MemoryDataplane {
    pub installed: bool,
    pub elements: BTreeSet<Element>,
    pub transactions: usize,
    /// When set, the next transaction fails.
    pub fail_next: bool,
}

impl Dataplane for MemoryDataplane {
    fn install(&mut self, elements: &BTreeSet<Element>) -> Result<(), DataplaneError> {
        self.check_fail()?;
        self.installed = true;
        self.elements = elements.clone();
        Ok(())
    }

    fn apply(
        &mut self,
        remove: &BTreeSet<Element>,
        add: &BTreeSet<Element>,
    ) -> Result<(), DataplaneError> {
        self.check_fail()?;
        if !self.installed {
            return Err(DataplaneError::Rejected("No such file or directory".into()));
        }
        let mut next = self.elements.clone();
        for e in remove {
            if !next.remove(e) {
                return Err(DataplaneError::Rejected(format!("delete of missing {e:?}")));
            }
        }
        for e in add {
            if !next.insert(e.clone()) {
                // nft's `add element` of an existing element is accepted; mirror that.
            }
        }
        self.elements = next;
        Ok(())
    }

    fn observe(&mut self) -> Result<Observed, DataplaneError> {
        let chains = ruleset::INET_CHAINS
            .iter()
            .map(|(n, c)| (format!("inet/{n}"), *c))
            .chain(
                ruleset::BRIDGE_CHAINS
                    .iter()
                    .map(|(n, c)| (format!("bridge/{n}"), *c)),
            )
            .filter(|_| self.installed)
            .collect();
        Ok(Observed {
            elements: self.elements.clone(),
            chains,
            present: self.installed,
            drift: Vec::new(),
        })
    }

    fn uninstall(&mut self) -> Result<(), DataplaneError> {
        self.installed = false;
        self.elements.clear();
        Ok(())
    }

    fn dump(&mut self) -> Result<String, DataplaneError> {
        Ok(format!("{:#?}", self.elements))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

impl MemoryDataplane {
    fn check_fail(&mut self) -> Result<(), DataplaneError> {
        self.transactions += 1;
        if std::mem::take(&mut self.fail_next) {
            return Err(DataplaneError::Rejected("injected failure".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::in_fresh_netns;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// The netlink fast path writes exactly the elements libnftables reads back (the
    /// listing is parsed into `Element`s), is atomic, and replaces a map value.
    #[test]
    fn element_writer_agrees_with_libnftables() {
        in_fresh_netns(|| {
            let mut dp = NftDataplane::new(RulesetParams::default()).unwrap();
            assert!(dp.elements.is_some(), "netlink writer not available");
            dp.install(&BTreeSet::new()).unwrap();
            let v4 = |d| IpAddr::V4(Ipv4Addr::new(10, 61, 0, d));
            let v6 = |d| IpAddr::V6(Ipv6Addr::new(0xfd61, 0, 0, 0, 0, 0, 0, d));
            let routed = pod_elements(
                &Attachment::Routed {
                    veth: "vethr1".into(),
                },
                &[v4(2), v6(2)],
            );
            let bridge = |mac| Attachment::Bridged {
                veth: "vethb-long-nam".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac(mac),
            };
            let mut bridged = pod_elements(&bridge([2, 0, 0, 0, 0, 1]), &[v4(3), v6(3)]);
            bridged.extend(pin_elements(
                &bridge([2, 0, 0, 0, 0, 1]),
                Some(Mac([0x0a, 0x58, 1, 2, 3, 4])),
            ));
            bridged.extend(ambient_mac_elements(
                &bridge([2, 0, 0, 0, 0, 1]),
                Some(Mac([0x0a, 0x58, 1, 2, 3, 4])),
            ));
            let all: BTreeSet<Element> = routed.union(&bridged).cloned().collect();
            dp.apply(&BTreeSet::new(), &all).unwrap();
            assert_eq!(dp.observe().unwrap().elements, all);

            // A batch with one impossible change applies nothing.
            let missing = BTreeSet::from([Element::PodV4(Ipv4Addr::new(10, 61, 9, 9))]);
            let extra = BTreeSet::from([Element::PodV4(Ipv4Addr::new(10, 61, 8, 8))]);
            match dp.apply(&missing, &extra) {
                Err(DataplaneError::Rejected(msg)) => {
                    assert!(msg.contains("No such file"), "{msg}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(dp.observe().unwrap().elements, all);

            // A map key given a new value in one transaction (delete, then add).
            let mut rebridged = pod_elements(&bridge([2, 0, 0, 0, 0, 9]), &[v4(3), v6(3)]);
            rebridged.extend(pin_elements(
                &bridge([2, 0, 0, 0, 0, 9]),
                Some(Mac([0x0a, 0x58, 1, 2, 3, 4])),
            ));
            rebridged.extend(ambient_mac_elements(
                &bridge([2, 0, 0, 0, 0, 9]),
                Some(Mac([0x0a, 0x58, 1, 2, 3, 4])),
            ));
            let old: BTreeSet<Element> = bridged.difference(&rebridged).cloned().collect();
            let new: BTreeSet<Element> = rebridged.difference(&bridged).cloned().collect();
            // Both maps keyed by something that stays (port, pod MAC) get a new value.
            assert_eq!(old.len(), 2);
            dp.apply(&old, &new).unwrap();
            let now: BTreeSet<Element> = routed.union(&rebridged).cloned().collect();
            assert_eq!(dp.observe().unwrap().elements, now);

            dp.apply(&now, &BTreeSet::new()).unwrap();
            assert!(dp.observe().unwrap().elements.is_empty());
            // Without the tables the kernel refuses, and says why.
            dp.uninstall().unwrap();
            assert!(matches!(
                dp.apply(&BTreeSet::new(), &all),
                Err(DataplaneError::Rejected(_))
            ));
        });
    }
}

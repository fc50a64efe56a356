//! Policy routing that returns replies of ztunnel's transparent connections to ztunnel:
//! `ip rule fwmark <mark>/<mask> lookup <table>` and a table that routes everything locally.
//! ztunnel's own sockets carry the same mark, so a rule just before it sends locally
//! generated marked packets (`iif lo`) to the main table; without it ztunnel's own SYN-ACKs
//! and connects would be delivered back to itself.
//!
//! Rendered here as `ip` argument lists, and read back from `ip rule show`; running `ip` is
//! the caller's (the node agent's `routing` module, the test lab).

use ambient_common::constants as c;

/// The rules and the local route, from the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRouting {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    /// Priority of the `fwmark` rule; the `iif lo` rule takes the one before it.
    pub priority: u32,
}

/// The project's defaults (`ambient_common::constants`).
impl Default for PolicyRouting {
    fn default() -> Self {
        Self {
            mark: c::ZTUNNEL_MARK,
            mask: c::MARK_MASK,
            table: c::ROUTE_TABLE,
            priority: c::ROUTE_RULE_PRIORITY,
        }
    }
}

/// An address family as `ip` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub const BOTH: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// `ip`'s family flag.
    pub fn flag(self) -> &'static str {
        match self {
            IpFamily::V4 => "-4",
            IpFamily::V6 => "-6",
        }
    }

    fn everything(self) -> &'static str {
        match self {
            IpFamily::V4 => "0.0.0.0/0",
            IpFamily::V6 => "::/0",
        }
    }
}

/// One `ip rule`: priority, selector words, table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    pub selector: Vec<String>,
    pub table: String,
}

impl Rule {
    /// `ip <family> rule <verb> <selector> lookup <table> priority <priority>`; `verb` is
    /// `add` or `del`.
    pub fn args(&self, family: IpFamily, verb: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![family.flag().into(), "rule".into(), verb.into()];
        args.extend(self.selector.iter().cloned());
        args.extend([
            "lookup".into(),
            self.table.clone(),
            "priority".into(),
            self.priority.to_string(),
        ]);
        args
    }

    /// The `ip` arguments that list the rules at this rule's priority.
    pub fn show_args(&self, family: IpFamily) -> Vec<String> {
        vec![
            family.flag().into(),
            "rule".into(),
            "show".into(),
            "priority".into(),
            self.priority.to_string(),
        ]
    }

    /// Does `listing` (the output of [`show_args`](Self::show_args)) hold this rule?
    pub fn listed_in(&self, listing: &str) -> bool {
        let want = format!("lookup {}", self.table);
        listing.lines().any(|line| {
            line.split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w.join(" ") == want)
        })
    }
}

impl PolicyRouting {
    /// The two rules, in the order they are added: `iif lo` marked packets to `main`, then
    /// every other marked packet to [`table`](Self::table).
    pub fn rules(&self) -> [Rule; 2] {
        let fwmark = format!("{:#x}/{:#x}", self.mark, self.mask);
        [
            Rule {
                priority: self.priority - 1,
                selector: vec!["iif".into(), "lo".into(), "fwmark".into(), fwmark.clone()],
                table: "main".into(),
            },
            Rule {
                priority: self.priority,
                selector: vec!["fwmark".into(), fwmark],
                table: self.table.to_string(),
            },
        ]
    }

    /// `ip <family> route replace local <everything> dev lo table <table>`.
    pub fn route_args(&self, family: IpFamily) -> Vec<String> {
        [
            family.flag(),
            "route",
            "replace",
            "local",
            family.everything(),
            "dev",
            "lo",
            "table",
            &self.table.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `ip <family> route flush table <table>`.
    pub fn flush_args(&self, family: IpFamily) -> Vec<String> {
        [
            family.flag(),
            "route",
            "flush",
            "table",
            &self.table.to_string(),
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_and_route() {
        let r = PolicyRouting::default();
        let [lo, mark] = r.rules();
        assert_eq!(
            lo.args(IpFamily::V4, "add").join(" "),
            "-4 rule add iif lo fwmark 0x539/0xfff lookup main priority 31999"
        );
        assert_eq!(
            mark.args(IpFamily::V6, "del").join(" "),
            "-6 rule del fwmark 0x539/0xfff lookup 133 priority 32000"
        );
        assert_eq!(
            r.route_args(IpFamily::V6).join(" "),
            "-6 route replace local ::/0 dev lo table 133"
        );
        assert_eq!(
            r.flush_args(IpFamily::V4).join(" "),
            "-4 route flush table 133"
        );
        assert_eq!(
            mark.show_args(IpFamily::V4).join(" "),
            "-4 rule show priority 32000"
        );
    }

    #[test]
    fn a_listing_holds_a_rule_only_with_its_table() {
        let [lo, mark] = PolicyRouting::default().rules();
        let listing = "32000:\tfrom all fwmark 0x539/0xfff lookup 133 proto static\n";
        assert!(mark.listed_in(listing));
        assert!(!lo.listed_in(listing));
        // Another table whose number starts with ours is not ours.
        assert!(!mark.listed_in("32000:\tfrom all fwmark 0x539/0xfff lookup 1337\n"));
        assert!(!mark.listed_in(""));
    }
}

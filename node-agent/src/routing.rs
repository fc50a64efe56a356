//! Policy routing that returns replies of ztunnel's transparent connections to ztunnel:
//! `ip rule fwmark <mark>/<mask> lookup <table>` and a table that routes everything locally.
//! ztunnel's own sockets carry the same mark, so a rule just before it sends locally
//! generated marked packets (`iif lo`) to the main table; without it ztunnel's own SYN-ACKs
//! and connects would be delivered back to itself. Fixed at start (not per pod), so it is set
//! with `ip` rather than netlink.

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot run `ip` (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

#[derive(Debug, Clone, Copy)]
pub struct PolicyRouting {
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

fn ip(args: &[&str]) -> Result<String, RoutingError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(RoutingError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RoutingError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// One `ip rule`: priority, selector words, table.
struct Rule {
    priority: u32,
    selector: Vec<String>,
    table: String,
}

impl Rule {
    fn args<'a>(&'a self, fam: &'a str, verb: &'a str, prio: &'a str) -> Vec<&'a str> {
        let mut args = vec![fam, "rule", verb];
        args.extend(self.selector.iter().map(String::as_str));
        args.extend(["lookup", self.table.as_str(), "priority", prio]);
        args
    }

    fn present(&self, fam: &str) -> Result<bool, RoutingError> {
        let out = ip(&[fam, "rule", "show", "priority", &self.priority.to_string()])?;
        Ok(out.contains(&format!("lookup {}", self.table)))
    }
}

impl PolicyRouting {
    fn rules(&self) -> [Rule; 2] {
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

    /// Installs the rules and routes for both families; idempotent.
    pub fn install(&self) -> Result<(), RoutingError> {
        let table = self.table.to_string();
        for (fam, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            for rule in self.rules() {
                if !rule.present(fam)? {
                    let prio = rule.priority.to_string();
                    ip(&rule.args(fam, "add", &prio))?;
                }
            }
            ip(&[
                fam, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    }

    /// True when both families' rules are installed.
    pub fn present(&self) -> bool {
        ["-4", "-6"]
            .iter()
            .all(|f| self.rules().iter().all(|r| r.present(f).unwrap_or(false)))
    }

    /// Removes what [`install`](Self::install) added; idempotent.
    pub fn uninstall(&self) -> Result<(), RoutingError> {
        let table = self.table.to_string();
        for fam in ["-4", "-6"] {
            for rule in self.rules() {
                while rule.present(fam)? {
                    let prio = rule.priority.to_string();
                    ip(&rule.args(fam, "del", &prio))?;
                }
            }
            let _ = ip(&[fam, "route", "flush", "table", &table]);
        }
        Ok(())
    }
}

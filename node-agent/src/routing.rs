//! Policy routing that returns replies of ztunnel's transparent connections to ztunnel:
//! `ip rule fwmark <mark>/<mask> lookup <table>` and a table that routes everything locally.
//! Fixed at start (not per pod), so it is set with `ip` rather than netlink.

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

impl PolicyRouting {
    fn fwmark(&self) -> String {
        format!("{:#x}/{:#x}", self.mark, self.mask)
    }

    /// Installs the rules and routes for both families; idempotent.
    pub fn install(&self) -> Result<(), RoutingError> {
        let table = self.table.to_string();
        let prio = self.priority.to_string();
        for (fam, default) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
            if !self.rule_present(fam)? {
                ip(&[
                    fam,
                    "rule",
                    "add",
                    "fwmark",
                    &self.fwmark(),
                    "lookup",
                    &table,
                    "priority",
                    &prio,
                ])?;
            }
            ip(&[
                fam, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    }

    fn rule_present(&self, fam: &str) -> Result<bool, RoutingError> {
        let out = ip(&[fam, "rule", "show", "priority", &self.priority.to_string()])?;
        Ok(out.contains(&format!("lookup {}", self.table)))
    }

    /// True when both families' rules are installed.
    pub fn present(&self) -> bool {
        ["-4", "-6"]
            .iter()
            .all(|f| self.rule_present(f).unwrap_or(false))
    }

    /// Removes what [`install`](Self::install) added; idempotent.
    pub fn uninstall(&self) -> Result<(), RoutingError> {
        let table = self.table.to_string();
        let prio = self.priority.to_string();
        for fam in ["-4", "-6"] {
            while self.rule_present(fam)? {
                ip(&[
                    fam,
                    "rule",
                    "del",
                    "fwmark",
                    &self.fwmark(),
                    "lookup",
                    &table,
                    "priority",
                    &prio,
                ])?;
            }
            let _ = ip(&[fam, "route", "flush", "table", &table]);
        }
        Ok(())
    }
}

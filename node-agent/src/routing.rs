//! Installs the policy routing that `ambient_rules::routing` renders (see there for what it
//! does and why). Fixed at start (not per pod), so it is set with `ip` rather than netlink.

use std::process::Command;

pub use ambient_rules::routing::{IpFamily, PolicyRouting};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot run `ip` (is iproute2 installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

fn ip(args: &[String]) -> Result<String, RoutingError> {
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

fn present_in(rule: &ambient_rules::routing::Rule, family: IpFamily) -> Result<bool, RoutingError> {
    Ok(rule.listed_in(&ip(&rule.show_args(family))?))
}

/// Installs the rules and routes for both families; idempotent.
pub fn install(routing: &PolicyRouting) -> Result<(), RoutingError> {
    for family in IpFamily::BOTH {
        for rule in routing.rules() {
            if !present_in(&rule, family)? {
                ip(&rule.args(family, "add"))?;
            }
        }
        ip(&routing.route_args(family))?;
    }
    Ok(())
}

/// Removes what [`install`] added; idempotent.
pub fn uninstall(routing: &PolicyRouting) -> Result<(), RoutingError> {
    for family in IpFamily::BOTH {
        for rule in routing.rules() {
            while present_in(&rule, family)? {
                ip(&rule.args(family, "del"))?;
            }
        }
        let _ = ip(&routing.flush_args(family));
    }
    Ok(())
}

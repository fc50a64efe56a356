//! The watch loop of `install-cni run`: one [`Installer::ensure`] pass per period, until told
//! to stop. Polling the directory every 500 ms costs one `readdir` and one small read; it
//! notices a rewrite, a replacement (rename over), a removal and a new file that sorts first,
//! which are all the ways a primary CNI changes its configuration.

use std::future::Future;

use crate::installer::{ChainState, Installer};

/// Runs passes until `stop` completes; returns the installer for the exit decision.
pub async fn watch(mut installer: Installer, stop: impl Future<Output = ()>) -> Installer {
    let mut tick = tokio::time::interval(installer.config().poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            _ = &mut stop => return installer,
            _ = tick.tick() => {}
        }
        // Report state changes once, not every period.
        let now = match installer.ensure() {
            Ok(pass) => {
                if pass.binary_written {
                    tracing::info!(path = %installer.config().plugin_dest().display(), "plugin binary installed");
                }
                match pass.chain {
                    ChainState::WaitingForPrimary => {
                        "waiting for the primary CNI to write its configuration".to_owned()
                    }
                    ChainState::Unchanged(p) => format!("plugin chained in {}", p.display()),
                    ChainState::Written(p) => {
                        tracing::info!(file = %p.display(), "plugin written into the CNI configuration");
                        format!("plugin chained in {}", p.display())
                    }
                }
            }
            Err(e) => format!("error: {}", ambient_common::error::chain(&e)),
        };
        if last.as_deref() != Some(&now) {
            if now.starts_with("error") {
                tracing::error!(state = %now, "installer");
            } else {
                tracing::info!(state = %now, "installer");
            }
            last = Some(now);
        }
    }
}

//! The node's capture rules, as data: what the node agent installs and what the system-test
//! lab installs to stand in for it, so a change to the real capture is what every test runs
//! against. Rendering and parsing only; no process is run and no socket opened here.
//!
//! - [`nft`]: the nftables tables (`inet` capture, guards and marking; `bridge` L2 guards),
//!   the per-pod set elements, and the reading of `nft -j list` output for drift.
//! - [`ipt`]: the same rules for iptables (`iptables-restore` input, the ipsets that hold the
//!   per-pod facts) and the reading of `iptables-save`.
//! - [`routing`]: the policy routing that returns replies of ztunnel's transparent
//!   connections to ztunnel, as `ip` arguments.
#![forbid(unsafe_code)]

pub mod ipt;
pub mod nft;
pub mod routing;

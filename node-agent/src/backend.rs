//! Which redirection backend the agent runs, and moving a node from one to another.
//!
//! `auto` takes nftables where the kernel accepts the nftables ruleset (an `inet` NAT chain
//! needs Linux 5.2), and iptables otherwise; `iptables` uses the variant (legacy or nft) that
//! holds the node's kube-proxy rules, as kube-proxy and Istio do.

use std::collections::BTreeSet;

use crate::ipt::{self, IptablesDataplane, Variant};
use crate::nft::{Dataplane, DataplaneError, NftDataplane, RulesetParams};

/// The configured choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Setting {
    #[default]
    Auto,
    Nftables,
    /// iptables; the variant is detected unless given.
    Iptables(Option<Variant>),
}

impl Setting {
    pub fn as_str(self) -> &'static str {
        match self {
            Setting::Auto => "auto",
            Setting::Nftables => "nftables",
            Setting::Iptables(None) => "iptables",
            Setting::Iptables(Some(v)) => v.name(),
        }
    }
}

impl serde::Serialize for Setting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::str::FromStr for Setting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Setting::Auto,
            "nftables" => Setting::Nftables,
            "iptables" => Setting::Iptables(None),
            "iptables-legacy" => Setting::Iptables(Some(Variant::Legacy)),
            "iptables-nft" => Setting::Iptables(Some(Variant::Nft)),
            other => {
                return Err(format!(
                    "{other:?} must be auto, nftables, iptables, iptables-legacy or iptables-nft"
                ))
            }
        })
    }
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    Iptables(Variant),
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables(v) => v.name(),
        }
    }
}

/// The decision, from the setting and what the node offers (asked only when needed).
pub fn decide(
    setting: Setting,
    nftables_works: impl FnOnce() -> bool,
    detect_variant: impl FnOnce() -> Result<Variant, DataplaneError>,
) -> Result<Backend, DataplaneError> {
    Ok(match setting {
        Setting::Nftables => Backend::Nftables,
        Setting::Iptables(Some(v)) => Backend::Iptables(v),
        Setting::Iptables(None) => Backend::Iptables(detect_variant()?),
        Setting::Auto if nftables_works() => Backend::Nftables,
        Setting::Auto => Backend::Iptables(detect_variant()?),
    })
}

/// Does the kernel take the nftables ruleset? Installs it under a scratch table name and
/// removes it again.
pub fn nftables_works(params: &RulesetParams) -> bool {
    let probe = RulesetParams {
        table: format!("{}_probe", params.table),
        ..params.clone()
    };
    let result = NftDataplane::new(probe).and_then(|mut dp| {
        let installed = dp.install(&BTreeSet::new());
        dp.uninstall()?;
        installed
    });
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "the nftables ruleset is not usable here");
            false
        }
    }
}

/// Chooses the backend for `setting` on this node.
pub fn choose(setting: Setting, params: &RulesetParams) -> Result<Backend, DataplaneError> {
    decide(setting, || nftables_works(params), ipt::detect_variant)
}

/// A dataplane of `backend` in the calling thread's network namespace.
pub fn open(backend: Backend, params: RulesetParams) -> Result<Box<dyn Dataplane>, DataplaneError> {
    Ok(match backend {
        Backend::Nftables => Box::new(NftDataplane::new(params)?),
        Backend::Iptables(v) => Box::new(IptablesDataplane::new(params, v)?),
    })
}

/// Removes what other backends left on the node. Called once `backend` is installed, so an
/// enrolled pod is never uncaptured while the node changes backend: for a moment both
/// capture it, which is harmless (the first NAT rule to match wins, and both send a flow to
/// the same place; the guards agree).
pub fn remove_others(backend: Backend, params: &RulesetParams) -> Vec<String> {
    let mut removed = Vec::new();
    let mut note = |what: &str, r: Result<(), DataplaneError>| match r {
        Ok(()) => removed.push(what.to_owned()),
        Err(e) => tracing::warn!(error = %e, "removing the {what} rules failed"),
    };
    match backend {
        Backend::Nftables => {
            if ipt::installed(params) {
                note("iptables", ipt::remove_all(params));
            }
        }
        Backend::Iptables(v) => {
            if let Ok(mut nft) = NftDataplane::new(params.clone()) {
                if nft.observe().is_ok_and(|o| o.present) {
                    note("nftables", nft.uninstall());
                }
            }
            for other in Variant::BOTH
                .into_iter()
                .filter(|o| *o != v && o.available())
            {
                note(other.name(), ipt::remove_rules(params, other));
            }
        }
    }
    removed
}

/// Removes every backend's rules (uninstall).
pub fn remove_all(params: &RulesetParams) -> Result<(), DataplaneError> {
    if let Ok(mut nft) = NftDataplane::new(params.clone()) {
        nft.uninstall()?;
    }
    ipt::remove_all(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_decide() {
        use Variant::*;
        let detected = |v: Variant| move || Ok::<_, DataplaneError>(v);
        // (setting, nftables works, detected variant) -> backend
        let cases = [
            ("auto", true, Nft, Backend::Nftables),
            ("auto", false, Legacy, Backend::Iptables(Legacy)),
            ("auto", false, Nft, Backend::Iptables(Nft)),
            ("nftables", false, Legacy, Backend::Nftables),
            ("iptables", true, Legacy, Backend::Iptables(Legacy)),
            ("iptables-nft", true, Legacy, Backend::Iptables(Nft)),
            ("iptables-legacy", true, Nft, Backend::Iptables(Legacy)),
        ];
        for (text, works, variant, want) in cases {
            let setting: Setting = text.parse().unwrap();
            assert_eq!(setting.as_str(), text);
            let got = decide(setting, || works, detected(variant)).unwrap();
            assert_eq!(got, want, "{text} nft={works} {variant:?}");
        }
        assert!("ebpf"
            .parse::<Setting>()
            .unwrap_err()
            .contains("must be auto"));
        // Without iptables tools, iptables cannot be chosen, and says why.
        let none = || Err(DataplaneError::Rejected("no iptables tools found".into()));
        assert!(decide(Setting::Auto, || false, none).is_err());
        // nftables never asks for the variant.
        decide(
            Setting::Auto,
            || true,
            || -> Result<Variant, _> { panic!("asked") },
        )
        .unwrap();
        assert_eq!(Backend::Iptables(Nft).name(), "iptables-nft");
    }
}

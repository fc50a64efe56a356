//! Which redirection backend the agent runs, and moving a node from one to another.
//!
//! `auto` takes nftables where the kernel accepts the nftables ruleset (an `inet` NAT chain
//! needs Linux 5.2), and iptables otherwise; `iptables` uses the variant (legacy or nft) that
//! holds the node's kube-proxy rules, as kube-proxy and Istio do.

use std::collections::BTreeSet;

use crate::ipt::{self, BridgeL2, IptablesDataplane, Variant};
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
    /// iptables of this variant, with bridged pods' L2 rules where the second says.
    Iptables(Variant, BridgeL2),
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::Iptables(v, _) => v.name(),
        }
    }
}

/// What the node offers, asked only when a decision needs it.
pub struct Probes<N, V, B> {
    /// Does the kernel take the nftables ruleset?
    pub nftables_works: N,
    /// Which iptables variant holds kube-proxy's rules?
    pub detect_variant: V,
    /// Does the kernel take the nftables `bridge` table?
    pub nft_bridge_works: B,
}

/// The decision, from the settings (`bridge_l2`: `None` is auto) and the node's answers.
pub fn decide<N, V, B>(
    setting: Setting,
    bridge_l2: Option<BridgeL2>,
    probes: Probes<N, V, B>,
) -> Result<Backend, DataplaneError>
where
    N: FnOnce() -> bool,
    V: FnOnce() -> Result<Variant, DataplaneError>,
    B: FnOnce() -> bool,
{
    let variant = match setting {
        Setting::Nftables => return Ok(Backend::Nftables),
        Setting::Auto if (probes.nftables_works)() => return Ok(Backend::Nftables),
        Setting::Iptables(Some(v)) => v,
        Setting::Iptables(None) | Setting::Auto => (probes.detect_variant)()?,
    };
    let l2 = match bridge_l2 {
        Some(l2) => l2,
        None if (probes.nft_bridge_works)() => BridgeL2::Nftables,
        None => BridgeL2::Ebtables,
    };
    Ok(Backend::Iptables(variant, l2))
}

/// Does the kernel take the nftables ruleset?
pub fn nftables_works(params: &RulesetParams) -> bool {
    kernel_takes(params, "the nftables ruleset", NftDataplane::new)
}

/// Does the kernel take the nftables `bridge` table (the iptables backend's L2 rules)?
pub fn nft_bridge_works(params: &RulesetParams) -> bool {
    kernel_takes(
        params,
        "the nftables bridge table",
        NftDataplane::bridge_only,
    )
}

/// Installs the tables `open` makes under a scratch table name, removes them again, and
/// says whether the kernel took them.
fn kernel_takes(
    params: &RulesetParams,
    what: &str,
    open: fn(RulesetParams) -> Result<NftDataplane, DataplaneError>,
) -> bool {
    let probe = RulesetParams {
        table: format!("{}_probe", params.table),
        ..params.clone()
    };
    let result = open(probe).and_then(|mut dp| {
        let installed = dp.install(&BTreeSet::new());
        dp.uninstall()?;
        installed
    });
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(error = %e, "{what} is not usable here");
            false
        }
    }
}

/// Chooses the backend for the settings on this node.
pub fn choose(
    setting: Setting,
    bridge_l2: Option<BridgeL2>,
    params: &RulesetParams,
) -> Result<Backend, DataplaneError> {
    decide(
        setting,
        bridge_l2,
        Probes {
            nftables_works: || nftables_works(params),
            detect_variant: ipt::detect_variant,
            nft_bridge_works: || nft_bridge_works(params),
        },
    )
}

/// A dataplane of `backend` in the calling thread's network namespace.
pub fn open(backend: Backend, params: RulesetParams) -> Result<Box<dyn Dataplane>, DataplaneError> {
    Ok(match backend {
        Backend::Nftables => Box::new(NftDataplane::new(params)?),
        Backend::Iptables(v, l2) => Box::new(IptablesDataplane::new(params, v, l2)?),
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
        Backend::Iptables(v, l2) => {
            // With its L2 rules in the `bridge` table, this backend owns that table now:
            // only the `inet` one goes.
            let nft = match l2 {
                BridgeL2::Nftables => NftDataplane::inet_only(params.clone()),
                BridgeL2::Ebtables => NftDataplane::new(params.clone()),
            };
            if let Ok(mut nft) = nft {
                if nft.observe().is_ok_and(|o| o.present) {
                    note("nftables", nft.uninstall());
                }
            }
            if l2 == BridgeL2::Nftables && ipt::ebt::installed(&ipt::rules::Names::new(params)) {
                note(
                    "ebtables",
                    ipt::ebt::remove(&ipt::rules::Names::new(params)),
                );
            }
            for other in Variant::BOTH
                .into_iter()
                .filter(|o| *o != v && o.available())
            {
                match ipt::remove_rules(params, other) {
                    Ok(false) => {}
                    r => note(other.name(), r.map(drop)),
                }
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

    fn probes(
        nft: bool,
        variant: Variant,
        bridge: bool,
    ) -> Probes<
        impl FnOnce() -> bool,
        impl FnOnce() -> Result<Variant, DataplaneError>,
        impl FnOnce() -> bool,
    > {
        Probes {
            nftables_works: move || nft,
            detect_variant: move || Ok(variant),
            nft_bridge_works: move || bridge,
        }
    }

    #[test]
    fn settings_parse_and_decide() {
        use BridgeL2::{Ebtables as Eb, Nftables as Br};
        use Variant::*;
        // (setting, bridge L2 setting, nftables works, detected variant, bridge table works)
        //   -> backend
        let cases = [
            ("auto", None, true, Nft, true, Backend::Nftables),
            (
                "auto",
                None,
                false,
                Legacy,
                true,
                Backend::Iptables(Legacy, Br),
            ),
            ("auto", None, false, Nft, true, Backend::Iptables(Nft, Br)),
            (
                "auto",
                None,
                false,
                Legacy,
                false,
                Backend::Iptables(Legacy, Eb),
            ),
            ("nftables", None, false, Legacy, false, Backend::Nftables),
            (
                "iptables",
                None,
                true,
                Legacy,
                true,
                Backend::Iptables(Legacy, Br),
            ),
            (
                "iptables-nft",
                None,
                true,
                Legacy,
                true,
                Backend::Iptables(Nft, Br),
            ),
            (
                "iptables-legacy",
                Some(Eb),
                true,
                Nft,
                true,
                Backend::Iptables(Legacy, Eb),
            ),
            (
                "iptables-nft",
                Some(Br),
                true,
                Nft,
                false,
                Backend::Iptables(Nft, Br),
            ),
            ("nftables", Some(Eb), true, Nft, true, Backend::Nftables),
        ];
        for (text, l2, works, variant, bridge, want) in cases {
            let setting: Setting = text.parse().unwrap();
            assert_eq!(setting.as_str(), text);
            let got = decide(setting, l2, probes(works, variant, bridge)).unwrap();
            assert_eq!(
                got, want,
                "{text} {l2:?} nft={works} {variant:?} bridge={bridge}"
            );
        }
        assert!("ebpf"
            .parse::<Setting>()
            .unwrap_err()
            .contains("must be auto"));
        assert!("arptables"
            .parse::<BridgeL2>()
            .unwrap_err()
            .contains("must be auto"));
        // Without iptables tools, iptables cannot be chosen, and says why.
        let none = Probes {
            nftables_works: || false,
            detect_variant: || Err(DataplaneError::Rejected("no iptables tools found".into())),
            nft_bridge_works: || true,
        };
        assert!(decide(Setting::Auto, None, none).is_err());
        // nftables never asks for the variant or the bridge table.
        let never = Probes {
            nftables_works: || true,
            detect_variant: || -> Result<Variant, DataplaneError> { panic!("asked") },
            nft_bridge_works: || -> bool { panic!("asked") },
        };
        decide(Setting::Auto, None, never).unwrap();
        // A given bridge L2 is never probed.
        let given = Probes {
            nftables_works: || false,
            detect_variant: || Ok(Nft),
            nft_bridge_works: || -> bool { panic!("asked") },
        };
        decide(Setting::Auto, Some(Eb), given).unwrap();
        assert_eq!(Backend::Iptables(Nft, Br).name(), "iptables-nft");
    }

    /// Moving a node between backends keeps the bridged pods' L2 rules in place: the
    /// `bridge` table both write is never taken away by removing the other backend. (The
    /// first version of the bridge-table path removed it with the nftables tables right
    /// after installing it, and the cluster suites caught the pods' changes failing.)
    #[test]
    fn switching_backends_keeps_the_bridge_table() {
        use crate::nft::{pin_elements, pod_elements, Attachment, Element, Mac};
        use crate::testutil::in_fresh_netns;
        if !Variant::Nft.available() {
            eprintln!("iptables-nft not installed; skipped");
            return;
        }
        in_fresh_netns(|| {
            let params = RulesetParams::default();
            let bridge = Attachment::Bridged {
                veth: "vethsw1".into(),
                bridge: "cni0".into(),
                bridge_mac: Mac([2, 0, 0, 0, 0, 1]),
            };
            let mut pod = pod_elements(&bridge, &["10.63.0.2".parse().unwrap()]);
            pod.extend(pin_elements(&bridge, Some(Mac([0x0a, 0x58, 0, 0, 0, 2]))));
            let l2: BTreeSet<Element> =
                pod.iter().filter(|e| ipt::ebt::is_l2(e)).cloned().collect();
            let bridge_elements = || {
                let mut b = NftDataplane::bridge_only(params.clone()).unwrap();
                let o = b.observe().unwrap();
                o.present.then_some(o.elements)
            };
            let inet_present = || {
                let mut i = NftDataplane::inet_only(params.clone()).unwrap();
                i.observe().unwrap().present
            };

            // nftables -> iptables (its L2 in the bridge table).
            let mut nft = open(Backend::Nftables, params.clone()).unwrap();
            nft.install(&pod).unwrap();
            let to = Backend::Iptables(Variant::Nft, BridgeL2::Nftables);
            let mut ipt = open(to, params.clone()).unwrap();
            ipt.install(&pod).unwrap();
            assert_eq!(remove_others(to, &params), ["nftables"]);
            assert!(!inet_present(), "the inet table stays");
            assert_eq!(bridge_elements(), Some(l2.clone()), "the bridge table went");
            // A later pod change still finds its table.
            ipt.apply(&pod, &BTreeSet::new()).unwrap();
            assert_eq!(bridge_elements(), Some(BTreeSet::new()));
            ipt.apply(&BTreeSet::new(), &pod).unwrap();

            // iptables -> nftables.
            let mut nft = open(Backend::Nftables, params.clone()).unwrap();
            nft.install(&pod).unwrap();
            assert_eq!(remove_others(Backend::Nftables, &params), ["iptables"]);
            assert_eq!(nft.observe().unwrap().elements, pod);
            assert!(!ipt::installed(&params));

            // iptables with ebtables -> iptables with the bridge table: the ebtables chains go.
            let eb = Backend::Iptables(Variant::Nft, BridgeL2::Ebtables);
            let mut ipt = open(eb, params.clone()).unwrap();
            ipt.install(&pod).unwrap();
            assert_eq!(remove_others(eb, &params), ["nftables"]);
            assert_eq!(bridge_elements(), None);
            let names = ipt::rules::Names::new(&params);
            assert!(ipt::ebt::installed(&names));
            let mut ipt = open(to, params.clone()).unwrap();
            ipt.install(&pod).unwrap();
            assert_eq!(remove_others(to, &params), ["ebtables"]);
            assert!(!ipt::ebt::installed(&names));
            assert_eq!(bridge_elements(), Some(l2));

            remove_all(&params).unwrap();
            assert_eq!(bridge_elements(), None);
            assert!(!inet_present());
            assert!(!ipt::installed(&params));
        });
    }
}

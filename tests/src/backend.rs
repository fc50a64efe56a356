//! The agent's redirection backend under test, for the suites' backend matrix: the
//! `AMBIENT_TEST_BACKEND` environment variable (`nftables`, `iptables-nft`, `iptables-legacy`;
//! nftables when unset). Every agent the lab starts gets `--backend <it>`, the kube-proxy
//! stand-in is written in the same tool (kube-proxy's iptables mode next to an iptables
//! backend), and tests read and disturb the kernel's rules through these helpers instead of
//! naming one tool.

use std::fmt::Write as _;

use crate::netns::{NetNs, NetNsError};

pub const ENV: &str = "AMBIENT_TEST_BACKEND";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nftables,
    IptablesNft,
    IptablesLegacy,
}

/// The backend this test process runs against; panics on a value it does not know.
pub fn current() -> Backend {
    match std::env::var(ENV).as_deref() {
        Err(_) | Ok("") | Ok("nftables") => Backend::Nftables,
        Ok("iptables-nft") => Backend::IptablesNft,
        Ok("iptables-legacy") => Backend::IptablesLegacy,
        Ok(other) => panic!("{ENV}={other:?}: must be nftables, iptables-nft or iptables-legacy"),
    }
}

/// A kube-proxy-style Service: VIP:port DNATed to one of the endpoints.
#[derive(Debug, Clone)]
pub struct ServiceRule {
    pub vip: std::net::IpAddr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<std::net::IpAddr>,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nftables => "nftables",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }

    pub fn is_iptables(self) -> bool {
        self != Backend::Nftables
    }

    /// `node-agent run` flags selecting this backend. iptables-legacy runs take bridged
    /// pods' L2 rules to ebtables and iptables-nft runs to the nftables `bridge` table (the
    /// default wherever the kernel has it), so the matrix covers both places.
    pub fn agent_args(self) -> Vec<String> {
        let mut args = vec!["--backend".into(), self.name().into()];
        if self == Backend::IptablesLegacy {
            args.extend(["--bridge-l2".into(), "ebtables".into()]);
        }
        args
    }

    fn tool(self, v6: bool, what: &str) -> String {
        let base = if v6 { "ip6tables" } else { "iptables" };
        let kind = if self == Backend::IptablesLegacy {
            "legacy"
        } else {
            "nft"
        };
        format!("{base}-{kind}-{what}")
    }

    /// The kernel's list of captured (ambient) pod addresses of one family, as text.
    pub fn captured(self, ns: &NetNs, v6: bool) -> String {
        let fam = if v6 { "6" } else { "4" };
        match self {
            Backend::Nftables => ns
                .exec(
                    "nft",
                    &["list", "set", "inet", "ambient", &format!("pod_v{fam}")],
                )
                .unwrap_or_default(),
            _ => ns
                .exec("ipset", &["list", &format!("ambient-pod{fam}")])
                .unwrap_or_default(),
        }
    }

    /// [`Backend::captured`] as a sorted list of addresses.
    pub fn captured_list(self, ns: &NetNs, v6: bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .captured(ns, v6)
            .split(|c: char| c.is_whitespace() || c == ',' || c == '{' || c == '}')
            .filter(|t| t.parse::<std::net::IpAddr>().is_ok())
            .map(str::to_owned)
            .collect();
        out.sort();
        out
    }

    /// Removes every rule and set of the agent behind its back (drift).
    pub fn delete_everything(self, ns: &NetNs) -> Result<(), NetNsError> {
        match self {
            Backend::Nftables => ns
                .exec("nft", &["delete", "table", "inet", "ambient"])
                .map(drop),
            _ => {
                // Every rule of ours and every jump to it, in every table: what a careless
                // `iptables -F` leaves.
                for v6 in [false, true] {
                    let save = ns.exec(self.tool(v6, "save"), &[] as &[&str])?;
                    let mut script = String::new();
                    for line in save.lines() {
                        if line.starts_with('*') {
                            let _ = writeln!(script, "{line}");
                        } else if line == "COMMIT" {
                            script.push_str("COMMIT\n");
                        } else if let Some(rule) = line.strip_prefix("-A ") {
                            if rule.contains("AMBIENT") {
                                let _ = writeln!(script, "-D {rule}");
                            }
                        }
                    }
                    self.restore(ns, v6, &script)?;
                }
                Ok(())
            }
        }
    }

    fn restore(self, ns: &NetNs, v6: bool, script: &str) -> Result<(), NetNsError> {
        let path = std::env::temp_dir().join(format!(
            "rules-{}-{}-{}.txt",
            std::process::id(),
            ns.name(),
            u8::from(v6)
        ));
        std::fs::write(&path, script).expect("write rules");
        let r = ns.exec(
            "sh",
            &[
                "-c",
                &format!(
                    "{} --noflush < {}",
                    self.tool(v6, "restore"),
                    path.display()
                ),
            ],
        );
        let _ = std::fs::remove_file(&path);
        r.map(drop)
    }

    /// Removes one address from the captured set behind the agent's back.
    pub fn delete_captured(self, ns: &NetNs, ip: &str) -> Result<(), NetNsError> {
        match self {
            Backend::Nftables => ns
                .exec(
                    "nft",
                    &[
                        "delete",
                        "element",
                        "inet",
                        "ambient",
                        "pod_v4",
                        &format!("{{ {ip} }}"),
                    ],
                )
                .map(drop),
            _ => ns.exec("ipset", &["del", "ambient-pod4", ip]).map(drop),
        }
    }

    /// Every rule and set of every backend's tools in `ns`, for before/after comparisons.
    pub fn snapshot(ns: &NetNs) -> String {
        let mut out = ns.exec("nft", &["list", "ruleset"]).unwrap_or_default();
        for tool in [
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
            "ebtables-nft-save",
        ] {
            let text = ns.exec(tool, &[] as &[&str]).unwrap_or_default();
            // Tables with no rule are left out (the legacy kernel tables stay loaded once
            // used, empty, and mean nothing); timestamps and counters too.
            let mut block: Vec<String> = Vec::new();
            let mut rules = false;
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let line = match line.split_once(" [") {
                    Some((head, _)) if line.starts_with(':') => head,
                    _ => line,
                };
                if line.starts_with('*') {
                    block.clear();
                    rules = false;
                }
                rules |= line.starts_with("-A ");
                block.push(format!("{tool}: {line}"));
                if line == "COMMIT" && rules {
                    for l in &block {
                        let _ = writeln!(out, "{l}");
                    }
                }
            }
        }
        out.push_str(&ns.exec("ipset", &["list", "-n"]).unwrap_or_default());
        out
    }

    /// Applies a kube-proxy-style ruleset for `services` in this backend's tool: an nftables
    /// table at dstnat priority, or kube-proxy's iptables mode (`KUBE-SERVICES` in nat
    /// PREROUTING and OUTPUT, a chain per Service choosing an endpoint at random).
    pub fn apply_kube_proxy(
        self,
        ns: &NetNs,
        services: &[ServiceRule],
        dir: &std::path::Path,
    ) -> Result<(), NetNsError> {
        match self {
            Backend::Nftables => {
                let path = dir.join(format!("kube-proxy-{}.nft", ns.name()));
                std::fs::write(&path, render_nft(services)).expect("write the kube-proxy rules");
                ns.exec("nft", &[std::ffi::OsStr::new("-f"), path.as_os_str()])
                    .map(drop)
            }
            _ => {
                let save = ns.exec(self.tool(false, "save"), &["-t", "nat"])?;
                let jumps = !save.contains("-A PREROUTING -j KUBE-SERVICES");
                self.restore(ns, false, &render_iptables(services, jumps))
            }
        }
    }
}

/// kube-proxy's nftables-style stand-in.
pub fn render_nft(services: &[ServiceRule]) -> String {
    let mut chains = String::new();
    let mut dispatch = String::new();
    for (si, s) in services.iter().enumerate() {
        if s.endpoints.is_empty() {
            continue;
        }
        let n = s.endpoints.len();
        let map: Vec<String> = (0..n).map(|e| format!("{e} : jump svc{si}ep{e}")).collect();
        let _ = writeln!(
            dispatch,
            "    ip daddr {} tcp dport {} numgen random mod {n} vmap {{ {} }}",
            s.vip,
            s.port,
            map.join(", ")
        );
        for (e, ip) in s.endpoints.iter().enumerate() {
            let _ = write!(
                chains,
                "  chain svc{si}ep{e} {{\n    meta l4proto tcp dnat to {ip}:{}\n  }}\n",
                s.target_port
            );
        }
    }
    format!(
        "table ip kubelab {{}}\ndelete table ip kubelab\ntable ip kubelab {{\n  comment \"kube-proxy stand-in of the lab\"\n  chain services {{\n{dispatch}  }}\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}\n{chains}}}\n"
    )
}

/// kube-proxy's iptables mode, as `iptables-restore --noflush` input; `jumps` adds the
/// jumps from PREROUTING and OUTPUT (appended: an agent that started first stays first).
pub fn render_iptables(services: &[ServiceRule], jumps: bool) -> String {
    let mut decl = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for (si, s) in services.iter().enumerate() {
        if s.endpoints.is_empty() {
            continue;
        }
        let svc = format!("KUBE-SVC-LAB{si}");
        let _ = writeln!(decl, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j {svc}",
            s.vip, s.port
        );
        let n = s.endpoints.len();
        for (e, ip) in s.endpoints.iter().enumerate() {
            let sep = format!("KUBE-SEP-LAB{si}E{e}");
            let _ = writeln!(decl, ":{sep} - [0:0]");
            let left = n - e;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m statistic --mode random --probability {:.5} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(rules, "-A {svc} -j {sep}");
            }
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {ip}:{}",
                s.target_port
            );
        }
    }
    if jumps {
        rules.push_str("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n");
    }
    format!("{decl}{rules}COMMIT\n")
}

//! `prevResult`: the result of the plugins before this one. The plugin reads the interfaces
//! and IPs out of it, and prints it through unchanged except for its version: converted to the
//! configuration's `cniVersion` (0.3.x and 0.4.0 results carry `ips[].version`, 1.x results
//! do not). Every other field, known or not, is kept as given.

use std::net::IpAddr;

use ambient_common::net::Mac;
use ambient_common::IpPrefix;
use serde_json::{Map, Value};

use crate::version::CniVersion;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    #[error("prevResult must be a JSON object (a CNI result)")]
    NotObject,
    #[error("prevResult.{field}: {problem}")]
    Field { field: String, problem: String },
    #[error("prevResult has cniVersion {0:?}, which this plugin cannot convert (supported: {list})", list = CniVersion::supported().join(", "))]
    UnsupportedVersion(String),
}

fn bad(field: impl Into<String>, problem: impl Into<String>) -> ResultError {
    ResultError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// An entry of `prevResult.interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// The netns path for container-side interfaces; `None` (or empty in the JSON) for
    /// host-side ones.
    pub sandbox: Option<String>,
    /// `mac`, when the plugin that created the interface reported it.
    pub mac: Option<Mac>,
}

/// An entry of `prevResult.ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpPrefix,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// A validated `prevResult`, keeping the original JSON for printing.
#[derive(Debug, Clone, PartialEq)]
pub struct PrevResult {
    raw: Map<String, Value>,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
}

impl PrevResult {
    /// Validates the parts this plugin reads: `cniVersion` (if present), `interfaces[].name`,
    /// `interfaces[].sandbox`, `ips[].address`, `ips[].interface`.
    pub fn parse(value: &Value) -> Result<Self, ResultError> {
        let Value::Object(raw) = value else {
            return Err(ResultError::NotObject);
        };
        if let Some(v) = raw.get("cniVersion").filter(|v| !v.is_null()) {
            match v.as_str() {
                Some(s) if CniVersion::parse(s).is_some() => {}
                Some(s) => return Err(ResultError::UnsupportedVersion(s.to_owned())),
                None => return Err(bad("cniVersion", "must be a string")),
            }
        }
        if raw.contains_key("ip4") || raw.contains_key("ip6") {
            return Err(ResultError::UnsupportedVersion("0.2.0 (ip4/ip6)".into()));
        }
        let interfaces = list(raw, "interfaces")?
            .iter()
            .enumerate()
            .map(|(i, v)| parse_interface(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        let ips = list(raw, "ips")?
            .iter()
            .enumerate()
            .map(|(i, v)| parse_ip(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            raw: raw.clone(),
            interfaces,
            ips,
        })
    }

    /// Interfaces outside the container (no `sandbox`), in the order given.
    pub fn host_side(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces.iter().filter(|i| i.sandbox.is_none())
    }

    /// The MAC of the container interface `ifname`, when the result reports it.
    pub fn container_mac(&self, ifname: &str) -> Option<Mac> {
        self.interfaces
            .iter()
            .find(|i| i.name == ifname && i.sandbox.is_some())
            .and_then(|i| i.mac)
    }

    /// The pod's addresses: those attached to a sandbox interface, plus those that name no
    /// interface. An index that points nowhere is an error rather than a silently missed IP
    /// (a missed IP would be an uncaptured one).
    pub fn pod_ips(&self) -> Result<Vec<IpPrefix>, ResultError> {
        let mut out = Vec::new();
        for (i, ip) in self.ips.iter().enumerate() {
            match ip.interface {
                None => out.push(ip.address),
                Some(idx) => match self.interfaces.get(idx) {
                    Some(iface) if iface.sandbox.is_some() => out.push(ip.address),
                    Some(_) => {}
                    None => {
                        return Err(bad(
                            format!("ips[{i}].interface"),
                            format!(
                                "index {idx} is out of range ({} interfaces)",
                                self.interfaces.len()
                            ),
                        ))
                    }
                },
            }
        }
        Ok(out)
    }

    /// The result as this plugin prints it for a configuration at `version`.
    pub fn to_version(&self, version: CniVersion) -> Value {
        let mut out = self.raw.clone();
        out.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if let Some(Value::Array(ips)) = out.get_mut("ips") {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                if version.ips_carry_version() {
                    let family = ip
                        .get("address")
                        .and_then(Value::as_str)
                        .and_then(|a| a.parse::<IpPrefix>().ok())
                        .map(|p| match p.addr {
                            IpAddr::V4(_) => "4",
                            IpAddr::V6(_) => "6",
                        });
                    if let Some(family) = family {
                        ip.insert("version".into(), Value::String(family.into()));
                    }
                } else {
                    ip.remove("version");
                }
            }
        }
        Value::Object(out)
    }
}

fn list<'a>(raw: &'a Map<String, Value>, key: &str) -> Result<&'a [Value], ResultError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(bad(key, "must be a list")),
    }
}

fn parse_interface(i: usize, v: &Value) -> Result<Interface, ResultError> {
    let name = match v.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(bad(
                format!("interfaces[{i}].name"),
                "must be a non-empty string",
            ))
        }
    };
    let sandbox = match v.get("sandbox") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad(format!("interfaces[{i}].sandbox"), "must be a string")),
    };
    // Only the container side's MAC is read (it pins the pod's bridge port).
    let mac = match v.get("mac").filter(|_| sandbox.is_some()) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            s.parse::<Mac>()
                .map_err(|e| bad(format!("interfaces[{i}].mac"), e.to_string()))?,
        ),
        Some(_) => return Err(bad(format!("interfaces[{i}].mac"), "must be a string")),
    };
    Ok(Interface { name, sandbox, mac })
}

fn parse_ip(i: usize, v: &Value) -> Result<IpConfig, ResultError> {
    let address = match v.get("address") {
        Some(Value::String(s)) => s
            .parse::<IpPrefix>()
            .map_err(|e| bad(format!("ips[{i}].address"), e.to_string()))?,
        _ => {
            return Err(bad(
                format!("ips[{i}].address"),
                "must be a string like 10.0.0.2/24",
            ))
        }
    };
    let interface = match v.get("interface") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    bad(
                        format!("ips[{i}].interface"),
                        "must be a non-negative integer index into interfaces",
                    )
                })?,
        ),
    };
    Ok(IpConfig { address, interface })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn fixture(name: &str) -> Value {
        let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn reads_the_real_runtime_shapes() {
        for (name, host, ip) in [
            (
                "containerd-add",
                vec!["cni0", "vetha15f5011"],
                "10.244.77.2/24",
            ),
            (
                "podman-add-pod",
                vec!["cni-hpod0", "vethbc1381c6"],
                "10.244.78.6/24",
            ),
            (
                "cnitool-add-2",
                vec!["cni0", "vethe9efbdf2"],
                "10.244.77.4/24",
            ),
            (
                "cnitool-check",
                vec!["cni0", "vethe9efbdf2"],
                "10.244.77.4/24",
            ),
        ] {
            let f = fixture(name);
            let r = PrevResult::parse(&f["stdin"]["prevResult"]).unwrap();
            let names: Vec<&str> = r.host_side().map(|i| i.name.as_str()).collect();
            assert_eq!(names, host, "{name}");
            assert_eq!(r.pod_ips().unwrap(), vec![ip.parse().unwrap()], "{name}");
            // What the capturing plugin printed is what we print at the same version.
            if let Some(out) = f.get("stdout") {
                assert_eq!(r.to_version(CniVersion::V1_0_0), *out, "{name}");
            }
        }
    }

    #[test]
    fn converts_between_versions_keeping_other_fields() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1", "mac": "aa"}, {"name": "eth0", "sandbox": "/n", "mtu": 1400}],
            "ips": [
                {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
                {"address": "fd00::5/64", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {"nameservers": ["10.96.0.10"]},
            "custom": 7
        });
        let r = PrevResult::parse(&prev).unwrap();
        let old = r.to_version(CniVersion::V0_3_1);
        assert_eq!(old["cniVersion"], "0.3.1");
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][0]["gateway"], "10.1.0.1");
        assert_eq!(old["custom"], 7);
        assert_eq!(old["interfaces"], prev["interfaces"]);
        assert_eq!(old["dns"], prev["dns"]);
        // And back: the version keys go, everything else is as given.
        let back = PrevResult::parse(&old)
            .unwrap()
            .to_version(CniVersion::V1_1_0);
        let mut want = prev.clone();
        want["cniVersion"] = json!("1.1.0");
        assert_eq!(back, want);
        // Same version: identity.
        assert_eq!(r.to_version(CniVersion::V1_0_0), prev);
    }

    #[test]
    fn pod_ips_follow_the_interface_index() {
        let r = PrevResult::parse(&json!({
            "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/n"}],
            "ips": [
                {"address": "10.0.0.1/24", "interface": 0},
                {"address": "10.0.0.2/24", "interface": 1},
                {"address": "10.0.0.3/24"}
            ]
        }))
        .unwrap();
        let ips: Vec<String> = r.pod_ips().unwrap().iter().map(|p| p.to_string()).collect();
        assert_eq!(ips, ["10.0.0.2/24", "10.0.0.3/24"]);
        let r = PrevResult::parse(&json!({"ips": [{"address": "10.0.0.2/24", "interface": 3}]}))
            .unwrap();
        let err = r.pod_ips().unwrap_err().to_string();
        assert!(err.contains("prevResult.ips[0].interface"), "{err}");
    }

    #[test]
    fn bad_shapes_name_the_field() {
        for (v, field) in [
            (json!({"interfaces": {}}), "prevResult.interfaces"),
            (
                json!({"interfaces": [{"mac": "x"}]}),
                "prevResult.interfaces[0].name",
            ),
            (
                json!({"interfaces": [{"name": "a", "sandbox": 1}]}),
                "prevResult.interfaces[0].sandbox",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1"}]}),
                "prevResult.ips[0].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/8", "interface": -1}]}),
                "prevResult.ips[0].interface",
            ),
            (json!({"cniVersion": 3}), "prevResult.cniVersion"),
        ] {
            let err = PrevResult::parse(&v).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        assert!(matches!(
            PrevResult::parse(&json!({"cniVersion": "0.2.0"})),
            Err(ResultError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            PrevResult::parse(&json!({"ip4": {"ip": "10.0.0.1/8"}})),
            Err(ResultError::UnsupportedVersion(_))
        ));
    }

    proptest! {
        #[test]
        fn conversion_never_panics_and_round_trips(
            addrs in proptest::collection::vec((any::<u32>(), 0u8..=32, proptest::option::of(0usize..3)), 0..4),
            from in 0usize..5, to in 0usize..5,
        ) {
            let ips: Vec<Value> = addrs.iter().map(|(a, p, i)| {
                let mut o = json!({"address": format!("{}/{}", std::net::Ipv4Addr::from(*a), p)});
                if let Some(i) = i { o["interface"] = json!(i); }
                o
            }).collect();
            let v = json!({
                "cniVersion": CniVersion::ALL[from].as_str(),
                "interfaces": [{"name": "h"}, {"name": "eth0", "sandbox": "/n"}],
                "ips": ips,
            });
            let r = PrevResult::parse(&v).unwrap();
            let _ = r.pod_ips();
            let converted = r.to_version(CniVersion::ALL[to]);
            let again = PrevResult::parse(&converted).unwrap();
            prop_assert_eq!(again.to_version(CniVersion::ALL[to]), converted);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            if let Ok(v) = serde_json::from_str::<Value>(&s) {
                let _ = PrevResult::parse(&v);
            }
        }
    }
}

//! Pods that were running before the agent: installed into a running cluster, or created while
//! the agent was down (`agentUnreachable: allow`). No CNI ADD told the agent about them, but
//! the container runtime kept each attachment's ADD result: libcni (containerd, CRI-O) caches
//! it under `/var/lib/cni/results/<network>-<container id>-<ifname>` for CHECK and DEL. The
//! agent reads those files and enrols each pod as its ADD would have: the same key (so the
//! runtime's DEL and GC find it), the same host-interface discovery and IPs as the plugin
//! (`ambient_cni::discovery`, on the cached result), the same decision.
//!
//! Why the cache, not the node's routes, neighbour table and bridge forwarding database: those
//! are learned from pods' own frames before the agent pins anything, so a hostile pod could
//! have taught the node that another pod's IP lives behind its port, and would then be
//! enrolled with that pod's identity. The cache is written by the runtime, as root, from the
//! plugins' results.

use std::path::Path;

use ambient_cni::discovery::{host_interface, HostLinks};
use ambient_cni::result::PrevResult;
use ambient_cni::sys::SysError;
use ambient_common::agent_api::{Attachment, AttachmentKey, PodRef};
use ambient_common::net::Mac;
use serde::{Deserialize, Serialize};

/// How an attachment became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The runtime's CNI ADD, through the plugin.
    Cni,
    /// The runtime's cached ADD result (a pod running before the agent).
    CniCache,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cni => "cni",
            Self::CniCache => "cni_cache",
        }
    }
}

/// Why a cache file gives no attachment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("not a libcni cache file: {0}")]
    Format(String),
    #[error("no Kubernetes pod in its CNI_ARGS")]
    NotAPod,
    #[error("cached result: {0}")]
    Result(String),
    #[error("no host-side interface in the cached result ({0})")]
    NoHostInterface(String),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    kind: String,
    container_id: String,
    if_name: String,
    /// The pod's netns path (libcni 1.1 and later).
    #[serde(default)]
    netns: Option<String>,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    result: Option<serde_json::Value>,
}

/// The node's interfaces as discovery needs them: bridges from sysfs; nothing is read inside
/// a pod's namespace (the agent has no right to enter one), so only a result that names the
/// host interface itself is used.
struct Sysfs<'a>(&'a Path);

impl HostLinks for Sysfs<'_> {
    fn is_bridge(&self, name: &str) -> bool {
        self.0.join(name).join("bridge").exists()
    }

    fn veth_peer(&self, netns: &Path, _ifname: &str) -> Result<String, SysError> {
        Err(SysError::OpenNetns {
            path: netns.to_owned(),
            source: std::io::Error::other("the agent does not enter pod namespaces"),
        })
    }

    fn container_mac(&self, netns: &Path, _ifname: &str) -> Result<Mac, SysError> {
        self.veth_peer(netns, "").map(|_| Mac([0; 6]))
    }
}

/// The attachment a cache file describes, as the plugin would have reported it at ADD.
/// `sys_class_net` tells bridges from veths.
pub fn attachment(text: &str, sys_class_net: &Path) -> Result<Attachment, CacheError> {
    let f: CacheFile = serde_json::from_str(text).map_err(|e| CacheError::Format(e.to_string()))?;
    if f.kind != "cniCacheV1" {
        return Err(CacheError::Format(format!("kind {:?}", f.kind)));
    }
    let arg = |k: &str| {
        f.cni_args
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
        return Err(CacheError::NotAPod);
    };
    let raw = f
        .result
        .ok_or_else(|| CacheError::Result("missing".into()))?;
    let result = PrevResult::parse(&raw).map_err(|e| CacheError::Result(e.to_string()))?;
    let netns = result
        .interfaces
        .iter()
        .find(|i| i.name == f.if_name)
        .and_then(|i| i.sandbox.clone())
        .or(f.netns)
        .unwrap_or_default();
    let (host, _) = host_interface(&result, &netns, &f.if_name, &Sysfs(sys_class_net))
        .map_err(|e| CacheError::NoHostInterface(e.to_string()))?;
    Ok(Attachment {
        key: AttachmentKey {
            container_id: f.container_id,
            ifname: f.if_name.clone(),
        },
        pod: PodRef {
            namespace,
            name,
            uid: arg("K8S_POD_UID"),
        },
        netns,
        host_interface: host,
        ips: result
            .pod_ips()
            .map_err(|e| CacheError::Result(e.to_string()))?,
        mac: result.container_mac(&f.if_name),
    })
}

/// Every file of the cache directory with its text (none when the directory is absent).
pub fn read_cache_dir(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            let text = std::fs::read_to_string(&p).ok()?;
            Some((p, text))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cache(result: serde_json::Value, args: &[(&str, &str)]) -> String {
        json!({
            "kind": "cniCacheV1",
            "containerId": "c0ffee",
            "ifName": "eth0",
            "networkName": "k8s-pod-network",
            "config": "eyJ9",
            "cniArgs": args,
            "capabilityArgs": {},
            "result": result,
        })
        .to_string()
    }

    const POD: &[(&str, &str)] = &[
        ("K8S_POD_NAMESPACE", "shop"),
        ("K8S_POD_NAME", "web-1"),
        ("K8S_POD_UID", "uid-1"),
        ("IgnoreUnknown", "1"),
    ];

    fn bridge_result() -> serde_json::Value {
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "02:00:00:00:00:01"},
                {"name": "veth1234", "mac": "02:00:00:00:00:02"},
                {"name": "eth0", "mac": "b6:d3:6a:68:f2:4d", "sandbox": "/var/run/netns/cni-1"}
            ],
            "ips": [{"address": "10.244.1.7/24", "interface": 2, "gateway": "10.244.1.1"}],
        })
    }

    #[test]
    fn a_cached_add_result_is_the_attachment_the_plugin_would_report() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("cni0/bridge")).unwrap();
        let a = attachment(&cache(bridge_result(), POD), sys.path()).unwrap();
        assert_eq!(a.key.container_id, "c0ffee");
        assert_eq!(a.key.ifname, "eth0");
        assert_eq!(
            a.pod,
            PodRef {
                namespace: "shop".into(),
                name: "web-1".into(),
                uid: Some("uid-1".into())
            }
        );
        assert_eq!(a.host_interface, "veth1234");
        assert_eq!(a.netns, "/var/run/netns/cni-1");
        assert_eq!(a.ips, vec!["10.244.1.7/24".parse().unwrap()]);
        assert_eq!(a.mac, Some("b6:d3:6a:68:f2:4d".parse().unwrap()));

        // ptp: one host-side interface, no bridge.
        let ptp = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "vethab"}, {"name": "eth0", "sandbox": "/var/run/netns/x"}],
            "ips": [{"version": "4", "address": "10.1.2.3/32", "interface": 1}],
        });
        assert_eq!(
            attachment(&cache(ptp, POD), sys.path())
                .unwrap()
                .host_interface,
            "vethab"
        );
    }

    #[test]
    fn what_is_not_a_pods_attachment_is_an_error() {
        let sys = tempfile::tempdir().unwrap();
        // The bridge not known as one: two host-side candidates, and no namespace to enter.
        assert!(matches!(
            attachment(&cache(bridge_result(), POD), sys.path()),
            Err(CacheError::NoHostInterface(_))
        ));
        std::fs::create_dir_all(sys.path().join("cni0/bridge")).unwrap();
        let loopback = json!({
            "cniVersion": "0.3.1",
            "interfaces": [{"name": "lo", "sandbox": "/var/run/netns/x"}],
            "ips": [{"version": "4", "address": "127.0.0.1/8", "interface": 0}],
        });
        type Expect = fn(&CacheError) -> bool;
        let cases: Vec<(String, Expect)> = vec![
            ("not json".into(), |e| matches!(e, CacheError::Format(_))),
            (
                json!({"kind": "other", "containerId": "c", "ifName": "eth0"}).to_string(),
                |e| matches!(e, CacheError::Format(_)),
            ),
            (cache(bridge_result(), &[("IgnoreUnknown", "1")]), |e| {
                matches!(e, CacheError::NotAPod)
            }),
            (cache(json!("x"), POD), |e| {
                matches!(e, CacheError::Result(_))
            }),
            (cache(loopback, POD), |e| {
                matches!(e, CacheError::NoHostInterface(_))
            }),
        ];
        for (text, want) in cases {
            let e = attachment(&text, sys.path()).unwrap_err();
            assert!(want(&e), "{text}: {e:?}");
        }
    }
}

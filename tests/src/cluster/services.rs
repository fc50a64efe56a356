//! ClusterIP Services: [`ServiceDef`], its Service and EndpointSlice objects and its
//! kube-proxy-style DNAT rule (rendered by [`crate::backend`]), and the [`Cluster`] methods
//! that write them into the manifests and every node.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Cluster, ClusterError, ECHO_PORT};
use crate::netns::eventually;

/// A ClusterIP service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServiceDef {
    fn rule(&self) -> crate::backend::ServiceRule {
        crate::backend::ServiceRule {
            vip: self.vip.into(),
            port: self.port,
            target_port: self.target_port,
            endpoints: self.endpoints.iter().map(|a| (*a).into()).collect(),
        }
    }

    /// The Service (ClusterIP `vip`, one TCP port `tcp-echo`) and its EndpointSlice (every
    /// endpoint ready), as a manifest holds them.
    fn objects(&self) -> [Value; 2] {
        let (namespace, name) = (&self.namespace, &self.name);
        let svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace },
            "spec": {
                "clusterIP": self.vip.to_string(),
                "clusterIPs": [self.vip.to_string()],
                "ports": [{ "name": "tcp-echo", "port": self.port, "targetPort": self.target_port, "protocol": "TCP" }],
            },
        });
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{name}-lab"),
                "namespace": namespace,
                "labels": { "kubernetes.io/service-name": name },
            },
            "addressType": "IPv4",
            "endpoints": self.endpoints.iter().map(|ip| json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": true },
            })).collect::<Vec<_>>(),
            "ports": [{ "name": "tcp-echo", "port": self.target_port, "protocol": "TCP" }],
        });
        [svc, slice]
    }
}

impl Cluster {
    /// Adds a ClusterIP service: Service + EndpointSlice manifests, and kube-proxy-style DNAT
    /// rules (nat prerouting -100, nat output -100) in every node.
    pub fn add_service(
        &mut self,
        namespace: &str,
        name: &str,
        vip_host: u8,
        port: u16,
        endpoints: &[usize],
    ) -> Result<ServiceDef, ClusterError> {
        let def = ServiceDef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            vip: self.spec.addressing.vip(vip_host),
            port,
            target_port: ECHO_PORT,
            endpoints: endpoints.iter().map(|&i| self.pods[i].ip).collect(),
        };
        self.manifests
            .write(&format!("svc-{namespace}-{name}"), &def.objects())?;
        self.services.push(def.clone());
        self.apply_kube_proxy()?;
        Ok(def)
    }

    /// The kube-proxy stand-in's Services, as the backend module renders them.
    fn service_rules(&self) -> Vec<crate::backend::ServiceRule> {
        self.services.iter().map(ServiceDef::rule).collect()
    }

    /// Writes the kube-proxy stand-in's rules on every node, in the tool of the backend under
    /// test (nftables, or kube-proxy's iptables mode next to an iptables backend).
    fn apply_kube_proxy(&self) -> Result<(), ClusterError> {
        let rules = self.service_rules();
        for n in &self.nodes {
            crate::backend::current().apply_kube_proxy(n.ns(), &rules, self.root.path())?;
        }
        Ok(())
    }

    /// Waits until every ztunnel knows every service VIP.
    pub fn wait_services(&self, deadline: Duration) -> Result<(), String> {
        eventually(deadline, || {
            for n in &self.nodes {
                let dump = n.config_dump()?;
                let text = dump["services"].to_string();
                for s in &self.services {
                    if !text.contains(&s.vip.to_string()) {
                        return Err(format!("{}: service {} unknown", n.name, s.vip));
                    }
                }
            }
            Ok::<(), String>(())
        })
        .map(drop)
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{Addressing, ClusterSpec};
    use crate::cni::Attach;

    #[test]
    fn kube_proxy_rules_have_one_chain_per_endpoint() {
        // Rendering only; no kernel.
        let spec = ClusterSpec::new("t", 2, Attach::Bridge, Addressing::test(9));
        let svc = ServiceDef {
            namespace: "n".into(),
            name: "s".into(),
            vip: spec.addressing.vip(10),
            port: 80,
            target_port: 8080,
            endpoints: vec!["10.9.2.2".parse().unwrap(), "10.9.2.3".parse().unwrap()],
        };
        let c = crate::backend::render_nft(&[svc.rule()]);
        assert!(c.contains("ip daddr 10.9.250.10 tcp dport 80 numgen random mod 2 vmap { 0 : jump svc0ep0, 1 : jump svc0ep1 }"), "{c}");
        assert!(c.contains("dnat to 10.9.2.3:8080"));
        assert!(c.contains("priority dstnat"));
        let i = crate::backend::render_iptables(&[svc.rule()], true);
        assert!(
            i.contains(
                "-A KUBE-SERVICES -d 10.9.250.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-LAB0\n"
            ),
            "{i}"
        );
        assert!(i.contains("-A KUBE-SVC-LAB0 -m statistic --mode random --probability 0.50000 -j KUBE-SEP-LAB0E0\n-A KUBE-SEP-LAB0E0 -p tcp -m tcp -j DNAT --to-destination 10.9.2.2:8080\n-A KUBE-SVC-LAB0 -j KUBE-SEP-LAB0E1\n"), "{i}");
        assert!(i.ends_with("-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n"));
    }
}

//! The address plan of a cluster: [`Addressing`], which octets its pod ranges, its underlay
//! and its service VIPs use.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The address plan of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    /// First two octets of the pod ranges: node `i` gets `<a>.<b>.<i>.0/24`.
    pub pod: [u8; 2],
    /// First three octets of the underlay /24.
    pub underlay: [u8; 3],
    /// First three octets of the service VIP /24.
    pub service: [u8; 3],
}

impl Addressing {
    /// The lab's plan: pods `10.244.<node>.0/24`, underlay `172.31.254.0/24`, VIPs
    /// `10.244.250.0/24`.
    pub fn lab() -> Self {
        Self {
            pod: [10, 244],
            underlay: [172, 31, 254],
            service: [10, 244, 250],
        }
    }

    /// A test's plan inside `10.<octet>.0.0/16`: pods `10.<octet>.<node>.0/24`, underlay
    /// `10.<octet>.0.0/24`, VIPs `10.<octet>.250.0/24`.
    pub fn test(octet: u8) -> Self {
        Self {
            pod: [10, octet],
            underlay: [10, octet, 0],
            service: [10, octet, 250],
        }
    }

    pub fn pod_cidr(&self, node: usize) -> String {
        format!("{}.{}.{}.0/24", self.pod[0], self.pod[1], node)
    }

    pub fn underlay_ip(&self, node: usize) -> Ipv4Addr {
        let [a, b, c] = self.underlay;
        Ipv4Addr::new(a, b, c, node as u8)
    }

    pub fn vip(&self, host: u8) -> Ipv4Addr {
        let [a, b, c] = self.service;
        Ipv4Addr::new(a, b, c, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressing_plans() {
        let a = Addressing::test(71);
        assert_eq!(a.pod_cidr(2), "10.71.2.0/24");
        assert_eq!(a.underlay_ip(1), Ipv4Addr::new(10, 71, 0, 1));
        assert_eq!(a.vip(10), Ipv4Addr::new(10, 71, 250, 10));
        assert_eq!(Addressing::lab().pod_cidr(1), "10.244.1.0/24");
    }
}

//! Address types that are family-agnostic from the start (IPv4 and IPv6 alike).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address with its prefix length, as CNI results write it: `10.244.1.5/24`, `fd00::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIpPrefixError {
    #[error("{0:?} is not an address with a prefix length (like 10.0.0.2/24)")]
    Shape(String),
    #[error("{0:?} has an invalid address")]
    Address(String),
    #[error("{0:?} has a prefix length out of range for its family")]
    Prefix(String),
}

impl IpPrefix {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Self { addr, prefix })
    }
}

impl IpPrefix {
    /// Is `ip` inside this prefix (same family, same leading `prefix` bits)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpPrefix {
    type Err = ParseIpPrefixError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| ParseIpPrefixError::Shape(s.to_owned()))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| ParseIpPrefixError::Address(s.to_owned()))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| ParseIpPrefixError::Prefix(s.to_owned()))?;
        Self::new(addr, prefix).ok_or_else(|| ParseIpPrefixError::Prefix(s.to_owned()))
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC (EUI-48) address, written `02:00:0a:f4:01:05`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex octets separated by colons)")]
pub struct ParseMacError(pub String);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ParseMacError;
    fn from_str(s: &str) -> Result<Self, ParseMacError> {
        let bad = || ParseMacError(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.is_empty() || part.len() > 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_families() {
        let v4: IpPrefix = "10.244.1.5/24".parse().unwrap();
        assert_eq!(v4.to_string(), "10.244.1.5/24");
        let v6: IpPrefix = "fd00::5/64".parse().unwrap();
        assert_eq!(v6.prefix, 64);
        assert!("10.0.0.1/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0.1".parse::<IpPrefix>().is_err());
        assert!("x/3".parse::<IpPrefix>().is_err());
        assert!("fd00::1/129".parse::<IpPrefix>().is_err());
    }

    #[test]
    fn containment() {
        let p: IpPrefix = "10.244.0.0/16".parse().unwrap();
        assert!(p.contains("10.244.7.9".parse().unwrap()));
        assert!(!p.contains("10.245.0.1".parse().unwrap()));
        assert!(!p.contains("fd00::1".parse().unwrap()));
        let all: IpPrefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let host: IpPrefix = "fd00::5/128".parse().unwrap();
        assert!(host.contains("fd00::5".parse().unwrap()));
        assert!(!host.contains("fd00::6".parse().unwrap()));
    }

    #[test]
    fn every_prefix_of_a_valid_input_is_handled() {
        let s = "fd00:10:244::17/128";
        for end in 0..=s.len() {
            let _ = s[..end].parse::<IpPrefix>();
        }
    }
}

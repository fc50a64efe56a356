//! Workload identities (SPIFFE), the certificate provider behind a trait, the per-identity
//! certificate cache with rotation, and the rustls configurations that verify SPIFFE URI SANs
//! both ways.
//!
//! Layout: [`Identity`] here; `ca` holds the provider trait and the file-backed development
//! CA ([`FileCa`], [`ca_init`]); `issuer` the client of a remote issuer speaking Istio's
//! certificate API ([`IssuerClient`]); `manager` the cache ([`SecretManager`]); `tls` the
//! rustls glue.

mod ca;
mod issuer;
mod manager;
mod tls;

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

pub use ca::{
    ca_init, CaError, CaFiles, CertificateProvider, FileCa, IssueFuture, Roots, WorkloadCert,
};
pub use issuer::{
    split_chain, validate, IssuedChain, IssuerClient, IssuerError, IssuerSettings, TrustBundle,
    REQUEST_TIMEOUT,
};
pub use manager::{CertInfo, HeldCert, RootInfo, SecretError, SecretManager};
pub use tls::{
    client_config, crypto_provider, identities_in_cert, peer_identity, server_config, TlsError,
};

/// Errors parsing a SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE URI (want spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)")]
    Shape(String),
    #[error("{0:?} has an empty trust domain, namespace or service account")]
    Empty(String),
}

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The principal as Istio's AuthorizationPolicy writes it: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Shape(s.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if td.is_empty() || ns.is_empty() || sa.is_empty() {
                    return Err(IdentityError::Empty(s.to_owned()));
                }
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(IdentityError::Shape(s.to_owned())),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "shop", "web"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            "",
            "spiffe://",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://td/sa/a/ns/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = s.parse::<Identity>();
        }

        #[test]
        fn display_parses_back(td in "[a-z.]{1,12}", ns in "[a-z0-9-]{1,12}", sa in "[a-z0-9-]{1,12}") {
            let id = Identity::new(&td, &ns, &sa);
            prop_assert_eq!(id.to_string().parse::<Identity>().unwrap(), id);
        }
    }
}

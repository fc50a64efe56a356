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
mod record;
mod tls;

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

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`: the one SPIFFE type of the
/// mesh, shared with the issuer.
pub use ambient_common::spiffe::{SpiffeError as IdentityError, SpiffeId as Identity};

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

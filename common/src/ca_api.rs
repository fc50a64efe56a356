//! Istio's certificate API (`istio.v1.auth.IstioCertificateService`), generated from
//! `proto/ca.proto`: the contract between ztunnel and the issuer, and with Istio's own
//! ztunnel and istiod. Plus the names both sides must agree on.

#![allow(clippy::all, missing_docs, unreachable_pub)]

tonic::include_proto!("istio.v1.auth");

pub use prost_types;

/// The metadata key a node proxy sets to the SPIFFE URI of the workload it asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The gRPC request header carrying `Bearer <service-account token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The gRPC request header naming the caller's cluster (Istio's ztunnel sends it).
pub const CLUSTER_ID: &str = "clusterid";

/// The token audience the issuer requires, as Istio's ztunnel and istiod use it.
pub const TOKEN_AUDIENCE: &str = "istio-ca";

/// The request's impersonated identity, if the metadata carries one as a string.
pub fn impersonated_identity(req: &IstioCertificateRequest) -> Option<&str> {
    let v = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match v.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s),
        _ => None,
    }
}

/// Metadata asking for `identity` on a workload's behalf.
pub fn impersonating(identity: &str) -> prost_types::Struct {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        IMPERSONATED_IDENTITY.to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
        },
    );
    prost_types::Struct { fields }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn impersonation_round_trips_on_the_wire() {
        let req = IstioCertificateRequest {
            csr: "pem".into(),
            validity_duration: 3600,
            metadata: Some(impersonating("spiffe://td/ns/a/sa/b")),
        };
        let bytes = req.encode_to_vec();
        let back = IstioCertificateRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(impersonated_identity(&back), Some("spiffe://td/ns/a/sa/b"));
        let none = IstioCertificateRequest::default();
        assert_eq!(impersonated_identity(&none), None);
    }
}

//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, one crypto provider (ring) for
//! the whole process, and verifiers that check SPIFFE URI SANs rather than DNS names.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use super::{Identity, WorkloadCert};

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate carries no SPIFFE identity")]
    NoIdentity,
    #[error("peer presented {got:?}, expected {expected}")]
    WrongIdentity { expected: String, got: Vec<String> },
    #[error("peer identity {identity} is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("the trust bundle is unusable")]
    TrustBundle(#[source] rustls::Error),
    #[error("building a TLS configuration failed")]
    Config(#[source] rustls::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
}

/// The process-wide crypto provider. Every config here uses it explicitly: ring for the
/// handshake (key exchange, signatures, HKDF), AWS-LC for the AES-GCM record layer that
/// every relayed byte goes through (see [`super::record`]).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let ring = rustls::crypto::ring::default_provider();
            Arc::new(CryptoProvider {
                cipher_suites: super::record::with_aws_lc_records(&ring.cipher_suites),
                ..ring
            })
        })
        .clone()
}

/// All SPIFFE identities in a certificate's URI SANs.
pub fn identities_in_cert(der: &CertificateDer<'_>) -> Result<Vec<Identity>, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let mut out = Vec::new();
    if let Some(san) = san {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Ok(id) = uri.parse::<Identity>() {
                    out.push(id);
                }
            }
        }
    }
    Ok(out)
}

/// The identity of the peer of an established connection (first SPIFFE SAN of its leaf).
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identities_in_cert(leaf)?
        .into_iter()
        .next()
        .ok_or(TlsError::NoIdentity)
}

fn other(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(TlsError::TrustBundle)?;
    }
    Ok(store)
}

/// Server side of HBONE: presents `cert`, requires a client certificate chaining to `roots`
/// whose SPIFFE identity is in `trust_domain`.
pub fn server_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider.clone())
            .build()
            .map_err(|e| TlsError::TrustBundle(rustls::Error::General(e.to_string())))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side of HBONE: presents `cert`, accepts only a server chaining to `roots` whose
/// certificate carries `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &[CertificateDer<'static>],
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::TrustBundle(rustls::Error::General(e.to_string())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let verifier = Arc::new(SpiffeServerVerifier {
        anchors,
        expected: expected.clone(),
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let ids = identities_in_cert(end_entity).map_err(other)?;
        let id = ids.first().ok_or_else(|| other(TlsError::NoIdentity))?;
        if id.trust_domain != self.trust_domain {
            return Err(other(TlsError::ForeignTrustDomain {
                identity: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: Identity,
    algs: WebPkiSupportedAlgorithms,
}

pub(super) fn webpki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other_err => CertificateError::Other(OtherError(Arc::new(other_err))),
    };
    rustls::Error::InvalidCertificate(ce)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let ids = identities_in_cert(end_entity).map_err(other)?;
        if !ids.contains(&self.expected) {
            return Err(other(TlsError::WrongIdentity {
                expected: self.expected.to_string(),
                got: ids.iter().map(ToString::to_string).collect(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca_init, CertificateProvider, FileCa};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn ca(td: &str) -> (tempfile::TempDir, FileCa) {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(dir.path(), td, false).unwrap();
        let ca = FileCa::load(&files, td).unwrap();
        (dir, ca)
    }

    /// Runs one TLS handshake over loopback; returns the identities each side saw.
    async fn handshake(
        server_cert: &WorkloadCert,
        server_roots: &[CertificateDer<'static>],
        client_cert: &WorkloadCert,
        client_roots: &[CertificateDer<'static>],
        expected: &Identity,
    ) -> Result<(Identity, Identity), String> {
        let scfg = server_config(server_cert, server_roots, "cluster.local").unwrap();
        let ccfg = client_config(client_cert, client_roots, expected).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(scfg)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let id = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.ok();
            Ok::<_, String>(id)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let client = async {
            let mut tls = tokio_rustls::TlsConnector::from(ccfg)
                .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            let id = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(id)
        };
        let c = client.await;
        let s = server.await.unwrap();
        Ok((c?, s?))
    }

    #[tokio::test]
    async fn both_sides_learn_each_others_identity() {
        let (_d, ca) = ca("cluster.local");
        let a = Identity::new("cluster.local", "ns-a", "sa-a");
        let b = Identity::new("cluster.local", "ns-b", "sa-b");
        let ttl = Duration::from_secs(600);
        let ca_ = ca.issue_now(&a, ttl).unwrap();
        let cb = ca.issue_now(&b, ttl).unwrap();
        let roots = ca.trust_bundle().to_vec();
        let (server_seen_by_client, client_seen_by_server) =
            handshake(&cb, &roots, &ca_, &roots, &b).await.unwrap();
        assert_eq!(server_seen_by_client, b);
        assert_eq!(client_seen_by_server, a);
    }

    #[tokio::test]
    async fn wrong_server_identity_is_rejected() {
        let (_d, ca) = ca("cluster.local");
        let a = Identity::new("cluster.local", "ns-a", "sa-a");
        let b = Identity::new("cluster.local", "ns-b", "sa-b");
        let ttl = Duration::from_secs(600);
        let ca_ = ca.issue_now(&a, ttl).unwrap();
        let roots = ca.trust_bundle().to_vec();
        // The server presents a's certificate while the client expects b.
        let err = handshake(&ca_, &roots, &ca_, &roots, &b).await.unwrap_err();
        assert!(
            err.contains("WrongIdentity") && err.contains("ns-b"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_from_another_ca_or_trust_domain_is_rejected() {
        let (_d1, ca1) = ca("cluster.local");
        let (_d2, ca2) = ca("other.domain");
        let a = Identity::new("other.domain", "ns-a", "sa-a");
        let b = Identity::new("cluster.local", "ns-b", "sa-b");
        let ttl = Duration::from_secs(600);
        let foreign = ca2.issue_now(&a, ttl).unwrap();
        let server = ca1.issue_now(&b, ttl).unwrap();
        let roots1 = ca1.trust_bundle().to_vec();
        // The client trusts the server, but the server does not trust the client's CA.
        let err = handshake(&server, &roots1, &foreign, &roots1, &b)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
        // Same CA trusted by the server, but the identity's trust domain differs.
        let mut both = roots1.clone();
        both.extend(ca2.trust_bundle().iter().cloned());
        let err = handshake(&server, &both, &foreign, &roots1, &b)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }

    #[tokio::test]
    async fn expired_certificate_is_rejected() {
        let (_d, ca) = ca("cluster.local");
        let a = Identity::new("cluster.local", "ns-a", "sa-a");
        let b = Identity::new("cluster.local", "ns-b", "sa-b");
        // A one-second certificate (with the issuer's 60 s backdating) that has expired.
        let expired = ca.issue_now(&a, Duration::from_secs(1)).unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let server = ca.issue_now(&b, Duration::from_secs(600)).unwrap();
        let roots = ca.trust_bundle().to_vec();
        let err = handshake(&server, &roots, &expired, &roots, &b)
            .await
            .unwrap_err();
        assert!(!err.is_empty());
    }
}

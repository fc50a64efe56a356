//! A client of Istio's certificate API for tests and benchmarks: asks `ambient-issuer` (or
//! istiod) to sign a CSR, over TLS verified against the cluster's root, exactly as a node
//! proxy does (bearer token, `ImpersonatedIdentity`). Runs in whatever network namespace the
//! calling thread is in.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ambient_common::ca_api::istio_certificate_service_client::IstioCertificateServiceClient;
use ambient_common::ca_api::{self, IstioCertificateRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// What a request came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The response's chain: leaf first, the roots bundle last.
    Signed(Vec<String>),
    Refused {
        code: tonic::Code,
        message: String,
    },
    /// The connection or the TLS handshake failed.
    Failed(String),
}

impl Answer {
    pub fn is_signed(&self) -> bool {
        matches!(self, Answer::Signed(_))
    }

    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Answer::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// One certificate request.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub token: &'a str,
    /// The identity the CSR names.
    pub identity: &'a str,
    /// Set `ImpersonatedIdentity` to `identity` (a node proxy asking for a workload).
    pub impersonate: bool,
    pub ttl_secs: i64,
    /// A CSR made beforehand (benchmarks time the issuer, not the key generation); `None`:
    /// one is made for `identity`.
    pub csr: Option<&'a str>,
}

/// A CSR (PEM) for `identity` with a fresh P-256 key.
pub fn csr(identity: &str) -> String {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap_or_else(|e| panic!("key generation: {e}"));
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        identity
            .to_string()
            .try_into()
            .unwrap_or_else(|e| panic!("{identity}: {e}")),
    )];
    p.serialize_request(&kp)
        .and_then(|c| c.pem())
        .unwrap_or_else(|e| panic!("CSR: {e}"))
}

/// The URI SANs of a PEM certificate.
pub fn uri_sans(pem: &str) -> Vec<String> {
    let Ok(der) = CertificateDer::from_pem_slice(pem.as_bytes()) else {
        return Vec::new();
    };
    let Ok((_, x)) = x509_parser::parse_x509_certificate(&der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// A connected client; reuse it for many requests (one TLS connection, HTTP/2 streams).
pub struct Client {
    grpc: IstioCertificateServiceClient<
        tower::util::BoxCloneSyncService<
            http::Request<tonic::body::Body>,
            http::Response<hyper::body::Incoming>,
            hyper::Error,
        >,
    >,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("issuer::Client")
    }
}

impl Client {
    /// Connects to `addr`, verifying its certificate against the roots in `root_pem` for
    /// the name `server_name`.
    pub async fn connect(
        addr: SocketAddr,
        root_pem: &Path,
        server_name: &str,
    ) -> Result<Self, String> {
        let pem = std::fs::read(root_pem).map_err(|e| format!("{}: {e}", root_pem.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(c.map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
        let tcp =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connecting to {addr} timed out"))?
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
        // As ztunnel's: a request's HEADERS and DATA frames must not wait for an ACK.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr}: {e}"))?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP/2 with {addr}: {e}"))?;
        tokio::spawn(conn);
        let svc = tower::service_fn(move |req: http::Request<tonic::body::Body>| {
            let mut send = send.clone();
            async move { send.send_request(req).await }
        });
        let origin: http::Uri = format!("https://{addr}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        Ok(Self {
            grpc: IstioCertificateServiceClient::with_origin(
                tower::util::BoxCloneSyncService::new(svc),
                origin,
            ),
        })
    }

    /// Sends one request.
    pub async fn ask(&mut self, a: &Ask<'_>) -> Answer {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: a.csr.map_or_else(|| csr(a.identity), str::to_owned),
            validity_duration: a.ttl_secs,
            metadata: a.impersonate.then(|| ca_api::impersonating(a.identity)),
        });
        match format!("Bearer {}", a.token).parse() {
            Ok(v) => {
                req.metadata_mut().insert(ca_api::AUTHORIZATION, v);
            }
            Err(_) => return Answer::Failed("token is not a header value".into()),
        }
        match self.grpc.create_certificate(req).await {
            Ok(r) => Answer::Signed(r.into_inner().cert_chain),
            Err(s) => Answer::Refused {
                code: s.code(),
                message: s.message().to_owned(),
            },
        }
    }
}

/// Connects and asks once, on a runtime of its own (for tests on a plain thread).
pub fn ask_once(addr: SocketAddr, root_pem: &Path, server_name: &str, a: &Ask<'_>) -> Answer {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return Answer::Failed(e.to_string()),
    };
    rt.block_on(async {
        match Client::connect(addr, root_pem, server_name).await {
            Ok(mut c) => c.ask(a).await,
            Err(e) => Answer::Failed(e),
        }
    })
}

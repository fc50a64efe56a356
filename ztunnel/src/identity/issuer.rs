//! The remote certificate provider: Istio's certificate API
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, gRPC over TLS, port 15012), as
//! Istio's own ztunnel speaks it, so it works against the cluster issuer and against istiod.
//!
//! For each identity: a fresh ECDSA P-256 key, a CSR whose only SAN is the SPIFFE URI, a
//! request carrying `authorization: Bearer <node token>`, `clusterid` and the impersonated
//! identity in its metadata. The response's chain is leaf, intermediates, and last the roots
//! (several PEM certificates in one string during a root rotation); it is checked (identity,
//! key, not a CA, chains to a returned root) before it is accepted, and its roots become the
//! trust bundle.
//!
//! Transport: hyper's HTTP/2 client connection over tokio-rustls, wrapped as a tonic
//! `GrpcService` ([`Channel`]), reconnected lazily; tonic's `transport` feature is not used.

use ambient_common::sync::{Mutex, RwLock};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use ambient_common::ca_api::{
    impersonating, istio_certificate_service_client::IstioCertificateServiceClient,
    IstioCertificateRequest, AUTHORIZATION, CLUSTER_ID,
};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use x509_parser::extensions::GeneralName;

use super::ca::{CaError, CertificateProvider, IssueFuture, Roots, WorkloadCert};
use super::tls::{crypto_provider, webpki_error, ALPN_H2};
use super::Identity;
use crate::proxy::{SocketError, SocketFactory};

/// How long one certificate request may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed call as an [`IssuerError`]: the issuer's answer, or the transport error that kept
/// the request from reaching it.
fn status_error(status: tonic::Status) -> IssuerError {
    let transport = std::error::Error::source(&status)
        .and_then(|s| s.downcast_ref::<IssuerError>())
        .map(|e| ambient_common::error::chain(e));
    match transport {
        Some(chain) => IssuerError::Transport(chain),
        None => IssuerError::Refused {
            code: status.code(),
            message: status.message().to_owned(),
        },
    }
}

/// Errors talking to the issuer and checking what it returned.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("cannot read the issuer's root certificates {path} (--ca-root)")]
    ReadRoots {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} (--ca-root) holds no PEM certificate")]
    NoRoots { path: PathBuf },
    #[error("{path} (--ca-root) is not a valid PEM file")]
    RootsPem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot read the service-account token {path} (--ca-token; is the projected token mounted?)")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the service-account token {path} (--ca-token) is empty")]
    EmptyToken { path: PathBuf },
    #[error("the token or cluster id is not a valid header value")]
    Header(#[source] tonic::metadata::errors::InvalidMetadataValue),
    #[error("generating a key and CSR for {identity} failed")]
    Csr {
        identity: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot resolve the issuer {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the issuer {host} (is it running, and port {port} open?)")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: SocketError,
    },
    #[error("TLS to the issuer {host} failed (does --ca-root hold the root of its serving certificate, and does it carry the name --ca-server-name?)")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 to the issuer {host} failed")]
    Http2 {
        host: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the issuer did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the issuer refused: {code:?}: {message}")]
    Refused { code: tonic::Code, message: String },
    /// The request never reached the issuer (connection, TLS, HTTP/2): the transport's own
    /// error, unwrapped from the gRPC status tonic puts around it.
    #[error("{0}")]
    Transport(String),
    #[error("the issuer returned {0} certificate chain elements (want the leaf and the roots, at least 2)")]
    ShortChain(usize),
    #[error("element {element} of the returned chain is not valid PEM")]
    Pem {
        element: usize,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("element {element} of the returned chain holds no certificate")]
    EmptyElement { element: usize },
    #[error("the returned leaf is not valid X.509: {0}")]
    Parse(String),
    #[error("the returned leaf names {got:?}, not {expected}")]
    WrongIdentity { expected: String, got: Vec<String> },
    #[error("the returned leaf does not carry the key of the CSR")]
    WrongKey,
    #[error("the returned leaf is a CA certificate")]
    LeafIsCa,
    #[error("a returned root is not a usable trust anchor")]
    BadRoot(#[source] webpki::Error),
    #[error("the returned leaf does not chain to a returned root")]
    Untrusted(#[source] webpki::Error),
}

/// The roots peers must chain to, replaced as the issuer publishes new ones.
#[derive(Debug)]
pub struct TrustBundle(RwLock<Roots>);

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Self {
        Self(RwLock::new(Arc::new(roots)))
    }

    pub fn get(&self) -> Roots {
        self.0.read().clone()
    }

    pub fn set(&self, roots: Vec<CertificateDer<'static>>) {
        let mut cur = self.0.write();
        if **cur != roots {
            tracing::info!(roots = roots.len(), "trust bundle replaced by the issuer's");
            *cur = Arc::new(roots);
        }
    }
}

/// Where the issuer is and how to authenticate to it (from `--ca-*` flags).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuerSettings {
    /// As given, e.g. `https://ambient-issuer.ambient-system.svc:15012`.
    pub address: String,
    /// The address's host (an IPv6 address without brackets).
    pub host: String,
    pub port: u16,
    /// The name the serving certificate must carry (a DNS name or an IP address).
    pub server_name: String,
    /// PEM roots for the issuer's serving certificate.
    pub root: PathBuf,
    /// The service-account token file, re-read for every request.
    pub token: PathBuf,
    pub cluster_id: String,
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, IssuerError> {
    let bytes = std::fs::read(path).map_err(|source| IssuerError::ReadRoots {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| IssuerError::RootsPem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(IssuerError::NoRoots {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A response's chain: the leaf, the intermediates, the roots.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Splits `cert_chain` as Istio lays it out: element 0 the leaf, the last element the roots
/// (one or more PEM certificates), the ones between intermediates.
pub fn split_chain(chain: &[String]) -> Result<IssuedChain, IssuerError> {
    if chain.len() < 2 {
        return Err(IssuerError::ShortChain(chain.len()));
    }
    let parse = |element: usize| -> Result<Vec<CertificateDer<'static>>, IssuerError> {
        let certs = CertificateDer::pem_slice_iter(chain[element].as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| IssuerError::Pem { element, source })?;
        if certs.is_empty() {
            return Err(IssuerError::EmptyElement { element });
        }
        Ok(certs)
    };
    let mut first = parse(0)?;
    let leaf = first.remove(0);
    // Some CAs put the leaf's issuers after it in element 0.
    let mut intermediates = first;
    for element in 1..chain.len() - 1 {
        intermediates.extend(parse(element)?);
    }
    let roots = parse(chain.len() - 1)?;
    Ok(IssuedChain {
        leaf,
        intermediates,
        roots,
    })
}

/// Checks a returned chain before it is installed for `identity`: the leaf's URI SANs are
/// exactly the identity, its key is `public_key` (raw, as in the CSR), it is not a CA, and it
/// chains (for both TLS client and server use) to one of the returned roots. Returns the
/// leaf's validity (not before, not after).
pub fn validate(
    chain: &IssuedChain,
    identity: &Identity,
    public_key: &[u8],
    now: UnixTime,
) -> Result<(SystemTime, SystemTime), IssuerError> {
    let (_, x509) = x509_parser::parse_x509_certificate(&chain.leaf)
        .map_err(|e| IssuerError::Parse(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IssuerError::Parse(e.to_string()))?;
    let uris: Vec<String> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect();
    if uris != [identity.to_string()] {
        return Err(IssuerError::WrongIdentity {
            expected: identity.to_string(),
            got: uris,
        });
    }
    if x509.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(IssuerError::WrongKey);
    }
    let is_ca = x509
        .basic_constraints()
        .map_err(|e| IssuerError::Parse(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if is_ca {
        return Err(IssuerError::LeafIsCa);
    }
    let anchors = chain
        .roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).map_err(IssuerError::BadRoot))
        .collect::<Result<Vec<_>, _>>()?;
    let ee = webpki::EndEntityCert::try_from(&chain.leaf).map_err(IssuerError::Untrusted)?;
    let algs = crypto_provider().signature_verification_algorithms.all;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(algs, &anchors, &chain.intermediates, now, usage, None, None)
            .map_err(IssuerError::Untrusted)?;
    }
    let validity = x509.validity();
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        at(validity.not_before.timestamp()),
        at(validity.not_after.timestamp()),
    ))
}

/// Checks the issuer's serving certificate against the roots current at handshake time (the
/// trust bundle, which follows root rotations, and the `--ca-root` ones) and the server name.
#[derive(Debug)]
struct IssuerVerifier {
    bundle: Arc<TrustBundle>,
    pinned: Vec<CertificateDer<'static>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for IssuerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.get();
        let anchors: Vec<_> = bundle
            .iter()
            .chain(self.pinned.iter())
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        ee.verify_for_usage(
            self.algs.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        ee.verify_is_valid_for_subject_name(server_name)
            .map_err(webpki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
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

/// One HTTP/2 connection to the issuer, opened on first use and again once it is gone.
struct Connection {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    sockets: SocketFactory,
    current: tokio::sync::Mutex<Option<SendRequest<tonic::body::Body>>>,
}

impl Connection {
    async fn sender(&self) -> Result<SendRequest<tonic::body::Body>, IssuerError> {
        let mut cur = self.current.lock().await;
        if let Some(s) = cur.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *cur = None;
        let s = self.connect().await?;
        *cur = Some(s.clone());
        Ok(s)
    }

    async fn connect(&self) -> Result<SendRequest<tonic::body::Body>, IssuerError> {
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|source| IssuerError::Resolve {
                host: self.host.clone(),
                source,
            })?
            .collect();
        let mut tcp = Err(IssuerError::Resolve {
            host: self.host.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        });
        for addr in addrs {
            tcp = self
                .sockets
                .connect(addr)
                .await
                .map_err(|source| IssuerError::Connect {
                    host: self.host.clone(),
                    port: self.port,
                    source,
                });
            if tcp.is_ok() {
                break;
            }
        }
        let tls_err = |source| IssuerError::Tls {
            host: self.host.clone(),
            source,
        };
        let tls = tokio::time::timeout(
            self.sockets.connect_timeout,
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(self.server_name.clone(), tcp?),
        )
        .await
        .map_err(|_| {
            tls_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            ))
        })?
        .map_err(tls_err)?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|source| IssuerError::Http2 {
                    host: self.host.clone(),
                    source,
                })?;
        let host = self.host.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(issuer = %host, error = %e, "issuer connection ended");
            }
        });
        tracing::debug!(issuer = %self.host, "connected to the issuer");
        Ok(sender)
    }

    async fn forget(&self) {
        *self.current.lock().await = None;
    }
}

/// The issuer connection as a tonic `GrpcService`.
#[derive(Clone)]
pub struct Channel(Arc<Connection>);

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = IssuerError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move {
            let mut sender = conn.sender().await?;
            let h2_err = |source| IssuerError::Http2 {
                host: conn.host.clone(),
                source,
            };
            let r = match sender.ready().await {
                Ok(()) => sender.send_request(req).await.map_err(h2_err),
                Err(e) => Err(h2_err(e)),
            };
            if r.is_err() {
                conn.forget().await;
            }
            r
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Outcome {
    ok,
    error,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    result: Outcome,
}

/// Request counters, latency and health of the issuer.
#[derive(Debug)]
struct Health {
    requests: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    healthy: Gauge,
    last_error: Mutex<Option<String>>,
}

impl Health {
    fn new() -> Self {
        let healthy = Gauge::default();
        // Nothing has failed yet.
        healthy.set(1);
        Self {
            requests: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            healthy,
            last_error: Mutex::new(None),
        }
    }

    fn record(&self, started: Instant, result: Result<(), String>) {
        self.duration.observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() {
            Outcome::ok
        } else {
            Outcome::error
        };
        self.requests
            .get_or_create(&OutcomeLabels { result: outcome })
            .inc();
        self.healthy.set(i64::from(result.is_ok()));
        *self.last_error.lock() = result.err();
    }
}

/// A certificate provider asking a remote issuer (Istio's certificate API).
pub struct IssuerClient {
    settings: IssuerSettings,
    trust_domain: String,
    bundle: Arc<TrustBundle>,
    channel: Channel,
    origin: http::Uri,
    request_timeout: Duration,
    health: Health,
}

impl std::fmt::Debug for IssuerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerClient")
            .field("address", &self.settings.address)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl IssuerClient {
    /// Reads `--ca-root` (the first trust bundle); connects on the first request.
    pub fn new(
        settings: IssuerSettings,
        trust_domain: &str,
        sockets: SocketFactory,
        request_timeout: Duration,
    ) -> Result<Self, CaError> {
        let pinned = read_pem_certs(&settings.root).map_err(CaError::Issuer)?;
        let bundle = Arc::new(TrustBundle::new(pinned.clone()));
        let provider = crypto_provider();
        let verifier = Arc::new(IssuerVerifier {
            bundle: bundle.clone(),
            pinned,
            algs: provider.signature_verification_algorithms,
        });
        let mut tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CaError::IssuerTls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|e| CaError::IssuerTls(format!("{:?}: {e}", settings.server_name)))?;
        let authority = if settings.host.contains(':') {
            format!("[{}]:{}", settings.host, settings.port)
        } else {
            format!("{}:{}", settings.host, settings.port)
        };
        let origin = http::Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|e| CaError::IssuerTls(e.to_string()))?;
        let channel = Channel(Arc::new(Connection {
            host: settings.host.clone(),
            port: settings.port,
            server_name,
            tls: Arc::new(tls),
            sockets,
            current: tokio::sync::Mutex::new(None),
        }));
        Ok(Self {
            settings,
            trust_domain: trust_domain.to_owned(),
            bundle,
            channel,
            origin,
            request_timeout,
            health: Health::new(),
        })
    }

    /// Asks the issuer for a certificate for `identity` and checks what comes back.
    pub async fn request(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, IssuerError> {
        let uri = identity.to_string();
        let csr_err = |source| IssuerError::Csr {
            identity: uri.clone(),
            source,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into().map_err(csr_err)?)];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(csr_err)?;
        let token = read_token(&self.settings.token).await?;
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(impersonating(&uri)),
        });
        let md = req.metadata_mut();
        md.insert(
            AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .map_err(IssuerError::Header)?,
        );
        md.insert(
            CLUSTER_ID,
            self.settings
                .cluster_id
                .parse()
                .map_err(IssuerError::Header)?,
        );
        let mut client =
            IstioCertificateServiceClient::with_origin(self.channel.clone(), self.origin.clone());
        let issued_at = SystemTime::now();
        let resp = tokio::time::timeout(self.request_timeout, client.create_certificate(req))
            .await
            .map_err(|_| IssuerError::Timeout(self.request_timeout))?
            .map_err(status_error)?
            .into_inner();
        let chain = split_chain(&resp.cert_chain)?;
        let (not_before, not_after) =
            validate(&chain, identity, key.public_key_raw(), UnixTime::now())?;
        self.bundle.set(chain.roots);
        let mut certs = vec![chain.leaf];
        certs.extend(chain.intermediates);
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: certs,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            issued_at,
        })
    }
}

async fn read_token(path: &Path) -> Result<String, IssuerError> {
    let raw = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| IssuerError::Token {
            path: path.to_owned(),
            source,
        })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(IssuerError::EmptyToken {
            path: path.to_owned(),
        });
    }
    Ok(token.to_owned())
}

impl CertificateProvider for IssuerClient {
    fn issue(&self, identity: &Identity, ttl: Duration) -> IssueFuture<'_> {
        let identity = identity.clone();
        Box::pin(async move {
            if identity.trust_domain != self.trust_domain {
                return Err(CaError::ForeignTrustDomain {
                    identity: identity.to_string(),
                    trust_domain: self.trust_domain.clone(),
                });
            }
            let started = Instant::now();
            let r = self.request(&identity, ttl).await;
            self.health.record(
                started,
                r.as_ref()
                    .map(|_| ())
                    .map_err(|e| ambient_common::error::chain(e)),
            );
            r.map_err(CaError::Issuer)
        })
    }

    fn trust_bundle(&self) -> Roots {
        self.bundle.get()
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn last_error(&self) -> Option<String> {
        self.health.last_error.lock().clone()
    }

    fn register_metrics(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("ztunnel");
        sub.register(
            "ca_requests",
            "Certificate requests to the issuer, by result",
            self.health.requests.clone(),
        );
        sub.register(
            "ca_request_duration_seconds",
            "Duration of certificate requests to the issuer",
            self.health.duration.clone(),
        );
        sub.register(
            "ca_healthy",
            "1 while the latest certificate request to the issuer succeeded, 0 after a failure",
            self.health.healthy.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer};

    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn root(name: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(ca: &TestCa, uris: &[&str], key: &KeyPair, is_ca: bool) -> String {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if is_ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        params.signed_by(key, &ca.issuer).unwrap().pem()
    }

    fn id() -> Identity {
        Identity::new("cluster.local", "shop", "web")
    }

    #[test]
    fn split_chain_follows_istios_layout() {
        let (a, b, c) = (root("a"), root("b"), root("c"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let l = leaf(&a, &["spiffe://cluster.local/ns/shop/sa/web"], &key, false);
        // (chain, intermediates, roots) or the error's text.
        type Case = (Vec<String>, Result<(usize, usize), &'static str>);
        let cases: Vec<Case> = vec![
            (vec![], Err("0 certificate chain elements")),
            (vec![l.clone()], Err("1 certificate chain elements")),
            (vec![l.clone(), a.pem.clone()], Ok((0, 1))),
            (vec![l.clone(), format!("{}{}", a.pem, b.pem)], Ok((0, 2))),
            (
                vec![l.clone(), b.pem.clone(), c.pem.clone(), a.pem.clone()],
                Ok((2, 1)),
            ),
            (vec![format!("{l}{}", b.pem), a.pem.clone()], Ok((1, 1))),
            (vec![l.clone(), String::new()], Err("element 1")),
            (vec!["junk".into(), a.pem.clone()], Err("element 0")),
        ];
        for (chain, want) in cases {
            let got = split_chain(&chain);
            match (got, want) {
                (Ok(c), Ok((inter, roots))) => {
                    assert_eq!((c.intermediates.len(), c.roots.len()), (inter, roots));
                    assert_eq!(
                        c.leaf,
                        CertificateDer::from_pem_slice(l.as_bytes()).unwrap()
                    );
                }
                (Err(e), Err(text)) => assert!(e.to_string().contains(text), "{e}"),
                (got, want) => panic!("{} elements: got {got:?}, want {want:?}", chain.len()),
            }
        }
    }

    #[test]
    fn validate_refuses_what_must_not_be_installed() {
        let (ca, other) = (root("workload ca"), root("unknown"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let stranger = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let cases: Vec<(&str, Vec<String>, Option<&str>)> = vec![
            (
                "good",
                vec![leaf(&ca, &[me], &key, false), ca.pem.clone()],
                None,
            ),
            (
                "good, new root among two",
                vec![
                    leaf(&ca, &[me], &key, false),
                    format!("{}{}", other.pem, ca.pem),
                ],
                None,
            ),
            (
                "wrong identity",
                vec![
                    leaf(
                        &ca,
                        &["spiffe://cluster.local/ns/shop/sa/admin"],
                        &key,
                        false,
                    ),
                    ca.pem.clone(),
                ],
                Some("not spiffe://cluster.local/ns/shop/sa/web"),
            ),
            (
                "an extra identity",
                vec![
                    leaf(
                        &ca,
                        &[me, "spiffe://cluster.local/ns/shop/sa/admin"],
                        &key,
                        false,
                    ),
                    ca.pem.clone(),
                ],
                Some("names"),
            ),
            (
                "no identity",
                vec![leaf(&ca, &[], &key, false), ca.pem.clone()],
                Some("names []"),
            ),
            (
                "someone else's key",
                vec![leaf(&ca, &[me], &stranger, false), ca.pem.clone()],
                Some("key of the CSR"),
            ),
            (
                "a CA leaf",
                vec![leaf(&ca, &[me], &key, true), ca.pem.clone()],
                Some("is a CA"),
            ),
            (
                "chains to an unknown root",
                vec![leaf(&other, &[me], &key, false), ca.pem.clone()],
                Some("does not chain"),
            ),
        ];
        for (name, chain, want) in cases {
            let r = split_chain(&chain)
                .and_then(|c| validate(&c, &id(), key.public_key_raw(), UnixTime::now()));
            match (r, want) {
                (Ok((nb, na)), None) => assert!(nb < na, "{name}"),
                (Err(e), Some(text)) => assert!(e.to_string().contains(text), "{name}: {e}"),
                (r, want) => panic!("{name}: got {r:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn trust_bundle_is_replaced_not_mutated() {
        let (a, b) = (root("a"), root("b"));
        let der = |p: &str| CertificateDer::from_pem_slice(p.as_bytes()).unwrap();
        let bundle = TrustBundle::new(vec![der(&a.pem)]);
        let before = bundle.get();
        bundle.set(vec![der(&a.pem), der(&b.pem)]);
        assert_eq!(before.len(), 1, "a snapshot never changes");
        assert_eq!(bundle.get().len(), 2);
    }
}

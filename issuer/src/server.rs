//! The running issuer: Istio's `IstioCertificateService` over TLS (gRPC on HTTP/2), the CA
//! directory reloader, and the `/metrics` and `/ready` endpoints.

use ambient_common::sync::RwLock;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambient_common::ca_api::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ambient_common::ca_api::{self, IstioCertificateRequest, IstioCertificateResponse};
use ambient_common::spiffe::SpiffeId;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::auth::{bearer, Authenticator};
use crate::authz::{decide, Policy, Refusal};
use crate::ca::{check_csr, dir_stamp, CaError, Signer};
use crate::config::Config;
use crate::metrics::{KindLabel, Metrics, ResultLabel};
use crate::pods::Pods;

/// Largest request the issuer decodes (a CSR is under 1 KiB).
const MAX_REQUEST: usize = 64 * 1024;
/// TLS handshakes that take longer are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Lifetime of the issuer's own serving certificate (renewed at half-life).
const SERVING_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What every request handler shares.
pub struct Issuer {
    pub cfg: Config,
    policy: Policy,
    signer: RwLock<Arc<Signer>>,
    auth: Box<dyn Authenticator>,
    pub pods: Pods,
    pub metrics: Metrics,
    serving: RwLock<Option<(Arc<CertifiedKey>, SystemTime)>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("trust_domain", &self.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

fn refused(metrics: &Metrics, reason: &'static str, status: Status) -> Status {
    metrics.refuse(reason);
    status
}

impl Issuer {
    pub fn new(
        cfg: Config,
        auth: Box<dyn Authenticator>,
        pods: Pods,
    ) -> Result<Arc<Self>, CaError> {
        let signer = Signer::load(&cfg.ca_dir, &cfg.trust_domain)?;
        let metrics = Metrics::default();
        metrics.roots.set(signer.roots.len() as i64);
        let issuer = Arc::new(Self {
            policy: Policy {
                trust_domain: cfg.trust_domain.clone(),
                node_proxies: cfg.node_proxies.clone(),
            },
            signer: RwLock::new(Arc::new(signer)),
            auth,
            pods,
            metrics,
            serving: RwLock::new(None),
            cfg,
        });
        issuer.renew_serving()?;
        Ok(issuer)
    }

    pub fn signer(&self) -> Arc<Signer> {
        self.signer.read().clone()
    }

    fn renew_serving(&self) -> Result<(), CaError> {
        let signer = self.signer();
        let (chain, key) =
            signer.serving(&self.cfg.serving_dns, &self.cfg.serving_ip, SERVING_TTL)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| CaError::Sign(format!("serving key: {e}")))?;
        let ck = Arc::new(CertifiedKey::new(chain, signing));
        *self.serving.write() = Some((ck, SystemTime::now()));
        Ok(())
    }

    /// Reloads the CA directory if its files changed (keeping the old CA if the new files do
    /// not load), and renews the serving certificate when it changed or is past half-life.
    pub fn reload_if_changed(&self, last: &mut Option<Vec<SystemTime>>) {
        let stamp = dir_stamp(&self.cfg.ca_dir);
        let changed = stamp.is_some() && stamp != *last;
        if changed {
            match Signer::load(&self.cfg.ca_dir, &self.cfg.trust_domain) {
                Ok(s) => {
                    tracing::info!(
                        signing = %s.fingerprint,
                        roots = s.roots.len(),
                        "CA directory loaded"
                    );
                    self.metrics.roots.set(s.roots.len() as i64);
                    *self.signer.write() = Arc::new(s);
                    self.metrics
                        .reloads
                        .get_or_create(&ResultLabel { result: "ok" })
                        .inc();
                    *last = stamp;
                    if let Err(e) = self.renew_serving() {
                        tracing::error!(error = %e, "cannot renew the serving certificate");
                    }
                }
                Err(e) => {
                    // Files written one at a time are briefly inconsistent: retried next tick.
                    tracing::warn!(error = %e, "CA directory changed but does not load; keeping the previous CA");
                    self.metrics
                        .reloads
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                }
            }
        }
        let stale = self
            .serving
            .read()
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed().unwrap_or_default() > SERVING_TTL / 2);
        if stale {
            if let Err(e) = self.renew_serving() {
                tracing::error!(error = %e, "cannot renew the serving certificate");
            }
        }
    }

    /// Decides, waiting up to `pod_wait` for the pod view when that could change the answer.
    async fn authorize(
        &self,
        caller: &crate::authz::Caller,
        requested: &SpiffeId,
        impersonated: bool,
    ) -> Result<(), Refusal> {
        let deadline = tokio::time::Instant::now() + self.cfg.pod_wait;
        let mut changes = self.pods.subscribe();
        loop {
            let verdict = decide(&self.policy, caller, requested, impersonated, &self.pods);
            match verdict {
                Err(r) if (r.may_resolve() || !self.pods.is_synced()) => {
                    match tokio::time::timeout_at(deadline, changes.changed()).await {
                        Ok(Ok(())) => continue,
                        _ => return Err(r),
                    }
                }
                v => return v,
            }
        }
    }

    async fn create(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<IstioCertificateResponse, Status> {
        let m = &self.metrics;
        let header = req
            .metadata()
            .get(ca_api::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = bearer(header)
            .map_err(|e| refused(m, e.reason(), Status::unauthenticated(e.to_string())))?;
        let caller = self.auth.authenticate(token).await.map_err(|e| {
            let status = match e {
                crate::auth::AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
                _ => Status::unauthenticated(e.to_string()),
            };
            refused(m, e.reason(), status)
        })?;
        let msg = req.into_inner();
        let (requested, impersonated) = match ca_api::impersonated_identity(&msg) {
            Some(s) => {
                let id: SpiffeId =
                    s.parse()
                        .map_err(|e: ambient_common::spiffe::SpiffeError| {
                            refused(
                                m,
                                "bad_identity",
                                Status::invalid_argument(format!("ImpersonatedIdentity: {e}")),
                            )
                        })?;
                (id, true)
            }
            None => (
                SpiffeId::new(
                    &self.cfg.trust_domain,
                    &caller.service_account.namespace,
                    &caller.service_account.name,
                ),
                false,
            ),
        };
        let csr = check_csr(&msg.csr, &requested)
            .map_err(|e| refused(m, e.reason(), Status::invalid_argument(e.to_string())))?;
        if let Err(r) = self.authorize(&caller, &requested, impersonated).await {
            tracing::warn!(
                caller = %caller.service_account,
                pod = ?caller.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                node = ?caller.node,
                requested = %requested,
                reason = r.reason(),
                "certificate request refused: {r}"
            );
            return Err(refused(
                m,
                r.reason(),
                Status::permission_denied(r.to_string()),
            ));
        }
        let max = self.cfg.max_cert_ttl;
        let ttl = match u64::try_from(msg.validity_duration) {
            Ok(s) if s > 0 => Duration::from_secs(s).min(max),
            _ => max,
        };
        let chain = self
            .signer()
            .sign(&csr, &requested, ttl)
            .map_err(|e| refused(m, "sign_failed", Status::internal(e.to_string())))?;
        m.issued
            .get_or_create(&KindLabel {
                kind: if impersonated { "impersonated" } else { "own" },
            })
            .inc();
        tracing::info!(
            caller = %caller.service_account,
            node = ?caller.node,
            identity = %requested,
            ttl_secs = ttl.as_secs(),
            "certificate issued"
        );
        Ok(IstioCertificateResponse { cert_chain: chain })
    }

    /// What `/ready` reports.
    pub fn ready(&self) -> (bool, serde_json::Value) {
        let s = self.signer();
        let synced = self.pods.is_synced();
        (
            synced,
            serde_json::json!({
                "ready": synced,
                "pods_synced": synced,
                "pods": self.pods.len(),
                "signing_certificate_sha256": s.fingerprint,
                "trust_roots": s.roots.len(),
                "trust_domain": s.trust_domain,
            }),
        )
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct CaService(pub Arc<Issuer>);

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let start = Instant::now();
        let r = self.0.create(request).await;
        self.0
            .metrics
            .duration
            .observe(start.elapsed().as_secs_f64());
        r.map(Response::new)
    }
}

#[derive(Debug)]
struct Resolver(Arc<Issuer>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.serving.read().as_ref().map(|(k, _)| k.clone())
    }
}

/// The TLS configuration of the gRPC listener: the current serving certificate, HTTP/2 only.
pub fn tls_config(issuer: &Arc<Issuer>) -> Arc<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(issuer.clone())))
    })
    .unwrap_or_else(|_| unreachable_config());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[allow(clippy::panic)]
fn unreachable_config() -> rustls::ServerConfig {
    // ring supports the default protocol versions; this cannot fail.
    panic!("rustls rejected its own default protocol versions")
}

/// Serves gRPC on `listener` until the task is dropped.
pub async fn serve_grpc(listener: TcpListener, issuer: Arc<Issuer>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&issuer));
    let svc = IstioCertificateServiceServer::new(CaService(issuer.clone()))
        .max_decoding_message_size(MAX_REQUEST);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ambient_common::serve::AcceptBackoff::default();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = ambient_common::serve::accept(&listener, &mut backoff, "grpc").await;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(svc);
            let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            b.max_concurrent_streams(256)
                .keep_alive_interval(Some(Duration::from_secs(60)))
                .keep_alive_timeout(Duration::from_secs(20))
                .timer(hyper_util::rt::TokioTimer::new());
            if let Err(e) = b.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Serves `/metrics` and `/ready` on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, issuer: Arc<Issuer>, registry: Arc<Registry>) {
    let route = move |path: &str| route(path, &issuer, &registry);
    ambient_common::http::serve(listener, "http", Arc::new(route)).await
}

fn route(path: &str, issuer: &Issuer, registry: &Registry) -> ambient_common::http::Reply {
    match path {
        "/metrics" => {
            issuer.metrics.pods.set(issuer.pods.len() as i64);
            ambient_common::http::metrics(registry)
        }
        "/ready" => {
            let (ok, body) = issuer.ready();
            let status = if ok {
                http::StatusCode::OK
            } else {
                http::StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", format!("{body:#}\n"))
        }
        _ => ambient_common::http::not_found(),
    }
}

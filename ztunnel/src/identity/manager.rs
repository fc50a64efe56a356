//! The certificate cache: one certificate per local identity, issued on demand or ahead of
//! time (when the node agent announces a workload), rotated at half-life, forgotten when no
//! local workload uses the identity any more. A failed rotation keeps the held certificate
//! (it serves until it expires) and is retried with backoff.

use ambient_common::sync::{Mutex, RwLock};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;

use super::ca::{CaError, CertificateProvider, Roots, WorkloadCert};
use super::tls::{client_config, server_config, TlsError};
use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("issuing a certificate for {identity} failed")]
    Issue {
        identity: String,
        #[source]
        source: CaError,
    },
    #[error("building TLS configuration for {identity} failed")]
    Tls {
        identity: String,
        #[source]
        source: TlsError,
    },
}

/// Shortest and longest wait before retrying a failed rotation.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// A held certificate with the TLS configurations derived from it. Both sides verify peers
/// against the trust bundle as it was when the certificate was issued (`roots`); rotation at
/// half-life picks up a newer bundle.
#[derive(Debug)]
pub struct HeldCert {
    pub cert: WorkloadCert,
    pub server: Arc<ServerConfig>,
    pub roots: Roots,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl HeldCert {
    /// Client configuration presenting this certificate and expecting `peer`.
    pub fn client_for(&self, peer: &Identity) -> Result<Arc<ClientConfig>, SecretError> {
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(peer) {
            return Ok(c.clone());
        }
        let cfg =
            client_config(&self.cert, &self.roots, peer).map_err(|source| SecretError::Tls {
                identity: self.cert.identity.to_string(),
                source,
            })?;
        clients.insert(peer.clone(), cfg.clone());
        Ok(cfg)
    }
}

/// What `/config_dump` shows about a certificate.
#[derive(Debug, Clone, Serialize)]
pub struct CertInfo {
    pub identity: Identity,
    pub not_before_unix: u64,
    pub not_after_unix: u64,
    pub expires_in_seconds: i64,
    /// When this ztunnel received it.
    pub issued_unix: u64,
    /// The leaf's issuer (which CA signed it).
    pub issuer: String,
    /// The roots its TLS configurations trust (the bundle when it was issued).
    pub trust_roots: usize,
}

/// What `/config_dump` shows about a root of the trust bundle.
#[derive(Debug, Clone, Serialize)]
pub struct RootInfo {
    pub subject: String,
    /// SHA-256 of the DER certificate, hex.
    pub sha256: String,
}

impl RootInfo {
    pub fn of(der: &CertificateDer<'_>) -> Self {
        let subject = x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_else(|e| format!("(unparsable: {e})"));
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Self { subject, sha256 }
    }
}

/// A failed rotation: when to try again, and how many attempts failed in a row.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: SystemTime,
    failures: u32,
}

pub struct SecretManager {
    provider: Arc<dyn CertificateProvider>,
    ttl: Duration,
    certs: RwLock<HashMap<Identity, Arc<HeldCert>>>,
    retries: Mutex<HashMap<Identity, Retry>>,
    issuing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretManager")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SecretManager {
    pub fn new(provider: Arc<dyn CertificateProvider>, ttl: Duration) -> Self {
        Self {
            provider,
            ttl,
            certs: RwLock::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
            issuing: tokio::sync::Mutex::new(()),
        }
    }

    /// The provider's trust bundle now.
    pub fn trust_bundle(&self) -> Roots {
        self.provider.trust_bundle()
    }

    /// Subjects and fingerprints of the trust bundle's roots.
    pub fn trust_bundle_info(&self) -> Vec<RootInfo> {
        self.trust_bundle().iter().map(RootInfo::of).collect()
    }

    /// Why the latest request to the remote issuer failed, while none has succeeded since.
    pub fn issuer_error(&self) -> Option<String> {
        self.provider.last_error()
    }

    /// Registers the provider's metrics.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.provider.register_metrics(registry);
    }

    pub fn trust_domain(&self) -> &str {
        self.provider.trust_domain()
    }

    /// The held certificate, if one is held and unexpired (never blocks).
    pub fn get(&self, id: &Identity) -> Option<Arc<HeldCert>> {
        let certs = self.certs.read();
        certs
            .get(id)
            .filter(|h| !h.cert.is_expired(SystemTime::now()))
            .cloned()
    }

    /// The certificate for `id`, issued now if none is held. Callers must only ask for
    /// identities of local workloads.
    pub async fn fetch(&self, id: &Identity) -> Result<Arc<HeldCert>, SecretError> {
        if let Some(h) = self.get(id) {
            return Ok(h);
        }
        let _guard = self.issuing.lock().await;
        if let Some(h) = self.get(id) {
            return Ok(h);
        }
        self.issue(id).await
    }

    async fn issue(&self, id: &Identity) -> Result<Arc<HeldCert>, SecretError> {
        let cert =
            self.provider
                .issue(id, self.ttl)
                .await
                .map_err(|source| SecretError::Issue {
                    identity: id.to_string(),
                    source,
                })?;
        // The bundle as of this issue (a remote issuer has just published its roots).
        let roots = self.trust_bundle();
        let server = server_config(&cert, &roots, self.trust_domain()).map_err(|source| {
            SecretError::Tls {
                identity: id.to_string(),
                source,
            }
        })?;
        let held = Arc::new(HeldCert {
            cert,
            server,
            roots,
            clients: Mutex::new(HashMap::new()),
        });
        self.certs.write().insert(id.clone(), held.clone());
        tracing::info!(identity = %id, "certificate issued");
        Ok(held)
    }

    /// Makes sure a certificate is held for each identity; tries every one, returns the
    /// first failure.
    pub async fn ensure(&self, ids: &[Identity]) -> Result<(), SecretError> {
        let mut first = None;
        for id in ids {
            if let Err(e) = self.fetch(id).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Forgets certificates of identities no local workload uses any more.
    pub fn retain(&self, keep: &HashSet<Identity>) {
        let mut certs = self.certs.write();
        certs.retain(|id, _| keep.contains(id));
        let mut retries = self.retries.lock();
        retries.retain(|id, _| keep.contains(id));
    }

    fn retry_at(&self, id: &Identity) -> Option<SystemTime> {
        let retries = self.retries.lock();
        retries.get(id).map(|r| r.at)
    }

    /// Reissues every certificate past its half-life (and past its retry time, after a
    /// failure); returns how many were rotated. A failure keeps the held certificate, which
    /// serves until it expires, and backs off (1 s doubling to 60 s) before the next try.
    pub async fn rotate_due(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<Identity> = {
            let certs = self.certs.read();
            certs
                .iter()
                .filter(|(_, h)| h.cert.needs_rotation(now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut n = 0;
        for id in due {
            if self.retry_at(&id).is_some_and(|at| at > now) {
                continue;
            }
            let _guard = self.issuing.lock().await;
            let retries = |r: Result<(), &SecretError>| {
                let mut retries = self.retries.lock();
                match r {
                    Ok(()) => {
                        retries.remove(&id);
                    }
                    Err(e) => {
                        let failures = retries.get(&id).map_or(0, |r| r.failures) + 1;
                        let wait = RETRY_MIN
                            .saturating_mul(1 << (failures - 1).min(6))
                            .min(RETRY_MAX);
                        retries.insert(
                            id.clone(),
                            Retry {
                                at: SystemTime::now() + wait,
                                failures,
                            },
                        );
                        tracing::warn!(identity = %id, failures, retry_in = ?wait, error = %ambient_common::error::chain(e), "certificate rotation failed; the held certificate stays in use");
                    }
                }
            };
            match self.issue(&id).await {
                Ok(_) => {
                    retries(Ok(()));
                    n += 1;
                }
                Err(e) => retries(Err(&e)),
            }
        }
        n
    }

    /// How long until the next rotation is due (bounded to [1 s, 60 s]).
    pub fn next_check(&self) -> Duration {
        let now = SystemTime::now();
        let certs = self.certs.read();
        let soonest = certs
            .values()
            .map(|h| {
                let due = h.cert.rotation_due();
                let due = self.retry_at(&h.cert.identity).map_or(due, |r| r.max(due));
                due.duration_since(now).unwrap_or_default()
            })
            .min()
            .unwrap_or(Duration::from_secs(60));
        soonest.clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let now = unix(SystemTime::now()) as i64;
        let certs = self.certs.read();
        let mut out: Vec<CertInfo> = certs
            .values()
            .map(|h| CertInfo {
                identity: h.cert.identity.clone(),
                not_before_unix: unix(h.cert.not_before),
                not_after_unix: unix(h.cert.not_after),
                expires_in_seconds: unix(h.cert.not_after) as i64 - now,
                issued_unix: unix(h.cert.issued_at),
                issuer: h
                    .cert
                    .chain
                    .first()
                    .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
                    .map(|(_, c)| c.issuer().to_string())
                    .unwrap_or_default(),
                trust_roots: h.roots.len(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{ca_init, FileCa};

    fn manager(ttl: Duration) -> (tempfile::TempDir, SecretManager) {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(dir.path(), "cluster.local", false).unwrap();
        let ca = FileCa::load(&files, "cluster.local").unwrap();
        (dir, SecretManager::new(Arc::new(ca), ttl))
    }

    #[tokio::test]
    async fn caches_rotates_and_forgets() {
        let (_d, m) = manager(Duration::from_secs(2));
        let id = Identity::new("cluster.local", "a", "b");
        assert!(m.get(&id).is_none());
        let first = m.fetch(&id).await.unwrap();
        let again = m.fetch(&id).await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(
            m.rotate_due().await,
            0,
            "fresh certificates are not rotated"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(m.rotate_due().await, 1, "past half-life: rotated");
        let rotated = m.fetch(&id).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &rotated));
        assert_eq!(m.dump().len(), 1);
        m.retain(&HashSet::new());
        assert!(m.get(&id).is_none());
    }

    /// The file CA, failing on demand (an issuer outage).
    struct Flaky {
        ca: FileCa,
        down: std::sync::atomic::AtomicBool,
    }

    impl CertificateProvider for Flaky {
        fn issue(&self, identity: &Identity, ttl: Duration) -> super::super::IssueFuture<'_> {
            let identity = identity.clone();
            Box::pin(async move {
                if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                    return Err(CaError::Ttl(ttl));
                }
                self.ca.issue_now(&identity, ttl)
            })
        }
        fn trust_bundle(&self) -> Roots {
            self.ca.trust_bundle()
        }
        fn trust_domain(&self) -> &str {
            self.ca.trust_domain()
        }
    }

    #[tokio::test]
    async fn a_held_certificate_survives_a_failing_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(dir.path(), "cluster.local", false).unwrap();
        let flaky = Arc::new(Flaky {
            ca: FileCa::load(&files, "cluster.local").unwrap(),
            down: false.into(),
        });
        let m = SecretManager::new(flaky.clone(), Duration::from_secs(4));
        let id = Identity::new("cluster.local", "a", "b");
        let held = m.fetch(&id).await.unwrap();
        flaky.down.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(m.rotate_due().await, 0, "the issuer is down");
        let still = m.get(&id).expect("the held certificate stays");
        assert!(Arc::ptr_eq(&held, &still));
        assert!(m.fetch(&id).await.is_ok(), "fetch serves the held one");
        // Backing off: no second attempt within the first second.
        assert!(m.next_check() >= Duration::from_millis(500));
        assert_eq!(m.rotate_due().await, 0);
        flaky.down.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(m.rotate_due().await, 1, "retried after the backoff");
        assert!(!Arc::ptr_eq(&held, &m.get(&id).unwrap()));
    }

    #[tokio::test]
    async fn refuses_other_trust_domains() {
        let (_d, m) = manager(Duration::from_secs(60));
        let id = Identity::new("elsewhere", "a", "b");
        assert!(m.fetch(&id).await.is_err());
    }
}

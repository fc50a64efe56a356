//! The certificate cache: one certificate per local identity, issued on demand or ahead of
//! time (when the node agent announces a workload), rotated at half-life, forgotten when no
//! local workload uses the identity any more.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;

use super::ca::{CaError, CertificateProvider, WorkloadCert};
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

/// A held certificate with the TLS configurations derived from it.
#[derive(Debug)]
pub struct HeldCert {
    pub cert: WorkloadCert,
    pub server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

impl HeldCert {
    /// Client configuration presenting this certificate and expecting `peer`.
    pub fn client_for(
        &self,
        peer: &Identity,
        roots: &[CertificateDer<'static>],
    ) -> Result<Arc<ClientConfig>, SecretError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(peer) {
            return Ok(c.clone());
        }
        let cfg = client_config(&self.cert, roots, peer).map_err(|source| SecretError::Tls {
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
}

pub struct SecretManager {
    provider: Arc<dyn CertificateProvider>,
    ttl: Duration,
    certs: RwLock<HashMap<Identity, Arc<HeldCert>>>,
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
            issuing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        self.provider.trust_bundle()
    }

    pub fn trust_domain(&self) -> &str {
        self.provider.trust_domain()
    }

    /// The held certificate, if one is held and unexpired (never blocks).
    pub fn get(&self, id: &Identity) -> Option<Arc<HeldCert>> {
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
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
        let server =
            server_config(&cert, self.trust_bundle(), self.trust_domain()).map_err(|source| {
                SecretError::Tls {
                    identity: id.to_string(),
                    source,
                }
            })?;
        let held = Arc::new(HeldCert {
            cert,
            server,
            clients: Mutex::new(HashMap::new()),
        });
        self.certs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), held.clone());
        tracing::info!(identity = %id, "certificate issued");
        Ok(held)
    }

    /// Makes sure a certificate is held for each identity.
    pub async fn ensure(&self, ids: &[Identity]) -> Result<(), SecretError> {
        for id in ids {
            self.fetch(id).await?;
        }
        Ok(())
    }

    /// Forgets certificates of identities no local workload uses any more.
    pub fn retain(&self, keep: &HashSet<Identity>) {
        let mut certs = self.certs.write().unwrap_or_else(|e| e.into_inner());
        certs.retain(|id, _| keep.contains(id));
    }

    /// Reissues every certificate past its half-life; returns how many were rotated.
    pub async fn rotate_due(&self) -> usize {
        let now = SystemTime::now();
        let due: Vec<Identity> = {
            let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
            certs
                .iter()
                .filter(|(_, h)| h.cert.needs_rotation(now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let mut n = 0;
        for id in due {
            let _guard = self.issuing.lock().await;
            match self.issue(&id).await {
                Ok(_) => n += 1,
                Err(e) => {
                    tracing::warn!(identity = %id, error = %e, "certificate rotation failed; will retry")
                }
            }
        }
        n
    }

    /// How long until the next rotation is due (bounded to [1 s, 60 s]).
    pub fn next_check(&self) -> Duration {
        let now = SystemTime::now();
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        let soonest = certs
            .values()
            .map(|h| {
                h.cert
                    .rotation_due()
                    .duration_since(now)
                    .unwrap_or_default()
            })
            .min()
            .unwrap_or(Duration::from_secs(60));
        soonest.clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    pub fn dump(&self) -> Vec<CertInfo> {
        let now = unix(SystemTime::now()) as i64;
        let certs = self.certs.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<CertInfo> = certs
            .values()
            .map(|h| CertInfo {
                identity: h.cert.identity.clone(),
                not_before_unix: unix(h.cert.not_before),
                not_after_unix: unix(h.cert.not_after),
                expires_in_seconds: unix(h.cert.not_after) as i64 - now,
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

    #[tokio::test]
    async fn refuses_other_trust_domains() {
        let (_d, m) = manager(Duration::from_secs(60));
        let id = Identity::new("elsewhere", "a", "b");
        assert!(m.fetch(&id).await.is_err());
    }
}

//! The certificate provider trait and its development implementation: a CA certificate and
//! key and a trust bundle read from files, issuing short-lived ECDSA P-256 leaves locally (the
//! node holds a CA key: `--ca-dir`). Production nodes ask a remote issuer instead
//! (`super::issuer`).
//!
//! Files in the CA directory (written by [`ca_init`]):
//! - `ca-cert.pem`: the signing CA certificate;
//! - `ca-key.pem`: its PKCS#8 key (mode 0600);
//! - `root-cert.pem`: the trust bundle (one or more roots; peers must chain to one of them).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::registry::Registry;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::issuer::IssuerError;
use super::Identity;

/// A trust bundle as of one moment: shared, never mutated (a new bundle is a new `Arc`).
pub type Roots = Arc<Vec<CertificateDer<'static>>>;

/// Errors of the CA files and of issuance.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path} (was `ztunnel ca init --dir {dir}` run?)", dir = .path.parent().map(|p| p.display().to_string()).unwrap_or_default())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a CA (pass --force to replace it)")]
    Exists(PathBuf),
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a valid PEM file")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} is not a usable CA key (PKCS#8 ECDSA P-256 expected)")]
    Key {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{path} is not a usable CA certificate")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("generating a key pair failed")]
    KeyGen(#[source] rcgen::Error),
    #[error("signing a certificate for {identity} failed")]
    Sign {
        identity: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("identity {identity} is outside trust domain {trust_domain}")]
    ForeignTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("certificate lifetime {0:?} is out of range")]
    Ttl(Duration),
    #[error("the certificate issuer failed")]
    Issuer(#[source] IssuerError),
    #[error("cannot build the TLS client for the issuer: {0}")]
    IssuerTls(String),
}

/// A private key and certificate chain for one identity.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then any intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Validity start as written in the certificate (backdated a little for clock skew).
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When it was issued; rotation is due at half the time from here to `not_after`.
    pub issued_at: SystemTime,
}

impl WorkloadCert {
    /// Past half of its lifetime: time to rotate.
    pub fn needs_rotation(&self, now: SystemTime) -> bool {
        now >= self.rotation_due()
    }

    pub fn rotation_due(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + life / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The future returned by [`CertificateProvider::issue`].
pub type IssueFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, CaError>> + Send + 'a>>;

/// Where certificates come from. Asynchronous so a remote, node-scoped issuer (a CSR sent to a
/// CA that checks the node may hold the identity) can replace the file CA.
pub trait CertificateProvider: Send + Sync + 'static {
    /// Issues a fresh certificate for `identity`, valid for `ttl`.
    fn issue(&self, identity: &Identity, ttl: Duration) -> IssueFuture<'_>;
    /// The roots peers must chain to, now. A remote issuer replaces them with the bundle it
    /// publishes in each response (old and new roots during a root rotation).
    fn trust_bundle(&self) -> Roots;
    /// The trust domain this provider issues for.
    fn trust_domain(&self) -> &str;
    /// Why the latest request to a remote issuer failed, while none has succeeded since.
    fn last_error(&self) -> Option<String> {
        None
    }
    /// Registers the provider's own metrics (the issuer's request counters and health).
    fn register_metrics(&self, _registry: &mut Registry) {}
}

/// Paths of the three CA files in a directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ca-cert.pem"),
            key: dir.join("ca-key.pem"),
            roots: dir.join("root-cert.pem"),
        }
    }
}

/// Creates a self-signed lab CA in `dir`. Refuses to overwrite unless `force`.
pub fn ca_init(dir: &Path, trust_domain: &str, force: bool) -> Result<CaFiles, CaError> {
    let files = CaFiles::in_dir(dir);
    for p in [&files.cert, &files.key, &files.roots] {
        if p.exists() && !force {
            return Err(CaError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGen)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ambient lab root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params.self_signed(&key).map_err(|source| CaError::Sign {
        identity: "root CA".into(),
        source,
    })?;
    write(&files.cert, cert.pem().as_bytes(), 0o644)?;
    write(&files.roots, cert.pem().as_bytes(), 0o644)?;
    write(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(files)
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)
}

fn read(path: &Path) -> Result<Vec<u8>, CaError> {
    std::fs::read(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A CA whose certificate, key and trust bundle come from files.
pub struct FileCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate when it is not itself one of the roots (sent as an intermediate).
    intermediate: Option<CertificateDer<'static>>,
    roots: Roots,
    trust_domain: String,
}

impl std::fmt::Debug for FileCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCa")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl FileCa {
    pub fn load(files: &CaFiles, trust_domain: &str) -> Result<Self, CaError> {
        let ca_pem = read(&files.cert)?;
        let ca_pem = String::from_utf8_lossy(&ca_pem).into_owned();
        let ca_der = read_certs(&files.cert)?.remove(0);
        let key_pem = read(&files.key)?;
        let key = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).map_err(|source| {
            CaError::Key {
                path: files.key.clone(),
                source,
            }
        })?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|source| CaError::CaCert {
            path: files.cert.clone(),
            source,
        })?;
        let roots = read_certs(&files.roots)?;
        let intermediate = (!roots.contains(&ca_der)).then_some(ca_der);
        Ok(Self {
            issuer,
            intermediate,
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
        })
    }

    /// Signs a leaf synchronously (ECDSA P-256; well under a millisecond of work).
    pub fn issue_now(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(366 * 24 * 3600) {
            return Err(CaError::Ttl(ttl));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::KeyGen)?;
        let sign_err = |source| CaError::Sign {
            identity: identity.to_string(),
            source,
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(sign_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        // A minute of slack for peers whose clocks run a little behind.
        let not_before = now - Duration::from_secs(60);
        let not_after = now + ttl;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediate.clone());
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
            issued_at: now,
        })
    }
}

impl CertificateProvider for FileCa {
    fn issue(&self, identity: &Identity, ttl: Duration) -> IssueFuture<'_> {
        let identity = identity.clone();
        Box::pin(async move { self.issue_now(&identity, ttl) })
    }

    fn trust_bundle(&self) -> Roots {
        self.roots.clone()
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_carries_the_spiffe_san() {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(dir.path(), "cluster.local", false).unwrap();
        assert!(matches!(
            ca_init(dir.path(), "cluster.local", false),
            Err(CaError::Exists(_))
        ));
        let ca = FileCa::load(&files, "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "shop", "web");
        let cert = ca.issue_now(&id, Duration::from_secs(3600)).unwrap();
        assert_eq!(cert.chain.len(), 1, "CA is a root: no intermediate sent");
        let ids = crate::identity::identities_in_cert(&cert.chain[0]).unwrap();
        assert_eq!(ids, vec![id]);
        assert!(!cert.needs_rotation(SystemTime::now()));
        assert!(cert.needs_rotation(SystemTime::now() + Duration::from_secs(1900)));
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let spki = x509.public_key();
        assert_eq!(
            spki.algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "key must not be group/world readable");
        }
    }

    #[test]
    fn refuses_foreign_trust_domain_and_bad_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let files = ca_init(dir.path(), "cluster.local", false).unwrap();
        let ca = FileCa::load(&files, "cluster.local").unwrap();
        let foreign = Identity::new("evil.local", "a", "b");
        assert!(matches!(
            ca.issue_now(&foreign, Duration::from_secs(60)),
            Err(CaError::ForeignTrustDomain { .. })
        ));
        let id = Identity::new("cluster.local", "a", "b");
        assert!(matches!(
            ca.issue_now(&id, Duration::ZERO),
            Err(CaError::Ttl(_))
        ));
    }

    #[test]
    fn missing_files_name_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = FileCa::load(&CaFiles::in_dir(dir.path()), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("ztunnel ca init"), "{err}");
    }
}

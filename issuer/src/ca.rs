//! The signing CA: the only place in the mesh that holds a CA key. Reads `ca-cert.pem`,
//! `ca-key.pem` and `root-cert.pem` (the published trust bundle: one root, or old and new while
//! roots rotate) from a directory, signs workload leaves from CSRs, and issues its own serving
//! certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ambient_common::spiffe::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// The three files of a CA directory.
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOTS: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Why a CSR is not signed (the caller's fault: gRPC `InvalidArgument`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not PEM")]
    Pem,
    #[error("the CSR does not parse")]
    Parse,
    #[error("the CSR's signature does not verify")]
    Signature,
    #[error("the CSR's key is not ECDSA P-256")]
    KeyType,
    #[error("the CSR asks for names other than {0}")]
    Names(String),
}

impl CsrError {
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Pem | CsrError::Parse => "bad_csr",
            CsrError::Signature => "csr_signature",
            CsrError::KeyType => "csr_key_type",
            CsrError::Names(_) => "csr_names",
        }
    }
}

/// A CSR's public key, checked: signature verified, ECDSA P-256, no names but `identity`.
#[derive(Debug)]
pub struct CheckedCsr {
    spki_der: Vec<u8>,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// Parses and checks a PEM CSR for `identity`. Any requested extension other than the URI SAN
/// is ignored: the leaf's contents are the issuer's, not the requester's.
pub fn check_csr(pem: &str, identity: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::Pem)?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|_| CsrError::Parse)?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY
        || curve.as_deref() != Some(OID_P256)
    {
        return Err(CsrError::KeyType);
    }
    let want = identity.to_string();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::URI(u) if *u == want => {}
                        _ => return Err(CsrError::Names(want)),
                    }
                }
            }
        }
    }
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

/// A loaded CA directory.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, when it is not itself one of the roots (sent as intermediate).
    intermediate_pem: Option<String>,
    /// The published bundle, as one PEM string (the last element of every response).
    pub roots_pem: String,
    pub roots: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    /// SHA-256 of the signing certificate, for logs and `/ready`.
    pub fingerprint: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let v = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if v.is_empty() {
        return Err(CaError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(v)
}

fn hex_sha256(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The files' modification times: a change means reload.
pub fn dir_stamp(dir: &Path) -> Option<Vec<SystemTime>> {
    [CA_CERT, CA_KEY, ROOTS]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

impl Signer {
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let roots_path = dir.join(ROOTS);
        let cert_pem = read(&cert_path)?;
        let ca_der = certs(&cert_path, &cert_pem)?.remove(0);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            reason: format!("not a usable PKCS#8 key: {e}"),
        })?;
        let (_, parsed) = X509Certificate::from_der(&ca_der).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        if !parsed.is_ca() {
            return Err(CaError::Invalid {
                path: cert_path,
                reason: "not a CA certificate".into(),
            });
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Invalid {
                path: key_path,
                reason: format!("the key does not belong to {}", cert_path.display()),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let roots_pem = read(&roots_path)?;
        let roots = certs(&roots_path, &roots_pem)?;
        let intermediate_pem =
            (!roots.contains(&ca_der)).then(|| cert_pem.trim().to_owned() + "\n");
        Ok(Self {
            issuer,
            intermediate_pem,
            roots_pem: normalise_bundle(&roots),
            roots,
            trust_domain: trust_domain.to_owned(),
            fingerprint: hex_sha256(&ca_der),
        })
    }

    /// Signs a leaf for `identity` with the CSR's key: SPIFFE URI SAN only, never a CA, valid
    /// from a minute ago for `ttl`. Returns the response chain: leaf, any intermediate, then
    /// the roots bundle.
    pub fn sign(
        &self,
        csr: &CheckedCsr,
        identity: &SpiffeId,
        ttl: Duration,
    ) -> Result<Vec<String>, CaError> {
        let spki = SubjectPublicKeyInfo::from_der(&csr.spki_der)
            .map_err(|e| CaError::Sign(format!("CSR key: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .to_string()
                .try_into()
                .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
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
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
        params.not_after = time::OffsetDateTime::from(now + ttl);
        let cert = params
            .signed_by(&spki, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.intermediate_pem.clone());
        chain.push(self.roots_pem.clone());
        Ok(chain)
    }

    /// A serving certificate for the issuer itself (TLS server auth, the given names), with
    /// its chain (leaf, any intermediate) and key.
    pub fn serving(
        &self,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, KeyPair), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, &self.trust_domain);
        dn.push(DnType::CommonName, "ambient-issuer");
        params.distinguished_name = dn;
        for d in dns {
            params.subject_alt_names.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| CaError::Sign(format!("{d}: {e}")))?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(60));
        params.not_after = time::OffsetDateTime::from(now + ttl);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        if let Some(pem) = &self.intermediate_pem {
            chain.extend(CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok));
        }
        Ok((chain, key))
    }
}

/// The roots as one PEM string, one block per certificate.
fn normalise_bundle(roots: &[CertificateDer<'static>]) -> String {
    roots.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
}

fn pem_block(tag: &str, der: &[u8]) -> String {
    let cfg = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der.to_vec()), cfg)
}

/// Creates a self-signed root CA in `dir` (lab and tests): all three files, the key 0600.
pub fn init_dir(dir: &Path, trust_domain: &str, name: &str) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let write = |name: &str, text: &str, mode: u32| -> Result<(), CaError> {
        let path = dir.join(name);
        let err = |source| CaError::Read {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)
    };
    write(CA_KEY, &key.serialize_pem(), 0o600)?;
    write(CA_CERT, &cert.pem(), 0o644)?;
    write(ROOTS, &cert.pem(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str, alg: &'static rcgen::SignatureAlgorithm) -> String {
        let kp = KeyPair::generate_for(alg).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
        p.serialize_request(&kp).unwrap().pem().unwrap()
    }

    #[test]
    fn signs_a_spiffe_leaf_and_publishes_the_bundle() {
        let dir = tempfile::tempdir().unwrap();
        init_dir(dir.path(), "cluster.local", "test root").unwrap();
        let s = Signer::load(dir.path(), "cluster.local").unwrap();
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let csr = check_csr(
            &csr_for(&id.to_string(), &rcgen::PKCS_ECDSA_P256_SHA256),
            &id,
        )
        .unwrap();
        let chain = s.sign(&csr, &id, Duration::from_secs(3600)).unwrap();
        assert_eq!(
            chain.len(),
            2,
            "leaf and the root bundle (the CA is a root)"
        );
        assert_eq!(chain[1], s.roots_pem);
        let leaf = CertificateDer::from_pem_slice(chain[0].as_bytes()).unwrap();
        let (_, x) = X509Certificate::from_der(&leaf).unwrap();
        assert!(!x.is_ca());
        let sans: Vec<String> = x
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(sans, vec![format!("URI({id})")]);
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life, 3660);
        // The bundle round-trips to the same certificates.
        let back: Vec<_> = CertificateDer::pem_slice_iter(s.roots_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(back, s.roots);
    }

    #[test]
    fn refuses_bad_csrs() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(check_csr("garbage", &id).unwrap_err(), CsrError::Pem);
        let other = csr_for(
            "spiffe://cluster.local/ns/shop/sa/db",
            &rcgen::PKCS_ECDSA_P256_SHA256,
        );
        assert!(matches!(check_csr(&other, &id), Err(CsrError::Names(_))));
        let p384 = csr_for(&id.to_string(), &rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(check_csr(&p384, &id).unwrap_err(), CsrError::KeyType);
        // A CSR whose signature was made over other bytes.
        let good = csr_for(&id.to_string(), &rcgen::PKCS_ECDSA_P256_SHA256);
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec();
        let n = der.len();
        der[n - 5] ^= 0x55;
        let tampered = pem_block("CERTIFICATE REQUEST", &der);
        assert!(matches!(
            check_csr(&tampered, &id),
            Err(CsrError::Signature | CsrError::Parse)
        ));
    }

    #[test]
    fn refuses_a_key_of_another_ca() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        init_dir(a.path(), "cluster.local", "a").unwrap();
        init_dir(b.path(), "cluster.local", "b").unwrap();
        std::fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).unwrap();
        let err = Signer::load(a.path(), "cluster.local").unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}

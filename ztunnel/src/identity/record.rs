//! TLS 1.3 record protection with AWS-LC's AES-GCM.
//!
//! Every relayed byte is sealed once on the sending node and opened once on the receiving
//! one, so the AEAD is the largest user-space cost of a bulk transfer. The profile of a
//! 1-stream transfer (docs/performance.md) put ring's AES-GCM (VAES with AVX2) at 12% of
//! ztunnel's CPU and AWS-LC's (AVX-512 where the CPU has it, as Istio's ztunnel ships it) at
//! two thirds of that per byte. The handshake (key exchange, signatures, HKDF, certificate
//! checks) stays on ring: only the two AES-GCM suites' record layer comes from here, built
//! on rustls's public provider traits, so rustls's own features (and with them the
//! process-default provider every other TLS client in the workspace relies on) are unchanged.

use std::sync::LazyLock;

use aws_lc_rs::aead;
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::CipherSuiteCommon;
use rustls::{
    ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, SupportedCipherSuite,
    Tls13CipherSuite,
};

/// One AES-GCM key size.
struct AesGcm {
    alg: &'static aead::Algorithm,
    /// The suite's secrets, for a caller that hands them to the kernel (kTLS).
    secrets: fn(AeadKey, Iv) -> ConnectionTrafficSecrets,
}

static AES_128: AesGcm = AesGcm {
    alg: &aead::AES_128_GCM,
    secrets: |key, iv| ConnectionTrafficSecrets::Aes128Gcm { key, iv },
};

static AES_256: AesGcm = AesGcm {
    alg: &aead::AES_256_GCM,
    secrets: |key, iv| ConnectionTrafficSecrets::Aes256Gcm { key, iv },
};

impl AesGcm {
    fn key(&self, key: &AeadKey) -> aead::LessSafeKey {
        // rustls hands over exactly `key_len()` bytes (the suite's key schedule), the only
        // length `UnboundKey::new` refuses.
        aead::LessSafeKey::new(
            aead::UnboundKey::new(self.alg, key.as_ref()).expect("rustls gives key_len() bytes"),
        )
    }
}

impl Tls13AeadAlgorithm for AesGcm {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Sealer {
            key: self.key(&key),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Opener {
            key: self.key(&key),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        self.alg.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok((self.secrets)(key, iv))
    }
}

struct Sealer {
    key: aead::LessSafeKey,
    iv: Iv,
}

struct Opener {
    key: aead::LessSafeKey,
    iv: Iv,
}

/// The per-record nonce: the traffic IV XORed with the record's sequence number (RFC 8446
/// §5.3).
fn nonce(iv: &Iv, seq: u64) -> aead::Nonce {
    aead::Nonce::assume_unique_for_key(Nonce::new(iv, seq).0)
}

impl MessageEncrypter for Sealer {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        // TLSInnerPlaintext: the content, then its real type; sealed with the outer record
        // header as additional data (RFC 8446 §5.2).
        let len = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(len);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        self.key
            .seal_in_place_append_tag(
                nonce(&self.iv, seq),
                aead::Aad::from(make_tls13_aad(len)),
                &mut payload,
            )
            .map_err(|_| Error::EncryptError)?;
        // Every TLS 1.3 record says application data, version 0x0303 (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.key.algorithm().tag_len()
    }
}

impl MessageDecrypter for Opener {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.key.algorithm().tag_len() {
            return Err(Error::DecryptError);
        }
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain = self
            .key
            .open_in_place(nonce(&self.iv, seq), aad, payload)
            .map_err(|_| Error::DecryptError)?
            .len();
        payload.truncate(plain);
        msg.into_tls13_unpadded_message()
    }
}

/// `base` (one of ring's TLS 1.3 suites) with its record layer from `aead`.
fn suite(base: SupportedCipherSuite, aead: &'static AesGcm) -> Tls13CipherSuite {
    let SupportedCipherSuite::Tls13(base) = base else {
        unreachable!("a TLS 1.3 suite")
    };
    Tls13CipherSuite {
        common: CipherSuiteCommon {
            suite: base.common.suite,
            hash_provider: base.common.hash_provider,
            confidentiality_limit: base.common.confidentiality_limit,
        },
        hkdf_provider: base.hkdf_provider,
        aead_alg: aead,
        quic: None,
    }
}

static TLS13_AES_128_GCM_SHA256: LazyLock<Tls13CipherSuite> = LazyLock::new(|| {
    suite(
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        &AES_128,
    )
});

static TLS13_AES_256_GCM_SHA384: LazyLock<Tls13CipherSuite> = LazyLock::new(|| {
    suite(
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        &AES_256,
    )
});

/// `suites` (ring's, in their order) with each TLS 1.3 AES-GCM suite's record layer on
/// AWS-LC; the rest unchanged.
pub(super) fn with_aws_lc_records(suites: &[SupportedCipherSuite]) -> Vec<SupportedCipherSuite> {
    use rustls::CipherSuite as C;
    suites
        .iter()
        .map(|s| match s.suite() {
            C::TLS13_AES_128_GCM_SHA256 => SupportedCipherSuite::Tls13(&TLS13_AES_128_GCM_SHA256),
            C::TLS13_AES_256_GCM_SHA384 => SupportedCipherSuite::Tls13(&TLS13_AES_256_GCM_SHA384),
            _ => *s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::crypto::cipher::OutboundChunks;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, Connection, RootCertStore, ServerConfig};

    fn aead(s: SupportedCipherSuite) -> Option<&'static dyn Tls13AeadAlgorithm> {
        match s {
            SupportedCipherSuite::Tls13(s) => Some(s.aead_alg),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn record(data: &[u8]) -> OutboundPlainMessage<'_> {
        OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_3,
            payload: OutboundChunks::Single(data),
        }
    }

    /// Records sealed here open with ring's AES-256-GCM and the other way round (empty, one
    /// byte, a full 16 KiB record); a wrong sequence number, a flipped bit and a record
    /// shorter than its tag are refused. (rustls makes only 32-byte keys outside a
    /// handshake; AES-128 is checked through handshakes below.)
    #[test]
    fn sealed_records_open_with_rings_and_tampering_is_refused() {
        let ours = aead(SupportedCipherSuite::Tls13(&TLS13_AES_256_GCM_SHA384)).unwrap();
        let ring = aead(rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384).unwrap();
        let key = || AeadKey::from(std::array::from_fn::<u8, 32, _>(|i| i as u8 * 3));
        let iv = || Iv::new([7u8; 12]);
        let open = |by: &dyn Tls13AeadAlgorithm, wire: &mut [u8], seq: u64| {
            by.decrypter(key(), iv())
                .decrypt(
                    InboundOpaqueMessage::new(
                        ContentType::ApplicationData,
                        ProtocolVersion::TLSv1_2,
                        &mut wire[5..],
                    ),
                    seq,
                )
                .map(|m| (m.typ, m.payload.to_vec()))
        };
        for len in [0usize, 1, 16 * 1024] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for (seal, by) in [(ours, ring), (ring, ours), (ours, ours)] {
                let mut wire = seal
                    .encrypter(key(), iv())
                    .encrypt(record(&data), 42)
                    .unwrap()
                    .encode();
                assert_eq!(wire.len(), 5 + len + 1 + 16);
                assert_eq!(
                    open(by, &mut wire, 42).unwrap(),
                    (ContentType::ApplicationData, data.clone())
                );
            }
            let sealed = ours
                .encrypter(key(), iv())
                .encrypt(record(&data), 9)
                .unwrap()
                .encode();
            assert!(matches!(
                open(ours, &mut sealed.clone(), 10),
                Err(Error::DecryptError)
            ));
            let mut flipped = sealed.clone();
            *flipped.last_mut().unwrap() ^= 1;
            assert!(matches!(
                open(ours, &mut flipped, 9),
                Err(Error::DecryptError)
            ));
            assert!(matches!(
                open(ours, &mut sealed[..5 + 10].to_vec(), 9),
                Err(Error::DecryptError)
            ));
        }
    }

    /// Moves what `from` has to send into `to`.
    fn pump(from: &mut Connection, to: &mut Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// A full handshake for each AES-GCM suite with ring's implementation on the other end,
    /// each side in turn, then 15 KiB each way in three records arrive intact.
    #[test]
    fn handshakes_with_ring_on_the_other_side_carry_data_both_ways() {
        let cert = rcgen::generate_simple_self_signed(vec!["peer.test".to_owned()]).unwrap();
        let chain = vec![cert.cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let mut roots = RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let roots = Arc::new(roots);
        let ring = rustls::crypto::ring::default_provider();
        let ours = CryptoProvider {
            cipher_suites: with_aws_lc_records(&ring.cipher_suites),
            ..rustls::crypto::ring::default_provider()
        };
        for suite in [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
        ] {
            let only = |p: &CryptoProvider| {
                Arc::new(CryptoProvider {
                    cipher_suites: p
                        .cipher_suites
                        .iter()
                        .filter(|s| s.suite() == suite)
                        .copied()
                        .collect(),
                    ..p.clone()
                })
            };
            for (client_side, server_side) in [(&ours, &ring), (&ring, &ours)] {
                let ccfg = ClientConfig::builder_with_provider(only(client_side))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth();
                let scfg = ServerConfig::builder_with_provider(only(server_side))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(chain.clone(), key.clone_key())
                    .unwrap();
                let name = ServerName::try_from("peer.test").unwrap();
                let mut c =
                    Connection::from(rustls::ClientConnection::new(Arc::new(ccfg), name).unwrap());
                let mut s =
                    Connection::from(rustls::ServerConnection::new(Arc::new(scfg)).unwrap());
                for _ in 0..4 {
                    pump(&mut c, &mut s);
                    pump(&mut s, &mut c);
                }
                assert!(!c.is_handshaking() && !s.is_handshaking());
                assert_eq!(c.negotiated_cipher_suite().unwrap().suite(), suite);
                let data: Vec<u8> = (0..15_000).map(|i| (i * 7 % 253) as u8).collect();
                let mut pair = [c, s];
                for from in [0, 1] {
                    let [a, b] = &mut pair;
                    let (a, b) = if from == 0 { (a, b) } else { (b, a) };
                    for part in data.chunks(5_000) {
                        a.writer().write_all(part).unwrap();
                    }
                    pump(a, b);
                    let mut got = vec![0u8; data.len()];
                    b.reader().read_exact(&mut got).unwrap();
                    assert_eq!(got, data, "{suite:?}");
                }
            }
        }
    }

    #[test]
    fn only_the_aes_gcm_suites_change_and_keep_their_order() {
        let ring = rustls::crypto::ring::default_provider().cipher_suites;
        let ours = with_aws_lc_records(&ring);
        assert_eq!(
            ours.iter().map(|s| s.suite()).collect::<Vec<_>>(),
            ring.iter().map(|s| s.suite()).collect::<Vec<_>>()
        );
        for (o, r) in ours.iter().zip(&ring) {
            let replaced = matches!(
                r.suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            );
            match (aead(*o), aead(*r)) {
                (Some(oa), Some(ra)) => {
                    assert_eq!(std::ptr::addr_eq(oa, ra), !replaced, "{:?}", r.suite())
                }
                // TLS 1.2 suites (never offered: the configs are TLS 1.3 only) stay as they are.
                _ => assert!(!replaced && o == r),
            }
        }
    }
}

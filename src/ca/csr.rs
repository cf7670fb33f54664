//! PKCS#10 CSR intake: the only door through which a caller's public key
//! reaches the CA. [`verify_csr`] parses the request, checks its
//! self-signature (proof of possession of the private key) and admits only
//! the key types we are willing to certify. Everything else in the CSR
//! (subject, requested extensions, attributes) is deliberately dropped: the
//! resulting [`VerifiedCsr`] carries nothing but the public key.
//!
//! Must not: panic on any input, or let requested SAN/KU/EKU/BasicConstraints
//! through (formats.md §6: rcgen's own CSR parser copies them into the
//! certificate parameters, which is why we never use it).

use std::fmt;

use sha2::{Digest, Sha256};
use x509_parser::{
    certification_request::X509CertificationRequest,
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ED25519,
    },
    prelude::FromDer,
    public_key::RSAPublicKey,
    x509::SubjectPublicKeyInfo,
};

/// Largest CSR we parse, in bytes. An RSA-8192 CSR is about 1.2 KiB, so this
/// leaves room for a subject and extension requests while bounding work.
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// Smallest RSA modulus we certify (bits).
pub const MIN_RSA_BITS: u32 = 2048;
/// Largest RSA modulus we certify (bits); also aws-lc-rs's verification ceiling.
pub const MAX_RSA_BITS: u32 = 8192;

/// The kind of key a verified CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyKind {
    /// ECDSA on NIST P-256 (secp256r1).
    P256,
    /// ECDSA on NIST P-384 (secp384r1).
    P384,
    /// Ed25519 (RFC 8410).
    Ed25519,
    /// RSA with a modulus of `bits` bits (2048..=8192).
    Rsa {
        /// Modulus length in bits.
        bits: u32,
    },
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::P256 => f.write_str("ECDSA P-256"),
            Self::P384 => f.write_str("ECDSA P-384"),
            Self::Ed25519 => f.write_str("Ed25519"),
            Self::Rsa { bits } => write!(f, "RSA-{bits}"),
        }
    }
}

/// Why a CSR was rejected. Messages describe the CSR's structure, never echo its bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_LEN`].
    #[error("CSR is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    /// Not a well-formed DER PKCS#10 request.
    #[error("malformed CSR: {0}")]
    Malformed(String),
    /// The self-signature does not verify with the CSR's own key (no proof of possession).
    #[error("CSR signature does not verify with its public key")]
    BadSignature,
    /// A key type or size we do not certify.
    #[error("unsupported CSR key: {0}")]
    UnsupportedKey(String),
    /// The CSR is signed with an algorithm we do not accept (e.g. SHA-1).
    #[error("unsupported CSR signature algorithm: {0}")]
    UnsupportedAlgorithm(String),
}

/// A CSR whose signature verified and whose key passed policy. Only
/// [`verify_csr`] makes one; it holds the public key and nothing else.
#[derive(Clone)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
    spki_sha256_hex: String,
    key_kind: KeyKind,
    /// The same key in the form rcgen signs; built once here so issuance
    /// does not re-parse. Its re-encoding equals `spki_der` byte for byte.
    pub(super) rcgen_key: rcgen::SubjectPublicKeyInfo,
}

impl VerifiedCsr {
    /// DER SubjectPublicKeyInfo of the CSR key, exactly as it will appear in the certificate.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Lowercase hex SHA-256 of [`Self::spki_der`] (for binding attestation evidence to the key).
    pub fn spki_sha256_hex(&self) -> &str {
        &self.spki_sha256_hex
    }

    /// The key's type and size.
    pub fn key_kind(&self) -> KeyKind {
        self.key_kind
    }
}

impl fmt::Debug for VerifiedCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCsr")
            .field("key_kind", &self.key_kind)
            .field("spki_sha256", &self.spki_sha256_hex)
            .finish()
    }
}

/// Parses a DER PKCS#10 CSR, verifies its self-signature and admits only
/// P-256, P-384, Ed25519 or RSA 2048..=8192-bit keys.
///
/// Checks run cheapest first: size, DER structure (no trailing bytes),
/// version, key type/size, signature algorithm, then the signature itself.
/// Accepted signature algorithms: ecdsa-with-SHA256/384, Ed25519,
/// sha256/384/512WithRSAEncryption and RSASSA-PSS with SHA-2; SHA-1 is refused.
///
/// # Errors
/// [`CsrError`] naming the first failed check. Never panics.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CsrError::TooLarge);
    }
    if der.is_empty() {
        return Err(CsrError::Malformed("empty input".into()));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CsrError::Malformed(format!("not a DER PKCS#10 request ({e})")))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    if info.version.0 != 0 {
        return Err(CsrError::Malformed(format!(
            "version {} (only v1 = 0 exists)",
            info.version.0
        )));
    }

    let spki = &info.subject_pki;
    let key_kind = classify_key(spki)?;
    check_signature_algorithm(&csr)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    // rcgen re-encodes the key from (algorithm, key bits). Require that the
    // re-encoding is identical so the certificate carries exactly the key
    // the caller proved possession of, and spki_sha256 matches the cert.
    let rcgen_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|_| CsrError::UnsupportedKey(format!("{key_kind} key encoding not supported")))?;
    if rcgen::PublicKeyData::subject_public_key_info(&rcgen_key) != spki.raw {
        return Err(CsrError::UnsupportedKey(format!(
            "non-canonical {key_kind} SubjectPublicKeyInfo encoding"
        )));
    }

    let spki_der = spki.raw.to_vec();
    let spki_sha256_hex = hex::encode(Sha256::digest(&spki_der));
    Ok(VerifiedCsr {
        spki_der,
        spki_sha256_hex,
        key_kind,
        rcgen_key,
    })
}

/// Maps the SPKI to a [`KeyKind`] or rejects it.
fn classify_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let alg = &spki.algorithm.algorithm;
    let key = &spki.subject_public_key;
    if key.unused_bits != 0 {
        return Err(CsrError::Malformed(
            "public key BIT STRING has unused bits".into(),
        ));
    }
    let key = key.data.as_ref();

    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| CsrError::UnsupportedKey("EC key without a named curve".into()))?;
        // Uncompressed points only (SEC1 0x04 || X || Y): that is what
        // every mainstream library emits, and what aws-lc-rs verifies.
        let (kind, len) = if curve == OID_EC_P256 {
            (KeyKind::P256, 65)
        } else if curve == OID_NIST_EC_P384 {
            (KeyKind::P384, 97)
        } else {
            return Err(CsrError::UnsupportedKey(format!("EC curve {curve}")));
        };
        if key.len() != len || key.first() != Some(&0x04) {
            return Err(CsrError::UnsupportedKey(format!(
                "{kind} point must be uncompressed ({len} bytes)"
            )));
        }
        Ok(kind)
    } else if *alg == OID_SIG_ED25519 {
        // RFC 8410 §3: parameters MUST be absent.
        if spki.algorithm.parameters.is_some() {
            return Err(CsrError::Malformed("Ed25519 key with parameters".into()));
        }
        if key.len() != 32 {
            return Err(CsrError::UnsupportedKey(
                "Ed25519 key must be 32 bytes".into(),
            ));
        }
        Ok(KeyKind::Ed25519)
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        let (rest, rsa) = RSAPublicKey::from_der(key)
            .map_err(|_| CsrError::Malformed("invalid RSA public key".into()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed(
                "trailing bytes in RSA public key".into(),
            ));
        }
        let bits = rsa_modulus_bits(rsa.modulus)
            .ok_or_else(|| CsrError::Malformed("RSA modulus is zero or negative".into()))?;
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::UnsupportedKey(format!(
                "RSA-{bits} (need {MIN_RSA_BITS}..={MAX_RSA_BITS} bits)"
            )));
        }
        Ok(KeyKind::Rsa { bits })
    } else {
        Err(CsrError::UnsupportedKey(format!("key algorithm {alg}")))
    }
}

/// Bit length of a DER INTEGER's content bytes read as an unsigned modulus.
/// `None` for zero or a negative encoding.
fn rsa_modulus_bits(modulus: &[u8]) -> Option<u32> {
    if modulus.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let start = modulus.iter().position(|&b| b != 0)?;
    let significant = modulus.get(start..)?;
    let first = *significant.first()?;
    // `first` is non-zero, so it contributes 1..=8 bits.
    let top_bits = 8 - first.leading_zeros();
    let bits = significant
        .len()
        .checked_sub(1)?
        .checked_mul(8)?
        .checked_add(usize::try_from(top_bits).ok()?)?;
    u32::try_from(bits).ok()
}

/// Allowlist of CSR signature algorithms: SHA-2 family only.
fn check_signature_algorithm(csr: &X509CertificationRequest<'_>) -> Result<(), CsrError> {
    let alg = &csr.signature_algorithm.algorithm;
    let allowed = [
        &OID_SIG_ECDSA_WITH_SHA256,
        &OID_SIG_ECDSA_WITH_SHA384,
        &OID_SIG_ED25519,
        &OID_PKCS1_SHA256WITHRSA,
        &OID_PKCS1_SHA384WITHRSA,
        &OID_PKCS1_SHA512WITHRSA,
        // PSS parameters are checked by x509-parser: SHA-256/384/512 only.
        &OID_PKCS1_RSASSAPSS,
    ];
    if allowed.contains(&alg) {
        Ok(())
    } else {
        Err(CsrError::UnsupportedAlgorithm(alg.to_id_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, PublicKeyData, RsaKeySize,
        SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
        PKCS_RSA_SHA256,
    };

    use super::*;

    /// A CSR for `key` with a fixed subject and no extensions.
    pub(crate) fn csr_for(key: &KeyPair) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "workload");
        params.distinguished_name = dn;
        params.serialize_request(key).unwrap().der().to_vec()
    }

    pub(crate) fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
        KeyPair::generate_for(alg).unwrap()
    }

    fn rsa2048() -> KeyPair {
        KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap()
    }

    /// `openssl req -new -newkey rsa:1024 -nodes -subj /CN=weak -outform DER | base64` (a real,
    /// correctly self-signed CSR; the private key was discarded)
    /// (aws-lc-rs refuses to generate or load RSA keys below 2048 bits).
    const RSA1024_CSR_B64: &str = "MIIBTjCBuAIBADAPMQ0wCwYDVQQDDAR3ZWFrMIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQCziYsP4wuYOlg7y9QhMmdHY3hQnp59/ld19pPh/zx1ZmqYMtxN7NTsU60wZeQ5r2Ut+UmckTEvCx2LYaos4tJV4/6XpatIHIxZlMNkQtsrnqsLjcF22uByTu/R/X7L2lcSIMYOBDtn0fogoc8Eodgtc5SMdKQWdkAEq1bfEYUrywIDAQABoAAwDQYJKoZIhvcNAQELBQADgYEAA06G/Tk/Gn25is+9fHhLJifcnMy72WszeII4hrvcbXji1dCubkcg2iKuCTAoir1v15FcK73pba/NbjnFYEYDSsJ9e6o9Mw9+KwRVSt1JZpD/XqD5JeAX+6pFA7CDLdbLRKgd8/vOIaRWfBeg34UMwRHv9QmRnI4EoO766vwBwUY=";

    #[test]
    fn accepts_supported_keys() {
        for (alg, kind) in [
            (&PKCS_ECDSA_P256_SHA256, KeyKind::P256),
            (&PKCS_ECDSA_P384_SHA384, KeyKind::P384),
            (&PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let k = key(alg);
            let v = verify_csr(&csr_for(&k)).unwrap();
            assert_eq!(v.key_kind(), kind);
            assert_eq!(v.spki_der(), k.subject_public_key_info());
            assert_eq!(
                v.spki_sha256_hex(),
                hex::encode(Sha256::digest(v.spki_der()))
            );
            assert_eq!(v.spki_sha256_hex().len(), 64);
        }
        let k = rsa2048();
        let v = verify_csr(&csr_for(&k)).unwrap();
        assert_eq!(v.key_kind(), KeyKind::Rsa { bits: 2048 });
        assert_eq!(v.spki_der(), k.subject_public_key_info());
    }

    #[test]
    fn rejects_garbage_empty_truncated_trailing_and_oversize() {
        let good = csr_for(&key(&PKCS_ECDSA_P256_SHA256));
        assert!(matches!(verify_csr(&[]), Err(CsrError::Malformed(_))));
        assert!(matches!(
            verify_csr(b"definitely not a CSR"),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            verify_csr(&good[..good.len() - 10]),
            Err(CsrError::Malformed(_))
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(verify_csr(&trailing), Err(CsrError::Malformed(_))));
        assert_eq!(
            verify_csr(&vec![0x30; MAX_CSR_LEN + 1]).unwrap_err(),
            CsrError::TooLarge
        );
    }

    #[test]
    fn rejects_tampered_signature() {
        for k in [key(&PKCS_ECDSA_P256_SHA256), key(&PKCS_ED25519), rsa2048()] {
            let mut der = csr_for(&k);
            let last = der.len() - 1;
            der[last] ^= 0x01; // inside the signature BIT STRING
            assert_eq!(verify_csr(&der).unwrap_err(), CsrError::BadSignature);
        }
    }

    #[test]
    fn rejects_swapped_public_key() {
        let a = key(&PKCS_ECDSA_P256_SHA256);
        let b = key(&PKCS_ECDSA_P256_SHA256);
        let mut der = csr_for(&a);
        let spki_a = a.subject_public_key_info();
        let spki_b = b.subject_public_key_info();
        assert_eq!(spki_a.len(), spki_b.len());
        let at = der
            .windows(spki_a.len())
            .position(|w| w == spki_a.as_slice())
            .unwrap();
        der[at..at + spki_b.len()].copy_from_slice(&spki_b);
        assert_eq!(verify_csr(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn rejects_rsa_1024() {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(RSA1024_CSR_B64)
            .unwrap();
        match verify_csr(&der) {
            Err(CsrError::UnsupportedKey(m)) => assert!(m.contains("RSA-1024"), "{m}"),
            other => panic!("expected UnsupportedKey, got {other:?}"),
        }
    }

    /// `openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha1 -subj /CN=sha1 -outform DER`
    const SHA1_CSR_B64: &str = "MIHJMHECAQAwDzENMAsGA1UEAwwEc2hhMTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABDVEF9jidsV3t3xtYNavbR5Yn4PQ0/5DUXrmBHvxt7zYwKZ9zSB/8KtZMv5I8Hx+/T/QQAMNdBeSr5xxuLImksGgADAJBgcqhkjOPQQBA0kAMEYCIQCuGYlXt8BE4mdqm0uc8w4nNGWh6lxQ67BeNF9W8KG1fAIhAKXkEBdQHyLIdZ7KlocRW+MGCFuEFZ2OdZtSaF4KG63l";

    #[test]
    fn rejects_sha1_signed_csr() {
        use base64::Engine;
        let der = base64::engine::general_purpose::STANDARD
            .decode(SHA1_CSR_B64)
            .unwrap();
        assert!(matches!(
            verify_csr(&der),
            Err(CsrError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn csr_extensions_do_not_matter_to_intake() {
        // A CSR asking to be a CA still verifies: intake ignores requests,
        // issuance never reads them (tested in x509.rs).
        let k = key(&PKCS_ECDSA_P256_SHA256);
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.serialize_request(&k).unwrap().der().to_vec();
        assert_eq!(verify_csr(&der).unwrap().key_kind(), KeyKind::P256);
    }

    #[test]
    fn modulus_bits() {
        assert_eq!(rsa_modulus_bits(&[0x00, 0x80, 0, 0]), Some(24));
        assert_eq!(rsa_modulus_bits(&[0x01, 0xff]), Some(9));
        assert_eq!(rsa_modulus_bits(&[0x00, 0x00]), None);
        assert_eq!(rsa_modulus_bits(&[]), None);
        assert_eq!(rsa_modulus_bits(&[0x80]), None);
    }

    #[test]
    fn never_panics_on_mutations() {
        // Every single-byte corruption and every truncation of a valid CSR
        // must come back as an error (or, rarely, a still-valid CSR), never a panic.
        for k in [key(&PKCS_ECDSA_P256_SHA256), key(&PKCS_ED25519)] {
            let good = csr_for(&k);
            for i in 0..good.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut m = good.clone();
                    m[i] ^= x;
                    let _ = verify_csr(&m);
                }
                let _ = verify_csr(&good[..i]);
            }
        }
    }
}

/// Property tests: `verify_csr` never panics, and a CSR whose signature or
/// key was touched never verifies (so no one gets a certificate for a key
/// they cannot sign with).
#[cfg(test)]
mod proptests {
    use std::sync::OnceLock;

    use proptest::{collection::vec, prelude::*, sample::Index};
    use rcgen::{RsaKeySize, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519};

    use super::{tests::csr_for, *};

    /// A valid CSR and where its parts sit in the DER.
    struct Fixture {
        der: Vec<u8>,
        spki: Vec<u8>,
        /// Byte range of the public key BIT STRING contents.
        key: std::ops::Range<usize>,
        /// Byte range of the signature BIT STRING contents.
        sig: std::ops::Range<usize>,
    }

    fn range_of(der: &[u8], part: &[u8]) -> std::ops::Range<usize> {
        let at = der
            .windows(part.len())
            .position(|w| w == part)
            .expect("part occurs in the DER");
        at..at + part.len()
    }

    /// One CSR per key type we certify, made once (RSA key generation is slow).
    fn fixtures() -> &'static [Fixture] {
        static F: OnceLock<Vec<Fixture>> = OnceLock::new();
        F.get_or_init(|| {
            let keys = [
                rcgen::KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
                rcgen::KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap(),
                rcgen::KeyPair::generate_for(&PKCS_ED25519).unwrap(),
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
                    .unwrap(),
            ];
            keys.iter()
                .map(|k| {
                    let der = csr_for(k);
                    let (spki, key, sig) = {
                        let (_, csr) = X509CertificationRequest::from_der(&der).unwrap();
                        let info = &csr.certification_request_info;
                        (
                            info.subject_pki.raw.to_vec(),
                            range_of(&der, &info.subject_pki.subject_public_key.data),
                            range_of(&der, &csr.signature_value.data),
                        )
                    };
                    Fixture {
                        der,
                        spki,
                        key,
                        sig,
                    }
                })
                .collect()
        })
    }

    fn fixture(i: &Index) -> &'static Fixture {
        let f = fixtures();
        &f[i.index(f.len())]
    }

    /// How to damage a DER blob.
    #[derive(Debug, Clone)]
    enum Mutation {
        Xor(Index, u8),
        Truncate(Index),
        Insert(Index, u8),
        Remove(Index),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<Index>(), 1u8..).prop_map(|(i, x)| Mutation::Xor(i, x)),
            any::<Index>().prop_map(Mutation::Truncate),
            (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
            any::<Index>().prop_map(Mutation::Remove),
        ]
    }

    fn apply(der: &[u8], muts: &[Mutation]) -> Vec<u8> {
        let mut d = der.to_vec();
        for m in muts {
            if d.is_empty() {
                break;
            }
            match m {
                Mutation::Xor(i, x) => {
                    let i = i.index(d.len());
                    d[i] ^= x;
                }
                Mutation::Truncate(i) => d.truncate(i.index(d.len())),
                Mutation::Insert(i, b) => d.insert(i.index(d.len() + 1), *b),
                Mutation::Remove(i) => {
                    d.remove(i.index(d.len()));
                }
            }
        }
        d
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(prefix in vec(any::<u8>(), 0..8), bytes in vec(any::<u8>(), 0..1024)) {
            // A SEQUENCE header first gets past the very first check more often.
            let mut der = vec![0x30, 0x82];
            der.extend(prefix);
            der.extend(&bytes);
            let _ = verify_csr(&der);
            let _ = verify_csr(&bytes);
        }

        #[test]
        fn mutated_csrs_never_panic_and_only_ever_certify_the_signing_key(
            f in any::<Index>(),
            muts in vec(mutation(), 1..4),
        ) {
            let f = fixture(&f);
            let der = apply(&f.der, &muts);
            if let Ok(v) = verify_csr(&der) {
                prop_assert_eq!(v.spki_der(), f.spki.as_slice());
            }
        }

        #[test]
        fn a_changed_signature_byte_never_verifies(f in any::<Index>(), at in any::<Index>(), x in 1u8..) {
            let f = fixture(&f);
            let mut der = f.der.clone();
            der[f.sig.start + at.index(f.sig.len())] ^= x;
            prop_assert!(verify_csr(&der).is_err());
        }

        #[test]
        fn a_changed_key_byte_never_verifies(f in any::<Index>(), at in any::<Index>(), x in 1u8..) {
            let f = fixture(&f);
            let mut der = f.der.clone();
            der[f.key.start + at.index(f.key.len())] ^= x;
            prop_assert!(verify_csr(&der).is_err());
        }
    }

    #[test]
    fn fixtures_verify_unchanged() {
        for f in fixtures() {
            assert_eq!(verify_csr(&f.der).unwrap().spki_der(), f.spki.as_slice());
        }
    }
}

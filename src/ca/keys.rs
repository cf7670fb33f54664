//! Key files and the signing seam. Keys live in PKCS#8 PEM files written
//! through [`crate::secret`] (0600, fsynced, refused when group/world can
//! read them) and are parsed exactly once into aws-lc-rs key objects, which
//! keep the private scalar inside aws-lc and wipe it on free.
//!
//! [`P256Signer`] is the single place that turns the CA key into rcgen
//! signatures; an HSM/KMS-backed signer would replace it here.
//!
//! Must not: put key bytes in errors, `Debug` output or logs. Intermediate
//! PEM/DER buffers are wrapped in [`Secret`]/[`Zeroizing`] (best effort:
//! library-internal copies are out of our hands).

use std::{fmt, path::Path};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{
        EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
    },
};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use zeroize::Zeroizing;

use super::CaError;
use crate::secret::{self, Secret};

/// PEM label of an unencrypted PKCS#8 private key (RFC 7468 §10).
pub(super) const PKCS8_LABEL: &str = "PRIVATE KEY";
/// PEM label of an X.509 certificate (RFC 7468 §5).
pub(super) const CERT_LABEL: &str = "CERTIFICATE";

/// The CA's ECDSA P-256 key, signing with SHA-256 and ASN.1 (DER) signatures
/// as X.509 requires.
pub(super) struct P256Signer(EcdsaKeyPair);

impl P256Signer {
    /// A fresh key from the OS CSPRNG.
    pub(super) fn generate() -> Result<Self, CaError> {
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
            .map(Self)
            .map_err(|_| CaError::Key("P-256 key generation failed".into()))
    }

    /// Wraps an already parsed P-256 key pair (ASN.1 signing).
    pub(super) fn from_key_pair(key: EcdsaKeyPair) -> Self {
        Self(key)
    }

    /// The private key as PKCS#8 v1 DER.
    pub(super) fn to_pkcs8(&self) -> Result<Secret, CaError> {
        let doc = self
            .0
            .to_pkcs8v1()
            .map_err(|_| CaError::Key("PKCS#8 serialisation failed".into()))?;
        Ok(Secret::new(doc.as_ref().to_vec()))
    }

    /// The SEC1 uncompressed public point (`0x04 || X || Y`, 65 bytes).
    pub(super) fn public_point(&self) -> &[u8] {
        self.0.public_key().as_ref()
    }
}

impl fmt::Debug for P256Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("P256Signer(***)")
    }
}

impl rcgen::PublicKeyData for P256Signer {
    fn der_bytes(&self) -> &[u8] {
        self.public_point()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for P256Signer {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0
            .sign(&SystemRandom::new(), msg)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// Loads the ECDSA P-256 PKCS#8 PEM key at `path` for `alg`, generating and
/// persisting one (0600) when the file is missing. Returns whether it was created.
///
/// # Errors
/// [`CaError::SecretFile`] for unreadable, too-open or unwritable files;
/// [`CaError::Key`] when the file is not a PKCS#8 P-256 key.
pub(super) fn load_or_generate_p256(
    path: &Path,
    alg: &'static EcdsaSigningAlgorithm,
) -> Result<(EcdsaKeyPair, bool), CaError> {
    // The candidate is cheap (~tens of µs) and only persisted when the file
    // does not exist; `load_or_generate` settles races between processes.
    let candidate = P256Signer::generate()?.to_pkcs8()?;
    let candidate = pem_encode_secret(PKCS8_LABEL, candidate.expose());
    let (pem, created) = secret::load_or_generate(path, move || candidate)?;
    let der = pem_decode(pem.expose(), PKCS8_LABEL)
        .map_err(|why| CaError::Key(format!("{}: {why}", path.display())))?;
    let key = EcdsaKeyPair::from_pkcs8(alg, der.expose()).map_err(|_| {
        CaError::Key(format!(
            "{} is not an unencrypted PKCS#8 ECDSA P-256 private key",
            path.display()
        ))
    })?;
    Ok((key, created))
}

/// PEM text (RFC 7468) for `der` under `label`, 64-column base64 lines.
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let mut out = String::with_capacity(pem_len(label, b64.len()));
    push_pem(&mut out, label, &b64);
    out
}

/// Like [`pem_encode`] for secret DER: the text is built in one allocation
/// and handed out as a [`Secret`].
fn pem_encode_secret(label: &str, der: &[u8]) -> Secret {
    let b64 = Zeroizing::new(STANDARD.encode(der));
    let mut out = String::with_capacity(pem_len(label, b64.len()));
    push_pem(&mut out, label, &b64);
    Secret::new(out.into_bytes())
}

fn pem_len(label: &str, b64_len: usize) -> usize {
    // "-----BEGIN " + label + "-----\n", body + newlines, "-----END " + label + "-----\n"
    (11 + label.len() + 6) + b64_len + b64_len.div_ceil(64) + (9 + label.len() + 6)
}

fn push_pem(out: &mut String, label: &str, b64: &str) {
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // base64 output is ASCII, so every byte offset is a char boundary.
    for line in b64.as_bytes().chunks(64) {
        for &c in line {
            out.push(char::from(c));
        }
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// Decodes the first PEM block labelled `label` in `text`. Other blocks and
/// text outside the block are ignored. The decoded DER is returned as a
/// [`Secret`] because key files go through here.
///
/// # Errors
/// A short description naming the expected label (never the content).
pub(super) fn pem_decode(text: &[u8], label: &str) -> Result<Secret, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let after_begin = find(text, begin.as_bytes())
        .and_then(|at| text.get(at.checked_add(begin.len())?..))
        .ok_or_else(|| format!("no '{begin}' block (expected {label} PEM)"))?;
    let body = find(after_begin, end.as_bytes())
        .and_then(|len| after_begin.get(..len))
        .ok_or_else(|| format!("missing '{end}'"))?;
    let mut b64 = Zeroizing::new(Vec::with_capacity(body.len()));
    b64.extend(body.iter().copied().filter(|b| !b.is_ascii_whitespace()));
    let der = STANDARD
        .decode(b64.as_slice())
        .map_err(|_| format!("invalid base64 in {label} PEM block"))?;
    if der.is_empty() {
        return Err(format!("empty {label} PEM block"));
    }
    Ok(Secret::new(der))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING;

    use super::*;

    #[test]
    fn pem_roundtrip_and_length() {
        for n in [1usize, 47, 48, 49, 200] {
            let der: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let pem = pem_encode("THING", &der);
            assert_eq!(pem.len(), pem_len("THING", STANDARD.encode(&der).len()));
            assert!(pem.lines().all(|l| l.len() <= 64));
            assert_eq!(pem_decode(pem.as_bytes(), "THING").unwrap().expose(), der);
            assert!(pem_decode(pem.as_bytes(), "OTHER").is_err());
        }
        assert!(pem_decode(b"-----BEGIN X-----\n!!\n-----END X-----\n", "X").is_err());
        assert!(pem_decode(b"-----BEGIN X-----\nAAAA\n", "X").is_err());
    }

    #[test]
    fn key_file_generated_0600_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        let (a, created) = load_or_generate_p256(&p, &ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        assert!(created);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(fs::read_to_string(&p)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let (b, created) = load_or_generate_p256(&p, &ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        assert!(!created);
        assert_eq!(a.public_key().as_ref(), b.public_key().as_ref());
    }

    #[test]
    fn non_p256_key_file_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        let ed = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let der = ed.to_pkcs8().unwrap();
        let pem = pem_encode(PKCS8_LABEL, der.as_ref());
        secret::create_secret_file(&p, pem.as_bytes()).unwrap();
        let err = load_or_generate_p256(&p, &ECDSA_P256_SHA256_FIXED_SIGNING).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CaError::Key(_)), "{msg}");
        let body: String = pem.lines().nth(1).unwrap().chars().take(16).collect();
        assert!(!msg.contains(&body));
    }

    #[test]
    fn signer_debug_is_redacted() {
        let s = P256Signer::generate().unwrap();
        assert_eq!(format!("{s:?}"), "P256Signer(***)");
        assert_eq!(s.public_point().len(), 65);
    }
}

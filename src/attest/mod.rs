//! Attestation verifiers: platform evidence in, a [`VerifiedAttestation`] out.
//!
//! This module owns *checking evidence*: it decides whether a document
//! (an AWS Nitro Enclaves attestation document, a CI/Kubernetes OIDC token)
//! is authentic, fresh and bound to the caller's CSR key, and turns it into
//! selectors (`aws_nitro:pcr0:<hex>`, `oidc:<alias>:<claim>:<value>`), a
//! node name and a [`ReplayGuard`]. It does not decide what gets issued:
//! policy maps selectors to identities and the CA signs (STYLE.md §3.2).
//!
//! Must not: know about gRPC, SQL, the store or plans; import anything from
//! the crate but the leaves (`identity`, `secret`, `clock`); panic on any
//! input; echo a raw document or token in an error.
//!
//! # Making "verified" a type (STYLE.md §3.3)
//! [`VerifiedAttestation`] has private fields and no public constructor, so
//! the only way to obtain one is an [`Attestor`] in this module accepting a
//! document. Every verifier binds the evidence to the CSR inside the check:
//!
//! | format | freshness | one use | CSR binding |
//! |---|---|---|---|
//! | `aws_nitro` | `timestamp` within the window | `nonce` = an outstanding server challenge ([`ReplayGuard::Challenge`]) | `public_key` = CSR SPKI, or `user_data` = SHA-256(CSR DER) |
//! | `oidc` | `iat` within the window, `exp`/`nbf` | `jti` remembered until expiry ([`ReplayGuard::Jti`]) | optional claim = hex SHA-256(CSR DER), else none |
//!
//! A verifier *returns* the replay guard; it cannot consume it, because one
//! use must be enforced in the same store transaction that records the
//! issued certificate. The broker does that.
//!
//! # Adding a method
//! One file per method implementing [`Attestor`], listed in
//! [`registry::Registry::new`]. Anything that weakens verification goes
//! behind an `insecure` name and a non-default feature (STYLE.md §3.14).

use std::fmt;

mod nitro;
mod oidc;
pub mod registry;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;

pub use nitro::{NitroAttestor, NitroConfig, AWS_NITRO_ROOT_G1_PEM, AWS_NITRO_ROOT_G1_SHA256};
pub use oidc::{OidcAttestor, OidcIssuer, Preset, OIDC_LEEWAY_SECS};
pub use registry::{AttestConfig, Registry};

/// Largest attestation document (Nitro COSE_Sign1 or compact JWS) we look
/// at, in bytes. Larger inputs are refused with [`AttestError::TooLarge`]
/// before any parsing. Real Nitro documents are about 4.5 KiB (the NSM
/// driver caps responses at 12 KiB); CI tokens are 1–3 KiB.
pub const MAX_DOCUMENT_LEN: usize = 16 * 1024;

/// Everything a verifier needs besides its configuration.
///
/// `csr_der` and `csr_spki_der` must come from the same CSR, whose
/// self-signature the caller has already verified (`ca::verify_csr`): this
/// module compares bytes and does not re-parse the CSR.
#[derive(Clone, Copy)]
pub struct AttestInput<'a> {
    /// The evidence exactly as the workload sent it.
    pub document: &'a [u8],
    /// DER of the caller's PKCS#10 CSR.
    pub csr_der: &'a [u8],
    /// DER SubjectPublicKeyInfo of the CSR key.
    pub csr_spki_der: &'a [u8],
    /// The current time, Unix milliseconds (from the broker's `Clock`).
    pub now_ms: i64,
    /// How far the evidence's own time (Nitro `timestamp`, OIDC `iat`) may
    /// be from `now_ms`, in seconds, either way. Negative counts as 0.
    pub window_secs: i64,
}

impl fmt::Debug for AttestInput<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Sizes only: the document may be a bearer token.
        f.debug_struct("AttestInput")
            .field("document_len", &self.document.len())
            .field("csr_len", &self.csr_der.len())
            .field("now_ms", &self.now_ms)
            .field("window_secs", &self.window_secs)
            .finish()
    }
}

/// What makes an attestation one-use. The broker checks and consumes it in
/// the issuing transaction; a guard that was already consumed means replay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayGuard {
    /// Nitro: the document's nonce must be an outstanding server challenge
    /// (GetChallenge); the broker checks and consumes it.
    Challenge(Vec<u8>),
    /// OIDC: `key` = `"<issuer alias>:<jti>"`, remembered until
    /// `expires_at_ms`, the last instant at which this verifier would still
    /// accept the token (its `exp` plus [`OIDC_LEEWAY_SECS`]).
    Jti {
        /// `"<alias>:<jti>"`.
        key: String,
        /// Unix ms after which the token is refused anyway, so the key may be forgotten.
        expires_at_ms: i64,
    },
}

/// How the evidence was tied to the CSR key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CsrBinding {
    /// Nitro `public_key` equals the CSR's SubjectPublicKeyInfo DER.
    PublicKey,
    /// Nitro `user_data` equals SHA-256 of the CSR DER.
    UserDataHash,
    /// The issuer's configured binding claim equals hex SHA-256 of the CSR DER.
    OidcClaim,
    /// Not bound: the issuer cannot carry the key. Single use of the
    /// evidence ([`ReplayGuard`]) is then the only protection; whoever
    /// presents it first gets the identity.
    None,
}

impl CsrBinding {
    /// A stable lowercase name for audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PublicKey => "public_key",
            Self::UserDataHash => "user_data_hash",
            Self::OidcClaim => "oidc_claim",
            Self::None => "none",
        }
    }
}

/// A verified attestation. Only this module constructs it (private fields,
/// no public constructor); issuing from attestation requires one.
#[derive(Debug, Clone)]
pub struct VerifiedAttestation {
    format: &'static str,
    selectors: Vec<String>,
    replay_guard: ReplayGuard,
    node: String,
    csr_binding: CsrBinding,
}

impl VerifiedAttestation {
    /// The verifier that accepted the evidence: `"aws_nitro"` or `"oidc"`.
    pub fn format(&self) -> &str {
        self.format
    }

    /// Facts the evidence proves, e.g. `aws_nitro:pcr0:<hex>`,
    /// `aws_nitro:module_id:<id>`, `oidc:<alias>:<claim>:<value>`. Sorted,
    /// without duplicates. Policy matches these; they carry no authority alone.
    pub fn selectors(&self) -> &[String] {
        &self.selectors
    }

    /// What the broker must consume to make this attestation single use.
    pub fn replay_guard(&self) -> &ReplayGuard {
        &self.replay_guard
    }

    /// The attested node, for revocation by node: the Nitro `module_id`, or
    /// `"<alias>:<sub>"` for OIDC.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// How the CSR key was bound to the evidence.
    pub fn csr_binding(&self) -> CsrBinding {
        self.csr_binding
    }

    /// The one constructor, for verifiers in this module only.
    fn new(
        format: &'static str,
        mut selectors: Vec<String>,
        replay_guard: ReplayGuard,
        node: String,
        csr_binding: CsrBinding,
    ) -> Self {
        selectors.sort();
        selectors.dedup();
        Self {
            format,
            selectors,
            replay_guard,
            node,
            csr_binding,
        }
    }
}

/// One attestation method. Implementations are pure: no I/O, no clock
/// (time comes in [`AttestInput::now_ms`]), no state changes.
pub trait Attestor: Send + Sync + 'static {
    /// The format name requests use: `"aws_nitro"` or `"oidc"`.
    fn format(&self) -> &'static str;

    /// Verifies `input.document` and binds it to the CSR.
    ///
    /// # Errors
    /// [`AttestError::TooLarge`] for a document over [`MAX_DOCUMENT_LEN`];
    /// [`AttestError::Invalid`] naming the first failed check.
    fn attest(&self, input: &AttestInput<'_>) -> Result<VerifiedAttestation, AttestError>;
}

/// Why evidence or attestation configuration was refused. Messages describe
/// the failed check and never contain the raw document or token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// No verifier for this format is configured.
    #[error("unknown attestation format {0:?}")]
    UnknownFormat(String),
    /// The evidence failed a check.
    #[error("invalid attestation: {0}")]
    Invalid(String),
    /// The document is larger than [`MAX_DOCUMENT_LEN`].
    #[error("attestation document is larger than {MAX_DOCUMENT_LEN} bytes")]
    TooLarge,
    /// The attestation configuration is unusable (raised at startup by
    /// [`Registry::new`], never while verifying).
    #[error("attestation config: {0}")]
    Config(String),
}

/// Shorthand for an [`AttestError::Invalid`].
fn invalid(msg: impl Into<String>) -> AttestError {
    AttestError::Invalid(msg.into())
}

/// Shorthand for an [`AttestError::Config`].
fn config_err(msg: impl Into<String>) -> AttestError {
    AttestError::Config(msg.into())
}

/// Quotes an untrusted string for an error message: at most 64 chars,
/// control characters escaped, so a hostile value cannot forge log lines.
fn quoted(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// SHA-256 of `bytes`.
fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// `|now_ms - at_ms| <= window_secs * 1000`, computed without overflow.
fn within_window(now_ms: i64, at_ms: i128, window_secs: i64) -> bool {
    let window_ms = i128::from(window_secs.max(0)) * 1000;
    (i128::from(now_ms) - at_ms).abs() <= window_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_truncates_and_escapes() {
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
        let long = "x".repeat(100);
        assert_eq!(quoted(&long).chars().count(), 64 + 3);
    }

    #[test]
    fn window_is_symmetric_and_overflow_free() {
        assert!(within_window(10_000, 5_000, 5));
        assert!(!within_window(10_000, 4_999, 5));
        assert!(within_window(10_000, 15_000, 5));
        assert!(!within_window(10_000, 15_001, 5));
        // Extremes neither overflow nor wrap around.
        assert!(within_window(i64::MIN, i128::from(u64::MAX), i64::MAX));
        assert!(!within_window(i64::MIN, i128::from(u64::MAX), 0));
        assert!(!within_window(0, 1, -5));
    }

    #[test]
    fn verified_attestation_sorts_and_dedups_selectors() {
        let v = VerifiedAttestation::new(
            "oidc",
            vec!["b".into(), "a".into(), "b".into()],
            ReplayGuard::Challenge(vec![1]),
            "n".into(),
            CsrBinding::None,
        );
        assert_eq!(v.selectors(), ["a", "b"]);
        assert_eq!(v.csr_binding().as_str(), "none");
    }
}

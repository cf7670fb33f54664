//! Durable state behind one trait. Every one-use rule (nonce, token use) is
//! enforced *inside* a single store method, atomically, so a caller can
//! never split the check from the consumption. Backends: [`sqlite`] (the
//! embedded default, group commit). The store knows nothing of crypto.

#[cfg(test)]
pub mod conformance;
pub mod sqlite;

use async_trait::async_trait;

use crate::audit::{AuditRecord, AuditRow};

/// Store failures. None of these carry request data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend could not be reached or failed; the operation may not have happened.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A record violated a constraint that callers should have prevented
    /// (e.g. duplicate token id).
    #[error("store conflict: {0}")]
    Conflict(String),
    /// Stored data could not be decoded.
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// Enrollment token metadata. The token secret is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// 32 lowercase hex chars.
    pub token_id: String,
    /// SPIFFE ID the token enrolls as.
    pub spiffe_id: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms; redemption at or after this instant is refused.
    pub expires_at_ms: i64,
    /// Total redemptions allowed (≥ 1).
    pub max_uses: u32,
    /// Redemptions so far.
    pub uses: u32,
    /// When revoked, Unix ms.
    pub revoked_at_ms: Option<i64>,
}

/// A certificate the broker issued, recorded before it is returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// Lowercase hex of the serial number's bytes.
    pub serial: String,
    /// Token that paid for it, if any.
    pub token_id: Option<String>,
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// Lowercase hex SHA-256 of the certified SubjectPublicKeyInfo DER.
    pub spki_sha256: String,
    /// Unix ms.
    pub issued_at_ms: i64,
    /// Unix ms.
    pub not_after_ms: i64,
    /// The certificate DER.
    pub der: Vec<u8>,
}

/// Everything one token redemption needs, applied atomically by
/// [`Store::redeem_token`].
#[derive(Debug, Clone)]
pub struct Redemption {
    /// The token being redeemed.
    pub token_id: String,
    /// The request nonce, already scoped by the caller (e.g. `enroll:<b64>`).
    pub nonce: String,
    /// When the nonce may be forgotten (Unix ms): window + skew after its timestamp.
    pub nonce_expires_at_ms: i64,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// The freshly signed certificate, kept only if the redemption wins.
    pub cert: IssuedCert,
    /// Appended to the audit chain in the same transaction when the outcome is `Issued`.
    pub audit: AuditRecord,
}

/// Result of [`Store::redeem_token`]. Only `Issued` and `Retried` change state
/// (the nonce is consumed in both; `Issued` also takes a token use and records
/// the certificate and audit row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedeemOutcome {
    /// The certificate was recorded and the token use consumed.
    Issued,
    /// The token was already used up, but a still-valid certificate it issued
    /// certifies the same key (`spki_sha256`): that certificate is returned.
    Retried(IssuedCert),
    /// The nonce was seen before (and is still remembered).
    NonceReplayed,
    /// No such token.
    TokenUnknown,
    /// The token expired.
    TokenExpired,
    /// The token was revoked.
    TokenRevoked,
    /// Every use was consumed and no certificate for this key exists.
    TokenAlreadyUsed,
}

/// Result of [`Store::revoke_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    /// Revoked now.
    Revoked,
    /// Was already revoked; nothing changed.
    AlreadyRevoked,
    /// No such token.
    Unknown,
}

/// Counts of rows, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Enrollment tokens.
    pub tokens: u64,
    /// Issued certificates.
    pub issued: u64,
    /// Remembered nonces.
    pub nonces: u64,
    /// Audit rows.
    pub audit: u64,
}

/// The broker's durable state. Methods that change state are durable
/// (fsynced) when they return `Ok`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a new token and its audit row atomically.
    ///
    /// # Errors
    /// `Conflict` if the id exists; `Unavailable` on backend failure.
    async fn create_token(&self, token: TokenRecord, audit: AuditRecord) -> Result<(), StoreError>;

    /// One token by id.
    async fn fetch_token(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// All tokens, newest first.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Marks a token revoked at `now_ms`; the audit row is appended only when
    /// the outcome is `Revoked`.
    async fn revoke_token(
        &self,
        token_id: &str,
        now_ms: i64,
        audit: AuditRecord,
    ) -> Result<RevokeOutcome, StoreError>;

    /// The still-valid (`not_after_ms > now_ms`) certificate issued for
    /// `token_id` to the key `spki_sha256`, if any. A read-only hint: the
    /// decision is taken again inside [`Store::redeem_token`].
    async fn fetch_issued_for_token(
        &self,
        token_id: &str,
        spki_sha256: &str,
        now_ms: i64,
    ) -> Result<Option<IssuedCert>, StoreError>;

    /// One certificate by serial.
    async fn fetch_issued(&self, serial: &str) -> Result<Option<IssuedCert>, StoreError>;

    /// Redeems a token atomically. In one transaction, in this order:
    /// 1. nonce already remembered → `NonceReplayed`;
    /// 2. token missing → `TokenUnknown`; revoked → `TokenRevoked`;
    /// 3. a certificate issued for this token to `cert.spki_sha256` that is
    ///    still valid at `now_ms` → remember the nonce, `Retried(that cert)`;
    /// 4. `now_ms >= expires_at_ms` → `TokenExpired`;
    /// 5. `uses >= max_uses` → `TokenAlreadyUsed`;
    /// 6. otherwise remember the nonce, `uses += 1`, record `cert`, append
    ///    `audit` → `Issued`.
    ///
    /// Nothing changes for the refusals. Durable before it returns.
    async fn redeem_token(&self, redemption: Redemption) -> Result<RedeemOutcome, StoreError>;

    /// Appends one audit row; returns its `seq`.
    async fn append_audit(&self, audit: AuditRecord) -> Result<u64, StoreError>;

    /// Audit rows with `seq > after_seq`, ascending, at most `limit`.
    async fn list_audit(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// Forgets nonces whose `expires_at_ms <= now_ms`; returns how many.
    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Row counts.
    async fn counts(&self) -> Result<StoreCounts, StoreError>;

    /// Waits until everything accepted so far is durable and stops accepting
    /// writes. Called on graceful shutdown.
    async fn close(&self);
}

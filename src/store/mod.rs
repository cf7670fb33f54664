//! Durable state behind one trait. Every one-use rule (nonce, token use) is
//! enforced *inside* a single store method, atomically, so a caller can
//! never split the check from the consumption. Backends: [`sqlite`] (the
//! embedded default, group commit). The store knows nothing of crypto.

#[cfg(test)]
pub mod conformance;
pub mod postgres;
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
    /// Key generation of the CA that signed it.
    pub ca_gen: u32,
    /// How the identity was first established: `token` or `attest:<format>`
    /// (kept across renewals).
    pub origin: String,
    /// The attested node (e.g. Nitro `module_id`, `<issuer>:<sub>`), if any.
    pub node: Option<String>,
}

/// What a revocation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationKind {
    /// One certificate, by lowercase hex serial.
    Serial,
    /// Every certificate and JWT of a SPIFFE ID issued up to the revocation time.
    SpiffeId,
    /// An attested node: it can no longer enroll, its certificates are revoked.
    Node,
    /// One JWT-SVID by `jti`.
    Jti,
    /// Everything a CA key generation signed (compromise rotation).
    CaGeneration,
}

impl RevocationKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::SpiffeId => "spiffe_id",
            Self::Node => "node",
            Self::Jti => "jti",
            Self::CaGeneration => "ca_generation",
        }
    }

    /// Parses [`RevocationKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "serial" => Self::Serial,
            "spiffe_id" => Self::SpiffeId,
            "node" => Self::Node,
            "jti" => Self::Jti,
            "ca_generation" => Self::CaGeneration,
            _ => return None,
        })
    }
}

/// A revocation entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// What it covers.
    pub kind: RevocationKind,
    /// Serial, SPIFFE ID, node, jti or generation number.
    pub value: String,
    /// When, Unix ms (for SPIFFE IDs: covers what was issued up to here).
    pub revoked_at_ms: i64,
    /// Forgotten after this instant (everything it covers has expired); `None` = kept.
    pub expires_at_ms: Option<i64>,
    /// Operator's reason (free text, no secrets).
    pub reason: String,
}

/// A renewal, applied by [`Store::renew_cert`].
#[derive(Debug, Clone)]
pub struct Renewal {
    /// Serial of the certificate presented over mTLS.
    pub parent_serial: String,
    /// The new certificate (its `origin`/`node` are copied from the parent by the store).
    pub cert: IssuedCert,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Appended on success.
    pub audit: AuditRecord,
}

/// Result of [`Store::renew_cert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Recorded.
    Issued,
    /// The parent certificate is revoked (by serial, SPIFFE ID, node or CA generation).
    Revoked,
    /// The parent was not issued by this broker.
    UnknownParent,
}

/// What makes an attestation one-use, as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestGuard {
    /// A server challenge (hex) that must be outstanding; consumed.
    Challenge(String),
    /// A one-use key (e.g. `oidc:<alias>:<jti>`) remembered until the instant given.
    OneUse {
        /// The key.
        key: String,
        /// Forgotten after this instant, Unix ms.
        expires_at_ms: i64,
    },
}

/// An attestation-based issuance, applied atomically by [`Store::redeem_attestation`].
#[derive(Debug, Clone)]
pub struct AttestRedemption {
    /// The replay guard to consume.
    pub guard: AttestGuard,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// The certificate to record.
    pub cert: IssuedCert,
    /// Appended on success.
    pub audit: AuditRecord,
}

/// Result of [`Store::redeem_attestation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestOutcome {
    /// Guard consumed, certificate recorded.
    Issued,
    /// The challenge was never issued (or already purged).
    ChallengeUnknown,
    /// The challenge expired.
    ChallengeExpired,
    /// The challenge or one-use key was already consumed.
    Replayed,
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

/// Lifecycle state of a stored plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanState {
    /// Proposed, collecting approvals.
    Pending,
    /// The one active plan.
    Active,
    /// Was active, replaced by a newer plan.
    Superseded,
    /// A proposal overtaken by another plan's activation, or expired.
    Stale,
}

impl PlanState {
    /// Stable lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Superseded => "superseded",
            Self::Stale => "stale",
        }
    }

    /// Parses [`PlanState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "active" => Self::Active,
            "superseded" => Self::Superseded,
            "stale" => Self::Stale,
            _ => return None,
        })
    }
}

/// A stored plan. The store treats the document as opaque text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRecord {
    /// 1, 2, 3, … in proposal order.
    pub version: u64,
    /// Hex SHA-256 of `canonical_json`.
    pub sha256: String,
    /// The canonical plan document.
    pub canonical_json: String,
    /// State.
    pub state: PlanState,
    /// Who proposed it (SPIFFE ID, `local-admin-socket` or `bootstrap`).
    pub proposer: String,
    /// Unix ms.
    pub created_at_ms: i64,
    /// A pending proposal cannot be approved at or after this instant.
    pub expires_at_ms: i64,
    /// When it became active.
    pub activated_at_ms: Option<i64>,
    /// Distinct approvals needed (fixed at proposal time from the then-active plan).
    pub required_approvals: u32,
    /// Approvers so far (the proposer first).
    pub approvals: Vec<String>,
}

/// The foundation plan install, applied atomically by [`Store::bootstrap_plan`].
#[derive(Debug, Clone)]
pub struct BootstrapInstall {
    /// Scoped nonce of the bootstrap request.
    pub nonce: String,
    /// When the nonce may be forgotten.
    pub nonce_expires_at_ms: i64,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Hex SHA-256 of the canonical plan.
    pub sha256: String,
    /// Canonical plan document.
    pub canonical_json: String,
    /// The one-time token for the first admin, created in the same transaction.
    pub admin_token: TokenRecord,
    /// Audit row appended on success.
    pub audit: AuditRecord,
}

/// Result of [`Store::bootstrap_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootstrapOutcome {
    /// Plan installed as `version` and active; bootstrap is now off for good.
    Installed {
        /// The plan's version (1).
        version: u64,
    },
    /// The nonce was seen before.
    NonceReplayed,
    /// A plan has already been activated.
    Disabled,
}

/// A new proposal, applied by [`Store::propose_plan`].
#[derive(Debug, Clone)]
pub struct PlanProposal {
    /// Hex SHA-256 of the canonical plan.
    pub sha256: String,
    /// Canonical plan document.
    pub canonical_json: String,
    /// Proposer identity; counts as the first approval.
    pub proposer: String,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Proposal expiry, Unix ms.
    pub expires_at_ms: i64,
    /// Approvals needed (from the active plan).
    pub required_approvals: u32,
    /// Version of the active plan the proposal was checked against
    /// (`None` when none is active): if another plan is active by the time
    /// the store applies it, the proposal is refused as stale.
    pub based_on: Option<u64>,
    /// Audit row for the proposal.
    pub audit: AuditRecord,
    /// Audit row appended if the proposal activates at once.
    pub activation_audit: AuditRecord,
}

/// Result of [`Store::propose_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProposeOutcome {
    /// Stored as pending with `approvals` so far.
    Pending {
        /// Version assigned.
        version: u64,
        /// Approvals so far (1: the proposer).
        approvals: u32,
    },
    /// Enough approvals already (the proposer's): active now.
    Activated {
        /// Version assigned.
        version: u64,
    },
    /// The active plan changed since the caller checked.
    Stale,
}

/// An approval, applied by [`Store::approve_plan`].
#[derive(Debug, Clone)]
pub struct PlanApproval {
    /// Plan version approved.
    pub version: u64,
    /// Hash the approver saw: must equal the stored hash.
    pub sha256: String,
    /// Approver identity.
    pub approver: String,
    /// Now, Unix ms.
    pub now_ms: i64,
    /// Audit row for the approval.
    pub audit: AuditRecord,
    /// Audit row appended if this approval activates the plan.
    pub activation_audit: AuditRecord,
}

/// Result of [`Store::approve_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApproveOutcome {
    /// Recorded; more approvals needed.
    Pending {
        /// Approvals so far.
        approvals: u32,
        /// Approvals needed.
        required: u32,
    },
    /// This approval activated the plan.
    Activated,
    /// This approver already approved; nothing changed.
    AlreadyApproved,
    /// No such version.
    NotFound,
    /// The stored hash differs from the one approved.
    HashMismatch,
    /// The plan is not pending (active, superseded or stale).
    NotPending,
    /// The proposal expired.
    Expired,
}

/// A change another replica made that this one must pick up (PostgreSQL:
/// delivered by LISTEN/NOTIFY; SQLite has one process and sends none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// A revocation was recorded.
    Revocation,
    /// A plan was activated.
    Plan,
    /// Shared key material or its manifest changed (rotation).
    Keys,
}

/// Most rows of one table that one [`Store::purge_expired`] transaction
/// deletes (SQLite's nonce sweep excepted); the purge repeats until a round
/// finds fewer.
pub const PURGE_CHUNK: u32 = 256;

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
    /// Plans in any state.
    pub plans: u64,
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

    /// Forgets nonces, challenges and revocations whose `expires_at_ms <= now_ms`; returns how many.
    /// Deletes in bounded rounds, one transaction each, so that the writes
    /// queued meanwhile are not held up behind one long delete (at 5,000
    /// enrollments/s a 30 s maintenance tick finds ~150,000 expired nonces):
    /// at most [`PURGE_CHUNK`] rows per table, except that SQLite walks the
    /// nonce table in key order, a few thousand keys a round.
    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Installs the foundation plan atomically: nonce unused → no plan was
    /// ever activated → store the plan as version 1 (active), create the
    /// admin token, remember the nonce, append the audit row. Exactly one call
    /// can ever return `Installed`.
    async fn bootstrap_plan(
        &self,
        install: BootstrapInstall,
    ) -> Result<BootstrapOutcome, StoreError>;

    /// Stores a proposal (the proposer's approval counted); activates it at
    /// once when that already meets `required_approvals`. Refuses with
    /// `Stale` when the active plan is no longer `based_on`. Activation
    /// supersedes the active plan and marks other pending proposals stale.
    async fn propose_plan(&self, proposal: PlanProposal) -> Result<ProposeOutcome, StoreError>;

    /// Records an approval, in order: version exists → pending → not expired
    /// → hash matches → approver new; activates when the count reaches the
    /// plan's `required_approvals` (same effects as in `propose_plan`).
    async fn approve_plan(&self, approval: PlanApproval) -> Result<ApproveOutcome, StoreError>;

    /// The active plan, if any.
    async fn fetch_active_plan(&self) -> Result<Option<PlanRecord>, StoreError>;

    /// One plan by version.
    async fn fetch_plan(&self, version: u64) -> Result<Option<PlanRecord>, StoreError>;

    /// Records a revocation (an existing entry for the same kind and value
    /// keeps the later `revoked_at_ms` and expiry) and its audit row.
    async fn revoke(&self, r: RevocationRecord, audit: AuditRecord) -> Result<(), StoreError>;

    /// Revocations not yet expired at `now_ms`.
    async fn list_revocations(&self, now_ms: i64) -> Result<Vec<RevocationRecord>, StoreError>;

    /// True when the certificate `serial` is covered by a revocation.
    async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError>;

    /// Renews atomically: the parent must exist and not be revoked (checked
    /// in the same transaction as the insert, so a concurrent revocation is
    /// never outrun); the new certificate inherits the parent's node, and its
    /// origin too unless it is marked `delegated:` (issued by an agent for a workload).
    async fn renew_cert(&self, renewal: Renewal) -> Result<RenewOutcome, StoreError>;

    /// Every unexpired issued certificate covered by a revocation, as
    /// (serial, revocation time in Unix ms, CA generation), for the CRLs.
    async fn revoked_serials(&self, now_ms: i64) -> Result<Vec<(String, i64, u32)>, StoreError>;

    /// Records an outstanding server challenge (hex), valid until `expires_at_ms`.
    async fn create_challenge(&self, nonce_hex: &str, expires_at_ms: i64)
        -> Result<(), StoreError>;

    /// Issues from a verified attestation atomically: the challenge must be
    /// outstanding, unexpired and unused (then it is marked used), or the
    /// one-use key unseen (then it is remembered); the certificate and audit
    /// row are recorded in the same transaction.
    async fn redeem_attestation(&self, r: AttestRedemption) -> Result<AttestOutcome, StoreError>;

    /// A shared metadata value (e.g. KEK-encrypted key material, the key
    /// ring manifest).
    async fn fetch_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores `value` under `key` unless a value exists; returns the stored
    /// value (ours, or the one another replica stored first). Replicas
    /// booting together on an empty store agree on one value.
    async fn insert_meta_if_absent(&self, key: &str, value: Vec<u8>)
        -> Result<Vec<u8>, StoreError>;

    /// Compare-and-swap: replaces the value of `key` with `new` only if it
    /// currently equals `expected`. Returns whether it did (so exactly one
    /// replica wins a rotation).
    async fn cas_meta(&self, key: &str, expected: &[u8], new: Vec<u8>) -> Result<bool, StoreError>;

    /// Changes made elsewhere (other replicas), for cache invalidation.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreEvent>;

    /// Row counts.
    async fn counts(&self) -> Result<StoreCounts, StoreError>;

    /// Waits until everything accepted so far is durable and stops accepting
    /// writes. Called on graceful shutdown.
    async fn close(&self);
}

//! [`Broker`]: the enrollment and token rules. Every RPC of the api layer is
//! one method here, so authorization and audit cannot be bypassed.
//!
//! Token enrollment follows DESIGN.md §2.1 and checks, in order, stopping at
//! the first failure: size limits → HMAC (constant time, needs no lookup) →
//! payload shape / action / token_id / CSR hash → freshness window → token
//! lookup and CSR proof of possession → sign in memory → one store
//! transaction (nonce unused, token usable, consume both, record the
//! certificate and its audit row) → respond. A signed certificate that loses
//! the race is dropped; nothing is returned before the commit is durable.

use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};

use super::{plans::with_plan, Error};
use crate::{
    audit::{AuditKind, AuditRecord, AuditRow, ChainVerifier},
    ca::{self, ring::Authority, JwtParams, X509Params},
    clock::Clock,
    identity::{SpiffeId, TrustDomain},
    policy::Plan,
    secret::Secret,
    store::{IssuedCert, RedeemOutcome, Redemption, RevokeOutcome, Store, TokenRecord},
    token::{self, EnrollPayload, TokenKey},
};

/// Largest CSR accepted, bytes.
pub const MAX_CSR_LEN: usize = 16 * 1024;
/// Most JWT audiences per request.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience string, bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Most uses one token may carry.
pub const MAX_TOKEN_USES: u32 = 1_000_000;

/// What a new X509-SVID is for, besides its key; see [`Broker::sign_leaf`].
pub(super) struct LeafSpec<'a> {
    pub id: &'a SpiffeId,
    pub csr: &'a ca::VerifiedCsr,
    pub now_ms: i64,
    pub ttl_secs: i64,
    pub dns_names: &'a [String],
    pub token_id: Option<String>,
    pub origin: String,
    pub node: Option<String>,
}

/// Tunables of the broker core.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// The trust domain every issued ID lives in.
    pub trust_domain: TrustDomain,
    /// Allowed |now − timestamp| for signed payloads, seconds (default 300).
    pub window_secs: i64,
    /// X509-SVID lifetime, seconds (default 3600).
    pub x509_ttl_secs: i64,
    /// JWT-SVID lifetime, seconds (default 300).
    pub jwt_ttl_secs: i64,
    /// Default token lifetime, seconds (default 600).
    pub default_token_ttl_secs: i64,
    /// Longest token lifetime an operator may ask for, seconds (default 30 days).
    pub max_token_ttl_secs: i64,
    /// `spiffe_refresh_hint` of the bundle, seconds.
    pub bundle_refresh_hint_secs: u64,
    /// Per-peer rate limits.
    pub rates: crate::ratelimit::RateConfig,
}

impl BrokerConfig {
    /// Defaults for `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            window_secs: 300,
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            default_token_ttl_secs: 600,
            max_token_ttl_secs: 30 * 24 * 3600,
            bundle_refresh_hint_secs: 300,
            rates: crate::ratelimit::RateConfig::default(),
        }
    }
}

/// Who is calling, for audit rows and authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The local operator on the admin socket (trusted by file permission).
    LocalAdmin,
    /// A network peer without a client certificate.
    Peer {
        /// `ip:port`, or `unknown`.
        addr: String,
    },
    /// A network peer whose X509-SVID (signed by our CA) the TLS handshake verified.
    Svid {
        /// `ip:port`, or `unknown`.
        addr: String,
        /// The certificate's SPIFFE ID.
        spiffe_id: String,
        /// Lowercase hex serial.
        serial: String,
    },
}

impl Caller {
    /// The identity recorded in audit rows: SPIFFE ID, address or the socket.
    pub fn describe(&self) -> String {
        match self {
            Self::LocalAdmin => "local-admin-socket".to_owned(),
            Self::Peer { addr } => addr.clone(),
            Self::Svid {
                spiffe_id, addr, ..
            } => format!("{spiffe_id}@{addr}"),
        }
    }

    /// The rate-limit key: the IP address, the SPIFFE ID of an mTLS caller,
    /// or `local` (never limited).
    pub fn rate_key(&self) -> Option<String> {
        match self {
            Self::LocalAdmin => None,
            Self::Peer { addr } => Some(crate::ratelimit::peer_key(addr)),
            Self::Svid { spiffe_id, .. } => Some(spiffe_id.clone()),
        }
    }

    /// The approver name for plans: SPIFFE ID, or `local-admin-socket`.
    pub fn principal(&self) -> String {
        match self {
            Self::Svid { spiffe_id, .. } => spiffe_id.clone(),
            other => other.describe(),
        }
    }
}

/// The active plan, cached in memory and refreshed on every activation.
#[derive(Debug, Clone)]
pub struct ActivePlan {
    /// Version.
    pub version: u64,
    /// Canonical hash.
    pub sha256: String,
    /// The plan.
    pub plan: Plan,
}

/// Secret material the broker core holds.
pub struct BrokerSecrets {
    /// K_token.
    pub token_key: TokenKey,
    /// The bootstrap secret, `None` when an external one is required and missing.
    pub bootstrap: Option<Secret>,
    /// Where it came from (`env`, `file`, `generated`, `missing`), for status.
    pub bootstrap_source: &'static str,
    /// Attestation verifiers (their trust anchors and issuer keys).
    pub attestors: crate::attest::registry::Registry,
}

/// The credential presented with a CSR.
#[derive(Clone)]
pub enum Credential {
    /// Proof of possession of an enrollment token.
    Token {
        /// Claimed token id.
        token_id: String,
        /// Exact signed payload bytes.
        payload: Vec<u8>,
        /// HMAC-SHA256 over `payload`.
        signature: Vec<u8>,
    },
    /// A platform attestation document.
    Attestation {
        /// Format name, e.g. `aws_nitro`.
        format: String,
        /// The document bytes.
        document: Vec<u8>,
    },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { token_id, .. } => f
                .debug_struct("Token")
                .field("token_id", token_id)
                .finish_non_exhaustive(),
            Self::Attestation { format, document } => f
                .debug_struct("Attestation")
                .field("format", format)
                .field("document_len", &document.len())
                .finish(),
        }
    }
}

/// An enrollment request in domain terms.
#[derive(Debug, Clone)]
pub struct EnrollParams {
    /// DER PKCS#10 CSR.
    pub csr: Vec<u8>,
    /// The credential (`None` when the request carried none: refused and audited).
    pub credential: Option<Credential>,
    /// Audiences for an optional JWT-SVID.
    pub jwt_audiences: Vec<String>,
}

/// A successful enrollment.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// DER CA certificates.
    pub trust_bundle: Vec<Vec<u8>>,
    /// JWT-SVID, when audiences were given (never on a retry).
    pub jwt_svid: Option<String>,
    /// X509-SVID expiry, Unix seconds.
    pub expires_at: i64,
    /// True when a consumed token's first certificate was returned again.
    pub retried: bool,
    /// Serial of the leaf, lowercase hex.
    pub serial: String,
}

/// A newly created token, shown once.
pub struct CreatedToken {
    /// `<token_id>.<secret>`.
    pub token: String,
    /// The id.
    pub token_id: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// `sha256:<hex>` pin of the CA key.
    pub ca_pin: String,
}

impl std::fmt::Debug for CreatedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedToken")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Token metadata for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenView {
    /// Id.
    pub token_id: String,
    /// SPIFFE ID it enrolls as.
    pub spiffe_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Uses allowed.
    pub max_uses: u32,
    /// Uses consumed.
    pub uses: u32,
    /// Revoked?
    pub revoked: bool,
}

/// The trust bundle.
#[derive(Debug, Clone)]
pub struct BundleView {
    /// Trust domain name.
    pub trust_domain: String,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// SPIFFE bundle JSON.
    pub spiffe_bundle_json: String,
    /// `spiffe_sequence`.
    pub sequence: u64,
}

/// Result of verifying the audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerdict {
    /// Rows checked.
    pub events: u64,
    /// `None` when intact, else (seq, problem).
    pub broken: Option<(u64, String)>,
}

/// The broker core.
pub struct Broker {
    pub(super) cfg: BrokerConfig,
    pub(super) store: Arc<dyn Store>,
    pub(super) authority: Arc<Authority>,
    pub(super) token_key: TokenKey,
    pub(super) bootstrap_secret: Option<Secret>,
    pub(super) bootstrap_source: &'static str,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) plan: RwLock<Option<Arc<ActivePlan>>>,
    pub(super) revocations: RwLock<Arc<super::lifecycle::RevocationSet>>,
    pub(super) bundle_tx: tokio::sync::watch::Sender<u64>,
    pub(super) crls: RwLock<Arc<Vec<Vec<u8>>>>,
    /// Serialises cache reloads (plan, revocations): each reload reads and
    /// publishes under this lock, so a slow reader can never overwrite a
    /// newer state with an older one.
    pub(super) reload_lock: tokio::sync::Mutex<()>,
    /// Per-peer token buckets.
    pub(super) limiter: crate::ratelimit::RateLimiter,
    /// Attestation verifiers by format.
    pub(super) attestors: Arc<crate::attest::registry::Registry>,
    /// Bumped whenever the CRLs are regenerated (the server rewrites crl.der).
    pub(super) crl_tx: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("trust_domain", &self.cfg.trust_domain)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Assembles a broker and loads the active plan from the store.
    ///
    /// # Errors
    /// The store fails or holds an undecodable plan.
    pub async fn new(
        cfg: BrokerConfig,
        store: Arc<dyn Store>,
        authority: Arc<Authority>,
        secrets: BrokerSecrets,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let (bundle_tx, _) = tokio::sync::watch::channel(authority.view().sequence);
        let cfg_rates = cfg.rates.clone();
        let b = Self {
            cfg,
            store,
            authority,
            revocations: RwLock::new(Arc::default()),
            bundle_tx,
            crls: RwLock::new(Arc::default()),
            crl_tx: tokio::sync::watch::channel(0).0,
            attestors: Arc::new(secrets.attestors),
            reload_lock: tokio::sync::Mutex::new(()),
            limiter: crate::ratelimit::RateLimiter::new(cfg_rates),
            token_key: secrets.token_key,
            bootstrap_secret: secrets.bootstrap,
            bootstrap_source: secrets.bootstrap_source,
            clock,
            plan: RwLock::new(None),
        };
        b.reload_plan().await?;
        b.reload_revocations().await?;
        b.refresh_crls().await?;
        Ok(b)
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The store (for the server's maintenance tasks).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// `sha256:<hex>` pin of the CA that signs the TLS serving certificate.
    pub fn ca_pin(&self) -> String {
        self.authority.view().serving().ca_pin().to_owned()
    }

    /// The signing authority (for the server's TLS material).
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    // === tokens ===

    /// Mints an enrollment token for `spiffe_id`.
    ///
    /// # Errors
    /// `Malformed` for a bad SPIFFE ID, foreign trust domain, TTL or uses;
    /// `Unavailable` when the store fails.
    pub async fn create_token(
        &self,
        spiffe_id: &str,
        ttl_secs: u32,
        max_uses: u32,
        caller: &Caller,
    ) -> Result<CreatedToken, Error> {
        self.authorize_admin(caller).await?;
        let id = self.parse_own_id(spiffe_id)?;
        let ttl = if ttl_secs == 0 {
            self.cfg.default_token_ttl_secs
        } else {
            i64::from(ttl_secs)
        };
        let max_ttl = self
            .active_plan()
            .map_or(self.cfg.max_token_ttl_secs, |p| p.plan.limits.max_token_ttl);
        if ttl > max_ttl {
            return Err(Error::Malformed(format!(
                "ttl_seconds exceeds the maximum of {max_ttl}"
            )));
        }
        let max_uses = if max_uses == 0 { 1 } else { max_uses };
        if max_uses > MAX_TOKEN_USES {
            return Err(Error::Malformed(format!(
                "max_uses exceeds the maximum of {MAX_TOKEN_USES}"
            )));
        }
        let now = self.clock.now_ms();
        let minted = self.token_key.mint();
        let record = TokenRecord {
            token_id: minted.token_id.clone(),
            spiffe_id: id.to_string(),
            created_at_ms: now,
            expires_at_ms: now + ttl * 1000,
            max_uses,
            uses: 0,
            revoked_at_ms: None,
        };
        let audit = AuditRecord::new(now, AuditKind::TokenCreated, "ok")
            .field("token_id", minted.token_id.as_str())
            .field("spiffe_id", id.as_str())
            .field("ttl_seconds", ttl)
            .field("max_uses", max_uses)
            .field("caller", caller.describe());
        self.store.create_token(record, audit).await?;
        tracing::info!(token_id = %minted.token_id, spiffe_id = %id, ttl, max_uses, "token created");
        Ok(CreatedToken {
            token: minted.token_string(),
            token_id: minted.token_id,
            expires_at: (now + ttl * 1000).div_euclid(1000),
            ca_pin: self.ca_pin(),
        })
    }

    /// Revokes a token. Returns false when it was already revoked.
    ///
    /// # Errors
    /// `Malformed` for a bad id, `TokenUnknown`, `Unavailable`.
    pub async fn revoke_token(&self, token_id: &str, caller: &Caller) -> Result<bool, Error> {
        self.authorize_admin(caller).await?;
        if !token::is_valid_token_id(token_id) {
            return Err(Error::Malformed(
                "token_id must be 32 lowercase hex characters".into(),
            ));
        }
        let now = self.clock.now_ms();
        let audit = AuditRecord::new(now, AuditKind::TokenRevoked, "ok")
            .field("token_id", token_id)
            .field("caller", caller.describe());
        match self.store.revoke_token(token_id, now, audit).await? {
            RevokeOutcome::Revoked => {
                tracing::info!(token_id, "token revoked");
                Ok(true)
            }
            RevokeOutcome::AlreadyRevoked => Ok(false),
            RevokeOutcome::Unknown => Err(Error::TokenUnknown),
        }
    }

    /// All tokens, newest first.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn list_tokens(&self, caller: &Caller) -> Result<Vec<TokenView>, Error> {
        self.authorize_admin(caller).await?;
        Ok(self
            .store
            .list_tokens()
            .await?
            .into_iter()
            .map(|t| TokenView {
                token_id: t.token_id,
                spiffe_id: t.spiffe_id,
                created_at: t.created_at_ms.div_euclid(1000),
                expires_at: t.expires_at_ms.div_euclid(1000),
                max_uses: t.max_uses,
                uses: t.uses,
                revoked: t.revoked_at_ms.is_some(),
            })
            .collect())
    }

    // === enrollment ===

    /// Exchanges a credential and a CSR for SVIDs (DESIGN.md §2.1).
    ///
    /// # Errors
    /// Every refusal has its documented reason; refusals are audited and
    /// change nothing else.
    pub async fn enroll(&self, req: EnrollParams, caller: &Caller) -> Result<Enrolled, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Issue)?;
        let r = self.enroll_inner(req, caller).await;
        if let Err(e) = &r {
            self.penalize_if_guessing(caller, e);
        }
        r
    }

    /// Refuses callers that exhausted their failure budget or `limit`.
    ///
    /// # Errors
    /// `RateLimited` with a retry-after hint.
    pub(super) fn rate_gate(
        &self,
        caller: &Caller,
        limit: crate::ratelimit::Limit,
    ) -> Result<(), Error> {
        let Some(peer) = caller.rate_key() else {
            return Ok(());
        };
        let now = self.clock.now_ms();
        self.limiter
            .check(crate::ratelimit::Limit::Failures, &peer, now)
            .and_then(|()| self.limiter.take(limit, &peer, 1.0, now))
            .map_err(|retry_after_ms| {
                tracing::debug!(peer = %peer, ?limit, retry_after_ms, "rate limited");
                Error::RateLimited { retry_after_ms }
            })
    }

    /// Failed credential checks spend the peer's failure budget (brute force).
    pub(super) fn penalize_if_guessing(&self, caller: &Caller, e: &Error) {
        if matches!(
            e,
            Error::InvalidSignature
                | Error::InvalidBootstrapSignature
                | Error::AttestationInvalid(_)
                | Error::TokenUnknown
        ) {
            if let Some(peer) = caller.rate_key() {
                self.limiter.penalize(&peer, self.clock.now_ms());
            }
        }
    }

    /// Forgets rate-limit buckets that have refilled (called by upkeep).
    pub fn prune_rate_limits(&self) {
        self.limiter.prune(self.clock.now_ms());
    }

    async fn enroll_inner(&self, req: EnrollParams, caller: &Caller) -> Result<Enrolled, Error> {
        let claimed_token = match &req.credential {
            Some(Credential::Token { token_id, .. }) if token::is_valid_token_id(token_id) => {
                Some(token_id.clone())
            }
            _ => None,
        };
        let result = match req.credential {
            Some(Credential::Token {
                ref token_id,
                ref payload,
                ref signature,
            }) => {
                self.enroll_token(
                    &req.csr,
                    token_id,
                    payload,
                    signature,
                    &req.jwt_audiences,
                    caller,
                )
                .await
            }
            Some(Credential::Attestation {
                ref format,
                ref document,
            }) => {
                let r = self
                    .enroll_attestation(&req.csr, format, document, &req.jwt_audiences, caller)
                    .await;
                if let Err(e) = &r {
                    let format = if format.len() <= 32 {
                        format.as_str()
                    } else {
                        "(too long)"
                    };
                    self.audit_denial_with("enroll", e, caller, &[("format", format)])
                        .await;
                }
                return r;
            }
            None => Err(Error::Malformed(
                "credential is required (token or attestation)".into(),
            )),
        };
        if let Err(e) = &result {
            self.audit_denial("enroll", e, caller, claimed_token.as_deref())
                .await;
        }
        result
    }

    async fn enroll_token(
        &self,
        csr: &[u8],
        token_id: &str,
        payload: &[u8],
        signature: &[u8],
        audiences: &[String],
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        // 1. Size limits and shape of what we need before the HMAC.
        if csr.is_empty() {
            return Err(Error::Malformed("csr is empty".into()));
        }
        if csr.len() > MAX_CSR_LEN {
            return Err(Error::Malformed(format!(
                "csr larger than {MAX_CSR_LEN} bytes"
            )));
        }
        if payload.len() > token::MAX_PAYLOAD_LEN {
            return Err(Error::Malformed(format!(
                "payload larger than {} bytes",
                token::MAX_PAYLOAD_LEN
            )));
        }
        check_audiences(audiences)?;
        if !token::is_valid_token_id(token_id) {
            return Err(Error::Malformed(
                "token_id must be 32 lowercase hex characters".into(),
            ));
        }

        // 2. Possession: constant-time HMAC under the re-derived token secret.
        if !self
            .token_key
            .derive_secret(token_id)
            .verify(payload, signature)
        {
            return Err(Error::InvalidSignature);
        }

        // 3. Payload shape, action, binding to token and CSR.
        let p = EnrollPayload::parse(payload).map_err(|e| Error::Malformed(e.to_string()))?;
        if p.action != token::ACTION_ENROLL {
            return Err(Error::Malformed(format!(
                "payload action must be {}",
                token::ACTION_ENROLL
            )));
        }
        if p.token_id != token_id {
            return Err(Error::Malformed(
                "payload token_id does not match the token".into(),
            ));
        }
        if !p
            .csr_sha256
            .eq_ignore_ascii_case(&hex::encode(Sha256::digest(csr)))
        {
            return Err(Error::Malformed(
                "payload csr_sha256 does not match the CSR".into(),
            ));
        }
        let nonce =
            token::normalize_nonce(&p.nonce).map_err(|e| Error::Malformed(e.to_string()))?;

        // 4. Freshness.
        let now = self.clock.now_ms();
        self.check_window(p.timestamp, now)?;

        // 5. Token (for its SPIFFE ID) and CSR proof of possession.
        let record = self
            .store
            .fetch_token(token_id)
            .await?
            .ok_or(Error::TokenUnknown)?;
        let spiffe_id = SpiffeId::parse(&record.spiffe_id).map_err(|_| {
            tracing::error!(token_id, "stored token has an invalid SPIFFE ID");
            Error::Internal
        })?;
        let csr = ca::verify_csr(csr).map_err(|e| Error::Malformed(format!("csr: {e}")))?;

        // 6. Sign in memory; kept only if the transaction below wins.
        let plan = self.active_plan();
        let ttls = self.ttls_for(plan.as_deref(), spiffe_id.as_str());
        let cert = self.sign_leaf(LeafSpec {
            id: &spiffe_id,
            csr: &csr,
            now_ms: now,
            ttl_secs: ttls.x509,
            dns_names: &ttls.dns_names,
            token_id: Some(token_id.to_owned()),
            origin: "token".to_owned(),
            node: None,
        })?;
        let audit = AuditRecord::new(now, AuditKind::Issued, "ok")
            .field("token_id", token_id)
            .field("spiffe_id", spiffe_id.as_str())
            .field("serial", cert.serial.as_str())
            .field("not_after_ms", cert.not_after_ms)
            .field("jwt", !audiences.is_empty())
            .field("caller", caller.describe());
        let audit = with_plan(audit, plan.as_deref());
        // The JWT too is signed before the commit (it leaves only if the
        // transaction wins), so its CPU overlaps other requests' commit
        // waits and a signing failure consumes nothing.
        let jwt_svid = if audiences.is_empty() {
            None
        } else {
            Some(self.mint_jwt(&spiffe_id, audiences, now, ttls.jwt)?)
        };

        // 7. One durable transaction decides.
        let outcome = self
            .store
            .redeem_token(Redemption {
                token_id: token_id.to_owned(),
                nonce: format!("enroll:{nonce}"),
                nonce_expires_at_ms: p.timestamp.max(now) + self.cfg.window_secs * 1000 + 60_000,
                now_ms: now,
                cert: cert.clone(),
                audit,
            })
            .await?;
        match outcome {
            RedeemOutcome::Issued => {
                tracing::info!(token_id, spiffe_id = %spiffe_id, serial = %cert.serial, "issued");
                Ok(self.enrolled(cert, jwt_svid, false))
            }
            RedeemOutcome::Retried(previous) => {
                let audit = AuditRecord::new(now, AuditKind::Reissued, "ok")
                    .field("token_id", token_id)
                    .field("spiffe_id", previous.spiffe_id.as_str())
                    .field("serial", previous.serial.as_str())
                    .field("caller", caller.describe());
                self.store.append_audit(audit).await?;
                tracing::info!(token_id, serial = %previous.serial, "retried: returned the first certificate");
                Ok(self.enrolled(previous, None, true))
            }
            RedeemOutcome::NonceReplayed => Err(Error::NonceReplayed),
            RedeemOutcome::TokenUnknown => Err(Error::TokenUnknown),
            RedeemOutcome::TokenExpired => Err(Error::TokenExpired),
            RedeemOutcome::TokenRevoked => Err(Error::TokenRevoked),
            RedeemOutcome::TokenAlreadyUsed => Err(Error::TokenAlreadyUsed),
        }
    }

    /// Signs an X509-SVID in memory with the active CA generation and
    /// describes it for the store. Nothing is recorded here: the caller's
    /// store transaction decides whether it is kept.
    ///
    /// # Errors
    /// `Internal` when signing fails (details are logged).
    pub(super) fn sign_leaf(&self, s: LeafSpec<'_>) -> Result<IssuedCert, Error> {
        let signer = self.authority.active();
        let issued = signer
            .issue_x509(&X509Params {
                spiffe_id: s.id,
                csr: s.csr,
                now_ms: s.now_ms,
                ttl_secs: s.ttl_secs,
                dns_names: s.dns_names,
            })
            .map_err(|e| {
                tracing::error!(error = %e, "signing failed");
                Error::Internal
            })?;
        Ok(IssuedCert {
            serial: issued.serial_hex,
            token_id: s.token_id,
            spiffe_id: s.id.to_string(),
            spki_sha256: s.csr.spki_sha256_hex().to_owned(),
            issued_at_ms: s.now_ms,
            not_after_ms: issued.not_after_ms,
            der: issued.der,
            ca_gen: signer.generation(),
            origin: s.origin,
            node: s.node,
        })
    }

    pub(super) fn check_window(&self, timestamp_ms: i64, now_ms: i64) -> Result<(), Error> {
        let window_ms = self.cfg.window_secs.saturating_mul(1000);
        if now_ms.saturating_sub(timestamp_ms).saturating_abs() > window_ms {
            return Err(Error::RequestExpired {
                server_time_ms: now_ms,
                window_seconds: self.cfg.window_secs,
            });
        }
        Ok(())
    }

    pub(super) fn mint_jwt(
        &self,
        id: &SpiffeId,
        audiences: &[String],
        now_ms: i64,
        ttl_secs: i64,
    ) -> Result<String, Error> {
        self.mint_jwt_full(id, audiences, now_ms, ttl_secs)
            .map(|m| m.token)
    }

    pub(super) fn mint_jwt_full(
        &self,
        id: &SpiffeId,
        audiences: &[String],
        now_ms: i64,
        ttl_secs: i64,
    ) -> Result<ca::MintedJwt, Error> {
        self.authority
            .mint_jwt(&JwtParams {
                spiffe_id: id,
                audiences,
                now_secs: now_ms.div_euclid(1000),
                ttl_secs,
            })
            .map_err(|e| {
                tracing::error!(error = %e, "JWT signing failed");
                Error::Internal
            })
    }

    pub(super) fn enrolled(
        &self,
        cert: IssuedCert,
        jwt_svid: Option<String>,
        retried: bool,
    ) -> Enrolled {
        Enrolled {
            spiffe_id: cert.spiffe_id,
            // Leaf only: the CA signs SVIDs directly, so there are no intermediates.
            chain: vec![cert.der],
            trust_bundle: self.authority.view().x509_authorities(),
            jwt_svid,
            expires_at: cert.not_after_ms.div_euclid(1000),
            retried,
            serial: cert.serial,
        }
    }

    pub(super) async fn audit_denial(
        &self,
        op: &str,
        e: &Error,
        caller: &Caller,
        token_id: Option<&str>,
    ) {
        match token_id {
            Some(t) => {
                self.audit_denial_with(op, e, caller, &[("token_id", t)])
                    .await
            }
            None => self.audit_denial_with(op, e, caller, &[]).await,
        }
    }

    /// Appends a `denied` audit row with the reason and allow-listed extra fields.
    pub(super) async fn audit_denial_with(
        &self,
        op: &str,
        e: &Error,
        caller: &Caller,
        extra: &[(&str, &str)],
    ) {
        let now = self.clock.now_ms();
        let mut rec = AuditRecord::new(now, AuditKind::Denied, e.reason())
            .field("op", op)
            .field("caller", caller.describe());
        for (k, v) in extra {
            rec = rec.field(k, *v);
        }
        tracing::info!(op, reason = e.reason(), caller = %caller.describe(), ?extra, "denied");
        if let Err(err) = self.store.append_audit(rec).await {
            tracing::error!(error = %err, "could not audit a denial");
        }
    }

    // === bundle and audit ===

    /// The current trust bundle: every published CA generation.
    pub fn bundle(&self) -> BundleView {
        let view = self.authority.view();
        BundleView {
            trust_domain: self.cfg.trust_domain.to_string(),
            x509_authorities: view.x509_authorities(),
            spiffe_bundle_json: view.bundle_json(self.cfg.bundle_refresh_hint_secs),
            sequence: view.sequence,
        }
    }

    /// Audit rows after `after_seq`.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn list_audit(
        &self,
        after_seq: u64,
        limit: u32,
        caller: &Caller,
    ) -> Result<Vec<AuditRow>, Error> {
        self.authorize_admin(caller).await?;
        let limit = match limit {
            0 => 100,
            n => n.min(1000),
        };
        Ok(self.store.list_audit(after_seq, limit).await?)
    }

    /// Walks the whole audit chain.
    ///
    /// # Errors
    /// `Unavailable`.
    pub async fn verify_audit(&self, caller: &Caller) -> Result<AuditVerdict, Error> {
        self.authorize_admin(caller).await?;
        Ok(verify_store_chain(self.store.as_ref()).await?)
    }

    pub(super) fn parse_own_id(&self, s: &str) -> Result<SpiffeId, Error> {
        let id = SpiffeId::parse(s).map_err(|e| Error::Malformed(format!("spiffe_id: {e}")))?;
        if id.trust_domain() != self.cfg.trust_domain.as_str() {
            return Err(Error::Malformed(format!(
                "spiffe_id must be in trust domain {}",
                self.cfg.trust_domain
            )));
        }
        Ok(id)
    }
}

/// Walks a store's whole audit chain from the genesis hash.
///
/// # Errors
/// The store fails.
pub async fn verify_store_chain(
    store: &dyn Store,
) -> Result<AuditVerdict, crate::store::StoreError> {
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let rows = store.list_audit(after, 1000).await?;
        let Some(last) = rows.last() else { break };
        after = last.seq;
        for r in &rows {
            if let Err(b) = v.check(r) {
                return Ok(AuditVerdict {
                    events: v.count(),
                    broken: Some((b.seq, b.problem)),
                });
            }
        }
    }
    Ok(AuditVerdict {
        events: v.count(),
        broken: None,
    })
}

pub(super) fn check_audiences(audiences: &[String]) -> Result<(), Error> {
    if audiences.len() > MAX_AUDIENCES {
        return Err(Error::Malformed(format!(
            "more than {MAX_AUDIENCES} jwt_audiences"
        )));
    }
    for a in audiences {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN {
            return Err(Error::Malformed(format!(
                "each jwt_audience must be 1..={MAX_AUDIENCE_LEN} bytes"
            )));
        }
    }
    Ok(())
}

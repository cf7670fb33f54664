//! Plans in the broker: the one-time foundation bootstrap (DESIGN.md §2.3),
//! proposals and approvals by admins, the in-memory active plan, and admin
//! authorization. Bootstrap checks, in order: sizes → secret configured →
//! HMAC under the bootstrap secret (constant time) → payload shape/action/
//! trust domain/plan hash → window → plan validation → one store
//! transaction (nonce unused, no plan ever active; install plan, admin
//! token, nonce and audit row).

use std::sync::{Arc, PoisonError};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    broker::{ActivePlan, Broker},
    Caller, Error,
};
use crate::{
    audit::{AuditKind, AuditRecord},
    policy::Plan,
    store::{
        ApproveOutcome, BootstrapInstall, BootstrapOutcome, PlanApproval, PlanProposal, PlanRecord,
        ProposeOutcome, StoreCounts, TokenRecord,
    },
    token,
};

/// How long a proposal waits for approvals.
const PROPOSAL_TTL_MS: i64 = 24 * 3600 * 1000;
/// Lifetime of the first admin's enrollment token.
const ADMIN_TOKEN_TTL_MS: i64 = 3600 * 1000;

/// The signed bootstrap payload. Unknown fields are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootstrapPayload {
    action: String,
    trust_domain: String,
    timestamp: i64,
    nonce: String,
    plan_sha256: String,
}

/// A successful bootstrap.
pub struct Bootstrapped {
    /// Plan version (1).
    pub version: u64,
    /// Canonical plan hash.
    pub sha256: String,
    /// One-time enrollment token for the first admin.
    pub admin_token: String,
    /// The SPIFFE ID it enrolls as.
    pub admin_spiffe_id: String,
}

impl std::fmt::Debug for Bootstrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrapped")
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// A plan as shown to admins.
#[derive(Debug, Clone)]
pub struct PlanView {
    /// Version.
    pub version: u64,
    /// Canonical hash.
    pub sha256: String,
    /// pending / active / superseded / stale.
    pub state: String,
    /// Approvers so far.
    pub approvers: Vec<String>,
    /// Approvals needed.
    pub required_approvals: u32,
    /// Canonical JSON.
    pub plan_json: String,
    /// Proposer.
    pub proposer: String,
    /// Proposal expiry, Unix seconds.
    pub expires_at: i64,
}

impl From<PlanRecord> for PlanView {
    fn from(r: PlanRecord) -> Self {
        Self {
            version: r.version,
            sha256: r.sha256,
            state: r.state.as_str().to_owned(),
            approvers: r.approvals,
            required_approvals: r.required_approvals,
            plan_json: r.canonical_json,
            proposer: r.proposer,
            expires_at: r.expires_at_ms.div_euclid(1000),
        }
    }
}

/// Broker status for operators.
#[derive(Debug, Clone)]
pub struct StatusView {
    /// True until a plan is active.
    pub bootstrap_enabled: bool,
    /// Active plan, if any: (version, hash).
    pub plan: Option<(u64, String)>,
    /// Trust domain.
    pub trust_domain: String,
    /// CA pin.
    pub ca_pin: String,
    /// Row counts.
    pub counts: StoreCounts,
    /// Bootstrap secret source, or `unused` after bootstrap.
    pub bootstrap_secret: String,
}

/// SVID lifetimes and DNS names for one identity under the active plan.
pub(super) struct Ttls {
    pub x509: i64,
    pub jwt: i64,
    pub dns_names: Vec<String>,
}

/// Adds the active plan's version and hash to an audit row.
pub(super) fn with_plan(rec: AuditRecord, plan: Option<&ActivePlan>) -> AuditRecord {
    match plan {
        Some(p) => rec
            .field("plan_version", p.version)
            .field("plan_sha256", p.sha256.as_str()),
        None => rec.field("plan_version", 0),
    }
}

impl Broker {
    /// The active plan, if any.
    pub fn active_plan(&self) -> Option<Arc<ActivePlan>> {
        self.plan
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the active plan from the store into memory.
    ///
    /// # Errors
    /// Store failure, or a stored plan that no longer decodes.
    pub async fn reload_plan(&self) -> Result<(), Error> {
        let _serial = self.reload_lock.lock().await;
        let rec = self.store.fetch_active_plan().await?;
        let active = match rec {
            None => None,
            Some(r) => {
                let plan = Plan::from_canonical(&r.canonical_json).map_err(|e| {
                    tracing::error!(version = r.version, error = %e, "stored plan does not decode");
                    Error::Internal
                })?;
                Some(Arc::new(ActivePlan {
                    version: r.version,
                    sha256: r.sha256,
                    plan,
                }))
            }
        };
        *self.plan.write().unwrap_or_else(PoisonError::into_inner) = active;
        Ok(())
    }

    pub(super) fn ttls_for(&self, plan: Option<&ActivePlan>, spiffe_id: &str) -> Ttls {
        let Some(p) = plan else {
            return Ttls {
                x509: self.cfg.x509_ttl_secs,
                jwt: self.cfg.jwt_ttl_secs,
                dns_names: Vec::new(),
            };
        };
        match p.plan.entry_for(spiffe_id) {
            Some(e) => Ttls {
                x509: e.x509_ttl,
                jwt: e.jwt_ttl,
                dns_names: e.dns_names.clone(),
            },
            None => Ttls {
                x509: self.cfg.x509_ttl_secs.min(p.plan.limits.max_svid_ttl),
                jwt: self.cfg.jwt_ttl_secs.min(p.plan.limits.max_svid_ttl),
                dns_names: Vec::new(),
            },
        }
    }

    /// Admin operations: the local socket, or an unexpired X509-SVID issued
    /// by this broker to an admin of the active plan.
    ///
    /// # Errors
    /// `NotAuthorized`.
    pub async fn authorize_admin(&self, caller: &Caller) -> Result<(), Error> {
        match caller {
            Caller::LocalAdmin => Ok(()),
            Caller::Peer { .. } => Err(Error::NotAuthorized),
            Caller::Svid {
                spiffe_id, serial, ..
            } => {
                let is_admin = self
                    .active_plan()
                    .is_some_and(|p| p.plan.is_admin(spiffe_id));
                if !is_admin {
                    return Err(Error::NotAuthorized);
                }
                // Defence in depth: the handshake verified the chain to our
                // CA; the certificate must also be one we recorded, unexpired.
                let now = self.clock.now_ms();
                match self.store.fetch_issued(serial).await? {
                    Some(c) if c.spiffe_id == *spiffe_id && c.not_after_ms > now => {
                        if self.store.is_revoked(serial).await? {
                            return Err(Error::SvidRevoked);
                        }
                        Ok(())
                    }
                    _ => Err(Error::NotAuthorized),
                }
            }
        }
    }

    async fn audited<T>(&self, op: &str, caller: &Caller, r: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &r {
            self.audit_denial(op, e, caller, None).await;
        }
        r
    }

    // === bootstrap ===

    /// Installs the foundation plan (the one privileged RPC).
    ///
    /// # Errors
    /// `BootstrapSecretMissing`, `InvalidBootstrapSignature`, `Malformed`
    /// (action, trust domain, plan hash, invalid plan), `BootstrapRequestExpired`,
    /// `NonceReplayed`, `BootstrapDisabled`. Every refusal is audited.
    pub async fn bootstrap_plan(
        &self,
        payload: &[u8],
        signature: &[u8],
        plan: &[u8],
        caller: &Caller,
    ) -> Result<Bootstrapped, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Bootstrap)?;
        let r = self.bootstrap_inner(payload, signature, plan, caller).await;
        if let Err(e) = &r {
            self.penalize_if_guessing(caller, e);
        }
        self.audited("bootstrap", caller, r).await
    }

    async fn bootstrap_inner(
        &self,
        payload: &[u8],
        signature: &[u8],
        plan_bytes: &[u8],
        caller: &Caller,
    ) -> Result<Bootstrapped, Error> {
        if payload.len() > token::MAX_PAYLOAD_LEN {
            return Err(Error::Malformed("payload too large".into()));
        }
        if plan_bytes.len() > crate::policy::MAX_PLAN_LEN {
            return Err(Error::Malformed("plan too large".into()));
        }
        let secret = self
            .bootstrap_secret
            .as_ref()
            .ok_or(Error::BootstrapSecretMissing)?;
        if !token::hmac_verify(secret.expose(), payload, signature) {
            return Err(Error::InvalidBootstrapSignature);
        }
        let p: BootstrapPayload =
            token::parse_json(payload).map_err(|e| Error::Malformed(e.to_string()))?;
        if p.action != token::ACTION_BOOTSTRAP {
            return Err(Error::Malformed(format!(
                "payload action must be {}",
                token::ACTION_BOOTSTRAP
            )));
        }
        if p.trust_domain != self.cfg.trust_domain.as_str() {
            return Err(Error::Malformed(format!(
                "payload trust_domain does not match the broker's ({})",
                self.cfg.trust_domain
            )));
        }
        if !p
            .plan_sha256
            .eq_ignore_ascii_case(&hex::encode(Sha256::digest(plan_bytes)))
        {
            return Err(Error::Malformed(
                "payload plan_sha256 does not match the plan".into(),
            ));
        }
        let nonce =
            token::normalize_nonce(&p.nonce).map_err(|e| Error::Malformed(e.to_string()))?;
        let now = self.clock.now_ms();
        self.check_window(p.timestamp, now).map_err(|e| match e {
            Error::RequestExpired {
                server_time_ms,
                window_seconds,
            } => Error::BootstrapRequestExpired {
                server_time_ms,
                window_seconds,
            },
            other => other,
        })?;
        let plan = Plan::parse(plan_bytes, &self.cfg.trust_domain)
            .map_err(|e| Error::Malformed(format!("plan: {e}")))?;
        let sha256 = plan.sha256_hex();
        let admin = plan
            .admins
            .first()
            .cloned()
            .ok_or_else(|| Error::Malformed("plan: admins is empty".into()))?;
        let minted = self.token_key.mint();
        let audit = AuditRecord::new(now, AuditKind::PlanBootstrapped, "ok")
            .field("plan_version", 1)
            .field("plan_sha256", sha256.as_str())
            .field("admin_spiffe_id", admin.as_str())
            .field("admin_token_id", minted.token_id.as_str())
            .field("caller", caller.describe());
        let outcome = self
            .store
            .bootstrap_plan(BootstrapInstall {
                nonce: format!("bootstrap:{nonce}"),
                nonce_expires_at_ms: p.timestamp.max(now) + self.cfg.window_secs * 1000 + 60_000,
                now_ms: now,
                sha256: sha256.clone(),
                canonical_json: plan.canonical_json(),
                admin_token: TokenRecord {
                    token_id: minted.token_id.clone(),
                    spiffe_id: admin.clone(),
                    created_at_ms: now,
                    expires_at_ms: now + ADMIN_TOKEN_TTL_MS,
                    max_uses: 1,
                    uses: 0,
                    revoked_at_ms: None,
                },
                audit,
            })
            .await?;
        match outcome {
            BootstrapOutcome::Installed { version } => {
                self.reload_plan().await?;
                tracing::info!(version, plan_sha256 = %sha256, "foundation plan installed; bootstrap mode is off");
                Ok(Bootstrapped {
                    version,
                    sha256,
                    admin_token: minted.token_string(),
                    admin_spiffe_id: admin,
                })
            }
            BootstrapOutcome::NonceReplayed => Err(Error::NonceReplayed),
            BootstrapOutcome::Disabled => {
                self.reload_plan().await?;
                Err(Error::BootstrapDisabled)
            }
        }
    }

    // === proposals ===

    fn parse_plan(&self, bytes: &[u8]) -> Result<Plan, Error> {
        Plan::parse(bytes, &self.cfg.trust_domain)
            .map_err(|e| Error::Malformed(format!("plan: {e}")))
    }

    /// Proposes a plan; with one required approval it activates at once.
    ///
    /// # Errors
    /// `NotAuthorized`, `Malformed` (invalid plan), `BootstrapDisabled`… see docs/errors.md.
    pub async fn propose_plan(&self, plan: &[u8], caller: &Caller) -> Result<PlanView, Error> {
        let r = self.propose_inner(plan, caller, false).await;
        self.audited("propose_plan", caller, r).await
    }

    /// Local admin socket only: validates and activates a plan directly.
    ///
    /// # Errors
    /// `NotAuthorized` for any other caller; `Malformed` for an invalid plan.
    pub async fn apply_plan(&self, plan: &[u8], caller: &Caller) -> Result<PlanView, Error> {
        let r = if *caller == Caller::LocalAdmin {
            self.propose_inner(plan, caller, true).await
        } else {
            Err(Error::NotAuthorized)
        };
        self.audited("apply_plan", caller, r).await
    }

    async fn propose_inner(
        &self,
        bytes: &[u8],
        caller: &Caller,
        direct: bool,
    ) -> Result<PlanView, Error> {
        self.authorize_admin(caller).await?;
        let plan = self.parse_plan(bytes)?;
        let active = self.active_plan();
        let required = if direct {
            1
        } else {
            active
                .as_ref()
                .map_or(1, |p| p.plan.limits.required_approvals)
        };
        let now = self.clock.now_ms();
        let sha256 = plan.sha256_hex();
        let who = caller.principal();
        let outcome = self
            .store
            .propose_plan(PlanProposal {
                sha256: sha256.clone(),
                canonical_json: plan.canonical_json(),
                proposer: who.clone(),
                now_ms: now,
                expires_at_ms: now + PROPOSAL_TTL_MS,
                required_approvals: required,
                based_on: active.as_ref().map(|p| p.version),
                audit: AuditRecord::new(now, AuditKind::PlanProposed, "ok")
                    .field("plan_sha256", sha256.as_str())
                    .field("required_approvals", required)
                    .field("direct", direct)
                    .field("caller", caller.describe()),
                activation_audit: AuditRecord::new(now, AuditKind::PlanActivated, "ok")
                    .field("plan_sha256", sha256.as_str())
                    .field("approvers", vec![who.clone()])
                    .field("caller", caller.describe()),
            })
            .await?;
        let version = match outcome {
            ProposeOutcome::Stale => {
                self.reload_plan().await?;
                return Err(Error::Malformed(
                    "the active plan changed while proposing; retry".into(),
                ));
            }
            ProposeOutcome::Activated { version } => {
                self.reload_plan().await?;
                tracing::info!(version, plan_sha256 = %sha256, "plan activated");
                version
            }
            ProposeOutcome::Pending { version, .. } => version,
        };
        self.plan_view(version).await
    }

    /// Approves a pending plan.
    ///
    /// # Errors
    /// `NotAuthorized`; `Malformed` for an unknown version, hash mismatch,
    /// a plan that is not pending or expired, or a repeated approval.
    pub async fn approve_plan(
        &self,
        version: u64,
        sha256: &str,
        caller: &Caller,
    ) -> Result<PlanView, Error> {
        let r = self.approve_inner(version, sha256, caller).await;
        self.audited("approve_plan", caller, r).await
    }

    async fn approve_inner(
        &self,
        version: u64,
        sha256: &str,
        caller: &Caller,
    ) -> Result<PlanView, Error> {
        self.authorize_admin(caller).await?;
        let now = self.clock.now_ms();
        let who = caller.principal();
        let outcome = self
            .store
            .approve_plan(PlanApproval {
                version,
                sha256: sha256.to_ascii_lowercase(),
                approver: who.clone(),
                now_ms: now,
                audit: AuditRecord::new(now, AuditKind::PlanApproved, "ok")
                    .field("version", version)
                    .field("plan_sha256", sha256)
                    .field("caller", caller.describe()),
                activation_audit: AuditRecord::new(now, AuditKind::PlanActivated, "ok")
                    .field("version", version)
                    .field("plan_sha256", sha256)
                    .field("caller", caller.describe()),
            })
            .await?;
        match outcome {
            ApproveOutcome::Activated => {
                self.reload_plan().await?;
                tracing::info!(version, "plan activated");
            }
            ApproveOutcome::Pending { .. } => {}
            ApproveOutcome::AlreadyApproved => {
                return Err(Error::Malformed(format!(
                    "{who} already approved plan {version}"
                )))
            }
            ApproveOutcome::NotFound => {
                return Err(Error::Malformed(format!("no plan version {version}")))
            }
            ApproveOutcome::HashMismatch => {
                return Err(Error::Malformed(format!(
                    "plan_sha256 does not match plan {version}"
                )))
            }
            ApproveOutcome::NotPending => {
                return Err(Error::Malformed(format!("plan {version} is not pending")))
            }
            ApproveOutcome::Expired => {
                return Err(Error::Malformed(format!("proposal {version} expired")))
            }
        }
        self.plan_view(version).await
    }

    async fn plan_view(&self, version: u64) -> Result<PlanView, Error> {
        self.store
            .fetch_plan(version)
            .await?
            .map(PlanView::from)
            .ok_or(Error::Internal)
    }

    /// The active plan (`version == 0`) or one version.
    ///
    /// # Errors
    /// `NotAuthorized`; `Malformed` when there is no such plan.
    pub async fn get_plan(&self, version: u64, caller: &Caller) -> Result<PlanView, Error> {
        self.authorize_admin(caller).await?;
        let rec = if version == 0 {
            self.store.fetch_active_plan().await?
        } else {
            self.store.fetch_plan(version).await?
        };
        rec.map(PlanView::from).ok_or_else(|| {
            Error::Malformed(if version == 0 {
                "no plan is active (bootstrap mode)".into()
            } else {
                format!("no plan version {version}")
            })
        })
    }

    /// Operator status.
    ///
    /// # Errors
    /// `NotAuthorized`, `Unavailable`.
    pub async fn status(&self, caller: &Caller) -> Result<StatusView, Error> {
        self.authorize_admin(caller).await?;
        let plan = self.active_plan();
        Ok(StatusView {
            bootstrap_enabled: plan.is_none(),
            plan: plan.as_ref().map(|p| (p.version, p.sha256.clone())),
            trust_domain: self.cfg.trust_domain.to_string(),
            ca_pin: self.ca_pin(),
            counts: self.store.counts().await?,
            bootstrap_secret: if plan.is_some() {
                "unused".to_owned()
            } else {
                self.bootstrap_source.to_owned()
            },
        })
    }
}

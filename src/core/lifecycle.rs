//! After enrollment: renewal and JWT-SVIDs over mTLS, JWT validation,
//! revocation (certificates, SPIFFE IDs, attested nodes, JWTs, CA
//! generations), CRLs, key rotation and the bundle watch.
//!
//! A revoked identity stops working at once on this broker: `Renew` and
//! `FetchJWT` check the caller's certificate against the store inside the
//! issuing transaction (or right before minting a JWT), `ValidateJWT` checks
//! an in-memory revocation set reloaded on every change, and the admin
//! checks refuse revoked admin certificates.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, PoisonError},
};

use super::{
    broker::{Broker, LeafSpec},
    plans::with_plan,
    Caller, Enrolled, Error,
};
use crate::{
    audit::{AuditKind, AuditRecord},
    ca,
    identity::SpiffeId,
    store::{IssuedCert, RenewOutcome, Renewal, RevocationKind, RevocationRecord},
};

/// Longest JWT audience list and TTL checks are shared with enrollment.
const CRL_VALIDITY_MS: i64 = 24 * 3600 * 1000;

/// In-memory view of the revocations, for JWT validation and attestation.
#[derive(Debug, Default)]
pub struct RevocationSet {
    /// SPIFFE ID → revoked-at (ms): JWTs with `iat` at or before are revoked.
    spiffe_ids: HashMap<String, i64>,
    jtis: HashSet<String>,
    nodes: HashSet<String>,
}

impl RevocationSet {
    fn from_records(records: &[RevocationRecord]) -> Self {
        let mut s = Self::default();
        for r in records {
            match r.kind {
                RevocationKind::SpiffeId => {
                    s.spiffe_ids.insert(r.value.clone(), r.revoked_at_ms);
                }
                RevocationKind::Jti => {
                    s.jtis.insert(r.value.clone());
                }
                RevocationKind::Node => {
                    s.nodes.insert(r.value.clone());
                }
                RevocationKind::Serial | RevocationKind::CaGeneration => {}
            }
        }
        s
    }

    /// True when `node` may no longer enroll.
    pub fn node_revoked(&self, node: &str) -> bool {
        self.nodes.contains(node)
    }
}

/// A validated JWT-SVID.
#[derive(Debug, Clone)]
pub struct ValidatedJwtView {
    /// `sub`.
    pub spiffe_id: String,
    /// All claims as JSON.
    pub claims_json: String,
}

/// A minted JWT-SVID.
pub struct FetchedJwt {
    /// The token (a bearer credential).
    pub token: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for FetchedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchedJwt")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Result of a forced rotation.
#[derive(Debug, Clone, Copy)]
pub struct RotationView {
    /// Previously active generation.
    pub old: u32,
    /// Active (or prepared, with `prepare_only`) generation.
    pub new: u32,
    /// Bundle sequence after the change.
    pub sequence: u64,
    /// Whether the new generation is active.
    pub activated: bool,
}

impl Broker {
    /// Re-reads revocations into memory.
    ///
    /// # Errors
    /// Store failure.
    pub async fn reload_revocations(&self) -> Result<(), Error> {
        let _serial = self.reload_lock.lock().await;
        let records = self.store.list_revocations(self.clock.now_ms()).await?;
        *self
            .revocations
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            Arc::new(RevocationSet::from_records(&records));
        Ok(())
    }

    /// Revocation entries held in memory (SPIFFE IDs, jtis, nodes), for metrics.
    pub fn revocation_count(&self) -> usize {
        let r = self.revocation_set();
        r.spiffe_ids.len() + r.jtis.len() + r.nodes.len()
    }

    /// Peers with a rate-limit bucket, for metrics.
    pub fn rate_limited_peers(&self) -> usize {
        self.limiter.tracked()
    }

    /// The in-memory revocation set.
    pub fn revocation_set(&self) -> Arc<RevocationSet> {
        self.revocations
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn max_svid_ttl_secs(&self) -> i64 {
        self.active_plan()
            .map_or(self.cfg.x509_ttl_secs.max(self.cfg.jwt_ttl_secs), |p| {
                p.plan.limits.max_svid_ttl
            })
    }

    /// The caller's certificate record, checked: an X509-SVID issued by this
    /// broker, unexpired (or within the plan's renewal grace when `grace`),
    /// not revoked.
    async fn caller_cert(&self, caller: &Caller, grace: bool) -> Result<IssuedCert, Error> {
        let Caller::Svid {
            spiffe_id, serial, ..
        } = caller
        else {
            return Err(Error::NotAuthorized);
        };
        let cert = self
            .store
            .fetch_issued(serial)
            .await?
            .filter(|c| c.spiffe_id == *spiffe_id)
            .ok_or(Error::NotAuthorized)?;
        let now = self.clock.now_ms();
        let grace_ms = if grace {
            self.active_plan()
                .map_or(0, |p| p.plan.limits.renewal_grace.saturating_mul(1000))
        } else {
            0
        };
        if now >= cert.not_after_ms.saturating_add(grace_ms) {
            return Err(Error::NotAuthorized);
        }
        if self.store.is_revoked(serial).await? {
            return Err(Error::SvidRevoked);
        }
        Ok(cert)
    }

    /// Renews the caller's X509-SVID (same SPIFFE ID, possibly a new key).
    ///
    /// # Errors
    /// `NotAuthorized` (no, foreign, expired certificate; attested identity
    /// whose entry left the plan), `SvidRevoked`, `Malformed` (bad CSR).
    pub async fn renew(
        &self,
        csr: &[u8],
        audiences: &[String],
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Issue)?;
        let r = self.renew_inner(csr, audiences, caller).await;
        if let Err(e) = &r {
            self.audit_denial("renew", e, caller, None).await;
        }
        r
    }

    async fn renew_inner(
        &self,
        csr: &[u8],
        audiences: &[String],
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        let parent = self.caller_cert(caller, true).await?;
        super::broker::check_audiences(audiences)?;
        if csr.len() > super::broker::MAX_CSR_LEN {
            return Err(Error::Malformed("csr too large".into()));
        }
        let plan = self.active_plan();
        // A workload's delegated SVID is renewed by its agent (which re-checks
        // the plan entry), never directly by whoever holds it.
        if parent.origin.starts_with("delegated:") {
            return Err(Error::NotAuthorized);
        }
        if parent.origin.starts_with("attest") {
            let allowed = plan
                .as_ref()
                .is_some_and(|p| p.plan.entry_for(&parent.spiffe_id).is_some());
            if !allowed {
                return Err(Error::NotAuthorized);
            }
        }
        let id = SpiffeId::parse(&parent.spiffe_id).map_err(|_| Error::Internal)?;
        let csr = ca::verify_csr(csr).map_err(|e| Error::Malformed(format!("csr: {e}")))?;
        let now = self.clock.now_ms();
        let ttls = self.ttls_for(plan.as_deref(), id.as_str());
        let cert = self.sign_leaf(LeafSpec {
            id: &id,
            csr: &csr,
            now_ms: now,
            ttl_secs: ttls.x509,
            dns_names: &ttls.dns_names,
            token_id: None,
            origin: parent.origin.clone(),
            node: parent.node.clone(),
        })?;
        let audit = AuditRecord::new(now, AuditKind::Renewed, "ok")
            .field("spiffe_id", id.as_str())
            .field("serial", cert.serial.as_str())
            .field("parent_serial", parent.serial.as_str())
            .field("not_after_ms", cert.not_after_ms)
            .field("caller", caller.describe());
        let audit = with_plan(audit, plan.as_deref());
        match self
            .store
            .renew_cert(Renewal {
                parent_serial: parent.serial.clone(),
                cert: cert.clone(),
                now_ms: now,
                audit,
            })
            .await?
        {
            RenewOutcome::Issued => {}
            RenewOutcome::Revoked => return Err(Error::SvidRevoked),
            RenewOutcome::UnknownParent => return Err(Error::NotAuthorized),
        }
        let jwt = if audiences.is_empty() {
            None
        } else {
            Some(self.mint_jwt(&id, audiences, now, ttls.jwt)?)
        };
        Ok(self.enrolled(cert, jwt, false))
    }

    /// Mints a JWT-SVID for the caller's own SPIFFE ID.
    ///
    /// # Errors
    /// `NotAuthorized`, `SvidRevoked`, `Malformed` (audiences).
    pub async fn fetch_jwt(
        &self,
        audiences: &[String],
        ttl_secs: u32,
        caller: &Caller,
    ) -> Result<FetchedJwt, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Issue)?;
        let r = async {
            let cert = self.caller_cert(caller, false).await?;
            if audiences.is_empty() {
                return Err(Error::Malformed("at least one audience is required".into()));
            }
            super::broker::check_audiences(audiences)?;
            let id = SpiffeId::parse(&cert.spiffe_id).map_err(|_| Error::Internal)?;
            let plan = self.active_plan();
            let ttls = self.ttls_for(plan.as_deref(), id.as_str());
            let cap = plan
                .as_ref()
                .map_or(ttls.jwt, |p| p.plan.limits.max_svid_ttl);
            let ttl = match i64::from(ttl_secs) {
                0 => ttls.jwt,
                t => t.min(cap),
            };
            let m = self.mint_jwt_full(&id, audiences, self.clock.now_ms(), ttl)?;
            Ok(FetchedJwt {
                token: m.token,
                expires_at: m.expires_at,
            })
        }
        .await;
        if let Err(e) = &r {
            self.audit_denial("fetch_jwt", e, caller, None).await;
        }
        r
    }

    /// Validates a JWT-SVID: signature against every published key, `exp`,
    /// `aud`, and the revocation list.
    ///
    /// # Errors
    /// `JwtInvalid` (naming the failed check), `SvidRevoked`, `Malformed`.
    pub fn validate_jwt(&self, token: &str, audience: &str) -> Result<ValidatedJwtView, Error> {
        if audience.is_empty() {
            return Err(Error::Malformed("audience is required".into()));
        }
        let now = self.clock.now_ms();
        let v = self
            .authority
            .view()
            .validate_jwt(token, audience, now.div_euclid(1000))
            .map_err(|e| match e {
                ca::CaError::JwtInvalid(m) => Error::JwtInvalid(m),
                ca::CaError::InvalidRequest(m) => Error::Malformed(m),
                other => {
                    tracing::error!(error = %other, "JWT validation failed");
                    Error::Internal
                }
            })?;
        let revoked = self.revocation_set();
        let iat_ms = serde_json::from_str::<serde_json::Value>(&v.claims_json)
            .ok()
            .and_then(|c| c.get("iat").and_then(serde_json::Value::as_i64))
            .map_or(i64::MIN, |s| s.saturating_mul(1000));
        if revoked
            .spiffe_ids
            .get(&v.spiffe_id)
            .is_some_and(|at| iat_ms <= *at)
            || v.jti.as_ref().is_some_and(|j| revoked.jtis.contains(j))
        {
            return Err(Error::SvidRevoked);
        }
        Ok(ValidatedJwtView {
            spiffe_id: v.spiffe_id,
            claims_json: v.claims_json,
        })
    }

    /// Revokes by `kind` (`serial`, `spiffe_id`, `node`, `jti`). Takes effect
    /// at once on this broker; the CRLs are regenerated.
    ///
    /// # Errors
    /// `NotAuthorized`, `Malformed` (unknown kind, bad value, unknown serial).
    pub async fn revoke_identity(
        &self,
        kind: &str,
        value: &str,
        reason: &str,
        caller: &Caller,
    ) -> Result<RevocationRecord, Error> {
        let r = self.revoke_inner(kind, value, reason, caller).await;
        if let Err(e) = &r {
            self.audit_denial("revoke_identity", e, caller, None).await;
        }
        r
    }

    async fn revoke_inner(
        &self,
        kind: &str,
        value: &str,
        reason: &str,
        caller: &Caller,
    ) -> Result<RevocationRecord, Error> {
        self.authorize_admin(caller).await?;
        if reason.len() > 512 || value.is_empty() || value.len() > 2048 {
            return Err(Error::Malformed(
                "value must be 1..=2048 bytes, reason ≤ 512".into(),
            ));
        }
        let now = self.clock.now_ms();
        let horizon = now.saturating_add(self.max_svid_ttl_secs().saturating_mul(1000));
        let (kind, value, expires) = match kind {
            "serial" => {
                let serial = value.to_ascii_lowercase();
                let cert = self.store.fetch_issued(&serial).await?.ok_or_else(|| {
                    Error::Malformed(format!("no certificate with serial {serial}"))
                })?;
                (RevocationKind::Serial, serial, Some(cert.not_after_ms))
            }
            "spiffe_id" => {
                let id = self.parse_own_id(value)?;
                (RevocationKind::SpiffeId, id.to_string(), Some(horizon))
            }
            // An attested node stays barred: it is evidence, not a credential that expires.
            "node" => (RevocationKind::Node, value.to_owned(), None),
            "jti" => (RevocationKind::Jti, value.to_owned(), Some(horizon)),
            other => {
                return Err(Error::Malformed(format!(
                    "kind must be serial, spiffe_id, node or jti (got {other:?})"
                )))
            }
        };
        let record = RevocationRecord {
            kind,
            value,
            revoked_at_ms: now,
            expires_at_ms: expires,
            reason: reason.to_owned(),
        };
        self.store_revocation(record.clone(), caller).await?;
        Ok(record)
    }

    async fn store_revocation(
        &self,
        record: RevocationRecord,
        caller: &Caller,
    ) -> Result<(), Error> {
        let audit = AuditRecord::new(record.revoked_at_ms, AuditKind::Revoked, "ok")
            .field("kind", record.kind.as_str())
            .field("value", record.value.as_str())
            .field("reason", record.reason.as_str())
            .field("caller", caller.describe());
        self.store.revoke(record.clone(), audit).await?;
        tracing::info!(kind = record.kind.as_str(), value = %record.value, "revoked");
        self.reload_revocations().await?;
        self.refresh_crls().await?;
        Ok(())
    }

    /// Unexpired revocations.
    ///
    /// # Errors
    /// `NotAuthorized`, `Unavailable`.
    pub async fn list_revocations(&self, caller: &Caller) -> Result<Vec<RevocationRecord>, Error> {
        self.authorize_admin(caller).await?;
        Ok(self.store.list_revocations(self.clock.now_ms()).await?)
    }

    /// Regenerates one CRL per published CA generation from the store.
    ///
    /// # Errors
    /// Store failure or signing failure.
    pub async fn refresh_crls(&self) -> Result<Arc<Vec<Vec<u8>>>, Error> {
        let now = self.clock.now_ms();
        let revoked = self.store.revoked_serials(now).await?;
        let view = self.authority.view();
        let active = view.active().generation();
        let mut gens: Vec<_> = view
            .generations
            .iter()
            .filter(|(m, _)| m.state != ca::ring::GenState::Dropped)
            .collect();
        gens.sort_by_key(|(m, _)| (m.id != active, m.id));
        let mut crls = Vec::with_capacity(gens.len());
        for (meta, ca) in gens {
            let mine: Vec<(String, i64)> = revoked
                .iter()
                .filter(|(_, _, g)| *g == meta.id)
                .map(|(s, at, _)| (s.clone(), at.div_euclid(1000)))
                .collect();
            let der = ca
                .crl(
                    &mine,
                    u64::try_from(now).unwrap_or(0),
                    now,
                    now + CRL_VALIDITY_MS,
                )
                .map_err(|e| {
                    tracing::error!(error = %e, "CRL signing failed");
                    Error::Internal
                })?;
            crls.push(der);
        }
        let crls = Arc::new(crls);
        *self.crls.write().unwrap_or_else(PoisonError::into_inner) = crls.clone();
        self.crl_tx.send_modify(|n| *n += 1);
        Ok(crls)
    }

    /// The current CRLs (active generation first).
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.crls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Forces a rotation (or only prepares the next generation). With
    /// `revoke_old`, the old generation is tainted: dropped from the bundle
    /// now and everything it signed revoked.
    ///
    /// # Errors
    /// `NotAuthorized`; `Internal` when key generation or the manifest fails.
    pub async fn rotate(
        &self,
        revoke_old: bool,
        prepare_only: bool,
        caller: &Caller,
    ) -> Result<RotationView, Error> {
        self.authorize_admin(caller).await?;
        let now = self.clock.now_ms();
        let old = self.authority.active().generation();
        let internal = |e: ca::CaError| {
            tracing::error!(error = %e, "rotation failed");
            Error::Internal
        };
        let (new, activated) = if prepare_only {
            (self.authority.prepare_now(now).map_err(internal)?, false)
        } else {
            let r = self
                .authority
                .rotate_now(now, self.max_svid_ttl_secs(), revoke_old)
                .map_err(internal)?;
            (r.new, true)
        };
        let audit = AuditRecord::new(now, AuditKind::CaRotated, "ok")
            .field("old_generation", old)
            .field("new_generation", new)
            .field("activated", activated)
            .field("revoke_old", revoke_old)
            .field("caller", caller.describe());
        self.store.append_audit(audit).await?;
        if revoke_old && activated {
            self.store_revocation(
                RevocationRecord {
                    kind: RevocationKind::CaGeneration,
                    value: old.to_string(),
                    revoked_at_ms: now,
                    expires_at_ms: None,
                    reason: "CA key compromise rotation".into(),
                },
                caller,
            )
            .await?;
        }
        self.bundle_changed().await;
        Ok(RotationView {
            old,
            new,
            sequence: self.authority.view().sequence,
            activated,
        })
    }

    /// Re-reads the key ring from disk (after another replica rotated) and
    /// announces the change. Returns whether the bundle changed.
    pub async fn reload_authority(&self) -> bool {
        match self.authority.reload(self.clock.now_ms()) {
            Ok(true) => {
                self.bundle_changed().await;
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::error!(error = %e, "reloading the key ring failed");
                false
            }
        }
    }

    async fn bundle_changed(&self) {
        let seq = self.authority.view().sequence;
        self.bundle_tx.send_replace(seq);
        if let Err(e) = self.refresh_crls().await {
            tracing::error!(error = %e, "CRL refresh after bundle change failed");
        }
    }

    /// Subscribes to CRL regenerations.
    pub fn watch_crls(&self) -> tokio::sync::watch::Receiver<u64> {
        self.crl_tx.subscribe()
    }

    /// Subscribes to bundle changes (the value is the bundle sequence).
    pub fn watch_bundle(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundle_tx.subscribe()
    }

    /// Periodic upkeep: the rotation schedule, purging expired nonces and
    /// revocations, reloading plan and revocations, refreshing the CRLs.
    /// Returns whether the bundle changed.
    ///
    /// # Errors
    /// Store failure.
    pub async fn maintain(&self) -> Result<bool, Error> {
        let now = self.clock.now_ms();
        let changed = match self.authority.tick(now, self.max_svid_ttl_secs()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "rotation schedule failed");
                false
            }
        };
        if changed {
            let audit = AuditRecord::new(now, AuditKind::CaRotated, "ok")
                .field("scheduled", true)
                .field("sequence", self.authority.view().sequence)
                .field("active_generation", self.authority.active().generation());
            self.store.append_audit(audit).await?;
            self.bundle_changed().await;
        }
        self.store.purge_expired(now).await?;
        self.prune_rate_limits();
        self.reload_plan().await?;
        self.reload_revocations().await?;
        if !changed {
            self.refresh_crls().await?;
        }
        Ok(changed)
    }
}

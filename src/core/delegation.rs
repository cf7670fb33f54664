//! Delegated issuance: a host agent (`sigil agent`) obtains SVIDs for the
//! workloads on its host. The agent authenticates with its own X509-SVID
//! (mTLS); the active plan decides which identities it may obtain.
//!
//! The rule, checked in order on every call, stopping at the first failure:
//! 1. the caller presents an X509-SVID recorded by this broker, for the
//!    SPIFFE ID it carries, unexpired (no renewal grace: an agent renews in
//!    time), and not revoked (`NOT_AUTHORIZED` / `SVID_REVOKED`);
//! 2. a plan entry has `parent_id` = the caller's SPIFFE ID and `spiffe_id`
//!    = the requested one, and each of its selectors is among the selectors
//!    the agent observed for the calling workload (`NOT_AUTHORIZED`);
//! 3. for X509-SVIDs: the CSR proves possession of its key (the agent
//!    generated it; the workload key never crosses the wire).
//!
//! Recording: a delegated certificate is written with
//! [`crate::store::Store::renew_cert`], with the **agent's** certificate as
//! the parent. That store method re-checks, inside the insert transaction,
//! that the parent exists and is not revoked (by serial, SPIFFE ID, node or
//! CA generation), so a revocation of the agent can never be outrun by a
//! concurrent mint, and it needs no new store method or migration. The new
//! certificate inherits the agent's `origin` and `node`: `sigil revoke
//! --node` of an attested agent therefore also revokes everything it minted.
//! The audit row (`issued`, with `delegated_by` and `agent_serial`) is the
//! lineage record.
//!
//! The observed selectors are the agent's claim: the broker cannot check
//! them, only that the claim fits the plan. They are bounded in size and
//! count; only the matched entry's selectors reach the audit row.

use super::{
    broker::{Broker, LeafSpec},
    plans::with_plan,
    Caller, Enrolled, Error, FetchedJwt,
};
use crate::{
    audit::{AuditKind, AuditRecord},
    ca,
    identity::SpiffeId,
    policy::Entry,
    store::{IssuedCert, RenewOutcome, Renewal},
};

/// Most observed selectors accepted per request.
pub const MAX_OBSERVED_SELECTORS: usize = 64;
/// Longest observed selector, bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// A plan entry an agent may obtain for its workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegatedEntryView {
    /// The workload SPIFFE ID.
    pub spiffe_id: String,
    /// Selectors a local caller must all have.
    pub selectors: Vec<String>,
    /// X509-SVID lifetime, seconds.
    pub x509_ttl_secs: i64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_ttl_secs: i64,
}

/// The entries of one agent under the active plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegatedEntries {
    /// Entries whose `parent_id` is the agent.
    pub entries: Vec<DelegatedEntryView>,
    /// Active plan version (0: none).
    pub plan_version: u64,
}

/// A delegated X509-SVID request in domain terms.
#[derive(Clone)]
pub struct DelegatedX509Params {
    /// DER PKCS#10 CSR made with the workload's new key.
    pub csr: Vec<u8>,
    /// The SPIFFE ID asked for.
    pub spiffe_id: String,
    /// The selectors the agent observed for the calling workload.
    pub selectors: Vec<String>,
}

impl std::fmt::Debug for DelegatedX509Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelegatedX509Params")
            .field("csr_len", &self.csr.len())
            .field("spiffe_id", &self.spiffe_id)
            .field("selectors", &self.selectors.len())
            .finish()
    }
}

/// A delegated JWT-SVID request in domain terms.
#[derive(Debug, Clone)]
pub struct DelegatedJwtParams {
    /// The SPIFFE ID asked for (the token's `sub`).
    pub spiffe_id: String,
    /// Audiences (at least one).
    pub audiences: Vec<String>,
    /// The selectors the agent observed for the calling workload.
    pub selectors: Vec<String>,
    /// Requested lifetime, seconds (0: the entry's `jwt_ttl`); capped by the plan.
    pub ttl_secs: u32,
}

impl Broker {
    /// The active plan's entries whose `parent_id` is the caller.
    ///
    /// # Errors
    /// `NotAuthorized` (no, foreign or expired certificate), `SvidRevoked`.
    pub async fn delegated_entries(&self, caller: &Caller) -> Result<DelegatedEntries, Error> {
        let r = async {
            let agent = self.agent_cert(caller).await?;
            let Some(plan) = self.active_plan() else {
                return Ok(DelegatedEntries {
                    entries: Vec::new(),
                    plan_version: 0,
                });
            };
            let entries = plan
                .plan
                .entries
                .iter()
                .filter(|e| e.parent_id.as_deref() == Some(agent.spiffe_id.as_str()))
                .map(|e| DelegatedEntryView {
                    spiffe_id: e.spiffe_id.clone(),
                    selectors: e.selectors.clone(),
                    x509_ttl_secs: e.x509_ttl,
                    jwt_ttl_secs: e.jwt_ttl,
                })
                .collect();
            Ok(DelegatedEntries {
                entries,
                plan_version: plan.version,
            })
        }
        .await;
        if let Err(e) = &r {
            self.audit_denial("list_delegated_entries", e, caller, None)
                .await;
        }
        r
    }

    /// Issues an X509-SVID for a workload of the calling agent (rule in the
    /// module docs).
    ///
    /// # Errors
    /// `NotAuthorized`, `SvidRevoked`, `Malformed` (CSR, SPIFFE ID, selectors).
    pub async fn mint_delegated(
        &self,
        req: DelegatedX509Params,
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Issue)?;
        let r = self.mint_delegated_inner(&req, caller).await;
        if let Err(e) = &r {
            let id = bounded(&req.spiffe_id);
            self.audit_denial_with("mint_delegated", e, caller, &[("spiffe_id", id)])
                .await;
        }
        r
    }

    async fn mint_delegated_inner(
        &self,
        req: &DelegatedX509Params,
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        if req.csr.is_empty() || req.csr.len() > super::broker::MAX_CSR_LEN {
            return Err(Error::Malformed("csr is empty or too large".into()));
        }
        let agent = self.agent_cert(caller).await?;
        let plan = self.active_plan().ok_or(Error::NotAuthorized)?;
        let entry = delegated_entry(&plan.plan.entries, &agent.spiffe_id, req)?;
        let id = SpiffeId::parse(&entry.spiffe_id).map_err(|_| Error::Internal)?;
        let csr = ca::verify_csr(&req.csr).map_err(|e| Error::Malformed(format!("csr: {e}")))?;

        let now = self.clock.now_ms();
        let cert = self.sign_leaf(LeafSpec {
            id: &id,
            csr: &csr,
            now_ms: now,
            ttl_secs: entry.x509_ttl,
            dns_names: &entry.dns_names,
            token_id: None,
            // Kept by the store (not replaced by the agent's origin): a
            // delegated SVID is renewed only through its agent.
            origin: format!("delegated:{}", agent.origin),
            node: agent.node.clone(),
        })?;
        let audit = AuditRecord::new(now, AuditKind::Issued, "ok")
            .field("spiffe_id", id.as_str())
            .field("serial", cert.serial.as_str())
            .field("not_after_ms", cert.not_after_ms)
            .field("delegated_by", agent.spiffe_id.as_str())
            .field("agent_serial", agent.serial.as_str())
            .field("entry_selectors", entry.selectors.clone())
            .field("caller", caller.describe());
        let audit = with_plan(audit, Some(&plan));
        match self
            .store
            .renew_cert(Renewal {
                parent_serial: agent.serial.clone(),
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
        tracing::info!(spiffe_id = %id, serial = %cert.serial, agent = %agent.spiffe_id, "issued for a workload of an agent");
        Ok(self.enrolled(cert, None, false))
    }

    /// Mints a JWT-SVID for a workload of the calling agent (same rule as
    /// [`Broker::mint_delegated`]; no CSR).
    ///
    /// # Errors
    /// `NotAuthorized`, `SvidRevoked`, `Malformed` (audiences, SPIFFE ID, selectors).
    pub async fn mint_delegated_jwt(
        &self,
        req: DelegatedJwtParams,
        caller: &Caller,
    ) -> Result<FetchedJwt, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Issue)?;
        let r = async {
            if req.audiences.is_empty() {
                return Err(Error::Malformed("at least one audience is required".into()));
            }
            super::broker::check_audiences(&req.audiences)?;
            let agent = self.agent_cert(caller).await?;
            let plan = self.active_plan().ok_or(Error::NotAuthorized)?;
            let entry = delegated_entry(
                &plan.plan.entries,
                &agent.spiffe_id,
                &DelegatedX509Params {
                    csr: Vec::new(),
                    spiffe_id: req.spiffe_id.clone(),
                    selectors: req.selectors.clone(),
                },
            )?;
            let id = SpiffeId::parse(&entry.spiffe_id).map_err(|_| Error::Internal)?;
            let ttl = match i64::from(req.ttl_secs) {
                0 => entry.jwt_ttl,
                t => t.min(plan.plan.limits.max_svid_ttl),
            };
            let now = self.clock.now_ms();
            let m = self.mint_jwt_full(&id, &req.audiences, now, ttl)?;
            let audit = AuditRecord::new(now, AuditKind::Issued, "ok")
                .field("spiffe_id", id.as_str())
                .field("jwt_svid", true)
                .field("jti", m.jti.as_str())
                .field("exp", m.expires_at)
                .field("delegated_by", agent.spiffe_id.as_str())
                .field("agent_serial", agent.serial.as_str())
                .field("caller", caller.describe());
            self.store
                .append_audit(with_plan(audit, Some(&plan)))
                .await?;
            Ok(FetchedJwt {
                token: m.token,
                expires_at: m.expires_at,
            })
        }
        .await;
        if let Err(e) = &r {
            let id = bounded(&req.spiffe_id);
            self.audit_denial_with("mint_delegated_jwt", e, caller, &[("spiffe_id", id)])
                .await;
        }
        r
    }

    /// The caller's certificate record: issued by this broker for the
    /// SPIFFE ID it carries, unexpired, not revoked.
    async fn agent_cert(&self, caller: &Caller) -> Result<IssuedCert, Error> {
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
        if self.clock.now_ms() >= cert.not_after_ms {
            return Err(Error::NotAuthorized);
        }
        if self.store.is_revoked(serial).await? {
            return Err(Error::SvidRevoked);
        }
        Ok(cert)
    }
}

/// The entry granting `req.spiffe_id` to the agent `agent_id` for a caller
/// with `req.selectors`; the most specific one when several fit.
fn delegated_entry<'p>(
    entries: &'p [Entry],
    agent_id: &str,
    req: &DelegatedX509Params,
) -> Result<&'p Entry, Error> {
    if req.selectors.len() > MAX_OBSERVED_SELECTORS
        || req
            .selectors
            .iter()
            .any(|s| s.is_empty() || s.len() > MAX_SELECTOR_LEN)
    {
        return Err(Error::Malformed(format!(
            "selectors: at most {MAX_OBSERVED_SELECTORS}, each 1..={MAX_SELECTOR_LEN} bytes"
        )));
    }
    SpiffeId::parse(&req.spiffe_id).map_err(|e| Error::Malformed(format!("spiffe_id: {e}")))?;
    entries
        .iter()
        .filter(|e| {
            e.parent_id.as_deref() == Some(agent_id)
                && e.spiffe_id == req.spiffe_id
                && !e.selectors.is_empty()
                && e.selectors.iter().all(|s| req.selectors.contains(s))
        })
        .max_by_key(|e| e.selectors.len())
        .ok_or(Error::NotAuthorized)
}

/// A caller-supplied string shortened for an audit field.
fn bounded(s: &str) -> &str {
    if s.len() <= 256 {
        s
    } else {
        "(too long)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, parent: Option<&str>, sel: &[&str]) -> Entry {
        Entry {
            spiffe_id: id.into(),
            selectors: sel.iter().map(|s| s.to_string()).collect(),
            x509_ttl: 3600,
            jwt_ttl: 300,
            dns_names: vec![],
            parent_id: parent.map(str::to_owned),
        }
    }

    fn req(id: &str, sel: &[&str]) -> DelegatedX509Params {
        DelegatedX509Params {
            csr: vec![],
            spiffe_id: id.into(),
            selectors: sel.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_parents_entries_with_all_selectors_present_match() {
        const AGENT: &str = "spiffe://sigil.local/agent";
        let entries = vec![
            entry("spiffe://sigil.local/w", Some(AGENT), &["unix:uid:1000"]),
            entry(
                "spiffe://sigil.local/w",
                Some(AGENT),
                &["unix:uid:1000", "unix:path:/bin/w"],
            ),
            entry(
                "spiffe://sigil.local/x",
                Some("spiffe://sigil.local/other"),
                &["unix:uid:1000"],
            ),
            entry("spiffe://sigil.local/y", None, &["unix:uid:1000"]),
        ];
        let observed = ["unix:uid:1000", "unix:gid:10", "unix:path:/bin/w"];
        let e =
            delegated_entry(&entries, AGENT, &req("spiffe://sigil.local/w", &observed)).unwrap();
        assert_eq!(e.selectors.len(), 2, "the most specific fitting entry");
        for (id, sel) in [
            ("spiffe://sigil.local/x", &observed[..]),
            ("spiffe://sigil.local/y", &observed[..]),
            ("spiffe://sigil.local/w", &["unix:uid:1001"][..]),
            ("spiffe://sigil.local/w", &[][..]),
        ] {
            assert_eq!(
                delegated_entry(&entries, AGENT, &req(id, sel)),
                Err(Error::NotAuthorized),
                "{id} {sel:?}"
            );
        }
        assert!(matches!(
            delegated_entry(&entries, AGENT, &req("nope", &observed)),
            Err(Error::Malformed(_))
        ));
        let many: Vec<String> = (0..=MAX_OBSERVED_SELECTORS)
            .map(|i| format!("unix:gid:{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(matches!(
            delegated_entry(&entries, AGENT, &req("spiffe://sigil.local/w", &many)),
            Err(Error::Malformed(_))
        ));
    }
}

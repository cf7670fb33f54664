//! Enrollment from an attestation document (DESIGN.md §2.2): server
//! challenges, verification by the format's [`crate::attest::Attestor`],
//! matching the attested selectors against the active plan's registration
//! entries, and one transaction that consumes the replay guard (challenge or
//! `jti`) and records the certificate.
//!
//! Checks, in order: sizes → known format → CSR proof of possession →
//! the attestor (signature, chain, freshness, CSR binding; it returns a
//! `VerifiedAttestation`, which only the attest module can build) → node not
//! revoked → a plan entry matches → sign → consume the guard and record
//! (durable) → respond.

use std::sync::Arc;

use super::{
    broker::{Broker, LeafSpec},
    plans::with_plan,
    Caller, Enrolled, Error,
};
use crate::{
    attest::{AttestError, AttestInput, ReplayGuard, VerifiedAttestation, MAX_DOCUMENT_LEN},
    audit::{AuditKind, AuditRecord},
    ca,
    identity::SpiffeId,
    policy::{Entry, Plan},
    store::{AttestGuard, AttestOutcome, AttestRedemption},
};

/// Server challenge length, bytes.
pub const CHALLENGE_LEN: usize = 32;

/// A fresh server challenge.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The nonce to embed in the attestation document.
    pub nonce: Vec<u8>,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
}

/// The registration entry for a set of attested selectors: every selector
/// of the entry must be present; the most specific (most selectors) wins;
/// a tie is ambiguous.
///
/// # Errors
/// `AttestationNoMatchingEntry` for no match or a tie.
pub fn match_entry<'p>(plan: &'p Plan, selectors: &[String]) -> Result<&'p Entry, Error> {
    let mut best: Option<&Entry> = None;
    let mut tie = false;
    for e in plan.entries.iter().filter(|e| !e.selectors.is_empty()) {
        if !e.selectors.iter().all(|s| selectors.contains(s)) {
            continue;
        }
        match best {
            Some(b) if b.selectors.len() > e.selectors.len() => {}
            Some(b) if b.selectors.len() == e.selectors.len() => tie = true,
            _ => {
                best = Some(e);
                tie = false;
            }
        }
    }
    match best {
        Some(_) if tie => Err(Error::AttestationNoMatchingEntry),
        Some(e) => Ok(e),
        None => Err(Error::AttestationNoMatchingEntry),
    }
}

impl Broker {
    /// Issues a one-use server challenge (recorded in the store, so any
    /// replica can redeem it), valid for the freshness window.
    ///
    /// # Errors
    /// `RateLimited`, `Unavailable`.
    pub async fn challenge(&self, caller: &Caller) -> Result<Challenge, Error> {
        self.rate_gate(caller, crate::ratelimit::Limit::Challenge)?;
        let mut nonce = vec![0u8; CHALLENGE_LEN];
        rand::fill(&mut nonce[..]);
        let expires_at_ms = self.clock.now_ms() + self.cfg.window_secs * 1000;
        self.store
            .create_challenge(&hex::encode(&nonce), expires_at_ms)
            .await?;
        Ok(Challenge {
            nonce,
            expires_at: expires_at_ms.div_euclid(1000),
        })
    }

    /// The OIDC verifier (to refresh issuers' keys).
    pub fn oidc_attestor(&self) -> Option<Arc<crate::attest::OidcAttestor>> {
        self.attestors.oidc().cloned()
    }

    /// Attestation formats this broker verifies.
    pub fn attestation_formats(&self) -> Vec<&'static str> {
        self.attestors.formats()
    }

    pub(super) async fn enroll_attestation(
        &self,
        csr: &[u8],
        format: &str,
        document: &[u8],
        audiences: &[String],
        caller: &Caller,
    ) -> Result<Enrolled, Error> {
        if csr.is_empty() || csr.len() > super::broker::MAX_CSR_LEN {
            return Err(Error::Malformed("csr is empty or too large".into()));
        }
        if document.is_empty() || document.len() > MAX_DOCUMENT_LEN {
            return Err(Error::Malformed(format!(
                "attestation document must be 1..={MAX_DOCUMENT_LEN} bytes"
            )));
        }
        super::broker::check_audiences(audiences)?;
        let attestor = self.attestors.get(format).map_err(|_| {
            Error::Malformed(format!(
                "unknown attestation format (this broker verifies: {})",
                self.attestors.formats().join(", ")
            ))
        })?;
        let vcsr = ca::verify_csr(csr).map_err(|e| Error::Malformed(format!("csr: {e}")))?;
        let now = self.clock.now_ms();
        let verified: VerifiedAttestation = attestor
            .attest(&AttestInput {
                document,
                csr_der: csr,
                csr_spki_der: vcsr.spki_der(),
                now_ms: now,
                window_secs: self.cfg.window_secs,
            })
            .map_err(|e| match e {
                AttestError::TooLarge => Error::Malformed("attestation document too large".into()),
                AttestError::Invalid(m) => Error::AttestationInvalid(m),
                other => Error::AttestationInvalid(other.to_string()),
            })?;
        if self.revocation_set().node_revoked(verified.node()) {
            return Err(Error::AttestationInvalid(
                "the attested node is revoked".into(),
            ));
        }
        let plan = self
            .active_plan()
            .ok_or(Error::AttestationNoMatchingEntry)?;
        let entry = match_entry(&plan.plan, verified.selectors())?;
        let id = SpiffeId::parse(&entry.spiffe_id).map_err(|_| Error::Internal)?;

        let cert = self.sign_leaf(LeafSpec {
            id: &id,
            csr: &vcsr,
            now_ms: now,
            ttl_secs: entry.x509_ttl,
            dns_names: &entry.dns_names,
            token_id: None,
            origin: format!("attest:{}", verified.format()),
            node: Some(verified.node().to_owned()),
        })?;
        let guard = match verified.replay_guard() {
            ReplayGuard::Challenge(n) => AttestGuard::Challenge(hex::encode(n)),
            ReplayGuard::Jti { key, expires_at_ms } => AttestGuard::OneUse {
                key: format!("attest:{key}"),
                expires_at_ms: *expires_at_ms,
            },
        };
        let audit = AuditRecord::new(now, AuditKind::Issued, "ok")
            .field("format", verified.format())
            .field("spiffe_id", id.as_str())
            .field("entry_selectors", entry.selectors.clone())
            .field("node", verified.node())
            .field("csr_binding", verified.csr_binding().as_str())
            .field("serial", cert.serial.as_str())
            .field("not_after_ms", cert.not_after_ms)
            .field("caller", caller.describe());
        let audit = with_plan(audit, Some(&plan));
        // Signed before the commit, sent only if it wins (as for tokens).
        let jwt = if audiences.is_empty() {
            None
        } else {
            Some(self.mint_jwt(&id, audiences, now, entry.jwt_ttl)?)
        };
        match self
            .store
            .redeem_attestation(AttestRedemption {
                guard,
                now_ms: now,
                cert: cert.clone(),
                audit,
            })
            .await?
        {
            AttestOutcome::Issued => {}
            AttestOutcome::ChallengeUnknown => {
                return Err(Error::AttestationInvalid(
                    "nonce is not a challenge issued by this broker".into(),
                ))
            }
            AttestOutcome::ChallengeExpired => {
                return Err(Error::AttestationInvalid("challenge expired".into()))
            }
            AttestOutcome::Replayed => return Err(Error::NonceReplayed),
        }
        tracing::info!(format = verified.format(), spiffe_id = %id, serial = %cert.serial, "issued from attestation");
        Ok(self.enrolled(cert, jwt, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;

    #[test]
    fn most_specific_entry_wins_and_ties_are_refused() {
        let td = TrustDomain::parse("sigil.local").unwrap();
        let plan = Plan::parse(
            br#"admins = ["spiffe://sigil.local/a"]
[[entries]]
spiffe_id = "spiffe://sigil.local/repo"
selectors = ["oidc:gh:repository:o/r"]
[[entries]]
spiffe_id = "spiffe://sigil.local/repo-main"
selectors = ["oidc:gh:repository:o/r", "oidc:gh:ref:refs/heads/main"]
[[entries]]
spiffe_id = "spiffe://sigil.local/x"
selectors = ["a:1"]
[[entries]]
spiffe_id = "spiffe://sigil.local/y"
selectors = ["b:1"]
"#,
            &td,
        )
        .unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            match_entry(
                &plan,
                &s(&["oidc:gh:repository:o/r", "oidc:gh:ref:refs/heads/main"])
            )
            .unwrap()
            .spiffe_id,
            "spiffe://sigil.local/repo-main"
        );
        assert_eq!(
            match_entry(
                &plan,
                &s(&["oidc:gh:repository:o/r", "oidc:gh:ref:refs/heads/dev"])
            )
            .unwrap()
            .spiffe_id,
            "spiffe://sigil.local/repo"
        );
        assert!(match_entry(&plan, &s(&["oidc:gh:repository:other"])).is_err());
        assert!(match_entry(&plan, &s(&["a:1", "b:1"])).is_err(), "tie");
    }
}

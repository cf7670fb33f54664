//! The audit trail's shape and its hash chain. An [`AuditRecord`] is a typed
//! event with allow-listed fields (token *ids*, serials, SPIFFE IDs, reasons,
//! peer addresses — never a secret); the store appends it and links it to the
//! previous row with [`chain_hash`]; [`verify_chain`] detects an edited,
//! inserted or deleted row.
//!
//! Import exception (STYLE.md §2): `store` uses this module's types and
//! [`chain_hash`], because linking must happen where rows are serialised.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first row.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as stable lowercase strings in the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditKind {
    /// An enrollment token was minted.
    TokenCreated,
    /// An enrollment token was revoked.
    TokenRevoked,
    /// An X509-SVID was issued (possibly with a JWT-SVID).
    Issued,
    /// A consumed token was retried with the same key: the first certificate was returned.
    Reissued,
    /// A request was refused; `reason` says why.
    Denied,
    /// The foundation plan was installed through the bootstrap RPC.
    PlanBootstrapped,
    /// A plan was proposed.
    PlanProposed,
    /// An admin approved a plan.
    PlanApproved,
    /// A plan became the active plan.
    PlanActivated,
    /// An X509-SVID was renewed over mTLS.
    Renewed,
    /// An identity, certificate, node or JWT was revoked.
    Revoked,
    /// The CA/JWT key generation changed (scheduled or forced).
    CaRotated,
}

impl AuditKind {
    /// The stable string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenCreated => "token_created",
            Self::TokenRevoked => "token_revoked",
            Self::Issued => "issued",
            Self::Reissued => "reissued",
            Self::Denied => "denied",
            Self::PlanBootstrapped => "plan_bootstrapped",
            Self::PlanProposed => "plan_proposed",
            Self::PlanApproved => "plan_approved",
            Self::PlanActivated => "plan_activated",
            Self::Renewed => "renewed",
            Self::Revoked => "revoked",
            Self::CaRotated => "ca_rotated",
        }
    }
}

tokio::task_local! {
    /// The id of the request being served; set by the api layer, copied into
    /// every audit row the request produces and into its log lines.
    pub static REQUEST_ID: String;
}

/// The current request id, if the caller runs inside [`REQUEST_ID`]'s scope.
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// An event to append. Build with [`AuditRecord::new`] and [`AuditRecord::field`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// Event time, Unix ms.
    pub time_ms: i64,
    /// Stable kind string.
    pub kind: String,
    /// `ok` or the denial reason.
    pub outcome: String,
    /// Allow-listed fields.
    pub fields: Map<String, Value>,
}

impl AuditRecord {
    /// A new event (tagged with the current request id, if any).
    pub fn new(time_ms: i64, kind: AuditKind, outcome: &str) -> Self {
        let mut fields = Map::new();
        if let Some(id) = current_request_id() {
            fields.insert("request_id".to_owned(), Value::String(id));
        }
        Self {
            time_ms,
            kind: kind.as_str().to_owned(),
            outcome: outcome.to_owned(),
            fields,
        }
    }

    /// Adds a field. Callers pass identifiers and reasons only.
    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// The canonical JSON of `fields` (serde_json keeps keys sorted).
    pub fn fields_json(&self) -> String {
        Value::Object(self.fields.clone()).to_string()
    }
}

/// A stored, chained audit row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// 1-based position in the chain.
    pub seq: u64,
    /// Event time, Unix ms.
    pub time_ms: i64,
    /// Kind string.
    pub kind: String,
    /// `ok` or reason.
    pub outcome: String,
    /// Canonical JSON object of fields.
    pub fields_json: String,
    /// Hash of the previous row (or [`GENESIS_HASH`]).
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

/// The hash linking a row to its predecessor:
/// hex SHA-256 over `prev_hash`, `seq`, `time_ms`, `kind`, `outcome`,
/// `fields_json`, each length-prefixed so no two rows can collide by shifting
/// bytes between fields.
pub fn chain_hash(
    prev_hash: &str,
    seq: u64,
    time_ms: i64,
    kind: &str,
    outcome: &str,
    fields_json: &str,
) -> String {
    let mut h = Sha256::new();
    h.update(b"sigil/audit/v1");
    for part in [
        prev_hash.as_bytes(),
        seq.to_string().as_bytes(),
        time_ms.to_string().as_bytes(),
        kind.as_bytes(),
        outcome.as_bytes(),
        fields_json.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// Sequence number of the first bad row (or the expected one when a row is missing).
    pub seq: u64,
    /// What is wrong.
    pub problem: String,
}

/// Incremental verifier: feed rows in `seq` order.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev_hash: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            next_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
        }
    }
}

impl ChainVerifier {
    /// Checks the next row.
    ///
    /// # Errors
    /// [`ChainBreak`] at the first row that is missing, reordered, edited or relinked.
    pub fn check(&mut self, row: &AuditRow) -> Result<(), ChainBreak> {
        if row.seq != self.next_seq {
            return Err(ChainBreak {
                seq: self.next_seq,
                problem: format!("row {} missing (next row is {})", self.next_seq, row.seq),
            });
        }
        if row.prev_hash != self.prev_hash {
            return Err(ChainBreak {
                seq: row.seq,
                problem: "prev_hash does not match the previous row".into(),
            });
        }
        let expect = chain_hash(
            &row.prev_hash,
            row.seq,
            row.time_ms,
            &row.kind,
            &row.outcome,
            &row.fields_json,
        );
        if expect != row.hash {
            return Err(ChainBreak {
                seq: row.seq,
                problem: "row content does not match its hash (edited)".into(),
            });
        }
        self.next_seq += 1;
        self.prev_hash = row.hash.clone();
        Ok(())
    }

    /// Rows verified so far.
    pub fn count(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Verifies a whole chain held in memory.
///
/// # Errors
/// The first [`ChainBreak`].
pub fn verify_chain<'a>(rows: impl IntoIterator<Item = &'a AuditRow>) -> Result<u64, ChainBreak> {
    let mut v = ChainVerifier::default();
    for r in rows {
        v.check(r)?;
    }
    Ok(v.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRow> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let rec =
                    AuditRecord::new(seq as i64, AuditKind::Issued, "ok").field("serial", "ab");
                let fj = rec.fields_json();
                let hash = chain_hash(&prev, seq, rec.time_ms, &rec.kind, &rec.outcome, &fj);
                let row = AuditRow {
                    seq,
                    time_ms: rec.time_ms,
                    kind: rec.kind,
                    outcome: rec.outcome,
                    fields_json: fj,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify_chain(&chain(5)), Ok(5));
    }

    #[test]
    fn edit_and_delete_are_detected() {
        let mut c = chain(5);
        c[2].outcome = "TOKEN_REVOKED".into();
        assert_eq!(verify_chain(&c).unwrap_err().seq, 3);
        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify_chain(&c).unwrap_err().seq, 2);
    }
}

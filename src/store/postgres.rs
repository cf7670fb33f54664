//! The PostgreSQL backend of [`Store`], for N stateless broker replicas
//! sharing one database (DESIGN.md §5, issue #6): versioned migrations, a
//! small connection pool, the transaction of every write, and the change
//! listener (LISTEN/NOTIFY) behind [`Store::subscribe`].
//!
//! It owns every SQL statement sent to PostgreSQL; nothing outside this file
//! names `tokio_postgres`. Like the SQLite backend it knows no crypto or
//! policy: it stores what it is given and applies the one-use rules of
//! [`Store`] atomically — here across processes, so no rule may rest on
//! in-memory state. Each rule is a unique key or a row lock taken inside the
//! transaction that consumes it:
//!
//! * a nonce or one-use attestation key is consumed by `INSERT … ON CONFLICT
//!   DO NOTHING` on its primary key, first thing in the transaction; zero
//!   rows inserted means another transaction (on any replica) has it, and a
//!   refusal rolls the insert back;
//! * a token use is taken under `SELECT … FOR NO KEY UPDATE` on the token
//!   row, so concurrent redemptions queue on the row and each sees the last
//!   one's committed `uses` and certificates (the weaker-than-`FOR UPDATE`
//!   mode lets foreign-key checks of renewals through);
//! * a server challenge is consumed under `SELECT … FOR UPDATE` on its row;
//! * plan writes (bootstrap, propose, approve) run under one transaction-level
//!   advisory lock, so "no plan was ever activated", "the active plan is still
//!   `based_on`" and the next version number are decided one writer at a
//!   time; a unique partial index also forbids two active plans;
//! * revocations take an exclusive advisory lock and renewals a shared one,
//!   so a renewal never commits a child of a parent revoked meanwhile;
//! * shared metadata uses `INSERT … ON CONFLICT DO NOTHING` then a re-read,
//!   and compare-and-swap is a conditional `UPDATE` (one row or none).
//!
//! # Writes: group commit, one lock order
//! Every state-changing method becomes a job on a channel, answered through
//! a oneshot. One batching task per store takes a job, drains up to
//! `MAX_BATCH - 1` (127) more already queued, and runs them all in one
//! transaction on one pooled connection (one WAL flush for the batch): `BEGIN`,
//! the audit lock, then each job inside `SAVEPOINT op`. A job that keeps its
//! changes releases the savepoint; a refusal (`Finish::Rollback`) rolls back
//! to it; a job that fails with an error is rolled back to it and answered
//! with its error at once (nothing of it can commit), and the others go on.
//! Every other answer is sent only after `COMMIT` returned, so `Ok` (and a
//! refusal) always describes durable state. If the batch cannot commit (lost
//! connection, `COMMIT` failed, the batch outlived its time limit), every job
//! not yet answered gets `Unavailable`; so does every job of a batch in which
//! a job panicked (each batch runs in a task of its own, whose connection is
//! dropped, so the server rolls back, and the batcher goes on). A caller that
//! stops waiting does not cancel its write: once queued, a job is applied.
//!
//! The audit chain needs one global order, so appends are serialized with a
//! transaction-level advisory lock ([`AUDIT_LOCK`]) and the head is read
//! from the table after taking it (in READ COMMITTED each statement sees
//! everything committed before it started, including the previous holder's
//! rows; later jobs of a batch see earlier ones' rows, same transaction).
//! Every write transaction takes that lock *first*, before any savepoint
//! (rolling back to a savepoint would release a lock taken after it) and
//! before any row or other advisory lock. So write transactions, on every
//! replica, run one at a time, and no lock wait can form a cycle: a batch
//! that holds row locks holds the audit lock, and every other write
//! transaction is still waiting for that lock and holds nothing. (Without
//! this order, an earlier job of a batch could hold the audit lock while a
//! later one waits on a row another replica's batch has locked, which waits
//! for the audit lock: a deadlock that fails both batches.) The plan and
//! revocation advisory locks and the row locks above are still taken, after
//! it; schema migrations run at startup outside the batcher under their own
//! lock and take no sigil lock after it.
//!
//! # Failures
//! A lost connection or a timeout is `Unavailable` (the operation may or may
//! not have happened; the broker answers UNAVAILABLE, never a wrong answer).
//! A read that loses its connection is retried once on a fresh connection;
//! a write never is, since a commit whose acknowledgement was lost may have
//! happened. The connection URL is never logged or put in an error (it may
//! hold a password); errors carry PostgreSQL's message and SQLSTATE, which
//! name constraints, never row values (the DETAIL line is left out).
//!
//! # TLS
//! With [`PostgresOptions::server_ca`] every connection is TLS, verified
//! like libpq's `sslmode=verify-full`; without it, plaintext (a loopback or
//! otherwise trusted network). The [`tls`] submodule decides and connects;
//! it is the only other file that names `tokio_postgres`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc, oneshot, watch, Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{AsyncMessage, Client, Config, Row, Statement};

use super::{
    ApproveOutcome, AttestGuard, AttestOutcome, AttestRedemption, BootstrapInstall,
    BootstrapOutcome, IssuedCert, PlanApproval, PlanProposal, PlanRecord, PlanState,
    ProposeOutcome, RedeemOutcome, Redemption, RenewOutcome, Renewal, RevocationKind,
    RevocationRecord, RevokeOutcome, Store, StoreCounts, StoreError, StoreEvent, TokenRecord,
};
use crate::audit::{self, AuditRecord, AuditRow, GENESIS_HASH};

mod tls;
use tls::PgTls;

/// Schema migrations; `MIGRATIONS[i]` takes the schema from version `i` to
/// `i + 1`. The same logical steps as the SQLite backend's V1..V7. Append
/// new entries, never edit old ones.
const MIGRATIONS: &[&str] = &[
    SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7,
];

/// Version 1: tokens, nonces, issued certificates, audit chain.
/// `insert_order` stands in for SQLite's `rowid` as a tie-breaker in listings.
/// Version 6: index for revocation lookups by node.
const SCHEMA_V6: &str = "
CREATE INDEX issued_node ON issued (node) WHERE node IS NOT NULL;
";

/// Version 7: an index on the expression the CRL query's `ca_generation`
/// branch joins on, in place of `issued_not_after`, which served only that
/// branch by walking every live certificate (as in the SQLite backend).
const SCHEMA_V7: &str = "
DROP INDEX issued_not_after;
CREATE INDEX issued_gen_not_after ON issued ((CAST(ca_gen AS TEXT)), not_after_ms);
";

const SCHEMA_V1: &str = "
CREATE TABLE tokens (
    token_id      TEXT    NOT NULL PRIMARY KEY,
    spiffe_id     TEXT    NOT NULL,
    created_at_ms BIGINT  NOT NULL,
    expires_at_ms BIGINT  NOT NULL,
    max_uses      BIGINT  NOT NULL,
    uses          BIGINT  NOT NULL,
    revoked_at_ms BIGINT,
    insert_order  BIGINT  GENERATED ALWAYS AS IDENTITY
);

CREATE TABLE nonces (
    nonce         TEXT    NOT NULL PRIMARY KEY,
    expires_at_ms BIGINT  NOT NULL
);
CREATE INDEX nonces_expires_at_ms ON nonces (expires_at_ms);

CREATE TABLE issued (
    serial        TEXT    NOT NULL PRIMARY KEY,
    token_id      TEXT    REFERENCES tokens (token_id),
    spiffe_id     TEXT    NOT NULL,
    spki_sha256   TEXT    NOT NULL,
    issued_at_ms  BIGINT  NOT NULL,
    not_after_ms  BIGINT  NOT NULL,
    der           BYTEA   NOT NULL,
    insert_order  BIGINT  GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX issued_token_spki ON issued (token_id, spki_sha256);

CREATE TABLE audit (
    seq           BIGINT  NOT NULL PRIMARY KEY,
    time_ms       BIGINT  NOT NULL,
    kind          TEXT    NOT NULL,
    outcome       TEXT    NOT NULL,
    fields_json   TEXT    NOT NULL,
    prev_hash     TEXT    NOT NULL,
    hash          TEXT    NOT NULL
);
";

/// Version 2: plans and their approvals.
const SCHEMA_V2: &str = "
CREATE TABLE plans (
    version            BIGINT NOT NULL PRIMARY KEY,
    sha256             TEXT   NOT NULL,
    canonical_json     TEXT   NOT NULL,
    state              TEXT   NOT NULL,
    proposer           TEXT   NOT NULL,
    created_at_ms      BIGINT NOT NULL,
    expires_at_ms      BIGINT NOT NULL,
    activated_at_ms    BIGINT,
    required_approvals BIGINT NOT NULL
);
CREATE UNIQUE INDEX plans_one_active ON plans (state) WHERE state = 'active';

CREATE TABLE plan_approvals (
    version       BIGINT NOT NULL REFERENCES plans (version),
    approver      TEXT   NOT NULL,
    at_ms         BIGINT NOT NULL,
    insert_order  BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (version, approver)
);
";

/// Version 3: certificate lineage (CA generation, origin, node) and revocations.
const SCHEMA_V3: &str = "
ALTER TABLE issued ADD COLUMN ca_gen BIGINT NOT NULL DEFAULT 1;
ALTER TABLE issued ADD COLUMN origin TEXT NOT NULL DEFAULT 'token';
ALTER TABLE issued ADD COLUMN node TEXT;
CREATE INDEX issued_spiffe ON issued (spiffe_id, not_after_ms);
CREATE INDEX issued_not_after ON issued (not_after_ms);

CREATE TABLE revocations (
    kind          TEXT   NOT NULL,
    value         TEXT   NOT NULL,
    revoked_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    reason        TEXT   NOT NULL,
    PRIMARY KEY (kind, value)
);
";

/// Version 4: server challenges for attestation.
const SCHEMA_V4: &str = "
CREATE TABLE challenges (
    nonce         TEXT   NOT NULL PRIMARY KEY,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms    BIGINT
);
CREATE INDEX challenges_expires_at_ms ON challenges (expires_at_ms);
";

/// Version 5: shared metadata (key material, key ring manifest).
const SCHEMA_V5: &str = "
CREATE TABLE meta (
    key   TEXT  NOT NULL PRIMARY KEY,
    value BYTEA NOT NULL
);
";

/// Advisory lock keys (one namespace per database): "SIGL" and a number.
const MIGRATION_LOCK: i64 = 0x5349_474C_0000_0001;
/// Serializes write transactions, hence audit appends; the first lock every
/// write transaction takes (see the module docs).
const AUDIT_LOCK: i64 = 0x5349_474C_0000_0002;
/// Serializes plan writes.
const PLAN_LOCK: i64 = 0x5349_474C_0000_0003;
/// Exclusive for revocations, shared for renewals.
const REVOCATION_LOCK: i64 = 0x5349_474C_0000_0004;

/// The NOTIFY channel carrying [`StoreEvent`]s between replicas.
const CHANNEL: &str = "sigil_changes";
const NOTIFY_REVOCATION: &str = "revocation";
const NOTIFY_PLAN: &str = "plan";
const NOTIFY_KEYS: &str = "keys";

/// Largest pool (far above any server's connection limit).
const MAX_POOL: usize = 65_536;
/// Migrations may rewrite tables: they get a longer limit than other statements.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the listener checks that its connection is alive.
const LISTENER_PING: Duration = Duration::from_secs(30);
/// Listener reconnect backoff, doubling from the first to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A listener session shorter than this does not reset the backoff (flapping).
const STABLE_SESSION: Duration = Duration::from_secs(10);

macro_rules! token_columns {
    () => {
        "token_id, spiffe_id, created_at_ms, expires_at_ms, max_uses, uses, revoked_at_ms"
    };
}
macro_rules! issued_columns {
    () => {
        "serial, token_id, spiffe_id, spki_sha256, issued_at_ms, not_after_ms, der, ca_gen, \
         origin, node"
    };
}
macro_rules! audit_columns {
    () => {
        "seq, time_ms, kind, outcome, fields_json, prev_hash, hash"
    };
}
/// One plan row with its approvers (proposer first) in a single statement,
/// so both come from one snapshot.
macro_rules! plan_select {
    () => {
        "SELECT p.version, p.sha256, p.canonical_json, p.state, p.proposer, p.created_at_ms, \
         p.expires_at_ms, p.activated_at_ms, p.required_approvals, \
         ARRAY(SELECT a.approver FROM plan_approvals a WHERE a.version = p.version \
               ORDER BY a.at_ms, a.insert_order) \
         FROM plans p "
    };
}
/// SQL condition: the `issued` row aliased `c` is covered by a revocation
/// (the same condition as the SQLite backend's `COVERED`).
macro_rules! covered {
    () => {
        "(EXISTS (SELECT 1 FROM revocations r WHERE \
            (r.kind = 'serial' AND r.value = c.serial) \
         OR (r.kind = 'spiffe_id' AND r.value = c.spiffe_id AND r.revoked_at_ms >= c.issued_at_ms) \
         OR (r.kind = 'node' AND c.node IS NOT NULL AND r.value = c.node) \
         OR (r.kind = 'ca_generation' AND r.value = CAST(c.ca_gen AS TEXT))))"
    };
}

const SELECT_TOKEN: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM tokens WHERE token_id = $1"
);
const SELECT_TOKEN_LOCKED: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM tokens WHERE token_id = $1 FOR NO KEY UPDATE"
);
const SELECT_ISSUED: &str = concat!(
    "SELECT ",
    issued_columns!(),
    " FROM issued WHERE serial = $1"
);
/// The newest certificate for (token, key) still valid at `$3`.
const SELECT_VALID_CERT: &str = concat!(
    "SELECT ",
    issued_columns!(),
    " FROM issued WHERE token_id = $1 AND spki_sha256 = $2 AND not_after_ms > $3 \
     ORDER BY issued_at_ms DESC, insert_order DESC LIMIT 1"
);
const INSERT_NONCE: &str = "INSERT INTO nonces (nonce, expires_at_ms) VALUES ($1, $2) \
                            ON CONFLICT (nonce) DO NOTHING";
const LOCK: &str = "SELECT pg_advisory_xact_lock($1)";
const NOTIFY: &str = "SELECT pg_notify($1, $2)";

// === Options ===

/// Tuning for [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Most connections this replica opens for queries (clamped to
    /// 1..=65 536); the change listener uses one more.
    pub pool_size: usize,
    /// Server-side limit on one statement, lock waits included (values below
    /// 1 ms count as 1 ms). The client-side limits derive from it: connecting
    /// (at least 1 s), waiting for a pooled connection (2×), one whole
    /// operation (2× + 1 s).
    pub statement_timeout: Duration,
    /// PEM file of the CA(s) that sign the server's certificate. Set, every
    /// connection is TLS and verified as libpq's `sslmode=verify-full`
    /// (chain and host name); unset, plaintext. See [`tls`].
    pub server_ca: Option<std::path::PathBuf>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            statement_timeout: Duration::from_secs(5),
            server_ca: None,
        }
    }
}

/// Limits derived from [`PostgresOptions::statement_timeout`].
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    statement: Duration,
    connect: Duration,
    acquire: Duration,
    op: Duration,
}

impl Timeouts {
    fn new(statement: Duration) -> Self {
        let statement = statement.max(Duration::from_millis(1));
        Self {
            statement,
            connect: statement.max(Duration::from_secs(1)),
            acquire: statement.saturating_mul(2),
            op: statement
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1)),
        }
    }

    /// Session settings sent on every new pooled connection. A transaction
    /// left idle (a stalled replica holding locks) is aborted by the server.
    fn session_setup(&self) -> String {
        let ms = self.statement.as_millis();
        format!(
            "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {}",
            ms.saturating_mul(2).saturating_add(1000)
        )
    }
}

// === Errors ===

fn closed() -> StoreError {
    StoreError::Unavailable("closed".into())
}

fn timed_out(what: &str) -> StoreError {
    StoreError::Unavailable(format!("timed out {what}"))
}

/// A description of `e` without row values: PostgreSQL's message and
/// SQLSTATE (not its DETAIL, which can quote a key), or the client's error
/// and its cause (I/O errors name no host or credential).
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Integrity violations (SQLSTATE class 23) are `Conflict`; anything else
/// the server or the connection reported is `Unavailable`.
fn store_error(e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) if db.code().code().starts_with("23") => StoreError::Conflict(describe(e)),
        _ => StoreError::Unavailable(describe(e)),
    }
}

/// Whether the connection that produced `e` must not be used again: the
/// client lost it, or the server reported a connection exception (class
/// 08), a shutdown (57P0x) or a fatal error.
fn breaks_connection(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08")
                || code.starts_with("57P")
                || matches!(db.severity(), "FATAL" | "PANIC")
        }
    }
}

fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("negative count or sequence".into()))
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt("sequence out of range".into()))
}

// === Row decoding ===

fn col<'r, T: FromSql<'r>>(row: &'r Row, idx: usize) -> Result<T, StoreError> {
    row.try_get(idx)
        .map_err(|e| StoreError::Corrupt(describe(&e)))
}

fn col_u32(row: &Row, idx: usize) -> Result<u32, StoreError> {
    let v: i64 = col(row, idx)?;
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("column {idx} out of range")))
}

fn token_from_row(r: &Row) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        token_id: col(r, 0)?,
        spiffe_id: col(r, 1)?,
        created_at_ms: col(r, 2)?,
        expires_at_ms: col(r, 3)?,
        max_uses: col_u32(r, 4)?,
        uses: col_u32(r, 5)?,
        revoked_at_ms: col(r, 6)?,
    })
}

fn issued_from_row(r: &Row) -> Result<IssuedCert, StoreError> {
    Ok(IssuedCert {
        serial: col(r, 0)?,
        token_id: col(r, 1)?,
        spiffe_id: col(r, 2)?,
        spki_sha256: col(r, 3)?,
        issued_at_ms: col(r, 4)?,
        not_after_ms: col(r, 5)?,
        der: col(r, 6)?,
        ca_gen: col_u32(r, 7)?,
        origin: col(r, 8)?,
        node: col(r, 9)?,
    })
}

fn audit_from_row(r: &Row) -> Result<AuditRow, StoreError> {
    Ok(AuditRow {
        seq: to_u64(col(r, 0)?)?,
        time_ms: col(r, 1)?,
        kind: col(r, 2)?,
        outcome: col(r, 3)?,
        fields_json: col(r, 4)?,
        prev_hash: col(r, 5)?,
        hash: col(r, 6)?,
    })
}

fn revocation_from_row(r: &Row) -> Result<RevocationRecord, StoreError> {
    let kind: String = col(r, 0)?;
    Ok(RevocationRecord {
        kind: RevocationKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt("unknown revocation kind".into()))?,
        value: col(r, 1)?,
        revoked_at_ms: col(r, 2)?,
        expires_at_ms: col(r, 3)?,
        reason: col(r, 4)?,
    })
}

/// Decodes a row of `plan_select!()`.
fn plan_from_row(r: &Row) -> Result<PlanRecord, StoreError> {
    let version: i64 = col(r, 0)?;
    let state: String = col(r, 3)?;
    Ok(PlanRecord {
        version: to_u64(version)?,
        sha256: col(r, 1)?,
        canonical_json: col(r, 2)?,
        state: PlanState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("plan {version} has unknown state")))?,
        proposer: col(r, 4)?,
        created_at_ms: col(r, 5)?,
        expires_at_ms: col(r, 6)?,
        activated_at_ms: col(r, 7)?,
        required_approvals: col_u32(r, 8)?,
        approvals: col(r, 9)?,
    })
}

// === Connections and the pool ===

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One server connection with its prepared statements. `broken` is set when
/// an error means it must not be reused; `audit_locked` while its open
/// transaction holds [`AUDIT_LOCK`].
struct PgConn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
    broken: bool,
    audit_locked: bool,
}

impl PgConn {
    /// Connects, spawns the task that drives the socket, applies `setup`.
    async fn open(target: &Target, setup: &str, t: Timeouts) -> Result<Self, StoreError> {
        let (client, connection) = target.connect(t, "connecting to PostgreSQL").await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %describe(&e), "store connection ended");
            }
        });
        let mut conn = Self {
            client,
            statements: HashMap::new(),
            broken: false,
            audit_locked: false,
        };
        timeout(t.op, conn.batch(setup))
            .await
            .map_err(|_| timed_out("configuring a connection"))??;
        Ok(conn)
    }

    fn usable(&self) -> bool {
        !self.broken && !self.client.is_closed()
    }

    fn fail(&mut self, e: &tokio_postgres::Error) -> StoreError {
        if breaks_connection(e) {
            self.broken = true;
        }
        store_error(e)
    }

    /// Runs `sql` (one or more statements, no parameters) as a simple query.
    async fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self.client.batch_execute(sql).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        match self.client.prepare(sql).await {
            Ok(s) => {
                self.statements.insert(sql, s.clone());
                Ok(s)
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn query(&mut self, sql: &'static str, p: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql).await?;
        match self.client.query(&s, p).await {
            Ok(rows) => Ok(rows),
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// At most one row (callers query by a unique key or with `LIMIT 1`).
    async fn query_opt(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.statement(sql).await?;
        match self.client.query_opt(&s, p).await {
            Ok(row) => Ok(row),
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn query_one(&mut self, sql: &'static str, p: Params<'_>) -> Result<Row, StoreError> {
        let s = self.statement(sql).await?;
        match self.client.query_one(&s, p).await {
            Ok(row) => Ok(row),
            Err(e) => Err(self.fail(&e)),
        }
    }

    async fn execute(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64, StoreError> {
        let s = self.statement(sql).await?;
        match self.client.execute(&s, p).await {
            Ok(n) => Ok(n),
            Err(e) => Err(self.fail(&e)),
        }
    }
}

/// Where a store connects: the parsed URL and how to secure it.
#[derive(Clone)]
struct Target {
    config: Config,
    tls: PgTls,
}

type PgConnection =
    tokio_postgres::Connection<tokio_postgres::Socket, tls::PgTlsStream<tokio_postgres::Socket>>;

impl Target {
    /// One new session (TLS first, when configured), within `t.connect`.
    async fn connect(&self, t: Timeouts, what: &str) -> Result<(Client, PgConnection), StoreError> {
        timeout(t.connect, self.config.connect(self.tls.clone()))
            .await
            .map_err(|_| timed_out(what))?
            .map_err(|e| store_error(&e))
    }
}

/// At most `size` connections, opened on demand and kept while healthy.
struct Pool {
    target: Target,
    setup: String,
    t: Timeouts,
    size: u32,
    idle: Mutex<Vec<PgConn>>,
    permits: Semaphore,
    closing: AtomicBool,
}

/// A connection checked out of the [`Pool`]. Dropping it discards the
/// connection (the server then rolls back whatever it had open);
/// [`Lease::keep`] returns a healthy one.
struct Lease<'p> {
    pool: &'p Pool,
    conn: PgConn,
    permit: SemaphorePermit<'p>,
}

impl Lease<'_> {
    fn keep(self) {
        let Lease { pool, conn, permit } = self;
        if conn.usable() && !pool.closing.load(Ordering::Acquire) {
            pool.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
        // Released after the connection is back, so a waiter can reuse it.
        drop(permit);
    }
}

impl Pool {
    fn new(target: Target, size: usize, t: Timeouts) -> Self {
        let size = size.clamp(1, MAX_POOL);
        Self {
            target,
            setup: t.session_setup(),
            t,
            size: u32::try_from(size).unwrap_or(1),
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(size),
            closing: AtomicBool::new(false),
        }
    }

    async fn open(&self) -> Result<PgConn, StoreError> {
        PgConn::open(&self.target, &self.setup, self.t).await
    }

    async fn get(&self) -> Result<Lease<'_>, StoreError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(closed());
        }
        let permit = match timeout(self.t.acquire, self.permits.acquire()).await {
            Err(_) => return Err(timed_out("waiting for a database connection")),
            Ok(Err(_)) => return Err(closed()),
            Ok(Ok(p)) => p,
        };
        let conn = loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match idle {
                Some(c) if c.usable() => break c,
                Some(_) => continue,
                None => break self.open().await?,
            }
        };
        Ok(Lease {
            pool: self,
            conn,
            permit,
        })
    }

    /// Refuses new operations, waits (bounded) for those in flight, then
    /// closes the idle connections. Idempotent.
    async fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let held = timeout(
            self.t.acquire.saturating_add(self.t.op),
            self.permits.acquire_many(self.size),
        )
        .await;
        self.permits.close();
        drop(held);
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

// === The store ===

/// How a write transaction ends.
enum Finish<T> {
    /// Commit, then return the value.
    Commit(T),
    /// Nothing to keep (a refusal): roll back, then return the value.
    Rollback(T),
}

/// The body of a write transaction, run between `BEGIN` and its [`Finish`].
type TxBody<'c, T> = Pin<Box<dyn Future<Output = Result<Finish<T>, StoreError>> + Send + 'c>>;

/// The PostgreSQL [`Store`]. Open with [`PostgresStore::connect`]; call
/// [`Store::close`] on shutdown (dropping it also stops the listener and the
/// batcher, and closes the idle connections once the batcher is done).
pub struct PostgresStore {
    pool: Arc<Pool>,
    /// Writes for the batcher (see the module docs).
    jobs: mpsc::Sender<Box<dyn Job>>,
    stats: Arc<BatchStats>,
    events: broadcast::Sender<StoreEvent>,
    /// Set to `true` (or dropped) to stop the listener and the batcher.
    stop: watch::Sender<bool>,
    listener: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    batcher: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the configuration: it may hold a password.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a libpq
    /// key=value string), applies pending schema migrations under an
    /// advisory lock (replicas starting together migrate once), and starts
    /// listening for other replicas' changes.
    ///
    /// # Errors
    /// `Unavailable` if the URL is invalid (the message does not repeat it)
    /// or the database cannot be reached, `Corrupt` if its schema is newer
    /// than this build.
    pub async fn connect(url: &str, opts: PostgresOptions) -> Result<Self, StoreError> {
        let (config, asked_tls) = tls::parse_url(url)?;
        Self::connect_parsed(config, asked_tls, opts).await
    }

    #[cfg(test)]
    async fn connect_config(config: Config, opts: PostgresOptions) -> Result<Self, StoreError> {
        let asked_tls = config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        Self::connect_parsed(config, asked_tls, opts).await
    }

    async fn connect_parsed(
        mut config: Config,
        asked_tls: bool,
        opts: PostgresOptions,
    ) -> Result<Self, StoreError> {
        let tls = tls::resolve(&mut config, asked_tls, opts.server_ca.as_deref())?;
        if !tls.encrypted() && !tls::local_only(&config) {
            tracing::warn!(
                "the PostgreSQL store is reached without TLS over the network: \
                 set --store-ca-file to encrypt and verify the connection"
            );
        }
        let t = Timeouts::new(opts.statement_timeout);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(t.connect);
        }
        let mut listen_config = config.clone();
        if config.get_application_name().is_none() {
            config.application_name("sigil");
            listen_config.application_name("sigil-listener");
        }
        let target = Target {
            config,
            tls: tls.clone(),
        };
        let listen_target = Target {
            config: listen_config,
            tls,
        };
        let pool = Arc::new(Pool::new(target, opts.pool_size, t));
        {
            let mut lease = pool.get().await?;
            timeout(
                MIGRATION_TIMEOUT.saturating_add(t.op),
                migrate(&mut lease.conn),
            )
            .await
            .map_err(|_| timed_out("migrating the schema"))??;
            lease.keep();
        }
        let (events, _) = broadcast::channel(64);
        let first = ListenSession::open(&listen_target, t).await?;
        let (stop, stop_rx) = watch::channel(false);
        let (jobs, queue) = mpsc::channel(QUEUE);
        let stats = Arc::new(BatchStats::default());
        let batcher = tokio::spawn(run_batcher(
            Arc::clone(&pool),
            queue,
            stop_rx.clone(),
            Arc::clone(&stats),
        ));
        let listener = tokio::spawn(run_listener(
            listen_target,
            first,
            events.clone(),
            stop_rx,
            t,
        ));
        Ok(Self {
            pool,
            jobs,
            stats,
            events,
            stop,
            listener: tokio::sync::Mutex::new(Some(listener)),
            batcher: tokio::sync::Mutex::new(Some(batcher)),
        })
    }

    /// Runs `body` as one job of a write batch (see the module docs): inside
    /// a savepoint of the batch's transaction, kept or rolled back as it
    /// says, answered once the batch committed. Never retried: on a lost
    /// connection or a timeout the outcome is unknown and the caller gets
    /// `Unavailable`.
    async fn write<T, F>(&self, body: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConn) -> TxBody<'c, T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Write {
            body: Some(body),
            value: None,
            reply,
        });
        if self.jobs.send(job).await.is_err() {
            return Err(closed());
        }
        // The batcher answers every job it takes; no answer means it is gone.
        answer.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Runs one read statement; if the connection turns out to be dead (e.g.
    /// the server restarted since it was pooled), once more on a fresh one.
    async fn read(&self, sql: &'static str, p: Params<'_>) -> Result<Vec<Row>, StoreError> {
        let mut lease = self.pool.get().await?;
        match timeout(self.pool.t.op, lease.conn.query(sql, p)).await {
            Ok(Ok(rows)) => {
                lease.keep();
                return Ok(rows);
            }
            Ok(Err(e)) if lease.conn.usable() => {
                lease.keep();
                return Err(e);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "store read lost its connection; retrying on a fresh one");
            }
            Err(_) => return Err(timed_out("waiting for the database")),
        }
        lease.conn = self.pool.open().await?;
        match timeout(self.pool.t.op, lease.conn.query(sql, p)).await {
            Ok(result) => {
                lease.keep();
                result
            }
            Err(_) => Err(timed_out("waiting for the database")),
        }
    }

    /// A read expected to return at most one row.
    async fn read_opt(&self, sql: &'static str, p: Params<'_>) -> Result<Option<Row>, StoreError> {
        Ok(self.read(sql, p).await?.into_iter().next())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_token(&self, token: TokenRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(move |c| {
            Box::pin(async move {
                create_token(c, &token, &audit).await?;
                Ok(Finish::Commit(()))
            })
        })
        .await
    }

    async fn fetch_token(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read_opt(SELECT_TOKEN, &[&token_id])
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            token_columns!(),
            " FROM tokens ORDER BY created_at_ms DESC, insert_order DESC"
        );
        self.read(SQL, &[])
            .await?
            .iter()
            .map(token_from_row)
            .collect()
    }

    async fn revoke_token(
        &self,
        token_id: &str,
        now_ms: i64,
        audit: AuditRecord,
    ) -> Result<RevokeOutcome, StoreError> {
        let token_id = token_id.to_owned();
        self.write(move |c| Box::pin(revoke_token(c, token_id, now_ms, audit)))
            .await
    }

    async fn fetch_issued_for_token(
        &self,
        token_id: &str,
        spki_sha256: &str,
        now_ms: i64,
    ) -> Result<Option<IssuedCert>, StoreError> {
        self.read_opt(SELECT_VALID_CERT, &[&token_id, &spki_sha256, &now_ms])
            .await?
            .as_ref()
            .map(issued_from_row)
            .transpose()
    }

    async fn fetch_issued(&self, serial: &str) -> Result<Option<IssuedCert>, StoreError> {
        self.read_opt(SELECT_ISSUED, &[&serial])
            .await?
            .as_ref()
            .map(issued_from_row)
            .transpose()
    }

    async fn redeem_token(&self, redemption: Redemption) -> Result<RedeemOutcome, StoreError> {
        self.write(move |c| Box::pin(redeem_token(c, redemption)))
            .await
    }

    async fn append_audit(&self, audit: AuditRecord) -> Result<u64, StoreError> {
        self.write(move |c| {
            Box::pin(async move { Ok(Finish::Commit(append_audit(c, &audit).await?)) })
        })
        .await
    }

    async fn list_audit(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2"
        );
        // Past i64::MAX no row can exist.
        let Ok(after_seq) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        let limit = i64::from(limit);
        self.read(SQL, &[&after_seq, &limit])
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        // One statement per round: its three deletes commit together. A
        // round is one write of a batch, which holds the cluster-wide audit
        // lock: rounds of at most PURGE_CHUNK rows per table keep that short.
        const SQL: &str = "WITH n AS (DELETE FROM nonces WHERE nonce IN \
                 (SELECT nonce FROM nonces WHERE expires_at_ms <= $1 LIMIT $2) RETURNING 1), \
             r AS (DELETE FROM revocations WHERE (kind, value) IN \
                 (SELECT kind, value FROM revocations WHERE expires_at_ms IS NOT NULL \
                  AND expires_at_ms <= $1 LIMIT $2) RETURNING 1), \
             c AS (DELETE FROM challenges WHERE nonce IN \
                 (SELECT nonce FROM challenges WHERE expires_at_ms <= $1 LIMIT $2) RETURNING 1) \
             SELECT (SELECT COUNT(*) FROM n) + (SELECT COUNT(*) FROM r) + (SELECT COUNT(*) FROM c)";
        let chunk = i64::from(super::PURGE_CHUNK);
        let mut total = 0;
        loop {
            let n = self
                .write(move |c| {
                    Box::pin(async move {
                        let row = c.query_one(SQL, &[&now_ms, &chunk]).await?;
                        Ok(Finish::Commit(to_u64(col(&row, 0)?)?))
                    })
                })
                .await?;
            total += n;
            if n < u64::from(super::PURGE_CHUNK) {
                return Ok(total);
            }
        }
    }

    async fn bootstrap_plan(
        &self,
        install: BootstrapInstall,
    ) -> Result<BootstrapOutcome, StoreError> {
        self.write(move |c| Box::pin(bootstrap_plan(c, install)))
            .await
    }

    async fn propose_plan(&self, proposal: PlanProposal) -> Result<ProposeOutcome, StoreError> {
        self.write(move |c| Box::pin(propose_plan(c, proposal)))
            .await
    }

    async fn approve_plan(&self, approval: PlanApproval) -> Result<ApproveOutcome, StoreError> {
        self.write(move |c| Box::pin(approve_plan(c, approval)))
            .await
    }

    async fn fetch_active_plan(&self) -> Result<Option<PlanRecord>, StoreError> {
        const SQL: &str = concat!(plan_select!(), "WHERE p.state = 'active'");
        self.read_opt(SQL, &[])
            .await?
            .as_ref()
            .map(plan_from_row)
            .transpose()
    }

    async fn fetch_plan(&self, version: u64) -> Result<Option<PlanRecord>, StoreError> {
        const SQL: &str = concat!(plan_select!(), "WHERE p.version = $1");
        // Past i64::MAX no plan can exist.
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        self.read_opt(SQL, &[&version])
            .await?
            .as_ref()
            .map(plan_from_row)
            .transpose()
    }

    async fn revoke(&self, r: RevocationRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(move |c| Box::pin(revoke(c, r, audit))).await
    }

    async fn list_revocations(&self, now_ms: i64) -> Result<Vec<RevocationRecord>, StoreError> {
        const SQL: &str = "SELECT kind, value, revoked_at_ms, expires_at_ms, reason \
             FROM revocations WHERE expires_at_ms IS NULL OR expires_at_ms > $1 \
             ORDER BY revoked_at_ms, kind, value";
        self.read(SQL, &[&now_ms])
            .await?
            .iter()
            .map(revocation_from_row)
            .collect()
    }

    async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        const SQL: &str = concat!("SELECT ", covered!(), " FROM issued c WHERE c.serial = $1");
        match self.read_opt(SQL, &[&serial]).await? {
            Some(row) => col(&row, 0),
            None => Ok(false),
        }
    }

    async fn renew_cert(&self, renewal: Renewal) -> Result<RenewOutcome, StoreError> {
        self.write(move |c| Box::pin(renew_cert(c, renewal))).await
    }

    async fn revoked_serials(&self, now_ms: i64) -> Result<Vec<(String, i64, u32)>, StoreError> {
        // Driven by the (small) revocation table through indexes, so the
        // cost does not grow with the number of live certificates that no
        // revocation covers (the `ca_generation` branch through the
        // expression index of schema version 7).
        const SQL: &str = "SELECT serial, MIN(at), ca_gen FROM ( \
                   SELECT c.serial, r.revoked_at_ms AS at, c.ca_gen FROM revocations r \
                     JOIN issued c ON c.serial = r.value \
                     WHERE r.kind = 'serial' AND c.not_after_ms > $1 \
                   UNION ALL \
                   SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
                     JOIN issued c ON c.spiffe_id = r.value AND c.issued_at_ms <= r.revoked_at_ms \
                     WHERE r.kind = 'spiffe_id' AND c.not_after_ms > $1 \
                   UNION ALL \
                   SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
                     JOIN issued c ON c.node = r.value \
                     WHERE r.kind = 'node' AND c.not_after_ms > $1 \
                   UNION ALL \
                   SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
                     JOIN issued c ON CAST(c.ca_gen AS TEXT) = r.value \
                     WHERE r.kind = 'ca_generation' AND c.not_after_ms > $1 \
                 ) AS covered GROUP BY serial, ca_gen ORDER BY serial";
        self.read(SQL, &[&now_ms])
            .await?
            .iter()
            .map(|r| Ok((col(r, 0)?, col(r, 1)?, col_u32(r, 2)?)))
            .collect()
    }

    async fn create_challenge(
        &self,
        nonce_hex: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO challenges (nonce, expires_at_ms) VALUES ($1, $2)";
        let nonce = nonce_hex.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                c.execute(SQL, &[&nonce, &expires_at_ms]).await?;
                Ok(Finish::Commit(()))
            })
        })
        .await
    }

    async fn redeem_attestation(&self, r: AttestRedemption) -> Result<AttestOutcome, StoreError> {
        self.write(move |c| Box::pin(redeem_attestation(c, r)))
            .await
    }

    async fn fetch_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        const SQL: &str = "SELECT value FROM meta WHERE key = $1";
        match self.read_opt(SQL, &[&key]).await? {
            Some(row) => Ok(Some(col(&row, 0)?)),
            None => Ok(None),
        }
    }

    async fn insert_meta_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        const INSERT: &str =
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING";
        const SELECT: &str = "SELECT value FROM meta WHERE key = $1";
        let key = key.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                // A concurrent insert of the same key makes this one wait for
                // it to end; the re-read (a new snapshot) then sees its value.
                if c.execute(INSERT, &[&key, &value]).await? == 1 {
                    notify(c, NOTIFY_KEYS).await?;
                }
                let row = c.query_one(SELECT, &[&key]).await?;
                Ok(Finish::Commit(col(&row, 0)?))
            })
        })
        .await
    }

    async fn cas_meta(&self, key: &str, expected: &[u8], new: Vec<u8>) -> Result<bool, StoreError> {
        // Concurrent updates of the row queue on it; each re-checks the
        // condition against the value the previous one committed.
        const SQL: &str = "UPDATE meta SET value = $3 WHERE key = $1 AND value = $2";
        let key = key.to_owned();
        let expected = expected.to_vec();
        self.write(move |c| {
            Box::pin(async move {
                if c.execute(SQL, &[&key, &expected, &new]).await? == 1 {
                    notify(c, NOTIFY_KEYS).await?;
                    Ok(Finish::Commit(true))
                } else {
                    Ok(Finish::Rollback(false))
                }
            })
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        const SQL: &str = "SELECT (SELECT COUNT(*) FROM tokens), (SELECT COUNT(*) FROM issued), \
             (SELECT COUNT(*) FROM nonces), (SELECT COUNT(*) FROM audit), \
             (SELECT COUNT(*) FROM plans)";
        let rows = self.read(SQL, &[]).await?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Corrupt("counts returned no row".into()))?;
        Ok(StoreCounts {
            tokens: to_u64(col(row, 0)?)?,
            issued: to_u64(col(row, 1)?)?,
            nonces: to_u64(col(row, 2)?)?,
            audit: to_u64(col(row, 3)?)?,
            plans: to_u64(col(row, 4)?)?,
        })
    }

    async fn close(&self) {
        self.stop.send_replace(true);
        // Holding the lock while joining makes a concurrent second `close`
        // wait for the first.
        let mut listener = self.listener.lock().await;
        if let Some(handle) = listener.take() {
            if let Err(e) = handle.await {
                if e.is_panic() {
                    tracing::error!("store change listener panicked");
                }
            }
        }
        // The batcher stops taking writes, applies those already queued and
        // ends; every write commits before it is answered, so that is all
        // "durable" needs here.
        let mut batcher = self.batcher.lock().await;
        if let Some(handle) = batcher.take() {
            if let Err(e) = handle.await {
                if e.is_panic() {
                    tracing::error!("store write batcher panicked");
                }
            }
            tracing::debug!(
                batches = self.stats.batches.load(Ordering::Relaxed),
                writes = self.stats.writes.load(Ordering::Relaxed),
                "store write batcher stopped"
            );
        }
        self.pool.close().await;
    }
}

// === Group commit ===

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 128;
/// Writes queued for the batcher; beyond this, writers wait to enqueue.
const QUEUE: usize = 8 * MAX_BATCH;

/// Opens a batch: the transaction, the audit lock (first, outside any
/// savepoint, so no rollback to a savepoint can release it), the first
/// job's savepoint. One round trip. The literal is [`AUDIT_LOCK`] (a test
/// checks it).
const BATCH_BEGIN: &str = "BEGIN; SELECT pg_advisory_xact_lock(6001406370190983170); SAVEPOINT op";
/// Between jobs, after one that keeps its changes / one that does not.
const NEXT_AFTER_KEEP: &str = "RELEASE SAVEPOINT op; SAVEPOINT op";
const NEXT_AFTER_UNDO: &str = "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op; SAVEPOINT op";
/// Ends a batch, after a last job that keeps its changes / one that does not.
const COMMIT_AFTER_KEEP: &str = "COMMIT";
const COMMIT_AFTER_UNDO: &str = "ROLLBACK TO SAVEPOINT op; COMMIT";

/// Counters of the batcher: batches committed, writes in them (answered
/// after a commit, refusals included).
#[derive(Debug, Default)]
struct BatchStats {
    batches: AtomicU64,
    writes: AtomicU64,
}

type JobRun<'c> = Pin<Box<dyn Future<Output = Result<bool, StoreError>> + Send + 'c>>;

/// One queued write with its reply, type-erased for the batcher's queue.
trait Job: Send {
    /// Runs the body once; `Ok(true)` to keep its changes, `Ok(false)` to
    /// roll them back (its value is kept for [`Job::answer`] either way).
    fn run<'c>(&'c mut self, c: &'c mut PgConn) -> JobRun<'c>;
    /// Answers the caller: the body's value if `outcome` is `Ok`.
    fn answer(self: Box<Self>, outcome: Result<(), StoreError>);
}

/// A [`Job`] from [`PostgresStore::write`].
struct Write<T, F> {
    body: Option<F>,
    value: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Write<T, F>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut PgConn) -> TxBody<'c, T> + Send + 'static,
{
    fn run<'c>(&'c mut self, c: &'c mut PgConn) -> JobRun<'c> {
        Box::pin(async move {
            let body = self
                .body
                .take()
                .ok_or_else(|| StoreError::Unavailable("write job run twice".into()))?;
            let (value, keep) = match body(c).await? {
                Finish::Commit(v) => (v, true),
                Finish::Rollback(v) => (v, false),
            };
            self.value = Some(value);
            Ok(keep)
        })
    }

    fn answer(self: Box<Self>, outcome: Result<(), StoreError>) {
        let Write { value, reply, .. } = *self;
        let result = outcome.and_then(|()| {
            value.ok_or_else(|| StoreError::Unavailable("write job not run".into()))
        });
        // The caller may have stopped waiting.
        drop(reply.send(result));
    }
}

/// The batch's failure as each unanswered job sees it: the outcome is
/// unknown, whatever the failing statement was.
fn batch_failure(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) | StoreError::Conflict(m) | StoreError::Corrupt(m) => {
            StoreError::Unavailable(m.clone())
        }
    }
}

/// The batching task: takes a job, drains more already queued, applies
/// them in one transaction; until a stop is requested (or the store is
/// gone), then it applies what is still queued and ends.
async fn run_batcher(
    pool: Arc<Pool>,
    mut queue: mpsc::Receiver<Box<dyn Job>>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<BatchStats>,
) {
    let mut stopping = false;
    let mut batch: Vec<Option<Box<dyn Job>>> = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = if stopping {
            queue.recv().await
        } else {
            tokio::select! {
                biased;
                () = stop_requested(&mut stop) => {
                    // Refuse new writes; those queued are still received.
                    stopping = true;
                    queue.close();
                    continue;
                }
                job = queue.recv() => job,
            }
        };
        let Some(first) = first else {
            return;
        };
        batch.push(Some(first));
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(Some(job)),
                Err(_) => break,
            }
        }
        // Each batch runs in a task of its own, so that a job that panics
        // (a bug) ends its batch, not the batcher: the panicking task drops
        // the batch's connection, so the server rolls the transaction back,
        // and the jobs' reply channels, so their callers get `Unavailable`
        // (the outcome of a batch that did not reach `COMMIT`).
        let task = tokio::spawn({
            let (pool, stats) = (Arc::clone(&pool), Arc::clone(&stats));
            let mut jobs = std::mem::take(&mut batch);
            async move {
                run_batch(&pool, &mut jobs, &stats).await;
                jobs
            }
        });
        match task.await {
            Ok(mut jobs) => {
                jobs.clear();
                batch = jobs;
            }
            Err(e) => {
                tracing::error!(
                    panicked = e.is_panic(),
                    "store write batch ended without an outcome; its writes were rolled back"
                );
                batch = Vec::with_capacity(MAX_BATCH);
            }
        }
    }
}

/// Applies `batch` in one transaction and answers every job in it.
async fn run_batch(pool: &Pool, batch: &mut [Option<Box<dyn Job>>], stats: &BatchStats) {
    let outcome = match pool.get().await {
        Err(e) => Err(e),
        Ok(mut lease) => {
            let applied = timeout(pool.t.op, apply_batch(&mut lease.conn, batch)).await;
            lease.conn.audit_locked = false;
            match applied {
                Ok(Ok(())) => {
                    lease.keep();
                    Ok(())
                }
                Ok(Err(e)) => {
                    // The transaction may still be open (aborted): end it
                    // before reusing the connection, or drop the connection.
                    if lease.conn.usable()
                        && matches!(
                            timeout(pool.t.statement, lease.conn.batch("ROLLBACK")).await,
                            Ok(Ok(()))
                        )
                    {
                        lease.keep();
                    }
                    Err(e)
                }
                // Dropping the lease closes the connection; the server
                // rolls back.
                Err(_) => Err(timed_out("waiting for the database")),
            }
        }
    };
    match outcome {
        Ok(()) => {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            for job in batch.iter_mut().filter_map(Option::take) {
                stats.writes.fetch_add(1, Ordering::Relaxed);
                job.answer(Ok(()));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "store write batch failed");
            for job in batch.iter_mut().filter_map(Option::take) {
                job.answer(Err(batch_failure(&e)));
            }
        }
    }
}

/// The transaction of a batch (see the module docs). A job that fails with
/// an error is answered here, at once; the others stay in `batch` for the
/// caller to answer once the outcome of `COMMIT` is known.
async fn apply_batch(c: &mut PgConn, batch: &mut [Option<Box<dyn Job>>]) -> Result<(), StoreError> {
    let mut next = BATCH_BEGIN;
    let mut keep = true;
    for slot in batch.iter_mut() {
        let Some(job) = slot.as_mut() else {
            continue;
        };
        c.batch(next).await?;
        c.audit_locked = true;
        match job.run(c).await {
            Ok(true) => keep = true,
            Ok(false) => keep = false,
            Err(e) => {
                keep = false;
                if let Some(job) = slot.take() {
                    job.answer(Err(e));
                }
            }
        }
        next = if keep {
            NEXT_AFTER_KEEP
        } else {
            NEXT_AFTER_UNDO
        };
    }
    c.batch(if keep {
        COMMIT_AFTER_KEEP
    } else {
        COMMIT_AFTER_UNDO
    })
    .await
}

// === Schema ===

/// Applies the migrations the database has not seen, in one transaction
/// under an advisory lock: replicas starting at the same instant queue on
/// the lock and find the work done.
async fn migrate(c: &mut PgConn) -> Result<(), StoreError> {
    c.batch("BEGIN").await?;
    match migrate_tx(c).await {
        Ok(()) => c.batch("COMMIT").await,
        Err(e) => {
            if c.usable() && c.batch("ROLLBACK").await.is_err() {
                c.broken = true;
            }
            Err(e)
        }
    }
}

async fn migrate_tx(c: &mut PgConn) -> Result<(), StoreError> {
    const VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM sigil_schema_version";
    const RECORD: &str = "INSERT INTO sigil_schema_version (version, applied_at_ms) \
         VALUES ($1, (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT)";
    c.batch(&format!(
        "SET LOCAL statement_timeout = {}; SET LOCAL client_min_messages = warning",
        MIGRATION_TIMEOUT.as_millis()
    ))
    .await?;
    c.execute(LOCK, &[&MIGRATION_LOCK]).await?;
    c.batch(
        "CREATE TABLE IF NOT EXISTS sigil_schema_version (
             version       BIGINT NOT NULL PRIMARY KEY,
             applied_at_ms BIGINT NOT NULL
         )",
    )
    .await?;
    let row = c.query_one(VERSION, &[]).await?;
    let version: i64 = col(&row, 0)?;
    let known = MIGRATIONS.len();
    let version = usize::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("negative schema version {version}")))?;
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is newer than this build supports ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        c.batch(sql).await?;
        let next = i64::try_from(i + 1)
            .map_err(|_| StoreError::Corrupt("schema version out of range".into()))?;
        c.execute(RECORD, &[&next]).await?;
        tracing::info!(version = next, "store schema migrated");
    }
    Ok(())
}

// === Write transactions ===

async fn lock(c: &mut PgConn, key: i64) -> Result<(), StoreError> {
    c.execute(LOCK, &[&key]).await.map(drop)
}

/// Queues a change notice; PostgreSQL delivers it when the transaction commits.
async fn notify(c: &mut PgConn, what: &str) -> Result<(), StoreError> {
    c.execute(NOTIFY, &[&CHANNEL, &what]).await.map(drop)
}

/// Consumes `nonce`; `false` if any transaction (on any replica) already
/// has it. Waits for an uncommitted holder to finish first.
async fn remember_nonce(
    c: &mut PgConn,
    nonce: &str,
    expires_at_ms: i64,
) -> Result<bool, StoreError> {
    Ok(c.execute(INSERT_NONCE, &[&nonce, &expires_at_ms]).await? == 1)
}

/// Links `audit` to the chain head and inserts it. The batch's transaction
/// already holds the audit lock (taken first); a transaction that does not
/// takes it here, held until it ends.
async fn append_audit(c: &mut PgConn, audit: &AuditRecord) -> Result<u64, StoreError> {
    const HEAD: &str = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1";
    const INSERT: &str = "INSERT INTO audit (seq, time_ms, kind, outcome, fields_json, \
         prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7)";
    if !c.audit_locked {
        lock(c, AUDIT_LOCK).await?;
    }
    // Read after the lock: in READ COMMITTED each statement sees everything
    // committed before it started, including the previous holder's row.
    let (prev_seq, prev_hash) = match c.query_opt(HEAD, &[]).await? {
        Some(row) => (to_u64(col(&row, 0)?)?, col::<String>(&row, 1)?),
        None => (0, GENESIS_HASH.to_owned()),
    };
    let seq = prev_seq
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit sequence exhausted".into()))?;
    let fields_json = audit.fields_json();
    let hash = audit::chain_hash(
        &prev_hash,
        seq,
        audit.time_ms,
        &audit.kind,
        &audit.outcome,
        &fields_json,
    );
    c.execute(
        INSERT,
        &[
            &to_i64(seq)?,
            &audit.time_ms,
            &audit.kind,
            &audit.outcome,
            &fields_json,
            &prev_hash,
            &hash,
        ],
    )
    .await?;
    Ok(seq)
}

async fn create_token(
    c: &mut PgConn,
    token: &TokenRecord,
    audit: &AuditRecord,
) -> Result<(), StoreError> {
    const SQL: &str = "INSERT INTO tokens (token_id, spiffe_id, created_at_ms, expires_at_ms, \
         max_uses, uses, revoked_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)";
    c.execute(
        SQL,
        &[
            &token.token_id,
            &token.spiffe_id,
            &token.created_at_ms,
            &token.expires_at_ms,
            &i64::from(token.max_uses),
            &i64::from(token.uses),
            &token.revoked_at_ms,
        ],
    )
    .await?;
    append_audit(c, audit).await?;
    Ok(())
}

async fn revoke_token(
    c: &mut PgConn,
    token_id: String,
    now_ms: i64,
    audit: AuditRecord,
) -> Result<Finish<RevokeOutcome>, StoreError> {
    const SELECT: &str = "SELECT revoked_at_ms FROM tokens WHERE token_id = $1 FOR NO KEY UPDATE";
    const UPDATE: &str = "UPDATE tokens SET revoked_at_ms = $2 WHERE token_id = $1";
    let Some(row) = c.query_opt(SELECT, &[&token_id]).await? else {
        return Ok(Finish::Rollback(RevokeOutcome::Unknown));
    };
    if col::<Option<i64>>(&row, 0)?.is_some() {
        return Ok(Finish::Rollback(RevokeOutcome::AlreadyRevoked));
    }
    c.execute(UPDATE, &[&token_id, &now_ms]).await?;
    append_audit(c, &audit).await?;
    Ok(Finish::Commit(RevokeOutcome::Revoked))
}

/// The ordered checks documented on [`Store::redeem_token`]. The nonce is
/// inserted first (its unique key is the one-use rule across replicas) and
/// the insert is rolled back with every refusal; the token row is locked
/// before it is read, so the checks that follow see the last redemption's
/// committed state and nothing can change until this transaction ends.
async fn redeem_token(c: &mut PgConn, r: Redemption) -> Result<Finish<RedeemOutcome>, StoreError> {
    const TAKE_USE: &str = "UPDATE tokens SET uses = uses + 1 WHERE token_id = $1";
    // 1. A remembered nonce, whatever token it was used with.
    if !remember_nonce(c, &r.nonce, r.nonce_expires_at_ms).await? {
        return Ok(Finish::Rollback(RedeemOutcome::NonceReplayed));
    }
    // 2. Token state, locked.
    let Some(row) = c.query_opt(SELECT_TOKEN_LOCKED, &[&r.token_id]).await? else {
        return Ok(Finish::Rollback(RedeemOutcome::TokenUnknown));
    };
    let token = token_from_row(&row)?;
    if token.revoked_at_ms.is_some() {
        return Ok(Finish::Rollback(RedeemOutcome::TokenRevoked));
    }
    // 3. A lost response retried with the same key gets the same
    //    certificate; only the nonce is kept. Only a token that was used
    //    can have one: a first redemption (nearly every one) skips this
    //    round trip.
    if token.uses > 0 {
        if let Some(row) = c
            .query_opt(
                SELECT_VALID_CERT,
                &[&r.token_id, &r.cert.spki_sha256, &r.now_ms],
            )
            .await?
        {
            return Ok(Finish::Commit(RedeemOutcome::Retried(issued_from_row(
                &row,
            )?)));
        }
    }
    // 4–5.
    if r.now_ms >= token.expires_at_ms {
        return Ok(Finish::Rollback(RedeemOutcome::TokenExpired));
    }
    if token.uses >= token.max_uses {
        return Ok(Finish::Rollback(RedeemOutcome::TokenAlreadyUsed));
    }
    // 6. Win. The certificate is recorded against the token that paid for
    //    it, so step 3 finds it on a retry whatever `cert.token_id` said.
    c.execute(TAKE_USE, &[&r.token_id]).await?;
    insert_issued(c, &r.cert, Some(&r.token_id)).await?;
    append_audit(c, &r.audit).await?;
    Ok(Finish::Commit(RedeemOutcome::Issued))
}

async fn insert_issued(
    c: &mut PgConn,
    cert: &IssuedCert,
    token_id: Option<&str>,
) -> Result<(), StoreError> {
    const SQL: &str = "INSERT INTO issued (serial, token_id, spiffe_id, spki_sha256, \
         issued_at_ms, not_after_ms, der, ca_gen, origin, node) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
    c.execute(
        SQL,
        &[
            &cert.serial,
            &token_id,
            &cert.spiffe_id,
            &cert.spki_sha256,
            &cert.issued_at_ms,
            &cert.not_after_ms,
            &cert.der,
            &i64::from(cert.ca_gen),
            &cert.origin,
            &cert.node,
        ],
    )
    .await?;
    Ok(())
}

// === Revocations and renewals ===

async fn revoke(
    c: &mut PgConn,
    r: RevocationRecord,
    audit: AuditRecord,
) -> Result<Finish<()>, StoreError> {
    const SQL: &str =
        "INSERT INTO revocations (kind, value, revoked_at_ms, expires_at_ms, reason) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (kind, value) DO UPDATE SET \
           revoked_at_ms = GREATEST(revocations.revoked_at_ms, excluded.revoked_at_ms), \
           expires_at_ms = CASE WHEN revocations.expires_at_ms IS NULL \
                                  OR excluded.expires_at_ms IS NULL THEN NULL \
                           ELSE GREATEST(revocations.expires_at_ms, excluded.expires_at_ms) END, \
           reason = excluded.reason";
    // Exclusive against renewals' shared lock: a renewal either committed
    // before this revocation (and is covered by it if it matches) or checks
    // after it commits.
    lock(c, REVOCATION_LOCK).await?;
    c.execute(
        SQL,
        &[
            &r.kind.as_str(),
            &r.value,
            &r.revoked_at_ms,
            &r.expires_at_ms,
            &r.reason,
        ],
    )
    .await?;
    notify(c, NOTIFY_REVOCATION).await?;
    append_audit(c, &audit).await?;
    Ok(Finish::Commit(()))
}

async fn renew_cert(c: &mut PgConn, r: Renewal) -> Result<Finish<RenewOutcome>, StoreError> {
    const LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared($1)";
    const COVERED: &str = concat!("SELECT ", covered!(), " FROM issued c WHERE c.serial = $1");
    c.execute(LOCK_SHARED, &[&REVOCATION_LOCK]).await?;
    let Some(row) = c.query_opt(SELECT_ISSUED, &[&r.parent_serial]).await? else {
        return Ok(Finish::Rollback(RenewOutcome::UnknownParent));
    };
    let parent = issued_from_row(&row)?;
    let revoked = match c.query_opt(COVERED, &[&r.parent_serial]).await? {
        Some(row) => col::<bool>(&row, 0)?,
        None => false,
    };
    if revoked {
        return Ok(Finish::Rollback(RenewOutcome::Revoked));
    }
    let mut cert = r.cert;
    // Renewals inherit how the identity was established; a certificate an
    // agent obtained for a workload keeps its `delegated:` origin.
    if !cert.origin.starts_with("delegated:") {
        cert.origin = parent.origin;
    }
    cert.node = parent.node;
    insert_issued(c, &cert, parent.token_id.as_deref()).await?;
    append_audit(c, &r.audit).await?;
    Ok(Finish::Commit(RenewOutcome::Issued))
}

// === Attestation ===

async fn redeem_attestation(
    c: &mut PgConn,
    r: AttestRedemption,
) -> Result<Finish<AttestOutcome>, StoreError> {
    const SELECT: &str =
        "SELECT expires_at_ms, used_at_ms FROM challenges WHERE nonce = $1 FOR UPDATE";
    const USE: &str = "UPDATE challenges SET used_at_ms = $2 WHERE nonce = $1";
    match &r.guard {
        AttestGuard::Challenge(nonce) => {
            // Locked: a concurrent redemption of the same challenge waits and
            // then sees it used.
            let Some(row) = c.query_opt(SELECT, &[nonce]).await? else {
                return Ok(Finish::Rollback(AttestOutcome::ChallengeUnknown));
            };
            let expires_at_ms: i64 = col(&row, 0)?;
            if col::<Option<i64>>(&row, 1)?.is_some() {
                return Ok(Finish::Rollback(AttestOutcome::Replayed));
            }
            if r.now_ms >= expires_at_ms {
                return Ok(Finish::Rollback(AttestOutcome::ChallengeExpired));
            }
            c.execute(USE, &[nonce, &r.now_ms]).await?;
        }
        AttestGuard::OneUse { key, expires_at_ms } => {
            if !remember_nonce(c, key, *expires_at_ms).await? {
                return Ok(Finish::Rollback(AttestOutcome::Replayed));
            }
        }
    }
    insert_issued(c, &r.cert, None).await?;
    append_audit(c, &r.audit).await?;
    Ok(Finish::Commit(AttestOutcome::Issued))
}

// === Plans (every write under PLAN_LOCK) ===

async fn load_plan(c: &mut PgConn, version: i64) -> Result<Option<PlanRecord>, StoreError> {
    const SQL: &str = concat!(plan_select!(), "WHERE p.version = $1");
    c.query_opt(SQL, &[&version])
        .await?
        .as_ref()
        .map(plan_from_row)
        .transpose()
}

async fn active_version(c: &mut PgConn) -> Result<Option<i64>, StoreError> {
    const SQL: &str = "SELECT version FROM plans WHERE state = 'active'";
    match c.query_opt(SQL, &[]).await? {
        Some(row) => Ok(Some(col(&row, 0)?)),
        None => Ok(None),
    }
}

async fn next_version(c: &mut PgConn) -> Result<i64, StoreError> {
    const SQL: &str = "SELECT COALESCE(MAX(version), 0) + 1 FROM plans";
    col(&c.query_one(SQL, &[]).await?, 0)
}

/// A plan as stored by [`insert_plan`].
struct NewPlan<'a> {
    version: i64,
    sha256: &'a str,
    json: &'a str,
    proposer: &'a str,
    now_ms: i64,
    expires_at_ms: i64,
    required: u32,
}

/// Stores a pending plan with the proposer's approval.
async fn insert_plan(c: &mut PgConn, p: &NewPlan<'_>) -> Result<(), StoreError> {
    const PLAN: &str = "INSERT INTO plans (version, sha256, canonical_json, state, proposer, \
         created_at_ms, expires_at_ms, activated_at_ms, required_approvals) \
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, NULL, $7)";
    const APPROVAL: &str =
        "INSERT INTO plan_approvals (version, approver, at_ms) VALUES ($1, $2, $3)";
    c.execute(
        PLAN,
        &[
            &p.version,
            &p.sha256,
            &p.json,
            &p.proposer,
            &p.now_ms,
            &p.expires_at_ms,
            &i64::from(p.required),
        ],
    )
    .await?;
    c.execute(APPROVAL, &[&p.version, &p.proposer, &p.now_ms])
        .await?;
    Ok(())
}

/// Makes `version` the active plan: the old one is superseded, every other
/// pending proposal becomes stale (it was checked against the old plan).
/// Other replicas are told at commit.
async fn activate(c: &mut PgConn, version: i64, now_ms: i64) -> Result<(), StoreError> {
    const SUPERSEDE: &str = "UPDATE plans SET state = 'superseded' WHERE state = 'active'";
    const STALE: &str =
        "UPDATE plans SET state = 'stale' WHERE state = 'pending' AND version <> $1";
    const ACTIVATE: &str =
        "UPDATE plans SET state = 'active', activated_at_ms = $2 WHERE version = $1";
    c.execute(SUPERSEDE, &[]).await?;
    c.execute(STALE, &[&version]).await?;
    c.execute(ACTIVATE, &[&version, &now_ms]).await?;
    notify(c, NOTIFY_PLAN).await
}

async fn bootstrap_plan(
    c: &mut PgConn,
    b: BootstrapInstall,
) -> Result<Finish<BootstrapOutcome>, StoreError> {
    const EVER_ACTIVE: &str = "SELECT 1 FROM plans WHERE activated_at_ms IS NOT NULL LIMIT 1";
    lock(c, PLAN_LOCK).await?;
    if !remember_nonce(c, &b.nonce, b.nonce_expires_at_ms).await? {
        return Ok(Finish::Rollback(BootstrapOutcome::NonceReplayed));
    }
    if c.query_opt(EVER_ACTIVE, &[]).await?.is_some() {
        return Ok(Finish::Rollback(BootstrapOutcome::Disabled));
    }
    let version = next_version(c).await?;
    insert_plan(
        c,
        &NewPlan {
            version,
            sha256: &b.sha256,
            json: &b.canonical_json,
            proposer: "bootstrap",
            now_ms: b.now_ms,
            expires_at_ms: b.now_ms,
            required: 1,
        },
    )
    .await?;
    activate(c, version, b.now_ms).await?;
    create_token(c, &b.admin_token, &b.audit).await?;
    Ok(Finish::Commit(BootstrapOutcome::Installed {
        version: to_u64(version)?,
    }))
}

async fn propose_plan(
    c: &mut PgConn,
    p: PlanProposal,
) -> Result<Finish<ProposeOutcome>, StoreError> {
    lock(c, PLAN_LOCK).await?;
    let based_on = p.based_on.map(to_i64).transpose()?;
    if active_version(c).await? != based_on {
        return Ok(Finish::Rollback(ProposeOutcome::Stale));
    }
    let version = next_version(c).await?;
    insert_plan(
        c,
        &NewPlan {
            version,
            sha256: &p.sha256,
            json: &p.canonical_json,
            proposer: &p.proposer,
            now_ms: p.now_ms,
            expires_at_ms: p.expires_at_ms,
            required: p.required_approvals,
        },
    )
    .await?;
    let activates = p.required_approvals <= 1;
    if activates {
        activate(c, version, p.now_ms).await?;
    }
    // Audit rows in the same order as the events.
    let mut audit = p.audit;
    audit.fields.insert("version".into(), version.into());
    append_audit(c, &audit).await?;
    let version_u = to_u64(version)?;
    if activates {
        let mut audit = p.activation_audit;
        audit.fields.insert("version".into(), version.into());
        append_audit(c, &audit).await?;
        return Ok(Finish::Commit(ProposeOutcome::Activated {
            version: version_u,
        }));
    }
    Ok(Finish::Commit(ProposeOutcome::Pending {
        version: version_u,
        approvals: 1,
    }))
}

async fn approve_plan(
    c: &mut PgConn,
    a: PlanApproval,
) -> Result<Finish<ApproveOutcome>, StoreError> {
    const APPROVAL: &str =
        "INSERT INTO plan_approvals (version, approver, at_ms) VALUES ($1, $2, $3)";
    lock(c, PLAN_LOCK).await?;
    // Past i64::MAX no plan can exist.
    let Ok(v) = i64::try_from(a.version) else {
        return Ok(Finish::Rollback(ApproveOutcome::NotFound));
    };
    let Some(plan) = load_plan(c, v).await? else {
        return Ok(Finish::Rollback(ApproveOutcome::NotFound));
    };
    if plan.state != PlanState::Pending {
        return Ok(Finish::Rollback(ApproveOutcome::NotPending));
    }
    if a.now_ms >= plan.expires_at_ms {
        return Ok(Finish::Rollback(ApproveOutcome::Expired));
    }
    if plan.sha256 != a.sha256 {
        return Ok(Finish::Rollback(ApproveOutcome::HashMismatch));
    }
    if plan.approvals.iter().any(|x| x == &a.approver) {
        return Ok(Finish::Rollback(ApproveOutcome::AlreadyApproved));
    }
    c.execute(APPROVAL, &[&v, &a.approver, &a.now_ms]).await?;
    let approvals = u32::try_from(plan.approvals.len() + 1).unwrap_or(u32::MAX);
    let activates = approvals >= plan.required_approvals;
    if activates {
        activate(c, v, a.now_ms).await?;
    }
    append_audit(c, &a.audit).await?;
    if activates {
        append_audit(c, &a.activation_audit).await?;
        return Ok(Finish::Commit(ApproveOutcome::Activated));
    }
    Ok(Finish::Commit(ApproveOutcome::Pending {
        approvals,
        required: plan.required_approvals,
    }))
}

// === The change listener ===

fn event_of(payload: &str) -> Option<StoreEvent> {
    match payload {
        NOTIFY_REVOCATION => Some(StoreEvent::Revocation),
        NOTIFY_PLAN => Some(StoreEvent::Plan),
        NOTIFY_KEYS => Some(StoreEvent::Keys),
        _ => None,
    }
}

/// A dedicated connection that has run `LISTEN`. Its socket is driven by
/// `driver`, which forwards notification payloads to `notes` and ends (so
/// `notes` closes) when the connection is lost.
struct ListenSession {
    client: Client,
    notes: mpsc::UnboundedReceiver<String>,
    driver: JoinHandle<()>,
}

impl ListenSession {
    async fn open(target: &Target, t: Timeouts) -> Result<Self, StoreError> {
        let (client, mut connection) = target.connect(t, "connecting the change listener").await?;
        // Unbounded: notifications are rare, and a bounded queue could stop
        // the driver while the listener waits for a ping answer it must read.
        let (tx, notes) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %describe(&e), "store change listener connection failed");
                        break;
                    }
                    None => break,
                }
            }
        });
        let listen = format!("LISTEN {CHANNEL}");
        match timeout(t.op, client.batch_execute(&listen)).await {
            Ok(Ok(())) => Ok(Self {
                client,
                notes,
                driver,
            }),
            Ok(Err(e)) => {
                driver.abort();
                Err(store_error(&e))
            }
            Err(_) => {
                driver.abort();
                Err(timed_out("starting the change listener"))
            }
        }
    }
}

/// Resolves once a stop is requested or the store is gone.
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Forwards notifications until the connection is lost (`true`) or a stop
/// is requested (`false`).
async fn serve_session(
    s: &mut ListenSession,
    events: &broadcast::Sender<StoreEvent>,
    stop: &mut watch::Receiver<bool>,
    t: Timeouts,
) -> bool {
    let mut ping = tokio::time::interval(LISTENER_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // The first tick is immediate.
    loop {
        tokio::select! {
            () = stop_requested(stop) => return false,
            note = s.notes.recv() => match note {
                None => return true,
                Some(payload) => match event_of(&payload) {
                    // No subscriber is not an error.
                    Some(ev) => drop(events.send(ev)),
                    None => tracing::debug!("ignoring an unknown store change notice"),
                },
            },
            _ = ping.tick() => {
                // A half-open TCP connection would otherwise go unnoticed.
                if !matches!(timeout(t.op, s.client.simple_query("SELECT 1")).await, Ok(Ok(_))) {
                    return true;
                }
            }
        }
    }
}

/// The listener task: serves the session, and after losing it reconnects
/// with exponential backoff until it is stopped.
async fn run_listener(
    target: Target,
    first: ListenSession,
    events: broadcast::Sender<StoreEvent>,
    mut stop: watch::Receiver<bool>,
    t: Timeouts,
) {
    let mut session = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        if let Some(mut s) = session.take() {
            let started = tokio::time::Instant::now();
            let lost = serve_session(&mut s, &events, &mut stop, t).await;
            s.driver.abort();
            if !lost {
                return;
            }
            if started.elapsed() >= STABLE_SESSION {
                backoff = BACKOFF_MIN;
            }
            tracing::warn!("store change listener lost its database connection; reconnecting");
        }
        tokio::select! {
            () = stop_requested(&mut stop) => return,
            () = tokio::time::sleep(backoff) => {}
        }
        match ListenSession::open(&target, t).await {
            Ok(s) => {
                tracing::warn!("store change listener reconnected");
                // Changes committed while disconnected were not delivered:
                // have subscribers resync everything now.
                for ev in [StoreEvent::Revocation, StoreEvent::Plan, StoreEvent::Keys] {
                    drop(events.send(ev));
                }
                session = Some(s);
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "store change listener cannot reconnect"
                );
            }
        }
        backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    //! Need a server: `scripts/with-postgres.sh cargo test --lib store::postgres`.
    //! Without `SIGIL_TEST_POSTGRES_URL` each test prints a SKIPPED line and
    //! passes, except in CI (`CI=true`), where a missing database fails.
    //! Every test gets a database of its own, dropped when it passes.

    use std::sync::Arc;

    use tokio_postgres::NoTls;

    use super::*;
    use crate::audit::AuditKind;
    use crate::store::conformance::{self, join_all, redemption, token, NOW};

    const URL_VAR: &str = "SIGIL_TEST_POSTGRES_URL";

    /// A fresh database on the test server.
    struct TestDb {
        admin: Client,
        config: Config,
        name: String,
    }

    async fn connect_client(config: &Config) -> Client {
        let (client, connection) = config
            .connect(NoTls)
            .await
            .expect("connect to the test server");
        tokio::spawn(async move {
            drop(connection.await);
        });
        client
    }

    impl TestDb {
        /// `None` (after printing why) when no server is configured.
        async fn create() -> Option<Self> {
            let Ok(url) = std::env::var(URL_VAR) else {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!(
                        "{URL_VAR} is unset in CI: run the tests under scripts/with-postgres.sh"
                    );
                }
                // Once per run, on the real stderr: libtest captures
                // `eprintln!` of passing tests.
                static SKIPPED: std::sync::Once = std::sync::Once::new();
                SKIPPED.call_once(|| {
                    use std::io::Write as _;
                    let line = format!("SKIPPED: postgres store tests (set {URL_VAR})\n");
                    drop(std::io::stderr().write_all(line.as_bytes()));
                });
                return None;
            };
            let admin_config: Config = url.parse().expect("valid SIGIL_TEST_POSTGRES_URL");
            let admin = connect_client(&admin_config).await;
            let name = format!("sigil_test_{:016x}", rand::random::<u64>());
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create the test database");
            let mut config = admin_config;
            config.dbname(&name);
            Some(Self {
                admin,
                config,
                name,
            })
        }

        async fn store(&self) -> PostgresStore {
            self.store_with(PostgresOptions::default()).await
        }

        async fn store_with(&self, opts: PostgresOptions) -> PostgresStore {
            PostgresStore::connect_config(self.config.clone(), opts)
                .await
                .expect("connect the store")
        }

        /// A plain connection to the test database.
        async fn client(&self) -> Client {
            connect_client(&self.config).await
        }

        /// Terminates the test database's backends of `application_name`.
        async fn kill(&self, application_name: &str) -> u64 {
            let rows = self
                .admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = $2",
                    &[&self.name, &application_name],
                )
                .await
                .unwrap();
            rows.len() as u64
        }

        async fn drop_db(self) {
            self.admin
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await
                .expect("drop the test database");
        }
    }

    fn small_pool() -> PostgresOptions {
        PostgresOptions {
            pool_size: 8,
            ..PostgresOptions::default()
        }
    }

    fn record(i: u64) -> AuditRecord {
        AuditRecord::new(NOW, AuditKind::Denied, "test").field("i", i)
    }

    fn created(t: &TokenRecord) -> AuditRecord {
        AuditRecord::new(NOW, AuditKind::TokenCreated, "ok").field("token_id", t.token_id.clone())
    }

    /// Waits (bounded) for `want` on `rx`, skipping other events.
    async fn wait_for(
        rx: &mut broadcast::Receiver<StoreEvent>,
        want: StoreEvent,
        within: Duration,
    ) {
        let got = timeout(within, async {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev == want => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => panic!("event channel closed"),
                }
            }
        })
        .await;
        assert!(got.is_ok(), "no {want:?} within {within:?}");
    }

    /// One test per conformance check, each on a fresh database.
    macro_rules! conformance_tests {
        ($($check:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $check() {
                let Some(db) = TestDb::create().await else { return };
                let store = db.store().await;
                conformance::$check(&store).await;
                store.close().await;
                db.drop_db().await;
            }
        )*};
    }

    mod conformance_fresh {
        use super::*;
        conformance_tests!(
            create_fetch_list_tokens,
            duplicate_token_id_conflicts,
            redeem_happy_path,
            redeem_refusals_in_order,
            redeem_retry_returns_first_cert,
            redeem_retry_needs_a_valid_cert,
            redeem_error_changes_nothing,
            max_uses_three,
            concurrent_redeems_have_one_winner,
            revoke_outcomes,
            purge_expired_nonces,
            purge_runs_in_chunks_until_done,
            concurrent_audit_appends_chain,
            revocation_and_renewal,
            attestation_guards,
            shared_meta,
            plan_lifecycle,
        );
    }

    #[tokio::test]
    async fn conformance_on_one_store() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = db.store().await;
        conformance::run_all(&store).await;
        store.close().await;
        db.drop_db().await;
    }

    /// Two stores on one database behave as one: what one consumed, the
    /// other refuses.
    #[tokio::test]
    async fn replicas_share_nonces_and_token_uses() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let (a, b) = (db.store().await, db.store().await);
        let t = token("replicas", 2, 3_600_000);
        a.create_token(t.clone(), created(&t)).await.unwrap();
        assert_eq!(b.fetch_token(&t.token_id).await.unwrap(), Some(t.clone()));
        let first = redemption("replicas", "k1", "replicas-n1", NOW);
        assert_eq!(
            a.redeem_token(first.clone()).await.unwrap(),
            RedeemOutcome::Issued
        );
        // The nonce used via A, another key via B.
        let mut replay = redemption("replicas", "k2", "replicas-n1", NOW);
        replay.cert.serial = "0b".into();
        assert_eq!(
            b.redeem_token(replay).await.unwrap(),
            RedeemOutcome::NonceReplayed
        );
        // The same key retried via B gets A's certificate.
        let retry = redemption("replicas", "k1", "replicas-n2", NOW);
        match b.redeem_token(retry).await.unwrap() {
            RedeemOutcome::Retried(c) => assert_eq!(c.serial, first.cert.serial),
            other => panic!("expected Retried, got {other:?}"),
        }
        assert_eq!(
            b.redeem_token(redemption("replicas", "k3", "replicas-n3", NOW))
                .await
                .unwrap(),
            RedeemOutcome::Issued
        );
        assert_eq!(
            a.redeem_token(redemption("replicas", "k4", "replicas-n4", NOW))
                .await
                .unwrap(),
            RedeemOutcome::TokenAlreadyUsed
        );
        assert_eq!(a.counts().await.unwrap(), b.counts().await.unwrap());
        conformance::all_audit(&b).await;
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }

    async fn three_stores(db: &TestDb) -> Vec<Arc<PostgresStore>> {
        vec![
            Arc::new(db.store_with(small_pool()).await),
            Arc::new(db.store_with(small_pool()).await),
            Arc::new(db.store_with(small_pool()).await),
        ]
    }

    async fn close_all(stores: Vec<Arc<PostgresStore>>) {
        for s in stores {
            s.close().await;
        }
    }

    /// 200 redemptions of a one-use token on tasks spread over three
    /// replicas: exactly one certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_redeems_across_replicas_have_one_winner() {
        const N: usize = 200;
        let Some(db) = TestDb::create().await else {
            return;
        };
        let stores = three_stores(&db).await;
        let t = token("spread", 1, 3_600_000);
        stores[0]
            .create_token(t.clone(), created(&t))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let s = Arc::clone(&stores[i % stores.len()]);
                let r = redemption("spread", &format!("k{i}"), &format!("spread-n{i}"), NOW);
                tokio::spawn(async move { s.redeem_token(r).await })
            })
            .collect();
        let (mut issued, mut used) = (0, 0);
        for task in tasks {
            match task.await.unwrap().unwrap() {
                RedeemOutcome::Issued => issued += 1,
                RedeemOutcome::TokenAlreadyUsed => used += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((issued, used), (1, N - 1));
        let c = stores[1].counts().await.unwrap();
        assert_eq!((c.tokens, c.issued, c.nonces, c.audit), (1, 1, 1, 2));
        assert_eq!(
            stores[2]
                .fetch_token(&t.token_id)
                .await
                .unwrap()
                .unwrap()
                .uses,
            1
        );
        close_all(stores).await;
        db.drop_db().await;
    }

    /// Holds the audit lock from a connection of the test's own (a session
    /// lock), so a store's batcher blocks at the start of its next batch
    /// and the writes sent meanwhile queue up behind it.
    async fn hold_audit_lock(db: &TestDb) -> Client {
        let client = db.client().await;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&AUDIT_LOCK])
            .await
            .unwrap();
        client
    }

    async fn release_audit_lock(client: Client) {
        let released: bool = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&AUDIT_LOCK])
            .await
            .unwrap()
            .get(0);
        assert!(released);
    }

    fn batch_stats(s: &PostgresStore) -> (u64, u64) {
        (
            s.stats.batches.load(Ordering::Relaxed),
            s.stats.writes.load(Ordering::Relaxed),
        )
    }

    /// Concurrent writes share transactions: 300 token creations queued
    /// while the batcher waits for the audit lock commit in at most four
    /// batches (the first, then ⌈299 / 128⌉), all succeed, and the audit
    /// rows form one valid chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_commit_in_few_batches() {
        const N: usize = 300;
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = Arc::new(db.store().await);
        let held = hold_audit_lock(&db).await;
        let before = batch_stats(&store);
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let s = Arc::clone(&store);
                let t = token(&format!("batch-{i}"), 1, 3_600_000);
                tokio::spawn(async move { s.create_token(t.clone(), created(&t)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        release_audit_lock(held).await;
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let (batches, writes) = batch_stats(&store);
        let (batches, writes) = (batches - before.0, writes - before.1);
        assert_eq!(writes, N as u64);
        assert!(batches <= 4, "{N} writes took {batches} transactions");
        let c = store.counts().await.unwrap();
        assert_eq!((c.tokens, c.audit), (N as u64, N as u64));
        let rows = conformance::all_audit(store.as_ref()).await;
        assert_eq!(audit::verify_chain(&rows), Ok(N as u64));
        // And without a held lock: still fewer transactions than writes.
        let before = batch_stats(&store);
        let outs = join_all(
            (0..N as u64)
                .map(|i| store.append_audit(record(i)))
                .collect(),
        )
        .await;
        assert!(outs.iter().all(Result::is_ok));
        let (batches, writes) = batch_stats(&store);
        assert_eq!(writes - before.1, N as u64);
        assert!(batches - before.0 < N as u64);
        let rows = conformance::all_audit(store.as_ref()).await;
        assert_eq!(audit::verify_chain(&rows), Ok(2 * N as u64));
        Arc::into_inner(store).unwrap().close().await;
        db.drop_db().await;
    }

    /// One batch holding writes that fail (duplicate token ids, in the
    /// middle and last) and a refusal among writes that succeed: the
    /// failures get `Conflict`, the refusal its outcome, the others commit,
    /// all in one transaction, and the audit chain has exactly their rows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failing_write_in_a_batch_leaves_the_others() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = Arc::new(db.store().await);
        let dup = token("dup", 1, 3_600_000);
        store
            .create_token(dup.clone(), created(&dup))
            .await
            .unwrap();
        let held = hold_audit_lock(&db).await;
        let before = batch_stats(&store);
        // The first write opens a batch that waits for the lock; the next
        // ones queue behind it, in order.
        let first = {
            let s = Arc::clone(&store);
            tokio::spawn(async move { s.append_audit(record(100)).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pause = Duration::from_millis(20);
        let a = token("batch-a", 1, 3_600_000);
        let b = token("batch-b", 1, 3_600_000);
        let create = |t: TokenRecord| {
            let s = Arc::clone(&store);
            tokio::spawn(async move { s.create_token(t.clone(), created(&t)).await })
        };
        let ok_a = create(a.clone());
        tokio::time::sleep(pause).await;
        let clash = create(dup.clone());
        tokio::time::sleep(pause).await;
        let unknown = {
            let s = Arc::clone(&store);
            let r = redemption("nope", "k1", "nope-n1", NOW);
            tokio::spawn(async move { s.redeem_token(r).await })
        };
        tokio::time::sleep(pause).await;
        let audited = {
            let s = Arc::clone(&store);
            tokio::spawn(async move { s.append_audit(record(101)).await })
        };
        tokio::time::sleep(pause).await;
        let ok_b = create(b.clone());
        tokio::time::sleep(pause).await;
        let clash_last = create(a.clone());
        tokio::time::sleep(pause).await;
        release_audit_lock(held).await;

        assert_eq!(first.await.unwrap().unwrap(), 2);
        ok_a.await.unwrap().unwrap();
        let e = clash.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
        assert_eq!(unknown.await.unwrap().unwrap(), RedeemOutcome::TokenUnknown);
        assert_eq!(audited.await.unwrap().unwrap(), 4);
        ok_b.await.unwrap().unwrap();
        let e = clash_last.await.unwrap().unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
        // The lone first write, then one batch for the rest; the two
        // failures are not counted as written.
        let (batches, writes) = batch_stats(&store);
        assert_eq!((batches - before.0, writes - before.1), (2, 5));
        let c = store.counts().await.unwrap();
        assert_eq!((c.tokens, c.nonces, c.audit), (3, 0, 5));
        assert_eq!(store.fetch_token(&b.token_id).await.unwrap(), Some(b));
        let rows = conformance::all_audit(store.as_ref()).await;
        assert_eq!(audit::verify_chain(&rows), Ok(5));
        // The store keeps working.
        store.append_audit(record(102)).await.unwrap();
        Arc::into_inner(store).unwrap().close().await;
        db.drop_db().await;
    }

    /// 300 one-use tokens, each redeemed twice through each of two replicas,
    /// all at once, so batches on both interleave row locks of many tokens:
    /// one winner per token, never an error (no deadlock, no Unavailable).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_batched_redeems_on_two_replicas_have_one_winner_each() {
        const TOKENS: usize = 300;
        const TRIES: usize = 4;
        let Some(db) = TestDb::create().await else {
            return;
        };
        let stores = [
            Arc::new(db.store_with(small_pool()).await),
            Arc::new(db.store_with(small_pool()).await),
        ];
        let tokens: Vec<_> = (0..TOKENS)
            .map(|i| token(&format!("two-{i}"), 1, 3_600_000))
            .collect();
        let outs = join_all(
            tokens
                .iter()
                .map(|t| stores[0].create_token(t.clone(), created(t)))
                .collect(),
        )
        .await;
        assert!(outs.iter().all(Result::is_ok));
        let mut tasks = Vec::new();
        for j in 0..TRIES {
            for i in 0..TOKENS {
                let s = Arc::clone(&stores[j % 2]);
                let r = redemption(
                    &format!("two-{i}"),
                    &format!("k{i}-{j}"),
                    &format!("two-n{i}-{j}"),
                    NOW,
                );
                tasks.push((i, tokio::spawn(async move { s.redeem_token(r).await })));
            }
        }
        let mut issued = vec![0usize; TOKENS];
        for (i, task) in tasks {
            match task.await.unwrap() {
                Ok(RedeemOutcome::Issued) => issued[i] += 1,
                Ok(RedeemOutcome::TokenAlreadyUsed) => {}
                other => panic!("token {i}: {other:?}"),
            }
        }
        assert!(issued.iter().all(|&n| n == 1), "{issued:?}");
        let c = stores[1].counts().await.unwrap();
        assert_eq!(
            (c.tokens, c.issued, c.nonces, c.audit),
            (
                TOKENS as u64,
                TOKENS as u64,
                TOKENS as u64,
                2 * TOKENS as u64
            )
        );
        let rows = conformance::all_audit(stores[0].as_ref()).await;
        assert_eq!(audit::verify_chain(&rows), Ok(2 * TOKENS as u64));
        for s in stores {
            Arc::into_inner(s).unwrap().close().await;
        }
        db.drop_db().await;
    }

    /// Bootstraps racing on three replicas: exactly one installs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_bootstraps_across_replicas_install_once() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let stores = three_stores(&db).await;
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let s = Arc::clone(&stores[i % stores.len()]);
                let mut admin_token = token(&format!("boot-{i}"), 1, 3_600_000);
                admin_token.spiffe_id = "spiffe://example.org/admin/a".into();
                let install = BootstrapInstall {
                    nonce: format!("bootstrap:boot-{i}"),
                    nonce_expires_at_ms: NOW + 600_000,
                    now_ms: NOW,
                    sha256: format!("{i:064x}"),
                    canonical_json: format!("{{\"plan\":{i}}}"),
                    admin_token,
                    audit: AuditRecord::new(NOW, AuditKind::PlanBootstrapped, "ok"),
                };
                tokio::spawn(async move { s.bootstrap_plan(install).await })
            })
            .collect();
        let mut installed = 0;
        for task in tasks {
            match task.await.unwrap().unwrap() {
                BootstrapOutcome::Installed { version } => {
                    assert_eq!(version, 1);
                    installed += 1;
                }
                BootstrapOutcome::Disabled => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(installed, 1);
        let c = stores[2].counts().await.unwrap();
        assert_eq!((c.plans, c.tokens, c.nonces, c.audit), (1, 1, 1, 1));
        let active = stores[1].fetch_active_plan().await.unwrap().unwrap();
        assert_eq!((active.version, active.state), (1, PlanState::Active));
        close_all(stores).await;
        db.drop_db().await;
    }

    /// Appends from three replicas at once form one verifiable chain.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_audit_appends_across_replicas_form_one_chain() {
        const N: u64 = 300;
        let Some(db) = TestDb::create().await else {
            return;
        };
        let stores = three_stores(&db).await;
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let s = Arc::clone(&stores[(i % 3) as usize]);
                tokio::spawn(async move { s.append_audit(record(i)).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
        let rows = conformance::all_audit(stores[2].as_ref()).await;
        assert_eq!(audit::verify_chain(&rows), Ok(N));
        close_all(stores).await;
        db.drop_db().await;
    }

    /// Replicas starting at the same instant on an empty database: each
    /// connects, and every migration is applied once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn simultaneous_connects_migrate_once() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let config = db.config.clone();
        let barrier = Arc::new(tokio::sync::Barrier::new(3));
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let (config, barrier) = (config.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    PostgresStore::connect_config(config, small_pool()).await
                })
            })
            .collect();
        let mut stores = Vec::new();
        for task in tasks {
            stores.push(task.await.unwrap().expect("every replica connects"));
        }
        let client = db.client().await;
        let rows = client
            .query(
                "SELECT version FROM sigil_schema_version ORDER BY version",
                &[],
            )
            .await
            .unwrap();
        let versions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
        for s in &stores {
            assert_eq!(s.counts().await.unwrap(), StoreCounts::default());
        }
        for s in stores {
            s.close().await;
        }
        // Reconnecting to an up-to-date database applies nothing.
        let again = db.store().await;
        again.close().await;
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM sigil_schema_version", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, MIGRATIONS.len() as i64);
        drop(client);
        db.drop_db().await;
    }

    /// A database migrated by a newer build is refused, not misread.
    #[tokio::test]
    async fn newer_schema_is_refused() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        db.store().await.close().await;
        let client = db.client().await;
        client
            .execute(
                "INSERT INTO sigil_schema_version (version, applied_at_ms) VALUES ($1, 0)",
                &[&(MIGRATIONS.len() as i64 + 1)],
            )
            .await
            .unwrap();
        drop(client);
        let err = PostgresStore::connect_config(db.config.clone(), PostgresOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        db.drop_db().await;
    }

    /// Changes made through one replica reach another's subscribers.
    #[tokio::test]
    async fn changes_reach_other_replicas() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let (a, b) = (db.store().await, db.store().await);
        let mut rx = b.subscribe();
        let second = Duration::from_secs(1);
        a.revoke(
            RevocationRecord {
                kind: RevocationKind::Serial,
                value: "0a".into(),
                revoked_at_ms: NOW,
                expires_at_ms: None,
                reason: "test".into(),
            },
            AuditRecord::new(NOW, AuditKind::Revoked, "ok"),
        )
        .await
        .unwrap();
        wait_for(&mut rx, StoreEvent::Revocation, second).await;

        let stored = a.insert_meta_if_absent("keys/k", vec![1]).await.unwrap();
        wait_for(&mut rx, StoreEvent::Keys, second).await;
        assert!(a.cas_meta("keys/k", &stored, vec![2]).await.unwrap());
        wait_for(&mut rx, StoreEvent::Keys, second).await;

        let mut admin_token = token("notify-admin", 1, 3_600_000);
        admin_token.spiffe_id = "spiffe://example.org/admin/a".into();
        let install = BootstrapInstall {
            nonce: "bootstrap:notify".into(),
            nonce_expires_at_ms: NOW + 600_000,
            now_ms: NOW,
            sha256: "00".repeat(32),
            canonical_json: "{}".into(),
            admin_token,
            audit: AuditRecord::new(NOW, AuditKind::PlanBootstrapped, "ok"),
        };
        assert!(matches!(
            a.bootstrap_plan(install).await.unwrap(),
            BootstrapOutcome::Installed { .. }
        ));
        wait_for(&mut rx, StoreEvent::Plan, second).await;
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }

    /// The listener survives losing its connection: it reconnects, asks for
    /// a resync of everything, and delivers later changes again.
    #[tokio::test]
    async fn listener_reconnects_after_losing_its_connection() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let (a, b) = (db.store().await, db.store().await);
        let mut rx = b.subscribe();
        // Both replicas' listeners go; both come back.
        assert_eq!(db.kill("sigil-listener").await, 2);
        wait_for(&mut rx, StoreEvent::Revocation, Duration::from_secs(5)).await;
        wait_for(&mut rx, StoreEvent::Plan, Duration::from_secs(1)).await;
        wait_for(&mut rx, StoreEvent::Keys, Duration::from_secs(1)).await;
        a.insert_meta_if_absent("after/reconnect", vec![7])
            .await
            .unwrap();
        wait_for(&mut rx, StoreEvent::Keys, Duration::from_secs(1)).await;
        a.close().await;
        b.close().await;
        db.drop_db().await;
    }

    /// Pooled connections killed under the store: reads retry on a fresh
    /// connection, and once the loss is noticed writes work again.
    #[tokio::test]
    async fn pool_recovers_from_killed_connections() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = db.store_with(small_pool()).await;
        // Open several pooled connections.
        let outs = join_all((0..8).map(|_| store.counts()).collect()).await;
        assert!(outs.iter().all(Result::is_ok));
        assert!(db.kill("sigil").await >= 1);
        assert_eq!(store.counts().await.unwrap(), StoreCounts::default());
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..8 {
            store.append_audit(record(i)).await.unwrap();
        }
        assert_eq!(conformance::all_audit(&store).await.len(), 8);
        store.close().await;
        db.drop_db().await;
    }

    /// A write that panics (a bug) fails its own batch and nothing else:
    /// its caller gets `Unavailable`, nothing of its batch is committed, and
    /// the batcher goes on serving writes.
    #[tokio::test]
    async fn a_panicking_write_fails_its_batch_not_the_batcher() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = db.store().await;
        store.append_audit(record(1)).await.unwrap();
        let panicking = store.write::<(), _>(|c| {
            Box::pin(async move {
                c.batch("INSERT INTO nonces (nonce, expires_at_ms) VALUES ('doomed', 1)")
                    .await?;
                panic!("a bug in a write job");
            })
        });
        assert!(matches!(panicking.await, Err(StoreError::Unavailable(_))));
        for i in 2..=4 {
            store.append_audit(record(i)).await.unwrap();
        }
        let client = db.client().await;
        let count = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            count("SELECT COUNT(*) FROM nonces WHERE nonce = 'doomed'").await,
            0
        );
        assert_eq!(count("SELECT COUNT(*) FROM audit").await, 4);
        store.close().await;
        db.drop_db().await;
    }

    #[tokio::test]
    async fn closed_store_refuses_work() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let store = db.store().await;
        store.append_audit(record(1)).await.unwrap();
        store.close().await;
        store.close().await; // idempotent
        match store.append_audit(record(2)).await {
            Err(StoreError::Unavailable(m)) => assert_eq!(m, "closed"),
            other => panic!("expected Unavailable(closed), got {other:?}"),
        }
        assert!(matches!(
            store.counts().await,
            Err(StoreError::Unavailable(_))
        ));
        let client = db.client().await;
        let n: i64 = client
            .query_one("SELECT COUNT(*) FROM audit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        // No connection of the store is left open (backends exit shortly
        // after their client hangs up).
        let mut open: i64 = -1;
        for _ in 0..50 {
            open = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND application_name LIKE 'sigil%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(open, 0);
        drop(client);
        db.drop_db().await;
    }

    /// Runs without a server: connection errors never repeat the URL.
    #[tokio::test]
    async fn errors_do_not_reveal_the_url() {
        let secret = "s3cret-Pa55word";
        let opts = PostgresOptions {
            pool_size: 1,
            statement_timeout: Duration::from_secs(2),
            server_ca: None,
        };
        for url in [
            format!("postgres://sigil:{secret}@127.0.0.1:1/sigil"),
            format!("postgres://sigil:{secret}@127.0.0.1:notaport/sigil"),
            format!("host=127.0.0.1 port=1 password={secret} user=sigil dbname=sigil"),
            format!("host=127.0.0.1 password='{secret}"),
        ] {
            let err = PostgresStore::connect(&url, opts.clone())
                .await
                .unwrap_err();
            let shown = format!("{err} {err:?}");
            assert!(matches!(err, StoreError::Unavailable(_)), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains("127.0.0.1"), "{shown}");
        }
    }

    #[test]
    fn batch_begin_takes_the_audit_lock() {
        assert_eq!(
            BATCH_BEGIN,
            format!("BEGIN; SELECT pg_advisory_xact_lock({AUDIT_LOCK}); SAVEPOINT op")
        );
    }

    #[test]
    fn timeouts_derive_from_the_statement_timeout() {
        let t = Timeouts::new(Duration::from_secs(5));
        assert_eq!(t.acquire, Duration::from_secs(10));
        assert_eq!(t.op, Duration::from_secs(11));
        assert_eq!(
            t.session_setup(),
            "SET statement_timeout = 5000; SET idle_in_transaction_session_timeout = 11000"
        );
        assert_eq!(
            Timeouts::new(Duration::ZERO).connect,
            Duration::from_secs(1)
        );
        assert_eq!(event_of("revocation"), Some(StoreEvent::Revocation));
        assert_eq!(event_of("plan"), Some(StoreEvent::Plan));
        assert_eq!(event_of("keys"), Some(StoreEvent::Keys));
        assert_eq!(event_of("other"), None);
    }

    // === TLS to the server (`--store-ca-file`) ===

    /// The test server's CA (`scripts/with-postgres.sh` makes one with
    /// openssl); `None` (skipped, or a failure in CI) without it.
    fn test_ca() -> Option<std::path::PathBuf> {
        if let Ok(ca) = std::env::var("SIGIL_TEST_POSTGRES_CA") {
            return Some(ca.into());
        }
        assert!(
            std::env::var(URL_VAR).is_err() || std::env::var("CI").as_deref() != Ok("true"),
            "SIGIL_TEST_POSTGRES_CA is unset in CI: scripts/with-postgres.sh needs openssl"
        );
        eprintln!("SKIPPED: TLS store tests (no SIGIL_TEST_POSTGRES_CA)");
        None
    }

    /// `postgres://USER@HOST:PORT/DB?…` for the test database, reached as `host`.
    fn tls_url(db: &TestDb, host: &str, query: &str) -> String {
        let port = db.config.get_ports().first().copied().unwrap_or(5432);
        let user = db.config.get_user().unwrap_or("postgres");
        format!("postgres://{user}@{host}:{port}/{}?{query}", db.name)
    }

    fn tls_opts(ca: &std::path::Path) -> PostgresOptions {
        PostgresOptions {
            pool_size: 2,
            statement_timeout: Duration::from_secs(5),
            server_ca: Some(ca.to_owned()),
        }
    }

    /// (TLS, plaintext) sessions the server holds on the test database.
    async fn sessions_by_tls(db: &TestDb) -> (i64, i64) {
        let row = db
            .admin
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
                &[&db.name],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Tables in the test database's public schema (0: nothing was migrated).
    async fn table_count(db: &TestDb) -> i64 {
        let c = db.client().await;
        c.query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    /// A store with a CA file (libpq's `sslmode=verify-full` in the URL,
    /// accepted as such) works, and every session it holds, the pool's and
    /// the change listener's, is TLS on the server's side.
    #[tokio::test]
    async fn a_store_with_a_ca_file_encrypts_every_session() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let Some(ca) = test_ca() else { return };
        let url = tls_url(&db, "127.0.0.1", "sslmode=verify-full");
        let store = PostgresStore::connect(&url, tls_opts(&ca)).await.unwrap();
        let t = token("tls", 1, 3_600_000);
        store.create_token(t.clone(), record(1)).await.unwrap();
        assert_eq!(store.fetch_token(&t.token_id).await.unwrap(), Some(t));
        let (tls, plain) = sessions_by_tls(&db).await;
        assert!(tls >= 2, "pool and listener sessions over TLS: {tls}");
        assert_eq!(plain, 0, "no plaintext session of the store");
        store.close().await;
        db.drop_db().await;
    }

    /// A server whose certificate another CA signed is refused: the store
    /// does not open, nothing is written, and the error names the
    /// certificate problem, not the URL.
    #[tokio::test]
    async fn a_server_certificate_of_another_ca_is_refused() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let Some(_) = test_ca() else { return };
        let other = rcgen::generate_simple_self_signed(vec!["other-ca".to_owned()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let other_ca = dir.path().join("other.crt");
        std::fs::write(&other_ca, other.cert.pem()).unwrap();
        let url = tls_url(&db, "127.0.0.1", "password=s3cret-Pa55word");
        let err = PostgresStore::connect(&url, tls_opts(&other_ca))
            .await
            .unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(matches!(err, StoreError::Unavailable(_)), "{shown}");
        assert!(shown.contains("UnknownIssuer"), "{shown}");
        assert!(!shown.contains("s3cret-Pa55word"), "{shown}");
        assert_eq!(table_count(&db).await, 0, "no schema was created");
        db.drop_db().await;
    }

    /// The server's certificate names IP 127.0.0.1 only: reached as
    /// `localhost` (the same socket), the store refuses it.
    #[tokio::test]
    async fn a_host_the_certificate_does_not_name_is_refused() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let Some(ca) = test_ca() else { return };
        let url = tls_url(&db, "localhost", "");
        let err = PostgresStore::connect(&url, tls_opts(&ca))
            .await
            .unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains("not valid for name"), "{shown}");
        assert_eq!(table_count(&db).await, 0, "no schema was created");
        db.drop_db().await;
    }

    /// With a password login over TLS, SCRAM is bound to the session
    /// (`channel_binding=require` fails unless the connector hands over
    /// the server certificate's hash and the server agrees with it). The
    /// role and its `hostssl … scram-sha-256` rule are this test's own.
    #[tokio::test]
    async fn a_password_login_is_bound_to_the_tls_session() {
        let Some(db) = TestDb::create().await else {
            return;
        };
        let Some(ca) = test_ca() else { return };
        let role = format!("{}_scram", db.name);
        let password = format!("pw-{:016x}", rand::random::<u64>());
        db.admin
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256'; \
                 CREATE ROLE {role} LOGIN PASSWORD '{password}'; \
                 GRANT ALL ON DATABASE {} TO {role}; \
                 ALTER DATABASE {} OWNER TO {role}",
                db.name, db.name
            ))
            .await
            .unwrap();
        let hba: String = db
            .admin
            .query_one("SHOW hba_file", &[])
            .await
            .unwrap()
            .get(0);
        // Rules are matched in order: this one, first, applies to the role
        // alone; every other login keeps the cluster's rules.
        let rules = std::fs::read_to_string(&hba).unwrap();
        let rule = format!("hostssl all {role} 127.0.0.1/32 scram-sha-256\n");
        std::fs::write(&hba, format!("{rule}{rules}")).unwrap();
        db.admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        let port = db.config.get_ports().first().copied().unwrap_or(5432);
        let url = format!(
            "postgres://{role}:{password}@127.0.0.1:{port}/{}?channel_binding=require",
            db.name
        );
        let mut opened = None;
        for _ in 0..50 {
            // The postmaster reloads its rules asynchronously.
            match PostgresStore::connect(&url, tls_opts(&ca)).await {
                Ok(s) => {
                    opened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let method: Option<String> = db
            .admin
            .query_opt(
                "SELECT auth_method FROM pg_hba_file_rules WHERE $1 = ANY(user_name)",
                &[&role],
            )
            .await
            .unwrap()
            .map(|r| r.get(0));
        let current = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(&hba, current.replacen(&rule, "", 1)).unwrap();
        db.admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        assert_eq!(method.as_deref(), Some("scram-sha-256"));
        let store = opened.expect("a SCRAM login with channel_binding=require over TLS");
        store.close().await;
        // Without TLS there is nothing to bind to: the same URL is refused
        // (here the cluster's own rules would even let the role in
        // without a password, which `channel_binding=require` forbids).
        let plain = PostgresStore::connect(&url, PostgresOptions::default()).await;
        assert!(
            plain.is_err(),
            "channel_binding=require without TLS must fail"
        );
        db.admin
            .batch_execute(&format!(
                "ALTER DATABASE {} OWNER TO CURRENT_USER; DROP OWNED BY {role}",
                db.name
            ))
            .await
            .unwrap();
        db.drop_db().await;
        db_role_drop(&role).await;
    }

    /// Drops a role created by a test (after its database is gone).
    async fn db_role_drop(role: &str) {
        let url = std::env::var(URL_VAR).unwrap();
        let admin = connect_client(&url.parse().unwrap()).await;
        admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
            .await
            .unwrap();
    }
}

//! The embedded SQLite backend of [`Store`]: schema and migrations, the
//! group-commit writer thread, and the read connection.
//!
//! It owns the database file and every SQL statement; nothing outside this
//! file names `rusqlite`. It must not know any crypto or policy: it stores
//! what it is given and applies the one-use rules of [`Store`] atomically.
//!
//! # Writes: one thread, group commit
//! A single dedicated thread owns the write connection. Every state-changing
//! method becomes an `Op` sent over a channel with a oneshot reply. The
//! writer blocks for one op, drains up to `max_batch - 1` more that are
//! already queued, and runs them all in one `BEGIN IMMEDIATE … COMMIT` (one
//! fsync for the whole batch). Each op runs inside its own `SAVEPOINT`, so an
//! op that fails with an error is rolled back alone while the others commit.
//! Replies are sent only after `COMMIT` returned, so `Ok` always means durable
//! (`synchronous=FULL`). Logical refusals (`NonceReplayed`, …) are not errors:
//! they write nothing and commit with the batch. A caller that stops waiting
//! does not cancel its write: once queued, an op is applied. An op that
//! panics (a bug) ends its batch, not the thread: the batch is rolled back
//! and its callers get `Unavailable`.
//!
//! Because one thread applies every write in order, the check-then-consume
//! steps of [`Store::redeem_token`] can never interleave with another write.
//!
//! # The audit chain head
//! The writer keeps the last committed audit `(seq, hash)` in memory so that
//! appending does not re-read the table. A rolled-back savepoint restores the
//! head saved before that op; a failed batch restores the head from the
//! database (or, failing that, the copy taken at batch start).
//!
//! # Checkpoints: off the writer's path
//! WAL frames are copied back into the database file by a second thread with
//! its own connection (`sigil-store-ckpt`), started by the writer whenever a
//! commit leaves [`SqliteOptions::checkpoint_pages`] frames or more in the
//! WAL (after letting commits gather for a few ms, so that a page several
//! commits rewrote is copied once). A checkpoint writes and fsyncs the
//! database file; done inside a commit, as SQLite's auto-checkpoint does,
//! it stalls every write queued behind it for milliseconds. SQLite can only
//! rewind the WAL to its start when a checkpoint has copied *every* frame
//! before the writer's next transaction, which a background pass racing a
//! busy writer rarely achieves; so once the WAL reaches 4 × `checkpoint_pages` the writer
//! stops waking the background thread and finishes the checkpoint itself
//! after its next commit. By then only the frames of the last few batches
//! are left to copy: the WAL stays bounded and the writer's share is small.
//! Durability is unchanged: commits still fsync the WAL (`synchronous=FULL`),
//! and a checkpoint fsyncs the WAL before and the database after copying.
//!
//! # Reads
//! Reads use a separate read-only connection (WAL lets it run alongside the
//! writer) behind a mutex, on tokio's blocking pool.
//!
//! Nothing here logs row contents; errors carry SQLite's message, which names
//! tables and columns, never values.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use tokio::sync::oneshot;

use super::{
    ApproveOutcome, AttestGuard, AttestOutcome, AttestRedemption, BootstrapInstall,
    BootstrapOutcome, IssuedCert, PlanApproval, PlanProposal, PlanRecord, PlanState,
    ProposeOutcome, RedeemOutcome, Redemption, RenewOutcome, Renewal, RevocationKind,
    RevocationRecord, RevokeOutcome, Store, StoreCounts, StoreError, TokenRecord,
};
use crate::audit::{self, AuditRecord, AuditRow, GENESIS_HASH};

/// How long a connection waits on a lock held by another process before
/// failing with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection. The writer alone runs more than
/// rusqlite's default of 16 distinct statements; an evicted one is parsed
/// again on its next use.
const STATEMENT_CACHE: usize = 128;

/// Schema migrations; `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
/// Append new entries, never edit old ones.
const MIGRATIONS: &[&str] = &[
    SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5, SCHEMA_V6, SCHEMA_V7, SCHEMA_V8,
    SCHEMA_V9,
];

/// Version 1: tokens, nonces, issued certificates, audit chain.
const SCHEMA_V1: &str = "
CREATE TABLE tokens (
    token_id      TEXT    NOT NULL PRIMARY KEY,
    spiffe_id     TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    max_uses      INTEGER NOT NULL,
    uses          INTEGER NOT NULL,
    revoked_at_ms INTEGER
) STRICT;

CREATE TABLE nonces (
    nonce         TEXT    NOT NULL PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX nonces_expires_at_ms ON nonces (expires_at_ms);

CREATE TABLE issued (
    serial        TEXT    NOT NULL PRIMARY KEY,
    token_id      TEXT    REFERENCES tokens (token_id),
    spiffe_id     TEXT    NOT NULL,
    spki_sha256   TEXT    NOT NULL,
    issued_at_ms  INTEGER NOT NULL,
    not_after_ms  INTEGER NOT NULL,
    der           BLOB    NOT NULL
) STRICT;
CREATE INDEX issued_token_spki ON issued (token_id, spki_sha256);

CREATE TABLE audit (
    seq           INTEGER NOT NULL PRIMARY KEY,
    time_ms       INTEGER NOT NULL,
    kind          TEXT    NOT NULL,
    outcome       TEXT    NOT NULL,
    fields_json   TEXT    NOT NULL,
    prev_hash     TEXT    NOT NULL,
    hash          TEXT    NOT NULL
) STRICT;
";

/// Version 2: plans and their approvals.
const SCHEMA_V2: &str = "
CREATE TABLE plans (
    version            INTEGER NOT NULL PRIMARY KEY,
    sha256             TEXT    NOT NULL,
    canonical_json     TEXT    NOT NULL,
    state              TEXT    NOT NULL,
    proposer           TEXT    NOT NULL,
    created_at_ms      INTEGER NOT NULL,
    expires_at_ms      INTEGER NOT NULL,
    activated_at_ms    INTEGER,
    required_approvals INTEGER NOT NULL
) STRICT;
CREATE UNIQUE INDEX plans_one_active ON plans (state) WHERE state = 'active';

CREATE TABLE plan_approvals (
    version       INTEGER NOT NULL REFERENCES plans (version),
    approver      TEXT    NOT NULL,
    at_ms         INTEGER NOT NULL,
    PRIMARY KEY (version, approver)
) STRICT;
";

/// Version 3: certificate lineage (CA generation, origin, node) and revocations.
const SCHEMA_V3: &str = "
ALTER TABLE issued ADD COLUMN ca_gen INTEGER NOT NULL DEFAULT 1;
ALTER TABLE issued ADD COLUMN origin TEXT NOT NULL DEFAULT 'token';
ALTER TABLE issued ADD COLUMN node TEXT;
CREATE INDEX issued_spiffe ON issued (spiffe_id, not_after_ms);
CREATE INDEX issued_not_after ON issued (not_after_ms);

CREATE TABLE revocations (
    kind          TEXT    NOT NULL,
    value         TEXT    NOT NULL,
    revoked_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    reason        TEXT    NOT NULL,
    PRIMARY KEY (kind, value)
) STRICT;
";

/// Version 4: server challenges for attestation.
const SCHEMA_V4: &str = "
CREATE TABLE challenges (
    nonce         TEXT    NOT NULL PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL,
    used_at_ms    INTEGER
) STRICT, WITHOUT ROWID;
CREATE INDEX challenges_expires_at_ms ON challenges (expires_at_ms);
";

/// Version 5: shared metadata (key material, key ring manifest).
const SCHEMA_V5: &str = "
CREATE TABLE meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
) STRICT, WITHOUT ROWID;
";

/// Version 6: indexes for revocation lookups by node (CRLs, renewals).
const SCHEMA_V6: &str = "
CREATE INDEX issued_node ON issued (node) WHERE node IS NOT NULL;
";

/// Version 7: the CRL query's `ca_generation` branch finds a revoked
/// generation's live certificates through an index on the very expression
/// it joins on, instead of walking every live certificate through
/// `issued_not_after` (which served nothing else). See [`REVOKED_SERIALS`].
const SCHEMA_V7: &str = "
DROP INDEX issued_not_after;
CREATE INDEX issued_gen_not_after ON issued (CAST(ca_gen AS TEXT), not_after_ms);
";

/// Version 8: the nonce purge sweeps the table in key order
/// ([`purge_nonces`]), so the expiry index, which served only the purge,
/// goes: one B-tree insert less per enrollment, and no random deletes in it.
const SCHEMA_V8: &str = "
DROP INDEX nonces_expires_at_ms;
";

/// Version 9: the retry index (redemption step 3) starts with the paying
/// token's creation time. Keyed by the random token id, every certificate
/// inserted into a random leaf of it, which on a large store is a page
/// read, a WAL frame and a checkpoint write of its own (BENCHMARKS.md §1c);
/// tokens are mostly redeemed soon after they are created, so inserts now
/// land at the index's right edge. Existing rows take their token's
/// creation time (NULL without a token, never looked up).
const SCHEMA_V9: &str = "
ALTER TABLE issued ADD COLUMN token_created_ms INTEGER;
UPDATE issued SET token_created_ms =
    (SELECT t.created_at_ms FROM tokens t WHERE t.token_id = issued.token_id)
    WHERE token_id IS NOT NULL;
DROP INDEX issued_token_spki;
CREATE INDEX issued_token_key ON issued (token_created_ms, token_id, spki_sha256);
";

/// SQL condition: the `issued` row aliased `c` is covered by a revocation.
const COVERED: &str = "(EXISTS (SELECT 1 FROM revocations r WHERE \
       (r.kind = 'serial' AND r.value = c.serial) \
    OR (r.kind = 'spiffe_id' AND r.value = c.spiffe_id AND r.revoked_at_ms >= c.issued_at_ms) \
    OR (r.kind = 'node' AND c.node IS NOT NULL AND r.value = c.node) \
    OR (r.kind = 'ca_generation' AND r.value = CAST(c.ca_gen AS TEXT))))";

/// The CRL query: live certificates covered by a revocation, with the
/// earliest revocation time. Each branch is driven by the (small)
/// revocation table (`CROSS JOIN` fixes SQLite's join order) and reaches
/// the certificates through an index, so the cost does not grow with the
/// number of live certificates that no revocation covers. Before schema
/// version 7 no index served the `ca_generation` branch's join term (an
/// expression), and the planner walked every live certificate instead:
/// 0.65 s at 1.4 M certificates, on every maintenance tick, holding the
/// read connection that enrollment needs.
const REVOKED_SERIALS: &str = "SELECT serial, MIN(at), ca_gen FROM ( \
       SELECT c.serial, r.revoked_at_ms AS at, c.ca_gen FROM revocations r \
         CROSS JOIN issued c ON c.serial = r.value \
         WHERE r.kind = 'serial' AND c.not_after_ms > ?1 \
       UNION ALL \
       SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
         CROSS JOIN issued c ON c.spiffe_id = r.value AND c.issued_at_ms <= r.revoked_at_ms \
         WHERE r.kind = 'spiffe_id' AND c.not_after_ms > ?1 \
       UNION ALL \
       SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
         CROSS JOIN issued c ON c.node = r.value \
         WHERE r.kind = 'node' AND c.not_after_ms > ?1 \
       UNION ALL \
       SELECT c.serial, r.revoked_at_ms, c.ca_gen FROM revocations r \
         CROSS JOIN issued c ON CAST(c.ca_gen AS TEXT) = r.value \
         WHERE r.kind = 'ca_generation' AND c.not_after_ms > ?1 \
     ) AS covered GROUP BY serial, ca_gen ORDER BY serial";

const PLAN_COLUMNS: &str = "version, sha256, canonical_json, state, proposer, created_at_ms, \
                            expires_at_ms, activated_at_ms, required_approvals";

const TOKEN_COLUMNS: &str =
    "token_id, spiffe_id, created_at_ms, expires_at_ms, max_uses, uses, revoked_at_ms";
const ISSUED_COLUMNS: &str =
    "serial, token_id, spiffe_id, spki_sha256, issued_at_ms, not_after_ms, der, ca_gen, origin, node";
/// How many columns [`ISSUED_COLUMNS`] names.
const ISSUED_COLUMN_COUNT: usize = 10;
const AUDIT_COLUMNS: &str = "seq, time_ms, kind, outcome, fields_json, prev_hash, hash";

/// Tuning for [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Commit queued writes together (one fsync per batch). `false` gives
    /// every write its own transaction; only useful to compare in benchmarks.
    pub group_commit: bool,
    /// Most writes in one batch (values below 1 count as 1).
    pub max_batch: usize,
    /// WAL size (in pages) at which a background checkpoint starts; at four
    /// times this the writer checkpoints itself after its next commit. See
    /// the module docs.
    pub checkpoint_pages: u32,
    /// Run checkpoints on a background thread. `false` leaves them all to
    /// the writer (at `checkpoint_pages`), as SQLite's auto-checkpoint does;
    /// only useful to compare in benchmarks and tests.
    pub background_checkpoints: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            group_commit: true,
            max_batch: 256,
            // SQLite's own auto-checkpoint threshold.
            checkpoint_pages: 1000,
            background_checkpoints: true,
        }
    }
}

/// The SQLite [`Store`]. Open with [`SqliteStore::open`]; call
/// [`Store::close`] on shutdown (dropping also stops the writer, blocking
/// until it has finished the queued writes).
pub struct SqliteStore {
    /// Queue to the writer thread; `None` once closed.
    ops: RwLock<Option<mpsc::Sender<Op>>>,
    /// The writer thread, joined by `close` or `drop`.
    writer: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// The read-only connection.
    reader: Arc<Mutex<Connection>>,
    /// Never sent on (single process); see [`Store::subscribe`].
    events: tokio::sync::broadcast::Sender<crate::store::StoreEvent>,
    checkpoints: Arc<CheckpointStats>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// schema migrations and starts the writer thread.
    ///
    /// # Errors
    /// `Unavailable` if the file cannot be opened or configured, or the
    /// thread cannot start; `Corrupt` if the file's schema is newer than this
    /// build or its audit head cannot be read.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<Self, StoreError> {
        let writer = Writer::open(path, opts)?;
        let checkpoints = Arc::clone(&writer.checkpoints);
        let reader = open_reader(path)?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("sigil-store-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start writer thread: {e}")))?;
        Ok(Self {
            ops: RwLock::new(Some(tx)),
            writer: tokio::sync::Mutex::new(Some(handle)),
            reader: Arc::new(Mutex::new(reader)),
            events: tokio::sync::broadcast::channel(1).0,
            checkpoints,
        })
    }

    /// Checkpoints completed since the store opened: `(by the background
    /// thread, by the writer)`. See the module docs.
    pub fn checkpoints(&self) -> (u64, u64) {
        (
            self.checkpoints.background.load(AtomicOrdering::Relaxed),
            self.checkpoints.writer.load(AtomicOrdering::Relaxed),
        )
    }

    /// Queues `op` for the writer.
    fn submit(&self, op: Op) -> Result<(), StoreError> {
        let guard = self.ops.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            None => Err(closed()),
            Some(tx) => tx.send(op).map_err(|_| writer_stopped()),
        }
    }

    /// Sends a write and waits for its reply (sent after the commit).
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(make(tx))?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Runs `f` on the writer thread inside the batch transaction, like any
    /// other write: durable when it returns `Ok`.
    async fn job<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut ChainHead) -> Result<T, StoreError> + Send + 'static,
    {
        self.write(|reply| Op::Job(Box::new(FnJob { f, reply })))
            .await
    }

    /// Runs a primary-key lookup `f` on the read connection: right here when
    /// the connection is free (a lookup of a few microseconds costs less
    /// than handing it to another thread and back, which enrollment pays on
    /// every request), else on the blocking pool like [`Self::read`].
    async fn read_point<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        {
            let free = match self.reader.try_lock() {
                Ok(conn) => Some(conn),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if let Some(conn) = free {
                return f(&conn);
            }
        }
        self.read(f).await
    }

    /// Runs `f` on the read connection on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave the connection in a
            // bad state (reads hold no transaction open), so poison is ignored.
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Dropping the only sender ends the writer's loop once the queue is
        // drained; join so the write connection is closed when drop returns.
        self.ops
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = self.writer.get_mut().take() {
            if handle.join().is_err() {
                tracing::error!("store writer thread panicked");
            }
        }
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("closed".into())
}

fn unavailable<T>(msg: &str) -> Result<T, StoreError> {
    Err(StoreError::Unavailable(msg.to_owned()))
}

fn writer_stopped() -> StoreError {
    StoreError::Unavailable("writer stopped".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_token(&self, token: TokenRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(|reply| Op::CreateToken {
            token,
            audit,
            reply,
        })
        .await
    }

    async fn fetch_token(&self, token_id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let token_id = token_id.to_owned();
        self.read_point(move |c| {
            let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = ?1");
            let mut stmt = c.prepare_cached(&sql)?;
            Ok(stmt.query_row([&token_id], token_from_row).optional()?)
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|c| {
            let sql = format!(
                "SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY created_at_ms DESC, rowid DESC"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map([], token_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn revoke_token(
        &self,
        token_id: &str,
        now_ms: i64,
        audit: AuditRecord,
    ) -> Result<RevokeOutcome, StoreError> {
        let token_id = token_id.to_owned();
        self.write(|reply| Op::RevokeToken {
            token_id,
            now_ms,
            audit,
            reply,
        })
        .await
    }

    async fn fetch_issued_for_token(
        &self,
        token_id: &str,
        spki_sha256: &str,
        now_ms: i64,
    ) -> Result<Option<IssuedCert>, StoreError> {
        let token_id = token_id.to_owned();
        let spki_sha256 = spki_sha256.to_owned();
        self.read(move |c| Ok(valid_cert_for_key(c, &token_id, &spki_sha256, now_ms)?))
            .await
    }

    async fn fetch_issued(&self, serial: &str) -> Result<Option<IssuedCert>, StoreError> {
        let serial = serial.to_owned();
        self.read(move |c| {
            let sql = format!("SELECT {ISSUED_COLUMNS} FROM issued WHERE serial = ?1");
            let mut stmt = c.prepare_cached(&sql)?;
            Ok(stmt.query_row([&serial], issued_from_row).optional()?)
        })
        .await
    }

    async fn redeem_token(&self, redemption: Redemption) -> Result<RedeemOutcome, StoreError> {
        self.write(|reply| Op::RedeemToken {
            redemption: Box::new(redemption),
            reply,
        })
        .await
    }

    async fn append_audit(&self, audit: AuditRecord) -> Result<u64, StoreError> {
        self.write(|reply| Op::AppendAudit { audit, reply }).await
    }

    async fn list_audit(&self, after_seq: u64, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        // Past i64::MAX no row can exist.
        let Ok(after_seq) = i64::try_from(after_seq) else {
            return Ok(Vec::new());
        };
        self.read(move |c| {
            let sql =
                format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2");
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(params![after_seq, limit], audit_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn purge_expired(&self, now_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        // `Some(key)`: the nonce sweep goes on after `key` ("" = the start).
        let mut sweep = Some(String::new());
        loop {
            let from = sweep.take();
            let round = self
                .write(|reply| Op::PurgeExpired {
                    now_ms,
                    from,
                    reply,
                })
                .await?;
            total += round.deleted;
            sweep = round.next;
            if sweep.is_none() && !round.others_full {
                return Ok(total);
            }
        }
    }

    async fn bootstrap_plan(
        &self,
        install: BootstrapInstall,
    ) -> Result<BootstrapOutcome, StoreError> {
        self.job(move |conn, head| bootstrap_plan(conn, head, &install))
            .await
    }

    async fn propose_plan(&self, proposal: PlanProposal) -> Result<ProposeOutcome, StoreError> {
        self.job(move |conn, head| propose_plan(conn, head, &proposal))
            .await
    }

    async fn approve_plan(&self, approval: PlanApproval) -> Result<ApproveOutcome, StoreError> {
        self.job(move |conn, head| approve_plan(conn, head, &approval))
            .await
    }

    async fn fetch_active_plan(&self) -> Result<Option<PlanRecord>, StoreError> {
        self.read(|c| {
            let v: Option<i64> = c
                .query_row(
                    "SELECT version FROM plans WHERE state = 'active'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            match v {
                Some(v) => load_plan(c, v),
                None => Ok(None),
            }
        })
        .await
    }

    async fn fetch_plan(&self, version: u64) -> Result<Option<PlanRecord>, StoreError> {
        let v = to_i64(version)?;
        self.read(move |c| load_plan(c, v)).await
    }

    async fn revoke(&self, r: RevocationRecord, audit: AuditRecord) -> Result<(), StoreError> {
        self.job(move |conn, head| revoke(conn, head, &r, &audit))
            .await
    }

    async fn list_revocations(&self, now_ms: i64) -> Result<Vec<RevocationRecord>, StoreError> {
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT kind, value, revoked_at_ms, expires_at_ms, reason FROM revocations \
                 WHERE expires_at_ms IS NULL OR expires_at_ms > ?1 ORDER BY revoked_at_ms, kind, value",
            )?
            .query_map([now_ms], revocation_from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        let serial = serial.to_owned();
        self.read(move |c| Ok(is_revoked(c, &serial)?)).await
    }

    async fn renew_cert(&self, renewal: Renewal) -> Result<RenewOutcome, StoreError> {
        self.job(move |conn, head| renew_cert(conn, head, &renewal))
            .await
    }

    async fn revoked_serials(&self, now_ms: i64) -> Result<Vec<(String, i64, u32)>, StoreError> {
        self.read(move |c| {
            Ok(c.prepare_cached(REVOKED_SERIALS)?
                .query_map([now_ms], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, u32>(2)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn create_challenge(
        &self,
        nonce_hex: &str,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let nonce = nonce_hex.to_owned();
        self.job(move |conn, _| {
            conn.prepare_cached("INSERT INTO challenges (nonce, expires_at_ms) VALUES (?1, ?2)")?
                .execute(params![nonce, expires_at_ms])?;
            Ok(())
        })
        .await
    }

    async fn redeem_attestation(&self, r: AttestRedemption) -> Result<AttestOutcome, StoreError> {
        self.job(move |conn, head| redeem_attestation(conn, head, &r))
            .await
    }

    async fn fetch_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([&key], |r| r.get::<_, Vec<u8>>(0))
                .optional()?)
        })
        .await
    }

    async fn insert_meta_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> Result<Vec<u8>, StoreError> {
        let key = key.to_owned();
        self.job(move |conn, _| {
            conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            )?
            .execute(params![key, value])?;
            Ok(conn
                .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
                .query_row([&key], |r| r.get::<_, Vec<u8>>(0))?)
        })
        .await
    }

    async fn cas_meta(&self, key: &str, expected: &[u8], new: Vec<u8>) -> Result<bool, StoreError> {
        let key = key.to_owned();
        let expected = expected.to_vec();
        self.job(move |conn, _| {
            let n = conn
                .prepare_cached("UPDATE meta SET value = ?3 WHERE key = ?1 AND value = ?2")?
                .execute(params![key, expected, new])?;
            Ok(n == 1)
        })
        .await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::store::StoreEvent> {
        // One process owns the file: the broker already reloads after its
        // own writes, so nothing is ever sent.
        self.events.subscribe()
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(|c| {
            let (tokens, issued, nonces, audit, plans) = c.query_row(
                "SELECT (SELECT COUNT(*) FROM tokens), (SELECT COUNT(*) FROM issued), \
                        (SELECT COUNT(*) FROM nonces), (SELECT COUNT(*) FROM audit), \
                        (SELECT COUNT(*) FROM plans)",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                },
            )?;
            Ok(StoreCounts {
                tokens: to_u64(tokens)?,
                issued: to_u64(issued)?,
                nonces: to_u64(nonces)?,
                audit: to_u64(audit)?,
                plans: to_u64(plans)?,
            })
        })
        .await
    }

    async fn close(&self) {
        // Stop accepting: later writes see `None` and fail with "closed".
        self.ops
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        // Holding the async lock while joining makes a concurrent second
        // `close` wait for the first instead of returning early.
        let mut writer = self.writer.lock().await;
        if let Some(handle) = writer.take() {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("store writer thread panicked"),
                Err(e) => tracing::error!(error = %e, "could not join store writer thread"),
            }
        }
    }
}

// === Errors and conversions ===

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
                StoreError::Conflict(e.to_string())
            }
            rusqlite::Error::SqliteFailure(f, _)
                if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
            {
                StoreError::Corrupt(e.to_string())
            }
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

fn to_u64(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt("negative count or sequence".into()))
}

fn to_i64(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt("sequence out of range".into()))
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        token_id: r.get(0)?,
        spiffe_id: r.get(1)?,
        created_at_ms: r.get(2)?,
        expires_at_ms: r.get(3)?,
        max_uses: r.get(4)?,
        uses: r.get(5)?,
        revoked_at_ms: r.get(6)?,
    })
}

fn issued_from_row(r: &Row<'_>) -> rusqlite::Result<IssuedCert> {
    Ok(IssuedCert {
        serial: r.get(0)?,
        token_id: r.get(1)?,
        spiffe_id: r.get(2)?,
        spki_sha256: r.get(3)?,
        issued_at_ms: r.get(4)?,
        not_after_ms: r.get(5)?,
        der: r.get(6)?,
        ca_gen: r.get(7)?,
        origin: r.get(8)?,
        node: r.get(9)?,
    })
}

fn revocation_from_row(r: &Row<'_>) -> rusqlite::Result<RevocationRecord> {
    let kind: String = r.get(0)?;
    Ok(RevocationRecord {
        kind: RevocationKind::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                0,
                rusqlite::types::Type::Text,
                "unknown revocation kind".into(),
            )
        })?,
        value: r.get(1)?,
        revoked_at_ms: r.get(2)?,
        expires_at_ms: r.get(3)?,
        reason: r.get(4)?,
    })
}

/// Inserts an issued certificate row, with its token's creation time for
/// the retry index (schema 9; the token's row was just read or written, so
/// the lookup finds its page cached).
fn insert_issued(
    conn: &Connection,
    c: &IssuedCert,
    token_id: Option<&str>,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO issued (serial, token_id, spiffe_id, spki_sha256, issued_at_ms, \
         not_after_ms, der, ca_gen, origin, node, token_created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, \
         (SELECT created_at_ms FROM tokens WHERE token_id = ?2))",
    )?
    .execute(params![
        c.serial,
        token_id,
        c.spiffe_id,
        c.spki_sha256,
        c.issued_at_ms,
        c.not_after_ms,
        c.der,
        c.ca_gen,
        c.origin,
        c.node,
    ])?;
    Ok(())
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditRow> {
    let seq: i64 = r.get(0)?;
    let seq = u64::try_from(seq).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, seq))?;
    Ok(AuditRow {
        seq,
        time_ms: r.get(1)?,
        kind: r.get(2)?,
        outcome: r.get(3)?,
        fields_json: r.get(4)?,
        prev_hash: r.get(5)?,
        hash: r.get(6)?,
    })
}

// === Connections and schema ===

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "query_only", "ON")?;
    Ok(conn)
}

fn open_writer_conn(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "cannot enable WAL journal mode (got {mode})"
        )));
    }
    // WAL + FULL: every commit fsyncs the WAL, so a reply of `Ok` survives
    // power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoint journals (one per op) in memory: as temp files they spilled
    // to disk once a batch outgrew 64 KiB, a write syscall per page.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// The connection of the background checkpoint thread: read-write (a
/// checkpoint writes the database file), `synchronous=FULL` so that a
/// checkpoint fsyncs the WAL before copying and the database after.
fn open_checkpoint_conn(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// At this many times [`SqliteOptions::checkpoint_pages`] WAL frames, the
/// writer checkpoints itself (see the module docs).
const HARD_CHECKPOINT_FACTOR: i32 = 4;

/// Installs the writer connection's WAL hook (it replaces SQLite's
/// auto-checkpoint). After each commit, with `pages` frames in the WAL: from
/// `soft` frames on, wake the background thread, which then copies what this
/// commit added (a pass per commit keeps what is left for the writer small);
/// at [`HARD_CHECKPOINT_FACTOR`] × `soft`, or at `soft` when there is no
/// background thread, checkpoint right here on the writer instead.
fn install_wal_hook(
    conn: &mut Connection,
    soft: u32,
    wake: Option<mpsc::SyncSender<()>>,
    stats: Arc<CheckpointStats>,
) -> Result<(), StoreError> {
    let soft = i32::try_from(soft.max(1)).unwrap_or(i32::MAX);
    let hard = if wake.is_some() {
        soft.saturating_mul(HARD_CHECKPOINT_FACTOR)
    } else {
        soft
    };
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= hard {
            checkpoint(
                wal.checkpoint_v2(rusqlite::wal::CheckpointMode::PASSIVE),
                "writer",
                &stats.writer,
            );
        } else if pages >= soft {
            if let Some(wake) = &wake {
                // Full: a wake-up is already pending, nothing to add.
                let _ = wake.try_send(());
            }
        }
        Ok(())
    }))?;
    Ok(())
}

/// Checkpoints completed by each side since the store opened.
#[derive(Debug, Default)]
struct CheckpointStats {
    background: AtomicU64,
    writer: AtomicU64,
}

/// Accounts for one checkpoint attempt by `by` (`writer` or `background`).
/// `Busy` means another checkpoint holds the lock; that one does the work.
fn checkpoint(result: rusqlite::Result<(i32, i32)>, by: &str, count: &AtomicU64) {
    match result {
        Ok(_) => {
            count.fetch_add(1, AtomicOrdering::Relaxed);
            crate::metrics::global().inc(
                "sigil_store_checkpoints_total",
                &[("backend", "sqlite"), ("by", by)],
                1,
            );
        }
        Err(rusqlite::Error::SqliteFailure(f, _)) if f.code == ErrorCode::DatabaseBusy => {}
        Err(e) => tracing::warn!(error = %e, by, "store checkpoint failed"),
    }
}

/// How long the checkpoint thread lets commits gather after a wake-up
/// before its pass: a page that several commits rewrote meanwhile is copied
/// once. Without it a pass ran for nearly every commit: at 2,500
/// enrollments/s the thread used 0.16–0.18 cores, with it 0.088 (p99 within
/// the run-to-run noise; a 10 ms pause made the tail worse).
const CHECKPOINT_SETTLE: Duration = Duration::from_millis(5);

/// The background checkpoint thread: one PASSIVE checkpoint per wake-up
/// (wake-ups coalesce), until the writer drops its end.
fn run_checkpointer(conn: &Connection, wake: &mpsc::Receiver<()>, stats: &CheckpointStats) {
    while wake.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_SETTLE);
        // The pass below covers any commit that woke us meanwhile.
        let _ = wake.try_recv();
        checkpoint(
            conn.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE),
            "background",
            &stats.background,
        );
    }
}

/// Applies the migrations the file has not seen, in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len();
    let version = usize::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("negative schema version {version}")))?;
    if version > known {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is newer than this build supports ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        // `user_version` lives in the file header and is transactional.
        let next = i64::try_from(i + 1)
            .map_err(|_| StoreError::Corrupt("schema version out of range".into()))?;
        tx.pragma_update(None, "user_version", next)?;
    }
    tx.commit()?;
    Ok(())
}

/// The last committed audit row's `(seq, hash)`, or `(0, GENESIS_HASH)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainHead {
    seq: u64,
    hash: String,
}

fn load_head(conn: &Connection) -> Result<ChainHead, StoreError> {
    let last = conn
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()?;
    Ok(match last {
        Some((seq, hash)) => ChainHead {
            seq: to_u64(seq)?,
            hash,
        },
        None => ChainHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        },
    })
}

// === The writer ===

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One state-changing request for the writer thread.
enum Op {
    CreateToken {
        token: TokenRecord,
        audit: AuditRecord,
        reply: Reply<()>,
    },
    RevokeToken {
        token_id: String,
        now_ms: i64,
        audit: AuditRecord,
        reply: Reply<RevokeOutcome>,
    },
    RedeemToken {
        redemption: Box<Redemption>,
        reply: Reply<RedeemOutcome>,
    },
    AppendAudit {
        audit: AuditRecord,
        reply: Reply<u64>,
    },
    PurgeExpired {
        now_ms: i64,
        /// Where the nonce sweep goes on; `None`: it is done.
        from: Option<String>,
        reply: Reply<PurgeRound>,
    },
    /// Any other write, as a closure (see [`SqliteStore::job`]).
    Job(Box<dyn Job>),
}

/// A type-erased write: applying it yields its pending reply.
trait Job: Send {
    fn apply(self: Box<Self>, conn: &Connection, head: &mut ChainHead) -> Box<dyn JobDone>;
    fn fail(self: Box<Self>, msg: &str) -> Box<dyn JobDone>;
}

/// A type-erased applied write, held until the batch commits.
trait JobDone: Send {
    fn is_err(&self) -> bool;
    fn fail(self: Box<Self>, msg: &str) -> Box<dyn JobDone>;
    fn send(self: Box<Self>);
}

struct FnJob<T, F> {
    f: F,
    reply: Reply<T>,
}

struct JobReply<T> {
    reply: Reply<T>,
    result: Result<T, StoreError>,
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &mut ChainHead) -> Result<T, StoreError> + Send + 'static,
{
    fn apply(self: Box<Self>, conn: &Connection, head: &mut ChainHead) -> Box<dyn JobDone> {
        let result = (self.f)(conn, head);
        Box::new(JobReply {
            reply: self.reply,
            result,
        })
    }

    fn fail(self: Box<Self>, msg: &str) -> Box<dyn JobDone> {
        Box::new(JobReply {
            reply: self.reply,
            result: unavailable(msg),
        })
    }
}

impl<T: Send + 'static> JobDone for JobReply<T> {
    fn is_err(&self) -> bool {
        self.result.is_err()
    }

    fn fail(self: Box<Self>, msg: &str) -> Box<dyn JobDone> {
        Box::new(JobReply {
            reply: self.reply,
            result: unavailable(msg),
        })
    }

    fn send(self: Box<Self>) {
        drop(self.reply.send(self.result));
    }
}

/// An applied op: its reply channel and result, held until the batch commits.
enum Done {
    Unit(Reply<()>, Result<(), StoreError>),
    Revoke(Reply<RevokeOutcome>, Result<RevokeOutcome, StoreError>),
    Redeem(Reply<RedeemOutcome>, Result<RedeemOutcome, StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
    Purge(Reply<PurgeRound>, Result<PurgeRound, StoreError>),
    Job(Box<dyn JobDone>),
}

impl Op {
    /// Runs the op against the open transaction. On `Err` the caller rolls
    /// back the op's savepoint.
    fn apply(self, conn: &Connection, head: &mut ChainHead) -> Done {
        match self {
            Op::CreateToken {
                token,
                audit,
                reply,
            } => Done::Unit(reply, create_token(conn, head, &token, &audit)),
            Op::RevokeToken {
                token_id,
                now_ms,
                audit,
                reply,
            } => Done::Revoke(reply, revoke_token(conn, head, &token_id, now_ms, &audit)),
            Op::RedeemToken { redemption, reply } => {
                Done::Redeem(reply, redeem_token(conn, head, &redemption))
            }
            Op::AppendAudit { audit, reply } => {
                Done::Count(reply, append_audit(conn, head, &audit))
            }
            Op::PurgeExpired {
                now_ms,
                from,
                reply,
            } => Done::Purge(reply, purge_expired(conn, now_ms, from.as_deref())),
            Op::Job(job) => Done::Job(job.apply(conn, head)),
        }
    }

    /// The op was not applied: it will reply `Unavailable(msg)`.
    fn fail(self, msg: &str) -> Done {
        match self {
            Op::CreateToken { reply, .. } => Done::Unit(reply, unavailable(msg)),
            Op::RevokeToken { reply, .. } => Done::Revoke(reply, unavailable(msg)),
            Op::RedeemToken { reply, .. } => Done::Redeem(reply, unavailable(msg)),
            Op::AppendAudit { reply, .. } => Done::Count(reply, unavailable(msg)),
            Op::PurgeExpired { reply, .. } => Done::Purge(reply, unavailable(msg)),
            Op::Job(job) => Done::Job(job.fail(msg)),
        }
    }
}

impl Done {
    fn is_err(&self) -> bool {
        match self {
            Done::Unit(_, r) => r.is_err(),
            Done::Revoke(_, r) => r.is_err(),
            Done::Redeem(_, r) => r.is_err(),
            Done::Count(_, r) => r.is_err(),
            Done::Purge(_, r) => r.is_err(),
            Done::Job(j) => j.is_err(),
        }
    }

    /// The batch did not commit: replace the result with `Unavailable(msg)`.
    fn fail(self, msg: &str) -> Done {
        match self {
            Done::Unit(tx, _) => Done::Unit(tx, unavailable(msg)),
            Done::Revoke(tx, _) => Done::Revoke(tx, unavailable(msg)),
            Done::Redeem(tx, _) => Done::Redeem(tx, unavailable(msg)),
            Done::Count(tx, _) => Done::Count(tx, unavailable(msg)),
            Done::Purge(tx, _) => Done::Purge(tx, unavailable(msg)),
            Done::Job(j) => Done::Job(j.fail(msg)),
        }
    }

    /// Delivers the result. A caller that stopped waiting is not an error:
    /// the write happened (or not) regardless.
    fn send(self) {
        match self {
            Done::Unit(tx, r) => drop(tx.send(r)),
            Done::Revoke(tx, r) => drop(tx.send(r)),
            Done::Redeem(tx, r) => drop(tx.send(r)),
            Done::Count(tx, r) => drop(tx.send(r)),
            Done::Purge(tx, r) => drop(tx.send(r)),
            Done::Job(j) => j.send(),
        }
    }
}

/// Runs one parameterless statement through the statement cache: the
/// writer's transaction control runs several times per batch, and parsing
/// it each time (`execute_batch`) was a measurable share of its CPU.
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Owns the write connection, the in-memory audit chain head and the
/// background checkpoint thread.
struct Writer {
    conn: Connection,
    head: ChainHead,
    opts: SqliteOptions,
    /// The checkpoint thread; it ends once the WAL hook (which holds its
    /// wake-up sender) is removed, see `Drop`.
    checkpointer: Option<JoinHandle<()>>,
    checkpoints: Arc<CheckpointStats>,
}

impl Writer {
    fn open(path: &Path, opts: SqliteOptions) -> Result<Self, StoreError> {
        let mut conn = open_writer_conn(path)?;
        let head = load_head(&conn)?;
        let stats = Arc::new(CheckpointStats::default());
        let checkpointer = if opts.background_checkpoints {
            let ckpt = open_checkpoint_conn(path)?;
            let (wake, woken) = mpsc::sync_channel(1);
            let counts = Arc::clone(&stats);
            let handle = std::thread::Builder::new()
                .name("sigil-store-ckpt".into())
                .spawn(move || run_checkpointer(&ckpt, &woken, &counts))
                .map_err(|e| {
                    StoreError::Unavailable(format!("cannot start checkpoint thread: {e}"))
                })?;
            let counts = Arc::clone(&stats);
            install_wal_hook(&mut conn, opts.checkpoint_pages, Some(wake), counts)?;
            Some(handle)
        } else {
            install_wal_hook(&mut conn, opts.checkpoint_pages, None, Arc::clone(&stats))?;
            None
        };
        Ok(Self {
            conn,
            head,
            opts,
            checkpointer,
            checkpoints: stats,
        })
    }

    /// The thread body: until every sender is gone and the queue is empty.
    fn run(mut self, rx: &mpsc::Receiver<Op>) {
        let max = if self.opts.group_commit {
            self.opts.max_batch.max(1)
        } else {
            1
        };
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::with_capacity(max.min(64));
            batch.push(first);
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // A panic in an op (a bug) ends its batch, not the writer: the
            // unwinding drops the batch's replies (their callers get
            // `Unavailable`), and what the batch had written is rolled back.
            let start = self.head.clone();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_batch(batch, &start);
            }));
            if ran.is_err() {
                tracing::error!("store write batch panicked; its writes were rolled back");
                self.fail_batch(std::iter::empty(), &start, "panicked");
            }
        }
    }

    /// Applies `ops` in one transaction, commits, then replies to each.
    /// `start_head` is the chain head as committed before the batch.
    fn run_batch(&mut self, ops: Vec<Op>, start_head: &ChainHead) {
        if let Err(e) = exec_cached(&self.conn, "BEGIN IMMEDIATE") {
            tracing::error!(error = %e, ops = ops.len(), "store batch could not begin");
            for op in ops {
                op.fail("could not begin transaction").send();
            }
            return;
        }
        let mut done = Vec::with_capacity(ops.len());
        let mut ops = ops.into_iter();
        let mut aborted = None;
        for op in ops.by_ref() {
            let before = self.head.clone();
            if let Err(e) = exec_cached(&self.conn, "SAVEPOINT op") {
                aborted = Some(e.to_string());
                done.push(op.fail("transaction aborted"));
                break;
            }
            let d = op.apply(&self.conn, &mut self.head);
            let failed = d.is_err();
            done.push(d);
            let end = if failed {
                self.head = before;
                if self.conn.is_autocommit() {
                    // SQLite rolled back the whole transaction (e.g. I/O
                    // error, disk full): earlier ops of the batch are lost too.
                    Err("transaction rolled back by SQLite".to_owned())
                } else {
                    exec_cached(&self.conn, "ROLLBACK TO op")
                        .and_then(|()| exec_cached(&self.conn, "RELEASE op"))
                        .map_err(|e| e.to_string())
                }
            } else {
                exec_cached(&self.conn, "RELEASE op").map_err(|e| e.to_string())
            };
            if let Err(e) = end {
                aborted = Some(e);
                break;
            }
        }
        if let Some(e) = aborted {
            tracing::error!(error = %e, "store batch aborted");
            let rest: Vec<Done> = ops.map(|op| op.fail("transaction aborted")).collect();
            self.fail_batch(
                done.into_iter().chain(rest),
                start_head,
                "transaction aborted",
            );
            return;
        }
        let committing = std::time::Instant::now();
        let commit = exec_cached(&self.conn, "COMMIT");
        let m = crate::metrics::global();
        m.observe(
            "sigil_store_commit_seconds",
            &[("backend", "sqlite")],
            crate::metrics::LATENCY_BUCKETS,
            committing.elapsed().as_secs_f64(),
        );
        m.observe(
            "sigil_store_batch_size",
            &[("backend", "sqlite")],
            crate::metrics::SIZE_BUCKETS,
            done.len() as f64,
        );
        if let Err(e) = commit {
            tracing::error!(error = %e, ops = done.len(), "store batch failed to commit");
            self.fail_batch(done, start_head, "commit failed");
            return;
        }
        for d in done {
            d.send();
        }
    }

    /// Rolls back whatever is open, restores the chain head to what is
    /// committed and replies `Unavailable` to every op of the batch.
    fn fail_batch(&mut self, done: impl IntoIterator<Item = Done>, start: &ChainHead, msg: &str) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::error!(error = %e, "store rollback failed");
            }
        }
        // The database is the truth; the batch-start copy is what it held.
        self.head = match load_head(&self.conn) {
            Ok(h) => h,
            Err(_) => start.clone(),
        };
        for d in done {
            d.fail(msg).send();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Removing the hook drops the checkpoint thread's only wake-up
        // sender: the thread finishes its current pass and ends.
        type Hook = fn(&mut rusqlite::hooks::Wal, i32) -> rusqlite::Result<()>;
        if let Err(e) = self.conn.wal_hook(None::<Hook>) {
            tracing::error!(error = %e, "could not remove the store WAL hook");
        }
        if let Some(handle) = self.checkpointer.take() {
            if handle.join().is_err() {
                tracing::error!("store checkpoint thread panicked");
            }
        }
    }
}

// === Write operations (inside the writer's transaction) ===

fn create_token(
    conn: &Connection,
    head: &mut ChainHead,
    token: &TokenRecord,
    audit: &AuditRecord,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO tokens (token_id, spiffe_id, created_at_ms, expires_at_ms, max_uses, uses, \
         revoked_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    stmt.execute(params![
        token.token_id,
        token.spiffe_id,
        token.created_at_ms,
        token.expires_at_ms,
        token.max_uses,
        token.uses,
        token.revoked_at_ms,
    ])?;
    append_audit(conn, head, audit)?;
    Ok(())
}

fn revoke_token(
    conn: &Connection,
    head: &mut ChainHead,
    token_id: &str,
    now_ms: i64,
    audit: &AuditRecord,
) -> Result<RevokeOutcome, StoreError> {
    let revoked: Option<Option<i64>> = conn
        .prepare_cached("SELECT revoked_at_ms FROM tokens WHERE token_id = ?1")?
        .query_row([token_id], |r| r.get(0))
        .optional()?;
    match revoked {
        None => Ok(RevokeOutcome::Unknown),
        Some(Some(_)) => Ok(RevokeOutcome::AlreadyRevoked),
        Some(None) => {
            conn.prepare_cached("UPDATE tokens SET revoked_at_ms = ?2 WHERE token_id = ?1")?
                .execute(params![token_id, now_ms])?;
            append_audit(conn, head, audit)?;
            Ok(RevokeOutcome::Revoked)
        }
    }
}

/// The ordered checks documented on [`Store::redeem_token`]. The writer
/// thread runs one op at a time, so nothing can change between a check and
/// the write that follows it.
fn redeem_token(
    conn: &Connection,
    head: &mut ChainHead,
    r: &Redemption,
) -> Result<RedeemOutcome, StoreError> {
    // 1. A remembered nonce, whatever token it was used with.
    let seen = conn
        .prepare_cached("SELECT 1 FROM nonces WHERE nonce = ?1")?
        .query_row([&r.nonce], |_| Ok(()))
        .optional()?;
    if seen.is_some() {
        return Ok(RedeemOutcome::NonceReplayed);
    }
    // 2. Token state.
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = ?1");
    let Some(token) = conn
        .prepare_cached(&sql)?
        .query_row([&r.token_id], token_from_row)
        .optional()?
    else {
        return Ok(RedeemOutcome::TokenUnknown);
    };
    if token.revoked_at_ms.is_some() {
        return Ok(RedeemOutcome::TokenRevoked);
    }
    // 3. A lost response retried with the same key gets the same certificate.
    // Only a token that was used can have one: a first redemption (nearly
    // every one) skips the lookup, a random leaf of a large index.
    let retried = if token.uses > 0 {
        valid_cert_for_key(conn, &r.token_id, &r.cert.spki_sha256, r.now_ms)?
    } else {
        None
    };
    if let Some(cert) = retried {
        remember_nonce(conn, &r.nonce, r.nonce_expires_at_ms)?;
        return Ok(RedeemOutcome::Retried(cert));
    }
    // 4–5.
    if r.now_ms >= token.expires_at_ms {
        return Ok(RedeemOutcome::TokenExpired);
    }
    if token.uses >= token.max_uses {
        return Ok(RedeemOutcome::TokenAlreadyUsed);
    }
    // 6. Win.
    remember_nonce(conn, &r.nonce, r.nonce_expires_at_ms)?;
    conn.prepare_cached("UPDATE tokens SET uses = uses + 1 WHERE token_id = ?1")?
        .execute([&r.token_id])?;
    let c = &r.cert;
    // The certificate is recorded against the token that paid for it, so
    // step 3 finds it on a retry whatever `cert.token_id` said.
    insert_issued(conn, c, Some(&r.token_id))?;
    append_audit(conn, head, &r.audit)?;
    Ok(RedeemOutcome::Issued)
}

fn remember_nonce(conn: &Connection, nonce: &str, expires_at_ms: i64) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT INTO nonces (nonce, expires_at_ms) VALUES (?1, ?2)")?
        .execute(params![nonce, expires_at_ms])?;
    Ok(())
}

/// The certificates of token `?1` for key `?2`, through the retry index:
/// the token's creation time leads it (schema 9).
fn retry_lookup_sql() -> String {
    format!(
        "SELECT {ISSUED_COLUMNS}, rowid FROM issued WHERE token_created_ms = \
         (SELECT created_at_ms FROM tokens WHERE token_id = ?1) \
         AND token_id = ?1 AND spki_sha256 = ?2"
    )
}

/// The newest certificate issued for `token_id` to `spki_sha256` that is
/// still valid at `now_ms`. Shared by the read path and redemption step 3.
fn valid_cert_for_key(
    conn: &Connection,
    token_id: &str,
    spki_sha256: &str,
    now_ms: i64,
) -> rusqlite::Result<Option<IssuedCert>> {
    // No range term on `not_after_ms` in SQL: with one, SQLite re-prepares
    // the statement on every new bound value (a parse per redemption). The
    // index gives the few rows of this (token, key); the newest valid one
    // wins, ties broken by the later insert, as an `ORDER BY` would.
    let mut stmt = conn.prepare_cached(&retry_lookup_sql())?;
    let mut rows = stmt.query(params![token_id, spki_sha256])?;
    let mut best: Option<(i64, i64, IssuedCert)> = None;
    while let Some(row) = rows.next()? {
        let cert = issued_from_row(row)?;
        if cert.not_after_ms <= now_ms {
            continue;
        }
        let rowid: i64 = row.get(ISSUED_COLUMN_COUNT)?;
        let newer = best
            .as_ref()
            .is_none_or(|(at, id, _)| (cert.issued_at_ms, rowid) > (*at, *id));
        if newer {
            best = Some((cert.issued_at_ms, rowid, cert));
        }
    }
    Ok(best.map(|(_, _, c)| c))
}

/// Links `audit` to the chain head and inserts it; advances the head.
fn append_audit(
    conn: &Connection,
    head: &mut ChainHead,
    audit: &AuditRecord,
) -> Result<u64, StoreError> {
    let seq = head
        .seq
        .checked_add(1)
        .ok_or_else(|| StoreError::Corrupt("audit sequence exhausted".into()))?;
    let fields_json = audit.fields_json();
    let hash = audit::chain_hash(
        &head.hash,
        seq,
        audit.time_ms,
        &audit.kind,
        &audit.outcome,
        &fields_json,
    );
    conn.prepare_cached(
        "INSERT INTO audit (seq, time_ms, kind, outcome, fields_json, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        to_i64(seq)?,
        audit.time_ms,
        audit.kind,
        audit.outcome,
        fields_json,
        head.hash,
        hash,
    ])?;
    *head = ChainHead { seq, hash };
    Ok(seq)
}

/// Rows of the nonce table one purge round walks, in key order.
const NONCE_SWEEP_SPAN: i64 = 4096;

/// What one purge round did.
#[derive(Debug)]
struct PurgeRound {
    /// Rows deleted, all tables.
    deleted: u64,
    /// Where the nonce sweep goes on; `None`: it reached the end (or was done).
    next: Option<String>,
    /// Revocations or challenges deleted a whole chunk: there may be more.
    others_full: bool,
}

/// One round of [`Store::purge_expired`]: the next [`NONCE_SWEEP_SPAN`]
/// nonces after `from` (if the sweep is not done), and at most
/// [`super::PURGE_CHUNK`] expired revocations and challenges, found through
/// their `expires_at_ms` indexes.
fn purge_expired(
    conn: &Connection,
    now_ms: i64,
    from: Option<&str>,
) -> Result<PurgeRound, StoreError> {
    let (nonces, next) = match from {
        Some(from) => purge_nonces(conn, now_ms, from)?,
        None => (0, None),
    };
    let chunk = i64::from(super::PURGE_CHUNK);
    let revocations = conn
        .prepare_cached(
            "DELETE FROM revocations WHERE rowid IN \
             (SELECT rowid FROM revocations \
              WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1 LIMIT ?2)",
        )?
        .execute([now_ms, chunk])?;
    let challenges = conn
        .prepare_cached(
            "DELETE FROM challenges WHERE nonce IN \
             (SELECT nonce FROM challenges WHERE expires_at_ms <= ?1 LIMIT ?2)",
        )?
        .execute([now_ms, chunk])?;
    let full = usize::try_from(chunk).unwrap_or(usize::MAX);
    Ok(PurgeRound {
        deleted: nonces + to_count(revocations)? + to_count(challenges)?,
        next,
        others_full: revocations >= full || challenges >= full,
    })
}

/// Deletes the expired nonces among the next [`NONCE_SWEEP_SPAN`] keys after
/// `from`; returns how many, and the last key walked (`None` at the end).
///
/// Nonces are random, so the rows that expire in one maintenance tick are
/// spread over every leaf of the table. Deleting them in expiry order (as
/// before schema version 8) dirtied one leaf per row, written to the WAL and
/// checkpointed once per round: at 5,000 enrollments/s, ~150,000 page writes
/// per 30 s tick, as many as the inserts. Walking the table in key order
/// writes each leaf once per tick whatever number of its rows expired (about
/// 1 in 12 with a 30 s tick and a 6 min lifetime), and needs no expiry index.
fn purge_nonces(
    conn: &Connection,
    now_ms: i64,
    from: &str,
) -> Result<(u64, Option<String>), StoreError> {
    let bound: Option<String> = conn
        .prepare_cached(
            "SELECT nonce FROM nonces WHERE nonce > ?1 ORDER BY nonce LIMIT 1 OFFSET ?2",
        )?
        .query_row(params![from, NONCE_SWEEP_SPAN - 1], |r| r.get(0))
        .optional()?;
    let n = match &bound {
        Some(to) => conn
            .prepare_cached(
                "DELETE FROM nonces WHERE nonce > ?1 AND nonce <= ?2 AND expires_at_ms <= ?3",
            )?
            .execute(params![from, to, now_ms])?,
        None => conn
            .prepare_cached("DELETE FROM nonces WHERE nonce > ?1 AND expires_at_ms <= ?2")?
            .execute(params![from, now_ms])?,
    };
    Ok((to_count(n)?, bound))
}

fn to_count(n: usize) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt("row count out of range".into()))
}

// === Revocations and renewals ===

fn revoke(
    conn: &Connection,
    head: &mut ChainHead,
    r: &RevocationRecord,
    audit: &AuditRecord,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO revocations (kind, value, revoked_at_ms, expires_at_ms, reason) \
         VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (kind, value) DO UPDATE SET \
           revoked_at_ms = MAX(revoked_at_ms, excluded.revoked_at_ms), \
           expires_at_ms = CASE WHEN expires_at_ms IS NULL OR excluded.expires_at_ms IS NULL \
                           THEN NULL ELSE MAX(expires_at_ms, excluded.expires_at_ms) END, \
           reason = excluded.reason",
    )?
    .execute(params![
        r.kind.as_str(),
        r.value,
        r.revoked_at_ms,
        r.expires_at_ms,
        r.reason
    ])?;
    append_audit(conn, head, audit)?;
    Ok(())
}

fn is_revoked(conn: &Connection, serial: &str) -> rusqlite::Result<bool> {
    let sql = format!("SELECT {COVERED} FROM issued c WHERE c.serial = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([serial], |r| r.get::<_, bool>(0))
        .optional()?
        .unwrap_or(false))
}

fn renew_cert(
    conn: &Connection,
    head: &mut ChainHead,
    r: &Renewal,
) -> Result<RenewOutcome, StoreError> {
    let sql = format!("SELECT {ISSUED_COLUMNS} FROM issued WHERE serial = ?1");
    let Some(parent) = conn
        .prepare_cached(&sql)?
        .query_row([&r.parent_serial], issued_from_row)
        .optional()?
    else {
        return Ok(RenewOutcome::UnknownParent);
    };
    if is_revoked(conn, &r.parent_serial)? {
        return Ok(RenewOutcome::Revoked);
    }
    let mut cert = r.cert.clone();
    // Renewals inherit how the identity was established; a certificate an
    // agent obtained for a workload keeps its `delegated:` origin.
    if !cert.origin.starts_with("delegated:") {
        cert.origin = parent.origin;
    }
    cert.node = parent.node;
    insert_issued(conn, &cert, parent.token_id.as_deref())?;
    append_audit(conn, head, &r.audit)?;
    Ok(RenewOutcome::Issued)
}

// === Attestation ===

fn redeem_attestation(
    conn: &Connection,
    head: &mut ChainHead,
    r: &AttestRedemption,
) -> Result<AttestOutcome, StoreError> {
    match &r.guard {
        AttestGuard::Challenge(nonce) => {
            let row: Option<(i64, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT expires_at_ms, used_at_ms FROM challenges WHERE nonce = ?1",
                )?
                .query_row([nonce], |x| Ok((x.get(0)?, x.get(1)?)))
                .optional()?;
            match row {
                None => return Ok(AttestOutcome::ChallengeUnknown),
                Some((_, Some(_))) => return Ok(AttestOutcome::Replayed),
                Some((exp, None)) if r.now_ms >= exp => return Ok(AttestOutcome::ChallengeExpired),
                Some(_) => {}
            }
            conn.prepare_cached("UPDATE challenges SET used_at_ms = ?2 WHERE nonce = ?1")?
                .execute(params![nonce, r.now_ms])?;
        }
        AttestGuard::OneUse { key, expires_at_ms } => {
            let seen = conn
                .prepare_cached("SELECT 1 FROM nonces WHERE nonce = ?1")?
                .query_row([key], |_| Ok(()))
                .optional()?;
            if seen.is_some() {
                return Ok(AttestOutcome::Replayed);
            }
            remember_nonce(conn, key, *expires_at_ms)?;
        }
    }
    insert_issued(conn, &r.cert, None)?;
    append_audit(conn, head, &r.audit)?;
    Ok(AttestOutcome::Issued)
}

// === Plans ===

fn load_plan(conn: &Connection, version: i64) -> Result<Option<PlanRecord>, StoreError> {
    let sql = format!("SELECT {PLAN_COLUMNS} FROM plans WHERE version = ?1");
    let row = conn
        .prepare_cached(&sql)?
        .query_row([version], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })
        .optional()?;
    let Some((v, sha256, canonical_json, state, proposer, created, expires, activated, req)) = row
    else {
        return Ok(None);
    };
    let state = PlanState::parse(&state)
        .ok_or_else(|| StoreError::Corrupt(format!("plan {v} has unknown state")))?;
    let approvals = conn
        .prepare_cached(
            "SELECT approver FROM plan_approvals WHERE version = ?1 ORDER BY at_ms, rowid",
        )?
        .query_map([v], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(PlanRecord {
        version: to_u64(v)?,
        sha256,
        canonical_json,
        state,
        proposer,
        created_at_ms: created,
        expires_at_ms: expires,
        activated_at_ms: activated,
        required_approvals: u32::try_from(req)
            .map_err(|_| StoreError::Corrupt("required_approvals out of range".into()))?,
        approvals,
    }))
}

fn active_version(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT version FROM plans WHERE state = 'active'")?
        .query_row([], |r| r.get(0))
        .optional()
}

fn next_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(version), 0) + 1 FROM plans")?
        .query_row([], |r| r.get(0))
}

#[allow(clippy::too_many_arguments)]
fn insert_plan(
    conn: &Connection,
    version: i64,
    sha256: &str,
    json: &str,
    state: PlanState,
    proposer: &str,
    now_ms: i64,
    expires_at_ms: i64,
    required: u32,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO plans (version, sha256, canonical_json, state, proposer, created_at_ms, \
         expires_at_ms, activated_at_ms, required_approvals) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8)",
    )?
    .execute(params![
        version,
        sha256,
        json,
        state.as_str(),
        proposer,
        now_ms,
        expires_at_ms,
        required
    ])?;
    conn.prepare_cached(
        "INSERT INTO plan_approvals (version, approver, at_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![version, proposer, now_ms])?;
    Ok(())
}

/// Makes `version` the active plan: the old one is superseded, every other
/// pending proposal becomes stale (it was checked against the old plan).
fn activate(conn: &Connection, version: i64, now_ms: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE plans SET state = 'superseded' WHERE state = 'active'")?
        .execute([])?;
    conn.prepare_cached(
        "UPDATE plans SET state = 'stale' WHERE state = 'pending' AND version <> ?1",
    )?
    .execute([version])?;
    conn.prepare_cached(
        "UPDATE plans SET state = 'active', activated_at_ms = ?2 WHERE version = ?1",
    )?
    .execute(params![version, now_ms])?;
    Ok(())
}

fn bootstrap_plan(
    conn: &Connection,
    head: &mut ChainHead,
    b: &BootstrapInstall,
) -> Result<BootstrapOutcome, StoreError> {
    let seen = conn
        .prepare_cached("SELECT 1 FROM nonces WHERE nonce = ?1")?
        .query_row([&b.nonce], |_| Ok(()))
        .optional()?;
    if seen.is_some() {
        return Ok(BootstrapOutcome::NonceReplayed);
    }
    let ever_active = conn
        .prepare_cached("SELECT 1 FROM plans WHERE activated_at_ms IS NOT NULL LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?;
    if ever_active.is_some() {
        return Ok(BootstrapOutcome::Disabled);
    }
    let version = next_version(conn)?;
    insert_plan(
        conn,
        version,
        &b.sha256,
        &b.canonical_json,
        PlanState::Pending,
        "bootstrap",
        b.now_ms,
        b.now_ms,
        1,
    )?;
    activate(conn, version, b.now_ms)?;
    remember_nonce(conn, &b.nonce, b.nonce_expires_at_ms)?;
    create_token(conn, head, &b.admin_token, &b.audit)?;
    Ok(BootstrapOutcome::Installed {
        version: to_u64(version)?,
    })
}

fn propose_plan(
    conn: &Connection,
    head: &mut ChainHead,
    p: &PlanProposal,
) -> Result<ProposeOutcome, StoreError> {
    let active = active_version(conn)?;
    let based_on = p.based_on.map(to_i64).transpose()?;
    if active != based_on {
        return Ok(ProposeOutcome::Stale);
    }
    let version = next_version(conn)?;
    insert_plan(
        conn,
        version,
        &p.sha256,
        &p.canonical_json,
        PlanState::Pending,
        &p.proposer,
        p.now_ms,
        p.expires_at_ms,
        p.required_approvals,
    )?;
    let mut audit = p.audit.clone();
    audit.fields.insert("version".into(), version.into());
    append_audit(conn, head, &audit)?;
    let version_u = to_u64(version)?;
    if p.required_approvals <= 1 {
        activate(conn, version, p.now_ms)?;
        let mut audit = p.activation_audit.clone();
        audit.fields.insert("version".into(), version.into());
        append_audit(conn, head, &audit)?;
        return Ok(ProposeOutcome::Activated { version: version_u });
    }
    Ok(ProposeOutcome::Pending {
        version: version_u,
        approvals: 1,
    })
}

fn approve_plan(
    conn: &Connection,
    head: &mut ChainHead,
    a: &PlanApproval,
) -> Result<ApproveOutcome, StoreError> {
    let v = to_i64(a.version)?;
    let Some(plan) = load_plan(conn, v)? else {
        return Ok(ApproveOutcome::NotFound);
    };
    if plan.state != PlanState::Pending {
        return Ok(ApproveOutcome::NotPending);
    }
    if a.now_ms >= plan.expires_at_ms {
        return Ok(ApproveOutcome::Expired);
    }
    if plan.sha256 != a.sha256 {
        return Ok(ApproveOutcome::HashMismatch);
    }
    if plan.approvals.iter().any(|x| x == &a.approver) {
        return Ok(ApproveOutcome::AlreadyApproved);
    }
    conn.prepare_cached(
        "INSERT INTO plan_approvals (version, approver, at_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![v, a.approver, a.now_ms])?;
    append_audit(conn, head, &a.audit)?;
    let approvals = u32::try_from(plan.approvals.len() + 1).unwrap_or(u32::MAX);
    if approvals >= plan.required_approvals {
        activate(conn, v, a.now_ms)?;
        append_audit(conn, head, &a.activation_audit)?;
        return Ok(ApproveOutcome::Activated);
    }
    Ok(ApproveOutcome::Pending {
        approvals,
        required: plan.required_approvals,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::oneshot;

    use super::*;
    use crate::audit::AuditKind;
    use crate::store::conformance::{self, redemption, token, NOW};

    fn opts(group_commit: bool, max_batch: usize) -> SqliteOptions {
        SqliteOptions {
            group_commit,
            max_batch,
            ..SqliteOptions::default()
        }
    }

    fn open_in(dir: &tempfile::TempDir, o: SqliteOptions) -> SqliteStore {
        SqliteStore::open(&dir.path().join("sigil.db"), o).expect("open")
    }

    /// Creates `t`.
    async fn create(store: &SqliteStore, t: &TokenRecord) {
        store
            .create_token(
                t.clone(),
                AuditRecord::new(NOW, AuditKind::TokenCreated, "ok"),
            )
            .await
            .unwrap();
    }

    /// Creates `t` and redeems it with `r`, which must issue.
    async fn create_and_redeem(store: &SqliteStore, t: &TokenRecord, r: &Redemption) {
        create(store, t).await;
        assert_eq!(
            store.redeem_token(r.clone()).await.unwrap(),
            RedeemOutcome::Issued
        );
    }

    fn record(i: u64) -> AuditRecord {
        AuditRecord::new(NOW, AuditKind::Denied, "test").field("i", i)
    }

    /// One test per conformance check, each on a fresh store.
    macro_rules! conformance_tests {
        ($($check:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $check() {
                let dir = tempfile::tempdir().unwrap();
                let store = open_in(&dir, SqliteOptions::default());
                conformance::$check(&store).await;
                store.close().await;
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
    async fn conformance_on_one_store_with_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, SqliteOptions::default());
        conformance::run_all(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn conformance_without_group_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, opts(false, 256));
        conformance::run_all(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn conformance_with_tiny_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, opts(true, 2));
        conformance::run_all(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn schema_is_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sigil.db");
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        store.close().await;
        drop(store);
        {
            let c = Connection::open(&path).unwrap();
            let v: i64 = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, MIGRATIONS.len() as i64);
            let mode: String = c
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
        // Reopening an up-to-date file applies nothing and works.
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        assert_eq!(store.counts().await.unwrap(), StoreCounts::default());
        store.close().await;
        drop(store);
        // A file from a newer build is refused, not misread.
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        let err = SqliteStore::open(&path, SqliteOptions::default()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    }

    /// Schema 9 keys the retry index by the token's creation time: a store
    /// written at schema 8 migrates (existing certificates take their
    /// token's time), a lost response is still answered with the same
    /// certificate after the upgrade, renewals recorded against the token
    /// are found too, and the lookup uses the new index, not a scan.
    #[tokio::test]
    async fn schema_9_moves_the_retry_index_and_retries_survive_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sigil.db");
        let t = token("upgrade", 1, conformance::NOW);
        let first = redemption("upgrade", "k1", "upgrade-n1", NOW);
        {
            let store = open_in(&dir, SqliteOptions::default());
            create_and_redeem(&store, &t, &first).await;
            store.close().await;
        }
        // Back to a schema 8 file, as the previous release wrote it.
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "DROP INDEX issued_token_key;
                 ALTER TABLE issued DROP COLUMN token_created_ms;
                 CREATE INDEX issued_token_spki ON issued (token_id, spki_sha256);
                 PRAGMA user_version = 8;",
            )
            .unwrap();
        }
        let store = open_in(&dir, SqliteOptions::default());
        let later = NOW + 1000;
        let retry = redemption("upgrade", "k1", "upgrade-n2", later);
        let want = store
            .fetch_issued(&first.cert.serial)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.redeem_token(retry).await.unwrap(),
            RedeemOutcome::Retried(want.clone())
        );
        assert_eq!(
            store
                .fetch_issued_for_token(&t.token_id, &first.cert.spki_sha256, later)
                .await
                .unwrap(),
            Some(want)
        );
        // Another key is still refused: the token is used.
        assert_eq!(
            store
                .redeem_token(redemption("upgrade", "k2", "upgrade-n3", later))
                .await
                .unwrap(),
            RedeemOutcome::TokenAlreadyUsed
        );
        store.close().await;
        drop(store);
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let created: Option<i64> = c
            .query_row(
                "SELECT token_created_ms FROM issued WHERE serial = ?1",
                [&first.cert.serial],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(created, Some(t.created_at_ms));
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {}", retry_lookup_sql()))
            .unwrap()
            .query_map(params!["x", "y"], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("USING INDEX issued_token_key")),
            "{plan:?}"
        );
    }

    #[tokio::test]
    async fn reopen_keeps_tokens_nonces_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let t = token("durable", 1, conformance::NOW);
        let first = redemption("durable", "k1", "durable-n1", NOW);
        let before = {
            let store = open_in(&dir, SqliteOptions::default());
            create_and_redeem(&store, &t, &first).await;
            store.append_audit(record(1)).await.unwrap();
            let counts = store.counts().await.unwrap();
            store.close().await;
            counts
        };
        assert_eq!(before.audit, 3);

        let store = open_in(&dir, SqliteOptions::default());
        assert_eq!(store.counts().await.unwrap(), before);
        let got = store.fetch_token(&t.token_id).await.unwrap().unwrap();
        assert_eq!(got.uses, 1);
        assert!(store
            .fetch_issued(&first.cert.serial)
            .await
            .unwrap()
            .is_some());
        // The nonce is still remembered; the used token is still used.
        assert_eq!(
            store.redeem_token(first.clone()).await.unwrap(),
            RedeemOutcome::NonceReplayed
        );
        assert_eq!(
            store
                .redeem_token(redemption("durable", "k2", "durable-n2", NOW))
                .await
                .unwrap(),
            RedeemOutcome::TokenAlreadyUsed
        );
        // The chain continues from the stored head.
        assert_eq!(store.append_audit(record(2)).await.unwrap(), 4);
        let rows = conformance::all_audit(&store).await;
        assert_eq!(rows.len(), 4);
        store.close().await;
        drop(store);

        // Once more, after a plain drop instead of close.
        let store = open_in(&dir, SqliteOptions::default());
        assert_eq!(store.append_audit(record(3)).await.unwrap(), 5);
        drop(store);
        let store = open_in(&dir, SqliteOptions::default());
        assert_eq!(conformance::all_audit(&store).await.len(), 5);
        store.close().await;
    }

    #[tokio::test]
    async fn writes_after_close_are_refused_and_reads_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, SqliteOptions::default());
        store.append_audit(record(1)).await.unwrap();
        store.close().await;
        store.close().await; // idempotent
        match store.append_audit(record(2)).await {
            Err(StoreError::Unavailable(m)) => assert_eq!(m, "closed"),
            other => panic!("expected Unavailable(closed), got {other:?}"),
        }
        let t = token("closed", 1, conformance::NOW);
        let audit = AuditRecord::new(NOW, AuditKind::TokenCreated, "ok");
        assert!(matches!(
            store.create_token(t, audit).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            store.purge_expired(NOW).await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(store.counts().await.unwrap().audit, 1);
    }

    /// Writes racing with `close` either succeed durably or are refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn close_drains_accepted_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open_in(&dir, SqliteOptions::default()));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = Arc::clone(&store);
                tokio::spawn(async move { s.append_audit(record(i)).await })
            })
            .collect();
        tokio::task::yield_now().await;
        store.close().await;
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Unavailable(m)) => assert_eq!(m, "closed"),
                Err(e) => panic!("{e:?}"),
            }
        }
        drop(store);
        let store = open_in(&dir, SqliteOptions::default());
        assert_eq!(conformance::all_audit(&store).await.len(), ok);
        store.close().await;
    }

    /// The race on real tokio tasks across worker threads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 8)]
    async fn concurrent_tasks_redeem_one_use_token_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open_in(&dir, SqliteOptions::default()));
        let t = token("tasks", 1, conformance::NOW);
        create(&store, &t).await;
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = Arc::clone(&store);
                let r = redemption("tasks", &format!("k{i}"), &format!("tasks-n{i}"), NOW);
                tokio::spawn(async move { s.redeem_token(r).await })
            })
            .collect();
        let mut issued = 0;
        let mut used = 0;
        for t in tasks {
            match t.await.unwrap().unwrap() {
                RedeemOutcome::Issued => issued += 1,
                RedeemOutcome::TokenAlreadyUsed => used += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((issued, used), (1, 63));
        let c = store.counts().await.unwrap();
        assert_eq!((c.nonces, c.issued, c.audit), (1, 1, 2));
        store.close().await;
    }

    /// Concurrent creates with one duplicate id: the duplicate fails alone.
    #[tokio::test]
    async fn failing_op_in_concurrent_batch_leaves_others_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, SqliteOptions::default());
        let mut toks: Vec<TokenRecord> = (0..20)
            .map(|i| token(&format!("batch-{i}"), 1, 1))
            .collect();
        toks.push(toks[7].clone());
        let futs = toks
            .iter()
            .map(|t| {
                let audit = AuditRecord::new(NOW, AuditKind::TokenCreated, "ok")
                    .field("token_id", t.token_id.clone());
                store.create_token(t.clone(), audit)
            })
            .collect();
        let outs = conformance::join_all(futs).await;
        let conflicts = outs
            .iter()
            .filter(|o| matches!(o, Err(StoreError::Conflict(_))))
            .count();
        assert_eq!(conflicts, 1);
        assert_eq!(outs.iter().filter(|o| o.is_ok()).count(), 20);
        let c = store.counts().await.unwrap();
        assert_eq!((c.tokens, c.audit), (20, 20));
        conformance::all_audit(&store).await;
        store.close().await;
    }

    // --- Batches driven directly on a writer, so their composition is exact.

    fn writer_in(dir: &tempfile::TempDir) -> Writer {
        Writer::open(&dir.path().join("sigil.db"), SqliteOptions::default()).unwrap()
    }

    fn append_op(i: u64) -> (Op, oneshot::Receiver<Result<u64, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Op::AppendAudit {
                audit: record(i),
                reply,
            },
            rx,
        )
    }

    fn create_op(label: &str) -> (Op, oneshot::Receiver<Result<(), StoreError>>) {
        let (reply, rx) = oneshot::channel();
        let t = token(label, 1, 1);
        let audit = AuditRecord::new(NOW, AuditKind::TokenCreated, "ok")
            .field("token_id", t.token_id.clone());
        (
            Op::CreateToken {
                token: t,
                audit,
                reply,
            },
            rx,
        )
    }

    fn chain_of(conn: &Connection) -> Vec<AuditRow> {
        let mut stmt = conn
            .prepare(&format!("SELECT {AUDIT_COLUMNS} FROM audit ORDER BY seq"))
            .unwrap();
        let rows = stmt.query_map([], audit_from_row).unwrap();
        rows.collect::<Result<Vec<_>, _>>().unwrap()
    }

    #[test]
    fn erroring_op_rolls_back_alone_within_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_in(&dir);
        let (a1, r1) = append_op(1);
        let (c1, rc1) = create_op("one");
        let (c2, rc2) = create_op("one"); // duplicate: Conflict
        let (a2, r2) = append_op(2);
        let start = w.head.clone();
        w.run_batch(vec![a1, c1, c2, a2], &start);
        assert_eq!(r1.blocking_recv().unwrap().unwrap(), 1);
        rc1.blocking_recv().unwrap().unwrap();
        assert!(matches!(
            rc2.blocking_recv().unwrap(),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(r2.blocking_recv().unwrap().unwrap(), 3);
        let rows = chain_of(&w.conn);
        assert_eq!(audit::verify_chain(&rows), Ok(3));
        assert_eq!(w.head, load_head(&w.conn).unwrap());
    }

    /// A batch whose COMMIT fails replies `Unavailable` to every op, keeps
    /// nothing, and the next batch continues the committed chain.
    #[test]
    fn failed_commit_fails_whole_batch_and_resets_chain_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_in(&dir);
        let (a0, r0) = append_op(0);
        let start = w.head.clone();
        w.run_batch(vec![a0], &start);
        assert_eq!(r0.blocking_recv().unwrap().unwrap(), 1);
        let committed = w.head.clone();

        // A deferred foreign-key violation, triggered by a 'boom' audit row,
        // lets every statement succeed and makes COMMIT fail.
        w.conn
            .execute_batch(
                "CREATE TEMP TABLE p (id INTEGER PRIMARY KEY);
                 CREATE TEMP TABLE c (pid INTEGER REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED);
                 CREATE TEMP TRIGGER boom AFTER INSERT ON main.audit WHEN NEW.outcome = 'boom'
                 BEGIN INSERT INTO c (pid) VALUES (42); END;",
            )
            .unwrap();
        let (a1, r1) = append_op(1);
        let (c1, rc1) = create_op("lost");
        let (boom_reply, rboom) = oneshot::channel();
        let boom = Op::AppendAudit {
            audit: AuditRecord::new(NOW, AuditKind::Denied, "boom"),
            reply: boom_reply,
        };
        let start = w.head.clone();
        w.run_batch(vec![a1, c1, boom], &start);
        for r in [
            r1.blocking_recv().unwrap().map(|_| ()),
            rc1.blocking_recv().unwrap(),
            rboom.blocking_recv().unwrap().map(|_| ()),
        ] {
            assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        }
        assert!(w.conn.is_autocommit(), "transaction closed");
        assert_eq!(w.head, committed);
        let tokens: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tokens, 0);

        w.conn.execute_batch("DROP TRIGGER temp.boom").unwrap();
        let (a2, r2) = append_op(2);
        let start = w.head.clone();
        w.run_batch(vec![a2], &start);
        assert_eq!(r2.blocking_recv().unwrap().unwrap(), 2);
        assert_eq!(audit::verify_chain(&chain_of(&w.conn)), Ok(2));
    }

    #[test]
    fn dropping_the_store_stops_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = open_in(&dir, SqliteOptions::default());
        rt.block_on(store.append_audit(record(1))).unwrap();
        drop(store); // joins the writer thread
                     // The write connection is gone: an exclusive lock is available.
        let c = Connection::open(dir.path().join("sigil.db")).unwrap();
        c.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT;")
            .unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    /// A write that panics (a bug) fails its own batch and nothing else: its
    /// caller gets `Unavailable`, what it wrote is rolled back, and the
    /// writer thread goes on serving writes with an intact audit chain.
    #[test]
    fn a_panicking_write_fails_its_batch_not_the_writer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = open_in(&dir, SqliteOptions::default());
        rt.block_on(store.append_audit(record(1))).unwrap();
        let panicked = rt.block_on(store.job(|conn, head| -> Result<(), StoreError> {
            remember_nonce(conn, "doomed", NOW)?;
            append_audit(conn, head, &record(99))?;
            panic!("a bug in a write op");
        }));
        assert!(matches!(panicked, Err(StoreError::Unavailable(_))));
        for i in 2..=4 {
            rt.block_on(store.append_audit(record(i))).unwrap();
        }
        let seen = rt
            .block_on(store.read(|c| {
                Ok(c.query_row(
                    "SELECT 1 FROM nonces WHERE nonce = 'doomed'",
                    [],
                    |_| Ok(()),
                )
                .optional()?)
            }))
            .unwrap();
        assert!(seen.is_none(), "the panicked batch's write was kept");
        let rows = rt.block_on(store.list_audit(0, 100)).unwrap();
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(crate::audit::verify_chain(&rows).is_ok());
    }

    /// One purge round deletes at most `PURGE_CHUNK` rows of a table, so a
    /// maintenance tick's purge cannot hold the writer for long.
    #[test]
    fn one_purge_round_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(&dir);
        for i in 0..600 {
            w.conn
                .execute(
                    "INSERT INTO challenges (nonce, expires_at_ms) VALUES (?1, ?2)",
                    params![format!("c{i}"), NOW - 1],
                )
                .unwrap();
        }
        let chunk = u64::from(crate::store::PURGE_CHUNK);
        let round = || {
            let r = purge_expired(&w.conn, NOW, None).unwrap();
            assert!(r.next.is_none(), "no nonce sweep was asked for");
            (r.deleted, r.others_full)
        };
        assert_eq!(round(), (chunk, true));
        assert_eq!(round(), (chunk, true));
        assert_eq!(round(), (600 - 2 * chunk, false));
        assert_eq!(round(), (0, false));
        // A round counts what it deleted in every table.
        w.conn
            .execute(
                "INSERT INTO challenges (nonce, expires_at_ms) VALUES ('c', ?1)",
                [NOW - 1],
            )
            .unwrap();
        w.conn
            .execute(
                "INSERT INTO revocations (kind, value, revoked_at_ms, expires_at_ms, reason) \
                 VALUES ('serial', 's', ?1, ?1, 'test')",
                [NOW - 1],
            )
            .unwrap();
        assert_eq!(round(), (2, false));
    }

    /// Fills the nonce table with `n` random nonces, every `expired_every`-th
    /// of them expired at [`NOW`]; returns the expired ones.
    fn random_nonces(conn: &Connection, n: usize, expired_every: usize) -> Vec<String> {
        let mut expired = Vec::new();
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..n {
            let nonce = format!("enroll:{}", crate::token::random_nonce());
            // Recorded in time order, as enrollments record them: the
            // expiry order is unrelated to the (random) key order.
            let at = if i % expired_every == 0 {
                expired.push(nonce.clone());
                NOW - 1 - (n - i) as i64
            } else {
                NOW + 60_000
            };
            remember_nonce(conn, &nonce, at).unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        expired
    }

    /// A nonce purge round walks at most `NONCE_SWEEP_SPAN` keys, the rounds
    /// cover the table in key order, and together they delete exactly the
    /// expired nonces.
    #[test]
    fn nonce_purge_sweeps_the_table_in_bounded_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(&dir);
        let n = 10_000;
        let expired = random_nonces(&w.conn, n, 12);
        let mut from = String::new();
        let (mut rounds, mut deleted) = (0, 0);
        loop {
            let r = purge_expired(&w.conn, NOW, Some(&from)).unwrap();
            rounds += 1;
            deleted += r.deleted;
            assert!(!r.others_full);
            match r.next {
                Some(next) => {
                    assert!(next > from, "the sweep moves forward");
                    let walked: i64 = w
                        .conn
                        .query_row(
                            "SELECT COUNT(*) FROM nonces WHERE nonce > ?1 AND nonce <= ?2",
                            params![from, next],
                            |r| r.get(0),
                        )
                        .unwrap();
                    assert!(walked <= NONCE_SWEEP_SPAN, "{walked} rows walked");
                    from = next;
                }
                None => break,
            }
        }
        let span = usize::try_from(NONCE_SWEEP_SPAN).unwrap();
        assert_eq!(rounds, n.div_ceil(span));
        assert_eq!(deleted, expired.len() as u64);
        let left: i64 = w
            .conn
            .query_row("SELECT COUNT(*) FROM nonces", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left as usize, n - expired.len());
        for nonce in &expired {
            let gone = w
                .conn
                .query_row("SELECT 1 FROM nonces WHERE nonce = ?1", [nonce], |_| Ok(()))
                .optional()
                .unwrap()
                .is_none();
            assert!(gone, "an expired nonce survived");
        }
    }

    /// The point of the sweep: a full purge writes each leaf of the nonce
    /// table about once, however many of its rows expired, where deleting
    /// in expiry order, a round of 256 rows per transaction, wrote one leaf
    /// per deleted row. Counted in WAL frames (pages written), not time.
    #[test]
    fn nonce_purge_writes_each_leaf_about_once() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(&dir);
        // 60,000 rows, one in 12 expired: ~5,000 deletions over ~650 leaves.
        let expired = random_nonces(&w.conn, 60_000, 12);
        w.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        let leaves: i64 = w
            .conn
            .query_row(
                "SELECT COUNT(*) FROM dbstat WHERE name = 'nonces' AND pagetype = 'leaf'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        // Each round's commit appends its pages to a WAL emptied just before.
        let wal = dir.path().join("sigil.db-wal");
        let mut written = 0;
        let mut from = Some(String::new());
        while let Some(f) = from {
            w.conn
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE); BEGIN IMMEDIATE")
                .unwrap();
            from = purge_expired(&w.conn, NOW, Some(&f)).unwrap().next;
            w.conn.execute_batch("COMMIT").unwrap();
            let len = std::fs::metadata(&wal).unwrap().len();
            written += i64::try_from(len / (4096 + 24)).unwrap();
        }
        let rounds = 60_000 / NONCE_SWEEP_SPAN + 1;
        // Each round may also rewrite the root and an interior page or two.
        assert!(
            written <= leaves + 4 * rounds,
            "{written} pages written for {} deletions over {leaves} leaves",
            expired.len()
        );
        assert!(expired.len() as i64 > 5 * leaves / 2);
    }

    /// The CRL query's work does not grow with the number of live
    /// certificates when no revocation covers them: with a plain `JOIN`,
    /// SQLite walked every live certificate for the `ca_generation` branch.
    /// Counted in virtual-machine steps, not time.
    #[test]
    fn crl_query_work_does_not_grow_with_live_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer_in(&dir);
        let steps = |conn: &Connection| {
            let mut stmt = conn.prepare(REVOKED_SERIALS).unwrap();
            let n = stmt.query_map([NOW], |_| Ok(())).unwrap().count();
            (n, stmt.get_status(rusqlite::StatementStatus::VmStep))
        };
        let insert = |from: u32, to: u32| {
            for i in from..to {
                w.conn
                    .execute(
                        "INSERT INTO issued (serial, spiffe_id, spki_sha256, issued_at_ms, \
                         not_after_ms, der) VALUES (?1, 'spiffe://t/w', 'k', ?2, ?3, x'00')",
                        params![format!("{i:08x}"), NOW - 10, NOW + 3_600_000],
                    )
                    .unwrap();
            }
        };
        // A revocation of each kind that covers none of the certificates.
        for (kind, value) in [
            ("serial", "ffffffff"),
            ("spiffe_id", "spiffe://t/other"),
            ("node", "other-node"),
            ("ca_generation", "7"),
        ] {
            w.conn
                .execute(
                    "INSERT INTO revocations (kind, value, revoked_at_ms, reason) \
                     VALUES (?1, ?2, ?3, 'test')",
                    params![kind, value, NOW],
                )
                .unwrap();
        }
        insert(0, 100);
        let (n, small) = steps(&w.conn);
        assert_eq!(n, 0);
        insert(100, 3_000);
        let (n, large) = steps(&w.conn);
        assert_eq!(n, 0);
        assert_eq!(
            small, large,
            "VM steps grew with the store: {small} → {large}"
        );

        // A revoked generation still covers every live certificate it signed.
        w.conn
            .execute(
                "INSERT INTO revocations (kind, value, revoked_at_ms, reason) \
                 VALUES ('ca_generation', '1', ?1, 'test')",
                params![NOW],
            )
            .unwrap();
        assert_eq!(steps(&w.conn).0, 3_000);
    }

    /// Commits `n` audit rows one at a time with checkpoints every `pages`
    /// WAL frames, then returns the WAL file's size, the checkpoints done by
    /// the background thread and by the writer, and (after a reopen) the
    /// audit rows read back and verified.
    async fn checkpointed_run(background: bool, pages: u32, n: u64) -> (u64, u64, u64, u64) {
        let dir = tempfile::tempdir().unwrap();
        let o = SqliteOptions {
            checkpoint_pages: pages,
            background_checkpoints: background,
            ..SqliteOptions::default()
        };
        let store = open_in(&dir, o.clone());
        for i in 0..n {
            store.append_audit(record(i)).await.unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("sigil.db-wal"))
            .unwrap()
            .len();
        let (by_background, by_writer) = store.checkpoints();
        store.close().await;
        drop(store);
        let store = open_in(&dir, o);
        let rows = store.list_audit(0, u32::MAX).await.unwrap();
        let verified = audit::verify_chain(&rows).expect("audit chain intact");
        store.close().await;
        (wal, by_background, by_writer, verified)
    }

    /// Size of a WAL holding `frames` frames: a 32-byte header, then a
    /// 24-byte header and a 4 KiB page per frame.
    fn wal_bytes(frames: u64) -> u64 {
        32 + frames * (24 + 4096)
    }

    /// 800 single-row commits write well over 800 WAL frames. With
    /// checkpoints every 16 frames the background thread copies them while
    /// the writer goes on, and the writer's own checkpoint at 4 × 16 frames
    /// lets the WAL restart: the file never grows past that plus one
    /// commit's frames (SQLite's default, 1,000 frames, would allow ~4 MB).
    #[tokio::test]
    async fn background_checkpoints_keep_the_wal_bounded() {
        let (wal, by_background, by_writer, verified) = checkpointed_run(true, 16, 800).await;
        assert!(by_background > 0, "no background checkpoint ran");
        assert!(by_writer > 0, "the writer never completed a checkpoint");
        assert!(wal <= wal_bytes(4 * 16 + 8), "WAL grew to {wal} bytes");
        assert_eq!(verified, 800);
    }

    /// Without the background thread the writer checkpoints at the
    /// threshold itself, as SQLite's auto-checkpoint would.
    #[tokio::test]
    async fn writer_alone_checkpoints_at_the_threshold() {
        let (wal, by_background, by_writer, verified) = checkpointed_run(false, 16, 800).await;
        assert_eq!(by_background, 0);
        assert!(by_writer > 0, "the writer never checkpointed");
        assert!(wal <= wal_bytes(16 + 8), "WAL grew to {wal} bytes");
        assert_eq!(verified, 800);
    }
}

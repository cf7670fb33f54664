//! `--prefill N`: grows the store to N issued-certificate records (each with
//! its token, nonce and two audit rows, as real enrollments leave them)
//! before the broker starts, through the public [`Store`] trait: tokens via
//! `create_token`, then `redeem_token`, hundreds in flight so the writer's
//! group commit batches them.
//!
//! Nonce rows expire one hour after the prefill, so none is purged during
//! the run: the nonce table holds N rows, more than a full 5-minute window
//! at any rate this broker reaches (window + skew = 360 s).
//!
//! `--expire-nonces-over SECS` ([`spread_nonce_expiry`]) then gives every
//! nonce an expiry spread over the next SECS seconds, so the run pays the
//! steady-state purge: a store that has held a full window for a while
//! forgets as many nonces per second as it records.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rusqlite::{params, Connection};
use sigil::{
    audit::{AuditKind, AuditRecord},
    clock::{Clock, SystemClock},
    store::{
        sqlite::{SqliteOptions, SqliteStore},
        IssuedCert, RedeemOutcome, Redemption, Store, TokenRecord,
    },
    token,
};

use crate::stats::thousands;

/// Size of the stand-in certificate DER (a real P-256 X509-SVID is about this size).
const CERT_LEN: usize = 560;
/// Redemptions in flight.
const IN_FLIGHT: u64 = 512;

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// Adds `n` redeemed tokens to the SQLite store at `db`; returns the seconds it took.
///
/// # Errors
/// The store cannot be opened or a write failed.
pub async fn run(db: &Path, n: u64, quiet: bool) -> anyhow::Result<f64> {
    let store = Arc::new(
        SqliteStore::open(db, SqliteOptions::default())
            .with_context(|| format!("open {}", db.display()))?,
    );
    let before = store.counts().await?;
    let started = Instant::now();
    let now = SystemClock.now_ms();
    let mut der = vec![0u8; CERT_LEN];
    rand::fill(&mut der[..]);
    let der = Arc::new(der);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));

    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT.min(n) {
        let (store, next, done, der) = (store.clone(), next.clone(), done.clone(), der.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    break;
                }
                let token_id = random_hex(16);
                let spiffe_id = format!("spiffe://sigil.local/prefill/{i}");
                store
                    .create_token(
                        TokenRecord {
                            token_id: token_id.clone(),
                            spiffe_id: spiffe_id.clone(),
                            created_at_ms: now,
                            expires_at_ms: now + 3_600_000,
                            max_uses: 1,
                            uses: 0,
                            revoked_at_ms: None,
                        },
                        AuditRecord::new(now, AuditKind::TokenCreated, "ok")
                            .field("token_id", token_id.as_str())
                            .field("spiffe_id", spiffe_id.as_str())
                            .field("ttl_seconds", 3600)
                            .field("max_uses", 1)
                            .field("caller", "local-admin-socket"),
                    )
                    .await?;
                let serial = random_hex(16);
                let outcome = store
                    .redeem_token(Redemption {
                        token_id: token_id.clone(),
                        nonce: format!("enroll:{}", token::random_nonce()),
                        nonce_expires_at_ms: now + 3_600_000,
                        now_ms: now,
                        audit: AuditRecord::new(now, AuditKind::Issued, "ok")
                            .field("token_id", token_id.as_str())
                            .field("spiffe_id", spiffe_id.as_str())
                            .field("serial", serial.as_str())
                            .field("not_after_ms", now + 3_600_000)
                            .field("jwt", false)
                            .field("caller", "127.0.0.1:40000"),
                        cert: IssuedCert {
                            serial,
                            token_id: Some(token_id),
                            spiffe_id,
                            spki_sha256: random_hex(32),
                            issued_at_ms: now,
                            not_after_ms: now + 3_600_000,
                            der: der.as_ref().clone(),
                            ca_gen: 1,
                            origin: "token".into(),
                            node: None,
                        },
                    })
                    .await?;
                if outcome != RedeemOutcome::Issued {
                    bail!("prefill redemption refused: {outcome:?}");
                }
                done.fetch_add(1, Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let reporter = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Relaxed);
                if !quiet {
                    eprintln!(
                        "prefill: {} / {} ({:.0}/s)",
                        thousands(d),
                        thousands(n),
                        d as f64 / started.elapsed().as_secs_f64()
                    );
                }
                if d >= n {
                    break;
                }
            }
        })
    };
    let mut result = Ok(());
    for w in workers {
        if let Err(e) = w.await.context("prefill task")? {
            result = Err(e);
        }
    }
    reporter.abort();
    let after = store.counts().await?;
    store.close().await;
    result?;
    if !quiet {
        eprintln!(
            "prefill: +{} issued certificates in {:.1} s; store now holds {} issued, {} nonces, {} tokens, {} audit rows (was {} issued)",
            thousands(n),
            started.elapsed().as_secs_f64(),
            thousands(after.issued),
            thousands(after.nonces),
            thousands(after.tokens),
            thousands(after.audit),
            thousands(before.issued),
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Gives every nonce in the SQLite store at `db` an expiry uniformly
/// distributed over `[now, now + secs)`, then checkpoints the WAL into the
/// database file and syncs it, so none of this rewrite's I/O falls into the
/// timed phase. Returns how many nonces the store holds. A store that does
/// not exist yet has none.
///
/// # Errors
/// The store cannot be opened or the update failed.
pub fn spread_nonce_expiry(db: &Path, secs: u32, quiet: bool) -> anyhow::Result<u64> {
    if !db.exists() {
        return Ok(0);
    }
    let started = Instant::now();
    let conn = Connection::open(db).with_context(|| format!("open {}", db.display()))?;
    let now = SystemClock.now_ms();
    let span = i64::from(secs.max(1)) * 1000;
    let n = conn
        .execute(
            "UPDATE nonces SET expires_at_ms = ?1 + (random() & 0x7fffffffffff) % ?2",
            params![now, span],
        )
        .context("spread the nonces' expiry")?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .context("checkpoint")?;
    drop(conn);
    std::fs::File::open(db)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("sync {}", db.display()))?;
    if !quiet {
        eprintln!(
            "nonces: {} now expire over the next {secs} s ({:.0}/s), rewritten in {:.1} s",
            thousands(n as u64),
            n as f64 / f64::from(secs.max(1)),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(n as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Every nonce gets an expiry inside `[now, now + secs)`, and a store
    /// that does not exist yet is left alone.
    #[test]
    fn nonce_expiries_are_spread_over_the_next_secs() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sigil.db");
        assert_eq!(spread_nonce_expiry(&db, 360, true).unwrap(), 0);
        assert!(!db.exists());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = SqliteStore::open(&db, SqliteOptions::default()).unwrap();
        rt.block_on(store.close());
        drop(store);
        let conn = Connection::open(&db).unwrap();
        for i in 0..500 {
            conn.execute(
                "INSERT INTO nonces (nonce, expires_at_ms) VALUES (?1, ?2)",
                params![format!("n{i}"), i64::MAX / 2],
            )
            .unwrap();
        }
        drop(conn);
        let before = SystemClock.now_ms();
        assert_eq!(spread_nonce_expiry(&db, 360, true).unwrap(), 500);
        let after = SystemClock.now_ms();
        let conn = Connection::open(&db).unwrap();
        let (lo, hi): (i64, i64) = conn
            .query_row(
                "SELECT MIN(expires_at_ms), MAX(expires_at_ms) FROM nonces",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert!(lo >= before, "{lo} < {before}");
        assert!(hi < after + 360_000, "{hi} beyond the window");
        // Spread, not all at one instant: 500 draws over 360 s.
        assert!(hi - lo > 300_000, "{lo}..{hi} is not spread");
    }
}

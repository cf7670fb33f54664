//! Backend-independent conformance suite for [`Store`]. Every backend's tests
//! call [`run_all`] (or the single checks) on a store it opened, so all
//! backends are held to the same documented semantics.
//!
//! The checks use a fixed fake time ([`NOW`]) and fake DER bytes: the store
//! knows nothing of crypto. Each check uses its own token ids, nonces and
//! serials and measures counts and audit rows as deltas, so the checks can
//! run one after another on one store as well as each on a fresh store.
//! Concurrency is exercised by polling many calls at once inside one task
//! ([`join_all`]), because the checks only borrow the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use sha2::{Digest, Sha256};

use super::{
    ApproveOutcome, AttestGuard, AttestOutcome, AttestRedemption, BootstrapInstall,
    BootstrapOutcome, IssuedCert, PlanApproval, PlanProposal, PlanState, ProposeOutcome,
    RedeemOutcome, Redemption, RenewOutcome, Renewal, RevocationKind, RevocationRecord,
    RevokeOutcome, Store, StoreCounts, StoreError, TokenRecord,
};
use crate::audit::{self, AuditKind, AuditRecord, AuditRow};

/// The fixed "now" of the suite, Unix ms.
pub const NOW: i64 = 1_700_000_000_000;
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

/// Runs every check, in order, on one store.
pub async fn run_all(store: &dyn Store) {
    create_fetch_list_tokens(store).await;
    duplicate_token_id_conflicts(store).await;
    redeem_happy_path(store).await;
    redeem_refusals_in_order(store).await;
    redeem_retry_returns_first_cert(store).await;
    redeem_retry_needs_a_valid_cert(store).await;
    redeem_error_changes_nothing(store).await;
    max_uses_three(store).await;
    concurrent_redeems_have_one_winner(store).await;
    revoke_outcomes(store).await;
    purge_expired_nonces(store).await;
    purge_runs_in_chunks_until_done(store).await;
    concurrent_audit_appends_chain(store).await;
    revocation_and_renewal(store).await;
    attestation_guards(store).await;
    shared_meta(store).await;
    plan_lifecycle(store).await;
}

// === Fixtures ===

/// A 32-lowercase-hex token id derived from `label`.
pub fn token_id(label: &str) -> String {
    hex::encode(&Sha256::digest(format!("token/{label}"))[..16])
}

/// A 64-lowercase-hex fake SPKI hash derived from `label`.
pub fn spki(label: &str) -> String {
    hex::encode(Sha256::digest(format!("spki/{label}")))
}

/// A token record valid for `ttl_ms` from [`NOW`].
pub fn token(label: &str, max_uses: u32, ttl_ms: i64) -> TokenRecord {
    TokenRecord {
        token_id: token_id(label),
        spiffe_id: format!("spiffe://example.org/agent/{label}"),
        created_at_ms: NOW,
        expires_at_ms: NOW + ttl_ms,
        max_uses,
        uses: 0,
        revoked_at_ms: None,
    }
}

fn created_audit(t: &TokenRecord) -> AuditRecord {
    AuditRecord::new(t.created_at_ms, AuditKind::TokenCreated, "ok")
        .field("token_id", t.token_id.clone())
}

async fn create(store: &dyn Store, t: &TokenRecord) {
    store
        .create_token(t.clone(), created_audit(t))
        .await
        .expect("create_token");
}

/// A redemption of `label`'s token for the key `key`, with a fake certificate
/// valid for one hour from `now_ms`.
pub fn redemption(label: &str, key: &str, nonce: &str, now_ms: i64) -> Redemption {
    let tid = token_id(label);
    let serial = hex::encode(&Sha256::digest(format!("serial/{label}/{key}/{nonce}"))[..16]);
    let spki_sha256 = spki(key);
    Redemption {
        token_id: tid.clone(),
        nonce: format!("enroll:{nonce}"),
        nonce_expires_at_ms: now_ms + 5 * MINUTE,
        now_ms,
        cert: IssuedCert {
            serial: serial.clone(),
            token_id: Some(tid.clone()),
            spiffe_id: format!("spiffe://example.org/agent/{label}"),
            spki_sha256,
            issued_at_ms: now_ms,
            not_after_ms: now_ms + HOUR,
            der: format!("fake-der/{serial}").into_bytes(),
            ca_gen: 1,
            origin: "token".into(),
            node: None,
        },
        audit: AuditRecord::new(now_ms, AuditKind::Issued, "ok")
            .field("token_id", tid)
            .field("serial", serial),
    }
}

/// Every audit row, paging through `list_audit`; asserts the chain verifies.
pub async fn all_audit(store: &dyn Store) -> Vec<AuditRow> {
    let mut rows = Vec::new();
    loop {
        let after = rows.last().map_or(0, |r: &AuditRow| r.seq);
        let page = store.list_audit(after, 50).await.expect("list_audit");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 50, "list_audit returned more than limit");
        rows.extend(page);
    }
    let n = audit::verify_chain(&rows).expect("audit chain verifies");
    assert_eq!(n, rows.len() as u64);
    rows
}

/// What a refusal must leave untouched.
#[derive(Debug, PartialEq)]
struct Snapshot {
    counts: StoreCounts,
    audit_head: Option<AuditRow>,
    token: Option<TokenRecord>,
}

async fn snapshot(store: &dyn Store, token_id: &str) -> Snapshot {
    Snapshot {
        counts: store.counts().await.expect("counts"),
        audit_head: all_audit(store).await.pop(),
        token: store.fetch_token(token_id).await.expect("fetch_token"),
    }
}

/// Redeems and asserts the refusal `want` changed nothing.
async fn assert_refused(store: &dyn Store, r: Redemption, want: RedeemOutcome, why: &str) {
    let before = snapshot(store, &r.token_id).await;
    let cert_before = store
        .fetch_issued(&r.cert.serial)
        .await
        .expect("fetch_issued");
    let got = store.redeem_token(r.clone()).await.expect("redeem_token");
    assert_eq!(got, want, "{why}");
    assert_eq!(
        snapshot(store, &r.token_id).await,
        before,
        "{why}: refusal changed state"
    );
    assert_eq!(
        store
            .fetch_issued(&r.cert.serial)
            .await
            .expect("fetch_issued"),
        cert_before,
        "{why}: refusal recorded a certificate"
    );
}

async fn issue(store: &dyn Store, r: &Redemption) {
    assert_eq!(
        store.redeem_token(r.clone()).await.expect("redeem_token"),
        RedeemOutcome::Issued
    );
}

fn recorded(r: &Redemption) -> IssuedCert {
    IssuedCert {
        token_id: Some(r.token_id.clone()),
        ..r.cert.clone()
    }
}

/// Polls all `futs` concurrently in the current task; outputs in input order.
pub async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outs.into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

// === Checks ===

/// Tokens round-trip through create, fetch and list (newest first), each
/// with its audit row.
pub async fn create_fetch_list_tokens(store: &dyn Store) {
    let before = store.counts().await.unwrap();
    let head = all_audit(store).await.len();
    let mut older = token("list-older", 1, HOUR);
    older.created_at_ms = NOW - 2;
    let mut newer = token("list-newer", 2, HOUR);
    newer.created_at_ms = NOW - 1;
    create(store, &older).await;
    create(store, &newer).await;

    assert_eq!(
        store.fetch_token(&older.token_id).await.unwrap(),
        Some(older.clone())
    );
    assert_eq!(
        store.fetch_token(&newer.token_id).await.unwrap(),
        Some(newer.clone())
    );
    assert_eq!(
        store.fetch_token(&token_id("list-missing")).await.unwrap(),
        None
    );

    let list = store.list_tokens().await.unwrap();
    let pos = |id: &str| list.iter().position(|t| t.token_id == id).expect("listed");
    assert!(pos(&newer.token_id) < pos(&older.token_id), "newest first");
    assert_eq!(list[pos(&older.token_id)], older);
    assert!(list
        .windows(2)
        .all(|w| w[0].created_at_ms >= w[1].created_at_ms));

    let after = store.counts().await.unwrap();
    assert_eq!(after.tokens, before.tokens + 2);
    assert_eq!(after.audit, before.audit + 2);
    let rows = all_audit(store).await;
    assert_eq!(rows.len(), head + 2);
    let last = &rows[rows.len() - 1];
    let want = created_audit(&newer);
    assert_eq!(
        (
            last.time_ms,
            last.kind.as_str(),
            last.outcome.as_str(),
            last.fields_json.clone()
        ),
        (want.time_ms, "token_created", "ok", want.fields_json())
    );
}

/// A second token with an existing id is a `Conflict` and changes nothing.
pub async fn duplicate_token_id_conflicts(store: &dyn Store) {
    let t = token("dup", 1, HOUR);
    create(store, &t).await;
    let before = snapshot(store, &t.token_id).await;
    let mut other = token("dup", 5, 2 * HOUR);
    other.spiffe_id = "spiffe://example.org/other".into();
    let err = store
        .create_token(other.clone(), created_audit(&other))
        .await
        .expect_err("duplicate id must fail");
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    assert_eq!(snapshot(store, &t.token_id).await, before);
}

/// A winning redemption records the cert, takes a use, remembers the nonce
/// and appends its audit row to the chain.
pub async fn redeem_happy_path(store: &dyn Store) {
    let t = token("happy", 1, HOUR);
    create(store, &t).await;
    let before = store.counts().await.unwrap();
    // One ms before expiry is still in time.
    let r = redemption("happy", "k1", "happy-n1", t.expires_at_ms - 1);
    issue(store, &r).await;

    let got = store.fetch_token(&t.token_id).await.unwrap().unwrap();
    assert_eq!(got.uses, 1);
    assert_eq!(
        got,
        TokenRecord {
            uses: 1,
            ..t.clone()
        }
    );
    let cert = recorded(&r);
    assert_eq!(
        store.fetch_issued(&r.cert.serial).await.unwrap(),
        Some(cert.clone())
    );
    assert_eq!(store.fetch_issued("00").await.unwrap(), None);
    let spki = &r.cert.spki_sha256;
    assert_eq!(
        store
            .fetch_issued_for_token(&t.token_id, spki, r.now_ms)
            .await
            .unwrap(),
        Some(cert.clone())
    );
    // Valid means not_after_ms > now_ms.
    assert_eq!(
        store
            .fetch_issued_for_token(&t.token_id, spki, cert.not_after_ms)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .fetch_issued_for_token(&t.token_id, &self::spki("k2"), r.now_ms)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .fetch_issued_for_token(&token_id("other"), spki, r.now_ms)
            .await
            .unwrap(),
        None
    );

    let after = store.counts().await.unwrap();
    assert_eq!(
        after,
        StoreCounts {
            tokens: before.tokens,
            issued: before.issued + 1,
            nonces: before.nonces + 1,
            audit: before.audit + 1,
            plans: before.plans,
        }
    );
    let rows = all_audit(store).await;
    let last = rows.last().unwrap();
    assert_eq!(last.seq, after.audit);
    assert_eq!(
        (
            last.time_ms,
            last.kind.as_str(),
            last.outcome.as_str(),
            last.fields_json.clone()
        ),
        (r.audit.time_ms, "issued", "ok", r.audit.fields_json())
    );
}

/// Every refusal, and that the documented order decides between them.
pub async fn redeem_refusals_in_order(store: &dyn Store) {
    use RedeemOutcome::*;

    // A used nonce is refused before anything else, even for another token
    // or an unknown one.
    let a = token("order-a", 1, HOUR);
    let b = token("order-b", 1, HOUR);
    create(store, &a).await;
    create(store, &b).await;
    issue(store, &redemption("order-a", "k1", "order-n1", NOW)).await;
    assert_refused(
        store,
        redemption("order-a", "k1", "order-n1", NOW),
        NonceReplayed,
        "same nonce",
    )
    .await;
    assert_refused(
        store,
        redemption("order-b", "k9", "order-n1", NOW),
        NonceReplayed,
        "nonce, other token",
    )
    .await;
    assert_refused(
        store,
        redemption("order-none", "k9", "order-n1", NOW),
        NonceReplayed,
        "nonce before unknown",
    )
    .await;

    // Unknown token.
    assert_refused(
        store,
        redemption("order-none", "k9", "order-n2", NOW),
        TokenUnknown,
        "unknown",
    )
    .await;

    // Revoked beats everything after it: a valid cert for the key, expiry, used up.
    let rv = token("order-revoked", 1, HOUR);
    create(store, &rv).await;
    issue(store, &redemption("order-revoked", "k1", "order-n3", NOW)).await;
    let audit =
        AuditRecord::new(NOW, AuditKind::TokenRevoked, "ok").field("token_id", rv.token_id.clone());
    assert_eq!(
        store.revoke_token(&rv.token_id, NOW, audit).await.unwrap(),
        RevokeOutcome::Revoked
    );
    assert_refused(
        store,
        redemption("order-revoked", "k1", "order-n4", NOW),
        TokenRevoked,
        "revoked, same key",
    )
    .await;
    assert_refused(
        store,
        redemption("order-revoked", "k2", "order-n5", NOW),
        TokenRevoked,
        "revoked, used up",
    )
    .await;
    assert_refused(
        store,
        redemption("order-revoked", "k2", "order-n6", NOW + 2 * HOUR),
        TokenRevoked,
        "revoked, expired",
    )
    .await;

    // Expired: at the instant of expiry, and before "already used".
    let ex = token("order-expired", 1, HOUR);
    create(store, &ex).await;
    assert_refused(
        store,
        redemption("order-expired", "k1", "order-n7", ex.expires_at_ms),
        TokenExpired,
        "expires_at is exclusive",
    )
    .await;
    assert_refused(
        store,
        redemption("order-expired", "k1", "order-n8", ex.expires_at_ms + HOUR),
        TokenExpired,
        "expired",
    )
    .await;
    // "order-a" is used up (key k1); past its expiry a new key sees TokenExpired.
    assert_refused(
        store,
        redemption("order-a", "k2", "order-n9", a.expires_at_ms),
        TokenExpired,
        "expired before used",
    )
    .await;

    // Used up, another key.
    assert_refused(
        store,
        redemption("order-a", "k2", "order-n10", NOW + 1),
        TokenAlreadyUsed,
        "already used",
    )
    .await;

    // The nonces of refusals were not remembered: they work on a fresh token.
    let fresh = token("order-fresh", 8, HOUR);
    create(store, &fresh).await;
    for (i, n) in [
        "order-n2",
        "order-n4",
        "order-n5",
        "order-n7",
        "order-n9",
        "order-n10",
    ]
    .iter()
    .enumerate()
    {
        issue(
            store,
            &redemption("order-fresh", &format!("fresh-{i}"), n, NOW),
        )
        .await;
    }
}

/// A used-up token retried with the same key returns the first certificate,
/// consuming only the nonce.
pub async fn redeem_retry_returns_first_cert(store: &dyn Store) {
    // The token (30 min) expires before the certificate (1 h).
    let t = token("retry", 1, 30 * MINUTE);
    create(store, &t).await;
    let first = redemption("retry", "k1", "retry-n1", NOW);
    issue(store, &first).await;
    let cert = recorded(&first);

    let before = store.counts().await.unwrap();
    let head = all_audit(store).await.pop();
    let retry = redemption("retry", "k1", "retry-n2", NOW + MINUTE);
    assert_ne!(retry.cert.serial, first.cert.serial);
    assert_eq!(
        store.redeem_token(retry.clone()).await.unwrap(),
        RedeemOutcome::Retried(cert.clone())
    );
    let after = store.counts().await.unwrap();
    assert_eq!(
        after,
        StoreCounts {
            nonces: before.nonces + 1,
            ..before
        }
    );
    assert_eq!(
        all_audit(store).await.pop(),
        head,
        "Retried appends no audit row"
    );
    assert_eq!(
        store.fetch_token(&t.token_id).await.unwrap().unwrap().uses,
        1
    );
    assert_eq!(store.fetch_issued(&retry.cert.serial).await.unwrap(), None);

    // The retry's nonce was consumed.
    assert_refused(
        store,
        retry,
        RedeemOutcome::NonceReplayed,
        "retried nonce reused",
    )
    .await;

    // A still-valid cert is returned even after the token expired (step 3
    // comes before step 4).
    let late = redemption("retry", "k1", "retry-n3", t.expires_at_ms);
    assert!(late.now_ms < cert.not_after_ms);
    assert_eq!(
        store.redeem_token(late).await.unwrap(),
        RedeemOutcome::Retried(cert)
    );
}

/// No `Retried` once the earlier certificate has expired: the later checks
/// decide.
pub async fn redeem_retry_needs_a_valid_cert(store: &dyn Store) {
    // The cert (1 h) expires well before the token (10 h).
    let t = token("stale", 1, 10 * HOUR);
    create(store, &t).await;
    let first = redemption("stale", "k1", "stale-n1", NOW);
    issue(store, &first).await;
    let not_after = first.cert.not_after_ms;
    assert_refused(
        store,
        redemption("stale", "k1", "stale-n2", not_after),
        RedeemOutcome::TokenAlreadyUsed,
        "cert expired, token valid",
    )
    .await;
    assert_refused(
        store,
        redemption("stale", "k1", "stale-n3", t.expires_at_ms),
        RedeemOutcome::TokenExpired,
        "cert and token expired",
    )
    .await;
    assert_eq!(
        store
            .fetch_issued_for_token(&t.token_id, &spki("k1"), not_after)
            .await
            .unwrap(),
        None
    );
}

/// A redemption that fails with an error (here a serial that already
/// exists) is rolled back whole: no nonce, no use, no audit row.
pub async fn redeem_error_changes_nothing(store: &dyn Store) {
    let t = token("serial-clash", 2, HOUR);
    create(store, &t).await;
    let first = redemption("serial-clash", "k1", "clash-n1", NOW);
    issue(store, &first).await;
    let before = snapshot(store, &t.token_id).await;
    let mut clash = redemption("serial-clash", "k2", "clash-n2", NOW);
    clash.cert.serial = first.cert.serial.clone();
    let err = store
        .redeem_token(clash.clone())
        .await
        .expect_err("duplicate serial must fail");
    assert!(matches!(err, StoreError::Conflict(_)), "got {err:?}");
    assert_eq!(snapshot(store, &t.token_id).await, before);
    assert_eq!(
        store.fetch_issued(&first.cert.serial).await.unwrap(),
        Some(recorded(&first))
    );
    // The nonce was not consumed.
    issue(store, &redemption("serial-clash", "k2", "clash-n2", NOW)).await;
}

/// A three-use token issues to three keys, then refuses.
pub async fn max_uses_three(store: &dyn Store) {
    let t = token("three", 3, HOUR);
    create(store, &t).await;
    let first = redemption("three", "k1", "three-n1", NOW);
    issue(store, &first).await;
    // The same key again is a retry even with uses left (step 3 before 5):
    // it takes no use.
    assert_eq!(
        store
            .redeem_token(redemption("three", "k1", "three-n1b", NOW))
            .await
            .unwrap(),
        RedeemOutcome::Retried(recorded(&first))
    );
    issue(store, &redemption("three", "k2", "three-n2", NOW)).await;
    issue(store, &redemption("three", "k3", "three-n3", NOW)).await;
    assert_eq!(
        store.fetch_token(&t.token_id).await.unwrap().unwrap().uses,
        3
    );
    assert_refused(
        store,
        redemption("three", "k4", "three-n4", NOW),
        RedeemOutcome::TokenAlreadyUsed,
        "fourth key",
    )
    .await;
    assert_eq!(
        store.fetch_token(&t.token_id).await.unwrap().unwrap().uses,
        3
    );
}

/// 64 simultaneous redemptions of a one-use token: one winner, and the
/// losers' nonces are not remembered.
pub async fn concurrent_redeems_have_one_winner(store: &dyn Store) {
    const N: usize = 64;
    let t = token("race", 1, HOUR);
    create(store, &t).await;
    let before = store.counts().await.unwrap();
    let rs: Vec<Redemption> = (0..N)
        .map(|i| redemption("race", &format!("k{i}"), &format!("race-n{i}"), NOW))
        .collect();
    let outs = join_all(rs.iter().map(|r| store.redeem_token(r.clone())).collect()).await;
    let outs: Vec<RedeemOutcome> = outs.into_iter().map(|o| o.expect("redeem_token")).collect();

    let winners: Vec<usize> = (0..N)
        .filter(|&i| outs[i] == RedeemOutcome::Issued)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {outs:?}");
    let losers = outs
        .iter()
        .filter(|o| **o == RedeemOutcome::TokenAlreadyUsed)
        .count();
    assert_eq!(losers, N - 1, "{outs:?}");

    assert_eq!(
        store.fetch_token(&t.token_id).await.unwrap().unwrap().uses,
        1
    );
    let after = store.counts().await.unwrap();
    assert_eq!(
        after,
        StoreCounts {
            tokens: before.tokens,
            issued: before.issued + 1,
            nonces: before.nonces + 1,
            audit: before.audit + 1,
            plans: before.plans,
        }
    );
    let w = winners[0];
    assert_eq!(
        store.fetch_issued(&rs[w].cert.serial).await.unwrap(),
        Some(recorded(&rs[w]))
    );

    // Losers' nonces are reusable; the winner's is not.
    let spare = token("race-spare", N as u32, HOUR);
    create(store, &spare).await;
    let reuse: Vec<Redemption> = (0..N)
        .map(|i| redemption("race-spare", &format!("k{i}"), &format!("race-n{i}"), NOW))
        .collect();
    let outs = join_all(
        reuse
            .iter()
            .map(|r| store.redeem_token(r.clone()))
            .collect(),
    )
    .await;
    for (i, o) in outs.into_iter().enumerate() {
        let want = if i == w {
            RedeemOutcome::NonceReplayed
        } else {
            RedeemOutcome::Issued
        };
        assert_eq!(o.unwrap(), want, "nonce {i}");
    }
}

/// Revoked, then AlreadyRevoked, then Unknown; one audit row.
pub async fn revoke_outcomes(store: &dyn Store) {
    let t = token("revoke", 1, HOUR);
    create(store, &t).await;
    let before = store.counts().await.unwrap();
    let audit = |at: i64| {
        AuditRecord::new(at, AuditKind::TokenRevoked, "ok").field("token_id", t.token_id.clone())
    };

    assert_eq!(
        store
            .revoke_token(&t.token_id, NOW + 5, audit(NOW + 5))
            .await
            .unwrap(),
        RevokeOutcome::Revoked
    );
    let got = store.fetch_token(&t.token_id).await.unwrap().unwrap();
    assert_eq!(
        got,
        TokenRecord {
            revoked_at_ms: Some(NOW + 5),
            ..t.clone()
        }
    );
    let rows = all_audit(store).await;
    assert_eq!(rows.last().unwrap().kind, "token_revoked");

    assert_eq!(
        store
            .revoke_token(&t.token_id, NOW + 9, audit(NOW + 9))
            .await
            .unwrap(),
        RevokeOutcome::AlreadyRevoked
    );
    assert_eq!(
        store
            .fetch_token(&t.token_id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at_ms,
        Some(NOW + 5)
    );
    assert_eq!(
        store
            .revoke_token(&token_id("revoke-missing"), NOW, audit(NOW))
            .await
            .unwrap(),
        RevokeOutcome::Unknown
    );
    assert_eq!(
        store
            .fetch_token(&token_id("revoke-missing"))
            .await
            .unwrap(),
        None
    );

    let after = store.counts().await.unwrap();
    assert_eq!(
        after,
        StoreCounts {
            audit: before.audit + 1,
            ..before
        }
    );
    assert_eq!(all_audit(store).await.len(), rows.len());
}

/// More expired rows than one purge round takes: the purge repeats until
/// every one is gone (each challenge can be recorded again) and leaves the
/// unexpired ones.
pub async fn purge_runs_in_chunks_until_done(store: &dyn Store) {
    // Long before every other check's rows expire, so only these count.
    let base = NOW - 200 * HOUR;
    let expired = u64::from(super::PURGE_CHUNK) * 2 + 7;
    let name = |i: u64| hex::encode(Sha256::digest(format!("purge-chunk/{i}")));
    for i in 0..expired {
        store
            .create_challenge(&name(i), base - i64::try_from(i).unwrap())
            .await
            .unwrap();
    }
    store
        .create_challenge(&name(expired), base + 1)
        .await
        .unwrap();
    assert_eq!(store.purge_expired(base).await.unwrap(), expired);
    assert_eq!(store.purge_expired(base).await.unwrap(), 0);
    for i in 0..expired {
        store
            .create_challenge(&name(i), NOW + HOUR)
            .await
            .expect("purged challenge is gone");
    }
    assert!(
        matches!(
            store.create_challenge(&name(expired), NOW + HOUR).await,
            Err(StoreError::Conflict(_))
        ),
        "an unexpired challenge survives the purge"
    );
}

/// Purge forgets exactly the nonces with `expires_at_ms <= now`; a purged
/// nonce can be used again.
pub async fn purge_expired_nonces(store: &dyn Store) {
    // Purge at a time long before every other check's nonces expire, so
    // this check only sees its own.
    let base = NOW - 100 * HOUR;
    let t = token("purge", 3, HOUR);
    create(store, &t).await;
    let mut rs = Vec::new();
    for (i, exp) in [base - HOUR, base, base + 1].into_iter().enumerate() {
        let mut r = redemption("purge", &format!("k{i}"), &format!("purge-n{i}"), NOW);
        r.nonce_expires_at_ms = exp;
        issue(store, &r).await;
        rs.push(r);
    }
    let before = store.counts().await.unwrap();
    assert_eq!(store.purge_expired(base).await.unwrap(), 2);
    let after = store.counts().await.unwrap();
    assert_eq!(
        after,
        StoreCounts {
            nonces: before.nonces - 2,
            ..before
        }
    );
    assert_eq!(
        store.purge_expired(base).await.unwrap(),
        0,
        "purge is idempotent"
    );

    let again = token("purge-again", 3, HOUR);
    create(store, &again).await;
    issue(store, &redemption("purge-again", "k0", "purge-n0", NOW)).await;
    issue(store, &redemption("purge-again", "k1", "purge-n1", NOW)).await;
    assert_refused(
        store,
        redemption("purge-again", "k2", "purge-n2", NOW),
        RedeemOutcome::NonceReplayed,
        "unexpired nonce kept",
    )
    .await;
}

/// 200 concurrent appends get distinct consecutive seqs and one valid chain.
pub async fn concurrent_audit_appends_chain(store: &dyn Store) {
    const N: u64 = 200;
    let head = all_audit(store).await.len() as u64;
    let records: Vec<AuditRecord> = (0..N)
        .map(|i| AuditRecord::new(NOW + i as i64, AuditKind::Denied, "bad_nonce").field("i", i))
        .collect();
    let seqs = join_all(
        records
            .iter()
            .map(|r| store.append_audit(r.clone()))
            .collect(),
    )
    .await;
    let seqs: Vec<u64> = seqs.into_iter().map(|s| s.expect("append_audit")).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (head + 1..=head + N).collect::<Vec<_>>());

    // Page with an odd size from the old head.
    let mut rows: Vec<AuditRow> = Vec::new();
    loop {
        let after = rows.last().map_or(head, |r| r.seq);
        let page = store.list_audit(after, 7).await.unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        rows.extend(page);
    }
    assert_eq!(
        rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (head + 1..=head + N).collect::<Vec<_>>()
    );
    for (rec, seq) in records.iter().zip(&seqs) {
        let row = &rows[(seq - head - 1) as usize];
        assert_eq!(
            (
                row.time_ms,
                row.kind.as_str(),
                row.outcome.as_str(),
                row.fields_json.clone()
            ),
            (rec.time_ms, "denied", "bad_nonce", rec.fields_json())
        );
    }
    assert!(
        store.list_audit(head, 0).await.unwrap().is_empty(),
        "limit 0"
    );
    assert!(store.list_audit(head + N, 10).await.unwrap().is_empty());
    assert!(store.list_audit(u64::MAX, 10).await.unwrap().is_empty());
    assert_eq!(all_audit(store).await.len() as u64, head + N);
}

// === Plans ===

fn install(label: &str, nonce: &str) -> BootstrapInstall {
    let mut admin_token = token(label, 1, HOUR);
    admin_token.spiffe_id = "spiffe://example.org/admin/a".into();
    BootstrapInstall {
        nonce: format!("bootstrap:{nonce}"),
        nonce_expires_at_ms: NOW + 10 * MINUTE,
        now_ms: NOW,
        sha256: hex::encode(Sha256::digest(label)),
        canonical_json: format!("{{\"plan\":\"{label}\"}}"),
        admin_token,
        audit: AuditRecord::new(NOW, AuditKind::Denied, "ok").field("plan", label.to_owned()),
    }
}

fn proposal(
    label: &str,
    proposer: &str,
    required: u32,
    based_on: Option<u64>,
    now: i64,
) -> PlanProposal {
    PlanProposal {
        sha256: hex::encode(Sha256::digest(label)),
        canonical_json: format!("{{\"plan\":\"{label}\"}}"),
        proposer: proposer.into(),
        now_ms: now,
        expires_at_ms: now + HOUR,
        required_approvals: required,
        based_on,
        audit: AuditRecord::new(now, AuditKind::Denied, "proposed"),
        activation_audit: AuditRecord::new(now, AuditKind::Denied, "activated"),
    }
}

fn approval(version: u64, label: &str, approver: &str, now: i64) -> PlanApproval {
    PlanApproval {
        version,
        sha256: hex::encode(Sha256::digest(label)),
        approver: approver.into(),
        now_ms: now,
        audit: AuditRecord::new(now, AuditKind::Denied, "approved"),
        activation_audit: AuditRecord::new(now, AuditKind::Denied, "activated"),
    }
}

/// Bootstrap exactly once under concurrency, then proposal/approval rules.
/// Needs a store on which no plan was ever activated.
pub async fn plan_lifecycle(store: &dyn Store) {
    assert!(store.fetch_active_plan().await.unwrap().is_none());
    // 32 concurrent bootstraps with distinct nonces: exactly one wins.
    let outcomes = join_all(
        (0..32)
            .map(|i| store.bootstrap_plan(install(&format!("foundation-{i}"), &format!("n{i}"))))
            .collect(),
    )
    .await;
    let won: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, Ok(BootstrapOutcome::Installed { .. })))
        .collect();
    assert_eq!(won.len(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(
        o,
        Ok(BootstrapOutcome::Installed { .. } | BootstrapOutcome::Disabled)
    )));
    let active = store.fetch_active_plan().await.unwrap().unwrap();
    assert_eq!(active.state, PlanState::Active);
    let v1 = active.version;
    assert_eq!(
        store.counts().await.unwrap().plans,
        1,
        "losers stored nothing"
    );
    // Replayed nonce is reported as such, fresh nonce as disabled.
    assert_eq!(
        store.bootstrap_plan(install("again", "n0")).await.unwrap(),
        BootstrapOutcome::NonceReplayed
    );
    assert_eq!(
        store
            .bootstrap_plan(install("again", "fresh"))
            .await
            .unwrap(),
        BootstrapOutcome::Disabled
    );

    // A proposal checked against a plan that is no longer active is stale.
    assert_eq!(
        store
            .propose_plan(proposal("p2", "alice", 2, None, NOW))
            .await
            .unwrap(),
        ProposeOutcome::Stale
    );
    let ProposeOutcome::Pending {
        version: v2,
        approvals: 1,
    } = store
        .propose_plan(proposal("p2", "alice", 2, Some(v1), NOW))
        .await
        .unwrap()
    else {
        panic!("expected pending");
    };
    let a = |v, l: &str, who: &str| store.approve_plan(approval(v, l, who, NOW + 1));
    assert_eq!(
        a(v2, "p2", "alice").await.unwrap(),
        ApproveOutcome::AlreadyApproved
    );
    assert_eq!(
        a(v2, "other", "bob").await.unwrap(),
        ApproveOutcome::HashMismatch
    );
    assert_eq!(a(999, "p2", "bob").await.unwrap(), ApproveOutcome::NotFound);
    assert_eq!(
        store.fetch_active_plan().await.unwrap().unwrap().version,
        v1,
        "one admin alone cannot activate"
    );
    assert_eq!(a(v2, "p2", "bob").await.unwrap(), ApproveOutcome::Activated);
    let active = store.fetch_active_plan().await.unwrap().unwrap();
    assert_eq!(active.version, v2);
    assert_eq!(active.approvals, vec!["alice".to_owned(), "bob".to_owned()]);
    assert_eq!(
        store.fetch_plan(v1).await.unwrap().unwrap().state,
        PlanState::Superseded
    );
    assert_eq!(
        a(v2, "p2", "carol").await.unwrap(),
        ApproveOutcome::NotPending
    );

    // Two competing proposals: activating one makes the other stale.
    let ProposeOutcome::Pending { version: v3, .. } = store
        .propose_plan(proposal("p3", "alice", 2, Some(v2), NOW))
        .await
        .unwrap()
    else {
        panic!("expected pending");
    };
    let ProposeOutcome::Pending { version: v4, .. } = store
        .propose_plan(proposal("p4", "bob", 2, Some(v2), NOW))
        .await
        .unwrap()
    else {
        panic!("expected pending");
    };
    assert_eq!(a(v3, "p3", "bob").await.unwrap(), ApproveOutcome::Activated);
    assert_eq!(
        store.fetch_plan(v4).await.unwrap().unwrap().state,
        PlanState::Stale
    );
    assert_eq!(
        a(v4, "p4", "alice").await.unwrap(),
        ApproveOutcome::NotPending
    );

    // Expired proposals cannot be approved.
    let ProposeOutcome::Pending { version: v5, .. } = store
        .propose_plan(proposal("p5", "alice", 2, Some(v3), NOW))
        .await
        .unwrap()
    else {
        panic!("expected pending");
    };
    assert_eq!(
        store
            .approve_plan(approval(v5, "p5", "bob", NOW + HOUR))
            .await
            .unwrap(),
        ApproveOutcome::Expired
    );
    // One required approval: the proposal activates at once.
    assert!(matches!(
        store
            .propose_plan(proposal("p6", "alice", 1, Some(v3), NOW))
            .await
            .unwrap(),
        ProposeOutcome::Activated { .. }
    ));
    all_audit(store).await;
}

// === Revocations ===

fn revocation(
    kind: RevocationKind,
    value: &str,
    at: i64,
    expires: Option<i64>,
) -> RevocationRecord {
    RevocationRecord {
        kind,
        value: value.into(),
        revoked_at_ms: at,
        expires_at_ms: expires,
        reason: "test".into(),
    }
}

fn renewal(parent: &str, label: &str, now: i64) -> Renewal {
    let r = redemption(label, "renewed-key", &format!("renew-{label}"), now);
    let mut cert = r.cert;
    cert.token_id = None;
    cert.origin = "overwritten-by-store".into();
    Renewal {
        parent_serial: parent.into(),
        cert,
        now_ms: now,
        audit: AuditRecord::new(now, AuditKind::Issued, "renewed"),
    }
}

/// Revocation by serial, SPIFFE ID and CA generation; renewal refuses
/// revoked parents atomically; CRL serials; expiry and purge.
pub async fn revocation_and_renewal(store: &dyn Store) {
    let t = token("rev", 3, HOUR);
    create(store, &t).await;
    let r1 = redemption("rev", "k1", "rev-n1", NOW);
    let r2 = redemption("rev", "k2", "rev-n2", NOW);
    issue(store, &r1).await;
    issue(store, &r2).await;
    let (s1, s2) = (r1.cert.serial.clone(), r2.cert.serial.clone());
    assert!(!store.is_revoked(&s1).await.unwrap());

    // Unknown parent.
    assert_eq!(
        store
            .renew_cert(renewal("00ff", "rev-x", NOW))
            .await
            .unwrap(),
        RenewOutcome::UnknownParent
    );
    // By serial.
    store
        .revoke(
            revocation(RevocationKind::Serial, &s1, NOW + 1, Some(NOW + HOUR)),
            AuditRecord::new(NOW, AuditKind::Denied, "revoked"),
        )
        .await
        .unwrap();
    assert!(store.is_revoked(&s1).await.unwrap());
    assert!(!store.is_revoked(&s2).await.unwrap());
    assert_eq!(
        store
            .renew_cert(renewal(&s1, "rev-a", NOW + 2))
            .await
            .unwrap(),
        RenewOutcome::Revoked
    );
    let child = renewal(&s2, "rev-b", NOW + 2);
    let child_serial = child.cert.serial.clone();
    assert_eq!(store.renew_cert(child).await.unwrap(), RenewOutcome::Issued);
    let c = store.fetch_issued(&child_serial).await.unwrap().unwrap();
    assert_eq!(c.origin, "token", "origin inherited from the parent");
    assert_eq!(c.token_id.as_deref(), Some(t.token_id.as_str()));

    // By SPIFFE ID: covers what was issued up to the revocation time only.
    let sid = r2.cert.spiffe_id.clone();
    store
        .revoke(
            revocation(RevocationKind::SpiffeId, &sid, NOW + 1, Some(NOW + HOUR)),
            AuditRecord::new(NOW, AuditKind::Denied, "revoked"),
        )
        .await
        .unwrap();
    assert!(store.is_revoked(&s2).await.unwrap());
    assert!(
        !store.is_revoked(&child_serial).await.unwrap(),
        "issued after the revocation"
    );
    let crl = store.revoked_serials(NOW).await.unwrap();
    let listed: Vec<&str> = crl.iter().map(|(s, _, _)| s.as_str()).collect();
    assert!(listed.contains(&s1.as_str()) && listed.contains(&s2.as_str()));
    assert!(!listed.contains(&child_serial.as_str()));

    // By CA generation: everything it signed.
    store
        .revoke(
            revocation(RevocationKind::CaGeneration, "1", NOW + 3, None),
            AuditRecord::new(NOW, AuditKind::Denied, "revoked"),
        )
        .await
        .unwrap();
    assert!(store.is_revoked(&child_serial).await.unwrap());
    let crl = store.revoked_serials(NOW).await.unwrap();
    assert!(
        crl.iter()
            .any(|(s, at, gen)| s == &child_serial && *at == NOW + 3 && *gen == 1),
        "a revoked generation's certificates are in the CRL: {crl:?}"
    );

    // Listing hides expired entries; purge deletes them; a permanent one stays.
    let listed = store.list_revocations(NOW).await.unwrap();
    assert!(listed
        .iter()
        .any(|r| r.kind == RevocationKind::Serial && r.value == s1));
    let later = store.list_revocations(NOW + HOUR).await.unwrap();
    assert!(later.iter().all(|r| r.expires_at_ms.is_none()));
    assert!(store.purge_expired(NOW + HOUR).await.unwrap() >= 2);
    let left = store.list_revocations(NOW).await.unwrap();
    assert!(
        left.iter().all(|r| r.kind == RevocationKind::CaGeneration),
        "expired revocations purged: {left:?}"
    );
    // A certificate that has expired is no longer listed in the CRL.
    assert!(store
        .revoked_serials(NOW + 2 * HOUR)
        .await
        .unwrap()
        .is_empty());
    all_audit(store).await;
}

// === Attestation guards ===

fn attest_redemption(guard: AttestGuard, label: &str, now: i64) -> AttestRedemption {
    let mut cert = redemption(label, "attested-key", label, now).cert;
    cert.token_id = None;
    cert.origin = "attest:aws_nitro".into();
    cert.node = Some(format!("node/{label}"));
    AttestRedemption {
        guard,
        now_ms: now,
        cert,
        audit: AuditRecord::new(now, AuditKind::Issued, "attested"),
    }
}

/// Challenges are one-use and expire; one-use keys cannot be replayed;
/// concurrent redemptions of one challenge have one winner.
pub async fn attestation_guards(store: &dyn Store) {
    let ch = |n: &str| AttestGuard::Challenge(n.into());
    assert_eq!(
        store
            .redeem_attestation(attest_redemption(ch("c0ffee"), "att-unknown", NOW))
            .await
            .unwrap(),
        AttestOutcome::ChallengeUnknown
    );
    store
        .create_challenge("c0ffee01", NOW + MINUTE)
        .await
        .unwrap();
    assert!(
        store
            .create_challenge("c0ffee01", NOW + MINUTE)
            .await
            .is_err(),
        "challenge ids are unique"
    );
    // 16 concurrent redemptions of one challenge: exactly one issues.
    let outs = join_all(
        (0..16)
            .map(|i| {
                store.redeem_attestation(attest_redemption(
                    ch("c0ffee01"),
                    &format!("att-{i}"),
                    NOW,
                ))
            })
            .collect(),
    )
    .await;
    let issued = outs
        .iter()
        .filter(|o| matches!(o, Ok(AttestOutcome::Issued)))
        .count();
    assert_eq!(issued, 1, "{outs:?}");
    assert!(outs
        .iter()
        .all(|o| matches!(o, Ok(AttestOutcome::Issued | AttestOutcome::Replayed))));
    // Expired.
    store
        .create_challenge("c0ffee02", NOW + MINUTE)
        .await
        .unwrap();
    assert_eq!(
        store
            .redeem_attestation(attest_redemption(ch("c0ffee02"), "att-late", NOW + MINUTE))
            .await
            .unwrap(),
        AttestOutcome::ChallengeExpired
    );
    // One-use keys.
    let key = AttestGuard::OneUse {
        key: "oidc:gh:jti-1".into(),
        expires_at_ms: NOW + MINUTE,
    };
    assert_eq!(
        store
            .redeem_attestation(attest_redemption(key.clone(), "att-jti", NOW))
            .await
            .unwrap(),
        AttestOutcome::Issued
    );
    assert_eq!(
        store
            .redeem_attestation(attest_redemption(key, "att-jti-2", NOW))
            .await
            .unwrap(),
        AttestOutcome::Replayed
    );
    let c = store
        .fetch_issued(&attest_redemption(ch("x"), "att-jti", NOW).cert.serial)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.origin.as_str(), c.node.as_deref()),
        ("attest:aws_nitro", Some("node/att-jti"))
    );
    // Purge forgets expired challenges.
    assert!(store.purge_expired(NOW + 2 * MINUTE).await.unwrap() >= 2);
    assert_eq!(
        store
            .redeem_attestation(attest_redemption(ch("c0ffee02"), "att-gone", NOW))
            .await
            .unwrap(),
        AttestOutcome::ChallengeUnknown
    );
    all_audit(store).await;
}

// === Shared metadata ===

/// Insert-if-absent agrees on one value under concurrency; CAS has one winner.
pub async fn shared_meta(store: &dyn Store) {
    assert_eq!(store.fetch_meta("conf/k").await.unwrap(), None);
    let outs = join_all(
        (0..16u8)
            .map(|i| store.insert_meta_if_absent("conf/k", vec![i; 4]))
            .collect(),
    )
    .await;
    let first = outs[0].as_ref().unwrap().clone();
    assert!(
        outs.iter().all(|o| o.as_ref().unwrap() == &first),
        "all agree on one value"
    );
    assert_eq!(
        store.fetch_meta("conf/k").await.unwrap(),
        Some(first.clone())
    );
    let wins = join_all(
        (0..8u8)
            .map(|i| store.cas_meta("conf/k", &first, vec![100 + i]))
            .collect(),
    )
    .await;
    assert_eq!(
        wins.iter().filter(|w| *w.as_ref().unwrap()).count(),
        1,
        "one CAS wins"
    );
    assert!(!store.cas_meta("conf/missing", b"x", vec![1]).await.unwrap());
}

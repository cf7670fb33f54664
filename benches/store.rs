//! Store micro-benchmark: `SqliteStore::redeem_token` on a temp file with
//! 32 redemptions in flight, group commit on vs off (group commit only
//! helps concurrent writers: it shares one fsync among a batch). Each
//! redemption consumes its own token (created before the clock starts),
//! remembers a nonce, records a certificate and appends an audit row, as
//! an enrollment does. Run with `cargo bench --bench store`.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion};
use sigil::{
    audit::{AuditKind, AuditRecord},
    clock::{Clock, SystemClock},
    store::{
        sqlite::{SqliteOptions, SqliteStore},
        IssuedCert, RedeemOutcome, Redemption, Store, TokenRecord,
    },
    token,
};

const IN_FLIGHT: usize = 32;

fn hex_id(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// Runs `f(i)` for i in 0..n with `IN_FLIGHT` tasks.
async fn concurrently<F, Fut>(n: usize, f: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT.min(n))
        .map(|_| {
            let (f, next) = (f.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    if i >= n {
                        break;
                    }
                    f(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
}

fn redeem(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("store");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for group_commit in [true, false] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(
            SqliteStore::open(
                &dir.path().join("sigil.db"),
                SqliteOptions {
                    group_commit,
                    ..SqliteOptions::default()
                },
            )
            .expect("store"),
        );
        let name = if group_commit {
            "redeem_32_in_flight_group_commit_on"
        } else {
            "redeem_32_in_flight_group_commit_off"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let n = usize::try_from(iters).expect("iters");
                let now = SystemClock.now_ms();
                let ids: Arc<Vec<String>> = Arc::new((0..n).map(|_| hex_id(16)).collect());
                rt.block_on(async {
                    let (s, i2) = (store.clone(), ids.clone());
                    concurrently(n, move |i| {
                        let (s, id) = (s.clone(), i2[i].clone());
                        async move {
                            s.create_token(
                                TokenRecord {
                                    token_id: id.clone(),
                                    spiffe_id: "spiffe://sigil.local/bench/w".into(),
                                    created_at_ms: now,
                                    expires_at_ms: now + 3_600_000,
                                    max_uses: 1,
                                    uses: 0,
                                    revoked_at_ms: None,
                                },
                                AuditRecord::new(now, AuditKind::TokenCreated, "ok")
                                    .field("token_id", id.as_str()),
                            )
                            .await
                            .expect("create token");
                        }
                    })
                    .await;
                    let start = Instant::now();
                    let (s, i2) = (store.clone(), ids.clone());
                    concurrently(n, move |i| {
                        let (s, id) = (s.clone(), i2[i].clone());
                        async move {
                            let serial = hex_id(16);
                            let out = s
                                .redeem_token(Redemption {
                                    token_id: id.clone(),
                                    nonce: format!("enroll:{}", token::random_nonce()),
                                    nonce_expires_at_ms: now + 360_000,
                                    now_ms: now,
                                    audit: AuditRecord::new(now, AuditKind::Issued, "ok")
                                        .field("token_id", id.as_str())
                                        .field("serial", serial.as_str()),
                                    cert: IssuedCert {
                                        serial,
                                        token_id: Some(id),
                                        spiffe_id: "spiffe://sigil.local/bench/w".into(),
                                        spki_sha256: hex_id(32),
                                        issued_at_ms: now,
                                        not_after_ms: now + 3_600_000,
                                        der: vec![0x30; 560],
                                        ca_gen: 1,
                                        origin: "token".into(),
                                        node: None,
                                    },
                                })
                                .await
                                .expect("redeem");
                            assert_eq!(out, RedeemOutcome::Issued);
                        }
                    })
                    .await;
                    start.elapsed()
                })
            })
        });
        rt.block_on(store.close());
    }
    g.finish();
}

criterion_group!(benches, redeem);
criterion_main!(benches);

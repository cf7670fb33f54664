//! Micro-benchmarks of an enrollment's cryptography, with the broker's own
//! code: the token proof check (sigil::token, two HMAC-SHA256), CSR verify
//! (sigil::ca::verify_csr), leaf signing (Ca::issue_x509) and the ES256
//! JWT-SVID (Ca::mint_jwt). Run with `cargo bench --bench crypto`.

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main, Criterion};
use sigil::{
    ca::{verify_csr, Ca, CaOptions, JwtParams, X509Params},
    cli::{new_key_and_csr, token_proof},
    clock::{Clock, SystemClock},
    identity::{SpiffeId, TrustDomain},
    secret::Secret,
    token::TokenKey,
};

fn crypto(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let td = TrustDomain::parse("sigil.local").expect("trust domain");
    let (ca, _) = Ca::load_or_create(dir.path(), &td, SystemClock.now_ms(), CaOptions::default())
        .expect("CA");
    let id = SpiffeId::parse("spiffe://sigil.local/bench/workload").expect("id");
    let key = TokenKey::new(Secret::random(32));
    let minted = key.mint();
    let (_, csr) = new_key_and_csr().expect("csr");
    let proof = token_proof(&minted.token_id, &minted.secret, &csr, SystemClock.now_ms());
    let verified = verify_csr(&csr).expect("valid csr");
    let audiences = vec!["https://bench.example".to_owned()];

    let mut g = c.benchmark_group("crypto");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("hmac_proof_check", |b| {
        b.iter(|| {
            assert!(key
                .derive_secret(black_box(&minted.token_id))
                .verify(black_box(&proof.payload), black_box(&proof.signature)))
        })
    });
    g.bench_function("csr_verify", |b| {
        b.iter(|| verify_csr(black_box(&csr)).expect("valid csr"))
    });
    g.bench_function("issue_x509", |b| {
        b.iter(|| {
            ca.issue_x509(&X509Params {
                spiffe_id: &id,
                csr: &verified,
                now_ms: SystemClock.now_ms(),
                ttl_secs: 3600,
                dns_names: &[],
            })
            .expect("signed")
        })
    });
    g.bench_function("csr_verify_and_sign", |b| {
        b.iter(|| {
            let v = verify_csr(black_box(&csr)).expect("valid csr");
            ca.issue_x509(&X509Params {
                spiffe_id: &id,
                csr: &v,
                now_ms: SystemClock.now_ms(),
                ttl_secs: 3600,
                dns_names: &[],
            })
            .expect("signed")
        })
    });
    g.bench_function("mint_jwt", |b| {
        b.iter(|| {
            ca.mint_jwt(&JwtParams {
                spiffe_id: &id,
                audiences: &audiences,
                now_secs: SystemClock.now_secs(),
                ttl_secs: 300,
            })
            .expect("minted")
        })
    });
    g.finish();
}

criterion_group!(benches, crypto);
criterion_main!(benches);

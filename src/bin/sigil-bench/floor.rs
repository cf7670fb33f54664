//! The crypto floor: what one enrollment's cryptography costs on one core of
//! this machine with the very code the broker runs (sigil::token for the
//! HMAC, sigil::ca for CSR checks, X.509 signing and ES256 JWTs, all on
//! aws-lc-rs). The floor is an upper bound for throughput: a broker that did
//! nothing but this crypto, on every core, with perfect scaling.
//!
//! With the `test-support` feature it also measures the attestation
//! verifiers (`NitroAttestor::attest`, `OidcAttestor::attest`) on generated
//! evidence, and what producing that evidence costs the load generator.

use std::{
    hint::black_box,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use sigil::{
    ca::{verify_csr, Ca, CaOptions, JwtParams, X509Params},
    clock::{Clock, SystemClock},
    identity::{SpiffeId, TrustDomain},
    secret::Secret,
    token::{self, TokenKey},
};

use crate::{attest::AttestCosts, procstat};

/// Per-operation costs and the floor derived from them.
#[derive(Debug, Clone)]
pub struct Floor {
    /// HMAC-SHA256 over 300 bytes, µs.
    pub hmac_300b_us: f64,
    /// The broker's proof check: derive the token secret (HMAC) and verify the payload HMAC, µs.
    pub proof_check_us: f64,
    /// `verify_csr` (DER parse, policy, ECDSA P-256 verify), µs.
    pub csr_verify_us: f64,
    /// `Ca::issue_x509` (build + ECDSA P-256 sign), µs.
    pub x509_sign_us: f64,
    /// `Ca::mint_jwt` (ES256), µs.
    pub jwt_mint_us: f64,
    /// Cores the floor is multiplied by.
    pub cores: usize,
    /// Measured: all cores running the whole per-enrollment crypto (with JWT) at once, ops/s.
    pub measured_all_cores_jwt: f64,
    /// Seconds of measurement per operation.
    pub secs_per_op: f64,
    /// One 4 KiB append + fsync in the temp dir (where the in-process broker's
    /// store lives), µs: the durability cost a commit pays (not CPU).
    pub fsync_4k_us: Option<f64>,
    /// The attestation verifiers and evidence generators (when measured).
    pub attest: AttestCosts,
}

/// Which request the floor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Token enrollment: proof check + CSR verify + sign [+ JWT].
    Enroll,
    /// Renewal over mTLS: CSR verify + sign [+ JWT] (the TLS client
    /// certificate check is per connection, not per request).
    Renew,
    /// JWT-SVID fetch over mTLS: one ES256 signature.
    FetchJwt,
    /// Nitro enrollment: CSR verify + document verify + sign [+ JWT]
    /// (GetChallenge has no crypto).
    Nitro,
    /// OIDC enrollment: CSR verify + RS256 token verify + sign [+ JWT].
    Oidc,
}

impl Floor {
    /// Per-enrollment crypto time on one core, µs (proof check + CSR verify + sign [+ JWT]).
    pub fn per_enroll_us(&self, jwt: bool) -> f64 {
        self.proof_check_us + self.csr_verify_us + self.x509_sign_us + self.jwt_us(jwt)
    }

    fn jwt_us(&self, jwt: bool) -> f64 {
        if jwt {
            self.jwt_mint_us
        } else {
            0.0
        }
    }

    /// Crypto time of one request of `kind` on one core, µs (`None` when an
    /// attestation verifier was not measured).
    pub fn per_request_us(&self, kind: Kind, jwt: bool) -> Option<f64> {
        let issue = self.csr_verify_us + self.x509_sign_us + self.jwt_us(jwt);
        match kind {
            Kind::Enroll => Some(self.per_enroll_us(jwt)),
            Kind::Renew => Some(issue),
            Kind::FetchJwt => Some(self.jwt_mint_us),
            Kind::Nitro => self.attest.nitro_verify_us.map(|v| v + issue),
            Kind::Oidc => self.attest.oidc_verify_us.map(|v| v + issue),
        }
    }

    /// The floor for `kind`: requests/s on one core × cores.
    pub fn all_cores_for(&self, kind: Kind, jwt: bool) -> Option<f64> {
        self.per_request_us(kind, jwt)
            .map(|us| 1e6 / us * self.cores as f64)
    }

    /// Enrollments per second on one core.
    pub fn one_core(&self, jwt: bool) -> f64 {
        1e6 / self.per_enroll_us(jwt)
    }

    /// The floor: one-core rate × cores.
    pub fn all_cores(&self, jwt: bool) -> f64 {
        self.one_core(jwt) * self.cores as f64
    }

    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let r = |v: f64| (v * 100.0).round() / 100.0;
        serde_json::json!({
            "secs_per_op": self.secs_per_op,
            "cores": self.cores,
            "us": {
                "hmac_sha256_300b": r(self.hmac_300b_us),
                "proof_check": r(self.proof_check_us),
                "csr_verify": r(self.csr_verify_us),
                "x509_sign": r(self.x509_sign_us),
                "jwt_mint": r(self.jwt_mint_us),
            },
            "ops_per_s_1core": {
                "hmac_sha256_300b": r(1e6 / self.hmac_300b_us),
                "proof_check": r(1e6 / self.proof_check_us),
                "csr_verify": r(1e6 / self.csr_verify_us),
                "x509_sign": r(1e6 / self.x509_sign_us),
                "jwt_mint": r(1e6 / self.jwt_mint_us),
            },
            "per_enroll_us": { "nojwt": r(self.per_enroll_us(false)), "jwt": r(self.per_enroll_us(true)) },
            "floor_1core": { "nojwt": r(self.one_core(false)), "jwt": r(self.one_core(true)) },
            "floor": { "nojwt": r(self.all_cores(false)), "jwt": r(self.all_cores(true)) },
            "measured_all_cores_jwt": r(self.measured_all_cores_jwt),
            "fsync_4k_us": self.fsync_4k_us.map(r),
            "attest_us": {
                "nitro_verify": self.attest.nitro_verify_us.map(r),
                "oidc_verify_rs256": self.attest.oidc_verify_us.map(r),
                "loadgen_nitro_document": self.attest.nitro_document_us.map(r),
                "prepared_oidc_mint_rs256": self.attest.oidc_mint_us.map(r),
            },
            "per_attest_enroll_us": {
                "nitro": { "nojwt": self.per_request_us(Kind::Nitro, false).map(r), "jwt": self.per_request_us(Kind::Nitro, true).map(r) },
                "oidc": { "nojwt": self.per_request_us(Kind::Oidc, false).map(r), "jwt": self.per_request_us(Kind::Oidc, true).map(r) },
            },
            "floor_attest": {
                "nitro": { "nojwt": self.all_cores_for(Kind::Nitro, false).map(r), "jwt": self.all_cores_for(Kind::Nitro, true).map(r) },
                "oidc": { "nojwt": self.all_cores_for(Kind::Oidc, false).map(r), "jwt": self.all_cores_for(Kind::Oidc, true).map(r) },
            },
        })
    }

    /// Human-readable lines.
    pub fn describe(&self) -> String {
        let row =
            |name: &str, us: f64| format!("  {name:<34} {us:>9.2} µs  {:>10.0} ops/s\n", 1e6 / us);
        let mut s =
            String::from("crypto floor (single core, same code and libraries as the broker)\n");
        s += &row("HMAC-SHA256 over 300 B", self.hmac_300b_us);
        s += &row("token proof check (derive + verify)", self.proof_check_us);
        s += &row("CSR parse + verify (verify_csr)", self.csr_verify_us);
        s += &row("leaf signing (Ca::issue_x509)", self.x509_sign_us);
        s += &row("ES256 JWT mint (Ca::mint_jwt)", self.jwt_mint_us);
        for jwt in [false, true] {
            s += &format!(
                "  per enrollment {:<8} {:>8.2} µs → {:>8.0}/s on 1 core, floor × {} cores = {:.0}/s\n",
                if jwt { "with JWT" } else { "no JWT" },
                self.per_enroll_us(jwt),
                self.one_core(jwt),
                self.cores,
                self.all_cores(jwt),
            );
        }
        s += &format!(
            "  measured on all {} cores at once (with JWT): {:.0}/s\n",
            self.cores, self.measured_all_cores_jwt
        );
        let a = &self.attest;
        for (name, us) in [
            ("Nitro document verify (broker)", a.nitro_verify_us),
            ("RS256 OIDC token verify (broker)", a.oidc_verify_us),
            ("Nitro document sign (load gen)", a.nitro_document_us),
            ("RS256 token mint (before clock)", a.oidc_mint_us),
        ] {
            if let Some(us) = us {
                s += &row(name, us);
            }
        }
        for (name, kind) in [("Nitro", Kind::Nitro), ("OIDC", Kind::Oidc)] {
            if let (Some(us), Some(all)) = (
                self.per_request_us(kind, false),
                self.all_cores_for(kind, false),
            ) {
                s += &format!(
                    "  per {name} enrollment (no JWT) {us:>8.2} µs → floor × {} cores = {all:.0}/s\n",
                    self.cores
                );
            }
        }
        if let Some(f) = self.fsync_4k_us {
            s += &format!(
                "  durability (not CPU): 4 KiB append + fsync {f:.0} µs → at most {:.0} commits/s; group commit shares one among a batch\n",
                1e6 / f
            );
        }
        s
    }
}

/// Everything an enrollment's crypto needs, built once.
struct Kit {
    ca: Ca,
    id: SpiffeId,
    key: TokenKey,
    token_id: String,
    payload: Vec<u8>,
    signature: Vec<u8>,
    csr: Vec<u8>,
    audiences: Vec<String>,
    hmac_key: Vec<u8>,
    msg300: Vec<u8>,
    mac300: Vec<u8>,
}

impl Kit {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let td = TrustDomain::parse("sigil.local").map_err(|e| anyhow::anyhow!("{e}"))?;
        let (ca, _) = Ca::load_or_create(dir, &td, SystemClock.now_ms(), CaOptions::default())
            .context("create a throw-away CA")?;
        let id = SpiffeId::parse("spiffe://sigil.local/bench/floor")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = TokenKey::new(Secret::random(32));
        let minted = key.mint();
        let (_, csr) = sigil::cli::new_key_and_csr()?;
        let proof =
            sigil::cli::token_proof(&minted.token_id, &minted.secret, &csr, SystemClock.now_ms());
        let hmac_key = vec![7u8; 32];
        let msg300 = vec![b'x'; 300];
        let mac300 = token::hmac_sign(&hmac_key, &msg300);
        Ok(Self {
            ca,
            id,
            key,
            token_id: minted.token_id,
            payload: proof.payload,
            signature: proof.signature,
            csr,
            audiences: vec!["https://bench.example".to_owned()],
            hmac_key,
            msg300,
            mac300,
        })
    }

    fn hmac300(&self) -> bool {
        token::hmac_verify(&self.hmac_key, &self.msg300, &self.mac300)
    }

    fn proof_check(&self) -> bool {
        self.key
            .derive_secret(&self.token_id)
            .verify(&self.payload, &self.signature)
    }

    fn csr_verify(&self) -> anyhow::Result<sigil::ca::VerifiedCsr> {
        verify_csr(&self.csr).map_err(|e| anyhow::anyhow!("verify_csr: {e}"))
    }

    fn sign(&self, csr: &sigil::ca::VerifiedCsr) -> anyhow::Result<Vec<u8>> {
        Ok(self
            .ca
            .issue_x509(&X509Params {
                spiffe_id: &self.id,
                csr,
                now_ms: SystemClock.now_ms(),
                ttl_secs: 3600,
                dns_names: &[],
            })?
            .der)
    }

    fn jwt(&self) -> anyhow::Result<String> {
        Ok(self
            .ca
            .mint_jwt(&JwtParams {
                spiffe_id: &self.id,
                audiences: &self.audiences,
                now_secs: SystemClock.now_secs(),
                ttl_secs: 300,
            })?
            .token)
    }

    /// Everything one enrollment with a JWT does, cryptographically.
    fn whole(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.proof_check(), "proof check failed");
        let v = self.csr_verify()?;
        black_box(self.sign(&v)?);
        black_box(self.jwt()?);
        Ok(())
    }
}

/// Best per-op time (µs) of `op` over 5 rounds that together last about `secs`.
///
/// # Errors
/// `op` failed.
pub fn time_op(secs: f64, mut op: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    // Warm caches and lazy initialisation.
    for _ in 0..8 {
        op()?;
    }
    let round = Duration::from_secs_f64((secs / 5.0).max(0.01));
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < round {
            for _ in 0..8 {
                op()?;
            }
            n += 8;
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    Ok(best)
}

/// Measures the floor, spending about `secs_per_op` seconds on each operation
/// on the calling thread, then as long on all cores at once. With `attest`
/// (and the `test-support` feature), the attestation verifiers too.
///
/// # Errors
/// CA creation or an operation failed (a bug, not a measurement).
pub fn measure(secs_per_op: f64, attest: bool) -> anyhow::Result<Floor> {
    let dir = crate::TempDir::new("floor")?;
    let kit = Kit::new(dir.path())?;
    let hmac_300b_us = time_op(secs_per_op, || {
        anyhow::ensure!(black_box(kit.hmac300()), "hmac");
        Ok(())
    })?;
    let proof_check_us = time_op(secs_per_op, || {
        anyhow::ensure!(black_box(kit.proof_check()), "proof");
        Ok(())
    })?;
    let csr_verify_us = time_op(secs_per_op, || {
        black_box(kit.csr_verify()?);
        Ok(())
    })?;
    let verified = kit.csr_verify()?;
    let x509_sign_us = time_op(secs_per_op, || {
        black_box(kit.sign(&verified)?);
        Ok(())
    })?;
    let jwt_mint_us = time_op(secs_per_op, || {
        black_box(kit.jwt()?);
        Ok(())
    })?;

    let attest = if attest {
        crate::attest::measure(secs_per_op)?
    } else {
        AttestCosts::default()
    };
    let fsync_4k_us = time_fsync(dir.path(), secs_per_op).ok();
    let cores = procstat::cores();
    let run_for = Duration::from_secs_f64(secs_per_op.max(0.05));
    let total: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cores)
            .map(|_| {
                s.spawn(|| {
                    let start = Instant::now();
                    let mut n = 0u64;
                    while start.elapsed() < run_for {
                        if kit.whole().is_err() {
                            break;
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    Ok(Floor {
        hmac_300b_us,
        proof_check_us,
        csr_verify_us,
        x509_sign_us,
        jwt_mint_us,
        cores,
        measured_all_cores_jwt: total as f64 / run_for.as_secs_f64(),
        secs_per_op,
        fsync_4k_us,
        attest,
    })
}

/// Median time (µs) of appending 4 KiB to a file and fsyncing it, in `dir`.
fn time_fsync(dir: &Path, secs: f64) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 4096];
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs.max(0.05) || times.len() < 5 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_all()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        if times.len() >= 10_000 {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

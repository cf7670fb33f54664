//! Replays every fuzz input kept in the repository — `fuzz/seeds/<target>/`
//! and `fuzz/regressions/<target>/` — through the very target bodies the
//! fuzzer runs (`fuzz/src/lib.rs`, compiled in here), so a crash found once
//! stays fixed and the targets' checks run on every `cargo test`, without
//! cargo-fuzz or a nightly toolchain.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
};

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Every file of `fuzz/{seeds,regressions}/<target>/`, sorted.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            out.push((f, bytes));
        }
    }
    out
}

/// Runs `run` on every input of `target`; reports every failing file.
fn replay(target: &str, run: impl Fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        !inputs.is_empty(),
        "no seeds for fuzz target {target} in {}",
        fuzz_dir().display()
    );
    let failed: Vec<String> = inputs
        .iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| run(data))).is_err())
        .map(|(path, data)| format!("{} (hex {})", path.display(), hex::encode(data)))
        .collect();
    assert!(
        failed.is_empty(),
        "fuzz target {target} fails on:\n{}",
        failed.join("\n")
    );
}

#[test]
fn fuzz_dirs_name_known_targets() {
    for kind in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(kind)) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    targets::TARGETS.contains(&name.as_str()),
                    "fuzz/{kind}/{name} is not a fuzz target (known: {:?})",
                    targets::TARGETS
                );
            }
        }
    }
}

#[test]
fn fuzz_inputs_enroll_payload() {
    replay("enroll_payload", targets::enroll_payload);
}

#[test]
fn fuzz_inputs_token_nonce() {
    replay("token_nonce", targets::token_nonce);
}

#[test]
fn fuzz_inputs_spiffe_id() {
    replay("spiffe_id", targets::spiffe_id);
}

#[test]
fn fuzz_inputs_plan() {
    replay("plan", targets::plan);
}

#[test]
fn fuzz_inputs_csr() {
    let h = targets::CsrHarness::new();
    replay("csr", |d| h.run(d));
}

#[test]
fn fuzz_inputs_enroll() {
    // One broker for all inputs, in order, as in a fuzzing process.
    let h = targets::EnrollHarness::new();
    replay("enroll", |d| h.run(d));
    // The seeds reach issuance, a retry and the refusals past the HMAC.
    let o = h.outcomes();
    for want in [
        "OK",
        "INVALID_SIGNATURE",
        "TOKEN_REVOKED",
        "TOKEN_ALREADY_USED",
    ] {
        assert!(
            o.get(want).is_some_and(|n| *n > 0),
            "{want} never seen: {o:?}"
        );
    }
}

#[test]
fn fuzz_inputs_nitro() {
    let h = targets::NitroHarness::new();
    replay("nitro", |d| h.run(d));
    let accepted = h.accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        accepted >= 2,
        "the bound seeds must verify ({accepted} did)"
    );
}

#[test]
fn fuzz_inputs_oidc() {
    let h = targets::OidcHarness::new();
    replay("oidc", |d| h.run(d));
    let accepted = h.accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        accepted >= 2,
        "the valid seeds must verify ({accepted} did)"
    );
}

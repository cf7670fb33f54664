//! Bodies of Sigil's fuzz targets, one public function per target.
//!
//! Two users compile this file:
//! * the libFuzzer binaries in `fuzz_targets/` (one line each), built by
//!   `cargo fuzz` (see `../README.md`);
//! * the normal test suite, through `#[path]` in
//!   `tests/it/fuzz_regressions.rs`, which replays every file under
//!   `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`.
//!
//! So it may only use crates that the main crate also has (as dependencies
//! or dev-dependencies), and every check here runs in both places: a target
//! does not merely call a parser, it asserts the parser's contract (no
//! panic, round trips, "nothing enrolls without the HMAC", "one token, one
//! certificate per key").
//!
//! Targets:
//! * `enroll_payload`: `EnrollPayload::parse` (+ `parse_json`, `normalize_nonce`)
//! * `token_nonce`: `parse_token`, `normalize_nonce`, `is_valid_token_id`
//! * `spiffe_id`: `SpiffeId::parse`, `TrustDomain::parse`
//! * `plan`: `policy::Plan::parse` (TOML or JSON), canonical form round trip
//! * `csr`: `ca::verify_csr`, then `Ca::issue_x509` for whatever verifies
//! * `enroll`: `Broker::enroll` in process (real CA, real SQLite store in a
//!   temp dir) on requests decoded from the input, signed with the right
//!   token secret when the input asks for it, so the fuzzer gets past the
//!   HMAC check and reaches payload, window, CSR, issuance and redemption.
//! * `nitro`: `attest::NitroAttestor` on raw bytes and on documents signed
//!   by a throwaway Nitro PKI with fuzz-chosen fields (`attest::testing`)
//! * `oidc`: `attest::OidcAttestor` on raw text and on JWTs signed by a
//!   throwaway issuer with fuzz-chosen header and claims

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use sha2::{Digest, Sha256};
use sigil::{
    ca::{self, Ca, CaOptions, X509Params},
    clock::MockClock,
    core::{Broker, BrokerConfig, BrokerSecrets, Caller, Credential, EnrollParams},
    identity::{SpiffeId, TrustDomain, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN},
    policy::{Plan, MAX_PLAN_LEN},
    secret::Secret,
    store::sqlite::{SqliteOptions, SqliteStore},
    token::{self, EnrollPayload, TokenKey},
};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// Names of the targets, as directories under `seeds/` and `regressions/`.
pub const TARGETS: &[&str] = &[
    "enroll_payload",
    "token_nonce",
    "spiffe_id",
    "plan",
    "csr",
    "enroll",
    "nitro",
    "oidc",
];

/// The fixed time of the in-process brokers (2026-01-01T00:00:00Z).
pub const NOW_MS: i64 = 1_767_225_600_000;
/// Trust domain of the in-process brokers.
const TRUST_DOMAIN: &str = "fuzz.test";

// === enroll_payload ===

/// `EnrollPayload::parse` on arbitrary bytes: never panics; whatever parses
/// re-serialises to bytes that parse to the same value; a nonce that
/// normalises is a fixed point of `normalize_nonce`.
pub fn enroll_payload(data: &[u8]) {
    // The generic parser shared with future payload kinds (bootstrap, plans).
    let _ = token::parse_json::<serde_json::Value>(data);
    let Ok(p) = EnrollPayload::parse(data) else {
        return;
    };
    let bytes = p.to_bytes();
    assert_eq!(
        EnrollPayload::parse(&bytes).as_ref(),
        Ok(&p),
        "a parsed payload must round-trip through to_bytes"
    );
    check_nonce(&p.nonce);
    let _ = token::is_valid_token_id(&p.token_id);
}

// === token_nonce ===

/// `parse_token` and `normalize_nonce` on arbitrary text: never panic; an
/// accepted token is exactly `<32 lowercase hex>.<64 hex>` (after trimming)
/// and its secret prints back as the same hex.
pub fn token_nonce(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok((id, secret)) = token::parse_token(&text) {
        assert!(token::is_valid_token_id(&id), "accepted token id {id:?}");
        let (a, b) = text
            .trim()
            .split_once('.')
            .expect("an accepted token has a dot");
        assert_eq!(a, id);
        assert!(
            b.eq_ignore_ascii_case(&secret.to_hex()),
            "the secret must be the hex that was given"
        );
        // A token string round-trips.
        let again = format!("{id}.{}", secret.to_hex());
        let (id2, secret2) = token::parse_token(&again).expect("a re-printed token parses");
        assert_eq!(id2, id);
        assert_eq!(secret2.to_hex(), secret.to_hex());
    }
    check_nonce(&text);
}

/// `normalize_nonce` contract on `nonce`: the canonical form decodes to
/// `MIN_NONCE_LEN..=MAX_NONCE_LEN` bytes and is a fixed point.
fn check_nonce(nonce: &str) {
    let Ok(n) = token::normalize_nonce(nonce) else {
        return;
    };
    let raw = URL_SAFE_NO_PAD
        .decode(&n)
        .expect("a normalised nonce is unpadded base64url");
    assert!(
        (token::MIN_NONCE_LEN..=token::MAX_NONCE_LEN).contains(&raw.len()),
        "normalised nonce of {} bytes",
        raw.len()
    );
    assert_eq!(
        token::normalize_nonce(&n).as_deref(),
        Ok(n.as_str()),
        "normalize_nonce must be idempotent"
    );
}

// === spiffe_id ===

/// `SpiffeId::parse` / `TrustDomain::parse` on arbitrary text: never panic;
/// an accepted ID is exactly its `Display`, splits into trust domain and
/// path that reassemble it, and parses again to an equal value.
pub fn spiffe_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s = text.as_ref();
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.to_string(), s);
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= MAX_SPIFFE_ID_LEN);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
        assert!(id.path().starts_with('/') && id.path().len() > 1);
        assert!(!id.path().ends_with('/'));
        for bad in ['%', '?', '#', ':', '@', '\\'] {
            assert!(
                !s["spiffe://".len()..].contains(bad),
                "accepted {bad:?} in {s:?}"
            );
        }
        let td = TrustDomain::parse(id.trust_domain()).expect("an ID's trust domain parses");
        assert_eq!(td.as_str(), id.trust_domain());
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
    }
    if let Ok(td) = TrustDomain::parse(s) {
        assert_eq!(td.as_str(), s.strip_prefix("spiffe://").unwrap_or(s));
        assert!(!td.as_str().is_empty() && td.as_str().len() <= MAX_TRUST_DOMAIN_LEN);
        assert_eq!(TrustDomain::parse(&td.id_string()).as_ref(), Ok(&td));
        assert_eq!(TrustDomain::parse(&td.to_string()).as_ref(), Ok(&td));
    }
}

// === plan ===

/// `Plan::parse` on arbitrary bytes: never panics; an accepted plan's
/// canonical JSON reads back equal (`from_canonical`), and parsing the
/// canonical JSON as a plan document gives the same plan and hash
/// (canonicalisation is idempotent, so two spellings cannot hash apart).
pub fn plan(data: &[u8]) {
    let td = TrustDomain::parse(TRUST_DOMAIN).expect("trust domain");
    let Ok(plan) = Plan::parse(data, &td) else {
        return;
    };
    let canonical = plan.canonical_json();
    assert_eq!(
        Plan::from_canonical(&canonical).as_ref(),
        Ok(&plan),
        "canonical JSON must read back"
    );
    // (Defaults spelled out can make the canonical form longer than the input.)
    if canonical.len() <= MAX_PLAN_LEN {
        let again =
            Plan::parse(canonical.as_bytes(), &td).expect("a canonical plan is a valid plan");
        assert_eq!(again, plan, "canonicalisation must be idempotent");
        assert_eq!(again.sha256_hex(), plan.sha256_hex());
    }
    assert!(!plan.admins.is_empty(), "a plan names at least one admin");
    for id in plan
        .admins
        .iter()
        .chain(plan.entries.iter().map(|e| &e.spiffe_id))
    {
        let id = SpiffeId::parse(id).expect("plan IDs are valid SPIFFE IDs");
        assert_eq!(
            id.trust_domain(),
            TRUST_DOMAIN,
            "plan ID of a foreign domain"
        );
    }
}

// === csr ===

/// A CA to certify whatever `verify_csr` accepts.
pub struct CsrHarness {
    ca: Ca,
    id: SpiffeId,
    // Last: removed after the CA is dropped.
    _dir: tempfile::TempDir,
}

impl CsrHarness {
    /// A fresh CA in a temp dir (`$TMPDIR`).
    pub fn new() -> Self {
        let dir = temp_dir();
        let td = TrustDomain::parse(TRUST_DOMAIN).expect("trust domain");
        let (ca, _) = Ca::load_or_create(dir.path(), &td, NOW_MS, CaOptions::default())
            .expect("CA for fuzzing");
        let id = SpiffeId::parse("spiffe://fuzz.test/csr").expect("id");
        Self { ca, id, _dir: dir }
    }

    /// `verify_csr` on arbitrary bytes: never panics; an accepted CSR's key
    /// is a substring of the input, its hash is right, and the CA certifies
    /// exactly that key, with exactly one URI SAN, never as a CA.
    pub fn run(&self, data: &[u8]) {
        let Ok(v) = ca::verify_csr(data) else {
            return;
        };
        assert_eq!(
            v.spki_sha256_hex(),
            hex::encode(Sha256::digest(v.spki_der()))
        );
        assert!(
            data.windows(v.spki_der().len()).any(|w| w == v.spki_der()),
            "the verified key must come from the input"
        );
        let issued = self
            .ca
            .issue_x509(&X509Params {
                spiffe_id: &self.id,
                csr: &v,
                now_ms: NOW_MS,
                ttl_secs: 3600,
                dns_names: &[],
            })
            .expect("a verified CSR can always be certified");
        check_leaf(&issued.der, v.spki_der(), self.id.as_str());
    }
}

impl Default for CsrHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// The `csr` target (one harness per process).
pub fn csr(data: &[u8]) {
    static H: OnceLock<CsrHarness> = OnceLock::new();
    H.get_or_init(CsrHarness::new).run(data);
}

/// Asserts a leaf certifies `spki` for `spiffe_id` and nothing else.
fn check_leaf(der: &[u8], spki: &[u8], spiffe_id: &str) {
    let (rest, cert) =
        x509_parser::certificate::X509Certificate::from_der(der).expect("our leaf parses");
    assert!(rest.is_empty());
    assert_eq!(
        cert.public_key().raw,
        spki,
        "leaf key differs from the CSR key"
    );
    let san = cert
        .subject_alternative_name()
        .expect("one SAN extension")
        .expect("a SAN extension");
    let names: Vec<_> = san.value.general_names.iter().collect();
    assert!(
        matches!(names.as_slice(), [GeneralName::URI(u)] if *u == spiffe_id),
        "SANs must be exactly the SPIFFE ID: {names:?}"
    );
    let ca = cert
        .basic_constraints()
        .expect("one BasicConstraints")
        .is_some_and(|bc| bc.value.ca);
    assert!(!ca, "a leaf must never be a CA");
}

// === enroll ===

/// One token the enroll harness created.
struct FuzzToken {
    id: String,
    spiffe_id: String,
    max_uses: u32,
    revoked: bool,
}

/// What clients have been given so far (the harness's model of the rules).
#[derive(Default)]
struct Seen {
    /// token id → distinct serials issued under it.
    serials: HashMap<String, HashSet<String>>,
    /// (token id, key hash) → the one serial for that key.
    by_key: HashMap<(String, String), String>,
    /// Normalised nonces of accepted requests.
    nonces: HashSet<String>,
}

/// Single-use tokens the harness creates.
const SINGLE_USE: usize = 4;

/// An in-process broker (real CA, real SQLite store, fixed mock clock) with
/// a few tokens, plus valid CSRs to build requests from.
pub struct EnrollHarness {
    rt: tokio::runtime::Runtime,
    broker: Arc<Broker>,
    key: TokenKey,
    tokens: Vec<FuzzToken>,
    csrs: Vec<Vec<u8>>,
    seen: Mutex<Seen>,
    /// Outcome counts: `OK` or the refusal reason.
    outcomes: Mutex<HashMap<&'static str, u64>>,
    /// Requests so far (numbers the callers' addresses).
    requests: AtomicU64,
    // Last: removed after the store is closed.
    _dir: tempfile::TempDir,
}

impl EnrollHarness {
    /// A fresh broker in a temp dir (`$TMPDIR`) with tokens: `SINGLE_USE`
    /// single-use, one with a million uses, one revoked.
    pub fn new() -> Self {
        let dir = temp_dir();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let td = TrustDomain::parse(TRUST_DOMAIN).expect("trust domain");
        let (ca, _) = sigil::ca::ring::Authority::load_or_create(
            dir.path(),
            &td,
            NOW_MS,
            sigil::ca::ring::RingOptions::default(),
        )
        .expect("CA");
        let store = SqliteStore::open(&dir.path().join("sigil.db"), SqliteOptions::default())
            .expect("store");
        let key = TokenKey::new(Secret::new(vec![0x5a; 32]));
        let broker = Arc::new(
            rt.block_on(Broker::new(
                BrokerConfig::new(td),
                Arc::new(store),
                Arc::new(ca),
                BrokerSecrets {
                    token_key: key.clone(),
                    bootstrap: None,
                    bootstrap_source: "missing",
                    attestors: sigil::attest::registry::Registry::new(
                        &sigil::attest::registry::AttestConfig::default(),
                    )
                    .expect("attestors"),
                },
                Arc::new(MockClock::new(NOW_MS)),
            ))
            .expect("broker"),
        );
        let mut tokens = Vec::new();
        let plan = (0..SINGLE_USE)
            .map(|i| (format!("single/{i}"), 1, false))
            .chain([("multi".to_owned(), 1_000_000, false)])
            .chain([("revoked".to_owned(), 1, true)]);
        for (path, uses, revoked) in plan {
            let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/{path}");
            let created = rt
                .block_on(broker.create_token(&spiffe_id, 3600, uses, &Caller::LocalAdmin))
                .expect("create token");
            if revoked {
                rt.block_on(broker.revoke_token(&created.token_id, &Caller::LocalAdmin))
                    .expect("revoke token");
            }
            tokens.push(FuzzToken {
                id: created.token_id,
                spiffe_id,
                max_uses: uses,
                revoked,
            });
        }
        Self {
            rt,
            broker,
            key,
            tokens,
            csrs: valid_csrs(),
            seen: Mutex::new(Seen::default()),
            outcomes: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            _dir: dir,
        }
    }

    /// Decodes one request from `data`, runs `Broker::enroll`, and checks the
    /// rules:
    /// * no success without a correct HMAC under the claimed token's secret,
    ///   for a token we created and did not revoke;
    /// * without a correct HMAC, only `MALFORMED_REQUEST`,
    ///   `INVALID_SIGNATURE` or `RATE_LIMITED` (token state is never revealed);
    /// * never `INTERNAL` / `UNAVAILABLE` on any input;
    /// * a success certifies the CSR's key for the token's SPIFFE ID, its
    ///   nonce was never accepted before, the same (token, key) always gets
    ///   the same serial and a token never yields more serials than uses.
    pub fn run(&self, data: &[u8]) {
        let mut inp = Input(data);
        let req = self.decode(&mut inp);
        // A fresh address per request, so the per-peer rate limits (which
        // never refill under the fixed mock clock) don't end the run; an
        // input may instead ask for one shared "hot" peer.
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let addr = if inp.byte() == 0xff {
            "192.0.2.1:1".to_owned()
        } else {
            format!("10.{}.{}.{}:4000", (n >> 16) & 255, (n >> 8) & 255, n & 255)
        };
        let caller = Caller::Peer { addr };
        let result = self.rt.block_on(self.broker.enroll(
            EnrollParams {
                csr: req.csr.clone(),
                credential: req.credential.clone(),
                jwt_audiences: req.audiences.clone(),
            },
            &caller,
        ));
        *self
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(result.as_ref().map_or_else(|e| e.reason(), |_| "OK"))
            .or_default() += 1;
        match result {
            Err(e) => {
                let reason = e.reason();
                assert!(
                    reason != "INTERNAL" && reason != "UNAVAILABLE",
                    "{reason} on a fuzzed request: {e}"
                );
                if !req.signed_right {
                    assert!(
                        matches!(
                            reason,
                            "MALFORMED_REQUEST"
                                | "INVALID_SIGNATURE"
                                | "UNIMPLEMENTED"
                                | "RATE_LIMITED"
                        ),
                        "{reason} revealed to a caller without the token secret"
                    );
                }
            }
            Ok(e) => {
                assert!(req.signed_right, "enrolled without a valid HMAC");
                let t = req
                    .token
                    .and_then(|i| self.tokens.get(i))
                    .expect("enrolled with a token the broker never issued");
                assert!(!t.revoked, "a revoked token enrolled");
                assert_eq!(e.spiffe_id, t.spiffe_id);
                let v = ca::verify_csr(&req.csr).expect("an enrolled CSR verifies");
                let leaf = e.chain.first().expect("a leaf");
                check_leaf(leaf, v.spki_der(), &t.spiffe_id);
                let Some(Credential::Token { payload, .. }) = &req.credential else {
                    panic!("enrolled without a token credential");
                };
                let p = EnrollPayload::parse(payload).expect("an accepted payload parses");
                assert_eq!(p.action, token::ACTION_ENROLL);
                assert_eq!(p.token_id, t.id);
                let nonce = token::normalize_nonce(&p.nonce).expect("accepted nonce");
                let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                assert!(seen.nonces.insert(nonce), "a nonce was accepted twice");
                let first = seen
                    .by_key
                    .entry((t.id.clone(), v.spki_sha256_hex().to_owned()))
                    .or_insert_with(|| e.serial.clone());
                assert_eq!(*first, e.serial, "one (token, key) got two serials");
                let serials = seen.serials.entry(t.id.clone()).or_default();
                let new_serial = serials.insert(e.serial.clone());
                if e.retried {
                    assert!(!new_serial, "a retry returned a new serial");
                }
                assert!(
                    serials.len() <= t.max_uses as usize,
                    "token {} gave {} serials for {} uses",
                    t.id,
                    serials.len(),
                    t.max_uses
                );
                assert_eq!(
                    e.jwt_svid.is_some(),
                    !e.retried && !req.audiences.is_empty(),
                    "a JWT-SVID exactly when asked for and not retried"
                );
            }
        }
    }

    /// How many requests ended how so far: `OK` or the refusal reason.
    pub fn outcomes(&self) -> HashMap<&'static str, u64> {
        self.outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn decode(&self, inp: &mut Input<'_>) -> Request {
        let pick = inp.byte();
        let claimed = match pick % 5 {
            0 => self.tokens[usize::from(inp.byte()) % SINGLE_USE].id.clone(),
            1 => self.tokens[SINGLE_USE].id.clone(),
            2 => self.tokens[SINGLE_USE + 1].id.clone(),
            3 => hex::encode(inp.bytes(16)),
            _ => inp.text(),
        };
        let token = self.tokens.iter().position(|t| t.id == claimed);
        // What a holder of `claimed` would sign with.
        let secret = self.key.derive_secret(&claimed);

        let csr = match inp.byte() % 3 {
            0 => self.csrs[usize::from(inp.byte()) % self.csrs.len()].clone(),
            1 => {
                let mut d = self.csrs[usize::from(inp.byte()) % self.csrs.len()].clone();
                let at = usize::from(inp.u16()) % d.len();
                d[at] ^= inp.byte();
                d
            }
            _ => inp.chunk().to_vec(),
        };

        let payload = match inp.byte() % 4 {
            0 => inp.chunk().to_vec(),
            _ => {
                let action = match inp.byte() % 4 {
                    0 | 1 => token::ACTION_ENROLL.to_owned(),
                    2 => token::ACTION_BOOTSTRAP.to_owned(),
                    _ => inp.text(),
                };
                let token_id = if inp.byte() % 4 == 0 {
                    inp.text()
                } else {
                    claimed.clone()
                };
                let window = 300_000;
                let timestamp = match inp.byte() % 8 {
                    0 => i64::MIN,
                    1 => i64::MAX,
                    2 => NOW_MS - window + i64::from(inp.byte()) - 128,
                    3 => NOW_MS + window + i64::from(inp.byte()) - 128,
                    _ => NOW_MS + i64::from(inp.u16() as i16) * 50,
                };
                let nonce = match inp.byte() % 4 {
                    0 => inp.text(),
                    1 => {
                        let n = usize::from(inp.byte() % 80);
                        base64::engine::general_purpose::URL_SAFE.encode(inp.bytes(n))
                    }
                    _ => URL_SAFE_NO_PAD.encode(inp.bytes(16)),
                };
                let hash = hex::encode(Sha256::digest(&csr));
                let csr_sha256 = match inp.byte() % 4 {
                    0 => inp.text(),
                    1 => hash.to_uppercase(),
                    _ => hash,
                };
                EnrollPayload {
                    action,
                    token_id,
                    timestamp,
                    nonce,
                    csr_sha256,
                }
                .to_bytes()
            }
        };

        let (signature, signed_right) = match inp.byte() % 4 {
            0 | 1 => (secret.sign(&payload), true),
            2 => {
                // A real secret, but another token's.
                let other = if claimed == self.tokens[0].id { 1 } else { 0 };
                let wrong = self.key.derive_secret(&self.tokens[other].id);
                (wrong.sign(&payload), false)
            }
            _ => (inp.chunk().to_vec(), false),
        };
        let audiences = (0..inp.byte() % 4).map(|_| inp.text()).collect();
        let credential = match pick {
            255 => None,
            254 => Some(Credential::Attestation {
                format: inp.text(),
                document: inp.chunk().to_vec(),
            }),
            _ => Some(Credential::Token {
                token_id: claimed,
                payload,
                signature,
            }),
        };
        Request {
            signed_right: signed_right && matches!(credential, Some(Credential::Token { .. })),
            token,
            csr,
            credential,
            audiences,
        }
    }
}

impl Default for EnrollHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// The `enroll` target (one broker per process; its state carries over
/// from input to input, as a real broker's would).
pub fn enroll(data: &[u8]) {
    static H: OnceLock<EnrollHarness> = OnceLock::new();
    let h = H.get_or_init(EnrollHarness::new);
    h.run(data);
    // Now and then, show how deep the inputs get.
    let outcomes = h.outcomes();
    if outcomes.values().sum::<u64>() % 10_000 == 0 {
        let mut v: Vec<_> = outcomes.into_iter().collect();
        v.sort();
        eprintln!("enroll outcomes: {v:?}");
    }
}

/// A decoded enroll request and what the harness knows about it.
struct Request {
    /// The signature is HMAC(secret of the claimed token id, payload).
    signed_right: bool,
    /// Index into `EnrollHarness::tokens` when the claimed id is ours.
    token: Option<usize>,
    csr: Vec<u8>,
    credential: Option<Credential>,
    audiences: Vec<String>,
}

/// Reads fuzz input as choices and chunks; past the end everything is 0/empty.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        let lo = self.byte();
        let hi = self.byte();
        u16::from_le_bytes([lo, hi])
    }

    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    /// A chunk with a u16 length prefix.
    fn chunk(&mut self) -> &'a [u8] {
        let n = usize::from(self.u16());
        self.bytes(n)
    }

    fn text(&mut self) -> String {
        String::from_utf8_lossy(self.chunk()).into_owned()
    }
}

/// Valid CSRs of every key type we certify, some asking for extensions.
fn valid_csrs() -> Vec<Vec<u8>> {
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let mut out = Vec::new();
    for k in [&p256, &p384, &ed] {
        let plain = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        out.push(plain.serialize_request(k).expect("csr").der().to_vec());
    }
    // A CSR asking to be a CA for another name: must still only get its key certified.
    let mut evil = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
    evil.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    out.push(evil.serialize_request(&p256).expect("csr").der().to_vec());
    out
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("sigil-fuzz-")
        .tempdir()
        .expect("temp dir")
}

// === attestation: nitro, oidc ===

/// Asserts an error message does not echo a long run of the input
/// (attest module rule: never echo a raw document or token; quoted values
/// are capped at 64 characters).
fn assert_no_echo(message: &str, input: &[u8]) {
    const RUN: usize = 80;
    if message.len() < RUN || input.len() < RUN {
        return;
    }
    for w in message.as_bytes().windows(RUN) {
        assert!(
            !input.windows(RUN).any(|i| i == w),
            "error message echoes the input: {message}"
        );
    }
}

/// A Nitro verifier trusting a throwaway PKI, and a CSR to bind to.
pub struct NitroHarness {
    pki: sigil::attest::testing::NitroPki,
    attestor: sigil::attest::NitroAttestor,
    csr: Vec<u8>,
    spki: Vec<u8>,
    /// Documents accepted so far.
    pub accepted: AtomicU64,
}

impl NitroHarness {
    /// A fresh PKI and CSR.
    pub fn new() -> Self {
        let pki = sigil::attest::testing::NitroPki::new();
        let attestor = sigil::attest::NitroAttestor::new(&pki.nitro_config()).expect("attestor");
        let (csr, spki) = sigil::attest::testing::test_csr();
        Self {
            pki,
            attestor,
            csr,
            spki,
            accepted: AtomicU64::new(0),
        }
    }

    /// Mode byte: 0 raw document; 1 a signed document with fuzz-chosen
    /// fields; 2 a valid document with one byte changed; 3 truncated.
    /// Never panics; in mode 1 an accepted document must have had a fresh
    /// timestamp and been bound to this CSR (public_key or user_data).
    pub fn run(&self, data: &[u8]) {
        use sigil::attest::{testing::Opt, Attestor};
        let mut inp = Input(data);
        let mode = inp.byte() % 4;
        let mut bound = false;
        let mut fresh = true;
        let document = match mode {
            0 => inp.0.to_vec(),
            1 => {
                let mut b = self.pki.document();
                match inp.byte() % 4 {
                    0 => {}
                    1 => {
                        let at = NOW_MS + i64::from(inp.u16() as i16) * 100;
                        fresh = (at - NOW_MS).abs() <= 300_000;
                        b = b.timestamp_ms(at.max(0) as u64);
                    }
                    2 => {
                        let at = u64::from_le_bytes(inp.array());
                        fresh = i128::from(at).abs_diff(i128::from(NOW_MS)) <= 300_000;
                        b = b.timestamp_ms(at);
                    }
                    _ => {
                        fresh = false;
                        b = b.omit("timestamp");
                    }
                }
                b = match inp.byte() % 4 {
                    0 => b.public_key(Opt::Absent),
                    1 => {
                        bound = true;
                        b.public_key(Opt::Bytes(self.spki.clone()))
                    }
                    2 => b.public_key(Opt::Bytes(inp.chunk().to_vec())),
                    _ => b.public_key(Opt::Null),
                };
                b = match inp.byte() % 4 {
                    0 => b.user_data(Opt::Absent),
                    1 => {
                        bound = true;
                        b.user_data(Opt::Bytes(Sha256::digest(&self.csr).to_vec()))
                    }
                    2 => b.user_data(Opt::Bytes(inp.chunk().to_vec())),
                    _ => b.user_data(Opt::Null),
                };
                b = match inp.byte() % 4 {
                    0 => b,
                    1 => b.nonce(Opt::Absent),
                    2 => b.nonce(Opt::Bytes(inp.chunk().to_vec())),
                    _ => b.nonce(Opt::Null),
                };
                b = match inp.byte() % 3 {
                    0 => b,
                    1 => b.module_id(&inp.text()),
                    _ => b.omit("module_id"),
                };
                b = match inp.byte() % 3 {
                    0 => b,
                    1 => b.digest(&inp.text()),
                    _ => b.omit("digest"),
                };
                b = match inp.byte() % 3 {
                    0 => b,
                    1 => {
                        let n = inp.byte() % 40;
                        let pcrs = (0..n)
                            .map(|_| {
                                let i = u64::from(inp.byte());
                                let len = usize::from(inp.byte() % 80);
                                (i, inp.bytes(len).to_vec())
                            })
                            .collect();
                        b.pcrs(pcrs)
                    }
                    _ => b.omit("pcrs"),
                };
                b = match inp.byte() % 5 {
                    0 => b,
                    1 => b.certificate(self.pki.intermediate_der().to_vec()),
                    2 => b.certificate(inp.chunk().to_vec()),
                    3 => b.cabundle(Vec::new()),
                    _ => b.cabundle(vec![self.pki.intermediate_der().to_vec()]),
                };
                if inp.byte() % 4 == 0 {
                    let key = inp.text();
                    let value = inp.chunk().to_vec();
                    b = b.extra(&key, ciborium::Value::Bytes(value));
                }
                let flags = inp.byte();
                b.tagged(flags & 1 != 0).indefinite(flags & 2 != 0).build()
            }
            2 => {
                let mut d = self.pki.document().build();
                let at = usize::from(inp.u16()) % d.len();
                d[at] ^= inp.byte().max(1);
                d
            }
            _ => {
                let d = self.pki.document().build();
                let at = usize::from(inp.u16()) % d.len();
                d[..at].to_vec()
            }
        };
        let result = self.attestor.attest(&sigil::attest::AttestInput {
            document: &document,
            csr_der: &self.csr,
            csr_spki_der: &self.spki,
            now_ms: NOW_MS,
            window_secs: 300,
        });
        match result {
            Err(e) => assert_no_echo(&e.to_string(), &document),
            Ok(v) => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
                assert_eq!(v.format(), "aws_nitro");
                if mode == 1 {
                    assert!(bound, "a Nitro document not bound to the CSR was accepted");
                    assert!(fresh, "a Nitro document outside the window was accepted");
                }
                assert!(
                    mode != 3,
                    "a truncated Nitro document was accepted ({} bytes)",
                    document.len()
                );
            }
        }
    }
}

impl Default for NitroHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// The `nitro` target.
pub fn nitro(data: &[u8]) {
    static H: OnceLock<NitroHarness> = OnceLock::new();
    H.get_or_init(NitroHarness::new).run(data);
}

/// An OIDC verifier trusting two throwaway issuers (ES256 with a CSR
/// binding claim, RS256 without), and a CSR.
pub struct OidcHarness {
    issuers: Vec<sigil::attest::testing::OidcTestIssuer>,
    attestor: sigil::attest::OidcAttestor,
    csr: Vec<u8>,
    spki: Vec<u8>,
    /// Tokens accepted so far.
    pub accepted: AtomicU64,
}

/// The audience the OIDC harness accepts.
const OIDC_AUDIENCE: &str = "https://sigil.fuzz.test";

impl OidcHarness {
    /// Fresh issuers and CSR.
    pub fn new() -> Self {
        use sigil::attest::testing::OidcTestIssuer;
        let ec = OidcTestIssuer::ec("ec", "https://ec.issuer.test");
        let rsa = OidcTestIssuer::rsa("rsa", "https://rsa.issuer.test");
        let mut ec_cfg = ec.config(&[OIDC_AUDIENCE], vec!["repository".into(), "a/b".into()]);
        ec_cfg.binding_claim = Some("csr_sha256".into());
        let rsa_cfg = rsa.config(&[OIDC_AUDIENCE], vec!["repository".into()]);
        let attestor = sigil::attest::OidcAttestor::new(&[ec_cfg, rsa_cfg]).expect("attestor");
        let (csr, spki) = sigil::attest::testing::test_csr();
        Self {
            issuers: vec![ec, rsa],
            attestor,
            csr,
            spki,
            accepted: AtomicU64::new(0),
        }
    }

    /// Mode byte: 0 raw token; 1 a token signed by one of our issuers with
    /// fuzz-chosen header and claims; 2 a valid token with one character
    /// changed. Never panics; in mode 1 an accepted token has the issuer's
    /// own `alg` and `kid` (no algorithm confusion), its `iss`, our
    /// audience, an `iat` within the window, the CSR hash where the issuer
    /// requires the binding, and its `jti` is the replay key.
    pub fn run(&self, data: &[u8]) {
        use serde_json::{json, Value};
        use sigil::attest::{Attestor, ReplayGuard};
        let mut inp = Input(data);
        let mode = inp.byte() % 3;
        let which = usize::from(inp.byte() % 2);
        let issuer = &self.issuers[which];
        let now = NOW_MS / 1000;
        let hash = hex::encode(Sha256::digest(&self.csr));
        let mut signed: Option<(Value, Value)> = None;
        let token = match mode {
            0 => String::from_utf8_lossy(inp.0).into_owned(),
            1 => {
                let mut header = json!({ "alg": issuer.alg(), "kid": issuer.kid(), "typ": "JWT" });
                match inp.byte() % 6 {
                    0 | 1 => {}
                    2 => {
                        header["alg"] = json!(
                            ["none", "HS256", "RS256", "ES256", "ES384"]
                                [usize::from(inp.byte() % 5)]
                        )
                    }
                    3 => header["kid"] = json!(inp.text()),
                    4 => header = json!({ "alg": issuer.alg() }),
                    _ => header["crit"] = json!([inp.text()]),
                }
                let jti = hex::encode(inp.bytes(8));
                let mut claims = issuer.standard_claims("repo:org/x", OIDC_AUDIENCE, NOW_MS, &jti);
                claims["repository"] = json!("org/x");
                claims["a"] = json!({ "b": "nested" });
                claims["csr_sha256"] = json!(hash);
                for _ in 0..inp.byte() % 4 {
                    let field = [
                        "iss",
                        "sub",
                        "aud",
                        "iat",
                        "nbf",
                        "exp",
                        "jti",
                        "csr_sha256",
                        "a",
                    ][usize::from(inp.byte() % 9)];
                    let value = match inp.byte() % 8 {
                        0 => Value::Null,
                        1 => json!(now + i64::from(inp.u16() as i16)),
                        2 => json!(i64::from_le_bytes(inp.array())),
                        3 => json!(f64::from(inp.u16()) / 7.0),
                        4 => json!([inp.text(), OIDC_AUDIENCE]),
                        5 => json!(inp.text()),
                        6 => json!({ "b": inp.text() }),
                        _ => {
                            if let Some(o) = claims.as_object_mut() {
                                o.remove(field);
                            }
                            continue;
                        }
                    };
                    claims[field] = value;
                }
                let t = issuer.mint_with_header(&header, &claims);
                signed = Some((header, claims));
                t
            }
            _ => {
                let claims = issuer.standard_claims("repo:org/x", OIDC_AUDIENCE, NOW_MS, "j");
                let mut t = issuer.mint(&claims).into_bytes();
                let at = usize::from(inp.u16()) % t.len();
                t[at] = inp.byte();
                String::from_utf8_lossy(&t).into_owned()
            }
        };
        let result = self.attestor.attest(&sigil::attest::AttestInput {
            document: token.as_bytes(),
            csr_der: &self.csr,
            csr_spki_der: &self.spki,
            now_ms: NOW_MS,
            window_secs: 300,
        });
        let v = match result {
            Err(e) => return assert_no_echo(&e.to_string(), token.as_bytes()),
            Ok(v) => v,
        };
        self.accepted.fetch_add(1, Ordering::Relaxed);
        assert_eq!(v.format(), "oidc");
        let Some((header, claims)) = signed else {
            return;
        };
        assert_eq!(
            header["alg"],
            json!(issuer.alg()),
            "accepted with alg {}",
            header["alg"]
        );
        assert_eq!(
            header["kid"],
            json!(issuer.kid()),
            "accepted with kid {}",
            header["kid"]
        );
        assert_eq!(
            claims["iss"],
            json!(issuer.issuer()),
            "accepted with iss {}",
            claims["iss"]
        );
        let aud = &claims["aud"];
        assert!(
            *aud == json!(OIDC_AUDIENCE)
                || aud
                    .as_array()
                    .is_some_and(|a| a.contains(&json!(OIDC_AUDIENCE))),
            "accepted with aud {aud}"
        );
        let iat = claims["iat"]
            .as_f64()
            .expect("accepted without a numeric iat");
        assert!((iat - now as f64).abs() <= 300.0, "accepted with iat {iat}");
        if which == 0 {
            assert_eq!(claims["csr_sha256"], json!(hash), "accepted unbound");
        }
        if let Some(jti) = claims["jti"].as_str() {
            match v.replay_guard() {
                ReplayGuard::Jti { key, .. } => {
                    assert_eq!(*key, format!("{}:{jti}", ["ec", "rsa"][which]))
                }
                other => panic!("OIDC replay guard {other:?}"),
            }
        }
    }
}

impl Default for OidcHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// The `oidc` target.
pub fn oidc(data: &[u8]) {
    static H: OnceLock<OidcHarness> = OnceLock::new();
    H.get_or_init(OidcHarness::new).run(data);
}

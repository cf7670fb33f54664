//! Evidence for `enroll-nitro` and `enroll-oidc`: a throwaway Nitro PKI and
//! an RS256 OIDC issuer from `sigil::attest::testing`, generated for each
//! run, and the broker configuration that trusts them.
//!
//! The generators exist only when sigil-bench is built with the
//! `test-support` feature; without it the scenarios exit 2 and say how to
//! build them. The feature only compiles `sigil::attest::testing` into the
//! binary: the broker's trust store is untouched. The in-process broker is
//! told to trust this run's root and issuer through the same
//! `[attestation]` config file a deployment writes (`nitro_roots_file`, an
//! `[[attestation.oidc]]` issuer with a `jwks_file`), read by
//! `FileConfig::load` and resolved as `sigil serve --config` does.
//!
//! What is prepared before the clock: the CSR key and CSR, and for OIDC the
//! whole token (a CI runner receives its token from the issuer; it does not
//! sign it). A Nitro document must embed the server challenge, so the load
//! generator signs one per request (ES384 by the document signer), as the
//! enclave's NSM would; its cost lands in the load generator's CPU column.

/// Whether this build can run the attestation scenarios.
pub const AVAILABLE: bool = cfg!(feature = "test-support");

/// How to get a build that can.
pub const HOW_TO_BUILD: &str = "cargo build --release --features test-support --bin sigil-bench";

/// The GitHub Actions issuer the OIDC scenario impersonates (with its own key).
#[cfg(feature = "test-support")]
pub const OIDC_ISSUER: &str = "https://token.actions.githubusercontent.com";
/// The `aud` the broker accepts and the tokens carry.
#[cfg(feature = "test-support")]
pub const OIDC_AUDIENCE: &str = "sigil";
/// Issuer alias in selectors: `oidc:gh:<claim>:<value>`.
pub const OIDC_ALIAS: &str = "gh";
/// The repository and ref the tokens are for (the plan entry matches both).
pub const OIDC_REPOSITORY: &str = "org/bench";
/// See [`OIDC_REPOSITORY`].
pub const OIDC_REF: &str = "refs/heads/main";

/// Decoy entries per format in the bench plan, so matching scans a plan of
/// realistic size rather than a single entry.
const DECOYS: usize = 5;

/// The attestation format of a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// AWS Nitro Enclaves attestation document (`aws_nitro`).
    Nitro,
    /// CI / Kubernetes OIDC token (`oidc`).
    Oidc,
}

impl Format {
    /// The `Attestation.format` of requests.
    pub fn wire_name(self) -> &'static str {
        match self {
            Format::Nitro => "aws_nitro",
            Format::Oidc => "oidc",
        }
    }
}

/// PCR*i* of the generated documents: `0x11 * (i + 1)` repeated 48 times
/// (`NitroPki::document`'s defaults).
fn pcr_hex(i: u8) -> String {
    hex::encode([0x11u8.wrapping_mul(i + 1); 48])
}

/// The SPIFFE ID the bench plan grants for `format`.
pub fn granted_id(trust_domain: &str, format: Format) -> String {
    match format {
        Format::Nitro => format!("spiffe://{trust_domain}/enclave/bench"),
        Format::Oidc => format!("spiffe://{trust_domain}/ci/bench"),
    }
}

/// The plan the attestation scenarios apply: one entry per format that the
/// generated evidence matches (Nitro: PCR0–2; OIDC: repository and ref, as
/// tests/it/attest.rs does), plus decoys that it does not.
pub fn plan(trust_domain: &str) -> String {
    let mut p = format!("admins = [\"spiffe://{trust_domain}/admin/bench\"]\n");
    let mut entry = |id: String, selectors: Vec<String>| {
        let list: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
        p.push_str(&format!(
            "[[entries]]\nspiffe_id = {id:?}\nselectors = [{}]\n",
            list.join(", ")
        ));
    };
    entry(
        granted_id(trust_domain, Format::Nitro),
        (0..3)
            .map(|i| format!("aws_nitro:pcr{i}:{}", pcr_hex(i)))
            .collect(),
    );
    entry(
        granted_id(trust_domain, Format::Oidc),
        vec![
            format!("oidc:{OIDC_ALIAS}:repository:{OIDC_REPOSITORY}"),
            format!("oidc:{OIDC_ALIAS}:ref:{OIDC_REF}"),
        ],
    );
    for k in 0..DECOYS {
        entry(
            format!("spiffe://{trust_domain}/enclave/decoy{k}"),
            vec![format!("aws_nitro:pcr0:{}", hex::encode([k as u8; 48]))],
        );
        entry(
            format!("spiffe://{trust_domain}/ci/decoy{k}"),
            vec![format!("oidc:{OIDC_ALIAS}:repository:org/decoy{k}")],
        );
    }
    p
}

/// Single-core costs of the attestation crypto, µs (all `None` when not measured).
#[derive(Debug, Clone, Copy, Default)]
pub struct AttestCosts {
    /// Broker: `NitroAttestor::attest` on a valid document (COSE_Sign1
    /// parse, ES384 signature, leaf → intermediate → root, P-384 each, key binding).
    pub nitro_verify_us: Option<f64>,
    /// Broker: `OidcAttestor::attest` on an RS256 token (parse, RSA-2048 verify, claims).
    pub oidc_verify_us: Option<f64>,
    /// Load generator, per request: build and ES384-sign a Nitro document.
    pub nitro_document_us: Option<f64>,
    /// Before the clock: mint one RS256 token.
    pub oidc_mint_us: Option<f64>,
}

/// Quotes `s` as a TOML basic string.
#[cfg(feature = "test-support")]
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// PEM of one certificate.
#[cfg(feature = "test-support")]
fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes `sigil.toml` (only its `[attestation]` section) into `dir` and
/// resolves it as `sigil serve --config` would.
#[cfg(feature = "test-support")]
fn resolve_config(
    dir: &std::path::Path,
    toml_text: &str,
) -> anyhow::Result<(
    sigil::attest::registry::AttestConfig,
    Vec<sigil::jwks::JwksSource>,
)> {
    let path = dir.join("sigil.toml");
    std::fs::write(&path, toml_text)?;
    let file = sigil::config::FileConfig::load(&path).map_err(anyhow::Error::msg)?;
    let att = file
        .attestation
        .ok_or_else(|| anyhow::anyhow!("{}: no [attestation] section", path.display()))?;
    att.resolve().map_err(anyhow::Error::msg)
}

pub use imp::{measure, Prepared, Source};

#[cfg(feature = "test-support")]
mod imp {
    use std::{
        hint::black_box,
        path::Path,
        sync::atomic::{AtomicU64, Ordering::Relaxed},
    };

    use anyhow::Context;
    use sigil::{
        attest::{
            registry::AttestConfig,
            testing::{test_csr, NitroPki, OidcTestIssuer, Opt},
            AttestInput, Attestor, NitroAttestor, OidcAttestor, Preset,
        },
        clock::{Clock, SystemClock},
        jwks::JwksSource,
    };

    use crate::floor::time_op;

    use super::{
        cert_pem, resolve_config, toml_str, AttestCosts, Format, OIDC_ALIAS, OIDC_AUDIENCE,
        OIDC_ISSUER, OIDC_REF, OIDC_REPOSITORY,
    };

    /// The evidence generator of one run.
    pub enum Source {
        /// A fresh P-384 root → intermediate → document signer.
        Nitro(NitroPki),
        /// A fresh RS256 issuer; `run` and `next` make every `jti` unique.
        Oidc {
            /// The issuer.
            issuer: OidcTestIssuer,
            /// Random per run.
            run: String,
            /// Next `jti` number.
            next: AtomicU64,
        },
    }

    /// What one request needs, prepared before the clock.
    pub enum Prepared {
        /// A CSR and its key's SubjectPublicKeyInfo, which the document binds.
        Nitro {
            /// DER of the PKCS#10 CSR.
            csr: Vec<u8>,
            /// DER SubjectPublicKeyInfo of its key.
            spki: Vec<u8>,
        },
        /// A CSR and a minted token (fresh `jti`, `iat` = preparation time).
        Oidc {
            /// DER of the PKCS#10 CSR.
            csr: Vec<u8>,
            /// The compact JWS.
            jwt: Vec<u8>,
        },
    }

    impl Prepared {
        /// The CSR.
        pub fn csr(&self) -> &[u8] {
            match self {
                Prepared::Nitro { csr, .. } | Prepared::Oidc { csr, .. } => csr,
            }
        }
    }

    fn github_claims(issuer: &OidcTestIssuer, now_ms: i64, jti: &str) -> serde_json::Value {
        let mut c = issuer.standard_claims(
            &format!("repo:{OIDC_REPOSITORY}:ref:{OIDC_REF}"),
            OIDC_AUDIENCE,
            now_ms,
            jti,
        );
        c["repository"] = OIDC_REPOSITORY.into();
        c["repository_id"] = "123456789".into();
        c["repository_owner_id"] = "987654".into();
        c["ref"] = OIDC_REF.into();
        c["workflow"] = "bench".into();
        c["job_workflow_ref"] =
            format!("{OIDC_REPOSITORY}/.github/workflows/bench.yml@{OIDC_REF}").into();
        c["run_id"] = "1".into();
        c
    }

    impl Source {
        /// Generates the PKI or the issuer key (RSA-2048 key generation can
        /// take a second).
        ///
        /// # Errors
        /// None in practice; the signature matches the feature-less build.
        pub fn new(format: Format) -> anyhow::Result<Self> {
            Ok(match format {
                Format::Nitro => Source::Nitro(NitroPki::new()),
                Format::Oidc => {
                    let mut r = [0u8; 6];
                    rand::fill(&mut r[..]);
                    Source::Oidc {
                        issuer: OidcTestIssuer::rsa(OIDC_ALIAS, OIDC_ISSUER),
                        run: hex::encode(r),
                        next: AtomicU64::new(0),
                    }
                }
            })
        }

        /// Its format.
        pub fn format(&self) -> Format {
            match self {
                Source::Nitro(_) => Format::Nitro,
                Source::Oidc { .. } => Format::Oidc,
            }
        }

        /// Whether each request first needs a server challenge (GetChallenge).
        pub fn needs_challenge(&self) -> bool {
            matches!(self, Source::Nitro(_))
        }

        /// Writes the root PEM or the JWKS and a `sigil.toml` trusting it
        /// into `dir`, and returns the resolved attestation configuration.
        ///
        /// # Errors
        /// Writing or resolving failed.
        pub fn trust_config(&self, dir: &Path) -> anyhow::Result<(AttestConfig, Vec<JwksSource>)> {
            let text = match self {
                Source::Nitro(pki) => {
                    let roots = dir.join("nitro-test-root.pem");
                    std::fs::write(&roots, cert_pem(pki.root_der()))?;
                    format!(
                        "# sigil-bench enroll-nitro: trusts this run's generated root instead of AWS's.\n\
                         [attestation]\nnitro_roots_file = {}\n",
                        toml_str(&roots.to_string_lossy())
                    )
                }
                Source::Oidc { issuer, .. } => {
                    let jwks = dir.join("oidc-test-jwks.json");
                    std::fs::write(&jwks, issuer.jwks_json())?;
                    format!(
                        "# sigil-bench enroll-oidc: trusts this run's generated issuer key.\n\
                         [[attestation.oidc]]\nalias = {}\nissuer = {}\naudiences = [{}]\n\
                         jwks_file = {}\npreset = \"github-actions\"\nalgorithms = [\"RS256\"]\n",
                        toml_str(OIDC_ALIAS),
                        toml_str(OIDC_ISSUER),
                        toml_str(OIDC_AUDIENCE),
                        toml_str(&jwks.to_string_lossy())
                    )
                }
            };
            resolve_config(dir, &text).context("attestation config for the in-process broker")
        }

        /// A fresh key and CSR, and for OIDC a token minted now with a new `jti`.
        ///
        /// # Errors
        /// None in practice (the generators panic on internal failures).
        pub fn prepare(&self) -> anyhow::Result<Prepared> {
            let (csr, spki) = test_csr();
            Ok(match self {
                Source::Nitro(_) => Prepared::Nitro { csr, spki },
                Source::Oidc { issuer, run, next } => {
                    let jti = format!("bench-{run}-{}", next.fetch_add(1, Relaxed));
                    let claims = github_claims(issuer, SystemClock.now_ms(), &jti);
                    Prepared::Oidc {
                        csr,
                        jwt: issuer.mint(&claims).into_bytes(),
                    }
                }
            })
        }

        /// The document to send: for Nitro, one signed now over `nonce` and
        /// bound to the CSR key; for OIDC, the prepared token.
        ///
        /// # Errors
        /// Nitro without a nonce, or an item prepared for the other format.
        pub fn document(
            &self,
            item: &Prepared,
            nonce: Option<&[u8]>,
            now_ms: i64,
        ) -> anyhow::Result<Vec<u8>> {
            match (self, item) {
                (Source::Nitro(pki), Prepared::Nitro { spki, .. }) => {
                    let nonce = nonce.context("a Nitro document needs the server challenge")?;
                    Ok(pki
                        .document()
                        .timestamp_ms(u64::try_from(now_ms).unwrap_or(0))
                        .nonce(Opt::Bytes(nonce.to_vec()))
                        .public_key(Opt::Bytes(spki.clone()))
                        .build())
                }
                (Source::Oidc { .. }, Prepared::Oidc { jwt, .. }) => Ok(jwt.clone()),
                _ => anyhow::bail!("item prepared for another format"),
            }
        }
    }

    /// Measures [`AttestCosts`] on the calling thread, about `secs` per operation.
    ///
    /// # Errors
    /// A verifier refused the generated evidence (a bug, not a measurement).
    pub fn measure(secs: f64) -> anyhow::Result<AttestCosts> {
        let now = SystemClock.now_ms();
        let (csr, spki) = test_csr();
        let input = |document| AttestInput {
            document,
            csr_der: &csr,
            csr_spki_der: &spki,
            now_ms: now,
            window_secs: 300,
        };

        let pki = NitroPki::new();
        let nitro = NitroAttestor::new(&pki.nitro_config())?;
        let doc = || {
            pki.document()
                .timestamp_ms(u64::try_from(now).unwrap_or(0))
                .nonce(Opt::Bytes(vec![7u8; 32]))
                .public_key(Opt::Bytes(spki.clone()))
                .build()
        };
        let d = doc();
        let nitro_verify_us = time_op(secs, || {
            black_box(nitro.attest(&input(&d))?);
            Ok(())
        })?;
        let nitro_document_us = time_op(secs, || {
            black_box(doc());
            Ok(())
        })?;

        let gh = OidcTestIssuer::rsa(OIDC_ALIAS, OIDC_ISSUER);
        let oidc =
            OidcAttestor::new(&[gh.config(&[OIDC_AUDIENCE], Preset::GithubActions.claims())])?;
        let token = gh.mint(&github_claims(&gh, now, "floor"));
        let oidc_verify_us = time_op(secs, || {
            black_box(oidc.attest(&input(token.as_bytes()))?);
            Ok(())
        })?;
        let oidc_mint_us = time_op(secs, || {
            black_box(gh.mint(&github_claims(&gh, now, "floor")));
            Ok(())
        })?;
        Ok(AttestCosts {
            nitro_verify_us: Some(nitro_verify_us),
            oidc_verify_us: Some(oidc_verify_us),
            nitro_document_us: Some(nitro_document_us),
            oidc_mint_us: Some(oidc_mint_us),
        })
    }
}

/// Without `test-support` there is no generator: these types are empty, so
/// nothing can be prepared or sent, and [`Source::new`] says how to build one.
#[cfg(not(feature = "test-support"))]
mod imp {
    use std::path::Path;

    use sigil::{attest::registry::AttestConfig, jwks::JwksSource};

    use super::{AttestCosts, Format, HOW_TO_BUILD};

    /// No evidence generator in this build.
    pub enum Source {}

    /// Nothing to prepare in this build.
    pub enum Prepared {}

    impl Prepared {
        pub fn csr(&self) -> &[u8] {
            match *self {}
        }
    }

    impl Source {
        /// # Errors
        /// Always: this build has no generator.
        pub fn new(format: Format) -> anyhow::Result<Self> {
            anyhow::bail!(
                "{} needs the generated test PKI: build sigil-bench with `{HOW_TO_BUILD}`",
                format.wire_name()
            )
        }

        pub fn format(&self) -> Format {
            match *self {}
        }

        pub fn needs_challenge(&self) -> bool {
            match *self {}
        }

        pub fn trust_config(&self, _: &Path) -> anyhow::Result<(AttestConfig, Vec<JwksSource>)> {
            match *self {}
        }

        pub fn prepare(&self) -> anyhow::Result<Prepared> {
            match *self {}
        }

        pub fn document(&self, _: &Prepared, _: Option<&[u8]>, _: i64) -> anyhow::Result<Vec<u8>> {
            match *self {}
        }
    }

    /// Nothing to measure in this build.
    ///
    /// # Errors
    /// Never.
    pub fn measure(_secs: f64) -> anyhow::Result<AttestCosts> {
        Ok(AttestCosts::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parses_and_has_one_match_per_format() {
        let td =
            sigil::identity::TrustDomain::parse("sigil.local").unwrap_or_else(|e| panic!("{e}"));
        let plan = sigil::policy::Plan::parse(plan("sigil.local").as_bytes(), &td)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plan.entries.len(), 2 + 2 * DECOYS);
        let nitro = plan
            .entries
            .iter()
            .find(|e| e.spiffe_id == granted_id("sigil.local", Format::Nitro))
            .map(|e| e.selectors.clone());
        assert_eq!(
            nitro.map(|s| s.len()),
            Some(3),
            "PCR0, PCR1 and PCR2 of the generated documents"
        );
        assert!(pcr_hex(0).starts_with("1111") && pcr_hex(1).starts_with("2222"));
    }

    #[cfg(feature = "test-support")]
    #[test]
    fn pem_wraps_at_64_columns() {
        let pem = cert_pem(&[0xab; 100]);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(
            sigil::cli::pem_certs(&pem),
            vec![vec![0xab; 100]],
            "round trip"
        );
    }

    #[cfg(feature = "test-support")]
    #[test]
    fn toml_strings_round_trip() {
        for v in ["/tmp/x y/sigil.toml", "a\"b", "it's", "back\\slash\n"] {
            let t: toml::Table =
                toml::from_str(&format!("k = {}", toml_str(v))).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.get("k").and_then(toml::Value::as_str), Some(v));
        }
    }

    #[cfg(feature = "test-support")]
    #[test]
    fn generated_evidence_is_trusted_by_the_resolved_config() {
        let dir = crate::TempDir::new("attest-test").unwrap_or_else(|e| panic!("{e}"));
        for format in [Format::Nitro, Format::Oidc] {
            let src = Source::new(format).unwrap_or_else(|e| panic!("{e}"));
            let (cfg, sources) = src
                .trust_config(dir.path())
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(sources.is_empty());
            let reg = sigil::attest::Registry::new(&cfg).unwrap_or_else(|e| panic!("{e}"));
            let item = src.prepare().unwrap_or_else(|e| panic!("{e}"));
            let now = sigil::clock::Clock::now_ms(&sigil::clock::SystemClock);
            let doc = src
                .document(&item, Some(&[9u8; 32]), now)
                .unwrap_or_else(|e| panic!("{e}"));
            let v = sigil::ca::verify_csr(item.csr()).unwrap_or_else(|e| panic!("{e}"));
            let verified = reg
                .get(format.wire_name())
                .and_then(|a| {
                    a.attest(&sigil::attest::AttestInput {
                        document: &doc,
                        csr_der: item.csr(),
                        csr_spki_der: v.spki_der(),
                        now_ms: now,
                        window_secs: 300,
                    })
                })
                .unwrap_or_else(|e| panic!("{format:?}: {e}"));
            let td = sigil::identity::TrustDomain::parse("sigil.local")
                .unwrap_or_else(|e| panic!("{e}"));
            let plan = sigil::policy::Plan::parse(plan("sigil.local").as_bytes(), &td)
                .unwrap_or_else(|e| panic!("{e}"));
            let matching: Vec<_> = plan
                .entries
                .iter()
                .filter(|e| e.selectors.iter().all(|s| verified.selectors().contains(s)))
                .map(|e| e.spiffe_id.clone())
                .collect();
            assert_eq!(matching, vec![granted_id("sigil.local", format)]);
        }
    }
}

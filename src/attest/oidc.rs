//! CI and Kubernetes OIDC identity tokens (format `oidc`): GitHub Actions,
//! GitLab CI `id_tokens`, Kubernetes projected service-account tokens, and
//! any issuer that signs RS256/ES256 JWTs with a published JWKS
//! (formats.md §4, "common algorithm").
//!
//! The issuers, their keys and their audiences are configuration; nothing
//! that selects a key or an algorithm is taken from the token. For a compact
//! JWS (RFC 7515 §7.1) [`OidcAttestor::attest`] checks, failing closed:
//!
//! 1. size ≤ [`MAX_DOCUMENT_LEN`]; three base64url parts; header and
//!    payload are JSON objects;
//! 2. the *unverified* header: `alg` must be RS256 or ES256 (`none`, `HS*`,
//!    EdDSA and everything else are refused by name), no `crit`, a string
//!    `kid`; `jku`/`jwk`/`x5u`/`x5c` are ignored, never used to find a key;
//! 3. the *unverified* `iss` picks a configured issuer by exact match; the
//!    alg must be in that issuer's allow-list and the `kid` in its JWKS,
//!    with a key of the alg's type (no RSA/EC confusion);
//! 4. the signature, with that key;
//! 5. `aud` (string or array) contains a configured audience; `exp`
//!    required and not passed; `nbf` not in the future when present; `iat`
//!    required and within `window_secs` of now (this also caps the token's
//!    age); `exp`/`nbf` get [`OIDC_LEEWAY_SECS`] of clock-skew leeway;
//! 6. `jti` required: it is the replay guard ([`ReplayGuard::Jti`]); `sub`
//!    required: the node is `<alias>:<sub>`;
//! 7. the CSR binding claim, when configured;
//! 8. selectors `oidc:<alias>:<claim>:<value>` for each configured claim
//!    present as a string, bool (`true`/`false`) or number. A claim name
//!    with `/` is a path into nested objects
//!    (`kubernetes.io/serviceaccount/name`). Arrays, objects and null never
//!    become selectors. A selected value with a control character, or
//!    longer than 1024 bytes, fails the token.
//!
//! # CSR binding and its trade-off
//! With `binding_claim` configured, the claim must hold the lowercase hex
//! SHA-256 of the **CSR DER** (the same hash Nitro's `user_data` carries),
//! and the attestation is [`CsrBinding::OidcClaim`]. GitHub, GitLab and
//! Kubernetes cannot put an arbitrary claim in their tokens, so for them
//! the binding is [`CsrBinding::None`]: the token is a bearer credential,
//! and whoever presents it first gets the identity. The required `jti`,
//! consumed by the broker until the token can no longer be accepted, stops a
//! second use; short token lifetimes and a tight `window_secs` shrink the
//! theft window. Kubernetes tokens carry a `jti` only with the
//! `ServiceAccountTokenJTI` feature (on by default since 1.30); tokens without
//! one are refused.
//!
//! Must not: fetch anything (JWKS comes from configuration), panic on any
//! input, or echo the token in an error.

use std::{
    collections::{btree_map::Entry, BTreeMap, BTreeSet},
    fmt,
};

use aws_lc_rs::signature::{
    ParsedPublicKey, RsaPublicKeyComponents, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256,
};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde_json::{Map, Value};

use super::{
    config_err, invalid, quoted, sha256, within_window, AttestError, AttestInput, Attestor,
    CsrBinding, ReplayGuard, VerifiedAttestation, MAX_DOCUMENT_LEN,
};

/// Clock-skew leeway applied to `exp` and `nbf`, in seconds (the 60 s
/// formats.md §4 and Vault's `clock_skew_leeway` use). `iat` uses the
/// caller's `window_secs` instead.
pub const OIDC_LEEWAY_SECS: i64 = 60;

const FORMAT: &str = "oidc";
/// Longest claim value (selector, `sub`, `jti`, binding) we accept, in bytes.
const MAX_CLAIM_LEN: usize = 1024;
/// Longest issuer alias; aliases are `[A-Za-z0-9._-]` so selectors and
/// replay keys split unambiguously on `:`.
const MAX_ALIAS_LEN: usize = 64;
/// RSA keys below this size are refused at configuration time.
const MIN_RSA_BITS: usize = 2048;
/// aws-lc-rs's RS256 verification ceiling.
const MAX_RSA_BITS: usize = 8192;

/// One trusted OIDC issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcIssuer {
    /// Short name used in selectors (`oidc:<alias>:…`), node names and
    /// replay keys: 1..=64 of `[A-Za-z0-9._-]`.
    pub alias: String,
    /// The exact `iss` value, e.g. `https://token.actions.githubusercontent.com`.
    pub issuer: String,
    /// Accepted `aud` values; the token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// The issuer's JWKS document (`{"keys": [...]}`). RSA keys (2048..=8192
    /// bits) and EC P-256 keys with a `kid` are used; keys of other types,
    /// with `use` other than `sig`, or an `alg` other than RS256/ES256 are skipped.
    pub jwks_json: String,
    /// Claims that become selectors. `/` separates a path into nested
    /// objects: `kubernetes.io/serviceaccount/name` is
    /// `claims["kubernetes.io"]["serviceaccount"]["name"]`.
    pub claims: Vec<String>,
    /// Accepted `alg` values: a non-empty subset of `RS256`, `ES256`.
    pub algorithms: Vec<String>,
    /// A claim (path syntax as in `claims`) that must hold the lowercase
    /// hex SHA-256 of the CSR DER, for issuers that can carry one. `None`:
    /// tokens are not bound to the CSR key (see the module docs).
    pub binding_claim: Option<String>,
}

/// Selector claim sets for well-known issuers (formats.md §4). Prefer the
/// immutable ids (`repository_id`, `project_id`) in policy; names can be
/// re-registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Preset {
    /// GitHub Actions (`https://token.actions.githubusercontent.com`).
    GithubActions,
    /// GitLab CI `id_tokens`.
    GitlabCi,
    /// Kubernetes projected service-account tokens.
    Kubernetes,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 3] = [Self::GithubActions, Self::GitlabCi, Self::Kubernetes];

    /// The claims this preset turns into selectors.
    pub fn claims(&self) -> Vec<String> {
        let names: &[&str] = match self {
            Self::GithubActions => &[
                "repository",
                "repository_id",
                "repository_owner_id",
                "ref",
                "workflow",
                "job_workflow_ref",
                "environment",
                "sub",
            ],
            Self::GitlabCi => &[
                "project_path",
                "project_id",
                "ref",
                "ref_protected",
                "pipeline_source",
            ],
            Self::Kubernetes => &[
                "kubernetes.io/namespace",
                "kubernetes.io/serviceaccount/name",
                "kubernetes.io/pod/name",
                "sub",
            ],
        };
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The preset's config name: `github-actions`, `gitlab-ci` or `kubernetes`.
    pub fn name(&self) -> &str {
        match self {
            Self::GithubActions => "github-actions",
            Self::GitlabCi => "gitlab-ci",
            Self::Kubernetes => "kubernetes",
        }
    }

    /// Parses a config name: the [`Self::name`] forms, or `github`,
    /// `gitlab`, `k8s`.
    pub fn parse(s: &str) -> Option<Preset> {
        match s {
            "github-actions" | "github" => Some(Self::GithubActions),
            "gitlab-ci" | "gitlab" => Some(Self::GitlabCi),
            "kubernetes" | "k8s" => Some(Self::Kubernetes),
            _ => None,
        }
    }
}

/// The algorithms we verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    /// Maps an `alg` name, refusing everything but RS256/ES256 with a
    /// message that says why.
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "RS256" => Ok(Self::Rs256),
            "ES256" => Ok(Self::Es256),
            n if n.eq_ignore_ascii_case("none") => {
                Err("alg none is refused (unsigned token)".to_owned())
            }
            n if n.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("HS")) => Err(format!(
                "alg {} is refused: symmetric (HMAC) algorithms are never accepted",
                quoted(n)
            )),
            n => Err(format!(
                "alg {} is not supported (RS256 or ES256 only)",
                quoted(n)
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verification key from a JWKS.
enum JwkKey {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// A validated P-256 point.
    P256(ParsedPublicKey),
}

struct Jwk {
    /// The JWK's own `alg`, when it names one.
    alg: Option<Alg>,
    key: JwkKey,
}

impl Jwk {
    /// The alg this key's type verifies.
    fn native_alg(&self) -> Alg {
        match self.key {
            JwkKey::Rsa { .. } => Alg::Rs256,
            JwkKey::P256(_) => Alg::Es256,
        }
    }

    fn verify(&self, kid: &str, alg: Alg, message: &[u8], sig: &[u8]) -> Result<(), AttestError> {
        let native = self.native_alg();
        if native != alg || self.alg.is_some_and(|a| a != alg) {
            return Err(invalid(format!(
                "key {} is for {native}; the token's alg {alg} cannot use it",
                quoted(kid)
            )));
        }
        let ok = match &self.key {
            JwkKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            // JWS ES256 signatures are raw r‖s (RFC 7518 §3.4), 64 bytes.
            JwkKey::P256(key) => sig.len() == 64 && key.verify_sig(message, sig).is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(invalid("JWT signature does not verify"))
        }
    }
}

/// A claim name and its path segments.
#[derive(Debug, Clone)]
struct ClaimPath {
    name: String,
    segments: Vec<String>,
}

impl ClaimPath {
    fn parse(name: &str) -> Result<Self, String> {
        let segments: Vec<String> = name.split('/').map(str::to_owned).collect();
        if name.is_empty()
            || segments.iter().any(String::is_empty)
            || name.chars().any(char::is_control)
        {
            return Err(format!("bad claim name {}", quoted(name)));
        }
        Ok(Self {
            name: name.to_owned(),
            segments,
        })
    }

    /// The claim's value, navigating nested objects.
    fn lookup<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.segments.split_first()?;
        let mut value = claims.get(first)?;
        for segment in rest {
            value = value.as_object()?.get(segment)?;
        }
        Some(value)
    }
}

/// A configured issuer, validated.
struct Issuer {
    alias: String,
    issuer: String,
    audiences: Vec<String>,
    /// Replaced as a whole by [`OidcAttestor::update_jwks`] (key rotation at the issuer).
    keys: std::sync::RwLock<std::sync::Arc<BTreeMap<String, Jwk>>>,
    claims: Vec<ClaimPath>,
    algorithms: Vec<Alg>,
    binding_claim: Option<ClaimPath>,
}

/// The `oidc` verifier for a set of issuers. Built by [`super::Registry::new`].
pub struct OidcAttestor {
    issuers: Vec<Issuer>,
}

impl fmt::Debug for OidcAttestor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcAttestor")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &i.alias).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl OidcAttestor {
    /// Validates the issuers and their JWKS.
    ///
    /// # Errors
    /// [`AttestError::Config`] for an empty list, a bad or duplicate alias,
    /// a duplicate `issuer`, no audience, an algorithm outside RS256/ES256,
    /// a malformed JWKS or one with no usable key, or a bad claim name.
    pub fn new(issuers: &[OidcIssuer]) -> Result<Self, AttestError> {
        if issuers.is_empty() {
            return Err(config_err("oidc: no issuer configured"));
        }
        let mut aliases = BTreeSet::new();
        let mut urls = BTreeSet::new();
        let mut out = Vec::with_capacity(issuers.len());
        for cfg in issuers {
            let issuer = Issuer::new(cfg)?;
            if !aliases.insert(issuer.alias.clone()) {
                return Err(config_err(format!(
                    "oidc: duplicate issuer alias {}",
                    quoted(&issuer.alias)
                )));
            }
            if !urls.insert(issuer.issuer.clone()) {
                return Err(config_err(format!(
                    "oidc: issuer {} is configured twice",
                    quoted(&issuer.issuer)
                )));
            }
            out.push(issuer);
        }
        Ok(Self { issuers: out })
    }
}

impl OidcAttestor {
    /// Replaces issuer `alias`'s keys with a freshly fetched JWKS (the
    /// issuer rotated its signing keys). The old keys stay when the new
    /// document is unusable.
    ///
    /// # Errors
    /// [`AttestError::Config`] for an unknown alias or an unusable JWKS.
    pub fn update_jwks(&self, alias: &str, jwks_json: &str) -> Result<usize, AttestError> {
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.alias == alias)
            .ok_or_else(|| config_err(format!("oidc: no issuer {}", quoted(alias))))?;
        let keys = parse_jwks(jwks_json)
            .map_err(|e| config_err(format!("oidc issuer {alias}: JWKS: {e}")))?;
        if !keys
            .values()
            .any(|k| issuer.algorithms.contains(&k.native_alg()))
        {
            return Err(config_err(format!(
                "oidc issuer {alias}: JWKS has no key usable with the allowed algorithms"
            )));
        }
        let n = keys.len();
        *issuer
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(keys);
        Ok(n)
    }
}

impl Issuer {
    fn new(cfg: &OidcIssuer) -> Result<Self, AttestError> {
        let alias = &cfg.alias;
        if alias.is_empty()
            || alias.len() > MAX_ALIAS_LEN
            || !alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(config_err(format!(
                "oidc: issuer alias {} must be 1..={MAX_ALIAS_LEN} of [A-Za-z0-9._-]",
                quoted(alias)
            )));
        }
        let ctx = |msg: String| config_err(format!("oidc issuer {alias}: {msg}"));
        if cfg.issuer.is_empty() || cfg.issuer.chars().any(char::is_control) {
            return Err(ctx("issuer must be a non-empty URL".into()));
        }
        if cfg.audiences.is_empty() || cfg.audiences.iter().any(String::is_empty) {
            return Err(ctx("at least one non-empty audience is required".into()));
        }
        if cfg.algorithms.is_empty() {
            return Err(ctx("no algorithm allowed (use RS256 and/or ES256)".into()));
        }
        let mut algorithms = Vec::new();
        for name in &cfg.algorithms {
            let alg = Alg::parse(name).map_err(ctx)?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        let keys = parse_jwks(&cfg.jwks_json).map_err(|e| ctx(format!("JWKS: {e}")))?;
        if !keys.values().any(|k| algorithms.contains(&k.native_alg())) {
            return Err(ctx(
                "JWKS has no key with a kid usable with the allowed algorithms".into(),
            ));
        }
        let claims = cfg
            .claims
            .iter()
            .map(|c| ClaimPath::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ctx)?;
        let binding_claim = cfg
            .binding_claim
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .map_err(ctx)?;
        Ok(Self {
            alias: alias.clone(),
            issuer: cfg.issuer.clone(),
            audiences: cfg.audiences.clone(),
            keys: std::sync::RwLock::new(std::sync::Arc::new(keys)),
            claims,
            algorithms,
            binding_claim,
        })
    }
}

/// Parses a JWKS, keeping the keys we can use (see [`OidcIssuer::jwks_json`]).
fn parse_jwks(json: &str) -> Result<BTreeMap<String, Jwk>, String> {
    let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e})"))?;
    let entries = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("no \"keys\" array")?;
    let mut keys = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let jwk = entry
            .as_object()
            .ok_or_else(|| format!("keys[{i}] is not an object"))?;
        let text = |name: &str| jwk.get(name).and_then(Value::as_str);
        // A key without kid can never be selected (tokens must name one).
        let Some(kid) = text("kid") else { continue };
        if text("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let alg = match text("alg") {
            None => None,
            Some("RS256") => Some(Alg::Rs256),
            Some("ES256") => Some(Alg::Es256),
            Some(_) => continue, // a key for an algorithm we never accept
        };
        let b64 = |name: &str| -> Result<Vec<u8>, String> {
            let s = text(name).ok_or_else(|| format!("key {}: no {name}", quoted(kid)))?;
            URL_SAFE_NO_PAD
                .decode(s)
                .map_err(|_| format!("key {}: {name} is not base64url", quoted(kid)))
        };
        let key = match text("kty") {
            Some("RSA") => {
                let n = strip_leading_zeros(b64("n")?);
                let e = strip_leading_zeros(b64("e")?);
                let bits = n
                    .first()
                    .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) || e.is_empty() || e.len() > 8 {
                    return Err(format!(
                        "key {}: RSA key must be {MIN_RSA_BITS}..={MAX_RSA_BITS} bits",
                        quoted(kid)
                    ));
                }
                JwkKey::Rsa { n, e }
            }
            Some("EC") => {
                if text("crv") != Some("P-256") {
                    continue;
                }
                let (x, y) = (b64("x")?, b64("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(format!(
                        "key {}: P-256 x and y must be 32 bytes",
                        quoted(kid)
                    ));
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
                    .map_err(|_| format!("key {}: not a valid P-256 point", quoted(kid)))?;
                JwkKey::P256(parsed)
            }
            _ => continue, // OKP, oct, …: not for us
        };
        let jwk = Jwk { alg, key };
        if alg.is_some_and(|a| a != jwk.native_alg()) {
            return Err(format!(
                "key {}: alg {} does not fit its key type",
                quoted(kid),
                alg.map_or("", Alg::as_str)
            ));
        }
        match keys.entry(kid.to_owned()) {
            Entry::Occupied(_) => return Err(format!("duplicate kid {}", quoted(kid))),
            Entry::Vacant(v) => {
                v.insert(jwk);
            }
        }
    }
    Ok(keys)
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

impl Attestor for OidcAttestor {
    fn format(&self) -> &'static str {
        FORMAT
    }

    #[tracing::instrument(level = "debug", skip_all, fields(format = FORMAT))]
    fn attest(&self, input: &AttestInput<'_>) -> Result<VerifiedAttestation, AttestError> {
        if input.document.len() > MAX_DOCUMENT_LEN {
            return Err(AttestError::TooLarge);
        }
        let token =
            std::str::from_utf8(input.document).map_err(|_| invalid("token is not UTF-8"))?;
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(sig_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "not a compact JWS (expected three dot-separated parts)",
            ));
        };

        // Unverified header: only used to refuse, and to name a key that
        // configuration supplies.
        let header = decode_object(header_b64, "header")?;
        let alg = match header.get("alg") {
            Some(Value::String(name)) => Alg::parse(name).map_err(invalid)?,
            Some(_) => return Err(invalid("JWT header alg is not a string")),
            None => return Err(invalid("JWT header has no alg")),
        };
        if header.contains_key("crit") {
            return Err(invalid("JWT header has crit; no extension is supported"));
        }
        let kid = match header.get("kid") {
            Some(Value::String(kid)) => kid.as_str(),
            Some(_) => return Err(invalid("JWT header kid is not a string")),
            None => return Err(invalid("JWT header has no kid")),
        };

        // Unverified iss: only used to pick configuration by exact match.
        let claims = decode_object(payload_b64, "payload")?;
        let iss = match claims.get("iss") {
            Some(Value::String(iss)) => iss.as_str(),
            Some(_) => return Err(invalid("iss is not a string")),
            None => return Err(invalid("token has no iss")),
        };
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| invalid(format!("unknown issuer {}", quoted(iss))))?;
        let alias = issuer.alias.as_str();
        if !issuer.algorithms.contains(&alg) {
            return Err(invalid(format!(
                "alg {alg} is not allowed for issuer {alias}"
            )));
        }
        let keys = issuer
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let jwk = keys
            .get(kid)
            .ok_or_else(|| invalid(format!("unknown kid {} for issuer {alias}", quoted(kid))))?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| invalid("JWT signature is not base64url"))?;
        let signing_input = token
            .get(..header_b64.len() + 1 + payload_b64.len())
            .ok_or_else(|| invalid("not a compact JWS"))?;
        jwk.verify(kid, alg, signing_input.as_bytes(), &sig)?;

        // Authentic from here on; now the claims.
        issuer.check_audience(&claims)?;
        let exp = numeric_date(&claims, "exp")?.ok_or_else(|| invalid("token has no exp"))?;
        let expires_at_ms = (i128::from(exp) + i128::from(OIDC_LEEWAY_SECS)) * 1000;
        if i128::from(input.now_ms) >= expires_at_ms {
            return Err(invalid(format!(
                "token expired (exp is {} s ago, leeway {OIDC_LEEWAY_SECS} s)",
                (i128::from(input.now_ms) - i128::from(exp) * 1000) / 1000
            )));
        }
        if let Some(nbf) = numeric_date(&claims, "nbf")? {
            if i128::from(nbf) * 1000
                > i128::from(input.now_ms) + i128::from(OIDC_LEEWAY_SECS) * 1000
            {
                return Err(invalid(format!(
                    "token not yet valid (nbf is in the future beyond the {OIDC_LEEWAY_SECS} s leeway)"
                )));
            }
        }
        let iat = numeric_date(&claims, "iat")?.ok_or_else(|| invalid("token has no iat"))?;
        if !within_window(input.now_ms, i128::from(iat) * 1000, input.window_secs) {
            return Err(invalid(format!(
                "iat outside the window: issued {} s from now, window is {} s",
                (i128::from(iat) * 1000 - i128::from(input.now_ms)) / 1000,
                input.window_secs.max(0)
            )));
        }
        let jti = required_text(&claims, "jti")
            .map_err(|e| invalid(format!("{e}; single use is enforced by jti")))?;
        let sub = required_text(&claims, "sub").map_err(invalid)?;

        let csr_binding = match &issuer.binding_claim {
            None => CsrBinding::None,
            Some(path) => {
                let want = hex::encode(sha256(input.csr_der));
                match path.lookup(&claims) {
                    _ if input.csr_der.is_empty() => {
                        return Err(invalid("no CSR to bind the token to"))
                    }
                    Some(Value::String(got)) if got.to_ascii_lowercase() == want => {
                        CsrBinding::OidcClaim
                    }
                    Some(_) => {
                        return Err(invalid(format!(
                            "binding claim {} does not match SHA-256 of the CSR",
                            path.name
                        )))
                    }
                    None => return Err(invalid(format!("binding claim {} is missing", path.name))),
                }
            }
        };

        let mut selectors = Vec::with_capacity(issuer.claims.len());
        for path in &issuer.claims {
            let value = match path.lookup(&claims) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                // Absent, null, arrays and objects: no selector.
                _ => continue,
            };
            check_claim_value(&path.name, &value)?;
            selectors.push(format!("{FORMAT}:{alias}:{}:{value}", path.name));
        }

        Ok(VerifiedAttestation::new(
            FORMAT,
            selectors,
            ReplayGuard::Jti {
                key: format!("{alias}:{jti}"),
                // The last instant this token is accepted: remembering the
                // jti any shorter would reopen a replay window.
                expires_at_ms: i64::try_from(expires_at_ms).unwrap_or(i64::MAX),
            },
            format!("{alias}:{sub}"),
            csr_binding,
        ))
    }
}

impl Issuer {
    /// `aud` is a string or an array of strings containing an accepted audience.
    fn check_audience(&self, claims: &Map<String, Value>) -> Result<(), AttestError> {
        let accepted = |a: &str| self.audiences.iter().any(|x| x == a);
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => accepted(a),
            Some(Value::Array(items)) => {
                let mut any = false;
                for item in items {
                    let Value::String(a) = item else {
                        return Err(invalid("aud array has a non-string entry"));
                    };
                    any |= accepted(a);
                }
                any
            }
            Some(_) => return Err(invalid("aud is not a string or array")),
            None => return Err(invalid("token has no aud")),
        };
        if ok {
            Ok(())
        } else {
            Err(invalid(format!(
                "aud does not contain an audience accepted for issuer {}",
                self.alias
            )))
        }
    }
}

/// Decodes one base64url JSON-object part.
fn decode_object(part: &str, what: &str) -> Result<Map<String, Value>, AttestError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| invalid(format!("JWT {what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(invalid(format!("JWT {what} is not a JSON object"))),
        Err(_) => Err(invalid(format!("JWT {what} is not valid JSON"))),
    }
}

/// A NumericDate claim (RFC 7519 §2) in whole seconds; `None` when absent.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, AttestError> {
    // ±10^11 s is ±3000 years: anything outside is nonsense, and the bound
    // keeps later `* 1000` far from overflow.
    const LIMIT: i64 = 100_000_000_000;
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let secs = match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.abs() < LIMIT as f64)
                .map(|f| f.floor() as i64)
        }),
        _ => None,
    };
    match secs {
        Some(s) if s.abs() < LIMIT => Ok(Some(s)),
        _ => Err(invalid(format!("{name} is not a NumericDate"))),
    }
}

/// A required non-empty string claim, checked like a selector value.
fn required_text<'a>(claims: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => {
            check_claim_value(name, s).map_err(|e| match e {
                AttestError::Invalid(m) => m,
                other => other.to_string(),
            })?;
            Ok(s)
        }
        Some(Value::String(_)) => Err(format!("{name} is empty")),
        Some(_) => Err(format!("{name} is not a string")),
        None => Err(format!("token has no {name}")),
    }
}

/// Selector values are matched by policy and written to logs: no control
/// characters, bounded length.
fn check_claim_value(name: &str, value: &str) -> Result<(), AttestError> {
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "claim {name} contains a control character"
        )));
    }
    if value.len() > MAX_CLAIM_LEN {
        return Err(invalid(format!(
            "claim {name} is longer than {MAX_CLAIM_LEN} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::attest::testing::{b64, test_csr, OidcTestIssuer, NOW_MS};

    const WINDOW: i64 = 300;
    const GH_ISS: &str = "https://token.actions.githubusercontent.com";
    const GL_ISS: &str = "https://gitlab.example.com";
    const K8S_ISS: &str = "https://kubernetes.default.svc.cluster.local";

    fn run(a: &OidcAttestor, token: &str, now_ms: i64) -> Result<VerifiedAttestation, AttestError> {
        run_csr(a, token, now_ms, b"csr-der-bytes")
    }

    fn run_csr(
        a: &OidcAttestor,
        token: &str,
        now_ms: i64,
        csr: &[u8],
    ) -> Result<VerifiedAttestation, AttestError> {
        a.attest(&AttestInput {
            document: token.as_bytes(),
            csr_der: csr,
            csr_spki_der: b"spki",
            now_ms,
            window_secs: WINDOW,
        })
    }

    fn err(r: Result<VerifiedAttestation, AttestError>) -> String {
        match r {
            Err(AttestError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// A GitHub-shaped issuer (ES256 to keep the tests fast; RS256 is
    /// covered by the GitLab and alg-confusion tests) and a token.
    fn github() -> (OidcTestIssuer, OidcAttestor) {
        let gh = OidcTestIssuer::ec("gh", GH_ISS);
        let a = OidcAttestor::new(&[gh.config(
            &["https://github.com/octo-org"],
            Preset::GithubActions.claims(),
        )])
        .unwrap();
        (gh, a)
    }

    fn gh_claims(gh: &OidcTestIssuer) -> Value {
        let mut c = gh.standard_claims(
            "repo:octo-org/octo-repo:environment:prod",
            "https://github.com/octo-org",
            NOW_MS,
            "example-id-1",
        );
        let extra = json!({
            "ref": "refs/heads/main",
            "sha": "example-sha",
            "repository": "octo-org/octo-repo",
            "repository_owner": "octo-org",
            "repository_owner_id": "65",
            "repository_id": "35129377",
            "actor": "octocat",
            "workflow": "deploy",
            "job_workflow_ref": "octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
            "environment": "prod",
            "run_id": "1",
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    }

    #[test]
    fn github_actions_token_gives_preset_selectors() {
        let (gh, a) = github();
        let v = run(&a, &gh.mint(&gh_claims(&gh)), NOW_MS).unwrap();
        assert_eq!(v.format(), "oidc");
        assert_eq!(v.node(), "gh:repo:octo-org/octo-repo:environment:prod");
        assert_eq!(v.csr_binding(), CsrBinding::None);
        assert_eq!(
            v.replay_guard(),
            &ReplayGuard::Jti {
                key: "gh:example-id-1".into(),
                expires_at_ms: NOW_MS + 300_000 + 60_000,
            }
        );
        let mut want = vec![
            "oidc:gh:environment:prod",
            "oidc:gh:job_workflow_ref:octo-org/octo-repo/.github/workflows/deploy.yml@refs/heads/main",
            "oidc:gh:ref:refs/heads/main",
            "oidc:gh:repository:octo-org/octo-repo",
            "oidc:gh:repository_id:35129377",
            "oidc:gh:repository_owner_id:65",
            "oidc:gh:sub:repo:octo-org/octo-repo:environment:prod",
            "oidc:gh:workflow:deploy",
        ];
        want.sort();
        assert_eq!(v.selectors(), want);
    }

    #[test]
    fn gitlab_token_with_rs256_numbers_and_bools() {
        let gl = OidcTestIssuer::rsa("gitlab", GL_ISS);
        let a = OidcAttestor::new(&[gl.config(&["sigil"], Preset::GitlabCi.claims())]).unwrap();
        let mut c = gl.standard_claims(
            "project_path:grp/proj:ref_type:branch:ref:main",
            "sigil",
            NOW_MS,
            "gl-1",
        );
        let extra = json!({
            "project_path": "grp/proj",
            "project_id": 42,
            "ref": "main",
            "ref_protected": true,
            "pipeline_source": "push",
            "namespace_id": "7",
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let v = run(&a, &gl.mint(&c), NOW_MS).unwrap();
        assert_eq!(
            v.selectors(),
            [
                "oidc:gitlab:pipeline_source:push",
                "oidc:gitlab:project_id:42",
                "oidc:gitlab:project_path:grp/proj",
                "oidc:gitlab:ref:main",
                "oidc:gitlab:ref_protected:true",
            ]
        );
        assert_eq!(
            v.node(),
            "gitlab:project_path:grp/proj:ref_type:branch:ref:main"
        );
    }

    #[test]
    fn kubernetes_token_nested_claims() {
        let k = OidcTestIssuer::ec("prod-cluster", K8S_ISS);
        let mut claims = Preset::Kubernetes.claims();
        claims.push("kubernetes.io/pod".into()); // an object: never a selector
        claims.push("groups".into()); // an array: never a selector
        claims.push("kubernetes.io/missing/deep".into());
        let a = OidcAttestor::new(&[k.config(&["sigil"], claims)]).unwrap();
        let mut c = k.standard_claims("system:serviceaccount:payments:api", "sigil", NOW_MS, "k-1");
        c["aud"] = json!(["other", "sigil"]);
        c["groups"] = json!(["a", "b"]);
        c["kubernetes.io"] = json!({
            "namespace": "payments",
            "serviceaccount": {"name": "api", "uid": "u1"},
            "pod": {"name": "api-7d9f", "uid": "u2"},
            "warnafter": 1,
        });
        let v = run(&a, &k.mint(&c), NOW_MS).unwrap();
        assert_eq!(
            v.selectors(),
            [
                "oidc:prod-cluster:kubernetes.io/namespace:payments",
                "oidc:prod-cluster:kubernetes.io/pod/name:api-7d9f",
                "oidc:prod-cluster:kubernetes.io/serviceaccount/name:api",
                "oidc:prod-cluster:sub:system:serviceaccount:payments:api",
            ]
        );
        assert_eq!(v.node(), "prod-cluster:system:serviceaccount:payments:api");
    }

    #[test]
    fn alg_none_and_hmac_refused() {
        let (gh, a) = github();
        let claims = gh_claims(&gh);
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "kid": gh.kid()})
                .to_string()
                .as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        assert_eq!(
            err(run(&a, &none, NOW_MS)),
            "alg none is refused (unsigned token)"
        );
        let none_upper = none.replace(
            &b64(json!({"alg": "none", "kid": gh.kid()})
                .to_string()
                .as_bytes()),
            &b64(json!({"alg": "NONE", "kid": gh.kid()})
                .to_string()
                .as_bytes()),
        );
        assert_eq!(
            err(run(&a, &none_upper, NOW_MS)),
            "alg none is refused (unsigned token)"
        );

        // HS256 keyed with the issuer's public key (RS256 issuer, the classic case).
        let rsa = OidcTestIssuer::rsa("gh", GH_ISS);
        let a = OidcAttestor::new(&[rsa.config(&["https://github.com/octo-org"], vec![])]).unwrap();
        let forged = rsa.mint_hs256_with_public_key(&gh_claims(&rsa));
        assert_eq!(
            err(run(&a, &forged, NOW_MS)),
            "alg \"HS256\" is refused: symmetric (HMAC) algorithms are never accepted"
        );
        let eddsa =
            rsa.mint_with_header(&json!({"alg": "EdDSA", "kid": rsa.kid()}), &gh_claims(&rsa));
        assert_eq!(
            err(run(&a, &eddsa, NOW_MS)),
            "alg \"EdDSA\" is not supported (RS256 or ES256 only)"
        );
        let rs384 =
            rsa.mint_with_header(&json!({"alg": "RS384", "kid": rsa.kid()}), &gh_claims(&rsa));
        assert!(err(run(&a, &rs384, NOW_MS)).contains("not supported"));
        let no_alg = rsa.mint_with_header(&json!({"kid": rsa.kid()}), &gh_claims(&rsa));
        assert_eq!(err(run(&a, &no_alg, NOW_MS)), "JWT header has no alg");
    }

    #[test]
    fn alg_must_be_allowed_for_issuer_and_fit_key() {
        let rsa = OidcTestIssuer::rsa("gh", GH_ISS);
        let mut cfg = rsa.config(&["https://github.com/octo-org"], vec![]);
        cfg.algorithms = vec!["ES256".into(), "RS256".into()];
        let a = OidcAttestor::new(&[cfg.clone()]).unwrap();
        // ES256 header naming the RSA key: refused before any verification.
        let t = rsa.mint_with_header(&json!({"alg": "ES256", "kid": rsa.kid()}), &gh_claims(&rsa));
        assert_eq!(
            err(run(&a, &t, NOW_MS)),
            format!(
                "key \"{}\" is for RS256; the token's alg ES256 cannot use it",
                rsa.kid()
            )
        );
        // Issuer allowing only ES256.
        cfg.algorithms = vec!["ES256".into()];
        let ec = OidcTestIssuer::ec("x", "https://x");
        let mut jwks: Value = serde_json::from_str(&rsa.jwks_json()).unwrap();
        jwks["keys"].as_array_mut().unwrap().push(ec.jwk());
        cfg.jwks_json = jwks.to_string();
        let a = OidcAttestor::new(&[cfg]).unwrap();
        assert_eq!(
            err(run(&a, &rsa.mint(&gh_claims(&rsa)), NOW_MS)),
            "alg RS256 is not allowed for issuer gh"
        );
    }

    #[test]
    fn kid_rules() {
        let (gh, a) = github();
        let claims = gh_claims(&gh);
        let t = gh.mint_with_header(&json!({"alg": "ES256", "kid": "nope"}), &claims);
        assert_eq!(
            err(run(&a, &t, NOW_MS)),
            "unknown kid \"nope\" for issuer gh"
        );
        let t = gh.mint_with_header(&json!({"alg": "ES256"}), &claims);
        assert_eq!(err(run(&a, &t, NOW_MS)), "JWT header has no kid");
        let t = gh.mint_with_header(&json!({"alg": "ES256", "kid": 5}), &claims);
        assert_eq!(err(run(&a, &t, NOW_MS)), "JWT header kid is not a string");
        let t = gh.mint_with_header(
            &json!({"alg": "ES256", "kid": gh.kid(), "crit": ["exp"]}),
            &claims,
        );
        assert!(err(run(&a, &t, NOW_MS)).contains("crit"));
        // An embedded jwk header is ignored: the forger's own key does not help.
        let forger = OidcTestIssuer::ec("gh", GH_ISS);
        let t = forger.mint_with_header(
            &json!({"alg": "ES256", "kid": gh.kid(), "jwk": forger.jwk()}),
            &claims,
        );
        assert_eq!(err(run(&a, &t, NOW_MS)), "JWT signature does not verify");
    }

    #[test]
    fn audience_rules() {
        let (gh, a) = github();
        let mut c = gh_claims(&gh);
        c["aud"] = json!("https://github.com/other-org");
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "aud does not contain an audience accepted for issuer gh"
        );
        c["aud"] = json!(["x", "https://github.com/octo-org"]);
        assert!(run(&a, &gh.mint(&c), NOW_MS).is_ok());
        c["aud"] = json!(["x", 1]);
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "aud array has a non-string entry"
        );
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(err(run(&a, &gh.mint(&c), NOW_MS)), "token has no aud");
    }

    #[test]
    fn time_rules() {
        let (gh, a) = github();
        let token = gh.mint(&gh_claims(&gh)); // iat = nbf = NOW, exp = NOW + 300
                                              // exp passed by more than the leeway (iat still in a wide window).
        let wide = |now_ms| {
            a.attest(&AttestInput {
                document: token.as_bytes(),
                csr_der: b"c",
                csr_spki_der: b"s",
                now_ms,
                window_secs: 3600,
            })
        };
        assert!(wide(NOW_MS + 359_000).is_ok());
        assert!(err(wide(NOW_MS + 360_000)).starts_with("token expired"));
        // iat outside the window.
        assert!(err(run(&a, &token, NOW_MS + 301_000)).starts_with("iat outside the window"));
        assert!(err(run(&a, &token, NOW_MS - 301_000)).starts_with("token not yet valid"));
        let mut c = gh_claims(&gh);
        c.as_object_mut().unwrap().remove("nbf");
        c["iat"] = json!(NOW_MS / 1000 + 400);
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).starts_with("iat outside the window"));
        let mut c = gh_claims(&gh);
        c["nbf"] = json!(NOW_MS / 1000 + 61);
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).starts_with("token not yet valid"));
        c["nbf"] = json!(NOW_MS / 1000 + 59);
        assert!(run(&a, &gh.mint(&c), NOW_MS).is_ok());
        for (claim, msg) in [("exp", "token has no exp"), ("iat", "token has no iat")] {
            let mut c = gh_claims(&gh);
            c.as_object_mut().unwrap().remove(claim);
            assert_eq!(err(run(&a, &gh.mint(&c), NOW_MS)), msg);
        }
        let mut c = gh_claims(&gh);
        c["exp"] = json!("soon");
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "exp is not a NumericDate"
        );
        c["exp"] = json!(1e300);
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "exp is not a NumericDate"
        );
        c["exp"] = json!((NOW_MS / 1000 + 100) as f64 + 0.5);
        assert!(run(&a, &gh.mint(&c), NOW_MS).is_ok());
    }

    #[test]
    fn jti_and_sub_required() {
        let (gh, a) = github();
        let mut c = gh_claims(&gh);
        c.as_object_mut().unwrap().remove("jti");
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "token has no jti; single use is enforced by jti"
        );
        c["jti"] = json!("");
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).starts_with("jti is empty"));
        let mut c = gh_claims(&gh);
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(err(run(&a, &gh.mint(&c), NOW_MS)), "token has no sub");
    }

    #[test]
    fn unknown_issuer_and_tampering() {
        let (gh, a) = github();
        let mut c = gh_claims(&gh);
        c["iss"] = json!("https://evil.example");
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "unknown issuer \"https://evil.example\""
        );
        // A trailing slash is a different issuer.
        c["iss"] = json!(format!("{GH_ISS}/"));
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).starts_with("unknown issuer"));

        // Tampered payload under the original signature.
        let token = gh.mint(&gh_claims(&gh));
        let parts: Vec<&str> = token.split('.').collect();
        let mut c = gh_claims(&gh);
        c["repository"] = json!("evil-org/evil-repo");
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            err(run(&a, &tampered, NOW_MS)),
            "JWT signature does not verify"
        );
        // A token signed by a different key claiming the same kid.
        let other = OidcTestIssuer::ec("gh", GH_ISS);
        let t = other.mint_with_header(&json!({"alg": "ES256", "kid": gh.kid()}), &gh_claims(&gh));
        assert_eq!(err(run(&a, &t, NOW_MS)), "JWT signature does not verify");
        // Structural garbage.
        for (bad, want) in [
            ("", "not a compact JWS"),
            ("a.b", "not a compact JWS"),
            ("a.b.c.d.e", "not a compact JWS"),
            ("!!.e30.", "JWT header is not base64url"),
            ("e30=.e30.", "JWT header is not base64url"),
            ("W10.e30.", "JWT header is not a JSON object"),
            ("ew.e30.", "JWT header is not valid JSON"),
            ("eyJ.e30.", "JWT header is not base64url"), // non-zero trailing bits
        ] {
            assert!(err(run(&a, bad, NOW_MS)).starts_with(want), "{bad}");
        }
        assert_eq!(
            run(&a, &"a".repeat(MAX_DOCUMENT_LEN + 1), NOW_MS).unwrap_err(),
            AttestError::TooLarge
        );
        assert_eq!(
            err(a.attest(&AttestInput {
                document: &[0xff, 0xfe],
                csr_der: b"c",
                csr_spki_der: b"s",
                now_ms: NOW_MS,
                window_secs: WINDOW,
            })),
            "token is not UTF-8"
        );
    }

    #[test]
    fn binding_claim() {
        let gh = OidcTestIssuer::ec("ci", "https://ci.example");
        let mut cfg = gh.config(&["sigil"], vec![]);
        cfg.binding_claim = Some("sigil/csr_sha256".into());
        let a = OidcAttestor::new(&[cfg]).unwrap();
        let (csr, _) = test_csr();
        let mut c = gh.standard_claims("job-1", "sigil", NOW_MS, "j1");
        c["sigil"] = json!({"csr_sha256": hex::encode(sha256(&csr)).to_uppercase()});
        let v = run_csr(&a, &gh.mint(&c), NOW_MS, &csr).unwrap();
        assert_eq!(v.csr_binding(), CsrBinding::OidcClaim);
        let (other, _) = test_csr();
        assert_eq!(
            err(run_csr(&a, &gh.mint(&c), NOW_MS, &other)),
            "binding claim sigil/csr_sha256 does not match SHA-256 of the CSR"
        );
        c.as_object_mut().unwrap().remove("sigil");
        assert_eq!(
            err(run_csr(&a, &gh.mint(&c), NOW_MS, &csr)),
            "binding claim sigil/csr_sha256 is missing"
        );
    }

    #[test]
    fn control_characters_refused() {
        let (gh, a) = github();
        let mut c = gh_claims(&gh);
        c["workflow"] = json!("deploy\nINFO forged log line");
        assert_eq!(
            err(run(&a, &gh.mint(&c), NOW_MS)),
            "claim workflow contains a control character"
        );
        let mut c = gh_claims(&gh);
        c["sub"] = json!("a\u{7f}b");
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).contains("control character"));
        let mut c = gh_claims(&gh);
        c["ref"] = json!("x".repeat(MAX_CLAIM_LEN + 1));
        assert!(err(run(&a, &gh.mint(&c), NOW_MS)).contains("longer than"));
    }

    #[test]
    fn config_validation() {
        let gh = OidcTestIssuer::ec("gh", GH_ISS);
        let base = gh.config(&["aud"], vec![]);
        let bad = |f: &dyn Fn(&mut OidcIssuer)| {
            let mut c = base.clone();
            f(&mut c);
            match OidcAttestor::new(&[c]) {
                Err(AttestError::Config(m)) => m,
                other => panic!("expected Config, got {other:?}"),
            }
        };
        assert!(bad(&|c| c.algorithms = vec!["HS256".into()]).contains("symmetric"));
        assert!(bad(&|c| c.algorithms = vec!["none".into()]).contains("alg none"));
        assert!(bad(&|c| c.algorithms = vec![]).contains("no algorithm"));
        assert!(bad(&|c| c.algorithms = vec!["RS256".into()]).contains("no key"));
        assert!(bad(&|c| c.audiences = vec![]).contains("audience"));
        assert!(bad(&|c| c.alias = "a:b".into()).contains("alias"));
        assert!(bad(&|c| c.alias = String::new()).contains("alias"));
        assert!(bad(&|c| c.issuer = String::new()).contains("issuer"));
        assert!(bad(&|c| c.jwks_json = "{".into()).contains("not JSON"));
        assert!(bad(&|c| c.jwks_json = "{}".into()).contains("keys"));
        assert!(bad(&|c| c.jwks_json = r#"{"keys":[]}"#.into()).contains("no key"));
        assert!(bad(&|c| c.claims = vec!["a//b".into()]).contains("bad claim name"));
        assert!(bad(&|c| c.binding_claim = Some(String::new())).contains("bad claim name"));
        let small_rsa =
            json!({"keys": [{"kty": "RSA", "kid": "k", "n": b64(&[0xff; 128]), "e": "AQAB"}]});
        assert!(bad(&|c| c.jwks_json = small_rsa.to_string()).contains("RSA key must be"));
        let bad_point = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k", "x": b64(&[1; 32]), "y": b64(&[2; 32])}]});
        assert!(bad(&|c| c.jwks_json = bad_point.to_string()).contains("not a valid P-256 point"));
        let mut dup: Value = serde_json::from_str(&gh.jwks_json()).unwrap();
        let k = dup["keys"][0].clone();
        dup["keys"].as_array_mut().unwrap().push(k);
        assert!(bad(&|c| c.jwks_json = dup.to_string()).contains("duplicate kid"));
        // Unusable keys are skipped, usable ones kept.
        let mut mixed: Value = serde_json::from_str(&gh.jwks_json()).unwrap();
        mixed["keys"].as_array_mut().unwrap().extend([
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AA"}),
            json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}),
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AA", "e": "AQAB"}),
            json!({"kty": "RSA", "n": "AA", "e": "AQAB"}),
        ]);
        let mut c = base.clone();
        c.jwks_json = mixed.to_string();
        assert!(OidcAttestor::new(&[c]).is_ok());
        // Duplicates across issuers.
        let other = OidcTestIssuer::ec("gh2", GH_ISS);
        assert!(OidcAttestor::new(&[base.clone(), other.config(&["aud"], vec![])]).is_err());
        let mut same_alias = OidcTestIssuer::ec("gh", "https://other").config(&["aud"], vec![]);
        same_alias.alias = "gh".into();
        assert!(OidcAttestor::new(&[base, same_alias]).is_err());
        assert!(OidcAttestor::new(&[]).is_err());
    }

    #[test]
    fn presets() {
        for p in Preset::ALL {
            assert_eq!(Preset::parse(p.name()), Some(p));
            assert!(!p.claims().is_empty());
            for c in p.claims() {
                ClaimPath::parse(&c).unwrap();
            }
        }
        assert_eq!(Preset::parse("k8s"), Some(Preset::Kubernetes));
        assert_eq!(Preset::parse("GitHub"), None);
        assert!(Preset::GithubActions
            .claims()
            .contains(&"job_workflow_ref".to_owned()));
    }

    #[test]
    fn mutated_tokens_never_panic() {
        use rand::{Rng, SeedableRng};
        let (gh, a) = github();
        let token = gh.mint(&gh_claims(&gh)).into_bytes();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..3000 {
            let mut t = token.clone();
            match rng.random_range(0..3) {
                0 => {
                    for _ in 0..rng.random_range(1..6) {
                        let i = rng.random_range(0..t.len());
                        t[i] = rng.random();
                    }
                }
                1 => t.truncate(rng.random_range(0..t.len())),
                _ => {
                    let len = rng.random_range(0..200);
                    t = (0..len).map(|_| rng.random()).collect();
                }
            }
            let r = a.attest(&AttestInput {
                document: &t,
                csr_der: b"c",
                csr_spki_der: b"s",
                now_ms: NOW_MS,
                window_secs: WINDOW,
            });
            if let Ok(v) = r {
                // Only a byte flip inside base64 padding bits could survive.
                assert_eq!(v.node(), "gh:repo:octo-org/octo-repo:environment:prod");
            }
        }
    }
}

#[cfg(test)]
mod proptests {
    //! Random tokens and random (validly signed) claim sets: never a panic,
    //! and whatever is accepted yields clean selectors.

    use std::sync::OnceLock;

    use proptest::{collection::vec, prelude::*, sample::Index};
    use serde_json::json;

    use super::*;
    use crate::attest::testing::{OidcTestIssuer, NOW_MS};

    const ISS: &str = "https://issuer.example";

    fn fixture() -> &'static (OidcTestIssuer, OidcAttestor) {
        static F: OnceLock<(OidcTestIssuer, OidcAttestor)> = OnceLock::new();
        F.get_or_init(|| {
            let i = OidcTestIssuer::ec("p", ISS);
            let mut claims = Preset::Kubernetes.claims();
            claims.extend(["a".to_owned(), "b/c".to_owned()]);
            let a = OidcAttestor::new(&[i.config(&["sigil"], claims)]).unwrap();
            (i, a)
        })
    }

    fn attest(token: &[u8]) -> Result<VerifiedAttestation, AttestError> {
        fixture().1.attest(&AttestInput {
            document: token,
            csr_der: b"c",
            csr_spki_der: b"s",
            now_ms: NOW_MS,
            window_secs: 300,
        })
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            Just(json!(NOW_MS / 1000)),
            Just(json!("sigil")),
            Just(json!(ISS)),
        ];
        leaf.prop_recursive(3, 24, 5, |inner| {
            prop_oneof![
                vec(inner.clone(), 0..5).prop_map(Value::Array),
                vec(("[a-z./]{1,6}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    const KEYS: [&str; 11] = [
        "iss",
        "aud",
        "exp",
        "nbf",
        "iat",
        "jti",
        "sub",
        "a",
        "b",
        "kubernetes.io",
        "x",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_strings_are_refused(t in ".{0,400}") {
            prop_assert!(attest(t.as_bytes()).is_err());
        }

        #[test]
        fn random_claims_never_panic(fields in vec((0..KEYS.len(), json_value()), 0..12)) {
            let (issuer, _) = fixture();
            let mut claims = json!({"iss": ISS, "aud": "sigil", "iat": NOW_MS / 1000,
                "exp": NOW_MS / 1000 + 60, "jti": "j", "sub": "s"});
            for (k, v) in fields {
                claims[KEYS[k]] = v;
            }
            if let Ok(v) = attest(issuer.mint(&claims).as_bytes()) {
                for s in v.selectors() {
                    prop_assert!(!s.chars().any(char::is_control));
                    prop_assert!(s.starts_with("oidc:p:"));
                }
            }
        }

        #[test]
        fn mutated_token_is_refused(at in any::<Index>(), byte in any::<u8>()) {
            let (issuer, _) = fixture();
            let claims = json!({"iss": ISS, "aud": "sigil", "iat": NOW_MS / 1000,
                "exp": NOW_MS / 1000 + 60, "jti": "j", "sub": "s"});
            let mut token = issuer.mint(&claims).into_bytes();
            prop_assert!(attest(&token).is_ok());
            let i = at.index(token.len());
            prop_assume!(token[i] != byte);
            token[i] = byte;
            prop_assert!(attest(&token).is_err());
        }
    }
}

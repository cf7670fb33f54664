//! Plan documents: TOML or JSON of the same shape, unknown keys rejected,
//! validated against the broker's trust domain, then canonicalised (sorted,
//! durations in seconds, compact JSON) and hashed with SHA-256. The hash of
//! the canonical form is the plan's identity: two spellings of the same
//! policy have the same hash.
//!
//! ```toml
//! admins = ["spiffe://sigil.local/admin/alice"]
//!
//! [limits]
//! max_token_ttl = "24h"      # longest enrollment token an admin may mint
//! max_svid_ttl = "24h"       # longest X509-SVID / JWT-SVID lifetime
//! required_approvals = 1     # distinct admins needed to activate the next plan
//! renewal_grace = "0s"       # renewal allowed this long after expiry (default: never)
//!
//! [[entries]]
//! spiffe_id = "spiffe://sigil.local/ci/build"
//! selectors = ["oidc:github:repository:org/repo"]
//! x509_ttl = "1h"
//! jwt_ttl = "5m"
//! dns_names = ["build.internal"]
//!
//! # a per-workload identity, minted by the agent `spiffe://sigil.local/node/web1`
//! # for local callers running as uid 1000 (see `sigil agent`)
//! [[entries]]
//! spiffe_id = "spiffe://sigil.local/web/api"
//! parent_id = "spiffe://sigil.local/node/web1"
//! selectors = ["unix:uid:1000"]
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::{SpiffeId, TrustDomain};

/// Largest plan document accepted, bytes.
pub const MAX_PLAN_LEN: usize = 256 * 1024;
/// Most registration entries in one plan.
pub const MAX_ENTRIES: usize = 10_000;
/// Most admins in one plan.
pub const MAX_ADMINS: usize = 100;
/// Most selectors in one entry.
pub const MAX_SELECTORS: usize = 32;

const MIN_SVID_TTL: i64 = 60;
const MAX_SVID_TTL: i64 = 30 * 86_400;
const MIN_TOKEN_TTL: i64 = 60;
const MAX_TOKEN_TTL: i64 = 365 * 86_400;
const DEFAULT_MAX_TOKEN_TTL: i64 = 86_400;
const DEFAULT_MAX_SVID_TTL: i64 = 86_400;
const DEFAULT_X509_TTL: i64 = 3_600;
const DEFAULT_JWT_TTL: i64 = 300;

/// Why a plan was rejected; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError(msg.into()))
}

/// A duration given as seconds or as a string like `"90s"`, `"10m"`, `"1h"`, `"2d"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Dur {
    Secs(i64),
    Text(String),
}

impl Dur {
    fn secs(&self, field: &str) -> Result<i64, PlanError> {
        match self {
            Dur::Secs(s) if *s > 0 => Ok(*s),
            Dur::Secs(_) => err(format!("{field}: must be positive")),
            Dur::Text(t) => crate::config::parse_duration_secs(t)
                .map_err(|e| PlanError(format!("{field}: {e}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    admins: Vec<String>,
    #[serde(default)]
    entries: Vec<EntryFile>,
    #[serde(default)]
    limits: LimitsFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    spiffe_id: String,
    #[serde(default)]
    selectors: Vec<String>,
    x509_ttl: Option<Dur>,
    jwt_ttl: Option<Dur>,
    #[serde(default)]
    dns_names: Vec<String>,
    parent_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_token_ttl: Option<Dur>,
    max_svid_ttl: Option<Dur>,
    required_approvals: Option<u32>,
    renewal_grace: Option<Dur>,
}

/// Plan-wide limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest token lifetime, seconds.
    pub max_token_ttl: i64,
    /// Longest SVID lifetime, seconds.
    pub max_svid_ttl: i64,
    /// Distinct admins needed to activate the next plan.
    pub required_approvals: u32,
    /// How long after expiry an X509-SVID may still renew itself, seconds (default 0: never).
    #[serde(default)]
    pub renewal_grace: i64,
}

/// A registration entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The SPIFFE ID granted.
    pub spiffe_id: String,
    /// Selectors that must all be present (sorted, unique).
    pub selectors: Vec<String>,
    /// X509-SVID lifetime, seconds.
    pub x509_ttl: i64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_ttl: i64,
    /// Extra DNS SANs (sorted, unique, lowercase).
    pub dns_names: Vec<String>,
    /// The agent (its SPIFFE ID) that may obtain this identity for the local
    /// callers matching `selectors` (`sigil agent`, `Delegation.MintDelegated`).
    /// Absent from the canonical JSON when unset, so plans without agents
    /// keep their hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
}

/// A validated plan in canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Admin SPIFFE IDs (sorted, unique, non-empty).
    pub admins: Vec<String>,
    /// Registration entries (sorted by SPIFFE ID, then selectors).
    pub entries: Vec<Entry>,
    /// Limits.
    pub limits: Limits,
}

impl Plan {
    /// Parses and validates a plan document (TOML, or JSON when it starts with `{`).
    ///
    /// # Errors
    /// [`PlanError`] naming the offending field.
    pub fn parse(bytes: &[u8], td: &TrustDomain) -> Result<Self, PlanError> {
        if bytes.is_empty() {
            return err("plan is empty");
        }
        if bytes.len() > MAX_PLAN_LEN {
            return err(format!("plan larger than {MAX_PLAN_LEN} bytes"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| PlanError("plan is not UTF-8".into()))?;
        let file: PlanFile = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| PlanError(format!("plan JSON: {e}")))?
        } else {
            toml::from_str(text).map_err(|e| PlanError(format!("plan TOML: {}", e.message())))?
        };
        Self::validate(file, td)
    }

    fn validate(f: PlanFile, td: &TrustDomain) -> Result<Self, PlanError> {
        let own_id = |field: &str, s: &str| -> Result<String, PlanError> {
            let id = SpiffeId::parse(s).map_err(|e| PlanError(format!("{field}: {s:?}: {e}")))?;
            if id.trust_domain() != td.as_str() {
                return err(format!(
                    "{field}: {s:?} is not in the broker's trust domain {td}"
                ));
            }
            Ok(id.to_string())
        };
        let l = &f.limits;
        let max_token_ttl = match &l.max_token_ttl {
            Some(d) => d.secs("limits.max_token_ttl")?,
            None => DEFAULT_MAX_TOKEN_TTL,
        };
        if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&max_token_ttl) {
            return err(format!(
                "limits.max_token_ttl: {max_token_ttl} s is outside {MIN_TOKEN_TTL}..={MAX_TOKEN_TTL} s"
            ));
        }
        let max_svid_ttl = match &l.max_svid_ttl {
            Some(d) => d.secs("limits.max_svid_ttl")?,
            None => DEFAULT_MAX_SVID_TTL,
        };
        if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&max_svid_ttl) {
            return err(format!(
                "limits.max_svid_ttl: {max_svid_ttl} s is outside {MIN_SVID_TTL}..={MAX_SVID_TTL} s"
            ));
        }

        let renewal_grace = match &l.renewal_grace {
            Some(Dur::Secs(0)) => 0,
            Some(d) => d.secs("limits.renewal_grace")?,
            None => 0,
        };
        if !(0..=3600).contains(&renewal_grace) {
            return err(format!(
                "limits.renewal_grace: {renewal_grace} s is outside 0..=3600 s"
            ));
        }

        if f.admins.is_empty() {
            return err("admins: a plan must name at least one admin SPIFFE ID");
        }
        if f.admins.len() > MAX_ADMINS {
            return err(format!("admins: more than {MAX_ADMINS}"));
        }
        let mut admins = BTreeSet::new();
        for (i, a) in f.admins.iter().enumerate() {
            if !admins.insert(own_id(&format!("admins[{i}]"), a)?) {
                return err(format!("admins[{i}]: {a:?} is listed twice"));
            }
        }
        let required_approvals = l.required_approvals.unwrap_or(1);
        if required_approvals == 0 || required_approvals as usize > admins.len() {
            return err(format!(
                "limits.required_approvals: {required_approvals} must be between 1 and the number of admins ({})",
                admins.len()
            ));
        }

        if f.entries.len() > MAX_ENTRIES {
            return err(format!("entries: more than {MAX_ENTRIES}"));
        }
        let mut entries = Vec::with_capacity(f.entries.len());
        let mut seen = BTreeSet::new();
        for (i, e) in f.entries.iter().enumerate() {
            let at = |k: &str| format!("entries[{i}].{k}");
            let spiffe_id = own_id(&at("spiffe_id"), &e.spiffe_id)?;
            if e.selectors.len() > MAX_SELECTORS {
                return err(format!("{}: more than {MAX_SELECTORS}", at("selectors")));
            }
            let parent_id = match &e.parent_id {
                Some(p) => Some(own_id(&at("parent_id"), p)?),
                None => None,
            };
            let mut selectors = BTreeSet::new();
            for s in &e.selectors {
                validate_selector(s)
                    .map_err(|m| PlanError(format!("{}: {s:?}: {m}", at("selectors"))))?;
                if parent_id.is_some() {
                    validate_agent_selector(s)
                        .map_err(|m| PlanError(format!("{}: {s:?}: {m}", at("selectors"))))?;
                }
                selectors.insert(s.clone());
            }
            if parent_id.is_some() && selectors.is_empty() {
                return err(format!(
                    "{}: an entry with parent_id needs at least one selector",
                    at("selectors")
                ));
            }
            let x509_ttl = match &e.x509_ttl {
                Some(d) => d.secs(&at("x509_ttl"))?,
                None => DEFAULT_X509_TTL.min(max_svid_ttl),
            };
            let jwt_ttl = match &e.jwt_ttl {
                Some(d) => d.secs(&at("jwt_ttl"))?,
                None => DEFAULT_JWT_TTL.min(max_svid_ttl),
            };
            for (k, v) in [("x509_ttl", x509_ttl), ("jwt_ttl", jwt_ttl)] {
                if v < MIN_SVID_TTL {
                    return err(format!("{}: {v} s is shorter than {MIN_SVID_TTL} s", at(k)));
                }
                if v > max_svid_ttl {
                    return err(format!(
                        "{}: {v} s exceeds limits.max_svid_ttl ({max_svid_ttl} s)",
                        at(k)
                    ));
                }
            }
            let mut dns = BTreeSet::new();
            for d in &e.dns_names {
                validate_dns(d)
                    .map_err(|m| PlanError(format!("{}: {d:?}: {m}", at("dns_names"))))?;
                dns.insert(d.to_ascii_lowercase());
            }
            let selectors: Vec<String> = selectors.into_iter().collect();
            // Agents match only their own entries, so the same selectors
            // under two different parents are not ambiguous.
            if !selectors.is_empty() && !seen.insert((parent_id.clone(), selectors.clone())) {
                return err(format!(
                    "{}: another entry has exactly these selectors (ambiguous match)",
                    at("selectors")
                ));
            }
            entries.push(Entry {
                spiffe_id,
                selectors,
                x509_ttl,
                jwt_ttl,
                dns_names: dns.into_iter().collect(),
                parent_id,
            });
        }
        entries.sort_by(|a, b| {
            (&a.spiffe_id, &a.selectors, &a.parent_id).cmp(&(
                &b.spiffe_id,
                &b.selectors,
                &b.parent_id,
            ))
        });
        Ok(Self {
            admins: admins.into_iter().collect(),
            entries,
            limits: Limits {
                max_token_ttl,
                max_svid_ttl,
                required_approvals,
                renewal_grace,
            },
        })
    }

    /// The canonical JSON: fields in declaration order, collections sorted, durations in seconds.
    pub fn canonical_json(&self) -> String {
        // Serialising plain strings, integers and vectors cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Hex SHA-256 of [`Plan::canonical_json`].
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.canonical_json().as_bytes()))
    }

    /// Re-reads a stored canonical plan.
    ///
    /// # Errors
    /// The stored JSON does not decode.
    pub fn from_canonical(json: &str) -> Result<Self, PlanError> {
        serde_json::from_str(json).map_err(|e| PlanError(format!("stored plan: {e}")))
    }

    /// True when `id` is an admin of this plan.
    pub fn is_admin(&self, id: &str) -> bool {
        self.admins.binary_search_by(|a| a.as_str().cmp(id)).is_ok()
    }

    /// The entry registered for exactly `spiffe_id` with no selectors, or
    /// the first entry for it (token-born identities take its TTLs and DNS names).
    pub fn entry_for(&self, spiffe_id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.spiffe_id == spiffe_id)
    }
}

fn validate_selector(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 512 {
        return Err("must be 1..=512 bytes");
    }
    let Some((kind, rest)) = s.split_once(':') else {
        return Err("must look like <kind>:<key>:<value>");
    };
    if kind.is_empty()
        || rest.is_empty()
        || !kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err("must look like <kind>:<key>:<value> with a lowercase kind");
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

/// Selectors of an entry with `parent_id` must be ones an agent observes
/// (Unix peer credentials of the calling process), so such an entry can
/// never match an attestation document's selectors.
fn validate_agent_selector(s: &str) -> Result<(), &'static str> {
    const ONLY: &str =
        "an entry with parent_id takes unix:uid:<n>, unix:gid:<n> or unix:path:<absolute path>";
    // Canonical decimal only (no sign, no leading zero), as the agent writes it.
    let decimal = |n: &str| {
        n.bytes().all(|b| b.is_ascii_digit())
            && n.parse::<u32>().is_ok()
            && (n == "0" || !n.starts_with('0'))
    };
    match s.strip_prefix("unix:").and_then(|r| r.split_once(':')) {
        Some(("uid" | "gid", n)) if decimal(n) => Ok(()),
        Some(("path", p)) if p.starts_with('/') => Ok(()),
        _ => Err(ONLY),
    }
}

fn validate_dns(d: &str) -> Result<(), &'static str> {
    let name = d.strip_prefix("*.").unwrap_or(d);
    if name.is_empty() || d.len() > 253 {
        return Err("not a DNS name");
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("not a DNS name");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("sigil.local").unwrap()
    }

    const GOOD: &str = r#"
admins = ["spiffe://sigil.local/admin/bob", "spiffe://sigil.local/admin/alice"]
[limits]
max_token_ttl = "24h"
max_svid_ttl = "12h"
required_approvals = 2
[[entries]]
spiffe_id = "spiffe://sigil.local/ci/build"
selectors = ["oidc:github:repository:org/repo", "oidc:github:ref:refs/heads/main"]
x509_ttl = "1h"
jwt_ttl = 300
dns_names = ["Build.Internal"]
"#;

    #[test]
    fn toml_and_json_spellings_hash_the_same() {
        let a = Plan::parse(GOOD.as_bytes(), &td()).unwrap();
        assert_eq!(a.admins[0], "spiffe://sigil.local/admin/alice", "sorted");
        assert_eq!(a.entries[0].dns_names, vec!["build.internal"]);
        assert_eq!(a.limits.max_svid_ttl, 43_200);
        let json = r#"{"admins":["spiffe://sigil.local/admin/alice","spiffe://sigil.local/admin/bob"],
            "limits":{"required_approvals":2,"max_svid_ttl":43200,"max_token_ttl":"1d"},
            "entries":[{"spiffe_id":"spiffe://sigil.local/ci/build","x509_ttl":3600,"jwt_ttl":"5m",
            "selectors":["oidc:github:ref:refs/heads/main","oidc:github:repository:org/repo"],
            "dns_names":["build.internal"]}]}"#;
        let b = Plan::parse(json.as_bytes(), &td()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.sha256_hex(), b.sha256_hex());
        assert_eq!(Plan::from_canonical(&a.canonical_json()).unwrap(), a);
        assert!(a.is_admin("spiffe://sigil.local/admin/bob"));
        assert!(!a.is_admin("spiffe://sigil.local/admin/eve"));
    }

    #[test]
    fn rejections_name_the_field() {
        for (doc, want) in [
            ("admins = []", "admins"),
            ("admins = [\"spiffe://sigil.local/a\"]\nbogus = 1", "bogus"),
            ("admins = [\"spiffe://other.org/a\"]", "admins[0]"),
            ("admins = [\"spiffe://sigil.local/a\", \"spiffe://sigil.local/a\"]", "twice"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[limits]\nrequired_approvals = 2", "required_approvals"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[limits]\nmax_svid_ttl = \"400d\"", "limits.max_svid_ttl"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[limits]\nmax_token_ttl = \"5y\"", "limits.max_token_ttl"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nx509_ttl = \"100d\"", "entries[0].x509_ttl"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nx509_ttl = 5", "entries[0].x509_ttl"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://evil.org/w\"", "entries[0].spiffe_id"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\ncolour = 1", "colour"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nselectors = [\"nokind\"]", "entries[0].selectors"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\ndns_names = [\"bad name\"]", "entries[0].dns_names"),
            ("admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nselectors = [\"a:b\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/v\"\nselectors = [\"a:b\"]", "ambiguous"),
            ("{\"admins\":[\"spiffe://sigil.local/a\"],\"extra\":true}", "extra"),
            ("not = [valid", "TOML"),
        ] {
            let e = Plan::parse(doc.as_bytes(), &td()).unwrap_err().to_string();
            assert!(e.contains(want), "{doc:?} -> {e}");
        }
        assert!(Plan::parse(b"", &td()).is_err());
        assert!(Plan::parse(&[0xff, 0xfe], &td()).is_err());
    }

    #[test]
    fn parent_id_is_validated_and_absent_from_canonical_json_when_unset() {
        let plain = Plan::parse(GOOD.as_bytes(), &td()).unwrap();
        assert!(!plain.canonical_json().contains("parent_id"));
        let doc = |parent: &str, sel: &str| {
            format!(
                "admins = [\"spiffe://sigil.local/a\"]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/w\"\nparent_id = \"{parent}\"\nselectors = [{sel}]\n[[entries]]\nspiffe_id = \"spiffe://sigil.local/v\"\nparent_id = \"spiffe://sigil.local/agent2\"\nselectors = [{sel}]"
            )
        };
        let ok = Plan::parse(
            doc(
                "spiffe://sigil.local/agent",
                "\"unix:uid:1000\", \"unix:path:/usr/bin/x\"",
            )
            .as_bytes(),
            &td(),
        )
        .expect("same selectors under two parents are not ambiguous");
        assert_eq!(
            ok.entries[1].parent_id.as_deref(),
            Some("spiffe://sigil.local/agent")
        );
        assert!(ok
            .canonical_json()
            .contains("\"parent_id\":\"spiffe://sigil.local/agent\""));
        assert_eq!(Plan::from_canonical(&ok.canonical_json()).unwrap(), ok);
        for (parent, sel, want) in [
            (
                "spiffe://other.org/agent",
                "\"unix:uid:1\"",
                "entries[0].parent_id",
            ),
            ("not-an-id", "\"unix:uid:1\"", "entries[0].parent_id"),
            ("spiffe://sigil.local/agent", "", "at least one selector"),
            (
                "spiffe://sigil.local/agent",
                "\"oidc:gh:sub:x\"",
                "unix:uid",
            ),
            ("spiffe://sigil.local/agent", "\"unix:uid:-1\"", "unix:uid"),
            ("spiffe://sigil.local/agent", "\"unix:uid:01\"", "unix:uid"),
            (
                "spiffe://sigil.local/agent",
                "\"unix:path:relative\"",
                "unix:uid",
            ),
            ("spiffe://sigil.local/agent", "\"unix:pid:1\"", "unix:uid"),
        ] {
            let e = Plan::parse(doc(parent, sel).as_bytes(), &td())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{parent} {sel} -> {e}");
        }
    }
}

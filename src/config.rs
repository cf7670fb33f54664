//! Configuration in two layers: an optional TOML [`FileConfig`] (unknown keys
//! rejected) under flags and `SIGIL_*` environment variables (merged by the
//! CLI), resolved once into a typed [`Config`]. Secrets are given as file
//! paths or environment variables, never as plain config values.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::identity::TrustDomain;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./sigil-data";
/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "sigil.local";
/// Default TLS listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";

/// The TOML file's shape. Every key is optional; unknown keys are errors.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Trust domain name.
    pub trust_domain: Option<String>,
    /// TLS listen address.
    pub listen: Option<String>,
    /// Extra serving-certificate SANs (DNS names or IPs).
    pub san: Option<Vec<String>>,
    /// Admin socket path.
    pub admin_socket: Option<PathBuf>,
    /// Freshness window, seconds.
    pub window_seconds: Option<u32>,
    /// X509-SVID lifetime, e.g. "1h".
    pub x509_ttl: Option<String>,
    /// JWT-SVID lifetime, e.g. "5m".
    pub jwt_ttl: Option<String>,
    /// Path of the token key file (overrides env and the generated key).
    pub token_key_file: Option<PathBuf>,
    /// Path of the bootstrap secret file (base64, 0600).
    pub bootstrap_secret_file: Option<PathBuf>,
    /// Refuse to generate a bootstrap secret: one must come from env or file.
    pub require_bootstrap_secret: Option<bool>,
    /// Attestation settings.
    pub attestation: Option<AttestationFile>,
    /// Prometheus listener address.
    pub metrics_listen: Option<String>,
    /// Proxy CIDRs trusted for `x-forwarded-for`.
    pub trusted_proxies: Option<Vec<String>>,
    /// Rate limits.
    pub rate_limits: Option<RateLimitsFile>,
    /// Key-encryption key file (PostgreSQL).
    pub kek_file: Option<PathBuf>,
    /// CA certificate(s) of the PostgreSQL server (TLS to the store).
    pub store_ca_file: Option<PathBuf>,
}

/// `[rate_limits]` in the config file. Rates are per second per peer.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsFile {
    /// Turn every limit off (benchmarks only).
    pub disabled: Option<bool>,
    /// Enroll/Renew/FetchJWT per second (burst = 2×).
    pub issue_per_sec: Option<f64>,
    /// GetChallenge per second (burst = 2×).
    pub challenge_per_sec: Option<f64>,
    /// BootstrapPlan per second (burst 5).
    pub bootstrap_per_sec: Option<f64>,
    /// Failed credential checks allowed in a burst (refilled 1/s).
    pub failure_burst: Option<f64>,
    /// Peers never limited, e.g. ["127.0.0.0/8"] for a local load generator.
    pub exempt: Option<Vec<String>>,
}

impl RateLimitsFile {
    /// Applies the file's settings to `cfg`.
    ///
    /// # Errors
    /// A bad CIDR.
    pub fn apply(&self, cfg: &mut crate::ratelimit::RateConfig) -> Result<(), String> {
        use crate::ratelimit::{Cidr, Rate};
        if let Some(d) = self.disabled {
            cfg.disabled = d;
        }
        if let Some(r) = self.issue_per_sec {
            cfg.issue = Rate::new(r, 2.0 * r);
        }
        if let Some(r) = self.challenge_per_sec {
            cfg.challenge = Rate::new(r, 2.0 * r);
        }
        if let Some(r) = self.bootstrap_per_sec {
            cfg.bootstrap = Rate::new(r, 5.0);
        }
        if let Some(b) = self.failure_burst {
            cfg.failures = Rate::new(1.0, b);
        }
        for c in self.exempt.iter().flatten() {
            cfg.exempt.push(Cidr::parse(c)?);
        }
        Ok(())
    }
}

/// `[attestation]` in the config file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationFile {
    /// `aws_nitro` on or off (default on, with the shipped AWS root).
    pub nitro: Option<bool>,
    /// PEM file of Nitro root certificates replacing the shipped AWS root G1.
    pub nitro_roots_file: Option<PathBuf>,
    /// OIDC issuers (`[[attestation.oidc]]`).
    #[serde(default)]
    pub oidc: Vec<OidcIssuerFile>,
}

/// One `[[attestation.oidc]]` issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerFile {
    /// Short name used in selectors: `oidc:<alias>:<claim>:<value>`.
    pub alias: String,
    /// Exact `iss`.
    pub issuer: String,
    /// Accepted `aud` values (the broker's audience).
    pub audiences: Vec<String>,
    /// JWKS document of the issuer (JSON file); or `jwks_url`.
    pub jwks_file: Option<PathBuf>,
    /// `https://` URL of the issuer's JWKS, fetched at start and refreshed.
    pub jwks_url: Option<String>,
    /// PEM roots for `jwks_url` [default: the system bundle].
    pub jwks_ca_file: Option<PathBuf>,
    /// How often to refetch `jwks_url`, e.g. "10m" [default: 10m].
    pub jwks_refresh: Option<String>,
    /// `github-actions`, `gitlab-ci` or `kubernetes`: the claims that become selectors.
    pub preset: Option<String>,
    /// Claims that become selectors (added to the preset's).
    #[serde(default)]
    pub claims: Vec<String>,
    /// Allowed algorithms (subset of RS256, ES256) [default: both].
    pub algorithms: Option<Vec<String>>,
    /// Claim carrying hex SHA-256 of the CSR DER, when the issuer can carry one.
    pub binding_claim: Option<String>,
}

impl AttestationFile {
    /// Builds the verifier configuration (reads the JWKS and root files).
    ///
    /// # Errors
    /// Unreadable files or unknown presets, naming them.
    pub fn resolve(
        &self,
    ) -> Result<
        (
            crate::attest::registry::AttestConfig,
            Vec<crate::jwks::JwksSource>,
        ),
        String,
    > {
        use crate::attest::{NitroConfig, OidcIssuer, Preset};
        let nitro = if self.nitro == Some(false) {
            None
        } else {
            Some(match &self.nitro_roots_file {
                Some(p) => {
                    let pem = std::fs::read_to_string(p)
                        .map_err(|e| format!("nitro_roots_file {}: {e}", p.display()))?;
                    NitroConfig::from_pem(&pem)
                        .map_err(|e| format!("nitro_roots_file {}: {e}", p.display()))?
                }
                None => NitroConfig::default(),
            })
        };
        let mut oidc = Vec::new();
        let mut sources = Vec::new();
        for o in &self.oidc {
            let mut claims = match &o.preset {
                Some(p) => Preset::parse(p)
                    .ok_or_else(|| format!("attestation.oidc {}: unknown preset {p:?}", o.alias))?
                    .claims(),
                None => Vec::new(),
            };
            claims.extend(o.claims.iter().cloned());
            let jwks_json = match (&o.jwks_file, &o.jwks_url) {
                (Some(f), None) => std::fs::read_to_string(f)
                    .map_err(|e| format!("attestation.oidc {}: {}: {e}", o.alias, f.display()))?,
                (None, Some(url)) => {
                    sources.push(crate::jwks::JwksSource {
                        alias: o.alias.clone(),
                        url: url.clone(),
                        ca_file: o.jwks_ca_file.clone(),
                        refresh: std::time::Duration::from_secs(
                            parse_duration_secs(o.jwks_refresh.as_deref().unwrap_or("10m"))?
                                .unsigned_abs(),
                        ),
                    });
                    // Filled in by the first fetch at start.
                    String::new()
                }
                _ => {
                    return Err(format!(
                        "attestation.oidc {}: give exactly one of jwks_file and jwks_url",
                        o.alias
                    ))
                }
            };
            oidc.push(OidcIssuer {
                alias: o.alias.clone(),
                issuer: o.issuer.clone(),
                audiences: o.audiences.clone(),
                jwks_json,
                claims,
                algorithms: o
                    .algorithms
                    .clone()
                    .unwrap_or_else(|| vec!["RS256".into(), "ES256".into()]),
                binding_claim: o.binding_claim.clone(),
            });
        }
        Ok((
            crate::attest::registry::AttestConfig { nitro, oidc },
            sources,
        ))
    }
}

impl FileConfig {
    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// A message naming the file and the offending key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }
}

/// Resolved server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory (created 0700 when missing).
    pub data_dir: PathBuf,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// TLS listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Extra serving-certificate SANs.
    pub sans: Vec<String>,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Freshness window, seconds.
    pub window_secs: i64,
    /// X509-SVID lifetime, seconds.
    pub x509_ttl_secs: i64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_ttl_secs: i64,
    /// Token key from a file (highest precedence).
    pub token_key_file: Option<PathBuf>,
    /// Token key from `SIGIL_TOKEN_KEY` (base64), second precedence.
    pub token_key_env: Option<String>,
    /// Group commit in the SQLite store (default on).
    pub group_commit: bool,
    /// Bootstrap secret from `SIGIL_BOOTSTRAP_SECRET` (base64, ≥ 32 bytes): first precedence.
    pub bootstrap_secret_env: Option<String>,
    /// Bootstrap secret file (base64 text, 0600 enforced): second precedence.
    pub bootstrap_secret_file: Option<PathBuf>,
    /// When true and neither env nor file gives a secret, no secret is
    /// generated and `BootstrapPlan` answers `BOOTSTRAP_SECRET_MISSING`.
    pub require_bootstrap_secret: bool,
    /// Attestation verifiers' trust (Nitro roots, OIDC issuers).
    pub attest: crate::attest::registry::AttestConfig,
    /// OIDC issuers whose JWKS is fetched from a URL (at start and on a timer).
    pub jwks_sources: Vec<crate::jwks::JwksSource>,
    /// Per-peer rate limits.
    pub rates: crate::ratelimit::RateConfig,
    /// Proxies whose `x-forwarded-for` metadata names the real client.
    pub trusted_proxies: Vec<crate::ratelimit::Cidr>,
    /// Prometheus endpoint (`GET /metrics`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// A TLS handshake must complete within this time (slow clients are cut off).
    pub handshake_timeout: std::time::Duration,
    /// `postgres://…` for replicas on one PostgreSQL; `None` = embedded SQLite.
    /// Never logged (it may hold a password).
    pub store_url: Option<String>,
    /// CA certificate(s) (PEM) of the PostgreSQL server: TLS, verified, to
    /// the store; plaintext when `None`.
    pub store_ca_file: Option<PathBuf>,
    /// Key-encryption key file (base64 of 32 bytes, 0600); required with PostgreSQL.
    pub kek_file: Option<PathBuf>,
    /// Key-encryption key from `SIGIL_KEK` (base64).
    pub kek_env: Option<String>,
}

impl std::fmt::Display for Config {
    /// A one-line summary without secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "trust_domain={} listen={} data_dir={} admin_socket={} window={}s x509_ttl={}s jwt_ttl={}s",
            self.trust_domain,
            self.listen,
            self.data_dir.display(),
            self.admin_socket.display(),
            self.window_secs,
            self.x509_ttl_secs,
            self.jwt_ttl_secs
        )
    }
}

impl Config {
    /// A configuration with every default, rooted at `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            admin_socket: data_dir.join("admin.sock"),
            data_dir,
            // A constant that satisfies every trust-domain rule.
            trust_domain: TrustDomain::parse(DEFAULT_TRUST_DOMAIN)
                .unwrap_or_else(|_| unreachable!("default trust domain is valid")),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            sans: Vec::new(),
            window_secs: 300,
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            token_key_file: None,
            token_key_env: None,
            group_commit: true,
            bootstrap_secret_env: None,
            bootstrap_secret_file: None,
            require_bootstrap_secret: false,
            attest: crate::attest::registry::AttestConfig::default(),
            jwks_sources: Vec::new(),
            rates: crate::ratelimit::RateConfig::default(),
            trusted_proxies: Vec::new(),
            metrics_listen: None,
            handshake_timeout: std::time::Duration::from_secs(10),
            store_url: None,
            store_ca_file: None,
            kek_file: None,
            kek_env: None,
        }
    }
}

/// Parses a duration such as `90`, `30s`, `10m`, `1h`, `2d` into seconds.
///
/// # Errors
/// A message quoting the bad value.
pub fn parse_duration_secs(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: i64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 30s, 10m, 1h, 2d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("duration {s:?} out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("10m"), Ok(600));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        assert_eq!(parse_duration_secs("2d"), Ok(172_800));
        assert!(parse_duration_secs("0").is_err());
        assert!(parse_duration_secs("5y").is_err());
        assert!(parse_duration_secs("m").is_err());
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("trust_domain = \"a\"\nlisten_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_port"), "{err}");
    }
}

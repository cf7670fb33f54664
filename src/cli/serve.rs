//! `sigil serve`: merge flags, env and the optional TOML file into a
//! [`Config`], start the server, stop gracefully on SIGINT/SIGTERM.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use clap::Args;

use super::CliError;
use crate::{
    clock::SystemClock,
    config::{self, Config, FileConfig},
    identity::TrustDomain,
};

/// Flags of `sigil serve`. Each also reads `SIGIL_<NAME>`; flags win over
/// env, env over the file, the file over defaults.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Optional TOML config file.
    #[arg(long, env = "SIGIL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./sigil-data].
    #[arg(long, env = "SIGIL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Trust domain [default: sigil.local].
    #[arg(long, env = "SIGIL_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// TLS listen address; port 0 picks a free port (written to <data-dir>/listen.addr)
    /// [default: 127.0.0.1:8443].
    #[arg(long, env = "SIGIL_LISTEN")]
    pub listen: Option<String>,
    /// Extra DNS name or IP for the serving certificate (repeatable).
    #[arg(long = "san", env = "SIGIL_SAN", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// Admin socket path [default: <data-dir>/admin.sock].
    #[arg(long, env = "SIGIL_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Freshness window for signed payloads, seconds [default: 300].
    #[arg(long, env = "SIGIL_WINDOW_SECONDS")]
    pub window_seconds: Option<u32>,
    /// X509-SVID lifetime, e.g. 1h [default: 1h].
    #[arg(long, env = "SIGIL_X509_TTL")]
    pub x509_ttl: Option<String>,
    /// JWT-SVID lifetime, e.g. 5m [default: 5m].
    #[arg(long, env = "SIGIL_JWT_TTL")]
    pub jwt_ttl: Option<String>,
    /// File holding the token key K_token (0600; overrides SIGIL_TOKEN_KEY).
    #[arg(long, env = "SIGIL_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// File holding the bootstrap secret, base64 (0600). SIGIL_BOOTSTRAP_SECRET
    /// (base64 in the environment) takes precedence; without either, one is
    /// generated into <data-dir>/bootstrap_secret.
    #[arg(long, env = "SIGIL_BOOTSTRAP_SECRET_FILE")]
    pub bootstrap_secret_file: Option<PathBuf>,
    /// Store: `postgres://USER@HOST/DB` for several replicas on one
    /// PostgreSQL [default: embedded SQLite in the data dir].
    #[arg(long, env = "SIGIL_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// PEM file of the CA(s) that sign the PostgreSQL server's certificate:
    /// the store connection is then TLS, verified like libpq's
    /// sslmode=verify-full (chain and host name) [default: plaintext].
    #[arg(long, env = "SIGIL_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Key-encryption key file (base64 of 32 bytes, 0600) sealing shared key
    /// material in PostgreSQL; or SIGIL_KEK.
    #[arg(long, env = "SIGIL_KEK_FILE")]
    pub kek_file: Option<PathBuf>,
    /// Prometheus metrics listener, e.g. 127.0.0.1:9090 (off by default).
    #[arg(long, env = "SIGIL_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Proxy network whose `x-forwarded-for` names the real client (repeatable).
    #[arg(
        long = "trusted-proxy",
        env = "SIGIL_TRUSTED_PROXY",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<String>,
    /// Peers exempt from rate limits, e.g. 127.0.0.0/8 for a local load
    /// generator (repeatable).
    #[arg(
        long = "rate-limit-exempt",
        env = "SIGIL_RATE_LIMIT_EXEMPT",
        value_delimiter = ','
    )]
    pub rate_limit_exempt: Vec<String>,
    /// Turn rate limits off (benchmarks only).
    #[arg(long, env = "SIGIL_NO_RATE_LIMITS")]
    pub no_rate_limits: bool,
    /// Never generate a bootstrap secret: BootstrapPlan answers
    /// BOOTSTRAP_SECRET_MISSING until one is given by env or file.
    #[arg(long, env = "SIGIL_REQUIRE_BOOTSTRAP_SECRET")]
    pub require_bootstrap_secret: bool,
}

impl ServeArgs {
    /// Resolves flags/env over the file over defaults.
    ///
    /// # Errors
    /// A usage message naming the bad value.
    pub fn resolve(self) -> Result<Config, String> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let data_dir = self
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_DATA_DIR));
        let mut cfg = Config::with_data_dir(data_dir);
        if let Some(td) = self.trust_domain.or(file.trust_domain) {
            cfg.trust_domain =
                TrustDomain::parse(&td).map_err(|e| format!("--trust-domain {td:?}: {e}"))?;
        }
        if let Some(l) = self.listen.or(file.listen) {
            cfg.listen = l
                .parse::<SocketAddr>()
                .map_err(|_| format!("--listen {l:?}: expected IP:PORT"))?;
        }
        cfg.sans = if self.sans.is_empty() {
            file.san.unwrap_or_default()
        } else {
            self.sans
        };
        if let Some(s) = self.admin_socket.or(file.admin_socket) {
            cfg.admin_socket = s;
        }
        if let Some(w) = self.window_seconds.or(file.window_seconds) {
            if w == 0 || w > 3600 {
                return Err("--window-seconds must be 1..=3600".into());
            }
            cfg.window_secs = i64::from(w);
        }
        if let Some(t) = self.x509_ttl.or(file.x509_ttl) {
            cfg.x509_ttl_secs = config::parse_duration_secs(&t)?;
        }
        if let Some(t) = self.jwt_ttl.or(file.jwt_ttl) {
            cfg.jwt_ttl_secs = config::parse_duration_secs(&t)?;
        }
        cfg.token_key_file = self.token_key_file.or(file.token_key_file);
        cfg.token_key_env = std::env::var("SIGIL_TOKEN_KEY").ok();
        cfg.bootstrap_secret_env = std::env::var("SIGIL_BOOTSTRAP_SECRET").ok();
        cfg.bootstrap_secret_file = self.bootstrap_secret_file.or(file.bootstrap_secret_file);
        cfg.require_bootstrap_secret =
            self.require_bootstrap_secret || file.require_bootstrap_secret.unwrap_or(false);
        if let Some(a) = &file.attestation {
            (cfg.attest, cfg.jwks_sources) = a.resolve()?;
        }
        if let Some(r) = &file.rate_limits {
            r.apply(&mut cfg.rates)?;
        }
        for c in &self.rate_limit_exempt {
            cfg.rates.exempt.push(crate::ratelimit::Cidr::parse(c)?);
        }
        cfg.rates.disabled |= self.no_rate_limits;
        cfg.store_url = self.store.filter(|s| !s.is_empty() && s != "sqlite");
        cfg.kek_file = self.kek_file.or(file.kek_file.clone());
        cfg.store_ca_file = self.store_ca_file.or(file.store_ca_file.clone());
        cfg.kek_env = std::env::var("SIGIL_KEK").ok();
        let proxies = if self.trusted_proxies.is_empty() {
            file.trusted_proxies.clone().unwrap_or_default()
        } else {
            self.trusted_proxies.clone()
        };
        for c in &proxies {
            cfg.trusted_proxies.push(crate::ratelimit::Cidr::parse(c)?);
        }
        if let Some(m) = self.metrics_listen.clone().or(file.metrics_listen.clone()) {
            cfg.metrics_listen = Some(
                m.parse()
                    .map_err(|_| format!("--metrics-listen {m:?}: expected IP:PORT"))?,
            );
        }
        Ok(cfg)
    }
}

/// Runs the broker until SIGINT or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let cfg = args.resolve().map_err(CliError::usage)?;
    // Handlers first: a SIGTERM that arrives while starting must drain, not kill.
    let signals = install_signals().map_err(|e| CliError::failure(format!("signals: {e}")))?;
    tracing::info!(config = %cfg, "starting");
    let running = crate::server::start(cfg, Arc::new(SystemClock))
        .await
        .map_err(|e| CliError::failure(format!("{e:#}")))?;
    let stopper = running.stopper();
    tokio::spawn(async move {
        wait_for_signal(signals).await;
        tracing::info!("shutdown requested: draining");
        let _ = stopper.send(true);
    });
    running
        .wait()
        .await
        .map_err(|e| CliError::failure(format!("{e:#}")))
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn install_signals() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok((
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    ))
}

async fn wait_for_signal((mut term, mut int): Signals) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

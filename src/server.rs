//! Composition root: builds the secrets, CA, store and broker from a
//! [`Config`], then serves the `Identity` service (plus health and
//! reflection) over TLS and the `Admin` service on a `0600` Unix socket.
//! The only module that names concrete backends. Shutdown drains in-flight
//! calls on both listeners, then flushes and closes the store.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use base64::Engine;
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::{
    api::{pb, AdminApi, IdentityApi},
    ca::ring::{Authority, RingOptions},
    clock::Clock,
    config::Config,
    core::{Broker, BrokerConfig, BrokerSecrets},
    secret::{self, Secret},
    store::{
        sqlite::{SqliteOptions, SqliteStore},
        Store,
    },
    tls::{DynamicTls, TlsMaterial},
    token::TokenKey,
};

/// How often the maintenance task runs (rotation schedule, purge, CRLs).
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(30);

/// How long shutdown waits for in-flight calls.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// A started server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    /// The bound TLS address (useful with port 0).
    pub addr: SocketAddr,
    /// The bound metrics address, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The admin socket path.
    pub admin_socket: PathBuf,
    /// `sha256:<hex>` CA pin.
    pub ca_pin: String,
    /// The broker core (for in-process tests and benchmarks).
    pub broker: Arc<Broker>,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("addr", &self.addr)
            .field("admin_socket", &self.admin_socket)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stops accepting, drains in-flight calls, closes the store.
    ///
    /// # Errors
    /// When a listener task failed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("server task panicked")?
    }

    /// Waits until the server stops by itself (e.g. listener failure).
    ///
    /// # Errors
    /// When a listener task failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task panicked")?
    }

    /// A handle that triggers shutdown from elsewhere (signal handlers).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Creates the data directory `0700` if missing; refuses one that others can write.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("create data dir {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o022 != 0 {
        bail!(
            "data dir {} is writable by group or others (mode {:o}); run: chmod 700 {}",
            dir.display(),
            mode & 0o777,
            dir.display()
        );
    }
    Ok(())
}

/// Token key precedence (DESIGN.md §3): file > `SIGIL_TOKEN_KEY` > generated-and-stored.
fn load_token_key(cfg: &Config) -> anyhow::Result<TokenKey> {
    if let Some(path) = &cfg.token_key_file {
        let s = secret::read_secret_file(path)?
            .with_context(|| format!("token key file {} not found", path.display()))?;
        return token_key_from(s, "token key file");
    }
    if let Some(b64) = &cfg.token_key_env {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| anyhow::anyhow!("SIGIL_TOKEN_KEY is not valid base64"))?;
        return token_key_from(Secret::new(raw), "SIGIL_TOKEN_KEY");
    }
    let (s, created) =
        secret::load_or_generate(&cfg.data_dir.join("token_key"), || Secret::random(32))?;
    if created {
        tracing::info!("generated a new token key (stored 0600 in the data dir)");
    }
    token_key_from(s, "token key")
}

/// Name of the generated bootstrap secret file in the data dir.
pub const BOOTSTRAP_SECRET_FILE: &str = "bootstrap_secret";

/// Bootstrap secret precedence (issue #3): first `SIGIL_BOOTSTRAP_SECRET`
/// (base64), then `--bootstrap-secret-file` (base64 text, 0600), then one
/// generated into `<data-dir>/bootstrap_secret` (0600) — unless an external
/// one is required.
fn load_bootstrap_secret(cfg: &Config) -> anyhow::Result<(Option<Secret>, &'static str)> {
    if let Some(b64) = &cfg.bootstrap_secret_env {
        return Ok((
            Some(decode_bootstrap(b64.as_bytes(), "SIGIL_BOOTSTRAP_SECRET")?),
            "env",
        ));
    }
    if let Some(path) = &cfg.bootstrap_secret_file {
        let s = secret::read_secret_file(path)?
            .with_context(|| format!("bootstrap secret file {} not found", path.display()))?;
        return Ok((
            Some(decode_bootstrap(s.expose(), "bootstrap secret file")?),
            "file",
        ));
    }
    if cfg.require_bootstrap_secret {
        return Ok((None, "missing"));
    }
    let (s, created) = secret::load_or_generate(&cfg.data_dir.join(BOOTSTRAP_SECRET_FILE), || {
        let raw = Secret::random(32);
        let mut text = base64::engine::general_purpose::STANDARD.encode(raw.expose());
        text.push('\n');
        let s = Secret::new(text.as_bytes().to_vec());
        zeroize::Zeroize::zeroize(&mut text);
        s
    })?;
    if created {
        tracing::info!(
            file = BOOTSTRAP_SECRET_FILE,
            "generated a bootstrap secret (0600 in the data dir; `sigil bootstrap secret-path`)"
        );
    }
    Ok((
        Some(decode_bootstrap(s.expose(), "bootstrap secret")?),
        "generated",
    ))
}

/// Decodes a base64 bootstrap secret (surrounding whitespace ignored), ≥ 32 bytes.
///
/// # Errors
/// Not base64, or too short; the message never includes the value.
pub fn decode_bootstrap(text: &[u8], what: &str) -> anyhow::Result<Secret> {
    let trimmed = std::str::from_utf8(text)
        .map_err(|_| anyhow::anyhow!("{what} is not base64 text"))?
        .trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .map_err(|_| anyhow::anyhow!("{what} is not valid base64"))?;
    if raw.len() < 32 {
        bail!("{what} must decode to at least 32 bytes");
    }
    Ok(Secret::new(raw))
}

fn token_key_from(s: Secret, what: &str) -> anyhow::Result<TokenKey> {
    if s.len() < 32 {
        bail!("{what} must be at least 32 bytes");
    }
    Ok(TokenKey::new(s))
}

/// Builds everything and starts serving. Returns once both listeners are bound.
///
/// # Errors
/// Bad data dir, unreadable or too-open secret files, a CA of another trust
/// domain, a busy port or socket.
pub async fn start(cfg: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    prepare_data_dir(&cfg.data_dir)?;
    // The store first: with PostgreSQL, key material is shared through it.
    let (store, kek): (Arc<dyn Store>, Option<Arc<crate::keysync::Kek>>) = match &cfg.store_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let kek = crate::keysync::load_kek(cfg.kek_file.as_ref(), cfg.kek_env.as_deref())?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "PostgreSQL needs a key-encryption key to seal the shared key material: \
                         set SIGIL_KEK (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) \
                         or --kek-file FILE (0600)"
                    )
                })?;
            let pg = crate::store::postgres::PostgresStore::connect(
                url,
                crate::store::postgres::PostgresOptions {
                    server_ca: cfg.store_ca_file.clone(),
                    ..crate::store::postgres::PostgresOptions::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("open PostgreSQL store: {e}"))?;
            (Arc::new(pg), Some(Arc::new(kek)))
        }
        Some(_) => bail!("--store must be a postgres:// URL (or empty for the embedded SQLite)"),
        None if cfg.store_ca_file.is_some() => {
            bail!("--store-ca-file is for a postgres:// store; the embedded SQLite needs none")
        }
        None => (
            Arc::new(
                SqliteStore::open(
                    &cfg.data_dir.join("sigil.db"),
                    SqliteOptions {
                        group_commit: cfg.group_commit,
                        ..SqliteOptions::default()
                    },
                )
                .context("open store")?,
            ),
            None,
        ),
    };
    if let Some(k) = &kek {
        crate::keysync::pull(store.as_ref(), k, &cfg.data_dir)
            .await
            .context("pull shared key material")?;
    }
    let mut token_key = load_token_key(&cfg)?;
    let mut secrets = load_bootstrap_secret(&cfg)?;
    let (authority, created) = Authority::load_or_create(
        &cfg.data_dir,
        &cfg.trust_domain,
        clock.now_ms(),
        RingOptions::default(),
    )
    .context("load CA")?;
    if let Some(k) = &kek {
        // Publish what this replica generated; adopt whatever another
        // replica published first.
        if crate::keysync::push(store.as_ref(), k, &cfg.data_dir)
            .await
            .context("publish shared key material")?
        {
            token_key = load_token_key(&cfg)?;
            secrets = load_bootstrap_secret(&cfg)?;
            authority.reload(clock.now_ms()).context("reload CA")?;
        }
    } else if created {
        tracing::info!(ca_pin = authority.active().ca_pin(), "generated a new CA");
    }
    let authority = Arc::new(authority);
    let mut bcfg = BrokerConfig::new(cfg.trust_domain.clone());
    bcfg.window_secs = cfg.window_secs;
    bcfg.x509_ttl_secs = cfg.x509_ttl_secs;
    bcfg.jwt_ttl_secs = cfg.jwt_ttl_secs;
    bcfg.rates = cfg.rates.clone();
    let (bootstrap, bootstrap_source) = secrets;
    let broker = Arc::new(
        Broker::new(
            bcfg,
            store.clone(),
            authority.clone(),
            BrokerSecrets {
                token_key,
                bootstrap,
                bootstrap_source,
                attestors: attestors(&cfg).await?,
            },
            clock.clone(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("load broker state: {e}"))?,
    );

    // TLS serving identity, signed by the active CA; clients pin the CA key.
    // Client certificates are optional and may come from any published CA.
    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !cfg.listen.ip().is_unspecified() {
        sans.push(cfg.listen.ip().to_string());
    }
    sans.extend(cfg.sans.iter().cloned());
    sans.dedup();
    let tls = Arc::new(DynamicTls::new(
        authority.clone(),
        tls_material(&broker, &sans, clock.now_ms())?,
    )?);
    tls.set_grace_secs(plan_grace(&broker));
    write_crl(&cfg.data_dir, &broker);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("bind {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    fs::write(cfg.data_dir.join("listen.addr"), format!("{addr}\n"))?;

    let admin_listener = bind_admin_socket(&cfg.admin_socket)?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::identity_server::IdentityServer<IdentityApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;

    let (stop, stop_rx) = watch::channel(false);
    // Limits that keep one client from pinning resources: per-call deadline,
    // streams per connection, header size, HTTP/2 pings that close dead or
    // idle-and-unresponsive connections, a bounded connection age (clients
    // reconnect transparently), and a cap on reset streams (rapid reset).
    let public = Server::builder()
        .timeout(Duration::from_secs(30))
        .max_concurrent_streams(256)
        .http2_max_header_list_size(16 * 1024)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_connection_age(Duration::from_secs(2 * 3600))
        .max_connection_age_grace(Duration::from_secs(60))
        .http2_max_pending_accept_reset_streams(Some(100))
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            IdentityApi::new(broker.clone())
                .with_trusted_proxies(cfg.trusted_proxies.clone())
                .into_service(),
        )
        .add_service(AdminApi::public(broker.clone()).into_service())
        .add_service(crate::api::delegation::DelegationApi::new(broker.clone()).into_service())
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listener, tls.clone(), cfg.handshake_timeout),
            wait_stop(stop_rx.clone()),
        );
    let admin = Server::builder()
        .timeout(Duration::from_secs(30))
        .add_service(AdminApi::local(broker.clone()).into_service())
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(admin_listener),
            wait_stop(stop_rx.clone()),
        );

    let m_broker = broker.clone();
    let m_clock = clock.clone();
    let m_tls = tls.clone();
    let m_dir = cfg.data_dir.clone();
    let mut m_stop = stop_rx.clone();
    let mut bundle_rx = broker.watch_bundle();
    let mut crl_rx = broker.watch_crls();
    let purger = tokio::spawn(async move {
        let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = m_broker.maintain().await {
                        tracing::warn!(error = %e, "maintenance failed");
                    }
                    m_tls.set_grace_secs(plan_grace(&m_broker));
                }
                changed = crl_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    write_crl(&m_dir, &m_broker);
                }
                changed = bundle_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // New CA generation: re-issue the serving certificate and
                    // trust every published CA for client certificates.
                    match tls_material(&m_broker, &sans, m_clock.now_ms()) {
                        Ok(m) => {
                            if let Err(e) = m_tls.update(m) {
                                tracing::error!(error = %e, "TLS update failed");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "serving certificate failed"),
                    }
                }
                _ = m_stop.changed() => break,
            }
        }
    });

    spawn_jwks_refresh(broker.clone(), cfg.jwks_sources.clone(), stop_rx.clone());
    if let Some(k) = kek.clone() {
        spawn_replica_sync(
            broker.clone(),
            store.clone(),
            k,
            cfg.data_dir.clone(),
            stop_rx.clone(),
        );
    }

    let metrics_addr = match cfg.metrics_listen {
        Some(a) => {
            let bound = spawn_metrics(a, broker.clone(), stop_rx.clone()).await?;
            fs::write(cfg.data_dir.join("metrics.addr"), format!("{bound}\n"))?;
            Some(bound)
        }
        None => None,
    };

    let socket_path = cfg.admin_socket.clone();
    let stop_on_failure = stop.clone();
    let stop_seen = stop_rx.clone();
    let task = tokio::spawn(async move {
        let public = tokio::spawn(public);
        let admin = tokio::spawn(admin);
        let (public_abort, admin_abort) = (public.abort_handle(), admin.abort_handle());
        let both = async { tokio::join!(public, admin) };
        tokio::pin!(both);
        // Shutdown drains in-flight calls, but an idle or stuck client must
        // not hold the process: after the grace period the listeners are
        // aborted and their connections closed.
        let deadline = async {
            wait_stop(stop_seen).await;
            tokio::time::sleep(DRAIN_GRACE).await;
        };
        let (p, a) = tokio::select! {
            r = &mut both => r,
            () = deadline => {
                tracing::warn!("connections outlived the drain grace period; closing them");
                public_abort.abort();
                admin_abort.abort();
                both.await
            }
        };
        let p = match p {
            Err(e) if e.is_cancelled() => Ok(Ok(())),
            other => other,
        };
        let a = match a {
            Err(e) if e.is_cancelled() => Ok(Ok(())),
            other => other,
        };
        // Either listener ending (error or shutdown) stops the other.
        let _ = stop_on_failure.send(true);
        let _ = purger.await;
        let drained = tokio::time::timeout(DRAIN_GRACE, store.close()).await;
        if drained.is_err() {
            tracing::warn!("store did not close within the grace period");
        }
        let _ = fs::remove_file(&socket_path);
        p.context("public listener panicked")?
            .context("public listener")?;
        a.context("admin listener panicked")?
            .context("admin listener")?;
        tracing::info!("stopped");
        Ok(())
    });

    tracing::info!(
        trust_domain = %cfg.trust_domain,
        listen = %addr,
        admin_socket = %cfg.admin_socket.display(),
        store = if cfg.store_url.is_some() { "postgres" } else { "sqlite" },
        attestation = ?broker.attestation_formats(),
        plan_version = broker.active_plan().map_or(0, |p| p.version),
        ca_pin = %broker.ca_pin(),
        "sigil serving"
    );
    Ok(Running {
        metrics_addr,
        addr,
        admin_socket: cfg.admin_socket.clone(),
        ca_pin: broker.ca_pin(),
        broker,
        stop,
        task,
    })
}

/// Builds the attestation verifiers, fetching URL-sourced JWKS first.
async fn attestors(cfg: &Config) -> anyhow::Result<crate::attest::registry::Registry> {
    let mut attest = cfg.attest.clone();
    for src in &cfg.jwks_sources {
        let json = crate::jwks::fetch(src)
            .await
            .with_context(|| format!("attestation.oidc {}: fetch {}", src.alias, src.url))?;
        if let Some(i) = attest.oidc.iter_mut().find(|i| i.alias == src.alias) {
            i.jwks_json = json;
        }
    }
    crate::attest::registry::Registry::new(&attest)
        .map_err(|e| anyhow::anyhow!("attestation config: {e}"))
}

/// Refetches URL-sourced JWKS on their timers; a failed fetch keeps the old keys.
fn spawn_jwks_refresh(
    broker: Arc<Broker>,
    sources: Vec<crate::jwks::JwksSource>,
    stop: watch::Receiver<bool>,
) {
    for src in sources {
        let broker = broker.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(src.refresh.max(Duration::from_secs(1)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(oidc) = broker.oidc_attestor() else { break };
                        match crate::jwks::fetch(&src).await.map_err(|e| format!("{e:#}")).and_then(|json| {
                            oidc.update_jwks(&src.alias, &json).map_err(|e| e.to_string())
                        }) {
                            Ok(n) => tracing::debug!(alias = %src.alias, keys = n, "JWKS refreshed"),
                            Err(e) => tracing::warn!(alias = %src.alias, error = %e, "JWKS refresh failed; keeping the old keys"),
                        }
                    }
                    _ = stop.changed() => break,
                }
            }
        });
    }
}

/// Replica coordination (PostgreSQL): applies other replicas' changes as
/// soon as the store announces them (LISTEN/NOTIFY), publishes this
/// replica's key rotations (exactly one wins; the others adopt it), and
/// resyncs every few seconds as a safety net.
fn spawn_replica_sync(
    broker: Arc<Broker>,
    store: Arc<dyn Store>,
    kek: Arc<crate::keysync::Kek>,
    dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    use crate::store::StoreEvent;
    let mut events = store.subscribe();
    let mut bundle = broker.watch_bundle();
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                ev = events.recv() => {
                    match ev {
                        Ok(StoreEvent::Revocation) => {
                            let _ = broker.reload_revocations().await;
                            let _ = broker.refresh_crls().await;
                        }
                        Ok(StoreEvent::Plan) => {
                            let _ = broker.reload_plan().await;
                        }
                        Ok(StoreEvent::Keys) => {
                            if crate::keysync::pull(store.as_ref(), &kek, &dir).await.is_ok() {
                                broker.reload_authority().await;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let _ = broker.reload_plan().await;
                            let _ = broker.reload_revocations().await;
                        }
                        Err(_) => break,
                    }
                }
                changed = bundle.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    // A local rotation: publish it, or adopt the winner's.
                    match crate::keysync::push(store.as_ref(), &kek, &dir).await {
                        Ok(true) => {
                            broker.reload_authority().await;
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "publishing key material failed"),
                    }
                }
                _ = resync.tick() => {
                    if crate::keysync::pull(store.as_ref(), &kek, &dir).await.is_ok() {
                        broker.reload_authority().await;
                    }
                    let _ = broker.reload_plan().await;
                    let _ = broker.reload_revocations().await;
                }
                _ = stop.changed() => break,
            }
        }
    });
}

/// Serves `GET /metrics` (Prometheus text) on `addr` until stopped. A
/// minimal HTTP/1.0 responder: one request per connection, 8 KiB request
/// cap, 5 s to send it.
async fn spawn_metrics(
    addr: SocketAddr,
    broker: Arc<Broker>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics {addr}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.changed() => break,
            };
            let Ok((mut sock, _)) = conn else { continue };
            let broker = broker.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                n += k;
                                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let (status, body) = if head.starts_with("GET /metrics ") {
                    ("200 OK", metrics_text(&broker))
                } else {
                    ("404 Not Found", "not found\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    tracing::info!(listen = %bound, "metrics serving");
    Ok(bound)
}

/// Counters and histograms, plus gauges read from the broker at scrape time.
fn metrics_text(broker: &Broker) -> String {
    let view = broker.authority().view();
    let mut gauges: Vec<crate::metrics::Gauge<'_>> = vec![
        (
            "sigil_plan_version",
            vec![],
            broker.active_plan().map_or(0.0, |p| p.version as f64),
        ),
        ("sigil_bundle_sequence", vec![], view.sequence as f64),
        (
            "sigil_rate_limited_peers",
            vec![],
            broker.rate_limited_peers() as f64,
        ),
    ];
    for (meta, ca) in &view.generations {
        gauges.push((
            "sigil_ca_not_after_seconds",
            vec![
                ("generation", meta.id.to_string()),
                ("state", format!("{:?}", meta.state).to_lowercase()),
            ],
            (ca.ca_not_after_ms() / 1000) as f64,
        ));
    }
    gauges.push((
        "sigil_revocations",
        vec![],
        broker.revocation_count() as f64,
    ));
    crate::metrics::global().render(&gauges)
}

/// Serving certificate from the serving generation (the oldest one still
/// published and not merely prepared): clients holding an older bundle keep
/// connecting through a whole rotation overlap.
fn tls_material(broker: &Broker, sans: &[String], now_ms: i64) -> anyhow::Result<TlsMaterial> {
    let view = broker.authority().view();
    let ca = view.serving();
    let (leaf, key) = ca
        .serving_cert(sans, now_ms)
        .context("serving certificate")?;
    Ok(TlsMaterial {
        chain: vec![leaf, ca.ca_cert_der().to_vec()],
        key_pkcs8: key,
    })
}

fn plan_grace(broker: &Broker) -> i64 {
    broker
        .active_plan()
        .map_or(0, |p| p.plan.limits.renewal_grace)
}

/// Writes the active generation's CRL to `<data-dir>/crl.der` (atomically).
fn write_crl(dir: &Path, broker: &Broker) {
    let crls = broker.crls();
    let Some(active) = crls.first() else { return };
    let tmp = dir.join("crl.der.tmp");
    let res = fs::write(&tmp, active).and_then(|()| fs::rename(&tmp, dir.join("crl.der")));
    if let Err(e) = res {
        tracing::warn!(error = %e, "could not write crl.der");
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds the admin socket with mode `0600`, replacing a stale socket file
/// left by a crash but refusing to steal one a live server answers on.
fn bind_admin_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "admin socket {} is in use: is another sigil serving this data dir?",
                path.display()
            );
        }
        fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    // Bound (and listening, 0600) under a temporary name, then renamed into
    // place: the socket file appears only once it accepts connections, so
    // waiting for it is a reliable readiness check for scripts and tests.
    let tmp = path.with_extension(format!("sock.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("bind admin socket {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path).with_context(|| format!("bind admin socket {}", path.display()))?;
    Ok(listener)
}

/// Verifies the audit chain of a data dir without a running broker
/// (forensics must not depend on the process that writes the log).
///
/// # Errors
/// The store cannot be opened.
pub async fn verify_audit_offline(data_dir: &Path) -> anyhow::Result<crate::core::AuditVerdict> {
    let db = data_dir.join("sigil.db");
    if !db.exists() {
        bail!("no store at {}", db.display());
    }
    let store = SqliteStore::open(&db, SqliteOptions::default()).context("open store")?;
    let verdict = crate::core::verify_store_chain(&store).await;
    store.close().await;
    Ok(verdict?)
}

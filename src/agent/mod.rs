//! `sigil agent`: keeps credentials fresh on a workload's host and serves
//! the SPIFFE Workload API on a Unix socket.
//!
//! * **Identity.** The agent enrolls once with its bootstrap credential (a
//!   token file, deleted after use, or an attestation command), keeps its
//!   X509-SVID under `<data-dir>/private` (`0700`), renews it at half-life
//!   with jitter, retries with capped exponential backoff, and after a
//!   restart reuses a still-valid SVID instead of needing a new credential.
//! * **Who gets what** ([`manager`]). A caller is known by its Unix peer
//!   credentials ([`selectors`]). Plan entries whose `parent_id` is the
//!   agent grant their SPIFFE ID to callers having all their selectors; the
//!   broker issues those SVIDs to the agent on the workload's behalf
//!   (`Delegation`), keys generated here. A caller matching no entry gets
//!   the agent's own identity if it matches a default selector (by default:
//!   the agent's own uid), else `PermissionDenied`.
//! * **Serving** ([`workload_api`]): `SpiffeWorkloadAPI` exactly as the
//!   SPIFFE proto; streams push the full state on every change.
//! * **Files** ([`files`]): `--write-dir` keeps `svid.pem`, `svid.key`,
//!   `bundle.pem` (and a `jwt`) replaced atomically, with an `--on-update` hook.
//!
//! Like [`crate::cli`], this module is a client of the broker and names
//! tonic; it talks to the broker only through its gRPC API. It logs SPIFFE
//! IDs, serials and reasons — never keys, tokens or JWTs.

pub mod files;
pub mod jwt;
pub mod manager;
pub mod selectors;
pub mod state;
pub mod upstream;
pub mod workload_api;

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;

pub use manager::{Health, Timing};
pub use upstream::Bootstrap;

use crate::{cli::Trust, clock::Clock};

/// Everything `sigil agent` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Broker address, `https://HOST:PORT`.
    pub broker: String,
    /// How the broker is trusted before the agent holds the bundle.
    pub trust: Trust,
    /// The one bootstrap credential.
    pub bootstrap: Bootstrap,
    /// Data directory (`0755`; keys under `private/`, `0700`).
    pub data_dir: PathBuf,
    /// Workload API socket [default: `<data-dir>/public/api.sock`].
    pub socket: Option<PathBuf>,
    /// `--write-dir` outputs, if any.
    pub write_dir: Option<PathBuf>,
    /// Audiences of the `jwt` file in `--write-dir` (none: no JWT file).
    pub jwt_audiences: Vec<String>,
    /// Command run after each `--write-dir` update.
    pub on_update: Option<String>,
    /// A caller matching any of these (and no plan entry) gets the agent's
    /// own identity. `None`: the agent's own uid.
    pub default_selectors: Option<Vec<String>>,
    /// Retry and sync timing.
    pub timing: Timing,
}

impl AgentConfig {
    /// Defaults: socket under the data dir, own uid as the default
    /// selector, backoff 1 s → 60 s, sync every 10 s.
    pub fn new(broker: impl Into<String>, trust: Trust, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            broker: broker.into(),
            trust,
            bootstrap: Bootstrap::None,
            data_dir: data_dir.into(),
            socket: None,
            write_dir: None,
            jwt_audiences: Vec::new(),
            on_update: None,
            default_selectors: None,
            timing: Timing {
                backoff_min: Duration::from_secs(1),
                backoff_max: Duration::from_secs(60),
                sync_interval: Duration::from_secs(10),
                poll: Duration::from_secs(1),
            },
        }
    }

    /// The socket path this configuration serves on.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("public").join("api.sock"))
    }
}

/// What the agent currently holds, for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent's SPIFFE ID, once enrolled.
    pub spiffe_id: Option<String>,
    /// Serial of its current SVID.
    pub serial: Option<String>,
    /// Its NotAfter, Unix ms.
    pub not_after_ms: Option<i64>,
    /// Workload SVIDs held: (SPIFFE ID, serial).
    pub workloads: Vec<(String, String)>,
    /// Bundle sequence, once known.
    pub bundle_sequence: Option<u64>,
    /// Number of plan entries it serves, once synced.
    pub entries: Option<usize>,
    /// Broker health.
    pub health: Health,
}

/// A started agent. Call [`RunningAgent::shutdown`] to stop it.
pub struct RunningAgent {
    socket: PathBuf,
    shared: Arc<manager::Shared>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    scheduler: JoinHandle<()>,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl RunningAgent {
    /// The Workload API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `unix://<absolute socket path>`, the `SPIFFE_ENDPOINT_SOCKET` value.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// What the agent holds now.
    pub fn status(&self) -> AgentStatus {
        let s = self.shared.snapshot();
        AgentStatus {
            spiffe_id: s.own.as_ref().map(|o| o.spiffe_id.clone()),
            serial: s.own.as_ref().map(|o| o.serial.clone()),
            not_after_ms: s.own.as_ref().map(|o| o.not_after_ms),
            workloads: s
                .workloads
                .iter()
                .map(|(id, w)| (id.clone(), w.svid.serial.clone()))
                .collect(),
            bundle_sequence: s.bundle.as_ref().map(|b| b.sequence),
            entries: s.entries.as_ref().map(|e| e.len()),
            health: self.shared.health(),
        }
    }

    /// A handle that stops the agent from elsewhere (signal handlers).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// Stops serving (open streams end), stops the scheduler, removes the socket.
    ///
    /// # Errors
    /// The server task failed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until the agent stops (after the stopper fired).
    ///
    /// # Errors
    /// The server task failed.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.server.await.context("Workload API task panicked")?;
        let _ = self.stop.send(true);
        let _ = self.scheduler.await;
        let _ = fs::remove_file(&self.socket);
        served.context("Workload API server")?;
        tracing::info!("agent stopped");
        Ok(())
    }
}

/// Prepares the data dir, binds the socket and starts serving and
/// renewing. Returns at once: the Workload API answers `Unavailable` until
/// the agent holds an SVID, its bundle and its entries.
///
/// # Errors
/// A bad data dir, socket in use, a malformed broker URL or `--write-dir`.
pub async fn start(cfg: AgentConfig, clock: Arc<dyn Clock>) -> anyhow::Result<RunningAgent> {
    let dirs = state::Dirs::prepare(&cfg.data_dir)?;
    let socket = std::path::absolute(cfg.socket_path()).context("socket path")?;
    if cfg.socket.is_none() {
        if let Some(public) = socket.parent() {
            if !public.exists() {
                fs::create_dir_all(public)
                    .with_context(|| format!("create {}", public.display()))?;
                fs::set_permissions(public, fs::Permissions::from_mode(0o755))?;
            }
        }
    }
    let upstream = upstream::Upstream::new(&cfg.broker, cfg.trust.clone())?;
    let default_selectors = match &cfg.default_selectors {
        Some(s) => s.clone(),
        None => match selectors::own_uid() {
            Some(uid) => vec![format!("unix:uid:{uid}")],
            None => Vec::new(),
        },
    };
    let files = match &cfg.write_dir {
        Some(dir) => {
            let f = files::FileOutputs::new(dir.clone(), cfg.on_update.clone());
            f.prepare()?;
            Some(f)
        }
        None => None,
    };
    let (stop, stop_rx) = watch::channel(false);
    let shared = Arc::new(manager::Shared::new(
        clock,
        upstream,
        dirs,
        cfg.bootstrap.clone(),
        default_selectors.clone(),
        stop_rx.clone(),
    ));
    let listener = bind_socket(&socket)?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(workload_api::WorkloadApi::service(shared.clone()))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                wait_stop(stop_rx.clone()),
            ),
    );
    let scheduler = tokio::spawn(manager::run(
        shared.clone(),
        cfg.timing.clone(),
        files,
        cfg.jwt_audiences.clone(),
    ));
    tracing::info!(
        broker = %cfg.broker,
        data_dir = %cfg.data_dir.display(),
        socket = %socket.display(),
        default_selectors = ?default_selectors,
        bootstrap = ?cfg.bootstrap,
        write_dir = ?cfg.write_dir,
        "sigil agent serving the Workload API (SPIFFE_ENDPOINT_SOCKET=unix://{})",
        socket.display()
    );
    Ok(RunningAgent {
        socket,
        shared,
        stop,
        server,
        scheduler,
    })
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Binds the Workload API socket, world-connectable (`0777`: callers are
/// told apart by their peer credentials, not by file permission), replacing
/// a stale socket file but refusing one a live agent answers on.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "socket {} is in use: is another sigil agent running with it?",
                path.display()
            );
        }
        fs::remove_file(path).with_context(|| format!("remove stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

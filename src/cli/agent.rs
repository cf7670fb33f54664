//! `sigil agent`: flags → [`crate::agent::AgentConfig`], then run the agent
//! until SIGINT/SIGTERM. Prints the `SPIFFE_ENDPOINT_SOCKET=unix://…` line
//! for workloads on stdout once the socket is bound.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;

use super::{trust_from, CliError};
use crate::{
    agent::{self, AgentConfig, Bootstrap},
    clock::SystemClock,
};

/// Flags of `sigil agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Broker address, https://HOST:PORT.
    #[arg(long, env = "SIGIL_BROKER")]
    pub broker: String,
    /// Trust the broker whose CA key has this pin (sha256:<hex>).
    #[arg(long, conflicts_with = "bundle", required_unless_present = "bundle")]
    pub ca_pin: Option<String>,
    /// Trust the broker through these CA certificates (PEM).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Enroll with the enrollment token in this file; the file is deleted
    /// once the token is used. Not needed while a saved SVID is valid.
    #[arg(long, conflicts_with = "attestation_command")]
    pub token_file: Option<PathBuf>,
    /// Enroll with an attestation document of this format (aws_nitro, oidc).
    #[arg(long, requires = "attestation_command")]
    pub attestation_format: Option<String>,
    /// Command printing the attestation document on stdout; it gets
    /// SIGIL_CHALLENGE (hex server nonce), SIGIL_PUBLIC_KEY (hex DER SPKI of
    /// the new key) and SIGIL_CSR_SHA256 in its environment.
    #[arg(long, requires = "attestation_format")]
    pub attestation_command: Option<String>,
    /// Data directory (its private/ subdirectory holds the SVID, 0700).
    #[arg(long, env = "SIGIL_AGENT_DATA_DIR", default_value = "./sigil-agent")]
    pub data_dir: PathBuf,
    /// Workload API socket [default: <data-dir>/public/api.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Keep svid.pem, svid.key, bundle.pem (and jwt) of the agent's identity
    /// in this directory, replaced atomically.
    #[arg(long)]
    pub write_dir: Option<PathBuf>,
    /// Also keep a JWT-SVID for this audience in <write-dir>/jwt (repeatable).
    #[arg(long = "jwt-audience", requires = "write_dir")]
    pub jwt_audiences: Vec<String>,
    /// Run this command (sh -c) after each --write-dir update.
    #[arg(long, requires = "write_dir")]
    pub on_update: Option<String>,
    /// Callers matching this selector (and no plan entry) get the agent's own
    /// identity, e.g. unix:uid:1000 (repeatable) [default: the agent's uid].
    #[arg(long = "default-selector")]
    pub default_selectors: Vec<String>,
    /// Serve the agent's own identity to nobody (plan entries only).
    #[arg(long, conflicts_with = "default_selectors")]
    pub no_default_identity: bool,
    /// How often to sync the trust bundle and the plan entries.
    #[arg(long, default_value = "10s")]
    pub sync_interval: String,
}

impl AgentArgs {
    fn config(self) -> Result<AgentConfig, CliError> {
        let trust = trust_from(self.ca_pin.as_deref(), self.bundle.as_deref(), None)?;
        let mut cfg = AgentConfig::new(self.broker, trust, self.data_dir);
        cfg.bootstrap = match (
            self.token_file,
            self.attestation_format,
            self.attestation_command,
        ) {
            (Some(f), _, _) => Bootstrap::TokenFile(f),
            (None, Some(format), Some(command)) => Bootstrap::Attestation { format, command },
            _ => Bootstrap::None,
        };
        cfg.socket = self.socket;
        cfg.write_dir = self.write_dir;
        cfg.jwt_audiences = self.jwt_audiences;
        cfg.on_update = self.on_update;
        for s in &self.default_selectors {
            if !s.starts_with("unix:") || s.split(':').count() < 3 {
                return Err(CliError::usage(format!(
                    "--default-selector {s:?}: expected unix:uid:<n>, unix:gid:<n> or unix:path:<exe>"
                )));
            }
        }
        cfg.default_selectors = if self.no_default_identity {
            Some(Vec::new())
        } else if self.default_selectors.is_empty() {
            None
        } else {
            Some(self.default_selectors)
        };
        let secs = crate::config::parse_duration_secs(&self.sync_interval)
            .map_err(|e| CliError::usage(format!("--sync-interval: {e}")))?;
        cfg.timing.sync_interval = Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(1));
        Ok(cfg)
    }
}

/// Runs `sigil agent` until SIGINT or SIGTERM.
pub async fn run(args: AgentArgs) -> Result<(), CliError> {
    let cfg = args.config()?;
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| CliError::failure(format!("signals: {e}")))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| CliError::failure(format!("signals: {e}")))?;
    let running = agent::start(cfg, Arc::new(SystemClock))
        .await
        .map_err(|e| CliError::failure(format!("{e:#}")))?;
    println!("SPIFFE_ENDPOINT_SOCKET={}", running.endpoint());
    let stopper = running.stopper();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown requested");
        let _ = stopper.send(true);
    });
    running
        .wait()
        .await
        .map_err(|e| CliError::failure(format!("{e:#}")))
}

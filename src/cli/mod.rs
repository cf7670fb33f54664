//! The `sigil` command line: `serve`, `token`, `enroll`, `audit`. Admin
//! verbs talk to a running broker through its gRPC admin socket. Exit codes
//! are a contract for scripts (see [`exit`]).

mod agent;
mod client;
mod enroll;
mod lifecycle;
mod plan;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use client::{
    connect_admin, connect_tls, pem_certs, spki_sha256, tls_config, tls_config_with,
    ClientIdentity, Trust,
};
pub use enroll::{new_key_and_csr, token_proof};
pub use plan::bootstrap_payload;

/// Process exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Unexpected failure (I/O, internal error).
    pub const FAILURE: i32 = 1;
    /// Bad usage: wrong flags or values (also clap's own code).
    pub const USAGE: i32 = 2;
    /// The broker refused the request (bad credential, expired, used, revoked, ...).
    pub const DENIED: i32 = 3;
    /// The broker could not be reached, or its TLS identity did not match the pin/bundle.
    pub const UNREACHABLE: i32 = 4;
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    /// Exit code from [`exit`].
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

impl CliError {
    fn usage(m: impl Into<String>) -> Self {
        Self {
            code: exit::USAGE,
            message: m.into(),
        }
    }
    fn failure(e: impl std::fmt::Display) -> Self {
        Self {
            code: exit::FAILURE,
            message: e.to_string(),
        }
    }
    fn unreachable(e: impl std::fmt::Display) -> Self {
        Self {
            code: exit::UNREACHABLE,
            message: e.to_string(),
        }
    }

    /// Maps a gRPC status: transport-level trouble is "unreachable",
    /// everything the broker decided is "denied" (with its reason).
    fn from_status(s: &tonic::Status) -> Self {
        use tonic::Code;
        let info = crate::api::status::error_info(s);
        let reason = info.as_ref().map(|(r, _)| r.as_str()).unwrap_or("");
        let mut message = if reason.is_empty() {
            format!("{:?}: {}", s.code(), s.message())
        } else {
            format!("{reason}: {}", s.message())
        };
        if let Some((_, md)) = &info {
            if let Some(server) = md.get("server_time_ms").and_then(|v| v.parse::<i64>().ok()) {
                let local = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
                let skew = (local - server) / 1000;
                let dir = if skew >= 0 { "ahead of" } else { "behind" };
                message.push_str(&format!(
                    "\nyour clock is {} s {dir} the broker (window ±{} s)",
                    skew.abs(),
                    md.get("window_seconds").map(String::as_str).unwrap_or("?")
                ));
            }
        }
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                exit::UNREACHABLE
            }
            Code::Internal | Code::DataLoss | Code::Unimplemented => exit::FAILURE,
            _ => exit::DENIED,
        };
        Self { code, message }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::from_status(&s)
    }
}

/// Sigil: one-time credentials in, SPIFFE SVIDs out.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about)]
pub struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, env = "SIGIL_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Log filter (tracing EnvFilter syntax), e.g. info, debug, sigil=trace.
    #[arg(long, global = true, env = "SIGIL_LOG", default_value = "info")]
    pub log_level: String,
    /// The verb.
    #[command(subcommand)]
    pub command: Command,
}

/// Verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(serve::ServeArgs),
    /// Create, revoke and list enrollment tokens (via the admin socket).
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Enroll with a token: writes svid.pem, svid.key, bundle.pem (and jwt).
    Enroll(enroll::EnrollArgs),
    /// Read and verify the audit trail.
    #[command(subcommand)]
    Audit(token::AuditCmd),
    /// Bootstrap, propose, approve, apply, show and diff plans.
    #[command(subcommand)]
    Plan(plan::PlanCmd),
    /// Broker status: bootstrap mode, active plan, counts.
    Status {
        /// Where to ask.
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Bootstrap-secret helpers.
    #[command(subcommand)]
    Bootstrap(plan::BootstrapCmd),
    /// Renew an X509-SVID over mTLS (new key by default).
    Renew(lifecycle::RenewArgs),
    /// Fetch a JWT-SVID over mTLS, or `validate` one.
    Jwt(lifecycle::JwtArgs),
    /// Revoke by --serial, --spiffe-id, --node or --jti; or --list.
    Revoke(lifecycle::RevokeArgs),
    /// CA/JWT key rotation.
    #[command(subcommand)]
    Ca(lifecycle::CaCmd),
    /// Show or watch the trust bundle.
    #[command(subcommand)]
    Bundle(lifecycle::BundleCmd),
    /// Run the host agent: keep an SVID fresh and serve the SPIFFE Workload API.
    Agent(agent::AgentArgs),
    /// Print a fresh one-use server challenge (hex) for an attestation document.
    Challenge {
        /// Broker and trust.
        #[command(flatten)]
        target: lifecycle::BrokerTrust,
        /// Print {nonce, expires_at, formats} as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Where admin calls go: the local admin socket (default), or a remote
/// broker over mutual TLS with an admin's X509-SVID (`--broker --cert --key`).
#[derive(Debug, Clone, Args)]
pub struct AdminTarget {
    /// Data directory of the broker (its admin socket is <data-dir>/admin.sock).
    #[arg(long, env = "SIGIL_DATA_DIR", default_value = crate::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Admin socket path (overrides --data-dir).
    #[arg(long, env = "SIGIL_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Remote broker https://HOST:PORT (mTLS with --cert/--key instead of the socket).
    #[arg(long, requires_all = ["cert", "key"])]
    pub broker: Option<String>,
    /// The admin's X509-SVID (PEM, leaf first), e.g. ./admin-svid/svid.pem.
    #[arg(long, requires = "broker")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM), e.g. ./admin-svid/svid.key.
    #[arg(long, requires = "broker")]
    pub key: Option<PathBuf>,
    /// Trust the broker whose CA key has this pin [default with --broker:
    /// bundle.pem next to --cert].
    #[arg(long, conflicts_with = "bundle")]
    pub ca_pin: Option<String>,
    /// Trust the broker through these CA certificates (PEM).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
}

impl AdminTarget {
    fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// A channel to the admin service (socket or mTLS).
    async fn channel(&self) -> Result<tonic::transport::Channel, CliError> {
        let (Some(broker), Some(cert), Some(key)) = (&self.broker, &self.cert, &self.key) else {
            return client::connect_admin(self.socket())
                .await
                .map_err(|e| CliError::unreachable(format!("{e:#}")));
        };
        let trust = trust_from(self.ca_pin.as_deref(), self.bundle.as_deref(), Some(cert))?;
        let id =
            ClientIdentity::from_files(cert, key).map_err(|e| CliError::usage(format!("{e:#}")))?;
        let tls =
            tls_config_with(&trust, Some(id)).map_err(|e| CliError::usage(format!("{e:#}")))?;
        client::connect_tls(broker, tls)
            .await
            .map_err(|e| CliError::unreachable(format!("cannot reach {broker}: {e:#}")))
    }
}

/// Trust from `--ca-pin`, `--bundle`, or `bundle.pem` beside `near`.
fn trust_from(
    pin: Option<&str>,
    bundle: Option<&std::path::Path>,
    near: Option<&std::path::Path>,
) -> Result<Trust, CliError> {
    if let Some(p) = pin {
        return Trust::from_pin(p).map_err(|e| CliError::usage(format!("{e:#}")));
    }
    let path = match (bundle, near) {
        (Some(b), _) => b.to_path_buf(),
        (None, Some(c)) => c.with_file_name("bundle.pem"),
        (None, None) => return Err(CliError::usage("give --ca-pin or --bundle")),
    };
    Trust::from_bundle_file(&path).map_err(|e| CliError::usage(format!("{e:#}")))
}

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve(a) => serve::run(a).await,
        Command::Token(c) => token::run_token(c).await,
        Command::Enroll(a) => enroll::run(a).await,
        Command::Audit(c) => token::run_audit(c).await,
        Command::Plan(c) => plan::run(c).await,
        Command::Status { target } => plan::status(target).await,
        Command::Bootstrap(c) => plan::run_bootstrap(c),
        Command::Renew(a) => lifecycle::renew(a).await,
        Command::Jwt(a) => lifecycle::jwt(a).await,
        Command::Revoke(a) => lifecycle::revoke(a).await,
        Command::Ca(c) => lifecycle::ca(c).await,
        Command::Bundle(c) => lifecycle::bundle(c).await,
        Command::Challenge { target, json } => lifecycle::challenge(target, json).await,
        Command::Agent(a) => agent::run(a).await,
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("sigil: {}", e.message);
            e.code
        }
    }
}

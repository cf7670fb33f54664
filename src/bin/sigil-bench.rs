//! `sigil-bench`: load generator and measurement tool for the Sigil broker.
//!
//! Scenarios drive a broker (started in-process on a temp data dir by
//! default, or a running one with `--broker`) with N concurrent clients for
//! a fixed duration or request count and report throughput, latency
//! percentiles, errors by `ErrorInfo` reason, broker CPU and RSS, and the
//! ratio to the crypto floor measured in the same run. `floor`, `startup`
//! and `report` measure the crypto floor, the real binary's startup, and
//! regenerate BENCHMARKS.md. See BENCHMARKS.md and `scripts/bench.sh`.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[path = "sigil-bench/floor.rs"]
mod floor;
#[path = "sigil-bench/load.rs"]
mod load;
#[path = "sigil-bench/prefill.rs"]
mod prefill;
#[path = "sigil-bench/procstat.rs"]
mod procstat;
#[path = "sigil-bench/report.rs"]
mod report;
#[path = "sigil-bench/startup.rs"]
mod startup;
#[path = "sigil-bench/stats.rs"]
mod stats;
#[path = "sigil-bench/svg.rs"]
mod svg;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

/// Exit code: the run completed but some requests failed.
pub const EXIT_REQUEST_ERRORS: i32 = 3;

const AFTER_HELP: &str = "\
Exit codes: 0 success; 1 the benchmark could not run; 2 bad usage or a scenario \
not available in this build yet; 3 the run completed but some requests failed.

Examples:
  sigil-bench enroll-token -c 64 -d 10s                 in-process broker, no JWT
  sigil-bench enroll-token -c 64 --jwt --plot lat.svg   with a JWT-SVID, latency plot
  sigil-bench fresh-connection -c 8 -n 5000             a new TLS connection per enrollment
  sigil-bench enroll-token -c 256 --broker https://127.0.0.1:8443 \\
      --admin-socket ./sigil-data/admin.sock --broker-pid $(pidof sigil)
  sigil-bench floor                                     crypto floor on this machine
  sigil-bench startup --sigil target/release/sigil      cold start / first boot
  scripts/bench.sh                                      everything, rewrites BENCHMARKS.md";

/// Load generator and measurements for the Sigil broker.
#[derive(Debug, Parser)]
#[command(name = "sigil-bench", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Token enrollment over reused connections: each client keeps one HTTP/2
    /// connection and enrolls with pre-created one-use tokens and pre-generated CSRs.
    EnrollToken(LoadArgs),
    /// Token enrollment with a new TCP+TLS connection per enrollment (no TLS
    /// resumption), as first-boot workloads do.
    FreshConnection(LoadArgs),
    /// The crypto floor: single-core cost of an enrollment's HMAC, CSR
    /// verify, leaf signing and JWT mint, and the derived enrollments/s × cores.
    Floor(FloorArgs),
    /// First boot and cold start of the real `sigil serve` binary (until
    /// `<data-dir>/listen.addr` appears and until the first RPC), and its idle RSS.
    Startup(StartupArgs),
    /// Rewrites the generated part of BENCHMARKS.md from a results directory
    /// written by scripts/bench.sh.
    Report(ReportArgs),
    /// SVID renewal (`Renew` with a fresh CSR) over one mTLS connection per
    /// client; each client enrolls once, before the clock starts, for its SVID.
    Renew(LoadArgs),
    /// JWT-SVID fetch (`FetchJWT`) over one mTLS connection per client.
    FetchJwt(LoadArgs),
    /// [pending] enrollment with an AWS Nitro Enclaves attestation document.
    EnrollNitro(PendingArgs),
    /// [pending] enrollment with a CI/Kubernetes OIDC token.
    EnrollOidc(PendingArgs),
    /// [pending] enroll-token against 3 broker replicas on one PostgreSQL.
    #[command(name = "ha-postgres")]
    HaPostgres(PendingArgs),
}

/// Flags of the load scenarios.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Concurrent clients. In enroll-token each client has its own HTTP/2 connection.
    #[arg(short = 'c', long, default_value_t = 8)]
    pub concurrency: usize,
    /// Length of the timed phase, e.g. 10s, 500ms, 2m (ignored with --requests).
    #[arg(short = 'd', long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Run exactly this many enrollments instead of a fixed duration.
    #[arg(short = 'n', long)]
    pub requests: Option<usize>,
    /// Untimed warm-up at the same concurrency; its rate also sizes the token pool. 0 to skip.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Ask for a JWT-SVID with every enrollment: `--jwt`, `--jwt on`, `--jwt off`.
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_value = "off",
          default_missing_value = "on", value_parser = parse_on_off)]
    pub jwt: bool,
    /// Open loop: start requests at this rate (per second, over all clients);
    /// latency counts from the scheduled start, so queueing is not hidden.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// One-use tokens to pre-create for the timed phase [default: warm-up rate × duration × 1.3].
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Trust domain of the SPIFFE IDs the tokens are created for (external broker).
    #[arg(long, default_value = "sigil.local")]
    pub trust_domain: String,

    /// Drive a running broker at https://HOST:PORT instead of starting one in-process.
    #[arg(long, value_name = "URL", help_heading = "External broker")]
    pub broker: Option<String>,
    /// Pin of the broker CA, sha256:<hex> [default: taken from the admin API].
    #[arg(long, value_name = "PIN", help_heading = "External broker")]
    pub ca_pin: Option<String>,
    /// The broker's admin socket, used to create the tokens (required with --broker).
    #[arg(long, value_name = "PATH", help_heading = "External broker")]
    pub admin_socket: Option<PathBuf>,
    /// The broker's process id, to report its CPU (/proc/PID/stat) and RSS.
    #[arg(long, value_name = "PID", help_heading = "External broker")]
    pub broker_pid: Option<u32>,

    /// Data dir of the in-process broker (kept afterwards) [default: a temp dir, removed].
    #[arg(long, value_name = "DIR", help_heading = "In-process broker")]
    pub data_dir: Option<PathBuf>,
    /// SQLite group commit: on (the default) or off.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          help_heading = "In-process broker")]
    pub group_commit: bool,
    /// Before starting, add N issued-certificate records (with tokens, nonces,
    /// audit rows) to the store.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        help_heading = "In-process broker"
    )]
    pub prefill: u64,
    /// Tokio worker threads of the broker runtime [default: cores].
    #[arg(long, help_heading = "In-process broker")]
    pub broker_threads: Option<usize>,
    /// Tokio worker threads of the client runtime [default: cores].
    #[arg(long, help_heading = "In-process broker")]
    pub client_threads: Option<usize>,
    /// Broker log filter; logs are formatted into a sink, as `sigil serve >/dev/null`
    /// would pay for them. `off` to skip.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "info",
        help_heading = "In-process broker"
    )]
    pub broker_log: String,

    /// Seconds spent measuring each crypto operation for the floor; 0 skips it.
    #[arg(long, default_value_t = 0.3, help_heading = "Output")]
    pub floor_secs: f64,
    /// Print the report as JSON on stdout.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
    /// Write latency over time and the latency histogram to this SVG file.
    #[arg(long, value_name = "FILE.svg", help_heading = "Output")]
    pub plot: Option<PathBuf>,
    /// A free-form label copied into the JSON report.
    #[arg(long, help_heading = "Output")]
    pub label: Option<String>,
    /// No progress line on stderr.
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,
}

/// Flags of `floor`.
#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Seconds spent measuring each operation.
    #[arg(long, default_value_t = 1.0)]
    pub secs: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `startup`.
#[derive(Debug, Clone, Args)]
pub struct StartupArgs {
    /// The sigil binary [default: `sigil` next to this executable].
    #[arg(long, value_name = "PATH")]
    pub sigil: Option<PathBuf>,
    /// Boots of each kind (first boot, cold start); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// How long the broker idles before its RSS is read.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// No per-run lines on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Flags of `report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Directory with the JSON results of scripts/bench.sh.
    #[arg(long, value_name = "DIR")]
    pub results: PathBuf,
    /// The markdown file whose generated section is replaced (created if missing).
    #[arg(long, value_name = "FILE", default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Criterion's output directory.
    #[arg(long, value_name = "DIR", default_value = "target/criterion")]
    pub criterion: PathBuf,
}

/// Arguments of a scenario this build cannot run yet (accepted and ignored).
#[derive(Debug, Clone, Args)]
pub struct PendingArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: use e.g. 10s, 500ms, 2m"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, got {s:?}")),
    }
}

/// A directory under the system temp dir, `0700`, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `sigil-bench-<what>-<pid>-<random>`.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(what: &str) -> anyhow::Result<Self> {
        let mut r = [0u8; 6];
        rand::fill(&mut r[..]);
        let p = std::env::temp_dir().join(format!(
            "sigil-bench-{what}-{}-{}",
            std::process::id(),
            hex::encode(r)
        ));
        make_private_dir(&p)?;
        Ok(Self(p))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates `dir` (and parents) with mode `0700` if missing.
///
/// # Errors
/// Creation or chmod failed.
pub fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn pending(name: &str, needs: &str) -> i32 {
    eprintln!(
        "sigil-bench: scenario `{name}` is not available in this build yet (needs {needs}); \
         see BENCHMARKS.md, \"Pending scenarios\""
    );
    2
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::EnrollToken(a) => load::run(&a, load::Mode::Reused),
        Cmd::FreshConnection(a) => load::run(&a, load::Mode::Fresh),
        Cmd::Floor(a) => {
            if !(a.secs > 0.0 && a.secs.is_finite()) {
                anyhow::bail!("--secs must be positive");
            }
            let f = floor::measure(a.secs)?;
            if a.json {
                let mut j = f.to_json();
                j["date"] = procstat::utc_now().into();
                j["machine"] = procstat::Machine::probe().to_json();
                println!("{}", serde_json::to_string_pretty(&j)?);
            } else {
                print!("{}", f.describe());
            }
            Ok(0)
        }
        Cmd::Startup(a) => startup::run(&a),
        Cmd::Report(a) => report::run(&a),
        Cmd::Renew(a) => load::run(&a, load::Mode::Renew),
        Cmd::FetchJwt(a) => load::run(&a, load::Mode::FetchJwt),
        Cmd::EnrollNitro(_) => Ok(pending(
            "enroll-nitro",
            "a Nitro attestation document source and a plan that trusts it; sigil-bench does not build them yet",
        )),
        Cmd::EnrollOidc(_) => Ok(pending(
            "enroll-oidc",
            "an OIDC issuer that the broker's plan trusts; sigil-bench does not set one up yet",
        )),
        Cmd::HaPostgres(_) => Ok(pending(
            "ha-postgres",
            "a PostgreSQL server and 3 broker replicas; sigil-bench does not orchestrate them yet",
        )),
    }
}

fn main() {
    let code = match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("sigil-bench: {msg}");
            // Flag mistakes found after parsing are usage errors, like clap's.
            if msg.starts_with("--") {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn pending_scenarios_parse_any_flags() {
        let cli = Cli::try_parse_from(["sigil-bench", "enroll-nitro", "-c", "8", "--jwt"]);
        assert!(matches!(cli.map(|c| c.cmd), Ok(Cmd::EnrollNitro(_))));
        let cli = Cli::try_parse_from(["sigil-bench", "ha-postgres"]);
        assert!(matches!(cli.map(|c| c.cmd), Ok(Cmd::HaPostgres(_))));
    }

    #[test]
    fn jwt_flag_forms() {
        for (args, want) in [
            (vec!["sigil-bench", "enroll-token"], false),
            (vec!["sigil-bench", "enroll-token", "--jwt"], true),
            (vec!["sigil-bench", "enroll-token", "--jwt", "off"], false),
            (vec!["sigil-bench", "enroll-token", "--jwt=on"], true),
        ] {
            match Cli::try_parse_from(args).map(|c| c.cmd) {
                Ok(Cmd::EnrollToken(a)) => assert_eq!(a.jwt, want),
                other => panic!("{other:?}"),
            }
        }
    }
}

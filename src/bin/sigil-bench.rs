//! `sigil-bench`: load generator and measurement tool for the Sigil broker.
//!
//! Scenarios drive a broker (started in-process on a temp data dir by
//! default, or a running one with `--broker`) with N concurrent clients for
//! a fixed duration or request count and report throughput, latency
//! percentiles, errors by `ErrorInfo` reason, broker CPU and RSS, and the
//! ratio to the crypto floor measured in the same run. `floor`, `startup`
//! and `report` measure the crypto floor, the real binary's startup, and
//! regenerate BENCHMARKS.md. See BENCHMARKS.md and `scripts/bench.sh`.
//!
//! `enroll-nitro` and `enroll-oidc` need evidence generators that only a
//! build with `--features test-support` contains (see `attest.rs`); other
//! builds accept the names and exit 2 saying how to build them.

#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

#[path = "sigil-bench/attest.rs"]
mod attest;
#[path = "sigil-bench/floor.rs"]
mod floor;
#[path = "sigil-bench/ha.rs"]
mod ha;
#[path = "sigil-bench/load.rs"]
mod load;
#[path = "sigil-bench/pace.rs"]
mod pace;
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
this build leaves out (enroll-nitro and enroll-oidc need --features test-support); \
3 the run completed but some requests failed.

Examples:
  sigil-bench enroll-token -c 64 -d 10s                 in-process broker, no JWT
  sigil-bench enroll-token -c 64 --jwt --plot lat.svg   with a JWT-SVID, latency plot
  sigil-bench fresh-connection -c 8 -n 5000             a new TLS connection per enrollment
  sigil-bench enroll-nitro -c 64                        Nitro attestation (build with --features test-support)
  SIGIL_PG_DURABLE=1 scripts/with-postgres.sh sigil-bench ha-postgres -c 64
                                                        1 vs 3 replicas on one PostgreSQL
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
    /// Enrollment with an AWS Nitro Enclaves attestation document from a PKI
    /// generated for the run: GetChallenge, then Enroll with a document signed
    /// over the challenge (needs a build with --features test-support).
    EnrollNitro(LoadArgs),
    /// Enrollment with a GitHub-Actions-style RS256 OIDC token from an issuer
    /// generated for the run, a fresh jti each (needs --features test-support).
    EnrollOidc(LoadArgs),
    /// enroll-token against 1, then 3, in-process broker replicas sharing one
    /// PostgreSQL (a fresh database per run), clients round-robin.
    #[command(name = "ha-postgres")]
    HaPostgres(HaArgs),
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
    /// Requests (one-use tokens, CSRs, OIDC tokens) to prepare for the timed
    /// phase [default: warm-up rate × duration × 1.3; × 1.6 on PostgreSQL or
    /// with one client, × 2 for the attestation scenarios].
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
    /// Before starting, give every nonce in the store an expiry spread evenly
    /// over the next SECS seconds (after any prefill), so that the broker's
    /// maintenance purge deletes (nonces ÷ SECS) rows per second during the
    /// run, as it does once a store holds a full window in steady state.
    /// Without it, prefilled nonces expire an hour later and none is purged.
    #[arg(long, value_name = "SECS", help_heading = "In-process broker")]
    pub expire_nonces_over: Option<u32>,
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

/// Flags of `ha-postgres`.
#[derive(Debug, Clone, Args)]
pub struct HaArgs {
    /// The PostgreSQL server; each run creates an empty database on it and
    /// drops it afterwards (the user needs CREATEDB). Never printed.
    #[arg(
        long,
        value_name = "postgres://…",
        env = "SIGIL_TEST_POSTGRES_URL",
        hide_env_values = true
    )]
    pub store: Option<String>,
    /// Replica counts, run one after the other.
    #[arg(long, value_name = "N,N", value_delimiter = ',', default_value = "1,3")]
    pub replicas: Vec<usize>,
    /// The PostgreSQL server's CA (PEM): the replicas reach the database
    /// over TLS verified against it, as `sigil serve --store-ca-file` does
    /// (the run databases are still created over the plain admin session).
    #[arg(long, value_name = "FILE")]
    pub store_ca_file: Option<PathBuf>,
    #[command(flatten)]
    pub load: LoadArgs,
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

/// An attestation scenario, or exit 2 when this build has no generator.
fn attest_scenario(a: &LoadArgs, mode: load::Mode) -> anyhow::Result<i32> {
    if !attest::AVAILABLE {
        eprintln!(
            "sigil-bench: `{}` needs the generated test Nitro PKI / OIDC issuer, which this build \
             leaves out; build it with `{}` (the feature only adds those generators: the broker's \
             trust store is unchanged)",
            mode.scenario(),
            attest::HOW_TO_BUILD
        );
        return Ok(2);
    }
    load::run(a, mode)
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Cmd::EnrollToken(a) => load::run(&a, load::Mode::Reused),
        Cmd::FreshConnection(a) => load::run(&a, load::Mode::Fresh),
        Cmd::Floor(a) => {
            if !(a.secs > 0.0 && a.secs.is_finite()) {
                anyhow::bail!("--secs must be positive");
            }
            let f = floor::measure(a.secs, attest::AVAILABLE)?;
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
        Cmd::EnrollNitro(a) => attest_scenario(&a, load::Mode::Nitro),
        Cmd::EnrollOidc(a) => attest_scenario(&a, load::Mode::Oidc),
        Cmd::HaPostgres(a) => ha::run(&a),
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
    fn attestation_and_ha_scenarios_take_the_load_flags() {
        let cli = Cli::try_parse_from(["sigil-bench", "enroll-nitro", "-c", "8", "--jwt"]);
        match cli.map(|c| c.cmd) {
            Ok(Cmd::EnrollNitro(a)) => assert!(a.concurrency == 8 && a.jwt),
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["sigil-bench", "enroll-oidc", "-d", "3s"]);
        match cli.map(|c| c.cmd) {
            Ok(Cmd::EnrollOidc(a)) => assert_eq!(a.duration, Duration::from_secs(3)),
            other => panic!("{other:?}"),
        }
        // Unknown flags are refused now that the scenarios exist.
        assert!(Cli::try_parse_from(["sigil-bench", "enroll-nitro", "--bogus"]).is_err());

        let cli = Cli::try_parse_from(["sigil-bench", "ha-postgres", "-c", "64"]);
        match cli.map(|c| c.cmd) {
            Ok(Cmd::HaPostgres(h)) => {
                assert_eq!(h.replicas, vec![1, 3]);
                assert_eq!(h.load.concurrency, 64);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "sigil-bench",
            "ha-postgres",
            "--store",
            "postgres://u@127.0.0.1/db",
            "--replicas",
            "1,2,3",
        ]);
        match cli.map(|c| c.cmd) {
            Ok(Cmd::HaPostgres(h)) => {
                assert_eq!(h.replicas, vec![1, 2, 3]);
                assert_eq!(h.store.as_deref(), Some("postgres://u@127.0.0.1/db"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attestation_scenarios_without_the_feature_exit_2() {
        if attest::AVAILABLE {
            return;
        }
        let cli =
            Cli::try_parse_from(["sigil-bench", "enroll-oidc"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(run(cli).unwrap_or(0), 2);
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

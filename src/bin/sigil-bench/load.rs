//! The load generator: `enroll-token` (one HTTP/2 connection per client,
//! reused), `fresh-connection` (a new TLS connection per enrollment),
//! `renew` and `fetch-jwt` (one mTLS connection per client, each with the
//! SVID it enrolled for before the clock starts), `enroll-nitro` and
//! `enroll-oidc` (attestation evidence from [`crate::attest`]); `ha-postgres`
//! ([`crate::ha`]) drives the same code against several replicas.
//!
//! Everything a request needs is prepared before the clock starts: one-use
//! tokens created through the admin API (concurrently) and a fresh P-256 key
//! and CSR per request (on every core). Only the token proof (one HMAC over
//! the payload with the current timestamp) is computed per request, as a
//! real client must. The broker runs in this process on its own tokio
//! runtime (threads `sigil-broker`, plus `sigil-store-writer`) unless
//! `--broker` points at a running one; the clients run on another runtime
//! (threads `sigil-loadgen`), so CPU time is split per thread name.

use std::{
    collections::{BTreeMap, HashMap},
    io::IsTerminal,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use sigil::{
    api::pb::{
        self, admin_client::AdminClient, enroll_request::Credential,
        identity_client::IdentityClient,
    },
    attest::registry::AttestConfig,
    cli::{
        connect_admin, connect_tls, new_key_and_csr, tls_config, tls_config_with, token_proof,
        ClientIdentity, Trust,
    },
    clock::{Clock, SystemClock},
    config::Config,
    jwks::JwksSource,
    token::{parse_token, TokenSecret},
};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

use crate::{
    attest::{self, Format, Prepared, Source},
    floor::{self, Floor},
    pace::{Pacer, Schedule},
    prefill, procstat,
    stats::{self, round3, thousands, Rec, Summary},
    svg, LoadArgs, TempDir,
};

/// The scenario: what each request is and how the clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Token enrollment, one long-lived HTTP/2 connection per client.
    Reused,
    /// Token enrollment, a new TCP + TLS connection per request, closed afterwards.
    Fresh,
    /// `Renew` with a fresh CSR, over one mTLS connection per client (each
    /// client enrolls once, untimed, to get its SVID).
    Renew,
    /// `FetchJWT` over one mTLS connection per client.
    FetchJwt,
    /// Nitro attestation over one HTTP/2 connection per client: GetChallenge,
    /// then Enroll with a document signed over the challenge.
    Nitro,
    /// OIDC attestation over one HTTP/2 connection per client: Enroll with a
    /// prepared token (fresh `jti`).
    Oidc,
}

impl Mode {
    /// The scenario's command name.
    pub fn scenario(self) -> &'static str {
        match self {
            Mode::Reused => "enroll-token",
            Mode::Fresh => "fresh-connection",
            Mode::Renew => "renew",
            Mode::FetchJwt => "fetch-jwt",
            Mode::Nitro => "enroll-nitro",
            Mode::Oidc => "enroll-oidc",
        }
    }

    fn floor_kind(self) -> floor::Kind {
        match self {
            Mode::Reused | Mode::Fresh => floor::Kind::Enroll,
            Mode::Renew => floor::Kind::Renew,
            Mode::FetchJwt => floor::Kind::FetchJwt,
            Mode::Nitro => floor::Kind::Nitro,
            Mode::Oidc => floor::Kind::Oidc,
        }
    }

    /// The attestation format, for the attestation scenarios.
    pub fn attest_format(self) -> Option<Format> {
        match self {
            Mode::Nitro => Some(Format::Nitro),
            Mode::Oidc => Some(Format::Oidc),
            _ => None,
        }
    }

    fn needs_tokens(self) -> bool {
        matches!(self, Mode::Reused | Mode::Fresh)
    }

    fn needs_csrs(self) -> bool {
        self != Mode::FetchJwt
    }

    fn connections(self) -> &'static str {
        match self {
            Mode::Reused => "one reused HTTP/2 connection per client",
            Mode::Fresh => "new TLS connection per request (no TLS resumption)",
            Mode::Renew | Mode::FetchJwt => {
                "one reused mTLS HTTP/2 connection per client (its own SVID)"
            }
            Mode::Nitro => {
                "one reused HTTP/2 connection per client; GetChallenge, then Enroll with a \
                 Nitro document signed over the challenge by the load generator"
            }
            Mode::Oidc => {
                "one reused HTTP/2 connection per client; Enroll with an RS256 token minted \
                 before the clock (fresh jti each)"
            }
        }
    }
}

/// One prepared request.
struct Item {
    token: Option<(String, TokenSecret)>,
    csr: Vec<u8>,
    /// Attestation material (the attestation scenarios).
    evidence: Option<Prepared>,
}

/// What every client shares.
struct Ctx {
    mode: Mode,
    url: String,
    tls: rustls::ClientConfig,
    audiences: Vec<String>,
    jwt: bool,
    /// The evidence generator (the attestation scenarios).
    source: Option<Arc<Source>>,
    /// The SPIFFE ID every attestation enrollment must come back with.
    expect_id: Option<String>,
}

/// One phase (warm-up or timed): its pool and live counters.
struct Phase {
    pool: Vec<Item>,
    next: AtomicUsize,
    ok: AtomicU64,
    err: AtomicU64,
    exhausted: AtomicBool,
    done: AtomicBool,
}

impl Phase {
    fn new(pool: Vec<Item>) -> Self {
        Self {
            pool,
            next: AtomicUsize::new(0),
            ok: AtomicU64::new(0),
            err: AtomicU64::new(0),
            exhausted: AtomicBool::new(false),
            done: AtomicBool::new(false),
        }
    }
}

/// Where the broker is.
pub struct Target {
    /// `https://HOST:PORT` of each replica (one unless `ha-postgres`);
    /// client `k` connects to `urls[k % urls.len()]`.
    pub urls: Vec<String>,
    /// Admin socket used to create tokens and apply plans.
    pub admin_socket: PathBuf,
    /// CA pin, when known.
    pub ca_pin: Option<String>,
    /// Process whose CPU and RSS are the broker's (self when in-process).
    pub pid: Option<u32>,
    /// Whether the broker runs in this process (CPU split per thread name).
    pub in_process: bool,
    /// One line for the report.
    pub description: String,
    /// Seconds the prefill took.
    pub prefill_secs: Option<f64>,
    /// Issued certificates in the store when the run started.
    pub issued_at_start: Option<u64>,
    /// The store is the embedded SQLite (it has a writer thread to report).
    pub sqlite: bool,
    /// The database server's main process (PostgreSQL's postmaster), whose
    /// CPU and its children's are reported apart from "other processes".
    pub db_pid: Option<u32>,
}

impl Target {
    fn url(&self) -> &str {
        self.urls.first().map_or("", String::as_str)
    }
}

/// An in-process broker and what must outlive it.
pub struct InProcess {
    /// Its runtime.
    pub rt: Runtime,
    /// The started server.
    pub running: sigil::server::Running,
    prefill_secs: Option<f64>,
    issued_at_start: Option<u64>,
    _dir: Option<TempDir>,
}

impl InProcess {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.addr.port())
    }

    /// Stops it (drain, store close); reports a failure on stderr.
    pub fn shutdown(self) {
        if let Err(e) = self.rt.block_on(self.running.shutdown()) {
            eprintln!("sigil-bench: broker shutdown: {e:#}");
        }
    }
}

/// How to set up an in-process broker beyond [`LoadArgs`].
#[derive(Default)]
pub struct BrokerOpts {
    /// Per-peer limits off (mTLS scenarios: limited per SPIFFE ID).
    pub rates_disabled: bool,
    /// Attestation trust (the attestation scenarios).
    pub attest: Option<(AttestConfig, Vec<JwksSource>)>,
    /// `postgres://…` (replicas); `None`: SQLite in the data dir.
    pub store_url: Option<String>,
    /// Key-encryption key (base64), required with PostgreSQL.
    pub kek_env: Option<String>,
    /// The PostgreSQL server's CA: TLS to the store (`--store-ca-file`).
    pub store_ca_file: Option<std::path::PathBuf>,
    /// Runtime thread name [default: `sigil-broker`]; must start with `sigil-broker`.
    pub thread_name: Option<String>,
}

/// Runs a load scenario; returns the process exit code.
///
/// # Errors
/// The benchmark could not run (bad flags, broker unreachable, setup failed).
pub fn run(a: &LoadArgs, mode: Mode) -> anyhow::Result<i32> {
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of requests per second");
    }
    let external = a.broker.is_some();
    if external && (a.prefill > 0 || a.data_dir.is_some() || a.expire_nonces_over.is_some()) {
        bail!(
            "--prefill, --data-dir and --expire-nonces-over apply to the in-process broker only (drop --broker)"
        );
    }
    if !external && (a.admin_socket.is_some() || a.ca_pin.is_some() || a.broker_pid.is_some()) {
        bail!("--admin-socket, --ca-pin and --broker-pid need --broker URL");
    }
    let source = match mode.attest_format() {
        Some(_) if external => bail!(
            "--broker: {} runs an in-process broker only (it must trust a root generated for this run)",
            mode.scenario()
        ),
        Some(f) => {
            if f == Format::Oidc && a.requests.is_none() && a.duration > Duration::from_secs(240) {
                bail!(
                    "--duration: enroll-oidc tokens are minted before the clock and must be used \
                     within the broker's 300 s iat window; use at most 240s"
                );
            }
            Some(Arc::new(Source::new(f)?))
        }
        None => None,
    };
    let cores = procstat::cores();
    let floor = measure_floor(a, mode)?;
    let client_rt = client_runtime(a, cores)?;

    let mut in_process = None;
    // Kept until the broker stops: the attestation trust files it was configured from.
    let mut _attest_dir = None;
    let target =
        match &a.broker {
            Some(url) => Target {
                urls: vec![url.clone()],
                admin_socket: a.admin_socket.clone().context(
                    "--broker needs --admin-socket PATH (tokens are created through it)",
                )?,
                ca_pin: a.ca_pin.clone(),
                pid: a.broker_pid,
                in_process: false,
                prefill_secs: None,
                issued_at_start: None,
                sqlite: true,
                db_pid: None,
                description: format!(
                    "external broker {url}{}",
                    a.broker_pid
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default()
                ),
            },
            None => {
                let mut opts = BrokerOpts {
                    // mTLS callers are limited per SPIFFE ID (100/s each by
                    // default), which no address exemption covers: off for
                    // the scenarios that use them.
                    rates_disabled: matches!(mode, Mode::Renew | Mode::FetchJwt),
                    ..BrokerOpts::default()
                };
                if let Some(src) = &source {
                    let dir = TempDir::new("attest")?;
                    opts.attest = Some(src.trust_config(dir.path())?);
                    _attest_dir = Some(dir);
                }
                let b = start_in_process(a, &opts, cores)?;
                let t = Target {
                    urls: vec![b.url()],
                    admin_socket: b.running.admin_socket.clone(),
                    ca_pin: Some(b.running.ca_pin.clone()),
                    pid: Some(std::process::id()),
                    in_process: true,
                    prefill_secs: b.prefill_secs,
                    issued_at_start: b.issued_at_start,
                    sqlite: true,
                    db_pid: None,
                    description: format!(
                    "in-process broker (group commit {}, {} broker threads, {} client threads{})",
                    if a.group_commit { "on" } else { "off" },
                    a.broker_threads.unwrap_or(cores),
                    a.client_threads.unwrap_or(cores),
                    if a.prefill > 0 {
                        format!(", prefilled with {} issued certificates", thousands(a.prefill))
                    } else {
                        String::new()
                    }
                ),
                };
                in_process = Some(b);
                t
            }
        };

    let result = client_rt.block_on(drive(a, mode, &target, floor.as_ref(), source));
    if let Some(b) = in_process {
        b.shutdown();
    }
    let (report, errors) = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if errors > 0 {
        crate::EXIT_REQUEST_ERRORS
    } else {
        0
    })
}

/// The crypto floor for `mode`, measured now (`None` with `--floor-secs 0`).
///
/// # Errors
/// A floor operation failed (a bug).
pub fn measure_floor(a: &LoadArgs, mode: Mode) -> anyhow::Result<Option<Floor>> {
    if a.floor_secs <= 0.0 {
        return Ok(None);
    }
    if !a.quiet {
        eprintln!("measuring the crypto floor ({} s per op)…", a.floor_secs);
    }
    Ok(Some(floor::measure(
        a.floor_secs,
        mode.attest_format().is_some(),
    )?))
}

/// The load generator's runtime (threads `sigil-loadgen`).
///
/// # Errors
/// The runtime could not be built.
pub fn client_runtime(a: &LoadArgs, cores: usize) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.client_threads.unwrap_or(cores).max(1))
        .thread_name("sigil-loadgen")
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .context("client runtime")
}

/// Starts a broker in this process on its own runtime.
///
/// # Errors
/// The runtime, the prefill or the broker failed to start.
pub fn start_in_process(
    a: &LoadArgs,
    opts: &BrokerOpts,
    cores: usize,
) -> anyhow::Result<InProcess> {
    if a.broker_log != "off" {
        // `sigil serve` logs every issuance at info; pay the formatting cost
        // here too, into a sink (as `sigil serve >/dev/null` would).
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::sink)
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(&a.broker_log))
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.broker_threads.unwrap_or(cores).max(1))
        .thread_name(opts.thread_name.as_deref().unwrap_or("sigil-broker"))
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all()
        .build()
        .context("broker runtime")?;
    let (dir, data_dir) = match &a.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = TempDir::new("broker")?;
            let d = t.path().join("data");
            (Some(t), d)
        }
    };
    let prefill_secs = if a.prefill > 0 {
        crate::make_private_dir(&data_dir)?;
        Some(rt.block_on(prefill::run(&data_dir.join("sigil.db"), a.prefill, a.quiet))?)
    } else {
        None
    };
    if let Some(secs) = a.expire_nonces_over {
        prefill::spread_nonce_expiry(&data_dir.join("sigil.db"), secs, a.quiet)?;
    }
    let mut cfg = Config::with_data_dir(&data_dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.group_commit = a.group_commit;
    // Every client is on loopback: exempt it from the per-peer abuse limits
    // (the limiter is still consulted on every request, as in production).
    cfg.rates
        .exempt
        .push(sigil::ratelimit::Cidr::parse("127.0.0.0/8").map_err(anyhow::Error::msg)?);
    cfg.rates.disabled = opts.rates_disabled;
    if let Some((attest, jwks_sources)) = &opts.attest {
        cfg.attest = attest.clone();
        cfg.jwks_sources = jwks_sources.clone();
    }
    cfg.store_url = opts.store_url.clone();
    cfg.kek_env = opts.kek_env.clone();
    cfg.store_ca_file = opts.store_ca_file.clone();
    let running = rt
        .block_on(sigil::server::start(cfg, Arc::new(SystemClock)))
        .context("start the in-process broker")?;
    // Store size as the run sees it (a prefill, or a kept --data-dir).
    let issued_at_start = rt
        .block_on(running.broker.store().counts())
        .ok()
        .map(|c| c.issued);
    Ok(InProcess {
        rt,
        running,
        prefill_secs,
        issued_at_start,
        _dir: dir,
    })
}

/// CPU and RSS readings at one instant.
struct Snapshot {
    at: Instant,
    broker_cpu: Option<f64>,
    /// The store's writer thread alone (in-process only; part of `broker_cpu`).
    store_cpu: Option<f64>,
    loadgen_cpu: f64,
    process_cpu: f64,
    /// The database server's processes (PostgreSQL), when local and known.
    db_cpu: Option<f64>,
    machine: Option<procstat::MachineCpu>,
}

fn classify_thread(comm: &str) -> &'static str {
    // `comm` is cut to 15 bytes: `sigil-store-wri(ter)`, `sigil-store-ckp(t)`.
    if comm.starts_with("sigil-store-w") {
        "store"
    } else if comm.starts_with("sigil-broker") || comm.starts_with("sigil-store") {
        "broker"
    } else if comm.starts_with("sigil-loadgen") {
        "loadgen"
    } else {
        "other"
    }
}

fn snapshot(t: &Target) -> Snapshot {
    let me = std::process::id();
    let process_cpu = procstat::process_cpu_secs(me).unwrap_or(0.0);
    let (broker_cpu, store_cpu, loadgen_cpu) = if t.in_process {
        let by = procstat::threads_cpu_secs(me, classify_thread);
        let get = |c: &str| by.iter().find(|(k, _)| *k == c).map_or(0.0, |(_, s)| *s);
        (
            Some(get("broker") + get("store")),
            Some(get("store")),
            get("loadgen"),
        )
    } else {
        let store = t.pid.and_then(|pid| {
            let by = procstat::threads_cpu_secs(pid, classify_thread);
            by.iter().find(|(k, _)| *k == "store").map(|(_, s)| *s)
        });
        (
            t.pid.and_then(procstat::process_cpu_secs),
            store,
            process_cpu,
        )
    };
    Snapshot {
        at: Instant::now(),
        broker_cpu,
        store_cpu: store_cpu.filter(|_| t.sqlite),
        loadgen_cpu,
        process_cpu,
        db_cpu: t.db_pid.and_then(procstat::tree_cpu_secs),
        machine: procstat::machine_cpu_secs(),
    }
}

async fn connect_admins(
    path: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<AdminClient<Channel>>> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(AdminClient::new(connect_admin(path.to_path_buf()).await?));
    }
    Ok(v)
}

/// Creates `n` one-use tokens through the admin API and `n` fresh key+CSR
/// pairs, both spread over every core.
async fn prepare(
    n: usize,
    admins: &[AdminClient<Channel>],
    trust_domain: &str,
    mode: Mode,
    source: Option<&Arc<Source>>,
    quiet: bool,
) -> anyhow::Result<Vec<Item>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let cores = procstat::cores();
    let per = n.div_ceil(cores);
    let csrs_wanted = if mode.needs_csrs() { n } else { 0 };
    type Material = (Vec<u8>, Option<Prepared>);
    let csr_jobs: Vec<_> = (0..cores)
        .map(|k| {
            let m = per.min(csrs_wanted.saturating_sub(k * per));
            let source = source.cloned();
            tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Material>> {
                (0..m)
                    .map(|_| match &source {
                        Some(src) => {
                            let p = src.prepare()?;
                            Ok((p.csr().to_vec(), Some(p)))
                        }
                        None => Ok((new_key_and_csr()?.1, None)),
                    })
                    .collect()
            })
        })
        .collect();

    let next = Arc::new(AtomicUsize::new(0));
    let workers = if mode.needs_tokens() { 64.min(n) } else { 0 };
    let mut jobs = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut admin = admins[w % admins.len()].clone();
        let next = next.clone();
        let prefix = format!("spiffe://{trust_domain}/bench/w");
        jobs.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= n {
                    break;
                }
                let r = admin
                    .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                        spiffe_id: format!("{prefix}{i}"),
                        ttl_seconds: 3600,
                        max_uses: 1,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("create token: {}", describe_status(&s)))?
                    .into_inner();
                let (id, secret) = parse_token(&r.token)?;
                out.push((i, id, secret));
            }
            anyhow::Ok(out)
        }));
    }
    let mut tokens: Vec<Option<(String, TokenSecret)>> = (0..n).map(|_| None).collect();
    for j in jobs {
        for (i, id, secret) in j.await.context("token task")?? {
            tokens[i] = Some((id, secret));
        }
    }
    let mut csrs = Vec::with_capacity(csrs_wanted);
    for j in csr_jobs {
        csrs.extend(j.await.context("CSR task")??);
    }
    if mode.needs_tokens() && tokens.iter().any(Option::is_none) {
        bail!("token creation fell short");
    }
    if csrs.len() != csrs_wanted {
        bail!("generated {} of {csrs_wanted} CSRs", csrs.len());
    }
    let mut csrs = csrs.into_iter();
    let items: Vec<Item> = tokens
        .into_iter()
        .map(|token| {
            let (csr, evidence) = csrs.next().unwrap_or_default();
            Item {
                token,
                csr,
                evidence,
            }
        })
        .collect();
    if !quiet {
        eprintln!(
            "prepared {} requests ({}{}) in {:.2} s",
            thousands(n as u64),
            match mode {
                Mode::Oidc => "RS256 tokens with a fresh jti",
                Mode::Nitro => "documents are signed per request, over the challenge",
                _ if mode.needs_tokens() => "tokens",
                _ => "no tokens",
            },
            match mode {
                Mode::Nitro => "; key+CSR pairs",
                _ if mode.needs_csrs() => " and key+CSR pairs",
                _ => "",
            },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(items)
}

fn describe_status(s: &tonic::Status) -> String {
    format!("{}: {}", reason_of(s), s.message())
}

fn reason_of(s: &tonic::Status) -> String {
    sigil::api::status::error_info(s)
        .map(|(r, _)| r)
        .unwrap_or_else(|| format!("GRPC_{:?}", s.code()).to_uppercase())
}

/// A client's results.
#[derive(Default)]
struct ClientOut {
    recs: Vec<Rec>,
    errors: HashMap<String, u64>,
    /// Wall time spent producing attestation evidence in the request path, ns.
    evidence_ns: u64,
}

/// One client: takes the next prepared item until the pool, the deadline
/// or the schedule ends.
async fn client(
    ctx: Arc<Ctx>,
    phase: Arc<Phase>,
    channel: Option<Channel>,
    t0: Instant,
    deadline: Option<Instant>,
    pacer: Option<Arc<Pacer>>,
) -> ClientOut {
    let mut out = ClientOut::default();
    let mut reused = channel.map(IdentityClient::new);
    let mode = ctx.mode;
    loop {
        if let Some(p) = &pacer {
            p.ready().await;
        }
        let i = phase.next.fetch_add(1, Relaxed);
        if i >= phase.pool.len() {
            phase.exhausted.store(true, Relaxed);
            break;
        }
        let start = match &pacer {
            // Slot `i` is released at its instant or later: latency counts
            // from the instant.
            Some(p) => {
                if !p.schedule.has(i) {
                    break;
                }
                p.schedule.at(i)
            }
            None => {
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
                now
            }
        };
        let item = &phase.pool[i];
        let verdict = match (mode, &mut reused) {
            (Mode::FetchJwt, Some(c)) => c
                .fetch_jwt(pb::FetchJwtRequest {
                    audiences: vec![AUDIENCE.to_owned()],
                    ttl_seconds: 0,
                })
                .await
                .map_err(|s| reason_of(&s))
                .and_then(|r| {
                    if r.into_inner().jwt_svid.is_empty() {
                        Err("MISSING_JWT".to_owned())
                    } else {
                        Ok(())
                    }
                }),
            (Mode::Renew, Some(c)) => c
                .renew(pb::RenewRequest {
                    csr: item.csr.clone(),
                    jwt_audiences: ctx.audiences.clone(),
                })
                .await
                .map_err(|s| reason_of(&s))
                .and_then(|r| check_svid(&ctx, &r.into_inner())),
            (Mode::Nitro | Mode::Oidc, Some(c)) => {
                attest_enroll(&ctx, c, item, &mut out.evidence_ns).await
            }
            (_, reused) => {
                let Some((token_id, secret)) = &item.token else {
                    break;
                };
                let req = pb::EnrollRequest {
                    csr: item.csr.clone(),
                    credential: Some(Credential::Token(token_proof(
                        token_id,
                        secret,
                        &item.csr,
                        SystemClock.now_ms(),
                    ))),
                    jwt_audiences: ctx.audiences.clone(),
                };
                let result = match reused {
                    Some(c) => c.enroll(req).await.map_err(|s| reason_of(&s)),
                    None => match connect_tls(&ctx.url, ctx.tls.clone()).await {
                        Ok(ch) => IdentityClient::new(ch)
                            .enroll(req)
                            .await
                            .map_err(|s| reason_of(&s)),
                        Err(_) => Err("CONNECT_FAILED".to_owned()),
                    },
                };
                result.and_then(|r| {
                    let r = r.into_inner();
                    if r.retried {
                        Err("UNEXPECTED_RETRIED".to_owned())
                    } else {
                        check_svid(&ctx, &r)
                    }
                })
            }
        };
        let lat = start.elapsed();
        let ok = verdict.is_ok();
        if let Err(reason) = verdict {
            *out.errors.entry(reason).or_default() += 1;
            phase.err.fetch_add(1, Relaxed);
        } else {
            phase.ok.fetch_add(1, Relaxed);
        }
        out.recs.push(Rec {
            start_us: start.saturating_duration_since(t0).as_micros() as u64,
            lat_us: u32::try_from(lat.as_micros()).unwrap_or(u32::MAX),
            ok,
        });
    }
    out
}

/// One attestation enrollment: GetChallenge when the format needs one, the
/// document (signed now for Nitro; prepared for OIDC), Enroll.
async fn attest_enroll(
    ctx: &Ctx,
    c: &mut IdentityClient<Channel>,
    item: &Item,
    evidence_ns: &mut u64,
) -> Result<(), String> {
    let (Some(src), Some(prepared)) = (&ctx.source, &item.evidence) else {
        return Err("NO_EVIDENCE".to_owned());
    };
    let nonce = if src.needs_challenge() {
        let r = c
            .get_challenge(pb::GetChallengeRequest {})
            .await
            .map_err(|s| format!("GetChallenge {}", reason_of(&s)))?;
        Some(r.into_inner().nonce)
    } else {
        None
    };
    let t = Instant::now();
    let document = src
        .document(prepared, nonce.as_deref(), SystemClock.now_ms())
        .map_err(|_| "DOCUMENT_FAILED".to_owned())?;
    *evidence_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let r = c
        .enroll(pb::EnrollRequest {
            csr: item.csr.clone(),
            credential: Some(Credential::Attestation(pb::Attestation {
                format: src.format().wire_name().to_owned(),
                document,
            })),
            jwt_audiences: ctx.audiences.clone(),
        })
        .await
        .map_err(|s| reason_of(&s))?
        .into_inner();
    if ctx.expect_id.as_ref().is_some_and(|id| *id != r.spiffe_id) {
        return Err("UNEXPECTED_SPIFFE_ID".to_owned());
    }
    check_svid(ctx, &r)
}

/// The audience of every JWT-SVID asked for.
const AUDIENCE: &str = "https://bench.example";

/// A successful enrollment or renewal must carry a certificate (and a JWT when asked).
fn check_svid(ctx: &Ctx, r: &pb::EnrollResponse) -> Result<(), String> {
    if r.x509_svid_chain.is_empty() {
        Err("EMPTY_CHAIN".to_owned())
    } else if ctx.jwt && r.jwt_svid.is_empty() {
        Err("MISSING_JWT".to_owned())
    } else {
        Ok(())
    }
}

/// What a phase produced.
struct PhaseOut {
    recs: Vec<Rec>,
    errors: BTreeMap<String, u64>,
    elapsed: Duration,
    exhausted: bool,
    rss_max_kib: Option<u64>,
    evidence_ns: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    ctx: &Arc<Ctx>,
    pool: Vec<Item>,
    channels: &[Channel],
    concurrency: usize,
    duration: Option<Duration>,
    rate: Option<f64>,
    rss_pid: Option<u32>,
    progress: Option<&str>,
) -> anyhow::Result<PhaseOut> {
    let phase = Arc::new(Phase::new(pool));
    let t0 = Instant::now();
    let deadline = duration.map(|d| t0 + d);
    let sampler = tokio::spawn(sample(
        phase.clone(),
        t0,
        rss_pid,
        progress.map(str::to_owned),
        duration,
    ));
    let pacer = match rate {
        Some(rate) => {
            let schedule = Schedule {
                t0,
                rate,
                slots: phase.pool.len(),
                deadline,
            };
            Some(Arc::new(
                Pacer::start(schedule, concurrency).context("start the pacer thread")?,
            ))
        }
        None => None,
    };
    let mut tasks = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let ch = channels.get(k).cloned();
        tasks.push(tokio::spawn(client(
            ctx.clone(),
            phase.clone(),
            ch,
            t0,
            deadline,
            pacer.clone(),
        )));
    }
    let mut recs = Vec::new();
    let mut errors = BTreeMap::new();
    let mut evidence_ns = 0;
    for t in tasks {
        let o = t.await.context("client task")?;
        evidence_ns += o.evidence_ns;
        recs.extend(o.recs);
        for (k, v) in o.errors {
            *errors.entry(k).or_default() += v;
        }
    }
    let elapsed = t0.elapsed();
    phase.done.store(true, Relaxed);
    let rss_max_kib = sampler.await.unwrap_or(None);
    recs.sort_unstable_by_key(|r| r.start_us);
    Ok(PhaseOut {
        recs,
        errors,
        elapsed,
        exhausted: phase.exhausted.load(Relaxed),
        rss_max_kib,
        evidence_ns,
    })
}

/// Samples the broker's RSS every 100 ms and prints a progress line.
async fn sample(
    phase: Arc<Phase>,
    t0: Instant,
    pid: Option<u32>,
    label: Option<String>,
    duration: Option<Duration>,
) -> Option<u64> {
    let tty = std::io::stderr().is_terminal();
    let mut max = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut n = 0u64;
    let mut last_ok = 0u64;
    loop {
        tick.tick().await;
        if let Some((rss, _)) = pid.and_then(procstat::rss_kib) {
            max = Some(max.map_or(rss, |m: u64| m.max(rss)));
        }
        let done = phase.done.load(Relaxed);
        n += 1;
        if let Some(label) = &label {
            if done || n % if tty { 10 } else { 20 } == 0 {
                let ok = phase.ok.load(Relaxed);
                let secs = if tty { 1.0 } else { 2.0 };
                let line = format!(
                    "[{label} {:>5.1}s{}] ok {:>9}  errors {:>5}  {:>8.0}/s  broker RSS {}",
                    t0.elapsed().as_secs_f64(),
                    duration.map_or(String::new(), |d| format!("/{:.0}s", d.as_secs_f64())),
                    thousands(ok),
                    phase.err.load(Relaxed),
                    (ok - last_ok) as f64 / secs,
                    max.map_or("n/a".into(), |m| format!("{:.1} MiB", m as f64 / 1024.0)),
                );
                last_ok = ok;
                if tty {
                    eprint!("\r{line}   ");
                    if done {
                        eprintln!();
                    }
                } else if !done {
                    eprintln!("{line}");
                }
            }
        }
        if done {
            return max;
        }
    }
}

/// The scenario end to end, on the client runtime. Returns the JSON report
/// and the number of failed requests.
pub async fn drive(
    a: &LoadArgs,
    mode: Mode,
    target: &Target,
    floor: Option<&Floor>,
    source: Option<Arc<Source>>,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let admins = connect_admins(&target.admin_socket, 4).await?;
    let pin = match &target.ca_pin {
        Some(p) => p.clone(),
        None => {
            // Every token creation answers with the CA pin.
            let mut admin = admins[0].clone();
            admin
                .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                    spiffe_id: format!("spiffe://{}/bench/pin", a.trust_domain),
                    ttl_seconds: 60,
                    max_uses: 1,
                })
                .await
                .map_err(|s| anyhow::anyhow!("create token: {}", describe_status(&s)))?
                .into_inner()
                .ca_pin
        }
    };
    let mut tls = tls_config(&Trust::from_pin(&pin)?)?;
    if mode == Mode::Fresh {
        // A first-boot workload has no TLS session to resume.
        tls.resumption = rustls::client::Resumption::disabled();
    }
    // Fail fast with a clear message when a broker or the pin is wrong.
    let mut bundle = None;
    for url in &target.urls {
        bundle = Some(
            IdentityClient::new(
                connect_tls(url, tls.clone())
                    .await
                    .with_context(|| format!("cannot reach {url} with pin {pin}"))?,
            )
            .get_bundle(pb::GetBundleRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("GetBundle on {url}: {}", describe_status(&s)))?
            .into_inner(),
        );
    }
    let trust_domain = match bundle {
        Some(b) if !b.trust_domain.is_empty() => b.trust_domain,
        _ => a.trust_domain.clone(),
    };
    if let Some(src) = &source {
        // The plan whose entries the generated evidence matches.
        admins[0]
            .clone()
            .apply_plan(pb::ApplyPlanRequest {
                plan: attest::plan(&trust_domain).into_bytes(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("apply the bench plan: {}", describe_status(&s)))?;
        if !a.quiet {
            eprintln!(
                "applied a plan granting {} to the generated {} evidence",
                attest::granted_id(&trust_domain, src.format()),
                src.format().wire_name()
            );
        }
    }
    let ctx = Arc::new(Ctx {
        mode,
        url: target.url().to_owned(),
        tls: tls.clone(),
        audiences: if a.jwt {
            vec![AUDIENCE.to_owned()]
        } else {
            Vec::new()
        },
        jwt: a.jwt,
        expect_id: source
            .as_ref()
            .map(|s| attest::granted_id(&trust_domain, s.format())),
        source: source.clone(),
    });

    let channels = match mode {
        Mode::Reused | Mode::Nitro | Mode::Oidc => {
            connect_channels(&target.urls, &[tls.clone()], a.concurrency).await?
        }
        Mode::Fresh => Vec::new(),
        Mode::Renew | Mode::FetchJwt => {
            let trust = Trust::from_pin(&pin)?;
            let configs = client_identities(
                a.concurrency,
                &admins,
                &trust_domain,
                target.url(),
                &tls,
                &trust,
            )
            .await?;
            connect_channels(&target.urls, &configs, a.concurrency).await?
        }
    };
    let label = format!("{} c={}", mode.scenario(), a.concurrency);
    let progress = (!a.quiet).then_some(label.as_str());

    // Warm-up: also measures the rate that sizes the timed pool. A warm-up
    // that completed fewer than 4 requests per client (a stall, e.g. a
    // large store's first reads) is repeated, up to 5 rounds.
    let mut est_rate = None;
    if !a.warmup.is_zero() {
        let w = ((4000.0 * a.warmup.as_secs_f64()) as usize).max(a.concurrency * 8);
        let w = match a.rate {
            Some(r) => w.min((r * a.warmup.as_secs_f64()) as usize + a.concurrency),
            None => w,
        };
        for round in 1..=5 {
            let pool = prepare(w, &admins, &trust_domain, mode, source.as_ref(), a.quiet).await?;
            let out = run_phase(
                &ctx,
                pool,
                &channels,
                a.concurrency,
                Some(a.warmup),
                a.rate,
                None,
                None,
            )
            .await?;
            let ok = out.recs.iter().filter(|r| r.ok).count();
            est_rate = Some(ok as f64 / out.elapsed.as_secs_f64().max(1e-3));
            if !a.quiet {
                eprintln!(
                    "warm-up {round}: {} ok in {:.2} s ({:.0}/s){}",
                    thousands(ok as u64),
                    out.elapsed.as_secs_f64(),
                    est_rate.unwrap_or(0.0),
                    if out.errors.is_empty() {
                        String::new()
                    } else {
                        format!(", errors {:?}", out.errors)
                    }
                );
            }
            if ok >= 4 * a.concurrency || a.rate.is_some() {
                break;
            }
        }
    }
    let duration = if a.requests.is_some() {
        None
    } else {
        Some(a.duration)
    };
    let n = match (a.requests, a.tokens) {
        (Some(n), _) => n,
        (None, Some(t)) => t,
        (None, None) => {
            let rate = a.rate.or(est_rate).unwrap_or(5000.0);
            // Headroom over the warm-up rate; more where the warm-up tends
            // to undershoot (replicas on PostgreSQL; one client, whose 1 s
            // warm-up ran out at 9.4 s of a 10 s fresh-connection phase) or
            // the pool is cheap to prepare (no store writes: the
            // attestation scenarios).
            let headroom = if mode.attest_format().is_some() {
                2.0
            } else if !target.sqlite || a.concurrency == 1 {
                1.6
            } else {
                1.3
            };
            (rate * a.duration.as_secs_f64() * headroom) as usize + a.concurrency * 2 + 100
        }
    };
    let pool = prepare(n, &admins, &trust_domain, mode, source.as_ref(), a.quiet).await?;

    // Timed phase.
    let before = snapshot(target);
    let rss_before = target.pid.and_then(procstat::rss_kib);
    let hwm_reset = target.pid.is_some_and(procstat::reset_peak_rss);
    let out = run_phase(
        &ctx,
        pool,
        &channels,
        a.concurrency,
        duration,
        a.rate,
        target.pid,
        progress,
    )
    .await?;
    let after = snapshot(target);
    let rss_after = target.pid.and_then(procstat::rss_kib);
    drop(channels);

    let report = Report {
        a,
        mode,
        target,
        floor,
        out: &out,
        before: &before,
        after: &after,
        rss_before,
        rss_after,
        hwm_reset,
    };
    let json = report.json();
    if !a.json {
        print!("{}", report.human());
    }
    if let Some(path) = &a.plot {
        let title = format!(
            "sigil {} c={} jwt={} — {}",
            mode.scenario(),
            a.concurrency,
            if a.jwt { "on" } else { "off" },
            procstat::utc_now()
        );
        std::fs::write(path, svg::plot(&title, &out.recs))
            .with_context(|| format!("write {}", path.display()))?;
        if !a.quiet {
            eprintln!("plot written to {}", path.display());
        }
    }
    let failed = out.errors.values().sum();
    Ok((json, failed))
}

/// Enrolls `n` clients (untimed) and returns, for each, a TLS config that
/// presents its fresh X509-SVID: the identities renew and fetch-jwt use.
async fn client_identities(
    n: usize,
    admins: &[AdminClient<Channel>],
    trust_domain: &str,
    url: &str,
    tls: &rustls::ClientConfig,
    trust: &Trust,
) -> anyhow::Result<Vec<rustls::ClientConfig>> {
    let mut identity = IdentityClient::new(connect_tls(url, tls.clone()).await?);
    let mut admin = admins[0].clone();
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let r = admin
            .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: format!("spiffe://{trust_domain}/bench/agent{k}"),
                ttl_seconds: 3600,
                max_uses: 1,
            })
            .await
            .map_err(|s| anyhow::anyhow!("create token: {}", describe_status(&s)))?
            .into_inner();
        let (token_id, secret) = parse_token(&r.token)?;
        let (key, csr) = new_key_and_csr()?;
        let svid = identity
            .enroll(pb::EnrollRequest {
                credential: Some(Credential::Token(token_proof(
                    &token_id,
                    &secret,
                    &csr,
                    SystemClock.now_ms(),
                ))),
                csr,
                jwt_audiences: Vec::new(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("enroll a client identity: {}", describe_status(&s)))?
            .into_inner();
        out.push(tls_config_with(
            trust,
            Some(ClientIdentity::from_der(svid.x509_svid_chain, key.to_vec())),
        )?);
    }
    Ok(out)
}

/// `n` independent HTTP/2 connections (tonic clones share one, so each
/// client gets its own), opened 32 at a time; connection `k` goes to
/// `urls[k % urls.len()]` with `configs[k % configs.len()]`.
async fn connect_channels(
    urls: &[String],
    configs: &[rustls::ClientConfig],
    n: usize,
) -> anyhow::Result<Vec<Channel>> {
    if configs.is_empty() || urls.is_empty() {
        bail!("no TLS configuration or no broker URL");
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(32);
        let first = out.len();
        let jobs: Vec<_> = (0..batch)
            .map(|j| {
                let url = urls[(first + j) % urls.len()].clone();
                let tls = configs[(first + j) % configs.len()].clone();
                tokio::spawn(async move { connect_tls(&url, tls).await })
            })
            .collect();
        for j in jobs {
            out.push(j.await.context("connect task")??);
        }
    }
    Ok(out)
}

/// Everything the report needs.
struct Report<'a> {
    a: &'a LoadArgs,
    mode: Mode,
    target: &'a Target,
    floor: Option<&'a Floor>,
    out: &'a PhaseOut,
    before: &'a Snapshot,
    after: &'a Snapshot,
    rss_before: Option<(u64, u64)>,
    rss_after: Option<(u64, u64)>,
    hwm_reset: bool,
}

impl Report<'_> {
    fn wall(&self) -> f64 {
        self.after
            .at
            .duration_since(self.before.at)
            .as_secs_f64()
            .max(1e-6)
    }

    fn ok(&self) -> usize {
        self.out.recs.iter().filter(|r| r.ok).count()
    }

    fn rps(&self) -> f64 {
        self.ok() as f64 / self.out.elapsed.as_secs_f64().max(1e-6)
    }

    /// The store writer thread's share, in cores.
    fn store_cpu(&self) -> Option<f64> {
        match (self.before.store_cpu, self.after.store_cpu) {
            (Some(b), Some(e)) => Some((e - b).max(0.0) / self.wall()),
            _ => None,
        }
    }

    /// The database server's processes (PostgreSQL), in cores.
    fn db_cpu(&self) -> Option<f64> {
        match (self.before.db_cpu, self.after.db_cpu) {
            (Some(b), Some(e)) => Some((e - b).max(0.0) / self.wall()),
            _ => None,
        }
    }

    /// Microseconds of CPU per successful request for a share of `cores`.
    fn per_request_us(&self, cores: f64) -> Option<f64> {
        let ok = self.ok();
        (ok > 0).then(|| cores * self.wall() * 1e6 / ok as f64)
    }

    /// Mean time the load generator spent producing evidence per request, µs.
    fn evidence_us(&self) -> Option<f64> {
        let ok = self.ok();
        (self.mode.attest_format().is_some() && ok > 0)
            .then(|| self.out.evidence_ns as f64 / 1e3 / ok as f64)
    }

    /// (broker, load generator, rest of this process, other processes) in
    /// cores; "other" excludes the database server's processes.
    fn cpu(&self) -> (Option<f64>, f64, f64, Option<f64>) {
        let w = self.wall();
        let broker = match (self.before.broker_cpu, self.after.broker_cpu) {
            (Some(b), Some(e)) => Some((e - b).max(0.0) / w),
            _ => None,
        };
        let loadgen = (self.after.loadgen_cpu - self.before.loadgen_cpu).max(0.0) / w;
        let process = (self.after.process_cpu - self.before.process_cpu).max(0.0) / w;
        let rest = if self.target.in_process {
            (process - broker.unwrap_or(0.0) - loadgen).max(0.0)
        } else {
            0.0
        };
        let ours = if self.target.in_process {
            process
        } else {
            process + broker.unwrap_or(0.0)
        };
        let db = self.db_cpu().unwrap_or(0.0);
        let others = match (self.before.machine, self.after.machine) {
            (Some(b), Some(e)) => Some(((e.busy - b.busy) / w - ours - db).max(0.0)),
            _ => None,
        };
        (broker, loadgen, rest, others)
    }

    /// Cores' worth of steal during the run (part of "other processes").
    fn steal(&self) -> Option<f64> {
        match (self.before.machine, self.after.machine) {
            (Some(b), Some(e)) => Some(((e.steal - b.steal) / self.wall()).max(0.0)),
            _ => None,
        }
    }

    fn floor_for(&self) -> Option<f64> {
        self.floor
            .and_then(|f| f.all_cores_for(self.mode.floor_kind(), self.a.jwt))
    }

    fn json(&self) -> serde_json::Value {
        let sorted = stats::sorted_ok_latencies(&self.out.recs);
        let s = Summary::of(&sorted);
        let (broker, loadgen, rest, others) = self.cpu();
        let mib = |k: u64| round3(k as f64 / 1024.0);
        serde_json::json!({
            "scenario": self.mode.scenario(),
            "label": self.a.label,
            "date": procstat::utc_now(),
            "concurrency": self.a.concurrency,
            "jwt": self.a.jwt,
            "connections": self.mode.connections(),
            "rate_limit": self.a.rate,
            "broker": {
                "where": if self.target.in_process { "in-process" } else { "external" },
                "description": self.target.description,
                "group_commit": self.target.in_process.then_some(self.a.group_commit),
                "prefill": self.a.prefill,
                "prefill_seconds": self.target.prefill_secs.map(round3),
                "expire_nonces_over_seconds": self.a.expire_nonces_over,
                "issued_at_start": self.target.issued_at_start,
            },
            "cores": procstat::cores(),
            "duration_s": round3(self.out.elapsed.as_secs_f64()),
            "stopped_early_pool_exhausted": self.out.exhausted && self.a.requests.is_none(),
            "ok": self.ok(),
            "errors": self.out.errors,
            "rps": round3(self.rps()),
            "latency_ms": s.to_json(),
            "cpu_cores": {
                "broker": broker.map(round3),
                "broker_store_writer": self.store_cpu().map(round3),
                "database": self.db_cpu().map(round3),
                "loadgen": round3(loadgen),
                "rest_of_bench_process": round3(rest),
                "other_processes": others.map(round3),
                "steal": self.steal().map(round3),
            },
            "rss_mib": {
                "broker_before": self.rss_before.map(|r| mib(r.0)),
                "broker_after": self.rss_after.map(|r| mib(r.0)),
                "broker_max_sampled": self.out.rss_max_kib.map(mib),
                "broker_peak_vmhwm": self.rss_after.map(|r| mib(r.1)),
                "peak_reset_at_start": self.hwm_reset,
                "includes_load_generator": self.target.in_process,
            },
            "floor": self.floor.map(Floor::to_json),
            "floor_rps": self.floor_for().map(round3),
            "throughput_over_floor": self.floor_for().map(|f| round3(self.rps() / f)),
            "cpu_us_per_request": {
                "broker": broker.and_then(|b| self.per_request_us(b)).map(round3),
                "broker_store_writer": self.store_cpu().and_then(|b| self.per_request_us(b)).map(round3),
                "database": self.db_cpu().and_then(|b| self.per_request_us(b)).map(round3),
                "loadgen": self.per_request_us(loadgen).map(round3),
            },
            "attestation": self.mode.attest_format().map(|f| serde_json::json!({
                "format": f.wire_name(),
                "rpcs_per_enrollment": if self.mode == Mode::Nitro { 2 } else { 1 },
                "loadgen_evidence_us_per_request": self.evidence_us().map(round3),
                "latency_covers": if self.mode == Mode::Nitro {
                    "GetChallenge + document signing + Enroll"
                } else {
                    "Enroll (token prepared before the clock)"
                },
            })),
        })
    }

    fn human(&self) -> String {
        let sorted = stats::sorted_ok_latencies(&self.out.recs);
        let s = Summary::of(&sorted);
        let (broker, loadgen, rest, others) = self.cpu();
        let mut o = format!(
            "sigil-bench {}  c={}  jwt={}  {}{}\n  {}\n",
            self.mode.scenario(),
            self.a.concurrency,
            if self.a.jwt { "on" } else { "off" },
            self.mode.connections(),
            self.a
                .rate
                .map(|r| format!("  open loop at {r:.0}/s (latency from the scheduled send time)"))
                .unwrap_or_default(),
            self.target.description,
        );
        o += &format!(
            "  duration     {:.2} s   ok {}   errors {}{}\n",
            self.out.elapsed.as_secs_f64(),
            thousands(self.ok() as u64),
            self.out.errors.values().sum::<u64>(),
            if self.out.errors.is_empty() {
                String::new()
            } else {
                format!("  {:?}", self.out.errors)
            }
        );
        if self.out.exhausted && self.a.requests.is_none() {
            o += "  NOTE: the prepared requests (tokens / CSRs) ran out before the deadline; pass a larger --tokens\n";
        }
        o += &format!("  throughput   {:.1} requests/s\n", self.rps());
        o += &format!(
            "  latency ms   p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  mean {:.2}\n",
            s.p50, s.p90, s.p99, s.p999, s.max, s.mean
        );
        o += &format!(
            "  CPU (cores)  broker {}{}{}  load generator {:.2}{}  other processes {}  (of {} cores)\n",
            broker.map_or("n/a".into(), |b| format!("{b:.2}")),
            self.store_cpu()
                .map_or(String::new(), |s| format!(" (store writer thread {s:.2})")),
            self.db_cpu()
                .map_or(String::new(), |d| format!("  PostgreSQL processes {d:.2}")),
            loadgen,
            if rest > 0.005 {
                format!("  rest of sigil-bench {rest:.2}")
            } else {
                String::new()
            },
            others.map_or("n/a".into(), |b| format!("{b:.2}")),
            procstat::cores()
        );
        let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
        if let Some((rss, hwm)) = self.rss_after {
            o +=
                &format!(
                "  RSS MiB      broker before {}  after {}  max sampled {}  peak (VmHWM{}) {}{}\n",
                self.rss_before.map_or("n/a".into(), |r| mib(r.0)),
                mib(rss),
                self.out.rss_max_kib.map_or("n/a".into(), mib),
                if self.hwm_reset { ", reset at start" } else { ", since process start" },
                mib(hwm),
                if self.target.in_process {
                    "  [in-process: includes the load generator]"
                } else {
                    ""
                }
            );
        }
        if let Some(b) = broker.filter(|_| self.ok() > 0) {
            let per = |cores: f64| cores * self.wall() * 1e6 / self.ok() as f64;
            o += &format!(
                "  CPU per request  broker {:.0} µs{}{}  load generator {:.0} µs{}\n",
                per(b),
                self.store_cpu().map_or(String::new(), |s| format!(
                    " (of which store writer {:.0} µs)",
                    per(s)
                )),
                self.db_cpu()
                    .map_or(String::new(), |d| format!("  PostgreSQL {:.0} µs", per(d))),
                per(loadgen),
                self.evidence_us()
                    .filter(|_| self.mode == Mode::Nitro)
                    .map_or(String::new(), |e| format!(
                        " (of which ~{e:.0} µs signing the Nitro document)"
                    )),
            );
        }
        if let (Some(f), Some(fl)) = (self.floor, self.floor_for()) {
            o += &format!(
                "  floor        {:.0}/s = {:.0}/s on 1 core × {} cores; throughput ÷ floor = {:.1} %\n",
                fl,
                fl / f.cores as f64,
                f.cores,
                100.0 * self.rps() / fl
            );
        }
        o
    }
}

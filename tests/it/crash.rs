//! Crash safety under load (DESIGN.md §2.1 "nothing is issued before the
//! commit is durable"): the real `sigil serve` binary is SIGKILLed at a
//! random moment while 16 clients enroll concurrently — first tries,
//! same-key retries, other-key attempts and exact replays — then restarted
//! on the same data dir, where every client retries. Over several rounds
//! with different kill points the test proves:
//!
//! * no token issued twice: per token at most `max_uses` distinct serials
//!   ever reached a client, and per (token, key) exactly one;
//! * a client that got a certificate before the crash gets the same one
//!   back after it (`retried`), so the response was durable before it left;
//! * no nonce accepted twice: an exact request succeeds at most once, before
//!   or after the crash;
//! * every certificate a client holds is recorded in the store, under its
//!   token and key, and the token's use count equals its recorded issuances;
//! * the audit chain verifies after every crash and at the end, with one
//!   `issued` row per recorded certificate;
//! * no token secret is in any file of the data dir (DB, WAL) or the log.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use rand::Rng;
use rcgen::{KeyPair, PublicKeyData};
use sha2::{Digest, Sha256};
use sigil::{
    api::pb::{self, admin_client::AdminClient, identity_client::IdentityClient},
    token::{self, TokenSecret},
};
use tonic::transport::Channel;

use crate::harness::csr_for;

const BIN: &str = env!("CARGO_BIN_EXE_sigil");
/// Kill/restart rounds, each with its own kill point.
const ROUNDS: usize = 5;
/// Concurrent clients.
const TASKS: usize = 16;
/// Fresh tokens per round.
const TOKENS_PER_ROUND: usize = 40;
/// Kill this long after the load starts (ms, inclusive).
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 50..=400;
/// One RPC may take at most this long before it counts as lost.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A `sigil serve` process on a data dir.
struct Serve {
    child: Child,
    url: String,
    admin_socket: PathBuf,
}

impl Serve {
    /// Starts the binary and waits until both listeners answer.
    async fn start(data: &Path, log: &Path) -> Self {
        // listen.addr is rewritten on every start; remove the old one so we
        // wait for this process's address. admin.sock is left as the crash
        // left it: the server must replace a stale socket by itself.
        let _ = std::fs::remove_file(data.join("listen.addr"));
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ]);
        for (k, _) in std::env::vars() {
            if k.starts_with("SIGIL_") {
                cmd.env_remove(k);
            }
        }
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = cmd
            .env("SIGIL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let t = Instant::now();
        let addr = loop {
            if let Ok(s) = std::fs::read_to_string(data.join("listen.addr")) {
                if s.ends_with('\n') {
                    break s.trim().to_owned();
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("serve exited with {status}: {}", tail(log));
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "serve did not start: {}",
                tail(log)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let admin_socket = data.join("admin.sock");
        let serve = Self {
            child,
            url: format!("https://{addr}"),
            admin_socket,
        };
        loop {
            if let Ok(mut a) = serve.try_admin().await {
                if a.list_enrollment_tokens(pb::ListEnrollmentTokensRequest {})
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "admin socket never answered: {}",
                tail(log)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        serve
    }

    async fn try_admin(&self) -> anyhow::Result<AdminClient<Channel>> {
        Ok(AdminClient::new(
            sigil::cli::connect_admin(self.admin_socket.clone()).await?,
        ))
    }

    async fn identity(&self, trust: &sigil::cli::Trust) -> IdentityClient<Channel> {
        let ch = sigil::cli::connect_tls(&self.url, sigil::cli::tls_config(trust).unwrap())
            .await
            .unwrap();
        IdentityClient::new(ch)
    }

    /// SIGKILL: no drain, no store flush, no socket cleanup.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}");
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One enrollment token and the keys its workload tries with.
struct Job {
    /// Index into `World::jobs`.
    idx: usize,
    token_id: String,
    secret: TokenSecret,
    max_uses: u32,
    /// Key 0 is the workload's own; key 1 is "another machine".
    keys: [KeyPair; 2],
    /// sha256 hex of each key's SubjectPublicKeyInfo (the store's `spki_sha256`).
    key_hashes: [String; 2],
}

/// What happened to one request.
#[derive(Debug, Clone)]
enum Outcome {
    Ok {
        serial: String,
        retried: bool,
        der: Vec<u8>,
    },
    Refused(String),
    /// Transport failure or timeout: the broker may or may not have acted.
    Lost,
}

/// One request sent, and its fate.
#[derive(Debug, Clone)]
struct Attempt {
    job: usize,
    key: usize,
    /// Round and phase, for messages.
    round: usize,
    after_crash: bool,
    /// The exact request (replays resend it byte for byte).
    req: pb::EnrollRequest,
    outcome: Outcome,
}

/// Everything the clients saw, across rounds.
#[derive(Default)]
struct World {
    jobs: Vec<Arc<Job>>,
    attempts: Mutex<Vec<Attempt>>,
}

fn spki_hash(key: &KeyPair) -> String {
    hex::encode(Sha256::digest(key.subject_public_key_info()))
}

fn fresh_request(job: &Job, key: usize) -> pb::EnrollRequest {
    let csr = csr_for(&job.keys[key]);
    let now = sigil::clock::Clock::now_ms(&sigil::clock::SystemClock);
    pb::EnrollRequest {
        credential: Some(pb::enroll_request::Credential::Token(
            sigil::cli::token_proof(&job.token_id, &job.secret, &csr, now),
        )),
        csr,
        jwt_audiences: vec![],
    }
}

/// Sends `req` and classifies the result. A `RATE_LIMITED` refusal changes
/// nothing on the broker, so the same request is sent again after the hint.
async fn send(c: &mut IdentityClient<Channel>, req: pb::EnrollRequest) -> Outcome {
    for _ in 0..100 {
        let s = match tokio::time::timeout(RPC_TIMEOUT, c.enroll(req.clone())).await {
            Err(_) => return Outcome::Lost,
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let der = r.x509_svid_chain.first().cloned().expect("a leaf");
                let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("leaf parses");
                return Outcome::Ok {
                    serial: hex::encode(cert.raw_serial()),
                    retried: r.retried,
                    der,
                };
            }
            Ok(Err(s)) => s,
        };
        match sigil::api::status::error_info(&s) {
            None => return Outcome::Lost,
            Some((reason, md)) if reason == "RATE_LIMITED" => {
                let wait = md
                    .get("retry_after_ms")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(50)
                    .clamp(1, 1000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Some((reason, _)) => return Outcome::Refused(reason),
        }
    }
    Outcome::Refused("RATE_LIMITED".into())
}

/// The script a workload runs for one token: (key, replay_of_step).
/// `Some(i)` resends step `i`'s request byte for byte.
fn script(job: usize) -> &'static [(usize, Option<usize>)] {
    match job % 4 {
        // First try, exact replay, same-key retry.
        0 => &[(0, None), (0, Some(0)), (0, None)],
        // First try, same-key retry, another key.
        1 => &[(0, None), (0, None), (1, None)],
        // First try, another key, exact replay, two same-key retries.
        2 => &[(0, None), (1, None), (0, Some(0)), (0, None), (0, None)],
        // Another key races the first try, then both retry.
        _ => &[(1, None), (0, None), (1, None), (0, None)],
    }
}

/// Jobs whose script finished, with their first request and its key (for replays).
type Done = Arc<Mutex<Vec<(Arc<Job>, usize, pb::EnrollRequest)>>>;

/// One client task: runs the script of each job it takes from the queue,
/// then keeps retrying and replaying finished jobs until the broker dies
/// (the load must still be running when the kill comes).
async fn client(
    world: Arc<World>,
    mut c: IdentityClient<Channel>,
    queue: Arc<Mutex<Vec<Arc<Job>>>>,
    done: Done,
    round: usize,
    stop: Arc<AtomicBool>,
) {
    let record = |job: &Job, key: usize, req: pb::EnrollRequest, outcome: Outcome| {
        let lost = matches!(outcome, Outcome::Lost);
        world.attempts.lock().unwrap().push(Attempt {
            job: job.idx,
            key,
            round,
            after_crash: false,
            req,
            outcome,
        });
        lost
    };
    loop {
        let next = queue.lock().unwrap().pop();
        let Some(job) = next else { break };
        let mut sent: Vec<pb::EnrollRequest> = Vec::new();
        for &(key, replay) in script(job.idx) {
            let req = match replay {
                Some(i) => sent[i].clone(),
                None => fresh_request(&job, key),
            };
            sent.push(req.clone());
            let outcome = send(&mut c, req.clone()).await;
            if record(&job, key, req, outcome) {
                return; // The broker is gone.
            }
        }
        let first_key = script(job.idx)[0].0;
        done.lock()
            .unwrap()
            .push((job.clone(), first_key, sent[0].clone()));
    }
    // Filler load until the kill: same-key retries and exact replays.
    let t = Instant::now();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(5) {
        let pick = {
            let d = done.lock().unwrap();
            if d.is_empty() {
                None
            } else {
                Some(d[rand::rng().random_range(0..d.len())].clone())
            }
        };
        let Some((job, first_key, first)) = pick else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        n += 1;
        let (key, req) = if n % 2 == 0 {
            (first_key, first)
        } else {
            (0, fresh_request(&job, 0))
        };
        let outcome = send(&mut c, req.clone()).await;
        if record(&job, key, req, outcome) {
            return;
        }
    }
}

/// Creates `n` tokens (every 8th with two uses) and their keys.
async fn create_jobs(serve: &Serve, world: &mut World, round: usize, n: usize) -> String {
    let mut admin = serve.try_admin().await.unwrap();
    let mut ca_pin = String::new();
    for i in 0..n {
        let max_uses = if i % 8 == 7 { 2 } else { 1 };
        let r = admin
            .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: format!("spiffe://sigil.local/crash/r{round}/w{i}"),
                ttl_seconds: 600,
                max_uses,
            })
            .await
            .unwrap()
            .into_inner();
        let (token_id, secret) = token::parse_token(&r.token).unwrap();
        ca_pin = r.ca_pin;
        let keys = [gen_key(), gen_key()];
        let key_hashes = [spki_hash(&keys[0]), spki_hash(&keys[1])];
        let idx = world.jobs.len();
        world.jobs.push(Arc::new(Job {
            idx,
            token_id,
            secret,
            max_uses,
            keys,
            key_hashes,
        }));
    }
    ca_pin
}

fn gen_key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// The rules over everything clients saw so far.
fn check_client_view(world: &World) {
    let attempts = world.attempts.lock().unwrap();
    let mut serials: HashMap<usize, HashSet<&str>> = HashMap::new();
    let mut by_key: HashMap<(usize, usize), HashSet<&str>> = HashMap::new();
    let mut ok_per_request: HashMap<&[u8], usize> = HashMap::new();
    for a in attempts.iter() {
        let serial = match &a.outcome {
            Outcome::Ok { serial, .. } => serial,
            Outcome::Refused(r) => {
                assert!(
                    r == "TOKEN_ALREADY_USED" || r == "NONCE_REPLAYED",
                    "unexpected refusal {r} (round {}, after crash: {})",
                    a.round,
                    a.after_crash
                );
                continue;
            }
            Outcome::Lost => continue,
        };
        serials.entry(a.job).or_default().insert(serial);
        by_key.entry((a.job, a.key)).or_default().insert(serial);
        let Some(pb::enroll_request::Credential::Token(proof)) = &a.req.credential else {
            unreachable!()
        };
        let n = ok_per_request.entry(&proof.payload).or_default();
        *n += 1;
        assert_eq!(
            *n, 1,
            "an exact request (one nonce) was accepted twice (round {}, after crash: {})",
            a.round, a.after_crash
        );
    }
    for (job, s) in &serials {
        let max = world.jobs[*job].max_uses as usize;
        assert!(
            s.len() <= max,
            "token {} issued {} distinct certificates for {max} uses: {s:?}",
            world.jobs[*job].token_id,
            s.len()
        );
    }
    for ((job, key), s) in &by_key {
        assert_eq!(
            s.len(),
            1,
            "token {} key {key} got different certificates: {s:?}",
            world.jobs[*job].token_id
        );
    }
}

/// After a restart: every (token, key) a client tried this round retries
/// with a fresh nonce, and every request that succeeded or was lost is
/// replayed byte for byte.
async fn recover(
    world: &Arc<World>,
    serve: &Serve,
    trust: &sigil::cli::Trust,
    round: usize,
) -> usize {
    let (pairs, replays) = {
        let attempts = world.attempts.lock().unwrap();
        let mut pairs: Vec<(usize, usize)> = attempts
            .iter()
            .filter(|a| a.round == round)
            .map(|a| (a.job, a.key))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        pairs.sort();
        let replays: Vec<(usize, usize, pb::EnrollRequest)> = attempts
            .iter()
            .filter(|a| a.round == round && !matches!(a.outcome, Outcome::Refused(_)))
            .map(|a| (a.job, a.key, a.req.clone()))
            .collect();
        (pairs, replays)
    };
    // Issued before the crash ⇒ must come back identical now.
    let before: HashMap<(usize, usize), String> = world
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter_map(|a| match &a.outcome {
            Outcome::Ok { serial, .. } => Some(((a.job, a.key), serial.clone())),
            _ => None,
        })
        .collect();

    let work: Vec<(usize, usize, Option<pb::EnrollRequest>)> = pairs
        .into_iter()
        .map(|(j, k)| (j, k, None))
        .chain(replays.into_iter().map(|(j, k, r)| (j, k, Some(r))))
        .collect();
    let n = work.len();
    let mut lanes: Vec<Vec<_>> = (0..8).map(|_| Vec::new()).collect();
    for (i, w) in work.into_iter().enumerate() {
        lanes[i % 8].push(w);
    }
    let mut tasks = Vec::new();
    for lane in lanes {
        let world = world.clone();
        let mut c = serve.identity(trust).await;
        let before = before.clone();
        tasks.push(tokio::spawn(async move {
            for (job, key, replay) in lane {
                let j = world.jobs[job].clone();
                let is_retry = replay.is_none();
                let req = replay.unwrap_or_else(|| fresh_request(&j, key));
                let outcome = send(&mut c, req.clone()).await;
                assert!(
                    !matches!(outcome, Outcome::Lost),
                    "request lost with the broker up (round {round})"
                );
                if let (true, Some(serial)) = (is_retry, before.get(&(job, key))) {
                    match &outcome {
                        Outcome::Ok {
                            serial: s,
                            retried: true,
                            ..
                        } if s == serial => {}
                        other => panic!(
                            "round {round}: token {} key {key} held certificate {serial} \
                             before the crash, but a retry after restart got {other:?}",
                            j.token_id
                        ),
                    }
                }
                world.attempts.lock().unwrap().push(Attempt {
                    job,
                    key,
                    round,
                    after_crash: true,
                    req,
                    outcome,
                });
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n
}

/// The store agrees with what the clients hold.
fn check_store(world: &World, data: &Path) {
    let db = rusqlite::Connection::open_with_flags(
        data.join("sigil.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let attempts = world.attempts.lock().unwrap();
    let mut held = 0;
    for a in attempts.iter() {
        let Outcome::Ok { serial, der, .. } = &a.outcome else {
            continue;
        };
        held += 1;
        let job = &world.jobs[a.job];
        let row: Option<(Option<String>, String, Vec<u8>)> = db
            .query_row(
                "SELECT token_id, spki_sha256, der FROM issued WHERE serial = ?1",
                [serial],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .unwrap();
        let (token_id, spki, stored_der) = row
            .unwrap_or_else(|| panic!("certificate {serial} held by a client is not in the store"));
        assert_eq!(token_id.as_deref(), Some(job.token_id.as_str()));
        assert_eq!(
            spki, job.key_hashes[a.key],
            "certificate {serial} for another key"
        );
        assert_eq!(
            &stored_der, der,
            "certificate {serial} differs from the stored one"
        );
    }
    assert!(held > 0, "no client ever got a certificate");

    // Uses counter and issued rows move together (one transaction).
    let mut q = db
        .prepare(
            "SELECT t.token_id, t.max_uses, t.uses, \
             (SELECT COUNT(*) FROM issued i WHERE i.token_id = t.token_id) FROM tokens t",
        )
        .unwrap();
    let rows = q
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (id, max_uses, uses, issued) = row.unwrap();
        assert!(uses <= max_uses, "token {id}: {uses} uses of {max_uses}");
        assert_eq!(
            uses, issued,
            "token {id}: {uses} uses but {issued} certificates"
        );
    }
    let issued: i64 = db
        .query_row("SELECT COUNT(*) FROM issued", [], |r| r.get(0))
        .unwrap();
    let issued_audit: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE kind = ?1",
            [sigil::audit::AuditKind::Issued.as_str()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(issued, issued_audit, "one audit row per issued certificate");
}

/// No token secret, hex or raw, in any file under `dir` (the SQLite file,
/// its WAL, key files) or in `log`: the broker stores and logs token ids only.
fn assert_no_token_secret(world: &World, dir: &Path, log: &Path) {
    let mut files = vec![log.to_path_buf()];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                files.push(e.path());
            }
        }
    }
    // Every secret, hex and raw, bucketed by its first two bytes so each
    // file is scanned once (a naive search per secret is far too slow in
    // a debug build).
    let mut needles: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, job) in world.jobs.iter().enumerate() {
        let hex_secret = job.secret.to_hex();
        needles.push((i, hex::decode(&hex_secret).unwrap()));
        needles.push((i, hex_secret.into_bytes()));
    }
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); 1 << 16];
    for (n, (_, needle)) in needles.iter().enumerate() {
        buckets[usize::from(u16::from_be_bytes([needle[0], needle[1]]))].push(n);
    }
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        for (at, pair) in bytes.windows(2).enumerate() {
            for &n in &buckets[usize::from(u16::from_be_bytes([pair[0], pair[1]]))] {
                let (job, needle) = &needles[n];
                assert!(
                    !bytes[at..].starts_with(needle),
                    "the secret of token {} is in {}",
                    world.jobs[*job].token_id,
                    f.display()
                );
            }
        }
    }
}

/// Certificates whose first sight by any client was a `retried` response:
/// committed before a crash whose response was lost, then recovered.
fn lost_but_committed(world: &World) -> usize {
    let attempts = world.attempts.lock().unwrap();
    let fresh: HashSet<&str> = attempts
        .iter()
        .filter_map(|a| match &a.outcome {
            Outcome::Ok {
                serial,
                retried: false,
                ..
            } => Some(serial.as_str()),
            _ => None,
        })
        .collect();
    attempts
        .iter()
        .filter_map(|a| match &a.outcome {
            Outcome::Ok {
                serial,
                retried: true,
                ..
            } if !fresh.contains(serial.as_str()) => Some(serial.as_str()),
            _ => None,
        })
        .collect::<HashSet<_>>()
        .len()
}

async fn assert_audit_ok(data: &Path, when: &str) {
    let v = sigil::server::verify_audit_offline(data).await.unwrap();
    assert!(v.broken.is_none(), "audit chain broken {when}: {v:?}");
    assert!(v.events > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_concurrent_enrollment_never_double_issues() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("serve.log");
    let mut world = World::default();
    let mut serve = Serve::start(&data, &log).await;
    let mut kills = Vec::new();
    let mut lost_in_flight = 0;

    for round in 0..ROUNDS {
        let pin = create_jobs(&serve, &mut world, round, TOKENS_PER_ROUND).await;
        let trust = sigil::cli::Trust::from_pin(&pin).unwrap();
        let first = world.jobs.len() - TOKENS_PER_ROUND;
        // Pop order = reverse; fine, every job runs.
        let queue = Arc::new(Mutex::new(world.jobs[first..].to_vec()));
        let world_arc = Arc::new(std::mem::take(&mut world));
        let done = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for _ in 0..TASKS {
            clients.push(serve.identity(&trust).await);
        }
        let before_round = world_arc.attempts.lock().unwrap().len();

        // Load, then SIGKILL at a random point of it.
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                tokio::spawn(client(
                    world_arc.clone(),
                    c,
                    queue.clone(),
                    done.clone(),
                    round,
                    stop.clone(),
                ))
            })
            .collect();
        let kill_ms = rand::rng().random_range(KILL_AFTER_MS);
        tokio::time::sleep(Duration::from_millis(kill_ms)).await;
        serve.kill();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        let (sent, ok, lost) = {
            let a = world_arc.attempts.lock().unwrap();
            let round_attempts = &a[before_round..];
            (
                round_attempts.len(),
                round_attempts
                    .iter()
                    .filter(|x| matches!(x.outcome, Outcome::Ok { .. }))
                    .count(),
                round_attempts
                    .iter()
                    .filter(|x| matches!(x.outcome, Outcome::Lost))
                    .count(),
            )
        };
        lost_in_flight += lost;
        kills.push(format!(
            "round {round}: kill at {kill_ms} ms after {sent} requests ({ok} ok, {lost} lost)"
        ));
        check_client_view(&world_arc);

        // The crashed store is consistent before anything else touches it.
        assert_audit_ok(&data, &format!("after the SIGKILL of round {round}")).await;
        assert_no_token_secret(&world_arc, &data, &log);

        // Restart on the same data dir; every client retries.
        serve = Serve::start(&data, &log).await;
        recover(&world_arc, &serve, &trust, round).await;
        check_client_view(&world_arc);
        world = Arc::try_unwrap(world_arc).unwrap_or_else(|_| panic!("world still shared"));
    }

    serve.stop();
    eprintln!(
        "{}\ncertificates committed before a kill whose response was lost, recovered by retry: {}",
        kills.join("\n"),
        lost_but_committed(&world)
    );
    assert!(
        lost_in_flight > 0,
        "no kill ever interrupted a request in flight: {kills:?}"
    );
    check_store(&world, &data);
    assert_no_token_secret(&world, &data, &log);
    assert_audit_ok(&data, "after the final stop").await;
    let o = Command::new(BIN)
        .args(["audit", "verify", "--data-dir", data.to_str().unwrap()])
        .env_remove("SIGIL_DATA_DIR")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sigil audit verify: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

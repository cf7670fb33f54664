//! Several broker replicas on one PostgreSQL (issue #6). Runs when
//! SIGIL_TEST_POSTGRES_URL is set (`scripts/with-postgres.sh cargo test`);
//! otherwise prints SKIPPED — except under CI=true, where a missing database
//! fails the run.

use std::sync::Arc;

use sigil::api::pb;

use crate::harness::*;

const ID: &str = "spiffe://sigil.local/ci/build";
const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A fresh database URL, or `None` (skipped).
async fn fresh_db() -> Option<String> {
    let Ok(url) = std::env::var("SIGIL_TEST_POSTGRES_URL") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "SIGIL_TEST_POSTGRES_URL is unset in CI: run under scripts/with-postgres.sh"
        );
        eprintln!("SKIPPED: replica tests (set SIGIL_TEST_POSTGRES_URL)");
        return None;
    };
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let name = format!("sigil_rep_{:016x}", rand::random::<u64>());
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let base = url.rsplit_once('/').unwrap().0;
    Some(format!("{base}/{name}"))
}

async fn replicas(url: &str, n: usize) -> Vec<Arc<TestBroker>> {
    let starts = (0..n).map(|_| {
        let url = url.to_owned();
        tokio::spawn(async move {
            TestBroker::start_with(move |c| {
                c.store_url = Some(url.clone());
                c.kek_env = Some(KEK.to_owned());
            })
            .await
        })
    });
    let mut out = Vec::new();
    for s in starts {
        out.push(Arc::new(s.await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_ca_and_every_one_use_rule() {
    let Some(url) = fresh_db().await else { return };
    let r = replicas(&url, 3).await;
    // One CA identity, one bundle, on all three.
    let pins: Vec<String> = r.iter().map(|b| b.running().broker.ca_pin()).collect();
    assert!(pins.iter().all(|p| p == &pins[0]), "{pins:?}");
    let bundles: Vec<_> = r
        .iter()
        .map(|b| b.running().broker.bundle().spiffe_bundle_json)
        .collect();
    assert!(bundles.iter().all(|x| x == &bundles[0]));

    // One 1-use token redeemed 200 times across the replicas: one certificate.
    let (_, id, secret) = r[0].token(ID, 1, 0).await;
    let mut clients = Vec::new();
    for b in &r {
        clients.push(b.identity().await);
    }
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = clients[i % 3].clone();
        let (_, csr) = key_and_csr();
        let req = enroll_req(&id, &secret, &csr, r[0].now_ms(), &[]);
        tasks.push(tokio::spawn(async move { c.enroll(req).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(reason(&e), "TOKEN_ALREADY_USED"),
        }
    }
    assert_eq!(ok, 1);

    // A nonce used on A is refused on B.
    let (_, id2, secret2) = r[0].token(ID, 2, 0).await;
    let (_, csr) = key_and_csr();
    let req = enroll_req(&id2, &secret2, &csr, r[0].now_ms(), &[]);
    clients[0].enroll(req.clone()).await.unwrap();
    let err = clients[1].enroll(req).await.unwrap_err();
    assert_eq!(reason(&err), "NONCE_REPLAYED");

    // Concurrent bootstrap across replicas: exactly one plan.
    let plan = b"admins = [\"spiffe://sigil.local/admin/a\"]\n".to_vec();
    let mut tasks = Vec::new();
    for (i, b) in r.iter().enumerate() {
        for _ in 0..4 {
            let mut c = pb::admin_client::AdminClient::new(b.tls().await);
            let payload = sigil::cli::bootstrap_payload("sigil.local", b.now_ms(), &plan);
            let secret = r[i].bootstrap_secret();
            let req = pb::BootstrapPlanRequest {
                signature: sigil::token::hmac_sign(&secret, &payload),
                payload,
                plan: plan.clone(),
            };
            tasks.push(tokio::spawn(async move { c.bootstrap_plan(req).await }));
        }
    }
    let mut created = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(reason(&e), "BOOTSTRAP_DISABLED", "{e:?}"),
        }
    }
    assert_eq!(created, 1, "one foundation plan across the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_on_one_replica_denies_renewal_on_another_within_a_second() {
    let Some(url) = fresh_db().await else { return };
    let r = replicas(&url, 3).await;
    let (tok, _, _) = r[0].token(ID, 1, 0).await;
    let (chain, key) = r[0].enroll_with_token(&tok).await;
    let serial = hex::encode(
        x509_parser::parse_x509_certificate(&chain[0])
            .unwrap()
            .1
            .raw_serial(),
    );
    // The certificate works on C.
    let mut on_c =
        pb::identity_client::IdentityClient::new(r[2].mtls(chain.clone(), key.clone()).await);
    on_c.fetch_jwt(pb::FetchJwtRequest {
        audiences: vec!["a".into()],
        ttl_seconds: 0,
    })
    .await
    .unwrap();
    r[0].admin()
        .await
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: "serial".into(),
            value: serial,
            reason: "t".into(),
        })
        .await
        .unwrap();
    let t = std::time::Instant::now();
    let err = on_c
        .renew(pb::RenewRequest {
            csr: key_and_csr().1,
            jwt_audiences: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SVID_REVOKED");
    assert!(t.elapsed() < std::time::Duration::from_secs(1));
    // JWT validation on B learns SPIFFE-ID revocations through NOTIFY.
    let (tok, _, _) = r[0].token("spiffe://sigil.local/web", 1, 0).await;
    let (chain, key) = r[0].enroll_with_token(&tok).await;
    let jwt = pb::identity_client::IdentityClient::new(r[0].mtls(chain, key).await)
        .fetch_jwt(pb::FetchJwtRequest {
            audiences: vec!["a".into()],
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .jwt_svid;
    r[0].admin()
        .await
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: "spiffe_id".into(),
            value: "spiffe://sigil.local/web".into(),
            reason: "t".into(),
        })
        .await
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let res = r[1]
            .identity()
            .await
            .validate_jwt(pb::ValidateJwtRequest {
                token: jwt.clone(),
                audience: "a".into(),
            })
            .await;
        if let Err(e) = &res {
            assert_eq!(reason(e), "SVID_REVOKED");
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "not propagated within 1 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_on_one_replica_reaches_the_others_and_needs_a_kek() {
    let Some(url) = fresh_db().await else { return };
    let r = replicas(&url, 2).await;
    let before = r[1].running().broker.bundle().sequence;
    r[0].admin()
        .await
        .rotate_authority(pb::RotateAuthorityRequest {
            revoke_old: false,
            prepare_only: true,
        })
        .await
        .unwrap();
    let t = std::time::Instant::now();
    loop {
        let b = r[1].running().broker.bundle();
        if b.sequence > before {
            assert_eq!(b.x509_authorities.len(), 2);
            assert_eq!(
                b.spiffe_bundle_json,
                r[0].running().broker.bundle().spiffe_bundle_json
            );
            break;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "rotation not propagated"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Without a KEK, a PostgreSQL replica refuses to start.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sigil::config::Config::with_data_dir(dir.path().join("d"));
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.store_url = Some(url.clone());
    let err = sigil::server::start(cfg, Arc::new(sigil::clock::SystemClock))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("SIGIL_KEK"), "{err:#}");
}

/// Real processes: three `sigil serve` replicas on one database; one is
/// killed with SIGKILL mid-load, then every database connection is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_and_lost_database_connections_never_double_issue() {
    let Some(url) = fresh_db().await else { return };
    let bin = env!("CARGO_BIN_EXE_sigil");
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let data = dir.path().join(format!("r{i}"));
        let child = std::process::Command::new(bin)
            .args([
                "serve",
                "--data-dir",
                data.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--store",
                &url,
            ])
            .env("SIGIL_KEK", KEK)
            .env("SIGIL_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !data.join("admin.sock").exists() {
            assert!(t.elapsed().as_secs() < 30, "replica {i} did not start");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        addrs.push(
            std::fs::read_to_string(data.join("listen.addr"))
                .unwrap()
                .trim()
                .to_owned(),
        );
        procs.push((child, data));
    }
    let socket = procs[0].1.join("admin.sock");
    let mut admin =
        pb::admin_client::AdminClient::new(sigil::cli::connect_admin(socket).await.unwrap());
    let pin = ca_pin(&mut admin).await;
    let mut tokens = Vec::new();
    for _ in 0..30 {
        tokens.push(one_use_token(&mut admin).await);
    }
    let connect = |addr: String, pin: String| async move {
        let trust = sigil::cli::Trust::from_pin(&pin).unwrap();
        sigil::cli::connect_tls(
            &format!("https://{addr}"),
            sigil::cli::tls_config(&trust).unwrap(),
        )
        .await
        .map(pb::identity_client::IdentityClient::new)
    };
    // Each token: enroll through replica i % 3, retrying elsewhere with the
    // same key (retry-safe) when a replica dies or the database blips.
    let mut tasks = Vec::new();
    for (i, (id, secret)) in tokens.iter().cloned().enumerate() {
        let addrs = addrs.clone();
        let pin = pin.clone();
        tasks.push(tokio::spawn(async move {
            let (key, _) = key_and_csr();
            for attempt in 0..20 {
                tokio::time::sleep(std::time::Duration::from_millis((i as u64 % 10) * 15)).await;
                let addr = addrs[(i + attempt) % 3].clone();
                let Ok(mut c) = connect(addr, pin.clone()).await else {
                    continue;
                };
                let csr = csr_for(&key);
                let now = sigil::clock::Clock::now_ms(&sigil::clock::SystemClock);
                match c.enroll(enroll_req(&id, &secret, &csr, now, &[])).await {
                    Ok(r) => return (id, Some(r.into_inner().x509_svid_chain[0].clone())),
                    Err(e) => {
                        let why = reason(&e);
                        assert!(
                            why.contains("UNAVAILABLE") || why.starts_with("<no ErrorInfo"),
                            "unexpected refusal {why}"
                        );
                    }
                }
            }
            (id, None)
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    // SIGKILL replica 1 mid-load.
    let (mut victim, _) = procs.remove(1);
    victim.kill().unwrap();
    let _ = victim.wait();
    // Cut every database connection of the survivors once.
    let (pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap();
    let mut certs = std::collections::HashMap::new();
    for t in tasks {
        let (id, cert) = t.await.unwrap();
        certs.insert(id, cert.expect("every token enrolled in the end"));
    }
    // Nothing issued twice: one certificate row per token in the database.
    let rows = pg
        .query(
            "SELECT token_id, count(*) FROM issued GROUP BY token_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 30);
    for r in rows {
        assert_eq!(
            r.get::<_, i64>(1),
            1,
            "token {} issued twice",
            r.get::<_, String>(0)
        );
    }
    // A consumed token is not usable again with another key, on any survivor.
    let (id, secret) = tokens[0].clone();
    for addr in [&addrs[0], &addrs[2]] {
        let mut c = connect(addr.clone(), pin.clone()).await.unwrap();
        let (_, csr) = key_and_csr();
        let now = sigil::clock::Clock::now_ms(&sigil::clock::SystemClock);
        let err = c
            .enroll(enroll_req(&id, &secret, &csr, now, &[]))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "TOKEN_ALREADY_USED");
    }
    for (mut p, _) in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
}

// === PostgreSQL restarted mid-load ===

/// Bound on one RPC: above the broker's own limits on a store operation
/// (statement timeout 5 s, whole operation 11 s), so hitting it means
/// the broker hung instead of answering.
const RPC_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);
/// Pause between two requests of one load worker.
const PACE: std::time::Duration = std::time::Duration::from_millis(60);

/// Whether the restart test can run: it needs the local PostgreSQL that
/// `scripts/with-postgres.sh` found (it starts a cluster of its own).
fn private_cluster_possible() -> bool {
    if std::env::var_os("SIGIL_TEST_POSTGRES_URL").is_some()
        && std::env::var_os("SIGIL_TEST_POSTGRES_PGCTL").is_some()
    {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "SIGIL_TEST_POSTGRES_URL or SIGIL_TEST_POSTGRES_PGCTL is unset in CI: run under scripts/with-postgres.sh"
    );
    eprintln!(
        "SKIPPED: PostgreSQL restart test (needs scripts/with-postgres.sh: \
         SIGIL_TEST_POSTGRES_URL and SIGIL_TEST_POSTGRES_PGCTL)"
    );
    false
}

/// A throwaway PostgreSQL cluster of one test's own, so restarting it does
/// not disturb the tests sharing the main one: a nested
/// `scripts/with-postgres.sh` that prints the URL and the pg_ctl wrapper,
/// then waits for its stdin to close. Dropping this closes it, so the
/// script stops and deletes the cluster (also when the test panics).
struct PrivateCluster {
    child: std::process::Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    url: String,
    pg_ctl: String,
}

impl PrivateCluster {
    /// Blocks until the cluster is up (initdb and start: seconds).
    fn start() -> Self {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/with-postgres.sh");
        let mut child = Command::new(script)
            .args([
                "sh",
                "-c",
                r#"printf '%s\n%s\n' "$SIGIL_TEST_POSTGRES_URL" "$SIGIL_TEST_POSTGRES_PGCTL"; exec cat >/dev/null"#,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run scripts/with-postgres.sh");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut cluster = Self {
            child,
            stdout,
            url: String::new(),
            pg_ctl: String::new(),
        };
        let mut line = String::new();
        cluster.stdout.read_line(&mut line).unwrap();
        cluster.url = line.trim().to_owned();
        line.clear();
        cluster.stdout.read_line(&mut line).unwrap();
        cluster.pg_ctl = line.trim().to_owned();
        assert!(
            cluster.url.starts_with("postgres://") && !cluster.pg_ctl.is_empty(),
            "the private PostgreSQL cluster did not start (see the with-postgres lines above)"
        );
        cluster
    }

    /// Runs the cluster's pg_ctl; returns its stdout.
    async fn pg_ctl(&self, args: &[&str]) -> String {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            tokio::process::Command::new(&self.pg_ctl)
                .args(args)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("pg_ctl {args:?} did not finish in 60 s"))
        .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The running server's options (port, sockets, settings) as `pg_ctl
    /// start -o` takes them: a plain `start` after a `stop` would not reuse
    /// them, only `restart` does. `pg_ctl status` prints the command line
    /// recorded in postmaster.opts: the program, then each option quoted.
    async fn options(&self) -> String {
        let status = self.pg_ctl(&["status"]).await;
        let line = status
            .lines()
            .find(|l| l.contains(" \""))
            .unwrap_or_else(|| panic!("no command line in pg_ctl status: {status}"));
        let (_, opts) = line.split_once(" \"").unwrap();
        format!("\"{opts}")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // End of input: `cat` exits and the script stops and deletes the cluster.
        drop(self.child.stdin.take());
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(30) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sigil serve` processes, killed when dropped; if the test failed, the
/// end of each one's log is printed.
struct ServeProcs {
    procs: Vec<std::process::Child>,
    logs: Vec<std::path::PathBuf>,
}

impl ServeProcs {
    /// Starts `n` replicas on `url`, each with a data dir under `dir`;
    /// returns them with their public addresses. One after another (a
    /// rolling start): replicas booting together on an empty database were
    /// seen serving different CAs, a separate problem from this test's.
    async fn start(dir: &std::path::Path, url: &str, n: usize) -> (Self, Vec<String>) {
        Self::start_with(dir, url, n, &[]).await
    }

    /// [`ServeProcs::start`] with more `sigil serve` flags.
    async fn start_with(
        dir: &std::path::Path,
        url: &str,
        n: usize,
        flags: &[&str],
    ) -> (Self, Vec<String>) {
        let mut s = Self {
            procs: Vec::new(),
            logs: Vec::new(),
        };
        let mut addrs = Vec::new();
        for i in 0..n {
            let data = dir.join(format!("r{i}"));
            let log = dir.join(format!("r{i}.log"));
            let child = std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
                .args(["serve", "--data-dir", data.to_str().unwrap()])
                .args(["--listen", "127.0.0.1:0", "--store", url])
                .args(flags)
                .env("SIGIL_KEK", KEK)
                .env("SIGIL_LOG", "warn")
                .env("NO_COLOR", "1")
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            s.procs.push(child);
            s.logs.push(log);
            let t = std::time::Instant::now();
            while !data.join("admin.sock").exists() {
                assert!(s.alive(i), "replica {i} exited at start");
                assert!(t.elapsed().as_secs() < 30, "replica {i} did not start");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let addr = std::fs::read_to_string(data.join("listen.addr")).unwrap();
            addrs.push(addr.trim().to_owned());
        }
        (s, addrs)
    }

    fn alive(&mut self, i: usize) -> bool {
        matches!(self.procs[i].try_wait(), Ok(None))
    }
}

impl Drop for ServeProcs {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(10)..].join("\n");
                eprintln!("--- last lines of {}:\n{tail}", log.display());
            }
        }
    }
}

/// The outcome of one enrollment request.
#[derive(Debug, Clone)]
enum Outcome {
    Enrolled {
        serial: String,
        retried: bool,
        jwt: String,
    },
    Refused {
        code: tonic::Code,
        reason: String,
    },
    /// No answer within [`RPC_LIMIT`].
    Hung,
}

/// One enrollment request of the load.
#[derive(Debug)]
struct Attempt {
    token: usize,
    replica: usize,
    start: std::time::Instant,
    end: std::time::Instant,
    outcome: Outcome,
}

fn serial_of(der: &[u8]) -> String {
    hex::encode(
        x509_parser::parse_x509_certificate(der)
            .unwrap()
            .1
            .raw_serial(),
    )
}

/// Enrolls `id` with `key` once, bounded by [`RPC_LIMIT`].
async fn enroll_once(
    c: &pb::identity_client::IdentityClient<tonic::transport::Channel>,
    (id, secret): &(String, sigil::token::TokenSecret),
    key: &rcgen::KeyPair,
    aud: &[&str],
) -> Outcome {
    let csr = csr_for(key);
    let now = sigil::clock::Clock::now_ms(&sigil::clock::SystemClock);
    let req = enroll_req(id, secret, &csr, now, aud);
    match tokio::time::timeout(RPC_LIMIT, c.clone().enroll(req)).await {
        Err(_) => Outcome::Hung,
        Ok(Ok(r)) => {
            let r = r.into_inner();
            Outcome::Enrolled {
                serial: serial_of(&r.x509_svid_chain[0]),
                retried: r.retried,
                jwt: r.jwt_svid,
            }
        }
        Ok(Err(e)) => Outcome::Refused {
            code: e.code(),
            reason: reason(&e),
        },
    }
}

/// A clean outage answer: gRPC UNAVAILABLE with ErrorInfo reason UNAVAILABLE.
fn is_clean_unavailable(o: &Outcome) -> bool {
    matches!(o, Outcome::Refused { code, reason } if *code == tonic::Code::Unavailable && reason == "UNAVAILABLE")
}

/// Issue #6: PostgreSQL restarted mid-load. Three `sigil serve` replicas on
/// a cluster of this test's own, under continuous enrollment load (one-use
/// tokens, each retried with the same key until it succeeds); the server is
/// stopped for about a second and started again. While it is down every
/// request fails fast and cleanly (UNAVAILABLE, never INTERNAL or a hang);
/// after, requests succeed again, each token was issued exactly once, the
/// replicas are alive and healthy, and their change listeners reconnected
/// (a revocation on one reaches the others through NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_mid_load_fails_cleanly_and_recovers() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    if !private_cluster_possible() {
        return;
    }
    let test_start = Instant::now();
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    const N: usize = 3;
    let (mut procs, addrs) = ServeProcs::start(dir.path(), &cluster.url, N).await;
    let mut admins = Vec::new();
    let mut pins = Vec::new();
    for i in 0..N {
        let socket = dir.path().join(format!("r{i}/admin.sock"));
        let mut admin =
            pb::admin_client::AdminClient::new(sigil::cli::connect_admin(socket).await.unwrap());
        let status = admin.get_status(pb::GetStatusRequest {}).await.unwrap();
        pins.push(status.into_inner().ca_pin);
        admins.push(admin);
    }
    assert!(pins.iter().all(|p| p == &pins[0]), "one CA: {pins:?}");
    let trust = sigil::cli::Trust::from_pin(&pins[0]).unwrap();
    let mut clients = Vec::new();
    for addr in &addrs {
        let ch = sigil::cli::connect_tls(
            &format!("https://{addr}"),
            sigil::cli::tls_config(&trust).unwrap(),
        )
        .await
        .unwrap();
        clients.push(pb::identity_client::IdentityClient::new(ch));
    }
    let create = |admin: usize, spiffe_id: &str| {
        let mut a = admins[admin].clone();
        let req = pb::CreateEnrollmentTokenRequest {
            spiffe_id: spiffe_id.into(),
            ttl_seconds: 0,
            max_uses: 1,
        };
        async move {
            let t = a.create_enrollment_token(req).await.unwrap().into_inner();
            sigil::token::parse_token(&t.token).unwrap()
        }
    };
    // Enough tokens that the load outlasts the outage on a fast machine.
    let creating: Vec<_> = (0..100).map(|i| tokio::spawn(create(i % N, ID))).collect();
    let mut tokens = Vec::new();
    for c in creating {
        tokens.push(c.await.unwrap());
    }
    let probe = create(0, ID).await;
    let web = create(0, "spiffe://sigil.local/web").await;
    let tokens = Arc::new(tokens);
    let booted = test_start.elapsed();

    // The load: four workers take the tokens in turn; each token goes to
    // replica (i + attempt) % N, retried with the same key until enrolled.
    let next = Arc::new(AtomicUsize::new(0));
    let enrolled = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (tokens, next, enrolled) = (tokens.clone(), next.clone(), enrolled.clone());
        let clients = clients.clone();
        workers.push(tokio::spawn(async move {
            let mut log = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= tokens.len() {
                    return log;
                }
                let (key, _) = key_and_csr();
                for attempt in 0.. {
                    let replica = (i + attempt) % clients.len();
                    let start = Instant::now();
                    let outcome = enroll_once(&clients[replica], &tokens[i], &key, &[]).await;
                    let done = matches!(outcome, Outcome::Enrolled { .. });
                    log.push(Attempt {
                        token: i,
                        replica,
                        start,
                        end: Instant::now(),
                        outcome,
                    });
                    tokio::time::sleep(PACE).await;
                    if done {
                        enrolled.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                }
            }
        }));
    }

    // Mid-load: stop the server, check it is observed, start it again.
    let t = Instant::now();
    while enrolled.load(Ordering::SeqCst) < 8 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no load before the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let options = cluster.options().await;
    let stop_begin = Instant::now();
    cluster.pg_ctl(&["stop", "-m", "fast", "-w"]).await;
    let stopped = Instant::now();
    // Requests while the server is down, on every replica: an enrollment
    // and an admin token listing.
    let probe_key = key_and_csr().0;
    for (i, c) in clients.iter().enumerate() {
        let o = enroll_once(c, &probe, &probe_key, &[]).await;
        assert!(
            is_clean_unavailable(&o),
            "replica {i} with the database down: {o:?}"
        );
        let listing = tokio::time::timeout(
            RPC_LIMIT,
            admins[i]
                .clone()
                .list_enrollment_tokens(pb::ListEnrollmentTokensRequest {}),
        )
        .await
        .expect("a token listing hung with the database down");
        let e = listing.expect_err("tokens listed with the database down");
        assert_eq!(
            (e.code(), reason(&e).as_str()),
            (tonic::Code::Unavailable, "UNAVAILABLE"),
            "replica {i}: {e:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_begin = Instant::now();
    cluster.pg_ctl(&["start", "-w", "-o", &options]).await;
    let started = Instant::now();

    let logs = tokio::time::timeout(Duration::from_secs(40), async {
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    })
    .await
    .expect("the load did not finish: enrollments did not recover after the restart");

    // Every answer was a certificate or a clean UNAVAILABLE; none hung.
    for a in &logs {
        assert!(
            matches!(a.outcome, Outcome::Enrolled { .. }) || is_clean_unavailable(&a.outcome),
            "token {} on replica {}: {:?}",
            a.token,
            a.replica,
            a.outcome
        );
        // Before the outage, everything succeeded.
        if a.end < stop_begin {
            assert!(matches!(a.outcome, Outcome::Enrolled { .. }), "{a:?}");
        }
        // While the server was down, nothing did.
        if a.start > stopped && a.end < start_begin {
            assert!(is_clean_unavailable(&a.outcome), "{a:?}");
        }
    }
    let failed = logs
        .iter()
        .filter(|a| is_clean_unavailable(&a.outcome))
        .count();
    let failed_down = logs
        .iter()
        .filter(|a| a.start > stopped && a.end < start_begin)
        .count();
    assert!(failed_down > 0, "no load request hit the stopped server");
    // Success again within 10 s of the server being back.
    let recovered = logs
        .iter()
        .filter(|a| a.start >= started && matches!(a.outcome, Outcome::Enrolled { .. }))
        .map(|a| a.end)
        .min()
        .expect("no enrollment succeeded after the restart");
    let recovery = recovered - started;
    assert!(
        recovery < Duration::from_secs(10),
        "recovered after {recovery:?}"
    );
    let retried = logs
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Enrolled { retried: true, .. }))
        .count();

    // One certificate per token in the database, the one its client holds.
    let (pg, conn) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut serials = std::collections::HashMap::new();
    for a in &logs {
        if let Outcome::Enrolled { serial, .. } = &a.outcome {
            let first = serials
                .entry(tokens[a.token].0.clone())
                .or_insert(serial.clone());
            assert_eq!(first, serial, "token {} got two certificates", a.token);
        }
    }
    assert_eq!(serials.len(), tokens.len(), "every token enrolled");
    let rows = pg
        .query(
            "SELECT token_id, count(*), min(serial) FROM issued WHERE token_id IS NOT NULL GROUP BY token_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        tokens.len(),
        "one issued row per enrolled token"
    );
    for r in rows {
        let id: String = r.get(0);
        assert_eq!(r.get::<_, i64>(1), 1, "token {id} issued twice");
        assert_eq!(Some(&r.get::<_, String>(2)), serials.get(&id), "token {id}");
    }

    // A consumed token stays consumed: refused with another key, everywhere
    // (the first token, and one whose enrollment met the outage).
    let hit = logs
        .iter()
        .find(|a| is_clean_unavailable(&a.outcome))
        .map_or(0, |a| a.token);
    for i in [0, hit] {
        for (r, c) in clients.iter().enumerate() {
            let o = enroll_once(c, &tokens[i], &key_and_csr().0, &[]).await;
            assert!(
                matches!(&o, Outcome::Refused { reason, .. } if reason == "TOKEN_ALREADY_USED"),
                "token {i} again on replica {r}: {o:?}"
            );
        }
    }

    // The replicas are alive and serve health.
    for (i, addr) in addrs.iter().enumerate() {
        assert!(procs.alive(i), "replica {i} exited");
        let ch = sigil::cli::connect_tls(
            &format!("https://{addr}"),
            sigil::cli::tls_config(&trust).unwrap(),
        )
        .await
        .unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            health.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving
        );
    }

    // The change listeners reconnected (after backoff: 100 ms, doubling) ...
    let t = Instant::now();
    loop {
        let listening: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'sigil-listener' AND state = 'idle' \
                 AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if listening == N as i64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{listening} of {N} change listeners reconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listeners_back = started.elapsed();
    // ... and carry changes again: a SPIFFE-ID revocation on replica 0
    // reaches the JWT validation of the others well before their 5 s resync.
    let jwt = loop {
        match enroll_once(&clients[0], &web, &key_and_csr().0, &["a"]).await {
            Outcome::Enrolled { jwt, .. } => break jwt,
            o => assert!(is_clean_unavailable(&o), "{o:?}"),
        }
    };
    let validate = |c: &pb::identity_client::IdentityClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        let req = pb::ValidateJwtRequest {
            token: jwt.clone(),
            audience: "a".into(),
        };
        async move {
            tokio::time::timeout(RPC_LIMIT, c.validate_jwt(req))
                .await
                .expect("JWT validation hung")
        }
    };
    for c in &clients[1..] {
        validate(c).await.unwrap();
    }
    admins[0]
        .revoke_identity(pb::RevokeIdentityRequest {
            kind: "spiffe_id".into(),
            value: "spiffe://sigil.local/web".into(),
            reason: "t".into(),
        })
        .await
        .unwrap();
    let t = Instant::now();
    for (i, c) in clients.iter().enumerate().skip(1) {
        loop {
            if let Err(e) = validate(c).await {
                assert_eq!(reason(&e), "SVID_REVOKED", "replica {i}");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "revocation not propagated to replica {i} within 2 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let propagated = t.elapsed();
    for i in 0..N {
        assert!(procs.alive(i), "replica {i} exited");
    }
    eprintln!(
        "postgres restart: booted in {booted:?}; {} requests, {failed} UNAVAILABLE \
         ({failed_down} while stopped), {retried} same-key retries answered with the \
         first certificate; down {:?}, enrollments back {recovery:?} and listeners \
         {listeners_back:?} after the start; revocation propagated in {propagated:?}; \
         total {:?}",
        logs.len(),
        started - stop_begin,
        test_start.elapsed()
    );
}

/// Real processes started at the same instant on an empty database, several
/// times: every replica serves the one CA the cluster agreed on (checked
/// through each replica's admin status and by a TLS handshake pinned to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_processes_started_together_agree_on_one_ca() {
    let bin = env!("CARGO_BIN_EXE_sigil");
    for round in 0..5 {
        let Some(url) = fresh_db().await else { return };
        let dir = tempfile::tempdir().unwrap();
        let procs: Vec<_> = (0..3)
            .map(|i| {
                let data = dir.path().join(format!("r{i}"));
                let child = std::process::Command::new(bin)
                    .args(["serve", "--data-dir", data.to_str().unwrap()])
                    .args(["--listen", "127.0.0.1:0", "--store", &url])
                    .env("SIGIL_KEK", KEK)
                    .env("SIGIL_LOG", "warn")
                    .stderr(std::fs::File::create(dir.path().join(format!("err{i}"))).unwrap())
                    .spawn()
                    .unwrap();
                (KillOnDrop(child), data)
            })
            .collect();
        let mut pins = Vec::new();
        for (i, (_, data)) in procs.iter().enumerate() {
            let t = std::time::Instant::now();
            while !data.join("admin.sock").exists() {
                assert!(
                    t.elapsed().as_secs() < 30,
                    "round {round}: replica {i} did not start"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let mut admin = pb::admin_client::AdminClient::new(
                sigil::cli::connect_admin(data.join("admin.sock"))
                    .await
                    .unwrap_or_else(|e| {
                        let log = std::fs::read_to_string(dir.path().join(format!("err{i}")));
                        panic!("round {round}: replica {i} admin socket: {e:#}; its log: {log:?}")
                    }),
            );
            let pin = ca_pin(&mut admin).await;
            let addr = std::fs::read_to_string(data.join("listen.addr")).unwrap();
            pins.push((pin, addr.trim().to_owned()));
        }
        for (i, (pin, _)) in pins.iter().enumerate() {
            assert_eq!(
                pin, &pins[0].0,
                "round {round}: replica {i} reports another CA"
            );
        }
        let trust = sigil::cli::Trust::from_pin(&pins[0].0).unwrap();
        for (i, (_, addr)) in pins.iter().enumerate() {
            let mut c = pb::identity_client::IdentityClient::new(
                sigil::cli::connect_tls(
                    &format!("https://{addr}"),
                    sigil::cli::tls_config(&trust).unwrap(),
                )
                .await
                .unwrap_or_else(|e| panic!("round {round}: replica {i} serves another CA: {e}")),
            );
            c.get_bundle(pb::GetBundleRequest::default()).await.unwrap();
        }
        drop(procs);
    }
}

/// Kills and reaps the child process when dropped (also when a test panics).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A new one-use token for [`ID`], created on the admin socket.
async fn one_use_token(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> (String, sigil::token::TokenSecret) {
    let t = admin
        .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
            spiffe_id: ID.into(),
            ttl_seconds: 0,
            max_uses: 1,
        })
        .await
        .unwrap()
        .into_inner();
    sigil::token::parse_token(&t.token).unwrap()
}

/// The CA pin a replica reports on its admin socket.
async fn ca_pin(admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>) -> String {
    admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .ca_pin
}

/// TLS to PostgreSQL through the real binary: `sigil serve` with
/// `--store-ca-file` and a libpq-style `sslmode=verify-full` URL enrolls a
/// workload, and every session it holds on the database is TLS. Given
/// another CA, it refuses to start and says why, without the URL's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reaches_postgres_only_over_verified_tls() {
    let Some(url) = fresh_db().await else { return };
    let Ok(ca) = std::env::var("SIGIL_TEST_POSTGRES_CA") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "SIGIL_TEST_POSTGRES_CA is unset in CI: scripts/with-postgres.sh needs openssl"
        );
        eprintln!("SKIPPED: TLS to PostgreSQL (no SIGIL_TEST_POSTGRES_CA)");
        return;
    };
    let db = url.rsplit_once('/').unwrap().1.to_owned();
    let dir = tempfile::tempdir().unwrap();
    let tls_url = format!("{url}?sslmode=verify-full");
    let (procs, addrs) =
        ServeProcs::start_with(dir.path(), &tls_url, 1, &["--store-ca-file", &ca]).await;
    let mut admin = pb::admin_client::AdminClient::new(
        sigil::cli::connect_admin(dir.path().join("r0/admin.sock"))
            .await
            .unwrap(),
    );
    let pin = ca_pin(&mut admin).await;
    let token = one_use_token(&mut admin).await;
    let client = pb::identity_client::IdentityClient::new(
        sigil::cli::connect_tls(
            &format!("https://{}", addrs[0]),
            sigil::cli::tls_config(&sigil::cli::Trust::from_pin(&pin).unwrap()).unwrap(),
        )
        .await
        .unwrap(),
    );
    let (key, _) = key_and_csr();
    let outcome = enroll_once(&client, &token, &key, &[]).await;
    assert!(matches!(outcome, Outcome::Enrolled { .. }), "{outcome:?}");

    let server_url = std::env::var("SIGIL_TEST_POSTGRES_URL").unwrap();
    let (pg, conn) = tokio_postgres::connect(&server_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = pg
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
            &[&db],
        )
        .await
        .unwrap();
    let (tls, plain): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        tls >= 2,
        "the pool's and the listener's sessions over TLS: {tls}"
    );
    assert_eq!(plain, 0, "no plaintext session");
    drop(procs);

    // Another CA: no start, a reason, no password.
    let other = rcgen::generate_simple_self_signed(vec!["other-ca".to_owned()]).unwrap();
    let other_ca = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let out = tokio::task::spawn_blocking({
        let url = format!("{url}?sslmode=verify-full&password=s3cret-Pa55word");
        let data = dir.path().join("other");
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sigil"))
                .args(["serve", "--data-dir", data.to_str().unwrap()])
                .args(["--listen", "127.0.0.1:0", "--store", &url])
                .args(["--store-ca-file", other_ca.to_str().unwrap()])
                .env("SIGIL_KEK", KEK)
                .env("NO_COLOR", "1")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with another CA: {stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(!stderr.contains("s3cret-Pa55word"), "{stderr}");
}

//! `ha-postgres`: enroll-token against broker replicas sharing one
//! PostgreSQL (issue #6's "1 vs 3 replicas" row), each replica count in turn
//! (1, then 3 by default) on a database created empty for that run and
//! dropped after it, so the runs are comparable.
//!
//! The replicas run in this process, each with its own data dir, its own
//! tokio runtime (threads `sigil-broker-<k>`, as separate processes would
//! have) and the same store URL and key-encryption key: the first one
//! generates the CA and secrets and the others adopt them through the store,
//! as in tests/it/replicas.rs. Clients are spread round-robin over the
//! replicas (client `k` → replica `k mod n`); tokens are created on replica 0
//! and redeemed on any. The PostgreSQL server's CPU (the postmaster and its
//! children, found from our own backend's parent) is reported apart from
//! "other processes" when the server runs on this machine.
//!
//! The database URL is never printed: it may hold a password.

use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine;

use crate::{
    load::{self, BrokerOpts, Mode, Target},
    procstat, HaArgs,
};

/// Most replicas one run may start.
const MAX_REPLICAS: usize = 16;

/// `url` with its database name replaced by `db` (query parameters kept).
///
/// # Errors
/// Not a `postgres://` / `postgresql://` URL.
pub fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(rest_at) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| base.starts_with(p).then_some(p.len()))
    else {
        bail!("--store must be a postgres:// URL");
    };
    let authority_end = base[rest_at..]
        .find('/')
        .map_or(base.len(), |i| rest_at + i);
    let mut out = format!("{}/{db}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// Whether the URL's host is this machine (so its processes are in /proc).
fn is_local(url: &str) -> bool {
    let after = url.split_once("://").map_or("", |(_, r)| r);
    let authority = after.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host.is_empty() // a Unix socket via ?host=/path
        || host.starts_with("127.")
        || host.starts_with("localhost")
        || host.starts_with("[::1]")
}

/// An administrative connection to the server (creates and drops the run databases).
struct Server {
    client: tokio_postgres::Client,
    facts: serde_json::Value,
    postmaster: Option<u32>,
    label: String,
}

impl Server {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .context("connect to PostgreSQL (--store / SIGIL_TEST_POSTGRES_URL)")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut facts = serde_json::Map::new();
        for setting in [
            "server_version",
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "max_connections",
        ] {
            let v: String = client
                .query_one(&format!("SHOW {setting}"), &[])
                .await
                .with_context(|| format!("SHOW {setting}"))?
                .get(0);
            facts.insert(setting.to_owned(), v.into());
        }
        // Our backend's parent is the postmaster; its tree is the server.
        let backend: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let postmaster = u32::try_from(backend)
            .ok()
            .filter(|_| is_local(url))
            .filter(|pid| procstat::comm(*pid).is_some_and(|c| c.starts_with("postgres")))
            .and_then(procstat::parent_pid)
            .filter(|pid| procstat::comm(*pid).is_some_and(|c| c.starts_with("postgres")));
        let fact = |k: &str| {
            facts
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_owned()
        };
        let label = format!(
            "PostgreSQL {} (fsync={}, synchronous_commit={})",
            fact("server_version"),
            fact("fsync"),
            fact("synchronous_commit")
        );
        facts.insert(
            "server_cpu_measured".to_owned(),
            postmaster.is_some().into(),
        );
        Ok(Self {
            client,
            facts: facts.into(),
            postmaster,
            label,
        })
    }

    async fn create(&self, name: &str) -> anyhow::Result<()> {
        self.client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("create the run database {name} (the user needs CREATEDB)"))
    }

    async fn drop(&self, name: &str) {
        if let Err(e) = self
            .client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
        {
            eprintln!("sigil-bench: drop database {name}: {e}");
        }
    }
}

/// `plot.svg` → `plot-r3.svg`.
fn plot_for(path: &std::path::Path, replicas: usize) -> std::path::PathBuf {
    let stem = path
        .file_stem()
        .map_or_else(|| "plot".into(), |s| s.to_string_lossy().into_owned());
    let ext = path
        .extension()
        .map_or_else(|| "svg".into(), |s| s.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-r{replicas}.{ext}"))
}

/// Runs `sigil-bench ha-postgres`; returns the exit code.
///
/// # Errors
/// Bad flags, no database, or a replica failed to start.
pub fn run(h: &HaArgs) -> anyhow::Result<i32> {
    let a = &h.load;
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.broker.is_some() || a.admin_socket.is_some() || a.broker_pid.is_some() {
        bail!("--broker: ha-postgres starts its own replicas in-process");
    }
    if a.data_dir.is_some() || a.prefill > 0 || a.expire_nonces_over.is_some() {
        bail!("--data-dir, --prefill and --expire-nonces-over apply to the SQLite scenarios only");
    }
    if h.replicas.is_empty() || h.replicas.iter().any(|n| !(1..=MAX_REPLICAS).contains(n)) {
        bail!("--replicas: give counts between 1 and {MAX_REPLICAS}, e.g. 1,3");
    }
    let Some(url) = h.store.clone().filter(|u| !u.is_empty()) else {
        bail!(
            "--store postgres://… (or SIGIL_TEST_POSTGRES_URL) is required, e.g. \
             SIGIL_PG_DURABLE=1 scripts/with-postgres.sh target/release/sigil-bench ha-postgres -c 64"
        );
    };
    with_database(&url, "x")?;
    let cores = procstat::cores();
    let floor = load::measure_floor(a, Mode::Reused)?;
    let client_rt = load::client_runtime(a, cores)?;
    let server = client_rt.block_on(Server::connect(&url))?;
    if server.facts.get("fsync").and_then(|v| v.as_str()) != Some("on") && !a.quiet {
        eprintln!(
            "sigil-bench: note: this PostgreSQL runs with fsync off; for a fair comparison with the \
             fsynced SQLite runs use SIGIL_PG_DURABLE=1 scripts/with-postgres.sh"
        );
    }

    let mut runs = Vec::new();
    let mut failed = 0;
    for &n in &h.replicas {
        let mut r = [0u8; 6];
        rand::fill(&mut r[..]);
        let db = format!("sigil_bench_{n}r_{}", hex::encode(r));
        client_rt.block_on(server.create(&db))?;
        let result = run_replicas(
            h,
            n,
            &with_database(&url, &db)?,
            &server,
            floor.as_ref(),
            cores,
            &client_rt,
        );
        client_rt.block_on(server.drop(&db));
        let (mut json, errors) = result?;
        json["scenario"] = "ha-postgres".into();
        json["replicas"] = n.into();
        json["store"] = server.facts.clone();
        json["store_tls"] = h.store_ca_file.is_some().into();
        failed += errors;
        runs.push(json);
        // Let the dropped database's files and the replicas' threads go quiet.
        std::thread::sleep(Duration::from_millis(500));
    }

    if a.json {
        let out = serde_json::json!({
            "scenario": "ha-postgres",
            "date": procstat::utc_now(),
            "concurrency": a.concurrency,
            "jwt": a.jwt,
            "label": a.label,
            "store": server.facts,
            "store_tls": h.store_ca_file.is_some(),
            "cores": cores,
            "runs": runs,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "\nha-postgres, {} clients, {}{}:",
            a.concurrency,
            server.label,
            if h.store_ca_file.is_some() {
                ", replicas over TLS"
            } else {
                ""
            }
        );
        for r in &runs {
            let f = |p: &[&str]| {
                p.iter()
                    .try_fold(r, |v, k| v.get(k))
                    .and_then(serde_json::Value::as_f64)
            };
            println!(
                "  {} replica(s): {:>8.0} enrollments/s  p50 {:.2} ms  p99 {:.2} ms  errors {}  \
                 CPU broker {:.2} / PostgreSQL {} / load gen {:.2}",
                r["replicas"],
                f(&["rps"]).unwrap_or(0.0),
                f(&["latency_ms", "p50"]).unwrap_or(0.0),
                f(&["latency_ms", "p99"]).unwrap_or(0.0),
                r["errors"].as_object().map_or(0, |m| m
                    .values()
                    .filter_map(serde_json::Value::as_u64)
                    .sum::<u64>()),
                f(&["cpu_cores", "broker"]).unwrap_or(0.0),
                f(&["cpu_cores", "database"]).map_or("n/a".into(), |d| format!("{d:.2}")),
                f(&["cpu_cores", "loadgen"]).unwrap_or(0.0),
            );
        }
    }
    Ok(if failed > 0 {
        crate::EXIT_REQUEST_ERRORS
    } else {
        0
    })
}

/// One run: `n` replicas on the database at `url`, then the load.
fn run_replicas(
    h: &HaArgs,
    n: usize,
    url: &str,
    server: &Server,
    floor: Option<&crate::floor::Floor>,
    cores: usize,
    client_rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(serde_json::Value, u64)> {
    let a = &h.load;
    // A key-encryption key for this run's database only.
    let mut kek = [0u8; 32];
    rand::fill(&mut kek[..]);
    let kek = base64::engine::general_purpose::STANDARD.encode(kek);
    if !a.quiet {
        eprintln!("starting {n} replica(s) on a fresh database…");
    }
    let mut replicas = Vec::with_capacity(n);
    // One after the other: the first creates the CA and the secrets, the
    // others adopt them (concurrent starts are tests/it/replicas.rs's job).
    for k in 0..n {
        let opts = BrokerOpts {
            store_url: Some(url.to_owned()),
            kek_env: Some(kek.clone()),
            store_ca_file: h.store_ca_file.clone(),
            thread_name: Some(format!("sigil-broker-{k}")),
            ..BrokerOpts::default()
        };
        match load::start_in_process(a, &opts, cores) {
            Ok(r) => replicas.push(r),
            Err(e) => {
                replicas.into_iter().for_each(load::InProcess::shutdown);
                return Err(e.context(format!("start replica {k}")));
            }
        }
    }
    let pins: Vec<String> = replicas.iter().map(|r| r.running.ca_pin.clone()).collect();
    if pins.iter().any(|p| *p != pins[0]) {
        replicas.into_iter().for_each(load::InProcess::shutdown);
        bail!("the replicas do not share one CA: {pins:?}");
    }
    let target = Target {
        urls: replicas.iter().map(load::InProcess::url).collect(),
        admin_socket: replicas[0].running.admin_socket.clone(),
        ca_pin: Some(replicas[0].running.ca_pin.clone()),
        pid: Some(std::process::id()),
        in_process: true,
        description: format!(
            "{n} in-process broker replica(s) on {} (a fresh database), {} broker threads each, \
             {} client threads, clients round-robin over the replicas",
            server.label,
            a.broker_threads.unwrap_or(cores),
            a.client_threads.unwrap_or(cores),
        ),
        prefill_secs: None,
        issued_at_start: None,
        sqlite: false,
        db_pid: server.postmaster,
    };
    let mut args = a.clone();
    args.plot = a.plot.as_deref().map(|p| plot_for(p, n));
    args.label = Some(format!("{n} replica(s)"));
    let result = client_rt.block_on(load::drive(&args, Mode::Reused, &target, floor, None));
    replicas.into_iter().for_each(load::InProcess::shutdown);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        let ok = |u: &str| with_database(u, "run1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            ok("postgres://postgres@127.0.0.1:5432/postgres"),
            "postgres://postgres@127.0.0.1:5432/run1"
        );
        assert_eq!(
            ok("postgresql://u:p@db:5432/app?sslmode=disable"),
            "postgresql://u:p@db:5432/run1?sslmode=disable"
        );
        assert_eq!(ok("postgres://h"), "postgres://h/run1");
        assert_eq!(
            ok("postgres:///app?host=/run/pg"),
            "postgres:///run1?host=/run/pg"
        );
        assert!(with_database("mysql://h/db", "x").is_err());
    }

    #[test]
    fn local_hosts() {
        assert!(is_local("postgres://postgres@127.0.0.1:5432/postgres"));
        assert!(is_local("postgres://u:p@localhost/db"));
        assert!(is_local("postgres:///db?host=/run/pg"));
        assert!(!is_local("postgres://u@db.example:5432/db"));
        assert!(!is_local("postgres://u:127.0.0.1@db.example/db"));
    }

    #[test]
    fn plots_per_replica_count() {
        assert_eq!(
            plot_for(std::path::Path::new("r/ha-pg-c64.svg"), 3),
            std::path::PathBuf::from("r/ha-pg-c64-r3.svg")
        );
    }
}

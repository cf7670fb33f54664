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
    let pin = admin
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .ca_pin;
    let mut tokens = Vec::new();
    for _ in 0..30 {
        let t = admin
            .create_enrollment_token(pb::CreateEnrollmentTokenRequest {
                spiffe_id: ID.into(),
                ttl_seconds: 0,
                max_uses: 1,
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push(sigil::token::parse_token(&t.token).unwrap());
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

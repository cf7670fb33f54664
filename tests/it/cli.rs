//! The README quick start through the real `sigil` binary: serve, token
//! create, enroll; exit codes; graceful shutdown; and a trace-level log that
//! never contains a secret.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_sigil");

fn sigil(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SIGIL_DATA_DIR")
        .output()
        .unwrap()
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(data: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SIGIL_LOG", "trace")
        .stderr(std::fs::File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut child: Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve exited with {status}");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn readme_quick_start_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sigil-data");
    let log = dir.path().join("serve.log");
    let child = serve(&data, &log);
    wait_for(&data.join("listen.addr"));
    wait_for(&data.join("admin.sock"));
    let addr = std::fs::read_to_string(data.join("listen.addr")).unwrap();
    let broker = format!("https://{}", addr.trim());
    let d = data.to_str().unwrap();

    // 1. Human output with a ready-to-paste enroll line.
    let o = sigil(&[
        "token",
        "create",
        "--data-dir",
        d,
        "--spiffe-id",
        "spiffe://sigil.local/ci/build",
        "--ttl",
        "10m",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("sigil enroll "))
        .expect("enroll line");
    assert!(line.contains(&broker), "{line}");
    let human_token = out
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .unwrap()
        .trim()
        .to_owned();

    // 2. Paste the enroll line as printed (with our own --out).
    let out_dir = dir.path().join("svid");
    let mut args: Vec<String> = line.split_whitespace().skip(1).map(String::from).collect();
    let i = args.iter().position(|a| a == "--out").unwrap();
    args[i + 1] = out_dir.to_str().unwrap().to_owned();
    args.extend(["--jwt-audience".into(), "https://api.example".into()]);
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    for f in ["svid.pem", "svid.key", "bundle.pem", "jwt"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let svid = std::fs::read_to_string(out_dir.join("svid.pem")).unwrap();
    let bundle = std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap();
    let leaf = &sigil::cli::pem_certs(&svid)[0];
    let ca = &sigil::cli::pem_certs(&bundle)[0];
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
    leaf.verify_signature(Some(ca.public_key())).unwrap();

    // 3. Same token again, new key: denied (exit 3).
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("TOKEN_ALREADY_USED"));

    // 4. JSON output for scripts; --bundle instead of --ca-pin.
    let o = sigil(&[
        "token",
        "create",
        "--data-dir",
        d,
        "--spiffe-id",
        "spiffe://sigil.local/vm/a",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let token = j["token"].as_str().unwrap().to_owned();
    assert!(j["ca_pin"].as_str().unwrap().starts_with("sha256:"));
    let out2 = dir.path().join("svid2");
    let o = sigil(&[
        "enroll",
        "--broker",
        &broker,
        "--token",
        &token,
        "--bundle",
        out_dir.join("bundle.pem").to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // 5. Exit codes: unreachable (4), bad usage (2), wrong pin (4).
    let o = sigil(&[
        "enroll",
        "--broker",
        "https://127.0.0.1:1",
        "--token",
        &token,
        "--ca-pin",
        j["ca_pin"].as_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    let o = sigil(&[
        "enroll",
        "--broker",
        &broker,
        "--token",
        "nope",
        "--ca-pin",
        j["ca_pin"].as_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = sigil(&["enroll", "--broker", &broker, "--token", &token]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let bad_pin = format!("sha256:{}", "00".repeat(32));
    let o = sigil(&[
        "enroll",
        "--broker",
        &broker,
        "--token",
        &token,
        "--ca-pin",
        &bad_pin,
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    // 6. List, revoke, audit.
    let o = sigil(&["token", "list", "--data-dir", d, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    let o = sigil(&[
        "token",
        "revoke",
        "--data-dir",
        d,
        j["token_id"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sigil(&["audit", "verify", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sigil(&["audit", "list", "--data-dir", d, "--json"]);
    assert!(o.status.success(), "{}", text(&o));

    // 7. Graceful shutdown on SIGTERM; offline audit verify still works.
    stop(child);
    assert!(!data.join("admin.sock").exists());
    let o = sigil(&["audit", "verify", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));

    // 8. The trace-level log holds no secret: not the tokens, not any key.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("sigil serving"), "startup summary line");
    let mut secrets = vec![human_token.clone(), token.clone()];
    secrets.push(human_token.split('.').nth(1).unwrap().to_owned());
    secrets.push(token.split('.').nth(1).unwrap().to_owned());
    let token_key = std::fs::read(data.join("token_key")).unwrap();
    secrets.push(hex::encode(&token_key));
    use base64::Engine;
    secrets.push(base64::engine::general_purpose::STANDARD.encode(&token_key));
    for f in ["ca/g1/ca.key", "ca/g1/jwt.key"] {
        let pem = std::fs::read_to_string(data.join(f)).unwrap();
        secrets.extend(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(String::from),
        );
    }
    let key = std::fs::read_to_string(out_dir.join("svid.key")).unwrap();
    secrets.extend(
        key.lines()
            .filter(|l| !l.starts_with("-----"))
            .map(String::from),
    );
    secrets.push(std::fs::read_to_string(out_dir.join("jwt")).unwrap());
    for s in &secrets {
        assert!(s.len() >= 16);
        assert!(
            !log.contains(s.as_str()),
            "secret material found in the log"
        );
    }
    // Secret files are 0600.
    for f in ["token_key", "ca/g1/ca.key", "ca/g1/jwt.key"] {
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[test]
fn serve_refuses_a_world_readable_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let log = dir.path().join("log");
    let child = serve(&data, &log);
    wait_for(&data.join("admin.sock"));
    stop(child);
    std::fs::set_permissions(
        data.join("token_key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = sigil(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("chmod 600"),
        "{}",
        text(&o)
    );
}

/// The README's "operator's first five minutes", through the binary.
#[test]
fn operators_first_five_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sigil-data");
    let log = dir.path().join("serve.log");
    let child = serve(&data, &log);
    wait_for(&data.join("listen.addr"));
    wait_for(&data.join("admin.sock"));
    let broker = format!(
        "https://{}",
        std::fs::read_to_string(data.join("listen.addr"))
            .unwrap()
            .trim()
    );
    let d = data.to_str().unwrap();
    let plan = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/foundation-plan.toml");

    // Where is the bootstrap secret? (never printed)
    let o = sigil(&["bootstrap", "secret-path", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let secret_path = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert!(secret_path.ends_with("bootstrap_secret"));

    // The CA pin from the local status.
    let o = sigil(&["status", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o));
    let status = String::from_utf8(o.stdout).unwrap();
    assert!(status.contains("ENABLED"), "{status}");
    let pin = status
        .lines()
        .find_map(|l| l.strip_prefix("ca_pin:"))
        .unwrap()
        .trim()
        .to_owned();

    // Bootstrap with the sample plan: prints the admin's one-time token.
    let o = sigil(&[
        "plan",
        "bootstrap",
        "--broker",
        &broker,
        "--ca-pin",
        &pin,
        "--plan",
        plan,
        "--secret-file",
        &secret_path,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(out.contains("PLAN_CREATED"), "{out}");
    let enroll_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("sigil enroll "))
        .unwrap();

    // A second bootstrap is refused for good (exit 3).
    let o = sigil(&[
        "plan",
        "bootstrap",
        "--broker",
        &broker,
        "--ca-pin",
        &pin,
        "--plan",
        plan,
        "--secret-file",
        &secret_path,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("BOOTSTRAP_DISABLED"));

    // Enroll the admin with the printed line.
    let admin_dir = dir.path().join("admin-svid");
    let mut args: Vec<String> = enroll_line
        .split_whitespace()
        .skip(1)
        .map(String::from)
        .collect();
    let i = args.iter().position(|a| a == "--out").unwrap();
    args[i + 1] = admin_dir.to_str().unwrap().to_owned();
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // The admin creates a workload token over mTLS, and the workload enrolls.
    let cert = admin_dir.join("svid.pem");
    let key = admin_dir.join("svid.key");
    let o = sigil(&[
        "token",
        "create",
        "--broker",
        &broker,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://sigil.local/ci/build",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let wl = dir.path().join("workload");
    let o = sigil(&[
        "enroll",
        "--broker",
        &broker,
        "--token",
        j["token"].as_str().unwrap(),
        "--ca-pin",
        &pin,
        "--out",
        wl.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    // Status over mTLS: bootstrap is over, the secret is useless now.
    let o = sigil(&[
        "status",
        "--broker",
        &broker,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.contains("disabled for good") && s.contains("unused now"),
        "{s}"
    );
    let o = sigil(&[
        "plan",
        "show",
        "--broker",
        &broker,
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("frontend.internal"));
    let o = sigil(&["plan", "diff", "--data-dir", d, "--plan", plan]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("identical"));
    // A workload's SVID is not an admin: denied (exit 3).
    let o = sigil(&[
        "status",
        "--broker",
        &broker,
        "--cert",
        wl.join("svid.pem").to_str().unwrap(),
        "--key",
        wl.join("svid.key").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("NOT_AUTHORIZED"));
    stop(child);
    // The bootstrap secret never reached the log.
    let secret = std::fs::read_to_string(&secret_path).unwrap();
    assert!(!std::fs::read_to_string(&log)
        .unwrap()
        .contains(secret.trim()));
}

/// Metrics after a mixed run, and a JSON log that parses line by line,
/// carries request ids shared with the audit rows, and holds no secret.
#[test]
fn metrics_and_json_logs_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let log = dir.path().join("serve.log");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("SIGIL_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&data.join("metrics.addr"));
    wait_for(&data.join("admin.sock"));
    let broker = format!(
        "https://{}",
        std::fs::read_to_string(data.join("listen.addr"))
            .unwrap()
            .trim()
    );
    let d = data.to_str().unwrap();
    let o = sigil(&[
        "token",
        "create",
        "--data-dir",
        d,
        "--spiffe-id",
        "spiffe://sigil.local/m",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let token = j["token"].as_str().unwrap().to_owned();
    let pin = j["ca_pin"].as_str().unwrap().to_owned();
    let out = dir.path().join("s");
    for expect in [0, 3] {
        let o = sigil(&[
            "enroll",
            "--broker",
            &broker,
            "--token",
            &token,
            "--ca-pin",
            &pin,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(expect), "{}", text(&o));
        let _ = std::fs::remove_dir_all(&out);
    }
    // Scrape.
    let addr = std::fs::read_to_string(data.join("metrics.addr")).unwrap();
    let mut s = std::net::TcpStream::connect(addr.trim()).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut s, &mut body).unwrap();
    assert!(body.starts_with("HTTP/1.0 200 OK"), "{body}");
    assert!(
        body.contains("sigil_rpc_requests_total{rpc=\"Enroll\",outcome=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("sigil_rpc_requests_total{rpc=\"Enroll\",outcome=\"TOKEN_ALREADY_USED\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("sigil_rpc_duration_seconds_count{rpc=\"Enroll\"} 2"),
        "{body}"
    );
    assert!(
        body.contains("sigil_store_commit_seconds_count{backend=\"sqlite\"}"),
        "{body}"
    );
    assert!(
        body.contains("sigil_ca_not_after_seconds{generation=\"1\",state=\"active\"}"),
        "{body}"
    );
    assert!(body.contains("sigil_plan_version 0"), "{body}");
    // Audit rows carry the request ids found in the log.
    let o = sigil(&["audit", "list", "--data-dir", d, "--json"]);
    let rows: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let issued = rows.iter().find(|r| r["kind"] == "issued").unwrap();
    let rid = issued["fields"]["request_id"]
        .as_str()
        .expect("request id in the audit row")
        .to_owned();
    stop(child);
    let text_log = std::fs::read_to_string(&log).unwrap();
    let mut saw_rid = false;
    for line in text_log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
        saw_rid |= line.contains(&rid);
        assert!(v.get("timestamp").is_some());
    }
    assert!(saw_rid, "the request id appears in the log");
    assert!(
        !text_log.contains(token.split('.').nth(1).unwrap()),
        "no token secret in the log"
    );
}

/// SIGTERM stops the broker even while an idle client keeps a connection
/// open: in-flight calls drain, then lingering connections are closed.
#[test]
fn sigterm_exits_despite_an_idle_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let child = serve(&data, &dir.path().join("log"));
    wait_for(&data.join("listen.addr"));
    wait_for(&data.join("admin.sock"));
    let addr = std::fs::read_to_string(data.join("listen.addr")).unwrap();
    let o = sigil(&["status", "--data-dir", data.to_str().unwrap()]);
    let status = String::from_utf8(o.stdout).unwrap();
    let pin = status
        .lines()
        .find_map(|l| l.strip_prefix("ca_pin:"))
        .unwrap()
        .trim()
        .to_owned();
    // A client that completes the TLS handshake and then says nothing (no
    // HTTP/2 preface): before the fix, shutdown waited for it forever.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idle = rt.block_on(async {
        let cfg = sigil::cli::tls_config(&sigil::cli::Trust::from_pin(&pin).unwrap()).unwrap();
        let tcp = tokio::net::TcpStream::connect(addr.trim()).await.unwrap();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(
                rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    });
    let t = Instant::now();
    stop(child);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    drop(idle);
}

/// TLS settings for the store that cannot be honoured stop `sigil serve`
/// before it opens any store: a CA file for the embedded SQLite (by flag or
/// by the config file's `store_ca_file`), and a URL asking for TLS
/// (libpq's `sslmode=verify-full`) without one. The password stays out of
/// the message. (TLS that works: `replicas::serve_reaches_postgres_only_over_verified_tls`.)
#[test]
fn serve_refuses_store_tls_settings_it_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, "unused").unwrap();
    let conf = dir.path().join("sigil.toml");
    std::fs::write(
        &conf,
        format!("store_ca_file = {:?}\n", ca.to_str().unwrap()),
    )
    .unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (a, b, c) = (d("a"), d("b"), d("c"));
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec!["--data-dir", &a, "--store-ca-file", ca.to_str().unwrap()],
            "--store-ca-file is for a postgres:// store",
        ),
        (
            vec!["--data-dir", &b, "--config", conf.to_str().unwrap()],
            "--store-ca-file is for a postgres:// store",
        ),
        (
            vec![
                "--data-dir",
                &c,
                "--store",
                "postgres://sigil:s3cret-Pa55word@db.invalid/sigil?sslmode=verify-full",
            ],
            "no CA file is given",
        ),
    ];
    for (flags, want) in cases {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        args.extend(flags);
        let o = Command::new(env!("CARGO_BIN_EXE_sigil"))
            .args(&args)
            .env("SIGIL_KEK", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
            .output()
            .unwrap();
        let all = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {all}");
        assert!(all.contains(want), "{args:?}: {all}");
        assert!(!all.contains("s3cret-Pa55word"), "{all}");
    }
    for data in [a, b] {
        assert!(
            !Path::new(&data).join("sigil.db").exists(),
            "no store was opened in {data}"
        );
    }
}

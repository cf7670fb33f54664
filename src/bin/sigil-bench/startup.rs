//! `sigil-bench startup`: first boot (empty data dir: key generation, CA
//! certificate, schema) and cold start (existing data dir) of the real
//! `sigil serve` binary, each measured from spawn until
//! `<data-dir>/listen.addr` appears and until the first RPC (GetBundle over
//! TLS) is answered; then idle RSS and the SIGTERM shutdown time.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use sigil::{
    api::pb::{self, identity_client::IdentityClient},
    cli::connect_tls,
};

use crate::{procstat, StartupArgs, TempDir};

/// One boot, measured.
#[derive(Debug, Clone, Copy)]
struct Boot {
    listen_addr_ms: f64,
    first_rpc_ms: f64,
    idle_rss_kib: u64,
    stop_ms: f64,
}

/// Kills the child if a measurement fails half-way.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sigil_binary(a: &StartupArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &a.sigil {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("locate sigil-bench")?;
    let p = me.with_file_name("sigil");
    if !p.exists() {
        bail!(
            "no sigil binary next to {}; pass --sigil PATH",
            me.display()
        );
    }
    Ok(p)
}

fn boot(
    sigil: &Path,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    idle: Duration,
) -> anyhow::Result<Boot> {
    let addr_file = dir.join("listen.addr");
    let _ = fs::remove_file(&addr_file);
    let mut cmd = Command::new(sigil);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SIGIL_") {
            cmd.env_remove(k);
        }
    }
    let t0 = Instant::now();
    let mut guard = Guard(Some(
        cmd.spawn()
            .with_context(|| format!("spawn {}", sigil.display()))?,
    ));
    let addr = loop {
        // listen.addr is written in one call, "<addr>\n": wait for the newline.
        if let Ok(s) = fs::read_to_string(&addr_file) {
            if s.ends_with('\n') {
                break s.trim().to_owned();
            }
        }
        if let Some(c) = guard.0.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("sigil serve exited during startup ({st})");
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{} did not appear within 30 s", addr_file.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let listen_addr_ms = t0.elapsed().as_secs_f64() * 1e3;

    // Readiness only: where the CA keeps its files is the broker's business,
    // so accept its certificate (handshake signatures are still checked).
    let tls = accept_any_tls()?;
    let url = format!("https://{addr}");
    rt.block_on(async {
        loop {
            if let Ok(ch) = connect_tls(&url, tls.clone()).await {
                if IdentityClient::new(ch)
                    .get_bundle(pb::GetBundleRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("no answer from {url} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })?;
    let first_rpc_ms = t0.elapsed().as_secs_f64() * 1e3;

    std::thread::sleep(idle);
    let child = guard.0.take().context("child gone")?;
    let pid = child.id();
    let mut guard = Guard(Some(child));
    let idle_rss_kib = procstat::rss_kib(pid).map_or(0, |r| r.0);
    let t1 = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("run kill")?;
    if !killed.success() {
        bail!("kill -TERM {pid} failed");
    }
    loop {
        if let Some(c) = guard.0.as_mut() {
            if c.try_wait()?.is_some() {
                guard.0 = None;
                break;
            }
        }
        if t1.elapsed() > Duration::from_secs(20) {
            bail!("sigil serve did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Boot {
        listen_addr_ms,
        first_rpc_ms,
        idle_rss_kib,
        stop_ms: t1.elapsed().as_secs_f64() * 1e3,
    })
}

/// Accepts any server certificate; verifies handshake signatures normally.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn accept_any_tls() -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summary(boots: &[Boot]) -> serde_json::Value {
    let col = |f: fn(&Boot) -> f64| -> serde_json::Value {
        let v: Vec<f64> = boots.iter().map(f).collect();
        serde_json::json!({
            "median": crate::stats::round3(median(v.clone())),
            "min": crate::stats::round3(v.iter().copied().fold(f64::INFINITY, f64::min)),
            "max": crate::stats::round3(v.iter().copied().fold(0.0, f64::max)),
        })
    };
    serde_json::json!({
        "runs": boots.len(),
        "listen_addr_ms": col(|b| b.listen_addr_ms),
        "first_rpc_ms": col(|b| b.first_rpc_ms),
        "idle_rss_mib": col(|b| b.idle_rss_kib as f64 / 1024.0),
        "stop_ms": col(|b| b.stop_ms),
    })
}

/// Runs `sigil-bench startup`; returns the exit code.
///
/// # Errors
/// The binary is missing or a boot failed.
pub fn run(a: &StartupArgs) -> anyhow::Result<i32> {
    let sigil = sigil_binary(a)?;
    // A worker thread keeps driving the client connection after each probe,
    // so it answers the broker's GOAWAY and closes: an idle, unpolled
    // connection would hold up the broker's graceful shutdown.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let idle = a.idle;
    let mut first = Vec::new();
    let mut cold = Vec::new();
    for i in 0..a.runs.max(1) {
        let tmp = TempDir::new("startup")?;
        let dir = tmp.path().join("data");
        let f = boot(&sigil, &dir, &rt, idle).with_context(|| format!("first boot #{i}"))?;
        let c = boot(&sigil, &dir, &rt, idle).with_context(|| format!("cold start #{i}"))?;
        if !a.quiet {
            eprintln!(
                "run {}: first boot {:.1} ms (first RPC {:.1} ms), cold start {:.1} ms (first RPC {:.1} ms), idle RSS {:.1} MiB",
                i + 1,
                f.listen_addr_ms,
                f.first_rpc_ms,
                c.listen_addr_ms,
                c.first_rpc_ms,
                c.idle_rss_kib as f64 / 1024.0
            );
        }
        first.push(f);
        cold.push(c);
    }
    let json = serde_json::json!({
        "date": procstat::utc_now(),
        "binary": sigil.display().to_string(),
        "idle_wait_s": idle.as_secs_f64(),
        "first_boot": summary(&first),
        "cold_start": summary(&cold),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        let m = |v: &serde_json::Value, k: &str| v[k]["median"].as_f64().unwrap_or(0.0);
        let (f, c) = (&json["first_boot"], &json["cold_start"]);
        println!(
            "sigil serve startup, median of {} runs ({})",
            a.runs.max(1),
            sigil.display()
        );
        println!(
            "  first boot  → listen.addr {:.1} ms, first RPC answered {:.1} ms, idle RSS {:.1} MiB, SIGTERM → exit {:.1} ms",
            m(f, "listen_addr_ms"), m(f, "first_rpc_ms"), m(f, "idle_rss_mib"), m(f, "stop_ms")
        );
        println!(
            "  cold start  → listen.addr {:.1} ms, first RPC answered {:.1} ms, idle RSS {:.1} MiB, SIGTERM → exit {:.1} ms",
            m(c, "listen_addr_ms"), m(c, "first_rpc_ms"), m(c, "idle_rss_mib"), m(c, "stop_ms")
        );
    }
    Ok(0)
}

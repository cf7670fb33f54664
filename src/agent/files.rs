//! `--write-dir`: the agent's own X509-SVID as files for programs that do
//! not speak the Workload API — `svid.pem` (leaf first), `svid.key`
//! (PKCS#8 PEM, `0600`), `bundle.pem`, and with `--jwt-audience` a `jwt`
//! (`0600`) kept fresh. Every file is replaced atomically (temporary file in
//! the same directory, then rename), so a reader never sees half a file;
//! after an update the optional `--on-update` command runs (`sh -c`, with
//! `SIGIL_WRITE_DIR` set), its exit status logged. Updates that land
//! together (a renewal rewrites the SVID, the bundle and the JWT) run the
//! command once: it starts [`HOOK_SETTLE`] after the last of them, never
//! twice at the same time, and once more after a run if files changed
//! meanwhile.

use std::{
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context;

use super::state::{key_pem, pem_certs, write_atomic, Bundle, Svid};

/// How long the `--on-update` command may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Quiet time after an update before the `--on-update` command runs, so the
/// files of one renewal are all in place and the command runs once.
pub const HOOK_SETTLE: Duration = Duration::from_millis(250);

/// The `--write-dir` outputs.
#[derive(Debug, Clone)]
pub struct FileOutputs {
    /// Target directory.
    pub dir: PathBuf,
    /// Command run after updates.
    pub on_update: Option<String>,
    /// Wakes the task that runs `on_update` (started on first use).
    hook: Arc<OnceLock<Arc<tokio::sync::Notify>>>,
}

impl FileOutputs {
    /// Outputs into `dir`, running `on_update` after updates.
    pub fn new(dir: PathBuf, on_update: Option<String>) -> Self {
        Self {
            dir,
            on_update,
            hook: Arc::default(),
        }
    }

    /// Creates the directory (`0700` when new).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn prepare(&self) -> anyhow::Result<()> {
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("create {}", self.dir.display()))?;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Writes the SVID and bundle (key first, so `svid.pem` never names a
    /// key that is not there yet), then runs the hook.
    ///
    /// # Errors
    /// I/O.
    pub fn write_svid(&self, svid: &Svid, bundle: &[Vec<u8>]) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join("svid.key"),
            key_pem(&svid.key).as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.dir.join("svid.pem"),
            pem_certs(&svid.chain).as_bytes(),
            0o644,
        )?;
        write_atomic(
            &self.dir.join("bundle.pem"),
            pem_certs(bundle).as_bytes(),
            0o644,
        )?;
        self.hook();
        Ok(())
    }

    /// Rewrites `bundle.pem` after a bundle change, then runs the hook.
    ///
    /// # Errors
    /// I/O.
    pub fn write_bundle(&self, bundle: &Bundle) -> anyhow::Result<()> {
        write_atomic(
            &self.dir.join("bundle.pem"),
            pem_certs(&bundle.x509_authorities).as_bytes(),
            0o644,
        )?;
        self.hook();
        Ok(())
    }

    /// Writes the JWT-SVID (`0600`), then runs the hook.
    ///
    /// # Errors
    /// I/O.
    pub fn write_jwt(&self, token: &str) -> anyhow::Result<()> {
        write_atomic(&self.dir.join("jwt"), token.as_bytes(), 0o600)?;
        self.hook();
        Ok(())
    }

    /// Asks for one run of the hook; requests made while one is pending or
    /// running fold into a single later run.
    fn hook(&self) {
        let Some(cmd) = self.on_update.clone() else {
            return;
        };
        let dir = self.dir.clone();
        let wake = self.hook.get_or_init(|| {
            let wake = Arc::new(tokio::sync::Notify::new());
            let rx = Arc::clone(&wake);
            tokio::spawn(async move {
                loop {
                    rx.notified().await;
                    // Let the rest of this update land (each write wakes
                    // us again; the stored permit is consumed below).
                    loop {
                        tokio::select! {
                            () = rx.notified() => {}
                            () = tokio::time::sleep(HOOK_SETTLE) => break,
                        }
                    }
                    run_hook(cmd.clone(), dir.clone()).await;
                }
            });
            wake
        });
        wake.notify_one();
    }
}

async fn run_hook(cmd: String, dir: PathBuf) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("SIGIL_WRITE_DIR", &dir)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(HOOK_TIMEOUT, child).await {
        Ok(Ok(s)) if s.success() => tracing::debug!("on-update command succeeded"),
        Ok(Ok(s)) => tracing::warn!(status = %s, "on-update command failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "on-update command could not run"),
        Err(_) => tracing::warn!("on-update command timed out (killed)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn runs(log: &std::path::Path) -> usize {
        std::fs::read_to_string(log).map_or(0, |s| s.lines().count())
    }

    /// A burst of writes (as one renewal makes) runs the command once; a
    /// later update runs it again.
    #[tokio::test]
    async fn one_hook_run_per_burst_of_updates() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("hook.log");
        let out = FileOutputs::new(
            dir.path().join("out"),
            Some(format!("echo run >> {}", log.display())),
        );
        out.prepare().unwrap();
        let bundle = Bundle {
            trust_domain: "example.org".into(),
            x509_authorities: Vec::new(),
            jwks_json: "{}".into(),
            sequence: 1,
        };
        out.write_bundle(&bundle).unwrap();
        out.write_jwt("a.b.c").unwrap();
        out.write_bundle(&bundle).unwrap();
        out.write_jwt("d.e.f").unwrap();
        tokio::time::sleep(HOOK_SETTLE * 4).await;
        assert_eq!(runs(&log).await, 1);
        out.write_jwt("g.h.i").unwrap();
        tokio::time::sleep(HOOK_SETTLE * 4).await;
        assert_eq!(runs(&log).await, 2);
        assert_eq!(std::fs::read(out.dir.join("jwt")).unwrap(), b"g.h.i");
    }
}

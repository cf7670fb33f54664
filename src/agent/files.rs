//! `--write-dir`: the agent's own X509-SVID as files for programs that do
//! not speak the Workload API — `svid.pem` (leaf first), `svid.key`
//! (PKCS#8 PEM, `0600`), `bundle.pem`, and with `--jwt-audience` a `jwt`
//! (`0600`) kept fresh. Every file is replaced atomically (temporary file in
//! the same directory, then rename), so a reader never sees half a file;
//! after each update the optional `--on-update` command runs (`sh -c`, with
//! `SIGIL_WRITE_DIR` set), its exit status logged.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use anyhow::Context;

use super::state::{key_pem, pem_certs, write_atomic, Bundle, Svid};

/// How long the `--on-update` command may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// The `--write-dir` outputs.
#[derive(Debug, Clone)]
pub struct FileOutputs {
    /// Target directory.
    pub dir: PathBuf,
    /// Command run after every update.
    pub on_update: Option<String>,
}

impl FileOutputs {
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

    fn hook(&self) {
        let Some(cmd) = self.on_update.clone() else {
            return;
        };
        let dir = self.dir.clone();
        tokio::spawn(run_hook(cmd, dir));
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

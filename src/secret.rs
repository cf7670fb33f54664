//! Secret bytes and the files that hold them. A [`Secret`] has a redacted
//! `Debug`, no `Display`, and is zeroised on drop; the only way to the bytes
//! is [`Secret::expose`]. Secret files are written `0600` and refused when
//! group or world can read them.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

/// Secret key material. Never printed, zeroised when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes as a secret.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `len` bytes from the operating system's CSPRNG.
    pub fn random(len: usize) -> Self {
        let mut v = vec![0u8; len];
        rand::fill(&mut v[..]);
        Self::new(v)
    }

    /// The secret bytes. Call sites are the audit trail of who touches keys.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Errors reading or writing secret files. Messages name the path, never the content.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretFileError {
    /// The file can be read by group or others.
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    TooOpen {
        /// The offending file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// I/O failure.
    #[error("secret file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SecretFileError + '_ {
    move |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a secret file, refusing it when group/world can read it.
/// Returns `Ok(None)` when the file does not exist.
///
/// # Errors
/// [`SecretFileError::TooOpen`] for a file with mode bits in `0o077`, or I/O errors.
pub fn read_secret_file(path: &Path) -> Result<Option<Secret>, SecretFileError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path)
        .map(|b| Some(Secret::new(b)))
        .map_err(io_err(path))
}

/// Creates a secret file with mode `0600`, failing if it already exists
/// (so two writers never silently replace each other's key). The data is
/// fsynced before returning.
///
/// # Errors
/// I/O errors, including `AlreadyExists`.
pub fn create_secret_file(path: &Path, bytes: &[u8]) -> Result<(), SecretFileError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Loads the secret at `path`, or generates it with `generate` and persists
/// it once. Two processes racing on an empty directory agree on one value:
/// the loser of `create_new` re-reads the winner's file.
///
/// # Errors
/// As [`read_secret_file`] and [`create_secret_file`].
pub fn load_or_generate(
    path: &Path,
    generate: impl FnOnce() -> Secret,
) -> Result<(Secret, bool), SecretFileError> {
    if let Some(s) = read_secret_file(path)? {
        return Ok((s, false));
    }
    let fresh = generate();
    match create_secret_file(path, fresh.expose()) {
        Ok(()) => Ok((fresh, true)),
        Err(SecretFileError::Io { source, .. })
            if source.kind() == io::ErrorKind::AlreadyExists =>
        {
            let s = read_secret_file(path)?.ok_or_else(|| {
                io_err(path)(io::Error::new(
                    io::ErrorKind::NotFound,
                    "vanished after create",
                ))
            })?;
            Ok((s, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new(b"hunter2-very-secret".to_vec());
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn generated_once_then_loaded_and_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let (a, created) = load_or_generate(&p, || Secret::random(32)).unwrap();
        assert!(created);
        let (b, created) = load_or_generate(&p, || Secret::random(32)).unwrap();
        assert!(!created);
        assert_eq!(a.expose(), b.expose());
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn world_readable_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        fs::write(&p, b"x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&p).unwrap_err();
        assert!(matches!(err, SecretFileError::TooOpen { .. }));
        assert!(err.to_string().contains("chmod 600"));
    }
}

//! Shared key material for replicas on one store (PostgreSQL). The token
//! key, the bootstrap secret and every CA/JWT key generation (with the ring
//! manifest) live in the store's metadata table, sealed with AES-256-GCM under
//! a key-encryption key (KEK, from `SIGIL_KEK` or `--kek-file`) and bound to
//! their name as associated data. Each replica materialises them into its
//! own data dir (keys `0600`) and loads them from there, so the rest of the
//! broker is unchanged.
//!
//! Agreement: every file is published with insert-if-absent (replicas
//! booting together on an empty database all adopt the first one's), and the
//! ring manifest is advanced with compare-and-swap, so exactly one replica's
//! rotation wins; the others pull the winner's keys and reload.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context};
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine;

use crate::{
    secret::{self, Secret},
    store::Store,
};

const AAD_PREFIX: &[u8] = b"sigil/meta/v1:";
const RING: &str = "ca/ring.json";

/// The key-encryption key.
pub struct Kek(LessSafeKey);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(***)")
    }
}

impl Kek {
    /// From 32 raw bytes.
    ///
    /// # Errors
    /// Wrong length.
    pub fn new(key: &Secret) -> anyhow::Result<Self> {
        if key.len() != 32 {
            bail!("the KEK must be 32 bytes (base64 of 32 random bytes)");
        }
        let k = UnboundKey::new(&AES_256_GCM, key.expose()).map_err(|_| anyhow!("bad KEK"))?;
        Ok(Self(LessSafeKey::new(k)))
    }

    /// From `SIGIL_KEK`-style base64 text.
    ///
    /// # Errors
    /// Not base64 or not 32 bytes (the message never shows the value).
    pub fn from_base64(text: &[u8]) -> anyhow::Result<Self> {
        let t = std::str::from_utf8(text).map_err(|_| anyhow!("the KEK is not base64 text"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(t.trim())
            .map_err(|_| anyhow!("the KEK is not valid base64"))?;
        Self::new(&Secret::new(raw))
    }

    fn seal(&self, name: &str, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce);
        let mut buf = plain.to_vec();
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| anyhow!("sealing {name} failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(out)
    }

    fn open(&self, name: &str, sealed: &[u8]) -> anyhow::Result<Secret> {
        if sealed.len() < NONCE_LEN {
            bail!("{name}: sealed value too short");
        }
        let (n, c) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(n).map_err(|_| anyhow!("{name}: bad nonce"))?;
        let mut buf = c.to_vec();
        let aad = [AAD_PREFIX, name.as_bytes()].concat();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| anyhow!("{name}: cannot decrypt (wrong KEK?)"))?
            .to_vec();
        zeroize::Zeroize::zeroize(&mut buf);
        Ok(Secret::new(plain))
    }
}

fn meta_key(rel: &str) -> String {
    format!("file/{rel}")
}

fn is_private(rel: &str) -> bool {
    rel.ends_with(".key") || rel == "token_key" || rel == "bootstrap_secret"
}

/// Writes `bytes` to `dir/rel` (atomically; `0600` for keys) unless it already holds them.
fn write_local(dir: &Path, rel: &str, bytes: &[u8]) -> anyhow::Result<bool> {
    let path = dir.join(rel);
    if fs::read(&path).is_ok_and(|b| b == bytes) {
        return Ok(false);
    }
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("sync-tmp");
    let _ = fs::remove_file(&tmp);
    let mode = if is_private(rel) { 0o600 } else { 0o644 };
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    Ok(true)
}

/// The files a replica shares: the secrets, the manifest and each live generation.
fn shared_files(dir: &Path) -> Vec<String> {
    let mut v = vec!["token_key".to_owned(), "bootstrap_secret".to_owned()];
    if let Ok(text) = fs::read(dir.join(RING)) {
        if let Ok(m) = serde_json::from_slice::<serde_json::Value>(&text) {
            for g in m["generations"].as_array().into_iter().flatten() {
                if g["state"] == "dropped" {
                    continue;
                }
                if let Some(id) = g["id"].as_u64() {
                    for f in ["ca.key", "ca.crt", "jwt.key"] {
                        v.push(format!("ca/g{id}/{f}"));
                    }
                }
            }
        }
    }
    v.push(RING.to_owned());
    v
}

/// Pulls every shared file from the store into `dir`. Returns whether a local file changed.
///
/// # Errors
/// Store or decryption failure.
pub async fn pull(store: &dyn Store, kek: &Kek, dir: &Path) -> anyhow::Result<bool> {
    let mut changed = false;
    // The manifest first: it names the generations to fetch.
    if let Some(sealed) = store.fetch_meta(&meta_key(RING)).await? {
        let plain = kek.open(RING, &sealed)?;
        let m: serde_json::Value = serde_json::from_slice(plain.expose())?;
        for g in m["generations"].as_array().into_iter().flatten() {
            let Some(id) = g["id"].as_u64() else { continue };
            if g["state"] == "dropped" {
                continue;
            }
            for f in ["ca.key", "ca.crt", "jwt.key"] {
                let rel = format!("ca/g{id}/{f}");
                if let Some(s) = store.fetch_meta(&meta_key(&rel)).await? {
                    changed |= write_local(dir, &rel, kek.open(&rel, &s)?.expose())?;
                }
            }
        }
        changed |= write_local(dir, RING, plain.expose())?;
    }
    for rel in ["token_key", "bootstrap_secret"] {
        if let Some(s) = store.fetch_meta(&meta_key(rel)).await? {
            changed |= write_local(dir, rel, kek.open(rel, &s)?.expose())?;
        }
    }
    Ok(changed)
}

/// Publishes local files the store does not have yet (insert-if-absent),
/// then writes back whatever the store holds (the first publisher wins).
/// The manifest is advanced with compare-and-swap from `previous_ring` (the
/// plaintext this replica last pulled), so concurrent rotations have one
/// winner. Returns whether local files were replaced by other replicas' versions.
///
/// # Errors
/// Store, file or sealing failure.
pub async fn push(store: &dyn Store, kek: &Kek, dir: &Path) -> anyhow::Result<bool> {
    let mut replaced = false;
    for rel in shared_files(dir) {
        let Ok(local) = fs::read(dir.join(&rel)).map(Secret::new) else {
            continue;
        };
        let key = meta_key(&rel);
        if rel == RING {
            match store.fetch_meta(&key).await? {
                None => {
                    let stored = store
                        .insert_meta_if_absent(&key, kek.seal(&rel, local.expose())?)
                        .await?;
                    let winner = kek.open(&rel, &stored)?;
                    replaced |= write_local(dir, &rel, winner.expose())?;
                }
                Some(current) => {
                    let cur_plain = kek.open(&rel, &current)?;
                    if cur_plain.expose() == local.expose() {
                        continue;
                    }
                    let newer = ring_sequence(local.expose()) > ring_sequence(cur_plain.expose());
                    if newer
                        && store
                            .cas_meta(&key, &current, kek.seal(&rel, local.expose())?)
                            .await?
                    {
                        continue;
                    }
                    // Someone else's manifest is current: adopt it.
                    replaced = true;
                }
            }
            continue;
        }
        let stored = store
            .insert_meta_if_absent(&key, kek.seal(&rel, local.expose())?)
            .await?;
        let winner = kek.open(&rel, &stored)?;
        replaced |= write_local(dir, &rel, winner.expose())?;
    }
    if replaced {
        pull(store, kek, dir).await?;
    }
    Ok(replaced)
}

fn ring_sequence(json: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v["sequence"].as_u64())
        .unwrap_or(0)
}

/// Reads the KEK from a file (0600 enforced) or `SIGIL_KEK`.
///
/// # Errors
/// Unreadable or malformed KEK.
pub fn load_kek(file: Option<&PathBuf>, env: Option<&str>) -> anyhow::Result<Option<Kek>> {
    if let Some(p) = file {
        let s = secret::read_secret_file(p)?
            .with_context(|| format!("KEK file {} not found", p.display()))?;
        return Kek::from_base64(s.expose()).map(Some);
    }
    match env {
        Some(v) => Kek::from_base64(v.as_bytes()).map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_binds_name_and_key() {
        let k = Kek::new(&Secret::new(vec![3; 32])).unwrap();
        let s = k.seal("token_key", b"secret").unwrap();
        assert_eq!(k.open("token_key", &s).unwrap().expose(), b"secret");
        assert!(k.open("bootstrap_secret", &s).is_err(), "bound to its name");
        let other = Kek::new(&Secret::new(vec![4; 32])).unwrap();
        assert!(other.open("token_key", &s).is_err());
        assert!(Kek::from_base64(b"short").is_err());
        assert_eq!(format!("{k:?}"), "Kek(***)");
    }
}

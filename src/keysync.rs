//! Shared key material for replicas on one store (PostgreSQL). The token
//! key, the bootstrap secret and every CA/JWT key generation (with the ring
//! manifest) live in the store's metadata table, sealed with AES-256-GCM under
//! a key-encryption key (KEK, from `SIGIL_KEK` or `--kek-file`) and bound to
//! their name as associated data. Each replica materialises them into its
//! own data dir (keys `0600`) and loads them from there, so the rest of the
//! broker is unchanged.
//!
//! Agreement: every value is published with insert-if-absent (replicas
//! booting together on an empty database all adopt the first one's); a key
//! generation's three files are one value, so they are adopted together; and
//! the ring manifest is advanced with compare-and-swap, so exactly one
//! replica's rotation wins; the others pull the winner's keys and reload.

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

/// The single files a replica shares (each its own metadata value).
const SECRET_FILES: [&str; 2] = ["token_key", "bootstrap_secret"];

/// The files of one CA/JWT key generation. They are published together as
/// ONE metadata value, so replicas racing to publish generation `id` can
/// never end up with one replica's CA key beside another's certificate.
const GEN_FILES: [&str; 3] = ["ca.key", "ca.crt", "jwt.key"];

fn gen_rel(id: u64, file: &str) -> String {
    format!("ca/g{id}/{file}")
}

/// Metadata name (and sealing label) of generation `id`'s files.
fn gen_name(id: u64) -> String {
    format!("ca/g{id}")
}

/// Ids of the generations a manifest (JSON text) lists as not dropped.
fn live_generations(manifest: &[u8]) -> Vec<u64> {
    serde_json::from_slice::<serde_json::Value>(manifest)
        .ok()
        .and_then(|m| {
            m["generations"].as_array().map(|gens| {
                gens.iter()
                    .filter(|g| g["state"] != "dropped")
                    .filter_map(|g| g["id"].as_u64())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A generation's files as one stored value: a JSON object of base64 text
/// per file name (`ca.key`, `ca.crt`, `jwt.key`). The text encodes private
/// keys, so it lives only in this type, which zeroises it on drop; the
/// JSON is written into a buffer sized up front (no reallocation leaves a
/// copy behind) and parsed straight into these fields (base64 has nothing
/// to unescape, so the parser makes no scratch copy).
#[derive(serde::Serialize, serde::Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
struct GenerationValue {
    #[serde(rename = "ca.key")]
    ca_key: String,
    #[serde(rename = "ca.crt")]
    ca_crt: String,
    #[serde(rename = "jwt.key")]
    jwt_key: String,
}

impl GenerationValue {
    /// The base64 text of `file` (one of [`GEN_FILES`]).
    fn text(&self, file: &str) -> Option<&str> {
        match file {
            "ca.key" => Some(&self.ca_key),
            "ca.crt" => Some(&self.ca_crt),
            "jwt.key" => Some(&self.jwt_key),
            _ => None,
        }
    }

    fn to_json(&self) -> Option<Secret> {
        let text_len = self.ca_key.len() + self.ca_crt.len() + self.jwt_key.len();
        // Braces, three quoted names, quotes, colons and commas: < 64 bytes.
        let mut json = Vec::with_capacity(text_len + 64);
        let written = serde_json::to_writer(&mut json, self);
        let json = Secret::new(json);
        written.ok().map(|()| json)
    }
}

/// Generation `id`'s local files as one value (JSON of base64), or `None`
/// when one of them is missing.
fn read_generation(dir: &Path, id: u64) -> Option<Secret> {
    let encode = |f: &str| -> Option<String> {
        let bytes = Secret::new(fs::read(dir.join(gen_rel(id, f))).ok()?);
        Some(base64::engine::general_purpose::STANDARD.encode(bytes.expose()))
    };
    GenerationValue {
        ca_key: encode("ca.key")?,
        ca_crt: encode("ca.crt")?,
        jwt_key: encode("jwt.key")?,
    }
    .to_json()
}

/// Writes generation `id`'s files from a value made by [`read_generation`];
/// returns whether a local file changed.
fn write_generation(dir: &Path, id: u64, value: &Secret) -> anyhow::Result<bool> {
    let v: GenerationValue = serde_json::from_slice(value.expose())
        .map_err(|_| anyhow!("{}: malformed generation value", gen_name(id)))?;
    let mut files = Vec::with_capacity(GEN_FILES.len());
    for f in GEN_FILES {
        let text = v
            .text(f)
            .with_context(|| format!("{}: {f} missing", gen_name(id)))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Secret::new)
            .map_err(|_| anyhow!("{}: {f} is not base64", gen_name(id)))?;
        files.push((f, bytes));
    }
    let mut changed = false;
    for (f, bytes) in files {
        changed |= write_local(dir, &gen_rel(id, f), bytes.expose())?;
    }
    Ok(changed)
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
        for id in live_generations(plain.expose()) {
            let name = gen_name(id);
            if let Some(s) = store.fetch_meta(&meta_key(&name)).await? {
                changed |= write_generation(dir, id, &kek.open(&name, &s)?)?;
            }
        }
        changed |= write_local(dir, RING, plain.expose())?;
    }
    for rel in SECRET_FILES {
        if let Some(s) = store.fetch_meta(&meta_key(rel)).await? {
            changed |= write_local(dir, rel, kek.open(rel, &s)?.expose())?;
        }
    }
    Ok(changed)
}

/// Publishes local files the store does not have yet (insert-if-absent),
/// then writes back whatever the store holds (the first publisher wins).
/// A key generation's files go as one value (all or nothing). The manifest
/// goes last and is advanced with compare-and-swap from what the store
/// holds, so concurrent rotations have one winner. Returns whether local
/// files were replaced by other replicas' versions.
///
/// # Errors
/// Store, file or sealing failure.
pub async fn push(store: &dyn Store, kek: &Kek, dir: &Path) -> anyhow::Result<bool> {
    let mut replaced = false;
    for rel in SECRET_FILES {
        let Ok(local) = fs::read(dir.join(rel)).map(Secret::new) else {
            continue;
        };
        let stored = store
            .insert_meta_if_absent(&meta_key(rel), kek.seal(rel, local.expose())?)
            .await?;
        replaced |= write_local(dir, rel, kek.open(rel, &stored)?.expose())?;
    }
    let Ok(local_ring) = fs::read(dir.join(RING)).map(Secret::new) else {
        if replaced {
            pull(store, kek, dir).await?;
        }
        return Ok(replaced);
    };
    for id in live_generations(local_ring.expose()) {
        let Some(local) = read_generation(dir, id) else {
            continue;
        };
        let name = gen_name(id);
        let stored = store
            .insert_meta_if_absent(&meta_key(&name), kek.seal(&name, local.expose())?)
            .await?;
        replaced |= write_generation(dir, id, &kek.open(&name, &stored)?)?;
    }
    let key = meta_key(RING);
    match store.fetch_meta(&key).await? {
        None => {
            let stored = store
                .insert_meta_if_absent(&key, kek.seal(RING, local_ring.expose())?)
                .await?;
            replaced |= write_local(dir, RING, kek.open(RING, &stored)?.expose())?;
        }
        Some(current) => {
            let cur_plain = kek.open(RING, &current)?;
            if cur_plain.expose() != local_ring.expose() {
                let newer = ring_sequence(local_ring.expose()) > ring_sequence(cur_plain.expose());
                let won = newer
                    && store
                        .cas_meta(&key, &current, kek.seal(RING, local_ring.expose())?)
                        .await?;
                // Otherwise someone else's manifest is current: adopt it.
                replaced |= !won;
            }
        }
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

    fn write_files(dir: &Path, id: u64, files: &[(&str, &[u8])]) {
        fs::create_dir_all(dir.join(format!("ca/g{id}"))).unwrap();
        for (f, bytes) in files {
            fs::write(dir.join(gen_rel(id, f)), bytes).unwrap();
        }
    }

    #[test]
    fn a_generation_value_round_trips_fits_its_buffer_and_reads_older_json() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let key = rand::random::<[u8; 32]>().repeat(8);
        let files: [(&str, &[u8]); 3] = [
            ("ca.key", &key),
            ("ca.crt", b"certificate bytes"),
            ("jwt.key", &key[..100]),
        ];
        write_files(a.path(), 3, &files);
        let value = read_generation(a.path(), 3).expect("all three files");
        // The JSON fits the buffer sized up front, so it was never moved.
        let text_len: usize = files
            .iter()
            .map(|(_, b)| base64::engine::general_purpose::STANDARD.encode(b).len())
            .sum();
        assert!(value.expose().len() <= text_len + 64);
        assert!(write_generation(b.path(), 3, &value).unwrap());
        for (f, bytes) in files {
            assert_eq!(fs::read(b.path().join(gen_rel(3, f))).unwrap(), bytes);
        }
        assert!(!write_generation(b.path(), 3, &value).unwrap(), "unchanged");
        // Values written by the serde_json::Map code before (any key order).
        let b64 = |x: &[u8]| base64::engine::general_purpose::STANDARD.encode(x);
        let older = serde_json::json!({
            "jwt.key": b64(b"j"), "ca.crt": b64(b"c"), "ca.key": b64(b"k")
        });
        let c = tempfile::tempdir().unwrap();
        write_generation(c.path(), 1, &Secret::new(older.to_string().into_bytes())).unwrap();
        assert_eq!(fs::read(c.path().join(gen_rel(1, "ca.key"))).unwrap(), b"k");
        // A missing file: no value.
        fs::remove_file(a.path().join(gen_rel(3, "jwt.key"))).unwrap();
        assert!(read_generation(a.path(), 3).is_none());
    }

    #[test]
    fn a_malformed_generation_value_is_refused_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let secretish = "S3CR3TKEYTEXT";
        for bad in [
            format!(r#"{{"ca.key":"{secretish}","ca.crt":"eA=="}}"#),
            format!(r#"{{"ca.key":"{secretish}!","ca.crt":"eA==","jwt.key":"eA=="}}"#),
            format!("{secretish} not json"),
        ] {
            let err = write_generation(dir.path(), 1, &Secret::new(bad.into_bytes()))
                .expect_err("refused");
            let text = format!("{err:#} {err:?}");
            assert!(!text.contains(secretish), "{text}");
            assert!(text.contains("ca/g1"), "{text}");
        }
        assert!(!dir.path().join("ca/g1/ca.key").exists());
    }

    /// Two replicas that generated different keys at the same instant (so
    /// with identical manifests) end up with the first publisher's
    /// generation, all three files of it, and the same secrets.
    #[tokio::test]
    async fn racing_first_boots_adopt_one_whole_generation() {
        use crate::{
            ca::ring::{Authority, RingOptions},
            store::sqlite::{SqliteOptions, SqliteStore},
        };
        let db = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&db.path().join("s.db"), SqliteOptions::default()).unwrap();
        let kek = Kek::new(&Secret::new(vec![7; 32])).unwrap();
        let td = crate::identity::TrustDomain::parse("example.org").unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for d in [&a, &b] {
            Authority::load_or_create(d.path(), &td, 1_767_225_600_000, RingOptions::default())
                .unwrap();
            fs::write(d.path().join("token_key"), rand::random::<[u8; 32]>()).unwrap();
        }
        let read = |d: &Path, rel: &str| fs::read(d.join(rel)).unwrap();
        assert_eq!(read(a.path(), RING), read(b.path(), RING));
        assert_ne!(
            read(a.path(), "ca/g1/ca.key"),
            read(b.path(), "ca/g1/ca.key")
        );
        let a_files: Vec<_> = GEN_FILES
            .iter()
            .map(|f| read(a.path(), &gen_rel(1, f)))
            .collect();

        assert!(
            !push(&store, &kek, a.path()).await.unwrap(),
            "first publisher keeps its own"
        );
        assert!(push(&store, &kek, b.path()).await.unwrap(), "second adopts");
        for (f, want) in GEN_FILES.iter().zip(&a_files) {
            assert_eq!(&read(b.path(), &gen_rel(1, f)), want, "{f}");
        }
        assert_eq!(read(b.path(), "token_key"), read(a.path(), "token_key"));
        let (auth_b, _) =
            Authority::load_or_create(b.path(), &td, 1_767_225_600_000, RingOptions::default())
                .unwrap();
        let (auth_a, _) =
            Authority::load_or_create(a.path(), &td, 1_767_225_600_000, RingOptions::default())
                .unwrap();
        assert_eq!(auth_b.active().ca_pin(), auth_a.active().ca_pin());
        // A third replica with nothing local pulls the same.
        let c = tempfile::tempdir().unwrap();
        assert!(pull(&store, &kek, c.path()).await.unwrap());
        for (f, want) in GEN_FILES.iter().zip(&a_files) {
            assert_eq!(&read(c.path(), &gen_rel(1, f)), want, "{f}");
        }
        assert!(!pull(&store, &kek, c.path()).await.unwrap(), "nothing new");
    }

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

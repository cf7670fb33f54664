//! What the agent holds: X509-SVIDs (its own and its workloads'), the trust
//! bundle and the plan entries it may serve, published as one immutable
//! [`Snapshot`] in a `watch` channel, so every Workload API stream sees a
//! full, consistent state and is woken on each change. Also the on-disk
//! copy of the agent's own SVID (`<data-dir>/private/`, `0700`; the key
//! `0600`), reused after a restart while it is still valid.
//!
//! Private keys live in [`zeroize::Zeroizing`] buffers and have no `Debug`.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

/// File names of the agent's own SVID in its private directory.
pub const SVID_FILE: &str = "svid.pem";
/// Its key (PKCS#8 PEM, `0600`).
pub const KEY_FILE: &str = "svid.key";
/// The CA certificates (PEM).
pub const BUNDLE_FILE: &str = "bundle.pem";
/// The SPIFFE bundle JSON (for JWT bundles while the broker is away).
pub const BUNDLE_JSON_FILE: &str = "bundle.json";
/// A key generated for an enrollment that has not succeeded yet: a retry
/// after a lost response must present the same key (the broker then returns
/// the same certificate instead of refusing a used token).
pub const PENDING_KEY_FILE: &str = "enroll.key";

/// An X509-SVID with its private key.
pub struct Svid {
    /// The SPIFFE ID (the leaf's URI SAN).
    pub spiffe_id: String,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key of the leaf.
    pub key: Zeroizing<Vec<u8>>,
    /// Lowercase hex serial of the leaf.
    pub serial: String,
    /// Leaf NotBefore, Unix ms.
    pub not_before_ms: i64,
    /// Leaf NotAfter, Unix ms.
    pub not_after_ms: i64,
    /// When to renew, Unix ms: half of the lifetime, minus up to a tenth of
    /// it at random, so agents started together do not renew together.
    pub renew_at_ms: i64,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after_ms", &self.not_after_ms)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Builds an SVID from a chain (leaf first) and its PKCS#8 key, checking
    /// that the leaf is an X509-SVID and certifies that key.
    ///
    /// # Errors
    /// Unparsable leaf, no single SPIFFE URI SAN, or a key that does not match.
    pub fn new(chain: Vec<Vec<u8>>, key: Zeroizing<Vec<u8>>) -> anyhow::Result<Self> {
        let leaf = chain
            .first()
            .ok_or_else(|| anyhow!("empty certificate chain"))?;
        let (_, cert) = X509Certificate::from_der(leaf)
            .map_err(|_| anyhow!("leaf certificate does not parse"))?;
        let (spiffe_id, serial) = crate::api::caller::svid_identity(leaf)
            .ok_or_else(|| anyhow!("leaf is not an X509-SVID (one spiffe:// URI SAN)"))?;
        let pair = rcgen::KeyPair::try_from(key.as_slice())
            .map_err(|_| anyhow!("private key is not a usable PKCS#8 key"))?;
        if rcgen::PublicKeyData::der_bytes(&pair) != &*cert.public_key().subject_public_key.data {
            bail!("private key does not match the certificate");
        }
        let not_before_ms = cert.validity().not_before.timestamp().saturating_mul(1000);
        let not_after_ms = cert.validity().not_after.timestamp().saturating_mul(1000);
        let life = not_after_ms.saturating_sub(not_before_ms).max(0);
        let jitter = if life >= 10 {
            rand::random_range(0..life / 10)
        } else {
            0
        };
        Ok(Self {
            spiffe_id,
            chain,
            key,
            serial,
            not_before_ms,
            not_after_ms,
            renew_at_ms: not_before_ms + life / 2 - jitter,
        })
    }

    /// True while `now_ms` is inside the validity period.
    pub fn valid_at(&self, now_ms: i64) -> bool {
        self.not_before_ms <= now_ms && now_ms < self.not_after_ms
    }
}

/// The trust bundle of the agent's trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Trust domain name (no scheme).
    pub trust_domain: String,
    /// DER CA certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWKS of the JWT-SVID keys only (each with `kid`), for FetchJWTBundles.
    pub jwks_json: String,
    /// `spiffe_sequence`.
    pub sequence: u64,
}

impl Bundle {
    /// From the broker's bundle view; the JWKS keeps only `jwt-svid` keys.
    ///
    /// # Errors
    /// The SPIFFE bundle JSON does not parse.
    pub fn from_parts(
        trust_domain: String,
        x509_authorities: Vec<Vec<u8>>,
        spiffe_bundle_json: &str,
        sequence: u64,
    ) -> anyhow::Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(spiffe_bundle_json).context("bundle JSON")?;
        let keys: Vec<serde_json::Value> = v
            .get("keys")
            .and_then(serde_json::Value::as_array)
            .map(|ks| {
                ks.iter()
                    .filter(|k| {
                        k.get("use").and_then(serde_json::Value::as_str) == Some("jwt-svid")
                            && k.get("kid").is_some()
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            trust_domain,
            x509_authorities,
            jwks_json: serde_json::json!({ "keys": keys }).to_string(),
            sequence,
        })
    }

    /// `spiffe://<trust domain>`, the key of Workload API bundle maps.
    pub fn td_id(&self) -> String {
        format!("spiffe://{}", self.trust_domain)
    }

    /// The CA certificates concatenated (the Workload API's bundle encoding).
    pub fn x509_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }
}

/// A plan entry the agent may serve (from `Delegation.ListDelegatedEntries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryView {
    /// The workload SPIFFE ID.
    pub spiffe_id: String,
    /// Selectors a caller must all have.
    pub selectors: Vec<String>,
}

/// A workload's X509-SVID, with the selectors observed when it was asked for
/// (sent again when it is renewed).
#[derive(Debug)]
pub struct WorkloadSvid {
    /// The SVID.
    pub svid: Arc<Svid>,
    /// Observed selectors of the caller that first needed it.
    pub selectors: Vec<String>,
}

/// Everything the Workload API serves, as one immutable value.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// The agent's own SVID, once enrolled.
    pub own: Option<Arc<Svid>>,
    /// Workload SVIDs by SPIFFE ID.
    pub workloads: BTreeMap<String, Arc<WorkloadSvid>>,
    /// The trust bundle, once known.
    pub bundle: Option<Arc<Bundle>>,
    /// The agent's entries; `None` until the first successful sync.
    pub entries: Option<Arc<Vec<EntryView>>>,
}

// === disk ===

/// The agent's directories: `<data>` (`0755`, refused when group/world
/// writable), `<data>/private` (`0700`: keys) and `<data>/public` (`0755`:
/// the default socket, connectable by every local user).
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Private directory.
    pub private: PathBuf,
}

impl Dirs {
    /// Creates (or checks) the data directory layout.
    ///
    /// # Errors
    /// Directories that cannot be created or are writable by others, or a
    /// private directory readable by others.
    pub fn prepare(data_dir: &Path) -> anyhow::Result<Self> {
        mkdir(data_dir, 0o755)?;
        refuse_mode(data_dir, 0o022, "writable by group or others")?;
        let private = data_dir.join("private");
        mkdir(&private, 0o700)?;
        refuse_mode(&private, 0o077, "accessible by group or others")?;
        Ok(Self { private })
    }

    /// Loads the saved SVID, if there is one that parses and matches its key.
    pub fn load_svid(&self) -> Option<Svid> {
        let pem = fs::read_to_string(self.private.join(SVID_FILE)).ok()?;
        let key_pem = Zeroizing::new(fs::read_to_string(self.private.join(KEY_FILE)).ok()?);
        let chain = crate::cli::pem_certs(&pem);
        let key = pem_key_der(&key_pem)?;
        match Svid::new(chain, key) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.private.display(), "ignoring the saved SVID");
                None
            }
        }
    }

    /// Saves the agent's SVID (key `0600`), atomically file by file.
    ///
    /// # Errors
    /// I/O.
    pub fn save_svid(&self, svid: &Svid) -> anyhow::Result<()> {
        write_atomic(
            &self.private.join(KEY_FILE),
            key_pem(&svid.key).as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.private.join(SVID_FILE),
            pem_certs(&svid.chain).as_bytes(),
            0o644,
        )
    }

    /// Saves the bundle (PEM and JSON).
    ///
    /// # Errors
    /// I/O.
    pub fn save_bundle(&self, b: &Bundle, spiffe_bundle_json: &str) -> anyhow::Result<()> {
        write_atomic(
            &self.private.join(BUNDLE_FILE),
            pem_certs(&b.x509_authorities).as_bytes(),
            0o644,
        )?;
        let doc = serde_json::json!({
            "trust_domain": b.trust_domain,
            "sequence": b.sequence,
            "spiffe_bundle": spiffe_bundle_json,
        });
        write_atomic(
            &self.private.join(BUNDLE_JSON_FILE),
            doc.to_string().as_bytes(),
            0o644,
        )
    }

    /// The saved bundle, if any.
    pub fn load_bundle(&self) -> Option<(Bundle, String)> {
        let text = fs::read_to_string(self.private.join(BUNDLE_JSON_FILE)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let td = v.get("trust_domain")?.as_str()?.to_owned();
        let seq = v.get("sequence")?.as_u64()?;
        let json = v.get("spiffe_bundle")?.as_str()?.to_owned();
        let pem = fs::read_to_string(self.private.join(BUNDLE_FILE)).ok()?;
        let b = Bundle::from_parts(td, crate::cli::pem_certs(&pem), &json, seq).ok()?;
        Some((b, json))
    }

    /// The key of an enrollment that has not succeeded yet, or a new one
    /// (saved `0600` before it is used).
    ///
    /// # Errors
    /// Key generation or I/O.
    pub fn pending_key(&self) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let path = self.private.join(PENDING_KEY_FILE);
        if let Ok(pem) = fs::read_to_string(&path) {
            let pem = Zeroizing::new(pem);
            if let Some(k) = pem_key_der(&pem) {
                return Ok(k);
            }
        }
        let (key, _) = crate::cli::new_key_and_csr()?;
        write_atomic(&path, key_pem(&key).as_bytes(), 0o600)?;
        Ok(key)
    }

    /// Forgets the pending enrollment key (after a successful enrollment).
    pub fn clear_pending_key(&self) {
        let _ = fs::remove_file(self.private.join(PENDING_KEY_FILE));
    }
}

fn mkdir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", dir.display()))?;
    }
    Ok(())
}

fn refuse_mode(dir: &Path, forbidden: u32, what: &str) -> anyhow::Result<()> {
    let mode = fs::metadata(dir)
        .with_context(|| format!("stat {}", dir.display()))?
        .permissions()
        .mode();
    if mode & forbidden != 0 {
        bail!(
            "{} is {what} (mode {:o}); fix with chmod {:o} {}",
            dir.display(),
            mode & 0o777,
            (mode & 0o777) & !forbidden,
            dir.display()
        );
    }
    Ok(())
}

/// Writes a file atomically: a temporary file in the same directory, synced,
/// then renamed over the target (readers see the old or the new content).
///
/// # Errors
/// I/O.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("bad file name {}", path.display()))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// PEM of DER certificates.
pub fn pem_certs(ders: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for d in ders {
        pem_block(&mut out, "CERTIFICATE", d);
    }
    out
}

/// PEM of a PKCS#8 DER key (in a zeroizing buffer).
pub fn key_pem(der: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    pem_block(&mut out, "PRIVATE KEY", der);
    out
}

fn pem_block(out: &mut String, label: &str, der: &[u8]) {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
}

/// The DER of the first `PRIVATE KEY` block of a PEM text.
fn pem_key_der(pem: &str) -> Option<Zeroizing<Vec<u8>>> {
    let mut b64 = Zeroizing::new(String::new());
    let mut inside = false;
    for line in pem.lines() {
        let line = line.trim();
        if line == "-----BEGIN PRIVATE KEY-----" {
            inside = true;
        } else if line == "-----END PRIVATE KEY-----" {
            return base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .ok()
                .map(Zeroizing::new);
        } else if inside {
            b64.push_str(line);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_pem_round_trips_and_atomic_write_sets_the_mode() {
        let (key, _) = crate::cli::new_key_and_csr().unwrap();
        let pem = key_pem(&key);
        assert_eq!(pem_key_der(&pem).unwrap().as_slice(), key.as_slice());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        write_atomic(&p, pem.as_bytes(), 0o600).unwrap();
        write_atomic(&p, pem.as_bytes(), 0o600).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn bundle_keeps_only_jwt_keys() {
        let json = r#"{"spiffe_sequence":3,"keys":[
            {"kty":"EC","use":"x509-svid","x5c":["AA=="]},
            {"kty":"EC","use":"jwt-svid","kid":"k1","crv":"P-256","x":"a","y":"b"}]}"#;
        let b = Bundle::from_parts("sigil.local".into(), vec![vec![1], vec![2]], json, 3).unwrap();
        let v: serde_json::Value = serde_json::from_str(&b.jwks_json).unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
        assert_eq!(v["keys"][0]["kid"], "k1");
        assert_eq!(b.td_id(), "spiffe://sigil.local");
        assert_eq!(b.x509_concat(), vec![1, 2]);
    }

    #[test]
    fn data_dir_modes_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("agent");
        let d = Dirs::prepare(&data).unwrap();
        assert_eq!(
            fs::metadata(&d.private).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&d.private, fs::Permissions::from_mode(0o750)).unwrap();
        assert!(Dirs::prepare(&data).is_err());
        fs::set_permissions(&d.private, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(Dirs::prepare(&data).is_err());
    }
}

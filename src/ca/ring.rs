//! Key generations and their rotation: the [`Authority`].
//!
//! A *generation* is one CA key + self-signed CA certificate + one JWT key
//! ([`Ca`]), kept under `<dir>/ca/g<N>/`. The CA and the JWT key of a
//! generation move through the same states together, so relying parties see
//! one schedule and one sequence number:
//!
//! * **prepared** — created and published in the bundle, not yet signing,
//!   at ½ of the active generation's life;
//! * **active** — signs every new X509-SVID and JWT-SVID, from ⅚ of the
//!   previous generation's life;
//! * **retired** — no longer signs, stays in the bundle until everything it
//!   signed has expired (its retirement time + the longest SVID lifetime,
//!   capped by its CA certificate's NotAfter), then is dropped;
//! * **tainted** — retired at once by a compromise rotation: dropped from
//!   the bundle immediately, and everything it signed counts as revoked.
//!
//! Every change bumps `spiffe_sequence`. The manifest `<dir>/ca/ring.json`
//! (no secrets) records states; it is replaced atomically (temp file, fsync,
//! rename). Default CA lifetime: 7 days — long enough that the ⅙ overlap
//! (28 h) outlives the longest SVID a plan may allow (24 h by default),
//! short enough that a stolen CA key ages out within a week.

use std::{
    fs, io,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Ca, CaError, CaOptions, JwtParams, MintedJwt, ValidatedJwt};
use crate::identity::TrustDomain;

/// Default lifetime of a generation's CA certificate: 7 days.
pub const DEFAULT_GENERATION_TTL_SECS: i64 = 7 * 24 * 3600;

/// State of a key generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GenState {
    /// Published, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Published until what it signed expires, not signing.
    Retired,
    /// Out of the bundle.
    Dropped,
}

/// One generation's record in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenMeta {
    /// Generation number (1, 2, …).
    pub id: u32,
    /// State.
    pub state: GenState,
    /// Created, Unix ms.
    pub created_ms: i64,
    /// Became active, Unix ms.
    pub activated_ms: Option<i64>,
    /// Retired, Unix ms.
    pub retired_ms: Option<i64>,
    /// Dropped from the bundle after this instant (set at retirement).
    pub drop_after_ms: Option<i64>,
    /// Retired by a compromise rotation: what it signed is revoked.
    #[serde(default)]
    pub tainted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    sequence: u64,
    generations: Vec<GenMeta>,
}

/// Options of the authority.
#[derive(Debug, Clone, Copy)]
pub struct RingOptions {
    /// CA certificate lifetime of new generations, seconds.
    pub ca_ttl_secs: i64,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            ca_ttl_secs: DEFAULT_GENERATION_TTL_SECS,
        }
    }
}

/// A consistent view of the generations.
#[derive(Debug, Clone)]
pub struct RingView {
    /// `spiffe_sequence`.
    pub sequence: u64,
    /// Every loaded generation with its CA (dropped ones are not loaded).
    pub generations: Vec<(GenMeta, Arc<Ca>)>,
    manifest: Manifest,
}

impl RingView {
    fn published(&self) -> impl Iterator<Item = &(GenMeta, Arc<Ca>)> {
        self.generations
            .iter()
            .filter(|(m, _)| m.state != GenState::Dropped)
    }

    /// The signing generation.
    ///
    /// # Panics
    /// Never: the authority always keeps exactly one active generation.
    pub fn active(&self) -> &Arc<Ca> {
        // Invariant upheld by every transition: one generation is active.
        #[allow(clippy::expect_used)]
        self.generations
            .iter()
            .find(|(m, _)| m.state == GenState::Active)
            .map(|(_, ca)| ca)
            .expect("one generation is always active")
    }

    /// The generation whose CA signs the broker's TLS serving certificate and
    /// whose pin is handed out: the oldest retired generation still
    /// published, else the active one. Clients that pinned or bundled it keep
    /// connecting during a whole overlap.
    pub fn serving(&self) -> &Arc<Ca> {
        self.generations
            .iter()
            .filter(|(m, _)| m.state == GenState::Retired)
            .min_by_key(|(m, _)| m.id)
            .map_or_else(|| self.active(), |(_, ca)| ca)
    }

    /// Published CA certificates (DER), active first.
    pub fn x509_authorities(&self) -> Vec<Vec<u8>> {
        let active = self.active().generation();
        let mut out = vec![self.active().ca_cert_der().to_vec()];
        out.extend(
            self.published()
                .filter(|(m, _)| m.id != active)
                .map(|(_, ca)| ca.ca_cert_der().to_vec()),
        );
        out
    }

    /// The SPIFFE bundle JSON with every published generation's keys.
    pub fn bundle_json(&self, refresh_hint_secs: u64) -> String {
        let keys: Vec<Value> = self
            .published()
            .flat_map(|(_, ca)| ca.bundle_keys())
            .collect();
        json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": refresh_hint_secs,
        })
        .to_string()
    }

    /// A JWK Set with every published JWT key.
    pub fn jwks_json(&self) -> String {
        let keys: Vec<Value> = self.published().map(|(_, ca)| ca.jwks_key()).collect();
        json!({ "keys": keys }).to_string()
    }

    /// Validates a JWT-SVID against every published JWT key (selected by `kid`).
    ///
    /// # Errors
    /// [`CaError::JwtInvalid`] — from the generation whose `kid` matches, or
    /// "unknown kid" when none does.
    pub fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        now_secs: i64,
    ) -> Result<ValidatedJwt, CaError> {
        let kid = jsonwebtoken::decode_header(token).ok().and_then(|h| h.kid);
        for (_, ca) in self.published() {
            if kid.as_deref() == Some(ca.jwt_kid()) {
                return ca.validate_jwt(token, audience, now_secs);
            }
        }
        // Let the active generation produce the precise error (missing kid,
        // bad header, …), falling back to "unknown kid".
        match self.active().validate_jwt(token, audience, now_secs) {
            Err(e) => Err(e),
            Ok(_) => Err(CaError::JwtInvalid("unknown kid".into())),
        }
    }

    /// Tainted generation ids (compromise rotations).
    pub fn tainted(&self) -> Vec<u32> {
        self.manifest
            .generations
            .iter()
            .filter(|m| m.tainted)
            .map(|m| m.id)
            .collect()
    }

    /// The generation with `id`.
    pub fn generation(&self, id: u32) -> Option<&(GenMeta, Arc<Ca>)> {
        self.generations.iter().find(|(m, _)| m.id == id)
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    /// The generation that was active before.
    pub old: u32,
    /// The generation active now.
    pub new: u32,
}

/// The rotating signing authority of one trust domain.
pub struct Authority {
    dir: PathBuf,
    trust_domain: TrustDomain,
    opts: RingOptions,
    view: RwLock<Arc<RingView>>,
    /// Serialises transitions (manifest writes).
    write: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("trust_domain", &self.trust_domain.as_str())
            .field("sequence", &self.view().sequence)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Authority {
    /// Loads the generations under `<data_dir>/ca/`, creating generation 1
    /// (active) on first boot. Returns whether it was created.
    ///
    /// # Errors
    /// Key/certificate problems of any generation, or an unreadable manifest.
    pub fn load_or_create(
        data_dir: &Path,
        trust_domain: &TrustDomain,
        now_ms: i64,
        opts: RingOptions,
    ) -> Result<(Self, bool), CaError> {
        let dir = data_dir.join("ca");
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let manifest_path = dir.join("ring.json");
        let (manifest, created) = match fs::read(&manifest_path) {
            Ok(bytes) => (
                serde_json::from_slice::<Manifest>(&bytes).map_err(|e| {
                    CaError::Certificate(format!("{}: {e}", manifest_path.display()))
                })?,
                false,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                Manifest {
                    sequence: 1,
                    generations: vec![GenMeta {
                        id: 1,
                        state: GenState::Active,
                        created_ms: now_ms,
                        activated_ms: Some(now_ms),
                        retired_ms: None,
                        drop_after_ms: None,
                        tainted: false,
                    }],
                },
                true,
            ),
            Err(e) => return Err(io_err(&manifest_path)(e)),
        };
        if manifest
            .generations
            .iter()
            .filter(|g| g.state == GenState::Active)
            .count()
            != 1
        {
            return Err(CaError::Certificate(format!(
                "{}: exactly one generation must be active",
                manifest_path.display()
            )));
        }
        let a = Self {
            dir,
            trust_domain: trust_domain.clone(),
            opts,
            view: RwLock::new(Arc::new(RingView {
                sequence: 0,
                generations: Vec::new(),
                manifest: Manifest::default(),
            })),
            write: std::sync::Mutex::new(()),
        };
        let view = a.build_view(&manifest, now_ms)?;
        if created {
            a.save(&manifest)?;
        }
        *a.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        Ok((a, created))
    }

    fn gen_dir(&self, id: u32) -> PathBuf {
        self.dir.join(format!("g{id}"))
    }

    fn load_gen(&self, id: u32, now_ms: i64) -> Result<Ca, CaError> {
        let (mut ca, _) = Ca::load_or_create(
            &self.gen_dir(id),
            &self.trust_domain,
            now_ms,
            CaOptions {
                ca_ttl_secs: self.opts.ca_ttl_secs,
            },
        )?;
        ca.generation = id;
        Ok(ca)
    }

    fn build_view(&self, m: &Manifest, now_ms: i64) -> Result<RingView, CaError> {
        let mut generations = Vec::with_capacity(m.generations.len());
        for g in &m.generations {
            // Dropped generations are not loaded: their CA may have expired.
            if g.state == GenState::Dropped {
                continue;
            }
            let ca = Arc::new(self.load_gen(g.id, now_ms)?);
            generations.push((g.clone(), ca));
        }
        Ok(RingView {
            sequence: m.sequence,
            generations,
            manifest: m.clone(),
        })
    }

    fn save(&self, m: &Manifest) -> Result<(), CaError> {
        let path = self.dir.join("ring.json");
        let tmp = self.dir.join("ring.json.tmp");
        let bytes = serde_json::to_vec_pretty(m)
            .map_err(|e| CaError::Certificate(format!("manifest: {e}")))?;
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The current view (cheap: an `Arc` clone).
    pub fn view(&self) -> Arc<RingView> {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The signing generation.
    pub fn active(&self) -> Arc<Ca> {
        self.view().active().clone()
    }

    /// Mints a JWT-SVID with the active generation.
    ///
    /// # Errors
    /// As [`Ca::mint_jwt`].
    pub fn mint_jwt(&self, p: &JwtParams<'_>) -> Result<MintedJwt, CaError> {
        self.active().mint_jwt(p)
    }

    fn manifest(&self) -> Manifest {
        self.view().manifest.clone()
    }

    fn commit(&self, mut m: Manifest, now_ms: i64) -> Result<(), CaError> {
        m.sequence += 1;
        let view = self.build_view(&m, now_ms)?;
        self.save(&m)?;
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        Ok(())
    }

    fn new_generation(&self, m: &mut Manifest, now_ms: i64) -> Result<u32, CaError> {
        let id = m.generations.iter().map(|g| g.id).max().unwrap_or(0) + 1;
        // Create the key material now, so a failure leaves the manifest untouched.
        self.load_gen(id, now_ms)?;
        m.generations.push(GenMeta {
            id,
            state: GenState::Prepared,
            created_ms: now_ms,
            activated_ms: None,
            retired_ms: None,
            drop_after_ms: None,
            tainted: false,
        });
        Ok(id)
    }

    fn activate(
        m: &mut Manifest,
        id: u32,
        now_ms: i64,
        max_svid_ttl_secs: i64,
        ca_not_after_ms: i64,
        taint: bool,
    ) {
        for g in &mut m.generations {
            if g.state == GenState::Active {
                g.state = if taint {
                    GenState::Dropped
                } else {
                    GenState::Retired
                };
                g.retired_ms = Some(now_ms);
                g.tainted = taint;
                g.drop_after_ms = Some(
                    now_ms
                        .saturating_add(max_svid_ttl_secs.saturating_mul(1000))
                        .min(ca_not_after_ms),
                );
            }
        }
        for g in &mut m.generations {
            if g.id == id {
                g.state = GenState::Active;
                g.activated_ms = Some(now_ms);
            }
        }
    }

    /// Applies the schedule at `now_ms`: prepare at ½ of the active
    /// generation's life, activate at ⅚, drop retired generations whose
    /// signatures have all expired. Returns whether anything changed.
    ///
    /// # Errors
    /// Key generation or manifest write failures (state is unchanged).
    pub fn tick(&self, now_ms: i64, max_svid_ttl_secs: i64) -> Result<bool, CaError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let view = self.view();
        let active = view.active().clone();
        let mut m = self.manifest();
        let mut changed = false;
        let created = m
            .generations
            .iter()
            .find(|g| g.state == GenState::Active)
            .and_then(|g| g.activated_ms.or(Some(g.created_ms)))
            .unwrap_or(now_ms);
        let life = active.ca_not_after_ms().saturating_sub(created).max(1);
        let prepared = m
            .generations
            .iter()
            .find(|g| g.state == GenState::Prepared)
            .map(|g| g.id);
        if prepared.is_none() && now_ms >= created + life / 2 {
            self.new_generation(&mut m, now_ms)?;
            changed = true;
        } else if let Some(p) = prepared {
            if now_ms >= created + life * 5 / 6 {
                Self::activate(
                    &mut m,
                    p,
                    now_ms,
                    max_svid_ttl_secs,
                    active.ca_not_after_ms(),
                    false,
                );
                changed = true;
            }
        }
        for g in &mut m.generations {
            if g.state == GenState::Retired && g.drop_after_ms.is_some_and(|t| now_ms >= t) {
                g.state = GenState::Dropped;
                changed = true;
            }
        }
        if changed {
            self.commit(m, now_ms)?;
        }
        Ok(changed)
    }

    /// Forces a rotation now: the prepared generation (created now if there
    /// is none) becomes active. With `taint`, the old generation leaves the
    /// bundle at once and what it signed counts as revoked.
    ///
    /// # Errors
    /// Key generation or manifest write failures (state is unchanged).
    pub fn rotate_now(
        &self,
        now_ms: i64,
        max_svid_ttl_secs: i64,
        taint: bool,
    ) -> Result<Rotated, CaError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let active = self.active();
        let mut m = self.manifest();
        let new = match m.generations.iter().find(|g| g.state == GenState::Prepared) {
            Some(g) => g.id,
            None => self.new_generation(&mut m, now_ms)?,
        };
        Self::activate(
            &mut m,
            new,
            now_ms,
            max_svid_ttl_secs,
            active.ca_not_after_ms(),
            taint,
        );
        self.commit(m, now_ms)?;
        Ok(Rotated {
            old: active.generation(),
            new,
        })
    }

    /// Re-reads the manifest and generations from disk (another replica's
    /// rotation was pulled into the data dir). Returns whether the view changed.
    ///
    /// # Errors
    /// Unreadable manifest or key material (the old view stays).
    pub fn reload(&self, now_ms: i64) -> Result<bool, CaError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let path = self.dir.join("ring.json");
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| CaError::Certificate(format!("{}: {e}", path.display())))?;
        let current = self.view();
        // The key files are compared too, not only the manifest: replicas that
        // created generation 1 at the same instant write identical manifests,
        // and the one that lost the race must switch to the winner's keys.
        let view = self.build_view(&m, now_ms)?;
        let pins = |v: &RingView| -> Vec<(u32, String, String)> {
            v.generations
                .iter()
                .map(|(g, ca)| (g.id, ca.ca_pin().to_owned(), ca.jwt_kid().to_owned()))
                .collect()
        };
        if current.manifest.sequence == m.sequence
            && serde_json::to_vec(&current.manifest).ok() == serde_json::to_vec(&m).ok()
            && pins(&current) == pins(&view)
        {
            return Ok(false);
        }
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        Ok(true)
    }

    /// Prepares (publishes) the next generation now without activating it.
    /// Returns its id (the existing one if already prepared).
    ///
    /// # Errors
    /// Key generation or manifest write failures.
    pub fn prepare_now(&self, now_ms: i64) -> Result<u32, CaError> {
        let _w = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut m = self.manifest();
        if let Some(g) = m.generations.iter().find(|g| g.state == GenState::Prepared) {
            return Ok(g.id);
        }
        let id = self.new_generation(&mut m, now_ms)?;
        self.commit(m, now_ms)?;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_767_225_600_000;
    const DAY: i64 = 86_400_000;

    fn td() -> TrustDomain {
        TrustDomain::parse("example.org").unwrap()
    }

    fn kinds(v: &RingView) -> Vec<(u32, GenState)> {
        v.generations.iter().map(|(m, _)| (m.id, m.state)).collect()
    }

    #[test]
    fn schedule_prepares_at_half_activates_at_five_sixths_and_drops_after_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) =
            Authority::load_or_create(dir.path(), &td(), T0, RingOptions::default()).unwrap();
        assert!(created);
        let seq0 = a.view().sequence;
        assert!(!a.tick(T0 + DAY, 86_400).unwrap());
        assert!(a.tick(T0 + 7 * DAY / 2 + 60_000, 86_400).unwrap());
        let v = a.view();
        assert_eq!(
            kinds(&v),
            vec![(1, GenState::Active), (2, GenState::Prepared)]
        );
        assert_eq!(v.x509_authorities().len(), 2, "prepared CA published");
        let bundle: Value = serde_json::from_str(&v.bundle_json(300)).unwrap();
        assert_eq!(bundle["keys"].as_array().unwrap().len(), 4);
        assert!(v.sequence > seq0);
        let prepared_kid = v.generation(2).unwrap().1.jwt_kid().to_owned();

        let act = T0 + 7 * DAY * 5 / 6 + 60_000;
        assert!(a.tick(act, 86_400).unwrap());
        let v = a.view();
        assert_eq!(v.active().generation(), 2);
        assert_eq!(v.active().jwt_kid(), prepared_kid);
        assert_eq!(
            kinds(&v),
            vec![(1, GenState::Retired), (2, GenState::Active)]
        );
        // Old generation stays until everything it signed expired.
        assert!(!a.tick(act + DAY - 1000, 86_400).unwrap());
        assert!(a.tick(act + DAY, 86_400).unwrap());
        let v = a.view();
        assert_eq!(v.x509_authorities().len(), 1);
        assert_eq!(v.generations.len(), 1, "dropped generation not loaded");

        // Survives reload.
        let (b, created) =
            Authority::load_or_create(dir.path(), &td(), act + DAY, RingOptions::default())
                .unwrap();
        assert!(!created);
        assert_eq!(b.view().sequence, v.sequence);
        assert_eq!(b.active().ca_pin(), v.active().ca_pin());
    }

    /// Two replicas that create generation 1 at the same instant write
    /// identical manifests; the one whose keys lost the publish race gets the
    /// winner's key files pulled into its dir and must switch to them.
    #[test]
    fn reload_adopts_replaced_keys_under_an_identical_manifest() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, _) =
            Authority::load_or_create(da.path(), &td(), T0, RingOptions::default()).unwrap();
        let (b, _) =
            Authority::load_or_create(db.path(), &td(), T0, RingOptions::default()).unwrap();
        assert_eq!(
            fs::read(da.path().join("ca/ring.json")).unwrap(),
            fs::read(db.path().join("ca/ring.json")).unwrap(),
            "same instant, same manifest"
        );
        assert_ne!(a.active().ca_pin(), b.active().ca_pin());
        assert!(!a.reload(T0).unwrap(), "nothing changed on disk");
        for f in ["ca.key", "ca.crt", "jwt.key"] {
            let rel = format!("ca/g1/{f}");
            fs::copy(db.path().join(&rel), da.path().join(&rel)).unwrap();
        }
        assert!(a.reload(T0).unwrap());
        assert_eq!(a.active().ca_pin(), b.active().ca_pin());
        assert_eq!(a.active().jwt_kid(), b.active().jwt_kid());
        assert!(!a.reload(T0).unwrap());
    }

    #[test]
    fn forced_rotation_with_taint_drops_old_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) =
            Authority::load_or_create(dir.path(), &td(), T0, RingOptions::default()).unwrap();
        let r = a.rotate_now(T0 + 1000, 86_400, false).unwrap();
        assert_eq!((r.old, r.new), (1, 2));
        assert_eq!(a.view().x509_authorities().len(), 2);
        let r = a.rotate_now(T0 + 2000, 86_400, true).unwrap();
        assert_eq!((r.old, r.new), (2, 3));
        let v = a.view();
        assert_eq!(v.tainted(), vec![2]);
        // Generation 1 (retired, not tainted) and 3 (active) remain.
        assert_eq!(v.x509_authorities().len(), 2);
        assert!(v.generation(2).is_none());
    }
}

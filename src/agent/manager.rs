//! The agent's state machine: it obtains its own SVID (saved one, or the
//! bootstrap credential), renews it and every workload SVID at half-life
//! (with jitter), syncs the bundle and its plan entries, retries failures
//! with capped exponential backoff, and answers the Workload API's
//! question "which identities does this caller get?".
//!
//! One scheduler task owns all renewals; Workload API calls may mint a
//! missing workload SVID on demand (serialised by one lock). Every change is
//! published as a new [`Snapshot`], which wakes the Workload API streams.
//!
//! Time: due dates (half-life) come from the injected [`Clock`], so tests
//! move time instead of sleeping; retry delays are real time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{watch, Notify},
    time::Instant,
};
use zeroize::Zeroizing;

use super::{
    files::FileOutputs,
    selectors,
    state::{Bundle, Dirs, EntryView, Snapshot, Svid, WorkloadSvid},
    upstream::{Bootstrap, Issued, Upstream, UpstreamError},
};
use crate::clock::Clock;

/// Most cached JWT-SVIDs (the cache is cleared when it grows past this).
const MAX_CACHED_JWTS: usize = 1024;
/// File holding the last synced entries (so a restart while the broker is
/// away still knows who may get what).
const ENTRIES_FILE: &str = "entries.json";

/// Why a Workload API call cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeError {
    /// The caller is entitled to nothing (or not to what it asked for).
    Denied(String),
    /// Not now: no SVID yet, or the broker is needed and unreachable.
    Unavailable(String),
}

/// One identity a caller gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The agent's own SVID.
    Own,
    /// A workload entry's SVID.
    Workload(String),
}

/// Capped exponential backoff with ±20 % jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Consecutive failures.
    pub failures: u32,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// The delay before the next attempt, after a failure.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let factor = rand::random_range(0.8..1.2);
        base.mul_f64(factor).min(self.max)
    }

    /// Back to `min` after a success; returns the failures it had seen.
    pub fn succeed(&mut self) -> u32 {
        self.next = self.min;
        std::mem::take(&mut self.failures)
    }
}

/// Tunables of the scheduler.
#[derive(Debug, Clone)]
pub struct Timing {
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often the bundle and the entries are synced.
    pub sync_interval: Duration,
    /// Longest sleep of the scheduler between checks of its due dates.
    pub poll: Duration,
}

struct CachedJwt {
    token: Zeroizing<String>,
    fetched_ms: i64,
    exp_ms: i64,
}

/// Health, for logs, status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Consecutive failed attempts to reach or use the broker.
    pub failures: u32,
    /// The last failure, if the broker is currently failing.
    pub last_error: Option<String>,
}

/// State shared by the scheduler and the Workload API.
pub struct Shared {
    pub(super) clock: Arc<dyn Clock>,
    pub(super) upstream: Upstream,
    pub(super) dirs: Dirs,
    pub(super) bootstrap: Bootstrap,
    pub(super) default_selectors: Vec<String>,
    pub(super) state: watch::Sender<Arc<Snapshot>>,
    pub(super) wake: Notify,
    pub(super) stop: watch::Receiver<bool>,
    mint_lock: tokio::sync::Mutex<()>,
    jwts: Mutex<HashMap<(String, Vec<String>), CachedJwt>>,
    health: Mutex<Health>,
    /// CA certificates returned with the last own SVID (for `--write-dir`
    /// before the first bundle sync).
    last_roots: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Assembles the shared state, loading what the data dir holds.
    pub fn new(
        clock: Arc<dyn Clock>,
        upstream: Upstream,
        dirs: Dirs,
        bootstrap: Bootstrap,
        default_selectors: Vec<String>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let mut snap = Snapshot::default();
        if let Some((b, _)) = dirs.load_bundle() {
            upstream.trust_bundle(&b.x509_authorities);
            snap.bundle = Some(Arc::new(b));
        }
        snap.entries = load_entries(&dirs).map(Arc::new);
        match dirs.load_svid() {
            Some(s) if s.valid_at(clock.now_ms()) => {
                tracing::info!(spiffe_id = %s.spiffe_id, serial = %s.serial, not_after_ms = s.not_after_ms, "reusing the saved SVID");
                snap.own = Some(Arc::new(s));
            }
            Some(s) => {
                tracing::info!(spiffe_id = %s.spiffe_id, serial = %s.serial, "the saved SVID has expired");
            }
            None => {}
        }
        let (state, _) = watch::channel(Arc::new(snap));
        Self {
            clock,
            upstream,
            dirs,
            bootstrap,
            default_selectors,
            state,
            wake: Notify::new(),
            stop,
            mint_lock: tokio::sync::Mutex::new(()),
            jwts: Mutex::new(HashMap::new()),
            health: Mutex::new(Health::default()),
            last_roots: Mutex::new(Vec::new()),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.borrow().clone()
    }

    /// Publishes a changed snapshot.
    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.state.send_modify(|s| {
            let mut next = (**s).clone();
            f(&mut next);
            *s = Arc::new(next);
        });
    }

    /// Current health.
    pub fn health(&self) -> Health {
        lock(&self.health).clone()
    }

    fn failed(&self, what: &str, e: &UpstreamError) {
        let mut h = lock(&self.health);
        h.failures = h.failures.saturating_add(1);
        h.last_error = Some(format!("{what}: {e}"));
        match e {
            UpstreamError::Local(_) => {
                tracing::warn!(what, error = %e, failures = h.failures, "agent error; will retry (still serving what is valid)");
            }
            _ => {
                tracing::warn!(what, error = %e, failures = h.failures, "broker call failed; will retry (still serving what is valid)");
            }
        }
    }

    fn recovered(&self) {
        let mut h = lock(&self.health);
        if h.failures > 0 {
            tracing::info!(failures = h.failures, "broker reachable again");
        }
        *h = Health::default();
    }

    // === who gets what ===

    /// The identities `observed` selectors entitle a caller to, default first:
    /// the plan entries it matches (most specific first); else the agent's
    /// own identity if it matches a default selector; else nothing.
    ///
    /// # Errors
    /// `Denied` for nothing; `Unavailable` before the first entry sync.
    pub fn resolve(&self, snap: &Snapshot, observed: &[String]) -> Result<Vec<Target>, ServeError> {
        let Some(entries) = &snap.entries else {
            return Err(ServeError::Unavailable(
                "the agent has not synced with the broker yet".into(),
            ));
        };
        let mut matched: Vec<&EntryView> = entries
            .iter()
            .filter(|e| selectors::all_present(&e.selectors, observed))
            .collect();
        matched.sort_by(|a, b| {
            b.selectors
                .len()
                .cmp(&a.selectors.len())
                .then_with(|| a.spiffe_id.cmp(&b.spiffe_id))
        });
        let mut out: Vec<Target> = Vec::new();
        for e in matched {
            let t = Target::Workload(e.spiffe_id.clone());
            if !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() && selectors::any_present(&self.default_selectors, observed) {
            out.push(Target::Own);
        }
        if out.is_empty() {
            // "no identity issued" is the wording SPIFFE clients recognise.
            return Err(ServeError::Denied(
                "no identity issued: no plan entry or default selector matches this caller".into(),
            ));
        }
        Ok(out)
    }

    fn own_valid(&self) -> Result<Arc<Svid>, ServeError> {
        let now = self.clock.now_ms();
        self.snapshot()
            .own
            .clone()
            .filter(|s| s.valid_at(now))
            .ok_or_else(|| ServeError::Unavailable("the agent has no valid SVID yet".into()))
    }

    /// The X509-SVIDs for `targets`, minting missing workload SVIDs now.
    ///
    /// # Errors
    /// `Unavailable` when none can be had (broker away, agent not enrolled),
    /// `Denied` when the broker refused every one.
    pub async fn x509_for(
        &self,
        targets: &[Target],
        observed: &[String],
    ) -> Result<Vec<Arc<Svid>>, ServeError> {
        let mut out = Vec::new();
        let mut last = None;
        for t in targets {
            let r = match t {
                Target::Own => self.own_valid(),
                Target::Workload(id) => self.workload_svid(id, observed).await,
            };
            match r {
                Ok(s) => out.push(s),
                Err(e) => last = Some(e),
            }
        }
        match (out.is_empty(), last) {
            (false, _) => Ok(out),
            (true, Some(e)) => Err(e),
            (true, None) => Err(ServeError::Denied("no identity issued".into())),
        }
    }

    async fn workload_svid(&self, id: &str, observed: &[String]) -> Result<Arc<Svid>, ServeError> {
        let now = self.clock.now_ms();
        let cached = |s: &Snapshot| {
            s.workloads
                .get(id)
                .filter(|w| w.svid.valid_at(now))
                .map(|w| w.svid.clone())
        };
        if let Some(svid) = cached(&self.snapshot()) {
            return Ok(svid);
        }
        let _one = self.mint_lock.lock().await;
        if let Some(svid) = cached(&self.snapshot()) {
            return Ok(svid);
        }
        let own = self.own_valid()?;
        match self.upstream.mint_x509(&own, id, observed).await {
            Ok(svid) => {
                self.recovered();
                tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, not_after_ms = svid.not_after_ms, "workload SVID issued");
                let svid = Arc::new(svid);
                let w = Arc::new(WorkloadSvid {
                    svid: svid.clone(),
                    selectors: observed.to_vec(),
                });
                let id = id.to_owned();
                self.update(move |s| {
                    s.workloads.insert(id, w);
                });
                Ok(svid)
            }
            Err(e) => Err(self.serve_error("mint workload SVID", &e)),
        }
    }

    fn serve_error(&self, what: &str, e: &UpstreamError) -> ServeError {
        match e {
            UpstreamError::Refused { reason, .. } => {
                tracing::warn!(what, reason = %reason, "broker refused");
                // The plan may have changed: sync soon.
                self.wake.notify_one();
                ServeError::Denied(format!("the broker refused: {reason}"))
            }
            other => {
                self.failed(what, other);
                ServeError::Unavailable("the broker is unreachable".into())
            }
        }
    }

    /// JWT-SVIDs for `targets` and `audiences`, from the cache while they
    /// are younger than half their life.
    ///
    /// # Errors
    /// As for [`Shared::x509_for`].
    pub async fn jwt_for(
        &self,
        targets: &[Target],
        audiences: &[String],
        observed: &[String],
    ) -> Result<Vec<(String, Zeroizing<String>)>, ServeError> {
        let mut aud = audiences.to_vec();
        aud.sort();
        aud.dedup();
        let own = self.own_valid()?;
        let mut out = Vec::new();
        let mut last = None;
        for t in targets {
            let id = match t {
                Target::Own => own.spiffe_id.clone(),
                Target::Workload(id) => id.clone(),
            };
            let now = self.clock.now_ms();
            let key = (id.clone(), aud.clone());
            let hit = lock(&self.jwts).get(&key).and_then(|c| {
                (now < c.fetched_ms + (c.exp_ms - c.fetched_ms) / 2).then(|| c.token.clone())
            });
            if let Some(tok) = hit {
                out.push((id, tok));
                continue;
            }
            let r = match t {
                Target::Own => self.upstream.fetch_jwt(&own, &aud).await,
                Target::Workload(id) => self.upstream.mint_jwt(&own, id, &aud, observed).await,
            };
            match r {
                Ok((tok, exp_s)) => {
                    self.recovered();
                    let mut cache = lock(&self.jwts);
                    if cache.len() >= MAX_CACHED_JWTS {
                        cache.clear();
                    }
                    cache.insert(
                        key,
                        CachedJwt {
                            token: tok.clone(),
                            fetched_ms: now,
                            exp_ms: exp_s.saturating_mul(1000),
                        },
                    );
                    out.push((id, tok));
                }
                Err(e) => last = Some(self.serve_error("JWT-SVID", &e)),
            }
        }
        match (out.is_empty(), last) {
            (false, _) => Ok(out),
            (true, Some(e)) => Err(e),
            (true, None) => Err(ServeError::Denied("no identity issued".into())),
        }
    }

    // === own SVID ===

    fn bootstrap_usable(&self) -> bool {
        match &self.bootstrap {
            Bootstrap::TokenFile(p) => p.exists(),
            Bootstrap::Attestation { .. } => true,
            Bootstrap::None => false,
        }
    }

    /// Renews the own SVID, or enrolls when there is none (or it can no
    /// longer be renewed and a credential is at hand).
    async fn refresh_own(&self) -> Result<(), UpstreamError> {
        let now = self.clock.now_ms();
        let current = self.snapshot().own.clone().filter(|s| s.valid_at(now));
        let issued = match current {
            Some(cur) => match self.upstream.renew(&cur).await {
                Ok(i) => {
                    tracing::info!(spiffe_id = %i.svid.spiffe_id, serial = %i.svid.serial, old_serial = %cur.serial, not_after_ms = i.svid.not_after_ms, "SVID renewed");
                    i
                }
                Err(e @ UpstreamError::Refused { .. }) if self.bootstrap_usable() => {
                    tracing::warn!(error = %e, "renewal refused; enrolling again with the bootstrap credential");
                    self.enroll().await?
                }
                Err(e) => return Err(e),
            },
            None => self.enroll().await?,
        };
        self.install_own(issued);
        Ok(())
    }

    async fn enroll(&self) -> Result<Issued, UpstreamError> {
        let key = self
            .dirs
            .pending_key()
            .map_err(|e| UpstreamError::Local(format!("enrollment key: {e:#}")))?;
        let issued = self.upstream.enroll(&self.bootstrap, key).await?;
        self.dirs.clear_pending_key();
        tracing::info!(spiffe_id = %issued.svid.spiffe_id, serial = %issued.svid.serial, not_after_ms = issued.svid.not_after_ms, "enrolled");
        if let Bootstrap::TokenFile(p) = &self.bootstrap {
            match std::fs::remove_file(p) {
                Ok(()) => {
                    tracing::info!(file = %p.display(), "enrollment token used; token file deleted")
                }
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "could not delete the used token file")
                }
            }
        }
        Ok(issued)
    }

    fn install_own(&self, issued: Issued) {
        let Issued { svid, trust_bundle } = issued;
        if let Err(e) = self.dirs.save_svid(&svid) {
            tracing::error!(error = %e, "could not save the SVID (a restart will need a new credential)");
        }
        self.upstream.trust_bundle(&trust_bundle);
        *lock(&self.last_roots) = trust_bundle;
        let svid = Arc::new(svid);
        self.update(move |s| {
            s.own = Some(svid);
        });
    }

    // === sync ===

    async fn sync(&self, files: Option<&FileOutputs>) -> Result<(), UpstreamError> {
        let own = self
            .own_valid()
            .map_err(|_| UpstreamError::Local("no valid SVID".into()))?;
        let (bundle, json) = self.upstream.bundle(&own).await?;
        let entries = self.upstream.entries(&own).await?;
        let snap = self.snapshot();
        let bundle_changed = snap.bundle.as_deref() != Some(&bundle);
        let entries_changed = snap.entries.as_deref() != Some(&entries);
        if bundle_changed {
            tracing::info!(
                sequence = bundle.sequence,
                authorities = bundle.x509_authorities.len(),
                "trust bundle updated"
            );
            self.upstream.trust_bundle(&bundle.x509_authorities);
            if let Err(e) = self.dirs.save_bundle(&bundle, &json) {
                tracing::warn!(error = %e, "could not save the bundle");
            }
            if let Some(f) = files {
                if let Err(e) = f.write_bundle(&bundle) {
                    tracing::error!(error = %e, "could not write bundle.pem");
                }
            }
        }
        if entries_changed {
            tracing::info!(entries = entries.len(), "workload entries updated");
            save_entries(&self.dirs, &entries);
        }
        if bundle_changed || entries_changed {
            let b = Arc::new(bundle);
            let e = Arc::new(entries);
            self.update(move |s| {
                if bundle_changed {
                    s.bundle = Some(b);
                }
                if entries_changed {
                    // Workload SVIDs whose entry left the plan are no longer served.
                    s.workloads
                        .retain(|id, _| e.iter().any(|en| &en.spiffe_id == id));
                    s.entries = Some(e);
                }
            });
        }
        Ok(())
    }

    async fn renew_workload(&self, id: &str, w: &WorkloadSvid) -> Result<(), UpstreamError> {
        let own = self
            .own_valid()
            .map_err(|_| UpstreamError::Local("no valid SVID".into()))?;
        let _one = self.mint_lock.lock().await;
        let svid = self.upstream.mint_x509(&own, id, &w.selectors).await?;
        tracing::info!(spiffe_id = %svid.spiffe_id, serial = %svid.serial, old_serial = %w.svid.serial, "workload SVID renewed");
        let nw = Arc::new(WorkloadSvid {
            svid: Arc::new(svid),
            selectors: w.selectors.clone(),
        });
        let id = id.to_owned();
        self.update(move |s| {
            s.workloads.insert(id, nw);
        });
        Ok(())
    }
}

fn load_entries(dirs: &Dirs) -> Option<Vec<EntryView>> {
    let text = std::fs::read_to_string(dirs.private.join(ENTRIES_FILE)).ok()?;
    let v: Vec<(String, Vec<String>)> = serde_json::from_str(&text).ok()?;
    Some(
        v.into_iter()
            .map(|(spiffe_id, selectors)| EntryView {
                spiffe_id,
                selectors,
            })
            .collect(),
    )
}

fn save_entries(dirs: &Dirs, entries: &[EntryView]) {
    let v: Vec<(&str, &[String])> = entries
        .iter()
        .map(|e| (e.spiffe_id.as_str(), e.selectors.as_slice()))
        .collect();
    let text = serde_json::to_string(&v).unwrap_or_default();
    if let Err(e) =
        super::state::write_atomic(&dirs.private.join(ENTRIES_FILE), text.as_bytes(), 0o600)
    {
        tracing::warn!(error = %e, "could not save the entries");
    }
}

/// The scheduler: runs until the stop signal.
pub async fn run(
    shared: Arc<Shared>,
    timing: Timing,
    files: Option<FileOutputs>,
    jwt_audiences: Vec<String>,
) {
    let mut stop = shared.stop.clone();
    let mut own_backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    let mut own_retry = Instant::now();
    let mut sync_backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    let mut next_sync = Instant::now();
    let mut wl_retry: HashMap<String, (Backoff, Instant)> = HashMap::new();
    let mut file_jwt: Option<(i64, i64)> = None;
    let mut file_jwt_retry = (
        Backoff::new(timing.backoff_min, timing.backoff_max),
        Instant::now(),
    );
    // Serial of the SVID last written to --write-dir (a reused one too).
    let mut files_written_for: Option<String> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let now = shared.clock.now_ms();

        // 1. The agent's own SVID.
        let snap = shared.snapshot();
        let due = snap.own.as_ref().is_none_or(|s| now >= s.renew_at_ms);
        if due && Instant::now() >= own_retry {
            match shared.refresh_own().await {
                Ok(()) => {
                    own_backoff.succeed();
                    shared.recovered();
                    next_sync = Instant::now();
                    file_jwt = None;
                }
                Err(e) => {
                    own_retry = Instant::now() + own_backoff.fail();
                    shared.failed("renew the agent SVID", &e);
                }
            }
        }
        let snap = shared.snapshot();
        if let (Some(f), Some(own)) = (files.as_ref(), snap.own.as_ref()) {
            if files_written_for.as_deref() != Some(own.serial.as_str()) {
                let bundle = match snap.bundle.as_ref() {
                    Some(b) => b.x509_authorities.clone(),
                    None => lock(&shared.last_roots).clone(),
                };
                match f.write_svid(own, &bundle) {
                    Ok(()) => files_written_for = Some(own.serial.clone()),
                    Err(e) => tracing::error!(error = %e, "could not write the --write-dir files"),
                }
            }
        }

        // 2. Bundle and entries.
        if snap.own.as_ref().is_some_and(|s| s.valid_at(now)) && Instant::now() >= next_sync {
            match shared.sync(files.as_ref()).await {
                Ok(()) => {
                    sync_backoff.succeed();
                    shared.recovered();
                    next_sync = Instant::now() + timing.sync_interval;
                }
                Err(e) => {
                    next_sync = Instant::now() + sync_backoff.fail();
                    shared.failed("sync bundle and entries", &e);
                }
            }
        }

        // 3. Workload SVIDs: renew at half-life, drop the expired.
        let snap = shared.snapshot();
        let expired: Vec<String> = snap
            .workloads
            .iter()
            .filter(|(_, w)| now >= w.svid.not_after_ms)
            .map(|(id, _)| id.clone())
            .collect();
        if !expired.is_empty() {
            tracing::warn!(
                ?expired,
                "workload SVIDs expired before renewal; no longer served"
            );
            shared.update(|s| s.workloads.retain(|id, _| !expired.contains(id)));
        }
        for (id, w) in &snap.workloads {
            if now < w.svid.renew_at_ms || expired.contains(id) {
                continue;
            }
            let entry = wl_retry.entry(id.clone()).or_insert_with(|| {
                (
                    Backoff::new(timing.backoff_min, timing.backoff_max),
                    Instant::now(),
                )
            });
            if Instant::now() < entry.1 {
                continue;
            }
            match shared.renew_workload(id, w).await {
                Ok(()) => {
                    wl_retry.remove(id);
                    shared.recovered();
                }
                Err(UpstreamError::Refused { reason, .. }) => {
                    tracing::warn!(spiffe_id = %id, reason = %reason, "workload SVID renewal refused; no longer served");
                    let id2 = id.clone();
                    shared.update(move |s| {
                        s.workloads.remove(&id2);
                    });
                    wl_retry.remove(id);
                    next_sync = Instant::now();
                }
                Err(e) => {
                    entry.1 = Instant::now() + entry.0.fail();
                    shared.failed("renew a workload SVID", &e);
                }
            }
        }
        wl_retry.retain(|id, _| snap.workloads.contains_key(id));

        // 4. The --write-dir JWT.
        if let (Some(f), false) = (files.as_ref(), jwt_audiences.is_empty()) {
            let fresh = file_jwt.is_some_and(|(fetched, exp)| now < fetched + (exp - fetched) / 2);
            if !fresh && Instant::now() >= file_jwt_retry.1 {
                if let Ok(own) = shared.own_valid() {
                    match shared.upstream.fetch_jwt(&own, &jwt_audiences).await {
                        Ok((tok, exp_s)) => {
                            file_jwt_retry.0.succeed();
                            file_jwt = Some((now, exp_s.saturating_mul(1000)));
                            if let Err(e) = f.write_jwt(&tok) {
                                tracing::error!(error = %e, "could not write the jwt file");
                            }
                        }
                        Err(e) => {
                            file_jwt_retry.1 = Instant::now() + file_jwt_retry.0.fail();
                            shared.failed("fetch the --write-dir JWT-SVID", &e);
                        }
                    }
                }
            }
        }

        tokio::select! {
            () = tokio::time::sleep(timing.poll) => {}
            () = shared.wake.notified() => { next_sync = next_sync.min(Instant::now()); }
            _ = stop.changed() => {}
        }
    }
    tracing::debug!("scheduler stopped");
}

/// Re-exported for the Workload API: the bundle of a snapshot.
pub fn bundle_of(snap: &Snapshot) -> Result<Arc<Bundle>, ServeError> {
    snap.bundle
        .clone()
        .ok_or_else(|| ServeError::Unavailable("the agent has no trust bundle yet".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let d: Vec<Duration> = (0..10).map(|_| b.fail()).collect();
        assert!(d[0] >= Duration::from_millis(800) && d[0] <= Duration::from_millis(1200));
        assert!(d[3] >= Duration::from_millis(6400) && d[3] <= Duration::from_millis(9600));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(60)));
        assert!(d[9] >= Duration::from_secs(48));
        assert_eq!(b.succeed(), 10);
        assert!(b.fail() <= Duration::from_millis(1200));
    }
}

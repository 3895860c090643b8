//! Leases: one writer per deployment, readers side by side, and garbage
//! collection alone.
//!
//! `locks/<name>` is created with a conditional put (insert-if-absent on
//! disk and on S3). It names its holder and an expiry, renewed while the
//! operation runs. A lease whose holder is a dead process on this host, or
//! whose expiry passed, is broken and taken over.
//!
//! GC and the others exclude each other by take-then-check on both sides
//! (ARCHITECTURE.md, "GC and writers"): GC first publishes an *intent*,
//! checks for live leases, and withdraws at once if it finds one; only then
//! does it mark itself *running*. A writer takes its lease first, then
//! waits for the GC record it saw (an intent resolves in milliseconds, a
//! running GC within the writer's deadline, with `waiting_for_gc` events).

use crate::Repository;
use bytes::Bytes;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::store::DynStore;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(600);
/// An intent's lifetime: GC lists the leases and then either withdraws or
/// promotes itself well within it; a crashed GC's intent blocks writers
/// for at most this long.
const INTENT_TTL: Duration = Duration::from_secs(60);
/// GC promotes its intent only this soon after taking it, so an intent a
/// writer already counts as expired is never promoted.
const INTENT_PROMOTE_WITHIN: Duration = Duration::from_secs(30);
/// How long a writer waits for a running GC unless told otherwise.
const DEFAULT_GC_WAIT: Duration = Duration::from_secs(1800);
/// How often a waiting writer says so.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// What GC's record says about it; writer and reader records are always
/// `Running` (the field's default, also for records older than phases).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Looking for live leases; withdraws if it finds one.
    Intent,
    /// Found none: collecting.
    #[default]
    Running,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub host: String,
    pub pid: u32,
    pub purpose: String,
    pub expires_unix: u64,
    /// Random per acquisition: renewals and the release check it, so a
    /// holder never renews or deletes a lease someone else took over.
    #[serde(default)]
    pub token: String,
    /// The holder's PID namespace: "its pid is gone" means something only
    /// inside the same one (containers may share a hostname, not pids).
    #[serde(default)]
    pub pidns: String,
    #[serde(default)]
    pub phase: Phase,
}

pub struct Lease {
    store: DynStore,
    key: String,
    token: String,
    /// Dropping it wakes the renewer, which then exits at once.
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<std::thread::JoinHandle<()>>,
    /// Unix time until which the record surely names us.
    held_until: Arc<AtomicU64>,
    /// Someone else's record replaced ours (ours was broken as stale).
    lost: Arc<AtomicBool>,
    /// The phase our record states; held while writing it.
    phase: Arc<Mutex<Phase>>,
    purpose: String,
    taken: Instant,
}

/// A writer's or reader's lease, taken but not yet cleared against GC:
/// the operation must not touch the repository until [`Pending::wait_for_gc`]
/// returns its [`Lease`].
#[must_use = "wait_for_gc before writing"]
pub struct Pending(Lease);

/// How a writer or reader waits for a GC it finds running.
pub struct GcWait<'a> {
    /// How long to wait for a running GC (zero: refuse at once). An intent
    /// is always waited out: it resolves within [`INTENT_TTL`].
    pub deadline: Duration,
    /// Where `waiting_for_gc` events go, with their subject.
    pub bus: Option<(&'a EventBus, Map<String, Value>)>,
}

impl<'a> GcWait<'a> {
    /// A writer's wait: `PG_HARDSTORAGE_GC_WAIT_SECONDS` (default 1800).
    pub fn writer(bus: &'a EventBus, subject: Map<String, Value>) -> Self {
        let deadline = std::env::var("PG_HARDSTORAGE_GC_WAIT_SECONDS")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_GC_WAIT);
        GcWait {
            deadline,
            bus: Some((bus, subject)),
        }
    }

    /// Refuses a running GC at once (readers: a restore is not held up
    /// behind a long collection without the operator knowing).
    pub fn refuse() -> Self {
        GcWait {
            deadline: Duration::ZERO,
            bus: None,
        }
    }
}

/// How close to its expiry a lease no longer counts as held.
const MARGIN: u64 = 60;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn host() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn pidns() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn record(purpose: &str, token: &str, phase: Phase) -> LeaseRecord {
    let ttl = match phase {
        Phase::Intent => INTENT_TTL,
        Phase::Running => TTL,
    };
    LeaseRecord {
        host: host(),
        pid: std::process::id(),
        purpose: purpose.to_string(),
        expires_unix: now() + ttl.as_secs(),
        token: token.to_string(),
        pidns: pidns(),
        phase,
    }
}

fn stale(r: &LeaseRecord) -> bool {
    if r.expires_unix < now() {
        return true;
    }
    // A dead pid proves a dead holder only on this host, in this PID
    // namespace. Signal 0 checks existence only.
    r.host == host()
        && !r.pidns.is_empty()
        && r.pidns == pidns()
        && unsafe { libc::kill(r.pid as i32, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The key of garbage collection's repository-wide lease. Deployment names
/// cannot contain a dot, so it never collides with a writer's.
const GC: &str = ".gc";
const GC_KEY: &str = "locks/.gc";

fn read_record(store: &DynStore, key: &str) -> Result<Option<LeaseRecord>, Problem> {
    Ok(store
        .get(key)?
        .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok()))
}

fn live_holder(repo: &Repository, key: &str) -> Result<Option<LeaseRecord>, Problem> {
    Ok(read_record(&repo.store, key)?.filter(|h| !stale(h)))
}

fn gc_running(h: &LeaseRecord, waited: Duration, wait: &GcWait) -> Problem {
    let who = format!("{} pid {}", h.host, h.pid);
    if wait.deadline.is_zero() {
        return Problem::new(
            Code::RepoLocked,
            format!("garbage collection is running ({who})"),
        )
        .suggest("Retry when `repo gc --apply` has finished", None);
    }
    Problem::new(
        Code::RepoLocked,
        format!(
            "garbage collection is running ({who}); waited {}s of the {}s allowed",
            waited.as_secs(),
            wait.deadline.as_secs()
        ),
    )
    .suggest(
        "Retry when `repo gc --apply` has finished, or allow a longer wait with PG_HARDSTORAGE_GC_WAIT_SECONDS",
        None,
    )
}

fn report_wait(wait: &GcWait, h: &LeaseRecord, waited: Duration) {
    if let Some((bus, subject)) = &wait.bus {
        bus.publish(
            Event::new(Severity::Warning, "waiting_for_gc")
                .subject(subject.clone())
                .body(json!({
                    "holder": {"host": h.host, "pid": h.pid},
                    "phase": h.phase,
                    "waited_seconds": waited.as_secs(),
                    "deadline_seconds": wait.deadline.as_secs(),
                })),
        );
    }
}

/// Waits until no GC record that may not have seen us is left. With
/// `ours_visible` (we hold a lease), an intent that appears after our first
/// look was taken after our lease, so its GC sees us and withdraws: it is
/// not waited for. Without a lease every intent is.
fn await_gc(repo: &Repository, wait: &GcWait, ours_visible: bool) -> Result<(), Problem> {
    let t0 = Instant::now();
    let Some(first) = live_holder(repo, GC_KEY)? else {
        return Ok(());
    };
    let (mut h, mut pause, mut reported) = (first.clone(), Duration::from_millis(5), None);
    loop {
        let limit = match h.phase {
            Phase::Intent => wait.deadline.max(INTENT_TTL + Duration::from_secs(5)),
            Phase::Running => wait.deadline,
        };
        let waited = t0.elapsed();
        if waited >= limit {
            return Err(gc_running(&h, waited, wait));
        }
        if h.phase == Phase::Running
            && reported.is_none_or(|t: Instant| t.elapsed() >= REPORT_EVERY)
        {
            report_wait(wait, &h, waited);
            reported = Some(Instant::now());
        }
        std::thread::sleep(pause.min(limit - waited));
        pause = (pause * 2).min(Duration::from_secs(2));
        match live_holder(repo, GC_KEY)? {
            None => return Ok(()),
            Some(n) if ours_visible && n.token != first.token && n.phase == Phase::Intent => {
                return Ok(())
            }
            Some(n) => h = n,
        }
    }
}

impl Pending {
    /// Clears the lease against GC: waits out a GC intent that may not have
    /// seen us, and a running GC up to `wait.deadline`; `repo.locked` past it.
    pub fn wait_for_gc(self, repo: &Repository, wait: &GcWait) -> Result<Lease, Problem> {
        await_gc(repo, wait, true)?;
        Ok(self.0)
    }
}

impl Lease {
    /// A writer's lease (a backup of `deployment`), not yet cleared against
    /// GC: say that the operation started, then [`Pending::wait_for_gc`].
    pub fn acquire_writer(
        repo: &Repository,
        deployment: &str,
        purpose: &str,
    ) -> Result<Pending, Problem> {
        Ok(Pending(Self::take(
            repo,
            deployment,
            purpose,
            Phase::Running,
        )?))
    }

    /// A writer's lease, cleared against GC (WAL archiving).
    pub fn acquire(
        repo: &Repository,
        deployment: &str,
        purpose: &str,
        wait: &GcWait,
    ) -> Result<Lease, Problem> {
        Self::acquire_writer(repo, deployment, purpose)?.wait_for_gc(repo, wait)
    }

    /// A reader's lease (a restore, a verify, a scrub): readers run side by
    /// side, but not with GC, so no pack they read can be swept or
    /// repacked away under them; a running GC refuses them at once. `what`
    /// names it in messages. A repository the reader may not write to (a
    /// read-only copy, read-only credentials) is read without one.
    pub fn reader(
        repo: &Repository,
        deployment: &str,
        what: &str,
    ) -> Result<Option<Lease>, Problem> {
        let name = format!("{deployment}.{what}-{}", random_hex(6)?);
        match Self::take(repo, &name, what, Phase::Running) {
            Ok(l) => Pending(l).wait_for_gc(repo, &GcWait::refuse()).map(Some),
            Err(p) if p.code == "repo.locked" => Err(p),
            // No lease could be written: read without one, but never
            // while GC runs (a failure to find out is an error too).
            Err(_) => await_gc(repo, &GcWait::refuse(), false).map(|()| None),
        }
    }

    /// Fails when the lease may no longer be ours: another process broke
    /// and took it, or renewals failed until it is close to expiring. A
    /// holder checks before each irreversible step (a commit, a sweep).
    pub fn ensure_held(&self) -> Result<(), Problem> {
        let until = self.held_until.load(Ordering::Acquire);
        if self.lost.load(Ordering::Acquire) || now() + MARGIN > until {
            return Err(Problem::new(
                Code::RepoLocked,
                format!(
                    "the lease {} is no longer surely ours (renewals failed or it was taken over); stopping before changing anything",
                    self.key
                ),
            )
            .suggest("Check the repository's reachability and retry", None));
        }
        Ok(())
    }

    /// Garbage collection's exclusive lease: refused while any writer or
    /// reader holds one. A refused GC leaves nothing behind and was never
    /// `running`, so no writer waits for it beyond its intent.
    pub fn acquire_gc(repo: &Repository) -> Result<Lease, Problem> {
        let lease = Self::take(repo, GC, "gc", Phase::Intent)?;
        if let Some((key, h)) = first_live_lease(repo)? {
            drop(lease);
            return Err(Problem::new(
                Code::RepoLocked,
                format!(
                    "{key} is held by {} (pid {}) for {}: gc --apply waits for writers and readers",
                    h.host, h.pid, h.purpose
                ),
            )
            .suggest(
                "Retry when the backup, WAL archiving or restore in progress has finished",
                None,
            ));
        }
        lease.promote()?;
        sweep_claims(repo)?;
        Ok(lease)
    }

    /// Turns GC's intent into `running`, while it is surely still ours and
    /// young enough that no writer counts it as expired.
    fn promote(&self) -> Result<(), Problem> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let ours = read_record(&self.store, &self.key)?.is_some_and(|r| r.token == self.token);
        if !ours || self.taken.elapsed() > INTENT_PROMOTE_WITHIN {
            return Err(Problem::new(
                Code::RepoLocked,
                "looking for live leases took too long; garbage collection did not start",
            )
            .suggest("Retry; check the repository's latency", None));
        }
        let rec = record(&self.purpose, &self.token, Phase::Running);
        let body = serde_json::to_vec(&rec).map_err(|e| Problem::internal(e.to_string()))?;
        self.store.put(&self.key, Bytes::from(body))?;
        self.held_until.store(rec.expires_unix, Ordering::Release);
        *phase = Phase::Running;
        Ok(())
    }

    fn take(repo: &Repository, name: &str, purpose: &str, phase: Phase) -> Result<Lease, Problem> {
        let key = format!("locks/{name}");
        let token = random_hex(16)?;
        for _ in 0..5 {
            let rec = record(purpose, &token, phase);
            let body = serde_json::to_vec(&rec).map_err(|e| Problem::internal(e.to_string()))?;
            if repo.store.put_if_absent(&key, Bytes::from(body))? {
                return Ok(Lease::start(repo.store.clone(), key, token, purpose, rec));
            }
            match repo.store.get(&key)? {
                // Released between our put and our look: try again. (Never
                // delete here: the next record may already be someone's.)
                None => {}
                Some(body) => match serde_json::from_slice::<LeaseRecord>(&body).ok() {
                    Some(h) if !stale(&h) => return Err(held_by(name, &h)),
                    // Stale or unreadable: break it (once) and try again.
                    _ => break_stale(&repo.store, &key, &body)?,
                },
            }
        }
        Err(Problem::new(
            Code::RepoLocked,
            format!("could not take the lease on {name:?}"),
        ))
    }

    fn start(
        store: DynStore,
        key: String,
        token: String,
        purpose: &str,
        rec: LeaseRecord,
    ) -> Lease {
        let (stop, wake) = mpsc::channel::<()>();
        let held_until = Arc::new(AtomicU64::new(rec.expires_unix));
        let lost = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Mutex::new(rec.phase));
        let r = Renewal {
            store: store.clone(),
            key: key.clone(),
            token: token.clone(),
            purpose: purpose.to_string(),
            phase: phase.clone(),
            held_until: held_until.clone(),
        };
        let lost2 = lost.clone();
        let renewer = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || loop {
                match wake.recv_timeout(TTL / 3) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Released: the sender is gone.
                    _ => return,
                }
                if !r.renew() {
                    lost2.store(true, Ordering::Release);
                    return;
                }
            })
            .ok();
        Lease {
            store,
            key,
            token,
            stop: Some(stop),
            renewer,
            held_until,
            lost,
            phase,
            purpose: purpose.to_string(),
            taken: Instant::now(),
        }
    }
}

fn held_by(name: &str, h: &LeaseRecord) -> Problem {
    if name == GC {
        return Problem::new(
            Code::RepoLocked,
            format!(
                "garbage collection is already running ({} pid {})",
                h.host, h.pid
            ),
        )
        .suggest("Wait for it to finish; only one runs at a time", None);
    }
    Problem::new(
        Code::RepoLocked,
        format!(
            "deployment {name:?} is locked by {} (pid {}) for {}",
            h.host, h.pid, h.purpose
        ),
    )
    .with("deployment", name)
    .suggest("Wait for the running operation to finish, then retry", None)
}

/// How long a breaker's claim is kept: far longer than any breaker takes
/// between reading a stale record and claiming it.
const CLAIM_KEEP: Duration = Duration::from_secs(3600);

/// Where breakers' claims live (a name no lease can have).
const CLAIMS: &str = "locks/.claims/";

/// The claim on breaking the record `body` of `key`:
/// `locks/.claims/<name>-<its hash>` (characters object stores keep as
/// they are: a `~` is escaped on disk by the local backend).
fn claim_key(key: &str, body: &[u8]) -> String {
    let name = key.strip_prefix("locks/").unwrap_or(key);
    format!("{CLAIMS}{name}-{}", &blake3::hash(body).to_hex()[..32])
}

/// Breaks the stale record `body` at `key`, once. Of the processes that
/// read the same stale record only the one that creates its claim deletes
/// it; the others just retry their put. Without the claim a slow breaker
/// could delete the record a faster one had just created in its place.
fn break_stale(store: &DynStore, key: &str, body: &[u8]) -> Result<(), Problem> {
    let note = json!({"broken_unix": now(), "host": host(), "pid": std::process::id()});
    if store.put_if_absent(&claim_key(key, body), Bytes::from(note.to_string()))? {
        store.delete(key)?;
    }
    Ok(())
}

/// Deletes breakers' claims older than [`CLAIM_KEEP`] (GC, once running).
fn sweep_claims(repo: &Repository) -> Result<(), Problem> {
    let cutoff = now().saturating_sub(CLAIM_KEEP.as_secs());
    for o in repo.store.list(CLAIMS)? {
        if o.modified_unix != 0 && o.modified_unix < cutoff {
            repo.store.delete(&o.key)?;
        }
    }
    Ok(())
}

/// The first live lease other than GC's, if any.
fn first_live_lease(repo: &Repository) -> Result<Option<(String, LeaseRecord)>, Problem> {
    for o in repo.store.list("locks/")? {
        if o.key == GC_KEY || o.key.starts_with(CLAIMS) {
            continue;
        }
        if let Some(h) = live_holder(repo, &o.key)? {
            return Ok(Some((o.key, h)));
        }
    }
    Ok(None)
}

/// What the renewer thread needs to renew a record.
struct Renewal {
    store: DynStore,
    key: String,
    token: String,
    purpose: String,
    phase: Arc<Mutex<Phase>>,
    held_until: Arc<AtomicU64>,
}

impl Renewal {
    /// Renews a record that is still ours; `false` when it is not.
    fn renew(&self) -> bool {
        let phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        match read_record(&self.store, &self.key) {
            Ok(Some(r)) if r.token == self.token => {}
            Ok(_) => return false,
            // Unreachable: try again next period; held_until runs out meanwhile.
            Err(_) => return true,
        }
        let rec = record(&self.purpose, &self.token, *phase);
        if let Ok(body) = serde_json::to_vec(&rec) {
            if self.store.put(&self.key, Bytes::from(body)).is_ok() {
                self.held_until.store(rec.expires_unix, Ordering::Release);
            }
        }
        true
    }
}

fn random_hex(n: usize) -> Result<String, Problem> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    Ok(hex::encode(b))
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Stop the renewer first (it wakes at once), so it cannot write
        // our record back after we delete it.
        drop(self.stop.take());
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // Release only a record that is still ours.
        let ours = read_record(&self.store, &self.key)
            .ok()
            .flatten()
            .is_some_and(|r| r.token == self.token);
        if ours {
            let _ = self.store.delete(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(repo: &Repository, d: &str) -> Result<Lease, Problem> {
        Lease::acquire(repo, d, "backup", &GcWait::refuse())
    }

    #[test]
    fn a_lease_is_released_only_while_it_is_still_ours() {
        let repo = crate::testing::memory_repo();
        let lease = writer(&repo, "d").expect("lease");
        lease.ensure_held().expect("held");
        assert!(writer(&repo, "d").is_err(), "exclusive");
        // Someone broke it (as stale) and took it over.
        let theirs =
            serde_json::to_vec(&record("backup", "someone-else", Phase::Running)).expect("json");
        repo.store.put("locks/d", Bytes::from(theirs)).expect("put");
        drop(lease);
        let left: LeaseRecord =
            serde_json::from_slice(&repo.store.get("locks/d").expect("get").expect("kept"))
                .expect("record");
        assert_eq!(left.token, "someone-else", "their lease stays");
    }

    #[test]
    fn a_stale_record_is_broken_once() {
        stale_broken_once(crate::testing::memory_repo());
        // On disk too: the claim's name must survive the local backend.
        let tmp = tempfile::tempdir().expect("tmp");
        let store = phs_store::open_store(&tmp.path().display().to_string(), true).expect("store");
        let repo = Repository::init(
            store,
            &crate::KeySource::Passphrase("unit test passphrase".into()),
            crate::InitOptions::default(),
        )
        .expect("init");
        stale_broken_once(repo);
    }

    fn stale_broken_once(repo: Repository) {
        let mut dead = record("backup", "dead", Phase::Running);
        dead.expires_unix = 1;
        let body = serde_json::to_vec(&dead).expect("json");
        repo.store
            .put("locks/d", Bytes::from(body.clone()))
            .expect("put");
        // A second breaker that read the same stale record (claim taken)
        // must not delete the record the first one put in its place.
        let first = writer(&repo, "d").expect("broke the stale lease");
        assert!(repo
            .store
            .get(&claim_key("locks/d", &body))
            .expect("get")
            .is_some());
        break_stale(&repo.store, "locks/d", &body).expect("no-op");
        first.ensure_held().expect("held");
        let left = read_record(&repo.store, "locks/d")
            .expect("get")
            .expect("kept");
        assert_eq!(left.token, first.token, "the new holder's record stays");
        assert!(first_live_lease(&repo).expect("list").is_some());
        drop(first);
        assert!(
            first_live_lease(&repo).expect("list").is_none(),
            "a claim is not a lease"
        );
    }

    /// A store whose first conditional put loses to a holder that is gone
    /// by the time we look; it counts deletes.
    struct Vanishing {
        inner: DynStore,
        lost_once: AtomicBool,
        deletes: AtomicU64,
    }

    impl pg_hardstorage_engine::store::Store for Vanishing {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn put(&self, key: &str, data: Bytes) -> Result<(), Problem> {
            self.inner.put(key, data)
        }
        fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem> {
            if !self.lost_once.swap(true, Ordering::AcqRel) {
                return Ok(false);
            }
            self.inner.put_if_absent(key, data)
        }
        fn get(&self, key: &str) -> Result<Option<Bytes>, Problem> {
            self.inner.get(key)
        }
        fn get_range(&self, key: &str, r: std::ops::Range<u64>) -> Result<Bytes, Problem> {
            self.inner.get_range(key, r)
        }
        fn head(&self, key: &str) -> Result<Option<u64>, Problem> {
            self.inner.head(key)
        }
        fn list(
            &self,
            prefix: &str,
        ) -> Result<Vec<pg_hardstorage_engine::store::ObjectInfo>, Problem> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), Problem> {
            self.deletes.fetch_add(1, Ordering::AcqRel);
            self.inner.delete(key)
        }
    }

    #[test]
    fn a_holder_gone_before_we_look_is_not_deleted_after_us() {
        let base = crate::testing::memory_repo();
        let store = Arc::new(Vanishing {
            inner: base.store.clone(),
            lost_once: AtomicBool::new(false),
            deletes: AtomicU64::new(0),
        });
        let repo = Repository {
            store: store.clone(),
            ..base.clone()
        };
        let lease = writer(&repo, "d").expect("taken on the second try");
        assert_eq!(
            store.deletes.load(Ordering::Acquire),
            0,
            "an absent record must not be deleted: the next one may be someone's"
        );
        lease.ensure_held().expect("held");
    }

    #[test]
    fn a_dead_pid_is_stale_only_in_our_pid_namespace() {
        let mut r = record("backup", "t", Phase::Running);
        r.pid = i32::MAX as u32 - 7; // no such process
        assert!(stale(&r));
        r.pidns = "pid:[1]".into(); // another namespace on the same host
        assert!(!stale(&r), "its pid may be alive in a sibling container");
        r.expires_unix = 1;
        assert!(stale(&r), "expiry always counts");
    }

    #[test]
    fn a_refused_gc_leaves_no_record_and_a_granted_one_runs() {
        let repo = crate::testing::memory_repo();
        let w = writer(&repo, "d").expect("writer");
        let e = Lease::acquire_gc(&repo).map(|_| ()).expect_err("refused");
        assert_eq!(e.code.as_ref(), "repo.locked");
        assert!(
            repo.store.get(GC_KEY).expect("get").is_none(),
            "withdrawn at once"
        );
        drop(w);
        assert!(
            repo.store.get("locks/d").expect("get").is_none(),
            "released"
        );
        let gc = Lease::acquire_gc(&repo).expect("gc");
        let r = read_record(&repo.store, GC_KEY)
            .expect("get")
            .expect("record");
        assert_eq!(r.phase, Phase::Running);
        gc.ensure_held().expect("held after promotion");
    }

    #[test]
    fn a_writer_waits_out_the_intent_it_saw_and_ignores_newer_ones() {
        let repo = crate::testing::memory_repo();
        let put = |token: &str, phase| {
            let body = serde_json::to_vec(&record("gc", token, phase)).expect("json");
            repo.store.put(GC_KEY, Bytes::from(body)).expect("put");
        };
        put("old", Phase::Intent);
        let pending = Lease::acquire_writer(&repo, "d", "backup").expect("taken");
        let store = repo.store.clone();
        let replace = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let body = serde_json::to_vec(&record("gc", "new", Phase::Intent)).expect("json");
            store.put(GC_KEY, Bytes::from(body)).expect("put");
        });
        let t0 = Instant::now();
        pending
            .wait_for_gc(&repo, &GcWait::refuse())
            .expect("a newer intent sees us and withdraws");
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "waited for the old intent"
        );
        replace.join().expect("thread");
        // A running GC refuses a reader at once.
        put("run", Phase::Running);
        let e = Lease::reader(&repo, "d", "restore")
            .map(|_| ())
            .expect_err("refused");
        assert!(
            e.message.contains("garbage collection is running"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_writer_waits_for_a_running_gc_and_reports_it() {
        let repo = crate::testing::memory_repo();
        let gc = Lease::acquire_gc(&repo).expect("gc");
        let bus = EventBus::new();
        let seen = pg_hardstorage_engine::event::Recorder::new();
        bus.add_sink(seen.clone());
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(gc);
        });
        let wait = GcWait {
            deadline: Duration::from_secs(30),
            bus: Some((&bus, Map::new())),
        };
        Lease::acquire(&repo, "d", "backup", &wait).expect("runs once gc is done");
        release.join().expect("thread");
        bus.close();
        assert_eq!(seen.ops(), vec!["waiting_for_gc".to_string()]);
        // Past the deadline: refused, naming the wait.
        let _gc = Lease::acquire_gc(&repo).expect("gc again");
        let short = GcWait {
            deadline: Duration::from_millis(50),
            bus: None,
        };
        let e = Lease::acquire(&repo, "e", "backup", &short)
            .map(|_| ())
            .expect_err("deadline");
        assert_eq!(e.code.as_ref(), "repo.locked");
        assert!(e.message.contains("waited"), "{}", e.message);
        assert!(
            repo.store.get("locks/e").expect("get").is_none(),
            "its lease released"
        );
    }
}

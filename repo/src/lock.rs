//! Writer lease: one backup per deployment at a time.
//!
//! `locks/<deployment>` is created with a conditional put (insert-if-absent
//! on disk and on S3). It names its holder and an expiry, renewed while the
//! backup runs. A lease whose holder is a dead process on this host, or
//! whose expiry passed, is broken and taken over.

use crate::Repository;
use bytes::Bytes;
use pg_hardstorage_engine::store::DynStore;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TTL: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub host: String,
    pub pid: u32,
    pub purpose: String,
    pub expires_unix: u64,
}

pub struct Lease {
    store: DynStore,
    key: String,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn host() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn record(purpose: &str) -> LeaseRecord {
    LeaseRecord {
        host: host(),
        pid: std::process::id(),
        purpose: purpose.to_string(),
        expires_unix: now() + TTL.as_secs(),
    }
}

fn stale(r: &LeaseRecord) -> bool {
    if r.expires_unix < now() {
        return true;
    }
    // SAFETY-free liveness probe: signal 0 checks existence only.
    r.host == host()
        && unsafe { libc::kill(r.pid as i32, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The key of garbage collection's repository-wide lease. Deployment names
/// cannot contain a dot, so it never collides with a writer's.
const GC: &str = ".gc";

fn live_holder(repo: &Repository, key: &str) -> Result<Option<LeaseRecord>, Problem> {
    Ok(repo
        .store
        .get(key)?
        .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
        .filter(|h| !stale(h)))
}

impl Lease {
    /// A writer's lease (a backup of `deployment`, or a WAL segment being
    /// archived). Refused while garbage collection runs: taken first and
    /// checked after, against GC's own take-then-check, so of a writer and
    /// a collector starting together at least one sees the other.
    pub fn acquire(repo: &Repository, deployment: &str, purpose: &str) -> Result<Lease, Problem> {
        let lease = Self::take(repo, deployment, purpose)?;
        if let Some(h) = live_holder(repo, &format!("locks/{GC}"))? {
            drop(lease);
            return Err(Problem::new(
                "repo.locked",
                format!(
                    "garbage collection is running ({} pid {}); writers wait for it",
                    h.host, h.pid
                ),
            )
            .suggest("Retry when `repo gc --apply` has finished", None));
        }
        Ok(lease)
    }

    /// A reader's lease (a restore, a verify, a scrub): readers run side by
    /// side, but not with GC, so no pack they read can be swept or
    /// repacked away under them. `what` names it in messages. A repository
    /// the reader may not write to (a read-only copy, read-only
    /// credentials) is read without one: only a running GC refuses it.
    pub fn reader(
        repo: &Repository,
        deployment: &str,
        what: &str,
    ) -> Result<Option<Lease>, Problem> {
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
        match Self::acquire(
            repo,
            &format!("{deployment}.{what}-{}", hex::encode(r)),
            what,
        ) {
            Ok(l) => Ok(Some(l)),
            Err(p) if p.code == "repo.locked" => Err(p),
            Err(_) => Ok(None),
        }
    }

    /// Garbage collection's exclusive lease: refused while any writer holds one.
    pub fn acquire_gc(repo: &Repository) -> Result<Lease, Problem> {
        let lease = Self::take(repo, GC, "gc")?;
        for o in repo.store.list("locks/")? {
            if o.key == format!("locks/{GC}") {
                continue;
            }
            if let Some(h) = live_holder(repo, &o.key)? {
                drop(lease);
                return Err(Problem::new(
                    "repo.locked",
                    format!(
                        "{} is held by {} (pid {}) for {}: gc --apply waits for writers and readers",
                        o.key, h.host, h.pid, h.purpose
                    ),
                )
                .suggest(
                    "Retry when the backup or WAL archiving in progress has finished",
                    None,
                ));
            }
        }
        Ok(lease)
    }

    fn take(repo: &Repository, deployment: &str, purpose: &str) -> Result<Lease, Problem> {
        let key = format!("locks/{deployment}");
        for _ in 0..3 {
            let body = serde_json::to_vec(&record(purpose))
                .map_err(|e| Problem::internal(e.to_string()))?;
            if repo.store.put_if_absent(&key, Bytes::from(body))? {
                return Ok(Lease::start(repo.store.clone(), key));
            }
            let holder: Option<LeaseRecord> = repo
                .store
                .get(&key)?
                .and_then(|b| serde_json::from_slice(&b).ok());
            match holder {
                Some(h) if !stale(&h) => {
                    return Err(Problem::new(
                        "repo.locked",
                        format!(
                            "deployment {deployment:?} is locked by {} (pid {}) for {}",
                            h.host, h.pid, h.purpose
                        ),
                    )
                    .with("deployment", deployment)
                    .suggest("Wait for the running operation to finish, then retry", None));
                }
                // Stale or unreadable: break it and try again.
                _ => repo.store.delete(&key)?,
            }
        }
        Err(Problem::new(
            "repo.locked",
            format!("could not take the lease on {deployment:?}"),
        ))
    }

    fn start(store: DynStore, key: String) -> Lease {
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, k2, stop2) = (store.clone(), key.clone(), stop.clone());
        let renewer = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !stop2.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if last.elapsed() >= TTL / 3 {
                        last = std::time::Instant::now();
                        if let Ok(body) = serde_json::to_vec(&record("renewed")) {
                            let _ = s2.put(&k2, Bytes::from(body));
                        }
                    }
                }
            })
            .ok();
        Lease {
            store,
            key,
            stop,
            renewer,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        let _ = self.store.delete(&self.key);
    }
}

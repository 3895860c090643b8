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
    /// Random per acquisition: renewals and the release check it, so a
    /// holder never renews or deletes a lease someone else took over.
    #[serde(default)]
    pub token: String,
    /// The holder's PID namespace: "its pid is gone" means something only
    /// inside the same one (containers may share a hostname, not pids).
    #[serde(default)]
    pub pidns: String,
}

pub struct Lease {
    store: DynStore,
    key: String,
    token: String,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
    /// Unix time until which the record surely names us.
    held_until: Arc<std::sync::atomic::AtomicU64>,
    /// Someone else's record replaced ours (ours was broken as stale).
    lost: Arc<AtomicBool>,
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

fn record(purpose: &str, token: &str) -> LeaseRecord {
    LeaseRecord {
        host: host(),
        pid: std::process::id(),
        purpose: purpose.to_string(),
        expires_unix: now() + TTL.as_secs(),
        token: token.to_string(),
        pidns: pidns(),
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
        match Self::acquire(
            repo,
            &format!("{deployment}.{what}-{}", random_hex(6)?),
            what,
        ) {
            Ok(l) => Ok(Some(l)),
            Err(p) if p.code == "repo.locked" => Err(p),
            // No lease could be written: read without one, but never
            // while GC runs (a failure to find out is an error too).
            Err(_) => match live_holder(repo, &format!("locks/{GC}"))? {
                Some(h) => Err(Problem::new(
                    "repo.locked",
                    format!("garbage collection is running ({} pid {})", h.host, h.pid),
                )),
                None => Ok(None),
            },
        }
    }

    /// Fails when the lease may no longer be ours: another process broke
    /// and took it, or renewals failed until it is close to expiring. A
    /// holder checks before each irreversible step (a commit, a sweep).
    pub fn ensure_held(&self) -> Result<(), Problem> {
        let until = self.held_until.load(Ordering::Acquire);
        if self.lost.load(Ordering::Acquire) || now() + MARGIN > until {
            return Err(Problem::new(
                "repo.locked",
                format!(
                    "the lease {} is no longer surely ours (renewals failed or it was taken over); stopping before changing anything",
                    self.key
                ),
            )
            .suggest("Check the repository's reachability and retry", None));
        }
        Ok(())
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
        let token = random_hex(16)?;
        for _ in 0..3 {
            let body = serde_json::to_vec(&record(purpose, &token))
                .map_err(|e| Problem::internal(e.to_string()))?;
            if repo.store.put_if_absent(&key, Bytes::from(body))? {
                return Ok(Lease::start(repo.store.clone(), key, token, purpose));
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

    fn start(store: DynStore, key: String, token: String, purpose: &str) -> Lease {
        let stop = Arc::new(AtomicBool::new(false));
        let held_until = Arc::new(std::sync::atomic::AtomicU64::new(now() + TTL.as_secs()));
        let lost = Arc::new(AtomicBool::new(false));
        let (s2, k2, t2, p2) = (
            store.clone(),
            key.clone(),
            token.clone(),
            purpose.to_string(),
        );
        let (stop2, held2, lost2) = (stop.clone(), held_until.clone(), lost.clone());
        let renewer = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                let mut last = std::time::Instant::now();
                while !stop2.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    if last.elapsed() < TTL / 3 {
                        continue;
                    }
                    last = std::time::Instant::now();
                    // Renew only a record that is still ours.
                    let current = s2
                        .get(&k2)
                        .map(|b| b.and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok()));
                    match current {
                        Ok(Some(r)) if r.token == t2 => {}
                        Ok(_) => {
                            lost2.store(true, Ordering::Release);
                            return;
                        }
                        // Unreachable: try again next period; held_until runs out meanwhile.
                        Err(_) => continue,
                    }
                    let rec = record(&p2, &t2);
                    if let Ok(body) = serde_json::to_vec(&rec) {
                        if s2.put(&k2, Bytes::from(body)).is_ok() {
                            held2.store(rec.expires_unix, Ordering::Release);
                        }
                    }
                }
            })
            .ok();
        Lease {
            store,
            key,
            token,
            stop,
            renewer,
            held_until,
            lost,
        }
    }
}

fn random_hex(n: usize) -> Result<String, Problem> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    Ok(hex::encode(b))
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.renewer.take() {
            let _ = t.join();
        }
        // Release only a record that is still ours.
        let ours = self
            .store
            .get(&self.key)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<LeaseRecord>(&b).ok())
            .is_some_and(|r| r.token == self.token);
        if ours {
            let _ = self.store.delete(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_released_only_while_it_is_still_ours() {
        let repo = crate::testing::memory_repo();
        let lease = Lease::acquire(&repo, "d", "backup").expect("lease");
        lease.ensure_held().expect("held");
        assert!(Lease::acquire(&repo, "d", "backup").is_err(), "exclusive");
        // Someone broke it (as stale) and took it over.
        let theirs = serde_json::to_vec(&record("backup", "someone-else")).expect("json");
        repo.store.put("locks/d", Bytes::from(theirs)).expect("put");
        drop(lease);
        let left: LeaseRecord =
            serde_json::from_slice(&repo.store.get("locks/d").expect("get").expect("kept"))
                .expect("record");
        assert_eq!(left.token, "someone-else", "their lease stays");
    }

    #[test]
    fn a_dead_pid_is_stale_only_in_our_pid_namespace() {
        let mut r = record("backup", "t");
        r.pid = i32::MAX as u32 - 7; // no such process
        assert!(stale(&r));
        r.pidns = "pid:[1]".into(); // another namespace on the same host
        assert!(!stale(&r), "its pid may be alive in a sibling container");
        r.expires_unix = 1;
        assert!(stale(&r), "expiry always counts");
    }
}

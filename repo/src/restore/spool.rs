//! The WAL spool of a restored data directory ([`super::recovery::SPOOL`]).
//! The restore stages the first segments recovery needs into it; when
//! PostgreSQL can reach the repository, `wal fetch --spool DIR --prefetch N`
//! (the fallback of `restore_command`) delivers a segment that was not
//! staged and then starts a background [`fill`] of the next N, so the spool
//! stays a bounded window ahead of replay (pgBackRest's archive-get queue):
//! at most N segments on disk, and replay rarely waits for the repository.

use crate::index::RepoIndex;
use crate::wal::{parse_segment_name, segment_name};
use crate::Repository;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// The fill in progress: its process id. One fill runs at a time.
const FILLING: &str = ".filling";

/// A fill record older than this is stale whatever its process id says.
const STALE: Duration = Duration::from_secs(600);

/// Removes spool segments at or before `delivered` on its timeline: replay
/// has passed them (a fill that raced a direct fetch can leave one).
/// Returns how many were removed.
pub fn prune(spool: &Path, delivered: &str) -> Result<usize, Problem> {
    let Some((tli, seg)) = parse_segment_name(delivered) else {
        return Ok(0);
    };
    let rd = std::fs::read_dir(spool)
        .map_err(|e| Problem::io(Code::IoReadFailed, spool.display(), &e))?;
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let passed = name
            .to_str()
            .and_then(parse_segment_name)
            .is_some_and(|(t, s)| t == tli && s <= seg);
        if passed && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

/// Fetches (through the verifying read path) the `n` segments after
/// `after` on its timeline into `spool`, skipping those already there and
/// stopping at the first one not archived. Each appears whole or not at all
/// (written aside, synced, renamed). Returns how many it fetched; 0 at once
/// when another fill is running.
pub fn fill(
    repo: &Repository,
    deployment: &str,
    spool: &Path,
    after: &str,
    n: usize,
) -> Result<usize, Problem> {
    let (tli, seg) = parse_segment_name(after).ok_or_else(|| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("{after:?} is not a WAL segment name"),
        )
    })?;
    let Some(_guard) = Filling::take(spool)? else {
        return Ok(0);
    };
    let index = RepoIndex::load(repo)?;
    let mut fetched = 0;
    for next in (seg + 1..).take(n) {
        let name = segment_name(tli, next);
        if spool.join(&name).exists() {
            continue;
        }
        let data = match crate::wal::read_with(repo, &index, deployment, &name) {
            Ok(d) => d,
            Err(p) if p.code == "wal.segment_not_found" => break,
            Err(p) => return Err(p),
        };
        put(spool, &name, &data)?;
        fetched += 1;
    }
    Ok(fetched)
}

/// Writes `name` into the spool whole: aside, synced, then renamed.
fn put(spool: &Path, name: &str, data: &[u8]) -> Result<(), Problem> {
    let (tmp, dest) = (spool.join(format!(".{name}.part")), spool.join(name));
    let werr = |p: &Path, e: std::io::Error| Problem::io(Code::IoWriteFailed, p.display(), &e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| werr(&tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| werr(&tmp, e))?;
    std::fs::rename(&tmp, &dest).map_err(|e| werr(&dest, e))
}

/// The fill record, removed when the fill ends.
struct Filling(std::path::PathBuf);

impl Filling {
    /// Takes the spool's fill record, replacing a stale one; `None` when a
    /// live fill holds it.
    fn take(spool: &Path) -> Result<Option<Filling>, Problem> {
        let path = spool.join(FILLING);
        for _ in 0..2 {
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match created {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(Some(Filling(path)));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if live(&path) {
                        return Ok(None);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(Problem::io(Code::IoWriteFailed, path.display(), &e)),
            }
        }
        Ok(None)
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether the fill record at `path` is recent and its process still runs.
fn live(path: &Path) -> bool {
    let recent = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < STALE);
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    recent && pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_passed_segments_of_the_timeline_only() {
        let tmp = tempfile::tempdir().expect("tmp");
        let names = [
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000020000000000000003",
            "00000002.history",
        ];
        for n in names {
            std::fs::write(tmp.path().join(n), b"x").expect("write");
        }
        assert_eq!(
            prune(tmp.path(), "000000010000000000000004").expect("prune"),
            2
        );
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        left.sort();
        let mut want = names[2..].to_vec();
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn one_fill_at_a_time_and_a_dead_ones_record_is_replaced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let held = Filling::take(tmp.path()).expect("take").expect("free");
        assert!(Filling::take(tmp.path()).expect("take").is_none(), "held");
        drop(held);
        assert!(!tmp.path().join(FILLING).exists(), "released");
        // A record whose process is gone (pid 0 has no /proc entry).
        std::fs::write(tmp.path().join(FILLING), "0").expect("write");
        assert!(Filling::take(tmp.path()).expect("take").is_some(), "stale");
    }
}

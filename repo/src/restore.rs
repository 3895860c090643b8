//! Restoring a backed-up tree through the verifying read path.
//!
//! A file whose chunks fail verification is deleted, and the target keeps
//! an in-progress marker until every file verified and was synced, so a
//! failed or killed restore never passes for a complete one. Runs of chunks
//! adjacent in one pack are read with a single ranged GET.

use crate::chunks::decode_chunk;
use crate::index::RepoIndex;
use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{Entry, EntryKind, Manifest};
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use serde_json::json;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub target: PathBuf,
    pub force: bool,
    pub threads: usize,
    /// For PostgreSQL backups: archive recovery (restore_command and target).
    pub recovery: Option<Recovery>,
    /// Whether to run `pg_verifybackup` on a restored PostgreSQL backup.
    pub verify: VerifyMode,
    /// `(old location, new directory)`: where tablespaces go. A tablespace
    /// without a mapping goes back to its original location.
    pub tablespace_mapping: Vec<(String, PathBuf)>,
}

/// `--verify`: every chunk is always verified as it is read; this decides
/// whether PostgreSQL's own `pg_verifybackup` also checks the result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VerifyMode {
    /// Run it when it is installed.
    #[default]
    Auto,
    Skip,
    /// Fail when it is missing or fails.
    Require,
}

/// Runs `pg_verifybackup` on a restored data directory.
fn pg_verifybackup(target: &Path, mode: VerifyMode) -> Result<&'static str, Problem> {
    if mode == VerifyMode::Skip {
        return Ok("skipped");
    }
    let bindir = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let tool = bindir
        .map(|b| b.join("pg_verifybackup"))
        .filter(|p| p.exists());
    let Some(tool) = tool else {
        return match mode {
            VerifyMode::Require => Err(Problem::new(
                "restore.verify_unavailable",
                "--verify require: pg_verifybackup is not installed here",
            )
            .suggest(
                "Install the PostgreSQL server programs, or use --verify auto",
                None,
            )),
            _ => Ok("unavailable"),
        };
    };
    let out = std::process::Command::new(&tool)
        .arg("--ignore")
        .arg(IN_PROGRESS_MARKER)
        .arg(target)
        .output()
        .map_err(|e| Problem::io("restore.verify_unavailable", tool.display(), &e))?;
    if out.status.success() {
        Ok("passed")
    } else {
        Err(Problem::new(
            "verify.pg_verifybackup_failed",
            format!(
                "pg_verifybackup rejected the restored directory: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
        .with("target", target.display().to_string()))
    }
}

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive.
    Latest,
    /// `YYYY-MM-DD HH:MM:SS.ffffff+00`.
    Time(String),
    Lsn(String),
    Name(String),
}

#[derive(Clone, Debug)]
pub struct Recovery {
    pub restore_command: String,
    pub target: RecoveryTarget,
}

fn quote_conf(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// Writes `recovery.signal` and the recovery settings into
/// `postgresql.auto.conf`, owned like the data directory.
fn write_recovery(
    target: &Path,
    r: &Recovery,
    root: &Entry,
    backup_id: &str,
) -> Result<(), Problem> {
    use std::io::Write;
    let mut conf = format!(
        "\n# pg_hardstorage: archive recovery for {backup_id}\nrestore_command = {}\n",
        quote_conf(&r.restore_command)
    );
    match &r.target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Time(t) => {
            conf.push_str(&format!("recovery_target_time = {}\n", quote_conf(t)))
        }
        RecoveryTarget::Lsn(l) => {
            conf.push_str(&format!("recovery_target_lsn = {}\n", quote_conf(l)))
        }
        RecoveryTarget::Name(n) => {
            conf.push_str(&format!("recovery_target_name = {}\n", quote_conf(n)))
        }
    }
    if r.target != RecoveryTarget::Latest {
        conf.push_str("recovery_target_action = 'promote'\nrecovery_target_inclusive = off\n");
    }
    let auto = target.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&auto)
        .map_err(|e| werr(&auto, e))?;
    f.write_all(conf.as_bytes()).map_err(|e| werr(&auto, e))?;
    let signal = target.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(|e| werr(&signal, e))?;
    if unsafe { libc::geteuid() } == 0 {
        for p in [&auto, &signal] {
            std::os::unix::fs::chown(p, Some(root.uid), Some(root.gid)).map_err(|e| werr(p, e))?;
        }
    }
    Ok(())
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct RestoreSummary {
    pub backup_id: String,
    pub target: String,
    pub files: u64,
    pub bytes: u64,
    pub duration_seconds: f64,
    pub verified: bool,
    /// `passed`, `skipped`, `unavailable` or `not_applicable`.
    pub pg_verifybackup: String,
}

const MAX_RUN: u64 = 16 << 20;
/// Bytes read around a chunk: small files stored side by side in a pack are
/// served by one ranged GET instead of one each.
const WINDOW: u64 = 8 << 20;
/// Files a thread takes at a time: neighbours share directories and packs.
const BATCH: usize = 128;

/// One thread's view of the pack bytes it read last.
#[derive(Default)]
struct Window {
    pack: String,
    start: u64,
    data: bytes::Bytes,
}

impl Window {
    fn get(
        &mut self,
        repo: &Repository,
        pack: &str,
        range: std::ops::Range<u64>,
        pack_end: u64,
    ) -> Result<bytes::Bytes, Problem> {
        let inside = self.pack == pack
            && range.start >= self.start
            && range.end <= self.start + self.data.len() as u64;
        if !inside {
            let end = range.end.max((range.start + WINDOW).min(pack_end));
            self.data = repo.store.get_range(pack, range.start..end)?;
            self.pack = pack.to_string();
            self.start = range.start;
        }
        let s = (range.start - self.start) as usize;
        let e = (range.end - self.start) as usize;
        Ok(self.data.slice(s..e))
    }
}

/// A live postmaster owns `target`: its `postmaster.pid` names a running process.
fn live_postmaster(target: &Path) -> Option<i32> {
    let pidfile = std::fs::read_to_string(target.join("postmaster.pid")).ok()?;
    let pid: i32 = pidfile.lines().next()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    alive.then_some(pid)
}

/// The system identifier in a data directory's `global/pg_control`.
fn pg_system_identifier(dir: &Path) -> Option<u64> {
    let b = std::fs::read(dir.join("global/pg_control")).ok()?;
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

fn preflight(target: &Path, force: bool, sysid: Option<&str>) -> Result<(), Problem> {
    // A data directory of another cluster is named as such, not just "not empty".
    if let (Some(want), Some(have)) = (sysid, pg_system_identifier(target)) {
        if want != have.to_string() && !force {
            return Err(Problem::new(
                "restore.foreign_system",
                format!(
                    "{} holds the data directory of another cluster (system identifier {have}, the backup is of {want})",
                    target.display()
                ),
            )
            .with("target", target.display().to_string())
            .suggest("Restore into an empty directory; --force overwrites the other cluster", None));
        }
    }
    // Never overridable: writing under a running server destroys it.
    if let Some(pid) = live_postmaster(target) {
        return Err(Problem::new(
            "restore.postmaster_running",
            format!("PostgreSQL (pid {pid}) is running on {}", target.display()),
        )
        .with("target", target.display().to_string())
        .with("pid", pid)
        .suggest(
            "Stop that server first, or restore into another directory",
            Some(format!("pg_ctl -D {} stop", target.display())),
        ));
    }
    match std::fs::symlink_metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Problem::io(
            "restore.target_invalid",
            format!("target {}", target.display()),
            &e,
        )),
        Ok(m) if !m.is_dir() => Err(Problem::new(
            "restore.target_invalid",
            format!("target {} exists and is not a directory", target.display()),
        )
        .with("target", target.display().to_string())),
        Ok(_) => preflight_dir(
            target,
            force,
            "target",
            "Restore into an empty or new directory, or pass --force to write over it",
        ),
    }
}

/// Where entries land: the target, except tablespace contents
/// (`pg_tblspc/<oid>/…`), which go to their tablespace directory, linked
/// from `pg_tblspc/<oid>` as PostgreSQL requires.
struct Places {
    target: PathBuf,
    /// `("pg_tblspc/<oid>", directory)`.
    tablespaces: Vec<(String, PathBuf)>,
}

impl Places {
    fn new(m: &Manifest, opts: &RestoreOptions) -> Result<Places, Problem> {
        let mut tablespaces = Vec::new();
        for ts in m.source["tablespaces"].as_array().into_iter().flatten() {
            let (Some(oid), Some(loc)) = (ts["oid"].as_str(), ts["location"].as_str()) else {
                return Err(Problem::new(
                    "verify.malformed",
                    "manifest: bad tablespace record",
                ));
            };
            let dir = opts
                .tablespace_mapping
                .iter()
                .find(|(old, _)| old == loc)
                .map(|(_, new)| new.clone())
                .unwrap_or_else(|| PathBuf::from(loc));
            preflight_dir(
                &dir,
                opts.force,
                "tablespace directory",
                "Map it elsewhere with --tablespace-mapping OLD=NEW, or pass --force to write over it",
            )?;
            tablespaces.push((format!("pg_tblspc/{oid}"), dir));
        }
        Ok(Places {
            target: opts.target.clone(),
            tablespaces,
        })
    }

    fn path(&self, e: &Entry) -> Result<PathBuf, Problem> {
        let raw = e.path_bytes()?;
        if raw == b"." {
            return Ok(self.target.clone());
        }
        for (prefix, dir) in &self.tablespaces {
            let p = prefix.as_bytes();
            if raw == p {
                return Ok(dir.clone());
            }
            if raw.starts_with(p) && raw.get(p.len()) == Some(&b'/') {
                return Ok(dir.join(OsStr::from_bytes(&raw[p.len() + 1..])));
            }
        }
        Ok(self.target.join(OsStr::from_bytes(&raw)))
    }

    fn link_tablespaces(&self) -> Result<(), Problem> {
        for (prefix, dir) in &self.tablespaces {
            let link = self.target.join(prefix);
            let _ = std::fs::remove_dir(&link);
            std::os::unix::fs::symlink(dir, &link).map_err(|e| werr(&link, e))?;
        }
        Ok(())
    }
}

/// A directory a restore writes into must be absent or empty (unless forced).
fn preflight_dir(dir: &Path, force: bool, what: &str, suggestion: &str) -> Result<(), Problem> {
    let nonempty = match std::fs::read_dir(dir) {
        Ok(mut d) => d.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            return Err(Problem::io(
                "restore.target_invalid",
                format!("{what} {}", dir.display()),
                &e,
            ))
        }
    };
    if nonempty && !force {
        return Err(Problem::new(
            "restore.target_not_empty",
            format!("{what} {} is not empty", dir.display()),
        )
        .with("target", dir.display().to_string())
        .suggest(suggestion, None));
    }
    Ok(())
}

fn werr(p: &Path, e: std::io::Error) -> Problem {
    Problem::io("io.write_failed", format!("write {}", p.display()), &e)
}

pub fn restore(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    bus: &EventBus,
) -> Result<RestoreSummary, Problem> {
    let mut subj = serde_json::Map::new();
    subj.insert("deployment".into(), json!(m.deployment));
    subj.insert("backup_id".into(), json!(m.backup_id));
    bus.publish(Event::new(Severity::Info, "restore_started").subject(subj.clone()));
    let r = crate::lock::Lease::reader(repo, &m.deployment, "restore")
        .and_then(|_lease| run(repo, m, opts));
    match &r {
        Ok(s) => bus.publish(
            Event::new(Severity::Notice, "restore_completed")
                .subject(subj)
                .body(serde_json::to_value(s).unwrap_or_default()),
        ),
        Err(p) => bus.publish(Event::failure("restore_failed", p)),
    }
    r
}

/// The pre-flight checks alone, before anything is written: a caller that
/// must answer a refusal with a status code (the API) runs them first.
pub fn check(m: &Manifest, opts: &RestoreOptions) -> Result<(), Problem> {
    checked_places(m, opts).map(|_| ())
}

/// Pre-flight, manifest structure, and where every entry goes.
fn checked_places(m: &Manifest, opts: &RestoreOptions) -> Result<Places, Problem> {
    preflight(
        &opts.target,
        opts.force,
        m.source["system_identifier"].as_str(),
    )?;
    m.validate()?;
    Places::new(m, opts)
}

fn run(repo: &Repository, m: &Manifest, opts: &RestoreOptions) -> Result<RestoreSummary, Problem> {
    let t0 = Instant::now();
    let places = checked_places(m, opts)?;
    let index = RepoIndex::load(repo)?;
    // Every chunk must be locatable before a byte is written.
    for e in &m.entries {
        for (id, _) in &e.chunks {
            index.locate(id)?;
        }
    }
    std::fs::create_dir_all(&opts.target).map_err(|e| werr(&opts.target, e))?;
    let marker = opts.target.join(IN_PROGRESS_MARKER);
    std::fs::write(&marker, format!("{}\n", m.backup_id)).map_err(|e| werr(&marker, e))?;
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let p = places.path(e)?;
        std::fs::create_dir_all(&p).map_err(|er| werr(&p, er))?;
    }
    places.link_tablespaces()?;
    let files: Vec<&Entry> = m
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .collect();
    let bytes = AtomicU64::new(0);
    let aead = repo.aead();
    crate::parallel::for_each(&files, opts.threads, BATCH, Window::default, |window, e| {
        let p = places.path(e)?;
        let n = restore_file(repo, &index, aead.as_ref(), window, e, &p)?;
        bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    })?;
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
        let p = places.path(e)?;
        if opts.force {
            let _ = std::fs::remove_file(&p);
        }
        let target = e.target.clone().unwrap_or_default();
        std::os::unix::fs::symlink(&target, &p).map_err(|er| werr(&p, er))?;
        set_owner_and_times(&p, e, true)?;
    }
    // Directories last and deepest first, so writing into them does not
    // disturb the times just set.
    for e in m.entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        let p = places.path(e)?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(e.mode))
            .map_err(|er| werr(&p, er))?;
        set_owner_and_times(&p, e, false)?;
    }
    if let Some(r) = &opts.recovery {
        let root = m
            .entries
            .first()
            .ok_or_else(|| Problem::new("verify.malformed", "manifest has no root entry"))?;
        write_recovery(&opts.target, r, root, &m.backup_id)?;
    }
    sync_filesystem(&opts.target)?;
    let has_pg_manifest = m.entries.iter().any(|e| e.path == "backup_manifest");
    let pg_check = if m.source["type"] == "postgres" && has_pg_manifest {
        pg_verifybackup(&opts.target, opts.verify)?
    } else {
        "not_applicable"
    };
    std::fs::remove_file(&marker).map_err(|e| werr(&marker, e))?;
    sync_filesystem(&opts.target)?;
    Ok(RestoreSummary {
        backup_id: m.backup_id.clone(),
        target: opts.target.display().to_string(),
        files: files.len() as u64,
        bytes: bytes.load(Ordering::Relaxed),
        duration_seconds: (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        verified: true,
        pg_verifybackup: pg_check.to_string(),
    })
}

fn set_owner_and_times(p: &Path, e: &Entry, symlink: bool) -> Result<(), Problem> {
    // Ownership only when we can set it (running as root).
    if unsafe { libc::geteuid() } == 0 {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Problem::new("verify.malformed", "path with NUL"))?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } != 0 {
            return Err(werr(p, std::io::Error::last_os_error()));
        }
    }
    let t = filetime::FileTime::from_unix_time(e.mtime_s, e.mtime_ns);
    let r = if symlink {
        filetime::set_symlink_file_times(p, t, t)
    } else {
        filetime::set_file_times(p, t, t)
    };
    r.map_err(|er| werr(p, er))
}

/// Present in the target while a restore runs; removed only after every
/// file verified and the filesystem was synced. A failed or killed restore
/// leaves it behind, so an incomplete tree never passes for a complete one.
pub const IN_PROGRESS_MARKER: &str = ".pg_hardstorage-restore-in-progress";

fn restore_file(
    repo: &Repository,
    index: &RepoIndex,
    aead: Option<&phs_encrypt::Aead>,
    window: &mut Window,
    e: &Entry,
    dest: &Path,
) -> Result<u64, Problem> {
    write_file(repo, index, aead, window, e, dest).map_err(|p| {
        // Never leave a file whose content did not verify.
        let _ = std::fs::remove_file(dest);
        p.with("path", e.path.clone())
    })
}

fn write_file(
    repo: &Repository,
    index: &RepoIndex,
    aead: Option<&phs_encrypt::Aead>,
    window: &mut Window,
    e: &Entry,
    dest: &Path,
) -> Result<u64, Problem> {
    let mut f = File::create(dest).map_err(|er| werr(dest, er))?;
    let (written, tail_hole) = match &e.pages {
        Some(map) => write_pages(repo, index, aead, window, e, map, &mut f, dest)?,
        None => write_chunks(repo, index, aead, window, e, &mut f, dest)?,
    };
    // A trailing hole was skipped, not written: give the file its length.
    if tail_hole || (written == 0 && e.size > 0) {
        f.set_len(written).map_err(|er| werr(dest, er))?;
    }
    // Through the descriptor, not the path: no second directory lookup.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::fchown(&f, Some(e.uid), Some(e.gid)).map_err(|er| werr(dest, er))?;
    }
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(e.mode))
        .map_err(|er| werr(dest, er))?;
    let t = system_time(e.mtime_s, e.mtime_ns);
    f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
        .map_err(|er| werr(dest, er))?;
    // Durability comes from one syncfs() at the end of the restore, not an
    // fsync per file (which made a 200,000-file restore take minutes).
    Ok(written)
}

/// Writes a file stored as a sequence of chunks; returns the bytes written
/// and whether it ended on a hole.
fn write_chunks(
    repo: &Repository,
    index: &RepoIndex,
    aead: Option<&phs_encrypt::Aead>,
    window: &mut Window,
    e: &Entry,
    f: &mut File,
    dest: &Path,
) -> Result<(u64, bool), Problem> {
    let mut written = 0u64;
    let mut tail_hole = false;
    let mut i = 0;
    while i < e.chunks.len() {
        // A run of chunks stored back to back in one pack: one ranged read.
        let (pack, first) = index.locate(&e.chunks[i].0)?;
        let mut end = first.offset + first.len as u64;
        let mut j = i + 1;
        while j < e.chunks.len() {
            let (p2, l2) = index.locate(&e.chunks[j].0)?;
            if p2 != pack || l2.offset != end || end - first.offset + l2.len as u64 > MAX_RUN {
                break;
            }
            end += l2.len as u64;
            j += 1;
        }
        let run = window.get(repo, pack, first.offset..end, index.pack_end(&first))?;
        for (id, len) in &e.chunks[i..j] {
            let (_, loc) = index.locate(id)?;
            let s = (loc.offset - first.offset) as usize;
            let env = run
                .get(s..s + loc.len as usize)
                .ok_or_else(|| Problem::new("verify.truncated", format!("{pack}: short range")))?;
            let plain = decode_chunk(repo, aead, id, env)?;
            if plain.len() != *len as usize {
                return Err(Problem::new(
                    "verify.checksum_mismatch",
                    format!(
                        "chunk {} has {} bytes, manifest says {len}",
                        id.to_hex(),
                        plain.len()
                    ),
                ));
            }
            tail_hole = write_sparse(f, &plain).map_err(|er| werr(dest, er))?;
            written += plain.len() as u64;
        }
        i = j;
    }
    Ok((written, tail_hole))
}

/// Decoded runs a paged file's restore keeps at hand (at most 16 MiB).
const RUN_CACHE: usize = 64;

/// Writes a paged file: each page from the run and slot its map names.
#[allow(clippy::too_many_arguments)]
fn write_pages(
    repo: &Repository,
    index: &RepoIndex,
    aead: Option<&phs_encrypt::Aead>,
    window: &mut Window,
    e: &Entry,
    map: &pg_hardstorage_engine::format::PageMap,
    f: &mut File,
    dest: &Path,
) -> Result<(u64, bool), Problem> {
    let records = map.decode(&e.chunks)?;
    let ps = map.page_size as usize;
    let mut cache: std::collections::VecDeque<(u32, Vec<u8>)> = Default::default();
    let (mut written, mut tail_hole) = (0u64, false);
    let mut i = 0;
    while i < records.len() {
        // Pages that follow each other in one run: one write.
        let r = records[i];
        let mut j = i + 1;
        while j < records.len()
            && records[j].run == r.run
            && records[j].slot as usize == r.slot as usize + (j - i)
        {
            j += 1;
        }
        if !cache.iter().any(|(run, _)| *run == r.run) {
            let (id, len) = &e.chunks[r.run as usize];
            let (pack, loc) = index.locate(id)?;
            let env = window.get(
                repo,
                pack,
                loc.offset..loc.offset + loc.len as u64,
                index.pack_end(&loc),
            )?;
            let plain = decode_chunk(repo, aead, id, &env)?;
            if plain.len() != *len as usize {
                return Err(Problem::new(
                    "verify.checksum_mismatch",
                    format!(
                        "run {} has {} bytes, manifest says {len}",
                        id.to_hex(),
                        plain.len()
                    ),
                ));
            }
            if cache.len() == RUN_CACHE {
                cache.pop_front();
            }
            cache.push_back((r.run, plain.to_vec()));
        }
        let run = cache
            .iter()
            .find(|(run, _)| *run == r.run)
            .map(|(_, d)| d)
            .ok_or_else(|| Problem::internal("decoded run vanished"))?;
        let s = r.slot as usize * ps;
        let data = &run[s..s + (j - i) * ps];
        // The page's record also names its hash: a run that verified but
        // holds another page at this slot would be a writer's bug; catch it.
        for (k, page) in data.chunks_exact(ps).enumerate() {
            let h = blake3::keyed_hash(&repo.keys.id, page);
            if h.as_bytes()[..records[i + k].hash.len()] != records[i + k].hash {
                return Err(Problem::new(
                    "verify.checksum_mismatch",
                    format!("page {} does not match its page map", i + k),
                ));
            }
        }
        tail_hole = write_sparse(f, data).map_err(|er| werr(dest, er))?;
        written += data.len() as u64;
        i = j;
    }
    Ok((written, tail_hole))
}

/// Writes `data`, seeking over all-zero 4 KiB blocks so holes stay holes.
/// Returns whether it ended on a hole (the file then needs its length set).
fn write_sparse(f: &mut File, data: &[u8]) -> std::io::Result<bool> {
    let mut hole = false;
    for block in data.chunks(4096) {
        hole = block.iter().all(|b| *b == 0);
        if hole {
            f.seek(SeekFrom::Current(block.len() as i64))?;
        } else {
            f.write_all(block)?;
        }
    }
    Ok(hole)
}

/// Flushes everything written under `target` to stable storage.
fn sync_filesystem(target: &Path) -> Result<(), Problem> {
    let dir = File::open(target).map_err(|e| werr(target, e))?;
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a valid open descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(werr(target, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// `mtime_s` seconds (possibly negative) plus `mtime_ns` after the epoch.
fn system_time(secs: i64, nanos: u32) -> std::time::SystemTime {
    use std::time::{Duration, UNIX_EPOCH};
    let base = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    base.and_then(|b| b.checked_add(Duration::from_nanos(nanos as u64)))
        .unwrap_or(UNIX_EPOCH)
}

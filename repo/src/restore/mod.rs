//! Restoring a backup: plan → fetch → write.
//!
//! [`plan`] maps every chunk the manifest references to every place it
//! lands and groups the chunks by pack into coalesced ranged reads;
//! [`fetch`] runs those reads in pack order on `threads` readers, decoding
//! each chunk once (decrypt, decompress, re-hash) and scattering it; [`dest`]
//! creates and writes everything beneath the target (and tablespace
//! directories) without ever following a link. The target keeps an
//! in-progress marker until every file verified and was synced, so a failed
//! or killed restore never passes for a complete one.

use pg_hardstorage_engine::Code;
mod delta;
mod dest;
mod fetch;
pub mod pgverify;
mod plan;
mod preflight;
mod recovery;
pub mod spool;

pub use recovery::{command_word, Recovery, RecoveryTarget, Standby, DEFAULT_PREFETCH};

use crate::index::RepoIndex;
use crate::Repository;
use dest::Root;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{Entry, EntryKind, Manifest};
use pg_hardstorage_engine::Problem;
use preflight::{absolute, preflight, preflight_dir};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    /// Into an existing directory of the same cluster: write only what
    /// differs, remove what the backup does not have.
    pub delta: bool,
    /// Directories to look for `pg_verifybackup` in first
    /// ([`pgverify::BINDIRS_ENV`]); the tool of the backup's major is used.
    pub pg_bindirs: Vec<PathBuf>,
    /// Start the restored PostgreSQL cluster as a standby (`--standby`).
    pub standby: Option<Standby>,
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

/// The most bytes one reader holds: its ranged read (at most a pack plus
/// slack, so a restore's GETs are bounded by the packs it touches) and the
/// chunk it decodes. A restore holds at most `threads` of them.
fn max_read(repo: &Repository) -> u64 {
    (repo.config.pack_target_bytes + (4 << 20)).clamp(8 << 20, 128 << 20)
}

/// How often `restore_progress` is published.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Where entries land: root 0 is the target; tablespace contents
/// (`pg_tblspc/<oid>/…`) go beneath their tablespace directory (a root of
/// their own), linked from `pg_tblspc/<oid>` as PostgreSQL requires.
struct Places {
    target: PathBuf,
    /// `("pg_tblspc/<oid>", directory)`; root `i + 1`.
    tablespaces: Vec<(String, PathBuf)>,
}

impl Places {
    fn new(m: &Manifest, opts: &RestoreOptions) -> Result<Places, Problem> {
        let mut tablespaces = Vec::new();
        for ts in m.source["tablespaces"].as_array().into_iter().flatten() {
            let (Some(oid), Some(loc)) = (ts["oid"].as_str(), ts["location"].as_str()) else {
                return Err(Problem::new(
                    Code::VerifyMalformed,
                    "manifest: bad tablespace record",
                ));
            };
            if oid.is_empty() || !oid.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Problem::new(
                    Code::VerifyMalformed,
                    format!("manifest: tablespace oid {oid:?} is not a number"),
                ));
            }
            let dir = opts
                .tablespace_mapping
                .iter()
                .find(|(old, _)| old == loc)
                .map(|(_, new)| new.clone())
                .unwrap_or_else(|| PathBuf::from(loc));
            absolute(&dir, "tablespace directory")?;
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

    /// The root an entry lands beneath and its path there (empty: the root).
    fn place(&self, e: &Entry) -> Result<(usize, Vec<u8>), Problem> {
        let raw = e.path_bytes()?;
        if raw == b"." {
            return Ok((0, Vec::new()));
        }
        for (i, (prefix, _)) in self.tablespaces.iter().enumerate() {
            let p = prefix.as_bytes();
            if raw == p {
                return Ok((i + 1, Vec::new()));
            }
            if raw.starts_with(p) && raw.get(p.len()) == Some(&b'/') {
                return Ok((i + 1, raw[p.len() + 1..].to_vec()));
            }
        }
        Ok((0, raw))
    }

    fn open_roots(&self) -> Result<Vec<Root>, Problem> {
        let mut roots = vec![Root::open(&self.target)?];
        for (_, dir) in &self.tablespaces {
            roots.push(Root::open(dir)?);
        }
        Ok(roots)
    }

    fn link_tablespaces(&self, target: &Root) -> Result<(), Problem> {
        for (prefix, dir) in &self.tablespaces {
            target.mkdir(b"pg_tblspc")?;
            target.symlink(prefix.as_bytes(), dir.as_os_str().as_encoded_bytes())?;
        }
        Ok(())
    }
}

pub fn restore(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    bus: &EventBus,
) -> Result<RestoreSummary, Problem> {
    let mut subj = Map::new();
    subj.insert("deployment".into(), json!(m.deployment));
    subj.insert("backup_id".into(), json!(m.backup_id));
    bus.publish(Event::new(Severity::Info, "restore_started").subject(subj.clone()));
    let r = crate::lock::Lease::reader(repo, &m.deployment, "restore")
        .and_then(|_lease| run(repo, m, opts, bus, &subj));
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
        opts.delta,
        m.source["system_identifier"].as_str(),
    )?;
    m.validate()?;
    if let Some(r) = &opts.recovery {
        // A setting that cannot be written safely is refused before any write.
        recovery::recovery_conf(r, &opts.target.join(recovery::SPOOL), &m.backup_id)?;
    }
    if let Some(s) = &opts.standby {
        if opts.recovery.is_some() || m.source["type"] != "postgres" {
            return Err(Problem::new(
                Code::UsageInvalidArgument,
                "--standby restores a PostgreSQL backup as a standby; it takes no recovery target (--to, --to-lsn, --to-name)",
            )
            .suggest("Drop the recovery target, or --standby", None));
        }
        recovery::standby_conf(s, &m.backup_id)?;
    }
    Places::new(m, opts)
}

fn run(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    bus: &EventBus,
    subj: &Map<String, Value>,
) -> Result<RestoreSummary, Problem> {
    let t0 = Instant::now();
    let places = checked_places(m, opts)?;
    let index = RepoIndex::load(repo)?;
    let mut files = Vec::new();
    for e in restored(m).filter(|e| e.kind == EntryKind::File) {
        let (root, rel) = places.place(e)?;
        files.push((root, rel, e));
    }
    // Every chunk is located before a byte is written.
    locate_all(&index, &files)?;
    let roots = places.open_roots()?;
    let target = &roots[0];
    let marker = IN_PROGRESS_MARKER.as_bytes();
    target.create_file(marker, 0)?;
    target.append(marker, format!("{}\n", m.backup_id).as_bytes())?;
    if opts.delta {
        prune(m, &places, &roots)?;
    }
    make_tree(m, &places, &roots)?;
    let progress = progress_for(&files);
    let batches = Batches {
        repo,
        index: &index,
        roots: &roots,
        threads: opts.threads,
        delta: opts.delta,
        finish: true,
        budget: PLAN_RECORDS,
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reporter = s.spawn(|| report(bus, subj, &progress, &done, t0));
        let r = batches.run(&files, &progress);
        done.store(true, Ordering::Release);
        reporter.thread().unpark();
        let _ = reporter.join();
        r
    })?;
    finish_tree(m, &places, &roots)?;
    if let Some(r) = &opts.recovery {
        let root = m
            .entries
            .first()
            .ok_or_else(|| Problem::new(Code::VerifyMalformed, "manifest has no root entry"))?;
        stage_wal(repo, &index, m, target, r, root, opts.threads)?;
        recovery::write_recovery(target, r, root, &m.backup_id)?;
    }
    if let Some(s) = &opts.standby {
        let root = m
            .entries
            .first()
            .ok_or_else(|| Problem::new(Code::VerifyMalformed, "manifest has no root entry"))?;
        recovery::write_standby(target, s, root, &m.backup_id)?;
    }
    for r in &roots {
        r.sync()?;
    }
    let has_pg_manifest = m.entries.iter().any(|e| e.path == "backup_manifest");
    let pg_check = if m.source["type"] == "postgres" && has_pg_manifest {
        pgverify::run(&opts.target, opts.verify, &opts.pg_bindirs, bus)?
    } else {
        "not_applicable"
    };
    target.remove_file(marker)?;
    target.sync()?;
    Ok(RestoreSummary {
        backup_id: m.backup_id.clone(),
        target: opts.target.display().to_string(),
        files: files.len() as u64,
        bytes: progress.bytes.load(Ordering::Relaxed),
        duration_seconds: (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        verified: true,
        pg_verifybackup: pg_check.to_string(),
    })
}

/// Copies every WAL file recovery may need, verified, into the spool
/// [`recovery::SPOOL`] in the target, owned like the data directory, so
/// `restore_command` only moves files and needs no key material.
fn stage_wal(
    repo: &Repository,
    index: &RepoIndex,
    m: &Manifest,
    target: &Root,
    r: &Recovery,
    root: &Entry,
    threads: usize,
) -> Result<(), Problem> {
    let spool = recovery::SPOOL.as_bytes();
    target.mkdir(spool)?;
    crate::parallel::for_each(
        &r.staged,
        threads,
        1,
        || (),
        |_, name| {
            let data = crate::wal::read_with(repo, index, &m.deployment, name)?;
            let rel = [spool, b"/", name.as_bytes()].concat();
            let f = target.create_file(&rel, 0)?;
            let werr = |e| dest::werr(&target.path().join(recovery::SPOOL).join(name), e);
            std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).map_err(werr)?;
            target.finish(
                &rel,
                &Entry {
                    mode: 0o600,
                    ..root.clone()
                },
                false,
            )
        },
    )?;
    target.finish(
        spool,
        &Entry {
            mode: 0o700,
            ..root.clone()
        },
        true,
    )
}

/// Files a PostgreSQL base backup may hold that a restore leaves out: a
/// backup taken on a standby holds its `standby.signal`, which would start
/// the restored cluster as a standby of the live primary, following it past
/// the backup. The restore writes the recovery it is asked for instead
/// (`recovery.signal` for a point in time). pg_verifybackup ignores both.
const NOT_RESTORED: [&str; 2] = ["standby.signal", "recovery.signal"];

/// The manifest's entries a restore writes, in manifest order.
fn restored(m: &Manifest) -> impl DoubleEndedIterator<Item = &Entry> {
    let pg = m.source["type"] == "postgres";
    m.entries
        .iter()
        .filter(move |e| !(pg && NOT_RESTORED.contains(&e.path.as_str())))
}

/// Delta: removes from the roots whatever the manifest does not place there.
fn prune(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    let placed = restored(m)
        .map(|e| places.place(e).map(|(root, rel)| (root, rel, e.kind)))
        .collect::<Result<Vec<_>, Problem>>()?;
    delta::prune(roots, &delta::expected(roots.len(), placed.into_iter())).map(|_| ())
}

/// A file to restore: its root, its path beneath it, its entry.
type FileIn<'m> = (usize, Vec<u8>, &'m Entry);

/// Plan records (pages of page-mapped files, chunks of the others) one
/// batch may hold. The plan is built and fetched a batch of files at a
/// time, so its memory (about 100 bytes a record: ~26 MiB) does not grow
/// with the backup; only a pack read across a batch boundary is read twice.
const PLAN_RECORDS: u64 = 1 << 18;

/// What planning `e` holds in memory, in records.
fn records(e: &Entry) -> u64 {
    let pages = e
        .pages
        .as_ref()
        .map_or(0, |m| e.size / u64::from(m.page_size.max(1)));
    pages + e.chunks.len() as u64
}

/// Consecutive runs of `files` of at most `budget` records each (a file
/// larger than that is a batch of its own).
fn batches(files: &[FileIn], budget: u64) -> Vec<std::ops::Range<usize>> {
    let (mut out, mut start, mut held) = (Vec::new(), 0, 0u64);
    for (i, f) in files.iter().enumerate() {
        let r = records(f.2);
        if i > start && held + r > budget {
            out.push(start..i);
            (start, held) = (i, 0);
        }
        held += r;
    }
    if start < files.len() {
        out.push(start..files.len());
    }
    out
}

/// Fails before anything is written if the index lacks a chunk.
fn locate_all(index: &RepoIndex, files: &[FileIn]) -> Result<(), Problem> {
    for (_, _, e) in files {
        for (id, _) in &e.chunks {
            index.locate(id)?;
        }
    }
    Ok(())
}

fn progress_for(files: &[FileIn]) -> fetch::Progress {
    fetch::Progress {
        bytes_total: files.iter().map(|f| f.2.size).sum::<u64>().into(),
        files_total: files.len() as u64,
        ..Default::default()
    }
}

/// Plans and fetches files a batch at a time ([`PLAN_RECORDS`]).
struct Batches<'a> {
    repo: &'a Repository,
    index: &'a RepoIndex,
    roots: &'a [Root],
    threads: usize,
    /// Compare each batch with what the target holds first.
    delta: bool,
    /// Set each file's mode, owner and times once it is written.
    finish: bool,
    /// Records per batch: [`PLAN_RECORDS`].
    budget: u64,
}

impl Batches<'_> {
    fn run(&self, files: &[FileIn], progress: &fetch::Progress) -> Result<(), Problem> {
        let mut packs = std::collections::HashSet::new();
        for b in batches(files, self.budget) {
            let part = &files[b];
            let have = match self.delta {
                true => Some(delta::compare(self.repo, self.roots, part, self.threads)?),
                false => None,
            };
            let plan = plan::plan(self.index, part, max_read(self.repo), have.as_deref())?;
            // The sizes counted for this batch become what it writes.
            let sizes: u64 = part.iter().map(|f| f.2.size).sum();
            progress
                .bytes_total
                .fetch_add(plan.bytes_total, Ordering::Relaxed);
            progress.bytes_total.fetch_sub(sizes, Ordering::Relaxed);
            packs.extend(plan.packs.iter().copied());
            progress
                .packs_touched
                .store(packs.len() as u64, Ordering::Relaxed);
            fetch::fetch(self.repo, &plan, self.roots, self.threads, progress)?;
            if self.finish {
                crate::parallel::for_each(
                    &plan.files,
                    self.threads,
                    64,
                    || (),
                    |_, f| self.roots[f.root].finish(&f.rel, f.entry, false),
                )?;
            }
        }
        Ok(())
    }
}

/// Directories (parents first, as the manifest lists them) and the links
/// to tablespace directories.
fn make_tree(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    for e in restored(m).filter(|e| e.kind == EntryKind::Dir) {
        let (root, rel) = places.place(e)?;
        roots[root].mkdir(&rel)?;
    }
    places.link_tablespaces(&roots[0])
}

/// Symbolic links, then directories' modes, owners and times, deepest
/// first, so writing into them does not disturb the times just set.
fn finish_tree(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    for e in restored(m).filter(|e| e.kind == EntryKind::Symlink) {
        let (root, rel) = places.place(e)?;
        let link = e.target.clone().unwrap_or_default();
        roots[root].symlink(&rel, link.as_bytes())?;
        roots[root].finish_symlink(&rel, e)?;
    }
    for e in restored(m).rev().filter(|e| e.kind == EntryKind::Dir) {
        let (root, rel) = places.place(e)?;
        roots[root].finish(&rel, e, true)?;
    }
    Ok(())
}

/// Publishes `restore_progress` every [`PROGRESS_EVERY`] until `done`.
fn report(
    bus: &EventBus,
    subj: &Map<String, Value>,
    p: &fetch::Progress,
    done: &std::sync::atomic::AtomicBool,
    t0: Instant,
) {
    loop {
        std::thread::park_timeout(PROGRESS_EVERY);
        let finished = done.load(Ordering::Acquire);
        let bytes = p.bytes.load(Ordering::Relaxed);
        let total = p.bytes_total.load(Ordering::Relaxed);
        let secs = t0.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes as f64 / secs;
        let eta = (rate > 0.0).then(|| (total.saturating_sub(bytes) as f64 / rate).round() as u64);
        bus.publish(
            Event::new(Severity::Info, "restore_progress")
                .subject(subj.clone())
                .body(json!({
                    "bytes_done": bytes,
                    "bytes_total": total,
                    "files_done": p.files_done.load(Ordering::Relaxed),
                    "files_total": p.files_total,
                    "requests": p.requests.load(Ordering::Relaxed),
                    "packs_touched": p.packs_touched.load(Ordering::Relaxed),
                    "throughput_mb_s": (rate / 1e6 * 10.0).round() / 10.0,
                    "eta_seconds": eta,
                })),
        );
        if finished {
            return;
        }
    }
}

/// Plans and fetches `entries` (files at the top of `target`) on `threads`
/// readers, timed from the plan to the last write; no marker, no metadata,
/// no sync (`bench --restore`).
pub(crate) fn fetch_only(
    repo: &Repository,
    entries: &[Entry],
    target: &Path,
    threads: usize,
) -> Result<crate::bench_restore::Figures, Problem> {
    let t0 = Instant::now();
    let index = RepoIndex::load(repo)?;
    let files = entries
        .iter()
        .map(|e| Ok((0, e.path_bytes()?, e)))
        .collect::<Result<Vec<_>, Problem>>()?;
    let roots = [Root::open(target)?];
    let progress = progress_for(&files);
    let batches = Batches {
        repo,
        index: &index,
        roots: &roots,
        threads,
        delta: false,
        finish: false,
        budget: PLAN_RECORDS,
    };
    batches.run(&files, &progress)?;
    Ok(crate::bench_restore::Figures {
        bytes: progress.bytes.load(Ordering::Relaxed),
        seconds: t0.elapsed().as_secs_f64(),
        packs_touched: progress.packs_touched.load(Ordering::Relaxed) as usize,
        requests: progress.requests.load(Ordering::Relaxed),
    })
}

/// Present in the target while a restore runs; removed only after every
/// file verified and the filesystem was synced. A failed or killed restore
/// leaves it behind, so an incomplete tree never passes for a complete one.
pub const IN_PROGRESS_MARKER: &str = ".pg_hardstorage-restore-in-progress";

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64, chunks: usize) -> Entry {
        Entry {
            path: "f".into(),
            path_hex: false,
            kind: EntryKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_s: 0,
            mtime_ns: 0,
            size,
            target: None,
            chunks: vec![(pg_hardstorage_engine::stage::ChunkId([0; 32]), 1); chunks],
            pages: None,
        }
    }

    #[test]
    fn files_are_planned_in_batches_within_the_record_budget() {
        let es = [
            entry(0, 3),
            entry(0, 4),
            entry(0, 10),
            entry(0, 1),
            entry(0, 2),
        ];
        let files: Vec<FileIn> = es.iter().map(|e| (0, Vec::new(), e)).collect();
        // 3+4 fit in 8; 10 is alone (larger than the budget); then 1+2.
        assert_eq!(batches(&files, 8), vec![0..2, 2..3, 3..5]);
        assert_eq!(batches(&files, 100), vec![0..5]);
        assert_eq!(
            batches(&files[..0], 8),
            Vec::<std::ops::Range<usize>>::new()
        );
        // A page-mapped file counts its pages.
        let mut paged = entry(64 * 8192, 1);
        paged.pages = Some(pg_hardstorage_engine::format::PageMap {
            page_size: 8192,
            records: String::new(),
        });
        assert_eq!(records(&paged), 65);
    }

    #[test]
    fn a_restore_in_many_small_batches_writes_what_one_batch_writes() {
        let repo = crate::testing::memory_repo();
        let opts = crate::bench::BenchOptions {
            size: 12 << 20,
            file_size: 1 << 20,
            compressibility: 0.5,
            dir: None,
            sample: 1 << 20,
            zstd_level: 1,
            pipeline: pg_hardstorage_engine::pipeline::PipelineConfig {
                workers: 2,
                pin_cores: false,
                ..Default::default()
            },
        };
        let entries = crate::bench_restore::back_up_generated(&repo, &opts, &EventBus::new())
            .expect("backup");
        let index = RepoIndex::load(&repo).expect("index");
        let files: Vec<FileIn> = entries
            .iter()
            .map(|e| (0, e.path_bytes().expect("path"), e))
            .collect();
        let tmp = tempfile::tempdir().expect("tmp");
        let restore = |dir: &str, budget: u64| {
            let target = tmp.path().join(dir);
            std::fs::create_dir(&target).expect("mkdir");
            let roots = [Root::open(&target).expect("root")];
            let progress = progress_for(&files);
            let b = Batches {
                repo: &repo,
                index: &index,
                roots: &roots,
                threads: 2,
                delta: false,
                finish: false,
                budget,
            };
            b.run(&files, &progress).expect("restore");
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let got = (n(&progress.bytes), n(&progress.bytes_total));
            assert_eq!(got, (12 << 20, 12 << 20), "{dir}");
            assert_eq!(n(&progress.files_done), files.len() as u64, "{dir}");
            (target, n(&progress.packs_touched), n(&progress.requests))
        };
        let (one, packs_one, _) = restore("one", u64::MAX);
        // One file per batch.
        let (many, packs_many, requests) = restore("many", 1);
        assert_eq!(packs_many, packs_one, "packs are counted once");
        assert!(requests >= packs_many);
        for e in &entries {
            let a = std::fs::read(one.join(&e.path)).expect("read");
            let b = std::fs::read(many.join(&e.path)).expect("read");
            assert!(a == b && a.len() as u64 == e.size, "{}", e.path);
        }
    }
}

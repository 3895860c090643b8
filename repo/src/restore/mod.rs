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

pub use recovery::{command_word, Recovery, RecoveryTarget, DEFAULT_PREFETCH};

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
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::File) {
        let (root, rel) = places.place(e)?;
        files.push((root, rel, e));
    }
    // Every chunk is located before a byte is written.
    let mut plan = plan::plan(&index, files.clone(), max_read(repo), None)?;
    let roots = places.open_roots()?;
    let target = &roots[0];
    let marker = IN_PROGRESS_MARKER.as_bytes();
    target.create_file(marker, 0)?;
    target.append(marker, format!("{}\n", m.backup_id).as_bytes())?;
    if opts.delta {
        prune(m, &places, &roots)?;
    }
    make_tree(m, &places, &roots)?;
    if opts.delta {
        let have = delta::compare(repo, &roots, &files, opts.threads)?;
        plan = plan::plan(&index, files, max_read(repo), Some(&have))?;
    }
    let progress = fetch::Progress::default();
    fetch_reporting(
        repo,
        &plan,
        &roots,
        opts.threads,
        &progress,
        (bus, subj, t0),
    )?;
    crate::parallel::for_each(
        &plan.files,
        opts.threads,
        64,
        || (),
        |_, f| roots[f.root].finish(&f.rel, f.entry, false),
    )?;
    finish_tree(m, &places, &roots)?;
    if let Some(r) = &opts.recovery {
        let root = m
            .entries
            .first()
            .ok_or_else(|| Problem::new(Code::VerifyMalformed, "manifest has no root entry"))?;
        stage_wal(repo, &index, m, target, r, root, opts.threads)?;
        recovery::write_recovery(target, r, root, &m.backup_id)?;
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
        files: plan.files.len() as u64,
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

/// Delta: removes from the roots whatever the manifest does not place there.
fn prune(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    let placed = m
        .entries
        .iter()
        .map(|e| places.place(e).map(|(root, rel)| (root, rel, e.kind)))
        .collect::<Result<Vec<_>, Problem>>()?;
    delta::prune(roots, &delta::expected(roots.len(), placed.into_iter())).map(|_| ())
}

/// Runs the fetch with `restore_progress` published beside it.
fn fetch_reporting(
    repo: &Repository,
    plan: &plan::Plan,
    roots: &[Root],
    threads: usize,
    progress: &fetch::Progress,
    (bus, subj, t0): (&EventBus, &Map<String, Value>, Instant),
) -> Result<(), Problem> {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let reporter = s.spawn(|| report(bus, subj, plan, progress, &done, t0));
        let r = fetch::fetch(repo, plan, roots, threads, progress);
        done.store(true, Ordering::Release);
        reporter.thread().unpark();
        let _ = reporter.join();
        r
    })
}

/// Directories (parents first, as the manifest lists them) and the links
/// to tablespace directories.
fn make_tree(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let (root, rel) = places.place(e)?;
        roots[root].mkdir(&rel)?;
    }
    places.link_tablespaces(&roots[0])
}

/// Symbolic links, then directories' modes, owners and times, deepest
/// first, so writing into them does not disturb the times just set.
fn finish_tree(m: &Manifest, places: &Places, roots: &[Root]) -> Result<(), Problem> {
    for e in m.entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
        let (root, rel) = places.place(e)?;
        let link = e.target.clone().unwrap_or_default();
        roots[root].symlink(&rel, link.as_bytes())?;
        roots[root].finish_symlink(&rel, e)?;
    }
    for e in m.entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        let (root, rel) = places.place(e)?;
        roots[root].finish(&rel, e, true)?;
    }
    Ok(())
}

/// Publishes `restore_progress` every [`PROGRESS_EVERY`] until `done`.
fn report(
    bus: &EventBus,
    subj: &Map<String, Value>,
    plan: &plan::Plan,
    p: &fetch::Progress,
    done: &std::sync::atomic::AtomicBool,
    t0: Instant,
) {
    let total = plan.bytes_total;
    loop {
        std::thread::park_timeout(PROGRESS_EVERY);
        let finished = done.load(Ordering::Acquire);
        let bytes = p.bytes.load(Ordering::Relaxed);
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
                    "files_total": plan.files.len(),
                    "requests": p.requests.load(Ordering::Relaxed),
                    "packs_touched": plan.packs_touched,
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
    let plan = plan::plan(&index, files, max_read(repo), None)?;
    let roots = [Root::open(target)?];
    let progress = fetch::Progress::default();
    fetch::fetch(repo, &plan, &roots, threads, &progress)?;
    Ok(crate::bench_restore::Figures {
        bytes: progress.bytes.load(Ordering::Relaxed),
        seconds: t0.elapsed().as_secs_f64(),
        packs_touched: plan.packs_touched,
        requests: progress.requests.load(Ordering::Relaxed),
    })
}

/// Present in the target while a restore runs; removed only after every
/// file verified and the filesystem was synced. A failed or killed restore
/// leaves it behind, so an incomplete tree never passes for a complete one.
pub const IN_PROGRESS_MARKER: &str = ".pg_hardstorage-restore-in-progress";

//! Directory backups: walk, run the pipeline, commit the manifest last.

use crate::index::{write_index, RepoIndex};
use crate::lock::{GcWait, Lease};
use crate::{deployment, Repository};
use bytes::Bytes;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{
    BackupStats, Entry, EntryKind, Manifest, FORMAT_VERSION, MANIFEST_MAGIC,
};
use pg_hardstorage_engine::pipeline::{Pipeline, PipelineConfig, Report, Stages};
use pg_hardstorage_engine::stage::{Source, StageFactory};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_read::{Backend, FileEntry, FileSource};
use phs_store::{PackSink, PackSinkConfig};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub pipeline: PipelineConfig,
    /// `None`: probe.
    pub read_backend: Option<Backend>,
    /// PostgreSQL 17+: read every file even where the server could send
    /// only the blocks changed since the previous backup (`--full`).
    pub full: bool,
}

/// What `backup list` shows of each backup.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BackupSummary {
    pub backup_id: String,
    pub deployment: String,
    pub kind: String,
    pub started_at: String,
    pub finished_at: String,
    pub files: u64,
    pub bytes_logical: u64,
    pub bytes_added: u64,
    pub chunks: u64,
    /// Under an active legal hold.
    pub held: bool,
}

impl BackupSummary {
    pub fn of(m: &Manifest) -> Self {
        BackupSummary {
            backup_id: m.backup_id.clone(),
            deployment: m.deployment.clone(),
            kind: m.kind.clone(),
            started_at: m.started_at.clone(),
            finished_at: m.finished_at.clone(),
            files: m.stats.files,
            bytes_logical: m.stats.bytes_logical,
            bytes_added: m.stats.bytes_added,
            chunks: m.stats.chunks,
            held: false,
        }
    }
}

/// The CPU chain every backup runs: hash → dedup → compress → encrypt.
pub fn chain(repo: &Repository, dedup: Arc<phs_dedup::DedupIndex>) -> Vec<Box<dyn StageFactory>> {
    let mut c: Vec<Box<dyn StageFactory>> = vec![
        Box::new(phs_hash::KeyedHashFactory { key: repo.keys.id }),
        Box::new(phs_dedup::DedupFactory { index: dedup }),
    ];
    if let Some(level) = repo.zstd_level() {
        c.push(Box::new(phs_compress::ZstdFactory { level }));
    }
    c.push(Box::new(phs_encrypt::EncryptFactory {
        key: repo.encrypted().then_some(repo.keys.enc),
    }));
    c
}

pub fn snapshot_key(deployment: &str, backup_id: &str) -> String {
    format!("snapshots/{deployment}/{backup_id}")
}

fn stamp() -> String {
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_default()
}

/// A UTC stamp with a random suffix, unique without a lookup.
pub(crate) fn new_suffix_stamp() -> String {
    let mut r = [0u8; 3];
    let _ = getrandom::fill(&mut r);
    format!("{}-{}", stamp(), hex::encode(r))
}

/// A fresh backup id: `<deployment>.<kind>.<UTC stamp>`, suffixed only when taken.
pub(crate) fn new_backup_id(
    repo: &Repository,
    deployment: &str,
    kind: &str,
) -> Result<String, Problem> {
    let base = format!("{deployment}.{kind}.{}", stamp());
    for n in 1..1000 {
        let id = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if repo.store.head(&snapshot_key(deployment, &id))?.is_none()
            && !crate::lifecycle::id_has_records(repo, deployment, &id)?
        {
            return Ok(id);
        }
    }
    Err(Problem::internal("could not find a free backup id"))
}

fn subject(deployment: &str, backup_id: &str) -> Map<String, Value> {
    let mut s = Map::new();
    s.insert("deployment".into(), json!(deployment));
    s.insert("backup_id".into(), json!(backup_id));
    s
}

/// Walks `root` depth-first in byte order of names: the root itself first
/// (path "."), directories before their contents.
pub fn walk(root: &Path, bus: &EventBus) -> Result<(Vec<Entry>, Vec<PathBuf>), Problem> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| {
        Problem::io(
            Code::BackupSourceUnreadable,
            format!("source {}", root.display()),
            &e,
        )
        .suggest("Check the deployment's --path", None)
    })?;
    if !meta.is_dir() {
        return Err(Problem::new(
            Code::BackupSourceUnreadable,
            format!("source {} is not a directory", root.display()),
        ));
    }
    let mut entries = vec![entry_of(b".", &meta, None)];
    let mut paths = vec![root.to_path_buf()];
    walk_dir(root, b"", &mut entries, &mut paths, bus)?;
    Ok((entries, paths))
}

fn entry_of(rel: &[u8], m: &std::fs::Metadata, target: Option<String>) -> Entry {
    let kind = if m.file_type().is_symlink() {
        EntryKind::Symlink
    } else if m.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File
    };
    let mut e = Entry {
        path: String::new(),
        path_hex: false,
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_s: m.mtime(),
        mtime_ns: m.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: if kind == EntryKind::File { m.len() } else { 0 },
        target,
        chunks: Vec::new(),
        pages: None,
    };
    e.set_path_bytes(rel);
    e
}

fn walk_dir(
    dir: &Path,
    rel: &[u8],
    entries: &mut Vec<Entry>,
    paths: &mut Vec<PathBuf>,
    bus: &EventBus,
) -> Result<(), Problem> {
    let unreadable = |e: std::io::Error| {
        Problem::io(
            Code::BackupSourceUnreadable,
            format!("list {}", dir.display()),
            &e,
        )
    };
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unreadable)?;
    children.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    for c in children {
        let path = c.path();
        let name = c.file_name();
        let mut crel = rel.to_vec();
        if !crel.is_empty() {
            crel.push(b'/');
        }
        crel.extend_from_slice(name.as_bytes());
        let m = std::fs::symlink_metadata(&path).map_err(|e| {
            Problem::io(
                Code::BackupSourceUnreadable,
                format!("stat {}", path.display()),
                &e,
            )
        })?;
        let ft = m.file_type();
        if ft.is_symlink() {
            let t = std::fs::read_link(&path).map_err(|e| {
                Problem::io(
                    Code::BackupSourceUnreadable,
                    format!("readlink {}", path.display()),
                    &e,
                )
            })?;
            let target = String::from_utf8(t.as_os_str().as_bytes().to_vec()).map_err(|_| {
                Problem::new(
                    Code::BackupSourceUnreadable,
                    format!("symlink {} has a non-UTF-8 target", path.display()),
                )
            })?;
            entries.push(entry_of(&crel, &m, Some(target)));
            paths.push(path);
        } else if ft.is_dir() {
            entries.push(entry_of(&crel, &m, None));
            paths.push(path.clone());
            walk_dir(&path, &crel, entries, paths, bus)?;
        } else if ft.is_file() {
            entries.push(entry_of(&crel, &m, None));
            paths.push(path);
        } else {
            bus.publish(
                Event::new(Severity::Warning, "file_skipped")
                    .body(json!({"path": path.display().to_string(), "reason": "not a regular file, directory or symlink"})),
            );
        }
    }
    Ok(())
}

/// Takes a backup of any deployment: a directory tree or a PostgreSQL base backup.
pub fn take_backup(
    repo: &Repository,
    deployment: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<Manifest, Problem> {
    match deployment::get(repo, deployment)?.kind {
        deployment::Kind::Path => backup_path(repo, deployment, bus, opts),
        deployment::Kind::Postgres => crate::pgbackup::backup_postgres(repo, deployment, bus, opts),
    }
}

/// Runs one backup of a path deployment. Emits `backup_started`, progress,
/// and `backup_completed` or a final error frame.
pub fn backup_path(
    repo: &Repository,
    deployment: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<Manifest, Problem> {
    let d = deployment::get(repo, deployment)?;
    let root = PathBuf::from(d.path.clone().ok_or_else(|| {
        Problem::new(
            Code::DeploymentInvalid,
            format!("deployment {deployment:?} has no path"),
        )
    })?);
    let pending = Lease::acquire_writer(repo, deployment, "backup")?;
    let backup_id = new_backup_id(repo, deployment, "full")?;
    let subj = subject(deployment, &backup_id);
    let backend = match opts.read_backend {
        Some(b) => (b, "chosen by the caller".to_string()),
        None => {
            let p = phs_read::probe();
            (p.backend, p.reason)
        }
    };
    bus.publish(
        Event::new(Severity::Info, "backup_started")
            .subject(subj.clone())
            .body(json!({
                "source": root.display().to_string(),
                "workers": opts.pipeline.workers,
                "read_backend": match backend.0 { Backend::Uring => "io_uring", Backend::Pread => "pread" },
                "read_backend_reason": backend.1,
            })),
    );
    let opts = BackupOptions {
        read_backend: Some(backend.0),
        ..opts.clone()
    };
    let r = pending
        .wait_for_gc(repo, &GcWait::writer(bus, subj.clone()))
        .and_then(|lease| run_backup(repo, &lease, &d.name, &root, &backup_id, bus, &opts));
    match &r {
        Ok((m, report, verified)) => bus.publish(
            Event::new(Severity::Notice, "backup_completed")
                .subject(subj)
                .body(json!({
                    "backup_id": m.backup_id,
                    "verified": verified,
                    "duration_seconds": (report.duration.as_secs_f64() * 100.0).round() / 100.0,
                    "files": m.stats.files,
                    "bytes_logical": m.stats.bytes_logical,
                    "bytes_added": m.stats.bytes_added,
                    "chunks": m.stats.chunks,
                    "chunks_new": m.stats.chunks_new,
                    "dedup_ratio": if m.stats.bytes_added == 0 { 0.0 } else {
                        ((m.stats.bytes_logical as f64 / m.stats.bytes_added as f64) * 100.0).round() / 100.0
                    },
                })),
        ),
        Err(p) => bus.publish(Event::failure("backup_failed", &p.clone().with("backup_id", backup_id.clone()))),
    }
    r.map(|(m, _, _)| m)
}

#[allow(clippy::too_many_arguments)]
fn run_backup(
    repo: &Repository,
    lease: &Lease,
    deployment: &str,
    root: &Path,
    backup_id: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<(Manifest, Report, bool), Problem> {
    let started_at = pg_hardstorage_engine::event::now_rfc3339();
    let t0 = Instant::now();
    let (mut entries, paths) = walk(root, bus)?;
    let files: Vec<FileEntry> = entries
        .iter()
        .zip(&paths)
        .enumerate()
        .filter(|(_, (e, _))| e.kind == EntryKind::File)
        .map(|(i, (e, p))| FileEntry {
            index: i as u64,
            path: p.clone(),
            size: e.size,
        })
        .collect();
    let index = RepoIndex::load(repo)?;
    let dedup = Arc::new(index.dedup());
    drop(index);
    let backend = opts
        .read_backend
        .unwrap_or_else(|| phs_read::probe().backend);
    let source: Box<dyn Source> = Box::new(FileSource::new(files, backend));
    let report = run_pipeline(repo, source, dedup, bus, &opts.pipeline, None, &mut |c| {
        if let Some(e) = entries.get_mut(c.file as usize) {
            e.chunks.push((c.id, c.len));
        }
    })?;
    let stats = settle(&mut entries, &report);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        backup_id: backup_id.to_string(),
        deployment: deployment.to_string(),
        kind: "full".into(),
        source: json!({"type": "path", "path": root.display().to_string()}),
        started_at,
        finished_at: pg_hardstorage_engine::event::now_rfc3339(),
        chunker: repo.config.chunker.clone(),
        stats,
        entries,
    };
    ensure_indexed(repo, &manifest)?;
    lease.ensure_held()?;
    commit(repo, &manifest)?;
    let verified =
        crate::catalog::load_manifest(repo, &manifest.deployment, &manifest.backup_id).is_ok();
    let _ = t0;
    Ok((manifest, report, verified))
}

/// Sets each file's size to the bytes actually read (a file may have
/// changed size while it was read) and sums the backup's statistics.
pub(crate) fn settle(entries: &mut [Entry], report: &Report) -> BackupStats {
    let mut stats = BackupStats::default();
    for e in entries.iter_mut() {
        match e.kind {
            EntryKind::File => {
                if e.pages.is_none() {
                    e.size = e.chunks.iter().map(|(_, l)| *l as u64).sum();
                }
                stats.files += 1;
                stats.bytes_logical += e.size;
            }
            EntryKind::Dir => stats.dirs += 1,
            EntryKind::Symlink => stats.symlinks += 1,
        }
    }
    let snap = report.metrics.snapshot();
    stats.bytes_added = snap.bytes_physical;
    stats.chunks = snap.chunks;
    stats.chunks_new = snap.chunks_new;
    stats
}

/// Runs the standard pipeline from `source` into the repository's packs.
pub fn run_pipeline(
    repo: &Repository,
    source: Box<dyn Source>,
    dedup: Arc<phs_dedup::DedupIndex>,
    bus: &EventBus,
    cfg: &PipelineConfig,
    pages: Option<Arc<dyn phs_chunk::PagePlanner>>,
    on_chunk: &mut dyn FnMut(pg_hardstorage_engine::stage::ChunkRef),
) -> Result<Report, Problem> {
    let params = phs_chunk::Params::new(&repo.config.chunker)?;
    let splitter: Box<dyn pg_hardstorage_engine::stage::SplitterFactory> = match pages {
        Some(planner) => Box::new(phs_chunk::PageAwareFactory {
            cdc: params,
            key: repo.keys.id,
            planner,
            run_pages: crate::pages::RUN_PAGES,
        }),
        None => Box::new(phs_chunk::FastCdcFactory(params)),
    };
    let chain = chain(repo, dedup);
    let r2 = repo.clone();
    let sink = PackSink::new(
        repo.store.clone(),
        PackSinkConfig {
            pack_target_bytes: repo.config.pack_target_bytes as usize,
            uploaders: 2,
        },
        Arc::new(move |key, entries| write_index(&r2, key, entries)),
    );
    let mut p = Pipeline::new(cfg.clone(), Some(bus.clone()));
    p.run(
        Stages {
            source,
            splitter: splitter.as_ref(),
            chain: &chain,
            sink: Box::new(sink),
        },
        on_chunk,
    )
}

/// The commit point: the manifest is written only now, after every pack
/// and index it references is durable, and never over an existing one.
pub fn commit(repo: &Repository, m: &Manifest) -> Result<(), Problem> {
    let key = snapshot_key(&m.deployment, &m.backup_id);
    let body = serde_json::to_vec(m).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal(MANIFEST_MAGIC, &key, &body)?;
    if !repo.store.put_if_absent(&key, Bytes::from(sealed))? {
        return Err(Problem::new(
            Code::RepoLocked,
            format!("backup {} already exists", m.backup_id),
        ));
    }
    Ok(())
}

/// Before a commit: every chunk the manifest names must be in a durable,
/// indexed pack (a chunk deduplicated against, or a page run reused from
/// the previous backup, may have been quarantined since). A manifest that
/// would reference a missing chunk is never committed.
pub(crate) fn ensure_indexed(repo: &Repository, m: &Manifest) -> Result<(), Problem> {
    let index = RepoIndex::load(repo)?;
    for e in &m.entries {
        for (id, _) in &e.chunks {
            index.locate(id).map_err(|p| {
                p.context(format!("refusing to commit {}", m.backup_id))
                    .with("path", e.path.clone())
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_backup_never_takes_the_id_of_a_collected_deleted_one() {
        let repo = crate::testing::memory_repo();
        let first = new_backup_id(&repo, "d", "full").expect("id");
        // Its manifest was collected; its tombstone stays as record.
        repo.store
            .put(&format!("tombstones/d/{first}"), Bytes::from_static(b"t"))
            .expect("put");
        let second = new_backup_id(&repo, "d", "full").expect("id");
        assert_ne!(first, second, "would be born deleted");
        repo.store
            .put(&format!("holds/d/{second}"), Bytes::from_static(b"h"))
            .expect("put");
        let third = new_backup_id(&repo, "d", "full").expect("id");
        assert!(third != first && third != second, "{third}");
    }
}

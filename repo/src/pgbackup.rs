//! PostgreSQL base backups over the replication protocol.
//!
//! `BASE_BACKUP (… MANIFEST 'yes', WAL true)` streams the data directory as
//! tar, followed by PostgreSQL's own `backup_manifest`; both go through the
//! same pipeline as any file tree. With the WAL between the backup's start
//! and end included, a restored directory is consistent on its own and
//! `pg_verifybackup` can check it. (Continuous WAL archiving and
//! point-in-time recovery build on this.)

use crate::backup::{commit, new_backup_id, run_pipeline, settle, BackupOptions};
use crate::index::RepoIndex;
use crate::lock::{GcWait, Lease};
use crate::pages::RelationPlanner;
use crate::{deployment, Repository};
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{BackupStats, Entry, EntryKind, Manifest, FORMAT_VERSION};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_pg::{BaseBackupSource, Conn, ConnInfo};
use serde_json::json;
use std::sync::Arc;

fn entry(h: &phs_pg::TarEntry, chunks: Vec<(ChunkId, u32)>) -> Entry {
    let kind = match h.kind {
        phs_pg::tar::Kind::File => EntryKind::File,
        phs_pg::tar::Kind::Dir => EntryKind::Dir,
        phs_pg::tar::Kind::Symlink => EntryKind::Symlink,
    };
    let mut e = Entry {
        path: String::new(),
        path_hex: false,
        kind,
        mode: h.mode,
        uid: h.uid,
        gid: h.gid,
        mtime_s: h.mtime,
        mtime_ns: 0,
        size: chunks.iter().map(|(_, l)| *l as u64).sum(),
        target: (kind == EntryKind::Symlink).then(|| h.link.clone()),
        chunks,
        pages: None,
    };
    e.set_path_bytes(h.path.as_bytes());
    e
}

/// Checks the server before taking anything from it: the right cluster,
/// WAL level, and a bound on what a lagging slot may pin.
pub fn preflight(
    repo: &Repository,
    name: &str,
    conn: &mut Conn,
    bus: &EventBus,
) -> Result<phs_pg::SystemInfo, Problem> {
    let system = conn.identify_system()?;
    deployment::bind_system(repo, name, &system.system_identifier)?;
    if conn.show("wal_level")? == "minimal" {
        return Err(Problem::new(
            Code::PgReplicationDenied,
            "wal_level is minimal: base backups and WAL streaming need replica or logical",
        )
        .suggest(
            "Set wal_level = replica and restart PostgreSQL",
            Some("ALTER SYSTEM SET wal_level = replica".into()),
        ));
    }
    // Segment names and offsets assume 16 MiB segments: another size
    // (initdb --wal-segsize) is refused rather than archived wrongly.
    let segment = conn.show("wal_segment_size")?;
    if segment != "16MB" {
        return Err(Problem::new(
            Code::PgWalSegmentSizeUnsupported,
            format!("the server's wal_segment_size is {segment}; only 16MB is supported"),
        )
        .with("deployment", name)
        .suggest(
            "Back this cluster up with a tool that supports its segment size, or re-initialise it with the default --wal-segsize=16",
            None,
        ));
    }
    if conn.show("max_slot_wal_keep_size")? == "-1" {
        bus.publish(Event::new(Severity::Warning, "pg_preflight_warning").body(json!({
            "deployment": name,
            "setting": "max_slot_wal_keep_size",
            "value": "-1",
            "advice": "unbounded: if archiving stalls, the replication slot can fill the primary's disk; set a limit such as 64GB",
        })));
    }
    Ok(system)
}

/// The server's page size (`block_size`, 8192 unless PostgreSQL was built otherwise).
fn block_size(conn: &mut Conn) -> Result<u32, Problem> {
    let v = conn.show("block_size")?;
    v.parse::<u32>()
        .ok()
        .filter(|n| n.is_power_of_two() && (512..=65536).contains(n))
        .ok_or_else(|| {
            Problem::new(
                Code::PgProtocol,
                format!("server reports block_size {v:?}, not a page size"),
            )
        })
}

/// Takes a base backup of a postgres deployment.
pub fn backup_postgres(
    repo: &Repository,
    name: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<Manifest, Problem> {
    let d = deployment::get(repo, name)?;
    let ci = ConnInfo::parse(d.pg.as_deref().unwrap_or_default())?;
    let pending = Lease::acquire_writer(repo, name, "backup")?;
    let backup_id = new_backup_id(repo, name, "full")?;
    let mut subj = serde_json::Map::new();
    subj.insert("deployment".into(), json!(name));
    subj.insert("backup_id".into(), json!(backup_id));
    bus.publish(
        Event::new(Severity::Info, "backup_started")
            .subject(subj.clone())
            .body(json!({"source": "postgres", "workers": opts.pipeline.workers})),
    );
    let t0 = std::time::Instant::now();
    let r = pending
        .wait_for_gc(repo, &GcWait::writer(bus, subj.clone()))
        .and_then(|lease| run(repo, &lease, name, &ci, &backup_id, bus, opts));
    match &r {
        Ok((m, verified)) => bus.publish(
            Event::new(Severity::Notice, "backup_completed")
                .subject(subj)
                .body(json!({
                    "backup_id": m.backup_id,
                    "verified": verified,
                    "duration_seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
                    "files": m.stats.files,
                    "bytes_logical": m.stats.bytes_logical,
                    "bytes_added": m.stats.bytes_added,
                    "chunks": m.stats.chunks,
                    "chunks_new": m.stats.chunks_new,
                    "start_lsn": m.source["start_lsn"],
                    "end_lsn": m.source["end_lsn"],
                })),
        ),
        Err(p) => bus.publish(Event::failure(
            "backup_failed",
            &p.clone().with("backup_id", backup_id.clone()),
        )),
    }
    r.map(|(m, _)| m)
}

/// Takes the backup: incremental where the server can (PostgreSQL 17+
/// with `summarize_wal`, a previous backup, no `--full`); an incremental
/// attempt the server or the baseline refuses is taken again in full.
fn run(
    repo: &Repository,
    lease: &Lease,
    name: &str,
    ci: &ConnInfo,
    backup_id: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<(Manifest, bool), Problem> {
    let previous = crate::pages::previous_backup(repo, name);
    let mut try_incremental = !opts.full;
    let at = Attempt {
        repo,
        lease,
        name,
        ci,
        backup_id,
        bus,
        opts,
        previous: previous.as_ref(),
    };
    let first = at.take(&mut try_incremental);
    match first {
        Err(p) if try_incremental && retry_in_full(&p) => {
            if p.code == "backup.incremental_mismatch" {
                bus.publish(Event::failure("backup_incremental_mismatch", &p));
            }
            fallback(
                bus,
                name,
                &format!("the incremental backup failed: {}", p.message),
            );
            at.take(&mut false)
        }
        r => r,
    }
}

/// Errors of an incremental attempt that a full read may not meet. WAL
/// summaries missing for the range are SQLSTATE 55000, which reads as
/// `pg.replication_denied`.
fn retry_in_full(p: &Problem) -> bool {
    matches!(
        p.code.as_ref(),
        "pg.server_error"
            | "pg.replication_denied"
            | "pg.protocol"
            | "backup.source_unreadable"
            | "backup.incremental_mismatch"
    )
}

/// Says why a backup reads every file although it could have been incremental.
fn fallback(bus: &EventBus, deployment: &str, reason: &str) {
    bus.publish(
        Event::new(Severity::Notice, "backup_incremental_fallback").body(json!({
            "deployment": deployment, "reason": reason,
        })),
    );
}

/// One `page_checksum_failed` warning per damaged page the server named.
fn report_bad_pages(bus: &EventBus, deployment: &str, info: &phs_pg::BaseBackupInfo) {
    for (path, block) in &info.bad_pages {
        bus.publish(
            Event::new(Severity::Warning, "page_checksum_failed").body(json!({
                "deployment": deployment, "path": path, "block": block,
            })),
        );
    }
}

/// Reads back a sample of the pages an incremental backup did not receive
/// ([`crate::crosscheck`]); member `i` is entry `i + 1`.
fn cross_check(
    repo: &Repository,
    ci: &ConnInfo,
    m: &Manifest,
    incs: &std::collections::HashMap<u64, phs_pg::incremental::Incremental>,
    start_lsn: &str,
    bus: &EventBus,
) -> Result<(), Problem> {
    let start = phs_pg::parse_lsn(start_lsn)
        .ok_or_else(|| Problem::new(Code::PgProtocol, format!("start LSN {start_lsn:?}")))?;
    let mut files: Vec<_> = incs
        .iter()
        .filter_map(|(f, inc)| m.entries.get(*f as usize + 1).map(|e| (e, inc)))
        .collect();
    files.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    crate::crosscheck::check(repo, ci, &files, start, bus)
}

/// What one attempt at the backup needs.
struct Attempt<'a> {
    repo: &'a Repository,
    lease: &'a Lease,
    name: &'a str,
    ci: &'a ConnInfo,
    backup_id: &'a str,
    bus: &'a EventBus,
    opts: &'a BackupOptions,
    previous: Option<&'a Manifest>,
}

/// Hands the server the previous backup's `backup_manifest` if an
/// incremental backup is possible: PostgreSQL 17+, `summarize_wal` on, a
/// previous backup with one. `None` (with the reason published where the
/// server could have) when not.
fn incremental_base(
    repo: &Repository,
    index: &RepoIndex,
    conn: &mut Conn,
    previous: Option<&Manifest>,
    deployment: &str,
    bus: &EventBus,
) -> Result<Option<String>, Problem> {
    if conn.server_major() < 17 {
        return Ok(None);
    }
    if conn.show("summarize_wal")? != "on" {
        fallback(
            bus,
            deployment,
            "summarize_wal is off on the server: set summarize_wal = on for incremental backups",
        );
        return Ok(None);
    }
    let Some(prev) = previous else {
        return Ok(None);
    };
    let Some(e) = prev.entries.iter().find(|e| e.path == "backup_manifest") else {
        fallback(
            bus,
            deployment,
            &format!("{} has no backup_manifest", prev.backup_id),
        );
        return Ok(None);
    };
    let text = crate::chunks::read_chunks(repo, index, &e.chunks, "backup_manifest")?;
    if let Err(p) = conn.upload_manifest(&text) {
        fallback(
            bus,
            deployment,
            &format!(
                "the server refused {}'s manifest: {}",
                prev.backup_id, p.message
            ),
        );
        return Ok(None);
    }
    Ok(Some(prev.backup_id.clone()))
}

impl Attempt<'_> {
    /// One backup; `incremental` says on entry whether to try one and on
    /// return whether it was.
    fn take(&self, incremental: &mut bool) -> Result<(Manifest, bool), Problem> {
        let Attempt {
            repo,
            lease,
            name,
            ci,
            backup_id,
            bus,
            opts,
            previous,
        } = *self;
        let started_at = pg_hardstorage_engine::event::now_rfc3339();
        let mut conn = Conn::connect(ci, true)?;
        let system = preflight(repo, name, &mut conn, bus)?;
        let server_version = conn.server_version.clone();
        let label = format!("pg_hardstorage {backup_id}");
        let page_size = block_size(&mut conn)?;
        let index = RepoIndex::load(repo)?;
        let from = match *incremental {
            true => incremental_base(repo, &index, &mut conn, previous, name, bus)?,
            false => None,
        };
        *incremental = from.is_some();
        let mut source = BaseBackupSource::new(conn, label.clone());
        if from.is_some() {
            source = source.incremental(page_size);
        }
        let (members, info) = (source.entries.clone(), source.info.clone());
        let increments = source.increments.clone();
        let dedup = Arc::new(index.dedup());
        drop(index);
        // Relation files are paged against the deployment's newest backup.
        let planner = Arc::new(RelationPlanner::new(
            members.clone(),
            increments.clone(),
            page_size,
            previous,
            &dedup,
        ));
        let mut added = crate::pages::Added::default();
        let mut chunks: Vec<Vec<(ChunkId, u32)>> = Vec::new();
        let report = run_pipeline(
            repo,
            Box::new(source),
            dedup,
            bus,
            &opts.pipeline,
            Some(planner.clone()),
            &mut |c| {
                added.record(&c);
                let i = c.file as usize;
                if chunks.len() <= i {
                    chunks.resize_with(i + 1, Vec::new);
                }
                chunks[i].push((c.id, c.len));
            },
        )?;
        let members = members.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let info = info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        report_bad_pages(bus, name, &info);
        let first = members.first();
        let mut entries = vec![Entry {
            path: ".".into(),
            path_hex: false,
            kind: EntryKind::Dir,
            mode: 0o700,
            uid: first.map_or(0, |h| h.uid),
            gid: first.map_or(0, |h| h.gid),
            mtime_s: first.map_or(0, |h| h.mtime),
            mtime_ns: 0,
            size: 0,
            target: None,
            chunks: Vec::new(),
            pages: None,
        }];
        chunks.resize_with(members.len(), Vec::new);
        for (h, c) in members.iter().zip(chunks) {
            let mut e = entry(h, c);
            // A tablespace's link becomes the directory its files are restored
            // into, where PostgreSQL's backup_manifest expects them.
            let is_ts_link = e.kind == EntryKind::Symlink
                && info
                    .tablespaces
                    .iter()
                    .any(|(oid, _)| e.path == format!("pg_tblspc/{oid}"));
            if is_ts_link {
                e.kind = EntryKind::Dir;
                e.mode = 0o700;
                e.target = None;
            }
            entries.push(e);
        }
        let mut paged = BackupStats::default();
        planner.apply(&mut entries, 1, &added.by_file, &mut paged);
        let mut stats = settle(&mut entries, &report);
        stats.paged_bytes = paged.paged_bytes;
        stats.pages = paged.pages;
        stats.pages_stored = paged.pages_stored;
        stats.paged_bytes_added = paged.paged_bytes_added;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            backup_id: backup_id.to_string(),
            deployment: name.to_string(),
            kind: "full".into(),
            source: json!({
                "type": "postgres",
                "system_identifier": system.system_identifier,
                "timeline": info.start_timeline,
                "start_lsn": info.start_lsn,
                "end_lsn": info.end_lsn,
                "end_timeline": info.end_timeline,
                "server_version": server_version,
                "label": label,
                "wal_included": true,
                "has_backup_manifest": info.has_manifest,
                // The backup whose manifest the server compared against, when
                // it sent only changed blocks (PostgreSQL 17+); every backup
                // restores on its own either way.
                "incremental_from": from,
                "bytes_received": info.bytes_received,
                // Pages the server found damaged (data_checksums): the
                // database's damage, stored as read; at most five a file named.
                "page_checksum_failures": {
                    "count": info.checksum_failures,
                    "pages": info.bad_pages.iter().map(|(p, b)| json!({"path": p, "block": b})).collect::<Vec<_>>(),
                },
                "tablespaces": info.tablespaces.iter().map(|(oid, loc)| json!({"oid": oid, "location": loc})).collect::<Vec<_>>(),
            }),
            started_at,
            finished_at: pg_hardstorage_engine::event::now_rfc3339(),
            chunker: repo.config.chunker.clone(),
            stats,
            entries,
        };
        manifest.validate()?;
        if from.is_some() {
            let incs = increments.lock().unwrap_or_else(|e| e.into_inner()).clone();
            cross_check(repo, ci, &manifest, &incs, &info.start_lsn, bus)?;
        }
        crate::backup::ensure_indexed(repo, &manifest)?;
        lease.ensure_held()?;
        commit(repo, &manifest)?;
        let verified = crate::catalog::load_manifest(repo, name, backup_id).is_ok();
        Ok((manifest, verified))
    }
}

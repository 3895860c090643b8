//! WAL archiving: segments streamed from a replication slot go through the
//! same pipeline as every other byte (chunk, dedup, compress, encrypt, pack)
//! and are recorded by a sealed per-segment object, written only after the
//! segment's packs are durable. Only then is its end confirmed to
//! PostgreSQL as flushed, so the server never recycles WAL we do not hold.

use crate::backup::run_pipeline;
use crate::index::RepoIndex;
use crate::{deployment, Repository};
use bytes::Bytes;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_engine::stage::{Block, ChunkId, Source};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_pg::{format_lsn, Conn, ConnInfo, ReplMsg};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const SEGMENT_SIZE: u64 = 16 << 20;
const SEGS_PER_XLOGID: u64 = 0x1_0000_0000 / SEGMENT_SIZE;
/// Magic of sealed WAL records.
pub const WAL_MAGIC: &[u8; 8] = b"PHSWALR\x01";

pub fn segment_name(timeline: u32, segno: u64) -> String {
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / SEGS_PER_XLOGID,
        segno % SEGS_PER_XLOGID
    )
}

/// `(timeline, segno)` of a 24-hex-digit segment name.
pub fn parse_segment_name(name: &str) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[..8], 16).ok()?;
    let hi = u64::from_str_radix(&name[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&name[16..], 16).ok()?;
    Some((tli, hi * SEGS_PER_XLOGID + lo))
}

fn valid_wal_file(name: &str) -> bool {
    let segment = name.strip_suffix(PARTIAL).unwrap_or(name);
    parse_segment_name(segment).is_some()
        || (name.len() == 16
            && name.ends_with(".history")
            && name[..8].chars().all(|c| c.is_ascii_hexdigit()))
}

fn key(deployment: &str, name: &str) -> String {
    format!("wal/{deployment}/{name}")
}

/// The sealed record of one archived WAL file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WalRecord {
    pub name: String,
    pub size: u64,
    pub archived_at: String,
    pub chunks: Vec<(ChunkId, u32)>,
}

/// One in-memory buffer as a pipeline source.
struct OneFile(Option<Bytes>);

impl Source for OneFile {
    fn name(&self) -> &'static str {
        "read"
    }
    fn run(&mut self, emit: &mut dyn FnMut(Block) -> Result<(), Problem>) -> Result<(), Problem> {
        let data = self.0.take().unwrap_or_default();
        emit(Block {
            file: 0,
            offset: 0,
            data,
            eof: true,
        })
    }
}

/// Archives one WAL file; `Ok(false)` when it was already archived. A
/// complete segment replaces its `.partial` record, which is then removed.
pub fn archive(
    repo: &Repository,
    deployment: &str,
    name: &str,
    data: Bytes,
    bus: &EventBus,
) -> Result<bool, Problem> {
    if !valid_wal_file(name) || name.ends_with(PARTIAL) {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{name:?} is not a WAL file name"),
        ));
    }
    let k = key(deployment, name);
    if repo.store.head(&k)?.is_some() {
        return Ok(false);
    }
    let size = data.len() as u64;
    let fresh = store_record(repo, deployment, name, data, bus, true)?;
    if fresh {
        if parse_segment_name(name).is_some() {
            repo.store
                .delete(&key(deployment, &format!("{name}{PARTIAL}")))?;
        }
        bus.publish(Event::new(Severity::Info, "wal_archived").body(json!({
            "deployment": deployment, "segment": name, "bytes": size,
        })));
    }
    Ok(fresh)
}

/// Suffix of the record of a segment's first bytes (`<segment>.partial`,
/// as PostgreSQL names one): written, replacing the last one, when the
/// server asks the streamer to confirm WAL it holds short of a whole
/// segment (a shutting-down primary waits for that before it stops).
/// Recovery never reads it; `wal fetch` hands it out by its own name.
pub const PARTIAL: &str = ".partial";

/// Archives the first bytes of segment `name` as `<name>.partial`,
/// replacing an earlier, shorter one; once it returns they are durable.
pub fn archive_partial(
    repo: &Repository,
    deployment: &str,
    name: &str,
    data: Bytes,
    bus: &EventBus,
) -> Result<(), Problem> {
    if parse_segment_name(name).is_none() {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{name:?} is not a WAL segment name"),
        ));
    }
    let size = data.len() as u64;
    let partial = format!("{name}{PARTIAL}");
    store_record(repo, deployment, &partial, data, bus, false)?;
    bus.publish(
        Event::new(Severity::Info, "wal_partial_archived").body(json!({
            "deployment": deployment, "segment": partial, "bytes": size,
        })),
    );
    Ok(())
}

/// Stores `data` through the pipeline and commits its record under `name`
/// (create-only when `create`, else replacing). `Ok(false)`: it existed.
fn store_record(
    repo: &Repository,
    deployment: &str,
    name: &str,
    data: Bytes,
    bus: &EventBus,
    create: bool,
) -> Result<bool, Problem> {
    let k = key(deployment, name);
    let size = data.len() as u64;
    // A writer like a backup: garbage collection never runs meanwhile, so
    // no chunk this segment dedups against can vanish before its record.
    let mut subj = serde_json::Map::new();
    subj.insert("deployment".into(), serde_json::json!(deployment));
    subj.insert("wal_file".into(), serde_json::json!(name));
    let lease = crate::lock::Lease::acquire(
        repo,
        &format!("{deployment}.wal"),
        "wal archive",
        &crate::lock::GcWait::writer(bus, subj),
    )?;
    let dedup = Arc::new(RepoIndex::load(repo)?.dedup());
    let cfg = PipelineConfig {
        workers: 2,
        queue_bytes: 32 << 20,
        progress_every: Duration::from_secs(3600),
        ..Default::default()
    };
    let mut chunks = Vec::new();
    run_pipeline(
        repo,
        Box::new(OneFile(Some(data))),
        dedup,
        &EventBus::new(),
        &cfg,
        None,
        &mut |c| chunks.push((c.id, c.len)),
    )?;
    let rec = WalRecord {
        name: name.to_string(),
        size,
        archived_at: pg_hardstorage_engine::event::now_rfc3339(),
        chunks,
    };
    let body = serde_json::to_vec(&rec).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal(WAL_MAGIC, &k, &body)?;
    // The record is the commit point of the segment, after its packs.
    lease.ensure_held()?;
    match create {
        true => repo.store.put_if_absent(&k, Bytes::from(sealed)),
        false => repo.store.put(&k, Bytes::from(sealed)).map(|()| true),
    }
}

pub fn record(
    repo: &Repository,
    deployment: &str,
    name: &str,
) -> Result<Option<WalRecord>, Problem> {
    match repo.get_sealed(WAL_MAGIC, &key(deployment, name))? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("WAL record {name}: {e}"))),
        None => Ok(None),
    }
}

/// Archived WAL file names of a deployment, sorted.
pub fn list_names(repo: &Repository, deployment: &str) -> Result<Vec<String>, Problem> {
    deployment::validate_name(deployment)?;
    let prefix = format!("wal/{deployment}/");
    Ok(repo
        .store
        .list(&prefix)?
        .into_iter()
        .filter_map(|o| o.key.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

/// Segments and the gaps between them, per timeline.
pub fn list(repo: &Repository, deployment: &str) -> Result<serde_json::Value, Problem> {
    let names = list_names(repo, deployment)?;
    let mut segs: Vec<(u32, u64, String)> = names
        .iter()
        .filter_map(|n| parse_segment_name(n).map(|(t, s)| (t, s, n.clone())))
        .collect();
    segs.sort();
    let mut gaps = Vec::new();
    for w in segs.windows(2) {
        if w[0].0 == w[1].0 && w[1].1 > w[0].1 + 1 {
            gaps.push(json!({
                "timeline": w[0].0,
                "from": segment_name(w[0].0, w[0].1 + 1),
                "to": segment_name(w[0].0, w[1].1 - 1),
            }));
        }
    }
    for g in path_gaps(repo, deployment, &names, &segs)? {
        if !gaps.contains(&g) {
            gaps.push(g);
        }
    }
    let history: Vec<&String> = names.iter().filter(|n| n.ends_with(".history")).collect();
    let partial: Vec<&String> = names.iter().filter(|n| n.ends_with(PARTIAL)).collect();
    Ok(json!({
        "deployment": deployment,
        "segments": segs.iter().map(|(_, _, n)| n).collect::<Vec<_>>(),
        "first": segs.first().map(|s| &s.2),
        "last": segs.last().map(|s| &s.2),
        "gaps": gaps,
        "history_files": history,
        "partial": partial,
    }))
}

/// Gaps on the path recovery follows to the newest archived timeline: the
/// segments it would read (each from the timeline the history says) that
/// the archive lacks, between the first and the last it holds. A gap
/// across a timeline switch shows only here.
fn path_gaps(
    repo: &Repository,
    deployment: &str,
    names: &[String],
    segs: &[(u32, u64, String)],
) -> Result<Vec<serde_json::Value>, Problem> {
    use crate::timelines::{of_segment, parse_history};
    let newest = names
        .iter()
        .filter(|n| n.ends_with(".history"))
        .filter_map(|n| u32::from_str_radix(&n[..8], 16).ok().map(|t| (t, n)))
        .max();
    let (tli, history) = match newest {
        Some((t, n)) => (
            t,
            parse_history(&String::from_utf8_lossy(&read(repo, deployment, n)?)),
        ),
        None => return Ok(Vec::new()),
    };
    let on_path: std::collections::BTreeSet<u64> = segs
        .iter()
        .filter(|(t, s, _)| *t == of_segment(*s, &history, tli))
        .map(|(_, s, _)| *s)
        .collect();
    let on_path: Vec<u64> = on_path.into_iter().collect();
    let name = |s: u64| segment_name(of_segment(s, &history, tli), s);
    Ok(on_path
        .windows(2)
        .filter(|w| w[1] > w[0] + 1)
        .map(|w| {
            json!({
                "timeline": of_segment(w[0] + 1, &history, tli),
                "from": name(w[0] + 1),
                "to": name(w[1] - 1),
            })
        })
        .collect())
}

/// The restore_command shim: writes WAL file `name` to `dest`, verified.
/// A file that is not archived is `wal.segment_not_found`.
pub fn fetch(repo: &Repository, deployment: &str, name: &str, dest: &Path) -> Result<u64, Problem> {
    let out = read(repo, deployment, name)?;
    // Write beside the destination, then rename: recovery never reads half a file.
    let tmp = dest.with_extension("phs-tmp");
    std::fs::write(&tmp, &out).map_err(|e| Problem::io(Code::IoWriteFailed, tmp.display(), &e))?;
    std::fs::rename(&tmp, dest)
        .map_err(|e| Problem::io(Code::IoWriteFailed, dest.display(), &e))?;
    Ok(out.len() as u64)
}

/// WAL file `name`, read through the verifying path.
pub fn read(repo: &Repository, deployment: &str, name: &str) -> Result<Vec<u8>, Problem> {
    read_with(repo, &RepoIndex::load(repo)?, deployment, name)
}

/// [`read`] with an index already loaded (a restore staging many files).
pub fn read_with(
    repo: &Repository,
    index: &RepoIndex,
    deployment: &str,
    name: &str,
) -> Result<Vec<u8>, Problem> {
    if !valid_wal_file(name) {
        return Err(Problem::new(
            Code::WalSegmentNotFound,
            format!("{name:?} is not a WAL file we archive"),
        ));
    }
    let rec = record(repo, deployment, name)?.ok_or_else(|| {
        Problem::new(
            Code::WalSegmentNotFound,
            format!("{name} is not in the archive of {deployment}"),
        )
        .with("deployment", deployment)
        .with("segment", name)
    })?;
    let out = crate::chunks::read_chunks(repo, index, &rec.chunks, name)?;
    if out.len() as u64 != rec.size {
        return Err(Problem::new(
            Code::VerifyChecksumMismatch,
            format!("{name}: size differs from its record"),
        ));
    }
    Ok(out)
}

pub fn slot_name(deployment: &str) -> String {
    format!(
        "pg_hardstorage_{}",
        deployment.to_ascii_lowercase().replace('-', "_")
    )
}

/// The end of the newest segment archived on `timeline` (0: none).
fn archived_until(repo: &Repository, deployment: &str, timeline: u32) -> Result<u64, Problem> {
    let names = list_names(repo, deployment)?;
    Ok(crate::timelines::archive_end(&names, &[], timeline).unwrap_or(0))
}

/// Where streaming starts, and on which timeline: after the newest segment
/// archived on the path to `tli` (a slot made just now, on a new primary
/// after a failover, holds nothing for us yet: the server may still have
/// the WAL since), else where the slot's WAL begins.
fn start_point(
    repo: &Repository,
    deployment: &str,
    history: &[(u32, u64)],
    tli: u32,
    restart: u64,
    created: bool,
) -> Result<(u64, u32), Problem> {
    let names = list_names(repo, deployment)?;
    let slot_start = restart - restart % SEGMENT_SIZE;
    let pos = match crate::timelines::archive_end(&names, history, tli) {
        Some(a) if created => a,
        Some(a) => a.max(slot_start),
        None => slot_start,
    };
    Ok((
        pos,
        crate::timelines::of_segment(pos / SEGMENT_SIZE, history, tli),
    ))
}

/// Streams WAL from the deployment's slot into the repository until an
/// error (returned) or the server ends the stream. `stop` is polled between
/// messages.
pub fn stream_once(
    repo: &Repository,
    deployment: &str,
    bus: &EventBus,
    stop: &dyn Fn() -> bool,
) -> Result<(), Problem> {
    let d = deployment::get(repo, deployment)?;
    let ci = ConnInfo::parse(d.pg.as_deref().unwrap_or_default())?;
    let mut conn = Conn::connect(&ci, true)?;
    // Re-checked on every (re)connect: a different cluster behind the same
    // address must never be archived under this deployment.
    let system = crate::pgbackup::preflight(repo, deployment, &mut conn, bus)?;
    let slot = slot_name(deployment);
    let (restart, created) = match conn.read_slot(&slot)? {
        Some((lsn, _)) if lsn > 0 => (lsn, false),
        Some(_) => {
            // PostgreSQL invalidated the slot (max_slot_wal_keep_size): the
            // WAL it held is gone from the server. Say so loudly, make the
            // hole visible, and carry on from a fresh slot.
            let archived = archived_until(repo, deployment, system.timeline)?;
            bus.publish(
                Event::new(Severity::Error, "wal_slot_invalidated").body(json!({
                    "deployment": deployment, "slot": slot,
                    "archived_until": format_lsn(archived),
                })),
            );
            conn.simple_query(&format!("DROP_REPLICATION_SLOT {slot}"))?;
            conn.create_slot(&slot)?;
            let fresh = conn.read_slot(&slot)?.map(|(l, _)| l).unwrap_or(0);
            let gap_to = fresh - fresh % SEGMENT_SIZE;
            if gap_to > archived {
                bus.publish(Event::new(Severity::Error, "wal_gap").body(json!({
                    "deployment": deployment, "timeline": system.timeline,
                    "from": segment_name(system.timeline, archived / SEGMENT_SIZE),
                    "to": segment_name(system.timeline, gap_to / SEGMENT_SIZE - 1),
                })));
            }
            (fresh, false)
        }
        None => {
            conn.create_slot(&slot)?;
            bus.publish(
                Event::new(Severity::Notice, "wal_slot_created").body(json!({"slot": slot})),
            );
            (conn.read_slot(&slot)?.map(|(l, _)| l).unwrap_or(0), true)
        }
    };
    let tli = system.timeline;
    // Recovery to a later timeline needs every history file up to it.
    for t in 2..=tli {
        let name = format!("{t:08X}.history");
        if record(repo, deployment, &name)?.is_none() {
            let (_, content) = conn.timeline_history(t)?;
            archive(
                repo,
                deployment,
                &name,
                Bytes::from(content.into_bytes()),
                bus,
            )?;
        }
    }
    let history = match tli > 1 {
        true => crate::timelines::parse_history(&conn.timeline_history(tli)?.1),
        false => Vec::new(),
    };
    let (mut pos, mut on) = start_point(repo, deployment, &history, tli, restart, created)?;
    bus.publish(
        Event::new(Severity::Info, "wal_stream_started").body(json!({
            "deployment": deployment, "slot": slot, "timeline": on, "start_lsn": format_lsn(pos),
            "system_identifier": system.system_identifier,
        })),
    );
    let slot_start = restart - restart % SEGMENT_SIZE;
    if let Err(p) = conn.start_replication(&slot, pos, on) {
        // A new primary's fresh slot, and the server no longer has the WAL
        // after the archive's end: that WAL is lost. Say so; go on from
        // the slot, on a new session.
        if !(created && pos < slot_start && p.message.contains("already been removed")) {
            return Err(p);
        }
        bus.publish(Event::new(Severity::Error, "wal_gap").body(json!({
            "deployment": deployment, "timeline": on,
            "from": segment_name(on, pos / SEGMENT_SIZE),
            "to": segment_name(tli, slot_start / SEGMENT_SIZE - 1),
        })));
        conn = Conn::connect(&ci, true)?;
        (pos, on) = (slot_start, tli);
        conn.start_replication(&slot, pos, on)?;
    }
    let mut seg: Vec<u8> = Vec::with_capacity(SEGMENT_SIZE as usize);
    let mut flushed = pos;
    let mut last_report = std::time::Instant::now();
    while !stop() {
        match conn.recv_replication(Duration::from_secs(1))? {
            ReplMsg::Idle => {}
            ReplMsg::XLogData { start, data } => {
                if start != pos + seg.len() as u64 {
                    return Err(Problem::new(
                        Code::PgProtocol,
                        format!(
                            "WAL arrived at {} but {} was expected",
                            format_lsn(start),
                            format_lsn(pos + seg.len() as u64)
                        ),
                    ));
                }
                let mut data = &data[..];
                while !data.is_empty() {
                    let room = (SEGMENT_SIZE as usize) - seg.len();
                    let take = room.min(data.len());
                    seg.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if seg.len() as u64 == SEGMENT_SIZE {
                        let name = segment_name(on, pos / SEGMENT_SIZE);
                        let bytes = Bytes::from(std::mem::replace(
                            &mut seg,
                            Vec::with_capacity(SEGMENT_SIZE as usize),
                        ));
                        archive(repo, deployment, &name, bytes, bus)?;
                        pos += SEGMENT_SIZE;
                        flushed = pos;
                        // Durable in the repository: only now confirm it.
                        conn.send_status(pos, flushed, flushed)?;
                    }
                }
            }
            ReplMsg::Keepalive { reply, end } => {
                let received = pos + seg.len() as u64;
                if reply && end == received && received > flushed {
                    // Caught up and asked to confirm (a primary shutting
                    // down waits for this): make the segment's first bytes
                    // durable, then confirm them.
                    let name = segment_name(on, pos / SEGMENT_SIZE);
                    let head = Bytes::copy_from_slice(&seg);
                    archive_partial(repo, deployment, &name, head, bus)?;
                    flushed = received;
                }
                if reply {
                    conn.send_status(received, flushed, flushed)?;
                }
                if last_report.elapsed() >= Duration::from_secs(10) {
                    last_report = std::time::Instant::now();
                    bus.publish(Event::new(Severity::Info, "wal_progress").body(json!({
                        "deployment": deployment,
                        "server_lsn": format_lsn(end),
                        "received_lsn": format_lsn(pos + seg.len() as u64),
                        "flushed_lsn": format_lsn(flushed),
                        "lag_bytes": end.saturating_sub(flushed),
                    })));
                }
            }
            // Timeline `on` ended at its switch point (the server was
            // promoted since): the partial segment held is superseded by
            // the next timeline's copy of it; the caller reconnects.
            ReplMsg::End => return Ok(()),
        }
    }
    bus.publish(
        Event::new(Severity::Notice, "wal_stream_stopped").body(json!({
            "deployment": deployment,
            "flushed_lsn": format_lsn(flushed),
            "unarchived_bytes": seg.len(),
        })),
    );
    Ok(())
}

/// `wal repair`: drops and recreates the deployment's slot (RESERVE_WAL),
/// and reports the WAL between the archive's end and the new slot's start,
/// which is lost (`wal list` shows it as a gap once streaming resumes).
pub fn repair(
    repo: &Repository,
    deployment: &str,
    bus: &EventBus,
) -> Result<serde_json::Value, Problem> {
    let d = deployment::get(repo, deployment)?;
    let ci = ConnInfo::parse(d.pg.as_deref().unwrap_or_default())?;
    let mut conn = Conn::connect(&ci, true)?;
    let system = crate::pgbackup::preflight(repo, deployment, &mut conn, bus)?;
    let slot = slot_name(deployment);
    let existed = conn.read_slot(&slot)?.is_some();
    if existed {
        conn.simple_query(&format!("DROP_REPLICATION_SLOT {slot}"))?;
    }
    conn.create_slot(&slot)?;
    let fresh = conn.read_slot(&slot)?.map(|(l, _)| l).unwrap_or(0);
    let archived = archived_until(repo, deployment, system.timeline)?;
    let start = fresh - fresh % SEGMENT_SIZE;
    let gap = (archived > 0 && start > archived).then(|| {
        json!({
            "timeline": system.timeline,
            "from": segment_name(system.timeline, archived / SEGMENT_SIZE),
            "to": segment_name(system.timeline, start / SEGMENT_SIZE - 1),
        })
    });
    if let Some(g) = &gap {
        bus.publish(Event::new(Severity::Error, "wal_gap").body(g.clone()));
    }
    Ok(json!({
        "deployment": deployment,
        "slot": slot,
        "recreated": existed,
        "restart_lsn": format_lsn(fresh),
        "archived_until": format_lsn(archived),
        "gap": gap,
    }))
}

/// `wal stream`: streams, reconnecting with backoff, until `stop`.
pub fn stream(
    repo: &Repository,
    deployment: &str,
    bus: &EventBus,
    stop: &dyn Fn() -> bool,
) -> Result<(), Problem> {
    let mut backoff = Duration::from_millis(500);
    while !stop() {
        match stream_once(repo, deployment, bus, stop) {
            Ok(()) => backoff = Duration::from_millis(500),
            // Configuration and identity problems do not heal by retrying.
            Err(p)
                if !(p.retryable()
                    || matches!(p.code.as_ref(), "pg.server_error" | "pg.protocol")) =>
            {
                bus.publish(Event::failure("wal_stream_failed", &p));
                return Err(p);
            }
            Err(p) => {
                bus.publish(Event::new(Severity::Warning, "wal_stream_retry").body(json!({
                    "deployment": deployment, "error": p.to_json(), "retry_in_seconds": backoff.as_secs_f64(),
                })));
                let until = std::time::Instant::now() + backoff;
                while std::time::Instant::now() < until && !stop() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    Ok(())
}

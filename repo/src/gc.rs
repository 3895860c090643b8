//! Garbage collection (mark and sweep) and `repo usage`.
//!
//! Mark: every chunk referenced by a live manifest (not deleted, or deleted
//! but still under an active hold) or by a WAL record. Sweep: packs none of
//! whose chunks are marked, older than the grace period, go (their index
//! object first, then the pack), after the manifests of deleted backups.
//! `--apply` takes the repository-wide GC lease, which writers refuse to
//! start under and which is refused while any writer holds a lease, so a
//! backup never dedups against a chunk GC is removing; the grace period
//! keeps the packs of a writer that crashed moments ago (whose manifest
//! may still be coming from a retry) for a while. Dry-run by default.

use crate::index::index_key;
use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct GcOptions {
    pub apply: bool,
    /// Packs younger than this are never removed.
    pub grace: Duration,
    /// Dead bytes left inside live packs may be at most this fraction of
    /// the live bytes: the sparsest packs are repacked until they are.
    pub max_unused: f64,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            apply: false,
            grace: Duration::from_secs(6 * 3600),
            max_unused: 0.05,
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GcReport {
    pub applied: bool,
    pub grace_seconds: u64,
    pub live_backups: u64,
    pub deleted_backups: u64,
    pub wal_files: u64,
    pub chunks_referenced: u64,
    pub packs: u64,
    pub packs_live: u64,
    /// Unreferenced and past the grace period: removed with `--apply`.
    pub packs_garbage: u64,
    /// Unreferenced but younger than the grace period: kept.
    pub packs_young: u64,
    pub bytes_garbage: u64,
    /// Bytes of unreferenced chunks inside packs that are still live.
    pub bytes_dead_in_live_packs: u64,
    pub packs_removed: u64,
    pub bytes_removed: u64,
    pub manifests_removed: u64,
    /// Live packs holding less than half live data: their live chunks are
    /// copied into new packs and the old ones removed.
    pub packs_sparse: u64,
    pub packs_repacked: u64,
    /// Live bytes copied by the repack.
    pub bytes_repacked: u64,
}

/// What the mark phase found.
pub(crate) struct Marked {
    pub live: Vec<(String, String)>,
    pub deleted: Vec<(String, String)>,
    pub wal_files: u64,
    pub referenced: HashSet<ChunkId>,
}

pub(crate) fn mark(repo: &Repository, bus: &EventBus) -> Result<Marked, Problem> {
    let mut m = Marked {
        live: Vec::new(),
        deleted: Vec::new(),
        wal_files: 0,
        referenced: HashSet::new(),
    };
    let mut lifecycle: HashMap<String, crate::catalog::Lifecycle> = HashMap::new();
    for o in repo.store.list("snapshots/")? {
        let Some((d, id)) = crate::catalog::split_key(&o.key) else {
            continue;
        };
        if !lifecycle.contains_key(d) {
            lifecycle.insert(d.to_string(), crate::catalog::Lifecycle::of(repo, d)?);
        }
        let Some(l) = lifecycle.get(d) else { continue };
        if l.tombstoned.contains(id) && !l.held(id) {
            m.deleted.push((d.to_string(), id.to_string()));
            continue;
        }
        let man = crate::catalog::load_manifest(repo, d, id)?;
        for e in &man.entries {
            m.referenced.extend(e.chunks.iter().map(|(id, _)| *id));
        }
        m.live.push((d.to_string(), id.to_string()));
    }
    for o in repo.store.list("wal/")? {
        let Some((d, name)) = crate::catalog::split_key(&o.key) else {
            continue;
        };
        if let Some(rec) = crate::wal::record(repo, d, name)? {
            m.referenced.extend(rec.chunks.iter().map(|(id, _)| *id));
            m.wal_files += 1;
        }
    }
    bus.publish(Event::new(Severity::Info, "gc_marked").body(json!({
        "live_backups": m.live.len(),
        "deleted_backups": m.deleted.len(),
        "wal_files": m.wal_files,
        "chunks_referenced": m.referenced.len(),
    })));
    Ok(m)
}

/// One pack as the sweep sees it.
pub(crate) struct PackState {
    pub key: String,
    pub size: u64,
    pub modified_unix: u64,
    pub live_bytes: u64,
    pub dead_bytes: u64,
    pub indexed: bool,
}

/// Every pack with its live and dead bytes; fails when a referenced chunk
/// is in no index (a damaged repository: nothing may be swept then).
pub(crate) fn packs(repo: &Repository, marked: &Marked) -> Result<Vec<PackState>, Problem> {
    let mut by_pack: HashMap<String, (u64, u64)> = HashMap::new();
    let mut found: HashSet<ChunkId> = HashSet::new();
    for o in repo.store.list("index/")? {
        let Some((pack, entries)) = crate::index::read_index(repo, &o.key)? else {
            continue;
        };
        let acc = by_pack.entry(pack).or_default();
        for e in entries {
            if marked.referenced.contains(&e.id) {
                acc.0 += e.len as u64;
                found.insert(e.id);
            } else {
                acc.1 += e.len as u64;
            }
        }
    }
    if let Some(missing) = marked.referenced.iter().find(|id| !found.contains(id)) {
        return Err(Problem::new(
            Code::VerifyMissingObject,
            format!(
                "chunk {} is referenced but in no pack index: the repository is damaged, nothing is swept",
                missing.to_hex()
            ),
        )
        .suggest("Run `pg_hardstorage repo check` and `repo scrub`", Some("pg_hardstorage repo check".into())));
    }
    Ok(repo
        .store
        .list("packs/")?
        .into_iter()
        .map(|o| {
            let (live, dead) = by_pack.get(&o.key).copied().unwrap_or((0, 0));
            PackState {
                indexed: by_pack.contains_key(&o.key),
                key: o.key,
                size: o.size,
                modified_unix: o.modified_unix,
                live_bytes: live,
                dead_bytes: dead,
            }
        })
        .collect())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs garbage collection; dry-run unless `opts.apply`.
pub fn gc(repo: &Repository, opts: &GcOptions, bus: &EventBus) -> Result<GcReport, Problem> {
    let lease = if opts.apply {
        Some(crate::lock::Lease::acquire_gc(repo)?)
    } else {
        None
    };
    bus.publish(Event::new(Severity::Info, "gc_started").body(json!({
        "apply": opts.apply,
        "grace_seconds": opts.grace.as_secs(),
    })));
    let marked = mark(repo, bus)?;
    let packs = packs(repo, &marked)?;
    let cutoff = now_unix().saturating_sub(opts.grace.as_secs());
    let mut r = GcReport {
        applied: opts.apply,
        grace_seconds: opts.grace.as_secs(),
        live_backups: marked.live.len() as u64,
        deleted_backups: marked.deleted.len() as u64,
        wal_files: marked.wal_files,
        chunks_referenced: marked.referenced.len() as u64,
        packs: packs.len() as u64,
        ..Default::default()
    };
    let mut garbage = Vec::new();
    let mut candidates = Vec::new();
    let mut live_total = 0u64;
    for p in &packs {
        let old = p.modified_unix != 0 && p.modified_unix <= cutoff;
        if p.live_bytes > 0 {
            r.packs_live += 1;
            r.bytes_dead_in_live_packs += p.dead_bytes;
            live_total += p.live_bytes;
            if old && p.dead_bytes > 0 {
                candidates.push(p);
            }
        } else if !old {
            r.packs_young += 1;
        } else {
            r.packs_garbage += 1;
            r.bytes_garbage += p.size;
            garbage.push(p);
        }
    }
    // The sparsest first, until the dead bytes left are within bounds.
    candidates.sort_by(|a, b| {
        let fa = a.live_bytes as f64 / (a.live_bytes + a.dead_bytes) as f64;
        let fb = b.live_bytes as f64 / (b.live_bytes + b.dead_bytes) as f64;
        fa.total_cmp(&fb)
    });
    let allowed = (opts.max_unused.max(0.0) * live_total as f64) as u64;
    let mut dead_left = r.bytes_dead_in_live_packs;
    let mut sparse = Vec::new();
    for p in candidates {
        if dead_left <= allowed {
            break;
        }
        dead_left -= p.dead_bytes;
        sparse.push(p);
    }
    r.packs_sparse = sparse.len() as u64;
    let held = || lease.as_ref().map_or(Ok(()), |l| l.ensure_held());
    if opts.apply {
        held()?;
        // Manifests of deleted backups first: no reader may find a
        // manifest whose packs are gone. Their tombstones stay, as record.
        for (d, id) in &marked.deleted {
            repo.store.delete(&crate::backup::snapshot_key(d, id))?;
            r.manifests_removed += 1;
        }
        for (i, p) in garbage.iter().enumerate() {
            held()?;
            if p.indexed {
                repo.store.delete(&index_key(&p.key))?;
            }
            repo.store.delete(&p.key)?;
            r.packs_removed += 1;
            r.bytes_removed += p.size;
            if (i + 1) % 100 == 0 {
                bus.publish(Event::new(Severity::Info, "gc_progress").body(json!({
                    "packs_removed": r.packs_removed,
                    "bytes_removed": r.bytes_removed,
                    "packs_to_remove": garbage.len(),
                })));
            }
        }
        if !sparse.is_empty() {
            repack(repo, &marked, &sparse, &mut r, &held)?;
        }
    }
    bus.publish(
        Event::new(Severity::Notice, "gc_completed")
            .body(serde_json::to_value(&r).unwrap_or_default()),
    );
    Ok(r)
}

/// Copies the live chunks of sparse packs into new packs (each chunk
/// re-verified on the way), makes the new packs and their index objects
/// durable, and only then removes the old index objects and packs.
fn repack(
    repo: &Repository,
    marked: &Marked,
    sparse: &[&PackState],
    r: &mut GcReport,
    held: &dyn Fn() -> Result<(), Problem>,
) -> Result<(), Problem> {
    use pg_hardstorage_engine::format::{parse_pack, PackBuilder};
    let aead = repo.aead();
    let target = repo.config.pack_target_bytes as usize;
    let mut builder = PackBuilder::new();
    let flush = |b: PackBuilder| -> Result<(), Problem> {
        if b.is_empty() {
            return Ok(());
        }
        let key = phs_store::new_pack_key()?;
        let (parts, entries) = b.finish();
        repo.store.put_parts_if_absent(&key, parts)?;
        crate::index::write_index(repo, &key, &entries)
    };
    for p in sparse {
        let data = repo.store.get(&p.key)?.ok_or_else(|| {
            Problem::new(Code::VerifyMissingObject, format!("{} vanished", p.key))
        })?;
        for e in parse_pack(&data).map_err(|x| x.context(&p.key))? {
            if !marked.referenced.contains(&e.id) {
                continue;
            }
            let env = data.slice(e.offset as usize..(e.offset + e.len as u64) as usize);
            crate::chunks::decode_chunk(repo, aead.as_ref(), &e.id, &env)
                .map_err(|x| x.with("pack", p.key.as_str()))?;
            builder.add(e.id, env);
            r.bytes_repacked += e.len as u64;
            if builder.len() >= target {
                flush(std::mem::take(&mut builder))?;
            }
        }
    }
    flush(builder)?;
    for p in sparse {
        held()?;
        repo.store.delete(&index_key(&p.key))?;
        repo.store.delete(&p.key)?;
        r.packs_repacked += 1;
        r.bytes_removed += p.size;
    }
    Ok(())
}

/// `repo usage`: bytes by category.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Usage {
    pub data_packs: u64,
    pub index: u64,
    pub manifests: u64,
    pub wal_records: u64,
    pub metadata: u64,
    /// Unreferenced packs (any age) plus dead chunks inside live packs.
    pub garbage: u64,
    pub total: u64,
    pub objects: u64,
}

pub fn usage(repo: &Repository) -> Result<Usage, Problem> {
    let mut u = Usage::default();
    for o in repo.store.list("")? {
        u.total += o.size;
        u.objects += 1;
        let slot = match o.key.split('/').next().unwrap_or("") {
            "packs" => &mut u.data_packs,
            "index" => &mut u.index,
            "snapshots" => &mut u.manifests,
            "wal" => &mut u.wal_records,
            _ => &mut u.metadata,
        };
        *slot += o.size;
    }
    let marked = mark(repo, &EventBus::new())?;
    for p in packs(repo, &marked)? {
        u.garbage += if p.live_bytes == 0 {
            p.size
        } else {
            p.dead_bytes
        };
    }
    Ok(u)
}

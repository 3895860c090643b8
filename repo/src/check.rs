//! `repo check` (is everything that should be there there, and does every
//! signature verify) and `repo scrub` (read every byte back through the
//! verifying path).

use crate::chunks::decode_chunk;
use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{decode_pack_index, parse_pack, INDEX_MAGIC};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Finding {
    /// `error` or `warning`.
    pub severity: String,
    pub code: String,
    pub message: String,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct CheckReport {
    pub ok: bool,
    pub config: bool,
    pub keys: bool,
    pub manifests: u64,
    pub wal_records: u64,
    pub index_objects: u64,
    pub packs: u64,
    pub findings: Vec<Finding>,
}

fn finding(severity: &str, p: &Problem) -> Finding {
    Finding {
        severity: severity.into(),
        code: p.code.to_string(),
        message: p.message.clone(),
    }
}

/// Composite health: the config and keys (opening the repository proved
/// both), every manifest's and WAL record's signature, the index, and that
/// every referenced chunk is indexed in a pack that exists. Fails with
/// `verify.repository_damaged` (exit 9) naming the findings.
pub fn check(repo: &Repository) -> Result<CheckReport, Problem> {
    let mut r = CheckReport {
        config: true,
        keys: true,
        ..Default::default()
    };
    let packs: HashSet<String> = repo
        .store
        .list("packs/")?
        .into_iter()
        .map(|o| o.key)
        .collect();
    r.packs = packs.len() as u64;
    let mut indexed: HashMap<ChunkId, String> = HashMap::new();
    let mut indexed_packs = HashSet::new();
    for o in repo.store.list("index/")? {
        r.index_objects += 1;
        let parsed = repo.get_sealed(INDEX_MAGIC, &o.key).and_then(|p| {
            let p = p.ok_or_else(|| Problem::new("verify.missing_object", "vanished"))?;
            let nl = p.iter().position(|b| *b == b'\n').ok_or_else(|| {
                Problem::new("verify.malformed", format!("{}: no pack name", o.key))
            })?;
            let pack = String::from_utf8_lossy(&p[..nl]).into_owned();
            Ok((pack, decode_pack_index(&p[nl + 1..])?))
        });
        match parsed {
            Ok((pack, entries)) => {
                if !packs.contains(&pack) {
                    r.findings.push(finding(
                        "error",
                        &Problem::new(
                            "verify.missing_object",
                            format!("{} indexes pack {pack}, which is missing", o.key),
                        ),
                    ));
                }
                for e in entries {
                    indexed.insert(e.id, pack.clone());
                }
                indexed_packs.insert(pack);
            }
            Err(p) => r.findings.push(finding("error", &p.context(&o.key))),
        }
    }
    for p in packs.difference(&indexed_packs) {
        r.findings.push(Finding {
            severity: "warning".into(),
            code: "repo.unindexed_pack".into(),
            message: format!("{p} has no index (left by an interrupted writer; gc removes it)"),
        });
    }
    let mut referenced: Vec<(String, ChunkId)> = Vec::new();
    for o in repo.store.list("snapshots/")? {
        r.manifests += 1;
        let mut parts = o.key.splitn(3, '/').skip(1);
        let (Some(d), Some(id)) = (parts.next(), parts.next()) else {
            continue;
        };
        match crate::catalog::load_manifest(repo, d, id) {
            Ok(m) => {
                for e in &m.entries {
                    referenced.extend(e.chunks.iter().map(|(c, _)| (id.to_string(), *c)));
                }
            }
            Err(p) => r.findings.push(finding("error", &p.context(&o.key))),
        }
    }
    for o in repo.store.list("wal/")? {
        r.wal_records += 1;
        let mut parts = o.key.splitn(3, '/').skip(1);
        let (Some(d), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        match crate::wal::record(repo, d, name) {
            Ok(Some(rec)) => {
                referenced.extend(rec.chunks.iter().map(|(c, _)| (o.key.clone(), *c)));
            }
            Ok(None) => {}
            Err(p) => r.findings.push(finding("error", &p.context(&o.key))),
        }
    }
    let mut reported = HashSet::new();
    for (owner, c) in referenced {
        if !indexed.contains_key(&c) && reported.insert(owner.clone()) {
            r.findings.push(finding(
                "error",
                &Problem::new(
                    "verify.missing_object",
                    format!("{owner} references chunk {} that no pack holds", c.to_hex()),
                ),
            ));
        }
    }
    r.ok = !r.findings.iter().any(|f| f.severity == "error");
    if r.ok {
        Ok(r)
    } else {
        let n = r.findings.iter().filter(|f| f.severity == "error").count();
        Err(Problem::new(
            "verify.repository_damaged",
            format!(
                "repo check found {n} problem(s); the first: {}",
                r.findings
                    .iter()
                    .find(|f| f.severity == "error")
                    .map(|f| f.message.as_str())
                    .unwrap_or("")
            ),
        )
        .with("report", serde_json::to_value(&r).unwrap_or_default())
        .suggest(
            "Run `repo scrub` to find damaged packs and the backups they break",
            Some("pg_hardstorage repo scrub".into()),
        ))
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BadPack {
    pub pack: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub error: Value,
    /// Backups (and WAL files) that reference a chunk of it.
    pub breaks: Vec<String>,
    pub quarantined: bool,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ScrubReport {
    pub applied: bool,
    pub packs: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub bad: Vec<BadPack>,
}

/// Reads every pack, checks its framing and index, and decrypts,
/// decompresses and re-hashes every chunk in it. With `apply`, a bad pack
/// is moved to `quarantine/` (and its index object removed, so later
/// backups store that data afresh). Fails with `verify.scrub_failed`
/// (exit 9) when any pack is bad, naming each and the backups it breaks.
pub fn scrub(
    repo: &Repository,
    apply: bool,
    bus: &EventBus,
    threads: usize,
) -> Result<ScrubReport, Problem> {
    let _lease = crate::lock::Lease::reader(repo, "_repo", "scrub")?;
    bus.publish(Event::new(Severity::Info, "scrub_started").body(json!({"apply": apply})));
    let packs: Vec<String> = repo
        .store
        .list("packs/")?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let aead = repo.aead();
    let (chunks, bytes, done) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let bad: Mutex<Vec<(String, Problem, Vec<ChunkId>)>> = Mutex::new(Vec::new());
    crate::parallel::for_each(
        &packs,
        threads,
        1,
        || (),
        |_, pack| {
            let r = (|| -> Result<(u64, u64), (Problem, Vec<ChunkId>)> {
                let data = repo
                    .store
                    .get(pack)
                    .map_err(|p| (p, Vec::new()))?
                    .ok_or_else(|| {
                        (
                            Problem::new("verify.missing_object", format!("{pack} vanished")),
                            Vec::new(),
                        )
                    })?;
                let entries = parse_pack(&data).map_err(|p| (p, Vec::new()))?;
                let ids: Vec<ChunkId> = entries.iter().map(|e| e.id).collect();
                let mut n = 0;
                for e in &entries {
                    let env = data
                        .get(e.offset as usize..(e.offset + e.len as u64) as usize)
                        .ok_or_else(|| {
                            (
                                Problem::new("verify.truncated", "chunk beyond the pack's end"),
                                ids.clone(),
                            )
                        })?;
                    n += decode_chunk(repo, aead.as_ref(), &e.id, env)
                        .map_err(|p| (p, ids.clone()))?
                        .len() as u64;
                }
                Ok((entries.len() as u64, n))
            })();
            match r {
                Ok((c, b)) => {
                    chunks.fetch_add(c, Ordering::Relaxed);
                    bytes.fetch_add(b, Ordering::Relaxed);
                }
                Err((p, ids)) => bad.lock().unwrap_or_else(|e| e.into_inner()).push((
                    pack.clone(),
                    p.with("pack", pack.as_str()),
                    ids,
                )),
            }
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d % 100 == 0 {
                bus.publish(Event::new(Severity::Info, "scrub_progress").body(json!({
                    "packs_done": d, "packs": packs.len(), "bytes": bytes.load(Ordering::Relaxed),
                })));
            }
            Ok(())
        },
    )?;
    let mut report = ScrubReport {
        applied: apply,
        packs: packs.len() as u64,
        chunks: chunks.into_inner(),
        bytes: bytes.into_inner(),
        bad: Vec::new(),
    };
    let mut bad = bad.into_inner().unwrap_or_else(|e| e.into_inner());
    bad.sort_by(|a, b| a.0.cmp(&b.0));
    for (pack, problem, mut ids) in bad {
        if ids.is_empty() {
            // The pack's framing is broken: its index object lists its chunks.
            ids = pack_index_ids(repo, &pack).unwrap_or_default();
        }
        let breaks = referencing(repo, &ids.into_iter().collect())?;
        let mut quarantined = false;
        if apply {
            if let Some(b) = repo.store.get(&pack)? {
                repo.store.put(&format!("quarantine/{pack}"), b)?;
            }
            repo.store.delete(&crate::index::index_key(&pack))?;
            repo.store.delete(&pack)?;
            quarantined = true;
        }
        let b = BadPack {
            pack,
            error: problem.to_json(),
            breaks: breaks.into_iter().collect(),
            quarantined,
        };
        bus.publish(
            Event::new(Severity::Error, "scrub_bad_pack")
                .body(serde_json::to_value(&b).unwrap_or_default()),
        );
        report.bad.push(b);
    }
    if report.bad.is_empty() {
        bus.publish(
            Event::new(Severity::Notice, "scrub_completed")
                .body(serde_json::to_value(&report).unwrap_or_default()),
        );
        return Ok(report);
    }
    let breaks: BTreeSet<&String> = report.bad.iter().flat_map(|b| &b.breaks).collect();
    let p = Problem::new(
        "verify.scrub_failed",
        format!(
            "{} damaged pack(s): {}; they break {}",
            report.bad.len(),
            report.bad.iter().map(|b| b.pack.as_str()).collect::<Vec<_>>().join(", "),
            if breaks.is_empty() {
                "no backup".to_string()
            } else {
                breaks.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            }
        ),
    )
    .with("report", serde_json::to_value(&report).unwrap_or_default())
    .suggest(
        if apply {
            "The damaged packs are quarantined; take new backups of the deployments named (they store the data afresh)"
        } else {
            "Quarantine them with --apply, then take new backups of the deployments named"
        },
        (!apply).then(|| "pg_hardstorage repo scrub --apply".to_string()),
    );
    bus.publish(Event::failure("scrub_failed", &p));
    Err(p)
}

fn pack_index_ids(repo: &Repository, pack: &str) -> Result<Vec<ChunkId>, Problem> {
    let Some(p) = repo.get_sealed(INDEX_MAGIC, &crate::index::index_key(pack))? else {
        return Ok(Vec::new());
    };
    let nl = p.iter().position(|b| *b == b'\n').unwrap_or(0);
    Ok(decode_pack_index(&p[nl + 1..])?
        .into_iter()
        .map(|e| e.id)
        .collect())
}

/// Backup ids and WAL files referencing any of `ids`.
fn referencing(repo: &Repository, ids: &HashSet<ChunkId>) -> Result<BTreeSet<String>, Problem> {
    let mut out = BTreeSet::new();
    if ids.is_empty() {
        return Ok(out);
    }
    for o in repo.store.list("snapshots/")? {
        let mut parts = o.key.splitn(3, '/').skip(1);
        let (Some(d), Some(id)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let Ok(m) = crate::catalog::load_manifest(repo, d, id) {
            if m.entries
                .iter()
                .any(|e| e.chunks.iter().any(|(c, _)| ids.contains(c)))
            {
                out.insert(id.to_string());
            }
        }
    }
    for o in repo.store.list("wal/")? {
        let mut parts = o.key.splitn(3, '/').skip(1);
        let (Some(d), Some(name)) = (parts.next(), parts.next()) else {
            continue;
        };
        if let Ok(Some(rec)) = crate::wal::record(repo, d, name) {
            if rec.chunks.iter().any(|(c, _)| ids.contains(c)) {
                out.insert(o.key.clone());
            }
        }
    }
    Ok(out)
}

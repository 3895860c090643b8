//! `repo check` (is everything that should be there there, and does every
//! signature verify) and `repo scrub` (read every byte back through the
//! verifying path).

use crate::chunks::decode_chunk;
use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::parse_pack;
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Code;
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
        let parsed = crate::index::read_index(repo, &o.key)
            .and_then(|x| x.ok_or_else(|| Problem::new(Code::VerifyMissingObject, "vanished")));
        match parsed {
            Ok((pack, entries)) => {
                if !packs.contains(&pack) {
                    r.findings.push(finding(
                        "error",
                        &Problem::new(
                            Code::VerifyMissingObject,
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
        let Some((d, id)) = crate::catalog::split_key(&o.key) else {
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
        let Some((d, name)) = crate::catalog::split_key(&o.key) else {
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
                    Code::VerifyMissingObject,
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
            Code::VerifyRepositoryDamaged,
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

/// What reading one pack found.
enum PackCheck {
    Good {
        chunks: u64,
        bytes: u64,
    },
    /// Framing or chunks fail verification: `bad` are the chunks that do
    /// (all of them when the framing is broken, `None` then).
    Damaged {
        problem: Problem,
        good: Vec<(ChunkId, bytes::Bytes)>,
        bad: Option<Vec<ChunkId>>,
    },
    /// It could not be read (storage trouble): nothing is concluded.
    Unreadable(Problem),
}

fn check_pack(repo: &Repository, aead: Option<&phs_encrypt::Aead>, pack: &str) -> PackCheck {
    let data = match repo.store.get(pack) {
        Ok(Some(d)) => d,
        Ok(None) => {
            return PackCheck::Unreadable(Problem::new(
                Code::VerifyMissingObject,
                format!("{pack} vanished while scrubbing"),
            ))
        }
        Err(p) => return PackCheck::Unreadable(p),
    };
    let entries = match parse_pack(&data) {
        Ok(e) => e,
        Err(p) => {
            return PackCheck::Damaged {
                problem: p,
                good: Vec::new(),
                bad: None,
            }
        }
    };
    let (mut good, mut bad, mut first, mut bytes) = (Vec::new(), Vec::new(), None, 0u64);
    for e in &entries {
        let end = e.offset + e.len as u64;
        let r = if end as usize <= data.len() {
            let env = data.slice(e.offset as usize..end as usize);
            decode_chunk(repo, aead, &e.id, &env).map(|plain| (env, plain.len()))
        } else {
            Err(Problem::new(
                Code::VerifyTruncated,
                "chunk beyond the pack's end",
            ))
        };
        match r {
            Ok((env, n)) => {
                bytes += n as u64;
                good.push((e.id, env));
            }
            Err(p) => {
                first.get_or_insert(p);
                bad.push(e.id);
            }
        }
    }
    match first {
        None => PackCheck::Good {
            chunks: entries.len() as u64,
            bytes,
        },
        Some(problem) => PackCheck::Damaged {
            problem,
            good,
            bad: Some(bad),
        },
    }
}

/// Reads every pack, checks its framing and index, and decrypts,
/// decompresses and re-hashes every chunk in it. A pack is *damaged* only
/// when verification fails, and with `apply` only when a second read
/// fails the same way: its verified chunks are first copied into a new
/// pack (so backups using only those stay whole), then it is moved to
/// `quarantine/` and its index object removed, so later backups store the
/// lost data afresh. `apply` takes GC's exclusive lease: no backup can be
/// deduplicating against a pack while it goes. A pack that cannot be read
/// (storage trouble) is reported and never touched. Fails with
/// `verify.scrub_failed` (exit 9) when a pack is damaged, naming each and
/// the backups and WAL files it breaks.
pub fn scrub(
    repo: &Repository,
    apply: bool,
    bus: &EventBus,
    threads: usize,
) -> Result<ScrubReport, Problem> {
    let lease = if apply {
        Some(crate::lock::Lease::acquire_gc(repo)?)
    } else {
        crate::lock::Lease::reader(repo, "_repo", "scrub")?
    };
    bus.publish(Event::new(Severity::Info, "scrub_started").body(json!({"apply": apply})));
    let packs: Vec<String> = repo
        .store
        .list("packs/")?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let aead = repo.aead();
    let (chunks, bytes, done) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let flagged: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let unreadable: Mutex<Vec<(String, Problem)>> = Mutex::new(Vec::new());
    crate::parallel::for_each(
        &packs,
        threads,
        1,
        || (),
        |_, pack| {
            match check_pack(repo, aead.as_ref(), pack) {
                PackCheck::Good {
                    chunks: c,
                    bytes: b,
                } => {
                    chunks.fetch_add(c, Ordering::Relaxed);
                    bytes.fetch_add(b, Ordering::Relaxed);
                }
                PackCheck::Damaged { .. } => flagged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pack.clone()),
                PackCheck::Unreadable(p) => unreadable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((pack.clone(), p)),
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
    let mut flagged = flagged.into_inner().unwrap_or_else(|e| e.into_inner());
    flagged.sort();
    for pack in flagged {
        // A second read: a damaged pack stays damaged; a flaky read does not.
        let (problem, good, bad) = match check_pack(repo, aead.as_ref(), &pack) {
            PackCheck::Damaged { problem, good, bad } => (problem, good, bad),
            PackCheck::Good {
                chunks: c,
                bytes: b,
            } => {
                report.chunks += c;
                report.bytes += b;
                continue;
            }
            PackCheck::Unreadable(p) => {
                unreadable
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((pack, p));
                continue;
            }
        };
        let lost: HashSet<ChunkId> = match bad {
            Some(b) => b.into_iter().collect(),
            None => pack_index_ids(repo, &pack)
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        let breaks = referencing(repo, &lost)?;
        let mut quarantined = false;
        if apply {
            if let Some(l) = &lease {
                l.ensure_held()?;
            }
            salvage(repo, good)?;
            if let Some(b) = repo.store.get(&pack)? {
                repo.store.put(&format!("quarantine/{pack}"), b)?;
            }
            repo.store.delete(&crate::index::index_key(&pack))?;
            repo.store.delete(&pack)?;
            quarantined = true;
        }
        let b = BadPack {
            pack: pack.clone(),
            error: problem.with("pack", pack.as_str()).to_json(),
            breaks: breaks.into_iter().collect(),
            quarantined,
        };
        bus.publish(
            Event::new(Severity::Error, "scrub_bad_pack")
                .body(serde_json::to_value(&b).unwrap_or_default()),
        );
        report.bad.push(b);
    }
    let unreadable = unreadable.into_inner().unwrap_or_else(|e| e.into_inner());
    if report.bad.is_empty() {
        if let Some((pack, p)) = unreadable.into_iter().next() {
            // Nothing was concluded about it: the scrub is incomplete.
            let p = p
                .context(format!("scrub could not read {pack}"))
                .with("report", serde_json::to_value(&report).unwrap_or_default());
            bus.publish(Event::failure("scrub_failed", &p));
            return Err(p);
        }
        bus.publish(
            Event::new(Severity::Notice, "scrub_completed")
                .body(serde_json::to_value(&report).unwrap_or_default()),
        );
        return Ok(report);
    }
    let breaks: BTreeSet<&String> = report.bad.iter().flat_map(|b| &b.breaks).collect();
    let p = Problem::new(
        Code::VerifyScrubFailed,
        format!(
            "{} damaged pack(s): {}; they break {}",
            report.bad.len(),
            report
                .bad
                .iter()
                .map(|b| b.pack.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if breaks.is_empty() {
                "no backup".to_string()
            } else {
                breaks
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
    )
    .with("report", serde_json::to_value(&report).unwrap_or_default())
    .suggest(
        if apply {
            "The damaged packs are quarantined (their good chunks kept); take new backups of the deployments named (they store the data afresh)"
        } else {
            "Quarantine them with --apply, then take new backups of the deployments named"
        },
        (!apply).then(|| "pg_hardstorage repo scrub --apply".to_string()),
    );
    bus.publish(Event::failure("scrub_failed", &p));
    Err(p)
}

/// Copies verified chunks of a damaged pack into a new pack (durable, with
/// its index) before the damaged one goes.
fn salvage(repo: &Repository, good: Vec<(ChunkId, bytes::Bytes)>) -> Result<(), Problem> {
    if good.is_empty() {
        return Ok(());
    }
    let mut b = pg_hardstorage_engine::format::PackBuilder::new();
    for (id, env) in good {
        b.add(id, env);
    }
    let key = phs_store::new_pack_key()?;
    let (parts, entries) = b.finish();
    repo.store.put_parts_if_absent(&key, parts)?;
    crate::index::write_index(repo, &key, &entries)
}

fn pack_index_ids(repo: &Repository, pack: &str) -> Result<Vec<ChunkId>, Problem> {
    Ok(
        crate::index::read_index(repo, &crate::index::index_key(pack))?
            .map(|(_, entries)| entries.into_iter().map(|e| e.id).collect())
            .unwrap_or_default(),
    )
}

/// Backup ids and WAL files referencing any of `ids`.
fn referencing(repo: &Repository, ids: &HashSet<ChunkId>) -> Result<BTreeSet<String>, Problem> {
    let mut out = BTreeSet::new();
    if ids.is_empty() {
        return Ok(out);
    }
    for o in repo.store.list("snapshots/")? {
        let Some((d, id)) = crate::catalog::split_key(&o.key) else {
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
        let Some((d, name)) = crate::catalog::split_key(&o.key) else {
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

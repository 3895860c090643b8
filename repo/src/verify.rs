//! `backup verify`: read every pack a backup references, check the pack's
//! content hash (its name), its framing, and every referenced chunk through
//! the full decrypt → decompress → re-hash path.

use crate::chunks::decode_chunk;
use crate::index::RepoIndex;
use crate::Repository;
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::format::{parse_pack, Manifest};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize)]
pub struct VerifySummary {
    pub backup_id: String,
    pub packs: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub ok: bool,
}

pub fn verify(
    repo: &Repository,
    m: &Manifest,
    bus: &EventBus,
    threads: usize,
) -> Result<VerifySummary, Problem> {
    let mut subj = serde_json::Map::new();
    subj.insert("deployment".into(), json!(m.deployment));
    subj.insert("backup_id".into(), json!(m.backup_id));
    bus.publish(Event::new(Severity::Info, "verify_started").subject(subj.clone()));
    let r = crate::lock::Lease::reader(repo, &m.deployment, "verify")
        .and_then(|_lease| run(repo, m, threads));
    match &r {
        Ok(s) => bus.publish(
            Event::new(Severity::Notice, "verify_completed")
                .subject(subj)
                .body(serde_json::to_value(s).unwrap_or_default()),
        ),
        Err(p) => bus.publish(Event::failure("verify_failed", p)),
    }
    r
}

fn run(repo: &Repository, m: &Manifest, threads: usize) -> Result<VerifySummary, Problem> {
    m.validate()?;
    let index = RepoIndex::load(repo)?;
    let mut by_pack: BTreeMap<&str, Vec<ChunkId>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for e in &m.entries {
        for (id, _) in &e.chunks {
            if seen.insert(*id) {
                let (pack, _) = index.locate(id)?;
                by_pack.entry(pack).or_default().push(*id);
            }
        }
    }
    let packs: Vec<_> = by_pack.into_iter().collect();
    let (chunks, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let aead = repo.aead();
    crate::parallel::for_each(
        &packs,
        threads,
        1,
        || (),
        |_, (pack, ids)| {
            let n = verify_pack(repo, &index, aead.as_ref(), pack, ids)?;
            chunks.fetch_add(ids.len() as u64, Ordering::Relaxed);
            bytes.fetch_add(n, Ordering::Relaxed);
            Ok(())
        },
    )
    .map_err(|p| p.with("backup_id", m.backup_id.clone()))?;
    Ok(VerifySummary {
        backup_id: m.backup_id.clone(),
        packs: packs.len() as u64,
        chunks: chunks.into_inner(),
        bytes: bytes.into_inner(),
        ok: true,
    })
}

fn verify_pack(
    repo: &Repository,
    index: &RepoIndex,
    aead: Option<&phs_encrypt::Aead>,
    pack: &str,
    ids: &[ChunkId],
) -> Result<u64, Problem> {
    let bytes = repo.store.get(pack)?.ok_or_else(|| {
        Problem::new(Code::VerifyMissingObject, format!("pack {pack} is missing"))
    })?;
    let mismatch = |why: String| {
        Problem::new(Code::VerifyChecksumMismatch, format!("pack {pack}: {why}")).with("pack", pack)
    };
    // Framing and the pack's own index checksum, then every chunk we need.
    let entries = parse_pack(&bytes).map_err(|p| mismatch(p.message.clone()))?;
    // The pack's index must agree with the repository index for our chunks.
    let here: std::collections::HashMap<_, _> =
        entries.iter().map(|e| (e.id, (e.offset, e.len))).collect();
    let mut total = 0;
    for id in ids {
        let (_, loc) = index.locate(id)?;
        if here.get(id) != Some(&(loc.offset, loc.len)) {
            return Err(mismatch(format!(
                "chunk {} is not where the index says",
                id.to_hex()
            )));
        }
        let env = bytes
            .get(loc.offset as usize..(loc.offset + loc.len as u64) as usize)
            .ok_or_else(|| {
                Problem::new(
                    Code::VerifyTruncated,
                    format!("pack {pack}: chunk beyond its end"),
                )
                .with("pack", pack)
            })?;
        total += decode_chunk(repo, aead, id, env)
            .map_err(|p| p.with("pack", pack))?
            .len() as u64;
    }
    Ok(total)
}

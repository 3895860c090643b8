//! The repository index: which pack holds each chunk.
//!
//! Each pack gets one sealed index object (`index/<pack hash>`), written
//! only after the pack is durable. Loading the index is listing `index/`.

use crate::Repository;
use pg_hardstorage_engine::format::{decode_pack_index, encode_pack_index, PackEntry, INDEX_MAGIC};
use pg_hardstorage_engine::stage::ChunkId;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use phs_dedup::DedupIndex;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Position in [`RepoIndex::packs`].
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

#[derive(Default)]
pub struct RepoIndex {
    pub packs: Vec<String>,
    /// End of each pack's data area (where its trailing index begins).
    pub pack_ends: Vec<u64>,
    pub chunks: HashMap<ChunkId, Location>,
}

pub fn index_key(pack_key: &str) -> String {
    let hash = pack_key.rsplit('/').next().unwrap_or(pack_key);
    format!("index/{hash}")
}

/// Publishes a durable pack's index.
pub fn write_index(
    repo: &Repository,
    pack_key: &str,
    entries: &[PackEntry],
) -> Result<(), Problem> {
    let mut payload = pack_key.as_bytes().to_vec();
    payload.push(b'\n');
    payload.extend_from_slice(&encode_pack_index(entries));
    repo.put_sealed(INDEX_MAGIC, &index_key(pack_key), &payload)
}

/// Reads one index object: the pack it describes and the pack's entries.
/// `None` when the object is gone.
pub fn read_index(
    repo: &Repository,
    key: &str,
) -> Result<Option<(String, Vec<PackEntry>)>, Problem> {
    let Some(payload) = repo.get_sealed(INDEX_MAGIC, key)? else {
        return Ok(None);
    };
    let nl = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| Problem::new(Code::VerifyMalformed, format!("{key}: no pack name")))?;
    let pack = String::from_utf8(payload[..nl].to_vec())
        .map_err(|_| Problem::new(Code::VerifyMalformed, format!("{key}: bad pack name")))?;
    let entries = decode_pack_index(&payload[nl + 1..]).map_err(|p| p.context(key))?;
    Ok(Some((pack, entries)))
}

impl RepoIndex {
    pub fn load(repo: &Repository) -> Result<Self, Problem> {
        let mut idx = RepoIndex::default();
        for o in repo.store.list("index/")? {
            let Some((pack, entries)) = read_index(repo, &o.key)? else {
                continue;
            };
            let n = idx.packs.len() as u32;
            idx.packs.push(pack);
            idx.pack_ends.push(
                entries
                    .iter()
                    .map(|e| e.offset + e.len as u64)
                    .max()
                    .unwrap_or(0),
            );
            for e in entries {
                idx.chunks.entry(e.id).or_insert(Location {
                    pack: n,
                    offset: e.offset,
                    len: e.len,
                });
            }
        }
        Ok(idx)
    }

    pub fn dedup(&self) -> DedupIndex {
        self.chunks.keys().copied().collect()
    }

    pub fn pack_end(&self, loc: &Location) -> u64 {
        self.pack_ends.get(loc.pack as usize).copied().unwrap_or(0)
    }

    pub fn locate(&self, id: &ChunkId) -> Result<(&str, Location), Problem> {
        let loc = self.chunks.get(id).ok_or_else(|| {
            Problem::new(
                Code::VerifyMissingObject,
                format!("chunk {} is in no pack of the repository", id.to_hex()),
            )
            .with("chunk", id.to_hex())
        })?;
        let pack = self
            .packs
            .get(loc.pack as usize)
            .ok_or_else(|| Problem::internal("index pack out of range"))?;
        Ok((pack, *loc))
    }
}

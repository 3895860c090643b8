//! Dedup lookup: is this chunk id already in the repository?
//!
//! The index is sharded by the id's first byte and read-only during a
//! backup, so every worker consults it without a lock. Chunks first seen
//! within the running backup are caught again by the storage stage, which
//! keeps its own set; a duplicate then costs CPU, never a second copy.
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::stage::{Chunk, ChunkId, ChunkStage, StageFactory};
use pg_hardstorage_engine::Problem;
use std::collections::HashSet;
use std::sync::Arc;

pub const SHARDS: usize = 256;

/// Known chunk ids, sharded by prefix.
pub struct DedupIndex {
    shards: Vec<HashSet<ChunkId>>,
    len: usize,
}

impl Default for DedupIndex {
    fn default() -> Self {
        DedupIndex {
            shards: (0..SHARDS).map(|_| HashSet::new()).collect(),
            len: 0,
        }
    }
}

impl DedupIndex {
    pub fn insert(&mut self, id: ChunkId) {
        if self.shards[id.shard(SHARDS)].insert(id) {
            self.len += 1;
        }
    }
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.shards[id.shard(SHARDS)].contains(id)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl FromIterator<ChunkId> for DedupIndex {
    fn from_iter<I: IntoIterator<Item = ChunkId>>(iter: I) -> Self {
        let mut idx = DedupIndex::default();
        for id in iter {
            idx.insert(id);
        }
        idx
    }
}

pub struct Dedup {
    index: Arc<DedupIndex>,
}

impl ChunkStage for Dedup {
    fn name(&self) -> &'static str {
        "dedup"
    }
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem> {
        chunk.known = self.index.contains(&chunk.id);
        Ok(())
    }
}

pub struct DedupFactory {
    pub index: Arc<DedupIndex>,
}

impl StageFactory for DedupFactory {
    fn name(&self) -> &'static str {
        "dedup"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn ChunkStage>, Problem> {
        Ok(Box::new(Dedup {
            index: self.index.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_known_chunks() {
        let idx: DedupIndex = [ChunkId([7; 32]), ChunkId([7; 32]), ChunkId([9; 32])]
            .into_iter()
            .collect();
        assert_eq!(idx.len(), 2);
        let mut d = Dedup {
            index: Arc::new(idx),
        };
        let mut c = Chunk::new(0, 0, bytes::Bytes::from_static(b"x"));
        c.id = ChunkId([7; 32]);
        d.process(&mut c).expect("ok");
        assert!(c.known);
        c.id = ChunkId([8; 32]);
        d.process(&mut c).expect("ok");
        assert!(!c.known);
    }
}

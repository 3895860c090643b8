//! Chunk ids: BLAKE3 keyed with a repository secret, so an id reveals
//! nothing about plaintext to anyone without the key, and identical data
//! under two keys never shares an id (no cross-domain dedup).
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::stage::{Chunk, ChunkId, ChunkStage, StageFactory};
use pg_hardstorage_engine::Problem;

/// The keyed hash itself; readers call it to re-verify every chunk.
pub fn chunk_id(key: &[u8; 32], data: &[u8]) -> ChunkId {
    ChunkId(*blake3::keyed_hash(key, data).as_bytes())
}

pub struct KeyedHash {
    key: [u8; 32],
}

impl ChunkStage for KeyedHash {
    fn name(&self) -> &'static str {
        "hash"
    }
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem> {
        // A splitter may have named the chunk already (page runs); the id
        // is the same keyed hash either way, so it is not computed twice.
        if chunk.id == ChunkId::default() {
            chunk.id = chunk_id(&self.key, &chunk.data);
        }
        Ok(())
    }
}

pub struct KeyedHashFactory {
    pub key: [u8; 32],
}

impl StageFactory for KeyedHashFactory {
    fn name(&self) -> &'static str {
        "hash"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn ChunkStage>, Problem> {
        Ok(Box::new(KeyedHash { key: self.key }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn different_keys_give_different_ids() {
        let a = chunk_id(&[1; 32], b"same bytes");
        let b = chunk_id(&[2; 32], b"same bytes");
        assert_ne!(a, b);
        assert_eq!(a, chunk_id(&[1; 32], b"same bytes"));
        assert_ne!(a.0, *blake3::hash(b"same bytes").as_bytes());
    }
}

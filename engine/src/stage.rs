//! Stage traits and the items that flow between stages.
//!
//! Work types are split: a [`Source`] (blocking I/O) produces [`Block`]s, a
//! [`Splitter`] cuts them into [`Chunk`]s, [`ChunkStage`]s transform chunks on
//! the CPU, and a [`ChunkSink`] (blocking I/O) stores them. Every CPU stage is
//! built once per worker core by a factory, so its state needs no lock.

use crate::Problem;
use bytes::Bytes;
use std::fmt;

/// A keyed BLAKE3 digest of a chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }
    /// The shard a chunk id belongs to (its first byte).
    pub fn shard(&self, shards: usize) -> usize {
        (self.0[0] as usize) % shards.max(1)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("bad chunk id"))
    }
}

/// A run of bytes read from one input file.
#[derive(Clone, Debug)]
pub struct Block {
    /// Index of the file in the backup's file list.
    pub file: u64,
    pub offset: u64,
    pub data: Bytes,
    /// This is the file's last block (possibly empty).
    pub eof: bool,
}

/// How a chunk's stored payload is encoded (chunk envelope flags).
pub mod flags {
    pub const COMPRESSED_ZSTD: u8 = 0b0000_0001;
    pub const ENCRYPTED_AES256GCM: u8 = 0b0000_0010;
    /// With `ENCRYPTED_AES256GCM`: a 16-byte salt precedes the nonce and the
    /// AEAD key is a subkey derived from the data key and that salt
    /// (docs/specs/format.md §4, "Nonce budget").
    pub const SUBKEY_SALT: u8 = 0b0000_0100;
    /// Every flag bit a reader of this format knows.
    pub const KNOWN: u8 = COMPRESSED_ZSTD | ENCRYPTED_AES256GCM | SUBKEY_SALT;
}

/// A content-defined chunk on its way through the pipeline.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub file: u64,
    pub offset: u64,
    /// Plaintext.
    pub data: Bytes,
    pub id: ChunkId,
    /// Already in the repository: compress, encrypt and put skip it.
    pub known: bool,
    /// The stored form (compressed and/or encrypted), once a stage made one.
    pub payload: Option<Vec<u8>>,
    /// Envelope flags describing `payload`.
    pub flags: u8,
}

impl Chunk {
    pub fn new(file: u64, offset: u64, data: Bytes) -> Self {
        Chunk {
            file,
            offset,
            data,
            id: ChunkId::default(),
            known: false,
            payload: None,
            flags: 0,
        }
    }

    /// The bytes a later stage works on: the payload if one exists, else the plaintext.
    pub fn current(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or(&self.data)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// What the sink reports for each chunk: where a file's bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
    pub id: ChunkId,
    /// Bytes this chunk added to the repository (0 when deduplicated).
    pub stored: u32,
}

/// Produces blocks (files, a PostgreSQL tar stream, generated data).
pub trait Source: Send {
    fn name(&self) -> &'static str;
    /// Total bytes it will produce, where known (for ETA).
    fn total_bytes(&self) -> Option<u64> {
        None
    }
    /// Emits blocks in file order; `emit` fails when the pipeline aborts.
    fn run(&mut self, emit: &mut dyn FnMut(Block) -> Result<(), Problem>) -> Result<(), Problem>;
}

/// Cuts a file's blocks into chunks. Blocks of one file arrive in order.
pub trait Splitter: Send {
    fn name(&self) -> &'static str;
    fn push(&mut self, block: Block, out: &mut dyn FnMut(Chunk)) -> Result<(), Problem>;
}

/// A CPU stage transforming one chunk in place.
pub trait ChunkStage: Send {
    fn name(&self) -> &'static str;
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem>;
}

/// Stores chunks; the only stage with a durable side effect.
pub trait ChunkSink: Send {
    fn name(&self) -> &'static str;
    /// Accepts one chunk and returns how many bytes it added.
    fn accept(&mut self, chunk: Chunk) -> Result<u32, Problem>;
    /// Makes everything accepted durable; returns only once it is.
    fn finish(&mut self) -> Result<(), Problem>;
}

/// Builds one instance of a stage per worker core.
pub trait StageFactory: Send + Sync {
    fn name(&self) -> &'static str;
    fn build(&self, worker: usize) -> Result<Box<dyn ChunkStage>, Problem>;
}

pub trait SplitterFactory: Send + Sync {
    fn name(&self) -> &'static str;
    fn build(&self, worker: usize) -> Result<Box<dyn Splitter>, Problem>;
}

impl<F> StageFactory for (&'static str, F)
where
    F: Fn(usize) -> Result<Box<dyn ChunkStage>, Problem> + Send + Sync,
{
    fn name(&self) -> &'static str {
        self.0
    }
    fn build(&self, worker: usize) -> Result<Box<dyn ChunkStage>, Problem> {
        (self.1)(worker)
    }
}

//! Content-defined chunking: FastCDC (2020) on the gear rolling hash.
//!
//! [`cut_points`] is the pure function that defines chunk boundaries; they
//! are a compatibility contract of the repository (pinned by a seeded
//! snapshot test). [`FastCdc`] applies it to a stream of blocks and produces
//! exactly the cuts a single pass over the whole file would.
#![deny(clippy::unwrap_used)]

use bytes::Bytes;
use fastcdc::v2020::{cut, select_masks, Normalization};
use pg_hardstorage_engine::format::ChunkerParams;
use pg_hardstorage_engine::stage::{Block, Chunk, Splitter, SplitterFactory};
use pg_hardstorage_engine::Problem;

pub mod pages;
pub use pages::{Baseline, PageAwareFactory, PagePlan, PagePlanner, PagedFile, SparsePages};

/// A run's chunk id, computed by the page splitter itself (it hashes every
/// page anyway and needs the id for its map): the keyed BLAKE3 of the run,
/// the same function the hash stage applies to every other chunk.
pub fn run_id(key: &[u8; 32], data: &[u8]) -> pg_hardstorage_engine::stage::ChunkId {
    pg_hardstorage_engine::stage::ChunkId(*blake3::keyed_hash(key, data).as_bytes())
}

#[derive(Clone, Copy, Debug)]
pub struct Params {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
}

impl Params {
    pub fn new(p: &ChunkerParams) -> Result<Self, Problem> {
        p.validate()?;
        let level = match p.normalization {
            0 => Normalization::Level0,
            1 => Normalization::Level1,
            2 => Normalization::Level2,
            _ => Normalization::Level3,
        };
        let (mask_s, mask_l) = select_masks(p.avg_size as usize, level);
        Ok(Params {
            min: p.min_size as usize,
            avg: p.avg_size as usize,
            max: p.max_size as usize,
            mask_s,
            mask_l,
        })
    }

    /// Length of the first chunk of `data` (all of it when shorter than min).
    fn next_cut(&self, data: &[u8]) -> usize {
        let (_, n) = cut(
            data,
            self.min,
            self.avg,
            self.max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        n.clamp(1.min(data.len()), data.len())
    }
}

/// Chunk end offsets of a whole buffer (the last one is `data.len()`).
pub fn cut_points(data: &[u8], params: &Params) -> Vec<usize> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        pos += params.next_cut(&data[pos..]);
        out.push(pos);
    }
    out
}

/// Streaming splitter: keeps the undecided tail of a file between blocks.
///
/// A cut found strictly inside the bytes at hand is final: FastCDC scans
/// positions in order with masks that depend only on the distance from the
/// chunk start, so more data cannot move it. Only when no cut is found and
/// fewer than `max` bytes are at hand must the splitter wait. Chunks are
/// zero-copy slices of the blocks, except the one straddling a block
/// boundary, which is assembled from the carried tail.
pub struct FastCdc {
    params: Params,
    carry: Vec<u8>,
    carry_offset: u64,
    carry_file: Option<u64>,
}

impl FastCdc {
    pub fn new(params: Params) -> Self {
        FastCdc {
            params,
            carry: Vec::new(),
            carry_offset: 0,
            carry_file: None,
        }
    }

    /// Cuts `data` until a chunk would start at or past `stop`; returns
    /// where the undecided bytes begin. `at` places `data` in its file.
    fn cut_run(&self, data: &Bytes, stop: usize, at: &At, out: &mut dyn FnMut(Chunk)) -> usize {
        let mut pos = 0;
        while pos < stop {
            let rest = data.len() - pos;
            let n = self.params.next_cut(&data[pos..]);
            if !(n < rest || rest >= self.params.max || at.eof) {
                break;
            }
            out(Chunk::new(
                at.file,
                at.base + pos as u64,
                data.slice(pos..pos + n),
            ));
            pos += n;
        }
        pos
    }
}

/// Where a run of bytes lies: its file, its offset, and whether the file ends with it.
struct At {
    file: u64,
    base: u64,
    eof: bool,
}

impl Splitter for FastCdc {
    fn name(&self) -> &'static str {
        "chunk"
    }

    fn push(&mut self, block: Block, out: &mut dyn FnMut(Chunk)) -> Result<(), Problem> {
        if self.carry_file.is_some_and(|f| f != block.file) {
            return Err(Problem::internal("chunker received interleaved files"));
        }
        let mut data = block.data;
        let mut base = block.offset;
        if !self.carry.is_empty() {
            // Chunks starting in the carried tail end within `max` bytes of
            // it: join the tail with as little of the new block as decides them.
            let clen = self.carry.len();
            let cbase = self.carry_offset;
            let mut take = data.len().min(2 * self.params.avg);
            loop {
                let mut joined = Vec::with_capacity(clen + take);
                joined.extend_from_slice(&self.carry);
                joined.extend_from_slice(&data[..take]);
                let joined = Bytes::from(joined);
                let at = At {
                    file: block.file,
                    base: cbase,
                    eof: block.eof && take == data.len(),
                };
                // Dry run first: emit nothing until the run is decided.
                let mut cuts = Vec::new();
                let pos = self.cut_run(&joined, clen, &at, &mut |c| cuts.push(c));
                if pos < clen && take < data.len() {
                    take = (take * 2).min(data.len());
                    continue;
                }
                for c in cuts {
                    out(c);
                }
                if pos < clen {
                    // Undecided with the whole block in hand: wait for more.
                    self.carry = joined[pos..].to_vec();
                    self.carry_offset = cbase + pos as u64;
                    self.carry_file = Some(block.file);
                    return Ok(());
                }
                let skip = pos - clen;
                data = data.slice(skip..);
                base = block.offset + skip as u64;
                self.carry.clear();
                break;
            }
        }
        let at = At {
            file: block.file,
            base,
            eof: block.eof,
        };
        let pos = self.cut_run(&data, data.len(), &at, out);
        if pos < data.len() {
            self.carry = data[pos..].to_vec();
            self.carry_offset = base + pos as u64;
            self.carry_file = Some(block.file);
        } else {
            self.carry_file = None;
        }
        Ok(())
    }
}

pub struct FastCdcFactory(pub Params);

impl SplitterFactory for FastCdcFactory {
    fn name(&self) -> &'static str {
        "chunk"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn Splitter>, Problem> {
        Ok(Box::new(FastCdc::new(self.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Params {
        Params::new(&ChunkerParams {
            algorithm: "fastcdc-v2020".into(),
            min_size: 256,
            avg_size: 1024,
            max_size: 4096,
            normalization: 1,
        })
        .expect("params")
    }

    /// xorshift: deterministic test data without a dependency.
    fn data(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn stream(data: &[u8], block: usize, p: Params) -> Vec<Chunk> {
        let mut s = FastCdc::new(p);
        let mut out = Vec::new();
        let mut off = 0;
        let blocks: Vec<_> = data.chunks(block.max(1)).collect();
        if blocks.is_empty() {
            s.push(
                Block {
                    file: 0,
                    offset: 0,
                    data: Bytes::new(),
                    eof: true,
                },
                &mut |c| out.push(c),
            )
            .expect("push");
        }
        for (i, b) in blocks.iter().enumerate() {
            let blk = Block {
                file: 0,
                offset: off,
                data: Bytes::copy_from_slice(b),
                eof: i + 1 == blocks.len(),
            };
            off += b.len() as u64;
            s.push(blk, &mut |c| out.push(c)).expect("push");
        }
        out
    }

    /// The boundaries are part of the repository format: changing them
    /// silently would break dedup against every existing repository.
    #[test]
    fn seeded_boundaries_snapshot() {
        let d = data(42, 64 << 10);
        let cuts = cut_points(&d, &small());
        let fingerprint = blake3::hash(
            &cuts
                .iter()
                .flat_map(|c| (*c as u64).to_le_bytes())
                .collect::<Vec<_>>(),
        );
        assert_eq!(cuts.len(), 60, "{cuts:?}");
        assert_eq!(&cuts[..6], &[712, 1951, 2420, 3451, 4524, 5560]);
        assert_eq!(
            fingerprint.to_hex().as_str(),
            "2007c46f828b971802fa77490a85b6f578966f5bafd24e6830302f1f6b15e63e"
        );
    }

    #[test]
    fn default_params_are_valid() {
        Params::new(&ChunkerParams::default()).expect("valid");
    }

    proptest! {
        #[test]
        fn streaming_matches_whole_buffer(seed in any::<u64>(), len in 0usize..40_000, block in 1usize..9000) {
            let d = data(seed, len);
            let p = small();
            let chunks = stream(&d, block, p);
            let ends: Vec<usize> = chunks.iter().map(|c| c.offset as usize + c.len()).collect();
            prop_assert_eq!(ends, cut_points(&d, &p));
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
            prop_assert_eq!(joined, d);
            for c in &chunks {
                prop_assert!(c.len() <= 4096);
            }
        }
    }
}

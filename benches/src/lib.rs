//! Shared inputs for the criterion benches: the same generator the
//! `pg_hardstorage bench` harness uses, so figures compare.

use bytes::Bytes;
use pg_hardstorage_engine::stage::{Block, Chunk, SplitterFactory};

/// `len` bytes of generated data at `compressibility` (0 random, 1 text).
pub fn data(len: usize, compressibility: f64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pg_hardstorage_repo::bench::Generator::new(compressibility, 11).fill(&mut v);
    v
}

/// The chunks the default chunker makes of `data`.
pub fn chunks(data: &[u8]) -> Vec<Chunk> {
    let params = phs_chunk::Params::new(&Default::default()).expect("default params");
    let mut s = phs_chunk::FastCdcFactory(params)
        .build(0)
        .expect("splitter");
    let mut out = Vec::new();
    s.push(
        Block {
            file: 0,
            offset: 0,
            data: Bytes::copy_from_slice(data),
            eof: true,
        },
        &mut |c| out.push(c),
    )
    .expect("chunk");
    out
}

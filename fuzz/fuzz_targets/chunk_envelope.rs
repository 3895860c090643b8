//! A chunk envelope from storage: parse, authenticate, decompress. Garbage
//! must be refused with a `verify.*`/`auth.*` error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pg_hardstorage_engine::format::parse_envelope;
use pg_hardstorage_engine::stage::{flags, ChunkId};

fuzz_target!(|data: &[u8]| {
    let _ = parse_envelope(data);
    let aead = phs_encrypt::Aead::new(&[7u8; 32]);
    for key in [None, Some(&aead)] {
        if let Ok((f, raw_len, body)) = phs_encrypt::open_chunk(key, &ChunkId([1; 32]), data) {
            if f & flags::COMPRESSED_ZSTD != 0 {
                if let Ok(out) = phs_compress::decompress(&body, raw_len as usize) {
                    assert_eq!(out.len(), raw_len as usize);
                }
            }
        }
    }
});

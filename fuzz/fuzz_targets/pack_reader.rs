//! Any bytes handed to the pack reader: an error or entries that lie
//! inside the pack, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pg_hardstorage_engine::format::{decode_pack_index, parse_pack};

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_pack(data) {
        for e in entries {
            let end = e.offset as usize + e.len as usize;
            assert!(end <= data.len());
            let _ = &data[e.offset as usize..end];
        }
    }
    let _ = decode_pack_index(data);
});

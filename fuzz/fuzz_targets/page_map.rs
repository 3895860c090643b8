//! Page maps of paged (relation) files: any records string and run list
//! give a value or a `verify.*` problem, never a panic, and every record
//! that decodes names a slot inside its run.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pg_hardstorage_engine::format::PageMap;
use pg_hardstorage_engine::stage::ChunkId;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let page_size = 1u32 << (data[0] % 20);
    let runs: Vec<(ChunkId, u32)> = data[1..4]
        .iter()
        .map(|b| (ChunkId([*b; 32]), (*b as u32) * page_size / 4))
        .collect();
    let body = &data[4..];
    let as_text = PageMap {
        page_size,
        records: String::from_utf8_lossy(body).into_owned(),
    };
    let _ = as_text.decode(&runs);
    let raw = PageMap::from_records(page_size, body);
    if let Ok(recs) = raw.decode(&runs) {
        for r in recs {
            let (_, len) = runs[r.run as usize];
            assert!((r.slot as u64 + 1) * page_size as u64 <= len as u64);
        }
    }
});

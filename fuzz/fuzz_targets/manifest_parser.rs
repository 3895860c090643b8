//! The manifest read path after its signature: the sealed-object framing,
//! the JSON document and the structural validation (unsafe paths, sizes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pg_hardstorage_engine::format::{parse_sealed, Manifest, MANIFEST_MAGIC};

fuzz_target!(|data: &[u8]| {
    let _ = parse_sealed(MANIFEST_MAGIC, data);
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        if m.validate().is_ok() {
            for e in &m.entries {
                let p = e.path_bytes().expect("validated path");
                assert!(!p.starts_with(b"/"));
                assert!(!p.split(|b| *b == b'/').any(|c| c == b".."));
            }
        }
    }
});

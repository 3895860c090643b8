//! Property tests for the on-disk formats: round trips, and "any bytes give
//! an error or a value, never a panic" for every parser (the fuzz targets
//! explore the same parsers deeper, with coverage guidance).

use bytes::Bytes;
use pg_hardstorage_engine::format::*;
use pg_hardstorage_engine::stage::{flags, ChunkId};
use proptest::prelude::*;

fn arb_id() -> impl Strategy<Value = ChunkId> {
    any::<[u8; 32]>().prop_map(ChunkId)
}

fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        "[a-zA-Z0-9_ é名-]{1,12}(/[a-zA-Z0-9_.-]{1,12}){0,3}",
        prop_oneof![
            Just(EntryKind::File),
            Just(EntryKind::Dir),
            Just(EntryKind::Symlink)
        ],
        0u32..0o7777,
        any::<i64>(),
        0u32..1_000_000_000,
        prop::collection::vec((arb_id(), 1u32..1 << 20), 0..5),
    )
        .prop_map(|(path, kind, mode, mtime_s, mtime_ns, chunks)| {
            let chunks = if kind == EntryKind::File {
                chunks
            } else {
                vec![]
            };
            Entry {
                path: path.replace("/.", "/x").trim_start_matches('.').to_string() + "f",
                path_hex: false,
                kind,
                mode,
                uid: 0,
                gid: 0,
                mtime_s,
                mtime_ns,
                size: chunks.iter().map(|(_, l)| *l as u64).sum(),
                target: (kind == EntryKind::Symlink).then(|| "target".to_string()),
                chunks,
                pages: None,
            }
        })
}

proptest! {
    #[test]
    fn envelope_header_round_trips(f in 0u8..8, raw_len in 0u32..MAX_CHUNK, salt in any::<[u8; 16]>(), nonce in any::<[u8; 12]>(), body in prop::collection::vec(any::<u8>(), 16..64)) {
        let enc = f & flags::ENCRYPTED_AES256GCM != 0;
        let salted = f & flags::SUBKEY_SALT != 0;
        let sealing = Sealing { salt: salted.then_some(salt), nonce };
        let mut env = envelope_header(f, raw_len, enc.then_some(&sealing));
        env.extend_from_slice(&body);
        match parse_envelope(&env) {
            Ok(v) => {
                prop_assert!(enc || !salted, "a salt without encryption parsed");
                prop_assert_eq!(v.flags, f);
                prop_assert_eq!(v.raw_len, raw_len);
                prop_assert_eq!(v.sealing, enc.then_some(sealing));
                prop_assert_eq!(v.body, &body[..]);
            }
            // A salt needs encryption; a plain, uncompressed envelope must
            // match its length.
            Err(_) => prop_assert!(
                (salted && !enc) || (f == 0 && body.len() != raw_len as usize)
            ),
        }
    }

    #[test]
    fn pack_round_trips(chunks in prop::collection::vec((arb_id(), prop::collection::vec(any::<u8>(), 0..300)), 0..20)) {
        let mut b = PackBuilder::new();
        for (id, data) in &chunks {
            b.add(*id, Bytes::from(data.clone()));
        }
        let (parts, entries) = b.finish();
        let bytes = parts.concat();
        prop_assert_eq!(parse_pack(&bytes).expect("parse"), entries.clone());
        for (e, (id, data)) in entries.iter().zip(&chunks) {
            prop_assert_eq!(e.id, *id);
            prop_assert_eq!(&bytes[e.offset as usize..(e.offset + e.len as u64) as usize], &data[..]);
        }
    }

    #[test]
    fn manifest_round_trips(entries in prop::collection::vec(arb_entry(), 0..20)) {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            backup_id: "d.full.20260101T000000Z".into(),
            deployment: "d".into(),
            kind: "full".into(),
            source: serde_json::json!({"type": "path"}),
            started_at: "s".into(),
            finished_at: "f".into(),
            chunker: ChunkerParams::default(),
            stats: BackupStats::default(),
            entries,
        };
        m.validate().expect("valid");
        let json = serde_json::to_vec(&m).expect("ser");
        let back: Manifest = serde_json::from_slice(&json).expect("de");
        prop_assert_eq!(back, m);
    }

    #[test]
    fn parsers_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_pack(&data);
        let _ = decode_pack_index(&data);
        let _ = parse_envelope(&data);
        let _ = parse_sealed(MANIFEST_MAGIC, &data);
        if let Ok(m) = serde_json::from_slice::<Manifest>(&data) {
            let _ = m.validate();
        }
    }

    #[test]
    fn damaged_packs_are_refused(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..100), 1..6), at in any::<prop::sample::Index>()) {
        let mut b = PackBuilder::new();
        for (i, d) in chunks.iter().enumerate() {
            b.add(ChunkId([i as u8; 32]), Bytes::from(d.clone()));
        }
        let (parts, entries) = b.finish();
        let mut bytes = parts.concat();
        let data_end = entries.last().map(|e| (e.offset + e.len as u64) as usize).unwrap_or(8);
        // A flip outside the chunk bodies (header, index, footer) breaks parsing.
        let i = at.index(bytes.len());
        if i < 8 || i >= data_end {
            bytes[i] ^= 0x20;
            prop_assert!(parse_pack(&bytes).is_err(), "flip at {} accepted", i);
        }
    }
}

#[test]
fn manifest_rejects_escaping_paths() {
    for bad in ["../etc/passwd", "/abs", "a/../../b", "a//b", "", "a/./b"] {
        let m = Manifest {
            format_version: FORMAT_VERSION,
            backup_id: "d.full.x".into(),
            deployment: "d".into(),
            kind: "full".into(),
            source: serde_json::Value::Null,
            started_at: String::new(),
            finished_at: String::new(),
            chunker: ChunkerParams::default(),
            stats: BackupStats::default(),
            entries: vec![Entry {
                path: bad.into(),
                path_hex: false,
                kind: EntryKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_s: 0,
                mtime_ns: 0,
                size: 0,
                target: None,
                chunks: vec![],
                pages: None,
            }],
        };
        assert_eq!(
            m.validate().expect_err(bad).code,
            "verify.malformed",
            "{bad}"
        );
    }
}

proptest! {
    /// Page maps: records round-trip, and a record naming a run or slot
    /// that does not exist is refused.
    #[test]
    fn page_map_roundtrip_and_bounds(
        runs in prop::collection::vec(1u32..5, 1..6),
        picks in prop::collection::vec((any::<[u8; 16]>(), 0usize..8, 0u16..8), 0..40),
        junk in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let ps = 8192u32;
        let runs: Vec<(ChunkId, u32)> = runs
            .iter()
            .enumerate()
            .map(|(i, pages)| (ChunkId([i as u8; 32]), pages * ps))
            .collect();
        let mut raw = Vec::new();
        let mut valid = true;
        let mut want = Vec::new();
        for (hash, run, slot) in &picks {
            let r = PageRecord { hash: *hash, run: *run as u32, slot: *slot };
            valid &= runs.get(*run).is_some_and(|(_, len)| (*slot as u32 + 1) * ps <= *len);
            r.encode_into(&mut raw);
            want.push(r);
        }
        let map = PageMap::from_records(ps, &raw);
        match map.decode(&runs) {
            Ok(got) => {
                prop_assert!(valid);
                prop_assert_eq!(got, want);
            }
            Err(p) => {
                prop_assert!(!valid);
                prop_assert_eq!(p.code.as_ref(), "verify.malformed");
            }
        }
        // Arbitrary record bytes: a value or verify.malformed, never a panic.
        let _ = PageMap::from_records(ps, &junk).decode(&runs);
        let _ = PageMap { page_size: ps, records: String::from_utf8_lossy(&junk).into() }.decode(&runs);
    }
}

//! What a hostile PostgreSQL server (or a man in the middle) can send the
//! client: raw frames (bounded in length), backend messages as
//! postgres-protocol parses them, replication CopyData bodies, a
//! BASE_BACKUP tar stream fed in two pieces, and connection strings. Any
//! input gives a value or a `pg.*`/`deployment.*` problem, never a panic.
#![no_main]
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use phs_pg::conn::{frame_len, parse_replication_copy, take_frame, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((_, body))) = take_frame(&mut buf) {
        assert!(body.len() <= MAX_FRAME);
        let _ = parse_replication_copy(body);
    }
    let mut msgs = BytesMut::from(data);
    while frame_len(&msgs).is_ok() {
        match postgres_protocol::message::backend::Message::parse(&mut msgs) {
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let mut tar = phs_pg::tar::Reader::new();
    let (a, b) = data.split_at(data.len() / 2);
    let mut sink = |_e: phs_pg::tar::Event| Ok(());
    let _ = tar
        .feed(Bytes::copy_from_slice(a), &mut sink)
        .and_then(|()| tar.feed(Bytes::copy_from_slice(b), &mut sink));
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = phs_pg::ConnInfo::parse(s);
        let redacted = phs_pg::conninfo::redact(s);
        // A keyword string redacts to the same settings with every
        // password `***` (it parses back that way).
        let uri = s.trim().get(..8).is_some_and(|h| h.eq_ignore_ascii_case("postgres"));
        if let (false, Ok(pairs)) = (uri, phs_pg::conninfo::keyword_pairs(s)) {
            let want: Vec<(String, String)> = pairs
                .into_iter()
                .map(|(k, v)| match k.eq_ignore_ascii_case("password") {
                    true => (k, "***".to_string()),
                    false => (k, v),
                })
                .collect();
            let got = phs_pg::conninfo::keyword_pairs(&redacted).expect("redacted parses");
            assert_eq!(got, want, "{s:?} -> {redacted:?}");
        }
    }
});

//! What an unauthenticated client controls before any check: the method,
//! the path (routed and percent-decoded into parameters), the query string
//! and the Authorization header. Any input routes or is refused, never
//! panics; a bearer token's name is a possible token name or nothing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pg_hardstorage_apiserver::routes::{find, query_pairs, Found};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = s.splitn(3, '\n');
    let (method, target, auth) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Found::Route(r, params) = find(method, path) {
        assert_eq!(r.method, method);
        for (_, v) in params {
            let _ = v.len();
        }
    }
    let _ = query_pairs(query);
    if let Some(presented) = pg_hardstorage_apiserver::auth::bearer(auth) {
        if let Some(name) = pg_hardstorage_repo::tokens::name_of(presented) {
            assert!(!name.is_empty() && name.len() <= 63, "{name:?}");
        }
        assert!(pg_hardstorage_repo::tokens::authenticate(&[], presented).is_none());
    }
});

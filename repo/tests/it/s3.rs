use crate::{add_path_deployment, backup, restore_to};
use bytes::Bytes;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_repo::{verify, KeySource, Repository};
use pg_hardstorage_testkit::observed::{Observed, Op};
use pg_hardstorage_testkit::s3::Moto;
use pg_hardstorage_testkit::tree::{digest, rich_tree};
use pg_hardstorage_testkit::{init, small_opts};

fn s3_repo(moto: &Moto, bucket: &str) -> Repository {
    moto.create_bucket(bucket);
    let store = phs_store::open_store_with(
        &format!("s3://{bucket}/repo"),
        false,
        &phs_store::StoreOptions {
            s3_endpoint: Some(moto.endpoint()),
        },
    )
    .expect("s3 store");
    init(store, small_opts())
}

#[test]
fn s3_round_trip_and_integrity() {
    let moto = Moto::start();
    let repo = s3_repo(&moto, "phs-roundtrip");
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    rich_tree(&src, 200, 6 << 20);
    add_path_deployment(&repo, "s3t", &src);
    let (m, _) = backup(&repo, "s3t").expect("backup to s3");
    assert!(
        repo.store.list("packs/").expect("list").len() > 1,
        "expected several packs"
    );
    let out = tmp.path().join("out");
    restore_to(&repo, &m, &out).expect("restore from s3");
    assert_eq!(digest(&src), digest(&out));

    // Re-backup: nothing new.
    let (m2, _) = backup(&repo, "s3t").expect("second");
    assert_eq!(m2.stats.bytes_added, 0);

    // Wrong passphrase.
    let err = Repository::open(repo.store.clone(), &KeySource::Passphrase("nope".into()))
        .err()
        .expect("refused");
    assert_eq!(err.exit_code(), 3);

    // A flipped byte in a pack.
    let pack = repo.store.list("packs/").expect("list")[0].key.clone();
    let mut b = repo.store.get(&pack).expect("get").expect("pack").to_vec();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    repo.store.put(&pack, Bytes::from(b)).expect("put");
    let err = verify::verify(&repo, &m, &EventBus::new(), 2).expect_err("verify");
    assert_eq!(err.code, "verify.checksum_mismatch");
    assert_eq!(err.exit_code(), 9);
}

#[test]
fn s3_conditional_put_refuses_to_overwrite() {
    let moto = Moto::start();
    let repo = s3_repo(&moto, "phs-cond");
    assert!(repo
        .store
        .put_if_absent("x/y", Bytes::from_static(b"1"))
        .expect("first"));
    assert!(!repo
        .store
        .put_if_absent("x/y", Bytes::from_static(b"2"))
        .expect("second"));
    assert_eq!(
        repo.store.get("x/y").expect("get").as_deref(),
        Some(&b"1"[..])
    );
}

/// A restore from S3 reads each pack it touches with about one ranged GET
/// (coalesced, in pack order), whatever the number of files and chunks.
#[test]
fn s3_restore_gets_are_bounded_by_the_packs_it_touches() {
    let moto = Moto::start();
    let repo = s3_repo(&moto, "phs-restore-gets");
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    rich_tree(&src, 300, 8 << 20);
    add_path_deployment(&repo, "g", &src);
    let (m, _) = backup(&repo, "g").expect("backup to s3");
    let seen = Observed::wrap(repo.store.clone());
    let counted = Repository {
        store: seen.clone(),
        ..repo.clone()
    };
    let out = tmp.path().join("out");
    restore_to(&counted, &m, &out).expect("restore from s3");
    assert_eq!(digest(&src), digest(&out));
    let calls = seen.take();
    let pack_gets = calls
        .iter()
        .filter(|(op, k)| matches!(op, Op::Get | Op::GetRange) && k.starts_with("packs/"))
        .count();
    let touched: std::collections::BTreeSet<_> = calls
        .iter()
        .filter(|(op, k)| *op == Op::GetRange && k.starts_with("packs/"))
        .map(|(_, k)| k.clone())
        .collect();
    let chunks: usize = m.entries.iter().map(|e| e.chunks.len()).sum();
    eprintln!(
        "restore of {} files, {chunks} chunks: {pack_gets} pack GETs for {} packs touched; {} requests in all",
        m.entries.len(),
        touched.len(),
        calls.len()
    );
    assert!(
        pack_gets <= touched.len() + 2,
        "{pack_gets} GETs for {} packs",
        touched.len()
    );
    assert!(
        chunks > 4 * touched.len(),
        "the test needs many chunks per pack"
    );
}

fn s3_store_at(endpoint: String, bucket: &str) -> pg_hardstorage_engine::store::DynStore {
    phs_store::open_store_with(
        &format!("s3://{bucket}/repo"),
        false,
        &phs_store::StoreOptions {
            s3_endpoint: Some(endpoint),
        },
    )
    .expect("s3 store")
}

/// Credentials the store refuses are `storage.auth`, exit 3, not retried:
/// classified by the error's variant, not its text (a retried `storage.io`
/// would have an operator wait for nothing).
#[test]
fn s3_refused_credentials_are_storage_auth_and_exit_3() {
    let moto = Moto::start_refusing_credentials();
    let store = s3_store_at(moto.endpoint(), "phs-auth");
    let failures = [
        store.get("config").expect_err("get with refused keys"),
        store
            .put_if_absent("config", Bytes::from_static(b"x"))
            .expect_err("put with refused keys"),
        store.head("config").expect_err("head with refused keys"),
    ];
    for e in failures {
        assert_eq!(e.code, "storage.auth", "{e}");
        assert_eq!(e.exit_code(), 3, "{e}");
        assert!(!e.retryable(), "{e}");
        assert!(e.suggestion.is_some(), "{e}: no suggestion");
    }
}

/// Nothing listening at the endpoint is `storage.unreachable` (exit 8,
/// retryable), found from the transport error in the source chain.
#[test]
fn s3_nothing_listening_is_storage_unreachable() {
    pg_hardstorage_testkit::s3::test_credentials();
    let port = pg_hardstorage_testkit::s3::free_port();
    let store = s3_store_at(format!("http://127.0.0.1:{port}"), "phs-none");
    let e = store.get("config").expect_err("nobody there");
    assert_eq!(e.code, "storage.unreachable", "{e}");
    assert_eq!(e.exit_code(), 8);
}

use pg_hardstorage_engine::format::{INDEX_MAGIC, MANIFEST_MAGIC};
use pg_hardstorage_testkit::{init, small_opts};
use proptest::prelude::*;

fn repos() -> Vec<pg_hardstorage_repo::Repository> {
    let mut plain = small_opts();
    plain.encryption = false;
    [small_opts(), plain]
        .into_iter()
        .map(|o| init(phs_store::open_store("memory://", false).expect("mem"), o))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sealed metadata round-trips, and any single flipped bit, a truncation
    /// or a move to another key is refused: with and without encryption.
    #[test]
    fn sealed_objects_round_trip_and_detect_damage(payload in prop::collection::vec(any::<u8>(), 0..2000), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        for repo in repos() {
            let sealed = repo.seal(MANIFEST_MAGIC, "snapshots/a/b", &payload).expect("seal");
            prop_assert_eq!(repo.open_sealed(MANIFEST_MAGIC, "snapshots/a/b", &sealed).expect("open"), payload.clone());
            let mut bad = sealed.clone();
            let i = at.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(repo.open_sealed(MANIFEST_MAGIC, "snapshots/a/b", &bad).is_err());
            prop_assert!(repo.open_sealed(MANIFEST_MAGIC, "snapshots/a/c", &sealed).is_err());
            prop_assert!(repo.open_sealed(INDEX_MAGIC, "snapshots/a/b", &sealed).is_err());
            prop_assert!(repo.open_sealed(MANIFEST_MAGIC, "snapshots/a/b", &sealed[..i]).is_err());
        }
    }
}

/// Finding 3: a deployment record holds the connection string, password
/// included; it is encrypted even in a repository made with
/// `--encryption none`, and records written before (signed, in clear) still
/// read.
#[test]
fn deployment_records_are_encrypted_even_without_repository_encryption() {
    use pg_hardstorage_engine::format::{parse_sealed, DEPLOYMENT_MAGIC};
    use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
    let plain = repos().pop().expect("the unencrypted one");
    assert!(!plain.encrypted());
    let conninfo = "host=db.example user=backup password=Secret-Pw-123 dbname=postgres";
    let d = Deployment {
        name: "db1".into(),
        kind: Kind::Postgres,
        path: None,
        pg: Some(conninfo.into()),
        pgdata: None,
        created_at: String::new(),
        system_identifier: None,
        tenant: None,
    };
    deployment::create(&plain, d.clone()).expect("create");
    let raw = plain
        .store
        .get("deployments/db1")
        .expect("get")
        .expect("record");
    let v = parse_sealed(DEPLOYMENT_MAGIC, &raw).expect("sealed");
    assert!(v.sealing.is_some(), "a deployment record is in clear");
    let shown = String::from_utf8_lossy(&raw);
    assert!(!shown.contains("Secret-Pw-123"));
    let back = deployment::get(&plain, "db1").expect("get");
    assert_eq!(back.pg.as_deref(), Some(conninfo));
    // A record as earlier versions wrote it (signed, not encrypted).
    let mut old = d;
    old.name = "db0".into();
    let body = serde_json::to_vec(&old).expect("json");
    plain
        .put_sealed(DEPLOYMENT_MAGIC, "deployments/db0", &body)
        .expect("put");
    let back = deployment::get(&plain, "db0").expect("old record reads");
    assert_eq!(back.pg.as_deref(), Some(conninfo));
}

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

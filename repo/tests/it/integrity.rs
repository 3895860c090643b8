use crate::{add_path_deployment, backup, restore_to};
use bytes::Bytes;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::Class;
use pg_hardstorage_repo::{catalog, verify, KeySource, Repository};
use pg_hardstorage_testkit::tree::{digest, rich_tree};
use pg_hardstorage_testkit::{local_repo, small_opts};

fn packs(repo: &Repository) -> Vec<String> {
    repo.store
        .list("packs/")
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect()
}

fn flip(repo: &Repository, key: &str, at: usize) {
    let mut b = repo.store.get(key).expect("get").expect("exists").to_vec();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x01;
    repo.store.put(key, Bytes::from(b)).expect("put");
}

#[test]
fn a_flipped_byte_anywhere_in_a_pack_fails_verify_with_checksum_mismatch() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 40, 2 << 20);
    add_path_deployment(&repo, "i", &src);
    let (m, _) = backup(&repo, "i").expect("backup");
    let pack = packs(&repo).into_iter().next().expect("a pack");
    let len = repo.store.head(&pack).expect("head").expect("size") as usize;
    // Header, first envelope, middle, the index trailer, the footer.
    for (n, at) in [0, 9, 20, len / 2, len - 40, len - 1]
        .into_iter()
        .enumerate()
    {
        flip(&repo, &pack, at);
        let err = verify::verify(&repo, &m, &EventBus::new(), 2).expect_err("verify must fail");
        assert_eq!(err.code, "verify.checksum_mismatch", "flip at {at}: {err}");
        assert_eq!(err.exit_code(), 9);
        // Restore either fails loudly or produces exactly the source:
        // never a silently different file.
        let out = tmp.path().join(format!("out{n}"));
        match restore_to(&repo, &m, &out) {
            Err(e) => {
                assert_eq!(e.class(), Class::Verify, "{e}");
                // The incomplete restore stays marked as such.
                let marker = pg_hardstorage_repo::restore::IN_PROGRESS_MARKER;
                assert!(
                    walk_names(&out).iter().any(|n| n == marker),
                    "a failed restore must keep its in-progress marker"
                );
                // Whatever file was left is correct: the damaged one is gone.
                let good = digest(&src);
                for (k, v) in digest(&out) {
                    if v.kind == "file" && k != marker.as_bytes() {
                        assert_eq!(good.get(&k).map(|g| &g.content), Some(&v.content));
                    }
                }
            }
            Ok(()) => assert_eq!(
                digest(&src),
                digest(&out),
                "flip at {at} restored different data"
            ),
        }
        flip(&repo, &pack, at); // undo
    }
    verify::verify(&repo, &m, &EventBus::new(), 2).expect("clean again");
}

fn walk_names(p: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            out.push(e.file_name().to_string_lossy().into_owned());
            if e.path().is_dir() {
                out.extend(walk_names(&e.path()));
            }
        }
    }
    out
}

#[test]
fn wrong_passphrase_is_an_auth_error() {
    let (_tmp, repo) = local_repo(small_opts());
    let err = Repository::open(repo.store.clone(), &KeySource::Passphrase("wrong".into()))
        .err()
        .expect("must refuse");
    assert_eq!(err.code, "auth.bad_key");
    assert_eq!(err.exit_code(), 3);
    assert!(err.message.contains("does not unlock"));
}

#[test]
fn truncated_pack_and_manifest_give_clear_errors() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 20, 1 << 20);
    add_path_deployment(&repo, "t", &src);
    let (m, _) = backup(&repo, "t").expect("backup");

    let mkey = format!("snapshots/t/{}", m.backup_id);
    let full = repo.store.get(&mkey).expect("get").expect("manifest");
    for cut in [0, 5, full.len() / 2, full.len() - 1] {
        repo.store.put(&mkey, full.slice(..cut)).expect("truncate");
        let err = catalog::load(&repo, &m.backup_id).expect_err("truncated manifest");
        assert_eq!(err.class(), Class::Verify, "cut {cut}: {err}");
    }
    repo.store.put(&mkey, full).expect("restore manifest");

    let pack = packs(&repo).into_iter().next().expect("pack");
    let bytes = repo.store.get(&pack).expect("get").expect("pack");
    repo.store
        .put(&pack, bytes.slice(..bytes.len() / 3))
        .expect("truncate");
    let err = verify::verify(&repo, &m, &EventBus::new(), 2).expect_err("truncated pack");
    assert_eq!(err.class(), Class::Verify, "{err}");
    let err =
        restore_to(&repo, &m, &tmp.path().join("out")).expect_err("restore of truncated pack");
    assert_eq!(err.class(), Class::Verify, "{err}");
}

#[test]
fn a_tampered_manifest_fails_its_signature() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 5, 0);
    add_path_deployment(&repo, "s", &src);
    let (m, _) = backup(&repo, "s").expect("backup");
    let key = format!("snapshots/s/{}", m.backup_id);
    flip(&repo, &key, 30);
    let err = catalog::load(&repo, &m.backup_id).expect_err("tampered");
    assert_eq!(err.code, "verify.signature_invalid");
    // Moving a manifest under another name is caught too.
    flip(&repo, &key, 30);
    let body = repo.store.get(&key).expect("get").expect("m");
    let other = "snapshots/s/s.full.20000101T000000Z";
    repo.store.put(other, body).expect("copy");
    let err = catalog::load(&repo, "s.full.20000101T000000Z").expect_err("moved");
    assert_eq!(err.code, "verify.signature_invalid");
}

/// Page-mapped runs are not re-hashed whole on restore; each page is
/// checked against its page map instead. In a repository without
/// encryption or compression (no AEAD tag, no zstd frame to notice), a
/// flipped byte in a run must still fail the restore, never restore a
/// different page.
#[test]
fn a_damaged_page_run_fails_restore_by_its_page_hashes() {
    use crate::pagededup::relation_files;
    use crate::postgres::add_pg_deployment;
    use pg_hardstorage_testkit::pg::PgCluster;
    let (tmp, repo) = local_repo(pg_hardstorage_repo::InitOptions {
        encryption: false,
        zstd_level: None,
        ..Default::default()
    });
    let src = PgCluster::start();
    src.run("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    add_pg_deployment(&repo, "plain", &src);
    let (m, _) = backup(&repo, "plain").expect("backup");
    assert!(m.stats.pages > 100, "{:?}", m.stats);
    let good = tmp.path().join("good");
    restore_to(&repo, &m, &good).expect("clean restore");
    let want = relation_files(&good);
    let mut refused = 0;
    let packs = packs(&repo);
    for (n, pack) in packs.iter().enumerate() {
        let len = repo.store.head(pack).expect("head").expect("size") as usize;
        let at = len / 2;
        flip(&repo, pack, at);
        let out = tmp.path().join(format!("out{n}"));
        match restore_to(&repo, &m, &out) {
            Err(e) => {
                assert_eq!(e.code, "verify.checksum_mismatch", "flip in {pack}: {e}");
                refused += 1;
            }
            Ok(()) => {
                let got = relation_files(&out);
                assert!(
                    got == want,
                    "flip in {pack} restored a different relation file"
                );
            }
        }
        flip(&repo, pack, at); // undo
    }
    assert!(
        refused > 0,
        "no flip in {} packs hit restored bytes",
        packs.len()
    );
}

/// The nonce budget (format.md §4): every chunk envelope and every sealed
/// object of an encrypted backup is encrypted under a salted subkey, never
/// under the data key itself, and no (salt, nonce) pair repeats.
#[test]
fn an_encrypted_backup_uses_subkeys_and_never_repeats_a_nonce() {
    use pg_hardstorage_engine::format::{parse_envelope, parse_pack, parse_sealed};
    use pg_hardstorage_engine::stage::flags::SUBKEY_SALT;
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 60, 4 << 20);
    add_path_deployment(&repo, "n", &src);
    backup(&repo, "n").expect("backup");
    let mut seen = std::collections::HashSet::new();
    let mut envelopes = 0;
    for pack in packs(&repo) {
        let bytes = repo.store.get(&pack).expect("get").expect("pack");
        for e in parse_pack(&bytes).expect("pack parses") {
            let at = e.offset as usize;
            let v = parse_envelope(&bytes[at..at + e.len as usize]).expect("envelope");
            assert_ne!(
                v.flags & SUBKEY_SALT,
                0,
                "{pack}: a chunk under the data key"
            );
            let s = v.sealing.expect("encrypted");
            assert!(seen.insert((s.salt, s.nonce)), "{pack}: a nonce repeated");
            envelopes += 1;
        }
    }
    assert!(envelopes > 10, "only {envelopes} envelopes");
    let snaps = repo.store.list("snapshots/").expect("list");
    assert!(!snaps.is_empty());
    for o in snaps {
        let bytes = repo.store.get(&o.key).expect("get").expect("manifest");
        let v =
            parse_sealed(pg_hardstorage_engine::format::MANIFEST_MAGIC, &bytes).expect("sealed");
        assert_ne!(
            v.flags & SUBKEY_SALT,
            0,
            "{}: sealed under the data key",
            o.key
        );
        let s = v.sealing.expect("encrypted");
        assert!(
            seen.insert((s.salt, s.nonce)),
            "{}: a nonce repeated",
            o.key
        );
    }
}

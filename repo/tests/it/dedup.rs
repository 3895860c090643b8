use crate::{add_path_deployment, backup};
use pg_hardstorage_testkit::tree::{rich_tree, write_big_file};
use pg_hardstorage_testkit::{dir_bytes, local_repo, small_opts};

#[test]
fn unchanged_tree_adds_under_one_percent() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    rich_tree(&src, 500, 64 << 20);
    add_path_deployment(&repo, "d", &src);
    let (m1, _) = backup(&repo, "d").expect("first");
    let before = dir_bytes(&tmp.path().join("repo"));
    let (m2, _) = backup(&repo, "d").expect("second");
    let after = dir_bytes(&tmp.path().join("repo"));
    let tree = m1.stats.bytes_logical;
    assert_eq!(m2.stats.bytes_added, 0);
    assert!(
        ((after - before) as f64) < 0.01 * tree as f64,
        "second backup grew the repository by {} bytes for a {} byte tree",
        after - before,
        tree
    );
}

#[test]
fn one_byte_insert_in_a_large_file_adds_a_handful_of_chunks() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let big = src.join("big");
    write_big_file(&big, 32 << 20, 5);
    add_path_deployment(&repo, "d", &src);
    let (m1, _) = backup(&repo, "d").expect("first");
    let mut data = std::fs::read(&big).expect("read");
    data.insert(data.len() / 2, 0xAB);
    std::fs::write(&big, &data).expect("write");
    let (m2, _) = backup(&repo, "d").expect("second");
    assert!(m1.stats.chunks > 200, "{} chunks", m1.stats.chunks);
    assert!(
        m2.stats.chunks_new <= 3,
        "one inserted byte produced {} new chunks of {}",
        m2.stats.chunks_new,
        m2.stats.chunks
    );
}

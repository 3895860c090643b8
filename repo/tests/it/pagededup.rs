//! Page-aware dedup on real PostgreSQL traffic: after a light pgbench run,
//! the second backup stores roughly only the relation pages that changed.

use crate::postgres::add_pg_deployment;
use crate::{backup, restore_to};
use pg_hardstorage_repo::pages::is_relation_path;
use pg_hardstorage_testkit::local_repo;
use pg_hardstorage_testkit::pg::{check_with_pg_verifybackup, PgCluster};
use std::collections::HashMap;
use std::path::Path;

const PAGE: usize = 8192;

/// Relation files under `root`, by path relative to it.
/// 2,000 pgbench transactions, then a checkpoint: a light change.
pub(crate) fn light_traffic(src: &PgCluster) {
    let args = ["-c", "4", "-j", "2", "-t", "500", "--random-seed=42"];
    src.run("pgbench", &[&args[..], &["postgres"]].concat());
    src.psql("postgres", "CHECKPOINT");
}

pub(crate) fn relation_files(root: &Path) -> HashMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut HashMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_file() {
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .to_str()
                    .expect("utf8")
                    .to_string();
                if is_relation_path(&rel) {
                    out.insert(rel, std::fs::read(&p).expect("read"));
                }
            }
        }
    }
    let mut out = HashMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn light_pgbench_traffic_stores_roughly_only_the_changed_pages() {
    let (tmp, repo) = local_repo(Default::default());
    assert!(repo.encrypted());
    let src = PgCluster::start();
    src.run("pgbench", &["-i", "-s", "20", "-q", "postgres"]);
    add_pg_deployment(&repo, "pages", &src);
    let (m1, _) = backup(&repo, "pages").expect("first backup");
    assert!(m1.stats.pages > 30_000, "{:?}", m1.stats);
    assert_eq!(m1.stats.pages_stored, m1.stats.pages, "no baseline yet");

    light_traffic(&src);
    let (m2, _) = backup(&repo, "pages").expect("second backup");

    // What each backup holds, as restored through the verifying read path.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let (a, b) = (tmp.path().join("first"), tmp.path().join("second"));
    restore_to(&repo, &m1, &a).expect("restore first");
    restore_to(&repo, &m2, &b).expect("restore second");
    // PostgreSQL's own manifest checks every file of the page-mapped restore.
    check_with_pg_verifybackup(&b);

    // The fraction of relation pages that changed between the two.
    let (old, new) = (relation_files(&a), relation_files(&b));
    let (mut pages, mut changed) = (0u64, 0u64);
    for (path, data) in &new {
        let before = old.get(path).map(Vec::as_slice).unwrap_or(&[]);
        for (i, page) in data.chunks(PAGE).enumerate() {
            pages += 1;
            if before.get(i * PAGE..(i + 1) * PAGE) != Some(page) {
                changed += 1;
            }
        }
    }
    let fraction = changed as f64 / pages as f64;
    let relation_bytes: u64 = old.values().map(|d| d.len() as u64).sum();
    assert_eq!(relation_bytes, m1.stats.paged_bytes);
    let bound = 2.0 * fraction * relation_bytes as f64;
    let added_logical = m2.stats.pages_stored * PAGE as u64;
    let added_physical = m2.stats.paged_bytes_added;
    eprintln!(
        "page dedup: {changed}/{pages} relation pages changed ({:.2}%); first backup's \
         relation bytes {relation_bytes}; second backup stored {} pages = {added_logical} \
         bytes ({added_physical} after compression and encryption); bound {bound:.0} \
         (ratio logical/bound {:.3})",
        fraction * 100.0,
        m2.stats.pages_stored,
        added_logical as f64 / bound
    );
    assert!(changed > 0 && fraction < 0.5, "a light change: {fraction}");
    assert!(
        (added_logical as f64) <= bound,
        "stored {added_logical} relation bytes, bound {bound}"
    );
    assert!(
        (added_physical as f64) <= bound,
        "added {added_physical} relation bytes, bound {bound}"
    );
    // And the pages it did not store are exactly the unchanged ones.
    assert!(m2.stats.pages_stored >= changed, "{:?}", m2.stats);

    // A pack holding page runs goes bad and is quarantined: the next
    // backup must not reuse runs that are gone. It stores those pages
    // afresh and restores whole.
    let pack = repo
        .store
        .list("packs/")
        .expect("list")
        .into_iter()
        .max_by_key(|o| o.size)
        .expect("a pack")
        .key;
    let mut bytes = repo.store.get(&pack).expect("get").expect("pack").to_vec();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    repo.store
        .put(&pack, bytes::Bytes::from(bytes))
        .expect("put");
    let e = pg_hardstorage_repo::check::scrub(
        &repo,
        true,
        &pg_hardstorage_engine::event::EventBus::new(),
        2,
    )
    .expect_err("a damaged pack");
    assert_eq!(e.code.as_ref(), "verify.scrub_failed");
    let (m3, _) = backup(&repo, "pages").expect("third backup after the quarantine");
    assert!(m3.stats.pages_stored > 0, "{:?}", m3.stats);
    let c = tmp.path().join("third");
    restore_to(&repo, &m3, &c).expect("restore third");
    check_with_pg_verifybackup(&c);
}

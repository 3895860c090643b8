//! Garbage collection: reclaims what deleted backups alone referenced,
//! never what a live or running backup can reference.

use crate::{add_path_deployment, backup, restore_to};
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::store::{DynStore, Throttled};
use pg_hardstorage_repo::gc::{gc, usage, GcOptions};
use pg_hardstorage_repo::{catalog, lifecycle, verify, Repository};
use pg_hardstorage_testkit::tree::{digest, write_big_file};
use pg_hardstorage_testkit::{local_repo, small_opts};
use std::sync::Arc;
use std::time::Duration;

fn now() -> GcOptions {
    GcOptions {
        apply: true,
        grace: Duration::ZERO,
        ..Default::default()
    }
}

#[test]
fn gc_reclaims_deleted_backups_and_keeps_every_live_one_whole() {
    let (tmp, repo) = local_repo(small_opts());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).expect("mkdir");
    std::fs::create_dir_all(&b).expect("mkdir");
    write_big_file(&a.join("shared"), 8 << 20, 1);
    std::fs::copy(a.join("shared"), b.join("shared")).expect("copy");
    write_big_file(&a.join("only-a"), 16 << 20, 2);
    write_big_file(&b.join("only-b"), 4 << 20, 3);
    add_path_deployment(&repo, "a", &a);
    add_path_deployment(&repo, "b", &b);
    let (ma, _) = backup(&repo, "a").expect("a");
    let (mb, _) = backup(&repo, "b").expect("b");

    // Nothing is garbage yet; a dry run changes nothing.
    let dry = gc(
        &repo,
        &GcOptions {
            apply: false,
            grace: Duration::ZERO,
            ..Default::default()
        },
        &EventBus::new(),
    )
    .expect("dry");
    assert_eq!((dry.packs_garbage, dry.packs_removed), (0, 0), "{dry:?}");
    let before = usage(&repo).expect("usage");
    assert!(before.garbage < before.data_packs / 100, "{before:?}");

    lifecycle::delete(&repo, &ma.backup_id, "test", None).expect("delete a");
    let dry = gc(
        &repo,
        &GcOptions {
            apply: false,
            grace: Duration::ZERO,
            ..Default::default()
        },
        &EventBus::new(),
    )
    .expect("dry");
    assert!(dry.packs_garbage > 0 && dry.packs_removed == 0, "{dry:?}");
    assert!(repo
        .store
        .head(&format!("snapshots/a/{}", ma.backup_id))
        .expect("head")
        .is_some());
    // Inside the grace period nothing goes.
    let young = gc(
        &repo,
        &GcOptions {
            apply: true,
            grace: Duration::from_secs(3600),
            ..Default::default()
        },
        &EventBus::new(),
    )
    .expect("young");
    assert_eq!(
        (young.packs_removed, young.packs_young > 0),
        (0, true),
        "{young:?}"
    );
    // The deleted backup's manifest goes at once (no reader may use it).
    assert_eq!(young.manifests_removed, 1);

    // What only the deleted backup referenced is now garbage.
    let unique = usage(&repo).expect("usage").garbage;
    assert!(unique > 2 << 20, "{unique}");
    let r = gc(&repo, &now(), &EventBus::new()).expect("gc");
    let after = usage(&repo).expect("usage");
    eprintln!(
        "gc: a's unique bytes {unique}; removed {} packs and repacked {} ({} live bytes copied), \
         {} bytes freed; data packs {} -> {}; garbage left {}",
        r.packs_removed,
        r.packs_repacked,
        r.bytes_repacked,
        r.bytes_removed,
        before.data_packs,
        after.data_packs,
        after.garbage
    );
    assert!(
        (before.data_packs - after.data_packs) as f64 >= 0.9 * unique as f64,
        "{before:?} -> {after:?}"
    );
    assert!((after.garbage as f64) <= 0.1 * unique as f64, "{after:?}");
    assert!(repo
        .store
        .head(&format!("snapshots/a/{}", ma.backup_id))
        .expect("head")
        .is_none());

    // Every remaining backup verifies and restores exactly.
    verify::verify(&repo, &mb, &EventBus::new(), 2).expect("b verifies");
    let target = tmp.path().join("rb");
    restore_to(&repo, &mb, &target).expect("restore b");
    assert_eq!(digest(&b), digest(&target));
    assert_eq!(catalog::list(&repo, None).expect("list").len(), 1);
    // Idempotent.
    assert_eq!(
        gc(&repo, &now(), &EventBus::new())
            .expect("again")
            .packs_removed,
        0
    );
}

#[test]
fn gc_apply_waits_for_a_running_backup_which_completes_and_restores() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    write_big_file(&src.join("f"), 12 << 20, 9);
    add_path_deployment(&repo, "s", &src);
    // A slow store keeps the backup running while GC tries to start.
    let slow: DynStore = Arc::new(Throttled {
        inner: repo.store.clone(),
        put_delay: Duration::from_millis(150),
    });
    let slow_repo = Repository {
        store: slow,
        ..repo.clone()
    };
    let runner = std::thread::spawn(move || backup(&slow_repo, "s").map(|(m, _)| m));
    let t0 = std::time::Instant::now();
    while repo.store.head("locks/s").expect("head").is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the backup never took its lease"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = gc(&repo, &now(), &EventBus::new()).expect_err("gc must wait for the writer");
    assert_eq!(e.code.as_ref(), "repo.locked", "{e:?}");
    let m = runner.join().expect("thread").expect("backup");
    let target = tmp.path().join("r");
    restore_to(&repo, &m, &target).expect("restore");
    assert_eq!(digest(&src), digest(&target));
    // With the writer gone, GC runs and keeps the backup whole.
    let r = gc(&repo, &now(), &EventBus::new()).expect("gc");
    assert_eq!(r.live_backups, 1);
    verify::verify(&repo, &m, &EventBus::new(), 2).expect("verifies after gc");
}

#[test]
fn a_writer_refuses_to_start_while_gc_holds_its_lease() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), b"x").expect("write");
    add_path_deployment(&repo, "w", &src);
    let lease = pg_hardstorage_repo::lock::Lease::acquire_gc(&repo).expect("gc lease");
    let e = backup(&repo, "w").map(|_| ()).expect_err("refused");
    assert_eq!(e.code.as_ref(), "repo.locked");
    assert!(e.message.contains("garbage collection"), "{}", e.message);
    drop(lease);
    backup(&repo, "w").expect("runs once gc is done");
}

#[test]
fn restores_and_gc_exclude_each_other() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), b"restore me").expect("write");
    add_path_deployment(&repo, "r", &src);
    let (m, _) = backup(&repo, "r").expect("backup");
    // GC running: a restore is refused up front, never broken midway.
    let gc_lease = pg_hardstorage_repo::lock::Lease::acquire_gc(&repo).expect("gc lease");
    let e = restore_to(&repo, &m, &tmp.path().join("t1")).expect_err("refused");
    assert_eq!(e.code.as_ref(), "repo.locked");
    assert!(!tmp.path().join("t1").exists(), "nothing written");
    drop(gc_lease);
    // A reader running: GC waits for it.
    let reader = pg_hardstorage_repo::lock::Lease::reader(&repo, "r", "restore")
        .expect("reader")
        .expect("a writable repository gives a lease");
    let e = gc(&repo, &now(), &EventBus::new()).expect_err("gc waits");
    assert_eq!(e.code.as_ref(), "repo.locked");
    assert!(e.message.contains("restore"), "{}", e.message);
    drop(reader);
    gc(&repo, &now(), &EventBus::new()).expect("gc runs");
    restore_to(&repo, &m, &tmp.path().join("t2")).expect("restore");
}

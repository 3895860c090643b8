//! Garbage collection: reclaims what deleted backups alone referenced,
//! never what a live or running backup can reference.

use crate::{add_path_deployment, backup, one_file_backup, restore_to};
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::format::Manifest;
use pg_hardstorage_engine::store::{DynStore, Throttled};
use pg_hardstorage_repo::gc::{gc, usage, GcOptions};
use pg_hardstorage_repo::{catalog, lifecycle, verify, Repository};
use pg_hardstorage_testkit::observed::Observed;
use pg_hardstorage_testkit::tree::{digest, write_big_file};
use pg_hardstorage_testkit::{local_repo, small_opts};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    add_path_deployment(&repo, "a", &a);
    add_path_deployment(&repo, "b", &b);
    // The shared data first, in a backup of its own: the next backup of a
    // stores only what is new, so its packs hold nothing b needs however
    // the workers interleave (one backup of both files mixes them, and
    // under load every pack may get a shared chunk).
    let (first_a, _) = backup(&repo, "a").expect("a, shared data only");
    write_big_file(&a.join("only-a"), 16 << 20, 2);
    write_big_file(&b.join("only-b"), 4 << 20, 3);
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
    verify::verify(&repo, &first_a, &EventBus::new(), 2).expect("a's first verifies");
    assert_eq!(catalog::list(&repo, None).expect("list").len(), 2);
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
fn a_writer_waits_for_a_running_gc_and_says_so() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f"), b"x").expect("write");
    add_path_deployment(&repo, "w", &src);
    let lease = pg_hardstorage_repo::lock::Lease::acquire_gc(&repo).expect("gc lease");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(lease);
    });
    let (m, events) = backup(&repo, "w").expect("runs once gc is done");
    release.join().expect("thread");
    let ops = events.ops();
    let at = |op: &str| ops.iter().position(|o| o == op);
    assert!(
        at("backup_started") < at("waiting_for_gc")
            && at("waiting_for_gc") < at("backup_completed"),
        "{ops:?}"
    );
    let w = events
        .events()
        .into_iter()
        .find(|e| e.op == "waiting_for_gc")
        .expect("event");
    let (subject, body) = (w.subject.expect("subject"), w.body.expect("body"));
    assert_eq!(subject["backup_id"], m.backup_id.as_str());
    assert_eq!(body["phase"], "running", "{body:?}");
    assert!(body["deadline_seconds"].as_u64() > Some(0), "{body:?}");
}

#[test]
fn restores_and_gc_exclude_each_other() {
    let (tmp, repo) = local_repo(small_opts());
    let m = one_file_backup(&repo, tmp.path(), "r", "f", b"restore me");
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

type Digest = std::collections::BTreeMap<Vec<u8>, pg_hardstorage_testkit::tree::Node>;

#[derive(Default)]
struct RaceTally {
    backups: AtomicU64,
    waited: AtomicU64,
    gc_ran: AtomicU64,
    gc_refused: AtomicU64,
}

/// One writer: backs up its deployment again and again (new data each
/// time), deletes the backup before (so GC has garbage to take) and keeps
/// the latest with the digest of what it held.
fn race_writer(
    repo: &Repository,
    d: &str,
    src: &std::path::Path,
    stop: &AtomicBool,
    tally: &RaceTally,
) -> (Manifest, Digest) {
    let mut last: Option<(Manifest, Digest)> = None;
    let mut i = 0u64;
    while last.is_none() || !stop.load(Ordering::Acquire) {
        write_big_file(
            &src.join(format!("f{}", i % 3)),
            256 << 10,
            i * 7 + d.len() as u64,
        );
        let (m, events) = backup(repo, d).unwrap_or_else(|e| panic!("backup of {d} #{i}: {e:?}"));
        if events.ops().iter().any(|o| o == "waiting_for_gc") {
            tally.waited.fetch_add(1, Ordering::Relaxed);
        }
        tally.backups.fetch_add(1, Ordering::Relaxed);
        if let Some((old, _)) = last.replace((m, digest(src))) {
            lifecycle::delete(repo, &old.backup_id, "race", None).expect("delete the older one");
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    last.unwrap_or_else(|| unreachable!("the loop runs at least once"))
}

/// One collector: `gc --apply` in a loop. A refused run must say
/// `repo.locked` and must have written nothing but its own lease record.
fn race_gc(repo: &Repository, stop: &AtomicBool, tally: &RaceTally) {
    let rec = Observed::wrap(repo.store.clone());
    let mine = Repository {
        store: rec.clone(),
        ..repo.clone()
    };
    while !stop.load(Ordering::Acquire) {
        match gc(&mine, &now(), &EventBus::new()) {
            Ok(_) => {
                tally.gc_ran.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                assert_eq!(e.code.as_ref(), "repo.locked", "{e:?}");
                let writes: Vec<_> = rec
                    .take()
                    .into_iter()
                    .filter(|(op, _)| op.mutates())
                    .collect();
                assert!(
                    writes.iter().all(|(_, k)| k == "locks/.gc"),
                    "a refused GC changed {writes:?}"
                );
                tally.gc_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
        rec.take();
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// Races `gcs` collectors against `writers` backups for at least `least`
/// (longer, up to a minute, until both a granted and a refused GC were
/// seen); then every deployment's latest backup restores exactly and the
/// repository checks clean.
fn race(gcs: usize, writers: usize, least: Duration) {
    let (tmp, repo) = local_repo(small_opts());
    let names: Vec<String> = (0..writers).map(|w| format!("w{w}")).collect();
    for n in &names {
        let src = tmp.path().join(n);
        std::fs::create_dir_all(&src).expect("mkdir");
        add_path_deployment(&repo, n, &src);
    }
    let (stop, tally) = (AtomicBool::new(false), RaceTally::default());
    let t0 = std::time::Instant::now();
    let kept = std::thread::scope(|s| {
        let ws: Vec<_> = names
            .iter()
            .map(|n| {
                let (repo, src, stop, tally) = (&repo, tmp.path().join(n), &stop, &tally);
                s.spawn(move || race_writer(repo, n, &src, stop, tally))
            })
            .collect();
        for _ in 0..gcs {
            s.spawn(|| race_gc(&repo, &stop, &tally));
        }
        let seen_both = || {
            tally.gc_ran.load(Ordering::Relaxed) > 0 && tally.gc_refused.load(Ordering::Relaxed) > 0
        };
        while t0.elapsed() < least || (!seen_both() && t0.elapsed() < Duration::from_secs(60)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Release);
        ws.into_iter()
            .map(|w| w.join().expect("writer thread"))
            .collect::<Vec<_>>()
    });
    eprintln!(
        "race {gcs} gc x {writers} writers, {:.1}s: {} backups ({} waited for GC), GC ran {} and was refused {} times",
        t0.elapsed().as_secs_f64(),
        tally.backups.load(Ordering::Relaxed),
        tally.waited.load(Ordering::Relaxed),
        tally.gc_ran.load(Ordering::Relaxed),
        tally.gc_refused.load(Ordering::Relaxed),
    );
    assert!(
        tally.gc_refused.load(Ordering::Relaxed) > 0,
        "the race never happened"
    );
    assert!(
        tally.gc_ran.load(Ordering::Relaxed) > 0,
        "GC never found a gap"
    );
    gc(&repo, &now(), &EventBus::new()).expect("a last gc");
    let report = pg_hardstorage_repo::check::check(&repo).expect("check");
    assert!(report.ok, "{report:?}");
    for (i, (m, want)) in kept.iter().enumerate() {
        let target = tmp.path().join(format!("restored-{i}"));
        restore_to(&repo, m, &target).expect("restore the latest");
        assert_eq!(&digest(&target), want, "{}", m.backup_id);
    }
}

#[test]
fn gc_attempts_racing_backups_never_fail_one_and_refused_ones_change_nothing() {
    race(3, 2, Duration::from_secs(8));
}

/// The same race on one core, where a slow scheduler widens every window.
#[test]
fn the_gc_race_holds_on_a_single_core() {
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("taskset")
        .args(["-c", "0"])
        .arg(&exe)
        .args([
            "--exact",
            "gc::gc_attempts_racing_backups_never_fail_one_and_refused_ones_change_nothing",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap_or_else(|e| panic!("taskset (util-linux) is needed for this test: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "the race did not run: {text}");
}

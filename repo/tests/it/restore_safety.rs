//! A restore never writes outside its target: not through links the backup
//! holds, not through links already in a forced target, not into settings
//! a recovery target smuggles in, and never into a relative or empty path.

use crate::{add_path_deployment, backup, one_file_backup, restore_to};
use pg_hardstorage_engine::event::{EventBus, Recorder};
use pg_hardstorage_repo::restore::{restore, Recovery, RecoveryTarget, RestoreOptions};
use pg_hardstorage_testkit::tree::digest;
use pg_hardstorage_testkit::{local_repo, small_opts};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

fn opts(target: &Path, force: bool, recovery: Option<Recovery>) -> RestoreOptions {
    RestoreOptions {
        target: target.to_path_buf(),
        force,
        threads: 2,
        recovery,
        verify: Default::default(),
        tablespace_mapping: Vec::new(),
        delta: false,
        pg_bindirs: Vec::new(),
        standby: None,
    }
}

fn recovery(target: RecoveryTarget) -> Option<Recovery> {
    Some(Recovery {
        restore_command: Some("false".into()),
        target,
        staged: Vec::new(),
        prefetch: 0,
    })
}

/// A file outside every target, which no restore may touch.
fn victim(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let v = dir.join("victim");
    std::fs::write(&v, b"precious").expect("write");
    v
}

#[test]
fn recovery_files_are_never_written_through_links_the_backup_holds() {
    let (tmp, repo) = local_repo(small_opts());
    let v = victim(&tmp.path().join("outside"));
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("PG_VERSION"), b"15\n").expect("write");
    symlink(&v, src.join("postgresql.auto.conf")).expect("ln");
    symlink(&v, src.join("recovery.signal")).expect("ln");
    add_path_deployment(&repo, "s", &src);
    let (m, _) = backup(&repo, "s").expect("backup");
    let out = tmp.path().join("out");
    restore(
        &repo,
        &m,
        &opts(&out, false, recovery(RecoveryTarget::Latest)),
        &EventBus::new(),
    )
    .expect("restore");
    assert_eq!(std::fs::read(&v).expect("read"), b"precious");
    let conf = out.join("postgresql.auto.conf");
    assert!(std::fs::symlink_metadata(&conf).expect("meta").is_file());
    assert!(std::fs::read_to_string(&conf)
        .expect("read")
        .contains("else false; fi'"));
}

#[test]
fn a_forced_restore_replaces_links_in_the_target_instead_of_following_them() {
    let (tmp, repo) = local_repo(small_opts());
    let outside = tmp.path().join("outside");
    let v = victim(&outside);
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("base")).expect("mkdir");
    std::fs::write(src.join("victim"), b"from the backup").expect("write");
    std::fs::write(src.join("base/victim"), b"from the backup too").expect("write");
    add_path_deployment(&repo, "f", &src);
    let (m, _) = backup(&repo, "f").expect("backup");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    symlink(&v, out.join("victim")).expect("ln");
    symlink(&outside, out.join("base")).expect("ln");
    restore(&repo, &m, &opts(&out, true, None), &EventBus::new()).expect("forced restore");
    assert_eq!(std::fs::read(&v).expect("read"), b"precious");
    assert_eq!(digest(&src), digest(&out));
}

#[test]
fn a_recovery_target_cannot_inject_settings() {
    let (tmp, repo) = local_repo(small_opts());
    let m = one_file_backup(&repo, tmp.path(), "n", "PG_VERSION", b"15\n");
    let out = tmp.path().join("out");
    let evil = RecoveryTarget::Name("x\\\nrestore_command = 'touch /tmp/pwned'".into());
    let e = restore(
        &repo,
        &m,
        &opts(&out, false, recovery(evil)),
        &EventBus::new(),
    )
    .map(|_| ())
    .expect_err("refused");
    assert_eq!(e.code.as_ref(), "usage.invalid_argument", "{e:?}");
    assert!(!out.exists(), "refused before writing anything");
    // A quote and a backslash are fine: quoted as PostgreSQL reads them.
    let odd = RecoveryTarget::Name("it's a \\ name".into());
    restore(
        &repo,
        &m,
        &opts(&out, false, recovery(odd)),
        &EventBus::new(),
    )
    .expect("restore");
    let conf = std::fs::read_to_string(out.join("postgresql.auto.conf")).expect("read");
    assert!(
        conf.contains("recovery_target_name = 'it''s a \\\\ name'\n"),
        "{conf}"
    );
}

#[test]
fn an_empty_or_relative_target_is_refused() {
    let (tmp, repo) = local_repo(small_opts());
    let m = one_file_backup(&repo, tmp.path(), "e", "f", b"x");
    for t in ["", "relative/dir"] {
        let e = restore_to(&repo, &m, Path::new(t)).expect_err("refused");
        assert_eq!(e.code.as_ref(), "restore.target_invalid", "{t:?}: {e:?}");
        assert_eq!(e.exit_code(), 4);
    }
    assert!(!Path::new("relative").exists());
}

#[test]
fn a_restore_reports_progress_and_reads_each_pack_range_once() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    pg_hardstorage_testkit::tree::write_big_file(&src.join("a"), 6 << 20, 1);
    // The same content twice: one chunk set, decoded once, written twice.
    std::fs::copy(src.join("a"), src.join("b")).expect("copy");
    add_path_deployment(&repo, "p", &src);
    let (m, _) = backup(&repo, "p").expect("backup");
    let bus = EventBus::new();
    let rec = Recorder::new();
    bus.add_sink(rec.clone());
    let out = tmp.path().join("out");
    restore(&repo, &m, &opts(&out, false, None), &bus).expect("restore");
    bus.close();
    assert_eq!(digest(&src), digest(&out));
    let last = rec
        .events()
        .into_iter()
        .rfind(|e| e.op == "restore_progress")
        .expect("a restore_progress event");
    let body = last.body.expect("body");
    assert_eq!(body["bytes_done"], body["bytes_total"], "{body}");
    assert_eq!(body["bytes_total"], 12 << 20, "{body}");
    assert_eq!(body["files_done"], 2, "{body}");
    let (requests, packs) = (body["requests"].as_u64(), body["packs_touched"].as_u64());
    assert!(requests <= packs, "one GET per pack here: {body}");
}

#[test]
fn a_delta_restore_replaces_a_hard_linked_file_instead_of_writing_into_it() {
    let (tmp, repo) = local_repo(small_opts());
    let m = one_file_backup(&repo, tmp.path(), "h", "f", b"from the backup");
    let v = victim(&tmp.path().join("outside"));
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).expect("mkdir");
    std::fs::hard_link(&v, out.join("f")).expect("ln");
    let mut o = opts(&out, false, None);
    o.delta = true;
    restore(&repo, &m, &o, &EventBus::new()).expect("delta restore");
    assert_eq!(
        std::fs::read(out.join("f")).expect("read"),
        b"from the backup"
    );
    assert_eq!(std::fs::read(&v).expect("read"), b"precious");
}

//! `restore --delta` into the previous restore of the same cluster: only
//! what changed is written, what the backup lacks is removed, and the
//! cluster starts with the source's data.

use crate::pagededup::{light_traffic, relation_files};
use crate::postgres::{add_pg_deployment, checksums};
use crate::{backup, restore_to};
use pg_hardstorage_engine::event::{EventBus, Recorder};
use pg_hardstorage_repo::restore::{restore, RestoreOptions, VerifyMode};
use pg_hardstorage_testkit::local_repo;
use pg_hardstorage_testkit::pg::{check_with_pg_verifybackup, PgCluster};

const PAGE: usize = 8192;

#[test]
fn a_delta_restore_writes_about_the_changed_pages_and_boots() {
    let (tmp, repo) = local_repo(Default::default());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let src = PgCluster::start();
    src.run("pgbench", &["-i", "-s", "10", "-q", "postgres"]);
    add_pg_deployment(&repo, "d", &src);
    let (m1, _) = backup(&repo, "d").expect("first backup");
    let target = tmp.path().join("replica");
    restore_to(&repo, &m1, &target).expect("first restore");
    let old = relation_files(&target);

    light_traffic(&src);
    let (m2, _) = backup(&repo, "d").expect("second backup");
    let want = checksums(&src);
    std::fs::write(target.join("stray"), b"not in the backup").expect("write");

    let bus = EventBus::new();
    let seen = Recorder::new();
    bus.add_sink(seen.clone());
    let opts = RestoreOptions {
        target: target.clone(),
        force: false,
        threads: 2,
        recovery: None,
        // Require where a pg_verifybackup for the major exists (not 17's).
        verify: match pg_hardstorage_testkit::pg::verifybackup_available() {
            true => VerifyMode::Require,
            false => VerifyMode::Auto,
        },
        tablespace_mapping: Vec::new(),
        delta: true,
        pg_bindirs: pg_hardstorage_repo::restore::pgverify::bindirs_from_env(),
        standby: None,
    };
    let summary = restore(&repo, &m2, &opts, &bus).expect("delta restore");
    bus.close();
    let checked = match pg_hardstorage_testkit::pg::verifybackup_available() {
        true => "passed",
        false => "unavailable",
    };
    assert_eq!(summary.pg_verifybackup, checked);
    let written = seen
        .events()
        .into_iter()
        .rfind(|e| e.op == "restore_progress")
        .and_then(|e| e.body)
        .and_then(|b| b["bytes_done"].as_u64())
        .expect("restore_progress");

    let new = relation_files(&target);
    let changed: usize = new
        .iter()
        .map(|(path, data)| {
            let before = old.get(path).map(Vec::as_slice).unwrap_or(&[]);
            data.chunks(PAGE)
                .enumerate()
                .filter(|(i, p)| before.get(i * PAGE..(i + 1) * PAGE) != Some(*p))
                .count()
        })
        .sum();
    let changed_bytes = (changed * PAGE) as u64;
    let total: u64 = m2.entries.iter().map(|e| e.size).sum();
    eprintln!(
        "delta restore: wrote {written} bytes of {total}; {changed} relation pages changed \
         ({changed_bytes} bytes): {:.2}x the changed pages",
        written as f64 / changed_bytes as f64
    );
    assert!(changed > 0, "pgbench changed nothing");
    assert!(
        written < total / 4,
        "a delta, not a full restore: {written} of {total}"
    );
    assert!(
        written < 2 * changed_bytes,
        "wrote {written} bytes for {changed_bytes} bytes of changed pages"
    );
    assert!(
        !target.join("stray").exists(),
        "what the backup lacks is removed"
    );
    check_with_pg_verifybackup(&target);
    let restored = PgCluster::on_existing(&target).started();
    assert_eq!(checksums(&restored), want, "tables equal the source's");
}

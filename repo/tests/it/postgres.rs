//! Real PostgreSQL 15: a base backup over the replication protocol, restored
//! into a new directory, checked by pg_verifybackup, started, compared table
//! by table, and checked by pg_amcheck.

use crate::{backup, restore_to};
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_testkit::local_repo;
use pg_hardstorage_testkit::pg::{check_with_pg_verifybackup, PgCluster};

const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

pub fn add_pg_deployment(repo: &pg_hardstorage_repo::Repository, name: &str, pg: &PgCluster) {
    add_pg_deployment_at(repo, name, pg.conninfo());
}

/// A postgres deployment reached through `conninfo`.
fn add_pg_deployment_at(repo: &pg_hardstorage_repo::Repository, name: &str, conninfo: String) {
    deployment::create(
        repo,
        Deployment {
            name: name.into(),
            kind: Kind::Postgres,
            path: None,
            pg: Some(conninfo),
            pgdata: None,
            created_at: String::new(),
            system_identifier: None,
            tenant: None,
        },
    )
    .expect("deployment");
}

pub(crate) fn checksums(pg: &PgCluster) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| pg.psql("postgres", &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {t} x")))
        .collect()
}

#[test]
fn pgbench_base_backup_restores_verifies_and_starts() {
    let (tmp, repo) = local_repo(Default::default());
    full_restore(&repo, tmp.path(), 10);
}

/// The same against S3 (moto), encrypted.
#[test]
fn pgbench_base_backup_on_s3_restores() {
    let moto = pg_hardstorage_testkit::s3::Moto::start();
    moto.create_bucket("pgfull");
    let store = phs_store::open_store_with(
        "s3://pgfull/repo",
        false,
        &phs_store::StoreOptions {
            s3_endpoint: Some(moto.endpoint()),
        },
    )
    .expect("s3");
    let repo = pg_hardstorage_testkit::init(store, Default::default());
    assert!(repo.encrypted());
    let tmp = tempfile::tempdir().expect("tmp");
    full_restore(&repo, tmp.path(), 2);
}

/// pgbench at `scale` → base backup → restore → pg_verifybackup → start →
/// per-table checksums equal the source's at backup time → pg_amcheck.
fn full_restore(repo: &pg_hardstorage_repo::Repository, tmp: &std::path::Path, scale: u32) {
    let src = PgCluster::start();
    src.run(
        "pgbench",
        &["-i", "-s", &scale.to_string(), "-q", "postgres"],
    );
    src.psql(
        "postgres",
        "UPDATE pgbench_accounts SET abalance = aid % 97 WHERE aid % 13 = 0",
    );
    let before = checksums(&src);

    add_pg_deployment(repo, "pg1", &src);
    let (m, events) = backup(repo, "pg1").expect("base backup");
    assert_eq!(
        events.ops().last().map(String::as_str),
        Some("backup_completed")
    );
    assert_eq!(m.source["type"], "postgres");
    assert!(
        m.source["system_identifier"]
            .as_str()
            .is_some_and(|s| s.len() > 5),
        "{}",
        m.source
    );
    assert!(
        m.stats.bytes_logical > (scale as u64) << 20,
        "{} bytes",
        m.stats.bytes_logical
    );
    assert!(m.entries.iter().any(|e| e.path == "backup_manifest"));
    assert!(m.entries.iter().any(|e| e.path == "backup_label"));

    // Writes after the backup must not appear in the restore.
    src.psql(
        "postgres",
        "UPDATE pgbench_branches SET bbalance = bbalance + 1",
    );

    let target = tmp.join("restored");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    restore_to(repo, &m, &target).expect("restore");
    check_with_pg_verifybackup(&target);

    let restored = PgCluster::on_existing(&target).started();
    assert_eq!(
        checksums(&restored),
        before,
        "restored tables differ from the source at backup time"
    );
    restored.amcheck();
}

/// Restoring over a running server is refused, even with --force.
#[test]
fn restore_refuses_a_live_postmaster_even_with_force() {
    let (_tmp, repo) = local_repo(pg_hardstorage_testkit::small_opts());
    let live = PgCluster::start();
    let src = tempfile::tempdir().expect("src");
    std::fs::write(src.path().join("f"), b"x").expect("write");
    crate::add_path_deployment(&repo, "p", src.path());
    let (m, _) = backup(&repo, "p").expect("backup");
    let err = pg_hardstorage_repo::restore::restore(
        &repo,
        &m,
        &pg_hardstorage_repo::restore::RestoreOptions {
            target: live.data.clone(),
            force: true,
            threads: 1,
            recovery: None,
            verify: Default::default(),
            tablespace_mapping: Vec::new(),
            delta: false,
            pg_bindirs: Vec::new(),
            standby: None,
        },
        &pg_hardstorage_engine::event::EventBus::new(),
    )
    .expect_err("must refuse");
    assert_eq!(err.code, "restore.postmaster_running");
    assert_eq!(err.exit_code(), 4);
    assert_eq!(
        live.psql("postgres", "SELECT 1").trim(),
        "1",
        "the live server is untouched"
    );
}

/// A tablespace outside the data directory is backed up and restored inside
/// it (pg_tblspc/<oid>/), where PostgreSQL's backup_manifest lists its files.
#[test]
fn tablespace_is_backed_up_and_restored() {
    let (tmp, repo) = local_repo(Default::default());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let src = PgCluster::start();
    let ts = tmp.path().join("ts");
    std::fs::create_dir_all(&ts).expect("ts dir");
    pg_hardstorage_testkit::pg::give_to_postgres(&ts);
    src.psql(
        "postgres",
        &format!("CREATE TABLESPACE extra LOCATION '{}'", ts.display()),
    );
    src.psql("postgres", "CREATE TABLE far (v int) TABLESPACE extra");
    src.psql(
        "postgres",
        "INSERT INTO far SELECT g FROM generate_series(1, 5000) g",
    );
    add_pg_deployment(&repo, "ts", &src);
    let (m, _) = backup(&repo, "ts").expect("backup with a tablespace");
    assert_eq!(
        m.source["tablespaces"].as_array().map(Vec::len),
        Some(1),
        "{}",
        m.source
    );
    let target = tmp.path().join("restored");
    // The original location is in use by the source cluster: refused.
    let err = restore_to(&repo, &m, &target).expect_err("tablespace location in use");
    assert_eq!(err.code, "restore.target_not_empty");
    let _ = std::fs::remove_dir_all(&target);
    let moved = tmp.path().join("ts-restored");
    pg_hardstorage_repo::restore::restore(
        &repo,
        &m,
        &pg_hardstorage_repo::restore::RestoreOptions {
            target: target.clone(),
            force: false,
            threads: 2,
            recovery: None,
            verify: Default::default(),
            tablespace_mapping: vec![(ts.display().to_string(), moved.clone())],
            delta: false,
            pg_bindirs: Vec::new(),
            standby: None,
        },
        &pg_hardstorage_engine::event::EventBus::new(),
    )
    .expect("restore with a tablespace mapping");
    let oid = m.source["tablespaces"][0]["oid"].as_str().expect("oid");
    let link = std::fs::read_link(target.join(format!("pg_tblspc/{oid}"))).expect("link");
    assert_eq!(link, moved);
    check_with_pg_verifybackup(&target);
    let restored = PgCluster::on_existing(&target).started();
    assert_eq!(
        restored
            .psql("postgres", "SELECT count(*), sum(v) FROM far")
            .trim(),
        "5000|12502500"
    );
}

fn restore_pg(
    repo: &pg_hardstorage_repo::Repository,
    m: &pg_hardstorage_engine::format::Manifest,
    target: &std::path::Path,
    verify: pg_hardstorage_repo::restore::VerifyMode,
    pg_bindirs: Vec<std::path::PathBuf>,
    bus: &pg_hardstorage_engine::event::EventBus,
) -> Result<pg_hardstorage_repo::restore::RestoreSummary, pg_hardstorage_engine::Problem> {
    pg_hardstorage_repo::restore::restore(
        repo,
        m,
        &pg_hardstorage_repo::restore::RestoreOptions {
            target: target.to_path_buf(),
            force: false,
            threads: 2,
            recovery: None,
            verify,
            tablespace_mapping: Vec::new(),
            delta: false,
            pg_bindirs,
            standby: None,
        },
        bus,
    )
}

/// PostgreSQL 18 (its full tool set from PyPI, scripts/pg-majors.sh): a
/// restore with default options finds 18's own pg_verifybackup, which
/// passes, and the cluster starts with the source's tables. Where only an
/// older pg_verifybackup is installed (15 refuses 18's version-2 manifest)
/// the good restore is not failed: it says "unavailable" and warns, and
/// only `--verify require` fails.
#[test]
fn postgresql_18_restores_by_default_with_its_own_pg_verifybackup() {
    use pg_hardstorage_engine::event::{EventBus, Recorder};
    use pg_hardstorage_repo::restore::VerifyMode;
    use pg_hardstorage_testkit::pg::major_bindir;
    let (tmp, repo) = local_repo(Default::default());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let src = PgCluster::initdb_major(18).started();
    src.run("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    let before = checksums(&src);
    add_pg_deployment(&repo, "pg18", &src);
    let (m, _) = backup(&repo, "pg18").expect("base backup of 18");
    let bus = EventBus::new();

    let target = tmp.path().join("r18");
    let s = restore_pg(
        &repo,
        &m,
        &target,
        VerifyMode::Auto,
        vec![major_bindir(18)],
        &bus,
    )
    .expect("restore of 18");
    assert_eq!(s.pg_verifybackup, "passed");

    let rec = Recorder::new();
    bus.add_sink(rec.clone());
    let only_old = tmp.path().join("r18-old-tools");
    let s = restore_pg(&repo, &m, &only_old, VerifyMode::Auto, Vec::new(), &bus)
        .expect("a good restore is not failed for want of a tool");
    assert_eq!(s.pg_verifybackup, "unavailable");
    assert!(
        rec.ops().iter().any(|o| o == "pg_verifybackup_unavailable"),
        "{:?}",
        rec.ops()
    );
    let e = restore_pg(
        &repo,
        &m,
        &tmp.path().join("r18-require"),
        VerifyMode::Require,
        Vec::new(),
        &EventBus::new(),
    )
    .expect_err("--verify require without a usable tool");
    assert_eq!(e.code, "restore.verify_unavailable", "{e}");

    let restored = PgCluster::on_existing_major(&target, 18).started();
    assert_eq!(checksums(&restored), before);
}

/// A cluster made with another WAL segment size is refused before anything
/// is archived (names and offsets assume 16 MiB), with a stable code.
#[test]
fn a_cluster_with_another_wal_segment_size_is_refused() {
    let (_tmp, repo) = local_repo(Default::default());
    let major = pg_hardstorage_testkit::pg::default_major();
    let src = PgCluster::initdb_with(major, &["--wal-segsize=32"]).started();
    add_pg_deployment(&repo, "seg32", &src);
    let e = backup(&repo, "seg32")
        .err()
        .expect("32 MB segments are refused");
    assert_eq!(e.code, "pg.wal_segment_size_unsupported", "{e}");
    assert_eq!(e.exit_code(), 4);
    assert!(e.message.contains("32MB"), "{e}");
}

/// A deployment pointing at a hot standby takes its base backups there
/// (`BASE_BACKUP` on the standby, its end from the standby's replay): the
/// backup says it came from a standby, restores, verifies, starts and
/// holds the tables as the standby had them, writes made on the primary
/// afterwards excluded.
#[test]
fn a_hot_standby_is_backed_up_there_and_restores() {
    let (tmp, repo) = local_repo(Default::default());
    let mut primary = PgCluster::start();
    primary.run("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    let standby = primary.standby().started();
    primary.psql(
        "postgres",
        "UPDATE pgbench_accounts SET abalance = aid % 89 WHERE aid % 7 = 0",
    );
    standby.catch_up(&primary);
    let in_recovery = standby.psql("postgres", "SELECT pg_is_in_recovery()");
    assert_eq!(in_recovery.trim(), "t", "not a standby");
    let before = checksums(&standby);
    assert_eq!(before, checksums(&primary), "the standby lags");

    add_pg_deployment(&repo, "replica", &standby);
    let (m, _) = backup(&repo, "replica").expect("a base backup on the standby");
    primary.psql(
        "postgres",
        "UPDATE pgbench_branches SET bbalance = bbalance + 1",
    );
    standby.catch_up(&primary);

    let target = tmp.path().join("restored");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    restore_to(&repo, &m, &target).expect("restore");
    let label = std::fs::read_to_string(target.join("backup_label")).expect("backup_label");
    assert!(label.contains("BACKUP FROM: standby"), "{label}");
    // The standby's signal file is in the backup but not restored: the
    // restore would otherwise follow the live primary past the backup.
    assert!(m.entries.iter().any(|e| e.path == "standby.signal"));
    assert!(!target.join("standby.signal").exists());
    check_with_pg_verifybackup(&target);
    let restored = PgCluster::on_existing(&target).started();
    let in_recovery = restored.psql("postgres", "SELECT pg_is_in_recovery()");
    assert_eq!(in_recovery.trim(), "f", "{}", restored.log());
    assert_eq!(checksums(&restored), before, "restored tables differ");
    restored.amcheck();
}

/// PostgreSQL 17+ with `summarize_wal = on`: after a first backup and a
/// light pgbench run, the next backup is incremental (`UPLOAD_MANIFEST`,
/// `BASE_BACKUP (INCREMENTAL)`): the server sends only the changed blocks,
/// and the backup is stored as an ordinary page-mapped one that restores on
/// its own — its tables equal a forced full backup's restore, the cluster
/// starts, pg_verifybackup (18's, for 18) and pg_amcheck pass.
#[test]
fn an_incremental_backup_reads_only_changed_blocks_and_restores_whole() {
    use pg_hardstorage_repo::restore::VerifyMode;
    use pg_hardstorage_testkit::pg::major_bindir;
    let Some(m) = incremental_major() else {
        // Before 17: the server cannot; every backup reads all, silently.
        let (_tmp, repo) = local_repo(Default::default());
        let src = PgCluster::start();
        add_pg_deployment(&repo, "inc", &src);
        backup(&repo, "inc").expect("first");
        let (m2, events) = backup(&repo, "inc").expect("second");
        assert!(m2.source["incremental_from"].is_null());
        assert!(!events
            .ops()
            .iter()
            .any(|o| o.starts_with("backup_incremental")));
        return;
    };
    let (tmp, repo) = local_repo(Default::default());
    let src = PgCluster::initdb_with(m, &["--data-checksums"]);
    src.configure(&["summarize_wal = on"]);
    let src = src.started();
    src.run("pgbench", &["-i", "-s", "20", "-q", "postgres"]);
    add_pg_deployment(&repo, "inc", &src);
    let (m1, _) = backup(&repo, "inc").expect("first backup");
    assert!(m1.source["incremental_from"].is_null(), "{}", m1.source);
    src.run(
        "pgbench",
        &[
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "500",
            "--random-seed=42",
            "postgres",
        ],
    );
    let (m2, events) = crate::backup_opts(&repo, "inc", false).expect("incremental backup");
    assert_eq!(
        m2.source["incremental_from"],
        m1.backup_id,
        "{:?}",
        events.ops()
    );
    // A sample of the pages not sent was read back and matched.
    let checked = event_body(&events, "backup_incremental_checked");
    assert!(checked["compared"].as_u64() > Some(30), "{checked}");
    // The next one against this one: the server takes the manifest this
    // product rewrote (whole files, checksum computed again).
    src.run(
        "pgbench",
        &[
            "-c",
            "2",
            "-j",
            "2",
            "-t",
            "200",
            "--random-seed=7",
            "postgres",
        ],
    );
    let before = checksums(&src);
    let (m2b, events) = crate::backup_opts(&repo, "inc", false).expect("second incremental");
    assert_eq!(
        m2b.source["incremental_from"],
        m2.backup_id,
        "{:?}",
        events.ops()
    );
    let (m3, _) = crate::backup_opts(&repo, "inc", true).expect("forced full backup");
    assert!(m3.source["incremental_from"].is_null());
    let got = |m: &pg_hardstorage_engine::format::Manifest| {
        m.source["bytes_received"].as_u64().unwrap_or(0)
    };
    let changed = m2.stats.pages_stored * 8192;
    // What the full read sends besides relation pages (WAL, catalogs'
    // small files, the manifest) is what the incremental sends besides
    // its changed blocks, give or take a WAL segment.
    let other = got(&m3).saturating_sub(m3.stats.paged_bytes);
    eprintln!(
        "bytes received: incremental {} (changed relation bytes {changed}), full {} ({} of relation files); data directory {}",
        got(&m2),
        got(&m3),
        m3.stats.paged_bytes,
        m3.stats.bytes_logical
    );
    assert!(
        got(&m2) <= other + 2 * changed + (16 << 20),
        "incremental sent {} for {changed} changed bytes (full: {}, {other} not relation pages)",
        got(&m2),
        got(&m3)
    );
    assert!(got(&m2) * 3 < got(&m3), "{} vs {}", got(&m2), got(&m3));
    assert!(!m2.entries.iter().any(|e| e.path.contains("INCREMENTAL.")));

    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let bindirs = vec![major_bindir(18)];
    let verify = match m {
        18 => VerifyMode::Require,
        _ => VerifyMode::Auto,
    };
    for (which, man) in [("incremental", &m2b), ("full", &m3)] {
        let target = tmp.path().join(which);
        let bus = pg_hardstorage_engine::event::EventBus::new();
        let s = restore_pg(&repo, man, &target, verify, bindirs.clone(), &bus).expect(which);
        if m == 18 {
            assert_eq!(s.pg_verifybackup, "passed", "{which}");
        }
        let label = std::fs::read_to_string(target.join("backup_label")).expect("label");
        assert!(!label.contains("INCREMENTAL FROM"), "{label}");
        let restored = PgCluster::on_existing_major(&target, m).started();
        assert_eq!(checksums(&restored), before, "{which}: tables differ");
        restored.amcheck();
    }
}

/// The body (or error) of the first event named `op`.
fn event_body(r: &pg_hardstorage_engine::event::Recorder, op: &str) -> serde_json::Value {
    r.events()
        .into_iter()
        .find(|e| e.op == op)
        .and_then(|e| e.body.or(e.error))
        .unwrap_or_else(|| panic!("no {op} event in {:?}", r.ops()))
}

/// The incremental backup's cross-check: pages changed behind PostgreSQL's
/// back (so no WAL summary knows) are never sent, but the sampled re-read
/// finds them: a loud `backup_incremental_mismatch`, and the backup is
/// taken again in full. Also: with `summarize_wal` off the backup reads
/// everything and says why.
#[test]
fn an_incremental_backup_catches_pages_changed_behind_the_servers_back() {
    let Some(m) = incremental_major() else {
        eprintln!("not applicable before PostgreSQL 17");
        return;
    };
    let (_tmp, repo) = local_repo(Default::default());
    // wal_log_hints: hint bits are WAL-logged, so the check compares pages
    // (without data checksums, which would make the full read refuse the
    // damaged pages).
    // 18 checksums data by default; 17 has no flag to say otherwise.
    let flags: &[&str] = if m >= 18 {
        &["--no-data-checksums"]
    } else {
        &[]
    };
    let src = PgCluster::initdb_with(m, flags);
    src.configure(&["summarize_wal = off", "wal_log_hints = on"]);
    let src = src.started();
    src.psql(
        "postgres",
        "CREATE TABLE still AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 60000) g",
    );
    src.psql("postgres", "VACUUM FREEZE still");
    src.psql("postgres", "CHECKPOINT");
    add_pg_deployment(&repo, "tamper", &src);
    backup(&repo, "tamper").expect("first backup");
    let (m0, events) = backup(&repo, "tamper").expect("summaries off");
    assert!(m0.source["incremental_from"].is_null());
    let why = event_body(&events, "backup_incremental_fallback");
    let off = why["reason"]
        .as_str()
        .is_some_and(|r| r.contains("summarize_wal"));
    assert!(off, "{why}");

    src.psql("postgres", "ALTER SYSTEM SET summarize_wal = on");
    src.psql("postgres", "SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (m1, _) = crate::backup_opts(&repo, "tamper", true).expect("full, summaries on");
    let rel = src.psql("postgres", "SELECT pg_relation_filepath('still')");
    let file = src.data.join(rel.trim());
    let mut src = src;
    src.stop();
    let mut bytes = std::fs::read(&file).expect("relation file");
    for page in bytes.chunks_mut(8192) {
        page[8000] ^= 0x55;
    }
    std::fs::write(&file, &bytes).expect("tamper");
    let src = src.try_started().expect("restart");
    src.psql("postgres", "CREATE TABLE moved (x int)");
    let (m2, events) = crate::backup_opts(&repo, "tamper", false).expect("backup");
    let bad = event_body(&events, "backup_incremental_mismatch");
    assert_eq!(bad["code"], "backup.incremental_mismatch", "{bad}");
    assert!(
        m2.source["incremental_from"].is_null(),
        "taken again in full"
    );
    assert!(events
        .ops()
        .iter()
        .any(|o| o == "backup_incremental_fallback"));
    assert_ne!(m2.backup_id, m1.backup_id);
}

/// The major the incremental tests run on: the matrix's, from 17; 18 when
/// none is set (the suite's default 15 cannot); `None` for a matrix run of
/// an older major.
fn incremental_major() -> Option<u32> {
    let m = pg_hardstorage_testkit::pg::default_major();
    match std::env::var_os("PHS_PG_MAJOR") {
        _ if m >= 17 => Some(m),
        Some(_) => None,
        None => Some(18),
    }
}

/// A cluster with `data_checksums` and one damaged page (changed on disk
/// while the server was down): the backup completes, with exactly one
/// `page_checksum_failed` naming the file and block, recorded in the
/// backup (the database's damage, stored as read, not ours to refuse).
#[test]
fn a_damaged_page_is_reported_and_the_backup_completes() {
    let (_tmp, repo) = local_repo(Default::default());
    let src = PgCluster::initdb_with(
        pg_hardstorage_testkit::pg::default_major(),
        &["--data-checksums"],
    );
    let src = src.started();
    src.psql(
        "postgres",
        "CREATE TABLE t AS SELECT g, repeat('y', 100) AS pad FROM generate_series(1, 5000) g",
    );
    src.psql("postgres", "CHECKPOINT");
    let rel = src.psql("postgres", "SELECT pg_relation_filepath('t')");
    let rel = rel.trim().to_string();
    let file = src.data.join(&rel);
    let mut src = src;
    src.stop();
    let mut bytes = std::fs::read(&file).expect("relation file");
    bytes[3 * 8192 + 8000] ^= 0x5a;
    std::fs::write(&file, &bytes).expect("damage");
    let src = src.try_started().expect("restart");
    add_pg_deployment(&repo, "bad", &src);
    let (m, events) = backup(&repo, "bad").expect("the backup completes");
    let bad: Vec<_> = events
        .events()
        .into_iter()
        .filter(|e| e.op == "page_checksum_failed")
        .filter_map(|e| e.body)
        .collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(
        (bad[0]["path"].as_str(), bad[0]["block"].as_u64()),
        (Some(rel.as_str()), Some(3))
    );
    let recorded = &m.source["page_checksum_failures"];
    assert_eq!(recorded["count"], 1, "{recorded}");
    assert_eq!(recorded["pages"][0]["path"], rel.as_str());
    // doctor says so (and is unhealthy for it).
    let e = pg_hardstorage_repo::doctor::doctor(&repo, Some("bad"), None, &Default::default())
        .expect_err("unhealthy");
    let findings = e.subject["report"]["findings"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let found = findings
        .iter()
        .find(|f| f["code"] == "doctor.page_checksum_failures");
    assert!(
        found.is_some_and(|f| f["subject"]["count"] == 1),
        "{findings:?}"
    );
}

/// The cross-check needs the right to read server files; a replication
/// role without it still gets its incremental backup, with a warning that
/// the sample was not compared.
#[test]
fn an_incremental_backup_by_a_role_that_may_not_read_files_says_it_was_unchecked() {
    let Some(m) = incremental_major() else {
        eprintln!("not applicable before PostgreSQL 17");
        return;
    };
    let (_tmp, repo) = local_repo(Default::default());
    let src = PgCluster::initdb_with(m, &["--data-checksums"]);
    src.configure(&["summarize_wal = on"]);
    let src = src.started();
    src.psql("postgres", "CREATE ROLE rep REPLICATION LOGIN");
    src.psql(
        "postgres",
        "CREATE TABLE t AS SELECT generate_series(1, 20000) g",
    );
    let conninfo = src.conninfo().replace("user=postgres", "user=rep");
    add_pg_deployment_at(&repo, "rep", conninfo);
    let (m1, _) = backup(&repo, "rep").expect("first");
    src.psql("postgres", "UPDATE t SET g = g + 1 WHERE g % 100 = 0");
    let (m2, events) = backup(&repo, "rep").expect("incremental");
    assert_eq!(
        m2.source["incremental_from"],
        m1.backup_id,
        "{:?}",
        events.ops()
    );
    let why = event_body(&events, "backup_incremental_unchecked");
    let reason = why["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("cannot be read back"), "{why}");
}

/// `restore --standby --primary-conninfo …`: the restored cluster starts
/// as a streaming standby of the primary and follows it (a row written on
/// the primary after the backup arrives); a recovery target with
/// `--standby` is refused before anything is written.
#[test]
fn a_backup_restores_as_a_standby_that_follows_the_primary() {
    use pg_hardstorage_repo::restore::{restore, RestoreOptions, Standby};
    let (tmp, repo) = local_repo(Default::default());
    let primary = PgCluster::start();
    primary.configure(&["wal_keep_size = '1GB'"]);
    primary.psql("postgres", "SELECT pg_reload_conf()");
    primary.psql("postgres", "CREATE TABLE t AS SELECT 1 AS v");
    add_pg_deployment(&repo, "p", &primary);
    let (m, _) = backup(&repo, "p").expect("backup");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let target = tmp.path().join("replica");
    let opts = RestoreOptions {
        target: target.clone(),
        force: false,
        threads: 2,
        recovery: None,
        verify: Default::default(),
        tablespace_mapping: Vec::new(),
        delta: false,
        pg_bindirs: Vec::new(),
        standby: Some(Standby {
            primary_conninfo: Some(format!(
                "host={} port={} user=postgres",
                primary.sock.display(),
                primary.port
            )),
        }),
    };
    let bus = pg_hardstorage_engine::event::EventBus::new();
    restore(&repo, &m, &opts, &bus).expect("standby restore");
    assert!(target.join("standby.signal").exists());
    let replica = PgCluster::on_existing(&target).started();
    primary.psql("postgres", "INSERT INTO t VALUES (2)");
    replica.catch_up(&primary);
    let in_recovery = replica.psql("postgres", "SELECT pg_is_in_recovery()");
    assert_eq!(in_recovery.trim(), "t");
    let rows = replica.psql(
        "postgres",
        "SELECT string_agg(v::text, ',' ORDER BY v) FROM t",
    );
    assert_eq!(rows.trim(), "1,2", "the standby follows the primary");
    let both = RestoreOptions {
        target: tmp.path().join("both"),
        recovery: Some(pg_hardstorage_repo::restore::Recovery {
            restore_command: None,
            target: pg_hardstorage_repo::restore::RecoveryTarget::Latest,
            staged: Vec::new(),
            prefetch: 0,
        }),
        ..opts
    };
    let e = pg_hardstorage_repo::restore::check(&m, &both).expect_err("refused");
    assert_eq!(e.code, "usage.invalid_argument", "{e}");
    assert!(!tmp.path().join("both").exists(), "nothing written");
}

/// An incremental backup across a promotion (the upstream risk of a
/// standby promoted at a WAL-summary boundary): the deployment names the
/// primary and its standby (`target_session_attrs=read-write`), both
/// summarize WAL; after a first backup on the primary, the primary stops,
/// the standby is promoted and written to, and the next backup — on the new
/// primary, timeline 2 — is incremental against the first and restores to
/// the new primary's tables.
#[test]
fn an_incremental_backup_follows_a_promotion() {
    let Some(m) = incremental_major() else {
        eprintln!("not applicable before PostgreSQL 17");
        return;
    };
    let (tmp, repo) = local_repo(Default::default());
    let primary = PgCluster::initdb_with(m, &["--data-checksums"]);
    primary.configure(&["summarize_wal = on"]);
    let mut primary = primary.started();
    primary.run("pgbench", &["-i", "-s", "5", "-q", "postgres"]);
    let standby = primary.standby().started();
    standby.catch_up(&primary);
    let conninfo = PgCluster::read_write_conninfo(&[&primary, &standby]);
    add_pg_deployment_at(&repo, "ha", conninfo);
    let (m1, _) = backup(&repo, "ha").expect("first, on the primary");
    primary.run("pgbench", &["-c", "2", "-j", "2", "-t", "200", "postgres"]);
    standby.catch_up(&primary);
    primary.stop();
    standby.promote();
    standby.run("pgbench", &["-c", "2", "-j", "2", "-t", "200", "postgres"]);
    let before = checksums(&standby);
    let (m2, events) = backup(&repo, "ha").expect("second, on the new primary");
    assert_eq!(m2.source["timeline"], 2, "{}", m2.source);
    assert_eq!(
        m2.source["incremental_from"],
        m1.backup_id,
        "{:?}",
        events.ops()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let target = tmp.path().join("restored");
    restore_to(&repo, &m2, &target).expect("restore");
    let restored = PgCluster::on_existing_major(&target, m).started();
    assert_eq!(checksums(&restored), before, "restored tables differ");
    restored.amcheck();
}

/// The server's summaries do not cover the range since the previous backup
/// (summarization was off while the WAL in between was recycled): the
/// server refuses the incremental (SQLSTATE 55000), and the backup is taken
/// in full after a `backup_incremental_fallback` saying so.
#[test]
fn an_incremental_backup_without_summaries_for_the_range_is_taken_in_full() {
    let Some(m) = incremental_major() else {
        eprintln!("not applicable before PostgreSQL 17");
        return;
    };
    let (_tmp, repo) = local_repo(Default::default());
    let src = PgCluster::initdb_major(m);
    src.configure(&["summarize_wal = on"]);
    let mut src = src.started();
    src.psql("postgres", "CREATE TABLE t (v text)");
    add_pg_deployment(&repo, "gap", &src);
    backup(&repo, "gap").expect("first");
    // WAL recycled quickly only while nothing summarizes it (not during
    // a backup, whose own WAL must stay until it is sent).
    src.configure(&[
        "summarize_wal = off",
        "max_wal_size = '32MB'",
        "min_wal_size = '32MB'",
    ]);
    src.stop();
    let mut src = src.try_started().expect("restart without summaries");
    for _ in 0..6 {
        src.psql(
            "postgres",
            "INSERT INTO t SELECT repeat('z', 500) FROM generate_series(1, 20000)",
        );
        src.psql("postgres", "SELECT pg_switch_wal()");
        src.psql("postgres", "CHECKPOINT");
    }
    src.configure(&[
        "summarize_wal = on",
        "max_wal_size = '1GB'",
        "min_wal_size = '80MB'",
    ]);
    src.stop();
    let src = src.try_started().expect("restart with summaries");
    let (m2, events) = backup(&repo, "gap").expect("taken in full");
    assert!(m2.source["incremental_from"].is_null(), "{}", m2.source);
    let why = event_body(&events, "backup_incremental_fallback");
    let said = why["reason"].as_str().unwrap_or_default();
    assert!(said.contains("WAL summaries"), "{why}");
    drop(src);
}

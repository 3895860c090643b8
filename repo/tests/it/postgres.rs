//! Real PostgreSQL 15: a base backup over the replication protocol, restored
//! into a new directory, checked by pg_verifybackup, started, compared table
//! by table, and checked by pg_amcheck.

use crate::{backup, restore_to};
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_testkit::local_repo;
use pg_hardstorage_testkit::pg::{as_postgres, PgCluster};

const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_branches",
    "pgbench_tellers",
    "pgbench_history",
];

fn checksums(pg: &PgCluster) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| pg.psql("postgres", &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') FROM {t} x")))
        .collect()
}

#[test]
fn pgbench_base_backup_restores_verifies_and_starts() {
    let src = PgCluster::start();
    src.run("pgbench", &["-i", "-s", "10", "-q", "postgres"]);
    src.psql(
        "postgres",
        "UPDATE pgbench_accounts SET abalance = aid % 97 WHERE aid % 13 = 0",
    );
    let before = checksums(&src);

    let (tmp, repo) = local_repo(Default::default());
    deployment::create(
        &repo,
        Deployment {
            name: "pg1".into(),
            kind: Kind::Postgres,
            path: None,
            pg: Some(src.conninfo()),
            pgdata: None,
            created_at: String::new(),
        },
    )
    .expect("deployment");
    let (m, events) = backup(&repo, "pg1").expect("base backup");
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
        m.stats.bytes_logical > 100 << 20,
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

    let target = tmp.path().join("restored");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    restore_to(&repo, &m, &target).expect("restore");
    let v = as_postgres("pg_verifybackup", &[target.to_str().expect("utf8")]);
    assert!(
        v.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    let restored = PgCluster::on_existing(&target).started();
    assert_eq!(
        checksums(&restored),
        before,
        "restored tables differ from the source at backup time"
    );
    restored.run(
        "pg_amcheck",
        &["--all", "--install-missing", "--heapallindexed"],
    );
}

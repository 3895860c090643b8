//! Point-in-time recovery against a real PostgreSQL 15: a base backup, WAL
//! streamed by `wal stream` into an encrypted repository, and restores to a
//! time, an LSN and a named restore point, recovered through `wal fetch` as
//! restore_command.

use crate::Env;
use pg_hardstorage_testkit::pg::{give_to_postgres, PgCluster};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SEG: u64 = 16 << 20;

fn lsn(s: &str) -> u64 {
    let (a, b) = s.trim().split_once('/').expect("lsn");
    (u64::from_str_radix(a, 16).expect("hex") << 32) | u64::from_str_radix(b, 16).expect("hex")
}

struct Streamer(Child);

impl Drop for Streamer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_promoted(pg: &PgCluster) {
    let t = Instant::now();
    while pg.psql("postgres", "SELECT pg_is_in_recovery()").trim() != "f" {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "restored server did not finish recovery"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn pitr_to_time_lsn_and_restore_point() {
    let env = Env::new();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let key = env.path("repo.key");
    std::fs::write(&key, "5a".repeat(32)).expect("key");
    give_to_postgres(&key);
    let k = key.to_str().expect("utf8");
    env.ok(&["repo", "init", "--key-file", k]);

    let src = PgCluster::start();
    src.psql("postgres", "CREATE TABLE t (v text)");
    env.ok(&[
        "deployment",
        "create",
        "pg",
        "--pg",
        &src.conninfo(),
        "--key-file",
        k,
    ]);
    env.ok(&["backup", "run", "pg", "--key-file", k]);

    let _streamer = Streamer(
        env.cmd(&["wal", "stream", "pg", "--key-file", k, "-o", "ndjson"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wal stream"),
    );
    std::thread::sleep(Duration::from_millis(500));
    src.psql("postgres", "INSERT INTO t VALUES ('A')");
    let at_lsn = src.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    src.psql("postgres", "SELECT pg_create_restore_point('before_b')");
    let t = src.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1100));
    src.psql("postgres", "INSERT INTO t VALUES ('B')");
    let b_lsn = lsn(&src.psql("postgres", "SELECT pg_current_wal_insert_lsn()"));
    src.psql("postgres", "SELECT pg_switch_wal()");
    let want = format!(
        "{:08X}{:08X}{:08X}",
        1,
        (b_lsn / SEG) / 256,
        (b_lsn / SEG) % 256
    );
    let start = Instant::now();
    loop {
        let l = env.ok(&["wal", "list", "pg", "--key-file", k]);
        if l["segments"]
            .as_array()
            .expect("segments")
            .iter()
            .any(|s| s.as_str() == Some(&want))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "segment {want} never archived: {l}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    for (n, flag, value) in [
        (0, "--to", t.trim().to_string()),
        (1, "--to-lsn", at_lsn.trim().to_string()),
        (2, "--to-name", "before_b".to_string()),
    ] {
        let target = env.path(&format!("pitr{n}"));
        let r = env.ok(&[
            "restore",
            "pg",
            "--backup",
            "latest",
            "--target",
            target.to_str().expect("utf8"),
            flag,
            &value,
            "--key-file",
            k,
        ]);
        assert!(r["files"].as_u64().expect("files") > 100, "{r}");
        let restored = PgCluster::on_existing(&target).started();
        wait_promoted(&restored);
        assert_eq!(
            restored
                .psql("postgres", "SELECT string_agg(v, ',' ORDER BY v) FROM t")
                .trim(),
            "A",
            "{flag} {value}: row A present, row B absent"
        );
    }
}

/// restore_command semantics: a segment that is not archived exits 1; a
/// damaged one exits above 125 so recovery stops instead of promoting.
#[test]
fn wal_fetch_exit_codes() {
    let env = Env::new();
    env.ok(&["repo", "init"]);
    let src = env.path("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    env.ok(&[
        "deployment",
        "create",
        "w",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    let dest = env.path("seg");
    let o = env.run(&[
        "wal",
        "fetch",
        "w",
        "000000010000000000000042",
        dest.to_str().expect("utf8"),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = env.run(&[
        "wal",
        "fetch",
        "w",
        "00000002.history",
        dest.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(1));
    // Any other failure (here: the repository cannot be opened) is > 125.
    let o = env
        .cmd(&[
            "wal",
            "fetch",
            "w",
            "000000010000000000000042",
            dest.to_str().expect("utf8"),
        ])
        .env("PG_HARDSTORAGE_PASSPHRASE", "wrong")
        .output()
        .expect("run");
    assert!(o.status.code().is_some_and(|c| c > 125), "{:?}", o.status);
    assert!(!dest.exists());
}

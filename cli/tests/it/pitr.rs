//! Point-in-time recovery against a real PostgreSQL 15: a base backup, WAL
//! streamed by `wal stream` into an encrypted repository, and restores to a
//! time, an LSN and a named restore point, recovered through `wal fetch` as
//! restore_command.

use crate::Env;
use pg_hardstorage_testkit::pg::{give_to_postgres, share_with_postgres_group, PgCluster};
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

/// The server's clock now, in UTC, as `--to` takes it.
fn now_utc(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
}

/// The rows of the test table, sorted and joined.
fn rows(pg: &PgCluster) -> String {
    pg.psql("postgres", "SELECT string_agg(v, ',' ORDER BY v) FROM t")
        .trim()
        .to_string()
}

#[test]
fn pitr_to_time_lsn_and_restore_point() {
    let setup = Setup::new();
    let (env, src, k) = (&setup.env, &setup.src, setup.key.as_str());
    let _streamer = setup.streamer();
    std::thread::sleep(Duration::from_millis(500));
    src.psql("postgres", "INSERT INTO t VALUES ('A')");
    let at_lsn = src.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    src.psql("postgres", "SELECT pg_create_restore_point('before_b')");
    let t = now_utc(src);
    std::thread::sleep(Duration::from_millis(1100));
    src.psql("postgres", "INSERT INTO t VALUES ('B')");
    setup.archive_now();
    // A newer backup (after B): `latest` must still pick the one that can
    // reach each target (the time and LSN targets lie before it).
    let first = env.ok(&["backup", "list", "pg", "--key-file", k])[0]["backup_id"]
        .as_str()
        .expect("first backup")
        .to_string();
    std::thread::sleep(Duration::from_millis(1100));
    env.ok(&["backup", "run", "pg", "--key-file", k]);

    let mut last = None;
    for (n, flag, value) in [
        (0, "--to", t.trim().to_string()),
        (1, "--to-lsn", at_lsn.trim().to_string()),
        (2, "--to-name", "before_b".to_string()),
    ] {
        let target = env.path(&format!("pitr{n}"));
        // A restore point's position is unknown before replay: name the backup.
        let backup = if flag == "--to-name" {
            first.as_str()
        } else {
            "latest"
        };
        let r = env.ok(&[
            "restore",
            "pg",
            "--backup",
            backup,
            "--target",
            target.to_str().expect("utf8"),
            flag,
            &value,
            "--key-file",
            k,
        ]);
        assert!(r["files"].as_u64().expect("files") > 100, "{r}");
        // PostgreSQL's own check ran wherever a tool for the major exists.
        let want = match pg_hardstorage_testkit::pg::verifybackup_available() {
            true => "passed",
            false => "unavailable",
        };
        assert_eq!(r["pg_verifybackup"], want, "{r}");
        let restored = PgCluster::on_existing(&target).started();
        wait_promoted(&restored);
        assert_eq!(
            rows(&restored),
            "A",
            "{flag} {value}: row A present, row B absent"
        );
        last = Some(restored);
    }

    // The promoted restore runs on timeline 2: streaming from it archives
    // its history file, which recovery through it will ask for.
    let promoted = last.expect("a restored cluster");
    env.ok(&[
        "deployment",
        "create",
        "pg2",
        "--pg",
        &promoted.conninfo(),
        "--key-file",
        k,
    ]);
    let _s2 = Streamer(
        env.cmd(&["wal", "stream", "pg2", "--key-file", k, "-o", "ndjson"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wal stream pg2"),
    );
    let start = Instant::now();
    loop {
        let l = env.ok(&["wal", "list", "pg2", "--key-file", k]);
        if l["history_files"]
            .as_array()
            .is_some_and(|h| h.iter().any(|f| f == "00000002.history"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "history file never archived: {l}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dest = env.path("history");
    env.ok(&[
        "wal",
        "fetch",
        "pg2",
        "00000002.history",
        dest.to_str().expect("utf8"),
        "--key-file",
        k,
    ]);
    assert_eq!(
        std::fs::read(&dest).expect("fetched"),
        std::fs::read(promoted.data.join("pg_wal/00000002.history")).expect("server's")
    );
}

/// The key only in the restoring process's environment, nothing
/// PostgreSQL's user could read: the restore stages the WAL recovery needs
/// into the target, and recovery lands between the two commits without
/// touching the repository (restore_command has no fallback to it).
#[test]
fn pitr_with_the_passphrase_only_in_the_environment_replays_staged_wal() {
    let s = Setup::passphrase_only();
    let _streamer = s.streamer();
    std::thread::sleep(Duration::from_millis(500));
    s.src.psql("postgres", "INSERT INTO t VALUES ('A')");
    let t = now_utc(&s.src);
    std::thread::sleep(Duration::from_millis(1100));
    s.src.psql("postgres", "INSERT INTO t VALUES ('B')");
    s.archive_now();
    let (code, v) = s.restore("staged", &["--to", t.trim()]);
    assert_eq!(code, 0, "{v}");
    let target = s.env.path("staged");
    let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).expect("conf");
    assert!(
        conf.contains("else exit 1; fi") && !conf.contains("wal fetch"),
        "no key material, so no fallback to the repository: {conf}"
    );
    let spool = target.join("pg_hardstorage_wal");
    let staged = std::fs::read_dir(&spool).expect("spool").count();
    assert!(staged > 0, "WAL staged");
    let restored = PgCluster::on_existing(&target).started();
    wait_promoted(&restored);
    assert_eq!(rows(&restored), "A", "row A present, row B absent");
    let left = std::fs::read_dir(&spool).expect("spool").count();
    assert!(
        left < staged,
        "recovery took its WAL from the spool ({left} of {staged} left)"
    );
}

/// A long recovery: the restore stages only a window of segments, and
/// restore_command (`wal fetch --spool --prefetch`) fetches the rest and
/// keeps the spool filled ahead of replay in the background.
#[test]
fn pitr_past_a_bounded_staged_window_prefetches_the_rest() {
    let s = Setup::new();
    let _streamer = s.streamer();
    std::thread::sleep(Duration::from_millis(500));
    s.src.psql("postgres", "INSERT INTO t VALUES ('A')");
    let mut listing = serde_json::Value::Null;
    for _ in 0..4 {
        listing = s.archive_now();
    }
    let t = now_utc(&s.src);
    std::thread::sleep(Duration::from_millis(1100));
    s.src.psql("postgres", "INSERT INTO t VALUES ('B')");
    s.archive_now();

    // The fill on its own: after delivering one segment, the next two
    // arrive in the spool, whole and equal to what `wal fetch` returns.
    let segs: Vec<String> = listing["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    assert!(segs.len() >= 4, "{listing}");
    let (first, next) = (&segs[segs.len() - 3], &segs[segs.len() - 2..]);
    let spool = s.env.path("spool");
    std::fs::create_dir_all(&spool).expect("mkdir");
    let dest = s.env.path("delivered");
    let (sp, d) = (spool.to_str().expect("utf8"), dest.to_str().expect("utf8"));
    s.env.ok(&s.args(&[
        "wal",
        "fetch",
        "pg",
        first,
        d,
        "--spool",
        sp,
        "--prefetch",
        "2",
    ]));
    let start = Instant::now();
    while !next.iter().all(|n| spool.join(n).exists()) || spool.join(".filling").exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the fill never finished"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in next {
        let direct = s.env.path(&format!("direct-{n}"));
        s.env
            .ok(&s.args(&["wal", "fetch", "pg", n, direct.to_str().expect("utf8")]));
        let same = std::fs::read(spool.join(n)).expect("prefetched")
            == std::fs::read(&direct).expect("fetched");
        assert!(same, "{n}: the prefetched segment differs");
    }

    // The whole recovery, staging one segment and fetching the rest.
    let (code, v) = s.restore("window", &["--to", t.trim(), "--wal-prefetch", "1"]);
    assert_eq!(code, 0, "{v}");
    let target = s.env.path("window");
    let conf = std::fs::read_to_string(target.join("postgresql.auto.conf")).expect("conf");
    assert!(
        conf.contains("wal fetch") && conf.contains("--prefetch 1"),
        "{conf}"
    );
    let staged: Vec<_> = std::fs::read_dir(target.join("pg_hardstorage_wal"))
        .expect("spool")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(staged.len(), 1, "one segment staged: {staged:?}");
    let restored = PgCluster::on_existing(&target).started();
    wait_promoted(&restored);
    assert_eq!(rows(&restored), "A", "row A present, row B absent");
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

struct Setup {
    env: Env,
    key: String,
    src: PgCluster,
    /// `--key-file KEY`, or nothing where the key is only the
    /// environment's passphrase (`Setup::passphrase_only`).
    kargs: Vec<String>,
}

impl Setup {
    fn new() -> Setup {
        Self::build(true)
    }

    /// The repository keyed by `PG_HARDSTORAGE_PASSPHRASE` alone: nothing
    /// PostgreSQL's user could read.
    fn passphrase_only() -> Setup {
        Self::build(false)
    }

    fn args<'a>(&'a self, head: &[&'a str]) -> Vec<&'a str> {
        let mut v = head.to_vec();
        v.extend(self.kargs.iter().map(String::as_str));
        v
    }

    fn build(with_key: bool) -> Setup {
        let env = Env::new();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        let key = env.path("repo.key");
        std::fs::write(&key, "3c".repeat(32)).expect("key");
        give_to_postgres(&key);
        let key = key.to_str().expect("utf8").to_string();
        let kargs = if with_key {
            vec!["--key-file".to_string(), key.clone()]
        } else {
            Vec::new()
        };
        let src = PgCluster::start();
        let s = Setup {
            env,
            key,
            src,
            kargs,
        };
        s.env.ok(&s.args(&["repo", "init"]));
        // restore_command runs as postgres: the repository's group.
        share_with_postgres_group(&s.env.repo());
        s.src.psql("postgres", "CREATE TABLE t (v text)");
        let conninfo = s.src.conninfo();
        s.env
            .ok(&s.args(&["deployment", "create", "pg", "--pg", &conninfo]));
        s.env.ok(&s.args(&["backup", "run", "pg"]));
        s
    }

    fn streamer(&self) -> Streamer {
        Streamer(
            self.env
                .cmd(&self.args(&["wal", "stream", "pg", "-o", "ndjson"]))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("wal stream"),
        )
    }

    /// Switches WAL and waits until the segment holding the current insert
    /// position is archived; returns the archive listing.
    fn archive_now(&self) -> serde_json::Value {
        // A WAL record (touching no table), so the switch below always
        // completes a segment.
        self.src.psql(
            "postgres",
            "SELECT pg_logical_emit_message(false, 'phs', 'tick')",
        );
        let at = lsn(&self
            .src
            .psql("postgres", "SELECT pg_current_wal_insert_lsn()"));
        self.src.psql("postgres", "SELECT pg_switch_wal()");
        let want = format!("{:08X}{:08X}{:08X}", 1, (at / SEG) / 256, (at / SEG) % 256);
        let start = Instant::now();
        loop {
            let l = self.env.ok(&self.args(&["wal", "list", "pg"]));
            if l["segments"]
                .as_array()
                .expect("segments")
                .iter()
                .any(|s| s.as_str() == Some(&want))
            {
                return l;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "segment {want} never archived: {l}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn restore(&self, target: &str, extra: &[&str]) -> (i32, serde_json::Value) {
        let t = self.env.path(target);
        let mut args = vec![
            "restore",
            "pg",
            "--backup",
            "latest",
            "--target",
            t.to_str().expect("utf8"),
        ];
        args.extend(self.kargs.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.env.json(&args)
    }
}

/// kill -9 of the streamer mid-segment, then a restart: no gap, no
/// duplicate, and a restore to the end of the archive sees every row.
#[test]
fn streamer_crash_loses_nothing() {
    let s = Setup::new();
    let mut first = s.streamer();
    for i in 0..200 {
        s.src.psql(
            "postgres",
            &format!("INSERT INTO t SELECT 'r{i}-' || g FROM generate_series(1, 50) g"),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = first.0.kill();
    let _ = first.0.wait();
    for i in 200..300 {
        s.src.psql(
            "postgres",
            &format!("INSERT INTO t SELECT 'r{i}-' || g FROM generate_series(1, 50) g"),
        );
    }
    let _second = s.streamer();
    let listing = s.archive_now();
    assert_eq!(
        listing["gaps"].as_array().map(Vec::len),
        Some(0),
        "{listing}"
    );
    let segs: Vec<&str> = listing["segments"]
        .as_array()
        .expect("segs")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let mut dedup = segs.clone();
    dedup.dedup();
    assert_eq!(segs, dedup, "duplicate segments");
    let (code, v) = s.restore("all", &[]);
    assert_eq!(code, 0, "{v}");
    let restored = PgCluster::on_existing(&s.env.path("all")).started();
    wait_promoted(&restored);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*) FROM t").trim(),
        "15000"
    );
}

/// Each pre-flight refusal exits 4 with its code; a deleted segment stops
/// recovery instead of letting PostgreSQL promote a cluster missing WAL.
#[test]
fn refusals_and_missing_wal() {
    let s = Setup::new();
    let _streamer = s.streamer();
    s.src.psql("postgres", "INSERT INTO t VALUES ('A')");
    std::thread::sleep(Duration::from_millis(1100));
    s.src.psql("postgres", "INSERT INTO t VALUES ('B')");
    let after_b = now_utc(&s.src);
    let listing = s.archive_now();

    for (target, args, code) in [
        (
            "early",
            vec!["--to", "2000-01-01T00:00:00Z"],
            "restore.target_outside_archive",
        ),
        (
            "late",
            vec!["--to", "2999-01-01T00:00:00Z"],
            "restore.target_outside_archive",
        ),
        ("far", vec!["--to-lsn", "FF/0"], "restore.wal_missing"),
        (
            "badtime",
            vec!["--to", "yesterday-ish"],
            "usage.invalid_time",
        ),
    ] {
        let (exit, v) = s.restore(target, &args);
        assert_eq!(v["error"]["code"], code, "{args:?}: {v}");
        let want = if code.starts_with("usage.") { 2 } else { 4 };
        assert_eq!(exit, want, "{args:?}: {v}");
    }
    // The data directory of another cluster.
    let mut other = PgCluster::start();
    other.stop();
    let (exit, v) = s.env.json(&[
        "restore",
        "pg",
        "--backup",
        "latest",
        "--target",
        other.data.to_str().expect("utf8"),
        "--key-file",
        &s.key,
    ]);
    assert_eq!(
        (exit, v["error"]["code"].as_str()),
        (4, Some("restore.foreign_system")),
        "{v}"
    );

    // Archive one more segment after B, then delete the one holding B.
    s.src.psql("postgres", "INSERT INTO t VALUES ('C')");
    let listing2 = s.archive_now();
    assert_ne!(listing2["last"], listing["last"]);
    let holding_b = listing["last"].as_str().expect("last");
    std::fs::remove_file(s.env.repo().join("wal/pg").join(holding_b)).expect("delete segment");
    // The pre-flight sees the hole...
    let (exit, v) = s.restore("missing", &["--to", after_b.trim()]);
    assert_eq!(
        (exit, v["error"]["code"].as_str()),
        (4, Some("restore.wal_missing")),
        "{v}"
    );
    let (exit, v) = s.restore("missing-latest", &[]);
    assert_eq!(
        (exit, v["error"]["code"].as_str()),
        (4, Some("restore.wal_missing")),
        "{v}"
    );
    // ...and forced past it, PostgreSQL stops instead of promoting.
    let (exit, v) = s.restore("missing", &["--to", after_b.trim(), "--force"]);
    assert_eq!(exit, 0, "{v}");
    // It may come up in recovery for a moment; it must never promote, and
    // PostgreSQL stops when recovery ends before the target.
    const STOPPED: &str = "recovery ended before configured recovery target was reached";
    match PgCluster::on_existing(&s.env.path("missing")).try_started() {
        Ok(pg) => {
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                match pg.try_psql("postgres", "SELECT pg_is_in_recovery()") {
                    Ok(r) => assert_eq!(r.trim(), "t", "a cluster missing WAL must not promote"),
                    Err(_) => {
                        assert!(pg.log().contains(STOPPED), "{}", pg.log());
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Err(log) => assert!(log.contains(STOPPED), "{log}"),
    }
}

/// A deployment is bound to the cluster it first saw: pointed at another
/// one (same address, new cluster), backups and streaming refuse, exit 4.
/// The pre-flight also warns when a lagging slot could fill the primary.
#[test]
fn deployment_is_bound_to_its_cluster() {
    let s = Setup::new();
    let o = s
        .env
        .cmd(&["backup", "run", "pg", "--key-file", &s.key, "-o", "ndjson"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.lines().any(|l| l.contains("\"pg_preflight_warning\"") && l.contains("max_slot_wal_keep_size")),
        "{text}"
    );
    let other = PgCluster::start();
    let shown = s.env.ok(&[
        "deployment",
        "update",
        "pg",
        "--pg",
        &other.conninfo(),
        "--key-file",
        &s.key,
    ]);
    assert!(
        shown["pg"]
            .as_str()
            .is_some_and(|p| p.contains(&other.port.to_string())),
        "{shown}"
    );
    let (code, v) = s.env.json(&["backup", "run", "pg", "--key-file", &s.key]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (4, Some("pg.system_mismatch")),
        "{v}"
    );
    let o = s
        .env
        .cmd(&["wal", "stream", "pg", "--key-file", &s.key, "-o", "json"])
        .output()
        .expect("stream");
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// PostgreSQL invalidates a slot that falls too far behind: the streamer
/// says so (error events), recreates the slot, keeps archiving, the hole
/// shows in `wal list`, and restores across it are refused.
#[test]
fn invalidated_slot_is_recreated_and_the_gap_refused() {
    let s = Setup::new();
    s.src.psql(
        "postgres",
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
    );
    s.src.psql("postgres", "SELECT pg_reload_conf()");
    {
        let _first = s.streamer();
        std::thread::sleep(Duration::from_millis(500));
        s.src.psql("postgres", "INSERT INTO t VALUES ('before')");
        s.archive_now();
    }
    // Far more WAL than the slot may hold, while nobody streams.
    let mut lost = false;
    for _ in 0..6 {
        s.src.psql(
            "postgres",
            "INSERT INTO t SELECT repeat('x', 2000) FROM generate_series(1, 20000)",
        );
        s.src.psql("postgres", "SELECT pg_switch_wal()");
        s.src.psql("postgres", "CHECKPOINT");
        let status = s.src.psql(
            "postgres",
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pg_hardstorage_pg'",
        );
        if status.trim() == "lost" {
            lost = true;
            break;
        }
    }
    assert!(lost, "PostgreSQL did not invalidate the slot");
    let events = s.env.path("stream.ndjson");
    let _second = Streamer(
        s.env
            .cmd(&["wal", "stream", "pg", "--key-file", &s.key, "-o", "ndjson"])
            .stdout(std::fs::File::create(&events).expect("events file"))
            .stderr(Stdio::null())
            .spawn()
            .expect("wal stream"),
    );
    s.src.psql("postgres", "INSERT INTO t VALUES ('after')");
    let listing = s.archive_now();
    assert!(
        !listing["gaps"].as_array().expect("gaps").is_empty(),
        "{listing}"
    );
    let text = std::fs::read_to_string(&events).expect("events");
    assert!(text.contains("\"wal_slot_invalidated\""), "{text}");
    assert!(text.contains("\"wal_gap\""), "{text}");
    let (code, v) = s.restore("across", &[]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (4, Some("restore.wal_missing")),
        "{v}"
    );
}

/// The repository goes away while WAL keeps coming: the streamer retries
/// with backoff (events say so) and archives everything, without a gap,
/// once it is back.
#[test]
fn streamer_rides_out_a_repository_outage() {
    let s = Setup::new();
    let flag = s.env.path("outage");
    let events = s.env.path("outage.ndjson");
    let _streamer = Streamer(
        s.env
            .cmd(&["wal", "stream", "pg", "--key-file", &s.key, "-o", "ndjson"])
            .env("PG_HARDSTORAGE_FAULT_OUTAGE_WHILE", &flag)
            .stdout(std::fs::File::create(&events).expect("events"))
            .stderr(Stdio::null())
            .spawn()
            .expect("wal stream"),
    );
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&flag, b"down").expect("outage on");
    s.src.psql(
        "postgres",
        "INSERT INTO t SELECT 'x' || g FROM generate_series(1, 1000) g",
    );
    s.src.psql("postgres", "SELECT pg_switch_wal()");
    let t = Instant::now();
    while !std::fs::read_to_string(&events)
        .unwrap_or_default()
        .contains("\"wal_stream_retry\"")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no retry event during the outage"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let flushed = s.src.psql(
        "postgres",
        "SELECT confirmed_flush_lsn IS NULL, restart_lsn FROM pg_replication_slots WHERE slot_name = 'pg_hardstorage_pg'",
    );
    std::fs::remove_file(&flag).expect("outage off");
    let listing = s.archive_now();
    assert_eq!(
        listing["gaps"].as_array().map(Vec::len),
        Some(0),
        "{listing}"
    );
    let _ = flushed;
}

/// SIGTERM stops `wal stream` promptly and cleanly (exit 0, a final
/// `wal_stream_stopped` event); archived WAL stays archived.
#[test]
fn wal_stream_stops_on_sigterm() {
    let s = Setup::new();
    let events = s.env.path("term.ndjson");
    let mut child = s
        .env
        .cmd(&["wal", "stream", "pg", "--key-file", &s.key, "-o", "ndjson"])
        .stdout(std::fs::File::create(&events).expect("events"))
        .stderr(Stdio::null())
        .spawn()
        .expect("wal stream");
    std::thread::sleep(Duration::from_millis(300));
    s.archive_now();
    // SAFETY: sending SIGTERM to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "wal stream ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&events).expect("events");
    assert!(text.contains("\"wal_stream_stopped\""), "{text}");
}

/// A role without REPLICATION cannot take base backups: a clear pre-flight
/// refusal (exit 4, `pg.replication_denied`) that says how to grant it.
#[test]
fn missing_replication_privilege_is_refused_clearly() {
    let s = Setup::new();
    s.src.psql("postgres", "CREATE ROLE norep LOGIN");
    let conninfo = s.src.conninfo().replace("user=postgres", "user=norep");
    s.env.ok(&[
        "deployment",
        "create",
        "np",
        "--pg",
        &conninfo,
        "--key-file",
        &s.key,
    ]);
    let (code, v) = s.env.json(&["backup", "run", "np", "--key-file", &s.key]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (4, Some("pg.replication_denied")),
        "{v}"
    );
    assert!(
        v["error"]["suggestion"]["human"]
            .as_str()
            .is_some_and(|h| h.contains("REPLICATION")),
        "{v}"
    );
}

/// `serve --wal-stream`: the server archives WAL while it runs, exports
/// the streamer's lag, and stops the streamer cleanly on SIGTERM.
#[test]
fn the_server_streams_wal_and_exports_its_lag() {
    use std::io::BufRead;
    let s = Setup::new();
    let mut child = s
        .env
        .cmd(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--wal-stream",
            "pg",
            "--key-file",
            &s.key,
            "-o",
            "ndjson",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    let addr = first["body"]["address"]
        .as_str()
        .expect("addr")
        .parse()
        .expect("addr");
    let tok = s.env.ok(&[
        "token",
        "create",
        "--name",
        "prom",
        "--verbs",
        "backup:read",
        "--key-file",
        &s.key,
    ]);
    let c = pg_hardstorage_testkit::http::Client::new(addr)
        .with_token(tok["token"].as_str().expect("token"));
    s.archive_now();
    let start = Instant::now();
    loop {
        let m = c.get("/metrics").text();
        if m.contains("pg_hardstorage_wal_lag_bytes{deployment=\"pg\"}") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no WAL lag exported:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("exit");
    assert!(status.success(), "{status:?}");
    assert!(lines
        .map_while(Result::ok)
        .any(|l| l.contains("server_stopped")));
}

/// `doctor`: a missing slot, a stale backup and a WAL gap are each
/// reported with their code (exit 4); a healthy deployment exits 0.
#[test]
fn doctor_reports_a_missing_slot_a_stale_backup_and_a_wal_gap() {
    let s = Setup::new();
    let doctor = |extra: &[&str]| {
        let mut a = vec!["doctor", "pg", "--key-file", &s.key];
        a.extend_from_slice(extra);
        s.env.json(&a)
    };
    let codes = |v: &serde_json::Value| -> Vec<String> {
        v["error"]["subject"]["report"]["findings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| f["code"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    // No streamer yet: no slot.
    let (code, v) = doctor(&[]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (4, Some("doctor.unhealthy")),
        "{v}"
    );
    assert_eq!(codes(&v), ["doctor.slot_missing"], "{v}");

    // Streaming: healthy.
    let streamer = s.streamer();
    for _ in 0..3 {
        s.archive_now();
    }
    let (code, v) = doctor(&[]);
    assert_eq!(code, 0, "{v}");
    let body = &v["result"]["body"];
    assert_eq!(body["healthy"], true);
    assert!(
        body["deployments"][0]["slot_lag_bytes"].as_u64().is_some(),
        "{v}"
    );
    assert!(
        body["deployments"][0]["server_version"].as_str().is_some(),
        "{v}"
    );

    // A stale backup by policy (ages are whole seconds: let one pass).
    std::thread::sleep(Duration::from_millis(1100));
    let (code, v) = doctor(&["--max-age", "0s"]);
    assert_eq!(code, 4);
    assert_eq!(codes(&v), ["doctor.backup_stale"], "{v}");

    // A hole in the archive.
    drop(streamer);
    let listed = s.env.ok(&["wal", "list", "pg", "--key-file", &s.key]);
    let segs: Vec<String> = listed["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect();
    assert!(segs.len() >= 3, "{listed}");
    std::fs::remove_file(s.env.repo().join("wal/pg").join(&segs[segs.len() / 2])).expect("delete");
    // And the slot gone.
    s.src.psql(
        "postgres",
        "SELECT pg_drop_replication_slot('pg_hardstorage_pg')",
    );
    let (code, v) = doctor(&[]);
    assert_eq!(code, 4, "{v}");
    let found = codes(&v);
    assert!(found.contains(&"doctor.wal_gap".to_string()), "{found:?}");
    assert!(
        found.contains(&"doctor.slot_missing".to_string()),
        "{found:?}"
    );
    let slot = v["error"]["subject"]["report"]["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .find(|f| f["code"] == "doctor.slot_missing")
        .cloned()
        .expect("slot finding");
    assert_eq!(
        slot["severity"], "error",
        "archived WAL makes a missing slot an error"
    );
    assert_eq!(slot["command"], "pg_hardstorage wal repair pg");
}

/// `wal stream pg` with key `k`, its events to `out`.
fn stream_wal(env: &Env, k: &str, out: impl Into<Stdio>) -> Streamer {
    Streamer(
        env.cmd(&["wal", "stream", "pg", "--key-file", k, "-o", "ndjson"])
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("wal stream"),
    )
}

/// An environment with a repository keyed by a key file PostgreSQL's user
/// can read (`hex` repeated), shared with postgres's group; the key's path.
fn keyed_env(hex: &str) -> (Env, String) {
    let env = Env::new();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.tmp.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
    }
    let key = env.path("repo.key");
    std::fs::write(&key, hex.repeat(32)).expect("key");
    give_to_postgres(&key);
    let key = key.to_str().expect("utf8").to_string();
    env.ok(&["repo", "init", "--key-file", &key]);
    share_with_postgres_group(&env.repo());
    (env, key)
}

/// Waits until `wal list` shows segment `name` and history file `history`
/// (if any); returns the listing.
fn wait_archived(env: &Env, k: &str, name: &str, history: Option<&str>) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let l = env.ok(&["wal", "list", "pg", "--key-file", k]);
        let has = |field: &str, n: &str| {
            l[field]
                .as_array()
                .is_some_and(|v| v.iter().any(|s| s.as_str() == Some(n)))
        };
        if has("segments", name) && history.is_none_or(|h| has("history_files", h)) {
            return l;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{name} {history:?} never archived: {l}\nthe streamer said: {}",
            std::fs::read_to_string(env.path("stream.ndjson")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A WAL record, a switch, and the name of the segment that held it.
fn switch_wal(pg: &PgCluster, timeline: u32) -> String {
    pg.psql(
        "postgres",
        "SELECT pg_logical_emit_message(false, 'phs', 'tick')",
    );
    let at = lsn(&pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()"));
    pg.psql("postgres", "SELECT pg_switch_wal()");
    format!(
        "{timeline:08X}{:08X}{:08X}",
        (at / SEG) / 256,
        (at / SEG) % 256
    )
}

/// Failover: the deployment names a primary and its streaming standby
/// (`host=S,P … target_session_attrs=read-write`). The streamer is down
/// while the primary writes whole segments and stops, and the standby is
/// promoted; started again, it settles on the new primary, gets timeline 1
/// from it up to the switch point (the segments it missed), then its
/// history file and timeline 2 from the switch segment on. `wal list`
/// shows both timelines and no gap; a point-in-time restore to a moment
/// after the promotion lands exactly there.
#[test]
fn wal_streaming_follows_a_failover_to_the_promoted_standby() {
    let (env, key) = keyed_env("5a");
    let k = key.as_str();
    let mut primary = PgCluster::start();
    primary.psql("postgres", "CREATE TABLE t (v text)");
    let standby = primary.standby().started();
    let conninfo = PgCluster::read_write_conninfo(&[&standby, &primary]);
    env.ok(&[
        "deployment",
        "create",
        "pg",
        "--pg",
        &conninfo,
        "--key-file",
        k,
    ]);
    // The standby is listed first: read-write settles on the primary.
    let b = env.ok(&["backup", "run", "pg", "--key-file", k]);
    assert!(b["backup_id"].is_string(), "{b}");
    let streamer = || {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.path("stream.ndjson"))
            .expect("log");
        stream_wal(&env, k, log)
    };
    let first = streamer();
    primary.psql("postgres", "INSERT INTO t VALUES ('a')");
    let seg_a = switch_wal(&primary, 1);
    wait_archived(&env, k, &seg_a, None);
    drop(first);
    // Whole segments the streamer never sees from the old primary.
    primary.psql("postgres", "INSERT INTO t VALUES ('b')");
    let seg_b = switch_wal(&primary, 1);
    primary.psql("postgres", "INSERT INTO t VALUES ('c')");
    let seg_c = switch_wal(&primary, 1);
    primary.psql("postgres", "INSERT INTO t VALUES ('d')");
    standby.catch_up(&primary);
    primary.stop();
    assert!(
        primary.try_psql("postgres", "SELECT 1").is_err(),
        "still up"
    );
    standby.promote();
    standby.psql("postgres", "INSERT INTO t VALUES ('e')");
    std::thread::sleep(Duration::from_millis(1100));
    let t = now_utc(&standby);
    std::thread::sleep(Duration::from_millis(1100));
    standby.psql("postgres", "INSERT INTO t VALUES ('f')");
    let _streamer = streamer();
    let seg_f = switch_wal(&standby, 2);
    let l = wait_archived(&env, k, &seg_f, Some("00000002.history"));
    assert_eq!(l["gaps"].as_array().map(Vec::len), Some(0), "{l}");
    let segs: Vec<&str> = l["segments"]
        .as_array()
        .expect("segments")
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    for s in [&seg_b, &seg_c] {
        assert!(
            segs.contains(&s.as_str()),
            "{s} (timeline 1, from the new primary): {l}"
        );
    }
    // The switch segment comes from timeline 2 (it holds timeline 1's
    // bytes up to the switch), and the streamer took it whole.
    let switch = format!("00000002{}", &seg_c[8..]);
    let next: u64 = u64::from_str_radix(&switch[16..], 16).expect("hex") + 1;
    let switch = format!("{}{next:08X}", &switch[..16]);
    assert!(segs.contains(&switch.as_str()), "{switch}: {l}");

    let target = env.path("pitr");
    let r = env.ok(&[
        "restore",
        "pg",
        "--backup",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
        "--to",
        t.trim(),
        "--key-file",
        k,
    ]);
    assert!(r["files"].as_u64().is_some_and(|f| f > 100), "{r}");
    let restored = PgCluster::on_existing(&target).started();
    wait_promoted(&restored);
    assert_eq!(
        rows(&restored),
        "a,b,c,d,e",
        "rows before the target (both timelines), none after"
    );
}

/// A primary shutting down cleanly waits until every walsender's client
/// confirms all WAL flushed. The streamer, holding part of a segment,
/// makes those bytes durable as `<segment>.partial` and confirms them, so
/// `pg_ctl stop` completes; `wal fetch` returns the bytes the server wrote.
#[test]
fn a_clean_shutdown_is_confirmed_with_a_partial_segment() {
    let mut s = Setup::new();
    let _streamer = s.streamer();
    s.archive_now();
    s.src.psql("postgres", "INSERT INTO t VALUES ('tail')");
    let seg = s
        .src
        .psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())");
    let seg = seg.trim().to_string();
    let t0 = Instant::now();
    s.src.stop();
    assert!(
        s.src.try_psql("postgres", "SELECT 1").is_err(),
        "the primary did not stop"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "stop took {:?}",
        t0.elapsed()
    );
    let partial = format!("{seg}.partial");
    let l = s.env.ok(&s.args(&["wal", "list", "pg"]));
    assert!(
        l["partial"]
            .as_array()
            .is_some_and(|p| p.iter().any(|n| n == partial.as_str())),
        "{l}"
    );
    let dest = s.env.path("partial");
    s.env
        .ok(&s.args(&["wal", "fetch", "pg", &partial, dest.to_str().expect("utf8")]));
    let got = std::fs::read(&dest).expect("fetched");
    let server = std::fs::read(s.src.data.join("pg_wal").join(&seg)).expect("server's segment");
    assert!(
        !got.is_empty() && got.len() < server.len(),
        "{} bytes",
        got.len()
    );
    assert_eq!(
        got[..],
        server[..got.len()],
        "the partial is the segment's first bytes"
    );
}

/// The failover rehearsal: `wal stream` runs against
/// `host=P,S target_session_attrs=read-write` while pgbench writes to the
/// primary; the primary stops in the middle of the run (its last bytes
/// confirmed as a `.partial`), the standby is promoted and pgbench goes on
/// there. The streamer rides through on its own (retrying until a host is
/// read-write); `wal list` shows both timelines, the history file and no
/// gap; PITR to a time after the promotion lands between two marked rows,
/// and the restored cluster passes pg_amcheck.
#[test]
fn wal_stream_rides_through_a_promotion_in_the_middle_of_pgbench() {
    let (env, key) = keyed_env("6b");
    let k = key.as_str();
    let mut primary = PgCluster::start();
    primary.run("pgbench", &["-i", "-s", "2", "-q", "postgres"]);
    primary.psql("postgres", "CREATE TABLE t (v text)");
    let standby = primary.standby().started();
    let conninfo = PgCluster::read_write_conninfo(&[&primary, &standby]);
    env.ok(&[
        "deployment",
        "create",
        "pg",
        "--pg",
        &conninfo,
        "--key-file",
        k,
    ]);
    env.ok(&["backup", "run", "pg", "--key-file", k]);
    let _streamer = stream_wal(&env, k, Stdio::null());
    let port = primary.port.to_string();
    let mut bench = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(pg_hardstorage_testkit::pg::bindir().join("pgbench"))
        .args(["-h", primary.sock.to_str().expect("utf8"), "-p", &port])
        .args(["-c", "2", "-j", "2", "-T", "60", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(Duration::from_secs(2));
    primary.psql("postgres", "INSERT INTO t VALUES ('a')");
    std::thread::sleep(Duration::from_secs(1));
    standby.catch_up(&primary);
    primary.stop();
    let _ = bench.wait();
    assert!(
        primary.try_psql("postgres", "SELECT 1").is_err(),
        "still up"
    );
    standby.promote();
    standby.run("pgbench", &["-c", "2", "-j", "2", "-T", "2", "postgres"]);
    standby.psql("postgres", "INSERT INTO t VALUES ('b')");
    std::thread::sleep(Duration::from_millis(1100));
    let t = now_utc(&standby);
    std::thread::sleep(Duration::from_millis(1100));
    standby.psql("postgres", "INSERT INTO t VALUES ('c')");
    standby.run("pgbench", &["-c", "2", "-j", "2", "-T", "1", "postgres"]);
    let seg = switch_wal(&standby, 2);
    let l = wait_archived(&env, k, &seg, Some("00000002.history"));
    assert_eq!(l["gaps"].as_array().map(Vec::len), Some(0), "{l}");
    let segs = l["segments"].as_array().expect("segments");
    for tl in ["00000001", "00000002"] {
        let on = segs
            .iter()
            .filter_map(|s| s.as_str())
            .any(|s| s.starts_with(tl));
        assert!(on, "no segment of timeline {tl}: {l}");
    }

    let target = env.path("pitr");
    env.ok(&[
        "restore",
        "pg",
        "--backup",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
        "--to",
        t.trim(),
        "--key-file",
        k,
    ]);
    let restored = PgCluster::on_existing(&target).started();
    wait_promoted(&restored);
    assert_eq!(
        rows(&restored),
        "a,b",
        "the rows before the target, none after"
    );
    restored.amcheck();
}

/// A deployment pointing at a hot standby: its base backup is taken
/// there, `wal stream` streams from a slot on the standby (cascading), and
/// a point-in-time restore of that backup lands between two rows written
/// on the primary.
#[test]
fn a_standby_deployment_streams_wal_and_recovers_to_a_point_in_time() {
    let (env, key) = keyed_env("7c");
    let k = key.as_str();
    let mut primary = PgCluster::start();
    primary.psql("postgres", "CREATE TABLE t (v text)");
    let standby = primary.standby().started();
    let conninfo = standby.conninfo();
    env.ok(&[
        "deployment",
        "create",
        "pg",
        "--pg",
        &conninfo,
        "--key-file",
        k,
    ]);
    env.ok(&["backup", "run", "pg", "--key-file", k]);
    let _streamer = stream_wal(&env, k, Stdio::null());
    primary.psql("postgres", "INSERT INTO t VALUES ('a')");
    std::thread::sleep(Duration::from_millis(1100));
    let t = now_utc(&primary);
    std::thread::sleep(Duration::from_millis(1100));
    primary.psql("postgres", "INSERT INTO t VALUES ('b')");
    let seg = switch_wal(&primary, 1);
    let l = wait_archived(&env, k, &seg, None);
    assert_eq!(l["gaps"].as_array().map(Vec::len), Some(0), "{l}");
    // The slot is the standby's.
    let slot = standby.psql(
        "postgres",
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pg_hardstorage_pg'",
    );
    assert_eq!(slot.trim(), "1", "the standby holds the slot");
    let on_primary = primary.psql("postgres", "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(on_primary.trim(), "0", "the primary has no slot of ours");

    let target = env.path("pitr");
    env.ok(&[
        "restore",
        "pg",
        "--backup",
        "latest",
        "--target",
        target.to_str().expect("utf8"),
        "--to",
        t.trim(),
        "--key-file",
        k,
    ]);
    let restored = PgCluster::on_existing(&target).started();
    wait_promoted(&restored);
    assert_eq!(rows(&restored), "a", "row a present, row b absent");
}

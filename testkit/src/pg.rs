//! A throw-away PostgreSQL cluster (15, Debian's, unless a test asks for
//! another major): initdb as the `postgres` user in a temporary directory,
//! a free port, `wal_level=replica`, replication slots and senders to
//! spare; stopped and removed on drop. PostgreSQL refuses to run as root,
//! so every server program runs through `runuser -u postgres`. Client
//! tools (psql, pgbench, pg_amcheck) are 15's whatever the server;
//! `pg_verifybackup` is one that reads the server's manifests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bindir() -> PathBuf {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .unwrap_or_else(|e| {
            panic!("pg_config not found ({e}): install PostgreSQL 15 server packages")
        });
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Where PostgreSQL servers of majors other than 15 are installed, one
/// directory per major (`scripts/pg-majors.sh` puts them there).
pub fn majors_root() -> PathBuf {
    std::env::var_os("PHS_PG_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pg_hardstorage/pg"))
}

/// The server programs (initdb, pg_ctl, postgres) of a PostgreSQL major;
/// panics naming the install command when they are missing.
pub fn major_bindir(major: u32) -> PathBuf {
    if major == 15 {
        return bindir();
    }
    let bin = majors_root().join(major.to_string()).join("bin");
    assert!(
        bin.join("postgres").is_file(),
        "PostgreSQL {major} is not installed at {}: run scripts/pg-majors.sh {major}",
        bin.display()
    );
    bin
}

/// The major the PostgreSQL tests run against: `PHS_PG_MAJOR` (the version
/// matrix, `scripts/test-matrix.sh`, sets it), else 15.
pub fn default_major() -> u32 {
    std::env::var("PHS_PG_MAJOR")
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("PHS_PG_MAJOR={v:?} is not a PostgreSQL major"))
        })
        .unwrap_or(15)
}

/// A `pg_verifybackup` that checks [`default_major`]'s backups: 15's up to
/// 15, else that major's own, else 18's for 16 (a version-1 manifest; run
/// without WAL parsing, since its pg_waldump reads only 18's WAL). From 17
/// on only the same major's tool reads `pg_control`, and the npm builds of
/// 13–17 carry no client tools: `None` for 17.
pub fn verifybackup_tool() -> Option<(PathBuf, bool)> {
    let m = default_major();
    if m <= 15 {
        return Some((bindir().join("pg_verifybackup"), m == 15));
    }
    let own = major_bindir(m).join("pg_verifybackup");
    if own.is_file() {
        return Some((own, true));
    }
    (m <= 16).then(|| (major_bindir(18).join("pg_verifybackup"), false))
}

/// Checks a restored data directory with [`verifybackup_tool`] (as the
/// `postgres` user) and panics with its output when it fails. Where no
/// tool can check this major, says so on stderr: the caller's own checks
/// (starting the cluster, comparing tables, pg_amcheck) still run.
pub fn check_with_pg_verifybackup(dir: &Path) {
    let Some((tool, same_major)) = verifybackup_tool() else {
        eprintln!(
            "pg_verifybackup: none installed can check PostgreSQL {} (not run)",
            default_major()
        );
        return;
    };
    let mut a = if same_major {
        vec![]
    } else {
        vec!["--no-parse-wal"]
    };
    let d = dir.to_str().expect("utf8 path");
    a.push(d);
    let v = run_as_postgres(&tool, &a);
    assert!(
        v.status.success(),
        "pg_verifybackup {d}: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

/// Whether restores of [`default_major`] can be checked by a
/// `pg_verifybackup` here (the product's `--verify auto` then says
/// `passed`, else `unavailable`).
pub fn verifybackup_available() -> bool {
    verifybackup_tool().is_some()
}

/// Runs a PostgreSQL 15 program as the `postgres` user.
pub fn as_postgres(prog: &str, args: &[&str]) -> Output {
    run_as_postgres(&bindir().join(prog), args)
}

/// Runs the program at `bin` as the `postgres` user.
pub fn run_as_postgres(bin: &Path, args: &[&str]) -> Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} as postgres ({e}): is runuser available?",
                bin.display()
            )
        });
    out
}

fn check(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Makes `p` usable by the postgres user (owner and mode).
pub fn give_to_postgres(p: &Path) {
    let o = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .output()
        .expect("chown");
    assert!(
        o.status.success(),
        "chown: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Gives `p` (a local repository) to PostgreSQL's group, as an operator
/// does so that `restore_command`, run as that user, can read it: the
/// repository's setgid directories pass the group to what is written later.
pub fn share_with_postgres_group(p: &Path) {
    let o = Command::new("chgrp")
        .args(["-R", "postgres"])
        .arg(p)
        .output()
        .expect("chgrp");
    assert!(
        o.status.success(),
        "chgrp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub struct PgCluster {
    _tmp: Option<tempfile::TempDir>,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    /// `listen_addresses`: `''` (Unix socket only) unless TLS is set up.
    listen: String,
    running: bool,
    /// The server programs' directory (its major's).
    server_bin: PathBuf,
    /// The PostgreSQL major the cluster runs.
    pub major: u32,
}

fn scratch() -> tempfile::TempDir {
    let t = tempfile::Builder::new()
        .prefix("phs-pg-")
        .tempdir()
        .expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    t
}

impl PgCluster {
    /// initdb + start.
    pub fn start() -> PgCluster {
        Self::initdb().started()
    }

    /// An initialised, configured cluster of [`default_major`], not started.
    pub fn initdb() -> PgCluster {
        Self::initdb_major(default_major())
    }

    /// An initialised, configured cluster of PostgreSQL `major`, not started.
    pub fn initdb_major(major: u32) -> PgCluster {
        Self::initdb_with(major, &[])
    }

    /// As [`PgCluster::initdb_major`], with more initdb arguments.
    pub fn initdb_with(major: u32, extra: &[&str]) -> PgCluster {
        let server_bin = major_bindir(major);
        let tmp = scratch();
        let data = tmp.path().join("data");
        let sock = tmp.path().join("sock");
        std::fs::create_dir_all(&sock).expect("sock dir");
        give_to_postgres(tmp.path());
        let data_dir = data.to_str().expect("utf8");
        let mut args = vec![
            "-D",
            data_dir,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ];
        args.extend_from_slice(extra);
        check("initdb", run_as_postgres(&server_bin.join("initdb"), &args));
        let c = PgCluster {
            port: crate::s3::free_port(),
            data,
            sock,
            _tmp: Some(tmp),
            listen: "''".into(),
            running: false,
            server_bin,
            major,
        };
        c.configure(&[
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "fsync = off",
            "full_page_writes = on",
        ]);
        c
    }

    /// Listens on 127.0.0.1 too, with `ssl = on` and this certificate and
    /// key (PEM); `client_ca`, when given, is the CA client certificates
    /// are checked against.
    pub fn with_tls(self, cert_pem: &str, key_pem: &str, client_ca: Option<&str>) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let put = |name: &str, text: &str| {
            let p = self.data.join(name);
            std::fs::write(&p, text).expect("write tls file");
            give_to_postgres(&p);
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        };
        put("server.crt", cert_pem);
        put("server.key", key_pem);
        let mut conf = vec!["ssl = on"];
        if let Some(ca) = client_ca {
            put("client_ca.crt", ca);
            conf.push("ssl_ca_file = 'client_ca.crt'");
        }
        self.configure(&conf);
        self.listen_on_tcp()
    }

    /// Listens on 127.0.0.1 as well as the Unix socket.
    pub fn listen_on_tcp(mut self) -> Self {
        self.listen = "'127.0.0.1'".into();
        self
    }

    /// Puts `lines` at the top of pg_hba.conf (so they win over initdb's
    /// trust lines); takes effect at start, or after `reload`.
    pub fn hba_first(&self, lines: &[&str]) {
        let p = self.data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&p).expect("pg_hba.conf");
        std::fs::write(&p, format!("{}\n{old}", lines.join("\n"))).expect("write pg_hba.conf");
    }

    /// A TCP connection string to `host` (which must reach 127.0.0.1),
    /// followed by `extra` keyword/value settings.
    pub fn tcp_conninfo(&self, host: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user=postgres dbname=postgres {extra}",
            self.port
        )
    }

    /// A cluster of [`default_major`] over an existing (restored) data
    /// directory, on a new port.
    pub fn on_existing(data: &Path) -> PgCluster {
        Self::on_existing_major(data, default_major())
    }

    /// A cluster of PostgreSQL `major` over an existing data directory.
    pub fn on_existing_major(data: &Path, major: u32) -> PgCluster {
        let sock = data
            .parent()
            .expect("parent")
            .join(format!("sock-{}", crate::s3::free_port()));
        std::fs::create_dir_all(&sock).expect("sock");
        give_to_postgres(&sock);
        give_to_postgres(data);
        PgCluster {
            _tmp: None,
            data: data.to_path_buf(),
            sock,
            port: crate::s3::free_port(),
            listen: "''".into(),
            running: false,
            server_bin: major_bindir(major),
            major,
        }
    }

    pub fn configure(&self, lines: &[&str]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.auto.conf"))
            .expect("auto.conf");
        for l in lines {
            writeln!(f, "{l}").expect("write conf");
        }
    }

    pub fn started(self) -> PgCluster {
        match self.try_started() {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts the server; on failure returns pg_ctl's error and the server log.
    pub fn try_started(mut self) -> Result<PgCluster, String> {
        self.start_in_place()?;
        Ok(self)
    }

    fn start_in_place(&mut self) -> Result<(), String> {
        let opts = format!(
            "-p {} -c listen_addresses={} -c unix_socket_directories='{}'",
            self.port,
            self.listen,
            self.sock.display()
        );
        let log = self.sock.join("postgres.log");
        let o = run_as_postgres(
            &self.server_bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().expect("utf8"),
                "-o",
                &opts,
                "-l",
                log.to_str().expect("utf8"),
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
        if !o.status.success() {
            let logtext = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}\n{logtext}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        self.running = true;
        Ok(())
    }

    /// A streaming hot standby of this running primary, not started: the
    /// primary is stopped cleanly, its data directory copied and the
    /// primary started again; the copy gets `standby.signal` and a
    /// `primary_conninfo` to the primary's socket. The primary keeps 1 GB
    /// of WAL for it (`wal_keep_size`).
    pub fn standby(&mut self) -> PgCluster {
        self.configure(&["wal_keep_size = '1GB'"]);
        self.stop();
        let tmp = scratch();
        give_to_postgres(tmp.path());
        let data = tmp.path().join("data");
        let sock = tmp.path().join("sock");
        std::fs::create_dir_all(&sock).expect("sock dir");
        give_to_postgres(&sock);
        let (from, to) = (
            self.data.to_str().expect("utf8"),
            data.to_str().expect("utf8"),
        );
        check(
            "cp",
            run_as_postgres(Path::new("/bin/cp"), &["-a", from, to]),
        );
        self.start_in_place().unwrap_or_else(|e| panic!("{e}"));
        let signal = data.join("standby.signal");
        std::fs::write(&signal, "").expect("standby.signal");
        give_to_postgres(&signal);
        let s = PgCluster {
            port: crate::s3::free_port(),
            data,
            sock,
            _tmp: Some(tmp),
            listen: "''".into(),
            running: false,
            server_bin: self.server_bin.clone(),
            major: self.major,
        };
        s.configure(&[&format!(
            "primary_conninfo = 'host={} port={} user=postgres'",
            self.sock.display(),
            self.port
        )]);
        s
    }

    /// Waits (up to 60 s) until this standby has replayed everything
    /// `primary` has written so far.
    pub fn catch_up(&self, primary: &PgCluster) {
        let lsn = primary.psql("postgres", "SELECT pg_current_wal_lsn()");
        let sql = format!(
            "SELECT pg_last_wal_replay_lsn() >= '{}'::pg_lsn",
            lsn.trim()
        );
        let t0 = std::time::Instant::now();
        while self.try_psql("postgres", &sql).map(|o| o.trim() == "t") != Ok(true) {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "the standby did not reach {lsn} in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// A libpq connection string naming `hosts` in order, settling on the
    /// one that accepts writes (`target_session_attrs=read-write`).
    pub fn read_write_conninfo(hosts: &[&PgCluster]) -> String {
        let list = |f: &dyn Fn(&PgCluster) -> String| {
            hosts.iter().map(|h| f(h)).collect::<Vec<_>>().join(",")
        };
        format!(
            "host={} port={} user=postgres dbname=postgres target_session_attrs=read-write",
            list(&|h| h.sock.display().to_string()),
            list(&|h| h.port.to_string())
        )
    }

    /// `pg_ctl promote`, waiting until the server accepts writes.
    pub fn promote(&self) {
        let data = self.data.to_str().expect("utf8");
        let pg_ctl = self.server_bin.join("pg_ctl");
        check(
            "pg_ctl promote",
            run_as_postgres(&pg_ctl, &["-D", data, "-w", "-t", "120", "promote"]),
        );
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.sock.join("postgres.log")).unwrap_or_default()
    }

    /// Like `psql`, but a failure (server gone) is returned, not a panic.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let o = as_postgres(
            "psql",
            &[
                "-h",
                self.sock.to_str().unwrap_or_default(),
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        }
    }

    /// Runs SQL with psql; returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql failed on {sql:?}: {e}"))
    }

    pub fn run(&self, prog: &str, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut a = vec![
            "-h",
            self.sock.to_str().expect("utf8"),
            "-p",
            &port,
            "-U",
            "postgres",
        ];
        a.extend_from_slice(args);
        check(prog, as_postgres(prog, &a))
    }

    /// pg_amcheck of every database: heaps and B-tree indexes (with
    /// `--heapallindexed`); on 13, whose amcheck has no `verify_heapam`,
    /// the indexes alone.
    pub fn amcheck(&self) {
        let mut args = vec!["--all", "--install-missing", "--heapallindexed"];
        if self.major < 14 {
            args.extend(["--index", "*.*.*"]);
        }
        self.run("pg_amcheck", &args);
    }

    pub fn stop(&mut self) {
        self.stop_with("fast");
    }

    fn stop_with(&mut self, mode: &str) {
        if self.running {
            let data = self.data.to_str().unwrap_or_default().to_string();
            let pg_ctl = self.server_bin.join("pg_ctl");
            let _ = run_as_postgres(&pg_ctl, &["-D", &data, "-m", mode, "-w", "stop"]);
            self.running = false;
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop_with("immediate");
    }
}

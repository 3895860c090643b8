//! TLS to a real PostgreSQL with a CA made in the test: libpq's sslmode
//! semantics, channel binding, client certificates, require_auth, and a
//! base backup over verify-full.

use crate::backup;
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_testkit::ca::TestCa;
use pg_hardstorage_testkit::local_repo;
use pg_hardstorage_testkit::pg::PgCluster;
use phs_pg::{Conn, ConnInfo};
use std::path::{Path, PathBuf};

/// A server whose certificate the CA issued for `localhost` only.
struct TlsServer {
    pg: PgCluster,
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl TlsServer {
    /// A PostgreSQL 15 server (TLS is the client's protocol, the same on
    /// every major; the PyPI build of 18 has no SSL).
    fn start(hba: &[&str], client_ca: bool) -> TlsServer {
        Self::start_on(PgCluster::initdb_major(15), hba, client_ca)
    }

    /// A server of PostgreSQL `major` (installed by scripts/pg-majors.sh).
    fn start_major(major: u32, hba: &[&str]) -> TlsServer {
        Self::start_on(PgCluster::initdb_major(major), hba, false)
    }

    fn start_on(pg: PgCluster, hba: &[&str], client_ca: bool) -> TlsServer {
        let ca = TestCa::new("phs test CA");
        let leaf = ca.server(&["localhost"]);
        pg.hba_first(hba);
        let ca_pem = ca.pem();
        let pg = pg
            .with_tls(&leaf.cert, &leaf.key, client_ca.then_some(ca_pem.as_str()))
            .started();
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("ca");
        TlsServer { pg, ca, dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conninfo(&self, host: &str, extra: &str) -> String {
        let ca = self.file("ca.crt");
        self.pg
            .tcp_conninfo(host, &format!("sslrootcert={} {extra}", ca.display()))
    }
}

/// `HOME` pointed at an empty directory: no ~/.postgresql or ~/.pgpass of
/// the machine's user is read.
fn env_without_home(k: &str) -> Option<String> {
    match k {
        "HOME" => Some("/nonexistent".into()),
        _ => None,
    }
}

fn connect(s: &str, replication: bool) -> Result<Conn, pg_hardstorage_engine::Problem> {
    let ci = ConnInfo::parse_with(s, &env_without_home)?;
    Conn::connect(&ci, replication)
}

fn walsender_ssl(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        "SELECT string_agg(s.ssl::text, ',') FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.backend_type = 'walsender'",
    )
    .trim()
    .to_string()
}

#[test]
fn verify_full_backs_up_over_tls_and_the_walsender_shows_ssl() {
    let s = TlsServer::start(&[], false);
    let ci = s.conninfo("localhost", "sslmode=verify-full");
    let mut c = connect(&ci, true).expect("verify-full with the right CA");
    assert!(c.is_tls());
    c.identify_system().expect("IDENTIFY_SYSTEM over TLS");
    assert_eq!(walsender_ssl(&s.pg), "true");
    drop(c);

    // The URI form's query parameters are honoured too.
    let uri = format!(
        "postgresql://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        s.pg.port,
        s.file("ca.crt").display()
    );
    assert!(connect(&uri, false).expect("uri").is_tls());

    // A whole base backup over verify-full.
    let (_tmp, repo) = local_repo(pg_hardstorage_testkit::small_opts());
    deployment::create(
        &repo,
        Deployment {
            name: "tls".into(),
            kind: Kind::Postgres,
            path: None,
            pg: Some(ci),
            pgdata: None,
            created_at: String::new(),
            system_identifier: None,
            tenant: None,
        },
    )
    .expect("deployment");
    let (m, _) = backup(&repo, "tls").expect("backup over TLS");
    assert!(m.entries.iter().any(|e| e.path == "PG_VERSION"));
}

#[test]
fn verify_full_refuses_a_wrong_ca_or_host_name_and_verify_ca_checks_only_the_chain() {
    let s = TlsServer::start(&[], false);
    let rogue = TestCa::new("someone else");
    std::fs::write(s.file("rogue.crt"), rogue.pem()).expect("rogue");
    let wrong_ca = s.pg.tcp_conninfo(
        "localhost",
        &format!(
            "sslmode=verify-full sslrootcert={}",
            s.file("rogue.crt").display()
        ),
    );
    let e = connect(&wrong_ca, true)
        .err()
        .expect("a wrong CA is refused");
    assert_eq!(e.code, "pg.tls_failed", "{e}");
    assert_eq!(e.exit_code(), 3);
    let e = connect(&wrong_ca.replace("verify-full", "verify-ca"), true)
        .err()
        .expect("verify-ca still checks the chain");
    assert_eq!(e.code, "pg.tls_failed", "{e}");

    // The certificate names localhost, not 127.0.0.1.
    let e = connect(&s.conninfo("127.0.0.1", "sslmode=verify-full"), true)
        .err()
        .expect("a host name the certificate does not hold is refused");
    assert_eq!(e.code, "pg.tls_failed", "{e}");
    assert!(
        e.message.contains("not valid for name") || e.message.contains("name"),
        "{e}"
    );
    let c = connect(&s.conninfo("127.0.0.1", "sslmode=verify-ca"), true).expect("verify-ca");
    assert!(c.is_tls());

    // verify-* without a root certificate is a configuration error.
    let e = connect(&s.pg.tcp_conninfo("localhost", "sslmode=verify-full"), true)
        .err()
        .expect("no root certificate");
    assert_eq!(e.code, "deployment.invalid", "{e}");
    // require without a root certificate encrypts and checks nothing;
    // with a rogue root present it checks the chain, as libpq does.
    let c = connect(&s.pg.tcp_conninfo("localhost", "sslmode=require"), true).expect("require");
    assert!(c.is_tls());
    let e = connect(&wrong_ca.replace("verify-full", "require"), true)
        .err()
        .expect("require with a root certificate checks it");
    assert_eq!(e.code, "pg.tls_failed", "{e}");
}

#[test]
fn sslmode_decides_whether_tls_is_spoken() {
    let s = TlsServer::start(&[], false);
    let c = connect(&s.pg.tcp_conninfo("localhost", "sslmode=disable"), true).expect("disable");
    assert!(!c.is_tls());
    assert_eq!(walsender_ssl(&s.pg), "false");
    drop(c);
    let c = connect(&s.pg.tcp_conninfo("localhost", ""), true).expect("prefer (the default)");
    assert!(c.is_tls(), "prefer speaks TLS to a server that offers it");
    drop(c);

    // A server without TLS.
    let plain = PgCluster::initdb().listen_on_tcp().started();
    let e = connect(&plain.tcp_conninfo("localhost", "sslmode=require"), true)
        .err()
        .expect("require refuses a server without TLS");
    assert_eq!(e.code, "pg.tls_unavailable", "{e}");
    assert_eq!(e.exit_code(), 4);
    let c = connect(&plain.tcp_conninfo("localhost", "sslmode=prefer"), true).expect("prefer");
    assert!(!c.is_tls(), "prefer falls back to clear");
    drop(c);
    // Unix sockets never speak TLS, as in libpq.
    assert!(
        !connect(&format!("{} sslmode=prefer", plain.conninfo()), true)
            .expect("socket")
            .is_tls()
    );
}

fn set_password(pg: &PgCluster) {
    pg.psql(
        "postgres",
        "SET password_encryption = 'scram-sha-256'; ALTER ROLE postgres PASSWORD 'Sekr1t'",
    );
}

#[test]
fn require_auth_refuses_a_cleartext_password_and_the_password_file_is_read() {
    let s = TlsServer::start(
        &[
            "host all all 127.0.0.1/32 password",
            "host replication all 127.0.0.1/32 password",
        ],
        false,
    );
    set_password(&s.pg);
    let base =
        s.pg.tcp_conninfo("localhost", "sslmode=disable password=Sekr1t");
    connect(&base, true).expect("cleartext password accepted by default");
    let e = connect(&format!("{base} require_auth=scram-sha-256"), true)
        .err()
        .expect("require_auth=scram-sha-256 refuses a cleartext request");
    assert_eq!(e.code, "pg.auth_method_refused", "{e}");
    assert_eq!(e.exit_code(), 3);
    let e = connect(&format!("{base} require_auth=!password"), true)
        .err()
        .expect("!password refuses it too");
    assert_eq!(e.code, "pg.auth_method_refused", "{e}");

    // No password in the string: the password file supplies it.
    let pass = s.file("pgpass");
    std::fs::write(
        &pass,
        format!(
            "# comment\nlocalhost:{}:replication:postgres:Sekr1t\n",
            s.pg.port
        ),
    )
    .expect("pgpass");
    let chmod = |p: &Path, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
    };
    chmod(&pass, 0o600);
    let no_pw = s.pg.tcp_conninfo(
        "localhost",
        &format!("sslmode=disable passfile={}", pass.display()),
    );
    connect(&no_pw, true).expect("password from the password file");
    let e = connect(&no_pw, false)
        .err()
        .expect("the line names replication only");
    assert_eq!(e.code, "pg.auth_failed", "{e}");
    chmod(&pass, 0o644);
    let e = connect(&no_pw, true)
        .err()
        .expect("a readable password file is refused");
    assert_eq!(e.code, "pg.auth_failed", "{e}");
    assert!(e.message.contains("group or world"), "{e}");
}

#[test]
fn scram_binds_to_the_tls_channel_and_client_certificates_authenticate() {
    let s = TlsServer::start(
        &[
            "hostssl replication all 127.0.0.1/32 scram-sha-256",
            "hostssl all all 127.0.0.1/32 cert",
            "hostnossl all all 127.0.0.1/32 scram-sha-256",
        ],
        true,
    );
    set_password(&s.pg);
    let pw = "password=Sekr1t";
    // channel_binding=require: SCRAM-SHA-256-PLUS over TLS, with the
    // certificate hash the server computes.
    connect(
        &s.conninfo(
            "localhost",
            &format!("sslmode=verify-full channel_binding=require {pw}"),
        ),
        true,
    )
    .expect("channel-bound SCRAM over TLS");
    connect(
        &s.conninfo(
            "localhost",
            &format!("sslmode=verify-full channel_binding=disable {pw}"),
        ),
        true,
    )
    .expect("plain SCRAM over TLS when binding is disabled");
    let e = connect(
        &s.conninfo(
            "localhost",
            &format!("sslmode=disable channel_binding=require {pw}"),
        ),
        true,
    )
    .err()
    .expect("no channel to bind to without TLS");
    assert_eq!(e.code, "pg.auth_method_refused", "{e}");

    // Client certificate authentication (CN = the user).
    let leaf = s.ca.client("postgres");
    std::fs::write(s.file("client.crt"), &leaf.cert).expect("cert");
    std::fs::write(s.file("client.key"), &leaf.key).expect("key");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(s.file("client.key"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let with_cert = s.conninfo(
        "localhost",
        &format!(
            "sslmode=verify-full sslcert={} sslkey={}",
            s.file("client.crt").display(),
            s.file("client.key").display()
        ),
    );
    let mut c = connect(&with_cert, false).expect("certificate authentication");
    let rows = c
        .simple_query("SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .expect("query");
    assert_eq!(rows[0][0][0].as_deref(), Some("t"));
    assert_eq!(rows[0][0][1].as_deref(), Some("/CN=postgres"));
    let e = connect(&s.conninfo("localhost", "sslmode=verify-full"), false)
        .err()
        .expect("no certificate, no entry");
    assert!(
        e.code == "pg.auth_failed" || e.code == "pg.tls_failed",
        "{e}"
    );
}

/// `sslnegotiation=direct` (PostgreSQL 17+): TLS from the first byte with
/// the `postgresql` ALPN, verified against the test CA, on a real
/// PostgreSQL 17; a server without direct TLS (15) is a clear TLS error.
#[test]
fn direct_tls_negotiation_works_against_postgresql_17_and_fails_clearly_on_15() {
    let s = TlsServer::start_major(17, &[]);
    let ci = s.conninfo("localhost", "sslmode=verify-full sslnegotiation=direct");
    let mut c = connect(&ci, true).expect("direct TLS to PostgreSQL 17");
    assert!(c.is_tls());
    c.identify_system()
        .expect("IDENTIFY_SYSTEM over direct TLS");
    assert_eq!(walsender_ssl(&s.pg), "true");
    drop(c);
    let old = TlsServer::start_on(PgCluster::initdb_major(15), &[], false);
    let ci = old.conninfo("localhost", "sslmode=verify-full sslnegotiation=direct");
    let e = connect(&ci, false)
        .err()
        .expect("PostgreSQL 15 has no direct TLS");
    assert!(
        e.code == "pg.tls_failed" && e.message.contains("sslnegotiation=direct"),
        "{e}"
    );
    let hint = e
        .suggestion
        .as_ref()
        .map(|s| s.human.clone())
        .unwrap_or_default();
    assert!(hint.contains("PostgreSQL 17"), "{hint}");
}

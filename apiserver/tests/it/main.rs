//! The API server over real HTTP: every route, the auth matrix, streaming,
//! webhooks, TLS and mTLS, load.

use pg_hardstorage_engine::Code;
mod auth;
mod load;
mod routes;
mod stream;

use pg_hardstorage_apiserver::{tls::TlsFiles, webhook::Webhook, Server, ServerConfig};
use pg_hardstorage_engine::store::{DynStore, OutageWhile};
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_repo::{tokens, Repository};
use pg_hardstorage_testkit::http::Client;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct TestServer {
    pub addr: SocketAddr,
    pub repo: Repository,
    pub tmp: tempfile::TempDir,
    /// Created while this file exists, the repository is unreachable.
    pub outage_flag: PathBuf,
    /// A token granted `admin:*` (every verb, every tenant).
    pub admin: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
pub struct Options {
    pub tls: Option<TlsFiles>,
    pub webhooks: Vec<Webhook>,
    /// Slows every put (a slow store keeps a backup running).
    pub put_delay: Option<Duration>,
    /// `ServerConfig::max_connections` (0: the default).
    pub max_connections: usize,
    /// `ServerConfig::max_operations` (0: the default).
    pub max_operations: usize,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    pub fn start_with(o: Options) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let outage_flag = tmp.path().join("outage");
        let mut inner = phs_store_open(tmp.path().join("repo"));
        if let Some(d) = o.put_delay {
            inner = Arc::new(pg_hardstorage_engine::store::Throttled {
                inner,
                put_delay: d,
            });
        }
        let store: DynStore = Arc::new(OutageWhile {
            inner,
            flag: outage_flag.clone(),
        });
        let repo = pg_hardstorage_testkit::init(store, pg_hardstorage_testkit::small_opts());
        let (_, admin) = tokens::create(&repo, "admin", &["admin:*".into()], None).expect("token");
        let rt = pg_hardstorage_apiserver::runtime().expect("runtime");
        let server = Server::bind(
            &rt,
            ServerConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                tls: o.tls,
                repo: repo.clone(),
                restore_command: Arc::new(|_: &str| {
                    Err(Problem::new(
                        Code::UsageInvalidArgument,
                        "no key file in tests",
                    ))
                }),
                webhooks: o.webhooks,
                body_limit: 64 << 10,
                shutdown_grace: Duration::from_secs(10),
                wal_streams: Vec::new(),
                kms_dir: Some(tmp.path().to_path_buf()),
                max_connections: o.max_connections,
                max_operations: o.max_operations,
            },
        )
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        let state = server.state();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(server.run(async {
                let _ = rx.await;
            }));
            rt.shutdown_timeout(Duration::from_secs(5));
            drop(state);
        });
        TestServer {
            addr,
            repo,
            tmp,
            outage_flag,
            admin,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr)
    }

    pub fn admin(&self) -> Client {
        self.client().with_token(&self.admin)
    }

    pub fn token(&self, name: &str, verbs: &[&str], tenant: Option<&str>) -> String {
        let verbs: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
        tokens::create(&self.repo, name, &verbs, tenant.map(str::to_string))
            .expect("token")
            .1
    }

    /// Takes a backup over the API (one envelope, admin token); returns its id.
    pub fn backup(&self, deployment: &str) -> String {
        let r = self
            .admin()
            .request(
                "POST",
                &format!("/v1/deployments/{deployment}/backups"),
                &[("Accept", "application/json")],
                None,
            )
            .expect("backup request");
        body_of(&r, "backups.take")["backup_id"]
            .as_str()
            .expect("backup id")
            .to_string()
    }

    /// A path deployment over a small tree; returns the tree's directory.
    pub fn path_deployment(&self, name: &str, tenant: Option<&str>) -> PathBuf {
        let src = self.tmp.path().join(format!("src-{name}"));
        std::fs::create_dir_all(src.join("sub")).expect("mkdir");
        for i in 0..20 {
            std::fs::write(
                src.join(format!("f{i}")),
                format!("file {i} ").repeat(500 * i + 1),
            )
            .expect("write");
        }
        std::fs::write(src.join("sub/x"), vec![7u8; 300_000]).expect("write");
        deployment::create(
            &self.repo,
            Deployment {
                name: name.into(),
                kind: Kind::Path,
                path: Some(src.display().to_string()),
                pg: None,
                pgdata: None,
                created_at: String::new(),
                system_identifier: None,
                tenant: tenant.map(str::to_string),
            },
        )
        .expect("deployment");
        src
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn phs_store_open(p: PathBuf) -> DynStore {
    phs_store::open_store(p.to_str().expect("utf8"), true).expect("store")
}

/// NDJSON lines of a streamed body; the last may lack its newline.
pub fn ndjson(body: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(body)
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad NDJSON line {l:?}: {e}")))
        .collect()
}

/// Asserts the success envelope of the contract; returns its body.
pub fn body_of(r: &pg_hardstorage_testkit::http::Response, command: &str) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["schema"], "pg_hardstorage.v1");
    assert_eq!(v["command"], command, "{v}");
    assert!(
        v["generated_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    v["result"]["body"].clone()
}

/// Asserts the error envelope with `status` and `code`.
pub fn error_of(
    r: &pg_hardstorage_testkit::http::Response,
    status: u16,
    code: &str,
) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["schema"], "pg_hardstorage.v1");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(
        v["error"]["suggestion"]["doc_url"].as_str().is_some(),
        "{v}"
    );
    assert!(v.get("result").is_none());
    v["error"].clone()
}

pub fn dirs_equal(a: &Path, b: &Path) {
    let out = std::process::Command::new("diff")
        .args(["-r", "--no-dereference"])
        .arg(a)
        .arg(b)
        .output()
        .expect("diff");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

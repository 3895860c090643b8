#![recursion_limit = "256"]
//! The REST control plane: `pg_hardstorage serve`.
//!
//! A thin hyper 1.x server over the same `pg_hardstorage_repo::ops`
//! functions the CLI calls. Requests are authenticated (bearer token or
//! mTLS client certificate), authorised by RBAC verb and tenant, and
//! answered in the contract's envelopes; backup, restore and verify stream
//! NDJSON events. Library work runs on tokio's blocking pool, the backup
//! pipeline on its own pinned threads.
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::Code;
pub mod auth;
pub mod body;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod tls;
pub mod webhook;

use crate::auth::{Identity, TokenCache};
use crate::body::Body;
use crate::routes::{error, Access, Found, Mode};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::backup::BackupSummary;
use pg_hardstorage_repo::Repository;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type RestoreCommand = Arc<dyn Fn(&str) -> Result<String, Problem> + Send + Sync>;

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<tls::TlsFiles>,
    pub repo: Repository,
    /// The `restore_command` a restore writes for PostgreSQL, per deployment.
    pub restore_command: RestoreCommand,
    /// Event sinks every operation's events also go to.
    pub webhooks: Vec<webhook::Webhook>,
    /// Request bodies larger than this are refused.
    pub body_limit: usize,
    /// How long running streams get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Deployments whose WAL the server streams for as long as it runs
    /// (their lag shows in `/metrics`).
    pub wal_streams: Vec<String>,
    /// The only directory `POST /v1/kms/rotate` may take new key or
    /// passphrase files from (by file name); `None`: rotation over the API
    /// is refused. External KMS commands are never taken from the API.
    pub kms_dir: Option<std::path::PathBuf>,
    /// Connections served at once (0: [`default_max_connections`]). One
    /// more is answered 503 `api.busy` with `Retry-After` and closed.
    pub max_connections: usize,
    /// Operations (backups, restores, verifies, ...) run at once for API
    /// callers (0: [`default_max_operations`]); one more is answered 503
    /// `api.busy` with `Retry-After`.
    pub max_operations: usize,
}

/// Two operations per core, at least four.
pub fn default_max_operations() -> usize {
    (2 * pg_hardstorage_engine::pipeline::default_workers()).max(4)
}

/// Half the descriptors the process may open (the rest stay for the
/// repository, operations and the 503 answers), between 16 and 4096.
pub fn default_max_connections() -> usize {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0 {
        l.rlim_cur
    } else {
        1024
    };
    (soft / 2).clamp(16, 4096) as usize
}

/// Builds the runtime the server runs on. Its threads (request handling,
/// and the blocking pool for short library calls) run at a lower CPU
/// priority than operations: a dashboard polling the API must not slow
/// the backups it watches. Operations (backup, restore, verify) run on
/// threads of normal priority started by [`State::launch`].
pub fn runtime() -> Result<tokio::runtime::Runtime, Problem> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("api")
        .max_blocking_threads(8)
        .on_thread_start(|| lower_priority(API_NICE))
        .build()
        .map_err(|e| Problem::internal(format!("tokio runtime: {e}")))
}

/// The nice value of API threads (operations keep the process's own).
/// Under contention a nice-19 thread weighs 15 against a normal one's 1024:
/// a backup saturating the cores leaves the API a few percent, which is
/// still hundreds of listings a second.
pub const API_NICE: i32 = 19;

/// Makes the calling thread run only when a core would otherwise idle
/// (`SCHED_IDLE`). Load generators in tests use it to stand in for
/// clients on other machines.
pub fn idle_priority() {
    // SAFETY: sched_setscheduler on the calling thread with a valid param.
    unsafe {
        let p = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &p);
    }
}

/// Lowers the calling thread's CPU priority (Linux: nice is per thread).
pub fn lower_priority(nice: i32) {
    // SAFETY: gettid and setpriority on the calling thread; no memory involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Starts operation threads from a thread of normal priority (a thread
/// inherits its creator's nice value, so they cannot come from the API's).
struct Launcher {
    tx: crossbeam_channel::Sender<Job>,
}

impl Launcher {
    fn start() -> Launcher {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let _ = std::thread::Builder::new()
            .name("op-launcher".into())
            .spawn(move || {
                for job in rx.iter() {
                    let _ = std::thread::Builder::new().name("op".into()).spawn(job);
                }
            });
        Launcher { tx }
    }
}

pub struct State {
    pub repo: Repository,
    pub tokens: TokenCache,
    pub restore_command: RestoreCommand,
    webhooks: Vec<webhook::Webhook>,
    pub metrics: metrics::Metrics,
    body_limit: usize,
    /// Summaries of committed manifests (immutable once written), by key.
    summaries: Mutex<HashMap<String, BackupSummary>>,
    launcher: Launcher,
    /// Slots of the operations API callers may run at once.
    pub operations: Arc<tokio::sync::Semaphore>,
    pub kms_dir: Option<std::path::PathBuf>,
    /// Set once `kms shred` ran here: the keys this process still holds in
    /// memory must not decrypt anything any more.
    pub shredded: std::sync::atomic::AtomicBool,
    /// Refused requests not yet in the audit log.
    pub failures: auth::Failures,
    /// Recent backup listings: `deployment → (when, its tenant, body)`.
    listings: Mutex<HashMap<String, (Instant, String, Value)>>,
}

/// How long a backup listing is served from memory. Operations this server
/// runs drop their deployment's entry when they finish, so their own
/// results show at once; backups taken elsewhere show within this.
const LISTING_TTL: Duration = Duration::from_millis(1000);

impl State {
    /// A fresh cached listing the caller may see.
    fn cached_listing(&self, deployment: &str, who: &Option<Identity>) -> Option<Value> {
        let g = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let (at, tenant, body) = g.get(deployment)?;
        let visible = who.as_ref().is_none_or(|w| w.sees_tenant(tenant));
        (at.elapsed() < LISTING_TTL && visible).then(|| body.clone())
    }

    /// The tenant of a deployment whose listing is cached and fresh.
    fn cached_tenant(&self, deployment: &str) -> Option<String> {
        let g = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let (at, tenant, _) = g.get(deployment)?;
        (at.elapsed() < LISTING_TTL).then(|| tenant.clone())
    }

    fn remember_listing(&self, deployment: &str, tenant: &str, body: &Value) {
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                deployment.to_string(),
                (Instant::now(), tenant.to_string(), body.clone()),
            );
    }

    pub fn forget_listing(&self, deployment: &str) {
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(deployment);
    }

    /// Runs an operation on its own thread of normal priority; resolves to
    /// its result.
    pub fn launch<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let _ = self.launcher.tx.send(job);
        rx
    }

    /// Counts a refused request (`denied`: authenticated, not allowed) and,
    /// at most once a minute, writes the counts to the audit log before the
    /// refusal is answered (the wait is once a minute, so a flood gains
    /// nothing from it).
    pub async fn refused(&self, denied: bool, route: &str) {
        self.metrics.auth_refused(denied);
        let Some(subject) = self.failures.record(denied, route) else {
            return;
        };
        let repo = self.repo.clone();
        let code = match denied {
            true => pg_hardstorage_engine::Code::AuthzDenied,
            false => pg_hardstorage_engine::Code::AuthTokenRequired,
        };
        let _ = routes::blocking(move || {
            let why = Problem::new(
                code,
                "requests refused since the last record (counts in the subject)",
            );
            pg_hardstorage_repo::audit::append(&repo, "server", "auth.refused", subject, Err(&why))
        })
        .await;
    }

    /// Adds the webhooks and the metrics counter to an operation's bus;
    /// returns, per webhook, the counter of events this operation lost.
    pub fn attach_sinks(&self, bus: &EventBus) -> Vec<(String, Arc<AtomicU64>)> {
        bus.add_sink(self.metrics.sink());
        self.webhooks
            .iter()
            .map(|w| {
                let sink = w.sink();
                let counter = sink.dropped_here.clone();
                bus.add_sink(sink);
                (w.target.label(), counter)
            })
            .collect()
    }

    /// `/v1/readyz`: the repository answers and the key opens its objects.
    pub(crate) fn ready(&self) -> Result<Value, Problem> {
        let t0 = Instant::now();
        let config = self.repo.store.head("config")?.is_some();
        if !config {
            return Err(Problem::new(
                Code::StorageUnreachable,
                "the repository's config object is missing",
            ));
        }
        // Token records are sealed: listing them proves the key works.
        self.tokens.get(&self.repo)?;
        Ok(json!({
            "ready": true,
            "repository": "reachable",
            "key": "ok",
            "checked_in_ms": t0.elapsed().as_millis() as u64,
        }))
    }

    /// A deployment's backups: a listing plus cached summaries, so a busy
    /// dashboard costs one LIST per request, not one manifest read per backup.
    pub(crate) fn backups_list(&self, deployment: &str) -> Result<Value, Problem> {
        pg_hardstorage_repo::deployment::validate_name(deployment)?;
        let prefix = format!("snapshots/{deployment}/");
        let mut out = Vec::new();
        for o in self.repo.store.list(&prefix)? {
            let cached = self
                .summaries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&o.key)
                .cloned();
            let s = match cached {
                Some(s) => s,
                None => {
                    let id = o.key.trim_start_matches(&prefix);
                    let m =
                        pg_hardstorage_repo::catalog::load_manifest(&self.repo, deployment, id)?;
                    let s = BackupSummary::of(&m);
                    self.summaries
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(o.key.clone(), s.clone());
                    s
                }
            };
            out.push(s);
        }
        let lc = pg_hardstorage_repo::catalog::Lifecycle::of(&self.repo, deployment)?;
        out.retain(|s| !lc.tombstoned.contains(&s.backup_id));
        for s in &mut out {
            s.held = lc.held(&s.backup_id);
        }
        out.sort_by(|a, b| (&a.finished_at, &a.backup_id).cmp(&(&b.finished_at, &b.backup_id)));
        serde_json::to_value(out).map_err(|e| Problem::internal(e.to_string()))
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(
    st: Arc<State>,
    client_cn: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let (route_label, resp) = match routes::find(&method, &path) {
        Found::None => (
            "unmatched",
            error(
                &Problem::new(Code::ApiRouteNotFound, format!("no route {path}"))
                    .suggest("The routes are listed in /v1/openapi.yaml", None),
            ),
        ),
        Found::WrongMethod(allowed) => {
            let mut r = error(&Problem::new(
                Code::ApiMethodNotAllowed,
                format!(
                    "{path} does not take {method}; it takes {}",
                    allowed.join(", ")
                ),
            ));
            if let Ok(v) = allowed.join(", ").parse() {
                r.headers_mut().insert("allow", v);
            }
            ("unmatched", r)
        }
        Found::Route(route, params) => (
            route.path,
            serve_route(&st, client_cn, req, route, params).await,
        ),
    };
    st.metrics
        .http_request(route_label, &method, resp.status().as_u16());
    Ok(resp)
}

async fn serve_route(
    st: &Arc<State>,
    client_cn: Option<String>,
    req: Request<Incoming>,
    route: &'static routes::Route,
    params: routes::Params,
) -> Response<Body> {
    if route.access != Access::Open && st.shredded.load(std::sync::atomic::Ordering::SeqCst) {
        // (No store access here: this is an async thread.)
        return error(&pg_hardstorage_repo::kms::destroyed(b"{}"));
    }
    let who: Option<Identity> = match route.access {
        Access::Open => None,
        _ => {
            let authz = header(&req, "authorization").map(str::to_string);
            let st2 = st.clone();
            let tokens = routes::blocking(move || st2.tokens.get(&st2.repo)).await;
            let tokens = match tokens {
                Ok(t) => t,
                Err(p) => return error(&p),
            };
            let mut who = auth::authenticate(&tokens, authz.as_deref(), client_cn.as_deref());
            if let (Err(_), Some(presented)) = (&who, authz.clone()) {
                let st2 = st.clone();
                let presented = auth::bearer(&presented).unwrap_or_default().to_string();
                if let Ok(fresh) =
                    routes::blocking(move || st2.tokens.learn(&st2.repo, &presented)).await
                {
                    who = auth::authenticate(&fresh, authz.as_deref(), client_cn.as_deref());
                }
            }
            match who {
                Ok(i) => Some(i),
                Err(p) => {
                    st.refused(false, route.path).await;
                    let mut r = error(&p);
                    if let Ok(v) = "Bearer realm=\"pg_hardstorage\"".parse() {
                        r.headers_mut().insert("www-authenticate", v);
                    }
                    return r;
                }
            }
        }
    };
    if let (Access::Verb(v), Some(w)) = (route.access, &who) {
        if !w.grants(v) {
            st.refused(true, route.path).await;
            return error(&auth::denied(w, v));
        }
    }
    // Routes over the whole repository (its keys, its GC, every agent, the
    // metrics of every deployment) are for callers bound to no tenant.
    if let Err(p) = routes::scope_admits(route, who.as_ref()) {
        st.refused(true, route.path).await;
        return error(&p);
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let accept = header(&req, "accept").unwrap_or("").to_ascii_lowercase();
    let mode = if accept.contains("application/json") && !accept.contains("ndjson") {
        Mode::Json
    } else {
        Mode::Ndjson
    };
    let limited = http_body_util::Limited::new(req.into_body(), st.body_limit);
    let collected = match tokio::time::timeout(Duration::from_secs(60), limited.collect()).await {
        Ok(r) => r,
        Err(_) => {
            return error(&Problem::new(
                Code::ApiBadRequest,
                "the request body did not arrive within 60 s",
            ))
        }
    };
    let body: Bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let p = if too_large {
                Problem::new(
                    Code::ApiBodyTooLarge,
                    format!("request body over {} bytes", st.body_limit),
                )
            } else {
                Problem::new(
                    Code::ApiBadRequest,
                    format!("reading the request body: {e}"),
                )
            };
            return error(&p);
        }
    };
    let ctx = routes::Ctx::new(st.clone(), route, params, query, who, body, mode);
    routes::dispatch(ctx).await
}

/// Bytes of a request's line and headers the server buffers: more is
/// answered 431 (hyper's default, about 400 KiB, let an unauthenticated
/// client make the server hold that much per connection).
pub const MAX_HEAD_BYTES: usize = 32 << 10;

/// HTTP/1.1 with a deadline for request headers (a client that trickles
/// them does not hold a connection forever) and a bound on their size.
fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(MAX_HEAD_BYTES);
    b
}

/// A bound server, ready to run.
pub struct Server {
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    grace: Duration,
    wal_streams: Vec<String>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Server {
    /// Binds the address (port 0 picks a free one) inside `rt`.
    pub fn bind(rt: &tokio::runtime::Runtime, cfg: ServerConfig) -> Result<Server, Problem> {
        let tls = match &cfg.tls {
            Some(f) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(f)?)),
            None => None,
        };
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(cfg.listen))
            .map_err(|e| {
                Problem::new(
                    Code::UsageInvalidArgument,
                    format!("cannot listen on {}: {e}", cfg.listen),
                )
                .suggest("Pick a free address, e.g. --listen 127.0.0.1:8432", None)
            })?;
        Ok(Server {
            listener,
            tls,
            state: Arc::new(State {
                repo: cfg.repo,
                tokens: TokenCache::new(Duration::from_secs(2)),
                restore_command: cfg.restore_command,
                metrics: metrics::Metrics::new(cfg.webhooks.clone()),
                webhooks: cfg.webhooks,
                body_limit: cfg.body_limit,
                summaries: Mutex::new(HashMap::new()),
                launcher: Launcher::start(),
                listings: Mutex::new(HashMap::new()),
                shredded: std::sync::atomic::AtomicBool::new(false),
                failures: auth::Failures::default(),
                kms_dir: cfg.kms_dir,
                operations: Arc::new(tokio::sync::Semaphore::new(match cfg.max_operations {
                    0 => default_max_operations(),
                    n => n,
                })),
            }),
            grace: cfg.shutdown_grace,
            wal_streams: cfg.wal_streams,
            slots: Arc::new(tokio::sync::Semaphore::new(match cfg.max_connections {
                0 => default_max_connections(),
                n => n,
            })),
        })
    }

    /// The shared state. Hold a clone until the runtime is gone: the
    /// repository's store owns a runtime of its own, which must not be
    /// dropped from inside an async context.
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Problem> {
        self.listener
            .local_addr()
            .map_err(|e| Problem::internal(format!("local_addr: {e}")))
    }

    /// Serves until `shutdown` resolves, then lets running requests and
    /// streams finish for up to the grace period.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        // WAL streamers: operations like any other, stopped at shutdown.
        let stop_wal = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let streamers: Vec<_> = self
            .wal_streams
            .iter()
            .map(|d| {
                let (st, d, stop) = (self.state.clone(), d.clone(), stop_wal.clone());
                self.state.launch(move || {
                    let bus = EventBus::new();
                    st.attach_sinks(&bus);
                    let r = pg_hardstorage_repo::wal::stream(&st.repo, &d, &bus, &|| {
                        stop.load(std::sync::atomic::Ordering::Relaxed)
                    });
                    if let Err(p) = &r {
                        bus.publish(pg_hardstorage_engine::event::Event::failure(
                            "wal_stream_failed",
                            p,
                        ));
                    }
                    bus.close();
                    r
                })
            })
            .collect();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        loop {
            let (stream, _) = tokio::select! {
                a = self.listener.accept() => match a {
                    Ok(x) => x,
                    Err(_) => {
                        // Out of descriptors (EMFILE) or memory: accepting
                        // again at once would spin a core.
                        backoff.wait().await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            backoff = Backoff::default();
            let _ = stream.set_nodelay(true);
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.state.metrics.connection_refused();
                tokio::spawn(refuse_busy(stream, self.tls.is_some()));
                continue;
            };
            let st = self.state.clone();
            match &self.tls {
                None => {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), None, req));
                    let conn = http1().serve_connection(TokioIo::new(stream), svc);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                        drop(slot);
                    });
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        let _slot = slot;
                        // A refused client certificate ends here: no request is served.
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                                .await
                        else {
                            return;
                        };
                        let cn = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| tls::common_name(c));
                        let svc = hyper::service::service_fn(move |req| {
                            handle(st.clone(), cn.clone(), req)
                        });
                        let conn = http1().serve_connection(TokioIo::new(tls), svc);
                        let _ = watcher.watch(conn).await;
                    });
                }
            }
        }
        stop_wal.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(self.grace, async {
            graceful.shutdown().await;
            for s in streamers {
                let _ = s.await;
            }
        })
        .await;
    }
}

/// `api.busy`: the server runs as many `what` as `serve FLAG` allows.
pub(crate) fn busy(what: &str, flag: &str) -> Problem {
    Problem::new(
        Code::ApiBusy,
        format!("the server is running as many {what} as it allows"),
    )
    .suggest(format!("Retry later, or raise serve {flag}"), None)
}

/// The pause after a failed `accept`: 10 ms, doubling to 1 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    async fn wait(&mut self) {
        let ms = 10u64 << self.0.min(7);
        self.0 += 1;
        tokio::time::sleep(Duration::from_millis(ms.min(1000))).await;
    }
}

/// A connection over the cap: answered 503 `api.busy` with `Retry-After`
/// at once, without reading its request, and closed (over TLS, closed:
/// a handshake is the cost the cap avoids).
async fn refuse_busy(mut stream: tokio::net::TcpStream, tls: bool) {
    use tokio::io::AsyncWriteExt;
    if tls {
        return;
    }
    let p = busy("connections", "--max-connections");
    let mut body =
        serde_json::to_vec(&pg_hardstorage_engine::event::error_envelope(&p)).unwrap_or_default();
    body.push(b'\n');
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        use tokio::io::AsyncReadExt;
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Take what the client sent before closing, so the close is not a
        // reset that could discard the answer on its side.
        let mut sink = [0u8; 4096];
        let mut left = 64usize << 10;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

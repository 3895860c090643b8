//! The route table of `pg_hardstorage.v1` and its router. Each route names
//! its handler (one file per resource) and its scope; the router resolves
//! who may see what once, before any handler runs: credentials and verb
//! (`lib.rs::serve_route`), then the scope — a repository-wide route is
//! refused to tenant-bound callers, a per-deployment route gets a
//! deployment the caller's tenant may see (else the same 404 a missing one
//! gives), a per-backup route a backup of that deployment. Every handler
//! calls the same `pg_hardstorage_repo::ops` function the CLI calls; none
//! reimplements one.

use pg_hardstorage_engine::Code;
mod audit;
mod backups;
mod deployments;
mod health;
mod kms;
mod repos;
mod restores;
mod wal;

pub use backups::{DeleteBackup, PlaceHold, TakeBackup, MAX_QUEUE_BYTES};
pub use deployments::{CreateDeployment, UpdateDeployment};
pub use kms::{RotateKek, ShredKeys};
pub use restores::StartRestore;

use crate::auth::Identity;
use crate::body::{Body, ChannelWriter};
use crate::State;
use bytes::Bytes;
use hyper::Response;
use pg_hardstorage_engine::event::{envelope, error_envelope, Event, EventBus, NdjsonSink};
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::{catalog, deployment};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Who may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials needed (`/v1/healthz`, `/v1/readyz`).
    Open,
    /// Any authenticated caller.
    Authenticated,
    /// Callers granted this RBAC verb (or `admin:*`).
    Verb(&'static str),
}

/// What a route acts on, which decides what the router checks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Nothing of the repository's (health, the API document).
    Open,
    /// The whole repository (its keys, GC, every agent, all metrics):
    /// refused to callers bound to a tenant; a `{r}` parameter must name
    /// the repository this server serves.
    Repository,
    /// Several deployments: the handler filters by [`Ctx::tenant`].
    Tenant,
    /// One deployment, named by this path parameter, that the caller's
    /// tenant may see.
    Deployment(&'static str),
    /// One backup (`{id}`) of one deployment (`{d}`) the caller may see.
    Backup,
}

/// What a handler returns: a response, or the problem the router answers.
pub type Reply = Pin<Box<dyn Future<Output = Result<Response<Body>, Problem>> + Send>>;
pub type Handler = fn(Ctx) -> Reply;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    DeploymentsList,
    DeploymentsCreate,
    DeploymentsShow,
    DeploymentsUpdate,
    DeploymentsDelete,
    BackupsList,
    BackupsTake,
    BackupsShow,
    BackupsVerify,
    BackupsDelete,
    BackupsHold,
    BackupsRelease,
    RestoresInitiate,
    RestoresStatus,
    WalList,
    WalFetch,
    WalRepair,
    AuditSearch,
    AuditVerifyChain,
    ReposShow,
    ReposCheck,
    ReposUsage,
    ReposGc,
    ReposScrub,
    Doctor,
    KmsInspect,
    KmsRotate,
    KmsShred,
    AgentsList,
    Search,
}

pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub command: &'static str,
    pub access: Access,
    /// What the route is (its OpenAPI shapes are chosen by it).
    pub op: Op,
    pub scope: Scope,
    pub handler: Handler,
}

const fn r(
    method: &'static str,
    path: &'static str,
    command: &'static str,
    access: Access,
    op: Op,
    scope: Scope,
    handler: Handler,
) -> Route {
    Route {
        method,
        path,
        command,
        access,
        op,
        scope,
        handler,
    }
}

use Access::{Authenticated, Open, Verb};

const READ: Access = Verb("backup:read");
const CREATE: Access = Verb("backup:create");
const RESTORE: Access = Verb("restore:execute");
const ADMIN: Access = Verb("admin:*");
const DEPLOYMENT: Scope = Scope::Deployment("d");
const BACKUP: Scope = Scope::Backup;
const REPOSITORY: Scope = Scope::Repository;
const TENANT: Scope = Scope::Tenant;

#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    r("GET", "/v1/healthz", "health.live", Open, Op::Healthz, Scope::Open, health::live),
    r("GET", "/v1/readyz", "health.ready", Open, Op::Readyz, Scope::Open, health::ready),
    r("GET", "/metrics", "metrics", READ, Op::Metrics, REPOSITORY, health::metrics),
    r("GET", "/v1/openapi.yaml", "openapi", Authenticated, Op::OpenApi, Scope::Open, health::openapi),
    r("GET", "/v1/deployments", "deployments.list", READ, Op::DeploymentsList, TENANT, deployments::list),
    r("POST", "/v1/deployments", "deployments.create", ADMIN, Op::DeploymentsCreate, TENANT, deployments::create),
    r("GET", "/v1/deployments/{d}", "deployments.show", READ, Op::DeploymentsShow, DEPLOYMENT, deployments::show),
    r("PATCH", "/v1/deployments/{d}", "deployments.update", ADMIN, Op::DeploymentsUpdate, DEPLOYMENT, deployments::update),
    r("DELETE", "/v1/deployments/{d}", "deployments.delete", ADMIN, Op::DeploymentsDelete, DEPLOYMENT, deployments::delete),
    r("GET", "/v1/deployments/{d}/health", "deployments.health", READ, Op::Doctor, DEPLOYMENT, health::doctor),
    r("GET", "/v1/deployments/{d}/backups", "backups.list", READ, Op::BackupsList, DEPLOYMENT, backups::list),
    r("POST", "/v1/deployments/{d}/backups", "backups.take", CREATE, Op::BackupsTake, DEPLOYMENT, backups::take),
    r("GET", "/v1/deployments/{d}/backups/{id}", "backups.show", READ, Op::BackupsShow, BACKUP, backups::show),
    r("DELETE", "/v1/deployments/{d}/backups/{id}", "backups.delete", ADMIN, Op::BackupsDelete, BACKUP, backups::delete),
    r("POST", "/v1/deployments/{d}/backups/{id}/verify", "backups.verify", READ, Op::BackupsVerify, BACKUP, backups::verify),
    r("POST", "/v1/deployments/{d}/backups/{id}/hold", "backups.hold", ADMIN, Op::BackupsHold, BACKUP, backups::hold),
    r("DELETE", "/v1/deployments/{d}/backups/{id}/hold", "backups.release", ADMIN, Op::BackupsRelease, BACKUP, backups::release),
    r("POST", "/v1/deployments/{d}/restores", "restores.initiate", RESTORE, Op::RestoresInitiate, DEPLOYMENT, restores::initiate),
    r("GET", "/v1/deployments/{d}/restores/{id}", "restores.status", READ, Op::RestoresStatus, DEPLOYMENT, restores::status),
    r("GET", "/v1/deployments/{d}/wal", "wal.list", READ, Op::WalList, DEPLOYMENT, wal::list),
    r("POST", "/v1/deployments/{d}/wal/{seg}/fetch", "wal.fetch", RESTORE, Op::WalFetch, DEPLOYMENT, wal::fetch),
    r("POST", "/v1/deployments/{d}/wal/repair", "wal.repair", ADMIN, Op::WalRepair, DEPLOYMENT, wal::repair),
    r("GET", "/v1/repos/{r}", "repos.show", ADMIN, Op::ReposShow, REPOSITORY, repos::show),
    r("POST", "/v1/repos/{r}/check", "repos.check", ADMIN, Op::ReposCheck, REPOSITORY, repos::check),
    r("POST", "/v1/repos/{r}/gc", "repos.gc", ADMIN, Op::ReposGc, REPOSITORY, repos::gc),
    r("GET", "/v1/repos/{r}/usage", "repos.usage", ADMIN, Op::ReposUsage, REPOSITORY, repos::usage),
    r("POST", "/v1/repos/{r}/scrub", "repos.scrub", ADMIN, Op::ReposScrub, REPOSITORY, repos::scrub),
    r("POST", "/v1/kms/rotate", "kms.rotate", Verb("kms:rotate"), Op::KmsRotate, REPOSITORY, kms::rotate),
    r("POST", "/v1/kms/shred", "kms.shred", Verb("kms:shred"), Op::KmsShred, REPOSITORY, kms::shred),
    r("GET", "/v1/kms/inspect", "kms.inspect", ADMIN, Op::KmsInspect, REPOSITORY, kms::inspect),
    r("GET", "/v1/audit", "audit.search", Verb("audit:read"), Op::AuditSearch, TENANT, audit::search),
    r("POST", "/v1/audit/verify-chain", "audit.verify_chain", Verb("audit:read"), Op::AuditVerifyChain, TENANT, audit::verify_chain),
    r("GET", "/v1/doctor", "doctor.report", READ, Op::Doctor, TENANT, health::doctor),
    r("GET", "/v1/doctor/{deployment}", "doctor.deployment", READ, Op::Doctor, Scope::Deployment("deployment"), health::doctor),
    r("GET", "/v1/agents", "agents.list", ADMIN, Op::AgentsList, REPOSITORY, repos::agents),
    r("GET", "/v1/search", "search", READ, Op::Search, TENANT, backups::search),
];

pub type Params = Vec<(&'static str, String)>;

pub enum Found {
    Route(&'static Route, Params),
    /// The path exists with other methods.
    WrongMethod(Vec<&'static str>),
    None,
}

fn matches(pattern: &'static str, path: &str) -> Option<Params> {
    let (mut p, mut s) = (pattern.split('/'), path.split('/'));
    let mut out = Vec::new();
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(out),
            (Some(pp), Some(ss)) => {
                if let Some(name) = pp.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                    if ss.is_empty() {
                        return None;
                    }
                    out.push((name, ss.to_string()));
                } else if pp != ss {
                    return None;
                }
            }
            _ => return None,
        }
    }
}

pub fn find(method: &str, path: &str) -> Found {
    let mut methods = Vec::new();
    for r in ROUTES {
        if let Some(params) = matches(r.path, path) {
            if r.method == method {
                return Found::Route(r, params);
            }
            methods.push(r.method);
        }
    }
    if methods.is_empty() {
        Found::None
    } else {
        Found::WrongMethod(methods)
    }
}

fn param(params: &Params, name: &str) -> String {
    params
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.clone())
        .unwrap_or_default()
}

// ------------------------------------------------------------ the router

/// One request, authenticated and authorised, on its way to its handler.
pub struct Ctx {
    pub st: Arc<State>,
    pub route: &'static Route,
    params: Params,
    query: String,
    pub who: Option<Identity>,
    body: Bytes,
    pub mode: Mode,
    /// The tenant of the route's deployment, once the router resolved it.
    owner: Option<String>,
}

impl Ctx {
    pub fn new(
        st: Arc<State>,
        route: &'static Route,
        params: Params,
        query: String,
        who: Option<Identity>,
        body: Bytes,
        mode: Mode,
    ) -> Self {
        Ctx {
            st,
            route,
            params,
            query,
            who,
            body,
            mode,
            owner: None,
        }
    }

    pub fn command(&self) -> &'static str {
        self.route.command
    }

    pub fn param(&self, name: &str) -> String {
        param(&self.params, name)
    }

    /// The deployment of a per-deployment or per-backup route (resolved and
    /// visible to the caller); empty on other routes.
    pub fn deployment(&self) -> String {
        match self.route.scope {
            Scope::Deployment(p) => self.param(p),
            Scope::Backup => self.param("d"),
            _ => String::new(),
        }
    }

    /// The tenant that owns [`Ctx::deployment`].
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The caller's tenant; `None`: every tenant.
    pub fn tenant(&self) -> Option<String> {
        self.who.as_ref().and_then(|w| w.token.tenant.clone())
    }

    /// How the audit log and lifecycle records name the caller.
    pub fn actor(&self) -> String {
        self.who
            .as_ref()
            .map(|w| format!("{}:{}", w.via, w.name))
            .unwrap_or_else(|| "anonymous".into())
    }

    /// The JSON body as the route's request type.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        parse(&self.body)
    }

    /// The query string as the route's query type (unknown or repeated
    /// parameters are refused).
    pub fn query<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        typed_query(&self.query)
    }

    pub fn ok(&self, body: Value) -> Result<Response<Body>, Problem> {
        Ok(ok(self.command(), body))
    }

    /// Runs `work` off the async threads and answers its value in the
    /// route's envelope: what most handlers do once they have parsed.
    pub async fn answer(
        &self,
        work: impl FnOnce(&State) -> Result<Value, Problem> + Send + 'static,
    ) -> Result<Response<Body>, Problem> {
        let st = self.st.clone();
        let body = blocking(move || work(&st)).await?;
        self.ok(body)
    }
}

/// A 200 response of `content_type` (metrics, the API document, WAL bytes).
pub fn plain(content_type: &'static str, body: Body) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::full("")))
}

/// Resolves the route's scope, then runs its handler.
pub async fn dispatch(mut c: Ctx) -> Response<Body> {
    let r = match resolve(&c).await {
        Ok(owner) => {
            c.owner = owner;
            (c.route.handler)(c).await
        }
        Err(p) => Err(p),
    };
    r.unwrap_or_else(|p| error(&p))
}

/// Refuses a repository-wide route to a caller bound to a tenant.
pub fn scope_admits(route: &Route, who: Option<&Identity>) -> Result<(), Problem> {
    let (Scope::Repository, Some(w)) = (route.scope, who) else {
        return Ok(());
    };
    match &w.token.tenant {
        Some(t) => Err(Problem::new(
            Code::AuthzDenied,
            format!(
                "{} {} acts on the whole repository; {} {:?} is bound to tenant {t:?}",
                route.method, route.path, w.via, w.name
            ),
        )
        .suggest("Use a token created without --tenant", None)),
        None => Ok(()),
    }
}

/// What the scope needs before the handler: the deployment's tenant for a
/// per-deployment or per-backup route.
async fn resolve(c: &Ctx) -> Result<Option<String>, Problem> {
    match c.route.scope {
        Scope::Open | Scope::Tenant => Ok(None),
        Scope::Repository => this_repository(c).map(|()| None),
        Scope::Deployment(_) => visible(c).await.map(Some),
        Scope::Backup => {
            let owner = visible(c).await?;
            backup_of(&c.deployment(), &c.param("id"))?;
            Ok(Some(owner))
        }
    }
}

/// A `{r}` parameter names the one repository this server serves.
fn this_repository(c: &Ctx) -> Result<(), Problem> {
    let Some((_, name)) = c.params.iter().find(|(n, _)| *n == "r") else {
        return Ok(());
    };
    let id = &c.st.repo.config.repo_id;
    if name == "default" || name == id {
        return Ok(());
    }
    Err(Problem::new(
        Code::RepoNotFound,
        format!("this server serves one repository, \"default\" (id {id}), not {name:?}"),
    ))
}

/// The tenant of the route's deployment if the caller may see it;
/// otherwise the not-found a missing one gives (existence is not leaked
/// across tenants). A fresh cached listing answers without the store.
async fn visible(c: &Ctx) -> Result<String, Problem> {
    let name = c.deployment();
    let tenant = match c.st.cached_tenant(&name) {
        Some(t) => t,
        None => {
            let (st, n) = (c.st.clone(), name.clone());
            blocking(move || deployment::get(&st.repo, &n).map(|d| d.tenant().to_string())).await?
        }
    };
    match &c.who {
        Some(w) if !w.sees_tenant(&tenant) => Err(Problem::new(
            Code::DeploymentNotFound,
            format!("no deployment named {name:?}"),
        )
        .with("deployment", name)),
        _ => Ok(tenant),
    }
}

fn backup_of(d: &str, id: &str) -> Result<(), Problem> {
    match catalog::deployment_of(id) {
        Ok(x) if x == d => Ok(()),
        _ => Err(Problem::new(
            Code::BackupNotFound,
            format!("deployment {d:?} has no backup {id:?}"),
        )
        .with("deployment", d)
        .with("backup_id", id)),
    }
}

// ------------------------------------------------------------ queries

/// Decodes `%XX` escapes and `+` of a query component.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The largest duration a query parameter may give (100 years), as the
/// OpenAPI document says.
const MAX_SECONDS: u64 = 3_153_600_000;

/// `a=1&b=2` → pairs, decoded.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// A query string as a typed query struct (`#[serde(deny_unknown_fields)]`,
/// every field a string or a [`Flag`] / [`Seconds`]).
fn typed_query<T: DeserializeOwned>(q: &str) -> Result<T, Problem> {
    let mut map = serde_json::Map::new();
    for (k, v) in query_pairs(q) {
        if map.insert(k.clone(), Value::String(v)).is_some() {
            return Err(Problem::new(
                Code::ApiBadRequest,
                format!("query parameter {k:?} is given twice"),
            ));
        }
    }
    serde_json::from_value(Value::Object(map)).map_err(|e| {
        Problem::new(Code::ApiBadRequest, format!("query: {e}"))
            .suggest("The routes' query parameters are in /v1/openapi.yaml", None)
    })
}

/// A `true`/`false` (or `1`/`0`) query parameter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> serde::Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "true" | "1" => Ok(Flag(true)),
            "false" | "0" => Ok(Flag(false)),
            _ => Err(serde::de::Error::custom(format!(
                "{s:?}: want true or false"
            ))),
        }
    }
}

/// A duration in whole seconds, 0 to [`MAX_SECONDS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seconds(pub std::time::Duration);

impl<'de> serde::Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<u64>()
            .ok()
            .filter(|n| *n <= MAX_SECONDS)
            .map(|n| Seconds(std::time::Duration::from_secs(n)))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{s:?}: want an integer from 0 to {MAX_SECONDS}"))
            })
    }
}

// ------------------------------------------------------------ responses

pub fn json_response(status: u16, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::full(body))
        .unwrap_or_else(|_| Response::new(Body::full("")))
}

pub fn ok(command: &str, body: Value) -> Response<Body> {
    json_response(200, &envelope(command, body))
}

pub fn error(p: &Problem) -> Response<Body> {
    json_response(p.http_status(), &error_envelope(p))
}

/// Runs blocking library work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Problem::internal(format!("task failed: {e}"))))
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    let raw: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(raw).map_err(|e| {
        Problem::new(Code::ApiBadRequest, format!("request body: {e}")).suggest(
            "Send a JSON object with the fields this route documents (see /v1/openapi.yaml)",
            None,
        )
    })
}

/// How a streaming route answers: NDJSON as work proceeds (the default,
/// as the contract says), or, when the client sends `Accept:
/// application/json`, one envelope at the end with the status code of the
/// outcome (so a verify failure is a 422 rather than a 200 stream ending
/// in an error frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ndjson,
    Json,
}

/// A sink that had to drop events (a slow webhook) says so in the
/// operation's own stream, after the work and before the stream ends.
fn report_drops(bus: &EventBus, drops: &[(String, Arc<std::sync::atomic::AtomicU64>)]) {
    // The webhook sinks run on their own threads: count only once they
    // have seen every event of the operation.
    bus.settle("webhook", std::time::Duration::from_secs(5));
    for (sink, n) in drops {
        let n = n.load(std::sync::atomic::Ordering::Relaxed);
        if n > 0 {
            bus.publish(
                Event::new(pg_hardstorage_engine::Severity::Warning, "sink_dropped")
                    .body(json!({"sink": sink, "dropped": n, "reason": "queue full: the receiver is slow or down"})),
            );
        }
    }
}

/// A `sink_dropped` warning (to metrics and webhooks) when the client of
/// the stream stopped reading and was abandoned.
fn report_abandoned(bus: &EventBus, state: &std::sync::Mutex<crate::body::StreamState>) {
    let _ = bus.settle("ndjson", std::time::Duration::from_secs(5));
    let s = *state.lock().unwrap_or_else(|e| e.into_inner());
    if s.abandoned {
        bus.publish(
            Event::new(pg_hardstorage_engine::Severity::Warning, "sink_dropped").body(json!({
                "sink": "ndjson",
                "dropped": s.dropped,
                "reason": "the client stopped reading: the stream was abandoned, the operation ran on",
            })),
        );
    }
}

/// Runs `work` with a bus whose events stream to the client as NDJSON.
fn stream(
    st: &Arc<State>,
    command: &'static str,
    mode: Mode,
    work: impl FnOnce(&EventBus) -> Result<Value, Problem> + Send + 'static,
) -> impl std::future::Future<Output = Response<Body>> {
    let st = st.clone();
    async move {
        // One slot per operation: past the server's limit a request is
        // refused at once rather than queued behind the running ones.
        let Ok(slot) = st.operations.clone().try_acquire_owned() else {
            let mut r = error(&crate::busy("operations", "--max-operations"));
            r.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("5"));
            return r;
        };
        let bus = EventBus::new();
        let drops = st.attach_sinks(&bus);
        if mode == Mode::Json {
            let r = st
                .launch(move || {
                    let _slot = slot;
                    let r = work(&bus);
                    report_drops(&bus, &drops);
                    bus.close();
                    r
                })
                .await
                .unwrap_or_else(|_| Err(Problem::internal("operation thread ended")));
            return match r {
                Ok(body) => ok(command, body),
                Err(p) => error(&p),
            };
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
        let writer = ChannelWriter::new(tx.clone());
        let state = writer.state.clone();
        bus.add_sink(NdjsonSink::new(writer));
        drop(st.launch(move || {
            let _slot = slot;
            let r = work(&bus);
            report_drops(&bus, &drops);
            report_abandoned(&bus, &state);
            bus.close();
            if let Err(p) = r {
                let s = *state.lock().unwrap_or_else(|e| e.into_inner());
                // Ended without its error frame: add one (no trailing newline).
                if !s.wrote || s.ended_with_newline {
                    let line = Event::failure(format!("{}_failed", command.replace('.', "_")), &p)
                        .to_line();
                    ChannelWriter::send(&tx, &state, Bytes::from(line));
                }
            }
        }));
        Response::builder()
            .status(200)
            .header("content-type", "application/x-ndjson")
            .body(Body::Stream(rx))
            .unwrap_or_else(|_| Response::new(Body::full("")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Q {
        apply: Option<Flag>,
        grace_seconds: Option<Seconds>,
        name: Option<String>,
    }

    #[test]
    fn a_query_is_read_into_its_type_and_anything_else_is_refused() {
        let q: Q = typed_query("apply=1&grace_seconds=60&name=a%20b").expect("query");
        assert_eq!(q.apply, Some(Flag(true)));
        assert_eq!(
            q.grace_seconds,
            Some(Seconds(std::time::Duration::from_secs(60)))
        );
        assert_eq!(q.name.as_deref(), Some("a b"));
        let none: Q = typed_query("").expect("empty");
        assert!(none.apply.is_none() && none.grace_seconds.is_none());
        for bad in [
            "colour=red",
            "apply=maybe",
            "grace_seconds=-1",
            "grace_seconds=99999999999999999999",
            "grace_seconds=3153600001",
            "apply=true&apply=false",
        ] {
            let e = typed_query::<Q>(bad).expect_err(bad);
            assert_eq!(e.code, "api.bad_request", "{bad}: {e}");
        }
    }
}

//! The route table of `pg_hardstorage.v1` and one handler per route. Every
//! handler calls the same `pg_hardstorage_repo::ops` function the CLI
//! calls; none reimplements one.

use crate::auth::Identity;
use crate::body::{Body, ChannelWriter};
use crate::State;
use bytes::Bytes;
use hyper::Response;
use pg_hardstorage_engine::event::{envelope, error_envelope, Event, EventBus, NdjsonSink};
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::backup::BackupOptions;
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_repo::{catalog, ops};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
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
    pub op: Op,
    /// Acts on or shows the whole repository: refused to tenant-bound callers.
    pub global: bool,
}

const fn r(
    method: &'static str,
    path: &'static str,
    command: &'static str,
    access: Access,
    op: Op,
) -> Route {
    let global = matches!(
        op,
        Op::Metrics
            | Op::ReposShow
            | Op::ReposCheck
            | Op::ReposUsage
            | Op::ReposGc
            | Op::ReposScrub
            | Op::KmsInspect
            | Op::KmsRotate
            | Op::KmsShred
            | Op::AgentsList
    );
    Route {
        method,
        path,
        command,
        access,
        op,
        global,
    }
}

use Access::{Authenticated, Open, Verb};

const READ: Access = Verb("backup:read");
const CREATE: Access = Verb("backup:create");
const RESTORE: Access = Verb("restore:execute");
const ADMIN: Access = Verb("admin:*");

pub const ROUTES: &[Route] = &[
    r("GET", "/v1/healthz", "health.live", Open, Op::Healthz),
    r("GET", "/v1/readyz", "health.ready", Open, Op::Readyz),
    r("GET", "/metrics", "metrics", READ, Op::Metrics),
    r(
        "GET",
        "/v1/openapi.yaml",
        "openapi",
        Authenticated,
        Op::OpenApi,
    ),
    r(
        "GET",
        "/v1/deployments",
        "deployments.list",
        READ,
        Op::DeploymentsList,
    ),
    r(
        "POST",
        "/v1/deployments",
        "deployments.create",
        ADMIN,
        Op::DeploymentsCreate,
    ),
    r(
        "GET",
        "/v1/deployments/{d}",
        "deployments.show",
        READ,
        Op::DeploymentsShow,
    ),
    r(
        "PATCH",
        "/v1/deployments/{d}",
        "deployments.update",
        ADMIN,
        Op::DeploymentsUpdate,
    ),
    r(
        "DELETE",
        "/v1/deployments/{d}",
        "deployments.delete",
        ADMIN,
        Op::DeploymentsDelete,
    ),
    r(
        "GET",
        "/v1/deployments/{d}/health",
        "deployments.health",
        READ,
        Op::Doctor,
    ),
    r(
        "GET",
        "/v1/deployments/{d}/backups",
        "backups.list",
        READ,
        Op::BackupsList,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/backups",
        "backups.take",
        CREATE,
        Op::BackupsTake,
    ),
    r(
        "GET",
        "/v1/deployments/{d}/backups/{id}",
        "backups.show",
        READ,
        Op::BackupsShow,
    ),
    r(
        "DELETE",
        "/v1/deployments/{d}/backups/{id}",
        "backups.delete",
        ADMIN,
        Op::BackupsDelete,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/backups/{id}/verify",
        "backups.verify",
        READ,
        Op::BackupsVerify,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/backups/{id}/hold",
        "backups.hold",
        ADMIN,
        Op::BackupsHold,
    ),
    r(
        "DELETE",
        "/v1/deployments/{d}/backups/{id}/hold",
        "backups.release",
        ADMIN,
        Op::BackupsRelease,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/restores",
        "restores.initiate",
        RESTORE,
        Op::RestoresInitiate,
    ),
    r(
        "GET",
        "/v1/deployments/{d}/restores/{id}",
        "restores.status",
        READ,
        Op::RestoresStatus,
    ),
    r(
        "GET",
        "/v1/deployments/{d}/wal",
        "wal.list",
        READ,
        Op::WalList,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/wal/{seg}/fetch",
        "wal.fetch",
        RESTORE,
        Op::WalFetch,
    ),
    r(
        "POST",
        "/v1/deployments/{d}/wal/repair",
        "wal.repair",
        ADMIN,
        Op::WalRepair,
    ),
    r("GET", "/v1/repos/{r}", "repos.show", ADMIN, Op::ReposShow),
    r(
        "POST",
        "/v1/repos/{r}/check",
        "repos.check",
        ADMIN,
        Op::ReposCheck,
    ),
    r("POST", "/v1/repos/{r}/gc", "repos.gc", ADMIN, Op::ReposGc),
    r(
        "GET",
        "/v1/repos/{r}/usage",
        "repos.usage",
        ADMIN,
        Op::ReposUsage,
    ),
    r(
        "POST",
        "/v1/repos/{r}/scrub",
        "repos.scrub",
        ADMIN,
        Op::ReposScrub,
    ),
    r(
        "POST",
        "/v1/kms/rotate",
        "kms.rotate",
        Verb("kms:rotate"),
        Op::KmsRotate,
    ),
    r(
        "POST",
        "/v1/kms/shred",
        "kms.shred",
        Verb("kms:shred"),
        Op::KmsShred,
    ),
    r(
        "GET",
        "/v1/kms/inspect",
        "kms.inspect",
        ADMIN,
        Op::KmsInspect,
    ),
    r(
        "GET",
        "/v1/audit",
        "audit.search",
        Verb("audit:read"),
        Op::AuditSearch,
    ),
    r(
        "POST",
        "/v1/audit/verify-chain",
        "audit.verify_chain",
        Verb("audit:read"),
        Op::AuditVerifyChain,
    ),
    r("GET", "/v1/doctor", "doctor.report", READ, Op::Doctor),
    r(
        "GET",
        "/v1/doctor/{deployment}",
        "doctor.deployment",
        READ,
        Op::Doctor,
    ),
    r("GET", "/v1/agents", "agents.list", ADMIN, Op::AgentsList),
    r("GET", "/v1/search", "search", READ, Op::Search),
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
        Problem::new("api.bad_request", format!("request body: {e}")).suggest(
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

// ------------------------------------------------------------ bodies

/// `POST /v1/deployments`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeployment {
    pub name: String,
    /// `postgres` (needs `pg`) or `path` (needs `path`); inferred when absent.
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub pg: Option<String>,
    #[serde(default)]
    pub pgdata: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// Defaults to the caller's tenant, else `default`.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// `PATCH /v1/deployments/{d}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDeployment {
    #[serde(default)]
    pub pg: Option<String>,
    #[serde(default)]
    pub pgdata: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
}

/// The most queue memory a backup over the API may ask for (its default
/// is 64 MiB).
pub const MAX_QUEUE_BYTES: u64 = 256 << 20;

/// `POST /v1/deployments/{d}/backups` (an empty body is fine).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TakeBackup {
    /// Worker threads (default and most: one per core).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Byte budget of the pipeline's queues (1 MiB to 256 MiB).
    #[serde(default)]
    pub queue_bytes: Option<u64>,
}

/// `DELETE /v1/deployments/{d}/backups/{id}` (the body is optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteBackup {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /v1/deployments/{d}/backups/{id}/hold` (the body is optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHold {
    #[serde(default)]
    pub reason: Option<String>,
    /// RFC 3339: after it the hold no longer blocks deletion.
    #[serde(default)]
    pub until: Option<String>,
}

/// `POST /v1/kms/rotate`: exactly one new KEK, a file name in the
/// server's `--kms-dir` (never a path elsewhere, never a command: rotating
/// to an external KMS command is done with the CLI on the host).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKek {
    #[serde(default)]
    pub new_key_file: Option<String>,
    #[serde(default)]
    pub new_passphrase_file: Option<String>,
}

/// `POST /v1/kms/shred`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShredKeys {
    /// The repository id: every backup becomes unrecoverable.
    pub confirm: String,
}

/// `POST /v1/deployments/{d}/restores`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRestore {
    /// A backup id or `latest` (the default).
    #[serde(default)]
    pub backup_id: Option<String>,
    /// Directory on the server's host.
    pub target: String,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub to_lsn: Option<String>,
    #[serde(default)]
    pub to_name: Option<String>,
    /// `auto` (default), `skip` or `require`.
    #[serde(default)]
    pub verify: Option<String>,
    #[serde(default)]
    pub force: Option<bool>,
    /// `OLD=NEW` directory mappings for tablespaces.
    #[serde(default)]
    pub tablespace_mapping: Option<Vec<String>>,
    /// Into an existing data directory of the same cluster: write only the
    /// files and pages that differ, remove what the backup does not have.
    #[serde(default)]
    pub delta: Option<bool>,
}

// ------------------------------------------------------------ handlers

/// The deployment, if the caller's tenant may see it; otherwise the same
/// not-found a missing one gives (existence is not leaked across tenants).
fn visible(st: &State, who: &Option<Identity>, name: &str) -> Result<Deployment, Problem> {
    let d = deployment::get(&st.repo, name)?;
    match who {
        Some(w) if !w.sees_tenant(d.tenant()) => Err(Problem::new(
            "deployment.not_found",
            format!("no deployment named {name:?}"),
        )
        .with("deployment", name)),
        _ => Ok(d),
    }
}

/// How the audit log and lifecycle records name the caller.
fn actor_of(who: &Option<Identity>) -> String {
    who.as_ref()
        .map(|w| format!("{}:{}", w.via, w.name))
        .unwrap_or_else(|| "anonymous".into())
}

fn backup_of(d: &str, id: &str) -> Result<(), Problem> {
    match catalog::deployment_of(id) {
        Ok(x) if x == d => Ok(()),
        _ => Err(Problem::new(
            "backup.not_found",
            format!("deployment {d:?} has no backup {id:?}"),
        )
        .with("deployment", d)
        .with("backup_id", id)),
    }
}

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

fn seconds(name: &str, v: &str) -> Result<std::time::Duration, Problem> {
    v.parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_SECONDS)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| {
            Problem::new(
                "api.bad_request",
                format!("{name}={v:?}: want an integer from 0 to {MAX_SECONDS}"),
            )
        })
}

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

#[allow(clippy::too_many_arguments)]
pub async fn dispatch(
    st: Arc<State>,
    route: &'static Route,
    params: Params,
    query: String,
    who: Option<Identity>,
    body: Bytes,
    mode: Mode,
) -> Response<Body> {
    let c = route.command;
    let d = param(&params, "d");
    let id = param(&params, "id");
    let st2 = st.clone();
    let who2 = who.clone();
    // Route-scoped checks that need the repository run off the async threads.
    let check = move || -> Result<(), Problem> {
        if !d.is_empty() {
            visible(&st2, &who2, &d)?;
        }
        Ok(())
    };
    let d = param(&params, "d");
    let r: Result<Response<Body>, Problem> = async {
        match route.op {
            Op::Healthz => Ok(ok(c, json!({"status": "ok"}))),
            Op::Readyz => {
                let st = st.clone();
                let body = blocking(move || st.ready()).await?;
                Ok(ok(c, body))
            }
            Op::Metrics => {
                let text = st.metrics.render();
                Ok(Response::builder()
                    .status(200)
                    .header("content-type", "text/plain; version=0.0.4")
                    .body(Body::full(text))
                    .unwrap_or_else(|_| Response::new(Body::full(""))))
            }
            Op::OpenApi => Ok(Response::builder()
                .status(200)
                .header("content-type", "application/yaml")
                .body(Body::full(crate::openapi::yaml()))
                .unwrap_or_else(|_| Response::new(Body::full("")))),
            Op::DeploymentsList => {
                let tenant = who.as_ref().and_then(|w| w.token.tenant.clone());
                let st = st.clone();
                let body =
                    blocking(move || ops::deployments_list(&st.repo, tenant.as_deref())).await?;
                Ok(ok(c, body))
            }
            Op::DeploymentsCreate => {
                let b: CreateDeployment = parse(&body)?;
                let caller_tenant = who.as_ref().and_then(|w| w.token.tenant.clone());
                let tenant = match (caller_tenant, b.tenant) {
                    (Some(t), Some(want)) if t != want => {
                        return Err(Problem::new(
                            "authz.denied",
                            format!("a token of tenant {t:?} cannot create deployments of {want:?}"),
                        ))
                    }
                    (Some(t), _) => Some(t),
                    (None, want) => want,
                };
                let kind = match b.kind.as_deref() {
                    Some("postgres") => Kind::Postgres,
                    Some("path") => Kind::Path,
                    None if b.path.is_some() => Kind::Path,
                    None => Kind::Postgres,
                    Some(k) => {
                        return Err(Problem::new(
                            "api.bad_request",
                            format!("kind {k:?}: want postgres or path"),
                        ))
                    }
                };
                let dep = Deployment {
                    name: b.name,
                    kind,
                    path: b.path,
                    pg: b.pg,
                    pgdata: b.pgdata,
                    created_at: pg_hardstorage_engine::event::now_rfc3339(),
                    system_identifier: None,
                    tenant,
                };
                let st = st.clone();
                let actor = actor_of(&who);
                let body = blocking(move || ops::deployments_create(&st.repo, &actor, dep)).await?;
                Ok(ok(c, body))
            }
            Op::DeploymentsShow => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    ops::deployments_show(&st.repo, &d)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::DeploymentsUpdate => {
                let b: UpdateDeployment = parse(&body)?;
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    ops::deployments_update(&st.repo, &actor_of(&who), &d, b.pg, b.pgdata, b.path)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::DeploymentsDelete => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    ops::deployments_delete(&st.repo, &actor_of(&who), &d)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::BackupsList => {
                // Dashboards poll this: served from memory when fresh.
                if let Some(body) = st.cached_listing(&d, &who) {
                    return Ok(ok(c, body));
                }
                let st = st.clone();
                let who = who.clone();
                let body = blocking(move || {
                    let dep = visible(&st, &who, &d)?;
                    let body = st.backups_list(&d)?;
                    st.remember_listing(&d, dep.tenant(), &body);
                    Ok(body)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::BackupsShow => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    backup_of(&d, &id)?;
                    ops::backups_show(&st.repo, &id)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::BackupsTake => {
                let b: TakeBackup = parse(&body)?;
                blocking(check).await?;
                let mut pipeline = pg_hardstorage_engine::pipeline::PipelineConfig::default();
                // What one caller may ask of the machine: no more workers
                // than cores, no more than MAX_QUEUE_BYTES of queues.
                if let Some(w) = b.workers {
                    pipeline.workers = w.clamp(1, pg_hardstorage_engine::pipeline::default_workers());
                }
                if let Some(q) = b.queue_bytes {
                    pipeline.queue_bytes = q.clamp(1 << 20, MAX_QUEUE_BYTES);
                }
                let opts = BackupOptions {
                    pipeline,
                    read_backend: None,
                };
                let st2 = st.clone();
                let actor = actor_of(&who);
                Ok(stream(&st, c, mode, move |bus| {
                    let r = ops::backups_take(&st2.repo, &actor, &d, bus, &opts);
                    st2.forget_listing(&d);
                    r
                })
                .await)
            }
            Op::BackupsVerify => {
                blocking(check).await?;
                backup_of(&d, &id)?;
                let repo = st.repo.clone();
                let threads = pg_hardstorage_engine::pipeline::default_workers();
                Ok(stream(&st, c, mode, move |bus| ops::backups_verify(&repo, &id, bus, threads)).await)
            }
            Op::BackupsDelete | Op::BackupsHold | Op::BackupsRelease => {
                let by = actor_of(&who);
                let op = route.op;
                let (reason, until) = match op {
                    Op::BackupsDelete => (parse::<DeleteBackup>(&body)?.reason, None),
                    Op::BackupsHold => {
                        let b: PlaceHold = parse(&body)?;
                        (b.reason, b.until)
                    }
                    _ => (None, None),
                };
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    backup_of(&d, &id)?;
                    let r = match op {
                        Op::BackupsDelete => ops::backups_delete(&st.repo, &id, &by, reason),
                        Op::BackupsHold => {
                            ops::backups_hold(&st.repo, &id, &by, reason, until.as_deref())
                        }
                        _ => ops::backups_release(&st.repo, &by, &id),
                    };
                    st.forget_listing(&d);
                    r
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::RestoresInitiate => {
                let b: StartRestore = parse(&body)?;
                let req = ops::RestoreRequest {
                    deployment: d.clone(),
                    backup: b.backup_id.unwrap_or_else(|| "latest".into()),
                    target: b.target.into(),
                    to: b.to,
                    to_lsn: b.to_lsn,
                    to_name: b.to_name,
                    verify: b.verify.unwrap_or_default(),
                    force: b.force.unwrap_or(false),
                    threads: pg_hardstorage_engine::pipeline::default_workers(),
                    tablespace_mapping: b.tablespace_mapping.unwrap_or_default(),
                    delta: b.delta.unwrap_or(false),
                    wal_prefetch: pg_hardstorage_repo::restore::DEFAULT_PREFETCH,
                };
                // Pre-flight before the stream starts: a refusal is a 412.
                let st2 = st.clone();
                let (m, opts) = blocking(move || {
                    check()?;
                    let rc = st2.restore_command.clone();
                    let dep = req.deployment.clone();
                    ops::restore_plan(&st2.repo, &req, &|| rc(&dep), &EventBus::new())
                })
                .await?;
                let repo = st.repo.clone();
                let actor = actor_of(&who);
                Ok(stream(&st, c, mode, move |bus| {
                    ops::restores_run(&repo, &actor, &m, &opts, bus)
                })
                .await)
            }
            Op::RestoresStatus => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    ops::restores_status(&st.repo, &d, &id)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::WalList => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    ops::wal_list(&st.repo, &d)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::WalFetch => {
                let seg = param(&params, "seg");
                let st = st.clone();
                let data = blocking(move || {
                    check()?;
                    pg_hardstorage_repo::wal::read(&st.repo, &d, &seg)
                })
                .await?;
                Ok(Response::builder()
                    .status(200)
                    .header("content-type", "application/octet-stream")
                    .body(Body::full(data))
                    .unwrap_or_else(|_| Response::new(Body::full(""))))
            }
            Op::WalRepair => {
                let st = st.clone();
                let body = blocking(move || {
                    check()?;
                    let bus = EventBus::new();
                    let drops = st.attach_sinks(&bus);
                    let r = ops::wal_repair(&st.repo, &actor_of(&who), &d, &bus);
                    report_drops(&bus, &drops);
                    bus.close();
                    r
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::ReposShow | Op::ReposCheck | Op::ReposUsage | Op::ReposGc | Op::ReposScrub => {
                let name = param(&params, "r");
                if name != "default" && name != st.repo.config.repo_id {
                    return Err(Problem::new(
                        "repo.not_found",
                        format!("this server serves one repository, \"default\" (id {}), not {name:?}", st.repo.config.repo_id),
                    ));
                }
                let (mut apply, mut grace) = (false, std::time::Duration::from_secs(6 * 3600));
                for (k, v) in query_pairs(&query) {
                    match (k.as_str(), route.op) {
                        ("apply", Op::ReposGc | Op::ReposScrub) => {
                            apply = match v.as_str() {
                                "true" | "1" => true,
                                "false" | "0" => false,
                                _ => return Err(Problem::new("api.bad_request", format!("apply={v:?}: want true or false"))),
                            }
                        }
                        ("grace_seconds", Op::ReposGc) => {
                            grace = seconds("grace_seconds", &v)?
                        }
                        (other, _) => {
                            return Err(Problem::new(
                                "api.bad_request",
                                format!("unknown query parameter {other:?}"),
                            ))
                        }
                    }
                }
                let actor = actor_of(&who);
                match route.op {
                    Op::ReposGc => {
                        let st2 = st.clone();
                        let opts = pg_hardstorage_repo::gc::GcOptions {
                            apply,
                            grace,
                            ..Default::default()
                        };
                        Ok(stream(&st, c, mode, move |bus| ops::repos_gc(&st2.repo, &actor, &opts, bus)).await)
                    }
                    Op::ReposScrub => {
                        let st2 = st.clone();
                        let threads = pg_hardstorage_engine::pipeline::default_workers();
                        Ok(stream(&st, c, mode, move |bus| ops::repos_scrub(&st2.repo, &actor, apply, bus, threads)).await)
                    }
                    op => {
                        let st = st.clone();
                        let body = blocking(move || match op {
                            Op::ReposShow => ops::repos_show(&st.repo),
                            Op::ReposCheck => ops::repos_check(&st.repo),
                            _ => ops::repos_usage(&st.repo),
                        })
                        .await?;
                        Ok(ok(c, body))
                    }
                }
            }
            Op::Doctor => {
                let dep = if route.path.ends_with("{deployment}") {
                    Some(param(&params, "deployment"))
                } else if d.is_empty() {
                    None
                } else {
                    Some(d.clone())
                };
                let mut opts = pg_hardstorage_repo::doctor::DoctorOptions::default();
                for (k, v) in query_pairs(&query) {
                    match k.as_str() {
                        "max_age_seconds" => {
                            opts.max_backup_age = seconds("max_age_seconds", &v)?
                        }
                        other => {
                            return Err(Problem::new(
                                "api.bad_request",
                                format!("unknown query parameter {other:?}"),
                            ))
                        }
                    }
                }
                let st = st.clone();
                let who = who.clone();
                let body = blocking(move || {
                    if let Some(dep) = &dep {
                        visible(&st, &who, dep)?;
                    }
                    let tenant = who.as_ref().and_then(|w| w.token.tenant.clone());
                    ops::doctor_for(&st.repo, dep.as_deref(), tenant.as_deref(), &opts)
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::KmsInspect | Op::KmsRotate | Op::KmsShred => {
                let actor = actor_of(&who);
                let op = route.op;
                let rotate: Option<RotateKek> = (op == Op::KmsRotate).then(|| parse(&body)).transpose()?;
                let shred: Option<ShredKeys> = (op == Op::KmsShred).then(|| parse(&body)).transpose()?;
                let st2 = st.clone();
                let body = blocking(move || match op {
                    Op::KmsInspect => ops::kms_inspect(&st2.repo),
                    Op::KmsRotate => {
                        let b = rotate.unwrap_or_default();
                        let dir = st2.kms_dir.clone().ok_or_else(|| {
                            Problem::new(
                                "api.bad_request",
                                "this server takes no new key material over the API",
                            )
                            .suggest(
                                "Start it with --kms-dir DIR and put the new key or passphrase file there, or rotate with the CLI on the host",
                                Some("pg_hardstorage kms rotate --new-key-file FILE".into()),
                            )
                        })?;
                        let in_dir = |name: &str| {
                            let plain = !name.is_empty()
                                && !name.contains('/')
                                && name != "."
                                && name != "..";
                            plain.then(|| dir.join(name)).ok_or_else(|| {
                                Problem::new(
                                    "api.bad_request",
                                    format!("{name:?} is not a file name in the server's --kms-dir"),
                                )
                            })
                        };
                        let new = match (b.new_key_file, b.new_passphrase_file) {
                            (Some(k), None) => pg_hardstorage_repo::KeySource::KeyFile(in_dir(&k)?),
                            (None, Some(p)) => {
                                pg_hardstorage_repo::KeySource::from_env(None, Some(in_dir(&p)?))?
                            }
                            _ => {
                                return Err(Problem::new(
                                    "api.bad_request",
                                    "give exactly one of new_key_file, new_passphrase_file",
                                ))
                            }
                        };
                        ops::kms_rotate(&st2.repo, &actor, &new)
                    }
                    _ => {
                        let r = ops::kms_shred(&st2.repo, &actor, &shred.map(|b| b.confirm).unwrap_or_default());
                        if r.is_ok() {
                            st2.shredded.store(true, std::sync::atomic::Ordering::SeqCst);
                        }
                        r
                    }
                })
                .await?;
                Ok(ok(c, body))
            }
            Op::AgentsList => {
                let st = st.clone();
                let body = blocking(move || ops::agents_list(&st.repo)).await?;
                Ok(ok(c, body))
            }
            Op::Search => {
                let mut q = String::new();
                for (k, v) in query_pairs(&query) {
                    match k.as_str() {
                        "q" => q = v,
                        other => {
                            return Err(Problem::new(
                                "api.bad_request",
                                format!("unknown query parameter {other:?}"),
                            ))
                        }
                    }
                }
                let tenant = who.as_ref().and_then(|w| w.token.tenant.clone());
                let st = st.clone();
                let body = blocking(move || ops::search(&st.repo, &q, tenant.as_deref())).await?;
                Ok(ok(c, body))
            }
            Op::AuditSearch => {
                let mut f = pg_hardstorage_repo::audit::Filter::default();
                for (k, v) in query_pairs(&query) {
                    match k.as_str() {
                        "since" => f.since = Some(v),
                        "action" => f.action = Some(v),
                        "deployment" => f.deployment = Some(v),
                        other => {
                            return Err(Problem::new(
                                "api.bad_request",
                                format!("unknown query parameter {other:?}"),
                            )
                            .suggest("Filter with since, action and deployment", None))
                        }
                    }
                }
                let tenant = who.as_ref().and_then(|w| w.token.tenant.clone());
                let st = st.clone();
                let body = blocking(move || ops::audit_search_for(&st.repo, &f, tenant.as_deref())).await?;
                Ok(ok(c, body))
            }
            Op::AuditVerifyChain => {
                let st = st.clone();
                let body = blocking(move || ops::audit_verify_chain(&st.repo)).await?;
                Ok(ok(c, body))
            }
        }
    }
    .await;
    r.unwrap_or_else(|p| error(&p))
}

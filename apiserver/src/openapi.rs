//! The OpenAPI 3.1 description of the server, generated from the route
//! table ([`crate::routes::ROUTES`]) and the Rust types of request and
//! response bodies (their `utoipa::ToSchema` derives). `api/openapi.yaml`
//! is this document; a test fails when the committed file is stale.

use crate::routes::{Access, Op, Route, ROUTES};
use serde_json::{json, Map, Value};
use utoipa::PartialSchema;

fn schema<T: PartialSchema>() -> Value {
    serde_json::to_value(T::schema()).unwrap_or(Value::Null)
}

/// Path parameters and the pattern each must match.
fn param_schema(name: &str) -> (Value, &'static str) {
    match name {
        "d" | "deployment" => (
            json!({"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"}),
            "Deployment name.",
        ),
        "id" => (
            json!({"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"}),
            "Backup id (`<deployment>.<kind>.<UTC stamp>`) or restore id.",
        ),
        "seg" => (
            json!({"type": "string", "pattern": "^([0-9A-F]{24}|[0-9A-F]{8}\\.history)$"}),
            "WAL file name.",
        ),
        _ => (
            json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,63}$"}),
            "Repository name.",
        ),
    }
}

fn envelope_with(body: Value) -> Value {
    json!({
        "type": "object",
        "required": ["schema", "command", "generated_at", "result"],
        "properties": {
            "schema": {"const": "pg_hardstorage.v1"},
            "command": {"type": "string"},
            "generated_at": {"type": "string", "format": "date-time"},
            "result": {
                "type": "object",
                "required": ["body"],
                "properties": {"body": body},
            },
        },
    })
}

fn r(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The schema of a route's success body.
fn body_schema(op: Op) -> Value {
    match op {
        Op::Healthz => {
            json!({"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})
        }
        Op::Readyz => {
            json!({"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}})
        }
        Op::DeploymentsList => json!({"type": "array", "items": r("Deployment")}),
        Op::DeploymentsCreate
        | Op::DeploymentsShow
        | Op::DeploymentsUpdate
        | Op::DeploymentsDelete => r("Deployment"),
        Op::BackupsList => json!({"type": "array", "items": r("BackupSummary")}),
        Op::BackupsTake => r("BackupSummary"),
        Op::BackupsShow => r("Manifest"),
        Op::BackupsVerify => r("VerifySummary"),
        Op::RestoresInitiate => r("RestoreSummary"),
        Op::RestoresStatus => r("RestoreRecord"),
        Op::BackupsDelete => r("Tombstone"),
        Op::BackupsHold | Op::BackupsRelease => r("Hold"),
        Op::WalList | Op::WalRepair => r("WalReport"),
        Op::AuditSearch => json!({"type": "array", "items": r("AuditEvent")}),
        Op::ReposShow => {
            json!({"type": "object", "required": ["repo_id", "config", "deployments", "tenants"]})
        }
        Op::ReposCheck => r("CheckReport"),
        Op::ReposUsage => r("Usage"),
        Op::ReposGc => r("GcReport"),
        Op::ReposScrub => r("ScrubReport"),
        Op::Doctor => r("DoctorReport"),
        Op::AgentsList => json!({"type": "array", "items": r("Agent")}),
        Op::Search => json!({"type": "array", "items": r("BackupSummary")}),
        Op::KmsInspect => json!({"type": "object", "required": ["master_key_id", "keks"]}),
        Op::KmsRotate => {
            json!({"type": "object", "required": ["new_kek", "retired", "data_rewritten"]})
        }
        Op::KmsShred => json!({"type": "object", "required": ["envelopes_destroyed"]}),
        Op::AuditVerifyChain => json!({"type": "object", "required": ["records", "intact"],
            "properties": {"records": {"type": "integer"}, "intact": {"const": true}, "head": {"type": "string"}}}),
        _ => json!({}),
    }
}

fn request_schema(op: Op) -> Option<(Value, bool)> {
    match op {
        Op::DeploymentsCreate => Some((r("CreateDeployment"), true)),
        Op::DeploymentsUpdate => Some((r("UpdateDeployment"), true)),
        Op::BackupsTake => Some((r("TakeBackup"), false)),
        Op::RestoresInitiate => Some((r("StartRestore"), true)),
        Op::BackupsDelete => Some((r("DeleteBackup"), false)),
        Op::BackupsHold => Some((r("PlaceHold"), false)),
        Op::KmsRotate => Some((r("RotateKek"), true)),
        Op::KmsShred => Some((r("ShredKeys"), true)),
        _ => None,
    }
}

fn streams(op: Op) -> bool {
    matches!(
        op,
        Op::BackupsTake | Op::BackupsVerify | Op::RestoresInitiate | Op::ReposGc | Op::ReposScrub
    )
}

fn success(route: &Route) -> Value {
    match route.op {
        Op::Metrics => json!({"description": "Prometheus text exposition.",
            "content": {"text/plain": {"schema": {"type": "string"}}}}),
        Op::OpenApi => json!({"description": "This document.",
            "content": {"application/yaml": {"schema": {"type": "object", "required": ["openapi", "paths"]}}}}),
        Op::WalFetch => json!({"description": "The WAL file's bytes, verified.",
            "content": {"application/octet-stream": {"schema": {"type": "string", "contentEncoding": "binary"}}}}),
        op if streams(op) => json!({
            "description": "NDJSON events as the work proceeds (default), ending with the completion event or a final error frame without a trailing newline; with `Accept: application/json`, one envelope when the work is done.",
            "content": {
                "application/x-ndjson": {"schema": r("Event")},
                "application/json": {"schema": envelope_with(body_schema(op))},
            },
        }),
        op => json!({"description": "Success.",
            "content": {"application/json": {"schema": envelope_with(body_schema(op))}}}),
    }
}

fn error_response(what: &str) -> Value {
    json!({"description": what, "content": {"application/json": {"schema": r("ErrorEnvelope")}}})
}

fn operation(route: &Route) -> Value {
    let mut responses = Map::new();
    responses.insert("200".into(), success(route));
    let mut errors: Vec<(&str, &str)> = vec![
        (
            "400",
            "Bad request: malformed parameter or body, unknown field, body too large.",
        ),
        ("404", "Unknown route, deployment, backup or restore."),
        ("405", "The path does not take this method."),
        ("500", "Internal error."),
        ("503", "The repository (or KMS) is unreachable, or the server is at its connection or operation limit (`api.busy`, with `Retry-After`)."),
    ];
    if route.access != Access::Open {
        errors.push((
            "401",
            "No credentials, or unknown ones (`auth.token_required`).",
        ));
        errors.push(("403", "Authenticated without the verb (`authz.denied`)."));
        errors.push((
            "409",
            "Conflict: different settings, or another writer holds the lease.",
        ));
        errors.push(("412", "A pre-flight check refused the work."));
        errors.push(("422", "Verification failed (`verify.*`)."));
        errors.push(("501", "Not implemented yet (`unimplemented`)."));
    }
    for (code, what) in errors {
        responses.insert(code.into(), error_response(what));
    }
    let params: Vec<Value> = route
        .path
        .split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|x| x.strip_suffix('}')))
        .map(|name| {
            let (schema, description) = param_schema(name);
            json!({"name": name, "in": "path", "required": true, "description": description, "schema": schema})
        })
        .collect();
    let tag = route
        .path
        .trim_start_matches("/v1/")
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("meta")
        .to_string();
    let mut op = json!({
        "operationId": route.command.replace('.', "_"),
        "summary": route.command,
        "tags": [tag],
        "responses": responses,
    });
    let mut params = params;
    if matches!(route.op, Op::ReposGc | Op::ReposScrub) {
        params.push(json!({"name": "apply", "in": "query", "required": false,
            "description": "Act (default: dry-run, report only).", "schema": {"type": "boolean"}}));
    }
    if route.op == Op::ReposGc {
        params.push(json!({"name": "grace_seconds", "in": "query", "required": false,
            "description": "Packs younger than this are kept (default 21600).", "schema": {"type": "integer", "minimum": 0, "maximum": 3_153_600_000u64}}));
    }
    if route.op == Op::Search {
        params.push(json!({"name": "q", "in": "query", "required": false,
            "description": "deployment:D status:live|deleted|any held:true|false since:WHEN until:WHEN kind:K, and words of the backup id",
            "schema": {"type": "string"}}));
    }
    if route.op == Op::Doctor {
        params.push(json!({"name": "max_age_seconds", "in": "query", "required": false,
            "description": "The newest backup may be at most this old (default 93600).", "schema": {"type": "integer", "minimum": 0, "maximum": 3_153_600_000u64}}));
    }
    if route.op == Op::AuditSearch {
        for (name, what) in [
            ("since", "RFC 3339 time or a relative one (\"2 hours ago\")"),
            ("action", "e.g. backup.take, backup.delete, token.create"),
            ("deployment", "deployment name"),
        ] {
            params.push(json!({"name": name, "in": "query", "required": false,
                "description": what, "schema": {"type": "string"}}));
        }
    }
    if !params.is_empty() {
        op["parameters"] = Value::Array(params);
    }
    match route.access {
        Access::Open => op["security"] = json!([]),
        Access::Authenticated => op["description"] = json!("Any authenticated caller."),
        Access::Verb(v) => {
            op["description"] = json!(format!("Needs the RBAC verb `{v}` (or `admin:*`)."))
        }
    }
    if route.access != Access::Open {
        op["security"] = json!([{"bearer": []}, {"mtls": []}]);
    }
    if let Some((schema, required)) = request_schema(route.op) {
        op["requestBody"] = json!({
            "required": required,
            "content": {"application/json": {"schema": schema}},
        });
    }
    op
}

/// A stored type as a response body: fields may be added (the contract's
/// v1 rule), and a route may add its own.
fn response(mut schema: Value, extra: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.remove("additionalProperties");
    }
    if let (Some(props), Some(extra)) = (
        schema.get_mut("properties").and_then(Value::as_object_mut),
        extra.as_object(),
    ) {
        for (k, v) in extra {
            props.insert(k.clone(), v.clone());
        }
    }
    schema
}

fn components() -> Value {
    use crate::routes::{
        CreateDeployment, DeleteBackup, PlaceHold, StartRestore, TakeBackup, UpdateDeployment,
    };
    use pg_hardstorage_repo as repo;
    json!({
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "`phs.<name>.<secret>` from `pg_hardstorage token create`."},
            "mtls": {"type": "mutualTLS", "description": "A client certificate signed by the server's --client-ca; its Subject CN names the token record whose verbs apply."},
        },
        "schemas": {
            "CreateDeployment": schema::<CreateDeployment>(),
            "UpdateDeployment": schema::<UpdateDeployment>(),
            "TakeBackup": schema::<TakeBackup>(),
            "StartRestore": schema::<StartRestore>(),
            "DeleteBackup": schema::<DeleteBackup>(),
            "PlaceHold": schema::<PlaceHold>(),
            "RotateKek": schema::<crate::routes::RotateKek>(),
            "ShredKeys": schema::<crate::routes::ShredKeys>(),
            "Hold": response(schema::<repo::lifecycle::Hold>(), json!({"released": {"type": "boolean"}})),
            "Tombstone": response(schema::<repo::lifecycle::Tombstone>(), json!({})),
            "AuditEvent": response(schema::<repo::audit::AuditEvent>(), json!({})),
            "CheckReport": schema::<repo::check::CheckReport>(),
            "Finding": schema::<repo::check::Finding>(),
            "ScrubReport": schema::<repo::check::ScrubReport>(),
            "BadPack": schema::<repo::check::BadPack>(),
            "Usage": schema::<repo::gc::Usage>(),
            "GcReport": schema::<repo::gc::GcReport>(),
            "DoctorReport": schema::<repo::doctor::DoctorReport>(),
            "Agent": response(schema::<repo::fleet::Agent>(), json!({})),
            "DoctorFinding": schema::<repo::doctor::DoctorFinding>(),
            "Deployment": response(schema::<repo::deployment::Deployment>(), json!({
                "created": {"type": "boolean", "description": "create: whether this call created it"},
                "deleted": {"type": "boolean"},
                "backups_kept": {"type": "boolean"},
            })),
            "Kind": schema::<repo::deployment::Kind>(),
            "BackupSummary": schema::<repo::backup::BackupSummary>(),
            "VerifySummary": schema::<repo::verify::VerifySummary>(),
            "RestoreSummary": schema::<repo::restore::RestoreSummary>(),
            "RestoreRecord": response(schema::<repo::ops::RestoreRecord>(), json!({})),
            "Manifest": {
                "type": "object",
                "description": "The backup's full manifest (docs/specs/format.md §7).",
                "required": ["format_version", "backup_id", "deployment", "kind", "entries", "stats"],
                "properties": {
                    "format_version": {"type": "integer"},
                    "backup_id": {"type": "string"},
                    "deployment": {"type": "string"},
                    "kind": {"type": "string"},
                    "source": {"type": "object"},
                    "stats": {"type": "object"},
                    "entries": {"type": "array", "items": {"type": "object"}},
                },
            },
            "WalReport": {
                "type": "object",
                "description": "Archived WAL of a deployment: segments and gaps (wal list), or what a repair did.",
            },
            "Event": {
                "type": "object",
                "description": "One NDJSON line (docs/specs/events.md). A final error frame carries `error` instead of `body`.",
                "required": ["schema", "severity_name", "op", "time"],
                "properties": {
                    "schema": {"const": "pg_hardstorage.v1"},
                    "severity_name": {"enum": ["debug", "info", "notice", "warning", "error"]},
                    "op": {"type": "string"},
                    "subject": {"type": "object"},
                    "body": {},
                    "error": r("Error"),
                    "time": {"type": "string"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["code", "message", "subject", "suggestion"],
                "properties": {
                    "code": {"type": "string", "description": "Stable code (docs/specs/errors.md)."},
                    "message": {"type": "string"},
                    "subject": {"type": "object"},
                    "retryable": {"type": "boolean", "description": "Whether the same request may succeed when repeated unchanged (docs/specs/errors.md)."},
                    "suggestion": {
                        "type": "object",
                        "required": ["human", "doc_url"],
                        "properties": {
                            "human": {"type": "string"},
                            "command": {"type": "string"},
                            "doc_url": {"type": "string"},
                        },
                    },
                },
            },
            "ErrorEnvelope": {
                "type": "object",
                "required": ["schema", "error"],
                "properties": {
                    "schema": {"const": "pg_hardstorage.v1"},
                    "error": r("Error"),
                },
            },
        },
    })
}

/// The document as JSON.
pub fn document() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let item = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        item[route.method.to_ascii_lowercase()] = operation(route);
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "pg_hardstorage",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The pg_hardstorage.v1 control plane: deployments, backups, restores, WAL. Contract: shared/spec/api-reference.md.",
        },
        "security": [{"bearer": []}, {"mtls": []}],
        "paths": paths,
        "components": components(),
    })
}

/// The document as YAML (what `/v1/openapi.yaml` serves and
/// `api/openapi.yaml` holds).
pub fn yaml() -> String {
    serde_norway::to_string(&document())
        .unwrap_or_else(|e| format!("# OpenAPI document failed to serialise: {e}\n"))
}

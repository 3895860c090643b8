//! The operations of the contract, one function each, shared by the CLI and
//! the REST server: both call these and print or send the body they return,
//! so `-o json` and the API answer the same work with the same body.

use crate::backup::{take_backup, BackupOptions, BackupSummary};
use crate::deployment::{self, Deployment};
use crate::restore::{restore, Recovery, RecoveryTarget, RestoreOptions, VerifyMode};
use crate::{catalog, pitr, verify, Repository};
use pg_hardstorage_engine::event::{Event, EventBus, Severity};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, Problem> {
    serde_json::to_value(v).map_err(|e| Problem::internal(e.to_string()))
}

pub fn deployments_create(repo: &Repository, actor: &str, d: Deployment) -> Result<Value, Problem> {
    let name = d.name.clone();
    let r = deployment::create(repo, d).map(|(d, created)| {
        let mut body = d.public();
        body["created"] = json!(created);
        body
    });
    audited(
        repo,
        actor,
        "deployment.create",
        subject(&name, None),
        r,
        None,
    )
}

/// Every deployment, or those of one tenant.
pub fn deployments_list(repo: &Repository, tenant: Option<&str>) -> Result<Value, Problem> {
    Ok(Value::Array(
        deployment::list(repo)?
            .iter()
            .filter(|d| tenant.is_none_or(|t| d.tenant() == t))
            .map(Deployment::public)
            .collect(),
    ))
}

pub fn deployments_show(repo: &Repository, name: &str) -> Result<Value, Problem> {
    Ok(deployment::get(repo, name)?.public())
}

pub fn deployments_update(
    repo: &Repository,
    actor: &str,
    name: &str,
    pg: Option<String>,
    pgdata: Option<String>,
    path: Option<String>,
) -> Result<Value, Problem> {
    let r = deployment::update(repo, name, pg, pgdata, path).map(|d| d.public());
    audited(
        repo,
        actor,
        "deployment.update",
        subject(name, None),
        r,
        None,
    )
}

pub fn deployments_delete(repo: &Repository, actor: &str, name: &str) -> Result<Value, Problem> {
    let r = deployment::delete(repo, name).map(|d| {
        let mut body = d.public();
        body["deleted"] = json!(true);
        body["backups_kept"] = json!(true);
        body
    });
    audited(
        repo,
        actor,
        "deployment.delete",
        subject(name, None),
        r,
        None,
    )
}

pub fn backups_list(repo: &Repository, deployment: Option<&str>) -> Result<Value, Problem> {
    if let Some(d) = deployment {
        deployment::validate_name(d)?;
    }
    to_value(catalog::list(repo, deployment)?)
}

/// One backup's full manifest, with its hold and deletion if any.
pub fn backups_show(repo: &Repository, id: &str) -> Result<Value, Problem> {
    let mut v = to_value(catalog::load(repo, id)?)?;
    if let Some(h) = crate::lifecycle::hold_of(repo, id)? {
        v["hold"] = to_value(h)?;
    }
    if let Some(t) = crate::lifecycle::tombstone(repo, id)? {
        v["deleted"] = to_value(t)?;
    }
    Ok(v)
}

/// Soft-deletes a backup (refused while held).
pub fn backups_delete(
    repo: &Repository,
    id: &str,
    by: &str,
    reason: Option<String>,
) -> Result<Value, Problem> {
    let r = crate::lifecycle::delete(repo, id, by, reason).and_then(to_value);
    audited(repo, by, "backup.delete", backup_subject(id), r, None)
}

/// Places a legal hold.
pub fn backups_hold(
    repo: &Repository,
    id: &str,
    by: &str,
    reason: Option<String>,
    until: Option<&str>,
) -> Result<Value, Problem> {
    let r = crate::lifecycle::hold(repo, id, by, reason, until).and_then(to_value);
    audited(repo, by, "backup.hold", backup_subject(id), r, None)
}

/// Releases a legal hold.
pub fn backups_release(repo: &Repository, actor: &str, id: &str) -> Result<Value, Problem> {
    let r = crate::lifecycle::release(repo, id).and_then(|h| {
        let mut v = to_value(h)?;
        v["released"] = json!(true);
        Ok(v)
    });
    audited(repo, actor, "backup.release", backup_subject(id), r, None)
}

/// Takes a backup; its events go to `bus`.
pub fn backups_take(
    repo: &Repository,
    actor: &str,
    deployment: &str,
    bus: &EventBus,
    opts: &BackupOptions,
) -> Result<Value, Problem> {
    deployment::get(repo, deployment)?;
    let r = take_backup(repo, deployment, bus, opts).and_then(|m| to_value(BackupSummary::of(&m)));
    let id = r
        .as_ref()
        .ok()
        .and_then(|v| v["backup_id"].as_str())
        .map(str::to_string);
    audited(
        repo,
        actor,
        "backup.take",
        subject(deployment, id.as_deref()),
        r,
        Some(bus),
    )
}

pub fn backups_verify(
    repo: &Repository,
    id: &str,
    bus: &EventBus,
    threads: usize,
) -> Result<Value, Problem> {
    let m = catalog::load(repo, id)?;
    to_value(verify::verify(repo, &m, bus, threads)?)
}

/// What a restore is asked to do (the body of `POST …/restores`).
#[derive(Clone, Debug, Default)]
pub struct RestoreRequest {
    pub deployment: String,
    /// A backup id or `latest`.
    pub backup: String,
    pub target: PathBuf,
    pub to: Option<String>,
    pub to_lsn: Option<String>,
    pub to_name: Option<String>,
    /// `auto`, `skip` or `require`.
    pub verify: String,
    pub force: bool,
    pub threads: usize,
    /// `OLD=NEW` tablespace mappings.
    pub tablespace_mapping: Vec<String>,
    /// Write only what differs into an existing directory of the cluster.
    pub delta: bool,
    /// WAL segments the restore stages and `restore_command` keeps staged
    /// ahead of replay, when PostgreSQL can reach the repository (0: all).
    pub wal_prefetch: usize,
    /// Start the restored cluster as a standby, of this `primary_conninfo`
    /// when `Some(Some(…))`.
    pub standby: Option<Option<String>>,
}

impl RestoreRequest {
    fn verify_mode(&self) -> Result<VerifyMode, Problem> {
        match self.verify.as_str() {
            "" | "auto" => Ok(VerifyMode::Auto),
            "skip" => Ok(VerifyMode::Skip),
            "require" => Ok(VerifyMode::Require),
            v => Err(Problem::new(
                Code::UsageInvalidArgument,
                format!("verify {v:?}: want auto, skip or require"),
            )),
        }
    }
}

/// Everything a restore checks before it writes a byte: the backup, the
/// recovery target against the archive, the options. Returns the manifest
/// to restore and the options to restore it with.
pub fn restore_plan(
    repo: &Repository,
    req: &RestoreRequest,
    restore_command: &dyn Fn() -> Result<String, Problem>,
    bus: &EventBus,
) -> Result<(pg_hardstorage_engine::format::Manifest, RestoreOptions), Problem> {
    deployment::validate_name(&req.deployment)?;
    let verify = req.verify_mode()?;
    let target = pitr::recovery_target(
        req.to.as_deref(),
        req.to_lsn.as_deref(),
        req.to_name.as_deref(),
    )?;
    let backup = if req.backup.is_empty() {
        "latest"
    } else {
        &req.backup
    };
    let m = pitr::choose_backup(
        repo,
        &req.deployment,
        backup,
        target.as_ref(),
        req.to.as_deref(),
    )?;
    let is_pg = m.source["type"] == "postgres";
    if target.is_some() && !is_pg {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            "--to, --to-lsn and --to-name apply to PostgreSQL backups only",
        ));
    }
    let archived = if is_pg {
        crate::wal::list_names(repo, &req.deployment)?
    } else {
        Vec::new()
    };
    // Recovery with the WAL it needs staged into the target by the restore
    // itself, so PostgreSQL needs no key material; `wal fetch` is only the
    // fallback past the staged files, when key material it can read exists.
    let needs_wal = target.is_some() || archived.iter().any(|n| !n.ends_with(".history"));
    let recovery = match target {
        Some(t) => Some(t),
        None if needs_wal => Some(RecoveryTarget::Latest),
        None => None,
    };
    let recovery = match recovery {
        Some(t) => {
            if !req.force {
                let when = req.to.as_deref();
                pitr::check_target(repo, &req.deployment, &m, &t, when, &archived)?;
            }
            let restore_command = restore_command().ok();
            // Without a fallback to the repository, everything is staged.
            let prefetch = if restore_command.is_some() {
                req.wal_prefetch
            } else {
                0
            };
            let r = Recovery {
                restore_command,
                target: t,
                staged: pitr::staged_window(pitr::needed_wal(&m, &archived), prefetch),
                prefetch,
            };
            if r.restore_command.is_none() {
                bus.publish(Event::new(Severity::Info, "wal_staged_only").body(json!({
                    "staged": r.staged.len(),
                    "reason": "no key file or passphrase file PostgreSQL can read: recovery replays the WAL this restore stages, and nothing past it",
                })));
            }
            Some(r)
        }
        None => None,
    };
    let tablespace_mapping = req
        .tablespace_mapping
        .iter()
        .map(|m| {
            m.split_once('=')
                .map(|(o, n)| (o.to_string(), PathBuf::from(n)))
                .ok_or_else(|| {
                    Problem::new(
                        Code::UsageInvalidArgument,
                        format!("tablespace mapping {m:?}: want OLD=NEW"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let opts = RestoreOptions {
        target: req.target.clone(),
        force: req.force,
        threads: req.threads.max(1),
        recovery,
        verify,
        tablespace_mapping,
        delta: req.delta,
        pg_bindirs: crate::restore::pgverify::bindirs_from_env(),
        standby: req
            .standby
            .clone()
            .map(|primary_conninfo| crate::restore::Standby { primary_conninfo }),
    };
    crate::restore::check(&m, &opts)?;
    Ok((m, opts))
}

/// A restore's record (`restores/<deployment>/<restore_id>`): written when
/// it starts and again when it ends, so `GET …/restores/{id}` can answer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRecord {
    pub restore_id: String,
    pub deployment: String,
    pub backup_id: String,
    pub target: String,
    /// `running`, `succeeded` or `failed`.
    pub status: String,
    pub started_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

fn restore_key(deployment: &str, id: &str) -> String {
    format!("restores/{deployment}/{id}")
}

fn put_restore(repo: &Repository, r: &RestoreRecord) -> Result<(), Problem> {
    let body = serde_json::to_vec(r).map_err(|e| Problem::internal(e.to_string()))?;
    repo.put_sealed(
        pg_hardstorage_engine::format::RESTORE_MAGIC,
        &restore_key(&r.deployment, &r.restore_id),
        &body,
    )
}

/// Runs a planned restore, recording it; its events go to `bus`.
pub fn restores_run(
    repo: &Repository,
    actor: &str,
    m: &pg_hardstorage_engine::format::Manifest,
    opts: &RestoreOptions,
    bus: &EventBus,
) -> Result<Value, Problem> {
    let mut rec = RestoreRecord {
        restore_id: format!(
            "{}.restore.{}",
            m.deployment,
            crate::backup::new_suffix_stamp()
        ),
        deployment: m.deployment.clone(),
        backup_id: m.backup_id.clone(),
        target: opts.target.display().to_string(),
        status: "running".into(),
        started_at: pg_hardstorage_engine::event::now_rfc3339(),
        finished_at: None,
        result: None,
        error: None,
    };
    put_restore(repo, &rec)?;
    let r = restore(repo, m, opts, bus).and_then(to_value);
    rec.finished_at = Some(pg_hardstorage_engine::event::now_rfc3339());
    match &r {
        Ok(v) => {
            rec.status = "succeeded".into();
            let mut v = v.clone();
            v["restore_id"] = json!(rec.restore_id);
            rec.result = Some(v);
        }
        Err(p) => {
            rec.status = "failed".into();
            rec.error = Some(p.to_json());
        }
    }
    // The restore's own outcome matters more than its record's.
    let _ = put_restore(repo, &rec);
    let r = r.map(|mut v| {
        v["restore_id"] = json!(rec.restore_id);
        v
    });
    let mut subj = subject(&m.deployment, Some(&m.backup_id));
    subj.insert("restore_id".into(), json!(rec.restore_id));
    subj.insert("target".into(), json!(rec.target));
    audited(repo, actor, "restore.run", subj, r, Some(bus))
}

/// Plans and runs a restore; its events go to `bus`.
pub fn restores_initiate(
    repo: &Repository,
    actor: &str,
    req: &RestoreRequest,
    restore_command: &dyn Fn() -> Result<String, Problem>,
    bus: &EventBus,
) -> Result<Value, Problem> {
    let (m, opts) = restore_plan(repo, req, restore_command, bus)?;
    restores_run(repo, actor, &m, &opts, bus)
}

/// A restore's record.
pub fn restores_status(repo: &Repository, deployment: &str, id: &str) -> Result<Value, Problem> {
    deployment::validate_name(deployment)?;
    // Bounded like every id we make (a longer one made the record's path
    // too long for the file system: a 500 naming the repository's path).
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let not_found = || {
        Problem::new(
            Code::RestoreNotFound,
            format!("no restore {id:?} of {deployment:?}"),
        )
        .with("deployment", deployment)
        .with("restore_id", id)
    };
    if !valid {
        return Err(not_found());
    }
    let raw = repo
        .get_sealed(
            pg_hardstorage_engine::format::RESTORE_MAGIC,
            &restore_key(deployment, id),
        )?
        .ok_or_else(not_found)?;
    let rec: RestoreRecord = serde_json::from_slice(&raw)
        .map_err(|e| Problem::new(Code::VerifyMalformed, format!("restore record {id}: {e}")))?;
    to_value(rec)
}

pub fn wal_list(repo: &Repository, deployment: &str) -> Result<Value, Problem> {
    deployment::get(repo, deployment)?;
    crate::wal::list(repo, deployment)
}

pub fn wal_repair(
    repo: &Repository,
    actor: &str,
    deployment: &str,
    bus: &EventBus,
) -> Result<Value, Problem> {
    let r = crate::wal::repair(repo, deployment, bus);
    audited(
        repo,
        actor,
        "wal.repair",
        subject(deployment, None),
        r,
        Some(bus),
    )
}

/// Creates an API token; the body carries the secret, shown once.
pub fn tokens_create(
    repo: &Repository,
    actor: &str,
    name: &str,
    verbs: &[String],
    tenant: Option<String>,
) -> Result<Value, Problem> {
    let r = crate::tokens::create(repo, name, verbs, tenant).map(|(t, secret)| {
        let mut body = t.public();
        body["token"] = json!(secret);
        body
    });
    let mut subj = Map::new();
    subj.insert("token".into(), json!(name));
    subj.insert("verbs".into(), json!(verbs));
    audited(repo, actor, "token.create", subj, r, None)
}

/// Token records without their hashes.
pub fn tokens_list(repo: &Repository) -> Result<Value, Problem> {
    Ok(Value::Array(
        crate::tokens::list(repo)?
            .iter()
            .map(|t| t.public())
            .collect(),
    ))
}

pub fn tokens_revoke(repo: &Repository, actor: &str, name: &str) -> Result<Value, Problem> {
    let r = crate::tokens::revoke(repo, name);
    let mut subj = Map::new();
    subj.insert("token".into(), json!(name));
    if let Ok(t) = &r {
        // The audit chain's copy of the revocation (tokens.rs).
        subj.insert("secret_hash".into(), json!(t.secret_hash));
    }
    let r = r.map(|t| {
        let mut body = t.public();
        body["revoked"] = json!(true);
        body
    });
    audited(repo, actor, "token.revoke", subj, r, None)
}

/// The repository: where it is, its configuration, deployments and tenants.
pub fn repos_show(repo: &Repository) -> Result<Value, Problem> {
    let deps: Vec<Value> = deployment::list(repo)?
        .iter()
        .map(Deployment::public)
        .collect();
    let mut tenants: Vec<String> = deployment::list(repo)?
        .iter()
        .map(|d| d.tenant().to_string())
        .collect();
    tenants.sort();
    tenants.dedup();
    Ok(json!({
        "repo": repo.store.describe(),
        "repo_id": repo.config.repo_id,
        "format_version": repo.config.format_version,
        "config": repo.config,
        "deployments": deps,
        "tenants": tenants,
    }))
}

pub fn repos_check(repo: &Repository) -> Result<Value, Problem> {
    to_value(crate::check::check(repo)?)
}

pub fn repos_usage(repo: &Repository) -> Result<Value, Problem> {
    to_value(crate::gc::usage(repo)?)
}

pub fn repos_gc(
    repo: &Repository,
    actor: &str,
    opts: &crate::gc::GcOptions,
    bus: &EventBus,
) -> Result<Value, Problem> {
    let r = crate::gc::gc(repo, opts, bus).and_then(to_value);
    if !opts.apply {
        return r;
    }
    let mut subj = Map::new();
    subj.insert("grace_seconds".into(), json!(opts.grace.as_secs()));
    audited(repo, actor, "repo.gc", subj, r, Some(bus))
}

pub fn repos_scrub(
    repo: &Repository,
    actor: &str,
    apply: bool,
    bus: &EventBus,
    threads: usize,
) -> Result<Value, Problem> {
    let r = crate::check::scrub(repo, apply, bus, threads).and_then(to_value);
    if !apply {
        return r;
    }
    audited(repo, actor, "repo.scrub", Map::new(), r, Some(bus))
}

pub fn doctor(
    repo: &Repository,
    deployment: Option<&str>,
    opts: &crate::doctor::DoctorOptions,
) -> Result<Value, Problem> {
    doctor_for(repo, deployment, None, opts)
}

/// Doctor for the deployments of one tenant (an API caller bound to one).
pub fn doctor_for(
    repo: &Repository,
    deployment: Option<&str>,
    tenant: Option<&str>,
    opts: &crate::doctor::DoctorOptions,
) -> Result<Value, Problem> {
    to_value(crate::doctor::doctor(repo, deployment, tenant, opts)?)
}

pub fn kms_inspect(repo: &Repository) -> Result<Value, Problem> {
    crate::kms::inspect(repo)
}

pub fn kms_rotate(
    repo: &Repository,
    actor: &str,
    new: &crate::keys::KeySource,
) -> Result<Value, Problem> {
    let r = crate::kms::rotate(repo, new);
    audited(repo, actor, "kms.rotate", Map::new(), r, None)
}

/// Destroys the keys. The audit event is written first: afterwards no key
/// can seal one.
pub fn kms_shred(repo: &Repository, actor: &str, confirm: &str) -> Result<Value, Problem> {
    if confirm == repo.config.repo_id {
        let mut subj = Map::new();
        subj.insert("repo_id".into(), json!(repo.config.repo_id));
        crate::audit::append(repo, actor, "kms.shred", subj, Ok(()))?;
    }
    crate::kms::shred(repo, confirm, actor)
}

pub fn agents_list(repo: &Repository) -> Result<Value, Problem> {
    to_value(crate::fleet::agents(repo)?)
}

pub fn search(repo: &Repository, q: &str, tenant: Option<&str>) -> Result<Value, Problem> {
    let q = crate::fleet::parse_query(q)?;
    to_value(crate::fleet::search(repo, &q, tenant)?)
}

pub fn audit_search(repo: &Repository, f: &crate::audit::Filter) -> Result<Value, Problem> {
    audit_search_for(repo, f, None)
}

/// Audit events; for a tenant-bound caller only those about its own
/// deployments.
pub fn audit_search_for(
    repo: &Repository,
    f: &crate::audit::Filter,
    tenant: Option<&str>,
) -> Result<Value, Problem> {
    let mut events = crate::audit::search(repo, f)?;
    if let Some(t) = tenant {
        let mine: std::collections::HashSet<String> = deployment::list(repo)?
            .into_iter()
            .filter(|d| d.tenant() == t)
            .map(|d| d.name)
            .collect();
        events.retain(|e| {
            e.subject
                .get("deployment")
                .and_then(Value::as_str)
                .is_some_and(|d| mine.contains(d))
        });
    }
    to_value(events)
}

pub fn audit_verify_chain(repo: &Repository) -> Result<Value, Problem> {
    crate::audit::verify_chain(repo)
}

fn subject(deployment: &str, backup_id: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("deployment".into(), json!(deployment));
    if let Some(id) = backup_id {
        m.insert("backup_id".into(), json!(id));
    }
    m
}

fn backup_subject(id: &str) -> Map<String, Value> {
    subject(catalog::deployment_of(id).unwrap_or(""), Some(id))
}

/// Appends the operation to the audit chain and returns its result. An
/// operation that happened stays reported as it happened even when the
/// record cannot be written (the storage just failed); that failure is an
/// `audit_failed` warning on the operation's bus, when it has one.
fn audited<T>(
    repo: &Repository,
    actor: &str,
    action: &str,
    subject: Map<String, Value>,
    r: Result<T, Problem>,
    bus: Option<&EventBus>,
) -> Result<T, Problem> {
    let outcome = r.as_ref().map(|_| ());
    if let Err(p) = crate::audit::append(repo, actor, action, subject, outcome) {
        if let Some(bus) = bus {
            bus.publish(
                Event::new(Severity::Warning, "audit_failed")
                    .body(json!({"action": action, "error": p.to_json()})),
            );
        }
    }
    r
}

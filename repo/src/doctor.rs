//! `doctor`: is this repository, and each deployment backed up into it,
//! healthy? Every finding has a severity, a stable code and a command that
//! fixes or investigates it. Healthy means no error and no warning.

use crate::Repository;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use serde_json::{json, Value};
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Clone, Debug)]
pub struct DoctorOptions {
    /// The newest backup of a deployment may be at most this old.
    pub max_backup_age: Duration,
    /// A slot may hold back at most this much WAL.
    pub max_slot_lag_bytes: u64,
    /// Free space on a local repository's filesystem, as a fraction.
    pub min_free_fraction: f64,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            max_backup_age: Duration::from_secs(26 * 3600),
            max_slot_lag_bytes: 1 << 30,
            min_free_fraction: 0.10,
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DoctorFinding {
    /// `error`, `warning` or `info`.
    pub severity: String,
    pub code: String,
    pub message: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub subject: Value,
    /// What to run about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DoctorReport {
    pub healthy: bool,
    pub version: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub repository: Value,
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub deployments: Vec<Value>,
    pub findings: Vec<DoctorFinding>,
}

struct Findings(Vec<DoctorFinding>);

impl Findings {
    fn add(
        &mut self,
        severity: &str,
        code: &str,
        message: String,
        subject: Value,
        command: Option<String>,
    ) {
        self.0.push(DoctorFinding {
            severity: severity.into(),
            code: code.into(),
            message,
            subject,
            command,
        });
    }
}

/// A finding when the newest backup met pages PostgreSQL's checksums say
/// are damaged: the cluster's storage needs looking at.
fn damaged_pages(
    repo: &Repository,
    deployment: &str,
    backup_id: &str,
    f: &mut Findings,
) -> Result<(), Problem> {
    let m = crate::catalog::load_manifest(repo, deployment, backup_id)?;
    let bad = &m.source["page_checksum_failures"];
    let count = bad["count"].as_u64().unwrap_or(0);
    if count > 0 {
        f.add(
            "error",
            "doctor.page_checksum_failures",
            format!("the newest backup of {deployment} read {count} page(s) whose checksum PostgreSQL found wrong: {}", bad["pages"]),
            json!({"deployment": deployment, "backup_id": backup_id, "count": count, "pages": bad["pages"]}),
            Some(format!("pg_amcheck --all  # on the cluster of {deployment}")),
        );
    }
    Ok(())
}

fn free_space(path: &str) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_bavail as u64 * frsize, s.f_blocks as u64 * frsize))
}

/// Checks the repository and every deployment (or one). Fails with
/// `doctor.unhealthy` (exit 4) carrying the report when anything is wrong.
pub fn doctor(
    repo: &Repository,
    only: Option<&str>,
    tenant: Option<&str>,
    opts: &DoctorOptions,
) -> Result<DoctorReport, Problem> {
    let mut f = Findings(Vec::new());
    let where_ = repo.store.describe();
    let mut repository = json!({
        "location": where_,
        "reachable": true,
        "key": "ok",
        "repo_id": repo.config.repo_id,
        "format_version": repo.config.format_version,
    });
    if where_.starts_with('/') {
        if let Some((free, total)) = free_space(&where_) {
            repository["free_bytes"] = json!(free);
            repository["total_bytes"] = json!(total);
            if total > 0 && (free as f64) < opts.min_free_fraction * total as f64 {
                f.add(
                    "warning",
                    "doctor.low_space",
                    format!("{free} of {total} bytes free where the repository lives"),
                    json!({"free_bytes": free, "total_bytes": total}),
                    Some("pg_hardstorage repo gc --apply".into()),
                );
            }
        }
    }
    let deployments: Vec<_> = match only {
        Some(d) => vec![crate::deployment::get(repo, d)?],
        None => crate::deployment::list(repo)?,
    }
    .into_iter()
    .filter(|d| tenant.is_none_or(|t| d.tenant() == t))
    .collect();
    let now = OffsetDateTime::now_utc();
    let mut out = Vec::new();
    for d in &deployments {
        let mut info = json!({"name": d.name, "kind": d.kind});
        let backups = crate::catalog::list(repo, Some(&d.name))?;
        match backups.last() {
            None => f.add(
                "error",
                "doctor.no_backup",
                format!("deployment {} has no backup", d.name),
                json!({"deployment": d.name}),
                Some(format!("pg_hardstorage backup run {}", d.name)),
            ),
            Some(b) => {
                let age = OffsetDateTime::parse(&b.finished_at, &Rfc3339)
                    .map(|t| (now - t).whole_seconds().max(0) as u64)
                    .unwrap_or(u64::MAX);
                info["newest_backup"] = json!(b.backup_id);
                info["newest_backup_age_seconds"] = json!(age);
                damaged_pages(repo, &d.name, &b.backup_id, &mut f)?;
                if age > opts.max_backup_age.as_secs() {
                    f.add(
                        "error",
                        "doctor.backup_stale",
                        format!(
                            "the newest backup of {} finished {age} s ago (policy: at most {} s)",
                            d.name,
                            opts.max_backup_age.as_secs()
                        ),
                        json!({"deployment": d.name, "backup_id": b.backup_id, "age_seconds": age}),
                        Some(format!("pg_hardstorage backup run {}", d.name)),
                    );
                }
            }
        }
        if d.kind == crate::deployment::Kind::Postgres {
            let archived = crate::wal::list_names(repo, &d.name)?;
            let wal = crate::wal::list(repo, &d.name)?;
            for g in wal["gaps"].as_array().cloned().unwrap_or_default() {
                f.add(
                    "error",
                    "doctor.wal_gap",
                    format!("the WAL archive of {} has a gap: {g}", d.name),
                    json!({"deployment": d.name, "gap": g}),
                    Some(format!("pg_hardstorage backup run {}", d.name)),
                );
            }
            info["wal_files"] = json!(archived.len());
            pg_checks(d, !archived.is_empty(), opts, &mut f, &mut info);
        }
        out.push(info);
    }
    let healthy = !f.0.iter().any(|x| x.severity != "info");
    let report = DoctorReport {
        healthy,
        version: env!("CARGO_PKG_VERSION").to_string(),
        repository,
        deployments: out,
        findings: f.0,
    };
    if healthy {
        return Ok(report);
    }
    let first = report
        .findings
        .iter()
        .find(|x| x.severity != "info")
        .map(|x| (x.code.clone(), x.message.clone(), x.command.clone()))
        .unwrap_or_default();
    Err(Problem::new(
        Code::DoctorUnhealthy,
        format!(
            "{} finding(s); first: {} ({})",
            report
                .findings
                .iter()
                .filter(|x| x.severity != "info")
                .count(),
            first.1,
            first.0
        ),
    )
    .with("report", serde_json::to_value(&report).unwrap_or_default())
    .suggest("Fix the findings in order; each names a command", first.2))
}

fn pg_checks(
    d: &crate::deployment::Deployment,
    streams_wal: bool,
    opts: &DoctorOptions,
    f: &mut Findings,
    info: &mut Value,
) {
    if let Err(p) = pg_checks_inner(d, streams_wal, opts, f, info) {
        // A server that cannot be reached (or answers wrongly) is itself the finding.
        f.add(
            "error",
            p.code.as_ref(),
            format!("PostgreSQL of {}: {}", d.name, p.message),
            json!({"deployment": d.name}),
            None,
        );
    }
}

fn pg_checks_inner(
    d: &crate::deployment::Deployment,
    streams_wal: bool,
    opts: &DoctorOptions,
    f: &mut Findings,
    info: &mut Value,
) -> Result<(), Problem> {
    let ci = phs_pg::ConnInfo::parse(d.pg.as_deref().unwrap_or_default())?;
    let mut conn = phs_pg::Conn::connect(&ci, true)?;
    info["server_version"] = json!(conn.server_version);
    let system = conn.identify_system()?;
    if d.system_identifier
        .as_ref()
        .is_some_and(|s| *s != system.system_identifier)
    {
        f.add(
            "error",
            "pg.system_mismatch",
            format!(
                "{} now reaches cluster {}, not the one it backs up ({})",
                d.name,
                system.system_identifier,
                d.system_identifier.clone().unwrap_or_default()
            ),
            json!({"deployment": d.name}),
            Some(format!("pg_hardstorage deployment show {}", d.name)),
        );
    }
    let slot = crate::wal::slot_name(&d.name);
    match conn.read_slot(&slot)? {
        Some((restart, _tli)) => {
            let current = phs_pg::parse_lsn(&system.xlogpos).unwrap_or(restart);
            let lag = current.saturating_sub(restart);
            info["slot"] = json!(slot);
            info["slot_lag_bytes"] = json!(lag);
            if lag > opts.max_slot_lag_bytes {
                f.add(
                    "warning",
                    "doctor.slot_lagging",
                    format!("slot {slot} holds {lag} bytes of WAL on the primary"),
                    json!({"deployment": d.name, "slot": slot, "lag_bytes": lag}),
                    Some(format!("pg_hardstorage wal stream {}", d.name)),
                );
            }
        }
        None => f.add(
            if streams_wal { "error" } else { "warning" },
            "doctor.slot_missing",
            format!(
                "replication slot {slot} is missing{}",
                if streams_wal {
                    ": WAL archiving has stopped"
                } else {
                    ": WAL is not archived (no point-in-time restore)"
                }
            ),
            json!({"deployment": d.name, "slot": slot}),
            Some(format!("pg_hardstorage wal repair {}", d.name)),
        ),
    }
    Ok(())
}

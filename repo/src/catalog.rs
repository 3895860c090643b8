//! Finding backups: list, show, resolve `latest`.

use crate::backup::{snapshot_key, BackupSummary};
use crate::Repository;
use pg_hardstorage_engine::format::{Manifest, MANIFEST_MAGIC};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;

pub fn load_manifest(
    repo: &Repository,
    deployment: &str,
    backup_id: &str,
) -> Result<Manifest, Problem> {
    let key = snapshot_key(deployment, backup_id);
    let body = repo
        .get_sealed(MANIFEST_MAGIC, &key)?
        .ok_or_else(|| not_found(backup_id))?;
    let m: Manifest = serde_json::from_slice(&body)
        .map_err(|e| Problem::new(Code::VerifyMalformed, format!("manifest {backup_id}: {e}")))?;
    if m.backup_id != backup_id || m.deployment != deployment {
        return Err(Problem::new(
            Code::VerifySignatureInvalid,
            format!("manifest {key} names another backup ({})", m.backup_id),
        ));
    }
    m.validate()?;
    Ok(m)
}

fn not_found(backup_id: &str) -> Problem {
    Problem::new(Code::BackupNotFound, format!("no backup {backup_id:?}"))
        .with("backup_id", backup_id)
        .suggest(
            "List the backups",
            Some("pg_hardstorage backup list".into()),
        )
}

/// The deployment a backup id belongs to: `<deployment>.<kind>.<stamp>`.
pub fn deployment_of(backup_id: &str) -> Result<&str, Problem> {
    match backup_id.split('.').collect::<Vec<_>>().as_slice() {
        [d, _, _] if !d.is_empty() => Ok(d),
        _ => Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{backup_id:?} is not a backup id (<deployment>.<kind>.<YYYYMMDDTHHMMSSZ>)"),
        )),
    }
}

pub fn load(repo: &Repository, backup_id: &str) -> Result<Manifest, Problem> {
    let d = deployment_of(backup_id)?;
    load_manifest(repo, d, backup_id)
}

/// Committed, not deleted backups, oldest first (only complete manifests
/// exist at all).
pub fn list(repo: &Repository, deployment: Option<&str>) -> Result<Vec<BackupSummary>, Problem> {
    let prefix = match deployment {
        Some(d) => {
            crate::deployment::validate_name(d)?;
            format!("snapshots/{d}/")
        }
        None => "snapshots/".into(),
    };
    let mut out = Vec::new();
    let mut lifecycle: std::collections::HashMap<String, Lifecycle> = Default::default();
    for o in repo.store.list(&prefix)? {
        let Some((d, id)) = split_key(&o.key) else {
            continue;
        };
        if !lifecycle.contains_key(d) {
            lifecycle.insert(d.to_string(), Lifecycle::of(repo, d)?);
        }
        let Some(l) = lifecycle.get(d) else { continue };
        if l.tombstoned.contains(id) {
            continue;
        }
        let mut s = BackupSummary::of(&load_manifest(repo, d, id)?);
        s.held = l.held(id);
        out.push(s);
    }
    out.sort_by(|a, b| (&a.finished_at, &a.backup_id).cmp(&(&b.finished_at, &b.backup_id)));
    Ok(out)
}

/// `<prefix>/<deployment>/<name>` (a manifest, a WAL record) → its parts.
pub(crate) fn split_key(key: &str) -> Option<(&str, &str)> {
    let mut parts = key.splitn(3, '/').skip(1);
    Some((parts.next()?, parts.next()?))
}

/// A deployment's tombstones and holds, read once per listing.
pub struct Lifecycle {
    pub tombstoned: std::collections::HashSet<String>,
    pub holds: std::collections::HashMap<String, crate::lifecycle::Hold>,
}

impl Lifecycle {
    pub fn of(repo: &Repository, deployment: &str) -> Result<Self, Problem> {
        Ok(Lifecycle {
            tombstoned: crate::lifecycle::tombstoned(repo, deployment)?,
            holds: crate::lifecycle::holds(repo, deployment)?,
        })
    }

    pub fn held(&self, id: &str) -> bool {
        self.holds.get(id).is_some_and(|h| h.active())
    }
}

/// Resolves `ID` or `latest` for a deployment.
pub fn resolve(repo: &Repository, deployment: &str, which: &str) -> Result<Manifest, Problem> {
    if which == "latest" {
        let all = list(repo, Some(deployment))?;
        let newest = all.last().ok_or_else(|| {
            Problem::new(
                Code::BackupNotFound,
                format!("deployment {deployment:?} has no backup yet"),
            )
            .with("deployment", deployment)
            .suggest(
                "Take one",
                Some(format!("pg_hardstorage backup run {deployment}")),
            )
        })?;
        return load_manifest(repo, deployment, &newest.backup_id);
    }
    let d = deployment_of(which)?;
    if d != deployment {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("backup {which} belongs to deployment {d:?}, not {deployment:?}"),
        ));
    }
    if let Some(t) = crate::lifecycle::tombstone(repo, which)? {
        return Err(crate::lifecycle::deleted(which, &t));
    }
    load_manifest(repo, deployment, which)
}

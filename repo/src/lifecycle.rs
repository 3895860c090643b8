//! Backup lifecycle: soft delete (a tombstone) and legal holds.
//!
//! A tombstone (`tombstones/<deployment>/<backup_id>`) hides a backup from
//! listings, `latest` and restores; its data stays until garbage collection
//! reclaims what no live backup references. A hold
//! (`holds/<deployment>/<backup_id>`) refuses deletion while it is active
//! (no expiry, or an expiry in the future); it is never removed except by
//! an explicit release. Both are sealed JSON records (docs/specs/format.md).

use crate::Repository;
use pg_hardstorage_engine::format::{HOLD_MAGIC, TOMBSTONE_MAGIC};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hold {
    pub backup_id: String,
    pub held_at: String,
    /// Who placed it (`cli:<user>`, `token:<name>`, `mtls:<cn>`).
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// RFC 3339; after it the hold no longer blocks deletion (the record stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

impl Hold {
    pub fn active(&self) -> bool {
        match &self.until {
            None => true,
            Some(u) => OffsetDateTime::parse(u, &Rfc3339)
                .map(|t| t > OffsetDateTime::now_utc())
                .unwrap_or(true),
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tombstone {
    pub backup_id: String,
    pub deleted_at: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn hold_key(d: &str, id: &str) -> String {
    format!("holds/{d}/{id}")
}

fn tombstone_key(d: &str, id: &str) -> String {
    format!("tombstones/{d}/{id}")
}

/// Whether `id` has a tombstone or a hold: its manifest may be gone (GC
/// removed it) but the id stays taken, so a new backup never inherits a
/// deleted one's tombstone.
pub(crate) fn id_has_records(repo: &Repository, d: &str, id: &str) -> Result<bool, Problem> {
    Ok(repo.store.head(&tombstone_key(d, id))?.is_some()
        || repo.store.head(&hold_key(d, id))?.is_some())
}

fn read<T: for<'de> Deserialize<'de>>(
    repo: &Repository,
    magic: &[u8; 8],
    key: &str,
) -> Result<Option<T>, Problem> {
    match repo.get_sealed(magic, key)? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("{key}: {e}"))),
        None => Ok(None),
    }
}

fn ids(repo: &Repository, prefix: &str) -> Result<Vec<String>, Problem> {
    Ok(repo
        .store
        .list(prefix)?
        .into_iter()
        .map(|o| o.key.trim_start_matches(prefix).to_string())
        .collect())
}

/// The tombstoned backup ids of a deployment.
pub fn tombstoned(repo: &Repository, deployment: &str) -> Result<HashSet<String>, Problem> {
    Ok(ids(repo, &format!("tombstones/{deployment}/"))?
        .into_iter()
        .collect())
}

/// The holds of a deployment, by backup id.
pub fn holds(repo: &Repository, deployment: &str) -> Result<HashMap<String, Hold>, Problem> {
    let mut out = HashMap::new();
    for id in ids(repo, &format!("holds/{deployment}/"))? {
        if let Some(h) = read::<Hold>(repo, HOLD_MAGIC, &hold_key(deployment, &id))? {
            out.insert(id, h);
        }
    }
    Ok(out)
}

pub fn tombstone(repo: &Repository, id: &str) -> Result<Option<Tombstone>, Problem> {
    let d = crate::catalog::deployment_of(id)?;
    read(repo, TOMBSTONE_MAGIC, &tombstone_key(d, id))
}

pub fn hold_of(repo: &Repository, id: &str) -> Result<Option<Hold>, Problem> {
    let d = crate::catalog::deployment_of(id)?;
    read(repo, HOLD_MAGIC, &hold_key(d, id))
}

/// The error for a backup that was deleted.
pub fn deleted(id: &str, t: &Tombstone) -> Problem {
    Problem::new(
        Code::BackupDeleted,
        format!("backup {id} was deleted at {} by {}", t.deleted_at, t.by),
    )
    .with("backup_id", id)
    .suggest(
        "Pick another backup; a deleted one stays in the repository only until garbage collection",
        Some("pg_hardstorage backup list".into()),
    )
}

fn parse_until(until: Option<&str>) -> Result<Option<String>, Problem> {
    let Some(u) = until else { return Ok(None) };
    let t = OffsetDateTime::parse(u, &Rfc3339).map_err(|e| {
        Problem::new(
            Code::UsageInvalidTime,
            format!("hold expiry {u:?} is not RFC 3339: {e}"),
        )
        .suggest("Give a time such as 2027-01-31T00:00:00Z", None)
    })?;
    Ok(Some(
        t.to_offset(time::UtcOffset::UTC)
            .format(&Rfc3339)
            .unwrap_or_else(|_| u.to_string()),
    ))
}

/// Places (or replaces) a legal hold on a live backup.
pub fn hold(
    repo: &Repository,
    id: &str,
    by: &str,
    reason: Option<String>,
    until: Option<&str>,
) -> Result<Hold, Problem> {
    let m = crate::catalog::load(repo, id)?;
    if let Some(t) = tombstone(repo, id)? {
        return Err(deleted(id, &t));
    }
    let h = Hold {
        backup_id: id.to_string(),
        held_at: pg_hardstorage_engine::event::now_rfc3339(),
        by: by.to_string(),
        reason,
        until: parse_until(until)?,
    };
    let body = serde_json::to_vec(&h).map_err(|e| Problem::internal(e.to_string()))?;
    repo.put_sealed(HOLD_MAGIC, &hold_key(&m.deployment, id), &body)?;
    Ok(h)
}

/// Removes a hold; the only way one ever goes away.
pub fn release(repo: &Repository, id: &str) -> Result<Hold, Problem> {
    let d = crate::catalog::deployment_of(id)?;
    let h = hold_of(repo, id)?.ok_or_else(|| {
        Problem::new(Code::HoldNotFound, format!("backup {id} has no hold")).with("backup_id", id)
    })?;
    repo.store.delete(&hold_key(d, id))?;
    Ok(h)
}

/// Soft-deletes a backup: refused while an active hold exists. Deleting a
/// deleted backup returns its tombstone.
pub fn delete(
    repo: &Repository,
    id: &str,
    by: &str,
    reason: Option<String>,
) -> Result<Tombstone, Problem> {
    let m = crate::catalog::load(repo, id)?;
    if let Some(t) = tombstone(repo, id)? {
        return Ok(t);
    }
    if let Some(h) = hold_of(repo, id)?.filter(Hold::active) {
        return Err(Problem::new(
            Code::BackupHeld,
            format!(
                "backup {id} is under a legal hold placed at {} by {}{}",
                h.held_at,
                h.by,
                h.until
                    .as_ref()
                    .map(|u| format!(" until {u}"))
                    .unwrap_or_default()
            ),
        )
        .with("backup_id", id)
        .suggest(
            "Release the hold first, if you are entitled to",
            Some(format!("pg_hardstorage backup release {id}")),
        ));
    }
    let t = Tombstone {
        backup_id: id.to_string(),
        deleted_at: pg_hardstorage_engine::event::now_rfc3339(),
        by: by.to_string(),
        reason,
    };
    let body = serde_json::to_vec(&t).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal(TOMBSTONE_MAGIC, &tombstone_key(&m.deployment, id), &body)?;
    if !repo.store.put_if_absent(
        &tombstone_key(&m.deployment, id),
        bytes::Bytes::from(sealed),
    )? {
        // Deleted concurrently: theirs stands.
        return tombstone(repo, id)?.ok_or_else(|| Problem::internal("tombstone vanished"));
    }
    Ok(t)
}

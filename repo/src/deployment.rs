//! Deployments: named sources of backups, stored sealed in the repository
//! (`deployments/<name>`), since a connection string may carry secrets.

use crate::Repository;
use pg_hardstorage_engine::format::DEPLOYMENT_MAGIC;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::{Deserialize, Serialize};

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Path,
    Postgres,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub name: String,
    pub kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgdata: Option<String>,
    pub created_at: String,
    /// The PostgreSQL cluster this deployment was first seen to be; every
    /// later connection must show the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<String>,
    /// The tenant that owns it (RBAC scope); `default` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Deployment {
    /// Same settings (ignoring timestamps): an idempotent create matches.
    fn same_settings(&self, other: &Deployment) -> bool {
        self.kind == other.kind
            && self.path == other.path
            && self.pg == other.pg
            && self.pgdata == other.pgdata
            && self.tenant() == other.tenant()
    }

    pub fn tenant(&self) -> &str {
        self.tenant.as_deref().unwrap_or(DEFAULT_TENANT)
    }

    /// The JSON body shown by `deployment show` (connection strings redacted).
    pub fn public(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(pg) = &self.pg {
            v["pg"] = serde_json::Value::String(phs_pg::conninfo::redact(pg));
        }
        v
    }
}

pub const DEFAULT_TENANT: &str = "default";

pub fn validate_name(name: &str) -> Result<(), Problem> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("deployment name {name:?} is invalid: use 1-63 of [A-Za-z0-9_-]"),
        )
        .suggest("Pick a name such as db1 or orders_prod", None))
    }
}

fn key(name: &str) -> String {
    format!("deployments/{name}")
}

/// Creates a deployment; returns `(deployment, created)`. Idempotent on name:
/// the same settings return the existing one, different ones conflict.
pub fn create(repo: &Repository, mut d: Deployment) -> Result<(Deployment, bool), Problem> {
    validate_name(&d.name)?;
    if let Some(t) = &d.tenant {
        validate_name(t).map_err(|_| {
            Problem::new(
                Code::DeploymentInvalid,
                format!(
                    "tenant {:?} is invalid: use 1-63 of [A-Za-z0-9_-]",
                    t.chars().take(80).collect::<String>()
                ),
            )
            .with("field", "tenant")
        })?;
    }
    if d.kind == Kind::Path {
        let p = d.path.as_deref().unwrap_or_default();
        let abs = std::path::absolute(p)
            .map_err(|e| Problem::new(Code::DeploymentInvalid, format!("path {p:?}: {e}")))?;
        d.path = Some(abs.display().to_string());
    }
    if d.kind == Kind::Postgres {
        let pg = d.pg.as_deref().ok_or_else(|| {
            Problem::new(
                Code::DeploymentInvalid,
                "a postgres deployment needs --pg CONNINFO",
            )
        })?;
        phs_pg::ConnInfo::parse(pg)?;
    }
    if let Some(existing) = get_opt(repo, &d.name)? {
        if existing.same_settings(&d) {
            return Ok((existing, false));
        }
        if existing.tenant() != d.tenant() {
            return Err(taken(&d.name));
        }
        return Err(Problem::new(
            Code::DeploymentConflict,
            format!("deployment {:?} exists with different settings", d.name),
        )
        .with("deployment", d.name.clone())
        .suggest(
            "Choose another name, or delete the existing deployment first (its backups are kept)",
            Some(format!("pg_hardstorage deployment show {}", d.name)),
        ));
    }
    if let Some(raw) = repo.get_sealed(DEPLOYMENT_MAGIC, &retired_key(&d.name))? {
        let old: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        let owner = old["tenant"].as_str().unwrap_or(DEFAULT_TENANT);
        if owner != d.tenant() {
            return Err(taken(&d.name));
        }
    }
    let body = serde_json::to_vec(&d).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal_private(DEPLOYMENT_MAGIC, &key(&d.name), &body)?;
    if !repo
        .store
        .put_if_absent(&key(&d.name), bytes::Bytes::from(sealed))?
    {
        // Someone created it concurrently: resolve as above.
        return create(repo, d);
    }
    Ok((d, true))
}

/// A name another tenant holds (live, or deleted with its backups kept):
/// one answer for both, saying nothing of the holder or its settings, so a
/// create cannot be used to learn what another tenant has.
fn taken(name: &str) -> Problem {
    Problem::new(
        Code::DeploymentConflict,
        format!("the deployment name {name:?} is not available"),
    )
    .with("deployment", name)
    .suggest("Choose another name", None)
}

pub fn get_opt(repo: &Repository, name: &str) -> Result<Option<Deployment>, Problem> {
    validate_name(name)?;
    match repo.get_sealed(DEPLOYMENT_MAGIC, &key(name))? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Problem::new(Code::VerifyMalformed, format!("deployment {name}: {e}"))),
        None => Ok(None),
    }
}

pub fn get(repo: &Repository, name: &str) -> Result<Deployment, Problem> {
    get_opt(repo, name)?.ok_or_else(|| {
        Problem::new(
            Code::DeploymentNotFound,
            format!("no deployment named {name:?}"),
        )
        .with("deployment", name)
        .suggest(
            "List the deployments",
            Some("pg_hardstorage deployment list".into()),
        )
    })
}

pub fn list(repo: &Repository) -> Result<Vec<Deployment>, Problem> {
    let mut out = Vec::new();
    for o in repo.store.list("deployments/")? {
        let name = o.key.trim_start_matches("deployments/");
        if let Some(d) = get_opt(repo, name)? {
            out.push(d);
        }
    }
    Ok(out)
}

fn store(repo: &Repository, d: &Deployment) -> Result<(), Problem> {
    let body = serde_json::to_vec(d).map_err(|e| Problem::internal(e.to_string()))?;
    let sealed = repo.seal_private(DEPLOYMENT_MAGIC, &key(&d.name), &body)?;
    repo.store.put(&key(&d.name), bytes::Bytes::from(sealed))
}

/// Changes a deployment's source settings (`None` keeps a field).
pub fn update(
    repo: &Repository,
    name: &str,
    pg: Option<String>,
    pgdata: Option<String>,
    path: Option<String>,
) -> Result<Deployment, Problem> {
    let mut d = get(repo, name)?;
    if let Some(pg) = pg {
        if d.kind != Kind::Postgres {
            return Err(Problem::new(
                Code::DeploymentInvalid,
                format!("{name} is a path deployment; --pg does not apply"),
            ));
        }
        phs_pg::ConnInfo::parse(&pg)?;
        d.pg = Some(pg);
    }
    if let Some(pgdata) = pgdata {
        d.pgdata = Some(pgdata);
    }
    if let Some(path) = path {
        if d.kind != Kind::Path {
            return Err(Problem::new(
                Code::DeploymentInvalid,
                format!("{name} is a postgres deployment; --path does not apply"),
            ));
        }
        let abs = std::path::absolute(&path)
            .map_err(|e| Problem::new(Code::DeploymentInvalid, format!("path {path:?}: {e}")))?;
        d.path = Some(abs.display().to_string());
    }
    store(repo, &d)?;
    Ok(d)
}

/// Binds the deployment to the cluster it is connected to on first contact,
/// and refuses a different cluster afterwards.
pub fn bind_system(repo: &Repository, name: &str, sysid: &str) -> Result<(), Problem> {
    let mut d = get(repo, name)?;
    match d.system_identifier.as_deref() {
        Some(known) if known == sysid => Ok(()),
        Some(known) => Err(Problem::new(
            Code::PgSystemMismatch,
            format!("deployment {name} is cluster {known}, but the server is cluster {sysid}"),
        )
        .with("deployment", name)
        .suggest(
            "Point the deployment at its own cluster, or create a new deployment for this one",
            Some(format!("pg_hardstorage deployment show {name}")),
        )),
        None => {
            d.system_identifier = Some(sysid.to_string());
            store(repo, &d)
        }
    }
}

/// Removes the deployment record; its backups stay in the repository.
pub fn delete(repo: &Repository, name: &str) -> Result<Deployment, Problem> {
    let d = get(repo, name)?;
    // Its backups stay under its name: remember whose they are, so another
    // tenant cannot re-create the name and inherit them.
    let body = serde_json::to_vec(&serde_json::json!({
        "name": d.name,
        "tenant": d.tenant(),
        "deleted_at": pg_hardstorage_engine::event::now_rfc3339(),
    }))
    .map_err(|e| Problem::internal(e.to_string()))?;
    repo.put_sealed(DEPLOYMENT_MAGIC, &retired_key(name), &body)?;
    repo.store.delete(&key(name))?;
    Ok(d)
}

fn retired_key(name: &str) -> String {
    format!("deployments-retired/{name}")
}

//! `/v1/deployments`: list, create, show, update, delete.

use super::{Ctx, Reply};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::deployment::{Deployment, Kind};
use pg_hardstorage_repo::ops;
use serde::Deserialize;

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

pub fn list(c: Ctx) -> Reply {
    Box::pin(async move {
        let tenant = c.tenant();
        c.answer(move |st| ops::deployments_list(&st.repo, tenant.as_deref()))
            .await
    })
}

/// The tenant a create is for: the caller's own, which a tenant-bound
/// caller may not name otherwise.
fn tenant_of(caller: Option<String>, want: Option<String>) -> Result<Option<String>, Problem> {
    match (caller, want) {
        (Some(t), Some(want)) if t != want => Err(Problem::new(
            Code::AuthzDenied,
            format!("a token of tenant {t:?} cannot create deployments of {want:?}"),
        )),
        (Some(t), _) => Ok(Some(t)),
        (None, want) => Ok(want),
    }
}

fn kind_of(b: &CreateDeployment) -> Result<Kind, Problem> {
    match b.kind.as_deref() {
        Some("postgres") => Ok(Kind::Postgres),
        Some("path") => Ok(Kind::Path),
        None if b.path.is_some() => Ok(Kind::Path),
        None => Ok(Kind::Postgres),
        Some(k) => Err(Problem::new(
            Code::ApiBadRequest,
            format!("kind {k:?}: want postgres or path"),
        )),
    }
}

pub fn create(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: CreateDeployment = c.json()?;
        let tenant = tenant_of(c.tenant(), b.tenant.clone())?;
        let kind = kind_of(&b)?;
        let dep = Deployment {
            tenant,
            name: b.name,
            kind,
            path: b.path,
            pg: b.pg,
            pgdata: b.pgdata,
            created_at: pg_hardstorage_engine::event::now_rfc3339(),
            system_identifier: None,
        };
        let actor = c.actor();
        c.answer(move |st| ops::deployments_create(&st.repo, &actor, dep))
            .await
    })
}

pub fn show(c: Ctx) -> Reply {
    Box::pin(async move {
        let d = c.deployment();
        c.answer(move |st| ops::deployments_show(&st.repo, &d))
            .await
    })
}

pub fn update(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: UpdateDeployment = c.json()?;
        let (d, actor) = (c.deployment(), c.actor());
        c.answer(move |st| ops::deployments_update(&st.repo, &actor, &d, b.pg, b.pgdata, b.path))
            .await
    })
}

pub fn delete(c: Ctx) -> Reply {
    Box::pin(async move {
        let (d, actor) = (c.deployment(), c.actor());
        c.answer(move |st| ops::deployments_delete(&st.repo, &actor, &d))
            .await
    })
}

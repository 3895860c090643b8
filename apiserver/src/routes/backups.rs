//! `/v1/deployments/{d}/backups…` and `/v1/search`.

use super::{blocking, stream, Ctx, Reply};
use crate::body::Body;
use hyper::Response;
use pg_hardstorage_engine::pipeline::{default_workers, PipelineConfig};
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::backup::BackupOptions;
use pg_hardstorage_repo::ops;
use pg_hardstorage_repo::Repository;
use serde::Deserialize;
use serde_json::Value;

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
    /// PostgreSQL 17+: read every file, not only the changed blocks.
    #[serde(default)]
    pub full: bool,
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

/// `GET /v1/search`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    #[serde(default)]
    q: String,
}

pub fn list(c: Ctx) -> Reply {
    Box::pin(async move {
        let d = c.deployment();
        // Dashboards poll this: served from memory when fresh.
        if let Some(body) = c.st.cached_listing(&d, &c.who) {
            return c.ok(body);
        }
        let st = c.st.clone();
        let owner = c.owner().unwrap_or_default().to_string();
        let body = blocking(move || {
            let body = st.backups_list(&d)?;
            st.remember_listing(&d, &owner, &body);
            Ok(body)
        })
        .await?;
        c.ok(body)
    })
}

pub fn show(c: Ctx) -> Reply {
    Box::pin(async move {
        let id = c.param("id");
        c.answer(move |st| ops::backups_show(&st.repo, &id)).await
    })
}

/// What one caller may ask of the machine: no more workers than cores, no
/// more than [`MAX_QUEUE_BYTES`] of queues.
fn pipeline_for(b: &TakeBackup) -> PipelineConfig {
    let mut pipeline = PipelineConfig::default();
    if let Some(w) = b.workers {
        pipeline.workers = w.clamp(1, default_workers());
    }
    if let Some(q) = b.queue_bytes {
        pipeline.queue_bytes = q.clamp(1 << 20, MAX_QUEUE_BYTES);
    }
    pipeline
}

pub fn take(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: TakeBackup = c.json()?;
        let opts = BackupOptions {
            pipeline: pipeline_for(&b),
            read_backend: None,
            full: b.full,
        };
        let (st, d, actor) = (c.st.clone(), c.deployment(), c.actor());
        Ok(stream(&c.st, c.command(), c.mode, move |bus| {
            let r = ops::backups_take(&st.repo, &actor, &d, bus, &opts);
            st.forget_listing(&d);
            r
        })
        .await)
    })
}

pub fn verify(c: Ctx) -> Reply {
    Box::pin(async move {
        let (repo, id) = (c.st.repo.clone(), c.param("id"));
        let threads = default_workers();
        Ok(stream(&c.st, c.command(), c.mode, move |bus| {
            ops::backups_verify(&repo, &id, bus, threads)
        })
        .await)
    })
}

/// Changes one backup's lifecycle (`change(repo, backup id, actor)`) and
/// drops its deployment's cached listing, so the change shows at once.
async fn lifecycle(
    c: Ctx,
    change: impl FnOnce(&Repository, &str, &str) -> Result<Value, Problem> + Send + 'static,
) -> Result<Response<Body>, Problem> {
    let (d, id, by) = (c.deployment(), c.param("id"), c.actor());
    c.answer(move |st| {
        let r = change(&st.repo, &id, &by);
        st.forget_listing(&d);
        r
    })
    .await
}

pub fn delete(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: DeleteBackup = c.json()?;
        lifecycle(c, |repo, id, by| {
            ops::backups_delete(repo, id, by, b.reason)
        })
        .await
    })
}

pub fn hold(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: PlaceHold = c.json()?;
        lifecycle(c, move |repo, id, by| {
            ops::backups_hold(repo, id, by, b.reason, b.until.as_deref())
        })
        .await
    })
}

pub fn release(c: Ctx) -> Reply {
    Box::pin(async move { lifecycle(c, |repo, id, by| ops::backups_release(repo, by, id)).await })
}

/// Backups of the deployments the caller's tenant may see.
pub fn search(c: Ctx) -> Reply {
    Box::pin(async move {
        let q: SearchQuery = c.query()?;
        let tenant = c.tenant();
        c.answer(move |st| ops::search(&st.repo, &q.q, tenant.as_deref()))
            .await
    })
}

//! Liveness, readiness, metrics, the API document and the doctor.

use super::{plain, Ctx, Reply, Seconds};
use crate::body::Body;
use serde::Deserialize;
use serde_json::json;

pub fn live(c: Ctx) -> Reply {
    Box::pin(async move { c.ok(json!({"status": "ok"})) })
}

pub fn ready(c: Ctx) -> Reply {
    Box::pin(async move { c.answer(|st| st.ready()).await })
}

pub fn metrics(c: Ctx) -> Reply {
    Box::pin(async move {
        let text = c.st.metrics.render();
        Ok(plain("text/plain; version=0.0.4", Body::full(text)))
    })
}

pub fn openapi(_: Ctx) -> Reply {
    Box::pin(async move {
        Ok(plain(
            "application/yaml",
            Body::full(crate::openapi::yaml()),
        ))
    })
}

/// `GET /v1/doctor…` and `GET /v1/deployments/{d}/health`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DoctorQuery {
    max_age_seconds: Option<Seconds>,
}

/// The doctor's report: of one deployment when the route names one, else
/// of every deployment the caller's tenant may see.
pub fn doctor(c: Ctx) -> Reply {
    Box::pin(async move {
        let q: DoctorQuery = c.query()?;
        let mut opts = pg_hardstorage_repo::doctor::DoctorOptions::default();
        if let Some(Seconds(s)) = q.max_age_seconds {
            opts.max_backup_age = s;
        }
        let dep = Some(c.deployment()).filter(|d| !d.is_empty());
        let tenant = c.tenant();
        c.answer(move |st| {
            pg_hardstorage_repo::ops::doctor_for(&st.repo, dep.as_deref(), tenant.as_deref(), &opts)
        })
        .await
    })
}

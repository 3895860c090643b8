//! `/v1/audit…`: the audit log.

use super::{Ctx, Reply};
use pg_hardstorage_repo::ops;
use serde::Deserialize;

/// `GET /v1/audit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// RFC 3339 or relative ("2 hours ago").
    since: Option<String>,
    action: Option<String>,
    deployment: Option<String>,
}

/// The events the caller's tenant may see.
pub fn search(c: Ctx) -> Reply {
    Box::pin(async move {
        let q: AuditQuery = c.query()?;
        let f = pg_hardstorage_repo::audit::Filter {
            since: q.since,
            action: q.action,
            deployment: q.deployment,
        };
        let tenant = c.tenant();
        c.answer(move |st| ops::audit_search_for(&st.repo, &f, tenant.as_deref()))
            .await
    })
}

pub fn verify_chain(c: Ctx) -> Reply {
    Box::pin(async move { c.answer(|st| ops::audit_verify_chain(&st.repo)).await })
}

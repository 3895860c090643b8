//! `/v1/repos/{r}…` and `/v1/agents`: the whole repository.

use super::{stream, Ctx, Flag, Reply, Seconds};
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::{ops, Repository};
use serde::Deserialize;
use serde_json::Value;

/// `POST /v1/repos/{r}/gc`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcQuery {
    apply: Option<Flag>,
    grace_seconds: Option<Seconds>,
}

/// `POST /v1/repos/{r}/scrub`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScrubQuery {
    apply: Option<Flag>,
}

/// Routes that take no query parameter refuse any.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoQuery {}

/// A repository-wide report that takes no query parameter.
fn report(c: Ctx, f: fn(&Repository) -> Result<Value, Problem>) -> Reply {
    Box::pin(async move {
        c.query::<NoQuery>()?;
        c.answer(move |st| f(&st.repo)).await
    })
}

pub fn show(c: Ctx) -> Reply {
    report(c, ops::repos_show)
}

pub fn check(c: Ctx) -> Reply {
    report(c, ops::repos_check)
}

pub fn usage(c: Ctx) -> Reply {
    report(c, ops::repos_usage)
}

/// Default grace of a GC over the API: what a backup may take to commit.
const GC_GRACE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

pub fn gc(c: Ctx) -> Reply {
    Box::pin(async move {
        let q: GcQuery = c.query()?;
        let opts = pg_hardstorage_repo::gc::GcOptions {
            apply: q.apply.unwrap_or_default().0,
            grace: q.grace_seconds.map_or(GC_GRACE, |s| s.0),
            ..Default::default()
        };
        let (st, actor) = (c.st.clone(), c.actor());
        Ok(stream(&c.st, c.command(), c.mode, move |bus| {
            ops::repos_gc(&st.repo, &actor, &opts, bus)
        })
        .await)
    })
}

pub fn scrub(c: Ctx) -> Reply {
    Box::pin(async move {
        let q: ScrubQuery = c.query()?;
        let apply = q.apply.unwrap_or_default().0;
        let (st, actor) = (c.st.clone(), c.actor());
        let threads = pg_hardstorage_engine::pipeline::default_workers();
        Ok(stream(&c.st, c.command(), c.mode, move |bus| {
            ops::repos_scrub(&st.repo, &actor, apply, bus, threads)
        })
        .await)
    })
}

pub fn agents(c: Ctx) -> Reply {
    Box::pin(async move { c.answer(|st| ops::agents_list(&st.repo)).await })
}

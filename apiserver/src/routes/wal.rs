//! `/v1/deployments/{d}/wal…`.

use super::{blocking, report_drops, Ctx, Reply};
use crate::body::Body;
use hyper::Response;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_repo::ops;

pub fn list(c: Ctx) -> Reply {
    Box::pin(async move {
        let (st, d) = (c.st.clone(), c.deployment());
        let body = blocking(move || ops::wal_list(&st.repo, &d)).await?;
        c.ok(body)
    })
}

/// One archived segment's bytes, verified.
pub fn fetch(c: Ctx) -> Reply {
    Box::pin(async move {
        let (st, d, seg) = (c.st.clone(), c.deployment(), c.param("seg"));
        let data = blocking(move || pg_hardstorage_repo::wal::read(&st.repo, &d, &seg)).await?;
        Ok(Response::builder()
            .status(200)
            .header("content-type", "application/octet-stream")
            .body(Body::full(data))
            .unwrap_or_else(|_| Response::new(Body::full(""))))
    })
}

pub fn repair(c: Ctx) -> Reply {
    Box::pin(async move {
        let (st, d, actor) = (c.st.clone(), c.deployment(), c.actor());
        let body = blocking(move || {
            let bus = EventBus::new();
            let drops = st.attach_sinks(&bus);
            let r = ops::wal_repair(&st.repo, &actor, &d, &bus);
            report_drops(&bus, &drops);
            bus.close();
            r
        })
        .await?;
        c.ok(body)
    })
}

//! `/v1/deployments/{d}/wal…`.

use super::{blocking, plain, report_drops, Ctx, Reply};
use crate::body::Body;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_repo::ops;

pub fn list(c: Ctx) -> Reply {
    Box::pin(async move {
        let d = c.deployment();
        c.answer(move |st| ops::wal_list(&st.repo, &d)).await
    })
}

/// One archived segment's bytes, verified.
pub fn fetch(c: Ctx) -> Reply {
    Box::pin(async move {
        let (st, d, seg) = (c.st.clone(), c.deployment(), c.param("seg"));
        let data = blocking(move || pg_hardstorage_repo::wal::read(&st.repo, &d, &seg)).await?;
        Ok(plain("application/octet-stream", Body::full(data)))
    })
}

pub fn repair(c: Ctx) -> Reply {
    Box::pin(async move {
        let (d, actor) = (c.deployment(), c.actor());
        c.answer(move |st| {
            let bus = EventBus::new();
            let drops = st.attach_sinks(&bus);
            let r = ops::wal_repair(&st.repo, &actor, &d, &bus);
            report_drops(&bus, &drops);
            bus.close();
            r
        })
        .await
    })
}

//! `/v1/deployments/{d}/restores…`.

use super::{blocking, stream, Ctx, Reply};
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_repo::ops;
use serde::Deserialize;

/// `POST /v1/deployments/{d}/restores`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRestore {
    /// A backup id or `latest` (the default).
    #[serde(default)]
    pub backup_id: Option<String>,
    /// Directory on the server's host.
    pub target: String,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub to_lsn: Option<String>,
    #[serde(default)]
    pub to_name: Option<String>,
    /// `auto` (default), `skip` or `require`.
    #[serde(default)]
    pub verify: Option<String>,
    #[serde(default)]
    pub force: Option<bool>,
    /// `OLD=NEW` directory mappings for tablespaces.
    #[serde(default)]
    pub tablespace_mapping: Option<Vec<String>>,
    /// Into an existing data directory of the same cluster: write only the
    /// files and pages that differ, remove what the backup does not have.
    #[serde(default)]
    pub delta: Option<bool>,
    /// Start the restored cluster as a standby (`standby.signal`).
    #[serde(default)]
    pub standby: Option<bool>,
    /// With `standby`: the `primary_conninfo` to follow (else the backup's).
    #[serde(default)]
    pub primary_conninfo: Option<String>,
}

impl StartRestore {
    fn request(self, deployment: String) -> ops::RestoreRequest {
        ops::RestoreRequest {
            deployment,
            backup: self.backup_id.unwrap_or_else(|| "latest".into()),
            target: self.target.into(),
            to: self.to,
            to_lsn: self.to_lsn,
            to_name: self.to_name,
            verify: self.verify.unwrap_or_default(),
            force: self.force.unwrap_or(false),
            threads: pg_hardstorage_engine::pipeline::default_workers(),
            tablespace_mapping: self.tablespace_mapping.unwrap_or_default(),
            delta: self.delta.unwrap_or(false),
            wal_prefetch: pg_hardstorage_repo::restore::DEFAULT_PREFETCH,
            standby: self
                .standby
                .unwrap_or(false)
                .then_some(self.primary_conninfo),
        }
    }
}

pub fn initiate(c: Ctx) -> Reply {
    Box::pin(async move {
        let b: StartRestore = c.json()?;
        let req = b.request(c.deployment());
        // Pre-flight before the stream starts: a refusal is a 412.
        let st = c.st.clone();
        let (m, opts) = blocking(move || {
            let rc = st.restore_command.clone();
            let dep = req.deployment.clone();
            ops::restore_plan(&st.repo, &req, &|| rc(&dep), &EventBus::new())
        })
        .await?;
        let (repo, actor) = (c.st.repo.clone(), c.actor());
        Ok(stream(&c.st, c.command(), c.mode, move |bus| {
            ops::restores_run(&repo, &actor, &m, &opts, bus)
        })
        .await)
    })
}

pub fn status(c: Ctx) -> Reply {
    Box::pin(async move {
        let (d, id) = (c.deployment(), c.param("id"));
        c.answer(move |st| ops::restores_status(&st.repo, &d, &id))
            .await
    })
}

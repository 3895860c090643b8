//! Library-level integration tests: real repositories on disk, in memory
//! and on a real S3 endpoint (moto).

mod backpressure;
mod dedup;
mod delta;
mod gc;
mod integrity;
mod pagededup;
mod pgtls;
mod postgres;
mod restore_safety;
mod roundtrip;
mod s3;
mod sealed;

use pg_hardstorage_engine::event::{EventBus, Recorder};
use pg_hardstorage_engine::format::Manifest;
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_engine::Problem;
use pg_hardstorage_repo::backup::{take_backup, BackupOptions};
use pg_hardstorage_repo::deployment::{self, Deployment, Kind};
use pg_hardstorage_repo::restore::{restore, RestoreOptions};
use pg_hardstorage_repo::Repository;
use std::path::Path;
use std::time::Duration;

pub fn add_path_deployment(repo: &Repository, name: &str, path: &Path) {
    deployment::create(
        repo,
        Deployment {
            name: name.into(),
            kind: Kind::Path,
            path: Some(path.display().to_string()),
            pg: None,
            pgdata: None,
            created_at: String::new(),
            system_identifier: None,
            tenant: None,
        },
    )
    .expect("create deployment");
}

/// A path deployment `name` of a directory holding one file, backed up.
pub fn one_file_backup(
    repo: &Repository,
    tmp: &Path,
    name: &str,
    file: &str,
    data: &[u8],
) -> Manifest {
    let src = tmp.join(format!("src-{name}"));
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join(file), data).expect("write");
    add_path_deployment(repo, name, &src);
    backup(repo, name).expect("backup").0
}

pub fn fast_pipeline() -> PipelineConfig {
    PipelineConfig {
        workers: 2,
        queue_bytes: 8 << 20,
        progress_every: Duration::from_millis(50),
        ..Default::default()
    }
}

pub fn backup(repo: &Repository, name: &str) -> Result<(Manifest, Recorder), Problem> {
    backup_opts(repo, name, false)
}

/// A backup; `full` reads every file even where it could be incremental.
pub fn backup_opts(
    repo: &Repository,
    name: &str,
    full: bool,
) -> Result<(Manifest, Recorder), Problem> {
    let bus = EventBus::new();
    let rec = Recorder::new();
    bus.add_sink(rec.clone());
    let r = take_backup(
        repo,
        name,
        &bus,
        &BackupOptions {
            pipeline: fast_pipeline(),
            read_backend: None,
            full,
        },
    );
    bus.close();
    r.map(|m| (m, rec))
}

pub fn restore_to(repo: &Repository, m: &Manifest, target: &Path) -> Result<(), Problem> {
    restore(
        repo,
        m,
        &RestoreOptions {
            target: target.to_path_buf(),
            force: false,
            threads: 2,
            recovery: None,
            verify: Default::default(),
            tablespace_mapping: Vec::new(),
            delta: false,
            pg_bindirs: Vec::new(),
            standby: None,
        },
        &EventBus::new(),
    )
    .map(|_| ())
}

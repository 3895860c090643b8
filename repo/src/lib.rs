//! pg_hardstorage's assembly layer: the repository (keys, packs, index,
//! manifests, deployments, locks) and the operations the CLI and the API
//! server both call — backup, restore, verify, bench. This is the only crate
//! that names concrete stages.
#![deny(clippy::unwrap_used)]

pub mod backup;
pub mod bench;
pub mod catalog;
pub mod chunks;
pub mod deployment;
pub mod index;
pub mod keys;
pub mod lock;
mod parallel;
pub mod pgbackup;
pub mod pitr;
pub mod repository;
pub mod restore;
pub mod verify;
pub mod wal;

pub use keys::KeySource;
pub use repository::{InitOptions, Repository};

//! pg_hardstorage's assembly layer: the repository (keys, packs, index,
//! manifests, deployments, locks) and the operations the CLI and the API
//! server both call — backup, restore, verify, bench. This is the only crate
//! that names concrete stages.
#![deny(clippy::unwrap_used)]

pub mod audit;
pub mod backup;
pub mod bench;
pub mod bench_restore;
pub mod catalog;
pub mod check;
pub mod chunks;
pub mod crosscheck;
pub mod deployment;
pub mod doctor;
pub mod fleet;
pub mod gc;
pub mod index;
pub mod keys;
pub mod kms;
pub mod lifecycle;
pub mod lock;
pub mod ops;
pub mod pages;
mod parallel;
pub mod pgbackup;
pub mod pitr;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod timelines;
pub mod tokens;
pub mod verify;
pub mod wal;

pub use keys::KeySource;
pub use repository::{InitOptions, Repository};

#[cfg(test)]
pub(crate) mod testing {
    /// An encrypted repository in memory.
    pub fn memory_repo() -> crate::Repository {
        let store = phs_store::open_store("memory://", true).expect("memory store");
        crate::Repository::init(
            store,
            &crate::KeySource::Passphrase("unit test passphrase".into()),
            crate::InitOptions::default(),
        )
        .expect("init")
    }
}

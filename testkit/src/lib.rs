//! Test helpers shared by the integration tests: repositories, generated
//! trees and their digests, and a real S3 endpoint (moto) started on demand.
//! Nothing here mocks: a helper that cannot start what it needs fails with
//! a message saying what is missing.

pub mod ca;
pub mod http;
pub mod observed;
pub mod pg;
pub mod s3;
pub mod tree;

use pg_hardstorage_engine::store::DynStore;
use pg_hardstorage_repo::{InitOptions, KeySource, Repository};

pub const PASSPHRASE: &str = "correct horse battery staple";

pub fn key() -> KeySource {
    KeySource::Passphrase(PASSPHRASE.into())
}

/// Small chunks and packs so small trees exercise many packs.
pub fn small_opts() -> InitOptions {
    let mut o = InitOptions::default();
    o.chunker.min_size = 16 << 10;
    o.chunker.avg_size = 64 << 10;
    o.chunker.max_size = 256 << 10;
    o.pack_target_bytes = 1 << 20;
    o
}

pub fn init(store: DynStore, opts: InitOptions) -> Repository {
    Repository::init(store, &key(), opts).expect("repo init")
}

/// A fresh repository in a temporary directory.
pub fn local_repo(opts: InitOptions) -> (tempfile::TempDir, Repository) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = phs_store::open_store(dir.path().join("repo").to_str().expect("utf8"), true)
        .expect("open store");
    (dir, init(store, opts))
}

/// Total bytes stored under a local directory.
pub fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            n += if m.is_dir() {
                dir_bytes(&e.path())
            } else {
                m.len()
            };
        }
    }
    n
}

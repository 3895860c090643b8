//! storage_put: chunk envelopes grouped into pack objects, written through
//! `object_store` (local directory, S3-compatible, in memory).
#![deny(clippy::unwrap_used)]

mod backend;
mod packer;

pub use backend::{open_store, open_store_with, ObjectStoreBackend, StoreOptions};
pub use packer::{new_pack_key, OnPackDurable, PackSink, PackSinkConfig};

//! pg_hardstorage engine: the thread-per-core dataflow runtime, its bounded
//! byte-budgeted edges, the typed event bus, the one error-code table and the
//! on-disk format types shared by every stage.
//!
//! This crate depends on no other crate of the workspace. Stages depend on it;
//! only the assembly layer (`pg_hardstorage_repo`, `cli`, `apiserver`) names
//! concrete stages.
#![deny(clippy::unwrap_used)]

pub mod edge;
pub mod error;
pub mod event;
pub mod format;
pub mod metrics;
pub mod pipeline;
pub mod stage;
pub mod store;

pub use error::{Class, Code, Problem, Suggestion};
pub use event::{Event, EventBus, Severity};
pub use stage::{Block, Chunk, ChunkId};

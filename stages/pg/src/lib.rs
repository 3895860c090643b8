//! The PostgreSQL source stage: a replication-protocol client (framing with
//! `postgres-protocol` over a tokio socket) and a `BASE_BACKUP` source that
//! turns the server's tar stream into pipeline blocks.
#![deny(clippy::unwrap_used)]

pub mod conn;
pub mod conninfo;
pub mod incremental;
pub mod source;
pub mod tar;
pub mod tls;

pub use conn::{format_lsn, parse_lsn, Conn, ReplMsg, SystemInfo};
pub use conninfo::ConnInfo;
pub use source::{BaseBackupInfo, BaseBackupSource, TarEntry};

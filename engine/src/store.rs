//! Storage backends are plain byte stores behind one small trait.
//!
//! A call returns only once its effect is durable: `put` and
//! `put_if_absent` mean fsync + rename on disk and a completed (conditional)
//! PUT on S3. Retry, fault injection and throttling are wrappers implementing
//! the same trait.

use crate::Code;
use crate::Problem;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Last modification, seconds since the Unix epoch (0 when unknown).
    pub modified_unix: u64,
}

pub trait Store: Send + Sync {
    /// Where it stores (for messages; never includes credentials).
    fn describe(&self) -> String;
    /// Writes or replaces `key`, durably.
    fn put(&self, key: &str, data: Bytes) -> Result<(), Problem>;
    /// Writes `key` only if absent; `Ok(false)` when it already exists.
    fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem>;
    /// Like `put_if_absent`, for an object made of several buffers.
    fn put_parts_if_absent(&self, key: &str, parts: Vec<Bytes>) -> Result<bool, Problem> {
        self.put_if_absent(key, Bytes::from(parts.concat()))
    }
    /// `Ok(None)` when absent.
    fn get(&self, key: &str) -> Result<Option<Bytes>, Problem>;
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Problem>;
    /// Size of `key`, `None` when absent.
    fn head(&self, key: &str) -> Result<Option<u64>, Problem>;
    /// Every object under `prefix`, sorted by key.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Problem>;
    /// Removes `key`; absent is not an error.
    fn delete(&self, key: &str) -> Result<(), Problem>;
}

pub type DynStore = Arc<dyn Store>;

/// Delays every write: the "artificially slow storage" of the backpressure
/// tests, and a way to rehearse a slow bucket.
pub struct Throttled {
    pub inner: DynStore,
    pub put_delay: Duration,
}

impl Store for Throttled {
    fn describe(&self) -> String {
        format!(
            "{} (throttled {:?}/put)",
            self.inner.describe(),
            self.put_delay
        )
    }
    fn put(&self, key: &str, data: Bytes) -> Result<(), Problem> {
        std::thread::sleep(self.put_delay);
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem> {
        std::thread::sleep(self.put_delay);
        self.inner.put_if_absent(key, data)
    }
    fn put_parts_if_absent(&self, key: &str, parts: Vec<Bytes>) -> Result<bool, Problem> {
        std::thread::sleep(self.put_delay);
        self.inner.put_parts_if_absent(key, parts)
    }
    fn get(&self, key: &str) -> Result<Option<Bytes>, Problem> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Problem> {
        self.inner.get_range(key, range)
    }
    fn head(&self, key: &str) -> Result<Option<u64>, Problem> {
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Problem> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), Problem> {
        self.inner.delete(key)
    }
}

/// Fails every call with `storage.unreachable` while a flag file exists:
/// rehearses an outage (and lets tests take the repository away and give
/// it back while a long-running command keeps going).
pub struct OutageWhile {
    pub inner: DynStore,
    pub flag: std::path::PathBuf,
}

impl OutageWhile {
    fn check(&self) -> Result<(), Problem> {
        if self.flag.exists() {
            return Err(Problem::new(
                Code::StorageUnreachable,
                format!(
                    "{} is unreachable (outage rehearsal)",
                    self.inner.describe()
                ),
            ));
        }
        Ok(())
    }
}

impl Store for OutageWhile {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<(), Problem> {
        self.check()?;
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem> {
        self.check()?;
        self.inner.put_if_absent(key, data)
    }
    fn put_parts_if_absent(&self, key: &str, parts: Vec<Bytes>) -> Result<bool, Problem> {
        self.check()?;
        self.inner.put_parts_if_absent(key, parts)
    }
    fn get(&self, key: &str) -> Result<Option<Bytes>, Problem> {
        self.check()?;
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Problem> {
        self.check()?;
        self.inner.get_range(key, range)
    }
    fn head(&self, key: &str) -> Result<Option<u64>, Problem> {
        self.check()?;
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Problem> {
        self.check()?;
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), Problem> {
        self.check()?;
        self.inner.delete(key)
    }
}

//! A store that logs every call (operation and key) before passing it on:
//! tests count requests (a restore's GETs) or check what an operation
//! changed (a refused GC writes nothing but its lease record).

use bytes::Bytes;
use pg_hardstorage_engine::store::{DynStore, ObjectInfo, Store};
use pg_hardstorage_engine::Problem;
use std::ops::Range;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put,
    PutIfAbsent,
    Get,
    GetRange,
    Head,
    List,
    Delete,
}

impl Op {
    /// Whether the call can change the store.
    pub fn mutates(self) -> bool {
        matches!(self, Op::Put | Op::PutIfAbsent | Op::Delete)
    }
}

pub struct Observed {
    inner: DynStore,
    log: Mutex<Vec<(Op, String)>>,
}

impl Observed {
    pub fn wrap(inner: DynStore) -> Arc<Observed> {
        Arc::new(Observed {
            inner,
            log: Mutex::new(Vec::new()),
        })
    }

    fn note(&self, op: Op, key: &str) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((op, key.to_string()));
    }

    /// The calls so far, emptying the log.
    pub fn take(&self) -> Vec<(Op, String)> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Store for Observed {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn put(&self, key: &str, data: Bytes) -> Result<(), Problem> {
        self.note(Op::Put, key);
        self.inner.put(key, data)
    }
    fn put_if_absent(&self, key: &str, data: Bytes) -> Result<bool, Problem> {
        self.note(Op::PutIfAbsent, key);
        self.inner.put_if_absent(key, data)
    }
    fn put_parts_if_absent(&self, key: &str, parts: Vec<Bytes>) -> Result<bool, Problem> {
        self.note(Op::PutIfAbsent, key);
        self.inner.put_parts_if_absent(key, parts)
    }
    fn get(&self, key: &str) -> Result<Option<Bytes>, Problem> {
        self.note(Op::Get, key);
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, Problem> {
        self.note(Op::GetRange, key);
        self.inner.get_range(key, range)
    }
    fn head(&self, key: &str) -> Result<Option<u64>, Problem> {
        self.note(Op::Head, key);
        self.inner.head(key)
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, Problem> {
        self.note(Op::List, prefix);
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), Problem> {
        self.note(Op::Delete, key);
        self.inner.delete(key)
    }
}

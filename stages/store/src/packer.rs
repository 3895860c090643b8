//! Groups chunk envelopes into pack objects of tens of MiB, so an S3
//! repository never holds millions of tiny objects, and uploads sealed packs
//! on a small pool of threads. A pack's index is published (through
//! `on_durable`) only after the pack itself is durable.

use bytes::Bytes;
use crossbeam_channel::{bounded, Sender};
use pg_hardstorage_engine::format::{PackBuilder, PackEntry};
use pg_hardstorage_engine::stage::{Chunk, ChunkId, ChunkSink};
use pg_hardstorage_engine::store::DynStore;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Called once a pack is durable, with its key and entries.
pub type OnPackDurable = Arc<dyn Fn(&str, &[PackEntry]) -> Result<(), Problem> + Send + Sync>;

#[derive(Clone, Copy, Debug)]
pub struct PackSinkConfig {
    pub pack_target_bytes: usize,
    /// Packs uploading at once.
    pub uploaders: usize,
}

impl Default for PackSinkConfig {
    fn default() -> Self {
        PackSinkConfig {
            pack_target_bytes: 32 << 20,
            uploaders: 2,
        }
    }
}

struct Sealed {
    key: String,
    parts: Vec<Bytes>,
    entries: Vec<PackEntry>,
}

pub struct PackSink {
    cfg: PackSinkConfig,
    current: PackBuilder,
    /// Chunks written by this run: a duplicate inside one backup is stored once.
    seen: HashSet<ChunkId>,
    tx: Option<Sender<Sealed>>,
    threads: Vec<JoinHandle<()>>,
    failed: Arc<Mutex<Option<Problem>>>,
}

/// A fresh pack name: 256 random bits, fanned out by their first byte.
/// (Content-derived names would cost the sink a hash pass over every stored
/// byte; integrity is checked per chunk and by the pack index checksum.)
pub fn new_pack_key() -> Result<String, Problem> {
    let mut id = [0u8; 32];
    getrandom::fill(&mut id).map_err(|e| Problem::internal(format!("getrandom: {e}")))?;
    let h = hex::encode(id);
    Ok(format!("packs/{}/{}", &h[..2], h))
}

impl PackSink {
    pub fn new(store: DynStore, cfg: PackSinkConfig, on_durable: OnPackDurable) -> Self {
        let n = cfg.uploaders.max(1);
        // A rendezvous hand-off: a sealed pack waits in the sink, not in a
        // queue, so at most `uploaders + 1` packs are in memory.
        let (tx, rx) = bounded::<Sealed>(0);
        let failed = Arc::new(Mutex::new(None));
        let threads = (0..n)
            .filter_map(|i| {
                let rx = rx.clone();
                let store = store.clone();
                let on_durable = on_durable.clone();
                let failed = failed.clone();
                std::thread::Builder::new()
                    .name(format!("upload-{i}"))
                    .spawn(move || {
                        for p in rx.iter() {
                            let r = store
                                .put_parts_if_absent(&p.key, p.parts)
                                .and_then(|_| on_durable(&p.key, &p.entries));
                            if let Err(e) = r {
                                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                                f.get_or_insert(e);
                            }
                        }
                    })
                    .ok()
            })
            .collect();
        PackSink {
            cfg,
            current: PackBuilder::new(),
            seen: HashSet::new(),
            tx: Some(tx),
            threads,
            failed,
        }
    }

    fn check(&self) -> Result<(), Problem> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(p) => Err(p.clone()),
            None => Ok(()),
        }
    }

    fn seal(&mut self) -> Result<(), Problem> {
        if self.current.is_empty() {
            return Ok(());
        }
        let builder = std::mem::take(&mut self.current);
        let (parts, entries) = builder.finish();
        let sealed = Sealed {
            key: new_pack_key()?,
            parts,
            entries,
        };
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Problem::internal("pack sink already finished"))?;
        // Blocks while every uploader is busy: the backpressure point.
        tx.send(sealed)
            .map_err(|_| Problem::new(Code::StorageIo, "pack uploaders stopped"))?;
        self.check()
    }
}

impl ChunkSink for PackSink {
    fn name(&self) -> &'static str {
        "storage_put"
    }

    fn accept(&mut self, chunk: Chunk) -> Result<u32, Problem> {
        if chunk.known || !self.seen.insert(chunk.id) {
            return Ok(0);
        }
        let env = chunk
            .payload
            .ok_or_else(|| Problem::internal("chunk reached storage_put without an envelope"))?;
        let n = env.len() as u32;
        self.current.add(chunk.id, Bytes::from(env));
        if self.current.len() >= self.cfg.pack_target_bytes {
            self.seal()?;
        }
        Ok(n)
    }

    fn finish(&mut self) -> Result<(), Problem> {
        self.seal()?;
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.check()
    }
}

impl Drop for PackSink {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

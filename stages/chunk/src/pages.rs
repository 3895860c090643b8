//! Page-aware splitting for files made of fixed-size pages (PostgreSQL
//! relation files).
//!
//! PostgreSQL rewrites scattered 8 KiB pages, so content-defined chunks
//! change almost everywhere after ordinary update traffic. Here the unit of
//! dedup is the page and the unit of storage is a *run*: up to
//! `run_pages` pages of one file that this backup has to store, in page
//! order but not necessarily adjacent. Each page is hashed (keyed BLAKE3)
//! and compared with the record of the same page in the previous backup's
//! page map; an unchanged page points at the run that already holds it and
//! costs nothing. The global dedup index never sees single pages, only
//! runs, so it stays as small as with content-defined chunks; the page maps
//! are per file and only one file's map per worker is in memory at a time.
//!
//! The assembly layer decides which files are paged (a [`PagePlanner`]),
//! supplies each one's baseline, and receives the finished [`PagedFile`].
//! Every other file goes through the wrapped content-defined chunker.

use crate::FastCdc;
use bytes::{Bytes, BytesMut};
use pg_hardstorage_engine::format::{PageMap, PageRecord, PAGE_HASH};
use pg_hardstorage_engine::stage::{Block, Chunk, ChunkId, Splitter, SplitterFactory};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::HashMap;
use std::sync::Arc;

/// How one file is to be paged.
#[derive(Clone, Debug)]
pub struct PagePlan {
    pub page_size: u32,
    /// The file as the previous backup stored it, if it did.
    pub baseline: Option<Arc<Baseline>>,
    /// The file's bytes are only some of its pages (an incremental backup
    /// sent the changed ones): the rest are the baseline's.
    pub sparse: Option<Arc<SparsePages>>,
}

/// Which pages a sparse file's bytes are, and how long the whole file is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparsePages {
    /// The page number of each page of the bytes, ascending.
    pub pages: Vec<u32>,
    /// Pages of the whole file.
    pub length: u32,
    /// Pages before this that the bytes lack are the baseline's; at or
    /// past it (or past the baseline) they are zeros.
    pub truncation: u32,
}

/// A file's page map and runs in the previous backup.
#[derive(Clone, Debug)]
pub struct Baseline {
    pub runs: Vec<(ChunkId, u32)>,
    pub map: PageMap,
}

/// What the splitter hands back for a paged file once it has seen all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedFile {
    /// The entry's `chunks`: every run its pages live in.
    pub runs: Vec<(ChunkId, u32)>,
    pub map: PageMap,
    pub pages: u64,
    /// Pages put into new runs (the rest were unchanged).
    pub pages_stored: u64,
}

/// Decides which files are paged and collects the results.
pub trait PagePlanner: Send + Sync {
    /// Called once, before the first block of `file` is split.
    fn plan(&self, file: u64) -> Option<PagePlan>;
    /// Called once, after the last block of a paged file.
    fn done(&self, file: u64, result: PagedFile);
}

pub struct PageAwareFactory {
    pub cdc: crate::Params,
    /// The repository's chunk-id key: page hashes and run ids are keyed.
    pub key: [u8; 32],
    pub planner: Arc<dyn PagePlanner>,
    pub run_pages: usize,
}

impl SplitterFactory for PageAwareFactory {
    fn name(&self) -> &'static str {
        "chunk"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn Splitter>, Problem> {
        Ok(Box::new(PageAware {
            cdc: FastCdc::new(self.cdc),
            key: self.key,
            planner: self.planner.clone(),
            run_pages: self.run_pages.clamp(1, u16::MAX as usize),
            current: None,
        }))
    }
}

pub struct PageAware {
    cdc: FastCdc,
    key: [u8; 32],
    planner: Arc<dyn PagePlanner>,
    run_pages: usize,
    /// The file being split and how (`None` inside: not paged).
    current: Option<(u64, Option<Paging>)>,
}

/// The state of one paged file.
struct Paging {
    page_size: usize,
    base_runs: Vec<(ChunkId, u32)>,
    base: Vec<PageRecord>,
    /// Baseline run index → index in `runs`, once referenced.
    remap: HashMap<u32, u32>,
    runs: Vec<(ChunkId, u32)>,
    records: Vec<u8>,
    pages: u64,
    pages_stored: u64,
    /// A partial page carried to the next block.
    carry: BytesMut,
    /// The run being filled: its index in `runs`, first page offset, bytes.
    open: Option<(u32, u64, BytesMut)>,
    /// A sparse file, and how many of its pages came so far.
    sparse: Option<(Arc<SparsePages>, usize)>,
}

impl Paging {
    fn new(plan: PagePlan) -> Result<Self, Problem> {
        let (base_runs, base) = match &plan.baseline {
            Some(b) if b.map.page_size == plan.page_size => {
                (b.runs.clone(), b.map.decode(&b.runs)?)
            }
            _ => (Vec::new(), Vec::new()),
        };
        if plan.sparse.is_some() && base.is_empty() {
            return Err(Problem::new(
                Code::BackupSourceUnreadable,
                "an incremental file has no baseline in the previous backup",
            ));
        }
        Ok(Paging {
            sparse: plan.sparse.map(|s| (s, 0)),
            page_size: plan.page_size as usize,
            base_runs,
            base,
            remap: HashMap::new(),
            runs: Vec::new(),
            records: Vec::new(),
            pages: 0,
            pages_stored: 0,
            carry: BytesMut::new(),
            open: None,
        })
    }

    fn page(
        &mut self,
        key: &[u8; 32],
        run_pages: usize,
        file: u64,
        page: &[u8],
        out: &mut dyn FnMut(Chunk),
    ) {
        let full = blake3::keyed_hash(key, page);
        let mut hash = [0u8; PAGE_HASH];
        hash.copy_from_slice(&full.as_bytes()[..PAGE_HASH]);
        let n = self.pages;
        self.pages += 1;
        let reuse = self
            .base
            .get(n as usize)
            .filter(|b| b.hash == hash)
            .copied();
        let rec = if let Some(b) = reuse {
            self.reuse(b)
        } else {
            self.pages_stored += 1;
            let ps = self.page_size;
            let runs = &mut self.runs;
            let (run, _, data) = self.open.get_or_insert_with(|| {
                runs.push((ChunkId::default(), 0));
                (
                    (runs.len() - 1) as u32,
                    n * ps as u64,
                    BytesMut::with_capacity(run_pages * ps),
                )
            });
            let slot = (data.len() / ps) as u16;
            data.extend_from_slice(page);
            let rec = PageRecord {
                hash,
                run: *run,
                slot,
            };
            if data.len() >= run_pages * ps {
                self.close_run(key, file, out);
            }
            rec
        };
        rec.encode_into(&mut self.records);
    }

    /// The record of a page the baseline holds: pointing at its run.
    fn reuse(&mut self, b: PageRecord) -> PageRecord {
        let runs = &mut self.runs;
        let base_runs = &self.base_runs;
        let run = *self.remap.entry(b.run).or_insert_with(|| {
            runs.push(base_runs[b.run as usize]);
            (runs.len() - 1) as u32
        });
        PageRecord {
            hash: b.hash,
            run,
            slot: b.slot,
        }
    }

    /// A sparse file: the pages before `target` the bytes lack, taken from
    /// the baseline (before the truncation point) or zeros.
    fn fill_to(
        &mut self,
        key: &[u8; 32],
        run_pages: usize,
        file: u64,
        target: u64,
        out: &mut dyn FnMut(Chunk),
    ) {
        let Some((sp, _)) = &self.sparse else { return };
        let truncation = sp.truncation as u64;
        let zeros = vec![0u8; self.page_size];
        while self.pages < target {
            let n = self.pages;
            match self
                .base
                .get(n as usize)
                .copied()
                .filter(|_| n < truncation)
            {
                Some(b) => {
                    self.pages += 1;
                    let rec = self.reuse(b);
                    rec.encode_into(&mut self.records);
                }
                None => self.page(key, run_pages, file, &zeros, out),
            }
        }
    }

    /// One page of the bytes: in a sparse file, the next page sent, after
    /// the ones it skips.
    fn next(
        &mut self,
        key: &[u8; 32],
        run_pages: usize,
        file: u64,
        page: &[u8],
        out: &mut dyn FnMut(Chunk),
    ) -> Result<(), Problem> {
        if let Some((sp, k)) = &mut self.sparse {
            let Some(&at) = sp.pages.get(*k) else {
                return Err(sparse_error("more pages than its header names"));
            };
            *k += 1;
            if (at as u64) < self.pages {
                return Err(sparse_error("page numbers out of order"));
            }
            self.fill_to(key, run_pages, file, at as u64, out);
        }
        self.page(key, run_pages, file, page, out);
        Ok(())
    }

    /// The end of a sparse file: its remaining pages, and every page sent.
    fn finish_sparse(
        &mut self,
        key: &[u8; 32],
        run_pages: usize,
        file: u64,
        out: &mut dyn FnMut(Chunk),
    ) -> Result<(), Problem> {
        let Some((sp, k)) = &self.sparse else {
            return Ok(());
        };
        if *k != sp.pages.len() {
            return Err(sparse_error("fewer pages than its header names"));
        }
        let length = sp.length as u64;
        self.fill_to(key, run_pages, file, length, out);
        Ok(())
    }

    /// Emits the open run as a chunk whose id is already computed.
    fn close_run(&mut self, key: &[u8; 32], file: u64, out: &mut dyn FnMut(Chunk)) {
        if let Some((run, offset, data)) = self.open.take() {
            let data: Bytes = data.freeze();
            let mut c = Chunk::new(file, offset, data);
            c.id = crate::run_id(key, &c.data);
            self.runs[run as usize] = (c.id, c.len() as u32);
            out(c);
        }
    }
}

impl PageAware {
    fn start(&mut self, file: u64) -> Result<(), Problem> {
        let paging = match self.planner.plan(file) {
            Some(plan) => Some(Paging::new(plan)?),
            None => None,
        };
        self.current = Some((file, paging));
        Ok(())
    }
}

impl Splitter for PageAware {
    fn name(&self) -> &'static str {
        "chunk"
    }

    fn push(&mut self, block: Block, out: &mut dyn FnMut(Chunk)) -> Result<(), Problem> {
        if self.current.as_ref().map(|(f, _)| *f) != Some(block.file) {
            self.start(block.file)?;
        }
        let eof = block.eof;
        let file = block.file;
        let paging = match self.current.as_mut() {
            Some((_, Some(p))) => p,
            _ => {
                let r = self.cdc.push(block, out);
                if eof {
                    self.current = None;
                }
                return r;
            }
        };
        let ps = paging.page_size;
        let mut data = block.data;
        if !paging.carry.is_empty() {
            let need = (ps - paging.carry.len()).min(data.len());
            paging.carry.extend_from_slice(&data[..need]);
            data = data.slice(need..);
            if paging.carry.len() == ps {
                let page = paging.carry.split().freeze();
                paging.next(&self.key, self.run_pages, file, &page, out)?;
            }
        }
        let whole = data.len() / ps * ps;
        for page in data[..whole].chunks_exact(ps) {
            paging.next(&self.key, self.run_pages, file, page, out)?;
        }
        paging.carry.extend_from_slice(&data[whole..]);
        if eof {
            if !paging.carry.is_empty() {
                return Err(Problem::new(
                    Code::BackupSourceUnreadable,
                    format!(
                        "a paged file ended {} bytes into a page: its size is not a \
                         multiple of {ps}",
                        paging.carry.len()
                    ),
                ));
            }
            paging.finish_sparse(&self.key, self.run_pages, file, out)?;
            paging.close_run(&self.key, file, out);
            let mut p = match self.current.take() {
                Some((_, Some(p))) => p,
                _ => return Err(Problem::internal("paged file state vanished")),
            };
            self.planner.done(
                file,
                PagedFile {
                    runs: std::mem::take(&mut p.runs),
                    map: PageMap::from_records(ps as u32, &p.records),
                    pages: p.pages,
                    pages_stored: p.pages_stored,
                },
            );
        }
        Ok(())
    }
}

fn sparse_error(m: &str) -> Problem {
    Problem::new(
        Code::BackupSourceUnreadable,
        format!("an incremental file has {m}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_hardstorage_engine::format::ChunkerParams;
    use std::sync::Mutex;

    const PS: usize = 8192;
    const KEY: [u8; 32] = [7; 32];

    #[derive(Default)]
    struct Planner {
        baseline: Option<Arc<Baseline>>,
        sparse: Option<Arc<SparsePages>>,
        done: Mutex<Vec<(u64, PagedFile)>>,
    }

    impl PagePlanner for Planner {
        fn plan(&self, file: u64) -> Option<PagePlan> {
            (file != 99).then(|| PagePlan {
                page_size: PS as u32,
                baseline: self.baseline.clone(),
                sparse: self.sparse.clone(),
            })
        }
        fn done(&self, file: u64, result: PagedFile) {
            self.done.lock().expect("lock").push((file, result));
        }
    }

    /// A splitter with runs of 4 pages.
    fn splitter(planner: Arc<Planner>) -> Box<dyn Splitter> {
        PageAwareFactory {
            cdc: crate::Params::new(&ChunkerParams::default()).expect("params"),
            key: KEY,
            planner,
            run_pages: 4,
        }
        .build(0)
        .expect("build")
    }

    fn pages(n: usize, seed: u8) -> Vec<u8> {
        (0..n * PS)
            .map(|i| ((i / PS) as u8).wrapping_mul(31) ^ seed ^ (i as u8))
            .collect()
    }

    /// Splits `data` as file 0 in blocks of `block` bytes; returns the
    /// emitted chunks and the finished file.
    fn split(
        data: &[u8],
        block: usize,
        baseline: Option<Arc<Baseline>>,
    ) -> (Vec<Chunk>, PagedFile) {
        split_sparse(data, block, baseline, None).expect("split")
    }

    fn split_sparse(
        data: &[u8],
        block: usize,
        baseline: Option<Arc<Baseline>>,
        sparse: Option<Arc<SparsePages>>,
    ) -> Result<(Vec<Chunk>, PagedFile), Problem> {
        let planner = Arc::new(Planner {
            baseline,
            sparse,
            ..Default::default()
        });
        let mut s = splitter(planner.clone());
        let mut out = Vec::new();
        let blocks: Vec<_> = data.chunks(block).collect();
        let mut off = 0;
        for (i, b) in blocks.iter().enumerate() {
            let blk = Block {
                file: 0,
                offset: off,
                data: Bytes::copy_from_slice(b),
                eof: i + 1 == blocks.len(),
            };
            off += b.len() as u64;
            s.push(blk, &mut |c| out.push(c))?;
        }
        if blocks.is_empty() {
            let eof = Block {
                file: 0,
                offset: 0,
                data: Bytes::new(),
                eof: true,
            };
            s.push(eof, &mut |c| out.push(c))?;
        }
        let mut done = planner.done.lock().expect("lock");
        assert_eq!(done.len(), 1);
        Ok((out, done.remove(0).1))
    }

    /// Rebuilds the file from the map and a chunk store.
    fn rebuild(f: &PagedFile, store: &HashMap<ChunkId, Bytes>) -> Vec<u8> {
        let recs = f.map.decode(&f.runs).expect("decode");
        let mut out = Vec::new();
        for r in recs {
            let run = &store[&f.runs[r.run as usize].0];
            let s = r.slot as usize * PS;
            out.extend_from_slice(&run[s..s + PS]);
        }
        out
    }

    #[test]
    fn first_backup_stores_every_page_in_runs() {
        let d = pages(10, 1);
        let (chunks, f) = split(&d, 3 * PS + 100, None);
        assert_eq!(f.pages, 10);
        assert_eq!(f.pages_stored, 10);
        assert_eq!(chunks.len(), 3, "runs of 4, 4, 2 pages");
        for c in &chunks {
            assert_eq!(c.id, crate::run_id(&KEY, &c.data));
        }
        let store: HashMap<_, _> = chunks.iter().map(|c| (c.id, c.data.clone())).collect();
        assert_eq!(rebuild(&f, &store), d);
    }

    #[test]
    fn second_backup_stores_only_changed_pages() {
        let d = pages(12, 1);
        let (c1, f1) = split(&d, 1 << 20, None);
        let mut store: HashMap<_, _> = c1.iter().map(|c| (c.id, c.data.clone())).collect();
        let mut d2 = d.clone();
        for p in [1usize, 6, 7, 11] {
            d2[p * PS + 17] ^= 0xFF;
        }
        d2.extend_from_slice(&pages(1, 9)); // a page appended
        let base = Arc::new(Baseline {
            runs: f1.runs.clone(),
            map: f1.map.clone(),
        });
        let (c2, f2) = split(&d2, 5000, Some(base));
        assert_eq!(f2.pages, 13);
        assert_eq!(f2.pages_stored, 5);
        let new_bytes: usize = c2.iter().map(|c| c.len()).sum();
        assert_eq!(new_bytes, 5 * PS);
        store.extend(c2.iter().map(|c| (c.id, c.data.clone())));
        assert_eq!(rebuild(&f2, &store), d2);
        // Runs referenced once each.
        let mut ids: Vec<_> = f2.runs.iter().map(|r| r.0).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), f2.runs.len());
    }

    /// An incremental backup's file: only the changed pages arrive, the rest
    /// point at the baseline's runs (before the truncation point) or are
    /// zeros; nothing unchanged is stored again.
    #[test]
    fn a_sparse_file_takes_the_pages_it_lacks_from_the_baseline() {
        let d = pages(8, 1);
        let (c1, f1) = split(&d, 1 << 20, None);
        let mut store: HashMap<_, _> = c1.iter().map(|c| (c.id, c.data.clone())).collect();
        let base = Arc::new(Baseline {
            runs: f1.runs.clone(),
            map: f1.map.clone(),
        });
        // Pages 2 and 9 sent; the file is 11 pages, truncated at 10: page 8
        // lies past the baseline and page 10 past the truncation, so zeros.
        let sent = [pages(1, 7), pages(1, 8)].concat();
        let sparse = SparsePages {
            pages: vec![2, 9],
            length: 11,
            truncation: 10,
        };
        let (c2, f2) = split_sparse(
            &sent,
            5000,
            Some(base.clone()),
            Some(Arc::new(sparse.clone())),
        )
        .expect("sparse");
        assert_eq!(
            (f2.pages, f2.pages_stored),
            (11, 4),
            "2, 8, 9 and 10 stored"
        );
        store.extend(c2.iter().map(|c| (c.id, c.data.clone())));
        let mut want = d.clone();
        want[2 * PS..3 * PS].copy_from_slice(&sent[..PS]);
        want.extend_from_slice(&[0u8; PS]);
        want.extend_from_slice(&sent[PS..]);
        want.extend_from_slice(&[0u8; PS]);
        assert_eq!(rebuild(&f2, &store), want);
        // Nothing sent: the baseline as it was, cut at the truncation point.
        let none = SparsePages {
            pages: vec![],
            length: 5,
            truncation: 5,
        };
        let (c3, f3) =
            split_sparse(&[], 1 << 20, Some(base.clone()), Some(Arc::new(none))).expect("empty");
        assert!(c3.is_empty());
        assert_eq!(rebuild(&f3, &store), d[..5 * PS].to_vec());
        // More or fewer pages than named, or no baseline: refused.
        let short = Arc::new(sparse.clone());
        assert!(split_sparse(&sent[..PS], 5000, Some(base.clone()), Some(short)).is_err());
        let long = [sent.clone(), pages(1, 3)].concat();
        let named = Some(Arc::new(sparse.clone()));
        assert!(split_sparse(&long, 5000, Some(base.clone()), named).is_err());
        let orphan = Some(Arc::new(sparse));
        assert!(split_sparse(&sent, 5000, None, orphan).is_err());
    }

    #[test]
    fn a_torn_size_is_an_error_not_a_short_page() {
        let planner = Arc::new(Planner::default());
        let mut s = splitter(planner);
        let r = s.push(
            Block {
                file: 0,
                offset: 0,
                data: Bytes::from(vec![0u8; PS + 5]),
                eof: true,
            },
            &mut |_| {},
        );
        assert_eq!(r.expect_err("torn").code, "backup.source_unreadable");
    }

    #[test]
    fn unplanned_files_are_content_defined() {
        let planner = Arc::new(Planner::default());
        let mut s = splitter(planner.clone());
        let mut out = Vec::new();
        s.push(
            Block {
                file: 99,
                offset: 0,
                data: Bytes::from(vec![3u8; 1000]),
                eof: true,
            },
            &mut |c| out.push(c),
        )
        .expect("push");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, ChunkId::default(), "the hash stage names it");
        assert!(planner.done.lock().expect("lock").is_empty());
    }
}

//! The pack-ordered fetcher: `threads` readers take the plan's reads in
//! pack order, fetch each with one ranged GET, decode every chunk in it
//! once (decrypt, decompress, re-hash: [`decode_chunk`]; a run of pages
//! is hashed page by page against its page map instead) and scatter the
//! plaintext to all its places with positioned writes. All-zero 4 KiB
//! blocks are skipped (the files were created at full length, all holes).

use super::dest::Root;
use super::plan::{Job, Place, Plan, Read};
use crate::chunks::{decode_chunk, decode_chunk_unhashed};
use crate::Repository;
use bytes::Bytes;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Files a reader keeps open at once.
const OPEN_FILES: usize = 64;

/// What the readers count while they run (for progress events).
#[derive(Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub files_done: AtomicU64,
    pub requests: AtomicU64,
    /// Bytes the restore will write: the files' sizes until a batch is
    /// planned, then what its plan writes (less, in a delta restore).
    pub bytes_total: AtomicU64,
    pub files_total: u64,
    /// Distinct packs the batches planned so far read.
    pub packs_touched: AtomicU64,
}

/// One reader's open files, the most recently opened last.
#[derive(Default)]
struct Files(VecDeque<(u32, File)>);

/// Whether each file was created (once, by the first reader to write to
/// it, so creating a thousand files overlaps with decoding instead of
/// preceding it).
pub struct Created(Vec<OnceLock<Result<(), Problem>>>);

impl Created {
    pub fn new(n: usize) -> Self {
        Created((0..n).map(|_| OnceLock::new()).collect())
    }

    /// Opens `file` for writing, creating it full length first if no one did.
    fn open(&self, roots: &[Root], plan: &Plan, file: u32) -> Result<File, Problem> {
        let p = plan
            .files
            .get(file as usize)
            .ok_or_else(|| Problem::internal("plan names no such file"))?;
        let root = roots
            .get(p.root)
            .ok_or_else(|| Problem::internal("plan names no such root"))?;
        let mut mine = None;
        self.0[file as usize]
            .get_or_init(|| {
                let f = if p.fresh {
                    root.create_file(&p.rel, p.entry.size)?
                } else {
                    // Delta: the file stays; only its length is set.
                    let f = root.open_file(&p.rel)?;
                    f.set_len(p.entry.size)
                        .map_err(|e| super::dest::werr(&root.path().join(&p.entry.path), e))?;
                    f
                };
                mine = Some(f);
                Ok(())
            })
            .clone()?;
        match mine {
            Some(f) => Ok(f),
            None => root.open_file(&p.rel),
        }
    }

    /// Creates every file no chunk was written to (empty ones).
    pub fn rest(&self, roots: &[Root], plan: &Plan) -> Result<(), Problem> {
        for (i, c) in self.0.iter().enumerate() {
            if c.get().is_none() {
                self.open(roots, plan, i as u32)?;
            }
        }
        Ok(())
    }
}

impl Files {
    fn get(&mut self, s: &Scatter, file: u32) -> Result<&File, Problem> {
        if let Some(i) = self.0.iter().position(|(f, _)| *f == file) {
            return Ok(&self.0[i].1);
        }
        let f = s.created.open(s.roots, s.plan, file)?;
        if self.0.len() == OPEN_FILES {
            self.0.pop_front();
        }
        self.0.push_back((file, f));
        Ok(&self.0[self.0.len() - 1].1)
    }
}

/// Runs every read of `plan` on `threads` readers, then creates the files
/// no read wrote to.
pub fn fetch(
    repo: &Repository,
    plan: &Plan,
    roots: &[Root],
    threads: usize,
    progress: &Progress,
) -> Result<(), Problem> {
    let created = Created::new(plan.files.len());
    let aead = repo.aead();
    // Bytes of each file still to come: a file is done when it reaches 0.
    let left: Vec<AtomicU64> = plan
        .files
        .iter()
        .map(|f| AtomicU64::new(f.write_bytes))
        .collect();
    for (f, l) in plan.files.iter().zip(&left) {
        if f.write_bytes == 0 {
            progress.files_done.fetch_add(1, Ordering::Relaxed);
            l.store(0, Ordering::Relaxed);
        }
    }
    let scatter = Scatter {
        repo,
        plan,
        roots,
        aead: aead.as_ref(),
        left: &left,
        progress,
        created: &created,
    };
    let items = split(plan, ITEM_BYTES);
    // Items of each read, counted in one pass (a scan per read was
    // quadratic in the size of the restore).
    let slots: Vec<Slot> = (0..plan.reads.len())
        .map(|_| Slot {
            data: Mutex::new(None),
            left: AtomicUsize::new(0),
        })
        .collect();
    for it in &items {
        slots[it.read].left.fetch_add(1, Ordering::Relaxed);
    }
    let r = crate::parallel::for_each(&items, threads, 1, Files::default, |files, it| {
        let r = &plan.reads[it.read];
        let data = slots[it.read].take(|| scatter.get(r))?;
        scatter.jobs(files, r, &data, &r.jobs[it.jobs.clone()])
    });
    let r = r.and_then(|()| created.rest(roots, plan));
    if r.is_err() {
        // Never leave a file whose content did not all arrive and verify:
        // what stays of a failed restore is exact.
        for (f, l) in plan.files.iter().zip(&left) {
            if l.load(Ordering::Acquire) != 0 {
                let _ = roots[f.root].remove_file(&f.rel);
            }
        }
    }
    r
}

struct Scatter<'a> {
    repo: &'a Repository,
    plan: &'a Plan<'a>,
    roots: &'a [Root],
    aead: Option<&'a phs_encrypt::Aead>,
    left: &'a [AtomicU64],
    progress: &'a Progress,
    created: &'a Created,
}

/// Decoded bytes one work item covers: a read is shared by all readers
/// in such slices, so one large pack keeps every core busy.
const ITEM_BYTES: u64 = 4 << 20;

/// A slice of one read's jobs.
struct Item {
    read: usize,
    jobs: Range<usize>,
}

fn split(plan: &Plan, target: u64) -> Vec<Item> {
    let mut items = Vec::new();
    for (read, r) in plan.reads.iter().enumerate() {
        let (mut start, mut bytes) = (0, 0u64);
        for (i, j) in r.jobs.iter().enumerate() {
            bytes += j.plain_len as u64;
            if bytes >= target || i + 1 == r.jobs.len() {
                items.push(Item {
                    read,
                    jobs: start..i + 1,
                });
                (start, bytes) = (i + 1, 0);
            }
        }
    }
    items
}

/// One read's bytes, fetched by the first item that needs them and
/// dropped when its last item is done.
struct Slot {
    data: Mutex<Option<Bytes>>,
    left: AtomicUsize,
}

impl Slot {
    fn take(&self, get: impl FnOnce() -> Result<Bytes, Problem>) -> Result<Bytes, Problem> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let b = match d.as_ref() {
            Some(b) => b.clone(),
            None => d.insert(get()?).clone(),
        };
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            *d = None;
        }
        Ok(b)
    }
}

impl Scatter<'_> {
    fn get(&self, r: &Read) -> Result<Bytes, Problem> {
        let data = self.repo.store.get_range(&r.pack, r.range.clone())?;
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
        Ok(data)
    }

    fn jobs(&self, files: &mut Files, r: &Read, data: &[u8], jobs: &[Job]) -> Result<(), Problem> {
        for j in jobs {
            let s = (j.offset - r.range.start) as usize;
            let env = data.get(s..s + j.len as usize).ok_or_else(|| {
                Problem::new(Code::VerifyTruncated, format!("{}: short range", r.pack))
                    .with("object", r.pack.clone())
            })?;
            // A chunk whose every place is checked page by page against
            // its page map is not re-hashed whole as well.
            let paged = j.places.iter().all(|p| self.page_checked(p));
            let plain = if paged {
                decode_chunk_unhashed(self.aead, &j.id, env)
            } else {
                decode_chunk(self.repo, self.aead, &j.id, env)
            };
            let plain = plain.map_err(|e| match j.places.first() {
                Some(p) => e.with("path", self.plan.files[p.file as usize].entry.path.clone()),
                None => e,
            })?;
            if plain.len() != j.plain_len as usize {
                return Err(Problem::new(
                    Code::VerifyChecksumMismatch,
                    format!(
                        "chunk {} has {} bytes, the manifest says {}",
                        j.id.to_hex(),
                        plain.len(),
                        j.plain_len
                    ),
                ));
            }
            for p in &j.places {
                self.place(files, &plain, p)?;
            }
        }
        Ok(())
    }

    /// Whether `place` checks each page of `p` against the page map.
    fn page_checked(&self, p: &Place) -> bool {
        p.first_page.is_some() && self.plan.files[p.file as usize].pages.is_some()
    }

    fn place(&self, files: &mut Files, plain: &[u8], p: &Place) -> Result<(), Problem> {
        let pf = &self.plan.files[p.file as usize];
        let bytes = plain
            .get(p.src.start as usize..p.src.end as usize)
            .ok_or_else(|| {
                Problem::new(Code::VerifyMalformed, "page map names bytes past its run")
            })?;
        if let (Some(first), Some((ps, hashes))) = (p.first_page, &pf.pages) {
            check_pages(self.repo, bytes, *ps as usize, first as usize, hashes)
                .map_err(|e| e.with("path", pf.entry.path.clone()))?;
        }
        let f = files.get(self, p.file)?;
        let w = if pf.fresh {
            write_sparse_at(f, bytes, p.offset)
        } else {
            f.write_all_at(bytes, p.offset)
        };
        w.map_err(|e| super::dest::werr(&self.roots[pf.root].path().join(&pf.entry.path), e))?;
        let n = bytes.len() as u64;
        self.progress.bytes.fetch_add(n, Ordering::Relaxed);
        if self.left[p.file as usize].fetch_sub(n, Ordering::AcqRel) == n {
            self.progress.files_done.fetch_add(1, Ordering::Relaxed);
            start_writeback(f);
        }
        Ok(())
    }
}

/// Starts writing a finished file back to disk without waiting for it, so
/// the disk works while the CPUs decode the next chunks and the final
/// `syncfs` waits only for the tail. (Left alone, the kernel starts only
/// once a tenth of memory is dirty.) Advisory: errors surface at `syncfs`.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid descriptor; offset 0 and length 0 mean the whole file.
    unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Each page against its record's hash: a run that verified but holds
/// another page at this slot would be a writer's bug; it is caught here.
fn check_pages(
    repo: &Repository,
    bytes: &[u8],
    ps: usize,
    first: usize,
    hashes: &[[u8; pg_hardstorage_engine::format::PAGE_HASH]],
) -> Result<(), Problem> {
    // Every byte is checked: its run as a whole is not re-hashed.
    if ps == 0 || !bytes.len().is_multiple_of(ps) {
        return Err(Problem::new(
            Code::VerifyMalformed,
            "page map places a partial page",
        ));
    }
    for (k, page) in bytes.chunks_exact(ps).enumerate() {
        let h = blake3::keyed_hash(&repo.keys.id, page);
        let want = hashes.get(first + k).ok_or_else(|| {
            Problem::new(
                Code::VerifyMalformed,
                "page map names more pages than it has",
            )
        })?;
        if h.as_bytes()[..want.len()] != want[..] {
            return Err(Problem::new(
                Code::VerifyChecksumMismatch,
                format!("page {} does not match its page map", first + k),
            ));
        }
    }
    Ok(())
}

/// Writes `data` at `offset`, skipping all-zero 4 KiB blocks (the file is
/// already that long and reads zeros there, so holes stay holes).
fn write_sparse_at(f: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut at = 0usize;
    while at < data.len() {
        // The next run of non-zero blocks: one write.
        let zero = |b: &[u8]| b.iter().all(|x| *x == 0);
        while at < data.len() && zero(&data[at..(at + 4096).min(data.len())]) {
            at += 4096;
        }
        let start = at;
        while at < data.len() && !zero(&data[at..(at + 4096).min(data.len())]) {
            at += 4096;
        }
        let end = at.min(data.len());
        if start < end {
            f.write_all_at(&data[start..end], offset + start as u64)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pg_hardstorage_engine::format::PAGE_HASH;

    fn hashes(repo: &Repository, pages: &[u8], ps: usize) -> Vec<[u8; PAGE_HASH]> {
        let h = |p: &[u8]| {
            let mut out = [0u8; PAGE_HASH];
            out.copy_from_slice(&blake3::keyed_hash(&repo.keys.id, p).as_bytes()[..PAGE_HASH]);
            out
        };
        pages.chunks(ps).map(h).collect()
    }

    #[test]
    fn every_page_byte_is_checked_against_its_page_map() {
        let repo = crate::testing::memory_repo();
        let ps = 8192;
        let run: Vec<u8> = (0..4 * ps).map(|i| (i * 7 % 251) as u8).collect();
        let map = hashes(&repo, &run, ps);
        check_pages(&repo, &run, ps, 0, &map).expect("the pages as recorded");
        // The second and third pages, placed at records 1 and 2.
        check_pages(&repo, &run[ps..3 * ps], ps, 1, &map).expect("a slice");
        for at in [0, ps - 1, 2 * ps + 17, 4 * ps - 1] {
            let mut bad = run.clone();
            bad[at] ^= 1;
            let e = check_pages(&repo, &bad, ps, 0, &map).expect_err("a changed byte");
            assert_eq!(e.code, "verify.checksum_mismatch", "{e}");
        }
        // Pages checked against the wrong records, past the map, or cut short.
        assert!(check_pages(&repo, &run[..ps], ps, 1, &map).is_err());
        assert!(check_pages(&repo, &run[..2 * ps], ps, 3, &map).is_err());
        let e = check_pages(&repo, &run[..ps + 1], ps, 0, &map).expect_err("partial");
        assert_eq!(e.code, "verify.malformed", "{e}");
    }
}

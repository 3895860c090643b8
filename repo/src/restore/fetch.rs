//! The pack-ordered fetcher: `threads` readers take the plan's reads in
//! pack order, fetch each with one ranged GET, decode every chunk in it
//! once (decrypt, decompress, re-hash: [`decode_chunk`]) and scatter the
//! plaintext to all its places with positioned writes. All-zero 4 KiB
//! blocks are skipped (the files were created at full length, all holes).

use super::dest::Root;
use super::plan::{Place, Plan, Read};
use crate::chunks::decode_chunk;
use crate::Repository;
use pg_hardstorage_engine::Problem;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Files a reader keeps open at once.
const OPEN_FILES: usize = 64;

/// What the readers count while they run (for progress events).
#[derive(Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub files_done: AtomicU64,
    pub requests: AtomicU64,
}

/// One reader's open files, the most recently opened last.
#[derive(Default)]
struct Files(VecDeque<(u32, File)>);

impl Files {
    fn get(&mut self, roots: &[Root], plan: &Plan, file: u32) -> Result<&File, Problem> {
        if let Some(i) = self.0.iter().position(|(f, _)| *f == file) {
            return Ok(&self.0[i].1);
        }
        let p = plan
            .files
            .get(file as usize)
            .ok_or_else(|| Problem::internal("plan names no such file"))?;
        let root = roots
            .get(p.root)
            .ok_or_else(|| Problem::internal("plan names no such root"))?;
        let f = root.open_file(&p.rel)?;
        if self.0.len() == OPEN_FILES {
            self.0.pop_front();
        }
        self.0.push_back((file, f));
        Ok(&self.0[self.0.len() - 1].1)
    }
}

/// Runs every read of `plan` on `threads` readers.
pub fn fetch(
    repo: &Repository,
    plan: &Plan,
    roots: &[Root],
    threads: usize,
    progress: &Progress,
) -> Result<(), Problem> {
    let aead = repo.aead();
    // Bytes of each file still to come: a file is done when it reaches 0.
    let left: Vec<AtomicU64> = plan
        .files
        .iter()
        .map(|f| AtomicU64::new(f.entry.size))
        .collect();
    for (f, l) in plan.files.iter().zip(&left) {
        if f.entry.size == 0 {
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
    };
    let r = crate::parallel::for_each(&plan.reads, threads, 1, Files::default, |files, r| {
        scatter.read(files, r)
    });
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
}

impl Scatter<'_> {
    fn read(&self, files: &mut Files, r: &Read) -> Result<(), Problem> {
        let data = self.repo.store.get_range(&r.pack, r.range.clone())?;
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
        for j in &r.jobs {
            let s = (j.offset - r.range.start) as usize;
            let env = data.get(s..s + j.len as usize).ok_or_else(|| {
                Problem::new("verify.truncated", format!("{}: short range", r.pack))
                    .with("object", r.pack.clone())
            })?;
            let plain = decode_chunk(self.repo, self.aead, &j.id, env).map_err(|e| {
                match j.places.first() {
                    Some(p) => e.with("path", self.plan.files[p.file as usize].entry.path.clone()),
                    None => e,
                }
            })?;
            if plain.len() != j.plain_len as usize {
                return Err(Problem::new(
                    "verify.checksum_mismatch",
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

    fn place(&self, files: &mut Files, plain: &[u8], p: &Place) -> Result<(), Problem> {
        let pf = &self.plan.files[p.file as usize];
        let bytes = plain
            .get(p.src.start as usize..p.src.end as usize)
            .ok_or_else(|| Problem::new("verify.malformed", "page map names bytes past its run"))?;
        if let (Some(first), Some((ps, hashes))) = (p.first_page, &pf.pages) {
            check_pages(self.repo, bytes, *ps as usize, first as usize, hashes)
                .map_err(|e| e.with("path", pf.entry.path.clone()))?;
        }
        let f = files.get(self.roots, self.plan, p.file)?;
        write_sparse_at(f, bytes, p.offset)
            .map_err(|e| super::dest::werr(&self.roots[pf.root].path().join(&pf.entry.path), e))?;
        let n = bytes.len() as u64;
        self.progress.bytes.fetch_add(n, Ordering::Relaxed);
        if self.left[p.file as usize].fetch_sub(n, Ordering::AcqRel) == n {
            self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
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
    for (k, page) in bytes.chunks_exact(ps).enumerate() {
        let h = blake3::keyed_hash(&repo.keys.id, page);
        let want = hashes.get(first + k).ok_or_else(|| {
            Problem::new("verify.malformed", "page map names more pages than it has")
        })?;
        if h.as_bytes()[..want.len()] != want[..] {
            return Err(Problem::new(
                "verify.checksum_mismatch",
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

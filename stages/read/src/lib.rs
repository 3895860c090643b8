//! The read stage: regular files in blocks, with `pread` or io_uring.
//!
//! [`probe`] picks the backend at start-up: io_uring when the kernel allows
//! it (sysctl `kernel.io_uring_disabled`, seccomp and `RLIMIT_MEMLOCK` can
//! each forbid it), `pread` otherwise. `PG_HARDSTORAGE_READ=pread|uring`
//! forces one. Both produce identical blocks.
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::Code;
mod uring;

use bytes::Bytes;
use pg_hardstorage_engine::stage::{Block, Source};
use pg_hardstorage_engine::Problem;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Pread,
    Uring,
}

#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub backend: Backend,
    /// Why this backend was chosen (quoted by `bench` and the logs).
    pub reason: String,
}

/// Chooses the read backend for this process.
pub fn probe() -> ProbeResult {
    match std::env::var("PG_HARDSTORAGE_READ").as_deref() {
        Ok("pread") => {
            return ProbeResult {
                backend: Backend::Pread,
                reason: "forced by PG_HARDSTORAGE_READ=pread".into(),
            }
        }
        Ok("uring") => {
            return ProbeResult {
                backend: Backend::Uring,
                reason: "forced by PG_HARDSTORAGE_READ=uring".into(),
            }
        }
        _ => {}
    }
    match uring::available() {
        Ok(()) => ProbeResult {
            backend: Backend::Uring,
            reason: "io_uring available (IORING_OP_READ supported)".into(),
        },
        Err(why) => ProbeResult {
            backend: Backend::Pread,
            reason: format!("io_uring unavailable ({why}); using pread"),
        },
    }
}

/// One file to read, with its index in the backup's file list.
#[derive(Clone, Debug)]
pub struct FileEntry {
    pub index: u64,
    pub path: PathBuf,
    pub size: u64,
}

pub struct FileSource {
    files: Vec<FileEntry>,
    block: usize,
    backend: Backend,
    depth: usize,
}

impl FileSource {
    pub fn new(files: Vec<FileEntry>, backend: Backend) -> Self {
        FileSource {
            files,
            block: 8 << 20,
            backend,
            depth: 4,
        }
    }

    pub fn with_block_size(mut self, block: usize) -> Self {
        self.block = block.max(4096);
        self
    }
}

/// Emits blocks in order, marking the file's last one `eof`.
pub(crate) struct Ordered<'a> {
    file: u64,
    pending: Option<(u64, Bytes)>,
    emit: &'a mut dyn FnMut(Block) -> Result<(), Problem>,
}

impl<'a> Ordered<'a> {
    pub(crate) fn new(file: u64, emit: &'a mut dyn FnMut(Block) -> Result<(), Problem>) -> Self {
        Ordered {
            file,
            pending: None,
            emit,
        }
    }
    pub(crate) fn push(&mut self, offset: u64, data: Bytes) -> Result<(), Problem> {
        if let Some((o, d)) = self.pending.replace((offset, data)) {
            (self.emit)(Block {
                file: self.file,
                offset: o,
                data: d,
                eof: false,
            })?;
        }
        Ok(())
    }
    pub(crate) fn finish(mut self, end: u64) -> Result<(), Problem> {
        let (offset, data) = self.pending.take().unwrap_or((end, Bytes::new()));
        (self.emit)(Block {
            file: self.file,
            offset,
            data,
            eof: true,
        })
    }
}

fn read_err(path: &std::path::Path, e: &std::io::Error) -> Problem {
    Problem::io(Code::IoReadFailed, format!("read {}", path.display()), e)
        .with("path", path.display().to_string())
}

/// Reads `file` from `offset` to its current end with `pread`. Buffers are
/// sized to what the file is expected to hold (`expect`), so a small file
/// costs a small buffer, and grow up to `block` should the file have grown.
pub(crate) fn pread_from(
    file: &File,
    path: &std::path::Path,
    mut offset: u64,
    expect: u64,
    block: usize,
    out: &mut Ordered<'_>,
) -> Result<u64, Problem> {
    let mut want = (expect.saturating_sub(offset) as usize).clamp(4096, block);
    loop {
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(read_err(path, &e)),
            }
        }
        if filled == 0 {
            return Ok(offset);
        }
        buf.truncate(filled);
        out.push(offset, Bytes::from(buf))?;
        offset += filled as u64;
        if filled < want {
            return Ok(offset);
        }
        // Full buffer: more may follow. Past the expected size, probe small.
        want = (expect.saturating_sub(offset) as usize).clamp(4096, block);
    }
}

/// Files at least this large go through io_uring; smaller ones are one pread.
const URING_MIN: u64 = 1 << 20;

impl Source for FileSource {
    fn name(&self) -> &'static str {
        "read"
    }

    fn total_bytes(&self) -> Option<u64> {
        Some(self.files.iter().map(|f| f.size).sum())
    }

    fn run(&mut self, emit: &mut dyn FnMut(Block) -> Result<(), Problem>) -> Result<(), Problem> {
        let mut ring = match self.backend {
            Backend::Uring => Some(uring::Reader::new(self.depth, self.block)?),
            Backend::Pread => None,
        };
        for f in &self.files {
            let file = File::open(&f.path).map_err(|e| read_err(&f.path, &e))?;
            let mut out = Ordered::new(f.index, emit);
            let done = match ring.as_mut() {
                Some(r) if f.size >= URING_MIN => r.read_file(&file, &f.path, &mut out)?,
                _ => 0,
            };
            let end = pread_from(&file, &f.path, done, f.size, self.block, &mut out)?;
            out.finish(end)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(files: Vec<FileEntry>, backend: Backend, block: usize) -> Vec<Block> {
        let mut src = FileSource::new(files, backend).with_block_size(block);
        let mut out = Vec::new();
        src.run(&mut |b| {
            out.push(b);
            Ok(())
        })
        .expect("run");
        out
    }

    fn fixture() -> (tempfile::TempDir, Vec<FileEntry>, Vec<Vec<u8>>) {
        let dir = tempfile::tempdir().expect("tmp");
        let sizes = [
            0usize,
            1,
            4095,
            4096,
            4097,
            100_000,
            1 << 20,
            (3 << 20) + 1,
            5 << 20,
        ];
        let mut files = Vec::new();
        let mut datas = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*n).map(|j| (j * 31 + i) as u8).collect();
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, &data).expect("write");
            files.push(FileEntry {
                index: i as u64,
                path: p,
                size: *n as u64,
            });
            datas.push(data);
        }
        (dir, files, datas)
    }

    fn check(blocks: &[Block], datas: &[Vec<u8>]) {
        for (i, d) in datas.iter().enumerate() {
            let mine: Vec<&Block> = blocks.iter().filter(|b| b.file == i as u64).collect();
            assert!(mine.last().expect("blocks").eof);
            assert_eq!(mine.iter().filter(|b| b.eof).count(), 1);
            let mut off = 0;
            let mut joined = Vec::new();
            for b in mine {
                assert_eq!(b.offset, off);
                off += b.data.len() as u64;
                joined.extend_from_slice(&b.data);
            }
            assert_eq!(&joined, d, "file {i}");
        }
    }

    #[test]
    fn pread_backend_reads_every_byte_in_order() {
        let (_d, files, datas) = fixture();
        check(&collect(files, Backend::Pread, 4096), &datas);
    }

    /// io_uring is available on the machines this project builds on; if the
    /// probe says otherwise the test fails and names the reason rather than
    /// silently testing nothing.
    #[test]
    fn uring_backend_reads_every_byte_in_order() {
        if let Err(why) = uring::available() {
            panic!("io_uring is unavailable here, so its read path cannot be tested: {why}");
        }
        let (_d, files, datas) = fixture();
        check(&collect(files.clone(), Backend::Uring, 4096), &datas);
        check(&collect(files, Backend::Uring, 65536), &datas);
    }

    /// The size recorded at walk time is only a hint: a file that grew or
    /// shrank since is read to its real end by both backends.
    #[test]
    fn stale_size_hints_still_read_the_real_file() {
        let (_d, mut files, datas) = fixture();
        for (i, f) in files.iter_mut().enumerate() {
            f.size = if i % 2 == 0 {
                f.size / 2
            } else {
                f.size * 2 + 10
            };
        }
        check(&collect(files.clone(), Backend::Pread, 8192), &datas);
        check(&collect(files, Backend::Uring, 8192), &datas);
    }

    #[test]
    fn probe_honours_override() {
        std::env::set_var("PG_HARDSTORAGE_READ", "pread");
        assert_eq!(probe().backend, Backend::Pread);
        std::env::remove_var("PG_HARDSTORAGE_READ");
    }
}

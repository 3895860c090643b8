//! io_uring reads: several block reads in flight per file.

use crate::{read_err, Ordered};
use bytes::Bytes;
use io_uring::{opcode, register::Probe, types, IoUring};
use pg_hardstorage_engine::Problem;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `Ok(())` when this process may use io_uring for reads; else why not.
pub fn available() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() != "0" {
            return Err(format!("kernel.io_uring_disabled = {}", v.trim()));
        }
    }
    let ring = IoUring::new(4).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    if !probe.is_supported(opcode::Read::CODE) {
        return Err("IORING_OP_READ not supported".into());
    }
    Ok(())
}

pub struct Reader {
    ring: IoUring,
    depth: usize,
    block: usize,
}

impl Reader {
    pub fn new(depth: usize, block: usize) -> Result<Self, Problem> {
        let ring = IoUring::new(depth.next_power_of_two() as u32)
            .map_err(|e| Problem::internal(format!("io_uring_setup: {e}")))?;
        Ok(Reader { ring, depth, block })
    }

    /// Reads the file up to the size it had when opened; returns the offset
    /// reached. The caller continues with `pread` from there, which picks up
    /// growth and the tail after a short read.
    pub fn read_file(
        &mut self,
        file: &File,
        path: &Path,
        out: &mut Ordered<'_>,
    ) -> Result<u64, Problem> {
        let size = file.metadata().map_err(|e| read_err(path, &e))?.len();
        let fd = types::Fd(file.as_raw_fd());
        let mut slots: Vec<Option<(u64, Vec<u8>)>> = (0..self.depth).map(|_| None).collect();
        let mut done: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let (mut next, mut emitted, mut inflight) = (0u64, 0u64, 0usize);
        let mut stop = false;
        let mut failure: Option<Problem> = None;
        loop {
            while !stop && inflight < self.depth && next < size {
                let Some(slot) = slots.iter().position(|s| s.is_none()) else {
                    break;
                };
                let len = self.block.min((size - next) as usize);
                let mut buf = vec![0u8; len];
                let entry = opcode::Read::new(fd, buf.as_mut_ptr(), len as u32)
                    .offset(next)
                    .build()
                    .user_data(slot as u64);
                // SAFETY: the buffer lives in `slots` until its completion is
                // reaped below; we never leave this loop with reads in flight.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_err() {
                    break;
                }
                slots[slot] = Some((next, buf));
                next += len as u64;
                inflight += 1;
            }
            if inflight == 0 {
                break;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Reads may still be in flight: the kernel owns their buffers,
                // so they are leaked rather than freed under it.
                for s in slots.iter_mut() {
                    if let Some((_, b)) = s.take() {
                        std::mem::forget(b);
                    }
                }
                return Err(Problem::internal(format!("io_uring_enter: {e}")));
            }
            let cqes: Vec<_> = self.ring.completion().collect();
            for cqe in cqes {
                let slot = cqe.user_data() as usize;
                let Some((off, mut buf)) = slots.get_mut(slot).and_then(|s| s.take()) else {
                    continue;
                };
                inflight -= 1;
                let res = cqe.result();
                if res < 0 {
                    stop = true;
                    failure.get_or_insert_with(|| {
                        read_err(path, &std::io::Error::from_raw_os_error(-res))
                    });
                    continue;
                }
                if (res as usize) < buf.len() {
                    // Short read: the file shrank; stop here, pread finishes.
                    buf.truncate(res as usize);
                    stop = true;
                }
                done.insert(off, buf);
            }
            while let Some(buf) = done.remove(&emitted) {
                let n = buf.len() as u64;
                if n == 0 {
                    break;
                }
                if failure.is_none() {
                    // Never return with reads in flight: note it and drain.
                    if let Err(p) = out.push(emitted, Bytes::from(buf)) {
                        failure = Some(p);
                        stop = true;
                    }
                }
                emitted += n;
            }
        }
        match failure {
            Some(p) => Err(p),
            None => Ok(emitted),
        }
    }
}

//! One worker pool for the read paths (restore, verify): `threads` scoped
//! threads take items in batches, each with its own state; the first error
//! stops everyone and is returned.

use pg_hardstorage_engine::Problem;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub fn for_each<T: Sync, S>(
    items: &[T],
    threads: usize,
    batch: usize,
    state: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, &T) -> Result<(), Problem> + Sync,
) -> Result<(), Problem> {
    let batch = batch.max(1);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let first: Mutex<Option<Problem>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut st = state();
                loop {
                    let start = next.fetch_add(batch, Ordering::Relaxed);
                    let Some(chunk) = items.get(start..(start + batch).min(items.len())) else {
                        return;
                    };
                    if chunk.is_empty() {
                        return;
                    }
                    for item in chunk {
                        if failed.load(Ordering::Acquire) {
                            return;
                        }
                        if let Err(p) = work(&mut st, item) {
                            failed.store(true, Ordering::Release);
                            first
                                .lock()
                                .unwrap_or_else(|x| x.into_inner())
                                .get_or_insert(p);
                            return;
                        }
                    }
                }
            });
        }
    });
    match first.into_inner().unwrap_or_else(|x| x.into_inner()) {
        Some(p) => Err(p),
        None => Ok(()),
    }
}

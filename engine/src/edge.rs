//! Bounded edges between stages, budgeted in bytes.
//!
//! An edge holds at most `budget` bytes of items (an item larger than the
//! whole budget is admitted alone, so nothing deadlocks). When full, the
//! sender either blocks ([`WhenFull::Block`]) or gets its item back
//! ([`WhenFull::Reject`]); nothing is ever dropped silently. A sender that
//! waits longer than `pause_after` publishes one `<upstream>_paused` event
//! naming the slow downstream stage, and one `<upstream>_resumed` once sends
//! flow freely again: an episode, not a flood of per-chunk events.

use crate::event::{Event, EventBus, Severity};
use crossbeam_channel::{unbounded, Receiver, Sender};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait for room (the pipeline default: backpressure).
    Block,
    /// Hand the item back to the caller at once.
    Reject,
}

#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// The downstream stage: what a paused upstream is waiting for.
    pub downstream: &'static str,
    /// Names the event: `chunker` gives `chunker_paused`.
    pub upstream: &'static str,
    pub budget_bytes: u64,
    pub when_full: WhenFull,
    pub pause_after: Duration,
}

/// Live counters of one edge; readable at any time without locks.
#[derive(Debug, Default)]
pub struct EdgeStats {
    pub depth_bytes: AtomicU64,
    pub depth_items: AtomicU64,
    pub max_depth_bytes: AtomicU64,
    pub wait_ns: AtomicU64,
    pub pauses: AtomicU64,
    pub items: AtomicU64,
    pub bytes: AtomicU64,
}

struct Shared {
    cfg: EdgeConfig,
    used: Mutex<u64>,
    room: Condvar,
    receiver_gone: AtomicBool,
    paused: AtomicBool,
    /// Nanoseconds since `epoch` at which senders started finding the edge
    /// full without a break; 0 while it has room.
    full_since: AtomicU64,
    epoch: Instant,
    stats: Arc<EdgeStats>,
    bus: Option<EventBus>,
}

pub struct EdgeSender<T> {
    tx: Sender<(T, u64)>,
    shared: Arc<Shared>,
}

impl<T> Clone for EdgeSender<T> {
    fn clone(&self) -> Self {
        EdgeSender {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
        }
    }
}

pub struct EdgeReceiver<T> {
    rx: Receiver<(T, u64)>,
    shared: Arc<Shared>,
}

pub fn edge<T>(
    cfg: EdgeConfig,
    bus: Option<EventBus>,
) -> (EdgeSender<T>, EdgeReceiver<T>, Arc<EdgeStats>) {
    let (tx, rx) = unbounded();
    let stats = Arc::new(EdgeStats::default());
    let shared = Arc::new(Shared {
        cfg,
        used: Mutex::new(0),
        room: Condvar::new(),
        receiver_gone: AtomicBool::new(false),
        paused: AtomicBool::new(false),
        full_since: AtomicU64::new(0),
        epoch: Instant::now(),
        stats: stats.clone(),
        bus,
    });
    (
        EdgeSender {
            tx,
            shared: shared.clone(),
        },
        EdgeReceiver { rx, shared },
        stats,
    )
}

impl<T> EdgeSender<T> {
    /// Sends `item` weighing `bytes`. `Err(item)` when the receiver is gone,
    /// or when the edge is full and its policy is [`WhenFull::Reject`].
    pub fn send(&self, item: T, bytes: u64) -> Result<(), T> {
        let s = &*self.shared;
        let waited = match self.reserve(bytes) {
            Some(w) => w,
            None => return Err(item),
        };
        if let Err(e) = self.tx.send((item, bytes)) {
            self.release(bytes);
            return Err(e.into_inner().0);
        }
        s.stats.items.fetch_add(1, Ordering::Relaxed);
        s.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        s.stats.depth_items.fetch_add(1, Ordering::Relaxed);
        self.note_wait(waited);
        Ok(())
    }

    /// Takes `bytes` of budget; `None` if refused. Returns the time waited.
    fn reserve(&self, bytes: u64) -> Option<Duration> {
        let s = &*self.shared;
        let mut used = s.used.lock().unwrap_or_else(|p| p.into_inner());
        let start = Instant::now();
        let mut had_to_wait = false;
        while *used > 0 && *used + bytes > s.cfg.budget_bytes {
            if s.receiver_gone.load(Ordering::Acquire) || s.cfg.when_full == WhenFull::Reject {
                return None;
            }
            had_to_wait = true;
            // Sustained fullness, not one long wait, is backpressure: a slow
            // consumer makes every send wait a little.
            let now = (s.epoch.elapsed().as_nanos() as u64).max(1);
            let _ = s
                .full_since
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed);
            let since = s.full_since.load(Ordering::Acquire);
            if since != 0 && now.saturating_sub(since) >= s.cfg.pause_after.as_nanos() as u64 {
                self.announce_pause();
            }
            let (guard, _) = s
                .room
                .wait_timeout(used, s.cfg.pause_after)
                .unwrap_or_else(|p| p.into_inner());
            used = guard;
        }
        if s.receiver_gone.load(Ordering::Acquire) {
            return None;
        }
        *used += bytes;
        s.stats.depth_bytes.store(*used, Ordering::Relaxed);
        s.stats.max_depth_bytes.fetch_max(*used, Ordering::Relaxed);
        Some(if had_to_wait {
            start.elapsed()
        } else {
            Duration::ZERO
        })
    }

    fn release(&self, bytes: u64) {
        release(&self.shared, bytes);
    }

    fn note_wait(&self, waited: Duration) {
        let s = &*self.shared;
        s.stats
            .wait_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        if waited.is_zero() {
            s.full_since.store(0, Ordering::Release);
            if s.paused.swap(false, Ordering::AcqRel) {
                publish(s, "resumed", Severity::Info);
            }
        }
    }

    fn announce_pause(&self) {
        let s = &*self.shared;
        if !s.paused.swap(true, Ordering::AcqRel) {
            s.stats.pauses.fetch_add(1, Ordering::Relaxed);
            publish(s, "paused", Severity::Warning);
        }
    }
}

fn publish(s: &Shared, what: &str, severity: Severity) {
    if let Some(bus) = &s.bus {
        bus.publish(
            Event::new(severity, format!("{}_{what}", s.cfg.upstream)).body(json!({
                "reason": "backpressure",
                "stage": s.cfg.downstream,
                "edge_budget_bytes": s.cfg.budget_bytes,
            })),
        );
    }
}

fn release(s: &Shared, bytes: u64) {
    let mut used = s.used.lock().unwrap_or_else(|p| p.into_inner());
    *used = used.saturating_sub(bytes);
    s.stats.depth_bytes.store(*used, Ordering::Relaxed);
    drop(used);
    s.room.notify_all();
}

impl<T> EdgeReceiver<T> {
    /// The next item; `None` once every sender is gone and the edge is empty.
    pub fn recv(&self) -> Option<T> {
        let (item, bytes) = self.rx.recv().ok()?;
        self.shared
            .stats
            .depth_items
            .fetch_sub(1, Ordering::Relaxed);
        release(&self.shared, bytes);
        Some(item)
    }

    pub fn stats(&self) -> Arc<EdgeStats> {
        self.shared.stats.clone()
    }
}

impl<T> Drop for EdgeReceiver<T> {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.receiver_gone.store(true, Ordering::Release);
        s.room.notify_all();
        // An episode still open when the edge closes ends here.
        if s.paused.swap(false, Ordering::AcqRel) {
            publish(s, "resumed", Severity::Info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Recorder;

    fn cfg(budget: u64, when_full: WhenFull) -> EdgeConfig {
        EdgeConfig {
            downstream: "storage_put",
            upstream: "chunker",
            budget_bytes: budget,
            when_full,
            pause_after: Duration::from_millis(20),
        }
    }

    #[test]
    fn reject_hands_the_item_back_when_full() {
        let (tx, rx, _) = edge::<u32>(cfg(10, WhenFull::Reject), None);
        tx.send(1, 8).expect("room");
        assert_eq!(tx.send(2, 8), Err(2));
        assert_eq!(rx.recv(), Some(1));
        tx.send(3, 8).expect("room again");
    }

    #[test]
    fn oversize_item_is_admitted_alone() {
        let (tx, rx, _) = edge::<u32>(cfg(10, WhenFull::Reject), None);
        tx.send(1, 100).expect("empty edge admits anything");
        assert_eq!(rx.recv(), Some(1));
    }

    #[test]
    fn slow_consumer_publishes_one_pause_episode_and_bounds_depth() {
        let bus = EventBus::new();
        let rec = Recorder::new();
        bus.add_sink(rec.clone());
        let (tx, rx, stats) = edge::<u64>(cfg(1000, WhenFull::Block), Some(bus.clone()));
        let consumer = std::thread::spawn(move || {
            let mut sum = 0;
            while let Some(v) = rx.recv() {
                std::thread::sleep(Duration::from_millis(5));
                sum += v;
            }
            sum
        });
        for i in 0..40u64 {
            tx.send(i, 300).expect("send");
        }
        drop(tx);
        assert_eq!(consumer.join().expect("join"), (0..40u64).sum::<u64>());
        bus.close();
        assert!(stats.max_depth_bytes.load(Ordering::Relaxed) <= 1000);
        let ops = rec.ops();
        let paused = ops.iter().filter(|o| *o == "chunker_paused").count();
        let resumed = ops.iter().filter(|o| *o == "chunker_resumed").count();
        assert!(paused >= 1, "{ops:?}");
        assert_eq!(paused, resumed, "{ops:?}");
        let first = rec
            .events()
            .into_iter()
            .find(|e| e.op == "chunker_paused")
            .expect("paused");
        assert_eq!(first.body.expect("body")["stage"], "storage_put");
    }

    #[test]
    fn dropped_receiver_unblocks_sender() {
        let (tx, rx, _) = edge::<u32>(cfg(10, WhenFull::Block), None);
        tx.send(1, 10).expect("first");
        let t = std::thread::spawn(move || tx.send(2, 10));
        std::thread::sleep(Duration::from_millis(30));
        drop(rx);
        assert_eq!(t.join().expect("join"), Err(2));
    }
}

//! Per-stage and per-edge counters.
//!
//! Each worker owns its own [`StageCounters`] for each stage (no sharing on
//! the hot path); readers sum them. Names follow Prometheus conventions when
//! exported (`pg_hardstorage_stage_busy_seconds_total{stage="compress"}`).

use crate::edge::EdgeStats;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct StageCounters {
    pub busy_ns: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub items: AtomicU64,
}

impl StageCounters {
    pub fn record(&self, busy_ns: u64, bytes_in: u64, bytes_out: u64) {
        self.busy_ns.fetch_add(busy_ns, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        self.items.fetch_add(1, Ordering::Relaxed);
    }
}

/// One stage's counters across all the threads that run it.
#[derive(Debug, Clone)]
pub struct StageHandle {
    pub name: &'static str,
    pub instances: Vec<Arc<StageCounters>>,
}

#[derive(Debug, Clone)]
pub struct EdgeHandle {
    pub name: String,
    pub budget_bytes: u64,
    pub stats: Arc<EdgeStats>,
}

/// Whole-pipeline counters, live.
#[derive(Debug, Default)]
pub struct Totals {
    pub bytes_logical: AtomicU64,
    pub bytes_physical: AtomicU64,
    pub chunks: AtomicU64,
    pub chunks_new: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub struct PipelineMetrics {
    pub stages: Vec<StageHandle>,
    pub edges: Vec<EdgeHandle>,
    pub totals: Arc<Totals>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageSnapshot {
    pub stage: &'static str,
    pub instances: usize,
    pub busy_seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub items: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeSnapshot {
    pub edge: String,
    pub budget_bytes: u64,
    pub depth_bytes: u64,
    pub max_depth_bytes: u64,
    pub wait_seconds: f64,
    pub backpressure_pauses: u64,
    pub items: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub stages: Vec<StageSnapshot>,
    pub edges: Vec<EdgeSnapshot>,
    pub bytes_logical: u64,
    pub bytes_physical: u64,
    pub chunks: u64,
    pub chunks_new: u64,
}

impl PipelineMetrics {
    pub fn snapshot(&self) -> Snapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let stages = self
            .stages
            .iter()
            .map(|s| StageSnapshot {
                stage: s.name,
                instances: s.instances.len(),
                busy_seconds: s.instances.iter().map(|c| r(&c.busy_ns)).sum::<u64>() as f64 / 1e9,
                bytes_in: s.instances.iter().map(|c| r(&c.bytes_in)).sum(),
                bytes_out: s.instances.iter().map(|c| r(&c.bytes_out)).sum(),
                items: s.instances.iter().map(|c| r(&c.items)).sum(),
            })
            .collect();
        let edges = self
            .edges
            .iter()
            .map(|e| EdgeSnapshot {
                edge: e.name.clone(),
                budget_bytes: e.budget_bytes,
                depth_bytes: r(&e.stats.depth_bytes),
                max_depth_bytes: r(&e.stats.max_depth_bytes),
                wait_seconds: r(&e.stats.wait_ns) as f64 / 1e9,
                backpressure_pauses: r(&e.stats.pauses),
                items: r(&e.stats.items),
            })
            .collect();
        Snapshot {
            stages,
            edges,
            bytes_logical: r(&self.totals.bytes_logical),
            bytes_physical: r(&self.totals.bytes_physical),
            chunks: r(&self.totals.chunks),
            chunks_new: r(&self.totals.chunks_new),
        }
    }
}

//! Per-stage and per-edge counters.
//!
//! Each worker owns its own [`StageCounters`] for each stage (no sharing on
//! the hot path); readers sum them. Names follow Prometheus conventions when
//! exported (`pg_hardstorage_stage_busy_seconds_total{stage="compress"}`).

use crate::edge::EdgeStats;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Process-wide counters for exporters: pipelines running now, and the
/// sums of every pipeline that finished in this process.
#[derive(Default)]
struct Registry {
    next: u64,
    live: Vec<(u64, PipelineMetrics)>,
    /// stage → (busy ns, bytes in, bytes out, items)
    stages: Vec<(&'static str, [u64; 4])>,
    /// edge (worker index dropped) → (pauses, wait ns, items)
    edges: Vec<(String, [u64; 3])>,
    runs: u64,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

fn registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    let mut g = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Registry::default))
}

/// `reader->chunk[3]` → `reader->chunk`: one series per edge kind.
fn edge_kind(name: &str) -> String {
    name.split('[').next().unwrap_or(name).to_string()
}

fn add<const N: usize, K: PartialEq>(list: &mut Vec<(K, [u64; N])>, k: K, v: [u64; N]) {
    match list.iter_mut().find(|(n, _)| *n == k) {
        Some((_, acc)) => {
            for (a, b) in acc.iter_mut().zip(v) {
                *a += b;
            }
        }
        None => list.push((k, v)),
    }
}

/// Registers a pipeline for its lifetime (drop retires it into the totals).
pub struct Registered(u64);

impl Registered {
    pub fn new(m: PipelineMetrics) -> Self {
        Registered(registry(|r| {
            r.next += 1;
            r.live.push((r.next, m));
            r.next
        }))
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        registry(|r| {
            if let Some(i) = r.live.iter().position(|(id, _)| *id == self.0) {
                let (_, m) = r.live.remove(i);
                let s = m.snapshot();
                for st in s.stages {
                    let busy = (st.busy_seconds * 1e9) as u64;
                    add(
                        &mut r.stages,
                        st.stage,
                        [busy, st.bytes_in, st.bytes_out, st.items],
                    );
                }
                for e in s.edges {
                    let wait = (e.wait_seconds * 1e9) as u64;
                    add(
                        &mut r.edges,
                        edge_kind(&e.edge),
                        [e.backpressure_pauses, wait, e.items],
                    );
                }
                r.runs += 1;
            }
        })
    }
}

/// One stage's counters summed over every pipeline of the process.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageTotal {
    pub stage: &'static str,
    pub busy_seconds: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub items: u64,
}

/// One edge kind: its live depth and its counters over the process.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeTotal {
    pub edge: String,
    pub depth_bytes: u64,
    pub backpressure_pauses: u64,
    pub wait_seconds: f64,
    pub items: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcessMetrics {
    pub pipelines_running: u64,
    pub pipelines_finished: u64,
    pub stages: Vec<StageTotal>,
    pub edges: Vec<EdgeTotal>,
}

/// Finished pipelines' totals plus the live ones' current counters.
pub fn process_metrics() -> ProcessMetrics {
    registry(|r| {
        let mut stages = r.stages.clone();
        let mut edges: Vec<(String, [u64; 4])> = r
            .edges
            .iter()
            .map(|(k, [p, w, i])| (k.clone(), [0, *p, *w, *i]))
            .collect();
        for (_, m) in &r.live {
            let s = m.snapshot();
            for st in s.stages {
                let busy = (st.busy_seconds * 1e9) as u64;
                add(
                    &mut stages,
                    st.stage,
                    [busy, st.bytes_in, st.bytes_out, st.items],
                );
            }
            for e in s.edges {
                let wait = (e.wait_seconds * 1e9) as u64;
                add(
                    &mut edges,
                    edge_kind(&e.edge),
                    [e.depth_bytes, e.backpressure_pauses, wait, e.items],
                );
            }
        }
        ProcessMetrics {
            pipelines_running: r.live.len() as u64,
            pipelines_finished: r.runs,
            stages: stages
                .into_iter()
                .map(|(stage, [b, i, o, n])| StageTotal {
                    stage,
                    busy_seconds: b as f64 / 1e9,
                    bytes_in: i,
                    bytes_out: o,
                    items: n,
                })
                .collect(),
            edges: edges
                .into_iter()
                .map(|(edge, [d, p, w, n])| EdgeTotal {
                    edge,
                    depth_bytes: d,
                    backpressure_pauses: p,
                    wait_seconds: w as f64 / 1e9,
                    items: n,
                })
                .collect(),
        }
    })
}

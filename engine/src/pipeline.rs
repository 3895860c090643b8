//! The thread-per-core runtime.
//!
//! ```text
//!  source ──edge(chunk)──▶ worker 0: splitter → stage → stage … ─┐
//!         ──edge(chunk)──▶ worker 1: splitter → stage → stage … ─┼─edge(storage_put)─▶ sink
//!         ──edge(chunk)──▶ worker N-1 …                          ─┘
//! ```
//!
//! Each worker thread is pinned to one core and owns its own instance of
//! every CPU stage, so the chain runs fused on that core without locks or
//! hand-offs. A file's blocks all go to one worker (the least loaded one when
//! the file starts), which keeps its chunk boundaries identical to a serial
//! run. Every edge is budgeted in bytes; a worker blocked on the sink edge
//! publishes `chunker_paused {stage: "storage_put"}`.

use crate::edge::{edge, EdgeConfig, EdgeReceiver, EdgeSender, WhenFull};
use crate::event::{Event, EventBus, Severity};
use crate::metrics::{EdgeHandle, PipelineMetrics, StageCounters, StageHandle, Totals};
use crate::stage::{Block, Chunk, ChunkRef, ChunkSink, Source, SplitterFactory, StageFactory};
use crate::Code;
use crate::Problem;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Worker threads (one per core by default).
    pub workers: usize,
    /// Byte budget of the sink edge; each worker's input edge gets the same.
    pub queue_bytes: u64,
    pub pin_cores: bool,
    pub pause_after: Duration,
    pub progress_every: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: default_workers(),
            queue_bytes: 64 << 20,
            pin_cores: true,
            pause_after: Duration::from_millis(100),
            progress_every: Duration::from_secs(1),
        }
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct Report {
    pub duration: Duration,
    pub metrics: PipelineMetrics,
}

/// The stages of one run, built by the assembly layer.
pub struct Stages<'a> {
    pub source: Box<dyn Source + 'a>,
    pub splitter: &'a dyn SplitterFactory,
    pub chain: &'a [Box<dyn StageFactory>],
    pub sink: Box<dyn ChunkSink + 'a>,
}

struct Abort {
    flag: AtomicBool,
    first: Mutex<Option<Problem>>,
}

impl Abort {
    fn fail(&self, p: Problem) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(p);
        }
        self.flag.store(true, Ordering::Release);
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

pub struct Pipeline {
    cfg: PipelineConfig,
    bus: Option<EventBus>,
    metrics: PipelineMetrics,
}

impl Pipeline {
    pub fn new(cfg: PipelineConfig, bus: Option<EventBus>) -> Self {
        Pipeline {
            cfg,
            bus,
            metrics: PipelineMetrics::default(),
        }
    }

    /// Live metrics of the run (valid before, during and after `run`).
    pub fn metrics(&self) -> PipelineMetrics {
        self.metrics.clone()
    }

    /// Runs to completion. `on_chunk` sees every chunk the sink accepted,
    /// in per-file order; it runs on the calling thread.
    pub fn run(
        &mut self,
        stages: Stages<'_>,
        on_chunk: &mut dyn FnMut(ChunkRef),
    ) -> Result<Report, Problem> {
        let started = Instant::now();
        let workers = self.cfg.workers.max(1);
        let Stages {
            mut source,
            splitter,
            chain,
            mut sink,
        } = stages;
        let total_bytes = source.total_bytes();

        // Counters: one instance per worker per stage.
        let source_ctr = Arc::new(StageCounters::default());
        let split_ctrs: Vec<_> = (0..workers)
            .map(|_| Arc::new(StageCounters::default()))
            .collect();
        let chain_ctrs: Vec<Vec<Arc<StageCounters>>> = chain
            .iter()
            .map(|_| {
                (0..workers)
                    .map(|_| Arc::new(StageCounters::default()))
                    .collect()
            })
            .collect();
        let sink_ctr = Arc::new(StageCounters::default());
        let totals = Arc::new(Totals::default());

        let mut metrics = PipelineMetrics {
            totals: totals.clone(),
            ..Default::default()
        };
        metrics.stages.push(StageHandle {
            name: source.name(),
            instances: vec![source_ctr.clone()],
        });
        metrics.stages.push(StageHandle {
            name: splitter.name(),
            instances: split_ctrs.clone(),
        });
        for (f, ctrs) in chain.iter().zip(&chain_ctrs) {
            metrics.stages.push(StageHandle {
                name: f.name(),
                instances: ctrs.clone(),
            });
        }
        metrics.stages.push(StageHandle {
            name: sink.name(),
            instances: vec![sink_ctr.clone()],
        });

        let edge_cfg = |downstream, upstream| EdgeConfig {
            downstream,
            upstream,
            budget_bytes: self.cfg.queue_bytes,
            when_full: WhenFull::Block,
            pause_after: self.cfg.pause_after,
        };
        let per_worker_budget = (self.cfg.queue_bytes / workers as u64).max(1 << 20);
        let mut worker_tx: Vec<EdgeSender<Block>> = Vec::new();
        let mut worker_rx: Vec<EdgeReceiver<Block>> = Vec::new();
        for w in 0..workers {
            let mut c = edge_cfg(splitter.name(), "reader");
            c.budget_bytes = per_worker_budget;
            let (tx, rx, stats) = edge::<Block>(c, self.bus.clone());
            metrics.edges.push(EdgeHandle {
                name: format!("{}->{}[{w}]", source.name(), splitter.name()),
                budget_bytes: per_worker_budget,
                stats,
            });
            worker_tx.push(tx);
            worker_rx.push(rx);
        }
        let (sink_tx, sink_rx, sink_stats) =
            edge::<Chunk>(edge_cfg(sink.name(), "chunker"), self.bus.clone());
        metrics.edges.push(EdgeHandle {
            name: format!("workers->{}", sink.name()),
            budget_bytes: self.cfg.queue_bytes,
            stats: sink_stats,
        });
        self.metrics = metrics.clone();
        // Exporters (`/metrics`) see the run while it is live, and its
        // counters in the process totals once it ends.
        let _registered = crate::metrics::Registered::new(metrics.clone());

        let abort = Abort {
            flag: AtomicBool::new(false),
            first: Mutex::new(None),
        };
        let done = AtomicBool::new(false);
        let cores = if self.cfg.pin_cores {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };

        std::thread::scope(|scope| {
            // Source: routes each file to the least-loaded worker.
            let abort_ref = &abort;
            let source_ctr = source_ctr.clone();
            let stats: Vec<_> = self.metrics.edges[..workers]
                .iter()
                .map(|e| e.stats.clone())
                .collect();
            let source_thread = std::thread::Builder::new()
                .name("source".into())
                .spawn_scoped(scope, move || {
                    let t0 = Instant::now();
                    let mut waited = Duration::ZERO;
                    let mut current: Option<(u64, usize)> = None;
                    let r = {
                        let mut emit = |block: Block| -> Result<(), Problem> {
                            if abort_ref.is_set() {
                                return Err(Problem::new(
                                    Code::PipelineAborted,
                                    "pipeline aborted",
                                ));
                            }
                            let w = match current {
                                Some((f, w)) if f == block.file => w,
                                _ => least_loaded(&stats),
                            };
                            current = if block.eof {
                                None
                            } else {
                                Some((block.file, w))
                            };
                            let n = block.data.len() as u64;
                            let t = Instant::now();
                            worker_tx[w].send(block, n.max(1)).map_err(|_| {
                                Problem::new(Code::PipelineAborted, "worker stopped")
                            })?;
                            waited += t.elapsed();
                            source_ctr.bytes_in.fetch_add(n, Ordering::Relaxed);
                            source_ctr.bytes_out.fetch_add(n, Ordering::Relaxed);
                            source_ctr.items.fetch_add(1, Ordering::Relaxed);
                            Ok(())
                        };
                        source.run(&mut emit)
                    };
                    let busy = t0.elapsed().saturating_sub(waited);
                    source_ctr
                        .busy_ns
                        .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
                    if let Err(p) = r {
                        if !abort_ref.is_set() {
                            abort_ref.fail(p);
                        }
                    }
                    // Dropping the senders lets the workers drain and stop.
                });
            if let Err(e) = source_thread {
                abort.fail(Problem::internal(format!("spawn source: {e}")));
            }

            for (w, rx) in worker_rx.into_iter().enumerate() {
                let tx = sink_tx.clone();
                let abort_ref = &abort;
                let split_ctr = split_ctrs[w].clone();
                let ctrs: Vec<_> = chain_ctrs.iter().map(|c| c[w].clone()).collect();
                let core = cores.get(w % cores.len().max(1)).copied();
                let spawned = std::thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn_scoped(scope, move || {
                        if let Some(core) = core {
                            core_affinity::set_for_current(core);
                        }
                        if let Err(p) = run_worker(w, rx, tx, splitter, chain, &split_ctr, &ctrs) {
                            abort_ref.fail(p);
                        }
                    });
                if let Err(e) = spawned {
                    abort.fail(Problem::internal(format!("spawn worker: {e}")));
                }
            }
            drop(sink_tx);

            // Progress reporter.
            if let Some(bus) = self.bus.clone() {
                let every = self.cfg.progress_every;
                let totals = totals.clone();
                let done = &done;
                let _ = std::thread::Builder::new()
                    .name("progress".into())
                    .spawn_scoped(scope, move || {
                        let mut next = Instant::now() + every;
                        while !done.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_millis(20).min(every));
                            if Instant::now() >= next {
                                next += every;
                                bus.publish(progress_event(&totals, started, total_bytes));
                            }
                        }
                    });
            }

            // The sink runs here, on the calling thread.
            let mut sink_failed = false;
            while let Some(chunk) = sink_rx.recv() {
                let t = Instant::now();
                let (file, offset, id) = (chunk.file, chunk.offset, chunk.id);
                let len = chunk.data.len() as u32;
                let stored = match sink.accept(chunk) {
                    Ok(s) => s,
                    Err(p) => {
                        abort.fail(p);
                        sink_failed = true;
                        break;
                    }
                };
                sink_ctr.record(t.elapsed().as_nanos() as u64, len as u64, stored as u64);
                totals
                    .bytes_logical
                    .fetch_add(len as u64, Ordering::Relaxed);
                totals
                    .bytes_physical
                    .fetch_add(stored as u64, Ordering::Relaxed);
                totals.chunks.fetch_add(1, Ordering::Relaxed);
                if stored > 0 {
                    totals.chunks_new.fetch_add(1, Ordering::Relaxed);
                }
                on_chunk(ChunkRef {
                    file,
                    offset,
                    len,
                    id,
                    stored,
                });
            }
            drop(sink_rx);
            if !sink_failed && !abort.is_set() {
                let t = Instant::now();
                if let Err(p) = sink.finish() {
                    abort.fail(p);
                }
                sink_ctr
                    .busy_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            done.store(true, Ordering::Release);
        });

        if let Some(p) = abort.first.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(p);
        }
        if let Some(bus) = &self.bus {
            bus.publish(progress_event(&totals, started, total_bytes));
        }
        Ok(Report {
            duration: started.elapsed(),
            metrics: self.metrics.clone(),
        })
    }
}

fn least_loaded(stats: &[Arc<crate::edge::EdgeStats>]) -> usize {
    stats
        .iter()
        .enumerate()
        .min_by_key(|(_, s)| s.depth_bytes.load(Ordering::Relaxed))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

fn run_worker(
    w: usize,
    rx: EdgeReceiver<Block>,
    tx: EdgeSender<Chunk>,
    splitter: &dyn SplitterFactory,
    chain: &[Box<dyn StageFactory>],
    split_ctr: &StageCounters,
    ctrs: &[Arc<StageCounters>],
) -> Result<(), Problem> {
    let mut split = splitter.build(w)?;
    let mut stages = chain
        .iter()
        .map(|f| f.build(w))
        .collect::<Result<Vec<_>, _>>()?;
    let mut pending: Vec<Chunk> = Vec::new();
    while let Some(block) = rx.recv() {
        let t = Instant::now();
        let n = block.data.len() as u64;
        split.push(block, &mut |c| pending.push(c))?;
        let out: u64 = pending.iter().map(|c| c.data.len() as u64).sum();
        split_ctr.record(t.elapsed().as_nanos() as u64, n, out);
        for mut chunk in pending.drain(..) {
            for (stage, ctr) in stages.iter_mut().zip(ctrs) {
                // A chunk the repository already holds skips the rest of the chain.
                if chunk.known {
                    break;
                }
                let t = Instant::now();
                let before = chunk.current().len() as u64;
                stage.process(&mut chunk)?;
                ctr.record(
                    t.elapsed().as_nanos() as u64,
                    before,
                    chunk.current().len() as u64,
                );
            }
            // The plaintext slice keeps its block alive until the sink is
            // done with it, so it counts against the budget with the payload.
            let weight =
                (chunk.data.len() + chunk.payload.as_ref().map_or(0, |p| p.len())) as u64 + 64;
            tx.send(chunk, weight)
                .map_err(|_| Problem::new(Code::PipelineAborted, "storage stage stopped"))?;
        }
    }
    Ok(())
}

fn progress_event(totals: &Totals, started: Instant, total: Option<u64>) -> Event {
    let logical = totals.bytes_logical.load(Ordering::Relaxed);
    let physical = totals.bytes_physical.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let rate = logical as f64 / secs;
    let mut body = json!({
        "bytes_logical": logical,
        "bytes_physical": physical,
        "dedup_ratio": if physical == 0 { 0.0 } else { round2(logical as f64 / physical as f64) },
        "throughput_mb_s": round2(rate / 1e6),
    });
    if let Some(total) = total {
        body["bytes_total"] = json!(total);
        if rate > 0.0 {
            body["eta_seconds"] = json!(round2(total.saturating_sub(logical) as f64 / rate));
        }
    }
    Event::new(Severity::Info, "progress").body(body)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

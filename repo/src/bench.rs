//! `pg_hardstorage bench`: the throughput tuning harness.
//!
//! Runs the real pipeline (same stages, same edges, same pack sink) on
//! generated data of a chosen size and compressibility, or on a directory,
//! into a store that discards what it is given. In the same run it measures
//! each stage's single-core rate on a sample, so it can report
//! `pipeline ÷ (workers × single-core chain rate)` — a ratio that stays
//! meaningful on a shared, noisy machine.

use crate::backup::{run_pipeline, walk};
use crate::keys::{random32, Keys};
use crate::Repository;
use bytes::Bytes;
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::format::{
    ChunkerParams, CompressionParams, EntryKind, RepoConfig, FORMAT_VERSION,
};
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_engine::stage::{Block, Chunk, ChunkStage, Source, SplitterFactory};
use pg_hardstorage_engine::store::{ObjectInfo, Store};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use serde::Serialize;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub size: u64,
    pub file_size: u64,
    pub compressibility: f64,
    pub dir: Option<PathBuf>,
    pub sample: u64,
    pub zstd_level: i32,
    pub pipeline: PipelineConfig,
}

#[derive(Debug, Serialize)]
pub struct StageRate {
    pub stage: String,
    pub gb_s: f64,
}

#[derive(Debug, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub instances: usize,
    pub gb_s_per_instance: f64,
    pub busy_pct: f64,
}

#[derive(Debug, Serialize)]
pub struct EdgeRow {
    pub edge: String,
    pub budget_bytes: u64,
    pub max_depth_bytes: u64,
    pub backpressure_pauses: u64,
    pub wait_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub input: String,
    pub bytes: u64,
    pub workers: usize,
    pub read_backend: String,
    pub wall_seconds: f64,
    pub pipeline_gb_s: f64,
    pub single_core: Vec<StageRate>,
    pub chain_gb_s: f64,
    /// Fused chunk→…→encrypt on one core, best of three.
    /// pipeline ÷ (workers × single-core chain rate)
    pub efficiency: f64,
    pub stages: Vec<StageRow>,
    pub edges: Vec<EdgeRow>,
    pub bottleneck: String,
    pub bytes_stored: u64,
    pub peak_rss_bytes: u64,
}

/// A store that keeps nothing: the bench measures the CPU pipeline.
#[derive(Default)]
struct NullStore {
    bytes: AtomicU64,
}

impl Store for NullStore {
    fn describe(&self) -> String {
        "null://".into()
    }
    fn put(&self, _: &str, data: Bytes) -> Result<(), Problem> {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn put_if_absent(&self, k: &str, data: Bytes) -> Result<bool, Problem> {
        self.put(k, data).map(|_| true)
    }
    fn get(&self, _: &str) -> Result<Option<Bytes>, Problem> {
        Ok(None)
    }
    fn get_range(&self, k: &str, _: Range<u64>) -> Result<Bytes, Problem> {
        Err(Problem::new(
            Code::VerifyMissingObject,
            format!("{k}: null store keeps nothing"),
        ))
    }
    fn head(&self, _: &str) -> Result<Option<u64>, Problem> {
        Ok(None)
    }
    fn list(&self, _: &str) -> Result<Vec<ObjectInfo>, Problem> {
        Ok(Vec::new())
    }
    fn delete(&self, _: &str) -> Result<(), Problem> {
        Ok(())
    }
}

pub(crate) fn bench_repo(
    level: i32,
    store: pg_hardstorage_engine::store::DynStore,
) -> Result<Repository, Problem> {
    Ok(Repository {
        store,
        config: RepoConfig {
            format_version: FORMAT_VERSION,
            repo_id: "bench".into(),
            created_at: String::new(),
            chunker: ChunkerParams::default(),
            compression: CompressionParams {
                algorithm: "zstd".into(),
                level,
            },
            encryption: "aes-256-gcm".into(),
            pack_target_bytes: 32 << 20,
        },
        keys: Keys::derive("bench".into(), &random32()?),
    })
}

/// Deterministic generator of unique, tunably compressible bytes.
#[derive(Clone)]
pub struct Generator {
    random: Arc<Vec<u8>>,
    text: Arc<Vec<u8>>,
    pub(crate) compressibility: f64,
    counter: u64,
}

const UNIT: usize = 4096;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

impl Generator {
    pub fn new(compressibility: f64, seed: u64) -> Self {
        let mut x = seed | 1;
        let random: Vec<u8> = (0..(32usize << 20) / 8)
            .flat_map(|_| xorshift(&mut x).to_le_bytes())
            .collect();
        let words = [
            "LOG:",
            "duration:",
            "statement:",
            "SELECT",
            "abalance",
            "FROM",
            "pgbench_accounts",
            "WHERE",
            "aid",
            "=",
            "UPDATE",
            "SET",
            "checkpoint",
            "complete:",
            "wrote",
            "buffers",
            "connection",
            "authorized:",
            "user=postgres",
            "database=app",
        ];
        let mut text = Vec::with_capacity(16 << 20);
        while text.len() < 16 << 20 {
            let r = xorshift(&mut x);
            let _ = write!(
                Vec2(&mut text),
                "2026-11-27 10:{:02}:{:02}.{:03} UTC [{}] ",
                r % 60,
                (r >> 8) % 60,
                (r >> 16) % 1000,
                1000 + (r >> 24) % 9000
            );
            for i in 0..(4 + (r >> 40) % 8) {
                let w = words[((r >> (i * 5)) % words.len() as u64) as usize];
                text.extend_from_slice(w.as_bytes());
                text.push(b' ');
            }
            let _ = writeln!(Vec2(&mut text), "{}", (r >> 33) % 100_000);
        }
        Generator {
            random: Arc::new(random),
            text: Arc::new(text),
            compressibility,
            counter: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// A new buffer of `len` generated bytes (no zero-fill first).
    pub fn make(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        let rand_part = ((1.0 - self.compressibility) * UNIT as f64).round() as usize;
        while v.len() < len {
            let n = UNIT.min(len - v.len());
            let (ro, to) = self.offsets();
            let r = rand_part.min(n);
            v.extend_from_slice(&self.random[ro..ro + r]);
            v.extend_from_slice(&self.text[to..to + (n - r)]);
        }
        v
    }

    /// Pool offsets for the next unit: splitmix64 of a counter, so
    /// neighbouring units get unrelated offsets.
    fn offsets(&mut self) -> (usize, usize) {
        self.counter = self.counter.wrapping_add(1);
        let mut x = self.counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        x |= 1;
        let ro = (xorshift(&mut x) as usize) % (self.random.len() - UNIT);
        let to = (xorshift(&mut x) as usize) % (self.text.len() - UNIT);
        (ro, to)
    }

    /// Fills `buf`: per 4 KiB unit, a random part and a text part in the
    /// ratio asked for, each from a random offset of its pool, so no two
    /// chunks are alike and nothing deduplicates.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let rand_part = ((1.0 - self.compressibility) * UNIT as f64).round() as usize;
        for unit in buf.chunks_mut(UNIT) {
            let n = unit.len();
            let r = rand_part.min(n);
            let (ro, to) = self.offsets();
            unit[..r].copy_from_slice(&self.random[ro..ro + r]);
            unit[r..].copy_from_slice(&self.text[to..to + (n - r)]);
        }
    }
}

struct Vec2<'a>(&'a mut Vec<u8>);
impl std::fmt::Write for Vec2<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Generated input as a pipeline source: files of `file_size` bytes.
pub(crate) struct GenSource {
    pub gen: Generator,
    pub total: u64,
    pub file_size: u64,
}

impl Source for GenSource {
    fn name(&self) -> &'static str {
        "read"
    }
    fn total_bytes(&self) -> Option<u64> {
        Some(self.total)
    }
    fn run(&mut self, emit: &mut dyn FnMut(Block) -> Result<(), Problem>) -> Result<(), Problem> {
        const BLOCK: u64 = 8 << 20;
        let mut done = 0u64;
        let mut file = 0u64;
        while done < self.total {
            let flen = self.file_size.min(self.total - done);
            let mut off = 0;
            while off < flen {
                let n = BLOCK.min(flen - off);
                let buf = self.gen.make(n as usize);
                emit(Block {
                    file,
                    offset: off,
                    data: Bytes::from(buf),
                    eof: off + n == flen,
                })?;
                off += n;
            }
            done += flen;
            file += 1;
        }
        Ok(())
    }
}

pub(crate) fn rss_peak() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kib| kib * 1024)
}

pub(crate) fn reset_rss_peak() {
    // Linux: writing 5 to clear_refs resets VmHWM to the current RSS.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Single-core rates on `sample` bytes of the same input: each stage alone,
/// and the fused chain as a worker runs it (every chunk through every stage
/// while it is hot in cache). Best of three, to shrug off a noisy neighbour.
fn single_core(repo: &Repository, sample: &[u8]) -> Result<(Vec<StageRate>, f64), Problem> {
    const REPS: usize = 3;
    let gb = |s: f64| sample.len() as f64 / s.max(1e-9) / 1e9;
    let params = phs_chunk::Params::new(&repo.config.chunker)?;
    let chain = crate::backup::chain(repo, Arc::new(phs_dedup::DedupIndex::default()));
    let mut split_best = f64::MAX;
    let mut stage_best = vec![f64::MAX; chain.len()];
    let mut fused_best = f64::MAX;
    let mut names = vec!["chunk".to_string()];
    for _ in 0..REPS {
        // The blocks exist before the clock starts, as the reader made them.
        let blocks: Vec<Block> = sample
            .chunks(8 << 20)
            .enumerate()
            .map(|(i, b)| Block {
                file: 0,
                offset: (i * (8 << 20)) as u64,
                data: Bytes::copy_from_slice(b),
                eof: (i + 1) * (8 << 20) >= sample.len(),
            })
            .collect();
        let mut split = phs_chunk::FastCdcFactory(params).build(0)?;
        let mut chunks: Vec<Chunk> = Vec::new();
        let t = Instant::now();
        for blk in blocks {
            split.push(blk, &mut |c| chunks.push(c))?;
        }
        split_best = split_best.min(t.elapsed().as_secs_f64());

        let mut stages: Vec<Box<dyn ChunkStage>> =
            chain.iter().map(|f| f.build(0)).collect::<Result<_, _>>()?;
        let mut fused = chunks.clone();
        let t = Instant::now();
        for c in fused.iter_mut() {
            for st in stages.iter_mut() {
                st.process(c)?;
            }
        }
        fused_best = fused_best.min(t.elapsed().as_secs_f64());
        drop(fused);

        names.truncate(1);
        for (i, st) in stages.iter_mut().enumerate() {
            names.push(st.name().to_string());
            let t = Instant::now();
            for c in chunks.iter_mut() {
                st.process(c)?;
            }
            stage_best[i] = stage_best[i].min(t.elapsed().as_secs_f64());
        }
    }
    let mut rates = vec![StageRate {
        stage: names[0].clone(),
        gb_s: gb(split_best),
    }];
    for (i, best) in stage_best.iter().enumerate() {
        rates.push(StageRate {
            stage: names[i + 1].clone(),
            gb_s: gb(*best),
        });
    }
    Ok((rates, gb(split_best + fused_best)))
}

pub fn run(opts: &BenchOptions, bus: &EventBus) -> Result<BenchReport, Problem> {
    let store = Arc::new(NullStore::default());
    let repo = bench_repo(opts.zstd_level, store.clone())?;
    let mut gen = Generator::new(opts.compressibility, 7);

    // Single-core rates first, on a sample of the same kind of data.
    let single = {
        let mut sample = vec![0u8; opts.sample.min(opts.size.max(1 << 20)) as usize];
        match &opts.dir {
            Some(dir) => fill_from_dir(dir, &mut sample)?,
            None => Generator::new(opts.compressibility, 99).fill(&mut sample),
        }
        single_core(&repo, &sample)?
    };
    let (single, chain_gb_s) = single;

    let (source, input, backend): (Box<dyn Source>, String, String) = match &opts.dir {
        Some(dir) => {
            let (entries, paths) = walk(dir, bus)?;
            let files: Vec<_> = entries
                .iter()
                .zip(paths)
                .enumerate()
                .filter(|(_, (e, _))| e.kind == EntryKind::File)
                .map(|(i, (e, p))| phs_read::FileEntry {
                    index: i as u64,
                    path: p,
                    size: e.size,
                })
                .collect();
            let probe = phs_read::probe();
            (
                Box::new(phs_read::FileSource::new(files, probe.backend)),
                format!("directory {}", dir.display()),
                probe.reason,
            )
        }
        None => {
            gen.compressibility = opts.compressibility;
            (
                Box::new(GenSource {
                    gen,
                    total: opts.size,
                    file_size: opts.file_size,
                }),
                format!("generated, compressibility {:.2}", opts.compressibility),
                "generated in memory".into(),
            )
        }
    };

    reset_rss_peak();
    let t = Instant::now();
    let report = run_pipeline(
        &repo,
        source,
        Arc::new(phs_dedup::DedupIndex::default()),
        bus,
        &opts.pipeline,
        None,
        &mut |_| {},
    )?;
    let wall = t.elapsed().as_secs_f64();
    let snap = report.metrics.snapshot();
    let bytes = snap.bytes_logical;
    let pipeline_gb_s = bytes as f64 / wall / 1e9;
    let workers = opts.pipeline.workers.max(1);
    let stages: Vec<StageRow> = snap
        .stages
        .iter()
        .map(|s| StageRow {
            stage: s.stage.to_string(),
            instances: s.instances,
            gb_s_per_instance: if s.busy_seconds > 0.0 {
                // Rate while busy, per instance: bytes / total busy time.
                s.bytes_in as f64 / s.busy_seconds / 1e9
            } else {
                0.0
            },
            busy_pct: 100.0 * s.busy_seconds / (wall * s.instances.max(1) as f64),
        })
        .collect();
    let bottleneck = stages
        .iter()
        .max_by(|a, b| a.busy_pct.total_cmp(&b.busy_pct))
        .map(|s| s.stage.clone())
        .unwrap_or_default();
    let edges = snap
        .edges
        .iter()
        .map(|e| EdgeRow {
            edge: e.edge.clone(),
            budget_bytes: e.budget_bytes,
            max_depth_bytes: e.max_depth_bytes,
            backpressure_pauses: e.backpressure_pauses,
            wait_seconds: e.wait_seconds,
        })
        .collect();
    Ok(BenchReport {
        input,
        bytes,
        workers,
        read_backend: backend,
        wall_seconds: wall,
        pipeline_gb_s,
        chain_gb_s,
        efficiency: pipeline_gb_s / (workers as f64 * chain_gb_s),
        single_core: single,
        stages,
        edges,
        bottleneck,
        bytes_stored: store.bytes.load(Ordering::Relaxed),
        peak_rss_bytes: rss_peak(),
    })
}

fn fill_from_dir(dir: &std::path::Path, buf: &mut [u8]) -> Result<(), Problem> {
    let (entries, paths) = walk(dir, &EventBus::new())?;
    let mut off = 0;
    for (e, p) in entries.iter().zip(paths) {
        if off >= buf.len() {
            break;
        }
        if e.kind != EntryKind::File {
            continue;
        }
        let data =
            std::fs::read(&p).map_err(|er| Problem::io(Code::IoReadFailed, p.display(), &er))?;
        let n = data.len().min(buf.len() - off);
        buf[off..off + n].copy_from_slice(&data[..n]);
        off += n;
    }
    if off == 0 {
        return Err(Problem::new(
            Code::UsageInvalidArgument,
            format!("{} holds no file data", dir.display()),
        ));
    }
    let filled = off;
    // Repeat what exists so the sample has the asked-for size.
    while off < buf.len() {
        let n = filled.min(buf.len() - off);
        buf.copy_within(0..n, off);
        off += n;
    }
    Ok(())
}

impl BenchReport {
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "input        {} ({:.2} GiB)",
            self.input,
            self.bytes as f64 / (1u64 << 30) as f64
        );
        let _ = writeln!(s, "read         {}", self.read_backend);
        let _ = writeln!(s, "workers      {}", self.workers);
        let _ = writeln!(s);
        let _ = writeln!(s, "single-core stage rates (same run, same data):");
        for r in &self.single_core {
            let _ = writeln!(s, "  {:<12} {:>7.2} GB/s", r.stage, r.gb_s);
        }
        let _ = writeln!(
            s,
            "  {:<12} {:>7.2} GB/s (fused, as a worker runs it)",
            "chain", self.chain_gb_s
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<14} {:>5} {:>14} {:>7}",
            "STAGE", "INST", "GB/s/INST", "BUSY%"
        );
        for r in &self.stages {
            let _ = writeln!(
                s,
                "{:<14} {:>5} {:>14.2} {:>6.1}%",
                r.stage, r.instances, r.gb_s_per_instance, r.busy_pct
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<26} {:>10} {:>10} {:>7} {:>8}",
            "EDGE", "BUDGET", "MAX DEPTH", "PAUSES", "WAIT s"
        );
        for e in &self.edges {
            let _ = writeln!(
                s,
                "{:<26} {:>9}M {:>9.1}M {:>7} {:>8.2}",
                e.edge,
                e.budget_bytes >> 20,
                e.max_depth_bytes as f64 / (1 << 20) as f64,
                e.backpressure_pauses,
                e.wait_seconds
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "bottleneck   {}", self.bottleneck);
        let _ = writeln!(
            s,
            "pipeline     {:.3} GB/s in {:.2} s",
            self.pipeline_gb_s, self.wall_seconds
        );
        let _ = writeln!(
            s,
            "efficiency   {:.2} = pipeline / ({} workers x {:.3} GB/s single-core chain)",
            self.efficiency, self.workers, self.chain_gb_s
        );
        let _ = writeln!(
            s,
            "peak RSS     {:.0} MiB",
            self.peak_rss_bytes as f64 / (1 << 20) as f64
        );
        s
    }
}

//! The whole pipeline, end to end, on generated data into a discarding
//! store: the same run `pg_hardstorage bench` makes, under criterion.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pg_hardstorage_engine::event::EventBus;
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_repo::bench::{run, BenchOptions};

const LEN: u64 = 256 << 20;

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(LEN));
    g.sample_size(10);
    for (name, comp) in [("random", 0.0), ("text", 0.9)] {
        let opts = BenchOptions {
            size: LEN,
            file_size: 64 << 20,
            compressibility: comp,
            dir: None,
            sample: 8 << 20,
            zstd_level: 1,
            pipeline: PipelineConfig::default(),
        };
        g.bench_function(name, |b| {
            b.iter(|| run(&opts, &EventBus::new()).expect("bench run"))
        });
    }
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);

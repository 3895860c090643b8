//! One criterion group per stage, with a plain single-thread baseline
//! (memcpy) to compare against. Throughput is bytes of plaintext.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pg_hardstorage_engine::stage::{ChunkId, ChunkStage};
use phs_benches::{chunks, data};
use std::hint::black_box;

const LEN: usize = 32 << 20;

fn inputs() -> [(&'static str, Vec<u8>); 2] {
    [("random", data(LEN, 0.0)), ("text", data(LEN, 0.9))]
}

fn baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    g.throughput(Throughput::Bytes(LEN as u64));
    let src = data(LEN, 0.0);
    let mut dst = vec![0u8; LEN];
    g.bench_function("memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&src)))
    });
    g.finish();
}

fn chunk(c: &mut Criterion) {
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(LEN as u64));
    let params = phs_chunk::Params::new(&Default::default()).expect("params");
    for (name, d) in inputs() {
        g.bench_function(name, |b| {
            b.iter(|| phs_chunk::cut_points(black_box(&d), &params))
        });
    }
    g.finish();
}

fn per_chunk(c: &mut Criterion, group: &str, build: impl Fn() -> Box<dyn ChunkStage>) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(LEN as u64));
    for (name, d) in inputs() {
        let cs = chunks(&d);
        let mut stage = build();
        g.bench_function(name, |b| {
            b.iter_batched(
                || cs.clone(),
                |mut cs| {
                    for ch in cs.iter_mut() {
                        stage.process(ch).expect("stage");
                    }
                    cs
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn hash(c: &mut Criterion) {
    per_chunk(c, "hash", || {
        use pg_hardstorage_engine::stage::StageFactory;
        phs_hash::KeyedHashFactory { key: [1; 32] }
            .build(0)
            .expect("hash")
    });
}

fn compress(c: &mut Criterion) {
    for level in [1, 3] {
        per_chunk(c, &format!("compress_zstd{level}"), || {
            Box::new(phs_compress::Zstd::new(level).expect("zstd"))
        });
    }
}

fn encrypt(c: &mut Criterion) {
    per_chunk(c, "encrypt", || {
        use pg_hardstorage_engine::stage::StageFactory;
        phs_encrypt::EncryptFactory { key: Some([7; 32]) }
            .build(0)
            .expect("encrypt")
    });
}

fn dedup(c: &mut Criterion) {
    let idx: phs_dedup::DedupIndex = (0..100_000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_le_bytes());
            ChunkId(id)
        })
        .collect();
    let idx = std::sync::Arc::new(idx);
    per_chunk(c, "dedup", move || {
        use pg_hardstorage_engine::stage::StageFactory;
        phs_dedup::DedupFactory { index: idx.clone() }
            .build(0)
            .expect("dedup")
    });
}

/// The measurement behind choosing aws-lc-rs over RustCrypto's aes-gcm
/// (ARCHITECTURE.md, "Encryption"): the same 1 MiB seal, both libraries.
fn aead_libraries(c: &mut Criterion) {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    let mut g = c.benchmark_group("aes256gcm_1MiB");
    g.throughput(Throughput::Bytes(1 << 20));
    let mut buf = data(1 << 20, 0.0);
    let ours = phs_encrypt::Aead::new(&[3; 32]);
    g.bench_function("aws-lc-rs", |b| {
        b.iter(|| {
            let mut v = Vec::with_capacity(buf.len() + 16);
            v.extend_from_slice(&buf);
            ours.seal_in_place(&[1; 12], b"aad", &mut v, 0)
                .expect("seal");
            v
        })
    });
    let rc = aes_gcm::Aes256Gcm::new(&[3u8; 32].into());
    g.bench_function("rustcrypto-aes-gcm", |b| {
        b.iter(|| {
            rc.encrypt_inout_detached(&[1u8; 12].into(), b"aad", buf.as_mut_slice().into())
                .expect("seal")
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = baseline, chunk, hash, dedup, compress, encrypt, aead_libraries
}
criterion_main!(benches);

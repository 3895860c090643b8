use crate::add_path_deployment;
use pg_hardstorage_engine::event::{EventBus, Recorder};
use pg_hardstorage_engine::pipeline::PipelineConfig;
use pg_hardstorage_engine::store::Throttled;
use pg_hardstorage_repo::backup::{backup_path, BackupOptions};
use pg_hardstorage_repo::Repository;
use pg_hardstorage_testkit::tree::write_big_file;
use pg_hardstorage_testkit::{local_repo, small_opts};
use std::sync::Arc;
use std::time::Duration;

/// With storage slower than the CPU stages, the chunker waits on the
/// storage_put edge: the events say so, and the edge never holds more than
/// its budget (plus one item).
#[test]
fn slow_storage_pauses_the_chunker_and_memory_stays_bounded() {
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    for i in 0..4 {
        write_big_file(&src.join(format!("f{i}")), 8 << 20, i);
    }
    add_path_deployment(&repo, "slow", &src);
    let slow = Repository {
        store: Arc::new(Throttled {
            inner: repo.store.clone(),
            put_delay: Duration::from_millis(150),
        }),
        ..repo.clone()
    };
    let bus = EventBus::new();
    let rec = Recorder::new();
    bus.add_sink(rec.clone());
    let budget = 2 << 20;
    let cfg = PipelineConfig {
        workers: 2,
        queue_bytes: budget,
        pause_after: Duration::from_millis(50),
        progress_every: Duration::from_millis(100),
        ..Default::default()
    };
    let m = backup_path(
        &slow,
        "slow",
        &bus,
        &BackupOptions {
            pipeline: cfg,
            read_backend: None,
            full: false,
        },
    )
    .expect("backup");
    bus.close();
    assert_eq!(m.stats.files, 4);
    let events = rec.events();
    let paused: Vec<_> = events.iter().filter(|e| e.op == "chunker_paused").collect();
    assert!(!paused.is_empty(), "no chunker_paused in {:?}", rec.ops());
    for e in &paused {
        assert_eq!(e.severity_name, pg_hardstorage_engine::Severity::Warning);
        let b = e.body.as_ref().expect("body");
        assert_eq!(b["reason"], "backpressure");
        assert_eq!(b["stage"], "storage_put");
    }
    let resumed = events.iter().filter(|e| e.op == "chunker_resumed").count();
    assert_eq!(resumed, paused.len(), "each pause is matched by a resume");
}

#[test]
fn edges_never_exceed_their_byte_budget() {
    use pg_hardstorage_repo::backup::run_pipeline;
    let (tmp, repo) = local_repo(small_opts());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    write_big_file(&src.join("f"), 24 << 20, 3);
    let slow = Repository {
        store: Arc::new(Throttled {
            inner: repo.store.clone(),
            put_delay: Duration::from_millis(100),
        }),
        ..repo.clone()
    };
    let budget: u64 = 2 << 20;
    let cfg = PipelineConfig {
        workers: 2,
        queue_bytes: budget,
        ..Default::default()
    };
    let files = vec![phs_read::FileEntry {
        index: 0,
        path: src.join("f"),
        size: 24 << 20,
    }];
    let source = Box::new(
        phs_read::FileSource::new(files, phs_read::Backend::Pread).with_block_size(1 << 20),
    );
    let report = run_pipeline(
        &slow,
        source,
        Arc::new(Default::default()),
        &EventBus::new(),
        &cfg,
        None,
        &mut |_| {},
    )
    .expect("pipeline");
    let snap = report.metrics.snapshot();
    let max_item = 256 << 10; // the largest chunk envelope this repository makes, roughly
    for e in &snap.edges {
        assert!(
            e.max_depth_bytes <= e.budget_bytes.max(1 << 20) + max_item + 4096,
            "edge {} held {} bytes over a budget of {}",
            e.edge,
            e.max_depth_bytes,
            e.budget_bytes
        );
    }
    let sink_edge = snap.edges.last().expect("sink edge");
    assert!(sink_edge.backpressure_pauses >= 1, "{snap:?}");
}

//! Streaming backups over the API, and webhook sinks that see the same
//! events without ever slowing a backup.

use crate::{dirs_equal, ndjson, Options, TestServer};
use pg_hardstorage_apiserver::webhook;
use pg_hardstorage_testkit::http::Receiver;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[test]
fn a_backup_over_the_api_streams_ndjson_and_restores() {
    let hook = Receiver::start();
    let wh = webhook::Webhook::start(webhook::parse(&hook.url).expect("url"), 1024);
    let s = TestServer::start_with(Options {
        webhooks: vec![wh.clone()],
        ..Default::default()
    });
    let src = s.path_deployment("p", None);
    let r = s
        .client()
        .with_token(&s.token("ci", &["backup:create"], None))
        .post("/v1/deployments/p/backups", r#"{"workers": 2}"#);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert!(r.body.ends_with(b"\n"));
    let events = ndjson(&r.body);
    let ops: Vec<_> = events
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        ops.first().map(String::as_str),
        Some("backup_started"),
        "{ops:?}"
    );
    assert_eq!(
        ops.last().map(String::as_str),
        Some("backup_completed"),
        "{ops:?}"
    );
    assert!(ops.iter().any(|o| o == "progress"), "{ops:?}");
    for e in &events {
        assert_eq!(e["schema"], "pg_hardstorage.v1");
        assert!(e["severity_name"].as_str().is_some());
    }
    let done = events.last().expect("last");
    assert_eq!(done["body"]["verified"], true);
    assert!(done["body"]["duration_seconds"].as_f64().is_some());
    let p = &events
        .iter()
        .find(|e| e["op"] == "progress")
        .expect("progress")["body"];
    for k in [
        "bytes_logical",
        "bytes_physical",
        "dedup_ratio",
        "throughput_mb_s",
    ] {
        assert!(p.get(k).is_some(), "progress lacks {k}: {p}");
    }
    let id = done["body"]["backup_id"].as_str().expect("id").to_string();

    // It restores.
    let target = s.tmp.path().join("back");
    let req = json!({"backup_id": id, "target": target}).to_string();
    let r = s.admin().post("/v1/deployments/p/restores", &req);
    assert_eq!(
        ndjson(&r.body).last().expect("ev")["op"],
        "restore_completed"
    );
    dirs_equal(&src, &target);

    // The webhook saw the same events, byte for byte, in the same order:
    // the backup's, then the restore's.
    let want: Vec<String> = String::from_utf8_lossy(&r.body)
        .lines()
        .map(str::to_string)
        .collect();
    let t0 = Instant::now();
    while wh.delivered.load(Ordering::SeqCst) < (events.len() + want.len()) as u64
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = hook.lines();
    let streamed: Vec<String> = events
        .iter()
        .chain(ndjson(&r.body).iter())
        .map(|e| e.to_string())
        .collect();
    let got_json: Vec<String> = got
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .expect("json")
                .to_string()
        })
        .collect();
    assert_eq!(
        got_json, streamed,
        "the webhook's events differ from the streams'"
    );
    assert_eq!(wh.dropped.load(Ordering::SeqCst), 0);
}

#[test]
fn a_stalled_webhook_drops_and_counts_but_never_holds_a_backup() {
    let hook = Receiver::start();
    hook.stalled.store(true, Ordering::SeqCst);
    // One queued event at most: the stalled receiver holds the delivery
    // thread on its first POST, so later events overflow.
    let wh = webhook::Webhook::start(webhook::parse(&hook.url).expect("url"), 1);
    // Hold the delivery thread on a first POST before the backup starts
    // (else, on a loaded machine, it may batch the backup's first events
    // before the queue fills, and nothing overflows).
    {
        use pg_hardstorage_engine::event::EventSink;
        let primer = pg_hardstorage_engine::event::Event::new(
            pg_hardstorage_engine::event::Severity::Info,
            "primer",
        );
        wh.sink().handle(&primer);
        let t0 = std::time::Instant::now();
        while hook.arrived.load(Ordering::SeqCst) == 0 {
            assert!(t0.elapsed() < Duration::from_secs(10), "no POST arrived");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let s = TestServer::start_with(Options {
        webhooks: vec![wh.clone()],
        ..Default::default()
    });
    s.path_deployment("p", None);
    let r = s.admin().post("/v1/deployments/p/backups", "");
    let events = ndjson(&r.body);
    // The backup finished while the receiver had not answered anything.
    assert!(hook.bodies.lock().expect("lock").is_empty());
    let ops: Vec<_> = events
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("").to_string())
        .collect();
    let completed = ops
        .iter()
        .position(|o| o == "backup_completed")
        .expect("completed");
    let drop = events.last().expect("last");
    assert_eq!(drop["op"], "sink_dropped", "{ops:?}");
    assert_eq!(drop["severity_name"], "warning");
    // Named by host and port only: a hook's path may hold its secret.
    let label = hook.url.trim_end_matches("/hook");
    assert_eq!(drop["body"]["sink"], label);
    assert!(!drop.to_string().contains("/hook"));
    let n = drop["body"]["dropped"].as_u64().expect("count");
    assert!(n >= 1 && completed + 1 == ops.len() - 1, "{ops:?}");
    // The counter is exported.
    let m = s.admin().get("/metrics").text();
    let line = m
        .lines()
        .find(|l| l.starts_with("pg_hardstorage_sink_dropped_total{"))
        .expect("sink_dropped metric");
    let exported: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(exported >= n, "{line}");
    hook.stalled.store(false, Ordering::SeqCst);
}

/// A client that goes away mid-stream does not leave half a backup: the
/// backup runs to its commit, and what is committed verifies.
#[test]
fn a_client_that_disconnects_mid_stream_leaves_a_whole_backup() {
    use std::io::{BufReader, Write};
    let s = TestServer::start_with(Options {
        put_delay: Some(Duration::from_millis(100)),
        ..Default::default()
    });
    s.path_deployment("p", None);
    let mut tcp = std::net::TcpStream::connect(s.addr).expect("connect");
    write!(
        tcp,
        "POST /v1/deployments/p/backups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n\r\n",
        s.admin
    )
    .expect("send");
    let mut r = BufReader::new(tcp.try_clone().expect("clone"));
    read_until(&mut r, "backup_started");
    drop(r);
    tcp.shutdown(std::net::Shutdown::Both).expect("shutdown");
    drop(tcp);
    // The backup still commits; the listing shows it once it has.
    let t0 = Instant::now();
    let id = loop {
        let list = crate::body_of(&s.admin().get("/v1/deployments/p/backups"), "backups.list");
        if let Some(id) = list[0]["backup_id"].as_str() {
            break id.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the backup never committed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = s.admin().request(
        "POST",
        &format!("/v1/deployments/p/backups/{id}/verify"),
        &[("Accept", "application/json")],
        None,
    );
    crate::body_of(&r.expect("verify"), "backups.verify");
}

/// What one caller may ask of the server is bounded: a backup gets at most
/// one worker per core, and past `max_operations` running operations a new
/// one is refused at once (503 `api.busy`, `Retry-After`) instead of piling
/// up; once the running one ends, the next is accepted.
#[test]
fn operations_are_bounded_in_number_and_in_workers() {
    use std::io::{BufReader, Write};
    let s = TestServer::start_with(Options {
        put_delay: Some(Duration::from_millis(100)),
        max_operations: 1,
        ..Default::default()
    });
    s.path_deployment("p", None);
    let mut tcp = std::net::TcpStream::connect(s.addr).expect("connect");
    write!(
        tcp,
        "POST /v1/deployments/p/backups HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 15\r\n\r\n{{\"workers\":256}}",
        s.admin
    )
    .expect("send");
    let mut r = BufReader::new(tcp.try_clone().expect("clone"));
    let line = read_until(&mut r, "backup_started");
    let started: serde_json::Value = serde_json::from_str(line.trim()).expect("event");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    assert!(
        started["body"]["workers"]
            .as_u64()
            .is_some_and(|w| w <= cores),
        "{started}"
    );
    let busy = s.admin().post("/v1/deployments/p/backups", "");
    crate::error_of(&busy, 503, "api.busy");
    assert_eq!(busy.header("retry-after"), Some("5"));
    // The running backup ends; then a new operation is accepted.
    read_until(&mut r, "backup_completed");
    drop(tcp);
    let t0 = Instant::now();
    loop {
        let r = s.admin().request(
            "POST",
            "/v1/deployments/p/backups",
            &[("accept", "application/json")],
            Some(b""),
        );
        match r.expect("answer").status {
            200 => break,
            503 => assert!(
                t0.elapsed() < Duration::from_secs(60),
                "never accepted again"
            ),
            other => panic!("status {other}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads NDJSON lines until one contains `op`; returns it.
fn read_until(r: &mut impl std::io::BufRead, op: &str) -> String {
    let mut line = String::new();
    while !line.contains(op) {
        line.clear();
        assert!(
            r.read_line(&mut line).expect("read") > 0,
            "stream ended before {op}"
        );
    }
    line
}

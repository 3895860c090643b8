//! Load: 200 concurrent clients (kept-alive connections, as dashboards
//! poll) listing backups while a backup runs. No request may fail. The
//! backup's throughput under load is compared with backups run alone,
//! alternating, in the same process; the medians' ratio is printed, not
//! asserted (a timing on a shared machine is a measurement, not a test).

use crate::{body_of, ndjson, TestServer};
use pg_hardstorage_testkit::http::KeepAlive;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

const CLIENTS: usize = 200;
const ROUNDS: usize = 3;

/// A deployment over `mib` MiB of incompressible data.
fn tree(s: &TestServer, name: &str, mib: usize, seed: u64) {
    let src = s.path_deployment(name, None);
    let mut rng = pg_hardstorage_testkit::tree::Rng::new(seed);
    for i in 0..(mib / 8) {
        std::fs::write(src.join(format!("big{i}")), rng.bytes(8 << 20)).expect("write");
    }
}

/// Runs a backup over the API; returns its throughput in MB/s.
fn backup_rate(s: &TestServer, d: &str) -> f64 {
    let r = s
        .admin()
        .post(&format!("/v1/deployments/{d}/backups"), "{}");
    let ev = ndjson(&r.body);
    let done = ev.last().expect("events");
    assert_eq!(done["op"], "backup_completed", "{}", r.text());
    let bytes = done["body"]["bytes_logical"].as_f64().expect("bytes");
    let secs = done["body"]["duration_seconds"]
        .as_f64()
        .expect("secs")
        .max(0.01);
    bytes / secs / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[test]
fn two_hundred_concurrent_listings_during_a_backup() {
    let s = TestServer::start();
    for i in 0..2 * ROUNDS {
        tree(&s, &format!("d{i}"), 128, 2 * i as u64 + 1);
    }
    let active = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = s.token("dashboard", &["backup:read"], None);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = KeepAlive::new(&s.client().with_token(&reader));
            let (active, stop, ok, failed) =
                (active.clone(), stop.clone(), ok.clone(), failed.clone());
            let path = format!("/v1/deployments/d{}/backups", i % (2 * ROUNDS));
            std::thread::spawn(move || {
                // The clients stand in for dashboards on other machines: on
                // this small box they would otherwise take the cores from
                // the server itself, which no remote client can.
                pg_hardstorage_apiserver::idle_priority();
                while !stop.load(Ordering::Relaxed) {
                    if !active.load(Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        continue;
                    }
                    match c.get(&path) {
                        Ok(r) if r.status == 200 => {
                            body_of(&r, "backups.list");
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    let (mut alone, mut loaded, mut during) = (Vec::new(), Vec::new(), 0);
    for round in 0..ROUNDS {
        alone.push(backup_rate(&s, &format!("d{}", 2 * round)));
        active.store(true, Ordering::Relaxed);
        let start = ok.load(Ordering::Relaxed);
        while ok.load(Ordering::Relaxed) < start + CLIENTS as u64 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let before = ok.load(Ordering::Relaxed);
        loaded.push(backup_rate(&s, &format!("d{}", 2 * round + 1)));
        during += ok.load(Ordering::Relaxed) - before;
        active.store(false, Ordering::Relaxed);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("client");
    }
    let (a, l) = (median(alone.clone()), median(loaded.clone()));
    eprintln!(
        "load: backup alone {alone:.0?} MB/s (median {a:.0}), with {CLIENTS} clients listing \
         {loaded:.0?} MB/s (median {l:.0}); ratio of medians {:.2}; {during} listings answered \
         during the loaded backups, {} failed",
        l / a,
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed under load"
    );
    assert!(during > 0, "no listing was answered while a backup ran");
}

//! `/metrics` in the Prometheus text exposition format: the engine's
//! per-stage and per-edge counters (live pipelines plus finished ones),
//! backups by outcome and WAL lag as seen in operations' events, and HTTP
//! requests by route and status.

use pg_hardstorage_engine::event::{Event, FnSink};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Inner {
    http: BTreeMap<(String, String, u16), u64>,
    backups: BTreeMap<&'static str, u64>,
    wal_lag: BTreeMap<String, u64>,
    backpressure_events: u64,
    sink_dropped: u64,
    connections_refused: u64,
    /// Requests refused: `[unauthenticated, denied]`.
    auth_refused: [u64; 2],
}

/// The method label of a request: one of HTTP's methods, or `OTHER` (each
/// distinct string a client sends must not become a series of its own).
fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("OTHER")
}

#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
    webhooks: Vec<crate::webhook::Webhook>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn new(webhooks: Vec<crate::webhook::Webhook>) -> Self {
        Metrics {
            inner: Default::default(),
            webhooks,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn http_request(&self, route: &str, method: &str, status: u16) {
        self.with(|m| {
            *m.http
                .entry((route.to_string(), method_label(method).to_string(), status))
                .or_default() += 1
        });
    }

    /// A request refused for want of credentials (401) or of a verb (403).
    pub fn auth_refused(&self, denied: bool) {
        self.with(|m| m.auth_refused[usize::from(denied)] += 1);
    }

    /// A connection over the cap, answered 503 and closed.
    pub fn connection_refused(&self) {
        self.with(|m| m.connections_refused += 1);
    }

    /// A lossy sink counting what operations report.
    pub fn sink(&self) -> FnSink<impl FnMut(&Event) + Send + 'static> {
        let me = self.clone();
        FnSink::new("metrics", true, move |e: &Event| {
            me.with(|m| match e.op.as_str() {
                "backup_completed" => *m.backups.entry("completed").or_default() += 1,
                "backup_failed" => *m.backups.entry("failed").or_default() += 1,
                "chunker_paused" => m.backpressure_events += 1,
                "sink_dropped" => {
                    m.sink_dropped += e
                        .body
                        .as_ref()
                        .and_then(|b| b["dropped"].as_u64())
                        .unwrap_or(0)
                }
                "wal_progress" => {
                    if let Some(b) = &e.body {
                        if let (Some(d), Some(l)) =
                            (b["deployment"].as_str(), b["lag_bytes"].as_u64())
                        {
                            m.wal_lag.insert(d.to_string(), l);
                        }
                    }
                }
                _ => {}
            })
        })
    }

    pub fn render(&self) -> String {
        let p = pg_hardstorage_engine::metrics::process_metrics();
        let mut s = String::new();
        let family = |s: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut s,
            "pg_hardstorage_pipelines_running",
            "gauge",
            "Pipelines running now.",
        );
        let _ = writeln!(
            s,
            "pg_hardstorage_pipelines_running {}",
            p.pipelines_running
        );
        family(
            &mut s,
            "pg_hardstorage_stage_busy_seconds_total",
            "counter",
            "Time each stage spent working, summed over its threads.",
        );
        for st in &p.stages {
            let _ = writeln!(
                s,
                "pg_hardstorage_stage_busy_seconds_total{{stage=\"{}\"}} {}",
                esc(st.stage),
                st.busy_seconds
            );
        }
        family(
            &mut s,
            "pg_hardstorage_stage_bytes_total",
            "counter",
            "Bytes each stage consumed.",
        );
        for st in &p.stages {
            let _ = writeln!(
                s,
                "pg_hardstorage_stage_bytes_total{{stage=\"{}\"}} {}",
                esc(st.stage),
                st.bytes_in
            );
        }
        family(
            &mut s,
            "pg_hardstorage_stage_items_total",
            "counter",
            "Items (blocks or chunks) each stage processed.",
        );
        for st in &p.stages {
            let _ = writeln!(
                s,
                "pg_hardstorage_stage_items_total{{stage=\"{}\"}} {}",
                esc(st.stage),
                st.items
            );
        }
        family(
            &mut s,
            "pg_hardstorage_edge_depth_bytes",
            "gauge",
            "Bytes queued on each edge kind now.",
        );
        for e in &p.edges {
            let _ = writeln!(
                s,
                "pg_hardstorage_edge_depth_bytes{{edge=\"{}\"}} {}",
                esc(&e.edge),
                e.depth_bytes
            );
        }
        family(
            &mut s,
            "pg_hardstorage_edge_backpressure_pauses_total",
            "counter",
            "Backpressure episodes on each edge kind.",
        );
        for e in &p.edges {
            let _ = writeln!(
                s,
                "pg_hardstorage_edge_backpressure_pauses_total{{edge=\"{}\"}} {}",
                esc(&e.edge),
                e.backpressure_pauses
            );
        }
        family(
            &mut s,
            "pg_hardstorage_edge_wait_seconds_total",
            "counter",
            "Time senders waited on each edge kind.",
        );
        for e in &p.edges {
            let _ = writeln!(
                s,
                "pg_hardstorage_edge_wait_seconds_total{{edge=\"{}\"}} {}",
                esc(&e.edge),
                e.wait_seconds
            );
        }
        self.with(|m| {
            family(&mut s, "pg_hardstorage_backpressure_events_total", "counter", "chunker_paused events seen by this server.");
            let _ = writeln!(s, "pg_hardstorage_backpressure_events_total {}", m.backpressure_events);
            family(&mut s, "pg_hardstorage_backups_total", "counter", "Backups run by this server, by outcome.");
            for o in ["completed", "failed"] {
                let _ = writeln!(s, "pg_hardstorage_backups_total{{outcome=\"{o}\"}} {}", m.backups.get(o).copied().unwrap_or(0));
            }
            family(&mut s, "pg_hardstorage_wal_lag_bytes", "gauge", "WAL written by the server but not yet archived, per deployment streamed by this process.");
            for (d, l) in &m.wal_lag {
                let _ = writeln!(s, "pg_hardstorage_wal_lag_bytes{{deployment=\"{}\"}} {l}", esc(d));
            }
            family(&mut s, "pg_hardstorage_sink_dropped_total", "counter", "Events a webhook dropped rather than slow an operation (queue full or undeliverable).");
            for w in &self.webhooks {
                let _ = writeln!(s, "pg_hardstorage_sink_dropped_total{{sink=\"{}\"}} {}", esc(&w.target.label()), w.dropped.load(std::sync::atomic::Ordering::Relaxed));
            }
            family(&mut s, "pg_hardstorage_sink_delivered_total", "counter", "Events a webhook delivered.");
            for w in &self.webhooks {
                let _ = writeln!(s, "pg_hardstorage_sink_delivered_total{{sink=\"{}\"}} {}", esc(&w.target.label()), w.delivered.load(std::sync::atomic::Ordering::Relaxed));
            }
            family(&mut s, "pg_hardstorage_sink_dropped_events_total", "counter", "sink_dropped warnings' counts, as operations reported them.");
            let _ = writeln!(s, "pg_hardstorage_sink_dropped_events_total {}", m.sink_dropped);
            family(&mut s, "pg_hardstorage_auth_refused_total", "counter", "Requests refused: without valid credentials (unauthenticated) or without the verb or scope (denied).");
            for (i, reason) in ["unauthenticated", "denied"].into_iter().enumerate() {
                let _ = writeln!(s, "pg_hardstorage_auth_refused_total{{reason=\"{reason}\"}} {}", m.auth_refused[i]);
            }
            family(&mut s, "pg_hardstorage_connections_refused_total", "counter", "Connections over serve --max-connections, answered 503 and closed.");
            let _ = writeln!(s, "pg_hardstorage_connections_refused_total {}", m.connections_refused);
            family(&mut s, "pg_hardstorage_http_requests_total", "counter", "HTTP requests by route, method and status.");
            for ((route, method, status), n) in &m.http {
                let _ = writeln!(
                    s,
                    "pg_hardstorage_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {n}",
                    esc(route),
                    esc(method)
                );
            }
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        let m = Metrics::new(Vec::new());
        for i in 0..100 {
            m.http_request("/v1/healthz", &format!("X{i}"), 405);
        }
        m.http_request("/v1/healthz", "GET", 200);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("pg_hardstorage_http_requests_total{"))
            .collect::<Vec<_>>();
        assert_eq!(series.len(), 2, "{series:?}");
        assert!(
            text.contains("method=\"OTHER\",status=\"405\"} 100"),
            "{text}"
        );
    }
}

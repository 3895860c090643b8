//! Typed events and the bus that fans them out to every sink concurrently.
//!
//! The shape is the contract's NDJSON Event: `schema`, `severity_name`, `op`,
//! `subject`, `body` (plus `time`, a field the contract allows us to add).
//! Each sink runs on its own thread behind its own bounded queue, so a slow
//! sink never delays another one; a sink chooses whether a full queue blocks
//! the publisher (NDJSON to a pipe, the test recorder) or drops and counts.

use crate::Problem;
use crossbeam_channel::{bounded, Sender, TrySendError};
use serde::Serialize;
use serde_json::{Map, Value};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub const SCHEMA: &str = "pg_hardstorage.v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Debug,
    Info,
    Notice,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub schema: &'static str,
    pub severity_name: Severity,
    pub op: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    pub time: String,
}

impl Event {
    pub fn new(severity: Severity, op: impl Into<String>) -> Self {
        Event {
            schema: SCHEMA,
            severity_name: severity,
            op: op.into(),
            subject: None,
            body: None,
            error: None,
            time: now_rfc3339(),
        }
    }

    pub fn subject(mut self, subject: Map<String, Value>) -> Self {
        self.subject = Some(subject);
        self
    }

    pub fn body(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    /// The final error frame of a failed stream.
    pub fn failure(op: impl Into<String>, problem: &Problem) -> Self {
        let mut e = Event::new(Severity::Error, op);
        e.error = Some(problem.to_json());
        if !problem.subject.is_empty() {
            e.subject = Some(problem.subject.clone());
        }
        e
    }

    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// The contract's success envelope, shared by the CLI (`-o json`) and the API.
pub fn envelope(command: &str, body: Value) -> Value {
    serde_json::json!({
        "schema": SCHEMA,
        "command": command,
        "generated_at": now_rfc3339(),
        "result": {"body": body},
    })
}

/// The contract's error envelope.
pub fn error_envelope(p: &Problem) -> Value {
    serde_json::json!({"schema": SCHEMA, "error": p.to_json()})
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A destination for events. Runs on its own thread.
pub trait EventSink: Send + 'static {
    fn name(&self) -> &'static str;
    fn handle(&mut self, event: &Event);
    fn flush(&mut self) {}
    /// `true`: a full queue drops the event (counted) instead of blocking.
    fn lossy(&self) -> bool {
        false
    }
}

struct SinkHandle {
    tx: Sender<Arc<Event>>,
    lossy: bool,
    dropped: Arc<AtomicU64>,
    name: &'static str,
    /// Events queued to it, and events it has handled.
    sent: Arc<AtomicU64>,
    handled: Arc<AtomicU64>,
}

/// Fans each published event out to every sink, concurrently.
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<BusInner>,
}

#[derive(Default)]
struct BusInner {
    sinks: Mutex<Vec<SinkHandle>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

const SINK_QUEUE: usize = 4096;

impl EventBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_sink(&self, mut sink: impl EventSink) {
        let (tx, rx) = bounded::<Arc<Event>>(SINK_QUEUE);
        let handled = Arc::new(AtomicU64::new(0));
        let handle = SinkHandle {
            tx,
            lossy: sink.lossy(),
            dropped: Arc::new(AtomicU64::new(0)),
            name: sink.name(),
            sent: Arc::new(AtomicU64::new(0)),
            handled: handled.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("sink-{}", sink.name()))
            .spawn(move || {
                for event in rx.iter() {
                    sink.handle(&event);
                    handled.fetch_add(1, Ordering::Release);
                }
                sink.flush();
            });
        if let Ok(thread) = thread {
            lock(&self.inner.sinks).push(handle);
            lock(&self.inner.threads).push(thread);
        }
    }

    pub fn publish(&self, event: Event) {
        let event = Arc::new(event);
        for sink in lock(&self.inner.sinks).iter() {
            let sent = if sink.lossy {
                match sink.tx.try_send(event.clone()) {
                    Err(TrySendError::Full(_)) => {
                        sink.dropped.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    r => r.is_ok(),
                }
            } else {
                sink.tx.send(event.clone()).is_ok()
            };
            if sent {
                sink.sent.fetch_add(1, Ordering::Release);
            }
        }
    }

    /// Events dropped by lossy sinks, by sink name.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        lock(&self.inner.sinks)
            .iter()
            .map(|s| (s.name, s.dropped.load(Ordering::Relaxed)))
            .collect()
    }

    /// Waits (up to `timeout`) until every sink named `name` has handled
    /// all that was published to it so far; whether they all did. Each sink
    /// runs on its own thread, so what it counted lags the publisher.
    pub fn settle(&self, name: &str, timeout: std::time::Duration) -> bool {
        let counters: Vec<_> = lock(&self.inner.sinks)
            .iter()
            .filter(|s| s.name == name)
            .map(|s| (s.sent.clone(), s.handled.clone()))
            .collect();
        let t0 = std::time::Instant::now();
        loop {
            let behind = counters
                .iter()
                .any(|(s, h)| h.load(Ordering::Acquire) < s.load(Ordering::Acquire));
            if !behind {
                return true;
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Closes every sink queue and waits until each sink has drained.
    pub fn close(&self) {
        lock(&self.inner.sinks).clear();
        let threads: Vec<_> = lock(&self.inner.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Writes one JSON event per line.
pub struct NdjsonSink<W: Write + Send + 'static> {
    out: W,
}

impl<W: Write + Send + 'static> NdjsonSink<W> {
    pub fn new(out: W) -> Self {
        NdjsonSink { out }
    }
}

impl<W: Write + Send + 'static> EventSink for NdjsonSink<W> {
    fn name(&self) -> &'static str {
        "ndjson"
    }
    fn handle(&mut self, event: &Event) {
        // A final error frame ends the stream without a trailing newline.
        let line = event.to_line();
        let _ = if event.severity_name == Severity::Error && event.error.is_some() {
            self.out.write_all(line.as_bytes())
        } else {
            writeln!(self.out, "{line}")
        };
        let _ = self.out.flush();
    }
    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

/// Keeps every event in memory; tests assert on it.
#[derive(Clone, Default)]
pub struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn events(&self) -> Vec<Event> {
        lock(&self.events).clone()
    }
    pub fn ops(&self) -> Vec<String> {
        lock(&self.events).iter().map(|e| e.op.clone()).collect()
    }
}

impl EventSink for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn handle(&mut self, event: &Event) {
        lock(&self.events).push(event.clone());
    }
}

/// Calls a closure for each event (progress bars, webhooks).
pub struct FnSink<F: FnMut(&Event) + Send + 'static> {
    name: &'static str,
    f: F,
    lossy: bool,
}

impl<F: FnMut(&Event) + Send + 'static> FnSink<F> {
    pub fn new(name: &'static str, lossy: bool, f: F) -> Self {
        FnSink { name, f, lossy }
    }
}

impl<F: FnMut(&Event) + Send + 'static> EventSink for FnSink<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn handle(&mut self, event: &Event) {
        (self.f)(event)
    }
    fn lossy(&self) -> bool {
        self.lossy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sink_sees_every_event_in_order() {
        let bus = EventBus::new();
        let a = Recorder::new();
        let b = Recorder::new();
        bus.add_sink(a.clone());
        bus.add_sink(b.clone());
        for i in 0..100 {
            bus.publish(Event::new(Severity::Info, format!("e{i}")));
        }
        bus.close();
        assert_eq!(a.ops().len(), 100);
        assert_eq!(a.ops(), b.ops());
        assert_eq!(a.ops()[99], "e99");
    }

    #[test]
    fn settle_waits_until_a_slow_sink_has_handled_everything() {
        struct Slow(Arc<AtomicU64>);
        impl EventSink for Slow {
            fn name(&self) -> &'static str {
                "slow"
            }
            fn handle(&mut self, _: &Event) {
                std::thread::sleep(std::time::Duration::from_millis(5));
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let bus = EventBus::new();
        let seen = Arc::new(AtomicU64::new(0));
        bus.add_sink(Slow(seen.clone()));
        for i in 0..20 {
            bus.publish(Event::new(Severity::Info, format!("e{i}")));
        }
        assert!(bus.settle("slow", std::time::Duration::from_secs(10)));
        assert_eq!(seen.load(Ordering::SeqCst), 20, "settled before handling");
        assert!(bus.settle("absent", std::time::Duration::ZERO));
        bus.close();
    }

    #[test]
    fn event_serialises_to_contract_shape() {
        let e = Event::new(Severity::Warning, "chunker_paused")
            .body(serde_json::json!({"reason":"backpressure","stage":"storage_put"}));
        let v: Value = serde_json::from_str(&e.to_line()).expect("json");
        assert_eq!(v["schema"], "pg_hardstorage.v1");
        assert_eq!(v["severity_name"], "warning");
        assert_eq!(v["body"]["stage"], "storage_put");
        assert!(v.get("subject").is_none());
    }
}

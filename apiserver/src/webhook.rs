//! Webhook event sinks: every event of an operation is POSTed, in batches
//! of NDJSON lines, to each configured URL, with retries.
//!
//! A webhook never slows a backup: each configured webhook has one bounded
//! queue and one delivery thread for the whole process. An operation's sink
//! only `try_send`s into that queue; when it is full (the receiver is slow
//! or stalled) the event is dropped and counted, and the operation reports a
//! `sink_dropped` warning in its own stream.

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use pg_hardstorage_engine::event::{Event, EventSink};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Events sent per POST at most.
const BATCH: usize = 64;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(2);

/// A parsed `http://host:port/path` target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    host: String,
    port: u16,
    path: String,
}

impl Target {
    /// How the webhook is named in metrics and events: scheme, host and
    /// port only (chat and ticketing hooks carry their secret in the path).
    pub fn label(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }
}

pub fn parse(url: &str) -> Result<Target, Problem> {
    let bad = |why: &str| {
        Problem::new(
            Code::UsageInvalidArgument,
            format!("webhook {url:?}: {why}"),
        )
        .suggest(
            "Give an http:// URL, e.g. http://127.0.0.1:9000/hooks/backups",
            None,
        )
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported (put a TLS proxy in front)"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad("bad port"))?),
        None => (hostport, 80),
    };
    if host.is_empty() || path.contains(char::is_whitespace) {
        return Err(bad("bad host or path"));
    }
    Ok(Target {
        url: url.to_string(),
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// One configured webhook: its queue and delivery thread, shared by every
/// operation of the process.
#[derive(Clone)]
pub struct Webhook {
    pub target: Target,
    tx: Sender<String>,
    /// Events dropped (queue full, or undeliverable after retries).
    pub dropped: Arc<AtomicU64>,
    pub delivered: Arc<AtomicU64>,
    /// Events queued and not yet delivered or dropped.
    pending: Arc<AtomicU64>,
}

impl Webhook {
    pub fn start(target: Target, queue: usize) -> Webhook {
        let (tx, rx) = bounded::<String>(queue.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let delivered = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        let (t, d, ok, pe) = (
            target.clone(),
            dropped.clone(),
            delivered.clone(),
            pending.clone(),
        );
        let _ = std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver(&t, &rx, &d, &ok, &pe));
        Webhook {
            target,
            tx,
            dropped,
            delivered,
            pending,
        }
    }

    /// Waits until every queued event was delivered (or dropped), at most
    /// `timeout`; returns whether all were. A short-lived process (the
    /// CLI) calls it before exiting.
    pub fn drain(&self, timeout: std::time::Duration) -> bool {
        let t0 = std::time::Instant::now();
        while self.pending.load(Ordering::SeqCst) > 0 {
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// A sink for one operation's bus.
    pub fn sink(&self) -> WebhookSink {
        WebhookSink {
            hook: self.clone(),
            dropped_here: Arc::new(AtomicU64::new(0)),
        }
    }
}

pub fn parse_all(urls: &[String], queue: usize) -> Result<Vec<Webhook>, Problem> {
    urls.iter()
        .map(|u| parse(u).map(|t| Webhook::start(t, queue)))
        .collect()
}

pub struct WebhookSink {
    hook: Webhook,
    /// What this operation lost, for its `sink_dropped` warning.
    pub dropped_here: Arc<AtomicU64>,
}

impl EventSink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }
    fn handle(&mut self, event: &Event) {
        self.hook.pending.fetch_add(1, Ordering::SeqCst);
        match self.hook.tx.try_send(event.to_line()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.hook.pending.fetch_sub(1, Ordering::SeqCst);
                self.hook.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_here.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn deliver(
    t: &Target,
    rx: &Receiver<String>,
    dropped: &AtomicU64,
    delivered: &AtomicU64,
    pending: &AtomicU64,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let mut body = batch.join("\n");
        body.push('\n');
        let mut sent = false;
        for attempt in 0..ATTEMPTS {
            if post(t, body.as_bytes()).is_ok() {
                sent = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100 << attempt));
        }
        let n = batch.len() as u64;
        if sent {
            delivered.fetch_add(n, Ordering::Relaxed);
        } else {
            dropped.fetch_add(n, Ordering::Relaxed);
        }
        pending.fetch_sub(n, Ordering::SeqCst);
    }
}

/// One HTTP/1.1 POST; success is any 2xx status.
fn post(t: &Target, body: &[u8]) -> std::io::Result<()> {
    let addr = (t.host.as_str(), t.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/x-ndjson\r\n\
         Content-Length: {}\r\nConnection: close\r\nUser-Agent: pg_hardstorage\r\n\r\n",
        t.path,
        t.host,
        t.port,
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut status = [0u8; 12];
    s.read_exact(&mut status)?;
    // "HTTP/1.1 2xx"
    if status.starts_with(b"HTTP/1.") && status[9] == b'2' {
        Ok(())
    } else {
        Err(std::io::Error::other("non-2xx status"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_strictly() {
        let t = parse("http://127.0.0.1:9000/hooks/x").expect("ok");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 9000, "/hooks/x")
        );
        assert_eq!(parse("http://h").expect("ok").path, "/");
        for bad in ["https://h/x", "ftp://h", "http://:80/", "http://h:x/"] {
            assert_eq!(
                parse(bad).expect_err(bad).code.as_ref(),
                "usage.invalid_argument"
            );
        }
    }
}

//! Response bodies: a whole buffer, or a stream of NDJSON frames fed from a
//! blocking task through a bounded channel.

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// An `io::Write` for the NDJSON sink: bytes are sent at each flush (one
/// event), and a client that went away only makes the sends no-ops: the
/// operation itself runs to its end, so it never stops half-committed. A
/// client that stays but stops reading is waited for at most
/// [`SLOW_READER`] in all; then the stream is abandoned (no more frames; the
/// missing final frame tells the client) and what it misses is counted in
/// [`StreamState::dropped`], so the operation never waits on it.
pub struct ChannelWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    /// Whether the last byte sent was a newline (a final error frame has none).
    pub state: std::sync::Arc<std::sync::Mutex<StreamState>>,
}

#[derive(Default, Debug, Clone, Copy)]
pub struct StreamState {
    pub wrote: bool,
    pub ended_with_newline: bool,
    /// Time spent waiting for the client to make room.
    pub waited: std::time::Duration,
    /// Given up on: the client stopped reading.
    pub abandoned: bool,
    /// Frames the client missed since.
    pub dropped: u64,
}

/// How long in all (summed over the stream) an operation waits for room
/// in its stream: 256 frames are buffered, so a client that reads waits it
/// no time; one that stops reading costs the operation at most this.
pub const SLOW_READER: std::time::Duration = std::time::Duration::from_secs(5);

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        ChannelWriter {
            tx,
            buf: Vec::new(),
            state: Default::default(),
        }
    }

    /// Sends one frame unless the stream was abandoned, waiting for room
    /// only while the stream's wait budget lasts.
    pub fn send(tx: &mpsc::Sender<Bytes>, state: &std::sync::Mutex<StreamState>, data: Bytes) {
        let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
        let mut data = data;
        loop {
            let mut s = lock();
            if s.abandoned {
                s.dropped += 1;
                return;
            }
            drop(s);
            match tx.try_send(data) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(d)) => data = d,
            }
            let mut s = lock();
            if s.waited >= SLOW_READER {
                (s.abandoned, s.dropped) = (true, s.dropped + 1);
                return;
            }
            s.waited += std::time::Duration::from_millis(5);
            drop(s);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.wrote = true;
            s.ended_with_newline = data.last() == Some(&b'\n');
        }
        Self::send(&self.tx, &self.state, Bytes::from(data));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_client_that_stops_reading_is_abandoned_not_waited_for() {
        let (tx, _rx) = mpsc::channel::<Bytes>(2);
        let mut w = ChannelWriter::new(tx);
        let t0 = std::time::Instant::now();
        for i in 0..100 {
            writeln!(w, "{{\"n\":{i}}}").expect("write");
            w.flush().expect("flush");
        }
        assert!(t0.elapsed() < SLOW_READER * 2, "{:?}", t0.elapsed());
        let s = *w.state.lock().expect("lock");
        assert!(s.abandoned);
        assert_eq!(s.dropped, 98, "two frames fit, the rest are counted");
    }
}

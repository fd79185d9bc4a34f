//! The bounded queue between the dispatcher (and the connection's own replies) and one client
//! connection's socket writer. Bounded twice: by message count (the flume channel) and by queued
//! bytes (`limits.outbound_buffer_bytes`), which is what the slow-consumer rule watches. Pushes
//! never wait: a full queue is reported to the caller, who decides (close the client in
//! realtime/batch, hold back and conflate in throttled/smart).

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

/// A frame on its way to one client.
pub type Frame = Utf8Bytes;

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Over the byte or message bound: the client is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

#[derive(Debug)]
struct Shared {
    queued_bytes: AtomicUsize,
    byte_limit: usize,
    /// Close code the connection must use when `kill` fires (0: none yet).
    close_code: AtomicU16,
    kill: CancellationToken,
}

/// The sending side; cheap to clone (dispatcher and the connection's reader both hold one).
#[derive(Debug, Clone)]
pub struct Outbound {
    tx: flume::Sender<Frame>,
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection's writer.
#[derive(Debug)]
pub struct OutboundReceiver {
    rx: flume::Receiver<Frame>,
    shared: Arc<Shared>,
}

/// A new queue holding at most `max_messages` frames and `byte_limit` bytes of data.
#[must_use]
pub fn channel(max_messages: usize, byte_limit: usize) -> (Outbound, OutboundReceiver) {
    let (tx, rx) = flume::bounded(max_messages);
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        byte_limit,
        close_code: AtomicU16::new(0),
        kill: CancellationToken::new(),
    });
    (
        Outbound {
            tx,
            shared: shared.clone(),
        },
        OutboundReceiver { rx, shared },
    )
}

impl Outbound {
    /// Queues a data frame unless that would pass the byte limit.
    ///
    /// # Errors
    /// [`PushError::Full`] over the byte or count bound, [`PushError::Closed`] when the
    /// connection has gone.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        let len = frame.len();
        if self.queued_bytes() + len > self.shared.byte_limit {
            return Err(PushError::Full);
        }
        self.push_control(frame)
    }

    /// Queues a control frame (ack, error, mode switch, snapshot, a critical tick) past the
    /// data byte limit, so a lagging client still hears why things change; but never past
    /// twice the limit, so control traffic cannot grow a queue without bound either.
    ///
    /// # Errors
    /// As [`Outbound::push`].
    pub fn push_control(&self, frame: Frame) -> Result<(), PushError> {
        let len = frame.len();
        if self.queued_bytes() + len > self.shared.byte_limit.saturating_mul(2) {
            return Err(PushError::Full);
        }
        self.shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                Err(match e {
                    flume::TrySendError::Full(_) => PushError::Full,
                    flume::TrySendError::Disconnected(_) => PushError::Closed,
                })
            }
        }
    }

    /// Bytes queued and not yet taken by the writer.
    #[must_use]
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// The byte limit.
    #[must_use]
    pub fn byte_limit(&self) -> usize {
        self.shared.byte_limit
    }

    /// Tells the connection to close with `code` (first caller wins) without waiting.
    pub fn kill(&self, code: u16) {
        let _ =
            self.shared
                .close_code
                .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
        self.shared.kill.cancel();
    }
}

impl OutboundReceiver {
    /// Waits for the next frame.
    pub async fn recv(&self) -> Option<Frame> {
        let frame = self.rx.recv_async().await.ok()?;
        self.taken(&frame);
        Some(frame)
    }

    /// Takes a frame if one is queued.
    #[must_use]
    pub fn try_recv(&self) -> Option<Frame> {
        let frame = self.rx.try_recv().ok()?;
        self.taken(&frame);
        Some(frame)
    }

    fn taken(&self, frame: &Frame) {
        self.shared
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::AcqRel);
    }

    /// Resolves when someone called [`Outbound::kill`].
    pub async fn killed(&self) -> u16 {
        self.shared.kill.cancelled().await;
        self.shared.close_code.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_limit_and_accounting() {
        let (tx, rx) = channel(100, 10);
        tx.push(Frame::from("12345")).unwrap();
        tx.push(Frame::from("12345")).unwrap();
        assert_eq!(tx.push(Frame::from("1")), Err(PushError::Full));
        tx.push_control(Frame::from("ack")).unwrap();
        assert_eq!(tx.queued_bytes(), 13);
        assert_eq!(rx.try_recv().unwrap().as_str(), "12345");
        assert_eq!(tx.queued_bytes(), 8);
        drop(rx);
        assert_eq!(tx.push(Frame::from("1")), Err(PushError::Closed));
    }

    #[test]
    fn control_frames_may_pass_the_limit_only_up_to_twice_it() {
        let (tx, _rx) = channel(100, 10);
        tx.push(Frame::from("1234567890")).unwrap();
        tx.push_control(Frame::from("123456789")).unwrap();
        assert_eq!(tx.push_control(Frame::from("12")), Err(PushError::Full));
    }

    #[test]
    fn message_count_bound() {
        let (tx, _rx) = channel(1, 1000);
        tx.push(Frame::from("a")).unwrap();
        assert_eq!(tx.push_control(Frame::from("b")), Err(PushError::Full));
        assert_eq!(tx.queued_bytes(), 1);
    }

    #[tokio::test]
    async fn kill_keeps_the_first_code() {
        let (tx, rx) = channel(1, 1000);
        tx.kill(4008);
        tx.kill(1001);
        assert_eq!(rx.killed().await, 4008);
        assert!(tx.shared.kill.is_cancelled());
    }
}

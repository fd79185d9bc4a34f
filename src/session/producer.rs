//! One `/ingest` producer connection, on tickfan's own WebSocket transport
//! ([`WsSocket`], the same framing and close behaviour as `/ws`). Frames are ingested as they arrive (so a
//! producer can pipeline) and their reports wait in order; each frame's ack goes out, in frame
//! order, once that frame's accepted ticks have settled (stored, or dispatched without a
//! store). At most `PIPELINE_FRAMES` acks may be outstanding and a new ack is only taken once
//! the socket took the previous ones, so a producer that outruns the server (or does not read
//! its acks) stops being read and feels TCP backpressure. Refused ticks get a `backpressure`
//! error right after the frame's ack, and the connection is not read again until the queue
//! has room (or `retry_after_ms` passed): under overload, parsing ticks only to refuse them
//! took the cores the dispatcher needed, and accepted throughput collapsed. A task that
//! ingested a read buffer's worth yields before reading on, so a fast producer cannot keep a
//! worker (and the dispatcher waiting on it) to itself. Frames and reassembled messages are
//! bounded by `limits.max_message_bytes` (1009); every protocol error is answered with its
//! close code (1002, 1007) before the connection ends.
//!
//! One task does both directions (a `select!` over reading, the next settled ack, writing and
//! shutdown): the socket's state (a half-read frame, queued acks and pongs) has one owner.
//! A producer session needs only the ingest stage, a few limits, the shutdown token and its
//! own counters ([`ProducerContext`]), nothing of the `/ws` sessions.
//!
//! A producer authorized by a JWT publishes only the symbols its `ingest_symbols` permit
//! (others are rejected `forbidden`, into the dead-letter list) and is closed with 4001 after
//! a `token_expired` error when the token expires. That expiry is a timer in the connection's
//! own `select!`: producers are few, unlike `/ws` clients, whose expiries the liveness sweep
//! keeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::auth::Grant;
use crate::ingest::{Backpressure, IngestAck, Ingestor};
use crate::protocol::{close, error_message, ErrorCode};
use crate::transport::ws::frame::FrameError;
use crate::transport::ws::{Incoming, PendingUpgrade, ReadError, WsSocket};

/// What every producer connection of a server shares.
pub struct ProducerContext {
    /// Where frames go.
    pub ingestor: Arc<Ingestor>,
    /// `limits.max_message_bytes`: the largest frame or message read.
    pub max_message_bytes: usize,
    /// `server.close_timeout_ms`: how long closing may wait behind queued acks.
    pub close_timeout: Duration,
    /// Cancelled on shutdown: close with 1001 once the acks are out.
    pub shutdown: CancellationToken,
    /// Counters.
    pub stats: ProducerStats,
}

/// Per-server producer counters.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Connections closed for oversized frames or messages (1009).
    pub too_big: AtomicU64,
    /// Connections closed for broken framing or text that is not UTF-8 (1002, 1007).
    pub bad_frames: AtomicU64,
    /// Pings left unanswered because a newer ping replaced a pong not sent yet.
    pub pongs_coalesced: AtomicU64,
    /// Open connections that negotiated permessage-deflate (they may send compressed frames).
    pub deflate_open: AtomicU64,
    /// Connections closed 1009 for a compressed message inflating past the limit (also
    /// counted in `too_big`).
    pub inflate_too_big: AtomicU64,
    /// Reads whose compressed frames passed the per-read inflate budget: the rest waited for
    /// the connection's next turn.
    pub inflate_deferred: AtomicU64,
    /// Connections ended by a TLS error after the upgrade.
    pub tls_errors: AtomicU64,
    /// Connections closed 4001 because their JWT expired.
    pub token_expired: AtomicU64,
    /// Times a producer was not read after a refusal, until the queue had room.
    pub backpressure_pauses: AtomicU64,
}

/// Counts an open connection that negotiated permessage-deflate, for as long as it lives.
struct DeflateOpen<'a>(&'a AtomicU64);

impl<'a> DeflateOpen<'a> {
    fn new(open: &'a AtomicU64) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open)
    }
}

impl Drop for DeflateOpen<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Frames whose acks may be outstanding per producer connection.
pub const PIPELINE_FRAMES: usize = 1_024;
/// Bytes read per call: producers send frames of many ticks.
const READ_BUFFER: usize = 64 * 1024;
/// Settled acks written with one `writev`.
const ACKS_PER_WRITE: usize = 64;

/// How the read side ended.
enum Ending {
    /// The producer sent its close frame (echoed with this code).
    PeerClosed(u16),
    /// We close: a protocol error, a limit, or shutdown.
    Close(u16, &'static str),
    /// EOF: acks still go out (the producer may have shut down only its sending side).
    Eof,
    /// The socket failed: nothing more can be sent.
    Gone,
    /// The producer's token expired: `token_expired`, then close 4001.
    Expired,
}

/// Serves one upgraded producer connection, authorized by `grant`, until it closes.
pub async fn serve(pending: PendingUpgrade, ctx: Arc<ProducerContext>, grant: Grant) {
    let deflate = pending.deflate();
    let Some((stream, early)) = pending.stream().await else {
        return;
    };
    let permitted = grant.ingest_symbols().map(Arc::as_ref);
    let expiry = grant.expires_at_ms().map(|at| {
        let now = u64::try_from(crate::tick::now_ms()).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now))
    });
    let expired = async move {
        match expiry {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let ingestor = &ctx.ingestor;
    let mut socket = WsSocket::new(stream, ctx.max_message_bytes);
    socket.set_read_buffer(READ_BUFFER);
    // Producers' frames may come compressed; acks go out plain (they are small).
    let _deflate_open = deflate.then(|| {
        socket.inflate_compressed();
        DeflateOpen::new(&ctx.stats.deflate_open)
    });
    let mut inbox = Vec::new();
    // A producer may send its first frame right behind the handshake.
    let mut broken = socket.absorb(&early, &mut inbox).err();
    drop(early);
    let shutdown = ctx.shutdown.clone();
    let mut settling = FuturesOrdered::new();
    // Bytes ingested since this task last yielded.
    let mut ingested = 0;
    // Set when a frame had ticks refused: no reads until the queue has room, or until this
    // deadline (set once per pause, so acks going out meanwhile do not extend it).
    let mut paused_until: Option<tokio::time::Instant> = None;
    let ending = loop {
        let mut peer_close = None;
        for msg in inbox.drain(..) {
            let report = match msg {
                // Ingest copies the frame once into simd-json's scratch buffer; no copy here.
                Incoming::Text(text) => {
                    ingested += text.len();
                    ingestor.ingest_text_for(&text, permitted)
                }
                // Binary frames carrying JSON are accepted too: producers often send bytes.
                Incoming::Binary(bytes) => {
                    ingested += bytes.len();
                    ingestor.ingest_frame_for(&bytes, permitted)
                }
                Incoming::Ping(payload) => {
                    if socket.queue_pong(payload) {
                        ctx.stats.pongs_coalesced.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                Incoming::Pong => continue,
                Incoming::Close(code) => {
                    peer_close = Some(code.unwrap_or(close::NORMAL));
                    break;
                }
            };
            if report.queue_full() && paused_until.is_none() {
                paused_until = Some(ingestor.pause_deadline());
            }
            settling.push_back(report.settle());
        }
        if let Some(code) = peer_close {
            break Ending::PeerClosed(code);
        }
        if let Some(e) = broken.take() {
            break read_failure(&ctx, e);
        }
        if ingested >= READ_BUFFER {
            // A read buffer's worth of ticks parsed: let the dispatcher (and other
            // connections) run before reading on.
            ingested = 0;
            tokio::task::yield_now().await;
        }
        // Read only while acks may still be outstanding, pongs are being taken and nothing
        // was refused since the queue last had room.
        let may_read =
            settling.len() < PIPELINE_FRAMES && !socket.read_paused() && paused_until.is_none();
        // A new ack only once the socket took the previous ones.
        let may_ack = !settling.is_empty() && !socket.has_unsent();
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ending::Close(close::GOING_AWAY, "server shutting down"),
            () = &mut expired => {
                ctx.stats.token_expired.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sub = grant.sub(), "producer token expired: closing 4001");
                break Ending::Expired;
            }
            Some(settled) = settling.next(), if may_ack => {
                queue_acks(&mut socket, settled, &mut settling);
                if socket.try_flush().is_err() {
                    break Ending::Gone;
                }
            }
            ready = socket.writable(), if socket.has_unsent() => {
                if ready.is_err() || socket.try_flush().is_err() {
                    break Ending::Gone;
                }
            }
            () = ingestor.wait_room(paused_until.unwrap_or_else(tokio::time::Instant::now)), if paused_until.is_some() => {
                ctx.stats.backpressure_pauses.fetch_add(1, Ordering::Relaxed);
                paused_until = None;
            }
            // Frames read earlier and left over by the inflate budget: decoded without waiting
            // for the socket (other tasks run in between once this one has run long).
            () = tokio::task::coop::consume_budget(), if may_read && socket.has_buffered() => {
                broken = socket.read_some(&mut inbox).err();
                count_deferred(&ctx, &socket);
            }
            ready = socket.readable(), if may_read => {
                broken = match ready {
                    Ok(()) => socket.read_some(&mut inbox).err(),
                    Err(e) => Some(e.into()),
                };
                count_deferred(&ctx, &socket);
            }
        }
    };
    if matches!(ending, Ending::Gone) {
        return;
    }
    // Acks for every frame read before the end go out first, in order.
    let grace = ctx.close_timeout;
    let finish = async {
        while let Some(settled) = settling.next().await {
            queue_acks(&mut socket, settled, &mut settling);
            socket.flush().await?;
        }
        let (code, reason) = match ending {
            Ending::PeerClosed(code) => (code, "bye"),
            Ending::Close(code, reason) => (code, reason),
            Ending::Expired => {
                let msg = "token expired: reconnect with a fresh token";
                socket.queue_text(error_message(None, ErrorCode::TokenExpired, msg, None).into());
                (close::UNAUTHORIZED, "token expired")
            }
            Ending::Eof | Ending::Gone => return socket.flush().await,
        };
        socket.queue_close(code, reason);
        socket.flush().await
    };
    if matches!(tokio::time::timeout(grace, finish).await, Ok(Ok(()))) {
        socket.await_peer_close(Duration::from_secs(2)).await;
    }
}

/// Counts a read that left compressed frames for the next turn (the inflate budget).
fn count_deferred(ctx: &ProducerContext, socket: &WsSocket) {
    if socket.has_buffered() {
        ctx.stats.inflate_deferred.fetch_add(1, Ordering::Relaxed);
    }
}

/// Queues the ack (and backpressure error) of `first`, then of every further report already
/// settled, up to [`ACKS_PER_WRITE`]: a burst of acks goes out in one write.
fn queue_acks<F>(
    socket: &mut WsSocket,
    first: <F as std::future::Future>::Output,
    settling: &mut FuturesOrdered<F>,
) where
    F: std::future::Future<Output = (IngestAck, Option<Backpressure>)>,
{
    let mut next = Some(first);
    let mut queued = 0;
    while let Some((ack, backpressure)) = next.take() {
        if let Ok(text) = serde_json::to_string(&ack) {
            socket.queue_text(text.into());
        }
        if let Some(bp) = backpressure {
            if let Ok(text) = serde_json::to_string(&bp) {
                socket.queue_text(text.into());
            }
        }
        queued += 1;
        if queued < ACKS_PER_WRITE {
            next = settling.next().now_or_never().flatten();
        }
    }
}

/// The close a broken read ends with.
fn read_failure(ctx: &ProducerContext, e: ReadError) -> Ending {
    match e {
        ReadError::Frame(e) => {
            if e == FrameError::InflatedTooBig {
                ctx.stats.inflate_too_big.fetch_add(1, Ordering::Relaxed);
            }
            if e.close_code() == close::TOO_BIG {
                ctx.stats.too_big.fetch_add(1, Ordering::Relaxed);
            } else {
                ctx.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ending::Close(e.close_code(), frame_reason(e))
        }
        ReadError::Eof => Ending::Eof,
        ReadError::Tls(_) => {
            ctx.stats.tls_errors.fetch_add(1, Ordering::Relaxed);
            Ending::Gone
        }
        _ => Ending::Gone,
    }
}

fn frame_reason(e: FrameError) -> &'static str {
    match e {
        FrameError::Protocol(why) => why,
        FrameError::TooBig => "message too big",
        FrameError::InvalidUtf8 => "text is not UTF-8",
        FrameError::InflatedTooBig => "message inflates past max_message_bytes",
    }
}

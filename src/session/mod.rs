//! The session layer: what an upgraded connection does, between the transport below
//! ([`crate::transport`]: sockets, framing, the parking lot) and routing
//! ([`crate::dispatch`], which it sees only through the dispatcher handle, the `Command` enum
//! and each connection's outbound link). The HTTP routes on top upgrade a request and hand the
//! connection here.
//!
//! - this module: one `/ws` client connection, served by a single task (no split halves, no
//!   per-connection channels beyond the outbound link) over a buffer-free [`WsSocket`] to keep
//!   idle connections small. Inbound: messages are read and framed here; text requests go to
//!   [`requests`] (rate limit, parse, `auth`, dispatcher commands), pings are answered here.
//!   Outbound: frames queued by the dispatcher and by this task are written in coalesced
//!   bursts (feed many, flush once). The task closes with the right code when told to (slow
//!   consumer, shutdown, or the liveness sweep's timeouts).
//! - [`liveness`]: one sweep for every connection's heartbeat, idle and auth deadlines, and
//!   the requests to park.
//! - [`parking`]: a connection with nothing to do for `server.park_after_ms` ends its task and
//!   waits in the parking lot as a [`Session`] plus its socket; the first tick, request or
//!   close for it starts a new task from there ([`resume`]).
//! - [`admission`]: the per-address and global caps on open WebSocket connections.
//! - [`producer`]: one `/ingest` producer connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::auth::{AuthError, AuthState, Grant, Verifier};
use crate::config::Config;
use crate::dispatch::outbound::{self, Frame, Outbound, OutboundReceiver, Wake};
use crate::dispatch::registry::ClientKey;
use crate::dispatch::DispatcherHandle;
use crate::protocol::{self, close, error_message, ErrorCode};
use crate::transport::ws::frame::{opcode, FrameError};
use crate::transport::ws::{deflate, Incoming, PendingUpgrade, ReadError, WsSocket};

pub mod admission;
pub mod liveness;
pub mod parking;
pub mod producer;
pub mod requests;

use admission::ConnectionSlot;
use liveness::Connections;
use parking::Parking;
pub use requests::BURST_REFILL_MS;
use requests::{on_request, reply, RequestLimiter};

/// Most bytes written per flush, so one busy client cannot hog its task's turn.
const WRITE_BURST_BYTES: usize = 256 * 1024;
/// Write bursts per wake-up before the connection looks at its socket's input again.
const MAX_BURSTS_PER_TURN: u32 = 8;

/// What every client connection needs from the server.
#[derive(Debug)]
pub struct ClientContext {
    /// Configuration.
    pub config: Arc<Config>,
    /// Commands to the dispatcher.
    pub dispatcher: DispatcherHandle,
    /// Cancelled on shutdown: close with 1001.
    pub shutdown: CancellationToken,
    /// Store epoch for the welcome.
    pub epoch: u64,
    /// Session id source.
    pub sessions: AtomicU64,
    /// Counters.
    pub stats: ClientStats,
    /// Sampled seconds from a tick's receipt (`t_in`) to its socket write.
    pub write_latency: Option<metrics::Histogram>,
    /// Open connections, for the liveness sweep.
    pub connections: Connections,
    /// Where quiet connections wait off the runtime.
    pub parking: Parking,
    /// The token check (`auth` op and refreshes).
    pub verifier: Arc<Verifier>,
}

/// Per-server client counters.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Connections currently open.
    pub open: AtomicU64,
    /// Frames written.
    pub frames_sent: AtomicU64,
    /// Bytes written (payload).
    pub bytes_sent: AtomicU64,
    /// Requests answered `rate_limited`.
    pub rate_limited: AtomicU64,
    /// Requests answered `bad_request` (or another request error).
    pub bad_requests: AtomicU64,
    /// Connections closed for not authenticating.
    pub unauthorized: AtomicU64,
    /// Connections closed for oversized frames.
    pub too_big: AtomicU64,
    /// Connections closed for silence (3 heartbeats).
    pub idle_closed: AtomicU64,
    /// Connections closed for sustained request abuse.
    pub abuse_closed: AtomicU64,
    /// Upgrades refused for their `Origin` (`server.allowed_origins`).
    pub forbidden_origin: AtomicU64,
    /// `POST /api/ticks` bodies refused with 413 (`limits.max_body_bytes`).
    pub body_too_large: AtomicU64,
    /// HTTP requests refused with 401 (missing or wrong token).
    pub http_unauthorized: AtomicU64,
    /// Write bursts, for sampling the write latency.
    pub bursts: AtomicU64,
    /// Connections closed 4008 because a reply to one of their requests found the outbound
    /// link full (the dispatcher counts the slow consumers it closes itself).
    pub reply_overflow: AtomicU64,
    /// Pings left unanswered because a newer ping replaced a pong not sent yet (see
    /// `transport::ws::socket`; `/ingest` counts its own in [`producer::ProducerStats`]).
    pub pongs_coalesced: AtomicU64,
    /// Open connections that negotiated permessage-deflate.
    pub deflate_open: AtomicU64,
    /// Messages compressed: a shared frame once however many clients get it, a frame made
    /// for one connection each time.
    pub deflate_compressions: AtomicU64,
    /// Frames written compressed (RSV1), and their plain and compressed payload bytes.
    pub deflate_frames: AtomicU64,
    /// Plain payload bytes of the frames in `deflate_frames`.
    pub deflate_plain_bytes: AtomicU64,
    /// Compressed payload bytes of the frames in `deflate_frames` (what went on the wire).
    pub deflate_wire_bytes: AtomicU64,
    /// Connections closed 1009 for a compressed message inflating past the limit (also
    /// counted in `too_big`).
    pub inflate_too_big: AtomicU64,
    /// Reads whose compressed frames passed the per-read inflate budget: the rest waited for
    /// the connection's next turn.
    pub inflate_deferred: AtomicU64,
    /// Connections ended by a TLS error after the upgrade (`/ingest` counts its own).
    pub tls_errors: AtomicU64,
    /// Connections closed 4001 because their JWT expired (also counted in `unauthorized`).
    pub token_expired: AtomicU64,
}

/// How a running connection stands with authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// No token yet: the auth deadline is the time to send one.
    Pending,
    /// Authorized for good (a static token, or auth off).
    Authorized,
    /// Authorized by a JWT: the auth deadline is its expiry.
    Expiring,
}

/// The liveness-clock time (ms) at which `grant` expires, if it does.
fn expiry_deadline(ctx: &ClientContext, grant: &Grant) -> Option<u64> {
    let at = grant.expires_at_ms()?;
    let left = at.saturating_sub(crate::tick::now_ms().try_into().unwrap_or(0));
    Some(ctx.connections.clock_ms().saturating_add(left))
}

/// The error message a refused token gets.
fn refusal(id: Option<&serde_json::Value>, e: AuthError) -> String {
    error_message(id, e.code(), &e.to_string(), None)
}

/// Frames made for one connection (replies, snapshots, conflated ticks) are compressed for it
/// only from this size: below it the compressor's per-message cost buys too little. Shared
/// frames (ticks, batch groups' batches) are compressed from `deflate::MIN_COMPRESS_BYTES`,
/// once for all their clients.
const OWN_FRAME_DEFLATE_MIN: usize = 1024;

struct Conn {
    ctx: Arc<ClientContext>,
    out: Outbound,
    /// The dispatcher's key, in 32 bits as the registry keeps it (slab keys are bounded by
    /// the connection cap), so the token's grant below fits without growing an idle session.
    key: Option<u32>,
    auth: Standing,
    /// What the token in force grants: its `sub` is named in logs and must match a refresh's.
    grant: Grant,
    /// permessage-deflate was negotiated: shared frames go out compressed, and the client may
    /// send compressed messages (kept here, as the socket is rebuilt after parking).
    deflate: bool,
    /// The request rate limiter: created with the first request, dropped at parking once it
    /// is full again (see [`requests::BURST_REFILL_MS`]).
    limiter: Option<Box<RequestLimiter>>,
    limited_in_a_row: u32,
}

impl Conn {
    fn key(&self) -> Option<ClientKey> {
        self.key.map(|k| k as ClientKey)
    }

    fn set_key(&mut self, key: ClientKey) {
        debug_assert!(u32::try_from(key).is_ok(), "client key over 32 bits");
        self.key = u32::try_from(key).ok();
    }
}

enum Flow {
    Continue,
    Close(u16, &'static str),
    /// Close after sending this message (written right before the close frame: a reply queued
    /// on the outbound queue would be dropped by the close).
    CloseWith(u16, &'static str, String),
    /// The client sent its close frame (with this code, or 1000).
    PeerClosed(u16),
    /// The peer is gone: no close handshake.
    Gone,
}

/// Everything a running connection is apart from its socket, and all a parked one keeps
/// ([`parking`]). Dropping it ends the connection's presence in the server: its link
/// leaves the sweep, the dispatcher forgets it, its connection slot and shutdown tracking are
/// released. That happens however it ends (closed, failed, or dropped while parked).
pub struct Session {
    conn: Conn,
    rx: OutboundReceiver,
    /// Key in [`ClientContext::connections`].
    link: usize,
    _slot: ConnectionSlot,
    _tracked: TaskTrackerToken,
}

impl Session {
    /// The connection's end of its outbound link.
    #[must_use]
    pub fn receiver(&self) -> &OutboundReceiver {
        &self.rx
    }

    /// The sending side of the connection's link (what the dispatcher and sweep hold).
    #[must_use]
    pub fn outbound(&self) -> &Outbound {
        &self.conn.out
    }

    /// The server's shared client context.
    #[must_use]
    pub fn context(&self) -> &Arc<ClientContext> {
        &self.conn.ctx
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let ctx = &self.conn.ctx;
        // A session may end on a thread outside any runtime (the parking lot's, a waker's, a
        // runtime being dropped); deregistering may need to spawn, which panics there. The
        // server's own runtime is the right context anyway.
        let _context = tokio::runtime::Handle::try_current()
            .is_err()
            .then(|| ctx.parking.runtime().enter());
        ctx.connections.remove(self.link);
        if let Some(key) = self.conn.key() {
            ctx.dispatcher.deregister(key);
        }
        ctx.stats.open.fetch_sub(1, Ordering::Relaxed);
        if self.conn.deflate {
            ctx.stats.deflate_open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Serves one `/ws` connection from its upgrade until it closes or parks. `slot` and
/// `tracked` (the connection's cap slot and its shutdown tracking) are held until it ends.
///
/// The future every running connection holds is this one, so it is kept to `live`'s state
/// plus its arguments: the set-up runs boxed (once per connection, freed when done), and
/// `serve` is a plain function returning an `async move` block (an `async fn` keeps its
/// arguments twice). Written as one `async fn`, rustc kept the moved-from session and socket
/// beside `live`'s copy of them and the release future was 1,152 B.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc above
pub fn serve(
    pending: PendingUpgrade,
    ctx: Arc<ClientContext>,
    auth: AuthState,
    slot: ConnectionSlot,
    tracked: TaskTrackerToken,
) -> impl std::future::Future<Output = ()> {
    async move {
        // Bound by `let .. else`: an `if let` would keep the `Option` beside `live` across
        // the await (another 488 B).
        let Some(live) = Box::pin(prepare(pending, ctx, auth, slot, tracked)).await else {
            return;
        };
        live.await;
    }
}

/// Everything from the upgrade to an established connection: the socket, the session, its
/// link, and the auth set-up. `None`: the connection ended before it was established.
async fn prepare(
    pending: PendingUpgrade,
    ctx: Arc<ClientContext>,
    auth: AuthState,
    slot: ConnectionSlot,
    tracked: TaskTrackerToken,
) -> Option<impl std::future::Future<Output = ()>> {
    let deflate = pending.deflate();
    let (stream, early) = pending.stream().await?;
    ctx.stats.open.fetch_add(1, Ordering::Relaxed);
    let (out, rx) = outbound::channel(
        ctx.config.dispatch.outbound_messages,
        ctx.config.limits.outbound_buffer_bytes,
    );
    if deflate {
        ctx.stats.deflate_open.fetch_add(1, Ordering::Relaxed);
        out.set_deflate();
    }
    let now = ctx.connections.clock_ms();
    rx.heard(now);
    // One deadline on the link, kept by the liveness sweep (no timer per connection): the
    // time to authenticate, or a JWT's expiry.
    let standing = match &auth {
        AuthState::Pending => {
            out.set_auth_deadline(now + ctx.config.auth.auth_timeout_ms);
            Standing::Pending
        }
        AuthState::Authorized(grant) => match expiry_deadline(&ctx, grant) {
            Some(at) => {
                out.set_auth_deadline(at);
                Standing::Expiring
            }
            None => Standing::Authorized,
        },
        AuthState::Rejected(_) => Standing::Pending,
    };
    let grant = match &auth {
        AuthState::Authorized(grant) => grant.clone(),
        AuthState::Pending | AuthState::Rejected(_) => Grant::full(),
    };
    let mut socket = WsSocket::new(stream, ctx.config.limits.max_message_bytes);
    if deflate {
        socket.inflate_compressed();
    }
    let link = ctx.connections.insert(out.clone(), socket.can_park());
    // Shutdown closes the connections in the set; one that joins after that sweep sees the
    // cancelled token instead.
    if ctx.shutdown.is_cancelled() {
        let _ = out.kill(close::GOING_AWAY);
    }
    let mut session = Session {
        conn: Conn {
            ctx: ctx.clone(),
            out,
            key: None,
            auth: standing,
            grant,
            deflate,
            limiter: None,
            limited_in_a_row: 0,
        },
        rx,
        link,
        _slot: slot,
        _tracked: tracked,
    };
    // Messages read but not handled yet, starting with any the client sent right behind the
    // handshake. `early` is a view into hyper's whole read buffer: let it go at once.
    let mut inbox = Vec::new();
    let broken = socket.absorb(&early, &mut inbox).err();
    drop(early);
    // `serve` runs this future boxed, so its size is only held until `live` starts.
    setup(&mut session.conn, &mut socket, auth).await?;
    Some(live(session, socket, inbox, broken))
}

/// Serves a connection taken out of the parking lot, with `unsent` (the rest of a frame
/// written while it was parked) going out first.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc above
pub fn resume(
    session: Session,
    stream: std::net::TcpStream,
    unsent: Option<Bytes>,
) -> impl std::future::Future<Output = ()> {
    // Not an `async fn`, and `live` built in a block that ends before its await, for the
    // same reason as `serve`. The stream is registered when the task first runs, inside the
    // runtime (the lot may call this from its own thread).
    async move {
        let live = {
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                return;
            };
            let mut socket =
                WsSocket::new(stream, session.conn.ctx.config.limits.max_message_bytes);
            if session.conn.deflate {
                socket.inflate_compressed();
            }
            if let Some(bytes) = unsent {
                socket.queue_framed(bytes);
            }
            live(session, socket, Vec::new(), None)
        };
        live.await;
    }
}

/// Runs an established connection until it ends, or parks it when it has had nothing to do.
///
/// A plain function returning an `async move` block rather than an `async fn`: an `async fn`
/// keeps its arguments once as captures and once more as the locals they are moved into,
/// and this future is what every running connection holds.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc above
fn live(
    mut session: Session,
    mut socket: WsSocket,
    inbox: Vec<Incoming>,
    broken: Option<ReadError>,
) -> impl std::future::Future<Output = ()> {
    async move {
        let exit = run(&mut session.conn, &mut socket, &session.rx, inbox, broken).await;
        if exit == Exit::Park {
            match socket.into_std() {
                Ok(stream) => {
                    let ctx = session.conn.ctx.clone();
                    ctx.parking.park(session, stream);
                }
                Err(e) => tracing::debug!(error = %e, "parking failed: connection dropped"),
            }
            return;
        }
        tracing::debug!(peer = ?socket.peer_addr().ok(), "client connection closed");
    }
}

/// What an idle connection waits for: its socket or its link, nothing else.
enum Event {
    Readable,
    Link(Wake),
    SocketFailed,
}

/// Waits for the socket to become readable or the link to wake. Holds only two references,
/// which is what keeps an idle connection's future small. A close order comes first, then
/// reading, then writing: a connection busy with outbound data still reads its client's
/// requests and pongs (which keep it alive), however much data keeps coming. While frames the
/// socket did not take are left over, writing waits for the socket, not for the link.
fn next_event<'a>(
    socket: &'a WsSocket,
    rx: &'a OutboundReceiver,
) -> impl std::future::Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        let link = rx.poll_wake(cx);
        if let Poll::Ready(Wake::Close(code)) = link {
            return Poll::Ready(Event::Link(Wake::Close(code)));
        }
        // A peer that pings without reading the pongs is not read until the socket drains.
        match socket.poll_read_ready(cx) {
            _ if socket.read_paused() => {}
            // Frames read earlier and left over by the inflate budget: no need to wait.
            _ if socket.has_buffered() => return Poll::Ready(Event::Readable),
            Poll::Ready(Ok(())) => return Poll::Ready(Event::Readable),
            Poll::Ready(Err(_)) => return Poll::Ready(Event::SocketFailed),
            Poll::Pending => {}
        }
        if socket.has_unsent() {
            return socket.poll_write_ready(cx).map(|ready| match ready {
                Ok(()) => Event::Link(Wake::Write),
                Err(_) => Event::SocketFailed,
            });
        }
        link.map(Event::Link)
    })
}

/// Who ended the connection, which decides what goes out before the close frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client's own request or a protocol error: replies already queued go first.
    Request,
    /// A close order (slow consumer, shutdown, heartbeat or auth timeout): the backlog is
    /// dropped, the client resumes with `since_seq`.
    Order,
    /// The client sent its close frame: answer it and end, without waiting for more.
    PeerClosed,
}

/// How [`run`] left the connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Closed or gone.
    Ended,
    /// Quiet, with nothing in progress: ready to park.
    Park,
}

async fn run(
    conn: &mut Conn,
    socket: &mut WsSocket,
    rx: &OutboundReceiver,
    mut inbox: Vec<Incoming>,
    mut broken: Option<ReadError>,
) -> Exit {
    // Every await outside the main loop is boxed: an idle connection's future is only as big
    // as what is alive at its largest await.
    let mut notice = None;
    let (code, why, ending) = loop {
        // Requests read before a broken frame are still answered.
        if !inbox.is_empty() {
            rx.heard(conn.ctx.connections.clock_ms());
            match Box::pin(on_messages(conn, socket, rx, &mut inbox)).await {
                Flow::Continue => {}
                Flow::Close(code, why) => break (code, why, Ending::Request),
                Flow::CloseWith(code, why, text) => {
                    notice = Some(text);
                    break (code, why, Ending::Request);
                }
                Flow::PeerClosed(code) => break (code, "bye", Ending::PeerClosed),
                Flow::Gone => return Exit::Ended,
            }
        }
        if let Some(e) = broken.take() {
            match read_failure(&conn.ctx, e) {
                Some((code, why)) => break (code, why, Ending::Request),
                None => return Exit::Ended,
            }
        }
        match next_event(socket, rx).await {
            Event::Readable => {
                if socket.has_buffered() {
                    // Leftovers of a read full of compressed frames: let other tasks run
                    // between two budgets' worth when this one has run long.
                    tokio::task::coop::consume_budget().await;
                }
                broken = socket.read_some(&mut inbox).err();
                if socket.has_buffered() {
                    let stats = &conn.ctx.stats;
                    stats.inflate_deferred.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::SocketFailed => return Exit::Ended,
            Event::Link(Wake::Close(code)) => break (code, close_reason(code), Ending::Order),
            // The sweep saw nothing happen for `server.park_after_ms`. Anything still in
            // progress (a half-read frame, unsent bytes) declines; the sweep asks again.
            Event::Link(Wake::Park) => {
                let now = conn.ctx.connections.clock_ms();
                let refilled = conn.limiter.as_ref().is_none_or(|l| l.is_full(now));
                if inbox.is_empty() && socket.is_quiet() && socket.can_park() && refilled {
                    conn.limiter = None;
                    conn.limited_in_a_row = 0;
                    return Exit::Park;
                }
            }
            Event::Link(Wake::Write) => {
                match Box::pin(write_until_done(socket, rx, &conn.ctx)).await {
                    Written::Done | Written::Readable => {}
                    Written::Failed => return Exit::Ended,
                    Written::Interrupted(code) => {
                        break (code, close_reason(code), Ending::Order);
                    }
                }
            }
        }
    };
    // From here the liveness sweep leaves the connection alone (no heartbeats, no counting).
    let _ = conn.out.kill(code);
    let notice = notice.or_else(|| match code {
        close::SLOW_CONSUMER => Some(error_message(
            None,
            ErrorCode::SlowConsumer,
            "outbound buffer overflow: reconnect and resume with since_seq",
            None,
        )),
        close::UNAUTHORIZED if conn.auth == Standing::Expiring => {
            conn.ctx.stats.token_expired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sub = conn.grant.sub(), "client token expired: closing 4001");
            Some(error_message(
                None,
                ErrorCode::TokenExpired,
                "token expired: refresh it with {\"op\":\"auth\"} before exp",
                None,
            ))
        }
        close::UNAUTHORIZED if conn.auth == Standing::Pending => Some(error_message(
            None,
            ErrorCode::Unauthorized,
            &format!(
                "no token within {} ms (auth.auth_timeout_ms)",
                conn.ctx.config.auth.auth_timeout_ms
            ),
            None,
        )),
        _ => None,
    });
    if ending != Ending::Order {
        // Replies to requests read before the close go out first (up to a burst).
        let stats = &conn.ctx.stats;
        rx.drain(WRITE_BURST_BYTES, |frame| queue_frame(socket, frame, stats));
    }
    Box::pin(close_with(
        socket,
        notice,
        code,
        why,
        close_grace(&conn.ctx),
        ending != Ending::PeerClosed,
    ))
    .await;
    Exit::Ended
}

/// Sends the welcome and registers with the dispatcher (or refuses a wrong token). `None`:
/// the connection is over.
async fn setup(conn: &mut Conn, socket: &mut WsSocket, auth: AuthState) -> Option<()> {
    let ctx = conn.ctx.clone();
    socket.queue_text(welcome(&ctx).into());
    socket.flush().await.ok()?;
    match auth {
        AuthState::Rejected(e) => {
            ctx.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(reason = e.reason(), "client token refused: closing 4001");
            let err = refusal(None, e);
            close_with(
                socket,
                Some(err),
                close::UNAUTHORIZED,
                "unauthorized",
                close_grace(&ctx),
                true,
            )
            .await;
            None
        }
        AuthState::Authorized(grant) => {
            if let Some(sub) = grant.sub() {
                tracing::debug!(sub, "client authenticated");
            }
            let permitted = grant.symbols().cloned();
            drop(grant);
            let key = ctx
                .dispatcher
                .register(conn.out.clone(), permitted)
                .await
                .ok()?;
            conn.set_key(key);
            Some(())
        }
        AuthState::Pending => Some(()),
    }
}

/// The `welcome` message. Built in its own function so none of its parts stay alive in the
/// connection's future (a `json!` value held there cost 1.2 KiB per idle connection).
fn welcome(ctx: &ClientContext) -> String {
    let session = format!(
        "{:x}-{:x}",
        ctx.epoch & 0xffff,
        ctx.sessions.fetch_add(1, Ordering::Relaxed)
    );
    let limits = &ctx.config.limits;
    json!({
        "type": "welcome", "protocol": 1,
        "server": concat!("tickfan/", env!("CARGO_PKG_VERSION")),
        "session": session, "epoch": ctx.epoch, "heartbeat_ms": ctx.config.server.heartbeat_ms,
        "limits": {
            "max_symbols": limits.max_symbols, "ops_per_sec": limits.ops_per_sec,
            "max_message_bytes": limits.max_message_bytes,
            "outbound_buffer_bytes": limits.outbound_buffer_bytes,
            "history_max": protocol::MAX_HISTORY,
        },
    })
    .to_string()
}

/// The close a broken read ends with, or `None` when the peer is simply gone.
fn read_failure(ctx: &ClientContext, e: ReadError) -> Option<(u16, &'static str)> {
    match e {
        ReadError::Frame(FrameError::TooBig) => {
            ctx.stats.too_big.fetch_add(1, Ordering::Relaxed);
            Some((close::TOO_BIG, "message too big"))
        }
        ReadError::Frame(FrameError::InflatedTooBig) => {
            ctx.stats.too_big.fetch_add(1, Ordering::Relaxed);
            ctx.stats.inflate_too_big.fetch_add(1, Ordering::Relaxed);
            Some((close::TOO_BIG, "message inflates past max_message_bytes"))
        }
        ReadError::Frame(FrameError::InvalidUtf8) => {
            ctx.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            Some((close::INVALID_PAYLOAD, "text is not UTF-8"))
        }
        ReadError::Frame(FrameError::Protocol(why)) => {
            ctx.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            Some((close::PROTOCOL_ERROR, why))
        }
        // No close frame: the TLS session is broken, nothing more can be sent on it.
        ReadError::Tls(_) => {
            ctx.stats.tls_errors.fetch_add(1, Ordering::Relaxed);
            None
        }
        _ => None,
    }
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close::SLOW_CONSUMER => "slow consumer",
        close::GOING_AWAY => "server shutting down",
        // Only the liveness sweep closes with these two.
        close::NORMAL => "heartbeat timeout: nothing received for 3 heartbeats",
        close::UNAUTHORIZED => "unauthorized",
        _ => "closed by server",
    }
}

/// How a write burst ended.
enum Written {
    Done,
    /// The socket is full and the client sent something: go read it (what the socket did not
    /// take stays queued in it).
    Readable,
    /// The socket failed: the peer is gone.
    Failed,
    /// The connection was told to close while writing.
    Interrupted(u16),
}

/// Writes what the socket has left over, then what the link holds (a ping if one is due, then
/// queued frames, a burst budget at a time), until the link is empty or a few bursts went out.
/// Stops early when the connection is told to close, or when the socket is full and the client
/// has sent something (so pongs and requests are read even under a backlog).
async fn write_until_done(
    socket: &mut WsSocket,
    rx: &OutboundReceiver,
    ctx: &ClientContext,
) -> Written {
    let stats = &ctx.stats;
    let mut bursts = 0;
    loop {
        if let Some(code) = rx.close_code() {
            return Written::Interrupted(code);
        }
        if rx.take_ping_due() {
            socket.queue(opcode::PING, Bytes::new());
        }
        let mut first = None;
        // Leftovers first: until the socket takes them, the backlog stays in the link, where
        // it counts toward the slow-consumer limit.
        let (frames, bytes) = if socket.has_unsent() {
            (0, 0)
        } else {
            rx.drain(WRITE_BURST_BYTES, |frame| {
                if first.is_none() {
                    first = Some(frame.clone());
                }
                queue_frame(socket, frame, stats);
            })
        };
        stats.frames_sent.fetch_add(frames, Ordering::Relaxed);
        stats.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        // One burst in 64 measures how long its first tick took from receipt to the socket.
        let sample = match (&ctx.write_latency, &first) {
            (Some(h), Some(first))
                if stats
                    .bursts
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(64) =>
            {
                t_in_of(first).map(|t| (h, t))
            }
            _ => None,
        };
        drop(first);
        let flushed = std::future::poll_fn(|cx| match socket.poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Written::Failed)),
            Poll::Pending => {
                if let Poll::Ready(code) = rx.poll_close(cx) {
                    return Poll::Ready(Err(Written::Interrupted(code)));
                }
                match socket.poll_read_ready(cx) {
                    _ if socket.read_paused() => Poll::Pending,
                    _ if socket.has_buffered() => Poll::Ready(Err(Written::Readable)),
                    Poll::Ready(_) => Poll::Ready(Err(Written::Readable)),
                    Poll::Pending => Poll::Pending,
                }
            }
        })
        .await;
        if let Err(outcome) = flushed {
            return outcome;
        }
        if let Some((h, t_in)) = sample {
            #[allow(clippy::cast_precision_loss)]
            h.record((crate::tick::now_us() - t_in).max(0) as f64 / 1e6);
        }
        bursts += 1;
        // Back to the event loop now and then, so reads are not starved by a steady stream.
        // There, polling the socket's readiness spends tokio's cooperative budget, so a link
        // that refills as fast as the socket drains still lets other tasks run.
        if frames == 0 || bursts == MAX_BURSTS_PER_TURN {
            return Written::Done;
        }
    }
}

/// Queues a frame from the link: compressed (RSV1) on a connection that negotiated
/// permessage-deflate when that pays, made once for a shared frame and reused for every
/// client that gets it; otherwise plain.
fn queue_frame(socket: &mut WsSocket, frame: Frame, stats: &ClientStats) {
    if frame.wire().is_some() {
        // A run of ticks already in wire form, shared with other connections (plain ones
        // only: the stage gives a compressing connection each tick's own frame).
        socket.queue_framed(frame.into());
        return;
    }
    if socket.deflate() {
        let shared = frame.is_shared();
        let deflated = frame.deflated(|plain| {
            if !shared && plain.len() < OWN_FRAME_DEFLATE_MIN {
                return None;
            }
            stats.deflate_compressions.fetch_add(1, Ordering::Relaxed);
            deflate::compress(plain)
        });
        if let Some(deflated) = deflated {
            stats.deflate_frames.fetch_add(1, Ordering::Relaxed);
            stats
                .deflate_plain_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
            stats
                .deflate_wire_bytes
                .fetch_add(deflated.len() as u64, Ordering::Relaxed);
            socket.queue_compressed(opcode::TEXT, deflated);
            return;
        }
    }
    socket.queue_text(frame.into());
}

/// How long closing may wait behind data already queued in the socket.
fn close_grace(ctx: &ClientContext) -> Duration {
    Duration::from_millis(ctx.config.server.close_timeout_ms)
}

/// The `t_in` of a live tick or batch frame (snapshots carry old ticks and are skipped).
fn t_in_of(frame: &Frame) -> Option<i64> {
    let text = frame.as_str();
    if !(text.starts_with(r#"{"type":"tick""#) || text.starts_with(r#"{"type":"batch""#)) {
        return None;
    }
    let rest = &text[text.find(r#""t_in":"#)? + 7..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Sends an optional error message and a close frame, then (unless the peer already sent its
/// close, even a malformed one) waits briefly for the peer's close so the TCP connection ends
/// cleanly.
async fn close_with(
    socket: &mut WsSocket,
    notice: Option<String>,
    code: u16,
    reason: &str,
    grace: Duration,
    wait_for_peer: bool,
) {
    if let Some(text) = notice {
        socket.queue_text(text.into());
    }
    socket.queue_close(code, reason);
    if !matches!(
        tokio::time::timeout(grace, socket.flush()).await,
        Ok(Ok(()))
    ) || !wait_for_peer
    {
        return;
    }
    socket.await_peer_close(Duration::from_secs(2)).await;
}

/// Handles the messages in `inbox` in order (emptying it) until one ends the connection.
async fn on_messages(
    conn: &mut Conn,
    socket: &mut WsSocket,
    rx: &OutboundReceiver,
    inbox: &mut Vec<Incoming>,
) -> Flow {
    let ctx = conn.ctx.clone();
    let stats = &ctx.stats;
    let mut flow = Flow::Continue;
    let mut answer_pings = false;
    for msg in inbox.drain(..) {
        flow = match msg {
            Incoming::Text(text) => on_request(conn, &text).await,
            Incoming::Binary(_) => {
                stats.bad_requests.fetch_add(1, Ordering::Relaxed);
                reply(
                    conn,
                    error_message(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text",
                        None,
                    ),
                )
            }
            // Echo the client's code (the parser only lets valid ones through).
            Incoming::Close(code) => Flow::PeerClosed(code.unwrap_or(close::NORMAL)),
            Incoming::Ping(payload) => {
                if socket.queue_pong(payload) {
                    stats.pongs_coalesced.fetch_add(1, Ordering::Relaxed);
                }
                answer_pings = true;
                Flow::Continue
            }
            Incoming::Pong => Flow::Continue,
        };
        if !matches!(flow, Flow::Continue) {
            break;
        }
    }
    // Give the inbox's storage back: idle connections keep none.
    *inbox = Vec::new();
    if answer_pings && matches!(flow, Flow::Continue) {
        flow = match write_until_done(socket, rx, &ctx).await {
            Written::Done | Written::Readable => Flow::Continue,
            Written::Failed => Flow::Gone,
            Written::Interrupted(code) => Flow::Close(code, close_reason(code)),
        };
    }
    flow
}

/// Size budgets an idle connection's memory depends on (docs/benchmarks.md), checked so that a
/// change cannot undo them silently: the task future of a running connection, and what a
/// parked one keeps. (The link's 128 bytes are checked where it is defined.)
#[cfg(test)]
mod budgets {
    use std::future::Future;
    use std::mem::size_of;

    use super::*;

    /// The size of the future an `async fn` taking these arguments returns.
    fn future_size<A, B, C, F: Future>(_: &impl FnOnce(A, B, C) -> F) -> usize {
        size_of::<F>()
    }

    fn future_size5<A, B, C, D, E, F: Future>(_: &impl FnOnce(A, B, C, D, E) -> F) -> usize {
        size_of::<F>()
    }

    /// Budget of the connection futures, in both profiles. Measured 2026-12-06: `serve` 568 B
    /// and `resume` 624 B in release, 576 and 632 B unoptimized (`cargo test`). They were
    /// 1,152 and 1,128 B in release while `serve` and `live` were `async fn`s keeping their
    /// moved-from arguments beside their callees' copies, which this pin (then release-only
    /// at 700 B, while the tests run unoptimized) did not catch. One budget for both
    /// profiles, so `cargo test` catches growth in either.
    const FUTURE_BUDGET: usize = 640;

    /// A connection's task: started from the upgrade (`serve`), or from the parking lot
    /// (`resume`). Idle, it waits inside `run`, so its future is what an idle running
    /// connection costs besides the task header.
    #[test]
    fn connection_futures_stay_within_budget() {
        let serve = future_size5(&serve);
        let resume = future_size(&resume);
        assert!(
            serve <= FUTURE_BUDGET,
            "serve's future is {serve} B (budget {FUTURE_BUDGET})"
        );
        assert!(
            resume <= FUTURE_BUDGET,
            "resume's future is {resume} B (budget {FUTURE_BUDGET})"
        );
    }

    /// A parked connection is its session plus the socket in the lot's slab: 112 B a slot
    /// (docs/benchmarks.md), of which the session is 104.
    #[test]
    fn a_parked_session_stays_within_budget() {
        let session = size_of::<Session>();
        assert!(session <= 104, "a session is {session} B (budget 104)");
        let slot = crate::transport::lot::spot_size::<Session>();
        assert!(slot <= 112, "a parking slot is {slot} B (budget 112)");
    }
}

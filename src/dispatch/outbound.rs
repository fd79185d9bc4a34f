//! The link between one client connection and everyone who writes to it: the dispatcher (ticks,
//! acks, snapshots), the heartbeat sweeper and the connection's own replies. It is the
//! connection's bounded outbound queue, bounded twice: by message count
//! (`dispatch.outbound_messages`) and by queued bytes (`limits.outbound_buffer_bytes`), which is
//! what the slow-consumer rule watches. Pushes never wait: a full queue is reported to the
//! caller, who decides (close the client in realtime/batch, hold back and conflate in
//! throttled/smart).
//!
//! It is also the connection's only wake-up source besides its socket: one waker for "frames to
//! write", "ping due" and "close now", so an idle connection waits on its socket and this link
//! and nothing else (no timer, no channel future). Liveness (last heard, auth deadline) sits
//! here too, for the sweeper to read.
//!
//! Paced replays (see `snapshot`) ask to hear when the queue drains below a low-water mark:
//! one armed mark per link and one entry in the dispatcher's [`Refills`] list when the
//! connection's drain crosses it, so the notification is bounded by the number of links,
//! never one message per drained frame.

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use once_cell::race::OnceBox;
use parking_lot::Mutex;

/// A frame on its way to clients: its text, serialized once and shared (a clone is a
/// reference count) by every connection it goes to. A frame the dispatcher shares (a tick, a
/// batch group's batch) can also carry a slot for its permessage-deflate form, filled by the
/// first connection that negotiated compression and needs it, and shared by all the others:
/// a frame is compressed at most once, however many clients get it compressed.
///
/// A frame can also be a *run*: several realtime ticks already in wire form (RFC 6455 text
/// frames, header and text each, back to back), built once per dispatch window by the
/// dispatcher's stage and shared by every plain connection that takes that stretch of ticks
/// (`dispatch::stage`). The connection writes a run as it is, so a client that takes 60 ticks
/// a round costs one queue entry, one reference count and one write slice instead of 60 each.
#[derive(Debug, Clone)]
pub struct Frame {
    body: Body,
    /// The compressed form, once made (`None` inside: not worth compressing).
    deflated: Option<Arc<OnceLock<Option<Bytes>>>>,
}

#[derive(Debug, Clone)]
enum Body {
    /// One message's text.
    Text(Utf8Bytes),
    /// `messages` server text frames, framed (see [`Frame::run`]).
    Run { wire: Bytes, messages: u32 },
}

/// Longest header of a frame the server sends (unmasked, 64-bit length).
pub const MAX_HEADER: usize = 10;

/// The text opcode (RFC 6455 section 5.2).
const TEXT: u8 = 0x1;

/// Writes the header of a final, unmasked frame carrying `len` payload bytes into `buf` and
/// returns how many bytes it took. The one encoder of server frame headers: the socket
/// (`transport::ws`) uses it for every frame it sends, and the stage for runs, which is why it
/// lives on the link both of them import.
pub fn encode_head(opcode: u8, len: usize, buf: &mut [u8; MAX_HEADER]) -> usize {
    buf[0] = 0x80 | opcode;
    if len < 126 {
        // Fits in seven bits by the check above.
        buf[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        buf[1] = 126;
        buf[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        buf[1] = 127;
        buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Appends `text` to `wire` as one final, unmasked text frame.
pub fn append_text_frame(wire: &mut Vec<u8>, text: &str) {
    let mut head = [0u8; MAX_HEADER];
    let n = encode_head(TEXT, text.len(), &mut head);
    wire.extend_from_slice(&head[..n]);
    wire.extend_from_slice(text.as_bytes());
}

/// The texts of the frames in `wire`, which [`append_text_frame`] made.
fn run_texts(wire: &[u8]) -> impl Iterator<Item = &str> + '_ {
    let mut rest = wire;
    std::iter::from_fn(move || {
        let (&len7, after) = rest.get(1..)?.split_first()?;
        let (len, after) = match len7 {
            126 => (
                usize::from(u16::from_be_bytes(after.get(..2)?.try_into().ok()?)),
                &after[2..],
            ),
            127 => (
                usize::try_from(u64::from_be_bytes(after.get(..8)?.try_into().ok()?)).ok()?,
                &after[8..],
            ),
            n => (usize::from(n), after),
        };
        let text = after.get(..len)?;
        rest = &after[len..];
        // Built from `&str`s by `append_text_frame`.
        std::str::from_utf8(text).ok()
    })
}

impl Frame {
    /// A frame several connections will get: with a slot for its compressed form when
    /// `compressible` (some client negotiated compression).
    #[must_use]
    pub fn shared(text: impl Into<Utf8Bytes>, compressible: bool) -> Self {
        Self {
            body: Body::Text(text.into()),
            deflated: compressible.then(Default::default),
        }
    }

    /// A run of `messages` text frames already in wire form (made with
    /// [`append_text_frame`]); the connection writes the bytes as they are.
    #[must_use]
    pub fn run(wire: Bytes, messages: u32) -> Self {
        Self {
            body: Body::Run { wire, messages },
            deflated: None,
        }
    }

    /// A run's wire bytes; `None` for a single message.
    #[must_use]
    pub fn wire(&self) -> Option<&Bytes> {
        match &self.body {
            Body::Run { wire, .. } => Some(wire),
            Body::Text(_) => None,
        }
    }

    /// Messages in this frame: 1, or a run's count.
    #[must_use]
    pub fn messages(&self) -> usize {
        match &self.body {
            Body::Text(_) => 1,
            Body::Run { messages, .. } => *messages as usize,
        }
    }

    /// The text of every message in this frame, in order.
    pub fn texts(&self) -> impl Iterator<Item = &str> + '_ {
        let (single, run) = match &self.body {
            Body::Text(text) => (Some(text.as_str()), None),
            Body::Run { wire, .. } => (None, Some(run_texts(wire))),
        };
        single.into_iter().chain(run.into_iter().flatten())
    }

    /// Whether several connections get this frame (its compressed form is made once).
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.deflated.is_some()
    }

    /// The text; of a run, its first message's.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match &self.body {
            Body::Text(text) => text.as_str(),
            Body::Run { wire, .. } => run_texts(wire).next().unwrap_or(""),
        }
    }

    /// The compressed form for a connection that negotiated permessage-deflate: made by
    /// `compress` once for a shared frame (later calls, from any connection, get the same
    /// bytes), or each time for a frame made for one connection. `None`: send it plain.
    /// A run is never compressed (it is already framed): `None`.
    pub fn deflated(&self, compress: impl FnOnce(&[u8]) -> Option<Bytes>) -> Option<Bytes> {
        let Body::Text(text) = &self.body else {
            return None;
        };
        match &self.deflated {
            Some(slot) => slot.get_or_init(|| compress(text.as_bytes())).clone(),
            None => compress(text.as_bytes()),
        }
    }

    /// Bytes this frame holds on the link: its text, or a run's wire bytes (headers too).
    /// Shadows `str::len` of the deref, which would give a run's first message only.
    #[must_use]
    pub fn len(&self) -> usize {
        match &self.body {
            Body::Text(text) => text.len(),
            Body::Run { wire, .. } => wire.len(),
        }
    }

    /// Whether [`Frame::len`] is 0.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::ops::Deref for Frame {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self::shared(text, false)
    }
}

impl From<&str> for Frame {
    fn from(text: &str) -> Self {
        Self::shared(text, false)
    }
}

impl TryFrom<Bytes> for Frame {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        Utf8Bytes::try_from(bytes).map(|text| Self::shared(text, false))
    }
}

impl From<Frame> for Bytes {
    /// The text, or a run's wire bytes (already framed: see [`Frame::wire`]).
    fn from(frame: Frame) -> Self {
        match frame.body {
            Body::Text(text) => text.into(),
            Body::Run { wire, .. } => wire,
        }
    }
}

impl PartialEq for Frame {
    /// Equal when they carry the same messages, run or not.
    fn eq(&self, other: &Self) -> bool {
        self.texts().eq(other.texts())
    }
}

impl Eq for Frame {}

impl PartialEq<&str> for Frame {
    fn eq(&self, other: &&str) -> bool {
        self.messages() == 1 && self.as_str() == *other
    }
}

impl PartialEq<str> for Frame {
    fn eq(&self, other: &str) -> bool {
        self.messages() == 1 && self.as_str() == other
    }
}

/// Frames [`OutboundReceiver::drain`] takes out of the queue per lock: the lock is held only
/// to move them, never while the connection works on them.
const DRAIN_BATCH: usize = 32;

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// Over the byte or message bound: the client is not keeping up.
    Full,
    /// The connection is gone.
    Closed,
}

/// What woke the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Frames are queued, or a ping is due.
    Write,
    /// Close with this code now.
    Close(u16),
    /// Nothing to do for a while: leave the runtime if nothing is in progress
    /// ([`crate::session::parking`]).
    Park,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<VecDeque<Frame>>,
    queued_bytes: AtomicUsize,
    // 32-bit limits (config caps them) keep the link small (see `LINK_BUDGET`): an idle
    // connection is mostly this link.
    byte_limit: u32,
    max_messages: u32,
    /// Close code the connection must use (0: none yet). First caller wins.
    close_code: AtomicU16,
    /// [`CLOSED`] and [`DEFLATE`]: two flags in one byte (see `LINK_BUDGET`).
    flags: AtomicU8,
    ping_due: AtomicBool,
    /// When the connection last heard from its client, ms on the server's clock, in 32 bits:
    /// it is only ever compared with the clock a few heartbeats later, and a wrapping
    /// difference is exact for spans under 24 days (see [`clock_diff`]).
    heard_ms: AtomicU32,
    /// Close 4001 at this time unless authenticated (0: no deadline); 32 bits as `heard_ms`.
    auth_deadline_ms: AtomicU32,
    /// Something was read or written since the sweep last looked.
    active: AtomicBool,
    /// Sweeps in a row that saw no activity, for parking.
    quiet_sweeps: AtomicU16,
    /// The sweep asks the connection to park.
    park_due: AtomicBool,
    /// The parking-lot ticket while the connection is parked (0: running).
    parked_at: AtomicU64,
    waker: AtomicWaker,
    /// The low-water mark and where a drain below it is reported; set once, by the first
    /// replay. One pointer: links that never replay (nearly all) pay 8 bytes for it.
    refill: OnceBox<Refill>,
}

/// Link flag: the receiving side has gone; pushes fail with `Closed`.
const CLOSED: u8 = 1;
/// Link flag: the connection negotiated permessage-deflate; the dispatcher gives the frames
/// it shares a slot for their compressed form while such clients are registered.
const DEFLATE: u8 = 2;

/// A link's paced-replay state, boxed because few links ever have one.
#[derive(Debug)]
struct Refill {
    hook: RefillHook,
    /// Armed low-water mark in bytes (0: nobody waits for the queue to drain).
    mark: AtomicU32,
}

/// `now - then` for two times on the server's ms clock kept in 32 bits: exact while the
/// true span is under 2^31 ms (24 days); a `then` slightly after `now` (a race between the
/// sweep reading the clock and a connection recording a read) counts as 0.
fn clock_diff(now_ms: u64, then: u32) -> u64 {
    // Truncating the clock to 32 bits is the point: differences are taken modulo 2^32.
    #[allow(clippy::cast_possible_truncation)]
    let d = (now_ms as u32).wrapping_sub(then).cast_signed();
    u64::from(d.max(0).cast_unsigned())
}

/// The server's ms clock in the 32 bits a link keeps (see [`clock_diff`]).
#[allow(clippy::cast_possible_truncation)]
fn clock32(ms: u64) -> u32 {
    ms as u32
}

/// The dispatcher's list of links whose queue drained below their armed low-water mark.
/// Each link adds its key at most once per arming, so the list is bounded by the number of
/// links; the dispatcher takes it whole.
#[derive(Debug, Default)]
pub struct Refills {
    keys: Mutex<Vec<usize>>,
    pending: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Refills {
    fn signal(&self, key: usize) {
        self.keys.lock().push(key);
        self.pending.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// Takes the keys reported so far (cheap when there are none).
    pub fn take(&self) -> Vec<usize> {
        if !self.pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.keys.lock())
    }

    /// Resolves when a key was reported since the last wait (a report made while nobody
    /// waited is kept as a permit, so none is missed).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// Whom a link reports to when it drains below its mark.
#[derive(Debug)]
pub struct RefillHook {
    /// The dispatcher's list.
    pub refills: Arc<Refills>,
    /// The link's client key there.
    pub key: usize,
}

/// The link's size budget in bytes: its shared state plus the `Arc`'s two counts (an idle
/// connection is mostly this link; docs/benchmarks.md). Checked when the crate builds, so a new
/// field cannot undo it silently. The paced replays' mark and hook had taken it to 152; back at
/// 128 with the mark inside the hook's box (one pointer for both), and the two liveness times
/// (`heard_ms`, `auth_deadline_ms`) in 32 bits.
pub const LINK_BUDGET: usize = 128;
const _: () = assert!(
    std::mem::size_of::<Shared>() + 2 * std::mem::size_of::<usize>() <= LINK_BUDGET,
    "the outbound link outgrew its budget (LINK_BUDGET)"
);

/// The sending side; cheap to clone (dispatcher, sweeper and the connection all hold one).
#[derive(Debug, Clone)]
pub struct Outbound {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection. Dropping it closes the link.
#[derive(Debug)]
pub struct OutboundReceiver {
    shared: Arc<Shared>,
}

/// A new link holding at most `max_messages` frames and `byte_limit` bytes of data.
#[must_use]
pub fn channel(max_messages: usize, byte_limit: usize) -> (Outbound, OutboundReceiver) {
    let shared = Arc::new(Shared {
        queue: Mutex::new(VecDeque::new()),
        queued_bytes: AtomicUsize::new(0),
        byte_limit: u32::try_from(byte_limit).unwrap_or(u32::MAX),
        max_messages: u32::try_from(max_messages).unwrap_or(u32::MAX),
        close_code: AtomicU16::new(0),
        flags: AtomicU8::new(0),
        ping_due: AtomicBool::new(false),
        heard_ms: AtomicU32::new(0),
        auth_deadline_ms: AtomicU32::new(0),
        active: AtomicBool::new(true),
        quiet_sweeps: AtomicU16::new(0),
        park_due: AtomicBool::new(false),
        parked_at: AtomicU64::new(0),
        waker: AtomicWaker::new(),
        refill: OnceBox::new(),
    });
    (
        Outbound {
            shared: shared.clone(),
        },
        OutboundReceiver { shared },
    )
}

impl Outbound {
    /// Queues a data frame unless that would pass the byte limit.
    ///
    /// # Errors
    /// [`PushError::Full`] over the byte or count bound, [`PushError::Closed`] when the
    /// connection has gone.
    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        self.push_within(frame, self.byte_limit())
    }

    /// Queues a control frame (ack, error, mode switch, snapshot, a critical tick) past the
    /// data byte limit, so a lagging client still hears why things change; but never past
    /// twice the limit, so control traffic cannot grow a queue without bound either.
    ///
    /// # Errors
    /// As [`Outbound::push`].
    pub fn push_control(&self, frame: Frame) -> Result<(), PushError> {
        self.push_within(frame, self.byte_limit().saturating_mul(2))
    }

    /// Queues `frames` (a dispatch round's realtime ticks for this client, in order) under one
    /// lock: all of them, or none when together they would pass the byte or count bound (the
    /// client is then a slow consumer, as it would have been at the first frame that did not
    /// fit). Empties `frames` on success and returns how many were queued. The count bound
    /// (`dispatch.outbound_messages`) counts queue entries: a run is one.
    ///
    /// # Errors
    /// As [`Outbound::push`]; `frames` is left as it was.
    pub fn push_many(&self, frames: &mut Vec<Frame>) -> Result<usize, PushError> {
        let count = frames.len();
        let len = frames.iter().map(|f| f.len()).sum();
        self.push_run(count, len, self.byte_limit(), |queue| {
            queue.extend(frames.drain(..));
        })?;
        Ok(count)
    }

    fn push_within(&self, frame: Frame, limit: usize) -> Result<(), PushError> {
        self.push_run(1, frame.len(), limit, |queue| queue.push_back(frame))
    }

    /// The one push: `count` frames of `len` bytes go in through `put` under the lock, unless
    /// the link is closed or they would pass `limit` bytes or the message bound.
    fn push_run(
        &self,
        count: usize,
        len: usize,
        limit: usize,
        put: impl FnOnce(&mut VecDeque<Frame>),
    ) -> Result<(), PushError> {
        let shared = &self.shared;
        let was_empty = {
            let mut queue = shared.queue.lock();
            if shared.flags.load(Ordering::Acquire) & CLOSED != 0 {
                return Err(PushError::Closed);
            }
            if queue.len() + count > shared.max_messages as usize
                || shared.queued_bytes.load(Ordering::Acquire) + len > limit
            {
                return Err(PushError::Full);
            }
            shared.queued_bytes.fetch_add(len, Ordering::AcqRel);
            let was_empty = queue.is_empty();
            put(&mut queue);
            was_empty
        };
        // The connection drains the queue before it waits again, so only the first frames
        // need to wake it.
        if was_empty && count > 0 {
            shared.waker.wake();
        }
        Ok(())
    }

    /// Marks the connection as one that negotiated permessage-deflate (before it registers).
    pub fn set_deflate(&self) {
        self.shared.flags.fetch_or(DEFLATE, Ordering::Release);
    }

    /// Whether the connection negotiated permessage-deflate.
    #[must_use]
    pub fn deflate(&self) -> bool {
        self.shared.flags.load(Ordering::Acquire) & DEFLATE != 0
    }

    /// Bytes queued and not yet taken by the connection.
    #[must_use]
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// The byte limit.
    #[must_use]
    pub fn byte_limit(&self) -> usize {
        self.shared.byte_limit as usize
    }

    /// Tells the connection to close with `code` without waiting. The first caller's code
    /// wins; returns whether this call was the first.
    pub fn kill(&self, code: u16) -> bool {
        let first = self
            .shared
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.shared.waker.wake();
        first
    }

    /// Asks the connection to send a WebSocket ping.
    pub fn request_ping(&self) {
        self.shared.ping_due.store(true, Ordering::Release);
        self.shared.waker.wake();
    }

    /// How long (ms) the connection has not heard from its client at `now_ms`.
    #[must_use]
    pub fn quiet_ms(&self, now_ms: u64) -> u64 {
        clock_diff(now_ms, self.shared.heard_ms.load(Ordering::Acquire))
    }

    /// Sets the time by which the client must authenticate (ms).
    pub fn set_auth_deadline(&self, at_ms: u64) {
        // 0 means "no deadline": a deadline that truncates to 0 moves 1 ms later.
        self.shared
            .auth_deadline_ms
            .store(clock32(at_ms).max(1), Ordering::Release);
    }

    /// Lifts the auth deadline because the client authenticated. `false` if the deadline had
    /// already expired (and the connection was ordered closed): the client was too late.
    pub fn lift_auth_deadline(&self) -> bool {
        self.shared.auth_deadline_ms.swap(0, Ordering::AcqRel) != 0
    }

    /// Moves a pending auth deadline to `at_ms`: a JWT's expiry replaces the time to
    /// authenticate, and a refreshed token's expiry the old one's, on the same sweep. `false`
    /// if the deadline had already expired (the connection is ordered closed).
    pub fn replace_auth_deadline(&self, at_ms: u64) -> bool {
        self.shared
            .auth_deadline_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                (at != 0).then_some(clock32(at_ms).max(1))
            })
            .is_ok()
    }

    /// Takes the auth deadline if it has passed at `now_ms`; exactly one of this and
    /// [`Outbound::lift_auth_deadline`] (or [`Outbound::replace_auth_deadline`]) wins.
    #[must_use]
    pub fn expire_auth_deadline(&self, now_ms: u64) -> bool {
        self.shared
            .auth_deadline_ms
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                // Passed: `now - at` is not negative (a wrapping difference, as for heard).
                let passed = clock32(now_ms).wrapping_sub(at).cast_signed() >= 0;
                (at != 0 && passed).then_some(0)
            })
            .is_ok()
    }

    /// Whether the connection has been told to close (it is on its way out).
    #[must_use]
    pub fn is_closing(&self) -> bool {
        self.shared.close_code.load(Ordering::Acquire) != 0
    }

    /// For the sweep, once per sweep: whether the connection has been quiet (nothing read,
    /// nothing written) for at least `sweeps` whole sweep periods in a row.
    pub fn quiet_for(&self, sweeps: u16) -> bool {
        let shared = &self.shared;
        if shared.active.swap(false, Ordering::AcqRel) {
            shared.quiet_sweeps.store(0, Ordering::Release);
            return false;
        }
        let quiet = shared
            .quiet_sweeps
            .load(Ordering::Acquire)
            .saturating_add(1);
        shared.quiet_sweeps.store(quiet, Ordering::Release);
        quiet >= sweeps
    }

    /// Asks the connection to park (it declines if it is in the middle of something).
    pub fn request_park(&self) {
        self.shared.park_due.store(true, Ordering::Release);
        self.shared.waker.wake();
    }

    /// Whether anything would wake the connection now: queued frames, a ping or a close.
    #[must_use]
    pub fn has_work(&self) -> bool {
        let shared = &self.shared;
        shared.close_code.load(Ordering::Acquire) != 0
            || shared.ping_due.load(Ordering::Acquire)
            || !shared.queue.lock().is_empty()
    }

    /// Records the parking-lot ticket of the connection (0: running again).
    pub fn set_parked_at(&self, ticket: u64) {
        // A park request that raced with parking is spent: it must not re-park the
        // connection as soon as something resumes it.
        self.shared.park_due.store(false, Ordering::Release);
        self.shared.parked_at.store(ticket, Ordering::Release);
    }

    /// Makes `waker` the one woken for this link: the parking lot's ticket while the
    /// connection has no task.
    pub fn set_waker(&self, waker: &std::task::Waker) {
        self.shared.waker.register(waker);
    }

    /// Arms the low-water mark: when the connection's drain leaves fewer than `mark` bytes
    /// queued, `hook` (made on first use) hears of it once. Returns `true` when the queue is
    /// already below the mark and this call disarmed it again: the caller refills now, and no
    /// report will come for this arming.
    pub fn refill_below(&self, mark: usize, hook: impl FnOnce() -> RefillHook) -> bool {
        let shared = &self.shared;
        let refill = shared.refill.get_or_init(|| {
            Box::new(Refill {
                hook: hook(),
                mark: AtomicU32::new(0),
            })
        });
        let mark = u32::try_from(mark).unwrap_or(u32::MAX).max(1);
        refill.mark.store(mark, Ordering::Release);
        shared.queued_bytes.load(Ordering::Acquire) < mark as usize
            && refill.mark.swap(0, Ordering::AcqRel) != 0
    }

    /// The parking-lot ticket of a parked connection; `None` while it runs on the runtime.
    /// Only meaningful under the parking lot's lock, which parking and unparking hold.
    #[must_use]
    pub fn parked_at(&self) -> Option<u64> {
        match self.shared.parked_at.load(Ordering::Acquire) {
            0 => None,
            ticket => Some(ticket),
        }
    }
}

impl OutboundReceiver {
    /// Ready when frames are queued, a ping is due or the connection must close; otherwise
    /// registers `cx` to be woken when one of them happens.
    pub fn poll_wake(&self, cx: &mut Context<'_>) -> Poll<Wake> {
        self.shared.waker.register(cx.waker());
        if let Some(code) = self.close_code() {
            return Poll::Ready(Wake::Close(code));
        }
        if self.shared.ping_due.load(Ordering::Acquire) || !self.shared.queue.lock().is_empty() {
            return Poll::Ready(Wake::Write);
        }
        if self.shared.park_due.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Wake::Park);
        }
        Poll::Pending
    }

    /// Ready with the close code once the connection is told to close; otherwise registers
    /// `cx`. Unlike [`OutboundReceiver::poll_wake`] it ignores queued frames, for waiting on
    /// a full socket.
    pub fn poll_close(&self, cx: &mut Context<'_>) -> Poll<u16> {
        self.shared.waker.register(cx.waker());
        self.close_code().map_or(Poll::Pending, Poll::Ready)
    }

    /// The code the connection was told to close with, if any.
    #[must_use]
    pub fn close_code(&self) -> Option<u16> {
        match self.shared.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Takes a frame if one is queued.
    #[must_use]
    pub fn try_recv(&self) -> Option<Frame> {
        let frame = self.shared.queue.lock().pop_front()?;
        let before = self
            .shared
            .queued_bytes
            .fetch_sub(frame.len(), Ordering::AcqRel);
        self.drained_to(before - frame.len());
        Some(frame)
    }

    /// Takes queued frames in order until `budget` bytes are taken or the queue is empty;
    /// returns the number of messages (a run counts each of its messages) and bytes taken.
    /// Frames are handed to `take` with the lock
    /// released: `take` may compress them, and the dispatcher's pushes to this link must not
    /// wait for that. A queue that fits in what is left of the budget (the common case: the
    /// connection keeps up) leaves whole, storage and all, in one swap; a longer one leaves
    /// [`DRAIN_BATCH`] frames per lock.
    pub fn drain(&self, budget: usize, mut take: impl FnMut(Frame)) -> (u64, usize) {
        let mut frames = 0;
        let mut bytes = 0;
        let mut remaining = None;
        while bytes < budget {
            let (taken, got_bytes) = {
                let mut queue = self.shared.queue.lock();
                // Under the lock the count is exactly the queue's bytes: pushes add to it
                // under the lock, and only this receiver takes away.
                let queued = self.shared.queued_bytes.load(Ordering::Acquire);
                if queued <= budget - bytes {
                    // Storage and all: an idle connection keeps none.
                    (std::mem::take(&mut *queue), queued)
                } else {
                    let mut taken = VecDeque::with_capacity(DRAIN_BATCH);
                    let mut got_bytes = 0;
                    while taken.len() < DRAIN_BATCH && bytes + got_bytes < budget {
                        let Some(frame) = queue.pop_front() else {
                            break;
                        };
                        got_bytes += frame.len();
                        taken.push_back(frame);
                    }
                    if queue.is_empty() {
                        // The last frame crossed the budget: keep no storage either.
                        *queue = VecDeque::new();
                    }
                    (taken, got_bytes)
                }
            };
            if taken.is_empty() {
                break;
            }
            let before = self
                .shared
                .queued_bytes
                .fetch_sub(got_bytes, Ordering::AcqRel);
            remaining = Some(before - got_bytes);
            bytes += got_bytes;
            // Then look again, for what the dispatcher pushed meanwhile.
            for frame in taken {
                frames += frame.messages() as u64;
                take(frame);
            }
        }
        if let Some(remaining) = remaining {
            self.shared.active.store(true, Ordering::Release);
            self.drained_to(remaining);
        }
        (frames, bytes)
    }

    /// Reports a drain below the armed low-water mark, once per arming. One pointer load
    /// for a link that never replayed (nearly all of them).
    fn drained_to(&self, remaining: usize) {
        let Some(refill) = self.shared.refill.get() else {
            return;
        };
        let mark = refill.mark.load(Ordering::Relaxed);
        if mark != 0 && remaining < mark as usize && refill.mark.swap(0, Ordering::AcqRel) != 0 {
            refill.hook.refills.signal(refill.hook.key);
        }
    }

    /// Whether a ping was requested since the last call.
    pub fn take_ping_due(&self) -> bool {
        self.shared.ping_due.swap(false, Ordering::AcqRel)
    }

    /// Records that the client was heard from at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.shared
            .heard_ms
            .store(clock32(now_ms), Ordering::Release);
        self.shared.active.store(true, Ordering::Release);
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        let mut queue = self.shared.queue.lock();
        self.shared.flags.fetch_or(CLOSED, Ordering::Release);
        queue.clear();
        self.shared.queued_bytes.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_carries_its_messages_at_every_header_length() {
        // 7-bit, 16-bit and 64-bit length headers, and an empty message.
        let texts: Vec<String> = [0, 125, 126, 65_535, 65_536, 3]
            .iter()
            .map(|&n| "é".repeat(n / 2) + &"x".repeat(n % 2))
            .collect();
        let mut wire = Vec::new();
        for t in &texts {
            append_text_frame(&mut wire, t);
        }
        let run = Frame::run(Bytes::from(wire.clone()), texts.len() as u32);
        assert_eq!(run.texts().collect::<Vec<_>>(), texts);
        assert_eq!(run.messages(), texts.len());
        assert_eq!(run.len(), wire.len());
        assert_eq!(run.as_str(), texts[0]);
        // What a client's decoder reads: FIN + text opcode, then the length (the empty first
        // message is its 2-byte header alone).
        assert_eq!(wire[..4], [0x81, 0, 0x81, 125]);
        assert!(run
            .deflated(|_| panic!("a run is never compressed"))
            .is_none());
        assert_eq!(Bytes::from(run.clone()), wire);
        let single = Frame::from(texts[1].as_str());
        assert_eq!(single.texts().collect::<Vec<_>>(), [&texts[1]]);
        assert_ne!(run, single);
        assert_eq!(single, texts[1].as_str());
        assert!(run != texts[0].as_str(), "a run of several is not one text");
    }

    #[test]
    fn a_drain_counts_a_runs_messages_and_its_bytes() {
        let (tx, rx) = channel(10, 1 << 20);
        let mut wire = Vec::new();
        for t in ["a", "bb", "ccc"] {
            append_text_frame(&mut wire, t);
        }
        let bytes = wire.len();
        tx.push_many(&mut vec![
            Frame::run(Bytes::from(wire), 3),
            Frame::from("dd"),
        ])
        .unwrap();
        let mut got = Vec::new();
        let (messages, taken) = rx.drain(usize::MAX, |f| got.push(f));
        assert_eq!((messages, taken), (4, bytes + 2));
        let texts: Vec<&str> = got.iter().flat_map(Frame::texts).collect();
        assert_eq!(texts, ["a", "bb", "ccc", "dd"]);
    }

    #[test]
    fn liveness_times_survive_the_32_bit_wrap() {
        let (tx, rx) = channel(10, 1000);
        let wrap = 1u64 << 32;
        // Heard 1 s before the 32-bit clock wraps, checked 2 s after it.
        rx.heard(wrap - 1_000);
        assert_eq!(tx.quiet_ms(wrap + 2_000), 3_000);
        assert_eq!(tx.quiet_ms(wrap - 1_000), 0);
        // A read recorded just after the sweep read its clock is not "quiet for 49 days".
        rx.heard(wrap + 5);
        assert_eq!(tx.quiet_ms(wrap + 2), 0);
        // An auth deadline past the wrap: not passed before it, passed after it.
        tx.set_auth_deadline(wrap + 500);
        assert!(!tx.expire_auth_deadline(wrap - 100));
        assert!(!tx.expire_auth_deadline(wrap + 499));
        assert!(tx.expire_auth_deadline(wrap + 500));
        assert!(!tx.lift_auth_deadline(), "expired once, then gone");
        // A deadline that truncates to 0 is still a deadline.
        tx.set_auth_deadline(wrap);
        assert!(tx.lift_auth_deadline());
    }

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
    fn push_many_queues_all_in_order_or_none() {
        let (tx, rx) = channel(5, 10);
        tx.push(Frame::from("12")).unwrap();
        let mut frames: Vec<Frame> = ["345", "678"].into_iter().map(Frame::from).collect();
        assert_eq!(tx.push_many(&mut frames), Ok(2));
        assert!(frames.is_empty());
        assert_eq!(tx.queued_bytes(), 8);
        // Bytes: 8 + 3 > 10; none of the three is queued, and the caller keeps them.
        let mut frames: Vec<Frame> = ["9", "ab", "c"].into_iter().map(Frame::from).collect();
        assert_eq!(tx.push_many(&mut frames), Err(PushError::Full));
        assert_eq!(frames.len(), 3);
        assert_eq!(tx.queued_bytes(), 8);
        // Count: 3 queued + 3 > 5.
        let mut frames: Vec<Frame> = ["", "", ""].into_iter().map(Frame::from).collect();
        assert_eq!(tx.push_many(&mut frames), Err(PushError::Full));
        let got: Vec<Frame> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, ["12", "345", "678"]);
        drop(rx);
        assert_eq!(
            tx.push_many(&mut vec![Frame::from("x")]),
            Err(PushError::Closed)
        );
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

    #[test]
    fn drain_takes_in_order_up_to_the_budget_and_frees_storage() {
        let (tx, rx) = channel(100, 1000);
        for text in ["aaaa", "bbbb", "cccc"] {
            tx.push(Frame::from(text)).unwrap();
        }
        let mut got = Vec::new();
        assert_eq!(rx.drain(5, |f| got.push(f)), (2, 8));
        assert_eq!(got, ["aaaa", "bbbb"]);
        assert_eq!(tx.queued_bytes(), 4);
        assert_eq!(rx.drain(100, |f| got.push(f)), (1, 4));
        assert_eq!(rx.shared.queue.lock().capacity(), 0);
    }

    /// The connection compresses (or otherwise works on) what it takes: that must never
    /// happen under the link's lock, which the dispatcher's push waits on.
    #[test]
    fn drain_hands_frames_over_with_the_queue_unlocked() {
        let (tx, rx) = channel(10_000, 1 << 20);
        for i in 0..1000 {
            tx.push(Frame::from(format!("frame {i}"))).unwrap();
        }
        let mut taken = 0;
        let (frames, _) = rx.drain(usize::MAX, |f| {
            assert!(
                rx.shared.queue.try_lock().is_some(),
                "the queue is locked while {f:?} is taken"
            );
            // The dispatcher may push meanwhile; those frames are taken too.
            if taken < 10 {
                tx.push(Frame::from("pushed while draining")).unwrap();
            }
            taken += 1;
        });
        assert_eq!((frames, taken), (1010, 1010));
        assert_eq!(tx.queued_bytes(), 0);
    }

    #[test]
    fn a_drain_below_the_armed_mark_is_reported_once() {
        let (tx, rx) = channel(100, 1000);
        let refills = Arc::new(Refills::default());
        let hook = || RefillHook {
            refills: refills.clone(),
            key: 7,
        };
        for _ in 0..4 {
            tx.push(Frame::from("x".repeat(100))).unwrap();
        }
        assert!(!tx.refill_below(150, hook), "400 bytes queued: armed");
        let _ = rx.try_recv();
        assert!(refills.take().is_empty(), "300 left: not below yet");
        let _ = rx.try_recv();
        let _ = rx.try_recv();
        assert_eq!(refills.take(), [7]);
        let _ = rx.try_recv();
        assert!(refills.take().is_empty(), "one report per arming");
        assert!(tx.refill_below(150, hook), "already below: refill now");
        tx.push(Frame::from("x".repeat(100))).unwrap();
        rx.drain(1000, drop);
        assert!(refills.take().is_empty(), "disarmed by the caller");
    }

    #[tokio::test]
    async fn wakes_for_frames_pings_and_kills_and_keeps_the_first_code() {
        let (tx, rx) = channel(10, 1000);
        let poll = || std::future::poll_fn(|cx| rx.poll_wake(cx));
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.push(Frame::from("x")) }
        });
        assert_eq!(poll().await, Wake::Write);
        waiting.await.unwrap().unwrap();
        let _ = rx.try_recv();
        tx.request_ping();
        assert_eq!(poll().await, Wake::Write);
        assert!(rx.take_ping_due());
        assert!(!rx.take_ping_due());
        assert!(tx.kill(4008));
        assert!(!tx.kill(1001));
        assert_eq!(poll().await, Wake::Close(4008));
    }
}

//! The parking lot: where connections with nothing to do wait, off the tokio runtime.
//!
//! A running connection costs a task (its future and header, about 0.8 KiB) and a reactor
//! registration (256 B); most connections of a market-data server are idle most of the time.
//! So when a connection has been quiet long enough, its task ends and leaves what it is (a
//! [`Parked`] value: for `/ws`, the session layer's `Session`) and its bare socket here: a slab
//! entry of about 100 B, the socket watched by one epoll set (mio) on a thread of its own.
//! The lot is generic over what it parks, so this layer knows nothing of sessions: it needs
//! only the parked value's outbound link (whose pushes wake it), a way to hand it back to its
//! runtime ([`Parked::resume`]) and somewhere to report pongs and counts.
//!
//! Data flow while parked:
//! - **Outbound.** Anything pushed onto the connection's link (a tick, an ack, a close order)
//!   wakes the link's waker, which now names the connection's spot here. The wake itself is
//!   O(1) and takes no lot lock, because it runs inside the dispatcher's fan-out loop: the
//!   ticket goes onto a bounded ready list and the lot's thread is signalled (a mio `Waker`,
//!   one eventfd write, and none while a signal is still pending). The lot's thread then takes
//!   the parked value out, stops watching its socket (`epoll_ctl`) and calls
//!   [`Parked::resume`], which starts a new task on its server's runtime, where the frame is
//!   written. When the ready list is full the wake-up is not lost: an overflow flag makes the
//!   lot's thread look at every parked connection for queued work instead (rare, and still off
//!   the dispatcher). A bounded flume channel is the list: already a dependency, `try_send` is
//!   O(1) and never waits.
//! - **Heartbeats** do not unpark: [`Lot::write_parked`] writes a pre-framed heartbeat and ping
//!   straight to the socket (the liveness sweep does that from a blocking-pool thread, so 100k
//!   parked sockets are 100k syscalls there, not in one poll of a runtime task).
//! - **Inbound.** Readable sockets are peeked on the lot's thread: complete pongs (the answer
//!   to the heartbeat ping) are consumed there and count as life ([`Parked::heard`]); anything
//!   else (a request, a close, EOF, an error) unparks the connection without consuming a byte,
//!   and its task reads it.
//!
//! There is one lot per parked type per process, like the kernel's one epoll facility it
//! wraps: the waker of a parked connection is then just its ticket (slot and generation) with
//! no allocation, and the type finds its lot through [`Parked::lot`] (a static the type's
//! owner keeps, since statics cannot be generic). Every transition happens under the lot's one
//! lock, and a wake-up that arrives after its connection left, or for a slot reused since,
//! finds a different generation and does nothing.
//!
//! A ticket is 64 bits (32 of slot, 32 of generation) and travels as a waker's data pointer
//! and as a mio `Token(usize)`. On targets whose pointers are narrower it would lose its
//! generation, so there parking is off ([`SUPPORTED`]): connections simply stay on the
//! runtime, costing memory but nothing else, rather than the whole server refusing to build.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{RawWaker, RawWakerVTable, Waker};

use bytes::Bytes;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use parking_lot::Mutex;
use slab::Slab;

use super::ws::frame::{self, opcode, MAX_CONTROL_PAYLOAD};
use crate::dispatch::outbound::Outbound;

/// Readiness events taken per wait.
const EVENTS_PER_WAIT: usize = 256;
/// Tickets woken and not yet resumed by the lot's thread. Past it a wake-up sets the overflow
/// flag instead (the thread then scans every parked connection), so nothing is lost and the
/// waker never waits; it bounds memory, not correctness, and so is not a config key.
pub const READY_LIST: usize = 16_384;
/// The epoll token of the lot's own `Waker`. Tickets are never 0 (generations start at 1).
const WAKE_TOKEN: Token = Token(0);

/// Whether this target can park connections: a ticket must fit in a pointer and a `usize`.
pub const SUPPORTED: bool = cfg!(target_pointer_width = "64");
/// Bytes peeked at per look at a parked socket: room for a few pongs.
const PEEK_BYTES: usize = 512;
/// Looks per readiness event. A client that keeps sending pongs past this is resumed and
/// handled by its task, so it cannot hold the lot's lock (and every wake-up) for long.
const MAX_LOOKS: usize = 4;

/// Held while a lot starts, so only one thread starts it.
static STARTING: Mutex<()> = Mutex::new(());

/// What a lot parks: a connection's state without its socket. Everything the lot does to it
/// goes through here.
pub trait Parked: Send + Sized + 'static {
    /// The connection's outbound link: pushes onto it wake the parked connection.
    fn link(&self) -> &Outbound;

    /// Whether it may park now; checked under the lot's lock, so a server that has stopped
    /// parking (see [`Lot::evict`]) sees no connection slip in after its sweep.
    fn may_park(&self) -> bool;

    /// It was parked (for counting; called under the lot's lock, before anything can resume
    /// it).
    fn parked(&self);

    /// Pongs were read off its socket while it was parked: the peer is alive.
    fn heard(&self);

    /// It leaves the lot: start it again on its runtime with `stream`, writing `unsent` (the
    /// rest of a frame written while it was parked) first. Called on the lot's thread, a
    /// waker's, or the parking one's; must not block.
    fn resume(self, stream: TcpStream, unsent: Option<Bytes>);

    /// The process's lot for this type.
    fn lot() -> &'static Lot<Self>;
}

/// Parked connections of one type, and the epoll set that watches them.
pub struct Lot<P> {
    spots: Mutex<Spots<P>>,
    registry: Registry,
    /// The lot's thread is running (parking is refused if it could not start).
    watching: AtomicBool,
    /// Tickets woken by pushes, for the lot's thread to resume.
    ready: flume::Sender<u64>,
    ready_rx: flume::Receiver<u64>,
    /// A wake-up did not fit in `ready`: the lot's thread looks at every spot.
    overflowed: AtomicBool,
    /// The lot's thread has been signalled and has not started draining yet: further wake-ups
    /// need no signal (one eventfd write per batch of wake-ups, not per wake-up).
    signalled: AtomicBool,
    /// Signals the lot's thread (an eventfd in its epoll set).
    signal: mio::Waker,
    /// Wake-ups that overflowed `ready`.
    overflows: AtomicU64,
}

impl<P> std::fmt::Debug for Lot<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lot")
            .field("overflows", &self.overflows)
            .finish_non_exhaustive()
    }
}

struct Spots<P> {
    slab: Slab<Spot<P>>,
    next_generation: u32,
}

struct Spot<P> {
    generation: u32,
    stream: TcpStream,
    parked: P,
}

/// Bytes one parked `P` takes in the lot's slab (for the size budgets' tests).
#[doc(hidden)]
#[must_use]
pub fn spot_size<P>() -> usize {
    std::mem::size_of::<Spot<P>>()
}

/// Slot and generation in one word: the epoll token, the link's `parked_at` and the waker's
/// data. Generations start at 1, so a ticket is never 0.
fn ticket_id(slot: usize, generation: u32) -> u64 {
    (u64::from(generation) << 32) | slot as u64
}

fn split(ticket: u64) -> (usize, u32) {
    // Both halves fit: slots are below 2^32 (checked in `park`).
    ((ticket & 0xFFFF_FFFF) as usize, (ticket >> 32) as u32)
}

/// The wakers of parked `P`s: a ticket, nothing allocated. Waking one resumes the connection
/// if it is still parked under that ticket.
struct Tickets<P>(PhantomData<P>);

impl<P: Parked> Tickets<P> {
    const VTABLE: RawWakerVTable =
        RawWakerVTable::new(Self::clone, Self::wake, Self::wake, Self::drop);

    fn waker(ticket: u64) -> Waker {
        // The data pointer carries the ticket as a plain number; it is never dereferenced.
        // SAFETY: every vtable function below treats the data as an integer, is thread-safe,
        // and owns nothing, which is all `RawWaker`'s contract asks.
        unsafe { Waker::from_raw(RawWaker::new(ticket as usize as *const (), &Self::VTABLE)) }
    }

    fn clone(data: *const ()) -> RawWaker {
        RawWaker::new(data, &Self::VTABLE)
    }

    fn wake(data: *const ()) {
        P::lot().wake(data as usize as u64);
    }

    fn drop(_: *const ()) {}
}

/// What a look at a parked socket found.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    /// Nothing to read after all.
    Nothing,
    /// Only pongs, now consumed.
    Pongs,
    /// Something the connection's task must read (or EOF, or an error); `heard`: pongs were
    /// consumed before it.
    ForTheTask { heard: bool },
}

impl<P: Parked> Lot<P> {
    /// The lot in `cell`, started (its epoll set and thread) on first use.
    ///
    /// # Errors
    /// The epoll set could not be created.
    pub fn get_or_start(cell: &'static OnceLock<Self>) -> io::Result<&'static Self> {
        if let Some(lot) = cell.get() {
            return Ok(lot);
        }
        let _one = STARTING.lock();
        if let Some(lot) = cell.get() {
            return Ok(lot);
        }
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let signal = mio::Waker::new(poll.registry(), WAKE_TOKEN)?;
        let (ready, ready_rx) = flume::bounded(READY_LIST);
        let lot = cell.get_or_init(|| Self {
            spots: Mutex::new(Spots {
                slab: Slab::new(),
                next_generation: 0,
            }),
            registry,
            watching: AtomicBool::new(false),
            ready,
            ready_rx,
            overflowed: AtomicBool::new(false),
            signalled: AtomicBool::new(false),
            signal,
            overflows: AtomicU64::new(0),
        });
        // Set first: the thread clears it if it ever stops.
        lot.watching.store(true, Ordering::Release);
        if let Err(e) = std::thread::Builder::new()
            .name("tickfan-parking".into())
            .spawn(move || lot.watch(poll))
        {
            lot.watching.store(false, Ordering::Release);
            tracing::error!(error = %e, "parking lot thread failed: nothing parks");
        }
        Ok(lot)
    }

    /// Wake-ups of parked connections that did not fit the ready list; each made the lot's
    /// thread look at every parked connection once.
    #[must_use]
    pub fn wake_overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Parks `parked` with its socket, which must be out of the runtime's reactor; it must have
    /// nothing in progress. If anything arrives for it meanwhile, it is resumed at once. One
    /// that may not park (see [`Parked::may_park`]) is dropped.
    ///
    /// # Errors
    /// The lot cannot take it (no lot thread, no 64-bit tickets, a full slab): it is handed
    /// back, for its owner to keep running.
    pub fn park(&self, parked: P, stream: TcpStream) -> Result<(), (P, TcpStream)> {
        let link = parked.link().clone();
        let mut spots = self.spots.lock();
        // Checked under the lock `evict` takes: nothing parks after its sweep.
        if !parked.may_park() {
            drop(spots);
            drop(parked);
            return Ok(());
        }
        if !SUPPORTED
            || !self.watching.load(Ordering::Acquire)
            || spots.slab.vacant_key() > u32::MAX as usize
        {
            return Err((parked, stream));
        }
        spots.next_generation = spots.next_generation.wrapping_add(1).max(1);
        let generation = spots.next_generation;
        // Counted before anything can resume it (which counts it out).
        parked.parked();
        let slot = spots.slab.insert(Spot {
            generation,
            stream,
            parked,
        });
        let id = ticket_id(slot, generation);
        drop(spots);
        // The ticket takes over the link's waker outside the lock (registering may wake it at
        // once, and waking takes the lock), and before the connection can be found by its
        // link (`parked_at`) or its socket (the epoll set): until then only a ticket wake can
        // resume it, so no resumed task's waker is ever replaced by the ticket.
        link.set_waker(&Tickets::<P>::waker(id));
        {
            let spots = self.spots.lock();
            // Woken in between: already resumed, its socket is the runtime's now.
            let Some(spot) = spots.slab.get(slot).filter(|s| s.generation == generation) else {
                return Ok(());
            };
            link.set_parked_at(id);
            // `usize` holds 64 bits on every target tokio's epoll backend runs on.
            let token = Token(usize::try_from(id).unwrap_or(usize::MAX));
            let fd = spot.stream.as_raw_fd();
            if let Err(e) = self
                .registry
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
            {
                drop(spots);
                tracing::warn!(error = %e, "cannot watch a parked socket: resuming it");
                self.unpark(id, None);
                return Ok(());
            }
        }
        // A push between the task's last look and the ticket taking over woke the old task,
        // which was no longer listening: look again now that the ticket listens.
        if link.has_work() {
            self.unpark(id, None);
        }
        Ok(())
    }

    /// A push woke the connection with ticket `id`: hands it to the lot's thread without
    /// waiting and without the lot's lock (this runs in the dispatcher's fan-out loop).
    fn wake(&self, id: u64) {
        if !self.watching.load(Ordering::Acquire) {
            // No thread to hand it to (it failed to start or stopped): resume it here.
            self.unpark(id, None);
            return;
        }
        if self.ready.try_send(id).is_err() {
            self.overflowed.store(true, Ordering::Release);
            self.overflows.fetch_add(1, Ordering::Relaxed);
        }
        if !self.signalled.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.signal.wake() {
                // Cannot happen short of a broken eventfd; the ticket waits for the next
                // successful signal rather than being resumed on the dispatcher's thread.
                self.signalled.store(false, Ordering::Release);
                tracing::error!(error = %e, "cannot signal the parking lot's thread");
            }
        }
    }

    /// On the lot's thread: resumes every connection woken since the last signal.
    fn resume_woken(&self) {
        // Cleared first: a wake-up from here on signals again, so none is left behind.
        self.signalled.swap(false, Ordering::AcqRel);
        while let Ok(id) = self.ready_rx.try_recv() {
            self.unpark(id, None);
        }
        if self.overflowed.swap(false, Ordering::AcqRel) {
            // Some tickets did not fit: find every parked connection with work queued.
            let woken: Vec<u64> = {
                let spots = self.spots.lock();
                spots
                    .slab
                    .iter()
                    .filter(|(_, spot)| spot.parked.link().has_work())
                    .map(|(slot, spot)| ticket_id(slot, spot.generation))
                    .collect()
            };
            for id in woken {
                self.unpark(id, None);
            }
        }
    }

    /// Takes the connection with ticket `id` out, if it is still parked there, and resumes
    /// it with `unsent` going out first.
    fn unpark(&self, id: u64, unsent: Option<Bytes>) {
        let Some(spot) = Self::take(&mut self.spots.lock(), id) else {
            return;
        };
        self.resume(spot, unsent);
    }

    /// Takes the spot of ticket `id` out (under the lot's lock), if it is still there.
    fn take(spots: &mut Spots<P>, id: u64) -> Option<Spot<P>> {
        let (slot, generation) = split(id);
        if spots
            .slab
            .get(slot)
            .is_none_or(|spot| spot.generation != generation)
        {
            return None;
        }
        let spot = spots.slab.remove(slot);
        spot.parked.link().set_parked_at(0);
        Some(spot)
    }

    /// Resumes a spot taken out, with `unsent` going out first.
    fn resume(&self, spot: Spot<P>, unsent: Option<Bytes>) {
        // Fails harmlessly for a socket not watched yet.
        let _ = self
            .registry
            .deregister(&mut SourceFd(&spot.stream.as_raw_fd()));
        spot.parked.resume(spot.stream, unsent);
    }

    /// Takes out every parked connection that `pick` picks and returns them; their sockets
    /// close (which takes them out of the epoll set too). For a server's shutdown, after the
    /// grace period: the close order normally resumed them all.
    pub fn evict(&self, pick: impl Fn(&P) -> bool) -> Vec<P> {
        self.take_all(pick)
            .into_iter()
            .map(|spot| spot.parked)
            .collect()
    }

    /// Takes out every parked connection that `pick` picks.
    fn take_all(&self, pick: impl Fn(&P) -> bool) -> Vec<Spot<P>> {
        let mut spots = self.spots.lock();
        let picked: Vec<usize> = spots
            .slab
            .iter()
            .filter(|(_, spot)| pick(&spot.parked))
            .map(|(slot, _)| slot)
            .collect();
        picked
            .into_iter()
            .map(|slot| {
                let spot = spots.slab.remove(slot);
                spot.parked.link().set_parked_at(0);
                spot
            })
            .collect()
    }

    /// Writes `wire` to the socket of `link`'s connection if it is parked; `false` if it is
    /// not parked or its socket took nothing (then the caller pushes through the link, which
    /// resumes it).
    pub fn write_parked(&self, link: &Outbound, wire: &[u8]) -> bool {
        // Running connections (most of them, under load) skip the lock.
        if link.parked_at().is_none() {
            return false;
        }
        let mut spots = self.spots.lock();
        let Some(id) = link.parked_at() else {
            return false;
        };
        let (slot, generation) = split(id);
        let Some(spot) = spots.slab.get(slot).filter(|s| s.generation == generation) else {
            return false;
        };
        // Something is queued and about to resume it: the heartbeat must not overtake it.
        if link.has_work() {
            return false;
        }
        match (&spot.stream).write(wire) {
            Ok(n) if n == wire.len() => true,
            // Half a frame is in the socket: the rest must go before anything else, so the
            // connection is taken out in the same breath (no other wake-up may resume it
            // without the rest) and resumes with it.
            Ok(n) if n > 0 => {
                let spot = Self::take(&mut spots, id);
                drop(spots);
                if let Some(spot) = spot {
                    self.resume(spot, Some(Bytes::copy_from_slice(&wire[n..])));
                }
                true
            }
            _ => false,
        }
    }

    /// The lot's thread: waits for parked sockets to become readable, for the process's life.
    fn watch(&self, mut poll: Poll) {
        let mut events = Events::with_capacity(EVENTS_PER_WAIT);
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "parking lot cannot wait for sockets: resuming all");
                self.watching.store(false, Ordering::Release);
                // Nobody reads their sockets any more: back to their tasks, all of them.
                for spot in self.take_all(|_| true) {
                    self.resume(spot, None);
                }
                return;
            }
            for event in &events {
                if event.token() == WAKE_TOKEN {
                    self.resume_woken();
                } else {
                    self.on_readable(event.token().0 as u64);
                }
            }
        }
    }

    fn on_readable(&self, id: u64) {
        let (slot, generation) = split(id);
        let spots = self.spots.lock();
        let Some(spot) = spots.slab.get(slot).filter(|s| s.generation == generation) else {
            return;
        };
        match consume_pongs(&spot.stream) {
            Inbound::Nothing => {}
            // Pongs read where the connection waits count as life, as they would in its task.
            Inbound::Pongs => spot.parked.heard(),
            Inbound::ForTheTask { heard } => {
                if heard {
                    spot.parked.heard();
                }
                drop(spots);
                self.unpark(id, None);
            }
        }
    }
}

/// Reads the client's pongs off a parked socket, and nothing else: at the first byte of
/// anything else it stops and leaves that (and what follows) unread.
fn consume_pongs(stream: &TcpStream) -> Inbound {
    let mut buf = [0u8; PEEK_BYTES];
    let mut heard = false;
    for _ in 0..MAX_LOOKS {
        let n = match stream.peek(&mut buf) {
            Ok(0) => return Inbound::ForTheTask { heard },
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return if heard {
                    Inbound::Pongs
                } else {
                    Inbound::Nothing
                };
            }
            Err(_) => return Inbound::ForTheTask { heard },
        };
        let mut pongs = 0;
        while let Ok(Some(head)) = frame::decode_head(&buf[pongs..n], MAX_CONTROL_PAYLOAD) {
            if head.opcode != opcode::PONG || pongs + head.frame_len() > n {
                break;
            }
            pongs += head.frame_len();
        }
        if pongs < n {
            return Inbound::ForTheTask { heard };
        }
        // Exactly the pongs just peeked: nothing else reads this socket while it is parked.
        if !matches!((&*stream).read(&mut buf[..pongs]), Ok(m) if m == pongs) {
            return Inbound::ForTheTask { heard };
        }
        heard = true;
    }
    // Still more: edge-triggered readiness would not report it again, so the task takes over.
    Inbound::ForTheTask { heard }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::transport::ws::frame::client_frame;

    /// A parked type of no connection, for the lot's own machinery.
    struct Nobody(Outbound);

    static NOBODY_LOT: OnceLock<Lot<Nobody>> = OnceLock::new();

    impl Parked for Nobody {
        fn link(&self) -> &Outbound {
            &self.0
        }
        fn may_park(&self) -> bool {
            true
        }
        fn parked(&self) {}
        fn heard(&self) {}
        fn resume(self, _: TcpStream, _: Option<Bytes>) {}
        fn lot() -> &'static Lot<Self> {
            Lot::get_or_start(&NOBODY_LOT).unwrap()
        }
    }

    /// A connected pair: the server side non-blocking, as a parked socket is.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    /// Looks at `server` until it finds something other than `Nothing` (the bytes written
    /// may take a moment to cross loopback).
    fn look(server: &TcpStream) -> Inbound {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match consume_pongs(server) {
                Inbound::Nothing if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                found => return found,
            }
        }
    }

    fn unread(server: &TcpStream) -> usize {
        let mut buf = [0u8; 1024];
        server.peek(&mut buf).unwrap_or(0)
    }

    #[test]
    fn pongs_are_consumed_and_anything_else_is_left_for_the_task() {
        let (server, mut client) = pair();
        assert_eq!(consume_pongs(&server), Inbound::Nothing);

        let mut pongs = client_frame(true, opcode::PONG, b"");
        pongs.extend(client_frame(true, opcode::PONG, b"beat"));
        client.write_all(&pongs).unwrap();
        assert_eq!(look(&server), Inbound::Pongs);
        assert_eq!(unread(&server), 0, "both pongs consumed");

        // A pong followed by a request: nothing is consumed, the task reads both.
        let mut mixed = client_frame(true, opcode::PONG, b"");
        let request = client_frame(true, opcode::TEXT, br#"{"op":"ping"}"#);
        mixed.extend(&request);
        client.write_all(&mixed).unwrap();
        assert_eq!(look(&server), Inbound::ForTheTask { heard: false });
        let deadline = Instant::now() + Duration::from_secs(10);
        while unread(&server) < mixed.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(unread(&server), mixed.len(), "nothing consumed");
    }

    #[test]
    fn half_a_pong_and_eof_are_left_for_the_task() {
        let (server, mut client) = pair();
        let pong = client_frame(true, opcode::PONG, b"abc");
        client.write_all(&pong[..3]).unwrap();
        assert_eq!(look(&server), Inbound::ForTheTask { heard: false });
        assert_eq!(unread(&server), 3);

        let (server, client) = pair();
        drop(client);
        assert_eq!(look(&server), Inbound::ForTheTask { heard: false });
    }

    #[test]
    fn wake_ups_from_a_plain_thread_reach_the_lot_thread_even_past_the_ready_list() {
        let lot = Nobody::lot();
        assert!(
            lot.watching.load(Ordering::Acquire),
            "the lot's thread runs"
        );
        let overflows = lot.overflows.load(Ordering::Relaxed);
        // Tickets of no parked connection (stale ones, as after a resume): a wake-up from a
        // thread outside any runtime queues them without the lot's lock, the lot's thread
        // drains them and finds nothing to resume. More than the list holds overflow into a
        // scan instead of waiting or being lost.
        {
            // Holding the lot's lock stalls its thread at the first ticket it takes, so the
            // list really fills (a fast lot thread would otherwise keep up with the pushes).
            let _stall = lot.spots.lock();
            std::thread::spawn(move || {
                for i in 0..READY_LIST + 10 {
                    lot.wake(ticket_id(i + (1 << 20), u32::MAX));
                }
            })
            .join()
            .unwrap();
        }
        assert!(lot.overflows.load(Ordering::Relaxed) > overflows);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lot.ready_rx.is_empty() || lot.overflowed.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "the lot's thread never drained its wake-ups"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn tickets_keep_slot_and_generation_apart() {
        let id = ticket_id(12_345, 7);
        assert_eq!(split(id), (12_345, 7));
        assert_ne!(ticket_id(0, 1), 0);
    }
}

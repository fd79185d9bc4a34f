//! `/ws` sessions in the parking lot ([`crate::transport::lot`]): what a quiet session leaves
//! there (the [`Session`], which is everything a connection is apart from its socket), the
//! heartbeat a parked one is sent without being resumed ([`Beat`]), and each server's handle
//! on the process's one lot ([`Parking`]: its runtime, its counters, and whether it still
//! parks). Data flow: the sweep (`liveness`) asks a quiet session to park; its task ends in
//! [`Parking::park`]; a push onto its link, a request or a close resumes it through
//! [`Parked::resume`], which starts a new task on the server's runtime (`super::resume`).

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::{ClientContext, Session};
use crate::dispatch::outbound::{self, Frame, Outbound};
use crate::protocol::close;
use crate::transport::lot::{Lot, Parked};
use crate::transport::ws::frame::{self, opcode};

/// The process's lot of parked sessions, started by the first server.
static LOT: OnceLock<Lot<Session>> = OnceLock::new();

/// Whether this target parks connections (see [`crate::transport::lot::SUPPORTED`]).
pub const SUPPORTED: bool = crate::transport::lot::SUPPORTED;

/// Counters of one server's parked connections.
#[derive(Debug, Default)]
pub struct ParkingStats {
    /// Connections parked now.
    pub parked: AtomicU64,
    /// Times a connection parked.
    pub parks: AtomicU64,
    /// Times a connection was resumed.
    pub unparks: AtomicU64,
    /// Heartbeats written to parked sockets directly.
    pub heartbeats: AtomicU64,
    /// Pongs read from parked sockets (answers to those heartbeats' pings).
    pub pongs: AtomicU64,
    /// Times the liveness sweep asked a quiet connection to park (one that is in the middle
    /// of something declines and is asked again).
    pub park_requests: AtomicU64,
}

/// One server's way into the parking lot.
#[derive(Debug)]
pub struct Parking {
    lot: &'static Lot<Session>,
    /// Where resumed connections run.
    runtime: tokio::runtime::Handle,
    /// The server has ended ([`Parking::evict`]): connections that try to park are dropped.
    closed: AtomicBool,
    /// Counters, for `/metrics` and `/api/stats`.
    pub stats: ParkingStats,
}

/// A heartbeat as it goes out: the shared frame for running connections, and a WebSocket
/// ping plus the same frame, already framed, for parked ones.
#[derive(Debug)]
pub struct Beat {
    frame: Frame,
    wire: Vec<u8>,
}

impl Beat {
    /// Payload bytes of the heartbeat message.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        self.frame.len()
    }

    /// The heartbeat `frame` and its wire form.
    #[must_use]
    pub fn new(frame: Frame) -> Self {
        // Ping first, then the text: the order a running connection writes them in.
        let mut head = [0u8; frame::MAX_HEADER];
        let n = frame::encode_head(opcode::PING, 0, &mut head);
        let mut wire = Vec::with_capacity(n + frame.len() + frame::MAX_HEADER);
        wire.extend_from_slice(&head[..n]);
        outbound::append_text_frame(&mut wire, frame.as_str());
        Self { frame, wire }
    }
}

impl Parking {
    /// A handle for a server whose connections resume on the current tokio runtime; starts
    /// the process's lot if no server has yet.
    ///
    /// # Errors
    /// The epoll set could not be created.
    pub fn start() -> io::Result<Self> {
        Ok(Self {
            lot: Lot::get_or_start(&LOT)?,
            runtime: tokio::runtime::Handle::current(),
            closed: AtomicBool::new(false),
            stats: ParkingStats::default(),
        })
    }

    /// Parks a connection whose task is ending: `stream` must be out of the runtime's reactor
    /// and `session` must have nothing in progress. If anything arrives for it meanwhile, it is
    /// resumed at once.
    pub fn park(&self, session: Session, stream: TcpStream) {
        if let Err((session, stream)) = self.lot.park(session, stream) {
            // The lot cannot take it (no 64-bit tickets, no lot thread): it keeps running.
            let _context = self.runtime.enter();
            drop(self.runtime.spawn(super::resume(session, stream, None)));
        }
    }

    /// The runtime this server's connections run on, for work that must happen in its
    /// context from any thread (a session dropped on the lot's thread, say).
    #[must_use]
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Wake-ups of parked connections that did not fit the lot's ready list (process-wide);
    /// each made the lot's thread look at every parked connection once.
    #[must_use]
    pub fn wake_overflows(&self) -> u64 {
        self.lot.wake_overflows()
    }

    /// Sends the heartbeat to one connection: straight to its socket if it is parked with
    /// nothing queued (no wake-up), through its link otherwise. `true`: written directly
    /// (the link's writer did not see it, so the caller counts it as sent).
    pub fn heartbeat(&self, link: &Outbound, beat: &Beat) -> bool {
        if self.lot.write_parked(link, &beat.wire) {
            self.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if link.push_control(beat.frame.clone()).is_err() {
            let _ = link.kill(close::SLOW_CONSUMER);
        }
        // A WebSocket ping too: browsers answer it with a pong that counts as life.
        link.request_ping();
        false
    }

    /// Drops this server's connections still parked (shutdown, after the grace period: the
    /// close order normally resumed them all). Each session cleans up after itself.
    pub fn evict(&self, ctx: &Arc<ClientContext>) {
        self.closed.store(true, Ordering::Release);
        let evicted = self
            .lot
            .evict(|session| Arc::ptr_eq(session.context(), ctx));
        self.stats
            .parked
            .fetch_sub(evicted.len() as u64, Ordering::Relaxed);
        drop(evicted);
    }
}

impl Parked for Session {
    fn link(&self) -> &Outbound {
        self.outbound()
    }

    fn may_park(&self) -> bool {
        !self.context().parking.closed.load(Ordering::Acquire)
    }

    fn parked(&self) {
        let stats = &self.context().parking.stats;
        stats.parked.fetch_add(1, Ordering::Relaxed);
        stats.parks.fetch_add(1, Ordering::Relaxed);
    }

    fn heard(&self) {
        let ctx = self.context();
        self.receiver().heard(ctx.connections.clock_ms());
        ctx.parking.stats.pongs.fetch_add(1, Ordering::Relaxed);
    }

    fn resume(self, stream: TcpStream, unsent: Option<Bytes>) {
        let ctx = self.context().clone();
        let parking = &ctx.parking;
        parking.stats.parked.fetch_sub(1, Ordering::Relaxed);
        parking.stats.unparks.fetch_add(1, Ordering::Relaxed);
        // On a runtime that is shutting down the task is dropped unrun, and with it the
        // session, which cleans up after itself; in the runtime's context, which that may need
        // (this runs on the lot's thread or a waker's).
        let _context = parking.runtime.enter();
        drop(parking.runtime.spawn(super::resume(self, stream, unsent)));
    }

    fn lot() -> &'static Lot<Self> {
        // Started by `Parking::start` before any session exists, so no error is left to see.
        LOT.get()
            .unwrap_or_else(|| unreachable!("a parked session's lot is started"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_goes_out_as_a_ping_and_one_text_frame() {
        let beat = Beat::new(Frame::from(r#"{"type":"heartbeat"}"#));
        let text = br#"{"type":"heartbeat"}"#;
        assert_eq!(beat.wire[..2], [0x80 | opcode::PING, 0]);
        assert_eq!(beat.wire[2], 0x80 | opcode::TEXT);
        assert_eq!(usize::from(beat.wire[3]), text.len());
        assert_eq!(&beat.wire[4..], text);
    }
}

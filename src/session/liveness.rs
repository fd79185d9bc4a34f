//! One task that keeps every `/ws` connection's liveness, so that no connection carries a timer
//! of its own: it sends the heartbeat (one frame, serialized once and shared by all
//! connections, plus a WebSocket ping request; parked connections get it written straight to
//! their socket), closes connections that have sent nothing for three heartbeats and those
//! that did not authenticate in time, asks connections quiet for `server.park_after_ms` to
//! park (only those that can: not TLS ones), and on shutdown tells every connection to close
//! with 1001. Heartbeats for parked connections are socket writes (one syscall each), so the
//! sweep hands them, as one list, to a blocking-pool thread instead of doing 100k of them in
//! one poll of its task; and it
//! yields every [`YIELD_EVERY`] connections, so a sweep of many running ones does not hold a
//! runtime worker either. Connections enter and leave the set with their [`super::Session`];
//! the sweep reads and writes them only through their `Outbound` link and the parking lot,
//! and never waits on one.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;
use slab::Slab;
use tokio_util::sync::CancellationToken;

use super::parking::{self, Beat};
use super::ClientContext;
use crate::dispatch::outbound::{Frame, Outbound};
use crate::protocol::close;
use crate::tick::now_ms;
use crate::transport::release_memory;

/// Park requests in one sweep after which the next sweep asks the allocator to give memory
/// back: that many tasks ended together, and their memory would otherwise linger.
const RELEASE_AFTER_PARKS: usize = 256;
/// At most one such release per this many ms: under steady park-and-resume churn the memory
/// is reused anyway, and a forced release costs page faults later.
const RELEASE_EVERY_MS: u64 = 30_000;

/// Longest time between sweeps: the resolution of the auth deadline and the idle check.
const MAX_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Connections the sweep looks at between two yields to the runtime.
pub const YIELD_EVERY: usize = 1024;

/// The open connections, by a key each connection holds while it runs.
#[derive(Debug)]
pub struct Connections {
    links: Mutex<Slab<Entry>>,
    started: Instant,
}

/// One connection in the set.
#[derive(Debug, Clone)]
struct Entry {
    link: Outbound,
    /// Whether the connection can park at all (a TLS one cannot): the sweep asks only those,
    /// since a declined request leaves the link as quiet as before and would be repeated, a
    /// wake-up for nothing, on every sweep.
    parks: bool,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            links: Mutex::new(Slab::new()),
            started: Instant::now(),
        }
    }
}

impl Connections {
    /// Milliseconds on the liveness clock (monotonic, from server start).
    #[must_use]
    pub fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Adds a connection's link (`parks`: whether it can ever park); the key removes it
    /// again.
    pub fn insert(&self, link: Outbound, parks: bool) -> usize {
        self.links.lock().insert(Entry { link, parks })
    }

    /// A copy of every entry, to work on without holding the set's lock.
    fn snapshot(&self) -> Vec<Entry> {
        self.links
            .lock()
            .iter()
            .map(|(_, entry)| entry.clone())
            .collect()
    }

    /// Removes a connection's link.
    pub fn remove(&self, key: usize) {
        let mut links = self.links.lock();
        if links.contains(key) {
            links.remove(key);
        }
    }
}

/// Sends the heartbeat to one connection and counts it if it was written directly.
fn beat_one(ctx: &ClientContext, link: &Outbound, beat: &Beat) {
    if ctx.parking.heartbeat(link, beat) {
        ctx.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
        ctx.stats
            .bytes_sent
            .fetch_add(beat.payload_len() as u64, Ordering::Relaxed);
    }
}

/// Runs the sweep until `stop`, then closes every connection with 1001.
pub async fn run(ctx: Arc<ClientContext>, stop: CancellationToken) {
    let heartbeat = Duration::from_millis(ctx.config.server.heartbeat_ms);
    let heartbeat_ms = ctx.config.server.heartbeat_ms;
    // Parking needs 64-bit tickets (see `parking`); elsewhere connections stay on the runtime.
    let park_after_ms = if parking::SUPPORTED {
        ctx.config.server.park_after_ms
    } else {
        0
    };
    let auth_timeout = Duration::from_millis(ctx.config.auth.auth_timeout_ms);
    let period = heartbeat.min(auth_timeout).min(MAX_SWEEP_EVERY);
    let mut every = tokio::time::interval(period);
    // Whole quiet sweep periods that make `server.park_after_ms`.
    let park_sweeps = u16::try_from(
        park_after_ms.div_ceil(u64::try_from(period.as_millis()).unwrap_or(1).max(1)),
    )
    .unwrap_or(u16::MAX);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let connections = &ctx.connections;
    let mut next_beat = connections.clock_ms() + heartbeat_ms;
    let mut parked_last_sweep = 0;
    let mut released_at: Option<u64> = None;
    let mut release_due = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        let now = connections.clock_ms();
        let beat = (now >= next_beat).then(|| {
            next_beat = now + heartbeat_ms;
            Arc::new(Beat::new(Frame::from(
                json!({"type": "heartbeat", "server_time": now_ms()}).to_string(),
            )))
        });
        // Parked connections due a heartbeat: written off the runtime after the loop.
        let mut parked_beats = Vec::new();
        // Work on a copy, so connections opening or closing never wait for a whole sweep.
        let links = connections.snapshot();
        // A burst too soon after the last release waits for the next one, not forever.
        release_due |= parked_last_sweep >= RELEASE_AFTER_PARKS;
        if release_due && released_at.is_none_or(|at| now.saturating_sub(at) >= RELEASE_EVERY_MS) {
            release_memory();
            released_at = Some(now);
            release_due = false;
        }
        parked_last_sweep = 0;
        for (i, Entry { link, parks }) in links.iter().enumerate() {
            if i > 0 && i % YIELD_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            if link.is_closing() {
                continue;
            }
            if link.expire_auth_deadline(now) {
                if link.kill(close::UNAUTHORIZED) {
                    ctx.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
                }
            } else if link.quiet_ms(now) > heartbeat_ms * 3 {
                if link.kill(close::NORMAL) {
                    ctx.stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                if let Some(beat) = &beat {
                    if link.parked_at().is_some() {
                        parked_beats.push(link.clone());
                    } else {
                        // A running connection: a push and a wake, no syscall here.
                        beat_one(&ctx, link, beat);
                    }
                }
                if *parks
                    && park_after_ms > 0
                    && link.parked_at().is_none()
                    && link.quiet_for(park_sweeps)
                {
                    link.request_park();
                    ctx.parking
                        .stats
                        .park_requests
                        .fetch_add(1, Ordering::Relaxed);
                    parked_last_sweep += 1;
                }
            }
        }
        if let (Some(beat), false) = (beat, parked_beats.is_empty()) {
            // Awaited, so sweeps never overlap; the writes take the lot's lock one socket at
            // a time, so pushes and wake-ups interleave with them.
            let ctx = ctx.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for link in &parked_beats {
                    beat_one(&ctx, link, &beat);
                }
            })
            .await;
        }
    }
    // Killed outside the lock: a kill may resume a parked connection, and a session that
    // ends on the spot (its runtime shutting down) removes itself from this set.
    for Entry { link, .. } in connections.snapshot() {
        let _ = link.kill(close::GOING_AWAY);
    }
}

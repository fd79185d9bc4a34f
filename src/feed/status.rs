//! What one upstream's connector publishes and `/health`, `/metrics` and the failover gate
//! read: its state (breaker plus connection), counters, last message time. Written only by
//! its own connector task, read by anyone, all through atomics (the last error behind a
//! short lock), so a scrape never waits on a connection.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{json, Value};

use crate::config::{UpstreamConfig, UpstreamKind};
use crate::tick::now_ms;

use super::breaker::{self, BreakerState};

/// Counters of one upstream (all monotonic).
#[derive(Debug, Default)]
pub struct Counters {
    /// WebSocket data messages received (text or binary).
    pub messages: AtomicU64,
    /// Trades normalized into ticks (before the failover gate and ingest).
    pub ticks: AtomicU64,
    /// Ticks ingest accepted.
    pub accepted: AtomicU64,
    /// Ticks ingest dropped as duplicates (a replay, or the other side of a failover seam).
    pub duplicates: AtomicU64,
    /// Ticks ingest rejected (dead-lettered by ingest, e.g. `stale_timestamp`).
    pub rejected: AtomicU64,
    /// Times ingest refused ticks for backpressure (each batch was retried until taken).
    pub refused: AtomicU64,
    /// Ticks held back because the primary serves their symbol (backup only).
    pub gated: AtomicU64,
    /// Messages (or parts) dead-lettered as garbage, with the upstream's name.
    pub garbage: AtomicU64,
    /// Ids the source skipped (Coinbase/Binance/Kraken trade ids, tickfan seqs).
    pub gaps: AtomicU64,
    /// Connection attempts.
    pub attempts: AtomicU64,
    /// Attempts after a failure (every attempt but the first).
    pub reconnects: AtomicU64,
    /// Times the breaker opened.
    pub breaker_trips: AtomicU64,
    /// Half-open probes.
    pub probes: AtomicU64,
    /// Primary only: times its symbols moved to the backup.
    pub failovers: AtomicU64,
    /// Primary only: times its symbols came back to it.
    pub failbacks: AtomicU64,
    /// Kind tickfan: resumes sent with `since_seq`.
    pub resumes: AtomicU64,
    /// `max_message_bytes` hits (the connection is dropped and retried).
    pub too_big: AtomicU64,
    /// `max_json_depth` hits (dead-lettered).
    pub too_deep: AtomicU64,
    /// `seam_ticks` hits: held-back ticks dropped from the full seam buffer (backup only).
    pub seam_dropped: AtomicU64,
}

/// One upstream's shared status.
#[derive(Debug)]
pub struct Status {
    /// `name`.
    pub name: String,
    /// `kind`.
    pub kind: UpstreamKind,
    /// `url`.
    pub url: String,
    /// `backup_for`.
    pub backup_for: Option<String>,
    /// The tickfan symbols this upstream serves (after `map` and `prefix`).
    pub symbols: Vec<String>,
    /// `stale_ms`.
    pub stale: Duration,
    /// The breaker's published state.
    pub breaker: Arc<AtomicU8>,
    /// A session is up: connected, subscribed, and the upstream answered.
    pub connected: AtomicBool,
    /// Last message (or handshake), ms since `origin`; 0 = never.
    last_seen: AtomicU64,
    /// Last message, wall clock ms (for `/health`); 0 = never.
    pub last_message_ms: AtomicI64,
    /// Counters.
    pub counters: Counters,
    /// Why the last attempt ended.
    pub last_error: Mutex<Option<String>>,
    origin: Instant,
}

impl Status {
    /// A fresh status for `config`, serving `symbols` (tickfan names).
    #[must_use]
    pub fn new(config: &UpstreamConfig, symbols: Vec<String>) -> Self {
        Self {
            name: config.name.clone(),
            kind: config.kind,
            // Shown by /health, which takes no token: a `?token=` in the URL stays out.
            url: crate::auth::redact_query(&config.url).into_owned(),
            backup_for: config.backup_for.clone(),
            symbols,
            stale: Duration::from_millis(config.stale_ms),
            breaker: Arc::new(AtomicU8::new(0)),
            connected: AtomicBool::new(false),
            last_seen: AtomicU64::new(0),
            last_message_ms: AtomicI64::new(0),
            counters: Counters::default(),
            last_error: Mutex::new(None),
            origin: Instant::now(),
        }
    }

    /// Records contact with the upstream (a message, or the handshake).
    pub fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_seen.store(ms.max(1), Ordering::Relaxed);
        self.last_message_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Connected and heard from within `stale_ms`: it serves its symbols.
    #[must_use]
    pub fn live(&self) -> bool {
        if !self.connected.load(Ordering::Acquire) {
            return false;
        }
        let seen = self.last_seen.load(Ordering::Relaxed);
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        seen > 0
            && now.saturating_sub(seen) < u64::try_from(self.stale.as_millis()).unwrap_or(u64::MAX)
    }

    /// `connected`, `connecting`, `open` or `half_open`.
    #[must_use]
    pub fn state(&self) -> &'static str {
        match breaker::load(&self.breaker) {
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Closed if self.connected.load(Ordering::Acquire) => "connected",
            BreakerState::Closed => "connecting",
        }
    }

    /// This upstream's entry in `/health`.
    #[must_use]
    pub fn health(&self) -> Value {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = self.last_message_ms.load(Ordering::Relaxed);
        json!({
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "state": self.state(),
            "live": self.live(),
            "backup_for": self.backup_for,
            "symbols": self.symbols,
            "ticks_received": load(&c.ticks),
            "messages": load(&c.messages),
            "last_message_ms": (last > 0).then_some(last),
            "accepted": load(&c.accepted),
            "duplicates": load(&c.duplicates),
            "rejected": load(&c.rejected),
            "garbage": load(&c.garbage),
            "gaps": load(&c.gaps),
            "reconnects": load(&c.reconnects),
            "breaker_trips": load(&c.breaker_trips),
            "failovers": load(&c.failovers),
            "failbacks": load(&c.failbacks),
            "last_error": *self.last_error.lock(),
        })
    }
}

//! Where the numbers live while the test runs. Connection tasks update a thread-local
//! [`Local`] (counters plus a latency histogram) with no lock and no atomic per message;
//! each thread folds its `Local` into the process-wide [`Shared`] totals at most ten times a
//! second (when the epoch moves), when a connection ends, and when the thread stops. Rare
//! events (closes, errors, failed connects) go straight to mutex-guarded tallies, and the
//! connection lifecycle is a handful of atomics. One load test per process, so these are
//! statics: the thread-stop hook of the runtime has no other way to reach them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex, MutexGuard, OnceLock};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histograms hold (60 s, in µs); larger samples are clamped to it so
/// that a stalled server shows up as a huge max instead of a lost sample.
pub const HIST_MAX_US: u64 = 60_000_000;

/// A latency histogram in µs with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds are valid")
}

/// Latency percentiles in µs (formatted by `report`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// Per-message counters. The same struct serves as the thread-local accumulator and as
/// the process total, so flushing is one `+=`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Text messages received (every type), counted during the measurement only.
    pub messages: u64,
    /// Payload bytes of those messages.
    pub bytes: u64,
    /// Live ticks delivered: `tick` messages plus the ticks inside `batch` messages.
    pub deliveries: u64,
    /// `tick` messages.
    pub tick_msgs: u64,
    /// `batch` messages.
    pub batch_msgs: u64,
    /// `snapshot` messages and the ticks they carried (history, not live deliveries).
    pub snapshot_msgs: u64,
    pub snapshot_ticks: u64,
    /// `heartbeat` messages.
    pub heartbeats: u64,
    /// Seq jumps by more than one (not explained by `conflated`), summed over every
    /// (client, symbol) pair, and the number of ticks those jumps skipped.
    pub gaps: u64,
    pub missing: u64,
    /// Ticks whose seq was <= the previous seq this client saw for the symbol.
    pub duplicates: u64,
    /// Sum of the `conflated` fields (ticks the server skipped on purpose).
    pub conflated: u64,
    /// Ticks for a symbol this client never subscribed to (a routing bug).
    pub unexpected_symbol: u64,
    /// Ticks without a usable `t_in` or `seq`.
    pub malformed_ticks: u64,
    /// Messages that were not JSON objects with a string `type`.
    pub parse_errors: u64,
    /// Binary frames (the protocol only sends text).
    pub binary_msgs: u64,
    /// Messages of a type this client does not know.
    pub other_msgs: u64,
    /// `snapshot` messages with `"gap":true`: the store no longer reached back to the
    /// resume point, so ticks were lost for good. A lossless run must see none.
    pub gap_snapshots: u64,
}

impl AddAssign for Counters {
    fn add_assign(&mut self, o: Self) {
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.deliveries += o.deliveries;
        self.tick_msgs += o.tick_msgs;
        self.batch_msgs += o.batch_msgs;
        self.snapshot_msgs += o.snapshot_msgs;
        self.snapshot_ticks += o.snapshot_ticks;
        self.heartbeats += o.heartbeats;
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.duplicates += o.duplicates;
        self.conflated += o.conflated;
        self.unexpected_symbol += o.unexpected_symbol;
        self.malformed_ticks += o.malformed_ticks;
        self.parse_errors += o.parse_errors;
        self.binary_msgs += o.binary_msgs;
        self.other_msgs += o.other_msgs;
        self.gap_snapshots += o.gap_snapshots;
    }
}

/// What one thread accumulated since its last flush.
struct Local {
    counters: Counters,
    hist: Histogram<u64>,
    /// The [`EPOCH`] value at the last flush; a different global value means "flush now".
    epoch: u64,
}

thread_local! {
    static LOCAL: RefCell<Local> = RefCell::new(Local {
        counters: Counters::default(),
        hist: new_histogram(),
        epoch: 0,
    });
}

/// Process-wide totals, fed by thread flushes.
struct Shared {
    counters: Counters,
    /// Latency samples since the live reporter last looked (for per-second percentiles).
    interval: Histogram<u64>,
    /// Every latency sample already taken out of `interval`.
    total: Histogram<u64>,
}

static SHARED: LazyLock<Mutex<Shared>> = LazyLock::new(|| {
    Mutex::new(Shared {
        counters: Counters::default(),
        interval: new_histogram(),
        total: new_histogram(),
    })
});

/// Bumped by the run loop every 100 ms; threads flush when they notice.
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// Whether ticks are being counted (see [`Phase`]).
static PHASE: AtomicU8 = AtomicU8::new(Phase::Ramp as u8);

/// The test's phases. Ticks and latencies count only in the window and the drain, so that
/// the rates' window is exact and ramp-up noise stays out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Connecting and subscribing.
    Ramp = 0,
    /// The producer window.
    Measure = 1,
    /// After the producer stopped: ticks in flight still count.
    Drain = 2,
    /// Closing; nothing more is counted.
    Done = 3,
}

pub fn set_phase(p: Phase) {
    PHASE.store(p as u8, Relaxed);
}

/// Whether ticks and latencies count now (window or drain).
pub fn measuring() -> bool {
    let p = PHASE.load(Relaxed);
    p == Phase::Measure as u8 || p == Phase::Drain as u8
}

/// Whether the producer window has ended (drain or later).
pub fn window_over() -> bool {
    PHASE.load(Relaxed) >= Phase::Drain as u8
}

fn shared() -> MutexGuard<'static, Shared> {
    // A panic while holding the lock leaves plain numbers behind; keep using them.
    SHARED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on this thread's accumulators, then flushes them if the epoch moved.
pub fn with_local<R>(f: impl FnOnce(&mut Counters, &mut Histogram<u64>) -> R) -> R {
    LOCAL.with(|cell| {
        let mut local = cell.borrow_mut();
        let local = &mut *local;
        let r = f(&mut local.counters, &mut local.hist);
        let now = EPOCH.load(Relaxed);
        if now != local.epoch {
            local.epoch = now;
            flush_local(local);
        }
        r
    })
}

fn flush_local(local: &mut Local) {
    if local.counters == Counters::default() && local.hist.is_empty() {
        return;
    }
    let mut s = shared();
    s.counters += std::mem::take(&mut local.counters);
    if !local.hist.is_empty() {
        // Same bounds on both sides, so add cannot fail.
        let _ = s.interval.add(&local.hist);
        local.hist.reset();
    }
}

/// Flushes this thread's accumulators now (connection end, runtime thread stop).
pub fn flush_thread() {
    // try_with: during thread teardown the thread-local may already be gone.
    let _ = LOCAL.try_with(|cell| {
        if let Ok(mut local) = cell.try_borrow_mut() {
            flush_local(&mut local);
        }
    });
}

/// Asks every thread to flush at its next message.
pub fn bump_epoch() {
    EPOCH.fetch_add(1, Relaxed);
}

/// Totals so far and the latency samples since the previous call (which move on into the
/// total histogram).
pub fn take_interval() -> (Counters, Histogram<u64>) {
    let mut s = shared();
    let interval = std::mem::replace(&mut s.interval, new_histogram());
    s.total = merged([&s.total, &interval]);
    (s.counters, interval)
}

/// The counter totals flushed so far, without touching the latency histograms.
pub fn counters_now() -> Counters {
    shared().counters
}

/// Final totals: counters and every latency sample. Call after the runtime is shut down,
/// so that every worker thread has flushed.
pub fn final_totals() -> (Counters, Histogram<u64>) {
    let (counters, _) = take_interval();
    (counters, shared().total.clone())
}

/// Connection lifecycle counters, updated once or twice per connection.
#[derive(Debug, Default)]
pub struct Conns {
    /// Connection attempts started.
    pub attempted: AtomicU64,
    /// WebSocket handshakes that succeeded.
    pub connected: AtomicU64,
    /// Connections open right now.
    pub open: AtomicI64,
    /// Connections whose subscribe was acknowledged.
    pub subscribed: AtomicU64,
    /// Attempts that never got a WebSocket (refused, timed out, HTTP error).
    pub failed: AtomicU64,
    /// Attempts that reached a final ramp state: subscribed, failed, or closed early.
    pub settled: AtomicU64,
    /// Connections that ended before the test told them to (server close, reset, error).
    pub lost: AtomicU64,
    /// Churn: disconnects the test asked for (`--churn`), and those the clients carried out.
    pub churn_requested: AtomicU64,
    pub churned: AtomicU64,
    /// Reconnects whose resume subscribe was acknowledged (after churn or a loss).
    pub resumed: AtomicU64,
    /// Reconnect attempts that failed (each is retried until the test stops).
    pub reconnect_failures: AtomicU64,
}

pub static CONNS: LazyLock<Conns> = LazyLock::new(Conns::default);

/// The rare-event tallies, each keyed by a code or reason.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Tallies {
    /// Why connection attempts failed (`refused`, `timeout`, `http_503`, ...).
    pub connect_failures: BTreeMap<String, u64>,
    /// Close codes the server sent before the test ended (or `eof`/`reset` without one).
    pub closes: BTreeMap<String, u64>,
    /// `error` messages by `code`.
    pub errors: BTreeMap<String, u64>,
    /// Symbols the subscribe ack rejected, by code.
    pub rejected_symbols: BTreeMap<String, u64>,
    /// `mode` announcements by the mode switched to.
    pub mode_switches: BTreeMap<String, u64>,
    /// How the final close went: `clean`, `timeout`, `error`.
    pub final_close: BTreeMap<String, u64>,
}

/// Which tally to bump.
#[derive(Debug, Clone, Copy)]
pub enum Tally {
    ConnectFailure,
    Close,
    Error,
    RejectedSymbol,
    ModeSwitch,
    FinalClose,
}

static TALLIES: LazyLock<Mutex<Tallies>> = LazyLock::new(|| Mutex::new(Tallies::default()));

pub fn tally(which: Tally, key: &str) {
    let mut t = TALLIES.lock().unwrap_or_else(|e| e.into_inner());
    let map = match which {
        Tally::ConnectFailure => &mut t.connect_failures,
        Tally::Close => &mut t.closes,
        Tally::Error => &mut t.errors,
        Tally::RejectedSymbol => &mut t.rejected_symbols,
        Tally::ModeSwitch => &mut t.mode_switches,
        Tally::FinalClose => &mut t.final_close,
    };
    // get_mut first: the common case must not allocate a key String.
    match map.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            map.insert(key.to_string(), 1);
        }
    }
}

pub fn tallies() -> Tallies {
    TALLIES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// How many live subscribers each symbol has (index = symbol index), for the expected
/// delivery count: incremented on a subscribe ack, decremented when a connection is lost.
static SUBSCRIBERS: OnceLock<Vec<AtomicI64>> = OnceLock::new();

pub fn init_subscribers(symbols: usize) {
    let _ = SUBSCRIBERS.set((0..symbols).map(|_| AtomicI64::new(0)).collect());
}

pub fn add_subscriber(symbol: u32, delta: i64) {
    if let Some(v) = SUBSCRIBERS.get().and_then(|v| v.get(symbol as usize)) {
        v.fetch_add(delta, Relaxed);
    }
}

/// Per symbol, the lowest and highest last seq that lossless clients held when the test
/// stopped (`u64::MAX` / 0 when no client reported the symbol). A symbol whose lowest is
/// below its highest had a client that ended behind: ticks it never received.
static FINAL_SEQ: OnceLock<Vec<(AtomicU64, AtomicU64)>> = OnceLock::new();

pub fn init_final_seqs(symbols: usize) {
    let _ = FINAL_SEQ.set(
        (0..symbols)
            .map(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0)))
            .collect(),
    );
}

pub fn report_final_seq(symbol: u32, seq: u64) {
    if let Some((lo, hi)) = FINAL_SEQ.get().and_then(|v| v.get(symbol as usize)) {
        lo.fetch_min(seq, Relaxed);
        hi.fetch_max(seq, Relaxed);
    }
}

/// (lowest, highest) final seq per symbol; `None` for symbols no client reported.
pub fn final_seqs() -> Vec<Option<(u64, u64)>> {
    FINAL_SEQ
        .get()
        .map(|v| {
            v.iter()
                .map(|(lo, hi)| {
                    let lo = lo.load(Relaxed);
                    (lo != u64::MAX).then(|| (lo, hi.load(Relaxed)))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn subscribers() -> Vec<i64> {
    SUBSCRIBERS
        .get()
        .map(|v| v.iter().map(|a| a.load(Relaxed)).collect())
        .unwrap_or_default()
}

/// Merges histograms of identical bounds (per thread or per connection) into one.
pub fn merged<'a>(parts: impl IntoIterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut out = new_histogram();
    for h in parts {
        // add() only fails when a value exceeds the target's range; ours are identical.
        let _ = out.add(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add() {
        let mut a = Counters {
            deliveries: 2,
            gaps: 1,
            ..Counters::default()
        };
        a += Counters {
            deliveries: 3,
            duplicates: 4,
            ..Counters::default()
        };
        assert_eq!((a.deliveries, a.gaps, a.duplicates), (5, 1, 4));
    }

    #[test]
    fn local_flushes_on_demand() {
        // Runs in its own test thread, so its Local is fresh; totals are shared with other
        // tests, so only check that they grew by at least what this thread recorded.
        std::thread::spawn(|| {
            let (before, _) = take_interval();
            with_local(|c, h| {
                c.deliveries += 7;
                h.record(100).unwrap();
            });
            flush_thread();
            let (after, hist) = final_totals();
            assert!(after.deliveries >= before.deliveries + 7);
            assert!(!hist.is_empty());
        })
        .join()
        .expect("flush thread panicked");
    }
}

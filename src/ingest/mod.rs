//! Ingest: producer bytes in (an `/ingest` frame, a `POST /api/ticks` body, or the simulator),
//! accepted ticks out into the priority queue, and a report back to the producer. Parsing and
//! validation run on the caller's task without locks; only de-duplication, quality scoring and
//! the queue push take the per-server symbol lock, so a refused tick leaves no trace and can be
//! resent. Rejections go to the dead-letter list.

pub mod dedup;
pub mod parse;
pub mod quality;
pub mod validate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use crate::ack::AckGroup;
use crate::auth::SymbolPatterns;
use crate::config::{LimitsConfig, ValidationConfig};
use crate::dlq::{DeadLetter, DeadLetters};
use crate::queue::{PriorityQueue, Queued};
use crate::store::Store;
use crate::tick::{now_us, Symbol, Tick};

use self::dedup::RecentKeys;
use self::parse::{parse_document, Element, ParseError};
use self::quality::QualityState;
pub use self::validate::{Reject, RejectCode, TimeRules};

/// Every symbol's ingest memory. ahash rather than SipHash: the keys are symbol names the
/// server validated, and the map is looked up twice per tick.
pub type SymbolStates = HashMap<Symbol, SymbolIngest, ahash::RandomState>;

/// Per-symbol ingest memory: dedup window and quality history.
#[derive(Debug, Default)]
pub struct SymbolIngest {
    /// Recent tick keys.
    pub recent: RecentKeys,
    /// Scoring history.
    pub quality: QualityState,
}

impl SymbolIngest {
    /// First half of admission: `None` for a duplicate; otherwise scores the tick (sets its
    /// `quality`) and returns its dedup key. Nothing is remembered yet, so a tick that is then
    /// refused downstream leaves no trace and can be resent.
    pub fn check(&self, tick: &mut Tick) -> Option<u64> {
        let key = dedup::key_of(tick);
        if self.recent.contains(key) {
            return None;
        }
        tick.quality = self.quality.score(tick);
        Some(key)
    }

    /// Memory for a symbol seen before this process started: its most recent stored ticks
    /// (up to `window`) fill the dedup window and the quality history, so a tick resent
    /// across a restart (or an import rerun after a crash) is still a duplicate.
    #[must_use]
    pub fn from_store(store: &Store, symbol: &Symbol, window: usize) -> Self {
        let mut state = Self::default();
        let Ok(history) = store.history(symbol.as_str(), window, None) else {
            return state;
        };
        let rules = TimeRules {
            now_ms: 0,
            max_future_ms: i64::MAX / 2,
            max_age_ms: None,
        };
        for json in history.ticks {
            let Ok(text) = std::str::from_utf8(&json) else {
                continue;
            };
            let mut scratch = json.to_vec();
            // The store's own output: one flat object, no depth to fear.
            if let Ok(parsed) = parse_document(&mut scratch, text, usize::MAX) {
                parsed.for_each_element(|e| {
                    if let Element::Object(o) = e {
                        if let Ok(mut t) = validate::validate(&o, rules, 0) {
                            if let Some(key) = state.check(&mut t) {
                                state.commit(key, &t, window);
                            }
                        }
                    }
                });
            };
        }
        state
    }

    /// Second half: remembers a tick that was taken (queued, or stored by import).
    pub fn commit(&mut self, key: u64, tick: &Tick, dedup_window: usize) {
        self.remember(key, tick.price, tick.volume, tick.ts, dedup_window);
    }

    /// `commit` from the few values it needs, for callers that have moved the tick on.
    pub fn remember(&mut self, key: u64, price: f64, volume: f64, ts: i64, dedup_window: usize) {
        self.recent.insert(key, dedup_window);
        self.quality.update(price, volume, ts);
    }
}

/// What a producer refused because store writes fail is told to wait, at least (ms).
const STORE_RETRY_AFTER_MS: u64 = 1_000;
/// The `[limits]` that bound one frame or body: how deep its JSON may nest and how many
/// rejections its ack lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimits {
    /// `limits.max_json_depth`.
    pub max_json_depth: usize,
    /// `limits.max_listed_rejections`.
    pub max_listed_rejections: usize,
}

impl From<&LimitsConfig> for IngestLimits {
    fn from(limits: &LimitsConfig) -> Self {
        Self {
            max_json_depth: limits.max_json_depth,
            max_listed_rejections: limits.max_listed_rejections,
        }
    }
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self::from(&LimitsConfig::default())
    }
}

/// One rejected tick of a frame.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Rejection {
    /// 0-based position in the frame or body.
    pub index: u32,
    /// Reject code.
    pub code: &'static str,
    /// Human message.
    pub message: String,
}

/// Counters for metrics and `/api/stats`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Ticks seen (accepted, duplicate, rejected or refused).
    pub received: AtomicU64,
    /// Ticks accepted into the queue.
    pub accepted: AtomicU64,
    /// Duplicates dropped.
    pub duplicates: AtomicU64,
    /// Ticks refused for backpressure.
    pub refused: AtomicU64,
    /// Of those, ticks refused because store writes were failing (a full disk).
    pub refused_store_failing: AtomicU64,
    /// Rejections by code, indexed like `RejectCode::ALL`.
    pub rejected: [AtomicU64; RejectCode::ALL.len()],
    /// Documents (frames, bodies, lines) refused for nesting past `limits.max_json_depth`.
    pub too_deep: AtomicU64,
    /// Rejections counted in an ack's `rejected_total` but not listed
    /// (`limits.max_listed_rejections`).
    pub unlisted_rejections: AtomicU64,
    /// Rejections of one frame or body past the dead-letter list's capacity, not written to
    /// it (the list could not hold them anyway).
    pub dead_letters_skipped: AtomicU64,
}

impl IngestStats {
    fn reject(&self, code: RejectCode) {
        let i = RejectCode::ALL.iter().position(|c| *c == code).unwrap_or(0);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Rejections summed over codes.
    #[must_use]
    pub fn rejected_total(&self) -> u64 {
        self.rejected
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// What happened to one frame; the producer's ack is built from it once `ack` has settled.
#[derive(Debug)]
pub struct IngestReport {
    /// Ticks accepted into the queue.
    pub accepted: usize,
    /// Duplicates dropped.
    pub duplicates: usize,
    /// Rejected ticks, the first `limits.max_listed_rejections` found, by index.
    pub rejected: Vec<Rejection>,
    /// Rejected ticks in all (listed or not).
    pub rejected_total: usize,
    /// `limits.max_listed_rejections`, for the expired ticks added when settling.
    pub max_listed: usize,
    /// Indices refused for backpressure (not stored, no seq: resend them).
    pub refused: Vec<u32>,
    /// Settles when every accepted tick is stored (or dispatched, without a store).
    pub ack: Arc<AckGroup>,
    /// What to tell a refused producer.
    pub retry_after_ms: u64,
    /// The ticks were refused because store writes are failing, not because the queue is full.
    pub store_failing: bool,
    /// Cluster mode: the ticks were refused because the bus is unavailable (gate closed).
    pub bus_unavailable: bool,
}

/// The ack a producer receives, after the frame's ticks have settled.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IngestAck {
    /// Always `ingest_ack`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Ticks accepted and durably settled.
    pub accepted: usize,
    /// Duplicates dropped.
    pub duplicates: usize,
    /// Rejected ticks (including any that expired in the queue, code `expired`); at most
    /// `limits.max_listed_rejections` of them.
    pub rejected: Vec<Rejection>,
    /// Extension: all rejections of the frame, present only when `rejected` is cut short.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_total: Option<usize>,
    /// Extension: `true` when `rejected` lists only some rejections; absent otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub rejected_truncated: bool,
}

/// The backpressure error sent beside (WebSocket) or instead of (HTTP 503) the ack.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Backpressure {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `backpressure`.
    pub code: &'static str,
    /// Human message.
    pub message: String,
    /// Wait at least this long before resending.
    pub retry_after_ms: u64,
    /// Number of refused ticks.
    pub refused: usize,
    /// Extension: their 0-based indices in the frame, so exactly those can be resent.
    pub refused_indices: Vec<u32>,
}

impl IngestReport {
    /// Whether ticks were refused because the priority queue was full (not because the
    /// store or the bus is failing).
    #[must_use]
    pub fn queue_full(&self) -> bool {
        !self.refused.is_empty() && !self.store_failing && !self.bus_unavailable
    }

    /// Waits until the accepted ticks have settled and builds the ack. Ticks that expired in
    /// the queue are moved from `accepted` to `rejected` with code `expired`.
    pub async fn settle(self) -> (IngestAck, Option<Backpressure>) {
        let expired = self.ack.settled().await;
        let mut rejected = self.rejected;
        let total = self.rejected_total + expired.len();
        let room = self.max_listed.saturating_sub(rejected.len());
        for index in expired.iter().take(room) {
            rejected.push(Rejection {
                index: *index,
                code: RejectCode::Expired.as_str(),
                message: "expired in the queue before dispatch (queue TTL)".into(),
            });
        }
        rejected.sort_by_key(|r| r.index);
        let backpressure = (!self.refused.is_empty()).then(|| Backpressure {
            kind: "error",
            code: "backpressure",
            message: format!(
                "{}: {} tick(s) refused, resend them after retry_after_ms",
                if self.store_failing {
                    "store writes failing (disk full?)"
                } else if self.bus_unavailable {
                    "cluster bus unavailable (NATS down or the stream not answering)"
                } else {
                    "queue full"
                },
                self.refused.len()
            ),
            retry_after_ms: self.retry_after_ms,
            refused: self.refused.len(),
            refused_indices: self.refused,
        });
        let ack = IngestAck {
            kind: "ingest_ack",
            accepted: self.accepted - expired.len(),
            duplicates: self.duplicates,
            rejected_total: (total > rejected.len()).then_some(total),
            rejected_truncated: total > rejected.len(),
            rejected,
        };
        (ack, backpressure)
    }
}

/// The ingest stage of one server.
pub struct Ingestor {
    queue: Arc<PriorityQueue>,
    symbols: Mutex<SymbolStates>,
    dead_letters: Arc<DeadLetters>,
    config: ValidationConfig,
    /// Seeds the memory of symbols seen before a restart.
    store: Option<Store>,
    limits: IngestLimits,
    /// Cluster mode: open while the bus can take ticks; closed, every tick is refused with
    /// `backpressure` (nothing is acked that the bus does not hold).
    gate: Option<Arc<AtomicBool>>,
    /// Counters.
    pub stats: IngestStats,
}

impl Ingestor {
    /// An ingest stage feeding `queue`.
    #[must_use]
    pub fn new(
        config: ValidationConfig,
        queue: Arc<PriorityQueue>,
        dead_letters: Arc<DeadLetters>,
    ) -> Self {
        Self {
            queue,
            symbols: Mutex::new(SymbolStates::default()),
            dead_letters,
            config,
            store: None,
            limits: IngestLimits::default(),
            gate: None,
            stats: IngestStats::default(),
        }
    }

    /// Applies the `[limits]` that bound parsing and the ack (defaults otherwise).
    #[must_use]
    pub fn with_limits(mut self, limits: IngestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Cluster mode: admits ticks only while `gate` is open (the bus is connected).
    #[must_use]
    pub fn with_admission_gate(mut self, gate: Arc<AtomicBool>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Cluster mode: remembers a tick another node accepted (consumed from the bus), so a
    /// resend of it to this node is a duplicate here too and quality scores follow the one
    /// cluster-wide stream.
    pub fn remember_replicated(&self, tick: &Tick) {
        let mut symbols = self.symbols.lock();
        if !symbols.contains_key(&tick.symbol) && symbols.len() >= self.config.max_total_symbols {
            return;
        }
        let window = self.config.dedup_window;
        // Seeded from the store like a producer's first tick of the symbol: after a restart
        // the store knows ticks from before it that nothing else in memory does.
        let state = symbols
            .entry(tick.symbol.clone())
            .or_insert_with(|| self.fresh_symbol(&tick.symbol));
        state.commit(dedup::key_of(tick), tick, window);
    }

    /// Cluster mode: forgets a tick that was admitted but never reached the bus (its publish
    /// expired), so a resend is a new tick instead of a `duplicates` answer.
    pub fn forget_expired(&self, tick: &Tick) {
        if let Some(state) = self.symbols.lock().get_mut(&tick.symbol) {
            state.recent.remove(dedup::key_of(tick));
        }
    }

    /// A symbol's memory when first seen: seeded from the store when there is one.
    fn fresh_symbol(&self, symbol: &Symbol) -> SymbolIngest {
        let window = self.config.dedup_window;
        self.store.as_ref().map_or_else(SymbolIngest::default, |s| {
            SymbolIngest::from_store(s, symbol, window)
        })
    }

    /// Seeds each symbol's dedup and quality memory from `store` the first time it is seen
    /// (one short read per symbol per process), so duplicates are caught across restarts.
    #[must_use]
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Ingests one WebSocket frame: one tick object or an array of them.
    pub fn ingest_frame(&self, bytes: &[u8]) -> IngestReport {
        self.ingest_frame_for(bytes, None)
    }

    /// [`Ingestor::ingest_frame`] for a producer whose token permits only the symbols
    /// `permitted` (`None`: all); ticks for others are rejected `forbidden`.
    pub fn ingest_frame_for(
        &self,
        bytes: &[u8],
        permitted: Option<&SymbolPatterns>,
    ) -> IngestReport {
        let mut batch = self.batch();
        self.parse_into(bytes, &mut batch);
        self.admit(batch, permitted)
    }

    /// As [`Ingestor::ingest_frame`], for a text frame: the transport has checked its UTF-8
    /// already, so it is not scanned a second time (2 % of the worker at 100k ticks/s).
    pub fn ingest_text(&self, text: &str) -> IngestReport {
        self.ingest_text_for(text, None)
    }

    /// [`Ingestor::ingest_text`] for a producer whose token permits only the symbols
    /// `permitted` (`None`: all); ticks for others are rejected `forbidden`.
    pub fn ingest_text_for(&self, text: &str, permitted: Option<&SymbolPatterns>) -> IngestReport {
        let mut batch = self.batch();
        self.parse_text_into(text, &mut batch);
        self.admit(batch, permitted)
    }

    /// When a producer refused now should be read again at the latest: `retry_after_ms` on.
    #[must_use]
    pub fn pause_deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
            + std::time::Duration::from_millis(self.queue.retry_after_ms().max(1))
    }

    /// Waits until the priority queue has room again after a refusal (see
    /// [`PriorityQueue::wait_room`]), or until `deadline` (from
    /// [`Ingestor::pause_deadline`]): a producer whose ticks were refused is not read
    /// meanwhile, so it feels TCP backpressure instead of having every further tick parsed
    /// and refused.
    pub async fn wait_room(&self, deadline: tokio::time::Instant) {
        let _ = tokio::time::timeout_at(deadline, self.queue.wait_room()).await;
    }

    /// Ingests a `POST /api/ticks` body: a JSON array, one object, or NDJSON (one tick, or an
    /// array, per line; blank lines skipped). Indices run over the ticks of the whole body.
    /// Each line is parsed and dropped in turn, and only a bounded part of the rejections is
    /// kept (see [`Batch`]), so memory follows the valid ticks, not the body's line count.
    pub fn ingest_body(&self, bytes: &[u8]) -> IngestReport {
        self.ingest_body_for(bytes, None)
    }

    /// [`Ingestor::ingest_body`] for a producer whose token permits only the symbols
    /// `permitted` (`None`: all); ticks for others are rejected `forbidden`.
    pub fn ingest_body_for(
        &self,
        bytes: &[u8],
        permitted: Option<&SymbolPatterns>,
    ) -> IngestReport {
        let mut batch = self.batch();
        let trimmed = bytes.trim_ascii_start();
        // A multi-line body is NDJSON unless its first line is not JSON by itself and the whole
        // body is (one pretty-printed object); a bad first line is then just a bad line.
        // serde_json's own recursion limit (128) keeps the whole-body check off the stack.
        let one_document = trimmed.first() == Some(&b'[')
            || !has_second_line(trimmed)
            || (!first_line_is_json(trimmed, self.limits.max_json_depth)
                && serde_json::from_slice::<serde::de::IgnoredAny>(trimmed).is_ok());
        if one_document {
            self.parse_into(bytes, &mut batch);
        } else {
            for line in bytes.split(|b| *b == b'\n') {
                if !line.trim_ascii().is_empty() {
                    self.parse_into(line, &mut batch);
                }
            }
        }
        self.admit(batch, permitted)
    }

    fn batch(&self) -> Batch {
        Batch {
            next_index: 0,
            valid: Vec::new(),
            rejections: Rejections {
                listed: Vec::new(),
                total: 0,
                dead: Vec::new(),
                max_listed: self.limits.max_listed_rejections,
                max_dead: self.dead_letters.capacity(),
                received_at: now_us() / 1000,
            },
        }
    }

    /// Parses and validates one JSON document into `batch`.
    fn parse_into(&self, bytes: &[u8], batch: &mut Batch) {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.parse_text_into(text, batch),
            Err(_) => {
                batch.reject(
                    &self.stats,
                    RejectCode::BadJson,
                    "not valid UTF-8".into(),
                    || String::from_utf8_lossy(bytes).into_owned(),
                );
            }
        }
    }

    /// Parses and validates one JSON document, known to be UTF-8, into `batch`.
    fn parse_text_into(&self, text: &str, batch: &mut Batch) {
        let t_in = now_us();
        let rules = TimeRules {
            now_ms: t_in / 1000,
            max_future_ms: self.config.max_future_ms,
            max_age_ms: Some(self.config.max_age_ms),
        };
        let stats = &self.stats;
        let mut scratch = text.as_bytes().to_vec();
        match parse_document(&mut scratch, text, self.limits.max_json_depth) {
            Ok(parsed) => parsed.for_each_element(|element| match element {
                Element::Object(obj) => match validate::validate(&obj, rules, t_in) {
                    Ok(tick) => batch.push_valid(tick),
                    Err(reject) => {
                        batch.reject(stats, reject.code, reject.message, || obj.to_text());
                    }
                },
                Element::NotObject(raw) => {
                    batch.reject(
                        stats,
                        RejectCode::BadJson,
                        "a tick must be a JSON object".into(),
                        || raw,
                    );
                }
            }),
            Err(e) => {
                if matches!(e, ParseError::TooDeep(_)) {
                    stats.too_deep.fetch_add(1, Ordering::Relaxed);
                }
                batch.reject(stats, RejectCode::BadJson, e.to_string(), || {
                    text.to_owned()
                });
            }
        };
    }

    /// De-duplicates, scores and enqueues the valid ticks of a batch.
    fn admit(&self, batch: Batch, permitted: Option<&SymbolPatterns>) -> IngestReport {
        let Batch {
            mut valid,
            mut rejections,
            ..
        } = batch;
        if let Some(permitted) = permitted {
            // Outside the token's `ingest_symbols`: rejected like invalid ticks, so they are
            // counted, listed and dead-lettered (the tick, never the token).
            valid.retain(|(index, tick)| {
                let ok = permitted.allows(tick.symbol.as_str());
                if !ok {
                    let message = format!(
                        "symbol {} is outside the token's ingest_symbols",
                        tick.symbol.as_str()
                    );
                    rejections.add(&self.stats, *index, RejectCode::Forbidden, message, || {
                        tick.to_json()
                    });
                }
                ok
            });
        }
        let ack = Arc::new(AckGroup::new(valid.len()));
        let mut report = IngestReport {
            accepted: 0,
            duplicates: 0,
            rejected: Vec::new(),
            rejected_total: 0,
            max_listed: rejections.max_listed,
            refused: Vec::new(),
            ack: ack.clone(),
            retry_after_ms: self.queue.retry_after_ms(),
            store_failing: self.store.as_ref().is_some_and(Store::is_failing),
            bus_unavailable: self
                .gate
                .as_ref()
                .is_some_and(|g| !g.load(Ordering::Acquire)),
        };
        if report.store_failing {
            // Nothing new is accepted while the store cannot write: what it holds already is
            // retried, and the producer resends these once it recovers.
            report.retry_after_ms = report.retry_after_ms.max(STORE_RETRY_AFTER_MS);
            for (index, _) in &valid {
                report.refused.push(*index);
                ack.settle();
            }
            self.stats
                .refused_store_failing
                .fetch_add(valid.len() as u64, Ordering::Relaxed);
        } else if !valid.is_empty() {
            let now = Instant::now();
            let mut symbols = self.symbols.lock();
            for (index, tick) in valid {
                let outcome = self.admit_one(&mut symbols, tick, index, &ack, now);
                match outcome {
                    Admission::Accepted => report.accepted += 1,
                    Admission::Duplicate => {
                        report.duplicates += 1;
                        ack.settle();
                    }
                    Admission::Refused => {
                        report.refused.push(index);
                        ack.settle();
                    }
                    Admission::Rejected(reject, raw) => {
                        rejections.add(&self.stats, index, reject.code, reject.message, || raw);
                        ack.settle();
                    }
                }
            }
        }
        let stats = &self.stats;
        rejections.listed.sort_by_key(|r| r.index);
        report.rejected_total = rejections.total;
        report.rejected = rejections.listed;
        let unlisted = rejections.total - report.rejected.len();
        stats
            .unlisted_rejections
            .fetch_add(unlisted as u64, Ordering::Relaxed);
        let seen = report.accepted + report.duplicates + rejections.total + report.refused.len();
        stats.received.fetch_add(seen as u64, Ordering::Relaxed);
        stats
            .accepted
            .fetch_add(report.accepted as u64, Ordering::Relaxed);
        stats
            .duplicates
            .fetch_add(report.duplicates as u64, Ordering::Relaxed);
        stats
            .refused
            .fetch_add(report.refused.len() as u64, Ordering::Relaxed);
        if !rejections.dead.is_empty() {
            self.dead_letters.extend(rejections.dead);
        }
        report
    }

    fn admit_one(
        &self,
        symbols: &mut SymbolStates,
        mut tick: Tick,
        index: u32,
        ack: &Arc<AckGroup>,
        now: Instant,
    ) -> Admission {
        if !symbols.contains_key(&tick.symbol) {
            if symbols.len() >= self.config.max_total_symbols {
                let reject = Reject {
                    code: RejectCode::InvalidSymbol,
                    message: format!(
                        "symbol limit reached ({} symbols, validation.max_total_symbols)",
                        self.config.max_total_symbols
                    ),
                };
                return Admission::Rejected(reject, tick.to_json());
            }
            let fresh = self.fresh_symbol(&tick.symbol);
            symbols.insert(tick.symbol.clone(), fresh);
        }
        let window = self.config.dedup_window;
        // Looked up again rather than through `entry`, which takes a key to keep: a clone of
        // the symbol (an atomic increment, and a decrement when the key is already there)
        // per tick, 2.6 % of the worker at 100k ticks/s.
        let state = symbols
            .get_mut(&tick.symbol)
            .expect("a missing symbol was inserted above");
        let Some(key) = state.check(&mut tick) else {
            return Admission::Duplicate;
        };
        if self
            .gate
            .as_ref()
            .is_some_and(|g| !g.load(Ordering::Acquire))
        {
            return Admission::Refused;
        }
        // The tick moves into the queue; only these are needed to remember it afterwards.
        let (price, volume, ts) = (tick.price, tick.volume, tick.ts);
        let queued = Queued {
            tick,
            ack: Some(ack.clone()),
            index,
            enqueued: now,
        };
        match self.queue.push(queued) {
            Ok(()) => {
                state.remember(key, price, volume, ts, window);
                Admission::Accepted
            }
            Err(_) => Admission::Refused,
        }
    }
}

enum Admission {
    Accepted,
    Duplicate,
    Refused,
    /// With the tick's JSON for the dead-letter list.
    Rejected(Reject, String),
}

/// Ticks of one frame or body between parsing and admission, with running indices.
struct Batch {
    next_index: u32,
    valid: Vec<(u32, Tick)>,
    rejections: Rejections,
}

impl Batch {
    fn push_valid(&mut self, tick: Tick) {
        self.valid.push((self.next_index, tick));
        self.next_index = self.next_index.saturating_add(1);
    }

    fn reject(
        &mut self,
        stats: &IngestStats,
        code: RejectCode,
        message: String,
        raw: impl FnOnce() -> String,
    ) {
        self.rejections
            .add(stats, self.next_index, code, message, raw);
        self.next_index = self.next_index.saturating_add(1);
    }
}

/// The rejections of one frame or body, bounded whatever the body holds: every one is
/// counted (per code in the stats, and in `total`), the first `max_listed` are listed in the
/// ack and the first `max_dead` become dead letters. Past those bounds a rejection costs no
/// memory; even its raw text is never built.
struct Rejections {
    listed: Vec<Rejection>,
    total: usize,
    dead: Vec<DeadLetter>,
    max_listed: usize,
    max_dead: usize,
    received_at: i64,
}

impl Rejections {
    fn add(
        &mut self,
        stats: &IngestStats,
        index: u32,
        code: RejectCode,
        message: String,
        raw: impl FnOnce() -> String,
    ) {
        stats.reject(code);
        self.total += 1;
        if self.dead.len() < self.max_dead {
            self.dead.push(DeadLetter::new(
                code.as_str(),
                message.clone(),
                raw(),
                self.received_at,
            ));
        } else {
            stats.dead_letters_skipped.fetch_add(1, Ordering::Relaxed);
        }
        if self.listed.len() < self.max_listed {
            self.listed.push(Rejection {
                index,
                code: code.as_str(),
                message,
            });
        }
    }
}

/// Whether the first line is a JSON document by itself; if not, a multi-line body is one
/// pretty-printed document rather than NDJSON.
fn first_line_is_json(bytes: &[u8], max_depth: usize) -> bool {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    if crate::json_depth::check(line, max_depth).is_err() {
        return false;
    }
    let mut scratch = line.to_vec();
    simd_json::to_borrowed_value(&mut scratch).is_ok()
        || serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok()
}

/// Whether non-blank text follows the first line (NDJSON rather than one document).
fn has_second_line(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .position(|b| *b == b'\n')
        .is_some_and(|nl| !bytes[nl..].trim_ascii().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QueueConfig;
    use crate::tick::{now_ms, Priority};

    fn ingestor(capacity: usize) -> (Ingestor, Arc<PriorityQueue>, Arc<DeadLetters>) {
        let queue = Arc::new(PriorityQueue::new(&QueueConfig {
            capacity,
            ..QueueConfig::default()
        }));
        let dlq = Arc::new(DeadLetters::new(100));
        let ing = Ingestor::new(ValidationConfig::default(), queue.clone(), dlq.clone());
        (ing, queue, dlq)
    }

    fn tick(sym: &str, price: f64, extra: &str) -> String {
        format!(
            r#"{{"symbol":"{sym}","ts":{},"price":{price},"volume":1{extra}}}"#,
            now_ms()
        )
    }

    #[test]
    fn array_frame_with_mixed_ticks() {
        let (ing, queue, dlq) = ingestor(100);
        let frame = format!(
            "[{},{},{},7]",
            tick("A", 1.0, ""),
            tick("A", -1.0, ""),
            tick("B", 2.0, r#","id":"x""#)
        );
        let r = ing.ingest_frame(frame.as_bytes());
        assert_eq!(r.accepted, 2);
        assert_eq!(
            r.rejected
                .iter()
                .map(|r| (r.index, r.code))
                .collect::<Vec<_>>(),
            vec![(1, "invalid_price"), (3, "bad_json")]
        );
        assert_eq!(queue.depth(), 2);
        assert_eq!(dlq.len(), 2);
        assert_eq!(dlq.recent(1)[0].raw, "7");
    }

    #[test]
    fn duplicates_by_id_and_by_content() {
        let (ing, queue, _) = ingestor(100);
        let with_id = tick("A", 1.0, r#","id":42"#);
        let plain = tick("A", 5.0, "");
        let frame = format!("[{with_id},{plain},{with_id},{plain}]");
        let r = ing.ingest_frame(frame.as_bytes());
        assert_eq!((r.accepted, r.duplicates), (2, 2));
        let again = ing.ingest_frame(with_id.as_bytes());
        assert_eq!(again.duplicates, 1);
        assert_eq!(queue.depth(), 2);
    }

    #[test]
    fn refused_ticks_are_reported_and_may_be_resent() {
        let (ing, queue, _) = ingestor(4);
        let frame = format!(
            "[{},{},{},{},{}]",
            tick("A", 1.0, r#","priority":"low""#),
            tick("A", 2.0, r#","priority":"low""#),
            tick("A", 3.0, r#","priority":"low""#),
            tick("A", 4.0, r#","priority":"critical""#),
            tick("A", 5.0, r#","priority":"low""#),
        );
        let r = ing.ingest_frame(frame.as_bytes());
        // low admitted up to 70% of 4 = 2 ticks; critical still fits.
        assert_eq!(r.accepted, 3);
        assert_eq!(r.refused, vec![2, 4]);
        let drained = queue.drain_round(Instant::now());
        assert_eq!(drained.ready[0].tick.priority, Priority::Critical);
        let resend = ing.ingest_frame(tick("A", 3.0, r#","priority":"low""#).as_bytes());
        assert_eq!(
            resend.accepted, 1,
            "a refused tick was not remembered as seen"
        );
    }

    #[test]
    fn ndjson_body_indices_and_bad_lines() {
        let (ing, _, _) = ingestor(100);
        let body = format!(
            "{}\nnot json\n\n[{},{}]\n",
            tick("A", 1.0, ""),
            tick("B", 1.0, ""),
            tick("C", 0.0, "")
        );
        let r = ing.ingest_body(body.as_bytes());
        assert_eq!(r.accepted, 2);
        assert_eq!(
            r.rejected
                .iter()
                .map(|r| (r.index, r.code))
                .collect::<Vec<_>>(),
            vec![(1, "bad_json"), (3, "invalid_price")]
        );
    }

    #[test]
    fn rejections_are_listed_up_to_the_limit_and_all_counted() {
        let (ing, _, dlq) = ingestor(100);
        let ing = ing.with_limits(IngestLimits {
            max_json_depth: 8,
            max_listed_rejections: 3,
        });
        let body = format!("{}\n{}", tick("A", 1.0, ""), "{}\n".repeat(1_000));
        let r = ing.ingest_body(body.as_bytes());
        assert_eq!(r.accepted, 1);
        assert_eq!(r.rejected_total, 1_000);
        assert_eq!(
            r.rejected.iter().map(|r| r.index).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        // The dead-letter list (capacity 100) gets no more than it can hold.
        assert_eq!(dlq.len(), 100);
        assert_eq!(ing.stats.dead_letters_skipped.load(Ordering::Relaxed), 900);
        assert_eq!(ing.stats.unlisted_rejections.load(Ordering::Relaxed), 997);
        assert_eq!(ing.stats.rejected_total(), 1_000);
        let deep = format!("{}{}", "[".repeat(9), "]".repeat(9));
        let r = ing.ingest_frame(deep.as_bytes());
        assert_eq!(r.rejected[0].code, "bad_json");
        assert_eq!(ing.stats.too_deep.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_truncated_list_says_so_in_the_ack() {
        let (ing, _, _) = ingestor(100);
        let ing = ing.with_limits(IngestLimits {
            max_json_depth: 8,
            max_listed_rejections: 2,
        });
        let (ack, _) = ing.ingest_frame(b"[1,2,3]").settle().await;
        let v = serde_json::to_value(&ack).unwrap();
        assert_eq!(v["rejected"].as_array().unwrap().len(), 2);
        assert_eq!(v["rejected_total"], 3);
        assert_eq!(v["rejected_truncated"], true);
        let (ack, _) = ing.ingest_frame(b"[1]").settle().await;
        let v = serde_json::to_value(&ack).unwrap();
        assert!(v.get("rejected_total").is_none() && v.get("rejected_truncated").is_none());
    }

    #[test]
    fn pretty_printed_single_object_body() {
        let (ing, _, _) = ingestor(100);
        let body = format!(
            "{{\n \"symbol\":\"A\",\n \"ts\":{},\n \"price\":1,\n \"volume\":2\n}}",
            now_ms()
        );
        assert_eq!(ing.ingest_body(body.as_bytes()).accepted, 1);
    }

    #[tokio::test]
    async fn ack_waits_for_settlement_and_reports_expiry() {
        let (ing, queue, _) = ingestor(100);
        let r =
            ing.ingest_frame(format!("[{},{}]", tick("A", 1.0, ""), tick("A", 2.0, "")).as_bytes());
        let ack = r.ack.clone();
        let waiter = tokio::spawn(r.settle());
        let drained = queue.drain_round(Instant::now());
        assert!(!waiter.is_finished());
        ack.settle();
        ack.expire(drained.ready[1].index);
        let (ack_msg, bp) = waiter.await.unwrap();
        assert!(bp.is_none());
        assert_eq!(ack_msg.accepted, 1);
        assert_eq!(ack_msg.rejected[0].code, "expired");
    }

    #[test]
    fn quality_drops_on_a_big_jump() {
        let (ing, queue, _) = ingestor(100);
        ing.ingest_frame(tick("A", 100.0, "").as_bytes());
        ing.ingest_frame(tick("A", 160.0, "").as_bytes());
        let d = queue.drain_round(Instant::now());
        assert!(d.ready[0].tick.quality >= 90);
        assert!(d.ready[1].tick.quality < 70);
    }
}

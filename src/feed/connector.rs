//! One upstream's connector task: breaker permit -> connect (tokio-tungstenite; rustls for
//! `wss://`) -> subscribe -> read messages -> normalize -> failover gate -> tick JSON frame ->
//! `Ingestor::ingest_frame`, the same call producers and the simulator make, so validation,
//! quality, dedup, the priority queue, the store and (clustered) the bus all apply. A failed
//! session (refused, closed, stale, too big, handshake error) feeds the breaker and waits a
//! jittered exponential delay (`backon`) before the next attempt.
//!
//! Bounds: one WebSocket message (and frame) is at most `max_message_bytes`; JSON nesting is
//! checked against `max_json_depth` before parsing; messages already received are batched up
//! to `max_batch_ticks` ticks per ingest frame, and a batch ingest refuses for backpressure is
//! retried before anything more is read, so an upstream that outruns the queue meets TCP
//! backpressure rather than a growing buffer; a backup's held-back ticks are capped at
//! `seam_ticks`. Garbage is dead-lettered with the upstream's name and never ends a session.

use std::collections::VecDeque;

use ahash::{AHashMap as HashMap, AHashSet as HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use crate::config::UpstreamConfig;
use crate::dlq::{DeadLetter, DeadLetters};
use crate::ingest::Ingestor;
use crate::tick::now_ms;

use super::breaker::{Breaker, Permit};
use super::normalize::{self, Emit, Event, Gap, Garbage, SourceState, Symbols, Trade, TradeRef};
use super::status::Status;

/// Raw text kept from a garbage message for its dead letter (the list truncates to 2 KiB).
const GARBAGE_RAW_BYTES: usize = 2_048;

/// How a session ended.
enum Ended {
    Stopped,
    Failed(String),
}

/// Everything one connector task owns.
pub struct Connector {
    config: UpstreamConfig,
    status: Arc<Status>,
    /// Backup only: the primary's status and the tickfan symbols it serves.
    primary: Option<(Arc<Status>, HashSet<String>)>,
    /// Primary only: some upstream is its backup (failovers are counted and logged).
    has_backups: bool,
    ingestor: Arc<Ingestor>,
    dead_letters: Arc<DeadLetters>,
    symbols: Symbols,
    /// Source symbol -> the tickfan symbol as a JSON string literal (valid names only).
    mapping: HashMap<String, String>,
    stop: CancellationToken,
}

/// Ticks waiting for one ingest frame, plus a backup's held-back ones.
struct Batch {
    /// `[` followed by comma-separated tick objects; `]` is added at ingest.
    frame: String,
    spans: Vec<(usize, usize)>,
    seam: VecDeque<String>,
}

impl Batch {
    fn new() -> Self {
        Self {
            frame: String::from("["),
            spans: Vec::new(),
            seam: VecDeque::new(),
        }
    }

    fn push(&mut self, tick: &str) {
        self.write(|frame| frame.push_str(tick));
    }

    /// Appends one tick written in place by `f` (no copy).
    fn write(&mut self, f: impl FnOnce(&mut String)) {
        if !self.spans.is_empty() {
            self.frame.push(',');
        }
        let start = self.frame.len();
        f(&mut self.frame);
        self.spans.push((start, self.frame.len()));
    }

    fn clear(&mut self) {
        self.frame.truncate(1);
        self.spans.clear();
    }
}

impl Connector {
    /// A connector for `config`; `primary` when it is a backup.
    #[must_use]
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: UpstreamConfig,
        status: Arc<Status>,
        primary: Option<(Arc<Status>, HashSet<String>)>,
        has_backups: bool,
        ingestor: Arc<Ingestor>,
        dead_letters: Arc<DeadLetters>,
        mapping: HashMap<String, String>,
        stop: CancellationToken,
    ) -> Self {
        let symbols = Symbols::new(&config.symbols);
        Self {
            config,
            status,
            primary,
            has_backups,
            ingestor,
            dead_letters,
            symbols,
            mapping,
            stop,
        }
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.config.reconnect_min_ms))
            .with_max_delay(Duration::from_millis(self.config.reconnect_max_ms))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    fn count(&self, counter: impl Fn(&super::status::Counters) -> &AtomicU64, n: u64) {
        counter(&self.status.counters).fetch_add(n, Ordering::Relaxed);
    }

    /// Runs until the stop token is cancelled.
    pub async fn run(self) {
        let name = self.status.name.clone();
        let mut breaker = Breaker::new(
            self.config.failure_threshold,
            Duration::from_millis(self.config.cooldown_ms),
            self.status.breaker.clone(),
        );
        let mut backoff = self.backoff();
        let mut state = SourceState::default();
        let mut batch = Batch::new();
        let mut first = true;
        loop {
            match breaker.permit(Instant::now()) {
                Permit::Wait(d) => {
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(d) => continue,
                    }
                }
                Permit::Probe => {
                    self.count(|c| &c.probes, 1);
                    tracing::info!(upstream = %name, "upstream breaker half-open: probing");
                }
                Permit::Attempt => {}
            }
            if !first {
                self.count(|c| &c.reconnects, 1);
            }
            first = false;
            self.count(|c| &c.attempts, 1);
            let ended = self
                .session(&mut state, &mut batch, &mut breaker, &mut backoff)
                .await;
            self.set_connected(false);
            match ended {
                Ended::Stopped => return,
                Ended::Failed(why) => {
                    tracing::warn!(upstream = %name, reason = %why, "upstream session ended");
                    *self.status.last_error.lock() = Some(why);
                    if breaker.failure(Instant::now()) {
                        self.count(|c| &c.breaker_trips, 1);
                        tracing::warn!(
                            upstream = %name,
                            failures = breaker.failures(),
                            cooldown_ms = self.config.cooldown_ms,
                            "upstream breaker open"
                        );
                        continue;
                    }
                    let delay = backoff
                        .next()
                        .unwrap_or(Duration::from_millis(self.config.reconnect_max_ms));
                    tokio::select! {
                        () = self.stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Publishes the connection state; a primary with backups logs and counts the switch.
    fn set_connected(&self, up: bool) {
        let was = self.status.connected.swap(up, Ordering::AcqRel);
        if was == up || !self.has_backups {
            return;
        }
        let name = &self.status.name;
        if up {
            // Only a return after a failover is a failback; the first connect is not.
            if self.status.counters.failovers.load(Ordering::Relaxed)
                > self.status.counters.failbacks.load(Ordering::Relaxed)
            {
                self.count(|c| &c.failbacks, 1);
                tracing::warn!(upstream = %name, "failback: primary serves its symbols again");
            }
        } else {
            self.count(|c| &c.failovers, 1);
            tracing::warn!(upstream = %name, "failover: primary down, its backup serves its symbols");
        }
    }

    /// One connection, until it fails or the connector stops. The first answer from the
    /// upstream (a subscribe reply, heartbeat or trade) closes the breaker and restarts the
    /// backoff: the upstream works again.
    async fn session(
        &self,
        state: &mut SourceState,
        batch: &mut Batch,
        breaker: &mut Breaker,
        backoff: &mut ExponentialBackoff,
    ) -> Ended {
        let mut worked = false;
        let limit = Some(self.config.max_message_bytes);
        let ws_config = WebSocketConfig::default()
            .max_message_size(limit)
            .max_frame_size(limit);
        let connect = tokio_tungstenite::connect_async_with_config(
            self.config.url.as_str(),
            Some(ws_config),
            true,
        );
        let timeout = Duration::from_millis(self.config.connect_timeout_ms);
        let mut ws = tokio::select! {
            () = self.stop.cancelled() => return Ended::Stopped,
            r = tokio::time::timeout(timeout, connect) => match r {
                Err(_) => return Ended::Failed(format!("connect timed out after {} ms", self.config.connect_timeout_ms)),
                Ok(Err(e)) => return Ended::Failed(format!("connect: {e}")),
                Ok(Ok((ws, _))) => ws,
            },
        };
        self.status.touch();
        for msg in normalize::subscribe_messages(self.config.kind, &self.config.symbols) {
            if let Err(e) = ws.send(Message::text(msg)).await {
                return Ended::Failed(format!("subscribe: {e}"));
            }
        }
        let stale = self.status.stale;
        let mut replies = Vec::new();
        loop {
            let next = tokio::select! {
                () = self.stop.cancelled() => {
                    // A polite close, but shutdown does not wait on a stuck upstream.
                    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                    return Ended::Stopped;
                }
                r = tokio::time::timeout(stale, ws.next()) => r,
            };
            let mut msg = match next {
                Err(_) => {
                    return Ended::Failed(format!("stale: no message for {} ms", stale.as_millis()))
                }
                Ok(r) => r,
            };
            // This message, then whatever else has already arrived, up to one batch.
            let ending = loop {
                let m = match msg {
                    None => break Some("connection ended".to_owned()),
                    Some(Err(e)) => break Some(self.read_error(&e)),
                    Some(Ok(m)) => m,
                };
                self.status.touch();
                match self.handle(m, state, batch, &mut replies) {
                    Ok(true) if !worked => {
                        // Connected means subscribed and answered: only then does a primary
                        // take its symbols back from a backup.
                        worked = true;
                        breaker.success();
                        *backoff = self.backoff();
                        self.set_connected(true);
                        tracing::info!(upstream = %self.status.name, url = %crate::auth::redact_query(&self.config.url), "upstream connected");
                    }
                    Ok(_) => {}
                    Err(why) => break Some(why),
                }
                if batch.spans.len() >= self.config.max_batch_ticks {
                    break None;
                }
                match ws.next().now_or_never() {
                    Some(next) => msg = next,
                    None => break None,
                }
            };
            if !self.flush(batch).await {
                return Ended::Stopped;
            }
            for reply in replies.drain(..) {
                if let Err(e) = ws.send(Message::text(reply)).await {
                    return Ended::Failed(format!("send: {e}"));
                }
            }
            if let Some(why) = ending {
                return Ended::Failed(why);
            }
        }
    }

    fn read_error(&self, e: &WsError) -> String {
        if matches!(e, WsError::Capacity(_)) {
            self.count(|c| &c.too_big, 1);
            format!(
                "message over max_message_bytes ({}): {e}",
                self.config.max_message_bytes
            )
        } else {
            format!("read: {e}")
        }
    }

    /// Handles one message. `Ok(true)`: the upstream answered as its protocol says (the
    /// session works); `Err`: the session must end (a close).
    fn handle(
        &self,
        msg: Message,
        state: &mut SourceState,
        batch: &mut Batch,
        replies: &mut Vec<String>,
    ) -> Result<bool, String> {
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Binary(b) => match std::str::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    self.count(|c| &c.messages, 1);
                    self.garbage(
                        &Garbage {
                            code: "bad_json",
                            message: "binary message is not UTF-8".into(),
                            too_deep: false,
                        },
                        &String::from_utf8_lossy(b),
                    );
                    return Ok(false);
                }
            },
            Message::Close(frame) => {
                return Err(match frame {
                    Some(f) => format!("closed by upstream: {} {}", u16::from(f.code), f.reason),
                    None => "closed by upstream".to_owned(),
                })
            }
            // tungstenite answers pings itself; any frame is contact (touched above).
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(false),
        };
        self.count(|c| &c.messages, 1);
        let mut sink = Sink {
            conn: self,
            batch,
            raw: text,
            gated: self.primary.as_ref().is_some_and(|(p, _)| p.live()),
        };
        let event = normalize::normalize(
            self.config.kind,
            text,
            self.config.max_json_depth,
            &self.symbols,
            state,
            &mut sink,
        );
        match event {
            Err(g) => {
                self.garbage(&g, text);
                Ok(false)
            }
            Ok(Event::Welcome(epoch)) => {
                if state.epoch.is_some_and(|e| e != epoch) {
                    tracing::warn!(upstream = %self.status.name, epoch, "upstream tickfan has a new epoch: resuming from scratch");
                    state.reset();
                }
                state.epoch = Some(epoch);
                if !state.last_seqs().is_empty() {
                    self.count(|c| &c.resumes, 1);
                }
                replies.push(normalize::tickfan_subscribe(&self.config.symbols, state));
                Ok(true)
            }
            Ok(Event::SourceError(why)) => {
                tracing::warn!(upstream = %self.status.name, error = %why, "upstream reported an error");
                self.dead_letter("upstream_error", &why, text);
                Ok(false)
            }
            Ok(_) => Ok(true),
        }
    }

    fn garbage(&self, g: &Garbage, raw: &str) {
        if g.too_deep {
            self.count(|c| &c.too_deep, 1);
        }
        tracing::debug!(upstream = %self.status.name, code = g.code, message = %g.message, "upstream garbage");
        self.dead_letter(g.code, &g.message, raw);
    }

    fn dead_letter(&self, code: &str, message: &str, raw: &str) {
        self.count(|c| &c.garbage, 1);
        let mut cut = raw.len().min(GARBAGE_RAW_BYTES);
        while !raw.is_char_boundary(cut) {
            cut -= 1;
        }
        self.dead_letters.extend([DeadLetter::new(
            code,
            format!("upstream {}: {message}", self.status.name),
            raw[..cut].to_owned(),
            now_ms(),
        )]);
    }

    /// Hands the batch to ingest; ticks refused for backpressure are retried after the
    /// queue's `retry_after_ms` (nothing more is read meanwhile). `false` when stopped.
    async fn flush(&self, batch: &mut Batch) -> bool {
        while !batch.spans.is_empty() {
            batch.frame.push(']');
            let report = self.ingestor.ingest_frame(batch.frame.as_bytes());
            batch.frame.pop();
            self.count(|c| &c.accepted, report.accepted as u64);
            self.count(|c| &c.duplicates, report.duplicates as u64);
            self.count(|c| &c.rejected, report.rejected_total as u64);
            if let Some(first) = report.rejected.first() {
                tracing::debug!(upstream = %self.status.name, code = first.code, message = %first.message, total = report.rejected_total, "ingest rejected upstream ticks");
            }
            if report.refused.is_empty() {
                batch.clear();
                return true;
            }
            self.count(|c| &c.refused, 1);
            let mut kept = String::from("[");
            let mut spans = Vec::with_capacity(report.refused.len());
            for i in &report.refused {
                let (a, b) = batch.spans[*i as usize];
                if !spans.is_empty() {
                    kept.push(',');
                }
                let start = kept.len();
                kept.push_str(&batch.frame[a..b]);
                spans.push((start, kept.len()));
            }
            batch.frame = kept;
            batch.spans = spans;
            let wait = Duration::from_millis(report.retry_after_ms.max(1));
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = tokio::time::sleep(wait) => {}
            }
        }
        true
    }
}

/// Writes normalized trades as tick JSON into the batch (or a backup's seam buffer).
struct Sink<'a> {
    conn: &'a Connector,
    batch: &'a mut Batch,
    /// The message, for dead letters.
    raw: &'a str,
    /// Backup only: the primary is live, so its symbols are held back.
    gated: bool,
}

impl Emit for Sink<'_> {
    fn trade(&mut self, trade: Trade<'_>) {
        let conn = self.conn;
        conn.count(|c| &c.ticks, 1);
        let Some(symbol) = conn.mapping.get(trade.symbol) else {
            // A configured symbol whose tickfan name is invalid (logged at start).
            return;
        };
        if let Some((_, served)) = &conn.primary {
            let held = self.gated && served.contains(&symbol[1..symbol.len() - 1]);
            if held {
                let mut json = String::with_capacity(128);
                write_tick(&mut json, symbol, &trade);
                conn.count(|c| &c.gated, 1);
                if self.batch.seam.len() >= conn.config.seam_ticks {
                    self.batch.seam.pop_front();
                    conn.count(|c| &c.seam_dropped, 1);
                }
                if conn.config.seam_ticks > 0 {
                    self.batch.seam.push_back(json);
                }
                return;
            }
            if !self.gated && !self.batch.seam.is_empty() {
                // The failover seam: what was held back goes first; dedup drops what the
                // primary already delivered.
                let seam = std::mem::take(&mut self.batch.seam);
                for held in &seam {
                    self.batch.push(held);
                }
            }
        }
        self.batch.write(|frame| write_tick(frame, symbol, &trade));
    }

    fn garbage(&mut self, garbage: Garbage) {
        // A bad part of an otherwise good message: dead-lettered alone.
        self.conn.garbage(&garbage, self.raw);
    }

    fn gap(&mut self, gap: Gap) {
        self.conn.count(|c| &c.gaps, gap.missed);
        tracing::warn!(upstream = %self.conn.status.name, symbol = %gap.symbol, missed = gap.missed, "upstream gap: the source skipped ids");
    }
}

/// One tick object; `symbol` is already a JSON string literal.
pub fn write_tick(out: &mut String, symbol: &str, t: &Trade<'_>) {
    let mut f = ryu::Buffer::new();
    let mut i = itoa::Buffer::new();
    out.push_str("{\"symbol\":");
    out.push_str(symbol);
    out.push_str(",\"ts\":");
    out.push_str(i.format(t.ts));
    out.push_str(",\"price\":");
    out.push_str(f.format(t.price));
    out.push_str(",\"volume\":");
    out.push_str(f.format(t.volume));
    match t.id {
        Some(TradeRef::Int(id)) => {
            out.push_str(",\"id\":");
            out.push_str(i.format(id));
        }
        Some(TradeRef::Str(id)) => {
            let _ = write!(
                out,
                ",\"id\":{}",
                serde_json::to_string(id).unwrap_or_default()
            );
        }
        None => {}
    }
    let e = &t.extra;
    for (key, v) in [
        ("bid", e.bid),
        ("ask", e.ask),
        ("open", e.open),
        ("high", e.high),
        ("low", e.low),
        ("close", e.close),
    ] {
        if let Some(v) = v {
            let _ = write!(out, ",\"{key}\":{}", f.format(v));
        }
    }
    if let Some(p) = e.priority {
        let _ = write!(
            out,
            ",\"priority\":{}",
            serde_json::to_string(p).unwrap_or_default()
        );
    }
    out.push('}');
}

/// The tickfan symbol of each configured source symbol (`map`, then `prefix`), as a JSON
/// string literal; names tickfan would reject are left out, and logged.
#[must_use]
pub fn mapping(config: &UpstreamConfig) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for s in &config.symbols {
        let name = format!(
            "{}{}",
            config.prefix,
            config.map.get(s).map_or(s.as_str(), String::as_str)
        );
        if crate::tick::Symbol::is_valid(&name) {
            out.insert(s.clone(), format!("\"{name}\""));
        } else {
            tracing::error!(upstream = %config.name, symbol = %s, tickfan_symbol = %name, "upstream symbol maps to an invalid tickfan symbol; ignored");
        }
    }
    out
}

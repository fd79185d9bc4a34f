//! The optional producer: one `/ingest` WebSocket sending R ticks per second, round-robin
//! over the S symbols, as JSON-array frames every few milliseconds, and counting what the
//! server answers (`ingest_ack`s, rejections, `backpressure` errors) and how long each ack
//! took (the server answers a connection's frames in order, so the oldest frame not yet
//! answered is the one an ack is for). It runs on its own
//! OS thread with its own single-threaded runtime, so its pacing does not wait behind
//! thousands of busy client connections.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::Message;

/// Ticks per frame at most, and the frame size to stop at: the server's default
/// `max_message_bytes` is 64 KiB and a bigger frame would close the connection (1009).
const MAX_FRAME_TICKS: usize = 400;
const MAX_FRAME_BYTES: usize = 48 * 1024;
/// Send times of frames not answered yet, at most; past it (a server that stopped
/// answering) ack latency is no longer recorded for the run.
const MAX_UNANSWERED_TIMES: usize = 1 << 20;

/// How long to wait for the acks of frames still in flight when the window ends.
const ACK_DRAIN: Duration = Duration::from_secs(2);

/// Bound on the producer's TCP connect plus WebSocket handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the producer needs to know.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Full `ws://HOST:PORT/ingest` URL.
    pub url: String,
    /// Resolved server address.
    pub server: SocketAddr,
    /// Source address to bind to: one the clients do not use, so the producer is not
    /// refused by the server's per-IP connection cap that the clients already fill.
    pub source: Option<IpAddr>,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// Target ticks per second.
    pub rate: f64,
    pub symbols: Arc<[String]>,
    /// Pacing step: one burst of frames every `batch_ms`.
    pub batch_ms: u64,
    /// This producer is number `part` of `parts` (one per `--ingest-url`): it sends the
    /// symbols whose index % parts == part (or every symbol with `shared_symbols`), and its
    /// trade ids never collide with another part's.
    pub part: usize,
    pub parts: usize,
    /// Every producer sends every symbol (they contend for each symbol's chain).
    pub shared_symbols: bool,
}

/// Counters the live report reads while the producer runs.
#[derive(Debug, Default)]
pub struct ProducerLive {
    pub ticks_sent: AtomicU64,
    pub frames_sent: AtomicU64,
    pub acks: AtomicU64,
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub backpressure_errors: AtomicU64,
    pub refused: AtomicU64,
    pub other_errors: AtomicU64,
}

/// The producer's final account.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProducerReport {
    pub target_rate: f64,
    /// Seconds from the first frame to the stop signal.
    pub elapsed_secs: f64,
    pub ticks_sent: u64,
    pub frames_sent: u64,
    /// Ticks not sent because the producer fell more than a quarter second behind its
    /// schedule (the server or this machine could not take the rate); the offered rate
    /// is then lower than the target.
    pub ticks_skipped_behind: u64,
    pub acks: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub rejected_by_code: BTreeMap<String, u64>,
    pub backpressure_errors: u64,
    /// Ticks the server refused for backpressure (not stored, could be resent).
    pub refused: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    /// Frames that got neither an ack nor an error before the drain timeout.
    pub unanswered_frames: u64,
    /// Frame sent -> its `ingest_ack` read, in µs.
    pub ack_latency: crate::stats::Latency,
    #[serde(skip)]
    pub ack_histogram: Option<Histogram<u64>>,
    /// Set when the producer could not connect or lost its connection.
    pub failure: Option<String>,
    /// Ticks sent per symbol index, for the expected-delivery count.
    #[serde(skip)]
    pub sent_per_symbol: Vec<u64>,
}

impl ProducerReport {
    /// Adds another producer's account (several producers, one per `--ingest-url`): rates
    /// and counts add up, the window is the longest one, the first failure is kept.
    pub fn merge(&mut self, other: ProducerReport) {
        self.target_rate += other.target_rate;
        self.elapsed_secs = self.elapsed_secs.max(other.elapsed_secs);
        self.ticks_sent += other.ticks_sent;
        self.frames_sent += other.frames_sent;
        self.ticks_skipped_behind += other.ticks_skipped_behind;
        self.acks += other.acks;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.rejected += other.rejected;
        self.backpressure_errors += other.backpressure_errors;
        self.refused += other.refused;
        self.unanswered_frames += other.unanswered_frames;
        for (k, v) in other.rejected_by_code {
            *self.rejected_by_code.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.errors_by_code {
            *self.errors_by_code.entry(k).or_insert(0) += v;
        }
        if self.failure.is_none() {
            self.failure = other.failure;
        }
        match (&mut self.ack_histogram, other.ack_histogram) {
            (Some(mine), Some(theirs)) => {
                let _ = mine.add(&theirs);
            }
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
        if let Some(h) = &self.ack_histogram {
            self.ack_latency = crate::stats::Latency::of(h);
        }
        if self.sent_per_symbol.len() < other.sent_per_symbol.len() {
            self.sent_per_symbol.resize(other.sent_per_symbol.len(), 0);
        }
        for (a, b) in self.sent_per_symbol.iter_mut().zip(other.sent_per_symbol) {
            *a += b;
        }
    }
}

/// Starts the producer thread. It sends until `stop` turns true, waits briefly for the
/// last acks, and returns its report.
pub fn spawn(
    cfg: ProducerConfig,
    live: Arc<ProducerLive>,
    stop: watch::Receiver<bool>,
) -> std::thread::JoinHandle<ProducerReport> {
    std::thread::Builder::new()
        .name("producer".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("producer runtime");
            rt.block_on(run(cfg, live, stop))
        })
        .expect("spawn producer thread")
}

/// The reply shapes `/ingest` sends.
#[derive(Debug, Deserialize)]
struct Reply<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    accepted: u64,
    #[serde(default)]
    duplicates: u64,
    #[serde(default, borrow)]
    rejected: Vec<RejectedIn<'a>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(default)]
    refused: u64,
}

#[derive(Debug, Deserialize)]
struct RejectedIn<'a> {
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

/// Deterministic tick source: a small random walk per symbol.
struct Generator {
    symbols: Arc<[String]>,
    prices: Vec<f64>,
    next_symbol: usize,
    /// This producer's first symbol index and step (its share of the symbols).
    first: usize,
    stride: usize,
    /// Trade ids are `id_base + n * parts + part`: unique across the parts.
    part: u64,
    parts: u64,
    /// xorshift state: no `rand` dependency for a few random numbers.
    rng: u64,
    /// Trade ids are `id_base + n`; the base comes from the start time so that a second
    /// run does not resend ids the server already saw (it would drop them as duplicates).
    id_base: u64,
    n: u64,
}

impl Generator {
    fn new(symbols: Arc<[String]>, start_ms: u64, part: usize, parts: usize, shared: bool) -> Self {
        let prices = (0..symbols.len()).map(|i| 100.0 + i as f64).collect();
        let parts = parts.max(1);
        let (first, stride) = if shared || parts > symbols.len() {
            (0, 1)
        } else {
            (part, parts)
        };
        Self {
            symbols,
            prices,
            next_symbol: first,
            first,
            stride,
            part: part as u64,
            parts: parts as u64,
            rng: 0x9E37_79B9_7F4A_7C15 ^ start_ms,
            id_base: start_ms.saturating_mul(1_000_000),
            n: 0,
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Appends one tick object to `out`; returns its symbol index.
    fn write_tick(&mut self, out: &mut String, ts_ms: u64) -> usize {
        let i = self.next_symbol;
        self.next_symbol = i + self.stride;
        if self.next_symbol >= self.symbols.len() {
            self.next_symbol = self.first;
        }
        // Steps of at most ±0.05%: far from the jump rules that lower quality.
        let r = (self.next_random() % 10_001) as f64 / 10_000.0 - 0.5;
        let p = (self.prices[i] * (1.0 + r * 0.001)).max(0.01);
        self.prices[i] = p;
        let volume = 1 + self.next_random() % 100;
        let id = self.id_base + self.n * self.parts + self.part;
        self.n += 1;
        let mut num = itoa::Buffer::new();
        out.push_str(r#"{"symbol":""#);
        out.push_str(&self.symbols[i]);
        out.push_str(r#"","ts":"#);
        out.push_str(num.format(ts_ms));
        out.push_str(r#","price":"#);
        write_price(out, p);
        out.push_str(r#","volume":"#);
        out.push_str(num.format(volume));
        out.push_str(r#","id":"#);
        out.push_str(num.format(id));
        out.push('}');
        i
    }
}

/// Appends `price` (positive) with four decimals, from integers: the float formatter's exact
/// mode was most of the generator's CPU (see Cargo.toml). Rounds the scaled value, so at a
/// near-tie the last digit may differ from `{:.4}`'s; it is a load generator's price.
fn write_price(out: &mut String, price: f64) {
    let units = (price * 10_000.0).round() as u64;
    let mut num = itoa::Buffer::new();
    out.push_str(num.format(units / 10_000));
    out.push('.');
    let frac = num.format(units % 10_000);
    for _ in frac.len()..4 {
        out.push('0');
    }
    out.push_str(frac);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Records a failure that stops the producer, and says so at once: a test whose producer
/// never ran measures nothing, and the summary comes only at the end.
fn fail(mut report: ProducerReport, why: String) -> ProducerReport {
    eprintln!("producer failed: {why}");
    report.failure = Some(why);
    report
}

async fn run(
    cfg: ProducerConfig,
    live: Arc<ProducerLive>,
    mut stop: watch::Receiver<bool>,
) -> ProducerReport {
    let mut report = ProducerReport {
        target_rate: cfg.rate,
        sent_per_symbol: vec![0; cfg.symbols.len()],
        ..ProducerReport::default()
    };
    let mut request = match cfg.url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return fail(report, format!("bad url: {e}")),
    };
    if let Some(token) = &cfg.token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            request.headers_mut().insert(AUTHORIZATION, v);
        }
    }
    let connected = async {
        let stream = crate::net::open_tcp(cfg.server, cfg.source)
            .await
            .map_err(|e| e.to_string())?;
        let stream = crate::net::secure(stream, cfg.server)
            .await
            .map_err(|e| e.to_string())?;
        tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(|e| e.to_string())
    };
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connected).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => return fail(report, format!("connect {}: {e}", cfg.url)),
        Err(_) => return fail(report, format!("connect {}: timed out", cfg.url)),
    };
    let (mut sink, mut stream) = ws.split();

    // Reader: counts replies and times acks; returns the per-code tallies and the ack
    // latency histogram when the stream ends.
    let reader_live = Arc::clone(&live);
    let sent_at: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let reader_sent_at = Arc::clone(&sent_at);
    let reader = tokio::spawn(async move {
        let mut acks = crate::stats::new_histogram();
        let mut answered = |record: bool| {
            let Some(t0) = reader_sent_at.lock().expect("not poisoned").pop_front() else {
                return;
            };
            if record {
                let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
                acks.saturating_record(us.clamp(1, crate::stats::HIST_MAX_US));
            }
        };
        let mut rejected_by_code = BTreeMap::new();
        let mut errors_by_code = BTreeMap::new();
        let mut failure = None;
        while let Some(msg) = stream.next().await {
            let text = match msg {
                Ok(Message::Text(t)) => t,
                Ok(Message::Close(f)) => {
                    if let Some(f) = f {
                        let code = u16::from(f.code);
                        if code != 1000 {
                            failure =
                                Some(format!("server closed /ingest with {code} {}", f.reason));
                        }
                    }
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    let why = format!("/ingest read: {e}");
                    eprintln!("producer: {why}");
                    failure = Some(why);
                    break;
                }
            };
            let Ok(reply) = serde_json::from_str::<Reply<'_>>(text.as_str()) else {
                *errors_by_code
                    .entry("unparsable_reply".to_string())
                    .or_insert(0) += 1;
                reader_live.other_errors.fetch_add(1, Relaxed);
                continue;
            };
            match reply.kind.as_ref() {
                "ingest_ack" => {
                    answered(true);
                    reader_live.acks.fetch_add(1, Relaxed);
                    reader_live.accepted.fetch_add(reply.accepted, Relaxed);
                    reader_live.duplicates.fetch_add(reply.duplicates, Relaxed);
                    reader_live
                        .rejected
                        .fetch_add(reply.rejected.len() as u64, Relaxed);
                    for r in &reply.rejected {
                        let code = r.code.as_deref().unwrap_or("unknown").to_string();
                        *rejected_by_code.entry(code).or_insert(0) += 1;
                    }
                }
                "error" => {
                    let code = reply.code.as_deref().unwrap_or("unknown");
                    if code == "backpressure" {
                        // It follows its frame's ack.
                        reader_live.backpressure_errors.fetch_add(1, Relaxed);
                        reader_live.refused.fetch_add(reply.refused, Relaxed);
                    } else {
                        answered(false);
                        reader_live.other_errors.fetch_add(1, Relaxed);
                    }
                    *errors_by_code.entry(code.to_string()).or_insert(0) += 1;
                }
                other => {
                    *errors_by_code
                        .entry(format!("unexpected_{other}"))
                        .or_insert(0) += 1;
                }
            }
        }
        (rejected_by_code, errors_by_code, failure, acks)
    });

    let start_ms = now_ms();
    let mut gen = Generator::new(
        Arc::clone(&cfg.symbols),
        start_ms,
        cfg.part,
        cfg.parts,
        cfg.shared_symbols,
    );
    let step = Duration::from_millis(cfg.batch_ms.max(1));
    let mut ticker = tokio::time::interval(step);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Never try to catch up more than a quarter second at once: a burst would measure
    // the burst, not the steady rate asked for.
    let max_backlog = ((cfg.rate * 0.25).ceil() as u64).max(1);
    let start = Instant::now();
    let mut scheduled: u64 = 0;
    let mut frame = String::with_capacity(MAX_FRAME_BYTES + 256);
    let mut timing_lost = false;
    'outer: loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            _ = ticker.tick() => {}
        }
        let due = (cfg.rate * start.elapsed().as_secs_f64()) as u64;
        let mut n = due.saturating_sub(scheduled);
        if n > max_backlog {
            report.ticks_skipped_behind += n - max_backlog;
            scheduled += n - max_backlog;
            n = max_backlog;
        }
        scheduled += n;
        let ts = now_ms();
        while n > 0 {
            frame.clear();
            frame.push('[');
            let mut in_frame = 0;
            let mut indices = Vec::new();
            while n > 0 && in_frame < MAX_FRAME_TICKS && frame.len() < MAX_FRAME_BYTES {
                if in_frame > 0 {
                    frame.push(',');
                }
                indices.push(gen.write_tick(&mut frame, ts));
                in_frame += 1;
                n -= 1;
            }
            frame.push(']');
            {
                // Before the send: the ack may be read before `send` returns.
                let mut times = sent_at.lock().expect("not poisoned");
                if times.len() < MAX_UNANSWERED_TIMES {
                    times.push_back(Instant::now());
                } else {
                    timing_lost = true;
                }
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'outer,
                r = sink.send(Message::text(frame.clone())) => {
                    if let Err(e) = r {
                        let why = format!("/ingest send: {e}");
                        eprintln!("producer failed: {why}");
                        report.failure = Some(why);
                        break 'outer;
                    }
                }
            }
            // Counted only once sent: a frame cut off by the stop never reached the server.
            for i in indices {
                report.sent_per_symbol[i] += 1;
            }
            live.frames_sent.fetch_add(1, Relaxed);
            live.ticks_sent.fetch_add(in_frame as u64, Relaxed);
        }
    }
    report.elapsed_secs = start.elapsed().as_secs_f64();

    // Give the acks of frames in flight a moment, then close.
    let frames = live.frames_sent.load(Relaxed);
    let drain_until = Instant::now() + ACK_DRAIN;
    while Instant::now() < drain_until
        && live.acks.load(Relaxed)
            + live.backpressure_errors.load(Relaxed)
            + live.other_errors.load(Relaxed)
            < frames
        && !reader.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    let (rejected_by_code, errors_by_code, failure, acks) =
        match tokio::time::timeout(Duration::from_secs(1), reader).await {
            Ok(Ok(t)) => t,
            _ => (
                BTreeMap::new(),
                BTreeMap::new(),
                None,
                crate::stats::new_histogram(),
            ),
        };
    if !timing_lost {
        report.ack_latency = crate::stats::Latency::of(&acks);
        report.ack_histogram = Some(acks);
    }

    report.ticks_sent = live.ticks_sent.load(Relaxed);
    report.frames_sent = frames;
    report.acks = live.acks.load(Relaxed);
    report.accepted = live.accepted.load(Relaxed);
    report.duplicates = live.duplicates.load(Relaxed);
    report.rejected = live.rejected.load(Relaxed);
    report.backpressure_errors = live.backpressure_errors.load(Relaxed);
    report.refused = live.refused.load(Relaxed);
    let answered = report.acks + report.backpressure_errors + live.other_errors.load(Relaxed);
    report.unanswered_frames = frames.saturating_sub(answered);
    report.rejected_by_code = rejected_by_code;
    report.errors_by_code = errors_by_code;
    if report.failure.is_none() {
        report.failure = failure;
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_round_robins_with_valid_ticks() {
        let symbols: Arc<[String]> = vec!["A".to_string(), "B".to_string()].into();
        let mut g = Generator::new(symbols, 1_700_000_000_000, 0, 1, false);
        let mut out = String::from("[");
        let mut seen = Vec::new();
        for k in 0..4 {
            if k > 0 {
                out.push(',');
            }
            seen.push(g.write_tick(&mut out, 1_700_000_000_000));
        }
        out.push(']');
        assert_eq!(seen, vec![0, 1, 0, 1]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let ticks = v.as_array().unwrap();
        assert_eq!(ticks.len(), 4);
        for t in ticks {
            assert!(t["price"].as_f64().unwrap() > 0.0);
            assert!(t["volume"].as_u64().unwrap() >= 1);
            assert_eq!(t["ts"].as_u64(), Some(1_700_000_000_000));
        }
        assert_ne!(ticks[0]["id"], ticks[2]["id"]);
    }

    #[test]
    fn merged_reports_pool_their_ack_latencies() {
        let report = |us: &[u64]| {
            let mut h = crate::stats::new_histogram();
            for &v in us {
                h.record(v).unwrap();
            }
            ProducerReport {
                ack_latency: crate::stats::Latency::of(&h),
                ack_histogram: Some(h),
                ..ProducerReport::default()
            }
        };
        let mut a = report(&[100, 200]);
        a.merge(report(&[5_000]));
        assert_eq!(a.ack_latency.count, 3);
        // Three significant digits: 5,000 reads back as up to 5,003.
        assert!(
            (5_000..5_010).contains(&a.ack_latency.max),
            "{:?}",
            a.ack_latency
        );
        assert_eq!(a.ack_latency.p50, 200);
        // A producer without timings (it lost track) leaves the others' as they are.
        a.merge(ProducerReport::default());
        assert_eq!(a.ack_latency.count, 3);
        let mut none = ProducerReport::default();
        none.merge(report(&[7]));
        assert_eq!((none.ack_latency.count, none.ack_latency.p50), (1, 7));
    }

    #[test]
    fn prices_are_written_with_four_decimals() {
        for p in [
            0.01,
            0.5,
            1.0,
            99.99994,
            100.04567,
            123.4,
            1e6 + 0.0001,
            42.000_049,
        ] {
            let mut out = String::new();
            write_price(&mut out, p);
            assert_eq!(out, format!("{p:.4}"), "{p}");
        }
        // A near-tie rounds up (`{:.4}` gives 99.9999 from the binary value just below).
        let mut out = String::new();
        write_price(&mut out, 99.99995);
        assert_eq!(out, "100.0000");
    }
}

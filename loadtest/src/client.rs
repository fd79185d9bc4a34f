//! One client connection to `/ws`: connect from its source address, subscribe, then read
//! until told to stop, checking every tick's `seq` against the previous one for its symbol
//! and timing it from the server's `t_in`. It owns its seq state; everything it counts goes
//! to the thread-local accumulators in `stats`, so the hot path takes no lock.
//!
//! After the handshake the connection is read with the raw frame reader of `ws`: one
//! read, then every complete frame in the buffer, each text payload handed to
//! [`Conn::on_text`] as a slice of the read buffer.
//!
//! Lossless mode (`--lossless`, implied by `--churn`) keeps one client alive across many
//! connections: its seq state outlives each socket, its first subscribe ack sets the
//! baseline (`last_seq`: every later seq must arrive exactly once), and each reconnect,
//! after a churn disconnect or a loss, resubscribes with `since_seq` = the last seq it saw
//! per symbol. The same tracker then checks replayed (`snapshot`) and live ticks alike, so a
//! hole or a repeat anywhere across the client's connections counts as a gap or duplicate.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::Error as WsError;

use crate::net;
use crate::stats::{self, Counters, Tally, CONNS};
use crate::ws::{self, Flow, Msg, Step, WsIn};

/// How long the final close handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause before a lossless client reconnects after a failed attempt or a loss, so that a
/// server refusing connections is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// The `id` of the one subscribe request, so its ack or error can be recognised.
const SUBSCRIBE_ID: u64 = 1;
const SUBSCRIBE_ID_JSON: &str = "1";

/// Subscription parameters, identical for every client.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// `realtime`, `throttled`, `batch` or `smart`.
    pub mode: &'static str,
    pub interval_ms: u64,
    pub min_quality: u32,
    pub min_volume: f64,
}

/// One server's address and WebSocket URL.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Resolved address (connecting needs no DNS per connection).
    pub addr: SocketAddr,
    /// Full `ws://HOST:PORT/ws` URL for the handshake's Host header and path.
    pub ws_url: String,
}

/// What every connection shares: built once, read-only, behind an `Arc`.
#[derive(Debug)]
pub struct ClientCtx {
    /// The servers (one, or the nodes of a cluster); connection `i` goes to
    /// `targets[i % len]`, so clients spread round-robin over them.
    pub targets: Box<[Endpoint]>,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// Bind each socket to 127.0.0.x first (only when the server is on IPv4 loopback).
    pub spread_source: bool,
    /// Connections per source address before moving to the next one.
    pub conns_per_ip: usize,
    /// Source addresses skipped first (127.0.0.(1 + offset) is the first one used), so
    /// several load-test processes on one box can use disjoint addresses.
    pub source_offset: usize,
    /// All symbol names; a tick's symbol is mapped to its index in here.
    pub symbols: Arc<[String]>,
    pub symbol_index: SymbolIndex,
    /// K: symbols each client subscribes to.
    pub symbols_per_client: usize,
    pub subscription: Subscription,
    /// Bound on TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// The first `slow_clients` connections pause `slow_delay` after every message during
    /// the window, to play the slow consumer the server must cut off (4008) without
    /// slowing the others.
    pub slow_clients: usize,
    pub slow_delay: Duration,
    /// Keep the seq state across connections and resume with `since_seq` (see the module
    /// header); a connection the server ends is reconnected instead of given up.
    pub lossless: bool,
    /// One churn signal per client (`--churn`; empty without it): when notified, the
    /// client closes its connection cleanly and reconnects at once, resuming.
    pub churn: Box<[Notify]>,
    /// Bounds connects in progress, for reconnects as for the ramp.
    pub connect_sem: Arc<Semaphore>,
}

/// Symbol name -> index in [`ClientCtx::symbols`], once per tick. A name that ends in its
/// own index (the generated `LT0..LT{S-1}`) is found by reading those digits and comparing
/// the name at that index: a few ns instead of hashing. Any other name (a `--symbols` list)
/// goes through the hash map.
#[derive(Debug)]
pub struct SymbolIndex {
    names: Arc<[String]>,
    map: HashMap<String, u32>,
}

impl SymbolIndex {
    pub fn new(names: Arc<[String]>) -> Self {
        let map = names
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        Self { names, map }
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        let b = name.as_bytes();
        let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
        if (1..=9).contains(&digits) {
            let i = b[b.len() - digits..]
                .iter()
                .fold(0usize, |n, &c| n * 10 + usize::from(c - b'0'));
            if self.names.get(i).is_some_and(|n| n == name) {
                return u32::try_from(i).ok();
            }
        }
        self.map.get(name).copied()
    }
}

/// The symbol indexes client `client` subscribes to: K consecutive symbols starting at
/// `client * K`, wrapping around, so that every symbol gets (nearly) the same number of
/// subscribers. K is capped at S.
pub fn symbols_for(client: usize, k: usize, s: usize) -> Vec<u32> {
    if s == 0 {
        return Vec::new();
    }
    let k = k.min(s);
    let start = client.wrapping_mul(k) % s;
    let mut v: Vec<u32> = (0..k).map(|j| ((start + j) % s) as u32).collect();
    v.sort_unstable();
    v
}

/// What one tick's seq said about delivery order for its (client, symbol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// First tick seen for this symbol: nothing to compare with.
    First,
    /// Exactly the expected next seq, or a jump fully explained by `conflated`.
    InOrder,
    /// A jump: `missing` ticks were skipped that `conflated` did not account for.
    Gap { missing: u64 },
    /// seq <= the previous one (a duplicate or out of order); the previous seq is kept.
    Duplicate,
    /// A symbol this client did not subscribe to.
    Unexpected,
}

/// Last seq seen per subscribed symbol of one client. A sorted vector: K is small and
/// a binary search over it is cheaper and smaller than a hash map per connection.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    /// (symbol index, last seq); `None` until a tick or a baseline sets it.
    last: Vec<(u32, Option<u64>)>,
}

impl SeqTracker {
    pub fn new(mut symbols: Vec<u32>) -> Self {
        symbols.sort_unstable();
        symbols.dedup();
        Self {
            last: symbols.into_iter().map(|s| (s, None)).collect(),
        }
    }

    /// Sets the seq that the next tick of `symbol` must follow (a subscribe ack's
    /// `last_seq`), unless one is already known: from then on seq `baseline + 1` is
    /// expected, and anything else is a gap or a duplicate.
    pub fn set_baseline(&mut self, symbol: u32, baseline: u64) {
        if let Ok(i) = self.last.binary_search_by_key(&symbol, |e| e.0) {
            self.last[i].1.get_or_insert(baseline);
        }
    }

    /// (symbol, last seq) of every symbol with a known position: the `since_seq` of a
    /// resume.
    pub fn positions(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.last.iter().filter_map(|&(s, l)| l.map(|l| (s, l)))
    }

    /// Accounts one tick. `conflated` is the tick's `conflated` field (0 when absent):
    /// throttled and smart modes skip ticks on purpose and say how many, so a jump of
    /// exactly `conflated + 1` is in order.
    pub fn observe(&mut self, symbol: u32, seq: u64, conflated: u64) -> SeqEvent {
        let Ok(i) = self.last.binary_search_by_key(&symbol, |e| e.0) else {
            return SeqEvent::Unexpected;
        };
        let slot = &mut self.last[i].1;
        let Some(last) = slot else {
            *slot = Some(seq);
            return SeqEvent::First;
        };
        if seq <= *last {
            return SeqEvent::Duplicate;
        }
        let skipped = seq - *last - 1;
        *last = seq;
        if skipped > conflated {
            SeqEvent::Gap {
                missing: skipped - conflated,
            }
        } else {
            SeqEvent::InOrder
        }
    }

    /// Counts `event` into `c`.
    pub fn count(event: SeqEvent, c: &mut Counters) {
        match event {
            SeqEvent::First | SeqEvent::InOrder => {}
            SeqEvent::Gap { missing } => {
                c.gaps += 1;
                c.missing += missing;
            }
            SeqEvent::Duplicate => c.duplicates += 1,
            SeqEvent::Unexpected => c.unexpected_symbol += 1,
        }
    }
}

/// The fields of any server message that this client looks at; everything else is
/// skipped by serde without being materialised. Strings borrow from the frame when they
/// have no escapes.
#[derive(Debug, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    /// Request id echoed in replies, kept raw (a tick's `id` is the producer's trade id,
    /// which may be any JSON value and must not cost an allocation).
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    /// A `tick` message is itself a tick: its fields sit at the top level. (Not
    /// `#[serde(flatten)]`: that buffers every field and would double the parse cost.)
    #[serde(default, borrow)]
    symbol: Option<Text<'a>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    t_in: Option<f64>,
    #[serde(default)]
    conflated: Option<u64>,
    /// `batch` and `snapshot`.
    #[serde(default, borrow)]
    ticks: Vec<TickIn<'a>>,
    /// `error`.
    #[serde(default, borrow)]
    code: Option<Text<'a>>,
    /// `mode`.
    #[serde(default, borrow)]
    mode: Option<Text<'a>>,
    /// subscribe `ack`.
    #[serde(default, borrow)]
    rejected: Vec<Rejected<'a>>,
    /// subscribe `ack`: each accepted symbol's seq at the time of the subscribe.
    #[serde(default)]
    last_seq: Option<std::collections::BTreeMap<String, u64>>,
    /// `snapshot`: the store no longer reaches back to the resume point.
    #[serde(default)]
    gap: Option<bool>,
}

/// A string field that borrows from the frame when it can. serde borrows a bare
/// `Cow<str>` field but not one inside `Option`, hence the newtype.
#[derive(Debug, Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Default, Deserialize)]
struct TickIn<'a> {
    #[serde(default, borrow)]
    symbol: Option<Text<'a>>,
    #[serde(default)]
    seq: Option<u64>,
    /// Integer µs by contract; read as f64 so that a float does not fail the whole message
    /// (f64 holds today's µs timestamps exactly).
    #[serde(default)]
    t_in: Option<f64>,
    #[serde(default)]
    conflated: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Rejected<'a> {
    #[serde(borrow)]
    symbol: Cow<'a, str>,
    #[serde(default, borrow)]
    code: Option<Text<'a>>,
}

/// Microseconds since the Unix epoch, the unit of `t_in`.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Per-connection state while it reads.
struct Conn {
    ctx: Arc<ClientCtx>,
    seqs: SeqTracker,
    /// Symbols asked for in the subscribe.
    requested: Vec<u32>,
    /// Symbols the subscribe ack accepted; empty until the ack. These are the ones counted
    /// in the per-symbol subscriber totals, and taken out again if the connection is lost.
    subscribed: Vec<u32>,
    /// Whether this connection has reached a final ramp state (see `stats::Conns`).
    settled: bool,
    /// Whether a subscribe of this client was acknowledged before: later acks are resumes.
    acked: bool,
    /// Whether the current connection's subscribe was acknowledged. Churn waits for it, so
    /// every churn cycle is a complete resume (a client picked again while it reconnects
    /// leaves once its resume is acknowledged, not before).
    ready: bool,
}

impl Conn {
    fn settle(&mut self) {
        if !self.settled {
            self.settled = true;
            CONNS.settled.fetch_add(1, Relaxed);
        }
    }

    /// Handles one text message (UTF-8 already checked by the frame reader). `now_us` is
    /// the receipt time, taken once per read: every frame of one read arrived together.
    fn on_text(&mut self, text: &[u8], now_us: u64) {
        let counting = stats::measuring();
        // Live ticks are nearly every message: read the four fields by scanning instead of a
        // JSON parse, so the client stays cheaper than the server it measures. Anything the
        // scan does not recognise goes through serde below.
        if let Some(t) = scan_tick(text) {
            let seqs = &mut self.seqs;
            let index = &self.ctx.symbol_index;
            let mut scratch = Counters::default();
            stats::with_local(|local, hist| {
                let c = if counting { local } else { &mut scratch };
                c.messages += 1;
                c.bytes += text.len() as u64;
                c.tick_msgs += 1;
                live_tick(seqs, index, &t, now_us, c, hist, counting);
            });
            return;
        }
        let parsed = std::str::from_utf8(text)
            .ok()
            .and_then(|t| serde_json::from_str::<Incoming<'_>>(t).ok());
        let msg = match parsed {
            Some(m) => m,
            None => {
                if counting {
                    stats::with_local(|c, _| c.parse_errors += 1);
                }
                return;
            }
        };
        let kind = msg.kind.as_ref();
        // Ticks are the hot path: one thread-local borrow per message.
        match kind {
            "tick" | "batch" | "snapshot" => {
                let seqs = &mut self.seqs;
                let index = &self.ctx.symbol_index;
                let mut scratch = Counters::default();
                stats::with_local(|local, hist| {
                    let c = if counting { local } else { &mut scratch };
                    c.messages += 1;
                    c.bytes += text.len() as u64;
                    match kind {
                        "tick" => {
                            c.tick_msgs += 1;
                            let t = TickIn {
                                symbol: msg.symbol,
                                seq: msg.seq,
                                t_in: msg.t_in,
                                conflated: msg.conflated,
                            };
                            live_tick(seqs, index, &t, now_us, c, hist, counting);
                        }
                        "batch" => {
                            c.batch_msgs += 1;
                            for t in &msg.ticks {
                                live_tick(seqs, index, t, now_us, c, hist, counting);
                            }
                        }
                        _ => {
                            // History, not a live delivery: it only advances the seqs.
                            c.snapshot_msgs += 1;
                            c.snapshot_ticks += msg.ticks.len() as u64;
                            if msg.gap == Some(true) {
                                c.gap_snapshots += 1;
                            }
                            for t in &msg.ticks {
                                if let (Some(sym), Some(seq)) = (&t.symbol, t.seq) {
                                    match index.get(sym) {
                                        Some(i) => SeqTracker::count(seqs.observe(i, seq, 0), c),
                                        None => c.unexpected_symbol += 1,
                                    }
                                }
                            }
                        }
                    }
                });
                return;
            }
            _ => {}
        }
        if counting {
            stats::with_local(|c, _| {
                c.messages += 1;
                c.bytes += text.len() as u64;
                match kind {
                    "heartbeat" => c.heartbeats += 1,
                    "welcome" | "ack" | "error" | "mode" | "pong" | "symbols" => {}
                    _ => c.other_msgs += 1,
                }
            });
        }
        let is_subscribe_reply = msg.id.is_some_and(|raw| raw.get() == SUBSCRIBE_ID_JSON);
        match kind {
            "ack" if is_subscribe_reply && self.acked => {
                // A resume: the symbols and the subscriber totals are those of the first ack.
                self.requested.clear();
                self.ready = true;
                CONNS.resumed.fetch_add(1, Relaxed);
            }
            "ack" if is_subscribe_reply => {
                self.acked = true;
                self.ready = true;
                if self.ctx.lossless {
                    for (name, &seq) in msg.last_seq.iter().flatten() {
                        if let Some(i) = self.ctx.symbol_index.get(name) {
                            self.seqs.set_baseline(i, seq);
                        }
                    }
                }
                let mut accepted = std::mem::take(&mut self.requested);
                for r in &msg.rejected {
                    stats::tally(
                        Tally::RejectedSymbol,
                        r.code.as_deref().unwrap_or("unknown"),
                    );
                    if let Some(i) = self.ctx.symbol_index.get(r.symbol.as_ref()) {
                        accepted.retain(|&s| s != i);
                    }
                }
                for &s in &accepted {
                    stats::add_subscriber(s, 1);
                }
                self.subscribed = accepted;
                CONNS.subscribed.fetch_add(1, Relaxed);
                self.settle();
            }
            "error" => {
                stats::tally(Tally::Error, msg.code.as_deref().unwrap_or("unknown"));
                if is_subscribe_reply {
                    // The subscribe failed as a whole: this connection gets no ticks.
                    self.requested.clear();
                    self.settle();
                }
            }
            "mode" => stats::tally(Tally::ModeSwitch, msg.mode.as_deref().unwrap_or("unknown")),
            _ => {}
        }
    }
}

const TICK_PREFIX: &[u8] = br#"{"type":"tick","symbol":""#;

/// A JSON key to find in a tick, by a byte of it that is rare in ticks: `memchr` for that
/// byte is much cheaper than a substring search, and a hit is then checked in full.
struct Key<const N: usize> {
    key: &'static [u8; N],
    rare_at: usize,
}

const SEQ: Key<6> = Key {
    key: br#""seq":"#,
    rare_at: 3,
};
const T_IN: Key<7> = Key {
    key: br#""t_in":"#,
    rare_at: 2,
};
const CONFLATED: Key<12> = Key {
    key: br#""conflated":"#,
    rare_at: 4,
};

impl<const N: usize> Key<N> {
    /// The index just past the first occurrence of the key that starts at or after `from`.
    fn find(&self, text: &[u8], from: usize) -> Option<usize> {
        let rare = self.key[self.rare_at];
        let mut at = from + self.rare_at;
        while at < text.len() {
            let p = at + memchr::memchr(rare, &text[at..])?;
            let start = p - self.rare_at;
            if text.get(start..start + N) == Some(&self.key[..]) {
                return Some(start + N);
            }
            at = p + 1;
        }
        None
    }

    /// The unsigned integer right after the first occurrence at or after `from`; `None`
    /// when that occurrence has no integer (no later one is tried, as before).
    fn integer(&self, text: &[u8], from: usize) -> Option<(u64, usize)> {
        let at = self.find(text, from)?;
        leading_integer(&text[at..]).map(|(v, n)| (v, at + n))
    }
}

/// The fields of a live `tick` message as tickfan writes it (`{"type":"tick","symbol":"S",...`
/// with integer `seq` and `t_in`), without parsing the rest. `None` for anything else.
/// Each field is the integer after the first occurrence of its key in the text; tickfan's
/// layout (`..."symbol":"S","seq":N,...`) only lets the searches skip what cannot hold it.
fn scan_tick(text: &[u8]) -> Option<TickIn<'_>> {
    let rest = text.strip_prefix(TICK_PREFIX)?;
    let end = rest.iter().position(|&c| c == b'"' || c == b'\\')?;
    if rest[end] == b'\\' {
        // An escaped symbol: serde decodes it.
        return None;
    }
    // The text is valid UTF-8 and the symbol is cut at ASCII quotes, so this cannot fail.
    let symbol = std::str::from_utf8(&rest[..end]).ok()?;
    let after_symbol = TICK_PREFIX.len() + end;
    // Nothing before the seq's digits (prefix, quote-free symbol, "seq":) can hold a key,
    // so when the seq comes right after the symbol the other searches start behind it.
    let (seq, from) = match text[after_symbol..].strip_prefix(br#"","seq":"#) {
        Some(digits) => {
            let (seq, n) = leading_integer(digits)?;
            (seq, text.len() - digits.len() + n)
        }
        None => (SEQ.integer(text, 0)?.0, 0),
    };
    let (t_in, _) = T_IN.integer(text, from)?;
    Some(TickIn {
        symbol: Some(Text(Cow::Borrowed(symbol))),
        seq: Some(seq),
        #[allow(clippy::cast_precision_loss)]
        t_in: Some(t_in as f64),
        conflated: CONFLATED.integer(text, from).map(|(v, _)| v),
    })
}

/// The unsigned integer at the start of `b` and its digit count; `None` without digits or
/// past `u64::MAX` (as `str::parse` would say).
fn leading_integer(b: &[u8]) -> Option<(u64, usize)> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let digits = &b[..n];
    if n == 0 {
        return None;
    }
    if n > 19 {
        // Only 20 digits and more can pass u64::MAX.
        return digits
            .iter()
            .try_fold(0u64, |v, &c| {
                v.checked_mul(10)?.checked_add(u64::from(c - b'0'))
            })
            .map(|v| (v, n));
    }
    // Eight digits at a time (a `t_in` has 16), then the rest one by one.
    let mut chunks = digits.chunks_exact(8);
    let mut v = 0u64;
    for c in &mut chunks {
        v = v * 100_000_000 + eight_digits(c.try_into().expect("8 bytes"));
    }
    for &c in chunks.remainder() {
        v = v * 10 + u64::from(c - b'0');
    }
    Some((v, n))
}

/// The value of eight ASCII digits, combined pairwise in one register (SWAR).
fn eight_digits(b: [u8; 8]) -> u64 {
    let v = u64::from_le_bytes(b) - 0x3030_3030_3030_3030;
    // Each byte pair into a 2-digit value, then pairs of those, then the two halves.
    let v = (v * 10 + (v >> 8)) & 0x00FF_00FF_00FF_00FF;
    let v = (v * 100 + (v >> 16)) & 0x0000_FFFF_0000_FFFF;
    (v * 10_000 + (v >> 32)) & 0xFFFF_FFFF
}

/// Counts one live tick: seq accounting, conflation, and latency from `t_in`.
fn live_tick(
    seqs: &mut SeqTracker,
    index: &SymbolIndex,
    t: &TickIn<'_>,
    now_us: u64,
    c: &mut Counters,
    hist: &mut Histogram<u64>,
    counting: bool,
) {
    c.deliveries += 1;
    let (Some(sym), Some(seq)) = (&t.symbol, t.seq) else {
        c.malformed_ticks += 1;
        return;
    };
    let conflated = t.conflated.unwrap_or(0);
    c.conflated += conflated;
    match index.get(sym) {
        Some(i) => SeqTracker::count(seqs.observe(i, seq, conflated), c),
        None => c.unexpected_symbol += 1,
    }
    match t.t_in {
        Some(t_in) if t_in.is_finite() && t_in > 0.0 => {
            if counting {
                hist.saturating_record(now_us.saturating_sub(t_in as u64));
            }
        }
        _ => c.malformed_ticks += 1,
    }
}

/// Short, stable name for a failed connect or handshake, used as a tally key.
fn io_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::EADDRNOTAVAIL) => "no_source_port".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "too_many_open_files".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        _ => format!("io_{:?}", e.kind()).to_lowercase(),
    }
}

fn ws_reason(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("http_{}", resp.status().as_u16()),
        WsError::Io(io) => io_reason(io),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "reset_without_close".into()
        }
        WsError::Protocol(p) => {
            let s = format!("{p:?}");
            let name = s
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or("protocol");
            format!("protocol_{name}").to_lowercase()
        }
        WsError::Capacity(_) => "too_big".into(),
        WsError::Utf8(_) => "utf8".into(),
        other => {
            let s = format!("{other:?}");
            s.split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or("other")
                .to_lowercase()
        }
    }
}

/// TCP connect (from this connection's source address) plus WebSocket handshake. Returns
/// the stream and the bytes that came in behind the handshake response.
async fn connect(ctx: &ClientCtx, index: usize) -> Result<(net::Stream, Vec<u8>), String> {
    let source = ctx.spread_source.then(|| {
        IpAddr::V4(net::source_ip(
            index + ctx.source_offset * ctx.conns_per_ip,
            ctx.conns_per_ip,
        ))
    });
    let target = &ctx.targets[index % ctx.targets.len()];
    let stream = net::open_tcp(target.addr, source)
        .await
        .map_err(|e| io_reason(&e))?;
    let mut stream = net::secure(stream, target.addr)
        .await
        .map_err(|e| io_reason(&e))?;
    let mut request = target
        .ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| ws_reason(&e))?;
    if let Some(token) = &ctx.token {
        let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| "bad_token")?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    if ws::deflate() {
        request.headers_mut().insert(
            "sec-websocket-extensions",
            HeaderValue::from_static(ws::DEFLATE_OFFER),
        );
    }
    let leftover = ws::handshake(&mut stream, request)
        .await
        .map_err(|e| ws_reason(&e))?;
    Ok((stream, leftover))
}

/// The subscribe request; `since` (symbol, seq) pairs become its `since_seq` (a resume).
fn subscribe_message(ctx: &ClientCtx, symbols: &[u32], since: &[(u32, u64)]) -> String {
    let names: Vec<&str> = symbols
        .iter()
        .map(|&i| ctx.symbols[i as usize].as_str())
        .collect();
    let s = &ctx.subscription;
    let mut msg = serde_json::json!({
        "op": "subscribe",
        "id": SUBSCRIBE_ID,
        "symbols": names,
        "mode": s.mode,
        "interval_ms": s.interval_ms,
        "min_quality": s.min_quality,
        "min_volume": s.min_volume,
    });
    if !since.is_empty() {
        let resume: serde_json::Map<String, serde_json::Value> = since
            .iter()
            .map(|&(i, seq)| (ctx.symbols[i as usize].clone(), seq.into()))
            .collect();
        msg["since_seq"] = resume.into();
    }
    msg.to_string()
}

/// The close tally key of a server close frame (tungstenite's reading of its code).
fn close_reason(code: Option<u16>) -> String {
    match code {
        Some(code) => code.to_string(),
        None => "no_code".to_string(),
    }
}

/// How one connection of a client ended.
enum End {
    /// The test is over: close cleanly and stop.
    Stopped,
    /// A churn signal: close cleanly, then reconnect and resume.
    Churn,
    /// The server (or the network) ended it; the tally key says how.
    Lost(String),
}

/// Runs client `index` until `stop` turns true. `permit` bounds how many connections are
/// in their connect/handshake phase at once; it is released as soon as the subscribe is
/// sent. Without lossless mode the client makes one connection; in lossless mode it
/// reconnects after every churn signal or loss, resuming where it left off.
pub async fn run(
    ctx: Arc<ClientCtx>,
    index: usize,
    permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    CONNS.attempted.fetch_add(1, Relaxed);
    let symbols = symbols_for(index, ctx.symbols_per_client, ctx.symbols.len());
    let mut conn = Conn {
        seqs: SeqTracker::new(symbols.clone()),
        requested: Vec::new(),
        subscribed: Vec::new(),
        settled: false,
        acked: false,
        ready: false,
        ctx: Arc::clone(&ctx),
    };
    let mut permit = Some(permit);
    let mut first = true;
    loop {
        if !first && *stop.borrow() {
            break;
        }
        let permit = match permit.take() {
            Some(p) => p,
            None => {
                let sem = Arc::clone(&ctx.connect_sem);
                tokio::select! {
                    p = sem.acquire_owned() => p.expect("semaphore never closed"),
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        let connected = tokio::time::timeout(ctx.connect_timeout, connect(&ctx, index)).await;
        let failure = match connected {
            Ok(Ok((stream, leftover))) => {
                match serve(
                    &mut conn, stream, leftover, &symbols, index, permit, &mut stop,
                )
                .await
                {
                    Ok(End::Stopped) => break,
                    Ok(End::Churn) => {
                        CONNS.churned.fetch_add(1, Relaxed);
                        first = false;
                        continue;
                    }
                    Ok(End::Lost(why)) => {
                        CONNS.lost.fetch_add(1, Relaxed);
                        stats::tally(Tally::Close, &why);
                        if !ctx.lossless {
                            // Its symbols stop counting toward expected deliveries.
                            for &s in &conn.subscribed {
                                stats::add_subscriber(s, -1);
                            }
                            return;
                        }
                        None
                    }
                    Err(reason) => Some(format!("subscribe_{reason}")),
                }
            }
            Ok(Err(reason)) => Some(reason),
            Err(_) => Some("timeout".to_string()),
        };
        if let Some(reason) = failure {
            if first {
                return fail(&reason);
            }
            CONNS.reconnect_failures.fetch_add(1, Relaxed);
            stats::tally(Tally::ConnectFailure, &format!("reconnect_{reason}"));
        }
        first = false;
        // A lost or failed lossless client tries again after a pause, until the test ends.
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    if ctx.lossless {
        for (s, seq) in conn.seqs.positions() {
            stats::report_final_seq(s, seq);
        }
    }
}

/// One connection of a client: subscribe (resuming when the client was subscribed
/// before), then read until the test stops, a churn signal comes, or the server ends it.
/// A clean close is done here; a loss is left to the caller to count.
async fn serve(
    conn: &mut Conn,
    mut stream: net::Stream,
    leftover: Vec<u8>,
    symbols: &[u32],
    index: usize,
    permit: OwnedSemaphorePermit,
    stop: &mut watch::Receiver<bool>,
) -> Result<End, String> {
    let ctx = Arc::clone(&conn.ctx);
    CONNS.connected.fetch_add(1, Relaxed);
    CONNS.open.fetch_add(1, Relaxed);
    let since: Vec<(u32, u64)> = if ctx.lossless && conn.acked {
        conn.seqs.positions().collect()
    } else {
        Vec::new()
    };
    conn.requested = symbols.to_vec();
    conn.ready = false;
    let mut out = Vec::new();
    ws::encode(
        ws::OP_TEXT,
        subscribe_message(&ctx, symbols, &since).as_bytes(),
        &mut out,
    );
    if let Err(e) = stream.write_all(&out).await {
        CONNS.open.fetch_sub(1, Relaxed);
        return Err(io_reason(&e));
    }
    out.clear();
    drop(permit);

    let mut input = WsIn::new(leftover);
    let slow = index < ctx.slow_clients;
    let stopped = stop.wait_for(|s| *s);
    tokio::pin!(stopped);
    let churn_signal = ctx.churn.get(index);
    let churned = async {
        match churn_signal {
            Some(n) => n.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(churned);
    let end = loop {
        // Slow clients take one message per step during the window; the rest waits in
        // the connection's carry (and the socket) as it waited in tungstenite's buffer.
        let slow_now = slow && !stats::window_over();
        let max_texts = if slow_now { 1 } else { usize::MAX };
        let mut texts = 0usize;
        let mut server_close = None;
        let ready = conn.ready;
        let mut on = |m: Msg<'_>, now_us: u64| {
            match m {
                Msg::Text(text) => {
                    conn.on_text(text, now_us);
                    texts += 1;
                }
                Msg::Binary(_) => {
                    if stats::measuring() {
                        stats::with_local(|c, _| c.binary_msgs += 1);
                    }
                }
                // Answered after the step, as tungstenite answered on its next read.
                Msg::Ping(payload) => ws::encode_pong(payload, &mut out),
                Msg::Pong => {}
                Msg::Close(code) => {
                    server_close = Some(close_reason(code));
                    return Flow::Stop;
                }
            }
            Flow::Continue
        };
        // Only pick the event inside select!: awaiting in an arm would hold the watch
        // guard across the await and make the task !Send.
        let step = tokio::select! {
            biased;
            _ = &mut stopped => break End::Stopped,
            () = &mut churned, if ready => break End::Churn,
            step = std::future::poll_fn(|cx| {
                input.poll_step(cx, &mut stream, max_texts, now_micros, &mut on)
            }) => step,
        };
        match step {
            Ok(Step::Parsed(_)) => {}
            Ok(Step::Eof) => {
                break End::Lost(ws_reason(&WsError::Protocol(
                    ProtocolError::ResetWithoutClosingHandshake,
                )))
            }
            Err(e) => break End::Lost(ws_reason(&e)),
        }
        if let Some(why) = server_close {
            break End::Lost(why);
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                break End::Lost(io_reason(&e));
            }
            out.clear();
        }
        // Slow only during the window: in the drain a slow client reads its backlog at
        // full speed, to reach the server's slow_consumer error and 4008 close queued
        // behind it.
        if slow_now && texts > 0 && !stats::window_over() {
            tokio::time::sleep(ctx.slow_delay).await;
        }
    };
    conn.settle();
    stats::flush_thread();
    CONNS.open.fetch_sub(1, Relaxed);
    match end {
        End::Stopped => close(&mut stream, &mut input, false).await,
        End::Churn => close(&mut stream, &mut input, true).await,
        End::Lost(_) => {}
    }
    Ok(end)
}

fn fail(reason: &str) {
    CONNS.failed.fetch_add(1, Relaxed);
    CONNS.settled.fetch_add(1, Relaxed);
    stats::tally(Tally::ConnectFailure, reason);
}

/// Clean close at the end of the test or for churn: send 1000, read (and ignore) until
/// the server's close arrives or [`CLOSE_TIMEOUT`] passes. Ticks read meanwhile are not
/// counted; a lossless client gets them again when it resumes. A churn close that is not
/// clean is tallied with the closes (`churn_timeout`, ...), since it should not happen.
async fn close(stream: &mut net::Stream, input: &mut WsIn, churn: bool) {
    let outcome = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut frame = Vec::new();
        ws::encode_close(1000, "load test done", &mut frame);
        stream.write_all(&frame).await?;
        loop {
            // Pings are not answered once the close is sent (tungstenite neither).
            let mut closed = false;
            let step = std::future::poll_fn(|cx| {
                input.poll_step(cx, &mut *stream, usize::MAX, || 0, &mut |m, _| {
                    if let Msg::Close(_) = m {
                        closed = true;
                        return Flow::Stop;
                    }
                    Flow::Continue
                })
            })
            .await?;
            if closed {
                return Ok(());
            }
            if step == Step::Eof {
                return Err(WsError::Protocol(
                    ProtocolError::ResetWithoutClosingHandshake,
                ));
            }
        }
    })
    .await;
    let key = match outcome {
        Ok(Ok(())) => "clean".to_string(),
        Ok(Err(e)) => ws_reason(&e),
        Err(_) => "timeout".to_string(),
    };
    if !churn {
        stats::tally(Tally::FinalClose, &key);
    } else if key != "clean" {
        stats::tally(Tally::Close, &format!("churn_{key}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_in_order_gap_duplicate() {
        let mut t = SeqTracker::new(vec![3, 1]);
        assert_eq!(t.observe(1, 10, 0), SeqEvent::First);
        assert_eq!(t.observe(1, 11, 0), SeqEvent::InOrder);
        assert_eq!(t.observe(1, 15, 0), SeqEvent::Gap { missing: 3 });
        assert_eq!(t.observe(1, 15, 0), SeqEvent::Duplicate);
        assert_eq!(t.observe(1, 12, 0), SeqEvent::Duplicate);
        // After a duplicate the high-water mark stays at 15.
        assert_eq!(t.observe(1, 16, 0), SeqEvent::InOrder);
        // Symbols are tracked independently.
        assert_eq!(t.observe(3, 1, 0), SeqEvent::First);
        assert_eq!(t.observe(3, 3, 0), SeqEvent::Gap { missing: 1 });
        assert_eq!(t.observe(2, 1, 0), SeqEvent::Unexpected);
    }

    #[test]
    fn seq_conflated_explains_jumps() {
        let mut t = SeqTracker::new(vec![0]);
        t.observe(0, 100, 0);
        // Throttled: 4 skipped on purpose, next message carries conflated=4.
        assert_eq!(t.observe(0, 105, 4), SeqEvent::InOrder);
        // Says 2 conflated but 5 are missing: 3 unexplained.
        assert_eq!(t.observe(0, 111, 2), SeqEvent::Gap { missing: 3 });
    }

    #[test]
    fn seq_counts_into_counters() {
        let mut c = Counters::default();
        let mut t = SeqTracker::new(vec![7]);
        for (seq, conf) in [(1, 0), (2, 0), (5, 0), (5, 0), (4, 0), (9, 3), (20, 0)] {
            SeqTracker::count(t.observe(7, seq, conf), &mut c);
        }
        SeqTracker::count(t.observe(8, 1, 0), &mut c);
        assert_eq!(c.gaps, 2); // 2->5 and 9->20
        assert_eq!(c.missing, 2 + 10);
        assert_eq!(c.duplicates, 2);
        assert_eq!(c.unexpected_symbol, 1);
    }

    #[test]
    fn symbols_spread_evenly() {
        assert_eq!(symbols_for(0, 3, 10), vec![0, 1, 2]);
        assert_eq!(symbols_for(3, 3, 10), vec![0, 1, 9]);
        assert_eq!(symbols_for(1, 20, 5), vec![0, 1, 2, 3, 4]);
        let mut per_symbol = [0u32; 100];
        for c in 0..100 {
            for s in symbols_for(c, 10, 100) {
                per_symbol[s as usize] += 1;
            }
        }
        assert!(per_symbol.iter().all(|&n| n == 10));
    }

    #[test]
    fn scan_reads_live_ticks_and_leaves_the_rest_to_serde() {
        let t = scan_tick(br#"{"type":"tick","symbol":"LT3","seq":42,"ts":1,"price":1.5,"volume":2,"quality":100,"t_in":1700000000000123,"conflated":7}"#).unwrap();
        assert_eq!(
            (t.symbol.as_deref(), t.seq, t.conflated),
            (Some("LT3"), Some(42), Some(7))
        );
        assert_eq!(t.t_in, Some(1_700_000_000_000_123.0));
        let plain = scan_tick(br#"{"type":"tick","symbol":"A","seq":1,"t_in":5}"#).unwrap();
        assert_eq!(plain.conflated, None);
        assert!(scan_tick(br#"{"type":"batch","ticks":[]}"#).is_none());
        assert!(
            scan_tick(br#"{"type":"tick","symbol":"A","t_in":5}"#).is_none(),
            "no seq: serde decides"
        );
    }

    /// The scan as it was: each field after the first occurrence of its key, by substring
    /// search from the start.
    fn scan_reference(text: &str) -> Option<(String, u64, u64, Option<u64>)> {
        fn after(text: &str, key: &str) -> Option<u64> {
            let start = text.find(key)? + key.len();
            let digits = text[start..].bytes().take_while(u8::is_ascii_digit).count();
            text[start..start + digits].parse().ok()
        }
        let rest = text.strip_prefix(r#"{"type":"tick","symbol":""#)?;
        let symbol = &rest[..rest.find(['"', '\\'])?];
        Some((
            symbol.to_string(),
            after(text, r#""seq":"#)?,
            after(text, r#""t_in":"#)?,
            after(text, r#""conflated":"#),
        ))
    }

    #[test]
    fn scan_matches_the_substring_search() {
        let cases = [
            r#"{"type":"tick","symbol":"LT3","seq":42,"ts":1,"price":1.5,"volume":2,"quality":100,"t_in":1700000000000123}"#,
            r#"{"type":"tick","symbol":"LT3","seq":42,"ts":1,"price":1.5,"volume":2,"quality":100,"t_in":1700000000000123,"bid":1.4,"id":"a_b","priority":"high","conflated":12}"#,
            // Keys in another order, or missing, or without digits.
            r#"{"type":"tick","symbol":"X","ts":1,"seq":7,"conflated":3,"t_in":9}"#,
            r#"{"type":"tick","symbol":"X","seq":7,"conflated":3,"t_in":9}"#,
            r#"{"type":"tick","symbol":"X","seq":7,"t_in":9,"conflated":"x","conflated":4}"#,
            r#"{"type":"tick","symbol":"X","seq":7,"t_in":"9","t_in":10}"#,
            r#"{"type":"tick","symbol":"X","seq":,"t_in":9}"#,
            r#"{"type":"tick","symbol":"X","seq":7}"#,
            r#"{"type":"tick","symbol":"X","t_in":5,"seq":99999999999999999999}"#,
            r#"{"type":"tick","symbol":"X","seq":18446744073709551615,"t_in":18446744073709551616}"#,
            // Near misses of the keys, and the rare bytes the search starts from.
            r#"{"type":"tick","symbol":"f_q","seq":1,"x_in":2,"t_in":3,"conflate":4,"conflated":5}"#,
            r#"{"type":"tick","symbol":"","seq":1,"t_in":2}"#,
            r#"{"type":"tick","symbol":"A","seq":1,"t_in":2"#,
            r#"{"type":"tick","symbol":"A"#,
            r#"{"type":"batch","ticks":[]}"#,
        ];
        for text in cases {
            let got = scan_tick(text.as_bytes()).map(|t| {
                (
                    t.symbol.unwrap().0.into_owned(),
                    t.seq.unwrap(),
                    t.t_in.unwrap() as u64,
                    t.conflated,
                )
            });
            assert_eq!(got, scan_reference(text), "{text}");
        }
        // An escaped symbol now goes to serde instead of being cut at the backslash.
        assert!(scan_tick(br#"{"type":"tick","symbol":"A\u0042","seq":1,"t_in":2}"#).is_none());
    }

    #[test]
    fn integers_parse_as_str_parse_does() {
        let mut n: u64 = 0;
        let mut values = vec![0, 7, u64::MAX, u64::MAX - 1, 10_000_000_000_000_000_000];
        for _ in 0..20 {
            n = n * 10 + 9;
            values.extend([n, n / 3, n + 1]);
            if n > u64::MAX / 10 {
                break;
            }
        }
        for v in values {
            let s = format!("{v},");
            assert_eq!(leading_integer(s.as_bytes()), Some((v, s.len() - 1)), "{v}");
        }
        for s in [
            "18446744073709551616",
            "99999999999999999999x",
            "000000000000000000000001",
        ] {
            let digits = s.bytes().take_while(u8::is_ascii_digit).count();
            let want = s[..digits].parse::<u64>().ok().map(|v| (v, digits));
            assert_eq!(leading_integer(s.as_bytes()), want, "{s}");
        }
        assert_eq!(leading_integer(b""), None);
        assert_eq!(leading_integer(b"x1"), None);
    }

    #[test]
    fn symbol_index_by_digits_or_map() {
        let generated: Arc<[String]> = (0..120).map(|i| format!("LT{i}")).collect();
        let idx = SymbolIndex::new(Arc::clone(&generated));
        for (i, name) in generated.iter().enumerate() {
            assert_eq!(idx.get(name), Some(i as u32));
        }
        for miss in [
            "LT120",
            "LT03",
            "LT",
            "XT3",
            "lt3",
            "LT3 ",
            "",
            "LT99999999999",
        ] {
            assert_eq!(idx.get(miss), None, "{miss}");
        }
        // A list (sorted by parse_symbols): names whose digits are not their index.
        let list: Arc<[String]> = ["AAPL", "B0", "C1", "X9"].map(String::from).into();
        let idx = SymbolIndex::new(list);
        assert_eq!(
            ["AAPL", "B0", "C1", "X9", "B1"].map(|s| idx.get(s)),
            [Some(0), Some(1), Some(2), Some(3), None]
        );
    }

    #[test]
    fn parses_tick_batch_and_ack() {
        let m: Incoming<'_> = serde_json::from_str(
            r#"{"type":"tick","symbol":"LT1","seq":5,"ts":1,"price":1.5,"volume":2,"quality":95,"t_in":1700000000000123,"bid":1.4}"#,
        )
        .unwrap();
        assert_eq!(m.kind, "tick");
        assert_eq!(m.seq, Some(5));
        assert_eq!(m.t_in, Some(1_700_000_000_000_123.0));
        assert!(matches!(m.symbol, Some(Text(Cow::Borrowed("LT1")))));
        let b: Incoming<'_> = serde_json::from_str(
            r#"{"type":"batch","ticks":[{"symbol":"A","seq":1,"t_in":5},{"symbol":"B","seq":2,"t_in":6,"conflated":3}]}"#,
        )
        .unwrap();
        assert_eq!(b.ticks.len(), 2);
        assert_eq!(b.ticks[1].conflated, Some(3));
        let a: Incoming<'_> = serde_json::from_str(
            r#"{"type":"ack","id":1,"op":"subscribe","symbols":["A"],"rejected":[{"symbol":"B/\u0041","code":"invalid_symbol"}],"last_seq":{"A":3}}"#,
        )
        .unwrap();
        assert_eq!(a.rejected[0].symbol, "B/A");
        assert_eq!(a.id.map(RawValue::get), Some(SUBSCRIBE_ID_JSON));
    }
}

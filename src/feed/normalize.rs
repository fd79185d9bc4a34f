//! Normalization: one upstream message (text) in, zero or more [`Trade`]s and at most one
//! [`Event`] out, per the source's documented public protocol. Pure and socket-free, so the
//! fixtures in `tests/fixtures/feeds/` and the `feed_normalize` bench drive it directly. The
//! subscribe request each kind sends is built here too, beside the messages it answers.
//!
//! Each message passes the nesting bound of `json_depth` before serde sees it. Trades are
//! borrowed from the message (symbol, id) and written out by the connector as tickfan tick
//! JSON for the one ingest path. What cannot be a trade becomes a [`Garbage`] with the code
//! its dead letter carries; a negative or non-finite price or size is garbage here so that its
//! dead letter names the upstream (ingest would reject it too, but anonymously).

// aHash: these maps are looked up once or twice per trade on the hot path.
use ahash::{AHashMap as HashMap, AHashSet as HashSet};

use serde::Deserialize;

use crate::config::UpstreamKind;

/// A trade id as the source gave it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TradeRef<'a> {
    /// Integer ids (Binance `t`, Coinbase `trade_id`, Kraken `trade_id`).
    Int(u64),
    /// String ids (a tickfan upstream's producers may use them).
    Str(&'a str),
}

/// One normalized trade, borrowing from the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Trade<'a> {
    /// The source's own symbol (mapping to the tickfan symbol is the connector's).
    pub symbol: &'a str,
    /// Trade time, ms since the epoch.
    pub ts: i64,
    /// Price, finite and > 0.
    pub price: f64,
    /// Size, finite and >= 0.
    pub volume: f64,
    /// The source's trade id, so a replay (or the same trade from a backup) dedups.
    pub id: Option<TradeRef<'a>>,
    /// Optional tick fields passed through from a tickfan upstream.
    pub extra: Extra<'a>,
}

/// The optional tick fields of a tickfan upstream's ticks, passed on unchanged.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Extra<'a> {
    /// Best bid.
    pub bid: Option<f64>,
    /// Best ask.
    pub ask: Option<f64>,
    /// Bar open.
    pub open: Option<f64>,
    /// Bar high.
    pub high: Option<f64>,
    /// Bar low.
    pub low: Option<f64>,
    /// Bar close.
    pub close: Option<f64>,
    /// Priority name, when not normal.
    #[serde(borrow)]
    pub priority: Option<&'a str>,
}

/// What a message was, besides the trades it carried.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Trades (possibly none passed the checks) were delivered.
    Trades,
    /// A keep-alive: Coinbase `heartbeat`, Kraken `heartbeat`, tickfan `heartbeat`.
    Heartbeat,
    /// A subscription reply, status or other control message.
    Control,
    /// A tickfan upstream's `welcome`, with its epoch (seqs are only comparable within one).
    Welcome(u64),
    /// A tickfan upstream's `ack`: the last seq it holds per symbol.
    Subscribed,
    /// The source reported an error about our request (e.g. an unknown symbol); it is logged
    /// and dead-lettered, and the connection stays up.
    SourceError(String),
}

/// A message that is not what the protocol promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
#[non_exhaustive]
pub struct Garbage {
    /// Dead-letter code: `bad_json`, `unknown_message`, `invalid_price`, `invalid_volume`,
    /// `invalid_timestamp`, `unknown_symbol`.
    pub code: &'static str,
    /// Human message.
    pub message: String,
    /// Refused for nesting past `max_json_depth` (counted as that limit's hit).
    pub too_deep: bool,
}

fn garbage(code: &'static str, message: impl Into<String>) -> Garbage {
    Garbage {
        code,
        message: message.into(),
        too_deep: false,
    }
}

/// A gap the source revealed: `missed` trades (or seqs) between two it sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The source symbol.
    pub symbol: String,
    /// How many ids/seqs were skipped.
    pub missed: u64,
}

/// Per-connection memory of one upstream: the last id (or seq) per symbol, for gap detection
/// and, for kind `tickfan`, for `since_seq` on reconnect. Bounded by the configured symbols:
/// only those are tracked.
#[derive(Debug, Default)]
pub struct SourceState {
    last: HashMap<String, u64>,
    /// Kind `tickfan`: the upstream's epoch, once welcomed.
    pub epoch: Option<u64>,
}

impl SourceState {
    /// Remembers `id` for `symbol` (when configured) and returns the gap it reveals, if any.
    /// An id at or below the last one is a replay (dedup will drop it), not a gap.
    fn advance(&mut self, symbols: &Symbols, symbol: &str, id: u64) -> Option<Gap> {
        self.advance_to(symbols, symbol, id, 1)
    }

    /// `advance` for an id that names the last trade without being delivered (Coinbase's
    /// heartbeat `last_trade_id`): every id after the last one seen, up to it, was missed.
    fn advance_past(&mut self, symbols: &Symbols, symbol: &str, id: u64) -> Option<Gap> {
        self.advance_to(symbols, symbol, id, 0)
    }

    fn advance_to(
        &mut self,
        symbols: &Symbols,
        symbol: &str,
        id: u64,
        delivered: u64,
    ) -> Option<Gap> {
        if !symbols.contains(symbol) {
            return None;
        }
        match self.last.get_mut(symbol) {
            Some(last) => {
                let gap = (id > *last + delivered).then(|| Gap {
                    symbol: symbol.to_owned(),
                    missed: id - *last - delivered,
                });
                *last = (*last).max(id);
                gap
            }
            None => {
                self.last.insert(symbol.to_owned(), id);
                None
            }
        }
    }

    /// The last seq seen per symbol (kind `tickfan`: the `since_seq` of a resume).
    #[must_use]
    pub fn last_seqs(&self) -> &HashMap<String, u64> {
        &self.last
    }

    /// Forgets every position (a tickfan upstream came back with another epoch).
    pub fn reset(&mut self) {
        self.last.clear();
    }
}

/// The configured source symbols of one upstream (lookups by `&str`).
#[derive(Debug, Default, Clone)]
pub struct Symbols(HashSet<String>);

impl Symbols {
    /// From the config's `symbols`.
    #[must_use]
    pub fn new(list: &[String]) -> Self {
        Self(list.iter().cloned().collect())
    }

    /// Whether `s` was configured.
    #[must_use]
    pub fn contains(&self, s: &str) -> bool {
        self.0.contains(s)
    }
}

/// Receives what one message held.
pub trait Emit {
    /// One trade that passed the checks.
    fn trade(&mut self, trade: Trade<'_>);
    /// One part of the message that could not be a trade (the rest of it still counts).
    fn garbage(&mut self, garbage: Garbage);
    /// A gap the source revealed.
    fn gap(&mut self, gap: Gap);
}

/// The requests sent right after the WebSocket handshake (kind `tickfan` sends its subscribe
/// only after the `welcome`, see [`tickfan_subscribe`]).
#[must_use]
pub fn subscribe_messages(kind: UpstreamKind, symbols: &[String]) -> Vec<String> {
    match kind {
        UpstreamKind::Binance => {
            // Stream names are lower case: `btcusdt@trade`.
            let params: Vec<String> = symbols
                .iter()
                .map(|s| format!("{}@trade", s.to_ascii_lowercase()))
                .collect();
            vec![serde_json::json!({"method": "SUBSCRIBE", "params": params, "id": 1}).to_string()]
        }
        UpstreamKind::Coinbase => vec![serde_json::json!({
            "type": "subscribe",
            "product_ids": symbols,
            "channels": ["matches", "heartbeat"],
        })
        .to_string()],
        UpstreamKind::Kraken => vec![serde_json::json!({
            "method": "subscribe",
            "params": {"channel": "trade", "symbol": symbols, "snapshot": false},
            "req_id": 1,
        })
        .to_string()],
        UpstreamKind::Tickfan => Vec::new(),
    }
}

/// Kind `tickfan`: the subscribe request, resuming each symbol after its last seen seq.
#[must_use]
pub fn tickfan_subscribe(symbols: &[String], state: &SourceState) -> String {
    let since: serde_json::Map<String, serde_json::Value> = state
        .last
        .iter()
        .map(|(s, seq)| (s.clone(), (*seq).into()))
        .collect();
    let mut req = serde_json::json!({
        "op": "subscribe",
        "id": 1,
        "symbols": symbols,
        "mode": "realtime",
    });
    if !since.is_empty() {
        req["since_seq"] = since.into();
    }
    req.to_string()
}

/// Normalizes one message of `kind`. `Err` when the whole message is garbage; parts of a
/// message (one bad trade of several) go to `out.garbage` instead.
///
/// # Errors
/// [`Garbage`]: not JSON, nested past `max_depth`, or not a message this kind sends.
pub fn normalize(
    kind: UpstreamKind,
    text: &str,
    max_depth: usize,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) -> Result<Event, Garbage> {
    if let Err(e) = crate::json_depth::check(text.as_bytes(), max_depth) {
        return Err(Garbage {
            too_deep: true,
            ..garbage("bad_json", e.to_string())
        });
    }
    match kind {
        UpstreamKind::Binance => binance(text, symbols, state, out),
        UpstreamKind::Coinbase => coinbase(text, symbols, state, out),
        UpstreamKind::Kraken => kraken(text, symbols, state, out),
        UpstreamKind::Tickfan => tickfan(text, symbols, state, out),
    }
}

fn bad_json(e: &serde_json::Error) -> Garbage {
    garbage("bad_json", format!("not a valid message: {e}"))
}

/// Price and size checks shared by every kind, so the dead letter names the upstream.
fn checked<'a>(trade: Trade<'a>, symbols: &Symbols) -> Result<Trade<'a>, Garbage> {
    if !symbols.contains(trade.symbol) {
        return Err(garbage(
            "unknown_symbol",
            format!("trade for {:?}, which was not subscribed", trade.symbol),
        ));
    }
    if !(trade.price.is_finite() && trade.price > 0.0) {
        return Err(garbage(
            "invalid_price",
            format!("price {} is not a finite number > 0", trade.price),
        ));
    }
    if !(trade.volume.is_finite() && trade.volume >= 0.0) {
        return Err(garbage(
            "invalid_volume",
            format!("size {} is not a finite number >= 0", trade.volume),
        ));
    }
    Ok(trade)
}

/// A decimal string (`"0.001"`) as a number; exchanges quote prices as strings.
fn decimal(s: &str, what: &str) -> Result<f64, Garbage> {
    s.parse::<f64>().map_err(|_| {
        garbage(
            if what == "price" {
                "invalid_price"
            } else {
                "invalid_volume"
            },
            format!("{what} {s:?} is not a number"),
        )
    })
}

// ---- Binance spot: `<symbol>@trade` streams, raw (`/ws`) or combined (`/stream`). ----

#[derive(Deserialize)]
struct BinanceMsg<'a> {
    /// Event type; `trade` for the trade stream.
    #[serde(rename = "e", borrow)]
    event: Option<&'a str>,
    #[serde(rename = "s", borrow)]
    symbol: Option<&'a str>,
    #[serde(rename = "t")]
    trade_id: Option<u64>,
    #[serde(rename = "p", borrow)]
    price: Option<&'a str>,
    #[serde(rename = "q", borrow)]
    qty: Option<&'a str>,
    #[serde(rename = "T")]
    trade_time: Option<i64>,
    /// Combined streams wrap each event: `{"stream":"btcusdt@trade","data":{...}}`.
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    /// A reply to SUBSCRIBE: `{"result":null,"id":1}`.
    id: Option<serde_json::Value>,
    /// An error reply: `{"error":{"code":2,"msg":"Invalid request"},"id":1}`.
    error: Option<serde_json::Value>,
}

fn binance(
    text: &str,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) -> Result<Event, Garbage> {
    let msg: BinanceMsg<'_> = serde_json::from_str(text).map_err(|e| bad_json(&e))?;
    if let Some(data) = msg.data {
        return binance(data.get(), symbols, state, out);
    }
    if let Some(error) = msg.error {
        return Ok(Event::SourceError(error.to_string()));
    }
    match msg.event {
        Some("trade") => {
            let (Some(symbol), Some(id), Some(p), Some(q), Some(ts)) =
                (msg.symbol, msg.trade_id, msg.price, msg.qty, msg.trade_time)
            else {
                return Err(garbage(
                    "bad_json",
                    "trade without s, t, p, q and T".to_owned(),
                ));
            };
            let trade = Trade {
                symbol,
                ts,
                price: decimal(p, "price")?,
                volume: decimal(q, "size")?,
                id: Some(TradeRef::Int(id)),
                extra: Extra::default(),
            };
            emit(checked(trade, symbols), id, symbols, state, out);
            Ok(Event::Trades)
        }
        None if msg.id.is_some() => Ok(Event::Control),
        Some(other) => Err(garbage(
            "unknown_message",
            format!("unexpected Binance event {other:?}"),
        )),
        None => Err(garbage("unknown_message", "not a Binance event or reply")),
    }
}

/// Emits a checked trade and the gap its sequential id reveals.
fn emit(
    trade: Result<Trade<'_>, Garbage>,
    seq: u64,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) {
    match trade {
        Ok(trade) => {
            if let Some(gap) = state.advance(symbols, trade.symbol, seq) {
                out.gap(gap);
            }
            out.trade(trade);
        }
        Err(g) => out.garbage(g),
    }
}

// ---- Coinbase Exchange: `matches` (with its first `last_match`) and `heartbeat`. ----

#[derive(Deserialize)]
struct CoinbaseMsg<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    product_id: Option<&'a str>,
    trade_id: Option<u64>,
    sequence: Option<u64>,
    #[serde(borrow)]
    price: Option<&'a str>,
    #[serde(borrow)]
    size: Option<&'a str>,
    #[serde(borrow)]
    time: Option<&'a str>,
    last_trade_id: Option<u64>,
    #[serde(borrow)]
    message: Option<&'a str>,
    #[serde(borrow)]
    reason: Option<&'a str>,
}

fn coinbase(
    text: &str,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) -> Result<Event, Garbage> {
    let msg: CoinbaseMsg<'_> = serde_json::from_str(text).map_err(|e| bad_json(&e))?;
    match msg.kind {
        "match" | "last_match" => {
            let (Some(symbol), Some(id), Some(p), Some(q), Some(time)) =
                (msg.product_id, msg.trade_id, msg.price, msg.size, msg.time)
            else {
                return Err(garbage(
                    "bad_json",
                    "match without product_id, trade_id, price, size and time",
                ));
            };
            let trade = Trade {
                symbol,
                ts: rfc3339_ms(time)?,
                price: decimal(p, "price")?,
                volume: decimal(q, "size")?,
                id: Some(TradeRef::Int(id)),
                extra: Extra::default(),
            };
            // `trade_id` runs per product without holes, so a jump is a missed match;
            // `sequence` also counts messages of channels not subscribed to, so its jumps are
            // normal here and only its going backwards would matter (dedup covers replays).
            let _ = msg.sequence;
            emit(checked(trade, symbols), id, symbols, state, out);
            Ok(Event::Trades)
        }
        "heartbeat" => {
            // The heartbeat names the product's last trade: one we never saw is a gap.
            if let (Some(symbol), Some(last)) = (msg.product_id, msg.last_trade_id) {
                if let Some(gap) = state.advance_past(symbols, symbol, last) {
                    out.gap(gap);
                }
            }
            Ok(Event::Heartbeat)
        }
        "subscriptions" => Ok(Event::Control),
        "error" => Ok(Event::SourceError(format!(
            "{} {}",
            msg.message.unwrap_or_default(),
            msg.reason.unwrap_or_default()
        ))),
        other => Err(garbage(
            "unknown_message",
            format!("unexpected Coinbase message type {other:?}"),
        )),
    }
}

// ---- Kraken WebSocket v2: `trade` channel, `heartbeat`, `status`, method replies. ----

#[derive(Deserialize)]
struct KrakenMsg<'a> {
    #[serde(borrow)]
    channel: Option<&'a str>,
    #[serde(borrow)]
    method: Option<&'a str>,
    success: Option<bool>,
    #[serde(borrow)]
    error: Option<&'a str>,
    #[serde(borrow)]
    data: Option<Vec<&'a serde_json::value::RawValue>>,
}

#[derive(Deserialize)]
struct KrakenTrade<'a> {
    #[serde(borrow)]
    symbol: &'a str,
    price: f64,
    qty: f64,
    trade_id: u64,
    #[serde(borrow)]
    timestamp: &'a str,
}

fn kraken(
    text: &str,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) -> Result<Event, Garbage> {
    let msg: KrakenMsg<'_> = serde_json::from_str(text).map_err(|e| bad_json(&e))?;
    if let Some(method) = msg.method {
        return Ok(if msg.success == Some(false) {
            Event::SourceError(format!(
                "{method} failed: {}",
                msg.error.unwrap_or("no reason given")
            ))
        } else {
            Event::Control
        });
    }
    match msg.channel {
        Some("trade") => {
            for raw in msg.data.unwrap_or_default() {
                let trade = serde_json::from_str::<KrakenTrade<'_>>(raw.get())
                    .map_err(|e| garbage("bad_json", format!("not a Kraken trade: {e}")))
                    .and_then(|t| {
                        Ok(Trade {
                            symbol: t.symbol,
                            ts: rfc3339_ms(t.timestamp)?,
                            price: t.price,
                            volume: t.qty,
                            id: Some(TradeRef::Int(t.trade_id)),
                            extra: Extra::default(),
                        })
                    });
                match trade {
                    Ok(t) => {
                        let Some(TradeRef::Int(id)) = t.id else {
                            continue;
                        };
                        emit(checked(t, symbols), id, symbols, state, out);
                    }
                    Err(g) => out.garbage(g),
                }
            }
            Ok(Event::Trades)
        }
        Some("heartbeat") => Ok(Event::Heartbeat),
        Some("status") => Ok(Event::Control),
        Some(other) => Err(garbage(
            "unknown_message",
            format!("unexpected Kraken channel {other:?}"),
        )),
        None => Err(garbage("unknown_message", "not a Kraken v2 message")),
    }
}

// ---- tickfan: another tickfan's `/ws` (protocol v1). ----

#[derive(Deserialize)]
struct TickfanMsg<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    epoch: Option<u64>,
    #[serde(borrow)]
    ticks: Option<Vec<&'a serde_json::value::RawValue>>,
    #[serde(borrow)]
    code: Option<&'a str>,
    #[serde(borrow)]
    message: Option<&'a str>,
}

#[derive(Deserialize)]
struct TickfanTick<'a> {
    #[serde(borrow)]
    symbol: &'a str,
    seq: u64,
    ts: i64,
    price: f64,
    volume: f64,
    #[serde(default, borrow)]
    id: Option<TickfanId<'a>>,
    #[serde(flatten, borrow)]
    extra: Extra<'a>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TickfanId<'a> {
    Int(u64),
    Str(&'a str),
}

fn tickfan(
    text: &str,
    symbols: &Symbols,
    state: &mut SourceState,
    out: &mut impl Emit,
) -> Result<Event, Garbage> {
    let msg: TickfanMsg<'_> = serde_json::from_str(text).map_err(|e| bad_json(&e))?;
    match msg.kind {
        "tick" => {
            tickfan_tick(text, symbols, state, out);
            Ok(Event::Trades)
        }
        "snapshot" | "batch" => {
            for raw in msg.ticks.unwrap_or_default() {
                tickfan_tick(raw.get(), symbols, state, out);
            }
            Ok(Event::Trades)
        }
        "heartbeat" | "pong" => Ok(Event::Heartbeat),
        "welcome" => Ok(Event::Welcome(msg.epoch.unwrap_or(0))),
        "ack" => Ok(Event::Subscribed),
        "mode" => Ok(Event::Control),
        "error" => Ok(Event::SourceError(format!(
            "{}: {}",
            msg.code.unwrap_or("error"),
            msg.message.unwrap_or_default()
        ))),
        other => Err(garbage(
            "unknown_message",
            format!("unexpected tickfan message type {other:?}"),
        )),
    }
}

fn tickfan_tick(text: &str, symbols: &Symbols, state: &mut SourceState, out: &mut impl Emit) {
    match serde_json::from_str::<TickfanTick<'_>>(text) {
        Ok(t) => {
            let trade = Trade {
                symbol: t.symbol,
                ts: t.ts,
                price: t.price,
                volume: t.volume,
                id: t.id.map(|id| match id {
                    TickfanId::Int(i) => TradeRef::Int(i),
                    TickfanId::Str(s) => TradeRef::Str(s),
                }),
                extra: t.extra,
            };
            emit(checked(trade, symbols), t.seq, symbols, state, out);
        }
        Err(e) => out.garbage(garbage("bad_json", format!("not a tickfan tick: {e}"))),
    }
}

/// An RFC 3339 UTC time (`2014-11-07T08:19:27.028459Z`) as ms since the epoch.
fn rfc3339_ms(s: &str) -> Result<i64, Garbage> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| garbage("invalid_timestamp", format!("time {s:?}: {e}")))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| garbage("invalid_timestamp", format!("time {s:?} out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Seen {
        trades: Vec<(String, i64, f64, f64, Option<u64>)>,
        garbage: Vec<&'static str>,
        gaps: Vec<Gap>,
    }

    impl Emit for Seen {
        fn trade(&mut self, t: Trade<'_>) {
            let id = match t.id {
                Some(TradeRef::Int(i)) => Some(i),
                _ => None,
            };
            self.trades
                .push((t.symbol.to_owned(), t.ts, t.price, t.volume, id));
        }
        fn garbage(&mut self, g: Garbage) {
            self.garbage.push(g.code);
        }
        fn gap(&mut self, gap: Gap) {
            self.gaps.push(gap);
        }
    }

    fn run(
        kind: UpstreamKind,
        syms: &[&str],
        msgs: &[&str],
    ) -> (Seen, Vec<Result<Event, Garbage>>) {
        let symbols = Symbols::new(&syms.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        let mut state = SourceState::default();
        let mut seen = Seen::default();
        let events = msgs
            .iter()
            .map(|m| normalize(kind, m, 16, &symbols, &mut state, &mut seen))
            .collect();
        (seen, events)
    }

    #[test]
    fn rfc3339_to_ms() {
        assert_eq!(
            rfc3339_ms("2014-11-07T08:19:27.028459Z").unwrap(),
            1_415_348_367_028
        );
        assert!(rfc3339_ms("yesterday").is_err());
    }

    #[test]
    fn binance_trade_ids_reveal_gaps_and_replays_do_not() {
        let t = |id: u64| {
            format!(
                r#"{{"e":"trade","E":1,"s":"BTCUSDT","t":{id},"p":"1.5","q":"2","T":1000,"m":true,"M":true}}"#
            )
        };
        let (seen, _) = run(
            UpstreamKind::Binance,
            &["BTCUSDT"],
            &[&t(10), &t(11), &t(15), &t(12)],
        );
        assert_eq!(seen.trades.len(), 4);
        assert_eq!(
            seen.gaps,
            vec![Gap {
                symbol: "BTCUSDT".into(),
                missed: 3
            }]
        );
    }

    #[test]
    fn garbage_codes() {
        let (seen, events) = run(
            UpstreamKind::Binance,
            &["BTCUSDT"],
            &[
                "not json",
                r#"{"e":"kline"}"#,
                r#"{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"-1","q":"2","T":1000}"#,
                r#"{"e":"trade","E":1,"s":"ETHUSDT","t":1,"p":"1","q":"2","T":1000}"#,
                &format!("{}{}", "[".repeat(20), "]".repeat(20)),
            ],
        );
        assert_eq!(events[0].as_ref().unwrap_err().code, "bad_json");
        assert_eq!(events[1].as_ref().unwrap_err().code, "unknown_message");
        assert_eq!(seen.garbage, vec!["invalid_price", "unknown_symbol"]);
        assert_eq!(events[4].as_ref().unwrap_err().code, "bad_json");
        assert!(seen.trades.is_empty());
    }
}

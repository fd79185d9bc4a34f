//! The tick model: what producers send once validated (`Tick`), its priority, and its one
//! serialization to the wire. A tick is serialized exactly once, after the dispatcher stamps its
//! `seq`, and the same bytes go to every client, snapshot, batch and history answer.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// A validated symbol name: 1-32 of `A-Z a-z 0-9 . - _ / :`. Cheap to clone (shared), and one
/// word wide: thousands of clients each hold their symbols, so a thin pointer to a fixed-size
/// name halves what a `&str`-style fat pointer would cost them. Compares, orders and hashes as
/// its name.
#[derive(Clone)]
pub struct Symbol(Arc<SymbolName>);

/// The bytes of a symbol name, at most [`Symbol::MAX_LEN`].
struct SymbolName {
    len: u8,
    bytes: [u8; Symbol::MAX_LEN],
}

impl Symbol {
    /// Longest accepted symbol.
    pub const MAX_LEN: usize = 32;

    /// Validates and wraps a symbol name; `None` when it breaks the contract's rules.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        if !Self::is_valid(s) {
            return None;
        }
        let mut bytes = [0u8; Self::MAX_LEN];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        // At most MAX_LEN (32) by `is_valid`.
        let len = s.len() as u8;
        Some(Self(Arc::new(SymbolName { len, bytes })))
    }

    /// Whether `s` is a well-formed symbol name.
    #[must_use]
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b':'))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        let name = &*self.0;
        let bytes = &name.bytes[..usize::from(name.len)];
        // Only ever built from a validated `&str` (ASCII), in `parse`.
        std::str::from_utf8(bytes).unwrap_or_default()
    }
}

impl PartialEq for Symbol {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_str() == other.as_str()
    }
}

impl Eq for Symbol {}

impl std::hash::Hash for Symbol {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl PartialOrd for Symbol {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Symbol {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Symbol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Delivery priority, highest first. The discriminant is the queue lane index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Never refused while any queue capacity remains; bypasses throttling and volume filters.
    Critical = 0,
    /// Refused after normal and low.
    High = 1,
    /// The default.
    #[default]
    Normal = 2,
    /// Refused first when the queue fills.
    Low = 3,
}

impl Priority {
    /// All priorities, highest first (lane order).
    pub const ALL: [Priority; 4] = [Self::Critical, Self::High, Self::Normal, Self::Low];

    /// Parses the wire name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "critical" => Some(Self::Critical),
            "high" => Some(Self::High),
            "normal" => Some(Self::Normal),
            "low" => Some(Self::Low),
            _ => None,
        }
    }

    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    /// Lane index, 0 for critical.
    #[must_use]
    pub fn lane(self) -> usize {
        self as usize
    }
}

/// A producer's trade id, passed through as it came (string or integer).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TradeId {
    /// `"id":"abc"`
    Str(Box<str>),
    /// `"id":123`
    Int(i64),
}

/// A validated, accepted tick. `seq` is 0 until the dispatcher assigns it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// The instrument.
    pub symbol: Symbol,
    /// Event time, ms since the Unix epoch (producer's clock).
    pub ts: i64,
    /// Last trade price, finite and > 0.
    pub price: f64,
    /// Trade volume, finite and >= 0.
    pub volume: f64,
    /// Best bid, when the producer sent one.
    pub bid: Option<f64>,
    /// Best ask.
    pub ask: Option<f64>,
    /// Bar-style open, passed through.
    pub open: Option<f64>,
    /// Bar-style high.
    pub high: Option<f64>,
    /// Bar-style low.
    pub low: Option<f64>,
    /// Bar-style close.
    pub close: Option<f64>,
    /// Producer's trade id.
    pub id: Option<TradeId>,
    /// Queue priority.
    pub priority: Priority,
    /// 0-100 data quality score (see docs/quality.md).
    pub quality: u8,
    /// Server receive time, µs since the Unix epoch.
    pub t_in: i64,
    /// Per-symbol sequence number, assigned as the tick leaves the priority queue.
    pub seq: u64,
}

impl Tick {
    /// A normal-priority tick with only the required fields (quality 100, seq 0, `t_in` 0);
    /// set the rest by field.
    #[must_use]
    pub fn new(symbol: Symbol, ts: i64, price: f64, volume: f64) -> Self {
        Self {
            symbol,
            ts,
            price,
            volume,
            bid: None,
            ask: None,
            open: None,
            high: None,
            low: None,
            close: None,
            id: None,
            priority: Priority::Normal,
            quality: 100,
            t_in: 0,
            seq: 0,
        }
    }

    /// Appends this tick's wire object (`{"type":"tick",...}`) to `out`. Written by hand with
    /// itoa/ryu because it runs once per tick on the hot path; the format is JSON and the
    /// symbol needs no escaping by construction.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut int = itoa::Buffer::new();
        out.extend_from_slice(b"{\"type\":\"tick\",\"symbol\":\"");
        out.extend_from_slice(self.symbol.as_str().as_bytes());
        out.extend_from_slice(b"\",\"seq\":");
        out.extend_from_slice(int.format(self.seq).as_bytes());
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(int.format(self.ts).as_bytes());
        write_f64_field(out, b",\"price\":", self.price);
        write_f64_field(out, b",\"volume\":", self.volume);
        out.extend_from_slice(b",\"quality\":");
        out.extend_from_slice(int.format(self.quality).as_bytes());
        out.extend_from_slice(b",\"t_in\":");
        out.extend_from_slice(int.format(self.t_in).as_bytes());
        for (name, value) in [
            (&b",\"bid\":"[..], self.bid),
            (b",\"ask\":", self.ask),
            (b",\"open\":", self.open),
            (b",\"high\":", self.high),
            (b",\"low\":", self.low),
            (b",\"close\":", self.close),
        ] {
            if let Some(v) = value {
                write_f64_field(out, name, v);
            }
        }
        match &self.id {
            Some(TradeId::Int(i)) => {
                out.extend_from_slice(b",\"id\":");
                out.extend_from_slice(int.format(*i).as_bytes());
            }
            Some(TradeId::Str(s)) => {
                out.extend_from_slice(b",\"id\":");
                // serde_json escapes the producer's string; writing to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, &**s);
            }
            None => {}
        }
        if self.priority != Priority::Normal {
            out.extend_from_slice(b",\"priority\":\"");
            out.extend_from_slice(self.priority.as_str().as_bytes());
            out.push(b'"');
        }
        out.push(b'}');
    }

    /// The wire object as a fresh `String`.
    #[must_use]
    pub fn to_json(&self) -> String {
        let mut out = Vec::with_capacity(192);
        self.write_json(&mut out);
        // Only ASCII and serde_json-escaped strings were written.
        String::from_utf8(out).expect("tick JSON is UTF-8")
    }
}

fn write_f64_field(out: &mut Vec<u8>, name: &[u8], v: f64) {
    out.extend_from_slice(name);
    // Integral values print without ".0" noise up to 2^53; ryu handles the rest. Validation
    // guarantees finiteness.
    if v.fract() == 0.0 && v.abs() < 9.007_199_254_740_992e15 {
        #[allow(clippy::cast_possible_truncation)]
        out.extend_from_slice(itoa::Buffer::new().format(v as i64).as_bytes());
    } else {
        out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    }
}

/// Current wall-clock time in ms since the Unix epoch.
#[must_use]
pub fn now_ms() -> i64 {
    now_us() / 1000
}

/// Current wall-clock time in µs since the Unix epoch.
#[must_use]
pub fn now_us() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick() -> Tick {
        Tick {
            symbol: Symbol::parse("AAPL").unwrap(),
            ts: 1_700_000_000_000,
            price: 187.25,
            volume: 100.0,
            bid: Some(187.2),
            ask: None,
            open: None,
            high: None,
            low: None,
            close: None,
            id: Some(TradeId::Str("t\"1".into())),
            priority: Priority::Critical,
            quality: 95,
            t_in: 1_700_000_000_000_123,
            seq: 7,
        }
    }

    #[test]
    fn json_is_valid_and_complete() {
        let v: serde_json::Value = serde_json::from_str(&tick().to_json()).unwrap();
        assert_eq!(v["type"], "tick");
        assert_eq!(v["symbol"], "AAPL");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["price"], 187.25);
        assert_eq!(v["volume"], 100);
        assert_eq!(v["bid"], 187.2);
        assert!(v.get("ask").is_none());
        assert_eq!(v["id"], "t\"1");
        assert_eq!(v["priority"], "critical");
        assert_eq!(v["t_in"], 1_700_000_000_000_123_i64);
    }

    #[test]
    fn normal_priority_is_omitted_and_int_ids_stay_ints() {
        let mut t = tick();
        t.priority = Priority::Normal;
        t.id = Some(TradeId::Int(42));
        let v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        assert!(v.get("priority").is_none());
        assert_eq!(v["id"], 42);
    }

    #[test]
    fn symbol_rules() {
        for ok in ["AAPL", "BTC-USD", "a.b_c/d:e", &"X".repeat(32)] {
            assert!(Symbol::is_valid(ok), "{ok}");
        }
        for bad in ["", "A B", "ÄPL", &"X".repeat(33), "A*", "A\"B"] {
            assert!(!Symbol::is_valid(bad), "{bad}");
        }
    }
}

//! Validation: one tick object in, a `Tick` (quality and seq not yet set) or a `Reject` with
//! the contract's code out. Pure and clock-injected, so tests pin `now`. The first failing rule
//! wins, in the order the checks appear below.

use crate::ingest::parse::{Field, TickObject};
use crate::tick::{Priority, Symbol, Tick, TradeId};

/// Why a tick was rejected. `as_str` is the wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectCode {
    /// Not JSON, or not a JSON object.
    BadJson,
    /// A required field is absent.
    MissingField,
    /// `symbol` is not a string of 1-32 allowed characters (or the symbol limit is reached).
    InvalidSymbol,
    /// `price`, `bid` or `ask` is not a finite number > 0.
    InvalidPrice,
    /// `volume` is not a finite number >= 0.
    InvalidVolume,
    /// `open/high/low/close` is not a finite number > 0, or high < low, or open/close is
    /// outside [low, high].
    InvalidOhlc,
    /// bid > ask.
    CrossedQuote,
    /// `ts` is further ahead of the server clock than `max_future_ms`.
    FutureTimestamp,
    /// `ts` is older than `max_age_ms` (live ingest only).
    StaleTimestamp,
    /// Extension: `ts` is not an integer.
    InvalidTimestamp,
    /// Extension: `id` or `priority` has the wrong type or value.
    InvalidField,
    /// Extension: accepted, but its queue TTL ran out before dispatch.
    Expired,
    /// The producer's token does not permit the symbol (`ingest_symbols`).
    Forbidden,
}

impl RejectCode {
    /// Every code, for metrics labels.
    pub const ALL: [RejectCode; 13] = [
        Self::BadJson,
        Self::MissingField,
        Self::InvalidSymbol,
        Self::InvalidPrice,
        Self::InvalidVolume,
        Self::InvalidOhlc,
        Self::CrossedQuote,
        Self::FutureTimestamp,
        Self::StaleTimestamp,
        Self::InvalidTimestamp,
        Self::InvalidField,
        Self::Expired,
        Self::Forbidden,
    ];

    /// The wire code.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::MissingField => "missing_field",
            Self::InvalidSymbol => "invalid_symbol",
            Self::InvalidPrice => "invalid_price",
            Self::InvalidVolume => "invalid_volume",
            Self::InvalidOhlc => "invalid_ohlc",
            Self::CrossedQuote => "crossed_quote",
            Self::FutureTimestamp => "future_timestamp",
            Self::StaleTimestamp => "stale_timestamp",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::InvalidField => "invalid_field",
            Self::Expired => "expired",
            Self::Forbidden => "forbidden",
        }
    }
}

/// A rejection: code plus a human message.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// Machine-readable code.
    pub code: RejectCode,
    /// What was wrong, for people.
    pub message: String,
}

impl Reject {
    fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Clock-related limits of validation.
#[derive(Debug, Clone, Copy)]
pub struct TimeRules {
    /// Server clock, ms since epoch.
    pub now_ms: i64,
    /// `validation.max_future_ms`.
    pub max_future_ms: i64,
    /// `validation.max_age_ms`; `None` disables the stale check (import).
    pub max_age_ms: Option<i64>,
}

/// Longest accepted string trade id, bytes.
const MAX_ID_LEN: usize = 128;

/// Validates one tick object. `t_in` is the server receive time (µs).
///
/// # Errors
/// The first rule the tick breaks.
pub fn validate(obj: &TickObject<'_, '_>, rules: TimeRules, t_in: i64) -> Result<Tick, Reject> {
    let [symbol, ts, price, volume, bid, ask, open, high, low, close, id, priority] = obj.fields();
    for (name, field) in [
        ("symbol", &symbol),
        ("ts", &ts),
        ("price", &price),
        ("volume", &volume),
    ] {
        if *field == Field::Absent {
            return Err(Reject::new(
                RejectCode::MissingField,
                format!("missing required field `{name}`"),
            ));
        }
    }
    let symbol = match symbol {
        Field::Str(s) => Symbol::parse(&s).ok_or_else(|| {
            Reject::new(
                RejectCode::InvalidSymbol,
                "symbol must be 1-32 of A-Z a-z 0-9 . - _ / :",
            )
        })?,
        _ => {
            return Err(Reject::new(
                RejectCode::InvalidSymbol,
                "symbol must be a string",
            ))
        }
    };
    let ts = match ts {
        Field::Int(i) => i,
        #[allow(clippy::cast_possible_truncation)]
        Field::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
        _ => {
            return Err(Reject::new(
                RejectCode::InvalidTimestamp,
                "ts must be an integer (ms since epoch)",
            ))
        }
    };
    let price = positive(&price, "price", RejectCode::InvalidPrice)?;
    let volume = match volume.as_f64() {
        Some(v) if v.is_finite() && v >= 0.0 => v,
        _ => {
            return Err(Reject::new(
                RejectCode::InvalidVolume,
                "volume must be a finite number >= 0",
            ))
        }
    };
    let bid = optional_positive(&bid, "bid", RejectCode::InvalidPrice)?;
    let ask = optional_positive(&ask, "ask", RejectCode::InvalidPrice)?;
    if let (Some(b), Some(a)) = (bid, ask) {
        if b > a {
            return Err(Reject::new(
                RejectCode::CrossedQuote,
                format!("bid {b} is above ask {a}"),
            ));
        }
    }
    let open = optional_positive(&open, "open", RejectCode::InvalidOhlc)?;
    let high = optional_positive(&high, "high", RejectCode::InvalidOhlc)?;
    let low = optional_positive(&low, "low", RejectCode::InvalidOhlc)?;
    let close = optional_positive(&close, "close", RejectCode::InvalidOhlc)?;
    if let (Some(h), Some(l)) = (high, low) {
        if h < l {
            return Err(Reject::new(
                RejectCode::InvalidOhlc,
                format!("high {h} is below low {l}"),
            ));
        }
        for (name, v) in [("open", open), ("close", close)] {
            if let Some(v) = v.filter(|v| *v < l || *v > h) {
                return Err(Reject::new(
                    RejectCode::InvalidOhlc,
                    format!("{name} {v} is outside [low {l}, high {h}]"),
                ));
            }
        }
    }
    let id = match id {
        Field::Absent | Field::Null => None,
        Field::Str(s) if !s.is_empty() && s.len() <= MAX_ID_LEN => Some(TradeId::Str(s.into())),
        Field::Int(i) => Some(TradeId::Int(i)),
        _ => {
            return Err(Reject::new(
                RejectCode::InvalidField,
                format!("id must be an integer or a string of 1-{MAX_ID_LEN} bytes"),
            ))
        }
    };
    let priority = match priority {
        Field::Absent | Field::Null => Priority::Normal,
        Field::Str(s) => Priority::parse(&s).ok_or_else(|| {
            Reject::new(
                RejectCode::InvalidField,
                "priority must be critical, high, normal or low",
            )
        })?,
        _ => {
            return Err(Reject::new(
                RejectCode::InvalidField,
                "priority must be a string",
            ))
        }
    };
    if ts > rules.now_ms.saturating_add(rules.max_future_ms) {
        return Err(Reject::new(
            RejectCode::FutureTimestamp,
            format!(
                "ts is {} ms ahead of the server clock (max {})",
                ts - rules.now_ms,
                rules.max_future_ms
            ),
        ));
    }
    if let Some(max_age) = rules.max_age_ms {
        if ts < rules.now_ms.saturating_sub(max_age) {
            return Err(Reject::new(
                RejectCode::StaleTimestamp,
                format!(
                    "ts is older than {max_age} ms{}",
                    seconds_hint(ts, rules.now_ms)
                ),
            ));
        }
    }
    Ok(Tick {
        symbol,
        ts,
        price,
        volume,
        bid,
        ask,
        open,
        high,
        low,
        close,
        id,
        priority,
        quality: 0,
        t_in,
        seq: 0,
    })
}

fn positive(field: &Field<'_>, name: &str, code: RejectCode) -> Result<f64, Reject> {
    match field.as_f64() {
        Some(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(Reject::new(
            code,
            format!("{name} must be a finite number > 0"),
        )),
    }
}

fn optional_positive(
    field: &Field<'_>,
    name: &str,
    code: RejectCode,
) -> Result<Option<f64>, Reject> {
    match field {
        Field::Absent | Field::Null => Ok(None),
        f => positive(f, name, code).map(Some),
    }
}

/// A hint for the most common stale `ts`: seconds where milliseconds are expected. A ts in
/// seconds is ~1000x smaller than now in ms; anything within a day of now read as seconds
/// qualifies.
fn seconds_hint(ts: i64, now_ms: i64) -> &'static str {
    const DAY_S: i64 = 86_400;
    if ts > 0 && (ts - now_ms / 1000).abs() <= DAY_S {
        "; ts looks like seconds; tickfan expects milliseconds since the epoch"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::parse::{parse_document, Element};

    const NOW: i64 = 1_700_000_000_000;

    fn check(text: &str) -> Result<Tick, RejectCode> {
        let mut scratch = text.as_bytes().to_vec();
        let parsed = parse_document(&mut scratch, text, 64).map_err(|_| RejectCode::BadJson)?;
        let mut out = None;
        parsed.for_each_element(|e| {
            out = Some(match e {
                Element::Object(o) => validate(
                    &o,
                    TimeRules {
                        now_ms: NOW,
                        max_future_ms: 5_000,
                        max_age_ms: Some(86_400_000),
                    },
                    1,
                )
                .map_err(|r| r.code),
                Element::NotObject(_) => Err(RejectCode::BadJson),
            });
        });
        out.unwrap()
    }

    fn tick(extra: &str) -> String {
        format!(r#"{{"symbol":"AAPL","ts":{NOW},"price":10.5,"volume":3{extra}}}"#)
    }

    #[test]
    fn plain_tick_passes_with_optional_fields() {
        let t = check(&tick(
            r#","bid":10.4,"ask":10.6,"open":10,"high":11,"low":9,"close":10.5,"id":"x1","priority":"high""#,
        ))
        .unwrap();
        assert_eq!(t.symbol.as_str(), "AAPL");
        assert_eq!(t.priority, Priority::High);
        assert_eq!(t.id, Some(TradeId::Str("x1".into())));
        assert_eq!(t.high, Some(11.0));
    }

    #[test]
    fn every_reject_code() {
        let cases: &[(String, RejectCode)] = &[
            ("{oops".into(), RejectCode::BadJson),
            ("42".into(), RejectCode::BadJson),
            (
                format!(r#"{{"symbol":"A","ts":{NOW},"volume":1}}"#),
                RejectCode::MissingField,
            ),
            (
                tick("").replace("AAPL", "BAD SYM"),
                RejectCode::InvalidSymbol,
            ),
            (tick("").replace("\"AAPL\"", "7"), RejectCode::InvalidSymbol),
            (tick("").replace("10.5", "-1"), RejectCode::InvalidPrice),
            (tick("").replace("10.5", "0"), RejectCode::InvalidPrice),
            (
                tick("").replace("10.5", "\"10.5\""),
                RejectCode::InvalidPrice,
            ),
            (tick("").replace("10.5", "1e400"), RejectCode::InvalidPrice),
            (
                tick("").replace("\"volume\":3", "\"volume\":-3"),
                RejectCode::InvalidVolume,
            ),
            (
                tick("").replace("\"volume\":3", "\"volume\":\"x\""),
                RejectCode::InvalidVolume,
            ),
            (tick(r#","high":9,"low":10"#), RejectCode::InvalidOhlc),
            (
                tick(r#","open":12,"high":11,"low":9"#),
                RejectCode::InvalidOhlc,
            ),
            (
                tick(r#","close":8,"high":11,"low":9"#),
                RejectCode::InvalidOhlc,
            ),
            (tick(r#","open":-1"#), RejectCode::InvalidOhlc),
            (tick(r#","bid":11,"ask":10"#), RejectCode::CrossedQuote),
            (tick(r#","bid":"x""#), RejectCode::InvalidPrice),
            (
                tick("").replace(&NOW.to_string(), &(NOW + 60_000).to_string()),
                RejectCode::FutureTimestamp,
            ),
            (
                tick("").replace(&NOW.to_string(), &(NOW - 90_000_000).to_string()),
                RejectCode::StaleTimestamp,
            ),
            (
                tick("").replace(&NOW.to_string(), "\"yesterday\""),
                RejectCode::InvalidTimestamp,
            ),
            (tick(r#","priority":"urgent""#), RejectCode::InvalidField),
            (tick(r#","id":[1]"#), RejectCode::InvalidField),
        ];
        for (text, code) in cases {
            assert_eq!(check(text).err(), Some(*code), "{text}");
        }
    }

    #[test]
    fn stale_check_can_be_disabled_for_import() {
        let text = tick("").replace(&NOW.to_string(), "1000");
        let mut scratch = text.as_bytes().to_vec();
        let parsed = parse_document(&mut scratch, &text, 64).unwrap();
        parsed.for_each_element(|e| {
            let Element::Object(o) = e else { panic!() };
            let rules = TimeRules {
                now_ms: NOW,
                max_future_ms: 0,
                max_age_ms: None,
            };
            assert!(validate(&o, rules, 0).is_ok());
        });
    }
}

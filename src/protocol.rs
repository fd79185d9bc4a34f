//! The client WebSocket protocol (`/ws`): requests parsed from text frames, and the reply
//! messages built for them. Ticks themselves are serialized in `tick.rs`; everything here is
//! low-rate control traffic, so it uses plain serde_json. A request is first read as a generic
//! object so its `id` can be echoed even when the rest of it is wrong.

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::json_depth;

/// Delivery mode of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every matching tick as its own message, at once.
    #[default]
    Realtime,
    /// At most one message per symbol per interval, the latest tick, with a conflated count.
    Throttled,
    /// All matching ticks every interval as one `batch` message.
    Batch,
    /// Realtime while the client keeps up; batch, then conflation, while it lags.
    Smart,
}

impl Mode {
    /// Parses the wire name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "realtime" => Some(Self::Realtime),
            "throttled" => Some(Self::Throttled),
            "batch" => Some(Self::Batch),
            "smart" => Some(Self::Smart),
            _ => None,
        }
    }

    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Realtime => "realtime",
            Self::Throttled => "throttled",
            Self::Batch => "batch",
            Self::Smart => "smart",
        }
    }
}

/// Connection-wide delivery settings; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Settings {
    /// Delivery mode.
    pub mode: Option<Mode>,
    /// Interval for throttled/batch/smart, ms.
    pub interval_ms: Option<u64>,
    /// Minimum quality.
    pub min_quality: Option<u8>,
    /// Minimum volume (critical ticks ignore it).
    pub min_volume: Option<f64>,
}

/// A parsed client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Add symbols (and set connection-wide settings).
    Subscribe {
        /// Symbols as sent (validated by the dispatcher, which reports each bad one).
        symbols: Vec<String>,
        /// Settings carried by the request.
        settings: Settings,
        /// Last N stored ticks per symbol before live ticks.
        history: usize,
        /// Resume points: replay stored ticks with seq > S.
        since_seq: HashMap<String, u64>,
    },
    /// Remove symbols.
    Unsubscribe {
        /// Symbols to drop (`*` drops the wildcard).
        symbols: Vec<String>,
    },
    /// Change settings only.
    Configure(Settings),
    /// List known symbols.
    Symbols,
    /// Round trip.
    Ping,
    /// Late authentication.
    Auth {
        /// The token.
        token: Token,
    },
}

/// A token as a request carries it: its `Debug` never shows it, so a request can be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// A request that could not be understood; echo `id` with `bad_request`.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    /// The request's `id`, if it had one.
    pub id: Option<Value>,
    /// What was wrong.
    pub message: String,
}

/// Largest `history` a subscribe may ask for.
pub const MAX_HISTORY: usize = 1_000;

/// Parses one text frame into `(id, request)`, nested at most
/// [`json_depth::DEFAULT_MAX_DEPTH`] levels (see [`parse_request_with_depth`]).
///
/// # Errors
/// [`BadRequest`] with the id (when readable) and a message naming the problem.
pub fn parse_request(text: &str) -> Result<(Option<Value>, Request), BadRequest> {
    parse_request_with_depth(text, json_depth::DEFAULT_MAX_DEPTH)
}

/// Parses one text frame into `(id, request)`. The nesting is checked against `max_depth`
/// (`limits.max_json_depth`) before parsing: a request is at most 2 levels deep, and a deeper
/// one gets `bad_request` without the parser ever recursing into it.
///
/// # Errors
/// [`BadRequest`] with the id (when readable) and a message naming the problem.
pub fn parse_request_with_depth(
    text: &str,
    max_depth: usize,
) -> Result<(Option<Value>, Request), BadRequest> {
    json_depth::check(text.as_bytes(), max_depth).map_err(|e| BadRequest {
        id: None,
        message: e.to_string(),
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| BadRequest {
        id: None,
        message: format!("not valid JSON: {e}"),
    })?;
    let Value::Object(obj) = value else {
        return Err(BadRequest {
            id: None,
            message: "a request must be a JSON object".into(),
        });
    };
    let id = obj.get("id").cloned();
    let bad = |message: String| BadRequest {
        id: id.clone(),
        message,
    };
    let op = match obj.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(bad("`op` must be a string".into())),
        None => return Err(bad("missing `op`".into())),
    };
    let request = match op {
        "subscribe" => Request::Subscribe {
            symbols: symbol_list(&obj).map_err(bad)?,
            settings: settings(&obj).map_err(bad)?,
            history: match obj.get("history") {
                None | Some(Value::Null) => 0,
                Some(v) => match v.as_u64() {
                    Some(n) if n <= MAX_HISTORY as u64 => usize::try_from(n).unwrap_or(0),
                    _ => return Err(bad(format!("`history` must be an integer 0-{MAX_HISTORY}"))),
                },
            },
            since_seq: since_seq(&obj).map_err(bad)?,
        },
        "unsubscribe" => Request::Unsubscribe {
            symbols: symbol_list(&obj).map_err(bad)?,
        },
        "configure" => Request::Configure(settings(&obj).map_err(bad)?),
        "symbols" => Request::Symbols,
        "ping" => Request::Ping,
        "auth" => match obj.get("token") {
            Some(Value::String(t)) => Request::Auth {
                token: Token(t.clone()),
            },
            _ => return Err(bad("`token` must be a string".into())),
        },
        other => return Err(bad(format!("unknown op `{other}`"))),
    };
    Ok((id, request))
}

fn symbol_list(obj: &Map<String, Value>) -> Result<Vec<String>, String> {
    match obj.get("symbols") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "`symbols` must be an array of strings".to_owned()),
        Some(Value::Array(_)) => Err("`symbols` must not be empty".into()),
        Some(_) => Err("`symbols` must be an array of strings".into()),
        None => Err("missing `symbols`".into()),
    }
}

fn settings(obj: &Map<String, Value>) -> Result<Settings, String> {
    let present = |k: &str| obj.get(k).filter(|v| !v.is_null());
    Ok(Settings {
        mode: match present("mode") {
            None => None,
            Some(v) => {
                Some(v.as_str().and_then(Mode::parse).ok_or_else(|| {
                    "`mode` must be realtime, throttled, batch or smart".to_owned()
                })?)
            }
        },
        interval_ms: match present("interval_ms") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|n| (1..=3_600_000).contains(n))
                    .ok_or("`interval_ms` must be an integer 1-3600000")?,
            ),
        },
        min_quality: match present("min_quality") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u8::try_from(n).ok())
                    .filter(|n| *n <= 100)
                    .ok_or("`min_quality` must be an integer 0-100")?,
            ),
        },
        min_volume: match present("min_volume") {
            None => None,
            Some(v) => Some(
                v.as_f64()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or("`min_volume` must be a finite number >= 0")?,
            ),
        },
    })
}

fn since_seq(obj: &Map<String, Value>) -> Result<HashMap<String, u64>, String> {
    match obj.get("since_seq") {
        None | Some(Value::Null) => Ok(HashMap::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                v.as_u64()
                    .map(|s| (k.clone(), s))
                    .ok_or_else(|| format!("`since_seq.{k}` must be an integer >= 0"))
            })
            .collect(),
        Some(_) => Err("`since_seq` must be an object of symbol -> seq".into()),
    }
}

/// Error codes a client can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Malformed or unknown request, binary frame.
    BadRequest,
    /// A symbol name breaks the rules.
    InvalidSymbol,
    /// Over `max_symbols`.
    TooManySymbols,
    /// Missing or wrong token.
    Unauthorized,
    /// Over `ops_per_sec`.
    RateLimited,
    /// Server-side failure.
    Internal,
    /// Outbound buffer overflow (followed by close 4008).
    SlowConsumer,
    /// A symbol outside what the connection's token permits.
    Forbidden,
    /// The connection's token expired (followed by close 4001), or an expired one was sent.
    TokenExpired,
}

impl ErrorCode {
    /// Wire code.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidSymbol => "invalid_symbol",
            Self::TooManySymbols => "too_many_symbols",
            Self::Unauthorized => "unauthorized",
            Self::RateLimited => "rate_limited",
            Self::Internal => "internal",
            Self::SlowConsumer => "slow_consumer",
            Self::Forbidden => "forbidden",
            Self::TokenExpired => "token_expired",
        }
    }
}

/// `{"type":"error",...}`
#[must_use]
pub fn error_message(
    id: Option<&Value>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> String {
    let mut m = Map::new();
    m.insert("type".into(), "error".into());
    if let Some(id) = id {
        m.insert("id".into(), id.clone());
    }
    m.insert("code".into(), code.as_str().into());
    m.insert("message".into(), message.into());
    if let Some(r) = retry_after_ms {
        m.insert("retry_after_ms".into(), r.into());
    }
    Value::Object(m).to_string()
}

/// Close codes.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// Server shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// Malformed WebSocket framing (RFC 6455).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message that is not UTF-8 (RFC 6455).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy violation (sustained rate abuse, origin).
    pub const POLICY: u16 = 1008;
    /// Frame or message too big.
    pub const TOO_BIG: u16 = 1009;
    /// Missing or wrong token.
    pub const UNAUTHORIZED: u16 = 4001;
    /// Outbound buffer overflow.
    pub const SLOW_CONSUMER: u16 = 4008;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_subscribe() {
        let (id, req) = parse_request(
            r#"{"op":"subscribe","id":1,"symbols":["AAPL","*"],"mode":"batch","interval_ms":100,"min_quality":50,"min_volume":2.5,"history":10,"since_seq":{"AAPL":120}}"#,
        )
        .unwrap();
        assert_eq!(id, Some(Value::from(1)));
        let Request::Subscribe {
            symbols,
            settings,
            history,
            since_seq,
        } = req
        else {
            panic!()
        };
        assert_eq!(symbols, ["AAPL", "*"]);
        assert_eq!(settings.mode, Some(Mode::Batch));
        assert_eq!(settings.min_volume, Some(2.5));
        assert_eq!(history, 10);
        assert_eq!(since_seq["AAPL"], 120);
    }

    #[test]
    fn bad_requests_keep_the_id() {
        for (text, needle) in [
            (r#"{"op":"dance","id":"x"}"#, "unknown op"),
            (r#"{"op":"subscribe","id":"x"}"#, "missing `symbols`"),
            (r#"{"op":"subscribe","id":"x","symbols":"AAPL"}"#, "array"),
            (r#"{"op":"configure","id":"x","mode":"warp"}"#, "mode"),
            (
                r#"{"op":"configure","id":"x","min_quality":101}"#,
                "min_quality",
            ),
            (
                r#"{"op":"subscribe","id":"x","symbols":["A"],"history":5000}"#,
                "history",
            ),
            (r#"{"id":"x"}"#, "missing `op`"),
        ] {
            let err = parse_request(text).unwrap_err();
            assert_eq!(err.id, Some(Value::from("x")), "{text}");
            assert!(err.message.contains(needle), "{text}: {}", err.message);
        }
        assert!(parse_request("nope").unwrap_err().id.is_none());
        assert!(parse_request("[1]").is_err());
    }

    #[test]
    fn deep_requests_are_bad_requests_not_crashes() {
        for text in [
            "[".repeat(200_000),
            format!(
                r#"{{"op":"subscribe","symbols":{}"A"{}}}"#,
                "[".repeat(100),
                "]".repeat(100)
            ),
        ] {
            let err = parse_request(&text).unwrap_err();
            assert!(
                err.message.contains("limits.max_json_depth"),
                "{}",
                err.message
            );
        }
        let err = parse_request_with_depth(r#"{"op":"subscribe","symbols":["A"]}"#, 1).unwrap_err();
        assert!(
            err.message.contains("nested deeper than 1"),
            "{}",
            err.message
        );
        assert!(parse_request_with_depth(r#"{"op":"subscribe","symbols":["A"]}"#, 2).is_ok());
    }

    #[test]
    fn error_message_shape() {
        let v: Value = serde_json::from_str(&error_message(
            Some(&Value::from(3)),
            ErrorCode::RateLimited,
            "slow down",
            Some(50),
        ))
        .unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["id"], 3);
        assert_eq!(v["code"], "rate_limited");
        assert_eq!(v["retry_after_ms"], 50);
    }
}

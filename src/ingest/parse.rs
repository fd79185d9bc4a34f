//! Turns producer bytes into per-tick field accessors. The fast path is simd-json on the
//! producer's (copied, mutable) buffer. A document simd-json refuses (it rejects numbers such
//! as `1e400` that overflow f64) is re-read through serde_json's `RawValue`, which scans
//! numbers without converting them, so an overflowing price becomes `invalid_price` for that
//! one tick rather than `bad_json` for the whole frame. Only text that neither parser accepts
//! is `bad_json`.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::value::RawValue;
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value as TapeValue};

use crate::json_depth::{self, TooDeep};

/// One field of a tick object as the validator sees it, whatever parser produced it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    /// Not present in the object.
    Absent,
    /// `null`
    Null,
    /// A string.
    Str(Cow<'a, str>),
    /// An integer that fits i64.
    Int(i64),
    /// Any other number (possibly infinite when the text overflowed).
    Float(f64),
    /// A bool, object or array.
    Other,
}

impl Field<'_> {
    /// The number, when the field is one.
    #[must_use]
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            #[allow(clippy::cast_precision_loss)]
            Field::Int(i) => Some(*i as f64),
            Field::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// A tick object from either parser, or a CSV row.
pub enum TickObject<'v, 'a> {
    /// From simd-json's tape (fields are looked up in place, no map is built).
    Simd(TapeValue<'v, 'a>),
    /// From the serde_json fallback.
    Raw(HashMap<Cow<'a, str>, &'a RawValue>),
    /// A CSV row (import), read through its header's column map.
    Csv(&'v CsvColumns, &'v csv::StringRecord),
}

/// Tick fields a CSV header may name, in `CsvColumns` index order.
const CSV_FIELDS: [&str; 12] = [
    "symbol", "ts", "price", "volume", "bid", "ask", "open", "high", "low", "close", "id",
    "priority",
];

/// Where each tick field sits in a CSV file's rows, from its header row.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    index: [Option<usize>; 12],
}

impl CsvColumns {
    /// Maps a header row (names are trimmed and matched case-insensitively; unknown columns are
    /// ignored).
    #[must_use]
    pub fn new(headers: &csv::StringRecord) -> Self {
        let mut index = [None; 12];
        for (col, name) in headers.iter().enumerate() {
            let name = name.trim().to_ascii_lowercase();
            if let Some(f) = field_index(&name) {
                index[f] = Some(col);
            }
        }
        Self { index }
    }

    /// Required fields the header lacks.
    #[must_use]
    pub fn missing_required(&self) -> Vec<&'static str> {
        (0..4)
            .filter(|i| self.index[*i].is_none())
            .map(|i| CSV_FIELDS[i])
            .collect()
    }

    fn field<'r>(&self, record: &'r csv::StringRecord, name: &str) -> Field<'r> {
        let Some(f) = field_index(name) else {
            return Field::Absent;
        };
        let Some(text) = self.index[f].and_then(|c| record.get(c)).map(str::trim) else {
            return Field::Absent;
        };
        if text.is_empty() {
            return Field::Absent;
        }
        // CSV is untyped: numeric columns are read as numbers, text ones as strings.
        match name {
            "symbol" | "id" | "priority" => Field::Str(Cow::Borrowed(text)),
            _ => text.parse::<i64>().map_or_else(
                |_| {
                    text.parse::<f64>()
                        .map_or(Field::Str(Cow::Borrowed(text)), Field::Float)
                },
                Field::Int,
            ),
        }
    }
}

/// Position of a tick field name in [`CSV_FIELDS`] (and in [`TickObject::fields`]): one
/// `match` rather than a scan of the list, on the per-tick path. The unit test
/// `fields_walks_the_object_once_and_agrees_with_get` pins it to the list's order.
fn field_index(name: &str) -> Option<usize> {
    Some(match name {
        "symbol" => 0,
        "ts" => 1,
        "price" => 2,
        "volume" => 3,
        "bid" => 4,
        "ask" => 5,
        "open" => 6,
        "high" => 7,
        "low" => 8,
        "close" => 9,
        "id" => 10,
        "priority" => 11,
        _ => return None,
    })
}

impl TickObject<'_, '_> {
    /// Every tick field at once, in [`CSV_FIELDS`] order: `symbol, ts, price, volume, bid, ask,
    /// open, high, low, close, id, priority`. A tape object is walked once, where twelve
    /// lookups would each scan its keys (absent optional fields scan all of them): the scans
    /// were 10 % of the server's CPU with four producers at 700k ticks/s. Of a repeated key the
    /// first wins, as with [`TickObject::get`].
    #[must_use]
    pub fn fields(&self) -> [Field<'_>; 12] {
        match self {
            TickObject::Simd(v) => {
                let mut out = std::array::from_fn(|_| Field::Absent);
                let mut seen = [false; 12];
                if let Some(obj) = v.as_object() {
                    for (key, value) in obj.iter() {
                        if let Some(i) = field_index(key).filter(|i| !seen[*i]) {
                            seen[i] = true;
                            out[i] = simd_field(value);
                        }
                    }
                }
                out
            }
            _ => std::array::from_fn(|i| self.get(CSV_FIELDS[i])),
        }
    }

    /// Looks a field up.
    #[must_use]
    pub fn get(&self, name: &str) -> Field<'_> {
        match self {
            TickObject::Simd(v) => v.get(name).map_or(Field::Absent, simd_field),
            TickObject::Raw(map) => map.get(name).map_or(Field::Absent, |r| raw_field(r)),
            TickObject::Csv(columns, record) => columns.field(record, name),
        }
    }

    /// The object as JSON text, for the dead-letter list.
    #[must_use]
    pub fn to_text(&self) -> String {
        match self {
            TickObject::Simd(v) => v.encode(),
            TickObject::Raw(map) => {
                let mut s = String::from("{");
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(&serde_json::to_string(k).unwrap_or_default());
                    s.push(':');
                    s.push_str(v.get());
                }
                s.push('}');
                s
            }
            TickObject::Csv(_, record) => record.iter().collect::<Vec<_>>().join(","),
        }
    }
}

fn simd_field<'t, 'v: 't>(v: TapeValue<'t, 'v>) -> Field<'v> {
    if v.is_null() {
        Field::Null
    } else if let Some(s) = v.into_string() {
        Field::Str(Cow::Borrowed(s))
    } else if let Some(i) = v.as_i64() {
        Field::Int(i)
    } else if let Some(f) = v.cast_f64() {
        Field::Float(f)
    } else {
        Field::Other
    }
}

fn raw_field<'a>(r: &'a RawValue) -> Field<'a> {
    let text = r.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<Cow<'a, str>>(text).map_or(Field::Other, Field::Str),
        Some(b'n') => Field::Null,
        Some(b'-' | b'0'..=b'9') => text.parse::<i64>().map_or_else(
            // Rust's float parser saturates overflow to ±inf, which validation rejects.
            |_| text.parse::<f64>().map_or(Field::Other, Field::Float),
            Field::Int,
        ),
        _ => Field::Other,
    }
}

/// One element of a frame: a tick object, or the reason it is not one.
pub enum Element<'v, 'a> {
    /// A JSON object to validate.
    Object(TickObject<'v, 'a>),
    /// Not an object; the text for the dead-letter list.
    NotObject(String),
}

/// A parsed frame or line: one tick object or an array of elements.
pub enum Parsed<'a> {
    /// simd-json's tape: a flat list of nodes pointing into the (unescaped) input. Ticks are
    /// read from it in place; building a tree of maps per tick (`BorrowedValue`) was the
    /// largest single cost of `/ingest` at 100k ticks/s.
    Simd(Tape<'a>),
    /// serde_json fallback: the top-level value.
    Raw(&'a RawValue),
}

/// Why a document could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// Nested past `limits.max_json_depth`; refused before any parser ran.
    #[error(transparent)]
    TooDeep(#[from] TooDeep),
    /// Not JSON for either parser. The text is serde_json's (line and column, in words)
    /// rather than simd-json's (`ExpectedNull at character 0` is parser jargon), followed by
    /// what a tick document looks like.
    #[error("not valid JSON ({0}); expected a tick object like {{\"symbol\":\"AAPL\",\"ts\":1732278000000,\"price\":190.1,\"volume\":5}}, a JSON array of them, or NDJSON (one per line)")]
    Invalid(String),
}

/// Documents up to this size are parsed with this thread's kept [`BUFFERS`]; bigger ones
/// (rare: producer frames are usually a few KiB) get buffers of their own, so what a thread
/// keeps stays bounded by this (times the few bytes of index per input byte simd-json uses).
const KEEP_BUFFERS_UP_TO: usize = 64 * 1024;

thread_local! {
    /// simd-json's working buffers (string buffer, structural index, a 64-byte-aligned input
    /// copy, the stage-2 stack), reused by every document parsed on this thread. A fresh set
    /// is four allocations per producer frame, which profiles of `/ingest` at 1,000 frames/s
    /// showed among the top costs of the worker.
    static BUFFERS: std::cell::RefCell<simd_json::Buffers> =
        std::cell::RefCell::new(simd_json::Buffers::default());
}

/// Parses one JSON document nested at most `max_depth` levels. `scratch` is the mutable copy
/// simd-json works in; `original` is the same text, untouched, for the fallback. The depth is
/// checked on simd-json's tape (built without recursion) before anything walks it, and on the
/// bytes before the fallback parser sees them (see `json_depth`).
///
/// # Errors
/// The text is nested too deeply, or is not JSON for either parser.
pub fn parse_document<'a>(
    scratch: &'a mut [u8],
    original: &'a str,
    max_depth: usize,
) -> Result<Parsed<'a>, ParseError> {
    let parsed = if scratch.len() <= KEEP_BUFFERS_UP_TO {
        BUFFERS.with_borrow_mut(|b| simd_json::to_tape_with_buffers(scratch, b))
    } else {
        simd_json::to_tape(scratch)
    };
    match parsed {
        Ok(v) => {
            json_depth::check_tape(&v.0, max_depth)?;
            Ok(Parsed::Simd(v))
        }
        Err(_) => {
            json_depth::check(original.as_bytes(), max_depth)?;
            serde_json::from_str::<&RawValue>(original)
                .map(Parsed::Raw)
                .map_err(|e| ParseError::Invalid(e.to_string()))
        }
    }
}

impl<'a> Parsed<'a> {
    /// Calls `f` with each tick element, with its index within this document.
    pub fn for_each_element(&self, mut f: impl FnMut(Element<'_, '_>)) {
        match self {
            Parsed::Simd(tape) => {
                let v = tape.as_value();
                if let Some(items) = v.as_array() {
                    for item in &items {
                        f(simd_element(item));
                    }
                } else {
                    f(simd_element(v));
                }
            }
            Parsed::Raw(raw) => {
                if raw.get().starts_with('[') {
                    match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                        Ok(items) => items.into_iter().for_each(|r| f(raw_element(r))),
                        Err(_) => f(Element::NotObject(raw.get().to_owned())),
                    }
                } else {
                    f(raw_element(raw));
                }
            }
        }
    }
}

fn simd_element<'v, 'a>(v: TapeValue<'v, 'a>) -> Element<'v, 'a> {
    if v.is_object() {
        Element::Object(TickObject::Simd(v))
    } else {
        Element::NotObject(v.encode())
    }
}

fn raw_element<'v, 'a: 'v>(r: &'a RawValue) -> Element<'v, 'a> {
    match serde_json::from_str::<HashMap<Cow<'a, str>, &'a RawValue>>(r.get()) {
        Ok(map) => Element::Object(TickObject::Raw(map)),
        Err(_) => Element::NotObject(r.get().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_walks_the_object_once_and_agrees_with_get() {
        let text = r#"[{"symbol":"A","ts":5,"symbol":"B","extra":[1,{"price":9}],"price":1.5,"id":null,"priority":"high","close":2},{"volume":3}]"#;
        let mut scratch = text.as_bytes().to_vec();
        let parsed = parse_document(&mut scratch, text, 64).unwrap();
        let mut seen = 0;
        parsed.for_each_element(|e| {
            let Element::Object(o) = e else {
                panic!("objects only")
            };
            let all = o.fields();
            for (i, name) in CSV_FIELDS.iter().enumerate() {
                assert!(all[i] == o.get(name), "{name}: {:?}", all[i]);
            }
            if seen == 0 {
                // The first of a repeated key wins; a nested `price` is not the tick's.
                assert!(all[0] == Field::Str(Cow::Borrowed("A")));
                assert!(all[2] == Field::Float(1.5));
                assert!(all[10] == Field::Null);
                assert!(all[3] == Field::Absent);
            } else {
                assert!(all[3] == Field::Int(3));
            }
            seen += 1;
        });
        assert_eq!(seen, 2);
    }

    fn fields(text: &str, name: &str) -> Vec<Field<'static>> {
        let mut scratch = text.as_bytes().to_vec();
        let parsed = parse_document(&mut scratch, text, 64).unwrap();
        let mut out = Vec::new();
        parsed.for_each_element(|e| match e {
            Element::Object(o) => out.push(match o.get(name) {
                Field::Str(s) => Field::Str(Cow::Owned(s.into_owned())),
                Field::Absent => Field::Absent,
                Field::Null => Field::Null,
                Field::Int(i) => Field::Int(i),
                Field::Float(f) => Field::Float(f),
                Field::Other => Field::Other,
            }),
            Element::NotObject(_) => out.push(Field::Other),
        });
        out
    }

    #[test]
    fn tape_lookup_skips_nested_values_and_unescapes() {
        let text = r#"[{"extra":{"price":9,"l":[1,{"volume":7}]},"symbol":"A\u0042","price":1.5,"volume":2},{"price":null}]"#;
        assert_eq!(
            fields(text, "symbol"),
            vec![Field::Str("AB".into()), Field::Absent]
        );
        assert_eq!(fields(text, "price"), vec![Field::Float(1.5), Field::Null]);
        assert_eq!(fields(text, "volume"), vec![Field::Int(2), Field::Absent]);
        assert_eq!(fields(text, "extra"), vec![Field::Other, Field::Absent]);
    }

    #[test]
    fn simd_path_reads_fields() {
        assert_eq!(fields(r#"{"price":1.5}"#, "price"), vec![Field::Float(1.5)]);
        assert_eq!(
            fields(r#"[{"ts":5},{"ts":"x"}]"#, "ts"),
            vec![Field::Int(5), Field::Str("x".into())]
        );
    }

    #[test]
    fn overflowing_number_falls_back_to_infinity_not_bad_json() {
        let got = fields(r#"[{"price":1e400,"s":"a\"b"},{"price":2}]"#, "price");
        assert_eq!(got, vec![Field::Float(f64::INFINITY), Field::Int(2)]);
        assert_eq!(
            fields(r#"{"s":"a\"b","price":1e400}"#, "s"),
            vec![Field::Str("a\"b".into())]
        );
    }

    #[test]
    fn garbage_is_an_error() {
        let text = "{not json";
        let mut scratch = text.as_bytes().to_vec();
        assert!(matches!(
            parse_document(&mut scratch, text, 64),
            Err(ParseError::Invalid(_))
        ));
    }

    #[test]
    fn non_objects_are_reported() {
        let text = "[1,{\"a\":1}]";
        let mut scratch = text.as_bytes().to_vec();
        let parsed = parse_document(&mut scratch, text, 64).unwrap();
        let mut kinds = Vec::new();
        parsed.for_each_element(|e| kinds.push(matches!(e, Element::Object(_))));
        assert_eq!(kinds, vec![false, true]);
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        for text in [
            "[".repeat(20_000),
            r#"{"a":"#.repeat(100_000),
            format!(
                r#"{{"symbol":"A","price":{}1{}}}"#,
                "[".repeat(50_000),
                "]".repeat(50_000)
            ),
        ] {
            let mut scratch = text.as_bytes().to_vec();
            let err = parse_document(&mut scratch, &text, 64).err();
            assert_eq!(err, Some(ParseError::TooDeep(TooDeep { limit: 64 })));
        }
        let ok = format!("{}1{}", "[".repeat(64), "]".repeat(64));
        let mut scratch = ok.as_bytes().to_vec();
        assert!(parse_document(&mut scratch, &ok, 64).is_ok());
    }
}

//! The nesting bound for untrusted JSON. simd-json's value builder and its tape's `encode`
//! recurse once per `[`/`{`, so 20,000 nested brackets (40 kB) overflow the stack and abort
//! the whole process; serde_json stops at 128 levels but only for some entry points. Ticks and
//! client requests are two or three levels deep, so every path that parses producer, client
//! or import bytes turns a document deeper than `limits.max_json_depth` into `bad_json` /
//! `bad_request`, before anything recursive touches it:
//! - [`check`] scans the bytes, before any parser sees them (`protocol::parse_request`,
//!   `import`, feeds, and ingest's serde_json fallback);
//! - [`check_tape`] reads the tape simd-json's stage 2 built (`ingest::parse`, the hot path).
//!   That builder is iterative (an explicit stack, bounded by the input's length), so a deep
//!   document is safe until something walks it recursively, and the tape holds each
//!   container's size, so a tick object of plain values is checked in one step instead of a
//!   scan of its bytes (the byte scan was 6 % of the ingest worker at 100k ticks/s).
//!
//! Hand-written rather than a crate: neither simd-json nor serde_json exposes a configurable
//! depth limit for the value types used here, and each check is a dozen lines. [`check`]
//! tracks brackets outside strings (a backslash escapes the next byte inside one), the same
//! structural view both parsers take, and counts an unmatched closer as depth 0, so the depth
//! it reports is never below what a parser could reach. One linear pass, no allocation.

use simd_json::tape::Node;

/// Default of `limits.max_json_depth`: ticks and requests are 2-3 levels deep, and 64 levels
/// of recursion are a few kilobytes of stack.
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// The nesting depth of `bytes` went past the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested deeper than {limit} levels (limits.max_json_depth)")]
#[non_exhaustive]
pub struct TooDeep {
    /// The limit that was passed.
    pub limit: usize,
}

/// Checks that no array or object in `bytes` is nested more than `max_depth` levels deep
/// (`[1]` is depth 1, `[[1]]` depth 2). Stops at the first byte past the limit.
///
/// # Errors
/// [`TooDeep`] when the nesting passes `max_depth`. Malformed JSON is not an error here; the
/// parser reports it.
pub fn check(bytes: &[u8], max_depth: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(TooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// [`check`] for a tape simd-json built: no container in `nodes` is nested more than
/// `max_depth` levels deep. A container with one node per member (an object: per key and per
/// value) holds only scalars and empty containers, so it adds at most two levels: where two
/// more levels are within the limit it is skipped whole (a tick object is one step), and
/// everything else is walked node by node.
///
/// # Errors
/// [`TooDeep`] when the nesting passes `max_depth`.
pub fn check_tape(nodes: &[Node<'_>], max_depth: usize) -> Result<(), TooDeep> {
    // Index of the last node of each open container, innermost last. Grows only with the
    // depth, which is refused past `max_depth`.
    let mut ends: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < nodes.len() {
        while ends.last().is_some_and(|&end| end < i) {
            ends.pop();
        }
        let (count, flat) = match nodes[i] {
            Node::Array { len, count } => (count, count == len),
            Node::Object { len, count } => (count, count == 2 * len),
            Node::String(_) | Node::Static(_) => {
                i += 1;
                continue;
            }
        };
        if ends.len() >= max_depth {
            return Err(TooDeep { limit: max_depth });
        }
        if flat && ends.len() + 2 <= max_depth {
            i += count + 1;
        } else {
            ends.push(i + count);
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_brackets_outside_strings_only() {
        assert!(check(b"[[1]]", 2).is_ok());
        assert!(check(b"[[1]]", 1).is_err());
        assert!(check(br#"{"a":{"b":[1]}}"#, 3).is_ok());
        assert!(check(br#"{"a":{"b":[1]}}"#, 2).is_err());
        assert!(check(br#"{"s":"[[[[[[[[[["}"#, 1).is_ok());
        // An escaped quote does not end the string; an escaped backslash does not escape it.
        assert!(check(br#"{"s":"\"[[[[["}"#, 1).is_ok());
        assert!(check(br#"{"s":"\\"}[[[["#, 1).is_err());
        assert!(check(b"12", 0).is_ok());
        assert!(check(b"[]", 0).is_err());
    }

    #[test]
    fn siblings_do_not_add_up_and_stray_closers_do_not_hide_depth() {
        assert!(check(&b"[1],".repeat(10_000), 1).is_ok());
        let mut evil = b"]]]]".to_vec();
        evil.extend(b"[[[".iter());
        assert!(check(&evil, 2).is_err());
    }

    #[test]
    fn deep_input_stops_early() {
        let deep = vec![b'['; 500_000];
        assert_eq!(check(&deep, 64), Err(TooDeep { limit: 64 }));
    }

    /// The depth `check_tape` sees must be the depth `check` sees, for any document.
    mod tape_agrees_with_bytes {
        use super::super::*;
        use proptest::prelude::*;

        fn json() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("1".to_string()),
                Just("\"s[{\\\"\"".to_string()),
                Just("null".to_string()),
                Just("2.5".to_string()),
            ];
            leaf.prop_recursive(12, 64, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4)
                        .prop_map(|v| format!("[{}]", v.join(","))),
                    prop::collection::vec(inner, 0..4).prop_map(|v| {
                        let fields: Vec<String> = v
                            .iter()
                            .enumerate()
                            .map(|(i, x)| format!("\"k{i}\":{x}"))
                            .collect();
                        format!("{{{}}}", fields.join(","))
                    }),
                ]
            })
        }

        proptest! {
            #[test]
            fn same_verdict_at_every_limit(doc in json(), limit in 0usize..14) {
                let mut bytes = doc.clone().into_bytes();
                let tape = simd_json::to_tape(&mut bytes).expect("generated JSON parses");
                prop_assert_eq!(
                    check_tape(&tape.0, limit).is_ok(),
                    check(doc.as_bytes(), limit).is_ok(),
                    "{}", doc
                );
            }
        }

        #[test]
        fn a_deep_document_is_refused_from_its_tape() {
            let mut deep = "[".repeat(50_000);
            deep.push_str(&"]".repeat(50_000));
            let mut bytes = deep.into_bytes();
            let tape = simd_json::to_tape(&mut bytes).expect("balanced brackets parse");
            assert_eq!(check_tape(&tape.0, 64), Err(TooDeep { limit: 64 }));
            let mut ticks =
                br#"[{"symbol":"A","price":1,"id":"x"},{"symbol":"B","ts":2}]"#.to_vec();
            let tape = simd_json::to_tape(&mut ticks).unwrap();
            assert!(check_tape(&tape.0, 2).is_ok());
            assert!(check_tape(&tape.0, 1).is_err());
        }
    }
}

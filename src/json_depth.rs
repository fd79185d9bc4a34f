//! The nesting bound for untrusted JSON, checked before any parser sees the bytes. simd-json's
//! value builder recurses once per `[`/`{`, so 20,000 nested brackets (40 kB) overflow the
//! stack and abort the whole process; serde_json stops at 128 levels but only for some entry
//! points. Ticks and client requests are two or three levels deep, so every path that parses
//! producer, client or import bytes (`ingest::parse`, `protocol::parse_request`, `import`)
//! first runs [`check`] with `limits.max_json_depth` and turns a refusal into `bad_json` /
//! `bad_request`.
//!
//! Hand-written rather than a crate: neither simd-json nor serde_json exposes a configurable
//! depth limit for the value types used here, and the scan is a dozen lines. It tracks
//! brackets outside strings (a backslash escapes the next byte inside one), the same
//! structural view both parsers take, and counts an unmatched closer as depth 0, so the depth
//! it reports is never below what a parser could reach. One linear pass, no allocation.

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
}

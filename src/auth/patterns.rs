//! Symbol patterns from a token's `symbols` and `ingest_symbols` claims: an exact name
//! (`"AAPL"`), a prefix (`"BTC*"`) or everything (`"*"`). Parsed once when the token is
//! verified; matching is a binary search over the exact names plus one over the prefixes for
//! each prefix of the symbol (at most 32), with no allocation. A list that holds `"*"` is no
//! restriction at all, which the parser reports as `None` so callers keep their unrestricted
//! fast path.

use crate::tick::Symbol;

/// The symbols a token permits (never "everything": that is the absence of a list).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SymbolPatterns {
    /// Exact names, sorted and unique.
    exact: Vec<Box<str>>,
    /// Prefixes of `PREFIX*` patterns.
    prefixes: Vec<Box<str>>,
}

/// A claim's list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// A pattern that is not an exact symbol name, `PREFIX*` (a prefix of symbol characters)
    /// or `*`.
    #[error("bad symbol pattern {0:?}: use an exact symbol name, PREFIX* or *")]
    Malformed(String),
    /// More patterns than `auth.jwt_max_patterns`.
    #[error("{0} patterns, at most {1} (auth.jwt_max_patterns)")]
    TooMany(usize, usize),
}

impl SymbolPatterns {
    /// Parses a claim's list of at most `max` patterns (`auth.jwt_max_patterns`: a token is
    /// untrusted input until its claims are read, and a claim list is walked for every
    /// wildcard delivery of a restricted connection); `Ok(None)` when it holds `"*"`
    /// (everything).
    ///
    /// # Errors
    /// A pattern with `*` anywhere but at its end, a stem that is not a valid symbol name
    /// (empty, over 32 bytes, characters outside a symbol's), or more than `max` patterns.
    pub fn parse<S: AsRef<str>>(list: &[S], max: usize) -> Result<Option<Self>, PatternError> {
        if list.len() > max {
            return Err(PatternError::TooMany(list.len(), max));
        }
        let mut out = Self::default();
        for p in list {
            let p = p.as_ref();
            if p == "*" {
                return Ok(None);
            }
            let (stem, prefix) = match p.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (p, false),
            };
            // A stem is a symbol name or a prefix of one: the same characters, as long.
            if !Symbol::is_valid(stem) {
                return Err(PatternError::Malformed(p.chars().take(64).collect()));
            }
            if prefix {
                out.prefixes.push(stem.into());
            } else {
                out.exact.push(stem.into());
            }
        }
        out.exact.sort_unstable();
        out.exact.dedup();
        out.prefixes.sort_unstable();
        out.prefixes.dedup();
        Ok(Some(out))
    }

    /// Whether `symbol` matches one of the patterns: a binary search for the name, then one
    /// for each of its prefixes (a symbol is at most 32 bytes), so the cost does not grow with
    /// the number of prefix patterns (up to `auth.jwt_max_patterns`).
    #[must_use]
    pub fn allows(&self, symbol: &str) -> bool {
        let find = |list: &[Box<str>], s: &str| list.binary_search_by(|e| (**e).cmp(s)).is_ok();
        find(&self.exact, symbol)
            || (!self.prefixes.is_empty()
                && (1..=symbol.len())
                    .filter(|&i| symbol.is_char_boundary(i))
                    .any(|i| find(&self.prefixes, &symbol[..i])))
    }

    /// Whether `symbol` is permitted by `patterns` (`None`: everything is).
    #[must_use]
    pub fn permits(patterns: Option<&Self>, symbol: &str) -> bool {
        patterns.is_none_or(|p| p.allows(symbol))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_everything() {
        let p = SymbolPatterns::parse(&["AAPL", "BTC*", "AAPL"], 16)
            .unwrap()
            .unwrap();
        assert!(p.allows("AAPL") && p.allows("BTC") && p.allows("BTCUSD"));
        assert!(!p.allows("AAP") && !p.allows("AAPLX") && !p.allows("ETHUSD"));
        assert_eq!(SymbolPatterns::parse(&["X", "*"], 16).unwrap(), None);
        let none = SymbolPatterns::parse::<&str>(&[], 16).unwrap().unwrap();
        assert!(!none.allows("AAPL"), "an empty list permits nothing");
        assert!(SymbolPatterns::permits(None, "ANY"));
        let many: Vec<String> = (0..500)
            .map(|i| format!("P{i}*"))
            .chain(["B*".into(), "BTCU*".into(), "ZZ".into()])
            .collect();
        let p = SymbolPatterns::parse(&many, 1024).unwrap().unwrap();
        assert!(p.allows("B") && p.allows("BTCUSD") && p.allows("P499X") && p.allows("ZZ"));
        assert!(!p.allows("A") && !p.allows("P") && !p.allows("ZZZ") && !p.allows(""));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        let long = "X".repeat(33);
        let long_prefix = format!("{long}*");
        for bad in [
            "A*B",
            "**",
            "",
            "*A",
            "A B",
            "A\"*",
            "\u{e9}*",
            &long,
            &long_prefix,
        ] {
            let err = SymbolPatterns::parse(&[bad], 16).unwrap_err();
            assert!(err.to_string().contains("pattern"), "{bad:?}: {err}");
        }
        let many: Vec<String> = (0..3).map(|i| format!("S{i}")).collect();
        let err = SymbolPatterns::parse(&many, 2).unwrap_err();
        assert!(err.to_string().contains("3 patterns, at most 2"), "{err}");
        assert!(SymbolPatterns::parse(&many, 3).is_ok());
    }
}

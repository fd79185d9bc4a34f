//! Symbol patterns from a token's `symbols` and `ingest_symbols` claims: an exact name
//! (`"AAPL"`), a prefix (`"BTC*"`) or everything (`"*"`). Parsed once when the token is
//! verified; matching is a binary search over the exact names plus a scan of the (few)
//! prefixes, with no allocation. A list that holds `"*"` is no restriction at all, which the
//! parser reports as `None` so callers keep their unrestricted fast path.

/// The symbols a token permits (never "everything": that is the absence of a list).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SymbolPatterns {
    /// Exact names, sorted and unique.
    exact: Vec<Box<str>>,
    /// Prefixes of `PREFIX*` patterns.
    prefixes: Vec<Box<str>>,
}

/// A pattern that is not an exact name, `PREFIX*` or `*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad symbol pattern {0:?}: use an exact name, PREFIX* or *")]
pub struct PatternError(pub String);

/// Most patterns one claim may list: a token is untrusted input until its claims are read,
/// and a claim list is walked for every wildcard delivery of a restricted connection.
pub const MAX_PATTERNS: usize = 1_024;

impl SymbolPatterns {
    /// Parses a claim's list; `Ok(None)` when it holds `"*"` (everything).
    ///
    /// # Errors
    /// A pattern with `*` anywhere but at its end, an empty pattern, or more than
    /// [`MAX_PATTERNS`].
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Option<Self>, PatternError> {
        if list.len() > MAX_PATTERNS {
            return Err(PatternError(format!("{} patterns", list.len())));
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
            if stem.is_empty() || stem.contains('*') {
                return Err(PatternError(p.chars().take(64).collect()));
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

    /// Whether `symbol` matches one of the patterns.
    #[must_use]
    pub fn allows(&self, symbol: &str) -> bool {
        self.exact
            .binary_search_by(|e| e.as_ref().cmp(symbol))
            .is_ok()
            || self.prefixes.iter().any(|p| symbol.starts_with(&**p))
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
        let p = SymbolPatterns::parse(&["AAPL", "BTC*", "AAPL"])
            .unwrap()
            .unwrap();
        assert!(p.allows("AAPL") && p.allows("BTC") && p.allows("BTCUSD"));
        assert!(!p.allows("AAP") && !p.allows("AAPLX") && !p.allows("ETHUSD"));
        assert_eq!(SymbolPatterns::parse(&["X", "*"]).unwrap(), None);
        let none = SymbolPatterns::parse::<&str>(&[]).unwrap().unwrap();
        assert!(!none.allows("AAPL"), "an empty list permits nothing");
        assert!(SymbolPatterns::permits(None, "ANY"));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in ["A*B", "**", "", "*A"] {
            assert!(SymbolPatterns::parse(&[bad]).is_err(), "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("S{i}")).collect();
        assert!(SymbolPatterns::parse(&many).is_err());
    }
}

//! The routing index: which clients want which symbol. Owned by the dispatcher alone, so it is
//! plain data with no locks. Clients are slab keys; a wildcard (`*`) subscriber is in its own
//! set and matches every symbol, including ones that appear later.
//!
//! Invariant kept by the dispatcher: a wildcard client is never also in a symbol's set (its
//! named subscriptions are parked while `*` is on and restored when it goes), so fan-out visits
//! each client once without a membership check per subscriber. Sets are hash sets of 32-bit
//! keys: O(1) add and remove (subscribe storms stay linear), and about 10 bytes a
//! subscription, which matters when thousands of mostly idle clients hold ten symbols each
//! (an insertion-ordered set of full keys took about 47).
//!
//! A wildcard subscriber whose token permits only some symbols (a JWT's `symbols` claim) is
//! kept apart, grouped with the others whose patterns are equal (by content: each connection
//! parses its own token, but a thousand dashboards sold the same plan hold the same list), so
//! a tick costs one pattern check per distinct set, not one per connection; the unrestricted
//! wildcard set, the common case, is walked with no check at all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::auth::SymbolPatterns;
use crate::tick::Symbol;

/// Slab key of a registered client.
pub type ClientKey = usize;

/// A client's own set of symbols (its named subscriptions, or the snapshots it waits for): a
/// sorted vector, because each client holds few symbols while thousands of clients hold them,
/// so 8 bytes a symbol (a thin [`Symbol`]) beat a hash table's slack.
/// Lookups are binary searches; inserts shift at most `limits.max_symbols` entries.
#[derive(Debug, Default)]
pub struct SymbolSet(Vec<Symbol>);

impl SymbolSet {
    /// Whether `symbol` is in the set.
    #[must_use]
    pub fn contains(&self, symbol: &Symbol) -> bool {
        self.0.binary_search(symbol).is_ok()
    }

    /// Adds `symbol`; `false` if it was already there.
    pub fn insert(&mut self, symbol: Symbol) -> bool {
        match self.0.binary_search(&symbol) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, symbol);
                true
            }
        }
    }

    /// Removes `symbol`; `false` if it was not there.
    pub fn remove(&mut self, symbol: &Symbol) -> bool {
        match self.0.binary_search(symbol) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    /// Number of symbols.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The symbols, sorted.
    pub fn iter(&self) -> std::slice::Iter<'_, Symbol> {
        self.0.iter()
    }

    /// Takes every symbol out, leaving the set empty and unallocated.
    pub fn take_all(&mut self) -> Vec<Symbol> {
        std::mem::take(&mut self.0)
    }

    /// Gives back spare capacity after a subscribe (the set then holds exactly its symbols).
    pub fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }
}

impl<'a> IntoIterator for &'a SymbolSet {
    type Item = &'a Symbol;
    type IntoIter = std::slice::Iter<'a, Symbol>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A set of subscribers, by the low 32 bits of their key (slab keys of live connections stay
/// far below 2^32: each one holds a file descriptor).
type Subscribers = HashSet<u32, ahash::RandomState>;

fn compact(client: ClientKey) -> u32 {
    debug_assert!(u32::try_from(client).is_ok(), "client key over 32 bits");
    client as u32
}

/// symbol → subscribers, plus wildcard subscribers.
#[derive(Debug, Default)]
pub struct Registry {
    by_symbol: HashMap<Symbol, Subscribers>,
    wildcard: Subscribers,
    /// Wildcard subscribers limited to some symbols by their token, by pattern set (hashed
    /// and compared by content).
    limited_wildcard: HashMap<Arc<SymbolPatterns>, Subscribers, ahash::RandomState>,
    /// The pattern set each limited wildcard subscriber is filed under.
    limited_of: HashMap<u32, Arc<SymbolPatterns>, ahash::RandomState>,
}

impl Registry {
    /// Adds `client` to `symbol` (idempotent).
    pub fn add(&mut self, symbol: &Symbol, client: ClientKey) {
        self.by_symbol
            .entry(symbol.clone())
            .or_default()
            .insert(compact(client));
    }

    /// The name already held for `symbol`, if anyone subscribes to it, so that thousands of
    /// subscriptions share one allocation per symbol instead of one each.
    #[must_use]
    pub fn shared_name(&self, symbol: &Symbol) -> Option<&Symbol> {
        self.by_symbol.get_key_value(symbol).map(|(name, _)| name)
    }

    /// Removes `client` from `symbol`.
    pub fn remove(&mut self, symbol: &Symbol, client: ClientKey) {
        if let Some(set) = self.by_symbol.get_mut(symbol) {
            set.remove(&compact(client));
            if set.is_empty() {
                self.by_symbol.remove(symbol);
            }
        }
    }

    /// Adds a wildcard subscriber (idempotent), limited to `permitted` if given.
    pub fn add_wildcard(&mut self, client: ClientKey, permitted: Option<&Arc<SymbolPatterns>>) {
        match permitted {
            None => {
                self.wildcard.insert(compact(client));
            }
            Some(p) => {
                let c = compact(client);
                if self.limited_of.get(&c).is_some_and(|old| old == p) {
                    return;
                }
                self.remove_limited(c);
                // The set's entry keeps the first allocation of these patterns; the client
                // is filed under that one.
                self.limited_wildcard
                    .entry(p.clone())
                    .or_default()
                    .insert(c);
                if let Some((shared, _)) = self.limited_wildcard.get_key_value(p) {
                    self.limited_of.insert(c, shared.clone());
                }
            }
        }
    }

    /// Removes a wildcard subscriber.
    pub fn remove_wildcard(&mut self, client: ClientKey) {
        self.wildcard.remove(&compact(client));
        self.remove_limited(compact(client));
    }

    fn remove_limited(&mut self, c: u32) {
        let Some(p) = self.limited_of.remove(&c) else {
            return;
        };
        if let Some(set) = self.limited_wildcard.get_mut(&p) {
            set.remove(&c);
            if set.is_empty() {
                self.limited_wildcard.remove(&p);
            }
        }
    }

    /// Calls `f` for every client that wants `symbol`.
    pub fn for_each_subscriber(&self, symbol: &Symbol, mut f: impl FnMut(ClientKey)) {
        for &c in &self.wildcard {
            f(c as ClientKey);
        }
        for (permitted, set) in &self.limited_wildcard {
            if permitted.allows(symbol.as_str()) {
                for &c in set {
                    f(c as ClientKey);
                }
            }
        }
        if let Some(set) = self.by_symbol.get(symbol) {
            for &c in set {
                f(c as ClientKey);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> Symbol {
        Symbol::parse(name).unwrap()
    }

    fn subscribers(r: &Registry, name: &str) -> Vec<ClientKey> {
        let mut out = Vec::new();
        r.for_each_subscriber(&s(name), |c| out.push(c));
        out.sort_unstable();
        out
    }

    #[test]
    fn symbol_set_stays_sorted_and_unique() {
        let mut set = SymbolSet::default();
        for name in ["MSFT", "AAPL", "TSLA", "AAPL"] {
            set.insert(s(name));
        }
        assert_eq!(set.len(), 3);
        assert!(set.contains(&s("TSLA")) && !set.contains(&s("GOOG")));
        assert!(set.remove(&s("AAPL")) && !set.remove(&s("AAPL")));
        let names: Vec<&str> = set.iter().map(Symbol::as_str).collect();
        assert_eq!(names, ["MSFT", "TSLA"]);
        assert_eq!(set.take_all().len(), 2);
        assert!(set.is_empty());
    }

    #[test]
    fn named_wildcard_and_removal() {
        let mut r = Registry::default();
        r.add(&s("A"), 1);
        r.add(&s("A"), 1);
        r.add(&s("A"), 2);
        r.add(&s("B"), 2);
        r.add_wildcard(3, None);
        let btc = Arc::new(SymbolPatterns::parse(&["BTC*"], 16).unwrap().unwrap());
        r.add_wildcard(4, Some(&btc));
        assert_eq!(
            subscribers(&r, "BTCUSD"),
            [3, 4],
            "limited wildcards match their own"
        );
        assert_eq!(subscribers(&r, "A"), [1, 2, 3]);
        assert_eq!(
            subscribers(&r, "NEW"),
            [3],
            "wildcards match symbols seen later"
        );
        r.remove(&s("A"), 1);
        assert_eq!(subscribers(&r, "A"), [2, 3]);
        r.remove_wildcard(3);
        r.remove_wildcard(4);
        assert_eq!(subscribers(&r, "A"), [2]);
        assert!(subscribers(&r, "BTCUSD").is_empty());
        r.remove(&s("B"), 2);
        assert_eq!(r.by_symbol.get(&s("B")).map_or(0, HashSet::len), 0);
        assert!(!r.by_symbol.contains_key(&s("B")), "empty sets are dropped");
    }

    #[test]
    fn limited_wildcards_with_equal_patterns_share_one_check() {
        let mut r = Registry::default();
        // Each connection parses its own token: equal patterns, distinct allocations.
        let parse = |p: &[&str]| Arc::new(SymbolPatterns::parse(p, 16).unwrap().unwrap());
        for c in 0..100 {
            r.add_wildcard(c, Some(&parse(&["BTC*", "ETH*"])));
        }
        r.add_wildcard(100, Some(&parse(&["AAPL"])));
        assert_eq!(
            r.limited_wildcard.len(),
            2,
            "one entry per distinct pattern set"
        );
        assert_eq!(subscribers(&r, "BTCUSD").len(), 100);
        assert_eq!(subscribers(&r, "AAPL"), [100]);
        r.add_wildcard(5, Some(&parse(&["AAPL"])));
        assert_eq!(
            subscribers(&r, "AAPL"),
            [5, 100],
            "a client moves to its new set"
        );
        assert_eq!(subscribers(&r, "BTCUSD").len(), 99);
        for c in 0..=100 {
            r.remove_wildcard(c);
        }
        assert!(r.limited_wildcard.is_empty(), "empty sets are dropped");
        assert!(subscribers(&r, "BTCUSD").is_empty());
    }
}

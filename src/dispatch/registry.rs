//! The routing index: which clients want which symbol. Owned by the dispatcher alone, so it is
//! plain data with no locks. Clients are slab keys; a wildcard (`*`) subscriber is in its own
//! set and matches every symbol, including ones that appear later.
//!
//! Invariant kept by the dispatcher: a wildcard client is never also in a symbol's set (its
//! named subscriptions are parked while `*` is on and restored when it goes), so fan-out visits
//! each client once without a membership check per subscriber. Sets are insertion-ordered
//! hash sets: O(1) add and remove (subscribe storms stay linear) and dense iteration.

use std::collections::HashMap;

use indexmap::IndexSet;

use crate::tick::Symbol;

/// Slab key of a registered client.
pub type ClientKey = usize;

/// symbol → subscribers, plus wildcard subscribers.
#[derive(Debug, Default)]
pub struct Registry {
    by_symbol: HashMap<Symbol, IndexSet<ClientKey>>,
    wildcard: IndexSet<ClientKey>,
}

impl Registry {
    /// Adds `client` to `symbol` (idempotent).
    pub fn add(&mut self, symbol: &Symbol, client: ClientKey) {
        self.by_symbol
            .entry(symbol.clone())
            .or_default()
            .insert(client);
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
            set.swap_remove(&client);
            if set.is_empty() {
                self.by_symbol.remove(symbol);
            }
        }
    }

    /// Adds a wildcard subscriber (idempotent).
    pub fn add_wildcard(&mut self, client: ClientKey) {
        self.wildcard.insert(client);
    }

    /// Removes a wildcard subscriber.
    pub fn remove_wildcard(&mut self, client: ClientKey) {
        self.wildcard.swap_remove(&client);
    }

    /// Calls `f` for every client that wants `symbol`.
    pub fn for_each_subscriber(&self, symbol: &Symbol, mut f: impl FnMut(ClientKey)) {
        for &c in &self.wildcard {
            f(c);
        }
        if let Some(set) = self.by_symbol.get(symbol) {
            for &c in set {
                f(c);
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
    fn named_wildcard_and_removal() {
        let mut r = Registry::default();
        r.add(&s("A"), 1);
        r.add(&s("A"), 1);
        r.add(&s("A"), 2);
        r.add(&s("B"), 2);
        r.add_wildcard(3);
        assert_eq!(subscribers(&r, "A"), [1, 2, 3]);
        assert_eq!(
            subscribers(&r, "NEW"),
            [3],
            "wildcards match symbols seen later"
        );
        r.remove(&s("A"), 1);
        assert_eq!(subscribers(&r, "A"), [2, 3]);
        r.remove_wildcard(3);
        assert_eq!(subscribers(&r, "A"), [2]);
        r.remove(&s("B"), 2);
        assert_eq!(r.by_symbol.get(&s("B")).map_or(0, IndexSet::len), 0);
        assert!(!r.by_symbol.contains_key(&s("B")), "empty sets are dropped");
    }
}

//! The routing index: which clients want which symbol. Owned by the dispatcher alone, so it is
//! plain data with no locks. Clients are slab keys; a wildcard (`*`) subscriber is in its own
//! list and matches every symbol, including ones that appear later.

use std::collections::HashMap;

use crate::tick::Symbol;

/// Slab key of a registered client.
pub type ClientKey = usize;

/// symbol → subscribers, plus wildcard subscribers.
#[derive(Debug, Default)]
pub struct Registry {
    by_symbol: HashMap<Symbol, Vec<ClientKey>>,
    wildcard: Vec<ClientKey>,
}

impl Registry {
    /// Adds `client` to `symbol` (idempotent).
    pub fn add(&mut self, symbol: &Symbol, client: ClientKey) {
        let list = self.by_symbol.entry(symbol.clone()).or_default();
        if !list.contains(&client) {
            list.push(client);
        }
    }

    /// Removes `client` from `symbol`.
    pub fn remove(&mut self, symbol: &Symbol, client: ClientKey) {
        if let Some(list) = self.by_symbol.get_mut(symbol) {
            list.retain(|c| *c != client);
            if list.is_empty() {
                self.by_symbol.remove(symbol);
            }
        }
    }

    /// Adds a wildcard subscriber (idempotent).
    pub fn add_wildcard(&mut self, client: ClientKey) {
        if !self.wildcard.contains(&client) {
            self.wildcard.push(client);
        }
    }

    /// Removes a wildcard subscriber.
    pub fn remove_wildcard(&mut self, client: ClientKey) {
        self.wildcard.retain(|c| *c != client);
    }

    /// Calls `f` for every client that wants `symbol`, each once (a client that is both a
    /// wildcard and a named subscriber is visited through the wildcard only).
    pub fn for_each_subscriber(&self, symbol: &Symbol, mut f: impl FnMut(ClientKey)) {
        for &c in &self.wildcard {
            f(c);
        }
        if let Some(list) = self.by_symbol.get(symbol) {
            for &c in list {
                if !self.wildcard.contains(&c) {
                    f(c);
                }
            }
        }
    }

    /// Subscribers of `symbol` by name (not counting wildcards).
    #[must_use]
    pub fn named_subscribers(&self, symbol: &Symbol) -> usize {
        self.by_symbol.get(symbol).map_or(0, Vec::len)
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
        r.add_wildcard(2);
        assert_eq!(subscribers(&r, "A"), [1, 2, 3]);
        assert_eq!(subscribers(&r, "NEW"), [2, 3]);
        r.remove(&s("A"), 1);
        r.remove_wildcard(2);
        assert_eq!(subscribers(&r, "A"), [2, 3]);
        assert_eq!(subscribers(&r, "B"), [2, 3]);
        r.remove(&s("B"), 2);
        assert_eq!(r.named_subscribers(&s("B")), 0);
        assert!(
            !r.by_symbol.contains_key(&s("B")),
            "empty lists are dropped"
        );
    }
}

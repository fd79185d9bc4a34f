//! Duplicate detection per symbol: a bounded window of recent tick keys. A tick with an `id` is
//! keyed by the id; one without by (ts, price, volume). Memory per symbol is bounded by
//! `validation.dedup_window`; a duplicate older than the window is let through.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use crate::tick::{Tick, TradeId};

/// The recent-keys window of one symbol.
#[derive(Debug, Default)]
pub struct RecentKeys {
    keys: HashSet<u64, ahash::RandomState>,
    order: VecDeque<u64>,
}

/// Fixed hashing keys, so a key means the same across the process (and across restarts).
fn key_hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(0x7469_636b, 0x6661_6e00, 0x6465_6475, 0x7021_0000)
}

/// The dedup key of a tick.
#[must_use]
pub fn key_of(tick: &Tick) -> u64 {
    let mut h = key_hasher().build_hasher();
    match &tick.id {
        Some(TradeId::Str(s)) => (1u8, &**s).hash(&mut h),
        Some(TradeId::Int(i)) => (2u8, i).hash(&mut h),
        None => (3u8, tick.ts, tick.price.to_bits(), tick.volume.to_bits()).hash(&mut h),
    }
    h.finish()
}

impl RecentKeys {
    /// Whether `key` is in the window.
    #[must_use]
    pub fn contains(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    /// Forgets `key` (a tick admitted, then never delivered: its resend must be taken).
    pub fn remove(&mut self, key: u64) {
        if self.keys.remove(&key) {
            self.order.retain(|k| *k != key);
        }
    }

    /// Adds `key`, evicting the oldest past `window`.
    pub fn insert(&mut self, key: u64, window: usize) {
        if self.keys.insert(key) {
            self.order.push_back(key);
            while self.order.len() > window {
                if let Some(old) = self.order.pop_front() {
                    self.keys.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_bounded() {
        let mut r = RecentKeys::default();
        for k in 0..10 {
            r.insert(k, 4);
        }
        assert!(!r.contains(5));
        assert!(r.contains(6) && r.contains(9));
        assert_eq!(r.order.len(), 4);
    }
}

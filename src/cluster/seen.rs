//! What this node knows the stream holds: for each symbol, the dedup keys of its most recent
//! ticks in the stream (`validation.dedup_window` of them), and the stream sequence up to which
//! the consumer has read every message. The consumer writes it (every message it reads, in
//! stream order) and the publisher's own stored batches add to it; the publisher reads it.
//!
//! This is what keeps cluster-wide dedup exact with batched messages: a publish is a
//! compare-and-set on the symbol's chain head, and the publisher only builds on a head whose
//! messages it has all seen here (its own last publish, or a head it re-read and then waited
//! for the consumer to pass). So when the compare-and-set succeeds, no tick of that symbol is
//! in the stream that the batch was not filtered against: a producer id sent to two nodes at
//! once is stored by the first, and dropped from the second's batch when its compare-and-set
//! conflicts and it re-filters.
//!
//! It also holds the consumer's arbitration (see `consume.rs`): each symbol's accepted head
//! (the last tick seq of the accepted chain) and, for recent stream sequences, whether the
//! message there was accepted or skipped. The publisher builds its next head from the former
//! and, on a replicated stream whose compare-and-set is not serializable (nats-server#4320),
//! acks its producers only once the latter says "accepted".

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::ingest::dedup::RecentKeys;
use crate::tick::Symbol;

/// The shared view; cheap to clone behind an `Arc`.
#[derive(Debug)]
pub(super) struct Seen {
    keys: Mutex<HashMap<Symbol, RecentKeys>>,
    window: usize,
    max_symbols: usize,
    consumed: watch::Sender<u64>,
    /// Each symbol's accepted head: the last tick seq of its accepted chain.
    heads: Mutex<HashMap<Symbol, u64>>,
    /// Stream sequence -> accepted, for the last `VERDICTS_KEPT` messages consumed.
    verdicts: Mutex<BTreeMap<u64, bool>>,
}

/// Verdicts kept; far more than the messages a node can have in flight within a publish
/// timeout, so a publisher finds the verdict of its message.
const VERDICTS_KEPT: usize = 65_536;

impl Seen {
    /// A view that keeps `window` keys per symbol for at most `max_symbols` symbols (the
    /// ingest limits: the same bound as ingest's own dedup memory).
    pub(super) fn new(window: usize, max_symbols: usize, consumed_through: u64) -> Self {
        Self {
            keys: Mutex::default(),
            window: window.max(1),
            max_symbols,
            consumed: watch::Sender::new(consumed_through),
            heads: Mutex::default(),
            verdicts: Mutex::default(),
        }
    }

    /// Starts the accepted heads from the node's store (each symbol's last stored seq).
    pub(super) fn seed_heads(&self, heads: impl IntoIterator<Item = (Symbol, u64)>) {
        self.heads.lock().extend(heads);
    }

    /// The symbol's accepted head (`None`: no message of it accepted yet).
    pub(super) fn head(&self, symbol: &Symbol) -> Option<u64> {
        self.heads.lock().get(symbol).copied()
    }

    /// The consumer accepted a message of `symbol` ending at tick seq `last`.
    pub(super) fn set_head(&self, symbol: &Symbol, last: u64) {
        self.heads.lock().insert(symbol.clone(), last);
    }

    /// The consumer judged the message at `stream_seq` (call before `consumed_through`).
    pub(super) fn record_verdict(&self, stream_seq: u64, accepted: bool) {
        let mut v = self.verdicts.lock();
        v.insert(stream_seq, accepted);
        while v.len() > VERDICTS_KEPT {
            v.pop_first();
        }
    }

    /// Whether the message at `stream_seq` was accepted (`None`: not judged, or forgotten).
    pub(super) fn verdict(&self, stream_seq: u64) -> Option<bool> {
        self.verdicts.lock().get(&stream_seq).copied()
    }

    /// Records keys of a symbol's ticks that are in the stream.
    pub(super) fn remember(&self, symbol: &Symbol, keys: impl IntoIterator<Item = u64>) {
        let mut all = self.keys.lock();
        if !all.contains_key(symbol) && all.len() >= self.max_symbols {
            return;
        }
        let recent = all.entry(symbol.clone()).or_default();
        for k in keys {
            recent.insert(k, self.window);
        }
    }

    /// Whether a tick with `key` of `symbol` is known to be in the stream.
    pub(super) fn contains(&self, symbol: &Symbol, key: u64) -> bool {
        self.keys
            .lock()
            .get(symbol)
            .is_some_and(|r| r.contains(key))
    }

    /// The consumer has read every message up to stream sequence `seq`.
    pub(super) fn consumed_through(&self, seq: u64) {
        self.consumed.send_if_modified(|v| {
            let moved = seq > *v;
            if moved {
                *v = seq;
            }
            moved
        });
    }

    /// Waits until the consumer has read up to `seq`, at most `timeout`. `false` on timeout.
    pub(super) async fn wait_consumed(&self, seq: u64, timeout: Duration) -> bool {
        let mut rx = self.consumed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_consumer_and_keeps_keys_per_symbol() {
        let seen = std::sync::Arc::new(Seen::new(2, 10, 5));
        let a = Symbol::parse("A").unwrap();
        seen.remember(&a, [1, 2, 3]);
        assert!(!seen.contains(&a, 1), "window of 2");
        assert!(seen.contains(&a, 3));
        assert!(!seen.contains(&Symbol::parse("B").unwrap(), 3));
        assert!(seen.wait_consumed(5, Duration::ZERO).await);
        let s = seen.clone();
        let waiter = tokio::spawn(async move { s.wait_consumed(7, Duration::from_secs(60)).await });
        seen.consumed_through(6);
        seen.consumed_through(7);
        assert!(waiter.await.unwrap());
        assert!(!seen.wait_consumed(8, Duration::from_millis(1)).await);
    }
}

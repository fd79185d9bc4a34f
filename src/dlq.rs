//! The dead-letter list: every rejected tick (and every accepted tick that expired in the
//! queue) with its code, message and raw text. Ingest pushes, `/api/dlq` reads newest first.
//! Bounded to `store.dlq_capacity`, oldest evicted first. When a store is attached the entries
//! are also persisted there, so they survive a restart.

use std::collections::VecDeque;

use parking_lot::Mutex;
use serde::Serialize;

use crate::store::Store;

/// Longest raw text kept per entry; producers can send large garbage.
const MAX_RAW_BYTES: usize = 2_048;

/// One dead letter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// Reject code.
    pub code: String,
    /// Human message.
    pub message: String,
    /// The offending input, truncated to 2 KiB.
    pub raw: String,
    /// Server receive time, ms since epoch.
    pub received_at: i64,
}

impl DeadLetter {
    /// Builds an entry, truncating `raw` on a char boundary.
    #[must_use]
    pub fn new(code: &str, message: String, mut raw: String, received_at: i64) -> Self {
        if raw.len() > MAX_RAW_BYTES {
            let mut cut = MAX_RAW_BYTES;
            while !raw.is_char_boundary(cut) {
                cut -= 1;
            }
            raw.truncate(cut);
            raw.push('…');
        }
        Self {
            code: code.to_owned(),
            message,
            raw,
            received_at,
        }
    }
}

/// The in-memory list; the store (when attached) keeps the durable copy.
#[derive(Debug)]
pub struct DeadLetters {
    entries: Mutex<VecDeque<DeadLetter>>,
    capacity: usize,
    store: Option<Store>,
}

impl DeadLetters {
    /// An empty list holding at most `capacity` entries.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
            store: None,
        }
    }

    /// A list backed by `store`: starts with the entries persisted there (so dead letters
    /// survive a restart) and persists new ones.
    #[must_use]
    pub fn with_store(capacity: usize, store: Store) -> Self {
        let mut list = Self::new(capacity);
        match store.dead_letters(capacity) {
            Ok(mut old) => {
                old.reverse();
                list.entries.get_mut().extend(old);
            }
            Err(e) => tracing::warn!(error = %e, "could not load dead letters"),
        }
        list.store = Some(store);
        list
    }

    /// Adds entries, evicting the oldest past capacity.
    pub fn extend(&self, new: impl IntoIterator<Item = DeadLetter>) {
        let new: Vec<DeadLetter> = new.into_iter().collect();
        if let Some(store) = &self.store {
            store.push_dead_letters(new.clone());
        }
        let mut entries = self.entries.lock();
        for e in new {
            if entries.len() == self.capacity {
                entries.pop_front();
            }
            entries.push_back(e);
        }
    }

    /// The newest `limit` entries, newest first.
    #[must_use]
    pub fn recent(&self, limit: usize) -> Vec<DeadLetter> {
        self.entries
            .lock()
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Most entries held; older ones are evicted past it.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether the list is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_newest_first() {
        let d = DeadLetters::new(3);
        d.extend((0..5).map(|i| DeadLetter::new("bad_json", String::new(), i.to_string(), i)));
        let got: Vec<_> = d.recent(10).into_iter().map(|e| e.raw).collect();
        assert_eq!(got, ["4", "3", "2"]);
    }

    #[test]
    fn raw_is_truncated() {
        let e = DeadLetter::new("bad_json", String::new(), "é".repeat(5000), 0);
        assert!(e.raw.len() <= MAX_RAW_BYTES + 3);
    }
}

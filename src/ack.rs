//! Ingest acknowledgements that wait for the tick's fate. Ingest creates one `AckGroup` per
//! producer frame or POST body; every accepted tick carries a clone through the queue and the
//! dispatcher to the store, and whoever finishes with the tick last (the store after a durable
//! commit, or the dispatcher when no store is attached) marks it settled. The producer's ack is
//! sent when the whole group has settled, so an acked tick is never lost.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The shared fate of the accepted ticks of one producer frame.
#[derive(Debug, Default)]
pub struct AckGroup {
    /// Ticks not yet settled.
    pending: AtomicUsize,
    /// Frame indices of ticks that expired in the queue (TTL) instead of being delivered.
    expired: Mutex<Vec<u32>>,
    /// Woken when `pending` reaches zero.
    done: Notify,
}

impl AckGroup {
    /// A group waiting for `pending` ticks.
    #[must_use]
    pub fn new(pending: usize) -> Self {
        Self {
            pending: AtomicUsize::new(pending),
            ..Self::default()
        }
    }

    /// One tick reached its end (stored, or dispatched when there is no store).
    pub fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
            self.done.notify_one();
        }
    }

    /// The tick at `index` expired in the queue and was not delivered.
    pub fn expire(&self, index: u32) {
        self.expired.lock().push(index);
        self.settle();
    }

    /// Whether every tick has settled.
    #[must_use]
    pub fn is_settled(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0
    }

    /// Waits until every tick has settled; returns the indices of expired ticks.
    pub async fn settled(&self) -> Vec<u32> {
        loop {
            let notified = self.done.notified();
            if self.is_settled() {
                break;
            }
            notified.await;
        }
        std::mem::take(&mut *self.expired.lock())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn settles_when_all_ticks_are_done() {
        let g = Arc::new(AckGroup::new(3));
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.settled().await });
        g.settle();
        g.expire(1);
        assert!(!g.is_settled());
        g.settle();
        assert_eq!(waiter.await.unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn empty_group_is_settled_at_once() {
        assert!(AckGroup::new(0).settled().await.is_empty());
    }
}

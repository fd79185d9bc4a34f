//! Where dispatched ticks go after fan-out. The dispatcher hands each round's ticks (seq set,
//! serialized) to a `TickSink`; the sink owns settling their producers' acks. The trait is the
//! seam for other destinations (a NATS bus to other nodes, another store). With the store,
//! acks settle after the durable commit; awaiting `append` when the store's queue is full is
//! the backpressure that reaches the dispatcher, the queue and finally producers.

use crate::store::{Store, StoredTick};

/// The next stage after fan-out.
pub trait TickSink: Send + 'static {
    /// Takes ownership of dispatched ticks (each with its frame and its producer's ack). The
    /// dispatcher builds this vector as it fans out, so a tick is moved into it once.
    fn accept(&mut self, ticks: Vec<StoredTick>) -> impl std::future::Future<Output = ()> + Send;
}

/// The redb store: group-committed appends; acks settle after the commit.
#[derive(Debug, Clone)]
pub struct StoreSink(pub Store);

impl TickSink for StoreSink {
    async fn accept(&mut self, ticks: Vec<StoredTick>) {
        if let Err(e) = self.0.append(ticks).await {
            // The writer has stopped (shutdown or a fatal disk error): acks of these ticks
            // never settle, so producers see no ack rather than a false one.
            tracing::error!(error = %e, "store append failed");
        }
    }
}

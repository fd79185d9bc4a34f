//! Unit tests of the dispatcher driven through its command API: a real dispatcher task with a
//! real redb store in a temp dir, and outbound links the test reads (or drops) itself.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::outbound::channel;
use super::{Command, DispatchStats, Dispatcher, StoreSink};
use crate::config::Config;
use crate::dlq::DeadLetters;
use crate::protocol::Settings;
use crate::queue::PriorityQueue;
use crate::store::Store;

/// A reply to a client that already left is not slowness: it must not be counted (or logged)
/// as a slow consumer. The soak's churn showed every resume that closed before its ack as one.
#[tokio::test]
async fn replies_to_a_client_that_left_are_not_slow_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.store.dir = dir.path().to_path_buf();
    let (store, _) = Store::open(&config.store).unwrap();
    let stats = Arc::new(DispatchStats::default());
    let (dispatcher, handle) = Dispatcher::new(
        &config,
        Arc::new(PriorityQueue::new(&config.queue)),
        StoreSink(store.clone()),
        Arc::new(DeadLetters::new(16)),
        stats.clone(),
        Vec::new(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(dispatcher.with_store(store.clone()).run(stop.clone()));
    let limit = config.limits.outbound_buffer_bytes;

    let (gone_out, gone_rx) = channel(config.dispatch.outbound_messages, limit);
    let gone = handle.register(gone_out, None).await.unwrap();
    let (live_out, live_rx) = channel(config.dispatch.outbound_messages, limit);
    let live = handle.register(live_out, None).await.unwrap();
    // The client closes its end before the dispatcher gets to its requests.
    drop(gone_rx);
    for (key, id) in [(gone, 1), (live, 2)] {
        handle
            .send(Command::Subscribe {
                key,
                id: Some(id.into()),
                symbols: vec!["AAPL".to_owned()],
                settings: Settings::default(),
                history: 10,
                since_seq: Default::default(),
            })
            .await
            .unwrap();
    }
    // Commands are handled in order: once the live client has its ack, the other's is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(frame) = live_rx.try_recv() {
            if frame.as_str().contains("\"ack\"") {
                break;
            }
            continue;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ack for the live client"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.slow_consumer_closes.load(Ordering::Relaxed), 0);
    stop.cancel();
    let _ = task.await;
}

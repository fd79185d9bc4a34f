//! The slow-consumer rule: a realtime client that stops reading is closed with 4008 after an
//! error message, while a second client in the same run receives every tick.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_closed_with_4008_and_fast_client_gets_everything() {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = 64 * 1024;
    let server = TestServer::start_with(config).await;
    let (mut slow, _) = server.client().await;
    subscribe(&mut slow, 1, json!({"symbols": ["SLOW"]})).await;
    let (mut fast, _) = server.client().await;
    subscribe(&mut fast, 1, json!({"symbols": ["SLOW"]})).await;

    // The fast client reads on its own task while the producer floods.
    const BATCHES: u64 = 200;
    const PER_BATCH: u64 = 200;
    let reader = tokio::spawn(async move {
        let mut expect = 1;
        while expect <= BATCHES * PER_BATCH {
            let m = fast.recv().await;
            assert_eq!(
                m["seq"].as_u64(),
                Some(expect),
                "fast client must see every tick in order"
            );
            expect += 1;
        }
    });
    let mut producer = server.producer().await;
    let pad = "x".repeat(100);
    for b in 0..BATCHES {
        let ticks: Vec<Value> = (0..PER_BATCH)
            .map(|i| {
                let mut t = tick("SLOW", 1.0 + (b * PER_BATCH + i) as f64 * 1e-6, 1.0);
                t["id"] = json!(format!("{pad}{b}-{i}"));
                t
            })
            .collect();
        let ack = ingest(&mut producer, &ticks).await;
        assert_eq!(ack["accepted"], PER_BATCH);
    }
    reader.await.unwrap();
    server
        .wait_stats("slow consumer close", |s| {
            s["dropped"]["slow_consumer_closes"] == 1
        })
        .await;
    // Now the slow client reads: what was buffered, then the error, then close 4008.
    let (seen, ended) = slow.until_closed().await;
    assert_eq!(ended, Ended::Close(4008));
    let last = seen.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "slow_consumer");
    // Whatever it did get was in order, so it can resume from its last seq.
    let seqs: Vec<u64> = seen
        .iter()
        .filter(|m| m["type"] == "tick")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert!((seqs.len() as u64) < BATCHES * PER_BATCH);
}

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
    let mut producer = server.producer().await;
    flood_while_fast_reads(&mut producer, fast, 200, 200).await;
    server
        .wait_stats("slow consumer close", |s| {
            s["dropped"]["slow_consumer_closes"] == 1
        })
        .await;
    assert_closed_as_slow(&mut slow, 200 * 200).await;
}

/// A client whose socket is full still has its requests read: it sends pings throughout but
/// reads nothing, and is neither closed as idle (nothing heard for three heartbeats) nor cut
/// off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_full_socket_is_still_heard() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut config = test_config();
    config.server.heartbeat_ms = 200;
    // Room for the whole flood in the server's queue: this client is lagging, not lost.
    config.limits.outbound_buffer_bytes = 64 * 1024 * 1024;
    let server = TestServer::start_with(config).await;
    let (mut lagging, _) = server.client().await;
    subscribe(&mut lagging, 1, json!({"symbols": ["FULL"]})).await;
    let (mut sink, mut stream) = lagging.inner.split();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let talker = tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            let ping = json!({"op": "ping", "id": 100 + sent}).to_string();
            sink.send(Message::Text(ping.into())).await.unwrap();
            sent += 1;
            tokio::select! {
                _ = &mut stop_rx => return sent,
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
    });
    let mut producer = server.producer().await;
    let pad = "x".repeat(100);
    const BATCHES: u64 = 300;
    const PER_BATCH: u64 = 200;
    for b in 0..BATCHES {
        let ticks: Vec<Value> = (0..PER_BATCH)
            .map(|i| {
                let mut t = tick("FULL", 1.0 + (b * PER_BATCH + i) as f64 * 1e-7, 1.0);
                t["id"] = json!(format!("{pad}{b}-{i}"));
                t
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], PER_BATCH);
    }
    // Some 15 MB are now waiting for a client that reads nothing; it keeps talking for longer
    // than three heartbeats more. A fixed period on purpose: what is checked is that nothing
    // happens during it (no idle close), and there is no event to wait for instead.
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    stop_tx.send(()).unwrap();
    let pings = talker.await.unwrap();
    assert_eq!(
        server
            .metric("tickfan_limit_hits_total{limit=\"heartbeat_timeout\"}")
            .await,
        0.0,
        "a client that keeps talking is not idle"
    );
    // Reading now, it gets every tick in order and a pong for every ping.
    let (mut next_seq, mut pongs) = (1, 0);
    while next_seq <= BATCHES * PER_BATCH || pongs < pings {
        let m = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("quiet")
            .expect("ended")
            .expect("error");
        let Message::Text(text) = m else { continue };
        let m: Value = serde_json::from_str(text.as_str()).unwrap();
        match m["type"].as_str() {
            Some("tick") => {
                assert_eq!(m["seq"].as_u64(), Some(next_seq));
                next_seq += 1;
            }
            Some("pong") => pongs += 1,
            _ => {}
        }
    }
}

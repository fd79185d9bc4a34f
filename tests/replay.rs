//! Paced replay (issue 12, defect 4): `since_seq` and `history` replays go out as fast as the
//! client reads them, whatever `outbound_buffer_bytes` is. 50,000 stored ticks behind a 64 KiB
//! outbound buffer: a reading client gets every stored tick, in seq order, with no gap and no
//! 4008, in every mode; live ticks published meanwhile follow the snapshot with contiguous seq;
//! a realtime client that stops reading is still a slow consumer, a throttled one is not.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const STORED: u64 = 50_000;
const BUFFER: usize = 65_536;

/// A server with a 64 KiB outbound buffer and `STORED` ticks of `symbol`, each with an `id`.
async fn server_with_backlog(symbol: &str, recent_ticks: usize) -> TestServer {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = BUFFER;
    config.dispatch.recent_ticks = recent_ticks;
    let server = TestServer::start_with(config).await;
    store_ticks(&server, symbol, 0, STORED).await;
    server
}

/// Stores ticks `from..to` of `symbol` through `POST /api/ticks` (acked = durable).
async fn store_ticks(server: &TestServer, symbol: &str, from: u64, to: u64) {
    let now = now_ms();
    let mut start = from;
    while start < to {
        let end = (start + 25_000).min(to);
        let mut body = String::new();
        for i in start..end {
            body.push_str(
                &json!({"symbol": symbol, "ts": now, "price": 100.0 + i as f64 * 1e-4,
                        "volume": 1.0, "id": format!("t{i}")})
                .to_string(),
            );
            body.push('\n');
        }
        let (status, _, ack) = server.post_ticks(body).await;
        assert_eq!(status, 200, "{ack}");
        assert_eq!(ack["accepted"], end - start, "{ack}");
        start = end;
    }
}

/// What a client saw of one symbol.
#[derive(Default, Debug)]
struct Seen {
    /// Seqs from snapshot messages, in arrival order.
    snapshot: Vec<u64>,
    /// Seqs from live ticks (tick or batch messages), in arrival order.
    live: Vec<u64>,
    /// A live tick arrived before a later snapshot message.
    live_before_snapshot: bool,
    gap_flags: Vec<bool>,
    errors: Vec<Value>,
}

impl Seen {
    fn last(&self) -> u64 {
        self.live
            .last()
            .or(self.snapshot.last())
            .copied()
            .unwrap_or(0)
    }

    fn take(&mut self, symbol: &str, v: &Value) {
        match v["type"].as_str() {
            Some("snapshot") if v["symbol"] == symbol => {
                if !self.live.is_empty() {
                    self.live_before_snapshot = true;
                }
                self.gap_flags.push(v["gap"].as_bool().unwrap());
                for t in v["ticks"].as_array().unwrap() {
                    self.snapshot.push(t["seq"].as_u64().unwrap());
                }
            }
            Some("tick") if v["symbol"] == symbol => self.live.push(v["seq"].as_u64().unwrap()),
            Some("batch") => {
                for t in v["ticks"].as_array().unwrap() {
                    if t["symbol"] == symbol {
                        self.live.push(t["seq"].as_u64().unwrap());
                    }
                }
            }
            Some("error") => self.errors.push(v.clone()),
            _ => {}
        }
    }
}

/// Reads until `symbol` has reached seq `upto` (snapshot or live); panics on a close.
async fn read_until(ws: &mut Ws, symbol: &str, upto: u64, seen: &mut Seen) {
    while seen.last() < upto {
        let v = ws.recv().await;
        seen.take(symbol, &v);
        assert!(
            seen.errors.is_empty(),
            "error during replay: {:?}",
            seen.errors
        );
    }
}

fn assert_contiguous(seqs: &[u64], first: u64, last: u64, what: &str) {
    assert_eq!(seqs.first().copied(), Some(first), "{what}: first seq");
    assert_eq!(seqs.last().copied(), Some(last), "{what}: last seq");
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "{what}: gap or duplicate after seq {}",
            w[0]
        );
    }
}

/// Live batch `b`: 200 ticks with long ids (about 40 KB), alternating between two symbols.
fn live_batch(b: u64, symbols: [&str; 2]) -> Vec<Value> {
    let pad = "x".repeat(100);
    (0..200)
        .map(|i| {
            let mut t = tick(
                symbols[i % 2],
                1.0 + (b * 200 + i as u64) as f64 * 1e-6,
                1.0,
            );
            t["id"] = json!(format!("{pad}{b}-{i}"));
            t
        })
        .collect()
}

/// A client whose socket receive buffer is small, so that not reading backs up the server.
async fn small_buffer_client(addr: SocketAddr) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (inner, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    let mut ws = Ws { inner };
    assert_eq!(ws.recv().await["type"], "welcome");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_any_distance_in_every_mode_with_a_64k_buffer() {
    let server = server_with_backlog("R", 1_000).await;
    for (mode, since) in [
        ("realtime", 0),
        ("batch", 1),
        ("throttled", 0),
        ("smart", 1),
        ("realtime", 1),
    ] {
        let (mut ws, _) = server.client().await;
        let ack = subscribe(
            &mut ws,
            1,
            json!({"symbols": ["R"], "mode": mode, "interval_ms": 50, "since_seq": {"R": since}}),
        )
        .await;
        assert_eq!(ack["last_seq"]["R"], STORED);
        let mut seen = Seen::default();
        read_until(&mut ws, "R", STORED, &mut seen).await;
        assert_contiguous(&seen.snapshot, since + 1, STORED, mode);
        assert!(seen.live.is_empty(), "{mode}: no live tick was published");
        assert!(!seen.gap_flags[0], "{mode}");
        // Still open and answering.
        let pong = ws.request(json!({"op": "ping", "id": 9})).await;
        assert_eq!(pong["type"], "pong", "{mode}");
        ws.close().await;
    }
    assert_eq!(
        server
            .metric(r#"tickfan_limit_hits_total{limit="slow_consumer"}"#)
            .await,
        0.0
    );
    assert_eq!(server.metric("tickfan_replays").await, 0.0, "all finished");
    assert_eq!(
        server.metric("tickfan_replayed_ticks_total").await,
        (5 * STORED - 3) as f64
    );
}

/// `history: 1000` of ticks with ids through a 64 KiB buffer (about 200 KB of snapshot),
/// served from a ring of `recent_ticks`.
async fn history_1000(symbol: &str, recent_ticks: usize, mode: &str) {
    let server = server_with_backlog(symbol, recent_ticks).await;
    let (mut ws, _) = server.client().await;
    subscribe(
        &mut ws,
        1,
        json!({"symbols": [symbol], "history": 1000, "mode": mode}),
    )
    .await;
    let mut seen = Seen::default();
    read_until(&mut ws, symbol, STORED, &mut seen).await;
    assert_contiguous(&seen.snapshot, STORED - 999, STORED, "history 1000");
    let pong = ws.request(json!({"op": "ping", "id": 9})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_1000_with_ids_from_memory_through_a_64k_buffer() {
    history_1000("H", 1_000, "realtime").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_1000_with_ids_from_the_store_through_a_64k_buffer() {
    // A ring of 10 ticks: the 1000 come from the store.
    history_1000("HS", 10, "throttled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ticks_during_a_long_replay_follow_it_with_contiguous_seq() {
    // A short ring: live ticks overflow it while the replay is still in the store.
    let server = server_with_backlog("L", 100).await;
    let (mut ws, _) = server.client().await;
    subscribe(&mut ws, 1, json!({"symbols": ["L"], "since_seq": {"L": 0}})).await;
    const LIVE: u64 = 5_000;
    let addr = server.addr;
    let producer = tokio::spawn(async move {
        let mut p = Ws::connect(&format!("ws://{addr}/ingest")).await;
        for b in 0..LIVE / 100 {
            let ticks: Vec<Value> = (0..100)
                .map(|i| {
                    let mut t = tick("L", 200.0 + (b * 100 + i) as f64 * 1e-4, 1.0);
                    t["id"] = json!(format!("live{b}-{i}"));
                    t
                })
                .collect();
            let ack = ingest(&mut p, &ticks).await;
            assert_eq!(ack["accepted"], 100, "{ack}");
        }
    });
    let mut seen = Seen::default();
    read_until(&mut ws, "L", STORED + LIVE, &mut seen).await;
    producer.await.unwrap();
    assert!(
        !seen.live_before_snapshot,
        "a live tick came before the snapshot ended"
    );
    let mut all = seen.snapshot.clone();
    all.extend(&seen.live);
    assert_contiguous(&all, 1, STORED + LIVE, "snapshot then live");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_client_that_stops_reading_mid_replay_is_a_slow_consumer() {
    let server = server_with_backlog("S", 1_000).await;
    let mut ws = small_buffer_client(server.addr).await;
    subscribe(
        &mut ws,
        1,
        json!({"symbols": ["S", "S2"], "since_seq": {"S": 0}}),
    )
    .await;
    // Read one snapshot message, then stop reading while ticks keep coming.
    let first = ws.recv_until(|v| v["type"] == "snapshot").await;
    assert_eq!(first.last().unwrap()["ticks"][0]["seq"], 1);
    let mut producer = server.producer().await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut b = 0u64;
    while server
        .metric(r#"tickfan_limit_hits_total{limit="slow_consumer"}"#)
        .await
        < 1.0
    {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        ingest(&mut producer, &live_batch(b, ["S", "S2"])).await;
        b += 1;
    }
    let (msgs, ended) = ws.until_closed().await;
    assert_eq!(ended, Ended::Close(4008));
    assert_eq!(msgs.last().unwrap()["code"], "slow_consumer");
    // "Reconnect and resume with since_seq" works: no livelock.
    let mut before = Seen::default();
    for v in first.iter().chain(&msgs) {
        before.take("S", v);
    }
    let resume_at = before.last();
    assert!(resume_at < STORED, "the close came mid-replay");
    let (mut again, _) = server.client().await;
    let ack = subscribe(
        &mut again,
        1,
        json!({"symbols": ["S"], "since_seq": {"S": resume_at}}),
    )
    .await;
    let live = ack["last_seq"]["S"].as_u64().unwrap();
    let mut seen = Seen::default();
    read_until(&mut again, "S", live, &mut seen).await;
    assert_contiguous(&seen.snapshot, resume_at + 1, live, "resume after 4008");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_client_that_pauses_mid_replay_is_not_closed_and_gets_everything() {
    let server = server_with_backlog("P", 1_000).await;
    let mut ws = small_buffer_client(server.addr).await;
    subscribe(
        &mut ws,
        1,
        json!({"symbols": ["P", "P2"], "mode": "throttled", "interval_ms": 50,
               "since_seq": {"P": 0}}),
    )
    .await;
    let mut seen = Seen::default();
    let first = ws.recv_until(|v| v["type"] == "snapshot").await;
    for v in &first {
        seen.take("P", v);
    }
    // Paused: the producer publishes (and gets acks for) far more than the buffer holds.
    let mut producer = server.producer().await;
    const LIVE_BATCHES: u64 = 50;
    for b in 0..LIVE_BATCHES {
        let ack = ingest(&mut producer, &live_batch(b, ["P", "P2"])).await;
        assert_eq!(ack["accepted"], 200);
    }
    let last = STORED + LIVE_BATCHES * 100;
    // Reading again: every stored tick in the snapshot, then live ticks up to the newest.
    read_until(&mut ws, "P", last, &mut seen).await;
    assert!(!seen.live_before_snapshot);
    let stored_part: Vec<u64> = seen
        .snapshot
        .iter()
        .copied()
        .filter(|s| *s <= STORED)
        .collect();
    assert_contiguous(&stored_part, 1, STORED, "throttled snapshot");
    let mut all = seen.snapshot.clone();
    all.extend(&seen.live);
    for w in all.windows(2) {
        assert!(w[1] > w[0], "seq not increasing: {} then {}", w[0], w[1]);
    }
    assert_eq!(
        server
            .metric(r#"tickfan_limit_hits_total{limit="slow_consumer"}"#)
            .await,
        0.0
    );
    let pong = ws.request(json!({"op": "ping", "id": 9})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256k_buffer_resumes_too() {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = 256 * 1024;
    let server = TestServer::start_with(config).await;
    store_ticks(&server, "Q", 0, STORED).await;
    let (mut ws, _) = server.client().await;
    subscribe(
        &mut ws,
        1,
        json!({"symbols": ["Q"], "mode": "smart", "since_seq": {"Q": 0}}),
    )
    .await;
    let mut seen = Seen::default();
    read_until(&mut ws, "Q", STORED, &mut seen).await;
    assert_contiguous(&seen.snapshot, 1, STORED, "256k");
    // The raw message path stays usable (no close frame queued behind the snapshot).
    ws.send_json(&json!({"op": "ping", "id": 3})).await;
    loop {
        match ws.next_by(tokio::time::Instant::now() + DEADLINE).await {
            Message::Text(t) if t.as_str().contains("pong") => break,
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
}

//! Delivery modes end to end, with exact accounting: batch (lossless, only `batch` messages),
//! throttled (`1 + conflated` adds up to what was published, the latest tick always arrives,
//! critical ticks are never skipped), smart (lags into batch/conflation and comes back to
//! realtime, never closed), mode switches mid-stream, filters combined with modes, and priority
//! lanes overtaking a flood of low-priority ticks.
//!
//! Ticks go in through `/ingest`, whose ack is sent once the frame's ticks have left the priority
//! queue (got their seq), so after an ack the dispatcher has offered those ticks to every client.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A normal tick for `sym` with a unique trade id `{sym}-{n}` (no duplicate suppression) and a
/// price that moves by at most 0.1% (no quality penalty).
fn mk(sym: &str, n: u64) -> Value {
    let mut t = tick(sym, 100.0 + (n % 1000) as f64 * 0.0001, 1.0);
    t["id"] = json!(format!("{sym}-{n}"));
    t
}

fn critical(mut t: Value) -> Value {
    t["priority"] = json!("critical");
    t
}

/// The tick objects a message carries: itself for `tick`, its list for `batch`, none otherwise.
fn ticks_of(m: &Value) -> Vec<Value> {
    match m["type"].as_str() {
        Some("tick") => vec![m.clone()],
        Some("batch") => m["ticks"].as_array().expect("batch.ticks").clone(),
        _ => Vec::new(),
    }
}

/// Per-symbol seq bookkeeping over everything one client receives.
#[derive(Default)]
struct Seqs {
    last: HashMap<String, u64>,
}

impl Seqs {
    /// Records a tick; panics unless its seq is above every earlier seq of its symbol.
    fn strictly_after(&mut self, t: &Value) -> u64 {
        let sym = t["symbol"].as_str().expect("symbol").to_owned();
        let seq = t["seq"].as_u64().expect("seq");
        let prev = self.last.insert(sym.clone(), seq).unwrap_or(0);
        assert!(
            seq > prev,
            "{sym}: seq {seq} after {prev} (duplicate or out of order)"
        );
        seq
    }

    /// Records a tick; panics unless it is exactly the next seq of its symbol (lossless).
    fn next(&mut self, t: &Value) -> u64 {
        let sym = t["symbol"].as_str().expect("symbol").to_owned();
        let seq = t["seq"].as_u64().expect("seq");
        let prev = self.last.insert(sym.clone(), seq).unwrap_or(0);
        assert_eq!(
            seq,
            prev + 1,
            "{sym}: seq {seq} after {prev} (lost, duplicated or reordered)"
        );
        seq
    }

    fn last(&self, sym: &str) -> u64 {
        self.last.get(sym).copied().unwrap_or(0)
    }
}

/// Connects to `/ws` over a socket with a tiny kernel receive buffer, so that a client that
/// stops reading backs the server up after little data, and reads the welcome.
async fn client_with_small_rcvbuf(server: &TestServer) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * 1024).unwrap();
    let stream = socket.connect(server.addr).await.unwrap();
    let (inner, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(
            server.ws_url("/ws"),
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
        ),
    )
    .await
    .expect("connect timed out")
    .expect("connect failed");
    let mut ws = Ws { inner };
    assert_eq!(ws.recv().await["type"], "welcome");
    ws
}

// ---------------------------------------------------------------------------------------------
// batch

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_is_lossless_in_order_and_never_sends_a_lone_tick() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    let ack = subscribe(
        &mut client,
        1,
        json!({"symbols": ["BA", "BB"], "mode": "batch", "interval_ms": 50}),
    )
    .await;
    assert_eq!(ack["mode"], "batch", "{ack}");
    let mut producer = server.producer().await;
    const FRAMES: u64 = 10;
    const PER: u64 = 100;
    for f in 0..FRAMES {
        let ticks: Vec<Value> = (0..PER)
            .map(|i| {
                let n = f * PER + i;
                mk(if n.is_multiple_of(2) { "BA" } else { "BB" }, n)
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], PER);
    }
    let mut seqs = Seqs::default();
    let (mut got, mut batches) = (0, 0);
    while got < FRAMES * PER {
        let m = client.recv().await;
        assert_eq!(
            m["type"], "batch",
            "in batch mode no tick travels alone: {m}"
        );
        let ticks = ticks_of(&m);
        assert!(!ticks.is_empty(), "no empty batch messages");
        for t in &ticks {
            assert_eq!(t["type"], "tick");
            seqs.next(t);
        }
        got += ticks.len() as u64;
        batches += 1;
    }
    assert_eq!(got, FRAMES * PER, "nothing extra");
    assert_eq!((seqs.last("BA"), seqs.last("BB")), (500, 500));
    assert!(
        batches < FRAMES * PER,
        "ticks are grouped into batches ({batches} batches for {got} ticks)"
    );

    // With an interval of an hour nothing would leave on the timer: a critical tick flushes
    // what is held at once, in one batch, and in seq order.
    let ack = client
        .request(json!({"op": "configure", "id": 2, "interval_ms": 3_600_000}))
        .await;
    assert_eq!(
        (ack["type"].as_str(), ack["mode"].as_str()),
        (Some("ack"), Some("batch"))
    );
    ingest(&mut producer, &[mk("BA", 10_000)]).await;
    ingest(&mut producer, &[critical(mk("BA", 10_001))]).await;
    let m = client.recv().await;
    assert_eq!(m["type"], "batch", "{m}");
    let ticks = ticks_of(&m);
    assert_eq!(ticks.len(), 2, "{m}");
    assert_eq!(
        (ticks[0]["seq"].as_u64(), ticks[1]["seq"].as_u64()),
        (Some(501), Some(502))
    );
    assert_eq!(ticks[1]["priority"], "critical");

    // Held ticks are not lost by switching away from batch: they are flushed before the ack.
    ingest(&mut producer, &[mk("BB", 10_002), mk("BB", 10_003)]).await;
    client
        .send_json(&json!({"op": "configure", "id": 3, "mode": "realtime"}))
        .await;
    let m = client.recv().await;
    assert_eq!(
        m["type"], "batch",
        "held ticks come before the configure ack: {m}"
    );
    let seqs_in: Vec<u64> = ticks_of(&m)
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs_in, [501, 502]);
    let ack = client.recv().await;
    assert_eq!(
        (ack["id"].as_u64(), ack["mode"].as_str()),
        (Some(3), Some("realtime"))
    );
    ingest(&mut producer, &[mk("BB", 10_004)]).await;
    let m = client.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("tick"), Some(503))
    );
}

// ---------------------------------------------------------------------------------------------
// throttled

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_mode_accounts_for_every_tick_and_never_skips_critical() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    let ack = subscribe(
        &mut client,
        1,
        json!({"symbols": ["TA", "TB"], "mode": "throttled", "interval_ms": 20}),
    )
    .await;
    assert_eq!(ack["mode"], "throttled");
    let mut producer = server.producer().await;
    const FRAMES: u64 = 20;
    const PER: u64 = 100;
    let mut critical_ids = HashSet::new();
    for f in 0..FRAMES {
        let ticks: Vec<Value> = (0..PER)
            .map(|i| {
                let n = f * PER + i;
                let t = mk(if n.is_multiple_of(2) { "TA" } else { "TB" }, n);
                if n % 25 == 3 {
                    critical_ids.insert(t["id"].as_str().unwrap().to_owned());
                    critical(t)
                } else {
                    t
                }
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], PER);
    }
    let published = FRAMES * PER / 2; // per symbol
    assert_eq!(critical_ids.len(), 80);

    let mut seqs = Seqs::default();
    let mut accounted: HashMap<String, u64> = HashMap::new();
    let (mut messages, mut conflated_total) = (0u64, 0u64);
    while seqs.last("TA") < published || seqs.last("TB") < published {
        let m = client.recv().await;
        assert_eq!(m["type"], "tick", "throttled mode sends single ticks: {m}");
        seqs.strictly_after(&m);
        let conflated = m["conflated"]
            .as_u64()
            .unwrap_or_else(|| panic!("every throttled message carries `conflated`: {m}"));
        conflated_total += conflated;
        messages += 1;
        *accounted
            .entry(m["symbol"].as_str().unwrap().to_owned())
            .or_default() += 1 + conflated;
        if m["priority"] == "critical" {
            critical_ids.remove(m["id"].as_str().unwrap());
        }
    }
    // The last message of each symbol carries the latest tick, and the counts add up exactly.
    assert_eq!((seqs.last("TA"), seqs.last("TB")), (published, published));
    assert_eq!(accounted["TA"], published, "TA: sum of 1 + conflated");
    assert_eq!(accounted["TB"], published, "TB: sum of 1 + conflated");
    assert!(
        critical_ids.is_empty(),
        "critical ticks skipped by conflation: {critical_ids:?}"
    );
    assert!(
        conflated_total > 0 && messages < 2 * published,
        "bursts of 100 ticks per frame conflate ({messages} messages)"
    );
    // Nothing else is pending: a ping round trip shows no stray message, and the server's
    // conflation counter matches what the client was told.
    let pong = client.request(json!({"op": "ping", "id": 9})).await;
    assert_eq!(pong["type"], "pong");
    let counted = server.metric("tickfan_conflated_ticks_total").await;
    assert!(counted >= 1.0, "conflation is counted in /metrics");
}

/// A throttled client that stops reading keeps its queue full; a critical tick that arrives then
/// must still reach it ("critical ticks are never held back or skipped"), even when a normal
/// tick of the same symbol follows right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_stalled_client_still_gets_every_critical_tick() {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = 256 * 1024;
    config.limits.max_message_bytes = 4 * 1024 * 1024;
    config.server.heartbeat_ms = 120_000;
    let server = TestServer::start_with(config).await;
    let mut stalled = client_with_small_rcvbuf(&server).await;
    subscribe(
        &mut stalled,
        1,
        json!({"symbols": ["*"], "mode": "throttled", "interval_ms": 10}),
    )
    .await;
    let mut producer = server.producer().await;
    // Filler: ticks of many distinct symbols, so throttling cannot shrink them much, until the
    // client's queue is full (messages queued stop growing while ticks keep coming).
    let pad = "p".repeat(100);
    let mut n = 0u64;
    let mut stuck_rounds = 0;
    let mut last_queued = server.metric("tickfan_messages_queued_total").await;
    for _round in 0..1000 {
        let ticks: Vec<Value> = (0..500)
            .map(|_| {
                n += 1;
                let mut t = tick(&format!("F{}", n % 5000), 100.0, 1.0);
                t["id"] = json!(format!("{pad}{n}"));
                t
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], 500);
        let queued = server.metric("tickfan_messages_queued_total").await;
        if queued - last_queued < 50.0 {
            stuck_rounds += 1;
            if stuck_rounds >= 3 {
                break;
            }
        } else {
            stuck_rounds = 0;
        }
        last_queued = queued;
    }
    assert!(
        stuck_rounds >= 3,
        "the stalled client's queue never filled up"
    );
    // Now, per symbol: a critical tick, then a normal one.
    let mut frame = Vec::new();
    for s in 0..20u64 {
        let sym = format!("CR{s}");
        frame.push(critical(mk(&sym, 1)));
        frame.push(mk(&sym, 2));
    }
    assert_eq!(ingest(&mut producer, &frame).await["accepted"], 40);
    // Read everything until each CR symbol's latest tick (seq 2) has arrived.
    let mut seqs = Seqs::default();
    let mut critical_seen = HashSet::new();
    let mut done = HashSet::new();
    while done.len() < 20 {
        let m = stalled.recv().await;
        for t in ticks_of(&m) {
            seqs.strictly_after(&t);
            let sym = t["symbol"].as_str().unwrap().to_owned();
            if sym.starts_with("CR") {
                if t["priority"] == "critical" {
                    critical_seen.insert(sym.clone());
                }
                if t["seq"] == 2 {
                    done.insert(sym);
                }
            }
        }
    }
    assert_eq!(
        critical_seen.len(),
        20,
        "every critical tick reaches a stalled throttled client; got only {critical_seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// smart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smart_mode_degrades_while_lagging_and_returns_to_realtime_without_closing() {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = 64 * 1024;
    config.limits.max_message_bytes = 4 * 1024 * 1024;
    // The paused client answers no pings while paused; do not let the heartbeat reap it.
    config.server.heartbeat_ms = 120_000;
    let server = TestServer::start_with(config).await;
    let mut client = client_with_small_rcvbuf(&server).await;
    let symbols = ["SA", "SB", "SC", "SD"];
    let ack = subscribe(
        &mut client,
        1,
        json!({"symbols": symbols, "mode": "smart", "interval_ms": 50}),
    )
    .await;
    assert_eq!(ack["mode"], "smart");
    let mut producer = server.producer().await;
    // The client does not read while the producer pushes; push until the server reports that
    // smart mode switched twice (batch, then conflation), plus a few more frames.
    let pad = "s".repeat(100);
    let mut published: HashMap<&str, u64> = HashMap::new();
    let mut n = 0u64;
    let mut extra = None;
    for _ in 0..400 {
        let ticks: Vec<Value> = (0..500)
            .map(|_| {
                n += 1;
                let sym = symbols[(n % 4) as usize];
                *published.entry(sym).or_default() += 1;
                let mut t = mk(sym, n);
                t["id"] = json!(format!("{pad}{n}"));
                t
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], 500);
        match &mut extra {
            Some(0) => break,
            Some(k) => *k -= 1,
            None => {
                if server.metric("tickfan_mode_switches_total").await >= 2.0 {
                    extra = Some(5);
                }
            }
        }
    }
    assert!(
        extra.is_some(),
        "smart mode never left realtime while the client lagged"
    );

    // Resume reading: everything queued, the switch announcements among it, and the switch
    // back to realtime once the client has caught up.
    let mut seqs = Seqs::default();
    let mut accounted: HashMap<String, u64> = HashMap::new();
    let mut modes = Vec::new();
    loop {
        let msg = tokio::time::timeout(DEADLINE, client.inner.next())
            .await
            .expect("timed out waiting for the switch back to realtime")
            .expect("connection ended")
            .expect("websocket error");
        let m: Value = match msg {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(c) => panic!("smart mode must never close a lagging client: {c:?}"),
            _ => continue,
        };
        match m["type"].as_str().unwrap() {
            "mode" => {
                assert!(m["reason"].is_string(), "{m}");
                modes.push(m["mode"].as_str().unwrap().to_owned());
            }
            "tick" | "batch" => {
                for t in ticks_of(&m) {
                    seqs.strictly_after(&t);
                    let skipped = t["conflated"].as_u64().unwrap_or(0);
                    *accounted
                        .entry(t["symbol"].as_str().unwrap().to_owned())
                        .or_default() += 1 + skipped;
                }
            }
            "heartbeat" => {}
            other => panic!("unexpected message {other}: {m}"),
        }
        // Done once every published tick is accounted for and smart mode is back in realtime
        // (had the client caught up while the producer was still pushing, there would be
        // several lag cycles; the loop reads through all of them).
        let all_in = symbols.iter().all(|s| seqs.last(s) == published[s]);
        if all_in && modes.last().is_some_and(|m| m == "realtime") {
            break;
        }
    }
    assert_eq!(
        modes.first().map(String::as_str),
        Some("batch"),
        "{modes:?}"
    );
    assert_eq!(modes.last().map(String::as_str), Some("realtime"));
    assert!(
        modes
            .iter()
            .all(|m| ["batch", "throttled", "realtime"].contains(&m.as_str())),
        "{modes:?}"
    );
    assert!(modes.len() >= 2);
    // Everything published was delivered or counted as conflated, and the latest tick of
    // every symbol arrived.
    for sym in symbols {
        assert_eq!(
            seqs.last(sym),
            published[sym],
            "{sym}: latest tick delivered"
        );
        assert_eq!(
            accounted[sym], published[sym],
            "{sym}: delivered + conflated"
        );
    }
    // Back in realtime: single ticks again, continuing the seqs, and the connection is fine.
    let more: Vec<Value> = (0..10).map(|i| mk("SA", 1_000_000 + i)).collect();
    ingest(&mut producer, &more).await;
    for i in 1..=10 {
        let m = client.recv().await;
        assert_eq!(m["type"], "tick", "{m}");
        assert!(
            m.get("conflated").is_none(),
            "realtime ticks are not conflated: {m}"
        );
        assert_eq!(m["seq"].as_u64(), Some(published["SA"] + i));
    }
    let pong = client.request(json!({"op": "ping", "id": 5})).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(
        server
            .metric("tickfan_limit_hits_total{limit=\"slow_consumer\"}")
            .await,
        0.0,
        "smart mode is never closed as a slow consumer"
    );
}

// ---------------------------------------------------------------------------------------------
// switching modes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_between_lossless_modes_mid_stream_loses_nothing() {
    // Many configure requests: lift the request rate limit (tested in auth_limits.rs).
    let mut config = test_config();
    config.limits.ops_per_sec = 100_000;
    let server = TestServer::start_with(config).await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["SW"]})).await;
    let mut producer = server.producer().await;
    const FRAMES: u64 = 60;
    const PER: u64 = 50;
    let feeder = tokio::spawn(async move {
        for f in 0..FRAMES {
            let ticks: Vec<Value> = (0..PER).map(|i| mk("SW", f * PER + i)).collect();
            assert_eq!(ingest(&mut producer, &ticks).await["accepted"], PER);
        }
        producer
    });
    // Flip realtime <-> batch while ticks flow; every reply and tick is read in one stream.
    let mut seqs = Seqs::default();
    let (mut singles, mut batched) = (0u64, 0u64);
    let mut next_id = 10u64;
    let mut waiting_ack = false;
    while seqs.last("SW") < FRAMES * PER {
        if !waiting_ack {
            let mode = if next_id.is_multiple_of(2) {
                "batch"
            } else {
                "realtime"
            };
            client
                .send_json(
                    &json!({"op": "configure", "id": next_id, "mode": mode, "interval_ms": 10}),
                )
                .await;
            waiting_ack = true;
        }
        let m = client.recv().await;
        match m["type"].as_str().unwrap() {
            "ack" => {
                assert_eq!(m["id"], next_id, "{m}");
                next_id += 1;
                waiting_ack = false;
            }
            "tick" => {
                seqs.next(&m);
                singles += 1;
            }
            "batch" => {
                for t in ticks_of(&m) {
                    seqs.next(&t);
                    batched += 1;
                }
            }
            other => panic!("unexpected {other}: {m}"),
        }
    }
    let mut producer = feeder.await.unwrap();
    assert_eq!(singles + batched, FRAMES * PER, "every tick exactly once");
    assert!(next_id > 12, "the mode changed several times mid-stream");

    // The deterministic part: ticks held by batch mode with a long interval are flushed, in
    // order and before the ack, by a switch to realtime; then realtime goes on from there.
    if waiting_ack {
        client.reply(next_id).await;
    }
    let ack = client
        .request(json!({"op": "configure", "id": 100, "mode": "batch", "interval_ms": 3_600_000}))
        .await;
    assert_eq!(ack["mode"], "batch");
    let held: Vec<Value> = (0..30).map(|i| mk("SW", 50_000 + i)).collect();
    ingest(&mut producer, &held).await;
    client
        .send_json(&json!({"op": "configure", "id": 101, "mode": "realtime"}))
        .await;
    let m = client.recv().await;
    assert_eq!(m["type"], "batch", "{m}");
    for t in ticks_of(&m) {
        seqs.next(&t);
    }
    assert_eq!(seqs.last("SW"), FRAMES * PER + 30);
    assert_eq!(client.recv().await["id"], 101);
    ingest(&mut producer, &[mk("SW", 60_000)]).await;
    let m = client.recv().await;
    assert_eq!(m["type"], "tick");
    seqs.next(&m);
}

// ---------------------------------------------------------------------------------------------
// filters with modes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_apply_in_every_mode_and_critical_ticks_ignore_min_volume() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    let ack = subscribe(
        &mut client,
        1,
        json!({"symbols": ["FQ"], "mode": "batch", "interval_ms": 3_600_000, "min_volume": 10}),
    )
    .await;
    assert_eq!(ack["mode"], "batch");
    let mut producer = server.producer().await;
    // One tick per frame so seqs follow sending order.
    let plain = |price: f64, volume: f64| tick("FQ", price, volume);
    for t in [
        plain(100.0, 50.0),          // 1 passes
        plain(100.1, 9.99),          // 2 volume below 10
        critical(plain(100.2, 0.0)), // 3 critical: volume floor does not apply; flushes
    ] {
        ingest(&mut producer, &[t]).await;
    }
    let m = client.recv().await;
    let seqs: Vec<u64> = ticks_of(&m)
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 3], "{m}");

    // configure raises the quality floor and switches to throttled: a 60% jump scores < 70.
    let ack = client
        .request(
            json!({"op": "configure", "id": 2, "mode": "throttled", "interval_ms": 10,
                        "min_quality": 90, "min_volume": 0}),
        )
        .await;
    assert_eq!(ack["mode"], "throttled");
    for t in [
        plain(160.0, 1.0),           // 4 quality < 70: filtered
        plain(160.1, 0.5),           // 5 passes (no jump from 160.0)
        critical(plain(256.0, 1.0)), // 6 critical, but quality is not waived: filtered
        plain(256.1, 1.0),           // 7 passes
    ] {
        ingest(&mut producer, &[t]).await;
    }
    let mut got = Vec::new();
    while got.last() != Some(&7) {
        let m = client.recv().await;
        assert_eq!(m["type"], "tick", "{m}");
        assert!(m["quality"].as_u64().unwrap() >= 90, "{m}");
        got.push(m["seq"].as_u64().unwrap());
    }
    assert!(!got.contains(&4) && !got.contains(&6), "{got:?}");

    // Back to realtime with no floors: everything passes again; the low-quality tick too.
    client
        .request(json!({"op": "configure", "id": 3, "mode": "realtime", "min_quality": 0}))
        .await;
    ingest(&mut producer, &[plain(500.0, 0.0)]).await;
    let m = client.recv().await;
    assert_eq!(
        (m["seq"].as_u64(), m["type"].as_str()),
        (Some(8), Some("tick"))
    );
    assert!(m["quality"].as_u64().unwrap() < 70);
}

// ---------------------------------------------------------------------------------------------
// priority

/// Seq is assigned at dequeue, and each drain round of the priority queue takes the critical
/// lane first and at most 64 low ticks. So a critical tick sent behind a flood of 10 000 low
/// ticks in one frame overtakes every low tick still queued when it is admitted: its seq is at
/// most (low ticks already drained by then) + 64 + 1. How many were drained meanwhile depends on
/// scheduling (admission of the frame races the dispatcher), so one run proves nothing by
/// itself; in practice the whole frame is admitted before the first drain and the critical tick
/// gets seq 1. The test asks for seq <= 100 in at least one of up to five runs: FIFO delivery
/// would give 10 001, and a queue that drained the low lane first (1024 per round) over 1 000.
/// Every tick is delivered, in seq order, whatever happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_tick_overtakes_a_flood_of_low_priority_ticks() {
    let mut config = test_config();
    config.limits.max_message_bytes = 16 * 1024 * 1024;
    let server = TestServer::start_with(config).await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["*"]})).await;
    let mut producer = server.producer().await;
    const LOW: u64 = 10_000;
    let mut critical_seqs = Vec::new();
    for run in 0..5u64 {
        let sym = format!("PR{run}");
        let mut frame: Vec<Value> = (0..LOW)
            .map(|i| {
                let mut t = mk(&sym, i);
                t["priority"] = json!("low");
                t
            })
            .collect();
        frame.push(critical(mk(&sym, LOW)));
        assert_eq!(ingest(&mut producer, &frame).await["accepted"], LOW + 1);
        let mut seqs = Seqs::default();
        let mut critical_seq = None;
        for _ in 0..=LOW {
            let m = client.recv().await;
            assert_eq!(m["symbol"], sym.as_str());
            let seq = seqs.next(&m);
            match m["priority"].as_str() {
                Some("critical") => critical_seq = Some(seq),
                Some("low") => {}
                other => panic!("priority passes through: {other:?}"),
            }
        }
        let critical_seq = critical_seq.expect("the critical tick is delivered");
        critical_seqs.push(critical_seq);
        if critical_seq <= 100 {
            break;
        }
    }
    assert!(
        critical_seqs.iter().any(|s| *s <= 100),
        "the critical tick did not overtake the queued low ticks (its seqs: {critical_seqs:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// realtime runs

/// Realtime ticks fanned out in one round reach a plain client as runs the dispatcher framed
/// once and shares (`dispatch::stage`). Each tick must still arrive as its own message, in
/// order, with its seq: for a client of every symbol (consecutive ticks: runs; a tick's JSON
/// is over 125 bytes, so its frame header carries a 16-bit length) and for a client of one of
/// three interleaved symbols (its ticks are apart: one frame each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_ticks_of_one_round_arrive_as_separate_messages_in_order() {
    let server = TestServer::start().await;
    let (mut all, _) = server.client().await;
    let (mut one, _) = server.client().await;
    subscribe(&mut all, 1, json!({"symbols": ["RA", "RB", "RC"]})).await;
    subscribe(&mut one, 1, json!({"symbols": ["RB"]})).await;
    let mut producer = server.producer().await;
    const SYMS: [&str; 3] = ["RA", "RB", "RC"];
    let mut sent = Vec::new();
    for frame in 0..3u64 {
        let ticks: Vec<Value> = (0..60u64)
            .map(|i| {
                let n = frame * 60 + i;
                mk(SYMS[(n % 3) as usize], n)
            })
            .collect();
        assert_eq!(ingest(&mut producer, &ticks).await["accepted"], 60);
        sent.extend(ticks);
    }
    let id_seq = |msgs: &[Value]| -> Vec<(String, String, u64)> {
        msgs.iter()
            .filter(|m| m["type"] == "tick")
            .map(|m| {
                let field = |k: &str| m[k].as_str().expect(k).to_owned();
                (
                    field("symbol"),
                    field("id"),
                    m["seq"].as_u64().expect("seq"),
                )
            })
            .collect()
    };
    let ticks_in = |msgs: &[Value]| msgs.iter().filter(|m| m["type"] == "tick").count();
    let got = id_seq(&collect(&mut all, |m| ticks_in(m) >= sent.len()).await);
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    let expected: Vec<(String, String, u64)> = sent
        .iter()
        .map(|t| {
            let sym = t["symbol"].as_str().unwrap().to_owned();
            let seq = next_seq.entry(sym.clone()).or_insert(0);
            *seq += 1;
            (sym, t["id"].as_str().unwrap().to_owned(), *seq)
        })
        .collect();
    assert_eq!(got, expected, "every tick, once, in order");
    let got_one = id_seq(&collect(&mut one, |m| ticks_in(m) >= sent.len() / 3).await);
    let only_rb: Vec<_> = expected.into_iter().filter(|t| t.0 == "RB").collect();
    assert_eq!(got_one, only_rb);
}

// ---------------------------------------------------------------------------------------------
// shared batches

/// Reads until `done` says the messages so far are enough.
async fn collect(ws: &mut Ws, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    while !done(&seen) {
        seen.push(ws.recv().await);
    }
    seen
}

fn count_ticks(msgs: &[Value], sym: &str) -> usize {
    msgs.iter()
        .flat_map(ticks_of)
        .filter(|t| t["symbol"] == sym)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_batch_clients_share_one_batch_and_joining_or_leaving_loses_nothing() {
    let server = TestServer::start().await;
    let settings = json!({"symbols": ["GA", "GB"], "mode": "batch", "interval_ms": 30});
    let mut a = server.client().await.0;
    let mut b = server.client().await.0;
    let mut c = server.client().await.0;
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(subscribe(ws, 1, settings.clone()).await["mode"], "batch");
    }
    server
        .wait_stats("one shared group of three", |s| {
            s["batch_groups"] == json!({"groups": 1, "members": 3})
        })
        .await;
    let mut producer = server.producer().await;
    let publish = |from: u64, to: u64| -> Vec<Value> {
        (from..to)
            .map(|n| mk(if n.is_multiple_of(2) { "GA" } else { "GB" }, n))
            .collect()
    };
    for f in 0..3 {
        ingest(&mut producer, &publish(f * 100, f * 100 + 100)).await;
    }
    // Mid-stream: d joins with the same settings (it joins the group at its next flush), and
    // b drops GB (it leaves the group, taking what the group holds with it).
    let mut d = server.client().await.0;
    let ack_d = subscribe(&mut d, 1, settings.clone()).await;
    let d_from = |sym: &str| ack_d["last_seq"][sym].as_u64().unwrap();
    b.send_json(&json!({"op": "unsubscribe", "id": 2, "symbols": ["GB"]}))
        .await;
    for f in 3..6 {
        ingest(&mut producer, &publish(f * 100, f * 100 + 100)).await;
    }

    // a and c saw every tick once, in order, in the very same batch frames.
    let all = |m: &[Value]| count_ticks(m, "GA") == 300 && count_ticks(m, "GB") == 300;
    let got_a = collect(&mut a, all).await;
    let got_c = collect(&mut c, all).await;
    for got in [&got_a, &got_c] {
        let mut seqs = Seqs::default();
        for m in got {
            assert_eq!(m["type"], "batch", "{m}");
            ticks_of(m).iter().for_each(|t| {
                seqs.next(t);
            });
        }
    }
    assert_eq!(got_a, got_c, "members of one group get the same frames");

    // d: exactly the ticks after its ack's last_seq.
    let (ga_from, gb_from) = (d_from("GA"), d_from("GB"));
    let got_d = collect(&mut d, |m| {
        count_ticks(m, "GA") as u64 == 300 - ga_from && count_ticks(m, "GB") as u64 == 300 - gb_from
    })
    .await;
    let mut seqs = Seqs::default();
    seqs.last.insert("GA".into(), ga_from);
    seqs.last.insert("GB".into(), gb_from);
    for t in got_d.iter().flat_map(ticks_of) {
        seqs.next(&t);
    }

    // b: every GA tick; GB in order up to its unsubscribe ack and none after it.
    let got_b = collect(&mut b, |m| {
        count_ticks(m, "GA") == 300 && m.iter().any(|v| v["id"] == 2)
    })
    .await;
    let ack_at = got_b.iter().position(|v| v["id"] == 2).unwrap();
    assert_eq!(got_b[ack_at]["op"], "unsubscribe");
    let mut seqs = Seqs::default();
    for (i, m) in got_b.iter().enumerate() {
        for t in ticks_of(m) {
            seqs.next(&t);
            assert!(
                i < ack_at || t["symbol"] == "GA",
                "GB after the unsubscribe ack: {t}"
            );
        }
    }
    assert_eq!(seqs.last("GA"), 300);

    // a, c and d share one group; b (GA only) has its own.
    server
        .wait_stats("two groups", |s| {
            s["batch_groups"] == json!({"groups": 2, "members": 4})
        })
        .await;
}

/// Re-subscribing with `history` while ticks are held in a batch: the held batch goes out
/// before the ack, the snapshot follows, and nothing comes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_never_overtakes_held_batch_ticks() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    let hour = json!({"symbols": ["HB"], "mode": "batch", "interval_ms": 3_600_000});
    subscribe(&mut client, 1, hour.clone()).await;
    let mut producer = server.producer().await;
    ingest(&mut producer, &[mk("HB", 1), mk("HB", 2), mk("HB", 3)]).await;
    client
        .send_json(&json!({"op": "subscribe", "id": 2, "symbols": ["HB"], "history": 10}))
        .await;
    let held = client.recv().await;
    assert_eq!(held["type"], "batch", "held ticks first: {held}");
    let seqs: Vec<u64> = ticks_of(&held)
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let ack = client.recv().await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(2))
    );
    let snapshot = client.recv().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    // The next batch (flushed by a critical tick) carries only the new tick.
    ingest(&mut producer, &[critical(mk("HB", 4))]).await;
    let next = client.recv().await;
    let seqs: Vec<u64> = ticks_of(&next)
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4], "{next}");
}

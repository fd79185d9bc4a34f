//! Producer → client end to end: seq continuity, every reject code, duplicates, backpressure.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_to_client_with_exact_seq_continuity() {
    let server = TestServer::start().await;
    let (mut client, welcome) = server.client().await;
    assert_eq!(welcome["protocol"], 1);
    assert!(welcome["epoch"].as_u64().unwrap() > 0);
    subscribe(&mut client, 1, json!({"symbols": ["AAPL", "MSFT"]})).await;
    let mut producer = server.producer().await;
    let mut sent = 0;
    for batch in 0..20 {
        let ticks: Vec<Value> = (0..50)
            .map(|i| {
                let sym = if i % 2 == 0 { "AAPL" } else { "MSFT" };
                let mut t = tick(sym, 100.0 + f64::from(batch * 50 + i) * 0.01, 1.0);
                t["id"] = json!(format!("{batch}-{i}"));
                t
            })
            .collect();
        let ack = ingest(&mut producer, &ticks).await;
        assert_eq!(ack["accepted"], 50, "{ack}");
        assert_eq!(ack["rejected"], json!([]));
        sent += 50;
    }
    let mut last = std::collections::HashMap::new();
    let mut got = 0;
    while got < sent {
        let m = client.recv().await;
        assert_eq!(m["type"], "tick", "{m}");
        let sym = m["symbol"].as_str().unwrap().to_owned();
        let seq = m["seq"].as_u64().unwrap();
        let prev = last.insert(sym.clone(), seq).unwrap_or(0);
        assert_eq!(seq, prev + 1, "{sym}: seq {seq} after {prev}");
        assert!(
            m["t_in"].as_i64().unwrap() > 1_000_000_000_000_000,
            "t_in is in µs"
        );
        assert!(m["quality"].as_u64().unwrap() >= 90);
        assert!(m["id"].is_string(), "optional fields pass through");
        got += 1;
    }
    assert_eq!(last["AAPL"], 500);
    assert_eq!(last["MSFT"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reject_code_over_ingest_and_post() {
    let server = TestServer::start().await;
    let now = now_ms();
    let cases = [
        (
            json!({"symbol": "A", "ts": now, "volume": 1}),
            "missing_field",
        ),
        (
            json!({"symbol": "BAD SYMBOL", "ts": now, "price": 1, "volume": 1}),
            "invalid_symbol",
        ),
        (
            json!({"symbol": "A", "ts": now, "price": -1, "volume": 1}),
            "invalid_price",
        ),
        (
            json!({"symbol": "A", "ts": now, "price": "1", "volume": 1}),
            "invalid_price",
        ),
        (
            json!({"symbol": "A", "ts": now, "price": 1, "volume": -1}),
            "invalid_volume",
        ),
        (
            json!({"symbol": "A", "ts": now, "price": 1, "volume": 1, "high": 1, "low": 2}),
            "invalid_ohlc",
        ),
        (
            json!({"symbol": "A", "ts": now, "price": 1, "volume": 1, "bid": 2, "ask": 1}),
            "crossed_quote",
        ),
        (
            json!({"symbol": "A", "ts": now + 3_600_000, "price": 1, "volume": 1}),
            "future_timestamp",
        ),
        (
            json!({"symbol": "A", "ts": now - 2 * 86_400_000, "price": 1, "volume": 1}),
            "stale_timestamp",
        ),
    ];
    let mut producer = server.producer().await;
    let frame: Vec<Value> = cases.iter().map(|(t, _)| t.clone()).collect();
    let ack = ingest(&mut producer, &frame).await;
    assert_eq!(ack["accepted"], 0);
    let expected: Vec<&str> = cases.iter().map(|(_, c)| *c).collect();
    assert_eq!(reject_codes(&ack), expected);
    for (i, r) in ack["rejected"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["index"], i);
        assert!(!r["message"].as_str().unwrap().is_empty());
    }
    // Not JSON at all: one bad_json; an overflowing price is invalid_price, not bad_json.
    producer.send_text("{not json").await;
    let ack = producer.recv().await;
    assert_eq!(ack["rejected"][0]["code"], "bad_json");
    producer
        .send_text(&format!(
            r#"{{"symbol":"A","ts":{now},"price":1e400,"volume":1}}"#
        ))
        .await;
    assert_eq!(
        producer.recv().await["rejected"][0]["code"],
        "invalid_price"
    );
    // The connection keeps working after bad input.
    let ack = ingest(&mut producer, &[tick("OK", 1.0, 1.0)]).await;
    assert_eq!(ack["accepted"], 1);

    // POST: NDJSON with a bad line; still 200 with the ack.
    let body = format!(
        "{}\nnope\n{}\n",
        tick("P", 1.0, 1.0),
        json!({"symbol": "P", "ts": now, "price": 0, "volume": 1})
    );
    let (status, _, ack) = server.post_ticks(body).await;
    assert_eq!(status, 200);
    assert_eq!(ack["type"], "ingest_ack");
    assert_eq!(ack["accepted"], 1);
    assert_eq!(
        ack["rejected"],
        json!([
            {"index": 1, "code": "bad_json", "message": ack["rejected"][0]["message"]},
            {"index": 2, "code": "invalid_price", "message": ack["rejected"][1]["message"]},
        ])
    );
    // All rejected is still 200.
    let (status, _, ack) = server.post_ticks("garbage").await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(0)));

    // Dead letters, newest first, with the raw input.
    let (status, dlq) = server.get_json("/api/dlq?limit=3").await;
    assert_eq!(status, 200);
    let entries = dlq["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[0]["code"], "bad_json");
    assert_eq!(entries[0]["raw"], "garbage");
    assert!(entries[0]["received_at"].as_i64().unwrap() >= now);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_dropped_and_counted() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["D"]})).await;
    let mut producer = server.producer().await;
    let mut with_id = tick("D", 10.0, 1.0);
    with_id["id"] = json!(77);
    let plain = tick("D", 11.0, 2.0);
    let ack = ingest(
        &mut producer,
        &[
            with_id.clone(),
            plain.clone(),
            with_id.clone(),
            plain.clone(),
        ],
    )
    .await;
    assert_eq!(
        (ack["accepted"].as_u64(), ack["duplicates"].as_u64()),
        (Some(2), Some(2))
    );
    // Same id with a different price is still a duplicate.
    with_id["price"] = json!(12.5);
    let ack = ingest(&mut producer, &[with_id]).await;
    assert_eq!(ack["duplicates"], 1);
    let a = client.recv().await;
    let b = client.recv().await;
    assert_eq!((a["seq"].as_u64(), b["seq"].as_u64()), (Some(1), Some(2)));
    assert_eq!(a["id"], 77);
    let stats = server
        .wait_stats("duplicate count", |s| s["ticks_duplicate"] == 3)
        .await;
    assert_eq!(stats["ticks_accepted"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_is_reported_and_refused_ticks_can_be_resent() {
    let mut config = test_config();
    config.queue.capacity = 4;
    let server = TestServer::start_with(config).await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["*"]})).await;
    let mut producer = server.producer().await;
    let ticks: Vec<Value> = (0..300)
        .map(|i| tick("BP", 1.0 + f64::from(i) * 0.001, 1.0))
        .collect();
    producer.send_json(&Value::Array(ticks.clone())).await;
    let ack = producer.recv().await;
    assert_eq!(ack["type"], "ingest_ack");
    let accepted = ack["accepted"].as_u64().unwrap();
    let err = producer.recv().await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "backpressure");
    assert!(err["retry_after_ms"].as_u64().unwrap() > 0);
    let refused = err["refused"].as_u64().unwrap();
    assert!(
        refused > 0,
        "a 300-tick frame into a 4-tick queue must be refused in part"
    );
    assert_eq!(accepted + refused, 300);
    // The connection was not read again until the queue had room: the pause ends (and is
    // counted) once the dispatcher drained it.
    server
        .wait_metric("tickfan_ingest_backpressure_pauses_total", |v| v >= 1.0)
        .await;
    // Resend exactly the refused ticks until all are in.
    let mut pending: Vec<Value> = err["refused_indices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| ticks[i.as_u64().unwrap() as usize].clone())
        .collect();
    let mut total = accepted;
    while !pending.is_empty() {
        producer.send_json(&Value::Array(pending.clone())).await;
        let ack = producer.recv().await;
        total += ack["accepted"].as_u64().unwrap();
        assert_eq!(ack["duplicates"], 0, "refused ticks were not remembered");
        let next: Vec<Value> = if ack["accepted"].as_u64().unwrap() as usize == pending.len() {
            Vec::new()
        } else {
            let err = producer.recv().await;
            err["refused_indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| pending[i.as_u64().unwrap() as usize].clone())
                .collect()
        };
        pending = next;
    }
    assert_eq!(total, 300);
    // Every accepted tick reaches the client once, in seq order 1..=300.
    for expect in 1..=300u64 {
        let m = client.recv().await;
        assert_eq!(m["seq"].as_u64(), Some(expect));
    }
    // HTTP: 503 + Retry-After with the same error body.
    let body: Vec<Value> = (0..300)
        .map(|i| tick("BQ", 1.0 + f64::from(i), 1.0))
        .collect();
    let (status, headers, err) = server.post_ticks(Value::Array(body).to_string()).await;
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert_eq!(err["code"], "backpressure");
    assert!(err["refused"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_post_body_is_413_and_the_server_keeps_working() {
    let mut config = test_config();
    config.limits.max_body_bytes = 4 * 1024;
    let server = TestServer::start_with(config).await;
    let big: Vec<Value> = (0..200)
        .map(|i| tick("BIG", 1.0 + f64::from(i), 1.0))
        .collect();
    let (status, _, err) = server.post_ticks(Value::Array(big).to_string()).await;
    assert_eq!(status, 413);
    assert_eq!(err["code"], "too_large");
    assert_eq!(
        server
            .metric("tickfan_limit_hits_total{limit=\"max_body_bytes\"}")
            .await,
        1.0
    );
    // NaN is not JSON; a "NaN" string is a wrong type; both are clear rejections.
    let now = now_ms();
    let body = format!("{{\"symbol\":\"N\",\"ts\":{now},\"price\":NaN,\"volume\":1}}\n{{\"symbol\":\"N\",\"ts\":{now},\"price\":\"NaN\",\"volume\":1}}\n{}", tick("N", 2.0, 1.0));
    let (status, _, ack) = server.post_ticks(body).await;
    assert_eq!(status, 200);
    assert_eq!(ack["accepted"], 1);
    assert_eq!(reject_codes(&ack), ["bad_json", "invalid_price"]);
}

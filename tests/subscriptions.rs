//! Client subscriptions end to end: symbol routing, wildcard, unsubscribe, filters, snapshots,
//! resume, the symbols op, and bad requests that must not close the connection.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_wildcard_and_unsubscribe() {
    let server = TestServer::start().await;
    let (mut named, _) = server.client().await;
    let (mut wild, _) = server.client().await;
    let ack = subscribe(&mut named, 1, json!({"symbols": ["AAA", "bad sym", "AAA"]})).await;
    assert_eq!(ack["symbols"], json!(["AAA"]));
    assert_eq!(
        ack["rejected"],
        json!([{"symbol": "bad sym", "code": "invalid_symbol"}])
    );
    assert_eq!(ack["last_seq"], json!({"AAA": 0}));
    subscribe(&mut wild, 1, json!({"symbols": ["*"]})).await;
    let mut producer = server.producer().await;
    ingest(
        &mut producer,
        &[
            tick("AAA", 1.0, 1.0),
            tick("BBB", 2.0, 1.0),
            tick("AAA", 3.0, 1.0),
        ],
    )
    .await;
    let mut wild_seen = Vec::new();
    for _ in 0..3 {
        let m = wild.recv().await;
        wild_seen.push((
            m["symbol"].as_str().unwrap().to_owned(),
            m["seq"].as_u64().unwrap(),
        ));
    }
    wild_seen.sort();
    assert_eq!(
        wild_seen,
        [("AAA".into(), 1), ("AAA".into(), 2), ("BBB".into(), 1)]
    );
    let a1 = named.recv().await;
    let a2 = named.recv().await;
    assert_eq!(
        (a1["symbol"].as_str(), a1["seq"].as_u64()),
        (Some("AAA"), Some(1))
    );
    assert_eq!(
        a2["seq"], 2,
        "BBB never reaches a client that only wants AAA"
    );

    // After the unsubscribe ack, nothing more for AAA; the ping reply proves the stream is live.
    let ack = named
        .request(json!({"op": "unsubscribe", "id": 2, "symbols": ["AAA"]}))
        .await;
    assert_eq!(ack["op"], "unsubscribe");
    ingest(&mut producer, &[tick("AAA", 4.0, 1.0)]).await;
    let m = wild.recv().await;
    assert_eq!(m["seq"], 3);
    let pong = named.request(json!({"op": "ping", "id": 3})).await;
    assert_eq!(
        pong["type"], "pong",
        "no AAA tick may arrive after the unsubscribe ack"
    );
    assert!(pong["server_time"].as_i64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_and_volume_filters_with_critical_exemption() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    subscribe(
        &mut client,
        1,
        json!({"symbols": ["F"], "min_volume": 10, "min_quality": 80}),
    )
    .await;
    let mut producer = server.producer().await;
    let mut critical_small = tick("F", 100.0, 1.0);
    critical_small["priority"] = json!("critical");
    // One frame each: the ack waits for dispatch, so seqs follow sending order (a critical tick
    // in a shared frame could overtake, by design). Plain (passes), small volume (filtered),
    // critical small volume (passes), 60% jump (quality 60, filtered), normal again (passes).
    for t in [
        tick("F", 100.0, 50.0),
        tick("F", 100.1, 1.0),
        critical_small,
        tick("F", 160.0, 50.0),
        tick("F", 160.1, 20.0),
    ] {
        ingest(&mut producer, &[t]).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = client.recv().await;
        got.push((m["seq"].as_u64().unwrap(), m.get("priority").cloned()));
    }
    assert_eq!(got[0].0, 1);
    assert_eq!(got[1], (3, Some(json!("critical"))));
    assert_eq!(got[2].0, 5, "seq 4 (quality 60) is below min_quality 80");
    // configure lowers the floors: now everything passes.
    let ack = client
        .request(json!({"op": "configure", "id": 2, "min_quality": 0, "min_volume": 0}))
        .await;
    assert_eq!(ack["op"], "configure");
    ingest(&mut producer, &[tick("F", 160.2, 0.5)]).await;
    assert_eq!(client.recv().await["seq"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_snapshot_then_live_and_resume_with_since_seq() {
    let server = TestServer::start().await;
    let mut producer = server.producer().await;
    let ticks: Vec<Value> = (0..30)
        .map(|i| tick("H", 10.0 + f64::from(i) * 0.01, 1.0))
        .collect();
    ingest(&mut producer, &ticks).await;
    let (mut client, _) = server.client().await;
    let ack = subscribe(&mut client, 1, json!({"symbols": ["H"], "history": 5})).await;
    assert_eq!(ack["last_seq"]["H"], 30);
    let snap = client.recv().await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["gap"], false);
    let seqs: Vec<u64> = snap["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [26, 27, 28, 29, 30]);
    ingest(&mut producer, &[tick("H", 11.0, 1.0)]).await;
    assert_eq!(
        client.recv().await["seq"],
        31,
        "live continues right after the snapshot"
    );
    client.close().await;

    // Resume: everything after 28, then live, no gap or duplicate.
    let (mut resumed, _) = server.client().await;
    subscribe(
        &mut resumed,
        1,
        json!({"symbols": ["H"], "since_seq": {"H": 28}}),
    )
    .await;
    let snap = resumed.recv().await;
    let seqs: Vec<u64> = snap["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [29, 30, 31]);
    ingest(&mut producer, &[tick("H", 11.1, 1.0)]).await;
    assert_eq!(resumed.recv().await["seq"], 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_joins_live_ticks_without_gap_while_ticks_flow() {
    let server = TestServer::start().await;
    let addr = server.ws_url("/ingest");
    // A producer streams continuously while the client subscribes with history.
    let stream = tokio::spawn(async move {
        let mut producer = Ws::connect(&addr).await;
        for batch in 0..200 {
            let ticks: Vec<Value> = (0..10)
                .map(|i| tick("FLOW", 1.0 + f64::from(batch * 10 + i) * 1e-4, 1.0))
                .collect();
            ingest(&mut producer, &ticks).await;
        }
    });
    server
        .wait_stats("some ticks", |s| {
            s["ticks_dispatched"].as_u64().unwrap_or(0) > 100
        })
        .await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["FLOW"], "history": 50})).await;
    let mut expected = None;
    while expected.is_none_or(|e| e <= 2000) {
        let m = client.recv().await;
        let seqs: Vec<u64> = match m["type"].as_str() {
            Some("snapshot") => m["ticks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["seq"].as_u64().unwrap())
                .collect(),
            Some("tick") => vec![m["seq"].as_u64().unwrap()],
            other => panic!("unexpected {other:?}"),
        };
        for s in seqs {
            if let Some(e) = expected {
                assert_eq!(s, e, "gap or duplicate at the snapshot/live seam");
            }
            expected = Some(s + 1);
        }
    }
    stream.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_op_and_api() {
    let server = TestServer::start().await;
    let mut producer = server.producer().await;
    ingest(
        &mut producer,
        &[
            tick("S1", 5.0, 1.0),
            tick("S2", 6.0, 1.0),
            tick("S1", 5.5, 1.0),
        ],
    )
    .await;
    let (mut client, _) = server.client().await;
    let reply = client.request(json!({"op": "symbols", "id": 4})).await;
    assert_eq!(reply["type"], "symbols");
    let list = reply["symbols"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        (
            list[0]["symbol"].as_str(),
            list[0]["seq"].as_u64(),
            list[0]["price"].as_f64()
        ),
        (Some("S1"), Some(2), Some(5.5))
    );
    assert!(list[0]["ts"].as_i64().unwrap() > 0);
    let (status, api) = server.get_json("/api/symbols").await;
    assert_eq!(status, 200);
    assert_eq!(api["symbols"], reply["symbols"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_keep_the_connection() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    for (text, id) in [
        (r#"{"op":"launch","id":10}"#, Some(10)),
        (r#"{"op":"subscribe","id":11}"#, Some(11)),
        (r#"{"op":"subscribe","id":12,"symbols":[1,2]}"#, Some(12)),
        (r#"{"op":"configure","id":13,"mode":"warp"}"#, Some(13)),
        (
            r#"{"op":"subscribe","id":14,"symbols":["A"],"history":-1}"#,
            Some(14),
        ),
        ("not json at all", None),
        ("[]", None),
    ] {
        client.send_text(text).await;
        let err = client.recv().await;
        assert_eq!(err["type"], "error", "{text}");
        assert_eq!(err["code"], "bad_request", "{text}");
        assert!(!err["message"].as_str().unwrap().is_empty());
        if let Some(id) = id {
            assert_eq!(err["id"], id);
        }
    }
    client
        .inner
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![1u8, 2, 3].into(),
        ))
        .await
        .unwrap();
    let err = client.recv().await;
    assert_eq!(err["code"], "bad_request");
    let pong = client.request(json!({"op": "ping", "id": 99})).await;
    assert_eq!(pong["type"], "pong");
}

use futures_util::SinkExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_plus_wildcard_delivers_once_and_unsubscribing_star_keeps_named() {
    let server = TestServer::start().await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["W1"]})).await;
    subscribe(&mut client, 2, json!({"symbols": ["*", "W1"]})).await;
    let mut producer = server.producer().await;
    ingest(&mut producer, &[tick("W1", 1.0, 1.0), tick("W2", 1.0, 1.0)]).await;
    let mut got: Vec<(String, u64)> = Vec::new();
    for _ in 0..2 {
        let m = client.recv().await;
        got.push((
            m["symbol"].as_str().unwrap().to_owned(),
            m["seq"].as_u64().unwrap(),
        ));
    }
    got.sort();
    assert_eq!(
        got,
        [("W1".to_owned(), 1), ("W2".to_owned(), 1)],
        "each tick exactly once"
    );
    let ack = client
        .request(json!({"op": "unsubscribe", "id": 3, "symbols": ["*"]}))
        .await;
    assert_eq!(ack["op"], "unsubscribe");
    ingest(&mut producer, &[tick("W2", 2.0, 1.0), tick("W1", 2.0, 1.0)]).await;
    let m = client.recv().await;
    assert_eq!(
        (m["symbol"].as_str(), m["seq"].as_u64()),
        (Some("W1"), Some(2)),
        "W1 stays subscribed by name; W2 no longer comes"
    );
    let pong = client.request(json!({"op": "ping", "id": 4})).await;
    assert_eq!(pong["type"], "pong");
}

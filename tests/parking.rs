//! Parked connections (`server.park_after_ms`): a quiet `/ws` connection leaves the runtime and
//! must behave exactly as before for its client: every tick arrives in order, requests are
//! answered, heartbeats keep coming (without resuming it), its pongs keep it alive, and it
//! closes cleanly on shutdown or when the client goes away. Real server, real sockets.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn parking_config() -> tickfan::Config {
    let mut config = test_config();
    config.server.park_after_ms = 100;
    config
}

async fn parking(server: &TestServer) -> Value {
    server.get_json("/api/stats").await.1["parking"].clone()
}

/// Waits until `n` connections are parked and returns the parking stats then.
async fn wait_parked(server: &TestServer, n: u64) -> Value {
    server
        .wait_stats("connections to park", |s| s["parking"]["parked"] == n)
        .await["parking"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_gets_every_tick_and_answer_and_parks_again() {
    let server = TestServer::start_with(parking_config()).await;
    let (mut ws, _) = server.client().await;
    subscribe(&mut ws, 1, json!({"symbols": ["PARK"]})).await;
    let first = wait_parked(&server, 1).await;
    assert_eq!(first["unparks"], 0);
    // The sweep asked it to (the counter the TLS test expects to stay at 0 moves here).
    assert!(server.metric("tickfan_park_requests_total").await >= 1.0);

    // A tick resumes it; the tick arrives.
    let (status, _, _) = server
        .post_ticks(json!([tick("PARK", 10.0, 1.0)]).to_string())
        .await;
    assert_eq!(status, 200);
    let m = ws.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("tick"), Some(1))
    );
    assert!(parking(&server).await["unparks"].as_u64() >= Some(1));

    // Quiet again: parked again. A burst while parked arrives whole and in order.
    let before = wait_parked(&server, 1).await;
    let burst: Vec<Value> = (0..200)
        .map(|i| tick("PARK", 11.0 + f64::from(i) * 0.01, 1.0))
        .collect();
    let (status, _, ack) = server.post_ticks(Value::from(burst).to_string()).await;
    assert_eq!((status, &ack["accepted"]), (200, &json!(200)));
    for seq in 2..=201 {
        assert_eq!(ws.recv().await["seq"].as_u64(), Some(seq));
    }

    // A request to a parked connection is answered, and so is a subscribe.
    let parked = wait_parked(&server, 1).await;
    assert!(parked["parks"].as_u64() > before["parks"].as_u64());
    let pong = ws.request(json!({"op": "ping", "id": 7})).await;
    assert_eq!(pong["type"], "pong");
    wait_parked(&server, 1).await;
    let ack = subscribe(&mut ws, 8, json!({"symbols": ["PARK2"]})).await;
    assert_eq!(ack["type"], "ack");
    wait_parked(&server, 1).await;
    server
        .post_ticks(json!([tick("PARK2", 5.0, 1.0)]).to_string())
        .await;
    let m = ws.recv().await;
    assert_eq!(
        (m["symbol"].as_str(), m["seq"].as_u64()),
        (Some("PARK2"), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_reach_a_parked_connection_and_its_pongs_keep_it_alive() {
    let mut config = parking_config();
    // Longer than a sweep plus the park delay, so the connection parks between beats; and a
    // client silent for 3 beats (4.5 s) would be closed.
    config.server.heartbeat_ms = 1_500;
    let server = TestServer::start_with(config).await;
    let (mut ws, _) = server.client().await;
    subscribe(&mut ws, 1, json!({"symbols": ["HB"]})).await;
    let parked = wait_parked(&server, 1).await;

    // Four beats written to the parked socket take longer than the 3-beat silence limit.
    // tungstenite answers each ping with a pong as it reads; the parking lot must take those
    // as life without resuming anything. (Beats sent before parking may still be unread.)
    let start = parked["heartbeats"].as_u64().unwrap();
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match ws.next_by(deadline).await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "heartbeat", "only heartbeats expected: {v}");
            }
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
        if parking(&server).await["heartbeats"].as_u64().unwrap() >= start + 4 {
            break;
        }
    }
    assert!(pings >= 4, "each heartbeat comes with a ping ({pings})");
    let now = parking(&server).await;
    assert_eq!(now["parked"], 1);
    assert_eq!(
        now["unparks"], parked["unparks"],
        "heartbeats and pongs never resumed it"
    );
    // The pongs were read where it waits (the last one goes out with the client's next read).
    let pongs = parked["pongs"].as_u64().unwrap();
    server
        .wait_stats("pongs read while parked", |s| {
            s["parking"]["pongs"].as_u64() >= Some(pongs + 3)
        })
        .await;
    let (_, stats) = server.get_json("/api/stats").await;
    assert_eq!(stats["connections"], 1);
    // Still a working connection.
    let pong = ws.request(json!({"op": "ping", "id": 2})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_connections_close_cleanly_on_shutdown_and_when_the_client_goes() {
    let mut server = TestServer::start_with(parking_config()).await;
    let (mut stays, _) = server.client().await;
    subscribe(&mut stays, 1, json!({"symbols": ["A"]})).await;
    let (leaves, _) = server.client().await;
    let (mut says_bye, _) = server.client().await;
    wait_parked(&server, 3).await;

    // The client's TCP connection just goes: the parked connection is forgotten.
    drop(leaves);
    server
        .wait_stats("the vanished client to be forgotten", |s| {
            s["connections"] == 2 && s["parking"]["parked"] == 2
        })
        .await;
    // A close frame to a parked connection is answered with the same code.
    says_bye
        .inner
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: 4100.into(),
            reason: "done".into(),
        }))
        .await
        .unwrap();
    assert_eq!(says_bye.until_closed().await.1, Ended::Close(4100));
    server
        .wait_stats("the closed client to be forgotten", |s| {
            s["connections"] == 1 && s["parking"]["parked"] == 1
        })
        .await;

    // Shutdown reaches the parked one: 1001, then the server stops.
    let closing = tokio::spawn(async move { stays.until_closed().await });
    tokio::time::timeout(DEADLINE, server.shutdown())
        .await
        .expect("shutdown with a parked connection must finish");
    let (_, ended) = closing.await.unwrap();
    assert_eq!(ended, Ended::Close(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_can_be_turned_off() {
    let mut config = parking_config();
    config.server.park_after_ms = 0;
    let server = TestServer::start_with(config).await;
    let (mut ws, _) = server.client().await;
    subscribe(&mut ws, 1, json!({"symbols": ["X"]})).await;
    // Three sweeps (one a second) with nothing to do: long enough to have parked.
    let before = server.metric("tickfan_connection_parks_total").await;
    let sweeps = tokio::time::Instant::now() + Duration::from_millis(3_500);
    while tokio::time::Instant::now() < sweeps {
        assert_eq!(parking(&server).await["parked"], 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        server.metric("tickfan_connection_parks_total").await,
        before
    );
    assert_eq!(
        ws.request(json!({"op": "ping", "id": 2})).await["type"],
        "pong"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_reach_every_one_of_many_parked_connections() {
    // The sweep hands parked connections' heartbeats to a blocking thread as one list; every
    // one of them must still get its ping and heartbeat, without being resumed.
    const N: u64 = 60;
    let mut config = parking_config();
    config.server.heartbeat_ms = 1_500;
    let server = TestServer::start_with(config).await;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(server.client().await.0);
    }
    let parked = wait_parked(&server, N).await;
    let start = parked["heartbeats"].as_u64().unwrap();
    server
        .wait_stats("a heartbeat written to every parked connection", |s| {
            s["parking"]["heartbeats"].as_u64() >= Some(start + N)
        })
        .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for ws in &mut clients {
        let (mut ping, mut beat) = (false, false);
        while !(ping && beat) {
            match ws.next_by(deadline).await {
                Message::Ping(_) => ping = true,
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    assert_eq!(v["type"], "heartbeat", "only heartbeats expected: {v}");
                    beat = true;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let now = parking(&server).await;
    assert_eq!(
        now["unparks"], parked["unparks"],
        "heartbeats resumed nothing"
    );
}

//! Authentication and limits end to end: client and producer tokens on every path, request rate
//! limits and abuse closes, symbol and message-size caps, binary frames, connection caps per IP
//! and in all, allowed origins, heartbeats and reaping of silent peers, and the labelled
//! `tickfan_limit_hits_total` counters each of those limits increments.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket upgrade request for `path` with extra headers.
fn upgrade(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> Request {
    let mut req = server.ws_url(path).into_client_request().unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    req
}

/// Connects; `Err(status)` when the server answers the upgrade with an HTTP error.
async fn try_connect(req: Request) -> Result<Ws, u16> {
    use tokio_tungstenite::tungstenite::Error;
    match tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
    {
        Ok((inner, _)) => Ok(Ws { inner }),
        Err(Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect failed without an HTTP answer: {e}"),
    }
}

/// Connects to `/ws` with `req` and reads the welcome.
async fn client_with(req: Request) -> Ws {
    let mut ws = try_connect(req).await.expect("upgrade refused");
    let welcome = ws.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

/// Retries `/ws` upgrades until one is accepted (a freed slot), within the deadline.
async fn connect_when_free(req: impl Fn() -> Request) -> Ws {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match try_connect(req()).await {
            Ok(mut ws) => {
                assert_eq!(ws.recv().await["type"], "welcome");
                return ws;
            }
            Err(status) => assert!(
                Instant::now() < deadline,
                "slot never freed (last status {status})"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the connection ends, within one overall deadline (the harness's `until_closed`
/// waits up to `DEADLINE` per message, so periodic heartbeats would keep it waiting forever).
async fn closed(ws: &mut Ws) -> (Vec<Value>, Ended) {
    tokio::time::timeout(DEADLINE, ws.until_closed())
        .await
        .expect("timed out waiting for the connection to end")
}

/// `tickfan_limit_hits_total{limit="..."}`.
async fn limit_hits(server: &TestServer, limit: &str) -> f64 {
    server
        .metric(&format!("tickfan_limit_hits_total{{limit=\"{limit}\"}}"))
        .await
}

/// Polls until the limit counter reaches `want`.
async fn wait_limit_hits(server: &TestServer, limit: &str, want: f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = limit_hits(server, limit).await;
        if got >= want {
            assert_eq!(got, want, "{limit} counted more than expected");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "limit_hits {limit} stayed at {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn with_client_tokens() -> tickfan::Config {
    let mut config = test_config();
    config.auth.client_tokens = vec!["secret".into()];
    config
}

// ---------------------------------------------------------------------------------------------
// client tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_token_in_query_or_bearer_header_is_accepted() {
    let server = TestServer::start_with(with_client_tokens()).await;
    let mut producer = server.producer().await;
    let mut by_query = client_with(upgrade(&server, "/ws?token=secret", &[])).await;
    let mut by_header = client_with(upgrade(
        &server,
        "/ws",
        &[("authorization", "Bearer secret")],
    ))
    .await;
    for ws in [&mut by_query, &mut by_header] {
        let ack = subscribe(ws, 1, json!({"symbols": ["AU"]})).await;
        assert_eq!(ack["symbols"], json!(["AU"]));
    }
    ingest(&mut producer, &[tick("AU", 1.0, 1.0)]).await;
    for ws in [&mut by_query, &mut by_header] {
        let m = ws.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["seq"].as_u64()),
            (Some("tick"), Some(1))
        );
    }
    assert_eq!(limit_hits(&server, "unauthorized").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_token_gets_unauthorized_and_4001_at_once() {
    let server = TestServer::start_with(with_client_tokens()).await;
    for req in [
        upgrade(&server, "/ws?token=nope", &[]),
        upgrade(&server, "/ws", &[("authorization", "Bearer nope")]),
    ] {
        let started = Instant::now();
        let mut ws = client_with(req).await;
        let (seen, ended) = closed(&mut ws).await;
        assert_eq!(ended, Ended::Close(4001));
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            (seen[0]["type"].as_str(), seen[0]["code"].as_str()),
            (Some("error"), Some("unauthorized"))
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a wrong token closes at once, not after the auth timeout"
        );
    }
    wait_limit_hits(&server, "unauthorized", 2.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_token_requests_are_refused_until_the_auth_op() {
    let server = TestServer::start_with(with_client_tokens()).await;
    let mut ws = client_with(upgrade(&server, "/ws", &[])).await;
    // Requests are answered `unauthorized` (echoing the id) and the connection stays open.
    let err = ws
        .request(json!({"op": "subscribe", "id": 1, "symbols": ["LA"]}))
        .await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("unauthorized"))
    );
    let err = ws.request(json!({"op": "symbols", "id": 2})).await;
    assert_eq!(err["code"], "unauthorized");
    let err = ws
        .request(json!({"op": "configure", "id": 3, "mode": "batch"}))
        .await;
    assert_eq!(err["code"], "unauthorized");
    // Nothing was subscribed by the refused request.
    let mut producer = server.producer().await;
    ingest(&mut producer, &[tick("LA", 1.0, 1.0)]).await;
    let pong = ws.request(json!({"op": "ping", "id": 4})).await;
    assert_eq!(pong["type"], "pong");
    // The auth op unlocks it.
    let ack = ws
        .request(json!({"op": "auth", "id": 5, "token": "secret"}))
        .await;
    assert_eq!(
        (ack["type"].as_str(), ack["op"].as_str()),
        (Some("ack"), Some("auth"))
    );
    let ack = subscribe(&mut ws, 6, json!({"symbols": ["LA"]})).await;
    assert_eq!(ack["last_seq"], json!({"LA": 1}));
    ingest(&mut producer, &[tick("LA", 2.0, 1.0)]).await;
    let m = ws.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["seq"].as_u64()),
        (Some("tick"), Some(2))
    );
    // A second auth is harmless.
    let ack = ws
        .request(json!({"op": "auth", "id": 7, "token": "secret"}))
        .await;
    assert_eq!(ack["op"], "auth");
    assert_eq!(limit_hits(&server, "unauthorized").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_op_with_wrong_token_closes_4001() {
    let server = TestServer::start_with(with_client_tokens()).await;
    let mut ws = client_with(upgrade(&server, "/ws", &[])).await;
    ws.send_json(&json!({"op": "auth", "id": 1, "token": "guess"}))
        .await;
    let (seen, ended) = closed(&mut ws).await;
    assert_eq!(ended, Ended::Close(4001));
    let err = seen.last().expect("an error before the close");
    assert_eq!(
        (err["code"].as_str(), err["id"].as_u64()),
        (Some("unauthorized"), Some(1))
    );
    wait_limit_hits(&server, "unauthorized", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_token_or_auth_op_the_connection_closes_4001_after_the_auth_timeout() {
    let mut config = with_client_tokens();
    config.auth.auth_timeout_ms = 500;
    let server = TestServer::start_with(config).await;
    let started = Instant::now();
    let mut silent = client_with(upgrade(&server, "/ws", &[])).await;
    // A client that authenticates in time has its deadline lifted.
    let mut late = client_with(upgrade(&server, "/ws", &[])).await;
    let ack = late
        .request(json!({"op": "auth", "id": 1, "token": "secret"}))
        .await;
    assert_eq!(ack["op"], "auth");
    let (seen, ended) = closed(&mut silent).await;
    assert_eq!(ended, Ended::Close(4001));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the deadline"
    );
    let err = seen.last().expect("an error before the close");
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("unauthorized"))
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("auth.auth_timeout_ms"),
        "{err}"
    );
    wait_limit_hits(&server, "unauthorized", 1.0).await;
    // Well past the deadline, the authenticated one still works.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pong = late.request(json!({"op": "ping", "id": 2})).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(limit_hits(&server, "unauthorized").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_apis_need_the_client_token() {
    let server = TestServer::start_with(with_client_tokens()).await;
    let http = reqwest::Client::new();
    for path in ["/api/dlq", "/api/symbols", "/api/stats"] {
        let resp = http.get(server.http(path)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path} without a token");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
        let resp = http
            .get(server.http(&format!("{path}?token=wrong")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{path} with a wrong token");
        let resp = http
            .get(server.http(&format!("{path}?token=secret")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}?token=");
        let resp = http
            .get(server.http(path))
            .bearer_auth("secret")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path} with Bearer");
    }
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(server.get_json("/health").await.0, 200);
    let resp = reqwest::get(server.http("/metrics")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// `Authorization` values that carry the token `t`: the scheme in any case (RFC 9110 11.1),
/// with extra spaces around the token.
fn bearer_spellings(t: &str) -> Vec<String> {
    vec![
        format!("bearer {t}"),
        format!("BEARER {t}"),
        format!("BeArEr   {t}"),
        format!("  Bearer\t{t}  "),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_tolerates_extra_spaces() {
    let mut config = with_client_tokens();
    config.auth.ingest_tokens = vec!["p".into()];
    let server = TestServer::start_with(config).await;
    let http = reqwest::Client::new();
    for value in bearer_spellings("secret") {
        let resp = http
            .get(server.http("/api/symbols"))
            .header("authorization", &value)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "GET with {value:?}");
        let mut ws = client_with(upgrade(&server, "/ws", &[("authorization", &value)])).await;
        let ack = subscribe(&mut ws, 1, json!({"symbols": ["BE"]})).await;
        assert_eq!(ack["symbols"], json!(["BE"]), "/ws with {value:?}");
    }
    for (i, value) in bearer_spellings("p").into_iter().enumerate() {
        let mut t = tick("BE", 1.0, 1.0);
        t["id"] = json!(i);
        let resp = http
            .post(server.http("/api/ticks"))
            .header("authorization", &value)
            .body(t.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "POST with {value:?}");
        let mut producer = try_connect(upgrade(&server, "/ingest", &[("authorization", &value)]))
            .await
            .unwrap_or_else(|s| panic!("/ingest with {value:?}: {s}"));
        t["id"] = json!(100 + i);
        assert_eq!(ingest(&mut producer, &[t]).await["accepted"], 1);
        producer.close().await;
    }
    // Another scheme, or the scheme without a token, is still no token.
    for value in ["Basic secret", "bearersecret", "Bearer", "Bearer "] {
        let resp = http
            .get(server.http("/api/symbols"))
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "GET with {value:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// ingest tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_need_the_ingest_token_on_post_and_ingest() {
    let mut config = test_config();
    config.auth.ingest_tokens = vec!["p".into()];
    let server = TestServer::start_with(config).await;
    let http = reqwest::Client::new();
    let seq = std::sync::atomic::AtomicU64::new(0);
    // Each tick unique (its own trade id), so none is dropped as a duplicate.
    let unique = || {
        let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut t = tick("IT", 1.0, 1.0);
        t["id"] = json!(n);
        t
    };
    let post = |url: String| http.post(url).body(unique().to_string());

    let resp = post(server.http("/api/ticks")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.json::<Value>().await.unwrap()["code"], "unauthorized");
    let resp = post(server.http("/api/ticks"))
        .bearer_auth("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401, "wrong token");
    let resp = post(server.http("/api/ticks"))
        .bearer_auth("p")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["accepted"], 1);
    let resp = post(server.http("/api/ticks?token=p"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["accepted"], 1);

    // /ingest: the upgrade itself is refused with 401.
    assert_eq!(
        try_connect(upgrade(&server, "/ingest", &[])).await.err(),
        Some(401)
    );
    assert_eq!(
        try_connect(upgrade(&server, "/ingest?token=nope", &[]))
            .await
            .err(),
        Some(401)
    );
    for req in [
        upgrade(&server, "/ingest?token=p", &[]),
        upgrade(&server, "/ingest", &[("authorization", "Bearer p")]),
    ] {
        let mut producer = try_connect(req).await.expect("ingest with token");
        let ack = ingest(&mut producer, &[unique()]).await;
        assert_eq!(ack["accepted"], 1);
        producer.close().await;
    }
    // Clients need no token here (client_tokens is empty).
    let (mut client, _) = server.client().await;
    let ack = subscribe(&mut client, 1, json!({"symbols": ["IT"]})).await;
    assert_eq!(ack["last_seq"], json!({"IT": 4}));
}

// ---------------------------------------------------------------------------------------------
// request rate

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bursts_are_rate_limited_and_pings_are_free() {
    let mut config = test_config();
    config.limits.ops_per_sec = 5;
    let server = TestServer::start_with(config).await;
    let (mut ws, welcome) = server.client().await;
    assert_eq!(welcome["limits"]["ops_per_sec"], 5);
    const BURST: u64 = 30;
    for id in 0..BURST {
        ws.inner
            .feed(Message::Text(
                json!({"op": "symbols", "id": id}).to_string().into(),
            ))
            .await
            .unwrap();
    }
    ws.inner.flush().await.unwrap();
    let mut replies = vec![Value::Null; BURST as usize];
    for _ in 0..BURST {
        let m = ws.recv().await;
        let id = m["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("reply echoes the id: {m}"));
        assert!(replies[id as usize].is_null(), "one reply per request");
        replies[id as usize] = m;
    }
    let mut limited = 0;
    for m in &replies {
        match m["type"].as_str() {
            Some("symbols") => {}
            Some("error") => {
                assert_eq!(m["code"], "rate_limited", "{m}");
                assert!(m["retry_after_ms"].as_u64().unwrap() > 0, "{m}");
                limited += 1;
            }
            _ => panic!("unexpected reply {m}"),
        }
    }
    assert!(
        limited >= 1,
        "30 requests at once exceed 5/s with a burst of 10"
    );
    assert!(
        BURST - limited >= 10,
        "a burst of 2x ops_per_sec passes ({limited} limited)"
    );
    // The first requests of a burst pass.
    assert!(replies[..10].iter().all(|m| m["type"] == "symbols"));

    // Pings count as 0: 100 of them right after the burst all get pongs.
    for id in 1000..1100u64 {
        ws.inner
            .feed(Message::Text(
                json!({"op": "ping", "id": id}).to_string().into(),
            ))
            .await
            .unwrap();
    }
    ws.inner.flush().await.unwrap();
    for id in 1000..1100u64 {
        let m = ws.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["id"].as_u64()),
            (Some("pong"), Some(id)),
            "{m}"
        );
    }
    assert_eq!(
        limit_hits(&server, "ops_per_sec").await,
        f64::from(limited as u32)
    );
    assert_eq!(limit_hits(&server, "abuse_close").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_request_abuse_closes_1008() {
    let mut config = test_config();
    config.limits.ops_per_sec = 1;
    config.limits.max_rate_limited = 5;
    let server = TestServer::start_with(config).await;
    let (mut ws, _) = server.client().await;
    for id in 0..40u64 {
        ws.inner
            .feed(Message::Text(
                json!({"op": "symbols", "id": id}).to_string().into(),
            ))
            .await
            .unwrap();
    }
    ws.inner.flush().await.unwrap();
    let (seen, ended) = closed(&mut ws).await;
    assert_eq!(ended, Ended::Close(1008));
    let limited = seen.iter().filter(|m| m["code"] == "rate_limited").count();
    assert!(
        (5..40).contains(&limited),
        "up to max_rate_limited requests are answered before the close: {limited}"
    );
    wait_limit_hits(&server, "abuse_close", 1.0).await;
    assert!(limit_hits(&server, "ops_per_sec").await >= 6.0);
    // Others are unaffected.
    let (mut other, _) = server.client().await;
    assert_eq!(
        other.request(json!({"op": "ping", "id": 1})).await["type"],
        "pong"
    );
}

// ---------------------------------------------------------------------------------------------
// symbols and message size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_symbols_and_invalid_symbols() {
    let mut config = test_config();
    config.limits.max_symbols = 3;
    let server = TestServer::start_with(config).await;
    let (mut ws, welcome) = server.client().await;
    assert_eq!(welcome["limits"]["max_symbols"], 3);
    let err = ws
        .request(json!({"op": "subscribe", "id": 1, "symbols": ["A", "B", "C", "D"]}))
        .await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("too_many_symbols"))
    );
    assert!(!err["message"].as_str().unwrap().is_empty());
    // Invalid names are reported per symbol and do not count.
    let ack = subscribe(
        &mut ws,
        2,
        json!({"symbols": ["A", "bad sym", "B", "C", "x".repeat(40)]}),
    )
    .await;
    assert_eq!(ack["symbols"], json!(["A", "B", "C"]));
    assert_eq!(
        ack["rejected"],
        json!([
            {"symbol": "bad sym", "code": "invalid_symbol"},
            {"symbol": "x".repeat(40), "code": "invalid_symbol"},
        ])
    );
    let err = ws
        .request(json!({"op": "subscribe", "id": 3, "symbols": ["D"]}))
        .await;
    assert_eq!(err["code"], "too_many_symbols");
    let err = ws
        .request(json!({"op": "subscribe", "id": 4, "symbols": ["*"]}))
        .await;
    assert_eq!(
        err["code"], "too_many_symbols",
        "the wildcard counts as one"
    );
    // Re-subscribing held symbols is fine; the refused subscribe changed nothing.
    subscribe(&mut ws, 5, json!({"symbols": ["A"]})).await;
    let mut producer = server.producer().await;
    ingest(&mut producer, &[tick("D", 1.0, 1.0), tick("A", 1.0, 1.0)]).await;
    let m = ws.recv().await;
    assert_eq!(
        (m["symbol"].as_str(), m["seq"].as_u64()),
        (Some("A"), Some(1))
    );
    // Dropping one makes room.
    ws.request(json!({"op": "unsubscribe", "id": 6, "symbols": ["C"]}))
        .await;
    let ack = subscribe(&mut ws, 7, json!({"symbols": ["D"]})).await;
    assert_eq!(ack["last_seq"], json!({"D": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_1009_on_ws_and_ingest() {
    let mut config = test_config();
    config.limits.max_message_bytes = 1024;
    let server = TestServer::start_with(config).await;
    let (mut ws, _) = server.client().await;
    // Just under the cap is fine.
    let small = json!({"op": "ping", "id": 1, "pad": "x".repeat(900)});
    assert_eq!(ws.request(small).await["type"], "pong");
    ws.send_json(&json!({"op": "ping", "id": 2, "pad": "x".repeat(2048)}))
        .await;
    let (_, ended) = closed(&mut ws).await;
    assert_eq!(ended, Ended::Close(1009));
    wait_limit_hits(&server, "max_message_bytes", 1.0).await;

    let mut producer = server.producer().await;
    let ack = ingest(&mut producer, &[tick("MB", 1.0, 1.0)]).await;
    assert_eq!(ack["accepted"], 1);
    let big: Vec<Value> = (0..60)
        .map(|i| tick("MB", 2.0 + f64::from(i), 1.0))
        .collect();
    assert!(Value::Array(big.clone()).to_string().len() > 2048);
    producer.send_json(&Value::Array(big)).await;
    let (seen, ended) = closed(&mut producer).await;
    assert_eq!(ended, Ended::Close(1009));
    assert!(
        seen.is_empty(),
        "nothing of the oversized frame was ingested: {seen:?}"
    );
    // The oversized frame was not ingested.
    let (mut client, _) = server.client().await;
    let ack = subscribe(&mut client, 1, json!({"symbols": ["MB"]})).await;
    assert_eq!(ack["last_seq"], json!({"MB": 1}));
}

/// "Every limit hit increments its labelled counter": an oversized `/ingest` frame closes with
/// 1009 and is counted in `tickfan_limit_hits_total{limit="max_message_bytes"}`, like one on
/// `/ws`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_ingest_frame_is_counted() {
    let mut config = test_config();
    config.limits.max_message_bytes = 1024;
    let server = TestServer::start_with(config).await;
    let mut producer = server.producer().await;
    producer.send_text(&"x".repeat(4096)).await;
    let (_, ended) = closed(&mut producer).await;
    assert_eq!(ended, Ended::Close(1009));
    wait_limit_hits(&server, "max_message_bytes", 1.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_get_bad_request_and_the_connection_keeps_working() {
    let server = TestServer::start().await;
    let (mut ws, _) = server.client().await;
    let before = server.metric("tickfan_bad_requests_total").await;
    ws.inner
        .send(Message::Binary(br#"{"op":"ping","id":1}"#.to_vec().into()))
        .await
        .unwrap();
    let err = ws.recv().await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    let pong = ws.request(json!({"op": "ping", "id": 2})).await;
    assert_eq!(pong["type"], "pong");
    let ack = subscribe(&mut ws, 3, json!({"symbols": ["BIN"]})).await;
    assert_eq!(ack["op"], "subscribe");
    assert_eq!(
        server.metric("tickfan_bad_requests_total").await,
        before + 1.0
    );
}

// ---------------------------------------------------------------------------------------------
// replies to requests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_floods_requests_without_reading_gets_4008_and_is_counted() {
    let mut config = test_config();
    config.limits.outbound_buffer_bytes = 4096;
    let server = TestServer::start_with(config).await;
    // A small receive buffer, so the server's socket fills after a few replies and the rest
    // queue in the connection's outbound link.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (inner, _) = tokio_tungstenite::client_async(
        server.ws_url("/ws"),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    let mut ws = Ws { inner };
    assert_eq!(ws.recv().await["type"], "welcome");
    // Pings are free of the rate limit; each pong echoes its 200-byte id. Keep sending, never
    // reading, until the server stops taking them (it closed) or the deadline passes.
    let pad = "x".repeat(200);
    let deadline = Instant::now() + DEADLINE;
    let mut sent = 0u64;
    loop {
        let ping = json!({"op": "ping", "id": format!("{sent}{pad}")}).to_string();
        let fed = tokio::time::timeout(
            Duration::from_millis(200),
            ws.inner.send(Message::Text(ping.into())),
        )
        .await;
        if !matches!(fed, Ok(Ok(()))) {
            break;
        }
        sent += 1;
        if sent.is_multiple_of(64) && limit_hits(&server, "slow_consumer").await >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never cut off after {sent} pings"
        );
    }
    wait_limit_hits(&server, "slow_consumer", 1.0).await;
    let (seen, ended) = closed(&mut ws).await;
    assert_eq!(ended, Ended::Close(4008), "after {} messages", seen.len());
    assert_eq!(
        seen.last().map(|m| m["code"].clone()),
        Some(json!("slow_consumer"))
    );
    // Counted once: the dispatcher does not count this close again.
    assert_eq!(limit_hits(&server, "slow_consumer").await, 1.0);
}

// ---------------------------------------------------------------------------------------------
// connection caps and origin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_cap_answers_429_until_a_slot_frees() {
    let mut config = test_config();
    config.limits.max_connections_per_ip = 2;
    let server = TestServer::start_with(config).await;
    let (first, _) = server.client().await;
    let (mut second, _) = server.client().await;
    assert_eq!(
        try_connect(upgrade(&server, "/ws", &[])).await.err(),
        Some(429)
    );
    // Producers count towards the same cap.
    assert_eq!(
        try_connect(upgrade(&server, "/ingest", &[])).await.err(),
        Some(429)
    );
    assert_eq!(limit_hits(&server, "max_connections_per_ip").await, 2.0);
    // Plain HTTP is not a connection slot.
    assert_eq!(server.get_json("/health").await.0, 200);
    first.close().await;
    let mut third = connect_when_free(|| upgrade(&server, "/ws", &[])).await;
    for ws in [&mut second, &mut third] {
        assert_eq!(
            ws.request(json!({"op": "ping", "id": 1})).await["type"],
            "pong"
        );
    }
    assert_eq!(
        try_connect(upgrade(&server, "/ws", &[])).await.err(),
        Some(429)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_connection_cap_answers_503_until_a_slot_frees() {
    let mut config = test_config();
    config.limits.max_connections = 2;
    let server = TestServer::start_with(config).await;
    let (first, _) = server.client().await;
    let mut producer = server.producer().await;
    assert_eq!(
        try_connect(upgrade(&server, "/ws", &[])).await.err(),
        Some(503)
    );
    assert_eq!(
        try_connect(upgrade(&server, "/ingest", &[])).await.err(),
        Some(503)
    );
    assert_eq!(limit_hits(&server, "max_connections").await, 2.0);
    assert_eq!(limit_hits(&server, "max_connections_per_ip").await, 0.0);
    first.close().await;
    let mut second = connect_when_free(|| upgrade(&server, "/ws", &[])).await;
    subscribe(&mut second, 1, json!({"symbols": ["GC"]})).await;
    ingest(&mut producer, &[tick("GC", 1.0, 1.0)]).await;
    assert_eq!(second.recv().await["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_origins_are_enforced_for_browsers_only() {
    let mut config = test_config();
    config.server.allowed_origins = vec!["http://good.example".into()];
    let server = TestServer::start_with(config).await;
    assert_eq!(
        try_connect(upgrade(
            &server,
            "/ws",
            &[("origin", "http://evil.example")]
        ))
        .await
        .err(),
        Some(403)
    );
    // Close but not equal is still refused.
    assert_eq!(
        try_connect(upgrade(
            &server,
            "/ws",
            &[("origin", "http://good.example.evil")]
        ))
        .await
        .err(),
        Some(403)
    );
    let mut good = client_with(upgrade(
        &server,
        "/ws",
        &[("origin", "http://good.example")],
    ))
    .await;
    let mut tool = client_with(upgrade(&server, "/ws", &[])).await;
    for ws in [&mut good, &mut tool] {
        assert_eq!(
            ws.request(json!({"op": "ping", "id": 1})).await["type"],
            "pong"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// heartbeat

/// Reads raw frames (so heartbeats are seen) until `n` heartbeat messages have arrived.
async fn heartbeats(ws: &mut Ws, n: usize) -> Vec<i64> {
    let mut times = Vec::new();
    while times.len() < n {
        let msg = tokio::time::timeout(DEADLINE, ws.inner.next())
            .await
            .expect("timed out waiting for a heartbeat")
            .expect("connection ended")
            .expect("websocket error");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "heartbeat" {
                    times.push(v["server_time"].as_i64().expect("server_time"));
                }
            }
            Message::Close(c) => panic!("closed: {c:?}"),
            _ => {}
        }
    }
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_flow_and_silent_peers_are_closed_after_three() {
    let mut config = test_config();
    config.server.heartbeat_ms = 300;
    let server = TestServer::start_with(config).await;
    let (mut silent, welcome) = server.client().await;
    assert_eq!(welcome["heartbeat_ms"], 300);
    let (mut reader, _) = server.client().await;
    let started = now_ms();
    // The reading client (tungstenite answers the server's pings while reading) gets heartbeat
    // messages and stays open well past three heartbeats.
    let times = heartbeats(&mut reader, 6).await;
    assert!(times.windows(2).all(|w| w[1] >= w[0]), "{times:?}");
    assert!(times[0] >= started - 1000);
    // Meanwhile the silent client (never reads, so never answers a ping) was closed.
    wait_limit_hits(&server, "heartbeat_timeout", 1.0).await;
    let (seen, ended) = closed(&mut silent).await;
    assert!(
        ended == Ended::Close(1000) || ended == Ended::Eof,
        "silent peer ended with {ended:?}"
    );
    assert!(
        seen.iter().any(|m| m["type"] == "heartbeat"),
        "heartbeats were sent before giving up: {seen:?}"
    );
    // The reading client is still open after more heartbeats.
    heartbeats(&mut reader, 2).await;
    assert_eq!(
        reader.request(json!({"op": "ping", "id": 1})).await["type"],
        "pong"
    );
    assert_eq!(limit_hits(&server, "heartbeat_timeout").await, 1.0);
}

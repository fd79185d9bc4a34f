//! Every HTTP error has the JSON shape docs/protocol.md promises (`{"type":"error","code",
//! "message"}`), including the ones axum answers by itself (a method a route does not serve,
//! an unknown route, a malformed query parameter, a refused upgrade); and symbols that contain
//! a `/` (`EUR/USD`) work in the history and bars routes as they are written, and
//! percent-encoded.

mod common;

use common::*;
use serde_json::{json, Value};

/// Status, headers and the body parsed as JSON (the test fails if it is not JSON).
async fn request(method: reqwest::Method, url: String) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = reqwest::Client::new()
        .request(method, url)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("HTTP {status} body is not JSON ({e}): {text:?}"));
    (status, headers, body)
}

fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_a_route_does_not_serve_is_a_json_405() {
    let server = TestServer::start().await;
    let (status, headers, body) = request(reqwest::Method::GET, server.http("/api/ticks")).await;
    assert_eq!(status, 405);
    assert_error(&body, "method_not_allowed");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers["allow"].to_str().unwrap().contains("POST"));
    let (status, _, body) = request(reqwest::Method::POST, server.http("/api/stats")).await;
    assert_eq!(status, 405);
    assert_error(&body, "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_query_parameter_is_a_json_400() {
    let server = TestServer::start().await;
    for path in [
        "/api/history/AAPL?limit=abc",
        "/api/history/AAPL?since_seq=-1",
        "/api/bars/AAPL?limit=abc",
        "/api/dlq?limit=abc",
    ] {
        let (status, _, body) = request(reqwest::Method::GET, server.http(path)).await;
        assert_eq!(status, 400, "{path}");
        assert_error(&body, "bad_request");
        assert!(
            body["message"].as_str().unwrap().contains("limit")
                || body["message"].as_str().unwrap().contains("since_seq"),
            "{path}: the message names the parameter: {body}"
        );
    }
    // A good query still works.
    let (status, _, body) = request(
        reqwest::Method::GET,
        server.http("/api/history/AAPL?limit=5"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["ticks"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_refused_upgrades_are_json_errors() {
    let server = TestServer::start().await;
    for path in ["/no/such/route", "/api", "/api/history/"] {
        let (status, _, body) = request(reqwest::Method::GET, server.http(path)).await;
        assert_eq!(status, 404, "{path}");
        assert_error(&body, "not_found");
    }
    // A plain GET of /ws is not an upgrade.
    let (status, _, body) = request(reqwest::Method::GET, server.http("/ws")).await;
    assert_eq!(status, 400);
    assert_error(&body, "bad_request");
    // The wrong WebSocket version: 426 with the version to use.
    let resp = reqwest::Client::new()
        .get(server.http("/ws"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 426);
    assert_eq!(resp.headers()["sec-websocket-version"], "13");
    let body: Value = resp.json().await.unwrap();
    assert_error(&body, "upgrade_required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_with_a_slash_work_in_history_and_bars() {
    let server = TestServer::start().await;
    let mut producer = server.producer().await;
    // Both EUR/USD ticks in one minute, so they make one 1m bar.
    let minute = now_ms() / 60_000 * 60_000;
    let at = |mut t: Value, ts: i64| {
        t["ts"] = ts.into();
        t
    };
    let ack = ingest(
        &mut producer,
        &[
            at(tick("EUR/USD", 1.08, 1.0), minute),
            at(tick("EUR/USD", 1.09, 2.0), minute + 1),
            tick("EUR", 5.0, 1.0),
        ],
    )
    .await;
    assert_eq!(ack["accepted"], 3, "{ack}");
    // Written as it is, and percent-encoded: the same symbol.
    for path in ["/api/history/EUR/USD", "/api/history/EUR%2FUSD"] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let body = loop {
            let (status, _, body) = request(
                reqwest::Method::GET,
                server.http(&format!("{path}?limit=10")),
            )
            .await;
            assert_eq!(status, 200, "{path}: {body}");
            if body["ticks"].as_array().is_some_and(|t| t.len() == 2) {
                break body;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path}: the two EUR/USD ticks never showed: {body}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(body["symbol"], "EUR/USD");
        let prices: Vec<f64> = body["ticks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                assert_eq!(t["symbol"], "EUR/USD");
                t["price"].as_f64().unwrap()
            })
            .collect();
        assert_eq!(prices, [1.08, 1.09]);
    }
    for path in ["/api/bars/EUR/USD?tf=1m", "/api/bars/EUR%2FUSD?tf=1m"] {
        let (status, _, body) = request(reqwest::Method::GET, server.http(path)).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["symbol"], "EUR/USD");
        let bars = body["bars"].as_array().unwrap();
        assert_eq!(bars.len(), 1, "{path}: {body}");
        assert_eq!(bars[0]["volume"], 3.0);
        assert_eq!(bars[0]["count"], 2);
    }
    // `EUR` alone is its own symbol, not a prefix of the other.
    let (_, _, body) = request(reqwest::Method::GET, server.http("/api/history/EUR")).await;
    assert_eq!(body["ticks"].as_array().unwrap().len(), 1);
    // A symbol that breaks the rules is still a 400, in JSON.
    let (status, _, body) = request(reqwest::Method::GET, server.http("/api/history/a%20b")).await;
    assert_eq!(status, 400);
    assert_error(&body, "invalid_symbol");
}

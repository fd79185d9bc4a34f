//! JWT auth end to end (issue 16): tokens are signed here (HS256 with a test secret, ES256
//! with a key pair made by `rcgen` at test time), and each is tried on every path a token
//! travels (`/ws` header, query and `auth` op; `/ingest`; `POST /api/ticks`; the read API);
//! symbol permissions on subscribe, wildcard delivery, snapshots and ingest; refresh; expiry
//! (close 4001, waited on as an event); and no token in the logs of the real binary.

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-test-only-hs256-secret-of-at-least-32-bytes";

fn now_s() -> u64 {
    u64::try_from(now_ms() / 1000).unwrap()
}

/// Claims expiring `exp_in` seconds from now, plus `extra`.
fn claims(exp_in: i64, extra: Value) -> Value {
    let mut c = json!({"sub": "alice", "exp": now_s() as i64 + exp_in});
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    c
}

fn hs(claims: &Value) -> String {
    hs_with(claims, SECRET, Algorithm::HS256)
}

fn hs_with(claims: &Value, secret: &str, alg: Algorithm) -> String {
    encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An unsigned token (`"alg":"none"`), which must never pass.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    )
}

/// An ES256 key pair made now: (private PKCS#8 PEM, public SPKI PEM).
fn es256_keys() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (key.serialize_pem(), key.public_key_pem())
}

fn es(claims: &Value, private_pem: &str) -> String {
    encode(
        &Header::new(Algorithm::ES256),
        claims,
        &EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn hs_config() -> tickfan::Config {
    let mut c = test_config();
    c.auth.jwt_hs256_secret = Some(SECRET.into());
    c.auth.jwt_leeway_secs = 0;
    c
}

/// How a path must answer a token.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Accepted,
    /// Refused with this error code.
    Refused(&'static str),
}

async fn ws_connect(url: &str, bearer: Option<&str>) -> Ws {
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let (inner, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    Ws { inner }
}

/// A `/ws` connection that carried its token at the upgrade: accepted, it answers requests;
/// refused, it gets the error then close 4001.
async fn expect_ws(mut ws: Ws, expect: Expect, path: &str) {
    let welcome = ws.recv().await;
    assert_eq!(welcome["type"], "welcome", "{path}: {welcome}");
    match expect {
        Expect::Accepted => {
            let r = ws.request(json!({"op": "symbols", "id": 7})).await;
            assert_eq!(r["type"], "symbols", "{path}: {r}");
        }
        Expect::Refused(code) => {
            let (seen, ended) = ws.until_closed().await;
            assert_eq!(ended, Ended::Close(4001), "{path}: {seen:?}");
            assert!(
                seen.iter()
                    .any(|m| m["type"] == "error" && m["code"] == code),
                "{path}: no {code} error in {seen:?}"
            );
        }
    }
}

/// Tries `token` on every path a token travels and checks each answers `expect`.
async fn try_every_path(server: &TestServer, token: &str, expect: Expect, what: &str) {
    // /ws with the token in the header, then in the query.
    let ws = ws_connect(&server.ws_url("/ws"), Some(token)).await;
    expect_ws(ws, expect, &format!("{what} /ws header")).await;
    let ws = ws_connect(&server.ws_url(&format!("/ws?token={token}")), None).await;
    expect_ws(ws, expect, &format!("{what} /ws query")).await;
    // /ws with the auth op.
    let mut ws = ws_connect(&server.ws_url("/ws"), None).await;
    assert_eq!(ws.recv().await["type"], "welcome");
    ws.send_json(&json!({"op": "auth", "id": 1, "token": token}))
        .await;
    match expect {
        Expect::Accepted => {
            let ack = ws.reply(1).await;
            assert_eq!(ack["type"], "ack", "{what} /ws op: {ack}");
        }
        Expect::Refused(code) => {
            let (seen, ended) = ws.until_closed().await;
            assert_eq!(ended, Ended::Close(4001), "{what} /ws op: {seen:?}");
            assert_eq!(
                seen.last().unwrap()["code"],
                code,
                "{what} /ws op: {seen:?}"
            );
        }
    }
    // /ingest: refused before the upgrade.
    let mut req = server.ws_url("/ingest").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let upgrade = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req))
        .await
        .unwrap();
    match (expect, upgrade) {
        (Expect::Accepted, Ok((inner, _))) => {
            let mut p = Ws { inner };
            let ack = ingest(&mut p, &[tick("PATHS", 1.0, 1.0)]).await;
            assert_eq!(ack["accepted"], 1, "{what} /ingest: {ack}");
        }
        (Expect::Refused(_), Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            assert_eq!(resp.status(), 401, "{what} /ingest");
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(
                body["code"],
                match expect {
                    Expect::Refused(c) => c,
                    Expect::Accepted => unreachable!(),
                },
                "{what} /ingest"
            );
        }
        (expect, other) => panic!("{what} /ingest: expected {expect:?}, got {other:?}"),
    }
    // POST /api/ticks and the read API, with the header and with the query.
    let http = reqwest::Client::new();
    let posts = [
        http.post(server.http("/api/ticks")).bearer_auth(token),
        http.post(server.http(&format!("/api/ticks?token={token}"))),
    ];
    let gets = [
        http.get(server.http("/api/symbols")).bearer_auth(token),
        http.get(server.http(&format!("/api/history/PATHS?token={token}"))),
    ];
    for req in posts {
        let resp = req
            .body(json!([tick("PATHS", 1.0, 1.0)]).to_string())
            .send()
            .await
            .unwrap();
        check_http(resp, expect, &format!("{what} POST /api/ticks")).await;
    }
    for req in gets {
        let resp = req.send().await.unwrap();
        check_http(resp, expect, &format!("{what} read API")).await;
    }
}

/// A valid, an expired and a not-yet-valid producer token signed by `sign`, on every path.
async fn try_time_cases(server: &TestServer, sign: impl Fn(&Value) -> String, alg: &str) {
    let ingest = json!({"ingest": true});
    let valid = sign(&claims(3600, ingest.clone()));
    try_every_path(server, &valid, Expect::Accepted, &format!("{alg} valid")).await;
    let expired = sign(&claims(-60, ingest.clone()));
    let what = format!("{alg} expired");
    try_every_path(server, &expired, Expect::Refused("token_expired"), &what).await;
    let mut early = claims(3600, ingest);
    early["nbf"] = json!(now_s() + 600);
    let what = format!("{alg} nbf");
    try_every_path(
        server,
        &sign(&early),
        Expect::Refused("unauthorized"),
        &what,
    )
    .await;
}

async fn check_http(resp: reqwest::Response, expect: Expect, what: &str) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    match expect {
        Expect::Accepted => assert_eq!(status, 200, "{what}: {body}"),
        Expect::Refused(code) => {
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["code"], code, "{what}: {body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens_on_every_path() {
    let mut config = hs_config();
    config.auth.client_tokens = vec!["static-client".into()];
    config.auth.ingest_tokens = vec!["static-producer".into()];
    let server = TestServer::start_with(config).await;
    let ingest = json!({"ingest": true});
    try_time_cases(&server, hs, "HS256").await;
    let forged = hs_with(
        &claims(3600, ingest.clone()),
        "another-secret-of-at-least-32-bytes-long",
        Algorithm::HS256,
    );
    try_every_path(
        &server,
        &forged,
        Expect::Refused("unauthorized"),
        "bad signature",
    )
    .await;
    let other_alg = hs_with(&claims(3600, ingest.clone()), SECRET, Algorithm::HS384);
    try_every_path(
        &server,
        &other_alg,
        Expect::Refused("unauthorized"),
        "HS384",
    )
    .await;
    let none = unsigned(&claims(3600, ingest.clone()));
    try_every_path(&server, &none, Expect::Refused("unauthorized"), "alg none").await;
    let no_exp = hs(&json!({"sub": "alice", "ingest": true}));
    try_every_path(&server, &no_exp, Expect::Refused("unauthorized"), "no exp").await;
    // Static tokens work beside JWTs, each on its own side, as before.
    let ws = ws_connect(&server.ws_url("/ws?token=static-client"), None).await;
    expect_ws(ws, Expect::Accepted, "static client").await;
    let (status, _, _) = server
        .post_ticks(json!([tick("S", 1.0, 1.0)]).to_string())
        .await;
    assert_eq!(status, 401, "no token on a producer route");
    let (status, _) = post_as(&server, "static-producer", &[tick("S", 1.0, 1.0)]).await;
    assert_eq!(status, 200);
    let failures = server.metrics_text().await;
    for reason in [
        "expired",
        "not_yet_valid",
        "bad_signature",
        "wrong_algorithm",
    ] {
        let line = format!("tickfan_auth_failures_total{{reason=\"{reason}\"}} ");
        let n: f64 = failures
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line}"))
            .parse()
            .unwrap();
        assert!(n > 0.0, "{reason} not counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_and_no_key_confusion() {
    let (private, public) = es256_keys();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("jwt.pub.pem");
    std::fs::write(&key_file, &public).unwrap();
    let mut config = test_config();
    config.auth.jwt_public_key_file = Some(key_file);
    config.auth.jwt_leeway_secs = 0;
    let server = TestServer::start_with(config).await;
    let ingest = json!({"ingest": true});
    try_time_cases(&server, |c| es(c, &private), "ES256").await;
    let (other_private, _) = es256_keys();
    let forged = es(&claims(3600, ingest.clone()), &other_private);
    try_every_path(
        &server,
        &forged,
        Expect::Refused("unauthorized"),
        "ES256 forged",
    )
    .await;
    // The public key used as an HMAC secret: the classic confusion, refused by the pin.
    let confused = hs_with(&claims(3600, ingest.clone()), &public, Algorithm::HS256);
    try_every_path(
        &server,
        &confused,
        Expect::Refused("unauthorized"),
        "HS256 on ES key",
    )
    .await;
}

/// Publishes ticks of `forbidden` then one of `allowed`, and checks that each client gets
/// the `allowed` one and none of the others before it.
async fn only_permitted_arrive(
    producer: &mut Ws,
    clients: &mut [&mut Ws],
    forbidden: &[&str],
    allowed: &str,
) {
    let mut ticks: Vec<Value> = forbidden.iter().map(|s| tick(s, 1.0, 1.0)).collect();
    ticks.push(tick(allowed, 2.0, 1.0));
    ingest(producer, &ticks).await;
    for ws in clients.iter_mut() {
        let seen = ws
            .recv_until(|v| v["type"] == "tick" && v["symbol"] == allowed)
            .await;
        assert!(
            seen.iter()
                .all(|m| !forbidden.iter().any(|f| m["symbol"] == *f)),
            "a forbidden symbol was delivered: {seen:?}"
        );
    }
}

/// Publishes a tick of `sentinel` and reads `ws` until it arrives live: every message the
/// client got before it (its snapshots included).
async fn settle(ws: &mut Ws, producer: &mut Ws, sentinel: &str) -> Vec<Value> {
    ingest(producer, &[tick(sentinel, 9.0, 1.0)]).await;
    ws.recv_until(|v| v["type"] == "tick" && v["symbol"] == sentinel && v["price"] == 9.0)
        .await
}

/// Batch mode: a `*` client limited by its token and an unlimited one never share a batch
/// (each gets what its own token permits); and a `*` subscribe whose `since_seq` names a
/// forbidden symbol replays only permitted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_wildcards_and_since_seq_keep_to_the_token() {
    let (server, mut producer) = hs_server_and_producer().await;
    let ack = ingest(
        &mut producer,
        &[tick("MSFT", 1.0, 1.0), tick("BTCUSD", 2.0, 1.0)],
    )
    .await;
    assert_eq!(ack["accepted"], 2, "{ack}");
    let limited = hs(&claims(3600, json!({"symbols": ["BTC*"]})));
    let unlimited = hs(&claims(3600, json!({})));
    let batch = json!({"symbols": ["*"], "mode": "batch", "interval_ms": 100});
    let mut clients = Vec::new();
    for token in [&limited, &unlimited] {
        let mut ws = Ws::connect(&server.ws_url(&format!("/ws?token={token}"))).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        subscribe(&mut ws, 1, batch.clone()).await;
        clients.push(ws);
    }
    ingest(
        &mut producer,
        &[
            tick("MSFT", 1.5, 1.0),
            tick("ETHUSD", 3.0, 1.0),
            tick("BTCUSD", 2.5, 1.0),
        ],
    )
    .await;
    let batched = |m: &Value, sym: &str| {
        m["type"] == "batch"
            && m["ticks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["symbol"] == sym)
    };
    let seen = clients[0].recv_until(|m| batched(m, "BTCUSD")).await;
    assert!(
        seen.iter()
            .all(|m| !batched(m, "MSFT") && !batched(m, "ETHUSD")),
        "the limited batch client got a forbidden symbol: {seen:?}"
    );
    let mut got = std::collections::HashSet::new();
    while !(got.contains("MSFT") && got.contains("ETHUSD") && got.contains("BTCUSD")) {
        let m = clients[1].recv().await;
        for t in m["ticks"].as_array().into_iter().flatten() {
            got.insert(t["symbol"].as_str().unwrap().to_owned());
        }
    }
    // since_seq naming a forbidden symbol, with `*`: only permitted symbols replay.
    let mut resumer = Ws::connect(&server.ws_url(&format!("/ws?token={limited}"))).await;
    assert_eq!(resumer.recv().await["type"], "welcome");
    let ack = subscribe(
        &mut resumer,
        1,
        json!({"symbols": ["*"], "since_seq": {"MSFT": 0, "BTCUSD": 0}}),
    )
    .await;
    assert!(!ack.to_string().contains("MSFT"), "{ack}");
    let seen = settle(&mut resumer, &mut producer, "BTCUSD").await;
    assert!(
        seen.iter().all(|m| !m.to_string().contains("MSFT")),
        "MSFT replayed to a token without it: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|m| m["type"] == "snapshot" && m["symbol"] == "BTCUSD"),
        "no BTCUSD replay: {seen:?}"
    );
}

/// `/ingest` applies the connection limits before it verifies a token (an RS/ES signature
/// check costs more than a refusal): over the limit, a bad token is answered
/// `too_many_connections` and never looked at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_admission_comes_before_token_checks() {
    let mut config = hs_config();
    config.limits.max_connections = 1;
    let server = TestServer::start_with(config).await;
    let token = hs(&claims(3600, json!({})));
    let mut held = ws_connect(&server.ws_url("/ws"), Some(&token)).await;
    assert_eq!(held.recv().await["type"], "welcome");
    let refused = tokio_tungstenite::connect_async(server.ws_url("/ingest?token=garbage")).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) = refused else {
        panic!("{refused:?}");
    };
    assert!(matches!(resp.status().as_u16(), 429 | 503), "{resp:?}");
    let text = server.metrics_text().await;
    assert!(
        text.contains("tickfan_auth_failures_total{reason=\"invalid\"} 0"),
        "{text}"
    );
}

/// An HS256 server and a producer on it whose JWT may publish anything.
async fn hs_server_and_producer() -> (TestServer, Ws) {
    let server = TestServer::start_with(hs_config()).await;
    let token = hs(&claims(3600, json!({"ingest": true})));
    let producer = Ws::connect(&server.ws_url(&format!("/ingest?token={token}"))).await;
    (server, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbol_permissions_on_subscribe_wildcard_snapshots_and_reads() {
    let (server, mut producer) = hs_server_and_producer().await;
    // Known before anyone subscribes: a wildcard's history must not replay MSFT.
    let ack = ingest(
        &mut producer,
        &[tick("MSFT", 1.0, 1.0), tick("BTCUSD", 2.0, 1.0)],
    )
    .await;
    assert_eq!(ack["accepted"], 2, "{ack}");
    let token = hs(&claims(3600, json!({"symbols": ["AAPL", "BTC*"]})));
    let mut named = Ws::connect(&server.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(named.recv().await["type"], "welcome");
    let ack = subscribe(
        &mut named,
        1,
        json!({"symbols": ["AAPL", "MSFT", "BTCUSD"]}),
    )
    .await;
    assert_eq!(ack["symbols"], json!(["AAPL", "BTCUSD"]), "{ack}");
    assert_eq!(
        ack["rejected"],
        json!([{"symbol": "MSFT", "code": "forbidden"}]),
        "{ack}"
    );
    let mut wild = Ws::connect(&server.ws_url(&format!("/ws?token={token}"))).await;
    assert_eq!(wild.recv().await["type"], "welcome");
    wild.send_json(&json!({"op": "subscribe", "id": 2, "symbols": ["*"], "history": 10}))
        .await;
    // Every message up to a live tick published after the subscribe's ack: all the
    // snapshots, in whatever order they come. The tick is published only once the ack is in:
    // published earlier, it may be dispatched before the subscription exists and come as
    // part of the snapshot, never live (seen under a loaded full test run).
    let mut replay = wild.recv_until(|v| v["id"] == 2).await;
    replay.extend(settle(&mut wild, &mut producer, "BTCUSD").await);
    let snapshots: Vec<&Value> = replay.iter().filter(|m| m["type"] == "snapshot").collect();
    assert!(
        replay.iter().all(|m| !m.to_string().contains("MSFT")),
        "MSFT leaked in the replay: {replay:?}"
    );
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(snapshots[0]["symbol"], "BTCUSD");
    // Live: both get BTCUSD, never MSFT or ETHUSD published before it.
    only_permitted_arrive(
        &mut producer,
        &mut [&mut wild, &mut named],
        &["MSFT", "ETHUSD"],
        "BTCUSD",
    )
    .await;
    // The symbols op and the read API show only permitted symbols.
    let list = wild.request(json!({"op": "symbols", "id": 3})).await;
    let names: Vec<&str> = list["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["BTCUSD"], "{list}");
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(server.http(path)).bearer_auth(&token).send();
    assert_eq!(get("/api/history/MSFT").await.unwrap().status(), 403);
    assert_eq!(get("/api/bars/MSFT").await.unwrap().status(), 403);
    assert_eq!(get("/api/dlq").await.unwrap().status(), 403);
    assert_eq!(get("/api/history/BTCUSD").await.unwrap().status(), 200);
    let body: Value = get("/api/symbols").await.unwrap().json().await.unwrap();
    assert_eq!(body["symbols"].as_array().unwrap().len(), 1, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ingest_symbols_and_client_tokens_that_cannot_publish() {
    let server = TestServer::start_with(hs_config()).await;
    let token = hs(&claims(
        3600,
        json!({"ingest": true, "ingest_symbols": ["BTC*"]}),
    ));
    let mut producer = Ws::connect(&server.ws_url(&format!("/ingest?token={token}"))).await;
    let ack = ingest(
        &mut producer,
        &[tick("BTCUSD", 1.0, 1.0), tick("ETHUSD", 2.0, 1.0)],
    )
    .await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    assert_eq!(reject_codes(&ack), ["forbidden"], "{ack}");
    // POST /api/ticks too.
    let (status, ack) = post_as(&server, &token, &[tick("ETHUSD", 2.0, 1.0)]).await;
    assert_eq!(status, 200);
    assert_eq!(reject_codes(&ack), ["forbidden"], "{ack}");
    // Dead-lettered, with the tick and never the token.
    let reader = hs(&claims(3600, json!({})));
    let dlq = get_as(&server, "/api/dlq", &reader).await;
    let entries = dlq["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{dlq}");
    assert!(entries.iter().all(|e| e["code"] == "forbidden"), "{dlq}");
    assert!(
        !dlq.to_string().contains(&token),
        "token in the dead letters"
    );
    // A client token (no "ingest": true) must not publish.
    let (status, body) = post_as(&server, &reader, &[tick("BTCUSD", 2.0, 1.0)]).await;
    assert_eq!(status, 403);
    assert_eq!(body["code"], "forbidden", "{body}");
    let refused =
        tokio_tungstenite::connect_async(server.ws_url(&format!("/ingest?token={reader}"))).await;
    assert!(
        matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 403),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_narrows_permissions_and_outlives_the_old_token() {
    let (server, mut producer) = hs_server_and_producer().await;
    // Connections with the same token, which lives long enough for the refreshes below to
    // happen first even on a loaded machine (they take well under a second), and ends well
    // within the wait for the control's close (`DEADLINE`, 20 s): two refresh, the third is
    // the control whose close marks the moment the old token ran out.
    let short = hs(&claims(12, json!({"symbols": ["A*"]})));
    let mut control = Ws::connect(&server.ws_url(&format!("/ws?token={short}"))).await;
    let mut ws = Ws::connect(&server.ws_url(&format!("/ws?token={short}"))).await;
    let mut wild = Ws::connect(&server.ws_url(&format!("/ws?token={short}"))).await;
    for c in [&mut ws, &mut wild, &mut control] {
        assert_eq!(c.recv().await["type"], "welcome");
    }
    let ack = subscribe(&mut ws, 1, json!({"symbols": ["AAPL", "AMZN"]})).await;
    assert_eq!(ack["symbols"], json!(["AAPL", "AMZN"]));
    let ack = subscribe(&mut wild, 1, json!({"symbols": ["*"]})).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let long = hs(&claims(3600, json!({"symbols": ["AAPL"]})));
    ws.send_json(&json!({"op": "auth", "id": 2, "token": long}))
        .await;
    let seen = ws.recv_until(|v| v["id"] == 2).await;
    let notice = seen
        .iter()
        .find(|m| m["type"] == "unsubscribed")
        .unwrap_or_else(|| panic!("no unsubscribed notice in {seen:?}"));
    assert_eq!(notice["code"], "forbidden");
    assert_eq!(notice["symbols"], json!(["AMZN"]));
    assert_eq!(seen.last().unwrap()["type"], "ack");
    // The `*` subscription stays, narrowed to the new token's symbols.
    wild.send_json(&json!({"op": "auth", "id": 2, "token": long}))
        .await;
    let seen = wild.recv_until(|v| v["id"] == 2).await;
    assert_eq!(seen.last().unwrap()["type"], "ack", "{seen:?}");
    // The old token runs out: the control connection is closed 4001 with token_expired...
    let (seen, ended) = control.until_closed().await;
    assert_eq!(ended, Ended::Close(4001));
    assert_eq!(seen.last().unwrap()["code"], "token_expired", "{seen:?}");
    // ...and the refreshed ones still answer, now with only AAPL (the `*` narrowed too).
    only_permitted_arrive(
        &mut producer,
        &mut [&mut ws, &mut wild],
        &["AMZN", "ABC"],
        "AAPL",
    )
    .await;
    for c in [&mut ws, &mut wild] {
        let pong = c.request(json!({"op": "ping", "id": 4})).await;
        assert_eq!(pong["type"], "pong");
    }
}

/// A refresh that fails ends the session like any failed auth: its error, then close 4001.
/// So does a refresh to another user's token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_closes_4001() {
    let server = TestServer::start_with(hs_config()).await;
    let good = hs(&claims(3600, json!({})));
    let mut nbf = claims(3600, json!({}));
    nbf["nbf"] = json!(now_s() + 600);
    let forged = hs_with(
        &claims(3600, json!({})),
        "another-secret-of-at-least-32-bytes-long",
        Algorithm::HS256,
    );
    let cases = [
        ("not-a-token".to_owned(), "unauthorized"),
        (hs(&claims(-60, json!({}))), "token_expired"),
        (hs(&nbf), "unauthorized"),
        (forged, "unauthorized"),
        (hs(&claims(3600, json!({"sub": "mallory"}))), "forbidden"),
    ];
    for (token, code) in cases {
        let mut ws = Ws::connect(&server.ws_url(&format!("/ws?token={good}"))).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        ws.send_json(&json!({"op": "auth", "id": 3, "token": token}))
            .await;
        let (seen, ended) = ws.until_closed().await;
        assert_eq!(ended, Ended::Close(4001), "{code}: {seen:?}");
        assert_eq!(seen.last().unwrap()["code"], code, "{seen:?}");
    }
    // The same user's token, and one without a sub, refresh fine.
    for token in [good.clone(), hs(&json!({"exp": now_s() + 3600}))] {
        let mut ws = Ws::connect(&server.ws_url(&format!("/ws?token={good}"))).await;
        assert_eq!(ws.recv().await["type"], "welcome");
        let ack = ws
            .request(json!({"op": "auth", "id": 3, "token": token}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
}

/// A session opened with a static token may move to a JWT: its permissions and expiry apply
/// from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_session_refreshes_to_a_jwt() {
    let mut config = hs_config();
    config.auth.client_tokens = vec!["static-client".into()];
    let server = TestServer::start_with(config).await;
    let mut ws = Ws::connect(&server.ws_url("/ws?token=static-client")).await;
    assert_eq!(ws.recv().await["type"], "welcome");
    let ack = subscribe(&mut ws, 1, json!({"symbols": ["AAPL", "MSFT"]})).await;
    assert_eq!(ack["symbols"], json!(["AAPL", "MSFT"]));
    let jwt = hs(&claims(3600, json!({"symbols": ["AAPL"]})));
    ws.send_json(&json!({"op": "auth", "id": 2, "token": jwt}))
        .await;
    let seen = ws.recv_until(|v| v["id"] == 2).await;
    assert!(
        seen.iter()
            .any(|m| m["type"] == "unsubscribed" && m["symbols"] == json!(["MSFT"])),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap()["type"], "ack", "{seen:?}");
    let ack = subscribe(&mut ws, 3, json!({"symbols": ["MSFT"]})).await;
    assert_eq!(
        ack["rejected"],
        json!([{"symbol": "MSFT", "code": "forbidden"}]),
        "{ack}"
    );
}

/// `"symbols": null` (Go writes a nil list so) is refused, never read as "everything"; `[]`
/// permits nothing; a list over `auth.jwt_max_patterns` is refused as bad claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_empty_and_over_limit_symbol_claims() {
    let mut config = hs_config();
    config.auth.jwt_max_patterns = 3;
    let server = TestServer::start_with(config).await;
    let token = hs(&claims(3600, json!({"ingest": true})));
    let mut producer = Ws::connect(&server.ws_url(&format!("/ingest?token={token}"))).await;
    ingest(&mut producer, &[tick("AAPL", 1.0, 1.0)]).await;
    let four = hs(&claims(3600, json!({"symbols": ["A", "B", "C", "D"]})));
    let ws = ws_connect(&server.ws_url("/ws"), Some(&four)).await;
    expect_ws(ws, Expect::Refused("unauthorized"), "4 patterns, limit 3").await;
    let three = hs(&claims(3600, json!({"symbols": ["A", "B", "C*"]})));
    let ws = ws_connect(&server.ws_url("/ws"), Some(&three)).await;
    expect_ws(ws, Expect::Accepted, "3 patterns, limit 3").await;
    let null = hs(&claims(3600, json!({"symbols": null})));
    let ws = ws_connect(&server.ws_url("/ws"), Some(&null)).await;
    expect_ws(ws, Expect::Refused("unauthorized"), "symbols null").await;
    let null_ingest = hs(&claims(
        3600,
        json!({"ingest": true, "ingest_symbols": null}),
    ));
    let (status, _) = post_as(&server, &null_ingest, &[tick("AAPL", 1.0, 1.0)]).await;
    assert_eq!(status, 401, "ingest_symbols null");
    let empty = hs(&claims(3600, json!({"symbols": []})));
    let mut ws = ws_connect(&server.ws_url("/ws"), Some(&empty)).await;
    assert_eq!(ws.recv().await["type"], "welcome");
    let ack = subscribe(&mut ws, 1, json!({"symbols": ["AAPL"]})).await;
    assert_eq!(
        ack["rejected"],
        json!([{"symbol": "AAPL", "code": "forbidden"}]),
        "{ack}"
    );
    let list = ws.request(json!({"op": "symbols", "id": 2})).await;
    assert_eq!(list["symbols"], json!([]), "{list}");
    let text = server.metrics_text().await;
    assert!(
        text.lines().any(
            |l| l.starts_with("tickfan_auth_failures_total{reason=\"bad_claims\"} ")
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
}

/// A misspelled secret key in the config file: the error names the key and never echoes
/// the secret.
#[test]
fn a_config_error_never_echoes_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tickfan.toml");
    let secret = "Sup3r-s3cret-value-that-must-not-leak";
    std::fs::write(&config, format!("[auth]\njwt_hs256_secrt = \"{secret}\"\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tickfan"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("jwt_hs256_secrt"), "{stderr}");
    assert!(
        !stderr.contains(secret),
        "the secret in the error: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_running_parked_and_producer_sessions() {
    // One server never parks (the connection's task runs when the token expires), the
    // other parks quiet connections quickly (it is in the parking lot then).
    let mut running = hs_config();
    running.server.park_after_ms = 0;
    let mut parking = hs_config();
    parking.server.park_after_ms = 200;
    let (running, parking) = (
        TestServer::start_with(running).await,
        TestServer::start_with(parking).await,
    );
    tokio::join!(expire_on(&running, false), expire_on(&parking, true));
}

/// A client and a producer whose token expires in a few seconds, left alone: each gets
/// `token_expired` and close 4001. With `parked`, the client is first seen parked.
async fn expire_on(server: &TestServer, parked: bool) {
    // Long enough to be seen parked first on a loaded machine.
    let short = hs(&claims(12, json!({"ingest": true})));
    let mut client = ws_connect(&server.ws_url("/ws"), Some(&short)).await;
    assert_eq!(client.recv().await["type"], "welcome");
    let mut producer = ws_connect(&server.ws_url("/ingest"), Some(&short)).await;
    let reader = hs(&claims(3600, json!({})));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while parked && !is_parked(server, &reader).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection did not park"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (seen, ended) = client.until_closed().await;
    assert_eq!(ended, Ended::Close(4001), "parked {parked}: {seen:?}");
    assert_eq!(
        seen.last().unwrap()["code"],
        "token_expired",
        "parked {parked}: {seen:?}"
    );
    let (seen, ended) = producer.until_closed().await;
    assert_eq!(ended, Ended::Close(4001), "producer: {seen:?}");
    assert_eq!(
        seen.last().unwrap()["code"],
        "token_expired",
        "producer: {seen:?}"
    );
    let text = server.metrics_text().await;
    assert!(
        text.contains("tickfan_token_expiries_total{route=\"ws\"} 1"),
        "{text}"
    );
    assert!(text.contains("tickfan_token_expiries_total{route=\"ingest\"} 1"));
}

/// Whether `/api/stats` shows a parked connection.
async fn is_parked(server: &TestServer, token: &str) -> bool {
    let stats = get_as(server, "/api/stats", token).await;
    stats["parking"]["parked"].as_u64() >= Some(1)
}

/// `POST /api/ticks` with `token` as the bearer: status and JSON body.
async fn post_as(server: &TestServer, token: &str, ticks: &[Value]) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(server.http("/api/ticks"))
        .bearer_auth(token)
        .body(Value::Array(ticks.to_vec()).to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A GET of the read API with `token` as the bearer: its JSON body.
async fn get_as(server: &TestServer, path: &str, token: &str) -> Value {
    reqwest::Client::new()
        .get(server.http(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The real binary at debug level: tokens of every kind, on every path, good and bad, and a
/// dead-lettered forbidden tick; none of the token strings may reach its log, its metrics or
/// its dead letters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_reaches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tickfan.toml");
    let static_client = "static-client-token-Zq8vX1";
    let static_producer = "static-producer-token-Pw3kR7";
    // The log level from the config file, so the child gets debug whatever the test's env.
    std::fs::write(
        &config,
        format!(
            "[log]\nlevel = \"debug\"\n[auth]\nclient_tokens = [\"{static_client}\"]\n\
             ingest_tokens = [\"{static_producer}\"]\n\
             jwt_hs256_secret = \"{SECRET}\"\njwt_leeway_secs = 0\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let mut child = Binary::spawn(
        &dir.path().join("data"),
        &["--config", &config],
        std::process::Stdio::from(log),
    );
    let addr = child.addr.clone();
    let client = hs(&claims(3600, json!({"symbols": ["OK*"]})));
    let producer = hs(&claims(
        3600,
        json!({"ingest": true, "ingest_symbols": ["OK*"]}),
    ));
    let expired = hs(&claims(-60, json!({})));
    let forged = hs_with(
        &claims(3600, json!({})),
        "x".repeat(40).as_str(),
        Algorithm::HS256,
    );
    let tokens = [
        static_client.to_owned(),
        static_producer.to_owned(),
        client.clone(),
        producer.clone(),
        expired.clone(),
        forged.clone(),
        "garbage-token-Hn4tY2".to_owned(),
    ];
    let ws = |path: String| format!("ws://{addr}{path}");
    let http = |path: String| format!("http://{addr}{path}");
    for t in &tokens {
        // /ws: query, header, op.
        // The key percent-encoded too: the server reads it as `token`, so the log must
        // redact it as one.
        for (url, bearer) in [
            (ws(format!("/ws?token={t}")), None),
            (ws(format!("/ws?tok%65n={t}")), None),
            (ws("/ws".into()), Some(t.as_str())),
        ] {
            let mut c = ws_connect(&url, bearer).await;
            c.send_json(&json!({"op": "subscribe", "id": 1, "symbols": ["OKA", "NO"]}))
                .await;
            c.send_json(&json!({"op": "auth", "id": 2, "token": t}))
                .await;
            c.send_json(&json!({"op": "ping", "id": 3})).await;
            pong_or_close(&mut c).await;
        }
        // /ingest and POST /api/ticks, with a forbidden tick for the JWT producer.
        let body = json!([tick("OKX", 1.0, 1.0), tick("NOPE", 1.0, 1.0)]).to_string();
        if let Ok((inner, _)) =
            tokio_tungstenite::connect_async(ws(format!("/ingest?token={t}"))).await
        {
            let mut p = Ws { inner };
            p.send_text(&body).await;
            let _ = p.recv().await;
        }
        let h = reqwest::Client::new();
        let _ = h
            .post(http(format!("/api/ticks?token={t}")))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let _ = h
            .post(http("/api/ticks".into()))
            .bearer_auth(t)
            .body(body)
            .send()
            .await;
        let _ = h.get(http(format!("/api/symbols?token={t}"))).send().await;
        let _ = h
            .get(http(format!("/api/symbols?%74oken={t}")))
            .send()
            .await;
        let _ = h.get(http("/api/dlq".into())).bearer_auth(t).send().await;
    }
    let h = reqwest::Client::new();
    let dlq = h
        .get(http("/api/dlq".into()))
        .bearer_auth(static_client)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dlq.contains("forbidden"), "no forbidden dead letter: {dlq}");
    let metrics = h
        .get(http("/metrics".into()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    child.terminate();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("DEBUG"), "the log ran at debug level");
    assert!(
        log.contains("token=REDACTED"),
        "refused URLs are logged redacted"
    );
    for t in &tokens {
        // The whole token, and for JWTs each part that is secret-derived or identifying.
        let mut needles = vec![t.as_str()];
        needles.extend(t.split('.').filter(|p| p.len() > 20));
        for n in needles {
            assert!(!log.contains(n), "token text in the log: {n}");
            assert!(!metrics.contains(n), "token text in the metrics: {n}");
            assert!(!dlq.contains(n), "token text in the dead letters: {n}");
        }
    }
}

/// Reads until the reply to request 3 or the end of the connection, whichever comes.
async fn pong_or_close(ws: &mut Ws) {
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, ws.inner.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains(r#""id":3"#) => return,
            Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return,
            Ok(Some(Ok(_))) => {}
            Err(_) => panic!("neither a reply nor a close"),
        }
    }
}

//! Upstream feeds end to end (issue 13): local WebSocket servers on 127.0.0.1:0 speak each
//! source's protocol (subscribe handshake, heartbeats, trades, from the recorded messages in
//! tests/fixtures/feeds/), a real tickfan pulls from them, and a real `/ws` client checks what
//! arrives. Kind `tickfan` runs against a second real tickfan. Every wait polls with a
//! deadline or waits on an event; breaker timings are small through the config.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{subscribe, TestServer, Ws, DEADLINE};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tickfan::config::{UpstreamConfig, UpstreamKind};
use tickfan::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A local upstream: accepts WebSocket connections and hands each to the test.
struct FakeUpstream {
    addr: SocketAddr,
    conns: tokio::sync::mpsc::Receiver<WebSocketStream<TcpStream>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Listens on `addr` again (a restarted upstream); retried until the deadline.
    async fn restart(addr: SocketAddr) -> Self {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Self::on(l),
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "rebind {addr}: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                    if tx.send(ws).await.is_err() {
                        return;
                    }
                }
            }
        });
        Self { addr, conns, task }
    }

    fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The next connection the connector made.
    async fn accept(&mut self) -> Conn {
        let ws = tokio::time::timeout(DEADLINE, self.conns.recv())
            .await
            .expect("no upstream connection in time")
            .expect("listener gone");
        Conn { ws }
    }

    /// Stops listening (new connections are refused).
    fn stop(self) {
        self.task.abort();
    }
}

struct Conn {
    ws: WebSocketStream<TcpStream>,
}

impl Conn {
    async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("upstream got nothing in time")
                .expect("connector hung up")
                .unwrap();
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    /// Reads the subscribe request and answers it as `kind`'s server does.
    async fn handshake(&mut self, kind: UpstreamKind) -> Value {
        let sub = self.recv().await;
        let reply = match kind {
            UpstreamKind::Binance => r#"{"result":null,"id":1}"#.to_owned(),
            UpstreamKind::Coinbase => fixture("coinbase")[0].clone(),
            UpstreamKind::Kraken => fixture("kraken")[1].clone(),
            _ => unreachable!(),
        };
        self.send(&reply).await;
        sub
    }
}

fn fixture(name: &str) -> Vec<String> {
    let path = format!(
        "{}/tests/fixtures/feeds/{name}.jsonl",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn upstream(name: &str, kind: UpstreamKind, url: &str, symbols: &[&str]) -> UpstreamConfig {
    let text = format!(
        "name = {name:?}\nkind = {:?}\nurl = {url:?}\nsymbols = {:?}\nreconnect_min_ms = 20\nreconnect_max_ms = 200\nfailure_threshold = 1000\ncooldown_ms = 500\nstale_ms = 30000",
        serde_json::to_value(kind).unwrap().as_str().unwrap(),
        symbols
    );
    toml::from_str(&text).unwrap()
}

/// Test config: no simulator, and recorded messages (years old) are not stale.
fn config(upstreams: Vec<UpstreamConfig>) -> Config {
    let mut c = common::test_config();
    c.validation.max_age_ms = 100 * 365 * 86_400_000;
    c.feed.upstream = upstreams;
    c.validate().unwrap();
    c
}

async fn health(server: &TestServer) -> (u16, Value) {
    server.get_json("/health").await
}

fn upstream_health<'a>(h: &'a Value, name: &str) -> &'a Value {
    h["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no upstream {name} in {h}"))
}

/// Polls `/health` until `pred` holds for upstream `name`.
async fn wait_upstream(
    server: &TestServer,
    name: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, h) = health(server).await;
        if pred(upstream_health(&h, name)) {
            return h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {h}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fake upstream and a tickfan with one upstream `name` of `kind` on it, for `symbol`.
async fn one_upstream(name: &str, kind: UpstreamKind, symbol: &str) -> (FakeUpstream, TestServer) {
    let fake = FakeUpstream::start().await;
    let server =
        TestServer::start_with(config(vec![upstream(name, kind, &fake.url(), &[symbol])])).await;
    (fake, server)
}

/// Subscribes a client to `symbols` on `server`.
async fn client(server: &TestServer, symbols: &[&str]) -> Ws {
    let (mut ws, _) = server.client().await;
    subscribe(&mut ws, 1, json!({"symbols": symbols})).await;
    ws
}

/// Reads live ticks until `n` have arrived.
async fn ticks(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let v = ws.recv().await;
        match v["type"].as_str() {
            Some("tick") => out.push(v),
            Some("snapshot") => out.extend(v["ticks"].as_array().unwrap().iter().cloned()),
            _ => {}
        }
    }
    out
}

/// The values of `keys` in a tick, as one array (compact assertions).
fn pick(tick: &Value, keys: &[&str]) -> Value {
    keys.iter().map(|k| tick[*k].clone()).collect()
}

fn binance_trade(symbol: &str, id: u64, price: &str) -> String {
    format!(
        r#"{{"e":"trade","E":{now},"s":"{symbol}","t":{id},"p":"{price}","q":"1.5","T":{now},"m":true,"M":true}}"#,
        now = common::now_ms()
    )
}

#[tokio::test]
async fn each_kind_maps_its_messages_to_ticks() {
    let mut binance = FakeUpstream::start().await;
    let mut coinbase = FakeUpstream::start().await;
    let mut kraken = FakeUpstream::start().await;
    let mut bn = upstream(
        "bn",
        UpstreamKind::Binance,
        &binance.url(),
        &["BNBBTC", "ETHBTC"],
    );
    bn.prefix = "bn:".into();
    bn.map.insert("BNBBTC".into(), "BNB-BTC".into());
    let server = TestServer::start_with(config(vec![
        bn,
        upstream("cb", UpstreamKind::Coinbase, &coinbase.url(), &["BTC-USD"]),
        upstream("kr", UpstreamKind::Kraken, &kraken.url(), &["MATIC/USD"]),
    ]))
    .await;
    let mut ws = client(
        &server,
        &["bn:BNB-BTC", "bn:ETHBTC", "BTC-USD", "MATIC/USD"],
    )
    .await;

    // Binance: the subscribe names lower-case trade streams; raw and combined events map.
    let mut conn = binance.accept().await;
    let sub = conn.recv().await;
    assert_eq!(
        sub,
        json!({"method":"SUBSCRIBE","params":["bnbbtc@trade","ethbtc@trade"],"id":1})
    );
    for line in fixture("binance") {
        conn.send(&line).await;
    }
    let got = ticks(&mut ws, 2).await;
    assert_eq!(
        pick(&got[0], &["symbol", "ts", "price", "volume", "id"]),
        json!(["bn:BNB-BTC", 1_672_515_782_136_i64, 0.001, 100, 12345])
    );
    assert_eq!(
        pick(&got[1], &["symbol", "ts", "price", "id"]),
        json!(["bn:ETHBTC", 1_579_481_530_910_i64, 0.019141, 158_410_082])
    );

    // Coinbase: matches + heartbeat channels; last_match and match map; the heartbeat's
    // last_trade_id (20 after trade 10) reveals 10 missed trades, counted as a gap.
    let mut conn = coinbase.accept().await;
    let sub = conn.recv().await;
    assert_eq!(
        sub,
        json!({"type":"subscribe","product_ids":["BTC-USD"],"channels":["matches","heartbeat"]})
    );
    for line in fixture("coinbase") {
        conn.send(&line).await;
    }
    let got = ticks(&mut ws, 2).await;
    assert_eq!(
        pick(&got[0], &["symbol", "price", "id"]),
        json!(["BTC-USD", 399.98, 9])
    );
    assert_eq!(
        pick(&got[1], &["ts", "price", "volume", "id"]),
        json!([1_415_348_367_028_i64, 400.23, 5.23512, 10])
    );

    // Kraken v2: subscribe to the trade channel; one update carries two trades.
    let mut conn = kraken.accept().await;
    let sub = conn.recv().await;
    assert_eq!(sub["method"], "subscribe");
    assert_eq!(
        sub["params"],
        json!({"channel":"trade","symbol":["MATIC/USD"],"snapshot":false})
    );
    for line in fixture("kraken") {
        conn.send(&line).await;
    }
    let got = ticks(&mut ws, 2).await;
    assert_eq!(
        pick(&got[0], &["symbol", "ts", "price", "volume", "id"]),
        json!(["MATIC/USD", 1_695_628_177_708_i64, 0.5117, 40, 4_665_906])
    );
    assert_eq!(pick(&got[1], &["price", "id"]), json!([0.5116, 4_665_907]));

    let h = wait_upstream(&server, "cb", "coinbase gap", |u| u["gaps"] == 10).await;
    for name in ["bn", "cb", "kr"] {
        let u = upstream_health(&h, name);
        assert_eq!(u["state"], "connected", "{u}");
        assert_eq!(u["ticks_received"], 2, "{u}");
        assert!(u["last_message_ms"].as_i64().unwrap() > 0);
        assert_eq!(u["garbage"], 0, "{u}");
    }
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_ticks_total{upstream="kr"}"#)
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_gaps_total{upstream="cb"}"#)
            .await,
        10.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_state{upstream="bn"}"#)
            .await,
        0.0
    );
    let (status, h) = health(&server).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["symbols_without_source"], json!([]));
}

#[tokio::test]
async fn tickfan_kind_maps_its_messages_to_ticks() {
    // A fake tickfan speaking the recorded /ws messages: welcome, then the subscribe
    // (without since_seq on a first connect), ack, snapshot, live tick.
    let (mut fake, server) = one_upstream("edge", UpstreamKind::Tickfan, "AAPL").await;
    let mut ws = client(&server, &["AAPL"]).await;
    let mut conn = fake.accept().await;
    let lines = fixture("tickfan");
    conn.send(&lines[0]).await;
    let sub = conn.recv().await;
    assert_eq!(
        sub,
        json!({"op":"subscribe","id":1,"symbols":["AAPL"],"mode":"realtime"})
    );
    for line in &lines[1..] {
        conn.send(line).await;
    }
    let got = ticks(&mut ws, 2).await;
    assert_eq!(
        pick(&got[0], &["symbol", "ts", "price", "id"]),
        json!(["AAPL", 1_733_400_000_000_i64, 190.25, "t-41"])
    );
    assert_eq!(
        pick(&got[1], &["price", "bid", "ask", "id"]),
        json!([190.3, 190.29, 190.31, "t-42"])
    );
    // The local seq is this server's own, not the upstream's.
    assert_eq!(got[0]["seq"], 1);
}

#[tokio::test]
async fn garbage_is_dead_lettered_and_a_closing_upstream_is_reconnected() {
    let (mut fake, server) = one_upstream("bn", UpstreamKind::Binance, "BTCUSDT").await;
    let mut ws = client(&server, &["BTCUSDT"]).await;
    let mut conn = fake.accept().await;
    conn.handshake(UpstreamKind::Binance).await;
    conn.send("this is not json").await;
    conn.send(&binance_trade("BTCUSDT", 1, "-5")).await;
    conn.send(r#"{"e":"kline","E":1,"s":"BTCUSDT"}"#).await;
    conn.send(&format!("{}{}", "[".repeat(100), "]".repeat(100)))
        .await;
    conn.send(&binance_trade("BTCUSDT", 2, "100.5")).await;
    let got = ticks(&mut ws, 1).await;
    assert_eq!(pick(&got[0], &["id", "price"]), json!([2, 100.5]));
    let (_, dlq) = server.get_json("/api/dlq").await;
    let entries = dlq["entries"]
        .as_array()
        .or(dlq.as_array())
        .unwrap_or_else(|| panic!("{dlq}"))
        .clone();
    let mine: Vec<&Value> = entries
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("upstream bn:")
        })
        .collect();
    let mut codes: Vec<&str> = mine.iter().map(|e| e["code"].as_str().unwrap()).collect();
    codes.sort_unstable();
    assert_eq!(
        codes,
        ["bad_json", "bad_json", "invalid_price", "unknown_message"],
        "{dlq}"
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_garbage_total{upstream="bn"}"#)
            .await,
        4.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_limit_hits_total{upstream="bn",limit="max_json_depth"}"#)
            .await,
        1.0
    );

    // The upstream closes: the connector comes back, subscribes again, and ticks flow.
    conn.ws.close(None).await.unwrap();
    drop(conn);
    let mut conn = fake.accept().await;
    conn.handshake(UpstreamKind::Binance).await;
    conn.send(&binance_trade("BTCUSDT", 3, "101")).await;
    let got = ticks(&mut ws, 1).await;
    assert_eq!(got[0]["id"], 3);
    let h = wait_upstream(&server, "bn", "reconnect counted", |u| u["reconnects"] == 1).await;
    let u = upstream_health(&h, "bn");
    assert!(
        u["last_error"]
            .as_str()
            .unwrap()
            .contains("closed by upstream"),
        "{u}"
    );
    assert_eq!(u["state"], "connected");
}

#[tokio::test]
async fn a_silent_upstream_is_stale_and_reconnected() {
    let mut fake = FakeUpstream::start().await;
    let mut up = upstream("kr", UpstreamKind::Kraken, &fake.url(), &["BTC/USD"]);
    up.stale_ms = 300;
    let server = TestServer::start_with(config(vec![up])).await;
    let mut first = fake.accept().await;
    first.handshake(UpstreamKind::Kraken).await;
    // Then nothing at all: after stale_ms the connector gives up on it and connects again.
    let mut second = fake.accept().await;
    second.handshake(UpstreamKind::Kraken).await;
    let h = wait_upstream(&server, "kr", "stale failure", |u| {
        u["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("stale"))
    })
    .await;
    assert_eq!(upstream_health(&h, "kr")["reconnects"], 1, "{h}");
    drop(first);
}

#[tokio::test]
async fn breaker_opens_after_failures_and_half_opens_after_the_cooldown() {
    // A port nobody listens on: every attempt is refused.
    let refused = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = refused.local_addr().unwrap();
    drop(refused);
    let mut up = upstream(
        "cb",
        UpstreamKind::Coinbase,
        &format!("ws://{addr}/"),
        &["BTC-USD"],
    );
    up.failure_threshold = 3;
    up.cooldown_ms = 1_000;
    let server = TestServer::start_with(config(vec![up])).await;
    let h = wait_upstream(&server, "cb", "breaker open", |u| u["state"] == "open").await;
    let u = upstream_health(&h, "cb");
    assert_eq!(u["breaker_trips"], 1, "{u}");
    assert_eq!(u["reconnects"], 2, "three attempts opened it: {u}");
    assert!(
        u["last_error"].as_str().unwrap().starts_with("connect"),
        "{u}"
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_state{upstream="cb"}"#)
            .await,
        1.0
    );
    // No live source for its symbol: /health says which, with 503.
    let (status, h) = health(&server).await;
    assert_eq!(status, 503);
    assert_eq!(h["symbols_without_source"], json!(["BTC-USD"]));

    // The upstream comes back. After the cool-down one probe connects: half-open until the
    // upstream answers, then closed.
    let mut fake = FakeUpstream::restart(addr).await;
    let mut conn = fake.accept().await;
    let _sub = conn.recv().await;
    let h = wait_upstream(&server, "cb", "half-open probe", |u| {
        u["state"] == "half_open"
    })
    .await;
    assert_eq!(upstream_health(&h, "cb")["breaker_trips"], 1);
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_state{upstream="cb"}"#)
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_probes_total{upstream="cb"}"#)
            .await,
        1.0
    );
    conn.send(&fixture("coinbase")[0]).await;
    wait_upstream(&server, "cb", "closed after the probe", |u| {
        u["state"] == "connected"
    })
    .await;
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_state{upstream="cb"}"#)
            .await,
        0.0
    );
    let (status, _) = health(&server).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_failed_tls_handshake_is_a_failure_not_a_crash() {
    // wss:// to a plain TCP server that hangs up: rustls reports an error, the connector
    // counts a failure and keeps trying.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = tokio::spawn(async move {
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            drop(tcp);
        }
    });
    let up = upstream(
        "tls",
        UpstreamKind::Binance,
        &format!("wss://{addr}/ws"),
        &["BTCUSDT"],
    );
    let server = TestServer::start_with(config(vec![up])).await;
    tokio::time::timeout(DEADLINE, accepts)
        .await
        .unwrap()
        .unwrap();
    let h = wait_upstream(&server, "tls", "failure recorded", |u| {
        !u["last_error"].is_null()
    })
    .await;
    assert!(upstream_health(&h, "tls")["last_error"]
        .as_str()
        .unwrap()
        .starts_with("connect"));
}

#[tokio::test]
async fn failover_to_the_backup_and_back_delivers_each_trade_once() {
    let mut primary = FakeUpstream::start().await;
    let mut backup = FakeUpstream::start().await;
    let paddr = primary.addr;
    let mut b = upstream(
        "bn-backup",
        UpstreamKind::Binance,
        &backup.url(),
        &["BTCUSDT"],
    );
    b.backup_for = Some("bn".into());
    let server = TestServer::start_with(config(vec![
        upstream("bn", UpstreamKind::Binance, &primary.url(), &["BTCUSDT"]),
        b,
    ]))
    .await;
    let mut ws = client(&server, &["BTCUSDT"]).await;
    let mut p = primary.accept().await;
    p.handshake(UpstreamKind::Binance).await;
    let mut bk = backup.accept().await;
    bk.handshake(UpstreamKind::Binance).await;
    wait_upstream(&server, "bn", "primary live", |u| u["live"] == true).await;
    // The same trade ids from both, but each source quotes its own price, so the client can
    // tell who delivered a tick: the primary 100 + id, the backup 200 + id.
    let from = |src: u64, id: u64| binance_trade("BTCUSDT", id, &format!("{}", src + id));
    let (pri, bak) = (100, 200);

    // Both sources see the same market; only the primary's ticks flow. The backup also sees
    // trade 6, which the primary never delivers: it waits in the backup's seam buffer.
    for id in 1..=6 {
        bk.send(&from(bak, id)).await;
    }
    wait_upstream(&server, "bn-backup", "backup heard", |u| {
        u["ticks_received"] == 6
    })
    .await;
    for id in 1..=5 {
        p.send(&from(pri, id)).await;
    }
    let mut got = ticks(&mut ws, 5).await;

    // The primary drops and refuses: the backup takes over. Its seam (1-6) goes first: 1-5
    // are duplicates and dropped, 6 is delivered; then 7-10.
    primary.stop();
    p.ws.close(None).await.unwrap();
    drop(p);
    let h = wait_upstream(&server, "bn", "failover", |u| u["failovers"] == 1).await;
    let (status, _) = health(&server).await;
    assert_eq!(status, 200, "the backup still serves BTCUSDT: {h}");
    for id in 7..=10 {
        bk.send(&from(bak, id)).await;
    }
    got.extend(ticks(&mut ws, 5).await);

    // The primary comes back and takes over: the backup's 11 and 12 are held back, and the
    // primary's replay of 9 and 10 is dropped as duplicates.
    let mut primary = FakeUpstream::restart(paddr).await;
    let mut p = primary.accept().await;
    p.handshake(UpstreamKind::Binance).await;
    wait_upstream(&server, "bn", "failback", |u| {
        u["failbacks"] == 1 && u["live"] == true
    })
    .await;
    for id in 11..=12 {
        bk.send(&from(bak, id)).await;
    }
    wait_upstream(&server, "bn-backup", "backup heard", |u| {
        u["ticks_received"] == 12
    })
    .await;
    for id in 9..=13 {
        p.send(&from(pri, id)).await;
    }
    got.extend(ticks(&mut ws, 3).await);
    let seen: Vec<(u64, u64)> = got
        .iter()
        .map(|t| {
            let id = t["id"].as_u64().unwrap();
            (id, t["price"].as_f64().unwrap() as u64 - id)
        })
        .collect();
    let want: Vec<(u64, u64)> = (1..=13)
        .map(|id| (id, if (6..=10).contains(&id) { bak } else { pri }))
        .collect();
    assert_eq!(
        seen, want,
        "(id, source): each trade once, in order, from the serving source"
    );
    // Nothing more is queued for the client: the next message is the ping's reply.
    ws.send_json(&json!({"op":"ping","id":9})).await;
    let next = ws.recv().await;
    assert_eq!(next["type"], "pong", "{next}");
    assert!(
        server
            .metric(r#"tickfan_upstream_duplicates_total{upstream="bn"}"#)
            .await
            >= 2.0
    );
    assert!(
        server
            .metric(r#"tickfan_upstream_duplicates_total{upstream="bn-backup"}"#)
            .await
            >= 2.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_failovers_total{upstream="bn"}"#)
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_failbacks_total{upstream="bn"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn tickfan_kind_resumes_without_a_gap_after_its_upstream_restarts() {
    let origin_config = common::test_config();
    let origin = TestServer::start_with(origin_config.clone()).await;
    let origin_addr = origin.addr;
    let mut up = upstream(
        "origin",
        UpstreamKind::Tickfan,
        &origin.ws_url("/ws"),
        &["AAPL"],
    );
    // Long enough that the ticks below are sent while the edge is disconnected.
    up.reconnect_min_ms = 1_000;
    up.reconnect_max_ms = 1_000;
    let edge = TestServer::start_with(config(vec![up])).await;
    wait_upstream(&edge, "origin", "connected", |u| u["state"] == "connected").await;
    let mut ws = client(&edge, &["AAPL"]).await;
    let tick = |n: u64| json!({"symbol":"AAPL","ts":common::now_ms(),"price":100.0 + n as f64,"volume":1,"id":n});

    let mut producer = origin.producer().await;
    common::ingest(&mut producer, &(1..=5).map(tick).collect::<Vec<_>>()).await;
    let mut got = ticks(&mut ws, 5).await;
    producer.close().await;

    // The origin restarts (same port, same store): the edge loses it, and ticks 6..10
    // arrive at the origin before the edge is back.
    let dir = origin.stop().await;
    wait_upstream(&edge, "origin", "disconnected", |u| {
        u["state"] != "connected"
    })
    .await;
    let origin = common::start_on(origin_addr, origin_config, dir).await;
    let mut producer = origin.producer().await;
    common::ingest(&mut producer, &(6..=10).map(tick).collect::<Vec<_>>()).await;
    got.extend(ticks(&mut ws, 5).await);
    let ids: Vec<u64> = got.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=10).collect::<Vec<_>>(), "no gap, no duplicate");
    let seqs: Vec<u64> = got.iter().map(|t| t["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        edge.metric(r#"tickfan_upstream_resumes_total{upstream="origin"}"#)
            .await,
        1.0
    );
    assert_eq!(
        edge.metric(r#"tickfan_upstream_gaps_total{upstream="origin"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn the_dashboard_loads_the_upstreams_panel() {
    let server = TestServer::start_with(config(Vec::new())).await;
    let index = reqwest::get(server.http("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(index.contains(r#"<script defer src="upstreams.js"></script>"#));
    let resp = reqwest::get(server.http("/upstreams.js")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let js = resp.text().await.unwrap();
    assert!(js.contains("fetch(\"health\"") && js.contains("symbols_without_source"));
    // Without upstreams /health is as before: no feed keys.
    let (status, h) = health(&server).await;
    assert_eq!(status, 200);
    assert!(h.get("upstreams").is_none(), "{h}");
}

#[tokio::test]
async fn an_oversized_message_ends_the_session_and_is_counted() {
    let mut fake = FakeUpstream::start().await;
    let mut up = upstream("bn", UpstreamKind::Binance, &fake.url(), &["BTCUSDT"]);
    up.max_message_bytes = 1_024;
    let server = TestServer::start_with(config(vec![up])).await;
    let mut ws = client(&server, &["BTCUSDT"]).await;
    let mut conn = fake.accept().await;
    conn.handshake(UpstreamKind::Binance).await;
    conn.send(&format!(r#"{{"e":"trade","pad":"{}"}}"#, "x".repeat(4_096)))
        .await;
    // The connector drops that connection and comes back on a new one.
    let mut conn = fake.accept().await;
    conn.handshake(UpstreamKind::Binance).await;
    conn.send(&binance_trade("BTCUSDT", 7, "10")).await;
    assert_eq!(ticks(&mut ws, 1).await[0]["id"], 7);
    assert_eq!(
        server
            .metric(r#"tickfan_upstream_limit_hits_total{upstream="bn",limit="max_message_bytes"}"#)
            .await,
        1.0
    );
    let h = wait_upstream(&server, "bn", "error recorded", |u| u["reconnects"] == 1).await;
    let err = upstream_health(&h, "bn")["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(err.contains("max_message_bytes"), "{err}");
}

#[tokio::test]
async fn binance_pings_are_answered_with_pongs() {
    // Binance pings every 20 s and drops a connection that does not pong within a minute.
    let (mut fake, server) = one_upstream("bn", UpstreamKind::Binance, "BTCUSDT").await;
    let mut conn = fake.accept().await;
    conn.handshake(UpstreamKind::Binance).await;
    conn.ws
        .send(Message::Ping(b"1672515782136".to_vec().into()))
        .await
        .unwrap();
    let reply = tokio::time::timeout(DEADLINE, conn.ws.next())
        .await
        .expect("no pong in time")
        .unwrap()
        .unwrap();
    assert_eq!(reply, Message::Pong(b"1672515782136".to_vec().into()));
    let (_, h) = health(&server).await;
    assert_eq!(upstream_health(&h, "bn")["state"], "connected");
}

#[test]
fn upstream_blocks_are_validated() {
    let base = "[[feed.upstream]]\nname = \"a\"\nkind = \"binance\"\nurl = \"ws://x/ws\"\nsymbols = [\"BTCUSDT\"]\n";
    let ok = Config::from_toml(base).unwrap();
    let u = &ok.feed.upstream[0];
    assert_eq!(
        (
            u.reconnect_min_ms,
            u.reconnect_max_ms,
            u.failure_threshold,
            u.cooldown_ms,
            u.stale_ms
        ),
        (500, 30_000, 5, 60_000, 60_000)
    );
    for (extra, needle) in [
        ("typo = 1\n", "typo"),
        ("[[feed.upstream]]\nname = \"a\"\nkind = \"kraken\"\nurl = \"ws://y\"\nsymbols = [\"X\"]\n", "name"),
        ("backup_for = \"nobody\"\n", "backup_for"),
        ("reconnect_min_ms = 5000\nreconnect_max_ms = 10\n", "reconnect_min_ms"),
    ] {
        let err = Config::from_toml(&format!("{base}{extra}")).unwrap_err().to_string();
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
    let err = Config::from_toml(&base.replace("binance", "bitfinex"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bitfinex") || err.contains("variant"), "{err}");
    let err = Config::from_toml(&base.replace("ws://x/ws", "http://x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("url"), "{err}");
    let err = Config::from_toml(&base.replace("name = \"a\"", "name = \"a b\""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("name"), "{err}");
}

//! The built-in simulator feeds ticks through the normal ingest path: many symbols, valid
//! quotes, gap-free seqs; and unknown routes answer 404.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_feeds_many_symbols_through_ingest() {
    let mut config = test_config();
    config.feed.simulator = true;
    config.feed.simulator_rate = 2_000;
    config.feed.simulator_critical_permille = 50;
    let server = TestServer::start_with(config).await;
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, json!({"symbols": ["*"]})).await;
    let mut symbols = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut critical = 0;
    for _ in 0..2_000 {
        let m = client.recv().await;
        assert_eq!(m["type"], "tick", "{m}");
        let sym = m["symbol"].as_str().unwrap().to_owned();
        let seq = m["seq"].as_u64().unwrap();
        if let Some(prev) = last.insert(sym.clone(), seq) {
            assert_eq!(seq, prev + 1, "{sym}");
        }
        let (bid, ask, price) = (
            m["bid"].as_f64().unwrap(),
            m["ask"].as_f64().unwrap(),
            m["price"].as_f64().unwrap(),
        );
        assert!(bid <= ask && price > 0.0, "{m}");
        critical += usize::from(m["priority"] == "critical");
        symbols.insert(sym);
    }
    assert!(symbols.len() >= 15, "about 20 instruments: {symbols:?}");
    assert!(symbols.contains("AAPL") && symbols.contains("BTC-USD"));
    assert!(critical > 0, "occasional critical ticks");
    let stats = server
        .wait_stats("simulator ticks counted by ingest", |s| {
            s["ticks_accepted"].as_u64().unwrap_or(0) >= 2_000
        })
        .await;
    assert_eq!(
        stats["ticks_rejected"], 0,
        "the simulator only produces valid ticks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_404_and_the_dashboard_is_served() {
    let server = TestServer::start().await;
    let resp = reqwest::get(server.http("/no/such/route")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let page = reqwest::get(server.http("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("app.js"));
    for asset in ["/app.js", "/style.css", "/vendor/lightweight-charts.js"] {
        assert_eq!(
            reqwest::get(server.http(asset))
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{asset}"
        );
    }
    let metrics = server.metrics_text().await;
    assert!(metrics.contains("tickfan_ticks_accepted_total"));
    assert!(metrics.contains("# HELP tickfan_ticks_accepted_total"));
}

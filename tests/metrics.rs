//! `/metrics` exposes exactly the metrics `tickfan::metrics::ALL` defines, each with its type
//! and help text, and every `limit` label value: so the one definition, the exposition and the
//! docs table (checked against the definition by `metrics::tests`) cannot drift apart.

mod common;

use std::collections::BTreeMap;

use common::*;
use tickfan::metrics::{Kind, ALL, LIMITS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_is_the_defined_metrics() {
    let server = TestServer::start().await;
    // One tick through, so the histograms have samples and show.
    let mut producer = server.producer().await;
    let ack = ingest(&mut producer, &[tick("M", 1.0, 1.0)]).await;
    assert_eq!(ack["accepted"], 1);
    let (mut client, _) = server.client().await;
    subscribe(&mut client, 1, serde_json::json!({"symbols": ["M"]})).await;
    let text = server.metrics_text().await;
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            helps.insert(name.to_owned(), help.to_owned());
        }
    }
    for (name, kind) in &types {
        let def = ALL
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("{name} is exposed but not defined in metrics::ALL"));
        assert_eq!(kind, def.kind.as_str(), "type of {name}");
        assert_eq!(
            helps.get(name).map(String::as_str),
            Some(def.help),
            "help of {name}"
        );
    }
    // Everything defined shows, except the cluster's and the upstream feeds' (neither is
    // configured here) and the write-latency histogram, which is sampled (one write burst
    // in 64).
    for def in ALL {
        if def.name.starts_with("tickfan_bus_")
            || def.name.starts_with("tickfan_upstream_")
            || def.name == "tickfan_ingest_to_write_seconds"
        {
            continue;
        }
        assert!(
            types.contains_key(def.name),
            "{} is defined but not exposed",
            def.name
        );
        if def.kind == Kind::Histogram {
            assert!(
                text.contains(&format!("{}_count", def.name)),
                "{}",
                def.name
            );
        }
    }
    for limit in LIMITS {
        assert!(
            text.contains(&format!("tickfan_limit_hits_total{{limit=\"{limit}\"}}")),
            "limit=\"{limit}\" is not exposed"
        );
    }
}

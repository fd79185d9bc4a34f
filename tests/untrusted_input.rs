//! Hostile input against the real binary (issue 12, defects 1 and 3, and import dedup): JSON
//! nested deep enough to overflow a recursive parser's stack, and bodies of millions of tiny
//! invalid lines. These run the `tickfan` executable rather than an in-process server, because
//! the failure they guard against (a stack overflow aborting the process, or gigabytes of
//! memory) would take the test runner down with it.

mod common;

use common::{import, now_ms, Binary, Ws};
use serde_json::{json, Value};

fn http(bin: &Binary, path: &str) -> String {
    format!("http://{}{path}", bin.addr)
}

async fn post(bin: &Binary, body: impl Into<reqwest::Body>) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(http(bin, "/api/ticks"))
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn metrics_text(bin: &Binary) -> String {
    let resp = reqwest::get(http(bin, "/metrics")).await.unwrap();
    resp.text().await.unwrap()
}

/// The peak resident set of a process, from `/proc/PID/status`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// `depth` balanced brackets: simd-json refuses an unclosed run before it recurses, a closed
/// one it recurses into.
fn nested(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

fn good_tick(symbol: &str) -> Value {
    json!({"symbol": symbol, "ts": now_ms(), "price": 1.5, "volume": 1})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_post_bodies_are_bad_json_and_the_server_lives() {
    let data = tempfile::tempdir().unwrap();
    let mut bin = Binary::start(data.path());
    let deep_price = format!(
        r#"{{"symbol":"A","ts":{},"price":{}1{},"volume":1}}"#,
        now_ms(),
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let bodies = [
        nested(20_000),
        format!("{}1{}", r#"{"a":"#.repeat(100_000), "}".repeat(100_000)),
        deep_price,
        // NDJSON: the deep line is rejected, the good lines around it still get in.
        format!("{}\n{}\n", good_tick("NDJ"), nested(20_000)),
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let (status, text) = post(&bin, body).await;
        assert_eq!(status, 200, "body {i}: {text}");
        let ack: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(ack["rejected"][0]["code"], "bad_json", "body {i}: {ack}");
        let message = ack["rejected"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("limits.max_json_depth"),
            "body {i}: {message}"
        );
        assert_eq!(ack["accepted"], u64::from(i == 3), "body {i}: {ack}");
    }
    let metrics = metrics_text(&bin).await;
    assert!(
        metrics.contains("tickfan_limit_hits_total{limit=\"max_json_depth\"} 4\n"),
        "{metrics}"
    );
    let health = reqwest::get(http(&bin, "/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(
        bin.child.try_wait().unwrap().is_none(),
        "the server process died"
    );
    assert_eq!(bin.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_ws_frames_get_an_error_and_the_connection_stays_open() {
    let data = tempfile::tempdir().unwrap();
    let mut bin = Binary::start(data.path());
    // /ingest: a 40 kB frame of brackets, then a good tick on the same connection.
    let mut producer = Ws::connect(&format!("ws://{}/ingest", bin.addr)).await;
    producer.send_text(&nested(20_000)).await;
    let ack = producer.recv().await;
    assert_eq!(ack["type"], "ingest_ack", "{ack}");
    assert_eq!(ack["rejected"][0]["code"], "bad_json", "{ack}");
    producer.send_json(&good_tick("WSDEEP")).await;
    let ack = producer.recv().await;
    assert_eq!(ack["accepted"], 1, "{ack}");

    // /ws: a deep request is a bad_request, and the next request is still answered.
    let mut client = Ws::connect(&format!("ws://{}/ws", bin.addr)).await;
    client.send_text(&nested(30_000)).await;
    let err = client
        .recv_until(|v| v["type"] == "error")
        .await
        .pop()
        .unwrap();
    assert_eq!(err["code"], "bad_request", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_json_depth"),
        "{err}"
    );
    let pong = client.request(json!({"op": "ping", "id": 7})).await;
    assert_eq!(pong["type"], "pong");
    assert_eq!(bin.terminate(), Some(0));
}

#[test]
fn import_rejects_a_line_nested_500k_deep_and_goes_on() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("deep.ndjson");
    let text = format!(
        "{}\n{}\n",
        nested(500_000),
        json!({"symbol": "DEEP", "ts": now_ms() - 1000, "price": 2, "volume": 1})
    );
    std::fs::write(&path, text).unwrap();
    let (ok, out) = import(data.path(), &[&path]);
    assert!(ok, "import failed: {out}");
    assert!(
        out.contains("imported 1 accepted, 0 duplicates, 1 rejected"),
        "{out}"
    );
    assert!(out.contains("bad_json=1"), "{out}");
}

#[test]
fn reimporting_a_copied_file_stores_nothing_twice() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let base = now_ms() - 10 * 86_400_000;
    // More rows per symbol than the live dedup window (1024), with and without ids.
    let mut text = String::new();
    for i in 0..3_000i64 {
        let row = if i % 2 == 0 {
            json!({"symbol": "CPY", "ts": base + i, "price": 10 + i % 7, "volume": 1 + i % 5})
        } else {
            json!({"symbol": "CPYID", "ts": base + i, "price": 3, "volume": 1, "id": i})
        };
        text.push_str(&row.to_string());
        text.push('\n');
    }
    let original = files.path().join("day.ndjson");
    std::fs::write(&original, &text).unwrap();
    let (ok, out) = import(data.path(), &[&original]);
    assert!(ok, "{out}");
    assert!(
        out.contains("imported 3000 accepted, 0 duplicates"),
        "{out}"
    );

    let copy = files.path().join("day-copy.ndjson");
    std::fs::copy(&original, &copy).unwrap();
    let (ok, out) = import(data.path(), &[&copy]);
    assert!(ok, "{out}");
    assert!(
        out.contains("imported 0 accepted, 3000 duplicates, 0 rejected"),
        "{out}"
    );

    // The stored count is unchanged: each symbol's last seq is still 1500.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut bin = Binary::start(data.path());
    rt.block_on(async {
        let symbols: Value = reqwest::get(http(&bin, "/api/symbols"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let seqs: Vec<(String, u64)> = symbols["symbols"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["symbol"].as_str().unwrap().to_owned(),
                    s["seq"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seqs,
            [("CPY".to_owned(), 1500), ("CPYID".to_owned(), 1500)],
            "{symbols}"
        );
    });
    assert_eq!(bin.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn millions_of_tiny_invalid_lines_get_a_small_reply_and_bounded_memory() {
    let data = tempfile::tempdir().unwrap();
    let mut bin = Binary::start(data.path());
    let lines = 2_796_202usize;
    let (status, text) = post(&bin, "{}\n".repeat(lines)).await;
    assert_eq!(status, 200);
    assert!(text.len() < 32 * 1024, "reply of {} bytes", text.len());
    let ack: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(ack["accepted"], 0);
    assert_eq!(ack["rejected"].as_array().unwrap().len(), 100, "{ack}");
    assert_eq!(ack["rejected_total"], lines, "{ack}");
    assert_eq!(ack["rejected_truncated"], true);
    assert_eq!(ack["rejected"][99]["index"], 99);
    // Every rejection is still counted per code.
    let (_, stats) = (
        (),
        reqwest::get(http(&bin, "/api/stats"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
    );
    assert_eq!(stats["ticks_rejected"], lines, "{stats}");
    // The dead-letter list keeps at most its capacity, not millions.
    let dlq: Value = reqwest::get(http(&bin, "/api/dlq?limit=5"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dlq["entries"][0]["raw"], "{}");

    // The same bound on /ingest: a frame holding an array of ~21k invalid ticks.
    let mut producer = Ws::connect(&format!("ws://{}/ingest", bin.addr)).await;
    let n = 21_000;
    let frame = format!("[{}{{}}]", "{},".repeat(n - 1));
    producer.send_text(&frame).await;
    let ack = producer.recv().await;
    assert_eq!(ack["rejected"].as_array().unwrap().len(), 100, "{ack}");
    assert_eq!(ack["rejected_total"], n);

    // Generous: the old code peaked at 4 GB on this body; the body itself is 8 MiB.
    let peak_mib = peak_rss_kib(bin.child.id()) / 1024;
    eprintln!("peak RSS {peak_mib} MiB");
    assert!(peak_mib < 256, "peak RSS {peak_mib} MiB");
    assert_eq!(bin.terminate(), Some(0));
}

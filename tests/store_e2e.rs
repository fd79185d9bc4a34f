//! The store end to end: restart continuity (seq, history, epoch, dead letters), resume from the
//! store with `gap` after retention, bars, durability of acked ticks across `kill -9`, a corrupt
//! store file, and `tickfan import` with its summary and resume.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn seqs(ticks: &Value) -> Vec<u64> {
    ticks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_seq_history_epoch_and_dead_letters() {
    let server = TestServer::start().await;
    let (_, welcome) = server.client().await;
    let epoch = welcome["epoch"].as_u64().unwrap();
    let mut producer = server.producer().await;
    let ticks: Vec<Value> = (0..10)
        .map(|i| tick("R", 10.0 + f64::from(i), 1.0))
        .collect();
    assert_eq!(ingest(&mut producer, &ticks).await["accepted"], 10);
    ingest(
        &mut producer,
        &[json!({"symbol": "R", "ts": now_ms(), "price": -5, "volume": 1})],
    )
    .await;
    producer.close().await;
    let dir = server.stop().await;

    let server = TestServer::start_in(test_config(), dir).await;
    let (mut client, welcome) = server.client().await;
    assert_eq!(
        welcome["epoch"].as_u64(),
        Some(epoch),
        "a clean restart keeps the epoch"
    );
    let mut producer = server.producer().await;
    ingest(&mut producer, &[tick("R", 30.0, 1.0)]).await;
    let (status, h) = server.get_json("/api/history/R?limit=100").await;
    assert_eq!(status, 200);
    assert_eq!(h["symbol"], "R");
    assert_eq!(h["epoch"].as_u64(), Some(epoch));
    assert_eq!(
        seqs(&h["ticks"]),
        (1..=11).collect::<Vec<_>>(),
        "seq continues after the restart"
    );
    assert_eq!(h["ticks"][10]["price"], 30);
    let (_, dlq) = server.get_json("/api/dlq").await;
    assert!(
        dlq["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["code"] == "invalid_price"),
        "{dlq}"
    );

    // Resume from the store (the ring only holds seq 11 now), then live.
    subscribe(
        &mut client,
        1,
        json!({"symbols": ["R"], "since_seq": {"R": 5}}),
    )
    .await;
    let snap = client.recv().await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["gap"], false);
    assert_eq!(seqs(&snap["ticks"]), (6..=11).collect::<Vec<_>>());
    ingest(&mut producer, &[tick("R", 31.0, 1.0)]).await;
    assert_eq!(client.recv().await["seq"], 12);
    // History forms: most recent N, and the first N after since_seq.
    let (_, h) = server.get_json("/api/history/R?limit=3").await;
    assert_eq!(seqs(&h["ticks"]), [10, 11, 12]);
    let (_, h) = server.get_json("/api/history/R?limit=2&since_seq=4").await;
    assert_eq!(seqs(&h["ticks"]), [5, 6]);
    let (status, _) = server.get_json("/api/history/bad%20sym").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_reports_gap_after_retention() {
    let mut config = test_config();
    config.store.max_ticks_per_symbol = 10;
    config.store.retention_interval_ms = 20;
    config.dispatch.recent_ticks = 5;
    let server = TestServer::start_with(config).await;
    let mut producer = server.producer().await;
    let ticks: Vec<Value> = (0..100)
        .map(|i| tick("G", 1.0 + f64::from(i) * 0.01, 1.0))
        .collect();
    ingest(&mut producer, &ticks).await;
    // Wait for the background retention pass.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, h) = server.get_json("/api/history/G?limit=1000").await;
        if h["first_seq"].as_u64().unwrap_or(1) > 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never ran: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut client, _) = server.client().await;
    subscribe(
        &mut client,
        1,
        json!({"symbols": ["G"], "since_seq": {"G": 2}}),
    )
    .await;
    let snap = client.recv().await;
    assert_eq!(
        snap["gap"], true,
        "retention dropped seqs 3.. that the resume asked for"
    );
    let got = seqs(&snap["ticks"]);
    assert_eq!(*got.last().unwrap(), 100);
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "what is replayed has no hole: {got:?}"
    );
    // A resume inside what is kept has no gap.
    let (mut other, _) = server.client().await;
    subscribe(
        &mut other,
        1,
        json!({"symbols": ["G"], "since_seq": {"G": 97}}),
    )
    .await;
    let snap = other.recv().await;
    assert_eq!(
        (snap["gap"].as_bool(), seqs(&snap["ticks"])),
        (Some(false), vec![98, 99, 100])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_snapshot_joins_live_ticks_while_they_flow() {
    let mut config = test_config();
    // A tiny ring forces the history read through the store while ticks keep coming.
    config.dispatch.recent_ticks = 8;
    let server = TestServer::start_with(config).await;
    let addr = server.ws_url("/ingest");
    let stream = tokio::spawn(async move {
        let mut producer = Ws::connect(&addr).await;
        for batch in 0..300 {
            let ticks: Vec<Value> = (0..10)
                .map(|i| tick("SJ", 1.0 + f64::from(batch * 10 + i) * 1e-4, 1.0))
                .collect();
            ingest(&mut producer, &ticks).await;
        }
    });
    server
        .wait_stats("ticks flowing", |s| {
            s["ticks_dispatched"].as_u64().unwrap_or(0) > 200
        })
        .await;
    let (mut client, _) = server.client().await;
    let ack = subscribe(&mut client, 1, json!({"symbols": ["SJ"], "history": 100})).await;
    let last_at_ack = ack["last_seq"]["SJ"].as_u64().unwrap();
    let mut expected: Option<u64> = None;
    let mut from_snapshot = 0;
    while expected.is_none_or(|e| e <= 3000) {
        let m = client.recv().await;
        let got: Vec<u64> = match m["type"].as_str() {
            Some("snapshot") => {
                assert_eq!(m["gap"], false);
                let s = seqs(&m["ticks"]);
                from_snapshot += s.len();
                s
            }
            Some("tick") => vec![m["seq"].as_u64().unwrap()],
            other => panic!("unexpected {other:?}: {m}"),
        };
        for s in got {
            match expected {
                Some(e) => assert_eq!(s, e, "gap or duplicate at the store/ring/live seam"),
                None => assert_eq!(s, last_at_ack - 99, "the last 100 at the ack come first"),
            }
            expected = Some(s + 1);
        }
    }
    // The 100 of the history, then (paced replay) whatever came in while it was sent.
    assert!(from_snapshot >= 100, "{from_snapshot}");
    stream.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bars_equal_a_hand_computation() {
    let server = TestServer::start().await;
    let a = (now_ms() / 60_000 - 3) * 60_000;
    let b = a + 60_000;
    let rows = [
        (a + 1_000, 10.0, 1.0),
        (a + 2_000, 12.0, 2.0),
        (a + 3_000, 9.0, 3.0),
        (b + 500, 11.0, 4.0),
        (b + 1_500, 10.5, 5.0),
    ];
    let body: Vec<String> = rows
        .iter()
        .map(|(ts, p, v)| json!({"symbol": "BAR", "ts": ts, "price": p, "volume": v}).to_string())
        .collect();
    let (status, _, ack) = server.post_ticks(body.join("\n")).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(5)));
    let (status, bars) = server.get_json("/api/bars/BAR?tf=1m&limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(bars["tf"], "1m");
    let bars = bars["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 2);
    let pick = |bar: &Value| {
        (
            bar["t"].as_i64().unwrap(),
            bar["open"].as_f64().unwrap(),
            bar["high"].as_f64().unwrap(),
            bar["low"].as_f64().unwrap(),
            bar["close"].as_f64().unwrap(),
            bar["volume"].as_f64().unwrap(),
            bar["count"].as_u64().unwrap(),
        )
    };
    assert_eq!(pick(&bars[0]), (a, 10.0, 12.0, 9.0, 9.0, 6.0, 3));
    assert_eq!(pick(&bars[1]), (b, 11.0, 11.0, 10.5, 10.5, 9.0, 2));
    let (_, five) = server.get_json("/api/bars/BAR?tf=5m").await;
    let total: f64 = five["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["volume"].as_f64().unwrap())
        .sum();
    assert_eq!(total, 15.0);
    let (status, _) = server.get_json("/api/bars/BAR?tf=7m").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_ticks_survive_kill_9_and_the_epoch_changes() {
    // Defaults: small groups go through the write-ahead log, checkpointed every 200 ms.
    kill_9_keeps_acked_ticks(&[], None).await;
}

/// The ticks acked before the kill exist only in the write-ahead log: the checkpoint is ten
/// minutes away, and nothing reads the store. The next start must replay them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_acked_only_in_the_write_ahead_log_survive_kill_9() {
    kill_9_keeps_acked_ticks(&["checkpoint_ms = 600000"], Some(true)).await;
}

/// Without the log every ack waits for a durable redb commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_ticks_survive_kill_9_with_the_log_off() {
    kill_9_keeps_acked_ticks(&["checkpoint_ms = 0"], Some(false)).await;
}

/// A metric's value from a `/metrics` page.
fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// Producer frames pipelined, the server killed mid-stream, every acked tick stored after the
/// restart. `store` lines go into the `[store]` table of a config file; `logged` says whether
/// the acked ticks must be waiting in the log (`Some(true)`) or none may be (`Some(false)`)
/// at the kill.
async fn kill_9_keeps_acked_ticks(store: &[&str], logged: Option<bool>) {
    let dir = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let conf_file = conf.path().join("store.toml");
    std::fs::write(&conf_file, format!("[store]\n{}\n", store.join("\n"))).unwrap();
    let extra = ["--config", conf_file.to_str().unwrap()];
    let mut server = Binary::start_with(dir.path(), &extra);
    let mut client = Ws::connect(&format!("ws://{}/ws", server.addr)).await;
    let epoch = client.recv().await["epoch"].as_u64().unwrap();
    let mut producer = Ws::connect(&format!("ws://{}/ingest", server.addr)).await;
    // Pipeline frames (acks come back in order) and kill the server mid-stream.
    let mut acked: Vec<String> = Vec::new();
    let mut in_flight: std::collections::VecDeque<Vec<String>> = Default::default();
    let mut next = 0;
    while acked.len() < 3_000 {
        for _ in 0..4 {
            let ids: Vec<String> = (0..25).map(|i| format!("k{}", next * 25 + i)).collect();
            let frame: Vec<Value> = ids
                .iter()
                .map(|id| {
                    let mut t = tick("KILL", 1.0 + next as f64 * 1e-3, 1.0);
                    t["id"] = json!(id);
                    t
                })
                .collect();
            producer.send_json(&Value::Array(frame)).await;
            in_flight.push_back(ids);
            next += 1;
        }
        while in_flight.len() > 2 {
            let ack = producer.recv().await;
            assert_eq!(ack["accepted"], 25, "{ack}");
            acked.extend(in_flight.pop_front().unwrap());
        }
    }
    if let Some(logged) = logged {
        let page = reqwest::get(format!("http://{}/metrics", server.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let pending = metric(&page, "tickfan_store_log_pending_ticks");
        let appends = metric(&page, "tickfan_store_log_appends_total");
        if logged {
            assert!(
                pending >= acked.len() as f64,
                "{pending} ticks wait in the log, {} acked",
                acked.len()
            );
        } else {
            assert_eq!((pending, appends), (0.0, 0.0), "the log is off");
            assert!(!dir.path().join("tickfan.log").exists());
        }
    }
    server.kill9();
    drop(producer);
    drop(client);

    let server = Binary::start_with(dir.path(), &extra);
    let mut client = Ws::connect(&format!("ws://{}/ws", server.addr)).await;
    let new_epoch = client.recv().await["epoch"].as_u64().unwrap();
    assert_ne!(new_epoch, epoch, "an unclean stop must change the epoch");
    let mut stored = std::collections::HashSet::new();
    let mut since = 0u64;
    loop {
        let url = format!(
            "http://{}/api/history/KILL?limit=10000&since_seq={since}",
            server.addr
        );
        let h: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        let ticks = h["ticks"].as_array().unwrap();
        if ticks.is_empty() {
            break;
        }
        for t in ticks {
            let seq = t["seq"].as_u64().unwrap();
            assert_eq!(seq, since + 1, "stored seqs have no hole");
            since = seq;
            stored.insert(t["id"].as_str().unwrap().to_owned());
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acked ticks lost after kill -9, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn corrupt_store_file_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tickfan.redb"),
        b"this is not a redb file at all, not even close",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tickfan"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-simulator",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tickfan.redb"),
        "the error names the file: {err}"
    );
    assert!(!err.contains("panicked at"), "no panic: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_csv_and_ndjson_with_summary_dead_letters_and_resume() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let csv = files.path().join("ticks.csv");
    let day_ago = now_ms() - 3 * 86_400_000; // historical: stale_timestamp does not apply
    let mut text = String::from("symbol,ts,price,volume,bid,ask,id\n");
    for i in 0..100 {
        text.push_str(&format!(
            "IMP,{},{},{},,,t{i}\n",
            day_ago + i,
            10.0 + f64::from(i as u32) * 0.01,
            1 + i
        ));
    }
    text.push_str(&format!("IMP,{day_ago},-1,1,,,bad1\n"));
    text.push_str(&format!("IMP,{day_ago},10,1,11,10,bad2\n"));
    text.push_str(&format!("IMP,{},10,1,,,t5\n", day_ago + 5)); // duplicate id
    std::fs::write(&csv, text).unwrap();
    let ndjson = files.path().join("more.ndjson");
    let lines: Vec<String> = (0..20)
        .map(|i| json!({"symbol": "IMP2", "ts": day_ago + i, "price": 5, "volume": i}).to_string())
        .collect();
    std::fs::write(&ndjson, lines.join("\n") + "\nnot json\n").unwrap();

    let (ok, out) = import(data.path(), &[&csv, &ndjson]);
    assert!(ok, "{out}");
    assert!(
        out.contains("imported 120 accepted, 1 duplicates, 3 rejected"),
        "{out}"
    );
    assert!(
        out.contains("bad_json=1")
            && out.contains("crossed_quote=1")
            && out.contains("invalid_price=1"),
        "{out}"
    );
    let (ok, again) = import(data.path(), &[&csv, &ndjson]);
    assert!(ok);
    assert!(
        again.contains("imported 0 accepted, 0 duplicates, 0 rejected"),
        "a rerun resumes past everything: {again}"
    );
    assert!(again.contains("skipped 124 rows"), "{again}");
    let (ok, _) = import(data.path(), &[&files.path().join("missing.csv")]);
    assert!(!ok, "an unreadable file fails the command");

    let server = TestServer::start_in(test_config(), data).await;
    let (_, h) = server.get_json("/api/history/IMP?limit=1000").await;
    assert_eq!(seqs(&h["ticks"]), (1..=100).collect::<Vec<_>>());
    assert_eq!(h["ticks"][0]["id"], "t0");
    let (_, dlq) = server.get_json("/api/dlq").await;
    let codes: Vec<&str> = dlq["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"crossed_quote") && codes.contains(&"bad_json"),
        "{codes:?}"
    );
    let (_, symbols) = server.get_json("/api/symbols").await;
    assert_eq!(symbols["symbols"][1]["seq"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_import_resumes_without_duplicates() {
    let data = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("big.ndjson");
    const ROWS: u64 = 400_000;
    let base = now_ms() - 86_400_000 * 2;
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..ROWS {
            writeln!(
                f,
                r#"{{"symbol":"BIG{}","ts":{},"price":{},"volume":1,"id":{i}}}"#,
                i % 4,
                base + i as i64,
                1.0 + (i % 1000) as f64 * 0.01
            )
            .unwrap();
        }
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_tickfan"))
        .args(["import", "--data-dir"])
        .arg(data.path())
        .arg(&path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it once part of the file is durably in (the store file grows), or let it finish.
    let store_file = data.path().join("tickfan.redb");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::fs::metadata(&store_file).map(|m| m.len()).unwrap_or(0) > 4 << 20 {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "import neither progressed nor finished"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (ok, out) = import(data.path(), &[&path]);
    assert!(ok, "{out}");
    assert!(out.contains("0 rejected"), "{out}");
    let server = TestServer::start_in(test_config(), data).await;
    let (_, symbols) = server.get_json("/api/symbols").await;
    let list = symbols["symbols"].as_array().unwrap();
    assert_eq!(list.len(), 4);
    for s in list {
        assert_eq!(
            s["seq"].as_u64(),
            Some(ROWS / 4),
            "every row stored exactly once: {s}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_resume_comes_in_pages_without_a_hole() {
    let mut config = test_config();
    config.dispatch.recent_ticks = 10;
    config.dispatch.max_replay_ticks = 40;
    let server = TestServer::start_with(config).await;
    let mut producer = server.producer().await;
    for batch in 0..10 {
        let ticks: Vec<Value> = (0..50)
            .map(|i| tick("PG", 1.0 + f64::from(batch * 50 + i) * 1e-3, 1.0))
            .collect();
        ingest(&mut producer, &ticks).await;
    }
    // A wildcard subscriber resumes too (since_seq applies to symbols that come through "*").
    let (mut client, _) = server.client().await;
    subscribe(
        &mut client,
        1,
        json!({"symbols": ["*"], "since_seq": {"PG": 3}}),
    )
    .await;
    let mut got = Vec::new();
    let mut messages = 0;
    while got.last().copied() != Some(500) {
        let m = client.recv().await;
        assert_eq!(m["type"], "snapshot", "{m}");
        assert_eq!(m["gap"], false, "nothing was lost: no gap on any page");
        got.extend(seqs(&m["ticks"]));
        messages += 1;
    }
    assert_eq!(got, (4..=500).collect::<Vec<_>>());
    assert!(
        messages > 10,
        "a 497-tick backlog with 40-tick pages comes in many messages"
    );
    ingest(&mut producer, &[tick("PG", 2.0, 1.0)]).await;
    assert_eq!(
        client.recv().await["seq"],
        501,
        "live follows the last page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_caught_across_a_restart() {
    let server = TestServer::start().await;
    let mut producer = server.producer().await;
    let mut with_id = tick("DUPR", 5.0, 1.0);
    with_id["id"] = json!("trade-1");
    let plain = tick("DUPR", 6.0, 2.0);
    ingest(&mut producer, &[with_id.clone(), plain.clone()]).await;
    producer.close().await;
    let dir = server.stop().await;
    let server = TestServer::start_in(test_config(), dir).await;
    let mut producer = server.producer().await;
    let ack = ingest(&mut producer, &[with_id, plain, tick("DUPR", 7.0, 3.0)]).await;
    assert_eq!(
        (ack["accepted"].as_u64(), ack["duplicates"].as_u64()),
        (Some(1), Some(2)),
        "{ack}"
    );
    let (_, h) = server.get_json("/api/history/DUPR").await;
    assert_eq!(seqs(&h["ticks"]), [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_store_snapshots_wait_for_read_slots_and_all_complete() {
    let mut config = test_config();
    config.dispatch.recent_ticks = 5;
    config.dispatch.max_store_reads = 1;
    let server = TestServer::start_with(config).await;
    let mut producer = server.producer().await;
    let names: Vec<String> = (0..20).map(|i| format!("Q{i}")).collect();
    for name in &names {
        let ticks: Vec<Value> = (0..50)
            .map(|i| tick(name, 1.0 + f64::from(i), 1.0))
            .collect();
        ingest(&mut producer, &ticks).await;
    }
    let (mut client, _) = server.client().await;
    let since: serde_json::Map<String, Value> =
        names.iter().map(|n| (n.clone(), json!(10))).collect();
    subscribe(
        &mut client,
        1,
        json!({"symbols": names, "since_seq": since}),
    )
    .await;
    let mut done = std::collections::HashMap::new();
    while done.len() < names.len() {
        let m = client.recv().await;
        assert_eq!(m["type"], "snapshot", "{m}");
        assert_eq!(m["gap"], false);
        let got = seqs(&m["ticks"]);
        assert_eq!(got, (11..=50).collect::<Vec<_>>(), "{}", m["symbol"]);
        done.insert(m["symbol"].as_str().unwrap().to_owned(), got.len());
    }
}

//! A new user's first hour (issue 14): the small things that cost a newcomer time or trust,
//! each checked the way the user meets it: the real binary's log on a fresh store (no
//! `clean=false` that reads like crash recovery; one line saying auth is off), replies that put
//! `type` first as the docs do, a `POST /api/ticks` body that is not JSON answered in words, a
//! `ts` in seconds answered with a hint at the unit, and `tickfan import` re-runs whose summary
//! is the last line and that do not call rejected rows "imported".

mod common;

use std::io::{Read, Write};
use std::process::Stdio;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Runs `tickfan serve` on a data dir until it answers, then SIGTERMs it and returns everything
/// it logged (stderr).
fn serve_log(dir: &std::path::Path) -> String {
    let mut server = Binary::spawn(dir, &[], Stdio::piped());
    let mut stderr = server.child.stderr.take().unwrap();
    // SIGTERM once the server answers (its signal handler is installed by then).
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let mut answer = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(&server.addr) {
            let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let _ = c.read_to_string(&mut answer);
        }
        if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no healthy server");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let code = server.terminate();
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert_eq!(code, Some(0), "{log}");
    log
}

#[test]
fn first_start_logs_a_new_store_and_that_auth_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let first = serve_log(dir.path());
    assert!(
        !first.contains("clean=false"),
        "a new store must not read like crash recovery:\n{first}"
    );
    assert!(first.contains("new store"), "{first}");
    assert_eq!(
        first.matches("auth is off").count(),
        1,
        "one line saying auth is off:\n{first}"
    );
    let second = serve_log(dir.path());
    assert!(second.contains("clean stop"), "{second}");
}

/// The raw text of the next message that is not a heartbeat.
async fn next_text(ws: &mut Ws) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Message::Text(t) = ws.next_by(deadline).await {
            if !t.as_str().starts_with(r#"{"type":"heartbeat""#) {
                return t.as_str().to_owned();
            }
        }
    }
}

#[tokio::test]
async fn replies_put_type_first() {
    let server = TestServer::start().await;
    let mut ws = Ws::connect(&server.ws_url("/ws")).await;
    let welcome = next_text(&mut ws).await;
    assert!(welcome.starts_with(r#"{"type":"welcome""#), "{welcome}");
    for (req, ty) in [
        (json!({"op":"ping","id":1}), "pong"),
        (json!({"op":"subscribe","id":2,"symbols":["AAPL"]}), "ack"),
        (json!({"op":"configure","id":3,"mode":"batch"}), "ack"),
        (json!({"op":"symbols","id":4}), "symbols"),
        (json!({"op":"nonsense","id":5}), "error"),
    ] {
        ws.send_json(&req).await;
        let text = next_text(&mut ws).await;
        assert!(
            text.starts_with(&format!(r#"{{"type":"{ty}""#)),
            "{req} -> {text}"
        );
    }
    let mut producer = server.producer().await;
    producer
        .send_json(&json!({"symbol":"AAPL","ts":now_ms(),"price":1.0,"volume":1.0}))
        .await;
    let ack = next_text(&mut producer).await;
    assert!(ack.starts_with(r#"{"type":"ingest_ack""#), "{ack}");
}

#[tokio::test]
async fn post_of_a_body_that_is_not_json_says_what_was_expected() {
    let server = TestServer::start().await;
    let (status, _, ack) = server.post_ticks("hello").await;
    assert_eq!(status, 200, "{ack}");
    let msg = ack["rejected"][0]["message"].as_str().unwrap_or_default();
    assert_eq!(ack["rejected"][0]["code"], "bad_json", "{ack}");
    assert!(!msg.contains("Expected"), "parser jargon: {msg}");
    assert!(msg.contains("expected a tick object"), "{msg}");
}

#[tokio::test]
async fn ts_in_seconds_gets_a_hint_at_the_unit() {
    let server = TestServer::start().await;
    let secs = now_ms() / 1000;
    let (_, _, ack) = server
        .post_ticks(json!({"symbol":"ACME","ts":secs,"price":1.0,"volume":1.0}).to_string())
        .await;
    assert_eq!(ack["rejected"][0]["code"], "stale_timestamp", "{ack}");
    let msg = ack["rejected"][0]["message"].as_str().unwrap();
    assert!(msg.contains("ts looks like seconds"), "{msg}");
    // A merely old ts in ms gets no such hint.
    let old = now_ms() - 3 * 86_400_000;
    let (_, _, ack) = server
        .post_ticks(json!({"symbol":"ACME","ts":old,"price":1.0,"volume":1.0}).to_string())
        .await;
    let msg = ack["rejected"][0]["message"].as_str().unwrap();
    assert!(!msg.contains("seconds"), "{msg}");
}

#[test]
fn import_rerun_keeps_the_summary_last_and_does_not_call_rejects_imported() {
    let dir = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("ticks.ndjson");
    let now = now_ms();
    let lines: Vec<String> = (0..3)
        .map(|i| json!({"symbol":"ACME","ts":now + i,"price":-1.0,"volume":1.0}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, out) = import(dir.path(), &[&file]);
    assert!(ok, "{out}");
    let (ok, out) = import(dir.path(), &[&file]);
    assert!(ok, "{out}");
    let printed: Vec<&str> = out
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("INFO") && !l.contains("WARN"))
        .collect();
    let last = printed
        .iter()
        .rev()
        .find(|l| l.starts_with("imported ") || l.starts_with("resumed"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        last.starts_with("imported 0 accepted, 0 duplicates, 0 rejected"),
        "the summary is the last line: {out}"
    );
    assert!(out.contains("skipped 3 rows"), "{out}");
    assert!(
        !out.contains("imported by an earlier run"),
        "the earlier run rejected those rows: {out}"
    );
}

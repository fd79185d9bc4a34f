//! Graceful shutdown: clients are closed with 1001, producers get acks for what they sent, and
//! `run` returns. Also the binary itself: `listening on ...` on stdout and exit 0 on SIGTERM.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_1001_and_returns() {
    let mut server = TestServer::start().await;
    let (mut a, _) = server.client().await;
    let (mut b, _) = server.client().await;
    subscribe(&mut a, 1, json!({"symbols": ["X"]})).await;
    let mut producer = server.producer().await;
    let ack = ingest(&mut producer, &[tick("X", 1.0, 1.0)]).await;
    assert_eq!(ack["accepted"], 1);
    server.shutdown().await;
    let (seen_a, end_a) = a.until_closed().await;
    let (_, end_b) = b.until_closed().await;
    assert_eq!(end_a, Ended::Close(1001));
    assert_eq!(end_b, Ended::Close(1001));
    assert!(seen_a.iter().any(|m| m["type"] == "tick" && m["seq"] == 1));
    let (_, end_p) = producer.until_closed().await;
    assert_eq!(end_p, Ended::Close(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_prints_listening_line_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Binary::start(dir.path());
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0, "the real port is printed");
    let health: serde_json::Value = reqwest::get(format!("http://{}/health", server.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let mut client = Ws::connect(&format!("ws://{}/ws", server.addr)).await;
    assert_eq!(client.recv().await["type"], "welcome");
    assert_eq!(server.terminate(), Some(0));
    let (_, ended) = client.until_closed().await;
    assert_eq!(ended, Ended::Close(1001));
}

#[test]
fn unknown_config_key_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[limits]\nmax_symbolz = 3\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tickfan"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_symbolz"), "{err}");
}

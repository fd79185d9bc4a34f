//! TLS on the listener (`server.tls_cert_file`/`tls_key_file`): `wss://` and `https://` end to
//! end with a CA and leaf made here with rcgen, a plain-text client refused cleanly, a stalled
//! handshake cut off, many ticks and the slow-consumer rule through rustls, idle TLS
//! connections kept alive without parking, and a certificate reload on SIGHUP in the real
//! binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::tls::*;
use common::*;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_and_https_end_to_end() {
    let pki = Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();

    let (status, body) = https(&pki, &addr, "GET", "/health", "").await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok", "{health}");
    for page in ["/", "/tickfan.js", "/api/symbols"] {
        let (status, body) = https(&pki, &addr, "GET", page, "").await;
        assert_eq!(status, 200, "{page}: {body}");
    }

    let mut client = wss_client(&pki, &addr).await;
    subscribe(&mut client, 1, json!({"symbols": ["TLS"]})).await;
    // A tick from a wss producer...
    let mut producer = wss(&pki, &addr, "/ingest").await;
    let ack = ingest(&mut producer, &[tick("TLS", 1.5, 2.0)]).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
    let got = client.recv_until(|m| m["type"] == "tick").await;
    let t = got.last().unwrap();
    assert_eq!(
        (t["symbol"].as_str(), t["price"].as_f64()),
        (Some("TLS"), Some(1.5))
    );
    // ...and one posted over https.
    let body = serde_json::to_string(&tick("TLS", 2.5, 1.0)).unwrap();
    let (status, ack) = https(&pki, &addr, "POST", "/api/ticks", &body).await;
    assert_eq!(status, 200, "{ack}");
    let got = client.recv_until(|m| m["type"] == "tick").await;
    assert_eq!(got.last().unwrap()["price"].as_f64(), Some(2.5));
    assert!(metric(&pki, &addr, "tickfan_tls_handshakes_total").await >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_is_refused_and_the_server_keeps_serving() {
    let pki = Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();

    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    // A clean end (FIN), not a reset: a reset (closing with the request unread) may reach a
    // client over a real network before the 400 does, and then the 400 is lost.
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut response))
        .await
        .expect("the plain-text connection was not closed")
        .expect("the plain-text connection was reset, not closed");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("\"tls_required\""), "{text}");

    // A plain ws:// client is refused too.
    let plain = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    assert!(
        plain.is_err(),
        "a ws:// upgrade succeeded on the TLS listener"
    );

    let (status, _) = https(&pki, &addr, "GET", "/health", "").await;
    assert_eq!(status, 200);
    let _client = wss_client(&pki, &addr).await;
    let plaintext = r#"tickfan_tls_handshake_failures_total{reason="plaintext"}"#;
    assert_eq!(metric(&pki, &addr, plaintext).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_off() {
    let pki = Pki::new();
    let mut config = pki.config();
    config.limits.header_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let addr = server.addr.to_string();

    // One sends nothing at all; one starts a TLS record and stops.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    for tcp in [&mut silent, &mut stalled] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
            .await
            .expect("a stalled handshake was not cut off");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    let timeouts = r#"tickfan_tls_handshake_failures_total{reason="timeout"}"#;
    assert_eq!(metric(&pki, &addr, timeouts).await, 2.0);
    // A client that goes through the handshake in time is served.
    let (status, _) = https(&pki, &addr, "GET", "/health", "").await;
    assert_eq!(status, 200);
}

/// Many ticks through rustls to a reading client arrive whole and in order, while a client
/// that stops reading is still closed by the slow-consumer rule (its backlog waits in the
/// outbound link, not in rustls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_ticks_arrive_in_order_and_a_slow_tls_client_is_closed() {
    let pki = Pki::new();
    let mut config = pki.config();
    config.limits.outbound_buffer_bytes = 64 * 1024;
    let server = TestServer::start_with(config).await;
    let addr = server.addr.to_string();
    let mut slow = wss_client(&pki, &addr).await;
    subscribe(&mut slow, 1, json!({"symbols": ["SLOW"]})).await;
    let mut fast = wss_client(&pki, &addr).await;
    subscribe(&mut fast, 1, json!({"symbols": ["SLOW"]})).await;

    let mut producer = wss(&pki, &addr, "/ingest").await;
    flood_while_fast_reads(&mut producer, fast, 100, 200).await;
    assert_closed_as_slow(&mut slow, 100 * 200).await;
}

/// TLS connections do not park (their rustls state stays on the runtime): an idle one keeps
/// getting heartbeats and ticks long after `park_after_ms`, and the sweep does not keep asking
/// it to park (each request would wake its task for nothing, every sweep, forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_clients_stay_live_without_parking() {
    let pki = Pki::new();
    let mut config = pki.config();
    // Sweeps every 200 ms (the auth timeout's resolution; these clients need no token), a
    // heartbeat every 5th sweep, and quiet enough to park after one sweep.
    config.auth.auth_timeout_ms = 200;
    config.server.heartbeat_ms = 1_000;
    config.server.park_after_ms = 100;
    let server = TestServer::start_with(config).await;
    let addr = server.addr.to_string();
    let mut client = wss_client(&pki, &addr).await;
    subscribe(&mut client, 1, json!({"symbols": ["IDLE"]})).await;
    // Idle through many sweeps (the sweeps between two heartbeats see nothing happen).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = client.next_by(deadline).await {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            heartbeats += u32::from(v["type"] == "heartbeat");
        }
    }
    let body = serde_json::to_string(&tick("IDLE", 3.0, 1.0)).unwrap();
    let (status, _) = https(&pki, &addr, "POST", "/api/ticks", &body).await;
    assert_eq!(status, 200);
    let got = client.recv_until(|m| m["type"] == "tick").await;
    assert_eq!(got.last().unwrap()["symbol"], "IDLE");
    assert_eq!(
        metric(&pki, &addr, "tickfan_connection_parks_total").await,
        0.0
    );
    assert_eq!(
        metric(&pki, &addr, "tickfan_park_requests_total").await,
        0.0,
        "the sweep asked a TLS connection to park"
    );
}

#[test]
fn cert_and_key_go_together() {
    let mut config = test_config();
    config.server.tls_cert_file = Some("cert.pem".into());
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("tls_cert_file"), "{err}");
    config.server.tls_cert_file = None;
    config.server.tls_key_file = Some("key.pem".into());
    assert!(config.validate().is_err());
}

/// The served certificate, from a new handshake.
async fn served_certificate(pki: &Pki, addr: &str) -> CertificateDer<'static> {
    let tls = tls_connect(pki, addr).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn write_config(dir: &Path, pki: &Pki) -> PathBuf {
    // Binary::spawn adds --listen 127.0.0.1:0, --no-simulator and --data-dir.
    let path = dir.join("tickfan.toml");
    let text = format!(
        "[server]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.cert_file(),
        pki.key_file(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// SIGHUP reloads the certificate in the real binary: new handshakes get the new one, an open
/// connection keeps working, and a file that does not load keeps the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pki);
    let config = config.to_str().unwrap();
    let binary = Binary::spawn(
        dir.path(),
        &["--config", config],
        std::process::Stdio::null(),
    );
    let addr = binary.addr.clone();
    let hangup = || {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(binary.child.id() as i32, libc::SIGHUP) };
    };

    let cert_a = std::fs::read(pki.cert_file()).unwrap();
    let first = served_certificate(&pki, &addr).await;
    assert!(String::from_utf8_lossy(&cert_a).contains("BEGIN CERTIFICATE"));
    let mut client = wss_client(&pki, &addr).await;
    subscribe(&mut client, 1, json!({"symbols": ["HUP"]})).await;

    let cert_b = pki.write_leaf("leaf B");
    assert_ne!(first, cert_b);
    hangup();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while served_certificate(&pki, &addr).await != cert_b {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cert B never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection made under cert A still works.
    let ping = client.request(json!({"op": "ping", "id": 2})).await;
    assert_eq!(ping["type"], "pong", "{ping}");
    let ok = r#"tickfan_tls_cert_reloads_total{result="ok"}"#;
    assert_eq!(metric(&pki, &addr, ok).await, 1.0);

    // A renewal that keeps the key: only the certificate file changes.
    let cert_c = pki.reissue_leaf("leaf C, key B");
    hangup();
    while served_certificate(&pki, &addr).await != cert_c {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cert C never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&pki, &addr, ok).await, 2.0);

    // A broken file: the reload fails, is counted, and cert B stays.
    std::fs::write(pki.key_file(), "not a key").unwrap();
    hangup();
    let failed = r#"tickfan_tls_cert_reloads_total{result="failed"}"#;
    while metric(&pki, &addr, failed).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "failed reload not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served_certificate(&pki, &addr).await, cert_c);
    let ping = client.request(json!({"op": "ping", "id": 3})).await;
    assert_eq!(ping["type"], "pong", "{ping}");

    // An expired certificate and one not valid yet (key matching) are refused too.
    for (n, (from, to)) in [((2000, 1, 1), (2001, 1, 1)), ((2999, 1, 1), (3000, 1, 1))]
        .into_iter()
        .enumerate()
    {
        pki.write_leaf_with("out of its validity", |p| {
            p.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
            p.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        });
        hangup();
        while metric(&pki, &addr, failed).await < 2.0 + n as f64 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "reload of a certificate out of its validity not refused"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(served_certificate(&pki, &addr).await, cert_c);
    }
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    tickfan::transport::ws::frame::client_frame(true, opcode, payload)
}

/// A client that writes the upgrade request and its first frames in one flight, before it
/// reads the 101: hyper takes only part of the TLS record's plaintext, the rest is already
/// decrypted inside rustls when the upgrade takes the stream apart, and no readiness event
/// will announce it. The subscribe at its end must still be answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_and_requests_in_one_flight_are_all_answered() {
    let pki = Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();
    // ~9 KiB of pings (more than hyper's first read), then the subscribe, all in one record.
    let mut behind = Vec::new();
    for i in 0..70u8 {
        behind.extend(client_frame(0x9, &[i; 125]));
    }
    let subscribe = json!({"op": "subscribe", "id": 7, "symbols": ["FLIGHT"]}).to_string();
    behind.extend(client_frame(0x1, subscribe.as_bytes()));
    assert!(behind.len() > 8_192 && behind.len() < 16_000);
    let mut raw = RawTls::open(&pki, &addr, "/ws", &behind).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let ack = raw.text().await;
    assert_eq!(ack["id"], 7, "{ack}");
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// A producer that ends its side of the TLS connection (close_notify, or a bare FIN) after
/// its last batch still gets that batch's ack, and then our close_notify: a clean end, not a
/// truncation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_half_close_over_tls_still_gets_its_acks() {
    let pki = Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();
    for (i, with_close_notify) in [true, false].into_iter().enumerate() {
        let batch = json!([tick("HALF", 1.0 + i as f64, 1.0)]).to_string();
        let mut raw = RawTls::open(&pki, &addr, "/ingest", &[]).await;
        raw.tls
            .write_all(&client_frame(0x1, batch.as_bytes()))
            .await
            .unwrap();
        if with_close_notify {
            // close_notify, then FIN.
            raw.tls.shutdown().await.unwrap();
        } else {
            raw.tls.flush().await.unwrap();
            raw.tls.get_mut().0.shutdown().await.unwrap();
        }
        let ack = raw.text().await;
        assert_eq!(ack["type"], "ingest_ack", "{ack}");
        assert_eq!(ack["accepted"], 1, "{ack}");
        let end = raw.frame().await;
        assert!(
            matches!(end, Ok(None)),
            "close_notify={with_close_notify}: {end:?}"
        );
    }
    // Acked means stored.
    let (status, body) = https(&pki, &addr, "GET", "/api/history/HALF?limit=10", "").await;
    assert_eq!(status, 200, "{body}");
    let history: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        history["ticks"].as_array().map(Vec::len),
        Some(2),
        "{history}"
    );
}

/// A TLS error after the handshake (here a record that does not decrypt) ends the connection
/// and is counted, on `/ws` and on `/ingest`; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_record_after_the_upgrade_is_counted() {
    let pki = Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();
    let errors = "tickfan_tls_connection_errors_total";
    assert_eq!(metric(&pki, &addr, errors).await, 0.0);
    for (n, path) in [(1.0, "/ws"), (2.0, "/ingest")] {
        let mut raw = RawTls::open(&pki, &addr, path, &[]).await;
        if path == "/ws" {
            assert_eq!(raw.text().await["type"], "welcome");
        }
        // An application-data record with 32 bytes that are not a valid ciphertext.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        record.extend([0xAB; 32]);
        raw.tls.get_mut().0.write_all(&record).await.unwrap();
        // The server answers with an alert and closes: the stream ends in an error.
        loop {
            match raw.frame().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("{path}: a clean end after a broken record"),
                Err(_) => break,
            }
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while metric(&pki, &addr, errors).await < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path}: not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (status, _) = https(&pki, &addr, "GET", "/health", "").await;
    assert_eq!(status, 200);
}

/// Without TLS, SIGHUP is harmless: it is logged as having nothing to reload and the process
/// keeps serving (its default action would end the process, e.g. on a `systemctl reload`).
#[test]
fn sighup_without_tls_keeps_the_process_running() {
    use std::io::{BufRead, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let mut binary = Binary::spawn(dir.path(), &[], std::process::Stdio::piped());
    let stderr = binary.child.stderr.take().unwrap();
    let (lines, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let health = |addr: &str| {
        let mut answer = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(addr) {
            let _ = c.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let _ = c.read_to_string(&mut answer);
        }
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    };
    // Serving means the handler is installed (it is, before the listener serves).
    let deadline = std::time::Instant::now() + DEADLINE;
    while !health(&binary.addr) {
        assert!(std::time::Instant::now() < deadline, "no healthy server");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(binary.child.id() as i32, libc::SIGHUP) };
    loop {
        let wait = deadline.saturating_duration_since(std::time::Instant::now());
        let line = log
            .recv_timeout(wait)
            .expect("no 'nothing to reload' line: did SIGHUP end the process?");
        if line.contains("nothing to reload") {
            break;
        }
    }
    assert!(health(&binary.addr), "not serving after SIGHUP");
    assert_eq!(binary.terminate(), Some(0));
}

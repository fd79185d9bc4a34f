//! Exhaustion without credentials, over real sockets: idle TCP connects are capped per address
//! and in all at accept (before any request is read), so a flood from one address cannot take
//! the descriptors other clients need; request heads and bodies have deadlines, so a stalled
//! POST is answered 408 and its memory freed instead of being held forever. Other source
//! addresses are 127.0.0.2 and 127.0.0.3 (Linux routes all of 127/8 to `lo`); small caps and
//! short deadlines come from the test config so each test opens few sockets and ends quickly.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SECOND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const THIRD: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A TCP connection to the server from source address `from`.
async fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    tokio::time::timeout(DEADLINE, socket.connect(to))
        .await
        .expect("connect timed out")
        .expect("connect failed")
}

/// Reads until the server closes the connection (EOF or reset), within the deadline; returns
/// what it sent before.
async fn until_server_closes(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf))
            .await
            .expect("the server did not close the connection in time")
        {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&got).into_owned(),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a bodiless GET on an open connection and returns the status line's code.
async fn get_status(tcp: &mut TcpStream, path: &str) -> u16 {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
        .await
        .expect("no response in time")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
}

/// An HTTP client whose connections come from `from`.
fn http_from(from: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(from))
        .build()
        .unwrap()
}

/// `tickfan_limit_hits_total{limit=...}` scraped from `from`, polled until it reaches `want`
/// (scrapes may be refused while a cap is full, and counting races the refusal).
async fn wait_hits_from(server: &TestServer, from: Ipv4Addr, limit: &str, want: f64) -> f64 {
    let http = http_from(from);
    let series = format!("tickfan_limit_hits_total{{limit=\"{limit}\"}} ");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last = None;
    loop {
        if let Ok(resp) = http.get(server.http("/metrics")).send().await {
            if let Ok(text) = resp.text().await {
                let v = text
                    .lines()
                    .find_map(|l| l.strip_prefix(&series)?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                if v >= want {
                    return v;
                }
                last = Some(v);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{limit} hits stayed at {last:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `/ws` client connected from `from`, after its welcome.
async fn ws_from(server: &TestServer, from: Ipv4Addr) -> Ws {
    let tcp = tcp_from(from, server.addr).await;
    let (inner, _) = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::client_async(
            server.ws_url("/ws"),
            tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        ),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    let mut ws = Ws { inner };
    assert_eq!(ws.recv().await["type"], "welcome");
    ws
}

// ---------------------------------------------------------------------------------------------
// caps at accept

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connects_from_one_address_are_capped_at_accept_and_others_still_get_in() {
    let mut config = test_config();
    config.limits.max_http_connections_per_ip = 4;
    let server = TestServer::start_with(config).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(FIRST, server.addr).await);
    }
    // Beyond the cap: closed at once, with a 503 and before any request was sent.
    for _ in 0..6 {
        let mut extra = tcp_from(FIRST, server.addr).await;
        let said = until_server_closes(&mut extra).await;
        assert!(
            said.is_empty() || said.starts_with("HTTP/1.1 503"),
            "unexpected answer: {said:?}"
        );
        if !said.is_empty() {
            assert!(said.contains("too_many_connections"), "{said}");
        }
    }
    // Another address gets in: a WebSocket client subscribes and gets its ack.
    let mut client = ws_from(&server, SECOND).await;
    let ack = subscribe(&mut client, 1, json!({"symbols": ["XA"]})).await;
    assert_eq!(ack["symbols"], json!(["XA"]));
    // The admitted idle connections are real HTTP connections.
    assert_eq!(get_status(&mut held[0], "/health").await, 200);
    assert_eq!(
        wait_hits_from(&server, THIRD, "max_http_connections_per_ip", 6.0).await,
        6.0
    );
    // Freed slots admit the first address again.
    drop(held);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut tcp = tcp_from(FIRST, server.addr).await;
        let req = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
        if tcp.write_all(req).await.is_ok() {
            let said = until_server_closes_or_answers(&mut tcp).await;
            if said.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads the first chunk of an answer (or the close).
async fn until_server_closes_or_answers(tcp: &mut TcpStream) -> String {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(DEADLINE, tcp.read(&mut buf))
        .await
        .expect("no answer in time")
    {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_tcp_cap_counts_websockets_and_refuses_at_accept() {
    let mut config = test_config();
    config.limits.max_tcp_connections = 3;
    let server = TestServer::start_with(config).await;
    let first = ws_from(&server, FIRST).await;
    let _second = ws_from(&server, FIRST).await;
    let idle = tcp_from(SECOND, server.addr).await;
    // Three sockets open (two upgraded, one idle HTTP): the fourth is refused at accept, from
    // any address.
    for from in [THIRD, SECOND, FIRST] {
        let mut extra = tcp_from(from, server.addr).await;
        let said = until_server_closes(&mut extra).await;
        assert!(
            said.is_empty() || said.starts_with("HTTP/1.1 503"),
            "unexpected answer: {said:?}"
        );
    }
    // An upgraded connection that ends frees its socket's place.
    first.close().await;
    drop(idle);
    // At least the three above (a scrape that raced the close may have been refused too).
    wait_hits_from(&server, THIRD, "max_tcp_connections", 3.0).await;
    let mut again = ws_from(&server, THIRD).await;
    let ack = subscribe(&mut again, 1, json!({"symbols": ["XB"]})).await;
    assert_eq!(ack["symbols"], json!(["XB"]));
}

// ---------------------------------------------------------------------------------------------
// deadlines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_request_head_is_closed_at_the_header_timeout() {
    let mut config = test_config();
    config.limits.header_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let mut silent = tcp_from(FIRST, server.addr).await;
    let mut partial = tcp_from(FIRST, server.addr).await;
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    assert_eq!(until_server_closes(&mut silent).await, "");
    assert_eq!(until_server_closes(&mut partial).await, "");
    assert_eq!(
        wait_hits_from(&server, SECOND, "header_timeout", 2.0).await,
        2.0
    );
}

/// Sends a POST head declaring `declared` body bytes plus the first `sent` of them.
async fn stalled_post(server: &TestServer, declared: usize, sent: usize) -> TcpStream {
    let mut tcp = tcp_from(FIRST, server.addr).await;
    let head = format!("POST /api/ticks HTTP/1.1\r\nHost: t\r\nContent-Length: {declared}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b' '; sent]).await.unwrap();
    tcp
}

/// Asserts a 408 `request_timeout` answer followed by the server closing the connection.
async fn assert_408_and_closed(tcp: &mut TcpStream) {
    let said = until_server_closes(tcp).await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said:?}");
    assert!(said.contains("\"code\":\"request_timeout\""), "{said}");
    assert!(said.contains("limits.body_timeout_ms"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_at_the_body_deadline_and_the_server_keeps_working() {
    let mut config = test_config();
    config.limits.body_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let mut stalled = stalled_post(&server, 1_000_000, 200_000).await;
    assert_408_and_closed(&mut stalled).await;
    assert_eq!(
        wait_hits_from(&server, SECOND, "body_timeout", 1.0).await,
        1.0
    );
    // A complete body is still accepted.
    let (status, _, ack) = server.post_ticks(tick("XC", 1.0, 1.0).to_string()).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["accepted"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripping_body_cannot_stretch_the_body_deadline() {
    let mut config = test_config();
    config.limits.body_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let mut drip = stalled_post(&server, 1_000_000, 10).await;
    // One byte every 20 ms, for as long as the server keeps reading: the deadline is a total.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while drip.write_all(b" ").await.is_ok() {
        let mut buf = [0u8; 1];
        // An answer (the 408) means the server gave up on the body.
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(20), drip.peek(&mut buf)).await
        {
            if n > 0 {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dripping body was never cut off"
        );
    }
    assert_408_and_closed(&mut drip).await;
}

//! The `/ws` WebSocket transport seen from a raw TCP client: the upgrade checks, a frame sent
//! in the same packet as the upgrade request, fragmented requests, and the close codes for
//! broken framing (1002) and text that is not UTF-8 (1007). A library client would not send
//! most of these, which is why they are written byte by byte here.

mod common;

use std::time::Duration;

use common::{test_config, TestServer};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DEADLINE: Duration = Duration::from_secs(10);

fn upgrade_request(extra_headers: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    )
}

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [9u8, 8, 7, 6];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    assert!(payload.len() < 126);
    out.push(0x80 | payload.len() as u8);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    out
}

/// A raw connection after its 101, reading the server's (unmasked) frames.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

enum ServerFrame {
    Text(Value),
    Ping,
    Pong(Vec<u8>),
    Close(u16),
}

impl Raw {
    /// Sends the upgrade request plus `behind` in one write, and checks the 101.
    async fn open(server: &TestServer, behind: &[u8]) -> Self {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut first = upgrade_request("").into_bytes();
        first.extend_from_slice(behind);
        tcp.write_all(&first).await.unwrap();
        let mut raw = Self {
            tcp,
            buf: Vec::new(),
        };
        let head = raw.http_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains(&"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_lowercase()),
            "{head}"
        );
        raw
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, self.tcp.read(&mut chunk))
            .await
            .expect("server went quiet")
            .unwrap();
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                let head = head.replacen("http/1.1", "HTTP/1.1", 1);
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(self.fill().await, "closed before the response head");
        }
    }

    async fn next(&mut self) -> Option<ServerFrame> {
        loop {
            if self.buf.len() >= 2 {
                let (len, start) = match self.buf[1] {
                    126 if self.buf.len() >= 4 => (
                        usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                        4,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && self.buf.len() >= start + len {
                    assert_eq!(self.buf[1] & 0x80, 0, "server frames are unmasked");
                    let opcode = self.buf[0] & 0x0F;
                    let payload: Vec<u8> = self.buf[start..start + len].to_vec();
                    self.buf.drain(..start + len);
                    return Some(match opcode {
                        1 => ServerFrame::Text(serde_json::from_slice(&payload).unwrap()),
                        9 => ServerFrame::Ping,
                        10 => ServerFrame::Pong(payload),
                        8 => ServerFrame::Close(u16::from_be_bytes([payload[0], payload[1]])),
                        other => panic!("unexpected opcode {other}"),
                    });
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn text(&mut self) -> Value {
        loop {
            match self.next().await {
                Some(ServerFrame::Text(v)) if v["type"] != "heartbeat" => return v,
                Some(ServerFrame::Text(_) | ServerFrame::Ping | ServerFrame::Pong(_)) => {}
                Some(ServerFrame::Close(code)) => panic!("closed {code} while waiting for text"),
                None => panic!("EOF while waiting for text"),
            }
        }
    }

    async fn close_code(&mut self) -> u16 {
        loop {
            match self.next().await {
                Some(ServerFrame::Close(code)) => return code,
                Some(_) => {}
                None => panic!("EOF without a close frame"),
            }
        }
    }
}

#[tokio::test]
async fn a_request_sent_with_the_upgrade_is_answered() {
    let server = TestServer::start_with(test_config()).await;
    let mut raw = Raw::open(&server, &frame(true, 1, br#"{"op":"ping","id":7}"#)).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let pong = raw.text().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_u64()),
        (Some("pong"), Some(7))
    );
}

#[tokio::test]
async fn fragmented_requests_are_reassembled_around_control_frames() {
    let server = TestServer::start_with(test_config()).await;
    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let mut bytes = frame(false, 1, br#"{"op":"subscr"#);
    bytes.extend(frame(true, 9, b"are you there"));
    bytes.extend(frame(false, 0, br#"ibe","id":3,"#));
    bytes.extend(frame(true, 0, br#""symbols":["AAPL"]}"#));
    raw.tcp.write_all(&bytes).await.unwrap();
    // The ping in the middle is answered with its payload, and the reassembled subscribe
    // gets its ack.
    let mut pong = None;
    let ack = loop {
        match raw.next().await.expect("EOF") {
            ServerFrame::Pong(payload) => pong = Some(payload),
            ServerFrame::Text(v) if v["type"] == "ack" => break v,
            _ => {}
        }
    };
    assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(3))
    );
    assert_eq!(ack["symbols"][0], "AAPL");
}

#[tokio::test]
async fn broken_framing_closes_1002_and_bad_utf8_closes_1007() {
    let server = TestServer::start_with(test_config()).await;

    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let mut unmasked = frame(true, 1, b"{}");
    unmasked[1] &= 0x7F;
    raw.tcp.write_all(&unmasked[..2]).await.unwrap();
    assert_eq!(raw.close_code().await, 1002);

    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    raw.tcp.write_all(&frame(true, 0, b"x")).await.unwrap();
    assert_eq!(
        raw.close_code().await,
        1002,
        "continuation without a message"
    );

    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    raw.tcp
        .write_all(&frame(true, 1, &[b'"', 0xC3, 0x28, b'"']))
        .await
        .unwrap();
    assert_eq!(raw.close_code().await, 1007);

    // The server itself is unaffected.
    let (mut ws, _) = server.client().await;
    let pong = ws.request(serde_json::json!({"op": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
}

#[tokio::test]
async fn bad_upgrade_requests_are_refused_with_a_reason() {
    let server = TestServer::start_with(test_config()).await;
    let cases = [
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            "426",
        ),
        (
            "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n",
            "400",
        ),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ];
    for (request, status) in cases {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        let head = raw.http_head().await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} -> {head}"
        );
    }
}

#[tokio::test]
async fn the_clients_close_code_is_echoed_and_reserved_codes_are_refused() {
    let server = TestServer::start_with(test_config()).await;
    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"done");
    raw.tcp.write_all(&frame(true, 8, &payload)).await.unwrap();
    assert_eq!(raw.close_code().await, 4321);

    // 1005 ("no status") may never be sent on the wire.
    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    raw.tcp
        .write_all(&frame(true, 8, &1005u16.to_be_bytes()))
        .await
        .unwrap();
    assert_eq!(raw.close_code().await, 1002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_reads_a_request_split_across_packets() {
    let mut config = test_config();
    config.server.park_after_ms = 100;
    let server = TestServer::start_with(config).await;
    let mut raw = Raw::open(&server, &[]).await;
    assert_eq!(raw.text().await["type"], "welcome");
    let parked = |n: u64| move |s: &Value| s["parking"]["parked"] == n;
    let before = server.wait_stats("the connection to park", parked(1)).await;

    // A pong alone is read where the connection waits, without resuming it.
    raw.tcp.write_all(&frame(true, 10, b"")).await.unwrap();
    let after_pong = server
        .wait_stats("the pong to be read", |s| {
            s["parking"]["pongs"].as_u64() > before["parking"]["pongs"].as_u64()
        })
        .await;
    assert_eq!(
        after_pong["parking"]["unparks"],
        before["parking"]["unparks"]
    );
    assert_eq!(after_pong["parking"]["parked"], 1);

    // Half a request resumes it, and half a frame keeps it from parking again: two sweeps
    // (one a second) ask it to, and it must decline. A fixed period, because what is checked
    // is that nothing happens during it.
    let request = frame(true, 1, br#"{"op":"ping","id":41}"#);
    raw.tcp.write_all(&request[..5]).await.unwrap();
    let resumed = server
        .wait_stats("the half request to resume it", |s| {
            s["parking"]["unparks"].as_u64() > before["parking"]["unparks"].as_u64()
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (_, held) = server.get_json("/api/stats").await;
    assert_eq!(held["parking"]["parked"], 0);
    assert_eq!(held["parking"]["parks"], resumed["parking"]["parks"]);
    raw.tcp.write_all(&request[5..]).await.unwrap();
    let pong = raw.text().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_u64()),
        (Some("pong"), Some(41))
    );
    // Quiet again: parked again, and still answering.
    server
        .wait_stats("the connection to park again", parked(1))
        .await;
    raw.tcp
        .write_all(&frame(true, 1, br#"{"op":"ping","id":42}"#))
        .await
        .unwrap();
    assert_eq!(raw.text().await["id"], 42);
}

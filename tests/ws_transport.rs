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
    upgrade_request_to("/ws", extra_headers)
}

fn upgrade_request_to(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra_headers}\r\n"
    )
}

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    tickfan::transport::ws::frame::client_frame(fin, opcode, payload)
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
        Self::open_at(server, "/ws", behind).await
    }

    /// [`Raw::open`] on another WebSocket route (`/ingest`).
    async fn open_at(server: &TestServer, path: &str, behind: &[u8]) -> Self {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut first = upgrade_request_to(path, "").into_bytes();
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

impl Raw {
    /// Reads up to the server's close frame, answers it like a well-behaved client unless
    /// `answer` is false (our own close already went out), and expects the TCP connection to
    /// end (FIN) with nothing else on the wire. Returns the close code.
    async fn close_then_fin(&mut self, answer: bool) -> u16 {
        let code = self.close_code().await;
        if answer {
            let _ = self
                .tcp
                .write_all(&frame(true, 8, &code.to_be_bytes()))
                .await;
        }
        match self.next().await {
            None => code,
            Some(_) => panic!("a frame after the close frame"),
        }
    }
}

/// Defect 5 (issue 12): every protocol error on `/ingest` ends with a close frame carrying
/// the RFC 6455 code (1002, 1007, 1009), then FIN; not a bare FIN.
#[tokio::test]
async fn ingest_protocol_errors_send_a_close_frame_with_the_code_first() {
    let server = TestServer::start_with(test_config()).await;
    let mut unmasked = frame(true, 1, b"{}");
    unmasked[1] &= 0x7F;
    let mut rsv = frame(true, 1, b"{}");
    rsv[0] |= 0x40;
    let mut orphan_first = frame(true, 1, b"[]");
    orphan_first.extend(frame(true, 0, b"x"));
    // A frame header announcing more than `limits.max_message_bytes`; the payload never comes.
    let mut too_big = vec![0x82, 0x80 | 127];
    too_big.extend_from_slice(&(70_000u64).to_be_bytes());
    too_big.extend_from_slice(&[1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("unmasked frame", unmasked, 1002, true),
        ("reserved bit", rsv, 1002, true),
        ("reserved opcode 3", frame(true, 3, b"x"), 1002, true),
        ("reserved opcode 11", frame(true, 11, b""), 1002, true),
        ("126-byte ping", frame(true, 9, &[b'p'; 126]), 1002, true),
        ("fragmented ping", frame(false, 9, b"p"), 1002, true),
        (
            "invalid UTF-8",
            frame(true, 1, &[b'[', 0xC3, 0x28, b']']),
            1007,
            true,
        ),
        (
            "invalid UTF-8 in a fragment",
            [frame(false, 1, b"[\xF0\x9F"), frame(false, 0, b"\x28]")].concat(),
            1007,
            true,
        ),
        ("orphan continuation", frame(true, 0, b"x"), 1002, true),
        (
            "continuation after a whole message",
            orphan_first,
            1002,
            true,
        ),
        ("1-byte close payload", frame(true, 8, b"x"), 1002, false),
        (
            "close code 1005",
            frame(true, 8, &1005u16.to_be_bytes()),
            1002,
            false,
        ),
        (
            "close reason not UTF-8",
            frame(true, 8, b"\x03\xe8\xff"),
            1007,
            false,
        ),
        ("too big", too_big, 1009, true),
    ];
    for (what, bytes, want, answer) in cases {
        let mut raw = Raw::open_at(&server, "/ingest", &[]).await;
        raw.tcp.write_all(&bytes).await.unwrap();
        let got = tokio::time::timeout(DEADLINE, raw.close_then_fin(answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: no close frame and FIN"));
        assert_eq!(got, want, "{what}");
    }
    // Producers still work.
    let mut producer = server.producer().await;
    let ack = common::ingest(&mut producer, &[common::tick("AAPL", 1.0, 1.0)]).await;
    assert_eq!(ack["accepted"], 1, "{ack}");
}

/// 1012-1014 are registered close codes (service restart, try again later, bad gateway): a
/// client's close with one of them is echoed on both endpoints, not refused with 1002.
#[tokio::test]
async fn close_codes_1012_to_1014_are_echoed_on_both_endpoints() {
    let server = TestServer::start_with(test_config()).await;
    for path in ["/ws", "/ingest"] {
        for code in [1012u16, 1013, 1014] {
            let mut raw = Raw::open_at(&server, path, &[]).await;
            if path == "/ws" {
                assert_eq!(raw.text().await["type"], "welcome");
            }
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(b"later");
            raw.tcp.write_all(&frame(true, 8, &payload)).await.unwrap();
            assert_eq!(raw.close_then_fin(false).await, code, "{path} {code}");
        }
    }
}

/// Defect 2 (issue 12): a client with a tiny receive buffer floods masked pings and never
/// reads. Every ping used to queue its own pong outside every limit (GBs of RSS). Now only the
/// most recent unanswered ping gets a pong (RFC 6455 §5.5.3) and the server stops reading
/// from a client whose control answers pile up, so the pongs it gets are a small fraction of
/// the pings, the last one answers the last ping, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_gets_few_pongs_and_bounded_memory() {
    // 6.5 MB of pings: they fit in the client's send buffer (below), so the flood is sent
    // whole even after the server stops reading it.
    const PINGS: usize = 50_000;
    let server = TestServer::start_with(test_config()).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(8 << 20).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let mut raw = Raw {
        tcp,
        buf: Vec::new(),
    };
    raw.tcp
        .write_all(upgrade_request("").as_bytes())
        .await
        .unwrap();
    assert!(raw.http_head().await.starts_with("HTTP/1.1 101"));
    assert_eq!(raw.text().await["type"], "welcome");
    let Raw { tcp, mut buf } = raw;
    let (mut rd, mut wr) = tcp.into_split();
    // Big payloads, so that a socket's worth of pongs is a small number of them.
    let payload_of = |i: usize| {
        let mut p = format!("{i:>10}").into_bytes();
        p.resize(125, b'.');
        p
    };
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for i in 0..PINGS {
            batch.extend(frame(true, 9, &payload_of(i)));
            if batch.len() > 64 * 1024 {
                wr.write_all(&batch).await.unwrap();
                batch.clear();
            }
        }
        batch.extend(frame(true, 1, br#"{"op":"ping","id":99}"#));
        wr.write_all(&batch).await.unwrap();
        wr
    });
    // Not reading while the flood goes in: once the socket is full, the server must start
    // coalescing (old code: never; this wait then fails at its deadline).
    server
        .wait_metric("tickfan_ws_pongs_coalesced_total", |v| v > 0.0)
        .await;
    let mut pongs = 0usize;
    let mut last_pong = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let reply = 'read: loop {
        // Parse whatever is buffered.
        loop {
            if buf.len() < 2 {
                break;
            }
            let (len, start) = match buf[1] {
                126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
                126 | 127 => break,
                n => (usize::from(n), 2),
            };
            if buf.len() < start + len {
                break;
            }
            let opcode = buf[0] & 0x0F;
            let payload = buf[start..start + len].to_vec();
            buf.drain(..start + len);
            match opcode {
                10 => {
                    pongs += 1;
                    last_pong = payload;
                }
                1 => {
                    let v: Value = serde_json::from_slice(&payload).unwrap();
                    if v["type"] == "pong" {
                        break 'read v;
                    }
                }
                9 => {}
                other => panic!("unexpected opcode {other}: {:?}", payload),
            }
        }
        let n = tokio::time::timeout(DEADLINE, rd.read(&mut chunk))
            .await
            .expect("server went quiet")
            .unwrap();
        assert!(n > 0, "closed during the flood");
        buf.extend_from_slice(&chunk[..n]);
    };
    let wr = writer.await.unwrap();
    eprintln!("{pongs} pongs for {PINGS} pings");
    assert_eq!(reply["id"], 99);
    assert_eq!(
        last_pong,
        payload_of(PINGS - 1),
        "the most recent ping is answered"
    );
    // How many depends on how much the kernel buffered before and how fast the server caught
    // up once we read (a client that reads gets its pongs); never one per ping.
    assert!(
        pongs < PINGS,
        "{pongs} pongs for {PINGS} pings: pongs are not coalesced"
    );
    drop(wr);
    // The server is fine.
    let (mut ws, _) = server.client().await;
    let pong = ws.request(serde_json::json!({"op": "ping", "id": 1})).await;
    assert_eq!(pong["type"], "pong");
}

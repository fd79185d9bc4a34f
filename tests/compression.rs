//! permessage-deflate (RFC 7692) over real sockets: what is negotiated in the upgrade, that
//! compressed ticks inflate to exactly what a plain client gets, that every client gets the
//! same compressed bytes (compressed once: the server's compression counter), compressed
//! client messages (whole and fragmented, on `/ws` and `/ingest`), the inflate limit (a small
//! frame inflating past `max_message_bytes` closes 1009 and nobody else notices), and that
//! plain clients, malformed offers and the config switch all give plain connections.
//!
//! tungstenite (the other tests' client) does not speak permessage-deflate, so this client is
//! written by hand on a `TcpStream`, with flate2 for the DEFLATE.

mod common;

use std::collections::BTreeMap;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
const TEXT: u8 = 0x1;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const RSV1: u8 = 0x40;

/// One frame from the server.
struct Frame {
    rsv1: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A hand-written WebSocket client.
struct Client {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The response head, lowercased.
    head: String,
}

impl Client {
    /// Upgrades `path`, offering `extensions` (a whole `Sec-WebSocket-Extensions` value) if
    /// given.
    async fn open(server: &TestServer, path: &str, extensions: Option<&str>) -> Self {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        let offer = extensions
            .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{offer}\r\n"
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut client = Self {
            tcp,
            buf: Vec::new(),
            head: String::new(),
        };
        loop {
            if let Some(end) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                client.head = String::from_utf8_lossy(&client.buf[..end]).to_lowercase();
                client.buf.drain(..end + 4);
                break;
            }
            assert!(client.fill().await, "closed before the response head");
        }
        assert!(client.head.starts_with("http/1.1 101"), "{}", client.head);
        client
    }

    /// The negotiated extensions header, if any.
    fn extensions(&self) -> Option<&str> {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("sec-websocket-extensions: "))
            .map(str::trim)
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(DEADLINE, self.tcp.read(&mut chunk))
            .await
            .expect("server went quiet")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next frame (`None`: the connection ended).
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 2 {
                let b = &self.buf;
                let (len, start) = match b[1] & 0x7F {
                    126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
                    127 if b.len() >= 10 => (
                        usize::try_from(u64::from_be_bytes(b[2..10].try_into().unwrap())).unwrap(),
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (usize::from(n), 2),
                };
                if len != usize::MAX && b.len() >= start + len {
                    assert_eq!(b[1] & 0x80, 0, "server frames are unmasked");
                    assert_eq!(b[0] & 0x80, 0x80, "server messages are not fragmented");
                    assert_eq!(b[0] & 0x30, 0, "RSV2/RSV3 never set");
                    let frame = Frame {
                        rsv1: b[0] & RSV1 != 0,
                        opcode: b[0] & 0x0F,
                        payload: b[start..start + len].to_vec(),
                    };
                    self.buf.drain(..start + len);
                    return Some(frame);
                }
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next text message as JSON, with its frame (control frames skipped; a close frame
    /// fails the test).
    async fn message(&mut self) -> (Value, Frame) {
        loop {
            let frame = self.frame().await.expect("connection ended");
            match frame.opcode {
                TEXT => {
                    let text = if frame.rsv1 {
                        inflate(&frame.payload)
                    } else {
                        frame.payload.clone()
                    };
                    let value = serde_json::from_slice(&text).unwrap_or_else(|e| {
                        panic!("not JSON ({e}): {}", String::from_utf8_lossy(&text))
                    });
                    return (value, frame);
                }
                CLOSE => panic!(
                    "closed: {:?}",
                    String::from_utf8_lossy(frame.payload.get(2..).unwrap_or_default())
                ),
                _ => assert!(!frame.rsv1, "RSV1 on a control frame"),
            }
        }
    }

    /// Reads until the server closes; returns its close code and reason.
    async fn close_code(&mut self) -> (u16, String) {
        while let Some(frame) = self.frame().await {
            if frame.opcode == CLOSE {
                let code = u16::from_be_bytes([frame.payload[0], frame.payload[1]]);
                let reason = String::from_utf8_lossy(&frame.payload[2..]).into_owned();
                return (code, reason);
            }
        }
        panic!("ended without a close frame");
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }

    /// Sends `text` as one plain text frame.
    async fn send_text(&mut self, text: &str) {
        self.send(&frame(true, TEXT, false, text.as_bytes())).await;
    }

    /// Sends `text` as one compressed text frame.
    async fn send_compressed(&mut self, text: &str) {
        self.send(&frame(true, TEXT, true, &deflate(text.as_bytes())))
            .await;
    }

    /// Reads messages until the reply to request `id`.
    async fn reply(&mut self, id: u64) -> Value {
        loop {
            let (msg, _) = self.message().await;
            if msg["id"] == id {
                return msg;
            }
        }
    }

    /// Reads until a tick for `symbol`; returns it and its frame.
    async fn tick(&mut self, symbol: &str) -> (Value, Frame) {
        loop {
            let (msg, frame) = self.message().await;
            if msg["type"] == "tick" && msg["symbol"] == symbol {
                return (msg, frame);
            }
        }
    }
}

/// A masked client frame, RSV1 set if `compressed`.
fn frame(fin: bool, opcode: u8, compressed: bool, payload: &[u8]) -> Vec<u8> {
    let mut bytes = tickfan::transport::ws::frame::client_frame(fin, opcode, payload);
    if compressed {
        bytes[0] |= RSV1;
    }
    bytes
}

/// `plain` as one permessage-deflate message (raw DEFLATE, `00 00 ff ff` removed), made with
/// flate2 independently of the server's code.
fn deflate(plain: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(plain.len() + 1024);
    c.compress_vec(plain, &mut out, FlushCompress::Sync)
        .unwrap();
    assert_eq!(c.total_in() as usize, plain.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A permessage-deflate message back to its text (RFC 7692 §7.2.2: add the tail, inflate).
fn inflate(compressed: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = compressed.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(compressed.len() * 20 + 1024);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(d.total_in() as usize, input.len(), "inflated in one go");
    out
}

/// A tick big enough to be compressed (ticks under ~100 bytes go plain).
fn big_tick(symbol: &str, price: f64) -> Value {
    let mut t = tick(symbol, price, 1.5);
    t["bid"] = json!(price - 0.25);
    t["ask"] = json!(price + 0.25);
    t
}

async fn deflate_metrics(server: &TestServer) -> BTreeMap<&'static str, f64> {
    let mut out = BTreeMap::new();
    for name in [
        "tickfan_deflate_connections",
        "tickfan_deflate_compressions_total",
        "tickfan_deflate_frames_sent_total",
        "tickfan_deflate_plain_bytes_total",
        "tickfan_deflate_wire_bytes_total",
        "tickfan_inflate_too_big_total",
    ] {
        out.insert(name, server.metric(name).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_ticks_are_the_plain_ticks_compressed_once_for_everyone() {
    let server = TestServer::start().await;
    // Chromium's and Python websockets' offer, and a list whose first offer is declined.
    let mut a = Client::open(
        &server,
        "/ws",
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    let mut b = Client::open(
        &server,
        "/ws",
        Some("permessage-deflate; server_max_window_bits=9, permessage-deflate"),
    )
    .await;
    let mut plain = Client::open(&server, "/ws", None).await;
    assert_eq!(a.extensions(), Some(ANSWER));
    assert_eq!(b.extensions(), Some(ANSWER));
    assert_eq!(plain.extensions(), None, "no offer, no extension");
    for c in [&mut a, &mut b, &mut plain] {
        let (welcome, _) = c.message().await;
        assert_eq!(welcome["type"], "welcome");
    }
    // Requests may come compressed (a), or plain on a deflate connection (b).
    a.send_compressed(r#"{"op":"subscribe","id":1,"symbols":["DFL"]}"#)
        .await;
    b.send_text(r#"{"op":"subscribe","id":1,"symbols":["DFL"]}"#)
        .await;
    plain
        .send_text(r#"{"op":"subscribe","id":1,"symbols":["DFL"]}"#)
        .await;
    for c in [&mut a, &mut b, &mut plain] {
        assert_eq!(c.reply(1).await["type"], "ack");
    }
    assert_eq!(
        server.metric("tickfan_deflate_connections").await,
        2.0,
        "a and b"
    );
    let before = deflate_metrics(&server).await;

    let mut producer = server.producer().await;
    let n = 5;
    for i in 0..n {
        let ack = ingest(&mut producer, &[big_tick("DFL", 100.0 + f64::from(i))]).await;
        assert_eq!(ack["accepted"], 1, "{ack}");
    }
    for _ in 0..n {
        let (plain_tick, plain_frame) = plain.tick("DFL").await;
        let (a_tick, a_frame) = a.tick("DFL").await;
        let (b_tick, b_frame) = b.tick("DFL").await;
        assert!(!plain_frame.rsv1, "plain client, plain frames");
        assert!(
            a_frame.rsv1 && b_frame.rsv1,
            "deflate clients get RSV1 frames"
        );
        assert_eq!(a_tick["seq"], plain_tick["seq"]);
        // Byte for byte the frame the plain client got, and the same compressed bytes.
        assert_eq!(inflate(&a_frame.payload), plain_frame.payload);
        assert_eq!(a_frame.payload, b_frame.payload, "shared compressed bytes");
        assert!(a_frame.payload.len() < plain_frame.payload.len());
        assert_eq!(a_tick, b_tick);
    }
    let after = deflate_metrics(&server).await;
    let delta = |name| after[name] - before[name];
    assert_eq!(
        delta("tickfan_deflate_compressions_total"),
        f64::from(n),
        "each tick compressed once for both clients"
    );
    assert_eq!(delta("tickfan_deflate_frames_sent_total"), f64::from(2 * n));
    assert!(delta("tickfan_deflate_wire_bytes_total") < delta("tickfan_deflate_plain_bytes_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_switch_and_bad_offers_give_plain_connections() {
    let mut config = test_config();
    config.server.permessage_deflate = false;
    let off = TestServer::start_with(config).await;
    let mut c = Client::open(&off, "/ws", Some("permessage-deflate")).await;
    assert_eq!(c.extensions(), None, "turned off in the config");
    let (welcome, frame) = c.message().await;
    assert_eq!(welcome["type"], "welcome");
    assert!(!frame.rsv1);
    // Not negotiated: a compressed frame is a protocol error.
    c.send_compressed(r#"{"op":"ping","id":1}"#).await;
    assert_eq!(c.close_code().await.0, 1002);
    let ingest = Client::open(&off, "/ingest", Some("permessage-deflate")).await;
    assert_eq!(ingest.extensions(), None);

    let server = TestServer::start().await;
    for malformed in [
        "permessage-deflate; server_max_window_bits=abc",
        "permessage-deflate; =",
        "permessage-deflate; client_no_context_takeover=yes",
        "permessage-deflate; server_max_window_bits=8",
        "x-webkit-deflate-frame",
    ] {
        let mut c = Client::open(&server, "/ws", Some(malformed)).await;
        assert_eq!(c.extensions(), None, "{malformed}");
        let (welcome, frame) = c.message().await;
        assert_eq!(welcome["type"], "welcome");
        assert!(!frame.rsv1);
        c.send_text(r#"{"op":"ping","id":7}"#).await;
        assert_eq!(c.reply(7).await["type"], "pong");
    }
    // A client that offered nothing may not send RSV1 either.
    let mut c = Client::open(&server, "/ws", None).await;
    c.message().await;
    c.send_compressed(r#"{"op":"ping","id":1}"#).await;
    let (code, reason) = c.close_code().await;
    assert_eq!(code, 1002, "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_messages_in_fragments_and_on_ingest() {
    let server = TestServer::start().await;
    let mut c = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    c.message().await;
    // One compressed message in three fragments: RSV1 on the first only.
    let body = deflate(br#"{"op":"subscribe","id":2,"symbols":["FRAG"],"mode":"realtime"}"#);
    let (one, rest) = body.split_at(3);
    let (two, three) = rest.split_at(rest.len() / 2);
    let mut bytes = frame(false, TEXT, true, one);
    bytes.extend(frame(false, CONTINUATION, false, two));
    bytes.extend(frame(true, CONTINUATION, false, three));
    c.send(&bytes).await;
    let ack = c.reply(2).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Producers may compress their frames too.
    let mut producer = Client::open(&server, "/ingest", Some("permessage-deflate")).await;
    assert_eq!(producer.extensions(), Some(ANSWER));
    let ticks = Value::Array(
        (0..50)
            .map(|i| big_tick("FRAG", 10.0 + f64::from(i)))
            .collect(),
    );
    producer.send_compressed(&ticks.to_string()).await;
    let (ack, _) = producer.message().await;
    assert_eq!(ack["type"], "ingest_ack", "{ack}");
    assert_eq!(ack["accepted"], 50, "{ack}");
    let (tick, frame) = c.tick("FRAG").await;
    assert!(frame.rsv1);
    assert_eq!(tick["seq"], 1);
    // RSV1 on a continuation frame is a protocol error.
    let mut bad = frame_pair_with_rsv1_on_continuation();
    c.send(&std::mem::take(&mut bad)).await;
    assert_eq!(c.close_code().await.0, 1002);
}

fn frame_pair_with_rsv1_on_continuation() -> Vec<u8> {
    let body = deflate(br#"{"op":"ping","id":3}"#);
    let mut bytes = frame(false, TEXT, true, &body[..2]);
    bytes.extend(frame(true, CONTINUATION, true, &body[2..]));
    bytes
}

/// A server with `limits.max_message_bytes = max` and a compressing client subscribed to
/// `symbol`, which shows whether everyone else is still served.
async fn with_bystander(max: usize, symbol: &str) -> (TestServer, Client) {
    let mut config = test_config();
    config.limits.max_message_bytes = max;
    let server = TestServer::start_with(config).await;
    let mut bystander = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    bystander.message().await;
    let subscribe = json!({"op": "subscribe", "id": 1, "symbols": [symbol]});
    bystander.send_text(&subscribe.to_string()).await;
    bystander.reply(1).await;
    (server, bystander)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_closes_1009_and_the_server_keeps_serving() {
    let (server, mut bystander) = with_bystander(64 * 1024, "BOMB").await;

    // 10 MiB of JSON-ish text in about 10 KiB: far under the frame limit, far over the
    // message limit once inflated.
    let mut plain = br#"{"op":"ping","id":1,"pad":""#.to_vec();
    plain.extend(std::iter::repeat_n(b' ', 10 << 20));
    plain.extend_from_slice(br#""}"#);
    let bomb = deflate(&plain);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());

    let mut attacker = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    attacker.message().await;
    attacker.send(&frame(true, TEXT, true, &bomb)).await;
    let (code, reason) = attacker.close_code().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("inflates"), "{reason}");
    // The same bomb in fragments, and to /ingest.
    let mut fragmented = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    fragmented.message().await;
    let mut bytes = Vec::new();
    let pieces: Vec<&[u8]> = bomb.chunks(1000).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { TEXT } else { CONTINUATION };
        bytes.extend(frame(i + 1 == pieces.len(), op, i == 0, piece));
    }
    fragmented.send(&bytes).await;
    assert_eq!(fragmented.close_code().await.0, 1009);
    let mut producer = Client::open(&server, "/ingest", Some("permessage-deflate")).await;
    producer.send(&frame(true, TEXT, true, &bomb)).await;
    let (code, reason) = producer.close_code().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("inflates"), "{reason}");
    assert_eq!(server.metric("tickfan_inflate_too_big_total").await, 3.0);

    // Everyone else is still served.
    let mut producer = server.producer().await;
    let ack = ingest(&mut producer, &[big_tick("BOMB", 1.0)]).await;
    assert_eq!(ack["accepted"], 1);
    let (tick, frame) = bystander.tick("BOMB").await;
    assert!(frame.rsv1);
    assert_eq!(tick["price"], 1.0);
}

/// A compressed connection that parks (quiet for `server.park_after_ms`) and is resumed by a
/// tick keeps its compression both ways: the socket rebuilt on resume still inflates, and
/// ticks still go out compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_survives_parking() {
    let mut config = test_config();
    config.server.park_after_ms = 100;
    let server = TestServer::start_with(config).await;
    let mut c = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    c.message().await;
    c.send_compressed(r#"{"op":"subscribe","id":1,"symbols":["PARK"]}"#)
        .await;
    c.reply(1).await;
    server
        .wait_stats("the connection to park", |s| s["parking"]["parked"] == 1)
        .await;
    let before = server.metric("tickfan_connection_unparks_total").await;
    let mut producer = server.producer().await;
    ingest(&mut producer, &[big_tick("PARK", 5.0)]).await;
    let (tick, frame) = c.tick("PARK").await;
    assert!(frame.rsv1, "still compressed after resuming");
    assert_eq!(tick["price"], 5.0);
    assert!(server.metric("tickfan_connection_unparks_total").await > before);
    c.send_compressed(r#"{"op":"ping","id":9}"#).await;
    assert_eq!(c.reply(9).await["type"], "pong");
}

/// Many small frames that each inflate to nearly `max_message_bytes`, all in ONE write, on
/// `/ws` and on `/ingest`: the server inflates them a budget at a time (the read's rest waits
/// in the decoder and is taken up without waiting for the socket), answers every one in order,
/// and keeps serving everyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_limit_compressed_frames_in_one_write_are_inflated_a_budget_at_a_time() {
    let max = 64 * 1024;
    let (server, mut bystander) = with_bystander(max, "MANY").await;

    // 50 pings, each padded with JSON whitespace to just under the limit: ~100 bytes each
    // compressed, ~3 MiB inflated, about 5 KiB on the wire in one write.
    let n = 50;
    let mut bytes = Vec::new();
    for id in 0..n {
        let mut text = format!(r#"{{"op":"ping","id":{id}}}"#).into_bytes();
        text.resize(max - 16, b' ');
        bytes.extend(frame(true, TEXT, true, &deflate(&text)));
    }
    assert!(bytes.len() < 8 * 1024, "{}", bytes.len());
    let mut attacker = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    attacker.message().await;
    attacker.send(&bytes).await;
    for id in 0..n {
        let (msg, _) = attacker.message().await;
        assert_eq!(msg["id"], id, "{msg}");
        assert_eq!(msg["type"], "pong", "{msg}");
    }
    let deferred = server.metric("tickfan_inflate_deferred_total").await;
    // Read 4 KiB at a time, one read holds ~37 of the frames: ~18 turns wait for the next.
    assert!(deferred >= 10.0, "{deferred}");

    // A producer's 64 KiB read would hold all of them: the same, one budget at a time.
    let mut bytes = Vec::new();
    for i in 0..n {
        let mut text = Value::Array(vec![big_tick("MANY", 1.0 + f64::from(i))])
            .to_string()
            .into_bytes();
        text.resize(max - 16, b' ');
        bytes.extend(frame(true, TEXT, true, &deflate(&text)));
    }
    let mut producer = Client::open(&server, "/ingest", Some("permessage-deflate")).await;
    producer.send(&bytes).await;
    let mut acked = 0;
    while acked < n {
        let (ack, _) = producer.message().await;
        if ack["type"] == "ingest_ack" {
            assert_eq!(ack["accepted"], 1, "{ack}");
            acked += 1;
        }
    }
    assert!(server.metric("tickfan_inflate_deferred_total").await >= deferred + 10.0);
    // Every tick reached the bystander, in order.
    for i in 0..n {
        let (tick, _) = bystander.tick("MANY").await;
        assert_eq!(tick["price"], 1.0 + f64::from(i));
    }
    assert_eq!(server.metric("tickfan_inflate_too_big_total").await, 0.0);
}

/// A compressed message whose DEFLATE data ends with a final block (BFINAL) is valid, but
/// bytes after that block are not silently dropped: close 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_the_final_deflate_block_close_1002() {
    let server = TestServer::start().await;
    let finished = |text: &[u8]| {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = Vec::with_capacity(text.len() + 64);
        c.compress_vec(text, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    };
    let mut c = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    c.message().await;
    c.send(&frame(
        true,
        TEXT,
        true,
        &finished(br#"{"op":"ping","id":1}"#),
    ))
    .await;
    assert_eq!(
        c.reply(1).await["type"],
        "pong",
        "a final block alone is fine"
    );
    let mut body = finished(br#"{"op":"ping","id":2}"#);
    body.extend(deflate(br#"{"op":"ping","id":3}"#));
    c.send(&frame(true, TEXT, true, &body)).await;
    let (code, reason) = c.close_code().await;
    assert_eq!(code, 1002, "{reason}");
    assert!(reason.contains("final"), "{reason}");
}

/// Two batch-mode clients with the same subscription form one batch group: each flush builds
/// one frame, compressed once and shared by both (the compression counter rises by the
/// number of batch frames, not twice that), and both get the same compressed bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_groups_frame_is_compressed_once_for_all_members() {
    let server = TestServer::start().await;
    let subscribe =
        r#"{"op":"subscribe","id":1,"symbols":["BGRP"],"mode":"batch","interval_ms":50}"#;
    let mut a = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    let mut b = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    for c in [&mut a, &mut b] {
        c.message().await;
        c.send_text(subscribe).await;
        assert_eq!(c.reply(1).await["type"], "ack");
    }
    let before = server.metric("tickfan_deflate_compressions_total").await;
    let mut producer = server.producer().await;
    let n = 20;
    for i in 0..n {
        ingest(&mut producer, &[big_tick("BGRP", 1.0 + f64::from(i))]).await;
    }
    // Read the batches of both until each has all n ticks, frame by frame side by side.
    let mut a_frames = Vec::new();
    let mut b_frames = Vec::new();
    for (c, frames) in [(&mut a, &mut a_frames), (&mut b, &mut b_frames)] {
        let mut prices = Vec::new();
        while prices.len() < n as usize {
            let (msg, frame) = c.message().await;
            if msg["type"] != "batch" {
                continue;
            }
            assert!(frame.rsv1, "batch frames go out compressed");
            for t in msg["ticks"].as_array().unwrap() {
                prices.push(t["price"].as_f64().unwrap());
            }
            frames.push(frame.payload);
        }
        let expected: Vec<f64> = (0..n).map(|i| 1.0 + f64::from(i)).collect();
        assert_eq!(prices, expected);
    }
    assert_eq!(
        a_frames, b_frames,
        "the same compressed frames for both members"
    );
    let compressed = server.metric("tickfan_deflate_compressions_total").await - before;
    assert_eq!(
        compressed,
        a_frames.len() as f64,
        "one compression per batch frame, shared by both members"
    );
}

/// Ticks a compressing client gets other than live from the dispatcher's shared frames: a
/// `since_seq` replay from the store (ticks stamped while no compressing client was
/// connected) and throttled (conflated) ticks made for the connection alone. Whatever the
/// server chose per message (RSV1 or not), every message decodes to the right ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_and_throttled_ticks_reach_a_compressing_client() {
    let server = TestServer::start().await;
    let mut producer = server.producer().await;
    let stored: u32 = 12;
    for i in 0..stored {
        ingest(&mut producer, &[big_tick("RPLY", 1.0 + f64::from(i))]).await;
    }
    let mut c = Client::open(&server, "/ws", Some("permessage-deflate")).await;
    c.message().await;
    c.send_compressed(r#"{"op":"subscribe","id":1,"symbols":["RPLY"],"since_seq":{"RPLY":0}}"#)
        .await;
    assert_eq!(c.reply(1).await["type"], "ack");
    let (snapshot, frame) = loop {
        let (msg, frame) = c.message().await;
        if msg["type"] == "snapshot" {
            break (msg, frame);
        }
    };
    let seqs: Vec<u64> = snapshot["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=stored).map(u64::from).collect::<Vec<_>>());
    assert!(
        frame.rsv1,
        "a snapshot over 1 KiB is compressed for the connection ({} bytes)",
        frame.payload.len()
    );
    // Live again: shared and compressed.
    ingest(&mut producer, &[big_tick("RPLY", 100.0)]).await;
    let (tick, frame) = c.tick("RPLY").await;
    assert_eq!(tick["seq"], stored + 1);
    assert!(frame.rsv1);

    // Throttled: the latest tick per interval, conflated for this connection.
    c.send_text(r#"{"op":"configure","id":2,"mode":"throttled","interval_ms":50}"#)
        .await;
    assert_eq!(c.reply(2).await["type"], "ack");
    for i in 0..5 {
        ingest(&mut producer, &[big_tick("RPLY", 200.0 + f64::from(i))]).await;
    }
    let mut last = 0.0;
    while last != 204.0 {
        let (tick, _) = c.tick("RPLY").await;
        let price = tick["price"].as_f64().unwrap();
        assert!(price > last && (200.0..=204.0).contains(&price), "{tick}");
        last = price;
    }
}

//! A WebSocket echo server on tickfan's own transport (`tickfan::transport::ws`: the same upgrade,
//! framing, reassembly and close behaviour as `/ws` and `/ingest`), for the Autobahn|Testsuite
//! echo cases (`.ci/autobahn.sh`). Every text and binary message is echoed back, every ping
//! answered, and the peer's close code echoed; protocol errors close with 1002/1007/1009.
//!
//! Usage: `cargo run --release --example ws_echo [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on 127.0.0.1:PORT` once it accepts connections. `--max-message BYTES` (default
//! 64 MiB: Autobahn section 9 sends messages of up to 16 MiB). permessage-deflate is negotiated
//! as on `/ws` (Autobahn sections 12 and 13): a compressed connection gets its echoes
//! compressed (each on its own, as the server compresses), unless `--no-deflate`.

use std::time::Duration;

use axum::response::Response;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use tickfan::transport::ws::frame::opcode;
use tickfan::transport::ws::{ClientUpgrade, PendingUpgrade, ReadError, WsSocket};
use tower_service::Service;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:0".to_string();
    let mut max_message = 64 << 20;
    let mut deflate = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--no-deflate" {
            deflate = false;
        } else if arg == "--max-message" {
            max_message = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--max-message BYTES");
        } else {
            addr = arg;
        }
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let app = Router::new().route(
        "/",
        get(move |ws: ClientUpgrade| async move { upgrade(ws, max_message, deflate) }),
    );
    // hyper directly on the bare stream (as tickfan's own accept loop does), so the upgrade
    // hands back a plain `TcpStream`.
    loop {
        let (tcp, _) = listener.accept().await?;
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut app = app.clone();
                app.call(req.map(axum::body::Body::new))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

fn upgrade(ws: ClientUpgrade, max_message: usize, deflate: bool) -> Response {
    let (resp, pending) = ws.accept(deflate);
    tokio::spawn(echo(pending, max_message));
    resp
}

async fn echo(pending: PendingUpgrade, max_message: usize) {
    let deflate = pending.deflate();
    let Some((stream, early)) = pending.stream().await else {
        return;
    };
    let mut socket = WsSocket::new(stream, max_message);
    if deflate {
        socket.inflate_compressed();
    }
    let mut inbox = Vec::new();
    let mut broken = socket.absorb(&early, &mut inbox).err();
    let close = loop {
        let mut peer_close = None;
        for msg in inbox.drain(..) {
            match msg {
                tickfan::transport::ws::Incoming::Text(text) => {
                    send(&mut socket, deflate, opcode::TEXT, text.into_bytes());
                }
                tickfan::transport::ws::Incoming::Binary(data) => {
                    send(&mut socket, deflate, opcode::BINARY, data);
                }
                tickfan::transport::ws::Incoming::Ping(payload) => {
                    socket.queue_pong(payload);
                }
                tickfan::transport::ws::Incoming::Pong => {}
                tickfan::transport::ws::Incoming::Close(code) => {
                    peer_close = Some(code);
                    break;
                }
            }
        }
        if let Some(code) = peer_close {
            match code {
                Some(code) => socket.queue_close(code, ""),
                // An empty close is answered with an empty close.
                None => socket.queue(opcode::CLOSE, Bytes::new()),
            }
            break None;
        }
        match broken.take() {
            Some(ReadError::Frame(e)) => break Some(e.close_code()),
            Some(_) => return,
            None => {}
        }
        if socket.flush().await.is_err() || socket.readable().await.is_err() {
            return;
        }
        broken = socket.read_some(&mut inbox).err();
    };
    if let Some(code) = close {
        socket.queue_close(code, "");
    }
    if socket.flush().await.is_ok() {
        socket.await_peer_close(Duration::from_secs(2)).await;
    }
}

/// Queues an echo: compressed when the connection negotiated it and compressing pays.
fn send(socket: &mut WsSocket, deflate: bool, op: u8, data: Vec<u8>) {
    match deflate
        .then(|| tickfan::transport::ws::deflate::compress(&data))
        .flatten()
    {
        Some(deflated) => socket.queue_compressed(op, deflated),
        None => socket.queue(op, Bytes::from(data)),
    }
}

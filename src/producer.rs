//! One `/ingest` producer connection. The reader ingests each frame as it arrives (so a
//! producer can pipeline) and queues its report; the writer sends the acks in frame order, each
//! once that frame's accepted ticks have settled (stored, or dispatched without a store). The
//! report queue between them is bounded (`PIPELINE_FRAMES`), so a producer that outruns the
//! server stops being read and feels TCP backpressure. Refused ticks get a `backpressure` error
//! right after the frame's ack.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

use crate::client::ClientContext;

use crate::ingest::{IngestReport, Ingestor};
use crate::protocol::close;

/// Frames whose acks may be outstanding per producer connection.
pub const PIPELINE_FRAMES: usize = 1_024;

enum Outgoing {
    Report(IngestReport),
    Close(u16, &'static str),
}

/// Serves one upgraded producer connection until it closes.
pub async fn serve(socket: WebSocket, ingestor: Arc<Ingestor>, ctx: Arc<ClientContext>) {
    let shutdown = ctx.shutdown.clone();
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Outgoing>(PIPELINE_FRAMES);
    let reader = async move {
        loop {
            let msg = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = tx.send(Outgoing::Close(close::GOING_AWAY, "server shutting down")).await;
                    return;
                }
                msg = stream.next() => msg,
            };
            // Ingest copies the frame once into simd-json's scratch buffer; no copy here.
            let report = match msg {
                Some(Ok(Message::Text(t))) => ingestor.ingest_frame(t.as_str().as_bytes()),
                // Binary frames carrying JSON are accepted too: producers often send bytes.
                Some(Ok(Message::Binary(b))) => ingestor.ingest_frame(&b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(_))) | None => return,
                Some(Err(e)) => {
                    let too_big = e
                        .into_inner()
                        .downcast::<tokio_tungstenite::tungstenite::Error>()
                        .is_ok_and(|e| {
                            matches!(*e, tokio_tungstenite::tungstenite::Error::Capacity(_))
                        });
                    if too_big {
                        ctx.stats.too_big.fetch_add(1, Ordering::Relaxed);
                        let _ = tx
                            .send(Outgoing::Close(close::TOO_BIG, "message too big"))
                            .await;
                    }
                    return;
                }
            };
            if tx.send(Outgoing::Report(report)).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some(item) = rx.recv().await {
            match item {
                Outgoing::Report(report) => {
                    let (ack, backpressure) = report.settle().await;
                    let Ok(text) = serde_json::to_string(&ack) else {
                        continue;
                    };
                    if sink.feed(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                    if let Some(bp) = backpressure {
                        let Ok(text) = serde_json::to_string(&bp) else {
                            continue;
                        };
                        if sink.feed(Message::Text(text.into())).await.is_err() {
                            return;
                        }
                    }
                    // Flush when no further ack is ready, coalescing bursts of acks.
                    if rx.is_empty() && sink.flush().await.is_err() {
                        return;
                    }
                }
                Outgoing::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from(reason),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    return;
                }
            }
        }
        let _ = sink.flush().await;
    };
    tokio::join!(reader, writer);
}

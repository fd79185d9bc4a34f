//! `tickfan-loadtest ceiling`: the bare fan-out server that issue 17 measures tickfan
//! against, so that both run in the same sitting with the same client. It speaks just
//! enough of tickfan's wire for the load-test client and producer: `/ws` answers a
//! `subscribe` with an `ack`, `/ingest` takes JSON-array frames and answers `ingest_ack`.
//!
//! Data flows producer -> [`Hub::ingest`] -> one pre-encoded frame per tick (header and
//! `{"type":"tick",...,"seq":N,"t_in":T}` body in one `Arc<[u8]>`) -> a bounded queue per
//! subscribed socket -> that socket's writer task, which writes everything pending with one
//! `writev`. There is no validation, store, dedup, filter, mode or heartbeat: what it costs
//! is the kernel's loopback and the least user-space work a fan-out can do, so the gap to
//! tickfan is tickfan's own work. Kept in the load-test crate (and hand-written) because it
//! is a measuring stick, not a product; it trusts its input and is for loopback runs only.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest client frame read (a subscribe or a producer frame).
const MAX_FRAME: usize = 1 << 20;
/// `writev` takes at most this many slices (Linux `IOV_MAX`).
const MAX_IOV: usize = 1024;

/// The bare ceiling server.
#[derive(Debug, Parser)]
#[command(name = "tickfan-loadtest ceiling")]
pub struct CeilingArgs {
    /// Address to listen on; port 0 picks one, printed as `listening on ADDR`.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Bytes queued per socket at most (tickfan's `limits.outbound_buffer_bytes` default);
    /// a socket that falls further behind is dropped, as tickfan drops a slow consumer.
    #[arg(long, default_value_t = 4 << 20)]
    queue_bytes: usize,
    /// Runtime worker threads (1: a current-thread runtime, like one pinned core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Runs the ceiling server until killed.
pub fn main(args: CeilingArgs) -> anyhow::Result<()> {
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let hub = Arc::new(Hub::default());
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let hub = Arc::clone(&hub);
            let cap = args.queue_bytes;
            tokio::spawn(async move {
                let _ = serve(stream, hub, cap).await;
            });
        }
    })
}

/// One socket's outbound side: the bounded queue of shared frames and its writer's waker.
struct Conn {
    queue: Mutex<Outbox>,
    notify: Notify,
    /// Byte bound of the queue.
    cap: usize,
}

#[derive(Default)]
struct Outbox {
    frames: VecDeque<Arc<[u8]>>,
    bytes: usize,
    closed: bool,
}

impl Conn {
    /// Queues a frame; wakes the writer when the queue was empty (it drains it all).
    fn push(&self, frame: &Arc<[u8]>) {
        let mut q = self.queue.lock().expect("queue lock");
        if q.closed {
            return;
        }
        if q.bytes + frame.len() > self.cap {
            q.closed = true;
            q.frames.clear();
        } else {
            q.bytes += frame.len();
            q.frames.push_back(Arc::clone(frame));
            if q.frames.len() > 1 {
                return;
            }
        }
        drop(q);
        self.notify.notify_one();
    }

    fn close(&self) {
        self.queue.lock().expect("queue lock").closed = true;
        self.notify.notify_one();
    }
}

/// Routing and the per-symbol seq.
#[derive(Default)]
struct Hub {
    routes: Mutex<HashMap<Box<[u8]>, Route>>,
}

#[derive(Default)]
struct Route {
    seq: u64,
    subscribers: Vec<Arc<Conn>>,
}

impl Hub {
    fn subscribe(&self, symbol: &str, conn: &Arc<Conn>) -> u64 {
        let mut routes = self.routes.lock().expect("routes lock");
        let route = routes.entry(symbol.as_bytes().into()).or_default();
        route.subscribers.push(Arc::clone(conn));
        route.seq
    }

    fn unsubscribe(&self, conn: &Arc<Conn>) {
        let mut routes = self.routes.lock().expect("routes lock");
        for route in routes.values_mut() {
            route.subscribers.retain(|c| !Arc::ptr_eq(c, conn));
        }
    }

    /// Fans out every tick object of a producer's JSON array; returns how many there were.
    fn ingest(&self, array: &[u8]) -> u64 {
        let t_in = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let mut routes = self.routes.lock().expect("routes lock");
        let mut n = 0;
        let mut body = Vec::with_capacity(256);
        for obj in objects(array) {
            let Some(symbol) = symbol_of(obj) else {
                continue;
            };
            n += 1;
            let route = routes.entry(symbol.into()).or_default();
            route.seq += 1;
            body.clear();
            body.extend_from_slice(br#"{"type":"tick","#);
            body.extend_from_slice(&obj[1..obj.len() - 1]);
            let _ = write!(body, r#","seq":{},"t_in":{t_in}}}"#, route.seq);
            let frame = text_frame(&body);
            for conn in &route.subscribers {
                conn.push(&frame);
            }
        }
        n
    }
}

/// The flat `{...}` objects of a JSON array (producer ticks have no nesting).
fn objects(array: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = array;
    std::iter::from_fn(move || {
        let start = memchr::memchr(b'{', rest)?;
        let end = start + memchr::memchr(b'}', &rest[start..])?;
        let obj = &rest[start..=end];
        rest = &rest[end + 1..];
        Some(obj)
    })
}

/// The `symbol` string of a producer tick object (no escapes: the load-test names).
fn symbol_of(obj: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"symbol\":\"";
    // Built once: a finder per call showed up in the ceiling's own profile.
    static FINDER: OnceLock<memchr::memmem::Finder<'static>> = OnceLock::new();
    let finder = FINDER.get_or_init(|| memchr::memmem::Finder::new(KEY));
    let at = finder.find(obj)? + KEY.len();
    let len = memchr::memchr(b'"', &obj[at..])?;
    Some(&obj[at..at + len])
}

/// An unmasked server text frame, shared by every socket that gets it.
fn text_frame(payload: &[u8]) -> Arc<[u8]> {
    crate::ws::server_frame(true, 0x1, payload).into()
}

/// One connection: the HTTP upgrade, then a reader here and a writer task.
async fn serve(mut stream: TcpStream, hub: Arc<Hub>, cap: usize) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let (path, key, head_len) = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > 16 * 1024 {
            bail!("no upgrade request");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = req.parse(&buf)? {
            let key = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .context("no Sec-WebSocket-Key")?;
            break (
                req.path.unwrap_or("").to_string(),
                derive_accept_key(key.value),
                len,
            );
        }
    };
    let ingest = path.starts_with("/ingest");
    if !ingest && !path.starts_with("/ws") {
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {key}\r\n\r\n"
    );
    stream.write_all(reply.as_bytes()).await?;
    buf.drain(..head_len);

    let (mut rd, wr) = stream.into_split();
    let conn = Arc::new(Conn {
        queue: Mutex::new(Outbox::default()),
        notify: Notify::new(),
        cap,
    });
    let writer = tokio::spawn(write_loop(wr, Arc::clone(&conn)));
    let mut chunk = vec![0u8; 64 * 1024];
    'read: loop {
        while let Some((opcode, payload, used)) = next_frame(&mut buf)? {
            match opcode {
                0x1 if ingest => {
                    let n = hub.ingest(&payload);
                    conn.push(&text_frame(
                        format!(r#"{{"type":"ingest_ack","accepted":{n}}}"#).as_bytes(),
                    ));
                }
                0x1 => subscribe(&hub, &conn, &payload),
                0x8 => {
                    conn.push(&Arc::from(&[0x88u8, 2, 0x03, 0xE8][..]));
                    buf.drain(..used);
                    break 'read;
                }
                0x9 => {
                    let mut pong = vec![0x8A, payload.len() as u8];
                    pong.extend_from_slice(&payload);
                    conn.push(&pong.into());
                }
                _ => {}
            }
            buf.drain(..used);
        }
        let n = rd.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    hub.unsubscribe(&conn);
    // Let the writer flush the close reply, then stop it.
    conn.close();
    let _ = writer.await;
    Ok(())
}

/// Registers a `subscribe` and queues its `ack` (with each symbol's current seq).
fn subscribe(hub: &Hub, conn: &Arc<Conn>, payload: &[u8]) {
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return;
    };
    if req["op"] != "subscribe" {
        return;
    }
    let mut last_seq = serde_json::Map::new();
    let mut symbols = Vec::new();
    for s in req["symbols"].as_array().into_iter().flatten() {
        if let Some(s) = s.as_str() {
            last_seq.insert(s.to_string(), hub.subscribe(s, conn).into());
            symbols.push(s);
        }
    }
    let ack = serde_json::json!({
        "type": "ack", "id": req["id"], "op": "subscribe", "symbols": symbols, "last_seq": last_seq,
    });
    conn.push(&text_frame(ack.to_string().as_bytes()));
}

/// Takes one complete client frame off the front of `buf`: (opcode, unmasked payload,
/// bytes used). Fragmentation is not supported (the load-test client does not fragment).
fn next_frame(buf: &mut [u8]) -> anyhow::Result<Option<(u8, Vec<u8>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let n = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            (usize::try_from(n).unwrap_or(usize::MAX), 10)
        }
        126 | 127 => return Ok(None),
        n => (usize::from(n), 2),
    };
    if len > MAX_FRAME {
        bail!("frame of {len} bytes");
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        at += 4;
        Some([buf[at - 4], buf[at - 3], buf[at - 2], buf[at - 1]])
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    Ok(Some((opcode, payload, at + len)))
}

/// Writes everything queued with one `writev` per wake-up (more when the kernel takes
/// part of it), until the connection is closed and its queue is empty.
async fn write_loop(mut wr: OwnedWriteHalf, conn: Arc<Conn>) {
    let mut pending: VecDeque<Arc<[u8]>> = VecDeque::new();
    loop {
        conn.notify.notified().await;
        let closed = {
            let mut q = conn.queue.lock().expect("queue lock");
            std::mem::swap(&mut pending, &mut q.frames);
            q.bytes = 0;
            q.closed
        };
        let mut offset = 0;
        while !pending.is_empty() {
            let slices: Vec<IoSlice<'_>> = pending
                .iter()
                .take(MAX_IOV)
                .enumerate()
                .map(|(i, f)| IoSlice::new(if i == 0 { &f[offset..] } else { f }))
                .collect();
            let Ok(mut n) = wr.write_vectored(&slices).await else {
                return;
            };
            if n == 0 {
                return;
            }
            n += offset;
            offset = 0;
            while let Some(f) = pending.front() {
                if n >= f.len() {
                    n -= f.len();
                    pending.pop_front();
                } else {
                    offset = n;
                    break;
                }
            }
            if pending.is_empty() && offset == 0 {
                // More may have come in while writing: take it in the same wake-up.
                let mut q = conn.queue.lock().expect("queue lock");
                std::mem::swap(&mut pending, &mut q.frames);
                q.bytes = 0;
            }
        }
        if closed {
            let _ = wr.shutdown().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingest_frames_each_tick_once_for_every_subscriber() {
        let hub = Hub::default();
        let a = Arc::new(Conn {
            queue: Mutex::new(Outbox::default()),
            notify: Notify::new(),
            cap: 4096,
        });
        hub.subscribe("A", &a);
        let n = hub.ingest(br#"[{"symbol":"A","ts":1,"price":2,"volume":3,"id":9},{"symbol":"B","ts":1,"price":2,"volume":3,"id":10}]"#);
        assert_eq!(n, 2);
        let q = a.queue.lock().unwrap();
        assert_eq!(q.frames.len(), 1);
        let body = std::str::from_utf8(&q.frames[0][2..]).unwrap();
        assert!(
            body.starts_with(r#"{"type":"tick","symbol":"A","#),
            "{body}"
        );
        assert!(body.contains(r#","seq":1,"t_in":"#), "{body}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["id"], 9);
    }

    #[test]
    fn masked_frame_is_unmasked() {
        let mut f = vec![0x81, 0x80 | 3, 1, 2, 3, 4];
        f.extend([b'a' ^ 1, b'b' ^ 2, b'c' ^ 3]);
        let (op, payload, used) = next_frame(&mut f).unwrap().unwrap();
        assert_eq!((op, payload.as_slice(), used), (1, &b"abc"[..], 9));
    }
}

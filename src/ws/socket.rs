//! One upgraded `/ws` connection's bare `TcpStream`, with RFC 6455 framing done in place.
//!
//! Inbound: [`WsSocket::read_some`] reads what the kernel has into a stack buffer and decodes
//! every complete frame from it; only the tail of an incomplete frame (or a fragmented message)
//! is kept, on the heap, until it completes. Outbound: queued frames are written with one
//! `writev` per burst straight from the shared, serialize-once payloads, so no per-connection
//! write buffer exists and nothing is copied. An idle connection therefore holds the socket and
//! two empty fields: no buffers at all.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::Bytes;
use tokio::net::TcpStream;

use super::frame::{self, opcode, FrameError, Head, MAX_HEADER};

/// Bytes taken from the kernel per read. Client requests are small; a bigger frame simply
/// takes several reads.
const READ_CHUNK: usize = 4096;
/// Slices per `writev`: header and payload of up to 128 frames.
const MAX_IOV: usize = 256;

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (UTF-8 checked).
    Text(String),
    /// A binary message (its content is not kept: clients must send JSON text).
    Binary,
    /// A ping; answered with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The client's close frame, with its code if it sent one.
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The client broke the protocol or a limit.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The client closed the TCP connection.
    #[error("connection closed by peer")]
    Eof,
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// State only a connection in the middle of a frame or a fragmented message needs.
#[derive(Debug, Default)]
struct Partial {
    /// Start of a frame whose end has not arrived.
    carry: Vec<u8>,
    /// Opcode of the fragmented message being reassembled, if any.
    message_opcode: Option<u8>,
    /// Its unmasked payload so far.
    message: Vec<u8>,
}

/// A frame waiting for the kernel to take it.
#[derive(Debug)]
struct Chunk {
    head: [u8; MAX_HEADER],
    head_len: u8,
    payload: Bytes,
}

impl Chunk {
    fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }
}

/// The socket of one client connection.
#[derive(Debug)]
pub struct WsSocket {
    stream: TcpStream,
    max_message: usize,
    partial: Option<Box<Partial>>,
    unsent: VecDeque<Chunk>,
    /// Bytes of `unsent[0]` already written.
    front_written: usize,
}

impl WsSocket {
    /// Wraps an upgraded stream; messages over `max_message` bytes are refused.
    #[must_use]
    pub fn new(stream: TcpStream, max_message: usize) -> Self {
        Self {
            stream,
            max_message,
            partial: None,
            unsent: VecDeque::new(),
            front_written: 0,
        }
    }

    /// Resolves when a read may make progress (data, EOF or an error is waiting).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable().await
    }

    /// Polls for read readiness (data, EOF or an error waiting), registering `cx`.
    ///
    /// # Errors
    /// The socket failed.
    pub fn poll_read_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.stream.poll_read_ready(cx)
    }

    /// Polls for write readiness (room in the socket, or an error), registering `cx`.
    ///
    /// # Errors
    /// The socket failed.
    pub fn poll_write_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.stream.poll_write_ready(cx)
    }

    /// Reads once without waiting and appends every message completed by the bytes read.
    /// Nothing read (a spurious wake-up) leaves `out` untouched.
    ///
    /// # Errors
    /// EOF, a socket error, or a protocol violation (the caller closes with its code).
    pub fn read_some(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let mut chunk = [0u8; READ_CHUNK];
        match self.stream.try_read(&mut chunk) {
            Ok(0) => Err(ReadError::Eof),
            Ok(n) => self.absorb(&chunk[..n], out),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Decodes `fresh` bytes as if just read: for the bytes the HTTP layer read past the
    /// upgrade request (a client may send its first frame right behind the handshake).
    ///
    /// # Errors
    /// A protocol violation.
    pub fn absorb(&mut self, fresh: &[u8], out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let mut joined = match self.partial.as_mut() {
            Some(p) if !p.carry.is_empty() => {
                let mut carry = std::mem::take(&mut p.carry);
                carry.extend_from_slice(fresh);
                Some(carry)
            }
            _ => None,
        };
        let data = joined.as_deref().unwrap_or(fresh);
        let mut at = 0;
        while let Some(head) = frame::decode_head(&data[at..], self.max_message)? {
            let end = at + head.frame_len();
            if end > data.len() {
                break;
            }
            self.on_frame(&head, &data[at + head.payload_start..end], out)?;
            at = end;
        }
        let total = data.len();
        if at < total {
            let rest = match joined.take() {
                // Reuse the joined buffer's allocation for the new carry.
                Some(mut buf) => {
                    buf.drain(..at);
                    buf
                }
                None => fresh[at..].to_vec(),
            };
            self.partial.get_or_insert_with(Box::default).carry = rest;
        } else if self
            .partial
            .as_ref()
            .is_some_and(|p| p.message_opcode.is_none())
        {
            // Nothing half-done: an idle connection keeps no buffers.
            self.partial = None;
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        head: &Head,
        masked: &[u8],
        out: &mut Vec<Incoming>,
    ) -> Result<(), FrameError> {
        let in_message = self
            .partial
            .as_ref()
            .and_then(|p| p.message_opcode)
            .is_some();
        match head.opcode {
            opcode::TEXT | opcode::BINARY if in_message => Err(FrameError::Protocol(
                "a new message started inside a fragmented one",
            )),
            opcode::TEXT | opcode::BINARY if head.fin => {
                let mut payload = Vec::new();
                if head.opcode == opcode::TEXT {
                    frame::unmask_into(masked, head.mask, &mut payload);
                }
                out.push(message(head.opcode, payload)?);
                Ok(())
            }
            opcode::TEXT | opcode::BINARY => {
                let partial = self.partial.get_or_insert_with(Box::default);
                partial.message_opcode = Some(head.opcode);
                frame::unmask_into(masked, head.mask, &mut partial.message);
                Ok(())
            }
            opcode::CONTINUATION => {
                let max = self.max_message;
                let Some(partial) = self.partial.as_mut().filter(|_| in_message) else {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                };
                if partial.message.len() + masked.len() > max {
                    return Err(FrameError::TooBig);
                }
                frame::unmask_into(masked, head.mask, &mut partial.message);
                if head.fin {
                    let kind = partial.message_opcode.take().unwrap_or(opcode::TEXT);
                    let payload = std::mem::take(&mut partial.message);
                    out.push(message(kind, payload)?);
                }
                Ok(())
            }
            opcode::PING => {
                let mut payload = Vec::with_capacity(masked.len());
                frame::unmask_into(masked, head.mask, &mut payload);
                out.push(Incoming::Ping(payload.into()));
                Ok(())
            }
            opcode::PONG => {
                out.push(Incoming::Pong);
                Ok(())
            }
            _ => {
                let mut payload = Vec::with_capacity(masked.len());
                frame::unmask_into(masked, head.mask, &mut payload);
                out.push(Incoming::Close(close_code(&payload)?));
                Ok(())
            }
        }
    }

    /// Queues a text frame; nothing is written until [`WsSocket::flush`] or
    /// [`WsSocket::try_flush`].
    pub fn queue_text(&mut self, payload: Bytes) {
        self.queue(opcode::TEXT, payload);
    }

    /// Queues a frame with `opcode`.
    pub fn queue(&mut self, opcode: u8, payload: Bytes) {
        let mut head = [0u8; MAX_HEADER];
        let head_len = frame::encode_head(opcode, payload.len(), &mut head);
        self.unsent.push_back(Chunk {
            head,
            // At most MAX_HEADER.
            head_len: head_len as u8,
            payload,
        });
    }

    /// Queues a close frame.
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        self.queue(opcode::CLOSE, frame::close_payload(code, reason).into());
    }

    /// Queues bytes that are already framed: the rest of a frame another writer started (a
    /// heartbeat written to a parked connection that the socket only partly took).
    pub fn queue_framed(&mut self, bytes: Bytes) {
        self.unsent.push_back(Chunk {
            head: [0; MAX_HEADER],
            head_len: 0,
            payload: bytes,
        });
    }

    /// Whether nothing is in progress in either direction: no frame half read, no message
    /// half reassembled, nothing waiting for the kernel. Only then may the socket be parked.
    #[must_use]
    pub fn is_quiet(&self) -> bool {
        self.partial.is_none() && self.unsent.is_empty()
    }

    /// The client's address.
    ///
    /// # Errors
    /// The socket failed.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.stream.peer_addr()
    }

    /// Gives the socket back as a std stream, out of the runtime's reactor (still
    /// non-blocking). Call only when [`WsSocket::is_quiet`]: any state in progress is lost.
    ///
    /// # Errors
    /// Deregistering from the reactor failed.
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        debug_assert!(self.is_quiet());
        self.stream.into_std()
    }

    /// Whether queued frames are still waiting for the kernel.
    #[must_use]
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty()
    }

    /// Writes as much of the queue as the kernel takes now; `true` when all of it went.
    ///
    /// # Errors
    /// The socket failed.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        while !self.unsent.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut used = 0;
            let mut skip = self.front_written;
            'fill: for chunk in &self.unsent {
                let head = &chunk.head[..usize::from(chunk.head_len)];
                for part in [head, &chunk.payload[..]] {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    slices[used] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    used += 1;
                    if used == MAX_IOV {
                        break 'fill;
                    }
                }
            }
            match self.stream.try_write_vectored(&slices[..used]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // Give the queue's memory back: idle connections should hold none.
        self.unsent = VecDeque::new();
        Ok(true)
    }

    fn advance(&mut self, written: usize) {
        let mut done = self.front_written + written;
        while let Some(front) = self.unsent.front() {
            if done < front.len() {
                break;
            }
            done -= front.len();
            self.unsent.pop_front();
        }
        self.front_written = done;
    }

    /// Writes the whole queue; `Pending` (with `cx` registered for write readiness) while the
    /// socket is full.
    ///
    /// # Errors
    /// The socket failed.
    pub fn poll_flush(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        loop {
            match self.try_flush() {
                Ok(true) => return std::task::Poll::Ready(Ok(())),
                Ok(false) => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
            match self.stream.poll_write_ready(cx) {
                std::task::Poll::Ready(Ok(())) => {}
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
    }

    /// Writes the whole queue, waiting for the socket as needed.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.try_flush()? {
            self.stream.writable().await?;
        }
        Ok(())
    }
}

fn message(kind: u8, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if kind == opcode::BINARY {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

/// The code in a close frame's payload (RFC 6455 §5.5.1: empty, or a code plus UTF-8 reason).
fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 §7.4: codes a peer may send; 1004-1006 and 1015 are reserved, below
            // 1000 and above 4999 are invalid, 1012-2999 are unassigned.
            if !matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999) {
                return Err(FrameError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::client_frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: the server side wrapped, the client side raw.
    async fn pair(max: usize) -> (WsSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let socket = WsSocket::new(server, max);
        (socket, client)
    }

    /// Reads until `n` messages arrived (or the read fails).
    async fn messages(socket: &mut WsSocket, n: usize) -> Result<Vec<Incoming>, ReadError> {
        let mut out = Vec::new();
        while out.len() < n {
            socket.readable().await?;
            socket.read_some(&mut out)?;
        }
        Ok(out)
    }

    #[tokio::test]
    async fn frames_split_across_reads_and_many_in_one_read() {
        let (mut socket, mut client) = pair(1 << 16).await;
        let mut bytes = client_frame(true, opcode::TEXT, b"first");
        bytes.extend(client_frame(true, opcode::TEXT, &[b'x'; 5000]));
        bytes.extend(client_frame(true, opcode::PING, b"p"));
        // Send in awkward pieces: mid-header, mid-payload.
        for piece in bytes.chunks(3) {
            client.write_all(piece).await.unwrap();
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            messages(&mut socket, 3).await.unwrap()
        })
        .await
        .unwrap();
        assert_eq!(got[0], Incoming::Text("first".into()));
        assert_eq!(got[1], Incoming::Text("x".repeat(5000)));
        assert_eq!(got[2], Incoming::Ping(Bytes::from_static(b"p")));
        assert!(socket.partial.is_none(), "no buffers kept once idle");
    }

    #[tokio::test]
    async fn fragmented_message_with_a_ping_in_between() {
        let (mut socket, mut client) = pair(1 << 16).await;
        let mut bytes = client_frame(false, opcode::TEXT, b"{\"op\":");
        bytes.extend(client_frame(true, opcode::PING, b""));
        bytes.extend(client_frame(false, opcode::CONTINUATION, b"\"ping\""));
        bytes.extend(client_frame(true, opcode::CONTINUATION, b"}"));
        client.write_all(&bytes).await.unwrap();
        let got = messages(&mut socket, 2).await.unwrap();
        assert_eq!(got[0], Incoming::Ping(Bytes::new()));
        assert_eq!(got[1], Incoming::Text(r#"{"op":"ping"}"#.into()));
    }

    #[tokio::test]
    async fn limits_and_violations() {
        let (mut socket, mut client) = pair(10).await;
        let mut bytes = client_frame(false, opcode::TEXT, b"123456");
        bytes.extend(client_frame(true, opcode::CONTINUATION, b"789012"));
        client.write_all(&bytes).await.unwrap();
        let err = messages(&mut socket, 1).await.unwrap_err();
        assert!(
            matches!(err, ReadError::Frame(FrameError::TooBig)),
            "{err:?}"
        );

        let (mut socket, mut client) = pair(100).await;
        client
            .write_all(&client_frame(true, opcode::TEXT, &[0xff, 0xfe]))
            .await
            .unwrap();
        let err = messages(&mut socket, 1).await.unwrap_err();
        assert!(matches!(err, ReadError::Frame(FrameError::InvalidUtf8)));

        let (mut socket, mut client) = pair(100).await;
        client
            .write_all(&client_frame(true, opcode::CONTINUATION, b"x"))
            .await
            .unwrap();
        let err = messages(&mut socket, 1).await.unwrap_err();
        assert!(matches!(err, ReadError::Frame(FrameError::Protocol(_))));

        let (mut socket, client) = pair(100).await;
        drop(client);
        assert!(matches!(
            messages(&mut socket, 1).await.unwrap_err(),
            ReadError::Eof
        ));
    }

    #[tokio::test]
    async fn close_and_binary() {
        let (mut socket, mut client) = pair(100).await;
        let mut bytes = client_frame(true, opcode::BINARY, b"\x00\x01");
        bytes.extend(client_frame(
            true,
            opcode::CLOSE,
            &frame::close_payload(1000, "bye"),
        ));
        client.write_all(&bytes).await.unwrap();
        let got = messages(&mut socket, 2).await.unwrap();
        assert_eq!(got, [Incoming::Binary, Incoming::Close(Some(1000))]);
    }

    #[tokio::test]
    async fn queued_frames_arrive_whole_and_in_order_through_a_full_socket() {
        let (mut socket, mut client) = pair(100).await;
        // Far more than the socket buffers hold, so writes go partial and resume.
        let payload = Bytes::from(vec![b'a'; 100_000]);
        let frames = 200;
        for _ in 0..frames {
            socket.queue_text(payload.clone());
        }
        socket.queue(opcode::PING, Bytes::from_static(b"hb"));
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        socket.flush().await.unwrap();
        assert!(!socket.has_unsent());
        drop(socket);
        let all = reader.await.unwrap();
        let mut at = 0;
        for i in 0..=frames {
            assert_eq!(
                all[at] & 0x0F,
                if i < frames {
                    opcode::TEXT
                } else {
                    opcode::PING
                }
            );
            let (len, start) = match all[at + 1] {
                127 => (
                    u64::from_be_bytes(all[at + 2..at + 10].try_into().unwrap()) as usize,
                    at + 10,
                ),
                126 => (
                    u16::from_be_bytes([all[at + 2], all[at + 3]]) as usize,
                    at + 4,
                ),
                n => (n as usize, at + 2),
            };
            if i < frames {
                assert_eq!(len, 100_000);
                assert!(all[start..start + len].iter().all(|&b| b == b'a'));
            } else {
                assert_eq!(&all[start..start + len], b"hb");
            }
            at = start + len;
        }
        assert_eq!(at, all.len());
    }
}

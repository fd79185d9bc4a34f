//! One upgraded connection's bare `TcpStream` (`/ws` clients and `/ingest` producers), with
//! RFC 6455 framing done in place.
//!
//! Inbound: [`WsSocket::read_some`] reads what the kernel has into a stack buffer and hands it
//! to the [`Decoder`]; only the tail of an incomplete frame (or a fragmented message) is kept,
//! on the heap, until it completes, plus, on a connection that negotiated permessage-deflate,
//! whole frames the decoder's per-read inflate budget left over ([`WsSocket::has_buffered`]),
//! which the next [`WsSocket::read_some`] decodes before it reads anything new. Outbound: queued frames are written with one `writev` per
//! burst straight from the shared, serialize-once payloads, so no per-connection write buffer
//! exists and nothing is copied. An idle connection therefore holds the socket and two empty
//! fields: no buffers at all.
//!
//! Pongs are the one thing a peer makes us send without limit, so they are bounded here. While
//! the kernel takes what we write, every ping gets its pong. Once it refuses (the peer does
//! not read), at most one pong waits that the kernel has not started on (a newer ping replaces
//! its payload; RFC 6455 §5.5.3 allows answering only the most recent ping), and once the pings
//! answered
//! while the kernel took none exceed [`CONTROL_DEBT_CAP`], [`WsSocket::read_paused`] tells the
//! connection to stop reading until the socket drains: a ping flood that never reads meets TCP
//! backpressure instead of growing memory.
//!
//! Over TLS the same socket drives rustls's sync API on the same readiness model: a read
//! feeds what the kernel has to `read_tls`, decrypts (`process_new_packets`) and hands the
//! plaintext to the decoder; a flush moves queued frames into rustls's writer, where they are
//! encrypted, and writes the records with `write_tls`. Encryption is the one copy the TLS path
//! cannot avoid (the shared frames are read once into the record layer, not copied per frame
//! beforehand), and rustls holds at most `server.tls_buffer_bytes` of records the kernel has
//! not taken: past that, frames wait in the queue (and the backlog in the outbound link, where
//! the slow-consumer rule sees it) exactly as on a plain socket. A TLS connection is never
//! quiet enough to park (its rustls state would have to go with it, and the lot writes
//! heartbeats in plain text), see [`WsSocket::can_park`]. Closing, our close_notify follows
//! the WebSocket closing handshake rather than our close frame: a TLS 1.2 peer that sees
//! close_notify shuts down, and its close reply would be lost.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};

use bytes::Bytes;
use tokio::net::TcpStream;

use rustls::ServerConnection;

use super::super::tls::{NonBlocking, Upgraded};
use super::decoder::{Decoder, Incoming};
use super::frame::{self, opcode, FrameError, MAX_HEADER};

/// Bytes taken from the kernel per read. Client requests are small; a bigger frame simply
/// takes several reads.
const READ_CHUNK: usize = 4096;
/// Slices per `writev`: header and payload of up to 128 frames.
const MAX_IOV: usize = 256;
/// Bytes of pongs answered (coalesced ones included) while the kernel took none, above which
/// the connection stops reading: about 30 full-size or 2,000 empty pings. A peer that reads
/// its pongs never comes near it.
pub const CONTROL_DEBT_CAP: usize = 4096;

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
    /// TLS failed after the handshake (a record that does not decrypt, a fatal alert from
    /// the peer); rustls's alert to the peer has been offered to the kernel. (Boxed: the
    /// error is held across awaits in every connection's future, and rustls's is large.)
    #[error("TLS: {0}")]
    Tls(Box<rustls::Error>),
}

/// A frame waiting for the kernel to take it.
#[derive(Debug)]
struct Chunk {
    head: [u8; MAX_HEADER],
    head_len: u8,
    /// A pong, which a newer ping may replace until the kernel starts on it.
    pong: bool,
    payload: Bytes,
}

impl Chunk {
    fn len(&self) -> usize {
        usize::from(self.head_len) + self.payload.len()
    }
}

/// The socket of one connection.
#[derive(Debug)]
pub struct WsSocket {
    stream: TcpStream,
    decoder: Decoder,
    unsent: VecDeque<Chunk>,
    /// Bytes of `unsent[0]` already written.
    front_written: usize,
    /// Pong bytes answered since the kernel last started on a pong (see the module header).
    control_debt: usize,
    /// The kernel refused part of the queue and has not taken all of it since.
    backed_up: bool,
    /// A bigger read buffer than the stack chunk, for connections that carry large frames
    /// (producers); `None` for clients, which keep no buffer while idle.
    /// (A thin pointer to the buffer, so that clients pay 8 bytes for it, not 16: the extra
    /// allocation is made once, for producers only.)
    #[allow(clippy::box_collection)]
    read_buf: Option<Box<Vec<u8>>>,
    /// The rustls state of a TLS connection; `None` on a plain one.
    tls: Option<Box<ServerConnection>>,
    /// A TLS close_notify is to follow the queue: set once our close frame is queued and the
    /// peer's close frame or EOF has arrived (see [`WsSocket::queue_close`]).
    close_notify_due: bool,
}

impl WsSocket {
    /// Wraps an upgraded stream (a bare `TcpStream`, or one with its rustls state); messages
    /// over `max_message` bytes are refused.
    #[must_use]
    pub fn new(stream: impl Into<Upgraded>, max_message: usize) -> Self {
        let (stream, tls) = match stream.into() {
            Upgraded::Plain(stream) => (stream, None),
            Upgraded::Tls(stream, conn) => (stream, Some(conn)),
        };
        Self {
            stream,
            tls,
            close_notify_due: false,
            decoder: Decoder::new(max_message),
            unsent: VecDeque::new(),
            front_written: 0,
            control_debt: 0,
            backed_up: false,
            read_buf: None,
        }
    }

    /// Reads up to `size` bytes per call from now on (a buffer this connection keeps), instead
    /// of the 4 KiB chunk: fewer reads for peers that send large frames.
    pub fn set_read_buffer(&mut self, size: usize) {
        self.read_buf = (size > READ_CHUNK).then(|| Box::new(vec![0; size]));
    }

    /// Resolves when a read may make progress (data, EOF or an error is waiting).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn readable(&self) -> io::Result<()> {
        self.stream.readable().await
    }

    /// Resolves when the socket has room for more output (or failed).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn writable(&self) -> io::Result<()> {
        self.stream.writable().await
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

    /// Whether the connection should stop reading until the socket takes what is queued:
    /// the peer keeps pinging and does not read the pongs (see the module header).
    #[must_use]
    pub fn read_paused(&self) -> bool {
        self.control_debt > CONTROL_DEBT_CAP && !self.unsent.is_empty()
    }

    /// Whether the peer sent its close frame (even a malformed one): once ours is written,
    /// there is nothing left to wait for.
    #[must_use]
    pub fn peer_closed(&self) -> bool {
        self.decoder.peer_closed()
    }

    /// Whether whole frames read earlier wait to be decoded (the decoder stopped at its
    /// inflate budget): the connection calls [`WsSocket::read_some`] again without waiting
    /// for the socket, which then decodes those instead of reading.
    #[must_use]
    pub fn has_buffered(&self) -> bool {
        self.decoder.has_buffered()
    }

    /// Reads once without waiting and appends every message completed by the bytes read.
    /// Nothing read (a spurious wake-up) leaves `out` untouched.
    ///
    /// # Errors
    /// EOF, a socket error, or a protocol violation (the caller closes with its code).
    pub fn read_some(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        // Frames already read but left for this turn (the inflate budget) come first.
        if self.decoder.has_buffered() {
            return self.absorb(&[], out);
        }
        if let Some(mut buf) = self.read_buf.take() {
            let read = self.read_into(&mut buf, out);
            self.read_buf = Some(buf);
            return read;
        }
        let mut chunk = [0u8; READ_CHUNK];
        self.read_into(&mut chunk, out)
    }

    fn read_into(&mut self, buf: &mut [u8], out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        if self.tls.is_some() {
            return self.read_tls_into(buf, out);
        }
        match self.stream.try_read(buf) {
            Ok(0) => Err(ReadError::Eof),
            Ok(n) => self.absorb(&buf[..n], out),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// [`WsSocket::read_into`] over TLS: reads from the kernel into rustls (4 KiB per
    /// `read_tls`) and hands every byte of plaintext that completed, through `buf`, to the
    /// decoder, until the kernel has nothing more or about `buf.len()` bytes were taken: one
    /// wake-up takes as much as a plain read would, not one 4 KiB slice of it.
    fn read_tls_into(&mut self, buf: &mut [u8], out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let mut taken = 0;
        while taken < buf.len() {
            let Some(tls) = self.tls.as_mut() else {
                return Ok(());
            };
            let eof = match tls.read_tls(&mut NonBlocking(&self.stream)) {
                Ok(0) => true,
                Ok(n) => {
                    taken += n;
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            };
            if let Err(e) = tls.process_new_packets() {
                // rustls queued an alert saying why: give it to the kernel if it takes it now.
                let _ = tls.write_tls(&mut NonBlocking(&self.stream));
                tracing::debug!(peer = ?self.stream.peer_addr().ok(), error = %e, "TLS error: connection ends");
                return Err(ReadError::Tls(Box::new(e)));
            }
            // Drained every time: rustls holds at most 16 KiB of plaintext unread.
            loop {
                let n = match tls.reader().read(buf) {
                    // The peer's close_notify: nothing more comes.
                    Ok(0) => return Err(ReadError::Eof),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // EOF without close_notify.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Err(ReadError::Eof)
                    }
                    Err(e) => return Err(e.into()),
                };
                self.decoder.absorb(&buf[..n], out)?;
            }
            if eof {
                return Err(ReadError::Eof);
            }
        }
        // Records rustls answers on its own (a key update): out with them now if the kernel
        // takes them, else they wait in rustls and `has_unsent` says so.
        if let Some(tls) = self.tls.as_mut() {
            if tls.wants_write() {
                match tls.write_tls(&mut NonBlocking(&self.stream)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.backed_up = true,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Decodes `fresh` bytes as if just read: for the bytes the HTTP layer read past the
    /// upgrade request (a client may send its first frame right behind the handshake).
    ///
    /// # Errors
    /// A protocol violation.
    pub fn absorb(&mut self, fresh: &[u8], out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        Ok(self.decoder.absorb(fresh, out)?)
    }

    /// Queues the answer to a ping. Returns `true` when, the socket being backed up, it
    /// replaced the payload of a pong the kernel had not started on (the older ping goes
    /// unanswered, as RFC 6455 allows).
    pub fn queue_pong(&mut self, payload: Bytes) -> bool {
        self.control_debt = self.control_debt.saturating_add(2 + payload.len());
        if !self.backed_up {
            // Between two flushes at most one read's worth of pings (`READ_CHUNK` bytes).
            self.push(opcode::PONG, payload);
            return false;
        }
        let started = usize::from(self.front_written > 0);
        let waiting = self
            .unsent
            .iter_mut()
            .skip(started)
            .rev()
            .find(|chunk| chunk.pong);
        if let Some(chunk) = waiting {
            let mut head = [0u8; MAX_HEADER];
            let head_len = frame::encode_head(opcode::PONG, payload.len(), &mut head);
            chunk.head = head;
            // At most MAX_HEADER.
            chunk.head_len = head_len as u8;
            chunk.payload = payload;
            return true;
        }
        self.push(opcode::PONG, payload);
        false
    }

    /// Queues a text frame; nothing is written until [`WsSocket::flush`] or
    /// [`WsSocket::try_flush`].
    pub fn queue_text(&mut self, payload: Bytes) {
        self.queue(opcode::TEXT, payload);
    }

    /// Queues a data message (text or binary) compressed with permessage-deflate (RSV1 set;
    /// the payload is what `deflate::compress` made). Only for a connection that negotiated
    /// the extension.
    pub fn queue_compressed(&mut self, opcode: u8, payload: Bytes) {
        debug_assert!(opcode == opcode::TEXT || opcode == opcode::BINARY);
        self.push(opcode, payload);
        if let Some(chunk) = self.unsent.back_mut() {
            chunk.head[0] |= frame::RSV1;
        }
    }

    /// Accepts compressed messages from the peer: permessage-deflate was negotiated.
    pub fn inflate_compressed(&mut self) {
        self.decoder.inflate_compressed();
    }

    /// Whether permessage-deflate was negotiated on this connection.
    #[must_use]
    pub fn deflate(&self) -> bool {
        self.decoder.inflates()
    }

    /// Queues a frame with `opcode` (a pong goes through [`WsSocket::queue_pong`]).
    pub fn queue(&mut self, opcode: u8, payload: Bytes) {
        if opcode == opcode::PONG {
            self.queue_pong(payload);
        } else {
            self.push(opcode, payload);
        }
    }

    fn push(&mut self, opcode: u8, payload: Bytes) {
        let mut head = [0u8; MAX_HEADER];
        let head_len = frame::encode_head(opcode, payload.len(), &mut head);
        self.unsent.push_back(Chunk {
            head,
            // At most MAX_HEADER.
            head_len: head_len as u8,
            pong: opcode == opcode::PONG,
            payload,
        });
    }

    /// Queues a close frame. On TLS a close_notify follows it only if the peer's close frame
    /// already came; otherwise [`WsSocket::await_peer_close`] sends it once the peer's close
    /// or EOF arrives (a TLS 1.2 peer that gets close_notify first shuts down, and its close
    /// reply is lost).
    pub fn queue_close(&mut self, code: u16, reason: &str) {
        self.queue(opcode::CLOSE, frame::close_payload(code, reason).into());
        self.close_notify_due = self.tls.is_some() && self.peer_closed();
    }

    /// Queues bytes that are already framed: the rest of a frame another writer started (a
    /// heartbeat written to a parked connection that the socket only partly took), or a run
    /// of ticks the dispatcher framed once for many connections (`outbound::Frame::run`).
    pub fn queue_framed(&mut self, bytes: Bytes) {
        self.unsent.push_back(Chunk {
            head: [0; MAX_HEADER],
            head_len: 0,
            pong: false,
            payload: bytes,
        });
    }

    /// Whether nothing is in progress in either direction: no frame half read, no message
    /// half reassembled, nothing waiting for the kernel. Only then may the socket be parked.
    #[must_use]
    pub fn is_quiet(&self) -> bool {
        self.decoder.is_idle() && !self.has_unsent()
    }

    /// Whether the connection may leave the runtime for the parking lot: plain ones only
    /// (see the module header).
    #[must_use]
    pub fn can_park(&self) -> bool {
        self.tls.is_none()
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
        if self.tls.is_some() {
            return Err(io::Error::other("a TLS connection cannot park"));
        }
        self.stream.into_std()
    }

    /// Whether queued frames are still waiting for the kernel.
    #[must_use]
    pub fn has_unsent(&self) -> bool {
        !self.unsent.is_empty() || self.tls.as_ref().is_some_and(|tls| tls.wants_write())
    }

    /// Writes as much of the queue as the kernel takes now; `true` when all of it went.
    ///
    /// # Errors
    /// The socket failed.
    pub fn try_flush(&mut self) -> io::Result<bool> {
        if self.tls.is_some() {
            return self.try_flush_tls();
        }
        while !self.unsent.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let used = Self::slices(&self.unsent, self.front_written, &mut slices);
            match self.stream.try_write_vectored(&slices[..used]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.backed_up = true;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        // Give the queue's memory back: idle connections should hold none.
        self.unsent = VecDeque::new();
        self.control_debt = 0;
        self.backed_up = false;
        Ok(true)
    }

    /// Fills up to [`MAX_IOV`] slices with the queue, past what was already written.
    fn slices<'a>(
        unsent: &'a VecDeque<Chunk>,
        front_written: usize,
        slices: &mut [IoSlice<'a>; MAX_IOV],
    ) -> usize {
        let mut used = 0;
        let mut skip = front_written;
        for chunk in unsent {
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
                    return used;
                }
            }
        }
        used
    }

    /// [`WsSocket::try_flush`] over TLS: records rustls holds go to the kernel first; while it
    /// takes them, queued frames are encrypted into rustls (up to its buffer limit) and follow.
    fn try_flush_tls(&mut self) -> io::Result<bool> {
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return Ok(true);
            };
            while tls.wants_write() {
                match tls.write_tls(&mut NonBlocking(&self.stream)) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.backed_up = true;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            }
            if self.unsent.is_empty() {
                if std::mem::take(&mut self.close_notify_due) {
                    tls.send_close_notify();
                    continue;
                }
                break;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let used = Self::slices(&self.unsent, self.front_written, &mut slices);
            // rustls's buffer is empty here, so it takes at least one record's worth.
            match tls.writer().write_vectored(&slices[..used]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) => return Err(e),
            }
        }
        self.unsent = VecDeque::new();
        self.control_debt = 0;
        self.backed_up = false;
        Ok(true)
    }

    fn advance(&mut self, written: usize) {
        let mut done = self.front_written + written;
        let mut pong_started = false;
        while let Some(front) = self.unsent.front() {
            if done < front.len() {
                pong_started |= front.pong && done > 0;
                break;
            }
            pong_started |= front.pong;
            done -= front.len();
            self.unsent.pop_front();
        }
        self.front_written = done;
        if pong_started {
            // The peer is taking our pongs: it may ping again.
            self.control_debt = 0;
        }
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

    /// After our close frame went out: waits (at most `wait`) for the peer's close frame or
    /// EOF, so that the peer, not us, ends the TCP connection (RFC 6455 §7.1.1). Returns at
    /// once if the peer's close already came, even a malformed one: there is nothing left to
    /// wait for, and holding the connection only delays a peer that waits for our FIN.
    ///
    /// On TLS our close_notify goes out then (if the kernel takes it at once): the WebSocket
    /// closing handshake is over, or the peer is not going to finish it.
    pub async fn await_peer_close(&mut self, wait: std::time::Duration) {
        if !self.peer_closed() {
            let _ = tokio::time::timeout(wait, async {
                let mut seen = Vec::new();
                while self.readable().await.is_ok() {
                    if self.read_some(&mut seen).is_err() || self.peer_closed() {
                        return;
                    }
                    seen.clear();
                }
            })
            .await;
        }
        if self.tls.is_some() {
            self.close_notify_due = true;
            let _ = self.try_flush();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ws::frame::client_frame;
    use std::sync::Arc;
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
        assert!(socket.decoder.is_idle(), "no buffers kept once idle");
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
    async fn pongs_to_a_peer_that_does_not_read_coalesce_and_pause_reading() {
        let (mut socket, _client) = pair(100).await;
        // While the kernel takes them, every ping gets its pong.
        assert!(!socket.queue_pong(Bytes::from_static(b"a")));
        assert!(!socket.queue_pong(Bytes::from_static(b"b")));
        assert!(socket.try_flush().unwrap());
        // Fill the socket: the client never reads.
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        while socket.try_flush().unwrap() {
            socket.queue_text(big.clone());
        }
        let before = socket.unsent.len();
        let mut paused_at = None;
        for i in 0..10_000u32 {
            let payload = Bytes::from(format!("{i:0>100}"));
            let replaced = socket.queue_pong(payload);
            assert_eq!(replaced, i > 0, "ping {i}");
            if paused_at.is_none() && socket.read_paused() {
                paused_at = Some(i);
            }
        }
        // One pong waits, carrying the most recent ping's payload.
        assert_eq!(socket.unsent.len(), before + 1);
        let pong = socket.unsent.back().unwrap();
        assert!(pong.pong);
        assert_eq!(&pong.payload[..], format!("{:0>100}", 9_999).as_bytes());
        // Reading stopped once the answered pings passed the cap.
        let paused_at = paused_at.expect("reading never paused") as usize;
        assert!((paused_at + 1) * 102 > CONTROL_DEBT_CAP && paused_at * 102 <= CONTROL_DEBT_CAP);
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
        assert_eq!(
            got,
            [Incoming::Binary(vec![0, 1]), Incoming::Close(Some(1000))]
        );
    }

    /// Queues 200 frames of 100 kB (far more than the socket buffers hold, so writes go
    /// partial and resume) and then the frame `last` adds, flushes them all while `client`
    /// reads, and checks that everything arrived whole and in order, ending with `last_frame`.
    async fn big_frames_arrive_in_order(
        mut socket: WsSocket,
        mut client: impl tokio::io::AsyncRead + Unpin + Send + 'static,
        last: impl FnOnce(&mut WsSocket),
        last_frame: (u8, &[u8]),
    ) {
        let payload = Bytes::from(vec![b'a'; 100_000]);
        let frames = 200;
        for _ in 0..frames {
            socket.queue_text(payload.clone());
        }
        last(&mut socket);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            // Over TLS this ends at our close_notify: a clean close, no truncation error.
            client.read_to_end(&mut all).await.unwrap();
            all
        });
        socket.flush().await.unwrap();
        assert!(!socket.has_unsent());
        // This peer never answers: end at once (over TLS, that sends our close_notify).
        socket.await_peer_close(std::time::Duration::ZERO).await;
        drop(socket);
        let all = reader.await.unwrap();
        let mut at = 0;
        for i in 0..=frames {
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
                assert_eq!(all[at] & 0x0F, opcode::TEXT);
                assert_eq!(len, 100_000);
                assert!(all[start..start + len].iter().all(|&b| b == b'a'));
            } else {
                assert_eq!(all[at] & 0x0F, last_frame.0);
                assert_eq!(&all[start..start + len], last_frame.1);
            }
            at = start + len;
        }
        assert_eq!(at, all.len());
    }

    #[tokio::test]
    async fn queued_frames_arrive_whole_and_in_order_through_a_full_socket() {
        let (socket, client) = pair(100).await;
        let ping = |s: &mut WsSocket| s.queue(opcode::PING, Bytes::from_static(b"hb"));
        big_frames_arrive_in_order(socket, client, ping, (opcode::PING, b"hb")).await;
    }

    /// A connected TLS pair: the server side taken apart and wrapped as after an upgrade,
    /// the client side a tokio-rustls stream trusting a CA made here.
    async fn tls_pair(max: usize) -> (WsSocket, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server, client) = tls_streams().await;
        let (upgraded, early) = crate::transport::tls::take_apart(server, Bytes::new()).unwrap();
        assert!(early.is_empty());
        (WsSocket::new(upgraded, max), client)
    }

    /// Both ends of a TLS connection after the handshake, as tokio-rustls streams.
    async fn tls_streams() -> (
        tokio_rustls::server::TlsStream<TcpStream>,
        tokio_rustls::client::TlsStream<TcpStream>,
    ) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use rustls::pki_types::{PrivateKeyDer, ServerName};

        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (tcp, accepted) = tokio::join!(connect, listener.accept());
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp.unwrap()),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(accepted.unwrap().0),
        );
        let mut server = server.unwrap();
        // Small, so the write path meets rustls's limit as well as the kernel's.
        server.get_mut().1.set_buffer_limit(Some(16 * 1024));
        (server, client.unwrap())
    }

    /// A frame that came in the same TLS record as the end of the upgrade request is already
    /// decrypted inside rustls when hyper lets go; no readiness event will announce it, so
    /// taking the stream apart hands it over with the early bytes.
    #[tokio::test]
    async fn plaintext_rustls_already_holds_comes_out_as_early_bytes() {
        let (mut server, mut client) = tls_streams().await;
        let mut record = b"HEAD".to_vec();
        record.extend(client_frame(true, opcode::TEXT, b"behind"));
        client.write_all(&record).await.unwrap();
        client.flush().await.unwrap();
        let mut head = [0u8; 4];
        server.read_exact(&mut head).await.unwrap();
        let (upgraded, early) = crate::transport::tls::take_apart(server, Bytes::new()).unwrap();
        let mut socket = WsSocket::new(upgraded, 100);
        let mut got = Vec::new();
        socket.absorb(&early, &mut got).unwrap();
        assert_eq!(got, [Incoming::Text("behind".into())]);
    }

    /// Bytes waiting in the kernel's receive queue of `stream`.
    fn kernel_queued(stream: &TcpStream) -> usize {
        use std::os::fd::AsRawFd;
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points at `n`.
        let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0, "FIONREAD failed");
        usize::try_from(n).unwrap()
    }

    /// Encrypts `plain` on the client's rustls connection and writes the records in one go;
    /// returns how many bytes went on the wire.
    async fn send_records(
        client: &mut tokio_rustls::client::TlsStream<TcpStream>,
        plain: &[u8],
    ) -> usize {
        let (tcp, conn) = client.get_mut();
        conn.writer().write_all(plain).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        tcp.write_all(&wire).await.unwrap();
        wire.len()
    }

    /// Waits (with a deadline) until the server's kernel holds all `n` bytes sent to it.
    async fn until_queued(socket: &WsSocket, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while kernel_queued(&socket.stream) < n {
            assert!(std::time::Instant::now() < deadline, "bytes never arrived");
            tokio::task::yield_now().await;
        }
    }

    /// One read over TLS takes as much as the read buffer holds, not the 4 KiB rustls takes
    /// per `read_tls`: a producer's wake-up decodes every frame that is there.
    #[tokio::test]
    async fn one_tls_read_takes_a_read_buffer_full() {
        let (mut socket, mut client) = tls_pair(1 << 16).await;
        socket.set_read_buffer(64 * 1024);
        let mut plain = Vec::new();
        for i in 0..10u8 {
            plain.extend(client_frame(true, opcode::BINARY, &[i; 4_000]));
        }
        let sent = send_records(&mut client, &plain).await;
        until_queued(&socket, sent).await;
        socket.readable().await.unwrap();
        let mut got = Vec::new();
        socket.read_some(&mut got).unwrap();
        assert_eq!(got.len(), 10, "one read decoded {} of 10 frames", got.len());
        assert_eq!(got[9], Incoming::Binary(vec![9; 4_000]));
        assert_eq!(kernel_queued(&socket.stream), 0);
    }

    /// Our close frame goes out alone: the close_notify waits for the peer's close frame (a
    /// TLS 1.2 peer that sees close_notify first shuts down, and its close reply is lost),
    /// then follows it, so the peer's read ends cleanly.
    #[tokio::test]
    async fn tls_close_notify_waits_for_the_peers_close_frame() {
        use futures_util::FutureExt;
        let (mut socket, mut client) = tls_pair(100).await;
        socket.queue_close(1000, "bye");
        socket.flush().await.unwrap();
        let mut ours = [0u8; 7];
        client.read_exact(&mut ours).await.unwrap();
        assert_eq!(&ours[2..], &frame::close_payload(1000, "bye")[..]);
        // Everything the server wrote is in our kernel (loopback): no close_notify among it.
        let mut more = [0u8; 16];
        let early = client.read(&mut more).now_or_never();
        assert!(
            early.is_none(),
            "close_notify came before our close reply: {early:?}"
        );
        let reply = client_frame(true, opcode::CLOSE, &frame::close_payload(1000, "ok"));
        client.write_all(&reply).await.unwrap();
        client.flush().await.unwrap();
        socket
            .await_peer_close(std::time::Duration::from_secs(10))
            .await;
        assert!(socket.peer_closed());
        drop(socket);
        // A clean end: close_notify, not a bare FIN (which reads as UnexpectedEof).
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// When the peer closed first, our close frame is the reply and close_notify follows it
    /// at once.
    #[tokio::test]
    async fn tls_close_notify_follows_the_reply_to_a_peers_close() {
        let (mut socket, mut client) = tls_pair(100).await;
        let close = client_frame(true, opcode::CLOSE, &frame::close_payload(1000, "done"));
        client.write_all(&close).await.unwrap();
        client.flush().await.unwrap();
        let got = messages(&mut socket, 1).await.unwrap();
        assert_eq!(got, [Incoming::Close(Some(1000))]);
        socket.queue_close(1000, "bye");
        socket.flush().await.unwrap();
        let mut all = Vec::new();
        // Ends at the close_notify while the server still holds the socket.
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_to_end(&mut all),
        )
        .await
        .expect("no close_notify after the close reply")
        .unwrap();
        assert_eq!(&all[2..], &frame::close_payload(1000, "bye")[..]);
        drop(socket);
    }

    /// A TLS 1.3 key update from the peer asks for ours: rustls queues it while reading, and
    /// the read path writes it (nothing else would, on a connection with nothing to send).
    /// Both directions keep working under the new keys, twice over.
    #[tokio::test]
    async fn tls_key_updates_are_answered_from_the_read_path() {
        let (mut socket, mut client) = tls_pair(100).await;
        for round in 0..2u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client
                .write_all(&client_frame(true, opcode::TEXT, &[b'a' + round]))
                .await
                .unwrap();
            client.flush().await.unwrap();
            let got = messages(&mut socket, 1).await.unwrap();
            assert_eq!(got, [Incoming::Text(char::from(b'a' + round).to_string())]);
            // The answer went out while reading: nothing is left for a flush to send.
            assert!(!socket.has_unsent());
            socket.queue_text(Bytes::from(vec![b'x' + round]));
            socket.flush().await.unwrap();
            let mut frame = [0u8; 3];
            client.read_exact(&mut frame).await.unwrap();
            assert_eq!(frame, [0x81, 1, b'x' + round]);
        }
    }

    #[tokio::test]
    async fn tls_frames_split_across_records_and_reads() {
        let (mut socket, mut client) = tls_pair(1 << 16).await;
        let mut bytes = client_frame(true, opcode::TEXT, b"first");
        bytes.extend(client_frame(true, opcode::TEXT, &[b'x'; 40_000]));
        bytes.extend(client_frame(true, opcode::PING, b"p"));
        // Records cut mid-header and mid-payload, and one frame over several records.
        for piece in bytes.chunks(7_001) {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            messages(&mut socket, 3).await.unwrap()
        })
        .await
        .unwrap();
        assert_eq!(got[0], Incoming::Text("first".into()));
        assert_eq!(got[1], Incoming::Text("x".repeat(40_000)));
        assert_eq!(got[2], Incoming::Ping(Bytes::from_static(b"p")));
        // A TLS connection stays on the runtime.
        assert!(!socket.can_park());
    }

    #[tokio::test]
    async fn tls_frames_arrive_whole_and_in_order_through_a_full_socket() {
        // The kernel and rustls's 16 KiB both fill: the flush goes partial many times.
        let (socket, client) = tls_pair(100).await;
        let close = |s: &mut WsSocket| s.queue_close(1000, "done");
        let payload = frame::close_payload(1000, "done");
        big_frames_arrive_in_order(socket, client, close, (opcode::CLOSE, &payload)).await;
    }
}

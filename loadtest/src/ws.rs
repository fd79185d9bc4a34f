//! A small RFC 6455 client for the hot read path. Reading through tokio-tungstenite's
//! `WebSocketStream` (a `Bytes` and a small read per frame, the stream machinery per
//! message) was a large part of the ~410 ns of CPU the client spent per delivered tick,
//! which at millions of deliveries per second made the load generator the bottleneck. Here
//! one `read()` fills a buffer, and every complete frame in it is handed over as a slice of
//! that buffer: no allocation and no copy per message.
//!
//! - The read buffer belongs to the worker thread ([`SCRATCH`]), not to the connection, so
//!   19,000 idle connections cost no read buffer at all. A connection keeps only the
//!   incomplete tail of its last read ([`WsIn::carry`]), usually empty or a few hundred
//!   bytes. A frame too large for the thread's buffer is read straight into the carry.
//! - Errors are `tungstenite` errors with the variants tungstenite itself would return for
//!   the same bytes, so the close/error tallies keep their names.
//! - What this client sends (subscribe, pong, close) is masked, as a client must.
//!
//! The handshake is done here too: tungstenite would keep any bytes that followed its 101
//! response (the server's `welcome` often does) in a buffer that cannot be taken back.
//!
//! `--deflate` ([`set_deflate`]): subscribers offer permessage-deflate (as browsers do),
//! require the server's answer, and inflate each compressed (RSV1) text message into the
//! thread's inflate buffer before handing it over, so ticks are checked as usual. The server
//! compresses every message on its own, so one inflater per thread, reset per message, serves
//! every connection.

use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::client::{generate_request, Request};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::Error as WsError;

/// Largest frame accepted (tungstenite's default `max_frame_size`).
pub const MAX_FRAME: usize = 16 << 20;
/// Largest message accepted, fragments included (tungstenite's default `max_message_size`).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Largest handshake response read before giving up (tungstenite's attack check bound).
const MAX_RESPONSE: usize = 64 * 1024;
/// Response headers parsed at most (tungstenite's `MAX_HEADERS`).
const MAX_HEADERS: usize = 124;

/// A carry at least this long is read into directly instead of being copied into the
/// thread's buffer first: a big frame arriving over many reads is then copied once.
const BIG_CARRY: usize = 16 * 1024;
/// An empty carry with more capacity than this gives its memory back.
const KEEP_CARRY: usize = 64 * 1024;

pub const OP_CONTINUE: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Bytes one read asks for (`--read-buffer-kb`); the thread buffer is this plus the carry.
static READ_SIZE: AtomicUsize = AtomicUsize::new(64 * 1024);

pub fn set_read_size(bytes: usize) {
    READ_SIZE.store(bytes.max(1024), Relaxed);
}

/// `--deflate`: subscribers offer permessage-deflate and inflate compressed messages.
static DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What `--deflate` offers: the browsers' offer.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

pub fn set_deflate(on: bool) {
    DEFLATE.store(on, Relaxed);
}

/// Whether `--deflate` is on.
pub fn deflate() -> bool {
    DEFLATE.load(Relaxed)
}

/// One compressed message inflated (RFC 7692 §7.2.2: the `00 00 ff ff` tail added back).
fn inflate(payload: &[u8], out: &mut Vec<u8>) -> Result<(), WsError> {
    use flate2::{Decompress, FlushDecompress};
    thread_local! {
        static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    }
    INFLATER.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        out.clear();
        out.reserve(payload.len() * 4 + 256);
        for input in [payload, &[0, 0, 0xff, 0xff][..]] {
            let mut at = 0;
            loop {
                let before = d.total_in();
                let status = d
                    .decompress_vec(&input[at..], out, FlushDecompress::Sync)
                    .map_err(|_| WsError::Protocol(ProtocolError::NonZeroReservedBits))?;
                at += usize::try_from(d.total_in() - before).unwrap_or(0);
                if at == input.len() && out.len() < out.capacity() {
                    break;
                }
                if out.len() > MAX_MESSAGE {
                    return Err(CapacityError::MessageTooLong {
                        size: out.len(),
                        max_size: MAX_MESSAGE,
                    }
                    .into());
                }
                if status == flate2::Status::StreamEnd {
                    break;
                }
                out.reserve(out.capacity());
            }
        }
        Ok(())
    })
}

thread_local! {
    /// The worker thread's read buffer: every connection polled on this thread reads into
    /// it and parses it before returning. Its length is its capacity (zeroed once).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The thread's inflate output (`--deflate`), reused for every compressed message.
    static INFLATED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// State of the mask generator (xorshift64*), seeded per thread.
    static MASK_STATE: std::cell::Cell<u64> = std::cell::Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(std::ptr::addr_of!(READ_SIZE) as usize);
        h.finish() | 1
    });
}

/// One message (or control frame) from the server. Slices borrow the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    /// A complete text message, valid UTF-8 (checked), as bytes.
    Text(&'a [u8]),
    /// A complete binary message: only its length.
    Binary(usize),
    /// A ping: the caller answers it with [`encode_pong`].
    Ping(&'a [u8]),
    Pong,
    /// A close frame: its code (codes a peer may not send read as 1002, as tungstenite
    /// reports them), or `None` without a body.
    Close(Option<u16>),
}

/// Whether parsing goes on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv: bool,
    /// RSV1 alone: a permessage-deflate message.
    compressed: bool,
    opcode: u8,
    masked: bool,
    /// Header bytes, mask key included.
    len: usize,
    payload: usize,
}

/// Parses the header at the start of `buf`: `None` while it is incomplete.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let masked = b1 & 0x80 != 0;
    let (mut len, payload) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (4, u64::from(u16::from_be_bytes([b[0], b[1]]))),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (10, u64::from_be_bytes(b.try_into().expect("8 bytes"))),
            None => return Ok(None),
        },
        n => (2, u64::from(n)),
    };
    if masked {
        len += 4;
        if buf.len() < len {
            return Ok(None);
        }
    }
    let opcode = b0 & 0x0F;
    if matches!(opcode, 3..=7 | 0xB..=0xF) {
        return Err(ProtocolError::InvalidOpcode(opcode).into());
    }
    let payload = usize::try_from(payload).unwrap_or(usize::MAX);
    if payload > MAX_FRAME {
        return Err(CapacityError::MessageTooLong {
            size: payload,
            max_size: MAX_FRAME,
        }
        .into());
    }
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70 != 0,
        compressed: b0 & 0x70 == 0x40,
        opcode,
        masked,
        len,
        payload,
    }))
}

/// Total length of the first frame in `buf` once its header is complete.
fn first_frame_len(buf: &[u8]) -> Option<usize> {
    parse_header(buf).ok().flatten().map(|h| h.len + h.payload)
}

fn utf8_error(bytes: &[u8]) -> WsError {
    WsError::Utf8(String::from_utf8_lossy(bytes).into_owned())
}

/// The UTF-8 check of a text payload: ASCII (every tick) in a couple of ns, the rest by
/// the full check.
fn check_utf8(bytes: &[u8]) -> Result<(), WsError> {
    if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
        Ok(())
    } else {
        Err(utf8_error(bytes))
    }
}

/// A fragmented data message being put together.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// Frame parser state that outlives one buffer: a fragmented message in progress.
#[derive(Debug, Default)]
pub struct Parser {
    partial: Option<Partial>,
}

impl Parser {
    /// Hands every complete frame at the start of `buf` to `on`, in order, until only an
    /// incomplete frame is left, `on` returns [`Flow::Stop`], or `max_texts` text messages
    /// were handed over. Returns the bytes consumed and the last flow. Checks what
    /// tungstenite checks, in the same order, with the same errors.
    ///
    /// # Errors
    /// A protocol, size or UTF-8 violation; the connection is then done.
    pub fn parse(
        &mut self,
        buf: &[u8],
        max_texts: usize,
        on: &mut impl FnMut(Msg<'_>) -> Flow,
    ) -> Result<(usize, Flow), WsError> {
        let mut pos = 0;
        let mut texts = 0;
        while texts < max_texts {
            let rest = &buf[pos..];
            let Some(h) = parse_header(rest)? else { break };
            let end = h.len + h.payload;
            if rest.len() < end {
                break;
            }
            let payload = &rest[h.len..end];
            pos += end;
            if h.rsv && h.compressed && h.fin && h.opcode == OP_TEXT && deflate() {
                // The server never fragments what it compresses.
                if self.partial.is_some() {
                    return Err(ProtocolError::ExpectedFragment(Data::Text).into());
                }
                texts += 1;
                let flow = INFLATED.with(|cell| {
                    let mut text = cell.borrow_mut();
                    inflate(payload, &mut text)?;
                    check_utf8(&text)?;
                    Ok::<_, WsError>(on(Msg::Text(&text)))
                })?;
                if flow == Flow::Stop {
                    return Ok((pos, flow));
                }
                continue;
            }
            if h.rsv {
                return Err(ProtocolError::NonZeroReservedBits.into());
            }
            if h.masked {
                return Err(ProtocolError::MaskedFrameFromServer.into());
            }
            let msg = match h.opcode {
                OP_CLOSE | OP_PING | OP_PONG if !h.fin => {
                    return Err(ProtocolError::FragmentedControlFrame.into())
                }
                OP_CLOSE | OP_PING | OP_PONG if h.payload > 125 => {
                    return Err(ProtocolError::ControlFrameTooBig.into())
                }
                OP_CLOSE => Msg::Close(close_code(payload)?),
                OP_PING => Msg::Ping(payload),
                OP_PONG => Msg::Pong,
                OP_CONTINUE => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(ProtocolError::UnexpectedContinueFrame.into());
                    };
                    if p.data.len() + payload.len() > MAX_MESSAGE {
                        return Err(CapacityError::MessageTooLong {
                            size: p.data.len() + payload.len(),
                            max_size: MAX_MESSAGE,
                        }
                        .into());
                    }
                    p.data.extend_from_slice(payload);
                    if !h.fin {
                        continue;
                    }
                    let p = self.partial.take().expect("checked above");
                    texts += usize::from(p.text);
                    let flow = if p.text {
                        check_utf8(&p.data)?;
                        on(Msg::Text(&p.data))
                    } else {
                        on(Msg::Binary(p.data.len()))
                    };
                    if flow == Flow::Stop {
                        return Ok((pos, flow));
                    }
                    continue;
                }
                OP_TEXT | OP_BINARY => {
                    let text = h.opcode == OP_TEXT;
                    if self.partial.is_some() {
                        let data = if text { Data::Text } else { Data::Binary };
                        return Err(ProtocolError::ExpectedFragment(data).into());
                    }
                    if !h.fin {
                        self.partial = Some(Partial {
                            text,
                            data: payload.to_vec(),
                        });
                        continue;
                    }
                    if text {
                        texts += 1;
                        check_utf8(payload)?;
                        Msg::Text(payload)
                    } else {
                        Msg::Binary(payload.len())
                    }
                }
                op => return Err(ProtocolError::InvalidOpcode(op).into()),
            };
            if on(msg) == Flow::Stop {
                return Ok((pos, Flow::Stop));
            }
        }
        Ok((pos, Flow::Continue))
    }
}

/// The code of a close frame's body, as tungstenite reports it.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidCloseSequence.into()),
        [hi, lo, reason @ ..] => {
            if std::str::from_utf8(reason).is_err() {
                return Err(utf8_error(reason));
            }
            let code = CloseCode::from(u16::from_be_bytes([*hi, *lo]));
            // A code a peer must not send is reported as a protocol error (1002).
            let code = if code.is_allowed() {
                code
            } else {
                CloseCode::Protocol
            };
            Ok(Some(u16::from(code)))
        }
    }
}

/// A fresh masking key. RFC 6455 wants it unpredictable to in-path proxies; a per-thread
/// xorshift seeded from the std random hasher keys is plenty for a loopback load test.
fn mask_key() -> [u8; 4] {
    MASK_STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        #[allow(clippy::cast_possible_truncation)]
        let k = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32;
        k.to_ne_bytes()
    })
}

/// One unmasked frame as a server sends it: the `ceiling` server's frames, and the input of
/// this reader's tests.
pub fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 10);
    v.push(u8::from(fin) << 7 | opcode);
    match payload.len() {
        #[allow(clippy::cast_possible_truncation)]
        n @ 0..=125 => v.push(n as u8),
        #[allow(clippy::cast_possible_truncation)]
        n @ 126..=0xFFFF => {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    v.extend_from_slice(payload);
    v
}

/// Appends one final, masked client frame to `out`.
pub fn encode(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    encode_with_mask(opcode, payload, mask_key(), out);
}

/// The header is tungstenite's `FrameHeader::format` (no copy of the encoder here; the
/// reader above stays this crate's own, so it does not share the server's bugs).
fn encode_with_mask(opcode: u8, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
    out.reserve(14 + payload.len());
    let head = FrameHeader {
        opcode: OpCode::from(opcode),
        mask: Some(mask),
        ..FrameHeader::default()
    };
    // Writing into a `Vec` cannot fail.
    let _ = head.format(payload.len() as u64, out);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// The pong answering a ping with `payload`.
pub fn encode_pong(payload: &[u8], out: &mut Vec<u8>) {
    encode(OP_PONG, payload, out);
}

/// A close frame with `code` and `reason`.
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(2 + reason.len());
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(reason.as_bytes());
    encode(OP_CLOSE, &body, out);
}

/// What one [`WsIn::poll_step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Frames were parsed (perhaps none: the read ended inside a frame); the flow is that
    /// of the last message handed over.
    Parsed(Flow),
    /// The peer closed the TCP stream.
    Eof,
}

/// The receive side of one connection: the frame parser and the unparsed tail.
#[derive(Debug, Default)]
pub struct WsIn {
    parser: Parser,
    /// Bytes read but not parsed yet: an incomplete frame, or frames left over when a
    /// step stopped early (`max_texts`, [`Flow::Stop`]).
    carry: Vec<u8>,
}

impl WsIn {
    /// Starts with the bytes that came in behind the handshake response.
    pub fn new(leftover: Vec<u8>) -> Self {
        Self {
            parser: Parser::default(),
            carry: leftover,
        }
    }

    /// Whether the carry starts with a complete frame (or a broken header), so that a
    /// step can run without reading.
    fn carry_ready(&self) -> bool {
        match parse_header(&self.carry) {
            Ok(Some(h)) => self.carry.len() >= h.len + h.payload,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// One step: parses frames left in the carry if it starts with a complete one, else
    /// reads once and parses everything complete. `on` gets each message and the receipt
    /// time (µs since the epoch, from `now`), taken once per step: the frames of one read
    /// arrived together. Cancel-safe: nothing is consumed unless it returns `Ready`.
    pub fn poll_step<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut R,
        max_texts: usize,
        now: impl Fn() -> u64,
        on: &mut impl FnMut(Msg<'_>, u64) -> Flow,
    ) -> Poll<Result<Step, WsError>> {
        if self.carry_ready() {
            let t = now();
            let (used, flow) = self
                .parser
                .parse(&self.carry, max_texts, &mut |m| on(m, t))?;
            self.carry.drain(..used);
            self.shrink_carry();
            return Poll::Ready(Ok(Step::Parsed(flow)));
        }
        let read_size = READ_SIZE.load(Relaxed);
        let need = first_frame_len(&self.carry).unwrap_or(0);
        if self.carry.len() >= BIG_CARRY || need > read_size {
            return self.poll_step_in_carry(cx, stream, need.max(read_size), max_texts, now, on);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let keep = self.carry.len();
            if scratch.len() < keep + read_size {
                scratch.resize(keep + read_size, 0);
            }
            scratch[..keep].copy_from_slice(&self.carry);
            let mut rb = ReadBuf::new(&mut scratch[keep..keep + read_size]);
            match Pin::new(stream).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(Step::Eof));
            }
            let t = now();
            let filled = &scratch[..keep + n];
            let (used, flow) = self.parser.parse(filled, max_texts, &mut |m| on(m, t))?;
            self.carry.clear();
            self.carry.extend_from_slice(&filled[used..]);
            self.shrink_carry();
            Poll::Ready(Ok(Step::Parsed(flow)))
        })
    }

    /// The step for a big frame: reads at least `chunk` bytes' room straight into the
    /// carry, so that a frame arriving over many reads is not copied again every time.
    fn poll_step_in_carry<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut R,
        chunk: usize,
        max_texts: usize,
        now: impl Fn() -> u64,
        on: &mut impl FnMut(Msg<'_>, u64) -> Flow,
    ) -> Poll<Result<Step, WsError>> {
        let keep = self.carry.len();
        let room = chunk.saturating_sub(keep).max(READ_SIZE.load(Relaxed));
        self.carry.reserve(room);
        let mut rb = ReadBuf::uninit(&mut self.carry.spare_capacity_mut()[..room]);
        let polled = Pin::new(stream).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        // SAFETY: `ReadBuf` guarantees that its first `n` (filled) bytes, which are the
        // carry's spare capacity right after its length, were initialized by the read.
        unsafe { self.carry.set_len(keep + n) };
        match polled {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(())) if n == 0 => return Poll::Ready(Ok(Step::Eof)),
            Poll::Ready(Ok(())) => {}
        }
        let t = now();
        let (used, flow) = self
            .parser
            .parse(&self.carry, max_texts, &mut |m| on(m, t))?;
        self.carry.drain(..used);
        self.shrink_carry();
        Poll::Ready(Ok(Step::Parsed(flow)))
    }

    fn shrink_carry(&mut self) {
        if self.carry.is_empty() && self.carry.capacity() > KEEP_CARRY {
            self.carry = Vec::new();
        }
    }
}

/// The client handshake: sends the upgrade `request` (built by tungstenite from the URL
/// and headers), checks the 101 response as tungstenite does, and returns the bytes that
/// followed the response.
///
/// # Errors
/// The error tungstenite would have returned (I/O, HTTP status, missing headers, ...).
pub async fn handshake(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    request: Request,
) -> Result<Vec<u8>, WsError> {
    let (bytes, key) = generate_request(request)?;
    stream.write_all(&bytes).await?;
    let accept = derive_accept_key(key.as_bytes());
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_RESPONSE {
            return Err(WsError::AttackAttempt);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ProtocolError::HandshakeIncomplete.into());
        }
        if let Some(size) = check_response(&buf, &accept)? {
            buf.drain(..size);
            return Ok(buf);
        }
    }
}

/// Parses and checks a handshake response: `None` while it is incomplete, else its
/// length.
fn check_response(buf: &[u8], accept: &str) -> Result<Option<usize>, WsError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let size = match resp.parse(buf)? {
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(size) => size,
    };
    if resp.version.unwrap_or(0) < 1 {
        return Err(ProtocolError::WrongHttpVersion.into());
    }
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        let mut response = tokio_tungstenite::tungstenite::http::Response::new(None);
        *response.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::from_u16(code)
            .map_err(|e| WsError::HttpFormat(e.into()))?;
        return Err(WsError::Http(Box::new(response)));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let is = |name: &str, want: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(want))
    };
    if !is("Upgrade", "websocket") {
        return Err(ProtocolError::MissingUpgradeWebSocketHeader.into());
    }
    if !is("Connection", "Upgrade") {
        return Err(ProtocolError::MissingConnectionUpgradeHeader.into());
    }
    if header("Sec-WebSocket-Accept") != Some(accept.as_bytes()) {
        return Err(ProtocolError::SecWebSocketAcceptKeyMismatch.into());
    }
    if deflate()
        && !header("Sec-WebSocket-Extensions")
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("permessage-deflate"))
    {
        // --deflate measures compressed delivery: a plain connection would skew it.
        return Err(ProtocolError::InvalidHeader(Box::new(
            tokio_tungstenite::tungstenite::http::HeaderName::from_static(
                "sec-websocket-extensions",
            ),
        ))
        .into());
    }
    if header("Sec-WebSocket-Protocol").is_some() {
        return Err(ProtocolError::SecWebSocketSubProtocolError(
            tokio_tungstenite::tungstenite::error::SubProtocolError::ServerSentSubProtocolNoneRequested,
        )
        .into());
    }
    Ok(Some(size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    /// An unmasked server frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        server_frame(fin, opcode, payload)
    }

    /// What `on` saw, as owned values.
    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Text(String),
        Binary(usize),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn parse_all(p: &mut Parser, buf: &[u8], max: usize) -> (usize, Flow, Vec<Seen>) {
        let mut seen = Vec::new();
        let (used, flow) = p
            .parse(buf, max, &mut |m| {
                let stop = matches!(m, Msg::Close(_));
                seen.push(match m {
                    Msg::Text(t) => Seen::Text(String::from_utf8(t.to_vec()).unwrap()),
                    Msg::Binary(n) => Seen::Binary(n),
                    Msg::Ping(p) => Seen::Ping(p.to_vec()),
                    Msg::Pong => Seen::Pong,
                    Msg::Close(c) => Seen::Close(c),
                });
                if stop {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            })
            .unwrap();
        (used, flow, seen)
    }

    fn err_of(buf: &[u8]) -> String {
        let e = Parser::default()
            .parse(buf, usize::MAX, &mut |_| Flow::Continue)
            .unwrap_err();
        format!("{e:?}")
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = frame(true, OP_TEXT, b"{\"a\":1}");
        buf.extend(frame(true, OP_PONG, b""));
        buf.extend(frame(true, OP_BINARY, &[1, 2, 3]));
        buf.extend(frame(true, OP_TEXT, "é".as_bytes()));
        let mut p = Parser::default();
        let (used, flow, seen) = parse_all(&mut p, &buf, usize::MAX);
        assert_eq!((used, flow), (buf.len(), Flow::Continue));
        assert_eq!(
            seen,
            vec![
                Seen::Text("{\"a\":1}".into()),
                Seen::Pong,
                Seen::Binary(3),
                Seen::Text("é".into())
            ]
        );
    }

    #[test]
    fn lengths_16_and_64_bit() {
        let medium = "m".repeat(300);
        let big = "b".repeat(70_000);
        let mut buf = frame(true, OP_TEXT, medium.as_bytes());
        assert_eq!(buf[1], 126);
        let big_frame = frame(true, OP_TEXT, big.as_bytes());
        assert_eq!(big_frame[1], 127);
        buf.extend(&big_frame);
        let (used, _, seen) = parse_all(&mut Parser::default(), &buf, usize::MAX);
        assert_eq!(used, buf.len());
        assert_eq!(seen, vec![Seen::Text(medium), Seen::Text(big)]);
        // 125 is the largest 7-bit length, 65535 the largest 16-bit one.
        for n in [125usize, 126, 65_535, 65_536] {
            let f = frame(true, OP_BINARY, &vec![0; n]);
            let (used, _, seen) = parse_all(&mut Parser::default(), &f, usize::MAX);
            assert_eq!((used, seen), (f.len(), vec![Seen::Binary(n)]), "length {n}");
        }
    }

    #[test]
    fn incomplete_frames_wait_for_more_bytes() {
        let f = frame(true, OP_TEXT, &[b'x'; 300]);
        // Every cut, in the header or in the payload, parses nothing and consumes nothing.
        for cut in 0..f.len() {
            let (used, _, seen) = parse_all(&mut Parser::default(), &f[..cut], usize::MAX);
            assert_eq!((used, seen.len()), (0, 0), "cut at {cut}");
        }
        // A complete frame followed by half of the next: only the first is consumed.
        let mut buf = frame(true, OP_TEXT, b"one");
        let first = buf.len();
        buf.extend(&f[..10]);
        let (used, _, seen) = parse_all(&mut Parser::default(), &buf, usize::MAX);
        assert_eq!((used, seen), (first, vec![Seen::Text("one".into())]));
    }

    #[test]
    fn fragmented_messages_are_reassembled() {
        let mut buf = frame(false, OP_TEXT, b"{\"type\":");
        // A control frame may come between fragments.
        buf.extend(frame(true, OP_PING, b"hi"));
        buf.extend(frame(false, OP_CONTINUE, b"\"tick\""));
        buf.extend(frame(true, OP_CONTINUE, b"}"));
        buf.extend(frame(false, OP_BINARY, &[0; 4]));
        buf.extend(frame(true, OP_CONTINUE, &[0; 6]));
        let (used, _, seen) = parse_all(&mut Parser::default(), &buf, usize::MAX);
        assert_eq!(used, buf.len());
        assert_eq!(
            seen,
            vec![
                Seen::Ping(b"hi".to_vec()),
                Seen::Text("{\"type\":\"tick\"}".into()),
                Seen::Binary(10)
            ]
        );
        // Fragments split over two buffers.
        let mut p = Parser::default();
        let a = frame(false, OP_TEXT, "caf".as_bytes());
        let b = frame(true, OP_CONTINUE, "é!".as_bytes());
        assert_eq!(parse_all(&mut p, &a, usize::MAX).2, vec![]);
        assert_eq!(
            parse_all(&mut p, &b, usize::MAX).2,
            vec![Seen::Text("café!".into())]
        );
    }

    #[test]
    fn fragment_errors_match_tungstenite() {
        assert!(err_of(&frame(true, OP_CONTINUE, b"x")).contains("UnexpectedContinueFrame"));
        let mut buf = frame(false, OP_TEXT, b"a");
        buf.extend(frame(true, OP_TEXT, b"b"));
        assert!(err_of(&buf).contains("ExpectedFragment(Text)"));
        assert!(err_of(&frame(false, OP_PING, b"")).contains("FragmentedControlFrame"));
        assert!(err_of(&frame(true, OP_PING, &[0; 126])).contains("ControlFrameTooBig"));
    }

    #[test]
    fn header_errors_match_tungstenite() {
        assert!(err_of(&frame(true, 0x3, b"")).contains("InvalidOpcode(3)"));
        assert!(err_of(&frame(true, 0xB, b"")).contains("InvalidOpcode(11)"));
        let mut rsv = frame(true, OP_TEXT, b"x");
        rsv[0] |= 0x40;
        assert!(err_of(&rsv).contains("NonZeroReservedBits"));
        let mut masked = Vec::new();
        encode_with_mask(OP_TEXT, b"x", [1, 2, 3, 4], &mut masked);
        assert!(err_of(&masked).contains("MaskedFrameFromServer"));
        // Too big is refused from the header alone, before the payload arrives.
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        assert!(err_of(&huge).contains("MessageTooLong"));
        // Invalid UTF-8 in a text frame; binary frames are not checked.
        assert!(err_of(&frame(true, OP_TEXT, &[0xC3, 0x28])).starts_with("Utf8"));
        assert_eq!(
            parse_all(&mut Parser::default(), &frame(true, OP_BINARY, &[0xFF]), 9).2,
            vec![Seen::Binary(1)]
        );
    }

    #[test]
    fn close_codes() {
        let close =
            |body: &[u8]| parse_all(&mut Parser::default(), &frame(true, OP_CLOSE, body), 9);
        let (_, flow, seen) = close(&[0x0F, 0xA8, b'b', b'y', b'e']);
        assert_eq!((flow, seen), (Flow::Stop, vec![Seen::Close(Some(4008))]));
        assert_eq!(
            close(&1000u16.to_be_bytes()).2,
            vec![Seen::Close(Some(1000))]
        );
        assert_eq!(close(&[]).2, vec![Seen::Close(None)]);
        // Codes a peer must not send (1005, 1006, 1015, < 1000, 1016-2999) read as 1002.
        for bad in [1005u16, 1006, 1015, 999, 2000] {
            assert_eq!(
                close(&bad.to_be_bytes()).2,
                vec![Seen::Close(Some(1002))],
                "{bad}"
            );
        }
        assert!(err_of(&frame(true, OP_CLOSE, &[3])).contains("InvalidCloseSequence"));
        assert!(err_of(&frame(true, OP_CLOSE, &[3, 232, 0xFF])).starts_with("Utf8"));
        // Parsing stops at the close: what follows stays unconsumed.
        let mut buf = frame(true, OP_CLOSE, &1001u16.to_be_bytes());
        let first = buf.len();
        buf.extend(frame(true, OP_TEXT, b"after"));
        let (used, flow, seen) = parse_all(&mut Parser::default(), &buf, 9);
        assert_eq!(
            (used, flow, seen),
            (first, Flow::Stop, vec![Seen::Close(Some(1001))])
        );
    }

    #[test]
    fn max_texts_stops_early() {
        let mut buf = Vec::new();
        for t in ["a", "b", "c"] {
            buf.extend(frame(true, OP_TEXT, t.as_bytes()));
        }
        let mut p = Parser::default();
        let (used, _, seen) = parse_all(&mut p, &buf, 1);
        assert_eq!(seen, vec![Seen::Text("a".into())]);
        let (used2, _, seen) = parse_all(&mut p, &buf[used..], 5);
        assert_eq!(used + used2, buf.len());
        assert_eq!(seen, vec![Seen::Text("b".into()), Seen::Text("c".into())]);
    }

    /// Decodes one masked client frame: (fin, opcode, unmasked payload, frame length).
    fn decode_client(buf: &[u8]) -> (bool, u8, Vec<u8>, usize) {
        let h = parse_header(buf).unwrap().unwrap();
        assert!(h.masked, "client frames must be masked");
        let mask = &buf[h.len - 4..h.len];
        let payload = buf[h.len..h.len + h.payload]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        (h.fin, h.opcode, payload, h.len + h.payload)
    }

    #[test]
    fn client_frames_are_masked() {
        for n in [0usize, 5, 125, 126, 300, 70_000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode(OP_TEXT, &payload, &mut out);
            let (fin, op, got, len) = decode_client(&out);
            assert_eq!((fin, op, len), (true, OP_TEXT, out.len()), "length {n}");
            assert_eq!(got, payload);
        }
        let mut out = Vec::new();
        encode_close(1000, "load test done", &mut out);
        let (_, op, body, _) = decode_client(&out);
        assert_eq!(op, OP_CLOSE);
        assert_eq!(&body[..2], &1000u16.to_be_bytes());
        assert_eq!(&body[2..], b"load test done");
        // Keys change from frame to frame.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode(OP_TEXT, b"x", &mut a);
        encode(OP_TEXT, b"x", &mut b);
        assert_ne!(a[2..6], b[2..6]);
    }

    /// A reader that hands out `chunks` one per read, then EOF.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(mut c) = self.0.pop_front() {
                let n = c.len().min(buf.remaining());
                buf.put_slice(&c[..n]);
                if n < c.len() {
                    self.0.push_front(c.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Runs steps over `chunks` until EOF, collecting what `on` saw and the pongs sent.
    fn run_steps(ws: &mut WsIn, chunks: Vec<Vec<u8>>, max: usize) -> (Vec<Seen>, Vec<u8>, usize) {
        let mut stream = Chunks(chunks.into());
        let mut seen = Vec::new();
        let mut out = Vec::new();
        let mut steps = 0;
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            let step = ws.poll_step(&mut cx, &mut stream, max, || 7, &mut |m, t| {
                assert_eq!(t, 7);
                seen.push(match m {
                    Msg::Text(t) => Seen::Text(String::from_utf8(t.to_vec()).unwrap()),
                    Msg::Binary(n) => Seen::Binary(n),
                    Msg::Ping(p) => {
                        encode_pong(p, &mut out);
                        Seen::Ping(p.to_vec())
                    }
                    Msg::Pong => Seen::Pong,
                    Msg::Close(c) => Seen::Close(c),
                });
                Flow::Continue
            });
            steps += 1;
            match step {
                Poll::Ready(Ok(Step::Eof)) => return (seen, out, steps),
                Poll::Ready(Ok(Step::Parsed(_))) => {}
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn frames_split_across_reads() {
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 0..50 {
            let t = format!("{{\"type\":\"tick\",\"seq\":{i}}}").repeat(1 + i % 7);
            wire.extend(frame(true, OP_TEXT, t.as_bytes()));
            want.push(Seen::Text(t));
        }
        // Every chunking from 1 byte up: the same messages come out.
        for size in [1, 2, 3, 7, 64, 1000, wire.len()] {
            let chunks = wire.chunks(size).map(<[u8]>::to_vec).collect();
            let mut ws = WsIn::new(Vec::new());
            let (seen, _, _) = run_steps(&mut ws, chunks, usize::MAX);
            assert_eq!(seen, want, "chunks of {size}");
            assert!(ws.carry.is_empty());
        }
        // Bytes left over from the handshake are parsed first.
        let mut ws = WsIn::new(wire[..5].to_vec());
        let (seen, _, _) = run_steps(&mut ws, vec![wire[5..].to_vec()], usize::MAX);
        assert_eq!(seen, want);
    }

    #[test]
    fn big_frames_read_into_the_carry() {
        // Bigger than the default read size of 64 KiB.
        let big = "x".repeat(300_000);
        let mut wire = frame(true, OP_TEXT, big.as_bytes());
        wire.extend(frame(true, OP_TEXT, b"small"));
        let chunks = wire.chunks(5000).map(<[u8]>::to_vec).collect();
        let mut ws = WsIn::new(Vec::new());
        let (seen, _, _) = run_steps(&mut ws, chunks, usize::MAX);
        assert_eq!(seen, vec![Seen::Text(big), Seen::Text("small".into())]);
        // The big buffer was given back.
        assert_eq!(ws.carry.capacity(), 0);
    }

    #[test]
    fn ping_gets_a_masked_pong_with_its_payload() {
        let mut wire = frame(true, OP_PING, b"are you there");
        wire.extend(frame(true, OP_TEXT, b"t"));
        let (seen, out, _) = run_steps(&mut WsIn::default(), vec![wire], usize::MAX);
        assert_eq!(seen[0], Seen::Ping(b"are you there".to_vec()));
        let (fin, op, payload, len) = decode_client(&out);
        assert_eq!((fin, op, len), (true, OP_PONG, out.len()));
        assert_eq!(payload, b"are you there");
    }

    #[test]
    fn limited_steps_parse_the_carry_without_reading() {
        let mut wire = Vec::new();
        for t in ["a", "b", "c"] {
            wire.extend(frame(true, OP_TEXT, t.as_bytes()));
        }
        let mut ws = WsIn::default();
        // One read, then two steps from the carry, then the EOF read.
        let (seen, _, steps) = run_steps(&mut ws, vec![wire], 1);
        assert_eq!(seen.len(), 3);
        assert_eq!(steps, 4);
    }

    #[test]
    fn handshake_response_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let accept = derive_accept_key(key.as_bytes());
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        let mut with_frame = ok.clone().into_bytes();
        with_frame.extend(frame(true, OP_TEXT, b"{\"type\":\"welcome\"}"));
        assert_eq!(
            check_response(&with_frame, &accept).unwrap(),
            Some(ok.len())
        );
        assert_eq!(check_response(&ok.as_bytes()[..20], &accept).unwrap(), None);
        let reason = |resp: &str| {
            format!(
                "{:?}",
                check_response(resp.as_bytes(), &accept).unwrap_err()
            )
        };
        assert!(reason("HTTP/1.1 503 Busy\r\n\r\n").contains("503"));
        assert!(reason(&ok.replace("websocket", "h2c")).contains("MissingUpgradeWebSocketHeader"));
        assert!(reason(&ok.replace(&accept, "x")).contains("SecWebSocketAcceptKeyMismatch"));
    }

    /// The whole client side against tungstenite's server side, which refuses unmasked
    /// client frames: handshake (with a frame right behind the 101), 16- and 64-bit
    /// lengths, ping -> pong, a masked text frame, then the server's close code.
    #[tokio::test]
    async fn talks_to_a_tungstenite_server() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
        use tokio_tungstenite::tungstenite::Message;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            ws.send(Message::text("welcome")).await.unwrap();
            ws.send(Message::text("m".repeat(300))).await.unwrap();
            ws.send(Message::text("b".repeat(100_000))).await.unwrap();
            ws.send(Message::Ping(b"p1".to_vec().into())).await.unwrap();
            let mut got = Vec::new();
            while got.len() < 2 {
                match ws.next().await.unwrap().unwrap() {
                    Message::Pong(p) => got.push(format!("pong {}", String::from_utf8_lossy(&p))),
                    Message::Text(t) => got.push(format!("text {}", t.as_str())),
                    other => panic!("{other:?}"),
                }
            }
            ws.send(Message::Close(Some(CloseFrame {
                code: 4008.into(),
                reason: "slow".into(),
            })))
            .await
            .unwrap();
            got
        });

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request = format!("ws://{addr}/ws").into_client_request().unwrap();
        let leftover = handshake(&mut tcp, request).await.unwrap();
        let mut input = WsIn::new(leftover);
        let mut out = Vec::new();
        encode(OP_TEXT, b"subscribe", &mut out);
        tcp.write_all(&out).await.unwrap();
        let mut seen = Vec::new();
        loop {
            out.clear();
            let mut closed = None;
            let step = std::future::poll_fn(|cx| {
                input.poll_step(cx, &mut tcp, usize::MAX, || 0, &mut |m, _| {
                    match m {
                        Msg::Text(t) => seen.push(format!("text {}", t.len())),
                        Msg::Ping(p) => encode_pong(p, &mut out),
                        Msg::Close(code) => {
                            closed = Some(code);
                            return Flow::Stop;
                        }
                        other => panic!("{other:?}"),
                    }
                    Flow::Continue
                })
            })
            .await
            .unwrap();
            assert_eq!(
                step,
                Step::Parsed(if closed.is_some() {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            );
            if let Some(code) = closed {
                assert_eq!(code, Some(4008));
                break;
            }
            tcp.write_all(&out).await.unwrap();
        }
        assert_eq!(seen, ["text 7", "text 300", "text 100000"]);
        assert_eq!(server.await.unwrap(), ["text subscribe", "pong p1"]);
    }
}

//! Inbound RFC 6455 framing and message reassembly as a pure state machine: bytes in (as the
//! kernel hands them over, cut anywhere), complete messages out. No I/O here: `ws::socket`
//! feeds it what it reads, and the fuzz targets feed it arbitrary bytes.
//!
//! Text is checked as UTF-8 fragment by fragment (carrying an incomplete trailing code point
//! into the next fragment), so a fragmented message with bad text fails on the bad fragment,
//! not when it completes (RFC 6455 §8.1, Autobahn 6.4.x). Everything kept is bounded by
//! `max_message`: the tail of an incomplete frame (its header is checked against the limit
//! before its payload is waited for) and the reassembled message. An idle decoder holds no
//! buffer at all.
//!
//! With permessage-deflate negotiated ([`Decoder::inflate_compressed`]), a message whose first
//! frame has RSV1 set is inflated as its frames arrive (`deflate`), into the same bounded
//! message buffer: the inflated size, not the wire size, is held to `max_message`, and the
//! inflater exists only while such a message is in progress. One [`Decoder::absorb`] call
//! inflates at most `max_message` bytes before it starts on another compressed frame (so under
//! twice that in all): a read full of small frames that each inflate to nearly the limit is
//! not inflated all at once. What is left stays in the carry, [`Decoder::has_buffered`] says
//! so, and the connection absorbs again (with no new bytes) before it reads more.

use bytes::Bytes;

use super::deflate::{self, Inflater};
use super::frame::{self, opcode, FrameError, Head};

/// A complete message from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A text message (UTF-8 checked).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping; answered with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// The peer's close frame, with its code if it sent one.
    Close(Option<u16>),
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
    /// How much of `message` is known to be valid UTF-8 (text only): the rest is the start
    /// of a code point the next fragment completes.
    utf8_valid: usize,
    /// The message is compressed: its fragments are inflated onto `message` as they come.
    inflater: Option<Box<Inflater>>,
}

/// Decodes one connection's inbound bytes into messages.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    partial: Option<Box<Partial>>,
    /// A close frame (well-formed or not) arrived: nothing after it is decoded.
    closed: bool,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// The last absorb stopped at its inflate budget with whole frames left in the carry.
    buffered: bool,
}

impl Decoder {
    /// A decoder refusing frames and messages over `max_message` bytes.
    #[must_use]
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: None,
            closed: false,
            deflate: false,
            buffered: false,
        }
    }

    /// Accepts compressed messages (RSV1) from now on: permessage-deflate was negotiated.
    pub fn inflate_compressed(&mut self) {
        self.deflate = true;
    }

    /// Whether permessage-deflate was negotiated.
    #[must_use]
    pub fn inflates(&self) -> bool {
        self.deflate
    }

    /// Whether an absorb stopped at its inflate budget with whole frames left over: the
    /// connection calls [`Decoder::absorb`] again (with nothing new) before it reads more.
    #[must_use]
    pub fn has_buffered(&self) -> bool {
        self.buffered
    }

    /// Whether nothing is half done: no frame half read, no message half reassembled.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Whether the peer sent a close frame, even a malformed one: its side of the closing
    /// handshake is over, so there is nothing left to wait for.
    #[must_use]
    pub fn peer_closed(&self) -> bool {
        self.closed
    }

    /// Decodes `fresh` bytes, appending every message they complete to `out` (messages before
    /// a violation are still appended). Bytes after a close frame are ignored.
    ///
    /// # Errors
    /// A protocol violation or a limit; the connection must be closed with its code.
    pub fn absorb(&mut self, fresh: &[u8], out: &mut Vec<Incoming>) -> Result<(), FrameError> {
        self.buffered = false;
        if self.closed {
            return Ok(());
        }
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
        // Bytes inflated by this call: past the budget, the next compressed frame waits.
        let mut inflated = 0;
        while !self.closed {
            let head = match frame::decode_head_with(&data[at..], self.max_message, self.deflate) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    // A malformed close frame (too long, fragmented) still ends the peer's side.
                    self.closed = data[at] & 0x0F == opcode::CLOSE;
                    return Err(e);
                }
            };
            let end = at + head.frame_len();
            if end > data.len() {
                break;
            }
            let inflating = self.inflating(&head);
            if inflating && inflated >= self.max_message {
                self.buffered = true;
                break;
            }
            let before = self.message_len();
            let outputs = out.len();
            self.on_frame(&head, &data[at + head.payload_start..end], out)?;
            if inflating {
                // What the frame added: to the message in progress, or the message it ended.
                let ended: usize = out[outputs..]
                    .iter()
                    .map(|m| match m {
                        Incoming::Text(t) => t.len(),
                        Incoming::Binary(b) => b.len(),
                        _ => 0,
                    })
                    .sum();
                inflated += (self.message_len() + ended).saturating_sub(before);
            }
            at = end;
        }
        let total = data.len();
        if at < total && !self.closed {
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

    /// Whether `head` is a frame whose payload gets inflated: the first frame of a compressed
    /// message, or a continuation of one.
    fn inflating(&self, head: &Head) -> bool {
        head.compressed
            || (head.opcode == opcode::CONTINUATION
                && self.partial.as_ref().is_some_and(|p| p.inflater.is_some()))
    }

    /// Bytes of the fragmented message reassembled so far.
    fn message_len(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.message.len())
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
                frame::unmask_into(masked, head.mask, &mut payload);
                if head.compressed {
                    payload = deflate::inflate_message(&payload, self.max_message)?;
                }
                out.push(message(head.opcode, payload)?);
                Ok(())
            }
            opcode::TEXT | opcode::BINARY => {
                let max = self.max_message;
                let partial = self.partial.get_or_insert_with(Box::default);
                partial.message_opcode = Some(head.opcode);
                if head.compressed {
                    partial.inflater = Some(Box::default());
                }
                partial.append(masked, head.mask, false, max)?;
                partial.check_utf8(false)
            }
            opcode::CONTINUATION => {
                let max = self.max_message;
                let Some(partial) = self.partial.as_mut().filter(|_| in_message) else {
                    return Err(FrameError::Protocol("continuation frame without a message"));
                };
                partial.append(masked, head.mask, head.fin, max)?;
                partial.check_utf8(head.fin)?;
                if head.fin {
                    let kind = partial.message_opcode.take().unwrap_or(opcode::TEXT);
                    let payload = std::mem::take(&mut partial.message);
                    partial.utf8_valid = 0;
                    partial.inflater = None;
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
                // Whatever the payload, the peer's closing handshake has started.
                self.closed = true;
                let mut payload = Vec::with_capacity(masked.len());
                frame::unmask_into(masked, head.mask, &mut payload);
                out.push(Incoming::Close(close_code(&payload)?));
                Ok(())
            }
        }
    }
}

impl Partial {
    /// Adds a fragment's payload to the message: unmasked, and inflated if the message is
    /// compressed (`last`: its final fragment). The message never grows past `max`.
    fn append(
        &mut self,
        masked: &[u8],
        mask: [u8; 4],
        last: bool,
        max: usize,
    ) -> Result<(), FrameError> {
        let Some(inflater) = self.inflater.as_mut() else {
            if self.message.len() + masked.len() > max {
                return Err(FrameError::TooBig);
            }
            frame::unmask_into(masked, mask, &mut self.message);
            return Ok(());
        };
        let mut compressed = Vec::with_capacity(masked.len());
        frame::unmask_into(masked, mask, &mut compressed);
        inflater.inflate(&compressed, last, &mut self.message, max)
    }

    /// Checks the text received so far; `complete`: no code point may be left unfinished.
    fn check_utf8(&mut self, complete: bool) -> Result<(), FrameError> {
        if self.message_opcode != Some(opcode::TEXT) {
            return Ok(());
        }
        match std::str::from_utf8(&self.message[self.utf8_valid..]) {
            Ok(_) => {
                self.utf8_valid = self.message.len();
                Ok(())
            }
            // Cut inside a code point: fine until the message ends.
            Err(e) if e.error_len().is_none() && !complete => {
                self.utf8_valid += e.valid_up_to();
                Ok(())
            }
            Err(_) => Err(FrameError::InvalidUtf8),
        }
    }
}

fn message(kind: u8, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if kind == opcode::BINARY {
        return Ok(Incoming::Binary(payload));
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| FrameError::InvalidUtf8)
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4 and the IANA registry):
/// 1004-1006 and 1015 are reserved, 1016-2999 unassigned, below 1000 and above 4999 invalid.
#[must_use]
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The code in a close frame's payload (RFC 6455 §5.5.1: empty, or a code plus UTF-8 reason).
fn close_code(payload: &[u8]) -> Result<Option<u16>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close_code_allowed(code) {
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
    use crate::transport::ws::frame::client_frame;

    fn decode(bytes: &[u8], max: usize) -> (Vec<Incoming>, Result<(), FrameError>) {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        let r = d.absorb(bytes, &mut out);
        (out, r)
    }

    #[test]
    fn bad_text_fails_on_its_fragment_not_at_the_end() {
        // "κόσμε" then an invalid byte; the message never completes.
        let mut bytes = client_frame(false, opcode::TEXT, "κόσ".as_bytes());
        bytes.extend(client_frame(false, opcode::CONTINUATION, b"\xce\xbc\xce"));
        let (out, r) = decode(&bytes, 1000);
        assert!(out.is_empty());
        assert_eq!(r, Ok(()), "a code point cut between fragments is fine");
        bytes.extend(client_frame(
            false,
            opcode::CONTINUATION,
            b"\xb5\xed\xa0\x80",
        ));
        let (_, r) = decode(&bytes, 1000);
        assert_eq!(r, Err(FrameError::InvalidUtf8), "surrogate: fails at once");
    }

    #[test]
    fn a_code_point_cut_across_fragments_completes() {
        let text = "a€b😀c";
        let raw = text.as_bytes();
        for cut in 1..raw.len() {
            let mut bytes = client_frame(false, opcode::TEXT, &raw[..cut]);
            bytes.extend(client_frame(true, opcode::CONTINUATION, &raw[cut..]));
            let (out, r) = decode(&bytes, 1000);
            assert_eq!(r, Ok(()), "cut {cut}");
            assert_eq!(out, [Incoming::Text(text.into())]);
        }
        // An unfinished code point at the end of the message is an error.
        let mut bytes = client_frame(false, opcode::TEXT, b"a");
        bytes.extend(client_frame(true, opcode::CONTINUATION, b"\xe2\x82"));
        assert_eq!(decode(&bytes, 1000).1, Err(FrameError::InvalidUtf8));
    }

    #[test]
    fn registered_close_codes_are_accepted() {
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            let (out, r) = decode(&client_frame(true, opcode::CLOSE, &code.to_be_bytes()), 100);
            assert_eq!((out, r), (vec![Incoming::Close(Some(code))], Ok(())));
        }
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let (_, r) = decode(&client_frame(true, opcode::CLOSE, &code.to_be_bytes()), 100);
            assert!(matches!(r, Err(FrameError::Protocol(_))), "{code}");
        }
    }

    #[test]
    fn a_malformed_close_still_ends_the_peers_side() {
        let mut d = Decoder::new(100);
        let mut out = Vec::new();
        assert!(d
            .absorb(&client_frame(true, opcode::CLOSE, b"x"), &mut out)
            .is_err());
        assert!(d.peer_closed());
        let mut d = Decoder::new(100);
        assert!(d
            .absorb(&client_frame(true, opcode::CLOSE, &[b'x'; 126]), &mut out)
            .is_err());
        assert!(d.peer_closed(), "an over-long close frame is a close too");
        let mut d = Decoder::new(100);
        assert!(d
            .absorb(&client_frame(true, opcode::PING, &[b'x'; 126]), &mut out)
            .is_err());
        assert!(!d.peer_closed());
        // Nothing after a close frame is decoded.
        let mut d = Decoder::new(100);
        let mut bytes = client_frame(true, opcode::CLOSE, b"");
        bytes.extend(client_frame(true, opcode::TEXT, b"late"));
        assert_eq!(d.absorb(&bytes, &mut out), Ok(()));
        assert_eq!(out, [Incoming::Close(None)]);
    }

    /// Many small frames that each inflate to nearly the limit, all in one read: one absorb
    /// inflates at most its budget (the limit) before it stops, and the rest waits as carry
    /// until the connection asks again; every message still comes out, in order.
    #[test]
    fn compressed_frames_in_one_read_inflate_a_budget_at_a_time() {
        let max = 64 * 1024;
        let mut bytes = Vec::new();
        for i in 0..50 {
            let mut text = format!(r#"{{"op":"ping","id":{i},"pad":""#).into_bytes();
            text.resize(max - 100, b' ');
            text.extend_from_slice(br#""}"#);
            let mut f = client_frame(true, opcode::TEXT, &deflate::compress(&text).unwrap());
            f[0] |= frame::RSV1;
            bytes.extend(f);
        }
        assert!(bytes.len() < 8 * 1024, "{}", bytes.len());
        let mut d = Decoder::new(max);
        d.inflate_compressed();
        let mut out = Vec::new();
        d.absorb(&bytes, &mut out).unwrap();
        assert!(
            out.len() <= 2,
            "{} messages inflated by one absorb",
            out.len()
        );
        assert!(d.has_buffered());
        assert!(
            !d.is_idle(),
            "a connection with buffered frames does not park"
        );
        let mut turns = 1;
        while d.has_buffered() {
            let before = out.len();
            d.absorb(&[], &mut out).unwrap();
            assert!(out.len() - before <= 2);
            turns += 1;
        }
        assert_eq!(out.len(), 50);
        assert!(turns >= 25, "{turns}");
        for (i, msg) in out.iter().enumerate() {
            let Incoming::Text(text) = msg else {
                panic!("{msg:?}")
            };
            assert!(text.starts_with(&format!(r#"{{"op":"ping","id":{i},"#)));
        }
        assert!(d.is_idle());
    }

    #[test]
    fn binary_content_is_kept() {
        let (out, r) = decode(&client_frame(true, opcode::BINARY, b"\x00\xff"), 100);
        assert_eq!((out, r), (vec![Incoming::Binary(vec![0, 0xff])], Ok(())));
    }
}

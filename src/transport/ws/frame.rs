//! RFC 6455 framing, server side, as pure functions over byte slices: decoding the masked
//! frames a client sends (bounded by `max_message_bytes` before the payload is read) and the
//! headers of the unmasked frames the server writes. No I/O here; `ws::socket` feeds it.
//!
//! Where tungstenite's [`FrameHeader`] (already a dependency) fits, it is used: the masked
//! client frames of the tests ([`client_frame`]) are formatted by it. Two places keep their
//! own code, for measured reasons: [`encode_head`] writes the header of every frame the server
//! sends (one per delivery), where a hand-written header takes 3 ns and `FrameHeader::format`
//! 16-20 ns (its `io::Write` path; a 100M-call loop in release, 2026-12-05), about 8% of the
//! server's CPU per delivery at 3M deliveries/s; and [`decode_head`] must refuse an oversized
//! frame as soon as its length field is in, before the mask or any payload arrives, and name
//! each protocol error for its close code (1002, 1009), which `FrameHeader::parse` (it waits
//! for the whole header and knows no limit) does not do.

use std::fmt;

use tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode;
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// Opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// UTF-8 text.
    pub const TEXT: u8 = 0x1;
    /// Binary data.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

// The server's frame header encoder lives on the outbound link, which the dispatcher's stage
// also uses to pre-frame shared runs of ticks (see `dispatch::outbound::Frame::run`).
pub use crate::dispatch::outbound::{encode_head, MAX_HEADER};
/// Longest payload of a control frame.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Why the peer broke the protocol; each maps to the close code the connection ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame or a reassembled message is over the limit (close 1009).
    TooBig,
    /// A malformed frame: unmasked, reserved bits or opcodes, bad fragmentation (close 1002).
    Protocol(&'static str),
    /// A text message that is not UTF-8 (close 1007).
    InvalidUtf8,
    /// A compressed message (permessage-deflate) that inflates past the limit (close 1009).
    InflatedTooBig,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooBig => f.write_str("message too big"),
            Self::Protocol(why) => f.write_str(why),
            Self::InvalidUtf8 => f.write_str("text is not UTF-8"),
            Self::InflatedTooBig => f.write_str("message inflates past max_message_bytes"),
        }
    }
}

impl std::error::Error for FrameError {}

impl FrameError {
    /// The close code the connection ends with (RFC 6455 §7.4.1).
    #[must_use]
    pub fn close_code(&self) -> u16 {
        match self {
            Self::TooBig | Self::InflatedTooBig => 1009,
            Self::Protocol(_) => 1002,
            Self::InvalidUtf8 => 1007,
        }
    }
}

/// One decoded client frame; `payload` is the range of the (still masked) payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Last frame of its message.
    pub fin: bool,
    /// The opcode.
    pub opcode: u8,
    /// RSV1: the message is compressed (permessage-deflate; only ever set when negotiated).
    pub compressed: bool,
    /// The masking key.
    pub mask: [u8; 4],
    /// Where the payload starts in the input.
    pub payload_start: usize,
    /// Payload length.
    pub payload_len: usize,
}

impl Head {
    /// Bytes of input the whole frame takes.
    #[must_use]
    pub fn frame_len(&self) -> usize {
        self.payload_start + self.payload_len
    }
}

/// RSV1, the bit of a frame's first byte that marks a compressed message (RFC 7692 §6).
pub const RSV1: u8 = 0x40;

/// Decodes the header of the frame at the start of `data`. `Ok(None)`: not all of the header
/// is there yet. The payload may still be incomplete; compare [`Head::frame_len`] with the
/// input. A payload over `max_payload` fails at once, before it is read. No extension is
/// negotiated: every reserved bit is an error.
///
/// # Errors
/// [`FrameError`] for a frame the connection must be closed for.
pub fn decode_head(data: &[u8], max_payload: usize) -> Result<Option<Head>, FrameError> {
    decode_head_with(data, max_payload, false)
}

/// [`decode_head`] for a connection that negotiated permessage-deflate when `deflate` is set:
/// RSV1 is then allowed on the first frame of a data message (never on a continuation or a
/// control frame, RFC 7692 §6.1).
///
/// # Errors
/// As [`decode_head`].
pub fn decode_head_with(
    data: &[u8],
    max_payload: usize,
    deflate: bool,
) -> Result<Option<Head>, FrameError> {
    let [b0, b1, ..] = *data else {
        return Ok(None);
    };
    let compressed = b0 & RSV1 != 0;
    if b0 & 0x30 != 0 || (compressed && !deflate) {
        return Err(FrameError::Protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let control = opcode & 0x8 != 0;
    if compressed && (control || opcode == opcode::CONTINUATION) {
        return Err(FrameError::Protocol(
            "RSV1 set on a control or continuation frame",
        ));
    }
    match opcode {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {}
        _ => return Err(FrameError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7F {
        126 => {
            let Some(b) = data.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
        }
        127 => {
            let Some(b) = data.get(2..10) else {
                return Ok(None);
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(b);
            (u64::from_be_bytes(be), 10)
        }
        n => (u64::from(n), 2),
    };
    if control && (!fin || len > MAX_CONTROL_PAYLOAD as u64) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    if len >> 63 != 0 {
        return Err(FrameError::Protocol("64-bit length with the top bit set"));
    }
    let payload_len = usize::try_from(len).map_err(|_| FrameError::TooBig)?;
    if payload_len > max_payload {
        return Err(FrameError::TooBig);
    }
    let Some(m) = data.get(at..at + 4) else {
        return Ok(None);
    };
    Ok(Some(Head {
        fin,
        opcode,
        compressed,
        mask: [m[0], m[1], m[2], m[3]],
        payload_start: at + 4,
        payload_len,
    }))
}

/// Appends `masked` to `out`, unmasked with `mask` (the key restarts with every frame).
/// Copies, then XORs eight bytes at a time: the byte-by-byte `extend` from an iterator this
/// replaces could not be vectorized and was 3 % of the ingest worker at 100k ticks/s.
pub fn unmask_into(masked: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(masked);
    let [a, b, c, d] = mask;
    let key = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut words = out[start..].chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ key).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so of 4: the key starts over there.
    for (byte, k) in words.into_remainder().iter_mut().zip(mask.iter().cycle()) {
        *byte ^= k;
    }
}

/// The payload of a close frame: the code, then the reason (cut to fit 125 bytes on a char
/// boundary).
#[must_use]
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

/// A masked client frame, as a browser would send it (for tests of the decoding side, and
/// the raw-byte integration tests).
#[doc(hidden)]
#[must_use]
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let head = FrameHeader {
        is_final: fin,
        opcode: OpCode::from(opcode),
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let mut out = Vec::with_capacity(MAX_HEADER + 4 + payload.len());
    // Writing into a `Vec` cannot fail.
    let _ = head.format(payload.len() as u64, &mut out);
    unmask_into(payload, mask, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(frame: &[u8]) -> (Head, Vec<u8>) {
        let head = decode_head(frame, 1 << 20).unwrap().unwrap();
        assert_eq!(head.frame_len(), frame.len());
        let mut payload = Vec::new();
        unmask_into(&frame[head.payload_start..], head.mask, &mut payload);
        (head, payload)
    }

    #[test]
    fn unmask_matches_the_bytewise_definition_at_every_length_and_offset() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(73) ^ 0x5a).collect();
        for len in 0..data.len() {
            for prefix in [0usize, 3] {
                let mut out = vec![0xee; prefix];
                unmask_into(&data[..len], mask, &mut out);
                let want: Vec<u8> = std::iter::repeat_n(0xee, prefix)
                    .chain(data[..len].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]))
                    .collect();
                assert_eq!(out, want, "len {len}, prefix {prefix}");
            }
        }
    }

    /// The server's own header writer (kept for speed) writes what tungstenite's does.
    #[test]
    fn server_headers_match_tungstenites() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
            for op in [
                opcode::TEXT,
                opcode::BINARY,
                opcode::PING,
                opcode::PONG,
                opcode::CLOSE,
            ] {
                let mut ours = [0u8; MAX_HEADER];
                let n = encode_head(op, len, &mut ours);
                let head = FrameHeader {
                    opcode: OpCode::from(op),
                    ..FrameHeader::default()
                };
                let mut theirs = Vec::new();
                head.format(len as u64, &mut theirs).unwrap();
                assert_eq!(&ours[..n], &theirs[..], "opcode {op}, length {len}");
            }
        }
    }

    #[test]
    fn decodes_all_three_length_forms() {
        for len in [0, 5, 125, 126, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let (head, back) = decode_all(&client_frame(true, opcode::TEXT, &payload));
            assert!(head.fin);
            assert_eq!(head.opcode, opcode::TEXT);
            assert_eq!(back, payload, "length {len}");
        }
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let frame = client_frame(true, opcode::TEXT, &[b'x'; 300]);
        for cut in 0..8 {
            assert_eq!(decode_head(&frame[..cut], 1 << 20), Ok(None), "cut {cut}");
        }
        let head = decode_head(&frame[..8], 1 << 20).unwrap().unwrap();
        assert_eq!((head.payload_start, head.payload_len), (8, 300));
    }

    #[test]
    fn too_big_is_refused_from_the_header_alone() {
        let frame = client_frame(true, opcode::TEXT, &[b'x'; 70_000]);
        assert_eq!(decode_head(&frame[..14], 65_536), Err(FrameError::TooBig));
    }

    #[test]
    fn protocol_violations() {
        let mut unmasked = client_frame(true, opcode::TEXT, b"hi");
        unmasked[1] &= 0x7F;
        assert!(matches!(
            decode_head(&unmasked, 100),
            Err(FrameError::Protocol(_))
        ));
        let mut rsv = client_frame(true, opcode::TEXT, b"hi");
        rsv[0] |= 0x40;
        assert!(matches!(
            decode_head(&rsv, 100),
            Err(FrameError::Protocol(_))
        ));
        let reserved_opcode = client_frame(true, 0x3, b"hi");
        assert!(matches!(
            decode_head(&reserved_opcode, 100),
            Err(FrameError::Protocol(_))
        ));
        let fragmented_ping = client_frame(false, opcode::PING, b"hi");
        assert!(matches!(
            decode_head(&fragmented_ping, 100),
            Err(FrameError::Protocol(_))
        ));
        let long_ping = client_frame(true, opcode::PING, &[0; 126]);
        assert!(matches!(
            decode_head(&long_ping, 1000),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_set_is_a_protocol_error() {
        let mut frame = vec![0x81, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 63).to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        assert!(matches!(
            decode_head(&frame, usize::MAX),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn server_headers() {
        let mut buf = [0u8; MAX_HEADER];
        assert_eq!(encode_head(opcode::TEXT, 5, &mut buf), 2);
        assert_eq!(buf[..2], [0x81, 5]);
        assert_eq!(encode_head(opcode::TEXT, 300, &mut buf), 4);
        assert_eq!(buf[..4], [0x81, 126, 1, 44]);
        assert_eq!(encode_head(opcode::PING, 70_000, &mut buf), 10);
        assert_eq!(buf[..2], [0x89, 127]);
        assert_eq!(u64::from_be_bytes(buf[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let payload = close_payload(4008, &reason);
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(payload[..2], 4008u16.to_be_bytes());
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}

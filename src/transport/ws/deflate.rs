//! permessage-deflate (RFC 7692) in the one form tickfan speaks: no context takeover in either
//! direction, so every message is compressed on its own. That is what lets the server compress
//! a tick or batch frame once and send the same compressed bytes to every client that
//! negotiated the extension (the dispatcher's shared `Frame` carries them, filled on first use),
//! and what keeps the per-connection cost at zero: no connection owns a compressor, and an
//! inflater exists only while a compressed message is being read.
//!
//! Three parts, all pure (no I/O):
//! - [`negotiate`]: reads the client's `Sec-WebSocket-Extensions` offers (upgrade request) and
//!   picks the first one this server can accept; the answer is always
//!   `permessage-deflate; server_no_context_takeover; client_no_context_takeover`.
//! - [`compress`]: outbound, one message into raw DEFLATE without the `00 00 ff ff` tail
//!   (§7.2.1), with one compressor per thread, reset for every message.
//! - [`Inflater`] / [`inflate_message`]: inbound, one message (or a fragmented message's
//!   pieces) out of raw DEFLATE, never past the caller's limit: output grows in bounded steps and
//!   inflating stops at the limit (§8.1 of the issue: a small frame must not inflate past
//!   `max_message_bytes`).
//!
//! The DEFLATE itself is flate2 on its zlib-rs backend (pure Rust, as fast as zlib-ng at the
//! small sizes ticks have, and it honours window sizes, which miniz_oxide does not).

use std::cell::RefCell;

use axum::http::{header, HeaderMap, HeaderValue};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::frame::FrameError;

/// The extension's name.
pub const EXTENSION: &str = "permessage-deflate";

/// What the server answers an acceptable offer with.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The answer when the client asked for `server_max_window_bits=15` (RFC 7692 §7.1.2.1: an
/// offer with that parameter is accepted by echoing it).
const RESPONSE_WITH_WINDOW: &str = "permessage-deflate; server_no_context_takeover; \
     client_no_context_takeover; server_max_window_bits=15";

/// Messages shorter than this go out uncompressed (RSV1 clear; RFC 7692 lets the sender choose
/// per message): the deflate block overhead eats most of the gain, and the compressor's reset
/// costs more than the bytes saved.
pub const MIN_COMPRESS_BYTES: usize = 96;

/// The zlib level for a message under [`SMALL_MESSAGE_BYTES`] (a single tick): level 1 is
/// zlib-rs's quick strategy, which costs less than half of levels 2-6 per message (3.9 vs
/// 9.4 µs of CPU for a 194-byte tick, most of it the per-message reset) for 154 instead of
/// 135 bytes (docs/benchmarks.md "Compression"). Ticks are compressed once per tick, so this
/// is the per-tick cost.
const SMALL_LEVEL: u32 = 1;

/// The zlib level from [`SMALL_MESSAGE_BYTES`] up (batch frames, snapshots): compressed once
/// per flush for many ticks, where the ratio pays (a 10-tick batch: 5.6× at level 6, 4.2× at
/// level 1, for 16 vs 6 µs).
const LARGE_LEVEL: u32 = 6;

/// Where [`SMALL_LEVEL`] gives way to [`LARGE_LEVEL`].
const SMALL_MESSAGE_BYTES: usize = 1024;

/// The LZ77 window the server compresses with (2^15 bytes, DEFLATE's largest). An offer that
/// limits it (`server_max_window_bits` below 15) is declined: one shared compressed frame
/// serves every client, so the window cannot vary per client. A smaller window was measured
/// and saves no time (2^9-2^15: the same CPU per tick within noise) while batches shrink less,
/// so accepting smaller-window offers would cost every client ratio for nothing.
const WINDOW_BITS: u8 = 15;

/// The tail every compressed message loses on the wire (RFC 7692 §7.2.1) and regains before
/// it is inflated (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The response header for the first acceptable `permessage-deflate` offer in `headers`, or
/// `None`: no offer, none acceptable, or a header that does not parse (the connection is then
/// simply uncompressed; a malformed offer never fails the upgrade).
#[must_use]
pub fn negotiate(headers: &HeaderMap) -> Option<HeaderValue> {
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let Ok(value) = value.to_str() else {
            return None;
        };
        for offer in value.split(',') {
            match offer_answer(offer) {
                Offer::Accept(answer) => return Some(HeaderValue::from_static(answer)),
                Offer::Decline => {}
                Offer::Malformed => return None,
            }
        }
    }
    None
}

enum Offer {
    Accept(&'static str),
    Decline,
    Malformed,
}

/// One offer: `permessage-deflate` and its parameters (§7.1). Another extension, or a
/// `permessage-deflate` offer with an unknown, repeated or out-of-range parameter (which §7.1
/// says to decline), is declined.
fn offer_answer(offer: &str) -> Offer {
    let mut parts = offer.split(';').map(str::trim);
    let name = parts.next().unwrap_or_default();
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Offer::Malformed;
    }
    if !name.eq_ignore_ascii_case(EXTENSION) {
        return Offer::Decline;
    }
    let mut seen = [false; 4];
    let mut echo_window = false;
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
            None => (param, None),
        };
        let index = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ if key.bytes().all(is_token_byte) && !key.is_empty() => return Offer::Decline,
            _ => return Offer::Malformed,
        };
        if std::mem::replace(&mut seen[index], true) {
            return Offer::Decline;
        }
        match (index, value) {
            (0 | 1, None) => {}
            // The server's window: we compress with 15 bits for everyone (see WINDOW_BITS).
            (2, Some(Some(bits))) if bits == WINDOW_BITS => echo_window = true,
            // The client says it can limit its own window; we inflate with any window, so the
            // answer leaves it out and the client uses what it likes.
            (3, None | Some(Some(8..=15))) => {}
            _ => return Offer::Decline,
        }
    }
    Offer::Accept(if echo_window {
        RESPONSE_WITH_WINDOW
    } else {
        RESPONSE
    })
}

/// A window-bits value (`10` or `"10"`); `None` if it is not 8-15 in plain digits.
fn unquote(value: &str) -> Option<u8> {
    let digits = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if digits.is_empty() || digits.len() > 2 || digits.starts_with('0') {
        return None;
    }
    digits.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// RFC 7230 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

thread_local! {
    /// Two compressors per runtime thread, one per level (small and large messages; a zlib
    /// deflate state is ~270 KiB), reset for every message: no context is taken over, so none
    /// needs to live with a connection.
    static COMPRESSOR: RefCell<[Option<Compress>; 2]> = const { RefCell::new([None, None]) };
    /// One inflater per thread for unfragmented compressed messages.
    static INFLATER: RefCell<Option<Inflater>> = const { RefCell::new(None) };
}

/// `plain` compressed as one permessage-deflate message (raw DEFLATE, the `00 00 ff ff` tail
/// removed), or `None` when that does not pay: a message under [`MIN_COMPRESS_BYTES`], or
/// one that would not get smaller.
#[must_use]
pub fn compress(plain: &[u8]) -> Option<Bytes> {
    if plain.len() < MIN_COMPRESS_BYTES {
        return None;
    }
    let (index, level) = if plain.len() < SMALL_MESSAGE_BYTES {
        (0, SMALL_LEVEL)
    } else {
        (1, LARGE_LEVEL)
    };
    COMPRESSOR.with(|cell| {
        let mut slots = cell.borrow_mut();
        let c = slots[index].get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level), false, WINDOW_BITS)
        });
        c.reset();
        // Enough for most messages in one call; grown below if not.
        let mut out = Vec::with_capacity(plain.len() / 2 + 64);
        loop {
            let consumed = usize::try_from(c.total_in()).unwrap_or(usize::MAX);
            let input = plain.get(consumed..).unwrap_or_default();
            if c.compress_vec(input, &mut out, FlushCompress::Sync)
                .is_err()
            {
                return None;
            }
            let done = usize::try_from(c.total_in()).unwrap_or(usize::MAX) == plain.len();
            // A sync flush is complete once it leaves output room unused.
            if done && out.len() < out.capacity() {
                break;
            }
            if out.len() > plain.len() + 64 {
                return None;
            }
            out.reserve(out.capacity().max(64));
        }
        if !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < plain.len()).then(|| Bytes::from(out))
    })
}

/// Bytes after a message's final DEFLATE block (close 1002).
const AFTER_FINAL: FrameError = FrameError::Protocol("data after the final deflate block");

/// One compressed message being inflated: the state exists only from its first frame to its
/// last, so an idle connection holds none.
#[derive(Debug)]
pub struct Inflater {
    state: Decompress,
    /// The message's final DEFLATE block (BFINAL) has been inflated: nothing may follow it.
    ended: bool,
}

impl Default for Inflater {
    fn default() -> Self {
        Self {
            state: Decompress::new_with_window_bits(false, WINDOW_BITS),
            ended: false,
        }
    }
}

impl Inflater {
    /// Inflates the next piece of the message's compressed bytes onto `out`; `last`: this is
    /// the message's final piece (the `00 00 ff ff` tail is fed after it). `out` never grows
    /// past `limit` bytes.
    ///
    /// # Errors
    /// [`FrameError::InflatedTooBig`] past `limit`, [`FrameError::Protocol`] for bytes that
    /// are not DEFLATE.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), FrameError> {
        if self.ended && !compressed.is_empty() {
            return Err(AFTER_FINAL);
        }
        self.feed(compressed, out, limit)?;
        // After a final block the stream is over: the tail (§7.2.2) is not fed then.
        if last && !self.ended {
            self.feed(&TAIL, out, limit)?;
        }
        Ok(())
    }

    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), FrameError> {
        const BAD: FrameError = FrameError::Protocol("invalid compressed data");
        let d = &mut self.state;
        let mut at = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    // At the limit: one more byte of output means the message is too big.
                    let mut probe = [0u8; 1];
                    let before = (d.total_in(), d.total_out());
                    let status = d
                        .decompress(&input[at..], &mut probe, FlushDecompress::None)
                        .map_err(|_| BAD)?;
                    if d.total_out() != before.1 {
                        return Err(FrameError::InflatedTooBig);
                    }
                    at += usize::try_from(d.total_in() - before.0).map_err(|_| BAD)?;
                    if status == Status::StreamEnd {
                        self.ended = true;
                        return if at == input.len() {
                            Ok(())
                        } else {
                            Err(AFTER_FINAL)
                        };
                    }
                    if at == input.len() || d.total_in() == before.0 {
                        return Ok(());
                    }
                    continue;
                }
                // Grow in steps (at least 4 KiB, doubling), never past the limit.
                let step = out.len().max(input.len() * 2).max(4096);
                out.reserve_exact(step.min(limit - out.len()));
            }
            let before = (d.total_in(), d.total_out());
            let status = d
                .decompress_vec(&input[at..], out, FlushDecompress::None)
                .map_err(|_| BAD)?;
            at += usize::try_from(d.total_in() - before.0).map_err(|_| BAD)?;
            let progressed = d.total_in() != before.0 || d.total_out() != before.1;
            match status {
                // A final block: nothing of the message may follow it (RFC 7692 §7.2.3.3
                // lets a sender end with one; the tail is then not fed).
                Status::StreamEnd => {
                    self.ended = true;
                    return if at == input.len() {
                        Ok(())
                    } else {
                        Err(AFTER_FINAL)
                    };
                }
                _ if at == input.len() && out.len() < out.capacity() => return Ok(()),
                _ if !progressed && out.len() < out.capacity() => return Err(BAD),
                _ => {}
            }
        }
    }
}

/// Inflates a whole single-frame message with this thread's inflater (reset first).
///
/// # Errors
/// As [`Inflater::inflate`].
pub fn inflate_message(compressed: &[u8], limit: usize) -> Result<Vec<u8>, FrameError> {
    INFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let inflater = slot.get_or_insert_with(Inflater::default);
        inflater.state.reset(false);
        inflater.ended = false;
        let mut out = Vec::new();
        let result = inflater.inflate(compressed, true, &mut out, limit);
        if result.is_err() {
            // Half-way through a broken stream: start the next message from scratch.
            *inflater = Inflater::default();
        }
        result.map(|()| out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(values: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        negotiate(&headers).map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn browser_and_library_offers_are_accepted_without_context_takeover() {
        for value in [
            "permessage-deflate",
            // Chromium, Firefox, Python websockets
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=15",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            "Permessage-Deflate;Client_No_Context_Takeover",
            "permessage-deflate; client_max_window_bits=\"10\"",
        ] {
            assert_eq!(offer(&[value]).as_deref(), Some(RESPONSE), "{value}");
        }
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=15"]).as_deref(),
            Some(RESPONSE_WITH_WINDOW)
        );
    }

    #[test]
    fn the_first_acceptable_offer_wins_and_others_are_declined() {
        // A smaller server window than we compress with: declined, the fallback is taken.
        assert_eq!(
            offer(&["permessage-deflate; server_max_window_bits=10, permessage-deflate"])
                .as_deref(),
            Some(RESPONSE)
        );
        assert_eq!(
            offer(&["x-webkit-deflate-frame", "permessage-deflate"]).as_deref(),
            Some(RESPONSE)
        );
        for declined in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=010",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; x_unknown",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(offer(&[declined]), None, "{declined}");
        }
    }

    #[test]
    fn a_malformed_header_means_no_compression() {
        for malformed in [
            "permessage-deflate; =15",
            "; permessage-deflate",
            "perm\"essage-deflate",
            "permessage-deflate; client max window",
        ] {
            assert_eq!(offer(&[malformed]), None, "{malformed}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_bytes(b"permessage-deflate\xff").unwrap(),
        );
        assert_eq!(negotiate(&headers), None);
    }

    fn tick_json(i: u32) -> String {
        format!(
            r#"{{"type":"tick","symbol":"BTC-USD","price":{}.25,"size":0.0125,"ts":17000000{i:05},"seq":{i},"t_in":17000000{i:05}123,"priority":"normal","quality":1.0}}"#,
            60_000 + i
        )
    }

    #[test]
    fn compressed_messages_inflate_to_the_original() {
        let tick = tick_json(1);
        let deflated = compress(tick.as_bytes()).expect("a tick compresses");
        assert!(deflated.len() < tick.len());
        assert!(!deflated.ends_with(&TAIL));
        assert_eq!(
            inflate_message(&deflated, 1 << 20).unwrap(),
            tick.as_bytes()
        );
        // Independent of what the thread's compressor did before (no context taken over).
        let batch: String = (0..200).map(tick_json).collect();
        let first = compress(batch.as_bytes()).unwrap();
        let _ = compress(tick.as_bytes());
        assert_eq!(compress(batch.as_bytes()).unwrap(), first);
        assert!(
            first.len() * 4 < batch.len(),
            "{} of {}",
            first.len(),
            batch.len()
        );
        assert_eq!(inflate_message(&first, 1 << 20).unwrap(), batch.as_bytes());
        assert_eq!(compress(b"short"), None);
    }

    #[test]
    fn inflating_stops_at_the_limit() {
        let bomb = compress(&vec![b'a'; 1 << 20]).unwrap();
        assert!(bomb.len() < 2048, "{}", bomb.len());
        assert_eq!(
            inflate_message(&bomb, 64 * 1024),
            Err(FrameError::InflatedTooBig)
        );
        // Exactly at the limit is fine.
        assert_eq!(inflate_message(&bomb, 1 << 20).unwrap().len(), 1 << 20);
        // The output never had more room than the limit.
        let mut out = Vec::new();
        let mut inflater = Inflater::default();
        assert!(inflater.inflate(&bomb, true, &mut out, 10_000).is_err());
        assert!(out.capacity() <= 10_000, "{}", out.capacity());
        // The thread's inflater works again after a failure.
        let tick = tick_json(2);
        let deflated = compress(tick.as_bytes()).unwrap();
        assert_eq!(inflate_message(&deflated, 1000).unwrap(), tick.as_bytes());
    }

    #[test]
    fn a_message_inflates_across_fragments_cut_anywhere() {
        let batch: String = (0..50).map(tick_json).collect();
        let deflated = compress(batch.as_bytes()).unwrap();
        for cut in [1, 7, deflated.len() / 2, deflated.len() - 1] {
            let mut inflater = Inflater::default();
            let mut out = Vec::new();
            inflater
                .inflate(&deflated[..cut], false, &mut out, 1 << 20)
                .unwrap();
            inflater
                .inflate(&deflated[cut..], true, &mut out, 1 << 20)
                .unwrap();
            assert_eq!(out, batch.as_bytes(), "cut {cut}");
        }
    }

    /// A message may end its DEFLATE data with a final block (BFINAL, RFC 7692 §7.2.3.3):
    /// fine on its own, but bytes after it are not part of the message and must not be
    /// silently dropped.
    #[test]
    fn bytes_after_the_final_block_are_a_protocol_error() {
        let tick = tick_json(3);
        let mut c = Compress::new(Compression::default(), false);
        let mut finished = Vec::with_capacity(tick.len() + 64);
        c.compress_vec(tick.as_bytes(), &mut finished, FlushCompress::Finish)
            .unwrap();
        assert_eq!(
            inflate_message(&finished, 1 << 20).unwrap(),
            tick.as_bytes(),
            "a final block alone is a valid message"
        );
        let extra = compress(tick_json(4).as_bytes()).unwrap();
        let mut trailing = finished.clone();
        trailing.extend_from_slice(&extra);
        assert!(
            matches!(
                inflate_message(&trailing, 1 << 20),
                Err(FrameError::Protocol(_))
            ),
            "whole message"
        );
        // The same across fragments: the final block in one, more bytes in the next.
        let mut inflater = Inflater::default();
        let mut out = Vec::new();
        inflater
            .inflate(&finished, false, &mut out, 1 << 20)
            .unwrap();
        assert!(matches!(
            inflater.inflate(&extra, true, &mut out, 1 << 20),
            Err(FrameError::Protocol(_))
        ));
        // An empty last fragment after the final block is fine.
        let mut inflater = Inflater::default();
        let mut out = Vec::new();
        inflater
            .inflate(&finished, false, &mut out, 1 << 20)
            .unwrap();
        inflater.inflate(&[], true, &mut out, 1 << 20).unwrap();
        assert_eq!(out, tick.as_bytes());
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(matches!(
            inflate_message(&[0xff; 64], 1 << 20),
            Err(FrameError::Protocol(_))
        ));
    }
}

//! What the fuzz targets `fuzz/fuzz_targets/ws_frames.rs` and `ws_upgrade.rs` check, as plain
//! functions over untrusted bytes, so that `tests/fuzz_corpus.rs` replays the committed
//! corpus through exactly the same code on a stable toolchain. Each panics on a broken
//! invariant (that is what the fuzzer reports); none does I/O.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::decoder::{Decoder, Incoming};
use super::frame::FrameError;

/// Largest message the frame target allows: small, so that short inputs reach the limits
/// (of a single frame and of a reassembled message) often.
const MAX_MESSAGE: usize = 300;

/// Frame decoding and reassembly. The first byte picks how the rest is cut into reads; the
/// decoder must give the same messages and the same error whether the bytes come at once or
/// in pieces, every text message is UTF-8 (by type) and every message is within the limit.
pub fn frames(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    // The seed's top bit: decode as a connection that negotiated permessage-deflate, where
    // RSV1 frames are inflated (and must stay within the limit once inflated).
    let deflate = seed & 0x80 != 0;
    let whole = decode(input, &mut std::iter::once(input.len().max(1)), deflate);
    // Piece sizes 1..=16 from the seed's bits, repeating.
    let mut sizes = (0..).map(|i: u32| 1 + usize::from(seed.rotate_left(i % 8) & 0x0F));
    let pieces = decode(input, &mut sizes, deflate);
    assert_eq!(whole, pieces, "decoding depends on how the input is cut");
    for msg in &whole.0 {
        match msg {
            Incoming::Text(t) => assert!(t.len() <= MAX_MESSAGE),
            Incoming::Binary(b) => assert!(b.len() <= MAX_MESSAGE),
            Incoming::Ping(p) => assert!(p.len() <= 125),
            Incoming::Pong | Incoming::Close(_) => {}
        }
    }
}

fn decode(
    input: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
    deflate: bool,
) -> (Vec<Incoming>, Option<FrameError>) {
    let mut decoder = Decoder::new(MAX_MESSAGE);
    if deflate {
        decoder.inflate_compressed();
    }
    let mut out = Vec::new();
    let mut at = 0;
    while at < input.len() {
        let end = (at + sizes.next().unwrap_or(1)).min(input.len());
        let mut fresh = &input[at..end];
        // As the socket does: frames left over by the inflate budget are decoded before
        // anything new is read.
        loop {
            if let Err(e) = decoder.absorb(fresh, &mut out) {
                return (out, Some(e));
            }
            if !decoder.has_buffered() {
                break;
            }
            fresh = &[];
        }
        at = end;
    }
    (out, None)
}

/// The HTTP upgrade head: parsed as hyper parses it (httparse), then checked by
/// [`super::accept_key`] and [`super::deflate::negotiate`]. An accepted request yields a 28-character base64 accept value.
pub fn upgrade(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        map.append(name, value);
    }
    // The permessage-deflate offer: any header parses to an answer or to none, never a panic,
    // and an answer is always the no-context-takeover form.
    if let Some(answer) = super::deflate::negotiate(&map) {
        assert!(answer
            .to_str()
            .is_ok_and(|a| a.starts_with(super::deflate::RESPONSE)));
    }
    match super::accept_key(&map) {
        Ok(accept) => {
            assert_eq!(accept.len(), 28);
            assert!(accept
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')));
        }
        Err(refused) => assert!(!refused.reason().is_empty()),
    }
}

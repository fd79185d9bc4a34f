//! The store's tables and the byte layout of every stored value. The writer thread encodes
//! here and the read paths decode here, so the on-disk format lives in one place. A value of
//! the wrong shape decodes to `None` (the caller turns it into `StoreError::Corrupt` or skips
//! it): a damaged file must never panic the server.
//!
//! Ticks are stored in chunks: one row holds a run of one symbol's ticks in seq order, in a
//! compact binary form (deltas and varints, ~45 bytes a tick instead of ~220 of JSON).
//! Durable ingest at a million ticks a second is bound by B-tree inserts and bytes synced to
//! disk, and chunks cut both by two orders of magnitude. The binary form keeps every `Tick`
//! field bit-exact, so `Tick::write_json` regenerates the very bytes the live clients got.

use redb::TableDefinition;

use super::{Bar, DeadLetter, Timeframe};
use crate::tick::{Priority, Symbol, Tick, TradeId};

/// Layout version written to `META`; an unknown version refuses to open rather than misread.
pub(super) const FORMAT_VERSION: u64 = 1;

/// `(symbol, seq of the chunk's first tick) -> chunk` (see [`ChunkWriter`]). Chunks of a
/// symbol never overlap: every seq in a chunk is below the next chunk's key.
pub(super) const TICKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("ticks");

/// Most ticks in one chunk. Bounds what a history read decodes beyond what it returns.
pub(super) const CHUNK_MAX_TICKS: usize = 256;
/// Most bytes in one chunk (a chunk is closed after the tick that passes this).
pub(super) const CHUNK_MAX_BYTES: usize = 16 * 1024;

/// `symbol -> (last seq, price, ts)`: where each symbol's seq continues after a restart, and
/// the `/api/symbols` answer.
pub(super) const LAST: TableDefinition<&str, (u64, f64, i64)> = TableDefinition::new("last");

/// `(symbol, bucket start ms) -> BarRec` per timeframe, in `Timeframe::ALL` order. Kept up to
/// date by the writer in the same transaction as the ticks, so bars survive restarts.
pub(super) const BARS: [TableDefinition<(&str, i64), &[u8]>; 6] = [
    TableDefinition::new("bars_1m"),
    TableDefinition::new("bars_5m"),
    TableDefinition::new("bars_15m"),
    TableDefinition::new("bars_1h"),
    TableDefinition::new("bars_4h"),
    TableDefinition::new("bars_1d"),
];

/// `id -> encoded DeadLetter`, ids increasing, so the first entry is the oldest to evict.
pub(super) const DLQ: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// Small named numbers: `format`, `epoch`, `clean`.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// `import file key -> rows done`, so an interrupted import resumes where it stopped.
pub(super) const IMPORTS: TableDefinition<&str, u64> = TableDefinition::new("import_progress");

pub(super) const META_FORMAT: &str = "format";
pub(super) const META_EPOCH: &str = "epoch";
pub(super) const META_CLEAN: &str = "clean";
/// The write-ahead log's generation: raised by every durable writer commit (see `log`).
pub(super) const META_LOG_GENERATION: &str = "log_generation";

/// One stored bar. Besides OHLCV it remembers the seqs of its open and close ticks, so merging
/// partial bars from different transactions picks open/close by seq order whatever order the
/// batches were committed in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BarRec {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    pub count: u64,
    pub open_seq: u64,
    pub close_seq: u64,
}

/// Encoded size of a `BarRec`: eight little-endian 8-byte fields.
pub(super) const BAR_LEN: usize = 64;

impl BarRec {
    /// The bar of a single tick.
    pub fn from_tick(price: f64, volume: f64, seq: u64) -> Self {
        Self {
            open: price,
            high: price,
            low: price,
            close: price,
            volume,
            count: 1,
            open_seq: seq,
            close_seq: seq,
        }
    }

    /// Folds `other` (ticks of the same bucket) into this bar.
    pub fn merge(&mut self, other: &BarRec) {
        if other.open_seq < self.open_seq {
            self.open = other.open;
            self.open_seq = other.open_seq;
        }
        if other.close_seq > self.close_seq {
            self.close = other.close;
            self.close_seq = other.close_seq;
        }
        self.high = self.high.max(other.high);
        self.low = self.low.min(other.low);
        self.volume += other.volume;
        self.count += other.count;
    }

    pub fn encode(&self) -> [u8; BAR_LEN] {
        let mut out = [0u8; BAR_LEN];
        let fields = [
            self.open.to_bits(),
            self.high.to_bits(),
            self.low.to_bits(),
            self.close.to_bits(),
            self.volume.to_bits(),
            self.count,
            self.open_seq,
            self.close_seq,
        ];
        for (chunk, v) in out.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != BAR_LEN {
            return None;
        }
        let mut f = [0u64; 8];
        for (v, chunk) in f.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(chunk.try_into().ok()?);
        }
        Some(Self {
            open: f64::from_bits(f[0]),
            high: f64::from_bits(f[1]),
            low: f64::from_bits(f[2]),
            close: f64::from_bits(f[3]),
            volume: f64::from_bits(f[4]),
            count: f[5],
            open_seq: f[6],
            close_seq: f[7],
        })
    }

    pub fn to_bar(self, t: i64) -> Bar {
        Bar {
            t,
            open: self.open,
            high: self.high,
            low: self.low,
            close: self.close,
            volume: self.volume,
            count: self.count,
        }
    }
}

/// Longest `message` kept for a dead letter, in bytes; the rest is cut at a char boundary.
pub(super) const DLQ_MAX_MESSAGE: usize = 1024;
/// Longest `raw` kept for a dead letter. A rejected 16 MiB POST body must not become a 16 MiB
/// row (times `dlq_capacity`); the head of the input is what a human needs to see the problem.
pub(super) const DLQ_MAX_RAW: usize = 16 * 1024;

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `received_at i64 | code len u32 | code | message len u32 | message | raw` (little endian).
pub(super) fn encode_dead_letter(d: &DeadLetter, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&d.received_at.to_le_bytes());
    for s in [cut(&d.code, 255), cut(&d.message, DLQ_MAX_MESSAGE)] {
        // Both are cut far below u32::MAX above.
        #[allow(clippy::cast_possible_truncation)]
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(cut(&d.raw, DLQ_MAX_RAW).as_bytes());
}

pub(super) fn decode_dead_letter(bytes: &[u8]) -> Option<DeadLetter> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, tail) = b.split_at(n);
        *b = tail;
        Some(head)
    }
    fn string(b: &mut &[u8]) -> Option<String> {
        let len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
        String::from_utf8(take(b, len)?.to_vec()).ok()
    }
    let mut b = bytes;
    let received_at = i64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let code = string(&mut b)?;
    let message = string(&mut b)?;
    let raw = String::from_utf8(b.to_vec()).ok()?;
    Some(DeadLetter {
        code,
        message,
        raw,
        received_at,
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        // Truncation is the point: the low 7 bits, with the continuation bit.
        #[allow(clippy::cast_possible_truncation)]
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    #[allow(clippy::cast_possible_truncation)]
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    #[allow(clippy::cast_sign_loss)]
    let z = ((v << 1) ^ (v >> 63)) as u64;
    z
}

fn unzigzag(z: u64) -> i64 {
    #[allow(clippy::cast_possible_wrap)]
    let v = ((z >> 1) as i64) ^ -((z & 1) as i64);
    v
}

/// A bounds-checked reader over a stored value (or a log record): every read returns `None`
/// past the end.
pub(super) struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn f64(&mut self) -> Option<f64> {
        Some(f64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

/// Builds one chunk: `count u32 LE`, then per tick
/// `seq delta varint | ts delta zigzag | t_in delta zigzag | price f64 | volume f64 | quality u8 |
/// flags u8 (bits 0-5: bid ask open high low close present; bits 6-7: id none/int/str) |
/// priority u8 | present optional f64s | id (zigzag varint, or varint length + UTF-8)`.
/// Deltas are from the previous tick in the chunk (the first seq delta is from the key).
pub(super) struct ChunkWriter {
    buf: Vec<u8>,
    count: u32,
    first_seq: u64,
    prev_seq: u64,
    prev_ts: i64,
    prev_t_in: i64,
}

impl ChunkWriter {
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(4096),
            count: 0,
            first_seq: 0,
            prev_seq: 0,
            prev_ts: 0,
            prev_t_in: 0,
        }
    }

    /// Appends a tick; seqs must increase within a chunk.
    pub fn push(&mut self, t: &Tick) {
        if self.count == 0 {
            self.buf.clear();
            self.buf.extend_from_slice(&[0; 4]);
            self.first_seq = t.seq;
            self.prev_seq = t.seq;
            self.prev_ts = 0;
            self.prev_t_in = 0;
        }
        let out = &mut self.buf;
        put_varint(out, t.seq - self.prev_seq);
        put_varint(out, zigzag(t.ts.wrapping_sub(self.prev_ts)));
        put_varint(out, zigzag(t.t_in.wrapping_sub(self.prev_t_in)));
        out.extend_from_slice(&t.price.to_le_bytes());
        out.extend_from_slice(&t.volume.to_le_bytes());
        out.push(t.quality);
        let opts = [t.bid, t.ask, t.open, t.high, t.low, t.close];
        let mut flags = 0u8;
        for (i, o) in opts.iter().enumerate() {
            if o.is_some() {
                flags |= 1 << i;
            }
        }
        flags |= match t.id {
            None => 0,
            Some(TradeId::Int(_)) => 1 << 6,
            Some(TradeId::Str(_)) => 2 << 6,
        };
        out.push(flags);
        out.push(t.priority as u8);
        for v in opts.into_iter().flatten() {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match &t.id {
            None => {}
            Some(TradeId::Int(i)) => put_varint(out, zigzag(*i)),
            Some(TradeId::Str(s)) => {
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
        }
        self.prev_seq = t.seq;
        self.prev_ts = t.ts;
        self.prev_t_in = t.t_in;
        self.count += 1;
    }

    /// Whether the chunk should be closed before another tick.
    pub fn is_full(&self) -> bool {
        // `buf` keeps the taken chunk's bytes until the next push: an empty chunk is not full.
        self.count > 0
            && (self.count as usize >= CHUNK_MAX_TICKS || self.buf.len() >= CHUNK_MAX_BYTES)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Finishes the chunk: `(key, bytes)`; the writer is empty again afterwards.
    pub fn take(&mut self) -> (u64, &[u8]) {
        self.buf[..4].copy_from_slice(&self.count.to_le_bytes());
        self.count = 0;
        (self.first_seq, &self.buf)
    }
}

/// Decodes a whole chunk stored under `key` into `out` (appending), ticks of `symbol`.
pub(super) fn decode_chunk(
    bytes: &[u8],
    key: u64,
    symbol: &Symbol,
    out: &mut Vec<Tick>,
) -> Option<()> {
    let mut r = Reader(bytes);
    let count = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
    // A damaged count must not make us reserve gigabytes: each tick takes >= 22 bytes.
    out.reserve((count as usize).min(bytes.len() / 22));
    let (mut seq, mut ts, mut t_in) = (key, 0i64, 0i64);
    for _ in 0..count {
        seq = seq.checked_add(r.varint()?)?;
        ts = ts.wrapping_add(unzigzag(r.varint()?));
        t_in = t_in.wrapping_add(unzigzag(r.varint()?));
        let price = r.f64()?;
        let volume = r.f64()?;
        let quality = r.u8()?;
        let flags = r.u8()?;
        let priority = *Priority::ALL.get(usize::from(r.u8()?))?;
        let mut opts = [None; 6];
        for (i, o) in opts.iter_mut().enumerate() {
            if flags & (1 << i) != 0 {
                *o = Some(r.f64()?);
            }
        }
        let id = match flags >> 6 {
            0 => None,
            1 => Some(TradeId::Int(unzigzag(r.varint()?))),
            2 => {
                let len = usize::try_from(r.varint()?).ok()?;
                let s = std::str::from_utf8(r.take(len)?).ok()?;
                Some(TradeId::Str(s.into()))
            }
            _ => return None,
        };
        let [bid, ask, open, high, low, close] = opts;
        out.push(Tick {
            symbol: symbol.clone(),
            ts,
            price,
            volume,
            bid,
            ask,
            open,
            high,
            low,
            close,
            id,
            priority,
            quality,
            t_in,
            seq,
        });
    }
    r.0.is_empty().then_some(())
}

impl Timeframe {
    /// Index into `BARS` and per-timeframe arrays.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(seq: u64) -> Tick {
        Tick {
            quality: 97,
            t_in: 1_700_000_000_000_123,
            seq,
            ..Tick::new(
                Symbol::parse("BTC-USD").unwrap(),
                1_700_000_000_000 + i64::try_from(seq).unwrap() * 3,
                65_000.125 + f64::from(u32::try_from(seq).unwrap()),
                0.1,
            )
        }
    }

    #[test]
    fn chunk_round_trip_is_bit_exact_json() {
        let mut ticks = vec![tick(5), tick(6), tick(9)];
        ticks[0].bid = Some(1.5);
        ticks[0].close = Some(-0.0);
        ticks[0].id = Some(TradeId::Str("é\"x\n".into()));
        ticks[0].priority = Priority::Critical;
        ticks[1].ts = -1;
        ticks[1].t_in = i64::MIN;
        ticks[1].id = Some(TradeId::Int(i64::MIN));
        ticks[1].ask = Some(f64::MAX);
        ticks[1].low = Some(1e-300);
        ticks[2].open = Some(3.0);
        ticks[2].high = Some(4.0);
        ticks[2].priority = Priority::Low;
        ticks[2].quality = 0;
        let mut w = ChunkWriter::new();
        for t in &ticks {
            w.push(t);
        }
        let (key, bytes) = w.take();
        assert_eq!(key, 5);
        let mut back = Vec::new();
        decode_chunk(bytes, key, &ticks[0].symbol, &mut back).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in ticks.iter().zip(&back) {
            assert_eq!(a.to_json(), b.to_json());
            assert_eq!(a.price.to_bits(), b.price.to_bits());
            assert_eq!(a.close.map(f64::to_bits), b.close.map(f64::to_bits));
        }
        // Damage never panics.
        for cut in 0..bytes.len() {
            assert!(decode_chunk(&bytes[..cut], key, &ticks[0].symbol, &mut Vec::new()).is_none());
        }
        let mut garbage = bytes.to_vec();
        garbage[0] = 0xff;
        garbage[1] = 0xff;
        assert!(decode_chunk(&garbage, key, &ticks[0].symbol, &mut Vec::new()).is_none());
    }

    #[test]
    fn bar_round_trip_and_merge_by_seq() {
        let mut a = BarRec::from_tick(10.0, 1.0, 5);
        a.merge(&BarRec::from_tick(12.0, 2.0, 6));
        // An earlier seq committed later still becomes the open.
        a.merge(&BarRec::from_tick(9.0, 3.0, 4));
        assert_eq!((a.open, a.high, a.low, a.close), (9.0, 12.0, 9.0, 12.0));
        assert_eq!((a.volume, a.count), (6.0, 3));
        assert_eq!(BarRec::decode(&a.encode()), Some(a));
        assert_eq!(BarRec::decode(&[0u8; 10]), None);
    }

    #[test]
    fn dead_letter_round_trip_and_caps() {
        let d = DeadLetter {
            code: "bad_json".into(),
            message: "é".repeat(DLQ_MAX_MESSAGE),
            raw: "x".repeat(DLQ_MAX_RAW + 10),
            received_at: -5,
        };
        let mut buf = Vec::new();
        encode_dead_letter(&d, &mut buf);
        let back = decode_dead_letter(&buf).unwrap();
        assert_eq!(back.code, "bad_json");
        assert_eq!(back.received_at, -5);
        assert!(back.message.len() <= DLQ_MAX_MESSAGE && back.message.starts_with('é'));
        assert_eq!(back.raw.len(), DLQ_MAX_RAW);
        assert_eq!(decode_dead_letter(&buf[..9]), None);
    }
}

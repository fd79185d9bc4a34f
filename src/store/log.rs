//! The write-ahead log in front of redb: `<dir>/tickfan.log`. At low and moderate rates a
//! small group of ticks is made durable by appending it here (one `write` and one
//! `fdatasync`), acked, and kept in the writer's memory; redb then takes many such groups in
//! one durable transaction, a checkpoint, every `store.checkpoint_ms`. Data flows writer ->
//! log on the hot path and log -> redb only at open, when the records a crash left behind
//! are replayed.
//!
//! Why a log of our own rather than redb alone: a durable redb commit costs about 290 µs of
//! CPU whatever it holds (eight tables touched, about 30 pages written and checksummed, an
//! fdatasync); at 10k ticks/s with a 5 ms window that was 5.8 µs of store CPU per tick. An
//! append here costs one small write and one fdatasync. redb has no log to borrow (its
//! non-durable commits are lost in a crash, which is what an ack must never allow), and no
//! crate we found adds one to it, so this module is the few lines that do.
//!
//! Format: records back to back, each `magic u32 | generation u64 | length u32 | crc32 u32 |
//! payload`, the CRC over generation, length and payload. The payload is per symbol
//! `symbol length u8 | symbol | first seq u64 | chunk length u32 | chunk` (the store's chunk
//! codec, ticks in seq order). The generation is the store's checkpoint count, kept in redb's
//! meta table by every durable commit; after such a commit the file is emptied and records
//! carry the new generation. Replay takes records of the stored generation from the start of
//! the file and stops at the first one that is torn, damaged or of another generation: a
//! crash mid-append leaves a torn tail (never acked), and an emptying that did not reach the
//! disk leaves records of an older generation (already in redb). A whole record that fails
//! its check with a record of the generation right after it is damage, not a torn tail:
//! `Store::open` then keeps a copy of the file before it empties it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::codec::{self, ChunkWriter, Reader};
use super::StoredTick;
use crate::tick::{Symbol, Tick};

/// Name of the log file inside `StoreConfig::dir`.
pub const FILE_NAME: &str = "tickfan.log";

const MAGIC: u32 = 0x5446_4c31; // "TFL1"
const HEADER: usize = 4 + 8 + 4 + 4;
/// A length above this is a damaged record, not a reason to allocate it.
const MAX_RECORD: usize = 256 * 1024 * 1024;

/// The open log.
pub(super) struct Log {
    file: File,
    path: PathBuf,
    generation: u64,
    /// An append or an emptying failed: nothing more is appended until an emptying succeeds
    /// (an append after a torn one would be unreachable at replay).
    broken: bool,
    buf: Vec<u8>,
    chunk: ChunkWriter,
    /// The symbols of the last record, once each (its ticks are grouped by symbol anyway).
    symbols: Vec<Symbol>,
}

impl Log {
    /// Opens (creating) the log at `path` and empties it for `generation`: call after the
    /// records of the previous run were replayed into a durable commit.
    pub(super) fn create(path: &Path, generation: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        // A new file's directory entry is durable only once the folder is synced; an append's
        // fdatasync does not promise it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            generation,
            broken: false,
            buf: Vec::with_capacity(64 * 1024),
            chunk: ChunkWriter::new(),
            symbols: Vec::new(),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The symbols of the last record appended, each once.
    pub(super) fn symbols(&self) -> &[Symbol] {
        &self.symbols
    }

    /// Whether appends are possible now.
    pub(super) fn usable(&self) -> bool {
        !self.broken
    }

    /// Appends the ticks of `batches` as one record and waits for it to be on disk.
    pub(super) fn append(&mut self, batches: &[Vec<StoredTick>]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::other("the log is waiting to be emptied"));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&[0; HEADER]);
        self.symbols.clear();
        encode(batches, &mut self.chunk, &mut self.buf, &mut self.symbols);
        let len = self.buf.len() - HEADER;
        let len32 = u32::try_from(len).map_err(|_| io::Error::other("log record too large"))?;
        self.buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        self.buf[4..12].copy_from_slice(&self.generation.to_le_bytes());
        self.buf[12..16].copy_from_slice(&len32.to_le_bytes());
        let crc = crc(&self.buf[4..16], &self.buf[HEADER..]);
        self.buf[16..20].copy_from_slice(&crc.to_le_bytes());
        let result = self
            .file
            .write_all(&self.buf)
            .and_then(|()| self.file.sync_data());
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Empties the log after a durable commit that raised the generation to `generation`.
    /// The emptying itself need not reach the disk: what it would remove is older.
    pub(super) fn reset(&mut self, generation: u64) -> io::Result<()> {
        self.generation = generation;
        let result = self
            .file
            .set_len(0)
            .and_then(|()| io::Seek::rewind(&mut self.file));
        self.broken = result.is_err();
        result
    }
}

fn crc(head: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(payload);
    h.finalize()
}

/// Appends the payload of a record: each symbol's ticks, stably sorted by seq (of two with one
/// seq, the first handed over stays first, as the store keeps it), as chunks. Each symbol
/// goes to `symbols` once.
fn encode(
    batches: &[Vec<StoredTick>],
    chunk: &mut ChunkWriter,
    out: &mut Vec<u8>,
    symbols: &mut Vec<Symbol>,
) {
    let mut ticks: Vec<&Tick> = batches.iter().flatten().map(|st| &st.tick).collect();
    ticks.sort_by(|a, b| {
        a.symbol
            .as_str()
            .cmp(b.symbol.as_str())
            .then(a.seq.cmp(&b.seq))
    });
    let put = |sym: &str, chunk: &mut ChunkWriter, out: &mut Vec<u8>| {
        let (key, bytes) = chunk.take();
        // Symbols are validated to at most 32 bytes before they get a seq.
        out.push(u8::try_from(sym.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(sym.as_bytes());
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    let mut current: Option<&str> = None;
    for t in ticks {
        let sym = t.symbol.as_str();
        let new_symbol = current != Some(sym);
        if let Some(prev) = current.filter(|_| new_symbol || chunk.is_full()) {
            put(prev, chunk, out);
        }
        if new_symbol {
            symbols.push(t.symbol.clone());
        }
        current = Some(sym);
        chunk.push(t);
    }
    if let Some(sym) = current {
        put(sym, chunk, out);
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub(super) struct Replayed {
    /// The ticks of every intact record of the generation, in record order.
    pub ticks: Vec<StoredTick>,
    /// Records read.
    pub records: u64,
    /// Bytes after the last intact record (a torn append, or older records).
    pub ignored_bytes: u64,
    /// A whole record of the generation failed its check and another one of the
    /// generation follows it: damage inside the log, not a torn tail. Acked ticks after it
    /// could not be read.
    pub damaged: bool,
}

/// Reads the records of `generation` from the log at `path` (none when there is no file).
pub(super) fn replay(path: &Path, generation: u64) -> io::Result<Replayed> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replayed::default()),
        Err(e) => return Err(e),
    };
    let total = file.metadata()?.len();
    let mut r = BufReader::with_capacity(256 * 1024, file);
    let mut out = Replayed::default();
    let mut read = 0u64;
    let mut payload = Vec::new();
    let ours = |head: &[u8; HEADER]| {
        header(head).filter(|&(magic, gen, len, _)| {
            magic == MAGIC && gen == generation && len <= MAX_RECORD && len as u64 <= total
        })
    };
    let mut head = [0u8; HEADER];
    loop {
        if !fill(&mut r, &mut head)? {
            break;
        }
        let Some((_, _, len, want)) = ours(&head) else {
            break;
        };
        payload.resize(len, 0);
        if !fill(&mut r, &mut payload)? {
            break;
        }
        let ticks = (crc(&head[4..16], &payload) == want)
            .then(|| decode(&payload))
            .flatten();
        let Some(ticks) = ticks else {
            // A record of the generation right after this one: damage, not a torn tail.
            out.damaged = fill(&mut r, &mut head)? && ours(&head).is_some();
            break;
        };
        out.ticks
            .extend(ticks.into_iter().map(|t| StoredTick::new(t, None)));
        out.records += 1;
        read += (HEADER + len) as u64;
    }
    // `total` was read first; a file that grew meanwhile (no other writer should exist)
    // must not underflow this.
    out.ignored_bytes = total.saturating_sub(read);
    Ok(out)
}

/// Fills `buf`; `false` when the file ends first (a torn tail).
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn decode(payload: &[u8]) -> Option<Vec<Tick>> {
    let mut r = Reader(payload);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let n = usize::from(r.u8()?);
        let symbol = Symbol::parse(std::str::from_utf8(r.take(n)?).ok()?)?;
        let key = r.u64()?;
        let len = r.u32()? as usize;
        codec::decode_chunk(r.take(len)?, key, &symbol, &mut out)?;
    }
    Some(out)
}

/// A header's fields: `(magic, generation, length, crc)`.
fn header(head: &[u8; HEADER]) -> Option<(u32, u64, usize, u32)> {
    let mut r = Reader(head);
    Some((r.u32()?, r.u64()?, r.u32()? as usize, r.u32()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tick(symbol: &str, seq: u64) -> StoredTick {
        let mut t = crate::store::tests::tick(symbol, seq, 1_000 + seq as i64, 10.0, 1.0);
        t.id = Some(crate::tick::TradeId::Str(format!("t{seq}").into()));
        StoredTick::new(t, None)
    }

    fn keys(r: &Replayed) -> Vec<(String, u64)> {
        r.ticks
            .iter()
            .map(|st| (st.tick.symbol.as_str().to_owned(), st.tick.seq))
            .collect()
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut log = Log::create(&path, 7).unwrap();
        log.append(&[vec![tick("B", 2), tick("A", 1), tick("B", 1)]])
            .unwrap();
        let names: Vec<&str> = log.symbols().iter().map(Symbol::as_str).collect();
        assert_eq!(names, ["A", "B"], "each symbol of the record once");
        // More ticks than one chunk holds.
        let many: Vec<_> = (1..=600).map(|s| tick("C", s)).collect();
        log.append(&[many]).unwrap();
        let intact = std::fs::metadata(&path).unwrap().len();
        log.append(&[vec![tick("A", 2)]]).unwrap();
        // A crash mid-append: the last record loses its end.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(intact + 10).unwrap();

        let r = replay(&path, 7).unwrap();
        assert_eq!(r.records, 2);
        assert_eq!(r.ignored_bytes, 10);
        let got = keys(&r);
        assert_eq!(got.len(), 603);
        assert_eq!(
            got[..3],
            [("A".into(), 1), ("B".into(), 1), ("B".into(), 2)]
        );
        assert!(got[3..]
            .iter()
            .zip(1..)
            .all(|((s, q), n)| s == "C" && *q == n));
        // Every field survives, bit for bit.
        let first = r.ticks.iter().find(|st| st.tick.seq == 2).unwrap();
        assert_eq!(first.tick, tick("B", 2).tick);
    }

    /// Ticks big enough that a chunk fills by bytes, then another symbol: every tick comes
    /// back (a chunk writer that called itself full while empty once broke this).
    #[test]
    fn chunks_full_by_bytes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut log = Log::create(&path, 1).unwrap();
        let big = |symbol: &str, seq: u64| {
            let mut st = tick(symbol, seq);
            st.tick.id = Some(crate::tick::TradeId::Str("x".repeat(1000).into()));
            st
        };
        // 16 such ticks pass the chunk's byte limit with the last one.
        let batch: Vec<_> = (1..=40)
            .map(|s| big("A", s))
            .chain((1..=16).map(|s| big("B", s)))
            .collect();
        log.append(&[batch]).unwrap();
        log.append(&[vec![big("C", 1)]]).unwrap();
        let r = replay(&path, 1).unwrap();
        assert_eq!(r.ticks.len(), 57);
        assert_eq!(r.ignored_bytes, 0);
    }

    #[test]
    fn records_of_another_generation_and_damaged_records_end_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut log = Log::create(&path, 1).unwrap();
        log.append(&[vec![tick("A", 1)]]).unwrap();
        // Older records are already in redb: a replay for generation 2 takes none of them.
        assert_eq!(replay(&path, 2).unwrap().records, 0);

        // An emptying that never reached the disk: new records, then the old tail.
        let old = std::fs::read(&path).unwrap();
        log.reset(2).unwrap();
        log.append(&[vec![tick("A", 2)]]).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&old).unwrap();
        let r = replay(&path, 2).unwrap();
        assert_eq!(keys(&r), [("A".into(), 2)]);
        assert_eq!(r.ignored_bytes, old.len() as u64);

        // One flipped payload byte: the CRC refuses the record. An older generation follows
        // it, so this reads like a torn tail, not damage.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = replay(&path, 2).unwrap();
        assert_eq!((r.records, r.damaged), (0, false));
        // Damage with a record of the generation after it is told apart.
        let mut log = Log::create(&path, 3).unwrap();
        log.append(&[vec![tick("A", 1)]]).unwrap();
        log.append(&[vec![tick("A", 2)]]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let r = replay(&path, 3).unwrap();
        assert_eq!((r.records, r.damaged), (0, true));
        // No file, nothing to replay.
        assert_eq!(replay(&dir.path().join("none"), 2).unwrap().records, 0);
    }

    #[test]
    fn a_failed_append_stops_appends_until_the_log_is_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut log = Log::create(&path, 1).unwrap();
        log.broken = true;
        assert!(log.append(&[vec![tick("A", 1)]]).is_err());
        assert!(!log.usable());
        log.reset(2).unwrap();
        assert!(log.usable());
        log.append(&[vec![tick("A", 1)]]).unwrap();
        assert_eq!(replay(&path, 2).unwrap().records, 1);
    }
}

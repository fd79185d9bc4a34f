//! The embedded redb store: durable tick history, OHLCV bars, the dead-letter list, the epoch
//! and import progress, all in one file `<dir>/tickfan.redb` (plus its write-ahead log).
//!
//! Data flows in one direction for writes and another for reads. Writes (`append`,
//! `push_dead_letters`, `set_import_progress`) are handed over a bounded channel to one
//! dedicated writer thread (`writer`), which groups everything waiting into a single durable
//! transaction (group commit), and only after the commit settles each tick's [`AckGroup`], so
//! an acknowledged tick is never lost. A small group of ticks is made durable by an append to
//! the write-ahead log (`log`, `<dir>/tickfan.log`) instead, acked, and committed to redb
//! with others at the next checkpoint; `open` replays what a crash left in the log.
//! Reads (`history`, `bars`, `dead_letters`, `symbols`) are synchronous redb read
//! transactions on the caller's thread (use `spawn_blocking` from async code); MVCC means
//! they do not wait for the writer, except that a read of a symbol with logged ticks
//! waiting asks for a checkpoint first, so it sees every acked tick. Retention also runs on the writer thread,
//! in small transactions between group commits.
//!
//! Ticks are stored per symbol in seq-ordered chunks of a compact binary encoding (`codec`),
//! from which history answers regenerate the exact wire JSON: that is what lets one thread
//! commit well over a million ticks a second durably.
//!
//! A full disk (or any write error): the failed batch stays with the writer, which retries it
//! with backoff, answers nothing and settles no ack until it is stored. While it fails,
//! [`Store::is_failing`] is true, so ingest refuses new ticks with `backpressure` and `/health`
//! answers 503, and the writer takes whatever else is handed over into the same retry group
//! (bounded: admission is closed, so only ticks already accepted can arrive). redb latches an
//! I/O error during a commit (every later transaction fails with `PreviousIo`) until the file
//! is reopened, so the writer reopens it (which repairs it to the last durable commit) before
//! each retry; readers see [`StoreError::Reopening`] meanwhile. When a retry commits, the
//! ticks' acks settle and admission reopens on its own.
//!
//! Epoch: a random nonzero number stored in the file. It survives a clean restart (`close()`
//! was called) and is replaced after an unclean stop, so clients holding `since_seq` positions
//! can tell whether those positions still mean the same ticks.

mod codec;
mod log;
mod writer;

#[cfg(test)]
mod tests;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::Serialize;

use crate::ack::AckGroup;
use crate::config::StoreConfig;
use crate::tick::{Symbol, Tick};

use codec::{BarRec, BARS, DLQ, IMPORTS, LAST, META, TICKS};
use writer::{Cmd, Writer, WriterConfig};

/// Name of the database file inside `StoreConfig::dir`.
pub const FILE_NAME: &str = "tickfan.redb";

/// Errors of the store. Expected conditions (an unknown symbol, an empty history) are empty
/// answers, not errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store file or folder could not be opened: unreadable, not a redb database,
    /// corrupted, written by an unknown store version, or in use by another process.
    #[error("cannot open store {}: {reason}", path.display())]
    Open {
        /// The file (or folder) that failed.
        path: PathBuf,
        /// What went wrong, for a human.
        reason: String,
    },
    /// An operating-system I/O error outside redb (e.g. starting the writer thread).
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A redb read or transaction failed.
    #[error("store database error: {0}")]
    Database(Box<redb::Error>),
    /// A durable commit failed. Its ticks were not acknowledged; the writer keeps retrying.
    #[error("store commit failed: {0}")]
    Write(String),
    /// A stored record does not have the expected layout.
    #[error("corrupt record in store table {table}")]
    Corrupt {
        /// The table holding the record.
        table: &'static str,
    },
    /// `close()` was called, or the writer thread has stopped.
    #[error("store is closed")]
    Closed,
    /// The writer is reopening the file after a write error (a full disk); try again shortly.
    #[error("store is reopening after a write error")]
    Reopening,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(Box::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// What `open` found: the epoch to announce and where every symbol's seq continues.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The epoch of this run (kept after a clean close, new otherwise).
    pub epoch: u64,
    /// Whether the previous run closed the store cleanly. `false` for a new store and after an
    /// unclean stop (both get a new epoch).
    pub clean: bool,
    /// Whether the file was created by this open.
    pub created: bool,
    /// Every symbol's last stored tick.
    pub symbols: Vec<SymbolLast>,
    /// Ticks the write-ahead log held that redb did not (acked before an unclean stop),
    /// stored again by this open.
    pub replayed_ticks: u64,
}

impl Recovery {
    /// How the previous run ended, for the start-up log: `"new store"` (nothing to recover:
    /// logging `clean=false` here read like crash recovery), `"clean stop"`, or
    /// `"unclean stop"` (a crash or kill; the epoch changed).
    #[must_use]
    pub fn previous_run(&self) -> &'static str {
        if self.created {
            "new store"
        } else if self.clean {
            "clean stop"
        } else {
            "unclean stop"
        }
    }
}

/// A symbol's last stored tick: where its seq continues.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SymbolLast {
    /// The symbol.
    pub symbol: Symbol,
    /// Its highest stored seq.
    pub seq: u64,
    /// Price of that tick.
    pub price: f64,
    /// Event time of that tick, ms.
    pub ts: i64,
}

/// One tick handed to the store. The store keeps a compact bit-exact binary form of `tick`
/// and regenerates its wire bytes with `write_json` for history, so no serialized copy travels
/// with it: the writer thread would only drop it (an atomic decrement on a frame the
/// dispatcher's clients still share, 2-3 % of the writer at 100k ticks/s).
#[derive(Debug, Clone)]
pub struct StoredTick {
    /// The tick, `seq` set (the key it is stored under).
    pub tick: Tick,
    /// Settled once the transaction holding this tick has durably committed.
    pub ack: Option<Arc<AckGroup>>,
}

impl StoredTick {
    /// Wraps `tick` (with its seq set) and its producer's ack.
    #[must_use]
    pub fn new(tick: Tick, ack: Option<Arc<AckGroup>>) -> Self {
        Self { tick, ack }
    }
}

/// A history answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Tick JSON objects, oldest first.
    pub ticks: Vec<Bytes>,
    /// Oldest seq still stored for the symbol (`None`: nothing stored). A resume from
    /// `since_seq = S` has a gap when `S + 1 < first_seq`.
    pub first_seq: Option<u64>,
    /// The symbol's last seq (0 when it never had a tick).
    pub last_seq: u64,
}

/// Bar timeframes of `/api/bars`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Timeframe {
    /// One minute.
    M1 = 0,
    /// Five minutes.
    M5 = 1,
    /// Fifteen minutes.
    M15 = 2,
    /// One hour.
    H1 = 3,
    /// Four hours.
    H4 = 4,
    /// One day (UTC).
    D1 = 5,
}

impl Timeframe {
    /// Every timeframe, shortest first.
    pub const ALL: [Timeframe; 6] = [Self::M1, Self::M5, Self::M15, Self::H1, Self::H4, Self::D1];

    /// Parses the wire name (`1m`, `5m`, `15m`, `1h`, `4h`, `1d`).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|tf| tf.as_str() == s)
    }

    /// The wire name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::M1 => "1m",
            Self::M5 => "5m",
            Self::M15 => "15m",
            Self::H1 => "1h",
            Self::H4 => "4h",
            Self::D1 => "1d",
        }
    }

    /// Length of one bar, ms.
    #[must_use]
    pub fn millis(self) -> i64 {
        const MIN: i64 = 60_000;
        match self {
            Self::M1 => MIN,
            Self::M5 => 5 * MIN,
            Self::M15 => 15 * MIN,
            Self::H1 => 60 * MIN,
            Self::H4 => 240 * MIN,
            Self::D1 => 1_440 * MIN,
        }
    }

    /// Start of the bucket holding `ts` (buckets are aligned to the Unix epoch, so days are UTC
    /// days; `div_euclid` keeps pre-1970 timestamps in the right bucket).
    #[must_use]
    pub fn bucket_start(self, ts: i64) -> i64 {
        let ms = self.millis();
        ts.div_euclid(ms) * ms
    }
}

/// One OHLCV bar.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Bar {
    /// Bucket start, ms since the Unix epoch.
    pub t: i64,
    /// Price of the bucket's first tick (lowest seq).
    pub open: f64,
    /// Highest price.
    pub high: f64,
    /// Lowest price.
    pub low: f64,
    /// Price of the bucket's last tick (highest seq).
    pub close: f64,
    /// Sum of volumes.
    pub volume: f64,
    /// Ticks in the bucket.
    pub count: u64,
}

/// One rejected input, as `/api/dlq` shows it (the type lives with the in-memory list). The
/// store keeps `message` up to 1 KiB and `raw` up to 16 KiB so a huge bad body cannot bloat
/// the file.
pub use crate::dlq::DeadLetter;

/// Counters for metrics and health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write transactions committed.
    pub commits: u64,
    /// Ticks committed (duplicates of an already stored `(symbol, seq)` excluded).
    pub ticks_committed: u64,
    /// Ticks whose `(symbol, seq)` was already stored (overwritten, not re-aggregated).
    pub duplicate_ticks: u64,
    /// Dead letters dropped because the writer queue was full.
    pub dead_letters_dropped: u64,
    /// Ticks removed by retention.
    pub ticks_retained_away: u64,
    /// The last commit error, cleared by the next successful commit.
    pub last_error: Option<String>,
    /// Commits that failed (each is retried until it succeeds).
    pub commit_errors: u64,
    /// Writes are failing now (e.g. the disk is full): ingest refuses new ticks.
    pub failing: bool,
    /// Ticks accepted and handed over but not stored yet because writes fail (the retry
    /// group); they are stored, and acked, once a retry commits.
    pub retry_ticks: u64,
    /// Times the database file was reopened after a write error.
    pub reopens: u64,
    /// Groups made durable by a write-ahead log append.
    pub log_appends: u64,
    /// Log appends or emptyings that failed (their ticks went to redb).
    pub log_errors: u64,
    /// Logged ticks waiting for a checkpoint.
    pub log_pending_ticks: u64,
}

/// What one complete retention pass removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Ticks removed.
    pub ticks: u64,
    /// Bars removed (all timeframes).
    pub bars: u64,
}

/// The open database, shared by readers and the writer. Empty while the writer reopens the
/// file after a write error (redb refuses a second open of a file that is still open).
#[derive(Debug)]
pub(crate) struct DbSlot(parking_lot::RwLock<Option<Arc<Database>>>);

impl DbSlot {
    fn new(db: Arc<Database>) -> Self {
        Self(parking_lot::RwLock::new(Some(db)))
    }

    /// The database, for one transaction.
    fn get(&self) -> Result<Arc<Database>, StoreError> {
        self.0.read().clone().ok_or(StoreError::Reopening)
    }
}

/// State shared between the handles and the writer thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    commits: AtomicU64,
    ticks_committed: AtomicU64,
    duplicate_ticks: AtomicU64,
    dead_letters_dropped: AtomicU64,
    ticks_retained_away: AtomicU64,
    commit_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    failing: AtomicBool,
    retry_ticks: AtomicU64,
    reopens: AtomicU64,
    log_appends: AtomicU64,
    log_errors: AtomicU64,
    /// Logged ticks not yet in redb, and their symbols: a reader of one of those symbols
    /// asks for a checkpoint first. Both are set before the ticks' acks settle and cleared
    /// after the checkpoint's commit.
    pending_ticks: AtomicU64,
    pending_symbols: Mutex<ahash::AHashSet<Box<str>>>,
    /// Commit duration (seconds) and size (ticks) histograms, once metrics are attached.
    histograms: std::sync::OnceLock<(metrics::Histogram, metrics::Histogram)>,
}

/// The store handle: cheap to clone, `Send + Sync`. The last handle dropped without `close()`
/// stops the writer after it committed what it had, but leaves the store marked unclean (the
/// next open picks a new epoch), as a killed process would.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// Readers open their own read transactions on it; the writer thread holds a clone.
    db: Arc<DbSlot>,
    /// The bounded command channel to the writer: the backpressure point of ingest.
    tx: flume::Sender<Cmd>,
    /// The writer thread, taken by `close()` (or `Drop`) to join it.
    writer: Mutex<Option<JoinHandle<()>>>,
    epoch: u64,
    path: PathBuf,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("epoch", &self.inner.epoch)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens or creates `<dir>/tickfan.redb` (creating `dir`), stores what an unclean stop left
    /// in the write-ahead log `<dir>/tickfan.log`, picks the epoch, marks the store dirty
    /// durably (so a kill before `close()` is detected at the next open) and starts the
    /// writer thread. Blocking (it reads, and by default verifies, the whole file): call it
    /// before starting the runtime's work or from `spawn_blocking`.
    ///
    /// # Errors
    /// [`StoreError::Open`] naming the file when it cannot be created or read, is not a redb
    /// database, is corrupted, has an unknown layout, or is open in another process, or when
    /// the log cannot be read or its ticks stored.
    pub fn open(config: &StoreConfig) -> Result<(Store, Recovery), StoreError> {
        std::fs::create_dir_all(&config.dir).map_err(|e| StoreError::Open {
            path: config.dir.clone(),
            reason: format!("cannot create the store folder: {e}"),
        })?;
        let path = config.dir.join(FILE_NAME);
        let open_err = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        let db = open_database(&path, config).map_err(open_err)?;
        let db = Arc::new(db);
        let log_path = config.dir.join(log::FILE_NAME);
        let log_err = |e: std::io::Error| StoreError::Open {
            path: log_path.clone(),
            reason: e.to_string(),
        };
        let (generation, replayed) = replay_log(&db, &path, &log_path).map_err(|e| match e {
            e @ StoreError::Open { .. } => e,
            StoreError::Io(e) => log_err(e),
            other => open_err(other.to_string()),
        })?;
        let mut recovery = init(&db, &path).map_err(|e| match e {
            e @ StoreError::Open { .. } => e,
            other => open_err(other.to_string()),
        })?;
        recovery.replayed_ticks = replayed;
        let log = if config.checkpoint_ms > 0 {
            Some(log::Log::create(&log_path, generation).map_err(log_err)?)
        } else {
            match std::fs::remove_file(&log_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(log_err(e)),
                _ => None,
            }
        };

        let shared = Arc::new(Shared::default());
        let (tx, rx) = flume::bounded(config.writer_queue.max(1));
        let db = Arc::new(DbSlot::new(db));
        let reopen_config = config.clone();
        let reopen_path = path.clone();
        let writer = Writer::new(
            db.clone(),
            rx,
            WriterConfig::from_store_config(config),
            shared.clone(),
            Box::new(move || open_database(&reopen_path, &reopen_config)),
            log,
        );
        let handle = std::thread::Builder::new()
            .name("tickfan-store".into())
            .spawn(move || writer.run())?;
        let store = Store {
            inner: Arc::new(Inner {
                db,
                tx,
                writer: Mutex::new(Some(handle)),
                epoch: recovery.epoch,
                path,
                shared,
            }),
        };
        Ok((store, recovery))
    }

    /// The epoch of this run.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// The database file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Hands a batch to the writer. Waits while the writer queue is full: that is the
    /// backpressure. The ticks' ack groups settle after their durable commit.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after `close()`.
    pub async fn append(&self, batch: Vec<StoredTick>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.inner
            .tx
            .send_async(Cmd::Ticks(batch))
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// [`Store::append`] for synchronous callers (the import command); blocks while full.
    ///
    /// # Errors
    /// [`StoreError::Closed`] after `close()`.
    pub fn append_blocking(&self, batch: Vec<StoredTick>) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.inner
            .tx
            .send(Cmd::Ticks(batch))
            .map_err(|_| StoreError::Closed)
    }

    /// Stored ticks of `symbol`, oldest first: without `since_seq` the most recent `limit`,
    /// with it the first `limit` with seq > `since_seq`.
    ///
    /// # Errors
    /// A failed read transaction, or a damaged record.
    pub fn history(
        &self,
        symbol: &str,
        limit: usize,
        since_seq: Option<u64>,
    ) -> Result<History, StoreError> {
        self.checkpoint_logged(Some(symbol));
        let rtx = self.inner.db.get()?.begin_read()?;
        let chunks = rtx.open_table(TICKS)?;
        let last = rtx.open_table(LAST)?;
        let last_seq = last.get(symbol)?.map_or(0, |g| g.value().0);
        let first_seq = match chunks.range((symbol, 0u64)..=(symbol, u64::MAX))?.next() {
            Some(entry) => Some(entry?.0.value().1),
            None => None,
        };
        let mut history = History {
            ticks: Vec::new(),
            first_seq,
            last_seq,
        };
        let Some(sym) = Symbol::parse(symbol).filter(|_| limit > 0 && first_seq.is_some()) else {
            return Ok(history);
        };
        let corrupt = || StoreError::Corrupt { table: "ticks" };
        let mut ticks: Vec<Tick> = Vec::new();
        match since_seq {
            None => {
                // Newest chunks first until `limit` ticks are in hand, then oldest first.
                let mut parts = Vec::new();
                let mut n = 0;
                for entry in chunks.range((symbol, 0u64)..=(symbol, u64::MAX))?.rev() {
                    let (k, v) = entry?;
                    let mut part = Vec::new();
                    codec::decode_chunk(v.value(), k.value().1, &sym, &mut part)
                        .ok_or_else(corrupt)?;
                    n += part.len();
                    parts.push(part);
                    if n >= limit {
                        break;
                    }
                }
                ticks.reserve(n);
                for part in parts.into_iter().rev() {
                    ticks.extend(part);
                }
                ticks.drain(..n.saturating_sub(limit));
            }
            Some(since) => {
                let Some(from) = since.checked_add(1) else {
                    return Ok(history);
                };
                // Start at the chunk covering `from` (the last one keyed at or below it).
                let start = match chunks.range((symbol, 0u64)..=(symbol, from))?.next_back() {
                    Some(entry) => entry?.0.value().1,
                    None => 0,
                };
                let mut part = Vec::new();
                for entry in chunks.range((symbol, start)..=(symbol, u64::MAX))? {
                    let (k, v) = entry?;
                    part.clear();
                    codec::decode_chunk(v.value(), k.value().1, &sym, &mut part)
                        .ok_or_else(corrupt)?;
                    let room = limit - ticks.len();
                    ticks.extend(part.drain(..).filter(|t| t.seq >= from).take(room));
                    if ticks.len() >= limit {
                        break;
                    }
                }
            }
        }
        // All JSON goes into one buffer and each tick is a slice of it: one allocation for
        // the answer instead of one per tick.
        let mut buf = Vec::with_capacity(ticks.len() * 200);
        let mut ends = Vec::with_capacity(ticks.len());
        for t in &ticks {
            t.write_json(&mut buf);
            ends.push(buf.len());
        }
        let buf = Bytes::from(buf);
        let mut start = 0;
        history.ticks = ends
            .into_iter()
            .map(|end| {
                let b = buf.slice(start..end);
                start = end;
                b
            })
            .collect();
        Ok(history)
    }

    /// The most recent `limit` bars of `symbol`, oldest first.
    ///
    /// # Errors
    /// A failed read transaction, or a damaged record.
    pub fn bars(&self, symbol: &str, tf: Timeframe, limit: usize) -> Result<Vec<Bar>, StoreError> {
        self.checkpoint_logged(Some(symbol));
        let rtx = self.inner.db.get()?.begin_read()?;
        let table = rtx.open_table(BARS[tf.index()])?;
        let mut bars = Vec::with_capacity(limit.min(10_000));
        for entry in table
            .range((symbol, i64::MIN)..=(symbol, i64::MAX))?
            .rev()
            .take(limit)
        {
            let (k, v) = entry?;
            let rec = BarRec::decode(v.value()).ok_or(StoreError::Corrupt { table: "bars" })?;
            bars.push(rec.to_bar(k.value().1));
        }
        bars.reverse();
        Ok(bars)
    }

    /// Every symbol's last stored tick (for `/api/symbols`).
    ///
    /// # Errors
    /// A failed read transaction.
    pub fn symbols(&self) -> Result<Vec<SymbolLast>, StoreError> {
        self.checkpoint_logged(None);
        let rtx = self.inner.db.get()?.begin_read()?;
        read_symbols(&rtx.open_table(LAST)?)
    }

    /// Calls `f` with every stored tick of `symbol`, oldest first, decoding one chunk at a
    /// time (so memory stays at one chunk). `tickfan import` uses it to de-duplicate against
    /// everything stored, not only the recent window.
    ///
    /// # Errors
    /// A failed read transaction, or a damaged record.
    pub fn for_each_tick(&self, symbol: &str, mut f: impl FnMut(&Tick)) -> Result<(), StoreError> {
        let Some(sym) = Symbol::parse(symbol) else {
            return Ok(());
        };
        self.checkpoint_logged(Some(symbol));
        let rtx = self.inner.db.get()?.begin_read()?;
        let chunks = rtx.open_table(TICKS)?;
        let mut part = Vec::new();
        for entry in chunks.range((symbol, 0u64)..=(symbol, u64::MAX))? {
            let (k, v) = entry?;
            part.clear();
            codec::decode_chunk(v.value(), k.value().1, &sym, &mut part)
                .ok_or(StoreError::Corrupt { table: "ticks" })?;
            part.iter().for_each(&mut f);
        }
        Ok(())
    }

    /// Hands dead letters to the writer without waiting. When the writer queue is full they
    /// are dropped and counted (`StoreStats::dead_letters_dropped`): losing a diagnostic entry
    /// is better than stalling ingest on it.
    pub fn push_dead_letters(&self, entries: Vec<DeadLetter>) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len() as u64;
        if self.inner.tx.try_send(Cmd::DeadLetters(entries)).is_err() {
            self.inner
                .shared
                .dead_letters_dropped
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The most recent `limit` dead letters, newest first.
    ///
    /// # Errors
    /// A failed read transaction, or a damaged record.
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let rtx = self.inner.db.get()?.begin_read()?;
        let table = rtx.open_table(DLQ)?;
        let mut out = Vec::with_capacity(limit.min(10_000));
        for entry in table.iter()?.rev().take(limit) {
            let (_, v) = entry?;
            out.push(
                codec::decode_dead_letter(v.value()).ok_or(StoreError::Corrupt {
                    table: "dead_letters",
                })?,
            );
        }
        Ok(out)
    }

    /// Records every commit's duration (seconds) into `commit_seconds` and its size (ticks)
    /// into `batch_ticks`. Later calls are ignored.
    pub fn attach_histograms(
        &self,
        commit_seconds: metrics::Histogram,
        batch_ticks: metrics::Histogram,
    ) {
        let _ = self
            .inner
            .shared
            .histograms
            .set((commit_seconds, batch_ticks));
    }

    /// Before a read: when acked ticks of `symbol` (`None`: of any symbol) wait in the
    /// write-ahead log for their checkpoint, asks the writer to checkpoint now, so the read
    /// sees every acked tick. Reads of other symbols do not wait: the first read of a new
    /// symbol by ingest (its dedup memory) happens under the symbol table's lock. A failed
    /// checkpoint (a full disk) is not the reader's error: it reads what redb holds.
    fn checkpoint_logged(&self, symbol: Option<&str>) {
        let shared = &self.inner.shared;
        if shared.pending_ticks.load(Ordering::Acquire) == 0 {
            return;
        }
        if symbol.is_none_or(|s| shared.pending_symbols.lock().contains(s)) {
            let _ = self.flush_blocking();
        }
    }

    /// Waits until everything handed over before this call is durably committed (in redb,
    /// logged ticks included).
    ///
    /// # Errors
    /// [`StoreError::Closed`] after `close()`; [`StoreError::Write`] when the commit failed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.inner
            .tx
            .send_async(Cmd::Flush(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.recv_async().await.map_err(|_| StoreError::Closed)?
    }

    /// [`Store::flush`] for synchronous callers.
    ///
    /// # Errors
    /// As [`Store::flush`].
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.inner
            .tx
            .send(Cmd::Flush(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// Commits everything handed over, marks the store clean (the next open keeps the epoch)
    /// and stops the writer thread. Blocks (call it from `spawn_blocking` on the runtime).
    /// Idempotent: later calls return `Ok`. Reads keep working; writes return `Closed`.
    ///
    /// # Errors
    /// The final commit failed (the store then stays marked unclean).
    pub fn close(&self) -> Result<(), StoreError> {
        self.inner.stop(true)
    }

    /// Runs a complete retention pass now and waits for it (tests, admin tools). The writer
    /// also runs passes on its own every `retention_interval_ms`.
    ///
    /// # Errors
    /// [`StoreError::Closed`], or the pass failed.
    pub fn run_retention(&self) -> Result<RetentionReport, StoreError> {
        let (reply, rx) = flume::bounded(1);
        self.inner
            .tx
            .send(Cmd::Retention(reply))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// How many rows of the import identified by `key` were already stored (0 when unknown).
    ///
    /// # Errors
    /// A failed read transaction.
    pub fn import_progress(&self, key: &str) -> Result<u64, StoreError> {
        let rtx = self.inner.db.get()?.begin_read()?;
        let table = rtx.open_table(IMPORTS)?;
        Ok(table.get(key)?.map_or(0, |g| g.value()))
    }

    /// Records that `rows` rows of the import `key` are stored. Goes through the writer queue
    /// behind the ticks appended before it, so it commits in the same or a later transaction
    /// than those ticks: the progress never runs ahead of the data. Blocks while the queue is
    /// full; durable at the next commit (`flush_blocking` waits for it).
    ///
    /// # Errors
    /// [`StoreError::Closed`] after `close()`.
    pub fn set_import_progress(&self, key: &str, rows: u64) -> Result<(), StoreError> {
        self.inner
            .tx
            .send(Cmd::ImportProgress(key.to_owned(), rows))
            .map_err(|_| StoreError::Closed)
    }

    /// Whether writes are failing now (a full disk, say): nothing new should be accepted
    /// until a retry commits. Cheap (one atomic load), for ingest's admission check.
    #[must_use]
    pub fn is_failing(&self) -> bool {
        self.inner.shared.failing.load(Ordering::Acquire)
    }

    /// Counters for metrics and health.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        let s = &self.inner.shared;
        StoreStats {
            commits: s.commits.load(Ordering::Relaxed),
            ticks_committed: s.ticks_committed.load(Ordering::Relaxed),
            duplicate_ticks: s.duplicate_ticks.load(Ordering::Relaxed),
            dead_letters_dropped: s.dead_letters_dropped.load(Ordering::Relaxed),
            ticks_retained_away: s.ticks_retained_away.load(Ordering::Relaxed),
            last_error: s.last_error.lock().clone(),
            commit_errors: s.commit_errors.load(Ordering::Relaxed),
            failing: s.failing.load(Ordering::Acquire),
            retry_ticks: s.retry_ticks.load(Ordering::Relaxed),
            reopens: s.reopens.load(Ordering::Relaxed),
            log_appends: s.log_appends.load(Ordering::Relaxed),
            log_errors: s.log_errors.load(Ordering::Relaxed),
            log_pending_ticks: s.pending_ticks.load(Ordering::Relaxed),
        }
    }

    /// Test hook: the writer blocks before its next transaction until `release` is dropped or
    /// sent to.
    #[cfg(test)]
    fn hold_writer(&self) -> flume::Sender<()> {
        let (release, rx) = flume::bounded(1);
        self.inner.tx.send(Cmd::Hold(rx)).expect("writer running");
        release
    }
}

impl Inner {
    /// Asks the writer to commit what it has (marking the store clean or not) and joins it.
    fn stop(&self, clean: bool) -> Result<(), StoreError> {
        let Some(handle) = self.writer.lock().take() else {
            return Ok(());
        };
        let (reply, rx) = flume::bounded(1);
        let result = if self.tx.send(Cmd::Close { clean, reply }).is_ok() {
            rx.recv().unwrap_or(Err(StoreError::Closed))
        } else {
            Err(StoreError::Closed)
        };
        // A panicked writer has already dropped its receiver; `result` says Closed then.
        let _ = handle.join();
        result
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No close(): commit what was handed over but leave the store marked unclean. The
        // writer must be gone before the Database handle is, or a reopen finds the file busy.
        let _ = self.stop(false);
    }
}

/// Opens the file, turning every failure (including a redb panic on a damaged file) into a
/// message for `StoreError::Open`.
fn open_database(path: &Path, config: &StoreConfig) -> Result<Database, String> {
    let mut builder = Database::builder();
    builder
        .set_cache_size(config.cache_mb.max(1).saturating_mul(1024 * 1024))
        .set_check_integrity_on_open(config.verify_on_open);
    // redb documents that a plain open may panic on a file damaged outside redb; a bad file
    // must be an error naming it, never a crash, so the open runs under catch_unwind.
    match std::panic::catch_unwind(AssertUnwindSafe(|| builder.create(path))) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err("the store is already open (is another tickfan running on this folder?)".into())
        }
        Ok(Err(e)) => Err(format!(
            "{e} (the file is not a tickfan store or is damaged; move it away to start empty)"
        )),
        Err(_) => {
            Err("the file is damaged (reading it failed); move it away to start empty".to_owned())
        }
    }
}

/// First transaction of a run: creates missing tables, checks the layout version, picks the
/// epoch, durably marks the store dirty, and reads what the rest of the server resumes from.
fn init(db: &Database, path: &Path) -> Result<Recovery, StoreError> {
    let txn = db.begin_write()?;
    let recovery;
    {
        // Opening creates every table, so readers never meet a missing one.
        txn.open_table(TICKS)?;
        txn.open_table(DLQ)?;
        txn.open_table(IMPORTS)?;
        for def in BARS {
            txn.open_table(def)?;
        }
        let mut meta = txn.open_table(META)?;
        let format = meta.get(codec::META_FORMAT)?.map(|g| g.value());
        let created = format.is_none();
        check_format(format, path)?;
        let old_epoch = meta.get(codec::META_EPOCH)?.map(|g| g.value());
        let clean = meta.get(codec::META_CLEAN)?.is_some_and(|g| g.value() == 1);
        let epoch = match old_epoch {
            Some(e) if clean && e != 0 => e,
            _ => new_epoch(old_epoch),
        };
        meta.insert(codec::META_FORMAT, codec::FORMAT_VERSION)?;
        meta.insert(codec::META_EPOCH, epoch)?;
        meta.insert(codec::META_CLEAN, 0)?;
        let symbols = read_symbols(&txn.open_table(LAST)?)?;
        recovery = Recovery {
            epoch,
            clean: clean && !created,
            created,
            symbols,
            replayed_ticks: 0,
        };
    }
    // Durable (the default), so a kill from here on is seen as unclean by the next open.
    txn.commit()?;
    Ok(recovery)
}

/// Refuses a store written in a layout this build does not know (`None`: a new store).
fn check_format(format: Option<u64>, path: &Path) -> Result<(), StoreError> {
    match format {
        Some(v) if v != codec::FORMAT_VERSION => Err(StoreError::Open {
            path: path.to_owned(),
            reason: format!(
                "unknown store format version {v} (this build reads {})",
                codec::FORMAT_VERSION
            ),
        }),
        _ => Ok(()),
    }
}

/// Stores the ticks an unclean stop left in the write-ahead log only (acked, never
/// checkpointed), in one durable transaction that also raises the log generation, so the log
/// can be emptied. Returns the generation new records carry and the ticks that were new.
fn replay_log(db: &Database, path: &Path, log_path: &Path) -> Result<(u64, u64), StoreError> {
    let generation = {
        let rtx = db.begin_read()?;
        match rtx.open_table(META) {
            Ok(meta) => {
                // Before writing anything: a store of another layout must stay untouched.
                check_format(meta.get(codec::META_FORMAT)?.map(|g| g.value()), path)?;
                meta.get(codec::META_LOG_GENERATION)?
                    .map_or(0, |g| g.value())
            }
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        }
    };
    let replayed = log::replay(log_path, generation)?;
    if replayed.damaged {
        // Acked ticks may sit behind the damaged record: a copy is kept for a person to look
        // at, before anything is stored or the log emptied (what came before the damage is
        // stored below). If it cannot be kept, the open fails and nothing has changed.
        let aside = log_path.with_extension(format!("log.damaged-{}", crate::tick::now_ms()));
        std::fs::copy(log_path, &aside).map_err(|e| StoreError::Open {
            path: log_path.to_owned(),
            reason: format!(
                "the log has a damaged record and could not be kept aside as {}: {e}",
                aside.display()
            ),
        })?;
        tracing::error!(
            records = replayed.records,
            kept = %aside.display(),
            "store write-ahead log has a damaged record before intact ones; ticks after it were not replayed"
        );
    }
    let (generation, fresh) = if replayed.ticks.is_empty() {
        (generation, 0)
    } else {
        let txn = db.begin_write()?;
        let counts = writer::write_ticks(&txn, std::iter::once(&replayed.ticks))?;
        txn.open_table(META)?
            .insert(codec::META_LOG_GENERATION, generation + 1)?;
        txn.commit()?;
        tracing::info!(
            records = replayed.records,
            ticks = replayed.ticks.len(),
            stored = counts.fresh,
            ignored_bytes = replayed.ignored_bytes,
            "store replayed its write-ahead log"
        );
        (generation + 1, counts.fresh)
    };
    Ok((generation, fresh))
}

/// A random nonzero epoch different from the previous one.
fn new_epoch(old: Option<u64>) -> u64 {
    loop {
        // 53 bits: the epoch travels in JSON, and browsers read numbers as doubles.
        let e: u64 = rand::random::<u64>() & ((1 << 53) - 1);
        if e != 0 && Some(e) != old {
            return e;
        }
    }
}

fn read_symbols(
    table: &impl ReadableTable<&'static str, (u64, f64, i64)>,
) -> Result<Vec<SymbolLast>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        // The writer stores only validated symbols; anything else is a damaged row, skipped.
        if let Some(symbol) = Symbol::parse(k.value()) {
            let (seq, price, ts) = v.value();
            out.push(SymbolLast {
                symbol,
                seq,
                price,
                ts,
            });
        }
    }
    Ok(out)
}

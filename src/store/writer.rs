//! The writer thread: the only place write transactions happen. Commands come in through the
//! one bounded channel (ticks, dead letters, import progress, and flush / close / retention
//! requests, in the order they were handed over). The thread takes everything waiting (plus
//! whatever arrives within the short group-commit window), writes it in ONE transaction,
//! commits durably (fdatasync), and only then settles the ticks' ack groups and answers the
//! flushes. Within a transaction a symbol's new ticks become one chunk row (see `codec`), and
//! bars and last state are aggregated in memory first, so the B-tree sees one insert per
//! (symbol, chunk) and one read-modify-write per (symbol, bucket) instead of several per tick.
//!
//! When a commit fails (a full disk), the group stays here and is retried with backoff, the
//! file reopened before each retry (redb latches I/O errors until then); the store is marked
//! failing meanwhile, so ingest stops admitting ticks, and whatever else arrives joins the
//! retry group (bounded by what was already accepted). Acks settle only after the retry
//! commits; a close while failing gives up after one more try (those ticks were never acked).
//!
//! The write-ahead log (`log`): a small tick-only group is appended to the log instead
//! (write + fdatasync), its acks settle, and its ticks wait here, `pending`, for the next redb
//! commit, a checkpoint, at most `checkpoint_ms` later (or sooner: when `checkpoint_max_ticks`
//! are waiting, or a group arrives that must commit to redb, which takes them with it). Every
//! redb commit raises the log generation in the same transaction and then empties the log. A
//! failed append sends that group the redb way, so the retry path above covers the log too.
//!
//! Retention runs here too, as small non-durable transactions interleaved with the group
//! commits (one step after each commit, more while idle), so it never holds ingest back for
//! longer than one step.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use flume::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    WriteTransaction,
};

use super::codec::{self, BarRec, ChunkWriter, BARS, DLQ, IMPORTS, LAST, META, TICKS};
use super::log::Log;
use super::{DbSlot, DeadLetter, RetentionReport, Shared, StoreError, StoredTick, Timeframe};
use crate::config::StoreConfig;
use crate::tick::{Symbol, Tick};

/// Where the writer answers a request.
pub(super) type Reply<T> = Sender<Result<T, StoreError>>;

/// What the handles send to the writer thread.
pub(super) enum Cmd {
    /// Ticks to store; their acks settle after the commit.
    Ticks(Vec<StoredTick>),
    /// Dead letters to persist (bounded table).
    DeadLetters(Vec<DeadLetter>),
    /// `(import key, rows done)`.
    ImportProgress(String, u64),
    /// Answer once everything before it is committed.
    Flush(Reply<()>),
    /// Run a full retention pass and answer with what it removed.
    Retention(Reply<RetentionReport>),
    /// Commit what is pending (marking the store clean if asked), answer, and stop.
    Close { clean: bool, reply: Reply<()> },
    /// Test hook: block until the sender side is used or dropped.
    #[cfg(test)]
    Hold(Receiver<()>),
}

/// The writer's share of `StoreConfig`, in the units it works with.
pub(super) struct WriterConfig {
    group_commit: Duration,
    max_ticks: usize,
    dlq_capacity: u64,
    retention: RetentionConfig,
    /// Longest time logged ticks wait for redb (`None`: no log).
    checkpoint: Option<Duration>,
    checkpoint_max_ticks: usize,
    log_max_group_ticks: usize,
}

#[derive(Debug, Clone, Copy)]
struct RetentionConfig {
    interval: Option<Duration>,
    max_ticks: u64,
    max_age_ms: i64,
    bars_max_age_ms: i64,
    bars_max: u64,
    batch: usize,
}

impl RetentionConfig {
    fn enabled(&self) -> bool {
        self.max_ticks > 0 || self.max_age_ms > 0 || self.bars_max_age_ms > 0 || self.bars_max > 0
    }
}

impl WriterConfig {
    pub(super) fn from_store_config(c: &StoreConfig) -> Self {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Self {
            group_commit: Duration::from_millis(c.group_commit_ms),
            max_ticks: c.group_commit_max_ticks.max(1),
            dlq_capacity: c.dlq_capacity as u64,
            checkpoint: (c.checkpoint_ms > 0).then(|| Duration::from_millis(c.checkpoint_ms)),
            checkpoint_max_ticks: c.checkpoint_max_ticks.max(1),
            log_max_group_ticks: c.log_max_group_ticks,
            retention: RetentionConfig {
                interval: (c.retention_interval_ms > 0)
                    .then(|| Duration::from_millis(c.retention_interval_ms)),
                max_ticks: c.max_ticks_per_symbol,
                max_age_ms: ms(c.max_age_ms),
                bars_max_age_ms: ms(c.bars_max_age_ms),
                bars_max: c.bars_max_per_symbol,
                batch: c.retention_batch.max(1),
            },
        }
    }
}

/// A window that gathered fewer commands than this counts as quiet: the next one sleeps
/// through instead of waking per batch (`Writer::gather`). 32 batches in 5 ms is far below
/// the 256 the channel holds by default, so a quiet window cannot fill it unless the rate
/// jumps tenfold at once, and then only for one window.
const SLEEP_BELOW_COMMANDS: usize = 32;

/// Symbols a retention transaction looks at, at most, so one step stays short even with very
/// many symbols and nothing to delete.
const RETENTION_SYMBOLS_PER_STEP: usize = 256;

/// Opens the database file again (after a write error).
pub(super) type Reopen = Box<dyn Fn() -> Result<Database, String> + Send>;

/// Longest wait between retries of a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a reopen waits for readers to let go of the old handle before trying anyway.
const READERS_GRACE: Duration = Duration::from_secs(5);

/// The writer thread's state.
pub(super) struct Writer {
    /// The database this thread writes; taken out of `slot` while it is reopened.
    db: Option<Arc<Database>>,
    slot: Arc<DbSlot>,
    reopen: Reopen,
    rx: Receiver<Cmd>,
    cfg: WriterConfig,
    shared: Arc<Shared>,
    /// When the next periodic retention pass starts (`None`: disabled).
    retention_due: Option<Instant>,
    /// The retention pass in progress.
    pass: Option<Pass>,
    /// The write-ahead log (`None`: off, or it could not be opened).
    log: Option<Log>,
    /// Logged (durable, acked) ticks not yet in redb, acks taken out.
    pending: Vec<Vec<StoredTick>>,
    pending_ticks: usize,
    /// When the pending ticks must be checkpointed.
    checkpoint_due: Option<Instant>,
}

/// A retention pass in progress: symbols are visited in order, a few per step.
struct Pass {
    symbols: Vec<String>,
    next: usize,
    now_ms: i64,
    report: RetentionReport,
    replies: Vec<Reply<RetentionReport>>,
}

/// Everything one write transaction will hold.
#[derive(Default)]
struct Group {
    batches: Vec<Vec<StoredTick>>,
    ticks: usize,
    dead_letters: Vec<DeadLetter>,
    imports: Vec<(String, u64)>,
    flushes: Vec<Reply<()>>,
    retention: Vec<Reply<RetentionReport>>,
    close: Option<(bool, Reply<()>)>,
    /// A retention request came with this group (its replies are taken out before the
    /// commit): the pass must see every tick handed over before it, so nothing is logged.
    retention_asked: bool,
}

impl Group {
    fn add(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ticks(batch) => {
                self.ticks += batch.len();
                self.batches.push(batch);
            }
            Cmd::DeadLetters(d) => self.dead_letters.extend(d),
            Cmd::ImportProgress(key, rows) => self.imports.push((key, rows)),
            Cmd::Flush(reply) => self.flushes.push(reply),
            Cmd::Retention(reply) => {
                self.retention_asked = true;
                self.retention.push(reply);
            }
            Cmd::Close { clean, reply } => self.close = Some((clean, reply)),
            #[cfg(test)]
            Cmd::Hold(rx) => {
                let _ = rx.recv();
            }
        }
    }

    /// Someone is waiting for this transaction: waiting longer for company only adds latency.
    fn has_waiter(&self) -> bool {
        !self.flushes.is_empty() || !self.retention.is_empty() || self.close.is_some()
    }

    fn has_writes(&self) -> bool {
        self.ticks > 0
            || !self.dead_letters.is_empty()
            || !self.imports.is_empty()
            || matches!(self.close, Some((true, _)))
    }

    /// Tells every waiter the commit failed. Close is answered too: the caller is stopping.
    fn fail(&mut self, msg: &str) {
        for r in self.flushes.drain(..) {
            let _ = r.send(Err(StoreError::Write(msg.to_owned())));
        }
        for r in self.retention.drain(..) {
            let _ = r.send(Err(StoreError::Write(msg.to_owned())));
        }
        if let Some((_, r)) = self.close.take() {
            let _ = r.send(Err(StoreError::Write(msg.to_owned())));
        }
    }
}

/// What a tick transaction stored.
#[derive(Default)]
pub(super) struct TickCounts {
    pub fresh: u64,
    pub duplicates: u64,
}

impl Writer {
    pub(super) fn new(
        slot: Arc<DbSlot>,
        rx: Receiver<Cmd>,
        cfg: WriterConfig,
        shared: Arc<Shared>,
        reopen: Reopen,
        log: Option<Log>,
    ) -> Self {
        let db = slot.get().ok();
        let retention_due = if cfg.retention.enabled() {
            cfg.retention.interval.map(|i| Instant::now() + i)
        } else {
            None
        };
        Self {
            db,
            slot,
            reopen,
            rx,
            shared,
            retention_due,
            pass: None,
            log: log.filter(|_| cfg.checkpoint.is_some()),
            cfg,
            pending: Vec::new(),
            pending_ticks: 0,
            checkpoint_due: None,
        }
    }

    /// The thread body; returns after `Close` or when every handle is gone.
    pub(super) fn run(mut self) {
        let mut last_commit = Instant::now();
        // Commands the previous window gathered: few means a quiet store (see `gather`).
        let mut last_taken = 0;
        loop {
            // A checkpoint that came due while nothing waits (idle, or a retention pass under
            // way). With groups waiting, the next one makes it (`log_group`).
            if self.checkpoint_due.is_some_and(|c| c <= Instant::now()) && self.rx.is_empty() {
                let (retention, closed) = self.commit_with_retry(Group::default());
                if closed {
                    break;
                }
                if !retention.is_empty() {
                    self.start_pass(retention);
                }
                continue;
            }
            // A retention pass advances whenever nothing is waiting.
            if self.pass.is_some() && self.rx.is_empty() {
                self.retention_step();
                continue;
            }
            let retention_due = self.retention_due.filter(|_| self.pass.is_none());
            let due = match (retention_due, self.checkpoint_due) {
                (Some(r), Some(c)) => Some(r.min(c)),
                (r, c) => r.or(c),
            };
            let first = match due {
                Some(due) => match self.rx.recv_deadline(due) {
                    Ok(cmd) => cmd,
                    Err(RecvTimeoutError::Timeout) => {
                        // A due checkpoint is made at the top of the loop.
                        if retention_due.is_some_and(|r| r <= Instant::now()) {
                            self.start_pass(Vec::new());
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                },
            };
            let mut group = Group::default();
            group.add(first);
            // Commits start at most once per window: an idle store commits at once (fast acks),
            // a busy one shares each fsync among everything that arrived in the window.
            let deadline = last_commit + self.cfg.group_commit;
            last_taken = self.gather(&mut group, deadline, last_taken < SLEEP_BELOW_COMMANDS);
            last_commit = Instant::now();
            let mut retention = std::mem::take(&mut group.retention);
            let (more, closed) = self.commit_with_retry(group);
            retention.extend(more);
            if closed {
                break;
            }
            if !retention.is_empty() {
                self.start_pass(retention);
            }
            // Under sustained ingest the channel is never empty: one step per commit keeps
            // retention moving without starving ticks.
            if self.pass.is_some() {
                self.retention_step();
            }
        }
    }

    /// Adds whatever else is waiting, and what arrives before `deadline` (the end of the
    /// group-commit window that began with the previous commit), up to `max_ticks`.
    ///
    /// When the previous window was quiet (`sleep`: fewer than [`SLEEP_BELOW_COMMANDS`]
    /// commands), the thread sleeps once until the deadline and then takes everything that
    /// came meanwhile, rather than waking for each batch: a blocking receive costs the
    /// dispatcher a futex wake and this thread a context switch per batch (about ten per
    /// commit at 10k ticks/s with one producer frame a millisecond, on the core the fan-out
    /// shares). A flush or close arriving in such a window waits for its end, at most
    /// `group_commit_ms`, like the ticks in it. A busy store receives as batches come, as
    /// before: sleeping, it would let the channel fill and stall the dispatcher, and the
    /// priority queue would refuse ticks (seen at 500k ticks/s). Returns the commands taken.
    fn gather(&self, group: &mut Group, deadline: Instant, sleep: bool) -> usize {
        let mut taken = 0;
        while !group.has_waiter() && group.ticks < self.cfg.max_ticks {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    group.add(cmd);
                    taken += 1;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if self.cfg.group_commit.is_zero() || now >= deadline {
                        break;
                    }
                    if sleep {
                        std::thread::sleep(deadline - now);
                        continue;
                    }
                    match self.rx.recv_deadline(deadline) {
                        Ok(cmd) => {
                            group.add(cmd);
                            taken += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        taken
    }

    /// Commits the group; on failure tells the waiters, marks the store failing (ingest stops
    /// admitting), backs off, reopens the file and retries with the same ticks (still
    /// unacknowledged) plus whatever was handed over meanwhile, so a full disk loses nothing.
    /// Returns retention requests that arrived during retries, for the caller to start, and
    /// whether the group held a close (it may have arrived during the retries): the thread
    /// must stop then, or the closing handle would wait for it forever.
    fn commit_with_retry(&mut self, mut group: Group) -> (Vec<Reply<RetentionReport>>, bool) {
        if self.log_group(&mut group) {
            return (Vec::new(), false);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = std::time::Instant::now();
            let writes = group.has_writes() || self.pending_ticks > 0;
            let result = if writes {
                self.commit(&group)
            } else {
                Ok(TickCounts::default())
            };
            match result {
                Ok(counts) => {
                    if let (true, Some((secs, size))) = (writes, self.shared.histograms.get()) {
                        secs.record(started.elapsed().as_secs_f64());
                        #[allow(clippy::cast_precision_loss)]
                        size.record((group.ticks + self.pending_ticks) as f64);
                    }
                    if writes {
                        // Only a commit raised the generation in redb: the log follows it,
                        // never leads (records ahead of redb's generation are not replayed).
                        self.checkpointed();
                    }
                    let retention = std::mem::take(&mut group.retention);
                    let closed = group.close.is_some();
                    self.finish(group, &counts, writes);
                    self.shared.retry_ticks.store(0, Ordering::Relaxed);
                    if self.shared.failing.swap(false, Ordering::AcqRel) {
                        tracing::info!("store writes work again: accepting ticks");
                    }
                    return (retention, closed);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if !self.shared.failing.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %msg, ticks = group.ticks, "store commit failed; retrying");
                    }
                    *self.shared.last_error.lock() = Some(msg.clone());
                    self.shared.commit_errors.fetch_add(1, Ordering::Relaxed);
                    self.shared
                        .retry_ticks
                        .store((group.ticks + self.pending_ticks) as u64, Ordering::Relaxed);
                    let closing = group.close.is_some();
                    group.fail(&msg);
                    if closing {
                        // The caller is shutting down; these ticks were never acknowledged
                        // (logged ones were, and the log keeps them for the next start).
                        return (std::mem::take(&mut group.retention), true);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    self.reopen_database();
                    // Everything handed over meanwhile joins the retry group: it frees the
                    // channel (the dispatcher keeps fanning out) and lets a close through.
                    // Bounded: ingest admits nothing while failing, so only ticks accepted
                    // before can arrive.
                    while let Ok(cmd) = self.rx.try_recv() {
                        group.add(cmd);
                    }
                }
            }
        }
    }

    /// Makes a small tick-only group durable through the log instead of a redb commit:
    /// appends it, settles its acks, and keeps its ticks for the next checkpoint. `false`
    /// (the group untouched) when the log is off or broken, the group must reach redb now
    /// (a waiter, dead letters, a close, too many ticks, a checkpoint due, the store
    /// failing), or the append
    /// fails; the caller then commits it, with the pending ticks, to redb.
    fn log_group(&mut self, group: &mut Group) -> bool {
        // A checkpoint that came due while groups kept arriving (the idle timer in `run` never
        // fires then) is made by this group's redb commit.
        let due = self.checkpoint_due.is_some_and(|d| Instant::now() >= d);
        let fits = group.ticks > 0
            && !due
            && group.ticks < self.cfg.log_max_group_ticks
            && self.pending_ticks + group.ticks <= self.cfg.checkpoint_max_ticks;
        let only_ticks = !group.has_waiter()
            && !group.retention_asked
            && group.dead_letters.is_empty()
            && group.imports.is_empty();
        let Some(log) = self.log.as_mut().filter(|l| l.usable()) else {
            return false;
        };
        if !fits || !only_ticks || self.shared.failing.load(Ordering::Acquire) {
            return false;
        }
        if let Err(e) = log.append(&group.batches) {
            tracing::warn!(error = %e, path = %log.path().display(),
                "store log append failed; committing to redb instead");
            self.shared.log_errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.shared.log_appends.fetch_add(1, Ordering::Relaxed);
        // Readers must know of these ticks before any producer hears of them: a read after
        // an ack then asks for a checkpoint first.
        {
            let mut symbols = self.shared.pending_symbols.lock();
            for sym in log.symbols() {
                if !symbols.contains(sym.as_str()) {
                    symbols.insert(sym.as_str().into());
                }
            }
        }
        self.pending_ticks += group.ticks;
        self.shared
            .pending_ticks
            .store(self.pending_ticks as u64, Ordering::Release);
        for mut batch in std::mem::take(&mut group.batches) {
            for st in &mut batch {
                if let Some(ack) = st.ack.take() {
                    ack.settle();
                }
            }
            self.pending.push(batch);
        }
        if self.checkpoint_due.is_none() {
            self.checkpoint_due = self.cfg.checkpoint.map(|c| Instant::now() + c);
        }
        true
    }

    /// After a redb commit: the pending ticks are in it and the log starts a new generation.
    fn checkpointed(&mut self) {
        self.pending.clear();
        self.pending_ticks = 0;
        self.checkpoint_due = None;
        self.shared.pending_ticks.store(0, Ordering::Release);
        self.shared.pending_symbols.lock().clear();
        if let Some(log) = self.log.as_mut() {
            if let Err(e) = log.reset(log.generation() + 1) {
                // Records of the old generation are never replayed, and no append happens
                // until an emptying succeeds: every group goes to redb meanwhile.
                tracing::warn!(error = %e, path = %log.path().display(), "store log could not be emptied");
                self.shared.log_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens the database after a failed commit: redb refuses every transaction after an
    /// I/O error during a commit until the file is opened again (which repairs it to the last
    /// durable commit). Readers get `Reopening` meanwhile.
    fn reopen_database(&mut self) {
        let Some(old) = self.slot.0.write().take() else {
            // Taken out by an earlier attempt that could not open it again.
            return self.open_again();
        };
        self.db = None;
        // redb allows one open handle per file: wait for readers holding the old one.
        let deadline = Instant::now() + READERS_GRACE;
        while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(old);
        self.open_again();
    }

    fn open_again(&mut self) {
        match (self.reopen)() {
            Ok(db) => {
                let db = Arc::new(db);
                *self.slot.0.write() = Some(db.clone());
                self.db = Some(db);
                self.shared.reopens.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "store reopen failed; retrying");
                *self.shared.last_error.lock() = Some(e);
            }
        }
    }

    fn db(&self) -> Result<&Database, StoreError> {
        self.db.as_deref().ok_or(StoreError::Reopening)
    }

    /// After a durable commit: settle acks, answer waiters, count.
    fn finish(&self, group: Group, counts: &TickCounts, wrote: bool) {
        for st in group.batches.iter().flatten() {
            if let Some(ack) = &st.ack {
                ack.settle();
            }
        }
        if wrote {
            self.shared.commits.fetch_add(1, Ordering::Relaxed);
            self.shared
                .ticks_committed
                .fetch_add(counts.fresh, Ordering::Relaxed);
            self.shared
                .duplicate_ticks
                .fetch_add(counts.duplicates, Ordering::Relaxed);
            *self.shared.last_error.lock() = None;
        }
        for r in group.flushes {
            let _ = r.send(Ok(()));
        }
        if let Some((_, r)) = group.close {
            let _ = r.send(Ok(()));
        }
    }

    fn commit(&self, group: &Group) -> Result<TickCounts, StoreError> {
        let mut txn = self.db()?.begin_write()?;
        // Acks are sent after this commit, so it must be on disk when commit() returns.
        txn.set_durability(Durability::Immediate)?;
        // The logged ticks go first: they were handed over first.
        let counts = if group.ticks + self.pending_ticks > 0 {
            write_ticks(&txn, self.pending.iter().chain(&group.batches))?
        } else {
            TickCounts::default()
        };
        if let Some(log) = &self.log {
            // The log is emptied after this commit; its records become an older generation.
            txn.open_table(META)?
                .insert(codec::META_LOG_GENERATION, log.generation() + 1)?;
        }
        if !group.dead_letters.is_empty() {
            write_dead_letters(&txn, &group.dead_letters, self.cfg.dlq_capacity)?;
        }
        if !group.imports.is_empty() {
            let mut table = txn.open_table(IMPORTS)?;
            for (key, rows) in &group.imports {
                table.insert(key.as_str(), *rows)?;
            }
        }
        if let Some((true, _)) = &group.close {
            // In the same transaction as the last data: "clean" can never be on disk while
            // some handed-over tick is not.
            txn.open_table(META)?.insert(codec::META_CLEAN, 1)?;
        }
        txn.commit()?;
        Ok(counts)
    }

    /// Starts (or restarts, picking up new symbols) a retention pass; `replies` are answered
    /// when it completes.
    fn start_pass(&mut self, replies: Vec<Reply<RetentionReport>>) {
        let r = self.cfg.retention;
        self.retention_due = if r.enabled() {
            r.interval.map(|i| Instant::now() + i)
        } else {
            None
        };
        if !r.enabled() {
            for reply in replies {
                let _ = reply.send(Ok(RetentionReport::default()));
            }
            return;
        }
        let symbols = match self.symbols() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "store retention could not list symbols");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Write(e.to_string())));
                }
                return;
            }
        };
        let now_ms = crate::tick::now_ms();
        match &mut self.pass {
            Some(pass) => {
                pass.symbols = symbols;
                pass.next = 0;
                pass.now_ms = now_ms;
                pass.replies.extend(replies);
            }
            None => {
                self.pass = Some(Pass {
                    symbols,
                    next: 0,
                    now_ms,
                    report: RetentionReport::default(),
                    replies,
                });
            }
        }
    }

    fn symbols(&self) -> Result<Vec<String>, StoreError> {
        let rtx = self.db()?.begin_read()?;
        let table = rtx.open_table(LAST)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }

    /// One retention transaction of the current pass.
    fn retention_step(&mut self) {
        let Some(pass) = self.pass.as_mut() else {
            return;
        };
        if pass.next >= pass.symbols.len() {
            let report = pass.report;
            if report.ticks > 0 || report.bars > 0 {
                tracing::debug!(
                    ticks = report.ticks,
                    bars = report.bars,
                    "store retention pass"
                );
            }
            for reply in pass.replies.drain(..) {
                let _ = reply.send(Ok(report));
            }
            self.pass = None;
            return;
        }
        let before = pass.report.ticks;
        let Some(db) = self.db.as_deref() else {
            // Reopening after a write error: the next step tries again.
            return;
        };
        match retention_txn(
            db,
            &self.cfg.retention,
            &pass.symbols[pass.next..],
            pass.now_ms,
            &mut pass.report,
        ) {
            Ok(done) => {
                pass.next += done;
                self.shared
                    .ticks_retained_away
                    .fetch_add(pass.report.ticks - before, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "store retention failed");
                for reply in pass.replies.drain(..) {
                    let _ = reply.send(Err(StoreError::Write(e.to_string())));
                }
                self.pass = None;
            }
        }
    }
}

/// Bars of one symbol and timeframe within one transaction. Ticks mostly arrive in time order,
/// so the open bucket is kept aside and merged in place; a bucket change pushes it to `done`,
/// sorted and merged once at the end.
#[derive(Default)]
struct TfAgg {
    cur: Option<(i64, BarRec)>,
    done: Vec<(i64, BarRec)>,
}

impl TfAgg {
    fn clear(&mut self) {
        self.cur = None;
        self.done.clear();
    }

    fn add(&mut self, bucket: i64, rec: &BarRec) {
        match &mut self.cur {
            Some((b, r)) if *b == bucket => r.merge(rec),
            _ => {
                if let Some(prev) = self.cur.replace((bucket, *rec)) {
                    self.done.push(prev);
                }
            }
        }
    }

    fn finish(&mut self) -> &[(i64, BarRec)] {
        if let Some(cur) = self.cur.take() {
            self.done.push(cur);
        }
        if self.done.len() > 1 {
            self.done.sort_unstable_by_key(|(b, _)| *b);
            let mut merged: Vec<(i64, BarRec)> = Vec::with_capacity(self.done.len());
            for (b, r) in self.done.drain(..) {
                match merged.last_mut() {
                    Some((lb, lr)) if *lb == b => lr.merge(&r),
                    _ => merged.push((b, r)),
                }
            }
            self.done = merged;
        }
        &self.done
    }
}

/// Stores the ticks of a transaction symbol by symbol: new ticks (seq above the symbol's last
/// stored seq, the normal case) become fresh chunks; older ones are merged into the chunk that
/// covers them. Last state and bars are then updated once per symbol and bucket.
pub(super) fn write_ticks<'a>(
    txn: &WriteTransaction,
    batches: impl Iterator<Item = &'a Vec<StoredTick>>,
) -> Result<TickCounts, StoreError> {
    let mut counts = TickCounts::default();
    let mut per_symbol: AHashMap<&str, Vec<&Tick>> = AHashMap::new();
    for st in batches.flatten() {
        per_symbol
            .entry(st.tick.symbol.as_str())
            .or_default()
            .push(&st.tick);
    }
    let mut ticks_t = txn.open_table(TICKS)?;
    let mut last_t = txn.open_table(LAST)?;
    let mut bars_t = BARS
        .iter()
        .map(|def| txn.open_table(*def))
        .collect::<Result<Vec<_>, _>>()?;
    let mut chunk = ChunkWriter::new();
    let mut scratch = Vec::new();
    let mut fresh: Vec<&Tick> = Vec::new();
    let mut agg = TfAgg::default();
    for (sym, mut list) in per_symbol {
        if !list.is_sorted_by_key(|t| t.seq) {
            // Stable: of two ticks with one seq, the first handed over is kept.
            list.sort_by_key(|t| t.seq);
        }
        let stored_last = last_t.get(sym)?.map(|g| g.value().0);
        let split = stored_last.map_or(0, |l| list.partition_point(|t| t.seq <= l));
        fresh.clear();
        for t in &list[..split] {
            if merge_into_chunk(&mut ticks_t, sym, t, &mut scratch, &mut chunk)? {
                fresh.push(t);
            } else {
                counts.duplicates += 1;
            }
        }
        let mut newest: Option<&Tick> = None;
        for t in &list[split..] {
            if newest.is_some_and(|n| n.seq == t.seq) {
                counts.duplicates += 1;
                continue;
            }
            if chunk.is_full() {
                let (key, bytes) = chunk.take();
                ticks_t.insert((sym, key), bytes)?;
            }
            chunk.push(t);
            fresh.push(t);
            newest = Some(t);
        }
        if !chunk.is_empty() {
            let (key, bytes) = chunk.take();
            ticks_t.insert((sym, key), bytes)?;
        }
        if let Some(t) = newest {
            last_t.insert(sym, (t.seq, t.price, t.ts))?;
        }
        counts.fresh += fresh.len() as u64;
        for (tf, table) in Timeframe::ALL.iter().zip(bars_t.iter_mut()) {
            agg.clear();
            for t in &fresh {
                agg.add(
                    tf.bucket_start(t.ts),
                    &BarRec::from_tick(t.price, t.volume, t.seq),
                );
            }
            for &(bucket, rec) in agg.finish() {
                let stored = table.get((sym, bucket))?.map(|g| BarRec::decode(g.value()));
                let merged = match stored {
                    Some(Some(mut old)) => {
                        old.merge(&rec);
                        old
                    }
                    Some(None) => {
                        // A damaged bar is replaced rather than failing every commit.
                        tracing::warn!(
                            symbol = sym,
                            bucket,
                            tf = tf.as_str(),
                            "replacing damaged bar"
                        );
                        rec
                    }
                    None => rec,
                };
                table.insert((sym, bucket), merged.encode().as_slice())?;
            }
        }
    }
    Ok(counts)
}

/// Writes `ticks` (seq order) as chunks of at most the chunk size.
fn write_chunks<'a>(
    table: &mut TicksTable<'_>,
    sym: &str,
    ticks: impl IntoIterator<Item = &'a Tick>,
    chunk: &mut ChunkWriter,
) -> Result<(), StoreError> {
    for t in ticks {
        if chunk.is_full() {
            let (key, bytes) = chunk.take();
            table.insert((sym, key), bytes)?;
        }
        chunk.push(t);
    }
    if !chunk.is_empty() {
        let (key, bytes) = chunk.take();
        table.insert((sym, key), bytes)?;
    }
    Ok(())
}

/// The rare path: a tick at or below the symbol's last stored seq (a re-sent or late tick).
/// Returns `false` when its seq is already stored (the stored tick is kept).
fn merge_into_chunk(
    table: &mut TicksTable<'_>,
    sym: &str,
    t: &Tick,
    scratch: &mut Vec<Tick>,
    chunk: &mut ChunkWriter,
) -> Result<bool, StoreError> {
    let covering = match table.range((sym, 0u64)..=(sym, t.seq))?.next_back() {
        Some(entry) => {
            let (k, v) = entry?;
            Some((k.value().1, v.value().to_vec()))
        }
        None => None,
    };
    let Some((key, bytes)) = covering else {
        // Below every stored chunk (or none left after retention): a chunk of its own.
        write_chunks(table, sym, [t], chunk)?;
        return Ok(true);
    };
    if key == t.seq {
        return Ok(false);
    }
    scratch.clear();
    if codec::decode_chunk(&bytes, key, &t.symbol, scratch).is_none() {
        // Don't wedge ingest on a damaged row: keep the tick in a chunk of its own.
        tracing::warn!(
            symbol = sym,
            key,
            "damaged tick chunk; storing a late tick beside it"
        );
        write_chunks(table, sym, [t], chunk)?;
        return Ok(true);
    }
    match scratch.binary_search_by_key(&t.seq, |x| x.seq) {
        Ok(_) => Ok(false),
        Err(pos) => {
            scratch.insert(pos, t.clone());
            // Same first seq, so the first piece overwrites the old row.
            write_chunks(table, sym, scratch.iter(), chunk)?;
            Ok(true)
        }
    }
}

/// Appends dead letters and evicts the oldest beyond `capacity`.
fn write_dead_letters(
    txn: &WriteTransaction,
    entries: &[DeadLetter],
    capacity: u64,
) -> Result<(), StoreError> {
    let mut table = txn.open_table(DLQ)?;
    let mut next = table.last()?.map_or(0, |(k, _)| k.value().wrapping_add(1));
    // Only the newest `capacity` can survive; don't write the rest just to evict them.
    let keep = usize::try_from(capacity).unwrap_or(usize::MAX);
    let mut buf = Vec::new();
    for d in &entries[entries.len().saturating_sub(keep)..] {
        codec::encode_dead_letter(d, &mut buf);
        table.insert(next, buf.as_slice())?;
        next = next.wrapping_add(1);
    }
    while table.len()? > capacity {
        if table.pop_first()?.is_none() {
            break;
        }
    }
    Ok(())
}

type TicksTable<'t> = Table<'t, (&'static str, u64), &'static [u8]>;
type LastTable<'t> = Table<'t, &'static str, (u64, f64, i64)>;
type BarsTable<'t> = Table<'t, (&'static str, i64), &'static [u8]>;

/// One retention transaction over the first symbols of `symbols`. Returns how many symbols it
/// finished (a symbol with more to delete than the budget is continued by the next step).
fn retention_txn(
    db: &Database,
    cfg: &RetentionConfig,
    symbols: &[String],
    now_ms: i64,
    report: &mut RetentionReport,
) -> Result<usize, StoreError> {
    let mut txn = db.begin_write()?;
    // Deletions need no fsync of their own: the next group commit persists them, and a crash
    // before it only means deleting them again.
    txn.set_durability(Durability::None)?;
    let mut budget = cfg.batch;
    let mut done = 0;
    let mut removed = RetentionReport::default();
    {
        let mut ticks = txn.open_table(TICKS)?;
        let last = txn.open_table(LAST)?;
        let mut bars = BARS
            .iter()
            .map(|def| txn.open_table(*def))
            .collect::<Result<Vec<_>, _>>()?;
        for sym in symbols.iter().take(RETENTION_SYMBOLS_PER_STEP) {
            let more = retain_ticks(
                &mut ticks,
                &last,
                sym,
                cfg,
                now_ms,
                &mut budget,
                &mut removed,
            )?;
            if more {
                break;
            }
            removed.bars += retain_bars(&mut bars, sym, cfg, now_ms)?;
            done += 1;
            if budget == 0 {
                break;
            }
        }
    }
    if removed == RetentionReport::default() {
        txn.abort()?;
    } else {
        txn.commit()?;
    }
    report.ticks += removed.ticks;
    report.bars += removed.bars;
    Ok(done)
}

/// Deletes the symbol's oldest ticks beyond `max_ticks` (by seq: those at or below
/// `last_seq - max_ticks`) and older than `max_age_ms`, within `budget`. Always a prefix in seq
/// order, so what remains is contiguous from `first_seq`. Returns whether the budget ran out
/// before the symbol was done.
fn retain_ticks(
    ticks: &mut TicksTable<'_>,
    last: &LastTable<'_>,
    sym: &str,
    cfg: &RetentionConfig,
    now_ms: i64,
    budget: &mut usize,
    removed: &mut RetentionReport,
) -> Result<bool, StoreError> {
    let Some(symbol) = Symbol::parse(sym) else {
        return Ok(false);
    };
    let mut scratch = Vec::new();
    if cfg.max_ticks > 0 {
        let last_seq = last.get(sym)?.map_or(0, |g| g.value().0);
        if last_seq >= cfg.max_ticks {
            let keep_from = last_seq - cfg.max_ticks + 1;
            let (n, more) = trim_front(ticks, sym, &symbol, budget, &mut scratch, |t| {
                t.seq < keep_from
            })?;
            removed.ticks += n;
            if more {
                return Ok(true);
            }
        }
    }
    if cfg.max_age_ms > 0 && *budget > 0 {
        let cutoff = now_ms.saturating_sub(cfg.max_age_ms);
        // The first tick young enough ends the prefix, even if an older ts follows it.
        let (n, more) = trim_front(ticks, sym, &symbol, budget, &mut scratch, |t| t.ts < cutoff)?;
        removed.ticks += n;
        return Ok(more);
    }
    Ok(false)
}

/// Removes the symbol's leading ticks while `old` holds, at most `budget` of them (which it
/// decrements). Returns `(removed, budget ran out first)`.
fn trim_front(
    table: &mut TicksTable<'_>,
    sym: &str,
    symbol: &Symbol,
    budget: &mut usize,
    scratch: &mut Vec<Tick>,
    old: impl Fn(&Tick) -> bool,
) -> Result<(u64, bool), StoreError> {
    let mut removed = 0u64;
    let mut chunk = ChunkWriter::new();
    loop {
        let first = match table.range((sym, 0u64)..=(sym, u64::MAX))?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                (k.value().1, v.value().to_vec())
            }
            None => return Ok((removed, false)),
        };
        let (key, bytes) = first;
        scratch.clear();
        if codec::decode_chunk(&bytes, key, symbol, scratch).is_none() {
            tracing::warn!(
                symbol = sym,
                key,
                "damaged tick chunk; retention skips the symbol"
            );
            return Ok((removed, false));
        }
        let n_old = scratch.iter().take_while(|t| old(t)).count();
        let n = n_old.min(*budget);
        if n == 0 {
            return Ok((removed, n_old > 0));
        }
        table.remove((sym, key))?;
        write_chunks(table, sym, &scratch[n..], &mut chunk)?;
        removed += n as u64;
        *budget -= n;
        if n < scratch.len() {
            // The rest of this chunk stays: done, unless the budget cut it short.
            return Ok((removed, n < n_old));
        }
        if *budget == 0 {
            return Ok((removed, true));
        }
    }
}

/// Deletes the symbol's bars older than `bars_max_age_ms` and beyond `bars_max` buckets back
/// from its newest bar, per timeframe. Returns how many were removed.
fn retain_bars(
    bars: &mut [BarsTable<'_>],
    sym: &str,
    cfg: &RetentionConfig,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let mut n = 0u64;
    for (tf, table) in Timeframe::ALL.iter().zip(bars.iter_mut()) {
        let mut keep_from = i64::MIN;
        if cfg.bars_max_age_ms > 0 {
            keep_from = keep_from.max(now_ms.saturating_sub(cfg.bars_max_age_ms));
        }
        if cfg.bars_max > 0 {
            let newest = match table.range((sym, i64::MIN)..=(sym, i64::MAX))?.next_back() {
                Some(entry) => entry?.0.value().1,
                None => continue,
            };
            // Aligned buckets: the newest N buckets start at newest - (N-1) * len or later,
            // so at most N bars remain.
            let span = i64::try_from(cfg.bars_max - 1)
                .unwrap_or(i64::MAX)
                .saturating_mul(tf.millis());
            keep_from = keep_from.max(newest.saturating_sub(span));
        }
        if keep_from > i64::MIN {
            table.retain_in((sym, i64::MIN)..(sym, keep_from), |_, _| {
                n += 1;
                false
            })?;
        }
    }
    Ok(n)
}

//! Snapshots and resumes (`history`, `since_seq`): paced replays, one per client and symbol.
//! A replay is a cursor (the last seq sent) that walks forward to the symbol's live seq, taking
//! ticks from the dispatcher's in-memory ring where it reaches back and from the store (a page
//! at a time, read off the runtime) where it does not. While it runs, live delivery of that
//! symbol to that client waits (`Client::awaiting`); when the cursor reaches the live seq, in
//! the dispatcher's own thread, the symbol goes live again, so every seq arrives once, in order.
//!
//! Pacing: a replay fills the client's outbound queue up to a high-water mark
//! (`dispatch.replay_high_water_pct` of `outbound_buffer_bytes`) and then arms the link's
//! low-water mark (`replay_low_water_pct`); the connection's drain reports crossing it through
//! [`super::outbound::Refills`], and the dispatcher sends the next messages. So a replay goes
//! out exactly as fast as the client reads, never pushes a queue past its limit (a throttled or
//! smart client is never closed for it) and leaves the rest of the buffer to live ticks of
//! other symbols, where the slow-consumer rule applies as usual. A replay holds at most one
//! store page; a paused client costs a cursor. Replays of one client run one symbol at a time.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::command::{Command, SnapshotRead};
use super::outbound::{Frame, PushError, RefillHook};
use super::registry::ClientKey;
use super::{Dispatcher, TickSink};
use crate::protocol::{self, ErrorCode};
use crate::store::History;
use crate::tick::Symbol;

/// Ticks per snapshot message at most.
const SNAPSHOT_CHUNK: usize = 500;
/// Store page size in ticks per byte of high-water mark: pages hold about as many bytes as
/// the window they fill (a tick is well over 128 bytes of JSON).
const PAGE_BYTES_PER_TICK: usize = 128;
/// Smallest store page, in ticks.
const MIN_PAGE: usize = 16;

/// The replays of one client, in the order they were asked for.
#[derive(Debug, Default)]
pub(super) struct Replays {
    jobs: VecDeque<Replay>,
    /// A low-water report is armed or on its way: do not arm again until it comes.
    armed: bool,
}

/// One symbol's replay.
#[derive(Debug)]
struct Replay {
    symbol: Symbol,
    generation: u64,
    /// Last seq sent (or skipped: before a `history` window, or lost to retention).
    cursor: u64,
    /// A `since_seq` resume (which may report `gap`), not `history`.
    resume: bool,
    /// Stored history does not reach back to the cursor: say `gap` on the next message.
    gap: bool,
    /// Nothing sent yet: an empty replay still sends one (empty) snapshot message.
    fresh: bool,
    /// Ticks read from the store and not yet sent, consecutive from `cursor + 1`.
    page: VecDeque<(u64, Frame)>,
    /// A store read is running or queued.
    reading: bool,
    /// The next read must first wait for ticks handed to the store (it was behind).
    flush_next: bool,
}

/// What the next message of a replay comes from.
enum Source {
    Done,
    Ring,
    Page,
    Store,
    /// Neither ring nor store has the next seq: skip to where the ring starts.
    Lost(u64),
}

impl<S: TickSink> Dispatcher<S> {
    /// Starts a replay of `symbol` for `key`: the last `history` ticks, or those after
    /// `since` (which replaces a replay of that symbol already running).
    pub(super) fn send_snapshot(
        &mut self,
        key: ClientKey,
        symbol: &Symbol,
        history: usize,
        since: Option<u64>,
    ) {
        self.cancel_replays(key, |s| s == symbol);
        if let Some(client) = self.clients.get_mut(key) {
            // A tick of this symbol still held back (the flush before the ack found the queue
            // full) would come after the ack: the replay covers it, or the client has it.
            client.delivery.retain(|s| s != symbol);
        }
        let live = self.symbols.get(symbol).map_or(0, |s| s.seq);
        let cursor = match since {
            Some(s) => s,
            None => live.saturating_sub(history as u64),
        };
        if cursor >= live {
            // Nothing to replay: the (empty) snapshot still marks where live ticks start.
            self.push_snapshot(key, symbol, &[], false);
            return;
        }
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        client.awaiting.insert(symbol.clone());
        self.next_generation += 1;
        let job = Replay {
            symbol: symbol.clone(),
            generation: self.next_generation,
            cursor,
            resume: since.is_some(),
            gap: false,
            fresh: true,
            page: VecDeque::new(),
            reading: false,
            flush_next: false,
        };
        self.stats.replays.fetch_add(1, Ordering::Relaxed);
        let replays = self.replays.entry(key).or_default();
        replays.jobs.push_back(job);
        if replays.jobs.len() == 1 {
            self.pump(key);
        }
    }

    /// Stops `key`'s replays of the symbols `drop` picks (unsubscribed, or asked again); their
    /// live delivery is then up to the subscription.
    pub(super) fn cancel_replays(&mut self, key: ClientKey, drop: impl Fn(&Symbol) -> bool) {
        let Some(replays) = self.replays.get_mut(&key) else {
            return;
        };
        let was_front = replays.jobs.front().map(|j| j.generation);
        let before = replays.jobs.len();
        let client = self.clients.get_mut(key);
        let mut awaiting = client.map(|c| &mut c.awaiting);
        replays.jobs.retain(|job| {
            let keep = !drop(&job.symbol);
            if !keep {
                if let Some(a) = awaiting.as_mut() {
                    a.remove(&job.symbol);
                }
            }
            keep
        });
        let front = replays.jobs.front().map(|j| j.generation);
        self.stats
            .replays
            .fetch_sub((before - replays.jobs.len()) as u64, Ordering::Relaxed);
        if replays.jobs.is_empty() {
            self.replays.remove(&key);
        } else if front != was_front {
            self.pump(key);
        }
    }

    /// Sends what `key`'s replays can send now: messages until its queue reaches the
    /// high-water mark, a store read when the next ticks are only there, and the switch to
    /// live delivery when a replay reaches the live seq.
    pub(super) fn pump(&mut self, key: ClientKey) {
        loop {
            let Some(client) = self.clients.get(key) else {
                self.forget_replays(key);
                return;
            };
            if client.detached {
                self.forget_replays(key);
                return;
            }
            let out = client.out.clone();
            let limit = out.byte_limit();
            let high = (limit * usize::from(self.replay_high_pct) / 100).max(1);
            let low = (limit * usize::from(self.replay_low_pct) / 100).max(1);
            let Some(replays) = self.replays.get_mut(&key) else {
                return;
            };
            let Some(job) = replays.jobs.front_mut() else {
                self.replays.remove(&key);
                return;
            };
            let state = self.symbols.get(&job.symbol);
            let live = state.map_or(0, |s| s.seq);
            let ring_first = state.and_then(|s| s.recent.first_seq());
            let source = if job.cursor >= live {
                Source::Done
            } else if job.page.front().is_some() {
                Source::Page
            } else if ring_first.is_some_and(|f| f <= job.cursor + 1) {
                Source::Ring
            } else if self.store.is_some() {
                Source::Store
            } else {
                Source::Lost(ring_first.map_or(live, |f| f - 1))
            };
            match source {
                Source::Done => {
                    let job = replays.jobs.pop_front().expect("front job");
                    self.stats.replays.fetch_sub(1, Ordering::Relaxed);
                    if replays.jobs.is_empty() {
                        self.replays.remove(&key);
                    }
                    if job.fresh || job.gap {
                        self.push_snapshot(key, &job.symbol, &[], job.gap);
                    }
                    if let Some(client) = self.clients.get_mut(key) {
                        client.awaiting.remove(&job.symbol);
                    }
                    // Live again for that symbol: a batch client may now share its group's
                    // batches.
                    self.regroup(key);
                    continue;
                }
                Source::Lost(to) => {
                    job.gap |= job.resume;
                    job.cursor = to;
                    continue;
                }
                Source::Store => {
                    if !job.reading {
                        job.reading = true;
                        let read = SnapshotRead {
                            key,
                            serial: client.serial,
                            symbol: job.symbol.clone(),
                            generation: job.generation,
                            since: job.cursor,
                            limit: (high / PAGE_BYTES_PER_TICK)
                                .max(MIN_PAGE)
                                .min(self.max_replay.max(1)),
                            flush: std::mem::take(&mut job.flush_next),
                        };
                        self.read_store(read);
                    }
                    return;
                }
                Source::Ring | Source::Page => {}
            }
            let queued = out.queued_bytes();
            if queued >= high {
                if !replays.armed {
                    let refills = Arc::clone(&self.refills);
                    if out.refill_below(low, || RefillHook { refills, key }) {
                        continue;
                    }
                    replays.armed = true;
                }
                return;
            }
            // The next message: up to the room left under the high-water mark (at least one
            // tick), at most `SNAPSHOT_CHUNK` ticks.
            let room = high - queued;
            let mut frames: Vec<&str> = Vec::new();
            if matches!(source, Source::Page) {
                let page = job.page.iter().map(|(seq, f)| (*seq, f.as_str()));
                take_run(page, job.cursor, room, &mut frames);
            } else if let Some(state) = state {
                take_run(
                    state.recent.after(job.cursor),
                    job.cursor,
                    room,
                    &mut frames,
                );
            }
            let n = frames.len();
            let text = snapshot_text(&job.symbol, &frames, job.gap);
            let pushed = if queued < low {
                // Below the low-water mark the message goes out even if one big tick passes
                // the data limit (control frames may, up to twice it): a replay always moves.
                out.push_control(text)
            } else {
                out.push(text)
            };
            match pushed {
                Ok(()) => {
                    self.stats
                        .replayed_ticks
                        .fetch_add(n as u64, Ordering::Relaxed);
                    job.cursor += n as u64;
                    if matches!(source, Source::Page) {
                        job.page.drain(..n);
                    }
                    job.fresh = false;
                    job.gap = false;
                }
                // Live ticks of other symbols took the room: wait for the drain (of anything,
                // if the queue is already below the mark).
                Err(PushError::Full) => {
                    if !replays.armed {
                        let refills = Arc::clone(&self.refills);
                        let mark = low.min(out.queued_bytes());
                        if out.refill_below(mark, || RefillHook { refills, key }) {
                            // It drained meanwhile: try again.
                            continue;
                        }
                        replays.armed = true;
                    }
                    return;
                }
                Err(PushError::Closed) => {
                    self.drop_client(key, 0);
                    return;
                }
            }
        }
    }

    /// Drops every replay of `key` (it is gone or detached).
    pub(super) fn forget_replays(&mut self, key: ClientKey) {
        if let Some(replays) = self.replays.remove(&key) {
            self.stats
                .replays
                .fetch_sub(replays.jobs.len() as u64, Ordering::Relaxed);
        }
    }

    /// The link of `key` drained below its low-water mark.
    pub(super) fn refill(&mut self, key: ClientKey) {
        if let Some(replays) = self.replays.get_mut(&key) {
            replays.armed = false;
            self.pump(key);
        }
    }

    /// Reads one page of a replay from the store off the runtime; the result comes back as
    /// `Command::SnapshotLoaded`.
    fn read_store(&mut self, read: SnapshotRead) {
        let Some(store) = self.store.clone() else {
            return;
        };
        // At most `max_store_reads` reads run at once (the blocking pool's queue is unbounded);
        // the rest wait here. Each replay has at most one read, so this queue is bounded by
        // the replays running.
        if self.reads_in_flight >= self.max_store_reads {
            self.queued_reads.push_back(read);
            return;
        }
        self.reads_in_flight += 1;
        let tx = self.self_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = (if read.flush {
                store.flush_blocking()
            } else {
                Ok(())
            })
            .and_then(|()| store.history(read.symbol.as_str(), read.limit, Some(read.since)))
            .map_err(|e| e.to_string());
            let _ = tx.send(Command::SnapshotLoaded { read, result });
        });
    }

    /// One store page is back: it joins its replay (unless that was cancelled or restarted),
    /// which then sends what the client has room for.
    pub(super) fn snapshot_loaded(&mut self, read: SnapshotRead, result: Result<History, String>) {
        self.reads_in_flight -= 1;
        if let Some(next) = self.queued_reads.pop_front() {
            self.read_store(next);
        }
        let key = read.key;
        match self.clients.get(key) {
            Some(c) if c.serial == read.serial && !c.detached => {}
            _ => return,
        }
        let live_state = self.symbols.get(&read.symbol);
        let ring_first = live_state.and_then(|s| s.recent.first_seq());
        let live = live_state.map_or(0, |s| s.seq);
        let Some(job) = self
            .replays
            .get_mut(&key)
            .and_then(|r| r.jobs.iter_mut().find(|j| j.generation == read.generation))
        else {
            return;
        };
        job.reading = false;
        if job.cursor != read.since {
            self.pump(key);
            return;
        }
        let stored = match result {
            Ok(h) => h,
            Err(e) => {
                let symbol = read.symbol.clone();
                tracing::error!(error = %e, %symbol, "snapshot read failed");
                // What the store could not give is reported as a gap; the replay goes on
                // from the ring.
                job.gap = true;
                job.cursor = ring_first.map_or(live, |f| f - 1).max(job.cursor);
                let msg = protocol::error_message(
                    None,
                    ErrorCode::Internal,
                    &format!("snapshot of {symbol} failed"),
                    None,
                );
                self.reply_text(key, msg);
                self.pump(key);
                return;
            }
        };
        let n = stored.ticks.len() as u64;
        // Seqs are consecutive per symbol, so the page starts at a computable seq.
        let from = job.cursor + 1;
        let start = stored.first_seq.map_or(from, |f| f.max(from));
        if n > 0 && start > from {
            // Retention removed what the replay asked for.
            job.gap |= job.resume;
            job.cursor = start - 1;
        }
        job.page.extend(
            stored
                .ticks
                .into_iter()
                .filter_map(|b| Frame::try_from(b).ok())
                .enumerate()
                .map(|(i, f)| (start + i as u64, f)),
        );
        let ring_covers = ring_first.is_some_and(|f| f <= job.cursor + 1);
        if n < read.limit as u64 && !ring_covers && job.cursor + n < live {
            if read.flush && n == 0 {
                // Flushed, and the store still has nothing after the cursor: those ticks
                // are gone (retention); skip to the ring.
                job.gap |= job.resume;
                job.cursor = ring_first.map_or(live, |f| f - 1).max(job.cursor);
            } else {
                // The store was behind the dispatcher: wait for it on the next read.
                job.flush_next = true;
            }
        }
        self.pump(key);
    }

    fn reply_text(&mut self, key: ClientKey, text: String) {
        self.push_control(key, Frame::from(text));
    }

    /// Sends one small snapshot message (an empty replay, or the `gap` report) as control.
    fn push_snapshot(&mut self, key: ClientKey, symbol: &Symbol, frames: &[&str], gap: bool) {
        self.reply_text(key, snapshot_text(symbol, frames, gap).to_string());
    }
}

/// Takes the next replay message's ticks from `ticks` (seq order) into `frames`: consecutive
/// seqs from `cursor + 1`, at most `SNAPSHOT_CHUNK`, and no more than `room` bytes (but at
/// least one tick, so a replay always moves).
fn take_run<'a>(
    ticks: impl Iterator<Item = (u64, &'a str)>,
    cursor: u64,
    room: usize,
    frames: &mut Vec<&'a str>,
) {
    let mut bytes = 0;
    for (next, (seq, frame)) in (cursor + 1..).zip(ticks) {
        if seq != next
            || frames.len() == SNAPSHOT_CHUNK
            || (!frames.is_empty() && bytes + frame.len() > room)
        {
            break;
        }
        bytes += frame.len() + 1;
        frames.push(frame);
    }
}

/// `{"type":"snapshot","symbol":S,"ticks":[...],"gap":G}` from tick frames.
fn snapshot_text(symbol: &Symbol, frames: &[&str], gap: bool) -> Frame {
    let mut text = String::with_capacity(64 + frames.iter().map(|f| f.len() + 1).sum::<usize>());
    text.push_str(r#"{"type":"snapshot","symbol":"#);
    text.push_str(&serde_json::to_string(symbol.as_str()).unwrap_or_default());
    text.push_str(r#","ticks":["#);
    for (j, f) in frames.iter().enumerate() {
        if j > 0 {
            text.push(',');
        }
        text.push_str(f);
    }
    text.push_str(r#"],"gap":"#);
    text.push_str(if gap { "true" } else { "false" });
    text.push('}');
    Frame::from(text)
}

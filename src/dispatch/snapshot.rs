//! Snapshots and resumes (`history`, `since_seq`) for one client and symbol. Served from the
//! dispatcher's in-memory ring when it reaches back far enough; otherwise read from the store
//! page by page off the runtime while the client's live delivery of that symbol waits, until
//! the stored part joins the ring, so the client sees every seq once, in order.

use super::command::{Command, SnapshotRead};
use super::outbound::Frame;
use super::registry::ClientKey;
use super::{Dispatcher, TickSink};
use crate::protocol::{self, close, ErrorCode};
use crate::store::History;
use crate::tick::Symbol;

/// Store reads one snapshot may take before giving up on joining the ring (and saying `gap`).
const MAX_SNAPSHOT_PAGES: u32 = 1_000;
/// Ticks per snapshot message.
const SNAPSHOT_CHUNK: usize = 500;

impl<S: TickSink> Dispatcher<S> {
    /// Answers `history`/`since_seq` for one symbol: from the ring when it reaches back far
    /// enough, else from the store in the background while live ticks of that symbol wait in
    /// the ring (the client's delivery of it is paused until the snapshot has joined the ring).
    pub(super) fn send_snapshot(
        &mut self,
        key: ClientKey,
        symbol: &Symbol,
        history: usize,
        since: Option<u64>,
    ) {
        let covered = match self.symbols.get(symbol) {
            None => true,
            Some(state) => match since {
                Some(s) => s >= state.seq || state.recent.first_seq().is_some_and(|f| f <= s + 1),
                None => {
                    state.recent.len()
                        >= history.min(usize::try_from(state.seq).unwrap_or(usize::MAX))
                }
            },
        };
        if covered || self.store.is_none() {
            let (frames, gap) = self.ring_snapshot(symbol, history, since, 0);
            self.push_snapshot(key, symbol, &frames, gap);
            return;
        }
        if let Some(client) = self.clients.get_mut(key) {
            client.awaiting.insert(symbol.clone());
            let read = SnapshotRead {
                key,
                serial: client.serial,
                symbol: symbol.clone(),
                history,
                since,
                page: 0,
            };
            self.read_store(read, false);
        }
    }

    /// Reads one page of a snapshot from the store off the runtime; the result comes back as
    /// `Command::SnapshotLoaded`. `flush` first waits for ticks already handed to the store, so
    /// a follow-up read reaches the ring.
    fn read_store(&mut self, read: SnapshotRead, flush: bool) {
        let Some(store) = self.store.clone() else {
            return;
        };
        // At most `max_store_reads` reads run at once (the blocking pool's queue is unbounded);
        // the rest wait here, in seq order per client.
        if self.reads_in_flight >= self.max_store_reads {
            self.queued_reads.push_back((read, flush));
            return;
        }
        self.reads_in_flight += 1;
        let tx = self.self_tx.clone();
        let limit = if read.since.is_some() {
            self.max_replay
        } else {
            read.history
        };
        let since = read.since;
        tokio::task::spawn_blocking(move || {
            let result = (if flush {
                store.flush_blocking()
            } else {
                Ok(())
            })
            .and_then(|()| store.history(read.symbol.as_str(), limit, since))
            .map_err(|e| e.to_string());
            let _ = tx.send(Command::SnapshotLoaded { read, result });
        });
    }

    /// Ring ticks for a snapshot, only those with seq > `after`; and whether the ring misses
    /// ticks the request needs.
    fn ring_snapshot(
        &self,
        symbol: &Symbol,
        history: usize,
        since: Option<u64>,
        after: u64,
    ) -> (Vec<Frame>, bool) {
        let Some(state) = self.symbols.get(symbol) else {
            return (Vec::new(), false);
        };
        match since {
            Some(s) => {
                let from = s.max(after);
                let frames: Vec<Frame> = state.recent.after(from).map(|(_, f)| f.clone()).collect();
                let gap = from < state.seq
                    && state
                        .recent
                        .first_seq()
                        .is_none_or(|first| first > from + 1);
                (frames, gap)
            }
            None => {
                let frames = state
                    .recent
                    .last_n(history)
                    .filter(|(seq, _)| *seq > after)
                    .map(|(_, f)| f.clone())
                    .collect();
                (frames, false)
            }
        }
    }

    /// One store page is back. A resume (`since_seq`) sends it and pages on until the stored
    /// part reaches the ring, so a long backlog arrives as several snapshot messages with no
    /// hole; a `history` read is retried (after a flush) until it joins the ring. Then the ring
    /// tail is added and live delivery of the symbol resumes.
    pub(super) fn snapshot_loaded(&mut self, read: SnapshotRead, result: Result<History, String>) {
        self.reads_in_flight -= 1;
        if let Some((next, flush)) = self.queued_reads.pop_front() {
            self.read_store(next, flush);
        }
        let key = read.key;
        match self.clients.get(key) {
            Some(c) if c.serial == read.serial && !c.detached => {}
            _ => return,
        }
        let symbol = &read.symbol;
        let stored = match result {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, %symbol, "snapshot read failed");
                let msg = protocol::error_message(
                    None,
                    ErrorCode::Internal,
                    &format!("snapshot of {symbol} failed"),
                    None,
                );
                self.reply_text(key, msg);
                let (frames, _) = self.ring_snapshot(symbol, read.history, read.since, 0);
                self.finish_snapshot(&read, &frames, true);
                return;
            }
        };
        let n = stored.ticks.len() as u64;
        // Seqs are consecutive per symbol, so the stored part ends at a computable seq.
        let (stored_last, gap) = match read.since {
            Some(s) => {
                let start = stored.first_seq.map_or(s + 1, |f| f.max(s + 1));
                let gap = read.page == 0 && stored.first_seq.is_some_and(|f| f > s + 1);
                (if n == 0 { s } else { start + n - 1 }, gap)
            }
            None => (stored.last_seq, false),
        };
        let current = self.symbols.get(symbol).map_or(0, |s| s.seq);
        let ring_next = self
            .symbols
            .get(symbol)
            .and_then(|s| s.recent.after(stored_last).next().map(|(seq, _)| *seq));
        let joined = stored_last >= current || ring_next == Some(stored_last + 1);
        let mut frames: Vec<Frame> = stored
            .ticks
            .into_iter()
            .filter_map(|b| Frame::try_from(b).ok())
            .collect();
        if !joined && read.page < MAX_SNAPSHOT_PAGES {
            let mut next = read;
            if next.since.is_some() {
                // Send this page now and read on from where it ended.
                if !frames.is_empty() || next.page == 0 {
                    self.push_snapshot(key, &next.symbol, &frames, gap);
                }
                if self
                    .clients
                    .get(key)
                    .is_none_or(|c| c.detached || c.out.queued_bytes() > c.out.byte_limit())
                {
                    // It cannot take the backlog: the slow-consumer rule (it can resume later).
                    self.drop_client(key, close::SLOW_CONSUMER);
                    return;
                }
                next.since = Some(stored_last);
            }
            next.page += 1;
            // A full page means more is stored; a short one means the store is behind the ring.
            let flush = n < if next.since.is_some() {
                self.max_replay as u64
            } else {
                u64::MAX
            };
            self.read_store(next, flush);
            return;
        }
        let (ring, _) = self.ring_snapshot(symbol, read.history, read.since, stored_last);
        frames.extend(ring);
        if read.since.is_none() && frames.len() > read.history {
            frames.drain(..frames.len() - read.history);
        }
        self.finish_snapshot(&read, &frames, gap || !joined);
    }

    /// Sends the last snapshot part (unless earlier pages already said everything) and resumes
    /// live delivery of the symbol.
    fn finish_snapshot(&mut self, read: &SnapshotRead, frames: &[Frame], gap: bool) {
        let said_before = read.since.is_some() && read.page > 0;
        if !frames.is_empty() || gap || !said_before {
            self.push_snapshot(read.key, &read.symbol, frames, gap);
        }
        if let Some(client) = self.clients.get_mut(read.key) {
            client.awaiting.remove(&read.symbol);
        }
        // Live again for that symbol: a batch client may now share its group's batches.
        self.regroup(read.key);
    }

    fn reply_text(&mut self, key: ClientKey, text: String) {
        if let Some(client) = self.clients.get(key) {
            if client.out.push_control(Frame::from(text)).is_err() {
                self.drop_client(key, close::SLOW_CONSUMER);
            }
        }
    }

    /// Sends snapshot messages (chunked; `gap` on the first).
    fn push_snapshot(&mut self, key: ClientKey, symbol: &Symbol, frames: &[Frame], gap: bool) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        let chunks: Vec<&[Frame]> = if frames.is_empty() {
            vec![&[][..]]
        } else {
            frames.chunks(SNAPSHOT_CHUNK).collect()
        };
        let mut failed = false;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut text =
                String::with_capacity(64 + chunk.iter().map(|f| f.len() + 1).sum::<usize>());
            text.push_str(r#"{"type":"snapshot","symbol":"#);
            text.push_str(&serde_json::to_string(symbol.as_str()).unwrap_or_default());
            text.push_str(r#","ticks":["#);
            for (j, f) in chunk.iter().enumerate() {
                if j > 0 {
                    text.push(',');
                }
                text.push_str(f.as_str());
            }
            text.push_str(r#"],"gap":"#);
            text.push_str(if i == 0 && gap { "true" } else { "false" });
            text.push('}');
            if client.out.push_control(Frame::from(text)).is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            self.drop_client(key, close::SLOW_CONSUMER);
        }
    }
}

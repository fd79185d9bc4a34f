//! Per-symbol ring of the most recent serialized ticks, kept by the dispatcher as it stamps
//! seqs. Snapshots (`history`) and resumes (`since_seq`) that fall inside the ring are answered
//! from it synchronously, so they are exactly consistent with live delivery (no gap, no
//! duplicate) and cost no disk read; it also covers ticks not yet committed to the store.
//!
//! The ring copies each tick's wire bytes into a byte log (blocks of [`BLOCK_BYTES`], written
//! front to back) instead of keeping a reference to the tick's shared frame. A reference made
//! every push evict a frame stamped about `cap` × symbols ticks earlier: a reference-count
//! decrement and a free on cold memory, on the one dispatcher task, 3-4 % of the server at
//! 100k ticks/s. Copying ~200 bytes into the log's hot end costs less, and an emptied block
//! is recycled, so a steady ring allocates and frees nothing. Readers get `&str` slices;
//! the rare replay copies them into its message anyway.

use std::collections::VecDeque;

/// Bytes per log block: about 80 ticks. A tick longer than this gets a block of its own.
const BLOCK_BYTES: usize = 16 * 1024;

/// Where one tick's bytes sit in the log.
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    /// Block number, counted from the ring's first block ever (see `RecentTicks::first_block`).
    block: u64,
    start: u32,
    len: u32,
}

/// The ring of one symbol.
#[derive(Debug, Default)]
pub struct RecentTicks {
    /// Oldest first, consecutive seqs.
    entries: VecDeque<Entry>,
    /// The log; an entry's bytes never straddle two blocks.
    blocks: VecDeque<String>,
    /// The number of `blocks.front()`.
    first_block: u64,
    /// An emptied block, kept for the next one needed.
    spare: Option<String>,
}

impl RecentTicks {
    /// Appends the tick with `seq` and wire text `text`, keeping at most `cap` ticks.
    pub fn push(&mut self, seq: u64, text: &str, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.entries.len() == cap {
            self.entries.pop_front();
            // Blocks before the oldest entry's hold nothing any more.
            let keep_from = self.entries.front().map_or(u64::MAX, |e| e.block);
            while self.first_block < keep_from && !self.blocks.is_empty() {
                let mut old = self.blocks.pop_front().expect("checked non-empty");
                self.first_block += 1;
                if old.capacity() == BLOCK_BYTES {
                    old.clear();
                    self.spare = Some(old);
                }
            }
        }
        let fits = self
            .blocks
            .back()
            .is_some_and(|b| b.capacity() - b.len() >= text.len());
        if !fits {
            let spare = if text.len() <= BLOCK_BYTES {
                self.spare.take()
            } else {
                None
            };
            let block = spare.unwrap_or_else(|| String::with_capacity(text.len().max(BLOCK_BYTES)));
            self.blocks.push_back(block);
        }
        let block_no = self.first_block + self.blocks.len() as u64 - 1;
        let log = self.blocks.back_mut().expect("a block was just ensured");
        let start = log.len();
        log.push_str(text);
        self.entries.push_back(Entry {
            seq,
            block: block_no,
            // Offsets are below a block's size: BLOCK_BYTES, or one tick, which
            // `limits.max_message_bytes` bounds far below 4 GiB.
            start: u32::try_from(start).unwrap_or(u32::MAX),
            len: u32::try_from(text.len()).unwrap_or(u32::MAX),
        });
    }

    fn text(&self, e: &Entry) -> &str {
        let block = usize::try_from(e.block - self.first_block).unwrap_or(usize::MAX);
        let start = e.start as usize;
        // Entries are only made by `push`, at the char boundaries of whole `&str`s.
        &self.blocks[block][start..start + e.len as usize]
    }

    /// Oldest seq held.
    #[must_use]
    pub fn first_seq(&self) -> Option<u64> {
        self.entries.front().map(|e| e.seq)
    }

    /// The last `n` ticks, oldest first.
    pub fn last_n(&self, n: usize) -> impl Iterator<Item = (u64, &str)> {
        self.entries
            .iter()
            .skip(self.entries.len().saturating_sub(n))
            .map(|e| (e.seq, self.text(e)))
    }

    /// Ticks with seq > `since`, oldest first.
    pub fn after(&self, since: u64) -> impl Iterator<Item = (u64, &str)> {
        let start = self.entries.partition_point(|e| e.seq <= since);
        self.entries.range(start..).map(|e| (e.seq, self.text(e)))
    }

    /// Ticks held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the log holds in blocks (for the bound test).
    #[cfg(test)]
    fn log_capacity(&self) -> usize {
        self.blocks.iter().map(String::capacity).sum::<usize>()
            + self.spare.as_ref().map_or(0, String::capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs<'a>(it: impl Iterator<Item = (u64, &'a str)>) -> Vec<u64> {
        it.map(|(s, _)| s).collect()
    }

    #[test]
    fn ring_queries() {
        let mut r = RecentTicks::default();
        for s in 1..=10 {
            r.push(s, &s.to_string(), 4);
        }
        assert_eq!(r.first_seq(), Some(7));
        assert_eq!(seqs(r.last_n(2)), [9, 10]);
        assert_eq!(seqs(r.last_n(100)), [7, 8, 9, 10]);
        assert_eq!(seqs(r.after(8)), [9, 10]);
        assert_eq!(seqs(r.after(0)), [7, 8, 9, 10]);
        assert!(r.after(10).next().is_none());
        let texts: Vec<&str> = r.after(0).map(|(_, t)| t).collect();
        assert_eq!(texts, ["7", "8", "9", "10"]);
    }

    #[test]
    fn texts_survive_block_turnover_and_memory_stays_bounded() {
        let mut r = RecentTicks::default();
        let cap = 300;
        let text = |s: u64| {
            format!(
                "{{\"seq\":{s},\"pad\":\"{}\"}}",
                "x".repeat((s % 97) as usize * 3)
            )
        };
        for s in 1..=20_000u64 {
            r.push(s, &text(s), cap);
            if s % 1_000 == 0 {
                assert_eq!(r.len(), cap);
                for (seq, t) in r.after(s - cap as u64) {
                    assert_eq!(t, text(seq));
                }
                // Held ticks are at most ~300 bytes each: the log never holds much more than
                // them plus one block in use and one spare.
                assert!(
                    r.log_capacity() <= cap * 300 + 3 * BLOCK_BYTES,
                    "{}",
                    r.log_capacity()
                );
            }
        }
        assert_eq!(r.first_seq(), Some(20_000 - cap as u64 + 1));
    }

    #[test]
    fn a_tick_longer_than_a_block_gets_its_own() {
        let mut r = RecentTicks::default();
        let big = "y".repeat(BLOCK_BYTES * 2 + 5);
        r.push(1, "a", 3);
        r.push(2, &big, 3);
        r.push(3, "c", 3);
        r.push(4, "d", 3);
        let texts: Vec<&str> = r.after(0).map(|(_, t)| t).collect();
        assert_eq!(texts, [big.as_str(), "c", "d"]);
        r.push(5, "e", 3);
        r.push(6, "f", 3);
        assert_eq!(seqs(r.after(0)), [4, 5, 6]);
        // The big block was dropped, the first one kept as the spare.
        assert_eq!(r.spare.as_ref().map(String::capacity), Some(BLOCK_BYTES));
        // Another big tick gets a block of its own and leaves the spare alone.
        r.push(7, &big, 3);
        assert_eq!(r.spare.as_ref().map(String::capacity), Some(BLOCK_BYTES));
        let texts: Vec<&str> = r.after(0).map(|(_, t)| t).collect();
        assert_eq!(texts, ["e", "f", big.as_str()]);
    }

    #[test]
    fn zero_cap_keeps_nothing() {
        let mut r = RecentTicks::default();
        r.push(1, "a", 0);
        assert!(r.is_empty());
        assert_eq!(r.first_seq(), None);
    }
}

//! Per-symbol ring of the most recent serialized ticks, kept by the dispatcher as it stamps
//! seqs. Snapshots (`history`) and resumes (`since_seq`) that fall inside the ring are answered
//! from it synchronously, so they are exactly consistent with live delivery (no gap, no
//! duplicate) and cost no disk read; it also covers ticks not yet committed to the store.

use std::collections::VecDeque;

use super::outbound::Frame;

/// The ring of one symbol.
#[derive(Debug, Default)]
pub struct RecentTicks {
    /// (seq, wire object), oldest first, consecutive seqs.
    ticks: VecDeque<(u64, Frame)>,
}

impl RecentTicks {
    /// Appends the tick with `seq`, keeping at most `cap`.
    pub fn push(&mut self, seq: u64, frame: Frame, cap: usize) {
        if cap == 0 {
            return;
        }
        if self.ticks.len() == cap {
            self.ticks.pop_front();
        }
        self.ticks.push_back((seq, frame));
    }

    /// Oldest seq held.
    #[must_use]
    pub fn first_seq(&self) -> Option<u64> {
        self.ticks.front().map(|(s, _)| *s)
    }

    /// The last `n` ticks, oldest first.
    pub fn last_n(&self, n: usize) -> impl Iterator<Item = &(u64, Frame)> {
        self.ticks.iter().skip(self.ticks.len().saturating_sub(n))
    }

    /// Ticks with seq > `since`, oldest first.
    pub fn after(&self, since: u64) -> impl Iterator<Item = &(u64, Frame)> {
        let start = self.ticks.partition_point(|(s, _)| *s <= since);
        self.ticks.range(start..)
    }

    /// Ticks held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.ticks.len()
    }

    /// Whether empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ticks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_queries() {
        let mut r = RecentTicks::default();
        for s in 1..=10 {
            r.push(s, Frame::from(s.to_string()), 4);
        }
        assert_eq!(r.first_seq(), Some(7));
        let seqs =
            |it: &mut dyn Iterator<Item = &(u64, Frame)>| it.map(|(s, _)| *s).collect::<Vec<_>>();
        assert_eq!(seqs(&mut r.last_n(2)), [9, 10]);
        assert_eq!(seqs(&mut r.last_n(100)), [7, 8, 9, 10]);
        assert_eq!(seqs(&mut r.after(8)), [9, 10]);
        assert_eq!(seqs(&mut r.after(0)), [7, 8, 9, 10]);
        assert!(r.after(10).next().is_none());
    }
}

//! Recent-window latency percentiles for `/api/stats` and the dashboard: the dispatcher (one
//! thread, so no locking on the hot path) records each tick's receive-to-dispatch time into an
//! HdrHistogram; two halves rotate every `HALF_WINDOW`, so the published figures always cover
//! the last 5-10 s. Publishing copies a few numbers under a short lock once a second.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// Length of one half of the window.
const HALF_WINDOW: Duration = Duration::from_secs(5);
/// How often the published summary is refreshed.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Published percentiles, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples in the window.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

/// The dispatcher-owned recorder.
pub struct LatencyWindow {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    rotated: Instant,
    published: Instant,
}

impl Default for LatencyWindow {
    fn default() -> Self {
        let h = || {
            Histogram::new_with_bounds(1, 60_000_000, 2)
                .unwrap_or_else(|_| unreachable!("valid bounds"))
        };
        Self {
            current: h(),
            previous: h(),
            rotated: Instant::now(),
            published: Instant::now(),
        }
    }
}

impl LatencyWindow {
    /// Records one latency in µs (clamped into the histogram's range).
    pub fn record(&mut self, micros: i64) {
        let v = u64::try_from(micros).unwrap_or(1).clamp(1, 60_000_000);
        let _ = self.current.record(v);
    }

    /// Rotates and publishes when due.
    pub fn tick(&mut self, now: Instant, out: &Mutex<LatencySummary>) {
        if now.duration_since(self.rotated) >= HALF_WINDOW {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
            self.rotated = now;
        }
        if now.duration_since(self.published) >= PUBLISH_EVERY {
            self.published = now;
            let mut both = self.previous.clone();
            let _ = both.add(&self.current);
            *out.lock() = LatencySummary {
                count: both.len(),
                p50: both.value_at_quantile(0.5),
                p90: both.value_at_quantile(0.9),
                p99: both.value_at_quantile(0.99),
                p999: both.value_at_quantile(0.999),
                max: both.max(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_percentiles_over_both_halves() {
        let mut w = LatencyWindow::default();
        for v in 1..=1000 {
            w.record(v);
        }
        let out = Mutex::new(LatencySummary::default());
        w.tick(Instant::now() + PUBLISH_EVERY, &out);
        let s = *out.lock();
        assert_eq!(s.count, 1000);
        assert!((495..=505).contains(&s.p50), "{s:?}");
        assert!(s.p99 >= 985 && s.max >= 999, "{s:?}");
        // Two rotations later the old samples are gone.
        w.tick(Instant::now() + HALF_WINDOW * 2, &out);
        w.tick(Instant::now() + HALF_WINDOW * 4, &out);
        w.published = Instant::now() - PUBLISH_EVERY;
        w.tick(Instant::now() + HALF_WINDOW * 4, &out);
        assert_eq!(out.lock().count, 0);
    }
}

//! Quality scoring: deterministic rules that lower a 0-100 score for anomalies against the
//! symbol's recent history. Nothing here rejects a tick (splits and spikes are real); the score
//! lets clients filter with `min_quality`. The rules are documented in docs/quality.md; keep the
//! two in step.

use crate::tick::Tick;

/// What scoring remembers per symbol.
#[derive(Debug, Clone, Default)]
pub struct QualityState {
    /// Price of the previous accepted tick.
    last_price: Option<f64>,
    /// Event time of the previous accepted tick.
    last_ts: Option<i64>,
    /// Exponential moving average of volume (alpha 1/10).
    volume_ema: f64,
    /// Ticks seen, capped; the volume rule waits for a few ticks of history.
    seen: u32,
}

/// Ticks of history before the volume-spike rule applies.
const VOLUME_WARMUP: u32 = 5;

impl QualityState {
    /// Scores `tick` against this state (does not update it).
    #[must_use]
    pub fn score(&self, tick: &Tick) -> u8 {
        let mut penalty = 0u32;
        if let Some(prev) = self.last_price {
            let jump = (tick.price / prev - 1.0).abs();
            penalty += match jump {
                j if j >= 0.5 => 40,
                j if j >= 0.2 => 25,
                j if j >= 0.1 => 15,
                j if j >= 0.05 => 5,
                _ => 0,
            };
        }
        if self.seen >= VOLUME_WARMUP && self.volume_ema > 0.0 {
            let ratio = tick.volume / self.volume_ema;
            penalty += match ratio {
                r if r > 20.0 => 15,
                r if r > 10.0 => 10,
                _ => 0,
            };
        }
        if let (Some(bid), Some(ask)) = (tick.bid, tick.ask) {
            let mid = (bid + ask) / 2.0;
            if (ask - bid) / mid > 0.05 {
                penalty += 10;
            }
            if tick.price < bid * 0.99 || tick.price > ask * 1.01 {
                penalty += 10;
            }
        }
        if self.last_ts.is_some_and(|last| tick.ts < last) {
            penalty += 10;
        }
        u8::try_from(100u32.saturating_sub(penalty)).unwrap_or(0)
    }

    /// Remembers an accepted tick's price, volume and event time.
    pub fn update(&mut self, price: f64, volume: f64, ts: i64) {
        self.last_price = Some(price);
        self.last_ts = Some(self.last_ts.map_or(ts, |t| t.max(ts)));
        self.volume_ema = if self.seen == 0 {
            volume
        } else {
            self.volume_ema * 0.9 + volume * 0.1
        };
        self.seen = self.seen.saturating_add(1).min(1_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tick::Symbol;

    fn t(price: f64, volume: f64, ts: i64) -> Tick {
        Tick::new(Symbol::parse("X").unwrap(), ts, price, volume)
    }

    fn warmed() -> QualityState {
        let mut s = QualityState::default();
        for i in 0..10 {
            s.update(100.0, 10.0, i);
        }
        s
    }

    #[test]
    fn plain_ticks_score_at_least_90() {
        let s = warmed();
        assert_eq!(s.score(&t(100.5, 12.0, 20)), 100);
        assert!(QualityState::default().score(&t(1.0, 1.0, 0)) >= 90);
    }

    #[test]
    fn sixty_percent_jump_scores_below_70() {
        let s = warmed();
        assert!(s.score(&t(160.0, 10.0, 20)) < 70);
        assert!(s.score(&t(40.0, 10.0, 20)) < 70);
    }

    #[test]
    fn graded_penalties() {
        let s = warmed();
        assert_eq!(s.score(&t(107.0, 10.0, 20)), 95);
        assert_eq!(s.score(&t(100.0, 500.0, 20)), 85, "volume spike");
        assert_eq!(s.score(&t(100.0, 10.0, 5)), 90, "out-of-order ts");
        let mut wide = t(100.0, 10.0, 20);
        wide.bid = Some(90.0);
        wide.ask = Some(110.0);
        assert_eq!(s.score(&wide), 90, "wide spread");
        let mut outside = t(100.0, 10.0, 20);
        outside.bid = Some(102.0);
        outside.ask = Some(102.5);
        assert_eq!(s.score(&outside), 90, "price outside the quote");
    }

    #[test]
    fn deterministic() {
        let s = warmed();
        let tick = t(130.0, 300.0, 3);
        assert_eq!(s.score(&tick), s.score(&tick));
        assert_eq!(s.score(&tick), 100 - 25 - 15 - 10);
    }
}

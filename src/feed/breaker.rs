//! The per-upstream circuit breaker: closed -> open after `failure_threshold` consecutive
//! failures -> one half-open probe after `cooldown_ms` -> closed on the probe's success (open
//! again, for another cool-down, on its failure). The connector asks [`Breaker::permit`]
//! before each connection attempt and reports the attempt's outcome; the state is shared
//! read-only with `/health` and `/metrics` through an atomic.
//!
//! Hand-written rather than `failsafe`: failsafe wraps a call (`call(|| f())`) and decides
//! success from its `Result` at return, but an upstream attempt is a long-lived connection
//! whose success is known mid-way (the first message after subscribing) and whose failure
//! comes much later; failsafe also exposes only `is_call_permitted`, not whether it is open
//! or half-open, which `/health` and `tickfan_upstream_state` must show. The state machine is
//! thirty lines over a clock the caller passes in, so tests drive it without sleeping.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The breaker's state as `/metrics` encodes it (`tickfan_upstream_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    /// Attempts flow.
    Closed = 0,
    /// No attempts until the cool-down ends.
    Open = 1,
    /// One probe attempt is under way.
    HalfOpen = 2,
}

/// What the connector may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    /// Connect (the breaker is closed).
    Attempt,
    /// Connect once as the half-open probe.
    Probe,
    /// Wait this long first (the breaker is open).
    Wait(Duration),
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    opened_at: Option<Instant>,
    state: std::sync::Arc<AtomicU8>,
}

impl Breaker {
    /// A closed breaker; `state` is where it publishes its state.
    #[must_use]
    pub fn new(threshold: u32, cooldown: Duration, state: std::sync::Arc<AtomicU8>) -> Self {
        state.store(BreakerState::Closed as u8, Ordering::Relaxed);
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            opened_at: None,
            state,
        }
    }

    fn set(&self, s: BreakerState) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    /// May the connector attempt a connection at `now`?
    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.opened_at {
            None => Permit::Attempt,
            Some(at) => {
                let ready = at + self.cooldown;
                if now >= ready {
                    self.set(BreakerState::HalfOpen);
                    Permit::Probe
                } else {
                    Permit::Wait(ready - now)
                }
            }
        }
    }

    /// The attempt worked (the upstream answered after subscribing): close.
    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.set(BreakerState::Closed);
    }

    /// The attempt failed at `now`. Returns `true` when this trips the breaker open (from
    /// closed, or a failed half-open probe).
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.opened_at.is_some() || self.failures >= self.threshold {
            self.opened_at = Some(now);
            self.set(BreakerState::Open);
            return true;
        }
        false
    }

    /// Consecutive failures so far.
    #[must_use]
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Reads a published state.
#[must_use]
pub fn load(state: &AtomicU8) -> BreakerState {
    match state.load(Ordering::Relaxed) {
        1 => BreakerState::Open,
        2 => BreakerState::HalfOpen,
        _ => BreakerState::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes_after_cooldown() {
        let state = std::sync::Arc::new(AtomicU8::new(0));
        let mut b = Breaker::new(3, Duration::from_secs(10), state.clone());
        let t0 = Instant::now();
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert_eq!(b.permit(t0), Permit::Attempt);
        assert!(b.failure(t0), "third failure trips");
        assert_eq!(load(&state), BreakerState::Open);
        assert_eq!(
            b.permit(t0 + Duration::from_secs(4)),
            Permit::Wait(Duration::from_secs(6))
        );
        assert_eq!(b.permit(t0 + Duration::from_secs(10)), Permit::Probe);
        assert_eq!(load(&state), BreakerState::HalfOpen);
        // A failed probe opens again for a whole cool-down.
        let t1 = t0 + Duration::from_secs(11);
        assert!(b.failure(t1));
        assert_eq!(b.permit(t1), Permit::Wait(Duration::from_secs(10)));
        assert_eq!(b.permit(t1 + Duration::from_secs(10)), Permit::Probe);
        b.success();
        assert_eq!(load(&state), BreakerState::Closed);
        assert_eq!(b.permit(t1), Permit::Attempt);
        assert!(!b.failure(t1), "the count restarted");
    }
}

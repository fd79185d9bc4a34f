//! Per-client delivery state: how the dispatcher turns the ticks that match one client into
//! frames on that client's outbound queue, by mode. Lives inside the dispatcher (no task or
//! timer per client): a client with held-back ticks records its next flush deadline and the
//! dispatcher's one timer heap calls `flush` when it is due.
//!
//! - realtime: push each frame; a full queue is a slow consumer.
//! - batch: collect, flush every interval as one `batch`; lossless, so overflow is a slow
//!   consumer; a critical tick flushes at once.
//! - throttled: keep the latest tick per symbol with a count of the ones it replaced; flush
//!   every interval with `conflated`; a full queue just keeps conflating (never closed).
//!   A critical tick is sent at once, taking over the pending tick's count, even past the
//!   byte limit (like a control frame), so a lagging client never loses one.
//! - smart: realtime → batch when the queue backs up → conflation when it backs up further,
//!   and back to realtime once drained; each switch is announced with a `mode` message.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::outbound::{Frame, Outbound, PushError};
use crate::protocol::Mode;
use crate::tick::{Priority, Symbol, Tick};

/// Smart-mode thresholds, in queued bytes.
#[derive(Debug, Clone, Copy)]
pub struct SmartThresholds {
    /// Past this, leave realtime for batch.
    pub batch: usize,
    /// Past this, conflate.
    pub conflate: usize,
}

/// How a client is currently served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effective {
    Realtime,
    Batch,
    Conflate,
}

impl Effective {
    fn wire_name(self) -> &'static str {
        match self {
            Self::Realtime => "realtime",
            Self::Batch => "batch",
            Self::Conflate => "throttled",
        }
    }
}

/// What happened to a tick or a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to do for the dispatcher (delivered, or held with no new deadline).
    Done,
    /// Held back; call `flush` at this deadline.
    Scheduled(Instant),
    /// Over the limit in a lossless mode: close with 4008.
    SlowConsumer,
    /// The connection is gone: deregister.
    Gone,
}

/// Counters a delivery call adds to.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Frames pushed.
    pub messages: u64,
    /// Ticks dropped by conflation.
    pub conflated: u64,
    /// Smart-mode switches.
    pub mode_switches: u64,
}

/// Ticks a client's delivery holds back.
#[derive(Debug, Default)]
struct Held {
    /// Batch mode: the ticks of the next batch, in order.
    batch: Vec<(Symbol, Frame)>,
    batch_bytes: usize,
    /// Conflation: the latest tick per symbol and how many it replaced.
    latest: HashMap<Symbol, (Frame, u64)>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.latest.is_empty()
    }
}

/// Delivery state of one client.
#[derive(Debug)]
pub struct Delivery {
    mode: Mode,
    interval: Duration,
    smart: Effective,
    /// Ticks held back; allocated only while there are some (realtime clients never hold).
    held: Option<Box<Held>>,
    next_flush: Option<Instant>,
    last_flush: Option<Instant>,
}

impl Delivery {
    /// Realtime delivery with `interval` for later mode switches.
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self {
            mode: Mode::Realtime,
            interval,
            smart: Effective::Realtime,
            held: None,
            next_flush: None,
            last_flush: None,
        }
    }

    /// The configured mode.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The configured interval.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The pending flush deadline, if any.
    #[must_use]
    pub fn next_flush(&self) -> Option<Instant> {
        self.next_flush
    }

    fn effective(&self) -> Effective {
        match self.mode {
            Mode::Realtime => Effective::Realtime,
            Mode::Batch => Effective::Batch,
            Mode::Throttled => Effective::Conflate,
            Mode::Smart => self.smart,
        }
    }

    /// Changes mode/interval. Whatever the old mode held back is flushed first, so nothing is
    /// lost or reordered by the switch.
    pub fn reconfigure(
        &mut self,
        mode: Mode,
        interval: Duration,
        out: &Outbound,
        now: Instant,
        tally: &mut Tally,
    ) -> Outcome {
        let changed = mode != self.mode;
        self.interval = interval;
        if !changed {
            return self.reschedule(now);
        }
        let outcome = self.flush_all(out, tally);
        self.mode = mode;
        self.smart = Effective::Realtime;
        self.next_flush = None;
        if outcome != Outcome::Done {
            return outcome;
        }
        // Conflated ticks that the full queue did not take are older than anything that comes
        // next: in a mode that does not conflate they must go first, so they lead the next
        // batch (smart starts out batching), or, for realtime, the client is a slow consumer.
        let stranded =
            mode != Mode::Throttled && self.held.as_ref().is_some_and(|h| !h.latest.is_empty());
        if !stranded {
            return Outcome::Done;
        }
        if mode == Mode::Realtime {
            return Outcome::SlowConsumer;
        }
        let held = self.held_mut();
        for (symbol, (frame, skipped)) in std::mem::take(&mut held.latest) {
            let frame = with_conflated(&frame, skipped);
            held.batch_bytes += frame.len();
            held.batch.push((symbol, frame));
        }
        if mode == Mode::Smart {
            self.switch(Effective::Batch, out, tally);
        }
        self.reschedule(now)
    }

    /// Keeps held ticks only of symbols that `keep` accepts (unsubscribe: nothing for a
    /// dropped symbol after the ack).
    pub fn retain(&mut self, keep: impl Fn(&Symbol) -> bool) {
        let Some(held) = self.held.as_mut() else {
            return;
        };
        let mut dropped = 0;
        held.batch.retain(|(s, f)| {
            let k = keep(s);
            if !k {
                dropped += f.len();
            }
            k
        });
        held.batch_bytes -= dropped;
        held.latest.retain(|s, _| keep(s));
    }

    fn is_holding(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.is_empty())
    }

    fn held_mut(&mut self) -> &mut Held {
        self.held.get_or_insert_with(Box::default)
    }

    /// Offers one matching tick.
    pub fn deliver(
        &mut self,
        tick: &Tick,
        frame: &Frame,
        out: &Outbound,
        now: Instant,
        smart: SmartThresholds,
        tally: &mut Tally,
    ) -> Outcome {
        let critical = tick.priority == Priority::Critical;
        match self.effective() {
            Effective::Realtime => match out.push(frame.clone()) {
                Ok(()) => {
                    tally.messages += 1;
                    if self.mode == Mode::Smart && out.queued_bytes() > smart.batch {
                        self.switch(Effective::Batch, out, tally);
                        return self.reschedule(now);
                    }
                    Outcome::Done
                }
                Err(PushError::Closed) => Outcome::Gone,
                Err(PushError::Full) if self.mode == Mode::Smart => {
                    self.switch(Effective::Batch, out, tally);
                    self.hold_in_batch(&tick.symbol, frame);
                    self.reschedule(now)
                }
                Err(PushError::Full) => Outcome::SlowConsumer,
            },
            Effective::Batch => {
                self.hold_in_batch(&tick.symbol, frame);
                if critical {
                    return self.flush(out, now, smart, tally);
                }
                if self.held.as_ref().map_or(0, |h| h.batch_bytes) > out.byte_limit() {
                    if self.mode != Mode::Smart {
                        return Outcome::SlowConsumer;
                    }
                    self.switch(Effective::Conflate, out, tally);
                }
                self.reschedule(now)
            }
            Effective::Conflate => {
                let pending = self
                    .held
                    .as_mut()
                    .and_then(|h| h.latest.remove(&tick.symbol));
                let skipped = pending.map_or(0, |(_, k)| k + 1);
                tally.conflated += u64::from(skipped > 0);
                if critical {
                    // Never held back or skipped: a critical tick skips the byte limit like a
                    // control frame (held as pending, a later tick would replace it). Only the
                    // message-count bound can refuse it.
                    match out.push_control(with_conflated(frame, skipped)) {
                        Ok(()) => {
                            tally.messages += 1;
                            return Outcome::Done;
                        }
                        Err(PushError::Closed) => return Outcome::Gone,
                        // Full: keep it as the pending tick; it goes out at the next flush.
                        Err(PushError::Full) => {}
                    }
                }
                self.held_mut()
                    .latest
                    .insert(tick.symbol.clone(), (frame.clone(), skipped));
                let due = self.last_flush.is_none_or(|t| now >= t + self.interval);
                if due && self.next_flush.is_none() {
                    return self.flush(out, now, smart, tally);
                }
                self.reschedule(now)
            }
        }
    }

    /// Sends what is held, if the deadline has come. Smart mode also decides here whether the
    /// client has caught up (back to realtime) or fallen further behind (conflate).
    pub fn flush(
        &mut self,
        out: &Outbound,
        now: Instant,
        smart: SmartThresholds,
        tally: &mut Tally,
    ) -> Outcome {
        self.next_flush = None;
        self.last_flush = Some(now);
        let backlog = out.queued_bytes();
        if self.mode == Mode::Smart && self.smart == Effective::Batch && backlog > smart.conflate {
            self.switch(Effective::Conflate, out, tally);
        }
        let outcome = self.flush_all(out, tally);
        if outcome != Outcome::Done {
            if outcome == Outcome::SlowConsumer && self.mode == Mode::Smart {
                self.switch(Effective::Conflate, out, tally);
                return self.reschedule(now);
            }
            return outcome;
        }
        if self.mode == Mode::Smart && self.smart != Effective::Realtime {
            let caught_up = !self.is_holding() && backlog <= smart.batch / 4;
            if caught_up {
                self.switch(Effective::Realtime, out, tally);
                return Outcome::Done;
            }
            // Keep checking on the interval even when no ticks come.
            self.next_flush = Some(now + self.interval);
            return Outcome::Scheduled(now + self.interval);
        }
        if self.is_holding() {
            self.reschedule(now)
        } else {
            Outcome::Done
        }
    }

    /// Pushes everything held in the current form. Throttled frames that do not fit stay held.
    fn flush_all(&mut self, out: &Outbound, tally: &mut Tally) -> Outcome {
        let Some(held) = self.held.as_mut() else {
            return Outcome::Done;
        };
        if !held.batch.is_empty() {
            let frame = Frame::from(batch_frame(&held.batch, held.batch_bytes));
            match out.push(frame) {
                Ok(()) => {
                    tally.messages += 1;
                    held.batch.clear();
                    held.batch_bytes = 0;
                }
                Err(PushError::Closed) => return Outcome::Gone,
                Err(PushError::Full) => return Outcome::SlowConsumer,
            }
        }
        let mut gone = false;
        held.latest.retain(|_, (frame, skipped)| {
            if gone {
                return true;
            }
            match out.push(with_conflated(frame, *skipped)) {
                Ok(()) => {
                    tally.messages += 1;
                    false
                }
                Err(PushError::Closed) => {
                    gone = true;
                    true
                }
                Err(PushError::Full) => true,
            }
        });
        if gone {
            return Outcome::Gone;
        }
        if held.is_empty() {
            // Nothing held: give the storage back.
            self.held = None;
        }
        Outcome::Done
    }

    /// Takes over ticks a shared batch held for this client (it is leaving its group), ahead
    /// of anything it gets from now on.
    pub fn hold_all(&mut self, held: &[(Symbol, Frame)], now: Instant) -> Outcome {
        if held.is_empty() {
            return Outcome::Done;
        }
        for (symbol, frame) in held {
            self.hold_in_batch(symbol, frame);
        }
        self.reschedule(now)
    }

    fn hold_in_batch(&mut self, symbol: &Symbol, frame: &Frame) {
        let held = self.held_mut();
        held.batch_bytes += frame.len();
        held.batch.push((symbol.clone(), frame.clone()));
    }

    fn reschedule(&mut self, now: Instant) -> Outcome {
        if !self.is_holding() && self.effective() != Effective::Batch {
            return Outcome::Done;
        }
        match self.next_flush {
            Some(_) => Outcome::Done,
            None => {
                let base = self.last_flush.unwrap_or(now).max(now - self.interval);
                let at = (base + self.interval).max(now);
                self.next_flush = Some(at);
                Outcome::Scheduled(at)
            }
        }
    }

    /// Smart-mode switch with its announcement. Batch → conflate folds the held batch into
    /// latest-per-symbol, counting what it folds away.
    fn switch(&mut self, to: Effective, out: &Outbound, tally: &mut Tally) {
        if self.smart == to {
            return;
        }
        if to == Effective::Conflate {
            if let Some(held) = self.held.as_mut() {
                for (symbol, frame) in std::mem::take(&mut held.batch) {
                    let skipped = held.latest.remove(&symbol).map_or(0, |(_, k)| k + 1);
                    tally.conflated += u64::from(skipped > 0);
                    held.latest.insert(symbol, (frame, skipped));
                }
                held.batch_bytes = 0;
            }
        }
        let reason = match to {
            Effective::Realtime => "caught up".to_owned(),
            _ => format!("lagging: {} bytes queued", out.queued_bytes()),
        };
        let msg = serde_json::json!({"type": "mode", "mode": to.wire_name(), "reason": reason});
        // A control frame: it must reach a lagging client, so it skips the byte limit.
        if out.push_control(Frame::from(msg.to_string())).is_ok() {
            tally.messages += 1;
        }
        tally.mode_switches += 1;
        self.smart = to;
    }
}

/// `{"type":"batch","ticks":[...]}` from held frames (each already a tick object).
pub(super) fn batch_frame(held: &[(Symbol, Frame)], bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + held.len() + 32);
    out.push_str(r#"{"type":"batch","ticks":["#);
    for (i, (_, f)) in held.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(f.as_str());
    }
    out.push_str("]}");
    out
}

/// The tick frame with `"conflated":K` added before the closing brace.
fn with_conflated(frame: &Frame, skipped: u64) -> Frame {
    let text = frame.as_str();
    let body = text.strip_suffix('}').unwrap_or(text);
    let mut out = String::with_capacity(text.len() + 20);
    out.push_str(body);
    out.push_str(",\"conflated\":");
    out.push_str(itoa::Buffer::new().format(skipped));
    out.push('}');
    Frame::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::outbound::{channel, OutboundReceiver};

    const SMART: SmartThresholds = SmartThresholds {
        batch: 1_000,
        conflate: 5_000,
    };

    fn tick(sym: &str, seq: u64, priority: Priority) -> (Tick, Frame) {
        let t = Tick {
            priority,
            seq,
            ..Tick::new(Symbol::parse(sym).unwrap(), 0, 1.0, 1.0)
        };
        let f = Frame::from(t.to_json());
        (t, f)
    }

    fn drain(rx: &OutboundReceiver) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| rx.try_recv())
            .map(|f| serde_json::from_str(f.as_str()).unwrap())
            .collect()
    }

    fn set(d: &mut Delivery, mode: Mode, out: &Outbound, now: Instant) {
        d.reconfigure(
            mode,
            Duration::from_millis(100),
            out,
            now,
            &mut Tally::default(),
        );
    }

    #[test]
    fn realtime_pushes_and_flags_slow_consumers() {
        let (out, rx) = channel(100, 400);
        let mut d = Delivery::new(Duration::from_millis(100));
        let now = Instant::now();
        let mut tally = Tally::default();
        let (t, f) = tick("A", 1, Priority::Normal);
        assert_eq!(
            d.deliver(&t, &f, &out, now, SMART, &mut tally),
            Outcome::Done
        );
        assert_eq!(drain(&rx).len(), 1);
        let mut last = Outcome::Done;
        for seq in 2..20 {
            let (t, f) = tick("A", seq, Priority::Normal);
            last = d.deliver(&t, &f, &out, now, SMART, &mut tally);
        }
        assert_eq!(last, Outcome::SlowConsumer);
    }

    #[test]
    fn batch_collects_until_the_deadline_and_critical_flushes() {
        let (out, rx) = channel(100, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let now = Instant::now();
        set(&mut d, Mode::Batch, &out, now);
        let mut tally = Tally::default();
        let (t1, f1) = tick("A", 1, Priority::Normal);
        let (t2, f2) = tick("B", 1, Priority::Normal);
        let Outcome::Scheduled(at) = d.deliver(&t1, &f1, &out, now, SMART, &mut tally) else {
            panic!("batch must schedule a flush")
        };
        assert_eq!(
            d.deliver(&t2, &f2, &out, now, SMART, &mut tally),
            Outcome::Done
        );
        assert!(drain(&rx).is_empty());
        d.flush(&out, at, SMART, &mut tally);
        let msgs = drain(&rx);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0]["type"], "batch");
        assert_eq!(msgs[0]["ticks"].as_array().unwrap().len(), 2);
        let (t3, f3) = tick("A", 2, Priority::Critical);
        d.deliver(&t3, &f3, &out, at, SMART, &mut tally);
        assert_eq!(
            drain(&rx)[0]["ticks"][0]["seq"],
            2,
            "critical is not held back"
        );
    }

    #[test]
    fn throttled_conflates_with_exact_counts() {
        let (out, rx) = channel(100, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Throttled, &out, t0);
        let mut tally = Tally::default();
        let mut deadline = None;
        for seq in 1..=5 {
            let (t, f) = tick("A", seq, Priority::Normal);
            if let Outcome::Scheduled(at) = d.deliver(&t, &f, &out, t0, SMART, &mut tally) {
                deadline = Some(at);
            }
        }
        // The first goes out at once (leading edge), the rest are conflated into one.
        d.flush(&out, deadline.unwrap(), SMART, &mut tally);
        let msgs = drain(&rx);
        let got: Vec<_> = msgs
            .iter()
            .map(|m| (m["seq"].as_u64(), m["conflated"].as_u64()))
            .collect();
        assert_eq!(got, vec![(Some(1), Some(0)), (Some(5), Some(3))]);
        assert_eq!(tally.conflated, 3);
    }

    #[test]
    fn throttled_critical_goes_at_once_carrying_the_count() {
        let (out, rx) = channel(100, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Throttled, &out, t0);
        let mut tally = Tally::default();
        for seq in 1..=3 {
            let (t, f) = tick("A", seq, Priority::Normal);
            d.deliver(&t, &f, &out, t0, SMART, &mut tally);
        }
        let (t, f) = tick("A", 4, Priority::Critical);
        d.deliver(&t, &f, &out, t0, SMART, &mut tally);
        let msgs = drain(&rx);
        let got: Vec<_> = msgs
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap(), m["conflated"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, vec![(1, 0), (4, 2)]);
    }

    #[test]
    fn throttled_critical_is_not_skipped_when_the_queue_is_full() {
        let (t1, f1) = tick("A", 1, Priority::Normal);
        // Room for one tick frame (with its conflated count) as data; control frames, critical
        // ticks among them, may use up to twice that.
        let (out, rx) = channel(100, f1.len() + 60);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Throttled, &out, t0);
        let mut tally = Tally::default();
        d.deliver(&t1, &f1, &out, t0, SMART, &mut tally);
        let (t2, f2) = tick("A", 2, Priority::Critical);
        let (t3, f3) = tick("A", 3, Priority::Normal);
        d.deliver(&t2, &f2, &out, t0, SMART, &mut tally);
        d.deliver(&t3, &f3, &out, t0, SMART, &mut tally);
        let seqs: Vec<_> = drain(&rx)
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(
            seqs,
            vec![1, 2],
            "the critical tick went past the full queue"
        );
        d.flush(&out, t0 + Duration::from_millis(100), SMART, &mut tally);
        let seqs: Vec<_> = drain(&rx)
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![3]);
    }

    #[test]
    fn smart_degrades_and_recovers_with_announcements() {
        let (out, rx) = channel(10_000, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Smart, &out, t0);
        let mut tally = Tally::default();
        let mut seq = 0;
        let mut deadline = None;
        // Nobody reads: realtime until 1000 bytes are queued, then batch.
        while tally.mode_switches == 0 {
            seq += 1;
            let (t, f) = tick("A", seq, Priority::Normal);
            if let Outcome::Scheduled(at) = d.deliver(&t, &f, &out, t0, SMART, &mut tally) {
                deadline = Some(at);
            }
        }
        // The reader catches up; the next flush returns to realtime.
        let msgs = drain(&rx);
        assert_eq!(msgs.last().unwrap()["mode"], "batch");
        d.flush(&out, deadline.unwrap(), SMART, &mut tally);
        let msgs = drain(&rx);
        assert_eq!(msgs.last().unwrap()["type"], "mode");
        assert_eq!(msgs.last().unwrap()["mode"], "realtime");
        assert_eq!(tally.mode_switches, 2);
    }

    #[test]
    fn conflated_ticks_stranded_by_a_mode_switch_lead_the_next_batch() {
        let (t1, f1) = tick("A", 1, Priority::Normal);
        // Room for one message: a full queue without byte accounting getting in the way.
        let (out, rx) = channel(1, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Throttled, &out, t0);
        let mut tally = Tally::default();
        d.deliver(&t1, &f1, &out, t0, SMART, &mut tally);
        let (t2, f2) = tick("A", 2, Priority::Normal);
        d.deliver(&t2, &f2, &out, t0, SMART, &mut tally);
        // Seq 2 is held (the queue is full); the client switches to smart, then reads.
        set(&mut d, Mode::Smart, &out, t0);
        assert_eq!(drain(&rx)[0]["seq"], 1);
        let (t3, f3) = tick("A", 3, Priority::Normal);
        d.deliver(&t3, &f3, &out, t0, SMART, &mut tally);
        d.flush(&out, t0 + Duration::from_secs(1), SMART, &mut tally);
        let seqs: Vec<u64> = drain(&rx)
            .iter()
            .flat_map(|m| match m["type"].as_str() {
                Some("batch") => m["ticks"].as_array().unwrap().clone(),
                Some("tick") => vec![m.clone()],
                _ => Vec::new(),
            })
            .map(|t| t["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [2, 3], "the stranded tick goes before newer ones");
    }

    #[test]
    fn purge_drops_held_ticks_of_unsubscribed_symbols() {
        let (out, rx) = channel(100, 1 << 20);
        let mut d = Delivery::new(Duration::from_millis(100));
        let t0 = Instant::now();
        set(&mut d, Mode::Batch, &out, t0);
        let mut tally = Tally::default();
        for sym in ["A", "B"] {
            let (t, f) = tick(sym, 1, Priority::Normal);
            d.deliver(&t, &f, &out, t0, SMART, &mut tally);
        }
        d.retain(|s| s.as_str() != "A");
        d.flush(&out, t0 + Duration::from_secs(1), SMART, &mut tally);
        let msgs = drain(&rx);
        assert_eq!(msgs[0]["ticks"].as_array().unwrap().len(), 1);
        assert_eq!(msgs[0]["ticks"][0]["symbol"], "B");
    }
}

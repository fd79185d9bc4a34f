//! Realtime frames on their way from one dispatch round to the clients' links. `fan_out`
//! stages each matching tick for a realtime client here instead of pushing it, and the
//! dispatcher pushes each client's staged run with one [`Outbound::push_many`] every
//! [`STAGE_TICKS`] ticks and at the end of the round: one lock, one byte count and at most one
//! wake-up per client per run, where a push per tick paid a lock and three atomics for every
//! delivery (13 % of the server at 5M deliveries/s; docs/benchmarks.md).
//!
//! The window's ticks are also written once, back to back, in wire form (header and text
//! each). A client that takes a stretch of consecutive window ticks (every tick, for a client
//! of all the symbols that move) gets that stretch as one pre-framed [`Frame::run`]: a slice
//! of the shared bytes, so one reference count, one queue entry and one write slice for the
//! stretch instead of one of each per tick (for a stretch of at least a quarter of the
//! window's bytes: see [`RUN_SHARE_OF_WINDOW`]). Those per-delivery costs were about 30 % of
//! the server at 6M deliveries/s, and halving the server's CPU per delivery there is what
//! this bought (docs/benchmarks.md, "Shared pre-framed runs"). Clients that negotiated compression, and single
//! ticks, get the tick's own shared frame as before.
//!
//! Nothing else reaches a client's link between staging and the push: commands, timers and
//! replays run between rounds, and batch groups and the other modes push only to clients that
//! are not realtime. So staging moves the push later within the round, never past another
//! frame for the same client. Memory is bounded by [`STAGE_TICKS`] ticks: their frames and
//! wire bytes once, and an index per client and tick.
//!
//! Data flow: `fan_out` → [`Stage::stage`] → [`Stage::push_all`] → each client's link.

use bytes::Bytes;

use super::delivery::Tally;
use super::outbound::{append_text_frame, Frame, Outbound, PushError};
use super::registry::ClientKey;
use crate::protocol::close;

/// Ticks a round fans out before the staged frames are pushed: bounds what is staged per
/// client (and how long a frame waits for its push) while keeping the per-push cost spread
/// over many deliveries.
pub const STAGE_TICKS: usize = 64;

/// A stretch goes as a run only if it is at least this fraction (1/n) of the window's wire
/// bytes. A run's slice keeps the whole window's buffer alive while it is queued, and the
/// link counts only the slice's bytes, so this bounds what a slow client's queue can hold
/// beyond its byte limit to this factor (a client of two symbols out of a hundred gets each
/// tick's own frame, as before).
const RUN_SHARE_OF_WINDOW: usize = 4;

/// Emptied runs kept for reuse; more clients than this allocate a run per push.
const SPARE_RUNS: usize = 1024;

/// The ticks staged for realtime clients since the last push.
#[derive(Debug, Default)]
pub struct Stage {
    /// Clients with staged ticks, in the order they were first staged, with the indices (into
    /// `window`) of their ticks, increasing.
    runs: Vec<(ClientKey, Vec<u16>)>,
    /// By client key: 1 + the client's index in `runs`, or 0 when nothing is staged for it.
    slot: Vec<u32>,
    /// The window's ticks that some client took, in fan-out order.
    window: Vec<Frame>,
    /// The same ticks in wire form, back to back.
    wire: Vec<u8>,
    /// Where each window tick starts in `wire`.
    starts: Vec<u32>,
    /// Index in `window` of the tick being fanned out, once a client took it.
    current: Option<u16>,
    /// Ticks fanned out since the last push.
    ticks: usize,
    /// Emptied runs, kept with their storage.
    spare: Vec<Vec<u16>>,
    /// What one client's push hands over, kept with its storage.
    frames: Vec<Frame>,
}

impl Stage {
    /// Stages the tick being fanned out (its shared `frame`) for `key`. Every call between
    /// two [`Stage::tick_done`]s is for the same tick: the first one records it in the window.
    pub fn stage(&mut self, key: ClientKey, frame: &Frame) {
        let tick = match self.current {
            Some(i) => {
                debug_assert!(
                    std::ptr::eq(self.window[usize::from(i)].as_str(), frame.as_str()),
                    "one tick per tick_done"
                );
                i
            }
            None => {
                // At most STAGE_TICKS (< u16::MAX) ticks between pushes.
                let i = u16::try_from(self.window.len()).unwrap_or(u16::MAX);
                // Wire offsets fit 32 bits: 64 ticks of at most `max_message_bytes` each.
                self.starts
                    .push(u32::try_from(self.wire.len()).unwrap_or(u32::MAX));
                append_text_frame(&mut self.wire, frame.as_str());
                self.window.push(frame.clone());
                self.current = Some(i);
                i
            }
        };
        if key >= self.slot.len() {
            self.slot.resize(key + 1, 0);
        }
        let run = match self.slot[key] {
            0 => {
                self.runs.push((key, self.spare.pop().unwrap_or_default()));
                // At most one run per client, and client keys are slab keys.
                self.slot[key] = u32::try_from(self.runs.len()).unwrap_or(u32::MAX);
                self.runs.len() - 1
            }
            n => n as usize - 1,
        };
        self.runs[run].1.push(tick);
    }

    /// Counts one fanned-out tick; `true` when it is time to push.
    pub fn tick_done(&mut self) -> bool {
        self.current = None;
        self.ticks += 1;
        self.ticks >= STAGE_TICKS
    }

    /// Pushes every staged run to its client's link (`link` finds it; `None`: the client has
    /// gone and its ticks are dropped). A client whose link is full is reported as a slow
    /// consumer, one whose connection has gone as gone (code 0), as a per-tick push would.
    pub fn push_all<'a>(
        &mut self,
        mut link: impl FnMut(ClientKey) -> Option<&'a Outbound>,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) {
        self.ticks = 0;
        self.current = None;
        if self.runs.is_empty() {
            self.clear_window();
            return;
        }
        self.starts
            .push(u32::try_from(self.wire.len()).unwrap_or(u32::MAX));
        // Handed over whole (no copy); the next window starts a buffer of the same size.
        let capacity = self.wire.len();
        let wire = Bytes::from(std::mem::replace(
            &mut self.wire,
            Vec::with_capacity(capacity),
        ));
        let mut runs = std::mem::take(&mut self.runs);
        for (key, mut ticks) in runs.drain(..) {
            self.slot[key] = 0;
            if let Some(out) = link(key) {
                self.frames_for(&ticks, &wire, out.deflate());
                match out.push_many(&mut self.frames) {
                    Ok(_) => tally.messages += ticks.len() as u64,
                    Err(PushError::Full) => gone.push((key, close::SLOW_CONSUMER)),
                    Err(PushError::Closed) => gone.push((key, 0)),
                }
                self.frames.clear();
            }
            ticks.clear();
            if self.spare.len() < SPARE_RUNS {
                self.spare.push(ticks);
            }
        }
        self.runs = runs;
        self.clear_window();
    }

    /// Fills `self.frames` with one client's staged `ticks`: each stretch of consecutive
    /// window ticks as one run sliced from `wire` when it is a large enough share of the
    /// window ([`RUN_SHARE_OF_WINDOW`]); otherwise (and for a client that compresses) each
    /// tick as its own shared frame.
    fn frames_for(&mut self, ticks: &[u16], wire: &Bytes, compresses: bool) {
        let mut rest = ticks;
        while let Some(&first) = rest.first() {
            let len = if compresses {
                1
            } else {
                // Consecutive indices: the stretch ends where index - position changes.
                rest.iter()
                    .enumerate()
                    .take_while(|&(n, &t)| usize::from(t) == usize::from(first) + n)
                    .count()
            };
            let a = usize::from(first);
            let (from, to) = (self.starts[a] as usize, self.starts[a + len] as usize);
            if len > 1 && (to - from) * RUN_SHARE_OF_WINDOW >= wire.len() {
                self.frames.push(Frame::run(
                    wire.slice(from..to),
                    u32::try_from(len).unwrap_or(u32::MAX),
                ));
            } else {
                self.frames.extend(
                    rest[..len]
                        .iter()
                        .map(|&t| self.window[usize::from(t)].clone()),
                );
            }
            rest = &rest[len..];
        }
    }

    fn clear_window(&mut self) {
        self.window.clear();
        self.wire.clear();
        self.starts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::outbound::{channel, OutboundReceiver};

    /// Fans out `ticks` like `fan_out`: tick by tick, each to the clients `takes` names.
    fn fan(stage: &mut Stage, ticks: &[Frame], takes: impl Fn(usize) -> Vec<ClientKey>) {
        for (n, frame) in ticks.iter().enumerate() {
            for key in takes(n) {
                stage.stage(key, frame);
            }
            stage.tick_done();
        }
    }

    fn frames(rx: &OutboundReceiver) -> Vec<Frame> {
        std::iter::from_fn(|| rx.try_recv()).collect()
    }

    fn texts(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .flat_map(|f| f.texts().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    fn ticks(n: usize) -> Vec<Frame> {
        // Long enough (> 125 bytes) for the 16-bit length header.
        (0..n)
            .map(|i| {
                Frame::shared(
                    format!("{{\"tick\":{i},\"pad\":\"{}\"}}", "x".repeat(i * 40)),
                    true,
                )
            })
            .collect()
    }

    #[test]
    fn runs_keep_each_clients_order_and_report_full_and_gone_links() {
        let (a, a_rx) = channel(100, 1000);
        let (b, b_rx) = channel(100, 5);
        let (c, c_rx) = channel(100, 1000);
        drop(c_rx);
        let links = [a, b, c];
        let mut stage = Stage::default();
        let ticks = ticks(3);
        fan(&mut stage, &ticks, |_| vec![2, 0, 1]);
        let (mut tally, mut gone) = (Tally::default(), Vec::new());
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        assert_eq!(tally.messages, 3);
        assert_eq!(gone, [(2, 0), (1, close::SLOW_CONSUMER)]);
        let got = frames(&a_rx);
        assert_eq!(got.len(), 1, "three ticks in a row travel as one run");
        assert_eq!(got[0].messages(), 3);
        assert_eq!(texts(&got), texts(&ticks));
        assert!(
            b_rx.try_recv().is_none(),
            "a full link takes none of the run"
        );
        // Pushed runs are gone: the next push has nothing for anyone.
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        assert_eq!(tally.messages, 3);
    }

    #[test]
    fn consecutive_ticks_go_as_runs_and_the_rest_as_each_ticks_own_frame() {
        let (all, all_rx) = channel(100, 1 << 20);
        let (gaps, gaps_rx) = channel(100, 1 << 20);
        let (zip, zip_rx) = channel(100, 1 << 20);
        zip.set_deflate();
        let links = [all, gaps, zip];
        let mut stage = Stage::default();
        let ticks = ticks(6);
        // Client 1 takes ticks 0, 1, 3, 4 and 5 (not 2); the others take every tick.
        fan(&mut stage, &ticks, |n| {
            if n == 2 {
                vec![0, 2]
            } else {
                vec![0, 1, 2]
            }
        });
        let (mut tally, mut gone) = (Tally::default(), Vec::new());
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        assert!(gone.is_empty());
        assert_eq!(tally.messages, 6 + 5 + 6);

        let all = frames(&all_rx);
        assert_eq!(all.iter().map(Frame::messages).collect::<Vec<_>>(), [6]);
        assert_eq!(texts(&all), texts(&ticks));
        // The run is the ticks' wire form: a header and the text each, back to back.
        let mut wire = Vec::new();
        for t in &ticks {
            append_text_frame(&mut wire, t.as_str());
        }
        assert_eq!(all[0].wire().map(|w| &w[..]), Some(&wire[..]));
        assert_eq!(all[0].len(), wire.len());

        // Ticks grow by 40 bytes each: ticks 0-1 are under a quarter of the window's bytes
        // and go one frame each (a run would keep the whole window alive for a small share
        // of it); ticks 3-5 go as one run.
        let gaps = frames(&gaps_rx);
        assert_eq!(
            gaps.iter().map(Frame::messages).collect::<Vec<_>>(),
            [1, 1, 3],
            "the stretch breaks where a tick was not taken"
        );
        assert_eq!(gaps[0], ticks[0]);
        let mut expected = texts(&ticks);
        expected.remove(2);
        assert_eq!(texts(&gaps), expected);

        // A compressing client gets each tick's own shared frame, whose compressed form is
        // made once for everyone.
        let zip = frames(&zip_rx);
        assert_eq!(zip.len(), 6);
        assert!(zip.iter().all(|f| f.wire().is_none() && f.is_shared()));
        assert_eq!(texts(&zip), texts(&ticks));
    }

    #[test]
    fn a_lone_tick_is_its_own_frame_and_windows_start_afresh() {
        let (a, a_rx) = channel(100, 1 << 20);
        let links = [a];
        let mut stage = Stage::default();
        let ticks = ticks(4);
        let (mut tally, mut gone) = (Tally::default(), Vec::new());
        fan(&mut stage, &ticks[..1], |_| vec![0]);
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        fan(&mut stage, &ticks[1..], |_| vec![0]);
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        let got = frames(&a_rx);
        assert_eq!(got.len(), 2);
        assert!(
            got[0].wire().is_none(),
            "a single tick is not wrapped in a run"
        );
        assert_eq!(got[0], ticks[0]);
        assert_eq!(got[1].messages(), 3);
        assert_eq!(texts(&got), texts(&ticks));
    }

    #[test]
    fn it_asks_for_a_push_every_stage_ticks() {
        let mut stage = Stage::default();
        let due = (0..STAGE_TICKS).filter(|_| stage.tick_done()).count();
        assert_eq!(due, 1);
        stage.push_all(|_| None, &mut Tally::default(), &mut Vec::new());
        assert!(!stage.tick_done(), "the count starts again after a push");
    }
}

//! Realtime frames on their way from one dispatch round to the clients' links. `fan_out`
//! stages each matching tick's frame for a realtime client here instead of pushing it, and the
//! dispatcher pushes each client's staged run with one [`Outbound::push_many`] every
//! [`STAGE_TICKS`] ticks and at the end of the round: one lock, one byte count and at most one
//! wake-up per client per run, where a push per tick paid a lock and three atomics for every
//! delivery (13 % of the server at 5M deliveries/s; docs/benchmarks.md).
//!
//! Nothing else reaches a client's link between staging and the push: commands, timers and
//! replays run between rounds, and batch groups and the other modes push only to clients that
//! are not realtime. So staging moves the push later within the round, never past another
//! frame for the same client. Memory is bounded by [`STAGE_TICKS`] frames per client.
//!
//! Data flow: `fan_out` → [`Stage::stage`] → [`Stage::push_all`] → each client's link.

use super::delivery::Tally;
use super::outbound::{Frame, Outbound, PushError};
use super::registry::ClientKey;
use crate::protocol::close;

/// Ticks a round fans out before the staged frames are pushed: bounds what is staged per
/// client (and how long a frame waits for its push) while keeping the per-push cost spread
/// over many deliveries.
pub const STAGE_TICKS: usize = 64;

/// Emptied runs kept for reuse; more clients than this allocate a run per push.
const SPARE_RUNS: usize = 1024;

/// The frames staged for realtime clients since the last push.
#[derive(Debug, Default)]
pub struct Stage {
    /// Clients with staged frames, in the order they were first staged, with their frames.
    runs: Vec<(ClientKey, Vec<Frame>)>,
    /// By client key: 1 + the client's index in `runs`, or 0 when nothing is staged for it.
    slot: Vec<u32>,
    /// Ticks fanned out since the last push.
    ticks: usize,
    /// Emptied runs, kept with their storage.
    spare: Vec<Vec<Frame>>,
}

impl Stage {
    /// Stages `frame` for `key`.
    pub fn stage(&mut self, key: ClientKey, frame: &Frame) {
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
        self.runs[run].1.push(frame.clone());
    }

    /// Counts one fanned-out tick; `true` when it is time to push.
    pub fn tick_done(&mut self) -> bool {
        self.ticks += 1;
        self.ticks >= STAGE_TICKS
    }

    /// Pushes every staged run to its client's link (`link` finds it; `None`: the client has
    /// gone and its frames are dropped). A client whose link is full is reported as a slow
    /// consumer, one whose connection has gone as gone (code 0), as a per-tick push would.
    pub fn push_all<'a>(
        &mut self,
        mut link: impl FnMut(ClientKey) -> Option<&'a Outbound>,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) {
        self.ticks = 0;
        for (key, mut frames) in self.runs.drain(..) {
            self.slot[key] = 0;
            if let Some(out) = link(key) {
                match out.push_many(&mut frames) {
                    Ok(n) => tally.messages += n as u64,
                    Err(PushError::Full) => gone.push((key, close::SLOW_CONSUMER)),
                    Err(PushError::Closed) => gone.push((key, 0)),
                }
            }
            frames.clear();
            if self.spare.len() < SPARE_RUNS {
                self.spare.push(frames);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::outbound::channel;

    #[test]
    fn runs_keep_each_clients_order_and_report_full_and_gone_links() {
        let (a, a_rx) = channel(100, 1000);
        let (b, b_rx) = channel(100, 5);
        let (c, c_rx) = channel(100, 1000);
        drop(c_rx);
        let links = [a, b, c];
        let mut stage = Stage::default();
        for i in 0..3 {
            for key in [2, 0, 1] {
                stage.stage(key, &Frame::from(format!("{key}:{i}")));
            }
            stage.tick_done();
        }
        let (mut tally, mut gone) = (Tally::default(), Vec::new());
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        assert_eq!(tally.messages, 3);
        assert_eq!(gone, [(2, 0), (1, close::SLOW_CONSUMER)]);
        let got: Vec<Frame> = std::iter::from_fn(|| a_rx.try_recv()).collect();
        assert_eq!(got, ["0:0", "0:1", "0:2"]);
        assert!(
            b_rx.try_recv().is_none(),
            "a full link takes none of the run"
        );
        // Pushed runs are gone: the next push has nothing for anyone.
        stage.push_all(|k| links.get(k), &mut tally, &mut gone);
        assert_eq!(tally.messages, 3);
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

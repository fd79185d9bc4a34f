//! The consumer: every node reads the whole stream in stream order through an ordered
//! JetStream consumer (it re-creates itself after gaps and reconnects), unpacks each message
//! (one tick, or a batch of one symbol's consecutive ticks) and feeds each tick, with the seq
//! it carries, to its own dispatcher, which fans it out and stores it in the
//! node's redb replica. A tick whose seq the replica already has is skipped, so replaying from a
//! position a little behind the store (after a crash) changes nothing. The feed is bounded:
//! when this node's dispatcher or store falls behind, reading pauses and the stream keeps the
//! rest (`lag` grows). Each message's fed ticks share an ack group that settles after the
//! store commit; the position saved in `cluster.json` only moves past committed messages.
//! Every message's tick keys go to [`Seen`] before the consumed position moves past it: the
//! publisher's exact dedup waits on that.
//!
//! The consumer is the **arbiter** of each symbol's chain: a message is accepted iff its
//! headers and payload agree (`Tickfan-Seq` = first tick's seq, `Tickfan-Count` = number of
//! ticks, seqs consecutive, every tick of the subject's symbol) and its first seq is the
//! symbol's accepted head + 1. Anything else is skipped whole and counted
//! (`skipped_messages` in `/health`). The stream's order is the same on every node, so every
//! node accepts the same messages: correctness does not rest on JetStream's per-subject
//! compare-and-set, which a replicated stream does not serialize (nats-server#4320). The
//! verdicts go to [`Seen`], where the publisher waits for them before acking (`publish.rs`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::publish::{COUNT_HEADER, NODE_HEADER, SEQ_HEADER};
use super::seen::Seen;
use super::{save_replica, ClusterStatus, SAVE_EVERY};
use crate::ack::AckGroup;
use crate::ingest::parse::{parse_document, Element, Field};
use crate::ingest::{dedup, validate, Ingestor, TimeRules};
use crate::queue::Queued;
use crate::tick::{Symbol, Tick};

/// Pause before re-creating the consumer after it failed.
const RESTART_AFTER: Duration = Duration::from_millis(500);

/// Behind the stream with no message for this long: the consumer is re-created.
const STALL_AFTER: Duration = Duration::from_secs(2);

/// What the consumer task owns.
pub(super) struct Consumer {
    pub(super) stream: Stream,
    pub(super) filter: String,
    pub(super) node: String,
    /// `<subject_prefix>.`: a message's subject without it names its symbol.
    pub(super) prefix: String,
    pub(super) feed: flume::Sender<Queued>,
    pub(super) ingestor: Arc<Ingestor>,
    /// Stream sequences up to here may be replays of messages this node's store already has
    /// (in part: a crash between two commits of one message); see `judge`.
    pub(super) replay_through: u64,
    /// A new node (empty store) reading the stream from its start: retention
    /// (`max_msgs_per_symbol`) may have dropped a symbol's first messages, so the first
    /// well-formed message it sees of a symbol starts that symbol's chain wherever it starts.
    pub(super) bootstrap: bool,
    pub(super) status: Arc<ClusterStatus>,
    pub(super) seen: Arc<Seen>,
    pub(super) replica: PathBuf,
}

/// Runs until `stop`, starting at `start`.
pub(super) async fn run(c: Consumer, start: DeliverPolicy, stop: CancellationToken) {
    // Fed ticks in stream order, each with the group that settles at its commit.
    let (commits_tx, commits_rx) = flume::bounded(c.feed.capacity().unwrap_or(1024).max(1));
    let tracker = tokio::spawn(track_commits(
        commits_rx,
        c.status.clone(),
        c.replica.clone(),
    ));
    let mut next = start;
    // Where the store ends: a stall check or a reconnect reopens after it, never at 1.
    let mut last_seen = c.status.position.load(Ordering::Acquire);
    c.status.read_through.store(last_seen, Ordering::Relaxed);
    'outer: loop {
        let messages = match open(&c.stream, &c.filter, next).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "cannot start the stream consumer; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(RESTART_AFTER) => continue,
                }
            }
        };
        let mut messages = std::pin::pin!(messages);
        // A reconnect (NATS restarted) ends this consumer: a new one starts after the last
        // message seen rather than trusting the old one to notice.
        let connections = c.status.reconnects.load(Ordering::Acquire);
        let mut check = tokio::time::interval(RESTART_AFTER);
        let mut last_message = Instant::now();
        loop {
            let item = tokio::select! {
                () = stop.cancelled() => break 'outer,
                item = messages.next() => item,
                _ = check.tick() => {
                    let behind = c.status.stream_last.load(Ordering::Acquire).saturating_sub(last_seen);
                    c.status.lag.store(behind, Ordering::Relaxed);
                    // Behind the stream with nothing arriving: the consumer was lost with a
                    // server (it lives on one); start a new one.
                    let stalled = behind > 0 && last_message.elapsed() >= STALL_AFTER;
                    if stalled || c.status.reconnects.load(Ordering::Acquire) != connections {
                        break;
                    }
                    continue;
                }
            };
            let msg = match item {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "stream consumer error; starting a new one");
                    break;
                }
                None => break,
            };
            last_message = Instant::now();
            let Ok(info) = msg.info() else { continue };
            let (stream_seq, pending) = (info.stream_sequence, info.pending);
            last_seen = stream_seq;
            c.status.read_through.store(stream_seq, Ordering::Relaxed);
            c.status.lag.store(pending, Ordering::Relaxed);
            c.status.consumed.fetch_add(1, Ordering::Relaxed);
            let from_here = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .is_some_and(|n| n.as_str() == c.node);
            let symbol = symbol_of(&c.prefix, msg.subject.as_str());
            let verdict = judge(
                symbol.as_ref(),
                msg.headers.as_ref(),
                &msg.payload,
                symbol.as_ref().and_then(|s| c.seen.head(s)),
                stream_seq <= c.replay_through,
                c.bootstrap,
            );
            let fresh = match verdict {
                Judged::Accept(ticks) => {
                    if let (Some(symbol), Some(last)) = (&symbol, ticks.last()) {
                        c.seen.set_head(symbol, last.seq);
                        c.seen.remember(symbol, ticks.iter().map(dedup::key_of));
                    }
                    c.seen.record_verdict(stream_seq, true);
                    ticks
                }
                Judged::Replayed => {
                    c.status.replayed.fetch_add(1, Ordering::Relaxed);
                    c.seen.record_verdict(stream_seq, false);
                    Vec::new()
                }
                Judged::Skip(why) => {
                    // A lost race is routine on a replicated stream; malformed is not.
                    if why == NOT_NEXT {
                        tracing::debug!(stream_seq, subject = %msg.subject, why, "stream message skipped");
                    } else {
                        tracing::warn!(stream_seq, subject = %msg.subject, why, "stream message skipped");
                    }
                    c.status.skipped.fetch_add(1, Ordering::Relaxed);
                    c.seen.record_verdict(stream_seq, false);
                    Vec::new()
                }
            };
            let group = Arc::new(AckGroup::new(fresh.len()));
            for tick in fresh {
                if !from_here {
                    c.ingestor.remember_replicated(&tick);
                }
                let queued = Queued {
                    tick,
                    ack: Some(group.clone()),
                    index: 0,
                    enqueued: Instant::now(),
                };
                if c.feed.send_async(queued).await.is_err() {
                    break 'outer;
                }
            }
            c.seen.consumed_through(stream_seq);
            if commits_tx.send_async((stream_seq, group)).await.is_err() {
                break 'outer;
            }
        }
        // The ordered consumer ended (stream gone, long outage): start again after the last
        // message seen.
        next = DeliverPolicy::ByStartSequence {
            start_sequence: last_seen + 1,
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(RESTART_AFTER) => {}
        }
    }
    drop(commits_tx);
    let _ = tracker.await;
}

/// An ordered consumer of the stream from `start`, as a stream of messages.
async fn open(
    stream: &Stream,
    filter: &str,
    start: DeliverPolicy,
) -> Result<async_nats::jetstream::consumer::pull::Ordered, async_nats::Error> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: start,
            ..Default::default()
        })
        .await?;
    Ok(consumer.messages().await?)
}

/// Moves the replica position past each tick once it is committed, in stream order, and
/// saves it every `SAVE_EVERY`.
async fn track_commits(
    commits: flume::Receiver<(u64, Arc<AckGroup>)>,
    status: Arc<ClusterStatus>,
    replica: PathBuf,
) {
    let mut saved = status.position.load(Ordering::Acquire);
    let mut last_save = Instant::now();
    while let Ok((stream_seq, group)) = commits.recv_async().await {
        group.settled().await;
        status.position.store(stream_seq, Ordering::Release);
        if stream_seq != saved && last_save.elapsed() >= SAVE_EVERY {
            save_replica(&replica, &status.stream, status.epoch, stream_seq);
            saved = stream_seq;
            last_save = Instant::now();
        }
    }
}

/// The symbol a subject names (`<prefix>.<SYMBOL>`, `~` standing for `.`).
fn symbol_of(prefix: &str, subject: &str) -> Option<Symbol> {
    let token = subject.strip_prefix(prefix)?;
    Symbol::parse(&token.replace('~', "."))
}

/// Why a well-formed message is skipped: it is not the next link of its symbol's chain.
const NOT_NEXT: &str = "first seq is not the accepted head + 1";

/// What the arbiter decided about one stream message.
#[derive(Debug, PartialEq)]
enum Judged {
    /// The next link of its symbol's chain: these ticks go to the dispatcher (all of the
    /// message's ticks, or after a crash the ones past what the store already has).
    Accept(Vec<Tick>),
    /// A replay of what the store already has (a restart a little behind the store).
    Replayed,
    /// Not a link of the chain (a losing concurrent publish) or malformed; nothing of it is
    /// delivered.
    Skip(&'static str),
}

/// The arbiter's rule (module docs). `head` is the symbol's accepted head; `replay` says the
/// message may be one the store already holds; `bootstrap` lets a symbol's first message
/// seen start past 1 (retention may have dropped the beginning before this new node read it).
fn judge(
    symbol: Option<&Symbol>,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    head: Option<u64>,
    replay: bool,
    bootstrap: bool,
) -> Judged {
    let Some(symbol) = symbol else {
        return Judged::Skip("subject names no valid symbol");
    };
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().parse::<u64>())
    };
    let first = match header(SEQ_HEADER) {
        Some(Ok(first)) if first > 0 => first,
        _ => return Judged::Skip("missing or bad Tickfan-Seq"),
    };
    let count = match header(COUNT_HEADER) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => return Judged::Skip("bad Tickfan-Count"),
    };
    let Some(ticks) = parse_ticks(payload) else {
        return Judged::Skip("payload is not a batch of valid ticks");
    };
    if ticks.len() as u64 != count {
        return Judged::Skip("Tickfan-Count does not match the payload");
    }
    for (i, t) in ticks.iter().enumerate() {
        if &t.symbol != symbol {
            return Judged::Skip("a tick of another symbol than the subject's");
        }
        if first.checked_add(i as u64) != Some(t.seq) {
            return Judged::Skip("seqs are not Tickfan-Seq, +1, +2, ...");
        }
    }
    let last = first + (count - 1);
    match head {
        Some(h) if h.checked_add(1) == Some(first) => Judged::Accept(ticks),
        // A replay after a restart: the store has all of it, or its first part.
        Some(h) if replay && first <= h => {
            if last <= h {
                Judged::Replayed
            } else {
                Judged::Accept(ticks.into_iter().filter(|t| t.seq > h).collect())
            }
        }
        Some(_) => Judged::Skip(NOT_NEXT),
        None if first == 1 || bootstrap => Judged::Accept(ticks),
        None => Judged::Skip("a symbol's first message must start at seq 1"),
    }
}

/// The ticks a stream message carries (one tick's wire JSON, or a JSON array of them, seqs
/// included); `None` when any part of it is not a valid tick (a message is taken whole or
/// not at all: a half-read batch would leave a silent hole).
fn parse_ticks(payload: &[u8]) -> Option<Vec<Tick>> {
    let mut out = Vec::new();
    let text = std::str::from_utf8(payload).ok()?;
    let mut scratch = payload.to_vec();
    let parsed = parse_document(&mut scratch, text, crate::json_depth::DEFAULT_MAX_DEPTH).ok()?;
    // The ticks were validated where they were accepted; only their shape is read here.
    let rules = TimeRules {
        now_ms: 0,
        max_future_ms: i64::MAX / 2,
        max_age_ms: None,
    };
    let mut bad = false;
    parsed.for_each_element(|e| {
        let Element::Object(o) = e else {
            bad = true;
            return;
        };
        let int = |name| match o.get(name) {
            Field::Int(i) => Some(i),
            _ => None,
        };
        let (Some(seq), Some(quality), Some(t_in)) = (int("seq"), int("quality"), int("t_in"))
        else {
            bad = true;
            return;
        };
        match (
            validate::validate(&o, rules, t_in),
            u64::try_from(seq),
            u8::try_from(quality),
        ) {
            (Ok(mut tick), Ok(seq), Ok(quality)) if seq > 0 => {
                tick.seq = seq;
                tick.quality = quality;
                out.push(tick);
            }
            _ => bad = true,
        }
    });
    (!bad && !out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tick::TradeId;

    #[test]
    fn a_published_tick_reads_back_identically() {
        let mut t = Tick::new(
            Symbol::parse("BRK.B").unwrap(),
            1_700_000_000_000,
            412.5,
            3.0,
        );
        t.seq = 42;
        t.quality = 87;
        t.t_in = 1_700_000_000_000_123;
        t.bid = Some(412.25);
        t.id = Some(TradeId::Str("x\"1".into()));
        t.priority = crate::tick::Priority::High;
        let back = parse_ticks(t.to_json().as_bytes()).unwrap().pop().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_json(), t.to_json());
        // A batch: a JSON array of consecutive ticks, each with its own seq.
        let mut u = t.clone();
        u.seq = 43;
        u.price = 413.0;
        let batch = format!("[{},{}]", t.to_json(), u.to_json());
        assert_eq!(parse_ticks(batch.as_bytes()), Some(vec![t, u]));
    }

    #[test]
    fn a_payload_without_seq_is_refused() {
        assert!(parse_ticks(br#"{"symbol":"A","ts":1,"price":1,"volume":1}"#).is_none());
        assert!(parse_ticks(b"not json").is_none());
    }

    #[test]
    fn the_arbiter_takes_exactly_the_next_link() {
        let g = Symbol::parse("G").unwrap();
        let tick = |seq| {
            let mut t = Tick::new(g.clone(), 1_700_000_000_000, 1.0, 1.0);
            t.seq = seq;
            t.t_in = 1;
            t
        };
        let batch = |first: u64, n: u64| {
            let ticks: Vec<String> = (first..first + n).map(|s| tick(s).to_json()).collect();
            format!("[{}]", ticks.join(","))
        };
        let headers = |first: u64, n: u64| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(SEQ_HEADER, first.to_string().as_str());
            h.insert(COUNT_HEADER, n.to_string().as_str());
            h
        };
        let j = |first, n, head, replay, bootstrap| {
            judge(
                Some(&g),
                Some(&headers(first, n)),
                batch(first, n).as_bytes(),
                head,
                replay,
                bootstrap,
            )
        };
        assert_eq!(
            j(6, 2, Some(5), false, false),
            Judged::Accept(vec![tick(6), tick(7)])
        );
        assert!(
            matches!(j(5, 2, Some(5), false, false), Judged::Skip(_)),
            "a loser"
        );
        assert!(
            matches!(j(8, 1, Some(5), false, false), Judged::Skip(_)),
            "a hole"
        );
        assert!(matches!(
            j(1, 1, Some(u64::MAX), false, false),
            Judged::Skip(_)
        ));
        assert!(matches!(j(3, 1, None, false, false), Judged::Skip(_)));
        assert_eq!(j(3, 1, None, false, true), Judged::Accept(vec![tick(3)]));
        assert_eq!(j(4, 2, Some(5), true, false), Judged::Replayed);
        assert_eq!(j(5, 2, Some(5), true, false), Judged::Accept(vec![tick(6)]));
        // Headers that disagree with the payload.
        let h = headers(6, 3);
        let skip = judge(
            Some(&g),
            Some(&h),
            batch(6, 2).as_bytes(),
            Some(5),
            false,
            false,
        );
        assert!(matches!(skip, Judged::Skip(_)));
        let skip = judge(
            Some(&g),
            None,
            batch(6, 2).as_bytes(),
            Some(5),
            false,
            false,
        );
        assert!(matches!(skip, Judged::Skip(_)));
    }
}

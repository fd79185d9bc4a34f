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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::publish::NODE_HEADER;
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
    pub(super) feed: flume::Sender<Queued>,
    pub(super) ingestor: Arc<Ingestor>,
    /// Each symbol's last seq in this node's store (or fed to the dispatcher).
    pub(super) seqs: HashMap<Symbol, u64>,
    pub(super) status: Arc<ClusterStatus>,
    pub(super) seen: Arc<Seen>,
    pub(super) replica: PathBuf,
}

/// Runs until `stop`, starting at `start`.
pub(super) async fn run(mut c: Consumer, start: DeliverPolicy, stop: CancellationToken) {
    // Fed ticks in stream order, each with the group that settles at its commit.
    let (commits_tx, commits_rx) = flume::bounded(c.feed.capacity().unwrap_or(1024).max(1));
    let tracker = tokio::spawn(track_commits(
        commits_rx,
        c.status.clone(),
        c.replica.clone(),
    ));
    let mut next = start;
    let mut last_seen = 0u64;
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
            c.status.lag.store(pending, Ordering::Relaxed);
            c.status.consumed.fetch_add(1, Ordering::Relaxed);
            let from_here = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .is_some_and(|n| n.as_str() == c.node);
            let ticks = parse_ticks(&msg.payload);
            if ticks.is_empty() {
                tracing::warn!(stream_seq, "unreadable message in the stream; skipped");
            }
            if let Some(first) = ticks.first() {
                c.seen
                    .remember(&first.symbol, ticks.iter().map(dedup::key_of));
            }
            let fresh: Vec<Tick> = ticks
                .into_iter()
                .filter(|t| t.seq > c.seqs.get(&t.symbol).copied().unwrap_or(0))
                .collect();
            let group = Arc::new(AckGroup::new(fresh.len()));
            for tick in fresh {
                c.seqs.insert(tick.symbol.clone(), tick.seq);
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

/// The ticks a stream message carries (one tick's wire JSON, or a JSON array of them, seqs
/// included); empty when unreadable.
fn parse_ticks(payload: &[u8]) -> Vec<Tick> {
    let mut out = Vec::new();
    let Ok(text) = std::str::from_utf8(payload) else {
        return out;
    };
    let mut scratch = payload.to_vec();
    let Ok(parsed) = parse_document(&mut scratch, text, crate::json_depth::DEFAULT_MAX_DEPTH)
    else {
        return out;
    };
    // The ticks were validated where they were accepted; only their shape is read here.
    let rules = TimeRules {
        now_ms: 0,
        max_future_ms: i64::MAX / 2,
        max_age_ms: None,
    };
    parsed.for_each_element(|e| {
        if let Element::Object(o) = e {
            let int = |name| match o.get(name) {
                Field::Int(i) => Some(i),
                _ => None,
            };
            let (Some(seq), Some(quality), Some(t_in)) = (int("seq"), int("quality"), int("t_in"))
            else {
                return;
            };
            if let Ok(mut tick) = validate::validate(&o, rules, t_in) {
                tick.seq = u64::try_from(seq).unwrap_or(0);
                tick.quality = u8::try_from(quality).unwrap_or(0);
                if tick.seq > 0 {
                    out.push(tick);
                }
            }
        }
    });
    out
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
        let back = parse_ticks(t.to_json().as_bytes()).pop().unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_json(), t.to_json());
        // A batch: a JSON array of consecutive ticks, each with its own seq.
        let mut u = t.clone();
        u.seq = 43;
        u.price = 413.0;
        let batch = format!("[{},{}]", t.to_json(), u.to_json());
        assert_eq!(parse_ticks(batch.as_bytes()), vec![t, u]);
    }

    #[test]
    fn a_payload_without_seq_is_refused() {
        assert!(parse_ticks(br#"{"symbol":"A","ts":1,"price":1,"volume":1}"#).is_empty());
        assert!(parse_ticks(b"not json").is_empty());
    }
}

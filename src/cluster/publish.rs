//! The publisher: pops this node's priority queue (so priorities still order admission and a
//! full queue still pushes back on producers) and stores each tick in the stream. The per-symbol
//! `seq` is assigned here by compare-and-set: the publish carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the symbol's last message,
//! which this node knows (its own last publish) or reads (after a conflict or an error), and
//! the tick's seq = that message's seq + 1. JetStream stores it only if nobody else published
//! that symbol in between, so each symbol's messages form one chain 1, 2, 3... with no hole and
//! no repeat, whichever nodes publish. One publish per symbol is in flight at a time; symbols
//! run in parallel. `Nats-Msg-Id` (symbol + the tick's dedup key) makes a resend within the
//! stream's duplicate window (to any node) a duplicate. The producer's ack settles when the
//! stream acked: an ack means the bus holds the tick.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use super::{subject_of, ClusterStatus};
use crate::config::Config;
use crate::ingest::dedup;
use crate::queue::{PriorityQueue, Queued};
use crate::tick::Symbol;

/// Header carrying the tick's per-symbol seq (also in the JSON payload), read on resync.
pub(super) const SEQ_HEADER: &str = "Tickfan-Seq";
/// Header naming the node that published the tick.
pub(super) const NODE_HEADER: &str = "Tickfan-Node";

/// Backoff between retries while the bus fails.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(1_000);

/// A symbol's chain head: (stream sequence of its last message, that message's seq).
type Head = (u64, u64);

/// Everything a publish needs, cheap to clone into each in-flight publish.
#[derive(Clone)]
pub(super) struct Publisher {
    js: Context,
    stream: Stream,
    status: Arc<ClusterStatus>,
    node: Arc<str>,
    prefix: Arc<str>,
    timeout: Duration,
    max_in_flight: usize,
}

impl Publisher {
    pub(super) fn new(
        config: &Config,
        node: &str,
        js: Context,
        stream: Stream,
        status: Arc<ClusterStatus>,
    ) -> Self {
        Self {
            js,
            stream,
            status,
            node: node.into(),
            prefix: config.cluster.subject_prefix.as_str().into(),
            timeout: Duration::from_millis(config.cluster.publish_timeout_ms),
            max_in_flight: config.cluster.max_in_flight,
        }
    }
}

/// How one tick's publish ended.
enum Outcome {
    /// Stored with this head.
    Stored(Head),
    /// The stream already held it (same `Nats-Msg-Id`); the head is unknown now.
    Duplicate,
    /// Not confirmed within `publish_timeout_ms`.
    TimedOut,
}

type Done = Pin<Box<dyn Future<Output = (Symbol, Queued, Outcome)> + Send>>;

#[derive(Default)]
struct SymbolChain {
    head: Option<Head>,
    waiting: VecDeque<Queued>,
    busy: bool,
}

/// Runs until `stop`: pops `queue`, publishes, settles producers' acks.
pub(super) async fn run(p: Publisher, queue: Arc<PriorityQueue>, stop: CancellationToken) {
    let mut chains: HashMap<Symbol, SymbolChain> = HashMap::new();
    let mut running: FuturesUnordered<Done> = FuturesUnordered::new();
    // Ticks taken from the queue and not yet settled.
    let mut held = 0usize;
    loop {
        if held < p.max_in_flight {
            let drained = queue.drain_round(Instant::now());
            for q in drained.expired {
                if let Some(ack) = &q.ack {
                    ack.expire(q.index);
                }
            }
            for q in drained.ready {
                held += 1;
                let symbol = q.tick.symbol.clone();
                let chain = chains.entry(symbol.clone()).or_default();
                if chain.busy {
                    chain.waiting.push_back(q);
                } else {
                    chain.busy = true;
                    running.push(Box::pin(publish_one(p.clone(), symbol, chain.head, q)));
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some((symbol, q, outcome)) = running.next(), if !running.is_empty() => {
                held -= 1;
                let chain = chains.entry(symbol.clone()).or_default();
                chain.busy = false;
                settle(&p.status, chain, &q, outcome);
                if let Some(next) = chain.waiting.pop_front() {
                    chain.busy = true;
                    running.push(Box::pin(publish_one(p.clone(), symbol, chain.head, next)));
                } else if chains.len() > MAX_IDLE_CHAINS {
                    // Forget idle symbols' heads; one read restores a head when needed.
                    chains.retain(|_, c| c.busy || !c.waiting.is_empty());
                }
            }
            () = queue.wait_ready(), if held < p.max_in_flight => {}
        }
    }
    // Ticks not confirmed by the bus get no ack: their producers resend (deduplicated).
}

/// Idle chains kept before they are dropped.
const MAX_IDLE_CHAINS: usize = 100_000;

fn settle(status: &ClusterStatus, chain: &mut SymbolChain, q: &Queued, outcome: Outcome) {
    match outcome {
        Outcome::Stored(head) => {
            chain.head = Some(head);
            status.published.fetch_add(1, Ordering::Relaxed);
            if let Some(ack) = &q.ack {
                ack.settle();
            }
        }
        Outcome::Duplicate => {
            chain.head = None;
            status.bus_duplicates.fetch_add(1, Ordering::Relaxed);
            // Durable in the bus (the earlier copy): the producer may count it as taken.
            if let Some(ack) = &q.ack {
                ack.settle();
            }
        }
        Outcome::TimedOut => {
            chain.head = None;
            status.publish_expired.fetch_add(1, Ordering::Relaxed);
            if let Some(ack) = &q.ack {
                ack.expire(q.index);
            }
        }
    }
}

/// Publishes one tick with compare-and-set on its symbol's chain, retrying conflicts (at
/// once, after re-reading the head) and bus errors (with backoff) until the deadline.
async fn publish_one(
    p: Publisher,
    symbol: Symbol,
    mut head: Option<Head>,
    mut q: Queued,
) -> (Symbol, Queued, Outcome) {
    let deadline = Instant::now() + p.timeout;
    let subject = subject_of(&p.prefix, &symbol);
    let msg_id = format!("{symbol}:{:016x}", dedup::key_of(&q.tick));
    let mut backoff = RETRY_MIN;
    loop {
        if Instant::now() >= deadline {
            return (symbol, q, Outcome::TimedOut);
        }
        let (last_stream_seq, last_seq) = match head {
            Some(h) => h,
            None => match read_head(&p.stream, &subject).await {
                Ok(h) => h,
                Err(()) => {
                    fail(&p, &mut backoff).await;
                    continue;
                }
            },
        };
        q.tick.seq = last_seq + 1;
        let msg = PublishMessage::build()
            .payload(q.tick.to_json().into())
            .message_id(msg_id.as_str())
            .expected_last_subject_sequence(last_stream_seq)
            .header(SEQ_HEADER, q.tick.seq.to_string().as_str())
            .header(NODE_HEADER, &*p.node);
        let sent = Instant::now();
        let acked = match p.js.send_publish(subject.clone(), msg).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) if ack.duplicate => {
                p.status.set_stream_ok(true);
                return (symbol, q, Outcome::Duplicate);
            }
            Ok(ack) => {
                p.status.set_stream_ok(true);
                p.status.record_publish(sent.elapsed().as_secs_f64());
                let head = (ack.sequence, q.tick.seq);
                return (symbol, q, Outcome::Stored(head));
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                p.status.conflicts.fetch_add(1, Ordering::Relaxed);
                head = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, %symbol, "bus publish failed; retrying");
                head = None;
                fail(&p, &mut backoff).await;
            }
        }
    }
}

async fn fail(p: &Publisher, backoff: &mut Duration) {
    p.status.publish_errors.fetch_add(1, Ordering::Relaxed);
    p.status.set_stream_ok(false);
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(RETRY_MAX);
}

/// The symbol's chain head from the stream: its last message's stream sequence and seq, or
/// (0, 0) when the stream has none.
async fn read_head(stream: &Stream, subject: &str) -> Result<Head, ()> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => {
            let seq = m
                .headers
                .get(SEQ_HEADER)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .ok_or(())?;
            Ok((m.sequence, seq))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((0, 0)),
        Err(e) => {
            tracing::debug!(error = %e, subject, "cannot read the chain head");
            Err(())
        }
    }
}

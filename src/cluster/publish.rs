//! The publisher: pops this node's priority queue (so priorities still order admission and a
//! full queue still pushes back on producers) and stores ticks in the stream. The per-symbol
//! `seq` is assigned here by compare-and-set: the publish carries
//! `Nats-Expected-Last-Subject-Sequence` = the stream sequence of the symbol's last message,
//! which this node knows (its own last publish) or reads (after a conflict or an error), and
//! the message's ticks get the seqs that follow that message's last one. JetStream stores it
//! only if nobody else published that symbol in between, so each symbol's messages form one
//! chain of seqs 1, 2, 3... with no hole and no repeat, whichever nodes publish.
//!
//! Batching: one publish per symbol is in flight at a time, and everything of that symbol
//! that queued meanwhile goes out as ONE message (a JSON array of consecutive ticks, headers
//! `Tickfan-Seq` = first seq and `Tickfan-Count`), bounded by `cluster.max_ticks_per_message`
//! and `cluster.max_message_bytes`. JetStream's cost is per message, so this is what lifts
//! the bus above its per-message ceiling (docs/cluster.md has the numbers).
//!
//! Dedup stays exact per tick: a batch is filtered against [`Seen`] (the keys of the symbol's
//! recent ticks in the stream) right before it is published on a head this node has fully
//! seen; see `seen.rs`. `Nats-Msg-Id` still makes a resend of the same message (a retry after
//! a lost ack) a duplicate. The producer's ack settles when the stream acked: an ack means the
//! bus holds the tick.
//!
//! The compare-and-set is not what keeps the chain one: the consumers are its arbiter
//! (`consume.rs`), because a replicated stream in nats-server 2.9 can store several publishes
//! built on the same head (nats-server#4320). So a head is built from the accepted chain (the
//! subject's last stream sequence, and the consumer's accepted tick head), and on a stream with
//! replicas > 1 a stored message is acked to its producers only after this node's consumer
//! judged it accepted; a skipped one is re-filtered and published again with new seqs. With
//! one replica the compare-and-set is serializable and a stored message is always accepted, so
//! the ack comes with the stream's ack (the fast path).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hasher;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{Context, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio_util::sync::CancellationToken;

use super::seen::Seen;
use super::{subject_of, ClusterStatus};
use crate::config::Config;
use crate::ingest::{dedup, Ingestor};
use crate::queue::{PriorityQueue, Queued};
use crate::tick::Symbol;

/// Header carrying the per-symbol seq of the message's first tick (each tick's JSON has its
/// own seq too), read on resync.
pub(super) const SEQ_HEADER: &str = "Tickfan-Seq";
/// Header carrying how many ticks the message holds (absent: one).
pub(super) const COUNT_HEADER: &str = "Tickfan-Count";
/// Header naming the node that published the message.
pub(super) const NODE_HEADER: &str = "Tickfan-Node";

/// Backoff between retries while the bus fails.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(1_000);

/// Bytes kept free under the server's `max_payload` for a message's headers besides the node
/// name: `Nats-Msg-Id` (symbol up to 64 + hash + two numbers), the expected sequence, the
/// seq and count, and the header block's framing.
const HEADER_ROOM: usize = 512;

/// The smallest batch byte budget (one tick always goes out alone if it must).
const MIN_MESSAGE_BYTES: usize = 1024;

/// Bytes a tick's seq may add to its JSON once assigned (it is counted before: up to 20
/// digits), plus the comma between array elements.
const TICK_OVERHEAD: usize = 21;

/// A symbol's chain head: (stream sequence of its last message, that message's last seq).
type Head = (u64, u64);

/// Everything a publish needs, cheap to clone into each in-flight publish.
#[derive(Clone)]
pub(super) struct Publisher {
    js: Context,
    stream: Stream,
    status: Arc<ClusterStatus>,
    seen: Arc<Seen>,
    /// Told about ticks that expired before the bus held them (their dedup keys go).
    ingestor: Arc<Ingestor>,
    node: Arc<str>,
    prefix: Arc<str>,
    timeout: Duration,
    /// Whether a stored compare-and-set means accepted (one replica; see the module docs).
    cas_trusted: bool,
    max_in_flight: usize,
    max_ticks: usize,
    max_bytes: usize,
}

impl Publisher {
    pub(super) fn new(
        config: &Config,
        node: &str,
        js: Context,
        stream: Stream,
        status: Arc<ClusterStatus>,
        seen: Arc<Seen>,
        ingestor: Arc<Ingestor>,
    ) -> Self {
        let max_payload = js.client().server_info().max_payload;
        let c = &config.cluster;
        let cas_trusted = status.replicas <= 1;
        // The server refuses a message (headers + payload) above its `max_payload`; a
        // batch must fit below it with its headers, whatever `max_message_bytes` says.
        let header_room = HEADER_ROOM + node.len();
        let fits = max_payload
            .saturating_sub(header_room)
            .max(MIN_MESSAGE_BYTES);
        let max_bytes = if c.max_message_bytes > fits {
            tracing::warn!(
                max_message_bytes = c.max_message_bytes,
                server_max_payload = max_payload,
                using = fits,
                "cluster.max_message_bytes is above the NATS server's max_payload (less header room); using the smaller"
            );
            fits
        } else {
            c.max_message_bytes
        };
        Self {
            js,
            stream,
            status,
            seen,
            ingestor,
            node: node.into(),
            prefix: c.subject_prefix.as_str().into(),
            timeout: Duration::from_millis(c.publish_timeout_ms),
            cas_trusted,
            max_in_flight: c.max_in_flight,
            max_ticks: c.max_ticks_per_message.max(1),
            max_bytes,
        }
    }
}

/// How one message's publish ended.
enum Outcome {
    /// Stored with this head; the batch's ticks that were already in the stream were left out
    /// (they are settled too: the bus holds them).
    Stored(Head),
    /// Every tick of the batch was already in the stream; the head (if known) is unchanged.
    AllSeen(Option<Head>),
    /// The stream already held this very message (same `Nats-Msg-Id`); the head is unknown.
    Duplicate,
    /// Not confirmed within `publish_timeout_ms`.
    TimedOut,
}

/// What an in-flight publish hands back: the symbol, its batch, how it ended, and how many
/// of the batch's ticks were found already in the stream.
type Done = Pin<Box<dyn Future<Output = (Symbol, Vec<Queued>, Outcome, usize)> + Send>>;

#[derive(Default)]
struct SymbolChain {
    /// The head this node built on last; only ever a head whose messages this node has all
    /// seen (see `seen.rs`), so a publish on it is filtered against everything before it.
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
                p.ingestor.forget_expired(&q.tick);
                if let Some(ack) = &q.ack {
                    ack.expire(q.index);
                }
            }
            let mut touched: Vec<Symbol> = Vec::new();
            for q in drained.ready {
                held += 1;
                let chain = chains.entry(q.tick.symbol.clone()).or_default();
                if !chain.busy && chain.waiting.is_empty() {
                    touched.push(q.tick.symbol.clone());
                }
                chain.waiting.push_back(q);
            }
            // Each idle symbol that got ticks publishes them now, as one message.
            for symbol in touched {
                let chain = chains.entry(symbol.clone()).or_default();
                if !chain.busy {
                    start_next(&p, &mut running, symbol, chain);
                }
            }
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some((symbol, batch, outcome, seen)) = running.next(), if !running.is_empty() => {
                held -= batch.len() + seen;
                let chain = chains.entry(symbol.clone()).or_default();
                chain.busy = false;
                settle(&p, chain, &batch, outcome);
                if !chain.waiting.is_empty() {
                    start_next(&p, &mut running, symbol, chain);
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

/// Takes the next batch of `chain`'s waiting ticks (up to the tick and byte caps) and starts
/// publishing it.
fn start_next(
    p: &Publisher,
    running: &mut FuturesUnordered<Done>,
    symbol: Symbol,
    chain: &mut SymbolChain,
) {
    let mut batch = Vec::new();
    // The array's brackets.
    let mut bytes = 2usize;
    // One scratch buffer for the size of every tick of the batch (no allocation per tick).
    let mut scratch = Vec::with_capacity(256);
    while let Some(q) = chain.waiting.front() {
        // An upper bound of the tick's size in the payload, so the message never exceeds
        // the server's max_payload (see `Publisher::new`).
        scratch.clear();
        q.tick.write_json(&mut scratch);
        let size = scratch.len() + TICK_OVERHEAD;
        if !batch.is_empty() && (batch.len() >= p.max_ticks || bytes + size > p.max_bytes) {
            break;
        }
        bytes += size;
        batch.extend(chain.waiting.pop_front());
    }
    chain.busy = true;
    running.push(Box::pin(publish_batch(
        p.clone(),
        symbol,
        chain.head,
        batch,
    )));
}

fn settle(p: &Publisher, chain: &mut SymbolChain, batch: &[Queued], outcome: Outcome) {
    let status = &p.status;
    let settle_all = || {
        for q in batch {
            if let Some(ack) = &q.ack {
                ack.settle();
            }
        }
    };
    match outcome {
        Outcome::Stored(head) => {
            chain.head = Some(head);
            status
                .published
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            status.messages.fetch_add(1, Ordering::Relaxed);
            settle_all();
        }
        Outcome::AllSeen(head) => chain.head = head,
        Outcome::Duplicate => {
            chain.head = None;
            status
                .bus_duplicates
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            // Durable in the bus (the earlier copy): the producer may count it as taken.
            settle_all();
        }
        Outcome::TimedOut => {
            chain.head = None;
            status
                .publish_expired
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for q in batch {
                // Not (known to be) in the bus: a resend must not be taken for a duplicate.
                // Had it landed after all, the publisher's filter still drops the resend.
                p.ingestor.forget_expired(&q.tick);
                if let Some(ack) = &q.ack {
                    ack.expire(q.index);
                }
            }
        }
    }
}

/// Publishes one batch of a symbol's ticks as one message with compare-and-set on the
/// symbol's chain, retrying conflicts (after re-reading the head and catching up with it)
/// and bus errors (with backoff) until the deadline. Ticks found already in the stream are
/// settled and dropped from the batch on the way; their count is returned.
async fn publish_batch(
    p: Publisher,
    symbol: Symbol,
    mut head: Option<Head>,
    mut batch: Vec<Queued>,
) -> (Symbol, Vec<Queued>, Outcome, usize) {
    let deadline = Instant::now() + p.timeout;
    let subject = subject_of(&p.prefix, &symbol);
    let mut keys: Vec<u64> = batch.iter().map(|q| dedup::key_of(&q.tick)).collect();
    let mut dropped = 0usize;
    let mut backoff = RETRY_MIN;
    // After an ambiguous failure (timeout, broken connection) the last message may be stored
    // with its ack lost: it is sent again IDENTICAL (same head, seqs, payload, Nats-Msg-Id),
    // so JetStream answers `duplicate` for it, before anything is re-read or re-filtered.
    let mut resend = false;
    loop {
        if Instant::now() >= deadline {
            return (symbol, batch, Outcome::TimedOut, dropped);
        }
        let (last_stream_seq, last_seq) = if let Some(h) = head {
            h
        } else {
            // A head this node did not build itself: read it, and publish on it only once
            // the consumer has passed it, so the batch is filtered against every message
            // before it (exact dedup; see seen.rs).
            let left = deadline.saturating_duration_since(Instant::now());
            match read_head(&p, &subject, &symbol, left).await {
                Ok(Some(h)) => {
                    head = Some(h);
                    h
                }
                Ok(None) => continue,
                Err(()) => {
                    fail(&p, &mut backoff).await;
                    continue;
                }
            }
        };
        // Leave out what the stream already holds (sent to another node too, or a retry of
        // a publish whose ack was lost). Not on an identical resend: that must stay the
        // same message.
        let mut i = 0;
        while i < batch.len() && !resend {
            if p.seen.contains(&symbol, keys[i]) {
                let q = batch.remove(i);
                keys.remove(i);
                dropped += 1;
                p.status.bus_duplicates.fetch_add(1, Ordering::Relaxed);
                if let Some(ack) = &q.ack {
                    ack.settle();
                }
            } else {
                i += 1;
            }
        }
        if batch.is_empty() {
            return (symbol, batch, Outcome::AllSeen(head), dropped);
        }
        let mut payload = Vec::with_capacity(batch.len() * 256);
        if batch.len() > 1 {
            payload.push(b'[');
        }
        for (n, q) in batch.iter_mut().enumerate() {
            q.tick.seq = last_seq + 1 + n as u64;
            if n > 0 {
                payload.push(b',');
            }
            q.tick.write_json(&mut payload);
        }
        if batch.len() > 1 {
            payload.push(b']');
        }
        let msg_id = message_id(&symbol, &keys, last_seq + 1);
        let first = (last_seq + 1).to_string();
        let mut msg = PublishMessage::build()
            .payload(payload.into())
            .message_id(msg_id.as_str())
            .expected_last_subject_sequence(last_stream_seq)
            .header(SEQ_HEADER, first.as_str())
            .header(NODE_HEADER, &*p.node);
        if batch.len() > 1 {
            msg = msg.header(COUNT_HEADER, batch.len().to_string().as_str());
        }
        let sent = Instant::now();
        let acked = match p.js.send_publish(subject.clone(), msg).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) if p.cas_trusted && ack.duplicate => {
                p.status.set_stream_ok(true);
                return (symbol, batch, Outcome::Duplicate, dropped);
            }
            Ok(ack) if p.cas_trusted => {
                p.status.set_stream_ok(true);
                p.status.record_publish(sent.elapsed().as_secs_f64());
                p.seen.remember(&symbol, keys.iter().copied());
                let head = (ack.sequence, last_seq + batch.len() as u64);
                return (symbol, batch, Outcome::Stored(head), dropped);
            }
            Ok(ack) => {
                // Stored (or, duplicate, stored earlier), but maybe beside another message
                // built on the same head: the consumer decides (module docs).
                p.status.set_stream_ok(true);
                let left = deadline.saturating_duration_since(Instant::now());
                if !p.seen.wait_consumed(ack.sequence, left).await {
                    continue; // the deadline check above reports it `expired`
                }
                if p.seen.verdict(ack.sequence) == Some(true) {
                    p.status.record_publish(sent.elapsed().as_secs_f64());
                    if ack.duplicate {
                        return (symbol, batch, Outcome::Duplicate, dropped);
                    }
                    let head = (ack.sequence, last_seq + batch.len() as u64);
                    return (symbol, batch, Outcome::Stored(head), dropped);
                }
                // Skipped (it lost to a concurrent publish): re-read the accepted head,
                // re-filter, and publish what is left with new seqs.
                p.status.conflicts.fetch_add(1, Ordering::Relaxed);
                resend = false;
                head = None;
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                // Not a bus outage: this one message is too large (batches are sized below
                // max_payload, so only a single oversized tick gets here). Its ticks are
                // reported `expired`; the gate stays open for everything else.
                tracing::warn!(error = %e, %symbol, "a message above the server's max_payload");
                p.status.publish_errors.fetch_add(1, Ordering::Relaxed);
                return (symbol, batch, Outcome::TimedOut, dropped);
            }
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                p.status.conflicts.fetch_add(1, Ordering::Relaxed);
                resend = false;
                head = None;
            }
            Err(e) => {
                tracing::debug!(error = %e, %symbol, "bus publish failed; resending it");
                resend = true;
                fail(&p, &mut backoff).await;
            }
        }
    }
}

/// `Nats-Msg-Id` of a message: `<symbol>:<key>:<first seq>` for one tick (so the same tick
/// published alone by two nodes on the same head is one message, as before batching),
/// `<symbol>:b<hash of the keys>:<n>:<first seq>` for a batch (a retry of the same message is
/// a duplicate). The first seq is part of it: a message republished after the consumer
/// skipped it is a different message.
fn message_id(symbol: &Symbol, keys: &[u64], first: u64) -> String {
    if let [key] = keys {
        return format!("{symbol}:{key:016x}:{first}");
    }
    let mut h = std::hash::DefaultHasher::new();
    for k in keys {
        h.write_u64(*k);
    }
    format!("{symbol}:b{:016x}:{}:{first}", h.finish(), keys.len())
}

async fn fail(p: &Publisher, backoff: &mut Duration) {
    p.status.publish_errors.fetch_add(1, Ordering::Relaxed);
    p.status.set_stream_ok(false);
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(RETRY_MAX);
}

/// The symbol's chain head from the accepted chain: the stream sequence of the subject's last
/// message (whatever it is: the compare-and-set compares against it), and, once this node's
/// consumer has passed that message, the symbol's accepted tick head. Never read from the last
/// message's headers: it may be a skipped loser or garbage. `Ok(None)`: the consumer did not
/// get there within `wait`; `Err`: the stream did not answer.
async fn read_head(
    p: &Publisher,
    subject: &str,
    symbol: &Symbol,
    wait: Duration,
) -> Result<Option<Head>, ()> {
    let last = match p.stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => m.sequence,
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
        Err(e) => {
            tracing::debug!(error = %e, subject, "cannot read the chain head");
            return Err(());
        }
    };
    if !p.seen.wait_consumed(last, wait).await {
        return Ok(None);
    }
    Ok(Some((last, p.seen.head(symbol).unwrap_or(0))))
}

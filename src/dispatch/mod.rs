//! The dispatcher: the one owner of routing state. It pops the priority queue, stamps each
//! symbol's `seq` as ticks leave it, serializes each tick once, and offers the shared bytes to
//! every matching client's bounded outbound queue without ever awaiting a client. Connections
//! talk to it only through [`Command`]s, so subscribe/unsubscribe acks are ordered with the
//! ticks around them. Accepted ticks then go on to the sink (the store), which settles their
//! producers' acks after the durable commit. Subscriptions live in `subscription`, snapshots
//! and resumes in `snapshot`, per-client delivery modes in `delivery`, batches shared by
//! batch clients with the same settings in `batch_group`, and a round's realtime frames, pushed
//! to each client's link in runs, in `stage`.
//!
//! This is the routing layer under the connection layers: it never imports the sessions
//! (`crate::session`) or the transport (`crate::transport`). What it shares with them is its
//! own small module, [`outbound`]: each connection's bounded link, which the dispatcher pushes
//! to and the session (or the parking lot, for a parked connection) drains.

mod batch_group;
pub mod command;
pub mod delivery;
pub mod filter;
pub mod latency;
pub mod outbound;
#[cfg(test)]
mod proptests;
pub mod recent;
pub mod registry;
pub mod sink;
mod snapshot;
mod stage;
mod subscription;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use slab::Slab;
use tokio_util::sync::CancellationToken;

use self::batch_group::{Groups, Membership};
pub use self::command::{Command, DispatcherGone, DispatcherHandle, SnapshotRead};
use self::delivery::{Delivery, Outcome, SmartThresholds, Tally};
use self::filter::Filter;
use self::outbound::{Frame, Outbound, Refills};
use self::recent::RecentTicks;
use self::registry::{ClientKey, Registry, SymbolSet};
pub use self::sink::{StoreSink, TickSink};
use self::stage::Stage;
use crate::auth::SymbolPatterns;
use crate::config::Config;
use crate::dlq::{DeadLetter, DeadLetters};
use crate::protocol::{close, Mode, Settings};
use crate::queue::{PriorityQueue, Queued};
use crate::store::{Store, StoredTick};
use crate::tick::{now_ms, Symbol, Tick};

/// What `/api/symbols` and the `symbols` op report per symbol.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SymbolInfo {
    /// Name.
    pub symbol: Symbol,
    /// Last assigned seq.
    pub seq: u64,
    /// Last price.
    pub price: f64,
    /// Last event time, ms.
    pub ts: i64,
}

/// Counters for metrics and `/api/stats`.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Registered clients.
    pub clients: AtomicU64,
    /// Ticks that got a seq.
    pub dispatched: AtomicU64,
    /// Frames pushed to clients (ticks, batches, throttled ticks, mode messages).
    pub messages: AtomicU64,
    /// Clients closed with 4008.
    pub slow_consumer_closes: AtomicU64,
    /// Ticks skipped by conflation.
    pub conflated: AtomicU64,
    /// Smart-mode switches.
    pub mode_switches: AtomicU64,
    /// Ticks dropped because their queue TTL ran out.
    pub expired: AtomicU64,
    /// Subscribes refused with `too_many_symbols`.
    pub too_many_symbols: AtomicU64,
    /// Shared batch groups now.
    pub batch_groups: AtomicU64,
    /// Batch-mode clients served by a shared group now.
    pub batch_group_members: AtomicU64,
    /// Paced replays (`history`, `since_seq`) running or waiting now, one per client and symbol.
    pub replays: AtomicU64,
    /// Ticks sent in snapshot messages.
    pub replayed_ticks: AtomicU64,
    /// Receive-to-dispatch percentiles over the last few seconds.
    pub latency: parking_lot::Mutex<latency::LatencySummary>,
}

struct Client {
    /// Distinguishes registrations that reuse a slab key.
    serial: u64,
    /// Symbols being replayed (`snapshot`): their live ticks wait in the ring or the store.
    /// A sorted set like `symbols`: usually empty, and then it costs no allocation.
    awaiting: SymbolSet,
    out: Outbound,
    /// Detached by the dispatcher (slow consumer, gone): no more delivery or commands.
    detached: bool,
    symbols: SymbolSet,
    wildcard: bool,
    /// The symbols its token permits (`None`: all, the common case). Subscribes outside
    /// them are refused, and its wildcard matches only them (see `registry`).
    permitted: Option<Arc<SymbolPatterns>>,
    filter: Filter,
    delivery: Delivery,
    /// Batch mode: served by a shared batch group, or joining one.
    group: Membership,
}

struct SymbolState {
    seq: u64,
    price: f64,
    ts: i64,
    recent: RecentTicks,
}

/// Last known state of a symbol at start (from the store), so seqs continue.
#[derive(Debug, Clone)]
pub struct Seed {
    /// Symbol.
    pub symbol: Symbol,
    /// Last seq.
    pub seq: u64,
    /// Last price.
    pub price: f64,
    /// Last event time.
    pub ts: i64,
}

/// The dispatcher actor.
pub struct Dispatcher<S: TickSink> {
    queue: Arc<PriorityQueue>,
    commands: flume::Receiver<Command>,
    clients: Slab<Client>,
    registry: Registry,
    symbols: HashMap<Symbol, SymbolState>,
    timers: BinaryHeap<Reverse<(Instant, ClientKey)>>,
    /// Shared batches of batch-mode clients with the same settings.
    groups: Groups,
    /// Ticks stamped so far: a group takes each tick once however many members offer it.
    stamped: u64,
    /// The wire object of the tick being dispatched, written by `stamp` (the buffer is reused).
    json: String,
    /// Registered clients that negotiated permessage-deflate: while there are any, tick
    /// frames carry a slot for their compressed form (compressed once, for all of them).
    deflate_clients: usize,
    sink: S,
    dead_letters: Arc<DeadLetters>,
    stats: Arc<DispatchStats>,
    smart: SmartThresholds,
    max_symbols: usize,
    recent_cap: usize,
    default_interval: Duration,
    min_interval: Duration,
    /// Seconds from `t_in` to stamping, when metrics are attached.
    latency: Option<metrics::Histogram>,
    /// The same, as recent-window percentiles for `/api/stats`.
    window: latency::LatencyWindow,
    /// For snapshot reads older than the in-memory ring.
    store: Option<Store>,
    /// The dispatcher's own command sender, for results of its background reads.
    self_tx: flume::Sender<Command>,
    next_serial: u64,
    max_replay: usize,
    /// Store reads for snapshots running now, and those waiting for a slot.
    reads_in_flight: usize,
    queued_reads: std::collections::VecDeque<SnapshotRead>,
    max_store_reads: usize,
    /// Cluster mode: ticks consumed from the bus (`with_feed`).
    feed: Option<flume::Receiver<Queued>>,
    /// A feed tick received while the dispatcher waited; dispatched first in the next round.
    feed_head: Option<Queued>,
    /// Paced replays by client (only clients with one running have an entry).
    replays: HashMap<ClientKey, snapshot::Replays>,
    /// Links that drained below their replay's low-water mark.
    refills: Arc<Refills>,
    /// Replay pacing marks, in percent of a client's byte limit.
    replay_low_pct: u8,
    replay_high_pct: u8,
    /// Tells a restarted replay's reads from the old one's.
    next_generation: u64,
    /// Realtime frames of the round so far, pushed per client every few ticks.
    stage: Stage,
}

/// Commands handled per loop turn before looking at the queue again.
const COMMAND_CHUNK: usize = 64;

/// Ticks taken from the cluster feed per round.
const FEED_CHUNK: usize = 1024;

impl<S: TickSink> Dispatcher<S> {
    /// Builds a dispatcher and its handle.
    #[must_use]
    pub fn new(
        config: &Config,
        queue: Arc<PriorityQueue>,
        sink: S,
        dead_letters: Arc<DeadLetters>,
        stats: Arc<DispatchStats>,
        seeds: Vec<Seed>,
    ) -> (Self, DispatcherHandle) {
        let (tx, rx) = flume::bounded(config.dispatch.command_capacity);
        let limit = config.limits.outbound_buffer_bytes;
        let symbols = seeds
            .into_iter()
            .map(|s| {
                let state = SymbolState {
                    seq: s.seq,
                    price: s.price,
                    ts: s.ts,
                    recent: RecentTicks::default(),
                };
                (s.symbol, state)
            })
            .collect();
        let dispatcher = Self {
            queue,
            commands: rx,
            clients: Slab::new(),
            registry: Registry::default(),
            symbols,
            timers: BinaryHeap::new(),
            groups: Groups::default(),
            stamped: 0,
            json: String::with_capacity(256),
            deflate_clients: 0,
            sink,
            dead_letters,
            stats,
            smart: SmartThresholds {
                batch: limit * usize::from(config.dispatch.smart_batch_pct) / 100,
                conflate: limit * usize::from(config.dispatch.smart_conflate_pct) / 100,
            },
            max_symbols: config.limits.max_symbols,
            recent_cap: config.dispatch.recent_ticks,
            default_interval: Duration::from_millis(config.dispatch.default_interval_ms),
            min_interval: Duration::from_millis(config.dispatch.min_interval_ms),
            latency: None,
            window: latency::LatencyWindow::default(),
            store: None,
            self_tx: tx.clone(),
            next_serial: 0,
            max_replay: config.dispatch.max_replay_ticks,
            reads_in_flight: 0,
            queued_reads: std::collections::VecDeque::new(),
            max_store_reads: config.dispatch.max_store_reads.max(1),
            feed: None,
            feed_head: None,
            replays: HashMap::new(),
            refills: Arc::new(Refills::default()),
            replay_low_pct: config.dispatch.replay_low_water_pct.clamp(1, 100),
            replay_high_pct: config
                .dispatch
                .replay_high_water_pct
                .clamp(config.dispatch.replay_low_water_pct.clamp(1, 100), 100),
            next_generation: 0,
            stage: Stage::default(),
        };
        (dispatcher, DispatcherHandle { tx })
    }

    /// Reads snapshots older than the in-memory ring from `store`.
    #[must_use]
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
        self
    }

    /// Cluster mode: also dispatches the ticks consumed from the bus, in the order received,
    /// keeping the seq each carries (src/cluster/).
    #[must_use]
    pub fn with_feed(mut self, feed: flume::Receiver<Queued>) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Records ingest-to-dispatch latency into `histogram`.
    #[must_use]
    pub fn with_latency_histogram(mut self, histogram: metrics::Histogram) -> Self {
        self.latency = Some(histogram);
        self
    }

    /// Runs until `shutdown`, then drains the queue (so every accepted tick gets its seq and
    /// reaches the sink) and returns the sink.
    pub async fn run(mut self, shutdown: CancellationToken) -> S {
        loop {
            let mut busy = false;
            for key in self.refills.take() {
                self.refill(key);
                busy = true;
            }
            for _ in 0..COMMAND_CHUNK {
                match self.commands.try_recv() {
                    Ok(cmd) => {
                        self.handle(cmd);
                        busy = true;
                    }
                    Err(_) => break,
                }
            }
            if self.dispatch_round().await {
                busy = true;
            }
            let now = Instant::now();
            self.fire_timers(now);
            self.window.tick(now, &self.stats.latency);
            if busy {
                // Let connection tasks run between rounds on a busy runtime.
                tokio::task::yield_now().await;
                continue;
            }
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse((at, _))| *at)
                .into_iter()
                .chain(self.groups.next_deadline())
                .min();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = self.commands.recv_async() => match cmd {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                },
                () = self.queue.wait_ready() => {}
                item = feed_recv(self.feed.as_ref()) => self.feed_head = Some(item),
                () = self.refills.notified() => {}
                () = sleep_until(next_timer) => {}
            }
        }
        while self.dispatch_round().await {}
        for (_, client) in &self.clients {
            let _ = client.out.kill(close::GOING_AWAY);
        }
        self.sink
    }

    /// One bounded round from the queue (and the cluster feed). Returns whether anything was
    /// taken.
    async fn dispatch_round(&mut self) -> bool {
        let fed = self.feed_round().await;
        let drained = self.queue.drain_round(Instant::now());
        if drained.ready.is_empty() && drained.expired.is_empty() {
            return fed;
        }
        if !drained.expired.is_empty() {
            self.expire(drained.expired);
        }
        self.dispatch_ready(drained.ready).await;
        true
    }

    /// Cluster mode: ticks consumed from the bus, in stream order with their seq already set.
    /// They bypass the priority queue, whose lanes would reorder them.
    async fn feed_round(&mut self) -> bool {
        let Some(feed) = &self.feed else {
            return false;
        };
        let head = self.feed_head.take();
        let ready: Vec<Queued> = head
            .into_iter()
            .chain(feed.try_iter().take(FEED_CHUNK))
            .collect();
        if ready.is_empty() {
            return false;
        }
        self.dispatch_ready(ready).await;
        true
    }

    /// Stamps, fans out and hands to the sink one round of ticks.
    async fn dispatch_ready(&mut self, mut ready: Vec<Queued>) {
        let now = Instant::now();
        let now_us = crate::tick::now_us();
        let mut tally = Tally::default();
        let mut gone = Vec::new();
        // Stamped and fanned out in place; the round then becomes the store's batch in the
        // same allocation. Moving each ~200-byte tick out of `ready` and into a fresh vector
        // (cold memory) was 5 % of the worker at 100k ticks/s.
        for item in &mut ready {
            let waited = now_us - item.tick.t_in;
            self.window.record(waited);
            if let Some(h) = &self.latency {
                #[allow(clippy::cast_precision_loss)]
                h.record(waited.max(0) as f64 / 1e6);
            }
            self.stamp(&mut item.tick);
            let flush_now = self.fan_out(&item.tick, now, &mut tally, &mut gone);
            for g in flush_now {
                self.flush_group(g, now, &mut tally, &mut gone);
            }
            if self.stage.tick_done() {
                self.push_staged(&mut tally, &mut gone);
            }
        }
        self.push_staged(&mut tally, &mut gone);
        let done: Vec<StoredTick> = ready
            .into_iter()
            .map(|item| StoredTick::new(item.tick, item.ack))
            .collect();
        self.stats
            .dispatched
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        self.record(tally);
        for (key, code) in gone {
            self.drop_client(key, code);
        }
        self.sink.accept(done).await;
    }

    /// Pushes the realtime frames staged so far to their clients' links.
    fn push_staged(&mut self, tally: &mut Tally, gone: &mut Vec<(ClientKey, u16)>) {
        let clients = &self.clients;
        self.stage
            .push_all(|key| clients.get(key).map(|c| &c.out), tally, gone);
    }

    /// Assigns the next seq, serializes the tick once (into `self.json`) and keeps it in the
    /// symbol's ring.
    fn stamp(&mut self, tick: &mut Tick) {
        if !self.symbols.contains_key(&tick.symbol) {
            let fresh = SymbolState {
                seq: 0,
                price: tick.price,
                ts: tick.ts,
                recent: RecentTicks::default(),
            };
            self.symbols.insert(tick.symbol.clone(), fresh);
        }
        // Not `entry`, which takes a key to keep: a clone of the symbol per tick.
        let state = self
            .symbols
            .get_mut(&tick.symbol)
            .expect("a missing symbol was inserted above");
        // A tick from the cluster bus carries its cluster-wide seq already.
        state.seq = if tick.seq == 0 {
            state.seq + 1
        } else {
            tick.seq
        };
        self.stamped += 1;
        state.price = tick.price;
        state.ts = tick.ts;
        tick.seq = state.seq;
        let mut buf = std::mem::take(&mut self.json).into_bytes();
        buf.clear();
        tick.write_json(&mut buf);
        // Checked once here; the ring and the shared frame take it as text from now on.
        self.json = String::from_utf8(buf).expect("tick JSON is UTF-8");
        state.recent.push(tick.seq, &self.json, self.recent_cap);
    }

    /// Offers the tick to every subscriber (its batch group, or the stage for a realtime
    /// client); returns the groups that must flush right away (a critical tick, or a batch at
    /// the byte limit). The shared frame is made from `self.json` for the first subscriber
    /// that takes the tick: a symbol nobody watches costs no frame (an allocation, a
    /// reference count and two frees, 7 % of the worker when ingesting 100k ticks/s).
    fn fan_out(
        &mut self,
        tick: &Tick,
        now: Instant,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) -> Vec<usize> {
        let clients = &mut self.clients;
        let timers = &mut self.timers;
        let groups = &mut self.groups;
        let stage = &mut self.stage;
        let smart = self.smart;
        let stamped = self.stamped;
        let critical = tick.priority == crate::tick::Priority::Critical;
        let json = &self.json;
        let compressible = self.deflate_clients > 0;
        let mut shared: Option<Frame> = None;
        let mut flush_now = Vec::new();
        self.registry.for_each_subscriber(&tick.symbol, |key| {
            let Some(client) = clients.get_mut(key) else {
                return;
            };
            if !client.filter.matches(tick)
                || (!client.awaiting.is_empty() && client.awaiting.contains(&tick.symbol))
            {
                return;
            }
            let frame: &Frame =
                shared.get_or_insert_with(|| Frame::shared(json.clone(), compressible));
            if let Membership::Member(g) = client.group {
                let Some(group) = groups.get_mut(g) else {
                    return;
                };
                let deadline = group.offer(stamped, &tick.symbol, frame, now);
                let full = group.held_bytes() > client.out.byte_limit();
                if (critical || full) && !flush_now.contains(&g) {
                    flush_now.push(g);
                }
                if let Some(at) = deadline {
                    groups.schedule(g, at);
                }
                return;
            }
            if client.delivery.mode() == Mode::Realtime {
                stage.stage(key, frame);
                return;
            }
            match client
                .delivery
                .deliver(tick, frame, &client.out, now, smart, tally)
            {
                Outcome::Done => {}
                Outcome::Scheduled(at) => timers.push(Reverse((at, key))),
                Outcome::SlowConsumer => gone.push((key, close::SLOW_CONSUMER)),
                Outcome::Gone => gone.push((key, 0)),
            }
        });
        flush_now
    }

    fn fire_timers(&mut self, now: Instant) {
        let mut tally = Tally::default();
        let mut gone = Vec::new();
        while let Some(Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(client) = self.clients.get_mut(key) else {
                continue;
            };
            // Stale entries (rescheduled or already flushed) are skipped.
            if client.delivery.next_flush() != Some(at) {
                continue;
            }
            match client
                .delivery
                .flush(&client.out, now, self.smart, &mut tally)
            {
                Outcome::Done => {}
                Outcome::Scheduled(next) => self.timers.push(Reverse((next, key))),
                Outcome::SlowConsumer => gone.push((key, close::SLOW_CONSUMER)),
                Outcome::Gone => gone.push((key, 0)),
            }
        }
        while let Some(g) = self.groups.pop_due(now) {
            self.flush_group(g, now, &mut tally, &mut gone);
        }
        self.record(tally);
        for (key, code) in gone {
            self.drop_client(key, code);
        }
    }

    /// Sends whatever `key`'s delivery holds back (batch or conflated ticks) now.
    fn flush_held(&mut self, key: ClientKey) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let mut tally = Tally::default();
        let outcome = client
            .delivery
            .flush(&client.out, Instant::now(), self.smart, &mut tally);
        self.record(tally);
        match outcome {
            Outcome::Done => {}
            Outcome::Scheduled(at) => self.timers.push(Reverse((at, key))),
            Outcome::SlowConsumer => self.drop_client(key, close::SLOW_CONSUMER),
            Outcome::Gone => self.drop_client(key, 0),
        }
    }

    fn record(&self, tally: Tally) {
        let s = &self.stats;
        s.messages.fetch_add(tally.messages, Ordering::Relaxed);
        s.conflated.fetch_add(tally.conflated, Ordering::Relaxed);
        s.mode_switches
            .fetch_add(tally.mode_switches, Ordering::Relaxed);
    }

    fn expire(&self, expired: Vec<Queued>) {
        self.stats
            .expired
            .fetch_add(expired.len() as u64, Ordering::Relaxed);
        let received_at = now_ms();
        let letters: Vec<_> = expired
            .iter()
            .map(|q| {
                DeadLetter::new(
                    "expired",
                    format!(
                        "{} tick expired in the queue before dispatch (queue TTL)",
                        q.tick.priority.as_str()
                    ),
                    q.tick.to_json(),
                    received_at,
                )
            })
            .collect();
        self.dead_letters.extend(letters);
        for q in expired {
            if let Some(ack) = &q.ack {
                ack.expire(q.index);
            }
        }
    }

    /// Stops delivering to a client; `code` non-zero also tells its connection to close with
    /// it. The slab entry stays until the connection's own `Deregister`, so a key is never
    /// reused while its old connection may still send commands.
    fn drop_client(&mut self, key: ClientKey, code: u16) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        if client.detached {
            return;
        }
        client.detached = true;
        self.forget_replays(key);
        self.leave_group(key);
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        for symbol in client.symbols.take_all() {
            self.registry.remove(&symbol, key);
        }
        if client.wildcard {
            client.wildcard = false;
            self.registry.remove_wildcard(key);
        }
        if code == close::SLOW_CONSUMER {
            self.stats
                .slow_consumer_closes
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(client = key, "slow consumer closed");
        }
        if code != 0 {
            let _ = client.out.kill(code);
        }
    }

    fn deregister(&mut self, key: ClientKey) {
        self.drop_client(key, 0);
        if let Some(client) = self.clients.try_remove(key) {
            self.stats.clients.fetch_sub(1, Ordering::Relaxed);
            if client.out.deflate() {
                self.deflate_clients -= 1;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        let detached = |key: ClientKey| self.clients.get(key).is_none_or(|c| c.detached);
        match &cmd {
            Command::Subscribe { key, .. }
            | Command::Unsubscribe { key, .. }
            | Command::Configure { key, .. }
            | Command::ClientSymbols { key, .. }
            | Command::Reauthorize { key, .. }
                if detached(*key) =>
            {
                return;
            }
            _ => {}
        }
        match cmd {
            Command::Register {
                out,
                permitted,
                reply,
            } => {
                self.next_serial += 1;
                if out.deflate() {
                    self.deflate_clients += 1;
                }
                let key = self.clients.insert(Client {
                    serial: self.next_serial,
                    awaiting: SymbolSet::default(),
                    out,
                    detached: false,
                    symbols: SymbolSet::default(),
                    wildcard: false,
                    permitted,
                    filter: Filter::default(),
                    delivery: Delivery::new(self.default_interval),
                    group: Membership::Private,
                });
                self.stats.clients.fetch_add(1, Ordering::Relaxed);
                if reply.send(key).is_err() {
                    self.deregister(key);
                }
            }
            Command::Deregister { key } => self.deregister(key),
            Command::Subscribe {
                key,
                id,
                symbols,
                settings,
                history,
                since_seq,
            } => {
                // Out of any batch group while the subscription changes; back in after, if
                // the new settings still qualify.
                self.leave_group(key);
                if history > 0 || !since_seq.is_empty() {
                    // Ticks held back for this client go out before the ack: the snapshots
                    // that follow it include them, and must not be followed by them again.
                    self.flush_held(key);
                }
                self.subscribe(key, id, &symbols, &settings, history, &since_seq);
                self.regroup(key);
            }
            Command::Unsubscribe { key, id, symbols } => {
                self.leave_group(key);
                self.unsubscribe(key, id, &symbols);
                self.regroup(key);
            }
            Command::Configure { key, id, settings } => {
                if self.clients.contains(key) {
                    self.leave_group(key);
                    self.apply_settings(key, &settings);
                    self.regroup(key);
                    let mode = self.clients[key].delivery.mode();
                    self.reply(
                        key,
                        &json!({"type":"ack","id":id,"op":"configure","mode":mode}),
                    );
                }
            }
            Command::Reauthorize { key, id, permitted } => {
                self.leave_group(key);
                self.reauthorize(key, id, permitted);
                self.regroup(key);
            }
            Command::ClientSymbols { key, id } => {
                let mut list = self.symbol_list();
                // A token's symbols are all a client learns of, names included.
                if let Some(p) = self.clients.get(key).and_then(|c| c.permitted.as_ref()) {
                    list.retain(|s| p.allows(s.symbol.as_str()));
                }
                self.reply(key, &json!({"type":"symbols","id":id,"symbols":list}));
            }
            Command::SnapshotLoaded { read, result } => self.snapshot_loaded(read, result),
            Command::ListSymbols { reply } => {
                let _ = reply.send(self.symbol_list());
            }
        }
    }

    fn symbol_list(&self) -> Vec<SymbolInfo> {
        let mut list: Vec<_> = self
            .symbols
            .iter()
            .filter(|(_, s)| s.seq > 0)
            .map(|(sym, s)| SymbolInfo {
                symbol: sym.clone(),
                seq: s.seq,
                price: s.price,
                ts: s.ts,
            })
            .collect();
        list.sort_by(|a, b| a.symbol.cmp(&b.symbol));
        list
    }

    /// Queues a control reply; a client whose queue cannot take even that is gone.
    fn reply(&mut self, key: ClientKey, msg: &Value) {
        self.push_control(key, Frame::from(msg.to_string()));
    }

    /// Queues a control frame (reply, snapshot, error). A full queue makes the client a slow
    /// consumer; a closed one means the client already left, which is no slowness of its own and
    /// must not count as one (or log as one).
    pub(super) fn push_control(&mut self, key: ClientKey, frame: Frame) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        match client.out.push_control(frame) {
            Ok(()) => {}
            Err(outbound::PushError::Full) => self.drop_client(key, close::SLOW_CONSUMER),
            Err(outbound::PushError::Closed) => self.drop_client(key, 0),
        }
    }

    fn apply_settings(&mut self, key: ClientKey, settings: &Settings) {
        let now = Instant::now();
        let (default_interval, min_interval) = (self.default_interval, self.min_interval);
        let client = &mut self.clients[key];
        if let Some(q) = settings.min_quality {
            client.filter.min_quality = q;
        }
        if let Some(v) = settings.min_volume {
            client.filter.min_volume = v;
        }
        let mode = settings.mode.unwrap_or(client.delivery.mode());
        let interval = settings
            .interval_ms
            .map_or(client.delivery.interval(), Duration::from_millis)
            .max(min_interval);
        let interval = if interval.is_zero() {
            default_interval
        } else {
            interval
        };
        let mut tally = Tally::default();
        let outcome = client
            .delivery
            .reconfigure(mode, interval, &client.out, now, &mut tally);
        self.record(tally);
        match outcome {
            Outcome::Scheduled(at) => self.timers.push(Reverse((at, key))),
            Outcome::SlowConsumer => self.drop_client(key, close::SLOW_CONSUMER),
            Outcome::Gone => self.drop_client(key, 0),
            Outcome::Done => {}
        }
    }
}

/// The next tick of the cluster feed; never resolves without a feed (or once it closed).
async fn feed_recv(feed: Option<&flume::Receiver<Queued>>) -> Queued {
    if let Some(feed) = feed {
        if let Ok(item) = feed.recv_async().await {
            return item;
        }
    }
    std::future::pending().await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

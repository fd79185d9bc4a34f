//! The dispatcher: the one owner of routing state. It pops the priority queue, stamps each
//! symbol's `seq` as ticks leave it, serializes each tick once, and offers the shared bytes to
//! every matching client's bounded outbound queue without ever awaiting a client. Connections
//! talk to it only through [`Command`]s, so subscribe/unsubscribe acks are ordered with the
//! ticks around them. Accepted ticks then go on to the sink (the store) or, without one, have
//! their producer acks settled here.

pub mod delivery;
pub mod filter;
pub mod latency;
pub mod outbound;
pub mod recent;
pub mod registry;
pub mod sink;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use slab::Slab;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::delivery::{Delivery, Outcome, SmartThresholds, Tally};
use self::filter::Filter;
use self::outbound::{Frame, Outbound};
use self::recent::RecentTicks;
use self::registry::{ClientKey, Registry};
pub use self::sink::{StoreSink, TickSink};
use crate::config::Config;
use crate::dlq::{DeadLetter, DeadLetters};
use crate::protocol::{self, close, ErrorCode, Settings};
use crate::queue::{PriorityQueue, Queued};
use crate::store::{History, Store};
use crate::tick::{now_ms, Symbol, Tick};

/// A request to the dispatcher.
#[derive(Debug)]
pub enum Command {
    /// A new connection; the reply is its key for later commands.
    Register {
        /// Its outbound queue.
        out: Outbound,
        /// Receives the key.
        reply: oneshot::Sender<ClientKey>,
    },
    /// The connection has gone.
    Deregister {
        /// Whose.
        key: ClientKey,
    },
    /// `subscribe`
    Subscribe {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// Symbols as sent.
        symbols: Vec<String>,
        /// Connection-wide settings.
        settings: Settings,
        /// Last N ticks per symbol.
        history: usize,
        /// Resume points.
        since_seq: HashMap<String, u64>,
    },
    /// `unsubscribe`
    Unsubscribe {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// Symbols as sent.
        symbols: Vec<String>,
    },
    /// `configure`
    Configure {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// New settings.
        settings: Settings,
    },
    /// `symbols` from a client: answered on its queue.
    ClientSymbols {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
    },
    /// A snapshot page read from the store (sent by the dispatcher's own reader task).
    SnapshotLoaded {
        /// What was read.
        read: SnapshotRead,
        /// The read's outcome.
        result: Result<History, String>,
    },
    /// `/api/symbols`
    ListSymbols {
        /// Receives the list.
        reply: oneshot::Sender<Vec<SymbolInfo>>,
    },
}

/// One snapshot read in progress for one client and symbol.
#[derive(Debug, Clone)]
pub struct SnapshotRead {
    key: ClientKey,
    /// Which registration of that key asked (keys are reused).
    serial: u64,
    symbol: Symbol,
    history: usize,
    /// Resume point; advanced page by page.
    since: Option<u64>,
    page: u32,
}

/// Store reads one snapshot may take before giving up on joining the ring (and saying `gap`).
const MAX_SNAPSHOT_PAGES: u32 = 1_000;

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
    /// Receive-to-dispatch percentiles over the last few seconds.
    pub latency: parking_lot::Mutex<latency::LatencySummary>,
}

/// A handle for sending commands.
#[derive(Debug, Clone)]
pub struct DispatcherHandle {
    tx: flume::Sender<Command>,
}

impl DispatcherHandle {
    /// Sends a command, waiting while the dispatcher's command queue is full.
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn send(&self, cmd: Command) -> Result<(), DispatcherGone> {
        self.tx.send_async(cmd).await.map_err(|_| DispatcherGone)
    }

    /// Registers a connection.
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn register(&self, out: Outbound) -> Result<ClientKey, DispatcherGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Register { out, reply }).await?;
        rx.await.map_err(|_| DispatcherGone)
    }

    /// Lists known symbols.
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn symbols(&self) -> Result<Vec<SymbolInfo>, DispatcherGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListSymbols { reply }).await?;
        rx.await.map_err(|_| DispatcherGone)
    }

    /// Tells the dispatcher a connection has gone, without waiting.
    pub fn deregister(&self, key: ClientKey) {
        // If the command queue is full, fall back to a task so the entry is still removed.
        if let Err(flume::TrySendError::Full(cmd)) = self.tx.try_send(Command::Deregister { key }) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send_async(cmd).await;
            });
        }
    }
}

/// The dispatcher has stopped (server shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("dispatcher stopped")]
pub struct DispatcherGone;

struct Client {
    /// Distinguishes registrations that reuse a slab key.
    serial: u64,
    /// Symbols whose snapshot is being read from the store: live ticks wait in the ring.
    awaiting: HashSet<Symbol>,
    out: Outbound,
    /// Detached by the dispatcher (slow consumer, gone): no more delivery or commands.
    detached: bool,
    symbols: HashSet<Symbol>,
    wildcard: bool,
    filter: Filter,
    delivery: Delivery,
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
}

/// Commands handled per loop turn before looking at the queue again.
const COMMAND_CHUNK: usize = 64;
/// Ticks per snapshot message.
const SNAPSHOT_CHUNK: usize = 500;

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
        };
        (dispatcher, DispatcherHandle { tx })
    }

    /// Reads snapshots older than the in-memory ring from `store`.
    #[must_use]
    pub fn with_store(mut self, store: Store) -> Self {
        self.store = Some(store);
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
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = self.commands.recv_async() => match cmd {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                },
                () = self.queue.wait_ready() => {}
                () = sleep_until(next_timer) => {}
            }
        }
        while self.dispatch_round().await {}
        for (_, client) in &self.clients {
            client.out.kill(close::GOING_AWAY);
        }
        self.sink
    }

    /// One bounded round from the queue. Returns whether anything was taken.
    async fn dispatch_round(&mut self) -> bool {
        let drained = self.queue.drain_round(Instant::now());
        if drained.ready.is_empty() && drained.expired.is_empty() {
            return false;
        }
        if !drained.expired.is_empty() {
            self.expire(drained.expired);
        }
        let now = Instant::now();
        let now_us = crate::tick::now_us();
        let mut tally = Tally::default();
        let mut gone = Vec::new();
        let mut done = Vec::with_capacity(drained.ready.len());
        for mut item in drained.ready {
            let waited = now_us - item.tick.t_in;
            self.window.record(waited);
            if let Some(h) = &self.latency {
                #[allow(clippy::cast_precision_loss)]
                h.record(waited.max(0) as f64 / 1e6);
            }
            let frame = self.stamp(&mut item.tick);
            self.fan_out(&item.tick, &frame, now, &mut tally, &mut gone);
            done.push((item, frame));
        }
        self.stats
            .dispatched
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        self.record(tally);
        for (key, code) in gone {
            self.drop_client(key, code);
        }
        self.sink.accept(done).await;
        true
    }

    /// Assigns the next seq and serializes the tick once.
    fn stamp(&mut self, tick: &mut Tick) -> Frame {
        let state = self
            .symbols
            .entry(tick.symbol.clone())
            .or_insert_with(|| SymbolState {
                seq: 0,
                price: tick.price,
                ts: tick.ts,
                recent: RecentTicks::default(),
            });
        state.seq += 1;
        state.price = tick.price;
        state.ts = tick.ts;
        tick.seq = state.seq;
        let frame = Frame::from(tick.to_json());
        state.recent.push(tick.seq, frame.clone(), self.recent_cap);
        frame
    }

    fn fan_out(
        &mut self,
        tick: &Tick,
        frame: &Frame,
        now: Instant,
        tally: &mut Tally,
        gone: &mut Vec<(ClientKey, u16)>,
    ) {
        let clients = &mut self.clients;
        let timers = &mut self.timers;
        let smart = self.smart;
        self.registry.for_each_subscriber(&tick.symbol, |key| {
            let Some(client) = clients.get_mut(key) else {
                return;
            };
            if !client.filter.matches(tick)
                || (!client.awaiting.is_empty() && client.awaiting.contains(&tick.symbol))
            {
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
        self.record(tally);
        for (key, code) in gone {
            self.drop_client(key, code);
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
        for symbol in client.symbols.drain() {
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
            client.out.kill(code);
        }
    }

    fn deregister(&mut self, key: ClientKey) {
        self.drop_client(key, 0);
        if self.clients.try_remove(key).is_some() {
            self.stats.clients.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn handle(&mut self, cmd: Command) {
        let detached = |key: ClientKey| self.clients.get(key).is_none_or(|c| c.detached);
        match &cmd {
            Command::Subscribe { key, .. }
            | Command::Unsubscribe { key, .. }
            | Command::Configure { key, .. }
            | Command::ClientSymbols { key, .. }
                if detached(*key) =>
            {
                return;
            }
            _ => {}
        }
        match cmd {
            Command::Register { out, reply } => {
                self.next_serial += 1;
                let key = self.clients.insert(Client {
                    serial: self.next_serial,
                    awaiting: HashSet::new(),
                    out,
                    detached: false,
                    symbols: HashSet::new(),
                    wildcard: false,
                    filter: Filter::default(),
                    delivery: Delivery::new(self.default_interval),
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
            } => self.subscribe(key, id, &symbols, &settings, history, &since_seq),
            Command::Unsubscribe { key, id, symbols } => self.unsubscribe(key, id, &symbols),
            Command::Configure { key, id, settings } => {
                if self.clients.contains(key) {
                    self.apply_settings(key, &settings);
                    let mode = self.clients[key].delivery.mode();
                    self.reply(
                        key,
                        &json!({"type":"ack","id":id,"op":"configure","mode":mode}),
                    );
                }
            }
            Command::ClientSymbols { key, id } => {
                let list = self.symbol_list();
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
        if let Some(client) = self.clients.get(key) {
            if client
                .out
                .push_control(Frame::from(msg.to_string()))
                .is_err()
            {
                self.drop_client(key, close::SLOW_CONSUMER);
            }
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

    fn subscribe(
        &mut self,
        key: ClientKey,
        id: Option<Value>,
        requested: &[String],
        settings: &Settings,
        history: usize,
        since_seq: &HashMap<String, u64>,
    ) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        let mut accepted: Vec<Symbol> = Vec::new();
        let mut wildcard = false;
        let mut rejected = Vec::new();
        for name in requested {
            if name == "*" {
                wildcard = true;
            } else if let Some(sym) = Symbol::parse(name) {
                if !accepted.contains(&sym) {
                    accepted.push(sym);
                }
            } else {
                rejected.push(json!({"symbol": name, "code": ErrorCode::InvalidSymbol.as_str()}));
            }
        }
        let new_count = accepted
            .iter()
            .filter(|s| !client.symbols.contains(*s))
            .count()
            + usize::from(wildcard && !client.wildcard);
        let total = client.symbols.len() + usize::from(client.wildcard) + new_count;
        if total > self.max_symbols {
            self.stats.too_many_symbols.fetch_add(1, Ordering::Relaxed);
            let msg = protocol::error_message(
                id.as_ref(),
                ErrorCode::TooManySymbols,
                &format!(
                    "subscription would hold {total} symbols; the limit is {} per connection",
                    self.max_symbols
                ),
                None,
            );
            if client.out.push_control(Frame::from(msg)).is_err() {
                self.drop_client(key, close::SLOW_CONSUMER);
            }
            return;
        }
        self.apply_settings(key, settings);
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        for sym in &accepted {
            if client.symbols.insert(sym.clone()) {
                self.registry.add(sym, key);
            }
        }
        if wildcard {
            client.wildcard = true;
            self.registry.add_wildcard(key);
        }
        let mut last_seq = serde_json::Map::new();
        for sym in &accepted {
            let seq = self.symbols.get(sym).map_or(0, |s| s.seq);
            last_seq.insert(sym.to_string(), seq.into());
        }
        let mut names: Vec<Value> = accepted.iter().map(|s| s.as_str().into()).collect();
        if wildcard {
            names.push("*".into());
        }
        let mode = client.delivery.mode();
        let ack = json!({
            "type": "ack", "id": id, "op": "subscribe", "symbols": names,
            "rejected": rejected, "last_seq": last_seq, "mode": mode,
        });
        self.reply(key, &ack);
        // Snapshots: from the dispatcher's ring, so they join live delivery with no gap.
        let mut wanted: Vec<(Symbol, Option<u64>)> = Vec::new();
        for sym in &accepted {
            match since_seq.get(sym.as_str()) {
                Some(s) => wanted.push((sym.clone(), Some(*s))),
                None if history > 0 => wanted.push((sym.clone(), None)),
                None => {}
            }
        }
        if wildcard {
            // Every known symbol comes through `*`: resume points and history apply to them too.
            for sym in self.symbols.keys() {
                if accepted.contains(sym) {
                    continue;
                }
                match since_seq.get(sym.as_str()) {
                    Some(s) => wanted.push((sym.clone(), Some(*s))),
                    None if history > 0 => wanted.push((sym.clone(), None)),
                    None => {}
                }
            }
        }
        for (sym, since) in wanted {
            self.send_snapshot(key, &sym, history, since);
        }
    }

    /// Answers `history`/`since_seq` for one symbol: from the ring when it reaches back far
    /// enough, else from the store in the background while live ticks of that symbol wait in
    /// the ring (the client's delivery of it is paused until the snapshot has joined the ring).
    fn send_snapshot(
        &mut self,
        key: ClientKey,
        symbol: &Symbol,
        history: usize,
        since: Option<u64>,
    ) {
        let covered = match self.symbols.get(symbol) {
            None => true,
            Some(state) => match since {
                Some(s) => s >= state.seq || state.recent.first_seq().is_some_and(|f| f <= s + 1),
                None => {
                    state.recent.len()
                        >= history.min(usize::try_from(state.seq).unwrap_or(usize::MAX))
                }
            },
        };
        if covered || self.store.is_none() {
            let (frames, gap) = self.ring_snapshot(symbol, history, since, 0);
            self.push_snapshot(key, symbol, &frames, gap);
            return;
        }
        if let Some(client) = self.clients.get_mut(key) {
            client.awaiting.insert(symbol.clone());
            let read = SnapshotRead {
                key,
                serial: client.serial,
                symbol: symbol.clone(),
                history,
                since,
                page: 0,
            };
            self.read_store(read, false);
        }
    }

    /// Reads one page of a snapshot from the store off the runtime; the result comes back as
    /// `Command::SnapshotLoaded`. `flush` first waits for ticks already handed to the store, so
    /// a follow-up read reaches the ring.
    fn read_store(&self, read: SnapshotRead, flush: bool) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let tx = self.self_tx.clone();
        let limit = if read.since.is_some() {
            self.max_replay
        } else {
            read.history
        };
        let since = read.since;
        tokio::task::spawn_blocking(move || {
            let result = (if flush {
                store.flush_blocking()
            } else {
                Ok(())
            })
            .and_then(|()| store.history(read.symbol.as_str(), limit, since))
            .map_err(|e| e.to_string());
            let _ = tx.send(Command::SnapshotLoaded { read, result });
        });
    }

    /// Ring ticks for a snapshot, only those with seq > `after`; and whether the ring misses
    /// ticks the request needs.
    fn ring_snapshot(
        &self,
        symbol: &Symbol,
        history: usize,
        since: Option<u64>,
        after: u64,
    ) -> (Vec<Frame>, bool) {
        let Some(state) = self.symbols.get(symbol) else {
            return (Vec::new(), false);
        };
        match since {
            Some(s) => {
                let from = s.max(after);
                let frames: Vec<Frame> = state.recent.after(from).map(|(_, f)| f.clone()).collect();
                let gap = from < state.seq
                    && state
                        .recent
                        .first_seq()
                        .is_none_or(|first| first > from + 1);
                (frames, gap)
            }
            None => {
                let frames = state
                    .recent
                    .last_n(history)
                    .filter(|(seq, _)| *seq > after)
                    .map(|(_, f)| f.clone())
                    .collect();
                (frames, false)
            }
        }
    }

    /// One store page is back. A resume (`since_seq`) sends it and pages on until the stored
    /// part reaches the ring, so a long backlog arrives as several snapshot messages with no
    /// hole; a `history` read is retried (after a flush) until it joins the ring. Then the ring
    /// tail is added and live delivery of the symbol resumes.
    fn snapshot_loaded(&mut self, read: SnapshotRead, result: Result<History, String>) {
        let key = read.key;
        match self.clients.get(key) {
            Some(c) if c.serial == read.serial && !c.detached => {}
            _ => return,
        }
        let symbol = &read.symbol;
        let stored = match result {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, %symbol, "snapshot read failed");
                let msg = protocol::error_message(
                    None,
                    ErrorCode::Internal,
                    &format!("snapshot of {symbol} failed"),
                    None,
                );
                self.reply_text(key, msg);
                let (frames, _) = self.ring_snapshot(symbol, read.history, read.since, 0);
                self.finish_snapshot(&read, &frames, true);
                return;
            }
        };
        let n = stored.ticks.len() as u64;
        // Seqs are consecutive per symbol, so the stored part ends at a computable seq.
        let (stored_last, gap) = match read.since {
            Some(s) => {
                let start = stored.first_seq.map_or(s + 1, |f| f.max(s + 1));
                let gap = read.page == 0 && stored.first_seq.is_some_and(|f| f > s + 1);
                (if n == 0 { s } else { start + n - 1 }, gap)
            }
            None => (stored.last_seq, false),
        };
        let current = self.symbols.get(symbol).map_or(0, |s| s.seq);
        let ring_next = self
            .symbols
            .get(symbol)
            .and_then(|s| s.recent.after(stored_last).next().map(|(seq, _)| *seq));
        let joined = stored_last >= current || ring_next == Some(stored_last + 1);
        let mut frames: Vec<Frame> = stored
            .ticks
            .into_iter()
            .filter_map(|b| Frame::try_from(b).ok())
            .collect();
        if !joined && read.page < MAX_SNAPSHOT_PAGES {
            let mut next = read;
            if next.since.is_some() {
                // Send this page now and read on from where it ended.
                if !frames.is_empty() || next.page == 0 {
                    self.push_snapshot(key, &next.symbol, &frames, gap);
                }
                if self
                    .clients
                    .get(key)
                    .is_none_or(|c| c.detached || c.out.queued_bytes() > c.out.byte_limit())
                {
                    // It cannot take the backlog: the slow-consumer rule (it can resume later).
                    self.drop_client(key, close::SLOW_CONSUMER);
                    return;
                }
                next.since = Some(stored_last);
            }
            next.page += 1;
            // A full page means more is stored; a short one means the store is behind the ring.
            let flush = n < if next.since.is_some() {
                self.max_replay as u64
            } else {
                u64::MAX
            };
            self.read_store(next, flush);
            return;
        }
        let (ring, _) = self.ring_snapshot(symbol, read.history, read.since, stored_last);
        frames.extend(ring);
        if read.since.is_none() && frames.len() > read.history {
            frames.drain(..frames.len() - read.history);
        }
        self.finish_snapshot(&read, &frames, gap || !joined);
    }

    /// Sends the last snapshot part (unless earlier pages already said everything) and resumes
    /// live delivery of the symbol.
    fn finish_snapshot(&mut self, read: &SnapshotRead, frames: &[Frame], gap: bool) {
        let said_before = read.since.is_some() && read.page > 0;
        if !frames.is_empty() || gap || !said_before {
            self.push_snapshot(read.key, &read.symbol, frames, gap);
        }
        if let Some(client) = self.clients.get_mut(read.key) {
            client.awaiting.remove(&read.symbol);
        }
    }

    fn reply_text(&mut self, key: ClientKey, text: String) {
        if let Some(client) = self.clients.get(key) {
            if client.out.push_control(Frame::from(text)).is_err() {
                self.drop_client(key, close::SLOW_CONSUMER);
            }
        }
    }

    /// Sends snapshot messages (chunked; `gap` on the first).
    fn push_snapshot(&mut self, key: ClientKey, symbol: &Symbol, frames: &[Frame], gap: bool) {
        let Some(client) = self.clients.get(key) else {
            return;
        };
        let chunks: Vec<&[Frame]> = if frames.is_empty() {
            vec![&[][..]]
        } else {
            frames.chunks(SNAPSHOT_CHUNK).collect()
        };
        let mut failed = false;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut text =
                String::with_capacity(64 + chunk.iter().map(|f| f.len() + 1).sum::<usize>());
            text.push_str(r#"{"type":"snapshot","symbol":"#);
            text.push_str(&serde_json::to_string(symbol.as_str()).unwrap_or_default());
            text.push_str(r#","ticks":["#);
            for (j, f) in chunk.iter().enumerate() {
                if j > 0 {
                    text.push(',');
                }
                text.push_str(f.as_str());
            }
            text.push_str(r#"],"gap":"#);
            text.push_str(if i == 0 && gap { "true" } else { "false" });
            text.push('}');
            if client.out.push_control(Frame::from(text)).is_err() {
                failed = true;
                break;
            }
        }
        if failed {
            self.drop_client(key, close::SLOW_CONSUMER);
        }
    }

    fn unsubscribe(&mut self, key: ClientKey, id: Option<Value>, requested: &[String]) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let mut removed = Vec::new();
        for name in requested {
            if name == "*" {
                if client.wildcard {
                    client.wildcard = false;
                    self.registry.remove_wildcard(key);
                }
                removed.push(Value::from("*"));
            } else if let Some(sym) = Symbol::parse(name) {
                if client.symbols.remove(&sym) {
                    self.registry.remove(&sym, key);
                }
                removed.push(Value::from(sym.as_str()));
            }
        }
        if !client.wildcard {
            let still = &client.symbols;
            client.delivery.retain(|s| still.contains(s));
        }
        self.reply(
            key,
            &json!({"type":"ack","id":id,"op":"unsubscribe","symbols":removed}),
        );
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

//! Property tests of the dispatcher as a whole: a real dispatcher task with a real redb store
//! (in a temp dir) and a tiny ring and outbound buffer, driven by random interleavings of
//! ticks (some critical), subscribes in every mode with `history` or `since_seq`, and slow or
//! stalled drains. Whatever happens, each client sees each symbol's seqs strictly increasing
//! (a subscribe that asks for a replay starts that symbol over, after its ack).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::outbound::{channel, Frame, OutboundReceiver};
use super::{Command, DispatchStats, Dispatcher, DispatcherHandle, StoreSink};
use crate::config::Config;
use crate::dlq::DeadLetters;
use crate::protocol::{Mode, Settings};
use crate::queue::{PriorityQueue, Queued};
use crate::store::Store;
use crate::tick::{Priority, Symbol, Tick};

const SYMBOLS: [&str; 3] = ["A", "B", "C"];
const CLIENTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Publish {
        symbol: usize,
        n: u32,
        critical: bool,
    },
    Subscribe {
        client: usize,
        symbols: Vec<usize>,
        mode: Mode,
        history: usize,
        since: Option<u64>,
    },
    Drain {
        client: usize,
        budget: usize,
    },
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    let mode = prop_oneof![
        Just(Mode::Realtime),
        Just(Mode::Batch),
        Just(Mode::Throttled),
        Just(Mode::Smart)
    ];
    prop_oneof![
        4 => (0..SYMBOLS.len(), 1..40u32, any::<bool>()).prop_map(|(symbol, n, c)| {
            Op::Publish { symbol, n, critical: c && n % 3 == 0 }
        }),
        2 => (
            0..CLIENTS,
            proptest::collection::vec(0..SYMBOLS.len(), 1..3),
            mode,
            prop_oneof![Just(0usize), 1..30usize],
            proptest::option::of(0..60u64),
        )
            .prop_map(|(client, symbols, mode, history, since)| Op::Subscribe {
                client,
                symbols,
                mode,
                history,
                since,
            }),
        4 => (0..CLIENTS, prop_oneof![Just(0usize), 1..600usize, Just(1 << 20)])
            .prop_map(|(client, budget)| Op::Drain { client, budget }),
        1 => Just(Op::Settle),
    ]
}

/// What one client has seen.
#[derive(Default)]
struct Seen {
    last: HashMap<String, u64>,
    /// Subscribe id -> symbols whose replay restarts their seqs after its ack.
    restarts: HashMap<u64, Vec<String>>,
}

impl Seen {
    fn check(&mut self, rx: &OutboundReceiver, budget: usize) -> Result<(), TestCaseError> {
        let mut frames = Vec::new();
        rx.drain(budget, |f| frames.push(f));
        // A run of realtime ticks carries several messages; each is checked.
        for text in frames.iter().flat_map(Frame::texts) {
            let v: Value = serde_json::from_str(text).expect("server JSON");
            let ticks: Vec<&Value> = match v["type"].as_str() {
                Some("tick") => vec![&v],
                Some("batch" | "snapshot") => v["ticks"].as_array().unwrap().iter().collect(),
                Some("ack") => {
                    if let Some(syms) = v["id"].as_u64().and_then(|id| self.restarts.remove(&id)) {
                        for s in syms {
                            self.last.remove(&s);
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            for t in ticks {
                let symbol = t["symbol"].as_str().unwrap().to_owned();
                let seq = t["seq"].as_u64().unwrap();
                let last = self.last.entry(symbol.clone()).or_insert(0);
                prop_assert!(seq > *last, "{symbol}: seq {seq} after {last} in {v}");
                *last = seq;
            }
        }
        Ok(())
    }
}

struct Harness {
    queue: Arc<PriorityQueue>,
    handle: DispatcherHandle,
    clients: Vec<(usize, OutboundReceiver)>,
    seen: Vec<Seen>,
    next_id: u64,
    price: f64,
}

impl Harness {
    fn publish(&mut self, symbol: usize, n: u32, critical: bool) {
        for i in 0..n {
            self.price += 0.01;
            let mut tick = Tick::new(
                Symbol::parse(SYMBOLS[symbol]).unwrap(),
                crate::tick::now_ms(),
                self.price,
                1.0,
            );
            if critical && i % 2 == 0 {
                tick.priority = Priority::Critical;
            }
            let queued = Queued {
                tick,
                ack: None,
                index: 0,
                enqueued: Instant::now(),
            };
            // A full queue refuses: that is the producer's backpressure, not a loss here.
            let _ = self.queue.push(queued);
        }
    }

    async fn subscribe(
        &mut self,
        client: usize,
        symbols: &[usize],
        mode: Mode,
        history: usize,
        since: Option<u64>,
    ) {
        self.next_id += 1;
        let id = self.next_id;
        let names: Vec<String> = symbols.iter().map(|s| SYMBOLS[*s].to_owned()).collect();
        let since_seq: HashMap<String, u64> = since
            .map(|s| names.iter().map(|n| (n.clone(), s)).collect())
            .unwrap_or_default();
        if history > 0 || since.is_some() {
            self.seen[client].restarts.insert(id, names.clone());
        }
        let cmd = Command::Subscribe {
            key: self.clients[client].0,
            id: Some(id.into()),
            symbols: names,
            settings: Settings {
                mode: Some(mode),
                interval_ms: Some(2),
                min_quality: None,
                min_volume: None,
            },
            history,
            since_seq,
        };
        self.handle.send(cmd).await.unwrap();
    }
}

fn run_case(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.store.dir = dir.path().to_path_buf();
        config.limits.outbound_buffer_bytes = 2048;
        config.dispatch.recent_ticks = 4;
        config.dispatch.min_interval_ms = 1;
        config.dispatch.max_replay_ticks = 8;
        let (store, _) = Store::open(&config.store).unwrap();
        let queue = Arc::new(PriorityQueue::new(&config.queue));
        let (dispatcher, handle) = Dispatcher::new(
            &config,
            queue.clone(),
            StoreSink(store.clone()),
            Arc::new(DeadLetters::new(16)),
            Arc::new(DispatchStats::default()),
            Vec::new(),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(dispatcher.with_store(store.clone()).run(stop.clone()));
        let mut h = Harness {
            queue,
            handle: handle.clone(),
            clients: Vec::new(),
            seen: (0..CLIENTS).map(|_| Seen::default()).collect(),
            next_id: 0,
            price: 1.0,
        };
        for _ in 0..CLIENTS {
            let (out, rx) = channel(config.dispatch.outbound_messages, 2048);
            let key = handle.register(out, None).await.unwrap();
            h.clients.push((key, rx));
        }
        for op in ops {
            match op {
                Op::Publish {
                    symbol,
                    n,
                    critical,
                } => h.publish(symbol, n, critical),
                Op::Subscribe {
                    client,
                    symbols,
                    mode,
                    history,
                    since,
                } => h.subscribe(client, &symbols, mode, history, since).await,
                Op::Drain { client, budget } => {
                    let rx = &h.clients[client].1;
                    h.seen[client].check(rx, budget)?;
                }
                Op::Settle => tokio::time::sleep(Duration::from_millis(3)).await,
            }
            tokio::task::yield_now().await;
        }
        // Let replays and timers finish while everyone reads.
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            for (client, (_, rx)) in h.clients.iter().enumerate() {
                h.seen[client].check(rx, 1 << 20)?;
            }
        }
        stop.cancel();
        let _ = task.await;
        drop(store);
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn seq_strictly_increases_per_client_and_symbol_in_every_mode(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        run_case(ops)?;
    }
}

//! Store benchmarks on a real redb file: append throughput through the writer thread with
//! durable group commit (every transaction fdatasyncs before the next flush returns), and
//! `history(symbol, 100, None)` read latency, with p50/p99 printed from individual timings
//! because Criterion reports means.
//!
//! `cargo bench --bench store -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickfan::config::StoreConfig;
use tickfan::store::{Store, StoredTick};
use tickfan::tick::{Priority, Symbol, Tick};

/// Ticks per `append` call, like a busy dispatcher's batch.
const BATCH: usize = 1_000;
/// Symbols the appended ticks are spread over.
const SYMBOLS: usize = 50;

/// Generates well-formed ticks with increasing per-symbol seqs and serializes them as the
/// dispatcher would.
struct Gen {
    symbols: Vec<Symbol>,
    seqs: Vec<u64>,
    ts: i64,
    n: u64,
}

impl Gen {
    fn new(prefix: &str) -> Self {
        Self {
            symbols: (0..SYMBOLS)
                .map(|i| Symbol::parse(&format!("{prefix}{i}")).unwrap())
                .collect(),
            seqs: vec![0; SYMBOLS],
            ts: 1_700_000_000_000,
            n: 0,
        }
    }

    fn batch(&mut self, len: usize) -> Vec<StoredTick> {
        (0..len)
            .map(|_| {
                self.n += 1;
                self.ts += 1;
                #[allow(clippy::cast_possible_truncation)]
                let i = (self.n % SYMBOLS as u64) as usize;
                self.seqs[i] += 1;
                #[allow(clippy::cast_precision_loss)]
                let price = 100.0 + (self.n % 1_000) as f64 * 0.01;
                let tick = Tick {
                    symbol: self.symbols[i].clone(),
                    ts: self.ts,
                    price,
                    volume: 10.0,
                    bid: Some(price - 0.01),
                    ask: Some(price + 0.01),
                    open: None,
                    high: None,
                    low: None,
                    close: None,
                    id: None,
                    priority: Priority::Normal,
                    quality: 100,
                    t_in: self.ts * 1_000,
                    seq: self.seqs[i],
                };
                StoredTick::new(tick, None)
            })
            .collect()
    }
}

fn open(dir: &std::path::Path) -> Store {
    let cfg = StoreConfig {
        dir: dir.to_owned(),
        // Retention off: the bench measures the ingest path alone.
        retention_interval_ms: 0,
        ..StoreConfig::default()
    };
    Store::open(&cfg).unwrap().0
}

fn bench_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut g = Gen::new("S");
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(BATCH as u64));
    // Reference: the cost of building a batch (done by the dispatcher in the server, on the
    // bench thread here, concurrently with the writer thread).
    group.bench_function("make_batch_1000", |b| b.iter(|| black_box(g.batch(BATCH))));
    group.bench_function("append_durable_batch_1000", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                store.append_blocking(g.batch(BATCH)).unwrap();
            }
            // Counted only once everything is durably committed.
            store.flush_blocking().unwrap();
            start.elapsed()
        });
    });
    group.finish();
    let stats = store.stats();
    #[allow(clippy::cast_precision_loss)]
    let per_commit = stats.ticks_committed as f64 / stats.commits.max(1) as f64;
    println!(
        "append: {} ticks in {} durable commits ({per_commit:.0} ticks/commit)",
        stats.ticks_committed, stats.commits
    );
    store.close().unwrap();
}

fn percentiles(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((samples.len() as f64 * p) as usize).min(samples.len() - 1);
        samples[i]
    };
    println!(
        "{label}: n={} p50={:?} p99={:?} p99.9={:?} max={:?}",
        samples.len(),
        at(0.50),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}

fn bench_history(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut g = Gen::new("H");
    // 50 symbols x 4,000 ticks stored.
    for _ in 0..200 {
        store.append_blocking(g.batch(BATCH)).unwrap();
    }
    store.flush_blocking().unwrap();
    let sym = "H7";
    assert_eq!(store.history(sym, 100, None).unwrap().ticks.len(), 100);

    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    group.bench_function("history_100", |b| {
        b.iter(|| black_box(store.history(black_box(sym), 100, None).unwrap()));
    });
    group.bench_function("history_100_since", |b| {
        b.iter(|| black_box(store.history(black_box(sym), 100, Some(1_000)).unwrap()));
    });
    group.finish();

    let sample = |n: usize| {
        (0..n)
            .map(|_| {
                let t = Instant::now();
                black_box(store.history(sym, 100, None).unwrap());
                t.elapsed()
            })
            .collect::<Vec<_>>()
    };
    percentiles("history(100) idle", sample(20_000));

    // The same while the writer commits batches as fast as it can on the other core.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut g = Gen::new("W");
            while !stop.load(Ordering::Relaxed) {
                store.append_blocking(g.batch(BATCH)).unwrap();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    percentiles("history(100) during ingest", sample(20_000));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    store.close().unwrap();
}

criterion_group!(benches, bench_append, bench_history);
criterion_main!(benches);

//! Upstream feeds, the per-message CPU path of one connector (src/feed/): a Binance trade
//! message normalized (serde borrow parse, checks, gap tracking) and written as tick JSON,
//! and the same for a batch of 512 messages followed by `Ingestor::ingest_frame` (parse,
//! validate, dedup, quality, enqueue) — what one connector task does per batch, minus the
//! socket. docs/benchmarks.md, "Upstream feeds".
//!
//! Times are the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the
//! machine is shared, and CPU time is what "ticks/s on one core" means whatever else runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickfan::config::{QueueConfig, UpstreamKind, ValidationConfig};
use tickfan::dlq::DeadLetters;
use tickfan::feed::connector::write_tick;
use tickfan::feed::normalize::{normalize, Emit, Gap, Garbage, SourceState, Symbols, Trade};
use tickfan::ingest::Ingestor;
use tickfan::queue::PriorityQueue;
use tickfan::tick::now_ms;

const SYMBOLS: [&str; 10] = [
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT",
    "DOTUSDT", "LTCUSDT",
];

const QUOTED: [(&str, &str); 10] = [
    ("BTCUSDT", "\"BTCUSDT\""),
    ("ETHUSDT", "\"ETHUSDT\""),
    ("BNBUSDT", "\"BNBUSDT\""),
    ("SOLUSDT", "\"SOLUSDT\""),
    ("XRPUSDT", "\"XRPUSDT\""),
    ("ADAUSDT", "\"ADAUSDT\""),
    ("DOGEUSDT", "\"DOGEUSDT\""),
    ("TRXUSDT", "\"TRXUSDT\""),
    ("DOTUSDT", "\"DOTUSDT\""),
    ("LTCUSDT", "\"LTCUSDT\""),
];

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a local timespec.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    #[allow(clippy::cast_sign_loss)]
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn messages(n: usize, first_id: u64) -> Vec<String> {
    let ts = now_ms();
    (0..n)
        .map(|i| {
            let id = first_id + i as u64;
            format!(
                r#"{{"e":"trade","E":{ts},"s":"{}","t":{id},"p":"{}.{:02}","q":"0.{:04}","T":{ts},"m":true,"M":true}}"#,
                SYMBOLS[i % SYMBOLS.len()],
                60_000 + i % 97,
                i % 100,
                1 + i % 9_999
            )
        })
        .collect()
}

/// Writes each trade as tick JSON into one frame, as the connector does.
struct Frame(String, usize);

impl Frame {
    /// Normalizes `msgs` into a fresh frame `[...]`.
    fn fill(&mut self, msgs: &[String], symbols: &Symbols, state: &mut SourceState) {
        self.0.clear();
        self.0.push('[');
        self.1 = 0;
        for m in msgs {
            normalize(UpstreamKind::Binance, m, 16, symbols, state, self).unwrap();
        }
        self.0.push(']');
    }
}

impl Emit for Frame {
    fn trade(&mut self, t: Trade<'_>) {
        if self.1 > 0 {
            self.0.push(',');
        }
        self.1 += 1;
        // The connector's symbol lookup: the tickfan name as a JSON literal.
        let sym = QUOTED
            .iter()
            .find(|(s, _)| *s == t.symbol)
            .map_or("\"?\"", |(_, q)| q);
        write_tick(&mut self.0, sym, &t);
    }
    fn garbage(&mut self, g: Garbage) {
        panic!("{g}");
    }
    fn gap(&mut self, _: Gap) {}
}

fn normalize_only(c: &mut Criterion) {
    let symbols = Symbols::new(&SYMBOLS.map(String::from));
    let msgs = messages(512, 1);
    let mut group = c.benchmark_group("feed_normalize");
    group.throughput(Throughput::Elements(msgs.len() as u64));
    group.bench_function("binance_512_messages_to_tick_json", |b| {
        let mut state = SourceState::default();
        let mut frame = Frame(String::with_capacity(512 * 128), 0);
        b.iter_custom(|iters| {
            let start = thread_cpu();
            for _ in 0..iters {
                frame.fill(&msgs, &symbols, &mut state);
                black_box(frame.0.len());
            }
            thread_cpu() - start
        });
    });
    group.finish();
}

fn normalize_and_ingest(c: &mut Criterion) {
    let symbols = Symbols::new(&SYMBOLS.map(String::from));
    let mut group = c.benchmark_group("feed_normalize_ingest");
    group.throughput(Throughput::Elements(512));
    group.bench_function("binance_512_messages_through_ingest", |b| {
        b.iter_custom(|iters| {
            let queue = Arc::new(PriorityQueue::new(&QueueConfig {
                capacity: 1 << 20,
                ..QueueConfig::default()
            }));
            let ingestor = Ingestor::new(
                ValidationConfig::default(),
                queue.clone(),
                Arc::new(DeadLetters::new(1_000)),
            );
            // Fresh ids each batch: every tick is new to dedup, as in a live feed.
            let batches: Vec<Vec<String>> =
                (0..iters).map(|i| messages(512, 1 + i * 512)).collect();
            let mut state = SourceState::default();
            let mut frame = Frame(String::with_capacity(512 * 128), 0);
            let start = thread_cpu();
            for batch in &batches {
                frame.fill(batch, &symbols, &mut state);
                let report = ingestor.ingest_frame(frame.0.as_bytes());
                assert_eq!(report.accepted, 512);
                // Keep the queue from filling, as the dispatcher would (its pops are timed
                // too; they are cheap next to ingest).
                if queue.depth() > 400_000 {
                    while queue.depth() > 0 {
                        drop(queue.drain_round(Instant::now()));
                    }
                }
            }
            thread_cpu() - start
        });
    });
    group.finish();
}

criterion_group!(benches, normalize_only, normalize_and_ingest);
criterion_main!(benches);

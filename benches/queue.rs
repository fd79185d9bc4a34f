//! The priority queue: push and drain per priority mix.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickfan::config::QueueConfig;
use tickfan::queue::{PriorityQueue, Queued};
use tickfan::tick::{Priority, Symbol, Tick};

fn item(priority: Priority) -> Queued {
    Queued {
        tick: Tick {
            priority,
            t_in: 1,
            ..Tick::new(Symbol::parse("BENCH").unwrap(), 1, 1.0, 1.0)
        },
        ack: None,
        index: 0,
        enqueued: Instant::now(),
    }
}

fn push_drain(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue");
    const N: u64 = 1_000;
    group.throughput(Throughput::Elements(N));
    for (name, mix) in [
        ("normal_only", [Priority::Normal; 4]),
        (
            "mixed_priorities",
            [
                Priority::Critical,
                Priority::High,
                Priority::Normal,
                Priority::Low,
            ],
        ),
    ] {
        group.bench_function(name, |b| {
            let q = PriorityQueue::new(&QueueConfig {
                capacity: 1 << 16,
                ..QueueConfig::default()
            });
            let items: Vec<Queued> = (0..N as usize).map(|i| item(mix[i % 4])).collect();
            let mut pool = Some(items);
            b.iter(|| {
                for it in pool.take().unwrap() {
                    let _ = q.push(it);
                }
                let mut back = Vec::with_capacity(N as usize);
                loop {
                    let d = q.drain_round(Instant::now());
                    if d.ready.is_empty() {
                        break;
                    }
                    back.extend(d.ready);
                }
                black_box(back.len());
                pool = Some(back);
            });
        });
    }
    group.finish();
}

criterion_group!(benches, push_drain);
criterion_main!(benches);

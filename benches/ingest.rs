//! Parse + validate + dedup + quality + enqueue per tick, through the public ingest path
//! (`Ingestor::ingest_frame`), on realistic frames of 100 ticks.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickfan::config::{QueueConfig, ValidationConfig};
use tickfan::dlq::DeadLetters;
use tickfan::ingest::parse::{parse_document, Element};
use tickfan::ingest::validate::{validate, TimeRules};
use tickfan::ingest::Ingestor;
use tickfan::queue::PriorityQueue;
use tickfan::tick::now_ms;

fn frame(n: usize, offset: usize) -> Vec<u8> {
    let ts = now_ms();
    let ticks: Vec<String> = (0..n)
        .map(|i| {
            let k = offset + i;
            format!(
                r#"{{"symbol":"SYM{}","ts":{},"price":{}.{:02},"volume":{},"bid":{}.{:02},"ask":{}.{:02}}}"#,
                k % 50,
                ts,
                100 + k % 7,
                k % 100,
                1 + k % 300,
                99 + k % 7,
                k % 100,
                101 + k % 7,
                k % 100
            )
        })
        .collect();
    format!("[{}]", ticks.join(",")).into_bytes()
}

fn parse_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_validate");
    let bytes = frame(100, 0);
    group.throughput(Throughput::Elements(100));
    let rules = TimeRules {
        now_ms: now_ms(),
        max_future_ms: 5_000,
        max_age_ms: Some(86_400_000),
    };
    let text = String::from_utf8(bytes.clone()).unwrap();
    group.bench_function("simd_json_100_ticks", |b| {
        let mut scratch = bytes.clone();
        b.iter(|| {
            scratch.copy_from_slice(&bytes);
            let parsed =
                parse_document(&mut scratch, &text, tickfan::json_depth::DEFAULT_MAX_DEPTH)
                    .unwrap();
            let mut ok = 0;
            parsed.for_each_element(|e| {
                if let Element::Object(o) = e {
                    ok += usize::from(validate(&o, rules, 1).is_ok());
                }
            });
            black_box(ok)
        });
    });
    group.finish();
}

fn ingest_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest_frame");
    group.throughput(Throughput::Elements(100));
    // Distinct frames so dedup does not short-circuit; the queue is drained each iteration.
    let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(100, i * 100)).collect();
    group.bench_with_input(BenchmarkId::new("to_queue", 100), &frames, |b, frames| {
        let queue = Arc::new(PriorityQueue::new(&QueueConfig {
            capacity: 1 << 20,
            ..QueueConfig::default()
        }));
        let ing = Ingestor::new(
            ValidationConfig {
                dedup_window: 16,
                ..ValidationConfig::default()
            },
            queue.clone(),
            Arc::new(DeadLetters::new(16)),
        );
        let mut i = 0;
        b.iter(|| {
            let report = ing.ingest_frame(&frames[i % frames.len()]);
            i += 1;
            let drained = queue.drain_round(Instant::now());
            black_box((report.accepted, drained.ready.len()))
        });
    });
    group.finish();
}

criterion_group!(benches, parse_validate, ingest_frame);
criterion_main!(benches);

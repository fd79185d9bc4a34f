//! permessage-deflate: compressing one tick frame and one batch frame the way the server does
//! (`transport::ws::deflate::compress`, once per shared frame), and inflating them. Prints each
//! frame's plain and compressed size, so the compression ratio is in the output too.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tickfan::tick::{Symbol, Tick, TradeId};
use tickfan::transport::ws::deflate;

/// A tick as the dispatcher serializes it: bid, ask and a trade id, like an exchange feed's.
fn tick_json(i: u32) -> String {
    let price = 64_000.0 + f64::from(i % 97) * 0.5;
    Tick {
        bid: Some(price - 0.5),
        ask: Some(price + 0.5),
        id: Some(TradeId::Int(3_100_000_000 + i64::from(i))),
        t_in: 1_765_000_000_000_000 + i64::from(i) * 137,
        seq: 1_000_000 + u64::from(i),
        ..Tick::new(
            Symbol::parse("BTC-USD").unwrap(),
            1_765_000_000_000 + i64::from(i),
            price,
            0.0125 * f64::from(1 + i % 7),
        )
    }
    .to_json()
}

/// A batch frame of `n` ticks, as a batch group flushes it.
fn batch_json(n: u32) -> String {
    let ticks: Vec<String> = (0..n).map(tick_json).collect();
    format!(r#"{{"type":"batch","ticks":[{}]}}"#, ticks.join(","))
}

fn compress(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate");
    for (name, text) in [
        ("tick", tick_json(1)),
        ("batch_10", batch_json(10)),
        ("batch_100", batch_json(100)),
    ] {
        let deflated = deflate::compress(text.as_bytes()).expect("compresses");
        eprintln!(
            "{name}: {} bytes plain, {} compressed, ratio {:.2}",
            text.len(),
            deflated.len(),
            text.len() as f64 / deflated.len() as f64
        );
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("compress_{name}"), |b| {
            b.iter(|| deflate::compress(black_box(text.as_bytes())));
        });
        group.bench_function(format!("inflate_{name}"), |b| {
            b.iter(|| deflate::inflate_message(black_box(&deflated), 1 << 20).unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);

//! permessage-deflate: compressing one tick frame and one batch frame the way the server does
//! (`transport::ws::deflate::compress`, once per shared frame), and inflating them. Prints each
//! frame's plain and compressed size, so the compression ratio is in the output too.
//!
//! `params`: the same per-message compression (reset, compress, sync flush) with the
//! alternatives the server could use: zlib-rs (flate2) at levels 1 and 6 with LZ77 windows of
//! 2^9 to 2^15 bytes, and miniz_oxide (flate2's default backend, always a 2^15 window) at
//! levels 1 and 6. `cargo bench --bench deflate -- params` picks the server's settings
//! (`transport::ws::deflate`, docs/benchmarks.md "Compression").

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flate2::{Compress, Compression, FlushCompress};
use miniz_oxide::deflate::core::{
    compress as miniz_compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
};
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

/// One message with zlib-rs at `level` and `window` bits, reset first, as the server does.
fn zlib_rs(c: &mut Compress, plain: &[u8], out: &mut Vec<u8>) -> usize {
    c.reset();
    out.clear();
    c.compress_vec(plain, out, FlushCompress::Sync).unwrap();
    out.len() - 4
}

/// One message with miniz_oxide, reset first.
fn miniz(c: &mut CompressorOxide, plain: &[u8], out: &mut [u8]) -> usize {
    c.reset();
    let (_, _, written) = miniz_compress(c, plain, out, TDEFLFlush::Sync);
    written - 4
}

fn params(c: &mut Criterion) {
    let mut group = c.benchmark_group("params");
    for (name, text) in [("tick", tick_json(1)), ("batch_10", batch_json(10))] {
        let plain = text.as_bytes();
        for level in [1u32, 6] {
            for window in [9u8, 12, 15] {
                let mut z = Compress::new_with_window_bits(Compression::new(level), false, window);
                let mut out = Vec::with_capacity(plain.len() + 64);
                let size = zlib_rs(&mut z, plain, &mut out);
                eprintln!(
                    "{name} zlib-rs level {level} window {window}: {} -> {size} bytes",
                    plain.len()
                );
                group.bench_function(format!("{name}/zlib-rs/l{level}/w{window}"), |b| {
                    b.iter(|| zlib_rs(&mut z, black_box(plain), &mut out));
                });
            }
            let flags = create_comp_flags_from_zip_params(level as i32, -15, 0);
            let mut m = CompressorOxide::new(flags);
            let mut out = vec![0u8; plain.len() + 64];
            let size = miniz(&mut m, plain, &mut out);
            eprintln!(
                "{name} miniz_oxide level {level}: {} -> {size} bytes",
                plain.len()
            );
            group.bench_function(format!("{name}/miniz_oxide/l{level}/w15"), |b| {
                b.iter(|| miniz(&mut m, black_box(plain), &mut out));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, compress, params);
criterion_main!(benches);

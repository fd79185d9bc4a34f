//! Measures the JetStream publish paths the cluster design chose between (docs/cluster.md):
//! raw pipelined publishes with acks (the ceiling), and per-subject compare-and-set publishes
//! (`Nats-Expected-Last-Subject-Sequence`, one in flight per symbol) over S symbols.
//!
//! `cargo run --release --example bus_bench -- nats://127.0.0.1:4222 [msgs] [symbols] [bytes]`
//!
//! `bytes` is the payload size (default 190, one tick's JSON); pass the mean message size of
//! a batched run (`published ticks / published messages` x ~190) to get the raw ceiling at
//! that size.

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or("nats://127.0.0.1:4222".into());
    let n: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let symbols: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100);
    let bytes: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(190);
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream("BENCH").await;
    js.create_stream(stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        max_messages_per_subject: 100_000,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    // A tick's wire JSON is ~190 bytes.
    let payload = Bytes::from(vec![b'x'; bytes]);

    // Raw: pipelined, with a Msg-Id each, acks awaited (up to 4096 in flight).
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..n {
        let msg = PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("raw:{i}"));
        acks.push(
            js.send_publish(format!("bench.raw.S{}", i % symbols), msg)
                .await?
                .into_future(),
        );
        while acks.len() >= 4096 {
            acks.next().await.transpose()?;
        }
    }
    while let Some(a) = acks.next().await {
        a?;
    }
    let raw = n as f64 / start.elapsed().as_secs_f64();
    println!(
        "raw pipelined publish with acks: {raw:.0} msgs/s, {:.1} MB/s ({n} msgs of {bytes} B, {symbols} subjects)",
        raw * bytes as f64 / 1e6
    );

    // CAS: one task per symbol, one publish in flight per symbol.
    let per = n / symbols;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..symbols {
        let js = js.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("bench.cas.S{s}");
            let mut last = 0u64;
            let mut lat = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let mut conflicts = 0u64;
            for i in 0..per {
                let t = Instant::now();
                let msg = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("cas:{s}:{i}"))
                    .header("Tickfan-Seq", (i + 1).to_string().as_str())
                    .expected_last_subject_sequence(last);
                match js.send_publish(subject.clone(), msg).await.unwrap().await {
                    Ok(ack) => last = ack.sequence,
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => conflicts += 1,
                    Err(e) => panic!("{e}"),
                }
                lat.record(t.elapsed().as_micros() as u64).unwrap();
            }
            (lat, conflicts)
        }));
    }
    let mut all = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut conflicts = 0;
    for t in tasks {
        let (h, c) = t.await?;
        all.add(h)?;
        conflicts += c;
    }
    let cas = (per * symbols) as f64 / start.elapsed().as_secs_f64();
    println!(
        "per-symbol CAS publish: {cas:.0} msgs/s over {symbols} symbols; latency us p50 {} p99 {} p99.9 {}; conflicts {conflicts}",
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
        all.value_at_quantile(0.999)
    );
    js.delete_stream("BENCH").await?;
    Ok(())
}

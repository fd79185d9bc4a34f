//! The fan-out inner loop: serialize a tick once, then offer the shared bytes to N subscribers'
//! outbound queues through their delivery state (realtime and batch), as the dispatcher does.
//! Also the batch flush that turns held ticks into one message, and the connection writer's
//! outbound coalescing: a burst of queued frames framed and written with one `writev` over a
//! real loopback socket (a thread drains the other end).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tickfan::dispatch::delivery::{Delivery, SmartThresholds, Tally};
use tickfan::dispatch::filter::Filter;
use tickfan::dispatch::outbound::{channel, Frame, Outbound, OutboundReceiver};
use tickfan::protocol::Mode;
use tickfan::tick::{Priority, Symbol, Tick};

const SMART: SmartThresholds = SmartThresholds {
    batch: 1 << 20,
    conflate: 1 << 22,
};

fn tick(seq: u64) -> Tick {
    Tick {
        symbol: Symbol::parse("AAPL").unwrap(),
        ts: 1_700_000_000_000,
        price: 187.25,
        volume: 100.0,
        bid: Some(187.2),
        ask: Some(187.3),
        open: None,
        high: None,
        low: None,
        close: None,
        id: None,
        priority: Priority::Normal,
        quality: 100,
        t_in: 1_700_000_000_000_123,
        seq,
    }
}

struct Sub {
    out: Outbound,
    rx: OutboundReceiver,
    delivery: Delivery,
    filter: Filter,
}

fn subscribers(n: usize, mode: Mode) -> Vec<Sub> {
    (0..n)
        .map(|_| {
            let (out, rx) = channel(1 << 16, 64 << 20);
            let mut delivery = Delivery::new(Duration::from_millis(100));
            delivery.reconfigure(
                mode,
                Duration::from_millis(100),
                &out,
                Instant::now(),
                &mut Tally::default(),
            );
            Sub {
                out,
                rx,
                delivery,
                filter: Filter::default(),
            }
        })
        .collect()
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fan_out");
    for (mode, name) in [(Mode::Realtime, "realtime"), (Mode::Batch, "batch")] {
        for n in [10usize, 100, 1_000] {
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                let mut subs = subscribers(n, mode);
                let mut seq = 0;
                let now = Instant::now();
                b.iter(|| {
                    seq += 1;
                    let t = tick(seq);
                    let frame = Frame::from(t.to_json());
                    let mut tally = Tally::default();
                    for s in &mut subs {
                        if s.filter.matches(&t) {
                            black_box(
                                s.delivery
                                    .deliver(&t, &frame, &s.out, now, SMART, &mut tally),
                            );
                        }
                    }
                    // Keep queues from growing: what a writer task would take.
                    if seq % 64 == 0 {
                        for s in &mut subs {
                            if mode == Mode::Batch {
                                s.delivery.flush(
                                    &s.out,
                                    now + Duration::from_secs(1),
                                    SMART,
                                    &mut tally,
                                );
                            }
                            while s.rx.try_recv().is_some() {}
                        }
                    }
                    black_box(tally.messages)
                });
            });
        }
    }
    group.finish();
}

fn serialize(c: &mut Criterion) {
    let mut group = c.benchmark_group("serialize");
    group.throughput(Throughput::Elements(1));
    group.bench_function("tick_write_json", |b| {
        let t = tick(42);
        let mut buf = Vec::with_capacity(256);
        b.iter(|| {
            buf.clear();
            t.write_json(&mut buf);
            black_box(buf.len())
        });
    });
    group.finish();
}

fn ws_write(c: &mut Criterion) {
    use std::io::Read;
    use tickfan::transport::ws::WsSocket;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let _entered = rt.enter();
    let mut group = c.benchmark_group("ws_write");
    let frame = bytes::Bytes::from(tick(1).to_json());
    for burst in [1usize, 16, 128] {
        group.throughput(Throughput::Elements(burst as u64));
        group.bench_with_input(
            BenchmarkId::new("frames_per_writev", burst),
            &burst,
            |b, &n| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                let mut peer =
                    std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let (server, _) = listener.accept().unwrap();
                server.set_nonblocking(true).unwrap();
                let drain = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 20];
                    while matches!(peer.read(&mut buf), Ok(n) if n > 0) {}
                });
                let mut socket =
                    WsSocket::new(tokio::net::TcpStream::from_std(server).unwrap(), 1 << 16);
                b.iter(|| {
                    for _ in 0..n {
                        socket.queue_text(frame.clone());
                    }
                    // The reader on the other core makes room; a full socket is simply retried.
                    while !socket.try_flush().unwrap() {
                        std::hint::spin_loop();
                    }
                });
                drop(socket);
                drain.join().unwrap();
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out, serialize, ws_write);
criterion_main!(benches);

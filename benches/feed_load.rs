//! Upstream feeds end to end (docs/benchmarks.md, "Upstream feeds"): a local WebSocket server
//! speaking Binance's trade stream feeds one tickfan (in this process, real store in a temp
//! dir, one `binance` upstream) as fast as it can.
//!
//! 1. Throughput: `FEED_LOAD_TICKS` (default 1,000,000) trades over 10 symbols, all sent at
//!    once; the time until the upstream's ticks are all accounted for by ingest (accepted,
//!    per `/health`) gives ticks/s for one connector: socket read, normalize, ingest, queue,
//!    with the dispatcher and the store running behind it.
//! 2. Latency: `FEED_LOAD_LATENCY_TICKS` (default 5,000) trades at 1,000/s, each carrying its
//!    send time (µs) as the trade id; a `/ws` client subscribed to the symbol records
//!    receive time minus send time: upstream message to client, through the whole server.
//!
//! Run: `cargo bench --bench feed_load`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const SYMBOLS: [&str; 10] = [
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT",
    "DOTUSDT", "LTCUSDT",
];

/// CPU time of the whole process (every thread), user + system.
fn process_cpu() -> Duration {
    // SAFETY: getrusage with a valid pointer to a local struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| {
        #[allow(clippy::cast_sign_loss)]
        Duration::new(t.tv_sec as u64, (t.tv_usec * 1_000) as u32)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn now_us() -> i64 {
    tickfan::tick::now_us()
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn trade(symbol: &str, id: u64, ts: i64, i: usize) -> String {
    format!(
        r#"{{"e":"trade","E":{ts},"s":"{symbol}","t":{id},"p":"{}.{:02}","q":"0.{:04}","T":{ts},"m":true,"M":true}}"#,
        60_000 + i % 97,
        i % 100,
        1 + i % 9_999
    )
}

/// One tickfan with one binance upstream at `url`; returns its address and a stopper.
async fn tickfan(
    url: &str,
    dir: &std::path::Path,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let mut config = tickfan::Config::default();
    config.feed.simulator = false;
    config.store.dir = dir.to_path_buf();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let symbols = format!("{:?}", SYMBOLS);
    let up: tickfan::config::UpstreamConfig = toml::from_str(&format!(
        "name = \"load\"\nkind = \"binance\"\nurl = {url:?}\nsymbols = {symbols}\nstale_ms = 600000"
    ))
    .unwrap();
    config.feed.upstream = vec![up];
    config.validate().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tickfan::run(listener, config, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn upstream_health(addr: std::net::SocketAddr) -> Value {
    let h: Value = reqwest::get(format!("http://{addr}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h["upstreams"][0].clone()
}

async fn throughput(n: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let ts = tickfan::tick::now_ms();
    let msgs: Vec<String> = (0..n)
        .map(|i| {
            trade(
                SYMBOLS[i % SYMBOLS.len()],
                1 + (i / SYMBOLS.len()) as u64,
                ts,
                i,
            )
        })
        .collect();
    let (addr, stop) = tickfan(&url, dir.path()).await;
    let (tcp, _) = listener.accept().await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let _subscribe = ws.next().await;
    ws.send(Message::text(r#"{"result":null,"id":1}"#))
        .await
        .unwrap();
    let start = Instant::now();
    let cpu_start = process_cpu();
    let sender = tokio::spawn(async move {
        for chunk in msgs.chunks(1_000) {
            for m in chunk {
                ws.feed(Message::text(m.clone())).await.unwrap();
            }
            ws.flush().await.unwrap();
        }
        ws
    });
    let deadline = start + Duration::from_secs(600);
    let u = loop {
        let u = upstream_health(addr).await;
        let done = u["accepted"].as_u64().unwrap()
            + u["duplicates"].as_u64().unwrap()
            + u["rejected"].as_u64().unwrap();
        if done >= n as u64 || Instant::now() > deadline {
            break u;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let elapsed = start.elapsed();
    let cpu = process_cpu() - cpu_start;
    let _ws = sender.await.unwrap();
    #[allow(clippy::cast_precision_loss)]
    let rate = n as f64 / elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let per_cpu = n as f64 / cpu.as_secs_f64();
    println!(
        "throughput: {n} Binance trades in {:.3} s wall = {rate:.0} ticks/s end to end; process CPU {:.3} s = {per_cpu:.0} ticks per CPU-second (all threads: upstream server, connector, ingest, dispatcher, store) (accepted {}, duplicates {}, rejected {}, backpressure retries {})",
        elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        u["accepted"], u["duplicates"], u["rejected"],
        reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap()
            .lines().find(|l| l.starts_with("tickfan_upstream_refused_total")).unwrap_or("-")
    );
    let _ = stop.send(());
}

async fn latency(n: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (addr, stop) = tickfan(&url, dir.path()).await;
    let (tcp, _) = listener.accept().await.unwrap();
    let mut up = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let _subscribe = up.next().await;
    up.send(Message::text(r#"{"result":null,"id":1}"#))
        .await
        .unwrap();
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    client
        .send(Message::text(
            r#"{"op":"subscribe","id":1,"symbols":["BTCUSDT"]}"#,
        ))
        .await
        .unwrap();
    // Trades sent before the subscription is in place would never reach the client.
    loop {
        if let Some(Ok(Message::Text(t))) = client.next().await {
            if t.as_str().contains(r#""type":"ack""#) {
                break;
            }
        }
    }
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen_by_reader = seen.clone();
    let reader = tokio::spawn(async move {
        let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        let mut server_part = hdrhistogram::Histogram::<u64>::new(3).unwrap();
        while hist.len() < n as u64 {
            let msg = client.next().await;
            let Some(Ok(Message::Text(t))) = msg else {
                assert!(msg.is_some(), "the /ws client was closed");
                continue;
            };
            seen_by_reader.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let now = now_us();
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "tick" {
                let sent = v["id"].as_i64().unwrap();
                let t_in = v["t_in"].as_i64().unwrap();
                hist.record(u64::try_from(now - sent).unwrap_or(0)).unwrap();
                server_part
                    .record(u64::try_from(t_in - sent).unwrap_or(0))
                    .unwrap();
            }
        }
        (hist, server_part)
    });
    let mut every = tokio::time::interval(Duration::from_millis(1));
    for i in 0..n {
        every.tick().await;
        let sent = now_us();
        let ts = sent / 1000;
        up.send(Message::text(trade(
            "BTCUSDT",
            u64::try_from(sent).unwrap(),
            ts,
            i,
        )))
        .await
        .unwrap();
    }
    let (hist, server_part) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "latency reader timed out after {} messages",
                seen.load(std::sync::atomic::Ordering::Relaxed)
            )
        })
        .unwrap();
    println!(
        "latency: {n} trades at 1000/s, upstream send -> /ws client receive: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs; upstream send -> ingest (t_in): p50 {} µs, p99 {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.max(),
        server_part.value_at_quantile(0.5),
        server_part.value_at_quantile(0.99),
    );
    let _ = stop.send(());
}

fn main() {
    // `cargo bench` passes `--bench`; this harness has no options of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        throughput(env("FEED_LOAD_TICKS", 1_000_000)).await;
        latency(env("FEED_LOAD_LATENCY_TICKS", 5_000)).await;
    });
}

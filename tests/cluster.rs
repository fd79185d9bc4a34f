//! Cluster mode end to end: a real `nats-server -js` (port picked by the server, store in a
//! temp dir) and several tickfan nodes in this process, each on 127.0.0.1:0 with its own store.
//! `nats-server` must be installed (`apt-get install nats-server`; `.ci/run` does it).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{ingest, subscribe, tick, Binary, TestServer, Ws, DEADLINE};
use serde_json::{json, Value};

/// A `nats-server -js` child process; killed on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    dir: tempfile::TempDir,
}

impl Nats {
    /// Starts on a port the server picks (`-p -1`), read back from its log.
    fn start() -> Self {
        Self::start_with_config("")
    }

    /// Starts with `config` (nats-server configuration file syntax) as its `-c` file.
    fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("js");
        std::fs::write(dir.path().join("nats.conf"), config).unwrap();
        let (child, port) = spawn_nats(dir.path(), &store, None);
        Self {
            child: Some(child),
            port,
            store,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): its store stays.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store, as an operator would.
    fn restart(&mut self) {
        self.kill();
        let (child, port) = spawn_nats(self.dir.path(), &self.store, Some(self.port));
        assert_eq!(port, self.port);
        self.child = Some(child);
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns nats-server logging to a fresh file in `dir` and waits (with a deadline) for the
/// line saying where it listens.
// The child is returned to `Nats`, whose drop kills and waits for it.
#[allow(clippy::zombie_processes)]
fn spawn_nats(dir: &Path, store: &Path, port: Option<u16>) -> (Child, u16) {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("nats-{n}.log"));
    let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
    let mut child = Command::new("nats-server")
        .arg("-c")
        .arg(dir.join("nats.conf"))
        .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
        .arg(store)
        .arg("-l")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nats-server ({e}): the cluster tests need it; \
                 install it with `apt-get install nats-server` (.ci/run does)"
            )
        });
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let listening = text.lines().find_map(|l| {
            l.split("Listening for client connections on ")
                .nth(1)?
                .rsplit(':')
                .next()?
                .trim()
                .parse::<u16>()
                .ok()
        });
        if let (Some(p), true) = (listening, text.contains("Server is ready")) {
            return (child, p);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nats-server did not start: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn node(nats: &Nats, name: &str) -> TestServer {
    let mut c = common::test_config();
    c.cluster.nats_url = nats.url();
    c.cluster.node_name = name.to_owned();
    TestServer::start_with(c).await
}

/// Polls `path` on `server` until `pred` holds on the JSON (or the deadline passes).
async fn wait_json(server: &TestServer, path: &str, pred: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, v) = server.get_json(path).await;
        if pred(status, &v) {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {path}: {status} {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads ticks until `n` have arrived; returns (symbol, seq) -> price.
async fn collect(ws: &mut Ws, n: usize) -> BTreeMap<(String, u64), f64> {
    let mut got = BTreeMap::new();
    while got.len() < n {
        let v = ws.recv().await;
        if v["type"] == "tick" {
            let key = (
                v["symbol"].as_str().unwrap().to_owned(),
                v["seq"].as_u64().unwrap(),
            );
            let old = got.insert(key.clone(), v["price"].as_f64().unwrap());
            assert!(old.is_none(), "tick {key:?} delivered twice");
        }
    }
    got
}

/// The seqs of the `snapshot` that answers a `since_seq` subscribe; it must report no gap.
async fn resumed_seqs(ws: &mut Ws) -> Vec<u64> {
    let snap = ws
        .recv_until(|v| v["type"] == "snapshot")
        .await
        .pop()
        .unwrap();
    assert_eq!(snap["gap"], false, "{snap}");
    snap["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seq"].as_u64().unwrap())
        .collect()
}

fn assert_gap_free(got: &BTreeMap<(String, u64), f64>, symbol: &str, n: u64) {
    let seqs: Vec<u64> = got
        .keys()
        .filter(|(s, _)| s == symbol)
        .map(|(_, q)| *q)
        .collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{symbol} seqs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_on_two_nodes_reach_clients_on_every_node_with_one_seq_per_symbol() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    let c = node(&nats, "c").await;
    let mut on_b = b.client().await.0;
    let mut on_c = c.client().await.0;
    subscribe(&mut on_b, 1, json!({"symbols": ["X", "Y"]})).await;
    subscribe(&mut on_c, 1, json!({"symbols": ["X", "Y"]})).await;

    // Producers on A and B write the same symbol at once: the seq chain must still be one.
    let send = |server: &TestServer, base: f64| {
        let url = server.ws_url("/ingest");
        async move {
            let mut p = Ws::connect(&url).await;
            for i in 0..10 {
                let frame = [
                    tick("X", base + f64::from(i), 1.0),
                    tick("Y", base + f64::from(i) + 0.5, 1.0),
                ];
                let ack = ingest(&mut p, &frame).await;
                assert_eq!(ack["accepted"], 2, "{ack}");
            }
        }
    };
    tokio::join!(send(&a, 100.0), send(&b, 200.0));

    let seen_b = collect(&mut on_b, 40).await;
    let seen_c = collect(&mut on_c, 40).await;
    assert_eq!(seen_b, seen_c, "B and C disagree on (symbol, seq) -> price");
    assert_gap_free(&seen_b, "X", 20);
    assert_gap_free(&seen_b, "Y", 20);
    // Every price sent arrived once.
    let mut prices: Vec<f64> = seen_b.values().copied().collect();
    prices.sort_by(f64::total_cmp);
    let mut sent: Vec<f64> = (0..10)
        .flat_map(|i| {
            let i = f64::from(i);
            [100.0 + i, 100.5 + i, 200.0 + i, 200.5 + i]
        })
        .collect();
    sent.sort_by(f64::total_cmp);
    assert_eq!(prices, sent);

    // The same epoch everywhere, and the nodes' own stores agree.
    let (ha, hb, hc) = tokio::join!(
        a.get_json("/health"),
        b.get_json("/health"),
        c.get_json("/health")
    );
    let epochs: Vec<Value> = [ha, hb, hc]
        .into_iter()
        .map(|(status, h)| {
            assert_eq!(status, 200, "{h}");
            assert_eq!(h["cluster"]["bus"], "connected", "{h}");
            h["epoch"].clone()
        })
        .collect();
    assert!(epochs.iter().all(|e| *e == epochs[0]), "{epochs:?}");
    let path = "/api/history/X?limit=100";
    let done = |_: u16, v: &Value| v["last_seq"] == 20;
    let (ha, hb, hc) = tokio::join!(
        wait_json(&a, path, done),
        wait_json(&b, path, done),
        wait_json(&c, path, done)
    );
    assert_eq!(ha["ticks"], hb["ticks"]);
    assert_eq!(ha["ticks"], hc["ticks"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_id_sent_to_two_nodes_is_stored_once() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    let mut t = tick("D", 10.0, 1.0);
    t["id"] = "trade-1".into();
    let mut pa = a.producer().await;
    assert_eq!(
        ingest(&mut pa, std::slice::from_ref(&t)).await["accepted"],
        1
    );
    // Right away on B, whether or not B has consumed A's copy yet.
    let (status, _, ack) = b.post_ticks(t.to_string()).await;
    assert_eq!(status, 200, "{ack}");
    // A marker after both, then every node's history holds the id once.
    let mut pb = b.producer().await;
    ingest(&mut pb, &[tick("D", 11.0, 1.0)]).await;
    for n in [&a, &b] {
        let h = wait_json(n, "/api/history/D?limit=100", |_, v| {
            v["ticks"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["price"] == 11.0))
        })
        .await;
        let ticks = h["ticks"].as_array().unwrap();
        let ids = ticks.iter().filter(|t| t["id"] == "trade-1").count();
        assert_eq!(ids, 1, "{h}");
        assert_eq!(ticks.len(), 2, "{h}");
        assert_eq!(h["last_seq"], 2, "{h}");
    }
}

/// Ids sent to two nodes at once, in batches: each node's ingest accepts them (neither has
/// seen the other's copy yet), so only the publisher's filter on a fully seen chain head keeps
/// them single. The stream must hold one gap-free chain with every id exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_symbol_sent_to_two_nodes_at_once_is_one_gap_free_chain_without_repeats() {
    let nats = Nats::start();
    batch_to_nodes_at_once(&[nats.url(), nats.url()]).await;
}

/// The same on a replicated (R3) stream, where nats-server 2.9 does not serialize the
/// per-subject compare-and-set (nats-server#4320): several publishes built on the same head
/// can all be stored, and only the consumers' arbitration keeps one chain. Each node talks to
/// its own NATS server, as in c4.py of the review.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_symbol_sent_to_three_nodes_at_once_is_one_chain_on_a_replicated_stream() {
    let nats = NatsCluster::start();
    let nodes = batch_to_nodes_at_once(&nats.urls).await;
    let (_, h) = nodes[0].get_json("/health").await;
    assert_eq!(h["cluster"]["replicas"], 3, "{h}");
    // Then many symbols' first ticks on every node at once: one race per symbol, each
    // node's publish built on the same empty head.
    const SYMBOLS: usize = 200;
    let posts = nodes.iter().enumerate().map(|(i, n)| {
        let ticks: Vec<Value> = (0..SYMBOLS)
            .map(|s| {
                let mut t = tick(&format!("F{s}"), 1.0 + i as f64, 1.0);
                t["id"] = format!("f{s}-n{i}").into();
                t
            })
            .collect();
        n.post_ticks(Value::Array(ticks).to_string())
    });
    for (status, _, ack) in futures_util::future::join_all(posts).await {
        assert_eq!(
            (status, ack["accepted"].as_u64()),
            (200, Some(SYMBOLS as u64)),
            "{ack}"
        );
    }
    for s in 0..SYMBOLS {
        let path = format!("/api/history/F{s}?limit=10");
        let mut first: Option<Value> = None;
        for n in &nodes {
            let h = wait_json(n, &path, |_, v| v["last_seq"].as_u64() >= Some(3)).await;
            let ticks = &h["ticks"];
            let mut prices: Vec<f64> = ticks
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["price"].as_f64().unwrap())
                .collect();
            prices.sort_by(f64::total_cmp);
            assert_eq!(
                prices,
                [1.0, 2.0, 3.0],
                "F{s}: an acked tick lost or repeated: {h}"
            );
            assert_eq!(h["last_seq"], 3, "{h}");
            if let Some(f) = &first {
                assert_eq!(f, ticks, "F{s}: the nodes disagree");
            }
            first = Some(ticks.clone());
        }
    }
}

/// One tickfan node per URL; each gets one POST of the shared ids and its own, all at once.
async fn batch_to_nodes_at_once(urls: &[String]) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut c = common::test_config();
        c.cluster.nats_url = url.clone();
        c.cluster.node_name = format!("n{i}");
        c.cluster.publish_timeout_ms = 15_000;
        nodes.push(TestServer::start_with(c).await);
    }
    const SHARED: usize = 600;
    const OWN: usize = 200;
    let body = |own: &str| {
        let mut ticks = Vec::new();
        for i in 0..SHARED {
            let mut t = tick("Z", 1.0 + i as f64, 1.0);
            t["id"] = format!("z-{i}").into();
            ticks.push(t);
            if i < OWN {
                let mut t = tick("Z", 5_000.0 + i as f64, 2.0);
                t["id"] = format!("{own}-{i}").into();
                ticks.push(t);
            }
        }
        Value::Array(ticks).to_string()
    };
    let posts = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| n.post_ticks(body(&format!("own{i}"))));
    let acks = futures_util::future::join_all(posts).await;
    let total = SHARED + nodes.len() * OWN;
    let taken =
        |ack: &Value| ack["accepted"].as_u64().unwrap() + ack["duplicates"].as_u64().unwrap();
    for (status, _, ack) in &acks {
        assert_eq!(*status, 200, "{ack}");
        assert_eq!(taken(ack), (SHARED + OWN) as u64, "{ack}");
    }
    let path = "/api/history/Z?limit=5000";
    let full = |_: u16, v: &Value| v["last_seq"].as_u64() >= Some(total as u64);
    let mut histories = Vec::new();
    for n in &nodes {
        let h = wait_json(n, path, full).await;
        histories.push(h["ticks"].clone());
        let ticks = h["ticks"].as_array().unwrap();
        let seqs: Vec<u64> = ticks.iter().map(|t| t["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "one gap-free chain"
        );
        let mut ids: Vec<&str> = ticks.iter().map(|t| t["id"].as_str().unwrap()).collect();
        ids.sort_unstable();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "an id stored twice");
        // Every acked id is there.
        for i in 0..SHARED {
            assert!(
                ids.binary_search(&format!("z-{i}").as_str()).is_ok(),
                "z-{i} lost"
            );
        }
        for i in 0..OWN {
            for own in 0..nodes.len() {
                let id = format!("own{own}-{i}");
                assert!(ids.binary_search(&id.as_str()).is_ok(), "{id} lost");
            }
        }
        assert_eq!(h["last_seq"], total, "{}", h["last_seq"]);
    }
    assert!(
        histories.iter().all(|h| *h == histories[0]),
        "the nodes disagree"
    );
    // Many ticks went out per message (that is what batching is for).
    let mut healths = Vec::new();
    for n in &nodes {
        healths.push(n.get_json("/health").await.1["cluster"].clone());
    }
    let count = |k: &str| healths.iter().map(|h| h[k].as_u64().unwrap()).sum::<u64>();
    assert!(
        count("published_messages") < count("published_ticks"),
        "{healths:?}"
    );
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joining_node_serves_the_full_history() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    let mut p = a.producer().await;
    for i in 0..6 {
        let frame: Vec<Value> = (0..5)
            .map(|j| tick("L", 50.0 + f64::from(i * 5 + j), 2.0))
            .collect();
        ingest(&mut p, &frame).await;
    }
    let late = node(&nats, "late").await;
    let h_late = wait_json(&late, "/api/history/L?limit=100", |_, v| {
        v["last_seq"] == 30
    })
    .await;
    let (_, h_a) = a.get_json("/api/history/L?limit=100").await;
    assert_eq!(h_a["ticks"], h_late["ticks"]);
    assert_eq!(h_a["epoch"], h_late["epoch"]);
    let (_, s_a) = a.get_json("/api/symbols").await;
    let (_, s_late) = late.get_json("/api/symbols").await;
    assert_eq!(s_a, s_late);
    let (_, b_a) = a.get_json("/api/bars/L?tf=1m").await;
    let (_, b_late) = late.get_json("/api/bars/L?tf=1m").await;
    assert_eq!(b_a, b_late);
    // A client of the late node resumes from seq 10 with no gap.
    let mut ws = late.client().await.0;
    subscribe(
        &mut ws,
        1,
        json!({"symbols": ["L"], "since_seq": {"L": 10}}),
    )
    .await;
    let seqs = resumed_seqs(&mut ws).await;
    assert_eq!(seqs, (11..=30).collect::<Vec<_>>());
    ws.close().await;

    // A clean restart resumes from the saved position, neither losing nor repeating a tick.
    // The store has every message of the stream (the position is a stream sequence: a
    // message may carry several ticks).
    let h = wait_json(&late, "/health", |_, v| {
        let c = &v["cluster"];
        c["position"].as_u64() > Some(0) && c["position"] == c["stream_last"]
    })
    .await;
    let config = late.config.clone();
    let dir = late.stop().await;
    let saved: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).unwrap()).unwrap();
    assert_eq!(saved["position"], h["cluster"]["position"], "{saved}");
    let again = TestServer::start_in(config, dir).await;
    ingest(&mut p, &[tick("L", 99.0, 2.0)]).await;
    let h = wait_json(&again, "/api/history/L?limit=100", |_, v| {
        v["last_seq"] == 31
    })
    .await;
    let ticks = h["ticks"].as_array().unwrap();
    assert_eq!(ticks[..30], h_a["ticks"].as_array().unwrap()[..]);
    assert_eq!(ticks[30]["price"], 99.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_outage_degrades_health_refuses_acks_and_resumes_without_a_gap() {
    let mut nats = Nats::start();
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    let mut on_b = b.client().await.0;
    subscribe(&mut on_b, 1, json!({"symbols": ["O"]})).await;
    let mut p = a.producer().await;
    for i in 0..5 {
        ingest(&mut p, &[tick("O", 1.0 + f64::from(i), 1.0)]).await;
    }
    let before = collect(&mut on_b, 5).await;
    assert_gap_free(&before, "O", 5);
    // Stored too (the store commits right after fan-out).
    wait_json(&b, "/api/history/O?limit=10", |_, v| v["last_seq"] == 5).await;

    nats.kill();
    let h = wait_json(&a, "/health", |status, v| {
        status == 503 && v["cluster"]["bus"] != "connected"
    })
    .await;
    assert!(h["reasons"].to_string().contains("cluster"), "{h}");
    // No ack for what the bus cannot hold: backpressure with a retry hint instead.
    let (status, headers, body) = a.post_ticks(tick("O", 99.0, 1.0).to_string()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "backpressure", "{body}");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(headers.contains_key("retry-after"));
    assert_eq!(body["accepted"], 0, "{body}");
    let why = body["message"].as_str().unwrap();
    assert!(why.contains("bus unavailable"), "{body}");
    assert!(!why.contains("queue full"), "{body}");
    // History is still served while the bus is down.
    let (status, hist) = b.get_json("/api/history/O?limit=10").await;
    assert_eq!((status, hist["last_seq"].clone()), (200, json!(5)));

    nats.restart();
    for n in [&a, &b] {
        wait_json(n, "/health", |status, v| {
            status == 200 && v["cluster"]["bus"] == "connected"
        })
        .await;
    }
    for i in 0..5 {
        let ack = ingest(&mut p, &[tick("O", 10.0 + f64::from(i), 1.0)]).await;
        assert_eq!(ack["accepted"], 1, "{ack}");
    }
    // The same client connection, still open, sees 6..10: contiguous, nothing from the outage.
    let after = collect(&mut on_b, 5).await;
    let seqs: Vec<u64> = after.keys().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (6..=10).collect::<Vec<_>>());
    assert!(after.values().all(|p| *p >= 10.0), "{after:?}");
    assert!(a.metric("tickfan_bus_reconnects_total").await >= 1.0);
}

/// The real binary in cluster mode on `dir`; killed (SIGKILL) on drop.
fn node_process(nats: &Nats, dir: &Path) -> Binary {
    Binary::start_with(dir, &["--nats", &nats.url()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_loses_no_acked_tick_and_its_clients_resume_elsewhere() {
    let nats = Nats::start();
    let dir_a = tempfile::tempdir().unwrap();
    let mut a = node_process(&nats, dir_a.path());
    let b = node(&nats, "b").await;

    // A client of A follows K; a producer on A sends, each frame acked, then more unacked.
    let mut on_a = Ws::connect(&format!("ws://{}/ws", a.addr)).await;
    on_a.recv().await; // welcome
    subscribe(&mut on_a, 1, json!({"symbols": ["K"]})).await;
    let mut p = Ws::connect(&format!("ws://{}/ingest", a.addr)).await;
    let mut acked = Vec::new();
    for i in 0..30 {
        let price = 100.0 + f64::from(i);
        assert_eq!(
            ingest(&mut p, &[tick("K", price, 1.0)]).await["accepted"],
            1
        );
        acked.push(price);
    }
    for i in 30..40 {
        p.send_json(&Value::Array(vec![tick("K", 100.0 + f64::from(i), 1.0)]))
            .await;
    }
    let seen_on_a = collect(&mut on_a, 10).await;
    let last_seen = seen_on_a.keys().map(|(_, s)| *s).max().unwrap();
    a.kill9();

    // Every acked tick is on B, in one gap-free chain.
    let h = wait_json(&b, "/api/history/K?limit=1000", |_, v| {
        v["last_seq"].as_u64().unwrap_or(0) >= 30
    })
    .await;
    let ticks = h["ticks"].as_array().unwrap();
    let seqs: Vec<u64> = ticks.iter().map(|t| t["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    for price in &acked {
        assert!(
            ticks.iter().any(|t| t["price"].as_f64() == Some(*price)),
            "acked tick {price} lost: {h}"
        );
    }
    // A's client resumes on B from the last seq it saw: no gap.
    let mut moved = b.client().await.0;
    subscribe(
        &mut moved,
        1,
        json!({"symbols": ["K"], "since_seq": {"K": last_seen}}),
    )
    .await;
    let resumed = resumed_seqs(&mut moved).await;
    assert_eq!(resumed.first().copied(), Some(last_seen + 1), "{resumed:?}");

    // A restarted on its store catches up to the same history.
    let a2 = node_process(&nats, dir_a.path());
    let last = h["last_seq"].clone();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let resp = reqwest::get(format!("http://{}/api/history/K?limit=1000", a2.addr))
            .await
            .unwrap();
        let v: Value = resp.json().await.unwrap();
        // B may have taken more of A's unacked ticks since `h` was read: compare its prefix.
        if v["last_seq"].as_u64() >= last.as_u64() {
            let got = v["ticks"].as_array().unwrap();
            assert_eq!(got[..ticks.len()], ticks[..]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "A did not catch up: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three `nats-server -js` processes routed into one JetStream cluster.
struct NatsCluster {
    servers: Vec<Option<Child>>,
    urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    // Each child is owned by the returned value, whose drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Route ports must be known before any server starts: the OS picks them.
        let holders: Vec<std::net::TcpListener> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let routes: Vec<u16> = holders
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        drop(holders);
        let mut servers = Vec::new();
        let mut logs = Vec::new();
        for i in 0..3 {
            let log = dir.path().join(format!("n{i}.log"));
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                .collect();
            let child = Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
                .arg(dir.path().join(format!("js{i}")))
                .args(["--server_name", &format!("n{i}"), "--cluster_name", "T"])
                .args(["--cluster", &format!("nats://127.0.0.1:{}", routes[i])])
                .args(["--routes", &others.join(",")])
                .arg("-l")
                .arg(&log)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot run nats-server: apt-get install nats-server");
            servers.push(Some(child));
            logs.push(log);
        }
        let mut this = Self {
            servers,
            urls: Vec::new(),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let texts: Vec<String> = logs
                .iter()
                .map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .collect();
            let ports: Vec<u16> = texts
                .iter()
                .filter_map(|t| {
                    t.lines().find_map(|l| {
                        l.split("Listening for client connections on ")
                            .nth(1)?
                            .rsplit(':')
                            .next()?
                            .trim()
                            .parse()
                            .ok()
                    })
                })
                .collect();
            let leader = texts.iter().any(|t| t.contains("metadata leader"));
            // A node with `replicas = 0` sizes its stream by the servers its NATS server
            // gossips to clients (`connect_urls`): until every route is up that can be 2, and
            // the stream would be created R2 (seen in a loaded run). Ready means every server
            // tells clients about all three.
            if ports.len() == 3 && leader && ports.iter().all(|p| gossiped_servers(*p) == 3) {
                this.urls = ports
                    .iter()
                    .map(|p| format!("nats://127.0.0.1:{p}"))
                    .collect();
                return this;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "NATS cluster did not form: {texts:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.servers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The client URLs the NATS server on `port` announces in its INFO line (`connect_urls`),
/// or 0 when it cannot be read.
fn gossiped_servers(port: u16) -> usize {
    use std::io::BufRead;
    let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if std::io::BufReader::new(stream)
        .read_line(&mut line)
        .is_err()
    {
        return 0;
    }
    line.strip_prefix("INFO ")
        .and_then(|info| serde_json::from_str::<Value>(info).ok())
        .and_then(|info| info["connect_urls"].as_array().map(Vec::len))
        .unwrap_or(0)
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// Sends one tick until a node acks it, retrying `backpressure` and `expired` (a bus
/// failover in progress) until the deadline.
async fn send_until_acked(server: &TestServer, t: &Value) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, ack) = server.post_ticks(t.to_string()).await;
        if status == 200 && ack["accepted"] == 1 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tick never acked: {status} {ack}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_server_nats_cluster_survives_losing_one_server() {
    let mut nats = NatsCluster::start();
    let start = |name: &str| {
        let mut c = common::test_config();
        c.cluster.nats_url = nats.urls.join(",");
        c.cluster.node_name = name.to_owned();
        c.cluster.publish_timeout_ms = 15_000;
        TestServer::start_with(c)
    };
    let a = start("a").await;
    let b = start("b").await;
    let (_, h) = a.get_json("/health").await;
    assert_eq!(h["cluster"]["replicas"], 3, "{h}");
    let mut on_b = b.client().await.0;
    subscribe(&mut on_b, 1, json!({"symbols": ["R"]})).await;
    for i in 0..5 {
        send_until_acked(&a, &tick("R", 1.0 + f64::from(i), 1.0)).await;
    }
    nats.kill(0);
    for i in 5..10 {
        send_until_acked(&a, &tick("R", 1.0 + f64::from(i), 1.0)).await;
    }
    let got = collect(&mut on_b, 10).await;
    assert_gap_free(&got, "R", 10);
    let prices: Vec<f64> = got.values().copied().collect();
    assert_eq!(prices, (1..=10).map(f64::from).collect::<Vec<_>>());
}

/// Messages published into the stream by something else than tickfan (`nats pub`), or
/// malformed: each is skipped whole and counted, the symbol's chain goes on from its accepted
/// head on every node, and no node closes its gate for every symbol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_messages_are_skipped_and_counted_and_the_chain_goes_on() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    for p in [1.0, 2.0] {
        let (status, _, ack) = a.post_ticks(tick("G", p, 1.0).to_string()).await;
        assert_eq!(status, 200, "{ack}");
    }
    for n in [&a, &b] {
        wait_json(n, "/api/history/G?limit=10", |_, v| v["last_seq"] == 2).await;
    }
    let raw = |symbol: &str, seq: u64| {
        json!({"type": "tick", "symbol": symbol, "seq": seq, "ts": 1_700_000_000_000_u64,
               "price": 666.0, "volume": 1.0, "quality": 100, "t_in": 1_700_000_000_000_000_u64})
        .to_string()
    };
    let headers = |first: &str, count: Option<&str>| {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Tickfan-Seq", first);
        if let Some(c) = count {
            h.insert("Tickfan-Count", c);
        }
        h
    };
    let bad: Vec<(Option<async_nats::HeaderMap>, String)> = vec![
        // `nats pub tickfan.ticks.G x`
        (None, "x".into()),
        // Tickfan-Count says 2, the payload has 1.
        (Some(headers("3", Some("2"))), raw("G", 3)),
        // A huge seq, well formed otherwise.
        (
            Some(headers("999999999999", None)),
            raw("G", 999_999_999_999),
        ),
        // Half a batch unparsable.
        (
            Some(headers("3", Some("2"))),
            format!("[{},{{\"nope\":1}}]", raw("G", 3)),
        ),
        // A tick of another symbol on G's subject.
        (Some(headers("3", None)), raw("W", 3)),
        // The header disagrees with the tick's seq.
        (Some(headers("4", None)), raw("G", 3)),
    ];
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for (h, payload) in &bad {
        let ack = match h {
            Some(h) => js
                .publish_with_headers("tickfan.ticks.G", h.clone(), payload.clone().into())
                .await
                .unwrap(),
            None => js
                .publish("tickfan.ticks.G", payload.clone().into())
                .await
                .unwrap(),
        };
        ack.await.unwrap();
    }
    // Both nodes judged all of them, skipped them, and still take G (B from a head it must
    // read: the stream's last message of G is garbage) and other symbols.
    for n in [&a, &b] {
        wait_json(n, "/health", |status, v| {
            status == 200 && v["cluster"]["skipped_messages"].as_u64() >= Some(bad.len() as u64)
        })
        .await;
    }
    for (n, p) in [(&b, 3.0), (&a, 4.0)] {
        let (status, _, ack) = n.post_ticks(tick("G", p, 1.0).to_string()).await;
        assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
        let (status, _, ack) = n.post_ticks(tick("W", p, 1.0).to_string()).await;
        assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    }
    for n in [&a, &b] {
        let h = wait_json(n, "/api/history/G?limit=10", |_, v| v["last_seq"] == 4).await;
        let prices: Vec<f64> = h["ticks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["price"].as_f64().unwrap())
            .collect();
        assert_eq!(prices, [1.0, 2.0, 3.0, 4.0], "{h}");
        wait_json(n, "/api/history/W?limit=10", |_, v| v["last_seq"] == 2).await;
        let (status, h) = n.get_json("/health").await;
        assert_eq!(status, 200, "{h}");
    }
}

/// A node restarted on an idle, non-empty stream continues from its saved position: it does
/// not read the stream again from sequence 1 (its position and lag never go backwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_on_an_idle_stream_does_not_replay_it() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    for i in 0..5 {
        let (status, _, ack) = a
            .post_ticks(tick("I", 1.0 + f64::from(i), 1.0).to_string())
            .await;
        assert_eq!(status, 200, "{ack}");
    }
    let caught_up = |_: u16, v: &Value| {
        let c = &v["cluster"];
        c["stream_last"].as_u64() > Some(0)
            && c["position"] == c["stream_last"]
            && c["read_through"] == c["stream_last"]
            && c["lag"] == 0
    };
    let before = wait_json(&a, "/health", caught_up).await;
    let config = a.config.clone();
    let dir = a.stop().await;
    let a = TestServer::start_in(config, dir).await;
    let after = wait_json(&a, "/health", caught_up).await;
    let c = &after["cluster"];
    assert_eq!(c["position"], before["cluster"]["position"], "{after}");
    assert_eq!(c["consumed_messages"], 0, "read the stream again: {after}");
    assert_eq!(c["replayed_messages"], 0, "{after}");
    let (_, h) = a.get_json("/api/history/I?limit=10").await;
    assert_eq!(h["last_seq"], 5, "{h}");
}

/// A node restarted while another node published its symbol still knows the ticks its store
/// held before the restart: a resend of one of them to it is a duplicate, not a second copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_to_a_restarted_node_of_a_tick_stored_before_the_restart_is_a_duplicate() {
    let nats = Nats::start();
    let a = node(&nats, "a").await;
    let b = node(&nats, "b").await;
    let mut x = tick("RS", 10.0, 1.0);
    x["id"] = "x-1".into();
    let mut y = tick("RS", 11.0, 1.0);
    y["id"] = "y-1".into();
    let (status, _, ack) = a.post_ticks(x.to_string()).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    wait_json(&a, "/api/history/RS?limit=10", |_, v| v["last_seq"] == 1).await;
    let config = a.config.clone();
    let dir = a.stop().await;
    let (status, _, ack) = b.post_ticks(y.to_string()).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    let a = TestServer::start_in(config, dir).await;
    wait_json(&a, "/api/history/RS?limit=10", |_, v| v["last_seq"] == 2).await;
    let (status, _, ack) = a.post_ticks(x.to_string()).await;
    assert_eq!(status, 200, "{ack}");
    assert_eq!(ack["duplicates"], 1, "{ack}");
    // A marker through B: once it is on A, anything A published before it is too.
    let h = history_after_marker(&b, &a, "RS", 12.0).await;
    let ids: Vec<&Value> = h["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(h["last_seq"], 3, "x stored twice: {h}");
    assert_eq!(ids.iter().filter(|i| **i == "x-1").count(), 1, "{h}");
}

/// A NATS server with a small `max_payload`: tickfan sizes its batches below it (headers
/// included) instead of failing them, and never takes a too-large message for a bus outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fit_the_servers_max_payload() {
    let nats = Nats::start_with_config("max_payload: 4096\n");
    let a = node(&nats, "a").await;
    let ticks: Vec<Value> = (0..100)
        .map(|i| tick("MP", 1.0 + f64::from(i), 1.0))
        .collect();
    let (status, _, ack) = a.post_ticks(Value::Array(ticks).to_string()).await;
    assert_eq!(
        (status, ack["accepted"].as_u64()),
        (200, Some(100)),
        "{ack}"
    );
    let h = wait_json(&a, "/api/history/MP?limit=200", |_, v| v["last_seq"] == 100).await;
    assert_eq!(h["ticks"].as_array().unwrap().len(), 100, "{h}");
    let (status, health) = a.get_json("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["cluster"]["publish_errors"], 0, "{health}");
}

/// A tick whose publish never reached the bus (the server froze, then died without reading
/// it) is reported `expired`; its resend, once the bus is back, is a new tick, not a
/// `duplicates` answer for a tick the bus never held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_expired_in_publish_can_be_resent() {
    let mut nats = Nats::start();
    let mut c = common::test_config();
    c.cluster.nats_url = nats.url();
    c.cluster.node_name = "a".into();
    c.cluster.publish_timeout_ms = 1_000;
    let a = TestServer::start_with(c).await;
    let (status, _, ack) = a.post_ticks(tick("EX", 1.0, 1.0).to_string()).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    let mut x = tick("EX", 2.0, 1.0);
    x["id"] = "x-expired".into();
    // Frozen: the connection stays up, nothing is answered, nothing is read.
    freeze(&nats);
    let (_, _, ack) = a.post_ticks(x.to_string()).await;
    assert_eq!(ack["accepted"], 0, "{ack}");
    assert!(ack.to_string().contains("expired"), "{ack}");
    // Killed unread, and started again on its store: the stream never held x.
    nats.restart();
    wait_json(&a, "/health", |status, v| {
        status == 200 && v["cluster"]["bus"] == "connected"
    })
    .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, _, ack) = a.post_ticks(x.to_string()).await;
        if status == 200 {
            assert_eq!(ack["duplicates"], 0, "swallowed as a duplicate: {ack}");
            if ack["accepted"] == 1 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {ack}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let h = wait_json(&a, "/api/history/EX?limit=10", |_, v| v["last_seq"] == 2).await;
    let ids = h["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["id"] == "x-expired")
        .count();
    assert_eq!(ids, 1, "{h}");
}

/// A batch the server stored but whose ack was lost (the server froze past the request
/// timeout, then went on) is resent identically, so JetStream's `Nats-Msg-Id` dedup answers
/// `duplicate`, instead of being rebuilt on a new head: with a dedup window smaller than the
/// batch, a rebuilt batch would store its first ticks a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stored_but_not_acked_is_resent_identically_and_stored_once() {
    let nats = Nats::start();
    let mut c = common::test_config();
    c.cluster.nats_url = nats.url();
    c.cluster.node_name = "a".into();
    c.cluster.publish_timeout_ms = 15_000;
    c.validation.dedup_window = 1;
    let a = TestServer::start_with(c).await;
    let (status, _, ack) = a.post_ticks(tick("AM", 1.0, 1.0).to_string()).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    wait_json(&a, "/api/history/AM?limit=10", |_, v| v["last_seq"] == 1).await;
    freeze(&nats);
    let batch: Vec<Value> = (0..3)
        .map(|i| {
            let mut t = tick("AM", 10.0 + f64::from(i), 1.0);
            t["id"] = format!("am-{i}").into();
            t
        })
        .collect();
    let post = tokio::spawn({
        let url = format!("http://{}/api/ticks", a.addr);
        let body = Value::Array(batch).to_string();
        async move {
            reqwest::Client::new()
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    // The publish is in the server's socket, unread; the client's request times out.
    wait_json(&a, "/health", |_, v| {
        v["cluster"]["publish_errors"].as_u64() >= Some(1)
    })
    .await;
    signal(&nats, "-CONT", 'S');
    let ack = post.await.unwrap();
    assert_eq!(ack["accepted"], 3, "{ack}");
    let h = history_after_marker(&a, &a, "AM", 99.0).await;
    let prices: Vec<f64> = h["ticks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["price"].as_f64().unwrap())
        .collect();
    assert_eq!(prices, [1.0, 10.0, 11.0, 12.0, 99.0], "{h}");
}

/// Posts a marker tick (`price`) of `symbol` to `via`, waits until `reader`'s history has it,
/// and returns that history: everything published to the stream before the marker is in it.
async fn history_after_marker(
    via: &TestServer,
    reader: &TestServer,
    symbol: &str,
    price: f64,
) -> Value {
    let (status, _, ack) = via.post_ticks(tick(symbol, price, 1.0).to_string()).await;
    assert_eq!((status, ack["accepted"].as_u64()), (200, Some(1)), "{ack}");
    wait_json(
        reader,
        &format!("/api/history/{symbol}?limit=100"),
        |_, v| {
            v["ticks"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["price"] == price))
        },
    )
    .await
}

/// Stops (SIGSTOP) the server: its connections stay open, nothing is read or answered.
fn freeze(nats: &Nats) {
    signal(nats, "-STOP", 'T');
}

/// Sends `sig` to the server and waits until the kernel shows it in `state` (or, for
/// running, anything but stopped).
fn signal(nats: &Nats, sig: &str, state: char) {
    let pid = nats.child.as_ref().unwrap().id();
    let sent = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // "pid (comm) S ...": the state follows the command's closing parenthesis.
        let now = stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .chars()
            .next()
            .unwrap();
        if (state == 'T') == (now == 'T') {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{sig} not applied: {stat}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

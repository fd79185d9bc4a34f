//! Test harness: a real tickfan server on `127.0.0.1:0` inside the test's runtime, with a temp
//! data dir, plus WebSocket and HTTP client helpers that wait on events with deadlines (no
//! sleeps, no fixed ports).

#![allow(dead_code)]

pub mod tls;

use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tickfan::Config;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: Config,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tickfan::error::ServerError>>>,
}

/// A config for tests: no simulator, temp store, port 0.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.feed.simulator = false;
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_ms = 10_000;
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(config, dir).await
    }

    /// Starts on an existing data dir (restart tests).
    pub async fn start_in(config: Config, dir: tempfile::TempDir) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, config, dir)
    }

    /// Runs a server on `listener` with its store in `dir`, stopped by `stop` or on drop.
    fn serve(
        listener: tokio::net::TcpListener,
        mut config: Config,
        dir: tempfile::TempDir,
    ) -> Self {
        config.store.dir = dir.path().to_path_buf();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tickfan::run(listener, config.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            config,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Connects to `/ws` and reads the welcome.
    pub async fn client(&self) -> (Ws, Value) {
        let mut ws = Ws::connect(&self.ws_url("/ws")).await;
        let welcome = ws.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    /// Connects to `/ingest`.
    pub async fn producer(&self) -> Ws {
        Ws::connect(&self.ws_url("/ingest")).await
    }

    /// Stops the server and waits for `run` to return; gives back the data dir.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown().await;
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("server did not stop in time")
                .unwrap()
                .expect("server returned an error");
        }
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = reqwest::get(self.http(path)).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_ticks(
        &self,
        body: impl Into<reqwest::Body>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = reqwest::Client::new()
            .post(self.http("/api/ticks"))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.json().await.unwrap_or(Value::Null))
    }

    /// The whole `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(self.http("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One sample from `/metrics` (0 when the series is absent), e.g.
    /// `tickfan_limit_hits_total{limit="slow_consumer"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics_text().await, series)
    }

    /// Polls `/api/stats` until `pred` holds.
    /// Polls `series` in `/metrics` until `pred` holds for its value (or the deadline).
    pub async fn wait_metric(&self, series: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let value = self.metric(series).await;
            if pred(value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {series}: {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_stats(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (_, stats) = self.get_json("/api/stats").await;
            if pred(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A WebSocket test client.
pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Close(u16),
    Eof,
}

impl Ws {
    pub async fn connect(url: &str) -> Self {
        let (inner, _) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        Self { inner }
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.inner
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.inner
            .send(Message::Text(s.to_owned().into()))
            .await
            .unwrap();
    }

    /// The next WebSocket message of any kind, by `deadline`.
    pub async fn next_by(&mut self, deadline: tokio::time::Instant) -> Message {
        tokio::time::timeout_at(deadline, self.inner.next())
            .await
            .expect("timed out waiting for a message")
            .expect("connection ended")
            .expect("websocket error")
    }

    /// The next JSON text message (pings and heartbeats are skipped).
    pub async fn recv(&mut self) -> Value {
        // One deadline for the whole wait: skipped heartbeats must not extend it.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match self.next_by(deadline).await {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] != "heartbeat" {
                        return v;
                    }
                }
                Message::Close(c) => panic!("closed while waiting for a message: {c:?}"),
                _ => {}
            }
        }
    }

    /// Reads until a message satisfies `pred`, returning everything read (including it).
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.recv().await;
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }

    /// Reads until the reply with `"id": id`.
    pub async fn reply(&mut self, id: u64) -> Value {
        self.recv_until(|v| v["id"] == id).await.pop().unwrap()
    }

    /// Sends a request and returns its reply.
    pub async fn request(&mut self, v: Value) -> Value {
        let id = v["id"].as_u64().expect("request needs a numeric id");
        self.send_json(&v).await;
        self.reply(id).await
    }

    /// Reads until the connection ends, returning the data messages seen before.
    pub async fn until_closed(&mut self) -> (Vec<Value>, Ended) {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.inner.next())
                .await
                .expect("timed out waiting for close");
            match msg {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(frame))) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    return (seen, Ended::Close(code));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (seen, Ended::Eof),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.inner.close(None).await;
    }
}

/// Builds a tick object for `symbol` at the current time.
pub fn tick(symbol: &str, price: f64, volume: f64) -> Value {
    serde_json::json!({"symbol": symbol, "ts": now_ms(), "price": price, "volume": volume})
}

pub fn now_ms() -> i64 {
    tickfan::tick::now_ms()
}

/// The reject codes of an ack's `rejected` list, in order.
pub fn reject_codes(ack: &Value) -> Vec<String> {
    ack["rejected"]
        .as_array()
        .expect("a rejected list")
        .iter()
        .map(|r| r["code"].as_str().expect("a code").to_owned())
        .collect()
}

/// Sends ticks as one `/ingest` frame and returns the ack.
pub async fn ingest(producer: &mut Ws, ticks: &[Value]) -> Value {
    producer.send_json(&Value::Array(ticks.to_vec())).await;
    let ack = producer.recv().await;
    assert_eq!(ack["type"], "ingest_ack", "{ack}");
    ack
}

/// One sample from a `/metrics` exposition (0 when the series is absent).
pub fn sample(exposition: &str, series: &str) -> f64 {
    sample_of(exposition, series).unwrap_or(0.0)
}

/// One sample from a `/metrics` exposition; `None` when the series is absent (for tests that
/// must tell "0" from "gone").
pub fn sample_of(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `PER_BATCH` ticks for `symbol`, batch `b`, with ids padded by `pad` bytes so that they fill
/// sockets quickly (prices rise by 1e-6 per tick across batches).
pub fn padded_batch(symbol: &str, b: u64, per_batch: u64, pad: usize) -> Vec<Value> {
    let pad = "x".repeat(pad);
    (0..per_batch)
        .map(|i| {
            let mut t = tick(symbol, 1.0 + (b * per_batch + i) as f64 * 1e-6, 1.0);
            t["id"] = format!("{pad}{b}-{i}").into();
            t
        })
        .collect()
}

/// The slow-consumer flood: `batches` x `per_batch` padded ticks for "SLOW" from `producer`,
/// while `fast` (subscribed to it) must read every one in seq order.
pub async fn flood_while_fast_reads(producer: &mut Ws, mut fast: Ws, batches: u64, per_batch: u64) {
    let reader = tokio::spawn(async move {
        let mut expect = 1;
        while expect <= batches * per_batch {
            let m = fast.recv().await;
            assert_eq!(
                m["seq"].as_u64(),
                Some(expect),
                "fast client must see every tick in order"
            );
            expect += 1;
        }
    });
    for b in 0..batches {
        // Padded ids fill sockets quickly (a batch stays under limits.max_message_bytes).
        let ack = ingest(producer, &padded_batch("SLOW", b, per_batch, 100)).await;
        assert_eq!(ack["accepted"], per_batch);
    }
    reader.await.unwrap();
}

/// The slow client of [`flood_while_fast_reads`] now reads: what was buffered, then the
/// `slow_consumer` error, then close 4008; what it got was in order (so it can resume from
/// its last seq) and not everything.
pub async fn assert_closed_as_slow(slow: &mut Ws, total: u64) {
    let (seen, ended) = slow.until_closed().await;
    assert_eq!(ended, Ended::Close(4008));
    let last = seen.last().unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["code"], "slow_consumer");
    let seqs: Vec<u64> = seen
        .iter()
        .filter(|m| m["type"] == "tick")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert!((seqs.len() as u64) < total);
}

/// Subscribes and returns the ack.
pub async fn subscribe(ws: &mut Ws, id: u64, body: Value) -> Value {
    let mut req = body;
    req["op"] = "subscribe".into();
    req["id"] = id.into();
    let ack = ws.request(req).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}

/// Close code helper for readability.
pub fn code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Starts a server on exactly `addr` with an existing data dir: restarts that clients must find
/// at the same address (e.g. the browser dashboard test, whose page reconnects to the URL it was
/// loaded from). `addr` is normally the ephemeral port an earlier `TestServer` got; the bind is
/// retried until `DEADLINE` in case the port is briefly busy after the old listener closed.
pub async fn start_on(addr: SocketAddr, config: Config, dir: tempfile::TempDir) -> TestServer {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "could not bind {addr} again: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    TestServer::serve(listener, config, dir)
}

/// The real binary on a data dir; killed (SIGKILL) on drop if still running.
pub struct Binary {
    pub child: std::process::Child,
    pub addr: String,
}

impl Binary {
    pub fn start(dir: &std::path::Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// `start` with more `serve` arguments (e.g. `--nats URL`).
    pub fn start_with(dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::spawn(dir, extra, std::process::Stdio::null())
    }

    /// `start_with`, choosing where the log (stderr) goes, e.g. `Stdio::piped()` to read it.
    pub fn spawn(dir: &std::path::Path, extra: &[&str], stderr: std::process::Stdio) -> Self {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tickfan"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--no-simulator",
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|url| {
                url.strip_prefix("http://")
                    .or_else(|| url.strip_prefix("https://"))
            })
            .unwrap_or_else(|| panic!("no listening line: {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().ok()?.code()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `tickfan import --data-dir DIR FILES...` (the real binary); whether it exited 0, and
/// what it printed (stdout, then stderr).
pub fn import(dir: &std::path::Path, files: &[&std::path::Path]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tickfan"))
        .args(["import", "--data-dir"])
        .arg(dir)
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

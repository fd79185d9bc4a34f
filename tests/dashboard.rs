//! Browser end to end: Debian's Chromium (headless, driven through chromedriver over WebDriver
//! with `fantoccini`) loads the bundled dashboard from a real server on port 0 that this test
//! feeds, and we check what a user would see: the watchlist rows for the symbols we sent, a price
//! we sent, a mode change that the server acknowledges and then honours (ticks arrive as `batch`
//! messages), candles drawn on the chart canvas from `/api/bars`, and a server restart on the
//! same port that the page rides out by reconnecting and resuming with `since_seq`: no gap, no
//! duplicate, the seq it shows is the server's last. The page must log no console errors.
//! A screenshot is left at `target/dashboard.png`.
//!
//! Under CI (`CI=true`) the test must run; elsewhere it is skipped when Chromium or chromedriver
//! is not installed (`apt-get install chromium chromium-driver`).
//!
//! Every wait polls the page (`execute` returning JSON) or the server with a deadline.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Runs in every document before the page's own scripts (CDP
/// `Page.addScriptToEvaluateOnNewDocument`). It records what the page reports as errors
/// (`console.error`, uncaught exceptions, failed resource loads, unhandled rejections) and counts
/// the WebSocket messages the page receives by `type`, keeping the acks, so the test can see the
/// server's side of the conversation without the page having to expose it. It only listens: the
/// page's WebSocket behaves exactly as the native one.
const INSTRUMENT: &str = r#"
(() => {
  const rec = window.__e2e = { errors: [], types: {}, acks: [], trail: [] };
  const fmt = (a) => {
    if (a instanceof Error) return a.stack || String(a);
    if (typeof a === 'string') return a;
    try { return JSON.stringify(a); } catch (_) { return String(a); }
  };
  const consoleError = console.error.bind(console);
  console.error = (...args) => {
    rec.errors.push('console.error: ' + args.map(fmt).join(' '));
    consoleError(...args);
  };
  window.addEventListener('error', (ev) => {
    if (ev.target && ev.target !== window) {
      rec.errors.push('failed to load: ' + (ev.target.src || ev.target.href || ev.target.tagName));
    } else {
      rec.errors.push('uncaught: ' + (ev.error ? fmt(ev.error) : ev.message));
    }
  }, true);
  window.addEventListener('unhandledrejection', (ev) => {
    rec.errors.push('unhandled rejection: ' + fmt(ev.reason));
  });
  const Native = window.WebSocket;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => {
        let m;
        try { m = JSON.parse(ev.data); } catch (_) { return; }
        const t = m && m.type;
        rec.types[t] = (rec.types[t] || 0) + 1;
        // A compact trail of the conversation for failure messages: type, symbol and seqs.
        const seqs = (l) => (Array.isArray(l) ? l.map((x) => `${x.symbol}#${x.seq}`).join(',') : '');
        const line = t === 'tick' ? `tick ${m.symbol}#${m.seq}`
          : t === 'batch' ? `batch ${seqs(m.ticks)}`
          : t === 'snapshot' ? `snapshot ${m.symbol} gap=${m.gap} ${seqs(m.ticks)}`
          : t === 'heartbeat' || t === 'pong' ? null : JSON.stringify(m);
        if (line) {
          rec.trail.push(line);
          if (rec.trail.length > 60) rec.trail.shift();
        }
        if (t === 'ack') {
          rec.acks.push(m);
          if (rec.acks.length > 100) rec.acks.shift();
        }
      });
    }
  };
})();
"#;

/// What the test reads from the page on every poll.
const PAGE_STATE: &str = r#"
const t = window.tickfan;
if (!t || !t.state) return null;
const s = t.state;
const rows = {};
for (const tr of document.querySelectorAll('#watchlist-body tr[data-symbol]')) {
  rows[tr.dataset.symbol] = {
    price: tr.querySelector('td.price').textContent,
    seq: tr.querySelector('td.seq').textContent,
  };
}
const canvases = Array.from(document.querySelectorAll('#chart canvas'))
  .map((c) => ({ width: c.width, height: c.height }));
const c = t.client && t.client();
const statLabels = Array.from(document.querySelectorAll('#stats .stat .k, #client-stats .stat .k'))
  .map((k) => ({ text: k.textContent, cut: k.scrollWidth > k.clientWidth }));
return {
  connected: s.connected, status: s.status, epoch: s.epoch, mode: s.mode,
  lastSeq: s.lastSeq, messages: s.messages, ticks: s.ticks, duplicates: s.duplicates,
  gaps: s.gaps, snapshotGaps: s.snapshotGaps, reconnects: s.reconnects,
  reconnectAttempts: s.reconnectAttempts,
  selected: s.selected, barsDrawn: s.barsDrawn, rows, canvases,
  chartBars: t.chart.bars.map((b) => [b.t, Math.round(b.volume * 1e6) / 1e6]),
  latency: s.latency, statLabels,
  usesClient: !!(c && typeof c.subscribe === 'function' && c.lastSeq instanceof Map),
  e2e: window.__e2e || null,
};
"#;

/// Counts the chart's pixels in the candle colours (#26a69a up, #ef5350 down) across the
/// canvases inside `#chart`: proof that candles were painted, not just that a canvas exists.
const CANDLE_PIXELS: &str = r#"
let up = 0, down = 0;
for (const c of document.querySelectorAll('#chart canvas')) {
  if (!c.width || !c.height) continue;
  const ctx = c.getContext('2d');
  if (!ctx) continue;
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 200) continue;
    const near = (r, g, b) => Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 24;
    if (near(38, 166, 154)) up += 1; else if (near(239, 83, 80)) down += 1;
  }
}
return { up, down };
"#;

/// chromedriver and the Chromium it starts, in their own process group so that the whole tree
/// goes away when this is dropped (also when the test panics half way).
struct Browser {
    client: Client,
    driver: Child,
    driver_url: String,
    session: String,
    /// Fresh `--user-data-dir`, deleted after the processes are gone.
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The group id is chromedriver's pid (process_group(0) below); Chromium inherits it.
        let pgid = self.driver.id() as libc::pid_t;
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}

/// Whether this run must exercise the browser (CI) or may skip without one.
fn required() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A port nobody listens on right now (chromedriver has no `--port=0`).
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; `None` when the browser is not
    /// installed and this is not CI.
    async fn launch() -> Option<Browser> {
        Self::launch_with(&[]).await
    }

    /// [`Browser::launch`] with more Chromium flags.
    async fn launch_with(extra_args: &[&str]) -> Option<Browser> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            assert!(
                !required(),
                "CI=true but {missing:?} not installed (apt-get install chromium chromium-driver)"
            );
            eprintln!(
                "SKIPPED dashboard browser test: {missing:?} not installed \
                 (apt-get install chromium chromium-driver; CI=true makes this a failure)"
            );
            return None;
        }
        let http = reqwest::Client::new();
        // The port is free when picked but could be taken before chromedriver binds it: then
        // chromedriver exits at once and we try another.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut driver = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawn chromedriver");
            let driver_url = format!("http://127.0.0.1:{port}");
            let deadline = tokio::time::Instant::now() + DEADLINE;
            let ready = loop {
                if let Ok(Some(status)) = driver.try_wait() {
                    last_error = format!("chromedriver exited with {status}");
                    break false;
                }
                if let Ok(r) = http.get(format!("{driver_url}/status")).send().await {
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    if body["value"]["ready"] == true {
                        break true;
                    }
                }
                if tokio::time::Instant::now() >= deadline {
                    last_error = "chromedriver did not become ready".to_owned();
                    let _ = driver.kill();
                    let _ = driver.wait();
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !ready {
                continue;
            }
            let profile = tempfile::tempdir().unwrap();
            let caps = json!({
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new",
                        "--no-sandbox",
                        "--disable-gpu",
                        // Without these Chromium dials out (component updates, sync, field
                        // trials); this machine's closed network refuses it and it shows up as
                        // noise or stalls.
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--no-first-run",
                        "--disable-sync",
                        "--disable-dev-shm-usage",
                        "--window-size=1440,900",
                        format!("--user-data-dir={}", profile.path().display()),
                    ],
                },
                "goog:loggingPrefs": { "browser": "ALL" },
            });
            let mut caps = caps;
            if let Some(args) = caps["goog:chromeOptions"]["args"].as_array_mut() {
                args.extend(extra_args.iter().map(|a| json!(a)));
            }
            let Value::Object(caps) = caps else {
                unreachable!()
            };
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            // Drop order on failure: kill the driver (and any half-started Chromium) first.
            let client = match ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&driver_url)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    unsafe {
                        libc::kill(-(driver.id() as libc::pid_t), libc::SIGKILL);
                    }
                    let _ = driver.wait();
                    panic!("Chromium did not start through chromedriver: {e}");
                }
            };
            let session = client.session_id().await.unwrap().expect("session id");
            let browser = Browser {
                client,
                driver,
                driver_url,
                session,
                _profile: profile,
            };
            browser
                .cdp(
                    "Page.addScriptToEvaluateOnNewDocument",
                    json!({ "source": INSTRUMENT }),
                )
                .await;
            return Some(browser);
        }
        panic!("could not start chromedriver: {last_error}");
    }

    /// Sends a raw command to chromedriver for this session (what fantoccini does not wrap).
    async fn driver_post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.driver_url, self.session);
        let resp = reqwest::Client::new()
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {url}: {status} {v}");
        v["value"].clone()
    }

    async fn cdp(&self, cmd: &str, params: Value) -> Value {
        self.driver_post("goog/cdp/execute", json!({ "cmd": cmd, "params": params }))
            .await
    }

    /// Browser console entries since the last call (chromedriver hands each out once).
    async fn console_log(&self) -> Vec<Value> {
        match self
            .driver_post("se/log", json!({ "type": "browser" }))
            .await
        {
            Value::Array(v) => v,
            other => panic!("unexpected log answer: {other}"),
        }
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, Vec::new())
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    async fn page(&self) -> Value {
        self.js(PAGE_STATE).await
    }

    /// Polls the page until `pred` holds; fails with the last state seen.
    async fn wait_page(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let s = self.page().await;
            if !s.is_null() && pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for the page: {what}\nlast page state: {s:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A tick at `ts` with a trade id, so none is mistaken for a duplicate.
fn tick_at(sym: &str, ts: i64, price: f64, n: u64) -> Value {
    // Whole ten-thousandths: the page shows prices as sent, so keep them readable.
    let price = (price * 1e4).round() / 1e4;
    json!({"symbol": sym, "ts": ts, "price": price, "volume": 1.0 + n as f64, "id": format!("{sym}-{n}")})
}

/// Ingests and checks that every tick was accepted.
async fn ingest_all(producer: &mut Ws, ticks: &[Value]) {
    let ack = ingest(producer, ticks).await;
    assert_eq!(ack["accepted"], ticks.len(), "{ack}");
    assert_eq!(ack["rejected"], json!([]), "{ack}");
}

/// The server's last seq per symbol (`/api/symbols`).
async fn server_seqs(server: &TestServer) -> BTreeMap<String, u64> {
    let (status, body) = server.get_json("/api/symbols").await;
    assert_eq!(status, 200, "{body}");
    body["symbols"]
        .as_array()
        .expect("symbols list")
        .iter()
        .map(|s| {
            (
                s["symbol"].as_str().unwrap().to_owned(),
                s["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Whether the page's `lastSeq` and watchlist seq cells show exactly `want`.
fn page_at(s: &Value, want: &BTreeMap<String, u64>) -> bool {
    want.iter().all(|(sym, seq)| {
        s["lastSeq"][sym] == *seq && s["rows"][sym]["seq"].as_str() == Some(&seq.to_string())
    })
}

fn count(s: &Value, ty: &str) -> u64 {
    s["e2e"]["types"][ty].as_u64().unwrap_or(0)
}

fn screenshot_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard.png")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_end_to_end() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start_with(test_config()).await;
    let addr = server.addr;
    let symbols = ["AAPL", "BTC-USD", "ETH-USD"];
    let base = [187.25, 64_250.5, 3_120.75];

    // History the chart can draw: 13 ticks per symbol, 15 s apart, ending now, so each symbol
    // has 3-4 one-minute bars (all well inside validation.max_age_ms).
    let now = now_ms();
    let mut producer = server.producer().await;
    let mut n = 0u64;
    let mut history = Vec::new();
    for (sym, p) in symbols.iter().zip(base) {
        for k in 0..13i64 {
            n += 1;
            let wiggle = if k % 2 == 0 { 1.0 } else { -1.0 } * (k as f64) * 0.0004 * p;
            history.push(tick_at(sym, now - 180_000 + k * 15_000, p + wiggle, n));
        }
    }
    ingest_all(&mut producer, &history).await;
    let mut expected = server_seqs(&server).await;
    assert_eq!(
        expected.keys().map(String::as_str).collect::<Vec<_>>(),
        symbols,
        "server knows other symbols than we sent"
    );
    assert!(expected.values().all(|&s| s == 13), "{expected:?}");

    browser.client.goto(&server.http("/")).await.unwrap();

    // 1. The watchlist shows exactly the symbols we sent, with the seqs the server assigned.
    let s = browser
        .wait_page("connected, watchlist filled from history", |s| {
            s["connected"] == true && page_at(s, &expected)
        })
        .await;
    let epoch = s["epoch"].clone();
    assert!(!epoch.is_null(), "no epoch from welcome: {s:#}");
    let mut rows = Vec::new();
    for tr in browser
        .client
        .find_all(Locator::Css("#watchlist-body tr[data-symbol]"))
        .await
        .unwrap()
    {
        rows.push(tr.attr("data-symbol").await.unwrap().unwrap_or_default());
    }
    assert_eq!(rows, symbols, "watchlist rows");

    // 2. The chart: bars from /api/bars for the selected symbol, drawn on a real canvas.
    let s = browser
        .wait_page("chart bars drawn", |s| {
            s["barsDrawn"].as_u64().unwrap_or(0) > 0
                && s["canvases"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["width"] != 0 && c["height"] != 0))
        })
        .await;
    let selected = s["selected"]
        .as_str()
        .expect("a selected symbol")
        .to_owned();
    // The chart opens on the watchlist's first row, not on whichever symbol ticked first.
    assert_eq!(selected, "AAPL", "{s:#}");
    assert_eq!(
        s["usesClient"], true,
        "the page runs on the JS client: {s:#}"
    );
    // The page loads the client the server embeds, byte for byte the committed build.
    let served = reqwest::get(server.http("/tickfan.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/dist/tickfan.js"),
    )
    .unwrap();
    assert_eq!(
        served, committed,
        "/tickfan.js is the committed client build"
    );
    let (_, bars) = server
        .get_json(&format!("/api/bars/{selected}?tf=1m&limit=500"))
        .await;
    let server_bars = bars["bars"].as_array().expect("bars").len();
    assert!(
        server_bars >= 3,
        "ticks over 3 minutes make >= 3 bars: {bars}"
    );
    assert_eq!(
        s["barsDrawn"], server_bars,
        "the chart shows the server's bars"
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let px = browser.js(CANDLE_PIXELS).await;
        if px["up"].as_u64().unwrap_or(0) + px["down"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no candle-coloured pixels on the chart canvases: {px}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 3. A live price appears in the page, formatted as sent.
    n += 1;
    ingest_all(&mut producer, &[tick_at("AAPL", now_ms(), 187.4321, n)]).await;
    *expected.get_mut("AAPL").unwrap() += 1;
    browser
        .wait_page("live AAPL price", |s| {
            s["rows"]["AAPL"]["price"] == "187.4321" && page_at(s, &expected)
        })
        .await;
    let price = browser
        .client
        .find(Locator::Css(r#"tr[data-symbol="AAPL"] td.price"#))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(price, "187.4321", "rendered price cell");
    let s = browser.page().await;
    assert!(count(&s, "tick") > 0, "live ticks came as `tick`: {s:#}");
    assert_eq!(count(&s, "batch"), 0, "no batch before batch mode: {s:#}");

    // 4. The mode selector changes the server-side mode: the server acks `configure` with
    // mode batch, and from then on ticks arrive only inside `batch` messages.
    browser
        .client
        .find(Locator::Css("#mode-select"))
        .await
        .unwrap()
        .select_by_value("batch")
        .await
        .unwrap();
    let s = browser
        .wait_page("server acked batch mode", |s| {
            s["mode"] == "batch"
                && s["e2e"]["acks"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|a| a["op"] == "configure" && a["mode"] == "batch")
                })
        })
        .await;
    let ticks_before = count(&s, "tick");
    let mut live = Vec::new();
    for (sym, p) in symbols.iter().zip(base) {
        for _ in 0..3 {
            n += 1;
            live.push(tick_at(sym, now_ms(), p * 1.001, n));
        }
        *expected.get_mut(*sym).unwrap() += 3;
    }
    ingest_all(&mut producer, &live).await;
    let s = browser
        .wait_page("ticks delivered as batches", |s| {
            count(s, "batch") > 0 && page_at(s, &expected)
        })
        .await;
    assert_eq!(
        count(&s, "tick"),
        ticks_before,
        "a `tick` message arrived after the server acked batch mode: {s:#}"
    );
    assert_eq!(s["gaps"], 0, "{s:#}");

    // 5. Restart on the same port with the same data dir. The page must notice, retry,
    // reconnect to the new process and resume with since_seq: no hole, no duplicate.
    let before = browser.page().await;
    let config = server.config.clone();
    drop(producer);
    let down_at = now_ms();
    let dir = server.stop().await;
    // Stay down until the page has retried at least once and been refused (its first attempt
    // is scheduled on the close, the second after that attempt failed), like a real restart.
    browser
        .wait_page("page retried while the server was down", |s| {
            s["connected"] == false && s["reconnectAttempts"].as_u64().unwrap_or(0) >= 2
        })
        .await;
    let server = start_on(addr, config, dir).await;
    let up_at = now_ms();
    assert_eq!(
        server_seqs(&server).await,
        expected,
        "seqs survive the restart"
    );
    // Sent at once, most likely before the page's backoff timer reconnects it: these come
    // back through the since_seq replay. The next ones go out live.
    let mut producer = server.producer().await;
    let mut more = Vec::new();
    for (sym, p) in symbols.iter().zip(base) {
        n += 1;
        more.push(tick_at(sym, now_ms(), p * 1.002, n));
        *expected.get_mut(*sym).unwrap() += 1;
    }
    ingest_all(&mut producer, &more).await;
    browser
        .wait_page("page reconnected", |s| {
            s["connected"] == true && s["reconnects"].as_u64().unwrap_or(0) >= 1
        })
        .await;
    let mut more = Vec::new();
    for (sym, p) in symbols.iter().zip(base) {
        n += 1;
        more.push(tick_at(sym, now_ms(), p * 1.003, n));
        *expected.get_mut(*sym).unwrap() += 1;
    }
    ingest_all(&mut producer, &more).await;
    assert_eq!(server_seqs(&server).await, expected, "server seqs continue");
    let s = browser
        .wait_page("page resumed at the server's last seq", |s| {
            page_at(s, &expected)
        })
        .await;
    assert!(s["reconnects"].as_u64().unwrap() >= 1, "{s:#}");
    assert_eq!(
        s["epoch"], epoch,
        "epoch kept across a clean restart: {s:#}"
    );
    assert_eq!(s["gaps"], 0, "seq hole after the restart: {s:#}");
    assert_eq!(s["snapshotGaps"], 0, "server reported a history gap: {s:#}");
    assert_eq!(
        s["duplicates"], before["duplicates"],
        "ticks repeated after resuming: {s:#}"
    );
    assert_eq!(s["mode"], "batch", "mode re-requested on reconnect: {s:#}");
    assert!(s["barsDrawn"].as_u64().unwrap() > 0, "{s:#}");

    // No hole in the chart: the selected symbol's candles carry exactly the volume the
    // server's bars do, including the ticks sent while the page was away (each tick has a
    // distinct volume, so a missing or doubled tick shows).
    let (_, bars) = server
        .get_json(&format!("/api/bars/{selected}?tf=1m&limit=500"))
        .await;
    // As (bucket ms, volume) pairs, compared as numbers (JSON 9 and 9.0 are the same volume).
    let pairs = |v: &Value| -> Vec<(i64, f64)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|b| {
                        (
                            b[0].as_i64().unwrap_or(-1),
                            (b[1].as_f64().unwrap_or(-1.0) * 1e6).round() / 1e6,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let want: Vec<(i64, f64)> = bars["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["t"].as_i64().unwrap(),
                (b["volume"].as_f64().unwrap() * 1e6).round() / 1e6,
            )
        })
        .collect();
    let what = format!("chart bars match the server's after the restart: {want:?}");
    browser
        .wait_page(&what, |s| pairs(&s["chartBars"]) == want)
        .await;

    // The Server panel: short, distinct labels that fit; no negative latency.
    let labels = browser
        .wait_page("server panel filled", |s| {
            s["statLabels"].as_array().is_some_and(|l| l.len() > 10)
        })
        .await["statLabels"]
        .clone();
    let texts: Vec<&str> = labels
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    let distinct: std::collections::BTreeSet<&str> = texts.iter().copied().collect();
    assert_eq!(distinct.len(), texts.len(), "duplicate labels: {texts:?}");
    for l in labels.as_array().unwrap() {
        assert_eq!(l["cut"], false, "label cut off: {l}");
    }
    for want in [
        "uptime",
        "connections",
        "latency p50",
        "latency p99",
        "queue",
    ] {
        assert!(texts.contains(&want), "{want} missing from {texts:?}");
    }
    let lat = &browser.page().await["latency"];
    for q in ["p50", "p99"] {
        if let Some(v) = lat[q].as_f64() {
            assert!(v >= 0.0, "negative latency {q}: {lat}");
        }
    }

    // 6. A picture for people, then the console.
    let png = browser.client.screenshot().await.unwrap();
    let shot = screenshot_path();
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, png).unwrap();
    eprintln!("dashboard screenshot: {}", shot.display());

    let page_errors = browser.page().await["e2e"]["errors"].clone();
    assert_eq!(page_errors, json!([]), "the page reported errors");
    // While the server is down the page's reconnect attempts are refused, and Chromium itself
    // logs each as "WebSocket connection to 'ws://ADDR/ws' failed: ..." at level SEVERE. That
    // line comes from the browser's network stack, not from the page (which handles the failure
    // in onclose and retries with backoff), and no script can suppress it, so it is the one
    // expected entry: exactly that text, for this server's /ws, while the server was down
    // (plus a second of slack for clock granularity).
    let ws_failed = format!("WebSocket connection to 'ws://{addr}/ws' failed");
    let mut unexpected = Vec::new();
    let mut refused = 0;
    for e in browser.console_log().await {
        if e["level"] != "SEVERE" {
            continue;
        }
        let msg = e["message"].as_str().unwrap_or_default();
        let ts = e["timestamp"].as_f64().unwrap_or(0.0);
        if msg.contains(&ws_failed) && ts >= (down_at - 1000) as f64 && ts <= (up_at + 1000) as f64
        {
            refused += 1;
            continue;
        }
        unexpected.push(e);
    }
    assert!(
        unexpected.is_empty(),
        "console errors in the page: {unexpected:#?}"
    );
    eprintln!("ignored {refused} refused WebSocket reconnect attempt(s) during the restart");

    let _ = browser.client.clone().close().await;
    drop(browser);
    let _ = server.stop().await;
}

/// The dashboard over `https://` from a TLS listener (certificates made by the test; Chromium
/// is told to accept the test CA's leaf with `--ignore-certificate-errors`): the page loads,
/// connects over `wss://` (it picks the scheme from the page's) and shows ticks as they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_over_https() {
    let Some(browser) = Browser::launch_with(&["--ignore-certificate-errors"]).await else {
        return;
    };
    let pki = common::tls::Pki::new();
    let server = TestServer::start_with(pki.config()).await;
    let addr = server.addr.to_string();
    let mut producer = common::tls::wss(&pki, &addr, "/ingest").await;
    ingest_all(&mut producer, &[tick_at("SECURE", now_ms(), 42.5, 1)]).await;

    browser
        .client
        .goto(&format!("https://{addr}/"))
        .await
        .unwrap();
    browser
        .wait_page("connected over wss, watchlist filled", |s| {
            s["connected"] == true && s["rows"]["SECURE"]["seq"] == "1"
        })
        .await;
    // A tick sent now reaches the page live over wss.
    ingest_all(&mut producer, &[tick_at("SECURE", now_ms(), 43.25, 2)]).await;
    let s = browser
        .wait_page("a live tick over wss", |s| {
            s["rows"]["SECURE"]["seq"] == "2" && count(s, "tick") >= 1
        })
        .await;
    assert!(
        s["rows"]["SECURE"]["price"]
            .as_str()
            .is_some_and(|p| p.contains("43.25")),
        "{s:#}"
    );
    let schemes = browser
        .js("return [location.protocol, performance.getEntriesByType('resource').filter((e) => e.name.startsWith('http:')).length]")
        .await;
    assert_eq!(
        schemes,
        json!(["https:", 0]),
        "the page and everything it loaded is https"
    );
    assert_eq!(s["e2e"]["errors"], json!([]), "page errors: {s:#}");
    let handshakes = common::tls::metric(&pki, &addr, "tickfan_tls_handshakes_total").await;
    assert!(handshakes >= 3.0, "page, script and wss: {handshakes}");
}

/// Chromium offers permessage-deflate on its own; the server accepts it with no context
/// takeover, and the page's ticks arrive compressed (the server counts RSV1 frames, and this
/// page's socket is its only client) and parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_negotiates_permessage_deflate() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start().await;
    // A page of this server that opens no WebSocket of its own.
    browser.client.goto(&server.http("/health")).await.unwrap();
    let open = format!(
        r#"
        const rec = window.__dfl = {{ ext: null, acked: false, seqs: [], errors: [] }};
        const ws = new WebSocket('ws://{}/ws');
        ws.onopen = () => {{
          rec.ext = ws.extensions;
          ws.send(JSON.stringify({{ op: 'subscribe', id: 1, symbols: ['CHR'] }}));
        }};
        ws.onmessage = (ev) => {{
          const m = JSON.parse(ev.data);
          if (m.type === 'ack' && m.id === 1) rec.acked = true;
          if (m.type === 'tick' && m.symbol === 'CHR') rec.seqs.push(m.seq);
        }};
        ws.onerror = () => rec.errors.push('error');
        ws.onclose = (ev) => rec.errors.push('closed ' + ev.code);
        return true;
        "#,
        server.addr
    );
    browser.js(&open).await;
    let state = |pred: fn(&Value) -> bool| {
        let browser = &browser;
        async move {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                let s = browser.js("return window.__dfl;").await;
                if pred(&s) {
                    return s;
                }
                assert!(tokio::time::Instant::now() < deadline, "page state: {s:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let s = state(|s| s["acked"] == true).await;
    assert_eq!(
        s["ext"], "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "{s:#}"
    );
    let mut producer = server.producer().await;
    let now = now_ms();
    let ticks: Vec<Value> = (0..20)
        .map(|n| tick_at("CHR", now + n as i64, 100.0 + n as f64, n))
        .collect();
    ingest_all(&mut producer, &ticks).await;
    let s = state(|s| s["seqs"].as_array().is_some_and(|v| v.len() == 20)).await;
    assert_eq!(s["seqs"], json!((1..=20).collect::<Vec<u64>>()), "{s:#}");
    assert_eq!(s["errors"], json!([]), "{s:#}");
    assert_eq!(server.metric("tickfan_deflate_connections").await, 1.0);
    assert_eq!(
        server.metric("tickfan_deflate_frames_sent_total").await,
        20.0
    );
    let _ = browser.client.clone().close().await;
    drop(browser);
    let _ = server.stop().await;
}

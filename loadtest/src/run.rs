//! The run's timeline: ramp up the connections (bounded concurrency), then the measurement
//! window (producer on), then a short drain, then a clean close. While it waits it ticks
//! the stats epoch every 100 ms and prints the live line once a second; around the window
//! it samples the server's and its own CPU and RSS. With `--churn` it asks random clients
//! to disconnect and resume during the window; with `--sample-secs` it keeps the soak's
//! time series (`soak`). It returns the raw [`Outcome`]; the
//! summary is built after the runtime has shut down (see `main`), when every thread has
//! flushed its counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::client::{self, ClientCtx};
use crate::producer::{self, ProducerConfig, ProducerLive, ProducerReport};
use crate::report::{self, Latency, LiveSnapshot};
use crate::soak::{Sampler, SoakConfig, SoakSample};
use crate::stats::{self, Counters, Phase, CONNS};
use crate::sysinfo::{self, ProcSample};

/// How long the end of a soak waits for the server's fd count to come back to its
/// start-of-window level (less connections) before it records what it sees.
const FD_SETTLE: Duration = Duration::from_secs(10);

/// How often threads are asked to flush their counters.
const EPOCH_STEP: Duration = Duration::from_millis(100);

/// Pause after the ramp before reading the server's memory in `--idle`, so that
/// allocations made right after the last subscribe are in.
const IDLE_SETTLE: Duration = Duration::from_millis(500);

/// Server RSS around an idle run, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct IdleRss {
    /// Before connecting.
    pub before: u64,
    /// Just after every connection settled.
    pub connected: u64,
    /// At the end of the idle window.
    pub held: u64,
    /// Connections open at the end of the window.
    pub connections: i64,
}

/// Extra time, past the close timeout, that connection tasks get to finish.
const JOIN_GRACE: Duration = Duration::from_secs(4);

/// Everything `run` needs, already validated by `main`.
#[derive(Debug)]
pub struct RunConfig {
    pub ctx: Arc<ClientCtx>,
    pub connections: usize,
    pub connect_concurrency: usize,
    pub ramp_timeout: Duration,
    pub duration: Duration,
    pub drain: Duration,
    /// `--idle`: measure the server's memory per connection instead of throughput.
    pub idle: bool,
    /// The producers (one per `--ingest-url`), when `--rate` > 0.
    pub producers: Vec<ProducerConfig>,
    pub server_pid: Option<u32>,
    /// Print the live line (off with `--quiet`).
    pub live: bool,
    /// Churn disconnects per second during the window (0: none).
    pub churn_per_sec: f64,
    /// Soak sampling (`--sample-secs` with `--server-pid`).
    pub soak: Option<SoakConfig>,
}

/// CPU/RSS readings at the start and end of the measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Samples {
    pub start: Option<ProcSample>,
    pub end: Option<ProcSample>,
}

/// What the run measured, before the final counter flush.
#[derive(Debug, Default)]
pub struct Outcome {
    pub ramp_secs: f64,
    pub window_secs: f64,
    pub drain_secs: f64,
    pub producer: Option<ProducerReport>,
    pub server: Samples,
    pub client: Samples,
    /// Server RSS around an idle run (`--idle`).
    pub idle_rss: Option<IdleRss>,
    /// Connections still open when the window ended.
    pub open_at_end: i64,
    /// SYNs the kernel dropped on a full accept queue during the ramp (system-wide).
    pub listen_overflows: u64,
    /// The soak's samples, and the server's fds before the ramp and (fds, open
    /// connections) at the window start and at the end.
    pub soak_samples: Vec<SoakSample>,
    pub fds_before_connect: Option<u64>,
    pub fd_start: Option<(u64, i64)>,
    pub fd_end: Option<(u64, i64)>,
}

/// The live reporter: remembers the previous totals to print per-second deltas.
struct Live {
    enabled: bool,
    started: Instant,
    last_print: Instant,
    last_counters: Counters,
    producer: Vec<Arc<ProducerLive>>,
    last_producer: (u64, u64, u64),
    server_pid: Option<u32>,
    last_server: Option<ProcSample>,
    phase: &'static str,
    sampler: Option<Sampler>,
}

/// Set by Ctrl-C / SIGTERM: every remaining phase is cut short, so that the summary of
/// what was measured so far is still printed.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn watch_signals() {
    tokio::spawn(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("interrupted: finishing early and printing what was measured");
        INTERRUPTED.store(true, Relaxed);
    });
}

impl Live {
    /// Sleeps until `until` or until `done()` is true (or the run is interrupted),
    /// flushing and reporting meanwhile.
    async fn wait(&mut self, until: Instant, done: impl Fn() -> bool) {
        loop {
            if done() || INTERRUPTED.load(Relaxed) {
                return;
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(EPOCH_STEP)).await;
            stats::bump_epoch();
            if self.last_print.elapsed() >= Duration::from_secs(1) {
                self.print();
            }
            if let Some(s) = self.sampler.as_mut().filter(|s| s.due()) {
                s.sample(
                    if self.phase == "drain" {
                        "drain"
                    } else {
                        "run"
                    },
                    true,
                );
            }
        }
    }

    fn print(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_print).as_secs_f64();
        self.last_print = now;
        let (total, interval) = stats::take_interval();
        let mut delta = total;
        delta.messages -= self.last_counters.messages;
        delta.bytes -= self.last_counters.bytes;
        delta.deliveries -= self.last_counters.deliveries;
        self.last_counters = total;
        let producer = (!self.producer.is_empty()).then(|| {
            let sum = |f: fn(&ProducerLive) -> &AtomicU64| {
                self.producer
                    .iter()
                    .map(|p| f(p).load(Relaxed))
                    .sum::<u64>()
            };
            let cur = (
                sum(|p| &p.ticks_sent),
                sum(|p| &p.accepted),
                sum(|p| &p.refused),
            );
            let prev = std::mem::replace(&mut self.last_producer, cur);
            (cur.0 - prev.0, cur.1 - prev.1, cur.2 - prev.2)
        });
        let server = self.server_pid.and_then(|p| sysinfo::sample(Some(p)).ok());
        let server_cpu_pct = match (server, self.last_server) {
            (Some(now_s), Some(prev)) => {
                Some(100.0 * (now_s.cpu_ns.saturating_sub(prev.cpu_ns)) as f64 / (dt * 1e9))
            }
            _ => None,
        };
        if server.is_some() {
            self.last_server = server;
        }
        if !self.enabled {
            return;
        }
        let snap = LiveSnapshot {
            phase: self.phase,
            elapsed_secs: self.started.elapsed().as_secs_f64(),
            dt_secs: dt,
            open: CONNS.open.load(Relaxed),
            subscribed: CONNS.subscribed.load(Relaxed),
            failed: CONNS.failed.load(Relaxed),
            lost: CONNS.lost.load(Relaxed),
            delta,
            total,
            latency: Latency::of(&interval),
            producer,
            server_cpu_pct,
            server_rss: server.and_then(|s| s.rss_bytes),
        };
        eprintln!("{}", report::live_line(&snap));
    }
}

/// Asks `per_sec` random clients a second to disconnect and resume, spread evenly over
/// the second, until aborted. The schedule is kept by the clock, not by counting timer
/// ticks: a wake-up that comes late (a busy runtime, a busy machine) sends what is due,
/// up to a tenth of a second's worth at once, so the rate holds without big bursts. A
/// client asked again before it reconnected does it once its new connection is up.
async fn churn(ctx: Arc<ClientCtx>, per_sec: f64) {
    let step = Duration::from_secs_f64((1.0 / per_sec).max(0.001));
    let most_at_once = (per_sec / 10.0).ceil().max(1.0) as u64;
    let mut rng = fastrand::Rng::new();
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        tokio::time::sleep(step).await;
        let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
        // More than a second behind: give up the excess rather than catch up in a burst.
        sent = sent.max(due.saturating_sub(per_sec.ceil() as u64));
        let now = due.saturating_sub(sent).min(most_at_once);
        for _ in 0..now {
            let i = rng.usize(..ctx.churn.len());
            ctx.churn[i].notify_one();
        }
        sent += now;
        CONNS.churn_requested.fetch_add(now, Relaxed);
    }
}

/// The end-of-soak fd reading: churn is over and the producer gone, so the server's
/// fds less the open connections should be back where they were at the window start
/// (closed sockets may take a moment to be reaped). Polls until they are, or for
/// [`FD_SETTLE`], and records the last reading as the `end` sample.
async fn settle_fds(sampler: &mut Sampler, start: Option<(u64, i64)>) -> Option<(u64, i64)> {
    let deadline = Instant::now() + FD_SETTLE;
    loop {
        let now = sampler.sample("end", false).map(|s| (s.fds, s.open));
        let settled = match (start, now) {
            (Some((f0, o0)), Some((f1, o1))) => f1 as i64 - o1 == f0 as i64 - o0,
            _ => true,
        };
        if settled || Instant::now() >= deadline || INTERRUPTED.load(Relaxed) {
            if let Some(s) = sampler.samples.last() {
                eprintln!("end: server fds {} with {} connections open", s.fds, s.open);
            }
            return now;
        }
        // Keep only the last "end" reading in the series.
        sampler.samples.pop();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the whole test.
///
/// # Errors
/// Fails only on setup problems; connection failures are counted, not returned.
pub async fn run(cfg: RunConfig) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let sample_server = || cfg.server_pid.and_then(|p| sysinfo::sample(Some(p)).ok());
    if let Some(pid) = cfg.server_pid {
        sysinfo::sample(Some(pid))
            .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid} (--server-pid): {e}"))?;
    }
    watch_signals();
    let started = Instant::now();
    let mut live = Live {
        enabled: cfg.live,
        started,
        last_print: started,
        last_counters: Counters::default(),
        producer: Vec::new(),
        last_producer: (0, 0, 0),
        server_pid: cfg.server_pid,
        last_server: sample_server(),
        phase: "ramp",
        sampler: None,
    };
    let rss_before = sample_server().and_then(|s| s.rss_bytes);
    out.fds_before_connect = cfg.server_pid.and_then(|p| sysinfo::fd_count(p).ok());
    let overflows_before = sysinfo::listen_overflows();

    // Ramp: a spawner task hands out connect permits; we report until all settle.
    let (stop_tx, stop_rx) = watch::channel(false);
    let n = cfg.connections;
    let ramp_deadline = started + cfg.ramp_timeout;
    // Tells the spawner to stop starting connections (ramp timeout or interrupt).
    let ramp_over = Arc::new(Notify::new());
    let spawner: JoinHandle<Vec<JoinHandle<()>>> = {
        let sem = Arc::clone(&cfg.ctx.connect_sem);
        let ctx = Arc::clone(&cfg.ctx);
        let stop_rx = stop_rx.clone();
        let ramp_over = Arc::clone(&ramp_over);
        tokio::spawn(async move {
            let mut handles = Vec::with_capacity(n);
            for i in 0..n {
                let permit = tokio::select! {
                    p = Arc::clone(&sem).acquire_owned() => p.expect("semaphore never closed"),
                    _ = ramp_over.notified() => break,
                };
                handles.push(tokio::spawn(client::run(
                    Arc::clone(&ctx),
                    i,
                    permit,
                    stop_rx.clone(),
                )));
            }
            handles
        })
    };
    live.wait(ramp_deadline, || CONNS.settled.load(Relaxed) >= n as u64)
        .await;
    // notify_one keeps a permit if the spawner is not waiting right now.
    ramp_over.notify_one();
    out.ramp_secs = started.elapsed().as_secs_f64();
    if CONNS.settled.load(Relaxed) < n as u64 && !INTERRUPTED.load(Relaxed) {
        eprintln!(
            "ramp timeout after {:.1} s: {} of {n} connections settled; measuring what is up",
            out.ramp_secs,
            CONNS.settled.load(Relaxed)
        );
    }
    let handles = spawner.await.unwrap_or_default();
    if let (Some(before), Some(after)) = (overflows_before, sysinfo::listen_overflows()) {
        out.listen_overflows = after.saturating_sub(before);
        if out.listen_overflows > 0 {
            eprintln!(
                "ramp: the kernel dropped {} connection attempts on a full accept queue \
                 (ListenOverflows); each waits a 1 s SYN retransmit. The server's listen \
                 backlog is too small for --connect-concurrency {}.",
                out.listen_overflows, cfg.connect_concurrency
            );
        }
    }

    let mut rss_connected = None;
    if cfg.idle {
        tokio::time::sleep(IDLE_SETTLE).await;
        rss_connected = sample_server().and_then(|s| s.rss_bytes);
        if let (Some(b), Some(a)) = (rss_before, rss_connected) {
            let up = CONNS.open.load(Relaxed);
            eprintln!(
                "idle: server RSS {} before, {} with {up} connections up: {} per connection",
                report::fmt_bytes(b as f64),
                report::fmt_bytes(a as f64),
                report::fmt_bytes((a as f64 - b as f64) / up.max(1) as f64)
            );
        }
    }

    // Measurement window.
    stats::bump_epoch();
    stats::set_phase(Phase::Measure);
    live.phase = if cfg.idle { "idle" } else { "run" };
    out.server.start = sample_server();
    out.client.start = sysinfo::sample(None).ok();
    if let (Some(pid), Some(soak)) = (cfg.server_pid, &cfg.soak) {
        let mut sampler = Sampler::new(pid, soak)?;
        out.fd_start = sampler.sample("run", true).map(|s| (s.fds, s.open));
        live.sampler = Some(sampler);
    }
    let window_start = Instant::now();
    let churn = (cfg.churn_per_sec > 0.0 && !cfg.ctx.churn.is_empty())
        .then(|| tokio::spawn(churn(Arc::clone(&cfg.ctx), cfg.churn_per_sec)));
    let (prod_stop_tx, prod_stop_rx) = watch::channel(false);
    let producers: Vec<_> = cfg
        .producers
        .iter()
        .cloned()
        .map(|pc| {
            let plive = Arc::new(ProducerLive::default());
            live.producer.push(Arc::clone(&plive));
            producer::spawn(pc, plive, prod_stop_rx.clone())
        })
        .collect();
    live.wait(window_start + cfg.duration, || false).await;
    if let (true, Some(before), Some(connected)) = (cfg.idle, rss_before, rss_connected) {
        // Idle connections are held for the whole window: a server may shrink them meanwhile
        // (tickfan parks quiet ones), and what holding them costs is what counts.
        if let Some(held) = sample_server().and_then(|s| s.rss_bytes) {
            out.idle_rss = Some(IdleRss {
                before,
                connected,
                held,
                connections: CONNS.open.load(Relaxed),
            });
        }
    }
    let _ = prod_stop_tx.send(true);
    if let Some(c) = churn {
        c.abort();
    }
    out.window_secs = window_start.elapsed().as_secs_f64();

    // Drain: ticks already accepted are still on their way to the clients.
    live.phase = "drain";
    stats::set_phase(Phase::Drain);
    let drain_start = Instant::now();
    live.wait(drain_start + cfg.drain, || false).await;
    out.drain_secs = drain_start.elapsed().as_secs_f64();
    out.server.end = sample_server();
    out.client.end = sysinfo::sample(None).ok();
    out.open_at_end = CONNS.open.load(Relaxed);
    stats::set_phase(Phase::Done);
    for h in producers {
        let report = tokio::task::spawn_blocking(move || h.join().ok())
            .await
            .ok()
            .flatten();
        if let Some(report) = report {
            match &mut out.producer {
                Some(all) => all.merge(report),
                None => out.producer = Some(report),
            }
        }
    }
    if let Some(mut sampler) = live.sampler.take() {
        out.fd_end = settle_fds(&mut sampler, out.fd_start).await;
        out.soak_samples = std::mem::take(&mut sampler.samples);
    }

    // Close everything cleanly, but do not wait forever on a stuck server.
    let _ = stop_tx.send(true);
    let join_deadline = Instant::now() + JOIN_GRACE;
    for h in handles {
        let abort = h.abort_handle();
        if tokio::time::timeout_at(join_deadline.into(), h)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    stats::flush_thread();
    Ok(out)
}

//! `tickfan-loadtest`: opens N subscribed client connections to a tickfan server,
//! optionally drives a producer at R ticks/s, and reports delivery rate, seq gaps and
//! duplicates, latency from `t_in`, closes and errors, and (with `--server-pid`) the
//! server's CPU per delivered message and memory per connection. For a soak it adds
//! churn (random clients disconnect and resume, `--churn`), lossless checking across
//! reconnects (`--lossless`), a time series of the server's RSS, fds and CPU
//! (`--sample-secs`, `--csv`) and a pass/fail verdict.
//!
//! This file is only the command line: parse, validate, build the runtime, run, report.
//! `run` owns the timeline, `client` one connection, `producer` the `/ingest` feed,
//! `net` loopback sockets and source addresses, `stats` the counters, `report` the output,
//! `sysinfo` `/proc` and rlimits. `tickfan-loadtest ceiling` runs `ceiling`, the bare
//! fan-out server tickfan is compared with.

mod ceiling;
mod client;
mod net;
mod producer;
mod report;
mod run;
mod soak;
mod stats;
mod sysinfo;
mod ws;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::http::Uri;

use crate::client::{ClientCtx, Endpoint, Subscription, SymbolIndex};
use crate::producer::ProducerConfig;
use crate::report::{ConfigEcho, ConnSummary, IdleMemory, Latency, ProcSummary, Summary};
use crate::run::{RunConfig, Samples};
use crate::soak::{SoakConfig, SoakVerdict, VerdictInputs};
use crate::stats::CONNS;

/// File descriptors kept free for everything that is not a client connection (the
/// producer, /proc reads, the runtime's own fds, stdout/stderr).
const SPARE_FDS: u64 = 64;

/// Delivery mode requested in every client's subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Realtime,
    Throttled,
    Batch,
    Smart,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Realtime => "realtime",
            Mode::Throttled => "throttled",
            Mode::Batch => "batch",
            Mode::Smart => "smart",
        }
    }
}

/// Load-test client for the tickfan WebSocket fan-out server.
#[derive(Debug, Parser)]
#[command(name = "tickfan-loadtest", version, about)]
struct Args {
    /// Server base URL (ws:// or http://, no path); /ws and /ingest are appended. A
    /// comma-separated list (the nodes of a cluster) spreads the clients round-robin.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// Where the producer sends (/ingest), when not --url's first server. A comma-separated
    /// list starts one producer per URL, each at rate/N, each with its own share of the
    /// symbols (or all of them with --shared-symbols).
    #[arg(long)]
    ingest_url: Option<String>,
    /// With several --ingest-url producers: every producer sends every symbol, so the
    /// nodes contend for each symbol's seq chain (default: the symbols are split).
    #[arg(long)]
    shared_symbols: bool,
    /// Skip this many source-address blocks (of --conns-per-ip) first, so several
    /// load-test processes on one box use disjoint 127.0.0.x addresses.
    #[arg(long, default_value_t = 0)]
    source_offset: usize,
    /// Speak TLS to the server (wss:// for clients and the producer), trusting the CA
    /// certificate(s) in this PEM file; --url stays ws://HOST:PORT.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Allow a server that is not on a loopback address.
    #[arg(long)]
    allow_remote: bool,
    /// Client connections to open (N).
    #[arg(short = 'c', long, default_value_t = 100)]
    connections: usize,
    /// Symbol universe: a count S (named PREFIX0..PREFIX{S-1}) or a comma-separated list.
    #[arg(long, default_value = "100")]
    symbols: String,
    /// Prefix of generated symbol names.
    #[arg(long, default_value = "LT")]
    symbol_prefix: String,
    /// Symbols each client subscribes to (K of S, spread evenly).
    #[arg(short = 'k', long, default_value_t = 10)]
    symbols_per_client: usize,
    /// Delivery mode asked for in the subscribe.
    #[arg(long, value_enum, default_value_t = Mode::Realtime)]
    mode: Mode,
    /// interval_ms of throttled/batch/smart modes.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// min_quality filter (0-100).
    #[arg(long, default_value_t = 0)]
    min_quality: u32,
    /// min_volume filter.
    #[arg(long, default_value_t = 0.0)]
    min_volume: f64,
    /// Client token (sent as Authorization: Bearer).
    #[arg(long)]
    token: Option<String>,
    /// Producer token for /ingest (defaults to --token).
    #[arg(long)]
    ingest_token: Option<String>,
    /// Producer rate in ticks per second over /ingest (0: no producer).
    #[arg(short = 'r', long, default_value_t = 0.0)]
    rate: f64,
    /// Producer pacing step in ms: each step sends the ticks that are due as one frame.
    #[arg(long, default_value_t = 5)]
    batch_ms: u64,
    /// Length of the measurement window in seconds (after the ramp-up).
    #[arg(short = 'd', long, default_value_t = 10.0)]
    duration: f64,
    /// How long clients keep counting after the producer stops, for ticks in flight.
    #[arg(long, default_value_t = 1000)]
    drain_ms: u64,
    /// Hold N subscribed connections with no producer and report the server's RSS
    /// growth per connection at the end of the window (and just after connecting).
    #[arg(long)]
    idle: bool,
    /// Server process id: report its CPU time and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Runtime worker threads (the server wants the other core).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connections in their connect/handshake phase at once. Kept below the common listen
    /// backlog of 128: past it the server's kernel drops SYNs and each costs a 1 s retry.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Connections per loopback source address (127.0.0.1, then .2, ...). Below both the
    /// ephemeral port range and the server's default max_connections_per_ip.
    #[arg(long, default_value_t = 10_000)]
    conns_per_ip: usize,
    /// Timeout of one TCP connect plus WebSocket handshake, in ms.
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Give up waiting for connections to come up after this many seconds.
    #[arg(long, default_value_t = 60)]
    ramp_timeout: u64,
    /// Bytes asked for by one read, in KiB. The read buffer belongs to the worker thread,
    /// not to the connection; a connection keeps only an incomplete frame between reads.
    #[arg(long, default_value_t = 64)]
    read_buffer_kb: usize,
    /// Subscribers offer permessage-deflate (`permessage-deflate; client_max_window_bits`,
    /// as browsers do), require it, and inflate every compressed message before checking it.
    #[arg(long)]
    deflate: bool,
    /// Make the first M clients slow consumers (they pause --slow-ms after every message),
    /// to check that the server cuts them off (4008) without slowing the others.
    #[arg(long, default_value_t = 0)]
    slow_clients: usize,
    /// Pause of each slow client after every message, in ms.
    #[arg(long, default_value_t = 10)]
    slow_ms: u64,
    /// No live line on stderr.
    #[arg(short, long)]
    quiet: bool,
    /// Churn: this many clients a second (picked at random, spread over the second)
    /// close their connection cleanly and reconnect at once, resuming with since_seq.
    /// Only during the window. Implies --lossless.
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Lossless clients: the first subscribe ack's last_seq is each client's baseline,
    /// every later seq must arrive exactly once across all its connections, and a client
    /// whose connection ends (churn or loss) reconnects and resumes with since_seq.
    #[arg(long)]
    lossless: bool,
    /// Soak sampling: read the server's RSS, open fds and CPU every this many seconds
    /// (needs --server-pid; 0: off), print each sample and judge the run at the end.
    #[arg(long, default_value_t = 0.0)]
    sample_secs: f64,
    /// Append the soak samples to this CSV file as they are taken.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Seconds from the window start before RSS flatness is judged.
    #[arg(long, default_value_t = 60.0)]
    warmup_secs: f64,
    /// Largest allowed deviation of an RSS sample from the post-warm-up mean, in %.
    #[arg(long, default_value_t = 5.0)]
    rss_tolerance_pct: f64,
    /// Largest allowed change of (server fds - open connections) from the window start to
    /// the end.
    #[arg(long, default_value_t = 8)]
    fd_tolerance: i64,
}

/// The server address and the two endpoint URLs derived from `--url`.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    ws_url: String,
    ingest_url: String,
}

fn parse_target(url: &str, allow_remote: bool) -> anyhow::Result<Target> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("--url {url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("ws" | "http") => {}
        Some("wss" | "https") => bail!("--url: for TLS keep ws:// and add --tls-ca FILE"),
        _ => bail!("--url must start with ws:// (or http://)"),
    }
    if !matches!(uri.path(), "" | "/") {
        bail!("--url takes the server base (ws://HOST:PORT); /ws and /ingest are appended");
    }
    let host = uri.host().context("--url has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    // Prefer IPv4: source-address spreading works over 127.0.0.0/8 only.
    let addr = addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("{host} resolves to nothing"))?;
    if !addr.ip().is_loopback() && !allow_remote {
        bail!(
            "{host} ({}) is not a loopback address; pass --allow-remote to load-test it",
            addr.ip()
        );
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    Ok(Target {
        addr,
        ws_url: format!("ws://{authority}/ws"),
        ingest_url: format!("ws://{authority}/ingest"),
    })
}

/// `--symbols`: a count or a list.
fn parse_symbols(spec: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    let spec = spec.trim();
    if let Ok(n) = spec.parse::<usize>() {
        if n == 0 {
            bail!("--symbols must be at least 1");
        }
        return Ok((0..n).map(|i| format!("{prefix}{i}")).collect());
    }
    let mut list: Vec<String> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let before = list.len();
    list.sort();
    list.dedup();
    if list.len() != before {
        eprintln!("--symbols: duplicate names removed");
    }
    if list.is_empty() {
        bail!("--symbols is empty");
    }
    Ok(list)
}

/// Exit codes: 0 the test ran; 1 it ran but measured nothing useful (no connection came
/// up, or the producer failed); 2 bad arguments or setup.
fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tickfan-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn try_main() -> anyhow::Result<ExitCode> {
    // `tickfan-loadtest ceiling ...` runs the bare comparison server instead of a test.
    if std::env::args_os().nth(1).is_some_and(|a| a == "ceiling") {
        let args = ceiling::CeilingArgs::parse_from(std::env::args_os().skip(1));
        ceiling::main(args)?;
        return Ok(ExitCode::SUCCESS);
    }
    let args = Args::parse();
    if let Some(ca) = &args.tls_ca {
        net::use_tls(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
    }
    if !(args.duration > 0.0 && args.duration <= 86_400.0) {
        bail!("--duration must be > 0 and at most 86400 seconds");
    }
    if args.idle && args.rate > 0.0 {
        bail!("--idle runs without a producer; drop --rate");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a finite number >= 0");
    }
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if !(args.churn >= 0.0 && args.churn.is_finite()) {
        bail!("--churn must be a finite number >= 0");
    }
    if args.churn > 0.0 && args.connections == 0 {
        bail!("--churn needs connections");
    }
    if !(args.sample_secs >= 0.0 && args.sample_secs.is_finite()) {
        bail!("--sample-secs must be a finite number >= 0");
    }
    if args.sample_secs > 0.0 && args.server_pid.is_none() {
        bail!("--sample-secs samples the server: give --server-pid");
    }
    if args.csv.is_some() && args.sample_secs <= 0.0 {
        bail!("--csv needs --sample-secs");
    }
    let lossless = args.lossless || args.churn > 0.0;
    if lossless && !matches!(args.mode, Mode::Realtime | Mode::Batch) {
        bail!("--lossless and --churn check every seq: use --mode realtime or batch");
    }
    if lossless && (args.min_quality > 0 || args.min_volume > 0.0) {
        bail!("--lossless and --churn check every seq: filters would hold ticks back");
    }
    if args.idle && args.server_pid.is_none() {
        eprintln!("warning: --idle without --server-pid cannot report memory per connection");
    }
    let targets = args
        .url
        .split(',')
        .map(|u| parse_target(u.trim(), args.allow_remote))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ingest_targets = match &args.ingest_url {
        Some(list) => list
            .split(',')
            .map(|u| parse_target(u.trim(), args.allow_remote))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => vec![parse_target(
            targets[0].ws_url.trim_end_matches("/ws"),
            true,
        )?],
    };
    let symbols: Arc<[String]> = parse_symbols(&args.symbols, &args.symbol_prefix)?.into();

    let nofile = sysinfo::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    if args.connections as u64 + SPARE_FDS > nofile {
        bail!(
            "{} connections need about {} open files but the limit is {nofile}; \
             raise the hard limit (ulimit -Hn) or use fewer connections",
            args.connections,
            args.connections as u64 + SPARE_FDS
        );
    }
    let spread_source = targets
        .iter()
        .all(|t| matches!(t.addr, SocketAddr::V4(a) if a.ip().is_loopback()));
    if let Some(ports) = sysinfo::ephemeral_port_count() {
        if args.conns_per_ip > ports {
            eprintln!(
                "warning: --conns-per-ip {} exceeds the {ports} ephemeral ports per source address",
                args.conns_per_ip
            );
        }
    }

    let symbol_index = SymbolIndex::new(Arc::clone(&symbols));
    stats::init_subscribers(symbols.len());
    stats::init_final_seqs(symbols.len());
    ws::set_read_size(args.read_buffer_kb.max(1) * 1024);
    ws::set_deflate(args.deflate);
    let ctx = Arc::new(ClientCtx {
        targets: targets
            .iter()
            .map(|t| Endpoint {
                addr: t.addr,
                ws_url: t.ws_url.clone(),
            })
            .collect(),
        token: args.token.clone(),
        spread_source,
        conns_per_ip: args.conns_per_ip.max(1),
        source_offset: args.source_offset,
        symbols: Arc::clone(&symbols),
        symbol_index,
        symbols_per_client: args.symbols_per_client,
        subscription: Subscription {
            mode: args.mode.as_str(),
            interval_ms: args.interval_ms,
            min_quality: args.min_quality,
            min_volume: args.min_volume,
        },
        connect_timeout: Duration::from_millis(args.connect_timeout_ms),
        slow_clients: args.slow_clients,
        slow_delay: Duration::from_millis(args.slow_ms),
        lossless,
        churn: if args.churn > 0.0 {
            (0..args.connections).map(|_| Notify::new()).collect()
        } else {
            Box::new([])
        },
        connect_sem: Arc::new(Semaphore::new(args.connect_concurrency.max(1))),
    });
    let parts = ingest_targets.len();
    let producers: Vec<ProducerConfig> = if args.rate > 0.0 {
        ingest_targets
            .iter()
            .enumerate()
            .map(|(part, t)| ProducerConfig {
                url: t.ingest_url.clone(),
                server: t.addr,
                // The first block after the clients' addresses (each producer connects to
                // another server, so they may share it).
                source: spread_source.then(|| {
                    IpAddr::V4(net::producer_source_ip(
                        args.connections + args.source_offset * args.conns_per_ip.max(1),
                        args.conns_per_ip,
                    ))
                }),
                token: args.ingest_token.clone().or_else(|| args.token.clone()),
                rate: args.rate / parts as f64,
                symbols: Arc::clone(&symbols),
                batch_ms: args.batch_ms,
                part,
                parts,
                shared_symbols: args.shared_symbols,
            })
            .collect()
    } else {
        Vec::new()
    };
    let cfg = RunConfig {
        ctx,
        connections: args.connections,
        connect_concurrency: args.connect_concurrency,
        ramp_timeout: Duration::from_secs(args.ramp_timeout),
        duration: Duration::from_secs_f64(args.duration),
        drain: Duration::from_millis(args.drain_ms),
        idle: args.idle,
        producers,
        server_pid: args.server_pid,
        live: !args.quiet,
        churn_per_sec: args.churn,
        soak: (args.sample_secs > 0.0).then(|| soak_config(&args)),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        // Each worker folds its thread-local counters into the totals on its way out.
        .on_thread_stop(stats::flush_thread)
        .build()
        .context("building the runtime")?;
    let outcome = rt.block_on(run::run(cfg))?;
    // Joins the workers, so every thread-local counter has been flushed after this.
    drop(rt);

    let (summary, soak) = summarize(&args, &symbols, outcome);
    print!("{}", summary.text());
    if let Some(v) = &soak {
        print!("{}", v.text());
    }
    if let Some(path) = &args.json {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let out = JsonOut {
            summary: &summary,
            soak: soak.as_ref(),
        };
        serde_json::to_writer_pretty(std::io::BufWriter::new(file), &out)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let producer_failed = summary
        .producer
        .as_ref()
        .is_some_and(|p| p.failure.is_some());
    if summary.connections.connected == 0 || producer_failed {
        return Ok(ExitCode::FAILURE);
    }
    if soak.as_ref().is_some_and(|v| !v.pass) {
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

/// The `--json` file: the summary, with the soak verdict beside it when there is one.
#[derive(serde::Serialize)]
struct JsonOut<'a> {
    #[serde(flatten)]
    summary: &'a Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    soak: Option<&'a SoakVerdict>,
}

fn soak_config(args: &Args) -> SoakConfig {
    SoakConfig {
        every: Duration::from_secs_f64(args.sample_secs),
        csv: args.csv.clone(),
        warmup: Duration::from_secs_f64(args.warmup_secs.max(0.0)),
        rss_tolerance_pct: args.rss_tolerance_pct,
        fd_tolerance: args.fd_tolerance,
    }
}

/// The soak verdict's inputs from the run's totals.
fn verdict_inputs(
    args: &Args,
    counters: &stats::Counters,
    tallies: &stats::Tallies,
    outcome: &run::Outcome,
    expected: Option<u64>,
    exact: bool,
) -> VerdictInputs {
    use std::sync::atomic::Ordering::Relaxed;
    let lossless = args.lossless || args.churn > 0.0;
    let tally = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let finals = stats::final_seqs();
    let symbols_behind = finals.iter().flatten().filter(|(lo, hi)| lo < hi).count() as u64;
    let p = outcome.producer.as_ref();
    // The server was fresh and every tick sent was accepted once: symbol i's last seq is
    // then the number of ticks sent for it.
    let producer_exact = p.is_some_and(|p| {
        p.accepted == p.ticks_sent && p.duplicates == 0 && p.rejected == 0 && p.refused == 0
    });
    let symbols_short = (lossless && producer_exact).then(|| {
        let sent = &p.expect("checked above").sent_per_symbol;
        finals
            .iter()
            .zip(sent)
            .filter(|(f, &n)| n > 0 && f.is_some_and(|(_, hi)| hi < n))
            .count() as u64
    });
    VerdictInputs {
        window_secs: outcome.window_secs,
        fds_before_connect: outcome.fds_before_connect,
        fd_start: outcome.fd_start,
        fd_end: outcome.fd_end,
        lossless,
        churn_per_sec: args.churn,
        target_rate: args.rate,
        producer_rate: p.map(|p| p.accepted as f64 / p.elapsed_secs.max(1e-9)),
        producer_refused: p.map_or(0, |p| p.refused),
        producer_failure: p.and_then(|p| p.failure.clone()),
        gaps: counters.gaps,
        missing: counters.missing,
        duplicates: counters.duplicates,
        gap_snapshots: counters.gap_snapshots,
        unexpected_symbol: counters.unexpected_symbol,
        lost: CONNS.lost.load(Relaxed),
        closes: tally(&tallies.closes),
        errors: tally(&tallies.errors),
        connect_failures: CONNS.failed.load(Relaxed),
        reconnect_failures: CONNS.reconnect_failures.load(Relaxed),
        seen: counters.deliveries + counters.snapshot_ticks,
        expected: expected.filter(|_| exact),
        symbols_behind,
        symbols_short,
    }
}

/// CPU/RSS over the measurement from two samples.
fn proc_summary(
    pid: Option<u32>,
    s: Samples,
    secs: f64,
    deliveries: u64,
    open: i64,
) -> Option<ProcSummary> {
    let (start, end) = (s.start?, s.end?);
    let cpu_ns = end.cpu_ns.saturating_sub(start.cpu_ns);
    Some(ProcSummary {
        pid,
        cpu_secs: cpu_ns as f64 / 1e9,
        cpu_percent: 100.0 * cpu_ns as f64 / (secs.max(1e-9) * 1e9),
        cpu_ns_per_delivery: (deliveries > 0).then(|| cpu_ns as f64 / deliveries as f64),
        rss_bytes: end.rss_bytes,
        rss_per_connection: end
            .rss_bytes
            .filter(|_| open > 0)
            .map(|r| r as f64 / open as f64),
    })
}

fn summarize(
    args: &Args,
    symbols: &[String],
    outcome: run::Outcome,
) -> (Summary, Option<SoakVerdict>) {
    use std::sync::atomic::Ordering::Relaxed;
    let (counters, hist) = stats::final_totals();
    let tallies = stats::tallies();
    let measured_secs = outcome.window_secs + outcome.drain_secs;
    let window = outcome.window_secs.max(1e-9);
    let filtered = args.min_quality > 0 || args.min_volume > 0.0;
    let lossless_mode = matches!(args.mode, Mode::Realtime | Mode::Batch);
    let (expected, exact) = match &outcome.producer {
        Some(p) if lossless_mode && !filtered => (
            Some(report::expected_deliveries(
                &p.sent_per_symbol,
                &stats::subscribers(),
            )),
            // A lost connection's ticks count as delivered but not as expected.
            p.accepted == p.ticks_sent && CONNS.lost.load(Relaxed) == 0,
        ),
        _ => (None, false),
    };
    let soak = args.server_pid.filter(|_| args.sample_secs > 0.0).map(|_| {
        let inputs = verdict_inputs(args, &counters, &tallies, &outcome, expected, exact);
        soak::verdict(&outcome.soak_samples, &soak_config(args), &inputs)
    });
    let open = outcome.open_at_end;
    let summary = Summary {
        config: ConfigEcho {
            url: args.url.clone(),
            connections: args.connections,
            symbols: symbols.len(),
            symbols_per_client: args.symbols_per_client,
            mode: args.mode.as_str().to_string(),
            interval_ms: args.interval_ms,
            min_quality: args.min_quality,
            min_volume: args.min_volume,
            rate: args.rate,
            duration_secs: args.duration,
            drain_ms: args.drain_ms,
            idle: args.idle,
            threads: args.threads,
            conns_per_ip: args.conns_per_ip,
        },
        connections: ConnSummary {
            attempted: CONNS.attempted.load(Relaxed),
            connected: CONNS.connected.load(Relaxed),
            subscribed: CONNS.subscribed.load(Relaxed),
            failed: CONNS.failed.load(Relaxed),
            lost: CONNS.lost.load(Relaxed),
            open_at_end: open,
            ramp_secs: outcome.ramp_secs,
            listen_overflows: outcome.listen_overflows,
        },
        window_secs: outcome.window_secs,
        drain_secs: outcome.drain_secs,
        counters,
        deliveries_per_sec: counters.deliveries as f64 / window,
        messages_per_sec: counters.messages as f64 / window,
        bytes_per_sec: counters.bytes as f64 / window,
        expected_deliveries: expected,
        expected_exact: exact,
        latency_us: Latency::of(&hist),
        tallies,
        producer: outcome.producer,
        server: args.server_pid.and_then(|pid| {
            proc_summary(
                Some(pid),
                outcome.server,
                measured_secs,
                counters.deliveries,
                open,
            )
        }),
        client: proc_summary(None, outcome.client, measured_secs, counters.deliveries, 0)
            .unwrap_or_default(),
        idle_memory: outcome.idle_rss.map(|rss| IdleMemory {
            rss_before: rss.before,
            rss_connected: rss.connected,
            rss_after: rss.held,
            connections: rss.connections.max(0) as u64,
            delta_per_connection: (rss.held as f64 - rss.before as f64)
                / rss.connections.max(1) as f64,
            connected_delta_per_connection: (rss.connected as f64 - rss.before as f64)
                / rss.connections.max(1) as f64,
        }),
    };
    (summary, soak)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_from_url() {
        let t = parse_target("ws://127.0.0.1:9000", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(t.ws_url, "ws://127.0.0.1:9000/ws");
        assert_eq!(t.ingest_url, "ws://127.0.0.1:9000/ingest");
        // The server prints http://HOST:PORT; accept it as is.
        assert!(parse_target("http://127.0.0.1:9000/", false).is_ok());
        assert!(parse_target("ws://127.0.0.1:9000/ws", false).is_err());
        assert!(parse_target("wss://127.0.0.1:9000", false).is_err());
    }

    #[test]
    fn remote_hosts_need_allow_remote() {
        let err = parse_target("ws://192.0.2.1:80", false).unwrap_err();
        assert!(err.to_string().contains("--allow-remote"), "{err}");
        // With the flag it resolves (no connection is made here).
        assert!(parse_target("ws://192.0.2.1:80", true).is_ok());
    }

    #[test]
    fn symbols_by_count_or_list() {
        assert_eq!(parse_symbols("3", "LT").unwrap(), vec!["LT0", "LT1", "LT2"]);
        assert_eq!(
            parse_symbols("BTC-USD, AAPL,AAPL", "LT").unwrap(),
            vec!["AAPL", "BTC-USD"]
        );
        assert!(parse_symbols("0", "LT").is_err());
        assert!(parse_symbols(" , ", "LT").is_err());
    }

    #[test]
    fn cli_parses_defaults_and_modes() {
        let a =
            Args::try_parse_from(["tickfan-loadtest", "--mode", "throttled", "-c", "5"]).unwrap();
        assert_eq!(a.mode, Mode::Throttled);
        assert_eq!(a.connections, 5);
        assert_eq!(a.duration, 10.0);
    }
}

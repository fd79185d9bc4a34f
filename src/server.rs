//! Wires the stages together and owns the shutdown order. `run` takes an already-bound
//! listener (tests bind `127.0.0.1:0`) and a shutdown future (the binary passes SIGINT/SIGTERM).
//!
//! Shutdown order, so that nothing accepted is lost: (1) stop accepting, close clients with
//! 1001, stop the simulator and producers' reads; (2) wait for connections, which lets producers
//! receive the acks of what they already sent while the dispatcher still runs; (3) stop the
//! dispatcher, which drains the queue into the sink; (4) flush and close the sink.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Role, Verifier};
use crate::cluster::{Cluster, Wiring};
use crate::config::Config;
use crate::dispatch::{DispatchStats, Dispatcher, Seed, StoreSink};
use crate::dlq::DeadLetters;
use crate::error::ServerError;
use crate::http::{self, AppState};
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::queue::PriorityQueue;
use crate::session::admission::ConnectionLimits;
use crate::session::liveness::{self, Connections};
use crate::session::parking::Parking;
use crate::session::producer::{ProducerContext, ProducerStats};
use crate::session::{ClientContext, ClientStats};
use crate::simulator;
use crate::store::Store;
use crate::transport::accept::{self, AcceptConfig, AcceptLimits};
use crate::transport::tls::{Tls, TlsSettings};

/// Runs the server on `listener` until `shutdown` resolves, then shuts down in order.
///
/// # Errors
/// Serving failed (I/O on the listener).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let config = Arc::new(config);
    // A token sent to an open server is accepted without a word; say once that auth is off.
    let verifier = Arc::new(Verifier::new(&config.auth)?);
    let open_to = match (
        !verifier.required(Role::Client),
        !verifier.required(Role::Producer),
    ) {
        (true, true) => Some("clients and producers"),
        (true, false) => Some("clients"),
        (false, true) => Some("producers"),
        (false, false) => None,
    };
    if let Some(who) = open_to {
        tracing::warn!("auth is off for {who}: no [auth] tokens configured for them, so any token (or none) is accepted");
    }
    let stop = CancellationToken::new();
    // Before anything else starts: a certificate that does not load is a startup error.
    let tls = tls(&config, &stop)?;
    let queue = Arc::new(PriorityQueue::new(&config.queue));
    // Open the store off the runtime: recovery may verify the whole file.
    let store_config = config.store.clone();
    let (store, recovery) = tokio::task::spawn_blocking(move || Store::open(&store_config))
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?
        .map_err(|e| ServerError::Store(e.to_string()))?;
    tracing::info!(
        epoch = recovery.epoch,
        previous_run = recovery.previous_run(),
        symbols = recovery.symbols.len(),
        replayed_ticks = recovery.replayed_ticks,
        dir = %config.store.dir.display(),
        "store opened"
    );
    let dead_letters = Arc::new(DeadLetters::with_store(
        config.store.dlq_capacity,
        store.clone(),
    ));
    // Cluster mode: ingest admits only while the bus takes ticks.
    let gate = config
        .cluster
        .enabled()
        .then(|| Arc::new(std::sync::atomic::AtomicBool::new(true)));
    let mut ingestor = Ingestor::new(
        config.validation.clone(),
        queue.clone(),
        dead_letters.clone(),
    )
    .with_store(store.clone())
    .with_limits(crate::ingest::IngestLimits::from(&config.limits));
    if let Some(gate) = &gate {
        ingestor = ingestor.with_admission_gate(gate.clone());
    }
    let ingestor = Arc::new(ingestor);
    let dispatch_stats = Arc::new(DispatchStats::default());
    let metrics = Metrics::new();
    let mut epoch = recovery.epoch;
    // Cluster mode: the queue ingest fills is popped by the bus publisher; the dispatcher gets
    // the stream's ticks through its feed and an idle queue of its own.
    let mut cluster = None;
    let mut dispatch_queue = queue.clone();
    let mut feed = None;
    if let Some(gate) = gate {
        let (tx, rx) = flume::bounded(config.cluster.consumer_buffer);
        let node = if config.cluster.node_name.is_empty() {
            local_name(&listener)
        } else {
            config.cluster.node_name.clone()
        };
        let wiring = Wiring {
            admission: queue.clone(),
            feed: tx,
            ingestor: ingestor.clone(),
            seqs: recovery
                .symbols
                .iter()
                .map(|s| (s.symbol.clone(), s.seq))
                .collect(),
            store_empty: recovery.symbols.is_empty(),
            gate,
        };
        let joined = Cluster::start(&config, node, wiring)
            .await
            .map_err(|e| ServerError::Cluster(e.to_string()))?;
        let status = joined.status.clone();
        status.attach_publish_histogram(metrics.bus_publish_seconds());
        epoch = status.epoch;
        dispatch_queue = Arc::new(PriorityQueue::new(&config.queue));
        feed = Some(rx);
        cluster = Some(joined);
    }
    let seeds = recovery
        .symbols
        .into_iter()
        .map(|s| Seed {
            symbol: s.symbol,
            seq: s.seq,
            price: s.price,
            ts: s.ts,
        })
        .collect();
    let (dispatcher, handle) = Dispatcher::new(
        &config,
        dispatch_queue,
        StoreSink(store.clone()),
        dead_letters.clone(),
        dispatch_stats.clone(),
        seeds,
    );
    store.attach_histograms(metrics.store_commit_seconds(), metrics.store_batch_ticks());
    let mut dispatcher = dispatcher
        .with_latency_histogram(metrics.ingest_to_dispatch())
        .with_store(store.clone());
    if let Some(feed) = feed {
        dispatcher = dispatcher.with_feed(feed);
    }
    let dispatcher_stop = CancellationToken::new();
    let dispatcher_task = tokio::spawn(dispatcher.run(dispatcher_stop.clone()));

    let tracker = TaskTracker::new();
    if config.feed.simulator {
        tracker.spawn(simulator::run(
            config.feed.clone(),
            ingestor.clone(),
            stop.clone(),
        ));
    }
    // feeds
    let feeds = crate::feed::FeedSet::start(&config, &ingestor, &dead_letters, &stop);
    let clients = Arc::new(ClientContext {
        config: config.clone(),
        dispatcher: handle.clone(),
        shutdown: stop.clone(),
        epoch,
        sessions: AtomicU64::new(1),
        stats: ClientStats::default(),
        write_latency: Some(metrics.ingest_to_write()),
        connections: Connections::default(),
        parking: Parking::start()?,
        verifier: verifier.clone(),
    });
    tokio::spawn(liveness::run(clients.clone(), stop.clone()));
    // However `run` ends, none of this server's connections stays behind in the process-wide
    // parking lot.
    let _evict = EvictParked(clients.clone());
    let producers = Arc::new(ProducerContext {
        ingestor: ingestor.clone(),
        max_message_bytes: config.limits.max_message_bytes,
        close_timeout: Duration::from_millis(config.server.close_timeout_ms),
        shutdown: stop.clone(),
        stats: ProducerStats::default(),
    });
    let fd_limit = fd_limit();
    let state = Arc::new(AppState {
        config: config.clone(),
        ingestor,
        queue,
        dispatcher: handle,
        dispatch_stats,
        clients,
        producers,
        dead_letters,
        tracker: tracker.clone(),
        connections: Arc::new(ConnectionLimits::new(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        )),
        accept: Arc::new(AcceptLimits::new(accept_config(&config, fd_limit))),
        metrics,
        started: Instant::now(),
        fd_limit,
        store: store.clone(),
        cluster: cluster.as_ref().map(|c| c.status.clone()),
        feeds: feeds.clone(), // feeds
        tls: tls.clone(),
    });
    let app = http::router(state.clone());
    let local = listener.local_addr()?;
    tracing::info!(
        %local,
        simulator = config.feed.simulator,
        tls = state.tls.is_some(),
        "tickfan serving"
    );

    // Histogram samples are held until folded; fold them on a timer so an unscraped server
    // stays bounded.
    let upkeep_state = state.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                () = upkeep_stop.cancelled() => return,
                _ = every.tick() => upkeep_state.metrics.upkeep(),
            }
        }
    });
    let stop_on_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_on_signal.cancel();
    });
    let grace = Duration::from_millis(config.server.shutdown_grace_ms);
    let upgraded = state.connections.clone();
    crate::transport::serve(
        listener,
        app,
        state.accept.clone(),
        move || upgraded.open(),
        tls,
        stop.clone(),
        grace,
    )
    .await?;
    stop.cancel();
    tracing::info!("shutting down: closing connections");
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace period");
    }
    feeds.stop().await; // feeds: nothing is ingested once the dispatcher drains
    if let Some(cluster) = &mut cluster {
        // Producers have their acks (or not); then this node's own ticks come back from the
        // stream before the dispatcher stops.
        cluster.stop_publishing().await;
        cluster.stop_consuming().await;
    }
    dispatcher_stop.cancel();
    let _sink = dispatcher_task
        .await
        .map_err(|e| ServerError::Io(std::io::Error::other(e)))?;
    // Last: everything the dispatcher handed over is committed, then the store is marked clean
    // so the next start keeps the epoch.
    store
        .flush()
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?;
    tokio::task::spawn_blocking(move || store.close())
        .await
        .map_err(|e| ServerError::Store(e.to_string()))?
        .map_err(|e| ServerError::Store(e.to_string()))?;
    if let Some(cluster) = cluster {
        // After the flush: the saved position covers only committed ticks.
        cluster.close().await;
    }
    tracing::info!("shutdown complete");
    Ok(())
}

/// The listener's TLS if `server.tls_cert_file` is set, with its certificate reloaded on every
/// SIGHUP until `stop`. The handler is installed here, before the listener serves, and also
/// without TLS (a SIGHUP, e.g. from `systemctl reload`, is then logged as having nothing to
/// reload): the signal's default action would end the process.
fn tls(config: &Config, stop: &CancellationToken) -> Result<Option<Arc<Tls>>, ServerError> {
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert_file), Some(key_file)) => Some(Arc::new(Tls::new(TlsSettings {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            buffer_bytes: config.server.tls_buffer_bytes,
        })?)),
        _ => None,
    };
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reloading = tls.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hangups.recv() => if got.is_none() { return },
            }
            let Some(tls) = reloading.clone() else {
                tracing::info!("SIGHUP: no TLS certificate configured, nothing to reload");
                continue;
            };
            tracing::info!("SIGHUP: reloading the TLS certificate");
            // Off the runtime: it reads two files. A failure is logged and counted there.
            let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
        }
    });
    Ok(tls)
}

/// Drops the server's parked connections when `run` ends (normally none are left: the
/// shutdown close order resumed them).
struct EvictParked(Arc<ClientContext>);

impl Drop for EvictParked {
    fn drop(&mut self) {
        // On an early error return nothing else stopped the sweep, which would keep parking.
        self.0.shutdown.cancel();
        self.0.parking.evict(&self.0);
    }
}

/// The default node name: host and port.
fn local_name(listener: &TcpListener) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    format!("{host}:{port}")
}

/// The accept caps and request deadlines of `config`, for an open-files limit of `fd_limit`.
fn accept_config(config: &Config, fd_limit: u64) -> AcceptConfig {
    let limits = &config.limits;
    let cap = accept::tcp_cap(limits.max_tcp_connections, limits.reserved_fds, fd_limit);
    if fd_limit > 0 && u64::try_from(cap).unwrap_or(u64::MAX) >= fd_limit {
        tracing::warn!(
            cap,
            fd_limit,
            "limits.max_tcp_connections is not below the open-files limit; a connection flood \
             can exhaust descriptors"
        );
    }
    AcceptConfig {
        cap,
        max_http_per_ip: limits.max_http_connections_per_ip,
        header_timeout_ms: limits.header_timeout_ms,
        body_timeout_ms: limits.body_timeout_ms,
    }
}

/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Raises the soft open-files limit to the hard limit and returns the limit in force.
#[must_use]
pub fn fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    }
}

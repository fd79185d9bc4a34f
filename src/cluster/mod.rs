//! Cluster mode: several tickfan nodes share one tick stream through NATS JetStream
//! (docs/cluster.md has the design and its failure modes). Off unless `[cluster] nats_url` is
//! set; single-node mode never reaches this module.
//!
//! Data flows: ingest (any node) → this node's priority queue → [`publish`] (one JetStream
//! stream, subject `<prefix>.<SYMBOL>`, the tick's cluster-wide `seq` assigned by a per-symbol
//! compare-and-set on the subject's last stream sequence; the producer's ack settles on the
//! JetStream publish ack, and with replicas > 1 once this node's consumer accepted the
//! message) → the stream → [`consume`] on every node (an ordered consumer, in stream order,
//! the arbiter that accepts only each symbol's next link) → that node's dispatcher feed (seq
//! kept) → clients and the node's own redb replica. The replica's position in the stream is
//! kept in `<store.dir>/cluster.json`, so a restarted node resumes where its store ends and a
//! new node replays the stream from the start. The epoch every node announces is the stream's
//! creation time: it changes exactly when the stream was lost or recreated.

mod consume;
mod publish;
mod seen;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, stream};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingestor;
use crate::queue::{PriorityQueue, Queued};
use crate::tick::Symbol;

/// Errors of starting cluster mode.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The NATS server could not be reached.
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect {
        /// The configured URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The stream could not be created or read.
    #[error("JetStream stream {stream}: {message}")]
    Stream {
        /// Stream name.
        stream: String,
        /// Why.
        message: String,
    },
    /// The store folder holds a replica of another stream (or a single-node store).
    #[error("{0}")]
    Replica(String),
}

/// The bus as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusState {
    /// Connected, and the stream takes publishes.
    Connected,
    /// The NATS connection is down (the client reconnects by itself).
    Disconnected,
    /// Connected, but the stream does not answer (JetStream recovering, stream lost).
    StreamUnavailable,
}

impl BusState {
    /// Name in `/health` and the metrics label.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::StreamUnavailable => "stream_unavailable",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Connected,
            1 => Self::Disconnected,
            _ => Self::StreamUnavailable,
        }
    }
}

/// Shared state and counters of this node's bus link, read by `/health` and `/metrics`.
#[derive(Debug)]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// Stream name.
    pub stream: String,
    /// The cluster epoch (the stream's creation time, ms).
    pub epoch: u64,
    /// The stream's replica count.
    pub replicas: usize,
    /// Open while ingest may admit ticks (the bus is connected and the stream answers).
    pub gate: Arc<AtomicBool>,
    state: AtomicU8,
    /// NATS connection state (kept apart from stream trouble; both close the gate).
    connected: AtomicBool,
    /// Reconnections to NATS since start.
    pub reconnects: AtomicU64,
    /// Ticks stored in the stream by this node.
    pub published: AtomicU64,
    /// Messages stored in the stream by this node (each carries one or more ticks of one
    /// symbol: `cluster.max_ticks_per_message`).
    pub messages: AtomicU64,
    /// Publishes the stream answered `duplicate` (the same id already in the stream).
    pub bus_duplicates: AtomicU64,
    /// Per-symbol compare-and-set conflicts (another node published first; retried).
    pub conflicts: AtomicU64,
    /// Publish attempts that failed (bus down, timeout) and were retried.
    pub publish_errors: AtomicU64,
    /// Ticks whose publish did not complete within `publish_timeout_ms` (told `expired`).
    pub publish_expired: AtomicU64,
    /// Messages consumed from the stream.
    pub consumed: AtomicU64,
    /// Stream messages read again after a restart whose ticks the store already had.
    pub replayed: AtomicU64,
    /// The stream sequence the consumer has read through (starts at the saved position).
    pub read_through: AtomicU64,
    /// Stream messages the consumer skipped: not the next link of their symbol's chain (a
    /// concurrent publish that lost) or malformed (docs/cluster.md, "consumer as arbiter").
    pub skipped: AtomicU64,
    /// Messages in the stream not yet consumed by this node.
    pub lag: AtomicU64,
    /// The stream's last sequence, as last probed.
    pub stream_last: AtomicU64,
    /// Stream sequence up to which this node's store holds every message.
    pub position: AtomicU64,
    /// Seconds from publish to the bus's ack.
    publish_latency: parking_lot::Mutex<Option<metrics::Histogram>>,
}

impl ClusterStatus {
    fn new(
        node: String,
        stream: String,
        epoch: u64,
        replicas: usize,
        gate: Arc<AtomicBool>,
    ) -> Self {
        gate.store(true, Ordering::Release);
        Self {
            node,
            stream,
            epoch,
            replicas,
            gate,
            state: AtomicU8::new(0),
            connected: AtomicBool::new(true),
            reconnects: AtomicU64::new(0),
            published: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            bus_duplicates: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            publish_errors: AtomicU64::new(0),
            publish_expired: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            read_through: AtomicU64::new(0),
            lag: AtomicU64::new(0),
            stream_last: AtomicU64::new(0),
            position: AtomicU64::new(0),
            publish_latency: parking_lot::Mutex::new(None),
        }
    }

    /// The bus state now.
    #[must_use]
    pub fn state(&self) -> BusState {
        BusState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.set_state(if up {
            BusState::Connected
        } else {
            BusState::Disconnected
        });
    }

    /// Stream trouble (or its end) seen by a publish or a probe.
    fn set_stream_ok(&self, ok: bool) {
        if !self.connected.load(Ordering::Acquire) {
            return;
        }
        self.set_state(if ok {
            BusState::Connected
        } else {
            BusState::StreamUnavailable
        });
    }

    fn set_state(&self, state: BusState) {
        let v = match state {
            BusState::Connected => 0,
            BusState::Disconnected => 1,
            BusState::StreamUnavailable => 2,
        };
        let old = self.state.swap(v, Ordering::AcqRel);
        self.gate
            .store(state == BusState::Connected, Ordering::Release);
        if old != v {
            tracing::warn!(state = state.as_str(), "cluster bus state");
        }
    }

    /// Records a publish-to-ack time.
    fn record_publish(&self, seconds: f64) {
        if let Some(h) = &*self.publish_latency.lock() {
            h.record(seconds);
        }
    }

    /// Attaches the publish-latency histogram.
    pub fn attach_publish_histogram(&self, h: metrics::Histogram) {
        *self.publish_latency.lock() = Some(h);
    }

    /// The `cluster` object of `/health`.
    #[must_use]
    pub fn health(&self) -> Value {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "node": self.node,
            "stream": self.stream,
            "bus": self.state().as_str(),
            "epoch": self.epoch,
            "replicas": self.replicas,
            "position": load(&self.position),
            "stream_last": load(&self.stream_last),
            "lag": load(&self.lag),
            "reconnects": load(&self.reconnects),
            "published_ticks": load(&self.published),
            "published_messages": load(&self.messages),
            "skipped_messages": load(&self.skipped),
            "consumed_messages": load(&self.consumed),
            "replayed_messages": load(&self.replayed),
            "read_through": load(&self.read_through),
            "conflicts": load(&self.conflicts),
            "publish_errors": load(&self.publish_errors),
        })
    }
}

/// What is kept in `<store.dir>/cluster.json`: which stream this replica copies and how far.
#[derive(Debug, Serialize, Deserialize)]
struct Replica {
    stream: String,
    epoch: u64,
    position: u64,
}

fn replica_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

/// A running cluster link: its status and tasks.
pub struct Cluster {
    /// Shared state for health and metrics.
    pub status: Arc<ClusterStatus>,
    client: async_nats::Client,
    publisher: JoinHandle<()>,
    consumer: JoinHandle<()>,
    probe: JoinHandle<()>,
    stop_publish: CancellationToken,
    stop_consume: CancellationToken,
    replica: PathBuf,
}

/// What `start` needs from the server.
pub struct Wiring {
    /// The node's admission queue (ingest pushes, the publisher pops).
    pub admission: Arc<PriorityQueue>,
    /// Consumed ticks go here, to the dispatcher.
    pub feed: flume::Sender<Queued>,
    /// For cluster-wide dedup memory.
    pub ingestor: Arc<Ingestor>,
    /// Each symbol's last seq in this node's store.
    pub seqs: Vec<(Symbol, u64)>,
    /// Whether the store holds any tick at all.
    pub store_empty: bool,
    /// Ingest's admission gate; the bus state opens and closes it.
    pub gate: Arc<AtomicBool>,
}

/// The JetStream request timeout (publish acks, stream reads); a publish that times out is
/// retried until `publish_timeout_ms`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a node whose stream does not answer probes it.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// How often the replica position is saved.
const SAVE_EVERY: Duration = Duration::from_secs(1);

impl Cluster {
    /// Connects, creates or opens the stream, checks the store is a replica of it, and
    /// starts publishing and consuming.
    ///
    /// # Errors
    /// NATS unreachable, the stream cannot be created, or the store belongs elsewhere.
    pub async fn start(
        config: &Config,
        node: String,
        wiring: Wiring,
    ) -> Result<Self, ClusterError> {
        let c = &config.cluster;
        let servers = c
            .nats_url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Connect {
                url: c.nats_url.clone(),
                message: e.to_string(),
            })?;
        let status_slot: Arc<parking_lot::Mutex<Option<Arc<ClusterStatus>>>> = Arc::default();
        let slot = status_slot.clone();
        let connect = async_nats::ConnectOptions::new()
            .name(format!("tickfan {node}"))
            .max_reconnects(None)
            .event_callback(move |event| {
                let slot = slot.clone();
                async move {
                    let Some(status) = slot.lock().clone() else {
                        return;
                    };
                    match event {
                        async_nats::Event::Connected => {
                            status.reconnects.fetch_add(1, Ordering::Relaxed);
                            status.set_connected(true);
                        }
                        async_nats::Event::Disconnected => status.set_connected(false),
                        _ => {}
                    }
                }
            })
            .connect(servers);
        let start_timeout = Duration::from_millis(c.start_timeout_ms);
        let deadline = tokio::time::Instant::now() + start_timeout;
        let client = tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| "timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|message| ClusterError::Connect {
                url: c.nats_url.clone(),
                message,
            })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        let replicas = if c.replicas > 0 {
            c.replicas
        } else {
            let info = client.server_info();
            if info.cluster.is_some() {
                info.connect_urls.len().clamp(1, 3)
            } else {
                1
            }
        };
        let stream_err = |e: &dyn std::fmt::Display| ClusterError::Stream {
            stream: c.stream.clone(),
            message: e.to_string(),
        };
        let stream_config = stream::Config {
            name: c.stream.clone(),
            subjects: vec![format!("{}.>", c.subject_prefix)],
            max_messages_per_subject: c.max_msgs_per_symbol,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_millis(c.duplicate_window_ms),
            num_replicas: replicas,
            storage: stream::StorageType::File,
            allow_direct: true,
            ..Default::default()
        };
        // A NATS cluster that has just elected its JetStream leader may still refuse a
        // replicated stream for a moment (peers not all known yet), and a just-created R3
        // stream may not answer its first info request before its own leader is elected: a
        // node started beside it waits, as it does for the connect, instead of failing its
        // start.
        let mut backoff = Duration::from_millis(100);
        let (stream, info) = loop {
            let attempt = async {
                let mut stream = js
                    .get_or_create_stream(stream_config.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                let info = stream.info().await.map_err(|e| e.to_string())?.clone();
                Ok::<_, String>((stream, info))
            };
            match attempt.await {
                Ok(ready) => break ready,
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, stream = %c.stream, "JetStream stream not ready; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(stream_err(&e)),
            }
        };
        let replicas = info.config.num_replicas;
        let epoch = u64::try_from(info.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let replica = replica_path(&config.store.dir);
        let position = check_replica(&replica, &c.stream, epoch, wiring.store_empty)?;
        let status = Arc::new(ClusterStatus::new(
            node.clone(),
            c.stream.clone(),
            epoch,
            replicas,
            wiring.gate.clone(),
        ));
        status.position.store(position, Ordering::Relaxed);
        *status_slot.lock() = Some(status.clone());
        save_replica(&replica, &c.stream, epoch, position);
        tracing::info!(
            %node, stream = %c.stream, epoch, position, replicas,
            "cluster mode: joined the stream"
        );

        let seen = Arc::new(seen::Seen::new(
            config.validation.dedup_window,
            config.validation.max_total_symbols,
            position,
        ));
        seen.seed_heads(wiring.seqs);
        let stop_publish = CancellationToken::new();
        let stop_consume = CancellationToken::new();
        let publisher = tokio::spawn(publish::run(
            publish::Publisher::new(
                config,
                &node,
                js.clone(),
                stream.clone(),
                status.clone(),
                seen.clone(),
                wiring.ingestor.clone(),
            ),
            wiring.admission,
            stop_publish.clone(),
        ));
        let start = if position == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: position + 1,
            }
        };
        let consumer = tokio::spawn(consume::run(
            consume::Consumer {
                stream: stream.clone(),
                filter: format!("{}.>", c.subject_prefix),
                prefix: format!("{}.", c.subject_prefix),
                node: node.clone(),
                feed: wiring.feed,
                ingestor: wiring.ingestor,
                replay_through: if position == 0 {
                    0
                } else {
                    info.state.last_sequence
                },
                bootstrap: position == 0,
                status: status.clone(),
                seen,
                replica: replica.clone(),
            },
            start,
            stop_consume.clone(),
        ));
        let probe = tokio::spawn(probe(stream, status.clone(), stop_consume.clone()));
        Ok(Self {
            status,
            client,
            publisher,
            consumer,
            probe,
            stop_publish,
            stop_consume,
            replica,
        })
    }

    /// Stops publishing (ticks not yet confirmed by the bus are not acked to producers).
    pub async fn stop_publishing(&mut self) {
        self.stop_publish.cancel();
        let _ = (&mut self.publisher).await;
    }

    /// Stops consuming (after publishing stopped, so this node's own ticks came back).
    pub async fn stop_consuming(&mut self) {
        self.stop_consume.cancel();
        let _ = (&mut self.consumer).await;
        let _ = (&mut self.probe).await;
    }

    /// Saves the replica position (call after the store flushed) and closes the connection.
    pub async fn close(self) {
        let s = &self.status;
        save_replica(
            &self.replica,
            &s.stream,
            s.epoch,
            s.position.load(Ordering::Acquire),
        );
        let _ = self.client.drain().await;
    }
}

/// Reads `cluster.json`: the position to resume from. A store of another stream (or epoch),
/// or a single-node store with ticks, is refused: its seqs are not this stream's.
fn check_replica(
    path: &Path,
    stream: &str,
    epoch: u64,
    store_empty: bool,
) -> Result<u64, ClusterError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let r: Replica = serde_json::from_slice(&bytes).map_err(|e| {
                ClusterError::Replica(format!("{}: unreadable: {e}", path.display()))
            })?;
            if r.stream != stream || r.epoch != epoch {
                return Err(ClusterError::Replica(format!(
                    "{} belongs to stream {} epoch {}, but the bus has stream {stream} epoch \
                     {epoch} (the stream was recreated); start this node on an empty store.dir",
                    path.display(),
                    r.stream,
                    r.epoch
                )));
            }
            Ok(r.position)
        }
        Err(_) if store_empty => Ok(0),
        Err(_) => Err(ClusterError::Replica(format!(
            "store.dir holds a single-node store (no {}); a cluster node needs an empty \
             store.dir (it fills it from the stream)",
            path.display()
        ))),
    }
}

/// Writes `cluster.json` atomically (temp file, rename). A failure is logged: the position
/// only saves replay work.
fn save_replica(path: &Path, stream: &str, epoch: u64, position: u64) {
    let r = Replica {
        stream: stream.to_owned(),
        epoch,
        position,
    };
    let tmp = path.with_extension("json.tmp");
    let result = serde_json::to_vec(&r)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = result {
        tracing::warn!(error = %e, path = %path.display(), "cannot save the cluster position");
    }
}

/// Asks the stream for its state every `PROBE_EVERY`: its last sequence (consumer lag, stall
/// detection), and, while it did not answer, whether it is back, so the gate reopens even if
/// no producer is publishing.
async fn probe(mut stream: stream::Stream, status: Arc<ClusterStatus>, stop: CancellationToken) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Ok(info) = stream.info().await {
            status
                .stream_last
                .store(info.state.last_sequence, Ordering::Release);
            if status.state() == BusState::StreamUnavailable {
                let epoch =
                    u64::try_from(info.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                // A recreated stream is a different history: stay closed (docs/cluster.md).
                status.set_stream_ok(epoch == status.epoch);
            }
        }
    }
}

/// The subject of a symbol's ticks. `.` separates subject tokens, so it is written as `~`
/// (never in a symbol): the mapping stays one-to-one and no token is empty.
fn subject_of(prefix: &str, symbol: &Symbol) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + symbol.as_str().len());
    s.push_str(prefix);
    s.push('.');
    s.extend(
        symbol
            .as_str()
            .chars()
            .map(|c| if c == '.' { '~' } else { c }),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_symbol() {
        let s = |x: &str| subject_of("tickfan.ticks", &Symbol::parse(x).unwrap());
        assert_eq!(s("AAPL"), "tickfan.ticks.AAPL");
        assert_eq!(s("BRK.B"), "tickfan.ticks.BRK~B");
        assert_eq!(s("."), "tickfan.ticks.~");
        assert_ne!(s("A.B"), s("A~B".replace('~', "-").as_str()));
    }

    #[test]
    fn replica_file_guards_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = replica_path(dir.path());
        assert_eq!(check_replica(&path, "S", 7, true).unwrap(), 0);
        assert!(check_replica(&path, "S", 7, false).is_err());
        save_replica(&path, "S", 7, 42);
        assert_eq!(check_replica(&path, "S", 7, false).unwrap(), 42);
        assert!(check_replica(&path, "S", 8, false).is_err());
        assert!(check_replica(&path, "T", 7, false).is_err());
    }
}

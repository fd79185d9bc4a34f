//! Prometheus metrics through `metrics-exporter-prometheus`: every metric tickfan exposes is
//! defined once, here ([`Def`]: name, type, label names, help text; [`ALL`] lists them), and
//! docs/operations.md's metrics table is checked against that list by a test. Each server owns
//! its own recorder (no global state, so tests can run several servers in one process).
//! Counters live as atomics next to the code that counts (ingest, queue, dispatcher,
//! connections: a relaxed add on the hot path, nothing more); at scrape time the HTTP layer
//! (`http::metrics`) reads them into the recorder through [`Metrics::counter`] and
//! [`Metrics::gauge`], which take a [`Def`], and the recorder does the exposition. Latency
//! histograms are recorded directly through handles taken from here.

use std::time::Instant;

use metrics::{Key, Label, Recorder};
use metrics::{KeyName, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use parking_lot::Mutex;

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("tickfan", metrics::Level::INFO, Some(module_path!()));

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// Only goes up (from 0 at start).
    Counter,
    /// A value now.
    Gauge,
    /// A distribution, in buckets.
    Histogram,
}

impl Kind {
    /// The name docs and the exposition use.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// One metric: everything about it but its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Def {
    /// Full name (`tickfan_...`).
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// The names of its labels, in order.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
}

/// Defines each metric as a `pub const` [`Def`] and lists them all in [`ALL`].
macro_rules! metrics {
    ($($id:ident: $kind:ident $name:literal [$($label:literal),*] $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $id: Def = Def {
                name: $name,
                kind: Kind::$kind,
                labels: &[$($label),*],
                help: $help,
            };
        )*
        /// Every metric tickfan exposes (the cluster's only in cluster mode, the upstream
        /// feeds' only with upstreams configured).
        pub const ALL: &[Def] = &[$($id),*];
    };
}

metrics! {
    TICKS_RECEIVED: Counter "tickfan_ticks_received_total" []
        "Ticks seen by ingest: accepted + duplicate + rejected + refused.";
    TICKS_ACCEPTED: Counter "tickfan_ticks_accepted_total" []
        "Ticks accepted into the priority queue.";
    TICKS_DUPLICATE: Counter "tickfan_ticks_duplicate_total" [] "Duplicate ticks dropped.";
    TICKS_REJECTED: Counter "tickfan_ticks_rejected_total" ["code"]
        "Ticks rejected, by reject code (expired: accepted but past queue TTL).";
    TICKS_DISPATCHED: Counter "tickfan_ticks_dispatched_total" []
        "Ticks that received a seq and were fanned out.";
    QUEUE_DEPTH: Gauge "tickfan_queue_depth" ["priority"]
        "Ticks waiting in the priority queue, by priority.";
    QUEUE_CAPACITY: Gauge "tickfan_queue_capacity" [] "The priority queue's capacity (queue.capacity).";
    QUEUE_PUSHED: Counter "tickfan_queue_pushed_total" ["priority"]
        "Ticks admitted to the priority queue, by priority.";
    QUEUE_REFUSED: Counter "tickfan_queue_refused_total" ["priority"]
        "Ticks refused for backpressure, by priority.";
    QUEUE_EXPIRED: Counter "tickfan_queue_expired_total" ["priority"]
        "Ticks dropped at dequeue after their TTL, by priority.";
    INGEST_TO_DISPATCH: Histogram "tickfan_ingest_to_dispatch_seconds" []
        "Seconds from server receipt to seq assignment.";
    INGEST_TO_WRITE: Histogram "tickfan_ingest_to_write_seconds" []
        "Seconds from server receipt to the socket write (sampled).";
    CONNECTIONS: Gauge "tickfan_connections" [] "Open client (/ws) connections.";
    OPEN_CONNECTIONS: Gauge "tickfan_open_connections" []
        "Open WebSocket connections of all kinds (clients and producers).";
    HTTP_CONNECTIONS: Gauge "tickfan_http_connections" []
        "Open plain HTTP connections (accepted, not upgraded to WebSocket).";
    CLIENTS: Gauge "tickfan_clients" [] "Authorized clients registered with the dispatcher.";
    PARKED_CONNECTIONS: Gauge "tickfan_parked_connections" []
        "Client connections parked off the runtime (quiet for server.park_after_ms).";
    CONNECTION_PARKS: Counter "tickfan_connection_parks_total" []
        "Times a quiet client connection was parked.";
    CONNECTION_UNPARKS: Counter "tickfan_connection_unparks_total" []
        "Times a parked client connection was resumed (a tick, request or close for it).";
    PARKED_HEARTBEATS: Counter "tickfan_parked_heartbeats_total" []
        "Heartbeats written straight to parked connections' sockets (without resuming them).";
    PARKED_PONGS: Counter "tickfan_parked_pongs_total" []
        "Pongs read from parked connections' sockets (without resuming them).";
    PARKING_WAKE_OVERFLOWS: Counter "tickfan_parking_wake_overflows_total" []
        "Wake-ups of parked connections that overflowed the parking lot's ready list.";
    MESSAGES_QUEUED: Counter "tickfan_messages_queued_total" []
        "Data messages handed to client outbound queues by the dispatcher.";
    MESSAGES_SENT: Counter "tickfan_messages_sent_total" []
        "Frames written to client sockets: data, replies, errors and heartbeats (not pongs or pings).";
    SENT_BYTES: Counter "tickfan_sent_bytes_total" []
        "Payload bytes of the frames in tickfan_messages_sent_total.";
    CONFLATED_TICKS: Counter "tickfan_conflated_ticks_total" []
        "Ticks skipped by conflation (throttled and smart modes).";
    MODE_SWITCHES: Counter "tickfan_mode_switches_total" [] "Smart-mode switches.";
    BATCH_GROUPS: Gauge "tickfan_batch_groups" []
        "Shared batch groups (batch-mode clients with the same symbols, filter and interval get one frame per flush).";
    BATCH_GROUP_MEMBERS: Gauge "tickfan_batch_group_members" []
        "Batch-mode clients served by a shared batch group.";
    REPLAYS: Gauge "tickfan_replays" []
        "Paced replays (history, since_seq) running or waiting, one per client and symbol.";
    REPLAYED_TICKS: Counter "tickfan_replayed_ticks_total" []
        "Ticks sent to clients in snapshot messages.";
    LIMIT_HITS: Counter "tickfan_limit_hits_total" ["limit"]
        "Times a configured limit was hit, by limit.";
    BAD_REQUESTS: Counter "tickfan_bad_requests_total" []
        "Client requests answered bad_request, and /ws or /ingest connections closed for broken framing or text that is not UTF-8.";
    WS_PONGS_COALESCED: Counter "tickfan_ws_pongs_coalesced_total" []
        "Pings left unanswered because a newer ping replaced a pong the socket had not taken yet.";
    DEFLATE_CONNECTIONS: Gauge "tickfan_deflate_connections" []
        "Open WebSocket connections (/ws and /ingest) that negotiated permessage-deflate.";
    DEFLATE_COMPRESSIONS: Counter "tickfan_deflate_compressions_total" []
        "Messages compressed for permessage-deflate clients: a shared tick or batch frame once, however many clients get it.";
    DEFLATE_FRAMES_SENT: Counter "tickfan_deflate_frames_sent_total" []
        "Frames written to /ws clients compressed (RSV1 set).";
    DEFLATE_PLAIN_BYTES: Counter "tickfan_deflate_plain_bytes_total" []
        "Uncompressed payload bytes of the frames in tickfan_deflate_frames_sent_total.";
    DEFLATE_WIRE_BYTES: Counter "tickfan_deflate_wire_bytes_total" []
        "Compressed payload bytes of the frames in tickfan_deflate_frames_sent_total.";
    INFLATE_TOO_BIG: Counter "tickfan_inflate_too_big_total" []
        "Connections closed 1009 because a compressed message inflated past limits.max_message_bytes.";
    INFLATE_DEFERRED: Counter "tickfan_inflate_deferred_total" []
        "Reads (/ws and /ingest) whose compressed frames inflated past the per-read budget (limits.max_message_bytes): the rest was decoded on the connection's next turn.";
    INGEST_BACKPRESSURE_PAUSES: Counter "tickfan_ingest_backpressure_pauses_total" []
        "Times an /ingest connection was not read after ticks of it were refused, until the queue was down to half its capacity (or retry_after_ms passed).";
    DEAD_LETTERS: Gauge "tickfan_dead_letters" [] "Entries in the dead-letter list.";
    DEAD_LETTERS_SKIPPED: Counter "tickfan_dead_letters_skipped_total" []
        "Rejections not written to the dead-letter list because one frame or body had more than store.dlq_capacity.";
    STORE_COMMITS: Counter "tickfan_store_commits_total" [] "Durable store commits.";
    STORE_TICKS: Counter "tickfan_store_ticks_total" [] "Ticks committed to the store.";
    STORE_COMMIT_SECONDS: Histogram "tickfan_store_commit_seconds" []
        "Duration of durable store commits.";
    STORE_BATCH_TICKS: Histogram "tickfan_store_batch_ticks" [] "Ticks per durable store commit.";
    STORE_ERRORS: Gauge "tickfan_store_errors" [] "1 while the most recent store commit failed.";
    STORE_DUPLICATE_TICKS: Counter "tickfan_store_duplicate_ticks_total" []
        "Ticks whose (symbol, seq) was already stored.";
    STORE_DEAD_LETTERS_DROPPED: Counter "tickfan_store_dead_letters_dropped_total" []
        "Dead letters not persisted because the store writer's queue was full.";
    STORE_RETENTION_REMOVED: Counter "tickfan_store_retention_removed_total" []
        "Raw ticks removed by retention.";
    STORE_COMMIT_ERRORS: Counter "tickfan_store_commit_errors_total" []
        "Store commits that failed (and were retried).";
    STORE_FAILING: Gauge "tickfan_store_failing" []
        "1 while store writes fail (e.g. a full disk) and ingest refuses new ticks.";
    STORE_RETRY_TICKS: Gauge "tickfan_store_retry_ticks" []
        "Accepted ticks waiting for a failing store commit to be retried.";
    STORE_REOPENS: Counter "tickfan_store_reopens_total" []
        "Times the store file was reopened after a write error.";
    STORE_LOG_APPENDS: Counter "tickfan_store_log_appends_total" []
        "Groups of ticks made durable by an append to the write-ahead log.";
    STORE_LOG_ERRORS: Counter "tickfan_store_log_errors_total" []
        "Write-ahead log appends or emptyings that failed (their ticks went to redb instead).";
    STORE_LOG_PENDING: Gauge "tickfan_store_log_pending_ticks" []
        "Logged (durable, acked) ticks waiting for the next checkpoint into redb.";
    FD_LIMIT: Gauge "tickfan_fd_limit" [] "The open-files limit in force.";
    UPTIME: Gauge "tickfan_uptime_seconds" [] "Seconds since the server started.";
    BUILD_INFO: Gauge "tickfan_build_info" ["version"] "Always 1; the version is its label.";
    BUS_PUBLISH_SECONDS: Histogram "tickfan_bus_publish_seconds" []
        "Cluster mode: seconds from a tick's publish to the bus's durable ack.";
    BUS_STATE: Gauge "tickfan_bus_state" ["state"]
        "Cluster mode: 1 for the bus state this node is in (label state), else 0.";
    BUS_CONSUMER_LAG: Gauge "tickfan_bus_consumer_lag" []
        "Cluster mode: stream messages this node has not consumed yet.";
    BUS_POSITION: Gauge "tickfan_bus_position" []
        "Cluster mode: stream sequence up to which this node's store is complete.";
    BUS_RECONNECTS: Counter "tickfan_bus_reconnects_total" []
        "Cluster mode: reconnections to NATS since start.";
    BUS_PUBLISHED: Counter "tickfan_bus_published_total" []
        "Cluster mode: ticks this node stored in the stream.";
    BUS_CONSUMED: Counter "tickfan_bus_consumed_total" []
        "Cluster mode: stream messages this node consumed.";
    BUS_PUBLISH_CONFLICTS: Counter "tickfan_bus_publish_conflicts_total" []
        "Cluster mode: per-symbol compare-and-set conflicts (retried).";
    BUS_PUBLISH_ERRORS: Counter "tickfan_bus_publish_errors_total" []
        "Cluster mode: publish attempts that failed and were retried.";
    BUS_PUBLISH_EXPIRED: Counter "tickfan_bus_publish_expired_total" []
        "Cluster mode: ticks not confirmed by the bus within publish_timeout_ms.";
    BUS_DUPLICATES: Counter "tickfan_bus_duplicates_total" []
        "Cluster mode: publishes the stream answered as duplicates.";
    TLS_HANDSHAKES: Counter "tickfan_tls_handshakes_total" []
        "TLS handshakes completed (0 without server.tls_cert_file).";
    TLS_HANDSHAKE_FAILURES: Counter "tickfan_tls_handshake_failures_total" ["reason"]
        "TLS connections that did not complete a handshake, by reason: timeout (limits.header_timeout_ms), plaintext (answered 400 tls_required), error (refused by rustls).";
    TLS_CERT_RELOADS: Counter "tickfan_tls_cert_reloads_total" ["result"]
        "Certificate reloads on SIGHUP, by result: ok, or failed (the old certificate stays).";
    TLS_CONNECTION_ERRORS: Counter "tickfan_tls_connection_errors_total" []
        "WebSocket connections (/ws and /ingest) ended by a TLS error after the handshake (a record that does not decrypt, a fatal alert).";
    PARK_REQUESTS: Counter "tickfan_park_requests_total" []
        "Times the liveness sweep asked a quiet client connection to park (TLS connections are never asked).";
    UPSTREAM_STATE: Gauge "tickfan_upstream_state" ["upstream"]
        "Upstream feeds: breaker state, 0 closed, 1 open, 2 half-open.";
    UPSTREAM_CONNECTED: Gauge "tickfan_upstream_connected" ["upstream"]
        "Upstream feeds: 1 while a WebSocket session to the upstream is up.";
    UPSTREAM_TICKS: Counter "tickfan_upstream_ticks_total" ["upstream"]
        "Upstream feeds: trades normalized from the upstream.";
    UPSTREAM_MESSAGES: Counter "tickfan_upstream_messages_total" ["upstream"]
        "Upstream feeds: WebSocket data messages received.";
    UPSTREAM_ACCEPTED: Counter "tickfan_upstream_accepted_total" ["upstream"]
        "Upstream feeds: upstream ticks ingest accepted.";
    UPSTREAM_DUPLICATES: Counter "tickfan_upstream_duplicates_total" ["upstream"]
        "Upstream feeds: upstream ticks dropped as duplicates.";
    UPSTREAM_REJECTED: Counter "tickfan_upstream_rejected_total" ["upstream"]
        "Upstream feeds: upstream ticks ingest rejected.";
    UPSTREAM_REFUSED: Counter "tickfan_upstream_refused_total" ["upstream"]
        "Upstream feeds: batches ingest refused for backpressure (retried).";
    UPSTREAM_GARBAGE: Counter "tickfan_upstream_garbage_total" ["upstream"]
        "Upstream feeds: garbage messages dead-lettered.";
    UPSTREAM_GAPS: Counter "tickfan_upstream_gaps_total" ["upstream"]
        "Upstream feeds: trade ids or seqs the source skipped.";
    UPSTREAM_RECONNECTS: Counter "tickfan_upstream_reconnects_total" ["upstream"]
        "Upstream feeds: connection attempts after a failure.";
    UPSTREAM_BREAKER_TRIPS: Counter "tickfan_upstream_breaker_trips_total" ["upstream"]
        "Upstream feeds: times the circuit breaker opened.";
    UPSTREAM_PROBES: Counter "tickfan_upstream_probes_total" ["upstream"]
        "Upstream feeds: half-open probe attempts.";
    UPSTREAM_FAILOVERS: Counter "tickfan_upstream_failovers_total" ["upstream"]
        "Upstream feeds: switches of a primary's symbols to its backup.";
    UPSTREAM_FAILBACKS: Counter "tickfan_upstream_failbacks_total" ["upstream"]
        "Upstream feeds: switches back to the primary.";
    UPSTREAM_RESUMES: Counter "tickfan_upstream_resumes_total" ["upstream"]
        "Upstream feeds: tickfan-kind resumes with since_seq.";
    UPSTREAM_LIMIT_HITS: Counter "tickfan_upstream_limit_hits_total" ["upstream", "limit"]
        "Upstream feeds: upstream limits hit, by limit.";
    AUTH_FAILURES: Counter "tickfan_auth_failures_total" ["reason"]
        "Tokens refused on any path (HTTP, /ws upgrade or auth op, /ingest), by reason.";
    TOKEN_EXPIRIES: Counter "tickfan_token_expiries_total" ["route"]
        "Live /ws and /ingest sessions closed 4001 because their JWT expired, by route.";
}

/// Every value of `tickfan_token_expiries_total`'s `route` label.
pub const TOKEN_EXPIRY_ROUTES: &[&str] = &["ws", "ingest"];

/// Every value of `tickfan_upstream_limit_hits_total`'s `limit` label.
pub const UPSTREAM_LIMITS: &[&str] = &["max_message_bytes", "max_json_depth", "seam_ticks"];

/// Every value of `tickfan_limit_hits_total`'s `limit` label: one per configured limit that
/// can be hit (docs/configuration.md says what hitting each looks like).
pub const LIMITS: &[&str] = &[
    "slow_consumer",
    "ops_per_sec",
    "abuse_close",
    "max_message_bytes",
    "unauthorized",
    "heartbeat_timeout",
    "max_connections",
    "max_connections_per_ip",
    "queue_full",
    "max_symbols",
    "allowed_origins",
    "http_unauthorized",
    "max_body_bytes",
    "max_tcp_connections",
    "max_http_connections_per_ip",
    "header_timeout",
    "body_timeout",
    "store_failing",
    "max_json_depth",
    "max_listed_rejections",
];

/// Histogram buckets in seconds: 10 µs .. 5 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 1.0, 5.0,
];

/// The recorder of one server plus the state `/api/stats` derives rates from.
pub struct Metrics {
    recorder: PrometheusRecorder,
    rate: Mutex<(Instant, u64, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh recorder.
    #[must_use]
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(STORE_BATCH_TICKS.name.into()),
                    &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
                )
            })
            .map_or_else(
                |_| PrometheusBuilder::new().build_recorder(),
                PrometheusBuilder::build_recorder,
            );
        for def in ALL {
            let (name, help) = (KeyName::from(def.name), SharedString::from(def.help));
            match def.kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        Self {
            recorder,
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        }
    }

    /// A handle to record into the histogram `def`.
    pub fn histogram(&self, def: &Def) -> metrics::Histogram {
        debug_assert_eq!(def.kind, Kind::Histogram, "{} is not a histogram", def.name);
        self.recorder
            .register_histogram(&Key::from_name(def.name), &METADATA)
    }

    /// Cluster mode: histogram of seconds from a publish to the bus's ack.
    pub fn bus_publish_seconds(&self) -> metrics::Histogram {
        self.histogram(&BUS_PUBLISH_SECONDS)
    }

    /// Histogram of seconds from server receipt (`t_in`) to the dispatcher stamping the tick.
    pub fn ingest_to_dispatch(&self) -> metrics::Histogram {
        self.histogram(&INGEST_TO_DISPATCH)
    }

    /// Histogram of seconds from a tick's receipt to its socket write (sampled).
    pub fn ingest_to_write(&self) -> metrics::Histogram {
        self.histogram(&INGEST_TO_WRITE)
    }

    /// Histogram of store commit durations, seconds.
    pub fn store_commit_seconds(&self) -> metrics::Histogram {
        self.histogram(&STORE_COMMIT_SECONDS)
    }

    /// Histogram of ticks per store commit.
    pub fn store_batch_ticks(&self) -> metrics::Histogram {
        self.histogram(&STORE_BATCH_TICKS)
    }

    /// Folds recorded histogram samples into their buckets. The exporter keeps raw samples
    /// until then, so without this (or a scrape) memory would grow with every tick.
    pub fn upkeep(&self) {
        self.recorder.handle().run_upkeep();
    }

    /// Accepted ticks per second, averaged since the previous call (at least 1 s apart).
    pub fn ingest_rate(&self, accepted: u64) -> f64 {
        let mut r = self.rate.lock();
        let elapsed = r.0.elapsed().as_secs_f64();
        if elapsed >= 1.0 {
            #[allow(clippy::cast_precision_loss)]
            let rate = (accepted.saturating_sub(r.1)) as f64 / elapsed;
            *r = (Instant::now(), accepted, rate);
        }
        r.2
    }

    /// Sets counter `def` (with these label values, in `def.labels`' order) to `value`.
    pub fn counter(&self, def: &Def, labels: &[&str], value: u64) {
        debug_assert_eq!(def.kind, Kind::Counter, "{} is not a counter", def.name);
        self.recorder
            .register_counter(&key(def, labels), &METADATA)
            .absolute(value);
    }

    /// Sets gauge `def` (with these label values, in `def.labels`' order) to `value`.
    pub fn gauge(&self, def: &Def, labels: &[&str], value: u64) {
        debug_assert_eq!(def.kind, Kind::Gauge, "{} is not a gauge", def.name);
        #[allow(clippy::cast_precision_loss)]
        self.recorder
            .register_gauge(&key(def, labels), &METADATA)
            .set(value as f64);
    }

    /// The exposition text of everything set so far.
    #[must_use]
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}

/// The recorder's key for `def` with label values `values`.
fn key(def: &Def, values: &[&str]) -> Key {
    debug_assert_eq!(def.labels.len(), values.len(), "labels of {}", def.name);
    let labels: Vec<Label> = def
        .labels
        .iter()
        .zip(values)
        .map(|(name, value)| Label::new(*name, (*value).to_owned()))
        .collect();
    Key::from_parts(def.name, labels)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The rows of docs/operations.md's metrics table: name -> (type, labels).
    fn documented() -> BTreeMap<String, (String, String)> {
        let doc = include_str!("../docs/operations.md");
        let table = &doc[doc
            .find("| metric | type | labels | meaning |")
            .expect("the table")..];
        table
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                let strip = |c: &str| c.trim_matches('`').to_owned();
                (strip(cells[1]), (cells[2].to_owned(), strip(cells[3])))
            })
            .collect()
    }

    #[test]
    fn the_docs_table_lists_every_metric_with_its_type_and_labels() {
        let documented = documented();
        for def in ALL {
            let (kind, labels) = documented
                .get(def.name)
                .unwrap_or_else(|| panic!("{} is missing from docs/operations.md", def.name));
            assert_eq!(kind, def.kind.as_str(), "type of {}", def.name);
            assert_eq!(labels, &def.labels.join(", "), "labels of {}", def.name);
        }
        for name in documented.keys() {
            assert!(
                ALL.iter().any(|d| d.name == name),
                "docs/operations.md lists {name}, which the code does not define"
            );
        }
    }

    #[test]
    fn the_docs_name_every_limit_label() {
        let doc = include_str!("../docs/operations.md");
        for limit in LIMITS {
            assert!(
                doc.contains(&format!("`{limit}`")),
                "limit=\"{limit}\" is not in docs/operations.md"
            );
        }
    }

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        for (i, def) in ALL.iter().enumerate() {
            assert!(def.name.starts_with("tickfan_"), "{}", def.name);
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                def.name
            );
            assert!(!def.help.is_empty());
            assert!(
                ALL[i + 1..].iter().all(|d| d.name != def.name),
                "{}",
                def.name
            );
        }
    }
}

//! Prometheus metrics through `metrics-exporter-prometheus`. Each server owns its own recorder
//! (no global state, so tests can run several servers in one process). Counters live as atomics
//! next to the code that counts (ingest, queue, dispatcher, connections); at scrape time they are
//! copied into the recorder, which does the exposition. Latency histograms are recorded directly
//! by the dispatcher through handles taken from here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::{Key, Label, Recorder};
use metrics::{KeyName, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use parking_lot::Mutex;

use crate::http::AppState;
use crate::ingest::RejectCode;
use crate::tick::Priority;

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("tickfan", metrics::Level::INFO, Some(module_path!()));

/// `# HELP` lines (the exporter prints them for any metric type).
const HELP: &[(&str, &str)] = &[
    (
        "tickfan_ticks_received_total",
        "Ticks received from producers and the simulator.",
    ),
    (
        "tickfan_ticks_accepted_total",
        "Ticks accepted into the priority queue.",
    ),
    ("tickfan_ticks_duplicate_total", "Duplicate ticks dropped."),
    (
        "tickfan_ticks_rejected_total",
        "Ticks rejected, by reject code (expired: accepted but past queue TTL).",
    ),
    (
        "tickfan_ticks_dispatched_total",
        "Ticks that received a seq and were fanned out.",
    ),
    (
        "tickfan_queue_depth",
        "Ticks waiting in the priority queue, by priority.",
    ),
    (
        "tickfan_queue_refused_total",
        "Ticks refused for backpressure, by priority.",
    ),
    (
        "tickfan_queue_expired_total",
        "Ticks dropped at dequeue after their TTL, by priority.",
    ),
    (
        "tickfan_messages_queued_total",
        "Frames handed to client outbound queues by the dispatcher.",
    ),
    (
        "tickfan_messages_sent_total",
        "Frames written to client sockets.",
    ),
    (
        "tickfan_sent_bytes_total",
        "Payload bytes written to client sockets.",
    ),
    (
        "tickfan_conflated_ticks_total",
        "Ticks skipped by conflation (throttled and smart modes).",
    ),
    ("tickfan_mode_switches_total", "Smart-mode switches."),
    (
        "tickfan_batch_groups",
        "Shared batch groups (batch-mode clients with the same symbols, filter and interval get one frame per flush).",
    ),
    (
        "tickfan_batch_group_members",
        "Batch-mode clients served by a shared batch group.",
    ),
    (
        "tickfan_replays",
        "Paced replays (history, since_seq) running or waiting, one per client and symbol.",
    ),
    (
        "tickfan_replayed_ticks_total",
        "Ticks sent to clients in snapshot messages.",
    ),
    ("tickfan_connections", "Open client (/ws) connections."),
    (
        "tickfan_parked_connections",
        "Client connections parked off the runtime (quiet for server.park_after_ms).",
    ),
    (
        "tickfan_connection_parks_total",
        "Times a quiet client connection was parked.",
    ),
    (
        "tickfan_connection_unparks_total",
        "Times a parked client connection was resumed (a tick, request or close for it).",
    ),
    (
        "tickfan_parked_heartbeats_total",
        "Heartbeats written straight to parked connections' sockets (without resuming them).",
    ),
    (
        "tickfan_parked_pongs_total",
        "Pongs read from parked connections' sockets (without resuming them).",
    ),
    (
        "tickfan_open_connections",
        "Open WebSocket connections of all kinds (clients and producers).",
    ),
    (
        "tickfan_limit_hits_total",
        "Times a configured limit was hit, by limit.",
    ),
    (
        "tickfan_dead_letters_skipped_total",
        "Rejections not written to the dead-letter list because one frame or body had more than store.dlq_capacity.",
    ),
    (
        "tickfan_ingest_to_dispatch_seconds",
        "Seconds from server receipt to seq assignment.",
    ),
    (
        "tickfan_ingest_to_write_seconds",
        "Seconds from server receipt to the socket write (sampled).",
    ),
    (
        "tickfan_store_commit_seconds",
        "Duration of durable store commits.",
    ),
    (
        "tickfan_store_batch_ticks",
        "Ticks per durable store commit.",
    ),
    (
        "tickfan_store_commit_errors_total",
        "Store commits that failed (and were retried).",
    ),
    (
        "tickfan_bus_publish_seconds",
        "Cluster mode: seconds from a tick's publish to the bus's durable ack.",
    ),
    (
        "tickfan_bus_state",
        "Cluster mode: 1 for the bus state this node is in (label state), else 0.",
    ),
    (
        "tickfan_bus_consumer_lag",
        "Cluster mode: stream messages this node has not consumed yet.",
    ),
    (
        "tickfan_bus_reconnects_total",
        "Cluster mode: reconnections to NATS since start.",
    ),
    (
        "tickfan_bus_published_total",
        "Cluster mode: ticks this node stored in the stream.",
    ),
    (
        "tickfan_bus_consumed_total",
        "Cluster mode: stream messages this node consumed.",
    ),
    (
        "tickfan_bus_publish_conflicts_total",
        "Cluster mode: per-symbol compare-and-set conflicts (retried).",
    ),
    (
        "tickfan_bus_publish_errors_total",
        "Cluster mode: publish attempts that failed and were retried.",
    ),
    (
        "tickfan_bus_publish_expired_total",
        "Cluster mode: ticks not confirmed by the bus within publish_timeout_ms.",
    ),
    (
        "tickfan_bus_duplicates_total",
        "Cluster mode: publishes the stream answered as duplicates.",
    ),
    (
        "tickfan_bus_position",
        "Cluster mode: stream sequence up to which this node's store is complete.",
    ),
    (
        "tickfan_http_connections",
        "Open plain HTTP connections (accepted, not upgraded to WebSocket).",
    ),
    (
        "tickfan_store_failing",
        "1 while store writes fail (e.g. a full disk) and ingest refuses new ticks.",
    ),
    (
        "tickfan_store_retry_ticks",
        "Accepted ticks waiting for a failing store commit to be retried.",
    ),
    (
        "tickfan_store_reopens_total",
        "Times the store file was reopened after a write error.",
    ),
    (
        "tickfan_parking_wake_overflows_total",
        "Wake-ups of parked connections that overflowed the parking lot's ready list.",
    ),
    (
        "tickfan_ws_pongs_coalesced_total",
        "Pings left unanswered because a newer ping replaced a pong the socket had not taken yet.",
    ),
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
                    Matcher::Full("tickfan_store_batch_ticks".into()),
                    &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0],
                )
            })
            .map_or_else(
                |_| PrometheusBuilder::new().build_recorder(),
                PrometheusBuilder::build_recorder,
            );
        for (name, help) in HELP {
            recorder.describe_counter(KeyName::from(*name), None, SharedString::from(*help));
        }
        Self {
            recorder,
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        }
    }

    /// Cluster mode: histogram of seconds from a publish to the bus's ack.
    pub fn bus_publish_seconds(&self) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_name("tickfan_bus_publish_seconds"), &METADATA)
    }

    /// Histogram of seconds from server receipt (`t_in`) to the dispatcher stamping the tick.
    pub fn ingest_to_dispatch(&self) -> metrics::Histogram {
        self.recorder.register_histogram(
            &Key::from_name("tickfan_ingest_to_dispatch_seconds"),
            &METADATA,
        )
    }

    /// Histogram of seconds from a tick's receipt to its socket write (sampled).
    pub fn ingest_to_write(&self) -> metrics::Histogram {
        self.recorder.register_histogram(
            &Key::from_name("tickfan_ingest_to_write_seconds"),
            &METADATA,
        )
    }

    /// Histogram of store commit durations, seconds.
    pub fn store_commit_seconds(&self) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_name("tickfan_store_commit_seconds"), &METADATA)
    }

    /// Histogram of ticks per store commit.
    pub fn store_batch_ticks(&self) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_name("tickfan_store_batch_ticks"), &METADATA)
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

    fn counter(&self, name: &'static str, labels: Vec<Label>, value: u64) {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
            .absolute(value);
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>, value: u64) {
        #[allow(clippy::cast_precision_loss)]
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
            .set(value as f64);
    }

    /// Copies every counter into the recorder and renders the exposition text.
    #[must_use]
    pub fn render(&self, s: &AppState) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ing = &s.ingestor.stats;
        self.counter("tickfan_ticks_received_total", vec![], load(&ing.received));
        self.counter("tickfan_ticks_accepted_total", vec![], load(&ing.accepted));
        self.counter(
            "tickfan_ticks_duplicate_total",
            vec![],
            load(&ing.duplicates),
        );
        for (i, code) in RejectCode::ALL.iter().enumerate() {
            // Expiry happens after acceptance, in the dispatcher; it is counted there.
            let v = if *code == RejectCode::Expired {
                load(&s.dispatch_stats.expired)
            } else {
                load(&ing.rejected[i])
            };
            self.counter(
                "tickfan_ticks_rejected_total",
                vec![Label::new("code", code.as_str())],
                v,
            );
        }
        for p in Priority::ALL {
            let lane = s.queue.stats(p);
            let l = || vec![Label::new("priority", p.as_str())];
            self.gauge(
                "tickfan_queue_depth",
                l(),
                lane.depth.load(Ordering::Relaxed) as u64,
            );
            self.counter("tickfan_queue_pushed_total", l(), load(&lane.pushed));
            self.counter("tickfan_queue_refused_total", l(), load(&lane.refused));
            self.counter("tickfan_queue_expired_total", l(), load(&lane.expired));
        }
        self.gauge("tickfan_queue_capacity", vec![], s.queue.capacity() as u64);
        let d = &s.dispatch_stats;
        self.counter(
            "tickfan_ticks_dispatched_total",
            vec![],
            load(&d.dispatched),
        );
        self.counter("tickfan_messages_queued_total", vec![], load(&d.messages));
        self.counter("tickfan_conflated_ticks_total", vec![], load(&d.conflated));
        self.counter(
            "tickfan_mode_switches_total",
            vec![],
            load(&d.mode_switches),
        );
        self.gauge("tickfan_clients", vec![], load(&d.clients));
        self.gauge("tickfan_batch_groups", vec![], load(&d.batch_groups));
        self.gauge(
            "tickfan_batch_group_members",
            vec![],
            load(&d.batch_group_members),
        );
        self.gauge("tickfan_replays", vec![], load(&d.replays));
        self.counter(
            "tickfan_replayed_ticks_total",
            vec![],
            load(&d.replayed_ticks),
        );
        let c = &s.clients.stats;
        self.gauge("tickfan_connections", vec![], load(&c.open));
        let pk = &s.clients.parking.stats;
        self.gauge("tickfan_parked_connections", vec![], load(&pk.parked));
        self.counter("tickfan_connection_parks_total", vec![], load(&pk.parks));
        self.counter(
            "tickfan_connection_unparks_total",
            vec![],
            load(&pk.unparks),
        );
        self.counter(
            "tickfan_parked_heartbeats_total",
            vec![],
            load(&pk.heartbeats),
        );
        self.counter("tickfan_parked_pongs_total", vec![], load(&pk.pongs));
        self.counter("tickfan_messages_sent_total", vec![], load(&c.frames_sent));
        self.counter("tickfan_sent_bytes_total", vec![], load(&c.bytes_sent));
        let limit = |name: &'static str, v: u64| {
            self.counter(
                "tickfan_limit_hits_total",
                vec![Label::new("limit", name)],
                v,
            );
        };
        // Closed by the dispatcher (data or its replies) or by the connection (its replies).
        limit(
            "slow_consumer",
            load(&d.slow_consumer_closes) + load(&c.reply_overflow),
        );
        limit("ops_per_sec", load(&c.rate_limited));
        limit("abuse_close", load(&c.abuse_closed));
        limit("max_message_bytes", load(&c.too_big));
        limit("unauthorized", load(&c.unauthorized));
        limit("heartbeat_timeout", load(&c.idle_closed));
        limit("max_connections", load(&s.limits.refused_global));
        limit("max_connections_per_ip", load(&s.limits.refused_per_ip));
        limit("queue_full", load(&ing.refused));
        self.counter("tickfan_bad_requests_total", vec![], load(&c.bad_requests));
        self.counter(
            "tickfan_ws_pongs_coalesced_total",
            vec![],
            load(&c.pongs_coalesced),
        );
        self.gauge("tickfan_dead_letters", vec![], s.dead_letters.len() as u64);
        let st = s.store.stats();
        self.counter("tickfan_store_commits_total", vec![], st.commits);
        self.counter("tickfan_store_ticks_total", vec![], st.ticks_committed);
        self.counter(
            "tickfan_store_duplicate_ticks_total",
            vec![],
            st.duplicate_ticks,
        );
        self.counter(
            "tickfan_store_dead_letters_dropped_total",
            vec![],
            st.dead_letters_dropped,
        );
        self.counter(
            "tickfan_store_retention_removed_total",
            vec![],
            st.ticks_retained_away,
        );
        self.gauge(
            "tickfan_store_errors",
            vec![],
            u64::from(st.last_error.is_some()),
        );
        self.counter(
            "tickfan_store_commit_errors_total",
            vec![],
            st.commit_errors,
        );
        self.gauge("tickfan_open_connections", vec![], s.limits.open() as u64);
        self.gauge("tickfan_fd_limit", vec![], s.fd_limit);
        self.gauge(
            "tickfan_uptime_seconds",
            vec![],
            s.started.elapsed().as_secs(),
        );
        self.gauge(
            "tickfan_build_info",
            vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        limit("max_symbols", load(&d.too_many_symbols));
        limit("allowed_origins", load(&c.forbidden_origin));
        limit("http_unauthorized", load(&c.http_unauthorized));
        limit("max_body_bytes", load(&c.body_too_large));
        if let Some(bus) = &s.cluster {
            self.render_bus(bus);
        }
        let accept = &s.limits.accept;
        limit("max_tcp_connections", load(&accept.refused_total));
        limit("max_http_connections_per_ip", load(&accept.refused_per_ip));
        limit("header_timeout", load(&accept.header_timeouts));
        limit("body_timeout", load(&accept.body_timeouts));
        self.gauge("tickfan_http_connections", vec![], accept.open() as u64);
        limit("store_failing", load(&ing.refused_store_failing));
        self.gauge("tickfan_store_failing", vec![], u64::from(st.failing));
        self.gauge("tickfan_store_retry_ticks", vec![], st.retry_ticks);
        self.counter("tickfan_store_reopens_total", vec![], st.reopens);
        self.counter(
            "tickfan_parking_wake_overflows_total",
            vec![],
            s.clients.parking.wake_overflows(),
        );
        limit("max_json_depth", load(&ing.too_deep));
        limit("max_listed_rejections", load(&ing.unlisted_rejections));
        self.counter(
            "tickfan_dead_letters_skipped_total",
            vec![],
            load(&ing.dead_letters_skipped),
        );
        self.recorder.handle().render()
    }

    /// Cluster mode: the bus link's state and counters.
    fn render_bus(&self, bus: &crate::cluster::ClusterStatus) {
        use crate::cluster::BusState;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = bus.state();
        for state in [
            BusState::Connected,
            BusState::Disconnected,
            BusState::StreamUnavailable,
        ] {
            self.gauge(
                "tickfan_bus_state",
                vec![Label::new("state", state.as_str())],
                u64::from(state == now),
            );
        }
        self.gauge("tickfan_bus_consumer_lag", vec![], load(&bus.lag));
        self.gauge("tickfan_bus_position", vec![], load(&bus.position));
        for (name, v) in [
            ("tickfan_bus_reconnects_total", &bus.reconnects),
            ("tickfan_bus_published_total", &bus.published),
            ("tickfan_bus_consumed_total", &bus.consumed),
            ("tickfan_bus_publish_conflicts_total", &bus.conflicts),
            ("tickfan_bus_publish_errors_total", &bus.publish_errors),
            ("tickfan_bus_publish_expired_total", &bus.publish_expired),
            ("tickfan_bus_duplicates_total", &bus.bus_duplicates),
        ] {
            self.counter(name, vec![], load(v));
        }
    }
}

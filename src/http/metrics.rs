//! `GET /metrics`: reads every counter and gauge of the server ([`AppState`]) into its
//! recorder and renders the exposition. What each metric is (name, type, labels, help) is
//! defined once in [`crate::metrics`]; this is only where the values come from.

use std::sync::atomic::{AtomicU64, Ordering};

use super::AppState;
use crate::ingest::RejectCode;
use crate::metrics::{self as m, Metrics};
use crate::tick::Priority;

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Reads every counter and gauge into the recorder and renders the exposition text.
#[must_use]
pub fn render(s: &AppState) -> String {
    let r = &s.metrics;
    let ing = &s.ingestor.stats;
    r.counter(&m::TICKS_RECEIVED, &[], load(&ing.received));
    r.counter(&m::TICKS_ACCEPTED, &[], load(&ing.accepted));
    r.counter(&m::TICKS_DUPLICATE, &[], load(&ing.duplicates));
    for (i, code) in RejectCode::ALL.iter().enumerate() {
        // Expiry happens after acceptance, in the dispatcher; it is counted there.
        let v = if *code == RejectCode::Expired {
            load(&s.dispatch_stats.expired)
        } else {
            load(&ing.rejected[i])
        };
        r.counter(&m::TICKS_REJECTED, &[code.as_str()], v);
    }
    for p in Priority::ALL {
        let lane = s.queue.stats(p);
        let l = [p.as_str()];
        r.gauge(
            &m::QUEUE_DEPTH,
            &l,
            lane.depth.load(Ordering::Relaxed) as u64,
        );
        r.counter(&m::QUEUE_PUSHED, &l, load(&lane.pushed));
        r.counter(&m::QUEUE_REFUSED, &l, load(&lane.refused));
        r.counter(&m::QUEUE_EXPIRED, &l, load(&lane.expired));
    }
    r.gauge(&m::QUEUE_CAPACITY, &[], s.queue.capacity() as u64);
    let d = &s.dispatch_stats;
    r.counter(&m::TICKS_DISPATCHED, &[], load(&d.dispatched));
    r.counter(&m::MESSAGES_QUEUED, &[], load(&d.messages));
    r.counter(&m::CONFLATED_TICKS, &[], load(&d.conflated));
    r.counter(&m::MODE_SWITCHES, &[], load(&d.mode_switches));
    r.gauge(&m::CLIENTS, &[], load(&d.clients));
    r.gauge(&m::BATCH_GROUPS, &[], load(&d.batch_groups));
    r.gauge(&m::BATCH_GROUP_MEMBERS, &[], load(&d.batch_group_members));
    r.gauge(&m::REPLAYS, &[], load(&d.replays));
    r.counter(&m::REPLAYED_TICKS, &[], load(&d.replayed_ticks));
    let c = &s.clients.stats;
    let p = &s.producers.stats;
    r.gauge(&m::CONNECTIONS, &[], load(&c.open));
    let pk = &s.clients.parking.stats;
    r.gauge(&m::PARKED_CONNECTIONS, &[], load(&pk.parked));
    r.counter(&m::CONNECTION_PARKS, &[], load(&pk.parks));
    r.counter(&m::CONNECTION_UNPARKS, &[], load(&pk.unparks));
    r.counter(&m::PARKED_HEARTBEATS, &[], load(&pk.heartbeats));
    r.counter(&m::PARKED_PONGS, &[], load(&pk.pongs));
    r.counter(&m::PARK_REQUESTS, &[], load(&pk.park_requests));
    r.counter(
        &m::PARKING_WAKE_OVERFLOWS,
        &[],
        s.clients.parking.wake_overflows(),
    );
    r.counter(&m::MESSAGES_SENT, &[], load(&c.frames_sent));
    r.counter(&m::SENT_BYTES, &[], load(&c.bytes_sent));
    let accept = &s.accept;
    let limits = [
        // Closed by the dispatcher (data or its replies) or by the connection (its replies).
        (
            "slow_consumer",
            load(&d.slow_consumer_closes) + load(&c.reply_overflow),
        ),
        ("ops_per_sec", load(&c.rate_limited)),
        ("abuse_close", load(&c.abuse_closed)),
        ("max_message_bytes", load(&c.too_big) + load(&p.too_big)),
        ("unauthorized", load(&c.unauthorized)),
        ("heartbeat_timeout", load(&c.idle_closed)),
        ("max_connections", load(&s.connections.refused_global)),
        (
            "max_connections_per_ip",
            load(&s.connections.refused_per_ip),
        ),
        ("queue_full", load(&ing.refused)),
        ("max_symbols", load(&d.too_many_symbols)),
        ("allowed_origins", load(&c.forbidden_origin)),
        ("http_unauthorized", load(&c.http_unauthorized)),
        ("max_body_bytes", load(&c.body_too_large)),
        ("max_tcp_connections", load(&accept.refused_total)),
        ("max_http_connections_per_ip", load(&accept.refused_per_ip)),
        ("header_timeout", load(&accept.header_timeouts)),
        ("body_timeout", load(&accept.body_timeouts)),
        ("store_failing", load(&ing.refused_store_failing)),
        ("max_json_depth", load(&ing.too_deep)),
        ("max_listed_rejections", load(&ing.unlisted_rejections)),
    ];
    debug_assert!(limits.iter().map(|(l, _)| *l).eq(m::LIMITS.iter().copied()));
    for (limit, v) in limits {
        r.counter(&m::LIMIT_HITS, &[limit], v);
    }
    let failures = s.clients.verifier.stats.failures();
    for (reason, v) in crate::auth::AuthError::REASONS.iter().zip(failures) {
        r.counter(&m::AUTH_FAILURES, &[reason], v);
    }
    let expiries = [load(&c.token_expired), load(&p.token_expired)];
    for (route, v) in m::TOKEN_EXPIRY_ROUTES.iter().zip(expiries) {
        r.counter(&m::TOKEN_EXPIRIES, &[route], v);
    }
    r.counter(
        &m::BAD_REQUESTS,
        &[],
        load(&c.bad_requests) + load(&p.bad_frames),
    );
    r.counter(
        &m::WS_PONGS_COALESCED,
        &[],
        load(&c.pongs_coalesced) + load(&p.pongs_coalesced),
    );
    r.gauge(
        &m::DEFLATE_CONNECTIONS,
        &[],
        load(&c.deflate_open) + load(&p.deflate_open),
    );
    r.counter(&m::DEFLATE_COMPRESSIONS, &[], load(&c.deflate_compressions));
    r.counter(&m::DEFLATE_FRAMES_SENT, &[], load(&c.deflate_frames));
    r.counter(&m::DEFLATE_PLAIN_BYTES, &[], load(&c.deflate_plain_bytes));
    r.counter(&m::DEFLATE_WIRE_BYTES, &[], load(&c.deflate_wire_bytes));
    r.counter(
        &m::INFLATE_TOO_BIG,
        &[],
        load(&c.inflate_too_big) + load(&p.inflate_too_big),
    );
    r.counter(
        &m::INFLATE_DEFERRED,
        &[],
        load(&c.inflate_deferred) + load(&p.inflate_deferred),
    );
    r.counter(
        &m::INGEST_BACKPRESSURE_PAUSES,
        &[],
        load(&p.backpressure_pauses),
    );
    let tls = s.tls.as_ref().map(|t| &t.stats);
    let tls_count =
        |f: fn(&crate::transport::tls::TlsStats) -> &AtomicU64| tls.map_or(0, |t| load(f(t)));
    r.counter(&m::TLS_HANDSHAKES, &[], tls_count(|t| &t.handshakes));
    for (reason, v) in [
        ("timeout", tls_count(|t| &t.failed_timeout)),
        ("plaintext", tls_count(|t| &t.failed_plaintext)),
        ("error", tls_count(|t| &t.failed_error)),
    ] {
        r.counter(&m::TLS_HANDSHAKE_FAILURES, &[reason], v);
    }
    for (result, v) in [
        ("ok", tls_count(|t| &t.reloads_ok)),
        ("failed", tls_count(|t| &t.reloads_failed)),
    ] {
        r.counter(&m::TLS_CERT_RELOADS, &[result], v);
    }
    r.counter(
        &m::TLS_CONNECTION_ERRORS,
        &[],
        load(&c.tls_errors) + load(&p.tls_errors),
    );
    r.gauge(&m::DEAD_LETTERS, &[], s.dead_letters.len() as u64);
    r.counter(
        &m::DEAD_LETTERS_SKIPPED,
        &[],
        load(&ing.dead_letters_skipped),
    );
    let st = s.store.stats();
    r.counter(&m::STORE_COMMITS, &[], st.commits);
    r.counter(&m::STORE_TICKS, &[], st.ticks_committed);
    r.counter(&m::STORE_DUPLICATE_TICKS, &[], st.duplicate_ticks);
    r.counter(&m::STORE_DEAD_LETTERS_DROPPED, &[], st.dead_letters_dropped);
    r.counter(&m::STORE_RETENTION_REMOVED, &[], st.ticks_retained_away);
    r.gauge(&m::STORE_ERRORS, &[], u64::from(st.last_error.is_some()));
    r.counter(&m::STORE_COMMIT_ERRORS, &[], st.commit_errors);
    r.gauge(&m::STORE_FAILING, &[], u64::from(st.failing));
    r.gauge(&m::STORE_RETRY_TICKS, &[], st.retry_ticks);
    r.counter(&m::STORE_REOPENS, &[], st.reopens);
    r.counter(&m::STORE_LOG_APPENDS, &[], st.log_appends);
    r.counter(&m::STORE_LOG_ERRORS, &[], st.log_errors);
    r.gauge(&m::STORE_LOG_PENDING, &[], st.log_pending_ticks);
    r.gauge(&m::OPEN_CONNECTIONS, &[], s.connections.open() as u64);
    r.gauge(&m::HTTP_CONNECTIONS, &[], accept.open() as u64);
    r.gauge(&m::FD_LIMIT, &[], s.fd_limit);
    r.gauge(&m::UPTIME, &[], s.started.elapsed().as_secs());
    r.gauge(&m::BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1);
    if let Some(bus) = &s.cluster {
        render_bus(r, bus);
    }
    render_upstreams(r, &s.feeds);
    r.render()
}

/// Upstream feeds: each upstream's state and counters, labelled with its name.
fn render_upstreams(r: &Metrics, feeds: &crate::feed::FeedSet) {
    for u in feeds.upstreams() {
        let l = [u.name.as_str()];
        let c = &u.counters;
        r.gauge(
            &m::UPSTREAM_STATE,
            &l,
            u64::from(u.breaker.load(Ordering::Relaxed)),
        );
        r.gauge(
            &m::UPSTREAM_CONNECTED,
            &l,
            u64::from(u.connected.load(Ordering::Relaxed)),
        );
        for (def, v) in [
            (&m::UPSTREAM_TICKS, &c.ticks),
            (&m::UPSTREAM_MESSAGES, &c.messages),
            (&m::UPSTREAM_ACCEPTED, &c.accepted),
            (&m::UPSTREAM_DUPLICATES, &c.duplicates),
            (&m::UPSTREAM_REJECTED, &c.rejected),
            (&m::UPSTREAM_REFUSED, &c.refused),
            (&m::UPSTREAM_GARBAGE, &c.garbage),
            (&m::UPSTREAM_GAPS, &c.gaps),
            (&m::UPSTREAM_RECONNECTS, &c.reconnects),
            (&m::UPSTREAM_BREAKER_TRIPS, &c.breaker_trips),
            (&m::UPSTREAM_PROBES, &c.probes),
            (&m::UPSTREAM_FAILOVERS, &c.failovers),
            (&m::UPSTREAM_FAILBACKS, &c.failbacks),
            (&m::UPSTREAM_RESUMES, &c.resumes),
        ] {
            r.counter(def, &l, load(v));
        }
        let limits = [
            ("max_message_bytes", &c.too_big),
            ("max_json_depth", &c.too_deep),
            ("seam_ticks", &c.seam_dropped),
        ];
        debug_assert!(limits
            .iter()
            .map(|(l, _)| *l)
            .eq(m::UPSTREAM_LIMITS.iter().copied()));
        for (limit, v) in limits {
            r.counter(&m::UPSTREAM_LIMIT_HITS, &[u.name.as_str(), limit], load(v));
        }
    }
}

/// Cluster mode: the bus link's state and counters.
fn render_bus(r: &Metrics, bus: &crate::cluster::ClusterStatus) {
    use crate::cluster::BusState;
    let now = bus.state();
    for state in [
        BusState::Connected,
        BusState::Disconnected,
        BusState::StreamUnavailable,
    ] {
        r.gauge(&m::BUS_STATE, &[state.as_str()], u64::from(state == now));
    }
    r.gauge(&m::BUS_CONSUMER_LAG, &[], load(&bus.lag));
    r.gauge(&m::BUS_POSITION, &[], load(&bus.position));
    for (def, v) in [
        (&m::BUS_RECONNECTS, &bus.reconnects),
        (&m::BUS_PUBLISHED, &bus.published),
        (&m::BUS_CONSUMED, &bus.consumed),
        (&m::BUS_PUBLISH_CONFLICTS, &bus.conflicts),
        (&m::BUS_PUBLISH_ERRORS, &bus.publish_errors),
        (&m::BUS_PUBLISH_EXPIRED, &bus.publish_expired),
        (&m::BUS_DUPLICATES, &bus.bus_duplicates),
    ] {
        r.counter(def, &[], load(v));
    }
}

//! The read-only HTTP API: symbols, dead letters, stats, history and bars (store reads run
//! off the async runtime), plus `/health` and `/metrics`. Every route checks the client token
//! ([`ClientToken`]) when `[auth] client_tokens` or a JWT key is set, except health and metrics
//! (for probes and scrapers). A JWT limited to some symbols reads only those: `/api/symbols`
//! lists only them, history and bars of others are 403 `forbidden`, and so is `/api/dlq`
//! (dead letters may hold any symbol).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{error_response, AppState, ClientToken, Params, Token};
use crate::auth::Grant;
use crate::store::{Store, Timeframe};
use crate::tick::{Priority, Symbol};

/// 403 `forbidden` if `grant` may not read `symbol`.
fn unreadable(grant: &Grant, symbol: &str) -> Option<Response> {
    (!grant.may_read(symbol)).then(|| {
        error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token does not permit this symbol",
        )
    })
}

pub(super) async fn symbols(
    Token(grant, _): ClientToken,
    State(state): State<Arc<AppState>>,
) -> Response {
    match state.dispatcher.symbols().await {
        Ok(mut list) => {
            list.retain(|s| grant.may_read(s.symbol.as_str()));
            Json(json!({ "symbols": list })).into_response()
        }
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "shutting down",
        ),
    }
}

/// `?limit=N` (`?token=` is read by [`ClientToken`]).
#[derive(Debug, Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
}

pub(super) async fn dlq(
    Token(grant, _): ClientToken,
    State(state): State<Arc<AppState>>,
    Params(q): Params<LimitQuery>,
) -> Response {
    if grant.symbols().is_some() {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "dead letters may hold any symbol: a token limited to some symbols cannot read them",
        );
    }
    let limit = q.limit.unwrap_or(100).min(MAX_HTTP_LIMIT);
    Json(json!({ "entries": state.dead_letters.recent(limit) })).into_response()
}

pub(super) async fn stats(_: ClientToken, State(state): State<Arc<AppState>>) -> Response {
    let ing = &state.ingestor.stats;
    let d = &state.dispatch_stats;
    let lanes: serde_json::Map<_, _> = Priority::ALL
        .iter()
        .map(|p| {
            (
                p.as_str().to_owned(),
                state.queue.stats(*p).depth.load(Ordering::Relaxed).into(),
            )
        })
        .collect();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let pk = &state.clients.parking.stats;
    Json(json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "connections": state.clients.stats.open.load(Ordering::Relaxed),
        "clients": load(&d.clients),
        "batch_groups": { "groups": load(&d.batch_groups), "members": load(&d.batch_group_members) },
        "parking": {
            "parked": load(&pk.parked), "parks": load(&pk.parks),
            "unparks": load(&pk.unparks), "heartbeats": load(&pk.heartbeats),
            "pongs": load(&pk.pongs),
        },
        "ticks_received": load(&ing.received),
        "ticks_accepted": load(&ing.accepted),
        "ticks_rejected": ing.rejected_total(),
        "ticks_duplicate": load(&ing.duplicates),
        "ticks_refused": load(&ing.refused),
        "ticks_dispatched": load(&d.dispatched),
        "ingest_rate": state.metrics.ingest_rate(load(&ing.accepted)),
        "messages_sent": load(&state.clients.stats.frames_sent),
        "queue_depth": lanes,
        "queue_capacity": state.queue.capacity(),
        "latency_us": { "ingest_to_dispatch": *d.latency.lock() },
        "dropped": {
            "ttl_expired": load(&d.expired),
            "slow_consumer_closes": load(&d.slow_consumer_closes),
            "conflated": load(&d.conflated),
        },
        "epoch": state.clients.epoch,
    }))
    .into_response()
}

pub(super) async fn health(State(state): State<Arc<AppState>>) -> Response {
    let mut reasons = Vec::new();
    let depth = state.queue.depth();
    if depth * 100 >= state.queue.capacity() * 95 {
        reasons.push(format!(
            "priority queue {depth}/{} full",
            state.queue.capacity()
        ));
    }
    let store = state.store.stats();
    if store.failing {
        reasons.push(format!(
            "store: writes failing, new ticks refused, {} accepted tick(s) waiting to be stored: {}",
            store.retry_ticks,
            store.last_error.as_deref().unwrap_or("unknown error")
        ));
    } else if let Some(e) = store.last_error {
        reasons.push(format!("store: last commit failed: {e}"));
    }
    if state.clients.shutdown.is_cancelled() {
        reasons.push("shutting down".to_owned());
    }
    if let Some(cluster) = &state.cluster {
        let bus = cluster.state();
        if bus != crate::cluster::BusState::Connected {
            reasons.push(format!("cluster: bus {}", bus.as_str()));
        }
    }
    reasons.extend(state.feeds.health_reasons()); // feeds
    let mut body = json!({
        "status": if reasons.is_empty() { "ok" } else { "degraded" },
        "reasons": reasons,
        "uptime_s": state.started.elapsed().as_secs(),
        "connections": state.connections.open(),
        "max_connections": state.config.limits.max_connections,
        "fd_limit": state.fd_limit,
        "queue_depth": depth,
        "epoch": state.clients.epoch,
        "version": env!("CARGO_PKG_VERSION"),
    });
    state.feeds.extend_health(&mut body); // feeds
    if let (Some(cluster), Some(obj)) = (&state.cluster, body.as_object_mut()) {
        obj.insert("cluster".into(), cluster.health());
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = super::metrics::render(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `?limit=N&since_seq=S` (`?token=` is read by [`ClientToken`]).
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    limit: Option<usize>,
    since_seq: Option<u64>,
}

/// Largest `limit` of `/api/history` and `/api/bars`.
const MAX_HTTP_LIMIT: usize = 10_000;

/// The shared part of the store-backed read routes: the symbol name, and a read off the
/// async runtime with errors mapped to responses.
async fn read_store<T: Send + 'static>(
    state: &Arc<AppState>,
    symbol: &str,
    read: impl FnOnce(&Store, &str) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    if !Symbol::is_valid(symbol) {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_symbol",
            "symbol must be 1-32 of A-Z a-z 0-9 . - _ / :",
        ));
    }
    let store = state.store.clone();
    let symbol = symbol.to_owned();
    match tokio::task::spawn_blocking(move || read(&store, &symbol)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        )),
        Err(_) => Err(error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "store read failed",
        )),
    }
}

pub(super) async fn history(
    Token(grant, _): ClientToken,
    State(state): State<Arc<AppState>>,
    Path(symbol): Path<String>,
    Params(q): Params<HistoryQuery>,
) -> Response {
    if let Some(resp) = unreadable(&grant, &symbol) {
        return resp;
    }
    let limit = q.limit.unwrap_or(100).min(MAX_HTTP_LIMIT);
    let since = q.since_seq;
    let h = match read_store(&state, &symbol, move |store, sym| {
        store.history(sym, limit, since)
    })
    .await
    {
        Ok(h) => h,
        Err(resp) => return resp,
    };
    // The stored ticks are already JSON objects: splice them in rather than re-encode.
    let mut body = String::with_capacity(96 + h.ticks.iter().map(|t| t.len() + 1).sum::<usize>());
    body.push_str(r#"{"symbol":"#);
    body.push_str(&serde_json::to_string(&symbol).unwrap_or_default());
    body.push_str(r#","epoch":"#);
    body.push_str(itoa::Buffer::new().format(state.clients.epoch));
    body.push_str(r#","first_seq":"#);
    body.push_str(&h.first_seq.map_or("null".to_owned(), |s| s.to_string()));
    body.push_str(r#","last_seq":"#);
    body.push_str(itoa::Buffer::new().format(h.last_seq));
    body.push_str(r#","ticks":["#);
    for (i, t) in h.ticks.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(std::str::from_utf8(t).unwrap_or("null"));
    }
    body.push_str("]}");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `?tf=1m&limit=N` (`?token=` is read by [`ClientToken`]).
#[derive(Debug, Deserialize)]
pub struct BarsQuery {
    tf: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn bars(
    Token(grant, _): ClientToken,
    State(state): State<Arc<AppState>>,
    Path(symbol): Path<String>,
    Params(q): Params<BarsQuery>,
) -> Response {
    if let Some(resp) = unreadable(&grant, &symbol) {
        return resp;
    }
    let Some(tf) = Timeframe::parse(q.tf.as_deref().unwrap_or("1m")) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "tf must be one of 1m, 5m, 15m, 1h, 4h, 1d",
        );
    };
    let limit = q.limit.unwrap_or(100).min(MAX_HTTP_LIMIT);
    match read_store(&state, &symbol, move |store, sym| {
        store.bars(sym, tf, limit)
    })
    .await
    {
        Ok(bars) => {
            Json(json!({"symbol": symbol, "tf": tf.as_str(), "bars": bars})).into_response()
        }
        Err(resp) => resp,
    }
}

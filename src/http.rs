//! The one listener's routes: WebSocket upgrades for clients (`/ws`) and producers
//! (`/ingest`), the producer batch endpoint, read-only JSON APIs, health, metrics and the
//! embedded dashboard. Checks that must happen before an upgrade (tokens, origin, connection
//! limits) live here; everything after the upgrade belongs to `client` and `producer`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use tokio_util::task::TaskTracker;

use crate::client::{self, token_ok, AuthState, ClientContext};
use crate::config::Config;
use crate::dispatch::{DispatchStats, DispatcherHandle};
use crate::dlq::DeadLetters;
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::producer;
use crate::queue::PriorityQueue;
use crate::store::{Store, Timeframe};
use crate::tick::{Priority, Symbol};

/// Everything the routes need; cloned per request (an `Arc`).
pub struct AppState {
    /// Configuration.
    pub config: Arc<Config>,
    /// The ingest stage.
    pub ingestor: Arc<Ingestor>,
    /// The priority queue (depth for health and stats).
    pub queue: Arc<PriorityQueue>,
    /// Commands to the dispatcher.
    pub dispatcher: DispatcherHandle,
    /// Dispatcher counters.
    pub dispatch_stats: Arc<DispatchStats>,
    /// Shared by client connections.
    pub clients: Arc<ClientContext>,
    /// Dead letters.
    pub dead_letters: Arc<DeadLetters>,
    /// Upgraded connections, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Connection limits.
    pub limits: ConnectionLimits,
    /// Prometheus exposition.
    pub metrics: Metrics,
    /// Start time for uptime.
    pub started: Instant,
    /// Open-files limit in force (reported by /health).
    pub fd_limit: u64,
    /// The store (history, bars).
    pub store: Store,
}

/// Global and per-IP caps on open WebSocket connections.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Upgrades refused because the global cap was reached.
    pub refused_global: AtomicU64,
    /// Upgrades refused because the client's IP was at its cap.
    pub refused_per_ip: AtomicU64,
}

/// Holds one connection slot; frees it on drop.
pub struct ConnectionSlot {
    state: Arc<AppState>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let limits = &self.state.limits;
        limits.open.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = limits.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

impl ConnectionLimits {
    /// Open connections.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn acquire(state: &Arc<AppState>, ip: IpAddr) -> Result<ConnectionSlot, LimitRefusal> {
        let limits = &state.limits;
        let cfg = &state.config.limits;
        let admitted = limits
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cfg.max_connections).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            limits.refused_global.fetch_add(1, Ordering::Relaxed);
            return Err(LimitRefusal::Global);
        }
        let mut per_ip = limits.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= cfg.max_connections_per_ip {
            drop(per_ip);
            limits.open.fetch_sub(1, Ordering::AcqRel);
            limits.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            return Err(LimitRefusal::PerIp);
        }
        *n += 1;
        Ok(ConnectionSlot {
            state: state.clone(),
            ip,
        })
    }
}

/// Which connection cap refused an upgrade.
#[derive(Debug, Clone, Copy)]
enum LimitRefusal {
    Global,
    PerIp,
}

impl IntoResponse for LimitRefusal {
    fn into_response(self) -> Response {
        match self {
            Self::Global => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_connections",
                "server connection limit reached (limits.max_connections)",
            ),
            Self::PerIp => error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                "connection limit for this address reached (limits.max_connections_per_ip)",
            ),
        }
    }
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.limits.max_body_bytes;
    Router::new()
        .route("/", get(crate::dashboard::index))
        .route("/app.js", get(crate::dashboard::app_js))
        .route("/style.css", get(crate::dashboard::style_css))
        .route(
            "/vendor/lightweight-charts.js",
            get(crate::dashboard::chart_js),
        )
        .route("/ws", get(ws_client))
        .route("/ingest", get(ws_ingest))
        .route(
            "/api/ticks",
            post(post_ticks).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/api/symbols", get(symbols))
        .route("/api/history/{symbol}", get(history))
        .route("/api/bars/{symbol}", get(bars))
        .route("/api/dlq", get(dlq))
        .route("/api/stats", get(stats))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// `Authorization: Bearer T` or `?token=T`.
fn request_token<'a>(headers: &'a HeaderMap, query: &'a TokenQuery) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or(query.token.as_deref())
}

/// The `?token=` query parameter (other parameters are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "code": code, "message": message})),
    )
        .into_response()
}

fn unauthorized(state: &AppState) -> Response {
    state
        .clients
        .stats
        .http_unauthorized
        .fetch_add(1, Ordering::Relaxed);
    error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or invalid token",
    )
}

fn origin_allowed(config: &Config, headers: &HeaderMap) -> bool {
    let allowed = &config.server.allowed_origins;
    allowed.is_empty()
        || headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .is_none_or(|o| allowed.iter().any(|a| a == o))
}

/// Read buffer of client connections: requests are small, and idle connections are many.
const CLIENT_READ_BUFFER: usize = 512;
/// Read buffer of producer connections: frames of many ticks.
const PRODUCER_READ_BUFFER: usize = 64 * 1024;

fn sized(ws: WebSocketUpgrade, config: &Config, read_buffer: usize) -> WebSocketUpgrade {
    let max = config.limits.max_message_bytes;
    // The read buffer is only the chunk size of socket reads; bigger frames still arrive whole.
    ws.read_buffer_size(read_buffer)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(config.limits.outbound_buffer_bytes + 1024 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
}

async fn ws_client(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !origin_allowed(&state.config, &headers) {
        state
            .clients
            .stats
            .forbidden_origin
            .fetch_add(1, Ordering::Relaxed);
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "origin not allowed (server.allowed_origins)",
        );
    }
    let slot = match ConnectionLimits::acquire(&state, peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    let tokens = &state.config.auth.client_tokens;
    let auth = match request_token(&headers, &query) {
        _ if tokens.is_empty() => AuthState::Authorized,
        Some(t) if token_ok(tokens, Some(t)) => AuthState::Authorized,
        Some(_) => AuthState::Rejected,
        None => AuthState::Pending,
    };
    let ctx = state.clients.clone();
    let tracker = state.tracker.clone();
    sized(ws, &state.config, CLIENT_READ_BUFFER).on_upgrade(move |socket| {
        tracker.track_future(async move {
            client::serve(socket, ctx, auth, peer).await;
            drop(slot);
        })
    })
}

async fn ws_ingest(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !token_ok(
        &state.config.auth.ingest_tokens,
        request_token(&headers, &query),
    ) {
        return unauthorized(&state);
    }
    let slot = match ConnectionLimits::acquire(&state, peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.into_response(),
    };
    let ingestor = state.ingestor.clone();
    let ctx = state.clients.clone();
    let tracker = state.tracker.clone();
    sized(ws, &state.config, PRODUCER_READ_BUFFER).on_upgrade(move |socket| {
        tracker.track_future(async move {
            producer::serve(socket, ingestor, ctx).await;
            drop(slot);
        })
    })
}

async fn post_ticks(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    body: Bytes,
) -> Response {
    if !token_ok(
        &state.config.auth.ingest_tokens,
        request_token(&headers, &query),
    ) {
        return unauthorized(&state);
    }
    let ingestor = state.ingestor.clone();
    // Parsing a large body is CPU work; keep it off the async workers' fast path.
    let report = match tokio::task::spawn_blocking(move || ingestor.ingest_body(&body)).await {
        Ok(report) => report,
        Err(_) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "ingest failed",
            )
        }
    };
    let (ack, backpressure) = report.settle().await;
    match backpressure {
        None => Json(ack).into_response(),
        Some(bp) => {
            let secs = bp.retry_after_ms.div_ceil(1000).max(1);
            let mut body = serde_json::to_value(&bp).unwrap_or_default();
            // The ack's counts ride along so the producer knows what did get in.
            if let (Some(obj), Ok(serde_json::Value::Object(ack))) =
                (body.as_object_mut(), serde_json::to_value(&ack))
            {
                for key in ["accepted", "duplicates", "rejected"] {
                    if let Some(v) = ack.get(key) {
                        obj.insert(key.into(), v.clone());
                    }
                }
            }
            let mut resp = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
}

fn read_allowed(state: &AppState, headers: &HeaderMap, query: &TokenQuery) -> bool {
    token_ok(
        &state.config.auth.client_tokens,
        request_token(headers, query),
    )
}

async fn symbols(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !read_allowed(&state, &headers, &query) {
        return unauthorized(&state);
    }
    match state.dispatcher.symbols().await {
        Ok(list) => Json(json!({ "symbols": list })).into_response(),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "shutting down",
        ),
    }
}

/// `?limit=N` (and `?token=`).
#[derive(Debug, Deserialize)]
pub struct LimitQuery {
    limit: Option<usize>,
    token: Option<String>,
}

async fn dlq(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<LimitQuery>,
) -> Response {
    let tq = TokenQuery {
        token: q.token.clone(),
    };
    if !read_allowed(&state, &headers, &tq) {
        return unauthorized(&state);
    }
    let limit = q.limit.unwrap_or(100).min(10_000);
    Json(json!({ "entries": state.dead_letters.recent(limit) })).into_response()
}

async fn stats(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !read_allowed(&state, &headers, &query) {
        return unauthorized(&state);
    }
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
    Json(json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "connections": state.clients.stats.open.load(Ordering::Relaxed),
        "clients": load(&d.clients),
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

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let mut reasons = Vec::new();
    let depth = state.queue.depth();
    if depth * 100 >= state.queue.capacity() * 95 {
        reasons.push(format!(
            "priority queue {depth}/{} full",
            state.queue.capacity()
        ));
    }
    if let Some(e) = state.store.stats().last_error {
        reasons.push(format!("store: last commit failed: {e}"));
    }
    if state.clients.shutdown.is_cancelled() {
        reasons.push("shutting down".to_owned());
    }
    let body = json!({
        "status": if reasons.is_empty() { "ok" } else { "degraded" },
        "reasons": reasons,
        "uptime_s": state.started.elapsed().as_secs(),
        "connections": state.limits.open(),
        "max_connections": state.config.limits.max_connections,
        "fd_limit": state.fd_limit,
        "queue_depth": depth,
        "epoch": state.clients.epoch,
        "version": env!("CARGO_PKG_VERSION"),
    });
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `?limit=N&since_seq=S` (and `?token=`).
#[derive(Debug, Deserialize)]
pub struct HistoryQuery {
    limit: Option<usize>,
    since_seq: Option<u64>,
    token: Option<String>,
}

/// Largest `limit` of `/api/history` and `/api/bars`.
const MAX_HTTP_LIMIT: usize = 10_000;

/// The shared part of the store-backed read routes: token, symbol name, and a read off the
/// async runtime with errors mapped to responses.
async fn read_store<T: Send + 'static>(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    token: Option<String>,
    symbol: &str,
    read: impl FnOnce(&Store, &str) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Response> {
    if !read_allowed(state, headers, &TokenQuery { token }) {
        return Err(unauthorized(state));
    }
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

async fn history(
    State(state): State<Arc<AppState>>,
    Path(symbol): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).min(MAX_HTTP_LIMIT);
    let since = q.since_seq;
    let h = match read_store(&state, &headers, q.token, &symbol, move |store, sym| {
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

/// `?tf=1m&limit=N` (and `?token=`).
#[derive(Debug, Deserialize)]
pub struct BarsQuery {
    tf: Option<String>,
    limit: Option<usize>,
    token: Option<String>,
}

async fn bars(
    State(state): State<Arc<AppState>>,
    Path(symbol): Path<String>,
    headers: HeaderMap,
    Query(q): Query<BarsQuery>,
) -> Response {
    let Some(tf) = Timeframe::parse(q.tf.as_deref().unwrap_or("1m")) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "tf must be one of 1m, 5m, 15m, 1h, 4h, 1d",
        );
    };
    let limit = q.limit.unwrap_or(100).min(MAX_HTTP_LIMIT);
    match read_store(&state, &headers, q.token, &symbol, move |store, sym| {
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

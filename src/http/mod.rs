//! The one listener's routes: WebSocket upgrades for clients (`/ws`) and producers
//! (`/ingest`), the producer batch endpoint, read-only JSON APIs, health, metrics and the
//! embedded dashboard. Checks that must happen before an upgrade (tokens, origin, connection
//! limits) live here; everything after the upgrade belongs to `client` and `producer`. The
//! read-only JSON routes, health and metrics are in `api`.

mod admission;
mod api;
mod serve;

pub use admission::AcceptLimits;
pub use serve::serve;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
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
use crate::store::Store;
use crate::ws::ClientUpgrade;

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
    /// Cluster mode: the bus link's state and counters (`/health`'s `cluster` object).
    pub cluster: Option<Arc<crate::cluster::ClusterStatus>>,
    /// Upstream feeds (`/health`'s `upstreams`, `tickfan_upstream_*` metrics). // feeds
    pub feeds: Arc<crate::feed::FeedSet>,
}

/// Global and per-IP caps on open WebSocket connections, and (in `accept`) the caps on plain
/// HTTP connections checked at accept.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Upgrades refused because the global cap was reached.
    pub refused_global: AtomicU64,
    /// Upgrades refused because the client's IP was at its cap.
    pub refused_per_ip: AtomicU64,
    /// Caps and deadlines applied before any handler runs.
    pub accept: AcceptLimits,
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
    Router::new()
        .route("/", get(crate::dashboard::index))
        .route("/app.js", get(crate::dashboard::app_js))
        .route("/upstreams.js", get(crate::dashboard::upstreams_js)) // feeds
        .route("/tickfan.js", get(crate::dashboard::client_js))
        .route("/style.css", get(crate::dashboard::style_css))
        .route(
            "/vendor/lightweight-charts.js",
            get(crate::dashboard::chart_js),
        )
        .route("/ws", get(ws_client))
        .route("/ingest", get(ws_ingest))
        .route(
            "/api/ticks",
            // The handler enforces `max_body_bytes` itself, so the 413 is counted.
            post(post_ticks).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/symbols", get(api::symbols))
        .route("/api/history/{symbol}", get(api::history))
        .route("/api/bars/{symbol}", get(api::bars))
        .route("/api/dlq", get(api::dlq))
        .route("/api/stats", get(api::stats))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .with_state(state)
}

/// `Authorization: Bearer T` or `?token=T`.
pub(super) fn request_token<'a>(headers: &'a HeaderMap, query: &'a TokenQuery) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .or(query.token.as_deref())
}

/// The token of a `Bearer` credential. The scheme is case-insensitive (RFC 9110 11.1) and
/// clients differ in the spaces they put around the token, so any case and any run of spaces
/// or tabs pass; an empty token is no token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `?token=` query parameter (other parameters are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

pub(super) fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "code": code, "message": message})),
    )
        .into_response()
}

pub(super) fn unauthorized(state: &AppState) -> Response {
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

/// Runs an upgraded connection as a tracked task (so shutdown waits for it) that frees its
/// connection slot when it ends. Takes a closure rather than the future: a future moved into
/// an async block and awaited there is stored twice, and connection futures are the bulk of
/// an idle connection's memory.
fn tracked<Fut>(
    state: &AppState,
    slot: ConnectionSlot,
    serve: impl FnOnce() -> Fut + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    Fut: std::future::Future<Output = ()> + Send,
{
    state.tracker.track_future(async move {
        let _slot = slot;
        serve().await;
    })
}

async fn ws_client(
    ws: ClientUpgrade,
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
    let tokens = &state.config.auth.client_tokens;
    let auth = match request_token(&headers, &query) {
        _ if tokens.is_empty() => AuthState::Authorized,
        Some(t) if token_ok(tokens, Some(t)) => AuthState::Authorized,
        Some(_) => AuthState::Rejected,
        None => AuthState::Pending,
    };
    let slot = match ConnectionLimits::acquire(&state, peer.ip()) {
        Ok(slot) => slot,
        Err(refused) => return refused.into_response(),
    };
    let (resp, pending) = ws.accept();
    let ctx = state.clients.clone();
    tokio::spawn(client::serve(
        pending,
        ctx,
        auth,
        slot,
        state.tracker.token(),
    ));
    resp
}

async fn ws_ingest(
    ws: ClientUpgrade,
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
        Err(refused) => return refused.into_response(),
    };
    // tickfan's own transport, as `/ws`: frames and messages bounded by
    // `limits.max_message_bytes`, protocol errors answered with their close code.
    let (resp, pending) = ws.accept();
    let ingestor = state.ingestor.clone();
    let ctx = state.clients.clone();
    tokio::spawn(tracked(&state, slot, move || {
        producer::serve(pending, ingestor, ctx)
    }));
    resp
}

async fn post_ticks(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    body: Body,
) -> Response {
    if !token_ok(
        &state.config.auth.ingest_tokens,
        request_token(&headers, &query),
    ) {
        return unauthorized(&state);
    }
    let limit = state.config.limits.max_body_bytes;
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        state
            .clients
            .stats
            .body_too_large
            .fetch_add(1, Ordering::Relaxed);
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("body over limits.max_body_bytes ({limit} bytes)"),
        );
    };
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
                for key in [
                    "accepted",
                    "duplicates",
                    "rejected",
                    "rejected_total",
                    "rejected_truncated",
                ] {
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

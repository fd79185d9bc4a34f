//! The top layer: the one listener's routes and the state they share ([`AppState`]). WebSocket
//! upgrades for clients (`/ws`) and producers (`/ingest`) are checked here (tokens, origin,
//! connection caps) and handed to the session layer ([`crate::session`]); the producer batch
//! endpoint is here; the read-only JSON APIs, `/health` and `/metrics` are in [`api`], the
//! exposition in [`metrics`], the embedded dashboard in [`dashboard`]. This layer may import
//! anything below it; nothing below imports it.
//!
//! The openings every handler shares are extractors, written once: [`ClientToken`] and
//! [`IngestToken`] (the token check, 401 when it fails), [`Admitted`] (a WebSocket connection
//! slot, 503/429 when the caps are reached), [`AllowedOrigin`] and [`Params`] (query
//! parameters, 400 when malformed). Every error this layer sends has the JSON shape of
//! docs/protocol.md (`{"type":"error","code","message"}`): its own through
//! [`error_response`], and anything axum answers by itself (an unknown route, a method a
//! route does not serve) through [`json_errors`].

pub mod api;
pub mod dashboard;
pub mod metrics;

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio_util::task::TaskTracker;

use crate::auth::{redact_query, request_token, AuthError, AuthState, Grant, Role};
use crate::config::Config;
use crate::dispatch::{DispatchStats, DispatcherHandle};
use crate::dlq::DeadLetters;
use crate::ingest::Ingestor;
use crate::metrics::Metrics;
use crate::queue::PriorityQueue;
use crate::session::admission::{ConnectionLimits, ConnectionSlot};
use crate::session::producer::{self, ProducerContext};
use crate::session::{self, ClientContext};
use crate::store::Store;
use crate::transport::accept::AcceptLimits;
pub use crate::transport::error_response;
use crate::transport::ws::ClientUpgrade;

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
    /// Shared by producer connections.
    pub producers: Arc<ProducerContext>,
    /// Dead letters.
    pub dead_letters: Arc<DeadLetters>,
    /// Upgraded connections, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Caps on open WebSocket connections.
    pub connections: Arc<ConnectionLimits>,
    /// Caps on plain HTTP connections, checked at accept.
    pub accept: Arc<AcceptLimits>,
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
    /// The listener's TLS, if configured (`tickfan_tls_*` metrics).
    pub tls: Option<Arc<crate::transport::tls::Tls>>,
}

/// Builds the router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(dashboard::index))
        .route("/app.js", get(dashboard::app_js))
        .route("/upstreams.js", get(dashboard::upstreams_js)) // feeds
        .route("/tickfan.js", get(dashboard::client_js))
        .route("/style.css", get(dashboard::style_css))
        .route("/vendor/lightweight-charts.js", get(dashboard::chart_js))
        .route("/ws", get(ws_client))
        .route("/ingest", get(ws_ingest))
        .route(
            "/api/ticks",
            // The handler enforces `max_body_bytes` itself, so the 413 is counted.
            post(post_ticks).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/symbols", get(api::symbols))
        // A catch-all, so symbols with a `/` (`EUR/USD`) work as they are written; the
        // percent-encoded form (`EUR%2FUSD`) is decoded to the same.
        .route("/api/history/{*symbol}", get(api::history))
        .route("/api/bars/{*symbol}", get(api::bars))
        .route("/api/dlq", get(api::dlq))
        .route("/api/stats", get(api::stats))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Gives every error response the JSON error shape: those the handlers build already have it;
/// those axum builds itself (405 with its `Allow` header, a rejected extractor's text) get a
/// JSON body with the same status and headers, their text as the message.
pub async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // axum's own error bodies are a line of text; anything longer is cut, not buffered.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error"),
        text => text,
    };
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let body = crate::transport::error_body(code, message);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// The `?token=` query parameter (other parameters are ignored).
#[derive(Debug, Default, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The token a request carries (`Authorization: Bearer T` or `?token=T`), if any.
#[derive(Debug)]
pub struct RequestToken(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for RequestToken {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // A query that does not parse carries no token (its other parameters are checked by
        // the route's own `Params`).
        let query = Query::<TokenQuery>::try_from_uri(&parts.uri)
            .map(|Query(q)| q)
            .unwrap_or_default();
        let token = request_token(&parts.headers, query.token.as_deref()).map(str::to_owned);
        Ok(Self(token))
    }
}

/// Which role's tokens a route takes.
pub trait TokenList {
    /// The role checked.
    const ROLE: Role;
}

/// Client tokens: `/ws` and the read APIs.
#[derive(Debug)]
pub struct Clients;

impl TokenList for Clients {
    const ROLE: Role = Role::Client;
}

/// Producer tokens: `/ingest` and `POST /api/ticks`.
#[derive(Debug)]
pub struct Producers;

impl TokenList for Producers {
    const ROLE: Role = Role::Producer;
}

/// The request carries an acceptable token for the routes of `L` (or none is needed), and
/// this is what it grants. Rejection: 401 `unauthorized` or `token_expired`, or 403
/// `forbidden` for a valid token that does not allow the route (a client JWT on a producer
/// route); counted.
#[derive(Debug)]
pub struct Token<L>(pub Grant, PhantomData<L>);

/// The token check of the read APIs.
pub type ClientToken = Token<Clients>;
/// The token check of the ingest routes.
pub type IngestToken = Token<Producers>;

impl<L: TokenList> FromRequestParts<Arc<AppState>> for Token<L> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Ok(RequestToken(token)) = RequestToken::from_request_parts(parts, state).await;
        let e = match state.clients.verifier.check(L::ROLE, token.as_deref()) {
            Ok(grant) => {
                if let Some(sub) = grant.sub() {
                    tracing::debug!(sub, path = parts.uri.path(), "request authorized");
                }
                return Ok(Self(grant, PhantomData));
            }
            Err(e) => e,
        };
        // The URL as it may be logged: a `?token=` value never is.
        let uri = parts.uri.to_string();
        tracing::debug!(uri = %redact_query(&uri), reason = e.reason(), "request token refused");
        if e == AuthError::NotProducer {
            return Err(error_response(
                StatusCode::FORBIDDEN,
                e.code().as_str(),
                &e.to_string(),
            ));
        }
        state
            .clients
            .stats
            .http_unauthorized
            .fetch_add(1, Ordering::Relaxed);
        let message = match e {
            AuthError::Missing | AuthError::Invalid => "missing or invalid token".to_owned(),
            e => e.to_string(),
        };
        Err(error_response(
            StatusCode::UNAUTHORIZED,
            e.code().as_str(),
            &message,
        ))
    }
}

/// A WebSocket connection slot for the peer (`limits.max_connections`,
/// `limits.max_connections_per_ip`). Rejection: 503 or 429 `too_many_connections`.
pub struct Admitted(ConnectionSlot);

impl FromRequestParts<Arc<AppState>> for Admitted {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
        state
            .connections
            .acquire(peer)
            .map(Self)
            .map_err(IntoResponse::into_response)
    }
}

/// The request's `Origin` is allowed (`server.allowed_origins`; no `Origin`, or an empty
/// list, passes). Rejection: 403 `forbidden_origin`, counted.
pub struct AllowedOrigin;

impl FromRequestParts<Arc<AppState>> for AllowedOrigin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let allowed = &state.config.server.allowed_origins;
        let ok = allowed.is_empty()
            || parts
                .headers
                .get(header::ORIGIN)
                .and_then(|o| o.to_str().ok())
                .is_none_or(|o| allowed.iter().any(|a| a == o));
        if ok {
            return Ok(Self);
        }
        state
            .clients
            .stats
            .forbidden_origin
            .fetch_add(1, Ordering::Relaxed);
        Err(error_response(
            StatusCode::FORBIDDEN,
            "forbidden_origin",
            "origin not allowed (server.allowed_origins)",
        ))
    }
}

/// A route's query parameters. Rejection: 400 `bad_request` with what was wrong.
pub struct Params<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::try_from_uri(&parts.uri)
            .map(|Query(q)| Self(q))
            .map_err(|e| error_response(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()))
    }
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
    _: AllowedOrigin,
    RequestToken(token): RequestToken,
    State(state): State<Arc<AppState>>,
    Admitted(slot): Admitted,
) -> Response {
    // A missing or wrong token is answered on the WebSocket (a late `auth` op, or 4001).
    let auth = AuthState::of(&state.clients.verifier, token.as_deref());
    let (resp, pending) = ws.accept(state.config.server.permessage_deflate);
    let ctx = state.clients.clone();
    tokio::spawn(session::serve(
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
    // Extractors run in order: the connection limits first, so a flood over them never
    // pays for signature checks (RS/ES verification costs far more than a refusal).
    Admitted(slot): Admitted,
    Token(grant, _): IngestToken,
    State(state): State<Arc<AppState>>,
) -> Response {
    // tickfan's own transport, as `/ws`: frames and messages bounded by
    // `limits.max_message_bytes`, protocol errors answered with their close code.
    let (resp, pending) = ws.accept(state.config.server.permessage_deflate);
    let ctx = state.producers.clone();
    tokio::spawn(tracked(&state, slot, move || {
        producer::serve(pending, ctx, grant)
    }));
    resp
}

async fn post_ticks(
    Token(grant, _): IngestToken,
    State(state): State<Arc<AppState>>,
    body: Body,
) -> Response {
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
    let report = match tokio::task::spawn_blocking(move || {
        ingestor.ingest_body_for(&body, grant.ingest_symbols().map(Arc::as_ref))
    })
    .await
    {
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

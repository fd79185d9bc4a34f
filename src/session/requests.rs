//! What a `/ws` client's text requests do, in order: the request rate limit (a GCRA per
//! connection, created with its first request), parsing, the late `auth` op, and either an
//! answer from here (`pong`, errors) or a command to the dispatcher (subscribe, unsubscribe,
//! configure, list). An `auth` op on a live session is a token refresh: the new token's
//! expiry replaces the old one's on the link, and its permissions go to the dispatcher. Requests come in from the connection loop in [`super`]; replies go out
//! through the connection's link.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{json, Value};

use super::{expiry_deadline, refusal, Conn, Flow, Standing};
use crate::auth::{Grant, Role};
use crate::dispatch::outbound::{Frame, PushError};
use crate::dispatch::Command;
use crate::protocol::{self, close, error_message, ErrorCode, Request};
use crate::tick::now_ms;

/// How long the request limiter takes to refill its whole burst (the burst is two seconds'
/// worth of `limits.ops_per_sec`). A connection that sent no request for this long has a full
/// limiter and no run of refused requests, which is exactly a fresh one: parking may drop it.
pub const BURST_REFILL_MS: u64 = 2_000;

/// A connection's request rate limiter and when it last let a request through.
pub(super) struct RequestLimiter {
    gcra: DefaultDirectRateLimiter,
    last_ms: u64,
}

impl RequestLimiter {
    /// Whether the limiter is as good as a fresh one at `now_ms`: no request for longer than
    /// [`BURST_REFILL_MS`] (strictly: `last_ms` is rounded down).
    pub(super) fn is_full(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_ms) > BURST_REFILL_MS
    }

    fn new(ops_per_sec: u32) -> Self {
        let ops = NonZeroU32::new(ops_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = ops.saturating_mul(NonZeroU32::new(2).unwrap_or(NonZeroU32::MIN));
        Self {
            gcra: RateLimiter::direct(Quota::per_second(ops).allow_burst(burst)),
            last_ms: 0,
        }
    }
}

/// Queues `text` as a reply to the client's request.
pub(super) fn reply(conn: &Conn, text: String) -> Flow {
    match conn.out.push_control(Frame::from(text)) {
        Ok(()) => Flow::Continue,
        Err(e) => {
            // The dispatcher counts the slow consumers it closes; this one it never sees.
            if matches!(e, PushError::Full) {
                conn.ctx
                    .stats
                    .reply_overflow
                    .fetch_add(1, Ordering::Relaxed);
            }
            Flow::Close(close::SLOW_CONSUMER, "slow consumer")
        }
    }
}

/// Handles one text request: rate limit, parse, then answer here or hand to the dispatcher.
pub(super) async fn on_request(conn: &mut Conn, text: &str) -> Flow {
    let ctx = conn.ctx.clone();
    let parsed = protocol::parse_request_with_depth(text, ctx.config.limits.max_json_depth);
    let is_ping = matches!(parsed, Ok((_, Request::Ping)));
    if !is_ping {
        let limiter = conn
            .limiter
            .get_or_insert_with(|| Box::new(RequestLimiter::new(ctx.config.limits.ops_per_sec)));
        limiter.last_ms = ctx.connections.clock_ms();
        if let Err(not_until) = limiter.gcra.check() {
            conn.limited_in_a_row += 1;
            ctx.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            if conn.limited_in_a_row > ctx.config.limits.max_rate_limited {
                ctx.stats.abuse_closed.fetch_add(1, Ordering::Relaxed);
                return Flow::Close(close::POLICY, "request rate abuse");
            }
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let retry = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            let id = parsed.as_ref().ok().and_then(|(id, _)| id.clone());
            return reply(
                conn,
                error_message(
                    id.as_ref(),
                    ErrorCode::RateLimited,
                    "too many requests",
                    Some(retry),
                ),
            );
        }
        conn.limited_in_a_row = 0;
    }
    let (id, request) = match parsed {
        Ok(ok) => ok,
        Err(bad) => {
            ctx.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return reply(
                conn,
                error_message(bad.id.as_ref(), ErrorCode::BadRequest, &bad.message, None),
            );
        }
    };
    match request {
        Request::Ping => reply(
            conn,
            json!({"type":"pong","id":id,"server_time":now_ms()}).to_string(),
        ),
        Request::Auth { token } => on_auth(conn, id, &token.0).await,
        _ if conn.key.is_none() => reply(
            conn,
            error_message(
                id.as_ref(),
                ErrorCode::Unauthorized,
                "authenticate first: {\"op\":\"auth\",\"token\":...}",
                None,
            ),
        ),
        request => {
            let Ok(cmd) = Command::from_request(conn.key().unwrap_or_default(), id, request) else {
                // Ping and auth were answered above.
                return Flow::Continue;
            };
            match ctx.dispatcher.send(cmd).await {
                Ok(()) => Flow::Continue,
                Err(_) => Flow::Close(close::GOING_AWAY, "server shutting down"),
            }
        }
    }
}

async fn on_auth(conn: &mut Conn, id: Option<Value>, token: &str) -> Flow {
    let ctx = conn.ctx.clone();
    let verdict = ctx.verifier.check(Role::Client, Some(token));
    if conn.key.is_some() {
        return refresh(conn, id, verdict).await;
    }
    let grant = match verdict {
        Ok(grant) => grant,
        Err(e) => {
            ctx.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(reason = e.reason(), "auth op refused: closing 4001");
            return Flow::CloseWith(close::UNAUTHORIZED, "unauthorized", refusal(id.as_ref(), e));
        }
    };
    // The time to authenticate becomes the token's expiry, or goes.
    let (in_time, standing) = match expiry_deadline(&ctx, &grant) {
        Some(at) => (conn.out.replace_auth_deadline(at), Standing::Expiring),
        None => (conn.out.lift_auth_deadline(), Standing::Authorized),
    };
    if !in_time {
        // The deadline passed first; the close order is on its way.
        return Flow::Continue;
    }
    conn.auth = standing;
    if let Some(sub) = grant.sub() {
        tracing::debug!(sub, "client authenticated");
    }
    let permitted = grant.symbols().cloned();
    conn.grant = grant;
    match ctx.dispatcher.register(conn.out.clone(), permitted).await {
        Ok(key) => {
            conn.set_key(key);
            reply(conn, json!({"type":"ack","id":id,"op":"auth"}).to_string())
        }
        Err(_) => Flow::Close(close::GOING_AWAY, "server shutting down"),
    }
}

/// A token sent on a live session. A refused one ends the session like any failed auth (its
/// error, then close 4001), and so does one naming another user (`sub`) than the token in
/// force: a refresh extends a session, it does not switch users. An accepted one moves the
/// expiry and replaces the permissions (the dispatcher acks, after telling the client which
/// subscriptions it lost).
async fn refresh(
    conn: &mut Conn,
    id: Option<Value>,
    verdict: Result<Grant, crate::auth::AuthError>,
) -> Flow {
    let ctx = conn.ctx.clone();
    let grant = match verdict {
        Ok(grant) => grant,
        Err(e) => {
            ctx.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                reason = e.reason(),
                sub = conn.grant.sub(),
                "token refresh refused: closing 4001"
            );
            return Flow::CloseWith(close::UNAUTHORIZED, "unauthorized", refusal(id.as_ref(), e));
        }
    };
    if let (Some(old), Some(new)) = (conn.grant.sub(), grant.sub()) {
        if old != new {
            ctx.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                sub = old,
                new_sub = new,
                "token refresh for another user refused: closing 4001"
            );
            let msg = "the new token names another user (sub) than the session's";
            return Flow::CloseWith(
                close::UNAUTHORIZED,
                "unauthorized",
                error_message(id.as_ref(), ErrorCode::Forbidden, msg, None),
            );
        }
    }
    let deadline = expiry_deadline(&ctx, &grant);
    let in_time = match (conn.auth, deadline) {
        (Standing::Expiring, Some(at)) => conn.out.replace_auth_deadline(at),
        (Standing::Expiring, None) => conn.out.lift_auth_deadline(),
        (_, Some(at)) => {
            conn.out.set_auth_deadline(at);
            true
        }
        (_, None) => true,
    };
    if !in_time {
        // The old token expired first; the close order is on its way.
        return Flow::Continue;
    }
    conn.auth = if deadline.is_some() {
        Standing::Expiring
    } else {
        Standing::Authorized
    };
    if let Some(sub) = grant.sub() {
        tracing::debug!(sub, "client token refreshed");
    }
    let cmd = Command::Reauthorize {
        key: conn.key().unwrap_or_default(),
        id,
        permitted: grant.symbols().cloned(),
    };
    conn.grant = grant;
    match ctx.dispatcher.send(cmd).await {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Close(close::GOING_AWAY, "server shutting down"),
    }
}

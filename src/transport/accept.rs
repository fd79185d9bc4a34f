//! Admission before any handler runs: the caps checked when a TCP connection is accepted (open
//! connections in all, plain HTTP connections per client address) and the deadline on each
//! request's body. Data flows one way: the accept loop ([`super::listener`]) asks [`admit`]
//! for an [`HttpSlot`], which the connection's task holds until hyper lets go of the socket (at
//! an upgrade the session layer's WebSocket caps take over, so every open socket is counted by
//! one or the other; the listener is told how many those hold); each request body is wrapped in
//! a [`TimedBody`], whose [`BodyWatch`] tells the service whether the body is still owed when
//! its deadline passes. The limits come in as plain values ([`AcceptConfig`]), so this layer
//! knows nothing of the configuration file.
//!
//! Written here rather than taken from tower-http: its `TimeoutLayer` bounds the whole
//! handler (an ingest commit may rightly take longer than a body may take to arrive) and its
//! `RequestBodyTimeoutLayer` only times single reads, which a slow drip defeats. Caps at accept
//! have to run before hyper owns the socket, so no layer can do them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use parking_lot::Mutex;

use super::{error_body, error_response};

/// The limits admission and the listener apply, as plain values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptConfig {
    /// Sockets open in all (plain HTTP plus upgraded) past which a connection is refused at
    /// accept: see [`tcp_cap`].
    pub cap: usize,
    /// Plain HTTP connections one address may hold (`limits.max_http_connections_per_ip`).
    pub max_http_per_ip: usize,
    /// Time a connection has to send a request head (`limits.header_timeout_ms`).
    pub header_timeout_ms: u64,
    /// Time a request has to send its body (`limits.body_timeout_ms`).
    pub body_timeout_ms: u64,
}

/// Connections open in all and per client address: the bookkeeping both connection caps (this
/// one at accept, the session layer's on upgraded connections) share.
#[derive(Debug, Default)]
pub struct OpenCounts {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Which cap [`OpenCounts::try_add`] hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CapHit {
    /// The total.
    Total,
    /// The address's share.
    PerIp,
}

impl OpenCounts {
    /// Connections open now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts one more connection from `ip` if `total_ok` accepts the number open now and the
    /// address has fewer than `max_per_ip`; [`OpenCounts::remove`] takes it off again. A
    /// refusal is counted in `refused` (total, per address).
    ///
    /// # Errors
    /// The cap that refused it (the connection was not counted in).
    pub fn try_add(
        &self,
        ip: IpAddr,
        total_ok: impl Fn(usize) -> bool,
        max_per_ip: usize,
        refused: [&AtomicU64; 2],
    ) -> Result<(), CapHit> {
        let hit = self.add(ip, total_ok, max_per_ip);
        if let Err(hit) = hit {
            let counter = if hit == CapHit::Total {
                refused[0]
            } else {
                refused[1]
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    fn add(
        &self,
        ip: IpAddr,
        total_ok: impl Fn(usize) -> bool,
        max_per_ip: usize,
    ) -> Result<(), CapHit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                total_ok(n).then_some(n + 1)
            })
            .map_err(|_| CapHit::Total)?;
        let mut per_ip = self.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max_per_ip {
            if *n == 0 {
                per_ip.remove(&ip);
            }
            drop(per_ip);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(CapHit::PerIp);
        }
        *n += 1;
        Ok(())
    }

    /// Takes one connection from `ip` off the counts.
    pub fn remove(&self, ip: IpAddr) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }
}

/// Counters and per-address counts of plain HTTP connections (accepted, not upgraded).
#[derive(Debug)]
pub struct AcceptLimits {
    /// The limits in force.
    pub config: AcceptConfig,
    counts: OpenCounts,
    /// Connections closed at accept: `limits.max_tcp_connections` open already.
    pub refused_total: AtomicU64,
    /// Connections closed at accept: `limits.max_http_connections_per_ip` open from the address.
    pub refused_per_ip: AtomicU64,
    /// Connections closed for not sending a request head in `limits.header_timeout_ms`.
    pub header_timeouts: AtomicU64,
    /// Requests answered 408 for not sending their body in `limits.body_timeout_ms`.
    pub body_timeouts: AtomicU64,
}

impl AcceptLimits {
    /// No connection open yet, under `config`.
    #[must_use]
    pub fn new(config: AcceptConfig) -> Self {
        Self {
            config,
            counts: OpenCounts::default(),
            refused_total: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
            header_timeouts: AtomicU64::new(0),
            body_timeouts: AtomicU64::new(0),
        }
    }

    /// Plain HTTP connections open now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.counts.open()
    }
}

/// The cap on open TCP connections in force: `max_tcp_connections`
/// (`limits.max_tcp_connections`), or when that is 0 the open-files limit minus
/// `reserved_fds` (`limits.reserved_fds`; never below half the limit, so a tiny limit still
/// serves). An unknown limit (`fd_limit` 0) gives no derived cap.
#[must_use]
pub fn tcp_cap(max_tcp_connections: usize, reserved_fds: usize, fd_limit: u64) -> usize {
    if max_tcp_connections > 0 {
        return max_tcp_connections;
    }
    if fd_limit == 0 {
        return usize::MAX;
    }
    let fds = usize::try_from(fd_limit).unwrap_or(usize::MAX);
    fds.saturating_sub(reserved_fds).max(fds / 2).max(1)
}

/// Which cap refused a connection at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `limits.max_tcp_connections` (or the derived cap) open in all.
    Total,
    /// `limits.max_http_connections_per_ip` plain HTTP connections open from the address.
    PerIp,
}

impl Refusal {
    /// A complete `503` response, small enough to go into a fresh socket's send buffer
    /// without blocking, written before the socket is closed.
    #[must_use]
    pub fn response_bytes(self) -> Vec<u8> {
        let message = match self {
            Self::Total => "server connection limit reached (limits.max_tcp_connections)",
            Self::PerIp => {
                "too many connections from this address (limits.max_http_connections_per_ip)"
            }
        };
        let body = error_body("too_many_connections", message);
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// One admitted plain HTTP connection; frees its place on drop.
pub struct HttpSlot {
    limits: Arc<AcceptLimits>,
    ip: IpAddr,
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.limits.counts.remove(self.ip);
    }
}

/// Admits a connection just accepted from `ip` if the process has fewer than `config.cap`
/// sockets open (plain HTTP plus the `upgraded` ones) and the address fewer than its plain
/// HTTP cap.
///
/// # Errors
/// The cap that refused it (already counted).
pub fn admit(accept: &Arc<AcceptLimits>, ip: IpAddr, upgraded: usize) -> Result<HttpSlot, Refusal> {
    let cap = accept.config.cap;
    accept
        .counts
        .try_add(
            ip,
            |n| n.saturating_add(upgraded) < cap,
            accept.config.max_http_per_ip,
            [&accept.refused_total, &accept.refused_per_ip],
        )
        .map_err(|hit| match hit {
            CapHit::Total => Refusal::Total,
            CapHit::PerIp => Refusal::PerIp,
        })?;
    Ok(HttpSlot {
        limits: accept.clone(),
        ip,
    })
}

/// Whether a request body is still owed: set once it has been read to its end or dropped
/// (by a handler that answered without it, or because the request was abandoned).
#[derive(Debug, Default)]
pub struct BodyWatch {
    done: AtomicBool,
}

impl BodyWatch {
    /// Whether the body is no longer owed (read to its end, dropped, or empty).
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Resolves at `deadline` if the body is still owed then; never otherwise (a handler that
    /// has the whole body may take as long as its work takes).
    pub async fn owed_at(&self, deadline: tokio::time::Instant) {
        tokio::time::sleep_until(deadline).await;
        if self.done.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
    }
}

/// A request body that reports to its [`BodyWatch`] when it is complete or dropped.
pub struct TimedBody {
    inner: Incoming,
    watch: Arc<BodyWatch>,
}

impl TimedBody {
    /// Wraps `inner`; a body that is empty from the start is done at once.
    pub fn new(inner: Incoming) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch {
            done: AtomicBool::new(inner.is_end_stream()),
        });
        (
            Self {
                inner,
                watch: watch.clone(),
            },
            watch,
        )
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.watch.done.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TimedBody {
    fn drop(&mut self) {
        self.watch.done.store(true, Ordering::Release);
    }
}

/// The answer to a request whose body missed its deadline. `Connection: close`: the rest of
/// the body is not read, so the connection cannot carry another request.
#[must_use]
pub fn request_timeout(body_timeout_ms: u64) -> Response {
    let mut resp = error_response(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        &format!("request body not received within limits.body_timeout_ms ({body_timeout_ms} ms)"),
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Wraps a request's body for the deadline; what the service needs to enforce it.
pub fn timed(req: hyper::Request<Incoming>) -> (axum::extract::Request, Arc<BodyWatch>) {
    let (parts, body) = req.into_parts();
    let (body, watch) = TimedBody::new(body);
    (
        axum::extract::Request::from_parts(parts, Body::new(body)),
        watch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_cap_leaves_reserved_fds_under_the_open_files_limit() {
        let limits = crate::config::LimitsConfig::default();
        let cap = |max_tcp, fds| tcp_cap(max_tcp, limits.reserved_fds, fds);
        assert_eq!(cap(0, 20_000), 20_000 - limits.reserved_fds);
        assert_eq!(cap(0, 0), usize::MAX);
        // A limit smaller than the reserve still serves half of it.
        assert_eq!(cap(0, 300), 150);
        assert_eq!(cap(7, 20_000), 7);
    }

    #[test]
    fn the_refusal_is_a_complete_small_response() {
        for r in [Refusal::Total, Refusal::PerIp] {
            let bytes = r.response_bytes();
            let text = String::from_utf8(bytes.clone()).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 503"));
            assert!(head.contains(&format!("content-length: {}", body.len())));
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["code"], "too_many_connections");
            assert!(bytes.len() < 512);
        }
    }
}

//! The WebSocket transport of `/ws` client and `/ingest` producer connections, written for many
//! mostly idle connections: the HTTP upgrade ([`ClientUpgrade`], checked before the 101 goes
//! out), then the bare `TcpStream` (and on a TLS listener its rustls state, see
//! [`super::tls`]) taken back from hyper and framed by [`WsSocket`], which
//! decodes with the pure [`Decoder`], holds no buffer while a connection is idle and writes the
//! dispatcher's shared frames without copying them. Both endpoints share this one framing
//! layer, so limits (`limits.max_message_bytes`) and close behaviour (1002/1007/1009 before
//! FIN) are the same on both, and so is permessage-deflate ([`deflate`], negotiated here in
//! the upgrade). [`fuzzing`] holds the checks the fuzz targets (and the corpus
//! replay test) run.

pub mod decoder;
pub mod deflate;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod socket;

pub use decoder::{Decoder, Incoming};
pub use socket::{ReadError, WsSocket, CONTROL_DEBT_CAP};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::tls::Upgraded;

/// A valid WebSocket upgrade request, not answered yet.
pub struct ClientUpgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
    /// The answer to the client's acceptable permessage-deflate offer, if it made one.
    deflate: Option<HeaderValue>,
}

/// Why an upgrade request was refused (answered 400 with this text, or 426 for the version).
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRefused(&'static str);

impl UpgradeRefused {
    /// The reason, as sent in the response body.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

impl IntoResponse for UpgradeRefused {
    fn into_response(self) -> Response {
        if self.0.contains("Version") {
            let mut resp =
                super::error_response(StatusCode::UPGRADE_REQUIRED, "upgrade_required", self.0);
            resp.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return resp;
        }
        super::error_response(StatusCode::BAD_REQUEST, "bad_request", self.0)
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Checks the headers of a WebSocket upgrade request (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Accept` value to answer with. Pure, so the fuzz target can drive it.
///
/// # Errors
/// Why the request is refused (400, or 426 for the version).
pub fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, UpgradeRefused> {
    if !has_token(headers, header::CONNECTION, "upgrade")
        || !has_token(headers, header::UPGRADE, "websocket")
    {
        return Err(UpgradeRefused(
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(UpgradeRefused("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err(UpgradeRefused("missing Sec-WebSocket-Key"));
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).map_err(|_| UpgradeRefused("bad Sec-WebSocket-Key"))
}

impl<S: Send + Sync> FromRequestParts<S> for ClientUpgrade {
    type Rejection = UpgradeRefused;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let accept = accept_key(&parts.headers)?;
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeRefused("connection cannot be upgraded"))?;
        let deflate = deflate::negotiate(&parts.headers);
        Ok(Self {
            accept,
            on_upgrade,
            deflate,
        })
    }
}

impl ClientUpgrade {
    /// Answers 101, with permessage-deflate (no context takeover) if the client offered it
    /// acceptably and `allow_deflate` (the server's config) permits it; the connection is
    /// served from the returned [`PendingUpgrade`] once hyper has sent the response and hands
    /// the stream over.
    #[must_use]
    pub fn accept(self, allow_deflate: bool) -> (Response, PendingUpgrade) {
        let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, self.accept);
        let deflate = self.deflate.filter(|_| allow_deflate);
        let negotiated = deflate.is_some();
        if let Some(answer) = deflate {
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, answer);
        }
        (
            resp,
            PendingUpgrade {
                on_upgrade: self.on_upgrade,
                deflate: negotiated,
            },
        )
    }
}

/// An accepted upgrade whose stream hyper has not handed over yet. The connection's task
/// starts from this (not from a closure around it) so that its future stores nothing twice.
pub struct PendingUpgrade {
    on_upgrade: OnUpgrade,
    deflate: bool,
}

impl PendingUpgrade {
    /// Whether permessage-deflate was negotiated (the connection then sends and accepts
    /// compressed messages; see [`deflate`]).
    #[must_use]
    pub fn deflate(&self) -> bool {
        self.deflate
    }

    /// The bare stream (with its rustls state on a TLS listener) and the bytes hyper had
    /// already read past the request (a client may send its first frame right behind the
    /// handshake); `None` if the upgrade failed.
    pub async fn stream(self) -> Option<(Upgraded, bytes::Bytes)> {
        let upgraded = match self.on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return None;
            }
        };
        // The listener (`transport::listener`) hands hyper the bare stream, plain or TLS, so
        // one of these fits unless the accept loop changes; say so loudly rather than serve
        // through a slower path.
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => return Some((parts.io.into_inner().into(), parts.read_buf)),
            Err(upgraded) => upgraded,
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() else {
            tracing::error!("upgraded connection is neither a bare TcpStream nor a TLS stream");
            return None;
        };
        match super::tls::take_apart(parts.io.into_inner(), parts.read_buf) {
            Ok(taken) => Some(taken),
            Err(e) => {
                tracing::debug!(error = %e, "TLS stream broken at the upgrade");
                None
            }
        }
    }
}

//! The transport layer: bytes and sockets, nothing about ticks or clients. Data flows up from
//! here: the [`listener`] accepts TCP connections (admitted by the caps in [`accept`] before
//! anything is read) and hands them to hyper with the router above as the service; a WebSocket
//! upgrade takes the bare stream back and frames it with [`ws`]; a quiet connection's socket
//! waits in the parking [`lot`] until something arrives for it. Outbound, the layer writes
//! what the outbound link ([`crate::dispatch::outbound`]) holds. With a certificate configured,
//! every accepted connection first completes a TLS handshake ([`tls`]) and the same paths run
//! over rustls (TLS connections do not park).
//!
//! It imports nothing from the rest of the crate except that link: sessions, routing and the
//! HTTP routes sit on top of it and plug in through generic parameters ([`lot::Parked`]) and
//! plain values ([`accept::AcceptConfig`]).
//!
//! The one JSON error shape of every HTTP error the server sends (`{"type":"error","code",
//! "message"}`, docs/protocol.md "Errors") is written here, by [`error_body`] and
//! [`error_response`], since this is the lowest layer that answers HTTP requests itself.

pub mod accept;
pub mod listener;
pub mod lot;
pub mod tls;
pub mod ws;

use std::sync::OnceLock;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use listener::serve;

/// The JSON body of an HTTP error: `{"type":"error","code":..,"message":..}`.
#[must_use]
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "code": code, "message": message}).to_string()
}

/// An HTTP error response with the JSON error body ([`error_body`]).
#[must_use]
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        error_body(code, message),
    )
        .into_response()
}

/// What the binary's allocator does to give freed memory back to the OS at once.
static RELEASE_MEMORY: OnceLock<fn()> = OnceLock::new();

/// Sets how to return freed memory to the OS, called after many connections parked at once
/// (their tasks' memory is freed together, but an allocator may hold on to it for a while)
/// and after a request body was dropped at its deadline. The binary owns the allocator
/// choice, so it supplies this; the library never calls into an allocator on its own. Only
/// the first call counts.
pub fn set_memory_release(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

/// Returns freed memory to the OS if the binary said how.
pub fn release_memory() {
    if let Some(release) = RELEASE_MEMORY.get() {
        release();
    }
}

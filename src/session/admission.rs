//! Admission of WebSocket sessions: the global and per-address caps on open upgraded
//! connections (`limits.max_connections`, `limits.max_connections_per_ip`). An upgrade asks
//! [`ConnectionLimits::acquire`] for a [`ConnectionSlot`], which the session holds (running or
//! parked) until it ends. A slot keeps only these limits alive, not the server's state, so a
//! parked connection costs what it needs and no more. Plain HTTP connections are capped
//! before this, at accept ([`crate::transport::accept`]).

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::transport::accept::{CapHit, OpenCounts};
use crate::transport::error_response;

/// Global and per-IP caps on open WebSocket connections.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// `limits.max_connections`.
    max: usize,
    /// `limits.max_connections_per_ip`.
    max_per_ip: usize,
    counts: OpenCounts,
    /// Upgrades refused because the global cap was reached.
    pub refused_global: AtomicU64,
    /// Upgrades refused because the client's IP was at its cap.
    pub refused_per_ip: AtomicU64,
}

/// Holds one connection slot; frees it on drop.
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.counts.remove(self.ip);
    }
}

impl ConnectionLimits {
    /// No connection open yet; at most `max` in all and `max_per_ip` from one address.
    #[must_use]
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        Self {
            max,
            max_per_ip,
            counts: OpenCounts::default(),
            refused_global: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
        }
    }

    /// Open connections.
    #[must_use]
    pub fn open(&self) -> usize {
        self.counts.open()
    }

    /// A slot for one more connection from `ip`.
    ///
    /// # Errors
    /// The cap that refused it (already counted); its response is the answer to the upgrade.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, LimitRefusal> {
        self.counts
            .try_add(
                ip,
                |n| n < self.max,
                self.max_per_ip,
                [&self.refused_global, &self.refused_per_ip],
            )
            .map_err(|hit| match hit {
                CapHit::Total => LimitRefusal::Global,
                CapHit::PerIp => LimitRefusal::PerIp,
            })?;
        Ok(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }
}

/// Which connection cap refused an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitRefusal {
    /// `limits.max_connections` open in all.
    Global,
    /// `limits.max_connections_per_ip` open from the address.
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

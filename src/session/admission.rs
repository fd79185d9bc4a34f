//! Admission of WebSocket sessions: the global and per-address caps on open upgraded
//! connections (`limits.max_connections`, `limits.max_connections_per_ip`). An upgrade asks
//! [`ConnectionLimits::acquire`] for a [`ConnectionSlot`], which the session holds (running or
//! parked) until it ends. A slot keeps only these limits alive, not the server's state, so a
//! parked connection costs what it needs and no more. Plain HTTP connections are capped
//! before this, at accept ([`crate::transport::accept`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use parking_lot::Mutex;

use crate::transport::error_response;

/// Global and per-IP caps on open WebSocket connections.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// `limits.max_connections`.
    max: usize,
    /// `limits.max_connections_per_ip`.
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
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
        let limits = &self.limits;
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
    /// No connection open yet; at most `max` in all and `max_per_ip` from one address.
    #[must_use]
    pub fn new(max: usize, max_per_ip: usize) -> Self {
        Self {
            max,
            max_per_ip,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            refused_global: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
        }
    }

    /// Open connections.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A slot for one more connection from `ip`.
    ///
    /// # Errors
    /// The cap that refused it (already counted); its response is the answer to the upgrade.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionSlot, LimitRefusal> {
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.refused_global.fetch_add(1, Ordering::Relaxed);
            return Err(LimitRefusal::Global);
        }
        let mut per_ip = self.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(per_ip);
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            return Err(LimitRefusal::PerIp);
        }
        *n += 1;
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

//! What connections and the HTTP layer send the dispatcher: the `Command` enum (replies come
//! back on `oneshot` channels or on the client's own outbound queue, so they stay ordered with
//! its ticks) and the cloneable `DispatcherHandle` that sends them.

use std::collections::HashMap;

use serde_json::Value;
use tokio::sync::oneshot;

use std::sync::Arc;

use super::outbound::Outbound;
use super::registry::ClientKey;
use super::SymbolInfo;
use crate::auth::SymbolPatterns;
use crate::protocol::{Request, Settings};
use crate::store::History;
use crate::tick::Symbol;

/// A request to the dispatcher.
#[derive(Debug)]
pub enum Command {
    /// A new connection; the reply is its key for later commands.
    Register {
        /// Its outbound queue.
        out: Outbound,
        /// The symbols its token permits (`None`: all).
        permitted: Option<Arc<SymbolPatterns>>,
        /// Receives the key.
        reply: oneshot::Sender<ClientKey>,
    },
    /// The connection has gone.
    Deregister {
        /// Whose.
        key: ClientKey,
    },
    /// `subscribe`
    Subscribe {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// Symbols as sent.
        symbols: Vec<String>,
        /// Connection-wide settings.
        settings: Settings,
        /// Last N ticks per symbol.
        history: usize,
        /// Resume points.
        since_seq: HashMap<String, u64>,
    },
    /// `unsubscribe`
    Unsubscribe {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// Symbols as sent.
        symbols: Vec<String>,
    },
    /// `configure`
    Configure {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// New settings.
        settings: Settings,
    },
    /// `symbols` from a client: answered on its queue.
    ClientSymbols {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
    },
    /// A snapshot page read from the store (sent by the dispatcher's own reader task).
    SnapshotLoaded {
        /// What was read.
        read: SnapshotRead,
        /// The read's outcome.
        result: Result<History, String>,
    },
    /// A refreshed token (`{"op":"auth"}` on a live session): its permissions replace the
    /// old ones; subscriptions they no longer cover end, with an `unsubscribed` notice; then
    /// the `auth` ack.
    Reauthorize {
        /// Whose.
        key: ClientKey,
        /// Request id to echo.
        id: Option<Value>,
        /// The symbols the new token permits (`None`: all).
        permitted: Option<Arc<SymbolPatterns>>,
    },
    /// `/api/symbols`
    ListSymbols {
        /// Receives the list.
        reply: oneshot::Sender<Vec<SymbolInfo>>,
    },
}

impl Command {
    /// The command a client's request becomes, from connection `key` with request `id`: the
    /// one place request fields are carried over. `Err` gives back a request the dispatcher
    /// does not handle (`ping` and `auth` are answered by the session).
    ///
    /// # Errors
    /// The request, unchanged, when it is not the dispatcher's.
    pub fn from_request(
        key: ClientKey,
        id: Option<Value>,
        request: Request,
    ) -> Result<Self, Request> {
        Ok(match request {
            Request::Subscribe {
                symbols,
                settings,
                history,
                since_seq,
            } => Self::Subscribe {
                key,
                id,
                symbols,
                settings,
                history,
                since_seq,
            },
            Request::Unsubscribe { symbols } => Self::Unsubscribe { key, id, symbols },
            Request::Configure(settings) => Self::Configure { key, id, settings },
            Request::Symbols => Self::ClientSymbols { key, id },
            other @ (Request::Ping | Request::Auth { .. }) => return Err(other),
        })
    }
}

/// One store read of a paced replay, for one client and symbol.
#[derive(Debug, Clone)]
pub struct SnapshotRead {
    pub(super) key: ClientKey,
    /// Which registration of that key asked (keys are reused).
    pub(super) serial: u64,
    pub(super) symbol: Symbol,
    /// Which replay of that symbol asked (a new subscribe restarts it).
    pub(super) generation: u64,
    /// Read ticks with seq above this.
    pub(super) since: u64,
    /// At most this many.
    pub(super) limit: usize,
    /// Wait first for ticks already handed to the store.
    pub(super) flush: bool,
}

/// A handle for sending commands.
#[derive(Debug, Clone)]
pub struct DispatcherHandle {
    pub(super) tx: flume::Sender<Command>,
}

impl DispatcherHandle {
    /// Sends a command, waiting while the dispatcher's command queue is full.
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn send(&self, cmd: Command) -> Result<(), DispatcherGone> {
        self.tx.send_async(cmd).await.map_err(|_| DispatcherGone)
    }

    /// Registers a connection whose token permits `permitted` (`None`: all symbols).
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn register(
        &self,
        out: Outbound,
        permitted: Option<Arc<SymbolPatterns>>,
    ) -> Result<ClientKey, DispatcherGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Register {
            out,
            permitted,
            reply,
        })
        .await?;
        rx.await.map_err(|_| DispatcherGone)
    }

    /// Lists known symbols.
    ///
    /// # Errors
    /// The dispatcher has stopped.
    pub async fn symbols(&self) -> Result<Vec<SymbolInfo>, DispatcherGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListSymbols { reply }).await?;
        rx.await.map_err(|_| DispatcherGone)
    }

    /// Tells the dispatcher a connection has gone, without waiting.
    pub fn deregister(&self, key: ClientKey) {
        // If the command queue is full, fall back to a task so the entry is still removed.
        if let Err(flume::TrySendError::Full(cmd)) = self.tx.try_send(Command::Deregister { key }) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send_async(cmd).await;
            });
        }
    }
}

/// The dispatcher has stopped (server shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("dispatcher stopped")]
pub struct DispatcherGone;

//! # tickfan
//!
//! A WebSocket real-time market-data fan-out server.
//!
//! # Layout
//!
//! Data flows left to right:
//! `producers / simulator → ingest → queue → dispatch → per-client outbound queue → socket`,
//! with `dispatch → store` beside it (durable history, snapshots and resume).
//!
//! - [`config`]: the TOML configuration, read once and passed down.
//! - [`tick`]: the validated tick, its priority and its one serialization.
//! - [`ingest`]: parse (simd-json), validate, score quality, de-duplicate, enqueue.
//! - [`json_depth`]: the nesting bound every untrusted JSON document passes before parsing.
//! - [`queue`]: the four-level bounded priority queue with admission limits and TTL.
//! - [`dispatch`]: the one owner of routing state; stamps `seq`, fans out with `try_send`.
//!   Shares only its outbound link (`dispatch::outbound`) with the connection layers above.
//!
//! The connection layer is three layers, each importing only from those below it
//! (`tests/import_cycles.rs` checks this and that no module imports in a loop):
//! - [`transport`]: bytes and sockets: the accept loop and its caps, RFC 6455 framing and the
//!   buffer-free socket (`transport::ws`), the parking lot where quiet connections wait off
//!   the runtime. Imports nothing of the crate but the outbound link.
//! - [`session`]: what an upgraded connection does: the `/ws` client session (requests,
//!   liveness sweep, parking, admission) and the `/ingest` producer session. Talks to routing
//!   through the dispatcher handle, its `Command`s and the outbound link.
//! - [`http`]: the top: the router, [`http::AppState`], the plain routes, `/metrics`
//!   rendering and the embedded dashboard (`web/`).
//! - [`auth`]: tokens (bearer header or `?token=`), for sessions and routes alike.
//!
//! Beside the data path:
//! - [`store`]: the redb store (history, bars, dead letters, epoch) and its write-ahead log.
//! - [`dlq`]: the bounded dead-letter list.
//! - [`import`]: `tickfan import`, bulk loading of CSV/NDJSON history into the store.
//! - [`ack`]: ingest acks that wait for the tick's durable fate.
//! - [`simulator`]: the built-in market simulator.
//! - [`feed`]: upstream exchange feeds (Binance, Coinbase, Kraken, another tickfan) pulled
//!   into ingest, with reconnect backoff, a circuit breaker and failover.
//! - [`protocol`]: client request and reply messages.
//! - [`metrics`]: every Prometheus metric's definition (name, type, labels, help) and the
//!   recorder.
//! - [`server`]: wires everything and owns shutdown order; `server::run` is the entry point.
//! - [`shutdown`]: the SIGINT/SIGTERM signal; [`logging`]: tracing setup.
//! - [`cluster`]: cluster mode (off by default): nodes share one tick stream through NATS
//!   JetStream; ingest publishes to it, every node's dispatcher consumes it.

pub mod ack;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod dlq;
pub mod error;
pub mod feed;
pub mod http;
pub mod import;
pub mod ingest;
pub mod json_depth;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod simulator;
pub mod store;
pub mod tick;
pub mod transport;

pub use config::Config;
pub use server::run;

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
//! - [`client`]: one task per running `/ws` connection; requests in, queued frames out.
//! - [`parking`]: quiet `/ws` connections waiting off the runtime, in one epoll set.
//! - [`ws`]: the WebSocket transport of `/ws` and `/ingest`: upgrade, framing (one socket-free
//!   decoder), buffer-free idle sockets.
//! - [`liveness`]: one sweep for every connection's heartbeat, idle and auth deadlines.
//! - [`producer`]: the `/ingest` WebSocket.
//! - [`http`]: the router and the plain HTTP routes.
//! - [`dashboard`]: the embedded browser dashboard (`web/`).
//! - [`store`]: the redb store (history, bars, dead letters, epoch).
//! - [`dlq`]: the bounded dead-letter list.
//! - [`import`]: `tickfan import`, bulk loading of CSV/NDJSON history into the store.
//! - [`ack`]: ingest acks that wait for the tick's durable fate.
//! - [`simulator`]: the built-in market simulator.
//! - [`feed`]: upstream exchange feeds (Binance, Coinbase, Kraken, another tickfan) pulled
//!   into ingest, with reconnect backoff, a circuit breaker and failover.
//! - [`protocol`]: client request and reply messages.
//! - [`metrics`]: Prometheus metrics.
//! - [`server`]: wires everything and owns shutdown order; `server::run` is the entry point.
//! - [`shutdown`]: the SIGINT/SIGTERM signal; [`logging`]: tracing setup.
//! - [`cluster`]: cluster mode (off by default): nodes share one tick stream through NATS
//!   JetStream; ingest publishes to it, every node's dispatcher consumes it.

pub mod ack;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod dispatch;
pub mod dlq;
pub mod error;
pub mod feed;
pub mod http;
pub mod import;
pub mod ingest;
pub mod json_depth;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod parking;
pub mod producer;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod shutdown;
pub mod simulator;
pub mod store;
pub mod tick;
pub mod ws;

pub use config::Config;
pub use server::run;

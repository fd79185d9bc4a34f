//! Configuration: the TOML file (`config/default.toml` is the reference), read once at start
//! and passed down by value. Every section rejects unknown keys so a typo is an error naming the
//! key, and every field has a default so an empty file (or no file) is a working server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The whole configuration, one struct per `[section]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener and connection-level settings.
    pub server: ServerConfig,
    /// Where the embedded store keeps its files.
    pub store: StoreConfig,
    /// Built-in tick sources.
    pub feed: FeedConfig,
    /// Tokens for clients and producers.
    pub auth: AuthConfig,
    /// Per-connection and per-process limits.
    pub limits: LimitsConfig,
    /// The four-level priority queue between ingest and dispatch.
    pub queue: QueueConfig,
    /// Tick validation and de-duplication.
    pub validation: ValidationConfig,
    /// Fan-out to clients.
    pub dispatch: DispatchConfig,
    /// Logging.
    pub log: LogConfig,
    /// Cluster mode: nodes sharing one tick stream through NATS JetStream (docs/cluster.md).
    pub cluster: ClusterConfig,
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the one HTTP + WebSocket listener binds. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Interval of the application heartbeat message and of WebSocket pings. A connection that
    /// sends nothing (not even a pong) for three heartbeats is closed.
    pub heartbeat_ms: u64,
    /// How long shutdown waits for connections to close before giving up on them.
    pub shutdown_grace_ms: u64,
    /// Allowed `Origin` header values for browser connections; empty allows any origin.
    pub allowed_origins: Vec<String>,
    /// Pending-connection queue of the listening socket. A burst of connects beyond it makes
    /// the kernel drop SYNs (clients retry after a second), so size it for reconnect storms.
    pub listen_backlog: u32,
    /// How long a closing connection may take to get its last message and close frame
    /// through (they queue behind data already in the socket), in ms; then it is dropped.
    pub close_timeout_ms: u64,
    /// A `/ws` connection that has read and written nothing for this long (ms) leaves the
    /// async runtime and waits in the parking lot, about 1.7 KiB smaller; the next tick, request
    /// or close for it resumes it within tens of microseconds, and heartbeats reach it without
    /// resuming it. Checked by the liveness sweep, so the actual delay is up to a second
    /// more; a connection also parks only once it has sent no request for 2 s (its request
    /// rate limiter is full again and need not be kept). 0 keeps every connection on the
    /// runtime.
    pub park_after_ms: u64,
    /// PEM certificate chain (leaf first) that makes the listener serve `https://` and
    /// `wss://` instead of plain text; needs `tls_key_file`. Reloaded on SIGHUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1); needs `tls_cert_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Encrypted bytes rustls may hold per TLS connection that the kernel has not taken yet;
    /// past it, frames wait in the outbound link as on a plain connection. Minimum 4096.
    pub tls_buffer_bytes: usize,
    /// Accept a client's permessage-deflate offer (RFC 7692) on `/ws` and `/ingest`, in the one
    /// form where every message is compressed on its own (`server_no_context_takeover;
    /// client_no_context_takeover`): a tick or batch frame is then compressed once and the same
    /// bytes go to every client that negotiated it, so compression costs no memory per
    /// connection. Clients that do not offer it get plain frames; `false` answers every offer
    /// with plain frames.
    pub permessage_deflate: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            heartbeat_ms: 15_000,
            shutdown_grace_ms: 5_000,
            allowed_origins: Vec::new(),
            listen_backlog: 4_096,
            close_timeout_ms: 30_000,
            park_after_ms: 2_000,
            tls_cert_file: None,
            tls_key_file: None,
            tls_buffer_bytes: 64 * 1024,
            permessage_deflate: true,
        }
    }
}

/// `[store]`
///
/// The embedded redb store: durable history, bars, dead letters and the epoch. Ingest acks wait
/// for the store's durable commit, so the group-commit keys trade ack latency for throughput.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Folder of the redb file and anything else the store keeps.
    pub dir: PathBuf,
    /// Dead-letter entries kept (oldest dropped first), so a flood of bad input cannot grow the
    /// file without bound. 0 keeps none.
    pub dlq_capacity: usize,
    /// Group-commit window in ms: a write transaction starts at most once per window, counted
    /// from the previous commit. Every transaction pays one fdatasync; an idle store commits at
    /// once (an ack costs one fsync), a busy one shares each fsync among everything that arrived
    /// in the window, which bounds commits to 1000/window per second and keeps the fsync load
    /// from crowding out fan-out. 0 commits whenever the queue is momentarily empty. A flush
    /// request always ends the window early.
    pub group_commit_ms: u64,
    /// Most ticks in one write transaction. Bounds the latency of a single commit (and so the
    /// ack latency of the first tick in it) when a large backlog is waiting.
    pub group_commit_max_ticks: usize,
    /// Checkpoint interval of the write-ahead log, in ms. A group of ticks smaller than
    /// `log_max_group_ticks` is made durable by one append to `<dir>/tickfan.log` (acked
    /// then), and redb takes everything logged in one durable transaction at most this long
    /// afterwards, which costs far less CPU than a redb commit per group. A crash replays the
    /// log at the next open. Reads (history, bars, resumes) wait for a checkpoint when
    /// logged ticks of their symbol are pending, so they always see every acked tick. 0
    /// turns the log off:
    /// every group is a durable redb commit.
    pub checkpoint_ms: u64,
    /// Logged ticks waiting for a checkpoint at most; reaching it checkpoints at once. Bounds
    /// the memory they hold and the replay after a crash.
    pub checkpoint_max_ticks: usize,
    /// Groups of at least this many ticks skip the log and commit to redb directly (taking
    /// what is logged with them): a big group shares a redb commit well, and writing it twice
    /// would cost more than it saves.
    pub log_max_group_ticks: usize,
    /// Batches waiting for the writer thread. When full, `append` waits: this is the
    /// backpressure that reaches the dispatcher and ingest instead of unbounded memory.
    pub writer_queue: usize,
    /// Raw ticks kept per symbol, newest kept; 0 keeps any number. Bounds the file size for
    /// busy symbols while bars keep the long view.
    pub max_ticks_per_symbol: u64,
    /// Raw ticks older than this (by their `ts`) are removed, in ms; 0 keeps ticks by age.
    pub max_age_ms: u64,
    /// Bars older than this (by bucket start) are removed, in ms; 0 keeps bars by age. Bars are
    /// small, so this is normally much longer than `max_age_ms`: charts outlive raw history.
    pub bars_max_age_ms: u64,
    /// Bars kept per symbol and timeframe, counted in buckets back from the symbol's newest
    /// bar; 0 keeps any number. Keeps 1m bars from growing forever while 1d bars reach far back.
    pub bars_max_per_symbol: u64,
    /// Interval of the background retention pass, in ms. The pass runs in small transactions
    /// between group commits, so it never stalls ingest for long; 0 disables it.
    pub retention_interval_ms: u64,
    /// Rows a retention transaction deletes at most before the writer goes back to pending
    /// ticks. Smaller keeps ack latency flat while a large backlog of old data is removed.
    pub retention_batch: usize,
    /// Memory redb may use to cache file pages, in MiB. Recent history is read far more often
    /// than old history, so a modest cache serves most snapshot and resume reads.
    pub cache_mb: usize,
    /// Verify every page checksum when opening a store that was shut down cleanly. A file
    /// damaged outside the server then fails to open with a clear error instead of failing
    /// later; turn off to start faster on very large stores. (After an unclean stop redb
    /// always verifies and repairs.)
    pub verify_on_open: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
            dlq_capacity: 10_000,
            group_commit_ms: 5,
            group_commit_max_ticks: 100_000,
            checkpoint_ms: 200,
            checkpoint_max_ticks: 10_000,
            log_max_group_ticks: 2_048,
            writer_queue: 256,
            max_ticks_per_symbol: 1_000_000,
            max_age_ms: 0,
            bars_max_age_ms: 0,
            bars_max_per_symbol: 100_000,
            retention_interval_ms: 10_000,
            retention_batch: 20_000,
            cache_mb: 256,
            verify_on_open: true,
        }
    }
}

/// `[feed]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// Run the built-in market simulator.
    pub simulator: bool,
    /// Simulator rate, ticks per second over all its symbols.
    pub simulator_rate: u32,
    /// Share of simulator ticks sent with `critical` priority, in parts per thousand.
    pub simulator_critical_permille: u32,
    /// Upstream exchange feeds (`[[feed.upstream]]` blocks, docs/feeds.md); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub upstream: Vec<UpstreamConfig>,
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            simulator: true,
            simulator_rate: 1_000,
            simulator_critical_permille: 2,
            upstream: Vec::new(),
        }
    }
}

impl FeedConfig {
    /// Checks the `[[feed.upstream]]` blocks: unique names, known `backup_for`, sane timings.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the upstream and key.
    pub fn validate_upstreams(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for u in &self.upstream {
            let invalid = |key: &str, why: &str| {
                Err(ConfigError::Invalid(format!(
                    "feed.upstream[{}].{key}: {why}",
                    u.name
                )))
            };
            if u.name.is_empty() || !names.insert(u.name.as_str()) {
                return invalid("name", "must be set and unique");
            }
            // It is a Prometheus label value and a log field: keep it plain.
            if !u
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
            {
                return invalid("name", "only letters, digits and - _ . : are allowed");
            }
            if !(u.url.starts_with("ws://") || u.url.starts_with("wss://")) {
                return invalid("url", "must start with ws:// or wss://");
            }
            if u.symbols.is_empty() {
                return invalid("symbols", "must name at least one symbol");
            }
            if u.reconnect_min_ms == 0 || u.reconnect_min_ms > u.reconnect_max_ms {
                return invalid(
                    "reconnect_min_ms",
                    "need 1 <= reconnect_min_ms <= reconnect_max_ms",
                );
            }
            if u.failure_threshold == 0 || u.cooldown_ms == 0 || u.stale_ms == 0 {
                return invalid(
                    "failure_threshold",
                    "failure_threshold, cooldown_ms and stale_ms must be >= 1",
                );
            }
            if u.max_message_bytes < 256 || u.max_json_depth < 2 || u.max_batch_ticks == 0 {
                return invalid(
                    "max_message_bytes",
                    "need max_message_bytes >= 256, max_json_depth >= 2, max_batch_ticks >= 1",
                );
            }
        }
        for u in &self.upstream {
            if let Some(primary) = &u.backup_for {
                let found = self.upstream.iter().find(|p| &p.name == primary);
                if found.is_none() || primary == &u.name {
                    return Err(ConfigError::Invalid(format!(
                        "feed.upstream[{}].backup_for: no other upstream named {primary:?}",
                        u.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What protocol an upstream speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UpstreamKind {
    /// Binance spot WebSocket trade streams (`<symbol>@trade`).
    Binance,
    /// Coinbase Exchange WebSocket feed, `matches` and `heartbeat` channels.
    Coinbase,
    /// Kraken WebSocket v2, `trade` channel.
    Kraken,
    /// Another tickfan's `/ws` (an edge tier), resumed with `since_seq`.
    Tickfan,
}

/// One `[[feed.upstream]]` block: an exchange (or another tickfan) this server pulls ticks from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name, used in metrics, `/health`, logs and dead letters.
    pub name: String,
    /// `binance`, `coinbase`, `kraken` or `tickfan`.
    pub kind: UpstreamKind,
    /// WebSocket URL (`ws://` or `wss://`).
    pub url: String,
    /// The source's own symbols to subscribe to (`BTCUSDT`, `BTC-USD`, `BTC/USD`, ...).
    pub symbols: Vec<String>,
    /// First reconnect delay, ms (doubled per failure, with jitter).
    #[serde(default = "upstream_defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, ms.
    #[serde(default = "upstream_defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Consecutive failures (refused, closed, stale, handshake errors) that open the breaker.
    #[serde(default = "upstream_defaults::failure_threshold")]
    pub failure_threshold: u32,
    /// How long an open breaker waits before one half-open probe, ms.
    #[serde(default = "upstream_defaults::cooldown_ms")]
    pub cooldown_ms: u64,
    /// No message at all (trade, heartbeat, ping) for this long while subscribed is a failure, ms.
    #[serde(default = "upstream_defaults::stale_ms")]
    pub stale_ms: u64,
    /// This upstream is the backup of the named one: its ticks flow only while that one is down.
    #[serde(default)]
    pub backup_for: Option<String>,
    /// Prefix put before every symbol of this upstream (after `map`), e.g. `"binance:"`.
    #[serde(default)]
    pub prefix: String,
    /// Source symbol -> tickfan symbol, e.g. `{ "BTCUSDT" = "BTC-USD" }`.
    #[serde(default)]
    pub map: std::collections::BTreeMap<String, String>,
    /// Largest WebSocket message (and frame) accepted from the upstream, bytes; a bigger one is
    /// a failure (the connection is dropped and retried).
    #[serde(default = "upstream_defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deepest JSON nesting accepted in an upstream message; deeper is a dead letter.
    #[serde(default = "upstream_defaults::max_json_depth")]
    pub max_json_depth: usize,
    /// Most ticks handed to ingest as one frame (messages already received are batched).
    #[serde(default = "upstream_defaults::max_batch_ticks")]
    pub max_batch_ticks: usize,
    /// Time allowed for TCP connect, TLS and the WebSocket handshake, ms.
    #[serde(default = "upstream_defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Backup only: ticks held back while the primary serves (newest kept), replayed into
    /// ingest at a failover so trades the primary missed before it was declared down still
    /// arrive; dedup drops the ones it did deliver.
    #[serde(default = "upstream_defaults::seam_ticks")]
    pub seam_ticks: usize,
}

/// Defaults of the `[[feed.upstream]]` keys.
mod upstream_defaults {
    pub fn reconnect_min_ms() -> u64 {
        500
    }
    pub fn reconnect_max_ms() -> u64 {
        30_000
    }
    pub fn failure_threshold() -> u32 {
        5
    }
    pub fn cooldown_ms() -> u64 {
        60_000
    }
    pub fn stale_ms() -> u64 {
        60_000
    }
    pub fn max_message_bytes() -> usize {
        1 << 20
    }
    pub fn max_json_depth() -> usize {
        16
    }
    pub fn max_batch_ticks() -> usize {
        512
    }
    pub fn connect_timeout_ms() -> u64 {
        10_000
    }
    pub fn seam_ticks() -> usize {
        256
    }
}

/// A TOML error as it may be printed: the position and the message, without the source
/// snippet `toml` adds (the offending line may hold a secret, say a misspelled
/// `jwt_hs256_secret` key), and with the quoted values of that line taken out of the message
/// too (serde names a wrongly typed value in it).
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let mut message = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError::Parse(format!("TOML parse error: {message}"));
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    // The quoted values on the reported line: whatever sits between a pair of quotes.
    for quote in ['"', '\''] {
        for (i, value) in line.split(quote).enumerate() {
            if i % 2 == 1 && !value.is_empty() {
                message = message.replace(value, "***");
            }
        }
    }
    ConfigError::Parse(format!(
        "TOML parse error at line {line_no}, column {column}: {message}"
    ))
}

/// Serializes a secret (or a list of them) as `"[redacted]"`: nothing serializes the config
/// today, and whatever does later (a debug dump, a `/health` field) must not carry tokens or
/// the JWT secret. An absent or empty value stays visibly absent.
fn serialize_redacted<T, S>(value: &T, serializer: S) -> Result<S::Ok, S::Error>
where
    T: RedactedShape,
    S: serde::Serializer,
{
    if value.is_unset() {
        serializer.serialize_none()
    } else {
        serializer.serialize_str("[redacted]")
    }
}

/// What [`serialize_redacted`] needs of a secret field: whether anything is set.
trait RedactedShape {
    fn is_unset(&self) -> bool;
}

impl RedactedShape for Vec<String> {
    fn is_unset(&self) -> bool {
        self.is_empty()
    }
}

impl RedactedShape for Option<String> {
    fn is_unset(&self) -> bool {
        self.is_none()
    }
}

/// `[auth]`
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens accepted on `/ws`; empty means clients need no token, unless a JWT key is set
    /// (then a JWT is needed).
    #[serde(serialize_with = "serialize_redacted")]
    pub client_tokens: Vec<String>,
    /// Tokens accepted on `/ingest` and `POST /api/ticks`; empty means producers need none,
    /// unless a JWT key is set (then a JWT with `"ingest": true` is needed).
    #[serde(serialize_with = "serialize_redacted")]
    pub ingest_tokens: Vec<String>,
    /// Time a client that connected without a token has to send `{"op":"auth"}` before it is
    /// closed with 4001, in ms.
    pub auth_timeout_ms: u64,
    /// HS256 secret (at least 32 bytes) that JWTs are signed with. Setting it (or
    /// `jwt_public_key_file`) turns auth on for clients and producers.
    #[serde(serialize_with = "serialize_redacted")]
    pub jwt_hs256_secret: Option<String>,
    /// PEM public key (RSA or EC) that RS*/PS*/ES* JWTs are verified with.
    pub jwt_public_key_file: Option<PathBuf>,
    /// The one algorithm JWTs must use with `jwt_public_key_file`; empty: RS256 for an RSA
    /// key, ES256 for an EC key.
    pub jwt_algorithm: String,
    /// Clock skew, in seconds, allowed on a JWT's `exp` and `nbf` (NumericDates: seconds,
    /// fractions allowed).
    pub jwt_leeway_secs: u64,
    /// The `aud` a JWT must carry; unset: `aud` is not checked.
    pub jwt_audience: Option<String>,
    /// The `iss` a JWT must carry; unset: `iss` is not checked.
    pub jwt_issuer: Option<String>,
    /// Most patterns a JWT's `symbols` or `ingest_symbols` claim may list; a token with more
    /// is refused (`unauthorized`, reason `bad_claims`).
    pub jwt_max_patterns: usize,
}

impl std::fmt::Debug for AuthConfig {
    // Tokens and the secret stay out of debug output (a config is logged or printed in
    // errors); only how many there are, and whether a secret is set, show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("client_tokens", &self.client_tokens.len())
            .field("ingest_tokens", &self.ingest_tokens.len())
            .field("auth_timeout_ms", &self.auth_timeout_ms)
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_leeway_secs", &self.jwt_leeway_secs)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_max_patterns", &self.jwt_max_patterns)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            client_tokens: Vec::new(),
            ingest_tokens: Vec::new(),
            auth_timeout_ms: 10_000,
            jwt_hs256_secret: None,
            jwt_public_key_file: None,
            jwt_algorithm: String::new(),
            jwt_leeway_secs: 5,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_max_patterns: 1_024,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Symbols one connection may subscribe to (`*` counts as one).
    pub max_symbols: usize,
    /// Client requests per second per connection; bursts of twice this pass.
    pub ops_per_sec: u32,
    /// Rate-limited requests in a row after which the connection is closed with 1008.
    pub max_rate_limited: u32,
    /// Largest inbound WebSocket frame or message; bigger closes the connection with 1009.
    pub max_message_bytes: usize,
    /// Largest `POST /api/ticks` body; bigger answers 413.
    pub max_body_bytes: usize,
    /// Bytes queued for one connection before slow-consumer handling.
    pub outbound_buffer_bytes: usize,
    /// Open WebSocket connections per client IP address.
    pub max_connections_per_ip: usize,
    /// Open WebSocket connections in the whole process; further upgrades answer 503.
    pub max_connections: usize,
    /// Open TCP connections of every kind (plain HTTP and upgraded WebSocket) in the whole
    /// process, checked at accept before anything is read: over it, a connection gets a short
    /// `503` and is closed at once. 0 derives it from the open-files limit: that limit minus
    /// `reserved_fds`, so the store, the listener and the refusals themselves always find a
    /// descriptor.
    pub max_tcp_connections: usize,
    /// File descriptors kept free under the open-files limit when `max_tcp_connections` is 0.
    pub reserved_fds: usize,
    /// Plain HTTP connections (not, or not yet, upgraded to WebSocket) open at once per client
    /// IP address, checked at accept before anything is read: over it, a connection gets a
    /// short `503` and is closed at once. Upgraded connections count against
    /// `max_connections_per_ip` instead, so one address holds at most the sum of both.
    pub max_http_connections_per_ip: usize,
    /// Time a connection has to send a complete request head, in ms, counted from the accept
    /// (or, on a kept-alive connection, from the previous response); then it is closed.
    pub header_timeout_ms: u64,
    /// Time a request has to send its whole body, in ms, counted from the end of its head;
    /// then it is answered `408 request_timeout`, its body is freed and the connection closed.
    pub body_timeout_ms: u64,
    /// Deepest nesting of arrays and objects accepted in any untrusted JSON (ingest frames,
    /// POST bodies, NDJSON lines, `/ws` requests, imported lines); deeper is `bad_json` /
    /// `bad_request`, checked before parsing (a recursive parser would overflow its stack).
    pub max_json_depth: usize,
    /// Rejections listed in one ack (per frame or POST body); the rest are only counted
    /// (`rejected_total`), so a body of millions of bad lines gets a small reply.
    pub max_listed_rejections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_symbols: 1_000,
            ops_per_sec: 20,
            max_rate_limited: 50,
            max_message_bytes: 65_536,
            max_body_bytes: 16 * 1024 * 1024,
            outbound_buffer_bytes: 4 * 1024 * 1024,
            max_connections_per_ip: 10_000,
            max_connections: 100_000,
            max_tcp_connections: 0,
            reserved_fds: 256,
            max_http_connections_per_ip: 256,
            header_timeout_ms: 30_000,
            body_timeout_ms: 30_000,
            max_json_depth: crate::json_depth::DEFAULT_MAX_DEPTH,
            max_listed_rejections: 100,
        }
    }
}

/// `[queue]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Ticks the four-level priority queue holds in all.
    pub capacity: usize,
    /// Fill level (percent of capacity) up to which `high` ticks are admitted.
    pub high_limit_pct: u8,
    /// Fill level up to which `normal` ticks are admitted.
    pub normal_limit_pct: u8,
    /// Fill level up to which `low` ticks are admitted. `critical` ticks use all capacity.
    pub low_limit_pct: u8,
    /// Time to live in the queue per priority, in ms; 0 never expires. Expired ticks are dropped
    /// at dequeue, counted and written to the dead-letter list with code `expired`.
    pub ttl_ms: TtlConfig,
    /// `retry_after_ms` told to a producer whose ticks were refused.
    pub retry_after_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 65_536,
            high_limit_pct: 95,
            normal_limit_pct: 85,
            low_limit_pct: 70,
            ttl_ms: TtlConfig::default(),
            retry_after_ms: 100,
        }
    }
}

/// `[queue.ttl_ms]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TtlConfig {
    /// TTL of critical ticks (0: never expire).
    pub critical: u64,
    /// TTL of high ticks.
    pub high: u64,
    /// TTL of normal ticks.
    pub normal: u64,
    /// TTL of low ticks.
    pub low: u64,
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self {
            critical: 0,
            high: 30_000,
            normal: 10_000,
            low: 5_000,
        }
    }
}

/// `[validation]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationConfig {
    /// A `ts` further ahead of the server clock than this is `future_timestamp`.
    pub max_future_ms: i64,
    /// A `ts` older than this on live ingest is `stale_timestamp` (import ignores it).
    pub max_age_ms: i64,
    /// Recent ticks remembered per symbol for duplicate detection.
    pub dedup_window: usize,
    /// Distinct symbols the server tracks in all; ticks for further symbols are
    /// `invalid_symbol`. Bounds the memory a producer can make the server spend.
    pub max_total_symbols: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            max_future_ms: 5_000,
            max_age_ms: 86_400_000,
            dedup_window: 1_024,
            max_total_symbols: 100_000,
        }
    }
}

/// `[dispatch]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DispatchConfig {
    /// Default `interval_ms` for throttled and batch modes when a request names none.
    pub default_interval_ms: u64,
    /// Smallest `interval_ms` a client may ask for.
    pub min_interval_ms: u64,
    /// Queued bytes (percent of `outbound_buffer_bytes`) past which smart mode leaves realtime.
    pub smart_batch_pct: u8,
    /// Queued bytes (percent) past which smart mode conflates.
    pub smart_conflate_pct: u8,
    /// Dispatcher timer resolution for throttled/batch/smart flushes, in ms.
    pub timer_ms: u64,
    /// Commands (subscribe, configure, ...) waiting for the dispatcher.
    pub command_capacity: usize,
    /// Entries queued per connection (on top of the byte limit): a message, or a run of
    /// realtime ticks the client takes in a row within one dispatch round (at most 64, shared
    /// pre-framed; see `dispatch::stage`).
    pub outbound_messages: usize,
    /// Most recent ticks the dispatcher keeps per symbol in memory. Snapshots and resumes
    /// within this window are served from memory, exactly in step with live delivery.
    pub recent_ticks: usize,
    /// Largest page of a replay read from the store. A longer backlog is read and sent page by
    /// page, with no hole, as fast as the client reads (see `replay_low_water_pct`); one page
    /// bounds the memory a replay can take.
    pub max_replay_ticks: usize,
    /// Snapshot reads from the store running at once (each on a blocking thread). Further
    /// reads wait their turn in the dispatcher, so a reconnect storm cannot flood the blocking
    /// pool or the disk.
    pub max_store_reads: usize,
    /// Paced replays (`history`, `since_seq`): the next messages are queued when a client's
    /// outbound queue drains below this percent of `limits.outbound_buffer_bytes` (1-100).
    pub replay_low_water_pct: u8,
    /// Paced replays fill a client's outbound queue up to this percent of
    /// `limits.outbound_buffer_bytes` (at least the low-water mark); the rest stays free for
    /// live ticks of its other symbols.
    pub replay_high_water_pct: u8,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            default_interval_ms: 100,
            min_interval_ms: 10,
            smart_batch_pct: 10,
            smart_conflate_pct: 50,
            timer_ms: 5,
            command_capacity: 4_096,
            outbound_messages: 65_536,
            recent_ticks: 1_000,
            max_replay_ticks: 10_000,
            max_store_reads: 16,
            replay_low_water_pct: 25,
            replay_high_water_pct: 50,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// Filter directives when `RUST_LOG` is unset.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// `[cluster]`: several tickfan nodes sharing one tick stream through NATS JetStream
/// (docs/cluster.md). An empty `nats_url` (the default) is single-node mode, exactly as without
/// this section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated (`nats://127.0.0.1:4222`). Empty: single node.
    pub nats_url: String,
    /// This node's name in logs, `/health` and metrics. Empty: the listen address.
    pub node_name: String,
    /// The stream's replica count. 0: the number of servers in the NATS cluster, at most 3.
    pub replicas: usize,
    /// JetStream stream name; every node of one cluster uses the same.
    pub stream: String,
    /// Subject prefix; a symbol's ticks are published on `<prefix>.<SYMBOL>`.
    pub subject_prefix: String,
    /// Retention: messages kept per symbol in the stream (a late-joining node's history
    /// reaches this far back). The last message of a symbol is never removed, which is what
    /// keeps its seq chain intact.
    pub max_msgs_per_symbol: i64,
    /// The stream's `Nats-Msg-Id` duplicate window: the same producer `id` for the same
    /// symbol sent to any node within this window is stored once.
    pub duplicate_window_ms: u64,
    /// How long a tick may wait for the bus's publish ack (retrying through a NATS outage)
    /// before its producer is told `expired` (resend it; a resend is deduplicated).
    pub publish_timeout_ms: u64,
    /// Ticks being published at once on this node (over all symbols). When reached, the
    /// priority queue fills and producers get `backpressure`.
    pub max_in_flight: usize,
    /// Ticks consumed from the stream and waiting for this node's dispatcher.
    pub consumer_buffer: usize,
    /// Most ticks of one symbol carried by one stream message. While a symbol's publish is
    /// in flight, its next ticks queue and go out together as one message (JetStream's cost
    /// is per message). 1: one tick per message.
    pub max_ticks_per_message: usize,
    /// Most payload bytes of one stream message (must stay below the NATS server's
    /// `max_payload`, 1 MiB by default); a batch is cut before it would pass this.
    pub max_message_bytes: usize,
    /// How long a starting node waits for NATS: the connect, then the stream (a NATS cluster
    /// that has just formed may refuse a replicated stream for a while). Past it, the start
    /// fails with the reason.
    pub start_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nats_url: String::new(),
            node_name: String::new(),
            replicas: 0,
            stream: "TICKFAN".into(),
            subject_prefix: "tickfan.ticks".into(),
            max_msgs_per_symbol: 1_000_000,
            duplicate_window_ms: 120_000,
            publish_timeout_ms: 5_000,
            max_in_flight: 8_192,
            consumer_buffer: 8_192,
            max_ticks_per_message: 256,
            max_message_bytes: 256 * 1024,
            start_timeout_ms: 30_000,
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.nats_url.trim().is_empty()
    }
}

impl Config {
    /// Parses a TOML document and validates it.
    ///
    /// # Errors
    /// Malformed TOML, an unknown key (named in the message) or an out-of-range value.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file.
    ///
    /// # Errors
    /// The file cannot be read, or [`Config::from_toml`] fails.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(msg) => ConfigError::Parse(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Checks values serde cannot: ranges and relations between keys.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if self.queue.capacity == 0 {
            return invalid("queue.capacity", "must be at least 1");
        }
        if self.server.tls_cert_file.is_some() != self.server.tls_key_file.is_some() {
            return invalid(
                "server.tls_cert_file",
                "tls_cert_file and tls_key_file go together: set both or neither",
            );
        }
        if self.server.tls_buffer_bytes < 4096 {
            return invalid("server.tls_buffer_bytes", "must be at least 4096");
        }
        for (key, pct) in [
            ("queue.high_limit_pct", self.queue.high_limit_pct),
            ("queue.normal_limit_pct", self.queue.normal_limit_pct),
            ("queue.low_limit_pct", self.queue.low_limit_pct),
        ] {
            if pct == 0 || pct > 100 {
                return invalid(key, "must be 1..=100");
            }
        }
        if !(self.queue.low_limit_pct <= self.queue.normal_limit_pct
            && self.queue.normal_limit_pct <= self.queue.high_limit_pct)
        {
            return invalid(
                "queue.low_limit_pct",
                "limits must not increase with lower priority (low <= normal <= high)",
            );
        }
        if self.limits.ops_per_sec == 0 {
            return invalid("limits.ops_per_sec", "must be at least 1");
        }
        if self.limits.max_symbols == 0 {
            return invalid("limits.max_symbols", "must be at least 1");
        }
        if self.limits.max_message_bytes < 256 {
            return invalid("limits.max_message_bytes", "must be at least 256");
        }
        if self.limits.outbound_buffer_bytes < 1024 {
            return invalid("limits.outbound_buffer_bytes", "must be at least 1024");
        }
        if self.limits.outbound_buffer_bytes > 1 << 31 {
            return invalid("limits.outbound_buffer_bytes", "must be at most 2 GiB");
        }
        if self.limits.max_http_connections_per_ip == 0 {
            return invalid("limits.max_http_connections_per_ip", "must be at least 1");
        }
        if self.limits.header_timeout_ms == 0 || self.limits.body_timeout_ms == 0 {
            return invalid(
                "limits.header_timeout_ms",
                "header_timeout_ms and body_timeout_ms must be >= 1",
            );
        }
        if self.auth.auth_timeout_ms < 100 {
            return invalid("auth.auth_timeout_ms", "must be at least 100");
        }
        if self.auth.jwt_leeway_secs > 300 {
            return invalid("auth.jwt_leeway_secs", "must be at most 300");
        }
        if !(1..=65_536).contains(&self.auth.jwt_max_patterns) {
            return invalid("auth.jwt_max_patterns", "must be between 1 and 65536");
        }
        if self.server.heartbeat_ms < 100 {
            return invalid("server.heartbeat_ms", "must be at least 100");
        }
        if self.dispatch.timer_ms == 0 || self.dispatch.min_interval_ms == 0 {
            return invalid(
                "dispatch.timer_ms",
                "timer_ms and min_interval_ms must be >= 1",
            );
        }
        if self.dispatch.outbound_messages == 0 || self.dispatch.command_capacity == 0 {
            return invalid("dispatch.outbound_messages", "capacities must be >= 1");
        }
        let (low, high) = (
            self.dispatch.replay_low_water_pct,
            self.dispatch.replay_high_water_pct,
        );
        if !(1..=100).contains(&low) || !(low..=100).contains(&high) {
            return invalid(
                "dispatch.replay_high_water_pct",
                "need 1 <= replay_low_water_pct <= replay_high_water_pct <= 100",
            );
        }
        if u32::try_from(self.dispatch.outbound_messages).is_err() {
            return invalid("dispatch.outbound_messages", "must be below 2^32");
        }
        if self.limits.max_json_depth < 2 {
            // An array frame of tick objects, or a request naming symbols, is 2 levels deep.
            return invalid("limits.max_json_depth", "must be at least 2");
        }
        if self.validation.dedup_window == 0 {
            return invalid("validation.dedup_window", "must be at least 1");
        }
        self.feed.validate_upstreams()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return invalid("log.format", "must be \"text\" or \"json\"");
        }
        if self.cluster.enabled() {
            let c = &self.cluster;
            if c.replicas > 5 {
                return invalid("cluster.replicas", "must be 0..=5");
            }
            if c.stream.is_empty() || c.subject_prefix.is_empty() {
                return invalid("cluster.stream", "stream and subject_prefix must be set");
            }
            if c.max_msgs_per_symbol < 1 {
                return invalid("cluster.max_msgs_per_symbol", "must be at least 1");
            }
            if c.max_in_flight == 0 || c.consumer_buffer == 0 {
                return invalid("cluster.max_in_flight", "capacities must be >= 1");
            }
            if c.max_ticks_per_message == 0 {
                return invalid("cluster.max_ticks_per_message", "must be at least 1");
            }
            if !(1_024..=64 * 1024 * 1024).contains(&c.max_message_bytes) {
                return invalid("cluster.max_message_bytes", "must be 1024..=67108864");
            }
            if c.start_timeout_ms < 100 {
                return invalid("cluster.start_timeout_ms", "must be at least 100");
            }
        }
        Ok(())
    }
}

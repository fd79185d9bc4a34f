//! Error types, one small `#[non_exhaustive]` enum per layer. Expected conditions on the hot
//! path (a rejected tick, a full queue) are values, not errors: see `ingest::Reject` and
//! `queue::PushError`.

use std::path::PathBuf;

/// Loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file asked for.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key (the message names it).
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is out of range; the message names the key.
    #[error("invalid config value {0}")]
    Invalid(String),
}

/// Starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Socket or file I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be opened or written.
    #[error("store error: {0}")]
    Store(String),
    /// Cluster mode could not start (NATS, the stream, or the store's replica file).
    #[error("cluster error: {0}")]
    Cluster(String),
    /// The TLS certificate or key could not be used (`server.tls_cert_file`, `tls_key_file`).
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
}

//! TLS on the one listener (`[server] tls_cert_file` and `tls_key_file`), through rustls with
//! the ring provider the crate already builds for upstream feeds. Data flows through here
//! twice. At accept ([`Tls::handshake`]): the listener hands over the admitted `TcpStream`,
//! which must start a TLS handshake (a plain-text request gets a 400 in plain text instead)
//! and finish it within `limits.header_timeout_ms`; hyper then serves HTTP over the
//! tokio-rustls stream. At a WebSocket upgrade ([`take_apart`]): the stream is taken apart into
//! the bare `TcpStream` and the `rustls::ServerConnection`, and the framing layer
//! (`super::ws::WsSocket`) drives rustls's sync API itself on the same readiness model as a
//! plain socket.
//!
//! Certificates are served by [`CertStore`], a `ResolvesServerCert` whose certified key is
//! swapped under a lock: [`Tls::reload`] (SIGHUP, wired in `crate::server`) reads the files
//! again, and new handshakes use the new certificate while established connections keep the
//! keys they negotiated. A file that does not load leaves the old certificate in place, and so
//! does a leaf outside its validity period (expired, or not valid yet: x509-parser reads the
//! dates), which every client would refuse.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConnection;
use tokio::net::TcpStream;

/// Where the certificate and key come from and how much rustls may buffer, as plain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first (`server.tls_cert_file`).
    pub cert_file: PathBuf,
    /// PEM private key (`server.tls_key_file`).
    pub key_file: PathBuf,
    /// Encrypted bytes rustls may hold for one connection before the kernel takes them
    /// (`server.tls_buffer_bytes`).
    pub buffer_bytes: usize,
}

/// Why the certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{file}: {why}")]
    Pem {
        /// The file.
        file: String,
        /// What was wrong with it.
        why: String,
    },
    /// rustls refused the key or the chain (unsupported key type, key not matching the leaf).
    #[error("certificate or key refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The leaf certificate does not parse, has expired or is not valid yet.
    #[error("{file}: {why}")]
    Validity {
        /// The certificate file.
        file: String,
        /// What is wrong with its dates.
        why: String,
    },
}

/// Counters of the TLS layer, for `/metrics`.
#[derive(Debug, Default)]
pub struct TlsStats {
    /// Handshakes completed.
    pub handshakes: AtomicU64,
    /// Handshakes not finished within `limits.header_timeout_ms`.
    pub failed_timeout: AtomicU64,
    /// Connections that sent plain text (answered 400).
    pub failed_plaintext: AtomicU64,
    /// Handshakes rustls refused (bad hello, no shared version or cipher, client alert).
    pub failed_error: AtomicU64,
    /// Certificate reloads that took effect.
    pub reloads_ok: AtomicU64,
    /// Certificate reloads that failed (the old certificate stays).
    pub reloads_failed: AtomicU64,
}

/// The certificate new handshakes are given; swapped by [`Tls::reload`].
#[derive(Debug)]
pub struct CertStore(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The listener's TLS: the rustls configuration, the certificate store and the counters.
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    certs: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    settings: TlsSettings,
    /// Counters, for `/metrics`.
    pub stats: TlsStats,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const HANDSHAKE_RECORD: u8 = 0x16;

impl Tls {
    /// Loads the certificate and key and builds the server configuration (TLS 1.2 and 1.3,
    /// rustls's safe default cipher suites, ALPN `http/1.1`).
    ///
    /// # Errors
    /// A file is missing or unreadable, holds no certificate or key, or the key does not fit.
    pub fn new(settings: TlsSettings) -> Result<Self, TlsError> {
        // ring, which the lock already builds for the upstream feeds' and NATS's rustls.
        // rustls deprecates this provider for lacking post-quantum key exchange; that needs
        // aws-lc-rs, a second crypto library with a C build, which is not worth it here.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = load(&settings, &provider)?;
        let certs = Arc::new(CertStore(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certs,
            provider,
            settings,
            stats: TlsStats::default(),
        })
    }

    /// Reads the certificate and key files again; new handshakes get the new certificate.
    /// On failure the old one stays, the error is logged and counted.
    ///
    /// # Errors
    /// Why the files were not taken.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load(&self.settings, &self.provider) {
            Ok(key) => {
                *self.certs.0.write() = Arc::new(key);
                self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "TLS certificate reload failed; keeping the old certificate");
                Err(e)
            }
        }
    }

    /// Runs the server side of a TLS handshake on an admitted connection, within `timeout`.
    /// A peer whose first byte is not a TLS handshake record is answered a plain-text 400
    /// (`tls_required`) and closed; a stalled or refused handshake is closed. Failures are
    /// counted; `None` means the connection is over.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let stats = &self.stats;
        let shaken = tokio::time::timeout(timeout, async {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(1) if first[0] == HANDSHAKE_RECORD => {}
                // Answered below, outside the handshake deadline.
                Ok(1) => return Err(tcp),
                _ => return Ok(None),
            }
            match self.acceptor.accept(tcp).await {
                Ok(stream) => Ok(Some(stream)),
                Err(e) => {
                    stats.failed_error.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "TLS handshake failed");
                    Ok(None)
                }
            }
        })
        .await;
        match shaken {
            Ok(Err(tcp)) => {
                stats.failed_plaintext.fetch_add(1, Ordering::Relaxed);
                refuse_plaintext(tcp).await;
                None
            }
            Ok(Ok(Some(mut stream))) => {
                stats.handshakes.fetch_add(1, Ordering::Relaxed);
                stream
                    .get_mut()
                    .1
                    .set_buffer_limit(Some(self.settings.buffer_bytes));
                Some(stream)
            }
            Ok(Ok(None)) => None,
            Err(_) => {
                stats.failed_timeout.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// Reads and checks the certificate chain and key.
fn load(settings: &TlsSettings, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let pem = |file: &PathBuf, why: String| TlsError::Pem {
        file: file.display().to_string(),
        why,
    };
    let cert_file = &settings.cert_file;
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| pem(cert_file, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert_file, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(cert_file, "no CERTIFICATE in the file".into()));
    }
    check_validity(cert_file, &chain[0])?;
    let key_file = &settings.key_file;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem(key_file, e.to_string()))?;
    warn_if_key_readable(key_file);
    Ok(CertifiedKey::from_der(chain, key, provider)?)
}

/// Refuses a leaf outside its validity period, and logs whose it is and until when it holds.
fn check_validity(file: &std::path::Path, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    use x509_parser::time::ASN1Time;
    let refuse = |why: String| TlsError::Validity {
        file: file.display().to_string(),
        why,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| refuse(format!("the leaf certificate does not parse: {e}")))?;
    let validity = cert.validity();
    let now = ASN1Time::now();
    if now < validity.not_before {
        return Err(refuse(format!(
            "the leaf certificate is not valid before {}",
            validity.not_before
        )));
    }
    if now > validity.not_after {
        return Err(refuse(format!(
            "the leaf certificate expired on {}",
            validity.not_after
        )));
    }
    tracing::info!(
        cert = %file.display(),
        subject = %cert.subject(),
        not_after = %validity.not_after,
        "TLS certificate loaded"
    );
    Ok(())
}

/// Warns when the private key file can be read by its group or others.
fn warn_if_key_readable(file: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %file.display(),
                mode = format!("{:o}", mode & 0o777),
                "the TLS private key file is readable by its group or others: chmod 600 it"
            );
        }
    }
}

/// How long, and for how many bytes, a refused plain-text connection is read after its 400.
const PLAINTEXT_LINGER: Duration = Duration::from_secs(1);
const PLAINTEXT_DRAIN_BYTES: usize = 64 * 1024;

/// Answers a plain-text request on the TLS listener, if the empty send buffer takes it at once
/// (it does; a socket that does not gets nothing), then ends our side and reads what the
/// client sent until it closes too (at most [`PLAINTEXT_DRAIN_BYTES`] within
/// [`PLAINTEXT_LINGER`]): closing with the request unread would send a reset, which can reach
/// the client before the 400 and destroy it.
async fn refuse_plaintext(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = super::error_body(
        "tls_required",
        "this listener speaks TLS: use https:// or wss://",
    );
    let response = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(response.as_bytes());
    let _ = tokio::time::timeout(PLAINTEXT_LINGER, async {
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < PLAINTEXT_DRAIN_BYTES {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// An upgraded connection's stream as the framing layer gets it: bare, or bare plus the
/// rustls state that encrypts it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Upgraded {
    /// Plain text.
    Plain(TcpStream),
    /// TLS: the socket and its rustls connection (boxed: it is large, and rare on the plain
    /// path).
    Tls(TcpStream, Box<ServerConnection>),
}

impl From<TcpStream> for Upgraded {
    fn from(stream: TcpStream) -> Self {
        Self::Plain(stream)
    }
}

/// Takes a TLS stream hyper handed back at an upgrade apart. `early` (what hyper had read past
/// the request) is returned with whatever plaintext rustls had already decrypted appended:
/// that data has no readiness event left to announce it.
pub fn take_apart(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    early: Bytes,
) -> io::Result<(Upgraded, Bytes)> {
    let (tcp, mut conn) = stream.into_inner();
    let mut early = BytesMut::from(early);
    let mut chunk = [0u8; 4096];
    loop {
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match conn.reader().read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => early.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok((Upgraded::Tls(tcp, Box::new(conn)), early.freeze()))
}

/// A `TcpStream` as the blocking `Read`/`Write` rustls's sync API wants, without blocking:
/// `WouldBlock` comes through as an error, and the runtime's readiness is cleared as by any
/// `try_read`.
pub(crate) struct NonBlocking<'a>(pub(crate) &'a TcpStream);

impl Read for NonBlocking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

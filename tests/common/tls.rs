//! TLS test helpers: a CA and a leaf for 127.0.0.1 and localhost made with rcgen, a server
//! config that uses them, and `https://`/`wss://` clients that trust the CA.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::Connector;

use super::{test_config, Ws, DEADLINE};

/// A test CA and the files of a leaf it signed for 127.0.0.1 and localhost.
pub struct Pki {
    pub ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tickfan test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap().der().clone();
        let pki = Self {
            ca,
            issuer: Issuer::new(params, key),
            dir: tempfile::tempdir().unwrap(),
        };
        pki.write_leaf("leaf A");
        pki
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("key.pem")
    }

    /// Signs a new leaf named `name` and writes it (over the old one); returns its DER.
    pub fn write_leaf(&self, name: &str) -> CertificateDer<'static> {
        self.write_leaf_with(name, |_| {})
    }

    /// [`Pki::write_leaf`] with the parameters changed by `edit` first (e.g. the validity).
    pub fn write_leaf_with(
        &self,
        name: &str,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.cert_file(), cert.pem()).unwrap();
        std::fs::write(self.key_file(), key.serialize_pem()).unwrap();
        cert.der().clone()
    }

    /// Signs a new leaf named `name` for the key already in the key file and writes only the
    /// certificate file (a renewal that keeps the key); returns its DER.
    pub fn reissue_leaf(&self, name: &str) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::from_pem(&std::fs::read_to_string(self.key_file()).unwrap()).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.cert_file(), cert.pem()).unwrap();
        cert.der().clone()
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    pub fn config(&self) -> tickfan::Config {
        let mut config = test_config();
        config.server.tls_cert_file = Some(self.cert_file());
        config.server.tls_key_file = Some(self.key_file());
        config
    }
}

/// A TLS connection to `addr` that trusts the test CA.
pub async fn tls_connect(
    pki: &Pki,
    addr: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One HTTPS request (`Connection: close`); the status and body.
pub async fn https(pki: &Pki, addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut tls = tokio::time::timeout(DEADLINE, tls_connect(pki, addr))
        .await
        .unwrap()
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    // The server ends with close_notify; a reset after the whole response is also fine.
    let _ = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut response))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One sample of `/metrics`, over https. Panics when the series is absent: every series the
/// TLS tests read is always exported, so a missing one is a bug, not a 0.
pub async fn metric(pki: &Pki, addr: &str, series: &str) -> f64 {
    let (_, text) = https(pki, addr, "GET", "/metrics", "").await;
    super::sample_of(&text, series).unwrap_or_else(|| panic!("no series {series} in /metrics"))
}

/// A `wss://` connection trusting the test CA.
pub async fn wss(pki: &Pki, addr: &str, path: &str) -> Ws {
    let url = format!("wss://localhost:{}{path}", addr.rsplit(':').next().unwrap());
    let connect = tokio_tungstenite::connect_async_tls_with_config(
        url,
        None,
        false,
        Some(Connector::Rustls(pki.client_config())),
    );
    let (inner, _) = tokio::time::timeout(DEADLINE, connect)
        .await
        .expect("wss connect timed out")
        .expect("wss connect failed");
    Ws { inner }
}

pub async fn wss_client(pki: &Pki, addr: &str) -> Ws {
    let mut ws = wss(pki, addr, "/ws").await;
    let welcome = ws.recv().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

/// A `wss://` connection written byte by byte (for what a library client does not do: the
/// upgrade and frames in one flight, a TLS half-close).
pub struct RawTls {
    pub tls: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawTls {
    /// Sends the upgrade request to `path` and `behind` (masked client frames) in one write,
    /// so they travel in one TLS record; checks the 101.
    pub async fn open(pki: &Pki, addr: &str, path: &str, behind: &[u8]) -> Self {
        let mut tls = tls_connect(pki, addr).await.unwrap();
        let mut first = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .into_bytes();
        first.extend_from_slice(behind);
        tls.write_all(&first).await.unwrap();
        tls.flush().await.unwrap();
        let mut raw = Self {
            tls,
            buf: Vec::new(),
        };
        while !raw.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(raw.fill().await.unwrap(), "closed before the 101");
        }
        let end = raw.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buf.drain(..end + 4);
        raw
    }

    /// Reads more; `Ok(false)` at a clean end (the server's close_notify), `Err` at an
    /// unclean one (EOF without close_notify reads as `UnexpectedEof`).
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, self.tls.read(&mut chunk))
            .await
            .expect("server went quiet")?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next server frame as (opcode, payload); `Ok(None)` at a clean end of the stream.
    pub async fn frame(&mut self) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            let len = match self.buf.get(1).map(|b| b & 0x7F) {
                Some(126) if self.buf.len() >= 4 => Some((
                    usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                    4,
                )),
                Some(n @ 0..=125) => Some((usize::from(n), 2)),
                _ => None,
            };
            if let Some((len, start)) = len.filter(|(len, start)| self.buf.len() >= start + len) {
                let opcode = self.buf[0] & 0x0F;
                let payload = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Ok(Some((opcode, payload)));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The next text frame that is not a heartbeat, as JSON (control frames skipped).
    pub async fn text(&mut self) -> serde_json::Value {
        loop {
            match self.frame().await.unwrap() {
                Some((1, payload)) => {
                    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                    if v["type"] != "heartbeat" {
                        return v;
                    }
                }
                Some((8, payload)) => panic!("closed while waiting for text: {payload:?}"),
                Some(_) => {}
                None => panic!("end of stream while waiting for text"),
            }
        }
    }
}

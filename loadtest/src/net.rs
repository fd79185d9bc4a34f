//! Loopback socket plumbing shared by the client connections and the producer: which
//! 127.0.0.x source address a connection uses (one source address has only so many
//! ephemeral ports, and servers cap connections per peer IP), and opening a TCP stream from
//! it, over TLS with `--tls-ca` ([`use_tls`], [`secure`]). Nothing here knows about WebSocket
//! or ticks.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to the server: plain, or TLS after [`use_tls`].
pub type Stream = tokio_tungstenite::MaybeTlsStream<TcpStream>;

/// The TLS client every connection uses, once `--tls-ca` set it.
static TLS: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();

/// Makes every later connection speak TLS, trusting only the CA certificate(s) in `ca_pem`
/// (the server's certificate must name the address connected to, e.g. 127.0.0.1).
///
/// # Errors
/// The file does not hold a usable certificate.
pub fn use_tls(ca_pem: &Path) -> io::Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).map_err(io::Error::other)? {
        roots
            .add(cert.map_err(io::Error::other)?)
            .map_err(io::Error::other)?;
    }
    // ring: the provider the server's rustls uses too.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = TLS.set(tokio_rustls::TlsConnector::from(Arc::new(config)));
    Ok(())
}

/// `stream` as the connection to use: with a TLS handshake to `server` first after
/// [`use_tls`], else as it is.
///
/// # Errors
/// The handshake failed.
pub async fn secure(stream: TcpStream, server: SocketAddr) -> io::Result<Stream> {
    match TLS.get() {
        None => Ok(Stream::Plain(stream)),
        Some(tls) => {
            let name = ServerName::IpAddress(server.ip().into());
            Ok(Stream::Rustls(tls.connect(name, stream).await?))
        }
    }
}

/// Source address of the `index`-th connection: 127.0.0.1 for the first `per_ip`
/// connections, 127.0.0.2 for the next `per_ip`, and so on. One source address can hold
/// only as many connections to the server as there are ephemeral ports (and the server
/// caps connections per peer IP), so big tests spread over several loopback addresses.
pub fn source_ip(index: usize, per_ip: usize) -> Ipv4Addr {
    let offset = (index / per_ip.max(1)) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 1)) + offset)
}

/// Source address for the producer: the first one after the clients' blocks, so that it
/// never competes with them for ports or for the server's per-IP connection cap.
pub fn producer_source_ip(connections: usize, per_ip: usize) -> Ipv4Addr {
    let per_ip = per_ip.max(1);
    source_ip(connections.div_ceil(per_ip) * per_ip, per_ip)
}

/// Opens a TCP connection to `server`, first binding to `source` when given.
///
/// # Errors
/// The socket, bind or connect error.
pub async fn open_tcp(server: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match server {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    if let Some(ip) = source {
        // Let connect() pick the port from the full 4-tuple instead of bind() reserving
        // one per source address; otherwise a source address runs out of ports sooner.
        let one: libc::c_int = 1;
        // SAFETY: valid fd, option value is a c_int that outlives the call.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(server).await?;
    // Small frames must leave at once: Nagle would hold them for the previous ACK.
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ips_spread_by_block() {
        assert_eq!(source_ip(0, 10_000), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_ip(9_999, 10_000), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_ip(10_000, 10_000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(18_999, 10_000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(5, 2), Ipv4Addr::new(127, 0, 0, 3));
        // Past .255 it carries into the next octet instead of wrapping.
        assert_eq!(source_ip(255, 1), Ipv4Addr::new(127, 0, 1, 0));
        // A zero per-address count is treated as one rather than dividing by zero.
        assert_eq!(source_ip(3, 0), Ipv4Addr::new(127, 0, 0, 4));
        // The producer takes the next unused address.
        assert_eq!(producer_source_ip(100, 10_000), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(
            producer_source_ip(10_000, 10_000),
            Ipv4Addr::new(127, 0, 0, 2)
        );
        assert_eq!(
            producer_source_ip(19_000, 10_000),
            Ipv4Addr::new(127, 0, 0, 3)
        );
        assert_eq!(producer_source_ip(0, 10_000), Ipv4Addr::new(127, 0, 0, 1));
    }
}

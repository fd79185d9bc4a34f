//! The accept loop: one hyper HTTP/1 connection per accepted TCP stream, with the router as
//! its service. It replaces `axum::serve` for two reasons: hyper is handed the bare
//! `TcpStream`, so an upgraded `/ws` connection can take that stream back
//! ([`super::ws::ClientUpgrade`]) instead of living behind boxed, buffered I/O layers; and a
//! connection is admitted (caps per address and in all, see [`super::accept`]) the moment it is
//! accepted, before anything is read, so
//! a flood of idle connects cannot take the descriptors other clients need. Connections get
//! `TCP_NODELAY` (writers coalesce bursts themselves; Nagle only adds delay), the peer address
//! as `ConnectInfo`, a deadline on request heads (hyper's) and on request bodies (here).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::accept::{self, AcceptLimits, Refusal};
use super::tls::Tls;

/// Pause after an accept error that is not about one connection (e.g. out of file
/// descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Time a connection gets to deliver its 408 after a body deadline before it is dropped: a
/// peer that also stopped reading must not keep the socket.
const TIMED_OUT_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `stop` is cancelled, then asks every open HTTP connection
/// to finish its request and close, and returns once they have (at most after `grace`).
/// Upgraded connections are not waited for here; their own tasks own them from the upgrade on.
/// `accept` holds the caps and deadlines; `upgraded` tells how many sockets the upgraded
/// connections hold (they count toward the total cap). With `tls`, every connection must
/// complete a TLS handshake within `limits.header_timeout_ms` first; it holds its admission
/// slot meanwhile, so TLS connections count toward the caps exactly as plain ones do.
///
/// # Errors
/// None today; the signature leaves room for listener failures worth ending the server.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    accept: Arc<AcceptLimits>,
    upgraded: impl Fn() -> usize,
    tls: Option<Arc<Tls>>,
    stop: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    let header_timeout = Duration::from_millis(accept.config.header_timeout_ms);
    let body_timeout = Duration::from_millis(accept.config.body_timeout_ms);
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let slot = match accept::admit(&accept, peer.ip(), upgraded()) {
            Ok(slot) => slot,
            Err(refusal) => {
                refuse(&tcp, refusal);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        let accept = accept.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _slot = slot;
            let timed_out = Arc::new(Notify::new());
            let on_timeout = timed_out.clone();
            let service_accept = accept.clone();
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let deadline = tokio::time::Instant::now() + body_timeout;
                let (mut req, watch) = accept::timed(req);
                req.extensions_mut().insert(ConnectInfo(peer));
                let response = app.clone().call(req);
                let accept = service_accept.clone();
                let on_timeout = on_timeout.clone();
                async move {
                    // Most requests (every GET, every upgrade) have no body to wait for.
                    if watch.is_done() {
                        return response.await;
                    }
                    tokio::select! {
                        response = response => return response,
                        () = watch.owed_at(deadline) => {}
                    }
                    // The handler is dropped by now, and with it whatever body it had
                    // buffered (up to `max_body_bytes`): hand that back to the OS too.
                    super::release_memory();
                    accept.body_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "request body deadline passed; answering 408");
                    on_timeout.notify_one();
                    Ok(accept::request_timeout(accept.config.body_timeout_ms))
                }
            });
            let io = match &tls {
                None => Io::Plain(tcp),
                Some(tls) => match tls.handshake(tcp, header_timeout).await {
                    Some(stream) => Io::Tls(Box::new(stream)),
                    None => return,
                },
            };
            let builder = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .clone();
            let result = match io {
                Io::Plain(tcp) => drive(&builder, tcp, service, &stop, &timed_out).await,
                Io::Tls(tls) => drive(&builder, *tls, service, &stop, &timed_out).await,
            };
            let Some(result) = result else { return };
            if let Err(e) = result {
                if e.is_timeout() {
                    accept.header_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                tracing::trace!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("http connections still open after the shutdown grace period");
    }
    Ok(())
}

/// An admitted connection's stream, before hyper gets it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Serves HTTP/1 on `io` until the connection ends (`None`: dropped after a body deadline's
/// grace). Generic so that hyper gets the bare stream (plain or TLS), which is what an
/// upgrade downcasts back to ([`super::ws::PendingUpgrade`]).
async fn drive<I, S>(
    builder: &http1::Builder,
    io: I,
    service: S,
    stop: &CancellationToken,
    timed_out: &Notify,
) -> Option<Result<(), hyper::Error>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = axum::body::Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    Some(tokio::select! {
        result = conn.as_mut() => result,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        () = timed_out.notified() => {
            match tokio::time::timeout(TIMED_OUT_GRACE, conn.as_mut()).await {
                Ok(result) => result,
                Err(_) => return None,
            }
        }
    })
}

/// Tells a refused connection why, if that fits into its empty send buffer at once (it always
/// does; a socket that cannot take it gets nothing), and closes it.
fn refuse(tcp: &TcpStream, refusal: Refusal) {
    let _ = tcp.try_write(&refusal.response_bytes());
}

/// Errors that concern only the connection being accepted; the next accept may succeed.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

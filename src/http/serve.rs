//! Serving the router on a TCP listener, plain or over TLS: hyper's HTTP/1 connections
//! driven directly, with graceful shutdown.
//!
//! Why not `axum::serve`: it runs each connection through hyper-util's protocol-detecting
//! builder with upgrade support, which costs about 3.4 KiB more per connection holding a
//! request than hyper's own HTTP/1 connection (measured with 10,000 held requests; see
//! BENCHMARKS.md, W2). The allocator holds one connection per waiting VM, so that difference
//! is paid ten thousand times. Nothing here needs HTTP/2; HTTP/1 upgrades are on for the
//! browser desktop's WebSockets (hyper's own `with_upgrades`, not the auto builder).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::tls::{ServedOverTls, HANDSHAKE_TIMEOUT};

/// How long a client may take to send a request's head (slow-header protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` (over TLS with `tls`) until `stop` resolves; then calls
/// `on_stop` (which ends held requests), stops accepting, lets every connection finish its
/// current request, and returns once all connections are closed.
pub(crate) async fn serve(
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    stop: impl Future<Output = ()> + Send + 'static,
    on_stop: impl FnOnce() + Send,
) -> std::io::Result<()> {
    let (closing_tx, closing_rx) = watch::channel(());
    // Every connection task holds a sender; `recv` returns `None` once all are gone.
    let (alive_tx, mut alive_rx) = mpsc::channel::<()>(1);
    tokio::pin!(stop);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, for instance: wait rather than spin.
                    tracing::error!(error = %e, "cannot accept connections");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Nagle stays on, as with `axum::serve`: with TCP_NODELAY, W3 (small requests on
        // keep-alive connections) fell from ~36,000 to ~20,000 requests/s.
        let (router, closing, alive) = (router.clone(), closing_rx.clone(), alive_tx.clone());
        match &tls {
            None => tokio::spawn(connection(router, stream, addr, false, closing, alive)),
            Some(tls) => tokio::spawn(tls_connection(
                tls.clone(),
                router,
                stream,
                addr,
                closing,
                alive,
            )),
        };
    }
    on_stop();
    drop(closing_tx);
    drop(alive_tx);
    let _ = alive_rx.recv().await;
    Ok(())
}

/// A TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`], abandoned on shutdown), then HTTP/1
/// over it with every request marked [`ServedOverTls`]. A failed handshake only closes
/// this connection.
async fn tls_connection(
    tls: TlsAcceptor,
    router: Router,
    stream: TcpStream,
    addr: SocketAddr,
    mut closing: watch::Receiver<()>,
    alive: mpsc::Sender<()>,
) {
    let stream = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)) => match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(client = %addr, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %addr, "TLS handshake timed out");
                return;
            }
        },
        _ = closing.changed() => return,
    };
    connection(router, stream, addr, true, closing, alive).await;
}

/// One HTTP/1 connection; on shutdown it finishes its current request, then closes.
async fn connection<S>(
    router: Router,
    stream: S,
    addr: SocketAddr,
    https: bool,
    mut closing: watch::Receiver<()>,
    _alive: mpsc::Sender<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        // What `into_make_service_with_connect_info` provides: the client address.
        req.extensions_mut().insert(ConnectInfo(addr));
        if https {
            req.extensions_mut().insert(ServedOverTls);
        }
        router.clone().oneshot(req)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Above the router's own limit (`middleware::MAX_HEADERS`), so that a request with too many
        // headers gets the router's JSON 431 rather than hyper's empty one.
        .max_headers(2 * super::middleware::MAX_HEADERS)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        // The sender is dropped when the server stops.
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Errors of one connection that `accept` reports; the listener itself is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

//! The HTTP listener: hyper's HTTP/1 connections with a deadline for every request head
//! (which also closes keep-alive connections left idle), and caps on open connections, in
//! all and per client address. A connection over a cap is closed as soon as it is accepted,
//! so a client that opens hundreds of idle or half-sent requests takes at most its share and
//! for at most [`HEADER_TIMEOUT`] each, and never the file descriptors the UI needs. Over
//! TLS the handshake gets the same deadline, inside the connection's own task.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use diskferry_protocol::admission::{Admission, Limits};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::error::Failure;

/// Most connections open at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Most connections open at once from one client address.
pub const MAX_PER_ADDRESS: usize = 64;
/// How long a client has to send a request head, counted from when the server is ready for it
/// (so also how long a keep-alive connection may sit idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request body (they are small: [`crate::MAX_BODY`]).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts connections on `listener` and serves `app` on each, within the caps, until the
/// process ends; over TLS when given an acceptor.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let caps = Admission::new(Limits {
        per_address: MAX_PER_ADDRESS,
        total: MAX_CONNECTIONS,
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("http: accepting a connection failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let slot = match caps.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refused) => {
                tracing::debug!("http: {peer} refused: {refused}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, peer, app).await,
                Some(acceptor) => serve_tls(&acceptor, stream, peer, app).await,
            }
            drop(slot);
        });
    }
}

/// Completes the TLS handshake within [`HEADER_TIMEOUT`], then serves the connection.
async fn serve_tls(acceptor: &TlsAcceptor, stream: TcpStream, peer: SocketAddr, app: Router) {
    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => serve_connection(tls, peer, app).await,
        Ok(Err(e)) => tracing::debug!("http: {peer}: TLS handshake failed: {e}"),
        Err(_) => tracing::debug!("http: {peer}: no TLS handshake in time"),
    }
}

/// Serves one connection; each request learns the client's address (`ConnectInfo`).
async fn serve_connection<I>(stream: I, peer: SocketAddr, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().call(req)
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!("http: {peer}: {e}");
    }
}

/// Reads a mutating request's body before anything looks at it, so a client that trickles
/// one gets 408 after [`BODY_TIMEOUT`] instead of holding a handler (and one over
/// [`crate::MAX_BODY`] gets 413).
pub async fn read_body_in_time(req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(BODY_TIMEOUT, to_bytes(body, crate::MAX_BODY));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {} bytes", crate::MAX_BODY),
        )
        .into_response(),
        Err(_) => Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("request body not sent within {} s", BODY_TIMEOUT.as_secs()),
        )
        .into_response(),
    }
}

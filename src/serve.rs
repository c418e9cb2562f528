//! The listeners' accept loop: HTTP/1.1 on hyper, one task per connection.
//!
//! `axum::serve` has no setting for idle connections, and keeps every one a
//! client leaves open for as long as the client does. Here a connection
//! that waits longer than `KEEPALIVE_TIMEOUT` for its next request (or for
//! the rest of a request's head) is closed, as uvicorn (the Python proxy's
//! server) and nginx close theirs; a request in progress, however long its
//! stream, is never cut by it.

use std::{convert::Infallible, pin::pin, time::Duration};

use axum::{extract::ConnectInfo, Router};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

/// Serves `app` on `listener` until `stop` is cancelled, then lets each
/// connection finish the request it is serving (keep-alive off) and returns
/// once all of them are closed.
pub async fn serve(listener: TcpListener, app: Router, stop: CancellationToken, keepalive: Duration) {
    let conns = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
        };
        // Without TCP_NODELAY, small stream chunks wait for the client's
        // delayed ACK (~40 ms each).
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                // What `ConnectInfo<SocketAddr>` extracts (the admin's login
                // throttle keys on it).
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                async move { Ok::<_, Infallible>(app.call(req).await.unwrap_or_else(|e| match e {})) }
            });
            let mut conn = pin!(http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(keepalive)
                .serve_connection(TokioIo::new(tcp), service));
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    // New connections are refused from now on (a load balancer in front
    // tries another replica), not left waiting in the accept queue.
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// A failed accept: the client gave up before it was accepted (go on at
/// once), or the process is out of descriptors or memory (wait a moment,
/// as `axum::serve` does, rather than spin).
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

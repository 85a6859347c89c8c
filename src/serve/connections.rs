//! The accept loop. `axum::serve` has no header-read timeout and no connection cap, and slow
//! clients that open connections and never finish their headers would otherwise hold sockets (and
//! memory) for as long as they like. This loop serves each connection with hyper's HTTP/1 builder
//! (header-read timeout, which also closes idle keep-alive connections) and stops accepting while
//! `max_connections` are open, so the kernel's backlog, not this process, holds the excess.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, and how long an idle keep-alive
    /// connection stays open.
    pub header_read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting, lets every open
/// connection finish its in-flight request, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let service = app.map_request(|request: Request<Incoming>| request.map(Body::new));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the connection semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    wait_after_accept_error(error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses are written whole; Nagle would only hold back the last segment.
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service.clone()));
        let connection = connections.watch(connection);
        let open = metrics.open_connections.clone();
        open.inc();
        tokio::spawn(async move {
            // Errors here are the client's (reset, header timeout, garbage): nothing to do.
            let _ = connection.await;
            open.dec();
            drop(slot);
        });
    }
    drop(listener);
    connections.shutdown().await;
}

/// Out of file descriptors (EMFILE) and the like: pause instead of spinning on the error; a
/// client that hung up before being accepted is no error at all.
async fn wait_after_accept_error(error: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::warn!("accepting a connection failed: {error}; pausing accepts for 100 ms");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

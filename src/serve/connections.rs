//! The accept loop. `axum::serve` has no header-read timeout and no connection cap, and slow
//! clients that open connections and never finish their headers would otherwise hold sockets (and
//! memory) for as long as they like. This loop serves each connection with hyper's HTTP/1 builder
//! (header-read timeout, which also closes idle keep-alive connections) and stops accepting while
//! `max_connections` are open, so the kernel's backlog, not this process, holds the excess.
//! [`capped_incoming`] applies the same two limits to the gRPC port.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use futures_util::Stream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};
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

/// The gRPC port's accept side. tonic's server has no connection cap and no limit on how long a
/// new connection may stay silent, so the same two limits apply here at the socket: at most
/// `max_connections` open (accepting pauses while they are), and a connection whose client sends
/// nothing within `header_read_timeout` (an HTTP/2 client opens with its preface at once) is
/// closed. An established channel may then idle as gRPC channels do.
pub fn capped_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = std::io::Result<CappedConnection>> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    futures_util::stream::unfold(listener, move |listener| {
        let (slots, metrics, silence) = (slots.clone(), metrics.clone(), limits.header_read_timeout);
        async move {
            let slot = slots
                .acquire_owned()
                .await
                .expect("the connection semaphore is never closed");
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        metrics.open_connections.inc();
                        let connection = CappedConnection {
                            stream,
                            _slot: slot,
                            first_bytes_by: Some(Box::pin(tokio::time::sleep(silence))),
                            open: metrics.open_connections.clone(),
                        };
                        return Some((Ok(connection), listener));
                    }
                    Err(error) => wait_after_accept_error(error).await,
                }
            }
        }
    })
}

/// An accepted gRPC connection holding one of the port's slots until it closes.
pub struct CappedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the client's first bytes arrive.
    first_bytes_by: Option<Pin<Box<Sleep>>>,
    open: IntGauge,
}

impl Drop for CappedConnection {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl AsyncRead for CappedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some(deadline) = &mut this.first_bytes_by {
            match polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_bytes_by = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing within the header read timeout",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for CappedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for CappedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
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

//! The HTTP/1.1 server loop, with the limits `axum::serve` lacks.
//!
//! `axum::serve` gives hyper no timer, so a client that sends half a request
//! line, or opens a keep-alive connection and says nothing, holds its socket
//! forever; nor does it cap open connections. Here:
//!
//! - at most `TRACKER_MAX_OPEN_CONNECTIONS` connections are open at once,
//!   WebSockets included (the permit lives as long as the socket); further
//!   clients wait in the kernel's listen backlog;
//! - a connection with no request in flight is closed when it stays silent
//!   for `TRACKER_KEEPALIVE_TIMEOUT`, or when a request head that started
//!   arriving is not complete within `TRACKER_HEADER_TIMEOUT`;
//! - hyper's own header timer, at the sum of both, backs that up;
//! - `TRACKER_REQUEST_TIMEOUT` is a router layer (see [`crate::routes`]): it
//!   bounds a handler, not the WebSocket it upgrades to.
//!
//! Shutdown: stop accepting, let each connection finish its request and
//! close, and return when all have. Upgraded sockets are no longer HTTP
//! connections: [`crate::routes::ws`] drains them.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::{Metrics, Timeout};

/// The connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_open_connections: u32,
}

/// Serves `router` on `listener` until `stop` fires, then waits for the open
/// HTTP connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_open_connections as usize));
    let connections = TaskTracker::new();
    let close_idle = CancellationToken::new();
    loop {
        // The permit first: at the cap, connections stay in the backlog
        // instead of being accepted and starved.
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: retrying at once
                    // would spin.
                    tracing::error!(error = %e, "accept failed; retrying in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        connections.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits,
            permit,
            metrics.clone(),
            close_idle.clone(),
        ));
    }
    drop(listener);
    close_idle.cancel();
    connections.close();
    connections.wait().await;
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    permit: OwnedSemaphorePermit,
    metrics: Metrics,
    close_idle: CancellationToken,
) {
    // Heartbeats are tiny; Nagle would hold each answer back.
    let _ = stream.set_nodelay(true);
    let phase = Arc::new(Mutex::new(Phase::idle(Instant::now())));
    let io = Guarded {
        io: stream,
        phase: phase.clone(),
        limits,
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        metrics: metrics.clone(),
        _open: OpenConnection::new(permit, metrics),
    };
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let busy = Busy::begin(phase.clone());
        let router = router.clone();
        async move {
            let response = router.oneshot(req).await;
            if let Ok(r) = &response {
                busy.end(r.status() == StatusCode::SWITCHING_PROTOCOLS);
            }
            response
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout + limits.keepalive_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        () = close_idle.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // Clients hanging up mid-request are routine, not worth a warning.
        tracing::debug!(peer = %peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Where a connection is, as far as the timeouts care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in flight since `since`; the next head began arriving at
    /// `head_from`, if it did.
    Idle {
        since: Instant,
        head_from: Option<Instant>,
    },
    /// This many requests in flight: the request timeout governs.
    Busy(usize),
    /// Handed over to a WebSocket, which has its own heartbeat window.
    Upgraded,
}

impl Phase {
    fn idle(since: Instant) -> Self {
        Phase::Idle {
            since,
            head_from: None,
        }
    }

    /// When the connection is to be closed, and by which timeout.
    fn deadline(self, limits: &ConnLimits) -> Option<(Instant, Timeout)> {
        match self {
            Phase::Idle {
                head_from: Some(t), ..
            } => Some((t + limits.header_timeout, Timeout::Header)),
            Phase::Idle {
                since,
                head_from: None,
            } => Some((since + limits.keepalive_timeout, Timeout::Keepalive)),
            Phase::Busy(_) | Phase::Upgraded => None,
        }
    }
}

/// Marks a request in flight until [`Busy::end`] or drop (the client went
/// away mid-request: the connection is ending anyway).
struct Busy(Arc<Mutex<Phase>>, bool);

impl Busy {
    fn begin(phase: Arc<Mutex<Phase>>) -> Self {
        update(&phase, |p| match *p {
            Phase::Busy(n) => *p = Phase::Busy(n + 1),
            Phase::Idle { .. } => *p = Phase::Busy(1),
            Phase::Upgraded => {}
        });
        Busy(phase, false)
    }

    fn end(mut self, upgraded: bool) {
        self.1 = upgraded;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let upgraded = self.1;
        update(&self.0, |p| match *p {
            _ if upgraded => *p = Phase::Upgraded,
            Phase::Busy(n) if n > 1 => *p = Phase::Busy(n - 1),
            Phase::Busy(_) => *p = Phase::idle(Instant::now()),
            Phase::Idle { .. } | Phase::Upgraded => {}
        });
    }
}

fn update<T>(phase: &Mutex<Phase>, f: impl FnOnce(&mut Phase) -> T) -> T {
    // A poisoned lock only means a panic elsewhere mid-update of a plain
    // enum; the value is still usable.
    let mut guard = phase.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

/// Holds the connection's permit and the open-connection gauge until the
/// socket drops, which for a WebSocket is when the socket closes.
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
    metrics: Metrics,
}

impl OpenConnection {
    fn new(permit: OwnedSemaphorePermit, metrics: Metrics) -> Self {
        metrics.connection_opened();
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

/// The TCP stream, failing its reads once the connection's idle or header
/// deadline has passed; hyper then closes it.
struct Guarded {
    io: TcpStream,
    phase: Arc<Mutex<Phase>>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
    metrics: Metrics,
    _open: OpenConnection,
}

impl Guarded {
    fn expired(&self, which: Timeout) -> io::Error {
        self.metrics.connection_timeout(which);
        io::Error::new(io::ErrorKind::TimedOut, format!("{which} timeout"))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let now = Instant::now();
        let deadline = update(&this.phase, |p| p.deadline(&this.limits));
        if let Some((at, which)) = deadline {
            if now >= at {
                return Poll::Ready(Err(this.expired(which)));
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // The first bytes of a head: the header clock starts.
                    update(&this.phase, |p| {
                        if let Phase::Idle {
                            since,
                            head_from: None,
                        } = *p
                        {
                            *p = Phase::Idle {
                                since,
                                head_from: Some(now),
                            };
                        }
                    });
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((at, which)) = update(&this.phase, |p| p.deadline(&this.limits)) else {
                    return Poll::Pending;
                };
                if this.timer.deadline() != at {
                    this.timer.as_mut().reset(at);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.expired(which))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_open_connections: 1,
        }
    }

    #[tokio::test]
    async fn the_phase_picks_the_timeout() {
        let t = Instant::now();
        let l = limits();
        assert_eq!(
            Phase::idle(t).deadline(&l),
            Some((t + l.keepalive_timeout, Timeout::Keepalive))
        );
        let started = Phase::Idle {
            since: t,
            head_from: Some(t + Duration::from_secs(1)),
        };
        assert_eq!(
            started.deadline(&l),
            Some((t + Duration::from_secs(11), Timeout::Header))
        );
        assert_eq!(Phase::Busy(1).deadline(&l), None);
        assert_eq!(Phase::Upgraded.deadline(&l), None);
    }

    #[tokio::test]
    async fn requests_in_flight_and_upgrades_are_tracked() {
        let phase = Arc::new(Mutex::new(Phase::idle(Instant::now())));
        let a = Busy::begin(phase.clone());
        let b = Busy::begin(phase.clone());
        assert_eq!(update(&phase, |p| *p), Phase::Busy(2));
        a.end(false);
        assert_eq!(update(&phase, |p| *p), Phase::Busy(1));
        drop(b);
        assert!(matches!(update(&phase, |p| *p), Phase::Idle { .. }));
        Busy::begin(phase.clone()).end(true);
        assert_eq!(update(&phase, |p| *p), Phase::Upgraded);
        drop(Busy::begin(phase.clone()));
        assert_eq!(update(&phase, |p| *p), Phase::Upgraded);
    }
}

//! The HTTP/1.1 server loop of both binaries' listeners, with the limits
//! `axum::serve` lacks.
//!
//! `axum::serve` gives hyper no timer, so a client that sends half a request
//! line, or opens a keep-alive connection and says nothing, holds its socket
//! forever; nor does it cap open connections. Here:
//!
//! - at most [`ConnLimits::max_open_connections`] connections are open at
//!   once, WebSockets included (the permit lives as long as the socket);
//!   further clients wait in the kernel's listen backlog;
//! - a connection with no request in flight is closed when it stays silent
//!   for [`ConnLimits::keepalive_timeout`], or when a request head that
//!   started arriving is not complete within [`ConnLimits::header_timeout`];
//! - hyper's own header timer, at the sum of both, backs that up;
//! - a request timeout, where one is wanted, is a router layer: it bounds a
//!   handler, not the WebSocket it upgrades to.
//!
//! Shutdown: stop accepting, let each connection finish its request and
//! close, and return when all have. Upgraded sockets are no longer HTTP
//! connections: whoever upgraded them drains them.

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

use crate::label_enum;

label_enum!(
    /// Which timeout closed a connection or ended a request.
    Timeout { Header => "header", Keepalive => "keepalive", Request => "request" }
);

/// The connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_open_connections: u32,
}

impl ConnLimits {
    /// For a listener of the ops routes only (probes and scrapes): a few
    /// clients, short requests.
    pub const OPS: ConnLimits = ConnLimits {
        header_timeout: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(60),
        max_open_connections: 64,
    };
}

/// What the server loop reports, for a binary's metrics: connections opened
/// and closed, and those a timeout closed. `()` reports nothing.
pub trait ConnObserver: Clone + Send + Sync + Unpin + 'static {
    fn connection_opened(&self);
    fn connection_closed(&self);
    fn connection_timeout(&self, which: Timeout);
}

impl ConnObserver for () {
    fn connection_opened(&self) {}
    fn connection_closed(&self) {}
    fn connection_timeout(&self, _: Timeout) {}
}

/// Serves `router` on `listener` until `stop` fires, then waits for the open
/// HTTP connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    metrics: impl ConnObserver,
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

async fn serve_connection<M: ConnObserver>(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    permit: OwnedSemaphorePermit,
    metrics: M,
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
struct OpenConnection<M: ConnObserver> {
    _permit: OwnedSemaphorePermit,
    metrics: M,
}

impl<M: ConnObserver> OpenConnection<M> {
    fn new(permit: OwnedSemaphorePermit, metrics: M) -> Self {
        metrics.connection_opened();
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl<M: ConnObserver> Drop for OpenConnection<M> {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

/// The TCP stream, failing its reads once the connection's idle or header
/// deadline has passed; hyper then closes it.
struct Guarded<M: ConnObserver> {
    io: TcpStream,
    phase: Arc<Mutex<Phase>>,
    limits: ConnLimits,
    timer: Pin<Box<Sleep>>,
    metrics: M,
    _open: OpenConnection<M>,
}

impl<M: ConnObserver> Guarded<M> {
    fn expired(&self, which: Timeout) -> io::Error {
        self.metrics.connection_timeout(which);
        io::Error::new(io::ErrorKind::TimedOut, format!("{which} timeout"))
    }
}

impl<M: ConnObserver> AsyncRead for Guarded<M> {
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

impl<M: ConnObserver> AsyncWrite for Guarded<M> {
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
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The loop itself, without any binary's metrics: a whole request is
    /// answered, half a request head is cut off at the header timeout.
    #[tokio::test]
    async fn a_half_request_is_dropped_at_the_header_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = ConnLimits {
            header_timeout: Duration::from_millis(200),
            keepalive_timeout: Duration::from_secs(30),
            max_open_connections: 4,
        };
        let stop = CancellationToken::new();
        let router = Router::new().route("/", get(|| async { "ok" }));
        let server = tokio::spawn(serve(listener, router, limits, (), stop.clone()));

        let mut whole = TcpStream::connect(addr).await.expect("connect");
        whole
            .write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        whole.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let mut half = TcpStream::connect(addr).await.expect("connect");
        let sent = Instant::now();
        half.write_all(b"GET / HT").await.expect("write");
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(10), half.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the half request was never cut off");
        assert!(sent.elapsed() >= limits.header_timeout);
        assert!(!String::from_utf8_lossy(&rest).contains("200"));

        stop.cancel();
        server.await.expect("the loop ends");
    }

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

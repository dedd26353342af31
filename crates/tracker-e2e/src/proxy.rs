//! A loopback TCP forwarder that can be cut: while cut it refuses new connections and drops
//! open ones, as a network partition between a process and its database would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// A running forwarder; it stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    enabled: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target` while enabled.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Error::io("bind the proxy", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("read the proxy's address", e))?;
        let enabled = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            target,
            enabled.clone(),
            cut.clone(),
            accepted.clone(),
            stop.clone(),
        ));
        Ok(Self {
            addr,
            enabled,
            cut,
            accepted,
            stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (`false`: open connections are dropped, new ones refused) or restores.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::SeqCst);
        if !enabled {
            self.cut.send_modify(|n| *n += 1);
        }
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.send_modify(|n| *n += 1);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    enabled: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let inbound = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let Ok((mut inbound, _)) = inbound else {
            continue;
        };
        if !enabled.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        accepted.fetch_add(1, Ordering::Relaxed);
        let mut cut_rx = cut.subscribe();
        let stop = stop.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut_rx.changed() => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn forwards_then_cuts_then_forwards_again() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = Proxy::start(target).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");

        proxy.set_enabled(false);
        // The open connection is dropped: the read ends (EOF or reset).
        let n = c.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);

        proxy.set_enabled(true);
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        c.write_all(b"yo").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"yo");
        assert_eq!(proxy.accepted(), 2);
    }
}

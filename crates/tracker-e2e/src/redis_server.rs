//! A run's private standalone `redis-server`: no persistence (`--save '' --appendonly no`), a
//! free loopback port, its own temporary directory. It can be SIGKILLed and started again on
//! the same port, empty ([`LocalServer::restart`]): a Redis that lost its data.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::local_server::{LocalServer, ServerKind};

/// `redis-server` from `PATH`.
#[derive(Debug)]
pub struct Redis;

/// The private Redis of a run.
pub type RedisServer = LocalServer<Redis>;

impl ServerKind for Redis {
    const NAME: &'static str = "redis-server";
    const SCHEME: &'static str = "redis";
    const READY: &'static str = "it answered PING";

    fn binary() -> PathBuf {
        PathBuf::from("redis-server")
    }

    fn args(port: u16, dir: &Path) -> Vec<String> {
        let port = port.to_string();
        let dir = dir.display().to_string();
        [
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir,
            "--protected-mode",
            "no",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn ready(port: u16) -> impl std::future::Future<Output = bool> + Send {
        ping(port)
    }
}

/// True if a Redis on the loopback `port` answers `PING` with `+PONG` within a second.
pub async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

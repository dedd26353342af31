//! A run's private standalone `redis-server`: no persistence (`--save '' --appendonly no`), a
//! free loopback port, its own temporary directory. It can be SIGKILLed and started again on
//! the same port, empty: a Redis that lost its data. The shared test servers are never touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::process::{free_port, ChildProcess};
use crate::{Error, Result};

/// How long a starting `redis-server` may take to answer PING.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The private server; killed when dropped (its directory stays for the post-mortem).
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    starts: u32,
    process: Option<ChildProcess>,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`) on a free loopback port, with `dir` for its files
    /// and log, and waits until it answers PING.
    pub async fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut server = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            starts: 0,
            process: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL: no shutdown save, no goodbye to clients.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port, empty, and waits until it answers PING.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.spawn().await
    }

    /// SIGTERM (bounded), then removes its directory.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(5)).await?;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let name = format!("redis-server.{}", self.starts);
        let log = self.dir.join(format!("{name}.log"));
        let port = self.port.to_string();
        let dir = self.dir.display().to_string();
        let args = [
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
        ];
        let mut p = ChildProcess::spawn_with_args(&name, Path::new("redis-server"), &args, &log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            p.check_running("it answered PING")?;
            if ping(self.port).await {
                self.process = Some(p);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{name} on port {} to answer PING", self.port),
                    waited: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

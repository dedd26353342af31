//! A test's private `nats-server` with JetStream: a free loopback port, its own
//! store directory. It can be stopped and started again on the same port with
//! the same store (a NATS outage that loses nothing it acknowledged), or
//! killed. The shared server of the machine is never touched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::process::{free_port, ChildProcess};
use crate::{Error, Result};

/// How long a starting `nats-server` may take to greet a client.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Debian's package installs it; `PATH` is tried otherwise.
const DEBIAN_BINARY: &str = "/usr/sbin/nats-server";

/// The private server; killed when dropped (its directory stays for the post-mortem).
#[derive(Debug)]
pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    starts: u32,
    process: Option<ChildProcess>,
}

impl NatsServer {
    /// Starts `nats-server -js` on a free loopback port with its store under
    /// `dir`, and waits until it greets a client with JetStream enabled.
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

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGTERM (bounded): a clean stop; the store stays for [`NatsServer::start_again`].
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(5)).await?;
        }
        Ok(())
    }

    /// SIGKILL: no goodbye to clients.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port with the same store.
    pub async fn start_again(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    /// Stops it and removes its directory.
    pub async fn remove(mut self) -> Result<()> {
        self.stop().await?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let name = format!("nats-server.{}", self.starts);
        let log = self.dir.join(format!("{name}.log"));
        let port = self.port.to_string();
        let store = self.dir.join("jetstream").display().to_string();
        let args = ["-js", "-sd", &store, "-a", "127.0.0.1", "-p", &port];
        let binary = if Path::new(DEBIAN_BINARY).exists() {
            Path::new(DEBIAN_BINARY)
        } else {
            Path::new("nats-server")
        };
        let mut p = ChildProcess::spawn_with_args(&name, binary, &args, &log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            p.check_running("it greeted a client")?;
            if greets_with_jetstream(self.port).await {
                self.process = Some(p);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{name} on port {} to greet with JetStream", self.port),
                    waited: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// True if a NATS server on the loopback `port` sends its `INFO` greeting,
/// with JetStream on, within a second.
pub async fn greets_with_jetstream(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut buf = vec![0u8; 4096];
        let mut len = 0;
        while len < buf.len() {
            let n = s.read(&mut buf[len..]).await.ok()?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].ends_with(b"\r\n") {
                break;
            }
        }
        let greeting = String::from_utf8_lossy(&buf[..len]);
        Some(greeting.starts_with("INFO ") && greeting.contains("\"jetstream\":true"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

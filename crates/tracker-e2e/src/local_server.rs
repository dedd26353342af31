//! A test's private server process (`redis-server`, `nats-server`, ...): a
//! free loopback port, its own directory for files and logs, started, stopped,
//! killed and started again on the same port. The shared servers of the
//! machine are never touched. What differs per server (binary, arguments,
//! how it shows it is ready) is a [`ServerKind`].

use std::future::Future;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::process::{free_port, ChildProcess};
use crate::{Error, Result};

/// How long a starting server may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// One kind of server.
pub trait ServerKind {
    /// The process name, as in its log file names (`redis-server.1.log`).
    const NAME: &'static str;
    /// The URL scheme of its clients.
    const SCHEME: &'static str;
    /// What [`ServerKind::ready`] waits for, for error messages.
    const READY: &'static str;

    fn binary() -> PathBuf;

    /// The command line for `port`, keeping its files under `dir`.
    fn args(port: u16, dir: &Path) -> Vec<String>;

    /// True once the server on the loopback `port` serves clients.
    fn ready(port: u16) -> impl Future<Output = bool> + Send;
}

/// The private server; killed when dropped (its directory stays for the
/// post-mortem unless [`LocalServer::remove`]d).
#[derive(Debug)]
pub struct LocalServer<K> {
    port: u16,
    dir: PathBuf,
    starts: u32,
    process: Option<ChildProcess>,
    kind: PhantomData<K>,
}

impl<K: ServerKind> LocalServer<K> {
    /// Starts the server on a free loopback port with `dir` for its files,
    /// and waits until it is ready.
    pub async fn start(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let mut server = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            starts: 0,
            process: None,
            kind: PhantomData,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `SCHEME://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", K::SCHEME, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGTERM (bounded): a clean stop; its files stay.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.terminate(Duration::from_secs(5)).await?;
        }
        Ok(())
    }

    /// SIGKILL: no shutdown work, no goodbye to clients.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.kill().await?;
        }
        Ok(())
    }

    /// Stops it cleanly and starts it again on the same port with the same
    /// files.
    pub async fn start_again(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    /// Kills it and starts it again on the same port: a crash and a restart.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
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
        let name = format!("{}.{}", K::NAME, self.starts);
        let log = self.dir.join(format!("{name}.log"));
        let args = K::args(self.port, &self.dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = ChildProcess::spawn_with_args(&name, &K::binary(), &args, &log)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            p.check_running(K::READY)?;
            if K::ready(self.port).await {
                self.process = Some(p);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("{name} on port {}: {}", self.port, K::READY),
                    waited: READY_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

//! A test's private `nats-server` with JetStream: a free loopback port, its own
//! store directory. It can be stopped and started again on the same port with
//! the same store ([`LocalServer::start_again`]: a NATS outage that loses
//! nothing it acknowledged), or killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::local_server::{LocalServer, ServerKind};

/// Where Debian's package installs it; `PATH` is tried otherwise.
const DEBIAN_BINARY: &str = "/usr/sbin/nats-server";

/// `nats-server -js`.
#[derive(Debug)]
pub struct Nats;

/// The private NATS of a test.
pub type NatsServer = LocalServer<Nats>;

impl ServerKind for Nats {
    const NAME: &'static str = "nats-server";
    const SCHEME: &'static str = "nats";
    const READY: &'static str = "it greeted a client with JetStream";

    fn binary() -> PathBuf {
        if Path::new(DEBIAN_BINARY).exists() {
            PathBuf::from(DEBIAN_BINARY)
        } else {
            PathBuf::from("nats-server")
        }
    }

    fn args(port: u16, dir: &Path) -> Vec<String> {
        let store = dir.join("jetstream").display().to_string();
        vec![
            "-js".into(),
            "-sd".into(),
            store,
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]
    }

    fn ready(port: u16) -> impl std::future::Future<Output = bool> + Send {
        greets_with_jetstream(port)
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

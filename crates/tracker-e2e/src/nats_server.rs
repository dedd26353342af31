//! A test's private `nats-server` with JetStream: a free loopback port, its own
//! store directory. It can be stopped and started again on the same port with
//! the same store ([`LocalServer::start_again`]: a NATS outage that loses
//! nothing it acknowledged), or killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::local_server::{LocalServer, ServerKind};
use crate::{Error, Result};

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

/// One message of a JetStream stream, as the server keeps it.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub sequence: u64,
    pub subject: String,
    /// Its `Nats-Msg-Id` header, if any.
    pub msg_id: Option<String>,
    pub payload: Vec<u8>,
}

/// Every message of `stream` on the NATS server at `url`, oldest first;
/// empty while the stream does not exist.
pub async fn read_stream(url: &str, stream: &str) -> Result<Vec<StreamMessage>> {
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::Setup(format!("NATS: {what}: {e}"));
    let client = async_nats::connect(url)
        .await
        .map_err(|e| failed("connect", &e))?;
    let js = async_nats::jetstream::new(client);
    let Ok(mut stream) = js.get_stream(stream).await else {
        return Ok(Vec::new());
    };
    let info = stream.info().await.map_err(|e| failed("stream info", &e))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    for seq in first.max(1)..=last {
        let m = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| failed("read a message", &e))?;
        out.push(StreamMessage {
            sequence: m.sequence,
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned()),
            payload: m.payload.to_vec(),
        });
    }
    Ok(out)
}

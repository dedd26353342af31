//! Many WebSockets held at once, each by its own task that answers pings until told to stop
//! (then closes politely or drops the TCP connection) or until the server ends it.

use std::time::Duration;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::client::ApiClient;
use crate::{Error, Result};

/// What a holder does when its stop token fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// Send a Close frame and wait for the answer.
    Close,
    /// Drop the TCP connection without a Close frame.
    Drop,
}

/// How a held socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldEnd {
    /// The server closed it or the connection broke; the server's Close frame if any.
    ServerEnded(Option<(u16, String)>),
    /// We closed it after the stop token fired.
    Stopped,
}

/// One held socket.
#[derive(Debug)]
pub struct Held {
    pub connection_id: Uuid,
    pub replica: usize,
    pub session: String,
    pub task: JoinHandle<HoldEnd>,
}

/// Opens `n` sockets (at most `concurrency` handshakes at a time) on the replica
/// `replica_of(i)`, session `sessions[i % len]`, each held by a task until `stop`.
pub async fn open(
    client: &ApiClient,
    n: usize,
    concurrency: usize,
    sessions: &[String],
    replica_of: impl Fn(usize) -> usize,
    stop: &CancellationToken,
    on_stop: OnStop,
) -> Result<Vec<Held>> {
    let jobs = (0..n).map(|i| {
        let client = client.clone();
        let session = sessions[i % sessions.len()].clone();
        let replica = replica_of(i);
        let stop = stop.clone();
        async move {
            let mut ws = client.websocket(replica, &session, i % 2 == 0).await?;
            let connection_id = ws.connection_id;
            let task = tokio::spawn(async move {
                let stopped = tokio::select! {
                    r = ws.hold(Duration::from_secs(24 * 3600)) => {
                        match r {
                            // Still open after a day: treat as stopped.
                            Ok(true) => true,
                            Ok(false) | Err(_) => false,
                        }
                    }
                    () = stop.cancelled() => true,
                };
                if !stopped {
                    return HoldEnd::ServerEnded(ws.server_close.clone());
                }
                match on_stop {
                    OnStop::Close => {
                        ws.close().await;
                    }
                    OnStop::Drop => {
                        ws.drop_abruptly();
                    }
                }
                HoldEnd::Stopped
            });
            Ok::<_, Error>(Held {
                connection_id,
                replica,
                session,
                task,
            })
        }
    });
    let mut held = Vec::with_capacity(n);
    let mut opened = futures::stream::iter(jobs).buffer_unordered(concurrency.max(1));
    let mut first_error = None;
    while let Some(r) = opened.next().await {
        match r {
            Ok(h) => held.push(h),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        // The sockets opened so far are ended by the caller's stop token.
        Some(e) => Err(e),
        None => Ok(held),
    }
}

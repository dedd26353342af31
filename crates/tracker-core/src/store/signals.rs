//! Signals: the reaper waits for wakes and for history to archive instead of
//! polling for them.
//!
//! The script that records a pending wake also pushes one element onto its
//! shard's wake signal list (`wakesig`, see `lua/common.lua`); the script
//! that appends history to a shard's outbox does the same on `archsig`. A
//! [`SignalListener`] blocks on one kind of list with `BLPOP`. A blocked connection answers nothing
//! else until the wait ends, so it cannot be the store's multiplexed
//! connection: each listener owns a connection of its own, made for it.
//!
//! On a cluster a command's keys must share a slot, and every shard is its
//! own slot: one listener waits on one shard. On a standalone Redis one
//! listener waits on every shard at once.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::AsyncConnectionConfig;

use crate::error::{Error, Result};
use crate::keys::{ShardId, ShardKey};

use super::Store;

/// How blocking connections are made: like the store's, but without a
/// response timeout shorter than a wait (each wait bounds itself).
#[allow(clippy::large_enum_variant)] // one per store, behind an Arc
pub(super) enum BlockingClient {
    Standalone(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

impl BlockingClient {
    /// A cluster client's response timeout has to be some duration: one far
    /// beyond any wait, which [`WakeListener::wait`] bounds itself.
    const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3600);

    pub(super) fn standalone(url: &str) -> Result<Self> {
        Ok(Self::Standalone(redis::Client::open(url)?))
    }

    pub(super) fn cluster(urls: &[String], connect_timeout: Duration) -> Result<Self> {
        let client = redis::cluster::ClusterClient::builder(urls.to_vec())
            .connection_timeout(connect_timeout)
            .response_timeout(Self::CLUSTER_RESPONSE_TIMEOUT)
            .retries(2)
            .build()?;
        Ok(Self::Cluster(client))
    }
}

enum BlockingConn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// What a signal says: which shard list it is pushed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A wake was recorded.
    Wake,
    /// History was appended to the outbox.
    Archive,
}

impl Signal {
    fn key(self) -> ShardKey {
        match self {
            Signal::Wake => ShardKey::WakeSignal,
            Signal::Archive => ShardKey::ArchiveSignal,
        }
    }
}

/// A dedicated connection blocked on the signals of some shards.
pub struct SignalListener {
    conn: BlockingConn,
    keys: Vec<String>,
    shards: Vec<ShardId>,
    /// Added to a wait's own bound: how long Redis may take to answer it.
    slack: Duration,
}

/// The listener of wake signals (the first kind there was).
pub type WakeListener = SignalListener;

impl std::fmt::Debug for SignalListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalListener")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The shards each listener waits on: all of them in one group on a
    /// standalone Redis, one group per shard on a cluster.
    pub fn signal_groups(&self) -> Vec<Vec<ShardId>> {
        match *self.blocking {
            BlockingClient::Standalone(_) => vec![self.keys.shards().collect()],
            BlockingClient::Cluster(_) => self.keys.shards().map(|s| vec![s]).collect(),
        }
    }

    /// The groups of wake listeners: [`Store::signal_groups`].
    pub fn wake_signal_groups(&self) -> Vec<Vec<ShardId>> {
        self.signal_groups()
    }

    /// Opens a dedicated connection that waits on the wake signals of `shards`
    /// (one group of [`Store::signal_groups`]).
    pub async fn wake_listener(&self, shards: &[ShardId]) -> Result<WakeListener> {
        self.signal_listener(Signal::Wake, shards).await
    }

    /// Opens a dedicated connection that waits on the `signal`s of `shards`
    /// (one group of [`Store::signal_groups`]).
    pub async fn signal_listener(
        &self,
        signal: Signal,
        shards: &[ShardId],
    ) -> Result<SignalListener> {
        let connect = async {
            Ok::<_, Error>(match &*self.blocking {
                BlockingClient::Standalone(client) => {
                    let cfg = AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.connect_timeout))
                        .set_response_timeout(None);
                    BlockingConn::Standalone(
                        client
                            .get_multiplexed_async_connection_with_config(&cfg)
                            .await?,
                    )
                }
                BlockingClient::Cluster(client) => {
                    BlockingConn::Cluster(client.get_async_connection().await?)
                }
            })
        };
        let conn = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| Error::Timeout(self.connect_timeout))??;
        Ok(SignalListener {
            conn,
            keys: shards
                .iter()
                .map(|&s| self.keys.shard_key(s, signal.key()))
                .collect(),
            shards: shards.to_vec(),
            slack: self.timeout,
        })
    }
}

impl SignalListener {
    /// Waits up to `wait` (whole milliseconds, at least one) for a signal;
    /// true when one came, and it is consumed. A signal only says "look":
    /// the caller then reads what is pending, so a signal consumed by a wait
    /// whose answer is lost costs nothing but latency.
    pub async fn wait(&mut self, wait: Duration) -> Result<bool> {
        Ok(self.wait_shard(wait).await?.is_some())
    }

    /// Like [`SignalListener::wait`], answering which shard signalled.
    pub async fn wait_shard(&mut self, wait: Duration) -> Result<Option<ShardId>> {
        let secs = wait.max(Duration::from_millis(1)).as_secs_f64();
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(&self.keys).arg(format!("{secs:.3}"));
        let bound = wait + self.slack;
        let call = async {
            let reply = match &mut self.conn {
                BlockingConn::Standalone(c) => c.req_packed_command(&cmd).await,
                BlockingConn::Cluster(c) => c.req_packed_command(&cmd).await,
            }?;
            Ok::<_, Error>(reply)
        };
        let reply = tokio::time::timeout(bound, call)
            .await
            .map_err(|_| Error::Timeout(bound))??;
        Ok(self.signalled_shard(&reply))
    }

    /// The shard of a `BLPOP` reply (`[key, element]`, or nil after the wait).
    fn signalled_shard(&self, reply: &redis::Value) -> Option<ShardId> {
        let redis::Value::Array(items) = reply else {
            return None;
        };
        let key = match items.first() {
            Some(redis::Value::BulkString(b)) => b.as_slice(),
            Some(redis::Value::SimpleString(s)) => s.as_bytes(),
            // Some element was popped: a signal, whatever the reply's shape.
            _ => return self.shards.first().copied(),
        };
        self.keys
            .iter()
            .position(|k| k.as_bytes() == key)
            .and_then(|i| self.shards.get(i).copied())
            .or(self.shards.first().copied())
    }
}

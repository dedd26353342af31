//! The store: every read and write of the shared state, one script call each.
//!
//! [`Store`] is cheap to clone (one multiplexed connection underneath) and
//! works the same over a standalone Redis and a Redis Cluster: each call names
//! its shard base as `KEYS[1]`, so the cluster client routes it to the node
//! owning that slot. Every call has a timeout.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::{join_all, try_join_all};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ToRedisArgs, Value};

use crate::domain::{
    millis_to_utc, ConnectionId, ConnectionView, EndReason, HistoryRecord, Protocol, ResourceState,
    SessionId, SessionState, SessionView, UserAgent, UserId,
};
use crate::error::{Error, Result};
use crate::keys::{KeySpace, ShardId};
use crate::scripts::{Op, Scripts};

/// How the tracker's Redis is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    Standalone,
    Cluster,
}

impl std::str::FromStr for RedisMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standalone" => Ok(RedisMode::Standalone),
            "cluster" => Ok(RedisMode::Cluster),
            other => Err(Error::Config(format!(
                "redis mode must be standalone or cluster, not {other:?}"
            ))),
        }
    }
}

/// Everything the store needs to know; binaries fill it from their settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// One URL (standalone) or the cluster's seed nodes.
    pub urls: Vec<String>,
    pub mode: RedisMode,
    pub key_prefix: String,
    /// Shards of every global index; part of the data layout (see [`crate::keys`]).
    pub shards: u16,
    /// A connection with no heartbeat for this long is dead.
    pub heartbeat_window: Duration,
    /// Upper bound of every Redis call, reconnects included.
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
}

impl StoreConfig {
    pub const DEFAULT_SHARDS: u16 = 32;

    /// Sensible defaults for one URL list and mode.
    pub fn new(urls: Vec<String>, mode: RedisMode) -> Self {
        Self {
            urls,
            mode,
            key_prefix: "trk".into(),
            shards: Self::DEFAULT_SHARDS,
            heartbeat_window: Duration::from_secs(60),
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// An offset added to the Redis server's clock inside every script. Zero in
/// production; tests advance it to make time pass without sleeping. Clones
/// share the offset.
#[derive(Debug, Clone, Default)]
pub struct ClockOffset(Arc<AtomicI64>);

impl ClockOffset {
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(millis(by), Ordering::SeqCst);
    }

    pub fn millis(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The connection limits the API enforces (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_session: u32,
    pub per_user: u32,
}

/// A connection to register, already validated.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub session_id: SessionId,
    pub connection_id: ConnectionId,
    pub user_id: UserId,
    pub protocol: Protocol,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<UserAgent>,
}

/// The connection and its session right after a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub connection: ConnectionView,
    pub session: SessionView,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created(Registered),
    /// The same connection id was registered before on this session.
    Replayed(Registered),
    /// The Session is terminated: nothing may connect.
    Terminated,
    SessionLimit,
    UserLimit,
    /// The connection id is taken by another session or by a dead connection.
    Conflict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub last_heartbeat: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchOutcome {
    pub alive: u64,
    pub unknown: Vec<(SessionId, ConnectionId)>,
}

/// A connection the sweep expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub session_id: SessionId,
    pub connection_id: ConnectionId,
    pub user_id: UserId,
}

/// What one sweep call did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sweep {
    pub expired: Vec<Expired>,
    /// The call stopped at its budget; the shard may hold more dead connections.
    pub more: bool,
}

/// Counters behind `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Stats {
    pub total_connections: u64,
    pub sessions_with_connections: u64,
    pub connections_by_protocol: BTreeMap<Protocol, u64>,
    pub sessions_by_state: BTreeMap<SessionState, u64>,
    pub shared_sessions: u64,
    pub heartbeat_window_seconds: u64,
}

/// The idle timeout of a mirrored session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleTimeout {
    /// Never hibernate: exempt by annotation, or `spec.idleTimeout: ""`.
    Off,
    After(Duration),
}

/// What the mirror knows of a Session resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMeta {
    pub session_id: SessionId,
    pub owner: Option<String>,
    pub state: ResourceState,
    pub idle_timeout: IdleTimeout,
    /// `metadata.generation`: orders the mirror's writes against the reaper's.
    pub generation: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Now `hibernating`; patch the resource, then finish or roll back.
    Claimed { generation: Option<i64> },
    /// Not claimable any more; the reason is for logs and metrics.
    Refused(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWake {
    pub session_id: SessionId,
    pub requested_at: DateTime<Utc>,
}

/// A finished connection waiting in a shard's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The stream entry id, to acknowledge after the commit.
    pub id: String,
    pub record: HistoryRecord,
}

/// An outbox entry that is not a history record: a field missing or
/// unparseable (written by hand, or by a version that wrote other fields).
/// The archiver sets it aside rather than stop the shard on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedEntry {
    /// The stream entry id, to acknowledge once the entry is set aside.
    pub id: String,
    /// The fields as stored, in order; bytes that are not UTF-8 replaced by U+FFFD.
    pub fields: Vec<(String, String)>,
    /// The first field found missing or unparseable.
    pub field: &'static str,
}

/// One read of a shard's outbox, oldest first; see [`Store::outbox_read_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxRead {
    pub entries: Vec<OutboxEntry>,
    pub malformed: Vec<MalformedEntry>,
}

/// A shard's epoch marker; see [`Store::shard_epoch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub marker: String,
    /// The marker did not exist before this call: the shard is new or lost its data.
    pub created: bool,
}

/// One connection to Redis, standalone or cluster; both are multiplexed.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How old a user-slot reservation must be before a registration that found
/// the user at its limit may check whether it is stale. Longer than any
/// registration takes (its calls time out far sooner), so a reservation whose
/// registration is still in flight is never taken for stale.
const RESERVATION_GRACE: Duration = Duration::from_secs(30);

/// The shared state of all connections and sessions.
#[derive(Clone)]
pub struct Store {
    conn: Conn,
    keys: Arc<KeySpace>,
    scripts: Arc<Scripts>,
    window: Duration,
    timeout: Duration,
    clock: ClockOffset,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .field("window", &self.window)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to Redis. In standalone mode the connection is made lazily and
    /// re-made after failures, so a store can be built while Redis is down; in
    /// cluster mode at least one seed node must answer.
    pub async fn connect(cfg: &StoreConfig) -> Result<Self> {
        let keys = KeySpace::new(&cfg.key_prefix, cfg.shards)?;
        if cfg.heartbeat_window < Duration::from_millis(1) {
            return Err(Error::Config("heartbeat window must be positive".into()));
        }
        let conn = match cfg.mode {
            RedisMode::Standalone => {
                let [url] = cfg.urls.as_slice() else {
                    return Err(Error::Config(
                        "standalone mode takes exactly one redis URL".into(),
                    ));
                };
                let client = redis::Client::open(url.as_str())?;
                let manager_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.connect_timeout))
                    .set_response_timeout(Some(cfg.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Conn::Standalone(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_cfg,
                )?)
            }
            RedisMode::Cluster => {
                if cfg.urls.is_empty() {
                    return Err(Error::Config("cluster mode needs seed node URLs".into()));
                }
                let client = redis::cluster::ClusterClient::builder(cfg.urls.clone())
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.command_timeout)
                    .retries(2)
                    .build()?;
                let connect = client.get_async_connection();
                match tokio::time::timeout(cfg.connect_timeout, connect).await {
                    Ok(conn) => Conn::Cluster(conn?),
                    Err(_) => return Err(Error::Timeout(cfg.connect_timeout)),
                }
            }
        };
        Ok(Self {
            conn,
            keys: Arc::new(keys),
            scripts: Arc::new(Scripts::load()),
            window: cfg.heartbeat_window,
            timeout: cfg.command_timeout,
            clock: ClockOffset::default(),
        })
    }

    /// Shares a clock offset with the caller (tests move time with it).
    pub fn with_clock(mut self, clock: ClockOffset) -> Self {
        self.clock = clock;
        self
    }

    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    pub fn heartbeat_window(&self) -> Duration {
        self.window
    }

    /// Readiness: Redis answers a PING within the timeout.
    pub async fn ping(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        match tokio::time::timeout(self.timeout, cmd.query_async::<String>(&mut conn)).await {
            Ok(r) => r.map(drop).map_err(Error::from),
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }

    async fn eval<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        base: &str,
        args: A,
    ) -> Result<T> {
        let mut inv = op.script.key(base);
        inv.arg(self.clock.millis()).arg(args);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }

    async fn eval_on<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        shard: ShardId,
        args: A,
    ) -> Result<T> {
        self.eval(op, &self.keys.shard_base(shard), args).await
    }

    fn session_base(&self, session: &SessionId) -> String {
        self.keys.shard_base(self.keys.shard_of(session))
    }

    fn window_ms(&self) -> i64 {
        millis(self.window)
    }

    /// Registers a connection, enforcing the limits. The per-session limit is
    /// checked in the registering script; the per-user limit, whose
    /// connections span shards, by a reservation in the user's own slot taken
    /// first and given back if the registration does not happen.
    pub async fn register(&self, new: &NewConnection, limits: Limits) -> Result<RegisterOutcome> {
        let member = format!("{}/{}", new.session_id, new.connection_id);
        if limits.per_user > 0
            && !self
                .reserve_user_slot(&new.user_id, &member, limits.per_user)
                .await?
        {
            return Ok(RegisterOutcome::UserLimit);
        }
        let op = &self.scripts.register;
        let reply: Vec<String> = self
            .eval(
                op,
                &self.session_base(&new.session_id),
                (
                    self.window_ms(),
                    new.session_id.as_str(),
                    new.connection_id.to_string(),
                    new.user_id.as_str(),
                    new.protocol.as_str(),
                    new.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    new.user_agent
                        .as_ref()
                        .map(UserAgent::as_str)
                        .unwrap_or_default(),
                    limits.per_session,
                ),
            )
            .await?;
        let outcome = match reply.first().map(String::as_str) {
            Some(kind @ ("created" | "replayed")) => {
                let registered = self.parse_registered(op, &new.session_id, &reply[1..])?;
                if kind == "created" {
                    RegisterOutcome::Created(registered)
                } else {
                    RegisterOutcome::Replayed(registered)
                }
            }
            Some("terminated") => RegisterOutcome::Terminated,
            Some("session_limit") => RegisterOutcome::SessionLimit,
            Some("conflict") => RegisterOutcome::Conflict,
            _ => return Err(bad_reply(op, &reply)),
        };
        if limits.per_user > 0
            && !matches!(
                outcome,
                RegisterOutcome::Created(_) | RegisterOutcome::Replayed(_)
            )
        {
            self.release_user_slots(&new.user_id, None, &[member])
                .await?;
        }
        Ok(outcome)
    }

    /// Takes a slot of the user's limit; false if the user is at its limit.
    async fn reserve_user_slot(&self, user: &UserId, member: &str, limit: u32) -> Result<bool> {
        let op = &self.scripts.reserve_user;
        let base = self.keys.user_base(user);
        let args = (user.as_str(), member, limit, millis(RESERVATION_GRACE));
        let reply: Vec<String> = self.eval(op, &base, args).await?;
        if reply.first().map(String::as_str) == Some("ok") {
            return Ok(true);
        }
        // At the limit: give back slots whose connection no longer exists
        // (its registration failed or crashed, or it ended and the release
        // was lost), then try once more.
        let mut stale = Vec::new();
        for candidate in reply.iter().skip(1) {
            if let Some((sid, cid)) = candidate.split_once('/') {
                let (Ok(sid), Ok(cid)) = (sid.parse::<SessionId>(), cid.parse::<ConnectionId>())
                else {
                    stale.push(candidate.clone());
                    continue;
                };
                if !self.connection_live(&sid, cid).await? {
                    stale.push(candidate.clone());
                }
            }
        }
        if stale.is_empty() {
            return Ok(false);
        }
        self.release_user_slots(user, Some(RESERVATION_GRACE), &stale)
            .await?;
        let reply: Vec<String> = self.eval(op, &base, args).await?;
        Ok(reply.first().map(String::as_str) == Some("ok"))
    }

    async fn release_user_slots(
        &self,
        user: &UserId,
        older_than: Option<Duration>,
        members: &[String],
    ) -> Result<()> {
        let age = older_than
            .map(|d| millis(d).to_string())
            .unwrap_or_default();
        let _: i64 = self
            .eval(
                &self.scripts.release_user,
                &self.keys.user_base(user),
                (user.as_str(), age, members),
            )
            .await?;
        Ok(())
    }

    /// Whether the connection is still live. A dead one's slot may go: it
    /// no longer counts as a connection, and the sweep's release is idempotent.
    async fn connection_live(&self, session: &SessionId, id: ConnectionId) -> Result<bool> {
        let live = self.list_connections(session).await?;
        Ok(live.iter().any(|c| c.connection_id == id))
    }

    /// Records a heartbeat; `None` once the connection is closed, swept or dead.
    pub async fn heartbeat(
        &self,
        session: &SessionId,
        id: ConnectionId,
    ) -> Result<Option<HeartbeatAck>> {
        let at: Option<i64> = self
            .eval(
                &self.scripts.heartbeat,
                &self.session_base(session),
                (self.window_ms(), session.as_str(), id.to_string()),
            )
            .await?;
        Ok(at.map(|ms| self.ack(ms)))
    }

    fn ack(&self, at_ms: i64) -> HeartbeatAck {
        HeartbeatAck {
            last_heartbeat: millis_to_utc(at_ms),
            expires_at: millis_to_utc(at_ms + self.window_ms()),
        }
    }

    /// Heartbeats for many connections: one script call per shard touched,
    /// all shards in parallel.
    pub async fn heartbeat_batch(
        &self,
        pairs: &[(SessionId, ConnectionId)],
    ) -> Result<BatchOutcome> {
        let mut by_shard: HashMap<ShardId, Vec<usize>> = HashMap::new();
        for (i, (sid, _)) in pairs.iter().enumerate() {
            by_shard.entry(self.keys.shard_of(sid)).or_default().push(i);
        }
        let calls = by_shard.into_iter().map(|(shard, idx)| async move {
            let mut args: Vec<String> = Vec::with_capacity(1 + 2 * idx.len());
            args.push(self.window_ms().to_string());
            for &i in &idx {
                args.push(pairs[i].0.as_str().to_owned());
                args.push(pairs[i].1.to_string());
            }
            let op = &self.scripts.heartbeat_batch;
            let reply: Vec<i64> = self.eval_on(op, shard, args).await?;
            // reply[0] is the time; the rest are 1-based positions within `idx`.
            let unknown = reply
                .iter()
                .skip(1)
                .map(|&n| {
                    usize::try_from(n - 1)
                        .ok()
                        .and_then(|k| idx.get(k).copied())
                        .ok_or_else(|| bad_reply(op, &reply))
                })
                .collect::<Result<Vec<usize>>>()?;
            Ok::<_, Error>((idx.len(), unknown))
        });
        let mut outcome = BatchOutcome::default();
        let mut unknown_idx = Vec::new();
        for (sent, unknown) in try_join_all(calls).await? {
            outcome.alive += (sent - unknown.len()) as u64;
            unknown_idx.extend(unknown);
        }
        unknown_idx.sort_unstable();
        outcome.unknown = unknown_idx.into_iter().map(|i| pairs[i].clone()).collect();
        Ok(outcome)
    }

    /// Closes a connection; its history record goes to the outbox. `None` if
    /// the session has no such connection. A connection that was already dead
    /// is archived as expired and reported as `Some(Expired)`.
    pub async fn close(&self, session: &SessionId, id: ConnectionId) -> Result<Option<EndReason>> {
        let op = &self.scripts.close;
        let reply: Vec<String> = self
            .eval(
                op,
                &self.session_base(session),
                (self.window_ms(), session.as_str(), id.to_string()),
            )
            .await?;
        let [reason, user] = reply.as_slice() else {
            return if reply.is_empty() {
                Ok(None)
            } else {
                Err(bad_reply(op, &reply))
            };
        };
        let reason: EndReason = reason.parse().map_err(|_| bad_reply(op, &reply))?;
        if let Ok(user) = user.parse::<UserId>() {
            self.release_after_end(&[(&user, session, id)]).await;
        }
        Ok(Some(reason))
    }

    /// Gives back the user slots of ended connections: one call per user, all
    /// users at once. Best effort: a slot left behind only over-counts, and the
    /// next registration that finds the user at its limit verifies and
    /// releases it.
    async fn release_after_end(&self, ended: &[(&UserId, &SessionId, ConnectionId)]) {
        let mut by_user: HashMap<&UserId, Vec<String>> = HashMap::new();
        for (user, session, id) in ended {
            by_user
                .entry(user)
                .or_default()
                .push(format!("{session}/{id}"));
        }
        let calls = by_user.into_iter().map(|(user, members)| async move {
            if let Err(e) = self.release_user_slots(user, None, &members).await {
                tracing::warn!(error = %e, user_id = %user, slots = members.len(),
                    "could not release user connection slots; they will be verified later");
            }
        });
        join_all(calls).await;
    }

    /// One live connection by id. The id alone does not say which shard holds
    /// it, so every shard is asked at once (a rare, administrative lookup).
    pub async fn get_connection(&self, id: ConnectionId) -> Result<Option<ConnectionView>> {
        let op = &self.scripts.get_connection;
        let id_s = id.to_string();
        let calls = self.keys.shards().map(|shard| {
            let base = self.keys.shard_base(shard);
            let id_s = id_s.clone();
            async move {
                self.eval::<Vec<String>, _>(op, &base, (self.window_ms(), id_s))
                    .await
            }
        });
        let mut first_error = None;
        for reply in join_all(calls).await {
            match reply {
                Ok(fields) if !fields.is_empty() => {
                    return self.parse_connection(op, &fields).map(Some)
                }
                Ok(_) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        first_error.map_or(Ok(None), Err)
    }

    /// Runs a script whose ARGV are the window and the session id.
    async fn eval_session<T: FromRedisValue>(&self, op: &Op, session: &SessionId) -> Result<T> {
        let args = (self.window_ms(), session.as_str());
        self.eval(op, &self.session_base(session), args).await
    }

    /// The live connections of a session.
    pub async fn list_connections(&self, session: &SessionId) -> Result<Vec<ConnectionView>> {
        let op = &self.scripts.list_connections;
        let reply: Vec<String> = self.eval_session(op, session).await?;
        if reply.len() % CONN_FIELDS != 0 {
            return Err(bad_reply(op, &reply));
        }
        reply
            .chunks(CONN_FIELDS)
            .map(|f| self.parse_connection(op, f))
            .collect()
    }

    /// A session's state and counters; `None` if the tracker knows nothing of it.
    pub async fn session(&self, session: &SessionId) -> Result<Option<SessionView>> {
        let op = &self.scripts.session_view;
        let reply: Vec<String> = self.eval_session(op, session).await?;
        parse_view(op, session, &reply)
    }

    /// Totals from the maintained counters of every shard; never scans.
    pub async fn stats(&self) -> Result<Stats> {
        let op = &self.scripts.stats;
        let calls = self
            .keys
            .shards()
            .map(|shard| self.eval_on::<Vec<String>, _>(op, shard, NO_ARGS));
        let mut stats = Stats {
            total_connections: 0,
            sessions_with_connections: 0,
            connections_by_protocol: Protocol::ALL.into_iter().map(|p| (p, 0)).collect(),
            sessions_by_state: SessionState::ALL.into_iter().map(|s| (s, 0)).collect(),
            shared_sessions: 0,
            heartbeat_window_seconds: self.window.as_secs(),
        };
        for reply in try_join_all(calls).await? {
            for pair in reply.chunks(2) {
                let [name, value] = pair else {
                    return Err(bad_reply(op, &reply));
                };
                // Counters only go below zero through a bug; report 0 rather than wrap.
                let value = u64::try_from(value.parse::<i64>().map_err(|_| bad_reply(op, &reply))?)
                    .unwrap_or(0);
                match name.split_once(':') {
                    None if name == "conns" => stats.total_connections += value,
                    None if name == "sessions" => stats.sessions_with_connections += value,
                    None if name == "shared" => stats.shared_sessions += value,
                    Some(("proto", p)) => {
                        if let Ok(p) = p.parse::<Protocol>() {
                            *stats.connections_by_protocol.entry(p).or_default() += value;
                        }
                    }
                    Some(("state", s)) => {
                        if let Ok(s) = s.parse::<SessionState>() {
                            *stats.sessions_by_state.entry(s).or_default() += value;
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(stats)
    }

    /// Expires up to `max` dead connections of one shard and queues their
    /// history. Call again while [`Sweep::more`] is set.
    pub async fn sweep_shard(&self, shard: ShardId, max: u32) -> Result<Sweep> {
        let op = &self.scripts.sweep;
        let reply: Vec<String> = self
            .eval_on(op, shard, (self.window_ms(), max.max(1)))
            .await?;
        let Some((more, triples)) = reply.split_first() else {
            return Err(bad_reply(op, &reply));
        };
        if triples.len() % 3 != 0 {
            return Err(bad_reply(op, &reply));
        }
        let mut expired = Vec::with_capacity(triples.len() / 3);
        for t in triples.chunks(3) {
            let parsed = (t[0].parse(), t[1].parse(), t[2].parse());
            let (Ok(session_id), Ok(connection_id), Ok(user_id)) = parsed else {
                return Err(bad_reply(op, &reply));
            };
            expired.push(Expired {
                session_id,
                connection_id,
                user_id,
            });
        }
        let ended: Vec<_> = expired
            .iter()
            .map(|e| (&e.user_id, &e.session_id, e.connection_id))
            .collect();
        self.release_after_end(&ended).await;
        Ok(Sweep {
            expired,
            more: more == "1",
        })
    }

    /// Sessions of one shard whose idle timeout is reached (or whose claim
    /// lapsed), at most `max`, most overdue first.
    pub async fn due_sessions(&self, shard: ShardId, max: u32) -> Result<Vec<SessionId>> {
        let op = &self.scripts.due_sessions;
        let reply: Vec<String> = self.eval_on(op, shard, max).await?;
        reply
            .iter()
            .map(|s| s.parse().map_err(|_| bad_reply(op, &reply)))
            .collect()
    }

    /// Moves an idle, due session to `hibernating` if it still is idle and due.
    /// The claim lapses after `lifetime` if neither finished nor rolled back.
    pub async fn claim_hibernation(
        &self,
        session: &SessionId,
        lifetime: Duration,
    ) -> Result<ClaimOutcome> {
        let op = &self.scripts.claim_hibernation;
        let reply: Vec<String> = self
            .eval(
                op,
                &self.session_base(session),
                (session.as_str(), millis(lifetime)),
            )
            .await?;
        match reply.as_slice() {
            [kind, generation] if kind == "claimed" => Ok(ClaimOutcome::Claimed {
                generation: generation.parse().ok(),
            }),
            [kind, reason] if kind == "refused" => Ok(ClaimOutcome::Refused(refusal(reason))),
            _ => Err(bad_reply(op, &reply)),
        }
    }

    /// The hibernation patch landed (with the resource's new generation).
    pub async fn finish_hibernation(
        &self,
        session: &SessionId,
        generation: Option<i64>,
    ) -> Result<bool> {
        let gen = generation.map(|g| g.to_string()).unwrap_or_default();
        let n: i64 = self
            .eval(
                &self.scripts.finish_hibernation,
                &self.session_base(session),
                (session.as_str(), gen),
            )
            .await?;
        Ok(n == 1)
    }

    /// The hibernation patch failed: release the claim; retry after `retry_after`.
    pub async fn rollback_hibernation(
        &self,
        session: &SessionId,
        retry_after: Duration,
    ) -> Result<bool> {
        let n: i64 = self
            .eval(
                &self.scripts.rollback_hibernation,
                &self.session_base(session),
                (session.as_str(), millis(retry_after)),
            )
            .await?;
        Ok(n == 1)
    }

    /// Pending wakes of one shard, oldest first.
    pub async fn pending_wakes(&self, shard: ShardId, max: u32) -> Result<Vec<PendingWake>> {
        let op = &self.scripts.pending_wakes;
        let reply: Vec<String> = self.eval_on(op, shard, max).await?;
        reply
            .chunks(2)
            .map(|p| match p {
                [sid, at] => Ok(PendingWake {
                    session_id: sid.parse().map_err(|_| bad_reply(op, &reply))?,
                    requested_at: millis_to_utc(parse_ms(at).ok_or_else(|| bad_reply(op, &reply))?),
                }),
                _ => Err(bad_reply(op, &reply)),
            })
            .collect()
    }

    /// The wake patch landed: the wake is no longer pending.
    pub async fn ack_wake(&self, session: &SessionId, generation: Option<i64>) -> Result<bool> {
        let gen = generation.map(|g| g.to_string()).unwrap_or_default();
        let n: i64 = self
            .eval(
                &self.scripts.ack_wake,
                &self.session_base(session),
                (session.as_str(), gen),
            )
            .await?;
        Ok(n == 1)
    }

    /// Records what a Session resource says; false if a newer generation is stored.
    pub async fn mirror_session(&self, meta: &SessionMeta) -> Result<bool> {
        let ito = match meta.idle_timeout {
            IdleTimeout::Off => "off".to_owned(),
            IdleTimeout::After(d) => millis(d).to_string(),
        };
        let n: i64 = self
            .eval(
                &self.scripts.mirror_session,
                &self.session_base(&meta.session_id),
                (
                    meta.session_id.as_str(),
                    meta.owner.as_deref().unwrap_or_default(),
                    meta.state.as_str(),
                    ito,
                    meta.generation.map(|g| g.to_string()).unwrap_or_default(),
                ),
            )
            .await?;
        Ok(n == 1)
    }

    /// The Session resource is gone.
    pub async fn forget_session(&self, session: &SessionId) -> Result<bool> {
        let n: i64 = self
            .eval(
                &self.scripts.forget_session,
                &self.session_base(session),
                session.as_str(),
            )
            .await?;
        Ok(n == 1)
    }

    /// Sessions of one shard that are mirrored from a resource.
    pub async fn known_sessions(&self, shard: ShardId) -> Result<Vec<SessionId>> {
        let op = &self.scripts.known_sessions;
        let reply: Vec<String> = self.eval_on(op, shard, NO_ARGS).await?;
        reply
            .iter()
            .map(|s| s.parse().map_err(|_| bad_reply(op, &reply)))
            .collect()
    }

    /// The oldest finished connections of one shard awaiting the archiver;
    /// fails on an entry that is not a history record.
    pub async fn outbox_read(&self, shard: ShardId, max: u32) -> Result<Vec<OutboxEntry>> {
        let read = self.outbox_read_all(shard, max).await?;
        if let Some(bad) = read.malformed.first() {
            return Err(Error::Reply {
                script: self.scripts.outbox_read.name,
                detail: format!("malformed outbox entry {} (field {})", bad.id, bad.field),
            });
        }
        Ok(read.entries)
    }

    /// Like [`Store::outbox_read`], but an entry that is not a history record
    /// comes back as a [`MalformedEntry`] instead of failing the read, so one
    /// bad entry cannot stop its shard's archive.
    pub async fn outbox_read_all(&self, shard: ShardId, max: u32) -> Result<OutboxRead> {
        // Bytes, not strings: a value that is not UTF-8 must not fail the whole read.
        let reply: Vec<(String, Vec<Vec<u8>>)> =
            self.eval_on(&self.scripts.outbox_read, shard, max).await?;
        let mut read = OutboxRead::default();
        for (id, raw) in reply {
            let mut fields = Vec::with_capacity(raw.len() / 2);
            let mut not_utf8 = None;
            for pair in raw.chunks_exact(2) {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let (k, v) = (text(&pair[0]), text(&pair[1]));
                if std::str::from_utf8(&pair[1]).is_err() {
                    not_utf8.get_or_insert_with(|| history_field(&k));
                }
                fields.push((k, v));
            }
            match not_utf8.map_or_else(|| parse_history(&fields), Err) {
                Ok(record) => read.entries.push(OutboxEntry { id, record }),
                Err(field) => read.malformed.push(MalformedEntry { id, fields, field }),
            }
        }
        Ok(read)
    }

    /// Drops archived entries (after the commit); returns the shard's backlog left.
    pub async fn outbox_ack(&self, shard: ShardId, ids: &[String]) -> Result<u64> {
        let (_, left): (i64, u64) = self.eval_on(&self.scripts.outbox_ack, shard, ids).await?;
        Ok(left)
    }

    /// Finished connections not yet archived, over all shards.
    pub async fn outbox_backlog(&self) -> Result<u64> {
        let op = &self.scripts.outbox_len;
        let calls = self
            .keys
            .shards()
            .map(|shard| self.eval_on::<u64, _>(op, shard, NO_ARGS));
        Ok(try_join_all(calls).await?.into_iter().sum())
    }

    /// The shard's epoch marker, created if missing. A marker that differs
    /// from the one seen before means the shard lost its data.
    pub async fn shard_epoch(&self, shard: ShardId) -> Result<Epoch> {
        let op = &self.scripts.epoch;
        let fresh = uuid::Uuid::new_v4().to_string();
        let (marker, created): (String, i64) = self.eval_on(op, shard, fresh).await?;
        Ok(Epoch {
            marker,
            created: created == 1,
        })
    }

    /// Takes or renews the named leader lock for `lease`; false if another
    /// holder has it.
    pub async fn lock_acquire(&self, name: &str, token: &str, lease: Duration) -> Result<bool> {
        self.eval_plain(
            &self.scripts.lock_acquire,
            &self.keys.lock_key(name),
            (token, millis(lease)),
        )
        .await
        .map(|n: i64| n == 1)
    }

    /// Gives the lock up if we hold it.
    pub async fn lock_release(&self, name: &str, token: &str) -> Result<bool> {
        self.eval_plain(&self.scripts.lock_release, &self.keys.lock_key(name), token)
            .await
            .map(|n: i64| n == 1)
    }

    async fn eval_plain<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        key: &str,
        args: A,
    ) -> Result<T> {
        let mut inv = op.script.key(key);
        inv.arg(args);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout(self.timeout)),
        }
    }

    fn parse_registered(&self, op: &Op, session: &SessionId, f: &[String]) -> Result<Registered> {
        if f.len() != CONN_FIELDS + VIEW_FIELDS {
            return Err(bad_reply(op, f));
        }
        let connection = self.parse_connection(op, &f[..CONN_FIELDS])?;
        let session =
            parse_view(op, session, &f[CONN_FIELDS..])?.ok_or_else(|| bad_reply(op, f))?;
        Ok(Registered {
            connection,
            session,
        })
    }

    fn parse_connection(&self, op: &Op, f: &[String]) -> Result<ConnectionView> {
        let bad = || bad_reply(op, f);
        let [cid, sid, uid, proto, ip, ua, connected, hb] = f else {
            return Err(bad());
        };
        let hb = parse_ms(hb).ok_or_else(bad)?;
        Ok(ConnectionView {
            connection_id: cid.parse().map_err(|_| bad())?,
            session_id: sid.parse().map_err(|_| bad())?,
            user_id: uid.parse().map_err(|_| bad())?,
            protocol: proto.parse().map_err(|_| bad())?,
            client_ip: non_empty(ip)
                .map(str::parse)
                .transpose()
                .map_err(|_| bad())?,
            user_agent: non_empty(ua).map(UserAgent::truncated),
            connected_at: millis_to_utc(parse_ms(connected).ok_or_else(bad)?),
            last_heartbeat: millis_to_utc(hb),
            expires_at: millis_to_utc(hb + self.window_ms()),
        })
    }
}

const CONN_FIELDS: usize = 8;
const NO_ARGS: &[&str] = &[];
const VIEW_FIELDS: usize = 10;

fn parse_view(op: &Op, session: &SessionId, f: &[String]) -> Result<Option<SessionView>> {
    let bad = || bad_reply(op, f);
    let [exists, state, owner, live, users, lc, ld, idle, ito, due] = f else {
        return Err(bad());
    };
    if exists != "1" {
        return Ok(None);
    }
    let time = |s: &String| {
        non_empty(s)
            .map(|s| parse_ms(s).map(millis_to_utc).ok_or_else(bad))
            .transpose()
    };
    Ok(Some(SessionView {
        session_id: session.clone(),
        state: state.parse().map_err(|_| bad())?,
        owner: non_empty(owner).map(str::to_owned),
        active_connections: live.parse().map_err(|_| bad())?,
        distinct_users: users.parse().map_err(|_| bad())?,
        last_connection_at: time(lc)?,
        last_disconnect_at: time(ld)?,
        idle_since: time(idle)?,
        idle_timeout_seconds: non_empty(ito)
            .map(|s| parse_ms(s).map(|ms| (ms / 1000) as u64).ok_or_else(bad))
            .transpose()?,
        hibernates_at: time(due)?,
    }))
}

/// The fields of an outbox entry, as `finish_conn` in common.lua writes them.
const HISTORY_FIELDS: [&str; 10] = ["c", "s", "u", "p", "ip", "ua", "ca", "da", "hb", "r"];

/// A field name as a `'static` string for [`MalformedEntry::field`].
fn history_field(name: &str) -> &'static str {
    HISTORY_FIELDS
        .iter()
        .find(|f| **f == name)
        .copied()
        .unwrap_or("(unknown field)")
}

/// A history record from an outbox entry's fields, or the first field that
/// is missing or does not parse.
fn parse_history(fields: &[(String, String)]) -> Result<HistoryRecord, &'static str> {
    let map: HashMap<&str, &str> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    fn field<T: std::str::FromStr>(
        map: &HashMap<&str, &str>,
        name: &'static str,
    ) -> Result<T, &'static str> {
        map.get(name).and_then(|s| s.parse().ok()).ok_or(name)
    }
    let time = |name: &'static str| {
        map.get(name)
            .and_then(|s| parse_ms(s))
            .map(millis_to_utc)
            .ok_or(name)
    };
    Ok(HistoryRecord {
        connection_id: field(&map, "c")?,
        session_id: field(&map, "s")?,
        user_id: field(&map, "u")?,
        protocol: field(&map, "p")?,
        client_ip: map
            .get("ip")
            .copied()
            .and_then(non_empty)
            .map(str::parse)
            .transpose()
            .map_err(|_| "ip")?,
        user_agent: map
            .get("ua")
            .copied()
            .and_then(non_empty)
            .map(UserAgent::truncated),
        connected_at: time("ca")?,
        disconnected_at: time("da")?,
        last_heartbeat_at: time("hb")?,
        end_reason: field(&map, "r")?,
    })
}

/// Milliseconds as Redis prints them: integers, or doubles for sorted-set scores.
fn parse_ms(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| {
        s.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f as i64)
    })
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn refusal(reason: &str) -> &'static str {
    match reason {
        "not_mirrored" => "not_mirrored",
        "not_running" => "not_running",
        "busy" => "busy",
        "connected" => "connected",
        "exempt" => "exempt",
        "not_due" => "not_due",
        _ => "other",
    }
}

fn bad_reply(op: &Op, reply: &[impl std::fmt::Debug]) -> Error {
    Error::Reply {
        script: op.name,
        detail: format!("{reply:?}"),
    }
}

//! The store: every read and write of the shared state, one script call each.
//!
//! [`Store`] is cheap to clone (one multiplexed connection underneath) and
//! works the same over a standalone Redis and a Redis Cluster: each call
//! declares every key its script touches (names from [`crate::keys`]), so the
//! cluster client routes it to the node owning that slot, and a slot being
//! migrated redirects or delays the call instead of splitting a shard. Every
//! call has a timeout.
//!
//! - [`types`]: settings and the outcome of each operation;
//! - `reply`: turning script replies into those values.

mod coalesce;
mod ended;
mod reply;
mod signals;
mod tickets;
mod types;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, ToRedisArgs, Value};

use crate::domain::{
    millis_to_utc, ConnectionId, ConnectionView, EndReason, HistoryRecord, Protocol, SessionId,
    SessionState, SessionView, UserAgent, UserId,
};
use crate::error::{Error, Result};
use crate::keys::{KeySpace, ShardId, ShardKey};
use crate::scripts::{Op, Scripts};
use coalesce::{Beat, Heartbeat, Refusal};
use reply::{bad_reply, flag, parse_ms, CONN_FIELDS, VIEW_FIELDS};
pub use signals::{Signal, SignalListener, WakeListener};
use types::millis;
pub use types::*;

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

/// A cluster connection that is replaced when it stops answering.
///
/// The cluster client multiplexes every call over one connection per node
/// and follows redirections itself. After a slot migration under load it has
/// been seen to stop answering altogether (every call timing out, while a new
/// connection works at once), so a run of timeouts makes a fresh one.
struct ClusterConn {
    client: redis::cluster::ClusterClient,
    current: std::sync::RwLock<ClusterConnection>,
    connect_timeout: Duration,
    timeouts_in_a_row: std::sync::atomic::AtomicU32,
    replacing: std::sync::atomic::AtomicBool,
}

/// Timeouts in a row after which a cluster connection is replaced.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

impl ClusterConn {
    fn get(&self) -> ClusterConnection {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counts a call's outcome; a run of timeouts replaces the connection in
    /// the background (one replacement at a time).
    fn observe<T>(self: &std::sync::Arc<Self>, result: &Result<T>) {
        use std::sync::atomic::Ordering;
        let timed_out = match result {
            Err(Error::Timeout(_)) => true,
            Err(Error::Redis(e)) => e.is_timeout(),
            _ => false,
        };
        if !timed_out {
            self.timeouts_in_a_row.store(0, Ordering::Relaxed);
            return;
        }
        let n = self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n < TIMEOUTS_BEFORE_RECONNECT || self.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let fresh =
                tokio::time::timeout(this.connect_timeout, this.client.get_async_connection())
                    .await;
            match fresh {
                Ok(Ok(conn)) => {
                    *this
                        .current
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = conn;
                    this.timeouts_in_a_row.store(0, Ordering::Relaxed);
                    tracing::warn!("redis cluster connection stopped answering; replaced");
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "replacing the redis cluster connection failed")
                }
                Err(_) => tracing::warn!("replacing the redis cluster connection timed out"),
            }
            this.replacing.store(false, Ordering::Release);
        });
    }
}

/// Where calls go: one connection to Redis, standalone or cluster.
#[derive(Clone)]
enum Backend {
    Standalone(ConnectionManager),
    Cluster(std::sync::Arc<ClusterConn>),
}

impl Backend {
    fn conn(&self) -> Conn {
        match self {
            Backend::Standalone(c) => Conn::Standalone(c.clone()),
            Backend::Cluster(c) => Conn::Cluster(c.get()),
        }
    }

    fn observe<T>(&self, result: &Result<T>) {
        if let Backend::Cluster(c) = self {
            c.observe(result);
        }
    }
}

/// How old a user-slot reservation must be before a registration that found
/// the user at its limit may check whether it is stale. Longer than any
/// registration takes (its calls time out far sooner), so a reservation whose
/// registration is still in flight is never taken for stale.
const RESERVATION_GRACE: Duration = Duration::from_secs(30);

/// How long a claimed connection id stays taken when no registration follows
/// (the registration failed, or its caller died before recording it).
const UNREGISTERED_ID_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often a term is drawn again when a shard has seen a newer one (the
/// sequence lost its data, or another leader started meanwhile).
const TERM_ATTEMPTS: usize = 5;

/// What the connection-id index says about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdClaim {
    /// Taken by this call.
    New,
    /// Taken before by this session and user, but no registration recorded.
    Claimed,
    /// Registered before by this session and user.
    Registered,
    /// Another session or user owns it.
    Conflict,
}

/// The shared state of all connections and sessions.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    keys: std::sync::Arc<KeySpace>,
    scripts: std::sync::Arc<Scripts>,
    window: Duration,
    timeout: Duration,
    ended_ids: ended::EndedIds,
    warn_before: Duration,
    clock: ClockOffset,
    heartbeats: std::sync::Arc<coalesce::Coalescer>,
    blocking: std::sync::Arc<signals::BlockingClient>,
    connect_timeout: Duration,
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
        let blocking;
        let backend = match cfg.mode {
            RedisMode::Standalone => {
                let [url] = cfg.urls.as_slice() else {
                    return Err(Error::Config(
                        "standalone mode takes exactly one redis URL".into(),
                    ));
                };
                blocking = signals::BlockingClient::standalone(url)?;
                let client = redis::Client::open(url.as_str())?;
                let manager_cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(cfg.connect_timeout))
                    .set_response_timeout(Some(cfg.command_timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                Backend::Standalone(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_cfg,
                )?)
            }
            RedisMode::Cluster => {
                if cfg.urls.is_empty() {
                    return Err(Error::Config("cluster mode needs seed node URLs".into()));
                }
                blocking = signals::BlockingClient::cluster(&cfg.urls, cfg.connect_timeout)?;
                // Retries cover redirections and TRYAGAIN while a slot migrates
                // (scripts then wait until the slot's keys are on one node); the
                // command timeout still bounds the whole call.
                let client = redis::cluster::ClusterClient::builder(cfg.urls.clone())
                    .connection_timeout(cfg.connect_timeout)
                    .response_timeout(cfg.command_timeout)
                    .retries(8)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()?;
                let connect = client.get_async_connection();
                let conn = match tokio::time::timeout(cfg.connect_timeout, connect).await {
                    Ok(conn) => conn?,
                    Err(_) => return Err(Error::Timeout(cfg.connect_timeout)),
                };
                Backend::Cluster(std::sync::Arc::new(ClusterConn {
                    client,
                    current: std::sync::RwLock::new(conn),
                    connect_timeout: cfg.connect_timeout,
                    timeouts_in_a_row: std::sync::atomic::AtomicU32::new(0),
                    replacing: std::sync::atomic::AtomicBool::new(false),
                }))
            }
        };
        // A script's keys share a slot on a cluster: heartbeats coalesce per shard there.
        let heartbeat_groups = match backend {
            Backend::Standalone(_) => 1,
            Backend::Cluster(_) => usize::from(keys.shard_count()),
        };
        Ok(Self {
            heartbeats: std::sync::Arc::new(coalesce::Coalescer::new(heartbeat_groups)),
            blocking: std::sync::Arc::new(blocking),
            connect_timeout: cfg.connect_timeout,
            backend,
            keys: std::sync::Arc::new(keys),
            scripts: std::sync::Arc::new(Scripts::load()),
            window: cfg.heartbeat_window,
            timeout: cfg.command_timeout,
            ended_ids: ended::EndedIds::new(cfg.ended_id_retention),
            warn_before: cfg.warn_before,
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
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }

    /// One command, within the timeout.
    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut conn = self.backend.conn();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    /// Runs a script with its declared keys; `ARGV[1]` is always the clock offset.
    async fn eval<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        keys: &[String],
        args: A,
    ) -> Result<T> {
        let mut inv = op.script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        inv.arg(self.clock.millis()).arg(args);
        let mut conn = self.backend.conn();
        self.bounded(inv.invoke_async(&mut conn)).await
    }

    /// Every call goes through here: bounded by the command timeout, and
    /// observed (a run of timeouts replaces a cluster connection).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let result = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::Timeout(self.timeout)),
        };
        self.backend.observe(&result);
        result
    }

    /// A script on one shard-wide key.
    async fn eval_shard_key<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        shard: ShardId,
        key: ShardKey,
        args: A,
    ) -> Result<T> {
        self.eval(op, &[self.keys.shard_key(shard, key)], args)
            .await
    }

    /// The keys a one-session shard script declares: the shard's, then the session's.
    fn session_script_keys(&self, session: &SessionId) -> Vec<String> {
        let mut keys = self.keys.shard_keys(self.keys.shard_of(session));
        keys.extend(self.keys.session_keys(session));
        keys
    }

    /// Runs a one-session shard script; `ARGV[2..3]` are the window and the session id.
    async fn eval_session<T: FromRedisValue, A: ToRedisArgs>(
        &self,
        op: &Op,
        session: &SessionId,
        args: A,
    ) -> Result<T> {
        let keys = self.session_script_keys(session);
        self.eval(op, &keys, (self.window_ms(), session.as_str(), args))
            .await
    }

    fn window_ms(&self) -> i64 {
        millis(self.window)
    }

    /// Registers a connection, enforcing the limits and the rule that a
    /// connection id names one connection for ever. The id is taken first in
    /// its own index entry; the per-session limit is checked in the
    /// registering script; the per-user limit, whose connections span
    /// shards, by a reservation in the user's own slot, given back if the
    /// registration does not happen.
    pub async fn register(&self, new: &NewConnection, limits: Limits) -> Result<RegisterOutcome> {
        self.register_as(new, limits, None).await
    }

    /// [`Self::register`] for a caller who must own the session (a plain
    /// user): the owner is checked in the call that registers, so a Session
    /// created again for someone else since the caller's own check is
    /// refused, not joined.
    pub async fn register_as(
        &self,
        new: &NewConnection,
        limits: Limits,
        owner: Option<&UserId>,
    ) -> Result<RegisterOutcome> {
        let claim = self.claim_id(new).await?;
        if claim == IdClaim::Conflict {
            return Ok(RegisterOutcome::Conflict);
        }
        let member = slot_member(&new.session_id, new.connection_id);
        if limits.per_user > 0
            && !self
                .reserve_user_slot(&new.user_id, &member, limits.per_user)
                .await?
        {
            return Ok(RegisterOutcome::UserLimit);
        }
        let op = &self.scripts.register;
        let seen_before = if claim == IdClaim::Registered {
            "1"
        } else {
            "0"
        };
        let reply: Vec<String> = self
            .eval_session(
                op,
                &new.session_id,
                (
                    new.connection_id.to_string(),
                    new.user_id.as_str(),
                    new.protocol.as_str(),
                    new.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                    new.user_agent
                        .as_ref()
                        .map(UserAgent::as_str)
                        .unwrap_or_default(),
                    limits.per_session,
                    seen_before,
                    owner.map(UserId::as_str).unwrap_or_default(),
                ),
            )
            .await?;
        let outcome = match reply.first().map(String::as_str) {
            Some(kind @ ("created" | "replayed")) => {
                let registered = self.registered(op, &new.session_id, &reply[1..])?;
                if kind == "created" {
                    RegisterOutcome::Created(registered)
                } else {
                    RegisterOutcome::Replayed(registered)
                }
            }
            Some("terminated") => RegisterOutcome::Terminated,
            Some("session_limit") => RegisterOutcome::SessionLimit,
            Some("conflict") => RegisterOutcome::Conflict,
            Some("no_owner") => RegisterOutcome::NotOwner(NotOwner::NoOwner),
            Some("other_owner") => RegisterOutcome::NotOwner(NotOwner::OtherOwner),
            _ => return Err(bad_reply(op, &reply)),
        };
        match &outcome {
            RegisterOutcome::Created(_) | RegisterOutcome::Replayed(_)
                if claim != IdClaim::Registered =>
            {
                // From now on only a replay of this live connection may use the
                // id. Should this fail, the caller's retry replays and marks it.
                self.mark_id(new).await?;
            }
            RegisterOutcome::Created(_) | RegisterOutcome::Replayed(_) => {}
            _ if limits.per_user > 0 => {
                self.release_user_slots(&new.user_id, None, &[member])
                    .await?;
            }
            _ => {}
        }
        Ok(outcome)
    }

    async fn claim_id(&self, new: &NewConnection) -> Result<IdClaim> {
        let op = &self.scripts.claim_id;
        let id = new.connection_id;
        let mut keys = self.id_keys(id).to_vec();
        let span = self.ended_ids.span_secs();
        keys.extend(
            self.ended_ids
                .periods_to_check(self.now_ms())
                .map(|period| self.keys.ended_ids_key(id, span, period)),
        );
        let args = (
            new.session_id.as_str(),
            new.user_id.as_str(),
            millis(UNREGISTERED_ID_TTL),
            id.to_string(),
            id.as_uuid().as_bytes().to_vec(),
        );
        let reply: String = self.eval(op, &keys, args).await?;
        match reply.as_str() {
            "new" => Ok(IdClaim::New),
            "claimed" => Ok(IdClaim::Claimed),
            "registered" => Ok(IdClaim::Registered),
            "conflict" => Ok(IdClaim::Conflict),
            _ => Err(bad_reply(op, &[reply])),
        }
    }

    async fn mark_id(&self, new: &NewConnection) -> Result<()> {
        let args = (
            new.session_id.as_str(),
            new.user_id.as_str(),
            new.connection_id.to_string(),
        );
        let keys = self.id_keys(new.connection_id);
        let _: i64 = self.eval(&self.scripts.mark_id, &keys, args).await?;
        Ok(())
    }

    /// An id's index keys, as the id scripts take them: its bucket, then
    /// its own entry.
    fn id_keys(&self, id: ConnectionId) -> [String; 2] {
        [self.keys.id_bucket_key(id), self.keys.id_key(id)]
    }

    /// Takes a slot of the user's limit; false if the user is at its limit.
    async fn reserve_user_slot(&self, user: &UserId, member: &str, limit: u32) -> Result<bool> {
        let op = &self.scripts.reserve_user;
        let keys = [self.keys.user_key(user)];
        let args = (member, limit, millis(RESERVATION_GRACE));
        let reply: Vec<String> = self.eval(op, &keys, args).await?;
        if reply.first().map(String::as_str) == Some("ok") {
            return Ok(true);
        }
        // At the limit: give back slots whose connection no longer exists
        // (its registration failed or crashed, or it ended and the release
        // was lost), then try once more.
        let mut stale = Vec::new();
        for candidate in reply.iter().skip(1) {
            let parsed = candidate.split_once('/').and_then(|(sid, cid)| {
                Some((
                    sid.parse::<SessionId>().ok()?,
                    cid.parse::<ConnectionId>().ok()?,
                ))
            });
            match parsed {
                Some((sid, cid)) if self.connection_live(&sid, cid).await? => {}
                _ => stale.push(candidate.clone()),
            }
        }
        if stale.is_empty() {
            return Ok(false);
        }
        self.release_user_slots(user, Some(RESERVATION_GRACE), &stale)
            .await?;
        let reply: Vec<String> = self.eval(op, &keys, args).await?;
        Ok(reply.first().map(String::as_str) == Some("ok"))
    }

    async fn release_user_slots(
        &self,
        user: &UserId,
        older_than: Option<Duration>,
        members: &[String],
    ) -> Result<()> {
        let ended: Vec<(&UserId, &str)> = members.iter().map(|m| (user, m.as_str())).collect();
        self.release_slots_of(&ended, older_than).await
    }

    /// Gives back user slots, one call per user shard touched, all at once.
    async fn release_slots_of(
        &self,
        ended: &[(&UserId, &str)],
        older_than: Option<Duration>,
    ) -> Result<()> {
        let age = older_than
            .map(|d| millis(d).to_string())
            .unwrap_or_default();
        let mut by_shard: HashMap<ShardId, (Vec<String>, Vec<String>)> = HashMap::new();
        for (user, member) in ended {
            let (keys, args) = by_shard.entry(self.keys.user_shard_of(user)).or_default();
            let key = self.keys.user_key(user);
            let index = match keys.iter().position(|k| *k == key) {
                Some(i) => i + 1,
                None => {
                    keys.push(key);
                    keys.len()
                }
            };
            args.push(index.to_string());
            args.push((*member).to_owned());
        }
        let op = &self.scripts.release_user;
        let calls = by_shard.into_values().map(|(keys, pairs)| {
            let age = age.clone();
            async move { self.eval::<i64, _>(op, &keys, (age, pairs)).await }
        });
        try_join_all(calls).await.map(drop)
    }

    /// Whether the connection is still live. A dead one's slot may go: it
    /// no longer counts as a connection, and the sweep's release is idempotent.
    async fn connection_live(&self, session: &SessionId, id: ConnectionId) -> Result<bool> {
        Ok(self.connection_on(session, id).await?.is_some())
    }

    /// Records a heartbeat; `None` once the connection is closed, swept or
    /// dead. Heartbeats arriving together share one script call (see
    /// `coalesce`).
    pub async fn heartbeat(
        &self,
        session: &SessionId,
        id: ConnectionId,
    ) -> Result<Option<HeartbeatAck>> {
        Ok(match self.heartbeat_as(session, id, None).await? {
            HeartbeatOutcome::Alive(ack) => Some(ack),
            _ => None,
        })
    }

    /// [`Self::heartbeat`] of a caller that must own the session (`owner`),
    /// checked in the same script call: a user's heartbeat costs no session
    /// view of its own.
    pub async fn heartbeat_as(
        &self,
        session: &SessionId,
        id: ConnectionId,
        owner: Option<&UserId>,
    ) -> Result<HeartbeatOutcome> {
        let group = match self.backend {
            Backend::Standalone(_) => 0,
            Backend::Cluster(_) => usize::from(self.keys.shard_of(session).0),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let pending = coalesce::Pending {
            beat: Heartbeat {
                key: self.keys.session_conns_key(session),
                id: id.to_string(),
                owner: owner.map(|user| {
                    let [_, _, meta] = self.keys.session_keys(session);
                    (meta, user.to_string())
                }),
            },
            reply,
        };
        if let Some(batch) = self.heartbeats.push(group, pending) {
            // Its own task: the call serves every queued caller, so it must
            // not stop when this caller gives up waiting.
            tokio::spawn(self.clone().send_heartbeats(group, batch));
        }
        let beat = answer.await.map_err(|_| Error::Reply {
            script: self.scripts.heartbeat_batch.name,
            detail: "the heartbeat call ended without an answer".into(),
        })??;
        Ok(match beat {
            Beat::Alive(ms) => HeartbeatOutcome::Alive(self.ack(ms)),
            Beat::Refused(Refusal::Unknown) => HeartbeatOutcome::Unknown,
            Beat::Refused(Refusal::NotOwner(why)) => HeartbeatOutcome::NotOwner(why),
        })
    }

    /// Sends queued heartbeats of one group until its queue is empty.
    async fn send_heartbeats(self, group: usize, mut batch: Vec<coalesce::Pending>) {
        loop {
            let call = batch.iter().map(|p| p.beat.clone()).collect();
            let result = self.heartbeat_call(call).await;
            // Refusals come by ascending position: one pass serves them all.
            let mut refused = match &result {
                Ok((_, refused)) => refused.as_slice(),
                Err(_) => &[],
            }
            .iter()
            .peekable();
            for (i, p) in batch.into_iter().enumerate() {
                let answer = match &result {
                    Ok((at, _)) => Ok(match refused.next_if(|&&(k, _)| k == i) {
                        Some(&(_, why)) => Beat::Refused(why),
                        None => Beat::Alive(*at),
                    }),
                    Err(e) => Err(e.clone()),
                };
                // A caller that gave up no longer listens: nothing to do.
                let _ = p.reply.send(answer);
            }
            match self.heartbeats.next(group) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

    /// One `heartbeat_batch` call (one slot on a cluster) over pairs of a
    /// connection set key and a connection id, each with the session's
    /// metadata key and the user who must own it, if one must: the heartbeat
    /// time in ms and the refused pairs, by position (0-based, ascending).
    async fn heartbeat_call(&self, pairs: Vec<Heartbeat>) -> Result<(i64, Vec<(usize, Refusal)>)> {
        let op = &self.scripts.heartbeat_batch;
        let n = pairs.len();
        // The script checks the pairs of one session together when they come
        // next to each other: sent sorted by key, answered by sent position.
        let mut pairs: Vec<(usize, Heartbeat)> = pairs.into_iter().enumerate().collect();
        pairs.sort_by(|(_, a), (_, b)| a.key.cmp(&b.key));
        let mut order = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut args = Vec::with_capacity(n);
        let mut owned = Vec::new();
        for (i, (k, beat)) in pairs.into_iter().enumerate() {
            order.push(k);
            keys.push(beat.key);
            args.push(beat.id);
            if let Some(owner) = beat.owner {
                owned.push((i, owner));
            }
        }
        for (i, (meta, user)) in owned {
            keys.push(meta);
            args.push((i + 1).to_string());
            args.push(user);
        }
        let reply: Vec<i64> = self.eval(op, &keys, (self.window_ms(), args)).await?;
        let Some((&at, refused)) = reply.split_first() else {
            return Err(bad_reply(op, &reply));
        };
        let mut refused = refused
            .iter()
            .map(|&r| {
                let why = match r % 4 {
                    1 => Refusal::Unknown,
                    2 => Refusal::NotOwner(NotOwner::NoOwner),
                    3 => Refusal::NotOwner(NotOwner::OtherOwner),
                    _ => return Err(bad_reply(op, &reply)),
                };
                usize::try_from(r / 4 - 1)
                    .ok()
                    .and_then(|sent| order.get(sent))
                    .map(|&k| (k, why))
                    .ok_or_else(|| bad_reply(op, &reply))
            })
            .collect::<Result<Vec<_>>>()?;
        refused.sort_unstable_by_key(|&(k, _)| k);
        Ok((at, refused))
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
        let calls = by_shard.into_values().map(|idx| async move {
            let call = idx
                .iter()
                .map(|&i| {
                    let (sid, id) = &pairs[i];
                    Heartbeat {
                        key: self.keys.session_conns_key(sid),
                        id: id.to_string(),
                        owner: None,
                    }
                })
                .collect();
            let (_, refused) = self.heartbeat_call(call).await?;
            // No pair needs an owner here: every refusal is an unknown one.
            let unknown: Vec<usize> = refused.into_iter().map(|(k, _)| idx[k]).collect();
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
        let reply: Vec<String> = self.eval_session(op, session, id.to_string()).await?;
        let [reason, user] = reply.as_slice() else {
            return if reply.is_empty() {
                Ok(None)
            } else {
                Err(bad_reply(op, &reply))
            };
        };
        let reason: EndReason = reason.parse().map_err(|_| bad_reply(op, &reply))?;
        if let Ok(user) = user.parse::<UserId>() {
            self.settle(&[(&user, session, id)]).await;
        }
        Ok(Some(reason))
    }

    /// After connections ended: gives their user slots back at once, so the
    /// user may connect again. Best effort here; the archiver settles every
    /// archived connection again ([`Store::settle_archived`]), so a crash in
    /// between leaks nothing.
    async fn settle(&self, ended: &[(&UserId, &SessionId, ConnectionId)]) {
        if let Err(e) = self.release_ended_slots(ended).await {
            tracing::debug!(error = %e, connections = ended.len(),
                "releasing user slots failed; the archiver releases them again");
        }
    }

    async fn release_ended_slots(
        &self,
        ended: &[(&UserId, &SessionId, ConnectionId)],
    ) -> Result<()> {
        let members: Vec<String> = ended.iter().map(|(_, s, id)| slot_member(s, *id)).collect();
        let slots: Vec<(&UserId, &str)> = ended
            .iter()
            .zip(&members)
            .map(|((u, _, _), m)| (*u, m.as_str()))
            .collect();
        self.release_slots_of(&slots, None).await
    }

    /// Settles archived connections: their user slots are given back and
    /// their ids start to expire. Only here: nothing waits for an id's
    /// expiry, so the close and the sweep leave it to the archiver.
    /// Idempotent; the archiver calls it for every batch before
    /// acknowledging it.
    pub async fn settle_archived(&self, records: &[HistoryRecord]) -> Result<()> {
        let ended: Vec<_> = records
            .iter()
            .map(|r| (&r.user_id, &r.session_id, r.connection_id))
            .collect();
        let ids: Vec<ConnectionId> = records.iter().map(|r| r.connection_id).collect();
        let (slots, retired) =
            tokio::join!(self.release_ended_slots(&ended), self.retire_ids(&ids));
        slots.and(retired)
    }

    async fn retire_ids(&self, ids: &[ConnectionId]) -> Result<()> {
        let mut by_shard: HashMap<ShardId, Vec<ConnectionId>> = HashMap::new();
        for &id in ids {
            by_shard
                .entry(self.keys.id_shard_of(id))
                .or_default()
                .push(id);
        }
        let op = &self.scripts.retire_ids;
        let period = self.ended_ids.period(self.now_ms());
        let expires_at = self.ended_ids.expires_at(period);
        let span = self.ended_ids.span_secs();
        let calls = by_shard.into_values().map(|ids| async move {
            let mut keys: Vec<String> = ids.iter().flat_map(|&id| self.id_keys(id)).collect();
            keys.push(self.keys.ended_ids_key(ids[0], span, period));
            let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let bytes: Vec<Vec<u8>> = ids
                .iter()
                .map(|id| id.as_uuid().as_bytes().to_vec())
                .collect();
            self.eval::<i64, _>(op, &keys, (expires_at, texts, bytes))
                .await
        });
        try_join_all(calls).await.map(drop)
    }

    /// Now in unix ms as the scripts see it (the clock offset included),
    /// give or take the clock difference with the Redis server, which the
    /// ended ids' periods allow for.
    fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis() + self.clock.millis()
    }

    /// One live connection by id: the id's index entry names its session.
    pub async fn get_connection(&self, id: ConnectionId) -> Result<Option<ConnectionView>> {
        let entry: Option<String> = self
            .eval(&self.scripts.id_entry, &self.id_keys(id), id.to_string())
            .await?;
        let Some(session) = entry.as_deref().and_then(id_entry_session) else {
            return Ok(None);
        };
        self.connection_on(&session, id).await
    }

    async fn connection_on(
        &self,
        session: &SessionId,
        id: ConnectionId,
    ) -> Result<Option<ConnectionView>> {
        let op = &self.scripts.get_connection;
        let reply: Vec<String> = self.eval_session(op, session, id.to_string()).await?;
        if reply.is_empty() {
            return Ok(None);
        }
        reply::connection(op, &reply, self.window_ms()).map(Some)
    }

    /// The live connections of a session.
    pub async fn list_connections(&self, session: &SessionId) -> Result<Vec<ConnectionView>> {
        let op = &self.scripts.list_connections;
        let reply: Vec<String> = self.eval_session(op, session, NO_ARGS).await?;
        if reply.len() % CONN_FIELDS != 0 {
            return Err(bad_reply(op, &reply));
        }
        reply
            .chunks(CONN_FIELDS)
            .map(|f| reply::connection(op, f, self.window_ms()))
            .collect()
    }

    /// A session's state and counters; `None` if the tracker knows nothing of it.
    pub async fn session(&self, session: &SessionId) -> Result<Option<SessionView>> {
        Ok(self.session_with_uid(session).await?.map(|(v, _)| v))
    }

    /// A session's view and the uid of the resource it mirrors, if any.
    pub async fn session_with_uid(
        &self,
        session: &SessionId,
    ) -> Result<Option<(SessionView, Option<String>)>> {
        let op = &self.scripts.session_view;
        let reply: Vec<String> = self.eval_session(op, session, NO_ARGS).await?;
        reply::view(op, session, &reply)
    }

    /// The facts behind a session's state, for an explanation, and the Redis
    /// clock's now; `None` if the tracker knows nothing of the session. One
    /// script call: the view, the mirrored settings, the shard's leader facts
    /// and the newest few live connections.
    pub async fn explain(
        &self,
        session: &SessionId,
    ) -> Result<Option<(crate::explain::Facts, chrono::DateTime<chrono::Utc>)>> {
        let op = &self.scripts.explain;
        let mut keys = self.session_script_keys(session);
        keys.push(
            self.keys
                .shard_key(self.keys.shard_of(session), ShardKey::LeaderFacts),
        );
        let reply: Vec<String> = self
            .eval(
                op,
                &keys,
                (self.window_ms(), session.as_str(), EXPLAIN_LIVE),
            )
            .await?;
        reply::explain_facts(op, session, &reply, self.window)
    }

    /// The leader's facts for one shard, for explanations: how long its
    /// guard still holds hibernations back, and whether it runs dry. They
    /// expire after `lifetime` unless written again.
    pub async fn publish_leader_facts(
        &self,
        shard: ShardId,
        term: Term,
        guard_left: Duration,
        dry_run: bool,
        lifetime: Duration,
    ) -> Result<Written> {
        let op = &self.scripts.leader_facts;
        let mut keys = self.keys.shard_keys(shard);
        keys.push(self.keys.shard_key(shard, ShardKey::LeaderFacts));
        let args = (
            term.0,
            millis(guard_left),
            if dry_run { "1" } else { "0" },
            millis(lifetime).max(1),
        );
        let n: i64 = self.eval(op, &keys, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// What [`Self::session_watch`] would say of the state and the warning,
    /// read far more cheaply (no shard keys, no counts): a watcher reads this
    /// every interval and the whole view only when it changed. `None` if the
    /// tracker knows nothing of the session.
    pub async fn session_state(
        &self,
        session: &SessionId,
    ) -> Result<Option<(SessionState, Option<DateTime<Utc>>)>> {
        let op = &self.scripts.session_state;
        let [c, _, m] = self.keys.session_keys(session);
        let reply: Vec<String> = self.eval(op, &[c, m], self.window_ms()).await?;
        match reply.as_slice() {
            [known] if known == "0" => Ok(None),
            [known, state, warning] if known == "1" => {
                let state = state.parse().map_err(|_| bad_reply(op, &reply))?;
                Ok(Some((state, reply::warning(op, &reply, warning)?)))
            }
            _ => Err(bad_reply(op, &reply)),
        }
    }

    /// A session's view, with the deadline its clients are to be warned of
    /// (a hibernation for max duration), for the API's session watchers.
    /// The deadline names the running period: a new period, a new deadline.
    pub async fn session_watch(
        &self,
        session: &SessionId,
    ) -> Result<Option<(SessionView, Option<DateTime<Utc>>)>> {
        let op = &self.scripts.session_view;
        let reply: Vec<String> = self.eval_session(op, session, "1").await?;
        let Some((warning, view)) = reply.split_last() else {
            return Err(bad_reply(op, &reply));
        };
        let warning = reply::warning(op, &reply, warning)?;
        Ok(reply::view(op, session, view)?.map(|(v, _)| (v, warning)))
    }

    /// Totals from the maintained counters of every shard; never scans.
    pub async fn stats(&self) -> Result<Stats> {
        let op = &self.scripts.stats;
        let calls = self.keys.shards().map(|shard| {
            self.eval_shard_key::<Vec<String>, _>(op, shard, ShardKey::Stats, NO_ARGS)
        });
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
    /// history. Call again while [`Sweep::more`] is set. Two calls: the
    /// candidates are read first, so the sweep can declare their keys.
    pub async fn sweep_shard(&self, shard: ShardId, max: u32) -> Result<Sweep> {
        let max = max.max(1);
        let candidates: Vec<String> = self
            .eval_shard_key(
                &self.scripts.sweep_candidates,
                shard,
                ShardKey::Live,
                (self.window_ms(), max),
            )
            .await?;
        if candidates.is_empty() {
            return Ok(Sweep::default());
        }
        let op = &self.scripts.sweep;
        let mut keys = self.keys.shard_keys(shard);
        for sid in &candidates {
            let sid: SessionId = sid.parse().map_err(|_| bad_reply(op, &candidates))?;
            keys.extend(self.keys.session_keys(&sid));
        }
        let reply: Vec<String> = self
            .eval(op, &keys, (self.window_ms(), max, &candidates))
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
        self.settle(&ended).await;
        Ok(Sweep {
            expired,
            // A full candidate list may have left sessions unread.
            more: reply::flag_text(more) || candidates.len() >= max as usize,
        })
    }

    /// Sessions of one shard whose idle timeout is reached (or whose claim
    /// lapsed), at most `max`, most overdue first.
    pub async fn due_sessions(&self, shard: ShardId, max: u32) -> Result<Vec<SessionId>> {
        let op = &self.scripts.due_sessions;
        let reply: Vec<String> = self.eval_shard_key(op, shard, ShardKey::Due, max).await?;
        reply
            .iter()
            .map(|s| s.parse().map_err(|_| bad_reply(op, &reply)))
            .collect()
    }

    /// Starts a leader's term: draws a term above every earlier one and
    /// fences every shard with it, so from now on no shard accepts a write of
    /// an older leader. Fails if a shard cannot be reached: a leader that has
    /// not fenced every shard must not act.
    pub async fn begin_term(&self) -> Result<Term> {
        let mut floor = 0u64;
        for _ in 0..TERM_ATTEMPTS {
            let term: u64 = self
                .eval(&self.scripts.term_next, &[self.keys.term_seq_key()], floor)
                .await?;
            let op = &self.scripts.term_begin;
            let calls = self
                .keys
                .shards()
                .map(|shard| self.eval_shard_key::<u64, _>(op, shard, ShardKey::Term, term));
            let newest = try_join_all(calls).await?.into_iter().max().unwrap_or(0);
            if newest < term {
                return Ok(Term(term));
            }
            // A shard saw this term or a newer one: another leader began
            // meanwhile, or the sequence lost its data. Go above it.
            floor = newest;
        }
        Err(Error::Config(format!(
            "no fresh leader term after {TERM_ATTEMPTS} attempts"
        )))
    }

    /// Moves a due session to `hibernating` if it still is due: idle past
    /// its idle timeout, or running past its max duration (then its
    /// connections end, as `max_duration`, in the same step). Before the
    /// max duration, records the clients' warning once per running period
    /// ([`ClaimOutcome::Warned`]). The claim lapses after `lifetime` if
    /// neither finished nor rolled back.
    pub async fn claim_hibernation(
        &self,
        session: &SessionId,
        lifetime: Duration,
        term: Term,
    ) -> Result<ClaimOutcome> {
        self.claim_hibernation_as(session, lifetime, term, false)
            .await
    }

    /// [`Store::claim_hibernation`]; with `dry_run`, a max duration claim
    /// ends no connection and a warning is recorded but not for clients.
    pub async fn claim_hibernation_as(
        &self,
        session: &SessionId,
        lifetime: Duration,
        term: Term,
        dry_run: bool,
    ) -> Result<ClaimOutcome> {
        self.claim(
            session,
            lifetime,
            term,
            dry_run,
            HibernationNotice::Silent,
            None,
        )
        .await
    }

    /// [`Store::claim_hibernation`] that announces on NATS (never a dry run:
    /// a dry run announces nothing): the `hibernation` as its notice says
    /// (with the claim on the docker platform: the claim then ends when NATS
    /// acknowledges it, see [`Store::claim_hibernation_announced`]; or once
    /// the patch is seen to land), and `warning` if the claim records the
    /// warning before a max duration. An event is queued by the script that
    /// makes the change it announces, so it is published exactly when the
    /// change is made.
    pub async fn claim_hibernation_announcing(
        &self,
        session: &SessionId,
        lifetime: Duration,
        term: Term,
        hibernation: HibernationNotice<'_>,
        warning: Option<&Announcement>,
    ) -> Result<ClaimOutcome> {
        self.claim(session, lifetime, term, false, hibernation, warning)
            .await
    }

    async fn claim(
        &self,
        session: &SessionId,
        lifetime: Duration,
        term: Term,
        dry_run: bool,
        hibernation: HibernationNotice<'_>,
        warning: Option<&Announcement>,
    ) -> Result<ClaimOutcome> {
        let op = &self.scripts.claim_hibernation;
        let (event, on_landing) = match hibernation {
            HibernationNotice::Silent => (None, false),
            HibernationNotice::WithClaim(e) => (Some(e), false),
            HibernationNotice::OnLanding(e) => (Some(e), true),
        };
        let args = (
            millis(lifetime),
            term.0,
            u8::from(dry_run),
            event_args(event),
            event_args(warning),
            u8::from(on_landing),
        );
        let reply: Vec<String> = self.eval_session(op, session, args).await?;
        self.claim_reply(session, &reply).await
    }

    /// Parses a claim's answer; connections a max duration claim ended are
    /// settled (their users' counts) before it is returned.
    async fn claim_reply(&self, session: &SessionId, reply: &[String]) -> Result<ClaimOutcome> {
        let op = &self.scripts.claim_hibernation;
        let bad = || bad_reply(op, reply);
        let duration = |ms: &str| {
            parse_ms(ms)
                .and_then(|m| u64::try_from(m).ok())
                .map(Duration::from_millis)
                .ok_or_else(bad)
        };
        match reply {
            [kind, generation, uid, ito, reason, md, ended @ ..]
                if kind == "claimed" && ended.len() % 2 == 0 =>
            {
                let idle_timeout = match ito.as_str() {
                    "off" => IdleTimeout::Off,
                    ms => IdleTimeout::After(duration(ms)?),
                };
                let ended_ids = ended
                    .chunks(2)
                    .map(|p| p[0].parse::<ConnectionId>().map_err(|_| bad()))
                    .collect::<Result<Vec<_>>>()?;
                let users = ended
                    .chunks(2)
                    .map(|p| p[1].parse::<UserId>().map_err(|_| bad()))
                    .collect::<Result<Vec<_>>>()?;
                let settled: Vec<_> = users
                    .iter()
                    .zip(&ended_ids)
                    .map(|(u, id)| (u, session, *id))
                    .collect();
                self.settle(&settled).await;
                Ok(ClaimOutcome::Claimed(Claim {
                    generation: generation.parse().ok(),
                    uid: reply::non_empty(uid).map(str::to_owned),
                    idle_timeout,
                    reason: HibernationReason::parse(reason).ok_or_else(bad)?,
                    max_session_duration: reply::non_empty(md).map(duration).transpose()?,
                    ended: ended_ids,
                }))
            }
            [kind, at, owner, uid] if kind == "warned" => Ok(ClaimOutcome::Warned(Warning {
                at: millis_to_utc(parse_ms(at).ok_or_else(bad)?),
                owner: reply::non_empty(owner).map(str::to_owned),
                uid: reply::non_empty(uid).map(str::to_owned),
            })),
            [kind, reason] if kind == "refused" => ClaimRefusal::parse(reason)
                .map(ClaimOutcome::Refused)
                .ok_or_else(bad),
            _ => Err(bad()),
        }
    }

    /// The hibernation patch landed on the resource `uid` (with its new
    /// generation). The hibernate event the claim carries
    /// ([`HibernationNotice::OnLanding`]) is queued with the record, unless
    /// the mirror queued it already.
    pub async fn finish_hibernation(
        &self,
        session: &SessionId,
        term: Term,
        uid: Option<&str>,
        generation: Option<i64>,
    ) -> Result<FinishOutcome> {
        let op = &self.scripts.finish_hibernation;
        let args = (term.0, uid.unwrap_or_default(), opt_i64(generation));
        let reply: String = self.eval_session(op, session, args).await?;
        match reply.as_str() {
            "finished" => Ok(FinishOutcome::Finished),
            "not_claimed" => Ok(FinishOutcome::NotClaimed),
            "stale" => Ok(FinishOutcome::Stale),
            "fenced" => Ok(FinishOutcome::Fenced),
            _ => Err(bad_reply(op, &[reply])),
        }
    }

    /// The hibernation patch did not land: release this term's claim; retry
    /// after `retry_after`. `Noop` if the claim was not this term's any more.
    pub async fn rollback_hibernation(
        &self,
        session: &SessionId,
        term: Term,
        retry_after: Duration,
    ) -> Result<Written> {
        self.release_claim(session, term, retry_after, None).await
    }

    /// [`Store::rollback_hibernation`] of a claim whose patch was sent and
    /// its answer lost: it may still land within `may_land_for`. If the
    /// mirror sees it land by then, a connection made since this release
    /// wakes the session, even one that has ended.
    pub async fn rollback_unsure_hibernation(
        &self,
        session: &SessionId,
        term: Term,
        retry_after: Duration,
        may_land_for: Duration,
    ) -> Result<Written> {
        self.release_claim(session, term, retry_after, Some(may_land_for))
            .await
    }

    async fn release_claim(
        &self,
        session: &SessionId,
        term: Term,
        retry_after: Duration,
        may_land_for: Option<Duration>,
    ) -> Result<Written> {
        let op = &self.scripts.rollback_hibernation;
        let may_land = may_land_for.map(|d| millis(d).to_string());
        let args = (term.0, millis(retry_after), may_land.unwrap_or_default());
        let n: i64 = self.eval_session(op, session, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// Pending wakes of one shard, oldest first.
    pub async fn pending_wakes(&self, shard: ShardId, max: u32) -> Result<Vec<PendingWake>> {
        let op = &self.scripts.pending_wakes;
        let reply: Vec<String> = self.eval_shard_key(op, shard, ShardKey::Wake, max).await?;
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

    /// The resource `uid` is running again: the wake is no longer pending.
    /// The wake event armed before the patch ([`Store::arm_wake`]), if any,
    /// is queued with the record, whichever leader makes it.
    pub async fn ack_wake(
        &self,
        session: &SessionId,
        term: Term,
        uid: Option<&str>,
        generation: Option<i64>,
    ) -> Result<Written> {
        let op = &self.scripts.ack_wake;
        let args = (term.0, uid.unwrap_or_default(), opt_i64(generation));
        let n: i64 = self.eval_session(op, session, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// A wake patch is about to be sent (Kubernetes with NATS): `event` is
    /// queued when the wake is acknowledged, by this leader or the next.
    /// `Noop` if no wake is pending. The caller has just read the Session
    /// hibernated: the hibernate event of a claim whose landing the store has
    /// not recorded yet is queued now, ahead of the wake's.
    pub async fn arm_wake(
        &self,
        session: &SessionId,
        term: Term,
        event: &Announcement,
    ) -> Result<Written> {
        let op = &self.scripts.arm_wake;
        let args = (term.0, event_args(Some(event)));
        let n: i64 = self.eval_session(op, session, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// Records what a Session resource says; `Noop` if it is stale news.
    pub async fn mirror_session(&self, meta: &SessionMeta, term: Term) -> Result<Written> {
        let ito = idle_arg(meta.idle_timeout);
        let args = (
            term.0,
            meta.uid.as_deref().unwrap_or_default(),
            meta.owner.as_deref().unwrap_or_default(),
            meta.state.as_str(),
            ito,
            opt_i64(meta.generation),
            meta.idle_source.code(),
            meta.max_session_duration
                .map(|d| millis(d).to_string())
                .unwrap_or_default(),
            millis(self.warn_before),
            meta.created_at
                .map(|t| t.timestamp_millis().to_string())
                .unwrap_or_default(),
        );
        let op = &self.scripts.mirror_session;
        let n: i64 = self.eval_session(op, &meta.session_id, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// The Session resource `uid` is gone (`None`: whichever is mirrored).
    pub async fn forget_session(
        &self,
        session: &SessionId,
        term: Term,
        uid: Option<&str>,
    ) -> Result<Written> {
        let op = &self.scripts.forget_session;
        let args = (term.0, uid.unwrap_or_default());
        let n: i64 = self.eval_session(op, session, args).await?;
        Written::from_reply(n).ok_or_else(|| bad_reply(op, &[n]))
    }

    /// Declares (or updates) a session on a platform without Session
    /// resources: the same metadata the mirror writes, so every rule of a
    /// mirrored session applies. `meta.uid` and `meta.generation` are the
    /// store's to assign (a fresh uid for a new session, a counter raised by
    /// each declaration) and ignored here. Not fenced: no leader writes it.
    pub async fn declare_session(&self, meta: &SessionMeta) -> Result<Declared> {
        let args = (
            uuid::Uuid::new_v4().to_string(),
            meta.owner.as_deref().unwrap_or_default(),
            meta.state.as_str(),
            idle_arg(meta.idle_timeout),
            opt_ms(meta.max_session_duration),
            meta.idle_source.code(),
            millis(self.warn_before),
        );
        let op = &self.scripts.declare_session;
        let (created, generation): (i64, i64) =
            self.eval_session(op, &meta.session_id, args).await?;
        Ok(Declared {
            created: flag(created),
            generation,
        })
    }

    /// Forgets a declared session (the API's `DELETE`); true if it was known.
    /// Its live connections stay until they close or expire; events already
    /// queued are still published.
    pub async fn undeclare_session(&self, session: &SessionId) -> Result<bool> {
        let op = &self.scripts.forget_session;
        let n: i64 = self.eval_session(op, session, ("", "")).await?;
        Ok(n == 1)
    }

    /// Like [`Store::claim_hibernation`], and queues the hibernate event in
    /// the same script; the claim does not lapse but ends when NATS
    /// acknowledges the event ([`Store::event_ack`]).
    pub async fn claim_hibernation_announced(
        &self,
        session: &SessionId,
        term: Term,
        event: &Announcement,
    ) -> Result<ClaimOutcome> {
        // Such a claim does not lapse: no lifetime.
        let notice = HibernationNotice::WithClaim(event);
        self.claim(session, Duration::ZERO, term, false, notice, None)
            .await
    }

    /// Queues the wake event of a pending wake (once per wake request).
    pub async fn announce_wake(
        &self,
        session: &SessionId,
        term: Term,
        event: &Announcement,
    ) -> Result<WakeAnnounce> {
        let op = &self.scripts.announce_wake;
        let args = (term.0, event_args(Some(event)));
        let n: i64 = self.eval_session(op, session, args).await?;
        match n {
            1 => Ok(WakeAnnounce::Queued),
            2 => Ok(WakeAnnounce::AlreadyRunning),
            0 => Ok(WakeAnnounce::Nothing),
            -1 => Ok(WakeAnnounce::Fenced),
            _ => Err(bad_reply(op, &[n])),
        }
    }

    /// The oldest queued session events of one shard, in the order they were
    /// queued.
    pub async fn events_read(&self, shard: ShardId, max: u32) -> Result<EventRead> {
        let reply: Vec<(String, Vec<(String, String)>)> = self
            .eval_shard_key(&self.scripts.outbox_read, shard, ShardKey::Events, max)
            .await?;
        let mut read = EventRead::default();
        for (id, fields) in reply {
            match reply::queued_event(&id, &fields) {
                Some(event) => read.events.push(event),
                None => read.malformed.push(id),
            }
        }
        Ok(read)
    }

    /// NATS acknowledged the event: drop it and complete its change.
    pub async fn event_ack(&self, event: &QueuedEvent, term: Term) -> Result<EventAck> {
        let op = &self.scripts.event_ack;
        let args = (term.0, event.entry_id.as_str());
        let reply: String = self.eval_session(op, &event.session_id, args).await?;
        match reply.as_str() {
            "applied" => Ok(EventAck::Applied),
            "noted" => Ok(EventAck::Noted),
            "gone" => Ok(EventAck::Gone),
            "fenced" => Ok(EventAck::Fenced),
            _ => Err(bad_reply(op, &[reply])),
        }
    }

    /// Drops entries of a shard's event outbox that are not events.
    pub async fn events_drop(&self, shard: ShardId, ids: &[String]) -> Result<u64> {
        self.stream_drop(shard, ShardKey::Events, ids).await
    }

    /// Session events not yet acknowledged by NATS, over all shards.
    pub async fn events_backlog(&self) -> Result<u64> {
        self.stream_backlog(ShardKey::Events).await
    }

    /// Sessions of one shard that are mirrored from a resource.
    pub async fn known_sessions(&self, shard: ShardId) -> Result<Vec<SessionId>> {
        let op = &self.scripts.known_sessions;
        let reply: Vec<String> = self
            .eval_shard_key(op, shard, ShardKey::Known, NO_ARGS)
            .await?;
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
        let reply: Vec<(String, Vec<Vec<u8>>)> = self
            .eval_shard_key(&self.scripts.outbox_read, shard, ShardKey::Outbox, max)
            .await?;
        let mut read = OutboxRead::default();
        for (id, raw) in reply {
            let mut fields = Vec::with_capacity(raw.len() / 2);
            let mut not_utf8 = None;
            for pair in raw.chunks_exact(2) {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let (k, v) = (text(&pair[0]), text(&pair[1]));
                if std::str::from_utf8(&pair[1]).is_err() {
                    not_utf8.get_or_insert_with(|| reply::history_field(&k));
                }
                fields.push((k, v));
            }
            match not_utf8.map_or_else(|| reply::history(&fields), Err) {
                Ok(record) => read.entries.push(OutboxEntry { id, record }),
                Err(field) => read.malformed.push(MalformedEntry { id, fields, field }),
            }
        }
        Ok(read)
    }

    /// Drops archived entries (after the commit); returns the shard's backlog left.
    pub async fn outbox_ack(&self, shard: ShardId, ids: &[String]) -> Result<u64> {
        self.stream_drop(shard, ShardKey::Outbox, ids).await
    }

    /// Finished connections not yet archived, over all shards.
    pub async fn outbox_backlog(&self) -> Result<u64> {
        self.stream_backlog(ShardKey::Outbox).await
    }

    /// Deletes entries of one shard's stream (outbox or event outbox);
    /// returns the entries left in it.
    async fn stream_drop(&self, shard: ShardId, stream: ShardKey, ids: &[String]) -> Result<u64> {
        let op = &self.scripts.outbox_ack;
        let (_, left): (i64, u64) = self.eval_shard_key(op, shard, stream, ids).await?;
        Ok(left)
    }

    /// Entries of a stream (outbox or event outbox), over all shards.
    async fn stream_backlog(&self, stream: ShardKey) -> Result<u64> {
        let op = &self.scripts.outbox_len;
        let calls = self
            .keys
            .shards()
            .map(|shard| self.eval_shard_key::<u64, _>(op, shard, stream, NO_ARGS));
        Ok(try_join_all(calls).await?.into_iter().sum())
    }

    /// The shard's epoch marker, created if missing. A marker that differs
    /// from the one seen before means the shard lost its data.
    pub async fn shard_epoch(&self, shard: ShardId) -> Result<Epoch> {
        let op = &self.scripts.epoch;
        let fresh = uuid::Uuid::new_v4().to_string();
        let (marker, created): (String, i64) = self
            .eval_shard_key(op, shard, ShardKey::Epoch, fresh)
            .await?;
        Ok(Epoch {
            marker,
            created: flag(created),
        })
    }

    /// [`Store::shard_epoch`] and, when `max` > 0, [`Store::due_sessions`]
    /// of one shard, in one call: the hibernator's read of a shard per tick.
    pub async fn shard_epoch_due(
        &self,
        shard: ShardId,
        max: u32,
    ) -> Result<(Epoch, Vec<SessionId>)> {
        let op = &self.scripts.epoch_due;
        let keys = [
            self.keys.shard_key(shard, ShardKey::Epoch),
            self.keys.shard_key(shard, ShardKey::Due),
        ];
        let fresh = uuid::Uuid::new_v4().to_string();
        let reply: Vec<String> = self.eval(op, &keys, (fresh, max)).await?;
        let [marker, created, due @ ..] = reply.as_slice() else {
            return Err(bad_reply(op, &reply));
        };
        let due = due
            .iter()
            .map(|s| s.parse().map_err(|_| bad_reply(op, &reply)))
            .collect::<Result<Vec<SessionId>>>()?;
        let epoch = Epoch {
            marker: marker.clone(),
            created: created == "1",
        };
        Ok((epoch, due))
    }

    /// Takes or renews the named leader lock for `lease`; false if another
    /// holder has it.
    pub async fn lock_acquire(&self, name: &str, token: &str, lease: Duration) -> Result<bool> {
        let keys = [self.keys.lock_key(name)];
        self.eval(&self.scripts.lock_acquire, &keys, (token, millis(lease)))
            .await
            .map(flag)
    }

    /// Gives the lock up if we hold it.
    pub async fn lock_release(&self, name: &str, token: &str) -> Result<bool> {
        let keys = [self.keys.lock_key(name)];
        self.eval(&self.scripts.lock_release, &keys, token)
            .await
            .map(flag)
    }

    fn registered(&self, op: &Op, session: &SessionId, f: &[String]) -> Result<Registered> {
        if f.len() != CONN_FIELDS + VIEW_FIELDS {
            return Err(bad_reply(op, f));
        }
        let connection = reply::connection(op, &f[..CONN_FIELDS], self.window_ms())?;
        let (session, _) =
            reply::view(op, session, &f[CONN_FIELDS..])?.ok_or_else(|| bad_reply(op, f))?;
        Ok(Registered {
            connection,
            session,
        })
    }
}

#[cfg(feature = "testing")]
impl Store {
    /// The newest term any shard has seen (0 if none): tests that write as
    /// "the leader" next to a running reaper use it.
    pub async fn newest_term(&self) -> Result<Term> {
        let calls = self.keys.shards().map(|shard| {
            let key = self.keys.shard_key(shard, ShardKey::Term);
            async move {
                let t: Option<u64> = self.query(redis::cmd("GET").arg(key)).await?;
                Ok::<_, Error>(t.unwrap_or(0))
            }
        });
        let newest = try_join_all(calls).await?.into_iter().max().unwrap_or(0);
        Ok(Term(newest))
    }
}

const NO_ARGS: &[&str] = &[];

/// Live connections an explanation names (the rest are counted).
const EXPLAIN_LIVE: u32 = 5;

/// A user slot names the connection it holds.
fn slot_member(session: &SessionId, id: ConnectionId) -> String {
    format!("{session}/{id}")
}

/// The session an id index entry ("<state>|<session>[|<user>]") names.
fn id_entry_session(entry: &str) -> Option<SessionId> {
    let mut parts = entry.splitn(3, '|');
    let _state = parts.next()?;
    parts.next()?.parse().ok()
}

/// A duration in ms as a script argument; '' for none.
fn opt_ms(v: Option<Duration>) -> String {
    v.map(|d| millis(d).to_string()).unwrap_or_default()
}

/// An idle timeout as the scripts store it: ms, or 'off'.
fn idle_arg(t: IdleTimeout) -> String {
    match t {
        IdleTimeout::Off => "off".to_owned(),
        IdleTimeout::After(d) => millis(d).to_string(),
    }
}

fn opt_i64(v: Option<i64>) -> String {
    v.map(|g| g.to_string()).unwrap_or_default()
}

/// An announcement as a script's trailing arguments: event id, platform,
/// reason ('' each for none).
fn event_args(event: Option<&Announcement>) -> (&str, &str, &str) {
    match event {
        Some(e) => (&e.event_id, &e.platform, &e.reason),
        None => ("", "", ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_entries_name_their_session_even_when_the_user_has_bars() {
        assert_eq!(
            id_entry_session("r|s-1|we|ird").map(|s| s.to_string()),
            Some("s-1".to_owned())
        );
        assert_eq!(
            id_entry_session("r|s-1").map(|s| s.to_string()),
            Some("s-1".to_owned()),
            "a registered entry names the session alone"
        );
        assert_eq!(id_entry_session("garbage"), None);
        assert_eq!(id_entry_session("r|Not A Session|u"), None);
    }
}

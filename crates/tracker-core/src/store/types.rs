//! The store's settings and the outcomes of its operations.
//!
//! Business outcomes (a limit reached, a claim refused, a fenced write) are
//! values of these types, not errors: callers act on each differently.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::{
    ConnectionId, ConnectionView, HistoryRecord, Protocol, ResourceState, SessionId, SessionState,
    SessionView, UserAgent, UserId,
};
use crate::error::{Error, Result};

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
#[derive(Clone)]
pub struct StoreConfig {
    /// One URL (standalone) or the cluster's seed nodes. May hold passwords.
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
    /// How long the id of an ended connection stays refused in Redis. Past
    /// it, a reused id is still caught when its history row is archived.
    pub ended_id_retention: Duration,
    /// How long before a session's max duration is reached its clients are
    /// warned; recorded with the Sessions this store mirrors or declares.
    pub warn_before: Duration,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may carry a password: show only where they point.
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("StoreConfig")
            .field("urls", &urls)
            .field("mode", &self.mode)
            .field("key_prefix", &self.key_prefix)
            .field("shards", &self.shards)
            .field("heartbeat_window", &self.heartbeat_window)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("ended_id_retention", &self.ended_id_retention)
            .field("warn_before", &self.warn_before)
            .finish()
    }
}

/// `url` with the password of its userinfo (`scheme://user:PASSWORD@host`)
/// replaced, for logs and `Debug`; anything else is kept, since the host is
/// what an operator needs to see.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

impl StoreConfig {
    pub const DEFAULT_SHARDS: u16 = 32;
    pub const DEFAULT_ENDED_ID_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
    pub const DEFAULT_WARN_BEFORE: Duration = Duration::from_secs(300);

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
            ended_id_retention: Self::DEFAULT_ENDED_ID_RETENTION,
            warn_before: Self::DEFAULT_WARN_BEFORE,
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
    /// The same user registered the same connection id on this session
    /// before, and that connection is live.
    Replayed(Registered),
    /// The Session is terminated: nothing may connect.
    Terminated,
    SessionLimit,
    UserLimit,
    /// The connection id names another connection: of another session or
    /// user, or one that ended. An id names one connection for ever.
    Conflict,
    /// The caller had to own the session ([`crate::Store::register_as`])
    /// and does not.
    NotOwner(NotOwner),
}

/// Why a caller who had to own a session (a plain user) was refused by the
/// call that would have acted on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOwner {
    /// The session has no owner: for a user, there is no such session.
    NoOwner,
    /// Another user owns the session.
    OtherOwner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    pub last_heartbeat: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What a heartbeat that had to come from the session's owner came to
/// ([`crate::Store::heartbeat_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    Alive(HeartbeatAck),
    /// The connection is closed, swept or dead (or was never registered).
    Unknown,
    /// The caller had to own the session and does not.
    NotOwner(NotOwner),
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

/// Where a session's idle timeout (or its absence) comes from, so that an
/// explanation can say why a session is never hibernated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdleSource {
    /// `spec.idleTimeout` (or a declared `idle_timeout`).
    Spec,
    /// No `spec.idleTimeout`: the reaper's default.
    Default,
    /// Exempt: annotation `stream.space/auto-hibernate: "false"` (or a
    /// declared `auto_hibernate: false`).
    Annotation,
    /// `spec.idleTimeout: ""`: hibernation disabled.
    Empty,
    /// A `spec.idleTimeout` that does not parse: never hibernated on a guess.
    Invalid,
    /// Not recorded (written by an older version).
    #[default]
    Unknown,
}

impl IdleSource {
    /// The one-letter code the metadata hash keeps (`ios`).
    pub fn code(self) -> &'static str {
        match self {
            IdleSource::Spec => "s",
            IdleSource::Default => "d",
            IdleSource::Annotation => "a",
            IdleSource::Empty => "e",
            IdleSource::Invalid => "x",
            IdleSource::Unknown => "",
        }
    }

    pub fn from_code(code: &str) -> Self {
        match code {
            "s" => IdleSource::Spec,
            "d" => IdleSource::Default,
            "a" => IdleSource::Annotation,
            "e" => IdleSource::Empty,
            "x" => IdleSource::Invalid,
            _ => IdleSource::Unknown,
        }
    }
}

/// What the mirror knows of a Session resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMeta {
    pub session_id: SessionId,
    /// `metadata.uid`: a Session deleted and created again under the same
    /// name is another session.
    pub uid: Option<String>,
    pub owner: Option<String>,
    /// Where `idle_timeout` comes from (explanations only; deciding looks at
    /// `idle_timeout` alone).
    pub idle_source: IdleSource,
    pub state: ResourceState,
    pub idle_timeout: IdleTimeout,
    /// `metadata.generation`: orders the mirror's writes against the reaper's.
    pub generation: Option<i64>,
    /// A session running this long since it last started is hibernated even
    /// with live connections (`spec.maxSessionDuration`, or a declaration's
    /// `max_session_duration`); `None`: no limit. Stored as `md` (ms).
    pub max_session_duration: Option<Duration>,
    /// `metadata.creationTimestamp`: a connection made since then was made
    /// to this resource, even if the store learns of the resource only later
    /// (see mirror_session.lua). `None` for declared sessions.
    pub created_at: Option<DateTime<Utc>>,
}

/// A leader's term: a number greater than every earlier leader's. Every write
/// of the reaper carries it, and a shard refuses writes of a term older than
/// the newest it has seen, so a replaced leader's late writes never land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a successful claim saw, for the hibernator to check against the
/// resource it reads before patching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub generation: Option<i64>,
    pub uid: Option<String>,
    pub idle_timeout: IdleTimeout,
    pub reason: HibernationReason,
    pub max_session_duration: Option<Duration>,
    /// Connections the claim ended (max duration only); their history is
    /// in the outbox already.
    pub ended: Vec<ConnectionId>,
}

/// Why a session is hibernated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HibernationReason {
    /// Without connections for its idle timeout.
    Idle,
    /// Running for its max session duration, connected or not.
    MaxDuration,
}

impl HibernationReason {
    /// As the claim script and the `session_events` reasons spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            HibernationReason::Idle => "idle",
            HibernationReason::MaxDuration => "max_duration",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "idle" => Some(HibernationReason::Idle),
            "max_duration" => Some(HibernationReason::MaxDuration),
            _ => None,
        }
    }
}

/// A warning recorded now: the session's clients are to be told it will be
/// hibernated at `at`, the end of its running period (max duration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub at: DateTime<Utc>,
    pub owner: Option<String>,
    pub uid: Option<String>,
}

/// Why a session could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClaimRefusal {
    /// A newer leader wrote to the shard: this one must stop acting.
    Fenced,
    NotMirrored,
    NotRunning,
    /// Being hibernated or woken already.
    Busy,
    Connected,
    Exempt,
    NotDue,
}

impl ClaimRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimRefusal::Fenced => "fenced",
            ClaimRefusal::NotMirrored => "not_mirrored",
            ClaimRefusal::NotRunning => "not_running",
            ClaimRefusal::Busy => "busy",
            ClaimRefusal::Connected => "connected",
            ClaimRefusal::Exempt => "exempt",
            ClaimRefusal::NotDue => "not_due",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            ClaimRefusal::Fenced,
            ClaimRefusal::NotMirrored,
            ClaimRefusal::NotRunning,
            ClaimRefusal::Busy,
            ClaimRefusal::Connected,
            ClaimRefusal::Exempt,
            ClaimRefusal::NotDue,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Now `hibernating`; patch the resource, then finish or roll back.
    Claimed(Claim),
    /// Not claimed: the warning before the max duration was due and is now
    /// recorded (once per running period, whichever leader asks).
    Warned(Warning),
    Refused(ClaimRefusal),
}

/// What a fenced write of the reaper did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// It changed what it exists to change.
    Done,
    /// Nothing to do: stale news, nothing pending, not ours.
    Noop,
    /// A newer leader wrote to the shard: nothing written; stop acting.
    Fenced,
}

impl Written {
    pub(crate) fn from_reply(n: i64) -> Option<Self> {
        match n {
            1 => Some(Written::Done),
            0 => Some(Written::Noop),
            -1 => Some(Written::Fenced),
            _ => None,
        }
    }
}

/// What recording a landed hibernation patch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishOutcome {
    /// Recorded, and this term's claim ended.
    Finished,
    /// The state was recorded, but the claim was no longer this term's.
    NotClaimed,
    /// The store knows a newer generation or another resource: nothing recorded.
    Stale,
    /// A newer leader wrote to the shard: nothing recorded.
    Fenced,
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

/// One read of a shard's outbox, oldest first; see [`crate::Store::outbox_read_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxRead {
    pub entries: Vec<OutboxEntry>,
    pub malformed: Vec<MalformedEntry>,
}

/// A shard's epoch marker; see [`crate::Store::shard_epoch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Epoch {
    pub marker: String,
    /// The marker did not exist before this call: the shard is new or lost its data.
    pub created: bool,
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords_in_logs() {
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://:<redacted>@host:6379/0"
        );
        assert_eq!(
            redact_url("rediss://user:p@ss@host"),
            "rediss://user:<redacted>@host"
        );
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        let cfg = StoreConfig::new(vec!["redis://:s3cret@h".into()], RedisMode::Standalone);
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }
}

/// What declaring a session did; see [`crate::Store::declare_session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Declared {
    /// No session was declared or mirrored under the name before.
    pub created: bool,
    /// The session's declaration counter after this one.
    pub generation: i64,
}

/// The kinds of session events published to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Hibernate,
    Wake,
    Warning,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Hibernate, EventKind::Wake, EventKind::Warning];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Hibernate => "hibernate",
            EventKind::Wake => "wake",
            EventKind::Warning => "warning",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A session event to queue: its id (stable across retries: NATS
/// deduplicates by it), the platform it names and why it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub event_id: String,
    pub platform: String,
    pub reason: String,
}

impl Announcement {
    /// A fresh event id for `platform` and `reason`.
    pub fn new(platform: &str, reason: &str) -> Self {
        Self {
            event_id: uuid::Uuid::new_v4().to_string(),
            platform: platform.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// How a claim's hibernation is announced on NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HibernationNotice<'a> {
    /// Not announced (no NATS, or a dry run).
    Silent,
    /// Queued with the claim; NATS's acknowledgement completes the
    /// hibernation (the docker platform).
    WithClaim(&'a Announcement),
    /// Carried by the claim and queued when its patch is seen to land, by
    /// whoever records that: this leader's finish, another leader's, or the
    /// mirror (Kubernetes with NATS). So a landing found late, by a read
    /// again or the watch, or recorded by the next leader is announced too.
    OnLanding(&'a Announcement),
}

/// A session event waiting in a shard's event outbox for NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    /// The stream entry id, to acknowledge once NATS has.
    pub entry_id: String,
    pub event_id: String,
    pub kind: EventKind,
    pub session_id: SessionId,
    /// The session's owner when the event was queued ('' if unknown).
    pub user_id: String,
    pub platform: String,
    pub reason: String,
    /// When the change was decided: the same on every retry.
    pub timestamp: DateTime<Utc>,
    /// Its acknowledgement completes the change it announces.
    pub completes: bool,
}

/// One read of a shard's event outbox, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRead {
    pub events: Vec<QueuedEvent>,
    /// Entries that are not events (written by hand or another version):
    /// their stream ids, to drop.
    pub malformed: Vec<String>,
}

/// What announcing a pending wake did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeAnnounce {
    /// The wake event is queued; the session is woken once NATS acknowledges it.
    Queued,
    /// Running already, and no hibernation being announced: the wake is done.
    AlreadyRunning,
    /// Nothing pending, announced already, or the session is terminated or
    /// unknown (the wake is dropped).
    Nothing,
    Fenced,
}

/// What acknowledging a published event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventAck {
    /// The announced state is recorded.
    Applied,
    /// Dropped without a state change (none to complete, or newer news).
    Noted,
    /// Acknowledged before.
    Gone,
    /// A newer leader wrote to the shard: nothing done.
    Fenced,
}

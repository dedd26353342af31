//! The connection tracker's core: domain types and the shared state in Redis.
//!
//! Any number of stateless API replicas and reaper replicas share one [`Store`].
//! All state lives in Redis, in sorted sets scored by heartbeat time; every
//! operation that reads-then-writes is one Lua script, so replicas never race
//! each other and time always comes from the Redis server's clock.
//!
//! Layout of the crate:
//! - [`domain`]: validated identifiers (`SessionId`, `ConnectionId`, `UserId`)
//!   and the views clients see;
//! - [`explain`]: why a session is awake or asleep, from facts the store reads;
//! - [`keys`]: which shard a session or user lives in, and why that is
//!   cluster-safe;
//! - [`store`]: the operations, one script each (`src/lua/*.lua`, each with a
//!   header stating KEYS, ARGV, the return value and what it makes atomic).
//!
//! This crate knows nothing of HTTP, Kubernetes or SQL.

pub mod domain;
pub mod error;
pub mod explain;
pub mod keys;
mod scripts;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use domain::{
    ConnectionId, ConnectionView, EndReason, HistoryRecord, Protocol, ResourceState, SessionId,
    SessionState, SessionView, UserAgent, UserId, ValidationError,
};
pub use error::{Error, Result};
pub use keys::{KeySpace, ShardId, ShardKey};
pub use store::{
    redact_url, Announcement, BatchOutcome, Claim, ClaimOutcome, ClaimRefusal, ClockOffset, Epoch,
    Expired, FinishOutcome, HeartbeatAck, HeartbeatOutcome, HibernationNotice, HibernationReason,
    IdleSource, IdleTimeout, Limits, MalformedEntry, NewConnection, NotOwner, OutboxEntry,
    OutboxRead, PendingWake, RedisMode, RegisterOutcome, Registered, SessionMeta, Signal,
    SignalListener, Stats, Store, StoreConfig, Sweep, Term, WakeListener, Warning, Written,
};
pub use store::{Declared, EventAck, EventKind, EventRead, QueuedEvent, WakeAnnounce};

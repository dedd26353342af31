//! PostgreSQL: the pool, the migrations and the two writes the reaper makes.
//!
//! Each write is one statement per batch (`INSERT ... SELECT FROM UNNEST`)
//! and idempotent on its primary key, so a batch replayed after a crash
//! between the commit and the outbox acknowledgement writes nothing twice.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tracker_core::HistoryRecord;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The migrations of `migrations/` at the repository root, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A lazily connecting pool: the reaper starts (and keeps waking Sessions)
/// while PostgreSQL is down; writes fail and are retried.
pub fn pool(url: &str) -> Result<PgPool> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| Error::Config(format!("TRACKER_DATABASE_URL: {e}")))?;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// Applies the migrations; sqlx holds an advisory lock meanwhile, so replicas
/// starting together apply them once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Writes one batch of history rows; answers how many were new.
pub async fn insert_history(pool: &PgPool, records: &[HistoryRecord]) -> Result<u64> {
    if records.is_empty() {
        return Ok(0);
    }
    let n = records.len();
    let mut connection_id = Vec::with_capacity(n);
    let mut session_id = Vec::with_capacity(n);
    let mut user_id = Vec::with_capacity(n);
    let mut protocol = Vec::with_capacity(n);
    let mut client_ip = Vec::with_capacity(n);
    let mut user_agent = Vec::with_capacity(n);
    let mut connected_at = Vec::with_capacity(n);
    let mut disconnected_at = Vec::with_capacity(n);
    let mut last_heartbeat_at = Vec::with_capacity(n);
    let mut end_reason = Vec::with_capacity(n);
    for r in records {
        connection_id.push(r.connection_id.as_uuid());
        session_id.push(r.session_id.as_str().to_owned());
        user_id.push(r.user_id.as_str().to_owned());
        protocol.push(r.protocol.as_str());
        client_ip.push(r.client_ip);
        user_agent.push(r.user_agent.as_ref().map(|ua| ua.as_str().to_owned()));
        connected_at.push(r.connected_at);
        disconnected_at.push(r.disconnected_at);
        last_heartbeat_at.push(r.last_heartbeat_at);
        end_reason.push(r.end_reason.as_str());
    }
    let done = sqlx::query(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
             client_ip, user_agent, connected_at, disconnected_at, last_heartbeat_at, \
             end_reason, archived_at) \
         SELECT u.*, now() FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
             $5::inet[], $6::text[], $7::timestamptz[], $8::timestamptz[], \
             $9::timestamptz[], $10::text[]) AS u \
         ON CONFLICT (connection_id) DO NOTHING",
    )
    .bind(connection_id)
    .bind(session_id)
    .bind(user_id)
    .bind(protocol)
    .bind(client_ip)
    .bind(user_agent)
    .bind(connected_at)
    .bind(disconnected_at)
    .bind(last_heartbeat_at)
    .bind(end_reason)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// What happened to a session, as written to `session_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Hibernated,
    Woken,
    DryRunHibernate,
    DryRunWake,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hibernated => "hibernated",
            Self::Woken => "woken",
            Self::DryRunHibernate => "dry_run_hibernate",
            Self::DryRunWake => "dry_run_wake",
        }
    }
}

/// One `session_events` row. The id is made when the event is decided, so a
/// retried insert is recognised.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEvent {
    pub event_id: Uuid,
    pub session_id: String,
    pub namespace: String,
    pub event_type: EventType,
    pub reason: String,
    pub occurred_at: DateTime<Utc>,
    pub details: serde_json::Value,
}

/// Writes one batch of events; answers how many were new.
pub async fn insert_events(pool: &PgPool, events: &[SessionEvent]) -> Result<u64> {
    if events.is_empty() {
        return Ok(0);
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let sessions: Vec<&str> = events.iter().map(|e| e.session_id.as_str()).collect();
    let namespaces: Vec<&str> = events.iter().map(|e| e.namespace.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let reasons: Vec<&str> = events.iter().map(|e| e.reason.as_str()).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
    let details: Vec<sqlx::types::Json<&serde_json::Value>> = events
        .iter()
        .map(|e| sqlx::types::Json(&e.details))
        .collect();
    let done = sqlx::query(
        "INSERT INTO session_events (event_id, session_id, namespace, event_type, reason, \
             occurred_at, details) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::timestamptz[], $7::jsonb[]) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(ids)
    .bind(sessions)
    .bind(namespaces)
    .bind(types)
    .bind(reasons)
    .bind(times)
    .bind(details)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

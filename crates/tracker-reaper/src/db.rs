//! PostgreSQL: the pool, the migrations and the writes the reaper makes.
//!
//! Each write is one statement per batch (`INSERT ... SELECT FROM UNNEST`)
//! and idempotent on its primary key, so a batch replayed after a crash
//! between the commit and the outbox acknowledgement writes nothing twice.
//! History entries PostgreSQL refuses, or whose connection id is taken by
//! another connection, are set aside in `connection_history_rejects`.

use std::collections::HashMap;
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

/// Migrations whose released text was later reworded in comments only:
/// version and SHA-384 of the text as released. sqlx refuses to start when
/// an applied migration's checksum differs from the embedded one; for these,
/// and only from exactly the released text, the recorded checksum is moved
/// on. Any other difference still fails the start.
const REWORDED: &[(i64, &str)] = &[(
    1,
    "68097fd21edec53c0ada341e504136183698e67b04f953dcd90df72bb0cbd6fa6e726bf52cc56b1134efb74f5fed0200",
)];

/// Applies the migrations; sqlx holds an advisory lock meanwhile, so replicas
/// starting together apply them once.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    accept_reworded(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// See [`REWORDED`]. Idempotent, so replicas starting together may all run it.
async fn accept_reworded(pool: &PgPool) -> Result<()> {
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(());
    }
    for &(version, released) in REWORDED {
        let Some(now) = MIGRATOR.iter().find(|m| m.version == version) else {
            continue;
        };
        sqlx::query(
            "UPDATE _sqlx_migrations SET checksum = $1 \
             WHERE version = $2 AND checksum = decode($3, 'hex')",
        )
        .bind(now.checksum.as_ref())
        .bind(version)
        .bind(released)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// What a batch of history records made in `connection_history`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HistoryWrite {
    /// Rows newly written.
    pub inserted: u64,
    /// Records whose connection id already has a row of *another* connection
    /// (another session, user or start): their index in the batch and that row.
    /// A record whose row exists with the same identity is a redelivery and
    /// appears nowhere (a crash between the commit and the acknowledgement).
    pub reused: Vec<(usize, ArchivedConnection)>,
}

/// What identifies a connection's history row beyond its id: a connection id
/// seen again with any of these different is another connection under a
/// reused id. How it ended is not part of it: after a Redis failover the
/// same connection can end twice (closed, then swept on the promoted replica);
/// the first archived end stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedConnection {
    pub session_id: String,
    pub user_id: String,
    pub connected_at: DateTime<Utc>,
}

impl ArchivedConnection {
    fn of(r: &HistoryRecord) -> Self {
        Self {
            session_id: r.session_id.as_str().to_owned(),
            user_id: r.user_id.as_str().to_owned(),
            connected_at: r.connected_at,
        }
    }
}

/// Writes one batch of history rows in one statement. Nothing is written if
/// PostgreSQL refuses any row ([`Error::refused_data`] tells a refused row
/// from a failed connection); the caller splits the batch to find it.
///
/// The table's trigger skips a row whose connection id has a row already
/// (see `migrations/0004_history_partitions.sql`), like `ON CONFLICT DO
/// NOTHING` would: `RETURNING` names the rows written; only the others (none,
/// usually) cost a second query comparing them with the rows in the way.
pub async fn insert_history(pool: &PgPool, records: &[HistoryRecord]) -> Result<HistoryWrite> {
    if records.is_empty() {
        return Ok(HistoryWrite::default());
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
    let mut session_uid = Vec::with_capacity(n);
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
        session_uid.push(r.session_uid.as_deref());
    }
    let written: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
             client_ip, user_agent, connected_at, disconnected_at, last_heartbeat_at, \
             end_reason, session_uid, archived_at) \
         SELECT u.*, now() FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], \
             $5::inet[], $6::text[], $7::timestamptz[], $8::timestamptz[], \
             $9::timestamptz[], $10::text[], $11::text[]) AS u \
         ON CONFLICT (connection_id, disconnected_at) DO NOTHING \
         RETURNING connection_id",
    )
    .bind(&connection_id)
    .bind(session_id)
    .bind(user_id)
    .bind(protocol)
    .bind(client_ip)
    .bind(user_agent)
    .bind(connected_at)
    .bind(disconnected_at)
    .bind(last_heartbeat_at)
    .bind(end_reason)
    .bind(session_uid)
    .fetch_all(pool)
    .await?;
    let mut write = HistoryWrite {
        inserted: written.len() as u64,
        reused: Vec::new(),
    };

    // To compare: records not written, and records sharing their id with
    // another record of the batch (only one of them was written, and which
    // one is for the comparison to say).
    let mut in_batch: HashMap<Uuid, usize> = HashMap::with_capacity(n);
    for id in &connection_id {
        *in_batch.entry(*id).or_default() += 1;
    }
    let written: std::collections::HashSet<Uuid> = written.into_iter().collect();
    let check: Vec<usize> = (0..n)
        .filter(|&i| {
            let id = connection_id[i];
            !written.contains(&id) || in_batch.get(&id).is_some_and(|&k| k > 1)
        })
        .collect();
    if check.is_empty() {
        return Ok(write);
    }
    let ids: Vec<Uuid> = check.iter().map(|&i| connection_id[i]).collect();
    // A separate statement, not a CTE: it sees rows that a concurrent insert
    // (a former leader's last batch) committed while ours waited on them.
    let rows: Vec<(Uuid, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT connection_id, session_id, user_id, connected_at \
         FROM connection_history WHERE connection_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let archived: HashMap<Uuid, ArchivedConnection> = rows
        .into_iter()
        .map(|(id, session_id, user_id, connected_at)| {
            (
                id,
                ArchivedConnection {
                    session_id,
                    user_id,
                    connected_at,
                },
            )
        })
        .collect();
    for i in check {
        // The row in the way was deleted between the two statements (by hand,
        // or a retention job): nothing to compare with; the retry writes it.
        let existing = archived
            .get(&connection_id[i])
            .ok_or(Error::Database(sqlx::Error::RowNotFound))?;
        if *existing != ArchivedConnection::of(&records[i]) {
            write.reused.push((i, existing.clone()));
        }
    }
    Ok(write)
}

/// An outbox entry set aside: PostgreSQL refused it, its connection id is
/// another connection's, or it is not a history record at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// `None` when the entry's own id does not parse.
    pub connection_id: Option<Uuid>,
    /// The outbox entry as JSON (any NUL byte escaped as `\u0000`).
    pub payload: String,
    /// Why, for the operator: PostgreSQL's message, or ours.
    pub error: String,
}

/// Records rejects, each at most once: a batch replayed after a crash between
/// this commit and the outbox acknowledgement finds its rejects already there
/// (unique on the payload's hash, and the payload names the shard and entry).
/// Answers, per reject, whether it is new. One statement each: rejects are rare.
pub async fn insert_rejects(pool: &PgPool, rejects: &[Reject]) -> Result<Vec<bool>> {
    let mut new = Vec::with_capacity(rejects.len());
    for r in rejects {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO connection_history_rejects (connection_id, payload, error) \
             VALUES ($1, $2, $3) \
             ON CONFLICT ((md5(payload))) DO NOTHING \
             RETURNING reject_id",
        )
        .bind(r.connection_id)
        .bind(storable(&r.payload))
        .bind(storable(&r.error))
        .fetch_optional(pool)
        .await?;
        new.push(id.is_some());
    }
    Ok(new)
}

/// PostgreSQL text cannot hold NUL; a reject must be storable whatever it holds.
fn storable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        s.replace('\0', "\\u0000").into()
    } else {
        s.into()
    }
}

/// What happened to a session, as written to `session_events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Hibernated,
    Woken,
    DryRunHibernate,
    DryRunWake,
    /// Clients were told the session will be hibernated for max duration.
    HibernationWarning,
    DryRunHibernationWarning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hibernated => "hibernated",
            Self::Woken => "woken",
            Self::DryRunHibernate => "dry_run_hibernate",
            Self::DryRunWake => "dry_run_wake",
            Self::HibernationWarning => "hibernation_warning",
            Self::DryRunHibernationWarning => "dry_run_hibernation_warning",
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

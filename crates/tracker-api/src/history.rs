//! Reads a session's archive from PostgreSQL, newest first.
//!
//! The pool connects lazily, so the API starts and serves everything else
//! while PostgreSQL is down; each query is bounded by the backend timeout.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tracker_core::domain::rfc3339_ms;
use tracker_core::SessionId;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::ApiError;
use crate::error::Backend;

/// A row of `connection_history`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct HistoryRow {
    pub connection_id: Uuid,
    pub session_id: String,
    pub user_id: Option<String>,
    pub protocol: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    #[serde(with = "rfc3339_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub connected_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disconnected_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// `closed`, `expired` or `max_duration`.
    pub end_reason: Option<String>,
    #[serde(with = "rfc3339_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub archived_at: Option<DateTime<Utc>>,
}

/// A row of `session_events`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, ToSchema)]
pub struct EventRow {
    pub event_id: Uuid,
    pub session_id: String,
    pub namespace: Option<String>,
    /// `hibernated`, `woken`, `dry_run_hibernate`, ...
    pub event_type: Option<String>,
    pub reason: Option<String>,
    #[serde(with = "rfc3339_ms::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub occurred_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// The answer of `GET /v1/sessions/{id}/history`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionHistory {
    pub connections: Vec<HistoryRow>,
    pub events: Vec<EventRow>,
}

/// The archive reader.
#[derive(Debug, Clone)]
pub struct History {
    pub(crate) pool: PgPool,
    pub(crate) timeout: Duration,
}

impl History {
    /// Parses the URL now (a bad one stops the start); connects on first use.
    pub fn connect_lazy(url: &str, timeout: Duration) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(timeout)
            .connect_lazy_with(options);
        Ok(Self { pool, timeout })
    }

    pub fn from_pool(pool: PgPool, timeout: Duration) -> Self {
        Self { pool, timeout }
    }

    /// The history of `session`, newest first; with `resource`, only what
    /// belongs to that Session resource (its `metadata.uid`): a name reused
    /// by a new resource does not show the old one's history.
    pub async fn session(
        &self,
        session: &SessionId,
        resource: Option<&str>,
        limit: i64,
        before: Option<DateTime<Utc>>,
    ) -> Result<SessionHistory, ApiError> {
        let connections = sqlx::query_as::<_, HistoryRow>(
            "SELECT connection_id, session_id, user_id, protocol, host(client_ip) AS client_ip, \
                    user_agent, connected_at, disconnected_at, last_heartbeat_at, end_reason, \
                    archived_at \
             FROM connection_history \
             WHERE session_id = $1 AND ($2::timestamptz IS NULL OR disconnected_at < $2) \
               AND ($4::text IS NULL OR session_uid = $4) \
             ORDER BY disconnected_at DESC, connection_id DESC \
             LIMIT $3",
        )
        .bind(session.as_str())
        .bind(before)
        .bind(limit)
        .bind(resource)
        .fetch_all(&self.pool);
        let events = sqlx::query_as::<_, EventRow>(
            "SELECT event_id, session_id, namespace, event_type, reason, occurred_at, details \
             FROM session_events \
             WHERE session_id = $1 AND ($2::timestamptz IS NULL OR occurred_at < $2) \
               AND ($4::text IS NULL OR details->>'session_uid' = $4) \
             ORDER BY occurred_at DESC, event_id DESC \
             LIMIT $3",
        )
        .bind(session.as_str())
        .bind(before)
        .bind(limit)
        .bind(resource)
        .fetch_all(&self.pool);
        let both = async { tokio::try_join!(connections, events) };
        match tokio::time::timeout(self.timeout, both).await {
            Ok(Ok((connections, events))) => Ok(SessionHistory {
                connections,
                events,
            }),
            Ok(Err(e)) => Err(pg_error(e)),
            Err(_) => Err(ApiError::Unavailable {
                backend: Backend::Postgres,
                detail: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

impl History {
    /// Runs one query of another route on the archive's pool, bounded and
    /// with its errors answered as the history's are.
    pub async fn run<T, F>(&self, query: impl FnOnce(PgPool) -> F) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        match tokio::time::timeout(self.timeout, query(self.pool.clone())).await {
            Ok(r) => r.map_err(pg_error),
            Err(_) => Err(ApiError::Unavailable {
                backend: Backend::Postgres,
                detail: format!("no answer within {:?}", self.timeout),
            }),
        }
    }
}

/// Connection trouble is a 503 (retry later); anything else is a bug or a
/// schema mismatch, a 500.
pub(crate) fn pg_error(e: sqlx::Error) -> ApiError {
    let unavailable = match &e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // SQLSTATE classes 08 (connection), 53 (resources), 57 (operator
        // intervention, e.g. a restart) and 3D000 (database missing).
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57") || c == "3D000"
        }),
        _ => false,
    };
    let detail = e.to_string();
    if unavailable {
        ApiError::Unavailable {
            backend: Backend::Postgres,
            detail,
        }
    } else {
        ApiError::Internal {
            backend: Backend::Postgres,
            detail,
        }
    }
}

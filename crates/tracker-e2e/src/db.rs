//! The run's own PostgreSQL database: created next to `DATABASE_URL`, migrated by the reapers
//! themselves (that is part of what runs), dropped at the end.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions};
use uuid::Uuid;

use crate::{Error, Result};

/// One row of `connection_history`, the columns the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub connection_id: Uuid,
    pub session_id: String,
    pub end_reason: String,
}

/// A database created for one run.
#[derive(Debug)]
pub struct TestDatabase {
    admin: PgConnectOptions,
    name: String,
    url: String,
    pool: PgPool,
    dropped: bool,
}

impl TestDatabase {
    /// Creates `e2e_<random>` on the server of `server_url`.
    pub async fn create(server_url: &str) -> Result<Self> {
        let admin = PgConnectOptions::from_str(server_url)
            .map_err(|e| Error::db(format!("parse DATABASE_URL {server_url}"), e))?;
        let name = format!("e2e_{}", Uuid::new_v4().simple());
        let admin_pool = admin_pool(&admin).await?;
        // The name is ours (hex), so building the statement from it is safe.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&admin_pool)
            .await
            .map_err(|e| Error::db(format!("create database {name}"), e))?;
        admin_pool.close().await;
        let options = admin.clone().database(&name);
        let url = options.to_url_lossy().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| Error::db(format!("connect to {name}"), e))?;
        Ok(Self {
            admin,
            name,
            url,
            pool,
            dropped: false,
        })
    }

    /// The URL the processes get.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Rows in `connection_history` (an error before the reaper has migrated the schema).
    pub async fn history_count(&self) -> Result<i64> {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM connection_history")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| Error::db("count connection_history", e))
    }

    /// Every history row.
    pub async fn history(&self) -> Result<Vec<HistoryRow>> {
        let rows: Vec<(Uuid, String, String)> =
            sqlx::query_as("SELECT connection_id, session_id, end_reason FROM connection_history")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| Error::db("read connection_history", e))?;
        Ok(rows
            .into_iter()
            .map(|(connection_id, session_id, end_reason)| HistoryRow {
                connection_id,
                session_id,
                end_reason,
            })
            .collect())
    }

    /// `(event_type, count)` of `session_events`.
    pub async fn event_counts(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query_as(
            "SELECT event_type, count(*) FROM session_events GROUP BY event_type ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| Error::db("count session_events", e))
    }

    /// PostgreSQL's address, for a proxy in front of it.
    pub fn server(&self) -> (String, u16) {
        (self.admin.get_host().to_owned(), self.admin.get_port())
    }

    /// The run database's URL with another host and port (e.g. a proxy's).
    pub fn url_via(&self, host: &str, port: u16) -> String {
        self.admin
            .clone()
            .database(&self.name)
            .host(host)
            .port(port)
            .to_url_lossy()
            .to_string()
    }

    /// Closes the pool and drops the database (even with clients still connected).
    pub async fn drop_database(mut self) -> Result<()> {
        self.pool.close().await;
        let dropped = drop_named(&self.admin, &self.name).await;
        self.dropped = dropped.is_ok();
        dropped
    }
}

impl Drop for TestDatabase {
    /// A run that ended early (an error, a panic) still drops its database: on a thread of
    /// its own with a small runtime, since `Drop` cannot await.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if let Err(e) = rt.block_on(drop_named(&admin, &name)) {
                eprintln!("tracker-e2e: could not drop database {name}: {e}");
            }
        });
        let _ = dropper.join();
    }
}

async fn drop_named(admin: &PgConnectOptions, name: &str) -> Result<()> {
    let pool = admin_pool(admin).await?;
    // The name is ours (hex), so building the statement from it is safe.
    let dropped = sqlx::query(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&pool)
    .await
    .map_err(|e| Error::db(format!("drop database {name}"), e));
    pool.close().await;
    dropped.map(|_| ())
}

async fn admin_pool(admin: &PgConnectOptions) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(admin.clone())
        .await
        .map_err(|e| {
            Error::Setup(format!(
                "PostgreSQL at {} is not reachable: {e}. Start it with scripts/services.sh \
                 (scripts/test.sh does), or set DATABASE_URL.",
                admin.to_url_lossy()
            ))
        })
}

//! The daily usage rollup behind `GET /v1/usage`: every history insert or
//! delete marks the UTC days it touches dirty (a trigger, in the same
//! transaction); while leader, the reaper refreshes the dirty days that have
//! ended, one day per transaction (`connection_usage_refresh` in
//! `migrations/0005_usage.sql`). Until then the API reads those days from the
//! history itself, so a stale rollup is slower, never wrong.
//!
//! A refresh is idempotent and locks its day, so two leaders overlapping
//! for a moment cost a little work, nothing more: no fencing needed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::acting::TermContext;
use crate::backoff::Backoff;
use crate::Result;

/// How often dirty days are looked for.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// Days refreshed per query of the dirty list.
const BATCH: i64 = 50;

/// Refreshes the dirty days that ended by `now`; answers how many.
pub async fn refresh(pool: &PgPool, now: DateTime<Utc>) -> Result<u64> {
    let mut refreshed = 0;
    loop {
        let days: Vec<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT day FROM connection_usage_dirty \
             WHERE day + interval '24 hours' <= $1 ORDER BY day LIMIT $2",
        )
        .bind(now)
        .bind(BATCH)
        .fetch_all(pool)
        .await?;
        for day in &days {
            let done: bool = sqlx::query_scalar("SELECT connection_usage_refresh($1)")
                .bind(day)
                .fetch_one(pool)
                .await?;
            refreshed += u64::from(done);
        }
        if days.len() < BATCH as usize {
            return Ok(refreshed);
        }
    }
}

/// Refreshes every [`INTERVAL`] until the term ends.
pub async fn run(ctx: TermContext) {
    let TermContext {
        pool,
        mut db_ready,
        stop,
        ..
    } = ctx;
    tokio::select! {
        () = stop.cancelled() => return,
        _ = db_ready.wait_for(|ready| *ready) => {}
    }
    let mut backoff = Backoff::new(INTERVAL, Duration::from_secs(600));
    loop {
        let pause = tokio::select! {
            () = stop.cancelled() => return,
            r = refresh(&pool, Utc::now()) => match r {
                Ok(n) => {
                    backoff.reset();
                    if n > 0 {
                        tracing::debug!(days = n, "usage rollup refreshed");
                    }
                    INTERVAL
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "refreshing the usage rollup failed");
                    delay
                }
            },
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

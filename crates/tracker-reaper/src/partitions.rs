//! History partitions: `connection_history` is partitioned by month (UTC) on
//! `disconnected_at`. While leader, the reaper keeps the current month and
//! the next [`AHEAD`] created, and drops the months entirely older than
//! `TRACKER_HISTORY_RETENTION` (`0` keeps everything).
//!
//! A row no month takes lands in the default partition, so the archive never
//! fails for want of a partition. Creating a month moves that month's rows
//! out of the default partition first; rows of a past month still kept get
//! their month created; rows of an expired month are deleted from it. The
//! daily usage rollup of expired days is deleted too.
//!
//! [`plan`] decides (pure, tested exhaustively); [`upkeep`] reads the
//! catalogue, asks [`plan`] and carries the plan out. Every step is
//! idempotent and runs under a transaction-scoped advisory lock, so two
//! leaders overlapping for a moment (the lease has no fencing) do the same
//! work once: the plan depends on the clock only, not on the term.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::time::MissedTickBehavior;

use crate::acting::TermContext;
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::Result;

/// Months created ahead of the current one.
pub const AHEAD: u32 = 2;
/// How often the partitions are checked.
pub const INTERVAL: Duration = Duration::from_secs(3600);
/// Name prefix of a month's partition: `connection_history_p202612`.
const PREFIX: &str = "connection_history_p";
const DEFAULT_PARTITION: &str = "connection_history_default";
/// Serialises partition changes of overlapping leaders (an arbitrary constant).
const LOCK_KEY: i64 = 0x7472_6b5f_7061_7274;

/// A calendar month in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    year: i32,
    /// 1 to 12.
    month: u32,
}

impl Month {
    pub fn new(year: i32, month: u32) -> Option<Self> {
        (1..=12).contains(&month).then_some(Self { year, month })
    }

    /// The month `t` falls in.
    pub fn of(t: DateTime<Utc>) -> Self {
        Self {
            year: t.year(),
            month: t.month(),
        }
    }

    /// Its first instant.
    pub fn start(self) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn next(self) -> Self {
        if self.month == 12 {
            Self {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Self {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The partition's table name.
    pub fn table(self) -> String {
        format!("{PREFIX}{:04}{:02}", self.year, self.month)
    }

    /// The month of a partition named by [`Month::table`]; `None` for any other table.
    pub fn from_table(name: &str) -> Option<Self> {
        let digits = name.strip_prefix(PREFIX)?;
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Self::new(digits[..4].parse().ok()?, digits[4..].parse().ok()?)
    }
}

/// What [`upkeep`] is to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Months to create, oldest first.
    pub create: Vec<Month>,
    /// Months to drop, oldest first.
    pub drop: Vec<Month>,
    /// Rows of the default partition older than this are past retention.
    pub expire_before: Option<DateTime<Utc>>,
}

/// The first month kept at `now` with `retention` (`None`: keep all). A month
/// is dropped once all of it is older than the retention.
pub fn first_kept(now: DateTime<Utc>, retention: Option<Duration>) -> Option<Month> {
    let retention = chrono::Duration::from_std(retention?).ok()?;
    now.checked_sub_signed(retention).map(Month::of)
}

/// Decides from the clock, the retention, the months that have a partition
/// and the months that have rows in the default partition.
pub fn plan(
    now: DateTime<Utc>,
    retention: Option<Duration>,
    existing: &[Month],
    stray: &[Month],
) -> Plan {
    let current = Month::of(now);
    let mut last = current;
    for _ in 0..AHEAD {
        last = last.next();
    }
    let kept = first_kept(now, retention);
    let is_kept = |m: &Month| kept.is_none_or(|k| *m >= k);
    let mut create: Vec<Month> =
        std::iter::successors(Some(current), |m| (*m < last).then(|| m.next()))
            .chain(stray.iter().copied().filter(|m| *m < current))
            .filter(|m| is_kept(m) && !existing.contains(m))
            .collect();
    create.sort();
    create.dedup();
    let mut drop: Vec<Month> = existing.iter().copied().filter(|m| !is_kept(m)).collect();
    drop.sort();
    Plan {
        create,
        drop,
        expire_before: kept.map(Month::start),
    }
}

/// What one [`upkeep`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub created: Vec<Month>,
    pub dropped: Vec<Month>,
    /// Rows moved out of the default partition into created months.
    pub moved: u64,
    /// Rows of expired months deleted from the default partition.
    pub expired: u64,
    /// Month partitions after the upkeep.
    pub partitions: usize,
}

/// Reads the partitions, plans at `now` and carries the plan out.
pub async fn upkeep(
    pool: &PgPool,
    now: DateTime<Utc>,
    retention: Option<Duration>,
) -> Result<Upkeep> {
    let existing = months(pool).await?;
    let stray = stray_months(pool).await?;
    let plan = plan(now, retention, &existing, &stray);
    let mut done = Upkeep::default();
    for &m in &plan.create {
        if let Some(moved) = create(pool, m).await? {
            done.moved += moved;
            done.created.push(m);
        }
    }
    for &m in &plan.drop {
        if drop(pool, m).await? {
            done.dropped.push(m);
        }
    }
    if let Some(before) = plan.expire_before {
        done.expired =
            sqlx::query("DELETE FROM connection_history_default WHERE disconnected_at < $1")
                .bind(before)
                .execute(pool)
                .await?
                .rows_affected();
        // The usage of those days goes with them.
        sqlx::query(
            "WITH rolled AS (DELETE FROM connection_usage_daily WHERE day < $1) \
             DELETE FROM connection_usage_dirty WHERE day < $1",
        )
        .bind(before)
        .execute(pool)
        .await?;
    }
    done.partitions = months(pool).await?.len();
    Ok(done)
}

/// The months that have a partition.
pub async fn months(pool: &PgPool) -> Result<Vec<Month>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'connection_history'::regclass",
    )
    .fetch_all(pool)
    .await?;
    let mut months: Vec<Month> = names.iter().filter_map(|n| Month::from_table(n)).collect();
    months.sort();
    Ok(months)
}

/// The months of the rows in the default partition (usually none).
async fn stray_months(pool: &PgPool) -> Result<Vec<Month>> {
    let starts: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT DISTINCT date_trunc('month', disconnected_at, 'UTC') \
         FROM connection_history_default",
    )
    .fetch_all(pool)
    .await?;
    Ok(starts.into_iter().map(Month::of).collect())
}

/// Creates `m`'s partition with the rows the default partition holds for it.
/// `None` if it exists already (another leader was first).
async fn create(pool: &PgPool, m: Month) -> Result<Option<u64>> {
    let (table, from, to) = (m.table(), m.start(), m.next().start());
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    if exists(&mut tx, &table).await? {
        return Ok(None);
    }
    // Built beside the table and attached with its rows: a partition created
    // in place would be refused while the default partition holds rows of its
    // range. Names and bounds are ours (digits and RFC 3339), not input.
    let bounds = format!("FROM ('{}') TO ('{}')", from.to_rfc3339(), to.to_rfc3339());
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TABLE {table} (LIKE connection_history INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )))
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(AssertSqlSafe(format!(
        "WITH moved AS (DELETE FROM {DEFAULT_PARTITION} \
             WHERE disconnected_at >= $1 AND disconnected_at < $2 RETURNING *) \
         INSERT INTO {table} SELECT * FROM moved"
    )))
    .bind(from)
    .bind(to)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE connection_history ATTACH PARTITION {table} FOR VALUES {bounds}"
    )))
    .execute(&mut *tx)
    .await?;
    if moved > 0 {
        // Deleting from the default partition gave their ids back.
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO connection_history_ids (connection_id, disconnected_at) \
             SELECT connection_id, disconnected_at FROM {table} ON CONFLICT DO NOTHING"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Some(moved))
}

/// Drops `m`'s partition and the ids of its rows; false if it is gone already.
async fn drop(pool: &PgPool, m: Month) -> Result<bool> {
    let table = m.table();
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    if !exists(&mut tx, &table).await? {
        return Ok(false);
    }
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM connection_history_ids i USING {table} p \
         WHERE i.connection_id = p.connection_id"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query(AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

async fn exists(tx: &mut sqlx::PgConnection, table: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table)
        .fetch_one(tx)
        .await?)
}

/// Keeps the partitions every [`INTERVAL`] until the term ends; retries
/// sooner after a failure.
pub async fn run(ctx: TermContext, retention: Option<Duration>) {
    let TermContext {
        pool,
        mut db_ready,
        metrics,
        stop,
        ..
    } = ctx;
    tokio::select! {
        () = stop.cancelled() => return,
        _ = db_ready.wait_for(|ready| *ready) => {}
    }
    let mut backoff = Backoff::new(Duration::from_secs(1), INTERVAL);
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        loop {
            match upkeep(&pool, Utc::now(), retention).await {
                Ok(done) => {
                    backoff.reset();
                    record(&metrics, &done);
                    break;
                }
                Err(e) => {
                    metrics.history_partition_errors.increment(1);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "keeping the history partitions failed");
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

fn record(metrics: &Metrics, done: &Upkeep) {
    metrics.history_partitions.set(done.partitions as f64);
    metrics
        .history_partitions_created
        .increment(done.created.len() as u64);
    metrics
        .history_partitions_dropped
        .increment(done.dropped.len() as u64);
    for m in &done.created {
        tracing::info!(partition = %m.table(), "history partition created");
    }
    for m in &done.dropped {
        tracing::info!(partition = %m.table(), "history partition dropped: past retention");
    }
    if done.moved > 0 {
        tracing::info!(
            rows = done.moved,
            "history rows moved from the default partition to their month"
        );
    }
    if done.expired > 0 {
        tracing::info!(
            rows = done.expired,
            "history rows past retention deleted from the default partition"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(year: i32, month: u32) -> Month {
        Month::new(year, month).unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn months_name_their_tables_and_back() {
        assert_eq!(m(2026, 12).table(), "connection_history_p202612");
        assert_eq!(m(2026, 12).next(), m(2027, 1));
        assert_eq!(m(2026, 12).start(), at("2026-12-01T00:00:00Z"));
        assert_eq!(Month::of(at("2027-01-31T23:59:59.999Z")), m(2027, 1));
        assert_eq!(
            Month::from_table("connection_history_p202612"),
            Some(m(2026, 12))
        );
        for other in [
            "connection_history_default",
            "connection_history_p2026",
            "connection_history_p202613",
            "connection_history_p20261x",
            "connection_history_ids",
        ] {
            assert_eq!(Month::from_table(other), None, "{other}");
        }
        assert!(Month::new(2026, 0).is_none());
    }

    #[test]
    fn a_month_is_kept_until_all_of_it_is_past_retention() {
        let now = at("2026-12-15T12:00:00Z");
        assert_eq!(first_kept(now, None), None);
        assert_eq!(first_kept(now, Some(DAY * 14)), Some(m(2026, 12)));
        // 2026-11-30T12:00 is still within 15 days: November stays.
        assert_eq!(first_kept(now, Some(DAY * 15)), Some(m(2026, 11)));
        assert_eq!(first_kept(now, Some(DAY * 400)), Some(m(2025, 11)));
    }

    #[test]
    fn the_plan_creates_ahead_and_drops_behind() {
        let now = at("2026-12-15T12:00:00Z");
        let existing = [m(2025, 10), m(2025, 11), m(2026, 11), m(2026, 12)];
        let p = plan(now, Some(DAY * 400), &existing, &[]);
        assert_eq!(p.create, [m(2027, 1), m(2027, 2)]);
        assert_eq!(p.drop, [m(2025, 10)]);
        assert_eq!(p.expire_before, Some(at("2025-11-01T00:00:00Z")));
        // Kept forever: nothing dropped, nothing expired.
        let p = plan(now, None, &existing, &[]);
        assert_eq!(p.drop, []);
        assert_eq!(p.expire_before, None);
        // Done already: nothing to do.
        let all = [m(2026, 12), m(2027, 1), m(2027, 2)];
        assert_eq!(
            plan(now, Some(DAY * 400), &all, &[]),
            Plan {
                expire_before: Some(at("2025-11-01T00:00:00Z")),
                ..Plan::default()
            }
        );
    }

    #[test]
    fn rows_in_the_default_partition_get_their_month_when_it_is_kept() {
        let now = at("2026-12-15T12:00:00Z");
        let existing = [m(2026, 12), m(2027, 1), m(2027, 2)];
        // A late row of March 2026 (kept), one of 2024 (expired), one of 2030
        // (beyond the months created ahead: it waits for its month).
        let stray = [m(2026, 3), m(2024, 5), m(2030, 1), m(2026, 3)];
        let p = plan(now, Some(DAY * 400), &existing, &stray);
        assert_eq!(p.create, [m(2026, 3)]);
        assert_eq!(p.drop, []);
        // The year turns: the months ahead follow.
        let p = plan(at("2027-01-01T00:00:00Z"), None, &existing, &[]);
        assert_eq!(p.create, [m(2027, 3)]);
    }
}

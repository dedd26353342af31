//! The partitioned history: the migration from the unpartitioned table keeps
//! every row, the archive stays exactly-once, and the partition upkeep
//! creates, moves and drops months by an injected clock.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::PgPool;
use tracker_core::{ConnectionId, EndReason, HistoryRecord, Protocol};
use tracker_reaper::db::{insert_history, MIGRATOR};
use tracker_reaper::partitions::{months, upkeep, Month};
use tracker_reaper::rollup::refresh;

const DAY: Duration = Duration::from_secs(86_400);

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn record(id: ConnectionId, disconnected_at: DateTime<Utc>) -> HistoryRecord {
    HistoryRecord {
        connection_id: id,
        session_id: "s-1".parse().unwrap(),
        user_id: "ursula".parse().unwrap(),
        protocol: Protocol::Websocket,
        client_ip: Some("10.0.0.1".parse().unwrap()),
        user_agent: None,
        connected_at: disconnected_at - chrono::Duration::minutes(5),
        disconnected_at,
        last_heartbeat_at: disconnected_at,
        end_reason: EndReason::Closed,
        session_uid: Some("uid-1".into()),
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Every row as JSON, in a stable order: what a migration must not change.
async fn all_rows(pool: &PgPool) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT to_jsonb(h) FROM connection_history h ORDER BY connection_id, disconnected_at",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn partitioning_keeps_every_existing_row(pool: PgPool) {
    // The schema as it was before partitioning, with rows over 14 months.
    MIGRATOR.run_to(3, &pool).await.unwrap();
    sqlx::query(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, client_ip, \
             user_agent, connected_at, disconnected_at, last_heartbeat_at, end_reason, \
             archived_at, session_uid) \
         SELECT gen_random_uuid(), 's-' || (i % 7), 'u-' || (i % 5), 'vnc', \
             CASE WHEN i % 2 = 0 THEN '192.0.2.1'::inet END, \
             CASE WHEN i % 3 = 0 THEN 'agent ' || i END, \
             now() - i * interval '1 day' - interval '1 hour', now() - i * interval '1 day', \
             now() - i * interval '1 day', CASE WHEN i % 2 = 0 THEN 'closed' ELSE 'expired' END, \
             now(), CASE WHEN i % 4 = 0 THEN 'uid-' || i END \
         FROM generate_series(0, 420) i",
    )
    .execute(&pool)
    .await
    .unwrap();
    let before = all_rows(&pool).await;
    assert_eq!(before.len(), 421);

    MIGRATOR.run(&pool).await.unwrap();

    assert_eq!(all_rows(&pool).await, before);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_ids").await,
        421
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_default").await,
        0,
        "every existing row has its month"
    );
    let months = months(&pool).await.unwrap();
    assert!(months.len() >= 15, "{months:?}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pg_class WHERE relname = 'connection_history_unpartitioned'"
        )
        .await,
        0
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_re_archived_entry_stays_one_row(pool: PgPool) {
    // Milliseconds, as the store records them.
    let now = Utc::now().trunc_subsecs(3);
    let first = record(ConnectionId::new_random(), now);
    let done = insert_history(&pool, std::slice::from_ref(&first))
        .await
        .unwrap();
    assert_eq!(done.inserted, 1);
    // A new leader replays the batch its predecessor committed.
    let replay = insert_history(&pool, std::slice::from_ref(&first))
        .await
        .unwrap();
    assert_eq!((replay.inserted, replay.reused.len()), (0, 0));
    // After a Redis failover the same connection ends again, later, and in
    // another month: the first end stands, and it is no reject either.
    let again = HistoryRecord {
        disconnected_at: now + chrono::Duration::days(40),
        end_reason: EndReason::Expired,
        ..first.clone()
    };
    let twice = insert_history(&pool, &[again]).await.unwrap();
    assert_eq!((twice.inserted, twice.reused.len()), (0, 0));
    // Two leaders writing the same batch at once write it once.
    let batch: Vec<_> = (0..50)
        .map(|_| record(ConnectionId::new_random(), now))
        .collect();
    let (a, b) = tokio::join!(insert_history(&pool, &batch), insert_history(&pool, &batch));
    assert_eq!(a.unwrap().inserted + b.unwrap().inserted, 50);

    let rows: Vec<(DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT disconnected_at, end_reason FROM connection_history WHERE connection_id = $1",
    )
    .bind(first.connection_id.as_uuid())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "closed");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history").await,
        51
    );
    // A row deleted by hand gives its id back: the entry can be archived again.
    sqlx::query("DELETE FROM connection_history WHERE connection_id = $1")
        .bind(first.connection_id.as_uuid())
        .execute(&pool)
        .await
        .unwrap();
    let rewritten = insert_history(&pool, &[first]).await.unwrap();
    assert_eq!(rewritten.inserted, 1);
}

#[sqlx::test(migrations = "../../migrations")]
async fn max_duration_is_an_end_reason(pool: PgPool) {
    sqlx::query(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
             connected_at, disconnected_at, last_heartbeat_at, end_reason) \
         VALUES (gen_random_uuid(), 's', 'u', 'vnc', now(), now(), now(), 'max_duration')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let refused = sqlx::query(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
             connected_at, disconnected_at, last_heartbeat_at, end_reason) \
         VALUES (gen_random_uuid(), 's', 'u', 'vnc', now(), now(), now(), 'bored')",
    )
    .execute(&pool)
    .await;
    assert!(refused.is_err());
}

#[sqlx::test(migrations = "../../migrations")]
async fn upkeep_creates_ahead_moves_strays_and_drops_past_retention(pool: PgPool) {
    let retention = Some(DAY * 400);
    // A clock far ahead of the migration: its months are missing.
    let now = at("2031-06-15T12:00:00Z");
    let m = |y, mo| Month::new(y, mo).unwrap();
    // Rows that land in the default partition: one of a month the reaper
    // has not created yet, one beyond the months it creates ahead.
    let stray = record(ConnectionId::new_random(), at("2031-05-20T10:00:00Z"));
    let future = record(ConnectionId::new_random(), at("2031-12-01T00:00:00Z"));
    insert_history(&pool, &[stray.clone(), future.clone()])
        .await
        .unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_default").await,
        2
    );

    let done = upkeep(&pool, now, retention).await.unwrap();
    assert_eq!(
        done.created,
        [m(2031, 5), m(2031, 6), m(2031, 7), m(2031, 8)]
    );
    assert_eq!(done.moved, 1);
    // The months of the migration are all older than 400 days by now.
    assert!(!done.dropped.is_empty());
    assert_eq!(
        months(&pool).await.unwrap(),
        [m(2031, 5), m(2031, 6), m(2031, 7), m(2031, 8)]
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM connection_history_p203105 NATURAL JOIN connection_history_ids"
        )
        .await,
        1,
        "the moved row is in its month and keeps its id"
    );
    // Moved rows still refuse a second archive.
    let replay = insert_history(&pool, &[stray]).await.unwrap();
    assert_eq!(replay.inserted, 0);

    // Idempotent: nothing left to do at the same time.
    let again = upkeep(&pool, now, retention).await.unwrap();
    assert_eq!(
        (again.created.len(), again.dropped.len(), again.moved),
        (0, 0, 0)
    );
    assert_eq!(again.partitions, 4);

    // Time passes: December comes into range (the future row moves into it),
    // and 400 days later May and June 2031 are entirely past retention; their
    // ids go with them.
    let later = at("2032-08-10T00:00:00Z");
    let done = upkeep(&pool, later, retention).await.unwrap();
    assert_eq!(done.dropped, [m(2031, 5), m(2031, 6)]);
    assert!(done.created.contains(&m(2031, 12)), "{:?}", done.created);
    assert_eq!(done.moved, 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_ids").await,
        1,
        "only the December row's id is left"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_p203112").await,
        1
    );

    // Retention 0 keeps everything.
    let kept = upkeep(&pool, at("2040-01-01T00:00:00Z"), None)
        .await
        .unwrap();
    assert!(kept.dropped.is_empty());
}

#[sqlx::test(migrations = "../../migrations")]
async fn rows_past_retention_leave_the_default_partition(pool: PgPool) {
    let now = at("2031-06-15T12:00:00Z");
    upkeep(&pool, now, Some(DAY * 30)).await.unwrap();
    // A late row of a month long dropped lands in the default partition.
    let late = record(ConnectionId::new_random(), at("2030-01-10T00:00:00Z"));
    insert_history(&pool, std::slice::from_ref(&late))
        .await
        .unwrap();
    let done = upkeep(&pool, now, Some(DAY * 30)).await.unwrap();
    assert_eq!(done.expired, 1);
    assert!(done.created.is_empty(), "{:?}", done.created);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history").await,
        0
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM connection_history_ids").await,
        0
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn the_rollup_refreshes_ended_days_and_retention_takes_them(pool: PgPool) {
    let dirty = |pool: PgPool| async move {
        sqlx::query_scalar::<_, DateTime<Utc>>(
            "SELECT day FROM connection_usage_dirty ORDER BY day",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // One connection on the 10th, one across the night into the 12th.
    let a = record(ConnectionId::new_random(), at("2031-03-10T10:05:00Z"));
    let mut b = record(ConnectionId::new_random(), at("2031-03-12T01:00:00Z"));
    b.connected_at = at("2031-03-11T23:00:00Z");
    insert_history(&pool, &[a, b]).await.unwrap();
    let days = [
        at("2031-03-10T00:00:00Z"),
        at("2031-03-11T00:00:00Z"),
        at("2031-03-12T00:00:00Z"),
    ];
    assert_eq!(dirty(pool.clone()).await, days);

    // On the 12th at noon, the 10th and the 11th have ended; the 12th not.
    let refreshed = refresh(&pool, at("2031-03-12T12:00:00Z")).await.unwrap();
    assert_eq!(refreshed, 2);
    assert_eq!(dirty(pool.clone()).await, days[2..]);
    let rolled: Vec<(String, DateTime<Utc>, String, f64, i64, i32)> = sqlx::query_as(
        "SELECT group_by, day, key, connected_seconds, connections, peak_concurrent \
         FROM connection_usage_daily ORDER BY group_by, day, key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row =
        |kind: &str, day, key: &str, secs, n| (kind.to_owned(), day, key.to_owned(), secs, n, 1);
    assert_eq!(
        rolled,
        [
            row("session", days[0], "s-1", 300.0, 1),
            row("session", days[1], "s-1", 3600.0, 1),
            row("user", days[0], "ursula", 300.0, 1),
            row("user", days[1], "ursula", 3600.0, 1),
        ]
    );
    // Nothing ended since: nothing to do.
    assert_eq!(refresh(&pool, at("2031-03-12T12:00:00Z")).await.unwrap(), 0);

    // Retention takes the usage of the days it drops.
    upkeep(&pool, at("2031-06-15T00:00:00Z"), Some(DAY * 30))
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM connection_usage_daily) + \
                (SELECT count(*) FROM connection_usage_dirty)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, 0);
}

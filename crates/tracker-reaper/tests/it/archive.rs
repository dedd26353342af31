//! Sweep and archive: every finished connection is exactly one history row.

use std::time::Duration;

use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::EndReason;

use crate::helpers::{eventually, metric, sid, Env, Proxy, Reaper};

async fn closed_and_expired_become_one_row_each(backend: Backend, pool: &PgPool) {
    let env = Env::new(backend, Duration::from_secs(5), pool).await;
    let mut reaper = Reaper::start(env.config(), env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(5)).await;

    let mut closed = Vec::new();
    let mut left = Vec::new();
    for i in 0..40 {
        let session = format!("s-{}", i % 7);
        let id = env.connect(&session, "alice").await;
        if i % 2 == 0 {
            assert_eq!(
                env.store.close(&sid(&session), id).await.unwrap(),
                Some(EndReason::Closed)
            );
            closed.push(id);
        } else {
            left.push(id);
        }
    }
    // Let the other half die: no heartbeat for longer than the window.
    env.clock.advance(Duration::from_secs(6));
    eventually(Duration::from_secs(10), "all rows archived", || async {
        (env.history_rows().await == 40).then_some(())
    })
    .await;

    let rows: Vec<(uuid::Uuid, String, Option<String>, String, String)> = sqlx::query_as(
        "SELECT connection_id, end_reason, host(client_ip), user_agent, protocol FROM connection_history",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for (id, reason, ip, ua, proto) in rows {
        let expected = if closed.iter().any(|c| c.as_uuid() == id) {
            "closed"
        } else {
            "expired"
        };
        assert_eq!(reason, expected);
        assert_eq!(ip.as_deref(), Some("10.1.2.3"));
        assert_eq!(ua, "it/1.0");
        assert_eq!(proto, "websocket");
    }
    let (_, text) = eventually(Duration::from_secs(5), "backlog gauge at 0", || async {
        let (s, t) = reaper.get("/metrics").await;
        (metric(&t, "tracker_reaper_archived_rows_total") == 40.0
            && metric(&t, "tracker_reaper_archive_backlog_rows") == 0.0)
            .then_some((s, t))
    })
    .await;
    assert_eq!(
        metric(&text, "tracker_reaper_expired_connections_total"),
        20.0
    );
    assert!(text.contains("tracker_reaper_sweep_duration_seconds_bucket"));
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn closed_and_expired_connections_become_one_row_each_standalone(pool: PgPool) {
    closed_and_expired_become_one_row_each(Backend::Standalone, &pool).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn closed_and_expired_connections_become_one_row_each_cluster(pool: PgPool) {
    closed_and_expired_become_one_row_each(Backend::Cluster, &pool).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_postgres_outage_loses_nothing(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let opts = pool.connect_options();
    let pg: std::net::SocketAddr = format!("{}:{}", opts.get_host(), opts.get_port())
        .parse()
        .unwrap();
    let proxy = Proxy::start(pg, false).await;
    let mut cfg = env.config();
    cfg.database_url = tracker_reaper::config::Secret::new(env.db_url.replacen(
        &format!(":{}/", opts.get_port()),
        &format!(":{}/", proxy.addr.port()),
        1,
    ));
    assert!(
        cfg.database_url
            .expose()
            .contains(&proxy.addr.port().to_string()),
        "{}",
        env.db_url
    );
    let mut reaper = Reaper::start(cfg, env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(5)).await;

    for i in 0..30 {
        let session = format!("s-{}", i % 3);
        let id = env.connect(&session, "bob").await;
        env.store.close(&sid(&session), id).await.unwrap();
    }
    // Down: the backlog shows, errors are counted, nothing is written or dropped.
    eventually(
        Duration::from_secs(10),
        "backlog and errors exposed",
        || async {
            let (_, t) = reaper.get("/metrics").await;
            (metric(&t, "tracker_reaper_archive_backlog_rows") == 30.0
                && metric(&t, "tracker_reaper_archive_errors_total") >= 2.0)
                .then_some(())
        },
    )
    .await;
    assert_eq!(env.history_rows().await, 0);
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 30);

    // Back: the backlog drains, each connection once.
    proxy.set_enabled(true);
    eventually(Duration::from_secs(30), "backlog drained", || async {
        (env.history_rows().await == 30 && env.store.outbox_backlog().await.unwrap() == 0)
            .then_some(())
    })
    .await;
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_replayed_batch_writes_nothing_twice(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    for _ in 0..3 {
        let id = env.connect("s-1", "carol").await;
        env.store.close(&sid("s-1"), id).await.unwrap();
    }
    let shard = env.store.keys().shard_of(&sid("s-1"));
    let entries = env.store.outbox_read(shard, 500).await.unwrap();
    let records: Vec<_> = entries.iter().map(|e| e.record.clone()).collect();
    assert_eq!(
        tracker_reaper::db::insert_history(&pool, &records)
            .await
            .unwrap(),
        3
    );
    // A crash between the commit and the acknowledgement replays the batch.
    assert_eq!(
        tracker_reaper::db::insert_history(&pool, &records)
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.history_rows().await, 3);
}

#[sqlx::test(migrations = false)]
async fn migrations_apply_once_when_two_replicas_start_together(pool: PgPool) {
    let (a, b) = tokio::join!(
        tracker_reaper::db::migrate(&pool),
        tracker_reaper::db::migrate(&pool)
    );
    a.unwrap();
    b.unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename IN ('connection_history', 'session_events') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for expected in [
        "connection_history_session_time",
        "connection_history_user_time",
        "session_events_session_time",
    ] {
        assert!(indexes.iter().any(|i| i == expected), "{indexes:?}");
    }
}

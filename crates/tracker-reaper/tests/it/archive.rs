//! Sweep and archive: every finished connection is exactly one history row.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracker_core::testing::Backend;
use tracker_core::{ConnectionId, EndReason};
use tracker_reaper::archiver::{archive_pass, Pass};
use tracker_reaper::metrics::Metrics;

use tracker_e2e::proxy::Proxy;

use crate::helpers::{eventually, metric, sid, Env, Reaper};

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

/// With a backstop of 40 hours, only the outbox's signal can explain an
/// archive within seconds.
async fn a_signal_archives_without_waiting_for_the_poll(backend: Backend, pool: &PgPool) {
    let env = Env::new(backend, Duration::from_secs(60), pool).await;
    let mut cfg = env.config();
    cfg.archive_interval = Duration::from_secs(3600);
    let mut reaper = Reaper::start(cfg, env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(5)).await;

    // The first row may come from the term's first pass over every shard;
    // once it is written, that pass has read this session's shard for good.
    let first = env.connect("s-1", "alice").await;
    env.store.close(&sid("s-1"), first).await.unwrap();
    eventually(Duration::from_secs(10), "the first row", || async {
        (env.history_rows().await == 1).then_some(())
    })
    .await;
    for round in 2..=4 {
        let id = env.connect("s-1", "alice").await;
        env.store.close(&sid("s-1"), id).await.unwrap();
        eventually(Duration::from_secs(5), "the signalled row", || async {
            (env.history_rows().await == round).then_some(())
        })
        .await;
    }
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_signal_archives_without_waiting_for_the_poll_standalone(pool: PgPool) {
    a_signal_archives_without_waiting_for_the_poll(Backend::Standalone, &pool).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_signal_archives_without_waiting_for_the_poll_cluster(pool: PgPool) {
    a_signal_archives_without_waiting_for_the_poll(Backend::Cluster, &pool).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_postgres_outage_loses_nothing(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let opts = pool.connect_options();
    let pg: std::net::SocketAddr = format!("{}:{}", opts.get_host(), opts.get_port())
        .parse()
        .unwrap();
    // Cut from the start: PostgreSQL is down.
    let proxy = Proxy::start(pg).await.unwrap();
    proxy.set_enabled(false);
    let mut cfg = env.config();
    cfg.database_url = tracker_reaper::config::Secret::new(env.db_url.replacen(
        &format!(":{}/", opts.get_port()),
        &format!(":{}/", proxy.addr().port()),
        1,
    ));
    assert!(
        cfg.database_url
            .expose()
            .contains(&proxy.addr().port().to_string()),
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
    let first = tracker_reaper::db::insert_history(&pool, &records)
        .await
        .unwrap();
    assert_eq!((first.inserted, first.reused.len()), (3, 0));
    // A crash between the commit and the acknowledgement replays the batch.
    let replay = tracker_reaper::db::insert_history(&pool, &records)
        .await
        .unwrap();
    assert_eq!((replay.inserted, replay.reused.len()), (0, 0));
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
        "SELECT indexname::text FROM pg_indexes WHERE tablename IN ('connection_history', 'connection_history_rejects', 'session_events') ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for expected in [
        "connection_history_rejects_entry",
        "connection_history_rejects_time",
        "connection_history_session_time",
        "connection_history_user_time",
        "session_events_session_time",
    ] {
        assert!(indexes.iter().any(|i| i == expected), "{indexes:?}");
    }
}

/// Appends an entry to the outbox of `session`'s shard as the store's scripts
/// would, but with any bytes: the store itself writes only what it validated.
async fn raw_outbox_entry(env: &Env, session: &str, fields: &[(&str, &[u8])]) -> String {
    let (urls, _) = Backend::Standalone.urls();
    let mut raw = redis::Client::open(urls[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let shard = env.store.keys().shard_of(&sid(session));
    let mut cmd = redis::cmd("XADD");
    cmd.arg(
        env.store
            .keys()
            .shard_key(shard, tracker_core::ShardKey::Outbox),
    )
    .arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(&mut raw).await.unwrap()
}

/// A complete `closed` history entry, written as the close script would
/// write it but with any bytes in its user agent.
async fn closed_entry(env: &Env, session: &str, id: ConnectionId, user: &str, ip: &str, ua: &[u8]) {
    let now = (chrono::Utc::now().timestamp_millis() + env.clock.millis()).to_string();
    let cid = id.to_string();
    raw_outbox_entry(
        env,
        session,
        &[
            ("c", cid.as_bytes()),
            ("s", session.as_bytes()),
            ("u", user.as_bytes()),
            ("p", b"websocket"),
            ("ip", ip.as_bytes()),
            ("ua", ua),
            ("ca", now.as_bytes()),
            ("da", now.as_bytes()),
            ("hb", now.as_bytes()),
            ("r", b"closed"),
        ],
    )
    .await;
}

/// A complete history entry whose user agent is `ua`.
async fn entry_with_user_agent(env: &Env, session: &str, ua: &[u8]) -> ConnectionId {
    let id = ConnectionId::new_random();
    closed_entry(env, session, id, "mallory", "10.1.2.3", ua).await;
    id
}

/// The outbox entry of a connection `id` that lived in `session` and was
/// closed. The store refuses to register an id twice, so a reused id reaches
/// the archiver only when it slipped past the id index (an id reused after
/// the index forgot it).
async fn connect_and_close(env: &Env, session: &str, id: ConnectionId) {
    closed_entry(env, session, id, "dave", "", b"it/1.0").await;
}

async fn pass(env: &Env, pool: &PgPool, metrics: &Metrics) -> Pass {
    archive_pass(&env.store, pool, metrics, &CancellationToken::new()).await
}

/// (connection id, payload, error) of every reject, oldest first.
async fn rejects(pool: &PgPool) -> Vec<(Option<uuid::Uuid>, String, String)> {
    sqlx::query_as(
        "SELECT connection_id, payload, error FROM connection_history_rejects ORDER BY reject_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn archived_ids(pool: &PgPool) -> Vec<uuid::Uuid> {
    sqlx::query_scalar("SELECT connection_id FROM connection_history ORDER BY connection_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn rejected(metrics: &Metrics, reason: &str) -> f64 {
    metric(
        &metrics.render(),
        &format!("tracker_reaper_history_rejected_total{{reason=\"{reason}\"}}"),
    )
}

#[sqlx::test(migrations = "../../migrations")]
async fn entries_postgres_refuses_are_set_aside_and_the_rest_archived(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let metrics = Metrics::new();
    // One shard, one batch: good entries with two refused ones among them, so
    // the split has to go several levels down on both sides.
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for i in 0..30 {
        if i == 7 || i == 19 {
            bad.push(entry_with_user_agent(&env, "s-1", b"agent\0with a NUL").await);
        } else {
            let id = env.connect("s-1", "alice").await;
            env.store.close(&sid("s-1"), id).await.unwrap();
            good.push(id.as_uuid());
        }
    }
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 30);

    let first = pass(&env, &pool, &metrics).await;
    assert_eq!(
        first,
        Pass {
            archived: 30,
            failed: false
        }
    );
    good.sort();
    assert_eq!(archived_ids(&pool).await, good, "each good entry once");
    assert_eq!(
        env.store.outbox_backlog().await.unwrap(),
        0,
        "outbox drained"
    );
    let rejects = rejects(&pool).await;
    let ids: Vec<_> = rejects.iter().map(|r| r.0).collect();
    assert_eq!(
        ids,
        bad.iter().map(|b| Some(b.as_uuid())).collect::<Vec<_>>()
    );
    for (_, payload, error) in &rejects {
        assert!(error.contains("0x00") && error.contains("22021"), "{error}");
        // The payload is the entry, NUL escaped, and parses back to it.
        let json: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(json["record"]["user_agent"], "agent\0with a NUL");
        assert_eq!(json["record"]["session_id"], "s-1");
        assert!(json["entry_id"].is_string(), "{payload}");
    }
    assert_eq!(rejected(&metrics, "refused"), 2.0);
    assert_eq!(
        metric(&metrics.render(), "tracker_reaper_archived_rows_total"),
        28.0
    );
    assert_eq!(
        metric(&metrics.render(), "tracker_reaper_archive_errors_total"),
        0.0
    );

    // Nothing left to do, nothing counted twice.
    assert_eq!(pass(&env, &pool, &metrics).await, Pass::default());
    assert_eq!(rejected(&metrics, "refused"), 2.0);
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_redelivered_entry_is_not_a_reject(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let metrics = Metrics::new();
    for _ in 0..3 {
        let id = env.connect("s-1", "carol").await;
        env.store.close(&sid("s-1"), id).await.unwrap();
    }
    // A former leader committed the batch and died before acknowledging it.
    let shard = env.store.keys().shard_of(&sid("s-1"));
    let entries = env.store.outbox_read(shard, 500).await.unwrap();
    let records: Vec<_> = entries.iter().map(|e| e.record.clone()).collect();
    tracker_reaper::db::insert_history(&pool, &records)
        .await
        .unwrap();

    assert_eq!(
        pass(&env, &pool, &metrics).await,
        Pass {
            archived: 3,
            failed: false
        }
    );
    assert_eq!(env.history_rows().await, 3);
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 0);
    assert!(rejects(&pool).await.is_empty());
    assert_eq!(rejected(&metrics, "reused_id"), 0.0);
    assert_eq!(
        metric(&metrics.render(), "tracker_reaper_archived_rows_total"),
        0.0
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_reused_connection_id_with_other_content_is_a_reject(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let metrics = Metrics::new();
    let reused = ConnectionId::new_random();
    connect_and_close(&env, "s-1", reused).await;
    assert_eq!(pass(&env, &pool, &metrics).await.archived, 1);

    // The same id again: in another session; in the same session but later;
    // and twice within one batch (the first written, the second set aside).
    connect_and_close(&env, "s-2", reused).await;
    env.clock.advance(Duration::from_secs(1));
    connect_and_close(&env, "s-1", reused).await;
    let twice = ConnectionId::new_random();
    connect_and_close(&env, "s-3", twice).await;
    env.clock.advance(Duration::from_secs(1));
    connect_and_close(&env, "s-3", twice).await;

    let p = pass(&env, &pool, &metrics).await;
    assert_eq!(
        p,
        Pass {
            archived: 4,
            failed: false
        }
    );
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 0);
    assert_eq!(rejected(&metrics, "reused_id"), 3.0);
    let mut ids = vec![reused.as_uuid(), twice.as_uuid()];
    ids.sort();
    assert_eq!(archived_ids(&pool).await, ids);
    // The first archived row stands.
    let session: String =
        sqlx::query_scalar("SELECT session_id FROM connection_history WHERE connection_id = $1")
            .bind(reused.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(session, "s-1");
    let rejects = rejects(&pool).await;
    assert_eq!(rejects.len(), 3);
    for (id, payload, error) in &rejects {
        assert!(
            error.contains("already archived for another connection"),
            "{error}"
        );
        let json: serde_json::Value = serde_json::from_str(payload).unwrap();
        assert_eq!(json["record"]["connection_id"], id.unwrap().to_string());
    }
    let reused_sessions: Vec<_> = rejects
        .iter()
        .filter(|r| r.0 == Some(reused.as_uuid()))
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.1).unwrap()["record"]["session_id"].clone()
        })
        .collect();
    assert_eq!(reused_sessions.len(), 2, "{rejects:?}");
    assert!(reused_sessions.contains(&"s-2".into()), "{rejects:?}");
    assert!(reused_sessions.contains(&"s-1".into()), "{rejects:?}");
}

#[sqlx::test(migrations = "../../migrations")]
async fn entries_that_are_not_history_records_are_set_aside(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let metrics = Metrics::new();
    let good = env.connect("s-1", "alice").await;
    env.store.close(&sid("s-1"), good).await.unwrap();
    // No end reason, an id that is no id; and a user agent that is not UTF-8.
    raw_outbox_entry(&env, "s-1", &[("c", b"not-a-uuid"), ("s", b"s-1")]).await;
    let not_utf8 = entry_with_user_agent(&env, "s-1", b"agent \xff\xfe").await;

    assert_eq!(
        pass(&env, &pool, &metrics).await,
        Pass {
            archived: 3,
            failed: false
        }
    );
    assert_eq!(archived_ids(&pool).await, vec![good.as_uuid()]);
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 0);
    assert_eq!(rejected(&metrics, "malformed"), 2.0);
    let rejects = rejects(&pool).await;
    assert_eq!(rejects.len(), 2);
    assert_eq!(rejects[0].0, None);
    assert!(rejects[0].2.contains("\"c\""), "{}", rejects[0].2);
    let json: serde_json::Value = serde_json::from_str(&rejects[0].1).unwrap();
    assert_eq!(json["fields"]["c"], "not-a-uuid");
    assert_eq!(rejects[1].0, Some(not_utf8.as_uuid()));
    assert!(rejects[1].2.contains("\"ua\""), "{}", rejects[1].2);
}

#[sqlx::test(migrations = "../../migrations")]
async fn postgres_down_is_not_mistaken_for_refused_data(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let metrics = Metrics::new();
    let opts = pool.connect_options();
    let pg: std::net::SocketAddr = format!("{}:{}", opts.get_host(), opts.get_port())
        .parse()
        .unwrap();
    // Cut from the start: PostgreSQL is down.
    let proxy = Proxy::start(pg).await.unwrap();
    proxy.set_enabled(false);
    let via_proxy = tracker_reaper::db::pool(&env.db_url.replacen(
        &format!(":{}/", opts.get_port()),
        &format!(":{}/", proxy.addr().port()),
        1,
    ))
    .unwrap();
    let good = env.connect("s-1", "alice").await;
    env.store.close(&sid("s-1"), good).await.unwrap();
    let bad = entry_with_user_agent(&env, "s-1", b"\0").await;

    // Down: the pass fails, nothing is set aside or acknowledged.
    let down = pass(&env, &via_proxy, &metrics).await;
    assert!(down.failed, "{down:?}");
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 2);
    assert!(rejects(&pool).await.is_empty());
    assert_eq!(
        metric(&metrics.render(), "tracker_reaper_archive_errors_total"),
        1.0
    );

    proxy.set_enabled(true);
    assert_eq!(
        pass(&env, &via_proxy, &metrics).await,
        Pass {
            archived: 2,
            failed: false
        }
    );
    assert_eq!(archived_ids(&pool).await, vec![good.as_uuid()]);
    let rejects = rejects(&pool).await;
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].0, Some(bad.as_uuid()));
    assert_eq!(env.store.outbox_backlog().await.unwrap(), 0);
}

/// A database migrated by a release whose first migration had other comments
/// starts with today's text; a migration changed in any other way is still
/// refused.
#[sqlx::test(migrations = false)]
async fn a_reworded_migration_is_accepted_only_from_its_released_text(pool: PgPool) {
    tracker_reaper::db::migrate(&pool).await.unwrap();
    let checksum = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT encode(checksum, 'hex') FROM _sqlx_migrations WHERE version = 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let today = checksum(pool.clone()).await;
    let set = |hex: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "UPDATE _sqlx_migrations SET checksum = decode($1, 'hex') WHERE version = 1",
            )
            .bind(hex)
            .execute(&pool)
            .await
            .unwrap();
        }
    };

    set("68097fd21edec53c0ada341e504136183698e67b04f953dcd90df72bb0cbd6fa6e726bf52cc56b1134efb74f5fed0200").await;
    tracker_reaper::db::migrate(&pool).await.unwrap();
    assert_eq!(checksum(pool.clone()).await, today);

    set("00").await;
    assert!(tracker_reaper::db::migrate(&pool).await.is_err());
    assert_eq!(checksum(pool.clone()).await, "00");
}

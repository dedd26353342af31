//! History from PostgreSQL, newest first; 503 without a database.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tracker_api::history::History;
use tracker_core::testing::Backend;

use crate::helpers::*;

// The project's own migrations, so the endpoint is tested against the real schema.
#[sqlx::test(migrations = "../../migrations")]
async fn history_is_newest_first_and_pages(pool: PgPool) {
    for (i, minute) in [(1, 10), (2, 30), (3, 20)] {
        sqlx::query(
            "INSERT INTO connection_history VALUES ($1, 'hist-1', 'alice', 'vnc', '10.0.0.1', 'ua',
             '2024-05-01T10:00:00Z', $2, $2, 'closed', now())",
        )
        .bind(uuid::Uuid::from_u128(i))
        .bind(
            format!("2024-05-01T10:{minute}:00.123Z")
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap(),
        )
        .execute(&pool)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO connection_history VALUES ($1, 'other', 'bob', 'http', NULL, NULL,
         now(), now(), now(), 'expired', now())",
    )
    .bind(uuid::Uuid::from_u128(9))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO session_events VALUES ($1, 'hist-1', 'streamspace', 'hibernated', 'idle', now(), '{\"idle_seconds\": 1800}')",
    )
    .bind(uuid::Uuid::new_v4())
    .execute(&pool)
    .await
    .unwrap();

    let opts = Options {
        history: Some(History::from_pool(pool, Duration::from_secs(2))),
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let svc = service_token();
    let res = app.get("/v1/sessions/hist-1/history?limit=2", &svc).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    let conns = body["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 2);
    assert_eq!(conns[0]["disconnected_at"], "2024-05-01T10:30:00.123Z");
    assert_eq!(conns[1]["disconnected_at"], "2024-05-01T10:20:00.123Z");
    assert_eq!(conns[0]["client_ip"], "10.0.0.1");
    assert_eq!(conns[0]["end_reason"], "closed");
    assert_eq!(body["events"][0]["event_type"], "hibernated");
    assert_eq!(body["events"][0]["details"]["idle_seconds"], 1800);

    let res = app
        .get(
            "/v1/sessions/hist-1/history?before=2024-05-01T10:20:00.123Z",
            &svc,
        )
        .await;
    let body: Value = res.json().await.unwrap();
    let conns = body["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1);
    assert_eq!(
        conns[0]["connection_id"],
        uuid::Uuid::from_u128(1).to_string()
    );
}

#[tokio::test]
async fn history_without_a_database_is_503() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let (status, code, _) =
        error_code(app.get("/v1/sessions/any/history", &service_token()).await).await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
}

#[tokio::test]
async fn history_with_postgres_down_is_a_quick_503() {
    let history = History::connect_lazy(
        "postgres://postgres@127.0.0.1:1/none",
        Duration::from_millis(500),
    )
    .unwrap();
    let opts = Options {
        history: Some(history),
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let started = std::time::Instant::now();
    let (status, code, _) =
        error_code(app.get("/v1/sessions/any/history", &service_token()).await).await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A Session deleted and created again under the same name is another
/// session: its owner reads its own history, not the previous resource's
/// (which a service or admin still sees).
#[sqlx::test(migrations = "../../migrations")]
async fn a_recreated_sessions_owner_sees_only_its_own_history(pool: PgPool) {
    for (i, resource) in [(1u128, "uid-previous"), (2, "uid-desk-9")] {
        sqlx::query(
            "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
                 connected_at, disconnected_at, last_heartbeat_at, end_reason, archived_at, \
                 session_uid) \
             VALUES ($1, 'desk-9', 'someone', 'vnc', now(), now(), now(), 'closed', now(), $2)",
        )
        .bind(uuid::Uuid::from_u128(i))
        .bind(resource)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO session_events VALUES ($1, 'desk-9', 'streamspace', 'hibernated', \
                 'idle_timeout', now(), jsonb_build_object('session_uid', $2::text))",
        )
        .bind(uuid::Uuid::from_u128(100 + i))
        .bind(resource)
        .execute(&pool)
        .await
        .unwrap();
    }
    let opts = Options {
        history: Some(History::from_pool(pool, Duration::from_secs(2))),
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    // The helper mirrors the Session as resource "uid-desk-9".
    app.mirror(
        "desk-9",
        Some("alice"),
        tracker_core::ResourceState::Running,
    )
    .await;

    let ids = |body: &Value, list: &str, key: &str| -> Vec<String> {
        body[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[key].as_str().unwrap().to_owned())
            .collect()
    };
    let res = app
        .get("/v1/sessions/desk-9/history", &token("alice", &["user"]))
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        ids(&body, "connections", "connection_id"),
        vec![uuid::Uuid::from_u128(2).to_string()]
    );
    assert_eq!(
        ids(&body, "events", "event_id"),
        vec![uuid::Uuid::from_u128(102).to_string()]
    );

    let res = app
        .get("/v1/sessions/desk-9/history", &service_token())
        .await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(ids(&body, "connections", "connection_id").len(), 2);
    assert_eq!(ids(&body, "events", "event_id").len(), 2);
}

//! `GET /v1/usage` against the real schema: the same answers from the
//! history alone and from the daily rollup, clipping to the range, peaks,
//! who may read what, and the refusals.

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tracker_api::history::History;
use tracker_core::testing::Backend;

use crate::helpers::*;

/// (user, session, connected_at, disconnected_at)
const ROWS: &[(&str, &str, &str, &str)] = &[
    // alice: two overlapping connections on March 10th.
    (
        "alice",
        "s-a",
        "2026-03-10T10:00:00Z",
        "2026-03-10T12:00:00Z",
    ),
    (
        "alice",
        "s-a",
        "2026-03-10T11:00:00Z",
        "2026-03-10T13:00:00Z",
    ),
    // alice again on the 11th, alone.
    (
        "alice",
        "s-a2",
        "2026-03-11T08:00:00Z",
        "2026-03-11T08:30:00.500Z",
    ),
    // bob: across the midnight the range starts at.
    ("bob", "s-b", "2026-03-09T23:00:00Z", "2026-03-10T01:00:00Z"),
    // carol: before the range, ending exactly where it starts.
    (
        "carol",
        "s-c",
        "2026-03-09T20:00:00Z",
        "2026-03-10T00:00:00Z",
    ),
];

async fn seed(pool: &PgPool) {
    for (i, (user, session, from, to)) in ROWS.iter().enumerate() {
        sqlx::query(
            "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
                 connected_at, disconnected_at, last_heartbeat_at, end_reason) \
             VALUES ($1, $2, $3, 'vnc', $4::timestamptz, $5::timestamptz, $5::timestamptz, 'closed')",
        )
        .bind(uuid::Uuid::from_u128(i as u128 + 1))
        .bind(session)
        .bind(user)
        .bind(from)
        .bind(to)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// What the reaper's rollup upkeep does for every ended day.
async fn refresh_rollup(pool: &PgPool) {
    let days: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT day FROM connection_usage_dirty ORDER BY day")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(!days.is_empty());
    for day in days {
        sqlx::query("SELECT connection_usage_refresh($1)")
            .bind(day)
            .execute(pool)
            .await
            .unwrap();
    }
    let dirty: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_usage_dirty")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(dirty, 0);
}

async fn app(pool: &PgPool) -> TestApp {
    let opts = Options {
        history: Some(History::from_pool(pool.clone(), Duration::from_secs(5))),
        ..Options::default()
    };
    TestApp::spawn_with(Backend::Standalone, opts).await
}

async fn usage(app: &TestApp, query: &str, token: &str) -> Value {
    let res = app.get(&format!("/v1/usage?{query}"), token).await;
    assert_eq!(res.status(), 200, "{query}");
    res.json().await.unwrap()
}

fn row(key: &str, seconds: f64, connections: i64, peak: i64) -> Value {
    json!({"key": key, "connected_seconds": seconds, "connections": connections, "peak_concurrent": peak})
}

const TWO_DAYS: &str = "from=2026-03-10T00:00:00Z&to=2026-03-12T00:00:00Z";
const AN_HOUR: &str = "from=2026-03-10T11:30:00Z&to=2026-03-10T12:30:00Z";

/// The expected answers, whichever way they are computed.
async fn check_answers(app: &TestApp) {
    let svc = service_token();
    let body = usage(app, &format!("{TWO_DAYS}&group_by=user"), &svc).await;
    assert_eq!(body["from"], "2026-03-10T00:00:00.000Z");
    assert_eq!(body["to"], "2026-03-12T00:00:00.000Z");
    assert_eq!(body["group_by"], "user");
    assert_eq!(
        body["rows"],
        json!([
            row("alice", 14400.0 + 1800.5, 3, 2),
            row("bob", 3600.0, 1, 1)
        ])
    );
    let body = usage(app, &format!("{TWO_DAYS}&group_by=session"), &svc).await;
    assert_eq!(
        body["rows"],
        json!([
            row("s-a", 14400.0, 2, 2),
            row("s-a2", 1800.5, 1, 1),
            row("s-b", 3600.0, 1, 1)
        ])
    );
    // Clipped to the hour: 11:30-12:00 and 11:30-12:30, both at once.
    let body = usage(app, AN_HOUR, &svc).await;
    assert_eq!(body["group_by"], "user");
    assert_eq!(body["rows"], json!([row("alice", 5400.0, 2, 2)]));
    // A user's sessions (never from the rollup, which has no user per session).
    let body = usage(
        app,
        &format!("{TWO_DAYS}&group_by=session&user_id=bob"),
        &svc,
    )
    .await;
    assert_eq!(body["rows"], json!([row("s-b", 3600.0, 1, 1)]));
    // Only the 11th, from the middle of the 10th: bob is gone, alice's peak is 2.
    let body = usage(
        app,
        "from=2026-03-10T12:00:00Z&to=2026-03-12T00:00:00Z&user_id=alice",
        &svc,
    )
    .await;
    assert_eq!(body["rows"], json!([row("alice", 3600.0 + 1800.5, 2, 1)]));
    // Nothing in range: no rows.
    let body = usage(
        app,
        "from=2025-01-01T00:00:00Z&to=2025-02-01T00:00:00Z",
        &svc,
    )
    .await;
    assert_eq!(body["rows"], json!([]));
}

#[sqlx::test(migrations = "../../migrations")]
async fn usage_is_the_same_from_the_history_and_from_the_rollup(pool: PgPool) {
    seed(&pool).await;
    let app = app(&pool).await;
    // Freshly archived: every day is dirty, all is read from the history.
    check_answers(&app).await;
    refresh_rollup(&pool).await;
    let rolled: i64 = sqlx::query_scalar("SELECT count(*) FROM connection_usage_daily")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(rolled > 0);
    check_answers(&app).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_late_row_makes_its_day_read_from_the_history_again(pool: PgPool) {
    seed(&pool).await;
    refresh_rollup(&pool).await;
    let app = app(&pool).await;
    // A third connection of alice's, archived after the rollup: peak 3.
    sqlx::query(
        "INSERT INTO connection_history (connection_id, session_id, user_id, protocol, \
             connected_at, disconnected_at, last_heartbeat_at, end_reason) \
         VALUES (gen_random_uuid(), 's-a', 'alice', 'vnc', '2026-03-10T11:15:00Z', \
             '2026-03-10T11:45:00Z', '2026-03-10T11:45:00Z', 'expired')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let body = usage(&app, &format!("{TWO_DAYS}&user_id=alice"), &service_token()).await;
    assert_eq!(
        body["rows"],
        json!([row("alice", 14400.0 + 1800.5 + 1800.0, 4, 3)])
    );
    refresh_rollup(&pool).await;
    let body = usage(&app, &format!("{TWO_DAYS}&user_id=alice"), &service_token()).await;
    assert_eq!(
        body["rows"],
        json!([row("alice", 14400.0 + 1800.5 + 1800.0, 4, 3)])
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_user_reads_only_its_own_usage(pool: PgPool) {
    seed(&pool).await;
    let app = app(&pool).await;
    let alice = token("alice", &["user"]);
    let own = usage(&app, TWO_DAYS, &alice).await;
    assert_eq!(own["rows"].as_array().unwrap().len(), 1);
    assert_eq!(own["rows"][0]["key"], "alice");
    let named = usage(
        &app,
        &format!("{TWO_DAYS}&user_id=alice&group_by=session"),
        &alice,
    )
    .await;
    assert_eq!(named["rows"].as_array().unwrap().len(), 2);
    let (status, code, _) = error_code(
        app.get(&format!("/v1/usage?{TWO_DAYS}&user_id=bob"), &alice)
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let admin = usage(&app, &format!("{TWO_DAYS}&user_id=bob"), &admin_token()).await;
    assert_eq!(admin["rows"], json!([row("bob", 3600.0, 1, 1)]));
}

#[sqlx::test(migrations = "../../migrations")]
async fn bad_queries_name_their_field(pool: PgPool) {
    let app = app(&pool).await;
    let svc = service_token();
    for (query, field) in [
        ("to=2026-03-12T00:00:00Z", "from"),
        ("from=yesterday&to=2026-03-12T00:00:00Z", "from"),
        ("from=2026-03-12T00:00:00Z&to=2026-03-11T00:00:00Z", "to"),
        ("from=2025-03-12T00:00:00Z&to=2026-03-14T00:00:00Z", "to"),
        (
            "from=2026-03-10T00:00:00Z&to=2026-03-11T00:00:00Z&group_by=day",
            "group_by",
        ),
        (
            "from=2026-03-10T00:00:00Z&to=2026-03-11T00:00:00Z&user_id=%00",
            "user_id",
        ),
    ] {
        let (status, code, named) =
            error_code(app.get(&format!("/v1/usage?{query}"), &svc).await).await;
        assert_eq!(
            (status, code.as_str(), named.as_deref()),
            (400, "invalid_request", Some(field)),
            "{query}"
        );
    }
    let res = app
        .get(&format!("/v1/usage?{TWO_DAYS}"), "not a token")
        .await;
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn usage_without_a_database_is_503() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let (status, code, _) = error_code(
        app.get(&format!("/v1/usage?{TWO_DAYS}"), &service_token())
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (503, "unavailable"));
}

//! What the page reads, checked over plain HTTP: the session listing pages
//! through every known session exactly once, the events come newest first,
//! both need the service or admin role, and the page's assets carry their
//! security headers.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::{IdleTimeout, ResourceState, SessionMeta};

use crate::helpers::{admin_token, token, Api};

const WINDOW: Duration = Duration::from_secs(60);

/// Mirrors `n` sessions as the reaper's mirror would; answers their ids.
async fn mirror_sessions(api: &Api, n: usize) -> BTreeSet<String> {
    let term = api.store.newest_term().await.expect("read the term");
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("list-{i:03}");
        api.store
            .mirror_session(
                &SessionMeta {
                    session_id: id.parse().expect("a valid id"),
                    uid: Some(format!("uid-{id}")),
                    owner: Some(format!("user-{}", i % 3)),
                    idle_source: Default::default(),
                    state: ResourceState::Running,
                    idle_timeout: IdleTimeout::After(Duration::from_secs(1800)),
                    generation: None,
                    max_session_duration: None,
                    created_at: None,
                },
                term,
            )
            .await
            .expect("mirror a session");
        ids.insert(id);
    }
    ids
}

#[tokio::test]
async fn the_listing_pages_through_every_known_session_once() {
    for backend in Backend::ALL {
        let api = Api::spawn(backend, WINDOW, None).await;
        let expected = mirror_sessions(&api, 23).await;
        let admin = admin_token();
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        // 23 sessions by 4 must take at least 6 pages; a bounded walk.
        for _ in 0..50 {
            let path = match &cursor {
                Some(c) => format!("/v1/sessions?limit=4&cursor={c}"),
                None => "/v1/sessions?limit=4".to_owned(),
            };
            let (status, page) = api.get(&path, &admin).await;
            assert_eq!(status, 200, "{backend:?} {path}: {page}");
            let sessions = page["sessions"].as_array().expect("a sessions array");
            assert!(sessions.len() <= 4, "{backend:?}: page over its limit");
            for s in sessions {
                assert_eq!(s["state"], "idle", "{s}");
                assert!(s["owner"].as_str().is_some_and(|o| o.starts_with("user-")));
                seen.push(s["session_id"].as_str().expect("an id").to_owned());
            }
            cursor = page["next_cursor"].as_str().map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "{backend:?}: the walk did not end");
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            seen.len(),
            "{backend:?}: a session listed twice"
        );
        assert_eq!(unique, expected, "{backend:?}");

        // One page holds them all when it may.
        let (_, page) = api.get("/v1/sessions?limit=500", &admin).await;
        assert_eq!(page["sessions"].as_array().map(Vec::len), Some(23));
        assert_eq!(page["next_cursor"], Value::Null);
        api.stop().await;
    }
}

#[tokio::test]
async fn the_listing_is_for_operators_and_checks_its_query() {
    let api = Api::spawn(Backend::Standalone, WINDOW, None).await;
    let (status, _) = api.get("/v1/sessions", "").await;
    assert_eq!(status, 401);
    let (status, body) = api.get("/v1/sessions", &token("alice", &["user"])).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, body) = api.get("/v1/sessions", &token("proxy", &["service"])).await;
    assert_eq!(status, 200, "{body}");
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("cursor=nonsense", "cursor"),
        ("cursor=1%3ANot_A_Name", "cursor"),
    ] {
        let (status, body) = api
            .get(&format!("/v1/sessions?{query}"), &admin_token())
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}");
    }
    // The test store has 4 shards: a cursor at shard 4 is past the end, an
    // empty last page; an empty cursor is the first page.
    let (status, body) = api.get("/v1/sessions?cursor=4%3A", &admin_token()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        serde_json::json!({"sessions": [], "next_cursor": null})
    );
    let (status, body) = api.get("/v1/sessions?cursor=", &admin_token()).await;
    assert_eq!(status, 200, "{body}");
    // Without a database, the events are unavailable, not an error.
    let (status, body) = api.get("/v1/events", &admin_token()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable"))
    );
    api.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn events_come_newest_first_across_sessions(pool: PgPool) {
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    for (i, (session, kind)) in [
        ("s-a", "hibernated"),
        ("s-b", "hibernated"),
        ("s-a", "woken"),
        ("s-c", "dry_run_hibernate"),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO session_events (event_id, session_id, namespace, event_type, reason, occurred_at) \
             VALUES ($1, $2, 'streamspace', $3, 'test', $4)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(session)
        .bind(kind)
        .bind(base + chrono::Duration::minutes(i as i64))
        .execute(&pool)
        .await
        .expect("insert an event");
    }
    let api = Api::spawn(Backend::Standalone, WINDOW, Some(&pool)).await;
    let admin = admin_token();
    let kinds = |body: &Value| -> Vec<(String, String)> {
        body["events"]
            .as_array()
            .expect("an events array")
            .iter()
            .map(|e| {
                (
                    e["session_id"].as_str().unwrap_or_default().to_owned(),
                    e["event_type"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let (status, body) = api.get("/v1/events?limit=2", &admin).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        kinds(&body),
        [
            ("s-c".to_owned(), "dry_run_hibernate".to_owned()),
            ("s-a".to_owned(), "woken".to_owned())
        ]
    );
    let oldest_shown = body["events"][1]["occurred_at"].as_str().expect("a time");
    let (_, body) = api
        .get(
            &format!("/v1/events?before={}", oldest_shown.replace('+', "%2B")),
            &admin,
        )
        .await;
    assert_eq!(
        kinds(&body),
        [
            ("s-b".to_owned(), "hibernated".to_owned()),
            ("s-a".to_owned(), "hibernated".to_owned())
        ]
    );
    let (status, _) = api.get("/v1/events", &token("alice", &["user"])).await;
    assert_eq!(status, 403);
    let (status, body) = api.get("/v1/events?limit=0", &admin).await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("limit"))
    );
    api.stop().await;
}

#[tokio::test]
async fn the_page_and_its_assets_carry_their_headers_and_are_documented() {
    let api = Api::spawn(Backend::Standalone, WINDOW, None).await;
    for (path, kind) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
    ] {
        let res = api.http.get(api.url(path)).send().await.expect("an answer");
        assert_eq!(res.status(), 200, "{path}");
        let header = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{path}: {csp}");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{path}: {csp}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(header("set-cookie").is_empty(), "{path} sets a cookie");
    }
    let doc: Value = api
        .http
        .get(api.url("/openapi.json"))
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("JSON");
    for path in ["/ui", "/v1/sessions", "/v1/events"] {
        assert!(
            doc["paths"][path]["get"].is_object(),
            "{path} is not documented"
        );
    }
    api.stop().await;
}

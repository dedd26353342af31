//! Declared sessions: `PUT` and `DELETE /v1/sessions/{id}` on the platforms
//! without Kubernetes, and their refusal on `kubernetes`.

use serde_json::json;
use tracker_core::testing::Backend;
use tracker_core::SessionState;

use crate::helpers::{admin_token, error_code, service_token, token, Options, TestApp};

/// Nothing was stored for `s-1`: the request was refused before the store.
async fn assert_nothing_stored(app: &TestApp) {
    let view = app.store.session(&"s-1".parse().unwrap()).await.unwrap();
    assert!(view.is_none(), "{view:?}");
}

async fn docker_app() -> TestApp {
    let opts = Options {
        extra_args: vec![
            "--platform".into(),
            "docker".into(),
            "--default-idle-timeout".into(),
            "45m".into(),
        ],
        ..Options::default()
    };
    TestApp::spawn_with(Backend::Standalone, opts).await
}

impl TestApp {
    pub async fn put(&self, path: &str, token: &str, body: serde_json::Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_declared_session_is_created_then_updated_then_forgotten() {
    let app = docker_app().await;
    let body = json!({"user": "alice", "state": "running", "idle_timeout": "10m"});
    let res = app
        .put("/v1/sessions/desk-1", &service_token(), body.clone())
        .await;
    assert_eq!(res.status(), 201);
    let view: serde_json::Value = res.json().await.unwrap();
    assert_eq!(view["session_id"], "desk-1");
    assert_eq!(view["state"], "idle");
    assert_eq!(view["owner"], "alice");
    assert_eq!(view["idle_timeout_seconds"], 600);

    // Again, and a report of another state: 200, followed.
    let res = app.put("/v1/sessions/desk-1", &admin_token(), body).await;
    assert_eq!(res.status(), 200);
    let res = app
        .put(
            "/v1/sessions/desk-1",
            &service_token(),
            json!({"user": "alice", "state": "hibernated"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let view: serde_json::Value = res.json().await.unwrap();
    assert_eq!(view["state"], "hibernated");
    // No idle_timeout: the API's TRACKER_DEFAULT_IDLE_TIMEOUT.
    assert_eq!(view["idle_timeout_seconds"], 45 * 60);

    // Exempt, then the owner sees it like any session.
    let res = app
        .put(
            "/v1/sessions/desk-1",
            &service_token(),
            json!({"user": "alice", "state": "running", "auto_hibernate": false, "max_session_duration": "8h"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let view = app
        .store
        .session(&"desk-1".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.state, SessionState::Idle);
    assert_eq!(view.idle_timeout_seconds, None);
    let res = app
        .get("/v1/sessions/desk-1", &token("alice", &["user"]))
        .await;
    assert_eq!(res.status(), 200);

    let res = app.delete("/v1/sessions/desk-1", &service_token()).await;
    assert_eq!(res.status(), 204);
    let res = app.get("/v1/sessions/desk-1", &service_token()).await;
    assert_eq!(res.status(), 404);
    // Forgetting is idempotent.
    let res = app.delete("/v1/sessions/desk-1", &admin_token()).await;
    assert_eq!(res.status(), 204);
    // Declared again: a new session.
    let res = app
        .put(
            "/v1/sessions/desk-1",
            &service_token(),
            json!({"user": "bob", "state": "running"}),
        )
        .await;
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn only_service_and_admin_declare() {
    let app = docker_app().await;
    let body = json!({"user": "alice", "state": "running"});
    let res = app
        .put("/v1/sessions/s-1", &token("alice", &["user"]), body.clone())
        .await;
    assert_eq!(error_code(res).await.0, 403);
    let res = app
        .delete("/v1/sessions/s-1", &token("alice", &["user"]))
        .await;
    assert_eq!(error_code(res).await.0, 403);
    let res = app
        .client
        .put(app.url("/v1/sessions/s-1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await.0, 401);
    // Refused before anything was stored.
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn on_kubernetes_sessions_come_from_the_cluster() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let body = json!({"user": "alice", "state": "running"});
    let res = app.put("/v1/sessions/s-1", &service_token(), body).await;
    assert_eq!(error_code(res).await.0, 409);
    let res = app.delete("/v1/sessions/s-1", &admin_token()).await;
    let (status, code, _) = error_code(res).await;
    assert_eq!((status, code.as_str()), (409, "conflict"));
    assert_nothing_stored(&app).await;
}

#[tokio::test]
async fn bad_declarations_name_their_field() {
    let app = docker_app().await;
    let cases = [
        (json!({"state": "running"}), "user"),
        (json!({"user": "", "state": "running"}), "user"),
        (json!({"user": "al\u{1}ice", "state": "running"}), "user"),
        (json!({"user": "alice\u{7f}", "state": "running"}), "user"),
        (json!({"user": "alice"}), "state"),
        (json!({"user": "alice", "state": "sleeping"}), "state"),
        (json!({"user": "alice", "state": 3}), "state"),
        (
            json!({"user": "alice", "state": "running", "idle_timeout": "10 m"}),
            "idle_timeout",
        ),
        (
            json!({"user": "alice", "state": "running", "idle_timeout": "1\n0m"}),
            "idle_timeout",
        ),
        (
            json!({"user": "alice", "state": "running", "idle_timeout": "0s"}),
            "idle_timeout",
        ),
        (
            json!({"user": "alice", "state": "running", "idle_timeout": 600}),
            "idle_timeout",
        ),
        (
            json!({"user": "alice", "state": "running", "max_session_duration": "1d"}),
            "max_session_duration",
        ),
        (
            json!({"user": "alice", "state": "running", "auto_hibernate": "no"}),
            "auto_hibernate",
        ),
        (
            json!({"user": "alice", "state": "running", "image": "x"}),
            "image",
        ),
        (json!(["alice", "running"]), "body"),
    ];
    for (body, field) in cases {
        let res = app
            .put("/v1/sessions/s-1", &service_token(), body.clone())
            .await;
        let (status, code, named) = error_code(res).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}");
        assert_eq!(named.as_deref(), Some(field), "{body}");
    }
    // Not JSON at all, and a bad id.
    let res = app
        .client
        .put(app.url("/v1/sessions/s-1"))
        .bearer_auth(service_token())
        .body("user=alice")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(res).await.0, 400);
    let res = app
        .put(
            "/v1/sessions/Not_A_Name",
            &service_token(),
            json!({"user": "a", "state": "running"}),
        )
        .await;
    assert_eq!(error_code(res).await.0, 400);
    assert_nothing_stored(&app).await;
}

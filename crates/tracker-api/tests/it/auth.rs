//! The auth matrix: who gets which status on which route.

use serde_json::json;
use tracker_core::testing::Backend;
use tracker_core::ResourceState;

use crate::helpers::*;

/// name, token (None: no header), path, body, expected status, expected code.
type PostCase = (
    &'static str,
    Option<String>,
    String,
    serde_json::Value,
    u16,
    &'static str,
);

#[tokio::test]
async fn auth_matrix() {
    let app = TestApp::spawn(Backend::Standalone).await;
    app.mirror("alices", Some("alice"), ResourceState::Running)
        .await;
    app.mirror("bobs", Some("bob"), ResourceState::Running)
        .await;
    let alice = token("alice", &["user"]);
    let body = json!({"protocol": "vnc"});
    let reg = |s: &str| format!("/v1/sessions/{s}/connections");

    let expired = token_with(
        SECRET,
        json!({"sub": "alice", "roles": ["user"], "exp": now() - 3600}),
    );
    let forged = token_with(
        "not-the-secret",
        json!({"sub": "alice", "roles": ["admin"], "exp": now() + 600}),
    );
    let no_exp = token_with(SECRET, json!({"sub": "alice", "roles": ["admin"]}));
    let no_role = token_with(SECRET, json!({"sub": "alice", "exp": now() + 600}));
    let cases: Vec<PostCase> = vec![
        (
            "no token",
            None,
            reg("alices"),
            body.clone(),
            401,
            "unauthenticated",
        ),
        (
            "garbage token",
            Some("abc.def.ghi".into()),
            reg("alices"),
            body.clone(),
            401,
            "unauthenticated",
        ),
        (
            "bad signature",
            Some(forged),
            reg("alices"),
            body.clone(),
            401,
            "unauthenticated",
        ),
        (
            "expired",
            Some(expired),
            reg("alices"),
            body.clone(),
            401,
            "unauthenticated",
        ),
        (
            "no exp claim",
            Some(no_exp),
            reg("alices"),
            body.clone(),
            401,
            "unauthenticated",
        ),
        (
            "no role",
            Some(no_role),
            reg("alices"),
            body.clone(),
            403,
            "forbidden",
        ),
        (
            "user on another user's session",
            Some(alice.clone()),
            reg("bobs"),
            body.clone(),
            403,
            "forbidden",
        ),
        (
            "user on an unknown session",
            Some(alice.clone()),
            reg("nobodys"),
            body.clone(),
            404,
            "session_not_found",
        ),
        (
            "user acting as another user",
            Some(alice.clone()),
            reg("alices"),
            json!({"protocol": "vnc", "user_id": "bob"}),
            403,
            "forbidden",
        ),
        (
            "user on batch heartbeats",
            Some(alice.clone()),
            "/v1/heartbeats".into(),
            json!({"heartbeats": [{"session_id": "alices", "connection_id": uuid::Uuid::new_v4()}]}),
            403,
            "forbidden",
        ),
        (
            "user on own session",
            Some(alice.clone()),
            reg("alices"),
            body.clone(),
            201,
            "",
        ),
        (
            "user as itself",
            Some(alice.clone()),
            reg("alices"),
            json!({"protocol": "vnc", "user_id": "alice"}),
            201,
            "",
        ),
        (
            "service on any session",
            Some(service_token()),
            reg("bobs"),
            json!({"protocol": "vnc", "user_id": "bob"}),
            201,
            "",
        ),
        (
            "service on an unknown session",
            Some(service_token()),
            reg("nobodys"),
            body.clone(),
            201,
            "",
        ),
        (
            "admin on any session",
            Some(admin_token()),
            reg("bobs"),
            body.clone(),
            201,
            "",
        ),
    ];
    let mut failures = Vec::new();
    for (name, tok, path, body, status, code) in cases {
        let mut req = app.client.post(app.url(&path)).json(&body);
        if let Some(t) = tok {
            req = req.bearer_auth(t);
        }
        let (got, got_code, _) = error_code(req.send().await.unwrap()).await;
        if got != status || (!code.is_empty() && got_code != code) {
            failures.push(format!(
                "{name}: expected {status} {code}, got {got} {got_code}"
            ));
        }
    }

    // Reads follow the same rules.
    let gets: Vec<(&str, String, String, u16)> = vec![
        ("user stats", alice.clone(), "/v1/stats".into(), 403),
        ("service stats", service_token(), "/v1/stats".into(), 200),
        (
            "user own view",
            alice.clone(),
            "/v1/sessions/alices".into(),
            200,
        ),
        (
            "user other's view",
            alice.clone(),
            "/v1/sessions/bobs".into(),
            403,
        ),
        (
            "user other's list",
            alice.clone(),
            "/v1/sessions/bobs/connections".into(),
            403,
        ),
        (
            "user own list",
            alice.clone(),
            "/v1/sessions/alices/connections".into(),
            200,
        ),
        (
            "user unknown view",
            alice.clone(),
            "/v1/sessions/nobodys".into(),
            404,
        ),
    ];
    for (name, tok, path, status) in gets {
        let got = app.get(&path, &tok).await.status().as_u16();
        if got != status {
            failures.push(format!("{name}: expected {status}, got {got}"));
        }
    }

    // The query-string token is for the WebSocket path only.
    let res = app
        .client
        .get(app.url(&format!("/v1/stats?access_token={}", admin_token())))
        .send()
        .await
        .unwrap();
    if res.status() != 401 {
        failures.push(format!(
            "access_token off the ws path: got {}",
            res.status()
        ));
    }
    // A header that is not a bearer token is refused, not ignored.
    let res = app
        .client
        .get(app.url("/v1/stats"))
        .header("authorization", "Basic YWRtaW46YWRtaW4=")
        .send()
        .await
        .unwrap();
    if res.status() != 401 {
        failures.push(format!("basic auth: got {}", res.status()));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn users_act_on_connections_of_their_own_sessions_only() {
    let app = TestApp::spawn(Backend::Standalone).await;
    app.mirror("bobs-2", Some("bob"), ResourceState::Running)
        .await;
    let cid = app.register("bobs-2", "http").await;
    let alice = token("alice", &["user"]);
    let bob = token("bob", &["user"]);
    let hb = format!("/v1/sessions/bobs-2/connections/{cid}/heartbeat");
    assert_eq!(app.post(&hb, &alice, json!({})).await.status(), 403);
    assert_eq!(app.post(&hb, &bob, json!({})).await.status(), 200);
    // A session without owner is no session to a user (the heartbeat's own
    // script call checks the owner).
    let unowned = format!("/v1/sessions/nobodys-1/connections/{cid}/heartbeat");
    let res = app.post(&unowned, &bob, json!({})).await;
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "session_not_found");
    assert_eq!(
        app.get(&format!("/v1/connections/{cid}"), &alice)
            .await
            .status(),
        403
    );
    assert_eq!(
        app.get(&format!("/v1/connections/{cid}"), &bob)
            .await
            .status(),
        200
    );
    let close = format!("/v1/sessions/bobs-2/connections/{cid}");
    assert_eq!(app.delete(&close, &alice).await.status(), 403);
    assert_eq!(app.delete(&close, &bob).await.status(), 204);
}

#[tokio::test]
async fn auth_disabled_makes_everyone_an_admin() {
    let opts = Options {
        extra_args: vec!["--auth".into(), "disabled".into()],
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let res = app.client.get(app.url("/v1/stats")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

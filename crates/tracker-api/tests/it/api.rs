//! Two replicas on one store, registration outcomes, views and stats.

use std::time::Duration;

use serde_json::{json, Value};
use tracker_core::testing::Backend;
use tracker_core::ResourceState;

use crate::helpers::*;

async fn two_replicas_share_all_state(backend: Backend) {
    let a = TestApp::spawn(backend).await;
    let b = TestApp::spawn_on(&a.store_cfg, Options::default()).await;
    let svc = service_token();

    let res = a
        .post(
            "/v1/sessions/shared-1/connections",
            &svc,
            json!({"protocol": "vnc", "user_id": "alice", "client_ip": "2001:db8::1", "user_agent": "vncviewer/7"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let reg: Value = res.json().await.unwrap();
    let cid = reg["connection"]["connection_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(reg["connection"]["user_id"], "alice");
    assert_eq!(reg["connection"]["client_ip"], "2001:db8::1");
    assert_eq!(reg["heartbeat_interval_seconds"], 20);
    assert_eq!(reg["heartbeat_window_seconds"], 60);
    assert_eq!(reg["session"]["active_connections"], 1);

    // Heartbeat, list, look up and close on the other replica.
    let hb = b
        .post(
            &format!("/v1/sessions/shared-1/connections/{cid}/heartbeat"),
            &svc,
            json!({}),
        )
        .await;
    assert_eq!(hb.status(), 200);
    let hb: Value = hb.json().await.unwrap();
    assert!(hb["last_heartbeat"].as_str().unwrap().ends_with('Z'));
    assert!(hb["expires_at"].as_str().is_some());

    let list: Value = b
        .get("/v1/sessions/shared-1/connections", &svc)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["connections"].as_array().unwrap().len(), 1);
    assert_eq!(list["connections"][0]["connection_id"], cid.as_str());

    let one = b.get(&format!("/v1/connections/{cid}"), &svc).await;
    assert_eq!(one.status(), 200);
    let view: Value = b
        .get("/v1/sessions/shared-1", &svc)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["active_connections"], 1);
    assert_eq!(view["state"], "unknown");

    // A replay of the same connection id, on the other replica, is a 200.
    let replay = b
        .post(
            "/v1/sessions/shared-1/connections",
            &svc,
            json!({"protocol": "vnc", "user_id": "alice", "connection_id": cid}),
        )
        .await;
    assert_eq!(replay.status(), 200);

    let closed = b
        .delete(&format!("/v1/sessions/shared-1/connections/{cid}"), &svc)
        .await;
    assert_eq!(closed.status(), 204);
    let (status, code, _) = error_code(
        a.post(
            &format!("/v1/sessions/shared-1/connections/{cid}/heartbeat"),
            &svc,
            json!({}),
        )
        .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "connection_not_found"));
    let (status, code, _) = error_code(
        a.delete(&format!("/v1/sessions/shared-1/connections/{cid}"), &svc)
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "connection_not_found"));
    let (status, code, _) = error_code(a.get(&format!("/v1/connections/{cid}"), &svc).await).await;
    assert_eq!((status, code.as_str()), (404, "connection_not_found"));
}

#[tokio::test]
async fn two_replicas_share_all_state_standalone() {
    two_replicas_share_all_state(Backend::Standalone).await;
}

#[tokio::test]
async fn two_replicas_share_all_state_cluster() {
    two_replicas_share_all_state(Backend::Cluster).await;
}

#[tokio::test]
async fn batch_heartbeats_report_unknown_pairs() {
    for backend in Backend::ALL {
        let app = TestApp::spawn(backend).await;
        let svc = service_token();
        let mut pairs = Vec::new();
        for i in 0..20 {
            let sid = format!("batch-{i}");
            let cid = app.register(&sid, "http").await;
            pairs.push(json!({"session_id": sid, "connection_id": cid}));
        }
        let ghost = json!({"session_id": "batch-x", "connection_id": uuid::Uuid::new_v4()});
        pairs.push(ghost.clone());
        let res = app
            .post("/v1/heartbeats", &svc, json!({"heartbeats": pairs}))
            .await;
        assert_eq!(res.status(), 200, "{backend:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["alive"], 20);
        assert_eq!(body["unknown"], json!([ghost]));
        assert!(app
            .metrics()
            .await
            .contains("tracker_api_heartbeats_total{result=\"accepted\"} 20"));
    }
}

#[tokio::test]
async fn registration_outcomes_map_to_statuses() {
    let opts = Options {
        extra_args: vec!["--max-connections-per-session".into(), "1".into()],
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Standalone, opts).await;
    let svc = service_token();

    app.mirror("term-1", Some("alice"), ResourceState::Terminated)
        .await;
    let (status, code, _) = error_code(
        app.post(
            "/v1/sessions/term-1/connections",
            &svc,
            json!({"protocol": "http"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (409, "conflict"));

    app.register("limited-1", "http").await;
    let (status, code, _) = error_code(
        app.post(
            "/v1/sessions/limited-1/connections",
            &svc,
            json!({"protocol": "http"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (429, "connection_limit"));

    // A hibernated session is woken by a connection.
    app.mirror("sleepy-1", Some("alice"), ResourceState::Hibernated)
        .await;
    let res = app
        .post(
            "/v1/sessions/sleepy-1/connections",
            &svc,
            json!({"protocol": "websocket"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["session"]["state"], "waking");

    let metrics = app.metrics().await;
    assert!(
        metrics.contains("tracker_api_limit_rejections_total{limit=\"session\"} 1"),
        "{metrics}"
    );
    assert!(metrics
        .contains("tracker_api_registrations_total{protocol=\"http\",result=\"terminated\"} 1"));
    assert!(metrics.contains(
        "tracker_api_requests_total{route=\"/v1/sessions/{session_id}/connections\",method=\"POST\",status=\"4xx\"} 2"
    ));
}

#[tokio::test]
async fn user_limit_is_enforced_across_sessions() {
    let opts = Options {
        extra_args: vec!["--max-connections-per-user".into(), "2".into()],
        ..Options::default()
    };
    let app = TestApp::spawn_with(Backend::Cluster, opts).await;
    let svc = service_token();
    for (i, expected) in [(0, 201), (1, 201), (2, 429)] {
        let res = app
            .post(
                &format!("/v1/sessions/user-lim-{i}/connections"),
                &svc,
                json!({"protocol": "vnc", "user_id": "carol"}),
            )
            .await;
        assert_eq!(res.status(), expected, "connection {i}");
    }
}

#[tokio::test]
async fn session_views_and_stats() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let svc = service_token();
    let (status, code, _) = error_code(app.get("/v1/sessions/never-seen", &svc).await).await;
    assert_eq!((status, code.as_str()), (404, "session_not_found"));

    // Mirrored but never connected to: 200, idle.
    app.mirror("mirrored-1", Some("alice"), ResourceState::Running)
        .await;
    let view: Value = app
        .get("/v1/sessions/mirrored-1", &svc)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "idle");
    assert_eq!(view["owner"], "alice");
    assert_eq!(view["active_connections"], 0);

    app.register("mirrored-1", "vnc").await;
    let stats = app.get("/v1/stats", &admin_token()).await;
    assert_eq!(stats.status(), 200);
    let stats: Value = stats.json().await.unwrap();
    assert_eq!(stats["total_connections"], 1);
    assert_eq!(stats["connections_by_protocol"]["vnc"], 1);
    assert_eq!(stats["sessions_by_state"]["running"], 1);
    assert_eq!(stats["heartbeat_window_seconds"], 60);
}

#[tokio::test]
async fn ops_endpoints_answer() {
    let app = TestApp::spawn(Backend::Standalone).await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }
    let doc: Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/sessions/{session_id}/connections",
        "/v1/sessions/{session_id}/connections/{connection_id}/heartbeat",
        "/v1/sessions/{session_id}/connections/{connection_id}",
        "/v1/heartbeats",
        "/v1/sessions/{session_id}",
        "/v1/connections/{connection_id}",
        "/v1/sessions/{session_id}/history",
        "/v1/stats",
        "/v1/sessions/{session_id}/ws",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert!(doc["components"]["schemas"]["SessionView"].is_object());
}

#[tokio::test]
async fn shutdown_closes_the_listener() {
    let mut app = TestApp::spawn(Backend::Standalone).await;
    let client = app.client.clone();
    let url = app.url("/readyz");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    app.stop().await;
    // Stopped: the listener is closed, so nothing answers any more.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), client.get(&url).send())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
    );
}

/// With their own listener, the ops routes leave the public port (but
/// `/healthz`), and the ops port serves nothing else.
#[tokio::test]
async fn metrics_can_have_their_own_listener() {
    use clap::Parser;
    let store_cfg = tracker_core::testing::config(Backend::Standalone, Duration::from_secs(60));
    let cfg = tracker_api::config::Config::try_parse_from([
        "tracker-api",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.2:0",
        "--auth",
        "disabled",
    ])
    .unwrap();
    let store = tracker_core::testing::connect(&store_cfg).await;
    let app = tracker_api::Application::build_with(cfg, store, None)
        .await
        .unwrap();
    let ops = format!("http://127.0.0.2:{}", app.ops_port().unwrap());
    let public = format!("http://127.0.0.1:{}", app.port());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    let client = reqwest::Client::new();
    for (base, path, status) in [
        (&ops, "/metrics", 200),
        (&ops, "/healthz", 200),
        (&ops, "/readyz", 200),
        (&ops, "/openapi.json", 200),
        (&ops, "/v1/stats", 404),
        (&public, "/metrics", 404),
        (&public, "/readyz", 404),
        (&public, "/openapi.json", 404),
        (&public, "/healthz", 200),
        (&public, "/v1/stats", 200),
    ] {
        let res = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(res.status(), status, "{base}{path}");
    }
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}

//! `GET /v1/sessions/{id}/explain`: every reason the store's facts can
//! produce, who may ask, and bad ids.

use std::time::Duration;

use serde_json::Value;
use tracker_core::testing::Backend;
use tracker_core::{ClaimOutcome, IdleSource, IdleTimeout, ResourceState, SessionMeta, Written};

use crate::helpers::*;

/// Records a Session resource with this idle timeout and where it comes from.
async fn mirror_idle(
    app: &TestApp,
    session: &str,
    state: ResourceState,
    idle: IdleTimeout,
    source: IdleSource,
) {
    let term = app.store.newest_term().await.unwrap();
    let meta = SessionMeta {
        session_id: session.parse().unwrap(),
        uid: Some(format!("uid-{session}")),
        owner: Some("alice".into()),
        idle_source: source,
        state,
        idle_timeout: idle,
        generation: None,
        max_session_duration: None,
        created_at: None,
    };
    let written = app.store.mirror_session(&meta, term).await.unwrap();
    assert_eq!(written, Written::Done);
}

/// Publishes the leader's facts on every shard, as the reaper's leader does.
async fn leader_says(app: &TestApp, guard: Duration, dry_run: bool) {
    let term = app.store.newest_term().await.unwrap();
    for shard in app.store.keys().shards() {
        let written = app
            .store
            .publish_leader_facts(shard, term, guard, dry_run, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(written, Written::Done);
    }
}

async fn explain(app: &TestApp, session: &str) -> Value {
    let res = app
        .get(&format!("/v1/sessions/{session}/explain"), &service_token())
        .await;
    assert_eq!(res.status(), 200, "explain {session}");
    res.json().await.unwrap()
}

fn codes(e: &Value) -> Vec<String> {
    e["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap().to_owned())
        .collect()
}

fn reason<'a>(e: &'a Value, code: &str) -> &'a Value {
    e["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["code"] == code)
        .unwrap_or_else(|| panic!("no {code} in {e}"))
}

const THIRTY_MIN: IdleTimeout = IdleTimeout::After(Duration::from_secs(1800));

async fn every_reason_the_store_can_give(backend: Backend) {
    let app = TestApp::spawn(backend).await;

    // Connected, without a Session resource.
    app.register("ghost-1", "vnc").await;
    let e = explain(&app, "ghost-1").await;
    assert_eq!(codes(&e), ["live_connections", "unknown_session"]);
    assert_eq!(e["session"]["state"], "unknown");
    assert_eq!(e["will_hibernate_at"], Value::Null);
    let live = reason(&e, "live_connections");
    let message = live["message"].as_str().unwrap();
    assert!(
        message.starts_with("1 live connection: proxy over vnc, last heartbeat "),
        "{message}"
    );
    assert!(live["until"].as_str().is_some());

    // Idle, no leader has said anything yet.
    mirror_idle(
        &app,
        "idle-1",
        ResourceState::Running,
        THIRTY_MIN,
        IdleSource::Spec,
    )
    .await;
    let e = explain(&app, "idle-1").await;
    assert_eq!(codes(&e), ["idle", "no_leader"]);
    let idle = reason(&e, "idle");
    assert!(
        idle["message"]
            .as_str()
            .unwrap()
            .contains("(idleTimeout 30m from spec)"),
        "{idle}"
    );
    assert_eq!(e["will_hibernate_at"], e["session"]["hibernates_at"]);
    assert_eq!(idle["until"], e["session"]["hibernates_at"]);
    // The session object is exactly what GET /v1/sessions/{id} answers.
    let view: Value = app
        .get("/v1/sessions/idle-1", &service_token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(e["session"], view);

    // The leader's guard postpones it past its idle timeout.
    leader_says(&app, Duration::from_secs(3 * 3600), false).await;
    let e = explain(&app, "idle-1").await;
    assert_eq!(codes(&e), ["idle", "guard"]);
    let guard = reason(&e, "guard");
    assert!(guard["message"]
        .as_str()
        .unwrap()
        .starts_with("no hibernation until "));
    assert_eq!(e["will_hibernate_at"], guard["until"]);
    assert_ne!(e["will_hibernate_at"], e["session"]["hibernates_at"]);

    // Dry run: it would, but nothing will.
    leader_says(&app, Duration::ZERO, true).await;
    let e = explain(&app, "idle-1").await;
    assert_eq!(codes(&e), ["idle", "dry_run"]);
    assert!(reason(&e, "dry_run")["message"]
        .as_str()
        .unwrap()
        .starts_with("dry run: would hibernate at "));
    assert_eq!(e["will_hibernate_at"], Value::Null);
    leader_says(&app, Duration::ZERO, false).await;

    // Connected: the connection keeps it awake.
    app.register("idle-1", "websocket").await;
    let e = explain(&app, "idle-1").await;
    assert_eq!(codes(&e), ["live_connections"]);
    assert_eq!(e["will_hibernate_at"], Value::Null);

    // Exempt by annotation, told apart from an empty spec.idleTimeout.
    for (id, source, code) in [
        ("exempt-1", IdleSource::Annotation, "exempt"),
        ("empty-1", IdleSource::Empty, "no_idle_timeout"),
    ] {
        mirror_idle(&app, id, ResourceState::Running, IdleTimeout::Off, source).await;
        let e = explain(&app, id).await;
        assert_eq!(codes(&e), [code], "{id}");
        assert_eq!(e["will_hibernate_at"], Value::Null);
    }

    // Terminated, hibernated, and woken by a connection.
    mirror_idle(
        &app,
        "done-1",
        ResourceState::Terminated,
        THIRTY_MIN,
        IdleSource::Spec,
    )
    .await;
    assert_eq!(codes(&explain(&app, "done-1").await), ["terminated"]);
    mirror_idle(
        &app,
        "asleep-1",
        ResourceState::Hibernated,
        THIRTY_MIN,
        IdleSource::Spec,
    )
    .await;
    assert_eq!(codes(&explain(&app, "asleep-1").await), ["hibernated"]);
    app.register("asleep-1", "http").await;
    let e = explain(&app, "asleep-1").await;
    assert_eq!(e["session"]["state"], "waking");
    assert_eq!(codes(&e), ["live_connections", "waking"]);

    // Claimed by the leader: hibernating until the claim lapses at the latest.
    let zero = IdleTimeout::After(Duration::ZERO);
    mirror_idle(
        &app,
        "claimed-1",
        ResourceState::Running,
        zero,
        IdleSource::Spec,
    )
    .await;
    let term = app.store.newest_term().await.unwrap();
    let id = "claimed-1".parse().unwrap();
    let claimed = app
        .store
        .claim_hibernation(&id, Duration::from_secs(30), term)
        .await
        .unwrap();
    assert!(matches!(claimed, ClaimOutcome::Claimed(_)), "{claimed:?}");
    let e = explain(&app, "claimed-1").await;
    assert_eq!(codes(&e), ["hibernating"]);
    assert!(reason(&e, "hibernating")["until"].as_str().is_some());
}

#[tokio::test]
async fn every_reason_the_store_can_give_standalone() {
    every_reason_the_store_can_give(Backend::Standalone).await;
}

#[tokio::test]
async fn every_reason_the_store_can_give_cluster() {
    every_reason_the_store_can_give(Backend::Cluster).await;
}

/// A max session duration is a reason of its own, with the end of the
/// running period as its `until`, and it bounds `will_hibernate_at` even
/// while connections keep the session from idling.
#[tokio::test]
async fn a_max_session_duration_says_when_it_ends() {
    let app = TestApp::spawn(Backend::Standalone).await;
    let term = app.store.newest_term().await.unwrap();
    let meta = SessionMeta {
        session_id: "long-1".parse().unwrap(),
        uid: Some("uid-long-1".into()),
        owner: Some("alice".into()),
        idle_source: IdleSource::Spec,
        state: ResourceState::Running,
        idle_timeout: THIRTY_MIN,
        generation: None,
        max_session_duration: Some(Duration::from_secs(8 * 3600)),
        created_at: None,
    };
    assert_eq!(
        app.store.mirror_session(&meta, term).await.unwrap(),
        Written::Done
    );
    app.register("long-1", "vnc").await;
    let e = explain(&app, "long-1").await;
    assert_eq!(codes(&e), ["live_connections", "max_duration", "no_leader"]);
    let max = reason(&e, "max_duration");
    let message = max["message"].as_str().unwrap();
    assert!(
        message.contains("maximum session duration 8h ends"),
        "{message}"
    );
    assert_eq!(e["will_hibernate_at"], max["until"]);
    assert_eq!(e["session"]["hibernates_at"], max["until"]);
}

#[tokio::test]
async fn a_user_may_explain_only_its_own_sessions() {
    let app = TestApp::spawn(Backend::Standalone).await;
    mirror_idle(
        &app,
        "mine-1",
        ResourceState::Running,
        THIRTY_MIN,
        IdleSource::Default,
    )
    .await;
    let alice = token("alice", &["user"]);
    let res = app.get("/v1/sessions/mine-1/explain", &alice).await;
    assert_eq!(res.status(), 200);
    let e: Value = res.json().await.unwrap();
    assert!(reason(&e, "idle")["message"]
        .as_str()
        .unwrap()
        .contains("(idleTimeout 30m by default)"));

    let bob = token("bob", &["user"]);
    let (status, code, _) = error_code(app.get("/v1/sessions/mine-1/explain", &bob).await).await;
    assert_eq!((status, code.as_str()), (403, "forbidden"));

    // Unknown owner: a plain user gets what GET /v1/sessions/{id} gives it.
    app.register("ghost-2", "vnc").await;
    for path in ["/v1/sessions/ghost-2", "/v1/sessions/ghost-2/explain"] {
        let (status, code, _) = error_code(app.get(path, &alice).await).await;
        assert_eq!(
            (status, code.as_str()),
            (404, "session_not_found"),
            "{path}"
        );
    }
    // Nothing known: 404 for everyone, as for the session itself.
    let (status, code, _) = error_code(
        app.get("/v1/sessions/never-seen/explain", &service_token())
            .await,
    )
    .await;
    assert_eq!((status, code.as_str()), (404, "session_not_found"));
    // No token: 401.
    let res = app
        .client
        .get(app.url("/v1/sessions/mine-1/explain"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn bad_ids_are_refused() {
    let app = TestApp::spawn(Backend::Standalone).await;
    for bad in ["Upper-Case", "-dash", "a_b", &"x".repeat(254)] {
        let (status, code, field) = error_code(
            app.get(&format!("/v1/sessions/{bad}/explain"), &service_token())
                .await,
        )
        .await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{bad}");
        assert_eq!(field.as_deref(), Some("session_id"), "{bad}");
    }
}

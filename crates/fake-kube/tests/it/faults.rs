use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::{api_code, next, session_json, start, Session, NS, TIMEOUT};
use fake_kube::Verb;

fn hibernate() -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"state": "hibernated"}}))
}

#[tokio::test]
async fn injected_failures_hit_only_the_next_n_session_patches() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let pp = PatchParams::default();

    fake.fail_session_patches(2, 500);
    assert_eq!(
        api_code(api.patch("a", &pp, &hibernate()).await),
        (500, "InternalError".into())
    );
    assert_eq!(fake.session(NS, "a").unwrap()["spec"]["state"], "running");
    let second = api.patch("a", &pp, &hibernate()).await;
    assert_eq!(api_code(second).0, 500);
    api.get("a").await.expect("reads are not affected");
    api.patch("a", &pp, &hibernate()).await.unwrap();

    let statuses: Vec<_> = fake.session_patches("a").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
}

#[tokio::test]
async fn an_outage_answers_503_and_ends_open_watches() {
    let (fake, _) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    // Without this, kube retries 503s with backoff and the test would measure its patience.
    let mut config = fake.kube_config();
    config.default_retry = false;
    let client = kube::Client::try_from(config).unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut watch).await,
        Some(Ok(WatchEvent::Added(_)))
    ));

    fake.set_unavailable(true);
    assert!(next(&mut watch).await.is_none(), "the watch is cut");
    assert_eq!(
        api_code(api.get("a").await),
        (503, "ServiceUnavailable".into())
    );
    let patch = api.patch("a", &PatchParams::default(), &hibernate()).await;
    assert_eq!(api_code(patch).0, 503);
    assert_eq!(fake.session_patches("a")[0].status, 503);

    fake.set_unavailable(false);
    api.get("a").await.unwrap();
}

#[tokio::test]
async fn waiting_wakes_on_requests_and_changes() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let patcher = tokio::spawn(async move {
        let pp = PatchParams {
            field_manager: Some("tracker-reaper".into()),
            ..PatchParams::default()
        };
        api.patch("a", &pp, &hibernate()).await
    });

    let requests = fake
        .wait_for_requests(|r| r.iter().any(|r| r.verb == Verb::Patch), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(requests[0].field_manager.as_deref(), Some("tracker-reaper"));
    let session = fake
        .wait_for_session(
            NS,
            "a",
            |s| s.is_some_and(|s| s["spec"]["state"] == "hibernated"),
            TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(session.unwrap()["metadata"]["generation"], 2);
    patcher.await.unwrap().unwrap();

    let gone = fake
        .wait_for_session(NS, "a", |s| s.is_none(), Duration::from_millis(50))
        .await;
    assert!(matches!(gone, Err(fake_kube::Error::Timeout { .. })));
}

#[tokio::test]
async fn shutdown_ends_open_watches_and_returns() {
    let (fake, client) = start().await;
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    tokio::time::timeout(TIMEOUT, fake.shutdown())
        .await
        .expect("shutdown in time")
        .unwrap();
    assert!(next(&mut watch).await.is_none());
}

use futures::StreamExt;
use kube::{
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::watcher::{self, watcher},
    ResourceExt,
};
use serde_json::json;

use crate::{api_code, next, session_json, start, Session, SessionSpec, NS};
use fake_kube::Verb;

fn reaper() -> PatchParams {
    PatchParams {
        field_manager: Some("tracker-reaper".into()),
        ..PatchParams::default()
    }
}

#[tokio::test]
async fn list_returns_sessions_with_a_resource_version() {
    let (fake, client) = start().await;
    for (ns, name) in [(NS, "b"), (NS, "a"), ("other", "c")] {
        fake.apply_session(ns, session_json(name, "running"))
            .unwrap();
    }
    let api: Api<Session> = Api::namespaced(client.clone(), NS);

    let list = api.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(list.metadata.resource_version.as_deref(), Some("3"));
    assert_eq!(list.items[0].spec.idle_timeout.as_deref(), Some("30m"));

    let by_name = api
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let everywhere = Api::<Session>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(everywhere.items.len(), 3);
}

#[tokio::test]
async fn get_of_a_missing_session_is_an_api_404() {
    let (_fake, client) = start().await;
    let api: Api<Session> = Api::namespaced(client, NS);
    assert_eq!(api_code(api.get("nope").await), (404, "NotFound".into()));
}

#[tokio::test]
async fn watcher_sees_initial_state_then_changes() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut events = watcher(api, watcher::Config::default()).boxed();

    assert!(matches!(
        next(&mut events).await,
        Some(Ok(watcher::Event::Init))
    ));
    match next(&mut events).await {
        Some(Ok(watcher::Event::InitApply(s))) => assert_eq!(s.name_any(), "a"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    assert!(matches!(
        next(&mut events).await,
        Some(Ok(watcher::Event::InitDone))
    ));

    fake.apply_session(
        NS,
        json!({"metadata": {"name": "a"}, "spec": {"state": "hibernated"}}),
    )
    .unwrap();
    match next(&mut events).await {
        Some(Ok(watcher::Event::Apply(s))) => assert_eq!(s.spec.state, "hibernated"),
        other => panic!("expected Apply, got {other:?}"),
    }
    fake.delete_session(NS, "a").expect("session existed");
    match next(&mut events).await {
        Some(Ok(watcher::Event::Delete(s))) => assert_eq!(s.name_any(), "a"),
        other => panic!("expected Delete, got {other:?}"),
    }
}

#[tokio::test]
async fn watcher_with_streaming_lists_gets_initial_events() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let config = watcher::Config::default().streaming_lists();
    let mut events = watcher(api, config).boxed();

    assert!(matches!(
        next(&mut events).await,
        Some(Ok(watcher::Event::Init))
    ));
    assert!(matches!(
        next(&mut events).await,
        Some(Ok(watcher::Event::InitApply(_)))
    ));
    assert!(matches!(
        next(&mut events).await,
        Some(Ok(watcher::Event::InitDone))
    ));
    fake.apply_session(NS, session_json("b", "running"))
        .unwrap();
    match next(&mut events).await {
        Some(Ok(watcher::Event::Apply(s))) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected Apply, got {other:?}"),
    }
}

#[tokio::test]
async fn watching_from_a_compacted_version_gets_410_expired() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    fake.apply_session(NS, session_json("b", "running"))
        .unwrap();
    // Watching from version 1 now needs an event that was dropped.
    fake.compact_history();
    let api: Api<Session> = Api::namespaced(client, NS);

    let mut stream = api
        .watch(&WatchParams::default().timeout(5), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(
        next(&mut stream).await,
        Some(Ok(WatchEvent::Added(_)))
    ));
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), "1")
        .await
        .unwrap()
        .boxed();
    match next(&mut stream).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(
        next(&mut stream).await.is_none(),
        "the watch ends after ERROR"
    );
}

#[tokio::test]
async fn merge_patch_is_recorded_and_bumps_generation() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);

    let patch = json!({"spec": {"state": "hibernated"}});
    let patched = api
        .patch("a", &reaper(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(patched.spec.state, "hibernated");
    assert_eq!(patched.metadata.generation, Some(2));
    assert_eq!(
        fake.session(NS, "a").unwrap()["spec"]["state"],
        "hibernated"
    );

    let recorded = fake.session_patches("a");
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!(
        (r.verb, r.namespace.as_str(), r.status),
        (Verb::Patch, NS, 200)
    );
    assert_eq!(r.field_manager.as_deref(), Some("tracker-reaper"));
    assert_eq!(
        r.content_type.as_deref(),
        Some("application/merge-patch+json")
    );
    assert_eq!(r.body, patch);

    // Patching to the same state is a no-op, as on a real server.
    let again = api
        .patch("a", &reaper(), &Patch::Merge(&patch))
        .await
        .unwrap();
    assert_eq!(again.resource_version(), patched.resource_version());
}

#[tokio::test]
async fn merge_patch_with_a_stale_resource_version_conflicts() {
    let (fake, client) = start().await;
    let created = fake
        .apply_session(NS, session_json("a", "running"))
        .unwrap();
    let stale = created["metadata"]["resourceVersion"].clone();
    fake.apply_session(
        NS,
        json!({"metadata": {"name": "a"}, "spec": {"user": "bob"}}),
    )
    .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);

    let patch = json!({"metadata": {"resourceVersion": stale}, "spec": {"state": "hibernated"}});
    let result = api.patch("a", &reaper(), &Patch::Merge(&patch)).await;
    assert_eq!(api_code(result), (409, "Conflict".into()));
    assert_eq!(fake.session(NS, "a").unwrap()["spec"]["state"], "running");
    assert_eq!(fake.session_patches("a")[0].status, 409);

    let current = fake.session(NS, "a").unwrap()["metadata"]["resourceVersion"].clone();
    let patch = json!({"metadata": {"resourceVersion": current}, "spec": {"state": "hibernated"}});
    api.patch("a", &reaper(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn create_replace_delete_follow_api_rules() {
    let (fake, client) = start().await;
    let api: Api<Session> = Api::namespaced(client, NS);
    let spec = SessionSpec {
        user: "alice".into(),
        state: "running".into(),
        idle_timeout: None,
    };
    let created = api
        .create(&PostParams::default(), &Session::new("x", spec.clone()))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let again = api
        .create(&PostParams::default(), &Session::new("x", spec))
        .await;
    assert_eq!(api_code(again), (409, "AlreadyExists".into()));

    let mut changed = created.clone();
    changed.spec.state = "terminated".into();
    let replaced = api
        .replace("x", &PostParams::default(), &changed)
        .await
        .unwrap();
    assert_eq!(replaced.metadata.generation, Some(2));
    let stale = api.replace("x", &PostParams::default(), &created).await;
    assert_eq!(api_code(stale), (409, "Conflict".into()));

    api.delete("x", &DeleteParams::default()).await.unwrap();
    assert_eq!(api_code(api.get("x").await).0, 404);

    let seen: Vec<_> = fake.requests().iter().map(|r| (r.verb, r.status)).collect();
    use Verb::*;
    let expected = [
        (Create, 201),
        (Create, 409),
        (Replace, 200),
        (Replace, 409),
        (Delete, 200),
    ];
    assert_eq!(seen, expected);
    assert_eq!(fake.requests()[0].name.as_deref(), Some("x"));
}

#[tokio::test]
async fn server_side_apply_creates_then_merges() {
    let (fake, client) = start().await;
    let api: Api<Session> = Api::namespaced(client, NS);
    let params = PatchParams::apply("tracker-reaper").force();

    let created = api
        .patch("s", &params, &Patch::Apply(session_json("s", "running")))
        .await
        .unwrap();
    assert_eq!(created.spec.state, "running");
    let patch = json!({"apiVersion": "stream.space/v1alpha1", "kind": "Session", "spec": {"state": "hibernated"}});
    let merged = api
        .patch("s", &params, &Patch::Apply(&patch))
        .await
        .unwrap();
    assert_eq!(
        (merged.spec.user.as_str(), merged.spec.state.as_str()),
        ("alice", "hibernated")
    );

    let strategic = api.patch("s", &reaper(), &Patch::Strategic(&patch)).await;
    assert_eq!(api_code(strategic).0, 415);
    let content_types: Vec<_> = fake
        .session_patches("s")
        .into_iter()
        .map(|r| r.content_type)
        .collect();
    assert_eq!(
        content_types[0].as_deref(),
        Some("application/apply-patch+yaml")
    );
}

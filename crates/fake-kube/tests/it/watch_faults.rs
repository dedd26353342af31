//! Faults in what watchers see: Sessions deleted and re-created under their name, events
//! withheld for a while, and watches ended cleanly or with 410 Expired.

use fake_kube::{Injection, ResourceKind};
use futures::StreamExt;
use kube::{
    api::{Api, ListParams, WatchEvent, WatchParams},
    runtime::watcher::{self, watcher},
    ResourceExt,
};
use serde_json::json;

use crate::{next, session_json, start, Session, NS};

fn rv_of(obj: &serde_json::Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_recreated_session_has_a_new_uid_and_generation_1() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let changed = fake
        .apply_session(
            NS,
            json!({"metadata": {"name": "a"}, "spec": {"state": "hibernated"}}),
        )
        .unwrap();
    assert_eq!(changed["metadata"]["generation"], 2);
    let api: Api<Session> = Api::namespaced(client, NS);
    let old = api.get("a").await.unwrap();
    let mut watch = api
        .watch(&WatchParams::default(), &rv_of(&changed))
        .await
        .unwrap()
        .boxed();

    let new = fake
        .recreate_session(NS, "a", Some(json!({"spec": {"state": "running"}})))
        .unwrap();
    match next(&mut watch).await {
        Some(Ok(WatchEvent::Deleted(s))) => assert_eq!(s.uid(), old.uid()),
        other => panic!("expected DELETED, got {other:?}"),
    }
    match next(&mut watch).await {
        Some(Ok(WatchEvent::Added(s))) => {
            assert_ne!(s.uid(), old.uid());
            assert_eq!(s.metadata.generation, Some(1));
            assert_eq!(s.spec.state, "running");
            assert_eq!(s.spec.user, "alice", "the rest is kept");
        }
        other => panic!("expected ADDED, got {other:?}"),
    }
    let current = api.get("a").await.unwrap();
    assert_eq!(current.uid().as_deref(), new["metadata"]["uid"].as_str());
    let logged = fake.injected_faults();
    match &logged[..] {
        [f] => assert_eq!(
            f.injection,
            Injection::Recreated {
                namespace: NS.into(),
                name: "a".into(),
                old_uid: old.uid().unwrap(),
                new_uid: current.uid().unwrap(),
            }
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        fake.recreate_session(NS, "missing", None),
        Err(fake_kube::Error::Rejected { code: 404, .. })
    ));
}

#[tokio::test]
async fn a_watch_gap_hides_changes_from_watches_but_not_from_lists() {
    let (fake, client) = start().await;
    let a = fake
        .apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut watch = api
        .watch(&WatchParams::default(), &rv_of(&a))
        .await
        .unwrap()
        .boxed();

    fake.set_dropping_watch_events(true);
    let missed = fake
        .apply_session(
            NS,
            json!({"metadata": {"name": "a"}, "spec": {"state": "hibernated"}}),
        )
        .unwrap();
    fake.set_dropping_watch_events(false);
    fake.apply_session(NS, session_json("b", "running"))
        .unwrap();

    // The watch goes straight from before the gap to after it.
    match next(&mut watch).await {
        Some(Ok(WatchEvent::Added(s))) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected b's ADDED, got {other:?}"),
    }
    // So does a watch opened later from before the gap: the gap is by version.
    let mut late = api
        .watch(&WatchParams::default(), &rv_of(&a))
        .await
        .unwrap()
        .boxed();
    match next(&mut late).await {
        Some(Ok(WatchEvent::Added(s))) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected b's ADDED, got {other:?}"),
    }
    // A list shows the truth.
    let listed = api
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(listed.items[0].spec.state, "hibernated");

    let kinds: Vec<_> = fake
        .injected_faults()
        .into_iter()
        .map(|f| f.injection)
        .collect();
    let gap_start = rv_of(&a).parse().unwrap();
    let dropped = Injection::WatchEventDropped {
        resource: ResourceKind::Sessions,
        namespace: NS.into(),
        name: "a".into(),
        event_type: "MODIFIED".into(),
        resource_version: rv_of(&missed).parse().unwrap(),
    };
    assert_eq!(
        kinds,
        [
            Injection::WatchGap {
                dropping: true,
                resource_version: gap_start
            },
            Injection::WatchGap {
                dropping: false,
                resource_version: gap_start + 1
            },
            dropped.clone(),
            dropped,
        ]
    );
}

#[tokio::test]
async fn ended_watches_resume_without_loss() {
    let (fake, client) = start().await;
    let a = fake
        .apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut watch = api
        .watch(&WatchParams::default(), &rv_of(&a))
        .await
        .unwrap()
        .boxed();

    assert_eq!(fake.end_watches(), 1);
    assert!(next(&mut watch).await.is_none(), "the stream ends");
    // A change while no watch is open is not lost: the history still has it.
    fake.apply_session(NS, session_json("b", "running"))
        .unwrap();
    let mut again = api
        .watch(&WatchParams::default(), &rv_of(&a))
        .await
        .unwrap()
        .boxed();
    match next(&mut again).await {
        Some(Ok(WatchEvent::Added(s))) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected b's ADDED, got {other:?}"),
    }
    assert_eq!(
        fake.injected_faults()[0].injection,
        Injection::WatchesEnded {
            count: 1,
            expired: false
        }
    );
}

#[tokio::test]
async fn expired_watches_make_the_watcher_relist() {
    let (fake, client) = start().await;
    fake.apply_session(NS, session_json("a", "running"))
        .unwrap();
    let api: Api<Session> = Api::namespaced(client, NS);
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
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

    // A change seen through the watcher proves its watch is open.
    fake.apply_session(NS, session_json("b", "running"))
        .unwrap();
    match next(&mut events).await {
        Some(Ok(watcher::Event::Apply(s))) => assert_eq!(s.name_any(), "b"),
        other => panic!("expected Apply, got {other:?}"),
    }

    // A raw watch sees the ERROR itself.
    let rv = fake.resource_version().to_string();
    let mut raw = api
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    assert_eq!(fake.expire_watches(), 2);
    match next(&mut raw).await {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(next(&mut raw).await.is_none());

    // The watcher reports the expiry, then lists again from scratch.
    let mut relisted = false;
    for _ in 0..4 {
        match next(&mut events).await {
            Some(Ok(watcher::Event::Init)) => {
                relisted = true;
                break;
            }
            Some(Err(_)) => continue,
            other => panic!("expected an error or a relist, got {other:?}"),
        }
    }
    assert!(relisted, "the watcher lists again");
    match next(&mut events).await {
        Some(Ok(watcher::Event::InitApply(s))) => assert_eq!(s.name_any(), "a"),
        other => panic!("expected InitApply, got {other:?}"),
    }
    let logged: Vec<_> = fake
        .injected_faults()
        .into_iter()
        .map(|f| f.injection)
        .collect();
    assert!(matches!(
        &logged[..],
        [
            Injection::HistoryCompacted { .. },
            Injection::WatchesEnded {
                count: 2,
                expired: true
            }
        ]
    ));
}

//! The mirror: Session resources → the store, followed and not fought.

use std::time::Duration;

use fake_kube::FakeKube;
use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::{IdleTimeout, ResourceState, SessionMeta, SessionState};

use crate::helpers::{eventually, session_json, sid, Env, Reaper, NS};

#[sqlx::test(migrations = "../../migrations")]
async fn sessions_are_mirrored_followed_and_forgotten(pool: PgPool) {
    let env = Env::new(Backend::Cluster, Duration::from_secs(5), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("10m"), false))
        .unwrap();
    fake.apply_session(NS, session_json("exempt", "running", Some("1m"), true))
        .unwrap();
    // Mirrored earlier, deleted while no reaper watched.
    let ghost = SessionMeta {
        session_id: sid("ghost"),
        uid: Some("ghost-uid".into()),
        owner: None,
        idle_source: Default::default(),
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(Duration::from_secs(60)),
        generation: Some(1),
        max_session_duration: None,
        created_at: None,
    };
    env.store
        .mirror_session(&ghost, tracker_core::Term(1))
        .await
        .unwrap();
    let reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;

    let view = eventually(
        Duration::from_secs(10),
        "s1 mirrored, ghost forgotten",
        || async {
            let v = env.store.session(&sid("s1")).await.unwrap()?;
            env.store
                .session(&sid("ghost"))
                .await
                .unwrap()
                .is_none()
                .then_some(v)
        },
    )
    .await;
    assert_eq!(view.state, SessionState::Idle);
    assert_eq!(view.owner.as_deref(), Some("alice"));
    assert_eq!(view.idle_timeout_seconds, Some(600));
    let exempt = env.store.session(&sid("exempt")).await.unwrap().unwrap();
    assert_eq!(exempt.idle_timeout_seconds, None);
    assert_eq!(exempt.hibernates_at, None);

    // Someone else hibernates it: followed, not fought.
    fake.apply_session(NS, session_json("s1", "hibernated", Some("10m"), false))
        .unwrap();
    eventually(Duration::from_secs(5), "state followed", || async {
        (env.state("s1").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
    // And someone wakes it again: idle from now, with the new timeout.
    fake.apply_session(NS, session_json("s1", "running", Some("20m"), false))
        .unwrap();
    eventually(Duration::from_secs(5), "woken by someone else", || async {
        let v = env.store.session(&sid("s1")).await.unwrap()?;
        (v.state == SessionState::Idle && v.idle_timeout_seconds == Some(1200)).then_some(())
    })
    .await;
    fake.delete_session(NS, "s1").unwrap();
    eventually(Duration::from_secs(5), "deletion forgotten", || async {
        env.store
            .session(&sid("s1"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        fake.requests().is_empty(),
        "the mirror wrote: {:?}",
        fake.requests()
    );
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_lost_watch_history_relists(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", None, false))
        .unwrap();
    let reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;
    env.wait_state("s1", SessionState::Idle).await;
    // The watch's history is gone (410 on resume); changes made meanwhile
    // still arrive through the re-list.
    fake.compact_history();
    fake.set_unavailable(true);
    fake.set_unavailable(false);
    fake.apply_session(NS, session_json("s2", "hibernated", None, false))
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "s2 mirrored after relist",
        || async { (env.state("s2").await == Some(SessionState::Hibernated)).then_some(()) },
    )
    .await;
    reaper.stop().await;
}

//! The reasons of a decision go with its event (`session_events.details`),
//! and the leader publishes what explanations need (guard, dry run).

use std::time::Duration;

use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::{IdleSource, IdleTimeout, ResourceState, SessionMeta, SessionState};

use crate::helpers::{eventually, sid, Env, Reaper};

/// Mirrors a running Session `s1` of alice's with a 1 s idle timeout.
async fn mirror_running(env: &Env, idle_source: IdleSource) {
    let meta = SessionMeta {
        session_id: sid("s1"),
        uid: None,
        owner: Some("alice".into()),
        idle_source,
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(Duration::from_secs(1)),
        generation: Some(1),
        max_session_duration: None,
        created_at: None,
    };
    let term = env.store.newest_term().await.unwrap();
    env.store.mirror_session(&meta, term).await.unwrap();
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_hibernation_event_says_why_and_the_leader_publishes_its_guard(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(2), &pool).await;
    mirror_running(&env, IdleSource::Spec).await;
    let c = env.connect("s1", "alice").await;
    env.store.close(&sid("s1"), c).await.unwrap();
    let reaper = Reaper::start(env.config(), env.overrides()).await;

    // While its guard holds, the leader says so on the session's shard.
    let (facts, now) = eventually(Duration::from_secs(10), "leader facts", || async {
        let (facts, now) = env.store.explain(&sid("s1")).await.unwrap()?;
        facts.leader.is_some().then_some((facts, now))
    })
    .await;
    let leader = facts.leader.unwrap();
    assert!(!leader.dry_run);
    if facts.view.state == SessionState::Idle {
        let guard = leader.guard_until.expect("a guard time");
        assert!(
            guard <= now + chrono::Duration::seconds(3),
            "{guard} vs {now}"
        );
    }

    eventually(Duration::from_secs(15), "hibernation recorded", || async {
        (env.events("s1").await == ["hibernated"]).then_some(())
    })
    .await;
    let (reason, details): (String, serde_json::Value) = sqlx::query_as(
        "SELECT reason, details FROM session_events WHERE session_id = 's1' AND event_type = 'hibernated'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(reason, "idle_timeout");
    let reasons = details["reasons"].as_array().expect("reasons in details");
    assert_eq!(reasons[0]["code"], "idle", "{details}");
    let message = reasons[0]["message"].as_str().unwrap();
    assert!(message.starts_with("idle since "), "{message}");
    assert!(message.contains("last connection "), "{message}");
    assert!(
        message.contains("idleTimeout 1s from spec reached at "),
        "{message}"
    );
    assert!(
        details["last_connection_at"].as_str().is_some(),
        "{details}"
    );

    // A wake says why too.
    env.connect("s1", "alice").await;
    eventually(Duration::from_secs(10), "wake recorded", || async {
        (env.events("s1").await == ["hibernated", "woken"]).then_some(())
    })
    .await;
    let details: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM session_events WHERE session_id = 's1' AND event_type = 'woken'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(details["reasons"][0]["code"], "waking", "{details}");
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_dry_run_leader_says_so_and_its_events_too(pool: PgPool) {
    let env = Env::new(Backend::Cluster, Duration::from_secs(1), &pool).await;
    mirror_running(&env, IdleSource::Default).await;
    let mut cfg = env.config();
    cfg.dry_run = true;
    let reaper = Reaper::start(cfg, env.overrides()).await;

    eventually(Duration::from_secs(15), "dry run event", || async {
        (env.events("s1").await == ["dry_run_hibernate"]).then_some(())
    })
    .await;
    let (facts, now) = env.store.explain(&sid("s1")).await.unwrap().unwrap();
    assert!(facts.leader.is_some_and(|l| l.dry_run), "{facts:?}");
    let explained = tracker_core::explain::explain(&facts, now);
    assert!(
        explained
            .reasons
            .iter()
            .any(|r| r.code == tracker_core::explain::ReasonCode::DryRun),
        "{explained:?}"
    );
    assert_eq!(explained.will_hibernate_at, None);

    let details: serde_json::Value = sqlx::query_scalar(
        "SELECT details FROM session_events WHERE session_id = 's1' AND event_type = 'dry_run_hibernate'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let codes: Vec<&str> = details["reasons"]
        .as_array()
        .expect("reasons in details")
        .iter()
        .filter_map(|r| r["code"].as_str())
        .collect();
    assert_eq!(codes, ["idle", "dry_run"], "{details}");
    let message = details["reasons"][0]["message"].as_str().unwrap();
    assert!(message.contains("idleTimeout 1s by default"), "{message}");
    reaper.stop().await;
}

//! Two reapers: one acts; kill it and the other takes over within a lease.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracker_core::testing::Backend;

use crate::helpers::{eventually, sid, Env, Reaper};

async fn takeover_loses_no_history(
    env: Env,
    a_cfg: tracker_reaper::Config,
    b_cfg: tracker_reaper::Config,
) {
    let lease = a_cfg.lease_duration;
    let a = Reaper::start(a_cfg, env.overrides()).await;
    let b = Reaper::start(b_cfg, env.overrides()).await;
    let a_leads = eventually(Duration::from_secs(10), "one leader", || async {
        match (a.is_leader(), b.is_leader()) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, mut standby) = if a_leads { (a, b) } else { (b, a) };
    let mut total = 0;
    for i in 0..20 {
        let s = format!("s-{}", i % 4);
        let id = env.connect(&s, "dave").await;
        env.store.close(&sid(&s), id).await.unwrap();
        total += 1;
    }
    // Live connections that will expire after the leader is gone.
    for i in 0..10 {
        env.connect(&format!("t-{}", i % 3), "erin").await;
        total += 1;
    }
    assert!(leader.is_leader() && !standby.is_leader());

    let killed_at = Instant::now();
    leader.kill().await;
    standby.wait_leader(lease * 3).await;
    let took = killed_at.elapsed();
    // At most one lease after the last renewal (which preceded the kill),
    // plus the standby's retry period and scheduling slack.
    assert!(
        took <= lease + lease / 3 + Duration::from_millis(1500),
        "takeover took {took:?}"
    );

    env.clock
        .advance(env.store_cfg.heartbeat_window + Duration::from_secs(1));
    eventually(
        Duration::from_secs(15),
        "every connection archived once",
        || async {
            // Rows commit before the outbox is acknowledged: wait for both.
            (env.history_rows().await == total && env.store.outbox_backlog().await.unwrap() == 0)
                .then_some(())
        },
    )
    .await;
    // Nothing doubled by the takeover either.
    assert_eq!(env.history_rows().await, total);
    standby.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn redis_election_takeover_after_kill(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(3), &pool).await;
    let mut a = env.config();
    a.pod_name = Some("reaper-a".into());
    let mut b = env.config();
    b.pod_name = Some("reaper-a".into()); // same host name: the random suffix tells them apart
    takeover_loses_no_history(env, a, b).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn redis_election_takeover_after_kill_cluster(pool: PgPool) {
    let env = Env::new(Backend::Cluster, Duration::from_secs(3), &pool).await;
    let (a, b) = (env.config(), env.config());
    takeover_loses_no_history(env, a, b).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_graceful_stop_hands_over_at_once(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(3), &pool).await;
    let mut cfg = env.config();
    cfg.lease_duration = Duration::from_secs(30);
    let mut a = Reaper::start(cfg.clone(), env.overrides()).await;
    a.wait_leader(Duration::from_secs(5)).await;
    let mut b = Reaper::start(cfg, env.overrides()).await;
    assert!(!b.is_leader());
    let stopped = Instant::now();
    a.stop().await;
    // Released, so the standby's next attempt (a third of the lease) wins.
    b.wait_leader(Duration::from_secs(12)).await;
    assert!(stopped.elapsed() < Duration::from_secs(12));
    b.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn kubernetes_lease_takeover_after_kill(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(3), &pool).await;
    let fake = fake_kube::FakeKube::start().await.unwrap();
    let cfg = |name: &str| {
        let mut c = env.kube_config();
        c.election = tracker_reaper::Election::Kubernetes;
        c.pod_name = Some(name.into());
        c
    };
    let lease = cfg("x").lease_duration;
    let a = Reaper::start(cfg("reaper-a"), env.kube_overrides(&fake)).await;
    let b = Reaper::start(cfg("reaper-b"), env.kube_overrides(&fake)).await;
    let a_leads = eventually(Duration::from_secs(10), "one leader", || async {
        match (a.is_leader(), b.is_leader()) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, mut standby, leader_name, standby_name) = if a_leads {
        (a, b, "reaper-a", "reaper-b")
    } else {
        (b, a, "reaper-b", "reaper-a")
    };
    let holder = |fake: &fake_kube::FakeKube| {
        fake.lease(crate::helpers::NS, &env.config().lease_name)
            .and_then(|l| {
                l.pointer("/spec/holderIdentity")
                    .and_then(|h| h.as_str())
                    .map(str::to_owned)
            })
    };
    assert_eq!(holder(&fake).as_deref(), Some(leader_name));
    let lease_obj = fake
        .lease(crate::helpers::NS, &env.config().lease_name)
        .unwrap();
    assert_eq!(
        lease_obj.pointer("/spec/leaseDurationSeconds"),
        Some(&3.into())
    );

    for i in 0..10 {
        let s = format!("s-{i}");
        let id = env.connect(&s, "frank").await;
        env.store.close(&sid(&s), id).await.unwrap();
    }
    let killed_at = Instant::now();
    leader.kill().await;
    standby.wait_leader(lease * 3).await;
    let took = killed_at.elapsed();
    assert!(
        took <= lease + lease / 3 + Duration::from_millis(1500),
        "takeover took {took:?}"
    );
    assert_eq!(holder(&fake).as_deref(), Some(standby_name));
    let transitions = fake
        .lease(crate::helpers::NS, &env.config().lease_name)
        .and_then(|l| {
            l.pointer("/spec/leaseTransitions")
                .and_then(serde_json::Value::as_i64)
        });
    assert_eq!(transitions, Some(1));
    eventually(Duration::from_secs(10), "history archived once", || async {
        (env.history_rows().await == 10).then_some(())
    })
    .await;
    // A graceful stop gives the Lease up.
    standby.stop().await;
    assert_eq!(holder(&fake), None);
}

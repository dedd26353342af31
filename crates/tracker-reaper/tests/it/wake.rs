//! Wakes: a connection on a hibernated (or hibernating) Session leads to
//! exactly one patch `spec.state: running`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_kube::{FakeKube, Fault, Verb};
use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tracker_core::testing::Backend;
use tracker_core::{
    Limits, NewConnection, Protocol, RegisterOutcome, ResourceState, SessionId, SessionState,
};
use tracker_reaper::platform::{KubeSessions, SessionApi};
use tracker_reaper::session::Session;
use tracker_reaper::Overrides;

use tracker_e2e::nats_server::NatsServer;
use tracker_reaper::config::Secret;

use crate::helpers::{
    answer_next_patch_late, eventually, fault_next_patch, kube_state, metric, nats_dir,
    patched_states, session_json, sid, stream_events, wait_kube_state, Env, Reaper, NS,
};

/// A fake API server whose Session s1 is hibernated, and a reaper on `cfg`
/// leading over it once the store shows s1 hibernated.
async fn leading_over_hibernated_s1(env: &Env, cfg: tracker_reaper::Config) -> (FakeKube, Reaper) {
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "hibernated", Some("10m"), false))
        .unwrap();
    let mut reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(5)).await;
    env.wait_state("s1", SessionState::Hibernated).await;
    (fake, reaper)
}

/// s1 is running and its wake was recorded as this reaper's: a `woken`
/// event, counted as woken, never as found already running.
async fn woken_by_this_reaper(env: &Env, reaper: &Reaper) {
    eventually(Duration::from_secs(10), "wake recorded as ours", || async {
        (env.state("s1").await == Some(SessionState::Running)
            && env.events("s1").await == ["woken"])
        .then_some(())
    })
    .await;
    let (_, text) = reaper.get("/metrics").await;
    assert_eq!(
        metric(&text, "tracker_reaper_wakes_total{result=\"woken\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "tracker_reaper_wakes_total{result=\"already_running\"}"
        ),
        0.0
    );
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_connection_on_a_hibernated_session_wakes_it_once(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let (fake, reaper) = leading_over_hibernated_s1(&env, env.kube_config()).await;

    let new = NewConnection {
        session_id: sid("s1"),
        connection_id: tracker_core::ConnectionId::new_random(),
        user_id: "alice".parse().unwrap(),
        protocol: Protocol::Vnc,
        client_ip: None,
        user_agent: None,
    };
    let registered_at = Instant::now();
    let RegisterOutcome::Created(r) = env.store.register(&new, Limits::default()).await.unwrap()
    else {
        panic!("not registered");
    };
    assert_eq!(r.session.state, SessionState::Waking);
    // More connections while waking add no wake.
    env.connect("s1", "bob").await;
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(5)).await;
    let latency = registered_at.elapsed();
    eventually(Duration::from_secs(5), "wake acknowledged", || async {
        (env.state("s1").await == Some(SessionState::Running)
            && env.events("s1").await == ["woken"])
        .then_some(())
    })
    .await;
    // Running now: a further connection records no wake.
    env.connect("s1", "carol").await;
    let shard = env.store.keys().shard_of(&sid("s1"));
    assert!(env.store.pending_wakes(shard, 10).await.unwrap().is_empty());
    assert_eq!(patched_states(&fake, "s1"), ["running"]);
    let p = &fake.session_patches("s1")[0];
    assert_eq!(p.field_manager.as_deref(), Some("tracker-reaper"));
    assert!(latency < Duration::from_secs(1), "wake took {latency:?}");
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_terminated_session_is_never_woken(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "hibernated", None, false))
        .unwrap();
    let mut reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(5)).await;
    env.wait_state("s1", SessionState::Hibernated).await;
    fake.apply_session(NS, session_json("s1", "terminated", None, false))
        .unwrap();
    env.wait_state("s1", SessionState::Terminated).await;
    let new = NewConnection {
        session_id: sid("s1"),
        connection_id: tracker_core::ConnectionId::new_random(),
        user_id: "alice".parse().unwrap(),
        protocol: Protocol::Http,
        client_ip: None,
        user_agent: None,
    };
    assert_eq!(
        env.store.register(&new, Limits::default()).await.unwrap(),
        RegisterOutcome::Terminated
    );
    assert!(patched_states(&fake, "s1").is_empty());
    reaper.stop().await;
}

/// Holds hibernation patches until the test lets them go.
#[derive(Debug)]
struct Gated {
    inner: KubeSessions,
    entered: Notify,
    release: Semaphore,
}

impl SessionApi for Gated {
    fn get<'a>(
        &'a self,
        name: &'a SessionId,
    ) -> BoxFuture<'a, tracker_reaper::Result<Option<Session>>> {
        self.inner.get(name)
    }

    fn set_state<'a>(
        &'a self,
        name: &'a SessionId,
        resource_version: &'a str,
        state: ResourceState,
    ) -> BoxFuture<'a, tracker_reaper::Result<Session>> {
        Box::pin(async move {
            if state == ResourceState::Hibernated {
                self.entered.notify_one();
                self.release.acquire().await.unwrap().forget();
            }
            self.inner.set_state(name, resource_version, state).await
        })
    }
}

/// Starts a reaper whose hibernation patches wait for the test, and waits
/// until one is in flight for `s1`.
async fn hibernation_in_flight(env: &Env, fake: &FakeKube) -> (Reaper, Arc<Gated>) {
    fake.apply_session(NS, session_json("s1", "running", Some("1s"), false))
        .unwrap();
    let client = tracker_reaper::kube_client(fake.kube_config()).unwrap();
    let gated = Arc::new(Gated {
        inner: KubeSessions::new(client.clone(), NS, Duration::from_secs(2)),
        entered: Notify::new(),
        release: Semaphore::new(0),
    });
    let overrides = Overrides {
        kube_client: Some(client),
        session_api: Some(gated.clone()),
        clock: Some(env.clock.clone()),
    };
    let reaper = Reaper::start(env.kube_config(), overrides).await;
    tokio::time::timeout(Duration::from_secs(15), gated.entered.notified())
        .await
        .expect("no hibernation attempted");
    assert_eq!(env.state("s1").await, Some(SessionState::Hibernating));
    (reaper, gated)
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_connection_during_a_hibernation_in_flight_wakes_it_once(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    let (reaper, gated) = hibernation_in_flight(&env, &fake).await;

    env.connect("s1", "alice").await;
    assert_eq!(env.state("s1").await, Some(SessionState::Waking));
    // Give the waker many polls in which it must leave s1 alone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(patched_states(&fake, "s1").is_empty());
    gated.release.add_permits(1);

    eventually(Duration::from_secs(5), "hibernated, then woken", || async {
        (kube_state(&fake, "s1").as_deref() == Some("running")
            && env.state("s1").await == Some(SessionState::Running))
        .then_some(())
    })
    .await;
    assert_eq!(patched_states(&fake, "s1"), ["hibernated", "running"]);
    eventually(Duration::from_secs(5), "both recorded", || async {
        (env.events("s1").await == ["hibernated", "woken"]).then_some(())
    })
    .await;
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_connection_during_a_failing_hibernation_needs_no_wake_patch(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    let (reaper, gated) = hibernation_in_flight(&env, &fake).await;

    env.connect("s1", "alice").await;
    fake.fail_session_patches(1, 500);
    gated.release.add_permits(1);
    // The patch fails and is rolled back; the resource never left `running`,
    // so the pending wake is acknowledged without a patch.
    eventually(Duration::from_secs(5), "wake acknowledged", || async {
        (env.state("s1").await == Some(SessionState::Running)).then_some(())
    })
    .await;
    assert_eq!(kube_state(&fake, "s1").as_deref(), Some("running"));
    let statuses: Vec<u16> = fake
        .session_patches("s1")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [500]);
    assert!(env.events("s1").await.is_empty());
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_wake_whose_signal_was_lost_is_served_by_the_backstop_read(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let (fake, reaper) = leading_over_hibernated_s1(&env, env.kube_config()).await;

    // A wake recorded as the store records one (phase 'w' in the metadata,
    // see lua/common.lua, and an entry in the wake index), but whose signal
    // never reaches the reaper (lost with a listener's connection, say).
    let s = sid("s1");
    let shard = env.store.keys().shard_of(&s);
    let [_, _, meta] = env.store.keys().session_keys(&s);
    let wakes = env
        .store
        .keys()
        .shard_key(shard, tracker_core::ShardKey::Wake);
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset(&meta, "ph", "w")
        .zadd(&wakes, "s1", chrono::Utc::now().timestamp_millis());
    let mut redis = redis::Client::open(env.store_cfg.urls[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = pipe.query_async(&mut redis).await.unwrap();
    assert_eq!(env.state("s1").await, Some(SessionState::Waking));

    wait_kube_state(&fake, "s1", "running", Duration::from_secs(10)).await;
    // Nobody is connected: running again, and idle.
    eventually(Duration::from_secs(5), "wake acknowledged", || async {
        (env.state("s1").await == Some(SessionState::Idle)).then_some(())
    })
    .await;
    assert!(env.store.pending_wakes(shard, 10).await.unwrap().is_empty());
    assert_eq!(patched_states(&fake, "s1"), ["running"]);
    reaper.stop().await;
}

/// A wake patch the API server holds (until the reaper's Kubernetes timeout)
/// holds up its own session only: another session's wake lands meanwhile.
#[sqlx::test(migrations = "../../migrations")]
async fn a_hung_wake_patch_does_not_hold_up_other_wakes(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    for name in ["s1", "s2"] {
        fake.apply_session(NS, session_json(name, "hibernated", Some("10m"), false))
            .unwrap();
    }
    let mut reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(5)).await;
    eventually(Duration::from_secs(10), "both mirrored", || async {
        (env.state("s1").await == Some(SessionState::Hibernated)
            && env.state("s2").await == Some(SessionState::Hibernated))
        .then_some(())
    })
    .await;
    fault_next_patch(&fake, "s1", Fault::Hang);

    env.connect("s1", "alice").await;
    fake.wait_for_injected(|f| !f.is_empty(), Duration::from_secs(5))
        .await
        .unwrap();
    env.connect("s2", "bob").await;
    wait_kube_state(&fake, "s2", "running", Duration::from_secs(5)).await;
    // s1's patch is still held: the fake records a request once it is answered
    // or its client gave up.
    let s1_answered = fake
        .requests()
        .iter()
        .any(|r| r.verb == Verb::Patch && r.name.as_deref() == Some("s1"));
    assert!(!s1_answered, "s2 was woken only after s1's patch ended");
    assert_eq!(fake.hung_requests(), 1);

    // Released unapplied (504): s1's wake is retried and lands.
    fake.release_hung_requests();
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(10)).await;
    assert_eq!(patched_states(&fake, "s1"), ["running", "running"]);
    assert_eq!(patched_states(&fake, "s2"), ["running"]);
    reaper.stop().await;
}

/// The wake patch lands, then Redis is cut before the acknowledgement: once
/// Redis is back the wake is recorded as this reaper's (a `woken` event), not
/// as a Session someone else had woken, and nothing is patched twice.
#[sqlx::test(migrations = "../../migrations")]
async fn a_wake_recorded_after_a_redis_cut_is_still_ours(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let (cfg, proxy) = env.kube_config_behind_proxy().await;
    let (fake, reaper) = leading_over_hibernated_s1(&env, cfg).await;
    answer_next_patch_late(&fake, "s1");
    env.connect("s1", "alice").await;
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(5)).await;
    proxy.set_enabled(false);
    eventually(Duration::from_secs(10), "the record failed", || async {
        let (_, text) = reaper.get("/metrics").await;
        (metric(&text, "tracker_reaper_store_errors_total{task=\"wake\"}") >= 1.0).then_some(())
    })
    .await;
    proxy.set_enabled(true);
    woken_by_this_reaper(&env, &reaper).await;
    assert_eq!(patched_states(&fake, "s1"), ["running"]);
    reaper.stop().await;
}

/// Finding (noted last stop): on Kubernetes with NATS, the leader woke s1,
/// Redis failed on the record, and the leader died before Redis answered.
/// The next leader found s1 running and acknowledged the wake as someone
/// else's; the wake event lived in the dead leader's memory and was never
/// published. The waker now arms the event in the store before the patch,
/// and whoever acknowledges the wake queues it.
#[sqlx::test(migrations = "../../migrations")]
async fn a_wake_made_by_a_leader_that_died_is_announced_by_the_next(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("wake-leader")).await.unwrap();
    let (mut cfg, proxy) = env.kube_config_behind_proxy().await;
    cfg.nats_url = Some(Secret::new(nats.url()));
    let (fake, first) = leading_over_hibernated_s1(&env, cfg).await;
    answer_next_patch_late(&fake, "s1");
    env.connect("s1", "alice").await;
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(5)).await;
    proxy.set_enabled(false);
    eventually(Duration::from_secs(10), "the record failed", || async {
        let (_, text) = first.get("/metrics").await;
        (metric(&text, "tracker_reaper_store_errors_total{task=\"wake\"}") >= 1.0).then_some(())
    })
    .await;
    first.kill().await;

    let mut cfg = env.kube_config();
    cfg.nats_url = Some(Secret::new(nats.url()));
    let mut second = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    second.wait_leader(Duration::from_secs(15)).await;
    let wakes = eventually(Duration::from_secs(15), "the wake announced", || async {
        let wakes: Vec<_> = stream_events(&nats.url())
            .await
            .into_iter()
            .filter(|e| e.subject == "streamspace.session.wake.kubernetes")
            .collect();
        (!wakes.is_empty() && env.state("s1").await == Some(SessionState::Running)).then_some(wakes)
    })
    .await;
    assert_eq!(wakes.len(), 1, "{wakes:#?}");
    assert_eq!(wakes[0].payload.session_id, "s1");
    assert_eq!(patched_states(&fake, "s1"), ["running"], "woken once");
    second.stop().await;
    nats.stop().await.unwrap();
}

/// kube's client used to retry a PATCH answered 504; when the first one was
/// applied, the retry met the new resourceVersion and failed with 409. The
/// waker read the Session again at its next pass, found it running and
/// recorded the wake as someone else's: no `woken` event. A wake patch whose
/// answer leaves it open (a 409, a timeout, a 5xx) is now remembered as
/// possibly ours, and the running Session found next is recorded as our
/// wake. The reaper's client no longer retries, but a 409 after landing can
/// still come from any retrying hop between it and the API server.
#[sqlx::test(migrations = "../../migrations")]
async fn a_wake_patch_refused_as_a_conflict_after_it_landed_is_still_ours(pool: PgPool) {
    a_wake_patch_answered_after_it_landed_is_still_ours(pool, 409).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_wake_patch_answered_504_after_it_landed_is_still_ours(pool: PgPool) {
    a_wake_patch_answered_after_it_landed_is_still_ours(pool, 504).await;
}

async fn a_wake_patch_answered_after_it_landed_is_still_ours(pool: PgPool, status: u16) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(5), &pool).await;
    let (fake, reaper) = leading_over_hibernated_s1(&env, env.kube_config()).await;
    fault_next_patch(&fake, "s1", Fault::AppliedButError { status });
    env.connect("s1", "alice").await;
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(5)).await;
    woken_by_this_reaper(&env, &reaper).await;
    reaper.stop().await;
}

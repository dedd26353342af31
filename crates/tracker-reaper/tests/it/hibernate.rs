//! Hibernation: idle Sessions are patched `hibernated` after their idle
//! timeout and not before; exempt ones never; dry run and `platform=none`
//! record without patching.

use std::time::Duration;

use fake_kube::{ApplyAt, FakeKube, Fault};
use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::{IdleTimeout, ResourceState, SessionMeta, SessionState};

use tracker_e2e::nats_server::NatsServer;
use tracker_reaper::config::Secret;

use crate::helpers::{
    eventually, fault_next_patch, kube_state, nats_dir, patched_states, session_json, sid,
    stream_events, wait_kube_state, Env, Reaper, NS,
};

#[sqlx::test(migrations = "../../migrations")]
async fn an_idle_session_is_hibernated_after_its_timeout_and_not_before(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(3), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    // The canary shows when the guard is over and hibernation works at all.
    fake.apply_session(NS, session_json("canary", "running", Some("1s"), false))
        .unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("2s"), false))
        .unwrap();
    fake.apply_session(NS, session_json("exempt", "running", Some("1s"), true))
        .unwrap();
    fake.apply_session(NS, session_json("never", "running", Some(""), false))
        .unwrap();
    fake.apply_session(NS, session_json("default", "running", None, false))
        .unwrap();
    let reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;

    env.wait_state("s1", SessionState::Idle).await;
    let c1 = env.connect("s1", "alice").await;

    // The guard (one heartbeat window) is longer than s1's idle timeout:
    // by the time the canary goes, s1 has been connected past it.
    eventually(Duration::from_secs(15), "canary hibernated", || async {
        (kube_state(&fake, "canary").as_deref() == Some("hibernated")).then_some(())
    })
    .await;
    assert!(
        patched_states(&fake, "s1").is_empty(),
        "a connected session was patched"
    );

    env.store.close(&sid("s1"), c1).await.unwrap();
    let closed_at = env
        .store
        .session(&sid("s1"))
        .await
        .unwrap()
        .and_then(|v| v.last_disconnect_at)
        .unwrap();
    eventually(Duration::from_secs(10), "s1 hibernated", || async {
        (kube_state(&fake, "s1").as_deref() == Some("hibernated")).then_some(())
    })
    .await;
    let patches = fake.session_patches("s1");
    assert_eq!(patches.len(), 1);
    let p = &patches[0];
    assert!(
        p.received_at >= closed_at + chrono::Duration::milliseconds(1995),
        "patched {} after the close",
        p.received_at - closed_at
    );
    assert_eq!(p.field_manager.as_deref(), Some("tracker-reaper"));
    assert!(p
        .content_type
        .as_deref()
        .unwrap_or_default()
        .contains("merge-patch"));
    assert_eq!(p.status, 200);

    eventually(Duration::from_secs(5), "hibernation recorded", || async {
        (env.state("s1").await == Some(SessionState::Hibernated)
            && env.events("s1").await == ["hibernated"])
        .then_some(())
    })
    .await;
    for name in ["exempt", "never", "default"] {
        assert!(patched_states(&fake, name).is_empty(), "{name} was patched");
        assert_eq!(env.state(name).await, Some(SessionState::Idle), "{name}");
    }
    let (_, text) = reaper.get("/metrics").await;
    assert!(
        text.contains("tracker_reaper_hibernations_total{result=\"hibernated\"} 2"),
        "{text}"
    );
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_failed_patch_is_rolled_back_and_retried(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("1s"), false))
        .unwrap();
    fake.fail_session_patches(1, 500);
    let reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;
    // The first patch fails; the claim is rolled back and retried 2 s later.
    eventually(
        Duration::from_secs(15),
        "s1 hibernated on retry",
        || async { (kube_state(&fake, "s1").as_deref() == Some("hibernated")).then_some(()) },
    )
    .await;
    let statuses: Vec<u16> = fake
        .session_patches("s1")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [500, 200]);
    eventually(Duration::from_secs(5), "one event", || async {
        (env.events("s1").await == ["hibernated"]).then_some(())
    })
    .await;
    let (_, text) = reaper.get("/metrics").await;
    assert!(
        text.contains("tracker_reaper_hibernations_total{result=\"failed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tracker_reaper_kube_errors_total{operation=\"patch_session\"} 1"),
        "{text}"
    );
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn dry_run_patches_nothing_and_records_events(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("1s"), false))
        .unwrap();
    let mut cfg = env.kube_config();
    cfg.dry_run = true;
    let reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    eventually(Duration::from_secs(15), "dry run event", || async {
        (env.events("s1").await == ["dry_run_hibernate"]).then_some(())
    })
    .await;
    assert!(
        fake.requests().is_empty(),
        "dry run wrote: {:?}",
        fake.requests()
    );
    assert_eq!(kube_state(&fake, "s1").as_deref(), Some("running"));
    // Rolled back with a long retry: idle again, not decided every tick.
    assert_eq!(env.state("s1").await, Some(SessionState::Idle));
    let (_, text) = reaper.get("/metrics").await;
    assert!(
        text.contains("tracker_reaper_hibernations_total{result=\"dry_run\"} 1"),
        "{text}"
    );
    reaper.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn platform_none_decides_and_records_only(pool: PgPool) {
    let env = Env::new(Backend::Cluster, Duration::from_secs(1), &pool).await;
    // No cluster: the session is known to the store some other way.
    let meta = SessionMeta {
        session_id: sid("s1"),
        uid: None,
        owner: Some("alice".into()),
        idle_source: Default::default(),
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(Duration::from_secs(1)),
        generation: Some(1),
        max_session_duration: None,
        created_at: None,
    };
    let term = env.store.newest_term().await.unwrap();
    assert_eq!(
        env.store.mirror_session(&meta, term).await.unwrap(),
        tracker_core::Written::Done
    );
    let reaper = Reaper::start(env.config(), env.overrides()).await;
    eventually(Duration::from_secs(15), "hibernation recorded", || async {
        (env.state("s1").await == Some(SessionState::Hibernated)
            && env.events("s1").await == ["hibernated"])
        .then_some(())
    })
    .await;
    env.connect("s1", "alice").await;
    eventually(Duration::from_secs(5), "wake recorded", || async {
        (env.state("s1").await == Some(SessionState::Running)
            && env.events("s1").await == ["hibernated", "woken"])
        .then_some(())
    })
    .await;
    reaper.stop().await;
}

fn idle_meta(name: &str, secs: u64) -> SessionMeta {
    SessionMeta {
        session_id: sid(name),
        uid: None,
        owner: None,
        idle_source: Default::default(),
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(Duration::from_secs(secs)),
        generation: Some(1),
        max_session_duration: None,
        created_at: None,
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn nothing_is_hibernated_for_a_window_after_leadership_or_data_loss(pool: PgPool) {
    let window = Duration::from_secs(2);
    let env = Env::new(Backend::Standalone, window, &pool).await;
    // Long overdue before the reaper starts.
    let term = env.store.newest_term().await.unwrap();
    env.store
        .mirror_session(&idle_meta("s0", 1), term)
        .await
        .unwrap();
    env.clock.advance(Duration::from_secs(3600));
    let mut reaper = Reaper::start(env.config(), env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(5)).await;
    let leader_at = std::time::Instant::now();
    eventually(Duration::from_secs(10), "s0 hibernated", || async {
        (env.state("s0").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
    assert!(
        leader_at.elapsed() >= window - Duration::from_millis(300),
        "{:?}",
        leader_at.elapsed()
    );

    // Redis "loses" its data: every shard's epoch marker is gone.
    let (urls, _) = Backend::Standalone.urls();
    let mut raw = redis::Client::open(urls[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for shard in env.store.keys().shards() {
        let key = env
            .store
            .keys()
            .shard_key(shard, tracker_core::ShardKey::Epoch);
        let n: i64 = redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        assert_eq!(n, 1, "{key}");
    }
    let lost_at = std::time::Instant::now();
    let term = env.store.newest_term().await.unwrap();
    let written = env
        .store
        .mirror_session(&idle_meta("s1", 1), term)
        .await
        .unwrap();
    assert_eq!(written, tracker_core::Written::Done);
    env.clock.advance(Duration::from_secs(5));
    eventually(Duration::from_secs(10), "s1 hibernated", || async {
        (env.state("s1").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
    assert!(
        lost_at.elapsed() >= window,
        "hibernated {:?} after the loss",
        lost_at.elapsed()
    );
    reaper.stop().await;
}

/// A hibernation patch the API server applies only after the reaper gave up
/// on it (and re-read the Session still running) lands after a user came and
/// went: the connection, made after the decision, wakes the session, even
/// though it ended before the reaper saw the late landing.
///
/// With NATS (both variants), finding: the hibernate event went with the
/// reaper's own record of its patch, which a landing seen only by the mirror
/// never made, so the wake was announced and the hibernation never was. The
/// claim now carries its event for whoever records the landing.
#[sqlx::test(migrations = "../../migrations")]
async fn a_late_landing_of_a_released_patch_is_undone_for_a_connection_since(pool: PgPool) {
    late_landing_after_a_visit(pool, WatchAfterLanding::Relists).await;
}

/// Finding (races, seed 60): the same late landing, but the watch missed it
/// and only resumed (no list) afterwards, so the store kept the Session
/// running: users who came next were told `running` and never woken. The
/// hibernator now reads a released patch's Session again until it moves on.
#[sqlx::test(migrations = "../../migrations")]
async fn a_late_landing_the_watch_never_shows_is_undone_for_a_connection_since(pool: PgPool) {
    late_landing_after_a_visit(pool, WatchAfterLanding::MissesIt).await;
}

enum WatchAfterLanding {
    /// The watch expires and lists again, showing the landing.
    Relists,
    /// The watch never shows the landing.
    MissesIt,
}

async fn late_landing_after_a_visit(pool: PgPool, watch: WatchAfterLanding) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("late-landing")).await.unwrap();
    let mut cfg = env.kube_config();
    cfg.nats_url = Some(Secret::new(nats.url()));
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("8s"), false))
        .unwrap();
    // Longer than the reaper's Kubernetes timeout (2 s here), shorter than
    // the idle timeout that would make the session due again after the visit.
    fault_next_patch(
        &fake,
        "s1",
        Fault::Slow {
            delay: Duration::from_secs(3),
            apply: ApplyAt::AfterDelay,
        },
    );
    let reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    fake.wait_for_injected(|f| !f.is_empty(), Duration::from_secs(15))
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "claim released", || async {
        (env.state("s1").await == Some(SessionState::Idle)).then_some(())
    })
    .await;
    assert_eq!(kube_state(&fake, "s1").as_deref(), Some("running"));

    // The watch misses the landing (until after the visit, or for good).
    fake.set_dropping_watch_events(true);
    let c = env.connect("s1", "alice").await;
    env.store.close(&sid("s1"), c).await.unwrap();
    wait_kube_state(&fake, "s1", "hibernated", Duration::from_secs(5)).await;
    if let WatchAfterLanding::Relists = watch {
        fake.set_dropping_watch_events(false);
        fake.expire_watches();
    }

    wait_kube_state(&fake, "s1", "running", Duration::from_secs(10)).await;
    assert_eq!(patched_states(&fake, "s1"), ["hibernated", "running"]);
    // Each change announced, in order (the wake's event is queued when its
    // patch is recorded; the hibernation's, at the latest, with it). The
    // session idles again afterwards: a later hibernation may follow.
    let subjects = eventually(Duration::from_secs(10), "both events on NATS", || async {
        let subjects: Vec<String> = stream_events(&nats.url())
            .await
            .into_iter()
            .filter(|e| e.payload.session_id == "s1")
            .map(|e| e.subject)
            .collect();
        (subjects.len() >= 2).then(|| subjects[..2].to_vec())
    })
    .await;
    assert_eq!(
        subjects,
        [
            "streamspace.session.hibernate.kubernetes",
            "streamspace.session.wake.kubernetes"
        ]
    );
    reaper.stop().await;
    nats.stop().await.unwrap();
}

/// Finding (races, seed 43): kube's client retried a PATCH answered 504, and
/// the fake (like an API server behind a gateway) had applied the first one:
/// the retry's resourceVersion precondition failed with 409, which the
/// hibernator took for someone else's change and released the claim as if
/// nothing had landed. With the watch missing the landing, users who came
/// next were told `running` and never woke the session. A 409 is now
/// resolved like a lost answer: by reading the Session. (The reaper's client
/// no longer retries; any retrying hop on the way can still answer 409.)
#[sqlx::test(migrations = "../../migrations")]
async fn a_patch_refused_as_a_conflict_after_it_landed_is_recorded(pool: PgPool) {
    a_patch_answered_after_it_landed_is_recorded(pool, 409).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_patch_answered_504_after_it_landed_is_recorded(pool: PgPool) {
    a_patch_answered_after_it_landed_is_recorded(pool, 504).await;
}

async fn a_patch_answered_after_it_landed_is_recorded(pool: PgPool, status: u16) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("s1", "running", Some("2s"), false))
        .unwrap();
    fault_next_patch(&fake, "s1", Fault::AppliedButError { status });
    let reaper = Reaper::start(env.kube_config(), env.kube_overrides(&fake)).await;
    env.wait_state("s1", SessionState::Idle).await;
    // The watch misses the landing.
    fake.set_dropping_watch_events(true);
    fake.wait_for_injected(
        |f| {
            f.iter()
                .any(|x| matches!(x.injection, fake_kube::Injection::Request { .. }))
        },
        Duration::from_secs(15),
    )
    .await
    .unwrap();
    // The claim is resolved one way or the other: recorded or released.
    let resolved = eventually(Duration::from_secs(5), "the claim resolved", || async {
        let state = env.state("s1").await;
        (state != Some(SessionState::Hibernating)).then_some(state)
    })
    .await;
    assert_eq!(
        resolved,
        Some(SessionState::Hibernated),
        "the landing recorded"
    );
    // A user who comes now wakes it.
    env.connect("s1", "alice").await;
    wait_kube_state(&fake, "s1", "running", Duration::from_secs(5)).await;
    reaper.stop().await;
}

//! The docker platform: sessions declared through the store (as the API's
//! `PUT` does), hibernate and wake announced through a real `nats-server`
//! with JetStream (started per test on a free port), each done once NATS has
//! acknowledged its event; nothing lost or doubled across a NATS outage.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgPool;
use tracker_core::testing::Backend;
use tracker_core::{IdleTimeout, ResourceState, SessionMeta, SessionState};
use tracker_e2e::nats_server::NatsServer;
use tracker_reaper::config::Secret;
use tracker_reaper::nats::Payload;
use tracker_reaper::{Config, Platform};

use crate::helpers::{
    answer_next_patch_late, eventually, kube_state, metric, nats_dir, patched_states, session_json,
    sid, stream_events, wait_kube_state, Env, Reaper, NS,
};

fn docker_config(env: &Env, nats: &NatsServer) -> Config {
    let mut cfg = env.config();
    cfg.platform = Platform::Docker;
    cfg.nats_url = Some(Secret::new(nats.url()));
    cfg.nats_timeout = Duration::from_secs(1);
    cfg
}

fn declared(name: &str, state: ResourceState, idle: Duration) -> SessionMeta {
    SessionMeta {
        session_id: sid(name),
        uid: None,
        owner: Some("alice".into()),
        idle_source: tracker_core::IdleSource::Spec,
        state,
        idle_timeout: IdleTimeout::After(idle),
        generation: None,
        max_session_duration: None,
        created_at: None,
    }
}

/// Declares a running "canary" with a 1 s idle timeout and waits until the
/// leader hibernated it: the loop works end to end before a test's fault.
async fn hibernate_canary(env: &Env) {
    env.store
        .declare_session(&declared(
            "canary",
            ResourceState::Running,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "canary hibernated", || async {
        (state(env, "canary").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
}

async fn state(env: &Env, name: &str) -> Option<SessionState> {
    env.state(name).await
}

async fn assert_states(env: &Env, names: &[String], expected: SessionState) {
    for name in names {
        assert_eq!(state(env, name).await, Some(expected), "{name}");
    }
}

#[sqlx::test(migrations = "../../migrations")]
async fn hibernate_and_wake_are_announced_on_nats_and_done_once_acknowledged(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("events")).await.unwrap();
    let mut reaper = Reaper::start(docker_config(&env, &nats), env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(10)).await;

    let created = env
        .store
        .declare_session(&declared(
            "desk",
            ResourceState::Running,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    assert!(created.created);
    eventually(Duration::from_secs(15), "desk hibernated", || async {
        (state(&env, "desk").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
    let events = stream_events(&nats.url()).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let hibernate = &events[0];
    assert_eq!(hibernate.subject, "streamspace.session.hibernate.docker");
    assert_eq!(hibernate.payload.session_id, "desk");
    assert_eq!(hibernate.payload.user_id, "alice");
    assert_eq!(hibernate.payload.platform, "docker");
    assert_eq!(hibernate.payload.reason, "idle_timeout");
    assert_eq!(
        hibernate.msg_id.as_deref(),
        Some(hibernate.payload.event_id.as_str())
    );
    assert!(chrono::DateTime::parse_from_rfc3339(&hibernate.payload.timestamp).is_ok());

    // The controller acknowledges what it did; nothing else changes.
    env.store
        .declare_session(&declared(
            "desk",
            ResourceState::Hibernated,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    assert_eq!(state(&env, "desk").await, Some(SessionState::Hibernated));

    // A connection wakes it: one wake event, then running.
    let conn = env.connect("desk", "alice").await;
    eventually(Duration::from_secs(10), "desk woken", || async {
        (state(&env, "desk").await == Some(SessionState::Running)).then_some(())
    })
    .await;
    let events = stream_events(&nats.url()).await;
    assert_eq!(events.len(), 2, "{events:?}");
    let wake = &events[1];
    assert_eq!(wake.subject, "streamspace.session.wake.docker");
    assert_eq!(wake.payload.session_id, "desk");
    assert_eq!(wake.payload.user_id, "alice");
    assert_eq!(wake.payload.reason, "connection");
    assert_ne!(wake.payload.event_id, hibernate.payload.event_id);
    eventually(Duration::from_secs(5), "events recorded", || async {
        (env.events("desk").await == ["hibernated", "woken"]).then_some(())
    })
    .await;

    // The controller reports it running; gone idle again, it hibernates again.
    env.store
        .declare_session(&declared(
            "desk",
            ResourceState::Running,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    env.store.close(&sid("desk"), conn).await.unwrap();
    eventually(Duration::from_secs(10), "desk hibernated again", || async {
        (state(&env, "desk").await == Some(SessionState::Hibernated)).then_some(())
    })
    .await;
    let events = stream_events(&nats.url()).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2].subject, "streamspace.session.hibernate.docker");

    let (_, text) = reaper.get("/metrics").await;
    assert_eq!(
        metric(
            &text,
            "tracker_reaper_nats_published_events_total{kind=\"hibernate\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "tracker_reaper_nats_published_events_total{kind=\"wake\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "tracker_reaper_nats_outbox_events"), 0.0);
    reaper.stop().await;
    nats.stop().await.unwrap();
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_controller_report_is_followed_not_fought(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("report")).await.unwrap();
    let mut reaper = Reaper::start(docker_config(&env, &nats), env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(10)).await;
    // The controller says a session it runs is hibernated: no event, no wake.
    env.store
        .declare_session(&declared(
            "parked",
            ResourceState::Hibernated,
            Duration::from_secs(1),
        ))
        .await
        .unwrap();
    // One it declares exempt never hibernates; one terminated never wakes.
    let mut exempt = declared("kept", ResourceState::Running, Duration::from_secs(1));
    exempt.idle_timeout = IdleTimeout::Off;
    env.store.declare_session(&exempt).await.unwrap();
    hibernate_canary(&env).await;
    assert_eq!(state(&env, "parked").await, Some(SessionState::Hibernated));
    assert_eq!(state(&env, "kept").await, Some(SessionState::Idle));
    // The controller woke "parked" itself: followed, and idle from now.
    env.store
        .declare_session(&declared(
            "parked",
            ResourceState::Running,
            Duration::from_secs(60),
        ))
        .await
        .unwrap();
    assert_eq!(state(&env, "parked").await, Some(SessionState::Idle));
    let subjects: Vec<String> = stream_events(&nats.url())
        .await
        .into_iter()
        .map(|e| format!("{} {}", e.subject, e.payload.session_id))
        .collect();
    assert_eq!(subjects, ["streamspace.session.hibernate.docker canary"]);

    // A warning ahead of a max duration goes out the same way, queued by the
    // claim that records it; it changes no state. (Declared by a controller
    // warning an hour ahead of a 10-minute limit: due at once.)
    let early = tracker_core::StoreConfig {
        warn_before: Duration::from_secs(3600),
        ..env.store_cfg.clone()
    };
    let early = tracker_core::testing::connect(&early).await;
    let mut limited = exempt.clone();
    limited.max_session_duration = Some(Duration::from_secs(600));
    early.declare_session(&limited).await.unwrap();
    let events = eventually(Duration::from_secs(15), "the warning", || async {
        let events = stream_events(&nats.url()).await;
        (events.len() == 2).then_some(events)
    })
    .await;
    assert_eq!(events[1].subject, "streamspace.session.warning.docker");
    assert_eq!(events[1].payload.session_id, "kept");
    assert_eq!(events[1].payload.user_id, "alice");
    assert_eq!(events[1].payload.reason, "max_duration");
    assert_eq!(state(&env, "kept").await, Some(SessionState::Idle));
    eventually(
        Duration::from_secs(5),
        "the warning acknowledged",
        || async { (env.store.events_backlog().await.unwrap() == 0).then_some(()) },
    )
    .await;
    reaper.stop().await;
    nats.stop().await.unwrap();
}

/// NATS down for 30 s while sessions go idle and some are connected to
/// again: every event waits in Redis, and once NATS is back each is
/// delivered exactly once (by event id), in the order decided.
#[sqlx::test(migrations = "../../migrations")]
async fn a_nats_outage_loses_and_doubles_nothing(pool: PgPool) {
    const OUTAGE: Duration = Duration::from_secs(30);
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("outage")).await.unwrap();
    let mut reaper = Reaper::start(docker_config(&env, &nats), env.overrides()).await;
    reaper.wait_leader(Duration::from_secs(10)).await;
    let idle = Duration::from_secs(1);
    hibernate_canary(&env).await;

    nats.stop().await.unwrap();
    let down_at = tokio::time::Instant::now();
    let names: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    for name in &names {
        env.store
            .declare_session(&declared(name, ResourceState::Running, idle))
            .await
            .unwrap();
    }
    // Every one is claimed and its event queued, none counts as hibernated.
    eventually(
        Duration::from_secs(15),
        "ten hibernations queued",
        || async {
            let mut hibernating = 0;
            for name in &names {
                if state(&env, name).await == Some(SessionState::Hibernating) {
                    hibernating += 1;
                }
            }
            (hibernating == names.len() && env.store.events_backlog().await.unwrap() == 10)
                .then_some(())
        },
    )
    .await;
    // Three are connected to while their hibernation waits: each gets a
    // wake, queued behind its hibernate event.
    let mut live = Vec::new();
    for name in &names[..3] {
        live.push((sid(name), env.connect(name, "alice").await));
    }
    // Their users stay: heartbeats keep the connections live through the outage.
    let beating = {
        let store = env.store.clone();
        tokio::spawn(async move {
            loop {
                for (s, c) in &live {
                    let _ = store.heartbeat(s, *c).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    eventually(Duration::from_secs(10), "three wakes queued", || async {
        (env.store.events_backlog().await.unwrap() == 13).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(15),
        "the outbox gauge shows them",
        || async {
            let (_, text) = reaper.get("/metrics").await;
            (metric(&text, "tracker_reaper_nats_outbox_events") == 13.0).then_some(())
        },
    )
    .await;
    // The outage is the scenario: it lasts its full length.
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    let (_, text) = reaper.get("/metrics").await;
    let failures: f64 = text
        .lines()
        .filter(|l| l.starts_with("tracker_reaper_nats_publish_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures >= 1.0, "no failed publication counted:\n{text}");
    // Nothing counts as done while NATS has not acknowledged it.
    assert_states(&env, &names[..3], SessionState::Waking).await;
    assert_states(&env, &names[3..], SessionState::Hibernating).await;

    nats.start_again().await.unwrap();
    eventually(Duration::from_secs(30), "every event delivered", || async {
        (env.store.events_backlog().await.unwrap() == 0).then_some(())
    })
    .await;
    for name in &names[..3] {
        // Woken: running, with its user's connection (Running) or, on a
        // machine too busy to keep a 1 s heartbeat window, without (Idle).
        let woken = state(&env, name).await;
        assert!(
            matches!(woken, Some(SessionState::Running | SessionState::Idle)),
            "{name}: {woken:?}"
        );
    }
    assert_states(&env, &names[3..], SessionState::Hibernated).await;

    let events = stream_events(&nats.url()).await;
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for e in &events {
        *by_id.entry(e.payload.event_id.as_str()).or_default() += 1;
        assert_eq!(e.msg_id.as_deref(), Some(e.payload.event_id.as_str()));
    }
    assert!(
        by_id.values().all(|&n| n == 1),
        "an event doubled: {events:#?}"
    );
    assert_eq!(events.len(), 1 + 10 + 3, "{events:#?}");
    let seq_of = |name: &str, kind: &str| -> Vec<u64> {
        events
            .iter()
            .filter(|e| {
                e.payload.session_id == name
                    && e.subject == format!("streamspace.session.{kind}.docker")
            })
            .map(|e| e.sequence)
            .collect()
    };
    for name in &names {
        assert_eq!(seq_of(name, "hibernate").len(), 1, "{name}");
    }
    for name in &names[..3] {
        let (h, w) = (seq_of(name, "hibernate"), seq_of(name, "wake"));
        assert_eq!(w.len(), 1, "{name}");
        assert!(h[0] < w[0], "{name}: the wake came before the hibernation");
    }
    beating.abort();
    reaper.stop().await;
    nats.stop().await.unwrap();
}

/// On Kubernetes with `TRACKER_NATS_URL`, events announce patches already
/// made; NATS being down never holds a patch up, and the events follow once
/// it is back.
#[sqlx::test(migrations = "../../migrations")]
async fn on_kubernetes_events_follow_the_patches_without_holding_them_up(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = fake_kube::FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("k1", "running", Some("1s"), false))
        .unwrap();
    let mut nats = NatsServer::start(&nats_dir("kube")).await.unwrap();
    let mut cfg = env.kube_config();
    cfg.nats_url = Some(Secret::new(nats.url()));
    cfg.nats_timeout = Duration::from_secs(1);
    let mut reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(10)).await;
    eventually(Duration::from_secs(15), "k1 hibernated", || async {
        (kube_state(&fake, "k1").as_deref() == Some("hibernated")).then_some(())
    })
    .await;
    let events = eventually(Duration::from_secs(10), "the hibernate event", || async {
        let events = stream_events(&nats.url()).await;
        (events.len() == 1).then_some(events)
    })
    .await;
    assert_eq!(
        events[0].subject,
        "streamspace.session.hibernate.kubernetes"
    );
    assert_eq!(events[0].payload.platform, "kubernetes");
    assert_eq!(events[0].payload.user_id, "alice");

    nats.stop().await.unwrap();
    env.connect("k1", "alice").await;
    eventually(
        Duration::from_secs(10),
        "k1 woken with NATS down",
        || async { (kube_state(&fake, "k1").as_deref() == Some("running")).then_some(()) },
    )
    .await;
    nats.start_again().await.unwrap();
    let events = eventually(Duration::from_secs(20), "the wake event", || async {
        let events = stream_events(&nats.url()).await;
        (events.len() == 2).then_some(events)
    })
    .await;
    assert_eq!(events[1].subject, "streamspace.session.wake.kubernetes");
    assert_eq!(events[1].payload.reason, "connection");
    reaper.stop().await;
    nats.stop().await.unwrap();
}

/// The hibernation patch lands, then Redis is cut before the reaper records
/// it: the watch records the state once Redis is back, but the hibernate
/// event went with the failed record. The reaper records it again once
/// Redis answers, so the event is published, once.
#[sqlx::test(migrations = "../../migrations")]
async fn a_hibernation_recorded_after_a_redis_cut_is_still_announced(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let fake = fake_kube::FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("k1", "running", Some("1s"), false))
        .unwrap();
    let mut nats = NatsServer::start(&nats_dir("kube-cut")).await.unwrap();
    let (mut cfg, proxy) = env.kube_config_behind_proxy().await;
    cfg.nats_url = Some(Secret::new(nats.url()));
    cfg.nats_timeout = Duration::from_secs(1);
    answer_next_patch_late(&fake, "k1");
    let mut reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(10)).await;
    wait_kube_state(&fake, "k1", "hibernated", Duration::from_secs(15)).await;
    proxy.set_enabled(false);
    eventually(
        Duration::from_secs(10),
        "the patch answered, its record failed",
        || async {
            let (_, text) = reaper.get("/metrics").await;
            (metric(
                &text,
                "tracker_reaper_hibernations_total{result=\"hibernated\"}",
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    proxy.set_enabled(true);
    let events = eventually(Duration::from_secs(20), "the hibernate event", || async {
        let events = stream_events(&nats.url()).await;
        (!events.is_empty() && env.store.events_backlog().await.ok() == Some(0)).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].subject,
        "streamspace.session.hibernate.kubernetes"
    );
    assert_eq!(patched_states(&fake, "k1"), ["hibernated"]);
    assert_eq!(state(&env, "k1").await, Some(SessionState::Hibernated));
    reaper.stop().await;
    nats.stop().await.unwrap();
}

/// A leader dies with events queued, one of which reached NATS without its
/// acknowledgement coming back: the next leader publishes what is queued,
/// under the same ids, and JetStream keeps one copy of each.
#[sqlx::test(migrations = "../../migrations")]
async fn a_new_leader_publishes_what_the_old_one_left_under_the_same_ids(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(1), &pool).await;
    let mut nats = NatsServer::start(&nats_dir("leader")).await.unwrap();
    let cfg = docker_config(&env, &nats);
    let mut first = Reaper::start(cfg.clone(), env.overrides()).await;
    first.wait_leader(Duration::from_secs(10)).await;
    let idle = Duration::from_secs(1);
    hibernate_canary(&env).await;

    nats.stop().await.unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("l{i}")).collect();
    for name in &names {
        env.store
            .declare_session(&declared(name, ResourceState::Running, idle))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(15),
        "four hibernations queued",
        || async { (env.store.events_backlog().await.unwrap() == 4).then_some(()) },
    )
    .await;
    first.kill().await;
    nats.start_again().await.unwrap();

    // The first queued event landed in NATS, but its acknowledgement was lost.
    let mut queued = Vec::new();
    for shard in env.store.keys().shards() {
        queued.extend(env.store.events_read(shard, 100).await.unwrap().events);
    }
    assert_eq!(queued.len(), 4);
    let landed = &queued[0];
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let body = serde_json::to_vec(&Payload::of(landed)).unwrap();
    let message = async_nats::jetstream::message::PublishMessage::build()
        .message_id(&landed.event_id)
        .payload(body.into());
    let subject = format!("streamspace.session.hibernate.{}", landed.platform);
    js.send_publish(subject, message)
        .await
        .unwrap()
        .await
        .unwrap();

    let mut second = Reaper::start(cfg, env.overrides()).await;
    second.wait_leader(Duration::from_secs(15)).await;
    eventually(Duration::from_secs(20), "every event delivered", || async {
        (env.store.events_backlog().await.unwrap() == 0).then_some(())
    })
    .await;
    for name in &names {
        assert_eq!(
            state(&env, name).await,
            Some(SessionState::Hibernated),
            "{name}"
        );
    }
    let events = stream_events(&nats.url()).await;
    assert_eq!(events.len(), 1 + 4, "{events:#?}");
    let mut ids: Vec<&str> = events.iter().map(|e| e.payload.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 5, "an event doubled: {events:#?}");
    let queued_ids: Vec<&str> = queued.iter().map(|e| e.event_id.as_str()).collect();
    for id in queued_ids {
        assert!(ids.contains(&id), "{id} published under another id");
    }
    second.stop().await;
    nats.stop().await.unwrap();
}

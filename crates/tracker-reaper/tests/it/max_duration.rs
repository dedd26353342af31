//! Max session duration: a Session with `spec.maxSessionDuration` and a live
//! connection gets one warning, then is hibernated with its connections
//! ended as `max_duration` (one history row each); a wake starts a new
//! period; a leader change between the warning and the deadline neither
//! loses nor doubles either.
//!
//! Time moves with the store's clock offset, in steps shorter than the
//! heartbeat window with a heartbeat after each, so the connection stays
//! live while hours pass in a second.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fake_kube::FakeKube;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracker_core::testing::Backend;
use tracker_core::{ConnectionId, SessionId, SessionState, Store};

use crate::helpers::{eventually, kube_state, patched_states, session_json, sid, Env, Reaper, NS};

const MAX: &str = "1h";
const WARN: Duration = Duration::from_secs(600);

/// A Session limited to [`MAX`], never idle-hibernated while the test runs.
fn limited(name: &str) -> serde_json::Value {
    let mut s = session_json(name, "running", Some("24h"), false);
    s["spec"]["maxSessionDuration"] = MAX.into();
    s
}

/// Heartbeats a connection every 200 ms (a client that is there) until dropped.
struct Pulse(CancellationToken);

impl Pulse {
    fn start(store: &Store, session: &SessionId, id: ConnectionId) -> Self {
        let stop = CancellationToken::new();
        let (store, session, token) = (store.clone(), session.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = tick.tick() => {
                        let _ = store.heartbeat(&session, id).await;
                    }
                }
            }
        });
        Self(stop)
    }
}

impl Drop for Pulse {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Moves the store's clock to `target`, in steps of less than a window with
/// a heartbeat of `id` after each (the heartbeat tells the store's time).
async fn advance_to(env: &Env, session: &SessionId, id: ConnectionId, target: DateTime<Utc>) {
    let step = env.store_cfg.heartbeat_window / 2;
    for _ in 0..10_000 {
        let ack = env
            .store
            .heartbeat(session, id)
            .await
            .unwrap()
            .expect("the connection is live while the clock moves");
        let left = target - ack.last_heartbeat;
        if left <= chrono::Duration::zero() {
            return;
        }
        let left = left.to_std().unwrap();
        env.clock.advance(left.min(step));
    }
    panic!("the clock did not reach {target}");
}

/// (event type, reason) of a session's events, oldest first.
async fn events(env: &Env, session: &str) -> Vec<(String, String)> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT event_type, reason FROM session_events WHERE session_id = $1 ORDER BY occurred_at",
    )
    .bind(session.to_owned())
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

async fn end_reasons(env: &Env, id: ConnectionId) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT end_reason FROM connection_history WHERE connection_id = $1::uuid",
    )
    .bind(id.to_string())
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn deadline(env: &Env, session: &SessionId) -> DateTime<Utc> {
    env.store
        .session(session)
        .await
        .unwrap()
        .and_then(|v| v.hibernates_at)
        .expect("a running Session with a max duration has a deadline")
}

async fn warning(env: &Env, session: &SessionId) -> Option<DateTime<Utc>> {
    env.store.session_watch(session).await.unwrap().unwrap().1
}

/// Waits until the hibernation guard of a new leader is over: the canary
/// (idle, 1 s) is hibernated.
async fn guard_over(fake: &FakeKube) {
    eventually(Duration::from_secs(20), "canary hibernated", || async {
        (kube_state(fake, "canary").as_deref() == Some("hibernated")).then_some(())
    })
    .await;
}

fn config(env: &Env) -> tracker_reaper::Config {
    let mut cfg = env.kube_config();
    cfg.redis.warn_before = WARN;
    cfg
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_connected_session_is_warned_then_hibernated_at_its_max_duration(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(3), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("canary", "running", Some("1s"), false))
        .unwrap();
    fake.apply_session(NS, limited("long")).unwrap();
    let reaper = Reaper::start(config(&env), env.kube_overrides(&fake)).await;
    let s = sid("long");
    env.wait_state("long", SessionState::Idle).await;
    let c1 = env.connect("long", "alice").await;
    let _pulse = Pulse::start(&env.store, &s, c1);
    guard_over(&fake).await;
    let first = deadline(&env, &s).await;

    // Just before the warning time: nothing yet.
    let warn_at = first - chrono::Duration::from_std(WARN).unwrap();
    advance_to(&env, &s, c1, warn_at - chrono::Duration::seconds(2)).await;
    assert_eq!(warning(&env, &s).await, None);
    advance_to(&env, &s, c1, warn_at).await;
    eventually(Duration::from_secs(10), "the warning", || async {
        (events(&env, "long").await == pairs(&[("hibernation_warning", "max_duration")]))
            .then_some(())
    })
    .await;
    assert_eq!(warning(&env, &s).await, Some(first));
    assert_eq!(env.state("long").await, Some(SessionState::Running));
    assert!(patched_states(&fake, "long").is_empty());
    // Without NATS configured the claim queues no warning event.
    assert_eq!(env.store.events_backlog().await.unwrap(), 0);

    // The deadline: hibernated with the connection live, which ends.
    advance_to(&env, &s, c1, first).await;
    eventually(Duration::from_secs(10), "hibernated", || async {
        (kube_state(&fake, "long").as_deref() == Some("hibernated")
            && env.state("long").await == Some(SessionState::Hibernated))
        .then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "archived", || async {
        (end_reasons(&env, c1).await == ["max_duration"]).then_some(())
    })
    .await;
    assert_eq!(patched_states(&fake, "long"), ["hibernated"]);
    assert!(env.store.heartbeat(&s, c1).await.unwrap().is_none());
    eventually(Duration::from_secs(5), "the hibernation event", || async {
        (events(&env, "long").await
            == pairs(&[
                ("hibernation_warning", "max_duration"),
                ("hibernated", "max_duration"),
            ]))
        .then_some(())
    })
    .await;

    // A new connection wakes it: a new period, with its own warning.
    let c2 = env.connect("long", "alice").await;
    let _pulse2 = Pulse::start(&env.store, &s, c2);
    eventually(Duration::from_secs(10), "woken", || async {
        (env.state("long").await == Some(SessionState::Running)).then_some(())
    })
    .await;
    let second = deadline(&env, &s).await;
    assert!(
        second >= first + chrono::Duration::hours(1),
        "{second} after {first}"
    );
    assert_eq!(warning(&env, &s).await, None);
    advance_to(
        &env,
        &s,
        c2,
        second - chrono::Duration::from_std(WARN).unwrap(),
    )
    .await;
    eventually(Duration::from_secs(10), "the second warning", || async {
        (warning(&env, &s).await == Some(second)).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "every event", || async {
        (events(&env, "long").await
            == pairs(&[
                ("hibernation_warning", "max_duration"),
                ("hibernated", "max_duration"),
                ("woken", "connection"),
                ("hibernation_warning", "max_duration"),
            ]))
        .then_some(())
    })
    .await;
    // Still one history row for the first connection, none for the second.
    assert_eq!(end_reasons(&env, c1).await, ["max_duration"]);
    assert!(end_reasons(&env, c2).await.is_empty());
    reaper.stop().await;
}

async fn a_leader_change_between_warning_and_deadline(backend: Backend, pool: PgPool) {
    let env = Env::new(backend, Duration::from_secs(3), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    fake.apply_session(NS, session_json("canary", "running", Some("1s"), false))
        .unwrap();
    fake.apply_session(NS, limited("long")).unwrap();
    let mut a_cfg = config(&env);
    a_cfg.pod_name = Some("reaper-a".into());
    let mut b_cfg = config(&env);
    b_cfg.pod_name = Some("reaper-b".into());
    let a = Reaper::start(a_cfg, env.kube_overrides(&fake)).await;
    let b = Reaper::start(b_cfg, env.kube_overrides(&fake)).await;
    let a_leads = eventually(Duration::from_secs(10), "one leader", || async {
        match (a.is_leader(), b.is_leader()) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, mut standby) = if a_leads { (a, b) } else { (b, a) };
    let s = sid("long");
    env.wait_state("long", SessionState::Idle).await;
    let c1 = env.connect("long", "alice").await;
    let _pulse = Pulse::start(&env.store, &s, c1);
    guard_over(&fake).await;
    let at = deadline(&env, &s).await;
    advance_to(&env, &s, c1, at - chrono::Duration::from_std(WARN).unwrap()).await;
    // Written to PostgreSQL before the kill: queued events die with a process.
    eventually(Duration::from_secs(10), "the warning", || async {
        (events(&env, "long").await == pairs(&[("hibernation_warning", "max_duration")]))
            .then_some(())
    })
    .await;

    leader.kill().await;
    standby.wait_leader(Duration::from_secs(15)).await;
    // The new leader relists and looks at every due session again: the
    // warning is not recorded twice, and the period did not restart.
    assert_eq!(deadline(&env, &s).await, at);
    // Halfway between warning and deadline (real time passes in the guard).
    advance_to(
        &env,
        &s,
        c1,
        at - chrono::Duration::from_std(WARN / 2).unwrap(),
    )
    .await;
    // A canary of the new term shows when its guard is over.
    fake.apply_session(NS, session_json("canary2", "running", Some("1s"), false))
        .unwrap();
    eventually(Duration::from_secs(20), "canary2 hibernated", || async {
        (kube_state(&fake, "canary2").as_deref() == Some("hibernated")).then_some(())
    })
    .await;
    assert_eq!(warning(&env, &s).await, Some(at));
    assert!(patched_states(&fake, "long").is_empty());

    advance_to(&env, &s, c1, at).await;
    eventually(
        Duration::from_secs(10),
        "hibernated by the new leader",
        || async { (env.state("long").await == Some(SessionState::Hibernated)).then_some(()) },
    )
    .await;
    eventually(Duration::from_secs(10), "archived", || async {
        (end_reasons(&env, c1).await == ["max_duration"]).then_some(())
    })
    .await;
    eventually(Duration::from_secs(10), "the hibernation event", || async {
        (events(&env, "long").await
            == pairs(&[
                ("hibernation_warning", "max_duration"),
                ("hibernated", "max_duration"),
            ]))
        .then_some(())
    })
    .await;
    assert_eq!(patched_states(&fake, "long"), ["hibernated"]);
    assert_eq!(env.history_rows().await, 1);
    standby.stop().await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_leader_change_between_warning_and_deadline_standalone(pool: PgPool) {
    a_leader_change_between_warning_and_deadline(Backend::Standalone, pool).await;
}

#[sqlx::test(migrations = "../../migrations")]
async fn a_leader_change_between_warning_and_deadline_cluster(pool: PgPool) {
    a_leader_change_between_warning_and_deadline(Backend::Cluster, pool).await;
}

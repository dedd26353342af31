//! The session lifecycle: mirror, idle, due, claim, hibernate, wake.

use std::time::Duration;

use tracker_core::testing::Backend;
use tracker_core::{
    Claim, ClaimOutcome, ClaimRefusal, ClockOffset, FinishOutcome, HibernationReason, IdleTimeout,
    Limits, Protocol, RegisterOutcome, ResourceState, SessionId, SessionMeta, SessionState, Store,
    Written,
};

use crate::support::*;

crate::both!(
    an_idle_session_is_due_after_its_timeout_then_hibernates_and_wakes,
    a_connected_session_is_never_claimed,
    exempt_and_terminated_sessions_are_never_due,
    a_rolled_back_claim_waits_before_the_next_try,
    a_lapsed_claim_can_be_claimed_again,
    a_wake_recorded_during_the_claim_survives_the_hibernation,
    a_recorded_wake_signals_its_listener_once,
    stale_mirror_events_are_ignored,
    a_deleted_resource_is_forgotten,
    epochs_are_stable_until_the_data_is_lost,
    the_epoch_and_due_read_agrees_with_its_parts,
    leader_locks_are_held_by_one_holder,
);

const IDLE: Duration = Duration::from_secs(2);
const CLAIM: Duration = Duration::from_secs(30);

/// Mirrors `s` as a running Session with the test's idle timeout.
async fn running(store: &Store, s: &SessionId) {
    mirror(
        store,
        s,
        ResourceState::Running,
        IdleTimeout::After(IDLE),
        1,
    )
    .await;
}

/// A running session, idle past its timeout, then claimed.
async fn claimed(store: &Store, clock: &ClockOffset, s: &SessionId) {
    running(store, s).await;
    clock.advance(IDLE);
    let outcome = store.claim_hibernation(s, CLAIM, T).await.unwrap();
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
}

async fn due(store: &Store, s: &SessionId) -> bool {
    let shard = store.keys().shard_of(s);
    store.due_sessions(shard, 100).await.unwrap().contains(s)
}

async fn state(store: &Store, s: &SessionId) -> SessionState {
    store
        .session(s)
        .await
        .unwrap()
        .expect("known session")
        .state
}

async fn an_idle_session_is_due_after_its_timeout_then_hibernates_and_wakes(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    running(&store, &s).await;
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Idle);
    assert_eq!(view.owner.as_deref(), Some("alice"));
    assert_eq!(view.idle_timeout_seconds, Some(2));
    let idle_since = view
        .idle_since
        .expect("idle from the moment it was first seen running");
    assert_eq!(
        view.hibernates_at,
        Some(idle_since + chrono::Duration::seconds(2))
    );
    assert!(!due(&store, &s).await);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::NotDue)
    );

    clock.advance(IDLE);
    assert!(due(&store, &s).await);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Claimed(Claim {
            generation: Some(1),
            uid: Some(res_uid(&s)),
            idle_timeout: IdleTimeout::After(IDLE),
            reason: HibernationReason::Idle,
            max_session_duration: None,
            ended: vec![],
        })
    );
    assert_eq!(state(&store, &s).await, SessionState::Hibernating);
    assert!(!due(&store, &s).await, "a claim is not due until it lapses");
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Busy)
    );

    assert_eq!(
        store
            .finish_hibernation(&s, T, None, Some(2))
            .await
            .unwrap(),
        FinishOutcome::Finished
    );
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    let shard = store.keys().shard_of(&s);
    assert!(store.pending_wakes(shard, 10).await.unwrap().is_empty());

    let c = conn(&s, "alice", Protocol::Websocket);
    let reg = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(reg.session.state, SessionState::Waking);
    created(
        store
            .register(&conn(&s, "bob", Protocol::Vnc), Limits::default())
            .await
            .unwrap(),
    );
    let wakes = store.pending_wakes(shard, 10).await.unwrap();
    assert_eq!(wakes.len(), 1, "one pending wake however many connect");
    assert_eq!(wakes[0].session_id, s);

    assert_eq!(
        store.ack_wake(&s, T, None, Some(3)).await.unwrap(),
        Written::Done
    );
    assert_eq!(
        store.ack_wake(&s, T, None, Some(3)).await.unwrap(),
        Written::Noop,
        "acknowledged once"
    );
    assert!(store.pending_wakes(shard, 10).await.unwrap().is_empty());
    assert_eq!(state(&store, &s).await, SessionState::Running);
    // The mirror then sees our own patch: nothing changes.
    mirror(
        &store,
        &s,
        ResourceState::Running,
        IdleTimeout::After(IDLE),
        3,
    )
    .await;
    assert_eq!(state(&store, &s).await, SessionState::Running);
    assert!(store.pending_wakes(shard, 10).await.unwrap().is_empty());
}

async fn a_connected_session_is_never_claimed(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    running(&store, &s).await;
    let c = conn(&s, "alice", Protocol::Http);
    created(store.register(&c, Limits::default()).await.unwrap());
    clock.advance(IDLE * 10);
    store
        .heartbeat(&s, c.connection_id)
        .await
        .unwrap()
        .expect("alive");
    assert!(!due(&store, &s).await);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );
    store.close(&s, c.connection_id).await.unwrap();
    assert!(
        !due(&store, &s).await,
        "idle from the close, not from the mirror"
    );
    clock.advance(IDLE);
    assert!(due(&store, &s).await);
}

async fn exempt_and_terminated_sessions_are_never_due(backend: Backend) {
    let (store, clock) = store(backend).await;
    let exempt = sid("exempt");
    let ended = sid("ended");
    mirror(&store, &exempt, ResourceState::Running, IdleTimeout::Off, 1).await;
    mirror(
        &store,
        &ended,
        ResourceState::Terminated,
        IdleTimeout::After(IDLE),
        1,
    )
    .await;
    clock.advance(Duration::from_secs(3600));
    assert!(!due(&store, &exempt).await);
    assert!(!due(&store, &ended).await);
    assert_eq!(
        store.claim_hibernation(&exempt, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Exempt)
    );
    assert_eq!(
        store.claim_hibernation(&ended, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::NotRunning)
    );
    let c = conn(&ended, "alice", Protocol::Http);
    assert_eq!(
        store.register(&c, Limits::default()).await.unwrap(),
        RegisterOutcome::Terminated
    );
    assert_eq!(state(&store, &ended).await, SessionState::Terminated);
    // A session nobody mirrored is never hibernated either.
    let stranger = sid("stranger");
    created(
        store
            .register(&conn(&stranger, "x", Protocol::Http), Limits::default())
            .await
            .unwrap(),
    );
    assert_eq!(
        store.claim_hibernation(&stranger, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::NotMirrored)
    );
}

async fn a_rolled_back_claim_waits_before_the_next_try(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    claimed(&store, &clock, &s).await;
    assert_eq!(
        store
            .rollback_hibernation(&s, T, Duration::from_secs(10))
            .await
            .unwrap(),
        Written::Done
    );
    assert_eq!(state(&store, &s).await, SessionState::Idle);
    assert!(!due(&store, &s).await);
    clock.advance(Duration::from_secs(10));
    assert!(due(&store, &s).await);
}

async fn a_lapsed_claim_can_be_claimed_again(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    running(&store, &s).await;
    clock.advance(IDLE);
    let short = Duration::from_secs(1);
    assert!(matches!(
        store.claim_hibernation(&s, short, T).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    // The claimer died: no finish, no rollback.
    clock.advance(short);
    assert!(due(&store, &s).await, "a lapsed claim is due again");
    assert!(matches!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
}

async fn a_wake_recorded_during_the_claim_survives_the_hibernation(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let shard = store.keys().shard_of(&s);
    claimed(&store, &clock, &s).await;
    let reg = created(
        store
            .register(&conn(&s, "alice", Protocol::Vnc), Limits::default())
            .await
            .unwrap(),
    );
    assert_eq!(reg.session.state, SessionState::Waking);
    // The patch lands, and the mirror sees it, in either order.
    mirror(
        &store,
        &s,
        ResourceState::Hibernated,
        IdleTimeout::After(IDLE),
        2,
    )
    .await;
    store
        .finish_hibernation(&s, T, None, Some(2))
        .await
        .unwrap();
    assert_eq!(state(&store, &s).await, SessionState::Waking);
    assert_eq!(store.pending_wakes(shard, 10).await.unwrap().len(), 1);
    assert_eq!(
        store.ack_wake(&s, T, None, Some(3)).await.unwrap(),
        Written::Done
    );
    assert_eq!(state(&store, &s).await, SessionState::Running);
}

async fn stale_mirror_events_are_ignored(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    mirror(
        &store,
        &s,
        ResourceState::Hibernated,
        IdleTimeout::After(IDLE),
        5,
    )
    .await;
    let stale = SessionMeta {
        session_id: s.clone(),
        uid: Some(res_uid(&s)),
        owner: Some("alice".into()),
        idle_source: Default::default(),
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(IDLE),
        generation: Some(4),
        max_session_duration: None,
        created_at: None,
    };
    assert_eq!(
        store.mirror_session(&stale, T).await.unwrap(),
        Written::Noop
    );
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
}

async fn a_deleted_resource_is_forgotten(backend: Backend) {
    let (store, _) = store(backend).await;
    let (idle, busy) = (sid("idle"), sid("busy"));
    running(&store, &idle).await;
    running(&store, &busy).await;
    created(
        store
            .register(&conn(&busy, "alice", Protocol::Http), Limits::default())
            .await
            .unwrap(),
    );
    let mut known: Vec<_> = Vec::new();
    for shard in store.keys().shards() {
        known.extend(store.known_sessions(shard).await.unwrap());
    }
    known.sort();
    assert_eq!(known, vec![busy.clone(), idle.clone()]);

    assert_eq!(
        store.forget_session(&idle, T, None).await.unwrap(),
        Written::Done
    );
    assert_eq!(
        store.forget_session(&busy, T, None).await.unwrap(),
        Written::Done
    );
    assert_eq!(store.session(&idle).await.unwrap(), None);
    assert_eq!(
        state(&store, &busy).await,
        SessionState::Unknown,
        "connections outlive the resource"
    );
    let st = store.stats().await.unwrap();
    assert_eq!(st.sessions_by_state[&SessionState::Idle], 0);
    assert_eq!(st.sessions_by_state[&SessionState::Running], 0);
    assert_eq!(st.sessions_by_state[&SessionState::Unknown], 1);
}

async fn epochs_are_stable_until_the_data_is_lost(backend: Backend) {
    let (store, _) = store(backend).await;
    for shard in store.keys().shards() {
        let first = store.shard_epoch(shard).await.unwrap();
        assert!(first.created);
        let again = store.shard_epoch(shard).await.unwrap();
        assert_eq!(again.marker, first.marker);
        assert!(!again.created);
    }
}

async fn the_epoch_and_due_read_agrees_with_its_parts(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let shard = store.keys().shard_of(&s);
    let (first, none) = store.shard_epoch_due(shard, 10).await.unwrap();
    assert!(first.created);
    assert!(none.is_empty());
    assert_eq!(store.shard_epoch(shard).await.unwrap().marker, first.marker);

    running(&store, &s).await;
    clock.advance(IDLE);
    assert_eq!(
        store.due_sessions(shard, 10).await.unwrap(),
        vec![s.clone()]
    );
    let (again, due) = store.shard_epoch_due(shard, 10).await.unwrap();
    assert_eq!((again.marker, again.created), (first.marker.clone(), false));
    assert_eq!(due, vec![s.clone()]);
    let (_, unasked) = store.shard_epoch_due(shard, 0).await.unwrap();
    assert!(unasked.is_empty(), "no due read when none is wanted");

    // An emptied shard: a new marker, created by this very call.
    raw::<()>(
        backend,
        redis::cmd("DEL").arg(store.keys().shard_key(shard, tracker_core::ShardKey::Epoch)),
    )
    .await;
    let (fresh, _) = store.shard_epoch_due(shard, 10).await.unwrap();
    assert!(fresh.created);
    assert_ne!(fresh.marker, first.marker);
}

async fn leader_locks_are_held_by_one_holder(backend: Backend) {
    let (store, _) = store(backend).await;
    let lease = Duration::from_secs(5);
    assert!(store.lock_acquire("reaper", "a", lease).await.unwrap());
    assert!(!store.lock_acquire("reaper", "b", lease).await.unwrap());
    assert!(
        store.lock_acquire("reaper", "a", lease).await.unwrap(),
        "the holder renews"
    );
    assert!(!store.lock_release("reaper", "b").await.unwrap());
    assert!(store.lock_release("reaper", "a").await.unwrap());
    assert!(store.lock_acquire("reaper", "b", lease).await.unwrap());
}

async fn a_recorded_wake_signals_its_listener_once(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let shard = store.keys().shard_of(&s);
    let groups = store.wake_signal_groups();
    let covered: Vec<_> = groups.iter().flatten().copied().collect();
    let mut sorted = covered.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        (sorted.len(), covered.len()),
        (usize::from(store.keys().shard_count()), covered.len()),
        "every shard in exactly one group"
    );
    let group = groups.iter().find(|g| g.contains(&shard)).unwrap();
    let mut listener = store.wake_listener(group).await.unwrap();
    let quick = Duration::from_millis(20);
    assert!(!listener.wait(quick).await.unwrap(), "nothing recorded yet");

    mirror(
        &store,
        &s,
        ResourceState::Hibernated,
        IdleTimeout::After(IDLE),
        1,
    )
    .await;
    for user in ["alice", "bob"] {
        store
            .register(&conn(&s, user, Protocol::Vnc), Limits::default())
            .await
            .unwrap();
    }
    let signal = store
        .keys()
        .shard_key(shard, tracker_core::ShardKey::WakeSignal);
    let queued: i64 = raw(backend, redis::cmd("LLEN").arg(&signal)).await;
    assert_eq!(queued, 1, "one signal however many registrations");
    assert!(listener.wait(Duration::from_secs(5)).await.unwrap());
    assert!(!listener.wait(quick).await.unwrap(), "consumed");
    assert_eq!(store.pending_wakes(shard, 10).await.unwrap().len(), 1);
}

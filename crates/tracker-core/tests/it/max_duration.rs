//! Max session duration: the due index carries the warning and the
//! deadline, the warning is recorded once per running period, and the claim
//! at the deadline ends live connections exactly once.

use std::time::Duration;

use tracker_core::testing::{self, Backend};
use tracker_core::{
    Announcement, ClaimOutcome, ClaimRefusal, ClockOffset, ConnectionId, EndReason, FinishOutcome,
    HibernationNotice, HibernationReason, IdleTimeout, Limits, Protocol, ResourceState, SessionId,
    SessionMeta, SessionState, Store, Term, Warning, Written,
};

use crate::support::*;

crate::both!(
    a_connected_session_is_warned_once_then_hibernated_at_its_max_duration,
    a_wake_starts_a_new_period,
    an_idle_claim_is_still_refused_while_connected,
    a_new_leader_neither_repeats_nor_loses_the_warning,
    a_dry_run_ends_nothing_and_warns_no_client,
    a_connection_during_the_claim_wakes_the_session_into_a_new_period,
    the_warning_event_is_queued_by_the_claim_that_records_the_warning,
);

const MAX: Duration = Duration::from_secs(10);
const WARN: Duration = Duration::from_secs(4);
const IDLE_LONG: Duration = Duration::from_secs(3600);
const CLAIM: Duration = Duration::from_secs(30);

async fn store_warning(backend: Backend) -> (Store, ClockOffset) {
    let mut cfg = testing::config(backend, WINDOW);
    cfg.warn_before = WARN;
    let clock = ClockOffset::default();
    (
        testing::connect(&cfg).await.with_clock(clock.clone()),
        clock,
    )
}

async fn mirror_max(store: &Store, s: &SessionId, idle: Duration, generation: i64) {
    let meta = SessionMeta {
        session_id: s.clone(),
        uid: Some(res_uid(s)),
        owner: Some("alice".into()),
        idle_source: tracker_core::IdleSource::Spec,
        state: ResourceState::Running,
        idle_timeout: IdleTimeout::After(idle),
        generation: Some(generation),
        max_session_duration: Some(MAX),
        created_at: None,
    };
    assert_eq!(store.mirror_session(&meta, T).await.unwrap(), Written::Done);
}

async fn due(store: &Store, s: &SessionId) -> bool {
    let shard = store.keys().shard_of(s);
    store.due_sessions(shard, 100).await.unwrap().contains(s)
}

async fn warning(store: &Store, s: &SessionId) -> Option<chrono::DateTime<chrono::Utc>> {
    watch_read(store, s).await.expect("known").1
}

async fn connect(store: &Store, s: &SessionId, user: &str) -> ConnectionId {
    created(
        store
            .register(&conn(s, user, Protocol::Websocket), Limits::default())
            .await
            .unwrap(),
    )
    .connection
    .connection_id
}

fn warned(outcome: ClaimOutcome) -> Warning {
    match outcome {
        ClaimOutcome::Warned(w) => w,
        other => panic!("expected a warning, got {other:?}"),
    }
}

async fn a_connected_session_is_warned_once_then_hibernated_at_its_max_duration(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-1");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    let a = connect(&store, &s, "alice").await;
    let b = connect(&store, &s, "bob").await;
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Running);
    let deadline = view
        .hibernates_at
        .expect("a running session with a max duration has a deadline");
    assert!(!due(&store, &s).await);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );

    // The warning is due before the deadline, with connections live.
    clock.advance(MAX - WARN);
    assert!(
        due(&store, &s).await,
        "the warning time is in the due index"
    );
    assert_eq!(warning(&store, &s).await, None);
    let w = warned(store.claim_hibernation(&s, CLAIM, T).await.unwrap());
    assert_eq!(w.at, deadline);
    assert_eq!(w.owner.as_deref(), Some("alice"));
    assert_eq!(warning(&store, &s).await, Some(deadline));
    // Once per period: asking again is no warning, and not due until the deadline.
    assert!(!due(&store, &s).await);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );

    clock.advance(WARN);
    assert!(due(&store, &s).await);
    let claim = match store.claim_hibernation(&s, CLAIM, T).await.unwrap() {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("expected a claim, got {other:?}"),
    };
    assert_eq!(claim.reason, HibernationReason::MaxDuration);
    assert_eq!(claim.max_session_duration, Some(MAX));
    let mut ended = claim.ended.clone();
    ended.sort();
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(ended, both);
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Hibernating);
    assert_eq!(view.active_connections, 0);
    // The API's close of an ended socket finds nothing: ended once.
    assert_eq!(store.close(&s, a).await.unwrap(), None);
    assert!(store.heartbeat(&s, b).await.unwrap().is_none());
    let history = outbox(&store).await;
    assert_eq!(history.len(), 2, "{history:?}");
    for e in &history {
        assert_eq!(e.record.end_reason, EndReason::MaxDuration);
        assert_eq!(e.record.session_id, s);
    }
    assert_eq!(
        store
            .finish_hibernation(&s, T, None, Some(2))
            .await
            .unwrap(),
        FinishOutcome::Finished
    );
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Hibernated);
    assert_eq!(view.hibernates_at, None);
    assert_eq!(warning(&store, &s).await, None);
    assert!(pending_wake_ids(&store).await.is_empty());
    assert!(!due(&store, &s).await);
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.total_connections, 0);
}

async fn a_wake_starts_a_new_period(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-2");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    connect(&store, &s, "alice").await;
    clock.advance(MAX);
    assert!(matches!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    store
        .finish_hibernation(&s, T, None, Some(2))
        .await
        .unwrap();

    // A new connection wakes it; the wake landing starts a new period.
    clock.advance(Duration::from_secs(100));
    let c = connect(&store, &s, "alice").await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    assert_eq!(
        store
            .ack_wake(&s, T, Some(&res_uid(&s)), Some(3))
            .await
            .unwrap(),
        Written::Done
    );
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Running);
    let deadline = view.hibernates_at.expect("a new deadline");
    // The mirror then sees the woken resource: the period is not restarted.
    mirror_max(&store, &s, IDLE_LONG, 3).await;
    assert_eq!(
        store.session(&s).await.unwrap().unwrap().hibernates_at,
        Some(deadline)
    );
    assert!(!due(&store, &s).await);
    clock.advance(MAX - WARN);
    assert_eq!(
        warned(store.claim_hibernation(&s, CLAIM, T).await.unwrap()).at,
        deadline
    );
    clock.advance(WARN);
    match store.claim_hibernation(&s, CLAIM, T).await.unwrap() {
        ClaimOutcome::Claimed(claim) => {
            assert_eq!(claim.reason, HibernationReason::MaxDuration);
            assert_eq!(claim.ended, vec![c]);
        }
        other => panic!("expected a claim, got {other:?}"),
    }
}

async fn an_idle_claim_is_still_refused_while_connected(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let idle = Duration::from_secs(2);
    // Connected: the idle timeout passes, nothing is claimed.
    let s = sid("long-3");
    mirror_max(&store, &s, idle, 1).await;
    connect(&store, &s, "alice").await;
    // Without connections: hibernated for idleness before the max duration.
    let quiet = sid("long-4");
    mirror_max(&store, &quiet, idle, 1).await;
    clock.advance(idle);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );
    match store.claim_hibernation(&quiet, CLAIM, T).await.unwrap() {
        ClaimOutcome::Claimed(claim) => {
            assert_eq!(claim.reason, HibernationReason::Idle);
            assert!(claim.ended.is_empty());
        }
        other => panic!("expected an idle claim, got {other:?}"),
    }
}

async fn a_new_leader_neither_repeats_nor_loses_the_warning(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-5");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    let a = connect(&store, &s, "alice").await;
    clock.advance(MAX - WARN);
    let first = warned(store.claim_hibernation(&s, CLAIM, T).await.unwrap());
    // A new leader: the warning is recorded, so it is not recorded again.
    let t2 = Term(T.0 + 1);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, t2).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );
    assert_eq!(warning(&store, &s).await, Some(first.at));
    // The old leader can do nothing any more.
    clock.advance(WARN);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Fenced)
    );
    match store.claim_hibernation(&s, CLAIM, t2).await.unwrap() {
        ClaimOutcome::Claimed(claim) => assert_eq!(claim.ended, vec![a]),
        other => panic!("expected a claim, got {other:?}"),
    }
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, t2).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Busy)
    );
    assert_eq!(outbox(&store).await.len(), 1);
}

/// Finding: the NATS warning event was queued after the claim, so a
/// leader dying in between lost it for good (the next one sees the warning
/// recorded and does not repeat it).
async fn the_warning_event_is_queued_by_the_claim_that_records_the_warning(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-7");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    connect(&store, &s, "alice").await;
    clock.advance(MAX - WARN);
    let event = Announcement::new("kubernetes", "max_duration");
    let claim = |term| {
        store.claim_hibernation_announcing(&s, CLAIM, term, HibernationNotice::Silent, Some(&event))
    };
    warned(claim(T).await.unwrap());
    assert_eq!(store.events_backlog().await.unwrap(), 1);
    // Recorded once: another leader's claim queues nothing more.
    assert_eq!(
        claim(Term(T.0 + 1)).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Connected)
    );
    assert_eq!(store.events_backlog().await.unwrap(), 1);
}

async fn a_dry_run_ends_nothing_and_warns_no_client(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-6");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    connect(&store, &s, "alice").await;
    clock.advance(MAX - WARN);
    warned(
        store
            .claim_hibernation_as(&s, CLAIM, T, true)
            .await
            .unwrap(),
    );
    assert_eq!(warning(&store, &s).await, None, "a dry run warns no client");
    clock.advance(WARN);
    match store
        .claim_hibernation_as(&s, CLAIM, T, true)
        .await
        .unwrap()
    {
        ClaimOutcome::Claimed(claim) => assert!(claim.ended.is_empty()),
        other => panic!("expected a claim, got {other:?}"),
    }
    assert_eq!(
        store
            .rollback_hibernation(&s, T, Duration::from_secs(60))
            .await
            .unwrap(),
        Written::Done
    );
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Running);
    assert_eq!(view.active_connections, 1);
    assert!(outbox(&store).await.is_empty());
}

async fn a_connection_during_the_claim_wakes_the_session_into_a_new_period(backend: Backend) {
    let (store, clock) = store_warning(backend).await;
    let s = sid("long-7");
    mirror_max(&store, &s, IDLE_LONG, 1).await;
    let old = connect(&store, &s, "alice").await;
    clock.advance(MAX);
    assert!(matches!(
        store.claim_hibernation(&s, CLAIM, T).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    // The user comes back while the patch is in flight: one wake, and the
    // new connection is not ended by the hibernation that follows.
    let new = connect(&store, &s, "alice").await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    assert_eq!(
        store
            .finish_hibernation(&s, T, None, Some(2))
            .await
            .unwrap(),
        FinishOutcome::NotClaimed
    );
    assert_eq!(
        store.session(&s).await.unwrap().unwrap().state,
        SessionState::Waking
    );
    assert!(store.heartbeat(&s, new).await.unwrap().is_some());
    assert!(store.heartbeat(&s, old).await.unwrap().is_none());
    assert_eq!(
        store
            .ack_wake(&s, T, Some(&res_uid(&s)), Some(3))
            .await
            .unwrap(),
        Written::Done
    );
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Running);
    // A whole new period: no warning yet, not due before its own warning time.
    assert_eq!(warning(&store, &s).await, None);
    assert!(!due(&store, &s).await);
    clock.advance(MAX - WARN);
    assert!(due(&store, &s).await);
    let history = outbox(&store).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].record.connection_id, old);
}

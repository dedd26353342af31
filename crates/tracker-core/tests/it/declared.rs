//! Declared sessions (the docker platform) and the session event outbox:
//! the same rules as mirrored sessions, and an order in which neither a
//! controller's report nor the reaper's decision regresses the other.

use std::time::Duration;

use tracker_core::testing::Backend;
use tracker_core::{
    Announcement, ClaimOutcome, EventAck, EventKind, IdleTimeout, Limits, Protocol, QueuedEvent,
    ResourceState, SessionId, SessionMeta, SessionState, Store, WakeAnnounce,
};

use crate::support::*;

crate::both!(
    a_declaration_is_created_once_and_counts_its_generations,
    an_announced_hibernation_is_done_only_once_acknowledged,
    a_report_after_the_decision_wins_over_its_acknowledgement,
    a_wake_during_an_announced_hibernation_follows_it,
    an_undeclared_session_is_a_new_one_when_declared_again,
);

const IDLE: Duration = Duration::from_secs(10);

fn declared(s: &SessionId, state: ResourceState) -> SessionMeta {
    SessionMeta {
        session_id: s.clone(),
        uid: None,
        owner: Some("alice".into()),
        idle_source: tracker_core::IdleSource::Spec,
        state,
        idle_timeout: IdleTimeout::After(IDLE),
        generation: None,
        max_session_duration: Some(Duration::from_secs(8 * 3600)),
        created_at: None,
    }
}

async fn state(store: &Store, s: &SessionId) -> SessionState {
    store.session(s).await.unwrap().expect("known").state
}

/// Declares `s` running and idle past its timeout, then claims it with an
/// announcement; answers the queued hibernate event.
async fn claimed(store: &Store, clock: &tracker_core::ClockOffset, s: &SessionId) -> QueuedEvent {
    store
        .declare_session(&declared(s, ResourceState::Running))
        .await
        .unwrap();
    clock.advance(IDLE + Duration::from_secs(1));
    let term = store.begin_term().await.unwrap();
    let event = Announcement::new("docker", "idle_timeout");
    let outcome = store
        .claim_hibernation_announced(s, term, &event)
        .await
        .unwrap();
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
    let q = queued(store).await;
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].event_id, event.event_id);
    q[0].clone()
}

async fn a_declaration_is_created_once_and_counts_its_generations(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let first = store
        .declare_session(&declared(&s, ResourceState::Running))
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.generation, 1);
    let again = store
        .declare_session(&declared(&s, ResourceState::Running))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.generation, 2);
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Idle);
    assert_eq!(view.owner.as_deref(), Some("alice"));
    assert_eq!(view.idle_timeout_seconds, Some(10));
    assert!(store
        .declare_session(&declared(&s, ResourceState::Terminated))
        .await
        .is_ok());
    assert_eq!(state(&store, &s).await, SessionState::Terminated);
    let outcome = store
        .register(&conn(&s, "alice", Protocol::Vnc), Limits::default())
        .await
        .unwrap();
    assert!(matches!(outcome, tracker_core::RegisterOutcome::Terminated));
}

async fn an_announced_hibernation_is_done_only_once_acknowledged(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-2");
    let event = claimed(&store, &clock, &s).await;
    assert_eq!(event.kind, EventKind::Hibernate);
    assert_eq!(event.user_id, "alice");
    assert_eq!(event.platform, "docker");
    assert!(event.completes);
    // However long NATS takes, the claim does not lapse into a second one.
    clock.advance(Duration::from_secs(3600));
    assert_eq!(state(&store, &s).await, SessionState::Hibernating);
    let term = store.begin_term().await.unwrap();
    let again = store
        .claim_hibernation_announced(&s, term, &Announcement::new("docker", "idle_timeout"))
        .await
        .unwrap();
    assert!(matches!(again, ClaimOutcome::Refused(_)), "{again:?}");
    assert_eq!(queued(&store).await.len(), 1);
    // A new leader acknowledges it (the old one is fenced).
    assert_eq!(
        store.event_ack(&event, term).await.unwrap(),
        EventAck::Applied
    );
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    assert!(queued(&store).await.is_empty());
    assert_eq!(store.event_ack(&event, term).await.unwrap(), EventAck::Gone);
    assert_eq!(store.events_backlog().await.unwrap(), 0);
}

async fn a_report_after_the_decision_wins_over_its_acknowledgement(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-3");
    let event = claimed(&store, &clock, &s).await;
    // The controller reports the session running (it started it again)
    // before NATS acknowledged the hibernation.
    store
        .declare_session(&declared(&s, ResourceState::Running))
        .await
        .unwrap();
    let term = store.newest_term().await.unwrap();
    assert_eq!(
        store.event_ack(&event, term).await.unwrap(),
        EventAck::Noted
    );
    assert_eq!(state(&store, &s).await, SessionState::Idle);
    // A replaced leader's acknowledgement is refused.
    store.begin_term().await.unwrap();
    assert_eq!(
        store.event_ack(&event, term).await.unwrap(),
        EventAck::Fenced
    );
}

async fn a_wake_during_an_announced_hibernation_follows_it(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-4");
    let hibernate = claimed(&store, &clock, &s).await;
    created(
        store
            .register(&conn(&s, "alice", Protocol::Vnc), Limits::default())
            .await
            .unwrap(),
    );
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    let term = store.newest_term().await.unwrap();
    let wake = Announcement::new("docker", "connection");
    assert_eq!(
        store.announce_wake(&s, term, &wake).await.unwrap(),
        WakeAnnounce::Queued
    );
    // Announced once, however often it is read.
    assert_eq!(
        store.announce_wake(&s, term, &wake).await.unwrap(),
        WakeAnnounce::Nothing
    );
    assert!(pending_wake_ids(&store).await.is_empty());
    let q = queued(&store).await;
    assert_eq!(q.len(), 2);
    assert_eq!(
        (q[0].kind, q[1].kind),
        (EventKind::Hibernate, EventKind::Wake)
    );
    assert_eq!(q[0].event_id, hibernate.event_id);
    assert_eq!(
        store.event_ack(&q[0], term).await.unwrap(),
        EventAck::Applied
    );
    assert_eq!(state(&store, &s).await, SessionState::Waking);
    assert_eq!(
        store.event_ack(&q[1], term).await.unwrap(),
        EventAck::Applied
    );
    assert_eq!(state(&store, &s).await, SessionState::Running);
}

async fn an_undeclared_session_is_a_new_one_when_declared_again(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-5");
    let event = claimed(&store, &clock, &s).await;
    assert!(store.undeclare_session(&s).await.unwrap());
    assert!(!store.undeclare_session(&s).await.unwrap());
    assert!(store.session(&s).await.unwrap().is_none());
    let again = store
        .declare_session(&declared(&s, ResourceState::Running))
        .await
        .unwrap();
    assert!(again.created);
    assert_eq!(again.generation, 1);
    // The old session's event is still delivered, and completes nothing.
    let term = store.newest_term().await.unwrap();
    assert_eq!(
        store.event_ack(&event, term).await.unwrap(),
        EventAck::Noted
    );
    assert_eq!(state(&store, &s).await, SessionState::Idle);
}

//! The interleavings an adversarial review found, each replayed against the
//! real scripts. Every case here failed on the scripts before leader terms,
//! declared keys, the UID mirror and the connection-id index.

use std::time::Duration;

use tracker_core::testing::Backend;
use tracker_core::{
    Announcement, ClaimOutcome, ClaimRefusal, ClockOffset, EndReason, EventKind, FinishOutcome,
    HibernationNotice, Limits, Protocol, RegisterOutcome, Registered, ResourceState, SessionId,
    SessionState, ShardKey, Store, Term, Written,
};

use crate::support::*;

crate::both!(
    a_session_learned_hibernated_while_in_use_gets_a_wake,
    a_rolled_back_patch_that_landed_after_all_gets_a_wake,
    a_new_leaders_ack_does_not_hide_the_old_leaders_late_patch,
    a_replaced_leader_cannot_release_the_new_leaders_claim,
    terms_only_grow_even_when_the_sequence_is_lost,
    a_connection_id_names_one_connection_for_ever,
    a_replay_by_another_user_is_a_conflict,
    idle_since_is_the_latest_disconnect_however_late_the_sweep,
    a_recreated_session_is_a_new_session,
    a_late_event_of_a_deleted_resource_is_ignored,
    a_wake_for_the_old_resource_does_not_wake_the_new_one,
    the_sweep_says_more_while_one_session_still_holds_dead_connections,
    an_archived_connection_gives_its_user_slot_back_even_after_a_crash,
    a_finish_after_a_wake_ended_the_claim_is_not_claimed,
    terms_only_grow_even_when_every_key_is_lost,
    idle_since_counts_a_dead_connection_closed_before_the_sweep,
    a_late_event_of_a_resource_forgotten_by_a_relist_is_ignored,
    a_connection_to_a_resource_the_store_does_not_know_yet_wakes_it,
    a_connection_between_a_delete_and_the_creation_wakes_the_new_resource,
    a_released_patch_that_lands_late_wakes_for_a_connection_made_meanwhile,
    a_patch_and_its_event_are_recorded_together,
    a_late_landing_after_a_wake_ended_the_claim_still_wakes,
    a_dead_connection_not_yet_swept_wakes_a_resource_created_before_it,
    a_late_finish_announces_unless_the_session_moved_on,
    a_landing_recorded_by_the_next_leader_is_announced,
    a_released_patch_landing_late_is_announced_while_it_may_land,
    a_landing_after_a_wake_ended_the_claim_is_announced,
    a_wake_patched_by_a_leader_that_died_is_announced_by_the_next,
    a_hibernation_unrecorded_when_the_wake_comes_is_announced_first,
    a_new_claim_after_a_released_patch_is_not_undone_when_it_lands,
);

const CLAIM: Duration = Duration::from_secs(30);
const T1: Term = Term(1);
const T2: Term = Term(2);

/// `term` claims the session's hibernation, which must succeed.
async fn claimed(store: &Store, s: &SessionId, term: Term) {
    let outcome = store.claim_hibernation(s, CLAIM, term).await.unwrap();
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
}

/// `term` records that its hibernation patch landed on the resource "u1",
/// as `generation`.
async fn finish(store: &Store, s: &SessionId, term: Term, generation: i64) -> FinishOutcome {
    let uid = Some("u1");
    let finished = store.finish_hibernation(s, term, uid, Some(generation));
    finished.await.unwrap()
}

/// Alice connects to `s` over VNC, which must succeed.
async fn connect_alice(store: &Store, s: &SessionId) -> Registered {
    let alice = conn(s, "alice", Protocol::Vnc);
    created(store.register(&alice, Limits::default()).await.unwrap())
}

/// `term` claims the session's hibernation carrying its event for the
/// landing (Kubernetes with NATS), which must succeed and queue nothing yet.
async fn claimed_announcing(store: &Store, s: &SessionId, term: Term) -> Announcement {
    let before = queued(store).await.len();
    let event = Announcement::new("kubernetes", "idle_timeout");
    let notice = HibernationNotice::OnLanding(&event);
    let outcome = store
        .claim_hibernation_announcing(s, CLAIM, term, notice, None)
        .await
        .unwrap();
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)), "{outcome:?}");
    assert_eq!(
        queued(store).await.len(),
        before,
        "announced before it landed"
    );
    event
}

/// What is queued for NATS: kinds and event ids.
async fn announced(store: &Store) -> Vec<(EventKind, String)> {
    let events = queued(store).await;
    events.into_iter().map(|e| (e.kind, e.event_id)).collect()
}

fn hibernate(event: &Announcement) -> (EventKind, String) {
    (EventKind::Hibernate, event.event_id.clone())
}

fn wake(event: &Announcement) -> (EventKind, String) {
    (EventKind::Wake, event.event_id.clone())
}

/// `s` mirrored running by `term`, idle past its timeout, then claimed by
/// `term` with its event for the landing.
async fn idle_then_claimed(
    store: &Store,
    clock: &ClockOffset,
    s: &SessionId,
    term: Term,
) -> Announcement {
    mirror_as(store, term, s, "u1", ResourceState::Running, 1).await;
    clock.advance(Duration::from_secs(2));
    claimed_announcing(store, s, term).await
}

/// A running session idle past its timeout, claimed by `T1`, then connected
/// to: the registration ends the claim with a wake.
async fn claimed_then_connected(store: &Store, clock: &ClockOffset, s: &SessionId) {
    mirror_as(store, T1, s, "u1", ResourceState::Running, 1).await;
    clock.advance(Duration::from_secs(2));
    claimed(store, s, T1).await;
    connect_alice(store, s).await;
}

async fn state(store: &tracker_core::Store, s: &tracker_core::SessionId) -> SessionState {
    store.session(s).await.unwrap().expect("known").state
}

/// Finding: a Redis data loss (state unknown until the relist), a Session
/// created hibernated, or one hibernated by someone else, while a connection
/// is live, left the session asleep with nothing to wake it.
async fn a_session_learned_hibernated_while_in_use_gets_a_wake(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    connect_alice(&store, &s).await;
    assert_eq!(state(&store, &s).await, SessionState::Unknown);
    let written = mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 4).await;
    assert_eq!(written, Written::Done);
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    assert_eq!(state(&store, &s).await, SessionState::Waking);

    // Running and in use, then hibernated by someone else.
    let r = sid("desk-2");
    mirror_as(&store, T1, &r, "u2", ResourceState::Running, 1).await;
    created(
        store
            .register(&conn(&r, "bob", Protocol::Http), Limits::default())
            .await
            .unwrap(),
    );
    mirror_as(&store, T1, &r, "u2", ResourceState::Hibernated, 2).await;
    let mut wakes = pending_wake_ids(&store).await;
    wakes.sort();
    assert_eq!(wakes, vec![s, r]);
}

/// Finding: our patch timed out but was applied; we rolled the claim back,
/// a connection arrived (the store said running: no wake), then the watch
/// showed hibernated.
async fn a_rolled_back_patch_that_landed_after_all_gets_a_wake(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 1).await;
    clock.advance(Duration::from_secs(2));
    claimed(&store, &s, T1).await;
    let rolled = store
        .rollback_hibernation(&s, T1, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(rolled, Written::Done);
    let reg = connect_alice(&store, &s).await;
    assert_eq!(reg.session.state, SessionState::Running);
    assert!(pending_wake_ids(&store).await.is_empty());
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
}

/// Finding: the old leader claimed and sent its patch; a connection recorded
/// a wake; the new leader read `running` and acknowledged; then the old
/// patch landed and the old leader finished it.
async fn a_new_leaders_ack_does_not_hide_the_old_leaders_late_patch(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    claimed_then_connected(&store, &clock, &s).await;
    let t2 = store.begin_term().await.unwrap();
    assert!(t2 > T1);
    let acked = store.ack_wake(&s, t2, Some("u1"), Some(1)).await.unwrap();
    assert_eq!(acked, Written::Done);
    assert!(pending_wake_ids(&store).await.is_empty());
    // The old leader's patch lands (generation 2) and it tries to record it.
    let finished = finish(&store, &s, T1, 2).await;
    assert_eq!(finished, FinishOutcome::Fenced);
    assert_eq!(state(&store, &s).await, SessionState::Running);
    // The new leader's watch shows the landed patch: in use, so a wake.
    mirror_as(&store, t2, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    assert_eq!(state(&store, &s).await, SessionState::Waking);
}

/// Finding: claims had no owner, so a stalled leader's late rollback cleared
/// the claim another leader had taken after the first one lapsed.
async fn a_replaced_leader_cannot_release_the_new_leaders_claim(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 1).await;
    clock.advance(Duration::from_secs(2));
    let short = Duration::from_secs(1);
    assert!(matches!(
        store.claim_hibernation(&s, short, T1).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    clock.advance(short);
    claimed(&store, &s, T2).await;
    let late = store
        .rollback_hibernation(&s, T1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(late, Written::Fenced);
    assert_eq!(
        store.claim_hibernation(&s, CLAIM, T1).await.unwrap(),
        ClaimOutcome::Refused(ClaimRefusal::Fenced)
    );
    assert_eq!(state(&store, &s).await, SessionState::Hibernating);
    // Even in its own term, a rollback releases only that term's claim.
    let t3 = store.begin_term().await.unwrap();
    let other = store
        .rollback_hibernation(&s, t3, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(other, Written::Noop);
    assert_eq!(state(&store, &s).await, SessionState::Hibernating);
}

async fn terms_only_grow_even_when_the_sequence_is_lost(backend: Backend) {
    let (store, _) = store(backend).await;
    let a = store.begin_term().await.unwrap();
    let b = store.begin_term().await.unwrap();
    assert!(b > a);
    // The node holding the sequence restarts empty; the shards remember.
    let deleted: i64 = raw(backend, redis::cmd("DEL").arg(store.keys().term_seq_key())).await;
    assert_eq!(deleted, 1);
    let c = store.begin_term().await.unwrap();
    assert!(c > b, "{c:?} after {b:?}");
    let s = sid("desk-1");
    assert_eq!(
        mirror_as(&store, b, &s, "u1", ResourceState::Running, 1).await,
        Written::Fenced
    );
    assert_eq!(
        mirror_as(&store, c, &s, "u1", ResourceState::Running, 1).await,
        Written::Done
    );
}

/// Finding: the id was checked only in the session's shard and only while the
/// record existed, so the same id made a second connection on another
/// session, or again after close or sweep, and one history row was lost.
async fn a_connection_id_names_one_connection_for_ever(backend: Backend) {
    let (store, clock) = store(backend).await;
    let (s1, s2) = (sid("desk-1"), sid("desk-2"));
    let first = conn(&s1, "alice", Protocol::Vnc);
    created(store.register(&first, Limits::default()).await.unwrap());
    let mut elsewhere = first.clone();
    elsewhere.session_id = s2.clone();
    assert_eq!(
        store.register(&elsewhere, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );
    assert!(matches!(
        store.register(&first, Limits::default()).await.unwrap(),
        RegisterOutcome::Replayed(_)
    ));
    let found = store.get_connection(first.connection_id).await.unwrap();
    assert_eq!(found.map(|c| c.session_id), Some(s1.clone()));

    store.close(&s1, first.connection_id).await.unwrap();
    assert_eq!(
        store.register(&first, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict,
        "an id is used up once its connection ended"
    );
    assert_eq!(
        store.register(&elsewhere, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );

    // The same after a sweep.
    let swept = conn(&s2, "bob", Protocol::Http);
    created(store.register(&swept, Limits::default()).await.unwrap());
    clock.advance(WINDOW * 2);
    assert_eq!(sweep_all(&store).await, 1);
    assert_eq!(
        store.register(&swept, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );
    let ids: Vec<_> = outbox(&store)
        .await
        .into_iter()
        .map(|e| e.record.connection_id)
        .collect();
    assert_eq!(ids.len(), 2, "one history record per connection: {ids:?}");
}

/// Finding: a session owner could replay another user's connection id.
async fn a_replay_by_another_user_is_a_conflict(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let theirs = conn(&s, "alice", Protocol::Vnc);
    created(store.register(&theirs, Limits::default()).await.unwrap());
    let mut mine = theirs.clone();
    mine.user_id = uid("mallory");
    assert_eq!(
        store.register(&mine, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );
}

/// Finding: a silent connection swept after a later one closed set
/// idle-since to its older death time, so the session hibernated early.
async fn idle_since_is_the_latest_disconnect_however_late_the_sweep(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 1).await;
    let silent = conn(&s, "alice", Protocol::Vnc);
    let talker = conn(&s, "bob", Protocol::Vnc);
    created(store.register(&silent, Limits::default()).await.unwrap());
    created(store.register(&talker, Limits::default()).await.unwrap());
    clock.advance(WINDOW - Duration::from_secs(10));
    store.heartbeat(&s, talker.connection_id).await.unwrap();
    clock.advance(Duration::from_secs(20)); // the silent one died 10 s ago
    store.close(&s, talker.connection_id).await.unwrap();
    let closed_at = store
        .session(&s)
        .await
        .unwrap()
        .unwrap()
        .last_disconnect_at
        .expect("a disconnect");
    clock.advance(Duration::from_secs(300)); // the sweep comes late
    assert_eq!(sweep_all(&store).await, 1);
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.idle_since, Some(closed_at));
    assert_eq!(
        view.hibernates_at,
        Some(closed_at + chrono::Duration::seconds(2))
    );
}

/// Finding: the mirror ordered by generation alone, so a Session created
/// again under the same name (generation 1) lost to the old one's 7.
async fn a_recreated_session_is_a_new_session(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Running, 6).await;
    clock.advance(Duration::from_secs(2));
    claimed(&store, &s, T1).await;
    mirror_as(&store, T1, &s, "old", ResourceState::Hibernated, 7).await;
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    // Deleted and created again; the watch shows the new one first.
    let written = mirror_as(&store, T1, &s, "new", ResourceState::Running, 1).await;
    assert_eq!(written, Written::Done);
    assert_eq!(state(&store, &s).await, SessionState::Idle);
    // What the old resource's claim or patch would record is refused.
    let finished = store
        .finish_hibernation(&s, T1, Some("old"), Some(8))
        .await
        .unwrap();
    assert_eq!(finished, FinishOutcome::Stale);
    assert_eq!(state(&store, &s).await, SessionState::Idle);
    // Its history is the new resource's.
    let c = conn(&s, "alice", Protocol::Vnc);
    created(store.register(&c, Limits::default()).await.unwrap());
    store.close(&s, c.connection_id).await.unwrap();
    let archived = outbox(&store).await;
    assert_eq!(archived.len(), 1);
    assert_eq!(archived[0].record.session_uid.as_deref(), Some("new"));
}

async fn a_late_event_of_a_deleted_resource_is_ignored(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Running, 3).await;
    let forgotten = store.forget_session(&s, T1, Some("old")).await.unwrap();
    assert_eq!(forgotten, Written::Done);
    assert_eq!(store.session(&s).await.unwrap(), None);
    assert_eq!(
        mirror_as(&store, T1, &s, "old", ResourceState::Running, 4).await,
        Written::Noop
    );
    assert_eq!(store.session(&s).await.unwrap(), None);
    // The new resource under the name is mirrored, and the old one's late
    // delete does not forget it.
    mirror_as(&store, T1, &s, "new", ResourceState::Running, 1).await;
    let late = store.forget_session(&s, T1, Some("old")).await.unwrap();
    assert_eq!(late, Written::Noop);
    assert_eq!(state(&store, &s).await, SessionState::Idle);
}

/// Finding: one session with 1,500 dead connections and a budget of 500:
/// the first call said "no more" and left 1,000 for the next interval.
/// (The same shape, a tenth of the size.)
async fn the_sweep_says_more_while_one_session_still_holds_dead_connections(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("crowded");
    let many: Vec<_> = (0..150)
        .map(|i| conn(&s, &format!("user-{}", i % 7), Protocol::Http))
        .collect();
    let outcomes = register_at_once(&store, many.into_iter(), Limits::default()).await;
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, RegisterOutcome::Created(_))));
    clock.advance(WINDOW * 2);
    let shard = store.keys().shard_of(&s);
    let first = store.sweep_shard(shard, 50).await.unwrap();
    assert_eq!(first.expired.len(), 50);
    assert!(first.more, "100 dead connections are left");
    assert_eq!(sweep_all(&store).await, 100);
    assert_eq!(store.stats().await.unwrap().total_connections, 0);
}

/// Finding (reasoned): a process dying between a close and the release of
/// the user's slot leaked the slot until the user hit the limit.
async fn an_archived_connection_gives_its_user_slot_back_even_after_a_crash(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Vnc);
    let limits = Limits {
        per_session: 0,
        per_user: 1,
    };
    created(store.register(&c, limits).await.unwrap());
    store.close(&s, c.connection_id).await.unwrap();
    // Play the crash: the release after the close never happened.
    let key = store.keys().user_key(&c.user_id);
    let member = format!("{}/{}", s, c.connection_id);
    let _: i64 = raw(backend, redis::cmd("ZADD").arg(&key).arg(0).arg(&member)).await;
    let records: Vec<_> = outbox(&store).await.into_iter().map(|e| e.record).collect();
    assert_eq!(records.len(), 1);
    store.settle_archived(&records).await.unwrap();
    let left: i64 = raw(backend, redis::cmd("ZCARD").arg(&key)).await;
    assert_eq!(left, 0, "the archiver gave the slot back");
}

/// A wake recorded for the old resource is not carried over to a new one
/// under the same name, unless someone is connected to it.
async fn a_wake_for_the_old_resource_does_not_wake_the_new_one(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Hibernated, 3).await;
    let c = conn(&s, "alice", Protocol::Vnc);
    let connected = created(store.register(&c, Limits::default()).await.unwrap())
        .connection
        .connected_at;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    store.close(&s, c.connection_id).await.unwrap();
    // The new resource was created after that connection, which was the old one's.
    clock.advance(Duration::from_secs(5));
    let born = connected + chrono::Duration::seconds(2);
    let new = ResourceState::Hibernated;
    mirror_created(&store, T1, &s, "new", new, 1, Some(born)).await;
    assert!(pending_wake_ids(&store).await.is_empty());
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    // Someone connected: the new resource is woken.
    connect_alice(&store, &s).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
}

/// Finding (e2e races): a Session was deleted and created again hibernated;
/// before the watch showed the new one, a user connected (to the new one, the
/// only one there was) and was told `waking`, then left. The mirror's change
/// of identity dropped the old identity's wake with everything else, and
/// nobody was connected any more to ask again: the session stayed asleep.
async fn a_connection_to_a_resource_the_store_does_not_know_yet_wakes_it(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Hibernated, 3).await;
    clock.advance(Duration::from_secs(5));
    // "new" exists from here; the store still mirrors "old".
    let c = conn(&s, "alice", Protocol::Vnc);
    let registered = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(registered.session.state, SessionState::Waking);
    let born = registered.connection.connected_at - chrono::Duration::milliseconds(700);
    store.close(&s, c.connection_id).await.unwrap();
    let new = ResourceState::Hibernated;
    mirror_created(&store, T1, &s, "new", new, 1, Some(born)).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    assert_eq!(state(&store, &s).await, SessionState::Waking);
    // A resource created running needs nothing.
    let t = sid("desk-2");
    mirror_as(&store, T1, &t, "old", ResourceState::Hibernated, 3).await;
    let c = conn(&t, "alice", Protocol::Vnc);
    created(store.register(&c, Limits::default()).await.unwrap());
    store.close(&t, c.connection_id).await.unwrap();
    let running = ResourceState::Running;
    mirror_created(&store, T1, &t, "new", running, 1, Some(born)).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s]);
}

/// The same finding when the watch did show the delete: the connection came
/// between the delete and the creation's event, to a session the store did
/// not know at all, and ended before the creation was seen.
async fn a_connection_between_a_delete_and_the_creation_wakes_the_new_resource(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Hibernated, 3).await;
    let forgotten = store.forget_session(&s, T1, Some("old")).await.unwrap();
    assert_eq!(forgotten, Written::Done);
    clock.advance(Duration::from_secs(5));
    let c = conn(&s, "alice", Protocol::Vnc);
    let registered = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(registered.session.state, SessionState::Unknown);
    let born = registered.connection.connected_at - chrono::Duration::seconds(1);
    store.close(&s, c.connection_id).await.unwrap();
    let new = ResourceState::Hibernated;
    mirror_created(&store, T1, &s, "new", new, 1, Some(born)).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);

    // A connection of the old resource, ended before the delete, wakes nothing:
    // what the delete keeps of it is no session either.
    let t = sid("desk-2");
    mirror_as(&store, T1, &t, "old", ResourceState::Running, 3).await;
    let c = conn(&t, "alice", Protocol::Vnc);
    let connected = created(store.register(&c, Limits::default()).await.unwrap())
        .connection
        .connected_at;
    store.close(&t, c.connection_id).await.unwrap();
    store.forget_session(&t, T1, Some("old")).await.unwrap();
    assert_eq!(store.session(&t).await.unwrap(), None);
    clock.advance(Duration::from_secs(5));
    let born = connected + chrono::Duration::seconds(3);
    let new = ResourceState::Hibernated;
    mirror_created(&store, T1, &t, "new", new, 1, Some(born)).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s]);
    assert_eq!(state(&store, &t).await, SessionState::Hibernated);
}

/// Finding (review of the races scenario): a hibernation patch whose answer
/// was lost, and which the Session did not show on the re-read, was released;
/// the API server applied it later. A user who connected in between and left
/// before the watch showed it left no wake: asleep, though used after the
/// decision.
async fn a_released_patch_that_lands_late_wakes_for_a_connection_made_meanwhile(backend: Backend) {
    let (store, clock) = store(backend).await;
    let [s, t, u] = [sid("desk-1"), sid("desk-2"), sid("desk-3")];
    for x in [&s, &t, &u] {
        mirror_as(&store, T1, x, "u1", ResourceState::Running, 1).await;
    }
    clock.advance(Duration::from_secs(3));
    let retry = Duration::from_secs(30);
    let may_land = Duration::from_secs(60);
    for x in [&s, &t, &u] {
        assert!(matches!(
            store.claim_hibernation(x, CLAIM, T1).await.unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    }
    // s and u: the answer was lost; t: the patch was refused (surely not applied).
    let short = Duration::from_secs(5);
    store
        .rollback_unsure_hibernation(&s, T1, retry, may_land)
        .await
        .unwrap();
    store.rollback_hibernation(&t, T1, retry).await.unwrap();
    store
        .rollback_unsure_hibernation(&u, T1, retry, short)
        .await
        .unwrap();
    for x in [&s, &t, &u] {
        let c = conn(x, "alice", Protocol::Vnc);
        let r = created(store.register(&c, Limits::default()).await.unwrap());
        assert_eq!(r.session.state, SessionState::Running);
        store.close(x, c.connection_id).await.unwrap();
    }
    // The late patch lands on s and is seen: woken for that connection.
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    // t was hibernated by someone else: followed.
    mirror_as(&store, T1, &t, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(state(&store, &t).await, SessionState::Hibernated);
    // u's patch could have landed for 5 s only: a hibernation seen later is
    // someone else's, followed.
    clock.advance(Duration::from_secs(10));
    mirror_as(&store, T1, &u, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(state(&store, &u).await, SessionState::Hibernated);
    assert_eq!(pending_wake_ids(&store).await, vec![s]);
}

/// Finding (e2e races, seed 1796138345): the same late landing, but a
/// connection during the claim had ended it with a wake, which the waker
/// acknowledged without a patch (the Session still read running). The
/// release found no claim of its own and recorded nothing, so a user who
/// came after it and left before the watch showed the landing was stranded.
async fn a_late_landing_after_a_wake_ended_the_claim_still_wakes(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 1).await;
    clock.advance(Duration::from_secs(3));
    claimed(&store, &s, T1).await;
    let during = conn(&s, "alice", Protocol::Http);
    let r = created(store.register(&during, Limits::default()).await.unwrap());
    assert_eq!(r.session.state, SessionState::Waking);
    let retry = Duration::from_secs(30);
    let released = store
        .rollback_unsure_hibernation(&s, T1, retry, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(released, Written::Noop, "the wake had ended the claim");
    // The waker reads the Session still running: acknowledged, no patch.
    let acked = store.ack_wake(&s, T1, Some("u1"), Some(1)).await.unwrap();
    assert_eq!(acked, Written::Done);
    store.close(&s, during.connection_id).await.unwrap();
    let after = conn(&s, "bob", Protocol::Vnc);
    let r = created(store.register(&after, Limits::default()).await.unwrap());
    assert_eq!(r.session.state, SessionState::Running);
    store.close(&s, after.connection_id).await.unwrap();
    // The patch lands; the watch shows it only now.
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, vec![s]);
}

/// Finding: on Kubernetes with NATS, the hibernate and wake events were
/// queued by a call of their own after the patch was recorded: a leader dying
/// in between lost them. Now the recording script queues them (the
/// hibernation's is the one its claim carries), a fenced leader's record
/// queues nothing, and a record repeated after a lost answer nothing more.
async fn a_patch_and_its_event_are_recorded_together(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let event = idle_then_claimed(&store, &clock, &s, T2).await;
    let stale = finish(&store, &s, T1, 2).await;
    assert_eq!(stale, FinishOutcome::Fenced);
    assert!(queued(&store).await.is_empty());
    for _ in 0..2 {
        finish(&store, &s, T2, 2).await;
        assert_eq!(announced(&store).await, [hibernate(&event)]);
    }
    connect_alice(&store, &s).await;
    let woken = Announcement::new("kubernetes", "connection");
    let armed = store.arm_wake(&s, T2, &woken).await.unwrap();
    assert_eq!(armed, Written::Done);
    assert_eq!(
        announced(&store).await,
        [hibernate(&event)],
        "not woken yet"
    );
    let acked = store.ack_wake(&s, T2, Some("u1"), Some(3)).await.unwrap();
    assert_eq!(acked, Written::Done);
    assert_eq!(announced(&store).await, [hibernate(&event), wake(&woken)]);
    assert_eq!(state(&store, &s).await, SessionState::Running);
}

/// Finding: the record of a landed hibernation failed (Redis cut) and the
/// watch recorded the state first: the hibernate event went with the
/// reaper's record and was lost when the watch recorded the state first, or
/// when the leader changed before the record was made again. The claim now
/// carries its event, so the mirror queues it, and the late record queues
/// nothing more. But once the store knows a newer generation (the Session
/// was woken since), a late hibernate event would follow the wake's and tell
/// consumers the wrong end state: nothing is queued.
async fn a_late_finish_announces_unless_the_session_moved_on(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let event = idle_then_claimed(&store, &clock, &s, T1).await;
    // The patch landed (generation 2); the watch records it before the finish.
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&event)]);
    let late = finish(&store, &s, T1, 2).await;
    assert_eq!(late, FinishOutcome::NotClaimed);
    assert_eq!(announced(&store).await, [hibernate(&event)]);

    // Woken (3) and idle again: a new claim whose patch lands (4), but the
    // Session is woken again (5) and the watch shows that first.
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 3).await;
    clock.advance(Duration::from_secs(3));
    claimed_announcing(&store, &s, T1).await;
    mirror_as(&store, T1, &s, "u1", ResourceState::Running, 5).await;
    let stale = finish(&store, &s, T1, 4).await;
    assert_eq!(stale, FinishOutcome::Stale);
    assert_eq!(announced(&store).await, [hibernate(&event)]);
    // Running, no connection: idle, not hibernated.
    assert_eq!(state(&store, &s).await, SessionState::Idle);
    // Hibernated later by someone else: not the old claim's news.
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 6).await;
    assert_eq!(announced(&store).await, [hibernate(&event)]);
}

/// Finding (noted last stop): the claimer's patch landed, its record failed
/// with Redis, and the leader changed before Redis answered again. The next
/// leader's watch recorded the hibernation, but the event lived in the old
/// leader's memory: lost. The claim carries it now.
async fn a_landing_recorded_by_the_next_leader_is_announced(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let event = idle_then_claimed(&store, &clock, &s, T1).await;
    mirror_as(&store, T2, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&event)]);
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    // The old leader's late record is fenced and queues nothing.
    let late = finish(&store, &s, T1, 2).await;
    assert_eq!(late, FinishOutcome::Fenced);
    assert_eq!(announced(&store).await, [hibernate(&event)]);
}

/// Finding: the wake event went with the waker's record of its patch, and
/// a leader that died between the patch and the record (Redis failed on it)
/// took the event along: the next leader found the Session running and
/// acknowledged the wake as someone else's, unannounced. The event is now
/// armed in the store before the patch and queued by whoever acknowledges
/// the wake, once; arming with no wake pending arms nothing.
async fn a_wake_patched_by_a_leader_that_died_is_announced_by_the_next(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 1).await;
    let nothing = Announcement::new("kubernetes", "connection");
    assert_eq!(
        store.arm_wake(&s, T1, &nothing).await.unwrap(),
        Written::Noop
    );
    connect_alice(&store, &s).await;
    clock.advance(Duration::from_secs(1));
    let first = Announcement::new("kubernetes", "connection");
    let woken = Announcement::new("kubernetes", "connection");
    for attempt in [&first, &woken] {
        assert_eq!(
            store.arm_wake(&s, T1, attempt).await.unwrap(),
            Written::Done
        );
    }
    assert!(queued(&store).await.is_empty(), "armed, not announced");
    // T1's patch lands (2) and T1 dies; T2's watch shows it, then its waker
    // reads the Session running and acknowledges the wake.
    mirror_as(&store, T2, &s, "u1", ResourceState::Running, 2).await;
    let fenced = store.arm_wake(&s, T1, &first).await.unwrap();
    assert_eq!(fenced, Written::Fenced);
    assert!(queued(&store).await.is_empty());
    for _ in 0..2 {
        store.ack_wake(&s, T2, Some("u1"), Some(2)).await.unwrap();
        assert_eq!(
            announced(&store).await,
            [wake(&woken)],
            "the last armed event, once"
        );
    }
    assert_eq!(state(&store, &s).await, SessionState::Running);
}

/// Found by reading, while adding the NATS check to the races: the patch
/// lands unseen (a watch gap), a connection asks for a wake, and the waker
/// wakes the Session before the hibernator records its landing: that record
/// is then superseded and refused, and consumers would hear of a wake for a
/// hibernation never announced. The waker has just read the Session
/// hibernated when it arms the wake: the claim's event goes first.
async fn a_hibernation_unrecorded_when_the_wake_comes_is_announced_first(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let slept = idle_then_claimed(&store, &clock, &s, T1).await;
    connect_alice(&store, &s).await;
    let woken = Announcement::new("kubernetes", "connection");
    assert_eq!(store.arm_wake(&s, T1, &woken).await.unwrap(), Written::Done);
    assert_eq!(announced(&store).await, [hibernate(&slept)]);
    let acked = store.ack_wake(&s, T1, Some("u1"), Some(3)).await.unwrap();
    assert_eq!(acked, Written::Done);
    let late = finish(&store, &s, T1, 2).await;
    assert_eq!(late, FinishOutcome::Stale);
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&slept), wake(&woken)]);
}

/// A patch released as unsure that lands while it still may is the claim's
/// hibernation: announced when the mirror sees it, once. One that shows up
/// after that time is someone else's and is not.
async fn a_released_patch_landing_late_is_announced_while_it_may_land(backend: Backend) {
    let (store, clock) = store(backend).await;
    let [s, t] = [sid("desk-1"), sid("desk-2")];
    let may_land = Duration::from_secs(60);
    for x in [&s, &t] {
        mirror_as(&store, T1, x, "u1", ResourceState::Running, 1).await;
    }
    clock.advance(Duration::from_secs(3));
    let mut events = Vec::new();
    for x in [&s, &t] {
        events.push(claimed_announcing(&store, x, T1).await);
        let released = store
            .rollback_unsure_hibernation(x, T1, Duration::from_secs(30), may_land)
            .await
            .unwrap();
        assert_eq!(released, Written::Done);
    }
    assert!(queued(&store).await.is_empty());
    clock.advance(Duration::from_secs(5));
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&events[0])]);
    clock.advance(may_land);
    mirror_as(&store, T1, &t, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&events[0])]);
}

/// A wake ends the claim while its patch is in flight; the patch lands and
/// the watch shows it before the claimer records it: the hibernation is
/// announced (and the wake recorded), as its own record would have.
async fn a_landing_after_a_wake_ended_the_claim_is_announced(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let event = idle_then_claimed(&store, &clock, &s, T1).await;
    connect_alice(&store, &s).await;
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(announced(&store).await, [hibernate(&event)]);
    assert_eq!(pending_wake_ids(&store).await, vec![s.clone()]);
    let late = finish(&store, &s, T1, 2).await;
    assert_eq!(late, FinishOutcome::NotClaimed);
    assert_eq!(announced(&store).await, [hibernate(&event)]);
}

/// Finding (races, seed 42, 2,000 episodes): a patch released as unsure
/// (answer 500, Session read back running) recorded that a hibernation seen
/// within a minute wakes for any connection made since. Users came and went;
/// 28 s later the session was idle again and a new claim's own patch landed,
/// seen by the watch before the patch's answer: the rule took it for the old
/// patch and woke the session with nobody asking. A new claim is a new
/// decision: only connections made after it ask for a wake if a patch lands.
async fn a_new_claim_after_a_released_patch_is_not_undone_when_it_lands(backend: Backend) {
    let (store, clock) = store(backend).await;
    let [s, t] = [sid("desk-1"), sid("desk-2")];
    let may_land = Duration::from_secs(60);
    for x in [&s, &t] {
        mirror_as(&store, T1, x, "u1", ResourceState::Running, 1).await;
    }
    clock.advance(Duration::from_secs(3));
    for x in [&s, &t] {
        claimed(&store, x, T1).await;
        store
            .rollback_unsure_hibernation(x, T1, Duration::from_secs(1), may_land)
            .await
            .unwrap();
        // A user comes and goes after the release.
        let c = conn(x, "alice", Protocol::Vnc);
        created(store.register(&c, Limits::default()).await.unwrap());
        store.close(x, c.connection_id).await.unwrap();
    }
    // Idle again past the timeout (2 s), well within the minute: claimed anew.
    clock.advance(Duration::from_secs(5));
    for x in [&s, &t] {
        claimed(&store, x, T1).await;
    }
    // s: the new claim's patch lands and the watch shows it first. Nobody
    // connected since the claim: no wake.
    mirror_as(&store, T1, &s, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, Vec::<SessionId>::new());
    let finished = finish(&store, &s, T1, 2).await;
    assert_eq!(finished, FinishOutcome::NotClaimed);
    assert_eq!(state(&store, &s).await, SessionState::Hibernated);
    // t: the new claim's patch surely failed; a user came and went after the
    // new claim, then the old patch lands late after all: that user still
    // asks for the session awake.
    store
        .rollback_hibernation(&t, T1, Duration::from_secs(1))
        .await
        .unwrap();
    let c = conn(&t, "bob", Protocol::Vnc);
    created(store.register(&c, Limits::default()).await.unwrap());
    store.close(&t, c.connection_id).await.unwrap();
    mirror_as(&store, T1, &t, "u1", ResourceState::Hibernated, 2).await;
    assert_eq!(pending_wake_ids(&store).await, vec![t.clone()]);
}

/// Finding (model.rs): a connection arrived while the hibernation patch was
/// in flight, so a wake ended the claim; the patch landed and its finish
/// answered `Finished` ("this term's claim ended") instead of `NotClaimed`.
async fn a_finish_after_a_wake_ended_the_claim_is_not_claimed(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    claimed_then_connected(&store, &clock, &s).await;
    let finished = finish(&store, &s, T1, 2).await;
    assert_eq!(finished, FinishOutcome::NotClaimed);
    assert_eq!(state(&store, &s).await, SessionState::Waking);
    assert_eq!(pending_wake_ids(&store).await, vec![s]);
}

/// Finding (model.rs): Redis lost every key — the term sequence and every
/// shard's newest term — and the next leader drew the term of the leader
/// before the loss again, so that leader's late writes passed every fence.
async fn terms_only_grow_even_when_every_key_is_lost(backend: Backend) {
    let (store, _) = store(backend).await;
    let old = store.begin_term().await.unwrap();
    let mut lost = vec![store.keys().term_seq_key()];
    lost.extend(
        store
            .keys()
            .shards()
            .map(|shard| store.keys().shard_key(shard, ShardKey::Term)),
    );
    for key in lost {
        let _: i64 = raw(backend, redis::cmd("DEL").arg(key)).await;
    }
    let new = store.begin_term().await.unwrap();
    assert!(new > old, "{new:?} after {old:?}");
    let s = sid("desk-1");
    assert_eq!(
        mirror_as(&store, old, &s, "u1", ResourceState::Running, 1).await,
        Written::Fenced
    );
}

/// Finding (model.rs): with a dead connection waiting for the sweep, closing
/// another one (live, or dead too but newer) left the session's idle-since
/// at the older one's death: earlier than the close, and earlier than what
/// the view had shown a moment before.
async fn idle_since_counts_a_dead_connection_closed_before_the_sweep(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let older = conn(&s, "alice", Protocol::Vnc);
    let newer = conn(&s, "bob", Protocol::Vnc);
    created(store.register(&older, Limits::default()).await.unwrap());
    clock.advance(Duration::from_secs(30));
    created(store.register(&newer, Limits::default()).await.unwrap());
    clock.advance(WINDOW);
    let shown = store.session(&s).await.unwrap().unwrap().idle_since;
    assert!(shown.is_some(), "both are dead");
    let reason = store.close(&s, newer.connection_id).await.unwrap();
    assert_eq!(reason, Some(EndReason::Expired));
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.idle_since, shown, "idle-since went back");

    // A live one closed while a dead one waits for the sweep.
    let r = sid("desk-2");
    let dead = conn(&r, "alice", Protocol::Vnc);
    let live = conn(&r, "bob", Protocol::Vnc);
    created(store.register(&dead, Limits::default()).await.unwrap());
    clock.advance(Duration::from_secs(30));
    created(store.register(&live, Limits::default()).await.unwrap());
    clock.advance(Duration::from_secs(40));
    let reason = store.close(&r, live.connection_id).await.unwrap();
    assert_eq!(reason, Some(EndReason::Closed));
    let view = store.session(&r).await.unwrap().unwrap();
    assert!(view.last_disconnect_at.is_some());
    assert_eq!(
        view.idle_since, view.last_disconnect_at,
        "idle since the close, not since the dead one died"
    );
}

/// Finding (model.rs): a resource deleted while the watch was down was
/// forgotten by the relist (without a uid: whatever is mirrored), then a late
/// write of what a leader had read before the deletion (the waker mirroring
/// a terminated Session) brought it back: the store mirrored a resource that
/// no longer existed, and refused every connection as terminated.
async fn a_late_event_of_a_resource_forgotten_by_a_relist_is_ignored(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, T1, &s, "old", ResourceState::Terminated, 3).await;
    let forgotten = store.forget_session(&s, T1, None).await.unwrap();
    assert_eq!(forgotten, Written::Done);
    assert_eq!(
        mirror_as(&store, T1, &s, "old", ResourceState::Terminated, 3).await,
        Written::Noop
    );
    assert_eq!(store.session(&s).await.unwrap(), None);
    connect_alice(&store, &s).await;
}

/// Finding (the model, with creation times): the mirror's wake for a
/// connection made since the creation read lc, which holds the start of
/// connections that ended or came while another was there, not of the first
/// one still present. A connection to a session the store did not know (after
/// a data loss, or before the watch showed the new resource) that died and
/// was not yet swept when the mirror met the resource hibernated left no
/// wake; swept a moment earlier, it would have left one.
async fn a_dead_connection_not_yet_swept_wakes_a_resource_created_before_it(backend: Backend) {
    let (store, clock) = store(backend).await;
    let [s, t] = [sid("desk-1"), sid("desk-2")];
    let hibernated = ResourceState::Hibernated;
    // t's connection is swept before the mirror meets its resource: woken.
    let c = conn(&t, "alice", Protocol::Vnc);
    let registered = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(registered.session.state, SessionState::Unknown);
    let born = registered.connection.connected_at - chrono::Duration::seconds(1);
    clock.advance(WINDOW + Duration::from_secs(5));
    assert_eq!(sweep_all(&store).await, 1);
    mirror_created(&store, T1, &t, "new", hibernated, 1, Some(born)).await;
    assert_eq!(pending_wake_ids(&store).await, vec![t.clone()]);
    // s's is as dead, only not swept yet: the same connection, no wake.
    let c = conn(&s, "alice", Protocol::Vnc);
    let registered = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(registered.session.state, SessionState::Unknown);
    let born = registered.connection.connected_at - chrono::Duration::seconds(1);
    clock.advance(WINDOW + Duration::from_secs(5));
    mirror_created(&store, T1, &s, "new", hibernated, 1, Some(born)).await;
    let mut wakes = pending_wake_ids(&store).await;
    wakes.sort();
    assert_eq!(wakes, vec![s, t]);
}

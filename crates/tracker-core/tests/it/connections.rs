//! Registering, heartbeating, listing, closing and expiring connections.

use std::time::Duration;

use tracker_core::testing::Backend;
use tracker_core::{
    ConnectionId, EndReason, HeartbeatOutcome, IdleTimeout, Limits, NotOwner, Protocol,
    RegisterOutcome, ResourceState, SessionId, SessionMeta, SessionState, ShardKey, Signal, Store,
    StoreConfig, Term, UserAgent, UserId,
};

use crate::support::*;

crate::both!(
    a_connection_lives_from_register_to_close,
    replaying_a_registration_is_idempotent,
    a_late_heartbeat_never_revives_a_connection,
    closing_a_dead_connection_archives_it_as_expired,
    history_in_the_outbox_signals_the_archiver_once,
    batch_heartbeats_report_exactly_the_unknown_pairs,
    batch_heartbeats_of_one_session_check_each_connection,
    concurrent_single_heartbeats_each_get_their_own_answer,
    a_heartbeat_refused_to_its_caller_records_nothing,
    a_users_registration_checks_the_owner_in_the_call_that_registers,
    the_cheap_state_read_agrees_with_the_view_in_every_state,
    stats_follow_every_change,
    limits_refuse_the_connection_over_the_limit,
    a_refused_registration_gives_its_user_slot_back,
    a_connection_id_cannot_be_taken_by_another_session,
    user_agents_are_shared_but_never_mixed_up,
    a_live_ids_entry_is_a_bucket_field_and_an_ended_id_a_set_member,
    an_ended_connection_whose_registration_was_never_marked_keeps_its_id,
    id_entries_written_before_the_buckets_are_still_honoured,
);

async fn a_connection_lives_from_register_to_close(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Vnc);
    let reg = created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(reg.connection.connection_id, c.connection_id);
    assert_eq!(reg.connection.user_agent, c.user_agent);
    assert_eq!(reg.connection.client_ip, c.client_ip);
    assert_eq!(
        reg.connection.expires_at - reg.connection.last_heartbeat,
        chrono::Duration::from_std(WINDOW).unwrap()
    );
    assert_eq!(reg.session.active_connections, 1);
    assert_eq!(reg.session.distinct_users, 1);
    assert_eq!(reg.session.state, SessionState::Unknown);
    assert_eq!(
        reg.session.last_connection_at,
        Some(reg.connection.connected_at)
    );

    let got = store
        .get_connection(c.connection_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, reg.connection);
    assert_eq!(
        store.list_connections(&s).await.unwrap(),
        vec![reg.connection.clone()]
    );

    let ack = store.heartbeat(&s, c.connection_id).await.unwrap().unwrap();
    assert!(ack.last_heartbeat >= reg.connection.last_heartbeat);
    assert_eq!(
        store
            .heartbeat(&sid("desk-2"), c.connection_id)
            .await
            .unwrap(),
        None,
        "a heartbeat names its session"
    );

    assert_eq!(
        store.close(&s, c.connection_id).await.unwrap(),
        Some(EndReason::Closed)
    );
    assert_eq!(store.close(&s, c.connection_id).await.unwrap(), None);
    assert_eq!(store.heartbeat(&s, c.connection_id).await.unwrap(), None);
    assert_eq!(store.get_connection(c.connection_id).await.unwrap(), None);
    assert!(store.list_connections(&s).await.unwrap().is_empty());

    let view = store
        .session(&s)
        .await
        .unwrap()
        .expect("still known after close");
    assert_eq!(view.active_connections, 0);
    assert_eq!(view.idle_since, view.last_disconnect_at);
    assert!(view.idle_since.is_some());

    let out = outbox(&store).await;
    assert_eq!(out.len(), 1);
    let r = &out[0].record;
    assert_eq!(r.connection_id, c.connection_id);
    assert_eq!(r.session_id, s);
    assert_eq!(r.user_id, c.user_id);
    assert_eq!(r.protocol, Protocol::Vnc);
    assert_eq!(r.client_ip, c.client_ip);
    assert_eq!(r.user_agent, c.user_agent);
    assert_eq!(r.connected_at, reg.connection.connected_at);
    assert_eq!(r.last_heartbeat_at, ack.last_heartbeat);
    assert_eq!(Some(r.disconnected_at), view.last_disconnect_at);
    assert_eq!(r.end_reason, EndReason::Closed);

    assert_eq!(store.session(&sid("never-seen")).await.unwrap(), None);
}

async fn replaying_a_registration_is_idempotent(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Http);
    let first = created(store.register(&c, Limits::default()).await.unwrap());
    let RegisterOutcome::Replayed(again) = store.register(&c, Limits::default()).await.unwrap()
    else {
        panic!("a replay is not a new connection");
    };
    assert_eq!(
        again.connection.connection_id,
        first.connection.connection_id
    );
    assert_eq!(again.connection.connected_at, first.connection.connected_at);
    assert_eq!(again.session.active_connections, 1);
    assert_eq!(store.stats().await.unwrap().total_connections, 1);
}

async fn a_late_heartbeat_never_revives_a_connection(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Websocket);
    let reg = created(store.register(&c, Limits::default()).await.unwrap());

    clock.advance(WINDOW);
    assert_eq!(
        store.heartbeat(&s, c.connection_id).await.unwrap(),
        None,
        "dead at the window"
    );
    assert!(store.list_connections(&s).await.unwrap().is_empty());
    assert_eq!(store.get_connection(c.connection_id).await.unwrap(), None);
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.active_connections, 0);
    assert_eq!(
        view.idle_since,
        Some(reg.connection.last_heartbeat + chrono::Duration::from_std(WINDOW).unwrap())
    );

    assert_eq!(sweep_all(&store).await, 1);
    assert_eq!(
        store.heartbeat(&s, c.connection_id).await.unwrap(),
        None,
        "not after the sweep"
    );
    assert_eq!(sweep_all(&store).await, 0, "swept once");
    let out = outbox(&store).await;
    assert_eq!(out.len(), 1);
    let r = &out[0].record;
    assert_eq!(r.end_reason, EndReason::Expired);
    assert_eq!(r.last_heartbeat_at, reg.connection.last_heartbeat);
    assert_eq!(r.disconnected_at, reg.connection.expires_at);
    assert_eq!(store.stats().await.unwrap().total_connections, 0);
}

async fn closing_a_dead_connection_archives_it_as_expired(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Websocket);
    created(store.register(&c, Limits::default()).await.unwrap());
    clock.advance(WINDOW + Duration::from_secs(5));
    assert_eq!(
        store.close(&s, c.connection_id).await.unwrap(),
        Some(EndReason::Expired)
    );
    assert_eq!(sweep_all(&store).await, 0);
    let out = outbox(&store).await;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].record.end_reason, EndReason::Expired);
}

async fn history_in_the_outbox_signals_the_archiver_once(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let shard = store.keys().shard_of(&s);
    let group = store
        .signal_groups()
        .into_iter()
        .find(|g| g.contains(&shard))
        .unwrap();
    let mut listener = store
        .signal_listener(Signal::Archive, &group)
        .await
        .unwrap();
    let quick = Duration::from_millis(20);
    assert_eq!(
        listener.wait_shard(quick).await.unwrap(),
        None,
        "no history yet"
    );

    let signal = store.keys().shard_key(shard, ShardKey::ArchiveSignal);
    let conns: Vec<_> = (0..3).map(|_| conn(&s, "alice", Protocol::Http)).collect();
    for c in &conns {
        created(store.register(c, Limits::default()).await.unwrap());
    }
    let queued: i64 = raw(backend, redis::cmd("LLEN").arg(&signal)).await;
    assert_eq!(queued, 0, "registrations append no history");
    store.close(&s, conns[0].connection_id).await.unwrap();
    store.close(&s, conns[1].connection_id).await.unwrap();
    let queued: i64 = raw(backend, redis::cmd("LLEN").arg(&signal)).await;
    assert_eq!(queued, 1, "one signal however many appends");
    assert_eq!(
        listener.wait_shard(Duration::from_secs(5)).await.unwrap(),
        Some(shard)
    );
    assert_eq!(listener.wait_shard(quick).await.unwrap(), None, "consumed");

    // The sweep's appends signal too.
    clock.advance(WINDOW + Duration::from_secs(5));
    assert_eq!(sweep_all(&store).await, 1);
    assert_eq!(
        listener.wait_shard(Duration::from_secs(5)).await.unwrap(),
        Some(shard)
    );
    assert_eq!(outbox(&store).await.len(), 3);
}

async fn batch_heartbeats_report_exactly_the_unknown_pairs(backend: Backend) {
    let (store, _) = store(backend).await;
    let mut pairs = Vec::new();
    for i in 0..30 {
        let s = sid(&format!("desk-{i}"));
        let c = conn(&s, "alice", Protocol::Http);
        created(store.register(&c, Limits::default()).await.unwrap());
        pairs.push((s, c.connection_id));
    }
    let closed = pairs[3].clone();
    store.close(&closed.0, closed.1).await.unwrap();
    let stranger = (sid("desk-7"), ConnectionId::new_random());
    let wrong_session = (sid("desk-8"), pairs[9].1);
    let mut batch = pairs.clone();
    batch.insert(5, stranger.clone());
    batch.push(wrong_session.clone());

    let outcome = store.heartbeat_batch(&batch).await.unwrap();
    assert_eq!(outcome.alive, 29);
    assert_eq!(outcome.unknown, vec![closed, stranger, wrong_session]);
    assert_eq!(store.heartbeat_batch(&[]).await.unwrap().alive, 0);
}

/// The script checks the connections of one session together (one
/// ZMSCORE, one ZADD, in chunks of 512): each is still checked on its own,
/// and the refusals come back in pair order.
async fn batch_heartbeats_of_one_session_check_each_connection(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let register = |user: &str| {
        let c = conn(&s, user, Protocol::Http);
        let store = &store;
        async move {
            created(store.register(&c, Limits::default()).await.unwrap());
            (c.session_id.clone(), c.connection_id)
        }
    };
    let dead = register("alice").await;
    clock.advance(WINDOW + Duration::from_secs(1));
    let mut live = Vec::new();
    for i in 0..600 {
        live.push(register(&format!("user-{}", i % 7)).await);
    }
    let closed = live[10].clone();
    store.close(&closed.0, closed.1).await.unwrap();
    let stranger = (s.clone(), ConnectionId::new_random());
    let mut batch = vec![dead.clone()];
    batch.extend(live.iter().cloned());
    batch.push(stranger.clone());

    clock.advance(WINDOW / 2);
    let outcome = store.heartbeat_batch(&batch).await.unwrap();
    assert_eq!(outcome.alive, 599);
    assert_eq!(outcome.unknown, vec![dead, closed, stranger]);
    // Recorded: past the registrations' window, only the dead one expires.
    clock.advance(WINDOW / 2 + Duration::from_secs(1));
    assert_eq!(sweep_all(&store).await, 1);
}

async fn stats_follow_every_change(backend: Backend) {
    let (store, _) = store(backend).await;
    let (s1, s2, s3) = (sid("desk-1"), sid("desk-2"), sid("desk-3"));
    mirror(&store, &s3, ResourceState::Running, IdleTimeout::Off, 1).await;
    let conns = [
        conn(&s1, "alice", Protocol::Vnc),
        conn(&s1, "bob", Protocol::Http),
        conn(&s2, "alice", Protocol::Websocket),
        conn(&s2, "alice", Protocol::Websocket),
    ];
    for c in &conns {
        created(store.register(c, Limits::default()).await.unwrap());
    }
    let st = store.stats().await.unwrap();
    assert_eq!(st.total_connections, 4);
    assert_eq!(st.sessions_with_connections, 2);
    assert_eq!(st.shared_sessions, 1);
    assert_eq!(st.connections_by_protocol[&Protocol::Websocket], 2);
    assert_eq!(st.connections_by_protocol[&Protocol::Vnc], 1);
    assert_eq!(st.connections_by_protocol[&Protocol::Http], 1);
    assert_eq!(st.sessions_by_state[&SessionState::Unknown], 2);
    assert_eq!(st.sessions_by_state[&SessionState::Idle], 1);
    assert_eq!(st.heartbeat_window_seconds, 60);

    // s3 gets a connection: idle -> running.
    let c3 = conn(&s3, "carol", Protocol::Http);
    created(store.register(&c3, Limits::default()).await.unwrap());
    let st = store.stats().await.unwrap();
    assert_eq!(st.sessions_by_state[&SessionState::Running], 1);
    assert_eq!(st.sessions_by_state[&SessionState::Idle], 0);

    for c in conns.iter().chain([&c3]) {
        store.close(&c.session_id, c.connection_id).await.unwrap();
    }
    let st = store.stats().await.unwrap();
    assert_eq!(st.total_connections, 0);
    assert_eq!(st.sessions_with_connections, 0);
    assert_eq!(st.shared_sessions, 0);
    assert!(st.connections_by_protocol.values().all(|&n| n == 0));
    assert_eq!(st.sessions_by_state[&SessionState::Unknown], 0);
    assert_eq!(st.sessions_by_state[&SessionState::Idle], 1);
}

async fn limits_refuse_the_connection_over_the_limit(backend: Backend) {
    let (store, _) = store(backend).await;
    let per_session = Limits {
        per_session: 2,
        per_user: 0,
    };
    let s = sid("desk-1");
    let a = conn(&s, "alice", Protocol::Http);
    created(store.register(&a, per_session).await.unwrap());
    created(
        store
            .register(&conn(&s, "bob", Protocol::Http), per_session)
            .await
            .unwrap(),
    );
    let third = conn(&s, "carol", Protocol::Http);
    assert_eq!(
        store.register(&third, per_session).await.unwrap(),
        RegisterOutcome::SessionLimit
    );
    store.close(&s, a.connection_id).await.unwrap();
    created(store.register(&third, per_session).await.unwrap());

    let per_user = Limits {
        per_session: 0,
        per_user: 2,
    };
    let first = conn(&sid("u-1"), "dave", Protocol::Vnc);
    created(store.register(&first, per_user).await.unwrap());
    created(
        store
            .register(&conn(&sid("u-2"), "dave", Protocol::Vnc), per_user)
            .await
            .unwrap(),
    );
    let over = conn(&sid("u-3"), "dave", Protocol::Vnc);
    assert_eq!(
        store.register(&over, per_user).await.unwrap(),
        RegisterOutcome::UserLimit
    );
    created(
        store
            .register(&conn(&sid("u-3"), "erin", Protocol::Vnc), per_user)
            .await
            .unwrap(),
    );
    // Replaying a registration does not take a second slot.
    assert!(matches!(
        store.register(&first, per_user).await.unwrap(),
        RegisterOutcome::Replayed(_)
    ));
    store
        .close(&first.session_id, first.connection_id)
        .await
        .unwrap();
    created(store.register(&over, per_user).await.unwrap());
}

async fn a_refused_registration_gives_its_user_slot_back(backend: Backend) {
    let (store, _) = store(backend).await;
    let limits = Limits {
        per_session: 0,
        per_user: 1,
    };
    let gone = sid("gone");
    mirror(
        &store,
        &gone,
        ResourceState::Terminated,
        IdleTimeout::Off,
        1,
    )
    .await;
    let refused = conn(&gone, "alice", Protocol::Http);
    assert_eq!(
        store.register(&refused, limits).await.unwrap(),
        RegisterOutcome::Terminated
    );
    created(
        store
            .register(&conn(&sid("ok"), "alice", Protocol::Http), limits)
            .await
            .unwrap(),
    );
}

async fn a_connection_id_cannot_be_taken_by_another_session(backend: Backend) {
    let (store, _) = store(backend).await;
    let sessions = same_shard_sessions(&store, 2);
    let c = conn(&sessions[0], "alice", Protocol::Http);
    created(store.register(&c, Limits::default()).await.unwrap());
    let mut thief = c.clone();
    thief.session_id = sessions[1].clone();
    assert_eq!(
        store.register(&thief, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );
    assert_eq!(store.session(&sessions[1]).await.unwrap(), None);
}

async fn user_agents_are_shared_but_never_mixed_up(backend: Backend) {
    let (store, _) = store(backend).await;
    let sessions = same_shard_sessions(&store, 2);
    let mut firefox = conn(&sessions[0], "alice", Protocol::Http);
    firefox.user_agent = Some(UserAgent::truncated("Firefox/128"));
    let mut firefox2 = conn(&sessions[1], "bob", Protocol::Http);
    firefox2.user_agent = firefox.user_agent.clone();
    let mut chrome = conn(&sessions[1], "bob", Protocol::Vnc);
    chrome.user_agent = Some(UserAgent::truncated("Chrome/131"));
    let mut none = conn(&sessions[1], "bob", Protocol::Vnc);
    none.user_agent = None;
    for c in [&firefox, &firefox2, &chrome, &none] {
        created(store.register(c, Limits::default()).await.unwrap());
    }
    // The first user of an interned text leaves; the other still reads it.
    store
        .close(&sessions[0], firefox.connection_id)
        .await
        .unwrap();
    for c in [&firefox2, &chrome, &none] {
        let got = store
            .get_connection(c.connection_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.user_agent, c.user_agent);
    }
    let out = outbox(&store).await;
    assert_eq!(out[0].record.user_agent, firefox.user_agent);
}

async fn concurrent_single_heartbeats_each_get_their_own_answer(backend: Backend) {
    let (store, clock) = store(backend).await;
    let mut live = Vec::new();
    for i in 0..40 {
        let c = conn(&sid(&format!("desk-{}", i % 7)), "alice", Protocol::Http);
        created(store.register(&c, Limits::default()).await.unwrap());
        live.push((c.session_id, c.connection_id));
    }
    // Unknown ones among them: never registered, of another session, closed.
    let closed = live.pop().unwrap();
    store.close(&closed.0, closed.1).await.unwrap();
    let unknown = [
        (sid("desk-1"), ConnectionId::new_random()),
        (sid("desk-9"), live[0].1),
        closed,
    ];
    // Sessions 0 to 3 are alice's; the others have no owner.
    for i in 0..4 {
        mirror_as(
            &store,
            Term(1),
            &sid(&format!("desk-{i}")),
            "u",
            ResourceState::Running,
            1,
        )
        .await;
    }
    let owned = |s: &SessionId| ["desk-0", "desk-1", "desk-2", "desk-3"].contains(&s.as_str());
    clock.advance(Duration::from_secs(1));
    // Many rounds at once, so that calls are in flight while others queue;
    // anyone's, alice's and bob's heartbeats mixed in the same calls.
    let callers = [None, Some(uid("alice")), Some(uid("bob"))];
    let calls = (0..6)
        .flat_map(|round| live.iter().chain(&unknown).map(move |p| (round, p)))
        .map(|(round, (s, c))| {
            let store = store.clone();
            let (s, c) = (s.clone(), *c);
            let caller = callers[round % 3].clone();
            tokio::spawn(async move {
                let outcome = store.heartbeat_as(&s, c, caller.as_ref()).await.unwrap();
                ((s, c), caller, outcome)
            })
        });
    for call in futures::future::join_all(calls).await {
        let (pair, caller, outcome) = call.unwrap();
        let expected = match caller.as_ref().map(UserId::as_str) {
            Some(_) if !owned(&pair.0) => "no owner",
            Some("bob") => "other owner",
            _ if live.contains(&pair) => "alive",
            _ => "unknown",
        };
        let got = match outcome {
            HeartbeatOutcome::Alive(_) => "alive",
            HeartbeatOutcome::Unknown => "unknown",
            HeartbeatOutcome::NotOwner(NotOwner::NoOwner) => "no owner",
            HeartbeatOutcome::NotOwner(NotOwner::OtherOwner) => "other owner",
        };
        assert_eq!(got, expected, "{pair:?} as {caller:?}");
    }
}

/// A heartbeat refused for its caller records nothing.
async fn a_heartbeat_refused_to_its_caller_records_nothing(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    mirror_as(&store, Term(1), &s, "u", ResourceState::Running, 1).await;
    let c = conn(&s, "alice", Protocol::Http);
    let at = created(store.register(&c, Limits::default()).await.unwrap())
        .connection
        .last_heartbeat;
    clock.advance(Duration::from_secs(5));
    let refused = store
        .heartbeat_as(&s, c.connection_id, Some(&uid("bob")))
        .await
        .unwrap();
    assert_eq!(refused, HeartbeatOutcome::NotOwner(NotOwner::OtherOwner));
    let view = store
        .get_connection(c.connection_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.last_heartbeat, at);
    let HeartbeatOutcome::Alive(ack) = store
        .heartbeat_as(&s, c.connection_id, Some(&uid("alice")))
        .await
        .unwrap()
    else {
        panic!("the owner's heartbeat is recorded");
    };
    assert!(ack.last_heartbeat > at);
}

/// A user's registration checks the owner in the call that registers. The
/// API's check before it reads the session first; if the Session is
/// deleted and created again for someone else in between, the registration
/// must not join the new one (nor wake it).
async fn a_users_registration_checks_the_owner_in_the_call_that_registers(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    // Alice's Session, hibernated: the API's check would let alice in.
    mirror_as(&store, Term(1), &s, "u1", ResourceState::Hibernated, 1).await;
    let register = |user: &'static str, owner: Option<&'static str>| {
        let (store, c) = (store.clone(), conn(&s, user, Protocol::Http));
        async move {
            let owner = owner.map(uid);
            store
                .register_as(&c, Limits::default(), owner.as_ref())
                .await
                .unwrap()
        }
    };
    store.forget_session(&s, Term(1), Some("u1")).await.unwrap();
    let refused = register("alice", Some("alice")).await;
    assert_eq!(
        refused,
        RegisterOutcome::NotOwner(NotOwner::NoOwner),
        "deleted: no such session"
    );
    // Created again for bob.
    let bobs = SessionMeta {
        session_id: s.clone(),
        uid: Some("u2".into()),
        owner: Some("bob".into()),
        idle_source: Default::default(),
        state: ResourceState::Hibernated,
        idle_timeout: IdleTimeout::After(Duration::from_secs(2)),
        generation: Some(1),
        max_session_duration: None,
        created_at: None,
    };
    store.mirror_session(&bobs, Term(1)).await.unwrap();
    let refused = register("alice", Some("alice")).await;
    assert_eq!(refused, RegisterOutcome::NotOwner(NotOwner::OtherOwner));
    assert!(store.list_connections(&s).await.unwrap().is_empty());
    let view = store.session(&s).await.unwrap().unwrap();
    assert_eq!(view.state, SessionState::Hibernated, "no wake asked for");
    // The owner, and a service acting for anyone, register.
    created(register("bob", Some("bob")).await);
    created(register("alice", None).await);
}

/// The id index keeps a registered connection's entry as a field of a
/// bucket (a fraction of a key); once the connection ended and was archived,
/// its id is a member of the set of ids ended in this period, which expires
/// whole after the retention. Either way the id stays refused to anyone.
async fn a_live_ids_entry_is_a_bucket_field_and_an_ended_id_a_set_member(backend: Backend) {
    let (store, _) = store(backend).await;
    let sessions = same_shard_sessions(&store, 2);
    let c = conn(&sessions[0], "alice", Protocol::Vnc);
    let id = c.connection_id;
    let (bucket, own) = (store.keys().id_bucket_key(id), store.keys().id_key(id));
    let field = || redis::cmd("HGET").arg(&bucket).arg(id.to_string()).clone();
    created(store.register(&c, Limits::default()).await.unwrap());
    // The session alone: the registering script checks the user.
    let entry = format!("r|{}", sessions[0]);
    assert_eq!(raw::<Option<String>>(backend, &field()).await, Some(entry));
    assert_eq!(raw::<i64>(backend, redis::cmd("EXISTS").arg(&own)).await, 0);
    assert!(store.get_connection(id).await.unwrap().is_some());

    store.close(&sessions[0], id).await.unwrap();
    let records: Vec<_> = outbox(&store).await.into_iter().map(|e| e.record).collect();
    let retention = StoreConfig::DEFAULT_ENDED_ID_RETENTION.as_millis() as i64;
    for _ in 0..2 {
        // Settling twice (a retried batch) changes nothing more.
        store.settle_archived(&records).await.unwrap();
        assert_eq!(raw::<Option<String>>(backend, &field()).await, None);
        assert_eq!(raw::<i64>(backend, redis::cmd("EXISTS").arg(&own)).await, 0);
        let sets = ended_sets(backend, &store, id).await;
        assert_eq!(sets.len(), 1, "{sets:?}");
        let member: i64 = raw(
            backend,
            redis::cmd("SISMEMBER")
                .arg(&sets[0])
                .arg(id.as_uuid().as_bytes().as_slice()),
        )
        .await;
        assert_eq!(member, 1);
        // Kept for the retention, and an eighth of it more at most.
        let ttl: i64 = raw(backend, redis::cmd("PTTL").arg(&sets[0])).await;
        assert!(
            ttl > retention - 60_000 && ttl <= retention + retention / 8,
            "{ttl}"
        );
    }
    assert!(store.get_connection(id).await.unwrap().is_none());
    for (session, user) in [(&sessions[0], "alice"), (&sessions[1], "bob")] {
        let mut again = conn(session, user, Protocol::Vnc);
        again.connection_id = id;
        assert_eq!(
            store.register(&again, Limits::default()).await.unwrap(),
            RegisterOutcome::Conflict,
            "{session} {user}"
        );
    }
}

/// The sets of ended ids of `id`'s id shard.
async fn ended_sets(backend: Backend, store: &Store, id: ConnectionId) -> Vec<String> {
    let own = store.keys().id_key(id);
    let base = &own[..own.find(":id:").unwrap()];
    let mut found: Vec<String> =
        raw(backend, redis::cmd("KEYS").arg(format!("{base}:ended:*"))).await;
    found.sort();
    found
}

/// Finding: a registration whose mark was lost (its entry left a claim) and
/// whose connection then ended kept the claim for the retention, and the
/// claim let the same session and user register the used id again as a new
/// connection. Now the archive's settling takes the id out of any entry.
async fn an_ended_connection_whose_registration_was_never_marked_keeps_its_id(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let c = conn(&s, "alice", Protocol::Vnc);
    let id = c.connection_id;
    created(store.register(&c, Limits::default()).await.unwrap());
    // Play the lost mark: the entry is still the claim.
    let bucket = store.keys().id_bucket_key(id);
    let _: i64 = raw(backend, redis::cmd("HDEL").arg(&bucket).arg(id.to_string())).await;
    let own = store.keys().id_key(id);
    let _: () = raw(
        backend,
        redis::cmd("SET").arg(&own).arg(format!("c|{s}|alice")),
    )
    .await;
    store.close(&s, id).await.unwrap();
    let records: Vec<_> = outbox(&store).await.into_iter().map(|e| e.record).collect();
    store.settle_archived(&records).await.unwrap();
    assert_eq!(
        store.register(&c, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );
}

/// An entry of the layout before the buckets (a key per id) is honoured: an
/// ended connection's id stays refused, and a claim left by a failed
/// registration is taken over by its retry and moved into the bucket.
async fn id_entries_written_before_the_buckets_are_still_honoured(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let ended = conn(&s, "alice", Protocol::Vnc);
    let own = store.keys().id_key(ended.connection_id);
    let _: () = raw(
        backend,
        redis::cmd("SET").arg(&own).arg(format!("r|{s}|alice")),
    )
    .await;
    assert_eq!(
        store.register(&ended, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );

    let retried = conn(&s, "alice", Protocol::Vnc);
    let id = retried.connection_id;
    let claim = format!("c|{s}|alice");
    let _: () = raw(
        backend,
        redis::cmd("SET").arg(store.keys().id_key(id)).arg(&claim),
    )
    .await;
    created(store.register(&retried, Limits::default()).await.unwrap());
    let field: Option<String> = raw(
        backend,
        redis::cmd("HGET")
            .arg(store.keys().id_bucket_key(id))
            .arg(id.to_string()),
    )
    .await;
    assert_eq!(field, Some(format!("r|{s}")));
    let own_left: i64 = raw(backend, redis::cmd("EXISTS").arg(store.keys().id_key(id))).await;
    assert_eq!(own_left, 0);
    assert!(store.get_connection(id).await.unwrap().is_some());
}

/// The WebSocket watchers read a session's state cheaply every interval and
/// the whole view only when it changed: the two reads must agree in every
/// state a session passes through.
async fn the_cheap_state_read_agrees_with_the_view_in_every_state(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let check = |what: &'static str, expected: Option<SessionState>| {
        let store = store.clone();
        let s = s.clone();
        async move {
            let read = watch_read(&store, &s).await;
            assert_eq!(read.map(|(v, _)| v.state), expected, "{what}");
        }
    };
    check("nothing known", None).await;
    let c = conn(&s, "alice", Protocol::Vnc);
    created(store.register(&c, Limits::default()).await.unwrap());
    check("a connection, no resource", Some(SessionState::Unknown)).await;
    clock.advance(WINDOW + Duration::from_secs(1));
    check(
        "its connection dead, not swept",
        Some(SessionState::Unknown),
    )
    .await;
    store.close(&s, c.connection_id).await.unwrap();
    mirror_as(&store, Term(1), &s, "u1", ResourceState::Running, 1).await;
    check("mirrored, no connection", Some(SessionState::Idle)).await;
    let c = conn(&s, "alice", Protocol::Vnc);
    created(store.register(&c, Limits::default()).await.unwrap());
    check("connected", Some(SessionState::Running)).await;
    store.close(&s, c.connection_id).await.unwrap();
    clock.advance(Duration::from_secs(3));
    let claimed = store
        .claim_hibernation(&s, Duration::from_secs(30), Term(1))
        .await
        .unwrap();
    assert!(
        matches!(claimed, tracker_core::ClaimOutcome::Claimed(_)),
        "{claimed:?}"
    );
    check("claimed", Some(SessionState::Hibernating)).await;
    mirror_as(&store, Term(1), &s, "u1", ResourceState::Hibernated, 2).await;
    check("hibernated", Some(SessionState::Hibernated)).await;
    created(
        store
            .register(&conn(&s, "bob", Protocol::Http), Limits::default())
            .await
            .unwrap(),
    );
    check("a connection asks for a wake", Some(SessionState::Waking)).await;
    mirror_as(&store, Term(1), &s, "u1", ResourceState::Terminated, 3).await;
    check("terminated", Some(SessionState::Terminated)).await;
}

//! The counts a session keeps as its connections change (live connections,
//! distinct users, shared sessions, last connection): no script walks a
//! session's connections to find them, so every path that adds or removes a
//! connection must keep them right.

use std::collections::BTreeMap;
use std::time::Duration;

use tracker_core::testing::Backend;
use tracker_core::{Limits, Protocol, RegisterOutcome, SessionId, SessionView, Store};

use crate::support::*;

crate::both!(
    distinct_users_follow_register_close_and_replay,
    distinct_users_follow_the_sweep,
    refused_registrations_leave_the_counts_alone,
    the_last_connection_is_the_newest_start_whatever_ends_first,
);

async fn view(store: &Store, s: &SessionId) -> SessionView {
    store.session(s).await.unwrap().unwrap()
}

/// The session's per-user counts as stored; empty while it has one user.
async fn user_counts(backend: Backend, store: &Store, s: &SessionId) -> BTreeMap<String, i64> {
    let [_, users, _] = store.keys().session_keys(s);
    raw(backend, redis::cmd("HGETALL").arg(users)).await
}

async fn shared(store: &Store) -> u64 {
    store.stats().await.unwrap().shared_sessions
}

async fn distinct_users_follow_register_close_and_replay(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let a1 = conn(&s, "alice", Protocol::Http);
    let a2 = conn(&s, "alice", Protocol::Vnc);
    let b = conn(&s, "bob", Protocol::Http);
    created(store.register(&a1, Limits::default()).await.unwrap());
    created(store.register(&a2, Limits::default()).await.unwrap());
    assert_eq!(view(&store, &s).await.distinct_users, 1);
    assert!(user_counts(backend, &store, &s).await.is_empty());
    assert_eq!(shared(&store).await, 0);

    let reg = created(store.register(&b, Limits::default()).await.unwrap());
    assert_eq!(reg.session.distinct_users, 2);
    assert_eq!(reg.session.active_connections, 3);
    assert_eq!(
        user_counts(backend, &store, &s).await,
        BTreeMap::from([("alice".into(), 2), ("bob".into(), 1)])
    );
    assert_eq!(shared(&store).await, 1);

    // A replay is the same connection: nothing is counted twice.
    for c in [&a1, &b] {
        let replayed = store.register(c, Limits::default()).await.unwrap();
        let RegisterOutcome::Replayed(r) = replayed else {
            panic!("expected a replay, got {replayed:?}");
        };
        assert_eq!(r.session.distinct_users, 2);
        assert_eq!(r.session.active_connections, 3);
    }
    assert_eq!(
        user_counts(backend, &store, &s).await,
        BTreeMap::from([("alice".into(), 2), ("bob".into(), 1)])
    );

    store.close(&s, a1.connection_id).await.unwrap();
    assert_eq!(view(&store, &s).await.distinct_users, 2);
    assert_eq!(shared(&store).await, 1);
    store.close(&s, b.connection_id).await.unwrap();
    assert_eq!(view(&store, &s).await.distinct_users, 1);
    assert!(user_counts(backend, &store, &s).await.is_empty());
    assert_eq!(shared(&store).await, 0);

    // A second user again, then the first one leaves: the other is counted.
    let c = conn(&s, "carol", Protocol::Http);
    created(store.register(&c, Limits::default()).await.unwrap());
    assert_eq!(shared(&store).await, 1);
    store.close(&s, a2.connection_id).await.unwrap();
    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (1, 1));
    assert_eq!(shared(&store).await, 0);
    store.close(&s, c.connection_id).await.unwrap();
    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (0, 0));
    assert!(user_counts(backend, &store, &s).await.is_empty());
}

async fn distinct_users_follow_the_sweep(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let old_a = conn(&s, "alice", Protocol::Http);
    let bob = conn(&s, "bob", Protocol::Http);
    let carol = conn(&s, "carol", Protocol::Http);
    for c in [&old_a, &bob, &carol] {
        created(store.register(c, Limits::default()).await.unwrap());
    }
    clock.advance(WINDOW / 2);
    let new_a = conn(&s, "alice", Protocol::Vnc);
    created(store.register(&new_a, Limits::default()).await.unwrap());
    store.heartbeat(&s, carol.connection_id).await.unwrap();
    clock.advance(WINDOW / 2 + Duration::from_secs(1));

    // Dead but not swept: old_a and bob. Alice still has a live connection,
    // bob has none.
    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (2, 2));
    assert_eq!(shared(&store).await, 1);

    assert_eq!(sweep_all(&store).await, 2);
    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (2, 2));
    assert_eq!(
        user_counts(backend, &store, &s).await,
        BTreeMap::from([("alice".into(), 1), ("carol".into(), 1)])
    );

    // Everything dies: nobody is live before the sweep, nothing is left after.
    clock.advance(WINDOW + Duration::from_secs(1));
    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (0, 0));
    assert_eq!(shared(&store).await, 1, "counters wait for the sweep");
    assert_eq!(sweep_all(&store).await, 2);
    assert_eq!(shared(&store).await, 0);
    assert!(user_counts(backend, &store, &s).await.is_empty());
    assert_eq!(store.stats().await.unwrap().total_connections, 0);
}

async fn refused_registrations_leave_the_counts_alone(backend: Backend) {
    let (store, _) = store(backend).await;
    let s = sid("desk-1");
    let per_session = Limits {
        per_session: 2,
        per_user: 0,
    };
    let a = conn(&s, "alice", Protocol::Http);
    created(store.register(&a, per_session).await.unwrap());
    created(
        store
            .register(&conn(&s, "bob", Protocol::Http), per_session)
            .await
            .unwrap(),
    );
    assert_eq!(
        store
            .register(&conn(&s, "carol", Protocol::Http), per_session)
            .await
            .unwrap(),
        RegisterOutcome::SessionLimit
    );
    let per_user = Limits {
        per_session: 0,
        per_user: 1,
    };
    created(
        store
            .register(&conn(&sid("desk-2"), "dave", Protocol::Http), per_user)
            .await
            .unwrap(),
    );
    assert_eq!(
        store
            .register(&conn(&s, "dave", Protocol::Http), per_user)
            .await
            .unwrap(),
        RegisterOutcome::UserLimit
    );
    // An id already used by another session is refused too.
    let mut stolen = conn(&s, "erin", Protocol::Http);
    stolen.connection_id = a.connection_id;
    stolen.session_id = sid("desk-3");
    assert_eq!(
        store.register(&stolen, Limits::default()).await.unwrap(),
        RegisterOutcome::Conflict
    );

    let v = view(&store, &s).await;
    assert_eq!((v.active_connections, v.distinct_users), (2, 2));
    assert_eq!(
        user_counts(backend, &store, &s).await,
        BTreeMap::from([("alice".into(), 1), ("bob".into(), 1)])
    );
    assert_eq!(shared(&store).await, 1);
    assert_eq!(store.session(&sid("desk-3")).await.unwrap(), None);
}

async fn the_last_connection_is_the_newest_start_whatever_ends_first(backend: Backend) {
    let (store, clock) = store(backend).await;
    let s = sid("desk-1");
    let first = conn(&s, "alice", Protocol::Http);
    let second = conn(&s, "alice", Protocol::Http);
    let f = created(store.register(&first, Limits::default()).await.unwrap());
    clock.advance(Duration::from_secs(1));
    let g = created(store.register(&second, Limits::default()).await.unwrap());
    assert_eq!(
        g.session.last_connection_at,
        Some(g.connection.connected_at)
    );
    assert!(g.connection.connected_at > f.connection.connected_at);
    // The newer one ends first: the last connection stays its start.
    store.close(&s, second.connection_id).await.unwrap();
    assert_eq!(
        view(&store, &s).await.last_connection_at,
        Some(g.connection.connected_at)
    );
    store.close(&s, first.connection_id).await.unwrap();
    assert_eq!(
        view(&store, &s).await.last_connection_at,
        Some(g.connection.connected_at)
    );
    // Alone on an emptied session, a newer connection is the last one.
    clock.advance(Duration::from_secs(1));
    let third = conn(&s, "bob", Protocol::Http);
    let h = created(store.register(&third, Limits::default()).await.unwrap());
    assert_eq!(
        h.session.last_connection_at,
        Some(h.connection.connected_at)
    );
    assert!(h.connection.connected_at > g.connection.connected_at);
}

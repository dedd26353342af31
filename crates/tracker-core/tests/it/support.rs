use std::time::Duration;

use futures::future::join_all;

use tracker_core::testing::{self, Backend};
use tracker_core::{
    ClockOffset, ConnectionId, IdleTimeout, Limits, NewConnection, OutboxEntry, Protocol,
    QueuedEvent, RegisterOutcome, Registered, ResourceState, SessionId, SessionMeta, Store, Term,
    UserAgent, UserId, Written,
};

/// The leader term of tests that play one leader.
pub const T: Term = Term(1);

/// The resource uid tests give the Session named `session`.
pub fn res_uid(session: &SessionId) -> String {
    format!("uid-{session}")
}

/// Runs an async test case against the standalone Redis and the Cluster.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tracker_core::testing::Backend::Standalone).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(tracker_core::testing::Backend::Cluster).await;
                }
            )*
        }
    };
}

pub const WINDOW: Duration = Duration::from_secs(60);

/// A store with a fresh prefix and a movable clock.
pub async fn store(backend: Backend) -> (Store, ClockOffset) {
    store_with_window(backend, WINDOW).await
}

pub async fn store_with_window(backend: Backend, window: Duration) -> (Store, ClockOffset) {
    let cfg = testing::config(backend, window);
    let clock = ClockOffset::default();
    (
        testing::connect(&cfg).await.with_clock(clock.clone()),
        clock,
    )
}

pub fn sid(s: &str) -> SessionId {
    s.parse().unwrap()
}

pub fn uid(s: &str) -> UserId {
    s.parse().unwrap()
}

pub fn conn(session: &SessionId, user: &str, protocol: Protocol) -> NewConnection {
    NewConnection {
        session_id: session.clone(),
        connection_id: ConnectionId::new_random(),
        user_id: uid(user),
        protocol,
        client_ip: Some("10.1.2.3".parse().unwrap()),
        user_agent: Some(UserAgent::truncated("Mozilla/5.0 (X11; Linux x86_64) test")),
    }
}

pub fn created(outcome: RegisterOutcome) -> Registered {
    match outcome {
        RegisterOutcome::Created(r) => r,
        other => panic!("expected Created, got {other:?}"),
    }
}

pub async fn mirror(
    store: &Store,
    session: &SessionId,
    state: ResourceState,
    idle: IdleTimeout,
    generation: i64,
) {
    let applied = store
        .mirror_session(
            &SessionMeta {
                session_id: session.clone(),
                uid: Some(res_uid(session)),
                owner: Some("alice".into()),
                idle_source: Default::default(),
                state,
                idle_timeout: idle,
                generation: Some(generation),
                max_session_duration: None,
                created_at: None,
            },
            T,
        )
        .await
        .unwrap();
    assert!(
        applied == Written::Done,
        "mirror write of generation {generation} was refused"
    );
}

/// Everything in every shard's outbox (reads without acknowledging).
pub async fn outbox(store: &Store) -> Vec<OutboxEntry> {
    let mut all = Vec::new();
    for shard in store.keys().shards() {
        all.extend(store.outbox_read(shard, 100_000).await.unwrap());
    }
    all
}

/// Sweeps every shard until nothing more expires.
pub async fn sweep_all(store: &Store) -> usize {
    let mut n = 0;
    for shard in store.keys().shards() {
        loop {
            let sweep = store.sweep_shard(shard, 100).await.unwrap();
            n += sweep.expired.len();
            if !sweep.more {
                break;
            }
        }
    }
    n
}

/// Session ids that all hash to the same shard, for same-shard cases.
pub fn same_shard_sessions(store: &Store, n: usize) -> Vec<SessionId> {
    let first = sid("shard-probe-0");
    let shard = store.keys().shard_of(&first);
    (0..)
        .map(|i| sid(&format!("shard-probe-{i}")))
        .filter(|s| store.keys().shard_of(s) == shard)
        .take(n)
        .collect()
}

/// One raw command against the backend, for tests that must play a crash or
/// look under the store.
pub async fn raw<T: redis::FromRedisValue>(backend: Backend, cmd: &redis::Cmd) -> T {
    let (urls, _) = backend.urls();
    match backend {
        Backend::Standalone => {
            let mut c = redis::Client::open(urls[0].as_str())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            cmd.query_async(&mut c).await.unwrap()
        }
        Backend::Cluster => {
            let mut c = redis::cluster::ClusterClient::new(urls)
                .unwrap()
                .get_async_connection()
                .await
                .unwrap();
            cmd.query_async(&mut c).await.unwrap()
        }
    }
}

/// The session ids with a pending wake, over every shard.
pub async fn pending_wake_ids(store: &Store) -> Vec<SessionId> {
    let mut all = Vec::new();
    for shard in store.keys().shards() {
        all.extend(
            store
                .pending_wakes(shard, 1000)
                .await
                .unwrap()
                .into_iter()
                .map(|w| w.session_id),
        );
    }
    all
}

/// A mirror write as the leader of `term` would make it.
pub async fn mirror_as(
    store: &Store,
    term: Term,
    session: &SessionId,
    uid: &str,
    state: ResourceState,
    generation: i64,
) -> Written {
    mirror_created(store, term, session, uid, state, generation, None).await
}

/// Every session event queued for NATS, shard by shard, oldest first in each.
pub async fn queued(store: &Store) -> Vec<QueuedEvent> {
    let mut all = Vec::new();
    for shard in store.keys().shards() {
        all.extend(store.events_read(shard, 100).await.unwrap().events);
    }
    all
}

/// [`mirror_as`] for a resource created at `created_at`.
pub async fn mirror_created(
    store: &Store,
    term: Term,
    session: &SessionId,
    uid: &str,
    state: ResourceState,
    generation: i64,
    created_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Written {
    store
        .mirror_session(
            &SessionMeta {
                session_id: session.clone(),
                uid: Some(uid.to_owned()),
                owner: Some("alice".into()),
                idle_source: Default::default(),
                state,
                idle_timeout: IdleTimeout::After(Duration::from_secs(2)),
                generation: Some(generation),
                max_session_duration: None,
                created_at,
            },
            term,
        )
        .await
        .unwrap()
}

/// Registers every connection from its own task, all at once.
pub async fn register_at_once(
    store: &Store,
    conns: impl Iterator<Item = NewConnection>,
    limits: Limits,
) -> Vec<RegisterOutcome> {
    let tasks = conns.map(|c| {
        let store = store.clone();
        tokio::spawn(async move { store.register(&c, limits).await.unwrap() })
    });
    join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// Held by the tests that load the shared servers hardest (the slot
/// migration, the model runs), so that on a two-core machine they do not
/// run at once and starve each other into timeouts.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A session watch's read, checked against the cheap state read that a
/// watcher makes between whole reads: both must tell the same state and
/// warning.
pub async fn watch_read(
    store: &Store,
    session: &SessionId,
) -> Option<(
    tracker_core::SessionView,
    Option<chrono::DateTime<chrono::Utc>>,
)> {
    let whole = store.session_watch(session).await.unwrap();
    let cheap = store.session_state(session).await.unwrap();
    assert_eq!(
        cheap,
        whole.as_ref().map(|(v, w)| (v.state, *w)),
        "{session}: the state read disagrees with the view"
    );
    whole
}

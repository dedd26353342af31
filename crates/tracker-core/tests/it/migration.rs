//! A real slot migration under load, on the test cluster: the slot of one
//! shard moves to another node key by key (`CLUSTER SETSLOT … MIGRATING /
//! IMPORTING`, `MIGRATE`) while connections register, heartbeat and close on
//! that shard. Every script declares the keys it touches, so Redis either
//! runs it where all of them are, redirects it (ASK), or has the client retry
//! (TRYAGAIN) until the slot is whole again; it never runs against half a
//! shard. Afterwards every connection is live or in the outbox exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rand::seq::IndexedRandom;
use rand::Rng;
use tokio::sync::Mutex;
use tracker_core::testing::{self, Backend};
use tracker_core::{
    ConnectionId, Limits, Protocol, RegisterOutcome, SessionId, ShardId, ShardKey, Store,
};

use crate::support::*;

/// A cluster master as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    id: String,
    host: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

impl Node {
    pub(crate) fn url(&self) -> String {
        format!("redis://{}:{}", self.host, self.port)
    }

    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

async fn node_cmd<T: redis::FromRedisValue>(node: &Node, cmd: &redis::Cmd) -> T {
    let mut c = redis::Client::open(node.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    cmd.query_async(&mut c).await.unwrap()
}

/// The masters of the test cluster, from the first seed node's view.
pub(crate) async fn masters() -> Vec<Node> {
    let (urls, _) = Backend::Cluster.urls();
    let mut c = redis::Client::open(urls[0].as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut c)
        .await
        .unwrap();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                return None;
            }
            let addr = f[1].split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                id: f[0].to_owned(),
                host: host.to_owned(),
                port: port.parse().ok()?,
                slots,
            })
        })
        .collect()
}

/// Moves `slot` from `source` to `target` one key at a time, running
/// `between` after each key: every half-migrated state of the slot is seen
/// by the load.
async fn migrate<F, Fut>(
    slot: u16,
    source: &Node,
    target: &Node,
    all: &[Node],
    mut between: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let setslot = |state: &str, id: &str| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot).arg(state).arg(id);
        c
    };
    let _: () = node_cmd(target, &setslot("IMPORTING", &source.id)).await;
    let _: () = node_cmd(source, &setslot("MIGRATING", &target.id)).await;
    let mut moved = 0;
    // Bounded: the load is bounded, so the source runs dry.
    for _ in 0..200_000 {
        let keys: Vec<String> = node_cmd(
            source,
            redis::cmd("CLUSTER").arg("GETKEYSINSLOT").arg(slot).arg(1),
        )
        .await;
        let Some(key) = keys.first() else {
            break;
        };
        let _: redis::Value = node_cmd(
            source,
            redis::cmd("MIGRATE")
                .arg(&target.host)
                .arg(target.port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(key),
        )
        .await;
        moved += 1;
        between().await;
    }
    let _: () = node_cmd(target, &setslot("NODE", &target.id)).await;
    let _: () = node_cmd(source, &setslot("NODE", &target.id)).await;
    for other in all
        .iter()
        .filter(|n| n.id != source.id && n.id != target.id)
    {
        let _: () = node_cmd(other, &setslot("NODE", &target.id)).await;
    }
    moved
}

/// What the load saw of each connection it tried to register.
#[derive(Debug, Default)]
struct Ledger {
    /// Registered (created or replayed at least once), by id.
    registered: HashMap<ConnectionId, SessionId>,
    closed: HashSet<ConnectionId>,
}

/// How often a worker retries one call that fails as unavailable: while a
/// slot is half moved a call may spend its retry budget, as a client would
/// see a 503; a client retries the same request.
const RETRIES: usize = 50;

/// A retry of an unavailable call, or the end of the test.
fn unavailable(e: &tracker_core::Error, attempt: usize) {
    assert!(e.is_unavailable(), "{e}");
    assert!(
        attempt < RETRIES,
        "still failing after {RETRIES} tries: {e}"
    );
}

/// One worker: registers, heartbeats and closes on the shard's sessions for
/// a fixed number of steps.
async fn worker(
    store: Store,
    sessions: Arc<Vec<SessionId>>,
    ledger: Arc<Mutex<Ledger>>,
    steps: usize,
) {
    let mut live: Vec<(SessionId, ConnectionId)> = Vec::new();
    for _ in 0..steps {
        let roll = rand::rng().random_range(0..10);
        if roll < 4 || live.is_empty() {
            let s = sessions.choose(&mut rand::rng()).unwrap().clone();
            let c = conn(&s, "load", Protocol::Websocket);
            for attempt in 0.. {
                match store.register(&c, Limits::default()).await {
                    Ok(RegisterOutcome::Created(_) | RegisterOutcome::Replayed(_)) => {
                        ledger
                            .lock()
                            .await
                            .registered
                            .insert(c.connection_id, s.clone());
                        live.push((s, c.connection_id));
                        break;
                    }
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(e) => unavailable(&e, attempt),
                }
            }
        } else if roll < 8 {
            let (s, id) = live.choose(&mut rand::rng()).unwrap().clone();
            for attempt in 0.. {
                match store.heartbeat(&s, id).await {
                    Ok(ack) => {
                        assert!(ack.is_some(), "a live connection vanished: {s}/{id}");
                        break;
                    }
                    Err(e) => unavailable(&e, attempt),
                }
            }
        } else {
            let i = rand::rng().random_range(0..live.len());
            let (s, id) = live.swap_remove(i);
            for attempt in 0.. {
                match store.close(&s, id).await {
                    Ok(found) => {
                        // A retried close may find it closed by the first try.
                        assert!(found.is_some() || attempt > 0, "{s}/{id} was not live");
                        ledger.lock().await.closed.insert(id);
                        break;
                    }
                    Err(e) => unavailable(&e, attempt),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_migrating_under_load_loses_and_doubles_nothing() {
    let _heavy = HEAVY.lock().await;
    let mut cfg = testing::config(Backend::Cluster, WINDOW);
    // Many shards, and one whose hash tag no other test uses: the migration
    // moves every key of the slot, and other tests need not see it.
    cfg.shards = 64;
    let store = testing::connect(&cfg).await;
    let shard = ShardId(47);
    let sessions: Vec<SessionId> = (0..)
        .map(|i| sid(&format!("migrating-{i}")))
        .filter(|s| store.keys().shard_of(s) == shard)
        .take(6)
        .collect();
    let slot: u16 = raw(
        Backend::Cluster,
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(store.keys().shard_key(shard, ShardKey::Conn)),
    )
    .await;
    let nodes = masters().await;
    let source = nodes
        .iter()
        .find(|n| n.owns(slot))
        .expect("slot owner")
        .clone();
    let target = nodes
        .iter()
        .find(|n| n.id != source.id)
        .expect("another master")
        .clone();

    let sessions = Arc::new(sessions);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    // Some state before the migration starts, so there are keys to move.
    worker(store.clone(), sessions.clone(), ledger.clone(), 40).await;
    // Load in the background all along, and a burst started after every
    // moved key. Bursts are not awaited there: while the slot is half moved
    // their calls wait (TRYAGAIN) for the migration they would block.
    let mut workers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(worker(store.clone(), sessions.clone(), ledger.clone(), 150)))
        .collect();
    let mut bursts = Vec::new();
    let moved = migrate(slot, &source, &target, &nodes, || {
        bursts.extend(
            (0..3)
                .map(|_| tokio::spawn(worker(store.clone(), sessions.clone(), ledger.clone(), 5))),
        );
        tokio::task::yield_now()
    })
    .await;
    workers.append(&mut bursts);
    for w in workers {
        w.await.unwrap();
    }
    assert!(moved > 0, "the slot held no keys to move");
    let after = masters().await;
    assert!(
        after.iter().any(|n| n.id == target.id && n.owns(slot)),
        "slot {slot} did not move"
    );

    // The cluster connection may still be replacing itself after the
    // migration (see Store): wait until the store answers before checking.
    for attempt in 0.. {
        match store.stats().await {
            Ok(_) => break,
            Err(e) => unavailable(&e, attempt),
        }
    }
    let ledger = ledger.lock().await;
    let archived: Vec<ConnectionId> = outbox(&store)
        .await
        .into_iter()
        .map(|e| e.record.connection_id)
        .collect();
    let unique: HashSet<_> = archived.iter().copied().collect();
    assert_eq!(unique.len(), archived.len(), "an outbox entry was doubled");
    assert_eq!(unique, ledger.closed, "closed connections = outbox entries");
    let mut live = HashSet::new();
    for s in sessions.iter() {
        live.extend(
            store
                .list_connections(s)
                .await
                .unwrap()
                .into_iter()
                .map(|c| c.connection_id),
        );
    }
    let expected_live: HashSet<_> = ledger
        .registered
        .keys()
        .filter(|id| !ledger.closed.contains(id))
        .copied()
        .collect();
    assert_eq!(live, expected_live, "a connection was lost or revived");
    assert_eq!(
        store.stats().await.unwrap().total_connections,
        live.len() as u64
    );
    eprintln!(
        "slot {slot}: {moved} keys moved {} -> {}; {} registered, {} closed, {} live",
        source.port,
        target.port,
        ledger.registered.len(),
        ledger.closed.len(),
        live.len()
    );
}

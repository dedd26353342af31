//! Many tasks at once against one store: the promises that matter under races.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rand::Rng;
use tracker_core::testing::Backend;
use tracker_core::{
    ClaimOutcome, ClaimRefusal, ConnectionId, EndReason, IdleTimeout, Limits, Protocol,
    RegisterOutcome, ResourceState, Store,
};

use crate::support::*;

crate::both!(
    limits_hold_under_concurrency,
    a_registration_racing_a_claim_is_never_lost,
    a_heartbeat_racing_the_sweep_never_revives,
    every_connection_reaches_the_outbox_exactly_once,
);

async fn limits_hold_under_concurrency(backend: Backend) {
    let (store, _) = store(backend).await;
    let limits = Limits {
        per_session: 5,
        per_user: 3,
    };
    let crowded = sid("crowded");
    let users = (0..40).map(|i| conn(&crowded, &format!("user-{i}"), Protocol::Http));
    let outcomes = register_at_once(&store, users, limits).await;
    assert_eq!(created_count(&outcomes), 5, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(
        o,
        RegisterOutcome::Created(_) | RegisterOutcome::SessionLimit
    )));
    let view = store.session(&crowded).await.unwrap().unwrap();
    assert_eq!(view.active_connections, 5);

    let sessions = (0..40).map(|i| conn(&sid(&format!("own-{i}")), "greedy", Protocol::Vnc));
    let outcomes = register_at_once(&store, sessions, limits).await;
    assert_eq!(created_count(&outcomes), 3, "{outcomes:?}");
}

fn created_count(outcomes: &[RegisterOutcome]) -> usize {
    outcomes
        .iter()
        .filter(|o| matches!(o, RegisterOutcome::Created(_)))
        .count()
}

/// Sessions idle and due; for each, a claim and a registration race. A claim
/// that wins must leave exactly one pending wake (the registration came after
/// it); a claim that loses must leave none.
async fn a_registration_racing_a_claim_is_never_lost(backend: Backend) {
    let (store, clock) = store(backend).await;
    let sessions: Vec<_> = (0..40).map(|i| sid(&format!("race-{i}"))).collect();
    for s in &sessions {
        mirror(
            &store,
            s,
            ResourceState::Running,
            IdleTimeout::After(Duration::from_secs(1)),
            1,
        )
        .await;
    }
    clock.advance(Duration::from_secs(1));

    let races = sessions.iter().map(|s| {
        let (a, b) = (store.clone(), store.clone());
        let (s1, s2) = (s.clone(), s.clone());
        let claim = tokio::spawn(async move {
            a.claim_hibernation(&s1, Duration::from_secs(30), T)
                .await
                .unwrap()
        });
        let c = conn(&s2, "alice", Protocol::Websocket);
        let register =
            tokio::spawn(async move { b.register(&c, Limits::default()).await.unwrap() });
        async move { (claim.await.unwrap(), register.await.unwrap()) }
    });
    let results = join_all(races).await;
    let wakes = pending(&store).await;
    for (s, (claim, registered)) in sessions.iter().zip(&results) {
        assert!(matches!(registered, RegisterOutcome::Created(_)));
        match claim {
            ClaimOutcome::Claimed(_) => {
                assert_eq!(wakes.get(s), Some(&1), "{s}: claim won, wake lost")
            }
            ClaimOutcome::Refused(reason) => {
                assert_eq!(*reason, ClaimRefusal::Connected);
                assert_eq!(wakes.get(s), None, "{s}: nothing to wake");
            }
            ClaimOutcome::Warned(w) => panic!("{s}: no max duration, yet warned: {w:?}"),
        }
    }

    // Hibernated sessions hit by many registrations at once: one wake each.
    let sleepers: Vec<_> = (0..20).map(|i| sid(&format!("sleeper-{i}"))).collect();
    for s in &sleepers {
        mirror(
            &store,
            s,
            ResourceState::Hibernated,
            IdleTimeout::After(Duration::from_secs(1)),
            1,
        )
        .await;
    }
    let conns = sleepers
        .iter()
        .flat_map(|s| (0..5).map(|_| conn(s, "alice", Protocol::Http)));
    let outcomes = register_at_once(&store, conns, Limits::default()).await;
    assert_eq!(created_count(&outcomes), sleepers.len() * 5, "{outcomes:?}");
    let wakes = pending(&store).await;
    for s in &sleepers {
        assert_eq!(wakes.get(s), Some(&1), "{s}");
    }
}

async fn pending(store: &Store) -> HashMap<tracker_core::SessionId, usize> {
    let mut counts = HashMap::new();
    for shard in store.keys().shards() {
        for w in store.pending_wakes(shard, 10_000).await.unwrap() {
            *counts.entry(w.session_id).or_default() += 1;
        }
    }
    counts
}

/// Heartbeats at random moments around the end of the window while two
/// sweepers run. Per connection: no heartbeat succeeds after one failed, and
/// none succeeds later than the last heartbeat its history record shows.
async fn a_heartbeat_racing_the_sweep_never_revives(backend: Backend) {
    let window = Duration::from_millis(150);
    let (store, _) = store_with_window(backend, window).await;
    let mut conns = Vec::new();
    for i in 0..60 {
        let s = sid(&format!("hb-{}", i % 12));
        let c = conn(&s, "alice", Protocol::Http);
        created(store.register(&c, Limits::default()).await.unwrap());
        conns.push((s, c.connection_id));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += sweep_all(&store).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                n
            })
        })
        .collect();
    let beaters = conns.iter().cloned().map(|(s, id)| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut log = Vec::new();
            for _ in 0..8 {
                // Pauses of up to 1.3 windows: some land in time, some too late.
                let pause = rand::rng().random_range(0..200);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                log.push(store.heartbeat(&s, id).await.unwrap());
            }
            (id, log)
        })
    });
    let logs: Vec<_> = join_all(beaters)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Let everything expire, then stop the sweepers after a final sweep.
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::SeqCst);
    let swept: usize = join_all(sweepers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .sum::<usize>()
        + sweep_all(&store).await;

    let records: HashMap<ConnectionId, _> = outbox(&store)
        .await
        .into_iter()
        .map(|e| (e.record.connection_id, e.record))
        .collect();
    assert_eq!(records.len(), conns.len(), "every connection ended once");
    assert_eq!(swept, conns.len());
    let beats: Vec<_> = logs.iter().flat_map(|(_, log)| log).collect();
    assert!(
        beats.iter().any(|b| b.is_some()) && beats.iter().any(|b| b.is_none()),
        "no race happened"
    );
    for (id, log) in logs {
        let record = &records[&id];
        assert_eq!(record.end_reason, EndReason::Expired);
        let first_miss = log.iter().position(Option::is_none).unwrap_or(log.len());
        assert!(
            log[first_miss..].iter().all(Option::is_none),
            "{id}: revived after a miss: {log:?}"
        );
        for ack in log.iter().flatten() {
            assert!(
                ack.last_heartbeat <= record.last_heartbeat_at,
                "{id}: heartbeat after archiving"
            );
        }
    }
}

/// Closes and sweeps racing over the same connections: each one is in the
/// outbox exactly once, as closed or expired.
async fn every_connection_reaches_the_outbox_exactly_once(backend: Backend) {
    let (store, clock) = store(backend).await;
    let mut all = Vec::new();
    for i in 0..200 {
        let s = sid(&format!("out-{}", i % 20));
        let c = conn(&s, &format!("user-{}", i % 7), Protocol::ALL[i % 3]);
        created(store.register(&c, Limits::default()).await.unwrap());
        all.push((s, c.connection_id));
    }
    // Close a third now; let the rest die, then close half of those while sweeping.
    for (s, id) in all.iter().step_by(3) {
        assert_eq!(store.close(s, *id).await.unwrap(), Some(EndReason::Closed));
    }
    clock.advance(WINDOW);
    let closers = all.iter().skip(1).step_by(2).cloned().map(|(s, id)| {
        let store = store.clone();
        tokio::spawn(async move { store.close(&s, id).await.unwrap() })
    });
    let sweepers = (0..3).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { sweep_all(&store).await })
    });
    let (closed, _) = futures::join!(join_all(closers), join_all(sweepers));
    for c in closed {
        assert!(matches!(
            c.unwrap(),
            None | Some(EndReason::Expired) | Some(EndReason::Closed)
        ));
    }
    sweep_all(&store).await;

    let entries = outbox(&store).await;
    let ids: Vec<_> = entries.iter().map(|e| e.record.connection_id).collect();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), all.len(), "no record doubled or lost");
    assert_eq!(unique.len(), all.len());
    assert!(all.iter().all(|(_, id)| unique.contains(id)));
    let st = store.stats().await.unwrap();
    assert_eq!((st.total_connections, st.sessions_with_connections), (0, 0));

    // Acknowledging empties the outbox and reports the backlog left.
    for shard in store.keys().shards() {
        let ids: Vec<_> = store
            .outbox_read(shard, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(store.outbox_ack(shard, &ids).await.unwrap(), 0);
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

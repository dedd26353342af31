//! Figures, not checks: `#[ignore]`d so the suite stays fast. Run with
//! `cargo test -p tracker-reaper --release --test it -- --ignored bench_ --nocapture`
//! (with the services of `scripts/test.sh` and `DATABASE_URL` set).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use fake_kube::FakeKube;
use futures::future::join_all;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracker_core::testing::Backend;
use tracker_core::SessionState;
use tracker_reaper::metrics::Metrics;

use crate::helpers::{eventually, session_json, sid, Env, Reaper, NS};

const ROWS: usize = 20_000;

#[sqlx::test(migrations = "../../migrations")]
#[ignore = "benchmark"]
async fn bench_archive_throughput(pool: PgPool) {
    let env = Env::new(Backend::Standalone, Duration::from_secs(60), &pool).await;
    let mut cfg = tracker_core::testing::config(Backend::Standalone, Duration::from_secs(60));
    cfg.key_prefix = env.store_cfg.key_prefix.clone();
    cfg.shards = 32;
    let store = tracker_core::testing::connect(&cfg).await;
    for chunk in (0..ROWS).collect::<Vec<_>>().chunks(500) {
        join_all(chunk.iter().map(|i| {
            let store = store.clone();
            let env = &env;
            async move {
                let s = format!("s-{}", i % 997);
                let id = env.connect_on(&store, &s, "bench").await;
                store.close(&sid(&s), id).await.unwrap();
            }
        }))
        .await;
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), ROWS as u64);
    let metrics = Metrics::new();
    let started = Instant::now();
    let mut archived = 0;
    while archived < ROWS as u64 {
        let pass = tracker_reaper::archiver::archive_pass(
            &store,
            &pool,
            &metrics,
            &CancellationToken::new(),
        )
        .await;
        assert!(!pass.failed);
        archived += pass.archived;
    }
    let took = started.elapsed();
    assert_eq!(env.history_rows().await, ROWS as i64);
    println!(
        "archive: {ROWS} rows in {took:?} = {:.0} rows/s (batches of {}, 32 shards)",
        ROWS as f64 / took.as_secs_f64(),
        tracker_reaper::archiver::BATCH
    );
}

#[sqlx::test(migrations = "../../migrations")]
#[ignore = "benchmark"]
async fn bench_wake_latency(pool: PgPool) {
    const WAKES: usize = 200;
    let env = Env::new(Backend::Standalone, Duration::from_secs(60), &pool).await;
    let fake = FakeKube::start().await.unwrap();
    for i in 0..WAKES {
        fake.apply_session(
            NS,
            session_json(&format!("w-{i}"), "hibernated", None, false),
        )
        .unwrap();
    }
    let mut cfg = env.kube_config();
    cfg.wake_interval = Duration::from_millis(25); // the default
    let mut reaper = Reaper::start(cfg, env.kube_overrides(&fake)).await;
    reaper.wait_leader(Duration::from_secs(5)).await;
    for i in 0..WAKES {
        eventually(Duration::from_secs(30), "all mirrored", || async {
            (env.state(&format!("w-{i}")).await == Some(SessionState::Hibernated)).then_some(())
        })
        .await;
    }
    let fake = Arc::new(fake);
    let mut latencies = Vec::with_capacity(WAKES);
    for i in 0..WAKES {
        let name = format!("w-{i}");
        let registered = Utc::now();
        env.connect(&name, "bench").await;
        let waited = fake
            .wait_for_requests(
                |r| r.iter().any(|r| r.name.as_deref() == Some(name.as_str())),
                Duration::from_secs(5),
            )
            .await;
        let reqs = match waited {
            Ok(r) => r,
            Err(e) => panic!(
                "wake {i}: {e}; store says {:?}, leader {}, resource {:?}",
                env.state(&name).await,
                reaper.is_leader(),
                fake.session(NS, &name)
            ),
        };
        let patch = reqs
            .iter()
            .find(|r| r.name.as_deref() == Some(name.as_str()))
            .unwrap();
        latencies.push(
            (patch.received_at - registered)
                .to_std()
                .unwrap_or_default(),
        );
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "wake latency (registration -> patch at the API server, {WAKES} wakes, signalled, interval 25 ms): p50 {:?}, p90 {:?}, p99 {:?}, max {:?}",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    reaper.stop().await;
}

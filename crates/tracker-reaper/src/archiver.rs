//! The archive: history outbox (Redis) → `connection_history` (PostgreSQL).
//!
//! Per shard: read up to [`BATCH`] entries, insert them with one idempotent
//! statement, commit, then acknowledge them in the outbox. An entry leaves
//! the outbox only after its row is committed, and a replayed batch inserts
//! nothing twice, so every finished connection ends as exactly one row —
//! across PostgreSQL outages (retried with backoff), leader changes and kills.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{ShardId, Store};

use crate::backoff::Backoff;
use crate::db;
use crate::metrics::{Metrics, Task};

/// Entries per read and per insert.
pub const BATCH: u32 = 500;
/// Shards archived at once: one PostgreSQL connection each (the pool has 4).
pub const CONCURRENCY: usize = 4;
/// The backlog gauge costs a call per shard; refresh it at most this often.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// What one pass over the shards achieved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub archived: u64,
    pub failed: bool,
}

/// Archives until `stop`: passes back to back while there is work, then every
/// `interval` (or when nudged), with backoff while PostgreSQL or Redis fail.
pub async fn run(
    store: Store,
    pool: PgPool,
    mut db_ready: watch::Receiver<bool>,
    interval: Duration,
    metrics: Arc<Metrics>,
    nudge: Arc<Notify>,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        _ = db_ready.wait_for(|ready| *ready) => {}
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut backlog_at: Option<Instant> = None;
    loop {
        let span = tracing::debug_span!("archive_tick", archived = tracing::field::Empty);
        let pass = archive_pass(&store, &pool, &metrics, &stop)
            .instrument(span.clone())
            .await;
        span.record("archived", pass.archived);
        if stop.is_cancelled() {
            return;
        }
        if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
            backlog_at = Some(Instant::now());
            match store.outbox_backlog().await {
                Ok(n) => metrics.archive_backlog.set(n as f64),
                Err(e) => tracing::debug!(error = %e, "reading the archive backlog failed"),
            }
        }
        let pause = if pass.failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            if pass.archived > 0 {
                continue;
            }
            interval
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = nudge.notified(), if !pass.failed => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// One pass over every shard, [`CONCURRENCY`] shards at a time. A failing
/// shard stops its own work; with PostgreSQL down every shard fails the same
/// way and the pass ends after one attempt each.
pub async fn archive_pass(
    store: &Store,
    pool: &PgPool,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Pass {
    let shards = store
        .keys()
        .shards()
        .map(|shard| archive_shard(store, pool, metrics, stop, shard));
    let results: Vec<Pass> = futures::stream::iter(shards)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    results.into_iter().fold(Pass::default(), |a, b| Pass {
        archived: a.archived + b.archived,
        failed: a.failed || b.failed,
    })
}

/// Drains one shard's outbox, batch by batch.
async fn archive_shard(
    store: &Store,
    pool: &PgPool,
    metrics: &Metrics,
    stop: &CancellationToken,
    shard: ShardId,
) -> Pass {
    let mut pass = Pass::default();
    loop {
        if stop.is_cancelled() {
            return pass;
        }
        let entries = match store.outbox_read(shard, BATCH).await {
            Ok(e) => e,
            Err(e) => {
                metrics.store_error(Task::Archive);
                metrics.archive_errors.increment(1);
                tracing::warn!(shard = shard.0, error = %e, "reading the history outbox failed; retrying");
                pass.failed = true;
                return pass;
            }
        };
        if entries.is_empty() {
            return pass;
        }
        let records: Vec<_> = entries.iter().map(|e| e.record.clone()).collect();
        let inserted = match db::insert_history(pool, &records).await {
            Ok(n) => n,
            Err(e) => {
                metrics.archive_errors.increment(1);
                tracing::warn!(shard = shard.0, pending = entries.len(), error = %e, "writing history failed; retrying with backoff");
                pass.failed = true;
                return pass;
            }
        };
        metrics.archived.increment(inserted);
        pass.archived += entries.len() as u64;
        // Before the ack, so a crash between an end and its settling (user
        // slot given back, id retired) is repaired by the replay.
        if let Err(e) = store.settle_archived(&records).await {
            metrics.store_error(Task::Archive);
            tracing::warn!(shard = shard.0, error = %e, "settling archived connections failed; retried with the batch");
            pass.failed = true;
            return pass;
        }
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        if let Err(e) = store.outbox_ack(shard, &ids).await {
            // Committed but not acknowledged: the next pass inserts nothing twice.
            metrics.store_error(Task::Archive);
            tracing::warn!(shard = shard.0, error = %e, "acknowledging archived history failed; it is replayed");
            pass.failed = true;
            return pass;
        }
        if ids.len() < BATCH as usize {
            return pass;
        }
    }
}

//! The sweep: every interval, every shard, expire dead connections in
//! bounded batches until a call says the shard has no more. Expiry moves each
//! connection to its shard's history outbox in the same script, so the
//! archiver (nudged after a productive sweep) finds it there.

use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::Store;

use crate::acting::TermContext;
use crate::metrics::{Metrics, Task};

/// Connections expired per script call: bounds the time Redis is busy.
pub const BATCH: u32 = 1000;

/// Sweeps every `interval` until the term ends.
pub async fn run(ctx: TermContext, interval: Duration) {
    let TermContext {
        store,
        metrics,
        archive_nudge,
        stop,
        ..
    } = ctx;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let span = tracing::debug_span!("sweep_tick", expired = tracing::field::Empty);
        let expired = sweep_all(&store, &metrics, &stop)
            .instrument(span.clone())
            .await;
        span.record("expired", expired);
        if expired > 0 {
            archive_nudge.notify_one();
        }
    }
}

/// One sweep over every shard; answers how many connections expired.
pub async fn sweep_all(store: &Store, metrics: &Metrics, stop: &CancellationToken) -> u64 {
    let started = Instant::now();
    let mut expired = 0u64;
    for shard in store.keys().shards() {
        loop {
            if stop.is_cancelled() {
                return expired;
            }
            match store.sweep_shard(shard, BATCH).await {
                Ok(batch) => {
                    let n = batch.expired.len() as u64;
                    expired += n;
                    metrics.expired.increment(n);
                    for e in &batch.expired {
                        tracing::debug!(session_id = %e.session_id, connection_id = %e.connection_id, "connection expired");
                    }
                    if !batch.more {
                        break;
                    }
                }
                Err(e) => {
                    metrics.store_error(Task::Sweep);
                    tracing::warn!(shard = shard.0, error = %e, "sweeping a shard failed; next tick retries");
                    break;
                }
            }
        }
    }
    metrics.observe_sweep(started.elapsed());
    if expired > 0 {
        tracing::info!(expired, took = ?started.elapsed(), "sweep expired connections");
    }
    expired
}

//! The archive: history outbox (Redis) → `connection_history` (PostgreSQL).
//!
//! Per shard: read up to [`BATCH`] entries, insert them with one idempotent
//! statement, commit, then acknowledge them in the outbox. An entry leaves
//! the outbox only after its row is committed, and a replayed batch inserts
//! nothing twice, so every finished connection ends as exactly one row —
//! across PostgreSQL outages (retried with backoff), leader changes and kills.
//!
//! An entry that can never become a row must not stop its shard: when
//! PostgreSQL refuses a batch for its data, the batch is split in halves until
//! the refused entries stand alone; those, entries whose connection id already
//! has another connection's row, and entries that are not history records go
//! to `connection_history_rejects` (see [`db::insert_rejects`]) and are then
//! acknowledged like the rest. A failure that is not the data's (PostgreSQL
//! down, a timeout) still acknowledges nothing and is retried.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{HistoryRecord, MalformedEntry, OutboxRead, ShardId, Signal, Store};

use crate::acting::TermContext;
use crate::backoff::Backoff;
use crate::db::{self, Reject};
use crate::metrics::{Metrics, RejectReason, Task};
use crate::signals;
use crate::Result;

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

/// Without any signal every shard is read every this many intervals anyway
/// (10 s at the default 250 ms interval).
pub const BACKSTOP_POLLS: u32 = 40;

/// Shards whose outbox was signalled since the archiver last took them.
#[derive(Debug, Default)]
struct Signalled {
    shards: Mutex<BTreeSet<ShardId>>,
    notify: Notify,
}

impl Signalled {
    fn add(&self, shard: ShardId) {
        self.shards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(shard);
        self.notify.notify_one();
    }

    fn take(&self) -> BTreeSet<ShardId> {
        std::mem::take(&mut *self.shards.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// What the next pass reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every shard: the first pass, the backstop, a retry, a nudge.
    All,
    /// The shards signalled since the last pass.
    Signalled,
}

/// Archives until the term ends. History is pushed, not polled: the script
/// that appends to a shard's outbox also signals it, and the archiver drains
/// the signalled shards at once. Every shard is read at the start of the
/// term, when the sweep nudges, and every [`BACKSTOP_POLLS`] `interval`s in
/// case a signal was lost (a listener reconnecting, a failover). While
/// PostgreSQL or Redis fail, whole passes are retried with backoff.
pub async fn run(ctx: TermContext, interval: Duration) {
    let TermContext {
        store,
        pool,
        mut db_ready,
        metrics,
        archive_nudge: nudge,
        stop,
        ..
    } = ctx;
    tokio::select! {
        () = stop.cancelled() => return,
        _ = db_ready.wait_for(|ready| *ready) => {}
    }
    let signalled = Arc::new(Signalled::default());
    let on_signal = {
        let signalled = signalled.clone();
        move |shard| signalled.add(shard)
    };
    let listeners = signals::spawn_listeners(&store, Signal::Archive, on_signal, &stop);
    let backstop = interval * BACKSTOP_POLLS;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut backlog_at: Option<Instant> = None;
    let mut scope = Scope::All;
    loop {
        let shards: Vec<ShardId> = match scope {
            Scope::All => {
                signalled.take();
                store.keys().shards().collect()
            }
            Scope::Signalled => signalled.take().into_iter().collect(),
        };
        let span = tracing::debug_span!(
            "archive_tick",
            shards = shards.len(),
            archived = tracing::field::Empty
        );
        let pass = archive_shards(&store, &pool, &metrics, &stop, shards.iter().copied())
            .instrument(span.clone())
            .await;
        span.record("archived", pass.archived);
        if stop.is_cancelled() {
            break;
        }
        // The backlog gauge costs a call per shard. A pass that drained every
        // shard knows it without them; only while archiving fails does the
        // backlog grow, and then it is read (at most every BACKLOG_EVERY).
        if pass.failed {
            if backlog_at.is_none_or(|at| at.elapsed() >= BACKLOG_EVERY) {
                backlog_at = Some(Instant::now());
                match store.outbox_backlog().await {
                    Ok(n) => metrics.archive_backlog.set(n as f64),
                    Err(e) => tracing::debug!(error = %e, "reading the archive backlog failed"),
                }
            }
        } else if scope == Scope::All {
            metrics.archive_backlog.set(0.0);
        }
        let pause = if pass.failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            backstop
        };
        scope = tokio::select! {
            () = stop.cancelled() => break,
            () = nudge.notified(), if !pass.failed => Scope::All,
            () = signalled.notify.notified(), if !pass.failed => Scope::Signalled,
            () = tokio::time::sleep(pause) => Scope::All,
        };
    }
    for listener in listeners {
        // They stop with `stop`; waiting keeps their connections from outliving the term.
        let _ = listener.await;
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
    archive_shards(store, pool, metrics, stop, store.keys().shards()).await
}

/// One pass over `shards`, like [`archive_pass`].
pub async fn archive_shards(
    store: &Store,
    pool: &PgPool,
    metrics: &Metrics,
    stop: &CancellationToken,
    shards: impl IntoIterator<Item = ShardId>,
) -> Pass {
    let shards = shards
        .into_iter()
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
        let read = match store.outbox_read_all(shard, BATCH).await {
            Ok(r) => r,
            Err(e) => {
                metrics.store_error(Task::Archive);
                metrics.archive_errors.increment(1);
                tracing::warn!(shard = shard.0, error = %e, "reading the history outbox failed; retrying");
                pass.failed = true;
                return pass;
            }
        };
        let ids: Vec<String> = read
            .entries
            .iter()
            .map(|e| e.id.clone())
            .chain(read.malformed.iter().map(|m| m.id.clone()))
            .collect();
        if ids.is_empty() {
            return pass;
        }
        let records: Vec<_> = read.entries.iter().map(|e| e.record.clone()).collect();
        let written = match archive_batch(pool, shard, read).await {
            Ok(w) => w,
            Err(e) => {
                metrics.archive_errors.increment(1);
                tracing::warn!(shard = shard.0, pending = ids.len(), error = %e, "writing history failed; retrying with backoff");
                pass.failed = true;
                return pass;
            }
        };
        metrics.archived.increment(written.inserted);
        // Counted and logged when first recorded, not again on a replay.
        for r in written.rejects.iter().filter(|r| r.new) {
            metrics.history_rejected(r.reason);
            tracing::warn!(
                shard = shard.0,
                entry = %r.entry_id,
                connection_id = ?r.reject.connection_id,
                reason = r.reason.as_str(),
                error = %r.reject.error,
                "history entry set aside in connection_history_rejects"
            );
        }
        pass.archived += ids.len() as u64;
        // Before the ack, so a crash between an end and its settling (user
        // slot given back, id retired) is repaired by the replay.
        if let Err(e) = store.settle_archived(&records).await {
            metrics.store_error(Task::Archive);
            tracing::warn!(shard = shard.0, error = %e, "settling archived connections failed; retried with the batch");
            pass.failed = true;
            return pass;
        }
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

/// What [`archive_batch`] committed for one outbox read.
#[derive(Debug, Default)]
pub struct BatchWrite {
    /// History rows newly written.
    pub inserted: u64,
    /// Every entry set aside, recorded in `connection_history_rejects`.
    pub rejects: Vec<SetAside>,
}

/// One entry of a batch set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub entry_id: String,
    pub reason: RejectReason,
    pub reject: Reject,
    /// Recorded by this call (false: already there, from a replayed batch).
    pub new: bool,
}

/// Writes one outbox read: the history rows that PostgreSQL takes, and a
/// reject for every other entry. On success every entry of `read` may be
/// acknowledged; on error none may (nothing is lost, a replay is harmless).
pub async fn archive_batch(pool: &PgPool, shard: ShardId, read: OutboxRead) -> Result<BatchWrite> {
    let OutboxRead { entries, malformed } = read;
    let mut out = BatchWrite::default();
    let mut rejects: Vec<(String, RejectReason, Reject)> = malformed
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                RejectReason::Malformed,
                malformed_reject(shard, m),
            )
        })
        .collect();
    let (ids, records): (Vec<String>, Vec<_>) =
        entries.into_iter().map(|e| (e.id, e.record)).unzip();
    // Ranges of the batch still to write, first half on top. A refused range
    // is split; a refused single entry is set aside. At most 2n - 1 statements
    // for n entries, and one when nothing is refused.
    let mut todo = Vec::new();
    todo.push(0..records.len());
    while let Some(range) = todo.pop() {
        if range.is_empty() {
            continue;
        }
        match db::insert_history(pool, &records[range.clone()]).await {
            Ok(w) => {
                out.inserted += w.inserted;
                for (i, existing) in w.reused {
                    let i = range.start + i;
                    let error = format!(
                        "connection_id already archived for another connection \
                         (session {}, user {}, connected_at {})",
                        existing.session_id,
                        existing.user_id,
                        tracker_core::domain::rfc3339_ms::format(&existing.connected_at),
                    );
                    rejects.push((
                        ids[i].clone(),
                        RejectReason::ReusedId,
                        record_reject(shard, &ids[i], &records[i], error),
                    ));
                }
            }
            Err(e) => {
                let Some(refusal) = e.refused_data() else {
                    return Err(e);
                };
                if range.len() == 1 {
                    let i = range.start;
                    rejects.push((
                        ids[i].clone(),
                        RejectReason::Refused,
                        record_reject(shard, &ids[i], &records[i], refusal.to_string()),
                    ));
                } else {
                    tracing::debug!(shard = shard.0, entries = range.len(), error = %refusal, "history batch refused; isolating the refused entries");
                    let mid = range.start + range.len() / 2;
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
            }
        }
    }
    let only: Vec<Reject> = rejects.iter().map(|(_, _, r)| r.clone()).collect();
    let new = db::insert_rejects(pool, &only).await?;
    out.rejects = rejects
        .into_iter()
        .zip(new)
        .map(|((entry_id, reason, reject), new)| SetAside {
            entry_id,
            reason,
            reject,
            new,
        })
        .collect();
    Ok(out)
}

/// The reject of a history record: the entry as JSON, which escapes control
/// characters, so the payload is storable whatever the record holds.
fn record_reject(shard: ShardId, id: &str, record: &HistoryRecord, error: String) -> Reject {
    let payload = serde_json::json!({
        "shard": shard.0,
        "entry_id": id,
        "record": record,
    });
    Reject {
        connection_id: Some(record.connection_id.as_uuid()),
        payload: payload.to_string(),
        error,
    }
}

/// The reject of an entry that is not a history record: its raw fields.
fn malformed_reject(shard: ShardId, m: &MalformedEntry) -> Reject {
    let fields: serde_json::Map<String, serde_json::Value> = m
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
        .collect();
    let payload = serde_json::json!({
        "shard": shard.0,
        "entry_id": m.id,
        "fields": fields,
    });
    let connection_id = m
        .fields
        .iter()
        .find(|(k, _)| k == "c")
        .and_then(|(_, v)| v.parse().ok());
    Reject {
        connection_id,
        payload: payload.to_string(),
        error: format!(
            "not a history record: field {:?} missing or unparseable",
            m.field
        ),
    }
}

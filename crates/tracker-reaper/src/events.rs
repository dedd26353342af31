//! The session event queue: deciders hand events over without waiting for
//! PostgreSQL; one writer inserts them in batches and retries while the
//! database is down, so a PostgreSQL outage never stalls a wake.
//!
//! The queue lives in memory: events still queued when the process is killed
//! are lost (the Session change they describe is not). It is bounded; when
//! full, new events are dropped and counted.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::db::{self, EventType, SessionEvent};
use crate::metrics::Metrics;

const QUEUE: usize = 10_000;
const BATCH: usize = 500;
/// How long a stopping writer keeps trying to flush what is queued.
const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// Hands events to the writer.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: mpsc::Sender<SessionEvent>,
    namespace: Arc<str>,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// A sink and the receiving end for [`run_writer`].
    pub fn new(namespace: &str, metrics: Arc<Metrics>) -> (Self, mpsc::Receiver<SessionEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx,
                namespace: namespace.into(),
                metrics,
            },
            rx,
        )
    }

    /// Queues an event that happened now.
    pub fn record(
        &self,
        session_id: &str,
        event_type: EventType,
        reason: &str,
        details: serde_json::Value,
    ) {
        let event = SessionEvent {
            event_id: Uuid::new_v4(),
            session_id: session_id.to_owned(),
            namespace: self.namespace.to_string(),
            event_type,
            reason: reason.to_owned(),
            occurred_at: Utc::now(),
            details,
        };
        if self.tx.try_send(event).is_err() {
            self.metrics.events_dropped.increment(1);
            tracing::error!(
                session_id,
                event_type = event_type.as_str(),
                "session event queue full or closed; event dropped"
            );
        }
    }
}

/// Inserts queued events until `shutdown`, then flushes for a few seconds.
/// Waits for `db_ready` (migrations applied) before the first insert.
pub async fn run_writer(
    mut rx: mpsc::Receiver<SessionEvent>,
    pool: PgPool,
    mut db_ready: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<SessionEvent> = Vec::new();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        if batch.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                got = rx.recv_many(&mut batch, BATCH) => if got == 0 { break },
            }
        }
        if !*db_ready.borrow() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = db_ready.wait_for(|ready| *ready) => {}
            }
        }
        match db::insert_events(&pool, &batch).await {
            Ok(n) => {
                metrics.events_written.increment(n);
                batch.clear();
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!(error = %e, queued = batch.len(), "writing session events failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    // Stopping: what is queued is written if PostgreSQL answers soon.
    rx.close();
    while let Ok(e) = rx.try_recv() {
        batch.push(e);
    }
    if batch.is_empty() || !*db_ready.borrow() {
        if !batch.is_empty() {
            tracing::error!(
                lost = batch.len(),
                "session events not written before shutdown"
            );
        }
        return;
    }
    let flush = async {
        for chunk in batch.chunks(BATCH) {
            db::insert_events(&pool, chunk).await?;
        }
        Ok::<_, crate::Error>(())
    };
    match tokio::time::timeout(FLUSH_DEADLINE, flush).await {
        Ok(Ok(())) => metrics.events_written.increment(batch.len() as u64),
        Ok(Err(e)) => {
            tracing::error!(error = %e, lost = batch.len(), "session events not written before shutdown")
        }
        Err(_) => tracing::error!(
            lost = batch.len(),
            "session events not written before shutdown"
        ),
    }
}

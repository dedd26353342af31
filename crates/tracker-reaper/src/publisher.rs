//! Session events to NATS: the outbox in Redis and its publisher.
//!
//! An event is written to its shard's event outbox (a Redis stream) by the
//! same script as the change it announces: on `docker` the hibernation claim
//! queues the hibernate event, the wake announcement the wake event. The
//! publisher, a subsystem of the leader, reads each shard's outbox in order,
//! publishes each event through JetStream and waits for the acknowledgement;
//! only then does `event_ack` drop the entry and, on `docker`, complete the
//! change (the session counts as hibernated or woken once NATS has the event).
//!
//! Nothing is lost and nothing doubles:
//! - NATS down: entries wait in Redis; the publisher retries with backoff,
//!   oldest first, stopping at the first failure so a controller receives a
//!   session's events in the order they were decided.
//! - Acknowledgement lost after the publication landed: the entry is still
//!   there and is published again with the same `event_id` as `Nats-Msg-Id`;
//!   JetStream drops the copy (duplicate window [`crate::nats::DUPLICATE_WINDOW`]).
//! - Leader change between the outbox write and the acknowledgement: the
//!   entry survives in Redis, the new leader publishes it (same id), and
//!   `event_ack` carries the new term, so a replaced leader's late
//!   acknowledgement is refused.
//!
//! On `kubernetes` (with `TRACKER_NATS_URL`) events announce a patch already
//! made: the script that records the patch (finish_hibernation, ack_wake)
//! queues its event, which completes nothing; NATS never holds a change up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument;
use tracker_core::{Announcement, EventAck, EventKind, QueuedEvent};

use crate::acting::TermContext;
use crate::backoff::Backoff;
use crate::db::EventType;
use crate::metrics::{HibernationResult, NatsFailure, Task, WakeResult};
use crate::nats::{Nats, PublishError};

/// Events read per shard and pass.
pub const BATCH: u32 = 100;

/// Without a nudge the outboxes are read this often anyway. Whatever queues
/// an event nudges the publisher, so this only serves a new leader's first
/// look and a nudge lost to a crash; it keeps an idle publisher cheap.
pub const BACKSTOP: Duration = Duration::from_secs(5);

/// Makes the announcements the scripts queue, and wakes the publisher after;
/// cheap to clone. Disabled without `TRACKER_NATS_URL`: then it announces
/// nothing ([`Announcer::announcement_if_enabled`]).
#[derive(Debug, Clone)]
pub struct Announcer {
    platform: &'static str,
    enabled: bool,
    nudge: Arc<Notify>,
}

impl Announcer {
    pub fn new(platform: &'static str, enabled: bool) -> Self {
        Self {
            platform,
            enabled,
            nudge: Arc::new(Notify::new()),
        }
    }

    /// Whether events are published at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The platform events name (`docker`, `kubernetes`, `none`).
    pub fn platform(&self) -> &'static str {
        self.platform
    }

    /// A fresh announcement of this platform.
    pub fn announcement(&self, reason: &str) -> Announcement {
        Announcement::new(self.platform, reason)
    }

    /// [`Self::announcement`] where events are published at all; `None` without NATS.
    pub fn announcement_if_enabled(&self, reason: &str) -> Option<Announcement> {
        self.enabled.then(|| self.announcement(reason))
    }

    /// Tells the publisher that something was queued.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    pub(crate) fn nudged(&self) -> Arc<Notify> {
        self.nudge.clone()
    }
}

/// Publishes every shard's outbox until the term ends: at once when nudged,
/// else every `interval` ([`BACKSTOP`] in the reaper).
pub async fn run(ctx: TermContext, nats: Nats, interval: Duration) {
    let nudge = ctx.announcer.nudged();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut stream_ready = false;
    let mut healthy = true;
    loop {
        if ctx.stop.is_cancelled() {
            return;
        }
        let pass = async {
            if !stream_ready {
                match nats.ensure_stream().await {
                    Ok(name) => {
                        tracing::info!(stream = %name, "session events go to this JetStream stream");
                        stream_ready = true;
                    }
                    Err(e) => {
                        ctx.metrics.nats_failure(NatsFailure::Stream);
                        return Pass::Failed(e.to_string());
                    }
                }
            }
            publish_pass(&ctx, &nats).await
        };
        let outcome = pass.instrument(tracing::debug_span!("publish_pass")).await;
        if let Ok(n) = ctx.store.events_backlog().await {
            ctx.metrics.nats_outbox.set(n as f64);
        }
        let pause = match outcome {
            Pass::Fenced => return,
            Pass::More => {
                backoff.reset();
                healthy = true;
                Duration::ZERO
            }
            Pass::Done => {
                if !healthy {
                    tracing::info!("publishing session events to NATS again");
                }
                backoff.reset();
                healthy = true;
                interval
            }
            Pass::Failed(error) => {
                let delay = backoff.next_delay();
                if healthy {
                    tracing::warn!(%error, retry_in = ?delay, "publishing session events to NATS failed; they wait in Redis");
                } else {
                    tracing::debug!(%error, retry_in = ?delay, "publishing session events still fails");
                }
                healthy = false;
                delay
            }
        };
        if pause.is_zero() {
            continue;
        }
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = nudge.notified(), if healthy => {}
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// What one pass over every shard did.
#[derive(Debug)]
enum Pass {
    /// Every outbox is empty (or was, when read).
    Done,
    /// A shard had a full batch: read again at once.
    More,
    /// A publication or a read failed: back off.
    Failed(String),
    /// A newer leader wrote to the store: the term ends.
    Fenced,
}

async fn publish_pass(ctx: &TermContext, nats: &Nats) -> Pass {
    let mut more = false;
    for shard in ctx.store.keys().shards() {
        if ctx.stop.is_cancelled() {
            return Pass::Done;
        }
        let read = match ctx.store.events_read(shard, BATCH).await {
            Ok(read) => read,
            Err(e) => {
                ctx.metrics.store_error(Task::Publish);
                return Pass::Failed(e.to_string());
            }
        };
        if !read.malformed.is_empty() {
            tracing::error!(shard = shard.0, entries = ?read.malformed, "event outbox entries that are not events; dropped");
            if let Err(e) = ctx.store.events_drop(shard, &read.malformed).await {
                ctx.metrics.store_error(Task::Publish);
                return Pass::Failed(e.to_string());
            }
        }
        more |= read.events.len() + read.malformed.len() >= BATCH as usize;
        for event in &read.events {
            let span = tracing::info_span!("publish", session_id = %event.session_id, event_id = %event.event_id, kind = event.kind.as_str());
            match publish_one(ctx, nats, event).instrument(span).await {
                Ok(()) => {}
                Err(PassStop::Fenced) => return Pass::Fenced,
                // Keep the shard's order: nothing after a failed event goes first.
                Err(PassStop::Failed(e)) => return Pass::Failed(e),
            }
        }
    }
    if more {
        Pass::More
    } else {
        Pass::Done
    }
}

enum PassStop {
    Fenced,
    Failed(String),
}

async fn publish_one(ctx: &TermContext, nats: &Nats, event: &QueuedEvent) -> Result<(), PassStop> {
    match nats.publish(event).await {
        Ok(duplicate) => {
            if duplicate {
                tracing::debug!("NATS had the event already (an earlier acknowledgement was lost)");
            }
        }
        Err(e) => {
            ctx.metrics.nats_failure(match e {
                PublishError::Timeout(_) => NatsFailure::Timeout,
                PublishError::Nats(_) => NatsFailure::Error,
            });
            return Err(PassStop::Failed(e.to_string()));
        }
    }
    ctx.metrics.nats_published(event.kind);
    let ack = ctx.store.event_ack(event, ctx.fence.term()).await;
    match ack {
        Ok(EventAck::Fenced) => {
            ctx.fence.fenced("event_ack");
            Err(PassStop::Fenced)
        }
        Ok(EventAck::Applied) => {
            completed(ctx, event);
            Ok(())
        }
        Ok(EventAck::Noted | EventAck::Gone) => {
            if event.completes {
                tracing::info!(
                    "event acknowledged; the session changed meanwhile, its state is kept"
                );
            }
            Ok(())
        }
        Err(e) => {
            // Published but still queued: the next pass publishes it again
            // (same id, dropped by NATS as a duplicate) and acknowledges it.
            ctx.metrics.store_error(Task::Publish);
            Err(PassStop::Failed(e.to_string()))
        }
    }
}

/// A docker change completed by NATS's acknowledgement: recorded like a
/// patched Session.
fn completed(ctx: &TermContext, event: &QueuedEvent) {
    let details = serde_json::json!({
        "platform": event.platform,
        "event_id": event.event_id,
        "term": ctx.fence.term().0,
        "decided_at": tracker_core::domain::rfc3339_ms::format(&event.timestamp),
    });
    match event.kind {
        EventKind::Hibernate => {
            ctx.events.record(
                event.session_id.as_str(),
                EventType::Hibernated,
                &event.reason,
                details,
            );
            ctx.metrics.hibernation(HibernationResult::Hibernated);
            tracing::info!("Session hibernated (NATS acknowledged the event)");
        }
        EventKind::Wake => {
            let latency = (chrono::Utc::now() - event.timestamp)
                .to_std()
                .unwrap_or_default();
            ctx.metrics.wake_latency.record(latency.as_secs_f64());
            ctx.events.record(
                event.session_id.as_str(),
                EventType::Woken,
                &event.reason,
                details,
            );
            ctx.metrics.wake(WakeResult::Woken);
            tracing::info!(latency = ?latency, "Session woken (NATS acknowledged the event)");
        }
        EventKind::Warning => {}
    }
}

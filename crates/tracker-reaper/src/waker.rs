//! The waker: reads every shard's pending wakes (a registration on a
//! hibernated or hibernating session records one, once) and patches each
//! Session `spec.state: running`, then acknowledges the wake and records a
//! `woken` event.
//!
//! Wakes are pushed, not polled: the script that records a wake also signals
//! its shard, and listeners blocked on those signals (dedicated connections,
//! see `tracker_core::WakeListener`) start a read at once. An idle waker so
//! costs one blocking call per listener every [`SIGNAL_WAIT`], plus a backstop
//! read of every shard every [`BACKSTOP_POLLS`] intervals, which serves a wake
//! whose signal was lost (a listener reconnecting, a failover). Wakes that
//! wait for something (a hibernation in flight, a conflict, a retry delay)
//! are read again after the interval or their delay.
//!
//! Each wake leads to one patch: the patch is conditional on the
//! resourceVersion read just before, the acknowledgement follows it, and a
//! resource found `running` already is acknowledged without a patch. A
//! session whose hibernation is still in flight is left for the next read
//! (see [`InFlight`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{
    EventKind, PendingWake, ResourceState, SessionId, Signal, Store, WakeAnnounce, Written,
};

use crate::acting::{Acting, Fence, InFlight, TermContext};
use crate::backoff;
use crate::db::EventType;
use crate::error::Error;
use crate::events::EventSink;
use crate::metrics::{KubeOp, Metrics, Task, WakeResult};
use crate::platform::SessionApi;
use crate::publisher::Announcer;
use crate::session::{resource_state, session_meta, Session};

/// Pending wakes read per shard and poll.
pub const BATCH: u32 = 100;

pub use crate::signals::SIGNAL_WAIT;

/// Without any signal every shard is read every this many intervals anyway
/// (5 s at the default 25 ms interval).
pub const BACKSTOP_POLLS: u32 = 200;

/// Retry delay after `failures` failed attempts: 100 ms doubling to 30 s.
pub fn retry_after_failure(failures: u32) -> Duration {
    backoff::delay(
        Duration::from_millis(100),
        Duration::from_secs(30),
        failures.saturating_sub(1),
    )
}

/// What the resource says about a pending wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeAction {
    /// Hibernated: patch it running.
    Patch,
    /// Running already (a rolled-back hibernation, someone else woke it): acknowledge.
    Acknowledge,
    /// Terminated (never woken) or in a state we do not know: let the mirror decide.
    Mirror,
}

/// Decides from `spec.state`.
pub fn wake_action(state: Option<ResourceState>) -> WakeAction {
    match state {
        Some(ResourceState::Hibernated) => WakeAction::Patch,
        Some(ResourceState::Running) => WakeAction::Acknowledge,
        Some(ResourceState::Terminated) | None => WakeAction::Mirror,
    }
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    failures: u32,
    not_before: Instant,
}

/// The waker of one leadership term.
#[derive(Debug)]
pub struct Waker {
    store: Store,
    acting: Acting,
    events: EventSink,
    announcer: Announcer,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    fence: Fence,
    default_idle: Duration,
    interval: Duration,
    retries: HashMap<SessionId, Retry>,
    /// Dry run leaves wakes pending; each is recorded once.
    dry_run_seen: HashSet<(SessionId, i64)>,
    /// Whether the last poll could read Redis: failures are logged once per outage.
    healthy: bool,
}

impl Waker {
    pub fn new(ctx: TermContext, default_idle: Duration, interval: Duration) -> Self {
        let TermContext {
            store,
            acting,
            events,
            announcer,
            metrics,
            in_flight,
            fence,
            ..
        } = ctx;
        Self {
            store,
            acting,
            events,
            announcer,
            metrics,
            in_flight,
            fence,
            default_idle,
            interval,
            retries: HashMap::new(),
            dry_run_seen: HashSet::new(),
            healthy: true,
        }
    }

    /// Reads and serves pending wakes until `stop`: when signalled, when a
    /// waiting wake is due again, and at the backstop period.
    pub async fn run(mut self, stop: CancellationToken) {
        let signal = Arc::new(Notify::new());
        let notify = signal.clone();
        let listeners = crate::signals::spawn_listeners(
            &self.store,
            Signal::Wake,
            move |_| notify.notify_one(),
            &stop,
        );
        let backstop = self.interval * BACKSTOP_POLLS;
        loop {
            let again = self.poll(&stop).await;
            let pause = again.map_or(backstop, |at| {
                at.saturating_duration_since(Instant::now()).min(backstop)
            });
            tokio::select! {
                () = stop.cancelled() => break,
                () = signal.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        for listener in listeners {
            // They stop with `stop`; waiting keeps their connections from outliving the term.
            let _ = listener.await;
        }
    }

    /// One read over every shard, and the wakes served. Answers when to read
    /// again although no signal comes: some wakes wait (in flight, conflict,
    /// retry delay) or the read failed; `None` when nothing waits.
    pub async fn poll(&mut self, stop: &CancellationToken) -> Option<Instant> {
        let reads = self
            .store
            .keys()
            .shards()
            .map(|shard| self.store.pending_wakes(shard, BATCH));
        let mut pending = Vec::new();
        let mut failed = None;
        for r in join_all(reads).await {
            match r {
                Ok(w) => pending.extend(w),
                Err(e) => failed = Some(e),
            }
        }
        let soon = Instant::now() + self.interval;
        let mut again = None;
        match failed {
            Some(e) => {
                self.metrics.store_error(Task::Wake);
                if self.healthy {
                    tracing::warn!(error = %e, "reading pending wakes failed; retrying every interval");
                }
                self.healthy = false;
                again = Some(soon);
            }
            None => self.healthy = true,
        }
        let ids: HashSet<&SessionId> = pending.iter().map(|w| &w.session_id).collect();
        self.retries.retain(|id, _| ids.contains(id));
        self.dry_run_seen.retain(|(id, _)| ids.contains(id));
        let now = Instant::now();
        for wake in &pending {
            if stop.is_cancelled() {
                return None;
            }
            if self.in_flight.contains(&wake.session_id) {
                continue;
            }
            if self
                .retries
                .get(&wake.session_id)
                .is_some_and(|r| r.not_before > now)
            {
                continue;
            }
            let span = tracing::info_span!("wake", session_id = %wake.session_id);
            self.wake_one(wake).instrument(span).await;
        }
        for wake in &pending {
            let dry_run_recorded = self.dry_run_seen.contains(&(
                wake.session_id.clone(),
                wake.requested_at.timestamp_millis(),
            ));
            let at = match self.retries.get(&wake.session_id) {
                Some(r) => r.not_before.max(soon),
                // Recorded once; it stays pending by design.
                None if dry_run_recorded => continue,
                // Served (read again to see it gone), or waiting for a
                // hibernation in flight or after a conflict.
                None => soon,
            };
            again = Some(again.map_or(at, |a: Instant| a.min(at)));
        }
        again
    }

    async fn wake_one(&mut self, wake: &PendingWake) {
        let id = &wake.session_id;
        match self.acting.clone() {
            Acting::DryRun => {
                let key = (id.clone(), wake.requested_at.timestamp_millis());
                if self.dry_run_seen.insert(key) {
                    self.events.record(
                        id.as_str(),
                        EventType::DryRunWake,
                        "connection",
                        self.details(wake, None, None),
                    );
                    self.metrics.wake(WakeResult::DryRun);
                    tracing::info!("would wake (dry run)");
                }
            }
            Acting::RecordOnly => self.acknowledge(wake, None, None, true).await,
            Acting::Patch(api) => self.patch(api.as_ref(), wake).await,
            Acting::Announce => self.announce(wake).await,
        }
    }

    /// Docker: the wake event is queued once; NATS's acknowledgement wakes
    /// the session (see [`crate::publisher`]).
    async fn announce(&mut self, wake: &PendingWake) {
        let id = &wake.session_id;
        let event = self.announcer.announcement("connection");
        match self
            .store
            .announce_wake(id, self.fence.term(), &event)
            .await
        {
            Ok(WakeAnnounce::Fenced) => self.fence.fenced("announce_wake"),
            Ok(WakeAnnounce::Queued) => {
                self.retries.remove(id);
                self.announcer.nudge();
                tracing::info!(event_id = %event.event_id, "wake announced; waiting for NATS");
            }
            Ok(WakeAnnounce::AlreadyRunning) => {
                self.retries.remove(id);
                self.metrics.wake(WakeResult::AlreadyRunning);
                tracing::info!("Session running already; wake acknowledged");
            }
            Ok(WakeAnnounce::Nothing) => {
                self.retries.remove(id);
                tracing::debug!("no wake to announce");
            }
            Err(e) => self.store_failed(id, &e.into()),
        }
    }

    async fn patch(&mut self, api: &dyn SessionApi, wake: &PendingWake) {
        let id = &wake.session_id;
        let current = match api.get(id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Deleted: nothing to wake; forgetting drops the pending wake.
                match self.store.forget_session(id, self.fence.term(), None).await {
                    Ok(Written::Fenced) => {
                        self.fence.fenced("forget_session");
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.store_failed(id, &e.into());
                        return;
                    }
                }
                self.metrics.wake(WakeResult::Dropped);
                tracing::info!("Session gone; wake dropped");
                return;
            }
            Err(e) => {
                self.metrics.kube_error(KubeOp::GetSession);
                self.kube_failed(id, &e);
                return;
            }
        };
        match wake_action(resource_state(&current)) {
            WakeAction::Patch => {
                let rv = current
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default();
                match api.set_state(id, &rv, ResourceState::Running).await {
                    Ok(patched) => {
                        let uid = patched.metadata.uid.as_deref();
                        self.acknowledge(wake, uid, patched.metadata.generation, true)
                            .await
                    }
                    Err(e) if e.is_conflict() => {
                        // Changed since our read: read again at the next poll.
                        self.metrics.wake(WakeResult::Conflict);
                        tracing::debug!("Session changed while waking; retried");
                    }
                    Err(e) => {
                        self.metrics.kube_error(KubeOp::PatchSession);
                        self.kube_failed(id, &e);
                    }
                }
            }
            WakeAction::Acknowledge => {
                let uid = current.metadata.uid.as_deref();
                self.acknowledge(wake, uid, current.metadata.generation, false)
                    .await
            }
            WakeAction::Mirror => self.mirror(wake, &current).await,
        }
    }

    /// The resource is running (patched by us if `patched`): the wake is done.
    async fn acknowledge(
        &mut self,
        wake: &PendingWake,
        uid: Option<&str>,
        generation: Option<i64>,
        patched: bool,
    ) {
        let id = &wake.session_id;
        match self
            .store
            .ack_wake(id, self.fence.term(), uid, generation)
            .await
        {
            Ok(Written::Fenced) => {
                self.fence.fenced("ack_wake");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                // Next poll finds it running and acknowledges without another patch.
                self.store_failed(id, &e.into());
                return;
            }
        }
        self.retries.remove(id);
        if patched {
            let latency = (Utc::now() - wake.requested_at)
                .to_std()
                .unwrap_or_default();
            self.metrics.wake_latency.record(latency.as_secs_f64());
            self.events.record(
                id.as_str(),
                EventType::Woken,
                "connection",
                self.details(wake, uid, generation),
            );
            self.metrics.wake(WakeResult::Woken);
            tracing::info!(latency = ?latency, "Session woken");
            self.announcer
                .announce_done(id, EventKind::Wake, "connection")
                .await;
        } else {
            self.metrics.wake(WakeResult::AlreadyRunning);
            tracing::info!("Session already running; wake acknowledged");
        }
    }

    /// Terminated or unknown state: the resource's own state goes to the store,
    /// which drops the wake of a terminated session.
    async fn mirror(&mut self, wake: &PendingWake, current: &Session) {
        let id = &wake.session_id;
        match session_meta(current, self.default_idle) {
            Ok(meta) => match self.store.mirror_session(&meta, self.fence.term()).await {
                Ok(Written::Fenced) => self.fence.fenced("mirror_session"),
                Ok(written) => {
                    if written == Written::Noop {
                        // The store knows a newer generation; look again later.
                        self.back_off(id);
                    }
                    self.metrics.wake(WakeResult::Dropped);
                    tracing::info!(
                        state = meta.state.as_str(),
                        "Session not hibernated; wake left to its state"
                    );
                }
                Err(e) => self.store_failed(id, &e.into()),
            },
            Err(e) => {
                self.metrics.wake(WakeResult::Failed);
                tracing::warn!(error = %e, "Session cannot be woken");
                self.back_off(id);
            }
        }
    }

    fn details(
        &self,
        wake: &PendingWake,
        uid: Option<&str>,
        generation: Option<i64>,
    ) -> serde_json::Value {
        serde_json::json!({
            "platform": self.acting.platform(),
            "requested_at": tracker_core::domain::rfc3339_ms::format(&wake.requested_at),
            "session_uid": uid,
            "generation": generation,
            "reasons": tracker_core::explain::wake_reasons(wake.requested_at, Utc::now()),
        })
    }

    fn kube_failed(&mut self, id: &SessionId, e: &Error) {
        self.metrics.wake(WakeResult::Failed);
        let retry = self.back_off(id);
        tracing::warn!(error = %e, retry_in = ?retry, "waking failed");
    }

    fn store_failed(&mut self, id: &SessionId, e: &Error) {
        self.metrics.store_error(Task::Wake);
        self.metrics.wake(WakeResult::Failed);
        let retry = self.back_off(id);
        tracing::warn!(error = %e, retry_in = ?retry, "recording a wake failed");
    }

    fn back_off(&mut self, id: &SessionId) -> Duration {
        let r = self.retries.entry(id.clone()).or_insert(Retry {
            failures: 0,
            not_before: Instant::now(),
        });
        r.failures += 1;
        let delay = retry_after_failure(r.failures);
        r.not_before = Instant::now() + delay;
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hibernated_sessions_are_patched() {
        assert_eq!(
            wake_action(Some(ResourceState::Hibernated)),
            WakeAction::Patch
        );
        assert_eq!(
            wake_action(Some(ResourceState::Running)),
            WakeAction::Acknowledge
        );
        assert_eq!(
            wake_action(Some(ResourceState::Terminated)),
            WakeAction::Mirror
        );
        assert_eq!(wake_action(None), WakeAction::Mirror);
    }

    #[test]
    fn failed_wakes_back_off_quickly_then_slowly() {
        assert_eq!(retry_after_failure(1), Duration::from_millis(100));
        assert_eq!(retry_after_failure(2), Duration::from_millis(200));
        assert_eq!(retry_after_failure(100), Duration::from_secs(30));
    }
}

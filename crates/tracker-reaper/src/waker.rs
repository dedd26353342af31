//! The waker: polls every shard's pending wakes (a registration on a
//! hibernated or hibernating session records one, once) and patches each
//! Session `spec.state: running`, then acknowledges the wake and records a
//! `woken` event.
//!
//! Each wake leads to one patch: the patch is conditional on the
//! resourceVersion read just before, the acknowledgement follows it, and a
//! resource found `running` already is acknowledged without a patch. A
//! session whose hibernation is still in flight is left for the next poll
//! (see [`InFlight`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{PendingWake, ResourceState, SessionId, Store, Written};

use crate::acting::{Acting, Fence, InFlight, TermContext};
use crate::backoff;
use crate::db::EventType;
use crate::error::Error;
use crate::events::EventSink;
use crate::metrics::{KubeOp, Metrics, Task, WakeResult};
use crate::platform::SessionApi;
use crate::session::{resource_state, session_meta, Session};

/// Pending wakes read per shard and poll.
pub const BATCH: u32 = 100;

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
            metrics,
            in_flight,
            fence,
            ..
        } = ctx;
        Self {
            store,
            acting,
            events,
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

    /// Polls until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            self.poll(&stop).await;
        }
    }

    /// One poll over every shard.
    pub async fn poll(&mut self, stop: &CancellationToken) {
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
        match failed {
            Some(e) => {
                self.metrics.store_error(Task::Wake);
                if self.healthy {
                    tracing::warn!(error = %e, "reading pending wakes failed; retrying every poll");
                }
                self.healthy = false;
            }
            None => self.healthy = true,
        }
        let ids: HashSet<&SessionId> = pending.iter().map(|w| &w.session_id).collect();
        self.retries.retain(|id, _| ids.contains(id));
        self.dry_run_seen.retain(|(id, _)| ids.contains(id));
        let now = Instant::now();
        for wake in pending {
            if stop.is_cancelled() {
                return;
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
            self.wake_one(&wake).instrument(span).await;
        }
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

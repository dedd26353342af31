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
//! (see [`InFlight`]). Each wake is served by a task of its own, up to
//! [`CONCURRENCY`] at once and one per session, so a slow or hung API answer
//! (up to the Kubernetes timeout) holds up its own session only.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::future::join_all;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{PendingWake, ResourceState, SessionId, Signal, Store, WakeAnnounce, Written};

use crate::acting::{Acting, Fence, InFlight, Mode, TermContext};
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

/// Wakes served at once (each of another session).
pub const CONCURRENCY: usize = 16;

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

/// What serving one wake leaves for the retry bookkeeping.
#[derive(Debug)]
enum Served {
    /// Done with (woken, acknowledged, announced, or dropped as gone): no retry delay.
    Done,
    /// Nothing to note: read again at the next poll (a conflict, a change to
    /// follow, a fenced term that is ending anyway).
    Unchanged,
    /// Read again after a growing delay, quietly (the store knows newer
    /// news than the Session just read: the watch is behind).
    Later,
    /// Failed: retried after a growing delay.
    Failed { what: &'static str, error: String },
    /// Our patch landed, or may have, and no wake is recorded for it: the
    /// recording failed, the patch's answer was lost (a timeout, a 5xx), or
    /// it was a 409, which a hop that retries a PATCH answered 503/504 gives
    /// when the first attempt was applied. The Session found
    /// running next is recorded as our wake (event and history), not as
    /// someone else's. With an `error`, retried after a growing delay (and
    /// `what` logged); without (a conflict), read again at the next poll.
    Unrecorded {
        what: &'static str,
        error: Option<String>,
    },
}

/// The waker of one leadership term: reads the pending wakes and keeps the
/// retry bookkeeping; each wake is served by a task of its own (see [`Server`]).
#[derive(Debug)]
pub struct Waker {
    server: Arc<Server>,
    in_flight: InFlight,
    interval: Duration,
    retries: HashMap<SessionId, Retry>,
    /// Dry run leaves wakes pending; each is recorded once.
    dry_run_seen: HashSet<(SessionId, i64)>,
    /// Sessions whose wake a task is serving, and the tasks.
    busy: HashSet<SessionId>,
    /// Sessions this term patched running without recording it yet.
    unrecorded: HashSet<SessionId>,
    tasks: JoinSet<(PendingWake, Served)>,
    /// Whether the last poll could read Redis: failures are logged once per outage.
    healthy: bool,
}

/// Serves one wake at a time, from any number of tasks.
#[derive(Debug)]
struct Server {
    store: Store,
    acting: Acting,
    events: EventSink,
    announcer: Announcer,
    metrics: Arc<Metrics>,
    fence: Fence,
    default_idle: Duration,
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
            server: Arc::new(Server {
                store,
                acting,
                events,
                announcer,
                metrics,
                fence,
                default_idle,
            }),
            in_flight,
            interval,
            retries: HashMap::new(),
            dry_run_seen: HashSet::new(),
            busy: HashSet::new(),
            unrecorded: HashSet::new(),
            tasks: JoinSet::new(),
            healthy: true,
        }
    }

    /// Reads pending wakes and starts serving them until `stop`: when
    /// signalled, when a waiting wake is due again, and at the backstop
    /// period. A wake being served does not hold up the next read; its
    /// session is read again an interval after it is done.
    pub async fn run(mut self, stop: CancellationToken) {
        let signal = Arc::new(Notify::new());
        let notify = signal.clone();
        let listeners = crate::signals::spawn_listeners(
            &self.server.store,
            Signal::Wake,
            move |_| notify.notify_one(),
            &stop,
        );
        let backstop = self.interval * BACKSTOP_POLLS;
        'term: loop {
            let again = self.poll().await;
            let mut deadline = Instant::now()
                + again.map_or(backstop, |at| {
                    at.saturating_duration_since(Instant::now()).min(backstop)
                });
            loop {
                tokio::select! {
                    () = stop.cancelled() => break 'term,
                    () = signal.notified() => break,
                    () = tokio::time::sleep_until(deadline) => break,
                    Some(done) = self.tasks.join_next() => {
                        if let Ok((wake, served)) = done {
                            self.note(&wake, served);
                        }
                        deadline = deadline.min(Instant::now() + self.interval);
                    }
                }
            }
        }
        // A wake being served finishes (bounded by the Kubernetes timeout):
        // its patch and acknowledgement belong together.
        while let Some(done) = self.tasks.join_next().await {
            if let Ok((wake, served)) = done {
                self.note(&wake, served);
            }
        }
        for listener in listeners {
            // They stop with `stop`; waiting keeps their connections from outliving the term.
            let _ = listener.await;
        }
    }

    /// One read over every shard, and a task started for each wake due and
    /// not being served (up to [`CONCURRENCY`]). Answers when to read again
    /// although no signal comes: some wakes wait (in flight, conflict, retry
    /// delay, no free task) or the read failed; `None` when nothing waits.
    pub async fn poll(&mut self) -> Option<Instant> {
        let store = &self.server.store;
        let reads = store
            .keys()
            .shards()
            .map(|shard| store.pending_wakes(shard, BATCH));
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
                self.server.metrics.store_error(Task::Wake);
                if self.healthy {
                    tracing::warn!(error = %e, "reading pending wakes failed; retrying every interval");
                }
                self.healthy = false;
                again = Some(soon);
            }
            None => self.healthy = true,
        }
        let ids: HashSet<&SessionId> = pending.iter().map(|w| &w.session_id).collect();
        self.retries
            .retain(|id, _| ids.contains(id) || self.busy.contains(id));
        self.dry_run_seen.retain(|(id, _)| ids.contains(id));
        self.unrecorded
            .retain(|id| ids.contains(id) || self.busy.contains(id));
        let now = Instant::now();
        for wake in pending {
            let id = &wake.session_id;
            if self.busy.contains(id) {
                // Read again an interval after its task is done.
                continue;
            }
            if self
                .dry_run_seen
                .contains(&(id.clone(), wake.requested_at.timestamp_millis()))
            {
                // Recorded once; it stays pending by design.
                continue;
            }
            let at = match self.retries.get(id) {
                Some(r) if r.not_before > now => r.not_before.max(soon),
                // Waiting for a hibernation in flight, or for a free task.
                _ if self.in_flight.contains(id) || self.busy.len() >= CONCURRENCY => soon,
                _ => {
                    self.start(wake);
                    continue;
                }
            };
            again = Some(again.map_or(at, |a: Instant| a.min(at)));
        }
        again
    }

    fn start(&mut self, wake: PendingWake) {
        self.busy.insert(wake.session_id.clone());
        let ours = self.unrecorded.contains(&wake.session_id);
        let server = self.server.clone();
        let span = tracing::info_span!("wake", session_id = %wake.session_id);
        self.tasks.spawn(
            async move {
                let served = server.wake_one(&wake, ours).await;
                (wake, served)
            }
            .instrument(span),
        );
    }

    /// Applies what serving `wake` left: its retry delay, and the log line
    /// of a failure with that delay.
    fn note(&mut self, wake: &PendingWake, served: Served) {
        let id = &wake.session_id;
        self.busy.remove(id);
        match served {
            Served::Done => {
                self.retries.remove(id);
                self.unrecorded.remove(id);
            }
            Served::Unchanged => {}
            Served::Later => {
                self.back_off(id);
            }
            Served::Failed { what, error } => {
                let retry = self.back_off(id);
                tracing::warn!(session_id = %id, error, retry_in = ?retry, "{what}");
            }
            Served::Unrecorded { what, error } => {
                self.unrecorded.insert(id.clone());
                if let Some(error) = error {
                    let retry = self.back_off(id);
                    tracing::warn!(session_id = %id, error, retry_in = ?retry, "{what}");
                }
            }
        }
        if self.server.acting.mode() == Mode::DryRun {
            self.dry_run_seen
                .insert((id.clone(), wake.requested_at.timestamp_millis()));
        }
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

impl Server {
    /// Serves `wake`; `ours`: this term patched the Session running for it
    /// already (see [`Served::Unrecorded`]).
    async fn wake_one(&self, wake: &PendingWake, ours: bool) -> Served {
        let id = &wake.session_id;
        match self.acting.clone() {
            Acting::DryRun => {
                self.events.record(
                    id.as_str(),
                    EventType::DryRunWake,
                    "connection",
                    self.details(wake, None, None),
                );
                self.metrics.wake(WakeResult::DryRun);
                tracing::info!("would wake (dry run)");
                Served::Unchanged
            }
            Acting::RecordOnly => match self.arm(wake).await {
                Some(served) => served,
                None => self.acknowledge(wake, None, None, true).await,
            },
            Acting::Patch(api) => self.patch(api.as_ref(), wake, ours).await,
            Acting::Announce => self.announce(wake).await,
        }
    }

    /// Docker: the wake event is queued once; NATS's acknowledgement wakes
    /// the session (see [`crate::publisher`]).
    async fn announce(&self, wake: &PendingWake) -> Served {
        let id = &wake.session_id;
        let event = self.announcer.announcement("connection");
        match self
            .store
            .announce_wake(id, self.fence.term(), &event)
            .await
        {
            Ok(WakeAnnounce::Fenced) => {
                self.fence.fenced("announce_wake");
                Served::Unchanged
            }
            Ok(WakeAnnounce::Queued) => {
                self.announcer.nudge();
                tracing::info!(event_id = %event.event_id, "wake announced; waiting for NATS");
                Served::Done
            }
            Ok(WakeAnnounce::AlreadyRunning) => {
                self.metrics.wake(WakeResult::AlreadyRunning);
                tracing::info!("Session running already; wake acknowledged");
                Served::Done
            }
            Ok(WakeAnnounce::Nothing) => {
                tracing::debug!("no wake to announce");
                Served::Done
            }
            Err(e) => self.store_failed(&e.into()),
        }
    }

    async fn patch(&self, api: &dyn SessionApi, wake: &PendingWake, ours: bool) -> Served {
        let id = &wake.session_id;
        let current = match api.get(id).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                // Deleted: nothing to wake; forgetting drops the pending wake.
                match self.store.forget_session(id, self.fence.term(), None).await {
                    Ok(Written::Fenced) => {
                        self.fence.fenced("forget_session");
                        return Served::Unchanged;
                    }
                    Ok(_) => {}
                    Err(e) => return self.store_failed(&e.into()),
                }
                self.metrics.wake(WakeResult::Dropped);
                tracing::info!("Session gone; wake dropped");
                return Served::Done;
            }
            Err(e) => {
                self.metrics.kube_error(KubeOp::GetSession);
                return self.kube_failed(&e);
            }
        };
        match wake_action(resource_state(&current)) {
            WakeAction::Patch => {
                if let Some(served) = self.arm(wake).await {
                    return served;
                }
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
                        // Changed since our read, by someone else or by our
                        // own patch retried on the way: read again at the
                        // next poll.
                        self.metrics.wake(WakeResult::Conflict);
                        tracing::debug!("Session changed while waking; retried");
                        Served::Unrecorded {
                            what: "Session changed while waking",
                            error: None,
                        }
                    }
                    Err(e) if !e.surely_not_applied() => {
                        self.metrics.kube_error(KubeOp::PatchSession);
                        self.metrics.wake(WakeResult::Failed);
                        Served::Unrecorded {
                            what: "waking failed; the patch may have landed",
                            error: Some(e.to_string()),
                        }
                    }
                    Err(e) => {
                        self.metrics.kube_error(KubeOp::PatchSession);
                        self.kube_failed(&e)
                    }
                }
            }
            WakeAction::Acknowledge => {
                let uid = current.metadata.uid.as_deref();
                self.acknowledge(wake, uid, current.metadata.generation, ours)
                    .await
            }
            WakeAction::Mirror => self.mirror(&current).await,
        }
    }

    /// With NATS, before the Session is woken: the wake event goes to the
    /// store first, and whoever acknowledges the wake queues it, so a wake
    /// made by a leader that dies before recording it is still announced.
    /// `Some` when the wake is not to be made now.
    async fn arm(&self, wake: &PendingWake) -> Option<Served> {
        if !self.announcer.enabled() {
            return None;
        }
        let event = self.announcer.announcement("connection");
        match self
            .store
            .arm_wake(&wake.session_id, self.fence.term(), &event)
            .await
        {
            Ok(Written::Done) => None,
            Ok(Written::Noop) => {
                tracing::debug!("no wake pending any more");
                Some(Served::Done)
            }
            Ok(Written::Fenced) => {
                self.fence.fenced("arm_wake");
                Some(Served::Unchanged)
            }
            Err(e) => Some(self.store_failed(&e.into())),
        }
    }

    /// The resource is running (patched by us if `patched`): the wake is done.
    async fn acknowledge(
        &self,
        wake: &PendingWake,
        uid: Option<&str>,
        generation: Option<i64>,
        patched: bool,
    ) -> Served {
        let id = &wake.session_id;
        // The wake event, armed before the patch (by this leader or the one
        // before), is queued by the script that records the wake.
        let acked = self
            .store
            .ack_wake(id, self.fence.term(), uid, generation)
            .await;
        let served = match acked {
            Ok(Written::Fenced) => {
                self.fence.fenced("ack_wake");
                return Served::Unchanged;
            }
            Ok(Written::Done) => Served::Done,
            // Nothing acknowledged: the store mirrors another resource under
            // the name (its watch is behind a re-creation). Reading the new
            // one again every interval until the mirror catches up helps
            // nobody: back off.
            Ok(Written::Noop) => Served::Later,
            // Next poll finds it running and acknowledges without another patch.
            Err(e) if patched => {
                self.metrics.store_error(Task::Wake);
                return Served::Unrecorded {
                    what: "Session woken, but recording it failed",
                    error: Some(Error::from(e).to_string()),
                };
            }
            Err(e) => return self.store_failed(&e.into()),
        };
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
        if self.announcer.enabled() {
            // Armed here or by the leader before: the record queued it.
            self.announcer.nudge();
        }
        served
    }

    /// Terminated or unknown state: the resource's own state goes to the store,
    /// which drops the wake of a terminated session.
    async fn mirror(&self, current: &Session) -> Served {
        match session_meta(current, self.default_idle) {
            Ok(meta) => match self.store.mirror_session(&meta, self.fence.term()).await {
                Ok(Written::Fenced) => {
                    self.fence.fenced("mirror_session");
                    Served::Unchanged
                }
                Ok(written) => {
                    self.metrics.wake(WakeResult::Dropped);
                    tracing::info!(
                        state = meta.state.as_str(),
                        "Session not hibernated; wake left to its state"
                    );
                    if written == Written::Noop {
                        // The store knows a newer generation; look again later.
                        Served::Later
                    } else {
                        Served::Unchanged
                    }
                }
                Err(e) => self.store_failed(&e.into()),
            },
            Err(e) => {
                self.metrics.wake(WakeResult::Failed);
                Served::Failed {
                    what: "Session cannot be woken",
                    error: e.to_string(),
                }
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

    fn kube_failed(&self, e: &Error) -> Served {
        self.metrics.wake(WakeResult::Failed);
        Served::Failed {
            what: "waking failed",
            error: e.to_string(),
        }
    }

    fn store_failed(&self, e: &Error) -> Served {
        self.metrics.store_error(Task::Wake);
        self.metrics.wake(WakeResult::Failed);
        Served::Failed {
            what: "recording a wake failed",
            error: e.to_string(),
        }
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

//! The hibernator: every tick, the sessions whose idle timeout is reached are
//! claimed in the store, patched `spec.state: hibernated`, recorded, and the
//! claim finished; a failed patch rolls the claim back for a later retry.
//!
//! Deciding is the store's (the due index and the claim script) and
//! [`Guard`]'s: right after becoming leader, and after a shard's epoch marker
//! changed (Redis lost its data), nothing is hibernated for one heartbeat
//! window, so connections get the chance to show they are alive.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{ClaimOutcome, Epoch, ResourceState, SessionId, ShardId, Store};

use crate::acting::{Acting, InFlight};
use crate::backoff;
use crate::db::EventType;
use crate::error::Error;
use crate::events::EventSink;
use crate::metrics::{HibernationResult, KubeOp, Metrics, Task};
use crate::session::resource_state;

/// Sessions claimed per shard and tick.
pub const BATCH: u32 = 100;

/// True once the guard period is over.
pub fn may_hibernate(now: Instant, guard_until: Instant) -> bool {
    now >= guard_until
}

/// True if `epoch` shows the shard lost its data since `previous` was read
/// (or, on a first read, that the marker had to be created just now).
pub fn epoch_changed(previous: Option<&str>, epoch: &Epoch) -> bool {
    epoch.created || previous.is_some_and(|p| p != epoch.marker)
}

/// The mass-hibernation guard of one leadership term.
#[derive(Debug, Clone)]
pub struct Guard {
    until: Instant,
    window: Duration,
    epochs: HashMap<ShardId, String>,
}

impl Guard {
    /// A guard for a term that starts at `now`.
    pub fn new(now: Instant, window: Duration) -> Self {
        Self {
            until: now + window,
            window,
            epochs: HashMap::new(),
        }
    }

    /// Records a shard's epoch; a change extends the guard to a full window
    /// from `now`. Answers whether it changed.
    pub fn observe(&mut self, shard: ShardId, epoch: &Epoch, now: Instant) -> bool {
        let changed = epoch_changed(self.epochs.get(&shard).map(String::as_str), epoch);
        self.epochs.insert(shard, epoch.marker.clone());
        if changed {
            self.until = self.until.max(now + self.window);
        }
        changed
    }

    pub fn may_hibernate(&self, now: Instant) -> bool {
        may_hibernate(now, self.until)
    }

    pub fn until(&self) -> Instant {
        self.until
    }
}

/// Settings of the hibernator.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    pub heartbeat_window: Duration,
    /// How long a claim may stay unfinished before another leader may take it.
    pub claim_lifetime: Duration,
    /// With dry run, how long until a session is decided again.
    pub dry_run_retry: Duration,
}

/// The hibernator of one leadership term.
#[derive(Debug)]
pub struct Hibernator {
    store: Store,
    acting: Acting,
    events: EventSink,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    /// Tells the mirror to list Sessions again after a data loss.
    relist: Arc<Notify>,
    settings: Settings,
    guard: Guard,
    /// Consecutive failed patches per session, for the retry backoff.
    failures: HashMap<SessionId, u32>,
}

/// Retry delay after a failed patch: 2 s doubling to 5 min.
fn retry_after_failure(failures: u32) -> Duration {
    backoff::delay(
        Duration::from_secs(2),
        Duration::from_secs(300),
        failures.saturating_sub(1),
    )
}

/// Retry delay when someone else changed the Session (409, or not running):
/// short, since the mirror will have followed the change by then.
const RETRY_AFTER_CHANGE: Duration = Duration::from_secs(2);

impl Hibernator {
    pub fn new(
        store: Store,
        acting: Acting,
        events: EventSink,
        metrics: Arc<Metrics>,
        in_flight: InFlight,
        relist: Arc<Notify>,
        settings: Settings,
    ) -> Self {
        let guard = Guard::new(Instant::now(), settings.heartbeat_window);
        Self {
            store,
            acting,
            events,
            metrics,
            in_flight,
            relist,
            settings,
            guard,
            failures: HashMap::new(),
        }
    }

    /// Ticks until `stop`.
    pub async fn run(mut self, stop: CancellationToken) {
        tracing::info!(
            guard_for = ?self.guard.until().saturating_duration_since(Instant::now()),
            "hibernation paused for one heartbeat window after becoming leader"
        );
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let span = tracing::debug_span!("hibernate_tick");
            self.tick(&stop).instrument(span).await;
        }
    }

    /// One pass: check the epochs, then (guard permitting) every shard's due sessions.
    pub async fn tick(&mut self, stop: &CancellationToken) {
        let mut changed = Vec::new();
        for shard in self.store.keys().shards() {
            match self.store.shard_epoch(shard).await {
                Ok(epoch) => {
                    if self.guard.observe(shard, &epoch, Instant::now()) {
                        changed.push(shard.0);
                    }
                }
                Err(e) => {
                    // Without knowing the epoch we cannot rule out a data loss: skip this tick.
                    self.metrics.store_error(Task::Hibernate);
                    tracing::warn!(shard = shard.0, error = %e, "reading the shard epoch failed");
                    return;
                }
            }
        }
        if !changed.is_empty() {
            // One line for all shards: a new store marks every shard at once.
            tracing::warn!(
                shards = ?changed,
                "new shard epoch markers: a fresh store, or Redis lost data; no hibernation for one heartbeat window"
            );
            self.relist.notify_one();
        }
        if !self.guard.may_hibernate(Instant::now()) {
            return;
        }
        for shard in self.store.keys().shards() {
            let due = match self.store.due_sessions(shard, BATCH).await {
                Ok(d) => d,
                Err(e) => {
                    self.metrics.store_error(Task::Hibernate);
                    tracing::warn!(shard = shard.0, error = %e, "reading due sessions failed");
                    continue;
                }
            };
            for id in due {
                if stop.is_cancelled() {
                    return;
                }
                let span = tracing::info_span!("hibernate", session_id = %id);
                self.hibernate_one(&id).instrument(span).await;
            }
        }
    }

    async fn hibernate_one(&mut self, id: &SessionId) {
        // Entered before the claim: a wake recorded after the claim finds us here.
        let _in_flight = self.in_flight.enter(id);
        let generation = match self
            .store
            .claim_hibernation(id, self.settings.claim_lifetime)
            .await
        {
            Ok(ClaimOutcome::Claimed { generation }) => generation,
            Ok(ClaimOutcome::Refused(reason)) => {
                self.metrics.hibernation(HibernationResult::Skipped);
                tracing::debug!(reason, "claim refused");
                return;
            }
            Err(e) => {
                self.metrics.store_error(Task::Hibernate);
                tracing::warn!(error = %e, "claiming a hibernation failed");
                return;
            }
        };
        let view = self.store.session(id).await.ok().flatten();
        let mut details = serde_json::json!({
            "platform": self.acting.platform(),
            "idle_since": view.as_ref().and_then(|v| v.idle_since).map(|t| tracker_core::domain::rfc3339_ms::format(&t)),
            "idle_timeout_seconds": view.as_ref().and_then(|v| v.idle_timeout_seconds),
        });
        match self.acting.clone() {
            Acting::DryRun => {
                self.events.record(
                    id.as_str(),
                    EventType::DryRunHibernate,
                    "idle_timeout",
                    details,
                );
                self.metrics.hibernation(HibernationResult::DryRun);
                tracing::info!("would hibernate (dry run)");
                self.rollback(id, self.settings.dry_run_retry).await;
            }
            Acting::RecordOnly => {
                self.finish(id, generation, details).await;
            }
            Acting::Patch(api) => {
                let current = match api.get(id).await {
                    Ok(Some(s)) => s,
                    Ok(None) => {
                        // Deleted meanwhile: the mirror forgets it.
                        self.metrics.hibernation(HibernationResult::Skipped);
                        self.rollback(id, RETRY_AFTER_CHANGE).await;
                        return;
                    }
                    Err(e) => {
                        self.metrics.kube_error(KubeOp::GetSession);
                        self.failed(id, &e).await;
                        return;
                    }
                };
                if resource_state(&current) != Some(ResourceState::Running) {
                    // Changed by someone else; follow, do not fight.
                    self.metrics.hibernation(HibernationResult::Skipped);
                    tracing::info!(state = ?current.spec.state, "Session no longer running; not hibernated");
                    self.rollback(id, RETRY_AFTER_CHANGE).await;
                    return;
                }
                let rv = current
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default();
                match api.set_state(id, &rv, ResourceState::Hibernated).await {
                    Ok(patched) => {
                        details["generation"] = patched.metadata.generation.into();
                        self.finish(id, patched.metadata.generation.or(generation), details)
                            .await;
                    }
                    Err(e) if e.is_conflict() => {
                        self.metrics.hibernation(HibernationResult::Conflict);
                        tracing::info!("Session changed while deciding; decided again later");
                        self.rollback(id, RETRY_AFTER_CHANGE).await;
                    }
                    Err(e) => {
                        self.metrics.kube_error(KubeOp::PatchSession);
                        self.failed(id, &e).await;
                    }
                }
            }
        }
    }

    async fn finish(
        &mut self,
        id: &SessionId,
        generation: Option<i64>,
        details: serde_json::Value,
    ) {
        self.failures.remove(id);
        if let Err(e) = self.store.finish_hibernation(id, generation).await {
            // The patch landed; the mirror records the state when it sees it.
            self.metrics.store_error(Task::Hibernate);
            tracing::warn!(error = %e, "recording a finished hibernation failed; the mirror follows");
        }
        self.events
            .record(id.as_str(), EventType::Hibernated, "idle_timeout", details);
        self.metrics.hibernation(HibernationResult::Hibernated);
        tracing::info!("Session hibernated");
    }

    async fn failed(&mut self, id: &SessionId, e: &Error) {
        let n = self.failures.entry(id.clone()).or_insert(0);
        *n += 1;
        let retry = retry_after_failure(*n);
        self.metrics.hibernation(HibernationResult::Failed);
        tracing::warn!(error = %e, retry_in = ?retry, "hibernating failed; claim rolled back");
        self.rollback(id, retry).await;
    }

    async fn rollback(&self, id: &SessionId, retry_after: Duration) {
        if let Err(e) = self.store.rollback_hibernation(id, retry_after).await {
            // The claim lapses by itself after its lifetime.
            self.metrics.store_error(Task::Hibernate);
            tracing::warn!(error = %e, "rolling a claim back failed; it lapses by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(marker: &str, created: bool) -> Epoch {
        Epoch {
            marker: marker.into(),
            created,
        }
    }

    #[test]
    fn nothing_is_hibernated_before_the_guard_ends() {
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(60);
        assert!(!may_hibernate(t0, until));
        assert!(!may_hibernate(until - Duration::from_millis(1), until));
        assert!(may_hibernate(until, until));
        assert!(may_hibernate(until + Duration::from_secs(1), until));
    }

    #[test]
    fn an_epoch_change_is_a_marker_change_or_a_creation() {
        assert!(!epoch_changed(None, &epoch("a", false)));
        assert!(epoch_changed(None, &epoch("a", true)));
        assert!(!epoch_changed(Some("a"), &epoch("a", false)));
        assert!(epoch_changed(Some("a"), &epoch("b", false)));
        assert!(epoch_changed(Some("a"), &epoch("b", true)));
    }

    #[test]
    fn the_guard_starts_with_the_term_and_restarts_on_epoch_change() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut g = Guard::new(t0, window);
        assert!(!g.may_hibernate(t0));
        assert!(!g.observe(ShardId(0), &epoch("a", false), t0));
        assert!(g.may_hibernate(t0 + window));
        // Same marker later: no change.
        assert!(!g.observe(ShardId(0), &epoch("a", false), t0 + window));
        assert!(g.may_hibernate(t0 + window));
        // Another shard's first read is not a change either.
        assert!(!g.observe(ShardId(1), &epoch("x", false), t0 + window));
        // Redis lost shard 0: a full window from when we noticed.
        let t1 = t0 + window * 2;
        assert!(g.observe(ShardId(0), &epoch("b", true), t1));
        assert!(!g.may_hibernate(t1 + window - Duration::from_millis(1)));
        assert!(g.may_hibernate(t1 + window));
    }

    #[test]
    fn failed_patches_back_off() {
        assert_eq!(retry_after_failure(1), Duration::from_secs(2));
        assert_eq!(retry_after_failure(2), Duration::from_secs(4));
        assert_eq!(retry_after_failure(30), Duration::from_secs(300));
    }
}

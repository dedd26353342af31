//! The hibernator: every tick, the sessions whose idle timeout or max
//! session duration is reached are claimed in the store, checked against the
//! resource as it is now ([`decide`]), patched `spec.state: hibernated`,
//! recorded, and the claim finished; a patch that surely did not land rolls
//! the claim back for a later retry.
//!
//! Max session duration: the due index also holds the time to warn the
//! session's clients (`TRACKER_WARN_BEFORE` before the deadline). The claim
//! script then records the warning in the store, once per running period
//! and fenced like every write, and the API replicas' session watchers
//! deliver it to the sockets; here it becomes a `session_events` row, and
//! where NATS is configured the claim queued its warning event with it. At the deadline the claim ends the
//! session's connections (`max_duration`) in the same step, whatever they
//! are doing, and the hibernation goes on as an idle one does.
//!
//! Deciding is the store's (the due index and the claim script), [`decide`]'s
//! and [`Guard`]'s: right after becoming leader, and after a shard's epoch
//! marker changed (Redis lost its data), nothing is hibernated for one
//! heartbeat window, so connections get the chance to show they are alive.
//!
//! Every store write carries the leader's term ([`Fence`]): a claim belongs to
//! its term, and a replaced leader's late finish or rollback is refused. A
//! patch whose answer is ambiguous (timeout, 5xx) is resolved by reading the
//! resource again; if that fails too, the claim is left to lapse, never
//! released on a guess. A patch the read does not show yet is released as
//! unsure (it may still land) and read again for a minute, so that its
//! landing is recorded even when the watch misses it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracker_core::{
    Claim, ClaimOutcome, ClaimRefusal, Epoch, FinishOutcome, HibernationNotice, HibernationReason,
    IdleTimeout, ResourceState, SessionId, SessionMeta, ShardId, Store, Warning, Written,
};

use crate::acting::{Acting, Fence, InFlight, Mode, TermContext};
use crate::backoff;
use crate::db::EventType;
use crate::error::Error;
use crate::events::EventSink;
use crate::leader_facts;
use crate::metrics::{HibernationResult, KubeOp, Metrics, Task};
use crate::platform::SessionApi;
use crate::publisher::Announcer;
use crate::session::session_meta;

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
    /// For Sessions without `spec.idleTimeout`.
    pub default_idle_timeout: Duration,
}

/// The hibernator of one leadership term.
#[derive(Debug)]
pub struct Hibernator {
    store: Store,
    acting: Acting,
    events: EventSink,
    announcer: Announcer,
    metrics: Arc<Metrics>,
    in_flight: InFlight,
    fence: Fence,
    /// Tells the mirror to list Sessions again after a data loss.
    relist: Arc<Notify>,
    /// Tells the archiver that a claim ended connections.
    archive_nudge: Arc<Notify>,
    settings: Settings,
    guard: Guard,
    /// Consecutive failed patches per session, for the retry backoff.
    failures: HashMap<SessionId, u32>,
    /// Hibernations that landed but whose record failed (Redis did not
    /// answer): recorded again each tick until Redis answers. The watch
    /// records the state (and the claim's event) too, but may miss it.
    unrecorded: HashMap<SessionId, Unrecorded>,
    /// Patches released as unsure that may still land: read again until the
    /// Session moves on or [`LATE_LANDING`] passes, so that a landing the
    /// watch misses is still recorded (and undone for users who came since).
    unsure: HashMap<SessionId, Unsure>,
    /// Tells explanations about the guard and dry run.
    facts: leader_facts::Publisher,
}

/// A landed hibernation to record again.
#[derive(Debug)]
struct Unrecorded {
    uid: Option<String>,
    generation: Option<i64>,
}

/// A patch whose answer was lost and which the Session did not show yet.
#[derive(Debug)]
struct Unsure {
    /// The resourceVersion the patch was conditional on: while the Session
    /// is still at it, the patch may land; once it moved on, it landed or
    /// never will.
    resource_version: String,
    released_at: Instant,
    reads: u32,
    next_read: Instant,
}

impl Unsure {
    fn new(resource_version: String, now: Instant) -> Self {
        Self {
            resource_version,
            released_at: now,
            reads: 0,
            next_read: now + Self::delay(0),
        }
    }

    /// Reads 1, 3, 7, 15, 31 and 47 s after the release: about six reads a
    /// patch within [`LATE_LANDING`], early while a landing is most likely.
    fn delay(reads: u32) -> Duration {
        backoff::delay(Duration::from_secs(1), Duration::from_secs(16), reads)
    }

    /// One more read told nothing: the next one, a little later.
    fn read_later(&mut self) {
        self.reads += 1;
        self.next_read = Instant::now() + Self::delay(self.reads);
    }
}

/// Follow-up reads of released patches made at once.
const UNSURE_READS_AT_ONCE: usize = 8;

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

/// How long a patch whose answer was lost may still land: the API server's
/// default request timeout (`--request-timeout`, 1 minute), within which it
/// applies a write it received or not at all.
pub const LATE_LANDING: Duration = Duration::from_secs(60);

impl Hibernator {
    pub fn new(ctx: TermContext, settings: Settings) -> Self {
        let TermContext {
            store,
            acting,
            events,
            announcer,
            metrics,
            in_flight,
            fence,
            relist,
            archive_nudge,
            ..
        } = ctx;
        let guard = Guard::new(Instant::now(), settings.heartbeat_window);
        let facts = leader_facts::Publisher::new(
            leader_facts::lifetime(settings.interval),
            acting.mode() == Mode::DryRun,
        );
        Self {
            store,
            acting,
            events,
            announcer,
            metrics,
            in_flight,
            fence,
            relist,
            archive_nudge,
            settings,
            guard,
            failures: HashMap::new(),
            unrecorded: HashMap::new(),
            unsure: HashMap::new(),
            facts,
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

    /// One pass: check the epochs, then (guard permitting) every shard's due
    /// sessions. One call per shard reads both: the due sessions are only
    /// asked for while the guard permits, and only acted on when no epoch
    /// changed in the same pass.
    pub async fn tick(&mut self, stop: &CancellationToken) {
        let max = if self.guard.may_hibernate(Instant::now()) {
            BATCH
        } else {
            0
        };
        let mut changed = Vec::new();
        let mut due = Vec::new();
        for shard in self.store.keys().shards() {
            match self.store.shard_epoch_due(shard, max).await {
                Ok((epoch, ids)) => {
                    if self.guard.observe(shard, &epoch, Instant::now()) {
                        changed.push(shard.0);
                    }
                    due.extend(ids);
                }
                Err(e) => {
                    // Without knowing the epoch we cannot rule out a data loss: skip this tick.
                    self.metrics.store_error(Task::Hibernate);
                    tracing::warn!(shard = shard.0, error = %e, "reading the shard epoch and due sessions failed");
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
        // Redis answered just now: the right moment to record what it missed.
        self.record_again().await;
        if let Acting::Patch(api) = self.acting.clone() {
            self.read_unsure_again(api.as_ref()).await;
        }
        let guard_until = self.guard.until();
        self.facts
            .publish(&self.store, &self.fence, &self.metrics, guard_until)
            .await;
        if !self.guard.may_hibernate(Instant::now()) {
            return;
        }
        for id in due {
            if stop.is_cancelled() {
                return;
            }
            if self.unrecorded.contains_key(&id) {
                // Its last hibernation is not recorded yet: a new claim could
                // be ended by that record.
                continue;
            }
            let span = tracing::info_span!("hibernate", session_id = %id);
            self.hibernate_one(&id).instrument(span).await;
        }
    }

    async fn hibernate_one(&mut self, id: &SessionId) {
        // Entered before the claim: a wake recorded after the claim finds us here.
        let _in_flight = self.in_flight.enter(id);
        let term = self.fence.term();
        let dry_run = self.acting.mode() == Mode::DryRun;
        let lifetime = self.settings.claim_lifetime;
        // Events are queued by the claim itself, with the change they announce.
        let warning = self.announcer.announcement_if_enabled("max_duration");
        let claimed = match self.acting.mode() {
            Mode::DryRun => {
                self.store
                    .claim_hibernation_as(id, lifetime, term, dry_run)
                    .await
            }
            Mode::Announce => {
                let event = self.announcer.announcement("idle_timeout");
                self.store
                    .claim_hibernation_announcing(
                        id,
                        lifetime,
                        term,
                        HibernationNotice::WithClaim(&event),
                        warning.as_ref(),
                    )
                    .await
            }
            _ => {
                // Announced once the patch is seen to land, by whoever sees it.
                let event = self.announcer.announcement_if_enabled("idle_timeout");
                let notice = event
                    .as_ref()
                    .map_or(HibernationNotice::Silent, HibernationNotice::OnLanding);
                self.store
                    .claim_hibernation_announcing(id, lifetime, term, notice, warning.as_ref())
                    .await
            }
        };
        let outcome = match claimed {
            Ok(outcome) => outcome,
            Err(e) => {
                self.metrics.store_error(Task::Hibernate);
                tracing::warn!(error = %e, "claiming a hibernation failed");
                return;
            }
        };
        let step = decide_hibernation(&outcome, self.acting.mode());
        match step {
            HibernationStep::StopFenced => {
                self.fence.fenced("claim_hibernation");
                return;
            }
            HibernationStep::Skip(reason) => {
                self.metrics.hibernation(HibernationResult::Skipped);
                tracing::debug!(reason = reason.as_str(), "claim refused");
                return;
            }
            HibernationStep::Warn => {
                if let ClaimOutcome::Warned(warning) = &outcome {
                    self.warned(id, warning, dry_run).await;
                }
                return;
            }
            HibernationStep::Announced => {
                if let ClaimOutcome::Claimed(claim) = &outcome {
                    if !claim.ended.is_empty() {
                        self.archive_nudge.notify_one();
                    }
                }
                // Hibernated once NATS acknowledges the event (the publisher
                // finishes the claim then).
                self.announcer.nudge();
                tracing::info!("hibernation announced; waiting for NATS");
                return;
            }
            HibernationStep::RecordDryRun | HibernationStep::Finish | HibernationStep::Patch => {}
        }
        // Every other outcome is one of the steps above.
        let ClaimOutcome::Claimed(claim) = outcome else {
            return;
        };
        // The new decision reads the Session itself, and holds an older
        // released patch to it (the store moved its release to this claim).
        self.unsure.remove(id);
        if !claim.ended.is_empty() {
            tracing::info!(
                connections = claim.ended.len(),
                "max session duration reached; live connections ended"
            );
            self.archive_nudge.notify_one();
        }
        // The same reasons an explanation gives, so the history says why.
        let facts = self.store.explain(id).await.ok().flatten();
        let view = facts.as_ref().map(|(f, _)| &f.view);
        let dry_run = step == HibernationStep::RecordDryRun;
        let reasons = facts
            .as_ref()
            .map(|(f, now)| {
                tracker_core::explain::hibernation_reasons(f, *now, claim.reason, dry_run)
            })
            .unwrap_or_default();
        let details = serde_json::json!({
            "platform": self.acting.platform(),
            "term": term.0,
            "session_uid": claim.uid,
            "idle_since": view.and_then(|v| v.idle_since).map(|t| tracker_core::domain::rfc3339_ms::format(&t)),
            "idle_timeout_seconds": view.and_then(|v| v.idle_timeout_seconds),
            "last_connection_at": view.and_then(|v| v.last_connection_at).map(|t| tracker_core::domain::rfc3339_ms::format(&t)),
            "max_session_duration_seconds": claim.max_session_duration.map(|d| d.as_secs()),
            "ended_connections": claim.ended.len(),
            "reasons": reasons,
        });
        let reason = event_reason(claim.reason);
        match step {
            HibernationStep::RecordDryRun => {
                self.events
                    .record(id.as_str(), EventType::DryRunHibernate, reason, details);
                self.metrics.hibernation(HibernationResult::DryRun);
                tracing::info!("would hibernate (dry run)");
                self.rollback(id, self.settings.dry_run_retry).await;
            }
            HibernationStep::Finish => {
                self.finish(id, &claim, claim.uid.as_deref(), claim.generation, details)
                    .await;
            }
            HibernationStep::Patch => {
                // The mode is the acting's: Patch comes with its API.
                if let Acting::Patch(api) = self.acting.clone() {
                    self.patch(api.as_ref(), id, &claim, details).await;
                }
            }
            HibernationStep::StopFenced
            | HibernationStep::Skip(_)
            | HibernationStep::Warn
            | HibernationStep::Announced => {}
        }
    }

    /// The store recorded the warning before a max duration just now: this
    /// leader is the one to tell the world, once.
    async fn warned(&self, id: &SessionId, warning: &Warning, dry_run: bool) {
        let details = serde_json::json!({
            "platform": self.acting.platform(),
            "term": self.fence.term().0,
            "session_uid": warning.uid,
            "at": tracker_core::domain::rfc3339_ms::format(&warning.at),
        });
        let (event, result) = if dry_run {
            (
                EventType::DryRunHibernationWarning,
                HibernationResult::DryRun,
            )
        } else {
            (EventType::HibernationWarning, HibernationResult::Warned)
        };
        self.events
            .record(id.as_str(), event, "max_duration", details);
        self.metrics.hibernation(result);
        tracing::info!(at = %warning.at, "clients warned: max session duration reached soon");
        if !dry_run && self.announcer.enabled() {
            // The claim queued the NATS warning event with the warning.
            self.announcer.nudge();
        }
    }

    /// Reads the resource, decides, patches, and resolves what the answer
    /// leaves open by reading again.
    async fn patch(
        &mut self,
        api: &dyn SessionApi,
        id: &SessionId,
        claim: &Claim,
        mut details: serde_json::Value,
    ) {
        let current = match api.get(id).await {
            Ok(current) => current,
            Err(e) => {
                // Nothing was written: the claim can go.
                self.metrics.kube_error(KubeOp::GetSession);
                self.failed(id, &e).await;
                return;
            }
        };
        let meta = current
            .as_ref()
            .and_then(|s| session_meta(s, self.settings.default_idle_timeout).ok());
        match decide(claim, meta.as_ref()) {
            Decision::Patch => {}
            Decision::AlreadyHibernated => {
                // Our own earlier patch whose answer was lost, or someone else's.
                let generation = meta.as_ref().and_then(|m| m.generation);
                details["generation"] = generation.into();
                self.finish(id, claim, claim.uid.as_deref(), generation, details)
                    .await;
                return;
            }
            Decision::Release(why) => {
                self.metrics.hibernation(HibernationResult::Skipped);
                tracing::info!(
                    why = why.as_str(),
                    "Session changed since the claim; not hibernated"
                );
                if let Some(meta) = &meta {
                    // Follow the change now rather than at the watch's next event.
                    self.mirror(meta).await;
                }
                self.rollback(id, RETRY_AFTER_CHANGE).await;
                return;
            }
        }
        let rv = current
            .and_then(|s| s.metadata.resource_version)
            .unwrap_or_default();
        let e = match api.set_state(id, &rv, ResourceState::Hibernated).await {
            Ok(patched) => {
                details["generation"] = patched.metadata.generation.into();
                self.finish(
                    id,
                    claim,
                    patched.metadata.uid.as_deref().or(claim.uid.as_deref()),
                    patched.metadata.generation,
                    details,
                )
                .await;
                return;
            }
            Err(e) => e,
        };
        let conflict = e.is_conflict();
        if conflict {
            // Someone else's change, or our own patch: a hop that retries a
            // PATCH answered 503 or 504 (our client does not) meets the
            // version the first attempt created. Only the resource tells which.
            tracing::info!("hibernation patch refused as a conflict; reading the Session again");
        } else {
            self.metrics.kube_error(KubeOp::PatchSession);
            if e.surely_not_applied() {
                self.failed(id, &e).await;
                return;
            }
            // A timeout or a 5xx may come after the patch was applied: only the
            // resource itself tells. Never assume either way.
            tracing::warn!(error = %e, "hibernation patch answer lost; reading the Session again");
        }
        match api.get(id).await {
            Ok(after) => {
                let meta = after
                    .as_ref()
                    .and_then(|s| session_meta(s, self.settings.default_idle_timeout).ok());
                match meta {
                    Some(m) if m.state == ResourceState::Hibernated && m.uid == claim.uid => {
                        details["generation"] = m.generation.into();
                        details["resolved_by_read"] = true.into();
                        self.finish(id, claim, m.uid.as_deref(), m.generation, details)
                            .await;
                    }
                    _ if conflict => {
                        self.metrics.hibernation(HibernationResult::Conflict);
                        tracing::info!("Session changed while deciding; decided again later");
                        self.rollback(id, RETRY_AFTER_CHANGE).await;
                    }
                    _ => self.failed_unsure(id, &e, rv).await,
                }
            }
            Err(read) => {
                // Still unknown. The claim stays: it lapses after its lifetime,
                // and whoever claims again reads the resource first.
                // (After a conflict as well: it may have been our own patch.)
                self.metrics.kube_error(KubeOp::GetSession);
                self.metrics.hibernation(HibernationResult::Failed);
                tracing::warn!(error = %read, "Session unreadable after an ambiguous patch; the claim lapses by itself");
            }
        }
    }

    async fn finish(
        &mut self,
        id: &SessionId,
        claim: &Claim,
        uid: Option<&str>,
        generation: Option<i64>,
        details: serde_json::Value,
    ) {
        self.failures.remove(id);
        // The claim's event (with NATS) is queued by the script that records
        // the landing, whichever records it first: this one or the mirror's.
        let finished = self
            .store
            .finish_hibernation(id, self.fence.term(), uid, generation)
            .await;
        match finished {
            Ok(FinishOutcome::Fenced) => {
                // The patch landed, but a newer leader owns the store now: its
                // mirror records the state (and wakes the session if in use).
                self.fence.fenced("finish_hibernation");
                return;
            }
            Ok(outcome @ (FinishOutcome::Stale | FinishOutcome::NotClaimed)) => {
                tracing::info!(
                    ?outcome,
                    "hibernation recorded by newer news; the mirror follows"
                );
            }
            Ok(FinishOutcome::Finished) => {}
            Err(e) => {
                // The patch landed: record it again once Redis answers (the
                // watch may record it first; either queues the claim's event).
                self.metrics.store_error(Task::Hibernate);
                tracing::warn!(error = %e, "recording a finished hibernation failed; recorded again once Redis answers");
                self.unrecorded.insert(
                    id.clone(),
                    Unrecorded {
                        uid: uid.map(str::to_owned),
                        generation,
                    },
                );
            }
        }
        self.events.record(
            id.as_str(),
            EventType::Hibernated,
            event_reason(claim.reason),
            details,
        );
        self.metrics.hibernation(HibernationResult::Hibernated);
        tracing::info!("Session hibernated");
        if self.announcer.enabled() {
            self.announcer.nudge();
        }
    }

    /// Records the hibernations whose record failed, now that Redis answers.
    async fn record_again(&mut self) {
        let ids: Vec<SessionId> = self.unrecorded.keys().cloned().collect();
        for id in ids {
            let Some(u) = self.unrecorded.get(&id) else {
                continue;
            };
            let recorded = self
                .store
                .finish_hibernation(&id, self.fence.term(), u.uid.as_deref(), u.generation)
                .await;
            match recorded {
                Ok(outcome) => {
                    tracing::info!(session_id = %id, ?outcome, "a hibernation recorded late");
                    self.unrecorded.remove(&id);
                    if outcome == FinishOutcome::Fenced {
                        self.fence.fenced("finish_hibernation");
                        return;
                    }
                    if self.announcer.enabled() {
                        self.announcer.nudge();
                    }
                }
                Err(e) => {
                    self.metrics.store_error(Task::Hibernate);
                    tracing::warn!(session_id = %id, error = %e, "recording a finished hibernation failed again");
                    return;
                }
            }
        }
    }

    async fn failed(&mut self, id: &SessionId, e: &Error) {
        let retry = self.count_failure(id, e);
        self.rollback(id, retry).await;
    }

    /// [`Self::failed`] after a patch whose answer was lost and which the
    /// Session does not show (yet): it may still land, which the store
    /// remembers for [`LATE_LANDING`] (see `rollback_unsure_hibernation`),
    /// and which [`Self::read_unsure_again`] looks for.
    async fn failed_unsure(&mut self, id: &SessionId, e: &Error, resource_version: String) {
        let retry = self.count_failure(id, e);
        let released = self
            .store
            .rollback_unsure_hibernation(id, self.fence.term(), retry, LATE_LANDING)
            .await;
        self.released(released);
        self.unsure
            .insert(id.clone(), Unsure::new(resource_version, Instant::now()));
    }

    /// Reads again the Sessions whose released patch may still land. The
    /// watch records a landing too, but a watch may miss an event until it
    /// lists again, and users who came since the release are woken only once
    /// the landing is recorded. A Session that moved on from the patch's
    /// resourceVersion is mirrored as read: the store's late-landing rule
    /// decides whether that was our patch and who must be woken.
    async fn read_unsure_again(&mut self, api: &dyn SessionApi) {
        let now = Instant::now();
        self.unsure
            .retain(|_, u| now.duration_since(u.released_at) < LATE_LANDING);
        let due: Vec<SessionId> = self
            .unsure
            .iter()
            .filter(|(_, u)| u.next_read <= now)
            .map(|(id, _)| id.clone())
            .take(BATCH as usize)
            .collect();
        // A few at a time: a slow API server must not hold up the tick by
        // a timeout per Session.
        let reads: Vec<_> = futures::stream::iter(due)
            .map(|id| async move {
                let read = api.get(&id).await;
                (id, read)
            })
            .buffer_unordered(UNSURE_READS_AT_ONCE)
            .collect()
            .await;
        for (id, read) in reads {
            let Some(u) = self.unsure.get_mut(&id) else {
                continue;
            };
            let session = match read {
                Ok(session) => session,
                Err(e) => {
                    self.metrics.kube_error(KubeOp::GetSession);
                    tracing::debug!(session_id = %id, error = %e, "reading a Session after a released patch failed");
                    u.read_later();
                    continue;
                }
            };
            let version = session
                .as_ref()
                .and_then(|s| s.metadata.resource_version.as_deref());
            if version == Some(u.resource_version.as_str()) {
                u.read_later();
                continue;
            }
            self.unsure.remove(&id);
            let meta = session
                .as_ref()
                .and_then(|s| session_meta(s, self.settings.default_idle_timeout).ok());
            if let Some(meta) = meta {
                tracing::info!(session_id = %id, state = meta.state.as_str(), "Session moved on after a released patch; mirrored");
                self.mirror(&meta).await;
            }
        }
    }

    fn count_failure(&mut self, id: &SessionId, e: &Error) -> Duration {
        let n = self.failures.entry(id.clone()).or_insert(0);
        *n += 1;
        let retry = retry_after_failure(*n);
        self.metrics.hibernation(HibernationResult::Failed);
        tracing::warn!(error = %e, retry_in = ?retry, "hibernating failed; claim rolled back");
        retry
    }

    async fn rollback(&self, id: &SessionId, retry_after: Duration) {
        let released = self
            .store
            .rollback_hibernation(id, self.fence.term(), retry_after)
            .await;
        self.released(released);
    }

    fn released(&self, released: tracker_core::Result<Written>) {
        match released {
            Ok(Written::Fenced) => self.fence.fenced("rollback_hibernation"),
            Ok(_) => {}
            Err(e) => {
                // The claim lapses by itself after its lifetime.
                self.metrics.store_error(Task::Hibernate);
                tracing::warn!(error = %e, "rolling a claim back failed; it lapses by itself");
            }
        }
    }

    async fn mirror(&self, meta: &SessionMeta) {
        match self.store.mirror_session(meta, self.fence.term()).await {
            Ok(Written::Fenced) => self.fence.fenced("mirror_session"),
            Ok(_) => {}
            Err(e) => {
                self.metrics.store_error(Task::Hibernate);
                tracing::debug!(error = %e, "mirroring a changed Session failed; the watch follows");
            }
        }
    }
}

/// The `session_events` reason of a hibernation.
pub fn event_reason(reason: HibernationReason) -> &'static str {
    match reason {
        HibernationReason::Idle => "idle_timeout",
        HibernationReason::MaxDuration => "max_duration",
    }
}

/// What to do with a due session once the store answered its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HibernationStep {
    /// A newer leader wrote to the shard first: stop acting.
    StopFenced,
    /// Not claimed (connected again, busy, not due, ...): leave it.
    Skip(ClaimRefusal),
    /// Not claimed: the warning before the max duration was recorded now;
    /// record the event and announce it.
    Warn,
    /// Dry run: record what would happen, roll the claim back so it is
    /// decided again later.
    RecordDryRun,
    /// No platform to act on: the claim is the hibernation; finish it.
    Finish,
    /// Check the resource as it is now ([`decide`]) and patch it.
    Patch,
    /// The claim queued the hibernate event (docker): NATS's acknowledgement
    /// finishes it.
    Announced,
}

/// Decides the step from the claim's outcome and the term's [`Mode`].
pub fn decide_hibernation(outcome: &ClaimOutcome, mode: Mode) -> HibernationStep {
    match (outcome, mode) {
        (ClaimOutcome::Refused(ClaimRefusal::Fenced), _) => HibernationStep::StopFenced,
        (ClaimOutcome::Refused(reason), _) => HibernationStep::Skip(*reason),
        (ClaimOutcome::Warned(_), _) => HibernationStep::Warn,
        (ClaimOutcome::Claimed(_), Mode::DryRun) => HibernationStep::RecordDryRun,
        (ClaimOutcome::Claimed(_), Mode::RecordOnly) => HibernationStep::Finish,
        (ClaimOutcome::Claimed(_), Mode::Patch) => HibernationStep::Patch,
        (ClaimOutcome::Claimed(_), Mode::Announce) => HibernationStep::Announced,
    }
}

/// Why a claimed session is let go without a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The resource is gone.
    Deleted,
    /// Deleted and created again under the same name: another session.
    Recreated,
    /// `spec.state` is neither running nor hibernated any more.
    NotRunning,
    /// Exempt now (annotation, or an empty `spec.idleTimeout`).
    Exempt,
    /// The idle timeout (or max duration) grew since the claim: not due yet.
    TimeoutRaised,
    /// Claimed for max duration, but the Session has none any more.
    NoMaxDuration,
    /// The resource cannot be read as a Session.
    Unreadable,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::Deleted => "deleted",
            ReleaseReason::Recreated => "recreated",
            ReleaseReason::NotRunning => "not_running",
            ReleaseReason::Exempt => "exempt",
            ReleaseReason::TimeoutRaised => "timeout_raised",
            ReleaseReason::NoMaxDuration => "no_max_duration",
            ReleaseReason::Unreadable => "unreadable",
        }
    }
}

/// What to do with a claimed session, given the resource read just before
/// patching (`None`: gone, or not readable as a Session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Patch,
    /// The resource already says hibernated: record it, patch nothing.
    AlreadyHibernated,
    Release(ReleaseReason),
}

/// Checks everything the claim was decided on against the resource as it is
/// now: the claim saw the mirror, which may lag behind the resource.
pub fn decide(claim: &Claim, current: Option<&SessionMeta>) -> Decision {
    let Some(current) = current else {
        return Decision::Release(ReleaseReason::Deleted);
    };
    if let (Some(claimed), Some(now)) = (&claim.uid, &current.uid) {
        if claimed != now {
            return Decision::Release(ReleaseReason::Recreated);
        }
    }
    match current.state {
        ResourceState::Hibernated => return Decision::AlreadyHibernated,
        ResourceState::Terminated => return Decision::Release(ReleaseReason::NotRunning),
        ResourceState::Running => {}
    }
    if claim.reason == HibernationReason::MaxDuration {
        // Connections do not matter here, nor does the idle timeout.
        return match (claim.max_session_duration, current.max_session_duration) {
            (_, None) => Decision::Release(ReleaseReason::NoMaxDuration),
            (Some(claimed), Some(now)) if now > claimed => {
                Decision::Release(ReleaseReason::TimeoutRaised)
            }
            _ => Decision::Patch,
        };
    }
    match (claim.idle_timeout, current.idle_timeout) {
        (_, IdleTimeout::Off) => Decision::Release(ReleaseReason::Exempt),
        (IdleTimeout::After(claimed), IdleTimeout::After(now)) if now > claimed => {
            Decision::Release(ReleaseReason::TimeoutRaised)
        }
        _ => Decision::Patch,
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

    fn claim(idle: IdleTimeout) -> Claim {
        Claim {
            generation: Some(3),
            uid: Some("u1".into()),
            idle_timeout: idle,
            reason: HibernationReason::Idle,
            max_session_duration: None,
            ended: vec![],
        }
    }

    fn resource(uid: &str, state: ResourceState, idle: IdleTimeout) -> SessionMeta {
        SessionMeta {
            session_id: "s-1".parse().expect("sid"),
            uid: Some(uid.into()),
            owner: None,
            idle_source: Default::default(),
            state,
            idle_timeout: idle,
            generation: Some(3),
            max_session_duration: None,
            created_at: None,
        }
    }

    #[test]
    fn a_claim_is_checked_against_the_resource_as_it_is_now() {
        let ten = IdleTimeout::After(Duration::from_secs(600));
        let twenty = IdleTimeout::After(Duration::from_secs(1200));
        let five = IdleTimeout::After(Duration::from_secs(300));
        let c = claim(ten);
        let running = |uid, idle| resource(uid, ResourceState::Running, idle);
        let cases = [
            (None, Decision::Release(ReleaseReason::Deleted)),
            (
                Some(running("u2", ten)),
                Decision::Release(ReleaseReason::Recreated),
            ),
            (
                Some(resource("u1", ResourceState::Hibernated, ten)),
                Decision::AlreadyHibernated,
            ),
            (
                Some(resource("u1", ResourceState::Terminated, ten)),
                Decision::Release(ReleaseReason::NotRunning),
            ),
            (
                Some(running("u1", IdleTimeout::Off)),
                Decision::Release(ReleaseReason::Exempt),
            ),
            (
                Some(running("u1", twenty)),
                Decision::Release(ReleaseReason::TimeoutRaised),
            ),
            // A shorter timeout only makes the session more overdue.
            (Some(running("u1", five)), Decision::Patch),
            (Some(running("u1", ten)), Decision::Patch),
        ];
        for (current, expected) in cases {
            assert_eq!(decide(&c, current.as_ref()), expected, "{current:?}");
        }
        // A claim made before the uid was known does not refuse a resource.
        let unknown = Claim { uid: None, ..c };
        assert_eq!(decide(&unknown, Some(&running("u9", ten))), Decision::Patch);
    }

    #[test]
    fn a_max_duration_claim_is_checked_against_the_max_duration_only() {
        let hour = Duration::from_secs(3600);
        let c = Claim {
            reason: HibernationReason::MaxDuration,
            max_session_duration: Some(hour),
            ..claim(IdleTimeout::After(Duration::from_secs(600)))
        };
        let with = |md: Option<Duration>, idle| SessionMeta {
            max_session_duration: md,
            ..resource("u1", ResourceState::Running, idle)
        };
        let cases = [
            // Exempt from idle hibernation, still limited.
            (with(Some(hour), IdleTimeout::Off), Decision::Patch),
            (
                with(Some(hour / 2), IdleTimeout::After(hour * 10)),
                Decision::Patch,
            ),
            (
                with(None, IdleTimeout::After(hour)),
                Decision::Release(ReleaseReason::NoMaxDuration),
            ),
            (
                with(Some(hour * 2), IdleTimeout::Off),
                Decision::Release(ReleaseReason::TimeoutRaised),
            ),
        ];
        for (current, expected) in cases {
            assert_eq!(decide(&c, Some(&current)), expected, "{current:?}");
        }
    }

    #[test]
    fn every_claim_outcome_and_mode_has_its_step() {
        let refusals = [
            ClaimRefusal::Fenced,
            ClaimRefusal::NotMirrored,
            ClaimRefusal::NotRunning,
            ClaimRefusal::Busy,
            ClaimRefusal::Connected,
            ClaimRefusal::Exempt,
            ClaimRefusal::NotDue,
        ];
        let modes = [Mode::Patch, Mode::DryRun, Mode::RecordOnly, Mode::Announce];
        for mode in modes {
            for refusal in refusals {
                let expected = match refusal {
                    ClaimRefusal::Fenced => HibernationStep::StopFenced,
                    other => HibernationStep::Skip(other),
                };
                assert_eq!(
                    decide_hibernation(&ClaimOutcome::Refused(refusal), mode),
                    expected,
                    "{refusal:?} under {mode:?}"
                );
            }
            let claimed = ClaimOutcome::Claimed(claim(IdleTimeout::After(Duration::from_secs(60))));
            let expected = match mode {
                Mode::Patch => HibernationStep::Patch,
                Mode::DryRun => HibernationStep::RecordDryRun,
                Mode::RecordOnly => HibernationStep::Finish,
                Mode::Announce => HibernationStep::Announced,
            };
            assert_eq!(decide_hibernation(&claimed, mode), expected, "{mode:?}");
            let warned = ClaimOutcome::Warned(Warning {
                at: chrono::Utc::now(),
                owner: None,
                uid: None,
            });
            assert_eq!(decide_hibernation(&warned, mode), HibernationStep::Warn);
        }
    }

    #[test]
    fn failed_patches_back_off() {
        assert_eq!(retry_after_failure(1), Duration::from_secs(2));
        assert_eq!(retry_after_failure(2), Duration::from_secs(4));
        assert_eq!(retry_after_failure(30), Duration::from_secs(300));
    }

    #[test]
    fn a_released_patch_is_read_again_about_six_times_within_the_late_landing_minute() {
        let mut at = Duration::ZERO;
        let reads: Vec<u64> = (0..)
            .map(|n| {
                at += Unsure::delay(n);
                at
            })
            .take_while(|at| *at < LATE_LANDING)
            .map(|at| at.as_secs())
            .collect();
        assert_eq!(reads, [1, 3, 7, 15, 31, 47]);
    }
}

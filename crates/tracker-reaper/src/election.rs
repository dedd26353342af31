//! Leader election: which replica acts.
//!
//! A [`LeaseLock`] is taken or renewed every third of the lease; the
//! [`run_elector`] loop turns its answers into a `watch` of "am I leader".
//! A replica that cannot renew steps down two thirds of a lease after its
//! last successful renewal began, so it has stopped acting a third of a
//! lease before any other replica may take over. Nothing fences a leader
//! that is paused longer than that: every action is safe if two leaders
//! overlap (atomic claims in the store, idempotent inserts, patches
//! conditional on resourceVersion).
//!
//! Two locks: [`RedisLock`] (token-checked Lua in the core store) and
//! [`KubeLease`], a `coordination.k8s.io/v1` Lease taken with get / create /
//! replace under resourceVersion optimistic concurrency: a 409 is a lost race.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracker_core::Store;

use crate::error::{kube_timeout, Error, Result};
use crate::metrics::{KubeOp, Metrics, Task};

/// Something only one replica holds at a time, for a lease.
pub trait LeaseLock: Send + Sync + std::fmt::Debug {
    /// Takes the lock or renews our hold; false if another holder has it.
    fn try_acquire(&self) -> BoxFuture<'_, Result<bool>>;
    /// Gives the lock up if we hold it.
    fn release(&self) -> BoxFuture<'_, Result<()>>;
    /// For logs.
    fn holder(&self) -> &str;
}

/// The timing derived from the lease duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often the holder renews and a standby tries.
    pub renew_period: Duration,
    /// How long after a renewal began the holder still counts as leader
    /// without another successful one.
    pub renew_deadline: Duration,
    /// How soon a failed attempt is retried.
    pub retry_after_error: Duration,
}

impl Timing {
    pub fn new(lease: Duration) -> Self {
        let renew_period = lease / 3;
        Self {
            renew_period,
            renew_deadline: lease * 2 / 3,
            retry_after_error: (lease / 10)
                .clamp(Duration::from_millis(100), Duration::from_secs(1))
                .min(renew_period),
        }
    }
}

/// Whether a replica whose hold is valid until `valid_until` leads at `now`.
pub fn still_leading(valid_until: Option<Instant>, now: Instant) -> bool {
    valid_until.is_some_and(|until| now < until)
}

/// Runs the election until `stop`, publishing leadership on `tx` and in the
/// `tracker_reaper_is_leader` gauge; releases the lock on the way out.
pub async fn run_elector(
    lock: Arc<dyn LeaseLock>,
    lease: Duration,
    tx: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let timing = Timing::new(lease);
    let publish = |leading: bool| {
        let changed = tx.send_if_modified(|v| {
            let changed = *v != leading;
            *v = leading;
            changed
        });
        metrics.is_leader.set(if leading { 1.0 } else { 0.0 });
        if changed {
            metrics.leader_changes.increment(1);
            if leading {
                tracing::info!(holder = lock.holder(), "became leader");
            } else if stop.is_cancelled() {
                // Stepping down to shut down is the plan, not a problem.
                tracing::info!(holder = lock.holder(), "stepped down for shutdown");
            } else {
                tracing::warn!(holder = lock.holder(), "no longer leader");
            }
        }
    };
    let mut valid_until: Option<Instant> = None;
    loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            () = stop.cancelled() => break,
            r = tokio::time::timeout(timing.renew_period, lock.try_acquire()) => r,
        };
        let answered = match attempt {
            Ok(Ok(true)) => {
                valid_until = Some(started + timing.renew_deadline);
                true
            }
            Ok(Ok(false)) => {
                valid_until = None;
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "leader election attempt failed");
                match e {
                    Error::Store(_) => metrics.store_error(Task::Election),
                    _ => metrics.kube_error(KubeOp::Lease),
                }
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?timing.renew_period, "leader election attempt timed out");
                false
            }
        };
        let now = Instant::now();
        let leading = still_leading(valid_until, now);
        publish(leading);
        let pause = if answered {
            timing.renew_period
        } else {
            timing.retry_after_error
        };
        // Wake at the deadline too, to step down the moment it passes.
        let wake_at = match valid_until {
            Some(until) if leading => (now + pause).min(until),
            _ => now + pause,
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep_until(wake_at) => {}
        }
        if !still_leading(valid_until, Instant::now()) {
            publish(false);
        }
    }
    let held = *tx.borrow() || valid_until.is_some();
    publish(false);
    if held {
        match tokio::time::timeout(timing.renew_period, lock.release()).await {
            Ok(Ok(())) => tracing::info!(holder = lock.holder(), "released the lease"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "releasing the lease failed; it lapses by itself")
            }
            Err(_) => tracing::warn!("releasing the lease timed out; it lapses by itself"),
        }
    }
}

/// A random suffix, so two processes on one host never share a token.
pub fn unique_token(identity: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{identity}-{}", &id[..8])
}

/// The leader lock of `TRACKER_ELECTION=redis`.
#[derive(Debug, Clone)]
pub struct RedisLock {
    store: Store,
    name: String,
    token: String,
    lease: Duration,
}

impl RedisLock {
    pub fn new(store: Store, name: &str, token: String, lease: Duration) -> Self {
        Self {
            store,
            name: name.to_owned(),
            token,
            lease,
        }
    }
}

impl LeaseLock for RedisLock {
    fn try_acquire(&self) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            Ok(self
                .store
                .lock_acquire(&self.name, &self.token, self.lease)
                .await?)
        })
    }

    fn release(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.store.lock_release(&self.name, &self.token).await?;
            Ok(())
        })
    }

    fn holder(&self) -> &str {
        &self.token
    }
}

/// What to do with the Lease as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease object: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free or lapsed: take it over.
    TakeOver,
    /// Someone else holds it.
    Wait,
}

/// Decides from the Lease's spec. A lease lapses `leaseDurationSeconds`
/// after its `renewTime`, by our clock: replicas are assumed to keep their
/// clocks within a fraction of a lease of each other (NTP).
pub fn decide_lease(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => return LeaseAction::Renew,
        None | Some("") => return LeaseAction::TakeOver,
        Some(_) => {}
    }
    let (Some(renewed), Some(secs)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds)
    else {
        // A holder with no renewal time or duration can never lapse: treat it as lapsed.
        return LeaseAction::TakeOver;
    };
    let lapses = renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(secs)));
    match lapses {
        Ok(at) if now < at => LeaseAction::Wait,
        _ => LeaseAction::TakeOver,
    }
}

/// The leader Lease of `TRACKER_ELECTION=kubernetes`.
#[derive(Clone)]
pub struct KubeLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_seconds: i32,
    timeout: Duration,
}

impl std::fmt::Debug for KubeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLease")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl KubeLease {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: String,
        lease: Duration,
        timeout: Duration,
    ) -> Self {
        // The Lease counts whole seconds; round up so we never promise less than we hold.
        let secs = lease.as_secs() + u64::from(lease.subsec_nanos() > 0);
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            lease_seconds: i32::try_from(secs).unwrap_or(i32::MAX),
            timeout,
        }
    }

    async fn acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = kube_timeout(self.timeout, self.api.get_opt(&self.name)).await?;
        let action = decide_lease(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let written = match (action, current) {
            (LeaseAction::Wait, _) => return Ok(false),
            (LeaseAction::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.lease_seconds),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                kube_timeout(
                    self.timeout,
                    self.api.create(&PostParams::default(), &lease),
                )
                .await
            }
            (action, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if action == LeaseAction::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                }
                spec.renew_time = Some(MicroTime(now));
                spec.lease_duration_seconds = Some(self.lease_seconds);
                // The resourceVersion read above makes this a compare-and-swap.
                kube_timeout(
                    self.timeout,
                    self.api.replace(&self.name, &PostParams::default(), &lease),
                )
                .await
            }
        };
        match written {
            Ok(_) => Ok(true),
            // Another replica wrote first (create or replace): it won this round.
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn give_up(&self) -> Result<()> {
        let Some(mut lease) = kube_timeout(self.timeout, self.api.get_opt(&self.name)).await?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        let replaced = kube_timeout(
            self.timeout,
            self.api.replace(&self.name, &PostParams::default(), &lease),
        )
        .await;
        match replaced {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl LeaseLock for KubeLease {
    fn try_acquire(&self) -> BoxFuture<'_, Result<bool>> {
        Box::pin(self.acquire())
    }

    fn release(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.give_up())
    }

    fn holder(&self) -> &str {
        &self.identity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(
        holder: Option<&str>,
        renewed_secs_ago: i64,
        duration: i32,
        now: Timestamp,
    ) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(
                now.checked_sub(SignedDuration::from_secs(renewed_secs_ago))
                    .unwrap(),
            )),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn lease_decisions() {
        let now = Timestamp::now();
        assert_eq!(decide_lease(None, "a", now), LeaseAction::Create);
        assert_eq!(
            decide_lease(Some(&spec(Some("a"), 100, 15, now)), "a", now),
            LeaseAction::Renew
        );
        assert_eq!(
            decide_lease(Some(&spec(Some("b"), 5, 15, now)), "a", now),
            LeaseAction::Wait
        );
        assert_eq!(
            decide_lease(Some(&spec(Some("b"), 16, 15, now)), "a", now),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide_lease(Some(&spec(None, 1, 15, now)), "a", now),
            LeaseAction::TakeOver
        );
        assert_eq!(
            decide_lease(Some(&spec(Some(""), 1, 15, now)), "a", now),
            LeaseAction::TakeOver
        );
        let mut odd = spec(Some("b"), 1, 15, now);
        odd.renew_time = None;
        assert_eq!(decide_lease(Some(&odd), "a", now), LeaseAction::TakeOver);
    }

    #[test]
    fn timing_leaves_a_third_of_the_lease_between_stepping_down_and_takeover() {
        let t = Timing::new(Duration::from_secs(15));
        assert_eq!(t.renew_period, Duration::from_secs(5));
        assert_eq!(t.renew_deadline, Duration::from_secs(10));
        assert_eq!(t.retry_after_error, Duration::from_secs(1));
        let t = Timing::new(Duration::from_secs(1));
        assert!(t.retry_after_error <= t.renew_period);
        assert!(t.retry_after_error >= Duration::from_millis(100));
    }

    #[test]
    fn leadership_ends_at_the_deadline() {
        let now = Instant::now();
        assert!(!still_leading(None, now));
        assert!(still_leading(Some(now + Duration::from_millis(1)), now));
        assert!(!still_leading(Some(now), now));
    }

    #[test]
    fn tokens_are_unique_per_process() {
        let a = unique_token("host");
        assert!(a.starts_with("host-") && a.len() == "host-".len() + 8);
        assert_ne!(a, unique_token("host"));
    }
}

//! What the subsystems of one leadership term share ([`TermContext`]): the
//! store, PostgreSQL, how decisions are carried out, the term's fence, and
//! which sessions have a hibernation patch in flight.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracker_core::{SessionId, Store, Term};

use crate::events::EventSink;
use crate::metrics::Metrics;
use crate::platform::SessionApi;
use crate::publisher::Announcer;

/// What the subsystems of one leadership term share; built once per term
/// and handed to each of them.
#[derive(Debug, Clone)]
pub struct TermContext {
    pub store: Store,
    pub acting: Acting,
    pub events: EventSink,
    /// Queues session events for NATS (does nothing without it).
    pub announcer: Announcer,
    pub metrics: Arc<Metrics>,
    pub in_flight: InFlight,
    pub fence: Fence,
    pub pool: PgPool,
    /// True once the migrations are applied: nothing is written before.
    pub db_ready: watch::Receiver<bool>,
    /// The sweep nudges the archiver after it expired connections.
    pub archive_nudge: Arc<Notify>,
    /// The hibernator tells the mirror to list Sessions again after a data loss.
    pub relist: Arc<Notify>,
    /// Cancelled when the term ends (leadership lost, fenced, shutdown).
    pub stop: CancellationToken,
}

/// How decisions are carried out.
#[derive(Debug, Clone)]
pub enum Acting {
    /// Patch Session resources (`TRACKER_PLATFORM=kubernetes`).
    Patch(Arc<dyn SessionApi>),
    /// `TRACKER_DRY_RUN=true`: record and count, change nothing.
    DryRun,
    /// `TRACKER_PLATFORM=none`: record the transition in the store and in
    /// `session_events`, act on no cluster.
    RecordOnly,
    /// `TRACKER_PLATFORM=docker`: announce hibernate and wake through NATS
    /// for a controller to carry out; each counts as done once NATS has
    /// acknowledged its event (see [`crate::publisher`]).
    Announce,
}

/// How decisions are carried out, without the means: what pure decisions
/// look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Patch,
    DryRun,
    RecordOnly,
    Announce,
}

impl Acting {
    pub fn mode(&self) -> Mode {
        match self {
            Acting::Patch(_) => Mode::Patch,
            Acting::DryRun => Mode::DryRun,
            Acting::RecordOnly => Mode::RecordOnly,
            Acting::Announce => Mode::Announce,
        }
    }

    /// For event details.
    pub fn platform(&self) -> &'static str {
        match self {
            Acting::Patch(_) => "kubernetes",
            Acting::DryRun => "dry_run",
            Acting::RecordOnly => "none",
            Acting::Announce => "docker",
        }
    }
}

/// The term a leader acts under, and the way its acting subsystems stop
/// when the store says a newer leader has written: every reaper write carries
/// the term, and a shard that has seen a newer one refuses it ("fenced").
#[derive(Debug, Clone)]
pub struct Fence {
    term: Term,
    stop: CancellationToken,
    fenced: Arc<AtomicBool>,
}

impl Fence {
    /// Acting under `term` until `stop` is cancelled.
    pub fn new(term: Term, stop: CancellationToken) -> Self {
        Self {
            term,
            stop,
            fenced: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn term(&self) -> Term {
        self.term
    }

    /// The token that ends the term's acting.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// A write was refused because a newer leader wrote first: this replica
    /// stops acting at once (the election will tell it soon that it lost).
    pub fn fenced(&self, op: &'static str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::warn!(term = %self.term, op, "a newer leader has written to the store; stopping to act");
        }
        self.stop.cancel();
    }

    /// Whether this term ended by being fenced.
    pub fn was_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }
}

/// Sessions whose hibernation is between claim and finish (or rollback).
///
/// The waker leaves them alone: a wake requested during that time must not be
/// acknowledged on a read that still shows `running` while our own patch to
/// `hibernated` is about to land, or the session would stay hibernated with a
/// live connection. Once the hibernation is finished or rolled back, the wake
/// (still pending in the store) is handled against the resource as it is.
#[derive(Debug, Clone, Default)]
pub struct InFlight(Arc<Mutex<HashSet<SessionId>>>);

impl InFlight {
    /// Marks `id` in flight until the guard drops (also when cancelled).
    pub fn enter(&self, id: &SessionId) -> InFlightGuard {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        InFlightGuard {
            set: self.clone(),
            id: id.clone(),
        }
    }

    pub fn contains(&self, id: &SessionId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }
}

/// Removes its session from the [`InFlight`] set when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    set: InFlight,
    id: SessionId,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_lasts_as_long_as_the_guard() {
        let set = InFlight::default();
        let id: SessionId = "s".parse().unwrap();
        {
            let _g = set.enter(&id);
            assert!(set.contains(&id));
        }
        assert!(!set.contains(&id));
    }
}

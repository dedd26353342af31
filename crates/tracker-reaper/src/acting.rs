//! What the hibernator and the waker share: how they act, and which sessions
//! have a hibernation patch in flight.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use tracker_core::SessionId;

use crate::platform::SessionApi;

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
}

impl Acting {
    /// For event details.
    pub fn platform(&self) -> &'static str {
        match self {
            Acting::Patch(_) => "kubernetes",
            Acting::DryRun => "dry_run",
            Acting::RecordOnly => "none",
        }
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

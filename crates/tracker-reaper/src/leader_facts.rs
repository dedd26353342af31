//! What the leader publishes for explanations: per shard, until when its
//! startup guard holds hibernations back and whether it runs dry. Only the
//! leader knows these; the API reads them from Redis to say why a session
//! is still awake (`GET /v1/sessions/{id}/explain`).
//!
//! Each write carries the term (a replaced leader's is refused) and a
//! lifetime, so the facts of a leader that died vanish by themselves. They
//! are written again well before they expire, and at once when the guard
//! moves (a shard lost its data).

use std::time::Duration;

use tokio::time::Instant;
use tracker_core::{Store, Written};

use crate::acting::Fence;
use crate::metrics::{Metrics, Task};

/// How long published facts live without being written again. Long enough
/// that rewriting them costs little (one call per shard every third of it:
/// 32 shards, 0.5 calls/s), short enough that "no leader" shows within a
/// minute of the last one dying; a new leader overwrites them at once.
pub fn lifetime(interval: Duration) -> Duration {
    (interval * 10).max(Duration::from_secs(60))
}

/// Publishes the leader's facts on every shard when they are due.
#[derive(Debug)]
pub struct Publisher {
    lifetime: Duration,
    dry_run: bool,
    /// When the facts were last written on every shard, and the guard they said.
    last: Option<(Instant, Instant)>,
}

impl Publisher {
    pub fn new(lifetime: Duration, dry_run: bool) -> Self {
        Self {
            lifetime,
            dry_run,
            last: None,
        }
    }

    /// Whether the facts must be written now: never written, a third of
    /// their lifetime gone, or the guard moved since.
    pub fn due(&self, now: Instant, guard_until: Instant) -> bool {
        match self.last {
            None => true,
            Some((at, guard)) => guard != guard_until || now >= at + self.lifetime / 3,
        }
    }

    /// Writes the facts on every shard if due. A refused write (a newer
    /// leader) stops the term; a failed one is tried again next tick.
    pub async fn publish(
        &mut self,
        store: &Store,
        fence: &Fence,
        metrics: &Metrics,
        guard_until: Instant,
    ) {
        let now = Instant::now();
        if !self.due(now, guard_until) {
            return;
        }
        let guard_left = guard_until.saturating_duration_since(now);
        let mut all = true;
        for shard in store.keys().shards() {
            match store
                .publish_leader_facts(shard, fence.term(), guard_left, self.dry_run, self.lifetime)
                .await
            {
                Ok(Written::Fenced) => {
                    fence.fenced("leader_facts");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    all = false;
                    metrics.store_error(Task::Hibernate);
                    tracing::debug!(shard = shard.0, error = %e, "publishing the leader's facts failed");
                }
            }
        }
        if all {
            self.last = Some((now, guard_until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_written_again_before_they_expire_and_when_the_guard_moves() {
        let life = lifetime(Duration::from_secs(1));
        assert_eq!(life, Duration::from_secs(60));
        assert_eq!(lifetime(Duration::from_secs(9)), Duration::from_secs(90));
        let t0 = Instant::now();
        let guard = t0 + Duration::from_secs(60);
        let mut p = Publisher::new(life, false);
        assert!(p.due(t0, guard));
        p.last = Some((t0, guard));
        assert!(!p.due(t0 + Duration::from_secs(19), guard));
        assert!(p.due(t0 + Duration::from_secs(20), guard));
        assert!(p.due(t0 + Duration::from_secs(1), guard + Duration::from_secs(1)));
    }
}

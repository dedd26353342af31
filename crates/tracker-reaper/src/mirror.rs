//! The mirror: a watch on Session resources keeps what the API reads about
//! them (owner, `spec.state`, idle timeout, exemption) in the store.
//!
//! It runs on the leader only. Two mirrors could undo each other: after a
//! re-list one forgets the sessions it did not list, which a replica that
//! listed later may have just mirrored, and forgetting drops a pending wake.
//! After a leader change the new leader lists everything again at once.
//!
//! Writes are keyed by `metadata.uid` and ordered by `metadata.generation` in
//! the store, so a stale event never overwrites newer news (ours or the
//! watch's), and a Session deleted and created again under the same name is a
//! new session. A state changed by someone else is followed, not fought; a
//! Session found hibernated while someone is connected gets a wake.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracker_core::{SessionId, Store, Written};

use crate::acting::{Fence, TermContext};
use crate::backoff::Backoff;
use crate::metrics::{KubeOp, Metrics, Task};
use crate::session::{session_meta, Session};

/// Mirrors Sessions of `api`'s namespace until the term ends. The term's
/// `relist` starts the watch over with a full list: after Redis lost its
/// data, the store has forgotten every Session while the watch has nothing
/// new to say.
pub async fn run(ctx: TermContext, api: Api<Session>, default_idle: Duration) {
    let TermContext {
        store,
        metrics,
        fence,
        relist,
        stop,
        ..
    } = ctx;
    let mirror = Mirror {
        store,
        default_idle,
        metrics,
        fence,
        stop: stop.clone(),
    };
    loop {
        let stream = watcher::watcher(api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        // Names listed since the last Init; None outside a (re)list.
        let mut listed: Option<HashSet<SessionId>> = None;
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                () = relist.notified() => {
                    tracing::info!("listing Sessions again: the store lost what it mirrored");
                    break;
                }
                e = stream.next() => e,
            };
            match event {
                None => return,
                Some(Err(e)) => {
                    mirror.metrics.kube_error(KubeOp::WatchSessions);
                    tracing::warn!(error = %e, "watching Sessions failed; retrying with backoff");
                }
                Some(Ok(Event::Init)) => listed = Some(HashSet::new()),
                Some(Ok(Event::InitApply(s))) => {
                    if let Some(id) = mirror.apply(&s).await {
                        listed.get_or_insert_with(HashSet::new).insert(id);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    let listed = listed.take().unwrap_or_default();
                    mirror.forget_unlisted(&listed).await;
                    tracing::info!(sessions = listed.len(), "mirrored Sessions after a list");
                }
                Some(Ok(Event::Apply(s))) => {
                    mirror.apply(&s).await;
                }
                Some(Ok(Event::Delete(s))) => mirror.delete(&s).await,
            }
        }
    }
}

struct Mirror {
    store: Store,
    default_idle: Duration,
    metrics: Arc<Metrics>,
    fence: Fence,
    stop: CancellationToken,
}

impl Mirror {
    /// Mirrors one Session; answers its id if it is one we track.
    async fn apply(&self, s: &Session) -> Option<SessionId> {
        let meta = match session_meta(s, self.default_idle) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(name = %s.name_any(), error = %e, "Session not mirrored");
                // Still listed: a valid name with an odd state must not be forgotten.
                return s.name_any().parse().ok();
            }
        };
        let id = meta.session_id.clone();
        let term = self.fence.term();
        self.retry("mirror_session", &id, || {
            self.store.mirror_session(&meta, term)
        })
        .await;
        tracing::debug!(session_id = %id, state = meta.state.as_str(), "Session mirrored");
        Some(id)
    }

    async fn delete(&self, s: &Session) {
        let Ok(id) = s.name_any().parse::<SessionId>() else {
            return;
        };
        let (term, uid) = (self.fence.term(), s.metadata.uid.as_deref());
        self.retry("forget_session", &id, || {
            self.store.forget_session(&id, term, uid)
        })
        .await;
        tracing::debug!(session_id = %id, "Session deleted; forgotten");
    }

    async fn forget_unlisted(&self, listed: &HashSet<SessionId>) {
        for shard in self.store.keys().shards() {
            let known = match self.store.known_sessions(shard).await {
                Ok(k) => k,
                Err(e) => {
                    self.metrics.store_error(Task::Mirror);
                    tracing::warn!(shard = shard.0, error = %e, "listing mirrored sessions failed; the next list retries");
                    continue;
                }
            };
            for id in known.into_iter().filter(|id| !listed.contains(id)) {
                let term = self.fence.term();
                self.retry("forget_session", &id, || {
                    self.store.forget_session(&id, term, None)
                })
                .await;
                tracing::info!(session_id = %id, "Session gone while unwatched; forgotten");
            }
        }
    }

    /// Retries a store write until it succeeds or we stop: holding the watch
    /// back while Redis is down loses no event. A fenced write stops this
    /// leader's acting altogether.
    async fn retry<F, Fut>(&self, what: &'static str, id: &SessionId, mut call: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = tracker_core::Result<Written>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match call().await {
                Ok(Written::Fenced) => {
                    self.fence.fenced(what);
                    return;
                }
                Ok(_) => return,
                Err(e) => {
                    self.metrics.store_error(Task::Mirror);
                    tracing::warn!(session_id = %id, op = what, error = %e, "mirroring failed; retrying");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

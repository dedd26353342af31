//! One read of a session's state per heartbeat interval per replica, however
//! many of its WebSockets the replica holds.
//!
//! Polling from every socket would cost N reads of an O(N) view per interval
//! for N sockets on one session. Instead, the first socket of a session on
//! this replica starts a watcher task; it reads the session once per
//! interval and publishes the view through a [`tokio::sync::watch`] channel
//! when its state changed, and the sockets push it to their clients. The
//! last socket to leave stops the watcher.
//!
//! A socket must not act on a read older than its own registration: the
//! registration's answer is newer, and the old read could make it push a
//! state the session already left. So every read is numbered when it starts,
//! a socket remembers the number at which it subscribed and ignores earlier
//! reads, and the first read after a subscription is published even if the
//! state did not change, so the new socket learns where the session stands
//! after its registration.
//!
//! A read also carries the session's hibernation warning (the deadline of
//! its max session duration, once the reaper recorded that its clients are
//! to be warned), and a new warning is published like a new state: each
//! socket sends it once ([`super`]), whichever replica it is on.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracker_core::{SessionId, SessionState, SessionView, Store};

use crate::error::Backend;
use crate::metrics::Metrics;

/// A session's view and its hibernation warning: the time a hibernation
/// for max duration is due, once its clients are to be warned.
pub type SessionRead = (SessionView, Option<DateTime<Utc>>);

/// A session's state and hibernation warning: what a watcher compares
/// between reads.
pub type StateRead = (SessionState, Option<DateTime<Utc>>);

/// Where the watchers read sessions from: the store, or a fake in tests.
pub trait SessionSource: Clone + Send + Sync + 'static {
    fn read_session(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Option<SessionRead>, tracker_core::Error>> + Send;

    /// The state and warning alone, where the source has a cheaper read for
    /// them than the whole view.
    fn read_state(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Option<StateRead>, tracker_core::Error>> + Send {
        let read = self.read_session(session);
        async move { Ok(read.await?.map(|(view, warning)| (view.state, warning))) }
    }
}

impl SessionSource for Store {
    fn read_session(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Option<SessionRead>, tracker_core::Error>> + Send {
        self.session_watch(session)
    }

    fn read_state(
        &self,
        session: &SessionId,
    ) -> impl Future<Output = Result<Option<StateRead>, tracker_core::Error>> + Send {
        self.session_state(session)
    }
}

/// One published read.
#[derive(Debug)]
pub struct Snapshot {
    /// Number of the read, counted from 1 when the watcher started it.
    pub read: u64,
    pub view: SessionView,
    /// When the session is hibernated for its max duration, once its
    /// clients are to be warned; a new running period has a new time.
    pub warning: Option<DateTime<Utc>>,
}

/// The watchers of this replica, one per session with sockets here.
#[derive(Debug)]
pub struct SessionWatches<S = Store> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for SessionWatches<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<S> {
    source: S,
    interval: Duration,
    metrics: Metrics,
    /// Stops every watcher (shutdown).
    stop: CancellationToken,
    watchers: Mutex<HashMap<SessionId, Watcher>>,
}

#[derive(Debug)]
struct Watcher {
    shared: Arc<Shared>,
    subscribers: usize,
    stop: CancellationToken,
}

/// What a watcher and its subscribers share.
#[derive(Debug)]
struct Shared {
    tx: watch::Sender<Option<Arc<Snapshot>>>,
    reads: Mutex<Reads>,
}

#[derive(Debug, Default)]
struct Reads {
    /// Reads started so far.
    started: u64,
    /// Publish the next read whatever it says: someone subscribed.
    force: bool,
}

/// A poisoned lock only means a panic elsewhere mid-update of plain
/// counters; they are still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: SessionSource> SessionWatches<S> {
    /// Watchers read every `interval`; all of them stop when `stop` fires.
    pub fn new(source: S, interval: Duration, metrics: Metrics, stop: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                interval,
                metrics,
                stop,
                watchers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Subscribes to `session`'s state, starting its watcher if this is the
    /// first subscriber. Call it after the socket's registration: only reads
    /// that start after this call reach the subscription.
    pub fn subscribe(&self, session: &SessionId) -> Subscription<S> {
        let shared = {
            let mut watchers = lock(&self.inner.watchers);
            let watcher = watchers
                .entry(session.clone())
                .or_insert_with(|| self.start(session));
            watcher.subscribers += 1;
            watcher.shared.clone()
        };
        // Under the reads lock, so that no read starts between taking the
        // number and asking for the next read to be published.
        let (after, rx) = {
            let mut reads = lock(&shared.reads);
            reads.force = true;
            (reads.started, shared.tx.subscribe())
        };
        Subscription {
            rx,
            after,
            session: session.clone(),
            shared,
            watches: self.clone(),
        }
    }

    /// Sessions watched now (one watcher each).
    pub fn watched(&self) -> usize {
        lock(&self.inner.watchers).len()
    }

    fn start(&self, session: &SessionId) -> Watcher {
        let (tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            tx,
            reads: Mutex::new(Reads::default()),
        });
        let stop = self.inner.stop.child_token();
        self.inner.metrics.session_watch_started();
        tokio::spawn(run(
            self.inner.clone(),
            session.clone(),
            shared.clone(),
            stop.clone(),
        ));
        Watcher {
            shared,
            subscribers: 0,
            stop,
        }
    }

    fn unsubscribe(&self, session: &SessionId, shared: &Arc<Shared>) {
        let mut watchers = lock(&self.inner.watchers);
        let Some(watcher) = watchers.get_mut(session) else {
            return;
        };
        if !Arc::ptr_eq(&watcher.shared, shared) {
            return;
        }
        watcher.subscribers -= 1;
        if watcher.subscribers == 0 {
            watcher.stop.cancel();
            watchers.remove(session);
            self.inner.metrics.session_watch_stopped();
        }
    }
}

/// A read of `session` failed: counted, and logged quietly (the next
/// interval reads again).
fn read_failed<S>(inner: &Inner<S>, session: &SessionId, e: &tracker_core::Error) {
    inner.metrics.backend_error(Backend::Redis);
    tracing::debug!(session_id = %session, error = %e, "could not read the session state");
}

/// The watcher of one session: reads it every interval until stopped.
async fn run<S: SessionSource>(
    inner: Arc<Inner<S>>,
    session: SessionId,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + inner.interval, inner.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last: Option<StateRead> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Numbered before the cheap read: a whole read that follows it counts
        // as begun then, which only makes a socket subscribed meanwhile wait
        // for the next one (it forced it).
        let (read, forced) = {
            let mut reads = lock(&shared.reads);
            reads.started += 1;
            (reads.started, std::mem::take(&mut reads.force))
        };
        if !forced && last.is_some() {
            // The state and warning alone; the whole view only if they changed.
            inner.metrics.session_watch_read();
            let seen = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                seen = inner.source.read_state(&session) => seen,
            };
            match seen {
                Ok(seen) if seen.is_some() && seen == last => continue,
                Ok(_) => {}
                Err(e) => {
                    read_failed(&inner, &session, &e);
                    continue;
                }
            }
        }
        inner.metrics.session_watch_read();
        let result = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            result = inner.source.read_session(&session) => result,
        };
        match result {
            Ok(Some((view, warning))) => {
                if forced || last != Some((view.state, warning)) {
                    last = Some((view.state, warning));
                    shared.tx.send_replace(Some(Arc::new(Snapshot {
                        read,
                        view,
                        warning,
                    })));
                }
            }
            other => {
                if let Err(e) = other {
                    read_failed(&inner, &session, &e);
                }
                // The subscriber that asked has not heard yet: ask again.
                if forced {
                    lock(&shared.reads).force = true;
                }
            }
        }
    }
}

/// One socket's view of its session's watcher; leaving drops it.
#[derive(Debug)]
pub struct Subscription<S: SessionSource = Store> {
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
    /// Reads up to this number started before the subscription.
    after: u64,
    session: SessionId,
    shared: Arc<Shared>,
    watches: SessionWatches<S>,
}

impl<S: SessionSource> Subscription<S> {
    /// The next published read that started after the subscription. Cancel
    /// safe: a `select!` may drop it and call again.
    pub async fn next(&mut self) -> Arc<Snapshot> {
        loop {
            if self.rx.changed().await.is_err() {
                // The watcher is held while subscribed, so this does not
                // happen; if it did, there would be nothing more to hear.
                std::future::pending::<()>().await;
            }
            if let Some(snapshot) = self.rx.borrow_and_update().as_ref() {
                if snapshot.read > self.after {
                    return snapshot.clone();
                }
            }
        }
    }
}

impl<S: SessionSource> Drop for Subscription<S> {
    fn drop(&mut self) {
        self.watches.unsubscribe(&self.session, &self.shared);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A session whose state the test sets, counting its reads: whole views
    /// and, apart, cheap state reads.
    #[derive(Debug, Clone)]
    struct Fake {
        state: Arc<Mutex<SessionState>>,
        warning: Arc<Mutex<Option<DateTime<Utc>>>>,
        reads: Arc<AtomicU64>,
        state_reads: Arc<AtomicU64>,
        /// When set, a read answers only once the test adds a permit.
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                state: Arc::new(Mutex::new(SessionState::Running)),
                warning: Arc::new(Mutex::new(None)),
                reads: Arc::new(AtomicU64::new(0)),
                state_reads: Arc::new(AtomicU64::new(0)),
                gate: None,
            }
        }

        fn set(&self, state: SessionState) {
            *lock(&self.state) = state;
        }

        fn reads(&self) -> u64 {
            self.reads.load(Ordering::SeqCst)
        }

        /// Reads of either kind.
        fn all_reads(&self) -> u64 {
            self.reads() + self.state_reads.load(Ordering::SeqCst)
        }
    }

    impl SessionSource for Fake {
        async fn read_session(
            &self,
            session: &SessionId,
        ) -> Result<Option<SessionRead>, tracker_core::Error> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("open").forget();
            }
            let state = *lock(&self.state);
            let warning = *lock(&self.warning);
            Ok(Some((
                crate::test_support::view(session, state, None),
                warning,
            )))
        }

        async fn read_state(
            &self,
            _session: &SessionId,
        ) -> Result<Option<StateRead>, tracker_core::Error> {
            self.state_reads.fetch_add(1, Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("open").forget();
            }
            Ok(Some((*lock(&self.state), *lock(&self.warning))))
        }
    }

    const TICK: Duration = Duration::from_secs(1);

    fn watches(fake: &Fake) -> SessionWatches<Fake> {
        SessionWatches::new(fake.clone(), TICK, Metrics::new(), CancellationToken::new())
    }

    /// Lets the watcher tasks run through `ticks` intervals (time is paused:
    /// the runtime jumps to each timer).
    async fn pass(ticks: u32) {
        tokio::time::sleep(TICK * ticks + TICK / 2).await;
    }

    async fn next_state(sub: &mut Subscription<Fake>) -> SessionState {
        tokio::time::timeout(TICK * 3, sub.next())
            .await
            .expect("a published read")
            .view
            .state
    }

    #[tokio::test(start_paused = true)]
    async fn many_subscribers_cost_one_read_per_tick() {
        let fake = Fake::new();
        let w = watches(&fake);
        let sid: SessionId = "s-many".parse().unwrap();
        let mut subs: Vec<_> = (0..50).map(|_| w.subscribe(&sid)).collect();
        assert_eq!(w.watched(), 1);
        pass(10).await;
        assert_eq!(fake.all_reads(), 10);
        // One whole view, for the subscribers; then the cheap state reads.
        assert_eq!(fake.reads(), 1);
        // The first read after they subscribed reached every one of them.
        for sub in &mut subs {
            assert_eq!(next_state(sub).await, SessionState::Running);
        }
        // A change reaches all of them, still for one read per tick.
        fake.set(SessionState::Hibernated);
        for sub in &mut subs {
            assert_eq!(next_state(sub).await, SessionState::Hibernated);
        }
        assert!(fake.all_reads() <= 13, "{} reads", fake.all_reads());
        assert_eq!(fake.reads(), 2, "a whole view for the change");
        // A second session has a watcher of its own.
        let other = w.subscribe(&"s-other".parse().unwrap());
        assert_eq!(w.watched(), 2);
        drop(other);
        assert_eq!(w.watched(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_state_is_published_once_per_new_subscriber() {
        let fake = Fake::new();
        let w = watches(&fake);
        let sid: SessionId = "s-late".parse().unwrap();
        let mut early = w.subscribe(&sid);
        assert_eq!(next_state(&mut early).await, SessionState::Running);
        // Nothing changes: nothing is published.
        pass(3).await;
        assert!(tokio::time::timeout(TICK * 3, early.next()).await.is_err());
        // A newcomer gets the next read, though the state is the same.
        let mut late = w.subscribe(&sid);
        assert_eq!(next_state(&mut late).await, SessionState::Running);
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_begun_before_a_subscription_does_not_reach_it() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let fake = Fake {
            gate: Some(gate.clone()),
            ..Fake::new()
        };
        let w = watches(&fake);
        let sid: SessionId = "s-stale".parse().unwrap();
        let mut early = w.subscribe(&sid);
        // The first read starts and hangs; then a socket subscribes (as
        // after its registration) and the state changes.
        pass(1).await;
        assert_eq!(fake.reads(), 1);
        let mut late = w.subscribe(&sid);
        fake.set(SessionState::Hibernated);
        gate.add_permits(1);
        assert_eq!(next_state(&mut early).await, SessionState::Hibernated);
        // The late one hears only the read begun after it subscribed.
        assert!(
            tokio::time::timeout(TICK / 4, late.next()).await.is_err(),
            "a read older than the subscription reached it"
        );
        gate.add_permits(1);
        assert_eq!(next_state(&mut late).await, SessionState::Hibernated);
        assert_eq!(fake.reads(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_subscriber_leaving_stops_the_watcher() {
        let fake = Fake::new();
        let w = watches(&fake);
        let sid: SessionId = "s-gone".parse().unwrap();
        let a = w.subscribe(&sid);
        let b = w.subscribe(&sid);
        pass(2).await;
        assert_eq!(fake.all_reads(), 2);
        drop(a);
        assert_eq!(w.watched(), 1);
        drop(b);
        assert_eq!(w.watched(), 0);
        pass(5).await;
        assert_eq!(
            fake.all_reads(),
            2,
            "a watcher without subscribers kept reading"
        );
        // Coming back starts a new one.
        let _c = w.subscribe(&sid);
        pass(1).await;
        assert_eq!(fake.all_reads(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_warning_is_published_like_a_state_change() {
        let fake = Fake::new();
        let w = watches(&fake);
        let sid: SessionId = "s-warned".parse().unwrap();
        let mut sub = w.subscribe(&sid);
        assert_eq!(next_state(&mut sub).await, SessionState::Running);
        let at = chrono::Utc::now();
        *lock(&fake.warning) = Some(at);
        let snapshot = tokio::time::timeout(TICK * 3, sub.next())
            .await
            .expect("the warning is published");
        assert_eq!(snapshot.view.state, SessionState::Running);
        assert_eq!(snapshot.warning, Some(at));
        // Unchanged: not published again.
        pass(3).await;
        assert!(tokio::time::timeout(TICK * 3, sub.next()).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_every_watcher() {
        let fake = Fake::new();
        let stop = CancellationToken::new();
        let w = SessionWatches::new(fake.clone(), TICK, Metrics::new(), stop.clone());
        let _a = w.subscribe(&"s-a".parse().unwrap());
        let _b = w.subscribe(&"s-b".parse().unwrap());
        pass(1).await;
        assert_eq!(fake.reads(), 2);
        stop.cancel();
        pass(3).await;
        assert_eq!(fake.reads(), 2);
    }
}

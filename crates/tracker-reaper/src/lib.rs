//! `tracker-reaper`: the connection tracker's singleton. Any number of
//! replicas run; the one holding the lease acts, the others stand by.
//!
//! While leader, it
//! - **sweeps** ([`sweeper`]): expires connections without a heartbeat for
//!   the window, every `TRACKER_SWEEP_INTERVAL`, every shard;
//! - **archives** ([`archiver`]): moves finished connections from the Redis
//!   outbox to `connection_history` in PostgreSQL, exactly one row each;
//! - **mirrors** ([`mirror`]): keeps Session resources' owner, state and idle
//!   timeout in the store for the API (leader only: see the module);
//! - **hibernates** ([`hibernator`]) idle Sessions and **wakes** ([`waker`])
//!   those a connection arrives for, patching `spec.state`.
//!
//! Always (leader or not) it serves `/metrics`, `/healthz`, `/readyz`
//! ([`http`]), takes part in the election ([`election`]), applies the
//! migrations and writes queued session events ([`events`]).
//!
//! Deciding and doing are apart: the store's Lua scripts and the pure
//! functions here (`may_hibernate`, `decide_lease`, `wake_action`,
//! `session_meta`, ...) decide and are unit-tested; the adapters
//! ([`platform`], [`db`], [`election`]'s locks) do the I/O and are tested
//! against real Redis, real PostgreSQL and a *fake* Kubernetes API server
//! (`crates/fake-kube`), since no real one runs here.
//!
//! Leadership: acting subsystems run under a child token created on gaining
//! the lease and cancelled the moment it is lost. From then on they start no
//! new work; a session action already past its claim completes (each call is
//! bounded by `TRACKER_KUBE_TIMEOUT` / `TRACKER_REDIS_TIMEOUT`) so that its
//! claim is finished or rolled back and its event recorded. On shutdown they
//! stop first, then the lease is released, then queued events are flushed.

pub mod acting;
pub mod archiver;
pub mod backoff;
pub mod config;
pub mod db;
pub mod election;
pub mod error;
pub mod events;
pub mod hibernator;
pub mod http;
pub mod metrics;
pub mod mirror;
pub mod platform;
pub mod session;
pub mod sweeper;
pub mod waker;

use std::sync::Arc;
use std::time::Duration;

use kube::Api;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracker_core::{ClockOffset, Store};

pub use config::{Config, Election, Platform};
pub use error::{Error, Result};

use crate::acting::{Acting, Fence, InFlight, TermContext};
use crate::backoff::Backoff;
use crate::election::{KubeLease, LeaseLock, RedisLock};
use crate::events::EventSink;
use crate::metrics::Metrics;
use crate::platform::{KubeSessions, SessionApi};
use crate::session::Session;

/// How long stopping subsystems may take before we stop waiting for them.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// What tests (and embedders) may put in place of what the config builds.
#[derive(Default)]
pub struct Overrides {
    /// The Kubernetes client; otherwise inferred (`KUBECONFIG` or in-cluster).
    pub kube_client: Option<kube::Client>,
    /// The Session reader/patcher; otherwise [`KubeSessions`] on the client.
    pub session_api: Option<Arc<dyn SessionApi>>,
    /// Shared with the store to move Redis time in tests.
    pub clock: Option<ClockOffset>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("kube_client", &self.kube_client.is_some())
            .field("session_api", &self.session_api)
            .field("clock", &self.clock)
            .finish()
    }
}

/// A built reaper: connected, its metrics listener bound, not yet running.
pub struct Application {
    cfg: Config,
    store: Store,
    pool: PgPool,
    metrics: Arc<Metrics>,
    listener: TcpListener,
    kube: Option<kube::Client>,
    session_api: Option<Arc<dyn SessionApi>>,
    lock: Arc<dyn LeaseLock>,
    leader: watch::Sender<bool>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("cfg", &self.cfg)
            .field("store", &self.store)
            .field("listener", &self.listener)
            .field("lock", &self.lock)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Validates the settings, connects and binds.
    pub async fn build(cfg: Config) -> Result<Self> {
        Self::build_with(cfg, Overrides::default()).await
    }

    pub async fn build_with(cfg: Config, overrides: Overrides) -> Result<Self> {
        cfg.validate()?;
        let mut store = Store::connect(&cfg.store_config()).await?;
        if let Some(clock) = overrides.clock {
            store = store.with_clock(clock);
        }
        let pool = db::pool(cfg.database_url.expose())?;
        let needs_kube =
            cfg.platform == Platform::Kubernetes || cfg.election == Election::Kubernetes;
        let kube = match (needs_kube, overrides.kube_client) {
            (false, _) => None,
            (true, Some(client)) => Some(client),
            (true, None) => Some(
                kube::Client::try_default()
                    .await
                    .map_err(|e| Error::KubeConfig(e.to_string()))?,
            ),
        };
        let session_api = match (cfg.platform, overrides.session_api, &kube) {
            (Platform::None, _, _) => None,
            (Platform::Kubernetes, Some(api), _) => Some(api),
            (Platform::Kubernetes, None, Some(client)) => Some(Arc::new(KubeSessions::new(
                client.clone(),
                &cfg.namespace,
                cfg.kube_timeout,
            ))
                as Arc<dyn SessionApi>),
            (Platform::Kubernetes, None, None) => None,
        };
        let identity = cfg.identity();
        let lock: Arc<dyn LeaseLock> = match (cfg.election, &kube) {
            (Election::Redis, _) => Arc::new(RedisLock::new(
                store.clone(),
                &cfg.lease_name,
                election::unique_token(&identity),
                cfg.lease_duration,
            )),
            (Election::Kubernetes, Some(client)) => Arc::new(KubeLease::new(
                client.clone(),
                &cfg.namespace,
                &cfg.lease_name,
                identity,
                cfg.lease_duration,
                cfg.kube_timeout,
            )),
            (Election::Kubernetes, None) => {
                return Err(Error::KubeConfig(
                    "the Lease election needs a Kubernetes client".into(),
                ))
            }
        };
        let listener = TcpListener::bind(cfg.metrics_listen)
            .await
            .map_err(|source| Error::Bind {
                addr: cfg.metrics_listen,
                source,
            })?;
        Ok(Self {
            cfg,
            store,
            pool,
            metrics: Arc::new(Metrics::new()),
            listener,
            kube,
            session_api,
            lock,
            leader: watch::Sender::new(false),
        })
    }

    /// The bound port of the metrics listener (useful with port 0).
    pub fn metrics_port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Whether this replica leads, now and as it changes.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn acting(&self) -> Acting {
        match (&self.session_api, self.cfg.dry_run) {
            (_, true) => Acting::DryRun,
            (Some(api), false) => Acting::Patch(api.clone()),
            (None, false) => Acting::RecordOnly,
        }
    }

    /// Runs until `shutdown` is cancelled, then stops in order: acting
    /// subsystems, the lease (released), the event writer (flushed), the
    /// metrics listener.
    pub async fn run_until(self, shutdown: CancellationToken) -> Result<()> {
        let acting = self.acting();
        let background = TaskTracker::new();
        let last = CancellationToken::new();
        background.spawn(http::serve(
            self.listener,
            self.metrics.clone(),
            self.store.clone(),
            last.clone(),
        ));

        let (db_ready_tx, db_ready) = watch::channel(false);
        if self.cfg.skip_migrations {
            db_ready_tx.send_replace(true);
        } else {
            background.spawn(migrate(
                self.pool.clone(),
                db_ready_tx.clone(),
                shutdown.clone(),
            ));
        }

        let (events, events_rx) = EventSink::new(&self.cfg.namespace, self.metrics.clone());
        background.spawn(events::run_writer(
            events_rx,
            self.pool.clone(),
            db_ready.clone(),
            self.metrics.clone(),
            last.clone(),
        ));

        let elector_stop = CancellationToken::new();
        let mut leader = self.leader.subscribe();
        background.spawn(election::run_elector(
            self.lock.clone(),
            self.cfg.lease_duration,
            self.leader.clone(),
            self.metrics.clone(),
            elector_stop.clone(),
        ));

        let nudge = Arc::new(Notify::new());
        tracing::info!(
            holder = self.lock.holder(),
            platform = acting.platform(),
            "reaper running; standing by for the lease"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = leader.wait_for(|l| *l) => if r.is_err() { break },
            }
            let term = shutdown.child_token();
            let Some(fence) = begin_term(&self.store, &self.metrics, &term, &mut leader).await
            else {
                if shutdown.is_cancelled() {
                    break;
                }
                continue;
            };
            let fence = Fence::new(fence, term.clone());
            let subsystems = TaskTracker::new();
            // The hibernator notices a Redis data loss; the mirror then lists again.
            let relist = Arc::new(Notify::new());
            subsystems.spawn(sweeper::run(
                self.store.clone(),
                self.cfg.sweep_interval,
                self.metrics.clone(),
                nudge.clone(),
                term.clone(),
            ));
            subsystems.spawn(archiver::run(
                self.store.clone(),
                self.pool.clone(),
                db_ready.clone(),
                self.cfg.archive_interval,
                self.metrics.clone(),
                nudge.clone(),
                term.clone(),
            ));
            if let (Some(client), Some(_)) = (&self.kube, &self.session_api) {
                subsystems.spawn(mirror::run(
                    Api::<Session>::namespaced(client.clone(), &self.cfg.namespace),
                    self.store.clone(),
                    self.cfg.default_idle_timeout,
                    self.metrics.clone(),
                    relist.clone(),
                    fence.clone(),
                    term.clone(),
                ));
            }
            let ctx = TermContext {
                store: self.store.clone(),
                acting: acting.clone(),
                events: events.clone(),
                metrics: self.metrics.clone(),
                in_flight: InFlight::default(),
                fence: fence.clone(),
            };
            let hibernator = hibernator::Hibernator::new(
                ctx.clone(),
                relist,
                hibernator::Settings {
                    interval: self.cfg.hibernate_interval,
                    heartbeat_window: self.cfg.heartbeat_window,
                    claim_lifetime: (self.cfg.kube_timeout * 3).max(Duration::from_secs(10)),
                    dry_run_retry: self.cfg.default_idle_timeout.max(Duration::from_secs(60)),
                    default_idle_timeout: self.cfg.default_idle_timeout,
                },
            );
            subsystems.spawn(hibernator.run(term.clone()));
            let waker =
                waker::Waker::new(ctx, self.cfg.default_idle_timeout, self.cfg.wake_interval);
            subsystems.spawn(waker.run(term.clone()));
            subsystems.close();

            tokio::select! {
                () = term.cancelled() => {}
                _ = leader.wait_for(|l| !*l) => {}
            }
            term.cancel();
            if tokio::time::timeout(STOP_DEADLINE, subsystems.wait())
                .await
                .is_err()
            {
                tracing::error!("acting subsystems did not stop in time");
            }
            if shutdown.is_cancelled() {
                break;
            }
            if fence.was_fenced() {
                // Another replica acts under a newer term while the election
                // still names us: wait a lease for the election to settle
                // rather than fence it back at once.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = leader.wait_for(|l| !*l) => {}
                    () = tokio::time::sleep(self.cfg.lease_duration) => {}
                }
            }
        }

        elector_stop.cancel();
        drop(events);
        drop(db_ready_tx);
        last.cancel();
        background.close();
        if tokio::time::timeout(STOP_DEADLINE, background.wait())
            .await
            .is_err()
        {
            tracing::error!("background tasks did not stop in time");
        }
        tracing::info!("reaper stopped");
        Ok(())
    }
}

/// Starts a term: draws a fresh term and fences every shard with it,
/// retrying while Redis is unreachable. `None` if leadership or the process
/// ends first.
async fn begin_term(
    store: &Store,
    metrics: &Metrics,
    stop: &CancellationToken,
    leader: &mut watch::Receiver<bool>,
) -> Option<tracker_core::Term> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match store.begin_term().await {
            Ok(term) => {
                tracing::info!(term = %term, "leader term begins; earlier leaders are fenced");
                return Some(term);
            }
            Err(e) => {
                metrics.store_error(metrics::Task::Election);
                tracing::warn!(error = %e, "beginning a leader term failed; retrying");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            _ = leader.wait_for(|l| !*l) => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Applies the migrations, retrying while PostgreSQL is unreachable, then
/// reports the database ready.
async fn migrate(pool: PgPool, ready: watch::Sender<bool>, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match db::migrate(&pool).await {
            Ok(()) => {
                tracing::info!("database migrations applied");
                ready.send_replace(true);
                return;
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let attempts = backoff.attempts();
                if attempts >= 10 {
                    tracing::error!(error = %e, attempts, "applying migrations keeps failing; history is not archived");
                } else {
                    tracing::warn!(error = %e, retry_in = ?delay, "applying migrations failed; retrying");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

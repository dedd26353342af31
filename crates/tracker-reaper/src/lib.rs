//! `tracker-reaper`: the connection tracker's singleton. Any number of
//! replicas run; the one holding the lease acts, the others stand by.
//!
//! While leader, it
//! - **sweeps** ([`sweeper`]): expires connections without a heartbeat for
//!   the window, every `TRACKER_SWEEP_INTERVAL`, every shard;
//! - **archives** ([`archiver`]): moves finished connections from the Redis
//!   outbox to `connection_history` in PostgreSQL, exactly one row each;
//! - **keeps the history's monthly partitions** ([`partitions`]): creates
//!   the coming months, drops those past `TRACKER_HISTORY_RETENTION`;
//! - **refreshes the daily usage rollup** ([`rollup`]) of ended days;
//! - **mirrors** ([`mirror`]): keeps Session resources' owner, state and idle
//!   timeout in the store for the API (leader only: see the module);
//! - **hibernates** ([`hibernator`]) idle Sessions and **wakes** ([`waker`])
//!   those a connection arrives for, patching `spec.state` (or, on
//!   `docker`, announcing both through NATS for a controller to carry out);
//! - **publishes session events** ([`publisher`]) from their Redis outbox
//!   to NATS JetStream, when `TRACKER_NATS_URL` is set.
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
pub mod leader_facts;
pub mod metrics;
pub mod mirror;
pub mod nats;
pub mod partitions;
pub mod platform;
pub mod publisher;
pub mod rollup;
pub mod session;
pub mod signals;
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
use crate::nats::Nats;
use crate::platform::{KubeSessions, SessionApi};
use crate::publisher::Announcer;
use crate::session::Session;

/// How long stopping subsystems may take before we stop waiting for them.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// What tests (and embedders) may put in place of what the config builds.
#[derive(Default)]
pub struct Overrides {
    /// The Kubernetes client; otherwise inferred (`KUBECONFIG` or in-cluster)
    /// and built by [`kube_client`], whose answers tests should see too.
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

/// The reaper's Kubernetes client for `config`, with the client's own retry
/// of 429/503/504 answers turned off.
///
/// Every write the reaper makes is conditional (a Session patch carries the
/// `resourceVersion` it decided on, a Lease replace the one it read), and an
/// API server may apply a request it then answers 503/504. A silent retry of
/// such a write meets the version its first attempt created and is refused
/// with 409, which reads as someone else's change, the one answer that is
/// not ambiguous. Without the retry the reaper sees the 503/504 itself and
/// treats it as what it is, an answer that may or may not have landed; its
/// loops retry on their next tick, after reading.
pub fn kube_client(mut config: kube::Config) -> Result<kube::Client> {
    config.default_retry = false;
    kube::Client::try_from(config).map_err(|e| Error::KubeConfig(e.to_string()))
}

/// A built reaper: connected, its metrics listener bound, not yet running.
pub struct Application {
    cfg: Config,
    store: Store,
    pool: PgPool,
    metrics: Arc<Metrics>,
    /// Bound at build; taken by [`Application::run_until`] to serve on.
    listener: Option<TcpListener>,
    kube: Option<kube::Client>,
    session_api: Option<Arc<dyn SessionApi>>,
    lock: Arc<dyn LeaseLock>,
    leader: watch::Sender<bool>,
    /// The JetStream publisher; `None` without `TRACKER_NATS_URL`.
    nats: Option<Nats>,
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

impl tracker_runtime::service::Service for Application {
    const NAME: &'static str = "tracker-reaper";
    type Config = Config;
    type BuildError = Error;
    type RunError = Error;

    fn log_format(cfg: &Config) -> tracker_runtime::LogFormat {
        cfg.log_format
    }

    async fn build(cfg: Config) -> Result<Self> {
        Application::build(cfg).await
    }

    fn settings_error(e: &Error) -> Option<String> {
        match e {
            Error::Config(e) => Some(e.to_string()),
            _ => None,
        }
    }

    fn announce(&self) {
        tracing::info!(metrics_port = self.metrics_port(), "metrics listener bound");
    }

    async fn run_until(self, shutdown: CancellationToken) -> Result<()> {
        Application::run_until(self, shutdown).await
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
                kube::Config::infer()
                    .await
                    .map_err(|e| Error::KubeConfig(e.to_string()))
                    .and_then(kube_client)?,
            ),
        };
        let session_api = match (cfg.platform, overrides.session_api, &kube) {
            (Platform::None | Platform::Docker, _, _) => None,
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
        let nats = match cfg.nats_url() {
            Some(url) => Some(
                Nats::connect(url, cfg.nats_timeout)
                    .await
                    .map_err(|e| Error::Config(format!("TRACKER_NATS_URL: {e}")))?,
            ),
            None => None,
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
            listener: Some(listener),
            kube,
            session_api,
            lock,
            leader: watch::Sender::new(false),
            nats,
        })
    }

    /// The bound port of the metrics listener (useful with port 0).
    pub fn metrics_port(&self) -> u16 {
        self.listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
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
            (_, false) if self.cfg.platform == Platform::Docker => Acting::Announce,
            (Some(api), false) => Acting::Patch(api.clone()),
            (None, false) => Acting::RecordOnly,
        }
    }

    /// Runs until `shutdown` is cancelled, then stops in order: acting
    /// subsystems, the lease (released), the event writer (flushed), the
    /// metrics listener.
    pub async fn run_until(mut self, shutdown: CancellationToken) -> Result<()> {
        let (background, shared) = self.start_background(&shutdown);
        let mut leader = self.leader.subscribe();
        tracing::info!(
            holder = self.lock.holder(),
            platform = shared.acting.platform(),
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
            let ctx = self.term_context(&shared, Fence::new(fence, term.clone()));
            let fence = ctx.fence.clone();
            self.act(ctx, &mut leader).await;
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
        drop(shared);
        background.stop().await;
        tracing::info!("reaper stopped");
        Ok(())
    }

    /// Starts what runs leader or not: the metrics listener, the migrations,
    /// the event writer and the election.
    fn start_background(&mut self, shutdown: &CancellationToken) -> (Background, Shared) {
        let bg = Background {
            tasks: TaskTracker::new(),
            last: CancellationToken::new(),
            elector_stop: CancellationToken::new(),
            db_ready: watch::Sender::new(false),
        };
        if let Some(listener) = self.listener.take() {
            bg.tasks.spawn(http::serve(
                listener,
                self.metrics.clone(),
                self.store.clone(),
                bg.last.clone(),
            ));
        }
        if self.cfg.skip_migrations {
            bg.db_ready.send_replace(true);
        } else {
            bg.tasks.spawn(migrate(
                self.pool.clone(),
                bg.db_ready.clone(),
                shutdown.clone(),
            ));
        }
        let (events, events_rx) = EventSink::new(&self.cfg.namespace, self.metrics.clone());
        bg.tasks.spawn(events::run_writer(
            events_rx,
            self.pool.clone(),
            bg.db_ready.subscribe(),
            self.metrics.clone(),
            bg.last.clone(),
        ));
        bg.tasks.spawn(election::run_elector(
            self.lock.clone(),
            self.cfg.lease_duration,
            self.leader.clone(),
            self.metrics.clone(),
            bg.elector_stop.clone(),
        ));
        let announcer = Announcer::new(
            self.cfg.platform.as_str(),
            self.nats.is_some() && !self.cfg.dry_run,
        );
        let shared = Shared {
            acting: self.acting(),
            events,
            announcer,
            db_ready: bg.db_ready.subscribe(),
            archive_nudge: Arc::new(Notify::new()),
        };
        (bg, shared)
    }

    /// What one term's subsystems share, fresh for each term but for what
    /// outlives terms.
    fn term_context(&self, shared: &Shared, fence: Fence) -> TermContext {
        TermContext {
            store: self.store.clone(),
            acting: shared.acting.clone(),
            events: shared.events.clone(),
            announcer: shared.announcer.clone(),
            metrics: self.metrics.clone(),
            in_flight: InFlight::default(),
            pool: self.pool.clone(),
            db_ready: shared.db_ready.clone(),
            archive_nudge: shared.archive_nudge.clone(),
            relist: Arc::new(Notify::new()),
            stop: fence.stop_token(),
            fence,
        }
    }

    /// Runs the acting subsystems for one term, until it is cancelled or
    /// leadership is lost; then stops them (bounded by [`STOP_DEADLINE`]).
    async fn act(&self, ctx: TermContext, leader: &mut watch::Receiver<bool>) {
        let cfg = &self.cfg;
        let term = ctx.stop.clone();
        let subsystems = TaskTracker::new();
        subsystems.spawn(sweeper::run(ctx.clone(), cfg.sweep_interval));
        subsystems.spawn(archiver::run(ctx.clone(), cfg.archive_interval));
        subsystems.spawn(partitions::run(ctx.clone(), cfg.retention()));
        subsystems.spawn(rollup::run(ctx.clone()));
        if let (Some(nats), true) = (&self.nats, ctx.announcer.enabled()) {
            subsystems.spawn(publisher::run(
                ctx.clone(),
                nats.clone(),
                publisher::BACKSTOP,
            ));
        }
        if let (Some(client), Some(_)) = (&self.kube, &self.session_api) {
            let api = Api::<Session>::namespaced(client.clone(), &cfg.namespace);
            subsystems.spawn(mirror::run(ctx.clone(), api, cfg.default_idle_timeout));
        }
        let hibernator = hibernator::Hibernator::new(
            ctx.clone(),
            hibernator::Settings {
                interval: cfg.hibernate_interval,
                heartbeat_window: cfg.heartbeat_window,
                claim_lifetime: (cfg.kube_timeout * 3).max(Duration::from_secs(10)),
                dry_run_retry: cfg.default_idle_timeout.max(Duration::from_secs(60)),
                default_idle_timeout: cfg.default_idle_timeout,
            },
        );
        subsystems.spawn(hibernator.run(term.clone()));
        let waker = waker::Waker::new(ctx, cfg.default_idle_timeout, cfg.wake_interval);
        subsystems.spawn(waker.run(term.clone()));
        subsystems.close();

        tokio::select! {
            () = term.cancelled() => {}
            _ = leader.wait_for(|l| !*l) => {}
        }
        term.cancel();
        wait_stopped(&subsystems, "acting subsystems").await;
    }
}

/// Waits for closed `tasks` to end, at most [`STOP_DEADLINE`].
async fn wait_stopped(tasks: &TaskTracker, what: &'static str) {
    if tokio::time::timeout(STOP_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::error!(tasks = what, "tasks did not stop in time");
    }
}

/// The tasks that run leader or not, and how they are stopped.
struct Background {
    tasks: TaskTracker,
    /// Stops the metrics listener and the event writer (which flushes first).
    last: CancellationToken,
    elector_stop: CancellationToken,
    db_ready: watch::Sender<bool>,
}

impl Background {
    /// Releases the lease, flushes the events, closes the listener; bounded
    /// by [`STOP_DEADLINE`].
    async fn stop(self) {
        self.elector_stop.cancel();
        drop(self.db_ready);
        self.last.cancel();
        self.tasks.close();
        wait_stopped(&self.tasks, "background").await;
    }
}

/// What outlives leadership terms: the queue of session events, the
/// migrations' readiness and the archive nudge.
struct Shared {
    acting: Acting,
    events: EventSink,
    announcer: Announcer,
    db_ready: watch::Receiver<bool>,
    archive_nudge: Arc<Notify>,
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

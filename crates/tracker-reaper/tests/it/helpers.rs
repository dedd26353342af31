//! What every scenario needs: a reaper config on a test's own key prefix and
//! database, reapers in their own runtime (so a test can kill one as SIGKILL
//! would: no release, no flush), connections, bounded polling. The TCP proxy
//! that cuts PostgreSQL off is `tracker_e2e::proxy`'s.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::ConnectOptions;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracker_core::testing::{self, Backend};
use tracker_core::{
    ClockOffset, ConnectionId, Limits, NewConnection, Protocol, RegisterOutcome, SessionId, Store,
    StoreConfig, UserAgent,
};
use tracker_reaper::nats::{Payload, STREAM};
use tracker_reaper::{Application, Config, Election, Overrides, Platform};

/// Namespace of the Sessions and Leases in tests.
pub const NS: &str = "streamspace";

/// A test's Redis (own prefix), its clock and its database URL.
pub struct Env {
    pub store_cfg: StoreConfig,
    pub store: Store,
    pub clock: ClockOffset,
    pub db_url: String,
    pub pool: PgPool,
}

impl Env {
    pub async fn new(backend: Backend, window: Duration, pool: &PgPool) -> Self {
        let store_cfg = testing::config(backend, window);
        let clock = ClockOffset::default();
        let store = testing::connect(&store_cfg).await.with_clock(clock.clone());
        let db_url = pool.connect_options().to_url_lossy().to_string();
        Self {
            store_cfg,
            store,
            clock,
            db_url,
            pool: pool.clone(),
        }
    }

    /// A reaper config for this env: fast ticks, Redis election, no platform.
    pub fn config(&self) -> Config {
        let mut cfg = Config::with_database_url(&self.db_url).unwrap();
        cfg.redis.redis_url = self.store_cfg.urls.join(",");
        cfg.redis.redis_mode = self.store_cfg.mode;
        cfg.redis.key_prefix = self.store_cfg.key_prefix.clone();
        cfg.redis.redis_shards = self.store_cfg.shards;
        cfg.heartbeat_window = self.store_cfg.heartbeat_window;
        cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
        cfg.election = Election::Redis;
        cfg.platform = Platform::None;
        cfg.skip_migrations = true;
        cfg.namespace = NS.into();
        cfg.lease_name = format!("reaper-{}", self.store_cfg.key_prefix);
        cfg.lease_duration = Duration::from_secs(3);
        cfg.sweep_interval = Duration::from_millis(200);
        cfg.hibernate_interval = Duration::from_millis(100);
        cfg.archive_interval = Duration::from_millis(50);
        cfg.wake_interval = Duration::from_millis(10);
        cfg.kube_timeout = Duration::from_secs(2);
        cfg
    }

    pub fn overrides(&self) -> Overrides {
        Overrides {
            clock: Some(self.clock.clone()),
            ..Overrides::default()
        }
    }

    /// Registers a connection and answers its id.
    pub async fn connect(&self, session: &str, user: &str) -> ConnectionId {
        let id = ConnectionId::new_random();
        let new = NewConnection {
            session_id: sid(session),
            connection_id: id,
            user_id: user.parse().unwrap(),
            protocol: Protocol::Websocket,
            client_ip: Some("10.1.2.3".parse().unwrap()),
            user_agent: Some(UserAgent::truncated("it/1.0")),
        };
        match self.store.register(&new, Limits::default()).await.unwrap() {
            RegisterOutcome::Created(_) => id,
            other => panic!("registration refused: {other:?}"),
        }
    }

    pub async fn history_rows(&self) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM connection_history")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// Event types recorded for a session, oldest first.
    pub async fn events(&self, session: &str) -> Vec<String> {
        sqlx::query_scalar::<_, String>(
            "SELECT event_type FROM session_events WHERE session_id = $1 ORDER BY occurred_at",
        )
        .bind(session.to_owned())
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

pub fn sid(s: &str) -> SessionId {
    s.parse().unwrap()
}

/// A reaper running in its own runtime on its own thread.
pub struct Reaper {
    pub metrics_port: u16,
    pub leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
    kill: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    pub async fn start(cfg: Config, overrides: Overrides) -> Self {
        // `TRACKER_TEST_LOG=1` (with RUST_LOG) shows the reapers' logs.
        if std::env::var_os("TRACKER_TEST_LOG").is_some() {
            tracker_runtime::init_telemetry(tracker_runtime::LogFormat::Text);
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Application::build_with(cfg, overrides).await.unwrap();
                let _ = ready_tx.send((app.metrics_port(), app.leadership()));
                tokio::select! {
                    r = app.run_until(token) => r.unwrap(),
                    _ = kill_rx => {}
                }
            });
            // Killed or stopped: drop every task where it stands, as a SIGKILL would.
            rt.shutdown_background();
        });
        let (metrics_port, leader) = ready_rx.await.expect("reaper failed to build");
        Self {
            metrics_port,
            leader,
            shutdown,
            kill: Some(kill_tx),
            thread: Some(thread),
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    pub async fn wait_leader(&mut self, timeout: Duration) {
        tokio::time::timeout(timeout, self.leader.wait_for(|l| *l))
            .await
            .expect("did not become leader in time")
            .unwrap();
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    /// Abrupt stop, as on SIGKILL: no release, no flush.
    pub async fn kill(mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(format!("http://127.0.0.1:{}{path}", self.metrics_port))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
    }
}

/// Polls `check` every 20 ms until it answers `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A metric's value in a Prometheus text exposition (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A Session resource as a user or the session controller would write it.
pub fn session_json(
    name: &str,
    state: &str,
    idle: Option<&str>,
    exempt: bool,
) -> serde_json::Value {
    let mut s = serde_json::json!({
        "apiVersion": "stream.space/v1alpha1",
        "kind": "Session",
        "metadata": {"name": name},
        "spec": {"user": "alice", "state": state, "image": "desktop:latest"},
    });
    if let Some(idle) = idle {
        s["spec"]["idleTimeout"] = idle.into();
    }
    if exempt {
        s["metadata"]["annotations"] = serde_json::json!({"stream.space/auto-hibernate": "false"});
    }
    s
}

/// `spec.state` of a Session in the fake API server.
pub fn kube_state(fake: &fake_kube::FakeKube, name: &str) -> Option<String> {
    fake.session(NS, name)?
        .pointer("/spec/state")?
        .as_str()
        .map(str::to_owned)
}

/// Waits until the Session's `spec.state` in the fake is `state`.
pub async fn wait_kube_state(
    fake: &fake_kube::FakeKube,
    name: &str,
    state: &str,
    timeout: std::time::Duration,
) {
    fake.wait_for_session(
        NS,
        name,
        |s| s.and_then(|s| s.pointer("/spec/state")?.as_str()) == Some(state),
        timeout,
    )
    .await
    .unwrap_or_else(|e| panic!("{name} not {state} in time: {e}"));
}

/// The `spec.state` values of the patches a Session received, in order.
pub fn patched_states(fake: &fake_kube::FakeKube, name: &str) -> Vec<String> {
    fake.session_patches(name)
        .iter()
        .filter_map(|r| r.body.pointer("/spec/state")?.as_str().map(str::to_owned))
        .collect()
}

impl Env {
    /// A config acting on the fake API server.
    pub fn kube_config(&self) -> Config {
        let mut cfg = self.config();
        cfg.platform = Platform::Kubernetes;
        cfg
    }

    pub fn kube_overrides(&self, fake: &fake_kube::FakeKube) -> Overrides {
        Overrides {
            kube_client: Some(tracker_reaper::kube_client(fake.kube_config()).unwrap()),
            ..self.overrides()
        }
    }

    /// A Kubernetes config whose Redis is reached through a proxy the test
    /// can cut (the store of the test itself stays direct).
    pub async fn kube_config_behind_proxy(&self) -> (Config, tracker_e2e::proxy::Proxy) {
        let redis: std::net::SocketAddr = self.store_cfg.urls[0]
            .trim_start_matches("redis://")
            .parse()
            .unwrap();
        let proxy = tracker_e2e::proxy::Proxy::start(redis).await.unwrap();
        let mut cfg = self.kube_config();
        cfg.redis.redis_url = format!("redis://{}", proxy.addr());
        (cfg, proxy)
    }

    /// Waits until the store reports `session` in `state` (the mirror or
    /// the reaper followed).
    pub async fn wait_state(&self, session: &str, state: tracker_core::SessionState) {
        eventually(
            Duration::from_secs(10),
            &format!("{session} {state:?} in the store"),
            || async { (self.state(session).await == Some(state)).then_some(()) },
        )
        .await;
    }

    /// The session's state as the store reports it.
    pub async fn state(&self, session: &str) -> Option<tracker_core::SessionState> {
        self.store
            .session(&sid(session))
            .await
            .unwrap()
            .map(|v| v.state)
    }
}

impl Env {
    /// [`Env::connect`] through another store handle (another shard count).
    pub async fn connect_on(&self, store: &Store, session: &str, user: &str) -> ConnectionId {
        let id = ConnectionId::new_random();
        let new = NewConnection {
            session_id: sid(session),
            connection_id: id,
            user_id: user.parse().unwrap(),
            protocol: Protocol::Http,
            client_ip: Some("192.0.2.7".parse().unwrap()),
            user_agent: Some(UserAgent::truncated("bench")),
        };
        match store.register(&new, Limits::default()).await.unwrap() {
            RegisterOutcome::Created(_) => id,
            other => panic!("registration refused: {other:?}"),
        }
    }
}

/// The next patch of Session `name` meets `fault`.
pub fn fault_next_patch(fake: &fake_kube::FakeKube, name: &str, fault: fake_kube::Fault) {
    use fake_kube::{FaultRule, Operation, Target};
    fake.add_fault(FaultRule::next(
        1,
        Target::sessions(&[Operation::Patch]).named(name),
        fault,
    ))
    .unwrap();
}

/// The next patch of Session `name` is applied at once and answered a
/// second later: time for a test to cut Redis between the two.
pub fn answer_next_patch_late(fake: &fake_kube::FakeKube, name: &str) {
    fault_next_patch(
        fake,
        name,
        fake_kube::Fault::Slow {
            delay: Duration::from_secs(1),
            apply: fake_kube::ApplyAt::BeforeDelay,
        },
    );
}

/// One event as the stream holds it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub msg_id: Option<String>,
    pub payload: Payload,
}

/// A fresh data directory for a test's own `nats-server`.
pub fn nats_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "tracker-it-nats-{tag}-{}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Every message of the events stream, oldest first (empty if none yet, or
/// while NATS does not answer).
pub async fn stream_events(url: &str) -> Vec<Stored> {
    let messages = tracker_e2e::nats_server::read_stream(url, STREAM)
        .await
        .unwrap_or_default();
    messages
        .into_iter()
        .map(|m| Stored {
            sequence: m.sequence,
            subject: m.subject,
            msg_id: m.msg_id,
            payload: serde_json::from_slice(&m.payload).unwrap(),
        })
        .collect()
}

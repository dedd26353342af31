//! The system under test, in-process: the API (`Application::build_with`),
//! optionally a reaper acting on the fake Kubernetes API server, on a test's
//! own Redis key prefix and PostgreSQL database; tokens; bounded polling.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use sqlx::postgres::PgPool;
use sqlx::ConnectOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracker_api::config::Config as ApiConfig;
use tracker_api::history::History;
use tracker_core::testing::{self, Backend};
use tracker_core::{RedisMode, Store, StoreConfig};

/// At least 32 bytes, as the API demands of an HS256 secret.
pub const SECRET: &str = "browser-test-secret-0123456789abcdef";
/// Namespace of the Sessions in the fake API server.
pub const NS: &str = "streamspace";

/// A signed token for `sub` with `roles`, valid for an hour.
pub fn token(sub: &str, roles: &[&str]) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": sub, "roles": roles, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign a token")
}

pub fn admin_token() -> String {
    token("operator", &["admin"])
}

/// One API instance on port 0 with a store of its own prefix.
pub struct Api {
    pub base: String,
    pub store: Store,
    pub store_cfg: StoreConfig,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<std::io::Result<()>>>,
}

impl Api {
    /// `window` is the heartbeat window; `pool`, when given, backs the history.
    pub async fn spawn(backend: Backend, window: Duration, pool: Option<&PgPool>) -> Self {
        Self::spawn_on(testing::config(backend, window), 0, pool).await
    }

    /// An instance on the keys of `store_cfg`, listening on `port` (0: any),
    /// e.g. the same API again after a restart.
    pub async fn spawn_on(store_cfg: StoreConfig, port: u16, pool: Option<&PgPool>) -> Self {
        let window = store_cfg.heartbeat_window;
        let args = [
            "tracker-api".to_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--jwt-secret".into(),
            SECRET.into(),
            "--key-prefix".into(),
            store_cfg.key_prefix.clone(),
            "--heartbeat-interval".into(),
            format!("{}ms", window.as_millis() / 3),
            "--heartbeat-window".into(),
            format!("{}ms", window.as_millis()),
        ];
        let cfg = <ApiConfig as clap::Parser>::try_parse_from(args).expect("valid API settings");
        let history = pool.map(|p| History::from_pool(p.clone(), Duration::from_secs(5)));
        let app =
            tracker_api::Application::build_with(cfg, testing::connect(&store_cfg).await, history)
                .await
                .expect("build the API");
        let addr = SocketAddr::from(([127, 0, 0, 1], app.port()));
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until(shutdown.clone()));
        Self {
            base: format!("http://{addr}"),
            store: testing::connect(&store_cfg).await,
            store_cfg,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
            shutdown,
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET with a token (none when empty): status and JSON body (null if none).
    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let mut req = self.http.get(self.url(path));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        let res = req.send().await.expect("the API answers");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// POST JSON with a token: status and JSON body.
    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("the API answers");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .expect("the API task")
                .expect("the API stops cleanly");
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A reaper on the API's keys and the test's database, acting on the fake
/// Kubernetes API server, with fast ticks and Redis election.
pub struct Reaper {
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

impl Reaper {
    pub async fn start(api: &Api, pool: &PgPool, fake: &fake_kube::FakeKube) -> Self {
        let db_url = pool.connect_options().to_url_lossy().to_string();
        let cfg = &api.store_cfg;
        let window = format!("{}ms", cfg.heartbeat_window.as_millis());
        let shards = cfg.shards.to_string();
        let lease = format!("reaper-{}", cfg.key_prefix);
        let urls = cfg.urls.join(",");
        let mode = match cfg.mode {
            RedisMode::Standalone => "standalone",
            RedisMode::Cluster => "cluster",
        };
        let args = [
            "--database-url",
            &db_url,
            "--redis-url",
            &urls,
            "--redis-mode",
            mode,
            "--key-prefix",
            &cfg.key_prefix,
            "--redis-shards",
            &shards,
            "--heartbeat-window",
            &window,
            "--metrics-listen",
            "127.0.0.1:0",
            "--election",
            "redis",
            "--platform",
            "kubernetes",
            "--skip-migrations",
            "true",
            "--namespace",
            NS,
            "--lease-name",
            &lease,
            "--lease-duration",
            "3s",
            "--sweep-interval",
            "200ms",
            "--hibernate-interval",
            "100ms",
            "--archive-interval",
            "50ms",
            "--kube-timeout",
            "2s",
        ];
        let cfg = tracker_reaper::Config::parse_without_env(args).expect("valid reaper settings");
        let overrides = tracker_reaper::Overrides {
            kube_client: Some(
                tracker_reaper::kube_client(fake.kube_config())
                    .expect("a client of the fake API server"),
            ),
            ..tracker_reaper::Overrides::default()
        };
        let app = tracker_reaper::Application::build_with(cfg, overrides)
            .await
            .expect("build the reaper");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            app.run_until(token).await.expect("the reaper runs");
        });
        Self {
            shutdown,
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await.expect("the reaper stops cleanly");
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A Session resource as the session controller would write it.
pub fn session_json(name: &str, user: &str, idle_timeout: &str) -> Value {
    json!({
        "apiVersion": "stream.space/v1alpha1",
        "kind": "Session",
        "metadata": {"name": name},
        "spec": {"user": user, "state": "running", "idleTimeout": idle_timeout},
    })
}

/// Polls `check` every 50 ms until it answers `Some`, or panics after
/// `timeout` with `what` and the last thing `check` saw.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

//! `tracker-api`: the stateless HTTP and WebSocket replicas of the connection
//! tracker.
//!
//! Proxies, the session API and browsers call it to register, heartbeat and
//! close connections; it also tracks WebSockets itself. All state lives in
//! the shared [`tracker_core::Store`], so any replica serves any call.
//!
//! Layout:
//! - [`config`]: the settings (`TRACKER_*` variables and equal flags),
//!   checked once, in [`Application::build`];
//! - [`auth`]: who is calling (bearer JWTs), with [`token_cache`] keeping
//!   recently verified tokens;
//! - [`access`]: what the caller may do: roles, and who may act on which
//!   session;
//! - [`client_ip`]: the client's address, and when `X-Forwarded-For` counts;
//! - [`error`]: the one table from error to status and code;
//! - [`extract`]: JSON and path extractors whose rejections name the field,
//!   and query-string decoding;
//! - [`routes`]: the router and the handlers, by concept, WebSocket
//!   tracking ([`routes::ws`]) among them;
//! - [`serve`]: the HTTP/1.1 server loop with its timeouts and connection cap;
//! - [`history`]: the PostgreSQL archive reader;
//! - [`metrics`]: per-instance Prometheus metrics with bounded labels;
//! - [`openapi`]: the generated OpenAPI document;
//! - [`state`]: what every handler shares.
//!
//! Process plumbing shared with the reaper (Redis settings, secrets,
//! logging, signals, the metrics stack, `/metrics` `/healthz` `/readyz`) is
//! `tracker_runtime`'s.
//!
//! [`Application`] binds its listener at build time (port 0 in tests) and
//! serves until a [`CancellationToken`] fires, then shuts down in order:
//! readiness fails, the listener closes, in-flight requests finish, every
//! WebSocket gets Close 1001 and its connection removed, all within
//! `TRACKER_SHUTDOWN_TIMEOUT`.

pub mod access;
pub mod auth;
pub mod client_ip;
pub mod config;
pub mod error;
pub mod extract;
pub mod history;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod state;
pub mod token_cache;

/// Builders the unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use tracker_core::{SessionId, SessionState, SessionView};

    /// A session view with no connections or timers.
    pub fn view(session: &SessionId, state: SessionState, owner: Option<&str>) -> SessionView {
        SessionView {
            session_id: session.clone(),
            state,
            owner: owner.map(str::to_owned),
            active_connections: 0,
            distinct_users: 0,
            last_connection_at: None,
            last_disconnect_at: None,
            idle_since: None,
            idle_timeout_seconds: None,
            hibernates_at: None,
        }
    }
}

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracker_core::Store;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError, TokenKey};
use crate::history::History;
use crate::metrics::Metrics;
use crate::routes::ws::user_sockets::UserSockets;
use crate::routes::ws::watch::SessionWatches;
use crate::state::{AppState, Inner};
use tracker_runtime::http::{self, ConnLimits};

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    // Sources are not repeated in the messages: `{:#}` prints the chain.
    #[error("connect to redis")]
    Store(#[from] tracker_core::Error),
    #[error("TRACKER_DATABASE_URL is not a usable PostgreSQL URL")]
    Database(#[from] sqlx::Error),
    #[error("bind {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl tracker_runtime::service::Service for Application {
    const NAME: &'static str = "tracker-api";
    type Config = Config;
    type BuildError = BuildError;
    type RunError = std::io::Error;

    fn log_format(cfg: &Config) -> tracker_runtime::LogFormat {
        cfg.log_format
    }

    async fn build(cfg: Config) -> Result<Self, BuildError> {
        Application::build(cfg).await
    }

    fn settings_error(e: &BuildError) -> Option<String> {
        match e {
            BuildError::Config(e) => Some(e.to_string()),
            _ => None,
        }
    }

    fn announce(&self) {
        tracing::info!(addr = %self.local_addr(), "listening");
    }

    async fn run_until(self, shutdown: CancellationToken) -> std::io::Result<()> {
        Application::run_until(self, shutdown).await
    }
}

/// A built API instance: bound, not yet serving.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    ops_listener: Option<TcpListener>,
    state: AppState,
    limits: ConnLimits,
    shutdown_timeout: Duration,
}

impl Application {
    /// Checks the settings, connects to Redis (and prepares the lazy
    /// PostgreSQL pool), then binds.
    pub async fn build(cfg: Config) -> Result<Self, BuildError> {
        Self::start(cfg, None).await
    }

    /// Builds around a given store and archive (tests share a clock offset
    /// or a per-test database this way).
    pub async fn build_with(
        cfg: Config,
        store: Store,
        history: Option<History>,
    ) -> Result<Self, BuildError> {
        Self::start(cfg, Some((store, history))).await
    }

    /// Both builds: the settings are checked here, and only here, before
    /// anything connects.
    async fn start(
        cfg: Config,
        backends: Option<(Store, Option<History>)>,
    ) -> Result<Self, BuildError> {
        let key = cfg.validate()?;
        if matches!(key, TokenKey::PublicKeyFile(_)) && cfg.jwt_secret.is_some() {
            tracing::info!("TRACKER_JWT_PUBLIC_KEY_FILE is set: TRACKER_JWT_SECRET is not used");
        }
        let auth = Authenticator::from_settings(key, &cfg.jwt_rules())?;
        let (store, history) = match backends {
            Some(given) => given,
            None => {
                let store = Store::connect(&cfg.store_config()).await?;
                let history = cfg
                    .database_url
                    .as_ref()
                    .map(|url| History::connect_lazy(url.expose(), cfg.redis.redis_timeout))
                    .transpose()?;
                (store, history)
            }
        };
        Self::assemble(cfg, auth, store, history).await
    }

    async fn assemble(
        cfg: Config,
        auth: Authenticator,
        store: Store,
        history: Option<History>,
    ) -> Result<Self, BuildError> {
        if history.is_none() {
            tracing::info!("TRACKER_DATABASE_URL is not set: the history endpoint answers 503");
        }
        let listener = bind(cfg.listen).await?;
        let ops_listener = match cfg.metrics_listen {
            Some(addr) if cfg.separate_ops_listener() => Some(bind(addr).await?),
            _ => None,
        };
        let draining = CancellationToken::new();
        let metrics = Metrics::new();
        let session_watches = SessionWatches::new(
            store.clone(),
            cfg.heartbeat_interval,
            metrics.clone(),
            draining.clone(),
        );
        let state = AppState::new(Inner {
            store,
            auth,
            limits: cfg.limits(),
            heartbeat_interval: cfg.heartbeat_interval,
            heartbeat_window: cfg.heartbeat_window,
            request_timeout: cfg.request_timeout,
            trusted_proxies: cfg.trusted_proxies.clone(),
            ws_allowed_origins: cfg.ws_allowed_origins.clone(),
            ws_ticket_ttl: cfg.ws_ticket_ttl,
            platform: cfg.platform,
            default_idle_timeout: cfg.default_idle_timeout,
            user_sockets: UserSockets::new(cfg.max_websockets_per_user),
            session_watches,
            history,
            metrics,
            sockets: TaskTracker::new(),
            draining,
        });
        Ok(Self {
            listener,
            ops_listener,
            state,
            limits: ConnLimits {
                header_timeout: cfg.header_timeout,
                keepalive_timeout: cfg.keepalive_timeout,
                max_open_connections: cfg.max_open_connections,
            },
            shutdown_timeout: cfg.shutdown_timeout,
        })
    }

    /// The bound API port (the real one when built with port 0).
    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The separate metrics port, if `TRACKER_METRICS_LISTEN` asked for one.
    pub fn ops_port(&self) -> Option<u16> {
        self.ops_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    }

    /// The public router: the API, and the ops routes unless they have a
    /// listener of their own.
    pub fn router(&self) -> Router {
        routes::router(self.state.clone(), self.ops_listener.is_none())
    }

    /// Serves until `shutdown` fires, then shuts down in order (see the crate doc).
    pub async fn run_until(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let state = self.state;
        let stop_accepting = CancellationToken::new();
        let serve = |listener: TcpListener, router: Router| {
            tokio::spawn(http::serve(
                listener,
                router,
                self.limits,
                state.metrics.clone(),
                stop_accepting.clone(),
            ))
        };
        let public = routes::router(state.clone(), self.ops_listener.is_none());
        let main = serve(self.listener, public);
        let ops = self
            .ops_listener
            .map(|l| serve(l, routes::ops_only(state.clone())));
        tracing::info!("serving");

        shutdown.cancelled().await;
        tracing::info!("shutting down");
        state.draining.cancel();
        stop_accepting.cancel();
        state.sockets.close();
        let drained = async {
            if let Err(e) = main.await {
                tracing::warn!(error = %e, "server task failed during shutdown");
            }
            if let Some(ops) = ops {
                let _ = ops.await;
            }
            state.sockets.wait().await;
        };
        match tokio::time::timeout(self.shutdown_timeout, drained).await {
            Ok(()) => tracing::info!("shutdown complete"),
            Err(_) => tracing::warn!(
                open_sockets = state.sockets.len(),
                "shutdown deadline passed; exiting with work left"
            ),
        }
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BuildError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BuildError::Bind { addr, source })
}

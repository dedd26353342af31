//! What every handler shares: the store, auth, settings, metrics, and the
//! shutdown machinery of the WebSockets.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracker_core::{Limits, Store};

use crate::auth::Authenticator;
use crate::config::{AllowedOrigins, Platform, TrustedProxies};
use crate::error::ApiError;
use crate::history::History;
use crate::metrics::Metrics;
use crate::routes::ws::user_sockets::UserSockets;
use crate::routes::ws::watch::SessionWatches;

/// Cheap to clone: one `Arc`.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    pub store: Store,
    pub auth: Authenticator,
    pub limits: Limits,
    pub heartbeat_interval: Duration,
    pub heartbeat_window: Duration,
    /// Bound of one request's handling (`TRACKER_REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: TrustedProxies,
    /// Page origins a WebSocket may come from (empty: any).
    pub ws_allowed_origins: AllowedOrigins,
    /// Where sessions come from: declared through the API unless `kubernetes`.
    pub platform: Platform,
    /// For declarations without `idle_timeout`.
    pub default_idle_timeout: Duration,
    /// Life of a WebSocket ticket.
    pub ws_ticket_ttl: Duration,
    /// Open WebSockets per plain user on this replica.
    pub user_sockets: Arc<UserSockets>,
    /// One reader of each session's state for the WebSockets here.
    pub session_watches: SessionWatches,
    /// `None` without `TRACKER_DATABASE_URL`: history answers 503.
    pub history: Option<History>,
    pub metrics: Metrics,
    /// Every open WebSocket's task, so shutdown can wait for them.
    pub sockets: TaskTracker,
    /// Cancelled when shutdown begins: sockets send 1001 and remove their
    /// connection; readiness fails; no new socket is accepted.
    pub draining: CancellationToken,
}

impl AppState {
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// The history database, or the 503 of a deployment without one.
    pub fn require_history(&self) -> Result<&History, ApiError> {
        self.history.as_ref().ok_or(ApiError::HistoryDisabled)
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl FromRef<AppState> for Metrics {
    fn from_ref(state: &AppState) -> Metrics {
        state.metrics.clone()
    }
}

//! The metrics listener: `/metrics` (Prometheus text), `/healthz` (200 while
//! the process runs) and `/readyz` (200 iff Redis answers, leader or standby).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracker_core::Store;

use crate::metrics::Metrics;

#[derive(Debug, Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    store: Store,
}

/// The routes, for tests that call them without a listener.
pub fn router(metrics: Arc<Metrics>, store: Store) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(AppState { metrics, store })
}

/// Serves until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    stop: CancellationToken,
) {
    let app = router(metrics, store);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

async fn render_metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    match s.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(e) => {
            tracing::debug!(error = %e, "not ready: Redis does not answer");
            (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable")
        }
    }
}

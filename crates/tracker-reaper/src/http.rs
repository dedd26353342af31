//! The metrics listener: the shared ops routes of [`tracker_runtime::ops`]:
//! `/metrics`, `/healthz` (200 while the process runs) and `/readyz` (200
//! iff Redis answers, leader or standby).

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracker_core::Store;

use crate::metrics::Metrics;

/// The routes, for tests that call them without a listener.
pub fn router(metrics: Arc<Metrics>, store: Store) -> Router {
    tracker_runtime::ops::routes(metrics.registry(), store)
}

/// Serves until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    stop: CancellationToken,
) {
    tracker_runtime::ops::serve(listener, router(metrics, store), stop).await;
}

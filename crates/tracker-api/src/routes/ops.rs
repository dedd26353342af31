//! Liveness, readiness, metrics and the OpenAPI document; no auth.
//!
//! `/healthz`, `/readyz` and `/metrics` are the workspace's shared ops
//! routes ([`tracker_runtime::ops`], the same in the reaper); the handlers
//! here only give them the API's readiness and registry, and describe them
//! in the OpenAPI document.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracker_runtime::ops::{NotReady, Probe};
use utoipa::ToSchema;

use crate::error::{Backend, ErrorBody};
use crate::state::AppState;

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// Ready while Redis answers and the replica is not shutting down.
impl Probe for AppState {
    async fn ready(&self) -> Result<(), NotReady> {
        // Fails first on shutdown, so load balancers stop sending before we
        // stop accepting.
        if self.is_draining() {
            return Err(NotReady("shutting down"));
        }
        self.store.ping().await.map_err(|e| {
            self.metrics.backend_error(Backend::Redis);
            tracing::warn!(backend = %Backend::Redis, error = %e, "backend unavailable");
            NotReady("redis is unavailable, retry later")
        })
    }
}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process runs", body = Health)))]
pub async fn healthz() -> Response {
    tracker_runtime::ops::healthz().await
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Redis answers", body = Health),
        (status = 503, description = "Redis does not answer, or shutting down", body = ErrorBody),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    tracker_runtime::ops::readyz(&state).await
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus metrics, OpenMetrics text format",
        content_type = "application/openmetrics-text")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    tracker_runtime::ops::metrics_text(&state.metrics.registry())
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    (
        [(CONTENT_TYPE, "application/json")],
        crate::openapi::document().clone(),
    )
        .into_response()
}

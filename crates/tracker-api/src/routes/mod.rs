//! The router: every route of CONTRACT.md §2 and the layers around them.

pub mod connections;
pub mod ops;
pub mod sessions;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::extract::{BATCH_BODY_LIMIT, BODY_LIMIT};
use crate::state::AppState;

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/sessions/{session_id}/connections",
            post(connections::register).get(connections::list),
        )
        .route(
            "/v1/sessions/{session_id}/connections/{connection_id}/heartbeat",
            post(connections::heartbeat),
        )
        .route(
            "/v1/sessions/{session_id}/connections/{connection_id}",
            axum::routing::delete(connections::close),
        )
        .route(
            "/v1/heartbeats",
            post(sessions::batch).layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT)),
        )
        .route("/v1/sessions/{session_id}", get(sessions::session))
        .route("/v1/sessions/{session_id}/history", get(sessions::history))
        .route("/v1/connections/{connection_id}", get(connections::get))
        .route("/v1/stats", get(sessions::stats))
        .route("/v1/sessions/{session_id}/ws", get(crate::ws::upgrade))
        .route("/openapi.json", get(ops::openapi))
        .merge(ops_router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(reject_oversize))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// `/healthz`, `/readyz` and `/metrics`, also served alone on
/// `TRACKER_METRICS_LISTEN` when that is set.
pub fn ops_router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
}

/// The ops routes with their own state, for the separate listener.
pub fn ops_only(state: AppState) -> Router {
    ops_router()
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::RouteNotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Refuses a declared oversize body before anyone reads it, on routes that
/// would otherwise ignore their body.
async fn reject_oversize(req: Request, next: Next) -> Response {
    let limit = if req.uri().path() == "/v1/heartbeats" {
        BATCH_BODY_LIMIT
    } else {
        BODY_LIMIT
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    next.run(req).await
}

//! The router: every route of the API and the layers around them.
//!
//! With a separate ops listener (`TRACKER_METRICS_LISTEN` not equal to
//! `TRACKER_LISTEN`), `/metrics`, `/readyz` and `/openapi.json` are served
//! there only, so the public port does not expose internals; `/healthz` is
//! on both.

pub mod connections;
pub mod list;
pub mod ops;
pub mod sessions;
pub mod ui;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::error::ApiError;
use crate::extract::{BATCH_BODY_LIMIT, BODY_LIMIT};
use crate::metrics::Timeout;
use crate::state::AppState;

/// The whole API; `with_ops` adds the ops routes to it.
pub fn router(state: AppState, with_ops: bool) -> Router {
    let api = Router::new()
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
        .route("/v1/sessions", get(list::sessions))
        .route("/v1/events", get(list::events))
        .route("/v1/sessions/{session_id}/ws", get(crate::ws::upgrade))
        .route("/healthz", get(ops::healthz))
        .merge(ui::routes());
    let api = if with_ops {
        api.merge(ops_router())
    } else {
        api
    };
    api.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(reject_oversize))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// `/readyz`, `/metrics` and `/openapi.json` (`/healthz` is on every router).
fn ops_router() -> Router<AppState> {
    Router::new()
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
}

/// The ops routes alone, for the separate listener.
pub fn ops_only(state: AppState) -> Router {
    ops_router()
        .route("/healthz", get(ops::healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            crate::metrics::track,
        ))
        .with_state(state)
}

/// Ends a request that takes longer than `TRACKER_REQUEST_TIMEOUT` with 408.
/// It bounds the handler only: a WebSocket upgrade answers 101 at once and
/// the socket lives on outside it.
async fn request_timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(state.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            state.metrics.connection_timeout(Timeout::Request);
            tracing::debug!(timeout = ?state.request_timeout, "request timed out");
            ApiError::RequestTimeout.into_response()
        }
    }
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

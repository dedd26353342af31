//! The router: every route of the API, listed in one place (`api_routes`
//! for the API, `ops_routes` for operations), and the layers around them.
//! A new route module adds its routes to that list and its handlers to
//! [`crate::openapi`]; nothing else needs to know about it.
//!
//! Modules, by concept: [`connections`] (register, heartbeat, list, close),
//! [`heartbeats`] (the batch heartbeat of proxies), [`sessions`] (views,
//! explanations, history, stats), [`declare`] (sessions declared without
//! Kubernetes), [`ws`] (WebSocket tracking), [`ops`] (health, readiness,
//! metrics, the OpenAPI document).
//!
//! With a separate ops listener (`TRACKER_METRICS_LISTEN` not equal to
//! `TRACKER_LISTEN`), `/metrics`, `/readyz` and `/openapi.json` are served
//! there only, so the public port does not expose internals; `/healthz` is
//! on both.

pub mod connections;
pub mod declare;
pub mod heartbeats;
pub mod list;
pub mod ops;
pub mod sessions;
pub mod ui;
pub mod usage;
pub mod ws;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

use crate::error::ApiError;
use crate::extract::{BATCH_BODY_LIMIT, BODY_LIMIT};
use crate::metrics::Timeout;
use crate::state::AppState;

/// Every route of the API proper.
fn api_routes() -> Router<AppState> {
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
            delete(connections::close),
        )
        .route("/v1/connections/{connection_id}", get(connections::get))
        .route(
            "/v1/heartbeats",
            post(heartbeats::batch).layer(DefaultBodyLimit::max(BATCH_BODY_LIMIT)),
        )
        .route(
            "/v1/sessions/{session_id}",
            get(sessions::session)
                .put(declare::put)
                .delete(declare::delete),
        )
        .route("/v1/sessions/{session_id}/history", get(sessions::history))
        .route("/v1/sessions/{session_id}/explain", get(sessions::explain))
        .route("/v1/stats", get(sessions::stats))
        .route("/v1/usage", get(usage::usage))
        .route("/v1/sessions", get(list::sessions))
        .route("/v1/events", get(list::events))
        .route("/v1/sessions/{session_id}/ws", get(ws::upgrade))
        .route(
            "/v1/sessions/{session_id}/ws-ticket",
            post(ws::ticket::issue),
        )
        .merge(ui::routes())
}

/// `/healthz`, on every listener.
fn health_route() -> Router<AppState> {
    Router::new().route("/healthz", get(ops::healthz))
}

/// The ops routes: `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
fn ops_routes() -> Router<AppState> {
    health_route()
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
}

/// The public router: the API, with the ops routes unless they have a
/// listener of their own (then `/healthz` only).
pub fn router(state: AppState, with_ops: bool) -> Router {
    let ops = if with_ops {
        ops_routes()
    } else {
        health_route()
    };
    layered(api_routes().merge(ops), state)
}

/// The ops routes alone, for the separate listener.
pub fn ops_only(state: AppState) -> Router {
    layered(ops_routes(), state)
}

/// What every route goes through, outermost last: metrics and the request
/// span, the request timeout, body limits, and JSON errors for unknown
/// routes and methods.
fn layered(routes: Router<AppState>, state: AppState) -> Router {
    routes
        .fallback(not_found)
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

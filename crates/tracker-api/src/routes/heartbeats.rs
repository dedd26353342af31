//! `POST /v1/heartbeats`: one call for the many connections a proxy holds.
//! Services and admins only; 1 to 10,000 pairs, answered with how many were
//! alive and which were not (their clients must register again).

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use tracker_core::{ConnectionId, SessionId};
use utoipa::ToSchema;

use crate::access::Principal;
use crate::error::{ApiError, ErrorBody};
use crate::extract::ApiJson;
use crate::metrics::HeartbeatResult;
use crate::openapi::{NeedsPrivilege, RedisBacked};
use crate::state::AppState;

/// Most pairs one batch may carry.
pub const MAX_BATCH: usize = 10_000;

/// One pair of a batch.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    pub session_id: SessionId,
    #[schema(value_type = String, format = Uuid)]
    pub connection_id: ConnectionId,
}

/// Body of a batch heartbeat.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1 to 10,000 pairs.
    #[schema(min_items = 1, max_items = 10_000)]
    pub heartbeats: Vec<BatchItem>,
}

/// Answer of a batch heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResponse {
    pub alive: u64,
    /// Closed or expired connections: their clients must register again.
    pub unknown: Vec<BatchItem>,
}

#[utoipa::path(
    post,
    path = "/v1/heartbeats",
    tag = "connections",
    request_body = BatchRequest,
    responses(
        (status = 200, description = "Recorded", body = BatchResponse),
        (status = 400, description = "Invalid pair, or not 1 to 10,000 pairs", body = ErrorBody),
        (status = 408, description = "Not complete within TRACKER_REQUEST_TIMEOUT", body = ErrorBody),
        (status = 413, description = "Body over 4 MiB", body = ErrorBody),
        NeedsPrivilege, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn batch(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<BatchRequest>,
) -> Result<Json<BatchResponse>, ApiError> {
    principal.require_privileged()?;
    let n = body.heartbeats.len();
    if n == 0 || n > MAX_BATCH {
        return Err(ApiError::invalid(
            "heartbeats",
            format!("must hold 1 to {MAX_BATCH} pairs, not {n}"),
        ));
    }
    let pairs: Vec<(SessionId, ConnectionId)> = body
        .heartbeats
        .into_iter()
        .map(|i| (i.session_id, i.connection_id))
        .collect();
    let outcome = state.store.heartbeat_batch(&pairs).await?;
    state
        .metrics
        .heartbeats(HeartbeatResult::Accepted, outcome.alive);
    state
        .metrics
        .heartbeats(HeartbeatResult::Unknown, outcome.unknown.len() as u64);
    Ok(Json(BatchResponse {
        alive: outcome.alive,
        unknown: outcome
            .unknown
            .into_iter()
            .map(|(session_id, connection_id)| BatchItem {
                session_id,
                connection_id,
            })
            .collect(),
    }))
}

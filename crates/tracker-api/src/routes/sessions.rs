//! Session views, explanations, history and stats.

use axum::extract::{RawQuery, State};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tracker_core::explain::Explanation;
use tracker_core::{SessionView, Stats};
use utoipa::IntoParams;

use crate::access::{authorize_history, Principal};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{form_pairs, SessionPath};
use crate::history::SessionHistory;
use crate::openapi::{HistoryBacked, InvalidId, NeedsPrivilege, OwnSession, RedisBacked};
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}",
    tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "State and counters", body = SessionView),
        InvalidId, OwnSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn session(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
) -> Result<Json<SessionView>, ApiError> {
    let view = state.store.session(&session_id).await?;
    principal.check_session(view.as_ref())?;
    view.map(Json).ok_or(ApiError::SessionNotFound)
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}/explain",
    tag = "sessions",
    params(SessionPath),
    responses(
        (status = 200, description = "Why the session is awake or asleep, and when that changes", body = Explanation),
        InvalidId, OwnSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn explain(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
) -> Result<Json<Explanation>, ApiError> {
    // Who may ask, and a 404, exactly as for the session itself.
    let facts = state.store.explain(&session_id).await?;
    principal.check_session(facts.as_ref().map(|(f, _)| &f.view))?;
    let (facts, now) = facts.ok_or(ApiError::SessionNotFound)?;
    Ok(Json(tracker_core::explain::explain(&facts, now)))
}

/// Query of the history route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Rows of each kind, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only rows before this RFC 3339 time (for paging).
    #[param(value_type = Option<String>, format = DateTime)]
    pub before: Option<String>,
}

const DEFAULT_HISTORY: i64 = 100;
const MAX_HISTORY: i64 = 1000;

/// Parses `limit` and `before` by hand so each error names its parameter.
pub(crate) fn history_query(raw: Option<&str>) -> Result<(i64, Option<DateTime<Utc>>), ApiError> {
    let mut limit = DEFAULT_HISTORY;
    let mut before = None;
    for (k, v) in form_pairs(raw.unwrap_or_default()) {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=MAX_HISTORY).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", "must be an integer from 1 to 1000")
                    })?;
            }
            "before" => {
                // An unencoded '+' of an offset arrives as a space.
                let t = DateTime::parse_from_rfc3339(&v.replace(' ', "+"))
                    .map_err(|_| ApiError::invalid("before", "must be an RFC 3339 time"))?;
                before = Some(t.with_timezone(&Utc));
            }
            _ => {}
        }
    }
    Ok((limit, before))
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}/history",
    tag = "sessions",
    params(SessionPath, HistoryQuery),
    responses(
        (status = 200, description = "Archived connections and session events, newest first", body = SessionHistory),
        (status = 400, description = "Invalid id or query", body = ErrorBody),
        (status = 403, description = "Another user's session", body = ErrorBody),
        HistoryBacked,
    ),
    security(("bearer" = []))
)]
pub async fn history(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
    RawQuery(query): RawQuery,
) -> Result<Json<SessionHistory>, ApiError> {
    let (limit, before) = history_query(query.as_deref())?;
    let resource = authorize_history(&state, &principal, &session_id).await?;
    let history = state.require_history()?;
    history
        .session(&session_id, resource.as_deref(), limit, before)
        .await
        .map(Json)
}

#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "sessions",
    responses(
        (status = 200, description = "Totals from maintained counters", body = Stats),
        NeedsPrivilege, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn stats(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<Stats>, ApiError> {
    principal.require_privileged()?;
    Ok(Json(state.store.stats().await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_query_defaults_and_errors() {
        assert_eq!(history_query(None).unwrap(), (100, None));
        assert_eq!(history_query(Some("limit=5&x=1")).unwrap().0, 5);
        let (_, before) = history_query(Some("before=2024-01-02T03:04:05.678Z")).unwrap();
        assert_eq!(before.unwrap().timestamp_millis(), 1_704_164_645_678);
        let (_, before) = history_query(Some("before=2024-01-02T04:04:05%2B01:00")).unwrap();
        assert_eq!(before.unwrap().timestamp(), 1_704_164_645);
        for (q, field) in [
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("limit=1001", "limit"),
            ("before=yesterday", "before"),
        ] {
            match history_query(Some(q)) {
                Err(ApiError::InvalidRequest { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{q}: {other:?}"),
            }
        }
    }
}

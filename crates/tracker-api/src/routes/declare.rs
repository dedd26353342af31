//! Declared sessions: `PUT` and `DELETE /v1/sessions/{session_id}`, for
//! platforms without Session resources (`TRACKER_PLATFORM=docker` or `none`).
//!
//! A declaration is stored exactly where the reaper's mirror stores a Session
//! resource, so idle timeouts, exemption, hibernation and wakes follow the
//! same rules. Controllers declare a session when they start it and report
//! every state they carry out (a hibernation or wake announced to them
//! through NATS) the same way; the tracker follows the report.
//!
//! Order of checks: the token (401), the role (403), the platform (409),
//! then the body (400), so a caller learns first what no body can fix.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use tracker_core::domain::{is_forbidden_control, parse_duration_spec};
use tracker_core::{
    IdleSource, IdleTimeout, ResourceState, SessionId, SessionMeta, SessionView, UserId,
};
use utoipa::ToSchema;

use crate::access::Principal;
use crate::config::Platform;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{json_body, SessionPath};
use crate::openapi::{InvalidId, NeedsPrivilege, RedisBacked};
use crate::state::AppState;

/// The state a controller declares or reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeclaredState {
    Running,
    Hibernated,
    Terminated,
}

impl From<DeclaredState> for ResourceState {
    fn from(s: DeclaredState) -> Self {
        match s {
            DeclaredState::Running => ResourceState::Running,
            DeclaredState::Hibernated => ResourceState::Hibernated,
            DeclaredState::Terminated => ResourceState::Terminated,
        }
    }
}

/// Body of `PUT /v1/sessions/{session_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclareRequest {
    /// The owning user id (1 to 255 printable characters).
    pub user: UserId,
    pub state: DeclaredState,
    /// `^[0-9]+(s|m|h)$` (e.g. `30m`); `""` disables hibernation; absent:
    /// `TRACKER_DEFAULT_IDLE_TIMEOUT`.
    #[serde(default)]
    #[schema(pattern = "^([0-9]+(s|m|h))?$", example = "30m")]
    pub idle_timeout: Option<String>,
    /// `^[0-9]+(s|m|h)$` (e.g. `8h`): hibernated after running this long,
    /// even with live connections; absent or `""`: no limit.
    #[serde(default)]
    #[schema(pattern = "^([0-9]+(s|m|h))?$", example = "8h")]
    pub max_session_duration: Option<String>,
    /// `false` exempts the session from hibernation (default `true`).
    #[serde(default)]
    pub auto_hibernate: Option<bool>,
}

/// A duration field: `None` for `""`; refuses control characters, other
/// forms and zero, naming the field.
fn duration_field(field: &'static str, value: &str) -> Result<Option<Duration>, ApiError> {
    if value.chars().any(is_forbidden_control) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    if value.is_empty() {
        return Ok(None);
    }
    match parse_duration_spec(value) {
        Some(d) if !d.is_zero() => Ok(Some(d)),
        Some(_) => Err(ApiError::invalid(field, "must be positive")),
        None => Err(ApiError::invalid(
            field,
            "must be a number followed by s, m or h (e.g. 30m), or empty",
        )),
    }
}

/// What the store records for a declaration.
pub fn session_meta(
    session_id: SessionId,
    body: &DeclareRequest,
    default_idle: Duration,
) -> Result<SessionMeta, ApiError> {
    let idle = match body.idle_timeout.as_deref() {
        None => Some(default_idle),
        Some(v) => duration_field("idle_timeout", v)?,
    };
    let max_session_duration = match body.max_session_duration.as_deref() {
        None => None,
        Some(v) => duration_field("max_session_duration", v)?,
    };
    let idle_timeout = match (body.auto_hibernate, idle) {
        (Some(false), _) | (_, None) => IdleTimeout::Off,
        (_, Some(d)) => IdleTimeout::After(d),
    };
    // Where the timeout comes from, for explanations ("exempt", "from spec").
    let idle_source = match (body.auto_hibernate, body.idle_timeout.as_deref()) {
        (Some(false), _) => IdleSource::Annotation,
        (_, None) => IdleSource::Default,
        (_, Some("")) => IdleSource::Empty,
        (_, Some(_)) => IdleSource::Spec,
    };
    Ok(SessionMeta {
        session_id,
        uid: None,
        owner: Some(body.user.to_string()),
        idle_source,
        state: body.state.into(),
        idle_timeout,
        generation: None,
        max_session_duration,
        created_at: None,
    })
}

fn declarations_allowed(state: &AppState) -> Result<(), ApiError> {
    if state.platform == Platform::Kubernetes {
        return Err(ApiError::Conflict(
            "sessions come from Session resources on this platform (TRACKER_PLATFORM=kubernetes)",
        ));
    }
    Ok(())
}

#[utoipa::path(
    put,
    path = "/v1/sessions/{session_id}",
    tag = "sessions",
    params(("session_id" = SessionId, Path, description = "Session resource name")),
    request_body = DeclareRequest,
    responses(
        (status = 200, description = "Updated; the session as the tracker sees it", body = SessionView),
        (status = 201, description = "Declared; the session as the tracker sees it", body = SessionView),
        (status = 400, description = "Invalid id or body (the field is named)", body = ErrorBody),
        (status = 409, description = "TRACKER_PLATFORM=kubernetes: sessions come from the cluster", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        NeedsPrivilege, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn put(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<SessionView>), ApiError> {
    principal.require_privileged()?;
    declarations_allowed(&state)?;
    let body: DeclareRequest = json_body(&headers, body)?;
    let meta = session_meta(session_id, &body, state.default_idle_timeout)?;
    let declared = state.store.declare_session(&meta).await?;
    tracing::info!(
        session_id = %meta.session_id,
        state = meta.state.as_str(),
        generation = declared.generation,
        created = declared.created,
        "session declared"
    );
    let view = state
        .store
        .session(&meta.session_id)
        .await?
        .ok_or(ApiError::SessionNotFound)?;
    let status = if declared.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{session_id}",
    tag = "sessions",
    params(("session_id" = SessionId, Path, description = "Session resource name")),
    responses(
        (status = 204, description = "Forgotten (also when it was not declared)"),
        (status = 409, description = "TRACKER_PLATFORM=kubernetes: sessions come from the cluster", body = ErrorBody),
        InvalidId, NeedsPrivilege, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
) -> Result<StatusCode, ApiError> {
    principal.require_privileged()?;
    declarations_allowed(&state)?;
    let known = state.store.undeclare_session(&session_id).await?;
    tracing::info!(session_id = %session_id, known, "declared session forgotten");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> DeclareRequest {
        serde_json::from_value(json).expect("body")
    }

    fn sid() -> SessionId {
        "s-1".parse().expect("sid")
    }

    const DEFAULT: Duration = Duration::from_secs(1800);

    #[test]
    fn a_declaration_becomes_the_mirror_s_metadata() {
        let m = session_meta(
            sid(),
            &body(serde_json::json!({"user": "alice", "state": "running"})),
            DEFAULT,
        )
        .expect("meta");
        assert_eq!(m.owner.as_deref(), Some("alice"));
        assert_eq!(m.state, ResourceState::Running);
        assert_eq!(m.idle_timeout, IdleTimeout::After(DEFAULT));
        assert_eq!(m.max_session_duration, None);

        let m = session_meta(
            sid(),
            &body(serde_json::json!({"user": "a", "state": "hibernated", "idle_timeout": "90s", "max_session_duration": "8h"})),
            DEFAULT,
        )
        .expect("meta");
        assert_eq!(m.idle_timeout, IdleTimeout::After(Duration::from_secs(90)));
        assert_eq!(m.max_session_duration, Some(Duration::from_secs(8 * 3600)));

        for off in [
            serde_json::json!({"user": "a", "state": "running", "idle_timeout": ""}),
            serde_json::json!({"user": "a", "state": "running", "auto_hibernate": false}),
            serde_json::json!({"user": "a", "state": "running", "idle_timeout": "5m", "auto_hibernate": false}),
        ] {
            let m = session_meta(sid(), &body(off.clone()), DEFAULT).expect("meta");
            assert_eq!(m.idle_timeout, IdleTimeout::Off, "{off}");
        }
    }

    #[test]
    fn bad_durations_name_their_field() {
        for (json, field) in [
            (
                serde_json::json!({"user": "a", "state": "running", "idle_timeout": "5d"}),
                "idle_timeout",
            ),
            (
                serde_json::json!({"user": "a", "state": "running", "idle_timeout": "0s"}),
                "idle_timeout",
            ),
            (
                serde_json::json!({"user": "a", "state": "running", "idle_timeout": "5m\n"}),
                "idle_timeout",
            ),
            (
                serde_json::json!({"user": "a", "state": "running", "max_session_duration": "soon"}),
                "max_session_duration",
            ),
        ] {
            match session_meta(sid(), &body(json.clone()), DEFAULT) {
                Err(ApiError::InvalidRequest { field: f, .. }) => assert_eq!(f, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }
}

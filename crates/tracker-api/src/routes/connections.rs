//! Registering, heartbeating, listing and closing connections.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracker_core::domain::rfc3339_ms;
use tracker_core::{
    ConnectionId, ConnectionView, HeartbeatOutcome, NewConnection, Protocol, RegisterOutcome,
    Registered, SessionView, UserAgent, UserId,
};
use utoipa::ToSchema;

use crate::access::{authorize, authorize_connection, not_owner, Principal};
use crate::client_ip::client_ip;
use crate::error::{ApiError, ErrorBody, LimitKind};
use crate::extract::{ApiJson, ConnectionIdPath, ConnectionPath, SessionPath};
use crate::metrics::{HeartbeatResult, RegistrationResult};
use crate::openapi::{InvalidId, NotCallersSession, RedisBacked};
use crate::state::AppState;

/// Body of a registration.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub protocol: Protocol,
    /// Defaults to the token's `sub`; a plain user may only name itself.
    #[serde(default)]
    pub user_id: Option<UserId>,
    /// IPv4 or IPv6. Taken from `service` and `admin` tokens only; for a
    /// plain user the address it connects from is stored instead.
    #[serde(default)]
    #[schema(value_type = Option<ClientIp>)]
    pub client_ip: Option<IpAddr>,
    /// Kept up to 512 bytes; control characters (U+0000 to U+001F, U+007F)
    /// are refused.
    #[serde(default)]
    #[schema(pattern = "^[^\\x00-\\x1f\\x7f]*$")]
    pub user_agent: Option<String>,
    /// Supply one to make retries idempotent.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub connection_id: Option<ConnectionId>,
}

/// How `client_ip` appears in the OpenAPI document: an IPv4 or IPv6 address.
#[derive(Debug)]
pub struct ClientIp;

impl utoipa::PartialSchema for ClientIp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{
            AnyOfBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type,
        };
        let ip = |format| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(format)))
        };
        AnyOfBuilder::new()
            .item(ip(KnownFormat::Ipv4))
            .item(ip(KnownFormat::Ipv6))
            .description(Some("IPv4 or IPv6 address"))
            .into()
    }
}

impl ToSchema for ClientIp {}

/// Answer of a registration.
#[derive(Debug, Serialize, ToSchema)]
pub struct RegisterResponse {
    pub connection: ConnectionView,
    pub session: SessionView,
    pub heartbeat_interval_seconds: u64,
    pub heartbeat_window_seconds: u64,
}

/// Answer of a heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct HeartbeatResponse {
    #[serde(with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub last_heartbeat: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: DateTime<Utc>,
}

/// The live connections of a session.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectionList {
    pub connections: Vec<ConnectionView>,
}

/// Registers after the caller is authorized; shared by HTTP and WebSocket.
/// Returns the registration and whether it was new. A plain user's
/// ownership, checked before, is checked again by the call that registers:
/// the Session may have been created again for someone else in between.
pub async fn register_connection(
    state: &AppState,
    principal: &Principal,
    new: &NewConnection,
) -> Result<(Registered, bool), ApiError> {
    let owner = principal.owner_required()?;
    let outcome = state.store.register_as(new, state.limits, owner).await?;
    let (result, answer) = match outcome {
        // Refused as the check before would have: not a registration.
        RegisterOutcome::NotOwner(why) => return Err(not_owner(why)),
        RegisterOutcome::Created(r) => (RegistrationResult::Created, Ok((r, true))),
        RegisterOutcome::Replayed(r) => (RegistrationResult::Replayed, Ok((r, false))),
        RegisterOutcome::Terminated => (
            RegistrationResult::Terminated,
            Err(ApiError::Conflict("the session is terminated")),
        ),
        RegisterOutcome::Conflict => (
            RegistrationResult::Conflict,
            Err(ApiError::Conflict(
                "the connection_id belongs to another or an ended connection",
            )),
        ),
        RegisterOutcome::SessionLimit => (
            RegistrationResult::SessionLimit,
            Err(ApiError::ConnectionLimit(LimitKind::Session)),
        ),
        RegisterOutcome::UserLimit => (
            RegistrationResult::UserLimit,
            Err(ApiError::ConnectionLimit(LimitKind::User)),
        ),
    };
    state.metrics.registration(new.protocol, result);
    match &answer {
        Ok((r, true)) => tracing::debug!(
            session_id = %r.connection.session_id,
            connection_id = %r.connection.connection_id,
            protocol = %new.protocol,
            "connection registered"
        ),
        Ok((_, false)) => {}
        Err(e) => {
            tracing::debug!(session_id = %new.session_id, reason = %e, "registration refused")
        }
    }
    answer
}

/// Seconds clients are told; a sub-second interval (tests) still says 1.
pub fn interval_seconds(state: &AppState) -> u64 {
    state.heartbeat_interval.as_secs().max(1)
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{session_id}/connections",
    tag = "connections",
    params(SessionPath),
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered", body = RegisterResponse),
        (status = 200, description = "Replay of the same connection_id", body = RegisterResponse),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 403, description = "Not the caller's session, or not as itself", body = ErrorBody),
        (status = 404, description = "A plain user on a session the tracker does not know", body = ErrorBody),
        (status = 409, description = "Session terminated, or connection_id taken", body = ErrorBody),
        (status = 408, description = "Not complete within TRACKER_REQUEST_TIMEOUT", body = ErrorBody),
        (status = 413, description = "Body over 1 MiB", body = ErrorBody),
        (status = 429, description = "Connection limit reached", body = ErrorBody),
        RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn register(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let user_id = body.user_id.unwrap_or_else(|| principal.subject.clone());
    principal.check_acting_as(&user_id)?;
    let span = tracing::info_span!("register", session_id = %session_id);
    async move {
        authorize(&state, &principal, &session_id).await?;
        // A proxy registers on behalf of the client it fronts; a user could
        // put any address here, so its own is taken instead.
        let client_ip = if principal.may_set_client_ip() {
            body.client_ip
        } else {
            client_ip(
                peer.map(|Extension(ConnectInfo(addr))| addr),
                &headers,
                &state.trusted_proxies,
            )
        };
        let new = NewConnection {
            session_id,
            connection_id: body.connection_id.unwrap_or_else(ConnectionId::new_random),
            user_id,
            protocol: body.protocol,
            client_ip,
            user_agent: body
                .user_agent
                .as_deref()
                .map(UserAgent::parse)
                .transpose()?,
        };
        let (registered, created) = register_connection(&state, &principal, &new).await?;
        let status = if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let answer = RegisterResponse {
            connection: registered.connection,
            session: registered.session,
            heartbeat_interval_seconds: interval_seconds(&state),
            heartbeat_window_seconds: state.heartbeat_window.as_secs(),
        };
        Ok((status, Json(answer)).into_response())
    }
    .instrument(span)
    .await
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{session_id}/connections/{connection_id}/heartbeat",
    tag = "connections",
    params(ConnectionPath),
    responses(
        (status = 200, description = "Recorded", body = HeartbeatResponse),
        (status = 404, description = "Closed or expired: register again", body = ErrorBody),
        InvalidId, NotCallersSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    principal: Principal,
    ConnectionPath(session_id, connection_id): ConnectionPath,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let span =
        tracing::debug_span!("heartbeat", session_id = %session_id, connection_id = %connection_id);
    async move {
        // A user's ownership is checked by the heartbeat's own script call.
        let owner = principal.owner_required()?;
        match state
            .store
            .heartbeat_as(&session_id, connection_id, owner)
            .await?
        {
            HeartbeatOutcome::Alive(ack) => {
                state.metrics.heartbeats(HeartbeatResult::Accepted, 1);
                Ok(Json(HeartbeatResponse {
                    last_heartbeat: ack.last_heartbeat,
                    expires_at: ack.expires_at,
                }))
            }
            HeartbeatOutcome::Unknown => {
                state.metrics.heartbeats(HeartbeatResult::Unknown, 1);
                Err(ApiError::ConnectionNotFound)
            }
            HeartbeatOutcome::NotOwner(why) => Err(not_owner(why)),
        }
    }
    .instrument(span)
    .await
}

#[utoipa::path(
    delete,
    path = "/v1/sessions/{session_id}/connections/{connection_id}",
    tag = "connections",
    params(ConnectionPath),
    responses(
        (status = 204, description = "Closed"),
        (status = 404, description = "No such connection", body = ErrorBody),
        InvalidId, NotCallersSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn close(
    State(state): State<AppState>,
    principal: Principal,
    ConnectionPath(session_id, connection_id): ConnectionPath,
) -> Result<StatusCode, ApiError> {
    let span =
        tracing::info_span!("close", session_id = %session_id, connection_id = %connection_id);
    async move {
        authorize(&state, &principal, &session_id).await?;
        match state.store.close(&session_id, connection_id).await? {
            Some(reason) => {
                tracing::debug!(end_reason = reason.as_str(), "connection closed");
                Ok(StatusCode::NO_CONTENT)
            }
            None => Err(ApiError::ConnectionNotFound),
        }
    }
    .instrument(span)
    .await
}

#[utoipa::path(
    get,
    path = "/v1/sessions/{session_id}/connections",
    tag = "connections",
    params(SessionPath),
    responses(
        (status = 200, description = "Live connections", body = ConnectionList),
        InvalidId, NotCallersSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
) -> Result<Json<ConnectionList>, ApiError> {
    authorize(&state, &principal, &session_id).await?;
    let connections = state.store.list_connections(&session_id).await?;
    Ok(Json(ConnectionList { connections }))
}

#[utoipa::path(
    get,
    path = "/v1/connections/{connection_id}",
    tag = "connections",
    params(ConnectionIdPath),
    responses(
        (status = 200, description = "The live connection", body = ConnectionView),
        (status = 403, description = "Another user's connection", body = ErrorBody),
        (status = 404, description = "No such live connection", body = ErrorBody),
        InvalidId, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    principal: Principal,
    ConnectionIdPath(connection_id): ConnectionIdPath,
) -> Result<Json<ConnectionView>, ApiError> {
    let connection = state
        .store
        .get_connection(connection_id)
        .await?
        .ok_or(ApiError::ConnectionNotFound)?;
    authorize_connection(&state, &principal, &connection).await?;
    Ok(Json(connection))
}

//! The one table from error to HTTP status and code.
//!
//! Handlers return `Result<_, ApiError>`; nothing else decides a status.
//! Backend failures are logged here, once, and answered with a generic body:
//! details of Redis or PostgreSQL never reach a client. A response carries
//! markers ([`BackendFailure`], [`LimitRejection`]) that [`crate::metrics`]
//! counts; this module does not depend on the metrics.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

tracker_runtime::label_enum!(
    /// A backend the API depends on.
    Backend { Redis => "redis", Postgres => "postgres" }
);

tracker_runtime::label_enum!(
    /// Which connection limit refused a registration.
    LimitKind { Session => "session", User => "user", UserWebsockets => "user_websockets" }
);

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `field` names the part at fault.
    #[error("{field}: {message}")]
    InvalidRequest { field: String, message: String },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("session not found")]
    SessionNotFound,
    #[error("connection not found")]
    ConnectionNotFound,
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Conflict(&'static str),
    #[error("the request body is too large: the limit is 1 MiB, 4 MiB for POST /v1/heartbeats")]
    PayloadTooLarge,
    /// The request took longer than `TRACKER_REQUEST_TIMEOUT`.
    #[error("the request took too long")]
    RequestTimeout,
    #[error("{0}")]
    ConnectionLimit(LimitKind),
    /// The backend is down or slow; the client should retry.
    #[error("{backend} is unavailable: {detail}")]
    Unavailable { backend: Backend, detail: String },
    /// A bug or an unexpected backend answer.
    #[error("{backend} failed: {detail}")]
    Internal { backend: Backend, detail: String },
    /// `TRACKER_DATABASE_URL` is not set: a deployment choice, not an outage,
    /// so it is neither logged nor counted as a backend error.
    #[error("history is not available: this deployment has no database configured")]
    HistoryDisabled,
    /// The process is shutting down and takes no new long-lived work.
    #[error("shutting down")]
    ShuttingDown,
}

/// The error body: `{"error": {"code", "message", "field"?}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code, e.g. `invalid_request`.
    pub code: &'static str,
    /// A human sentence.
    pub message: String,
    /// The offending request field, for `invalid_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Marks a response as caused by a backend failure, for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct BackendFailure(pub Backend);

/// Marks a response as a limit rejection, for the metrics layer.
#[derive(Debug, Clone, Copy)]
pub struct LimitRejection(pub LimitKind);

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::SessionNotFound | ApiError::ConnectionNotFound | ApiError::RouteNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::ConnectionLimit(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::ShuttingDown | ApiError::HistoryDisabled => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::SessionNotFound => "session_not_found",
            ApiError::ConnectionNotFound => "connection_not_found",
            ApiError::RouteNotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::ConnectionLimit(_) => "connection_limit",
            ApiError::Unavailable { .. } | ApiError::ShuttingDown | ApiError::HistoryDisabled => {
                "unavailable"
            }
            ApiError::Internal { .. } => "internal",
        }
    }

    /// The body a client sees: no backend details.
    pub(crate) fn body(&self) -> ErrorDetail {
        let (message, field) = match self {
            ApiError::InvalidRequest { field, .. } => (self.to_string(), Some(field.clone())),
            ApiError::Unavailable { backend, .. } => {
                (format!("{backend} is unavailable, retry later"), None)
            }
            ApiError::Internal { .. } => ("internal error".to_owned(), None),
            ApiError::ConnectionLimit(LimitKind::UserWebsockets) => (
                "the user has reached its WebSocket limit on this replica".to_owned(),
                None,
            ),
            ApiError::ConnectionLimit(kind) => {
                (format!("the {kind} has reached its connection limit"), None)
            }
            other => (other.to_string(), None),
        };
        ErrorDetail {
            code: self.code(),
            message,
            field,
        }
    }
}

impl From<tracker_core::Error> for ApiError {
    fn from(e: tracker_core::Error) -> Self {
        let detail = e.to_string();
        if e.is_unavailable() {
            ApiError::Unavailable {
                backend: Backend::Redis,
                detail,
            }
        } else {
            ApiError::Internal {
                backend: Backend::Redis,
                detail,
            }
        }
    }
}

impl From<tracker_core::ValidationError> for ApiError {
    fn from(e: tracker_core::ValidationError) -> Self {
        ApiError::invalid(e.field, e.reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            // Logged here and nowhere else: one line per failed request.
            ApiError::Unavailable { backend, detail } => {
                tracing::warn!(backend = %backend, error = %detail, "backend unavailable");
            }
            ApiError::Internal { backend, detail } => {
                tracing::error!(backend = %backend, error = %detail, "request failed");
            }
            _ => {}
        }
        let mut response = (status, Json(ErrorBody { error: self.body() })).into_response();
        match self {
            ApiError::Unavailable { backend, .. } | ApiError::Internal { backend, .. } => {
                response.extensions_mut().insert(BackendFailure(backend));
            }
            ApiError::ConnectionLimit(kind) => {
                response.extensions_mut().insert(LimitRejection(kind));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_contract_status_and_code() {
        let table = [
            (
                ApiError::invalid("client_ip", "bad"),
                400,
                "invalid_request",
            ),
            (ApiError::Unauthenticated("x"), 401, "unauthenticated"),
            (ApiError::Forbidden("x"), 403, "forbidden"),
            (ApiError::SessionNotFound, 404, "session_not_found"),
            (ApiError::ConnectionNotFound, 404, "connection_not_found"),
            (ApiError::Conflict("x"), 409, "conflict"),
            (ApiError::PayloadTooLarge, 413, "payload_too_large"),
            (ApiError::RequestTimeout, 408, "request_timeout"),
            (
                ApiError::ConnectionLimit(LimitKind::Session),
                429,
                "connection_limit",
            ),
            (
                ApiError::Unavailable {
                    backend: Backend::Redis,
                    detail: "down".into(),
                },
                503,
                "unavailable",
            ),
            (
                ApiError::Internal {
                    backend: Backend::Postgres,
                    detail: "bug".into(),
                },
                500,
                "internal",
            ),
        ];
        for (err, status, code) in table {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            assert_eq!(err.code(), code, "{err:?}");
        }
    }

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let err = ApiError::Internal {
            backend: Backend::Redis,
            detail: "secret stack".into(),
        };
        assert_eq!(err.body().message, "internal error");
        let err = ApiError::invalid("client_ip", "must be an IP");
        let body = err.body();
        assert_eq!(body.field.as_deref(), Some("client_ip"));
        assert!(body.message.contains("client_ip"));
    }
}

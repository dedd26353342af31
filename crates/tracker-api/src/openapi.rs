//! The OpenAPI 3 document, generated from the handlers' annotations so it
//! cannot drift from them, and the responses those annotations share.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::ErrorBody;
use crate::routes::{connections, declare, heartbeats, list, ops, sessions, ui, usage};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Connection tracker API", version = "1"),
    paths(
        connections::register,
        connections::heartbeat,
        connections::close,
        connections::list,
        connections::get,
        heartbeats::batch,
        sessions::session,
        sessions::explain,
        declare::put,
        declare::delete,
        sessions::history,
        sessions::stats,
        usage::usage,
        list::sessions,
        list::events,
        crate::routes::ws::upgrade,
        crate::routes::ws::ticket::issue,
        ops::healthz,
        ops::readyz,
        ops::metrics,
        ops::openapi,
        ui::page,
        ui::script,
        ui::stylesheet,
    ),
    components(schemas(
        tracker_core::ConnectionView,
        tracker_core::SessionView,
        tracker_core::SessionState,
        tracker_core::Protocol,
        tracker_core::Stats,
        tracker_core::explain::Explanation,
        tracker_core::explain::Reason,
        tracker_core::explain::ReasonCode,
        declare::DeclareRequest,
        declare::DeclaredState,
        crate::error::ErrorBody,
        crate::error::ErrorDetail,
        crate::history::HistoryRow,
        crate::history::EventRow,
        crate::routes::ws::ServerFrame,
        crate::routes::ws::WarningReason,
        crate::routes::ws::ticket::TicketResponse,
        usage::Usage,
        usage::UsageRow,
        list::SessionPage,
        list::RecentEvents,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "connections", description = "Register, heartbeat and close connections"),
        (name = "sessions", description = "Session state, history and totals"),
        (name = "operations", description = "Health, readiness, metrics"),
        (name = "ui", description = "The operator page"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document, rendered once.
pub fn document() -> &'static String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"openapi: {e}\"}}"))
    })
}

// Responses many operations share, for their `responses(...)` lists: one
// wording for each, so the document says the same thing everywhere. An
// operation that words a status its own way keeps its own tuple.

/// 401 and the Redis 503: every bearer operation that reads live state.
#[derive(Debug, IntoResponses)]
pub enum RedisBacked {
    #[response(status = 401, description = "No valid token")]
    Unauthenticated(ErrorBody),
    #[response(status = 503, description = "Redis unavailable")]
    Unavailable(ErrorBody),
}

/// 401 and the PostgreSQL 503: every bearer operation that reads history.
#[derive(Debug, IntoResponses)]
pub enum HistoryBacked {
    #[response(status = 401, description = "No valid token")]
    Unauthenticated(ErrorBody),
    #[response(status = 503, description = "PostgreSQL not configured or unavailable")]
    Unavailable(ErrorBody),
}

/// 403 of operations for `service` and `admin` tokens only.
#[derive(Debug, IntoResponses)]
#[response(status = 403, description = "Needs service or admin")]
pub struct NeedsPrivilege(pub ErrorBody);

/// 400 of operations whose only input is the ids of their path.
#[derive(Debug, IntoResponses)]
#[response(status = 400, description = "Invalid id")]
pub struct InvalidId(pub ErrorBody);

/// 403 and 404 of reading one session: a plain user sees only its own, and
/// a session whose owner is unknown is not its own.
#[derive(Debug, IntoResponses)]
pub enum OwnSession {
    #[response(status = 403, description = "Another user's session")]
    Forbidden(ErrorBody),
    #[response(status = 404, description = "The tracker knows nothing of it")]
    NotFound(ErrorBody),
}

/// 403 of operations on a session that a plain user must own.
#[derive(Debug, IntoResponses)]
#[response(status = 403, description = "Not the caller's session")]
pub struct NotCallersSession(pub ErrorBody);

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// The one `/v1` operation without a 401: a WebSocket refuses a token
    /// after the upgrade, with a Close frame, not with a status.
    const IN_BAND_AUTH: (&str, &str) = ("get", "/v1/sessions/{session_id}/ws");

    fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(path, item)| {
                let item = item.as_object().expect("a path item");
                item.iter()
                    .map(move |(method, op)| (method.clone(), path.clone(), op))
            })
            .collect()
    }

    #[test]
    fn every_api_operation_documents_its_errors() {
        let doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
        let api: Vec<_> = operations(&doc)
            .into_iter()
            .filter(|(_, path, _)| path.starts_with("/v1/"))
            .collect();
        assert!(api.len() >= 15, "only {} /v1 operations", api.len());
        for (method, path, op) in api {
            let responses = op["responses"].as_object().expect("responses");
            let has = |status: &str| responses.contains_key(status);
            assert!(
                responses.keys().any(|s| s.starts_with('5')),
                "{method} {path} documents no 5xx"
            );
            if (method.as_str(), path.as_str()) != IN_BAND_AUTH {
                assert!(has("401"), "{method} {path} documents no 401");
                assert!(
                    op["security"] == serde_json::json!([{"bearer": []}]),
                    "{method} {path} does not ask for the bearer token"
                );
            }
            for (status, response) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {status} is not an ErrorBody"
                    );
                }
            }
        }
    }
}

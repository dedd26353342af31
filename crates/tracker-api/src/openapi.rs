//! The OpenAPI 3 document, generated from the handlers' annotations so it
//! cannot drift from them.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

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

//! One-time WebSocket tickets, for browsers: a page cannot set an
//! `Authorization` header on a WebSocket, and a bearer token in the URL
//! (`?access_token=`) is long-lived and ends up in browser history and proxy
//! logs. A page instead asks its backend (or the API, with its token) for a
//! ticket and opens the socket with `?ticket=` at once: the ticket works
//! once, for one session, for at most 30 seconds.
//!
//! A ticket is 128 random bits (hex, so URL-safe) naming one Redis key that
//! holds what it grants: the session, and the subject and role of whoever
//! asked for it. The socket then acts as that subject with that role. The
//! ticket itself is never logged: requests are logged and metered by route
//! pattern, never by their URI.

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracker_core::domain::rfc3339_ms;
use tracker_core::SessionId;
use utoipa::ToSchema;

use crate::access::{authorize, Principal, Role};
use crate::error::{ApiError, Backend, ErrorBody};
use crate::extract::SessionPath;
use crate::openapi::{NotCallersSession, RedisBacked};
use crate::state::AppState;

/// Answer of `POST /v1/sessions/{session_id}/ws-ticket`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TicketResponse {
    /// Pass as `?ticket=` to `GET /v1/sessions/{session_id}/ws`, once.
    pub ticket: String,
    #[serde(with = "rfc3339_ms")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: DateTime<Utc>,
}

/// What a ticket grants, as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Grant {
    session_id: String,
    sub: String,
    role: String,
}

/// Hex digits of a ticket: 128 bits.
const TICKET_LEN: usize = 32;

/// Draws a ticket name: 128 bits from the thread's CSPRNG.
fn new_ticket() -> String {
    use std::fmt::Write;
    let bytes: [u8; TICKET_LEN / 2] = rand::random();
    bytes
        .iter()
        .fold(String::with_capacity(TICKET_LEN), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether `ticket` could be one of ours: anything else is refused without
/// a Redis call, and never becomes part of a key.
fn well_formed(ticket: &str) -> bool {
    ticket.len() == TICKET_LEN && ticket.bytes().all(|b| b.is_ascii_hexdigit())
}

#[utoipa::path(
    post,
    path = "/v1/sessions/{session_id}/ws-ticket",
    tag = "connections",
    params(SessionPath),
    responses(
        (status = 201, description = "A ticket for one WebSocket on this session, within 30 s", body = TicketResponse),
        (status = 400, description = "Invalid session id", body = ErrorBody),
        (status = 404, description = "A plain user on a session the tracker does not know", body = ErrorBody),
        NotCallersSession, RedisBacked,
    ),
    security(("bearer" = []))
)]
pub async fn issue(
    State(state): State<AppState>,
    principal: Principal,
    SessionPath(session_id): SessionPath,
) -> Result<Response, ApiError> {
    authorize(&state, &principal, &session_id).await?;
    let grant = Grant {
        session_id: session_id.as_str().to_owned(),
        sub: principal.subject.as_str().to_owned(),
        role: principal.role.claim().to_owned(),
    };
    let grant = serde_json::to_string(&grant).map_err(|e| ApiError::Internal {
        backend: Backend::Redis,
        detail: format!("encode a ticket grant: {e}"),
    })?;
    let ttl = state.ws_ticket_ttl;
    // A collision of 128 random bits does not happen; the retry only keeps
    // a taken name from being overwritten if it ever did.
    for _ in 0..3 {
        let ticket = new_ticket();
        let expires_at = Utc::now() + ttl;
        if state.store.issue_ticket(&ticket, &grant, ttl).await? {
            let mut response = (
                StatusCode::CREATED,
                Json(TicketResponse { ticket, expires_at }),
            )
                .into_response();
            response
                .headers_mut()
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return Ok(response);
        }
    }
    Err(ApiError::Internal {
        backend: Backend::Redis,
        detail: "three ticket names in a row were taken".into(),
    })
}

/// The caller a ticket stands for, if it exists, has not been used or
/// expired, and is for `session`. Using a ticket consumes it, even on the
/// wrong session: a ticket shown where it does not belong may have leaked.
pub async fn redeem(
    state: &AppState,
    ticket: &str,
    session: &SessionId,
) -> Result<Principal, ApiError> {
    const UNUSABLE: ApiError = ApiError::Unauthenticated("the ticket is unknown, used or expired");
    if !well_formed(ticket) {
        return Err(UNUSABLE);
    }
    let grant = state.store.redeem_ticket(ticket).await?.ok_or(UNUSABLE)?;
    let grant: Grant = serde_json::from_str(&grant).map_err(|_| UNUSABLE)?;
    if grant.session_id != session.as_str() {
        return Err(ApiError::Unauthenticated(
            "the ticket is for another session",
        ));
    }
    Ok(Principal {
        subject: grant.sub.parse().map_err(|_| UNUSABLE)?,
        role: Role::from_claims(&[grant.role]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_128_url_safe_bits_and_differ() {
        let a = new_ticket();
        let b = new_ticket();
        assert_eq!(a.len(), TICKET_LEN);
        assert!(well_formed(&a) && well_formed(&b));
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert!(!well_formed(""));
        assert!(!well_formed(&format!("{a}0")));
        assert!(!well_formed(&"g".repeat(TICKET_LEN)));
        assert!(!well_formed(&format!("{}:x", &a[..TICKET_LEN - 2])));
    }
}

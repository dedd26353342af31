//! Who is calling, and what they may do (CONTRACT.md §2, "Auth").
//!
//! A bearer JWT (HS256, `exp` required) names the caller (`sub`) and its
//! `roles`. `service` and `admin` act on any session; a plain `user` only on
//! sessions it owns, and only as itself. The decisions are pure functions on
//! [`Principal`] so they are unit-tested without a server.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tracker_core::{SessionView, UserId};

use crate::error::ApiError;
use crate::state::AppState;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the caller's user id.
    pub subject: UserId,
    /// Holds `service` or `admin`: may act on any session, as anyone.
    pub privileged: bool,
    /// Holds `user`.
    pub user: bool,
}

impl Principal {
    /// For `service`/`admin`-only routes.
    pub fn require_privileged(&self) -> Result<(), ApiError> {
        if self.privileged {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this route needs the service or admin role",
            ))
        }
    }

    /// Whether the caller may act on a session, given what the tracker knows
    /// of it. A plain user cannot own a session whose owner is unknown, so an
    /// unknown session is a 404 for it, while another user's is a 403.
    pub fn check_session(&self, view: Option<&SessionView>) -> Result<(), ApiError> {
        if self.privileged {
            return Ok(());
        }
        if !self.user {
            return Err(ApiError::Forbidden("the token carries no known role"));
        }
        match view.and_then(|v| v.owner.as_deref()) {
            None => Err(ApiError::SessionNotFound),
            Some(owner) if owner == self.subject.as_str() => Ok(()),
            Some(_) => Err(ApiError::Forbidden("the session belongs to another user")),
        }
    }

    /// Whether the caller may act as `user` (register a connection for it).
    pub fn check_acting_as(&self, user: &UserId) -> Result<(), ApiError> {
        if self.privileged || user == &self.subject {
            Ok(())
        } else {
            Err(ApiError::Forbidden("a user may only act as itself"))
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// Checks tokens; built once from the settings.
#[derive(Clone)]
pub enum Authenticator {
    /// `TRACKER_AUTH=disabled`: every request is this admin.
    Disabled(Principal),
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Disabled(_) => f.write_str("Authenticator::Disabled"),
            // The key stays out of logs.
            Authenticator::Jwt { .. } => f.write_str("Authenticator::Jwt"),
        }
    }
}

impl Authenticator {
    pub fn disabled() -> Self {
        Authenticator::Disabled(Principal {
            subject: "admin".parse().expect("\"admin\" is a valid user id"),
            privileged: true,
            user: false,
        })
    }

    pub fn jwt(secret: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        Authenticator::Jwt {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: Box::new(validation),
        }
    }

    /// The caller behind `token`, or 401.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, ApiError> {
        let (key, validation) = match self {
            Authenticator::Disabled(admin) => return Ok(admin.clone()),
            Authenticator::Jwt { key, validation } => (key, validation),
        };
        let token = token.ok_or(ApiError::Unauthenticated("a bearer token is required"))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ApiError::Unauthenticated("the token has expired")
                }
                _ => ApiError::Unauthenticated("the token is invalid"),
            }
        })?;
        let subject =
            data.claims.sub.parse::<UserId>().map_err(|_| {
                ApiError::Unauthenticated("the token's subject is not a valid user id")
            })?;
        let has = |r: &str| data.claims.roles.iter().any(|x| x == r);
        Ok(Principal {
            subject,
            privileged: has("service") || has("admin"),
            user: has("user"),
        })
    }
}

/// The token of an `Authorization: Bearer` header, if any.
pub fn bearer_token(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the Authorization header is not text"))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::Unauthenticated(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

/// The `access_token` query parameter; accepted on the WebSocket path only,
/// since browsers cannot set headers on a WebSocket handshake.
pub fn query_token(uri: &Uri) -> Option<String> {
    let query = uri.query()?;
    form_pairs(query)
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

/// `k=v` pairs of a query string, percent-decoded; undecodable pairs are skipped.
pub(crate) fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state.auth.authenticate(bearer_token(&parts.headers)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use tracker_core::SessionState;

    fn principal(sub: &str, privileged: bool, user: bool) -> Principal {
        Principal {
            subject: sub.parse().unwrap(),
            privileged,
            user,
        }
    }

    fn view(owner: Option<&str>) -> SessionView {
        SessionView {
            session_id: "s1".parse().unwrap(),
            state: SessionState::Idle,
            owner: owner.map(str::to_owned),
            active_connections: 0,
            distinct_users: 0,
            last_connection_at: None,
            last_disconnect_at: None,
            idle_since: None,
            idle_timeout_seconds: None,
            hibernates_at: None,
        }
    }

    #[test]
    fn session_access_matrix() {
        let alice = principal("alice", false, true);
        let service = principal("proxy", true, false);
        let nobody = principal("x", false, false);
        assert!(alice.check_session(Some(&view(Some("alice")))).is_ok());
        assert!(matches!(
            alice.check_session(Some(&view(Some("bob")))),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            alice.check_session(None),
            Err(ApiError::SessionNotFound)
        ));
        assert!(matches!(
            alice.check_session(Some(&view(None))),
            Err(ApiError::SessionNotFound)
        ));
        assert!(service.check_session(None).is_ok());
        assert!(matches!(
            nobody.check_session(Some(&view(Some("x")))),
            Err(ApiError::Forbidden(_))
        ));
        assert!(alice.require_privileged().is_err());
        assert!(service.require_privileged().is_ok());
        assert!(alice.check_acting_as(&"alice".parse().unwrap()).is_ok());
        assert!(alice.check_acting_as(&"bob".parse().unwrap()).is_err());
        assert!(service.check_acting_as(&"bob".parse().unwrap()).is_ok());
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[test]
    fn tokens_are_checked() {
        let auth = Authenticator::jwt("k");
        let ok = token(
            "k",
            serde_json::json!({"sub": "alice", "roles": ["user"], "exp": now() + 60}),
        );
        assert_eq!(
            auth.authenticate(Some(&ok)).unwrap(),
            principal("alice", false, true)
        );
        let cases = [
            None,
            Some(token(
                "other",
                serde_json::json!({"sub": "a", "roles": ["admin"], "exp": now() + 60}),
            )),
            Some(token(
                "k",
                serde_json::json!({"sub": "a", "roles": ["admin"], "exp": now() - 3600}),
            )),
            Some(token(
                "k",
                serde_json::json!({"sub": "a", "roles": ["admin"]}),
            )),
            Some(token(
                "k",
                serde_json::json!({"sub": "", "roles": ["admin"], "exp": now() + 60}),
            )),
            Some("not.a.jwt".to_owned()),
        ];
        for t in cases {
            assert!(
                matches!(
                    auth.authenticate(t.as_deref()),
                    Err(ApiError::Unauthenticated(_))
                ),
                "{t:?}"
            );
        }
        assert!(
            Authenticator::disabled()
                .authenticate(None)
                .unwrap()
                .privileged
        );
    }

    #[test]
    fn query_tokens_are_decoded() {
        let uri: Uri = "/v1/sessions/s/ws?x=1&access_token=a%2Eb+c&y"
            .parse()
            .unwrap();
        assert_eq!(query_token(&uri).as_deref(), Some("a.b c"));
    }
}

//! Who is calling, and what they may do (docs/security.md).
//!
//! A bearer JWT names the caller (`sub`) and its `roles`. It is HS256 with
//! `TRACKER_JWT_SECRET`, or RS256/ES256/EdDSA with the key of
//! `TRACKER_JWT_PUBLIC_KEY_FILE`: exactly one algorithm is accepted, the
//! key's, so a token cannot pick how it is checked. `exp` is required, `nbf`
//! is checked when present, both within `TRACKER_JWT_LEEWAY`; `iss` and `aud`
//! are required when configured. `service` and `admin` act on any session; a
//! plain `user` only on sessions it owns, and only as itself. The decisions
//! are pure functions on [`Principal`] so they are unit-tested without a
//! server.

use std::time::Duration;

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

    /// Whether the caller may state a connection's `client_ip` itself; a
    /// plain user's is the address it connects from.
    pub fn may_set_client_ip(&self) -> bool {
        self.privileged
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

/// What a token's claims must satisfy besides its signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtRules {
    /// Clock skew allowed on `exp` and `nbf` (whole seconds).
    pub leeway: Duration,
    /// When set, `iss` must be present and equal.
    pub issuer: Option<String>,
    /// When set, `aud` must be present and contain it. When not set, a token
    /// that names an audience is refused: it was meant for someone else.
    pub audience: Option<String>,
}

/// Why `TRACKER_JWT_PUBLIC_KEY_FILE` holds no usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a PEM public key (expected -----BEGIN PUBLIC KEY-----)")]
    NotPublicPem,
    #[error("not an RSA, EC P-256 or Ed25519 public key")]
    Unsupported,
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

    /// HS256 with a shared secret (its length is checked by the config).
    pub fn hs256(secret: &[u8], rules: &JwtRules) -> Self {
        Self::with_key(DecodingKey::from_secret(secret), Algorithm::HS256, rules)
    }

    /// The algorithm follows from the key: RS256 for RSA, ES256 for EC
    /// P-256, EdDSA for Ed25519. HS256 is never accepted with a public key,
    /// or its PEM text could serve as an HMAC secret (algorithm confusion).
    pub fn public_key_pem(pem: &[u8], rules: &JwtRules) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::NotPublicPem)?;
        // A private key mounted by mistake must not be taken for the public one.
        if !text.contains("-----BEGIN PUBLIC KEY-----")
            && !text.contains("-----BEGIN RSA PUBLIC KEY-----")
        {
            return Err(KeyError::NotPublicPem);
        }
        let (key, alg) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            (k, Algorithm::RS256)
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
            (k, Algorithm::EdDSA)
        } else {
            return Err(KeyError::Unsupported);
        };
        Ok(Self::with_key(key, alg, rules))
    }

    fn with_key(key: DecodingKey, alg: Algorithm, rules: &JwtRules) -> Self {
        let mut validation = Validation::new(alg);
        let mut required = vec!["exp"];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = rules.leeway.as_secs();
        if let Some(iss) = &rules.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &rules.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Authenticator::Jwt {
            key,
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
            ApiError::Unauthenticated(refusal(e.kind()))
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

/// What a client is told about a refused token: enough to fix its own
/// token, nothing about the key.
fn refusal(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
        ErrorKind::InvalidAudience => "the token's audience is not accepted",
        ErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "exp" => "the token has no exp",
            "iss" => "the token has no iss",
            "aud" => "the token has no aud",
            _ => "the token lacks a required claim",
        },
        _ => "the token is invalid",
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

    const K: &str = "k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-";

    #[test]
    fn tokens_are_checked() {
        let auth = Authenticator::hs256(K.as_bytes(), &JwtRules::default());
        let ok = token(
            K,
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
                K,
                serde_json::json!({"sub": "a", "roles": ["admin"], "exp": now() - 3600}),
            )),
            Some(token(
                K,
                serde_json::json!({"sub": "a", "roles": ["admin"]}),
            )),
            Some(token(
                K,
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
    fn private_or_foreign_pem_is_not_a_public_key() {
        let rules = JwtRules::default();
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            Authenticator::public_key_pem(private.as_bytes(), &rules).err(),
            Some(KeyError::NotPublicPem)
        );
        let junk = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert_eq!(
            Authenticator::public_key_pem(junk.as_bytes(), &rules).err(),
            Some(KeyError::Unsupported)
        );
        assert!(Authenticator::public_key_pem(&[0xff, 0xfe], &rules).is_err());
    }

    #[test]
    fn query_tokens_are_decoded() {
        let uri: Uri = "/v1/sessions/s/ws?x=1&access_token=a%2Eb+c&y"
            .parse()
            .unwrap();
        assert_eq!(query_token(&uri).as_deref(), Some("a.b c"));
    }
}

//! Who is calling (docs/security.md); what the caller may then do is
//! [`crate::access`]'s.
//!
//! A bearer JWT names the caller (`sub`) and its `roles`. It is HS256 with
//! `TRACKER_JWT_SECRET`, or RS256/ES256/EdDSA with the key of
//! `TRACKER_JWT_PUBLIC_KEY_FILE`: exactly one algorithm is accepted, the
//! key's, so a token cannot pick how it is checked. `exp` is required, `nbf`
//! is checked when present, both within `TRACKER_JWT_LEEWAY`; `iss` and `aud`
//! are required when configured. The token comes from the `Authorization`
//! header; the WebSocket route also takes it from the query
//! ([`crate::extract::query_param`]), since browsers cannot set headers there.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tracker_core::UserId;

use crate::access::{Principal, Role};
use crate::config::{ConfigError, TokenKey};
use crate::error::ApiError;
use crate::state::AppState;
use crate::token_cache::TokenCache;

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    roles: Vec<String>,
    /// Checked by the validation; read again to bound the cache entry.
    #[serde(default)]
    exp: Option<f64>,
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
        /// Tokens verified recently (see [`crate::token_cache`]).
        cache: Arc<TokenCache>,
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
    /// The authenticator the validated settings ask for; a public key file
    /// is read here, once.
    pub fn from_settings(key: TokenKey<'_>, rules: &JwtRules) -> Result<Self, ConfigError> {
        match key {
            TokenKey::Disabled => {
                tracing::warn!(
                    "TRACKER_AUTH=disabled: every request is treated as an admin. \
                     Never run this way outside a local machine."
                );
                Ok(Self::disabled())
            }
            TokenKey::Secret(secret) => Ok(Self::hs256(secret.expose().as_bytes(), rules)),
            TokenKey::PublicKeyFile(path) => {
                let key_error = |reason: String| ConfigError::PublicKey {
                    path: path.display().to_string(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| key_error(e.to_string()))?;
                Self::public_key_pem(&pem, rules).map_err(|e| key_error(e.to_string()))
            }
        }
    }

    pub fn disabled() -> Self {
        Authenticator::Disabled(Principal {
            subject: "admin".parse().expect("\"admin\" is a valid user id"),
            role: Role::Admin,
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
            cache: Arc::default(),
        }
    }

    /// The caller behind `token`, or 401.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, ApiError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.authenticate_at(token, now)
    }

    /// [`Authenticator::authenticate`], with `now` (unix seconds) for the
    /// cache; the signature and claims are checked against the real clock.
    fn authenticate_at(&self, token: Option<&str>, now: u64) -> Result<Principal, ApiError> {
        let (key, validation, cache) = match self {
            Authenticator::Disabled(admin) => return Ok(admin.clone()),
            Authenticator::Jwt {
                key,
                validation,
                cache,
            } => (key, validation, cache),
        };
        let token = token.ok_or(ApiError::Unauthenticated("a bearer token is required"))?;
        if let Some(principal) = cache.get(token, now) {
            return Ok(principal);
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| {
            tracing::debug!(error = %e, "token refused");
            ApiError::Unauthenticated(refusal(e.kind()))
        })?;
        let subject =
            data.claims.sub.parse::<UserId>().map_err(|_| {
                ApiError::Unauthenticated("the token's subject is not a valid user id")
            })?;
        let principal = Principal {
            subject,
            role: Role::from_claims(&data.claims.roles),
        };
        cache.insert(token, &principal, data.claims.exp, now);
        Ok(principal)
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
            Principal {
                subject: "alice".parse().unwrap(),
                role: Role::User
            }
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
        assert_eq!(
            Authenticator::disabled().authenticate(None).unwrap().role,
            Role::Admin
        );
    }

    fn cache_of(auth: &Authenticator) -> &TokenCache {
        match auth {
            Authenticator::Jwt { cache, .. } => cache,
            Authenticator::Disabled(_) => panic!("no cache without tokens"),
        }
    }

    #[test]
    fn a_verified_token_is_cached_until_its_exp_only() {
        let auth = Authenticator::hs256(K.as_bytes(), &JwtRules::default());
        let t0 = now() as u64;
        let ok = token(
            K,
            serde_json::json!({"sub": "svc", "roles": ["service"], "exp": t0 + 30}),
        );
        let svc = auth.authenticate_at(Some(&ok), t0).unwrap();
        assert_eq!(cache_of(&auth).get(&ok, t0), Some(svc.clone()));
        assert_eq!(cache_of(&auth).get(&ok, t0 + 30), None, "not at exp");

        // An entry for a token that would fail verification shows which path
        // answered: the cache before its end, the verification from then on.
        let forged = "forged.token.value";
        let until = t0 + 10;
        cache_of(&auth).insert(forged, &svc, Some(until as f64), t0);
        assert_eq!(auth.authenticate_at(Some(forged), until - 1).unwrap(), svc);
        assert!(matches!(
            auth.authenticate_at(Some(forged), until),
            Err(ApiError::Unauthenticated(_))
        ));

        // Refused tokens are never kept.
        let expired = token(
            K,
            serde_json::json!({"sub": "svc", "roles": ["service"], "exp": t0 - 3600}),
        );
        assert!(auth.authenticate_at(Some(&expired), t0).is_err());
        assert_eq!(cache_of(&auth).get(&expired, t0), None);
        let wrong_key = token(
            "other",
            serde_json::json!({"sub": "svc", "roles": ["admin"], "exp": t0 + 30}),
        );
        assert!(auth.authenticate_at(Some(&wrong_key), t0).is_err());
        assert_eq!(cache_of(&auth).get(&wrong_key, t0), None);
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
}

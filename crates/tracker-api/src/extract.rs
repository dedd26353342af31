//! Everything read out of a request before a handler sees it: extractors
//! whose every rejection is an [`ApiError`] naming the field at fault
//! (instead of axum's plain-text rejections), and query-string decoding.

use std::str::FromStr;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde::de::DeserializeOwned;
use tracker_core::{ConnectionId, SessionId, ValidationError};
use utoipa::IntoParams;

use crate::error::ApiError;

/// Request bodies over this get 413.
pub const BODY_LIMIT: usize = 1024 * 1024;
/// The batch heartbeat route's larger limit.
pub const BATCH_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// A JSON body, limited in size by `DefaultBodyLimit` (set per route).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        require_json(req.headers())?;
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body read by the handler itself, for routes that check the
/// caller before the body: the same rules and errors as [`ApiJson`].
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    require_json(headers)?;
    let bytes = body.map_err(body_rejection)?;
    parse_json(&bytes)
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let bad = || {
        ApiError::invalid(
            "Content-Type",
            "the request body must be JSON (Content-Type: application/json)",
        )
    };
    let value = headers.get(CONTENT_TYPE).ok_or_else(bad)?;
    let value = value.to_str().map_err(|_| bad())?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    let is_json = essence.eq_ignore_ascii_case("application/json")
        || (essence.len() > 5
            && essence.is_char_boundary(essence.len() - 5)
            && essence[essence.len() - 5..].eq_ignore_ascii_case("+json"));
    if is_json {
        Ok(())
    } else {
        Err(bad())
    }
}

fn body_rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::invalid("body", "the request body could not be read")
    }
}

/// Parses a JSON document into `T`, naming the field at fault on error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ApiError::invalid("body", "the request body is empty")),
        // serde would take an array for a struct, field by position.
        Some(b'{') => {}
        Some(_) => return Err(ApiError::invalid("body", "must be a JSON object")),
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| {
        ApiError::invalid("body", format!("malformed JSON: {}", strip_position(&e)))
    })?;
    Ok(value)
}

fn json_error(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let message = strip_position(e);
    let root = path.is_empty() || path == ".";
    match e.classify() {
        // serde_json reports a value of the wrong kind for an enum as a
        // syntax error; at a field, the field is what the client must fix.
        Category::Syntax if !root => ApiError::invalid(path, format!("invalid value: {message}")),
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::invalid("body", format!("malformed JSON: {message}"))
        }
        Category::Data => {
            // A missing field is reported at its parent; its name is in the message.
            let field = match (root, quoted_name(&message)) {
                (true, Some(name)) => name.to_owned(),
                (true, None) => "body".to_owned(),
                (false, Some(name)) if message.starts_with("missing field") => {
                    format!("{path}.{name}")
                }
                (false, _) => path.to_owned(),
            };
            ApiError::invalid(field, message)
        }
    }
}

/// serde_json appends " at line L column C"; the field says where already.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// The name in "unknown field `x`, expected ..." or "missing field `x`".
fn quoted_name(message: &str) -> Option<&str> {
    if !(message.starts_with("unknown field") || message.starts_with("missing field")) {
        return None;
    }
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

fn path_param<T: FromStr<Err = ValidationError>>(
    params: &RawPathParams,
    name: &'static str,
) -> Result<T, ApiError> {
    let raw = params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| ApiError::invalid(name, "missing from the path"))?;
    raw.parse().map_err(ApiError::from)
}

async fn raw_params<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<RawPathParams, ApiError> {
    RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|_| ApiError::invalid("path", "path parameters must be UTF-8"))
}

/// `{session_id}` of the path, validated.
#[derive(Debug, IntoParams)]
#[into_params(names("session_id"), parameter_in = Path)]
pub struct SessionPath(
    /// Session resource name
    pub SessionId,
);

impl<S: Send + Sync> FromRequestParts<S> for SessionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(SessionPath(path_param(&params, "session_id")?))
    }
}

/// `{session_id}` and `{connection_id}` of the path, validated.
#[derive(Debug, IntoParams)]
#[into_params(names("session_id", "connection_id"), parameter_in = Path)]
pub struct ConnectionPath(
    /// Session resource name
    pub SessionId,
    /// Connection id
    #[param(value_type = String, format = Uuid)]
    pub ConnectionId,
);

impl<S: Send + Sync> FromRequestParts<S> for ConnectionPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(ConnectionPath(
            path_param(&params, "session_id")?,
            path_param(&params, "connection_id")?,
        ))
    }
}

/// `{connection_id}` alone.
#[derive(Debug, IntoParams)]
#[into_params(names("connection_id"), parameter_in = Path)]
pub struct ConnectionIdPath(
    /// Connection id
    #[param(value_type = String, format = Uuid)]
    pub ConnectionId,
);

impl<S: Send + Sync> FromRequestParts<S> for ConnectionIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = raw_params(parts, state).await?;
        Ok(ConnectionIdPath(path_param(&params, "connection_id")?))
    }
}

/// The value of query parameter `name`, percent-decoded; `None` if absent.
pub fn query_param(uri: &Uri, name: &str) -> Option<String> {
    form_pairs(uri.query()?)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// `k=v` pairs of a query string, percent-decoded (`+` is a space);
/// undecodable pairs are skipped.
pub fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
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
                // from_str_radix alone would take a sign: "%+f".
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        items: Vec<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        session_id: SessionId,
    }

    fn field_of(json: &str) -> String {
        match parse_json::<Outer>(json.as_bytes()) {
            Err(ApiError::InvalidRequest { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field_of(""), "body");
        assert_eq!(field_of("{"), "body");
        assert_eq!(field_of("[1]"), "body");
        assert_eq!(field_of(r#"{"name": 1, "items": []}"#), "name");
        assert_eq!(field_of(r#"{"items": []}"#), "name");
        assert_eq!(field_of(r#"{"name": "a", "items": [], "x": 1}"#), "x");
        assert_eq!(
            field_of(r#"{"name": "a", "items": [{"session_id": "Bad!"}]}"#),
            "items[0].session_id"
        );
        assert_eq!(
            field_of(r#"{"name": "a", "items": [{"session_id": "ok", "y": 2}]}"#),
            "items[0].y"
        );
        assert_eq!(field_of(r#"{"name": "a", "items": []} trailing"#), "body");
        assert!(parse_json::<Outer>(br#"{"name": "a", "items": [{"session_id": "ok"}]}"#).is_ok());
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        assert!(require_json(&h).is_err());
        for (v, ok) in [
            ("application/json", true),
            ("application/json; charset=utf-8", true),
            ("Application/JSON", true),
            ("application/merge-patch+json", true),
            ("text/plain", false),
            ("json", false),
        ] {
            h.insert(CONTENT_TYPE, v.parse().unwrap());
            assert_eq!(require_json(&h).is_ok(), ok, "{v}");
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        let uri: Uri = "/v1/sessions/s/ws?x=1&access_token=a%2Eb+c&y"
            .parse()
            .unwrap();
        assert_eq!(query_param(&uri, "access_token").as_deref(), Some("a.b c"));
        assert_eq!(query_param(&uri, "y").as_deref(), Some(""));
        assert_eq!(query_param(&uri, "z"), None);
        // Bad escapes and invalid UTF-8 drop the pair, not the query.
        let pairs: Vec<_> = form_pairs("a=%zz&b=%ff&d=%+f&c=%41").collect();
        assert_eq!(pairs, [("c".to_owned(), "A".to_owned())]);
    }
}

//! Validated identifiers and the views the store hands out.
//!
//! Everything that crosses the service edge is parsed into these types first
//! (`FromStr` / `TryFrom`), so the store never sees an unchecked string. Each
//! validation error names the field it is about, because that is what the API
//! reports back to the client.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A value that failed validation, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    /// The request field at fault, as clients spell it (`session_id`, `client_ip`, ...).
    pub field: &'static str,
    /// A short human sentence.
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// The name of a Session resource: a Kubernetes object name
/// (1–253 chars, `[a-z0-9]([-a-z0-9.]*[a-z0-9])?`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    pub const MAX_LEN: usize = 253;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SessionId {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ValidationError::new("session_id", reason);
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(err("must be 1 to 253 characters"));
        }
        let bytes = s.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if !bytes.iter().all(|&b| alnum(b) || b == b'-' || b == b'.') {
            return Err(err(
                "may contain only lowercase letters, digits, '-' and '.'",
            ));
        }
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(err("must start and end with a lowercase letter or digit"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string schema with the validation the type applies, so the OpenAPI
/// document allows exactly what the API accepts.
#[cfg(feature = "openapi")]
fn string_schema(
    description: &str,
    pattern: &str,
    max_length: usize,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .description(Some(description))
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max_length))
        .into()
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for SessionId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "Name of the Session resource (a Kubernetes object name)",
            "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
            Self::MAX_LEN,
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for SessionId {}

/// A connection's id: a UUID, server-generated unless the client supplies one
/// so that a retried registration is recognised as the same connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnectionId(Uuid);

impl ConnectionId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl From<Uuid> for ConnectionId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl FromStr for ConnectionId {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| ValidationError::new("connection_id", "must be a UUID"))
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Always the hyphenated lowercase form, so Redis members and history rows agree.
        self.0.hyphenated().fmt(f)
    }
}

/// A user id: 1–255 printable characters (no control characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub const MAX_CHARS: usize = 255;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UserId {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s.chars().count();
        if n == 0 || n > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "user_id",
                "must be 1 to 255 characters",
            ));
        }
        if s.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "user_id",
                "must contain only printable characters",
            ));
        }
        Ok(Self(s.to_owned()))
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for UserId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        string_schema(
            "User id: printable characters",
            "^[^\\x00-\\x1f\\x7f-\\x9f]+$",
            Self::MAX_CHARS,
        )
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for UserId {}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the user reaches the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Websocket,
    Vnc,
    Http,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Websocket, Protocol::Vnc, Protocol::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Websocket => "websocket",
            Protocol::Vnc => "vnc",
            Protocol::Http => "http",
        }
    }
}

impl FromStr for Protocol {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ValidationError::new("protocol", "must be websocket, vnc or http"))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A user agent as kept: at most 512 bytes, cut at a character boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserAgent(String);

impl UserAgent {
    pub const MAX_BYTES: usize = 512;

    /// A user agent a client sent as a field: control characters are refused
    /// (they break logs, and PostgreSQL refuses NUL), a long one is cut.
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        if s.chars().any(is_forbidden_control) {
            return Err(ValidationError::new(
                "user_agent",
                "must not contain control characters",
            ));
        }
        Ok(Self::truncated(s))
    }

    /// Keeps what fits; a user agent is informational, so it is cut rather
    /// than refused. The text is kept as it is: for text read back from the
    /// store, which was validated on its way in.
    pub fn truncated(s: &str) -> Self {
        let mut end = s.len().min(Self::MAX_BYTES);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(s[..end].to_owned())
    }

    /// A user agent from a request header, which the client does not fill
    /// in as a field: control characters (a header may hold a tab) become
    /// spaces rather than refuse the request.
    pub fn from_header(s: &str) -> Self {
        let cut = Self::truncated(s);
        if !cut.0.chars().any(is_forbidden_control) {
            return cut;
        }
        Self(
            cut.0
                .chars()
                .map(|c| if is_forbidden_control(c) { ' ' } else { c })
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The control characters no string field may hold: C0 (U+0000 to U+001F)
/// and DEL (U+007F).
pub fn is_forbidden_control(c: char) -> bool {
    c <= '\u{1f}' || c == '\u{7f}'
}

/// Parses a client IP as the API receives it.
pub fn parse_client_ip(s: &str) -> Result<IpAddr, ValidationError> {
    s.parse()
        .map_err(|_| ValidationError::new("client_ip", "must be an IPv4 or IPv6 address"))
}

/// Why a connection ended, as written to `connection_history.end_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// Closed by the client or its API replica.
    Closed,
    /// No heartbeat within the window; collected by the sweep.
    Expired,
    /// Ended by the tracker: the session reached its max session duration
    /// and was hibernated with the connection live.
    MaxDuration,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Closed => "closed",
            EndReason::Expired => "expired",
            EndReason::MaxDuration => "max_duration",
        }
    }
}

impl FromStr for EndReason {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" => Ok(EndReason::Closed),
            "expired" => Ok(EndReason::Expired),
            "max_duration" => Ok(EndReason::MaxDuration),
            _ => Err(ValidationError::new(
                "end_reason",
                "must be closed, expired or max_duration",
            )),
        }
    }
}

/// The state of a session as the tracker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// `spec.state: running` with at least one live connection.
    Running,
    /// `spec.state: running` and no live connection.
    Idle,
    /// Claimed by the reaper; the hibernation patch is in flight.
    Hibernating,
    /// `spec.state: hibernated`.
    Hibernated,
    /// A connection arrived while hibernated or hibernating; a wake is pending.
    Waking,
    /// `spec.state: terminated`: never woken or hibernated. The original list
    /// of states is silent on terminated Sessions; we name them rather than
    /// pretend they are unknown.
    Terminated,
    /// No Session resource seen for this id.
    Unknown,
}

impl SessionState {
    pub const ALL: [SessionState; 7] = [
        SessionState::Running,
        SessionState::Idle,
        SessionState::Hibernating,
        SessionState::Hibernated,
        SessionState::Waking,
        SessionState::Terminated,
        SessionState::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Running => "running",
            SessionState::Idle => "idle",
            SessionState::Hibernating => "hibernating",
            SessionState::Hibernated => "hibernated",
            SessionState::Waking => "waking",
            SessionState::Terminated => "terminated",
            SessionState::Unknown => "unknown",
        }
    }
}

impl FromStr for SessionState {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SessionState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ValidationError::new("state", format!("unknown session state {s:?}")))
    }
}

/// `spec.state` of a Session resource, the only states Kubernetes knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceState {
    Running,
    Hibernated,
    Terminated,
}

impl ResourceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceState::Running => "running",
            ResourceState::Hibernated => "hibernated",
            ResourceState::Terminated => "terminated",
        }
    }
}

impl FromStr for ResourceState {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(ResourceState::Running),
            "hibernated" => Ok(ResourceState::Hibernated),
            "terminated" => Ok(ResourceState::Terminated),
            _ => Err(ValidationError::new(
                "spec.state",
                "must be running, hibernated or terminated",
            )),
        }
    }
}

/// Parses a duration as Session specs write it (`^[0-9]+(s|m|h)$`, e.g.
/// `30m`): `spec.idleTimeout` and `spec.maxSessionDuration`, and the same
/// fields of a declared session. `None` for anything else.
pub fn parse_duration_spec(s: &str) -> Option<std::time::Duration> {
    let unit = s.chars().last()?;
    let digits = &s[..s.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        's' => Some(n),
        'm' => n.checked_mul(60),
        'h' => n.checked_mul(3600),
        _ => None,
    }?;
    Some(std::time::Duration::from_secs(secs))
}

/// A live connection as clients see it (C in the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectionView {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub connection_id: ConnectionId,
    pub session_id: SessionId,
    pub user_id: UserId,
    pub protocol: Protocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub client_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub user_agent: Option<UserAgent>,
    #[serde(with = "rfc3339_ms")]
    pub connected_at: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    pub last_heartbeat: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    pub expires_at: DateTime<Utc>,
}

/// A session's state and counters (S in the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionView {
    pub session_id: SessionId,
    pub state: SessionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub active_connections: u64,
    pub distinct_users: u64,
    #[serde(
        with = "rfc3339_ms::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub last_connection_at: Option<DateTime<Utc>>,
    #[serde(
        with = "rfc3339_ms::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub last_disconnect_at: Option<DateTime<Utc>>,
    #[serde(
        with = "rfc3339_ms::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub idle_since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// When a running session is hibernated if nothing changes: its idle
    /// timeout (without connections) or its max session duration, whichever
    /// comes first.
    #[serde(
        with = "rfc3339_ms::option",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub hibernates_at: Option<DateTime<Utc>>,
}

/// A finished connection, exactly the columns of `connection_history`
/// but `archived_at`, which the archiver sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryRecord {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Uuid))]
    pub connection_id: ConnectionId,
    pub session_id: SessionId,
    pub user_id: UserId,
    pub protocol: Protocol,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub client_ip: Option<IpAddr>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub user_agent: Option<UserAgent>,
    #[serde(with = "rfc3339_ms")]
    pub connected_at: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    pub disconnected_at: DateTime<Utc>,
    #[serde(with = "rfc3339_ms")]
    pub last_heartbeat_at: DateTime<Utc>,
    pub end_reason: EndReason,
    /// `metadata.uid` of the Session resource the session was when the
    /// connection ended; `None` for a session without resource.
    pub session_uid: Option<String>,
}

/// Converts a Redis millisecond timestamp into a UTC time. Out-of-range values
/// cannot come from `TIME`; they map to the epoch rather than panic.
pub fn millis_to_utc(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// RFC 3339, UTC, with exactly milliseconds — the API's time format (docs/api.md).
pub mod rfc3339_ms {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| {
                    DateTime::parse_from_rfc3339(&s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(serde::de::Error::custom)
                })
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_follow_kubernetes_names() {
        for ok in ["a", "s1", "my-session.v2", &"a".repeat(253)] {
            assert!(ok.parse::<SessionId>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            ".a",
            "A",
            "a_b",
            "a b",
            "ä",
            &"a".repeat(254),
            "a{b}",
        ] {
            let err = bad.parse::<SessionId>().unwrap_err();
            assert_eq!(err.field, "session_id", "{bad}");
        }
    }

    #[test]
    fn connection_ids_are_uuids_in_canonical_form() {
        let id: ConnectionId = "6F9619FF-8B86-D011-B42D-00C04FC964FF"
            .parse()
            .expect("uuid");
        assert_eq!(id.to_string(), "6f9619ff-8b86-d011-b42d-00c04fc964ff");
        assert_eq!(
            "nope".parse::<ConnectionId>().unwrap_err().field,
            "connection_id"
        );
    }

    #[test]
    fn user_ids_are_printable_and_bounded() {
        assert!("alice@example.com".parse::<UserId>().is_ok());
        assert!("Zoë {team}".parse::<UserId>().is_ok());
        assert!("é".repeat(255).parse::<UserId>().is_ok());
        for bad in [
            String::new(),
            "a\nb".into(),
            "\u{7f}".into(),
            "x".repeat(256),
        ] {
            assert_eq!(bad.parse::<UserId>().unwrap_err().field, "user_id");
        }
    }

    #[test]
    fn user_agent_fields_refuse_control_characters_and_headers_lose_them() {
        for bad in ["a\u{0}b", "tab\there", "del\u{7f}", "nl\n"] {
            let e = UserAgent::parse(bad).expect_err(bad);
            assert_eq!(e.field, "user_agent");
        }
        assert_eq!(
            UserAgent::parse("Mozilla/5.0 (é)").map(|u| u.as_str().to_owned()),
            Ok("Mozilla/5.0 (é)".to_owned())
        );
        assert_eq!(UserAgent::from_header("a\tb\u{0}c").as_str(), "a b c");
        assert_eq!(UserAgent::from_header("plain").as_str(), "plain");
    }

    #[test]
    fn user_agents_are_cut_at_a_char_boundary() {
        let s = "é".repeat(300); // 600 bytes, 2 bytes a char
        let ua = UserAgent::truncated(&s);
        assert_eq!(ua.as_str().len(), 512);
        let odd = format!("a{}", "é".repeat(300)); // boundary falls mid-char at 512
        assert_eq!(UserAgent::truncated(&odd).as_str().len(), 511);
        assert_eq!(UserAgent::truncated("curl/8").as_str(), "curl/8");
    }

    #[test]
    fn protocols_and_states_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>(), Ok(p));
        }
        assert_eq!("ssh".parse::<Protocol>().unwrap_err().field, "protocol");
        for s in SessionState::ALL {
            assert_eq!(s.as_str().parse::<SessionState>(), Ok(s));
        }
    }

    #[test]
    fn ips_parse_v4_and_v6_only() {
        assert!(parse_client_ip("10.0.0.1").is_ok());
        assert!(parse_client_ip("::1").is_ok());
        assert_eq!(
            parse_client_ip("10.0.0.256").unwrap_err().field,
            "client_ip"
        );
    }

    #[test]
    fn times_serialize_with_milliseconds() {
        let t = millis_to_utc(1_700_000_000_123);
        assert_eq!(rfc3339_ms::format(&t), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn session_id_deserialization_validates() {
        assert!(serde_json::from_str::<SessionId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<SessionId>("\"Not OK\"").is_err());
    }
}

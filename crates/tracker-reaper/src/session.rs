//! The Session custom resource as the reaper reads it, and the pure
//! translation of one into what the store mirrors.

use std::time::Duration;

use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tracker_core::{IdleSource, IdleTimeout, ResourceState, SessionId, SessionMeta};

/// The annotation that exempts a Session from hibernation when `"false"`.
pub const AUTO_HIBERNATE_ANNOTATION: &str = "stream.space/auto-hibernate";

/// The fields of `Session.spec` the reaper reads; every other field is
/// ignored (serde's default), so a newer schema does not break the mirror.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stream.space",
    version = "v1alpha1",
    kind = "Session",
    plural = "sessions",
    namespaced
)]
pub struct SessionSpec {
    /// The owning user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `running`, `hibernated` or `terminated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `^[0-9]+(s|m|h)$`; an empty string disables hibernation.
    #[serde(
        default,
        rename = "idleTimeout",
        skip_serializing_if = "Option::is_none"
    )]
    pub idle_timeout: Option<String>,
    /// Same syntax as `idleTimeout`: a session running this long since it
    /// last started is hibernated even with live connections.
    #[serde(
        default,
        rename = "maxSessionDuration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_session_duration: Option<String>,
}

/// Why a Session resource could not be mirrored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmirrorable {
    #[error("name {0:?} is not a valid session id")]
    BadName(String),
    #[error("spec.state {0:?} is not running, hibernated or terminated")]
    BadState(Option<String>),
}

/// Parses `spec.idleTimeout` (`^[0-9]+(s|m|h)$`). `None` for anything else.
pub fn parse_idle_timeout(s: &str) -> Option<Duration> {
    tracker_core::domain::parse_duration_spec(s)
}

/// The idle timeout a Session asks for. Exempt (annotation `"false"`) or an
/// empty `spec.idleTimeout` is [`IdleTimeout::Off`]; absent is the default.
/// A value that does not parse is also `Off`: never hibernate on a guess.
pub fn idle_timeout_of(
    annotation: Option<&str>,
    spec_idle_timeout: Option<&str>,
    default: Duration,
) -> IdleTimeout {
    if annotation == Some("false") {
        return IdleTimeout::Off;
    }
    match spec_idle_timeout {
        None => IdleTimeout::After(default),
        Some("") => IdleTimeout::Off,
        Some(s) => parse_idle_timeout(s).map_or(IdleTimeout::Off, IdleTimeout::After),
    }
}

/// Where [`idle_timeout_of`]'s answer comes from, for explanations.
pub fn idle_source_of(annotation: Option<&str>, spec_idle_timeout: Option<&str>) -> IdleSource {
    if annotation == Some("false") {
        return IdleSource::Annotation;
    }
    match spec_idle_timeout {
        None => IdleSource::Default,
        Some("") => IdleSource::Empty,
        Some(s) if parse_idle_timeout(s).is_some() => IdleSource::Spec,
        Some(_) => IdleSource::Invalid,
    }
}

/// The max session duration a Session asks for: `spec.maxSessionDuration`
/// in the syntax of `spec.idleTimeout`. Absent, empty, zero or a value that
/// does not parse is no limit: never end connections on a guess. The
/// auto-hibernate annotation exempts from idle hibernation only; a max
/// duration is a limit the Session's owner set on purpose.
pub fn max_session_duration_of(spec: Option<&str>) -> Option<Duration> {
    spec.and_then(parse_idle_timeout).filter(|d| !d.is_zero())
}

/// What the store mirrors of a Session resource.
pub fn session_meta(
    session: &Session,
    default_idle: Duration,
) -> Result<SessionMeta, Unmirrorable> {
    let name = session.name_any();
    let session_id: SessionId = name
        .parse()
        .map_err(|_| Unmirrorable::BadName(name.clone()))?;
    let state = session
        .spec
        .state
        .as_deref()
        .and_then(|s| s.parse::<ResourceState>().ok())
        .ok_or_else(|| Unmirrorable::BadState(session.spec.state.clone()))?;
    let annotation = session
        .annotations()
        .get(AUTO_HIBERNATE_ANNOTATION)
        .map(String::as_str);
    Ok(SessionMeta {
        session_id,
        uid: session.metadata.uid.clone(),
        owner: session.spec.user.clone().filter(|u| !u.is_empty()),
        idle_source: idle_source_of(annotation, session.spec.idle_timeout.as_deref()),
        state,
        idle_timeout: idle_timeout_of(
            annotation,
            session.spec.idle_timeout.as_deref(),
            default_idle,
        ),
        generation: session.metadata.generation,
        max_session_duration: max_session_duration_of(session.spec.max_session_duration.as_deref()),
        created_at: session
            .metadata
            .creation_timestamp
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp_millis(t.0.as_millisecond())),
    })
}

/// `spec.state` parsed, if it is `running`, `hibernated` or `terminated`.
pub fn resource_state(session: &Session) -> Option<ResourceState> {
    session.spec.state.as_deref()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: Duration = Duration::from_secs(1800);

    #[test]
    fn idle_timeouts_follow_the_contract_pattern() {
        assert_eq!(parse_idle_timeout("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_idle_timeout("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_idle_timeout("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_idle_timeout("0s"), Some(Duration::ZERO));
        for bad in [
            "",
            "s",
            "5",
            "5d",
            "1.5h",
            "-1m",
            " 5m",
            "5m ",
            "5M",
            "5ms",
            "٣s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_idle_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn exemption_and_empty_string_switch_hibernation_off() {
        let after = |s| IdleTimeout::After(Duration::from_secs(s));
        assert_eq!(idle_timeout_of(None, None, DEFAULT), after(1800));
        assert_eq!(idle_timeout_of(None, Some("10m"), DEFAULT), after(600));
        assert_eq!(idle_timeout_of(None, Some(""), DEFAULT), IdleTimeout::Off);
        assert_eq!(
            idle_timeout_of(Some("false"), Some("10m"), DEFAULT),
            IdleTimeout::Off
        );
        assert_eq!(
            idle_timeout_of(Some("false"), None, DEFAULT),
            IdleTimeout::Off
        );
        assert_eq!(
            idle_timeout_of(Some("true"), Some("10m"), DEFAULT),
            after(600)
        );
        assert_eq!(idle_timeout_of(Some("False"), None, DEFAULT), after(1800));
        assert_eq!(
            idle_timeout_of(None, Some("soon"), DEFAULT),
            IdleTimeout::Off
        );
    }

    #[test]
    fn the_source_of_the_idle_timeout_tells_exemption_from_an_empty_value() {
        assert_eq!(idle_source_of(None, None), IdleSource::Default);
        assert_eq!(idle_source_of(None, Some("10m")), IdleSource::Spec);
        assert_eq!(idle_source_of(None, Some("")), IdleSource::Empty);
        assert_eq!(idle_source_of(None, Some("soon")), IdleSource::Invalid);
        assert_eq!(
            idle_source_of(Some("false"), Some("")),
            IdleSource::Annotation
        );
        assert_eq!(idle_source_of(Some("true"), Some("10m")), IdleSource::Spec);
    }

    fn session(json: serde_json::Value) -> Session {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_resource_maps_to_session_meta_tolerating_unknown_fields() {
        let s = session(serde_json::json!({
            "apiVersion": "stream.space/v1alpha1",
            "kind": "Session",
            "metadata": {"name": "s-1", "namespace": "ns", "generation": 4,
                         "creationTimestamp": "2026-11-30T09:15:02Z",
                         "annotations": {"stream.space/auto-hibernate": "true"}},
            "spec": {"user": "alice", "state": "running", "idleTimeout": "2s",
                     "image": "desktop:1", "resources": {"cpu": 2}},
            "status": {"phase": "Running"}
        }));
        let meta = session_meta(&s, DEFAULT).unwrap();
        assert_eq!(meta.session_id.as_str(), "s-1");
        assert_eq!(meta.owner.as_deref(), Some("alice"));
        assert_eq!(meta.state, ResourceState::Running);
        assert_eq!(
            meta.idle_timeout,
            IdleTimeout::After(Duration::from_secs(2))
        );
        assert_eq!(meta.generation, Some(4));
        assert_eq!(
            meta.created_at.map(|t| t.to_rfc3339()),
            Some("2026-11-30T09:15:02+00:00".to_owned())
        );
    }

    #[test]
    fn max_session_durations_use_the_idle_timeout_syntax() {
        assert_eq!(
            max_session_duration_of(Some("8h")),
            Some(Duration::from_secs(8 * 3600))
        );
        assert_eq!(
            max_session_duration_of(Some("90s")),
            Some(Duration::from_secs(90))
        );
        for none in [None, Some(""), Some("0s"), Some("8 hours"), Some("1d")] {
            assert_eq!(max_session_duration_of(none), None, "{none:?}");
        }
        let s = session(serde_json::json!({
            "metadata": {"name": "s-1", "annotations": {"stream.space/auto-hibernate": "false"}},
            "spec": {"state": "running", "maxSessionDuration": "2h"}
        }));
        let meta = session_meta(&s, DEFAULT).unwrap();
        assert_eq!(meta.idle_timeout, IdleTimeout::Off);
        assert_eq!(
            meta.max_session_duration,
            Some(Duration::from_secs(7200)),
            "the exemption does not lift the max duration"
        );
    }

    #[test]
    fn unknown_states_and_names_are_not_mirrored() {
        let s = session(serde_json::json!({
            "metadata": {"name": "s-1"}, "spec": {"state": "paused"}
        }));
        assert!(matches!(
            session_meta(&s, DEFAULT),
            Err(Unmirrorable::BadState(_))
        ));
        let s = session(serde_json::json!({"metadata": {"name": "s-1"}, "spec": {}}));
        assert_eq!(session_meta(&s, DEFAULT), Err(Unmirrorable::BadState(None)));
        let s = session(serde_json::json!({
            "metadata": {"name": "Bad_Name"}, "spec": {"state": "running"}
        }));
        assert!(matches!(
            session_meta(&s, DEFAULT),
            Err(Unmirrorable::BadName(_))
        ));
    }
}

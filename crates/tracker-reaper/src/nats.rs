//! The NATS side of session events: subjects, payloads, and a JetStream
//! client whose every call is bounded.
//!
//! Events are published with acknowledgement (JetStream), each with its
//! `event_id` as `Nats-Msg-Id`: a publication whose acknowledgement was lost
//! is published again under the same id, and the stream's duplicate window
//! drops the copy. The reaper creates the stream [`STREAM`] over
//! [`SUBJECTS`] when no stream covers those subjects yet; an operator's own
//! stream over them is used as it is.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use serde::Serialize;
use tracker_core::{EventKind, QueuedEvent};

/// The stream the reaper creates when none covers [`SUBJECTS`].
pub const STREAM: &str = "TRACKER_SESSION_EVENTS";
/// Every session event's subject falls under this.
pub const SUBJECTS: &str = "streamspace.session.>";
/// How long the stream remembers an event id to drop a republished copy.
/// Longer than any retry of one event takes while NATS answers.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// `streamspace.session.<kind>.<platform>`.
pub fn subject(kind: EventKind, platform: &str) -> String {
    format!("streamspace.session.{}.{platform}", kind.as_str())
}

/// The JSON body of an event, as controllers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Payload {
    pub event_id: String,
    /// RFC 3339 UTC with milliseconds: when the change was decided.
    pub timestamp: String,
    pub session_id: String,
    pub user_id: String,
    pub platform: String,
    pub reason: String,
}

impl Payload {
    /// The same bytes on every retry: everything comes from the queued entry.
    pub fn of(event: &QueuedEvent) -> Self {
        Self {
            event_id: event.event_id.clone(),
            timestamp: tracker_core::domain::rfc3339_ms::format(&event.timestamp),
            session_id: event.session_id.to_string(),
            user_id: event.user_id.clone(),
            platform: event.platform.clone(),
            reason: event.reason.clone(),
        }
    }
}

/// Why a publication failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No acknowledgement within the timeout: NATS is down, slow, or the
    /// answer was lost. The event may have landed; it is published again
    /// under the same id.
    #[error("no acknowledgement from NATS within {0:?}")]
    Timeout(Duration),
    #[error("nats: {0}")]
    Nats(String),
}

/// A JetStream publisher; cheap to clone.
#[derive(Clone)]
pub struct Nats {
    js: jetstream::Context,
    timeout: Duration,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Nats {
    /// Connects in the background: the reaper starts while NATS is down, and
    /// the client reconnects for ever (events wait in Redis meanwhile).
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, PublishError> {
        let client = async_nats::ConnectOptions::new()
            .name("tracker-reaper")
            .connection_timeout(timeout)
            .request_timeout(Some(timeout))
            .retry_on_initial_connect()
            .max_reconnects(None)
            // Back to NATS within a second of its return, without hammering it.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 * attempts.min(10) as u64)
            })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            })
            .connect(url)
            .await
            .map_err(|e| PublishError::Nats(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .ack_timeout(timeout)
            .build(client);
        Ok(Self { js, timeout })
    }

    /// Makes sure a stream covers [`SUBJECTS`]: the one that does, or
    /// [`STREAM`], created. Answers the stream's name.
    pub async fn ensure_stream(&self) -> Result<String, PublishError> {
        let probe = subject(EventKind::Hibernate, "any");
        let found = self.bounded(self.js.stream_by_subject(probe)).await?;
        match found {
            Ok(name) => return Ok(name),
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamByNameErrorKind::NotFound
                ) => {}
            Err(e) => return Err(PublishError::Nats(e.to_string())),
        }
        let config = stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![SUBJECTS.to_owned()],
            storage: stream::StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            ..stream::Config::default()
        };
        let created = self.bounded(self.js.get_or_create_stream(config)).await?;
        created
            .map(|_| STREAM.to_owned())
            .map_err(|e| PublishError::Nats(e.to_string()))
    }

    /// Publishes one event and waits for JetStream's acknowledgement.
    /// Answers whether the stream had it already (a duplicate dropped).
    pub async fn publish(&self, event: &QueuedEvent) -> Result<bool, PublishError> {
        let body = serde_json::to_vec(&Payload::of(event))
            .map_err(|e| PublishError::Nats(e.to_string()))?;
        let message = jetstream::message::PublishMessage::build()
            .message_id(&event.event_id)
            .payload(body.into());
        let subject = subject(event.kind, &event.platform);
        let ack = self
            .bounded(async {
                let pending = self.js.send_publish(subject, message).await?;
                pending.await
            })
            .await?;
        match ack {
            Ok(ack) => Ok(ack.duplicate),
            Err(e) if e.kind() == PublishErrorKind::TimedOut => {
                Err(PublishError::Timeout(self.timeout))
            }
            Err(e) => Err(PublishError::Nats(e.to_string())),
        }
    }

    /// Bounds a call by the timeout (the client's own timeouts do not cover
    /// everything, waiting for a reconnect among others).
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = T>,
    ) -> Result<T, PublishError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| PublishError::Timeout(self.timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracker_core::domain::millis_to_utc;

    #[test]
    fn subjects_follow_the_streamspace_names() {
        assert_eq!(
            subject(EventKind::Hibernate, "docker"),
            "streamspace.session.hibernate.docker"
        );
        assert_eq!(
            subject(EventKind::Wake, "kubernetes"),
            "streamspace.session.wake.kubernetes"
        );
        assert_eq!(
            subject(EventKind::Warning, "docker"),
            "streamspace.session.warning.docker"
        );
    }

    #[test]
    fn the_payload_has_exactly_the_contract_fields() {
        let event = QueuedEvent {
            entry_id: "1-0".into(),
            event_id: "e-1".into(),
            kind: EventKind::Hibernate,
            session_id: "s-1".parse().expect("sid"),
            user_id: "alice".into(),
            platform: "docker".into(),
            reason: "idle_timeout".into(),
            timestamp: millis_to_utc(1_700_000_000_123),
            completes: true,
        };
        let json = serde_json::to_value(Payload::of(&event)).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "event_id": "e-1",
                "timestamp": "2023-11-14T22:13:20.123Z",
                "session_id": "s-1",
                "user_id": "alice",
                "platform": "docker",
                "reason": "idle_timeout",
            })
        );
    }
}

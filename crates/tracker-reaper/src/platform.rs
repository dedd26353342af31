//! The thin adapter that reads and changes Session resources.
//!
//! [`SessionApi`] is what the hibernator and the waker call; [`KubeSessions`]
//! implements it with the kube client. Every change is a JSON merge patch of
//! `spec.state` only, with field manager `tracker-reaper`, conditional on the
//! `metadata.resourceVersion` the decision was made on: a Session changed by
//! someone else in between answers 409 and is decided again, never overwritten.

use std::fmt::Debug;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::api::{Patch, PatchParams};
use kube::Api;
use tracker_core::{ResourceState, SessionId};

use crate::error::{kube_timeout, Result};
use crate::session::Session;

/// The field manager of every write the reaper makes.
pub const FIELD_MANAGER: &str = "tracker-reaper";

/// Reads and changes Session resources.
pub trait SessionApi: Send + Sync + Debug {
    /// The Session, or `None` if it does not exist.
    fn get<'a>(&'a self, name: &'a SessionId) -> BoxFuture<'a, Result<Option<Session>>>;

    /// Sets `spec.state`, provided the resource is still at `resource_version`.
    /// Answers the patched resource (its new generation).
    fn set_state<'a>(
        &'a self,
        name: &'a SessionId,
        resource_version: &'a str,
        state: ResourceState,
    ) -> BoxFuture<'a, Result<Session>>;
}

/// The merge patch that sets `spec.state`, conditional on a resourceVersion.
pub fn state_patch(resource_version: &str, state: ResourceState) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version},
        "spec": {"state": state.as_str()},
    })
}

/// [`SessionApi`] over the Kubernetes API.
#[derive(Clone)]
pub struct KubeSessions {
    api: Api<Session>,
    timeout: Duration,
}

impl Debug for KubeSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSessions")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl KubeSessions {
    pub fn new(client: kube::Client, namespace: &str, timeout: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            timeout,
        }
    }
}

impl SessionApi for KubeSessions {
    fn get<'a>(&'a self, name: &'a SessionId) -> BoxFuture<'a, Result<Option<Session>>> {
        Box::pin(kube_timeout(self.timeout, self.api.get_opt(name.as_str())))
    }

    fn set_state<'a>(
        &'a self,
        name: &'a SessionId,
        resource_version: &'a str,
        state: ResourceState,
    ) -> BoxFuture<'a, Result<Session>> {
        Box::pin(async move {
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            };
            let patch = Patch::Merge(state_patch(resource_version, state));
            kube_timeout(self.timeout, self.api.patch(name.as_str(), &params, &patch)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    #[test]
    fn the_patch_touches_only_spec_state_and_carries_the_precondition() {
        let p = state_patch("42", ResourceState::Hibernated);
        assert_eq!(
            p,
            serde_json::json!({"metadata": {"resourceVersion": "42"}, "spec": {"state": "hibernated"}})
        );
    }

    /// The request on the wire, against a scripted API server (tower-test).
    #[tokio::test]
    async fn set_state_sends_a_conditional_merge_patch_with_our_field_manager() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let api = KubeSessions::new(client, "ns1", Duration::from_secs(5));
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("one request");
            assert_eq!(request.method(), http::Method::PATCH);
            assert_eq!(
                request.uri().path(),
                "/apis/stream.space/v1alpha1/namespaces/ns1/sessions/s-1"
            );
            assert!(
                request
                    .uri()
                    .query()
                    .unwrap_or_default()
                    .contains("fieldManager=tracker-reaper"),
                "{:?}",
                request.uri()
            );
            assert_eq!(
                request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.as_bytes()),
                Some(&b"application/merge-patch+json"[..])
            );
            let body = request.into_body().collect_bytes().await.expect("body");
            let body: serde_json::Value = serde_json::from_slice(&body).expect("json body");
            assert_eq!(body, state_patch("7", ResourceState::Hibernated));
            let answer = serde_json::json!({
                "apiVersion": "stream.space/v1alpha1", "kind": "Session",
                "metadata": {"name": "s-1", "namespace": "ns1", "generation": 3, "resourceVersion": "8"},
                "spec": {"state": "hibernated"}
            });
            let bytes = serde_json::to_vec(&answer).expect("serialize");
            send.send_response(
                Response::builder()
                    .status(200)
                    .body(Body::from(bytes))
                    .expect("response"),
            );
        });
        let id: SessionId = "s-1".parse().expect("session id");
        let patched = api
            .set_state(&id, "7", ResourceState::Hibernated)
            .await
            .expect("patched");
        assert_eq!(patched.metadata.generation, Some(3));
        server.await.expect("server assertions");
    }

    #[tokio::test]
    async fn a_conflict_is_recognised() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = KubeSessions::new(
            kube::Client::new(mock, "default"),
            "ns1",
            Duration::from_secs(5),
        );
        tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("one request");
            let status = serde_json::json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 409,
                "reason": "Conflict", "message": "the object has been modified"
            });
            let bytes = serde_json::to_vec(&status).expect("serialize");
            send.send_response(
                Response::builder()
                    .status(409)
                    .body(Body::from(bytes))
                    .expect("response"),
            );
        });
        let id: SessionId = "s-1".parse().expect("session id");
        let err = api
            .set_state(&id, "7", ResourceState::Running)
            .await
            .unwrap_err();
        assert!(err.is_conflict(), "{err}");
    }
}

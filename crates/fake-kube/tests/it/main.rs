//! Integration tests: the real `kube` client (and `kube::runtime::watcher`) against the fake.
#![allow(clippy::unwrap_used)]

mod control;
mod faults;
mod injection;
mod leases;
mod sessions;
mod watch_faults;

use std::time::Duration;

use fake_kube::FakeKube;
use futures::{Stream, StreamExt};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A local stand-in for the tracker's Session CRD: only what the reaper reads.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "stream.space",
    version = "v1alpha1",
    kind = "Session",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    pub user: String,
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

/// Generous: only reached when a test is about to fail anyway.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const NS: &str = "tracker";

pub async fn start() -> (FakeKube, kube::Client) {
    let fake = FakeKube::start().await.expect("start fake-kube");
    let client = fake.kube_client().expect("kube client");
    (fake, client)
}

pub fn session_json(name: &str, state: &str) -> Value {
    json!({
        "apiVersion": "stream.space/v1alpha1",
        "kind": "Session",
        "metadata": {"name": name},
        "spec": {"user": "alice", "state": state, "idleTimeout": "30m"},
    })
}

/// The next stream item, failing the test instead of hanging.
pub async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    tokio::time::timeout(TIMEOUT, stream.next())
        .await
        .expect("stream item in time")
}

/// The `Status` code of an API error, failing the test on success or other errors.
pub fn api_code<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

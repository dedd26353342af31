//! A **fake** Kubernetes API server for tests.
//!
//! This is not Kubernetes. It is a small in-memory HTTP server (axum) that speaks just enough
//! of the Kubernetes REST API for the real `kube` client — including `kube::runtime::watcher` —
//! to drive the tracker's reaper against it, in-process or as a separate process
//! (the `fake-kube` binary). Nothing is persisted and there is no authentication.
//!
//! # What it implements
//!
//! Two namespaced resources, stored schema-agnostically as JSON:
//! - `sessions.stream.space/v1alpha1` (kind `Session`), and
//! - `leases.coordination.k8s.io/v1` (kind `Lease`).
//!
//! For both: list (also across all namespaces), watch, get, create, replace (PUT), delete, and
//! PATCH with `application/merge-patch+json` or `application/apply-patch+yaml`. Errors are
//! Kubernetes `Status` bodies so that `kube` maps them to `kube::Error::Api` with the right code.
//! A global counter provides `resourceVersion`s, so a list's version can be used to watch.
//!
//! # How it differs from a real API server
//!
//! - No schema validation, defaulting, admission, finalizers, subresources, RBAC or
//!   `managedFields`. Server-side apply is a create-or-merge-patch that ignores field ownership
//!   (`force` is accepted and ignored); strategic merge and JSON patches answer 415.
//! - Lists ignore `limit`/`continue` and always return everything in one page at the latest
//!   version. Label selectors support `k`, `!k`, `k=v`, `k==v`, `k!=v`; field selectors match any
//!   dotted path (e.g. `metadata.name=x`), not only the few a real server allows.
//! - Watches filtered by a selector only see events whose object matches: no synthetic
//!   `DELETED` when an object stops matching. Bookmarks are only sent to mark the end of
//!   initial events (`sendInitialEvents=true`), never periodically.
//! - `metadata.generation` starts at 1 and is bumped when anything outside `metadata` and
//!   `status` changes, for every resource (a real server does not set it on Leases).
//! - A write that changes nothing is a no-op, as on a real server: no new `resourceVersion`,
//!   no watch event.
//! - The watch history is bounded ([`HISTORY_LIMIT`] events). Watching from an older version
//!   answers, like a real server, `200` with a single `ERROR` event carrying a `410 Expired`
//!   Status — which is what makes `kube::runtime::watcher` re-list.
//!
//! # Observation and fault injection
//!
//! Tests get a [`FakeKube`] (which derefs to a cloneable [`Handle`]) to inspect objects and the
//! writes received on Sessions ([`RecordedRequest`]), to change Sessions as a user would, to
//! make Session patches fail, to simulate an outage, and to wait for any of that without
//! sleeping. The same controls are served over HTTP under `/_fake/` for multi-process tests.
//!
//! Layout: `store` (objects, versions, event history, selectors), `routes` (the HTTP API and
//! the `/_fake` control API), `handle` (server lifecycle and the test-facing handle).

mod handle;
mod routes;
mod store;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use handle::{kubeconfig_yaml, FakeKube, Handle, RecordedRequest, Verb, DEFAULT_NAMESPACE};
pub use store::HISTORY_LIMIT;

/// Errors from starting, driving or observing the fake.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener could not be bound.
    #[error("bind fake-kube on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The server task ended with an I/O error or panicked.
    #[error("serve fake-kube: {0}")]
    Serve(String),
    /// The kubeconfig file could not be written.
    #[error("write kubeconfig to {path}")]
    WriteKubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `kube` refused the generated configuration.
    #[error("build kube client")]
    KubeClient(#[source] kube::Error),
    /// An object handed to the [`Handle`] was rejected the way the API would reject it.
    #[error("rejected with {code}: {message}")]
    Rejected { code: u16, message: String },
    /// A `wait_for_*` condition did not hold in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        waited: Duration,
        what: &'static str,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

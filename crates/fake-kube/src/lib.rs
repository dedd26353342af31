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
//! inject faults, and to wait for any of that without sleeping. The same controls are served
//! over HTTP under `/_fake/` for multi-process tests.
//!
//! Faults on requests are [`FaultRule`]s ([`Handle::add_fault`]): a [`Target`] (resource,
//! operations, namespace, name), a [`Trigger`] (the next `n` matching requests, every one, or
//! each with a probability drawn from a seeded generator, reproducible run to run) and a
//! [`Fault`]:
//! - [`Fault::Error`]: not applied, answered with a status (500, 409, 429, ...);
//! - [`Fault::AppliedButError`]: applied (watchers see it), answered 500 or 504 all the same;
//! - [`Fault::Slow`]: answered after a delay, applied before it ([`ApplyAt::BeforeDelay`]) or
//!   after it ([`ApplyAt::AfterDelay`]), in which case it lands even if the client gave up;
//! - [`Fault::Hang`]: not applied, never answered, until the client gives up or
//!   [`Handle::release_hung_requests`] (504).
//!
//! Faults on what watchers see: [`Handle::recreate_session`] (delete and create again under the
//! same name: new uid, generation 1, `DELETED` then `ADDED`), [`Handle::set_dropping_watch_events`]
//! (a gap: events withheld from every watch, by version, while lists stay true),
//! [`Handle::end_watches`] (clean end; the client resumes and misses nothing),
//! [`Handle::expire_watches`] (`410 Expired` and compaction: the client must re-list) and
//! [`Handle::compact_history`]. Plus [`Handle::set_unavailable`] for an outage.
//!
//! Every fault injected is logged with its time ([`Handle::injected_faults`],
//! [`Handle::wait_for_injected`], `GET /_fake/injected`): which rule hit which request, and
//! every other injection above.
//!
//! The control API: `POST /_fake/faults` (a [`FaultRule`] as JSON, answers `{"id"}`),
//! `DELETE /_fake/faults` (all) and `/_fake/faults/{id}`, `GET /_fake/injected`,
//! `POST /_fake/release-hung`, `POST /_fake/watch-gap` (`{"dropping": bool}`),
//! `POST /_fake/end-watches`, `POST /_fake/expire-watches`, `POST /_fake/compact`,
//! `POST /_fake/unavailable` (`{"unavailable": bool}`), `POST /_fake/fail-session-patches`
//! (`{"count", "status"}`), `GET|DELETE /_fake/requests`, `POST /_fake/sessions/{ns}`
//! (create or merge), `GET|DELETE /_fake/sessions/{ns}/{name}` and
//! `POST /_fake/sessions/{ns}/{name}/recreate` (optional body: changes to merge).
//!
//! What the faults do not model: a fault hits one request as a whole (no half-written bodies,
//! no resets mid-stream other than ending a watch), delays use the real clock (not
//! `tokio::time::pause`), and probabilities are reproducible only for requests arriving in the
//! same order.
//!
//! Layout: `store` (objects, versions, event history, selectors), `faults` (rules and the
//! log), `routes` (the HTTP API and the `/_fake` control API), `handle` (server lifecycle and
//! the test-facing handle).

mod faults;
mod handle;
mod routes;
mod store;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use faults::{
    ApplyAt, Fault, FaultId, FaultRule, FaultedRequest, InjectedFault, Injection, Operation,
    ResourceKind, Target, Trigger,
};
pub use handle::{kubeconfig_yaml, FakeKube, Handle, RecordedRequest, Verb, DEFAULT_NAMESPACE};
pub use store::{SessionChange, HISTORY_LIMIT};

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

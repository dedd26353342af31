//! The server's lifecycle ([`FakeKube`]) and what tests use to observe and steer it ([`Handle`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    routes,
    store::{metadata_mut, Selector, StatusError, Store, LEASES, SESSIONS},
    Error, Result,
};

/// Namespace of the clients and kubeconfigs this crate builds.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kind of write received on a Session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// `POST` on the collection.
    Create,
    /// `PUT` on an item.
    Replace,
    /// `PATCH` on an item.
    Patch,
    /// `DELETE` on an item.
    Delete,
}

/// A write received on the Sessions API, as the server saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    pub received_at: DateTime<Utc>,
    pub namespace: String,
    /// From the URL, or for a create from the body's `metadata.name`.
    pub name: Option<String>,
    pub verb: Verb,
    pub content_type: Option<String>,
    pub field_manager: Option<String>,
    /// The body as JSON; a body that does not parse is kept as a JSON string, an empty one as null.
    pub body: Value,
    /// The status the fake answered with, including injected failures and outages.
    pub status: u16,
}

/// State shared by the routes and every [`Handle`].
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Pending injected failures for Session patches: (remaining, status code).
    patch_failures: Mutex<(usize, u16)>,
    unavailable: AtomicBool,
    /// Bumped after every store change (and outage) so watches and waiters re-check.
    store_changed: watch::Sender<u64>,
    requests_changed: watch::Sender<usize>,
    closing: CancellationToken,
}

/// A cheap, cloneable handle on a running fake: inspect and change objects, read recorded
/// requests, inject failures, and wait for conditions.
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not take every later assertion down with it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Handle {
    fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Mutex::default(),
                requests: Mutex::default(),
                patch_failures: Mutex::default(),
                unavailable: AtomicBool::new(false),
                store_changed: watch::Sender::new(0),
                requests_changed: watch::Sender::new(0),
                closing: CancellationToken::new(),
            }),
        }
    }

    /// Every write received on Sessions so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The PATCH requests received for Sessions named `name`, in any namespace.
    pub fn session_patches(&self, name: &str) -> Vec<RecordedRequest> {
        let requests = lock(&self.shared.requests);
        requests
            .iter()
            .filter(|r| r.verb == Verb::Patch && r.name.as_deref() == Some(name))
            .cloned()
            .collect()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Creates the Session or merges `object` into it (RFC 7386), as a user or another
    /// controller would, emitting watch events. Any `resourceVersion` in `object` is ignored.
    pub fn apply_session(&self, namespace: &str, mut object: Value) -> Result<Value> {
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| rejected(&StatusError::new(422, "metadata.name is required")))?;
        metadata_mut(&mut object)
            .map_err(|e| rejected(&e))?
            .remove("resourceVersion");
        self.write(|s| s.apply(&SESSIONS, namespace, &name, &object))
            .map(|(obj, _)| obj)
            .map_err(|e| rejected(&e))
    }

    /// Deletes the Session, emitting a watch event; returns it, or `None` if it did not exist.
    pub fn delete_session(&self, namespace: &str, name: &str) -> Option<Value> {
        self.write(|s| s.delete(&SESSIONS, namespace, name, None))
            .ok()
    }

    /// The stored Session, if any.
    pub fn session(&self, namespace: &str, name: &str) -> Option<Value> {
        self.read(|s| s.get(&SESSIONS, namespace, name)).ok()
    }

    /// All Sessions in `namespace`, ordered by name.
    pub fn sessions(&self, namespace: &str) -> Vec<Value> {
        self.read(|s| s.list(&SESSIONS, Some(namespace), &Selector::default()))
    }

    /// The stored Lease, if any.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.read(|s| s.get(&LEASES, namespace, name)).ok()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.read(Store::resource_version)
    }

    /// Makes the next `count` Session PATCHes fail with `status` (a Kubernetes Status body
    /// with the matching reason) without touching the object. Replaces any pending failures.
    pub fn fail_session_patches(&self, count: usize, status: u16) {
        *lock(&self.shared.patch_failures) = (count, status);
    }

    /// While `true`, every API request (not `/_fake`) answers 503 and open watches end,
    /// as during an API server outage.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        // Wake open watches so they notice.
        self.shared.store_changed.send_modify(|_| {});
    }

    /// Drops the watch history: watching from any version seen so far answers 410 Expired.
    pub fn compact_history(&self) {
        self.write(Store::compact);
    }

    /// Waits until `ready` holds for the recorded requests and returns them.
    pub async fn wait_for_requests(
        &self,
        ready: impl Fn(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>> {
        let changes = self.shared.requests_changed.subscribe();
        wait_until(changes, timeout, "recorded requests", || {
            let requests = self.requests();
            ready(&requests).then_some(requests)
        })
        .await
    }

    /// Waits until `ready` holds for the Session (`None` while it does not exist) and returns it.
    pub async fn wait_for_session(
        &self,
        namespace: &str,
        name: &str,
        ready: impl Fn(Option<&Value>) -> bool,
        timeout: Duration,
    ) -> Result<Option<Value>> {
        let changes = self.shared.store_changed.subscribe();
        wait_until(changes, timeout, "session", || {
            let session = self.session(namespace, name);
            ready(session.as_ref()).then_some(session)
        })
        .await
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&lock(&self.shared.store))
    }

    /// Runs a store mutation, then wakes watches and waiters.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let (out, rv) = {
            let mut store = lock(&self.shared.store);
            let out = f(&mut store);
            (out, store.resource_version())
        };
        self.shared.store_changed.send_replace(rv);
        out
    }

    pub(crate) fn store_changes(&self) -> watch::Receiver<u64> {
        self.shared.store_changed.subscribe()
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        lock(&self.shared.requests).push(request);
        self.shared.requests_changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn is_unavailable(&self) -> bool {
        self.shared.unavailable.load(Ordering::SeqCst)
    }

    /// Consumes one injected patch failure, if any is pending.
    pub(crate) fn take_patch_failure(&self) -> Option<u16> {
        let mut failures = lock(&self.shared.patch_failures);
        let (remaining, status) = &mut *failures;
        if *remaining == 0 {
            return None;
        }
        *remaining -= 1;
        Some(*status)
    }

    /// Cancelled on shutdown, so that open watches end and graceful shutdown can finish.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.shared.closing
    }
}

fn rejected(e: &StatusError) -> Error {
    Error::Rejected {
        code: e.code,
        message: e.message.clone(),
    }
}

async fn wait_until<T, V>(
    mut changes: watch::Receiver<V>,
    timeout: Duration,
    what: &'static str,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Mark seen before checking, so a change racing with the check still wakes us.
        changes.borrow_and_update();
        if let Some(found) = check() {
            return Ok(found);
        }
        if !matches!(
            tokio::time::timeout_at(deadline, changes.changed()).await,
            Ok(Ok(()))
        ) {
            return Err(Error::Timeout {
                waited: timeout,
                what,
            });
        }
    }
}

/// A running fake API server. Derefs to its [`Handle`]; shuts down when dropped.
#[derive(Debug)]
pub struct FakeKube {
    addr: SocketAddr,
    handle: Handle,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl FakeKube {
    /// Starts the fake on an ephemeral port of 127.0.0.1.
    pub async fn start() -> Result<Self> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts the fake on `addr` (port 0 picks a free one; see [`FakeKube::addr`]).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let bind_error = |source| Error::Bind { addr, source };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let handle = Handle::new();
        let app = routes::router(handle.clone());
        let closing = handle.closing().clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(closing.cancelled_owned())
                .await
        });
        Ok(Self {
            addr,
            handle,
            server: Some(server),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A cloneable handle that outlives borrows of `self`, e.g. to move into a task.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// A `kube` configuration pointing at the fake, with namespace [`DEFAULT_NAMESPACE`].
    /// It keeps kube's default retries on 429/503/504; set `default_retry = false` to see them.
    pub fn kube_config(&self) -> kube::Config {
        // The URL is built from a SocketAddr, so it always parses.
        let url = self
            .url()
            .parse()
            .expect("a socket address is a valid URI authority");
        let mut config = kube::Config::new(url);
        config.default_namespace = DEFAULT_NAMESPACE.to_owned();
        config
    }

    /// A `kube::Client` for [`FakeKube::kube_config`].
    pub fn kube_client(&self) -> Result<kube::Client> {
        kube::Client::try_from(self.kube_config()).map_err(Error::KubeClient)
    }

    /// Writes a kubeconfig for the plain-http URL, for processes that read `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, kubeconfig_yaml(&self.url(), DEFAULT_NAMESPACE)).map_err(|source| {
            Error::WriteKubeconfig {
                path: path.to_owned(),
                source,
            }
        })
    }

    /// Stops accepting requests, ends open watches and waits for the server to finish.
    pub async fn shutdown(mut self) -> Result<()> {
        self.handle.closing().cancel();
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        match server.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Serve(e.to_string())),
            Err(e) => Err(Error::Serve(e.to_string())),
        }
    }
}

impl Deref for FakeKube {
    type Target = Handle;

    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        // Cannot await here; the server task finishes on its own once connections close.
        self.handle.closing().cancel();
    }
}

/// A kubeconfig with one cluster at `url` (plain http, no credentials) and `namespace`.
pub fn kubeconfig_yaml(url: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake-kube
  cluster:
    server: {url}
users:
- name: fake-kube
  user: {{}}
contexts:
- name: fake-kube
  context:
    cluster: fake-kube
    user: fake-kube
    namespace: {namespace}
current-context: fake-kube
"
    )
}

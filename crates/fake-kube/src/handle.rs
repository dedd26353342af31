//! The server's lifecycle ([`FakeKube`]) and what tests use to observe and steer it ([`Handle`]).

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
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
    faults::{
        Fault, FaultId, FaultRule, FaultedRequest, InjectedFault, Injection, Operation, Rules,
        Target,
    },
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
    /// The status the fake answered with, including injected failures and outages; 0 if it
    /// sent no answer (the request hung, or the client gave up first and the server dropped
    /// it; a [`crate::ApplyAt::AfterDelay`] write still lands then).
    pub status: u16,
}

/// Sent to open watches to end them; see [`Handle::end_watches`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WatchCut {
    /// Bumped for every cut; a watch ends on a cut newer than the one it started after.
    pub seq: u64,
    /// End with a `410 Expired` ERROR event rather than a clean end of stream.
    pub expired: bool,
}

/// State shared by the routes and every [`Handle`].
#[derive(Debug)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<RecordedRequest>>,
    rules: Mutex<Rules>,
    /// The rule [`Handle::fail_session_patches`] added last, which its next call replaces.
    patch_failure_rule: Mutex<Option<FaultId>>,
    injected: Mutex<Vec<InjectedFault>>,
    injected_changed: watch::Sender<usize>,
    unavailable: AtomicBool,
    /// Versions after which watch events are withheld: (after, until), `until` open while
    /// the gap lasts.
    watch_gaps: Mutex<Vec<(u64, Option<u64>)>>,
    watch_cut: watch::Sender<WatchCut>,
    /// Requests hanging on a [`Fault::Hang`], and the signal that releases them.
    hung: AtomicUsize,
    release_hung: watch::Sender<u64>,
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
                rules: Mutex::default(),
                patch_failure_rule: Mutex::default(),
                injected: Mutex::default(),
                injected_changed: watch::Sender::new(0),
                unavailable: AtomicBool::new(false),
                watch_gaps: Mutex::default(),
                watch_cut: watch::Sender::new(WatchCut::default()),
                hung: AtomicUsize::new(0),
                release_hung: watch::Sender::new(0),
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

    /// Every change of a Session (created, modified, deleted) since the start, oldest first,
    /// with the time it was applied; unlike the watch history it is never compacted.
    pub fn session_changes(&self) -> Vec<crate::SessionChange> {
        self.read(|s| s.session_changes().to_vec())
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.read(Store::resource_version)
    }

    /// Makes the next `count` Session PATCHes fail with `status` (a Kubernetes Status body
    /// with the matching reason) without touching the object. Replaces any pending failures
    /// set by this method; a shorthand for a [`FaultRule`] with [`Fault::Error`].
    pub fn fail_session_patches(&self, count: usize, status: u16) {
        let rule = FaultRule::next(
            count,
            Target::sessions(&[Operation::Patch]),
            Fault::Error { status },
        );
        let mut previous = lock(&self.shared.patch_failure_rule);
        let mut rules = lock(&self.shared.rules);
        if let Some(id) = previous.take() {
            rules.remove(id);
        }
        *previous = Some(rules.add(rule));
    }

    /// Adds a fault rule; rules are tried in the order they were added and the first that
    /// fires decides. Refused (422) for a status outside 400-599 or a probability outside 0-1.
    pub fn add_fault(&self, rule: FaultRule) -> Result<FaultId> {
        rule.validate().map_err(|e| rejected(&e))?;
        Ok(lock(&self.shared.rules).add(rule))
    }

    /// Removes a rule; false if it was not there.
    pub fn remove_fault(&self, id: FaultId) -> bool {
        lock(&self.shared.rules).remove(id)
    }

    /// Removes every rule (those of [`Handle::fail_session_patches`] too). Requests already
    /// hanging or slowed keep their fault; see [`Handle::release_hung_requests`].
    pub fn clear_faults(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Every fault injected so far, oldest first.
    pub fn injected_faults(&self) -> Vec<InjectedFault> {
        lock(&self.shared.injected).clone()
    }

    /// Waits until `ready` holds for the injected faults and returns them.
    pub async fn wait_for_injected(
        &self,
        ready: impl Fn(&[InjectedFault]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<InjectedFault>> {
        let changes = self.shared.injected_changed.subscribe();
        wait_until(changes, timeout, "injected faults", || {
            let injected = self.injected_faults();
            ready(&injected).then_some(injected)
        })
        .await
    }

    /// Requests hanging on a [`Fault::Hang`] right now.
    pub fn hung_requests(&self) -> usize {
        self.shared.hung.load(Ordering::SeqCst)
    }

    /// Answers every request hanging right now with 504 (still not applied); returns how
    /// many there were. Requests that start hanging later are not affected.
    pub fn release_hung_requests(&self) -> usize {
        let count = self.hung_requests();
        self.shared.release_hung.send_modify(|n| *n += 1);
        self.log(Injection::HungReleased { count });
        count
    }

    /// While `true`, watch events are withheld from every watch, open or opened later, as if
    /// the watch had silently missed them: a watcher's cache goes stale until it re-lists
    /// (lists and the initial events of a new watch still show the current state). Which
    /// events are withheld depends only on their version, not on timing: those after the
    /// version current when the gap began, up to the one current when it ended.
    pub fn set_dropping_watch_events(&self, dropping: bool) {
        let rv = self.resource_version();
        {
            let mut gaps = lock(&self.shared.watch_gaps);
            let open = matches!(gaps.last(), Some((_, None)));
            match (open, dropping) {
                (false, true) => gaps.push((rv, None)),
                (true, false) => {
                    if let Some(gap) = gaps.last_mut() {
                        gap.1 = Some(rv);
                    }
                }
                // Already in the asked state: nothing changes, nothing is logged.
                _ => return,
            }
        }
        self.log(Injection::WatchGap {
            dropping,
            resource_version: rv,
        });
    }

    /// Ends every open watch cleanly, as a server does when a watch times out; a client
    /// watches again from the last version it saw and misses nothing. Returns how many ended.
    pub fn end_watches(&self) -> usize {
        self.cut_watches(false)
    }

    /// Ends every open watch with a `410 Expired` ERROR event and compacts the history, so
    /// watching again from any version seen so far is also 410: the client must re-list.
    /// Returns how many watches were open.
    pub fn expire_watches(&self) -> usize {
        self.compact_history();
        self.cut_watches(true)
    }

    fn cut_watches(&self, expired: bool) -> usize {
        let count = self.shared.watch_cut.receiver_count();
        self.shared.watch_cut.send_modify(|cut| {
            cut.seq += 1;
            cut.expired = expired;
        });
        self.log(Injection::WatchesEnded { count, expired });
        count
    }

    /// Deletes the Session and creates it again under the same name, atomically: a new
    /// `metadata.uid` and `creationTimestamp`, `metadata.generation` back at 1, and watchers
    /// see `DELETED` then `ADDED`. The new Session is the old one with `changes` merged in
    /// (RFC 7386), e.g. `{"spec": {"state": "running"}}`. Returns the new Session.
    pub fn recreate_session(
        &self,
        namespace: &str,
        name: &str,
        changes: Option<Value>,
    ) -> Result<Value> {
        let (old, new) = self
            .write(|s| s.recreate(&SESSIONS, namespace, name, changes.as_ref()))
            .map_err(|e| rejected(&e))?;
        let uid = |o: &Value| o["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        self.log(Injection::Recreated {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            old_uid: uid(&old),
            new_uid: uid(&new),
        });
        Ok(new)
    }

    /// While `true`, every API request (not `/_fake`) answers 503 and open watches end,
    /// as during an API server outage.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        self.log(Injection::Outage { unavailable });
        // Wake open watches so they notice.
        self.shared.store_changed.send_modify(|_| {});
    }

    /// Drops the watch history: watching from any version seen so far answers 410 Expired.
    pub fn compact_history(&self) {
        let resource_version = self.write(|s| {
            s.compact();
            s.resource_version()
        });
        self.log(Injection::HistoryCompacted { resource_version });
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

    /// The fault for `request`, if a rule fires; logged here, as it is decided. A request
    /// to hang gets its [`Hanging`] before the log entry is written, so a test that saw the
    /// entry and then calls [`Handle::release_hung_requests`] releases it.
    pub(crate) fn pick_fault(&self, request: FaultedRequest) -> Option<(Fault, Option<Hanging>)> {
        let (rule, fault) = lock(&self.shared.rules).pick(&request)?;
        let hanging = (fault == Fault::Hang).then(|| Hanging::new(self.clone()));
        self.log(Injection::Request {
            rule,
            fault,
            request,
        });
        Some((fault, hanging))
    }

    pub(crate) fn log(&self, injection: Injection) {
        lock(&self.shared.injected).push(InjectedFault {
            at: Utc::now(),
            injection,
        });
        self.shared.injected_changed.send_modify(|n| *n += 1);
    }

    /// Whether the event at `resource_version` falls in a watch gap.
    pub(crate) fn in_watch_gap(&self, resource_version: u64) -> bool {
        lock(&self.shared.watch_gaps).iter().any(|(after, until)| {
            resource_version > *after && until.is_none_or(|u| resource_version <= u)
        })
    }

    /// For a new watch: changes after this call end it.
    pub(crate) fn watch_cuts(&self) -> watch::Receiver<WatchCut> {
        self.shared.watch_cut.subscribe()
    }

    /// Cancelled on shutdown, so that open watches end and graceful shutdown can finish.
    pub(crate) fn closing(&self) -> &CancellationToken {
        &self.shared.closing
    }
}

/// A request held by a [`Fault::Hang`]; counted in [`Handle::hung_requests`] while it lives
/// (it is dropped when answered, or when the client gives up and the server drops the request).
#[derive(Debug)]
pub(crate) struct Hanging {
    handle: Handle,
    release: watch::Receiver<u64>,
}

impl Hanging {
    fn new(handle: Handle) -> Self {
        let mut release = handle.shared.release_hung.subscribe();
        release.borrow_and_update();
        handle.shared.hung.fetch_add(1, Ordering::SeqCst);
        Self { handle, release }
    }

    /// Waits for [`Handle::release_hung_requests`] or shutdown.
    pub(crate) async fn wait(mut self) {
        let closing = self.handle.shared.closing.clone();
        tokio::select! {
            _ = self.release.changed() => {}
            () = closing.cancelled() => {}
        }
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.handle.shared.hung.fetch_sub(1, Ordering::SeqCst);
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

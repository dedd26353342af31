//! HTTP: the Kubernetes API subset, and the `/_fake` control API for out-of-process tests.

use std::{collections::HashMap, collections::VecDeque, convert::Infallible, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{FromRequestParts, Path, Query, Request, State},
    http::{header, HeaderMap, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{self, get, post},
    Json, Router,
};
use chrono::Utc;
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    faults::{
        ApplyAt, Fault, FaultId, FaultRule, FaultedRequest, Injection, Operation, ResourceKind,
    },
    handle::{Handle, Hanging, RecordedRequest, Verb, WatchCut},
    store::{Event, Resource, Selector, StatusError, RESOURCES},
    Error,
};

const MERGE_PATCH: &str = "application/merge-patch+json";
const APPLY_PATCH: &str = "application/apply-patch+yaml";
const MAX_BODY: usize = 16 * 1024 * 1024;
/// What a real server picks at most when the client gives no `timeoutSeconds`.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) fn router(handle: Handle) -> Router {
    let namespaced = "/apis/{group}/{version}/namespaces/{namespace}/{plural}";
    let api = Router::new()
        .route("/version", get(version))
        .route("/api", get(core_versions))
        .route("/apis", get(groups))
        .route("/apis/{group}/{version}", get(resources))
        .route("/apis/{group}/{version}/{plural}", get(list_or_watch))
        .route(namespaced, get(list_or_watch).post(create))
        .route(
            &format!("{namespaced}/{{name}}"),
            get(get_item).put(replace).patch(patch).delete(delete),
        )
        .route_layer(middleware::from_fn_with_state(handle.clone(), intercept));
    let control = Router::new()
        .route("/_fake/requests", get(requests).delete(clear_requests))
        .route("/_fake/unavailable", post(set_unavailable))
        .route("/_fake/fail-session-patches", post(fail_session_patches))
        .route("/_fake/compact", post(compact))
        .route("/_fake/faults", post(add_fault).delete(clear_faults))
        .route("/_fake/faults/{id}", routing::delete(remove_fault))
        .route("/_fake/injected", get(injected))
        .route("/_fake/release-hung", post(release_hung))
        .route("/_fake/watch-gap", post(watch_gap))
        .route("/_fake/end-watches", post(end_watches))
        .route("/_fake/expire-watches", post(expire_watches))
        .route("/_fake/sessions/{namespace}", post(apply_session))
        .route(
            "/_fake/sessions/{namespace}/{name}",
            get(session).delete(delete_session),
        )
        .route(
            "/_fake/sessions/{namespace}/{name}/recreate",
            post(recreate_session),
        );
    api.merge(control)
        .fallback(|| async {
            StatusError::new(404, "the server could not find the requested resource")
        })
        .with_state(handle)
}

impl IntoResponse for StatusError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, Json(self.to_status())).into_response()
    }
}

type ApiResult = Result<Response, StatusError>;

fn object(code: StatusCode, obj: Value) -> ApiResult {
    Ok((code, Json(obj)).into_response())
}

/// Outages, injected faults and request recording, in front of every API route.
async fn intercept(State(handle): State<Handle>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let params = Path::<HashMap<String, String>>::from_request_parts(&mut parts, &())
        .await
        .map(|Path(p)| p)
        .unwrap_or_default();
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let verb = match parts.method {
        Method::POST => Some(Verb::Create),
        Method::PUT => Some(Verb::Replace),
        Method::PATCH => Some(Verb::Patch),
        Method::DELETE => Some(Verb::Delete),
        _ => None,
    };
    let param = |k: &str| params.get(k).map(String::as_str);
    let resource = match (param("group"), param("version"), param("plural")) {
        (Some(g), Some(v), Some(p)) => {
            Resource::find(g, v, p).and_then(|r| ResourceKind::of_plural(r.plural))
        }
        _ => None,
    };
    let namespace = params.get("namespace").cloned();
    let Some(resource) = resource else {
        // Discovery (and unknown resources, which answer 404): outages only.
        if handle.is_unavailable() {
            return unavailable().into_response();
        }
        return next.run(Request::from_parts(parts, body)).await;
    };

    // Writes are buffered: a create's name is in its body, and Session writes are recorded
    // with their body whatever the outcome.
    let (body, parsed, content_type) = match verb {
        Some(_) => {
            let Ok(bytes) = axum::body::to_bytes(body, MAX_BODY).await else {
                return StatusError::new(413, "request body too large").into_response();
            };
            let content_type = content_type(&parts.headers);
            let parsed = if bytes.is_empty() {
                Value::Null
            } else {
                parse_body(content_type.as_deref(), &bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            };
            (Body::from(bytes), parsed, content_type)
        }
        None => (body, Value::Null, None),
    };
    let name = params.get("name").cloned().or_else(|| {
        parsed
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let operation = match verb {
        Some(Verb::Create) => Operation::Create,
        Some(Verb::Replace) => Operation::Replace,
        Some(Verb::Patch) => Operation::Patch,
        Some(Verb::Delete) => Operation::Delete,
        None if params.contains_key("name") => Operation::Get,
        None if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) => {
            Operation::Watch
        }
        None => Operation::List,
    };
    let recording = match (verb, &namespace, resource) {
        (Some(verb), Some(namespace), ResourceKind::Sessions) => Some(Recording {
            handle: handle.clone(),
            request: Some(RecordedRequest {
                received_at: Utc::now(),
                namespace: namespace.clone(),
                name: name.clone(),
                verb,
                content_type,
                field_manager: query.get("fieldManager").cloned(),
                body: parsed,
                status: 0,
            }),
        }),
        _ => None,
    };

    let request = Request::from_parts(parts, body);
    let response = if handle.is_unavailable() {
        unavailable().into_response()
    } else {
        let fault = handle.pick_fault(FaultedRequest {
            resource,
            operation,
            namespace,
            name,
        });
        faulted(&handle, fault, request, next).await
    };
    if let Some(recording) = recording {
        recording.finish(response.status().as_u16());
    }
    response
}

/// Runs `request` under the fault picked for it, if any.
async fn faulted(
    handle: &Handle,
    picked: Option<(Fault, Option<Hanging>)>,
    request: Request,
    next: Next,
) -> Response {
    let (fault, hanging) = match picked {
        Some((fault, hanging)) => (Some(fault), hanging),
        None => (None, None),
    };
    match fault {
        None => next.run(request).await,
        Some(Fault::Error { status }) => {
            StatusError::new(status, "injected failure").into_response()
        }
        Some(Fault::AppliedButError { status }) => {
            let _applied = next.run(request).await;
            StatusError::new(status, "injected failure after the request was applied")
                .into_response()
        }
        Some(Fault::Slow {
            delay,
            apply: ApplyAt::BeforeDelay,
        }) => {
            let response = next.run(request).await;
            pause(handle, delay).await;
            response
        }
        Some(Fault::Slow {
            delay,
            apply: ApplyAt::AfterDelay,
        }) => {
            // A task of its own: the write lands after the delay even if the client gave up
            // and the server dropped this request meanwhile, as on a loaded API server.
            let h = handle.clone();
            let write = tokio::spawn(async move {
                if pause(&h, delay).await {
                    next.run(request).await
                } else {
                    StatusError::new(503, "fake-kube is shutting down").into_response()
                }
            });
            write
                .await
                .unwrap_or_else(|e| StatusError::new(500, e.to_string()).into_response())
        }
        Some(Fault::Hang) => {
            if let Some(hanging) = hanging {
                hanging.wait().await;
            }
            StatusError::new(504, "injected hang released; the request was not applied")
                .into_response()
        }
    }
}

/// Waits `delay`, or less if the fake shuts down (then answers false).
async fn pause(handle: &Handle, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = handle.closing().cancelled() => false,
    }
}

/// A Session write being served: recorded with the status answered, or with 0 if no answer
/// was sent (it hung, or the client gave up and the server dropped it).
struct Recording {
    handle: Handle,
    request: Option<RecordedRequest>,
}

impl Recording {
    fn finish(mut self, status: u16) {
        if let Some(mut request) = self.request.take() {
            request.status = status;
            self.handle.record(request);
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            self.handle.record(request);
        }
    }
}

fn unavailable() -> StatusError {
    StatusError::new(503, "fake-kube is set unavailable")
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
    )
}

fn parse_body(content_type: Option<&str>, bytes: &[u8]) -> Result<Value, StatusError> {
    let parsed = if content_type == Some(APPLY_PATCH) {
        // JSON is YAML, and kube sends apply patches as JSON.
        serde_yaml::from_slice(bytes).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| StatusError::bad_request(format!("cannot parse the request body: {e}")))
}

#[derive(Debug, Deserialize)]
struct Collection {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
}

#[derive(Debug, Deserialize)]
struct Item {
    group: String,
    version: String,
    namespace: String,
    plural: String,
    name: String,
}

fn resource(group: &str, version: &str, plural: &str) -> Result<&'static Resource, StatusError> {
    Resource::find(group, version, plural)
        .ok_or_else(|| StatusError::new(404, "the server could not find the requested resource"))
}

impl Item {
    fn resource(&self) -> Result<&'static Resource, StatusError> {
        resource(&self.group, &self.version, &self.plural)
    }
}

type Params = Query<HashMap<String, String>>;

async fn get_item(State(h): State<Handle>, Path(item): Path<Item>) -> ApiResult {
    let res = item.resource()?;
    object(
        StatusCode::OK,
        h.read(|s| s.get(res, &item.namespace, &item.name))?,
    )
}

async fn create(
    State(h): State<Handle>,
    Path(c): Path<Collection>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let res = resource(&c.group, &c.version, &c.plural)?;
    let ns = c.namespace.unwrap_or_default();
    let obj = parse_body(content_type(&headers).as_deref(), &body)?;
    object(StatusCode::CREATED, h.write(|s| s.create(res, &ns, obj))?)
}

async fn replace(
    State(h): State<Handle>,
    Path(item): Path<Item>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let res = item.resource()?;
    let obj = parse_body(content_type(&headers).as_deref(), &body)?;
    object(
        StatusCode::OK,
        h.write(|s| s.replace(res, &item.namespace, &item.name, obj))?,
    )
}

async fn patch(
    State(h): State<Handle>,
    Path(item): Path<Item>,
    Query(params): Params,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let res = item.resource()?;
    let (ns, name) = (item.namespace.as_str(), item.name.as_str());
    match content_type(&headers).as_deref() {
        Some(MERGE_PATCH) => {
            let patch = parse_body(Some(MERGE_PATCH), &body)?;
            object(
                StatusCode::OK,
                h.write(|s| s.merge_patch(res, ns, name, &patch))?,
            )
        }
        Some(APPLY_PATCH) => {
            if params.get("fieldManager").is_none_or(String::is_empty) {
                return Err(StatusError::new(
                    422,
                    "fieldManager: Required value: is required for apply patch",
                ));
            }
            let patch = parse_body(Some(APPLY_PATCH), &body)?;
            let (obj, created) = h.write(|s| s.apply(res, ns, name, &patch))?;
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            object(code, obj)
        }
        other => Err(StatusError::new(
            415,
            format!(
                "fake-kube supports only {MERGE_PATCH} and {APPLY_PATCH} patches, not {}",
                other.unwrap_or("a missing content type")
            ),
        )),
    }
}

async fn delete(State(h): State<Handle>, Path(item): Path<Item>, body: Bytes) -> ApiResult {
    let res = item.resource()?;
    // DeleteOptions are optional; only their resourceVersion precondition is honoured.
    let options = if body.is_empty() {
        Value::Null
    } else {
        parse_body(None, &body)?
    };
    let precondition = options
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str);
    object(
        StatusCode::OK,
        h.write(|s| s.delete(res, &item.namespace, &item.name, precondition))?,
    )
}

async fn list_or_watch(
    State(h): State<Handle>,
    Path(c): Path<Collection>,
    Query(params): Params,
) -> ApiResult {
    let res = resource(&c.group, &c.version, &c.plural)?;
    let selector = Selector::parse(
        params.get("labelSelector").map(String::as_str),
        params.get("fieldSelector").map(String::as_str),
    )?;
    let ns = c.namespace.as_deref();
    if matches!(params.get("watch").map(String::as_str), Some("true" | "1")) {
        return watch(h, res, c.namespace, selector, &params);
    }
    let (items, rv) = h.read(|s| (s.list(res, ns, &selector), s.resource_version()));
    object(
        StatusCode::OK,
        json!({
            "apiVersion": res.api_version(),
            "kind": format!("{}List", res.kind),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    )
}

fn watch(
    h: Handle,
    res: &'static Resource,
    namespace: Option<String>,
    selector: Selector,
    params: &HashMap<String, String>,
) -> ApiResult {
    let flag = |name: &str| matches!(params.get(name).map(String::as_str), Some("true" | "1"));
    let timeout =
        match params.get("timeoutSeconds") {
            Some(secs) => Duration::from_secs(secs.parse().map_err(|_| {
                StatusError::bad_request(format!("invalid timeoutSeconds {secs:?}"))
            })?),
            None => DEFAULT_WATCH_TIMEOUT,
        };
    let requested = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| StatusError::bad_request(format!("invalid resourceVersion {rv:?}")))?,
        ),
    };
    let send_initial = flag("sendInitialEvents");

    let mut pending = VecDeque::new();
    let after = match requested {
        Some(rv) if !send_initial => rv,
        // No version (or an explicit request for initial events) means: the current state as
        // synthetic ADDED events, then changes.
        _ => h.read(|s| {
            for obj in s.list(res, namespace.as_deref(), &selector) {
                pending.push_back(json!({"type": "ADDED", "object": obj}));
            }
            let rv = s.resource_version();
            if send_initial {
                pending.push_back(json!({
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": res.api_version(),
                        "kind": res.kind,
                        "metadata": {
                            "resourceVersion": rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }));
            }
            rv
        }),
    };
    let mut cuts = h.watch_cuts();
    cuts.borrow_and_update();
    let cursor = WatchCursor {
        changes: h.store_changes(),
        cuts,
        closing: h.closing().clone(),
        handle: h,
        resource: res,
        namespace,
        selector,
        after,
        pending,
        deadline: tokio::time::Instant::now() + timeout,
        finished: false,
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(cursor.into_stream()))
        .map_err(|e| StatusError::new(500, e.to_string()))
}

/// The state of one open watch: what is queued to send and where to continue from.
struct WatchCursor {
    handle: Handle,
    changes: watch::Receiver<u64>,
    /// [`Handle::end_watches`] and [`Handle::expire_watches`].
    cuts: watch::Receiver<WatchCut>,
    closing: CancellationToken,
    resource: &'static Resource,
    namespace: Option<String>,
    selector: Selector,
    after: u64,
    pending: VecDeque<Value>,
    deadline: tokio::time::Instant,
    /// Set after an ERROR event: the stream ends once it is sent.
    finished: bool,
}

impl WatchCursor {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures::stream::unfold(self, |mut c| async move {
            loop {
                if let Some(event) = c.pending.pop_front() {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok(Bytes::from(line)), c));
                }
                if c.finished || c.handle.is_unavailable() {
                    return None;
                }
                c.changes.borrow_and_update();
                c.poll_history();
                if !c.pending.is_empty() || c.finished {
                    continue;
                }
                tokio::select! {
                    changed = c.changes.changed() => if changed.is_err() { return None },
                    cut = c.cuts.changed() => {
                        if cut.is_err() || !c.cuts.borrow_and_update().expired {
                            return None;
                        }
                        let oldest = c.handle.resource_version() + 1;
                        let expired = StatusError::expired(c.after, oldest);
                        c.pending
                            .push_back(json!({"type": "ERROR", "object": expired.to_status()}));
                        c.finished = true;
                    }
                    () = tokio::time::sleep_until(c.deadline) => return None,
                    () = c.closing.cancelled() => return None,
                }
            }
        })
    }

    fn poll_history(&mut self) {
        let events = self
            .handle
            .read(|s| s.events_after(self.resource, self.namespace.as_deref(), self.after));
        match events {
            Ok(events) => {
                for Event {
                    resource_version,
                    kind,
                    plural,
                    namespace,
                    object,
                } in events
                {
                    self.after = resource_version;
                    if !self.selector.matches(&object) {
                        continue;
                    }
                    if self.handle.in_watch_gap(resource_version) {
                        let name = object.pointer("/metadata/name").and_then(Value::as_str);
                        if let Some(resource) = ResourceKind::of_plural(plural) {
                            self.handle.log(Injection::WatchEventDropped {
                                resource,
                                namespace,
                                name: name.unwrap_or_default().to_owned(),
                                event_type: kind.as_str().to_owned(),
                                resource_version,
                            });
                        }
                        continue;
                    }
                    self.pending
                        .push_back(json!({"type": kind.as_str(), "object": object}));
                }
            }
            Err(expired) => {
                self.pending
                    .push_back(json!({"type": "ERROR", "object": expired.to_status()}));
                self.finished = true;
            }
        }
    }
}

async fn version() -> Json<Value> {
    Json(json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake-kube",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "",
        "compiler": "",
        "platform": "linux/amd64",
    }))
}

async fn core_versions() -> Json<Value> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}))
}

async fn groups() -> Json<Value> {
    let groups: Vec<Value> = RESOURCES
        .iter()
        .map(|r| {
            let version = json!({"groupVersion": r.api_version(), "version": r.version});
            json!({"name": r.group, "versions": [version], "preferredVersion": version})
        })
        .collect();
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

async fn resources(Path((group, version)): Path<(String, String)>) -> ApiResult {
    let found: Vec<Value> = RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| {
            json!({
                "name": r.plural,
                "singularName": r.kind.to_lowercase(),
                "namespaced": true,
                "kind": r.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            })
        })
        .collect();
    if found.is_empty() {
        return Err(StatusError::new(
            404,
            "the server could not find the requested resource",
        ));
    }
    object(
        StatusCode::OK,
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": format!("{group}/{version}"),
            "resources": found,
        }),
    )
}

// The control API: thin wrappers over the Handle, for tests in another process.

async fn requests(State(h): State<Handle>) -> Json<Vec<RecordedRequest>> {
    Json(h.requests())
}

async fn clear_requests(State(h): State<Handle>) -> StatusCode {
    h.clear_requests();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct Unavailable {
    unavailable: bool,
}

async fn set_unavailable(State(h): State<Handle>, Json(body): Json<Unavailable>) -> StatusCode {
    h.set_unavailable(body.unavailable);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct PatchFailures {
    count: usize,
    status: u16,
}

async fn fail_session_patches(
    State(h): State<Handle>,
    Json(body): Json<PatchFailures>,
) -> StatusCode {
    h.fail_session_patches(body.count, body.status);
    StatusCode::NO_CONTENT
}

async fn compact(State(h): State<Handle>) -> StatusCode {
    h.compact_history();
    StatusCode::NO_CONTENT
}

async fn add_fault(State(h): State<Handle>, Json(rule): Json<FaultRule>) -> ApiResult {
    match h.add_fault(rule) {
        Ok(id) => object(StatusCode::OK, json!({"id": id})),
        Err(e) => Err(control_error(e)),
    }
}

async fn clear_faults(State(h): State<Handle>) -> StatusCode {
    h.clear_faults();
    StatusCode::NO_CONTENT
}

async fn remove_fault(State(h): State<Handle>, Path(id): Path<u64>) -> ApiResult {
    if h.remove_fault(FaultId(id)) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(StatusError::new(404, format!("no fault rule {id}")))
    }
}

async fn injected(State(h): State<Handle>) -> Json<Vec<crate::InjectedFault>> {
    Json(h.injected_faults())
}

async fn release_hung(State(h): State<Handle>) -> Json<Value> {
    Json(json!({"released": h.release_hung_requests()}))
}

#[derive(Debug, Deserialize)]
struct WatchGap {
    dropping: bool,
}

async fn watch_gap(State(h): State<Handle>, Json(body): Json<WatchGap>) -> StatusCode {
    h.set_dropping_watch_events(body.dropping);
    StatusCode::NO_CONTENT
}

async fn end_watches(State(h): State<Handle>) -> Json<Value> {
    Json(json!({"ended": h.end_watches()}))
}

async fn expire_watches(State(h): State<Handle>) -> Json<Value> {
    Json(json!({"ended": h.expire_watches()}))
}

async fn recreate_session(
    State(h): State<Handle>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let changes = if body.is_empty() {
        None
    } else {
        Some(parse_body(None, &body)?)
    };
    match h.recreate_session(&namespace, &name, changes) {
        Ok(obj) => object(StatusCode::OK, obj),
        Err(e) => Err(control_error(e)),
    }
}

fn control_error(e: Error) -> StatusError {
    match e {
        Error::Rejected { code, message } => StatusError::new(code, message),
        e => StatusError::new(500, e.to_string()),
    }
}

async fn apply_session(
    State(h): State<Handle>,
    Path(namespace): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult {
    match h.apply_session(&namespace, body) {
        Ok(obj) => object(StatusCode::OK, obj),
        Err(e) => Err(control_error(e)),
    }
}

async fn session(
    State(h): State<Handle>,
    Path((namespace, name)): Path<(String, String)>,
) -> ApiResult {
    match h.session(&namespace, &name) {
        Some(obj) => object(StatusCode::OK, obj),
        None => Err(StatusError::new(
            404,
            format!("session {namespace}/{name} not found"),
        )),
    }
}

async fn delete_session(
    State(h): State<Handle>,
    Path((namespace, name)): Path<(String, String)>,
) -> ApiResult {
    match h.delete_session(&namespace, &name) {
        Some(obj) => object(StatusCode::OK, obj),
        None => Err(StatusError::new(
            404,
            format!("session {namespace}/{name} not found"),
        )),
    }
}

//! Objects, resource versions and the event history, with the API server's write rules.
//!
//! Everything here is synchronous and runs under one lock held by the handle, so a write and
//! the watch event it produces are atomic, and versions are totally ordered as on etcd.

use std::collections::{BTreeMap, VecDeque};

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Map, Value};

/// How many watch events are kept; watching from before them answers `410 Expired`.
pub const HISTORY_LIMIT: usize = 1000;

/// A resource type the fake serves.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
}

pub(crate) const SESSIONS: Resource = Resource {
    group: "stream.space",
    version: "v1alpha1",
    plural: "sessions",
    kind: "Session",
};

pub(crate) const LEASES: Resource = Resource {
    group: "coordination.k8s.io",
    version: "v1",
    plural: "leases",
    kind: "Lease",
};

pub(crate) const RESOURCES: [&Resource; 2] = [&SESSIONS, &LEASES];

impl Resource {
    pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        RESOURCES
            .into_iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    pub fn api_version(&self) -> String {
        format!("{}/{}", self.group, self.version)
    }

    /// The name the real server uses in error messages, e.g. `sessions.stream.space`.
    fn qualified(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }
}

/// An error the API answers with; rendered as a Kubernetes `Status` by the routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StatusError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl StatusError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            405 => "MethodNotAllowed",
            409 => "Conflict",
            410 => "Gone",
            413 => "RequestEntityTooLarge",
            415 => "UnsupportedMediaType",
            422 => "Invalid",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "Unknown",
        };
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn not_found(res: &Resource, name: &str) -> Self {
        Self::new(404, format!("{} \"{name}\" not found", res.qualified()))
    }

    fn already_exists(res: &Resource, name: &str) -> Self {
        Self {
            reason: "AlreadyExists",
            ..Self::new(
                409,
                format!("{} \"{name}\" already exists", res.qualified()),
            )
        }
    }

    fn conflict(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                res.qualified()
            ),
        )
    }

    /// What a real server says, inside a watch, when the requested version was compacted away.
    pub(crate) fn expired(requested: u64, oldest: u64) -> Self {
        Self {
            reason: "Expired",
            ..Self::new(
                410,
                format!("too old resource version: {requested} ({oldest})"),
            )
        }
    }

    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

type StoreResult<T> = Result<T, StatusError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub resource_version: u64,
    pub kind: EventType,
    pub plural: &'static str,
    pub namespace: String,
    pub object: Value,
}

/// (plural, namespace, name); a `BTreeMap` so lists come out in a stable order.
type Key = (&'static str, String, String);

#[derive(Debug, Default)]
pub(crate) struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Event>,
    /// Version of the newest event dropped from `history`; watches must start at or after it.
    compacted: u64,
    /// Every Session change ever made, never compacted: what a test checks the real outcome
    /// of ambiguous writes (applied but answered 5xx, landing after the client gave up) by.
    session_changes: Vec<SessionChange>,
}

/// One change of a stored Session, as [`crate::Handle::session_changes`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionChange {
    pub at: chrono::DateTime<chrono::Utc>,
    pub resource_version: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub event_type: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.state` after the change, if the object has one.
    pub state: Option<String>,
}

impl Store {
    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    pub fn session_changes(&self) -> &[SessionChange] {
        &self.session_changes
    }

    pub fn get(&self, res: &'static Resource, ns: &str, name: &str) -> StoreResult<Value> {
        self.objects
            .get(&key(res, ns, name))
            .cloned()
            .ok_or_else(|| StatusError::not_found(res, name))
    }

    pub fn list(&self, res: &'static Resource, ns: Option<&str>, sel: &Selector) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((plural, o_ns, _), obj)| {
                *plural == res.plural && ns.is_none_or(|ns| ns == o_ns) && sel.matches(obj)
            })
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    pub fn create(
        &mut self,
        res: &'static Resource,
        ns: &str,
        mut obj: Value,
    ) -> StoreResult<Value> {
        let meta = metadata_mut(&mut obj)?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_owned(),
            _ => {
                return Err(StatusError::new(
                    422,
                    "metadata.name: Required value: name is required",
                ))
            }
        };
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_some_and(|n| n != ns)
        {
            return Err(StatusError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let key = key(res, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(StatusError::already_exists(res, &name));
        }
        self.resource_version += 1;
        let rv = self.resource_version;
        meta.insert("namespace".into(), ns.into());
        meta.insert("uid".into(), uuid::Uuid::new_v4().to_string().into());
        meta.insert(
            "creationTimestamp".into(),
            Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true).into(),
        );
        meta.insert("generation".into(), 1.into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        set_type(res, &mut obj)?;
        self.objects.insert(key, obj.clone());
        self.push_event(EventType::Added, res, ns, obj.clone());
        Ok(obj)
    }

    /// PUT: an empty `resourceVersion` is an unconditional update, otherwise it must match.
    pub fn replace(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> StoreResult<Value> {
        let meta = metadata_mut(&mut obj)?;
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|n| n != name)
        {
            return Err(StatusError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        self.check_version(res, ns, name, &obj)?;
        self.update(res, ns, name, obj)
    }

    /// RFC 7386 merge patch; a `metadata.resourceVersion` in the patch is a precondition.
    pub fn merge_patch(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> StoreResult<Value> {
        let mut obj = self.get(res, ns, name)?;
        self.check_version(res, ns, name, patch)?;
        merge(&mut obj, patch);
        self.update(res, ns, name, obj)
    }

    /// Server-side apply, reduced to create-or-merge; returns whether it created the object.
    pub fn apply(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> StoreResult<(Value, bool)> {
        if self.objects.contains_key(&key(res, ns, name)) {
            return Ok((self.merge_patch(res, ns, name, patch)?, false));
        }
        let mut obj = patch.clone();
        let meta = metadata_mut(&mut obj)?;
        meta.remove("resourceVersion");
        meta.insert("name".into(), name.into());
        Ok((self.create(res, ns, obj)?, true))
    }

    pub fn delete(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        precondition: Option<&str>,
    ) -> StoreResult<Value> {
        let key = key(res, ns, name);
        let Some(mut obj) = self.objects.get(&key).cloned() else {
            return Err(StatusError::not_found(res, name));
        };
        if precondition.is_some_and(|rv| Some(rv) != resource_version(&obj)) {
            return Err(StatusError::conflict(res, name));
        }
        self.objects.remove(&key);
        // A real server reports the deletion at a new version, which watchers resume from.
        self.resource_version += 1;
        metadata_mut(&mut obj)?.insert(
            "resourceVersion".into(),
            self.resource_version.to_string().into(),
        );
        self.push_event(EventType::Deleted, res, ns, obj.clone());
        Ok(obj)
    }

    /// Deletes the object and creates it again under the same name, as someone deleting and
    /// re-applying it would: a new `uid` and `creationTimestamp`, `generation` back at 1,
    /// and a `DELETED` then an `ADDED` event. The new object is the old one without its
    /// server-set metadata, with `changes` merged in (RFC 7386). Returns (old, new).
    pub fn recreate(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        changes: Option<&Value>,
    ) -> StoreResult<(Value, Value)> {
        let mut fresh = self.get(res, ns, name)?;
        let meta = metadata_mut(&mut fresh)?;
        for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
            meta.remove(field);
        }
        if let Some(changes) = changes {
            merge(&mut fresh, changes);
        }
        // The name is the point of a re-creation; a change cannot move it elsewhere.
        let meta = metadata_mut(&mut fresh)?;
        meta.insert("name".into(), name.into());
        meta.insert("namespace".into(), ns.into());
        let old = self.delete(res, ns, name, None)?;
        let new = self.create(res, ns, fresh)?;
        Ok((old, new))
    }

    /// Events for `res` (in `ns`, or all namespaces) newer than `after`, oldest first.
    pub fn events_after(
        &self,
        res: &'static Resource,
        ns: Option<&str>,
        after: u64,
    ) -> StoreResult<Vec<Event>> {
        if after < self.compacted {
            return Err(StatusError::expired(after, self.compacted + 1));
        }
        Ok(self
            .history
            .iter()
            .filter(|e| {
                e.resource_version > after
                    && e.plural == res.plural
                    && ns.is_none_or(|ns| ns == e.namespace)
            })
            .cloned()
            .collect())
    }

    /// Forget all watch history, as etcd compaction would.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.resource_version;
    }

    fn check_version(
        &self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        incoming: &Value,
    ) -> StoreResult<()> {
        let stored = self.get(res, ns, name)?;
        match resource_version(incoming) {
            Some(rv) if !rv.is_empty() && Some(rv) != resource_version(&stored) => {
                Err(StatusError::conflict(res, name))
            }
            _ => Ok(()),
        }
    }

    /// Stores `new` over the existing object, keeping fields only the server may set.
    fn update(
        &mut self,
        res: &'static Resource,
        ns: &str,
        name: &str,
        mut new: Value,
    ) -> StoreResult<Value> {
        let key = key(res, ns, name);
        let Some(old) = self.objects.get(&key) else {
            return Err(StatusError::not_found(res, name));
        };
        let old_meta = old
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let meta = metadata_mut(&mut new)?;
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        set_type(res, &mut new)?;
        if new == *old {
            return Ok(new);
        }
        if without_metadata_and_status(old) != without_metadata_and_status(&new) {
            let generation = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut new)?.insert("generation".into(), (generation + 1).into());
        }
        self.resource_version += 1;
        metadata_mut(&mut new)?.insert(
            "resourceVersion".into(),
            self.resource_version.to_string().into(),
        );
        self.objects.insert(key, new.clone());
        self.push_event(EventType::Modified, res, ns, new.clone());
        Ok(new)
    }

    fn push_event(&mut self, kind: EventType, res: &'static Resource, ns: &str, object: Value) {
        if res.plural == SESSIONS.plural {
            let text = |p: &str| object.pointer(p).and_then(Value::as_str).map(str::to_owned);
            self.session_changes.push(SessionChange {
                at: chrono::Utc::now(),
                resource_version: self.resource_version,
                event_type: kind.as_str().to_owned(),
                namespace: ns.to_owned(),
                name: text("/metadata/name").unwrap_or_default(),
                uid: text("/metadata/uid").unwrap_or_default(),
                state: text("/spec/state"),
            });
        }
        if self.history.len() == HISTORY_LIMIT {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.resource_version;
            }
        }
        self.history.push_back(Event {
            resource_version: self.resource_version,
            kind,
            plural: res.plural,
            namespace: ns.to_owned(),
            object,
        });
    }
}

fn key(res: &'static Resource, ns: &str, name: &str) -> Key {
    (res.plural, ns.to_owned(), name.to_owned())
}

pub(crate) fn resource_version(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
}

/// The object's metadata map, created if absent; non-objects are a client error, not a panic.
pub(crate) fn metadata_mut(obj: &mut Value) -> StoreResult<&mut Map<String, Value>> {
    let root = obj
        .as_object_mut()
        .ok_or_else(|| StatusError::bad_request("the object must be a JSON object"))?;
    root.entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| StatusError::bad_request("metadata must be an object"))
}

fn set_type(res: &Resource, obj: &mut Value) -> StoreResult<()> {
    let root = obj
        .as_object_mut()
        .ok_or_else(|| StatusError::bad_request("the object must be a JSON object"))?;
    root.insert("apiVersion".into(), res.api_version().into());
    root.insert("kind".into(), res.kind.into());
    Ok(())
}

fn without_metadata_and_status(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(root) = obj.as_object_mut() {
        root.remove("metadata");
        root.remove("status");
    }
    obj
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge(target.entry(k.as_str()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Label and field selectors of a list or watch, reduced to what the fake understands.
#[derive(Debug, Default)]
pub(crate) struct Selector {
    terms: Vec<(Subject, Op)>,
}

#[derive(Debug)]
enum Subject {
    Label(String),
    /// A JSON pointer built from a dotted field path.
    Field(String),
}

#[derive(Debug)]
enum Op {
    Eq(String),
    NotEq(String),
    Exists,
    NotExists,
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> StoreResult<Self> {
        let mut terms = Vec::new();
        for term in split_terms(labels) {
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                return Err(StatusError::bad_request(format!(
                    "fake-kube does not support set-based label selectors: {term:?}"
                )));
            }
            let (key, op) = parse_term(term);
            terms.push((Subject::Label(key.to_owned()), op));
        }
        for term in split_terms(fields) {
            let (path, op) = parse_term(term);
            if matches!(op, Op::Exists | Op::NotExists) {
                return Err(StatusError::bad_request(format!(
                    "invalid field selector: {term:?}"
                )));
            }
            terms.push((Subject::Field(format!("/{}", path.replace('.', "/"))), op));
        }
        Ok(Self { terms })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.terms.iter().all(|(subject, op)| {
            let value = match subject {
                Subject::Label(key) => obj
                    .pointer("/metadata/labels")
                    .and_then(|labels| labels.get(key)),
                Subject::Field(pointer) => obj.pointer(pointer),
            }
            .and_then(Value::as_str);
            match op {
                Op::Eq(v) => value == Some(v.as_str()),
                // Like the real server, a missing field or label is "not equal".
                Op::NotEq(v) => value != Some(v.as_str()),
                Op::Exists => value.is_some(),
                Op::NotExists => value.is_none(),
            }
        })
    }
}

fn split_terms(selector: Option<&str>) -> impl Iterator<Item = &str> {
    selector
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn parse_term(term: &str) -> (&str, Op) {
    if let Some((k, v)) = term.split_once("!=") {
        (k.trim(), Op::NotEq(v.trim().to_owned()))
    } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (k.trim(), Op::Eq(v.trim().to_owned()))
    } else if let Some(k) = term.strip_prefix('!') {
        (k.trim(), Op::NotExists)
    } else {
        (term, Op::Exists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "spec": {"state": "running"}})
    }

    #[test]
    fn merge_follows_rfc7386() {
        let mut target = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut target, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(target, json!({"a": "z", "c": {"d": "e"}}));
        merge(&mut target, &json!(["x"]));
        assert_eq!(target, json!(["x"]));
    }

    #[test]
    fn writes_bump_versions_and_generation_only_when_needed() {
        let mut store = Store::default();
        let created = store.create(&SESSIONS, "ns", session("s")).expect("create");
        assert_eq!(resource_version(&created), Some("1"));
        assert_eq!(created["metadata"]["generation"], 1);

        let labelled = store
            .merge_patch(
                &SESSIONS,
                "ns",
                "s",
                &json!({"metadata": {"labels": {"b": "c"}}}),
            )
            .expect("patch labels");
        assert_eq!(resource_version(&labelled), Some("2"));
        assert_eq!(labelled["metadata"]["generation"], 1);

        let spec = json!({"spec": {"state": "hibernated"}});
        let hibernated = store
            .merge_patch(&SESSIONS, "ns", "s", &spec)
            .expect("patch spec");
        assert_eq!(hibernated["metadata"]["generation"], 2);
        let again = store
            .merge_patch(&SESSIONS, "ns", "s", &spec)
            .expect("no-op");
        assert_eq!(resource_version(&again), Some("3"));
        assert_eq!(
            store
                .events_after(&SESSIONS, None, 0)
                .expect("events")
                .len(),
            3
        );
    }

    #[test]
    fn stale_versions_conflict() {
        let mut store = Store::default();
        store.create(&LEASES, "ns", session("l")).expect("create");
        store
            .merge_patch(&LEASES, "ns", "l", &json!({"spec": {"x": 1}}))
            .expect("patch");
        let stale = json!({"metadata": {"name": "l", "resourceVersion": "1"}});
        assert_eq!(
            store
                .replace(&LEASES, "ns", "l", stale.clone())
                .map_err(|e| e.code),
            Err(409)
        );
        assert_eq!(
            store
                .merge_patch(&LEASES, "ns", "l", &stale)
                .map_err(|e| e.code),
            Err(409)
        );
        assert_eq!(
            store
                .delete(&LEASES, "ns", "l", Some("1"))
                .map_err(|e| e.code),
            Err(409)
        );
        let again = store
            .create(&LEASES, "ns", session("l"))
            .map_err(|e| e.reason);
        assert_eq!(again, Err("AlreadyExists"));
    }

    #[test]
    fn recreation_is_a_new_object_under_the_old_name() {
        let mut store = Store::default();
        let first = store.create(&SESSIONS, "ns", session("a")).expect("create");
        store
            .merge_patch(&SESSIONS, "ns", "a", &json!({"spec": {"state": "x"}}))
            .expect("patch");
        let (old, new) = store
            .recreate(
                &SESSIONS,
                "ns",
                "a",
                Some(&json!({"spec": {"state": "running"}})),
            )
            .expect("recreate");
        assert_eq!(old["metadata"]["generation"], 2);
        assert_eq!(new["metadata"]["generation"], 1);
        assert_ne!(new["metadata"]["uid"], first["metadata"]["uid"]);
        assert_eq!(new["metadata"]["labels"]["app"], "x");
        assert_eq!(new["spec"]["state"], "running");
        let kinds: Vec<_> = store
            .events_after(&SESSIONS, None, 2)
            .expect("events")
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, [EventType::Deleted, EventType::Added]);
        assert_eq!(
            store
                .recreate(&SESSIONS, "ns", "nope", None)
                .map_err(|e| e.code),
            Err(404)
        );
    }

    #[test]
    fn compaction_expires_old_watches() {
        let mut store = Store::default();
        store.create(&SESSIONS, "ns", session("a")).expect("create");
        store.compact();
        store.delete(&SESSIONS, "ns", "a", None).expect("delete");
        let expired = store.events_after(&SESSIONS, None, 0).err();
        assert_eq!(expired.map(|e| (e.code, e.reason)), Some((410, "Expired")));
        let events = store
            .events_after(&SESSIONS, Some("ns"), 1)
            .expect("events");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventType::Deleted);
        assert_eq!(resource_version(&events[0].object), Some("2"));
    }

    #[test]
    fn selectors() {
        let obj = json!({"metadata": {"name": "a", "labels": {"app": "x"}}});
        let sel = |l, f| Selector::parse(l, f).expect("selector");
        assert!(sel(Some("app=x"), Some("metadata.name=a")).matches(&obj));
        assert!(sel(Some("app,!team"), None).matches(&obj));
        assert!(!sel(Some("app!=x"), None).matches(&obj));
        assert!(!sel(None, Some("metadata.name==b")).matches(&obj));
        assert!(Selector::parse(Some("app in (x)"), None).is_err());
    }
}

//! Parses and checks `deploy/rendered/*.yaml` and `deploy/crds/*.yaml`.
//!
//! Every object is deserialized into its `k8s-openapi` type and serialized
//! back: a field that does not survive the round trip is unknown to the type
//! (misspelt or misplaced), which Kubernetes would silently drop.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;

const RELEASE_NAMESPACE: &str = "streamspace";
const DEFAULT_RENDER: &str = "tracker.yaml";
const MONITORING_RENDER: &str = "tracker-monitoring.yaml";

/// The settings of docs/configuration.md, by the binary that reads each
/// variable.
const API_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_DATABASE_URL",
    "TRACKER_LISTEN",
    "TRACKER_METRICS_LISTEN",
    "TRACKER_JWT_SECRET",
    "TRACKER_AUTH",
    "TRACKER_HEARTBEAT_INTERVAL",
    "TRACKER_HEARTBEAT_WINDOW",
    "TRACKER_MAX_CONNECTIONS_PER_SESSION",
    "TRACKER_MAX_CONNECTIONS_PER_USER",
    "TRACKER_MAX_WEBSOCKETS_PER_USER",
    "TRACKER_JWT_ISSUER",
    "TRACKER_JWT_AUDIENCE",
    "TRACKER_JWT_LEEWAY",
    "TRACKER_JWT_PUBLIC_KEY_FILE",
    "TRACKER_TRUSTED_PROXIES",
    "TRACKER_HEADER_TIMEOUT",
    "TRACKER_KEEPALIVE_TIMEOUT",
    "TRACKER_REQUEST_TIMEOUT",
    "TRACKER_MAX_OPEN_CONNECTIONS",
    "RUST_LOG",
    "TRACKER_LOG_FORMAT",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_REDIS_TIMEOUT",
    "TRACKER_SHUTDOWN_TIMEOUT",
];
const REAPER_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_DATABASE_URL",
    "TRACKER_METRICS_LISTEN",
    "TRACKER_HEARTBEAT_WINDOW",
    "TRACKER_SWEEP_INTERVAL",
    "TRACKER_DEFAULT_IDLE_TIMEOUT",
    "TRACKER_PLATFORM",
    "TRACKER_DRY_RUN",
    "TRACKER_SKIP_MIGRATIONS",
    "TRACKER_ELECTION",
    "TRACKER_NAMESPACE",
    "TRACKER_LEASE_NAME",
    "TRACKER_LEASE_DURATION",
    "KUBECONFIG",
    "RUST_LOG",
    "TRACKER_LOG_FORMAT",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_REDIS_TIMEOUT",
    "TRACKER_SHUTDOWN_TIMEOUT",
    "POD_NAME",
];
/// Read by libraries (tracing-subscriber, kube), not named in our sources.
const LIBRARY_ENV: &[&str] = &["RUST_LOG", "KUBECONFIG"];

/// Where each plain environment variable's value comes from in `values.yaml`.
const ENV_FROM_VALUES: &[(&str, &str)] = &[
    ("TRACKER_REDIS_URL", "redis.url"),
    ("TRACKER_REDIS_MODE", "redis.mode"),
    ("TRACKER_KEY_PREFIX", "redis.keyPrefix"),
    ("TRACKER_REDIS_SHARDS", "redis.shards"),
    ("TRACKER_REDIS_TIMEOUT", "redis.timeout"),
    ("TRACKER_HEARTBEAT_WINDOW", "heartbeat.window"),
    ("TRACKER_HEARTBEAT_INTERVAL", "heartbeat.interval"),
    ("RUST_LOG", "logging.level"),
    ("TRACKER_LOG_FORMAT", "logging.format"),
    ("TRACKER_AUTH", "api.auth"),
    (
        "TRACKER_MAX_CONNECTIONS_PER_SESSION",
        "api.maxConnectionsPerSession",
    ),
    (
        "TRACKER_MAX_CONNECTIONS_PER_USER",
        "api.maxConnectionsPerUser",
    ),
    (
        "TRACKER_MAX_WEBSOCKETS_PER_USER",
        "api.maxWebsocketsPerUser",
    ),
    ("TRACKER_JWT_ISSUER", "api.jwt.issuer"),
    ("TRACKER_JWT_AUDIENCE", "api.jwt.audience"),
    ("TRACKER_JWT_LEEWAY", "api.jwt.leeway"),
    ("TRACKER_TRUSTED_PROXIES", "api.trustedProxies"),
    ("TRACKER_HEADER_TIMEOUT", "api.headerTimeout"),
    ("TRACKER_KEEPALIVE_TIMEOUT", "api.keepaliveTimeout"),
    ("TRACKER_REQUEST_TIMEOUT", "api.requestTimeout"),
    ("TRACKER_MAX_OPEN_CONNECTIONS", "api.maxOpenConnections"),
    ("TRACKER_SHUTDOWN_TIMEOUT", "api.shutdownTimeout"),
    ("TRACKER_SWEEP_INTERVAL", "reaper.sweepInterval"),
    ("TRACKER_DEFAULT_IDLE_TIMEOUT", "reaper.defaultIdleTimeout"),
    ("TRACKER_PLATFORM", "reaper.platform"),
    ("TRACKER_DRY_RUN", "reaper.dryRun"),
    ("TRACKER_SKIP_MIGRATIONS", "reaper.skipMigrations"),
    ("TRACKER_ELECTION", "reaper.election"),
    ("TRACKER_LEASE_NAME", "reaper.lease.name"),
    ("TRACKER_LEASE_DURATION", "reaper.lease.duration"),
];

/// Settings that are part of the shared data layout or semantics: the API
/// and the reaper must get the same value.
const SHARED_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_HEARTBEAT_WINDOW",
];

/// Dashboard metrics no crate exports yet. The test fails once one of them
/// is exported, so that this list only ever names real gaps.
const NOT_YET_EXPORTED: &[&str] = &["tracker_reaper_live_connections"];

// ---------------------------------------------------------------------------
// Loading

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One YAML document of a manifest file.
#[derive(Debug, Clone)]
struct Doc {
    file: String,
    /// The `# Source: tracker/templates/x.yaml` comment Helm puts above it.
    source: Option<String>,
    value: Json,
}

impl Doc {
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }

    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn is<T: Resource>(&self) -> bool {
        self.api_version() == T::API_VERSION && self.kind() == T::KIND
    }

    fn what(&self) -> String {
        format!("{}: {} {}", self.file, self.kind(), self.name())
    }

    /// Deserializes into `T` and fails on any field `T` does not keep.
    fn typed<T: Resource + DeserializeOwned + Serialize>(&self) -> T {
        let typed: T = serde_json::from_value(self.value.clone())
            .unwrap_or_else(|e| panic!("{} does not parse as {}: {e}", self.what(), T::KIND));
        let back = serde_json::to_value(&typed).expect("k8s-openapi types serialize");
        if let Some(path) = first_difference(&self.value, &back, "") {
            panic!(
                "{}: `{path}` is not a field of {} {} (misspelt or misplaced?)",
                self.what(),
                T::API_VERSION,
                T::KIND
            );
        }
        typed
    }
}

/// The first path at which `a` and `b` differ, if any.
fn first_difference(a: &Json, b: &Json, path: &str) -> Option<String> {
    match (a, b) {
        (Json::Object(a), Json::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => return Some(p),
                    Some(vb) => {
                        if let Some(d) = first_difference(va, vb, &p) {
                            return Some(d);
                        }
                    }
                }
            }
            b.keys()
                .find(|k| !a.contains_key(*k))
                .map(|k| format!("{path}.{k} (added)"))
        }
        (Json::Array(a), Json::Array(b)) => {
            if a.len() != b.len() {
                return Some(format!("{path}[] (length)"));
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (va, vb))| first_difference(va, vb, &format!("{path}[{i}]")))
        }
        (Json::Number(a), Json::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ if a == b => None,
        _ => Some(path.to_owned()),
    }
}

/// The documents of one manifest file; comment-only documents are skipped.
fn documents(path: &Path) -> Vec<Doc> {
    let text = read(path);
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut chunks = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            chunks.push(String::new());
        } else if let Some(last) = chunks.last_mut() {
            last.push_str(line);
            last.push('\n');
        }
    }
    chunks
        .into_iter()
        .filter_map(|chunk| {
            let yaml: serde_yaml::Value = serde_yaml::from_str(&chunk)
                .unwrap_or_else(|e| panic!("{file}: invalid YAML: {e}\n{chunk}"));
            if yaml.is_null() {
                return None;
            }
            let value = serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{file}: not representable as JSON: {e}"));
            let source = chunk
                .lines()
                .find_map(|l| l.strip_prefix("# Source: "))
                .map(str::to_owned);
            Some(Doc {
                file: file.clone(),
                source,
                value,
            })
        })
        .collect()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

fn rendered_file(name: &str) -> Vec<Doc> {
    documents(&repo().join("deploy/rendered").join(name))
}

/// The default render: what `helm install` with default values creates.
fn default_render() -> Vec<Doc> {
    rendered_file(DEFAULT_RENDER)
}

fn all_of<T: Resource + DeserializeOwned + Serialize>(docs: &[Doc]) -> Vec<T> {
    docs.iter()
        .filter(|d| d.is::<T>())
        .map(Doc::typed)
        .collect()
}

fn one_of<T: Resource + DeserializeOwned + Serialize>(docs: &[Doc]) -> T {
    let mut all = all_of::<T>(docs);
    assert_eq!(all.len(), 1, "expected exactly one {}", T::KIND);
    all.remove(0)
}

fn values() -> serde_yaml::Value {
    serde_yaml::from_str(&read(&repo().join("deploy/helm/tracker/values.yaml")))
        .expect("values.yaml parses")
}

/// `values.yaml` at a dotted path, as the string Helm's `quote` would print.
fn value_at(values: &serde_yaml::Value, path: &str) -> String {
    let mut v = values;
    for key in path.split('.') {
        v = v
            .get(key)
            .unwrap_or_else(|| panic!("values.yaml has no {path}"));
    }
    match v {
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Number(n) => n.to_string(),
        other => panic!("values.yaml {path} is not a scalar: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The two workloads

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Api,
    Reaper,
}

impl Binary {
    fn name(self) -> &'static str {
        match self {
            Binary::Api => "tracker-api",
            Binary::Reaper => "tracker-reaper",
        }
    }

    fn allowed_env(self) -> &'static [&'static str] {
        match self {
            Binary::Api => API_ENV,
            Binary::Reaper => REAPER_ENV,
        }
    }
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .template
        .spec
        .as_ref()
        .expect("a Deployment has a pod spec")
}

fn binary_of(c: &Container) -> Option<Binary> {
    let cmd = c.command.as_ref()?.first()?;
    if cmd.ends_with("/tracker-api") {
        Some(Binary::Api)
    } else if cmd.ends_with("/tracker-reaper") {
        Some(Binary::Reaper)
    } else {
        None
    }
}

/// The Deployment whose container runs `binary`, and that container.
fn workload(docs: &[Doc], binary: Binary) -> (Deployment, Container) {
    let found: Vec<(Deployment, Container)> = all_of::<Deployment>(docs)
        .into_iter()
        .filter_map(|d| {
            let c = pod_spec(&d)
                .containers
                .iter()
                .find(|c| binary_of(c) == Some(binary))?
                .clone();
            Some((d, c))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one Deployment running {}",
        binary.name()
    );
    found.into_iter().next().expect("one")
}

fn env(c: &Container) -> &[EnvVar] {
    c.env.as_deref().unwrap_or_default()
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c)
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn env_var<'a>(c: &'a Container, name: &str) -> &'a EnvVar {
    env(c)
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("container {} sets no {name}", c.name))
}

fn named_port(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("container {} has no port named {name}", c.name))
                .container_port
        }
    }
}

fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "only matchLabels selectors are expected"
    );
    selector
        .match_labels
        .as_ref()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?} is not a duration: {e}"))
}

/// Every `.rs` file under `dir`, concatenated.
fn sources(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push_str(&read(&path));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Every object has its type

#[test]
fn every_object_parses_into_its_k8s_openapi_type() {
    let dirs = [repo().join("deploy/rendered"), repo().join("deploy/crds")];
    let mut kinds = BTreeSet::new();
    for dir in &dirs {
        for file in yaml_files(dir) {
            let docs = documents(&file);
            assert!(!docs.is_empty(), "{} holds no object", file.display());
            for doc in &docs {
                if doc.is::<Deployment>() {
                    doc.typed::<Deployment>();
                } else if doc.is::<Service>() {
                    doc.typed::<Service>();
                } else if doc.is::<ServiceAccount>() {
                    doc.typed::<ServiceAccount>();
                } else if doc.is::<Secret>() {
                    doc.typed::<Secret>();
                } else if doc.is::<ConfigMap>() {
                    doc.typed::<ConfigMap>();
                } else if doc.is::<Role>() {
                    doc.typed::<Role>();
                } else if doc.is::<RoleBinding>() {
                    doc.typed::<RoleBinding>();
                } else if doc.is::<ClusterRole>() {
                    doc.typed::<ClusterRole>();
                } else if doc.is::<ClusterRoleBinding>() {
                    doc.typed::<ClusterRoleBinding>();
                } else if doc.is::<HorizontalPodAutoscaler>() {
                    doc.typed::<HorizontalPodAutoscaler>();
                } else if doc.is::<PodDisruptionBudget>() {
                    doc.typed::<PodDisruptionBudget>();
                } else if doc.is::<NetworkPolicy>() {
                    doc.typed::<NetworkPolicy>();
                } else if doc.is::<CustomResourceDefinition>() {
                    doc.typed::<CustomResourceDefinition>();
                } else if doc.api_version() == "monitoring.coreos.com/v1"
                    && doc.kind() == "ServiceMonitor"
                {
                    // No k8s-openapi type: checked by hand in its own test.
                } else {
                    panic!(
                        "{}: no k8s-openapi type mapped for {} {}; add it to this test",
                        doc.what(),
                        doc.api_version(),
                        doc.kind()
                    );
                }
                assert!(!doc.name().is_empty(), "{} has no name", doc.what());
                kinds.insert(doc.kind().to_owned());
            }
        }
    }
    for kind in [
        "Deployment",
        "Service",
        "ServiceAccount",
        "Secret",
        "Role",
        "RoleBinding",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "CustomResourceDefinition",
        "ServiceMonitor",
        "ConfigMap",
        "NetworkPolicy",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/");
    }
}

#[test]
fn namespaced_objects_are_in_the_release_namespace() {
    for doc in default_render() {
        assert_eq!(
            doc.value["metadata"]["namespace"].as_str(),
            Some(RELEASE_NAMESPACE),
            "{} is not in {RELEASE_NAMESPACE}",
            doc.what()
        );
    }
}

// ---------------------------------------------------------------------------
// The Session CRD

fn prop<'a>(schema: &'a JSONSchemaProps, path: &str) -> &'a JSONSchemaProps {
    let mut s = schema;
    for key in path.split('.') {
        s = s
            .properties
            .as_ref()
            .and_then(|p| p.get(key))
            .unwrap_or_else(|| panic!("the Session schema has no {path}"));
    }
    s
}

fn required(schema: &JSONSchemaProps) -> Vec<&str> {
    schema
        .required
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect()
}

#[test]
fn session_crd_matches_the_contract() {
    let docs = documents(&repo().join("deploy/crds/session.yaml"));
    assert_eq!(docs.len(), 1, "session.yaml holds one object");
    let crd: CustomResourceDefinition = docs[0].typed();
    assert_eq!(crd.metadata.name.as_deref(), Some("sessions.stream.space"));
    let spec = &crd.spec;
    assert_eq!(spec.group, "stream.space");
    assert_eq!(spec.scope, "Namespaced");
    assert_eq!(spec.names.kind, "Session");
    assert_eq!(spec.names.plural, "sessions");
    assert_eq!(spec.names.singular.as_deref(), Some("session"));
    assert_eq!(spec.versions.len(), 1);
    let v = &spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.served && v.storage);
    assert!(
        v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
        "status subresource"
    );
    let columns: Vec<&str> = v
        .additional_printer_columns
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|c| c.json_path.as_str())
        .collect();
    for path in [".spec.user", ".spec.state", ".status.phase"] {
        assert!(columns.contains(&path), "no printer column for {path}");
    }

    let root = v
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("an openAPIV3Schema");
    let s = prop(root, "spec");
    assert_eq!(s.type_.as_deref(), Some("object"));
    assert_eq!(required(s), ["user"], "only spec.user is required");
    for field in ["user", "template", "idleTimeout", "maxSessionDuration"] {
        assert_eq!(
            prop(s, field).type_.as_deref(),
            Some("string"),
            "spec.{field}"
        );
    }
    let state = prop(s, "state");
    assert_eq!(state.type_.as_deref(), Some("string"));
    let states: Vec<&Json> = state
        .enum_
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|j| &j.0)
        .collect();
    assert_eq!(
        states,
        [
            &Json::from("running"),
            &Json::from("hibernated"),
            &Json::from("terminated")
        ]
    );
    let idle = prop(s, "idleTimeout");
    assert_eq!(idle.pattern.as_deref(), Some("^([0-9]+(s|m|h))?$"));
    assert!(
        idle.default.is_none(),
        "no default idleTimeout: an absent one means TRACKER_DEFAULT_IDLE_TIMEOUT"
    );

    let status = prop(root, "status");
    assert_eq!(status.type_.as_deref(), Some("object"));
    assert_eq!(prop(status, "phase").type_.as_deref(), Some("string"));
    let last = prop(status, "lastActivity");
    assert_eq!(last.type_.as_deref(), Some("string"));
    assert_eq!(last.format.as_deref(), Some("date-time"));
}

#[test]
fn chart_installs_the_same_crd() {
    let standalone = read(&repo().join("deploy/crds/session.yaml"));
    let in_chart = read(&repo().join("deploy/helm/tracker/crds/session.yaml"));
    assert!(
        standalone == in_chart,
        "deploy/helm/tracker/crds/session.yaml must be a copy of deploy/crds/session.yaml"
    );
}

// ---------------------------------------------------------------------------
// RBAC

#[test]
fn reaper_rbac_is_exactly_the_least_it_needs() {
    let docs = default_render();
    assert!(
        all_of::<ClusterRole>(&docs).is_empty() && all_of::<ClusterRoleBinding>(&docs).is_empty(),
        "no cluster-wide rights"
    );
    let role: Role = one_of(&docs);
    let binding: RoleBinding = one_of(&docs);
    let (deployment, reaper) = workload(&docs, Binary::Reaper);
    let pod = pod_spec(&deployment);
    let sa = pod
        .service_account_name
        .as_deref()
        .expect("the reaper has its own ServiceAccount");
    assert_ne!(pod.automount_service_account_token, Some(false));
    assert!(
        all_of::<ServiceAccount>(&docs)
            .iter()
            .any(|a| a.metadata.name.as_deref() == Some(sa)),
        "ServiceAccount {sa} is rendered"
    );

    // The Role lives where the Sessions and the Lease are.
    let watched = env_value(&reaper, "TRACKER_NAMESPACE").expect("TRACKER_NAMESPACE");
    assert_eq!(role.metadata.namespace.as_deref(), Some(watched));
    assert_eq!(binding.metadata.namespace.as_deref(), Some(watched));
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().unwrap_or_default()
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "the RoleBinding binds only the reaper");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa);
    assert_eq!(subjects[0].namespace.as_deref(), Some(RELEASE_NAMESPACE));

    // Verbs per (group, resource), summed over rules.
    let lease = env_value(&reaper, "TRACKER_LEASE_NAME").expect("TRACKER_LEASE_NAME");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        assert!(rule.non_resource_urls.is_none());
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        if let Some(names) = &rule.resource_names {
            assert_eq!(
                names,
                &[lease.to_owned()],
                "resourceNames narrow to the Lease"
            );
        }
        for g in groups {
            for r in resources {
                for v in &rule.verbs {
                    assert!(g != "*" && r != "*" && v != "*", "no wildcards");
                    granted
                        .entry((g.clone(), r.clone()))
                        .or_default()
                        .insert(v.clone());
                }
            }
        }
    }
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    let expected = BTreeMap::from([
        (
            ("stream.space".to_owned(), "sessions".to_owned()),
            set(&["get", "list", "watch", "patch"]),
        ),
        (
            ("coordination.k8s.io".to_owned(), "leases".to_owned()),
            set(&["get", "create", "update", "patch"]),
        ),
    ]);
    assert_eq!(granted, expected);
}

#[test]
fn api_has_no_kubernetes_rights() {
    let docs = default_render();
    let (api, _) = workload(&docs, Binary::Api);
    let (reaper, _) = workload(&docs, Binary::Reaper);
    let pod = pod_spec(&api);
    assert_eq!(pod.automount_service_account_token, Some(false));
    let sa = pod
        .service_account_name
        .clone()
        .expect("the API has its own ServiceAccount, not `default`");
    assert_ne!(Some(&sa), pod_spec(&reaper).service_account_name.as_ref());
    let account = all_of::<ServiceAccount>(&docs)
        .into_iter()
        .find(|a| a.metadata.name.as_deref() == Some(sa.as_str()))
        .unwrap_or_else(|| panic!("ServiceAccount {sa} is rendered"));
    assert_eq!(account.automount_service_account_token, Some(false));
    let bound = |subjects: Option<&[k8s_openapi::api::rbac::v1::Subject]>| {
        subjects
            .unwrap_or_default()
            .iter()
            .any(|s| s.kind == "ServiceAccount" && s.name == sa)
    };
    for b in all_of::<RoleBinding>(&docs) {
        assert!(!bound(b.subjects.as_deref()), "a RoleBinding binds the API");
    }
    for b in all_of::<ClusterRoleBinding>(&docs) {
        assert!(
            !bound(b.subjects.as_deref()),
            "a ClusterRoleBinding binds the API"
        );
    }
}

// ---------------------------------------------------------------------------
// Environment

#[test]
fn env_vars_are_the_contracts_and_read_by_their_binary() {
    let docs = default_render();
    for binary in [Binary::Api, Binary::Reaper] {
        let (_, c) = workload(&docs, binary);
        assert!(c.env_from.is_none(), "{}: no envFrom", binary.name());
        // Settings both binaries share are parsed in tracker-runtime.
        let src = sources(&repo().join("crates").join(binary.name()).join("src"))
            + &sources(&repo().join("crates/tracker-runtime/src"));
        let mut seen = BTreeSet::new();
        for e in env(&c) {
            assert!(
                seen.insert(&e.name),
                "{}: {} set twice",
                binary.name(),
                e.name
            );
            assert!(
                binary.allowed_env().contains(&e.name.as_str()),
                "{}: {} is not a variable of the contract for this binary",
                binary.name(),
                e.name
            );
            if !LIBRARY_ENV.contains(&e.name.as_str()) {
                assert!(
                    src.contains(&format!("\"{}\"", e.name)),
                    "{}: {} is set but neither crates/{}/src nor tracker-runtime reads it",
                    binary.name(),
                    e.name,
                    binary.name()
                );
            }
        }
    }
}

#[test]
fn shared_settings_are_identical_in_both_deployments() {
    let docs = default_render();
    let (_, api) = workload(&docs, Binary::Api);
    let (_, reaper) = workload(&docs, Binary::Reaper);
    for name in SHARED_ENV {
        let a = env_var(&api, name);
        let r = env_var(&reaper, name);
        assert_eq!(
            serde_json::to_value(a).expect("serializes"),
            serde_json::to_value(r).expect("serializes"),
            "{name} differs between the API and the reaper"
        );
    }
}

#[test]
fn secrets_come_from_a_secret() {
    let docs = default_render();
    let values = values();
    let secret: Secret = one_of(&docs);
    let secret_name = secret.metadata.name.clone().expect("named");
    let key_ref = |c: &Container, name: &str| {
        env_var(c, name)
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.clone())
            .unwrap_or_else(|| panic!("{name} comes from a secretKeyRef"))
    };
    let (_, api) = workload(&docs, Binary::Api);
    let (_, reaper) = workload(&docs, Binary::Reaper);
    let jwt = key_ref(&api, "TRACKER_JWT_SECRET");
    assert_eq!(jwt.name, secret_name);
    assert_eq!(jwt.key, value_at(&values, "secret.keys.jwtSecret"));
    // Auth is always on (the chart refuses api.auth=disabled): never optional.
    assert_ne!(jwt.optional, Some(true), "the JWT secret is required");
    for (c, optional) in [(&api, Some(true)), (&reaper, None)] {
        let db = key_ref(c, "TRACKER_DATABASE_URL");
        assert_eq!(db.name, secret_name);
        assert_eq!(db.key, value_at(&values, "secret.keys.databaseUrl"));
        assert_eq!(db.optional, optional, "{}", c.name);
    }
}

// ---------------------------------------------------------------------------
// Pods

#[test]
fn grace_period_outlasts_the_shutdown_deadline() {
    let docs = default_render();
    for binary in [Binary::Api, Binary::Reaper] {
        let (d, c) = workload(&docs, binary);
        // Kubernetes' default grace period is 30 s.
        let grace = pod_spec(&d).termination_grace_period_seconds.unwrap_or(30);
        let grace = Duration::from_secs(u64::try_from(grace).expect("non-negative"));
        let shutdown = match (binary, env_value(&c, "TRACKER_SHUTDOWN_TIMEOUT")) {
            (_, Some(v)) => duration(v),
            // The API's default deadline (crates/tracker-api config).
            (Binary::Api, None) => Duration::from_secs(20),
            (Binary::Reaper, None) => continue,
        };
        assert!(
            grace > shutdown,
            "{}: terminationGracePeriodSeconds {grace:?} must exceed TRACKER_SHUTDOWN_TIMEOUT {shutdown:?}",
            binary.name()
        );
    }
}

#[test]
fn probes_hit_readyz_and_healthz_on_the_served_port() {
    let docs = default_render();
    // The API's probes use its ops listener: /readyz is only served there.
    for (binary, listen_var, port) in [
        (Binary::Api, "TRACKER_METRICS_LISTEN", 9090),
        (Binary::Reaper, "TRACKER_METRICS_LISTEN", 9090),
    ] {
        let (_, c) = workload(&docs, binary);
        let listen = env_value(&c, listen_var).unwrap_or_else(|| panic!("{listen_var}"));
        assert_eq!(listen, format!("0.0.0.0:{port}"), "{}", binary.name());
        for (probe, path) in [
            (c.readiness_probe.as_ref(), "/readyz"),
            (c.liveness_probe.as_ref(), "/healthz"),
        ] {
            let get = probe
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{}: an httpGet probe on {path}", binary.name()));
            assert_eq!(get.path.as_deref(), Some(path), "{}", binary.name());
            assert_eq!(named_port(&c, &get.port), port, "{}", binary.name());
        }
    }
}

#[test]
fn containers_are_locked_down_and_sized() {
    let docs = default_render();
    for d in all_of::<Deployment>(&docs) {
        let pod = pod_spec(&d);
        let pod_non_root = pod
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root);
        for c in &pod.containers {
            let who = format!("container {}", c.name);
            let sc = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{who}: securityContext"));
            assert_eq!(
                sc.run_as_non_root.or(pod_non_root),
                Some(true),
                "{who}: runAsNonRoot"
            );
            assert_eq!(
                sc.read_only_root_filesystem,
                Some(true),
                "{who}: readOnlyRootFilesystem"
            );
            assert_eq!(
                sc.allow_privilege_escalation,
                Some(false),
                "{who}: allowPrivilegeEscalation"
            );
            assert_ne!(sc.privileged, Some(true), "{who}: privileged");
            let drop = sc
                .capabilities
                .as_ref()
                .and_then(|c| c.drop.as_deref())
                .unwrap_or_default();
            assert!(
                drop.iter().any(|c| c == "ALL"),
                "{who}: drop ALL capabilities"
            );
            assert!(
                sc.capabilities
                    .as_ref()
                    .and_then(|c| c.add.as_ref())
                    .is_none(),
                "{who}: adds no capability"
            );
            let res = c
                .resources
                .as_ref()
                .unwrap_or_else(|| panic!("{who}: resources"));
            for kind in ["cpu", "memory"] {
                assert!(
                    res.requests.as_ref().is_some_and(|r| r.contains_key(kind)),
                    "{who}: {kind} request"
                );
                assert!(
                    res.limits.as_ref().is_some_and(|r| r.contains_key(kind)),
                    "{who}: {kind} limit"
                );
            }
        }
    }
}

#[test]
fn api_scales_keeps_disruptions_bounded_and_is_served_on_port_80() {
    let docs = default_render();
    let (api, c) = workload(&docs, Binary::Api);
    let api_name = api.metadata.name.clone().expect("named");
    let labels = pod_labels(&api);
    let spec = &api.spec;
    assert!(
        selects(&spec.selector, &labels),
        "the Deployment selects its pods"
    );

    // 3 replicas by default: set on the Deployment, or (with the HPA owning
    // the count) as the HPA's minimum.
    let hpas: Vec<HorizontalPodAutoscaler> = all_of(&docs);
    let hpa = hpas
        .iter()
        .find(|h| {
            h.spec.scale_target_ref.kind == "Deployment" && h.spec.scale_target_ref.name == api_name
        })
        .expect("an HPA targets the API Deployment");
    let hpa_spec = &hpa.spec;
    let replicas = spec.replicas.or(hpa_spec.min_replicas).unwrap_or(1);
    assert_eq!(replicas, 3);
    assert!(hpa_spec.max_replicas >= replicas);
    let cpu = hpa_spec
        .metrics
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.type_ == "Resource" && m.resource.as_ref().is_some_and(|r| r.name == "cpu"))
        .expect("the HPA scales on CPU");
    let target = &cpu.resource.as_ref().expect("resource").target;
    assert_eq!(target.type_, "Utilization");
    assert!(target
        .average_utilization
        .is_some_and(|u| u > 0 && u <= 100));
    // Resource utilization needs a CPU request to be computed against.
    assert!(c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.contains_key("cpu")));

    let pdbs: Vec<PodDisruptionBudget> = all_of(&docs);
    assert!(
        pdbs.iter().any(|p| p
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| selects(s, &labels))),
        "a PodDisruptionBudget covers the API pods"
    );

    let services: Vec<Service> = all_of(&docs);
    let svc = services
        .iter()
        .filter_map(|s| s.spec.as_ref())
        .find(|s| {
            s.selector.as_ref().is_some_and(|sel| {
                !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
        })
        .expect("a Service selects the API pods");
    let port = svc
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.port == 80)
        .expect("the API Service listens on 80");
    let target = port.target_port.clone().unwrap_or(IntOrString::Int(80));
    assert_eq!(named_port(&c, &target), 8080);
}

#[test]
fn reaper_runs_two_replicas_with_the_lease_election() {
    let docs = default_render();
    let (reaper, c) = workload(&docs, Binary::Reaper);
    let spec = &reaper.spec;
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(env_value(&c, "TRACKER_ELECTION"), Some("kubernetes"));
    let pod_name = env_var(&c, "POD_NAME")
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("POD_NAME from the downward API");
    assert_eq!(pod_name.field_path, "metadata.name");
    let metrics = c
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a metrics port");
    assert_eq!(metrics.container_port, 9090);
    let labels = pod_labels(&reaper);
    let services: Vec<Service> = all_of(&docs);
    assert!(
        services
            .iter()
            .filter_map(|s| s.spec.as_ref())
            .any(|s| s.selector.as_ref().is_some_and(
                |sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
            ) && s
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|p| p.port == 9090)),
        "a Service exposes the reapers' metrics port"
    );
}

// ---------------------------------------------------------------------------
// Monitoring

#[test]
fn service_monitors_scrape_named_service_ports() {
    let docs = rendered_file(MONITORING_RENDER);
    let services: Vec<Service> = all_of(&default_render());
    let monitors: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.kind() == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 2, "one ServiceMonitor per component");
    for m in monitors {
        assert_eq!(m.api_version(), "monitoring.coreos.com/v1");
        let selector: LabelSelector =
            serde_json::from_value(m.value["spec"]["selector"].clone()).expect("a label selector");
        let matched: Vec<&Service> = services
            .iter()
            .filter(|s| selects(&selector, s.metadata.labels.as_ref().expect("labelled")))
            .collect();
        assert_eq!(matched.len(), 1, "{} selects one Service", m.what());
        let port_names: Vec<&str> = matched[0]
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.name.as_deref())
            .collect();
        let endpoints = m.value["spec"]["endpoints"].as_array().expect("endpoints");
        assert!(!endpoints.is_empty());
        for e in endpoints {
            let port = e["port"].as_str().expect("endpoint port name");
            assert!(
                port_names.contains(&port),
                "{}: no Service port {port}",
                m.what()
            );
            assert_eq!(e["path"].as_str(), Some("/metrics"));
        }
    }
}

fn dashboard_json() -> (ConfigMap, Json) {
    let docs = rendered_file(MONITORING_RENDER);
    let cm: ConfigMap = one_of(&docs);
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.values().next())
        .expect("the dashboard ConfigMap holds one file")
        .clone();
    let json: Json = serde_json::from_str(&text).expect("the dashboard is JSON");
    (cm, json)
}

/// `tracker_*` metric names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("tracker_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_has_the_panels_and_uses_exported_metrics() {
    let (cm, dash) = dashboard_json();
    let labels = cm.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("grafana_dashboard").map(String::as_str),
        Some("1")
    );
    let in_chart: Json = serde_json::from_str(&read(
        &repo().join("deploy/helm/tracker/dashboards/tracker.json"),
    ))
    .expect("dashboards/tracker.json is JSON");
    assert!(
        in_chart == dash,
        "the rendered dashboard differs from the chart's; run scripts/render-manifests.sh"
    );

    let panels = dash["panels"].as_array().expect("panels");
    let titles: Vec<String> = panels
        .iter()
        .filter_map(|p| p["title"].as_str())
        .map(str::to_lowercase)
        .collect();
    for wanted in [
        "live connections",
        "heartbeats/s",
        "websockets",
        "hibernations",
        "wakes",
        "archive backlog",
        "leader",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}"
        );
    }

    let src = format!(
        "{}{}",
        sources(&repo().join("crates/tracker-api/src")),
        sources(&repo().join("crates/tracker-reaper/src"))
    );
    let exported = |name: &str| {
        let mut candidates = vec![name.to_owned()];
        for suffix in ["_total", "_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                candidates.push(base.to_owned());
            }
        }
        candidates.iter().any(|c| src.contains(&format!("\"{c}\"")))
    };
    let mut used = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(t["expr"].as_str().unwrap_or_default()));
        }
    }
    assert!(!used.is_empty());
    for name in &used {
        if NOT_YET_EXPORTED.contains(&name.as_str()) {
            assert!(
                !exported(name),
                "{name} is exported now: remove it from NOT_YET_EXPORTED"
            );
        } else {
            assert!(
                exported(name),
                "the dashboard uses {name}, which no crate exports"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Drift between the chart and deploy/rendered/

/// The digest `scripts/render-manifests.sh` writes into each rendered file.
fn chart_digest() -> String {
    let chart = repo().join("deploy/helm/tracker");
    let mut files = Vec::new();
    let mut stack = vec![chart.clone()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("list {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(&chart)
                    .expect("under the chart")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                files.push((rel, path));
            }
        }
    }
    files.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (rel, path) in files {
        let content = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        for b in rel.bytes().chain([0]).chain(content).chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

#[test]
fn rendered_files_come_from_the_current_chart() {
    let digest = chart_digest();
    for name in [DEFAULT_RENDER, MONITORING_RENDER] {
        let text = read(&repo().join("deploy/rendered").join(name));
        let recorded = text
            .lines()
            .find_map(|l| l.strip_prefix("# chart digest: "))
            .unwrap_or_else(|| panic!("{name} has no chart digest line"));
        assert_eq!(
            recorded, digest,
            "deploy/helm/tracker changed since deploy/rendered/{name} was rendered: run scripts/render-manifests.sh"
        );
    }
}

/// A template's default-off switch: `{{- if .Values.a.b }}` on its first line.
fn default_off(template: &str, values: &serde_yaml::Value) -> bool {
    let first = template
        .lines()
        .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    let Some(path) = first
        .trim()
        .strip_prefix("{{- if .Values.")
        .and_then(|r| r.strip_suffix("}}"))
        .map(str::trim)
    else {
        return false;
    };
    if path.contains(' ') {
        return false;
    }
    value_at(values, path) == "false"
}

#[test]
fn every_template_is_rendered_with_its_kinds() {
    let values = values();
    let chart = repo().join("deploy/helm/tracker");
    let chart_name = {
        let meta: serde_yaml::Value =
            serde_yaml::from_str(&read(&chart.join("Chart.yaml"))).expect("Chart.yaml parses");
        value_at(&meta, "name")
    };
    let default = default_render();
    let monitoring = rendered_file(MONITORING_RENDER);
    let mut templates = BTreeSet::new();
    for path in yaml_files(&chart.join("templates")) {
        let file = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let source = format!("{chart_name}/templates/{file}");
        templates.insert(source.clone());
        let text = read(&path);
        // Top-level kinds only (not those of roleRef, scaleTargetRef, subjects).
        let kinds: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("kind: "))
            .map(str::trim)
            .collect();
        assert!(!kinds.is_empty(), "{file}: no top-level kind");
        let (docs, where_) = if default_off(&text, &values) {
            (&monitoring, MONITORING_RENDER)
        } else {
            (&default, DEFAULT_RENDER)
        };
        let rendered: BTreeSet<&str> = docs
            .iter()
            .filter(|d| d.source.as_deref() == Some(source.as_str()))
            .map(Doc::kind)
            .collect();
        assert_eq!(
            rendered, kinds,
            "{file}: kinds in deploy/rendered/{where_} differ from the template; run scripts/render-manifests.sh"
        );
    }
    for doc in default.iter().chain(&monitoring) {
        let source = doc
            .source
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no # Source", doc.what()));
        assert!(
            templates.contains(source),
            "{} comes from {source}, which no longer exists",
            doc.what()
        );
    }
}

#[test]
fn rendered_env_and_sizes_are_the_values_defaults() {
    let values = values();
    let docs = default_render();
    let (api, api_c) = workload(&docs, Binary::Api);
    let (reaper, reaper_c) = workload(&docs, Binary::Reaper);
    for (binary, d, c) in [
        (Binary::Api, &api, &api_c),
        (Binary::Reaper, &reaper, &reaper_c),
    ] {
        for e in env(c) {
            let expected = match e.name.as_str() {
                "TRACKER_NAMESPACE" => {
                    let ns = value_at(&values, "reaper.namespace");
                    Some(if ns.is_empty() {
                        RELEASE_NAMESPACE.to_owned()
                    } else {
                        ns
                    })
                }
                "TRACKER_LISTEN" => Some(format!("0.0.0.0:{}", value_at(&values, "api.port"))),
                "TRACKER_METRICS_LISTEN" => Some(format!(
                    "0.0.0.0:{}",
                    value_at(
                        &values,
                        match binary {
                            Binary::Api => "api.metricsPort",
                            Binary::Reaper => "reaper.metricsPort",
                        }
                    )
                )),
                // From the Secret or the downward API: checked elsewhere.
                "TRACKER_JWT_SECRET" | "TRACKER_DATABASE_URL" | "POD_NAME" => None,
                name => {
                    let path = ENV_FROM_VALUES
                        .iter()
                        .find(|(n, _)| *n == name)
                        .map(|(_, p)| *p)
                        .unwrap_or_else(|| {
                            panic!(
                                "{name} maps to no values.yaml setting; add it to ENV_FROM_VALUES"
                            )
                        });
                    Some(value_at(&values, path))
                }
            };
            if let Some(expected) = expected {
                assert_eq!(
                    e.value.as_deref(),
                    Some(expected.as_str()),
                    "{}: {} is not the values.yaml default; run scripts/render-manifests.sh",
                    binary.name(),
                    e.name
                );
            }
        }
        let prefix = match binary {
            Binary::Api => "api",
            Binary::Reaper => "reaper",
        };
        assert_eq!(
            pod_spec(d)
                .termination_grace_period_seconds
                .map(|g| g.to_string()),
            Some(value_at(
                &values,
                &format!("{prefix}.terminationGracePeriodSeconds")
            ))
        );
        let resources =
            serde_json::to_value(c.resources.as_ref().expect("resources")).expect("serializes");
        let wanted = serde_json::to_value(
            values
                .get(prefix)
                .and_then(|v| v.get("resources"))
                .expect("values resources"),
        )
        .expect("serializes");
        assert_eq!(resources, wanted, "{}: resources", binary.name());
    }
    assert_eq!(
        reaper.spec.replicas.map(|r| r.to_string()),
        Some(value_at(&values, "reaper.replicas"))
    );
    let hpa: HorizontalPodAutoscaler = one_of(&docs);
    assert_eq!(
        hpa.spec.min_replicas.map(|r| r.to_string()),
        Some(value_at(&values, "api.replicas"))
    );

    // Chart.yaml: labels and image tag follow its version and appVersion.
    let meta: serde_yaml::Value =
        serde_yaml::from_str(&read(&repo().join("deploy/helm/tracker/Chart.yaml")))
            .expect("Chart.yaml parses");
    let chart_label = format!("tracker-{}", value_at(&meta, "version"));
    let app_version = value_at(&meta, "appVersion");
    for doc in &docs {
        assert_eq!(
            doc.value["metadata"]["labels"]["helm.sh/chart"].as_str(),
            Some(chart_label.as_str()),
            "{}: chart label",
            doc.what()
        );
    }
    let image = format!("{}:{app_version}", value_at(&values, "image.repository"));
    for c in [&api_c, &reaper_c] {
        assert_eq!(c.image.as_deref(), Some(image.as_str()));
    }
}

/// `api.auth=disabled` makes every request an admin: the chart refuses to
/// render it (scripts/render-manifests.sh checks that it does), and the
/// default is `jwt`.
#[test]
fn the_chart_refuses_disabled_auth() {
    let values = values();
    assert_eq!(value_at(&values, "api.auth"), "jwt");
    let template = read(&repo().join("deploy/helm/tracker/templates/api-deployment.yaml"));
    let guard = template.lines().take(3).collect::<Vec<_>>().join("\n");
    assert!(
        guard.contains("if ne .Values.api.auth \"jwt\"") && guard.contains("fail "),
        "api-deployment.yaml must start by failing on any api.auth but jwt:\n{guard}"
    );
    let (_, c) = workload(&default_render(), Binary::Api);
    assert_eq!(env_value(&c, "TRACKER_AUTH"), Some("jwt"));
}

/// Each pod's metrics port takes traffic only from the configured scrapers;
/// the API's own port stays open to clients. The API serves /metrics,
/// /readyz and /openapi.json on its metrics port only.
#[test]
fn network_policies_close_the_metrics_ports() {
    let docs = default_render();
    let policies: Vec<NetworkPolicy> = all_of(&docs);
    for binary in [Binary::Api, Binary::Reaper] {
        let (d, c) = workload(&docs, binary);
        let labels = pod_labels(&d);
        let selecting: Vec<&NetworkPolicy> = policies
            .iter()
            .filter(|p| {
                p.spec
                    .as_ref()
                    .and_then(|s| s.pod_selector.as_ref())
                    .is_some_and(|sel| selects(sel, &labels))
            })
            .collect();
        assert_eq!(selecting.len(), 1, "{}: one NetworkPolicy", binary.name());
        let spec = selecting[0].spec.as_ref().expect("a spec");
        assert!(
            spec.policy_types
                .as_deref()
                .is_some_and(|t| t.iter().any(|t| t == "Ingress")),
            "{}: an ingress policy",
            binary.name()
        );
        let metrics_port = env_value(&c, "TRACKER_METRICS_LISTEN")
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("{}: TRACKER_METRICS_LISTEN", binary.name()));
        let mut metrics_open_to_some = false;
        for rule in spec.ingress.as_deref().unwrap_or_default() {
            let ports: Vec<i32> = rule
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .filter_map(|p| p.port.as_ref())
                .map(|p| named_port(&c, p))
                .collect();
            assert!(
                !ports.is_empty(),
                "{}: a rule without ports opens every port",
                binary.name()
            );
            if ports.contains(&metrics_port) {
                let from = rule.from.as_deref().unwrap_or_default();
                assert!(
                    !from.is_empty(),
                    "{}: the metrics port is open to everyone",
                    binary.name()
                );
                metrics_open_to_some = true;
            }
        }
        assert!(
            metrics_open_to_some,
            "{}: no scraper may reach /metrics",
            binary.name()
        );
    }
    let (_, api) = workload(&docs, Binary::Api);
    let listen = env_value(&api, "TRACKER_LISTEN").expect("TRACKER_LISTEN");
    let metrics = env_value(&api, "TRACKER_METRICS_LISTEN").expect("TRACKER_METRICS_LISTEN");
    assert_ne!(
        listen, metrics,
        "the API's ops routes need their own listener"
    );
}

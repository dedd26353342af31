//! Loading the manifests, `values.yaml` and the sources; parsing a document into its
//! `k8s-openapi` type.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::Resource;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;

pub(crate) const RELEASE_NAMESPACE: &str = "streamspace";
pub(crate) const DEFAULT_RENDER: &str = "tracker.yaml";
pub(crate) const MONITORING_RENDER: &str = "tracker-monitoring.yaml";

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// One YAML document of a manifest file.
#[derive(Debug, Clone)]
pub(crate) struct Doc {
    pub(crate) file: String,
    /// The `# Source: tracker/templates/x.yaml` comment Helm puts above it.
    pub(crate) source: Option<String>,
    pub(crate) value: Json,
}

impl Doc {
    pub(crate) fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }

    pub(crate) fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    pub(crate) fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    pub(crate) fn is<T: Resource>(&self) -> bool {
        self.api_version() == T::API_VERSION && self.kind() == T::KIND
    }

    pub(crate) fn what(&self) -> String {
        format!("{}: {} {}", self.file, self.kind(), self.name())
    }

    /// Deserializes into `T` and fails on any field `T` does not keep.
    pub(crate) fn typed<T: Resource + DeserializeOwned + Serialize>(&self) -> T {
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
pub(crate) fn first_difference(a: &Json, b: &Json, path: &str) -> Option<String> {
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
pub(crate) fn documents(path: &Path) -> Vec<Doc> {
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

pub(crate) fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML files in {}", dir.display());
    files
}

pub(crate) fn rendered_file(name: &str) -> Vec<Doc> {
    documents(&repo().join("deploy/rendered").join(name))
}

/// The default render: what `helm install` with default values creates.
pub(crate) fn default_render() -> Vec<Doc> {
    rendered_file(DEFAULT_RENDER)
}

pub(crate) fn all_of<T: Resource + DeserializeOwned + Serialize>(docs: &[Doc]) -> Vec<T> {
    docs.iter()
        .filter(|d| d.is::<T>())
        .map(Doc::typed)
        .collect()
}

pub(crate) fn one_of<T: Resource + DeserializeOwned + Serialize>(docs: &[Doc]) -> T {
    let mut all = all_of::<T>(docs);
    assert_eq!(all.len(), 1, "expected exactly one {}", T::KIND);
    all.remove(0)
}

pub(crate) fn values() -> serde_yaml::Value {
    serde_yaml::from_str(&read(&repo().join("deploy/helm/tracker/values.yaml")))
        .expect("values.yaml parses")
}

/// `values.yaml` at a dotted path, as the string Helm's `quote` would print.
pub(crate) fn value_at(values: &serde_yaml::Value, path: &str) -> String {
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

pub(crate) fn duration(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?} is not a duration: {e}"))
}

/// Every `.rs` file under `dir`, concatenated.
pub(crate) fn sources(dir: &Path) -> String {
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

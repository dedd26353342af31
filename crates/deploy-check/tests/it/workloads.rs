//! The two workloads (the Deployments running `tracker-api` and `tracker-reaper`) and
//! what the checks read from their containers.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::settings::{API_ENV, REAPER_ENV};
use crate::support::{all_of, Doc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binary {
    Api,
    Reaper,
}

impl Binary {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Binary::Api => "tracker-api",
            Binary::Reaper => "tracker-reaper",
        }
    }

    pub(crate) fn allowed_env(self) -> &'static [&'static str] {
        match self {
            Binary::Api => API_ENV,
            Binary::Reaper => REAPER_ENV,
        }
    }
}

pub(crate) fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .template
        .spec
        .as_ref()
        .expect("a Deployment has a pod spec")
}

pub(crate) fn binary_of(c: &Container) -> Option<Binary> {
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
pub(crate) fn workload(docs: &[Doc], binary: Binary) -> (Deployment, Container) {
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

pub(crate) fn env(c: &Container) -> &[EnvVar] {
    c.env.as_deref().unwrap_or_default()
}

pub(crate) fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    env(c)
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

pub(crate) fn env_var<'a>(c: &'a Container, name: &str) -> &'a EnvVar {
    env(c)
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("container {} sets no {name}", c.name))
}

pub(crate) fn named_port(c: &Container, port: &IntOrString) -> i32 {
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

pub(crate) fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    assert!(
        selector.match_expressions.is_none(),
        "only matchLabels selectors are expected"
    );
    selector
        .match_labels
        .as_ref()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

pub(crate) fn pod_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

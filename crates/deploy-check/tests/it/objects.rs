//! Every object has its `k8s-openapi` type and its namespace.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::support::{default_render, documents, repo, yaml_files, RELEASE_NAMESPACE};

/// Parses `doc` into the first of the types it is, failing on unknown fields; answers whether
/// it was one of them.
macro_rules! parse_as_one_of {
    ($doc:expr, $($t:ty),+ $(,)?) => {{
        let doc = $doc;
        false $(|| (doc.is::<$t>() && { doc.typed::<$t>(); true }))+
    }};
}

#[test]
fn every_object_parses_into_its_k8s_openapi_type() {
    let dirs = [repo().join("deploy/rendered"), repo().join("deploy/crds")];
    let mut kinds = BTreeSet::new();
    for dir in &dirs {
        for file in yaml_files(dir) {
            let docs = documents(&file);
            assert!(!docs.is_empty(), "{} holds no object", file.display());
            for doc in &docs {
                let typed = parse_as_one_of!(
                    doc,
                    Deployment,
                    Service,
                    ServiceAccount,
                    Secret,
                    ConfigMap,
                    Role,
                    RoleBinding,
                    ClusterRole,
                    ClusterRoleBinding,
                    HorizontalPodAutoscaler,
                    PodDisruptionBudget,
                    NetworkPolicy,
                    CustomResourceDefinition,
                );
                // No k8s-openapi type: checked by hand in its own test.
                let service_monitor = doc.api_version() == "monitoring.coreos.com/v1"
                    && doc.kind() == "ServiceMonitor";
                assert!(
                    typed || service_monitor,
                    "{}: no k8s-openapi type mapped for {} {}; add it to this test",
                    doc.what(),
                    doc.api_version(),
                    doc.kind()
                );
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

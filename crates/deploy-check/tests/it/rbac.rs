//! RBAC: the reaper's rights exactly, and none for the API.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};

use crate::support::{all_of, default_render, one_of, RELEASE_NAMESPACE};
use crate::workloads::{env_value, pod_spec, workload, Binary};

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

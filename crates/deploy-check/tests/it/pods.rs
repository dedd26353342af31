//! Pods: grace periods, probes, security contexts and sizes, scaling, disruption budgets,
//! the lease election and the network policies.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::support::{all_of, default_render, duration};
use crate::workloads::{
    env_value, env_var, named_port, pod_labels, pod_spec, selects, workload, Binary,
};

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

//! Monitoring: ServiceMonitors and the Grafana dashboard with its alerts' metrics.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use serde_json::Value as Json;

use crate::support::{
    all_of, default_render, one_of, read, rendered_file, repo, sources, Doc, MONITORING_RENDER,
};
use crate::workloads::selects;

/// Dashboard metrics no crate exports yet. The test fails once one of them
/// is exported, so that this list only ever names real gaps.
const NOT_YET_EXPORTED: &[&str] = &["tracker_reaper_live_connections"];

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

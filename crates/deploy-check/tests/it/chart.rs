//! The chart render: `deploy/rendered/` comes from the current chart, every template is
//! rendered with its kinds, the rendered values are `values.yaml`'s defaults, and the chart
//! refuses disabled auth.

use std::collections::BTreeSet;
use std::fs;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

use crate::settings::ENV_FROM_VALUES;
use crate::support::{
    default_render, one_of, read, rendered_file, repo, value_at, values, yaml_files, Doc,
    DEFAULT_RENDER, MONITORING_RENDER, RELEASE_NAMESPACE,
};
use crate::workloads::{env, env_value, pod_spec, workload, Binary};

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
                "TRACKER_JWT_SECRET" | "TRACKER_DATABASE_URL" | "TRACKER_NATS_URL" | "POD_NAME" => {
                    None
                }
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

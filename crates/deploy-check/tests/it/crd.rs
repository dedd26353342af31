//! The Session CRD, standalone and in the chart.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};

use serde_json::Value as Json;

use crate::support::{documents, read, repo};

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
fn session_crd_matches_the_api_reference() {
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
    // A session past its max duration is hibernated (live connections end
    // with end_reason max_duration), not terminated.
    let max = prop(s, "maxSessionDuration")
        .description
        .as_deref()
        .unwrap_or_default();
    assert!(
        max.contains("hibernated") && max.contains("max_duration") && !max.contains("terminated"),
        "spec.maxSessionDuration description: {max:?}"
    );
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

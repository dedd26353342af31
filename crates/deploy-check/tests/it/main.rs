//! Parses and checks `deploy/rendered/*.yaml` and `deploy/crds/*.yaml`.
//!
//! Every object is deserialized into its `k8s-openapi` type and serialized
//! back: a field that does not survive the round trip is unknown to the type
//! (misspelt or misplaced), which Kubernetes would silently drop.
//!
//! Layout: [`support`] loads and parses, [`workloads`] finds the two
//! Deployments and reads their containers; the checks are grouped by concept:
//! [`objects`], [`crd`], [`rbac`], [`settings`] (environment variables),
//! [`pods`], [`monitoring`] (ServiceMonitors, the dashboard) and [`chart`]
//! (the render and its drift from the chart).

mod chart;
mod crd;
mod monitoring;
mod objects;
mod pods;
mod rbac;
mod settings;
mod support;
mod workloads;

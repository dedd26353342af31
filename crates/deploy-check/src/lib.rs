//! Checks of the Kubernetes deployment in `deploy/`; this crate has no code.
//!
//! Its one test binary, `tests/it/` (a module per concept), reads the rendered chart
//! (`deploy/rendered/*.yaml`, written by `scripts/render-manifests.sh`) and
//! the standalone CRD (`deploy/crds/*.yaml`), and:
//!
//! - parses every object into its `k8s-openapi` type, and fails on any field
//!   the type does not know (a misspelt or misplaced key);
//! - checks the Session CRD against docs/api.md (group, version, names,
//!   `spec.user`, `spec.state`, `spec.idleTimeout`, status);
//! - checks the reaper's RBAC verbs exactly, and that the API has none;
//! - checks every environment variable against the documented settings and the
//!   binary that reads it, and that every `TRACKER_*` setting the binaries'
//!   config structs read is set by the chart (but for a short allow-list);
//!   probes, grace periods, security contexts;
//! - fails when the chart and the rendered files drift apart: a digest of the
//!   chart's files, the template kinds, the defaults of `values.yaml`, the
//!   Grafana dashboard and its metric names.
//!
//! Regenerate the rendered files with `scripts/render-manifests.sh`.

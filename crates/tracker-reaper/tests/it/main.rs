//! Integration tests of the reaper against real Redis (standalone and
//! Cluster), real PostgreSQL (a database per test, `#[sqlx::test]`) and the
//! fake Kubernetes API server of `crates/fake-kube` (no real one runs here).
//!
//! Run them with `scripts/test.sh -p tracker-reaper`, which starts the
//! services and sets `DATABASE_URL`.

// Tests may unwrap: a panic there is the failure report (clippy.toml allows it in
// #[test] functions; the helpers here are outside them).
#![allow(clippy::unwrap_used)]

mod archive;
mod bench;
mod binary;
mod docker;
mod election;
mod helpers;
mod hibernate;
mod http;
mod max_duration;
mod mirror;
mod partitions;
mod reasons;
mod wake;

//! Integration tests of tracker-api: the app spawned on port 0 against the
//! real Redis, the real Redis Cluster and PostgreSQL (see scripts/test.sh).

// Tests may unwrap: a panic there is the failure report (clippy.toml says so
// too, but does not see into `#[tokio::test]` bodies and helpers).
#![allow(clippy::unwrap_used)]

mod api;
mod api_doc;
mod auth;
mod declare;
mod explain;
mod helpers;
mod history;
mod malformed;
mod outage;
mod parsing;
mod security;
mod tickets;
mod usage;
mod ws;

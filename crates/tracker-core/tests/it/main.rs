//! Integration tests of the store against a real Redis and a real Redis
//! Cluster. Every case runs on both (`both!`), each with its own key prefix.

#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

mod adversarial;
mod concurrency;
mod connections;
mod counters;
mod declared;
mod hibernation;
mod max_duration;
mod migration;
mod model;
mod properties;
mod support;

//! Multi-process end-to-end harness of the connection tracker.
//!
//! It starts the real binaries as separate processes: two (or more) `tracker-api` replicas and
//! two `tracker-reaper` replicas, against the real Redis Cluster, a fresh PostgreSQL database,
//! and the fake Kubernetes API server of `crates/fake-kube` running in this process (which
//! records every Session patch with the time it received it). Scenarios then drive clients over
//! HTTP and WebSocket, inject faults (SIGKILL, PostgreSQL cut off) and check the tracker's
//! promises from what the fake recorded, what the clients observed and what PostgreSQL holds.
//!
//! Every wait is bounded, every loop is bounded in count and time, and all traffic stays on
//! loopback. Short versions run in CI (`tests/e2e.rs`); the full ones behind
//! `cargo run -p tracker-e2e --release -- <scenario>` (see `docs/reliability.md`).
//!
//! Layout:
//! - [`settings`]: where the services are (environment) and the timing the processes get;
//! - [`process`]: finding the binaries, spawning a child with its log file, SIGTERM / SIGKILL;
//! - [`db`]: the run's own PostgreSQL database and the history queries;
//! - [`harness`]: [`Harness`], which owns the fake, the database and every child;
//! - [`client`]: HTTP and WebSocket clients of the API;
//! - [`proxy`]: a loopback TCP forwarder that can be cut (PostgreSQL outage);
//! - [`local_server`]: a private server process on a free port that can be stopped, killed
//!   and started again; [`redis_server`] (standalone, no persistence) and [`nats_server`]
//!   (JetStream) are its two kinds;
//! - [`metrics`], [`poll`]: Prometheus text parsing and bounded polling;
//! - [`scenarios`]: the scenarios, each returning its figures.

pub mod client;
pub mod db;
pub mod harness;
pub mod local_server;
pub mod metrics;
pub mod nats_server;
pub mod poll;
pub mod process;
pub mod proxy;
pub mod redis_server;
pub mod scenarios;
pub mod settings;

use std::path::PathBuf;
use std::time::Duration;

pub use harness::{Auth, Harness, HarnessOptions, RedisTarget};
pub use settings::{Services, Timing};

/// What can go wrong while setting up, driving or checking a run.
///
/// The underlying error is part of the message (not only of `source()`), so that a test's
/// `unwrap` shows the whole story in one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run cannot start: a binary or a service is missing, a setting is wrong.
    #[error("{0}")]
    Setup(String),
    /// A local I/O operation failed.
    #[error("{what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    /// PostgreSQL refused or failed a query.
    #[error("PostgreSQL: {what}: {cause}")]
    Database { what: String, cause: sqlx::Error },
    /// The fake Kubernetes API server failed.
    #[error("fake Kubernetes API server: {0}")]
    Kube(#[from] fake_kube::Error),
    /// An HTTP call did not get an answer.
    #[error("HTTP {what}: {cause}")]
    Http { what: String, cause: reqwest::Error },
    /// A WebSocket failed below the API's own answers.
    #[error("WebSocket {what}: {cause}")]
    WebSocket {
        what: String,
        cause: Box<tokio_tungstenite::tungstenite::Error>,
    },
    /// A child process ended when it should have been running.
    #[error("{process} exited ({status}) before {during}; its log: {}", log.display())]
    Exited {
        process: String,
        status: String,
        during: String,
        log: PathBuf,
    },
    /// A condition did not hold in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout { what: String, waited: Duration },
    /// An answer did not have the shape docs/api.md promises.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// A scenario ran to its end and found broken invariants.
    #[error("{scenario}: invariants violated (run dir {}):\n{details}", run_dir.display())]
    Violated {
        scenario: &'static str,
        details: String,
        run_dir: PathBuf,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            cause,
        }
    }

    pub(crate) fn db(what: impl Into<String>, cause: sqlx::Error) -> Self {
        Self::Database {
            what: what.into(),
            cause,
        }
    }

    pub(crate) fn http(what: impl Into<String>, cause: reqwest::Error) -> Self {
        Self::Http {
            what: what.into(),
            cause,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

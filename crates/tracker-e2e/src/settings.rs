//! Where the real services are, and the timing the processes under test get.

use std::time::Duration;

/// Default seed nodes of the throwaway cluster of `scripts/redis-cluster.sh`.
pub const DEFAULT_CLUSTER_URLS: &str =
    "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103";
/// Default PostgreSQL server (the database in it is only used to create the run's own).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The real servers a run uses, from the same variables as the rest of the test suite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Services {
    /// Redis Cluster seed nodes (`TRACKER_TEST_CLUSTER_URLS`).
    pub cluster_urls: Vec<String>,
    /// A PostgreSQL URL (`DATABASE_URL`); the run creates and drops its own database next to it.
    pub database_url: String,
}

impl Services {
    /// From `TRACKER_TEST_CLUSTER_URLS` and `DATABASE_URL`, with the suite's defaults.
    pub fn from_env() -> Self {
        let urls = std::env::var("TRACKER_TEST_CLUSTER_URLS")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_CLUSTER_URLS.to_owned());
        Self {
            cluster_urls: urls
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            database_url: std::env::var("DATABASE_URL")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
        }
    }
}

/// The timing every process of a run gets. Short, so that expiry, hibernation and takeover
/// happen within seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// `TRACKER_HEARTBEAT_INTERVAL` (also the WebSocket ping period).
    pub heartbeat_interval: Duration,
    /// `TRACKER_HEARTBEAT_WINDOW`.
    pub heartbeat_window: Duration,
    /// `TRACKER_SWEEP_INTERVAL`.
    pub sweep_interval: Duration,
    /// `TRACKER_LEASE_DURATION`.
    pub lease_duration: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_window: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            lease_duration: Duration::from_secs(3),
        }
    }
}

impl Timing {
    /// The documented bound (docs/api.md) for a dead connection to be archived: window +
    /// sweep + 1 s.
    pub fn expiry_bound(&self) -> Duration {
        self.heartbeat_window + self.sweep_interval + Duration::from_secs(1)
    }
}

/// A duration in the humantime form the binaries parse (`1500ms`).
pub fn humantime(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_in_milliseconds() {
        assert_eq!(humantime(Duration::from_secs(3)), "3000ms");
        assert_eq!(humantime(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn the_expiry_bound_is_the_documented_one() {
        let t = Timing::default();
        assert_eq!(t.expiry_bound(), Duration::from_millis(3500));
    }
}

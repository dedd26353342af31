//! Test support shared by the workspace's integration tests (feature `testing`).
//!
//! Every test gets its own random key prefix, so tests share one Redis and one
//! Redis Cluster without seeing each other. The servers come from
//! `TRACKER_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`) and
//! `TRACKER_TEST_CLUSTER_URLS` (default: the ports of `scripts/redis-cluster.sh`).
//! A server that does not answer fails the test loudly: a skipped test proves nothing.

use std::time::Duration;

use crate::store::{RedisMode, Store, StoreConfig};

/// Which Redis a test runs against; most tests run against both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Standalone,
    Cluster,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Standalone, Backend::Cluster];

    /// The URLs and mode of this backend, from the environment.
    pub fn urls(self) -> (Vec<String>, RedisMode) {
        match self {
            Backend::Standalone => (
                vec![std::env::var("TRACKER_TEST_REDIS_URL")
                    .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())],
                RedisMode::Standalone,
            ),
            Backend::Cluster => (
                std::env::var("TRACKER_TEST_CLUSTER_URLS")
                    .unwrap_or_else(|_| {
                        "redis://127.0.0.1:7101,redis://127.0.0.1:7102,redis://127.0.0.1:7103"
                            .into()
                    })
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                RedisMode::Cluster,
            ),
        }
    }
}

/// A unique key prefix for one test.
pub fn random_prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// A store config for `backend` with a fresh prefix, few shards (fan-out calls
/// stay cheap) and the given heartbeat window.
pub fn config(backend: Backend, window: Duration) -> StoreConfig {
    let (urls, mode) = backend.urls();
    let mut cfg = StoreConfig::new(urls, mode);
    cfg.key_prefix = random_prefix();
    cfg.shards = 4;
    cfg.heartbeat_window = window;
    cfg
}

/// Connects and proves the server answers, or panics with what to run.
pub async fn connect(cfg: &StoreConfig) -> Store {
    let store = match Store::connect(cfg).await {
        Ok(s) => s,
        Err(e) => panic!("{}", unreachable_message(cfg, &e)),
    };
    if let Err(e) = store.ping().await {
        panic!("{}", unreachable_message(cfg, &e));
    }
    store
}

fn unreachable_message(cfg: &StoreConfig, e: &crate::Error) -> String {
    format!(
        "test Redis ({:?} at {}) is not reachable: {e}. Run the suite with scripts/test.sh, \
         which starts Redis and the Redis Cluster.",
        cfg.mode,
        cfg.urls.join(",")
    )
}

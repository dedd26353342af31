//! Settings of the API process (CONTRACT.md §1): every one an environment
//! variable with an equal `--flag`, durations in humantime form.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tracker_core::{Limits, StoreConfig};
use tracker_runtime::{positive_duration, LogFormat, RedisArgs};

/// How bearer tokens are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// HS256 JWTs signed with `TRACKER_JWT_SECRET`.
    Jwt,
    /// Every request is an admin: for local runs only.
    Disabled,
}

/// Everything `tracker-api` can be told at start.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "tracker-api",
    version,
    about = "Connection tracker API replica"
)]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// PostgreSQL, for the history endpoint (503 without it).
    #[arg(long, env = "TRACKER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// HTTP and WebSocket listener.
    #[arg(long, env = "TRACKER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// A second listener for `/metrics`, `/healthz` and `/readyz`; by default
    /// they are served on the API port only.
    #[arg(long, env = "TRACKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// HS256 key of bearer tokens (its UTF-8 bytes, as given).
    #[arg(long, env = "TRACKER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    #[arg(long, env = "TRACKER_AUTH", value_enum, default_value = "jwt")]
    pub auth: AuthMode,

    /// What clients are told to use; the WebSocket ping period.
    #[arg(long, env = "TRACKER_HEARTBEAT_INTERVAL", default_value = "20s", value_parser = positive_duration)]
    pub heartbeat_interval: Duration,

    /// A connection with no heartbeat for this long is dead.
    #[arg(long, env = "TRACKER_HEARTBEAT_WINDOW", default_value = "60s", value_parser = positive_duration)]
    pub heartbeat_window: Duration,

    /// Live connections a session may have (0 = no limit).
    #[arg(long, env = "TRACKER_MAX_CONNECTIONS_PER_SESSION", default_value_t = 0)]
    pub max_connections_per_session: u32,

    /// Live connections a user may have over all sessions (0 = no limit).
    #[arg(long, env = "TRACKER_MAX_CONNECTIONS_PER_USER", default_value_t = 0)]
    pub max_connections_per_user: u32,

    /// How long a shutdown may take before the process exits anyway; keep it
    /// below the pod's termination grace period.
    #[arg(long, env = "TRACKER_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = positive_duration)]
    pub shutdown_timeout: Duration,

    #[arg(long, env = "TRACKER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// A setting that parses but makes no sense together with the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("TRACKER_JWT_SECRET is required unless TRACKER_AUTH=disabled")]
    MissingJwtSecret,
    #[error("TRACKER_HEARTBEAT_INTERVAL ({interval:?}) must be shorter than TRACKER_HEARTBEAT_WINDOW ({window:?})")]
    IntervalNotBelowWindow {
        interval: Duration,
        window: Duration,
    },
    #[error("{0}")]
    Redis(String),
}

impl Config {
    /// Checks what clap cannot: settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth == AuthMode::Jwt && self.jwt_secret.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::MissingJwtSecret);
        }
        if self.heartbeat_interval >= self.heartbeat_window {
            return Err(ConfigError::IntervalNotBelowWindow {
                interval: self.heartbeat_interval,
                window: self.heartbeat_window,
            });
        }
        self.redis.validate().map_err(ConfigError::Redis)
    }

    /// The store settings these flags describe.
    pub fn store_config(&self) -> StoreConfig {
        self.redis.store_config(self.heartbeat_window)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            per_session: self.max_connections_per_session,
            per_user: self.max_connections_per_user,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tracker-api").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cfg = parse(&["--jwt-secret", "s"]).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(cfg.heartbeat_window, Duration::from_secs(60));
        assert_eq!(cfg.redis.redis_shards, 32);
        assert_eq!(cfg.redis.redis_timeout, Duration::from_secs(2));
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(cfg.auth, AuthMode::Jwt);
        assert_eq!(cfg.limits(), Limits::default());
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--heartbeat-window", "soon"][..],
            &["--heartbeat-window", "0s"],
            &["--redis-mode", "sentinel"],
            &["--redis-shards", "0"],
            &["--listen", "nowhere"],
            &["--auth", "maybe"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn jwt_needs_a_secret_and_the_interval_fits_the_window() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.validate(), Err(ConfigError::MissingJwtSecret));
        let cfg = parse(&["--auth", "disabled"]).unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        let cfg = parse(&["--auth", "disabled", "--heartbeat-interval", "2m"]).unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::IntervalNotBelowWindow { .. })
        ));
    }

    #[test]
    fn cluster_seeds_are_split() {
        let cfg = parse(&["--redis-url", "redis://a:1, redis://b:2,"]).unwrap();
        assert_eq!(cfg.redis.urls(), ["redis://a:1", "redis://b:2"]);
    }
}

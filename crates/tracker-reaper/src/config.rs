//! Settings: every one an environment variable with an equal `--flag`
//!, durations in humantime form.
//!
//! Parsing is clap's; [`Config::validate`] adds the checks that span several
//! settings. Both fail with one line, which `main` prints before exiting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tracker_core::StoreConfig;
pub use tracker_runtime::{first_line, LogFormat, RedisArgs, Secret};

use crate::error::{Error, Result};

/// Where the reaper acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Platform {
    /// Watch and patch Session resources.
    Kubernetes,
    /// Decide and record only; no Session is read or changed.
    None,
    /// Sessions are declared through the API (`PUT /v1/sessions/{id}`);
    /// hibernate and wake are published to NATS for a controller to carry out.
    Docker,
}

impl Platform {
    /// The name events and logs carry.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Kubernetes => "kubernetes",
            Platform::None => "none",
            Platform::Docker => "docker",
        }
    }
}

/// How the single acting replica is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Election {
    /// A `coordination.k8s.io/v1` Lease.
    Kubernetes,
    /// A token-checked lock key in Redis, for runs without a cluster.
    Redis,
}

/// The reaper's settings.
#[derive(Debug, Clone, Parser)]
#[command(name = "tracker-reaper", version, about)]
pub struct Config {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// PostgreSQL URL (required).
    #[arg(long, env = "TRACKER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Secret,

    /// `/metrics`, `/healthz`, `/readyz`.
    #[arg(long, env = "TRACKER_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// A connection with no heartbeat for this long is dead; also the guard
    /// period after a leader change or a Redis data loss.
    #[arg(long, env = "TRACKER_HEARTBEAT_WINDOW", default_value = "60s", value_parser = humantime::parse_duration)]
    pub heartbeat_window: Duration,

    /// How often expired connections are collected.
    #[arg(long, env = "TRACKER_SWEEP_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// Idle timeout of a Session without `spec.idleTimeout`.
    #[arg(long, env = "TRACKER_DEFAULT_IDLE_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub default_idle_timeout: Duration,

    /// `kubernetes`, `docker` (sessions declared through the API, acted on
    /// by a controller listening to NATS) or `none` (decide and record, act
    /// on nothing).
    #[arg(long, env = "TRACKER_PLATFORM", value_enum, default_value_t = Platform::Kubernetes)]
    pub platform: Platform,

    /// NATS server of the session events; required with `docker`, optional
    /// otherwise (then hibernate, wake and warning events are also published).
    #[arg(long, env = "TRACKER_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<Secret>,

    /// Upper bound of every NATS call (connect, publish and its acknowledgement).
    #[arg(long, env = "TRACKER_NATS_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,

    /// Decide, log, count and record events, but change no Session.
    #[arg(long, env = "TRACKER_DRY_RUN", default_value_t = false, action = clap::ArgAction::Set)]
    pub dry_run: bool,

    /// Do not apply `migrations/` at start.
    #[arg(long, env = "TRACKER_SKIP_MIGRATIONS", default_value_t = false, action = clap::ArgAction::Set)]
    pub skip_migrations: bool,

    /// `kubernetes` (a Lease) or `redis` (a lock key).
    #[arg(long, env = "TRACKER_ELECTION", value_enum, default_value_t = Election::Kubernetes)]
    pub election: Election,

    /// Namespace of the Session resources and of the Lease.
    #[arg(long, env = "TRACKER_NAMESPACE", default_value = "streamspace")]
    pub namespace: String,

    /// Name of the Lease (or of the Redis lock).
    #[arg(long, env = "TRACKER_LEASE_NAME", default_value = "tracker-reaper")]
    pub lease_name: String,

    /// How long a leader holds the lease without renewing it.
    #[arg(long, env = "TRACKER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// Holder identity; defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// How often pending wakes are polled.
    #[arg(long, env = "TRACKER_WAKE_INTERVAL", default_value = "25ms", value_parser = humantime::parse_duration)]
    pub wake_interval: Duration,

    /// How often idle sessions are looked for.
    #[arg(long, env = "TRACKER_HIBERNATE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub hibernate_interval: Duration,

    /// New history is signalled; every shard's outbox is also read every
    /// `archiver::BACKSTOP_POLLS` intervals in case a signal was lost.
    #[arg(long, env = "TRACKER_ARCHIVE_INTERVAL", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub archive_interval: Duration,

    /// Upper bound of every Kubernetes call but the watch.
    #[arg(long, env = "TRACKER_KUBE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub kube_timeout: Duration,

    /// History older than this is dropped, a month at a time; `0` keeps it for ever.
    #[arg(long, env = "TRACKER_HISTORY_RETENTION", default_value = "400d", value_parser = humantime::parse_duration)]
    pub history_retention: Duration,

    /// `text` or `json`.
    #[arg(long, env = "TRACKER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// The documented defaults with `database_url`, ignoring the environment:
    /// what tests and embedders start from.
    pub fn with_database_url(database_url: &str) -> Result<Self> {
        Self::parse_without_env(["--database-url", database_url])
            .map_err(|e| Error::Config(first_line(&e)))
    }

    /// Parses `args` (without the program name) and no environment variable.
    pub fn parse_without_env<'a>(
        args: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, clap::Error> {
        let mut cmd = <Self as clap::CommandFactory>::command();
        let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
        for id in ids {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&str>));
        }
        let argv = std::iter::once("tracker-reaper").chain(args);
        let matches = cmd.try_get_matches_from(argv)?;
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    /// Checks that span settings; the error is one line.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        self.redis.validate().map_err(Error::Config)?;
        if self.database_url.expose().trim().is_empty() {
            return bad("TRACKER_DATABASE_URL is required".into());
        }
        for (name, d) in [
            ("TRACKER_REDIS_TIMEOUT", self.redis.redis_timeout),
            ("TRACKER_HEARTBEAT_WINDOW", self.heartbeat_window),
            ("TRACKER_SWEEP_INTERVAL", self.sweep_interval),
            ("TRACKER_DEFAULT_IDLE_TIMEOUT", self.default_idle_timeout),
            ("TRACKER_WAKE_INTERVAL", self.wake_interval),
            ("TRACKER_HIBERNATE_INTERVAL", self.hibernate_interval),
            ("TRACKER_ARCHIVE_INTERVAL", self.archive_interval),
            ("TRACKER_KUBE_TIMEOUT", self.kube_timeout),
            ("TRACKER_NATS_TIMEOUT", self.nats_timeout),
        ] {
            if d.is_zero() {
                return bad(format!("{name} must be positive"));
            }
        }
        // The Lease object counts whole seconds, and a third of the lease is the renew period.
        if self.lease_duration < Duration::from_secs(1) {
            return bad("TRACKER_LEASE_DURATION must be at least 1s".into());
        }
        if self.platform == Platform::Docker && self.nats_url().is_none() {
            return bad("TRACKER_PLATFORM=docker needs TRACKER_NATS_URL".into());
        }
        if self.namespace.is_empty() || self.lease_name.is_empty() {
            return bad("TRACKER_NAMESPACE and TRACKER_LEASE_NAME may not be empty".into());
        }
        Ok(())
    }

    /// The NATS URL, if one is set (an empty value is none).
    pub fn nats_url(&self) -> Option<&str> {
        self.nats_url
            .as_ref()
            .map(Secret::expose)
            .filter(|u| !u.trim().is_empty())
    }

    /// The history retention; `None` keeps history for ever.
    pub fn retention(&self) -> Option<Duration> {
        (!self.history_retention.is_zero()).then_some(self.history_retention)
    }

    /// What the core store needs.
    pub fn store_config(&self) -> StoreConfig {
        self.redis.store_config(self.heartbeat_window)
    }

    /// Who we are in the election: `POD_NAME`, else the host name.
    pub fn identity(&self) -> String {
        if let Some(name) = self.pod_name.as_deref().filter(|s| !s.is_empty()) {
            return name.to_owned();
        }
        hostname()
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tracker-reaper".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::parse_without_env(args.iter().copied())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cfg = parse(&["--database-url", "postgres://x"]).unwrap();
        assert_eq!(cfg.redis.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(cfg.redis.redis_mode, tracker_core::RedisMode::Standalone);
        assert_eq!(cfg.redis.key_prefix, "trk");
        assert_eq!(cfg.redis.redis_shards, 32);
        assert_eq!(cfg.redis.redis_timeout, Duration::from_secs(2));
        assert_eq!(cfg.metrics_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(cfg.heartbeat_window, Duration::from_secs(60));
        assert_eq!(cfg.sweep_interval, Duration::from_secs(5));
        assert_eq!(cfg.default_idle_timeout, Duration::from_secs(1800));
        assert_eq!(cfg.platform, Platform::Kubernetes);
        assert!(!cfg.dry_run);
        assert!(!cfg.skip_migrations);
        assert_eq!(cfg.election, Election::Kubernetes);
        assert_eq!(cfg.namespace, "streamspace");
        assert_eq!(cfg.lease_name, "tracker-reaper");
        assert_eq!(cfg.lease_duration, Duration::from_secs(15));
        assert_eq!(cfg.log_format, LogFormat::Text);
        assert_eq!(cfg.retention(), Some(Duration::from_secs(400 * 86_400)));
        cfg.validate().unwrap();
    }

    #[test]
    fn the_database_url_is_required_and_redacted() {
        let line = first_line(&parse(&[]).unwrap_err());
        assert!(line.contains("--database-url"), "{line}");
        let cfg = parse(&[
            "--database-url",
            "postgres://u:hunter2@h/db",
            "--redis-url",
            "redis://:swordfish@r:6379",
        ])
        .unwrap();
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("swordfish"),
            "{debug}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_one_line() {
        for args in [
            &["--database-url", "x", "--sweep-interval", "soon"][..],
            &["--database-url", "x", "--redis-mode", "sentinel"],
            &["--database-url", "x", "--platform", "nomad"],
            &["--database-url", "x", "--dry-run", "yes please"],
            &["--database-url", "x", "--metrics-listen", "nowhere"],
            &["--database-url", "x", "--history-retention", "a year"],
            &["--database-url", "x", "--history-retention", "400x"],
        ] {
            let err = parse(args).unwrap_err();
            let first = err.to_string();
            let first = first.lines().next().unwrap();
            assert!(
                first.starts_with("error: invalid value"),
                "{args:?}: {first}"
            );
        }
    }

    #[test]
    fn cross_setting_checks() {
        let ok = || parse(&["--database-url", "postgres://x"]).unwrap();
        let mut cfg = ok();
        cfg.sweep_interval = Duration::ZERO;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("TRACKER_SWEEP_INTERVAL"));
        let mut cfg = ok();
        cfg.redis.redis_url = "redis://a,redis://b".into();
        assert!(cfg.validate().is_err());
        cfg.redis.redis_mode = tracker_core::RedisMode::Cluster;
        cfg.validate().unwrap();
        assert_eq!(cfg.redis.urls(), ["redis://a", "redis://b"]);
        let mut cfg = ok();
        cfg.redis.key_prefix = "a{b".into();
        assert!(cfg.validate().is_err());
        let mut cfg = ok();
        cfg.lease_duration = Duration::from_millis(500);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn docker_needs_a_nats_url() {
        let cfg = parse(&["--database-url", "x", "--platform", "docker"]).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("TRACKER_NATS_URL"), "{err}");
        let cfg = parse(&[
            "--database-url",
            "x",
            "--platform",
            "docker",
            "--nats-url",
            "nats://u:hunter2@127.0.0.1:4222",
        ])
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.platform, Platform::Docker);
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert_eq!(cfg.nats_timeout, Duration::from_secs(5));
    }

    #[test]
    fn booleans_take_true_and_false() {
        let cfg = parse(&[
            "--database-url",
            "x",
            "--dry-run",
            "true",
            "--skip-migrations",
            "true",
        ])
        .unwrap();
        assert!(cfg.dry_run && cfg.skip_migrations);
    }

    #[test]
    fn a_zero_retention_keeps_history_for_ever() {
        let cfg = parse(&["--database-url", "x", "--history-retention", "0"]).unwrap();
        assert_eq!(cfg.retention(), None);
        let cfg = parse(&["--database-url", "x", "--history-retention", "90d"]).unwrap();
        assert_eq!(cfg.retention(), Some(Duration::from_secs(90 * 86_400)));
    }

    #[test]
    fn identity_prefers_the_pod_name() {
        let mut cfg = parse(&["--database-url", "x"]).unwrap();
        cfg.pod_name = Some("reaper-0".into());
        assert_eq!(cfg.identity(), "reaper-0");
        cfg.pod_name = None;
        assert!(!cfg.identity().is_empty());
    }
}

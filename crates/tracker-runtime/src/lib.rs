//! Process plumbing shared by `tracker-api` and `tracker-reaper`, kept out of
//! `tracker-core` (which knows no CLI, HTTP or metrics exposition) and
//! written once here rather than once per binary:
//!
//! - the Redis settings both binaries take ([`RedisArgs`]), [`Secret`] for
//!   settings that must never reach a log, start-up errors as one line
//!   ([`parse_settings`], [`first_line`]);
//! - logging setup ([`init_telemetry`]) and the shutdown signal
//!   ([`cancel_on_signal`]);
//! - [`metrics`]: the one metrics stack (`prometheus-client`, a registry per
//!   instance) and [`label_enum!`] for bounded label values;
//! - [`ops`]: `/metrics`, `/healthz` and `/readyz`, the same in both binaries;
//! - [`service`]: the whole of a binary's `main` ([`service::main`]).

pub mod http;
pub mod metrics;
pub mod ops;
pub mod service;

use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracker_core::{KeySpace, RedisMode, StoreConfig};

/// A secret setting (a key, a URL with a password): `Debug` prints it
/// redacted, so a config dumped into a log gives nothing away.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

pub use tracker_core::redact_url;

/// The Redis settings of both binaries. Both must agree on all of them, the
/// shard count above all: it is part of the data layout.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// One Redis URL, or comma-separated seed nodes in cluster mode. A
    /// password in it never shows in `--help` or in logs.
    #[arg(
        long,
        env = "TRACKER_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis_url: String,

    /// `standalone` or `cluster` (Redis Cluster).
    #[arg(long, env = "TRACKER_REDIS_MODE", default_value = "standalone", value_parser = parse_redis_mode)]
    pub redis_mode: RedisMode,

    /// Prefix of every Redis key.
    #[arg(long, env = "TRACKER_KEY_PREFIX", default_value = "trk")]
    pub key_prefix: String,

    /// Shards of the global indexes in Redis. Part of the data layout: every
    /// API and reaper replica of one deployment must use the same value.
    #[arg(long, env = "TRACKER_REDIS_SHARDS", default_value_t = StoreConfig::DEFAULT_SHARDS,
          value_parser = clap::value_parser!(u16).range(1..=16384))]
    pub redis_shards: u16,

    /// Upper bound of every Redis call, reconnects included.
    #[arg(long, env = "TRACKER_REDIS_TIMEOUT", default_value = "2s", value_parser = positive_duration)]
    pub redis_timeout: Duration,

    /// How long Redis keeps refusing the id of an ended connection. A reuse
    /// after that is still caught when its history row is archived (it goes
    /// to connection_history_rejects). Costs about 130 bytes per ended
    /// connection while kept.
    #[arg(long, env = "TRACKER_CONNECTION_ID_RETENTION", default_value = "7d", value_parser = positive_duration)]
    pub connection_id_retention: Duration,

    /// How long before a forced hibernation (a Session's max session
    /// duration) its WebSocket clients are warned. Recorded with each
    /// Session, so the reaper (which decides the warning) and the API (which
    /// declares sessions) must agree; `0s` warns no one.
    #[arg(long, env = "TRACKER_WARN_BEFORE", default_value = "5m", value_parser = duration)]
    pub warn_before: Duration,
}

// By hand: the URL may carry a password.
impl fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls().iter().map(|u| redact_url(u)).collect();
        f.debug_struct("RedisArgs")
            .field("redis_url", &urls.join(","))
            .field("redis_mode", &self.redis_mode)
            .field("key_prefix", &self.key_prefix)
            .field("redis_shards", &self.redis_shards)
            .field("redis_timeout", &self.redis_timeout)
            .field("connection_id_retention", &self.connection_id_retention)
            .field("warn_before", &self.warn_before)
            .finish()
    }
}

impl RedisArgs {
    /// The URLs, split on commas.
    pub fn urls(&self) -> Vec<String> {
        self.redis_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks what clap cannot; the error is one line naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        KeySpace::new(&self.key_prefix, self.redis_shards)
            .map_err(|e| format!("TRACKER_KEY_PREFIX: {e}"))?;
        match (self.redis_mode, self.urls().len()) {
            (_, 0) => Err("TRACKER_REDIS_URL: at least one URL is needed".into()),
            (RedisMode::Standalone, n) if n > 1 => {
                Err("TRACKER_REDIS_URL: standalone mode takes exactly one URL".into())
            }
            _ => Ok(()),
        }
    }

    /// What the store needs, with the process's heartbeat window.
    pub fn store_config(&self, heartbeat_window: Duration) -> StoreConfig {
        let mut cfg = StoreConfig::new(self.urls(), self.redis_mode);
        cfg.key_prefix = self.key_prefix.clone();
        cfg.shards = self.redis_shards;
        cfg.heartbeat_window = heartbeat_window;
        cfg.command_timeout = self.redis_timeout;
        cfg.connect_timeout = self.redis_timeout;
        cfg.ended_id_retention = self.connection_id_retention;
        cfg.warn_before = self.warn_before;
        cfg
    }
}

fn parse_redis_mode(s: &str) -> Result<RedisMode, String> {
    s.parse()
        .map_err(|_| "expected standalone or cluster".to_owned())
}

/// A humantime duration that is not zero (`500ms`, `20s`, `30m`).
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// A humantime duration, zero allowed (`0s`, `90s`, `5m`).
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Log line format (`TRACKER_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`).
/// Colours only on a terminal, so files and log collectors get plain text.
/// A second call (tests) is a no-op.
pub fn init_telemetry(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Parses the settings, or says in one line on stderr what is wrong and
/// returns the exit code (2). `--help` and `--version` print and exit.
pub fn parse_settings<C: Parser>(binary: &str) -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(cfg) => Ok(cfg),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("{binary}: {}", first_line(&e));
            Err(ExitCode::from(2))
        }
    }
}

/// A clap error as one line: its first paragraph (the value or argument at
/// fault, and the possible values), without the usage and help hints.
pub fn first_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let paragraph: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = paragraph.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_owned()
}

/// Cancels `token` on SIGTERM or SIGINT (Ctrl-C).
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_make_a_valid_store_config() {
        let cli = parse(&[]).expect("defaults parse");
        assert_eq!(cli.redis.validate(), Ok(()));
        let cfg = cli.redis.store_config(Duration::from_secs(60));
        assert_eq!(cfg.urls, vec!["redis://127.0.0.1:6379".to_owned()]);
        assert_eq!(cfg.shards, StoreConfig::DEFAULT_SHARDS);
        assert_eq!(cfg.command_timeout, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_are_one_line_naming_the_setting() {
        let e = parse(&["--redis-mode", "sentinel"]).expect_err("bad mode");
        assert!(!first_line(&e).contains('\n'));
        assert!(first_line(&e).contains("sentinel"), "{}", first_line(&e));
        assert!(parse(&["--redis-shards", "0"]).is_err());
        assert!(parse(&["--redis-timeout", "0s"]).is_err());
        let two = parse(&["--redis-url", "redis://a,redis://b"]).expect("parses");
        assert!(two
            .redis
            .validate()
            .expect_err("two urls")
            .starts_with("TRACKER_REDIS_URL"));
        let braces = parse(&["--key-prefix", "a{b}"]).expect("parses");
        assert!(braces.redis.validate().is_err());
    }

    #[test]
    fn passwords_stay_out_of_debug_and_help() {
        let cli = parse(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://:hunter2@a:1,redis://user:s3cret@b:2/0",
        ])
        .expect("parses");
        let debug = format!("{cli:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("s3cret"),
            "{debug}"
        );
        assert!(
            debug.contains("a:1") && debug.contains("user:<redacted>@b:2/0"),
            "{debug}"
        );
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(format!("{:?}", Secret::new("k")), "Secret(<redacted>)");
        let arg = <Cli as clap::CommandFactory>::command()
            .get_arguments()
            .find(|a| a.get_id() == "redis_url")
            .map(|a| a.is_hide_env_values_set());
        assert_eq!(arg, Some(true));
    }

    #[test]
    fn cluster_mode_takes_seed_lists() {
        let cli = parse(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://a:1, redis://b:2",
        ])
        .expect("parses");
        assert_eq!(cli.redis.validate(), Ok(()));
        assert_eq!(cli.redis.urls(), vec!["redis://a:1", "redis://b:2"]);
    }
}

//! Settings of the API process: every one an environment variable with an
//! equal `--flag`, durations in humantime form (docs/configuration.md).
//!
//! clap checks each value alone; [`Config::validate`] checks how they fit
//! together, and is called in one place: [`crate::Application::build`] (and
//! its test twin), before anything connects. It answers with what it found
//! out ([`TokenKey`]), so nothing downstream checks the same again.
//!
//! Secrets (`TRACKER_JWT_SECRET`, `TRACKER_DATABASE_URL`, a password in
//! `TRACKER_REDIS_URL`) are kept out of `--help` and print redacted in
//! `Debug`, so dumping the config never leaks them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use tracker_core::{Limits, StoreConfig};
use tracker_runtime::{positive_duration, LogFormat, RedisArgs, Secret};

use crate::auth::JwtRules;

/// Shortest `TRACKER_JWT_SECRET`: HS256 keys shorter than its 256-bit
/// output make brute force cheaper than breaking the hash.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// Peers whose `X-Forwarded-For` is believed (`TRACKER_TRUSTED_PROXIES`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl fmt::Debug for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(ToString::to_string))
            .finish()
    }
}

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated CIDRs; a bare address is a single host; empty is none.
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        format!("{item:?} is not a CIDR (e.g. 10.0.0.0/8) or an IP address")
                    })
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

/// The page origins a WebSocket may come from (`TRACKER_WS_ALLOWED_ORIGINS`);
/// empty: any. Kept lowercase, as browsers send them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins(Vec<String>);

impl AllowedOrigins {
    /// Whether a request with this `Origin` header (if any) may upgrade. A
    /// request without one is not from a browser page, so the list, which
    /// guards against other pages riding a user's credentials, does not apply.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            _ if self.0.is_empty() => true,
            None => true,
            Some(o) => self.0.iter().any(|a| a.eq_ignore_ascii_case(o)),
        }
    }
}

impl FromStr for AllowedOrigins {
    type Err = String;

    /// Comma-separated origins `http(s)://host[:port]`; empty is any.
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                parse_origin(item).ok_or_else(|| {
                    format!("{item:?} is not an origin like https://host or https://host:8443")
                })
            })
            .collect::<Result<_, _>>()
            .map(AllowedOrigins)
    }
}

/// `scheme://host[:port]`, lowercased, or `None`: no path, query, user info
/// or trailing slash, since a browser's `Origin` never has them and an entry
/// with one would never match.
fn parse_origin(item: &str) -> Option<String> {
    let lower = item.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        // An IPv6 literal's colons are inside its brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && (host.starts_with('[') && host.ends_with(']')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    (host_ok && port_ok).then_some(lower)
}

/// How bearer tokens are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// JWTs: HS256 with `TRACKER_JWT_SECRET`, or the algorithm of
    /// `TRACKER_JWT_PUBLIC_KEY_FILE`.
    Jwt,
    /// Every request is an admin: for local runs only.
    Disabled,
}

/// Where sessions come from; the reaper reads the same `TRACKER_PLATFORM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Platform {
    /// Session resources, mirrored by the reaper: `PUT` and `DELETE` of a
    /// session answer 409.
    Kubernetes,
    /// Sessions declared through `PUT /v1/sessions/{id}`, hibernated and
    /// woken by a controller that listens to NATS.
    Docker,
    /// Sessions declared through the API; nothing acts on them.
    None,
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
    pub database_url: Option<Secret>,

    /// HTTP and WebSocket listener.
    #[arg(long, env = "TRACKER_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// A second listener for `/metrics`, `/readyz` and `/openapi.json`
    /// (and `/healthz`); when it differs from TRACKER_LISTEN, the public port
    /// no longer serves them. By default they are served on the API port.
    #[arg(long, env = "TRACKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// HS256 key of bearer tokens (its UTF-8 bytes, as given), at least 32 bytes.
    #[arg(long, env = "TRACKER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// A PEM public key (RSA, EC P-256 or Ed25519): tokens must then be
    /// RS256, ES256 or EdDSA signed with its private key, and HS256 tokens
    /// are refused. TRACKER_JWT_SECRET is then not used.
    #[arg(long, env = "TRACKER_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "TRACKER_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "TRACKER_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long, env = "TRACKER_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// `jwt`, or `disabled` (every request is an admin): only on a loopback TRACKER_LISTEN.
    #[arg(long, env = "TRACKER_AUTH", value_enum, default_value = "jwt")]
    pub auth: AuthMode,

    /// Comma-separated CIDRs of proxies whose X-Forwarded-For is believed;
    /// empty: the client is the TCP peer.
    #[arg(long, env = "TRACKER_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,

    /// A request's head must arrive in full within this once it starts
    /// arriving; the connection is closed otherwise.
    #[arg(long, env = "TRACKER_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_timeout: Duration,

    /// Upper bound of a request, body included (not of an upgraded WebSocket).
    #[arg(long, env = "TRACKER_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration)]
    pub request_timeout: Duration,

    /// A connection with no request in flight is closed after this long
    /// silent; keep it above the idle timeout of the proxy in front.
    #[arg(long, env = "TRACKER_KEEPALIVE_TIMEOUT", default_value = "75s", value_parser = positive_duration)]
    pub keepalive_timeout: Duration,

    /// Open TCP connections of this replica, WebSockets included; more wait
    /// in the listen backlog.
    #[arg(long, env = "TRACKER_MAX_OPEN_CONNECTIONS", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_open_connections: u32,

    /// What clients are told to use; the WebSocket ping period.
    #[arg(long, env = "TRACKER_HEARTBEAT_INTERVAL", default_value = "20s", value_parser = positive_duration)]
    pub heartbeat_interval: Duration,

    /// A connection with no heartbeat for this long is dead.
    #[arg(long, env = "TRACKER_HEARTBEAT_WINDOW", default_value = "60s", value_parser = positive_duration)]
    pub heartbeat_window: Duration,

    /// Live connections a session may have (0 = no limit).
    #[arg(
        long,
        env = "TRACKER_MAX_CONNECTIONS_PER_SESSION",
        default_value_t = 100
    )]
    pub max_connections_per_session: u32,

    /// Live connections a user may have over all sessions (0 = no limit).
    #[arg(long, env = "TRACKER_MAX_CONNECTIONS_PER_USER", default_value_t = 50)]
    pub max_connections_per_user: u32,

    /// Open WebSockets a plain user may hold on this replica (0 = no limit);
    /// service and admin tokens are not counted.
    #[arg(long, env = "TRACKER_MAX_WEBSOCKETS_PER_USER", default_value_t = 50)]
    pub max_websockets_per_user: u32,

    /// Comma-separated page origins (`https://host[:port]`) a WebSocket may
    /// come from; others get 403 before the upgrade. Empty: any origin.
    #[arg(long, env = "TRACKER_WS_ALLOWED_ORIGINS", default_value = "")]
    pub ws_allowed_origins: AllowedOrigins,

    /// Life of a WebSocket ticket, at most 30s. Hidden: tests shorten it;
    /// nothing in a deployment needs to.
    #[arg(long, hide = true, default_value = "30s", value_parser = ticket_ttl)]
    pub ws_ticket_ttl: Duration,

    /// `kubernetes` (sessions are Session resources), `docker` or `none`
    /// (sessions are declared with `PUT /v1/sessions/{id}`). Give the API
    /// and the reaper the same value.
    #[arg(
        long,
        env = "TRACKER_PLATFORM",
        value_enum,
        default_value = "kubernetes"
    )]
    pub platform: Platform,

    /// Idle timeout of a declared session whose declaration names none (the
    /// reaper's setting of the same name plays this role for Session resources).
    #[arg(long, env = "TRACKER_DEFAULT_IDLE_TIMEOUT", default_value = "30m", value_parser = positive_duration)]
    pub default_idle_timeout: Duration,

    /// How long a shutdown may take before the process exits anyway; keep it
    /// below the pod's termination grace period.
    #[arg(long, env = "TRACKER_SHUTDOWN_TIMEOUT", default_value = "20s", value_parser = positive_duration)]
    pub shutdown_timeout: Duration,

    #[arg(long, env = "TRACKER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Longest life of a WebSocket ticket: it only bridges fetching it and
/// opening the socket.
pub const MAX_TICKET_TTL: Duration = Duration::from_secs(30);

fn ticket_ttl(s: &str) -> Result<Duration, String> {
    let d = positive_duration(s)?;
    if d > MAX_TICKET_TTL {
        return Err("a ticket lives at most 30s".into());
    }
    Ok(d)
}

/// How bearer tokens are checked, as the validated settings say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKey<'a> {
    /// `TRACKER_AUTH=disabled` (on a loopback listener).
    Disabled,
    /// HS256 with `TRACKER_JWT_SECRET`, long enough.
    Secret(&'a Secret),
    /// The key in `TRACKER_JWT_PUBLIC_KEY_FILE` (read when the
    /// authenticator is built).
    PublicKeyFile(&'a Path),
}

/// A setting that parses but makes no sense together with the others.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("TRACKER_JWT_SECRET (or TRACKER_JWT_PUBLIC_KEY_FILE) is required unless TRACKER_AUTH=disabled")]
    MissingJwtSecret,
    #[error("TRACKER_JWT_SECRET is {len} bytes; it must be at least {MIN_JWT_SECRET_BYTES} (e.g. `openssl rand -base64 48`)")]
    ShortJwtSecret { len: usize },
    #[error("TRACKER_JWT_PUBLIC_KEY_FILE {path}: {reason}")]
    PublicKey { path: String, reason: String },
    #[error("TRACKER_AUTH=disabled is only allowed on a loopback TRACKER_LISTEN (127.0.0.1 or ::1), not {listen}")]
    AuthDisabledOffLoopback { listen: SocketAddr },
    #[error("TRACKER_HEARTBEAT_INTERVAL ({interval:?}) must be shorter than TRACKER_HEARTBEAT_WINDOW ({window:?})")]
    IntervalNotBelowWindow {
        interval: Duration,
        window: Duration,
    },
    #[error("{0}")]
    Redis(String),
}

impl Config {
    /// Checks what clap cannot: settings that depend on each other. Returns
    /// how tokens are to be checked, which follows from the same settings.
    pub fn validate(&self) -> Result<TokenKey<'_>, ConfigError> {
        let key = match self.auth {
            AuthMode::Jwt => match (&self.jwt_public_key_file, &self.jwt_secret) {
                (Some(path), _) => TokenKey::PublicKeyFile(path),
                (None, Some(secret)) if secret.expose().len() >= MIN_JWT_SECRET_BYTES => {
                    TokenKey::Secret(secret)
                }
                (None, Some(secret)) if !secret.expose().is_empty() => {
                    return Err(ConfigError::ShortJwtSecret {
                        len: secret.expose().len(),
                    });
                }
                (None, _) => return Err(ConfigError::MissingJwtSecret),
            },
            // Anyone who reaches an unauthenticated API is an admin: only
            // this machine may.
            AuthMode::Disabled if !self.listen.ip().is_loopback() => {
                return Err(ConfigError::AuthDisabledOffLoopback {
                    listen: self.listen,
                });
            }
            AuthMode::Disabled => TokenKey::Disabled,
        };
        if self.heartbeat_interval >= self.heartbeat_window {
            return Err(ConfigError::IntervalNotBelowWindow {
                interval: self.heartbeat_interval,
                window: self.heartbeat_window,
            });
        }
        self.redis.validate().map_err(ConfigError::Redis)?;
        Ok(key)
    }

    /// What tokens must satisfy besides their signature; empty issuer and
    /// audience settings mean none.
    pub fn jwt_rules(&self) -> JwtRules {
        JwtRules {
            leeway: self.jwt_leeway,
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
        }
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

    /// Whether `/metrics`, `/readyz` and `/openapi.json` live on their own
    /// listener, and so not on the public one.
    pub fn separate_ops_listener(&self) -> bool {
        // Port 0 asks for any free port: two of them are two listeners.
        self.metrics_listen
            .is_some_and(|addr| addr != self.listen || addr.port() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tracker-api").chain(args.iter().copied()))
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn allowed_origins_are_checked_at_start() {
        let list: AllowedOrigins =
            " https://App.example.com, http://127.0.0.1:8080,https://[::1]:9443"
                .parse()
                .unwrap();
        assert!(list.allows(Some("https://app.example.com")));
        assert!(list.allows(Some("http://127.0.0.1:8080")));
        assert!(list.allows(Some("https://[::1]:9443")));
        assert!(!list.allows(Some("https://app.example.com:8443")));
        assert!(!list.allows(Some("http://app.example.com")));
        assert!(!list.allows(Some("null")));
        assert!(list.allows(None), "not a browser page");
        assert!(AllowedOrigins::default().allows(Some("https://any.example")));
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://",
            "*",
        ] {
            assert!(bad.parse::<AllowedOrigins>().is_err(), "{bad}");
        }
        assert!(parse(&["--jwt-secret", SECRET, "--ws-allowed-origins", "nope"]).is_err());
        assert!(parse(&["--jwt-secret", SECRET, "--ws-ticket-ttl", "31s"]).is_err());
        let cfg = parse(&["--jwt-secret", SECRET]).unwrap();
        assert_eq!(cfg.ws_ticket_ttl, MAX_TICKET_TTL);
        assert_eq!(cfg.ws_allowed_origins, AllowedOrigins::default());
    }

    #[test]
    fn defaults_follow_the_contract() {
        let cfg = parse(&["--jwt-secret", SECRET]).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(cfg.heartbeat_window, Duration::from_secs(60));
        assert_eq!(cfg.redis.redis_shards, 32);
        assert_eq!(cfg.redis.redis_timeout, Duration::from_secs(2));
        assert_eq!(cfg.shutdown_timeout, Duration::from_secs(20));
        assert_eq!(cfg.auth, AuthMode::Jwt);
        assert_eq!(
            cfg.limits(),
            Limits {
                per_session: 100,
                per_user: 50
            }
        );
        assert_eq!(cfg.max_websockets_per_user, 50);
        assert_eq!(cfg.jwt_leeway, Duration::from_secs(5));
        assert_eq!(cfg.header_timeout, Duration::from_secs(10));
        assert_eq!(cfg.request_timeout, Duration::from_secs(30));
        assert_eq!(cfg.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(cfg.max_open_connections, 20_000);
        assert!(cfg.trusted_proxies.is_empty());
        assert!(!cfg.separate_ops_listener());
        assert!(matches!(cfg.validate(), Ok(TokenKey::Secret(_))));
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
            &["--trusted-proxies", "10.0.0.0/33"],
            &["--trusted-proxies", "proxy.local"],
            &["--header-timeout", "0s"],
            &["--max-open-connections", "0"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn jwt_needs_a_long_secret_and_the_interval_fits_the_window() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.validate(), Err(ConfigError::MissingJwtSecret));
        let cfg = parse(&["--jwt-secret", ""]).unwrap();
        assert_eq!(cfg.validate(), Err(ConfigError::MissingJwtSecret));
        let cfg = parse(&["--jwt-secret", &SECRET[1..]]).unwrap();
        assert_eq!(cfg.validate(), Err(ConfigError::ShortJwtSecret { len: 31 }));
        let cfg = parse(&["--jwt-public-key-file", "/k.pem", "--jwt-secret", "x"]).unwrap();
        assert_eq!(
            cfg.validate(),
            Ok(TokenKey::PublicKeyFile(Path::new("/k.pem")))
        );
        let local = ["--auth", "disabled", "--listen", "127.0.0.1:8080"];
        let cfg = parse(&local).unwrap();
        assert_eq!(cfg.validate(), Ok(TokenKey::Disabled));
        let cfg = parse(&["--auth", "disabled", "--listen", "[::1]:8080"]).unwrap();
        assert_eq!(cfg.validate(), Ok(TokenKey::Disabled));
        let cfg = parse(&["--auth", "disabled"]).unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::AuthDisabledOffLoopback { .. })
        ));
        let cfg = parse(&[&local[..], &["--heartbeat-interval", "2m"]].concat()).unwrap();
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::IntervalNotBelowWindow { .. })
        ));
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let cfg = parse(&["--trusted-proxies", " 10.0.0.0/8, 192.168.1.7 ,fd00::/8,"]).unwrap();
        let p = &cfg.trusted_proxies;
        for ip in ["10.1.2.3", "192.168.1.7", "fd00::1", "::ffff:10.0.0.1"] {
            assert!(p.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["11.0.0.1", "192.168.1.8", "fe80::1"] {
            assert!(!p.contains(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_and_help() {
        let cfg = parse(&[
            "--jwt-secret",
            "hunter2-hunter2-hunter2-hunter2-hunter2",
            "--database-url",
            "postgres://u:swordfish@db/x",
            "--redis-url",
            "redis://:tiger@r:6379",
        ])
        .unwrap();
        let debug = format!("{cfg:?}");
        for secret in ["hunter2", "swordfish", "tiger"] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        let cmd = <Config as clap::CommandFactory>::command();
        for id in ["jwt_secret", "database_url", "redis_url"] {
            let arg = cmd.get_arguments().find(|a| a.get_id() == id);
            assert!(arg.is_some_and(|a| a.is_hide_env_values_set()), "{id}");
        }
    }

    #[test]
    fn cluster_seeds_are_split() {
        let cfg = parse(&["--redis-url", "redis://a:1, redis://b:2,"]).unwrap();
        assert_eq!(cfg.redis.urls(), ["redis://a:1", "redis://b:2"]);
    }
}

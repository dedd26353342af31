//! Environment variables: the documented settings, read by their binary, shared ones equal,
//! secrets from a Secret.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, Secret};

use crate::support::{default_render, one_of, read, repo, sources, value_at, values};
use crate::workloads::{env, env_var, workload, Binary};

/// The settings of docs/configuration.md, by the binary that reads each
/// variable.
pub(crate) const API_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_DATABASE_URL",
    "TRACKER_LISTEN",
    "TRACKER_METRICS_LISTEN",
    "TRACKER_JWT_SECRET",
    "TRACKER_AUTH",
    "TRACKER_HEARTBEAT_INTERVAL",
    "TRACKER_HEARTBEAT_WINDOW",
    "TRACKER_MAX_CONNECTIONS_PER_SESSION",
    "TRACKER_MAX_CONNECTIONS_PER_USER",
    "TRACKER_MAX_WEBSOCKETS_PER_USER",
    "TRACKER_JWT_ISSUER",
    "TRACKER_JWT_AUDIENCE",
    "TRACKER_JWT_LEEWAY",
    "TRACKER_JWT_PUBLIC_KEY_FILE",
    "TRACKER_TRUSTED_PROXIES",
    "TRACKER_HEADER_TIMEOUT",
    "TRACKER_KEEPALIVE_TIMEOUT",
    "TRACKER_REQUEST_TIMEOUT",
    "TRACKER_MAX_OPEN_CONNECTIONS",
    "RUST_LOG",
    "TRACKER_LOG_FORMAT",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_REDIS_TIMEOUT",
    "TRACKER_CONNECTION_ID_RETENTION",
    "TRACKER_WARN_BEFORE",
    "TRACKER_WS_ALLOWED_ORIGINS",
    "TRACKER_PLATFORM",
    "TRACKER_DEFAULT_IDLE_TIMEOUT",
    "TRACKER_SHUTDOWN_TIMEOUT",
];
pub(crate) const REAPER_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_DATABASE_URL",
    "TRACKER_METRICS_LISTEN",
    "TRACKER_HEARTBEAT_WINDOW",
    "TRACKER_SWEEP_INTERVAL",
    "TRACKER_DEFAULT_IDLE_TIMEOUT",
    "TRACKER_PLATFORM",
    "TRACKER_NATS_URL",
    "TRACKER_NATS_TIMEOUT",
    "TRACKER_DRY_RUN",
    "TRACKER_SKIP_MIGRATIONS",
    "TRACKER_ELECTION",
    "TRACKER_NAMESPACE",
    "TRACKER_LEASE_NAME",
    "TRACKER_LEASE_DURATION",
    "TRACKER_WAKE_INTERVAL",
    "TRACKER_HIBERNATE_INTERVAL",
    "TRACKER_ARCHIVE_INTERVAL",
    "TRACKER_KUBE_TIMEOUT",
    "TRACKER_HISTORY_RETENTION",
    "KUBECONFIG",
    "RUST_LOG",
    "TRACKER_LOG_FORMAT",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_REDIS_TIMEOUT",
    "TRACKER_CONNECTION_ID_RETENTION",
    "TRACKER_WARN_BEFORE",
    "POD_NAME",
];
/// Read by libraries (tracing-subscriber, kube), not named in our sources.
pub(crate) const LIBRARY_ENV: &[&str] = &["RUST_LOG", "KUBECONFIG"];

/// Where each plain environment variable's value comes from in `values.yaml`.
pub(crate) const ENV_FROM_VALUES: &[(&str, &str)] = &[
    ("TRACKER_REDIS_URL", "redis.url"),
    ("TRACKER_REDIS_MODE", "redis.mode"),
    ("TRACKER_KEY_PREFIX", "redis.keyPrefix"),
    ("TRACKER_REDIS_SHARDS", "redis.shards"),
    ("TRACKER_REDIS_TIMEOUT", "redis.timeout"),
    (
        "TRACKER_CONNECTION_ID_RETENTION",
        "redis.connectionIdRetention",
    ),
    ("TRACKER_PLATFORM", "platform"),
    (
        "TRACKER_DEFAULT_IDLE_TIMEOUT",
        "sessions.defaultIdleTimeout",
    ),
    ("TRACKER_WARN_BEFORE", "sessions.warnBefore"),
    ("TRACKER_NATS_TIMEOUT", "nats.timeout"),
    ("TRACKER_HEARTBEAT_WINDOW", "heartbeat.window"),
    ("TRACKER_HEARTBEAT_INTERVAL", "heartbeat.interval"),
    ("RUST_LOG", "logging.level"),
    ("TRACKER_LOG_FORMAT", "logging.format"),
    ("TRACKER_AUTH", "api.auth"),
    (
        "TRACKER_MAX_CONNECTIONS_PER_SESSION",
        "api.maxConnectionsPerSession",
    ),
    (
        "TRACKER_MAX_CONNECTIONS_PER_USER",
        "api.maxConnectionsPerUser",
    ),
    (
        "TRACKER_MAX_WEBSOCKETS_PER_USER",
        "api.maxWebsocketsPerUser",
    ),
    ("TRACKER_JWT_ISSUER", "api.jwt.issuer"),
    ("TRACKER_JWT_AUDIENCE", "api.jwt.audience"),
    ("TRACKER_JWT_LEEWAY", "api.jwt.leeway"),
    ("TRACKER_TRUSTED_PROXIES", "api.trustedProxies"),
    ("TRACKER_WS_ALLOWED_ORIGINS", "api.wsAllowedOrigins"),
    ("TRACKER_HEADER_TIMEOUT", "api.headerTimeout"),
    ("TRACKER_KEEPALIVE_TIMEOUT", "api.keepaliveTimeout"),
    ("TRACKER_REQUEST_TIMEOUT", "api.requestTimeout"),
    ("TRACKER_MAX_OPEN_CONNECTIONS", "api.maxOpenConnections"),
    ("TRACKER_SHUTDOWN_TIMEOUT", "api.shutdownTimeout"),
    ("TRACKER_SWEEP_INTERVAL", "reaper.sweepInterval"),
    ("TRACKER_WAKE_INTERVAL", "reaper.wakeInterval"),
    ("TRACKER_HIBERNATE_INTERVAL", "reaper.hibernateInterval"),
    ("TRACKER_ARCHIVE_INTERVAL", "reaper.archiveInterval"),
    ("TRACKER_KUBE_TIMEOUT", "reaper.kubeTimeout"),
    ("TRACKER_HISTORY_RETENTION", "reaper.historyRetention"),
    ("TRACKER_DRY_RUN", "reaper.dryRun"),
    ("TRACKER_SKIP_MIGRATIONS", "reaper.skipMigrations"),
    ("TRACKER_ELECTION", "reaper.election"),
    ("TRACKER_LEASE_NAME", "reaper.lease.name"),
    ("TRACKER_LEASE_DURATION", "reaper.lease.duration"),
];

/// Settings that are part of the shared data layout or semantics: the API
/// and the reaper must get the same value.
pub(crate) const SHARED_ENV: &[&str] = &[
    "TRACKER_REDIS_URL",
    "TRACKER_REDIS_MODE",
    "TRACKER_KEY_PREFIX",
    "TRACKER_REDIS_SHARDS",
    "TRACKER_REDIS_TIMEOUT",
    "TRACKER_CONNECTION_ID_RETENTION",
    "TRACKER_HEARTBEAT_WINDOW",
    "TRACKER_PLATFORM",
    "TRACKER_DEFAULT_IDLE_TIMEOUT",
    "TRACKER_WARN_BEFORE",
    "TRACKER_LOG_FORMAT",
];

#[test]
fn env_vars_are_documented_and_read_by_their_binary() {
    let docs = default_render();
    for binary in [Binary::Api, Binary::Reaper] {
        let (_, c) = workload(&docs, binary);
        assert!(c.env_from.is_none(), "{}: no envFrom", binary.name());
        // Settings both binaries share are parsed in tracker-runtime.
        let src = sources(&repo().join("crates").join(binary.name()).join("src"))
            + &sources(&repo().join("crates/tracker-runtime/src"));
        let mut seen = BTreeSet::new();
        for e in env(&c) {
            assert!(
                seen.insert(&e.name),
                "{}: {} set twice",
                binary.name(),
                e.name
            );
            assert!(
                binary.allowed_env().contains(&e.name.as_str()),
                "{}: {} is not a documented variable of this binary (docs/api.md)",
                binary.name(),
                e.name
            );
            if !LIBRARY_ENV.contains(&e.name.as_str()) {
                assert!(
                    src.contains(&format!("\"{}\"", e.name)),
                    "{}: {} is set but neither crates/{}/src nor tracker-runtime reads it",
                    binary.name(),
                    e.name,
                    binary.name()
                );
            }
        }
    }
}

#[test]
fn shared_settings_are_identical_in_both_deployments() {
    let docs = default_render();
    let (_, api) = workload(&docs, Binary::Api);
    let (_, reaper) = workload(&docs, Binary::Reaper);
    for name in SHARED_ENV {
        let a = env_var(&api, name);
        let r = env_var(&reaper, name);
        assert_eq!(
            serde_json::to_value(a).expect("serializes"),
            serde_json::to_value(r).expect("serializes"),
            "{name} differs between the API and the reaper"
        );
    }
}

#[test]
fn secrets_come_from_a_secret() {
    let docs = default_render();
    let values = values();
    let secret: Secret = one_of(&docs);
    let secret_name = secret.metadata.name.clone().expect("named");
    let key_ref = |c: &Container, name: &str| {
        env_var(c, name)
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.clone())
            .unwrap_or_else(|| panic!("{name} comes from a secretKeyRef"))
    };
    let (_, api) = workload(&docs, Binary::Api);
    let (_, reaper) = workload(&docs, Binary::Reaper);
    let jwt = key_ref(&api, "TRACKER_JWT_SECRET");
    assert_eq!(jwt.name, secret_name);
    assert_eq!(jwt.key, value_at(&values, "secret.keys.jwtSecret"));
    // Auth is always on (the chart refuses api.auth=disabled): never optional.
    assert_ne!(jwt.optional, Some(true), "the JWT secret is required");
    for (c, optional) in [(&api, Some(true)), (&reaper, None)] {
        let db = key_ref(c, "TRACKER_DATABASE_URL");
        assert_eq!(db.name, secret_name);
        assert_eq!(db.key, value_at(&values, "secret.keys.databaseUrl"));
        assert_eq!(db.optional, optional, "{}", c.name);
    }
    // A NATS URL may carry credentials; without nats.url it comes from the
    // Secret, optional since NATS is (but for platform docker).
    assert_eq!(value_at(&values, "nats.url"), "");
    let nats = key_ref(&reaper, "TRACKER_NATS_URL");
    assert_eq!(nats.name, secret_name);
    assert_eq!(nats.key, value_at(&values, "secret.keys.natsUrl"));
    assert_eq!(nats.optional, Some(true), "NATS is optional");
}

/// Where the config structs are parsed: each binary's own, and the Redis
/// settings (`RedisArgs`, in tracker-runtime) that both flatten into theirs.
const CONFIG_SOURCES: &[(Binary, &[&str])] = &[
    (
        Binary::Api,
        &[
            "crates/tracker-api/src/config.rs",
            "crates/tracker-runtime/src/lib.rs",
        ],
    ),
    (
        Binary::Reaper,
        &[
            "crates/tracker-reaper/src/config.rs",
            "crates/tracker-runtime/src/lib.rs",
        ],
    ),
];

/// Variables a binary reads that its rendered Deployment may leave unset.
/// Keep it short: an operator-facing setting the chart cannot set is a bug.
const NOT_IN_DEFAULT_RENDER: &[(&str, &str)] = &[
    // Names a mounted PEM file and replaces the HS256 secret, so it has no
    // neutral value: set only with api.jwt.publicKeyFromSecret (checked below
    // in the template, and rendered by scripts/render-manifests.sh).
    ("TRACKER_JWT_PUBLIC_KEY_FILE", "api-deployment.yaml"),
];

/// The `TRACKER_*` names of the `env = "..."` attributes in `src`.
fn env_attributes(src: &str) -> BTreeSet<String> {
    src.split("env = \"")
        .skip(1)
        .filter_map(|rest| rest.split_once('"').map(|(name, _)| name))
        .filter(|name| name.starts_with("TRACKER_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_setting_the_binaries_read_is_set_by_the_chart() {
    let docs = default_render();
    let templates = repo().join("deploy/helm/tracker/templates");
    for (binary, files) in CONFIG_SOURCES {
        let names: BTreeSet<String> = files
            .iter()
            .map(|f| env_attributes(&read(&repo().join(f))))
            .fold(BTreeSet::new(), |mut all, names| {
                all.extend(names);
                all
            });
        let own = read(&repo().join(files[0]));
        assert!(
            own.contains("#[command(flatten)]\n    pub redis: RedisArgs,"),
            "{}: its Config no longer flattens RedisArgs; update CONFIG_SOURCES",
            binary.name()
        );
        // Guards against a parse that silently finds nothing.
        assert!(
            names.contains("TRACKER_REDIS_URL") && names.contains("TRACKER_LOG_FORMAT"),
            "{}: the env attributes were not found in {files:?}",
            binary.name()
        );
        let (_, c) = workload(&docs, *binary);
        let set: BTreeSet<&str> = env(&c).iter().map(|e| e.name.as_str()).collect();
        for name in &names {
            if let Some((_, template)) = NOT_IN_DEFAULT_RENDER.iter().find(|(n, _)| n == name) {
                let text = read(&templates.join(template));
                assert!(
                    text.contains(&format!("- name: {name}\n")),
                    "{}: templates/{template} cannot set {name}",
                    binary.name()
                );
                continue;
            }
            assert!(
                set.contains(name.as_str()),
                "{}: reads {name}, but the chart's Deployment does not set it: add a value \
                 for it (values.yaml, the template, deploy/README.md)",
                binary.name()
            );
        }
    }
    // No stale entries: each is still read, and still not rendered by default.
    for (name, _) in NOT_IN_DEFAULT_RENDER {
        let read_by_any = CONFIG_SOURCES.iter().any(|(_, files)| {
            files
                .iter()
                .any(|f| env_attributes(&read(&repo().join(f))).contains(*name))
        });
        assert!(
            read_by_any,
            "{name} is read by no binary: drop it from NOT_IN_DEFAULT_RENDER"
        );
        for binary in [Binary::Api, Binary::Reaper] {
            let (_, c) = workload(&docs, binary);
            assert!(
                env(&c).iter().all(|e| e.name != *name),
                "{}: {name} is rendered: drop it from NOT_IN_DEFAULT_RENDER",
                binary.name()
            );
        }
    }
}

//! Redis restarted, data lost. The run gets its own standalone `redis-server` (the shared test
//! servers are never touched) and the processes run with `TRACKER_REDIS_MODE=standalone`.
//!
//! 1. Sessions with a short idle timeout; on each, HTTP clients heartbeat and a WebSocket is
//!    held, spread over the API replicas.
//! 2. The `redis-server` is SIGKILLed. While it is down a prober calls every API replica (the
//!    clients keep calling too): every call must answer 503 `unavailable` within
//!    `max_latency`, `/readyz` must fail, nothing may hang.
//! 3. It is started again on the same port, empty. Clients get 404 on heartbeat (or lose their
//!    WebSocket) and register again; every client's connection must be live again.
//! 4. No `hibernated` patch for any of these sessions from the kill until one heartbeat window
//!    after the restart (the reaper's guard), none at all while a session's clients are at
//!    work; the sessions whose clients stop afterwards must be hibernated later (the guard
//!    ends). Judged from the fake's recorded patches and their receive times.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use self::calls::{judge_outage, lock, probe_outage, save_calls, Calls};
use self::clients::{not_live, spawn_clients, stop_clients, Client};
pub use self::figures::{OutageFigures, RedisRestartFigures};
use super::conclude;
use crate::harness::{Harness, HarnessOptions, RedisTarget};
use crate::redis_server::RedisServer;
use crate::{poll, Error, Result};

mod calls;
mod clients;
mod figures;

/// Size of a Redis-restart run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct RedisRestartParams {
    /// Sessions; the first half keep their clients to the end, the second half's clients stop
    /// once everything has recovered.
    #[arg(long, default_value_t = 40)]
    pub sessions: usize,
    /// HTTP clients per session (each session also has one WebSocket).
    #[arg(long, default_value_t = 3)]
    pub http_per_session: usize,
    /// How long Redis stays down (humantime).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub outage: Duration,
    /// Bound of every API answer while Redis is down (humantime).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub max_latency: Duration,
}

impl RedisRestartParams {
    pub fn short() -> Self {
        Self {
            sessions: 6,
            http_per_session: 2,
            outage: Duration::from_secs(4),
            max_latency: Duration::from_secs(3),
        }
    }

    pub fn full() -> Self {
        Self {
            sessions: 40,
            http_per_session: 3,
            outage: Duration::from_secs(15),
            max_latency: Duration::from_secs(3),
        }
    }
}

/// `spec.idleTimeout` of the sessions once their clients are connected.
pub const IDLE_TIMEOUT: &str = "2s";
/// `spec.idleTimeout` while the clients connect (nothing may be hibernated before).
const SETUP_IDLE_TIMEOUT: &str = "60s";
/// Upper bound of a client task's life (they are stopped long before).
pub(super) const MAX_RUN: Duration = Duration::from_secs(600);

/// Sets every session's `spec.idleTimeout` and waits until the API reports it.
async fn set_idle_timeout(h: &Harness, names: &[String], idle: &str, secs: u64) -> Result<()> {
    for name in names {
        h.create_session(name, Some(idle))?;
    }
    let c = h.client();
    for name in names {
        poll::until(
            Duration::from_secs(20),
            Duration::from_millis(100),
            "the new idle timeout to be mirrored",
            || async {
                let a = c.session(0, name).await?;
                let t = a.body.get("idle_timeout_seconds").and_then(Value::as_u64);
                Ok((t == Some(secs)).then_some(()))
            },
        )
        .await?;
    }
    Ok(())
}

/// Runs the scenario: its own `redis-server`, then a harness in standalone mode against it.
pub async fn run(
    mut opts: HarnessOptions,
    params: RedisRestartParams,
) -> Result<RedisRestartFigures> {
    let dir = std::env::temp_dir().join("tracker-e2e").join(format!(
        "redis-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    ));
    let mut redis = RedisServer::start(&dir).await?;
    eprintln!(
        "tracker-e2e: private redis-server on {} (dir {})",
        redis.url(),
        dir.display()
    );
    opts.redis = RedisTarget::Standalone(redis.url());
    let result = match Harness::start(opts).await {
        Ok(h) => drive(h, &mut redis, params).await,
        Err(e) => Err(e),
    };
    let keep = result.is_err();
    if keep {
        // Its log stays next to the run's; the process is killed on drop.
        eprintln!("tracker-e2e: redis-server logs kept in {}", dir.display());
        redis.kill().await?;
    } else {
        redis.remove().await?;
    }
    result
}

/// When the run's turning points happened; the patches and calls are judged against them.
#[derive(Debug, Clone, Copy)]
struct Timeline {
    /// Every client connected; the short idle timeout is set from here on.
    in_use_from: DateTime<Utc>,
    killed: Instant,
    killed_utc: DateTime<Utc>,
    /// Just before the restart: a call sent earlier was sent while Redis was down.
    restart_begin: Instant,
    restart_utc: DateTime<Utc>,
    /// Redis answers PING again.
    restarted: Instant,
}

/// When the two halves of the sessions stopped being in use.
#[derive(Debug, Clone, Copy)]
struct InUseUntil {
    kept: DateTime<Utc>,
    stopped: DateTime<Utc>,
}

async fn drive(
    mut h: Harness,
    redis: &mut RedisServer,
    params: RedisRestartParams,
) -> Result<RedisRestartFigures> {
    let timing = h.timing();
    let names = create_sessions(&h, params).await?;
    let kept: HashSet<&str> = names[..names.len() / 2]
        .iter()
        .map(String::as_str)
        .collect();
    let calls: Calls = Arc::default();
    let clients = spawn_clients(&h, &names, params, &calls);
    let mut figures = RedisRestartFigures {
        params: Some(params),
        http_clients: params.sessions.max(2) * params.http_per_session,
        websockets: params.sessions.max(2),
        heartbeat_window: timing.heartbeat_window,
        ..RedisRestartFigures::default()
    };
    let in_use_from = connect_all(&h, &names, &clients).await?;
    let t = lose_redis(
        &h,
        redis,
        params,
        &names[0],
        &calls,
        in_use_from,
        &mut figures,
    )
    .await?;
    judge_outage(
        &calls,
        t.killed,
        t.restart_begin,
        params.max_latency,
        &mut figures.outage,
    );
    recover(&h, &clients, &names, t, &mut figures).await?;

    // The stopped half must be hibernated once idle: the guard ends.
    let (mut kept_clients, mut stopped_clients): (Vec<Client>, Vec<Client>) = clients
        .into_iter()
        .partition(|cl| kept.contains(cl.session.as_str()));
    let stopped =
        stop_and_await_hibernation(&h, &mut stopped_clients, &names, &kept, t, &mut figures).await;
    let kept_refs: Vec<&Client> = kept_clients.iter().collect();
    let mut end_missing = not_live(&h, &kept_refs, Duration::from_secs(5)).await?;
    figures.not_live.append(&mut end_missing);
    let until = InUseUntil {
        kept: Utc::now(),
        stopped,
    };
    stop_clients(&mut kept_clients).await;

    judge_patches(&h, &kept, t, until, &mut figures);
    for cl in kept_clients.iter().chain(&stopped_clients) {
        let s = lock(&cl.state);
        figures.registrations += s.registrations;
        figures.heartbeats_404 += s.heartbeats_404;
        figures.websockets_ended_by_server += s.server_ends;
    }
    h.check_running()?;
    if !figures.problems().is_empty() {
        h.keep_run_dir();
        save_calls(&h, &calls);
    }
    conclude(h, "redis-restart", figures).await
}

/// Creates the run's Sessions (at least two) with the long setup idle timeout and waits until
/// they are mirrored.
async fn create_sessions(h: &Harness, params: RedisRestartParams) -> Result<Vec<String>> {
    let names: Vec<String> = (0..params.sessions.max(2))
        .map(|i| format!("e2e-redis-{i:03}"))
        .collect();
    for name in &names {
        h.create_session(name, Some(SETUP_IDLE_TIMEOUT))?;
    }
    h.wait_mirrored(&names, Duration::from_secs(30)).await?;
    Ok(names)
}

/// Waits until every client has registered, then sets the short idle timeout and checks that
/// every client's connection is live. Answers when the sessions were in use from.
async fn connect_all(h: &Harness, names: &[String], clients: &[Client]) -> Result<DateTime<Utc>> {
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        "every client to register",
        || async {
            Ok(clients
                .iter()
                .all(|c| lock(&c.state).cid.is_some())
                .then_some(()))
        },
    )
    .await?;
    let in_use_from = Utc::now();
    set_idle_timeout(h, names, IDLE_TIMEOUT, 2).await?;
    let all: Vec<&Client> = clients.iter().collect();
    let before = not_live(h, &all, Duration::from_secs(5)).await?;
    if !before.is_empty() {
        return Err(Error::Protocol(format!(
            "connections not live before the kill: {before:?}"
        )));
    }
    Ok(in_use_from)
}

/// The loss: SIGKILLs the `redis-server`, probes every API replica for `params.outage`, then
/// starts the server again, empty.
async fn lose_redis(
    h: &Harness,
    redis: &mut RedisServer,
    params: RedisRestartParams,
    probed_session: &str,
    calls: &Calls,
    in_use_from: DateTime<Utc>,
    figures: &mut RedisRestartFigures,
) -> Result<Timeline> {
    redis.kill().await?;
    let killed = Instant::now();
    let killed_utc = Utc::now();
    let (probes, ok) = probe_outage(h, probed_session, killed + params.outage, calls).await?;
    figures.outage.readyz_probes = probes;
    figures.outage.readyz_ok = ok;
    let restart_begin = Instant::now();
    let restart_utc = Utc::now();
    redis.restart().await?;
    let restarted = Instant::now();
    figures.outage.measured = restart_begin - killed;
    eprintln!(
        "tracker-e2e: redis-server down for {:.2?}, back (empty) in {:.2?}",
        restart_begin - killed,
        restarted - restart_begin
    );
    Ok(Timeline {
        in_use_from,
        killed,
        killed_utc,
        restart_begin,
        restart_utc,
        restarted,
    })
}

/// After the restart: how long until every API replica is ready and every client has
/// registered again, whether every client's connection is live, and how many sessions the API
/// knows again.
async fn recover(
    h: &Harness,
    clients: &[Client],
    names: &[String],
    t: Timeline,
    figures: &mut RedisRestartFigures,
) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::http("build the prober", e))?;
    let ready = poll::until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "the API replicas to be ready again",
        || async {
            for i in 0..h.api_count() {
                let Some(addr) = h.api_metrics_addr(i) else {
                    continue;
                };
                let r = http.get(format!("http://{addr}/readyz")).send().await;
                if !matches!(r, Ok(r) if r.status().is_success()) {
                    return Ok(None);
                }
            }
            Ok(Some(t.restarted.elapsed()))
        },
    )
    .await;
    figures.apis_ready_after = ready.ok();
    let recovered = |cl: &Client| {
        lock(&cl.state)
            .registered_at
            .is_some_and(|at| at > t.restart_begin)
    };
    let waited = poll::until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        "every client to register again",
        || async { Ok(clients.iter().all(recovered).then_some(())) },
    )
    .await;
    if waited.is_ok() {
        figures.recovery = clients
            .iter()
            .filter_map(|cl| lock(&cl.state).registered_at)
            .max()
            .map(|at| at - t.restarted);
    }
    figures.not_recovered = clients
        .iter()
        .filter(|cl| !recovered(cl))
        .map(|cl| cl.name.clone())
        .collect();
    let all: Vec<&Client> = clients.iter().collect();
    figures.not_live = not_live(h, &all, Duration::from_secs(5)).await?;
    let c = h.client();
    for name in names {
        let a = c.session(0, name).await?;
        if a.status == 200 && a.body.get("state").and_then(Value::as_str) != Some("unknown") {
            figures.sessions_known_after_restart += 1;
        }
    }
    Ok(())
}

/// Stops the clients of the sessions not `kept` and waits (bounded) until each of those
/// sessions is hibernated; records how long after the restart each was. Answers when the
/// clients stopped.
async fn stop_and_await_hibernation(
    h: &Harness,
    stopped_clients: &mut [Client],
    names: &[String],
    kept: &HashSet<&str>,
    t: Timeline,
    figures: &mut RedisRestartFigures,
) -> DateTime<Utc> {
    let timing = h.timing();
    stop_clients(stopped_clients).await;
    let stopped_utc = Utc::now();
    let stopped_names: Vec<&String> = names
        .iter()
        .filter(|n| !kept.contains(n.as_str()))
        .collect();
    let wait = timing.heartbeat_window * 2 + timing.sweep_interval + Duration::from_secs(15);
    let hibernated = |s: &str| {
        h.state_patches()
            .into_iter()
            .find(|p| p.session == s && p.landed() && p.state == "hibernated" && p.at > stopped_utc)
            .map(|p| p.at)
    };
    let _ = poll::until(
        wait,
        Duration::from_millis(100),
        "the stopped sessions to be hibernated",
        || async {
            Ok(stopped_names
                .iter()
                .all(|s| hibernated(s).is_some())
                .then_some(()))
        },
    )
    .await;
    for s in &stopped_names {
        match hibernated(s) {
            Some(at) => figures
                .stopped_hibernated_after
                .push((at - t.restart_utc).to_std().unwrap_or_default()),
            None => figures.stopped_not_hibernated.push((*s).clone()),
        }
    }
    stopped_utc
}

/// Every landed `hibernated` patch: none from the kill until one heartbeat window after the
/// restart (the guard), none while its session was in use.
fn judge_patches(
    h: &Harness,
    kept: &HashSet<&str>,
    t: Timeline,
    until: InUseUntil,
    figures: &mut RedisRestartFigures,
) {
    let guard_end =
        t.restart_utc + chrono::Duration::from_std(h.timing().heartbeat_window).unwrap_or_default();
    for p in h.state_patches() {
        if !(p.landed() && p.state == "hibernated") {
            continue;
        }
        let line = format!("{} at {}", p.session, p.at);
        if p.at >= t.killed_utc && p.at <= guard_end {
            figures.hibernated_in_guard.push(line.clone());
        }
        let busy_until = if kept.contains(p.session.as_str()) {
            until.kept
        } else {
            until.stopped
        };
        if p.at >= t.in_use_from && p.at <= busy_until {
            figures.hibernated_in_use.push(line);
        }
    }
}

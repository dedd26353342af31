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
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::checks::some;
use super::{exits_line, verdict};
use crate::client::{Answer, ApiClient};
use crate::harness::{Harness, HarnessOptions, RedisTarget};
use crate::redis_server::RedisServer;
use crate::{poll, Error, Result};

/// Size of a Redis-restart run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisRestartParams {
    /// Sessions; the first half keep their clients to the end, the second half's clients stop
    /// once everything has recovered.
    pub sessions: usize,
    /// HTTP clients per session (each session also has one WebSocket).
    pub http_per_session: usize,
    /// How long Redis stays down.
    pub outage: Duration,
    /// Bound of every API answer while Redis is down.
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
const MAX_RUN: Duration = Duration::from_secs(600);

/// Figures of a Redis-restart run.
#[derive(Debug, Clone, Default)]
pub struct RedisRestartFigures {
    pub params: Option<RedisRestartParams>,
    pub http_clients: usize,
    pub websockets: usize,
    /// From the SIGKILL to the restart (the prober finishes its round, so a little over
    /// `params.outage`).
    pub outage_measured: Duration,
    /// API calls (clients and prober, HTTP and WebSocket upgrades) sent while Redis was down.
    pub outage_calls: usize,
    /// `/readyz` probes of the API replicas during the outage, and how many answered 200.
    pub readyz_probes: usize,
    pub readyz_ok: usize,
    pub worst_latency: Duration,
    pub worst_call: String,
    /// Calls answered by something else than 503 `unavailable` (or not at all) during the outage.
    pub wrong_answers: Vec<String>,
    /// Calls slower than `max_latency` during the outage.
    pub slow_calls: Vec<String>,
    /// From the restart (Redis answering PING) until every API replica's `/readyz` is 200.
    pub apis_ready_after: Option<Duration>,
    /// From the restart until every client had registered again.
    pub recovery: Option<Duration>,
    pub not_recovered: Vec<String>,
    /// Registrations over the whole run, and heartbeats answered 404 (data lost).
    pub registrations: usize,
    pub heartbeats_404: usize,
    /// WebSockets the server ended (after the loss).
    pub websockets_ended_by_server: usize,
    /// Clients whose current connection `GET .../connections` did not list (after recovery,
    /// and for the kept sessions at the end).
    pub not_live: Vec<String>,
    /// Sessions the API knew (state not `unknown`) once the clients had recovered.
    pub sessions_known_after_restart: usize,
    pub heartbeat_window: Duration,
    /// Landed `hibernated` patches from the kill until restart + window.
    pub hibernated_in_guard: Vec<String>,
    /// Landed `hibernated` patches while the session's clients were at work.
    pub hibernated_in_use: Vec<String>,
    /// Stopped sessions: time from the restart to their `hibernated` patch.
    pub stopped_hibernated_after: Vec<Duration>,
    pub stopped_not_hibernated: Vec<String>,
    pub exits: String,
    pub unclean_exits: usize,
}

impl RedisRestartFigures {
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut count = |n: usize, what: &str| {
            if n > 0 {
                p.push(format!("{n} {what}"));
            }
        };
        count(self.wrong_answers.len(), "wrong answers during the outage");
        count(self.slow_calls.len(), "slow calls during the outage");
        count(self.readyz_ok, "/readyz answered 200 during the outage");
        count(self.not_recovered.len(), "clients not recovered");
        count(self.not_live.len(), "connections not live");
        count(self.hibernated_in_guard.len(), "hibernations in the guard");
        count(self.hibernated_in_use.len(), "hibernations while in use");
        count(
            self.stopped_not_hibernated.len(),
            "stopped sessions never hibernated",
        );
        count(self.unclean_exits, "unclean exits");
        if !self.stopped_not_hibernated.is_empty() && self.sessions_known_after_restart == 0 {
            p.push(
                "no Session was mirrored again after the loss (the API answers `unknown`), \
                 so none can be hibernated"
                    .into(),
            );
        }
        if self.outage_calls == 0 || self.readyz_probes == 0 {
            p.push("no call was made during the outage".into());
        }
        if self.apis_ready_after.is_none() {
            p.push("an API replica never became ready again".into());
        }
        p
    }
}

impl fmt::Display for RedisRestartFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(params) = self.params else {
            return writeln!(f, "redis-restart: not run");
        };
        let max_hib = self.stopped_hibernated_after.iter().max();
        let min_hib = self.stopped_hibernated_after.iter().min();
        writeln!(
            f,
            "redis-restart: private redis-server SIGKILLed for {:.2?}, restarted empty; {} \
             sessions, {} HTTP clients + {} WebSockets",
            self.outage_measured, params.sessions, self.http_clients, self.websockets
        )?;
        writeln!(
            f,
            "  outage: {} calls, worst latency {:.2?} ({}; bound {:?}); /readyz {} probes, {} \
             answered 200",
            self.outage_calls,
            self.worst_latency,
            self.worst_call,
            params.max_latency,
            self.readyz_probes,
            self.readyz_ok
        )?;
        writeln!(
            f,
            "  wrong answers: {}{}; slow: {}{}",
            self.wrong_answers.len(),
            some(&self.wrong_answers, 5),
            self.slow_calls.len(),
            some(&self.slow_calls, 5)
        )?;
        writeln!(
            f,
            "  after the restart: APIs ready in {}; every client registered again in {} ({} \
             registrations in all, {} heartbeats answered 404, {} WebSockets ended by the \
             server); not recovered: {}{}",
            opt(self.apis_ready_after),
            opt(self.recovery),
            self.registrations,
            self.heartbeats_404,
            self.websockets_ended_by_server,
            self.not_recovered.len(),
            some(&self.not_recovered, 5)
        )?;
        writeln!(
            f,
            "  connections not live: {}{}; sessions known to the API after the restart: {} of {}",
            self.not_live.len(),
            some(&self.not_live, 5),
            self.sessions_known_after_restart,
            params.sessions
        )?;
        writeln!(
            f,
            "  hibernated from the kill to restart + window ({:?}): {}{}; while in use: {}{}",
            self.heartbeat_window,
            self.hibernated_in_guard.len(),
            some(&self.hibernated_in_guard, 5),
            self.hibernated_in_use.len(),
            some(&self.hibernated_in_use, 5)
        )?;
        writeln!(
            f,
            "  stopped sessions hibernated: {} (from the restart: min {}, max {}); never: {}{}",
            self.stopped_hibernated_after.len(),
            opt(min_hib.copied()),
            opt(max_hib.copied()),
            self.stopped_not_hibernated.len(),
            some(&self.stopped_not_hibernated, 5)
        )?;
        writeln!(f, "  exits: {}", self.exits)?;
        let problems = self.problems();
        if problems.is_empty() {
            writeln!(f, "  all invariants held")
        } else {
            writeln!(f, "  problems: {}", problems.join("; "))
        }
    }
}

fn opt(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), |d| format!("{d:.2?}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One API call as a client or the prober saw it.
#[derive(Debug, Clone)]
struct Call {
    sent: Instant,
    latency: Duration,
    what: &'static str,
    replica: usize,
    /// 0: no HTTP answer.
    status: u16,
    code: Option<String>,
}

impl Call {
    fn describe(&self) -> String {
        format!(
            "{} on api-{}: {} {} after {:.2?}",
            self.what,
            self.replica,
            self.status,
            self.code.as_deref().unwrap_or("-"),
            self.latency
        )
    }
}

type Calls = Arc<Mutex<Vec<Call>>>;

fn record(calls: &Calls, sent: Instant, what: &'static str, replica: usize, r: &Result<Answer>) {
    let (status, code) = match r {
        Ok(a) => (a.status, a.error_code().map(str::to_owned)),
        Err(_) => (0, None),
    };
    lock(calls).push(Call {
        sent,
        latency: sent.elapsed(),
        what,
        replica,
        status,
        code,
    });
}

/// What a client task shares with the scenario.
#[derive(Debug, Default)]
struct ClientState {
    /// The connection it holds now.
    cid: Option<Uuid>,
    registered_at: Option<Instant>,
    registrations: usize,
    heartbeats_404: usize,
    server_ends: usize,
}

#[derive(Debug)]
struct Client {
    name: String,
    session: String,
    state: Arc<Mutex<ClientState>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Waits until `stop` or `d` passed; true if stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// Registers, heartbeats every `interval`, registers again after a 404; closes at `stop`.
async fn http_client(
    c: ApiClient,
    session: String,
    replica: usize,
    interval: Duration,
    state: Arc<Mutex<ClientState>>,
    calls: Calls,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + MAX_RUN;
    let mut cid: Option<Uuid> = None;
    while !stop.is_cancelled() && Instant::now() < deadline {
        let sent = Instant::now();
        let (what, r) = match cid {
            None => (
                "register",
                c.register(replica, &session, "http", "alice").await,
            ),
            Some(id) => ("heartbeat", c.heartbeat(replica, &session, id).await),
        };
        record(&calls, sent, what, replica, &r);
        let mut at_once = false;
        if let Ok(a) = &r {
            match (cid, a.status) {
                (None, 200 | 201) => {
                    cid = a.connection_id();
                    let mut s = lock(&state);
                    s.cid = cid;
                    s.registered_at = Some(Instant::now());
                    s.registrations += 1;
                }
                (Some(_), 404) => {
                    // Documented client behaviour: the connection is gone, register again.
                    cid = None;
                    let mut s = lock(&state);
                    s.cid = None;
                    s.heartbeats_404 += 1;
                    at_once = true;
                }
                _ => {}
            }
        }
        if !at_once && pause(&stop, interval).await {
            break;
        }
    }
    if let Some(id) = cid {
        let _ = c.close(replica, &session, id).await;
    }
    lock(&state).cid = None;
}

/// Holds a WebSocket and opens a new one whenever the server ends it; closes at `stop`.
async fn ws_client(
    c: ApiClient,
    session: String,
    replica: usize,
    interval: Duration,
    state: Arc<Mutex<ClientState>>,
    calls: Calls,
    stop: CancellationToken,
) {
    let deadline = Instant::now() + MAX_RUN;
    while !stop.is_cancelled() && Instant::now() < deadline {
        let sent = Instant::now();
        let opened = tokio::select! {
            () = stop.cancelled() => break,
            r = c.websocket(replica, &session, false) => r,
        };
        let (status, ws) = match opened {
            Ok(ws) => (101, Some(ws)),
            Err(Error::Protocol(msg)) => (upgrade_status(&msg), None),
            Err(_) => (0, None),
        };
        lock(&calls).push(Call {
            sent,
            latency: sent.elapsed(),
            what: "websocket",
            replica,
            status,
            code: None,
        });
        let Some(mut ws) = ws else {
            if pause(&stop, interval).await {
                break;
            }
            continue;
        };
        {
            let mut s = lock(&state);
            s.cid = Some(ws.connection_id);
            s.registered_at = Some(Instant::now());
            s.registrations += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let server_ended = tokio::select! {
            () = stop.cancelled() => false,
            r = ws.hold(left) => matches!(r, Ok(false) | Err(_)),
        };
        {
            let mut s = lock(&state);
            s.cid = None;
            if server_ended {
                s.server_ends += 1;
            }
        }
        if !server_ended {
            ws.close().await;
            break;
        }
    }
    lock(&state).cid = None;
}

/// The status in "... answered 503 instead of upgrading ..." (0 if absent).
fn upgrade_status(msg: &str) -> u16 {
    msg.split("answered ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Calls every API replica (including `/readyz`) every 200 ms until `until`.
async fn probe_outage(
    h: &Harness,
    session: &str,
    until: Instant,
    calls: &Calls,
) -> Result<(usize, usize)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::http("build the prober", e))?;
    let c = h.client();
    let (mut probes, mut ok) = (0, 0);
    while Instant::now() < until {
        for replica in 0..h.api_count() {
            if let Some(addr) = h.api_metrics_addr(replica) {
                let sent = Instant::now();
                let r = http.get(format!("http://{addr}/readyz")).send().await;
                probes += 1;
                let status = r.as_ref().map_or(0, |r| r.status().as_u16());
                if status == 200 {
                    ok += 1;
                }
                lock(calls).push(Call {
                    sent,
                    latency: sent.elapsed(),
                    what: "readyz",
                    replica,
                    status,
                    code: None,
                });
            }
            let sent = Instant::now();
            let r = c.register(replica, session, "http", "alice").await;
            record(calls, sent, "register", replica, &r);
            let sent = Instant::now();
            let r = c.heartbeat(replica, session, Uuid::new_v4()).await;
            record(calls, sent, "heartbeat", replica, &r);
            let sent = Instant::now();
            let r = c.session(replica, session).await;
            record(calls, sent, "get session", replica, &r);
            let sent = Instant::now();
            let r = c.connections(replica, session).await;
            record(calls, sent, "list connections", replica, &r);
            let sent = Instant::now();
            let r = c.stats(replica).await;
            record(calls, sent, "stats", replica, &r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok((probes, ok))
}

/// Clients whose current connection their session's list does not show, after polling up to
/// `timeout` (a client may be between a 404 and its new registration).
async fn not_live(h: &Harness, clients: &[&Client], timeout: Duration) -> Result<Vec<String>> {
    let c = h.client();
    let deadline = Instant::now() + timeout;
    loop {
        let mut missing = Vec::new();
        let sessions: HashSet<&str> = clients.iter().map(|cl| cl.session.as_str()).collect();
        let mut listed: HashSet<Uuid> = HashSet::new();
        for s in sessions {
            let a = c.connections(0, s).await?;
            for conn in a
                .body
                .get("connections")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(id) = conn
                    .get("connection_id")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                {
                    listed.insert(id);
                }
            }
        }
        for cl in clients {
            let cid = lock(&cl.state).cid;
            if !cid.is_some_and(|id| listed.contains(&id)) {
                missing.push(format!("{} ({:?})", cl.name, cid));
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            return Ok(missing);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops clients and waits (bounded) for their tasks (they close their connections).
async fn stop_clients(clients: &mut [Client]) {
    for c in clients.iter() {
        c.stop.cancel();
    }
    for c in clients.iter_mut() {
        let task = &mut c.task;
        if tokio::time::timeout(Duration::from_secs(15), &mut *task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

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
        redis.stop().await?;
    }
    result
}

async fn drive(
    mut h: Harness,
    redis: &mut RedisServer,
    params: RedisRestartParams,
) -> Result<RedisRestartFigures> {
    let timing = h.timing();
    let names: Vec<String> = (0..params.sessions.max(2))
        .map(|i| format!("e2e-redis-{i:03}"))
        .collect();
    for name in &names {
        h.create_session(name, Some(SETUP_IDLE_TIMEOUT))?;
    }
    h.wait_mirrored(&names, Duration::from_secs(30)).await?;
    let kept: HashSet<&str> = names[..names.len() / 2]
        .iter()
        .map(String::as_str)
        .collect();
    let calls: Calls = Arc::default();
    let apis = h.api_count().max(1);
    let mut clients = Vec::new();
    for (si, session) in names.iter().enumerate() {
        for k in 0..=params.http_per_session {
            let websocket = k == params.http_per_session;
            let replica = (si + k) % apis;
            let state = Arc::new(Mutex::new(ClientState::default()));
            let stop = CancellationToken::new();
            let (c, s, st, ca, sp) = (
                h.client(),
                session.clone(),
                state.clone(),
                calls.clone(),
                stop.clone(),
            );
            let interval = timing.heartbeat_interval;
            let task = if websocket {
                tokio::spawn(ws_client(c, s, replica, interval, st, ca, sp))
            } else {
                tokio::spawn(http_client(c, s, replica, interval, st, ca, sp))
            };
            clients.push(Client {
                name: format!(
                    "{session}/{}{k}@api-{replica}",
                    if websocket { "ws" } else { "http" }
                ),
                session: session.clone(),
                state,
                stop,
                task,
            });
        }
    }
    let mut figures = RedisRestartFigures {
        params: Some(params),
        http_clients: params.sessions.max(2) * params.http_per_session,
        websockets: params.sessions.max(2),
        heartbeat_window: timing.heartbeat_window,
        ..RedisRestartFigures::default()
    };
    // Every client connected, then the short idle timeout.
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
    set_idle_timeout(&h, &names, IDLE_TIMEOUT, 2).await?;
    let all: Vec<&Client> = clients.iter().collect();
    let before = not_live(&h, &all, Duration::from_secs(5)).await?;
    if !before.is_empty() {
        return Err(Error::Protocol(format!(
            "connections not live before the kill: {before:?}"
        )));
    }

    // The loss.
    redis.kill().await?;
    let killed = Instant::now();
    let killed_utc = Utc::now();
    let (probes, ok) = probe_outage(&h, &names[0], killed + params.outage, &calls).await?;
    figures.readyz_probes = probes;
    figures.readyz_ok = ok;
    let restart_begin = Instant::now();
    let restart_utc = Utc::now();
    redis.restart().await?;
    let restarted = Instant::now();
    figures.outage_measured = restart_begin - killed;
    eprintln!(
        "tracker-e2e: redis-server down for {:.2?}, back (empty) in {:.2?}",
        restart_begin - killed,
        restarted - restart_begin
    );
    judge_outage(
        &calls,
        killed,
        restart_begin,
        params.max_latency,
        &mut figures,
    );

    // Recovery.
    let c = h.client();
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
            Ok(Some(restarted.elapsed()))
        },
    )
    .await;
    figures.apis_ready_after = ready.ok();
    let recovered = |cl: &Client| {
        lock(&cl.state)
            .registered_at
            .is_some_and(|t| t > restart_begin)
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
            .map(|t| t - restarted);
    }
    figures.not_recovered = clients
        .iter()
        .filter(|cl| !recovered(cl))
        .map(|cl| cl.name.clone())
        .collect();
    figures.not_live = not_live(&h, &all, Duration::from_secs(5)).await?;
    for name in &names {
        let a = c.session(0, name).await?;
        if a.status == 200 && a.body.get("state").and_then(Value::as_str) != Some("unknown") {
            figures.sessions_known_after_restart += 1;
        }
    }

    // The stopped half must be hibernated once idle: the guard ends.
    let (mut kept_clients, mut stopped_clients): (Vec<Client>, Vec<Client>) = clients
        .into_iter()
        .partition(|cl| kept.contains(cl.session.as_str()));
    stop_clients(&mut stopped_clients).await;
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
                .push((at - restart_utc).to_std().unwrap_or_default()),
            None => figures.stopped_not_hibernated.push((*s).clone()),
        }
    }
    let kept_refs: Vec<&Client> = kept_clients.iter().collect();
    let mut end_missing = not_live(&h, &kept_refs, Duration::from_secs(5)).await?;
    figures.not_live.append(&mut end_missing);
    let kept_until = Utc::now();
    stop_clients(&mut kept_clients).await;

    // The patches.
    let guard_end =
        restart_utc + chrono::Duration::from_std(timing.heartbeat_window).unwrap_or_default();
    for p in h.state_patches() {
        if !(p.landed() && p.state == "hibernated") {
            continue;
        }
        let line = format!("{} at {}", p.session, p.at);
        if p.at >= killed_utc && p.at <= guard_end {
            figures.hibernated_in_guard.push(line.clone());
        }
        let busy_until: DateTime<Utc> = if kept.contains(p.session.as_str()) {
            kept_until
        } else {
            stopped_utc
        };
        if p.at >= in_use_from && p.at <= busy_until {
            figures.hibernated_in_use.push(line);
        }
    }
    for cl in kept_clients.iter().chain(&stopped_clients) {
        let s = lock(&cl.state);
        figures.registrations += s.registrations;
        figures.heartbeats_404 += s.heartbeats_404;
        figures.websockets_ended_by_server += s.server_ends;
    }

    h.check_running()?;
    let run_dir = h.run_dir().to_owned();
    if !figures.problems().is_empty() {
        h.keep_run_dir();
        save_calls(&h, &calls);
    }
    let exits = h.shutdown().await?;
    figures.exits = exits_line(&exits);
    figures.unclean_exits = exits.iter().filter(|e| !e.clean).count();
    let problems = figures.problems();
    verdict("redis-restart", figures, &problems, run_dir)
}

/// Every call sent while Redis was down: answered 503 `unavailable` (`/readyz`: not 200,
/// WebSocket: no upgrade) within the bound.
fn judge_outage(
    calls: &Calls,
    killed: Instant,
    restart: Instant,
    bound: Duration,
    f: &mut RedisRestartFigures,
) {
    let calls = lock(calls);
    for call in calls
        .iter()
        .filter(|c| c.sent >= killed && c.sent < restart)
    {
        f.outage_calls += 1;
        if call.latency > f.worst_latency {
            f.worst_latency = call.latency;
            f.worst_call = call.describe();
        }
        if call.latency > bound {
            f.slow_calls.push(call.describe());
        }
        // Answered after the restart: any answer is right.
        if call.sent + call.latency >= restart {
            continue;
        }
        let right = match call.what {
            "readyz" => call.status != 200 && call.status != 0,
            "websocket" => call.status == 503,
            _ => call.status == 503 && call.code.as_deref() == Some("unavailable"),
        };
        if !right {
            f.wrong_answers.push(call.describe());
        }
    }
}

/// The calls of a failed run, for the post-mortem.
fn save_calls(h: &Harness, calls: &Calls) {
    let start = lock(calls).first().map(|c| c.sent);
    let rows: Vec<Value> = lock(calls)
        .iter()
        .map(|c| {
            serde_json::json!({
                "at_ms": start.map_or(0, |s| (c.sent - s).as_millis()),
                "latency_ms": c.latency.as_millis(),
                "what": c.what,
                "replica": c.replica,
                "status": c.status,
                "code": c.code,
            })
        })
        .collect();
    let _ = h.save_json("redis-restart-calls.json", &rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upgrade_status_is_read_from_the_error() {
        assert_eq!(
            upgrade_status("GET ws://x/ws answered 503 instead of upgrading: {}"),
            503
        );
        assert_eq!(upgrade_status("closed before the registered frame"), 0);
    }
}

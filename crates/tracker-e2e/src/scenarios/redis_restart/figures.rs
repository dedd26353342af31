//! The figures of a Redis-restart run, what counts as a problem, and their report.

use std::fmt;
use std::time::Duration;

use super::RedisRestartParams;
use crate::scenarios::checks::some;

/// The outage as the clients and the prober saw it.
#[derive(Debug, Clone, Default)]
pub struct OutageFigures {
    /// From the SIGKILL to the restart (the prober finishes its round, so a little over
    /// `params.outage`).
    pub measured: Duration,
    /// API calls (clients and prober, HTTP and WebSocket upgrades) sent while Redis was down.
    pub calls: usize,
    /// `/readyz` probes of the API replicas during the outage, and how many answered 200.
    pub readyz_probes: usize,
    pub readyz_ok: usize,
    pub worst_latency: Duration,
    pub worst_call: String,
    /// Calls answered by something else than 503 `unavailable` (or not at all) during the outage.
    pub wrong_answers: Vec<String>,
    /// Calls slower than `max_latency` during the outage.
    pub slow_calls: Vec<String>,
}

/// Figures of a Redis-restart run.
#[derive(Debug, Clone, Default)]
pub struct RedisRestartFigures {
    pub params: Option<RedisRestartParams>,
    pub http_clients: usize,
    pub websockets: usize,
    /// What the calls sent while Redis was down got.
    pub outage: OutageFigures,
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
        count(
            self.outage.wrong_answers.len(),
            "wrong answers during the outage",
        );
        count(self.outage.slow_calls.len(), "slow calls during the outage");
        count(
            self.outage.readyz_ok,
            "/readyz answered 200 during the outage",
        );
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
        if self.outage.calls == 0 || self.outage.readyz_probes == 0 {
            p.push("no call was made during the outage".into());
        }
        if self.apis_ready_after.is_none() {
            p.push("an API replica never became ready again".into());
        }
        p
    }
}

impl_figures!(RedisRestartFigures);

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
            self.outage.measured, params.sessions, self.http_clients, self.websockets
        )?;
        writeln!(
            f,
            "  outage: {} calls, worst latency {:.2?} ({}; bound {:?}); /readyz {} probes, {} \
             answered 200",
            self.outage.calls,
            self.outage.worst_latency,
            self.outage.worst_call,
            params.max_latency,
            self.outage.readyz_probes,
            self.outage.readyz_ok
        )?;
        writeln!(
            f,
            "  wrong answers: {}{}; slow: {}{}",
            self.outage.wrong_answers.len(),
            some(&self.outage.wrong_answers, 5),
            self.outage.slow_calls.len(),
            some(&self.outage.slow_calls, 5)
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

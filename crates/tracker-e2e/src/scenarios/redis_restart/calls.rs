//! The API calls of a run as the clients and the prober saw them: recorded with their send
//! time and latency, judged for the outage, saved for a failed run's post-mortem.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use uuid::Uuid;

use super::figures::OutageFigures;
use crate::client::Answer;
use crate::harness::Harness;
use crate::{Error, Result};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One API call as a client or the prober saw it.
#[derive(Debug, Clone)]
pub(super) struct Call {
    pub(super) sent: Instant,
    pub(super) latency: Duration,
    pub(super) what: &'static str,
    pub(super) replica: usize,
    /// 0: no HTTP answer.
    pub(super) status: u16,
    pub(super) code: Option<String>,
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

pub(super) type Calls = Arc<Mutex<Vec<Call>>>;

pub(super) fn record(
    calls: &Calls,
    sent: Instant,
    what: &'static str,
    replica: usize,
    r: &Result<Answer>,
) {
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

/// Calls every API replica (including `/readyz`) every 200 ms until `until`.
pub(super) async fn probe_outage(
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

/// Every call sent while Redis was down: answered 503 `unavailable` (`/readyz`: not 200,
/// WebSocket: closed with 1013 "try again later" after the upgrade) within the bound.
pub(super) fn judge_outage(
    calls: &Calls,
    killed: Instant,
    restart: Instant,
    bound: Duration,
    f: &mut OutageFigures,
) {
    let calls = lock(calls);
    for call in calls
        .iter()
        .filter(|c| c.sent >= killed && c.sent < restart)
    {
        f.calls += 1;
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
            "websocket" => call.status == 1013,
            _ => call.status == 503 && call.code.as_deref() == Some("unavailable"),
        };
        if !right {
            f.wrong_answers.push(call.describe());
        }
    }
}

/// The calls of a failed run, for the post-mortem.
pub(super) fn save_calls(h: &Harness, calls: &Calls) {
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
